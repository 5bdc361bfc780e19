"""The model's activations with their exponentials in base 2, for MLX and, in place, for numpy.

On x86, MLX's `mx.exp` (and tanh, sigmoid, erf) is a scalar polynomial while `mx.power(2, x)` is
vectorised, at the same accuracy (both ~2e-6 relative to float64): the GELUs, the SiLU gate and the
softmax of the float32 attention (`attention.py`) fold log2(e) into their argument, as flash attention
kernels do. The numpy MLP of the vision tower (`vision_mlp.py`) takes the GELUs in place with numpy's
vectorised exp.
"""

from __future__ import annotations

import math
from functools import partial

import mlx.core as mx
import numpy as np

from .. import vision

LOG2_E = math.log2(math.e)


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


# The model's activations -> their versions above (`swap.specialize`).
GELUS = {vision.gelu_tanh: gelu_tanh, vision.gelu_erf: gelu_erf}


def gelu_tanh_in_place(h: np.ndarray, s: np.ndarray, *_) -> None:
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


def gelu_erf_in_place(h: np.ndarray, z: np.ndarray, t: np.ndarray, poly: np.ndarray) -> None:
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


# The MLX activations above -> their numpy versions in place (`vision_mlp.numpy_mlp`).
NUMPY_GELUS = {gelu_tanh: gelu_tanh_in_place, gelu_erf: gelu_erf_in_place}
