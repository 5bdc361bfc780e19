"""The quantized layers on the CPU: their products on every core, and many float32 rows through BLAS.

Quantized decoder layers (`CpuQuantizedLinear`, the tied vocabulary projection
`CpuQuantizedEmbedding.as_linear`, the MoE experts `CpuQuantizedSwitchLinear`) split their output rows
over the cores, each part's product on a CPU stream of its own (`scheduling.output_rows_on_cores`): MLX's
CPU quantized kernel is scalar code on the one thread of its stream, so a decode step, which is mostly
these products, runs on one core otherwise. The parts compute exactly the kernel's numbers.

Many-row float32 inputs to the linear layers and to the tied vocabulary projection go through BLAS
instead (`quantized_product`): the kernel runs at the same rate for any number of rows, while a fast BLAS
multiplies a dequantized weight many times faster once there are a few rows (a prompt, a chat turn, the
quantization check's scored positions); one row (a decode step) keeps the kernel, which reads the packed
4-bit weight instead of a widened one. With the reference BLAS bundled in MLX's Linux wheel the dense
product is no faster, so there every call takes the kernel. `bench/matmul.py` measures each path.
"""

from __future__ import annotations

import sys

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

from . import openblas
from .scheduling import concatenate_evaluated, output_rows_on_cores

# MLX's CPU float32 matmuls go through a fast BLAS: the system OpenBLAS this package bound on import
# (openblas.py), or Accelerate on macOS.
FAST_BLAS = openblas.loaded is not None or sys.platform == "darwin"
# Rows of input (tokens) from which the BLAS path pays: at the 4B widths both paths take the same time
# for 2 rows, and BLAS wins from 3 (bench/matmul.py).
BLAS_MIN_ROWS = 3
# Bytes of dequantized float32 weight per block: the smallest blocks as fast as the whole matrix at once
# at the 4B widths (smaller ones pay per-block overhead), with a fraction of its memory.
BLOCK_BYTES = 4 * 2**20


class CpuQuantizedLinear(nn.QuantizedLinear):
    """MLX's quantized linear layer with its products on every core and many float32 rows through a fast
    BLAS (`quantized_product`)."""

    def __call__(self, x: mx.array) -> mx.array:
        y = quantized_product(self, x)
        return y + self["bias"] if "bias" in self else y


class CpuQuantizedEmbedding(nn.QuantizedEmbedding):
    """A quantized embedding whose use as the vocabulary projection (tied embeddings) runs on every core:
    with the vocabulary's 151,936 rows it is the largest product of a decode step. Many rows at once (the
    quantization check projects its scored positions together) go through BLAS, as a linear layer's."""

    def as_linear(self, x: mx.array) -> mx.array:
        return quantized_product(self, x)


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


def quantized_product(layer: nn.Module, x: mx.array) -> mx.array:
    """x @ W.T for a quantized layer's packed W, without its bias: the kernel on every core
    (`quantized_product_on_cores`), or for float32 inputs of many rows, BLAS on the weight dequantized in
    blocks of output rows of BLOCK_BYTES (module docstring). The BLAS result differs from the kernel's only
    in summation order."""
    # Cheapest test first: a decode step (one row) takes the kernel on every call.
    rows = x.size // x.shape[-1]
    if rows < BLAS_MIN_ROWS or x.dtype != mx.float32 or not FAST_BLAS:
        return quantized_product_on_cores(layer, x)
    step = max(1, BLOCK_BYTES // (4 * x.shape[-1]))
    starts = range(0, layer["weight"].shape[0], step)
    return concatenate_evaluated((x @ dequantized_rows(layer, s, s + step).T for s in starts), axis=-1)


def dequantized_rows(layer: nn.Module, start: int, end: int) -> mx.array:
    """Output rows [start, end) of a quantized layer's weight in float32."""
    biases = layer.get("biases")
    return mx.dequantize(
        layer["weight"][start:end],
        layer["scales"][start:end].astype(mx.float32),
        None if biases is None else biases[start:end].astype(mx.float32),
        group_size=layer.group_size,
        bits=layer.bits,
        mode=layer.mode,
    )


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
