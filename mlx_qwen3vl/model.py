"""The whole Qwen3-VL model: embed the prompt, put the vision features at their placeholder tokens, run
the decoder with 3-D positions, project to the vocabulary.

The forward contract follows transformers' argument names:
`model(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, cache)` -> logits.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import KVCache, QuantizedKVCache

from .config import ModelConfig
from .errors import Qwen3VLError
from .language import Positions, TextModel
from .media import MediaItem
from .options import KVCacheOptions
from .positions import batch_rope_index
from .vision import VisionLayout, VisionModel

# The share of MLX's memory limit (`mx.get_memory_limit()`: on a Mac, from the GPU's working set; on other
# machines, from their memory) the vision tower's activations may take by default: a long video is encoded
# in pieces that fit it, leaving the rest to the weights, the features and the KV cache.
VISION_MEMORY_SHARE = 1 / 8


class PromptCache(list):
    """One mlx-lm KVCache per decoder layer, plus the rope delta of the sequence(s) it holds.

    After a prompt with images or videos, token i of the continuation sits at MRoPE position
    `cache offset + i + rope_delta` on all three axes (docs/reference.md §4.4); the delta belongs to the
    cached sequence, so it lives here rather than on the model. A list, so mlx-lm's cache helpers accept
    it."""

    def __init__(self, caches, rope_delta=0):
        super().__init__(caches)
        self.rope_delta = np.zeros(1, dtype=np.int64) + rope_delta  # one per batch row

    @property
    def offset(self) -> int:
        return self[0].offset


@dataclass
class PlacedFeatures:
    """Vision features and the flat prompt positions (in [B * L]) they take, row for row: the merged
    features replace the placeholder embeddings there, DeepStack level j is added to the output of decoder
    layer j (docs/reference.md §4.1, §4.5)."""

    index: np.ndarray  # [n] int32
    features: mx.array  # [n, hidden]
    deepstack: list[mx.array]  # [n, hidden] each

    def within(self, start: int, end: int) -> PlacedFeatures | None:
        """The rows placed in positions [start, end), at positions relative to `start` (None if none)."""
        rows = np.flatnonzero((self.index >= start) & (self.index < end))
        if len(rows) == 0:
            return None
        take = mx.array(rows.astype(np.int32))
        deepstack = [level[take] for level in self.deepstack]
        return PlacedFeatures(self.index[rows] - start, self.features[take], deepstack)


@dataclass
class PreparedInput:
    """A prompt ready for the decoder: its token ids, absolute 3-D positions, the vision features with the
    positions they take, and the rope delta the cache has once this input is in it. The embeddings are
    made by `Model.decode` for what it is given, a chunk at a time when prefilling: beyond the features
    and the KV cache, nothing the size of the whole prompt is ever held."""

    input_ids: mx.array  # [B, L]
    positions: Positions  # [3, B, L] on the host, or the offset of text (language.Positions)
    rope_delta: np.ndarray  # [B]
    vision: list[PlacedFeatures] = field(default_factory=list)  # the images', then the videos'

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    def chunk(self, start: int, end: int) -> PreparedInput:
        """Positions [start, end) of a single sequence, for prefilling a long prompt piece by piece."""
        positions = self.positions
        positions = positions[:, :, start:end] if isinstance(positions, np.ndarray) else positions + start
        vision = [placed for part in self.vision if (placed := part.within(start, end)) is not None]
        return PreparedInput(self.input_ids[:, start:end], positions, self.rope_delta, vision)


@dataclass
class VisionFeatures:
    """The encoder's output for a set of images or of videos (`kind`): merged features and DeepStack
    features, each [tokens, hidden], in placeholder order, and the grids (t, h, w) they came from, which
    give the prompt's positions."""

    features: mx.array
    deepstack: list[mx.array]
    grid_thw: np.ndarray  # [n, 3]
    kind: str = "image"


def _joined_levels(parts: list[list[mx.array]]) -> list[mx.array]:
    """Per-piece outputs [[features, *deepstack], ...] joined into one array per level, a level at a time,
    each piece's arrays released once joined: the join holds at most one level twice, not all."""
    levels = [list(level) for level in zip(*parts, strict=True)]
    parts.clear()
    joined = []
    for level in levels:
        joined.append(mx.concatenate(level))
        mx.eval(joined[-1])
        level.clear()
    return joined


class Qwen3VLModel(nn.Module):
    """The checkpoint's `model.` prefix: the vision tower and the decoder."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.visual = VisionModel(config.vision_config)
        self.language_model = TextModel(config.text_config)


# What a checkpoint is used for (docs/embeddings.md): "generate" answers (the chat models), "embed" gives
# one vector per input (Qwen3-VL-Embedding: no vocabulary projection), "rerank" scores a query and a
# document (Qwen3-VL-Reranker: two rows of the vocabulary projection, `keep_score_rows`).
TASKS = ("generate", "embed", "rerank")


class Model(nn.Module):
    def __init__(self, config: ModelConfig, task: str = "generate", score_token_ids: tuple[int, ...] = ()):
        super().__init__()
        self.config = config
        self.task = task
        self.score_token_ids = tuple(score_token_ids)
        self.model = Qwen3VLModel(config)
        # Bytes the vision tower's activations may take at once (`vision_pieces`); None: a share of MLX's
        # memory limit (VISION_MEMORY_SHARE). `load(vision_budget=...)` sets it.
        self.vision_budget: int | None = None
        text = config.text_config
        if task == "rerank":
            # The vocabulary projection's rows of the tokens the reranker reads ("yes", "no"), in float:
            # only their logits make its score, and the whole projection of an untied model is a tenth of
            # its weights (`sanitize` takes the rows from lm_head, or from the embedding when tied).
            self.score_rows = mx.zeros((len(self.score_token_ids), text.hidden_size))
        elif not config.tie_word_embeddings and task == "generate":
            self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)

    @property
    def layers(self):
        return self.model.language_model.layers

    def make_cache(self, kv: KVCacheOptions | None = None) -> PromptCache:
        """An empty cache; with `kv.bits`, mlx-lm's QuantizedKVCache, which quantizes each token's keys and
        values as they are written (its attention reads them quantized: `scaled_dot_product_attention`)."""
        if kv is None or kv.bits is None:
            return PromptCache([KVCache() for _ in self.layers])
        head_dim = self.config.text_config.head_dim
        if head_dim % kv.group_size:
            raise Qwen3VLError(f"kv_group_size={kv.group_size} does not divide the head size {head_dim}")
        return PromptCache([QuantizedKVCache(kv.group_size, kv.bits) for _ in self.layers])

    def vision_pieces(self, grid_thw) -> list[tuple[int, int, VisionLayout]]:
        """The pieces `encode_vision` encodes one at a time for these grids: as many whole images and
        temporal groups as `vision_budget` bytes of the tower's activations hold (VisionLayout.split)."""
        visual = self.model.visual
        budget = self.vision_budget or mx.get_memory_limit() * VISION_MEMORY_SHARE
        max_patches = int(budget // visual.activation_bytes_per_patch(visual.patch_embed.proj.weight.dtype))
        return VisionLayout.from_grid_thw(grid_thw).split(max_patches)

    def encode_vision(self, pixel_values, grid_thw, progress=None, kind: str = "image") -> VisionFeatures:
        """Run the vision tower on images (or videos) and their grids, in `vision_pieces`; where there are
        several, each is evaluated a block at a time before the next starts, so the tower's memory is that
        of one piece however many frames a video has. The results are those of one pass, bit for bit.
        `progress(done, total)` sees the blocks done over all pieces."""
        pieces = self.vision_pieces(grid_thw)
        visual = self.model.visual
        grid_thw = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
        if len(pieces) == 1:
            features, deepstack = visual(mx.array(pixel_values), grid_thw, progress)
            return VisionFeatures(features, deepstack, grid_thw, kind)
        blocks = len(visual.blocks)
        parts = []
        for n, (start, end, piece) in enumerate(pieces):

            def report(done: int, _, before=n * blocks):
                if progress:
                    progress(before + done, len(pieces) * blocks)

            # Pixel rows go to MLX a piece at a time, too.
            features, deepstack = visual(mx.array(pixel_values[start:end]), piece.grids, report)
            mx.eval(features, deepstack)
            parts.append([features, *deepstack])
        features, *deepstack = _joined_levels(parts)
        return VisionFeatures(features, deepstack, grid_thw, kind)

    def encode_media(self, media: list[MediaItem], progress=None) -> list[VisionFeatures]:
        """Run the vision tower over all images and over all videos of a prompt (each kind in one call of
        `encode_vision`, in pieces that fit the vision budget). The features are evaluated here and the
        tower's freed activations returned to the system, so the decoder's prefill does not hold them too.
        `progress(done, total)` sees each block of each piece, over both kinds."""
        present = []
        for kind in ("image", "video"):
            # Each kind's rows in one array, in prompt order (a single item's as they are: a long video's
            # are large). Stacked here, not by a helper below, so a prompt's media go down one way.
            items = [m for m in media if m.kind == kind]
            if items:
                rows = [m.pixel_values for m in items]
                grids = np.array([m.grid_thw for m in items], dtype=np.int64)
                present.append((kind, rows[0] if len(rows) == 1 else np.concatenate(rows), grids))
        blocks = len(self.model.visual.blocks)
        steps = [len(self.vision_pieces(grids)) * blocks for _, _, grids in present]
        before = np.cumsum([0, *steps])
        encoded = []
        for n, (kind, pixels, grids) in enumerate(present):

            def report(done: int, _, n=n):
                progress(int(before[n]) + done, int(before[-1]))

            encoded.append(self.encode_vision(pixels, grids, report if progress else None, kind))
        if encoded:
            mx.eval([(e.features, e.deepstack) for e in encoded])
            mx.clear_cache()
        return encoded

    def __call__(
        self,
        input_ids,
        pixel_values=None,
        image_grid_thw=None,
        pixel_values_videos=None,
        video_grid_thw=None,
        cache: PromptCache | None = None,
    ) -> mx.array:
        """Logits [B, L, vocab] for input_ids [B, L] (or [L]). With a cache, the call continues the
        cached sequence: pass the next token(s) and the same cache (one call per decode step)."""
        vision = []
        if pixel_values is not None:
            vision.append(self.encode_vision(pixel_values, image_grid_thw, None, "image"))
        if pixel_values_videos is not None:
            vision.append(self.encode_vision(pixel_values_videos, video_grid_thw, None, "video"))
        return self.decode(self.prepare(input_ids, vision, cache), cache)

    def prepare(
        self, input_ids, vision: list[VisionFeatures] = (), cache: PromptCache | None = None
    ) -> PreparedInput:
        """Give a prompt (vision features already encoded) absolute 3-D positions after what the cache
        holds, and its vision features the positions of their placeholders. Reads the cache, never changes
        it: `decode` embeds and feeds the prompt (at once or in consecutive chunks) and with it sets the
        cache's rope delta."""
        if not isinstance(input_ids, mx.array):
            input_ids = mx.array(input_ids)
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        B = input_ids.shape[0]
        offset = cache.offset if cache is not None else 0
        rope_delta = getattr(cache, "rope_delta", np.zeros(B, dtype=np.int64))
        if not vision:
            # Text: every axis at the same position, consecutive from where the cache ends.
            if isinstance(offset, mx.array):  # a batch of sequences of their own lengths (BatchKVCache)
                return PreparedInput(input_ids, offset + mx.array(rope_delta.astype(np.int32)), rope_delta)
            starts = offset + rope_delta
            start = int(starts[0]) if (starts == starts[0]).all() else mx.array(starts.astype(np.int32))
            return PreparedInput(input_ids, start, rope_delta)
        if cache is not None and not isinstance(cache, PromptCache):
            raise Qwen3VLError("a prompt with images or videos needs a cache made by model.make_cache()")
        ids = np.array(input_ids)
        placed = self._place_vision(ids, vision)
        grids = {encoded.kind: encoded.grid_thw for encoded in vision}
        positions, prompt_delta = batch_rope_index(
            ids,
            grids.get("image"),
            grids.get("video"),
            image_token_id=self.config.image_token_id,
            video_token_id=self.config.video_token_id,
            spatial_merge_size=self.config.vision_config.spatial_merge_size,
        )
        positions = positions + offset + rope_delta[None, :, None]
        return PreparedInput(input_ids, positions, rope_delta + prompt_delta, placed)

    def decode(self, prepared: PreparedInput, cache: PromptCache | None = None, outputs: int | None = None):
        """Run the decoder over a prepared prompt (or chunk), feeding it to the cache; logits for every
        position, or for the last `outputs` only: generation needs the last one's, and none for a prompt
        chunk before the last (None returned), so that the last layer and the vocabulary projection (the
        largest matmul) are computed for those alone."""
        if self.task != "generate":  # every answering front end comes here; the vocabulary projection is gone
            use = "embed()" if self.task == "embed" else "rerank()"
            raise Qwen3VLError(f"this model was loaded for task={self.task!r} and does not answer: use {use}")
        h = self.hidden_states(prepared, cache, outputs)
        return None if outputs == 0 else self.head(h)

    def hidden_states(
        self, prepared: PreparedInput, cache: PromptCache | None = None, outputs: int | None = None
    ) -> mx.array:
        """`decode` before the vocabulary projection: the decoder's final (normed) hidden states, what the
        embedding and reranker models pool (retrieval.py), and what a caller wanting some positions'
        logits (the quantization check) projects itself."""
        h, visual_index, deepstack = self._embed(prepared)
        h = self.model.language_model(h, prepared.positions, cache, visual_index, deepstack, outputs)
        if isinstance(cache, PromptCache):
            cache.rope_delta = prepared.rope_delta
        return h

    def layer_by_layer(self, prepared: PreparedInput) -> Iterator[mx.array]:
        """`hidden_states` of a prepared input without a cache, a decoder layer per step
        (`TextModel.layer_by_layer`): each layer's output, then the final hidden states."""
        h, visual_index, deepstack = self._embed(prepared)
        return self.model.language_model.layer_by_layer(h, prepared.positions, visual_index, deepstack)

    def head(self, h: mx.array) -> mx.array:
        """Logits from final hidden states: the lm_head, or the embedding's transpose where tied (a
        distributed model's head is its own module, tied or not)."""
        if "lm_head" not in self:
            return self.model.language_model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def fuse_projections(self) -> None:
        """q/k/v and gate/up of every decoder layer as one matrix each, where the checkpoint allows."""
        self.model.language_model.fuse_projections()

    def _place_vision(self, ids: np.ndarray, vision: list[VisionFeatures]) -> list[PlacedFeatures]:
        """Each kind's features with the flat positions of its placeholder tokens (docs/reference.md §4.1)."""
        token_ids = {"image": self.config.image_token_id, "video": self.config.video_token_id}
        placed = []
        for encoded in sorted(vision, key=lambda e: e.kind != "image"):  # the images', then the videos'
            kind, token_id = encoded.kind, token_ids[encoded.kind]
            index = np.flatnonzero(ids.reshape(-1) == token_id)
            if len(index) != encoded.features.shape[0]:
                raise Qwen3VLError(
                    f"the prompt has {len(index)} {kind} tokens but the {kind}s give "
                    f"{encoded.features.shape[0]} features; expand each placeholder to its token count"
                )
            placed.append(PlacedFeatures(index.astype(np.int32), encoded.features, encoded.deepstack))
        return placed

    def _embed(self, prepared: PreparedInput):
        """The token embeddings of a prepared input with its vision features written over their
        placeholders, and the flat positions and DeepStack features the decoder adds, in one order."""
        h = self.model.language_model.embed_tokens(prepared.input_ids)
        if not prepared.vision:
            return h, None, None
        B, L, H = h.shape
        flat = h.reshape(B * L, H)
        for part in prepared.vision:
            flat[mx.array(part.index)] = part.features.astype(h.dtype)
        parts = prepared.vision
        visual_index = mx.array(np.concatenate([part.index for part in parts]))
        levels = zip(*(part.deepstack for part in parts), strict=True)
        deepstack = [mx.concatenate(level) if len(parts) > 1 else level[0] for level in levels]
        return flat.reshape(B, L, H), visual_index, deepstack

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map a checkpoint's tensors to this module tree. Reads transformers' published layout (which this
        package's converter keeps) and mlx-vlm's, used by the MLX community's Qwen3-VL conversions
        (docs/reference.md §2). Quantized tensors (`.scales`, `.biases`) follow their weight's name."""
        mlx_vlm = any(k.startswith(tuple(MLX_VLM_PREFIXES)) for k in weights)
        if mlx_vlm:
            weights = {rename_mlx_vlm_key(k): v for k, v in weights.items()}
        if self.task == "rerank" and "score_rows" not in weights:
            weights["score_rows"] = self._score_rows(weights)
        if self.config.tie_word_embeddings or self.task != "generate":
            # transformers omits lm_head when tied; if present it equals the embedding (quantized: with its
            # scales). The embedding and reranker models never project to the whole vocabulary.
            weights = {k: v for k, v in weights.items() if not k.startswith("lm_head.")}
        weights = _sanitized_part(
            weights, "model.visual.", partial(VisionModel.sanitize, channels_last=mlx_vlm)
        )
        return _sanitized_part(weights, "model.language_model.", self.model.language_model.sanitize)

    def _score_rows(self, weights: dict[str, mx.array]) -> mx.array:
        """The rows of `score_token_ids` of the checkpoint's vocabulary projection (lm_head, or the tied
        embedding), dequantized when stored quantized (bits and group size from the packed shapes)."""
        tied = self.config.tie_word_embeddings or "lm_head.weight" not in weights
        name = "model.language_model.embed_tokens" if tied else "lm_head"
        rows = mx.array(self.score_token_ids)
        weight = weights[f"{name}.weight"][rows]
        scales = weights.get(f"{name}.scales")
        if scales is None:
            return weight.astype(mx.float32)
        hidden = self.config.text_config.hidden_size
        bits = weight.shape[-1] * 32 // hidden
        biases = weights.get(f"{name}.biases")
        return mx.dequantize(
            weight, scales[rows], None if biases is None else biases[rows], hidden // scales.shape[-1], bits
        ).astype(mx.float32)


def _sanitized_part(weights: dict[str, mx.array], prefix: str, sanitize) -> dict[str, mx.array]:
    """The weights with those under `prefix` passed, relative to it, through the owning module's sanitize."""
    part = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
    weights = {k: v for k, v in weights.items() if not k.startswith(prefix)}
    weights.update({prefix + k: v for k, v in sanitize(part).items()})
    return weights


# mlx-vlm's module tree puts the decoder under `language_model.model` and the lm_head beside it.
MLX_VLM_PREFIXES = {
    "vision_tower.": "model.visual.",
    "language_model.model.": "model.language_model.",
    "language_model.lm_head.": "lm_head.",
}


def rename_mlx_vlm_key(key: str) -> str:
    for theirs, ours in MLX_VLM_PREFIXES.items():
        if key.startswith(theirs):
            return ours + key[len(theirs) :]
    return key
