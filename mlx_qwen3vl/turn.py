"""A turn: one request to the model, built once and then only read.

It is made from chat messages (or a string with images and videos) and the generation options, and holds
all that the steps from prompt to answer need: the prompt's token ids with each placeholder expanded, the
images and videos in prompt order, where each one's tokens lie, what each position is for a prefix cache
(its key), the rope delta at any position, the sampler and the answer's reader. Every front end builds a
turn (`stream_generate`, `ChatSession.ask`, the server's engine) and `generation.run_turn`, or the server's
batch, runs it; none of them assembles these steps itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import mlx.core as mx
import numpy as np

from .answer import AnswerText
from .errors import Qwen3VLError
from .media import MediaItem
from .messages import collect_media, media_arguments, normalize_messages
from .options import GenerationOptions, SamplingOptions
from .positions import rope_index
from .processor import Processor
from .sampling import TokenSampler, token_sampler

# What a prompt position is, for a prefix cache: its token id, and for the pad tokens of an image or video
# the item's digest too (every image's pads have the same id, so the id alone cannot tell two apart).
Key = tuple[int, str | None]


@dataclass
class Turn:
    """A prompt and how to answer it. `ids`: the whole prompt's token ids (what a cache already holds
    included); `media`: every image and video in it, in prompt order (those whose features a cache holds
    may be `spent`, without pixel rows); `options`: as checked; `sampling`: the options' sampling with
    the unset values from the model's generation_config.json."""

    processor: Processor
    ids: list[int]
    media: list[MediaItem] = field(default_factory=list)
    options: GenerationOptions = field(default_factory=GenerationOptions)
    sampling: SamplingOptions = field(init=False)

    def __post_init__(self):
        self.sampling = self.options.sampling.with_defaults(self.processor.generation_config)
        self._check_context()

    @classmethod
    def from_prompt(
        cls,
        processor: Processor,
        prompt,
        images=None,
        videos=None,
        options: GenerationOptions | None = None,
        reading=None,
        **media_options,
    ) -> Turn:
        """From chat messages or a string, with `images` / `videos` for the parts that name no source,
        `media_options` (min_pixels, fps, ...) for every image or video whose part sets none.
        `reading(done, total)` sees each kept frame of a video file as it is read."""
        options = options or GenerationOptions()
        images, videos = media_arguments(images, videos)
        messages = normalize_messages(prompt, images, videos)
        media = processor.read_all(collect_media(messages, images, videos), media_options, reading)
        return cls.from_messages(processor, messages, media, options)

    @classmethod
    def from_messages(
        cls, processor: Processor, messages: list[dict], media: list[MediaItem], options: GenerationOptions
    ) -> Turn:
        """From checked messages whose images and videos are already read (`media`, in their order)."""
        template = {"tools": options.tools} if options.tools else {}
        text = processor.render(messages, add_generation_prompt=True, **template)
        return cls(processor, processor.tokenize(text, media), media, options)

    def _check_context(self) -> None:
        """Refuse, before any work, a prompt whose tokens plus max_tokens would pass the model's context
        (`TextConfig.context_length`: extended by YaRN where config.json sets it up). Tokens, not rope
        positions, are counted: an image takes fewer positions than tokens, and the KV cache holds
        tokens."""
        limit = self.processor.config.text_config.context_length
        if len(self.ids) + self.options.max_tokens > limit:
            raise Qwen3VLError(
                f"the prompt ({len(self.ids)} tokens) plus max_tokens ({self.options.max_tokens}) exceeds "
                f"the model's context of {limit} tokens; shorten the input or start a new conversation"
            )

    # ---- the prompt's layout ----

    @cached_property
    def spans(self) -> list[tuple[int, int]]:
        """Each image's and video's stretch of the prompt, [its first <|vision_start|>, after its last
        <|vision_end|>): a cache may hold all of it or none of it."""
        config = self.processor.config
        ids = np.asarray(self.ids)
        pad = np.isin(ids, (config.image_token_id, config.video_token_id))
        before = np.concatenate([[False], pad[:-1] & (ids[1:] == ids[:-1])])  # a pad after the same pad
        after = np.concatenate([pad[1:] & (ids[1:] == ids[:-1]), [False]])
        starts = np.flatnonzero(pad & ~before) - 1  # each run of pads from its <|vision_start|>
        ends = np.flatnonzero(pad & ~after) + 2  # through its <|vision_end|>
        spans, run = [], 0
        for item in self.media:  # a video has a run per temporal group
            spans.append((int(starts[run]), int(ends[run + item.groups - 1])))
            run += item.groups
        return spans

    @cached_property
    def keys(self) -> list[Key]:
        """Each position's key: its token id, with the item's digest for an image's or video's pads."""
        keys: list[Key] = [(token, None) for token in self.ids]
        config = self.processor.config
        pads = (config.image_token_id, config.video_token_id)
        for item, (start, end) in zip(self.media, self.spans, strict=True):
            for i in range(start, end):
                if self.ids[i] in pads:
                    keys[i] = (self.ids[i], item.digest)
        return keys

    @cached_property
    def _rope_deltas(self) -> np.ndarray:
        """The rope delta at each position (its MRoPE position less its index), and after the prompt."""
        if not self.media:
            return np.zeros(len(self.ids) + 1, dtype=np.int64)
        config = self.processor.config
        grids = {
            kind: [m.grid_thw for m in self.media if m.kind == kind] or None for kind in ("image", "video")
        }
        positions, delta = rope_index(
            self.ids,
            grids["image"],
            grids["video"],
            image_token_id=config.image_token_id,
            video_token_id=config.video_token_id,
            spatial_merge_size=config.vision_config.spatial_merge_size,
        )
        return np.append(positions[0] - np.arange(len(self.ids)), delta)

    def rope_delta_at(self, position: int) -> int:
        """The rope delta a cache holding the prompt's first `position` tokens continues with (outside
        any image or video; from the end of the prompt on, the prompt's own)."""
        return int(self._rope_deltas[min(position, len(self.ids))])

    def media_from(self, position: int) -> list[MediaItem]:
        """The images and videos whose tokens begin at or after `position`."""
        return [item for item, (start, _) in zip(self.media, self.spans, strict=True) if start >= position]

    # ---- the answer ----

    @property
    def reasoning(self) -> bool:
        """The prompt leaves the model inside a reasoning block (a Thinking model's template)."""
        return self.processor.thinks

    def sampler(self) -> TokenSampler:
        """A fresh sampler for this turn's answer: its options' sampler and logits processors, the JSON
        schema's constraint, log-probabilities when asked for."""
        options, tokenizer = self.options, self.processor.tokenizer
        constraint = None
        if options.grammar is not None:
            from .structured import JsonConstraint

            vocab = self.processor.config.text_config.vocab_size
            constraint = JsonConstraint(options.grammar, tokenizer, vocab)
        return token_sampler(self.sampling, mx.array(self.ids), constraint, options.logprobs)

    def answer_text(self) -> AnswerText:
        """A fresh reader of this turn's answer tokens: text, stop strings, reasoning, tool calls."""
        options, tokenizer = self.options, self.processor.tokenizer
        return AnswerText(
            tokenizer,
            options.stop,
            set(tokenizer.eos_token_ids),
            options.max_tokens,
            options.logprobs,
            self.reasoning,
            options.tools,
        )
