"""Generation as generators, in mlx-lm's shape: `generate_step` yields token ids (with their
log-probabilities when asked), `stream_generate` yields text as it arrives with statistics, `generate`
returns the whole answer. What the tokens say (text, reasoning, tool calls) is answer.py's.

mlx-lm's own `generate_step` cannot be used: a Qwen3-VL prompt chunk needs its 3-D MRoPE positions and
the DeepStack features of the vision tokens it contains, not just token ids or embeddings. Samplers,
logits processors and the streaming detokenizer are mlx-lm's.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.generate import wired_limit

from .answer import Answer, AnswerText, TokenLogprobs
from .errors import Qwen3VLError
from .model import Model, PreparedInput, PromptCache
from .options import (
    DEFAULT_KV_GROUP_SIZE,
    DEFAULT_MAX_TOKENS,
    LOGPROBS,
    KVCacheOptions,
    SamplingOptions,
    check_max_tokens,
    check_stop,
)
from .structured import JsonConstraint, check_schema
from .tools import InvalidToolCall, ToolCall, tool_names

PREFILL_STEP_SIZE = 512  # for a model built without load() (which chooses per backend, backend.py)

# One stream for generation, as mlx-lm does, so evaluation overlaps with the Python loop; thread-local,
# so that any thread can generate (the server's engine runs in its own).
generation_stream = mx.new_thread_local_stream(mx.default_device())


@dataclass
class Progress:
    """What a long step is doing, for a front end to show. `stage`: "reading" (frames of a video file read,
    of `total` kept), "media" (an image or video was read and sized: `detail` says what it became),
    "vision" (blocks of the vision tower done, of `total`), "prefill" (prompt tokens fed, of `total`)."""

    stage: str
    done: int
    total: int
    detail: str = ""


def prefill(
    model: Model,
    prompt: PreparedInput,
    cache: PromptCache,
    step_size: int | None = None,
    progress=None,
) -> mx.array:
    """Feed a prepared prompt through the cache in chunks of `step_size` tokens (memory stays bounded
    for long prompts); returns the logits [1, vocab] of its last position, computed with the last chunk
    (not in a separate one-token step, which on the CPU would cost a whole decode step more: a few new
    tokens of a chat turn take about as long as one through the quantized BLAS path). A chunk before the
    last is taken through the last layer only as far as its keys and values, all that the cache keeps of
    it: lazy evaluation would skip the rest, but on the CPU attention evaluates its blocks as it goes."""
    total = prompt.length
    step_size = step_size or default_prefill_step(model)
    for start in range(0, total, step_size):
        end = min(start + step_size, total)
        with mx.stream(generation_stream):
            logits = model.decode(prompt.chunk(start, end), cache, outputs=1 if end == total else 0)
        if end == total:
            return logits[:, -1]
        mx.eval([c.state for c in cache])
        if progress:
            progress(Progress("prefill", end, total))
    raise Qwen3VLError("the prompt is empty")


def default_prefill_step(model: Model) -> int:
    backend = getattr(model, "backend", None)
    return backend.prefill_step_size if backend is not None else PREFILL_STEP_SIZE


class TokenSampler:
    """Picks one sequence's next token from its logits [1, vocab]: its logits processors (with the token
    history they read; it grows only when one reads it), then mlx-lm's sampler, or an argmax when there is
    none (greedy); and, with `logprobs`, the model's own log-probabilities (before the processors and
    temperature). One per sequence, so that each row of a batch samples with its own settings.

    With a seed, each step draws from a key of its own, (seed, step): an answer depends on its seed alone,
    not on what else MLX's global generator served in between (the other rows of a batch)."""

    def __init__(self, prompt_tokens: mx.array, sampler=None, processors=(), logprobs=False, seed=None):
        self.history, self.sampler, self.processors = prompt_tokens, sampler, list(processors)
        self.logprobs, self.seed, self.steps = logprobs, seed, 0

    @property
    def greedy(self) -> bool:
        """An argmax of the logits and nothing else: such rows of a batch are sampled together."""
        return self.sampler is None and not self.processors and not self.logprobs

    def __call__(self, logits: mx.array) -> tuple[mx.array, mx.array | None]:
        distribution = None
        if self.logprobs:
            logits32 = logits.astype(mx.float32)
            distribution = (logits32 - mx.logsumexp(logits32, axis=-1, keepdims=True))[0]
        for processor in self.processors:
            logits = processor(self.history, logits)
        if self.sampler is None:
            token = mx.argmax(logits, axis=-1)
        else:
            if self.seed is not None:
                mx.random.seed((self.seed * 0x9E3779B97F4A7C15 + self.steps) % 2**64)
            token = self.sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        self.steps += 1
        if self.processors:
            self.history = mx.concatenate([self.history, token])
        return token, distribution


def generate_step(
    model: Model,
    prompt: PreparedInput,
    cache: PromptCache,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    sample: TokenSampler | None = None,
    prefill_step_size: int | None = None,
    progress=None,
) -> Iterator[tuple[int, mx.array | None]]:
    """Yield (token id, log-probabilities over the vocabulary or None), as mlx-lm's does; `sample` picks
    each token (greedy without one). Every token yielded has already been fed to the cache: the next
    step is evaluated asynchronously while the caller handles the current token."""
    sample = sample or TokenSampler(mx.array([], dtype=mx.int32))

    def step(token: mx.array):
        with mx.stream(generation_stream):
            return sample(model(token[None], cache=cache)[:, -1])

    with mx.stream(generation_stream):
        token, distribution = sample(prefill(model, prompt, cache, prefill_step_size, progress))
    mx.async_eval(token, distribution)
    for _ in range(max_tokens):
        # Feed the current token before handing it out (so the cache always holds every token
        # yielded) and let that step run while the caller works on this one.
        next_token, next_distribution = step(token)
        mx.async_eval(next_token, next_distribution)
        yield token.item(), distribution
        token, distribution = next_token, next_distribution


@dataclass
class GenerationResponse:
    """One piece of a streamed answer: mlx-lm's fields, then, for a Thinking model, the piece of its
    reasoning (`text` is the answer's), and with tools, the calls this piece completes and the invalid
    call blocks it found (their text stays in `text`)."""

    text: str
    token: int | None
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    # "stop" (end-of-turn token), "stop_string", "length", "tool_calls" (stopped right after calls)
    finish_reason: str | None = None
    logprobs: TokenLogprobs | None = None  # of `token`, when asked for (not for an end-of-turn token)
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    invalid_tool_calls: list[InvalidToolCall] = field(default_factory=list)


def stream_tokens(
    model: Model,
    tokenizer,
    prompt: PreparedInput,
    prompt_tokens: mx.array,
    cache: PromptCache,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    sampling: SamplingOptions | None = None,
    stop: list[str] | str | None = None,
    stop_token_ids=None,
    prefill_step_size: int | None = None,
    progress=None,
    on_token=None,
    constraint=None,
    logprobs: int | None = None,
    reasoning: bool = False,
    tools: list | None = None,
) -> Iterator[GenerationResponse]:
    """Stream an answer for a prepared prompt: text pieces from mlx-lm's streaming detokenizer, stop on
    an end-of-turn token, a stop string (not shown), or max_tokens. `on_token(id)` sees every token fed
    to the cache. `constraint`: one more logits processor (structured.JsonConstraint). `logprobs`: each
    response carries its token's log-probability and this many alternatives'. `reasoning`: the prompt
    leaves the model inside a reasoning block. `tools`: the tools offered, whose calls are parsed."""
    max_tokens = check_max_tokens(max_tokens)
    top = None if logprobs is None else LOGPROBS.check(logprobs)
    sampling = sampling or SamplingOptions()
    stop_ids = set(stop_token_ids if stop_token_ids is not None else tokenizer.eos_token_ids)
    answer = AnswerText(tokenizer, check_stop(stop), stop_ids, max_tokens, top, reasoning, tools)
    sample = token_sampler(sampling, prompt_tokens, constraint, top)
    mx.reset_peak_memory()
    tic = time.perf_counter()
    prompt_tps, n = 0.0, 0
    steps = generate_step(
        model,
        prompt,
        cache,
        max_tokens=max_tokens,
        sample=sample,
        prefill_step_size=prefill_step_size,
        progress=progress,
    )
    # Raised on Metal for the generation (mlx-lm's), so a model that fits is not paged out.
    with wired_limit(model, [generation_stream]):
        for n, (token, distribution) in enumerate(steps, start=1):
            if n == 1:
                prompt_tps = prompt.length / (time.perf_counter() - tic)
                tic = time.perf_counter()
            if on_token:
                on_token(token)
            # One response per token, like mlx-lm; the last one says why the answer ended.
            piece = answer.add(token, distribution)
            elapsed = time.perf_counter() - tic
            yield GenerationResponse(
                piece.text,
                token,
                prompt.length,
                prompt_tps,
                n,
                n / elapsed if elapsed else 0.0,
                mx.get_peak_memory() / 1e9,
                answer.finish_reason,
                answer.logprobs,
                piece.reasoning,
                piece.tool_calls,
                piece.invalid_tool_calls,
            )
            if answer.finish_reason:
                return


def token_sampler(
    sampling: SamplingOptions, prompt_tokens: mx.array, constraint=None, logprobs: int | None = None
) -> TokenSampler:
    """The sampler of one answer: the options' sampler and logits processors, then the constraint."""
    processors = sampling.logits_processors() + ([constraint] if constraint else [])
    return TokenSampler(prompt_tokens, sampling.sampler(), processors, logprobs is not None, sampling.seed)


def encode_media(model: Model, inputs: dict, progress=None):
    """Run the vision tower over all images and over all videos of processor output (each in pieces that
    fit the model's vision budget, `Model.encode_vision`). The features are evaluated here and the tower's
    freed activations returned to the system, so the decoder's prefill does not hold them too.
    `progress(Progress)` sees each block of each piece."""
    present = [
        (values, grids)
        for values, grids in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw"))
        if inputs.get(values) is not None
    ]
    blocks = len(model.model.visual.blocks)
    steps = [len(model.vision_pieces(inputs[grids])) * blocks for _, grids in present]
    features = {}
    for n, (values, grids) in enumerate(present):

        def report(done: int, _, n=n):
            progress(Progress("vision", sum(steps[:n]) + done, sum(steps)))

        features[values] = model.encode_vision(inputs[values], inputs[grids], report if progress else None)
    if features:
        mx.eval([(e.features, e.deepstack) for e in features.values()])
        mx.clear_cache()
    return features.get("pixel_values"), features.get("pixel_values_videos")


def reading(progress):
    """The processor's `reading(done, total)` reported as `Progress` "reading" (None without `progress`)."""
    return (lambda done, total: progress(Progress("reading", done, total))) if progress else None


def describe(encoded: list, progress) -> None:
    """Say what each image and video became (`Progress` "media"), before the vision tower runs."""
    if progress:
        for i, (_, media) in enumerate(encoded, start=1):
            progress(Progress("media", i, len(encoded), media.description))


def check_context(model: Model, cache: PromptCache, new_tokens: int, max_tokens: int) -> None:
    """Refuse, before any work, a prompt whose tokens plus max_tokens would pass the model's context
    (`TextConfig.context_length`: extended by YaRN where config.json sets it up). Tokens, not rope
    positions, are counted: an image takes fewer positions than tokens, and the KV cache holds tokens."""
    limit = model.config.text_config.context_length
    if cache.offset + new_tokens + max_tokens > limit:
        raise Qwen3VLError(
            f"the prompt ({cache.offset + new_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the "
            f"model's context of {limit} tokens; shorten the input or start a new conversation"
        )


def stream_generate(
    model: Model,
    processor,
    prompt,
    images=None,
    videos=None,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    seed: int | None = None,
    stop: list[str] | str | None = None,
    json_schema=None,
    logprobs: int | None = None,
    tools: list | None = None,
    kv_bits: int | None = None,
    kv_group_size: int = DEFAULT_KV_GROUP_SIZE,
    prefill_step_size: int | None = None,
    progress=None,
    **processor_options,
) -> Iterator[GenerationResponse]:
    """Answer `prompt` (chat messages or a string, with `images` / `videos`), streaming text as it is
    generated. Unset sampling options come from the model's generation_config.json; processor options
    (min_pixels, max_pixels, fps, nframes, ...) go to the processor. `json_schema` (a dict or its JSON
    text; `structured.ANY_OBJECT` for any object): the answer is JSON that follows it. `logprobs` (0 to
    20): each response's `logprobs` holds its token's log-probability and that many most likely
    alternatives (`TokenLogprobs`). `tools` (function definitions, OpenAI's form): the template offers
    them, and the calls the model makes come as `tool_calls`. A Thinking model's reasoning comes as
    `reasoning`, apart from the answer's `text`. `kv_bits` (8 or 4): the KV cache holds keys and values
    quantized in groups of `kv_group_size` (32, 64 or 128), for a long prompt's memory (README, "KV-cache
    quantization")."""
    # Every option is checked before any media is read or encoded.
    sampling = SamplingOptions(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        seed=seed,
    )
    sampling = sampling.with_defaults(processor.generation_config)
    max_tokens, stop = check_max_tokens(max_tokens), check_stop(stop)
    if logprobs is not None:
        LOGPROBS.check(logprobs)
    if tools:
        tool_names(tools)
    constraint = None
    if json_schema is not None:
        grammar = check_schema(json_schema)
        constraint = JsonConstraint(grammar, processor.tokenizer, model.config.text_config.vocab_size)
    cache = model.make_cache(KVCacheOptions(kv_bits, kv_group_size))
    inputs, encoded = processor.prepare(
        prompt, images, videos, tools=tools, reading=reading(progress), **processor_options
    )
    ids = inputs["input_ids"]
    check_context(model, cache, ids.shape[1], max_tokens)
    describe(encoded, progress)
    media, media_videos = encode_media(model, inputs, progress)
    prepared = model.prepare(
        ids, media, inputs["image_grid_thw"], media_videos, inputs["video_grid_thw"], cache
    )
    yield from stream_tokens(
        model,
        processor.tokenizer,
        prepared,
        mx.array(ids[0]),
        cache,
        max_tokens=max_tokens,
        sampling=sampling,
        stop=stop,
        prefill_step_size=prefill_step_size,
        progress=progress,
        constraint=constraint,
        logprobs=logprobs,
        reasoning=processor.thinks,
        tools=tools,
    )


def generate(model: Model, processor, prompt, images=None, videos=None, **options) -> Answer:
    """The whole answer: its text (a `str`), with `reasoning`, `tool_calls`, `invalid_tool_calls` and
    `finish_reason` beside it (`answer.Answer`); the same arguments as `stream_generate`."""
    return Answer.of(list(stream_generate(model, processor, prompt, images, videos, **options)))
