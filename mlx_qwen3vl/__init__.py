"""Qwen3-VL on Apple Silicon with MLX."""

# Before anything imports mlx.core: on Linux, route MLX's float32 matmuls to the system OpenBLAS.
from ._blas import use_system_openblas

use_system_openblas()

from .chat_session import ChatSession  # noqa: E402
from .errors import Qwen3VLError  # noqa: E402
from .generate import GenerationResponse, generate, stream_generate  # noqa: E402
from .loading import DEFAULT_MODEL, load  # noqa: E402
from .model import Model, PromptCache  # noqa: E402

__all__ = [
    "DEFAULT_MODEL",
    "ChatSession",
    "GenerationResponse",
    "Model",
    "PromptCache",
    "Qwen3VLError",
    "generate",
    "load",
    "stream_generate",
]
