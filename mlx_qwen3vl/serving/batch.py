"""Answers decoded together: one forward pass per step for every active sequence.

Each request's prompt is prefilled on its own, in its own cache (continued from the prompt cache store),
then that cache joins the batch: one mlx-lm BatchKVCache per layer, the rows left-padded to a common
length and the padding masked, with each row's rope delta beside it. A step feeds every row's current
token at the row's own position (`Model.prepare` takes per-row offsets) and samples each row with its own
`TokenSampler`, all greedy rows with one argmax. A row taken out gives back its cache (mlx-lm's extract),
holding exactly the tokens that row was fed.

mlx-lm's BatchGenerator does this for text models; it cannot be used as is: its rows are token ids alone,
where a Qwen3-VL row needs its 3-D positions, vision features and rope delta.

A quantized KV cache has no batched form in mlx-lm (BatchKVCache merges unquantized caches only, and
mlx-lm's own server decodes such requests one at a time): with one, each row keeps its own cache and a
step runs one forward pass per row (`SeparateRows`). The answers still advance a token each per step, so
a long answer does not hold up a short one; what is lost is the batch's shared pass over the weights.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import BatchKVCache

from ..generation import generation_stream, step_evaluation
from ..model import Model, PromptCache
from ..options import KVCacheOptions
from ..sampling import TokenSampler


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
        self._join(cache)
        self.tokens = token if self.tokens is None else mx.concatenate([self.tokens, token])
        self.samplers.append(sampler)
        self.distributions.append(distribution)

    def _join(self, cache: PromptCache) -> None:
        rows = [BatchKVCache.merge([layer]) for layer in cache]
        if self.cache is None:
            self.cache = PromptCache(rows, cache.rope_delta)
        else:
            for layer, row in zip(self.cache, rows, strict=True):
                layer.extend(row)
            self.cache.rope_delta = np.concatenate([self.cache.rope_delta, cache.rope_delta])

    def step(self) -> tuple[list[int], list[mx.array | None]]:
        """Feed every row its current token and start computing the next ones (evaluated while the
        caller handles these, but across ranks first: `step_evaluation`): the tokens fed, and their
        log-probabilities where asked for."""
        with mx.stream(generation_stream):
            tokens, distributions = self._sample(self._logits(self.tokens[:, None]))
        step_evaluation(self.model)(tokens, [d for d in distributions if d is not None])
        fed, fed_distributions = self.tokens.tolist(), self.distributions
        self.tokens, self.distributions = tokens, distributions
        return fed, fed_distributions

    def _logits(self, tokens: mx.array) -> mx.array:
        """The next-token logits [rows, vocab] after feeding each row its token ([rows, 1])."""
        return self.model(tokens, cache=self.cache)[:, -1]

    def _sample(self, logits: mx.array) -> tuple[mx.array, list[mx.array | None]]:
        if all(sampler.greedy for sampler in self.samplers):
            return mx.argmax(logits, axis=-1), [None] * len(self)
        rows = [sampler(logits[i : i + 1]) for i, sampler in enumerate(self.samplers)]
        return mx.concatenate([token for token, _ in rows]), [d for _, d in rows]

    def remove(self, rows: list[int]) -> list[PromptCache]:
        """Take these rows out: each one's cache, as a single sequence's."""
        leaving = set(rows)
        keep = [i for i in range(len(self)) if i not in leaving]
        taken = self._split(rows, keep)
        if not keep:
            self.__init__(self.model)
            return taken
        index = mx.array(keep)
        self.tokens = self.tokens[index]
        self.samplers = [self.samplers[i] for i in keep]
        self.distributions = [self.distributions[i] for i in keep]
        return taken

    def _split(self, rows: list[int], keep: list[int]) -> list[PromptCache]:
        """The caches of `rows`, each a single sequence's; the batch's cache keeps the rows `keep`."""
        taken = [
            PromptCache([layer.extract(i) for layer in self.cache], self.cache.rope_delta[i]) for i in rows
        ]
        if keep:
            for layer in self.cache:
                layer.filter(mx.array(keep))
            self.cache.rope_delta = self.cache.rope_delta[keep]
        return taken


class SeparateRows(Batch):
    """A batch whose rows keep caches of their own (`cache`: one PromptCache per row), fed one forward
    pass per row each step: for caches mlx-lm cannot batch (module docstring)."""

    def _join(self, cache: PromptCache) -> None:
        self.cache = (self.cache or []) + [cache]

    def _logits(self, tokens: mx.array) -> mx.array:
        rows = [self.model(tokens[i : i + 1], cache=cache)[:, -1] for i, cache in enumerate(self.cache)]
        return mx.concatenate(rows)

    def _split(self, rows: list[int], keep: list[int]) -> list[PromptCache]:
        taken = [self.cache[i] for i in rows]
        self.cache = [self.cache[i] for i in keep]
        return taken


def make_batch(model: Model, kv_cache: KVCacheOptions) -> Batch:
    """An empty batch for caches of this kind."""
    return SeparateRows(model) if kv_cache.bits is not None else Batch(model)
