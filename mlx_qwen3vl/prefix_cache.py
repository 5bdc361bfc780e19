"""KV caches that know what they hold, so that a turn continues from the longest prefix already computed.

A cache's keys are the keys of the positions it holds (`turn.Key`: each token id, and for an image's or
video's pad tokens the item's digest). How much of a cache is still valid for a new turn is answered here
alone, for a chat session's cache and the server's store alike: the longest common run of keys, cut before
any image or video it would split, and one token short of the whole prompt (its last logits are needed).
Equal keys mean equal tokens at equal positions, so the cached keys and values are exactly those the turn
would compute: an edited earlier message, or another picture under the same file name, differs in its keys
and is computed again.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from .model import Model, PreparedInput
from .options import KVCacheOptions
from .progress import Progress
from .turn import Key, Turn


def common_prefix(a: list[Key], b: list[Key]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PrefixCache:
    """One sequence's KV cache (`kv`: a `model.PromptCache`, one mlx-lm cache per decoder layer, with the
    rope delta) and the keys of the positions it holds. Iterating it gives the layers' caches."""

    def __init__(self, model: Model, kv_cache: KVCacheOptions | None = None):
        self.model = model
        self.kv = model.make_cache(kv_cache)
        self._keys: list[Key] = []
        self._held: tuple[Turn, list[int], int] | None = None  # the keys, until first read (`keys`)
        # The last `usable` answer and (weakly: a store's entries must not keep a request's pixel rows) the
        # turn it was for.
        self._usable: tuple[weakref.ref, int] | None = None

    @property
    def offset(self) -> int:
        return self.kv.offset

    def __iter__(self):
        return iter(self.kv)

    @property
    def nbytes(self) -> int:
        """The bytes it holds. On a pipeline stage (distributed/pipeline.py), which holds some layers' caches,
        an even share of all stages' (every layer's cache has the same size): the same figure on every
        rank, so that the server's ranks keep and drop the same caches (serving/lockstep.py)."""
        held = getattr(self.model.model.language_model, "held", None)
        if held is None:
            return sum(layer.nbytes for layer in self.kv)
        stages = self.model.model.language_model.group.size()
        return sum(self.kv[j].nbytes for j in held) * len(self.kv) // len(held) // stages

    @property
    def keys(self) -> list[Key]:
        """The keys of the positions held. Made when first read (or kept): a cache that no turn continues
        from never computes its images' digests."""
        if self._held is not None:
            turn, answer, length = self._held
            self._keys = (turn.keys + [(token, None) for token in answer])[:length]
            self._held = None
        return self._keys

    def keep(self) -> None:
        """For a cache kept past its turn: make its keys now and let go of the turn, whose images and
        videos hold their pixel rows."""
        self.keys  # noqa: B018 (made on first read)

    def usable(self, turn: Turn) -> int:
        """How many of the turn's first positions this cache holds and the turn may continue from."""
        if self._usable is not None and self._usable[0]() is turn:
            return self._usable[1]
        length = 0
        if self.offset > 0:
            length = max(min(common_prefix(self.keys, turn.keys), len(turn.ids) - 1), 0)
            length = next((start for start, end in turn.spans if start < length < end), length)
        self._usable = (weakref.ref(turn), length)
        return length

    def continue_for(self, turn: Turn) -> int:
        """Keep only what the turn can continue from (`usable`), with the rope delta the turn has there;
        returns where in the turn the cache now ends."""
        length = self.usable(turn)
        self.trim(turn, length)
        return length

    def remainder(self, turn: Turn, progress=None) -> PreparedInput:
        """The part of a turn this cache does not hold, ready for the decoder: the cache kept as far as the
        turn can continue from it (`continue_for`), and the images and videos after that point described
        (`Progress` "media") and run through the vision tower (`Progress` "vision"). Asked of the cache
        because only it knows where the turn's new part starts."""
        start = self.continue_for(turn)
        media = turn.media_from(start)
        if progress:
            for i, item in enumerate(media, start=1):
                progress(Progress("media", i, len(media), item.description))
        report = (lambda done, total: progress(Progress("vision", done, total))) if progress else None
        vision = self.model.encode_media(media, report)
        return self.model.prepare(turn.ids[start:], vision, self.kv)

    def trim(self, turn: Turn, length: int) -> None:
        """Keep the first `length` positions of what the cache holds, which are those of `turn` and, past
        its prompt, of its answer."""
        keys = self.keys
        for layer in self.kv:
            layer.trim(layer.offset - length)
        self._keys, self._usable = keys[:length], None
        self.kv.rope_delta = np.array([turn.rope_delta_at(length)], dtype=np.int64)

    def settle(self, turn: Turn, answer: list[int]) -> None:
        """After a turn ran (to its end, or interrupted, or failed): every layer cut to the positions all of
        them hold, at most the prompt and the `answer` tokens handed out (a token can be in the cache
        before it was handed out: the interruption came while its value was awaited); the keys say what
        that is."""
        length = min(min(layer.offset for layer in self.kv), len(turn.ids) + len(answer))
        for layer in self.kv:
            layer.trim(layer.offset - length)
        del answer[max(length - len(turn.ids), 0) :]
        self.kv.rope_delta = np.array([turn.rope_delta_at(length)], dtype=np.int64)
        self._held, self._keys, self._usable = (turn, list(answer), length), [], None


class PrefixCacheStore:
    """The server's caches of recent conversations: at most `max_bytes` in all (as held: quantized ones
    count their packed size), least recently used out first; a cache larger than the whole budget is not
    kept. New caches are of the kind `kv_cache` says. A chat client resends the whole conversation every
    turn; only its new part is prefilled, and an image or video in the reused prefix is neither read nor
    encoded again.

    Bytes alone bound it: a model's keys and values take tens of KB or more per position, held in blocks
    of hundreds of positions, so the budget also bounds how many caches a request's search goes through."""

    def __init__(self, model: Model, max_bytes: int = 2 * 10**9, kv_cache: KVCacheOptions | None = None):
        self.model, self.kv_cache, self.max_bytes = model, kv_cache, max_bytes
        self.entries: list[PrefixCache] = []  # most recent last

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry in self.entries)

    def take(self, turn: Turn) -> PrefixCache:
        """The cache this turn continues furthest from, out of the store (it comes back with `give_back`),
        or a new one."""
        best = max(self.entries, key=lambda entry: entry.usable(turn), default=None)
        if best is None or best.usable(turn) == 0:
            return PrefixCache(self.model, self.kv_cache)
        self.entries.remove(best)
        return best

    @contextmanager
    def lend(self, turn: Turn) -> Iterator[PrefixCache]:
        """`take` for a block that starts the turn: if the block fails (a refusal, a cancellation, a bug),
        the cache comes back at once with what it then holds of the turn; if not, it is the caller's until
        it gives it back."""
        cache = self.take(turn)
        try:
            yield cache
        except BaseException:
            self.give_back(cache, turn, [])
            raise

    def give_back(self, cache: PrefixCache, turn: Turn, answer: list[int]) -> None:
        """Keep a cache for later turns, settled on the turn it ran and the `answer` tokens handed out
        (`PrefixCache.settle`); one holding the same keys as another replaces it."""
        cache.settle(turn, answer)
        if cache.offset == 0 or cache.nbytes > self.max_bytes:
            return
        cache.keep()
        self.entries = [e for e in self.entries if e.keys != cache.keys] + [cache]
        while self.nbytes > self.max_bytes:  # ends by the newest at the latest: it fits alone
            self.entries.pop(0)

    def clear(self) -> None:
        self.entries.clear()
