"""Answers the test's own: a sampler that emits given tokens, so that what the random model "says" is
known text (a tool call, reasoning, characters split over tokens) and the layers that read answers can be
checked against it."""

from __future__ import annotations

import mlx.core as mx

from mlx_qwen3vl.options import SamplingOptions

END_OF_TURN = 151645  # <|im_end|>


class Scripted:
    """A sampler that emits fixed tokens, then end-of-turn."""

    def __init__(self, tokens):
        self.tokens = list(tokens)

    def __call__(self, logprobs):
        return mx.array([self.tokens.pop(0) if self.tokens else END_OF_TURN])


def script(monkeypatch, tokens) -> None:
    """Every answer started while the test runs (here or in a server's engine) says `tokens`."""
    monkeypatch.setattr(SamplingOptions, "sampler", lambda self: Scripted(tokens))


def say(monkeypatch, tokenizer, *texts: str) -> None:
    """Every answer says these texts, each tokenized on its own (`<think>`, `<tool_call>` are one token
    each, as the model writes them), then ends its turn."""
    script(monkeypatch, [t for text in texts for t in tokenizer.encode(text)])
