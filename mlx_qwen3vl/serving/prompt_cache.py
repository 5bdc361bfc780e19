"""The KV caches of recent conversations, so that a request continues from the longest prefix a previous
one already computed. Chat clients resend the whole conversation every turn; only the new part is
prefilled, and an image or video in the reused prefix is neither decoded nor encoded again.

A prompt is compared as a sequence of keys: each token id, and for the pad tokens of an image or video
also the digest of that medium's content (every image's pads have the same id). A prefix is cut before
any media block it would split, and one token short of a whole prompt (its logits are needed). The rope
delta at the cut comes from the new prompt's own positions: the prefix is the same tokens and media, so
the same positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..model import Model, PromptCache
from ..options import KVCacheOptions

Key = tuple[int, str | None]


@dataclass
class Entry:
    keys: list[Key]
    cache: PromptCache

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.cache)


def common_prefix(a: list[Key], b: list[Key]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def usable_prefix(length: int, prompt_length: int, blocks: list[tuple[int, int]]) -> int:
    """A shared prefix's length as a starting point: at most the prompt less one token, and before any
    media block [start, end) it would cut through."""
    length = min(length, prompt_length - 1)
    for start, end in blocks:
        if start < length < end:
            return start
    return max(length, 0)


class PromptCacheStore:
    """At most `entries` caches of at most `max_bytes` in all (as held: quantized ones count their packed
    size), least recently used out first; new caches are of the kind `kv_cache` says."""

    def __init__(
        self,
        model: Model,
        entries: int = 8,
        max_bytes: int = 2 * 10**9,
        kv_cache: KVCacheOptions | None = None,
    ):
        self.model = model
        self.kv_cache = kv_cache
        self.capacity = entries
        self.max_bytes = max_bytes
        self.entries: list[Entry] = []  # most recent last

    def take(
        self, keys: list[Key], blocks: list[tuple[int, int]], deltas: np.ndarray
    ) -> tuple[PromptCache, int]:
        """The cache to continue this prompt from, and where in the prompt it ends. The entry it comes
        from leaves the store (its cache is trimmed to the shared prefix); it comes back with `give_back`.
        `deltas[p]`: the rope delta of the prompt's position p."""
        best, best_length = None, 0
        for entry in self.entries:
            length = usable_prefix(common_prefix(entry.keys, keys), len(keys), blocks)
            if length > best_length:
                best, best_length = entry, length
        if best is None:
            return self.model.make_cache(self.kv_cache), 0
        self.entries.remove(best)
        cache = best.cache
        for layer in cache:
            layer.trim(layer.offset - best_length)
        cache.rope_delta = np.array([deltas[best_length]], dtype=np.int64)
        return cache, best_length

    def give_back(self, keys: list[Key], cache: PromptCache) -> None:
        """Keep a cache that holds exactly `keys` (its tokens and media) for later requests."""
        if not keys or cache.offset != len(keys):
            return
        self.entries = [e for e in self.entries if e.keys != keys] + [Entry(keys, cache)]
        while len(self.entries) > self.capacity or (
            len(self.entries) > 1 and sum(e.nbytes for e in self.entries) > self.max_bytes
        ):
            self.entries.pop(0)

    def clear(self) -> None:
        self.entries.clear()
