"""The tests' reference comparisons, run on the device this process has (a GPU when one is lent): the GPU
path's logits for the tests' prompts and 8 decode steps after an image and a video prompt, in float32
and bfloat16, against transformers' float32 on the CPU. Writes one JSON line per check; exits 1 when a
check is out of its bound. Without a GPU it runs the GPU path's code on the CPU, as the tests do.
On a GPU it also checks what `vision.fused_attention` relies on: the vision towers' head dims (64 for the
2B / 4B, 72 for the 8B / 32B) take MLX's fused attention kernel at the tower's shapes (`force_fused`
raises where MLX would fall back to unfused ops), equal to attention computed op by op.

    python bench/gpu_parity.py [OUT.json]

The bounds are the tests' (tests/test_model.py): float32 1e-4 of the logit scale; bfloat16 2.5e-2 max.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import mlx_qwen3vl  # noqa: F401  (first: the BLAS binding, see mlx_qwen3vl/cpu/openblas.py)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from checkpoints import TINY, build_checkpoint, reference_model  # noqa: E402
from compare import relative_max_diff, teacher_forced  # noqa: E402
from prompts import make_prompts  # noqa: E402

from mlx_qwen3vl import load  # noqa: E402

BOUNDS = {"float32": 1e-4, "bfloat16": 2.5e-2}
STEPS = 8


def reference_steps(reference, prompt) -> tuple[list[int], np.ndarray]:
    """transformers' greedy tokens and the float32 logits before each, from one forward pass."""
    tokens, inputs = [], prompt.torch_inputs()
    with torch.no_grad():
        ids = inputs["input_ids"]
        for _ in range(STEPS):
            logits = reference(**{**inputs, "input_ids": ids, **_types(inputs, ids)}).logits[0, -1]
            tokens.append(int(logits.argmax()))
            ids = torch.cat([ids, torch.tensor([[tokens[-1]]])], dim=1)
        full = reference(**{**inputs, "input_ids": ids[:, :-1], **_types(inputs, ids[:, :-1])}).logits[0]
    return tokens, full[-STEPS:].numpy()


def _types(inputs: dict, ids) -> dict:
    if "mm_token_type_ids" not in inputs:
        return {}
    types = ((ids == 151655) * 1 + (ids == 151656) * 2).long()
    return {"mm_token_type_ids": types}


def vision_head_dim_checks() -> list[dict]:
    """bfloat16, 16 heads, segments of a 16 x 16-patch image: the fused kernel against attention op by op
    in float32 (bound: bfloat16's rounding of the inputs and output)."""
    rng = np.random.default_rng(0)
    checks = []
    for head_dim in (64, 72):
        q, k, v = (mx.array(rng.standard_normal((2, 16, 256, head_dim)), dtype=mx.bfloat16) for _ in range(3))
        scale = head_dim**-0.5
        fused = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, force_fused=True)
        scores = (q.astype(mx.float32) @ k.astype(mx.float32).swapaxes(-1, -2)) * scale
        expected = mx.softmax(scores, axis=-1) @ v.astype(mx.float32)
        diff = float(mx.abs(fused.astype(mx.float32) - expected).max())
        check = f"fused vision attention, head_dim {head_dim}"
        checks.append({"dtype": "bfloat16", "check": check, "diff": diff})
    return checks


def main() -> int:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    results, failed = [], False
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = build_checkpoint(Path(tmp) / "tiny", TINY)
        reference = reference_model(checkpoint, torch.float32)
        for dtype, bound in BOUNDS.items():
            model, processor = load(checkpoint, dtype=dtype, backend="gpu")
            prompts = make_prompts(processor.tokenizer)
            for name, prompt in prompts.items():
                with torch.no_grad():
                    expected = reference(**prompt.torch_inputs()).logits.numpy()
                logits = np.array(model(prompt.input_ids, **prompt.mlx_inputs()).astype(mx.float32))
                diff = relative_max_diff(logits, expected)
                results.append({"dtype": dtype, "check": f"logits {name}", "diff": diff})
            for name in ("image", "video"):
                tokens, expected = reference_steps(reference, prompts[name])
                diff = relative_max_diff(teacher_forced(model, prompts[name], tokens), expected)
                results.append({"dtype": dtype, "check": f"{STEPS} decode steps after {name}", "diff": diff})
            for result in results:
                if result["dtype"] == dtype:
                    result.update(bound=bound, ok=result["diff"] < bound, device=str(mx.default_device()))
                    failed |= not result["ok"]
    if mx.default_device() == mx.gpu:
        for result in vision_head_dim_checks():
            result.update(bound=2e-2, ok=result["diff"] < 2e-2, device=str(mx.default_device()))
            failed |= not result["ok"]
            results.append(result)
    text = "\n".join(json.dumps(r) for r in results)
    print(text)
    if out:
        out.write_text(text + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
