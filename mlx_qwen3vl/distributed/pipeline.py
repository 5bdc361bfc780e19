"""Pipeline parallelism: each rank holds consecutive decoder layers, rank 0 the first; a step's hidden
states go from rank to rank with MLX's send / recv, and the last rank's output is gathered by all, which
then compute the vocabulary projection alike. One transfer per rank boundary and one gather per forward
pass, whatever the depth: the mode for links too slow for tensor parallelism's two all-reduces per layer.
The ranks take turns (one works while the others wait), so it adds memory, not speed, for one sequence.

A rank reads and holds only its own layers' weights; the embedding, the final norm, the vocabulary
projection and the vision tower are on every rank (each rank computes the vision features, so the
DeepStack features reach the first layers wherever those live, with no transfer). Each layer's KV cache
stays on the rank of the layer; the caches of the layers held elsewhere only count the positions
(`count_positions`), which the positions of the next tokens are read from.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import QuantizedKVCache

from ..errors import Qwen3VLError
from ..language import TextModel, add_deepstack


class LayerElsewhere(nn.Module):
    """A decoder layer another rank holds: nothing here."""


def held_layers(layers: int, ranks: int, rank: int) -> range:
    """Rank `rank`'s consecutive layers: as equal shares as possible, the first ranks one more."""
    if layers < ranks:
        raise Qwen3VLError(f"pipeline: {layers} decoder layers cannot be spread over {ranks} ranks")
    share, extra = divmod(layers, ranks)
    start = rank * share + min(rank, extra)
    return range(start, start + share + (rank < extra))


class PipelineTextModel(TextModel):
    """The decoder of one pipeline stage: `held` (a range of layer indices) on this rank of `group`."""

    def __call__(self, inputs_embeds, positions, cache=None, visual_index=None, deepstack=None, outputs=None):
        """TextModel's contract (its arguments and docstring), a stage at a time."""
        group, held = self.group, self.held
        rank, ranks = group.rank(), group.size()
        h = inputs_embeds
        B, L, H = h.shape
        rope = self.rope.at(positions, L, h.dtype)
        cache = cache if cache is not None else [None] * len(self.layers)
        mask = create_attention_mask(h, cache[held.start])  # a cache of this rank's, before this input
        deepstack = deepstack or []
        trims = outputs is not None and (outputs == 0 or len(deepstack) < len(self.layers))
        trim_at = len(self.layers) - 1 if trims else -1
        if rank > 0:
            h = mx.distributed.recv_like(h, rank - 1, group=group)
        for j in held:
            trimmed = j == trim_at
            h = self.layers[j](h, rope, mask, cache[j], outputs if trimmed else None)
            if j < len(deepstack) and not trimmed:
                h = add_deepstack(h, visual_index, deepstack[j])
        for j, layer_cache in enumerate(cache):
            if j not in held and layer_cache is not None:
                count_positions(layer_cache, B, L, h.dtype)
        if rank < ranks - 1:
            h = mx.distributed.send(h, rank + 1, group=group)
        if outputs == 0:
            mx.eval(h)  # nothing reads a cache-only chunk's output: its send runs now
            return h[:, :0]
        kept = L if outputs is None else outputs
        # Every rank's last `kept` states (depending on its send, so that it runs first); the last
        # rank's are the model's.
        h = mx.distributed.all_gather(h[:, h.shape[1] - kept :], group=group)[(ranks - 1) * B :]
        return self.norm(h)


def count_positions(cache, batch: int, length: int, dtype: mx.Dtype) -> None:
    """`length` more positions in the cache of a layer held elsewhere. A plain or batched cache takes keys
    and values of no heads (nothing held), so that mlx-lm's own bookkeeping of positions and padding (the
    server's batch merges, filters and extracts rows) runs for it as for the layers held here; a quantized
    cache, which would pack what it takes, counts its offset (the server batches none: serving/batch.py)."""
    if isinstance(cache, QuantizedKVCache):
        cache.offset += length
    else:
        nothing = mx.zeros((batch, 0, length, 1), dtype=dtype)
        cache.update_and_fetch(nothing, nothing)


def keep_held_layers(model: nn.Module, group: mx.distributed.Group) -> None:
    """Drop the layers other ranks hold from a loaded, not yet evaluated model (their weights are then
    never read) and make its decoder a pipeline stage."""
    text = model.model.language_model
    held = held_layers(len(text.layers), group.size(), group.rank())
    for j in range(len(text.layers)):
        if j not in held:
            text.layers[j] = LayerElsewhere()
    text.__class__ = PipelineTextModel
    text.group, text.held = group, held
