"""Qwen3-VL-MoE (model_type "qwen3_vl_moe"): the sparse decoder against transformers'
Qwen3VLMoeForConditionalGeneration on the same random weights, the layouts its experts are stored in
(transformers 5's save_pretrained, the published hub files, mlx-vlm's), and its 4-bit conversion."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from checkpoints import (
    MODEL_CLASSES,
    TINY_MOE,
    build_checkpoint,
    config_with,
    reference_greedy,
    reference_model,
)
from compare import BFLOAT16_MAX, FLOAT32, relative_max_diff
from media import picture
from prompts import make_prompts, torch_inputs
from safetensors.torch import load_file, save_file
from test_convert import cosine, logits, run_python
from test_generate import streamed_tokens

from mlx_qwen3vl import Qwen3VLError, load
from mlx_qwen3vl.config import ModelConfig
from mlx_qwen3vl.convert import convert
from mlx_qwen3vl.cpu.quantized import CpuQuantizedSwitchLinear
from mlx_qwen3vl.language import MLP
from mlx_qwen3vl.loading import weight_files
from mlx_qwen3vl.moe import SparseMoeBlock

SPARSE_LAYERS = [0, 2, 3]  # TINY_MOE: 4 layers, layer 1 in mlp_only_layers


@pytest.fixture(scope="module")
def moe_checkpoint(checkpoint_root) -> Path:
    """TINY_MOE saved by transformers 5 (experts [E, 2I, H] and [E, H, I], `num_local_experts`)."""
    return build_checkpoint(checkpoint_root / "tiny-moe", TINY_MOE)


@pytest.fixture(scope="module")
def moe_f32(moe_checkpoint):
    return load(moe_checkpoint, dtype="float32")


@pytest.fixture(scope="module")
def moe_reference(moe_checkpoint):
    return reference_model(moe_checkpoint, torch.float32)


@pytest.fixture(scope="module")
def moe_prompts(moe_f32):
    return make_prompts(moe_f32[1].tokenizer)


@pytest.fixture(scope="module")
def hub_layout(moe_checkpoint, tmp_path_factory) -> Path:
    """The same weights as the published Qwen3-VL-MoE files hold them: experts [E, H, 2I] and [E, I, H]
    (transformers 4.57's orientation), config.json in 4.57's layout with `num_experts`, and the vision
    section's model_type "qwen3_vl_moe" as the published file has it (mlx-vlm requires that one)."""
    target = tmp_path_factory.mktemp("hub") / "tiny-moe-hub"
    shutil.copytree(moe_checkpoint, target)
    tensors = load_file(target / "model.safetensors")
    for key in [k for k in tensors if k.endswith((".experts.gate_up_proj", ".experts.down_proj"))]:
        tensors[key] = tensors[key].transpose(1, 2).contiguous()
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    config = config_with(TINY_MOE)
    config["vision_config"]["model_type"] = "qwen3_vl_moe"
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_the_layers_are_sparse_or_dense_as_in_transformers(moe_f32, moe_reference):
    ours = [isinstance(layer.mlp, SparseMoeBlock) for layer in moe_f32[0].layers]
    theirs = [
        type(layer.mlp).__name__.endswith("SparseMoeBlock")
        for layer in moe_reference.model.language_model.layers
    ]
    assert ours == theirs == [i in SPARSE_LAYERS for i in range(4)]


@pytest.mark.parametrize(
    "text_config",
    [
        {"decoder_sparse_step": 2, "mlp_only_layers": []},
        {"decoder_sparse_step": 1, "mlp_only_layers": [0, 4]},
        {"decoder_sparse_step": 3, "mlp_only_layers": None},
    ],
)
def test_sparse_layer_choice_follows_transformers_config(text_config):
    params = config_with({**TINY_MOE, "text_config": {**TINY_MOE["text_config"], **text_config}})
    params["text_config"]["num_hidden_layers"] = 6
    reference = MODEL_CLASSES["qwen3_vl_moe"][0](**params).text_config
    config = ModelConfig.from_dict(params).text_config
    expected = [
        i not in reference.mlp_only_layers and (i + 1) % reference.decoder_sparse_step == 0 for i in range(6)
    ]
    assert [config.moe.is_sparse(i) for i in range(6)] == expected
    assert any(expected) and not all(expected)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_experts": None, "num_local_experts": None}, "text_config lacks num_experts"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok 9 must be between 1 and num_experts"),
        ({"decoder_sparse_step": 0}, "text_config.decoder_sparse_step is 0, must be a whole number >= 1"),
    ],
)
def test_broken_moe_configs_are_refused(change, message):
    params = config_with(TINY_MOE)
    params["text_config"].update(change)
    params["text_config"] = {k: v for k, v in params["text_config"].items() if v is not None}
    with pytest.raises(Qwen3VLError, match=message):
        ModelConfig.from_dict(params)


@pytest.mark.parametrize("name", ["text", "image", "video", "image_and_video"])
def test_logits_match_transformers(name, moe_f32, moe_reference, moe_prompts):
    prompt = moe_prompts[name]
    with torch.no_grad():
        expected = moe_reference(**prompt.torch_inputs()).logits.numpy()
    assert relative_max_diff(logits(moe_f32[0], prompt)[None], expected) < FLOAT32


def test_each_token_goes_to_the_experts_transformers_chooses(
    moe_f32, moe_reference, moe_prompts, monkeypatch
):
    """The chosen experts per token, in every sparse layer, and their weights."""
    reference_routes = []
    hooks = [
        layer.mlp.gate.register_forward_hook(lambda module, args, out: reference_routes.append(out[1:]))
        for layer in moe_reference.model.language_model.layers
        if hasattr(layer.mlp, "gate")
    ]
    prompt = moe_prompts["image"]
    with torch.no_grad():
        moe_reference(**prompt.torch_inputs())
    for hook in hooks:
        hook.remove()

    routes = []
    route = SparseMoeBlock.route

    def recorded(self, x):
        experts, weights = route(self, x)
        routes.append((experts, weights))
        return experts, weights

    monkeypatch.setattr(SparseMoeBlock, "route", recorded)
    mx.eval(moe_f32[0](prompt.input_ids, **prompt.mlx_inputs()))

    assert len(routes) == len(reference_routes) == len(SPARSE_LAYERS)
    for (experts, weights), (ref_weights, ref_experts) in zip(routes, reference_routes, strict=True):
        experts, weights = np.array(experts[0]), np.array(weights[0])
        order, ref_order = np.argsort(experts, axis=-1), np.argsort(ref_experts.numpy(), axis=-1)
        np.testing.assert_array_equal(
            np.take_along_axis(experts, order, -1), np.take_along_axis(ref_experts.numpy(), ref_order, -1)
        )
        np.testing.assert_allclose(
            np.take_along_axis(weights, order, -1),
            np.take_along_axis(ref_weights.numpy(), ref_order, -1),
            rtol=0,
            atol=1e-5,  # softmax weights in [0, 1] in float32: measured at most 1.3e-6 (3 seeds)
        )
        assert len(np.unique(experts)) == 8  # every expert serves some token: a real routing, not a constant


def test_bfloat16_on_the_cpu_stays_within_the_dense_models_bound(moe_checkpoint, moe_prompts):
    """MLX's CPU gather_mm takes float32 only (cpu/widening.py widens for it). On the text prompt,
    where no token's experts change between bfloat16 and float32 in either implementation, the logits
    stay within the dense model's bfloat16 bound of transformers' bfloat16 (compare.BFLOAT16_MAX). A
    prompt where a near-tie flips a token's experts differs there by far more, in transformers too."""
    model, _ = load(moe_checkpoint, dtype="bfloat16", backend="cpu")
    reference = MODEL_CLASSES["qwen3_vl_moe"][1].from_pretrained(moe_checkpoint, dtype=torch.bfloat16).eval()
    prompt = moe_prompts["text"]
    with torch.no_grad():
        expected = reference(**prompt.torch_inputs()).logits.float().numpy()
    assert relative_max_diff(logits(model, prompt)[None], expected) < BFLOAT16_MAX


# How far apart, relative to their probability, two experts' router probabilities may be for bfloat16
# rounding to swap them: a router logit moved by 0.05, what bfloat16 hidden states (~1e-2 relative) give.
NEAR_TIE = 0.05


def test_bfloat16_with_an_image_differs_from_transformers_only_where_experts_nearly_tie(
    moe_checkpoint, moe_prompts, monkeypatch
):
    """bfloat16 with an image, on the CPU. Rounding moves the router's inputs, so a token whose k-th and
    (k+1)-th experts nearly tie may take another expert than in transformers' bfloat16 run (transformers'
    bfloat16 and float32 runs differ so too), and from there the logits part ways. With transformers'
    choices imposed, the logits stay within the dense model's bfloat16 bound (compare.BFLOAT16_MAX),
    and wherever ours would have chosen otherwise, the experts it would swap are within NEAR_TIE of each
    other in its own router probabilities."""
    reference = MODEL_CLASSES["qwen3_vl_moe"][1].from_pretrained(moe_checkpoint, dtype=torch.bfloat16).eval()
    reference_choices = []
    hooks = [
        layer.mlp.gate.register_forward_hook(lambda m, args, out: reference_choices.append(out[2].numpy()))
        for layer in reference.model.language_model.layers
        if hasattr(layer.mlp, "gate")
    ]
    prompt = moe_prompts["image"]
    with torch.no_grad():
        expected = reference(**prompt.torch_inputs()).logits.float().numpy()
    for hook in hooks:
        hook.remove()

    own_route, imposed, swaps = SparseMoeBlock.route, iter(reference_choices), []

    def route_as_transformers(self, x):
        own, _ = own_route(self, x)
        experts = mx.array(next(imposed)).reshape(*x.shape[:-1], self.top_k)
        probs = mx.softmax(self.gate(x).astype(mx.float32), axis=-1)
        rows = zip(*(np.array(a).reshape(-1, a.shape[-1]) for a in (probs, own, experts)), strict=True)
        for p, mine, theirs in rows:
            if set(mine) != set(theirs):
                taken, left = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
                swaps.append((p[taken].max() - p[left].min()) / p[left].min())
        weights = mx.take_along_axis(probs, experts, axis=-1)
        return experts, (weights / weights.sum(axis=-1, keepdims=True)).astype(x.dtype)

    model, _ = load(moe_checkpoint, dtype="bfloat16", backend="cpu")
    monkeypatch.setattr(SparseMoeBlock, "route", route_as_transformers)
    got = logits(model, prompt)
    assert next(imposed, None) is None and len(reference_choices) == len(SPARSE_LAYERS)
    assert relative_max_diff(got[None], expected) < BFLOAT16_MAX
    print(f"{len(swaps)} routings ours would take otherwise, relative gaps {swaps}")
    assert all(0 <= gap < NEAR_TIE for gap in swaps)


@pytest.mark.parametrize("media", ["text", "image"])
def test_greedy_cached_decode_equals_transformers_generate(media, moe_f32, moe_reference):
    model, processor = moe_f32
    kwargs = {"images": [picture(200, 140, 3)]} if media == "image" else {}
    prompt = "Describe the picture." if media == "image" else "Write a haiku about the sea."
    tokens, responses = streamed_tokens(model, processor, prompt, max_tokens=16, temperature=0, **kwargs)
    assert responses[-1].finish_reason == "length"
    assert tokens == reference_greedy(moe_reference, torch_inputs(processor(prompt, **kwargs)), 16)[0]


def test_published_hub_layout_gives_the_same_logits(hub_layout, moe_f32, moe_prompts):
    """Experts stored [E, in, out], as in the published files, are transposed to the module's order. That
    the fixture's orientation is the hub's is checked against transformers, which reads it (its
    conversion mapping transposes what does not fit) to the same logits as its own save."""
    tensors = mx.load(str(hub_layout / "model.safetensors"))
    assert tensors["model.language_model.layers.0.mlp.experts.gate_up_proj"].shape == (8, 128, 384)
    model, _ = load(hub_layout, dtype="float32")
    prompt = moe_prompts["image"]
    np.testing.assert_array_equal(logits(model, prompt), logits(moe_f32[0], prompt))

    reference = MODEL_CLASSES["qwen3_vl_moe"][1].from_pretrained(hub_layout, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(**prompt.torch_inputs()).logits.numpy()
    assert relative_max_diff(logits(model, prompt)[None], expected) < FLOAT32


def test_experts_of_a_shape_that_fits_no_orientation_are_named(moe_checkpoint, tmp_path):
    target = shutil.copytree(moe_checkpoint, tmp_path / "broken")
    tensors = load_file(target / "model.safetensors")
    key = "model.language_model.layers.2.mlp.experts.down_proj"
    tensors[key] = tensors[key][:, :, :96].contiguous()
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(Qwen3VLError, match=r"layers\.2\.mlp\.switch_mlp\.down_proj\.weight has shape"):
        load(target)


@pytest.fixture(scope="module")
def q4(moe_checkpoint, tmp_path_factory) -> Path:
    return convert(moe_checkpoint, tmp_path_factory.mktemp("moe-q4") / "q4", q_bits=4, progress=False)


def test_4bit_conversion_quantizes_the_experts_and_keeps_the_router_at_8_bits(q4, moe_f32, moe_prompts):
    model, processor = load(q4, dtype="float32", backend="cpu")
    for i, layer in enumerate(model.layers):
        if i in SPARSE_LAYERS:
            switch = layer.mlp.switch_mlp
            for projection in (switch.gate_proj, switch.up_proj, switch.down_proj):
                assert type(projection) is CpuQuantizedSwitchLinear  # the experts split over the cores
                assert (projection.bits, projection.group_size) == (4, 64)
            assert isinstance(layer.mlp.gate, nn.QuantizedLinear) and layer.mlp.gate.bits == 8
        else:
            assert isinstance(layer.mlp, MLP)
            assert isinstance(layer.mlp.down_proj, nn.QuantizedLinear) and layer.mlp.down_proj.bits == 4
    block = json.loads((q4 / "config.json").read_text())["quantization"]
    assert block["bits"] == 4 and block["model.language_model.layers.0.mlp.gate"]["bits"] == 8
    # The experts' scales keep the stored bfloat16 under float32 compute, like the dense layers'.
    assert model.layers[0].mlp.switch_mlp.down_proj.scales.dtype == mx.bfloat16

    # Close to the float model (the dense model's 4-bit bounds, test_convert.ACCURACY), and it generates.
    prompt = moe_prompts["text"]
    assert cosine(logits(model, prompt), logits(moe_f32[0], prompt)).mean() > 0.94
    tokens, responses = streamed_tokens(model, processor, "Hello", max_tokens=8, temperature=0)
    assert len(tokens) == 8 and responses[-1].finish_reason == "length"


def test_conversion_streams_the_published_layout_to_switch_mlp_tensors(
    hub_layout, moe_f32, moe_prompts, tmp_path
):
    """Unquantized, the converter's output holds the experts in the module's layout, the same numbers."""
    out = convert(hub_layout, tmp_path / "bf16", progress=False)
    keys = {k for f in weight_files(out) for k in mx.load(str(f))}
    assert "model.language_model.layers.0.mlp.switch_mlp.gate_proj.weight" in keys
    assert not any(".experts." in k for k in keys)
    model, _ = load(out, dtype="float32")
    prompt = moe_prompts["video"]
    np.testing.assert_array_equal(logits(model, prompt), logits(moe_f32[0], prompt))


@pytest.mark.slow
def test_mlx_vlm_conversions_load(hub_layout, q4, moe_checkpoint, moe_f32, moe_prompts, tmp_path):
    """mlx-vlm's own converter (which reads the published orientation) on the hub-layout files. bfloat16:
    our logits exactly. 4-bit: the experts and every other tensor packed exactly as ours, but the router
    at 4 bits (mlx-vlm 0.7.10 defines its 8-bit router predicate on the language model, which its
    converter does not consult); the loader reads each module at the bits it was stored with."""
    script = textwrap.dedent(
        f"""
        from mlx_vlm.convert import convert
        convert({str(hub_layout)!r}, {str(tmp_path / "bf16")!r})
        convert({str(hub_layout)!r}, {str(tmp_path / "q4")!r}, quantize=True, q_bits=4, q_group_size=64)
        """
    )
    run_python("-c", script, env={"HF_HUB_OFFLINE": "1"})
    prompt = moe_prompts["image"]
    model, _ = load(tmp_path / "bf16", dtype="float32")
    np.testing.assert_array_equal(logits(model, prompt), logits(moe_f32[0], prompt))

    sanitize = moe_f32[0].sanitize
    theirs = sanitize({k: v for f in weight_files(tmp_path / "q4") for k, v in mx.load(str(f)).items()})
    ours = sanitize({k: v for f in weight_files(q4) for k, v in mx.load(str(f)).items()})
    assert "model.language_model.layers.0.mlp.switch_mlp.gate_proj.scales" in theirs
    assert theirs.keys() == ours.keys()
    differ = {k.rpartition(".")[0] for k in ours if not mx.array_equal(ours[k], theirs[k]).item()}
    assert differ == {f"model.language_model.layers.{i}.mlp.gate" for i in SPARSE_LAYERS}

    model, _ = load(tmp_path / "q4", dtype="float32")
    assert model.layers[0].mlp.gate.bits == 4 and model.layers[0].mlp.switch_mlp.up_proj.bits == 4
    assert cosine(logits(model, prompt), logits(moe_f32[0], prompt)).mean() > 0.94
