"""A conversation that keeps its KV cache: each turn prefills only its new tokens, and images and videos
of earlier turns are never encoded again (their features already live in the cache)."""

from __future__ import annotations

from collections.abc import Iterator

import mlx.core as mx

from .errors import Qwen3VLError
from .generation import GenerationResponse, check_context, describe, encode_media, stream_tokens
from .model import Model
from .options import DEFAULT_MAX_TOKENS, LOGPROBS, SamplingOptions, check_max_tokens, check_stop
from .processor import Processor, collect_media, media_arguments, media_kind, normalize_messages, stack_media

TURN_END = "<|im_end|>"


class ChatSession:
    """`for r in session.ask("What is in this picture?", images=["cat.jpg"]): print(r.text, end="")`

    Fields: `messages` (the conversation so far, media parts without their pixels), `cache` (holds exactly
    the tokens of `tokens`), `last` (the final response of the last answer, with its statistics),
    `prefilled` (how many tokens the last turn had to prefill)."""

    def __init__(
        self,
        model: Model,
        processor: Processor,
        system: str | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        prefill_step_size: int | None = None,
        **sampling,
    ):
        self.model, self.processor = model, processor
        self.system = system
        self.max_tokens = check_max_tokens(max_tokens)
        self.prefill_step_size = prefill_step_size
        self.sampling = SamplingOptions(**sampling)
        self.clear()

    def clear(self) -> None:
        """Forget the conversation and its cache (the system prompt stays)."""
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.cache = self.model.make_cache()
        self.tokens: list[int] = []
        self.last: GenerationResponse | None = None
        self.prefilled = 0

    def set_system(self, text: str | None) -> None:
        """A new system prompt starts a new conversation."""
        self.system = text or None
        self.clear()

    def _new_text(self, messages: list[dict]) -> str:
        """The template text this turn adds after what the cache holds. The template renders each message
        independently, so the full rendering extends the previous one; the cache holds the previous
        answer's tokens but not (or not only) its closing <|im_end|>."""
        full = self.processor.render(messages, add_generation_prompt=True)
        if not self.tokens:
            return full
        previous = self.processor.render(messages[:-1], add_generation_prompt=False)
        if not full.startswith(previous) or not previous.endswith(TURN_END + "\n"):
            raise Qwen3VLError("the chat template does not extend the conversation turn by turn")
        closing = "\n" if self.tokens[-1] in self.processor.tokenizer.eos_token_ids else TURN_END + "\n"
        return closing + full[len(previous) :]

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
        """Add a user turn (text or a list of content parts, plus `images` / `videos`) and stream the
        answer. Options: sampling (temperature, top_p, ...) and media (min_pixels, fps, ...) settings.
        `progress(generation.Progress)`: what each image or video became, then the vision tower's blocks
        and the prompt's chunks as they are done. `logprobs`: as `stream_generate`'s."""
        sampling_names = SamplingOptions.names()
        sampling = {k: v for k, v in options.items() if k in sampling_names}
        media_options = {k: v for k, v in options.items() if k not in sampling_names}
        values = {k: getattr(self.sampling, k) for k in sampling_names} | sampling
        sampling_options = SamplingOptions(**values).with_defaults(self.processor.generation_config)
        max_tokens = self.max_tokens if max_tokens is None else check_max_tokens(max_tokens)
        stop = check_stop(stop)
        if logprobs is not None:
            LOGPROBS.check(logprobs)

        images, videos = media_arguments(images, videos)
        if isinstance(content, list) and all(isinstance(p, str) or "role" not in p for p in content):
            content = [{"role": "user", "content": content}]  # content parts of one user turn
        user = normalize_messages(content, images, videos)[0]
        media = collect_media([user], images, videos)
        # The record keeps the text and each medium's kind; the pixels live in the cache.
        user["content"] = [
            {"type": kind} if (kind := media_kind(p)) else {"type": "text", "text": p["text"]}
            for p in user["content"]
        ]
        messages = self.messages + [user]
        encoded = self.processor.encode_all(media, media_options)
        ids = self.processor.tokenize(self._new_text(messages), encoded)
        check_context(self.model, self.cache, len(ids), max_tokens)

        inputs = stack_media(encoded)
        describe(encoded, progress)
        images_f, videos_f = encode_media(self.model, inputs, progress)
        start, delta = self.cache.offset, self.cache.rope_delta.copy()
        prepared = self.model.prepare(
            mx.array([ids]),
            images_f,
            inputs["image_grid_thw"],
            videos_f,
            inputs["video_grid_thw"],
            self.cache,
        )
        self.messages = messages
        self.prefilled = len(ids)
        fed: list[int] = []
        answer = []
        try:
            for response in stream_tokens(
                self.model,
                self.processor.tokenizer,
                prepared,
                mx.array(self.tokens + ids),
                self.cache,
                max_tokens=max_tokens,
                sampling=sampling_options,
                stop=stop,
                prefill_step_size=self.prefill_step_size,
                progress=progress,
                on_token=fed.append,
                logprobs=logprobs,
            ):
                answer.append(response.text)
                if response.finish_reason:
                    self.last = response
                yield response
        except BaseException:
            # Interrupted (Ctrl-C) or failed: keep the answer so far if the prompt got in, else undo the turn.
            self._recover(start, delta, len(ids), fed)
            raise
        finally:
            self.tokens += ids + fed if self.cache.offset >= start + len(ids) else []
            if self.messages and self.messages[-1]["role"] == "user":
                self.messages.append({"role": "assistant", "content": "".join(answer)})

    def _recover(self, start: int, delta, prompt_length: int, fed: list[int]) -> None:
        """Bring every layer's cache to one consistent length after an interruption."""
        # A token can be in the cache without having been handed out (the interrupt came while its
        # value was awaited): the cache is cut back to what `fed` records.
        consistent = min(min(c.offset for c in self.cache), start + prompt_length + len(fed))
        if consistent < start + prompt_length:  # the prompt did not get in whole: undo the turn
            for c in self.cache:
                c.trim(c.offset - start)
            self.cache.rope_delta = delta
            self.messages = self.messages[:-1]
            fed.clear()
            return
        for c in self.cache:
            c.trim(c.offset - consistent)
        del fed[consistent - start - prompt_length :]
