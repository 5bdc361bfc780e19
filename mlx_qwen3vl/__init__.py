"""Qwen3-VL on Apple Silicon with MLX."""

# Before anything imports mlx.core: on Linux, route MLX's float32 matmuls to the system OpenBLAS.
from ._blas import use_system_openblas

use_system_openblas()

from .errors import Qwen3VLError  # noqa: E402
from .loading import load  # noqa: E402
from .model import Model, PromptCache  # noqa: E402

__all__ = ["Model", "PromptCache", "Qwen3VLError", "load"]
