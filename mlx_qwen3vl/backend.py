"""The one load-time decision of which code runs: the backend and the compute dtype.

- "gpu": the plain model, as MLX's GPU backends run it (Metal on a Mac, CUDA), in bfloat16 by default:
  the checkpoints' own precision, half the memory of float32.
- "cpu": the same model with the CPU specialisations of `cpu/` swapped in, in float32 by default:
  MLX's float32 matmuls go through BLAS (with OpenBLAS, an order of magnitude faster than its bfloat16
  kernels), its 4-bit matmuls are several times faster with float32 activations than with bfloat16
  ones (`bench/matmul.py`), and float32 matches the reference to ~1e-6. It doubles the memory of
  unquantized weights: dtype="bfloat16" trades speed for memory.

`backend=None` follows MLX's default device. "gpu" on a machine without one runs the GPU path's code on
the CPU: how the tests compare that path with the reference, and how the bench counts its graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .errors import Qwen3VLError
from .options import DTYPE_NAMES

BACKENDS = ("gpu", "cpu")
DTYPES = {name: getattr(mx, name) for name in DTYPE_NAMES}
DEFAULT_DTYPES = {"gpu": mx.bfloat16, "cpu": mx.float32}
# Prompt tokens fed to the decoder at once. On a GPU, mlx-lm's default: large matmuls, a prompt with an
# image in one chunk. On the CPU attention materialises a chunk's scores (heads x chunk x keys, 4 bytes
# each; against a long context a key block at a time, `cpu/attention.py`), so chunks stay smaller there.
PREFILL_STEP_SIZES = {"gpu": 2048, "cpu": 512}


@dataclass(frozen=True)
class Backend:
    name: str
    dtype: mx.Dtype

    @classmethod
    def choose(cls, backend: str | None = None, dtype=None) -> Backend:
        if backend is None:
            backend = "gpu" if mx.default_device() == mx.gpu else "cpu"
        if backend not in BACKENDS:
            raise Qwen3VLError(f"backend {backend!r} is not supported; choose one of {', '.join(BACKENDS)}")
        return cls(backend, DEFAULT_DTYPES[backend] if dtype is None else resolve_dtype(dtype))

    @property
    def prefill_step_size(self) -> int:
        return PREFILL_STEP_SIZES[self.name]

    def specialize(self, model: nn.Module) -> None:
        """Swap in this backend's versions of the model's parts (the GPU path has none). Idempotent."""
        if self.name == "cpu":
            from .cpu import specialize

            specialize(model, self.dtype)


def resolve_dtype(dtype) -> mx.Dtype:
    if isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in DTYPES:
        raise Qwen3VLError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]
