"""Qwen3-VL on Apple Silicon with MLX.

The public names are imported when first used (PEP 562): `import mlx_qwen3vl` itself loads neither MLX
nor transformers, so the command-line tools answer `--help` and argument errors at once.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

# Before anything imports mlx.core: on Linux, route MLX's float32 matmuls to the system OpenBLAS.
from .cpu import use_system_openblas
from .errors import BrokenWeightsError, Qwen3VLError
from .options import DEFAULT_MODEL

use_system_openblas()

_LAZY = {
    "Answer": "answer",
    "ChatSession": "chat_session",
    "GenerationResponse": "generation",
    "TokenLogprobs": "answer",
    "embed": "retrieval",
    "generate": "generation",
    "stream_generate": "generation",
    "load": "loading",
    "Model": "model",
    "PromptCache": "model",
    "rerank": "retrieval",
    "InvalidToolCall": "tools",
    "ToolCall": "tools",
}
# Modules used by name (`mlx_qwen3vl.grounding.parse`), imported on first use like the names above.
_SUBMODULES = ("grounding",)

__all__ = [
    "DEFAULT_MODEL",
    "Answer",
    "BrokenWeightsError",
    "ChatSession",
    "GenerationResponse",
    "InvalidToolCall",
    "Model",
    "PromptCache",
    "Qwen3VLError",
    "TokenLogprobs",
    "ToolCall",
    "embed",
    "generate",
    "grounding",
    "load",
    "rerank",
    "stream_generate",
]

if TYPE_CHECKING:
    from . import grounding
    from .answer import Answer, TokenLogprobs
    from .chat_session import ChatSession
    from .generation import GenerationResponse, generate, stream_generate
    from .loading import load
    from .model import Model, PromptCache
    from .retrieval import embed, rerank
    from .tools import InvalidToolCall, ToolCall


def __getattr__(name: str):
    if name in _SUBMODULES:
        return import_module(f".{name}", __name__)
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
