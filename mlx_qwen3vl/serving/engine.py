"""The model's worker: one thread that owns the model (MLX builds and runs one graph at a time). It takes
requests from a queue, prefills each from the longest prefix the prompt cache holds, and decodes the
answers of up to `max_batch` requests together (batch.py), streaming each back to its request's event
loop. A request can be cancelled (its client went away): it stops within a token and its cache,
consistent, goes back to the store, as every finished answer's does.

A new request is prefilled as soon as it arrives, between two decode steps of the others. Media were
fetched beforehand by the web layer, so a slow download never holds up the model.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from mlx_lm.generate import wired_limit

from ..answer import AnswerText
from ..errors import Qwen3VLError
from ..generation import (
    check_context,
    encode_media,
    generation_stream,
    prefill,
    token_sampler,
)
from ..model import Model, PromptCache
from ..options import KVCacheOptions
from ..positions import batch_rope_index
from ..processor import EncodedMedia, Processor, media_defaults, stack_media
from ..structured import JsonConstraint, check_schema, grammar_tokenizer
from ..tools import ToolCall
from .batch import make_batch
from .media import Fetched, VideoFile
from .prompt_cache import Key, PromptCacheStore
from .protocol import Request, logprob_entry

MEDIA_ENTRIES = 32  # decoded images and videos kept, by content and options


class Cancelled(Exception):
    """The request's client went away."""


@dataclass
class Event:
    """What a job reports: "text" (a piece of the answer: its text, a Thinking model's reasoning, tool
    calls completed), "done" (finish reason and counts) or "error" (an HTTP status and message; before
    any text, the request fails with it)."""

    kind: str
    text: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[dict] | None = None  # OpenAI's entries for the tokens of this text, when asked for
    finish: str | None = None
    prompt_tokens: int = 0
    tokens: int = 0
    status: int = 0


class Job:
    """One request in the engine: its checked request, its fetched media, and the queue its events go to
    on the caller's event loop."""

    def __init__(self, request: Request, media: list[Fetched], loop: asyncio.AbstractEventLoop):
        self.request, self.media, self.loop = request, media, loop
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = threading.Event()

    def emit(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class Prompt:
    """A request's prompt: token ids, what each position is (`keys`), the span of each medium's tokens,
    the rope delta at each position, and the encoded media in prompt order."""

    ids: list[int]
    keys: list[Key]
    blocks: list[tuple[int, int]]
    deltas: np.ndarray
    media: list[tuple[str, EncodedMedia]]
    digests: list[str]


@dataclass
class Sequence:
    """A request being answered: its prompt, its answer so far, the tokens it fed to its cache, and the
    log-probabilities of tokens whose text is not out yet (part of a character, or what may begin a stop
    string), sent with the next text."""

    job: Job
    prompt: Prompt
    answer: AnswerText
    fed: list[int] = field(default_factory=list)
    pending: list[dict] = field(default_factory=list)


class Engine:
    def __init__(
        self,
        model: Model,
        processor: Processor,
        cache_entries: int = 8,
        cache_bytes: int = 2 * 10**9,
        max_batch: int = 8,
        kv_cache: KVCacheOptions | None = None,
    ):
        self.model, self.processor = model, processor
        self.kv_cache = kv_cache or KVCacheOptions()
        self.store = PromptCacheStore(model, cache_entries, cache_bytes, self.kv_cache)
        self.decoded: OrderedDict[tuple, EncodedMedia] = OrderedDict()
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="mlx-qwen3vl-engine", daemon=True)
        self.max_batch = max_batch
        self.batch = make_batch(model, self.kv_cache)
        self.sequences: list[Sequence] = []  # one per row of the batch, in its order
        self.reused = 0  # prompt tokens the last request found in the cache (for tests and logs)
        self.widest = 0  # the most rows decoded together so far (for tests and logs)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def _run(self) -> None:
        # Raised on Metal for as long as the engine runs (mlx-lm's), so a model that fits is not paged out.
        with wired_limit(self.model, [generation_stream]):
            while (jobs := self._arrivals()) is not None:
                for job in jobs:
                    self._admit(job)
                if self.sequences:
                    self._decode_step()

    def _arrivals(self) -> list[Job] | None:
        """The requests to start now: waits for one when nothing is being decoded, else takes what has
        come, up to the batch's room. None: the engine is stopping."""
        jobs = [] if self.sequences else [self.jobs.get()]
        while len(self.sequences) + len(jobs) < self.max_batch:
            try:
                jobs.append(self.jobs.get_nowait())
            except queue.Empty:
                break
        return None if None in jobs else jobs

    # ---- one request ----------------------------------------------------------------------------------

    def _admit(self, job: Job) -> None:
        """Prefill a request's prompt and let it join the batch; a refusal or failure ends it alone."""
        if job.cancelled.is_set():
            return
        try:
            self._prefill(job)
        except Cancelled:
            pass
        except Qwen3VLError as e:
            job.emit(Event("error", text=str(e), status=400))
        except Exception as e:  # a bug must fail its request, never the server
            traceback.print_exc()
            job.emit(Event("error", text=f"internal error: {type(e).__name__}: {e}", status=500))

    def _prefill(self, job: Job) -> None:
        request = job.request
        prompt = self._prompt(request, job.media)
        constraint = None
        if request.json_schema is not None:
            vocab = self.model.config.text_config.vocab_size
            constraint = JsonConstraint(check_schema(request.json_schema), self.processor.tokenizer, vocab)
        cache, start = self.store.take(prompt.keys, prompt.blocks, prompt.deltas)
        self.reused = start
        try:
            check_context(self.model, cache, len(prompt.ids) - start, request.max_tokens)
            prepared = self._prepare(prompt, start, cache)

            def stop_if_cancelled(_progress):  # between prompt chunks
                if job.cancelled.is_set():
                    raise Cancelled

            logits = prefill(self.model, prepared, cache, progress=stop_if_cancelled)
            sampling = request.sampling.with_defaults(self.processor.generation_config)
            sampler = token_sampler(sampling, mx.array(prompt.ids), constraint, request.logprobs)
            with mx.stream(generation_stream):
                token, distribution = sampler(logits)
        except BaseException:
            self._give_back(prompt, [], cache)
            raise
        tokenizer = self.processor.tokenizer
        stop_ids = set(tokenizer.eos_token_ids)
        answer = AnswerText(
            tokenizer,
            request.stop,
            stop_ids,
            request.max_tokens,
            request.logprobs,
            reasoning=self.processor.thinks,
            tools=request.tools,
        )
        self.sequences.append(Sequence(job, prompt, answer))
        self.batch.add(cache, sampler, token, distribution)
        self.widest = max(self.widest, len(self.sequences))

    def _decode_step(self) -> None:
        """One token for every sequence; the finished and the cancelled leave the batch."""
        try:
            tokens, distributions = self.batch.step()
            over = [
                i
                for i, (sequence, token, distribution) in enumerate(
                    zip(self.sequences, tokens, distributions, strict=True)
                )
                if self._take(sequence, token, distribution)
            ]
            if over:
                for i, cache in zip(over, self.batch.remove(over), strict=True):
                    self._give_back(self.sequences[i].prompt, self.sequences[i].fed, cache)
                leaving = set(over)
                self.sequences = [s for i, s in enumerate(self.sequences) if i not in leaving]
        except Exception as e:  # a bug fails the requests being decoded, never the server
            traceback.print_exc()
            for sequence in self.sequences:
                sequence.job.emit(Event("error", text=f"internal error: {type(e).__name__}: {e}", status=500))
            self.sequences, self.batch = [], make_batch(self.model, self.kv_cache)

    def _take(self, sequence: Sequence, token: int, distribution) -> bool:
        """A sequence's next token (already fed to its cache): send what it adds to the answer. True when
        the sequence is over (answered, or its client gone)."""
        sequence.fed.append(token)
        job, answer = sequence.job, sequence.answer
        if job.cancelled.is_set():
            return True
        piece = answer.add(token, distribution)
        logprobs = job.request.logprobs is not None
        if logprobs and answer.logprobs is not None:
            sequence.pending.append(logprob_entry(answer.logprobs, self.token_bytes))
        if piece or (sequence.pending and answer.finish_reason):
            parts = {"text": piece.text, "reasoning": piece.reasoning, "tool_calls": piece.tool_calls}
            job.emit(Event("text", **parts, logprobs=sequence.pending if logprobs else None))
            sequence.pending = []
        if answer.finish_reason:
            counts = {"prompt_tokens": len(sequence.prompt.ids), "tokens": answer.count}
            job.emit(Event("done", finish=answer.finish_reason, **counts))
        return answer.finish_reason is not None

    def _give_back(self, prompt: Prompt, fed: list[int], cache: PromptCache) -> None:
        """Keep a cache when every layer holds the same tokens: a prefix of the prompt and what was fed
        after it."""
        held = prompt.keys + [(t, None) for t in fed]
        offsets = {layer.offset for layer in cache}
        if len(offsets) == 1 and 0 < cache.offset <= len(held):
            self.store.give_back(held[: cache.offset], cache)

    def token_bytes(self, token: int) -> bytes:
        """A token's exact bytes (llguidance's table of the tokenizer, built once and shared with the
        JSON constraint)."""
        vocab = self.model.config.text_config.vocab_size
        return grammar_tokenizer(self.processor.tokenizer, vocab).decode_bytes([token])

    def _prompt(self, request: Request, fetched: list[Fetched]) -> Prompt:
        """Encode the media (or find them decoded), render the template, tokenize, and describe every
        position."""
        processor, config = self.processor, self.model.config
        defaults = media_defaults(request.media_options)
        media = [
            (ref.kind, self._decoded(ref.kind, data, defaults[ref.kind] | ref.options))
            for ref, data in zip(request.media, fetched, strict=True)
        ]
        template = {"tools": request.tools} if request.tools else {}
        text = processor.render(request.messages, add_generation_prompt=True, **template)
        ids = processor.tokenize(text, media)
        keys, blocks = describe_positions(ids, media, [f.digest for f in fetched], config)
        image_grids = [m.grid_thw for k, m in media if k == "image"] or None
        video_grids = [m.grid_thw for k, m in media if k == "video"] or None
        positions, _ = batch_rope_index(
            np.array([ids]),
            image_grids,
            video_grids,
            image_token_id=config.image_token_id,
            video_token_id=config.video_token_id,
            spatial_merge_size=config.vision_config.spatial_merge_size,
        )
        deltas = positions[0, 0] - np.arange(len(ids))
        return Prompt(ids, keys, blocks, deltas, media, [f.digest for f in fetched])

    def _decoded(self, kind: str, fetched: Fetched, options: dict) -> EncodedMedia:
        key = (kind, fetched.digest, tuple(sorted(options.items())))
        if key in self.decoded:
            self.decoded.move_to_end(key)
            return self.decoded[key]
        if kind == "image":
            encoded = self.processor.encode_media("image", fetched.data, dict(options))
        else:
            with VideoFile(fetched.data) as path:
                encoded = self.processor.encode_media("video", path, dict(options))
        self.decoded[key] = encoded
        while len(self.decoded) > MEDIA_ENTRIES:
            self.decoded.popitem(last=False)
        return encoded

    def _prepare(self, prompt: Prompt, start: int, cache):
        """The prompt from `start` on, with the vision features of the media in it (those before are in
        the cache already)."""
        later = [m for m, (begin, _) in zip(prompt.media, prompt.blocks, strict=True) if begin >= start]
        inputs = stack_media(later)
        images, videos = encode_media(self.model, inputs)
        return self.model.prepare(
            np.array([prompt.ids[start:]]),
            images,
            inputs["image_grid_thw"],
            videos,
            inputs["video_grid_thw"],
            cache,
        )


def describe_positions(ids: list[int], media: list[tuple[str, EncodedMedia]], digests: list[str], config):
    """Each position's key (token id, and the medium's digest for its pad tokens) and each medium's span
    [first <|vision_start|>, last <|vision_end|>] of the prompt, in order."""
    pads = {config.image_token_id: "image", config.video_token_id: "video"}
    groups = []  # (kind, digest) of each pad run, in prompt order: a video has one run per temporal group
    for (kind, encoded), digest in zip(media, digests, strict=True):
        groups += [(kind, digest)] * (1 if kind == "image" else encoded.grid_thw[0])
    keys: list[Key] = []
    runs: list[tuple[int, int]] = []
    run = -1
    for i, token in enumerate(ids):
        if token in pads:
            if i == 0 or ids[i - 1] != token:
                run += 1
                runs.append((i - 1, i))  # from its <|vision_start|>
            keys.append((token, groups[run][1]))
            runs[-1] = (runs[-1][0], i + 2)  # through its <|vision_end|>
        else:
            keys.append((token, None))
    blocks, r = [], 0
    for kind, encoded in media:
        count = 1 if kind == "image" else encoded.grid_thw[0]
        blocks.append((runs[r][0], runs[r + count - 1][1]))
        r += count
    return keys, blocks
