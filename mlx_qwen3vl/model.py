"""The whole Qwen3-VL model: embed the prompt, put the vision features at their placeholder tokens, run
the decoder with 3-D positions, project to the vocabulary.

The forward contract follows transformers' argument names:
`model(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, cache)` -> logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import KVCache

from .config import ModelConfig
from .errors import Qwen3VLError
from .language import Positions, TextModel
from .positions import batch_rope_index
from .vision import VisionModel


class PromptCache(list):
    """One mlx-lm KVCache per decoder layer, plus the rope delta of the sequence(s) it holds.

    After a prompt with images or videos, token i of the continuation sits at MRoPE position
    `cache offset + i + rope_delta` on all three axes (SPEC §4.4); the delta belongs to the cached
    sequence, so it lives here rather than on the model. A list, so mlx-lm's cache helpers accept it."""

    def __init__(self, caches, rope_delta=0):
        super().__init__(caches)
        self.rope_delta = np.zeros(1, dtype=np.int64) + rope_delta  # one per batch row

    @property
    def offset(self) -> int:
        return self[0].offset


@dataclass
class PreparedInput:
    """A prompt ready for the decoder: embeddings with the vision features in place, absolute 3-D
    positions, the DeepStack features with the flat positions (in [B * L]) they are added at, and the rope
    delta the cache has once this input is in it."""

    embeddings: mx.array  # [B, L, H]
    positions: Positions  # [3, B, L] on the host, or the offset of text (language.Positions)
    rope_delta: np.ndarray  # [B]
    visual_index: np.ndarray | None = None
    deepstack: list[mx.array] | None = None

    @property
    def length(self) -> int:
        return self.embeddings.shape[1]

    def chunk(self, start: int, end: int) -> PreparedInput:
        """Positions [start, end) of a single sequence, for prefilling a long prompt piece by piece."""
        positions = self.positions
        positions = positions[:, :, start:end] if isinstance(positions, np.ndarray) else positions + start
        embeddings = self.embeddings[:, start:end]
        if self.visual_index is None:
            return PreparedInput(embeddings, positions, self.rope_delta)
        rows = np.flatnonzero((self.visual_index >= start) & (self.visual_index < end))
        if len(rows) == 0:
            return PreparedInput(embeddings, positions, self.rope_delta)
        take = mx.array(rows.astype(np.int32))
        visual_index, deepstack = self.visual_index[rows] - start, [level[take] for level in self.deepstack]
        return PreparedInput(embeddings, positions, self.rope_delta, visual_index, deepstack)


@dataclass
class VisionFeatures:
    """The encoder's output for a set of images or videos: merged features and DeepStack features, each
    [tokens, hidden], in placeholder order."""

    features: mx.array
    deepstack: list[mx.array]


class Qwen3VLModel(nn.Module):
    """The checkpoint's `model.` prefix: the vision tower and the decoder."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.visual = VisionModel(config.vision_config)
        self.language_model = TextModel(config.text_config)


class Model(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Qwen3VLModel(config)
        if not config.tie_word_embeddings:
            text = config.text_config
            self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)

    @property
    def layers(self):
        return self.model.language_model.layers

    def make_cache(self) -> PromptCache:
        return PromptCache([KVCache() for _ in self.layers])

    def encode_vision(self, pixel_values, grid_thw, progress=None) -> VisionFeatures:
        """Run the vision tower on images (or videos) and their grids (`progress`: VisionModel's)."""
        features, deepstack = self.model.visual(mx.array(pixel_values), grid_thw, progress)
        return VisionFeatures(features, deepstack)

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
        images = self.encode_vision(pixel_values, image_grid_thw) if pixel_values is not None else None
        videos = None
        if pixel_values_videos is not None:
            videos = self.encode_vision(pixel_values_videos, video_grid_thw)
        prepared = self.prepare(input_ids, images, image_grid_thw, videos, video_grid_thw, cache)
        return self.decode(prepared, cache)

    def prepare(
        self,
        input_ids,
        images: VisionFeatures | None = None,
        image_grid_thw=None,
        videos: VisionFeatures | None = None,
        video_grid_thw=None,
        cache: PromptCache | None = None,
    ) -> PreparedInput:
        """Embed a prompt (vision features already encoded) and give it absolute 3-D positions after
        what the cache holds. Reads the cache, never changes it: `decode` feeds the prompt (at once or in
        consecutive chunks) and with it sets the cache's rope delta."""
        if not isinstance(input_ids, mx.array):
            input_ids = mx.array(input_ids)
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        h = self.model.language_model.embed_tokens(input_ids)
        B, L, _ = h.shape
        offset = cache.offset if cache is not None else 0
        rope_delta = getattr(cache, "rope_delta", np.zeros(B, dtype=np.int64))
        if images is None and videos is None:
            # Text: every axis at the same position, consecutive from where the cache ends.
            if isinstance(offset, mx.array):  # a batch of sequences of their own lengths (BatchKVCache)
                return PreparedInput(h, offset + mx.array(rope_delta.astype(np.int32)), rope_delta)
            starts = offset + rope_delta
            start = int(starts[0]) if (starts == starts[0]).all() else mx.array(starts.astype(np.int32))
            return PreparedInput(h, start, rope_delta)
        if cache is not None and not isinstance(cache, PromptCache):
            raise Qwen3VLError("a prompt with images or videos needs a cache made by model.make_cache()")
        ids = np.array(input_ids)
        h, visual_index, deepstack = self._place_vision(h, ids, images, videos)
        positions, prompt_delta = batch_rope_index(
            ids,
            image_grid_thw if images is not None else None,
            video_grid_thw if videos is not None else None,
            image_token_id=self.config.image_token_id,
            video_token_id=self.config.video_token_id,
            spatial_merge_size=self.config.vision_config.spatial_merge_size,
        )
        positions = positions + offset + rope_delta[None, :, None]
        return PreparedInput(h, positions, rope_delta + prompt_delta, visual_index, deepstack)

    def decode(self, prepared: PreparedInput, cache: PromptCache | None = None, last_only: bool = False):
        """Run the decoder over a prepared prompt (or chunk), feeding it to the cache; logits for every
        position, or for the last one only (what generation needs: the vocabulary projection is the
        largest matmul)."""
        visual_index = None if prepared.visual_index is None else mx.array(prepared.visual_index)
        h = self.model.language_model(
            prepared.embeddings, prepared.positions, cache, visual_index, prepared.deepstack
        )
        if isinstance(cache, PromptCache):
            cache.rope_delta = prepared.rope_delta
        if last_only:
            h = h[:, -1:]
        if self.config.tie_word_embeddings:
            return self.model.language_model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def fuse_projections(self) -> None:
        """q/k/v and gate/up of every decoder layer as one matrix each, where the checkpoint allows."""
        self.model.language_model.fuse_projections()

    def _place_vision(self, h, ids: np.ndarray, images, videos):
        """Write vision features over their placeholder embeddings; return the flat placeholder positions
        and the DeepStack features in the same order (SPEC §4.1)."""
        B, L, H = h.shape
        flat = h.reshape(B * L, H)
        indices, deepstack_parts = [], []
        for kind, token_id, encoded in (
            ("image", self.config.image_token_id, images),
            ("video", self.config.video_token_id, videos),
        ):
            if encoded is None:
                continue
            index = np.flatnonzero(ids.reshape(-1) == token_id)
            if len(index) != encoded.features.shape[0]:
                raise Qwen3VLError(
                    f"the prompt has {len(index)} {kind} tokens but the {kind}s give "
                    f"{encoded.features.shape[0]} features; expand each placeholder to its token count"
                )
            flat[mx.array(index.astype(np.int32))] = encoded.features.astype(h.dtype)
            indices.append(index.astype(np.int32))
            deepstack_parts.append(encoded.deepstack)
        visual_index = np.concatenate(indices)
        deepstack = [
            mx.concatenate(level) if len(level) > 1 else level[0]
            for level in zip(*deepstack_parts, strict=True)
        ]
        return flat.reshape(B, L, H), visual_index, deepstack

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map a checkpoint's tensors to this module tree. Reads transformers' published layout (which this
        package's converter keeps) and mlx-vlm's, used by the MLX community's Qwen3-VL conversions (SPEC §2).
        Quantized tensors (`.scales`, `.biases`) follow their weight's name."""
        mlx_vlm = any(k.startswith(tuple(MLX_VLM_PREFIXES)) for k in weights)
        if mlx_vlm:
            weights = {_rename_mlx_vlm(k): v for k, v in weights.items()}
        if self.config.tie_word_embeddings:
            # transformers omits lm_head; if present it equals the embedding (quantized: with its scales).
            weights = {k: v for k, v in weights.items() if not k.startswith("lm_head.")}
        prefix = "model.visual."
        vision = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        weights = {k: v for k, v in weights.items() if not k.startswith(prefix)}
        vision = VisionModel.sanitize(vision, channels_last=mlx_vlm)
        weights.update({prefix + k: v for k, v in vision.items()})
        return weights


# mlx-vlm's module tree puts the decoder under `language_model.model` and the lm_head beside it.
MLX_VLM_PREFIXES = {
    "vision_tower.": "model.visual.",
    "language_model.model.": "model.language_model.",
    "language_model.lm_head.": "lm_head.",
}


def _rename_mlx_vlm(key: str) -> str:
    for theirs, ours in MLX_VLM_PREFIXES.items():
        if key.startswith(theirs):
            return ours + key[len(theirs) :]
    return key
