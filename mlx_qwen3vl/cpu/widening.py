"""Layers that widen narrower parameters or activations to float32 for their products on the CPU.

The vision tower's matrices keep a bfloat16 checkpoint's dtype under float32 compute and are widened per
call (`WideningLinear`): exact, half the tower's memory. Unquantized MoE experts with bfloat16 weights or
activations are multiplied in float32 (`Float32SwitchLinear`): MLX's CPU `gather_mm` supports float32 only.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchLinear


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
