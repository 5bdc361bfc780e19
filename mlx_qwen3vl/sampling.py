"""How one sequence picks its next token: its logits processors, then mlx-lm's sampler (or an argmax)."""

from __future__ import annotations

import mlx.core as mx

from .options import SamplingOptions


class TokenSampler:
    """Picks one sequence's next token from its logits [1, vocab]: its logits processors (with the token
    history they read; it grows only when one reads it), then mlx-lm's sampler, or an argmax when there is
    none (greedy); and, with `logprobs`, the model's own log-probabilities (before the processors and
    temperature). One per sequence, so that each row of a batch samples with its own settings.

    With a seed, each step draws from a key of its own, (seed, step): an answer depends on its seed alone,
    not on what else MLX's global generator served in between (the other rows of a batch)."""

    def __init__(self, prompt_tokens: mx.array, sampler=None, processors=(), logprobs=False, seed=None):
        self.history, self.sampler, self.processors = prompt_tokens, sampler, list(processors)
        self.logprobs, self.seed, self.steps = logprobs, seed, 0

    @property
    def greedy(self) -> bool:
        """An argmax of the logits and nothing else: such rows of a batch are sampled together."""
        return self.sampler is None and not self.processors and not self.logprobs

    def __call__(self, logits: mx.array) -> tuple[mx.array, mx.array | None]:
        distribution = None
        if self.logprobs:
            logits32 = logits.astype(mx.float32)
            distribution = (logits32 - mx.logsumexp(logits32, axis=-1, keepdims=True))[0]
        for processor in self.processors:
            logits = processor(self.history, logits)
        if self.sampler is None:
            token = mx.argmax(logits, axis=-1)
        else:
            if self.seed is not None:
                mx.random.seed((self.seed * 0x9E3779B97F4A7C15 + self.steps) % 2**64)
            token = self.sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        self.steps += 1
        if self.processors:
            self.history = mx.concatenate([self.history, token])
        return token, distribution


def token_sampler(
    sampling: SamplingOptions, prompt_tokens: mx.array, constraint=None, logprobs: int | None = None
) -> TokenSampler:
    """The sampler of one answer: the options' sampler and logits processors, then the constraint."""
    processors = sampling.logits_processors() + ([constraint] if constraint else [])
    return TokenSampler(prompt_tokens, sampling.sampler(), processors, logprobs is not None, sampling.seed)
