"""Turns user input into model input. For now it holds the tokenizer and the model's token ids; image and
video preprocessing and chat-template expansion come with the preprocessing work (issue 3)."""

from __future__ import annotations

from pathlib import Path

from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.tokenizer_utils import load as load_tokenizer

from .config import ModelConfig
from .errors import Qwen3VLError


class Processor:
    def __init__(self, tokenizer: TokenizerWrapper, config: ModelConfig):
        self.tokenizer = tokenizer
        self.config = config

    @classmethod
    def from_pretrained(cls, path: Path, config: ModelConfig) -> Processor:
        if not (path / "tokenizer.json").exists() and not (path / "vocab.json").exists():
            raise Qwen3VLError(f"{path}: no tokenizer (tokenizer.json) in the model directory")
        return cls(load_tokenizer(path), config)
