"""A conversation that keeps its KV cache: each turn prefills only its new tokens, and images and videos
of earlier turns are never encoded again (their features already live in the cache).

The cache holds what the template rendered and what the model answered. Each turn renders the whole
conversation again, as the reference does, and continues the cache from where the two part: usually its
end; for a Thinking model, the start of the last answer, since the template drops the reasoning of answers
before the last question; or where a stop string or a tool call's rendering differs from what the model
wrote. What comes after that point is fed again as the template renders it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field

from .errors import Qwen3VLError
from .generation import GenerationResponse, run_turn
from .media import MediaItem
from .messages import collect_media, media_arguments, normalize_messages, template_messages
from .model import Model
from .options import (
    DEFAULT_KV_GROUP_SIZE,
    DEFAULT_MAX_TOKENS,
    GenerationOptions,
    KVCacheOptions,
    SamplingOptions,
    check_max_tokens,
)
from .prefix_cache import PrefixCache
from .processor import Processor
from .progress import reading
from .tools import tool_names
from .turn import Turn

TURN_ROLES = ("user", "tool")
VISION_START = "<|vision_start|>"  # the first token of every image or video in the prompt


@dataclass
class Segment:
    """A stretch of the cache: its text (as the template writes it, one placeholder per image or video)
    and its token ids; `rendered` by the template, or else answered by the model; the images and videos
    in it (spent: their features are in the cache)."""

    text: str
    ids: list[int]
    rendered: bool
    media: list[MediaItem] = field(default_factory=list)


class ChatSession:
    """`for r in session.ask("What is in this picture?", images=["cat.jpg"]): print(r.text, end="")`

    Fields: `messages` (the conversation so far, media parts without their pixels; an answer's reasoning
    under `reasoning_content` and its calls under `tool_calls`, as the template reads them), `cache` (holds
    exactly the tokens of `tokens`), `last` (the final response of the last answer, with its statistics),
    `prefilled` (how many tokens the last turn had to prefill). `tools`: function definitions offered to
    the model for the whole conversation; answer a call by passing `{"role": "tool", "content": ...}`
    messages to `ask`. `kv_bits` (8 or 4) and `kv_group_size`: the cache holds keys and values quantized
    (`stream_generate`), for the whole conversation."""

    def __init__(
        self,
        model: Model,
        processor: Processor,
        system: str | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        prefill_step_size: int | None = None,
        tools: list | None = None,
        kv_bits: int | None = None,
        kv_group_size: int = DEFAULT_KV_GROUP_SIZE,
        **sampling,
    ):
        self.model, self.processor = model, processor
        self.kv_cache = KVCacheOptions(kv_bits, kv_group_size)
        self.system = system
        self.max_tokens = check_max_tokens(max_tokens)
        self.prefill_step_size = prefill_step_size
        if tools:
            tool_names(tools)
        self.tools = tools or None
        self.sampling = SamplingOptions(**sampling)
        self.clear()

    def clear(self) -> None:
        """Forget the conversation and its cache (the system prompt and the tools stay)."""
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.cache = PrefixCache(self.model, self.kv_cache)
        self.segments: list[Segment] = []
        self.last: GenerationResponse | None = None
        self.prefilled = 0

    @property
    def tokens(self) -> list[int]:
        """The token ids the cache holds."""
        return [i for segment in self.segments for i in segment.ids]

    def set_system(self, text: str | None) -> None:
        """A new system prompt starts a new conversation."""
        self.system = text or None
        self.clear()

    def ask(
        self,
        content,
        images=None,
        videos=None,
        max_tokens: int | None = None,
        stop=None,
        progress=None,
        logprobs: int | None = None,
        **options,
    ) -> Iterator[GenerationResponse]:
        """Add a turn and stream the answer: a user turn (text or a list of content parts, plus `images` /
        `videos`), or messages (a list of `{"role": "user" or "tool", "content": ...}`, e.g. the results of
        the calls the last answer made). Options: sampling (temperature, top_p, ...) and media
        (min_pixels, fps, ...) settings. `progress(progress.Progress)`: what each image or video became,
        then the vision tower's blocks and the prompt's chunks as they are done. `logprobs`: as
        `stream_generate`'s."""
        sampling_names = SamplingOptions.names()
        sampling = {k: v for k, v in options.items() if k in sampling_names}
        media_options = {k: v for k, v in options.items() if k not in sampling_names}
        values = {k: getattr(self.sampling, k) for k in sampling_names} | sampling
        generation = GenerationOptions(
            self.max_tokens if max_tokens is None else max_tokens,
            SamplingOptions(**values),
            stop,
            logprobs,
            self.tools,
        )

        images, videos = media_arguments(images, videos)
        added = self._turn(content, images, videos)
        sources = collect_media(added, images, videos)
        messages = self.messages + template_messages(added)  # the pixels live in the cache
        full = self.processor.render(messages, add_generation_prompt=True, tools=self.tools)
        kept_text, kept = self._common_part(full)
        media = self.processor.read_all(sources, media_options, reading(progress))
        new_text = full[kept_text:]
        new_ids = self.processor.tokenize(new_text, media)
        earlier = [item for segment in kept for item in segment.media]
        turn = Turn(self.processor, [i for s in kept for i in s.ids] + new_ids, earlier + media, generation)

        previous, self.messages = self.messages, messages
        answer: list[GenerationResponse] = []
        run = run_turn(
            self.model, turn, self.cache, progress=progress, prefill_step_size=self.prefill_step_size
        )
        try:
            with closing(run):
                for response in run:
                    if not answer:
                        self.prefilled = response.prompt_tokens
                    answer.append(response)
                    if response.finish_reason:
                        self.last = response
                    yield response
        finally:
            self.cache.keep()
            start = len(turn.ids) - len(new_ids)
            if self.cache.offset >= len(turn.ids):  # the prompt got in: the turn and its answer so far
                spent = [item.spent() for item in media]
                self.segments = kept + [Segment(new_text, new_ids, rendered=True, media=spent)]
                fed = [r.token for r in answer][: self.cache.offset - len(turn.ids)]
                self.segments.append(Segment(self.processor.tokenizer.decode(fed), fed, rendered=False))
                if self.messages is messages:
                    self.messages = messages + [self._answer_message(answer)]
            else:  # interrupted or failed before the prompt got in: the turn is undone
                self.cache.trim(turn, min(start, self.cache.offset))
                self.segments, self.messages = kept, previous

    def _turn(self, content, images, videos) -> list[dict]:
        """The messages a turn adds, checked."""
        messages = isinstance(content, list) and all(isinstance(m, dict) and "role" in m for m in content)
        if messages and content:
            turn = normalize_messages(content, before=self.messages)
            if any(m["role"] not in TURN_ROLES for m in turn):
                raise Qwen3VLError("a turn adds user or tool messages; the answers are the model's")
            return turn
        if isinstance(content, list):
            content = [{"role": "user", "content": content}]  # content parts of one user turn
        return normalize_messages(content, images, videos)[:1]

    def _answer_message(self, answer: list[GenerationResponse]) -> dict:
        """The answer as the template reads an assistant message."""
        message = {"role": "assistant", "content": "".join(r.text for r in answer)}
        if self.processor.thinks:
            message["reasoning_content"] = "".join(r.reasoning for r in answer)
        calls = [c.message_entry() for r in answer for c in r.tool_calls]
        if calls:
            message["tool_calls"] = calls
        return message

    def _common_part(self, full: str) -> tuple[int, list[Segment]]:
        """How much of the cache the new rendering `full` keeps: the length of its text, and the segments
        kept (the last one perhaps cut short)."""
        chars = 0
        for index, segment in enumerate(self.segments):
            if full.startswith(segment.text, chars):
                chars += len(segment.text)
                continue
            same = len(os.path.commonprefix([segment.text, full[chars : chars + len(segment.text)]]))
            find = self._kept_of_rendered if segment.rendered else self._kept_of_answer
            length, count = find(segment, same)
            # A cut rendered stretch keeps its media (the rest it drops is text); the pixels of media
            # dropped whole are gone.
            if any(s.media for s in self.segments[index + 1 :]) or (segment.media and not count):
                raise Qwen3VLError(
                    "this turn changes an earlier part of the conversation that holds an image or video; "
                    "start a new conversation"
                )
            part = Segment(segment.text[:length], segment.ids[:count], segment.rendered, segment.media)
            return chars + length, self.segments[:index] + ([part] if count else [])
        return chars, list(self.segments)

    def _kept_of_answer(self, segment: Segment, same: int) -> tuple[int, int]:
        """The most of the answer's own tokens whose text is within its first `same` characters: (length
        of that text, tokens)."""
        decode = self.processor.tokenizer.decode
        low, high = 0, len(segment.ids)
        while low < high:  # the most tokens whose text is no longer than `same`
            middle = (low + high + 1) // 2
            low, high = (middle, high) if len(decode(segment.ids[:middle])) <= same else (low, middle - 1)
        for count in range(low, 0, -1):
            text = decode(segment.ids[:count])
            if segment.text.startswith(text):
                return len(text), count
        return 0, 0

    def _kept_of_rendered(self, segment: Segment, same: int) -> tuple[int, int]:
        """Where a rendered stretch can be cut within its first `same` characters: the longest start whose
        rest is text alone and tokenizes to the stretch's last tokens: (length, tokens)."""
        cut = same
        while cut > 0:
            rest = segment.text[cut:]
            ids = self.processor.tokenizer.encode(rest, add_special_tokens=False)
            if VISION_START not in rest and segment.ids[len(segment.ids) - len(ids) :] == ids:
                return cut, len(segment.ids) - len(ids)
            cut = segment.text.rfind("\n", 0, cut - 1) + 1  # back to the start of a line
        return 0, 0
