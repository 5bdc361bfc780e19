"""The quantization check (mlx_qwen3vl/check.py), what the converter refuses to quantize, and the auto
recipe (auto_bits.py), on the tiny random-weight checkpoint with a 512-token vocabulary and a copy of it
with a few sensitive layers.

Each conversion with its check runs both models over the calibration set, and the auto recipe runs it
twice per layer: with the published 151936-token vocabulary, the vocabulary projection and the softmax
over it at every predicted position would be nearly all of that work at these widths. The calibration
set is the package's, its token ids folded into the small vocabulary (`checkpoints.compact_ids`). The
tests share conversions through module fixtures and bundle their checks, to keep to a few such runs."""

import copy
import dataclasses
import json
import shutil
import textwrap
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from checkpoints import TINY, build_checkpoint, compact_ids, config_with, reference_model, with_vocabulary
from compare import FLOAT32, relative_max_diff
from prompts import torch_inputs
from test_convert import run_python

from mlx_qwen3vl import Qwen3VLError, load
from mlx_qwen3vl.calibration import calibration_inputs
from mlx_qwen3vl.check import REPORT_FILE, check, predicted_positions, scored_positions
from mlx_qwen3vl.check import main as check_main
from mlx_qwen3vl.convert import convert
from mlx_qwen3vl.loading import read_config, weight_files
from mlx_qwen3vl.model import Model
from mlx_qwen3vl.processor import Processor

VOCABULARY = 512
SMALL_VOCABULARY = with_vocabulary(TINY, VOCABULARY)
PUBLISHED_PADS = (151655, 151656)
IMAGE_PAD, VIDEO_PAD = compact_ids(np.array(PUBLISHED_PADS), VOCABULARY).tolist()
MEDIA_INPUTS = (
    ("image", "pixel_values", "image_grid_thw"),
    ("video", "pixel_values_videos", "video_grid_thw"),
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """TINY with a VOCABULARY-token vocabulary, in the published config.json layout (which mlx-vlm reads,
    see test_convert.mlx_vlm_conversions)."""
    path = build_checkpoint(tmp_path_factory.mktemp("small-vocabulary") / "source", SMALL_VOCABULARY)
    (path / "config.json").write_text(json.dumps(config_with(SMALL_VOCABULARY)))
    return path


def small_calibration(processor) -> list[dict]:
    """The package's calibration set in the checkpoint's vocabulary: tokenized as the published
    vocabulary numbers it (where the processor counts the pads it inserted), then folded."""
    published = copy.copy(processor)
    published.config = dataclasses.replace(
        processor.config, image_token_id=PUBLISHED_PADS[0], video_token_id=PUBLISHED_PADS[1]
    )
    return [
        {**s, "input_ids": compact_ids(s["input_ids"], VOCABULARY)} for s in calibration_inputs(published)
    ]


def report_of(path: Path) -> dict:
    return json.loads((path / REPORT_FILE).read_text())


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_report_figures_equal_an_independent_computation(checkpoint, tmp_path):
    """The source through transformers, the quantized model (vision tower quantized too) through our
    load(): KL divergence, top-1 agreement and the vision mergers' relative errors computed here equal
    the report's (float32 on both sides; what differs is the order of float32 sums)."""
    options = {"q_bits": 4, "quantize_vision": True, "check": True, "progress": False}
    out = convert(checkpoint, tmp_path / "q4", calibration=small_calibration, **options)
    transformers_model = reference_model.__wrapped__(checkpoint, torch.float32)  # not kept after the test
    report = report_of(out)
    assert report["passed"] and report["conversion_seconds"] > 0 and report["seconds"] > 0

    model, processor = load(out, dtype="float32")
    kl, agree, levels = [], [], {}
    for sample in small_calibration(processor):
        arguments = torch_inputs(sample, (IMAGE_PAD, VIDEO_PAD))
        with torch.no_grad():
            reference = transformers_model(**arguments).logits[0].numpy()
            for _, pixels, grids in MEDIA_INPUTS:
                if sample[pixels] is None:
                    continue
                features = transformers_model.model.visual(
                    arguments[pixels], grid_thw=arguments[grids], return_dict=True
                )
                reference_levels = [features.pooler_output, *features.deepstack_features]
                encoded = model.encode_vision(sample[pixels], sample[grids])
                ours_levels = [encoded.features, *encoded.deepstack]
                for j, (a, b) in enumerate(zip(ours_levels, reference_levels, strict=True)):
                    b = b.numpy().astype(np.float64)
                    sums = levels.setdefault(j, [0.0, 0.0])
                    sums[0] += float(((np.array(a, np.float64) - b) ** 2).sum())
                    sums[1] += float((b**2).sum())
        keep = scored_positions(model, sample["input_ids"])  # pinned in test_scored_positions
        # The model's own forward pass, its vocabulary projection at the scored positions alone.
        vision = [
            model.encode_vision(sample[p], sample[g], None, k)
            for k, p, g in MEDIA_INPUTS
            if sample[p] is not None
        ]
        hidden = model.hidden_states(model.prepare(sample["input_ids"], vision))
        ours = np.array(model.head(hidden[:, mx.array(keep)])[0])
        log_p, log_q = log_softmax(reference[keep]), log_softmax(ours)
        kl.append((np.exp(log_p) * (log_p - log_q)).sum(-1))
        agree.append(reference[keep].argmax(-1) == ours.argmax(-1))
    kl, agree = np.concatenate(kl), np.concatenate(agree)
    assert report["positions"] == len(kl) and report["prompts"] == 6
    assert abs(report["kl"] - kl.mean()) < 1e-3 * kl.mean(), (report["kl"], kl.mean())
    assert abs(report["top1"] - agree.mean()) <= 1 / len(agree), (report["top1"], agree.mean())
    vision = list(report["vision"].values())
    assert len(vision) == 4 and all(v > 0.01 for v in vision)  # the merger, then 3 DeepStack mergers
    for j, (difference, norm) in levels.items():
        assert abs(vision[j] - np.sqrt(difference / norm)) < 1e-3 * vision[j], (j, vision[j])
    # The check command, reading both directories, gives the figures the conversion took from the
    # tensors it had in memory.
    command = check(out, checkpoint, dtype="float32", calibration=small_calibration)
    assert command.passed and command.positions == report["positions"]
    assert list(command.vision) == list(report["vision"])
    for ours, theirs in (
        ([command.kl, command.top1], [report["kl"], report["top1"]]),
        (list(command.vision.values()), vision),
        (command.layers, report["layers"]),
    ):
        assert np.allclose(ours, theirs, rtol=1e-5, atol=0), (ours, theirs)


def test_predicted_positions_leave_out_the_vision_pads(checkpoint):
    model = Model(read_config(checkpoint))  # its config alone: the parameters stay lazy
    ids = np.array([[1, 2, IMAGE_PAD, IMAGE_PAD, 3, VIDEO_PAD, 4]])
    assert predicted_positions(model, ids).tolist() == [0, 1, 4, 6]


def test_scored_positions_are_the_last_eight_and_every_second_before(checkpoint):
    model = Model(read_config(checkpoint))
    ids = np.arange(40)[None] + 1000
    ids[0, [3, 4, 5, 20, 21]] = IMAGE_PAD  # predicted: 0-2, 6-19, 22-39 (35 positions)
    assert scored_positions(model, ids).tolist() == [
        0,
        2,
        7,
        9,
        11,
        13,
        15,
        17,
        19,
        23,
        25,
        27,
        29,
        31,
        *range(32, 40),
    ]
    assert scored_positions(model, ids[:, :5]).tolist() == [0, 1, 2]


def test_protected_tensors_are_refused_with_the_reason(checkpoint, tmp_path):
    cases = {
        "model.visual.pos_embed": "a position table is read by row",
        "model.visual.patch_embed.proj": "casts the pixels",
        "model.visual.merger.norm": "a norm scales every value",
        "model.language_model.layers.0.mlp.down_pro": "no quantizable layer of that name",
    }
    for path, reason in cases.items():
        with pytest.raises(Qwen3VLError, match=reason) as error:
            convert(checkpoint, tmp_path / "out", q_layer_bits={path: 4}, progress=False)
        assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(Qwen3VLError, match="--q-recipe auto and --target-bits go together"):
        convert(checkpoint, tmp_path / "out", target_bits=4)


@pytest.fixture(scope="module")
def broken(checkpoint, tmp_path_factory):
    """A 4-bit conversion with the position table forced to 4 bits and layer 2's down_proj corrupted (its
    scales tripled after quantizing), behind the converter's back: the check must catch both."""
    import mlx_qwen3vl.convert as converter

    real_plan, real_tensors = converter.quantization_plan, converter.output_tensors

    def forced_plan(model, settings, *args):
        return {**real_plan(model, settings, *args), "model.visual.pos_embed": dict(settings)}

    def corrupted(*args):
        tensors = real_tensors(*args)
        key = "model.language_model.layers.2.mlp.down_proj.scales"
        tensors[key] = tensors[key] * 3
        return tensors

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(converter, "quantization_plan", forced_plan)
        patch.setattr(converter, "output_tensors", corrupted)
        out = tmp_path_factory.mktemp("broken") / "q4"
        with pytest.raises(Qwen3VLError) as error:
            convert(checkpoint, out, q_bits=4, check=True, progress=False)
    return out, str(error.value)


CULPRITS = ("model.visual.pos_embed.weight", "model.language_model.layers.2.mlp.down_proj.weight")


def test_a_broken_conversion_is_reported_failed_naming_the_tensors(broken):
    out, message = broken
    assert "the quantization check failed: model.visual.pos_embed.weight stored quantized" in message
    assert "\n" not in message
    report = report_of(out)
    assert not report["passed"]
    assert [f["tensor"] for f in report["failures"]] == list(CULPRITS)
    reasons = [f["reason"] for f in report["failures"]]
    assert "position table" in reasons[0] and "what 4-bit rounding gives" in reasons[1]
    corrupted = report["tensors"][CULPRITS[1]]
    assert corrupted["error"] > 10 * corrupted["rounding_error"]


def test_check_command_exits_non_zero_naming_the_tensors(broken, checkpoint, capsys):
    out, _ = broken
    with pytest.raises(SystemExit) as exit_status:
        check_main([str(out), "--against", str(checkpoint), "--dtype", "float32"])
    assert exit_status.value.code == 1
    printed = capsys.readouterr().out
    assert all(f"FAILED {name}:" in printed for name in CULPRITS), printed
    assert "outputs not compared: a tensor is broken" in printed and "next-token KL" not in printed


# Layers 1 and 2 with outlier columns, as trained models have: in every weight of the layer, one input
# column per quantization group scaled up OUTLIER times, so round-to-nearest at 4 bits spends its levels on
# the outlier and flattens the rest of each group.
SENSITIVE_LAYERS, OUTLIER = (1, 2), 100.0


@pytest.fixture(scope="module")
def sensitive(checkpoint, tmp_path_factory) -> Path:
    target = shutil.copytree(checkpoint, tmp_path_factory.mktemp("sensitive") / "source")
    prefixes = tuple(f"model.language_model.layers.{i}." for i in SENSITIVE_LAYERS)
    for file in weight_files(target):
        weights = dict(mx.load(str(file)))
        for key, value in weights.items():
            if key.startswith(prefixes) and key.endswith("proj.weight"):
                scale = np.ones(value.shape[-1], np.float32)
                scale[5::64] = OUTLIER
                weights[key] = (value * mx.array(scale)).astype(value.dtype)
        mx.save_safetensors(str(file), weights, metadata={"format": "pt"})
    return target


@pytest.fixture(scope="module")
def auto_and_uniform(sensitive, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("auto")
    options = {"check": True, "progress": False, "calibration": small_calibration}
    auto = convert(sensitive, root / "auto", q_recipe="auto", target_bits=4, **options)
    uniform = convert(sensitive, root / "q4", q_bits=4, **options)
    return auto, uniform


def test_auto_recipe_beats_uniform_4bit_at_the_same_average_bits(auto_and_uniform):
    auto, uniform = auto_and_uniform
    stored = {k: v for f in weight_files(auto) for k, v in mx.load(str(f)).items()}
    bits = {
        k.removesuffix(".weight"): v.shape[-1] * 32 // stored[k.replace(".weight", ".scales")].shape[-1] // 64
        for k, v in stored.items()
        if k.endswith(".weight") and k.replace(".weight", ".scales") in stored
    }
    sizes = {path: stored[f"{path}.scales"].size * 64 for path in bits}
    average = sum(bits[p] * sizes[p] for p in bits) / sum(sizes.values())
    assert average <= 4
    a, u = report_of(auto), report_of(uniform)
    figures = f"auto KL {a['kl']:.4f} top-1 {a['top1']:.3f}, "
    figures += f"uniform 4-bit KL {u['kl']:.4f} top-1 {u['top1']:.3f}"
    print(figures, {p: b for p, b in bits.items() if b != 4})
    assert a["kl"] < u["kl"] and a["top1"] >= u["top1"], figures
    # The chosen bits are in config.json under our module paths and mlx-lm's / mlx-vlm's.
    block = json.loads((auto / "config.json").read_text())["quantization"]
    for path, b in bits.items():
        if b != block["bits"]:
            theirs = path.replace("model.language_model.", "language_model.model.")
            assert block[path]["bits"] == block[theirs]["bits"] == b


MLX_VLM_LOGITS = """
import sys
import mlx.core as mx
import numpy as np
from mlx_vlm import load
model, _ = load(sys.argv[1])
model.set_dtype(mx.float32)
for name in sys.argv[2:]:
    inputs = dict(np.load(name + ".npz"))
    out = model(mx.array(inputs.pop("input_ids")), **{k: mx.array(v) for k, v in inputs.items()})
    np.save(name + ".npy", np.array(getattr(out, "logits", out)[0].astype(mx.float32)))
"""


@pytest.mark.slow
def test_auto_output_loads_in_mlx_vlm_with_our_logits(auto_and_uniform, tmp_path):
    """mlx-vlm reads the per-layer bits from config.json (it would load every layer at the default bits
    otherwise, and fail on the packed shapes): the same quantized weights, the same logits up to the
    order of float32 sums (scales widened to float32 there, kept and widened per product here)."""
    auto, _ = auto_and_uniform
    model, processor = load(auto, dtype="float32")
    samples = small_calibration(processor)[2:4]  # a text prompt, the photo
    names = [str(tmp_path / f"sample{n}") for n in range(len(samples))]
    for name, sample in zip(names, samples, strict=True):
        np.savez(name + ".npz", **{k: v for k, v in sample.items() if v is not None})
    run_python("-c", textwrap.dedent(MLX_VLM_LOGITS), str(auto), *names)
    for name, sample in zip(names, samples, strict=True):
        ours = np.array(model(**sample)[0])
        assert relative_max_diff(np.load(name + ".npy"), ours) < FLOAT32


def test_the_check_holds_one_decoder_layer_of_each_model_at_a_time(tmp_path):
    """The check command, on the same widths with 2 and with 10 decoder layers (a text prompt and the
    photo of the calibration set): it reads both checkpoints a tensor at a time in the order the forward
    pass reads them and runs the samples a layer at a time, each layer dropped once every sample has
    passed it, so its peak memory does not grow with the layers (it grew by both models' 8 extra layers,
    source and quantized, while each sample ran through whole models in turn)."""
    from mlx.utils import tree_flatten

    def layer_bytes(path: Path) -> int:
        model = load(path, dtype="float32")[0]
        return sum(v.nbytes for _, v in tree_flatten(model.layers[0].parameters()))

    def peak(layers: int) -> tuple[int, int]:
        overrides = {**SMALL_VOCABULARY, "text_config": {**SMALL_VOCABULARY["text_config"]}}
        overrides["text_config"]["num_hidden_layers"] = layers
        source = build_checkpoint(tmp_path / f"source{layers}", overrides)
        out = convert(source, tmp_path / f"q4-{layers}", q_bits=4, progress=False)
        mx.synchronize()
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        report = check(out, source, dtype="float32", calibration=two_samples)
        assert report.passed and len(report.layers) == layers and report.prompts == 2
        return mx.get_peak_memory() - base, layer_bytes(source) + layer_bytes(out)

    def two_samples(processor) -> list[dict]:
        return small_calibration(processor)[1:3]

    (few, _), (many, both_layers) = peak(2), peak(10)
    assert many - few < 8 * both_layers / 4, (few, many, both_layers)


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="counts the bytes read in /proc/self/io")
def test_the_check_inside_the_conversion_reads_no_weight_a_second_time(checkpoint, tmp_path):
    """convert.py's check runs on the tensors the conversion reads and computes as it writes them: with
    the check, the conversion reads no more bytes than without it, but for the processor's files (the
    calibration set's tokenizer). It read the source and the output again after writing (1.1 times the
    source's bytes more, here)."""

    def bytes_read(run) -> int:
        def read_so_far() -> int:  # every byte this process read through a system call, files included
            return int(Path("/proc/self/io").read_text().split("rchar:")[1].split()[0])

        before = read_so_far()
        run()
        return read_so_far() - before

    options = {"q_bits": 4, "progress": False}
    checking = {**options, "check": True, "calibration": small_calibration}
    convert(checkpoint, tmp_path / "first", **checking)  # the imports the conversion and the check make
    plain = bytes_read(lambda: convert(checkpoint, tmp_path / "plain", **options))
    processor = bytes_read(
        lambda: small_calibration(Processor.from_pretrained(checkpoint, read_config(checkpoint)))
    )
    checked = bytes_read(lambda: convert(checkpoint, tmp_path / "checked", **checking))
    weights = sum(f.stat().st_size for f in weight_files(checkpoint))
    figures = f"read {plain} B without the check, {checked} B with it, {processor} B of it the processor's"
    assert plain > weights, figures  # what is counted: the conversion's own reading of the source
    assert checked - plain - processor < weights / 4, f"{figures}; the weights: {weights} B"
