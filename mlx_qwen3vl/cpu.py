"""What MLX's CPU backend needs done differently, swapped into a loaded model by `specialize` when the
backend is the CPU (`backend.py`). The model files (language.py, vision.py) are the plain model that MLX's
GPU backends run; nothing here is used there. Each replacement computes the same function: the tests
compare both paths with the reference.

- Quantized decoder layers (`CpuQuantizedLinear`, the tied vocabulary projection
  `CpuQuantizedEmbedding.as_linear`, the MoE experts `CpuQuantizedSwitchLinear`) split their output rows
  over the cores, each part's product on a CPU stream of its own (`output_rows_on_cores`): MLX's CPU
  quantized kernel is scalar code on the one thread of its stream, so a decode step, which is mostly these
  products, runs on one core otherwise. The parts compute exactly the kernel's numbers.
  Many-row float32 inputs to the linear layers go through BLAS instead: the kernel runs at the same rate
  for any number of rows, while a fast BLAS multiplies a dequantized weight many times faster once there
  are a few rows (a prompt, a chat turn); one row (a decode step) keeps the kernel, which reads the packed
  4-bit weight instead of a widened one. With the reference BLAS bundled in MLX's Linux wheel the dense
  product is no faster, so there every call takes the kernel. `bench/matmul.py` measures each path.
- The vision tower's matrices keep a bfloat16 checkpoint's dtype under float32 compute and are widened
  per call (`WideningLinear`): exact, half the tower's memory.
- Exponentials in base 2. On x86, MLX's `mx.exp` (and tanh, sigmoid, erf) is a scalar polynomial while
  `mx.power(2, x)` is vectorised, at the same accuracy (both ~2e-6 relative to float64): the GELUs, the
  SiLU gate and the softmax of the float32 attention fold log2(e) into their argument, as flash
  attention kernels do.
- Attention with float32 accumulation for bfloat16 activations (`float32_attention`): MLX's CPU fallback
  computes scores and softmax in the activation dtype, which puts ~45% of bfloat16 attention outputs 1
  ulp or more away from PyTorch's kernel; in float32 the fallback is exact and stays. The vision tower's
  long segments are attended with numpy in float32 (`numpy_attention`: its exponentials use the vector
  units) in tiles of scores that stay in cache, one per core at a time, each with its products on its
  own core through the system OpenBLAS (`_blas.sgemm`); so is the decoder's attention of a float32
  prompt chunk, causal, with grouped-query heads. Other prompt chunks against a
  long context (bfloat16, a batch's padding mask) go over key blocks with a running softmax
  (`key_blocked_attention`). Either way the scores held are a block's, not the chunk's against the
  whole context.
- The vision MLPs (the blocks' and the mergers') for many float32 rows with numpy and BLAS, a block of
  rows per core, the GELU with numpy's vectorised exp (`numpy_mlp`).
- The decoder's rope through cos/sin tables for every position (`TableRope`): the CPU builds MLX's fused
  rope as ~30 nodes with their temporaries per call, the tables once per forward.
- Unquantized MoE experts with bfloat16 weights or activations are multiplied in float32
  (`Float32SwitchLinear`): MLX's CPU `gather_mm` supports float32 only.
- Work split into blocks to bound memory is evaluated one block at a time (`concatenate_evaluated`).
  MLX allocates an operation's output when it dispatches it, ahead of its execution, so blocks built
  lazily in one graph would all be resident at once.

No library offers these; written by hand for this backend only.
"""

from __future__ import annotations

import math
import os
import sys
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import cache, partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from . import _blas, vision
from .language import MLP, Attention, Rope, TextModel, apply_rope

LOG2_E = math.log2(math.e)

# The cores this process may run on: numpy's workers and the quantized products' streams, one per core.
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

# MLX's CPU float32 matmuls go through a fast BLAS: the system OpenBLAS this package bound on import
# (_blas.py), or Accelerate on macOS.
FAST_BLAS = _blas.loaded is not None or sys.platform == "darwin"
# Rows of input (tokens) from which the BLAS path pays: at the 4B widths both paths take the same time
# for 2 rows, and BLAS wins from 3 (bench/matmul.py).
BLAS_MIN_ROWS = 3
# Bytes of dequantized float32 weight per block: the smallest blocks as fast as the whole matrix at once
# at the 4B widths (smaller ones pay per-block overhead), with a fraction of its memory.
BLOCK_BYTES = 4 * 2**20
# The vision tower's attention scores of one segment are computed in query blocks when they would exceed
# this many bytes (two buffers of this size live at once: the scores and their exponentials), so a large
# photo costs O(N * block) memory instead of O(N^2); at the 4B widths such blocks are also faster than
# MLX's fallback in one call, whose scores would not fit in cache.
ATTENTION_SCORE_BYTES = 32 * 2**20
# The decoder's attention scores of one call (heads x queries x keys, float32) beyond which the keys are
# taken in blocks (`key_blocked_attention`): MLX's CPU fallback materialises them whole, which for a prompt
# chunk against a long context is a multiple of the chunk's share of the KV cache. Blocks of this size
# are also faster than the whole (less memory traffic).
DECODER_SCORE_BYTES = 32 * 2**20
# The scores one worker of `numpy_attention` holds at a time: query rows x keys, 3 MiB of float32, in the
# cache from the product that makes them to the one that reads them, and rows enough for BLAS to run at
# its full rate (tiles from about 1.5 to 5 MiB do equally well; a segment's whole rows, which leave the
# cache, are slower: bench/results' vision-large-image-tiles).
NUMPY_TILE = (512, 1536)
# Rows per block of the vision MLPs' numpy path (`numpy_mlp`): enough for BLAS to run at its full
# rate (fewer cost more at the 4B widths); what a core holds beyond the output is its block's intermediate
# activations and as much scratch (8 MiB each at the 4B widths), not the whole input's intermediate.
# Inputs of fewer than two blocks keep MLX.
NUMPY_MLP_ROWS = 512
# From about this many patches per segment (or prompt tokens per chunk), numpy's vectorised exponentials
# outweigh the Python calls it makes per head (`numpy_attention`); shorter segments (small images) and
# chunks (a chat turn's few tokens, a decode step) stay in MLX.
NUMPY_ATTENTION_LENGTH = 192


def specialize(model: nn.Module, dtype: mx.Dtype) -> None:
    """Swap this module's versions into a model built for the GPU backends. Idempotent; call it again
    after quantizing a loaded model in memory."""
    for name, module in model.named_modules():
        in_vision = name.startswith("model.visual.")
        if type(module) is nn.QuantizedLinear and not in_vision:
            become(module, CpuQuantizedLinear)
        elif type(module) is nn.QuantizedEmbedding:
            become(module, CpuQuantizedEmbedding)
        elif type(module) is QuantizedSwitchLinear:
            become(module, CpuQuantizedSwitchLinear)
        elif type(module) is nn.Linear and in_vision and ".patch_embed." not in f".{name}.":
            become(module, WideningLinear)  # the patch embedding sets the tower's compute dtype: kept
        elif type(module) is SwitchLinear:
            become(module, Float32SwitchLinear)
        elif isinstance(module, MLP):
            module.activation = silu_gate
        elif isinstance(module, Attention):
            module.attend = attention
        elif isinstance(module, (vision.VisionMLP, vision.PatchMerger)):
            module.act = GELUS.get(module.act, module.act)
            if type(module) in BLOCKWISE:
                become(module, BLOCKWISE[type(module)])
        elif isinstance(module, vision.VisionAttention):
            module.attend = segment_attention_in_blocks
        elif isinstance(module, TextModel) and type(module.rope) is Rope:
            become(module.rope, TableRope)


def become(module: nn.Module, cls: type) -> None:
    """Give a loaded module this subclass's behaviour in place. The subclasses here add methods only, no
    state, so the module's parameters and settings stay as they are."""
    assert cls.__base__ is type(module), (cls, type(module))
    module.__class__ = cls


# ---- exponentials in base 2 -----------------------------------------------------------------------


def times_sigmoid(x: mx.array, z_log2e: mx.array) -> mx.array:
    """x * sigmoid(z), given z * log2(e) (callers fold the constant into their own factors)."""
    return x / (1 + mx.power(2.0, -z_log2e))


@partial(mx.compile, shapeless=True)
def silu_gate(gate: mx.array, up: mx.array) -> mx.array:
    """`language.silu_gate` with the sigmoid as a power of 2: faster on the CPU, as accurate."""
    g = gate.astype(mx.float32)
    return times_sigmoid(g, LOG2_E * g).astype(gate.dtype) * up


# gelu_tanh(x) = x * sigmoid(2u), u = sqrt(2 / pi) * (x + 0.044715 x^3): the tanh approximation with the
# sigmoid as a power of 2: faster on the CPU than `vision.gelu_tanh`'s tanh, as accurate against float64
# (max abs error 5e-7 vs 4e-7 on N(0, 4)).
_GELU_TANH_FACTOR = 2 * math.sqrt(2 / math.pi) * LOG2_E


@partial(mx.compile, shapeless=True)
def gelu_tanh(x: mx.array) -> mx.array:
    y = x.astype(mx.float32)
    return times_sigmoid(y, _GELU_TANH_FACTOR * (y + 0.044715 * (y * y * y))).astype(x.dtype)


# gelu_erf(x) = x * Phi(x) = x * erfc(-x / sqrt(2)) / 2, erfc(z) = t exp(-z^2 + P(t)) for z >= 0 with
# t = 1 / (1 + z / 2) (Numerical Recipes' Chebyshev fit `erfcc`, relative error below 1.2e-7 for every z)
# and erfc(-z) = 2 - erfc(z): one vectorised power of 2 where MLX's CPU `mx.erf` is a scalar loop,
# slower than the whole expression.
_ERFC_POLYNOMIAL = (
    -1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806,
    0.27886807, -1.13520398, 1.48851587, -0.82215223, 0.17087277,
)  # fmt: skip


@partial(mx.compile, shapeless=True)
def gelu_erf(x: mx.array) -> mx.array:
    y = x.astype(mx.float32)
    z = mx.abs(y) * (1 / math.sqrt(2))
    t = 1 / (1 + 0.5 * z)
    poly = _ERFC_POLYNOMIAL[-1]
    for c in reversed(_ERFC_POLYNOMIAL[:-1]):
        poly = c + t * poly
    half_erfc = (0.5 * t) * mx.power(2.0, LOG2_E * (poly - z * z))  # erfc(|y| / sqrt(2)) / 2
    return (y * mx.where(y < 0, half_erfc, 1 - half_erfc)).astype(x.dtype)


# The model's activations -> this module's versions (`specialize`).
GELUS = {vision.gelu_tanh: gelu_tanh, vision.gelu_erf: gelu_erf}


# ---- layers ---------------------------------------------------------------------------------------


def concatenate_evaluated(blocks: Iterable[mx.array], axis: int) -> mx.array:
    """Concatenate lazily produced blocks, evaluating each before the next is built."""
    parts = []
    for block in blocks:
        mx.eval(block)
        parts.append(block)
    return mx.concatenate(parts, axis=axis) if len(parts) > 1 else parts[0]


class CpuQuantizedLinear(nn.QuantizedLinear):
    """MLX's quantized linear layer with its products on every core (`output_rows_on_cores`), and float32
    inputs of many rows multiplied through a fast BLAS, the weight dequantized in blocks of output rows of
    BLOCK_BYTES (module docstring). The BLAS result differs from the kernel's only in summation order."""

    def __call__(self, x: mx.array) -> mx.array:
        # Cheapest test first: a decode step (one row) takes the kernel on every call.
        rows = x.size // x.shape[-1]
        if rows < BLAS_MIN_ROWS or x.dtype != mx.float32 or not FAST_BLAS:
            y = quantized_product_on_cores(self, x)
        else:
            step = max(1, BLOCK_BYTES // (4 * x.shape[-1]))
            starts = range(0, self["weight"].shape[0], step)
            y = concatenate_evaluated((x @ self._dequantized(s, s + step).T for s in starts), axis=-1)
        return y + self["bias"] if "bias" in self else y

    def _dequantized(self, start: int, end: int) -> mx.array:
        """Output rows [start, end) of the weight in float32."""
        biases = self.get("biases")
        return mx.dequantize(
            self["weight"][start:end],
            self["scales"][start:end].astype(mx.float32),
            None if biases is None else biases[start:end].astype(mx.float32),
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
        )


class CpuQuantizedEmbedding(nn.QuantizedEmbedding):
    """A quantized embedding whose use as the vocabulary projection (tied embeddings) runs on every core:
    with the vocabulary's 151,936 rows it is the largest product of a decode step."""

    def as_linear(self, x: mx.array) -> mx.array:
        return quantized_product_on_cores(self, x)


class CpuQuantizedSwitchLinear(QuantizedSwitchLinear):
    """mlx-lm's quantized MoE expert projection with each chosen expert's output rows split over the
    cores (`output_rows_on_cores`): the same gathered kernel on parts of every expert's weight."""

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        biases = self.get("biases")

        def product(rows: slice) -> mx.array:
            return mx.gather_qmm(
                x,
                self["weight"][:, rows],
                self["scales"][:, rows],
                None if biases is None else biases[:, rows],
                rhs_indices=indices,
                transpose=True,
                group_size=self.group_size,
                bits=self.bits,
                mode=self.mode,
                global_scale=self.global_scale,
                sorted_indices=sorted_indices,
            )

        y = output_rows_on_cores(product, self["weight"].shape[1])
        return y + mx.expand_dims(self["bias"][indices], -2) if "bias" in self else y


def quantized_product_on_cores(layer: nn.Module, x: mx.array) -> mx.array:
    """x @ W.T for a quantized layer's packed W (a QuantizedLinear's or a QuantizedEmbedding's), without
    its bias."""
    biases = layer.get("biases")

    def product(rows: slice) -> mx.array:
        return mx.quantized_matmul(
            x,
            layer["weight"][rows],
            layer["scales"][rows],
            None if biases is None else biases[rows],
            transpose=True,
            group_size=layer.group_size,
            bits=layer.bits,
            mode=layer.mode,
        )

    return output_rows_on_cores(product, layer["weight"].shape[0])


def output_rows_on_cores(product, rows: int) -> mx.array:
    """product(part) for CORES consecutive parts of a weight's output rows, each built on a CPU stream of
    its own, concatenated along the last axis. MLX runs each stream's operations on a thread of that
    stream's, so the parts' products run at once, one per core; each output value is the kernel's own.
    The parts are views of the weight, not copies. Another device's default stream takes the whole."""
    parts = min(CORES, rows) if mx.default_device() == mx.cpu else 1
    if parts == 1:
        return product(slice(0, rows))
    bounds = [rows * k // parts for k in range(parts + 1)]
    outputs = []
    for k, stream in enumerate(_streams(parts)):
        with mx.stream(stream):
            outputs.append(product(slice(bounds[k], bounds[k + 1])))
    return mx.concatenate(outputs, axis=-1)


class _ThreadStreams(threading.local):
    extra: list[mx.Stream]

    def __init__(self):
        self.extra = []


_STREAMS = _ThreadStreams()


def _streams(count: int) -> list[mx.Stream]:
    """The calling thread's default CPU stream and count - 1 more, made on first need: an MLX stream
    belongs to the thread that made it (another thread's graph cannot use it)."""
    extra = _STREAMS.extra
    extra.extend(mx.new_stream(mx.cpu) for _ in range(count - 1 - len(extra)))
    return [mx.default_stream(mx.cpu), *extra[: count - 1]]


class Float32SwitchLinear(SwitchLinear):
    """An unquantized MoE expert projection (mlx-lm's SwitchLinear) for activations or weights narrower
    than float32: MLX's CPU `gather_mm` takes float32 only, so both are widened for the product (exact)
    and the result rounded once to the activations' dtype, as a float32-accumulating kernel would. The
    widened copy of the weights is made per call: a bfloat16 MoE model unquantized on the CPU is a test
    configuration; the quantized experts (`gather_qmm`) take any dtype and are not swapped."""

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        if x.dtype == mx.float32 and self.weight.dtype == mx.float32:
            return super().__call__(x, indices, sorted_indices)
        y = mx.gather_mm(
            x.astype(mx.float32),
            self.weight.astype(mx.float32).swapaxes(-1, -2),
            rhs_indices=indices,
            sorted_indices=sorted_indices,
        )
        return y.astype(x.dtype)


class WideningLinear(nn.Linear):
    """A Linear whose parameters may be narrower than the activations: under float32 compute a bfloat16
    checkpoint's matrices stay bfloat16 in memory (`keeps_stored_dtype`, read by
    `loading.in_compute_dtype`) and are widened per call, which is exact. The tower's matrices are read
    once per encode, so the casts cost little next to the products, and they halve the tower's memory.
    A decoder matrix is read every token, so the decoder keeps nn.Linear."""

    keeps_stored_dtype = True

    def __call__(self, x: mx.array) -> mx.array:
        weight = self.weight.astype(x.dtype)
        if "bias" in self:
            return mx.addmm(self.bias.astype(x.dtype), x, weight.T)
        return x @ weight.T


class BlockwiseVisionMLP(vision.VisionMLP):
    """A vision block's MLP, many float32 rows of it through `numpy_mlp`."""

    def __call__(self, x: mx.array) -> mx.array:
        return numpy_mlp(self, x) if numpy_mlp_takes(self, x) else super().__call__(x)


class BlockwisePatchMerger(vision.PatchMerger):
    """A patch merger whose MLP takes many float32 rows through `numpy_mlp`."""

    def mlp(self, x: mx.array) -> mx.array:
        return numpy_mlp(self, x) if numpy_mlp_takes(self, x) else super().mlp(x)


def numpy_mlp_takes(module: nn.Module, x: mx.array) -> bool:
    """Whether `numpy_mlp` serves: float32, two blocks of rows or more, the system OpenBLAS, a GELU."""
    rows = x.size // x.shape[-1]
    fits = x.dtype == mx.float32 and rows >= 2 * NUMPY_MLP_ROWS
    return fits and _blas.loaded is not None and module.act in NUMPY_GELUS


def numpy_mlp(module: nn.Module, x: mx.array) -> mx.array:
    """fc2(act(fc1(x))) of a vision MLP (a block's or a merger's) for many float32 rows, with the system
    OpenBLAS and numpy: a block of NUMPY_MLP_ROWS rows at a time, a block per core
    (`_blas.single_threaded`), the GELU in pieces that stay in cache (`_in_pieces`). MLX's CPU backend
    computes the GELU one value at a time on one core and holds the whole intermediate (rows x
    intermediate size) between the products. The same function, to float32 rounding."""
    fc1, fc2, activation = module.linear_fc1, module.linear_fc2, NUMPY_GELUS[module.act]
    params = [p.astype(mx.float32) for p in (fc1.weight, fc1.bias, fc2.weight, fc2.bias)]
    mx.eval(x, params)
    w1, b1, w2, b2 = (np.asarray(p) for p in params)
    rows = x.size // x.shape[-1]
    xn = _unit_stride_rows(np.asarray(x).reshape(rows, -1))
    out = np.empty((rows, w2.shape[0]), np.float32)
    blocks = iter(range(0, rows, NUMPY_MLP_ROWS))

    def work(_) -> None:
        hidden = np.empty((NUMPY_MLP_ROWS, w1.shape[0]), np.float32)
        scratch = [np.empty(GELU_PIECE, np.float32) for _ in range(3)]
        for start in blocks:  # shared by the workers: each block is taken once
            end = min(start + NUMPY_MLP_ROWS, rows)
            h, y = hidden[: end - start], out[start:end]
            h[...] = b1
            _blas.sgemm(xn[start:end], w1, h, transpose_b=True, beta=1.0)
            _in_pieces(activation, h, scratch)
            y[...] = b2
            _blas.sgemm(h, w2, y, transpose_b=True, beta=1.0)

    _on_cores(work)
    return mx.array(out).reshape(*x.shape[:-1], -1)


# Values per piece of `_in_pieces`: the piece and its scratch buffers (1 MiB in all) stay in a core's cache
# through the GELU's dozen passes, and numpy's calls per piece cost little beside them.
GELU_PIECE = 65536


def _in_pieces(activation, h: np.ndarray, scratch: list[np.ndarray]) -> None:
    """activation(piece, *scratch) on consecutive pieces of the contiguous array h, in place."""
    flat = h.reshape(-1)
    for start in range(0, flat.size, GELU_PIECE):
        piece = flat[start : start + GELU_PIECE]
        activation(piece, *(buffer[: piece.size] for buffer in scratch))


def _gelu_tanh_in_place(h: np.ndarray, s: np.ndarray, *_) -> None:
    """h * sigmoid(2u), u = sqrt(2 / pi) (h + 0.044715 h^3): `gelu_tanh` with numpy's vectorised exp. Far
    out h^3 or the exponential overflow to inf, and the quotient is the GELU's limit, h or -0."""
    with np.errstate(over="ignore"):
        np.multiply(h, h, out=s)
        s *= 0.044715
        s += 1
        s *= h
        s *= -2 * math.sqrt(2 / math.pi)
        np.exp(s, out=s)
        s += 1
        np.divide(h, s, out=h)


def _gelu_erf_in_place(h: np.ndarray, z: np.ndarray, t: np.ndarray, poly: np.ndarray) -> None:
    """h * Phi(h) = h (1/2 + sign(h) (1/2 - erfc(|h| / sqrt 2) / 2)): `gelu_erf`'s erfc fit with numpy's
    vectorised exp. Far out z^2 overflows to inf and erfc to 0: the limits h and -0."""
    with np.errstate(over="ignore"):
        np.abs(h, out=z)
        z *= 1 / math.sqrt(2)
        np.multiply(z, 0.5, out=t)
        t += 1
        np.reciprocal(t, out=t)
        poly[...] = _ERFC_POLYNOMIAL[-1]
        for c in reversed(_ERFC_POLYNOMIAL[:-1]):
            poly *= t
            poly += c
        z *= z
        poly -= z
        np.exp(poly, out=poly)
        poly *= t  # erfc(|h| / sqrt 2)
        np.subtract(1, poly, out=poly)
        poly *= 0.5  # 1/2 - erfc / 2
        np.copysign(poly, h, out=poly)
        poly += 0.5
        h *= poly


# The vision MLPs with a numpy path for many rows (`numpy_mlp`), and their activations' numpy versions.
BLOCKWISE = {vision.VisionMLP: BlockwiseVisionMLP, vision.PatchMerger: BlockwisePatchMerger}
NUMPY_GELUS = {gelu_tanh: _gelu_tanh_in_place, gelu_erf: _gelu_erf_in_place}


class TableRope(Rope):
    """The decoder's rope through cos/sin tables for every position, text included. MLX's CPU backend
    builds its fused rope as ~30 graph nodes and their temporaries for every q and k of every layer;
    the tables are computed once per forward and shared by all layers, one compiled kernel per tensor."""

    def at(self, positions, length: int, dtype: mx.Dtype):
        if not isinstance(positions, np.ndarray):  # a text offset: the same start on all three axes
            starts = np.array(positions, dtype=np.int64).reshape(-1, 1)
            positions = np.broadcast_to(starts + np.arange(length), (3, len(starts), length))
        cos, signed_sin = self.tables(mx.array(positions), dtype)
        return partial(apply_rope, cos=cos, signed_sin=signed_sin)


# ---- attention ------------------------------------------------------------------------------------


def float32_attention(q, k, v, scale: float, mask=None) -> mx.array:
    """What PyTorch's CPU flash-attention kernel does: scores, softmax statistics and the P @ V
    accumulation in float32, with only the unnormalised probabilities rounded to the activation dtype
    before P @ V; in float32 this is plain exact attention. The softmax in base 2 (log2(e) folded into
    the scale). q [B, Hq, Lq, d], k/v [B, Hkv, Lk, d] (GQA: Hq a multiple of Hkv); mask None, "causal" or
    an array (boolean keep-mask or additive) broadcastable to [B, Hq, Lq, Lk]."""
    B, n_q, L_q, d = q.shape
    n_kv, L_k = k.shape[1], k.shape[2]
    dtype, f32 = q.dtype, mx.float32
    # Group the query heads that share a kv head instead of repeating k and v.
    q = q.reshape(B, n_kv, n_q // n_kv, L_q, d).astype(f32)
    k, v = k[:, :, None].astype(f32), v[:, :, None].astype(f32)
    # Base-2 logits; scaling q (Lq x d) instead of the scores (Lq x Lk) saves a pass over the scores.
    scores = (q * (scale * LOG2_E)) @ k.swapaxes(-1, -2)
    if isinstance(mask, str):  # "causal", aligned to the end of the keys (cached prefix first)
        keep = mx.arange(L_k)[None] <= mx.arange(L_k - L_q, L_k)[:, None]
        scores = mx.where(keep, scores, -mx.inf)
    elif mask is not None:
        if mask.ndim == 4:  # [b, 1 or Hq, Lq, Lk] -> the grouped head layout
            heads = mask.shape[1]
            mask = mask.reshape(mask.shape[0], n_kv if heads > 1 else 1, -1, *mask.shape[2:])
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, -mx.inf)
        else:
            scores = scores + mask.astype(f32) * LOG2_E
    probs = mx.power(2.0, scores - scores.max(axis=-1, keepdims=True))
    total = probs.sum(axis=-1, keepdims=True)
    out = (probs.astype(dtype).astype(f32) @ v) / total
    return out.reshape(B, n_q, L_q, d).astype(dtype)


def attention(q, k, v, *, cache, scale: float, mask=None) -> mx.array:
    """The decoder's attention (`Attention.attend`). A float32 prompt chunk of NUMPY_ATTENTION_LENGTH
    tokens or more, causal, with numpy (`numpy_attention`: its scores in tiles, its exponentials
    vectorised, a tile per core). Otherwise scores larger than DECODER_SCORE_BYTES (a short chunk
    against a long context, bfloat16, a batch's mask) go over key blocks (`key_blocked_attention`); others
    in one call: MLX's fused kernel in float32, whose CPU fallback is exact there, float32 accumulation
    for narrower activations (`float32_attention`).

    A quantized KV cache (k and v packed, mlx-lm's QuantizedKVCache): a decode step reads the packed cache
    directly (`quantized_decode_attention`). A prompt chunk takes the layer's keys and values dequantized
    into the paths above: MLX's quantized matmul is a scalar kernel on the CPU (module docstring), several
    times slower than these for many queries, and mlx-lm's quantized attention would hold the chunk's
    whole scores against the context. The same stored values either way; what a chunk holds for a moment
    is one layer's keys and values in the activation dtype."""
    if hasattr(cache, "bits"):
        if q.shape[2] == 1 and mask is None:
            return quantized_decode_attention(q, k, v, cache, scale)
        k, v = (mx.dequantize(*packed, group_size=cache.group_size, bits=cache.bits) for packed in (k, v))
        return attention(q, k, v, cache=None, scale=scale, mask=mask)
    batch, heads, queries, _ = q.shape
    causal = isinstance(mask, str)
    if q.dtype == mx.float32 and queries >= NUMPY_ATTENTION_LENGTH and (mask is None or causal):
        return numpy_attention(q, k, v, scale, causal)
    if batch * heads * queries * k.shape[2] * 4 > DECODER_SCORE_BYTES:
        return key_blocked_attention(q, k, v, scale, mask)
    if q.dtype == mx.float32:
        return scaled_dot_product_attention(q, k, v, cache=cache, scale=scale, mask=mask)
    return float32_attention(q, k, v, scale, mask)


def quantized_decode_attention(q, k, v, cache, scale: float) -> mx.array:
    """One query per sequence against a quantized cache's packed keys and values (mlx-lm's
    `quantized_scaled_dot_product_attention`), with the scores, softmax and accumulation in float32 as in
    `float32_attention`: for bfloat16 activations mlx-lm's computes the scores in bfloat16. q [B, Hq, 1,
    d]; k, v: (packed, scales, biases), each [B, Hkv, Lk, ...]."""
    B, n_q, _, d = q.shape
    n_kv, dtype, f32 = k[0].shape[1], q.dtype, mx.float32
    settings = {"group_size": cache.group_size, "bits": cache.bits}
    q = q.reshape(B, n_kv, n_q // n_kv, 1, d).astype(f32) * (scale * LOG2_E)
    k, v = ([x[:, :, None] for x in packed] for packed in (k, v))  # shared by the group's query heads
    scores = mx.quantized_matmul(q, *k, transpose=True, **settings)
    probs = mx.power(2.0, scores - scores.max(axis=-1, keepdims=True))
    total = probs.sum(axis=-1, keepdims=True)
    out = mx.quantized_matmul(probs.astype(dtype).astype(f32), *v, transpose=False, **settings) / total
    return out.reshape(B, n_q, 1, -1).astype(dtype)


def key_blocked_attention(q, k, v, scale: float, mask=None) -> mx.array:
    """`float32_attention` over blocks of keys with a running softmax (flash attention's recurrence: each
    block's exponentials taken against the largest score so far, earlier sums rescaled when it grows),
    each block evaluated before the next: the scores held are one block's, however long the context.
    The same function up to float32 rounding."""
    B, n_q, L_q, d = q.shape
    n_kv, L_k, f32 = k.shape[1], k.shape[2], mx.float32
    q = (q.reshape(B, n_kv, n_q // n_kv, L_q, d).astype(f32)) * (scale * LOG2_E)
    block = max(1, DECODER_SCORE_BYTES // (B * n_q * L_q * 4))
    top = mx.full((B, n_kv, n_q // n_kv, L_q, 1), -mx.inf, f32)
    total, out = mx.zeros_like(top), mx.zeros((B, n_kv, n_q // n_kv, L_q, v.shape[-1]), f32)
    for start in range(0, L_k, block):
        keys = slice(start, min(start + block, L_k))
        scores = q @ k[:, :, None, keys].astype(f32).swapaxes(-1, -2)
        scores = _masked(scores, mask, keys, L_q, L_k, n_kv)
        new_top = mx.maximum(top, scores.max(axis=-1, keepdims=True))
        # A row whose keys so far are all masked keeps -inf as its top: exponentials against 0 there.
        safe_top = mx.where(new_top == -mx.inf, 0.0, new_top)
        probs, rescale = mx.power(2.0, scores - safe_top), mx.power(2.0, top - safe_top)
        total = total * rescale + probs.sum(axis=-1, keepdims=True)
        out = out * rescale + probs.astype(v.dtype).astype(f32) @ v[:, :, None, keys].astype(f32)
        top = new_top
        mx.eval(top, total, out)
    return (out / total).reshape(B, n_q, L_q, -1).astype(v.dtype)


def _masked(scores: mx.array, mask, keys: slice, L_q: int, L_k: int, n_kv: int) -> mx.array:
    """Base-2 scores [B, n_kv, group, L_q, block] of the keys `keys` with the mask applied: None,
    "causal" (aligned to the end of the keys) or an array broadcastable to [B, Hq, L_q, L_k]."""
    if mask is None:
        return scores
    if isinstance(mask, str):
        keep = mx.arange(keys.start, keys.stop)[None] <= mx.arange(L_k - L_q, L_k)[:, None]
        return mx.where(keep, scores, -mx.inf)
    mask = mask[..., keys]
    if mask.ndim == 4:
        heads = mask.shape[1]
        mask = mask.reshape(mask.shape[0], n_kv if heads > 1 else 1, -1, *mask.shape[2:])
    if mask.dtype == mx.bool_:
        return mx.where(mask, scores, -mx.inf)
    return scores + mask.astype(mx.float32) * LOG2_E


def segment_attention_in_blocks(q, k, v, scale: float) -> mx.array:
    """`vision.fused_attention` for q, k, v [segments, heads, length, d]. In float32, segments of at least
    NUMPY_ATTENTION_LENGTH patches with numpy (`numpy_attention`); shorter ones with MLX, in calls of as
    many segments as ATTENTION_SCORE_BYTES of scores hold, each evaluated before the next; a segment
    whose scores alone exceed it in query blocks of at most that. The path follows the segments' length,
    never their count, so a video encoded in pieces (`Model.encode_vision`) gets the bits of one pass."""
    count, heads, length, _ = q.shape
    row_bytes = heads * length * 4  # float32 scores of one query row
    per_call = ATTENTION_SCORE_BYTES // (length * row_bytes)
    if q.dtype == mx.float32 and (length >= NUMPY_ATTENTION_LENGTH or not per_call):
        return numpy_attention(q, k, v, scale)
    if per_call >= count:
        return float32_attention(q, k, v, scale)
    if per_call:
        calls = range(0, count, per_call)
        parts = (float32_attention(*(x[s : s + per_call] for x in (q, k, v)), scale) for s in calls)
        return concatenate_evaluated(parts, axis=0)
    block = max(1, ATTENTION_SCORE_BYTES // row_bytes)
    segments = []
    for i in range(count):
        parts = (
            float32_attention(q[i : i + 1, :, s : s + block], k[i : i + 1], v[i : i + 1], scale)
            for s in range(0, length, block)
        )
        segments.append(concatenate_evaluated(parts, axis=2))
    return mx.concatenate(segments, axis=0) if count > 1 else segments[0]


def numpy_attention(q: mx.array, k: mx.array, v: mx.array, scale: float, causal: bool = False) -> mx.array:
    """Float32 attention of q [segments, heads, Lq, d] over k, v [segments, kv_heads, Lk, d] (kv_heads
    dividing heads: grouped-query attention) with numpy and BLAS, in tasks of one head's block of
    NUMPY_TILE[0] queries, each over its keys NUMPY_TILE[1] at a time. `causal`: the queries are the last
    Lq of the Lk positions (a prompt chunk after the cached context), each seeing the keys up to its own.

    Long attention spends its time in the two products and the softmax's exponentials, which numpy
    computes with the CPU's vector units (MLX's CPU backend one value at a time). A tile of scores stays
    in the core's cache from the first product through its exponentials to the second, which adds its
    share to the block's output (flash attention's recurrence; the scores of whole rows would not fit).
    Where a score could leave float32's exponent range (|q.k| <= |q| |k| beyond SAFE_EXPONENT), each row
    is shifted by its largest score so far, and what was summed before rescaled when that grows;
    otherwise nothing is shifted (the softmax is the same for any shift of a row). With the system
    OpenBLAS, each of CORES threads takes tasks in turn and runs their products on its own core
    (`_blas.single_threaded`), so no product waits for the library's threads to meet, which costs most
    when other processes share the cores. Otherwise the tasks run one after another with numpy's own
    products. MLX's buffers are read in place; the output is written in the layout the caller wants."""
    mx.eval(q, k, v)
    qn, kn, vn = (_unit_stride_rows(np.asarray(x)) for x in (q, k, v))
    count, heads, length, _ = qn.shape
    group, keys, depth = heads // kn.shape[1], kn.shape[2], vn.shape[-1]
    past = keys - length  # causal: the positions before the first query's
    out = np.empty((count, length, heads, depth), np.float32)
    rows, tile = NUMPY_TILE
    tasks = iter([(c, h, s) for c in range(count) for h in range(heads) for s in range(0, length, rows)])
    product = _blas.sgemm if _blas.loaded else _numpy_product
    key_norms = _row_norms(kn).max(axis=-1) * scale  # [segments, kv heads]

    def work(_) -> None:
        scores, weighted = np.empty(rows * tile, np.float32), np.empty((rows, depth), np.float32)
        sums, largest = np.empty((rows, 1), np.float32), np.empty((rows, 1), np.float32)
        for c, h, start in tasks:  # one iterator shared by the workers: each task is taken once
            end, kv = min(start + rows, length), h // group
            n, seen = end - start, past + end if causal else keys  # the keys any query of the block sees
            queries = qn[c, h, start:end]
            shift = _row_norms(queries).max() * key_norms[c, kv] > SAFE_EXPONENT
            for first in range(0, seen, tile):
                last = min(first + tile, seen)
                block = scores[: n * (last - first)].reshape(n, last - first)  # contiguous: no copies
                product(queries, kn[c, kv, first:last], block, scale, transpose_b=True)
                if causal and last - 1 > past + start:  # keys after some query's own position
                    _mask_after_positions(block, past + start - first)
                if shift:
                    _shift_rows(block, largest[:n], (weighted[:n], sums[:n]), first == 0)
                np.exp(block, out=block)
                if first == 0:
                    np.sum(block, axis=-1, keepdims=True, out=sums[:n])
                else:
                    sums[:n] += block.sum(axis=-1, keepdims=True)
                product(block, vn[c, kv, first:last], weighted[:n], beta=0.0 if first == 0 else 1.0)
            np.divide(weighted[:n], sums[:n], out=out[c, start:end, h])

    _on_cores(work)
    return mx.array(out).transpose(0, 2, 1, 3)


def _mask_after_positions(block: np.ndarray, offset: int) -> None:
    """Set to -inf the scores of a tile whose key (column j) comes after its query (row i): j - i > offset.
    Columns past the diagonal's band are set whole; the band takes a window of a cached triangle."""
    n, cols = block.shape
    band_start, band_end = max(offset + 1, 0), min(offset + n, cols)  # some rows see these keys
    block[:, max(band_end, band_start) :] = -np.inf
    if band_end > band_start:
        triangle = _after_diagonal(n)[:, band_start - offset : band_end - offset]
        np.copyto(block[:, band_start:band_end], -np.inf, where=triangle)


@cache
def _after_diagonal(size: int) -> np.ndarray:
    """[size, size], True above the diagonal."""
    return np.triu(np.ones((size, size), dtype=bool), 1)


def _shift_rows(block: np.ndarray, largest: np.ndarray, summed: tuple[np.ndarray, ...], first: bool) -> None:
    """Subtract from each row of a tile of scores its row's largest score so far (`largest`, updated),
    rescaling what was summed over the row's earlier tiles (`summed`) when that grows. A row's first tile
    holds a key it sees (key 0), so `largest` is finite from then on."""
    if first:
        np.max(block, axis=-1, keepdims=True, out=largest)
    else:
        grown = np.maximum(largest, block.max(axis=-1, keepdims=True))
        rescale = np.exp(largest - grown)
        for total in summed:
            total *= rescale
        largest[...] = grown
    block -= largest


# Scores within +-64 need no shift before their exponentials: each is then a normal float32 (no overflow, no
# precision lost below the normal range), and their sum over any segment stays finite.
SAFE_EXPONENT = 64.0


def _row_norms(x: np.ndarray) -> np.ndarray:
    return np.sqrt(np.einsum("...i,...i->...", x, x))


def _unit_stride_rows(x: np.ndarray) -> np.ndarray:
    """x, copied unless the elements within its rows are adjacent and its rows apart (what BLAS needs; a
    broadcast array's rows share their elements)."""
    row = x.shape[-1] * x.itemsize
    return x if x.strides[-1] == x.itemsize and x.strides[-2] >= row else np.ascontiguousarray(x)


def _numpy_product(a, b, out, alpha: float = 1.0, transpose_b: bool = False, beta: float = 0.0) -> None:
    """`_blas.sgemm` through numpy's matmul, for beta 0 or 1."""
    a, b = a if alpha == 1.0 else a * np.float32(alpha), b.T if transpose_b else b
    if beta:
        out += a @ b
    else:
        np.matmul(a, b, out=out)


def _on_cores(work) -> None:
    """work(k) on each of CORES threads, each running its products on its own core
    (`_blas.single_threaded`) and taking tasks from a queue `work` shares; without the system OpenBLAS,
    once, on this thread (numpy's products use the cores already)."""
    if not _blas.loaded:
        work(0)
        return
    with _blas.single_threaded():
        list(_threads().map(work, range(CORES)))


@cache
def _threads() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=CORES, thread_name_prefix="mlx-qwen3vl-numpy")
