"""Answers decoded together: one forward pass per step for every active sequence.

Each request's prompt is prefilled on its own, in its own cache (continued from the prompt cache store),
then that cache joins the batch: one mlx-lm BatchKVCache per layer, the rows left-padded to a common
length and the padding masked, with each row's rope delta beside it. A step feeds every row's current
token at the row's own position (`Model.prepare` takes per-row offsets) and samples each row with its own
`TokenSampler`, all greedy rows with one argmax. A row taken out gives back its cache (mlx-lm's extract),
holding exactly the tokens that row was fed.

mlx-lm's BatchGenerator does this for text models; it cannot be used as is: its rows are token ids alone,
where a Qwen3-VL row needs its 3-D positions, vision features and rope delta.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import BatchKVCache

from ..generation import TokenSampler, generation_stream
from ..model import Model, PromptCache


class Batch:
    def __init__(self, model: Model):
        self.model = model
        self.cache: PromptCache | None = None
        self.samplers: list[TokenSampler] = []
        # Each row's current token (computed asynchronously) and its log-probabilities when asked for.
        self.tokens: mx.array | None = None
        self.distributions: list[mx.array | None] = []

    def __len__(self) -> int:
        return len(self.samplers)

    def add(self, cache: PromptCache, sampler: TokenSampler, token: mx.array, distribution) -> None:
        """A prefilled sequence joins: its cache, its sampler, and its first token (from the prefill)."""
        rows = [BatchKVCache.merge([layer]) for layer in cache]
        if self.cache is None:
            self.cache, self.tokens = PromptCache(rows, cache.rope_delta), token
        else:
            for layer, row in zip(self.cache, rows, strict=True):
                layer.extend(row)
            self.cache.rope_delta = np.concatenate([self.cache.rope_delta, cache.rope_delta])
            self.tokens = mx.concatenate([self.tokens, token])
        self.samplers.append(sampler)
        self.distributions.append(distribution)

    def step(self) -> tuple[list[int], list[mx.array | None]]:
        """Feed every row its current token and start computing the next ones (evaluated while the
        caller handles these): the tokens fed, and their log-probabilities where asked for."""
        with mx.stream(generation_stream):
            logits = self.model(self.tokens[:, None], cache=self.cache)[:, -1]
            tokens, distributions = self._sample(logits)
        mx.async_eval(tokens, [d for d in distributions if d is not None])
        fed, fed_distributions = self.tokens.tolist(), self.distributions
        self.tokens, self.distributions = tokens, distributions
        return fed, fed_distributions

    def _sample(self, logits: mx.array) -> tuple[mx.array, list[mx.array | None]]:
        if all(sampler.greedy for sampler in self.samplers):
            return mx.argmax(logits, axis=-1), [None] * len(self)
        rows = [sampler(logits[i : i + 1]) for i, sampler in enumerate(self.samplers)]
        return mx.concatenate([token for token, _ in rows]), [d for _, d in rows]

    def remove(self, rows: list[int]) -> list[PromptCache]:
        """Take these rows out: each one's cache, as a single sequence's."""
        taken = [
            PromptCache([layer.extract(i) for layer in self.cache], self.cache.rope_delta[i]) for i in rows
        ]
        leaving = set(rows)
        keep = [i for i in range(len(self)) if i not in leaving]
        if not keep:
            self.__init__(self.model)
            return taken
        index = mx.array(keep)
        for layer in self.cache:
            layer.filter(index)
        self.cache.rope_delta = self.cache.rope_delta[keep]
        self.tokens = self.tokens[index]
        self.samplers = [self.samplers[i] for i in keep]
        self.distributions = [self.distributions[i] for i in keep]
        return taken
