"""`--q-recipe auto --target-bits B`: each layer's bits (2, 3, 4, 6 or 8) chosen so that the average over
the quantized weights is at most B and the drift the calibration set measures is least.

mlx-lm's `dynamic_quant` is the model: rank layers by how much their quantization moves the output (its
sensitivity: a gradient of the KL divergence to the unquantized model, on text), then spend the bits
where they buy the most. What a vision-language model needs beyond it, and what this file adds:
- the calibration is the package's set of text, images and video (`calibration.py`), and the divergence is
  taken where the check takes it (`check.scored_positions`), image and video prompts included:
  a decoder layer's sensitivity is measured on the tokens that the vision features become;
- the vision tower's blocks and mergers are layers like the decoder's when it is quantized too;
- five bit widths rather than two, each measured directly: the mean KL divergence with that layer alone
  rounded at each width (no backward pass, so every part of the model, the vision tower included, is
  measured as it runs; the layers before a decoder layer are replayed from the reference pass). A
  prediction from fewer widths misleads: the divergence is not a fixed power of the rounding error
  (outlier columns flatten it, and it falls from 4 to 6 bits by 2.5x in one layer and 150x in another
  of the test model), and a width predicted nearly free draws bits from layers that need them;
- the widths are then a multiple-choice knapsack over layers (size = weights, value = predicted
  divergence), solved exactly (mlx-lm searches one threshold between two widths).
"""

from __future__ import annotations

import math
import re
import sys
from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn

from .backend import Backend
from .calibration import calibration_inputs
from .check import next_token_divergence, predicted_logits, sample_vision
from .errors import Qwen3VLError
from .loading import load

CANDIDATE_BITS = (2, 3, 4, 6, 8)
OUTPUT_LAYERS = ("model.language_model.embed_tokens", "lm_head")
# A decoder layer, a vision block or a DeepStack merger is one layer; anything else (the embedding, the
# lm_head, the vision merger) is a layer of its own.
_LAYER = re.compile(
    r"^(model\.language_model\.layers\.\d+|model\.visual\.blocks\.\d+|"
    r"model\.visual\.deepstack_merger_list\.\d+|model\.visual\.merger)\."
)


def layer_of(path: str) -> str:
    match = _LAYER.match(path)
    return match.group(1) if match else path


def rounded(weight: mx.array, bits: int, group_size: int) -> mx.array:
    packed, scales, biases = mx.quantize(weight, group_size=group_size, bits=bits)
    return mx.dequantize(packed, scales, biases, group_size=group_size, bits=bits).astype(weight.dtype)


def layer_modules(model: nn.Module, layer: str, fixed: frozenset[str] = frozenset()) -> list[nn.Module]:
    """The quantizable modules of a layer in a loaded model (whose q/k/v and gate/up are fused: rounding
    a fused matrix rounds each part as alone, since groups run along the input dimension; an MoE layer's
    experts are stacked, each expert's matrix rounded as alone), but those at `fixed` bits (the MoE
    routers): their bits are not chosen, so they are neither rounded nor counted."""
    return [
        m
        for path, m in model.named_modules()
        if hasattr(m, "to_quantized")
        and (path == layer or path.startswith(layer + "."))
        and path not in fixed
    ]


class _Replayed:
    """A decoder layer before the one measured: its weights are the source's, so its output is the one
    the reference pass recorded, returned instead of computed again."""

    def __init__(self, output: mx.array):
        self.output = output

    def __call__(self, *args, **kwargs) -> mx.array:
        return self.output


@contextmanager
def replaying(model, outputs: list[mx.array]):
    """The first len(outputs) decoder layers replaced by their recorded outputs while inside."""
    layers = model.layers
    originals = list(layers)
    layers[: len(outputs)] = [_Replayed(output) for output in outputs]
    try:
        yield
    finally:
        layers[:] = originals


def layers_before(layer: str) -> int:
    """How many decoder layers run before `layer` on unchanged inputs: those before it, for a decoder
    layer; none for the rest (the vision tower and the embedding change the first layer's input)."""
    match = re.fullmatch(r"model\.language_model\.layers\.(\d+)", layer)
    return int(match.group(1)) if match else 0


def measured_divergence(
    model, layer_weights, bits, group_size, calibration, vision, reference, layer
) -> float:
    """The mean KL divergence on the calibration set with this layer's weights rounded at `bits`.
    `reference`: per sample, the source's logits and its decoder layers' outputs."""
    for m, w in layer_weights:
        m.weight = rounded(w, bits, group_size)
    kl_sum, positions = 0.0, 0
    for sample, encoded, (ref, layer_outputs) in zip(calibration, vision, reference, strict=True):
        if layer.startswith("model.visual."):
            encoded = sample_vision(model, sample)
        with replaying(model, layer_outputs[: layers_before(layer)]):
            logits = predicted_logits(model, sample, encoded)
        kl, _ = next_token_divergence(ref, logits)
        kl_sum += kl.sum().item()
        positions += kl.size
    for m, w in layer_weights:
        m.weight = w
    return kl_sum / positions


class _Recorded:
    """A decoder layer that keeps its outputs (in call order) while the sensitivity measurement runs it."""

    def __init__(self, layer, outputs: list):
        self.layer, self.outputs = layer, outputs

    def __call__(self, *args, **kwargs):
        out = self.layer(*args, **kwargs)
        self.outputs.append(out)
        return out


@contextmanager
def recording_layers(model):
    """Each decoder layer's outputs, appended to the yielded lists (one per layer) while inside."""
    layers = model.layers
    outputs = [[] for _ in layers]
    originals = list(layers)
    layers[:] = [_Recorded(layer, out) for layer, out in zip(originals, outputs, strict=True)]
    try:
        yield outputs
    finally:
        layers[:] = originals


def decreasing(measured: dict[int, float]) -> dict[int, float]:
    """Measured divergences made non-increasing in the bits and non-negative: rounding at more bits
    stays closer to the weights, so a width measured worse than a narrower one (or below zero) differs by
    the measurement's noise, and the wider width is taken to be at least as good."""
    envelope, least = {}, math.inf
    for bits in sorted(measured):
        least = min(least, max(measured[bits], 0.0))
        envelope[bits] = least
    return envelope


def predicted_divergence(
    model, layers: list[str], group_size: int, calibration: list[dict], fixed: frozenset[str] = frozenset()
) -> dict:
    """{layer: {bits: mean KL divergence with that layer alone at those bits}}, measured at every
    candidate width (`decreasing`)."""
    vision = [sample_vision(model, sample) for sample in calibration]
    with recording_layers(model) as recorded:  # per layer, its output for each sample in turn
        logits = [predicted_logits(model, s, v) for s, v in zip(calibration, vision, strict=True)]
    reference = [(ref, [outputs[i] for outputs in recorded]) for i, ref in enumerate(logits)]
    mx.eval(reference)
    predicted = {}
    for layer in layers:
        layer_weights = [(m, m.weight) for m in layer_modules(model, layer, fixed)]
        arguments = (group_size, calibration, vision, reference, layer)
        measured = {
            bits: measured_divergence(model, layer_weights, bits, *arguments) for bits in CANDIDATE_BITS
        }
        predicted[layer] = decreasing(measured)
        mx.clear_cache()
    return predicted


def choose_bits(divergence: dict, sizes: dict, target: float, floors: dict[str, int]) -> dict[str, int]:
    """Bits per layer with sum(size * bits) <= target * sum(size) and the least summed predicted
    divergence, no layer below its floor: a multiple-choice knapsack, solved exactly by extending the
    Pareto frontier of (bits used, divergence) one layer at a time. The frontier stays small: layers of
    one kind have one size, so their partial sums repeat."""
    budget = target * sum(sizes.values())
    allowed = {layer: [b for b in CANDIDATE_BITS if b >= floors.get(layer, 0)] for layer in sizes}
    order = list(sizes)
    least_after = {}  # bits the layers after each one need at the least
    rest = 0
    for layer in reversed(order):
        least_after[layer] = rest
        rest += sizes[layer] * allowed[layer][0]
    if rest > budget:
        raise Qwen3VLError(f"--target-bits {target}: below what the least widths allowed take")
    frontier = [(0, 0.0, ())]  # (bits used, divergence, widths so far), used ascending, divergence descending
    for layer in order:
        extended = sorted(
            (used + sizes[layer] * bits, total + divergence[layer][bits], widths + (bits,))
            for used, total, widths in frontier
            for bits in allowed[layer]
            if used + sizes[layer] * bits + least_after[layer] <= budget
        )
        frontier = []
        for candidate in extended:
            if not frontier or candidate[1] < frontier[-1][1]:
                frontier.append(candidate)
    return dict(zip(order, frontier[-1][2], strict=True))


def auto_plan(
    source_dir,
    plan: dict[str, dict],
    target_bits: float,
    fixed: set[str],
    progress: bool = False,
    calibration=calibration_inputs,
) -> dict:
    """The plan (module path: quantization parameters) with each layer's bits chosen on the calibration
    set (`calibration`: processor -> model inputs). Modules at `fixed` bits (the MoE routers) keep theirs
    and stay out of the average."""

    layers: dict[str, list[str]] = {}
    for path in plan:
        if path not in fixed:
            layers.setdefault(layer_of(path), []).append(path)
    if not target_bits >= min(CANDIDATE_BITS):
        raise Qwen3VLError(f"--target-bits {target_bits}: must be at least {min(CANDIDATE_BITS)}")
    model, processor = load(source_dir, dtype=Backend.choose().dtype, backend="gpu")  # rounding swaps weights
    fixed = frozenset(fixed)
    sizes = {layer: sum(m.weight.size for m in layer_modules(model, layer, fixed)) for layer in layers}
    if progress:
        print(f"Measuring the sensitivity of {len(layers)} layers on the calibration set", file=sys.stderr)
    group_size = next(iter(plan.values()))["group_size"]
    divergence = predicted_divergence(model, list(layers), group_size, calibration(processor), fixed)
    del model
    # The embedding and lm_head (one matrix where tied) round every logit directly: the mean divergence
    # weighs the top-1 flips that follow lightly, so they never go below the widest width within the
    # target, as mlx-lm's mixed recipes keep them high.
    floor = max(b for b in CANDIDATE_BITS if b <= target_bits)
    floors = {layer: floor for layer in layers if layer in OUTPUT_LAYERS}
    choice = choose_bits(divergence, sizes, target_bits, floors)
    return {
        path: {**params, "bits": choice[layer_of(path)]} if path not in fixed else params
        for path, params in plan.items()
    }
