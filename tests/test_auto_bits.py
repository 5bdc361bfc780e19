"""The auto recipe (mlx_qwen3vl/auto_bits.py): its choice of widths on its own, and its output on the MoE
test checkpoint (the experts' bits chosen per layer, the routers at 8 bits), loaded by us and by mlx-lm,
whose qwen3_vl_moe model reads the language model of a Qwen3-VL checkpoint and its per-layer bits.

The MoE conversion measures its layers on two samples of the calibration set (a text prompt and the
photo: the decoder on text and on vision tokens), enough to exercise the measurement, and the check is
left out: tests/test_check.py covers both on the dense model."""

import json
import random
from itertools import islice
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from checkpoints import TINY_MOE, build_checkpoint, config_with, with_vocabulary
from compare import FLOAT32, relative_max_diff
from test_check import VOCABULARY, small_calibration

from mlx_qwen3vl import load
from mlx_qwen3vl.auto_bits import CANDIDATE_BITS, choose_bits, decreasing
from mlx_qwen3vl.convert import convert
from mlx_qwen3vl.generation import generate_step
from mlx_qwen3vl.loading import weight_files

TARGET_BITS = 3.5


def test_a_more_sensitive_layer_never_gets_fewer_bits():
    """Layer "a" is "b" made `factor` times as sensitive (its divergence at every width scaled, measured
    with the same noise, which `decreasing` evens out); the other layers, their sizes and the target
    vary. Exchanging the two layers' widths keeps the bits used and lowers the divergence whenever "a"
    has fewer, so the exact choice never gives it fewer."""
    rng = random.Random(0)
    for case in range(200):
        curves, sizes = {}, {}
        for n in range(rng.randint(1, 5)):
            curves[f"other{n}"] = decreasing({b: rng.lognormvariate(-b, 1.5) for b in CANDIDATE_BITS})
            sizes[f"other{n}"] = rng.choice((64, 128, 256))
        noisy = {b: rng.lognormvariate(-b, 1.0) for b in CANDIDATE_BITS}
        factor = 1 + rng.random() * 9
        curves["a"] = decreasing({b: factor * value for b, value in noisy.items()})
        curves["b"] = decreasing(noisy)
        sizes["a"] = sizes["b"] = 128
        order = list(curves)
        rng.shuffle(order)
        target = rng.uniform(2, 8)
        bits = choose_bits({k: curves[k] for k in order}, {k: sizes[k] for k in order}, target, {})
        assert sum(sizes[k] * bits[k] for k in bits) <= target * sum(sizes.values())
        assert bits["a"] >= bits["b"], (case, bits, curves["a"], curves["b"])


def test_measured_divergence_is_made_non_increasing_in_the_bits():
    measured = {2: 0.019, 3: 0.035, 4: 0.030, 6: 0.012, 8: -1e-7}  # noise: 3 and 4 above 2, 8 below 0
    assert decreasing(measured) == {2: 0.019, 3: 0.019, 4: 0.019, 6: 0.012, 8: 0.0}


@pytest.fixture(scope="module")
def moe_auto(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("moe-auto")
    overrides = with_vocabulary(TINY_MOE, VOCABULARY)
    # The published Qwen3-VL-MoE configs carry norm_topk_prob (transformers ignores it: its router always
    # renormalises), which mlx-lm's Qwen3-MoE arguments require.
    overrides["text_config"] = {**overrides["text_config"], "norm_topk_prob": True}
    source = build_checkpoint(root / "source", overrides)
    (source / "config.json").write_text(json.dumps(config_with(overrides)))  # the published layout

    def two_samples(processor) -> list[dict]:
        samples = small_calibration(processor)
        return [samples[0], samples[2]]

    out = convert(
        source,
        root / "auto",
        q_recipe="auto",
        target_bits=TARGET_BITS,
        progress=False,
        calibration=two_samples,
    )
    return source, out


def stored_bits(path: Path) -> tuple[dict[str, int], dict[str, int]]:
    """{module path: bits} of every quantized weight, from its packed shape, and {module path: weights}."""
    stored = {k: v for f in weight_files(path) for k, v in mx.load(str(f)).items()}
    bits, sizes = {}, {}
    for key, packed in stored.items():
        path_, _, name = key.rpartition(".")
        if name == "weight" and f"{path_}.scales" in stored:
            columns = stored[f"{path_}.scales"].shape[-1] * 64
            bits[path_] = packed.shape[-1] * 32 // columns
            sizes[path_] = packed.size * 32 // bits[path_]
    return bits, sizes


@pytest.mark.slow
def test_auto_recipe_on_moe_respects_the_target_and_generates(moe_auto):
    _, out = moe_auto
    bits, sizes = stored_bits(out)
    routers = {p for p in bits if p.endswith(".mlp.gate")}
    assert routers == {f"model.language_model.layers.{i}.mlp.gate" for i in (0, 2, 3)}
    assert all(bits[p] == 8 for p in routers)
    chosen = {p: b for p, b in bits.items() if p not in routers}
    average = sum(chosen[p] * sizes[p] for p in chosen) / sum(sizes[p] for p in chosen)
    experts = {p: b for p, b in chosen.items() if ".switch_mlp." in p}
    assert len(experts) == 9 and set(experts.values()) <= set(CANDIDATE_BITS)
    print(f"average {average:.3f} bits;", {p: b for p, b in chosen.items()})
    assert average <= TARGET_BITS
    assert len(set(chosen.values())) > 1  # widths chosen per layer, not one for all
    for layer in (0, 2, 3):  # a layer's experts and attention share its width
        widths = {b for p, b in chosen.items() if p.startswith(f"model.language_model.layers.{layer}.")}
        assert len(widths) == 1, (layer, widths)

    model, processor = load(out, dtype="float32")
    sample = small_calibration(processor)[2]  # the photo
    vision = [model.encode_vision(sample["pixel_values"], sample["image_grid_thw"])]
    steps = generate_step(model, model.prepare(sample["input_ids"], vision), model.make_cache(), max_tokens=4)
    tokens = [token for token, _ in islice(steps, 4)]
    assert len(tokens) == 4 and all(0 <= t < VOCABULARY for t in tokens)


@pytest.mark.slow
def test_auto_output_loads_in_mlx_lm_with_our_logits(moe_auto):
    """mlx-lm's qwen3_vl_moe (the language model of a Qwen3-VL-MoE checkpoint) reads the output: every
    module it quantizes at other than the default bits is one with an entry of its own in config.json's
    quantization block, the key its loader's class predicate looks up, and the text logits equal ours
    (the same quantized weights; float32 on both sides)."""
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear
    from mlx_lm.utils import load_model

    _, out = moe_auto
    theirs, config = load_model(out)
    block = config["quantization"]
    quantized = {
        path: module
        for path, module in theirs.named_modules()
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear))
    }
    ours_bits, _ = stored_bits(out)
    assert len(quantized) == len(ours_bits)
    for path, module in quantized.items():
        if module.bits != block["bits"]:
            assert block[path]["bits"] == module.bits, path
        ours = path.replace("language_model.model.", "model.language_model.").replace(
            "language_model.lm", "lm"
        )
        assert ours_bits[ours] == module.bits, path

    theirs.set_dtype(mx.float32)
    model, processor = load(out, dtype="float32")
    ids = small_calibration(processor)[0]["input_ids"]
    reference = np.array(theirs(mx.array(ids))[0].astype(mx.float32))
    assert relative_max_diff(np.array(model(mx.array(ids))[0]), reference) < FLOAT32
