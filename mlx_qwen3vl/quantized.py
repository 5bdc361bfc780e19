"""The decoder's linear layers, and their quantized form with a BLAS path for many rows on the CPU.

MLX's CPU quantized matmul is a scalar kernel: at the 4B widths it ran at ~1.7 GFLOP/s on the 2-core test
machine for any number of rows, so a 512-token prefill spent 15 s in each MLP matrix. Dequantizing the
weight to float32 and handing the product to a fast BLAS takes 0.25 s there (65x); from 3 rows on it is
faster (a chat turn's new tokens, a short prompt), while for one row (a decode step) the quantized
kernel is faster and reads 8x fewer bytes, so it keeps that. With the reference BLAS bundled in MLX's
Linux wheel the dense product is no faster than the kernel, so there the kernel does everything.

The weight is dequantized in blocks of output rows, each evaluated before the next is built
(`cpu.concatenate_evaluated`): a few MiB of dequantized weight at a time instead of the whole matrix.
No library offers this; on a GPU MLX's own kernel is fast.
"""

from __future__ import annotations

import sys

import mlx.core as mx
import mlx.nn as nn

from . import _blas
from .cpu import concatenate_evaluated

# MLX's CPU float32 matmuls go through a fast BLAS: the system OpenBLAS this package bound on import
# (_blas.py), or Accelerate on macOS.
FAST_BLAS = _blas.loaded is not None or sys.platform == "darwin"
# Rows of input (tokens) from which the BLAS path pays: at the 4B widths, for 2 rows both paths take the
# same time (29 ms per MLP matrix for 1 row with the kernel, ~55 ms for any row count up to 16 through
# BLAS); from 3 rows BLAS wins, 1.5x at 3, 8x at 16.
BLAS_MIN_ROWS = 3
# Bytes of dequantized float32 weight per block. Measured at the 4B widths: 4 MiB blocks prefill as fast
# as 8 MiB ones (and the whole matrix at once) with 8 MB less peak for a 128-token chunk; 2 MiB ones are
# 25% slower.
BLOCK_BYTES = 4 * 2**20


class QuantizedLinear(nn.QuantizedLinear):
    """MLX's quantized linear layer, with float32 inputs of many rows on the CPU multiplied through BLAS
    (module docstring). The result differs from the quantized kernel's only in summation order."""

    def __call__(self, x: mx.array) -> mx.array:
        # Cheapest test first: a decode step (one row) takes the kernel on every call.
        rows = x.size // x.shape[-1]
        if rows < BLAS_MIN_ROWS or x.dtype != mx.float32 or not FAST_BLAS or mx.default_device() != mx.cpu:
            return super().__call__(x)
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


class Linear(nn.Linear):
    """nn.Linear whose quantized form (`nn.quantize`, the loader's `quantize_as_stored`) is the
    QuantizedLinear above."""

    def to_quantized(self, group_size=None, bits=None, mode: str = "affine", quantize_input: bool = False):
        if quantize_input:  # activation quantization (nvfp4 / mxfp8): MLX's own layer
            return super().to_quantized(group_size, bits, mode, quantize_input)
        return QuantizedLinear.from_linear(self, group_size, bits, mode)
