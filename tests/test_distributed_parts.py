"""distributed/parts.py alone: what a tensor-parallel rank reads of stored tensors equals the slice of the
whole tensor it holds. For what the two-rank test's checkpoints do not store: transformers 4.57's
orientation of the fused experts ([E, hidden, 2I] and [E, I, hidden], which the published MoE files
hold), packed quantized columns with their scales, and slices whose runs are longer than a page (read one
by one) and shorter (read in blocks of whole rows, several blocks here)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.switch_layers import SwitchLinear

from mlx_qwen3vl.distributed import parts
from mlx_qwen3vl.distributed.tensor import Part

EXPERTS, HIDDEN, WIDTH = 4, 48, 40  # WIDTH: an expert's intermediate width
MLP = "model.language_model.layers.0.mlp"


def stored_bfloat16(tmp_path, tensors: dict[str, np.ndarray]) -> tuple[dict, dict[str, np.ndarray]]:
    """The tensors saved in bfloat16 (as the published files are), and their values as saved."""
    file = tmp_path / "model.safetensors"
    saved = {name: mx.array(value).astype(mx.bfloat16) for name, value in tensors.items()}
    mx.save_safetensors(str(file), saved)
    return parts.stored_tensors(file), {name: np.array(v.astype(mx.float32)) for name, v in saved.items()}


def read(tensor: parts.StoredTensor, box: parts.Box) -> np.ndarray:
    with tensor.file.open("rb", buffering=0) as handle:
        return np.array(parts.read_box(handle, tensor, box).astype(mx.float32))


def test_fused_experts_stored_in_out_are_read_as_the_ranks_gate_up_and_down_rows(tmp_path):
    """Rank 1 of 2 holds intermediate features [20, 40) of every expert: its gate rows, its up rows (the
    fused tensor's second half) and its down columns, read in the module's [E, out, in] order."""
    rng = np.random.default_rng(0)
    tensors, values = stored_bfloat16(
        tmp_path,
        {
            f"{MLP}.experts.gate_up_proj": rng.standard_normal((EXPERTS, HIDDEN, 2 * WIDTH)),  # [E, in, out]
            f"{MLP}.experts.down_proj": rng.standard_normal((EXPERTS, WIDTH, HIDDEN)),  # [E, in, out]
        },
    )
    gate_up, down = values[f"{MLP}.experts.gate_up_proj"], values[f"{MLP}.experts.down_proj"]
    start, stop = WIDTH // 2, WIDTH
    held = {
        f"{MLP}.switch_mlp.gate_proj": (
            SwitchLinear(HIDDEN, WIDTH, EXPERTS),
            Part("out", start, stop, WIDTH),
        ),
        f"{MLP}.switch_mlp.down_proj": (SwitchLinear(WIDTH, HIDDEN, EXPERTS), Part("in", start, stop, WIDTH)),
    }
    boxes = {name: parts.stored_box(name, t.shape, held) for name, t in tensors.items()}
    out_in = gate_up.transpose(0, 2, 1)
    expected_gate_up = np.concatenate(
        [out_in[:, start:stop], out_in[:, WIDTH + start : WIDTH + stop]], axis=1
    )
    np.testing.assert_array_equal(
        read(tensors[f"{MLP}.experts.gate_up_proj"], boxes[f"{MLP}.experts.gate_up_proj"]), expected_gate_up
    )
    expected_down = down.transpose(0, 2, 1)[:, :, start:stop]
    np.testing.assert_array_equal(
        read(tensors[f"{MLP}.experts.down_proj"], boxes[f"{MLP}.experts.down_proj"]), expected_down
    )


@pytest.mark.parametrize("block_bytes", [parts.BLOCK_BYTES, 200])
def test_columns_of_packed_weights_and_their_scales_long_and_short_runs(tmp_path, monkeypatch, block_bytes):
    """Input features [64, 128) of 128 (rank 1 of 2 of an o_proj): 4-bit packed columns [8, 16) of 16,
    scales columns [1, 2) of 2 (groups of 64); and a float32 layer whose runs are two pages each."""
    monkeypatch.setattr(parts, "BLOCK_BYTES", block_bytes)
    rng = np.random.default_rng(1)
    page_columns = 2 * parts.mmap.PAGESIZE // 4
    tensors = {
        "packed": rng.integers(0, 2**32, (24, 16), dtype=np.uint32),
        "scales": rng.standard_normal((24, 2)).astype(np.float32),
        "wide": rng.standard_normal((6, 2 * page_columns)).astype(np.float32),
    }
    file = tmp_path / "model.safetensors"
    mx.save_safetensors(str(file), {name: mx.array(value) for name, value in tensors.items()})
    found = parts.stored_tensors(file)
    part = Part("in", 64, 128, 128)
    for name in ("packed", "scales"):
        with file.open("rb", buffering=0) as handle:
            values = np.array(parts.read_box(handle, found[name], part.box("weight", found[name].shape)))
        columns = tensors[name].shape[1]
        np.testing.assert_array_equal(values, tensors[name][:, columns // 2 :])
    wide = Part("in", 0, page_columns, 2 * page_columns)
    with file.open("rb", buffering=0) as handle:
        values = np.array(parts.read_box(handle, found["wide"], wide.box("weight", found["wide"].shape)))
    np.testing.assert_array_equal(values, tensors["wide"][:, :page_columns])
