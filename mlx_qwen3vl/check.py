"""The quantization check: what a quantized checkpoint changed against the checkpoint it came from, in
numbers, and whether a tensor in it is broken. convert.py runs it as it writes; for a conversion made by
anyone (mlx-vlm, the MLX community, ours):

    python -m mlx_qwen3vl.check MODEL --against SOURCE

prints the table and exits with 1 when a bound fails, naming the tensor (its checkpoint path).

Two parts:
- the tensors, compared one by one without running the model: a tensor that must stay in float is
  quantized (`quantizable.py`), a quantized weight that dequantizes further from the source than rounding
  at its own bits and group size does (a corrupted layer, a wrong scale), a float tensor that differs
  beyond its dtype's rounding. These are the bounds: each names its tensor, and none depends on the model
  being trained or on how many positions the calibration has. A conversion that fails one is run no
  further: the figures of a broken model compare nothing.
- the outputs, on the calibration set (`calibration.py`): both models run the same inputs; reported are
  the relative error (|quantized - source| / |source|, over all positions) of the vision merger's and of
  each DeepStack merger's output, of each decoder layer's output (as the quantized model runs: the
  drift accumulated up to that layer), and, at a fixed subset of the positions whose next token the model
  predicts in use (not the vision pads; `scored_positions`), the KL divergence of the next-token
  distribution from the source's and the agreement of their top-1 tokens.
The source runs each input once; where the tensor comparison found the vision tower's tensors equal to the
source's, its encoded media serve the quantized model too, which then runs its decoder alone. The check is
fed the tensors one at a time in the order the forward pass reads them (`Check`, `forward_order`): each is
compared as it arrives, and both models, built lazily from the same arrays, run each step of the
calibration run (the vision tower, a decoder layer) once its tensors are in, then drop them
(`compare_outputs`). One decoder layer of each model is in memory at a time; inside convert.py, which
writes its tensors in that order, the check reads nothing (it runs on what the conversion reads and
computes), and the command reads each checkpoint once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.utils import infer_quant_config

from .calibration import calibration_inputs
from .loading import model_directory, model_from_weights, model_task, read_config, read_weights
from .model import Model, rename_mlx_vlm_key
from .processor import Processor
from .quantizable import refusal, router_paths

REPORT_FILE = "quantization_report.json"
# A quantized weight may dequantize this much further from its source than round-to-nearest at its bits
# and group size does, relative to the rounding's own error: room for converters that round otherwise
# (GPTQ moves weights to lower the layer's output error); a corrupted tensor or a wrong scale lands far
# beyond it (tests/test_check.py).
ROUNDING_FACTOR = 3.0
# A float tensor may differ from its source by its dtype's rounding: bfloat16 keeps 8 bits of mantissa
# (relative error at most 2^-9 per value); float16 and float32 keep more.
FLOAT_TOLERANCE = 2.0**-8


@dataclass
class Failure:
    tensor: str  # checkpoint path
    reason: str
    protected: bool = False  # a tensor that must stay in float, stored quantized: listed first


@dataclass
class Report:
    model: str
    source: str
    prompts: int = 0
    positions: int = 0
    kl: float = 0.0  # mean over positions, nats
    top1: float = 0.0  # fraction of positions
    vision: dict[str, float] = field(default_factory=dict)  # merger / deepstack_merger_list.j: relative error
    layers: list[float] = field(default_factory=list)  # decoder layer outputs: relative error
    tensors: dict[str, dict] = field(default_factory=dict)  # quantized weights: bits, error, rounding error
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0  # the check's own time
    tensor_seconds: float = 0.0  # the part of it comparing tensors
    conversion_seconds: float | None = None  # the conversion's before it, when convert.py ran it

    @property
    def passed(self) -> bool:
        return not self.failures

    def table(self) -> str:
        bits = sorted({t["bits"] for t in self.tensors.values()})
        lines = [
            f"Quantization check of {self.model} against {self.source}",
            f"  {len(self.tensors)} quantized tensors at {'/'.join(map(str, bits)) or '-'} bits; "
            f"calibration: {self.prompts} prompts, {self.positions} positions",
        ]
        if not self.positions:
            lines.append("  outputs not compared: a tensor is broken")
        lines += [f"  {name:<28} relative error {error:.4f}" for name, error in self.vision.items()]
        lines += [f"  {f'decoder layer {i}':<28} relative error {e:.4f}" for i, e in enumerate(self.layers)]
        if self.positions:
            lines.append(f"  next-token KL {self.kl:.5f} nats, top-1 agreement {self.top1:.3f}")
        if self.passed:
            lines.append("  passed")
        lines += [f"  FAILED {f.tensor}: {f.reason}" for f in self.failures]
        return "\n".join(lines)

    def write(self, directory: Path) -> None:
        report = {**asdict(self), "passed": self.passed}
        (directory / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")


def relative_error(a: mx.array, b: mx.array) -> float:
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return (mx.linalg.norm(a - b) / mx.maximum(mx.linalg.norm(b), 1e-30)).item()


# The quantized errors are taken over blocks of a weight's rows of at most this many float32 bytes: the
# float32 copies, the rounding and the differences of a whole 151,936 x 2,560 embedding would take about 10
# GB at once.
ERROR_BLOCK_BYTES = 64 * 2**20


def quantized_errors(
    ours: dict[str, mx.array], path: str, weight: mx.array, bits: int, group_size: int
) -> tuple[float, float]:
    """The relative error of the stored quantized weight at `path`, and that of round-to-nearest at its
    bits and group size from the source `weight` (cast first to the scales' dtype, as converters do),
    over blocks of rows (ERROR_BLOCK_BYTES). Where the stored tensors are round-to-nearest's bit for bit
    (a converter that rounds so, ours and mlx-vlm's), the two errors are one: a single dequantization
    serves both."""
    stored = [ours[f"{path}.weight"], ours[f"{path}.scales"], ours.get(f"{path}.biases")]
    columns = weight.shape[-1]
    weight = weight.reshape(-1, columns)  # groups run along the last axis: an MoE stack's experts as rows
    stored = [None if t is None else t.reshape(weight.shape[0], -1) for t in stored]
    scales_dtype = stored[1].dtype

    def squared_distance(quantized, source) -> mx.array:
        dequantized = mx.dequantize(*quantized, group_size=group_size, bits=bits).astype(mx.float32)
        return mx.sum(mx.square(dequantized - source))

    sums = np.zeros(3)  # |stored - source|^2, |nearest - source|^2, |source|^2
    step = max(1, ERROR_BLOCK_BYTES // (4 * columns))
    for start in range(0, weight.shape[0], step):
        rows = slice(start, start + step)
        block = [None if t is None else t[rows] for t in stored]
        nearest = mx.quantize(weight[rows].astype(scales_dtype), group_size=group_size, bits=bits)
        source = weight[rows].astype(mx.float32)
        same = mx.array_equal(block[0], nearest[0]) & mx.array_equal(block[1], nearest[1])
        if block[2] is not None:
            same = same & mx.array_equal(block[2], nearest[2])
        rounding, norm = squared_distance(nearest, source), mx.sum(mx.square(source))
        mx.eval(same, rounding, norm)
        distance = rounding if same.item() else squared_distance(block, source)
        sums += [distance.item(), rounding.item(), norm.item()]
    norm = max(sums[2], 1e-30)
    return float(np.sqrt(sums[0] / norm)), float(np.sqrt(sums[1] / norm))


class TensorComparison:
    """The tensor bounds (module docstring), a tensor at a time: `compare(key)` for each key of the
    quantized model's tensors `ours` (sanitized names), against `source` (the same names, unquantized).
    Both dicts may hold lazy arrays: each tensor is dropped from them once compared, so that what it read
    can be freed. In convert.py (through `Check`) each tensor is compared as it is written, while its
    source tensor is in memory for the conversion: nothing is read again for it.
    `changed`: the keys of the tensors that differ from the source's at all. `seconds`: the time spent."""

    def __init__(self, model: Model, ours: dict[str, mx.array], source: dict[str, mx.array], report: Report):
        self.modules = dict(model.named_modules())
        self.routers = router_paths(model)
        self.ours, self.source, self.report = dict(ours), source, report
        self.changed: set[str] = set()
        self.seconds = 0.0

    def compare(self, key: str) -> None:
        started = time.perf_counter()
        self._compare(key)
        self.seconds += time.perf_counter() - started

    def _compare(self, key: str) -> None:
        ours, source, report = self.ours, self.source, self.report
        path, _, name = key.rpartition(".")
        quantized = f"{path}.scales" in ours and path in self.modules
        if quantized and name != "weight":
            return  # compared with its weight, which drops it
        if key not in source:
            ours.pop(key, None)
            return  # a tensor the source lacks: load() reports it
        theirs = source.pop(key)
        if quantized:
            params = infer_quant_config(path, self.modules[path], ours)
            bits, group_size = params["bits"], params["group_size"]
            error, expected = quantized_errors(ours, path, theirs, bits, group_size)
            for part in ("weight", "scales", "biases"):
                ours.pop(f"{path}.{part}", None)
            self.changed.add(key)
            report.tensors[key] = {"bits": bits, "group_size": group_size, "error": error}
            report.tensors[key]["rounding_error"] = expected
            reason = refusal(path, bits, self.routers)
            if reason:
                report.failures.append(Failure(key, f"stored quantized at {bits} bits, but {reason}", True))
            elif error > ROUNDING_FACTOR * expected:
                report.failures.append(
                    Failure(
                        key,
                        f"dequantizes {error:.4f} away from the source (relative), {error / expected:.0f}x "
                        f"what {bits}-bit rounding gives ({expected:.4f}): corrupted or wrongly scaled",
                    )
                )
            return
        value = ours.pop(key)
        if mx.array_equal(value, theirs).item():
            return  # the same values (float or integer): nothing to measure
        self.changed.add(key)
        if mx.issubdtype(value.dtype, mx.floating) and key not in {f.tensor for f in report.failures}:
            error = relative_error(value, theirs)
            if error > FLOAT_TOLERANCE:
                report.failures.append(
                    Failure(key, f"differs from the source by {error:.4f} (relative): more than rounding")
                )

    def finish(self) -> None:
        """The failures in the report's order: protected tensors stored quantized first, then by path."""
        self.report.failures.sort(key=lambda f: (not f.protected, f.tensor))


MEDIA = (("image", "pixel_values", "image_grid_thw"), ("video", "pixel_values_videos", "video_grid_thw"))


def predicted_positions(model: Model, input_ids: np.ndarray) -> np.ndarray:
    """Positions whose next token the model predicts in use: all but the vision pads."""
    pads = (model.config.image_token_id, model.config.video_token_id)
    return np.flatnonzero(~np.isin(np.asarray(input_ids).reshape(-1), pads))


# The next-token figures are taken at a fixed subset of the predicted positions: the last LAST_POSITIONS of
# each prompt (where the model has read all of it, its images included, and where an answer starts) and
# every STRIDE-th before them. Every position still runs through the decoder, so each layer's relative
# error is over all of them; what the subset saves is the vocabulary projection and softmax at the others,
# which at a small model's widths cost as much as its decoder layers.
LAST_POSITIONS, STRIDE = 8, 2
# Positions projected onto the vocabulary at once, those of all the samples together: each projection
# reads the whole vocabulary matrix, so the package's set (82 scored positions) takes one pass per model,
# with logits of at most this many rows per model in memory (77 MB at 151,936 tokens in float32).
LOGIT_ROWS = 128


def scored_positions(model: Model, input_ids: np.ndarray) -> np.ndarray:
    """The predicted positions at which the next-token figures are taken (LAST_POSITIONS, STRIDE)."""
    predicted = predicted_positions(model, input_ids)
    before, last = predicted[:-LAST_POSITIONS], predicted[-LAST_POSITIONS:]
    return np.concatenate([before[::STRIDE], last])


def sample_vision(model: Model, sample: dict) -> list:
    """A calibration sample's images, then its videos, through the vision tower."""
    return [
        model.encode_vision(sample[pixels], sample[grid], None, kind)
        for kind, pixels, grid in MEDIA
        if sample.get(pixels) is not None
    ]


def scored_hidden(model: Model, sample: dict, vision: list) -> mx.array:
    """The decoder's final hidden states at a sample's scored positions, its media already encoded."""
    h = model.hidden_states(model.prepare(sample["input_ids"], vision))
    return h[0, mx.array(scored_positions(model, sample["input_ids"]))]


def predicted_logits(model: Model, sample: dict, vision: list) -> mx.array:
    """The logits (float32) at a sample's scored positions, its media already encoded."""
    return model.head(scored_hidden(model, sample, vision)).astype(mx.float32)


def vision_levels(vision: list) -> list[mx.array]:
    """The vision levels of a sample's encoded media: the merger's output, then each DeepStack merger's
    (the images' rows, then the videos')."""
    per_kind = ([v.features, *v.deepstack] for v in vision)
    return [mx.concatenate(level) for level in zip(*per_kind, strict=True)]


def next_token_divergence(source_logits: mx.array, logits: mx.array) -> tuple[mx.array, mx.array]:
    """Per position: KL(source || quantized) of the next-token distributions, and top-1 agreement."""
    log_p = source_logits - mx.logsumexp(source_logits, axis=-1, keepdims=True)
    log_q = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    kl = (mx.exp(log_p) * (log_p - log_q)).sum(-1)
    return kl, source_logits.argmax(-1) == logits.argmax(-1)


def summed_divergence(model: Model, source: Model, hidden: mx.array, source_hidden: mx.array):
    """The KL divergence summed over positions and the count of top-1 agreements, from the two models'
    final hidden states, projected LOGIT_ROWS positions at a time."""
    kl_sum, agree = 0.0, 0
    for start in range(0, hidden.shape[0], LOGIT_ROWS):
        rows = slice(start, start + LOGIT_ROWS)
        kl, same = next_token_divergence(
            source.head(source_hidden[rows]).astype(mx.float32), model.head(hidden[rows]).astype(mx.float32)
        )
        kl_sum += kl.sum().item()
        agree += same.sum().item()
    return kl_sum, agree


# The checkpoint paths of the model's parts, in the order a forward pass reads them (`forward_order`).
VISION, EMBEDDING = "model.visual.", "model.language_model.embed_tokens."
LAYERS = "model.language_model.layers."


def forward_order(keys) -> list[str]:
    """Checkpoint paths in the order the forward pass reads them: the vision tower's, the embedding's, each
    decoder layer's by its number, then the rest (the final norm, lm_head). convert.py writes its tensors
    so, and the check reads a checkpoint so: each step of the check's run then starts as soon as the
    tensors it reads are in, and they are dropped after it."""

    def place(key: str) -> tuple:
        if key.startswith(VISION):
            return (0, 0, key)
        if key.startswith(EMBEDDING):
            return (1, 0, key)
        if key.startswith(LAYERS):
            return (2, int(key[len(LAYERS) :].partition(".")[0]), key)
        return (3, 0, key)

    return sorted(keys, key=place)


def compare_outputs(
    model: Model, source: Model, samples: Callable[[], list[dict]], report: Report, changed: set[str]
) -> Iterator[str]:
    """The output figures of the report, over the calibration samples (`samples()`, made when the vision
    tower's tensors are in, so not for a conversion whose first tensors fail): a generator that yields, before
    each step, the path prefix of the tensors that step reads (`forward_order`; "" for all), and runs the
    step when resumed. changed: the paths of the tensors that differ from the source's; where none of the
    vision tower's does, its outputs are the source's too: the source's encoded media serve both models
    (their relative errors are then 0, as computed). The figures are written into the report at the end
    only; the models are used up.

    The models run layer by layer: every sample through a decoder layer of each model, then that layer is
    dropped from both. Only one decoder layer of each is then in memory at a time (besides the embeddings
    and the samples' hidden states)."""
    squares: dict[str, list[float]] = {}  # name: [sum |difference|^2, sum |source|^2]

    def add(name: str, ours: mx.array, theirs: mx.array) -> None:
        ours, theirs = ours.astype(mx.float32), theirs.astype(mx.float32)
        sums = squares.setdefault(name, [0.0, 0.0])
        sums[0] += mx.sum(mx.square(ours - theirs)).item()
        sums[1] += mx.sum(mx.square(theirs)).item()

    yield VISION
    inputs = samples()
    same_vision = not any(key.startswith(VISION) for key in changed)
    encoded = []
    for sample in inputs:
        source_vision = sample_vision(source, sample)
        vision = source_vision if same_vision else sample_vision(model, sample)
        mx.eval([(v.features, v.deepstack) for v in source_vision + vision])
        for j, (ours, theirs) in enumerate(
            zip(vision_levels(vision), vision_levels(source_vision), strict=True)
        ):
            add("merger" if j == 0 else f"deepstack_merger_list.{j - 1}", ours, theirs)
        encoded.append((vision, source_vision))
    for m in (model, source):
        m.model.visual = nn.Module()  # its outputs are in hand
    runs = [
        (
            model.layer_by_layer(model.prepare(sample["input_ids"], vision)),
            source.layer_by_layer(source.prepare(sample["input_ids"], source_vision)),
        )
        for sample, (vision, source_vision) in zip(inputs, encoded, strict=True)
    ]
    del encoded
    for j in range(len(model.layers)):
        yield f"{LAYERS}{j}."
        outputs = [(next(ours), next(theirs)) for ours, theirs in runs]
        mx.eval(outputs)
        for ours, theirs in outputs:
            add(f"layer {j}", ours, theirs)
        del outputs
        for m in (model, source):
            m.layers[j] = nn.Module()
        mx.clear_cache()
    yield ""
    hidden, source_hidden = [], []
    for sample, (ours, theirs) in zip(inputs, runs, strict=True):
        scored = mx.array(scored_positions(model, sample["input_ids"]))
        hidden.append(next(ours)[0, scored])
        source_hidden.append(next(theirs)[0, scored])
    hidden, source_hidden = mx.concatenate(hidden), mx.concatenate(source_hidden)
    kl_sum, agree = summed_divergence(model, source, hidden, source_hidden)
    positions = hidden.shape[0]
    ratio = {name: float(np.sqrt(d / max(s, 1e-30))) for name, (d, s) in squares.items()}
    report.vision = {name: e for name, e in ratio.items() if not name.startswith("layer ")}
    report.layers = [ratio[f"layer {j}"] for j in range(len(model.layers))]
    report.prompts, report.positions = len(inputs), positions
    report.kl, report.top1 = kl_sum / positions, agree / positions


class Check:
    """The whole check, fed a checkpoint's tensors one by one as they are read, in `forward_order`:
    `arrived(key)` compares the tensor with its source (`TensorComparison`) and runs each step of the
    outputs' run (`compare_outputs`) once all the tensors it reads are in; `finish()` after the last.

    ours, source: the tensors of the quantized model and of its source (sanitized names; lazy arrays, or
    those convert.py is evaluating to write). The two models of the run are built from the same arrays,
    lazily: a tensor the conversion has read or computed is in memory when the run reaches it, and is
    dropped with its layer; the check reads no weight a second time. `model`: the quantized model's
    module tree as configured (names and shapes). After the first failed bound nothing more is run: the
    figures of a broken model compare nothing. `seconds`: the time spent in it."""

    def __init__(
        self,
        model: Model,
        ours: dict[str, mx.array],
        source: dict[str, mx.array],
        report: Report,
        samples: Callable[[], list[dict]],
        dtype=None,
    ):
        self.tensors = TensorComparison(model, ours, source, report)
        self.report = report
        self.order = forward_order(ours)
        self.waiting, self.done = set(self.order), 0  # done: the leading keys of `order` all in
        # Sanitized names go through Model.sanitize again unchanged: it renames only other layouts'.
        quantized = model_from_weights(model.config, ours, dtype, lazy=True, task=model.task)
        original = model_from_weights(model.config, source, dtype, lazy=True)
        self.steps = compare_outputs(quantized, original, samples, report, self.tensors.changed)
        self.needed = self._last(next(self.steps))
        self.seconds = 0.0

    def _last(self, prefix: str) -> int:
        """The place in `order` of the last tensor a step reads: those before it are read first."""
        return max((i for i, key in enumerate(self.order) if key.startswith(prefix)), default=-1)

    def arrived(self, key: str) -> None:
        started = time.perf_counter()
        self.tensors.compare(key)
        self.waiting.discard(key)
        while self.done < len(self.order) and self.order[self.done] not in self.waiting:
            self.done += 1
        while self.steps is not None and self.done > self.needed:
            if self.report.failures:
                self.steps = None  # the models go with the generator
                break
            try:
                self.needed = self._last(next(self.steps))
            except StopIteration:
                self.steps = None
        self.seconds += time.perf_counter() - started

    def finish(self) -> None:
        """After every tensor has arrived: the last steps, and the failures in the report's order."""
        for key in list(self.waiting):
            self.arrived(key)  # a tensor the caller did not give: compared now
        self.tensors.finish()
        self.report.tensor_seconds = self.tensors.seconds
        self.report.seconds = self.seconds


def check(model_path, source_path, dtype=None, calibration=calibration_inputs) -> Report:
    """Compare the model at `model_path` with the one at `source_path` (directories or hub ids): the
    report, with its failures. Each checkpoint is read once, lazily, a tensor at a time in the order the
    forward pass reads them. dtype: of the computation (load()'s default where None). calibration:
    processor -> the model inputs to compare on (the package's set by default)."""
    start = time.perf_counter()
    model_dir, source_dir = model_directory(model_path), model_directory(source_path)
    report = Report(str(model_path), str(source_path))
    config = read_config(model_dir)
    task = "embed" if model_task(model_dir, str(model_path)) == "embed" else "generate"
    model = Model(config, task)  # names and shapes only: its parameters stay lazy
    stored = read_weights(model_dir)
    ours, source = model.sanitize(dict(stored)), model.sanitize(read_weights(source_dir))
    # The loader dequantizes a quantized position table (older mlx-vlm conversions have one), so it is
    # looked for among the stored names.
    modules, routers = dict(model.named_modules()), router_paths(model)
    for key in sorted(stored):
        path = rename_mlx_vlm_key(key).removesuffix(".scales")
        if key.endswith(".scales") and f"{path}.scales" not in ours and path in modules:
            reason = refusal(path, 0, routers)
            report.failures.append(Failure(f"{path}.weight", f"stored quantized, but {reason}", True))
    del stored
    run = Check(
        model, ours, source, report, lambda: calibration(Processor.from_pretrained(model_dir, config)), dtype
    )
    for key in run.order:
        run.arrived(key)
        mx.clear_cache()
    run.finish()
    report.seconds = time.perf_counter() - start
    return report


def main(argv: list[str] | None = None) -> None:
    from .cli import ArgumentParser, fail, quiet_libraries
    from .errors import Qwen3VLError

    parser = ArgumentParser(
        prog="python -m mlx_qwen3vl.check",
        description="Compare a quantized Qwen3-VL checkpoint with the checkpoint it was made from; exit 1 "
        "when a tensor is broken, naming it.",
    )
    parser.add_argument("model", help="the quantized model: a directory or a Hugging Face repo id")
    parser.add_argument("--against", required=True, help="the source model it was converted from")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), help="compute dtype")
    parser.add_argument("--write", action="store_true", help=f"also write {REPORT_FILE} into the model")
    args = parser.parse_args(argv)
    quiet_libraries()
    try:
        report = check(args.model, args.against, args.dtype)
        if args.write:
            report.write(model_directory(args.model))
    except (Qwen3VLError, OSError) as e:
        fail(str(e))
    print(report.table())
    if not report.passed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
