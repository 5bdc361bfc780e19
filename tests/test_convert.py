"""convert.py: from the published checkpoint to an MLX model directory (bfloat16 or quantized at any bits,
or mixed), and load() on every layout it must read: the converter's output and mlx-vlm's.

Accuracy bounds are measured on the tiny random-weight model, float32 compute on both sides, so what
remains is the quantization of the weights alone."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from checkpoints import TINY, build_checkpoint, config_with
from compare import FLOAT32, relative_max_diff
from mlx.utils import tree_flatten, tree_unflatten

from mlx_qwen3vl import Qwen3VLError, load, stream_generate
from mlx_qwen3vl.convert import convert
from mlx_qwen3vl.loading import read_config, weight_files
from mlx_qwen3vl.staging import foreign_entries

REPO = Path(__file__).parent.parent
PROMPTS = ("text", "image")


def run_python(*args, env=None, check=True) -> subprocess.CompletedProcess:
    """A fresh interpreter in the repository root (so `convert.py` and the package are found)."""
    result = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def converted(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint converted with the given options, once per set of options."""
    root = tmp_path_factory.mktemp("converted")
    done = {}

    def get(**options) -> Path:
        name = "-".join(f"{k}={v}" for k, v in sorted(options.items())) or "bfloat16"
        if name not in done:
            done[name] = convert(tiny_checkpoint, root / name, progress=False, **options)
        return done[name]

    return get


def logits(model, prompt) -> np.ndarray:
    return np.array(model(prompt.input_ids, **prompt.mlx_inputs())[0].astype(mx.float32))


@pytest.fixture(scope="module")
def unquantized_logits(tiny_f32, prompts) -> dict:
    return {name: logits(tiny_f32[0], prompts[name]) for name in PROMPTS}


def cosine(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


# Logits of the quantized model against the unquantized one at all 80 positions of the text and image
# prompts, float32 compute on both sides. Measured (min / mean cosine, top-1 agreement): 8-bit 0.99945 /
# 0.99976 / 0.89; 4-bit 0.915 / 0.955 / 0.44; mixed_4_6 0.928 / 0.965 / 0.49; 4-bit with the vision tower
# quantized too 0.901 / 0.945 / 0.40. The bounds sit just below. Top-1 agreement is low for a random
# model: its logits are nearly flat, the top-1 margins far below the quantization noise.
ACCURACY = [
    ({"q_bits": 8}, 0.999, 0.9995, 0.85),
    ({"q_bits": 4}, 0.88, 0.94, 0.40),
    ({"q_recipe": "mixed_4_6"}, 0.90, 0.95, 0.45),
    ({"q_bits": 4, "quantize_vision": True}, 0.87, 0.93, 0.35),
]


@pytest.mark.parametrize("options, min_cos, mean_cos, top1", ACCURACY, ids=lambda v: str(v))
def test_quantized_logits_stay_close_to_the_unquantized_model(
    options, min_cos, mean_cos, top1, converted, prompts, unquantized_logits
):
    model, _ = load(converted(**options), dtype="float32")
    ours = {name: logits(model, prompts[name]) for name in PROMPTS}
    cos = np.concatenate([cosine(ours[n], unquantized_logits[n]) for n in PROMPTS])
    agree = np.concatenate([ours[n].argmax(-1) == unquantized_logits[n].argmax(-1) for n in PROMPTS])
    print(f"{options}: cosine min {cos.min():.5f} mean {cos.mean():.5f}, top-1 {agree.mean():.3f}")
    assert cos.min() > min_cos and cos.mean() > mean_cos and agree.mean() > top1


def test_float32_compute_keeps_the_stored_scales_and_computes_in_float32(converted, prompts):
    """Quantized linear layers keep their bfloat16 scales under float32 compute (memory), yet every
    activation is float32: the logits equal those of the same model with all its scales widened to float32
    (bfloat16 widens exactly), and differ from bfloat16 compute."""
    path = converted(q_bits=4, quantize_vision=True)
    model, _ = load(path, dtype="float32")
    params = dict(tree_flatten(model.parameters()))
    scales = {
        k: v.dtype for k, v in params.items() if k.endswith((".scales", ".biases")) and "embed" not in k
    }
    assert scales and set(scales.values()) == {mx.bfloat16}
    assert {v.dtype for k, v in params.items() if k not in scales and v.dtype != mx.uint32} == {mx.float32}
    widened, _ = load(path, dtype="float32")
    widened.update(tree_unflatten([(k, params[k].astype(mx.float32)) for k in scales]))
    in_bf16, _ = load(path, dtype="bfloat16")
    for name in PROMPTS:
        ours = logits(model, prompts[name])
        # Equal here on both BLAS paths (bfloat16 widens exactly); float32 noise at most elsewhere.
        assert relative_max_diff(ours, logits(widened, prompts[name])) < FLOAT32
        assert relative_max_diff(ours, logits(in_bf16, prompts[name])) > 10 * FLOAT32


def quantized_modules(path: Path) -> dict[str, tuple[int, int]]:
    """{module: (bits, group size)} of a converted directory, from its tensors' packed shapes."""
    model, _ = load(path, lazy=True)
    return {
        name: (m.bits, m.group_size)
        for name, m in model.named_modules()
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    }


def test_quantized_layers_follow_the_options_and_the_config_block(converted):
    plain = quantized_modules(converted(q_bits=8, q_group_size=128))
    assert set(plain.values()) == {(8, 128)}
    assert not any(name.startswith("model.visual.") for name in plain)  # the tower stays bfloat16
    assert (
        "model.language_model.embed_tokens" in plain
        and "model.language_model.layers.3.mlp.down_proj" in plain
    )

    mixed_dir = converted(q_recipe="mixed_3_6")
    mixed = quantized_modules(mixed_dir)
    block = json.loads((mixed_dir / "config.json").read_text())["quantization"]
    # mlx-lm's layout: defaults, then one entry per module that differs from them.
    assert {k: block[k] for k in ("group_size", "bits", "mode")} == {
        "group_size": 64,
        "bits": 3,
        "mode": "affine",
    }
    high = {name for name, (bits, _) in mixed.items() if bits == 6}
    assert high == {k for k in block if k.startswith("model.")}
    # ... and again under mlx-lm's and mlx-vlm's module paths, which is how they read them.
    assert {k for k in block if k.startswith("language_model.")} == {
        k.replace("model.language_model.", "language_model.model.") for k in high
    }
    # 4 layers: mlx-lm's recipe puts the last one and every third one (layer 2) at high precision.
    assert high == {
        "model.language_model.embed_tokens",
        *(
            f"model.language_model.layers.{i}.{m}"
            for i in (2, 3)
            for m in ("mlp.down_proj", "self_attn.v_proj")
        ),
    }

    vision = quantized_modules(converted(q_bits=4, quantize_vision=True))
    assert "model.visual.blocks.0.attn.qkv" in vision and "model.visual.merger.linear_fc2" in vision
    # Read by row (positions) or as the input cast (patches): these stay in float, see convert.py.
    assert "model.visual.pos_embed" not in vision and "model.visual.patch_embed.proj" not in vision


def test_bfloat16_conversion_is_lossless_sharded_and_complete(tiny_checkpoint, tmp_path):
    out = convert(tiny_checkpoint, tmp_path / "bf16", max_shard_size=20_000_000, progress=False)
    expected = {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.json",
        "preprocessor_config.json",
        "video_preprocessor_config.json",
        "README.md",
        "model.safetensors.index.json",
    }
    assert expected <= {f.name for f in out.iterdir()}
    shards = weight_files(out)
    assert len(shards) > 1
    for shard in shards:
        tensors = mx.load(str(shard))
        # A shard holds at most 20 MB, unless it is one larger tensor on its own (the embedding).
        assert len(tensors) == 1 or shard.stat().st_size <= 20_000_000 + 100_000
    ours, _ = load(out, lazy=True)
    source, _ = load(tiny_checkpoint, lazy=True)
    for (name, a), (_, b) in zip(
        tree_flatten(ours.parameters()), tree_flatten(source.parameters()), strict=True
    ):
        assert mx.array_equal(a, b).item(), name

    f16 = convert(tiny_checkpoint, tmp_path / "f16", dtype="float16", progress=False)
    assert json.loads((f16 / "config.json").read_text())["dtype"] == "float16"
    assert load(f16, dtype="float16", lazy=True)[0].model.visual.pos_embed.weight.dtype == mx.float16


def safetensors_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in weight_files(path))


@pytest.mark.parametrize("bits, group_size", [(8, 64), (4, 64), (4, 128)])
def test_file_sizes_shrink_as_the_bit_width_says(bits, group_size, converted, tiny_checkpoint):
    """Each quantized weight takes bits/8 bytes plus a bfloat16 scale and bias per group; everything else
    (the vision tower, norms) keeps its 2 bytes per value."""
    source = {}
    for file in weight_files(tiny_checkpoint):
        source.update(mx.load(str(file)))
    quantized = sum(
        v.size for k, v in source.items() if k.startswith("model.language_model.") and v.ndim == 2
    )
    kept = sum(
        v.nbytes for k, v in source.items() if not (k.startswith("model.language_model.") and v.ndim == 2)
    )
    expected = quantized * (bits / 8 + 4 / group_size) + kept
    actual = safetensors_bytes(converted(q_bits=bits, q_group_size=group_size))
    assert abs(actual - expected) / expected < 0.01  # the rest: safetensors headers
    assert actual < (0.6 if bits == 8 else 0.36) * safetensors_bytes(tiny_checkpoint)


@pytest.mark.slow
def test_converted_directory_is_self_contained(tiny_checkpoint, tmp_path, prompts):
    """Converted by the CLI in one process, loaded in another after the source is gone, with torch
    unavailable and without transformers' model classes; the config round-trips."""
    source = shutil.copytree(tiny_checkpoint, tmp_path / "source")
    out = tmp_path / "converted"
    result = run_python("convert.py", "--hf-path", str(source), "--mlx-path", str(out), "--q-bits", "4")
    assert "Converting" in result.stderr and f"Wrote {out}" in result.stderr  # progress is shown
    # The quantization check runs by default (tests/test_check.py): its table, and its report beside.
    assert "next-token KL" in result.stderr and "passed" in result.stderr
    assert json.loads((out / "quantization_report.json").read_text())["passed"]
    source_config = json.loads((source / "config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert (
        config.pop("quantization")
        == config.pop("quantization_config")
        == {
            "group_size": 64,
            "bits": 4,
            "mode": "affine",
        }
    )
    assert config == source_config
    assert read_config(out) == read_config(source)
    in_process, _ = load(out, dtype="float32")
    expected = logits(in_process, prompts["image"])
    shutil.rmtree(source)

    prompt = prompts["image"]
    inputs = {k: v for k, v in prompt.mlx_inputs().items() if v is not None}
    np.savez(tmp_path / "inputs.npz", input_ids=prompt.input_ids, **inputs)
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # import torch fails; transformers sees no torch
        import numpy as np
        from mlx_qwen3vl import load
        inputs = dict(np.load({str(tmp_path / "inputs.npz")!r}))
        model, processor = load({str(out)!r}, dtype="float32")
        np.save({str(tmp_path / "logits.npy")!r}, np.array(model(**inputs)[0]))
        assert not [m for m in sys.modules if m.startswith("transformers.models.") and ".modeling_" in m]
        """
    )
    run_python("-c", script)
    np.testing.assert_array_equal(np.load(tmp_path / "logits.npy"), expected)


@pytest.fixture(scope="module")
def mlx_vlm_conversions(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint converted by mlx-vlm's own converter: bfloat16, and 4-bit with group size 64."""
    root = tmp_path_factory.mktemp("mlx_vlm")
    source = shutil.copytree(tiny_checkpoint, root / "source")
    # mlx-vlm 0.7.10 reads the text rope settings in transformers 4.57's layout, which the published
    # config.json has; save_pretrained (transformers 5) rewrote them in its own.
    (source / "config.json").write_text(json.dumps(config_with(TINY)))
    script = textwrap.dedent(
        f"""
        from mlx_vlm.convert import convert
        convert({str(source)!r}, {str(root / "bf16")!r})
        convert({str(source)!r}, {str(root / "q4")!r}, quantize=True, q_bits=4, q_group_size=64)
        """
    )
    run_python("-c", script, env={"HF_HUB_OFFLINE": "1"})
    return root


@pytest.mark.slow
def test_mlx_vlm_layout_gives_the_same_logits(
    mlx_vlm_conversions, converted, tiny_checkpoint, tmp_path, prompts
):
    keys = json.loads((mlx_vlm_conversions / "q4" / "model.safetensors.index.json").read_text())["weight_map"]
    assert (
        "language_model.model.layers.0.mlp.down_proj.scales" in keys
        and "vision_tower.merger.norm.weight" in keys
    )
    patch = mx.load(str(mlx_vlm_conversions / "bf16" / "model.safetensors"))[
        "vision_tower.patch_embed.proj.weight"
    ]
    assert patch.shape == (128, 2, 16, 16, 3)  # an MLX Conv3d, channels last
    for name in ("bf16", "q4"):  # another converter's output: --force may replace it
        assert foreign_entries(mlx_vlm_conversions / name) == []

    # Unquantized, the same weights: the same logits. 4-bit, the same round-to-nearest quantization as
    # ours with the same bits and group size: the same logits again.
    for theirs, ours in (
        (mlx_vlm_conversions / "bf16", tiny_checkpoint),
        (mlx_vlm_conversions / "q4", converted(q_bits=4)),
    ):
        a, _ = load(theirs, dtype="float32")
        b, _ = load(ours, dtype="float32")
        np.testing.assert_array_equal(logits(a, prompts["image"]), logits(b, prompts["image"]))

    # The converter reads that layout too: from mlx-vlm's bfloat16 directory, the same 4-bit tensors.
    again = convert(mlx_vlm_conversions / "bf16", tmp_path / "q4", q_bits=4, progress=False)
    ours = {k: v for f in weight_files(converted(q_bits=4)) for k, v in mx.load(str(f)).items()}
    theirs = {k: v for f in weight_files(again) for k, v in mx.load(str(f)).items()}
    assert ours.keys() == theirs.keys()
    assert all(mx.array_equal(ours[k], theirs[k]).item() for k in ours)


def vision_features(model, prompt) -> list[np.ndarray]:
    encoded = model.encode_vision(prompt.pixel_values, prompt.image_grid_thw)
    return [np.array(f) for f in (encoded.features, *encoded.deepstack)]


@pytest.mark.slow
def test_mlx_vlm_layout_with_a_quantized_position_table(
    mlx_vlm_conversions, tiny_checkpoint, tmp_path, prompts
):
    """Older mlx-vlm conversions quantized the vision tower, position table included; it loads dequantized."""
    target = shutil.copytree(mlx_vlm_conversions / "bf16", tmp_path / "legacy")
    weights = dict(mx.load(str(target / "model.safetensors")))
    table = weights.pop("vision_tower.pos_embed.weight")
    packed, scales, biases = mx.quantize(table, group_size=64, bits=4)
    weights.update(
        {
            "vision_tower.pos_embed.weight": packed,
            "vision_tower.pos_embed.scales": scales,
            "vision_tower.pos_embed.biases": biases,
        }
    )
    mx.eval(weights)  # read before the file is rewritten
    (target / "model.safetensors.index.json").unlink()
    mx.save_safetensors(str(target / "model.safetensors"), weights)

    legacy, _ = load(target, dtype="float32")
    expected, _ = load(tiny_checkpoint, dtype="float32")
    expected.model.visual.pos_embed.weight = mx.dequantize(packed, scales, biases, 64, 4).astype(mx.float32)
    prompt = prompts["image"]
    for a, b in zip(vision_features(legacy, prompt), vision_features(expected, prompt), strict=True):
        np.testing.assert_array_equal(a, b)


# Untied, text 512 wide with 6 layers: 364 MB in bfloat16, of which 156 MB in each of the embedding and
# lm_head (the largest tensors). Built in ~5 s.
MID = {
    "text_config": {
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
    },
    "tie_word_embeddings": False,
    "vision_config": {
        "depth": 2,
        "hidden_size": 256,
        "num_heads": 4,
        "intermediate_size": 1024,
        "out_hidden_size": 512,
        "deepstack_visual_indexes": [0, 1],
        "initializer_range": 0.02,
    },
}

PEAK_SCRIPT = """
import json, pathlib, sys
import mlx.core as mx
from mlx_qwen3vl.convert import convert

def status(field):  # this process's own resident size (VmRSS) and its peak (VmHWM), in bytes
    if not pathlib.Path("/proc/self/status").exists():  # macOS: only the peak, in bytes (its "before"
        import resource                                  # is then the peak of the imports: close)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024

before, peaks, sizes, source, out = status("VmRSS"), [], [], sys.argv[1], sys.argv[2]
for options in ({"q_bits": 4}, {"max_shard_size": 50_000_000}):
    mx.reset_peak_memory()
    convert(source, out, force=True, **options)
    peaks.append(mx.get_peak_memory())
    sizes.append(sum(f.stat().st_size for f in pathlib.Path(out).glob("*.safetensors")))
print(json.dumps({"rss_growth": status("VmHWM") - before, "peaks": peaks, "output_sizes": sizes}))
"""


@pytest.mark.slow
def test_conversion_streams_with_bounded_peak_memory(checkpoint_root, tmp_path):
    """Measured: 4-bit, the output in one shard: 243 MB of MLX memory at peak (113 MB written + the largest
    tensor while it is quantized); bfloat16 in 50 MB shards: 156 MB, the largest tensor alone. Resident
    size grows 246 MB at most. The model is 364 MB: never two copies, nor even one."""
    source = checkpoint_root / "mid"
    if not source.exists():
        build_checkpoint(source, MID)
    input_size = safetensors_bytes(source)
    largest = max(v.nbytes for f in weight_files(source) for v in mx.load(str(f)).values())
    result = run_python("-c", PEAK_SCRIPT, str(source), str(tmp_path / "out"))
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    quantized_peak, sharded_peak = measured["peaks"]
    q4_size = measured["output_sizes"][0]
    print(f"input {input_size / 1e6:.0f} MB, largest tensor {largest / 1e6:.0f} MB: {measured}")

    assert sharded_peak < 1.1 * max(50_000_000, largest)
    assert quantized_peak < q4_size + 1.5 * largest
    assert measured["rss_growth"] < 0.8 * input_size
    assert "model-00001-of-" in result.stderr  # one progress line per shard


def cli(*args, env=None) -> subprocess.CompletedProcess:
    return run_python("convert.py", *args, env=env, check=False)


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, args, message",
    [
        ("exists", ["--q-bits", "4"], "already exists: choose another output path or pass --force"),
        ("bits", ["--q-bits", "7"], "7-bit quantization is not supported; choose one of 2, 3, 4, 5, 6, 8"),
        (
            "hub offline",
            ["--hf-path", "someone/Qwen3-VL-not-downloaded"],
            "is not downloaded and the hub cannot",
        ),
    ],
)
def test_cli_errors_are_one_line(case, args, message, tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    if case != "exists":
        out = tmp_path / "new"
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # nothing cached, nothing downloaded
    result = cli("--hf-path", str(tiny_checkpoint), "--mlx-path", str(out), *args, env=env)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert result.stderr.startswith("convert.py: error: ")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"q_group_size": 48}, "group size 48 is not supported; choose one of 32, 64, 128"),
        ({"q_recipe": "mixed_5_7"}, "recipe 'mixed_5_7' is not supported"),
        ({"q_recipe": "mixed_3_6", "q_bits": 4}, "either a bit width or a recipe"),
        ({"dtype": "int8"}, "dtype 'int8' is not supported"),
    ],
)
def test_unsupported_options_are_refused_before_any_work(options, message, tmp_path):
    with pytest.raises(Qwen3VLError, match=message):
        convert(tmp_path / "nowhere", tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_source_that_is_not_qwen3_vl_is_refused(tiny_checkpoint, tmp_path):
    source = shutil.copytree(tiny_checkpoint, tmp_path / "llama")
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(Qwen3VLError, match="model_type 'llama' is not Qwen3-VL"):
        convert(source, tmp_path / "out")
    (source / "config.json").unlink()
    with pytest.raises(Qwen3VLError, match="no config.json, this is not a model directory"):
        convert(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_already_quantized_source_is_refused(converted, tmp_path):
    with pytest.raises(Qwen3VLError, match="already quantized; convert from the unquantized checkpoint"):
        convert(converted(q_bits=4), tmp_path / "again", q_bits=8)


def test_force_replaces_a_model_directory_only(converted, tiny_checkpoint, tmp_path):
    out = convert(tiny_checkpoint, tmp_path / "out", q_bits=8, progress=False)
    with pytest.raises(Qwen3VLError, match="already exists"):
        convert(tiny_checkpoint, out, q_bits=4)
    convert(tiny_checkpoint, out, q_bits=4, force=True, progress=False)
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 4
    assert safetensors_bytes(out) == safetensors_bytes(converted(q_bits=4))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging directory left behind
    with pytest.raises(Qwen3VLError, match="would replace the source model"):
        convert(tiny_checkpoint, tiny_checkpoint, force=True)


def users_folder(path: Path) -> dict[str, bytes]:
    """A project folder that happens to hold a config.json: what --force must never delete."""
    (path / "src").mkdir(parents=True)
    (path / "src" / "main.py").write_text("print('mine')\n")
    (path / "config.json").write_text('{"my": "settings"}')
    (path / "notes.txt").write_text("keep me")
    return snapshot(path)


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def test_force_never_replaces_a_folder_of_the_users(tiny_checkpoint, tmp_path):
    project = tmp_path / "project"
    before = users_folder(project)
    with pytest.raises(Qwen3VLError, match=r"holds notes.txt, src/, which a converter did not write"):
        convert(tiny_checkpoint, project, force=True, progress=False)
    assert snapshot(project) == before
    for stray in ("settings.json", "notes.txt"):  # names a model directory never has, even *.json / *.txt
        model_dir = convert(tiny_checkpoint, tmp_path / f"model-{stray}", progress=False)
        (model_dir / stray).write_text("mine")
        with pytest.raises(Qwen3VLError, match=f"holds {stray}, which a converter did not write"):
            convert(tiny_checkpoint, model_dir, force=True, progress=False)
        assert (model_dir / stray).read_text() == "mine"
    lone = tmp_path / "lone"  # model-like names, but no config.json: not recognisably a model directory
    lone.mkdir()
    (lone / "README.md").write_text("my readme")
    with pytest.raises(Qwen3VLError, match="holds README.md"):
        convert(tiny_checkpoint, lone, force=True, progress=False)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "model-notes.txt")
    with pytest.raises(Qwen3VLError, match="is a symbolic link"):
        convert(tiny_checkpoint, link, force=True, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("output", [".", "..", "", "./", "../../project"])
def test_the_working_directory_and_its_parents_are_never_the_output(tiny_checkpoint, tmp_path, output):
    project = tmp_path / "project"
    before = users_folder(project)
    result = subprocess.run(
        [sys.executable, str(REPO / "convert.py"), "--hf-path", str(tiny_checkpoint)]
        + ["--mlx-path", output, "--force"],
        cwd=project / "src",
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr == (
        f"convert.py: error: {output} is the current directory or contains it; choose another output path\n"
    )
    assert snapshot(project) == before


def test_the_old_directory_stays_until_the_new_one_is_complete(tiny_checkpoint, tmp_path, monkeypatch):
    out = convert(tiny_checkpoint, tmp_path / "out", q_bits=8, progress=False)
    before = snapshot(out)
    import mlx_qwen3vl.convert as converter

    real = converter.write_shards

    def interrupted(tensors, directory, *args):
        real(tensors, directory, *args)
        assert any(directory.glob("*.safetensors"))  # the new weights are written, not yet in place
        raise KeyboardInterrupt

    monkeypatch.setattr(converter, "write_shards", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_checkpoint, out, q_bits=4, force=True, progress=False)
    assert snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


KILLED_MID_WRITE = """
import os, signal, sys
import mlx_qwen3vl.convert as converter
from mlx_qwen3vl import staging

real = converter.write_shards
def killed(tensors, directory, *args):
    real(tensors, directory, *args)
    if sys.argv[3] == "during-swap":  # the old directory moved aside, the new one not yet in its place
        def swap_killed(staging_dir, target):
            target.path.rename(target.staging("replaced"))
            os.kill(os.getpid(), signal.SIGKILL)
        staging.swap_in = swap_killed
    else:
        os.kill(os.getpid(), signal.SIGKILL)
converter.write_shards = killed
converter.convert(sys.argv[1], sys.argv[2], q_bits=4, force=True, progress=False)
"""


@pytest.mark.slow
@pytest.mark.parametrize("when", ["mid-write", "during-swap"])
def test_a_killed_conversion_leaves_nothing_the_next_run_cannot_clean(tiny_checkpoint, tmp_path, when):
    out = convert(tiny_checkpoint, tmp_path / "out", q_bits=8, progress=False)
    before = snapshot(out)
    result = run_python("-c", KILLED_MID_WRITE, str(tiny_checkpoint), str(out), when, check=False)
    assert result.returncode == -9
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 2 and any(name.startswith(".out.") for name in left), left

    args = ("--hf-path", str(tiny_checkpoint), "--mlx-path", str(out), "--q-bits", "4", "--force")
    args += ("--no-check",)  # the check is tests/test_check.py's
    result = run_python("convert.py", *args)
    if when == "mid-write":
        assert "removed .out.converting-" in result.stderr
    else:
        assert f"restored {out}, which an interrupted conversion had moved aside" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert snapshot(out) != before  # the new conversion (4-bit) is in place


def test_write_failures_are_reported_under_the_users_name(tiny_checkpoint, tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(Qwen3VLError, match=r"a-file/out: .*a-file is a file, not a directory"):
        convert(tiny_checkpoint, tmp_path / "a-file" / "out", progress=False)

    real_mkdir = Path.mkdir

    def refused(self, *args, **kwargs):
        if ".converting-" in self.name:
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refused)
    with pytest.raises(Qwen3VLError) as error:
        convert(tiny_checkpoint, tmp_path / "out", progress=False)
    assert str(error.value) == (
        f"{tmp_path / 'out'}: cannot write the output directory (Permission denied); nothing was written"
    )
    monkeypatch.setattr(Path, "mkdir", real_mkdir)

    # MLX's safetensors writer on a full disk: "[write] Unable to write N bytes to file."
    def full_disk(path, tensors, metadata=None):
        raise RuntimeError("[write] Unable to write 1048576 bytes to file.")

    monkeypatch.setattr(mx, "save_safetensors", full_disk)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 4096))
    with pytest.raises(Qwen3VLError, match="out: the disk is full; nothing was written"):
        convert(tiny_checkpoint, tmp_path / "out", progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]


def test_recipes_are_mlx_lms(tiny_checkpoint):
    from mlx_lm.convert import QUANT_RECIPES

    from mlx_qwen3vl.options import RECIPES

    assert RECIPES == tuple(QUANT_RECIPES)


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_fused_projections_give_the_separate_layers_numbers(converted, prompts, backend, monkeypatch):
    """q/k/v and gate/up of each decoder layer are fused at load into one matrix each, quantized ones too
    (concatenated rows keep their packed values, scales and biases): the logits equal those of the layers
    kept apart. Layers whose parts differ in bit width (mixed recipes: v_proj at the high bits in some
    layers) stay apart."""
    from mlx_qwen3vl.model import Model

    path = converted(q_bits=4)
    fused, _ = load(path, dtype="float32", backend=backend)
    assert all("qkv_proj" in layer.self_attn and "gate_up_proj" in layer.mlp for layer in fused.layers)
    monkeypatch.setattr(Model, "fuse_projections", lambda self: None)
    apart, _ = load(path, dtype="float32", backend=backend)
    assert "q_proj" in apart.layers[0].self_attn
    for name in PROMPTS:
        ours, theirs = logits(fused, prompts[name]), logits(apart, prompts[name])
        # Equal here on both BLAS paths (each output is the same dot product); float32 noise at most.
        assert relative_max_diff(ours, theirs) < FLOAT32
    monkeypatch.undo()

    mixed, _ = load(converted(q_recipe="mixed_3_6"), dtype="float32", backend=backend, lazy=True)
    attention = [("qkv_proj" in layer.self_attn) for layer in mixed.layers]
    assert attention == [True, True, False, False]  # layers 2 and 3 keep v_proj at 6 bits
    assert all("gate_up_proj" in layer.mlp for layer in mixed.layers)


UNTIED = {
    **TINY,
    "tie_word_embeddings": False,
    "text_config": {**TINY["text_config"], "tie_word_embeddings": False},
}


def quantized_in_memory(path: Path, settings: dict, backend: str):
    """The source model loaded, then quantized as the converter plans it (nn.quantize on the loaded model,
    not the converter's per-tensor path) and specialised again for its backend."""
    from mlx_qwen3vl.backend import Backend
    from mlx_qwen3vl.convert import quantization_plan

    model, processor = load(path, dtype="bfloat16", backend=backend)
    plan = quantization_plan(model, settings)
    nn.quantize(model, class_predicate=lambda name, module: plan.get(name, False))
    Backend.choose(backend, "bfloat16").specialize(model)
    return model, processor


@pytest.mark.slow
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_4bit_conversion_generates_as_the_model_quantized_in_memory(tied, tiny_checkpoint, tmp_path):
    """Both embedding layouts (tied like the 2B / 4B, an lm_head of its own like the 8B / 32B): the
    converter's 4-bit output loads, quantizes what the in-memory quantization of the same model does (the
    lm_head only where untied, the embedding in both), and generates its greedy tokens. bfloat16
    compute, so both sides quantize the checkpoint's own values and keep bfloat16 scales; equal
    log-probabilities at every step, not only equal tokens (a random model repeats itself)."""
    from mlx_qwen3vl.convert import quantization_settings

    source = tiny_checkpoint if tied else build_checkpoint(tmp_path / "untied", UNTIED)
    assert read_config(source).tie_word_embeddings is tied
    converted_dir = convert(source, tmp_path / "q4", q_bits=4, progress=False)
    stored = {k for f in weight_files(converted_dir) for k in mx.load(str(f))}
    assert "model.language_model.embed_tokens.scales" in stored
    assert ("lm_head.scales" in stored) is not tied and ("lm_head.weight" in stored) is not tied

    options = {"max_tokens": 4, "temperature": 0, "logprobs": 5}
    for backend in ("cpu", "gpu"):
        loaded, processor = load(converted_dir, dtype="bfloat16", backend=backend)
        in_memory, _ = quantized_in_memory(source, quantization_settings(bits=4), backend)
        answers = [
            [
                (r.token, r.logprobs.logprob, r.logprobs.top)
                for r in stream_generate(m, processor, "Hi", **options)
            ]
            for m in (loaded, in_memory)
        ]
        assert len(answers[0]) == 4 and answers[0] == answers[1]
