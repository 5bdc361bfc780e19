"""Two things MLX's CPU backend needs done differently, shared by the vision tower, the decoder and the
quantized layers.

- Exponentials in base 2. On x86, MLX's `mx.exp` (and tanh, sigmoid) is a scalar polynomial (~40M
  values/s on the 2-core test machine) while `mx.power(2, x)` runs ~2.6x faster at the same accuracy
  (both ~2e-6 relative to float64), so softmax and sigmoid are written with log2(e) folded into their
  argument, as flash attention kernels do.
- Work split into blocks to bound memory is evaluated one block at a time. MLX allocates an operation's
  output when it dispatches it, ahead of its execution, so blocks built lazily in one graph would all be
  resident at once (measured: 1.3 GB for the vision attention's 576 MiB case with 128 MiB blocks).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import mlx.core as mx

LOG2_E = math.log2(math.e)


def times_sigmoid(x: mx.array, z_log2e: mx.array) -> mx.array:
    """x * sigmoid(z), given z * log2(e) (callers fold the constant into their own factors)."""
    return x / (1 + mx.power(2.0, -z_log2e))


def concatenate_evaluated(blocks: Iterable[mx.array], axis: int) -> mx.array:
    """Concatenate lazily produced blocks, evaluating each before the next is built."""
    parts = []
    for block in blocks:
        mx.eval(block)
        parts.append(block)
    return mx.concatenate(parts, axis=axis) if len(parts) > 1 else parts[0]
