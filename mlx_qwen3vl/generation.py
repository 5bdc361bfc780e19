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
from contextlib import closing
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.generate import wired_limit

from .answer import Answer, TokenLogprobs
from .distributed.interrupt import step_boundaries, stop_if_rank_0_interrupted
from .errors import BrokenWeightsError, Qwen3VLError
from .model import Model, PreparedInput, PromptCache
from .options import (
    DEFAULT_KV_GROUP_SIZE,
    DEFAULT_MAX_TOKENS,
    GenerationOptions,
    KVCacheOptions,
    SamplingOptions,
)
from .prefix_cache import PrefixCache
from .progress import Progress, reading
from .sampling import TokenSampler
from .tools import InvalidToolCall, ToolCall
from .turn import Turn

PREFILL_STEP_SIZE = 512  # for a model built without load() (which chooses per backend, backend.py)

# One stream for generation, as mlx-lm does, so evaluation overlaps with the Python loop; thread-local,
# so that any thread can generate (the server's engine runs in its own).
generation_stream = mx.new_thread_local_stream(mx.default_device())


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
        stop_if_rank_0_interrupted(getattr(model, "group", None))
        if progress:
            progress(Progress("prefill", end, total))
    raise Qwen3VLError("the prompt is empty")


# What a prompt's logits that are not all finite say about the model, and how to check it.
BROKEN_WEIGHTS = (
    "the model's output for this prompt is not a number (NaN or infinite logits): its weights are "
    "probably corrupt or badly converted; check the .safetensors files against their source (sizes and "
    "checksums, e.g. sha256sum), or convert or download the model again"
)


def logits_are_finite(logits: mx.array) -> mx.array:
    """A lazy flag: every logit of the prompt's last position is finite. Their sum is finite exactly
    then (a NaN or an infinity carries into it; finite logits are far too small to overflow it), and
    takes one pass over the vocabulary where an elementwise test and its `all()` take two; it is
    evaluated with the first token's sampling (bench/finite_check.py measures what it adds)."""
    return mx.isfinite(logits.sum())


def check_finite(finite: mx.array) -> None:
    """Stop before the first token of an answer from a model whose logits are NaN or infinite: its
    tokens would be garbage (`!!!!` from an argmax over NaN), silently."""
    if not finite.item():
        raise BrokenWeightsError(BROKEN_WEIGHTS)


def default_prefill_step(model: Model) -> int:
    backend = getattr(model, "backend", None)
    return backend.prefill_step_size if backend is not None else PREFILL_STEP_SIZE


def step_evaluation(model: Model):
    """How a decoding step is evaluated: asynchronously, the next step running while the caller handles
    this one; across ranks (distributed/) synchronously, each step before the next is built: MLX reports
    a lost rank as an exception of the evaluation that waits on its collective, and an asynchronous
    evaluation's exception reaches no caller (`.item()` would then wait forever)."""
    return mx.async_eval if getattr(model, "group", None) is None else mx.eval


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
    group = getattr(model, "group", None)
    evaluate = step_evaluation(model)

    def step(token: mx.array):
        with mx.stream(generation_stream):
            return sample(model(token[None], cache=cache)[:, -1])

    # Across ranks a Ctrl-C is agreed on with each step (distributed/interrupt.py): every rank stops at
    # the same token.
    with step_boundaries(group):
        with mx.stream(generation_stream):
            logits = prefill(model, prompt, cache, prefill_step_size, progress)
            token, distribution = sample(logits)
            finite = logits_are_finite(logits)
        evaluate(token, distribution, finite)
        for n in range(max_tokens):
            # Feed the current token before handing it out (so the cache always holds every token
            # yielded) and let that step run while the caller works on this one.
            next_token, next_distribution = step(token)
            evaluate(next_token, next_distribution)
            if n == 0:
                check_finite(finite)  # evaluated with the first token, which is awaited next anyway
            # Evaluated apart, after the step: a collective's partners are matched by their order on each
            # rank, and in one graph it would be ordered with the step's own collectives as each rank's
            # graph happens to be (pipeline ranks' graphs differ).
            stop_if_rank_0_interrupted(group)
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


def run_turn(
    model: Model, turn: Turn, cache: PrefixCache, *, progress=None, prefill_step_size: int | None = None
) -> Iterator[GenerationResponse]:
    """`_run_turn`, with a Ctrl-C across ranks agreed on at the turn's steps, from its media's encoding to
    its answer's last token (distributed/interrupt.py)."""
    with step_boundaries(getattr(model, "group", None)):
        yield from _run_turn(model, turn, cache, progress=progress, prefill_step_size=prefill_step_size)


def _run_turn(
    model: Model, turn: Turn, cache: PrefixCache, *, progress=None, prefill_step_size: int | None = None
) -> Iterator[GenerationResponse]:
    """Answer a turn, continuing `cache` (which then holds the turn and its answer, as far as they got,
    whatever ends the answer: its end, an exception, or the caller closing the stream). Streams text
    pieces from mlx-lm's streaming detokenizer; stops on an end-of-turn token, a stop string (not shown),
    or max_tokens. `progress(Progress)`: the media, the vision tower and the prompt's chunks."""
    answer, fed = turn.answer_text(), []
    try:
        prompt = cache.remainder(turn, progress)
        mx.reset_peak_memory()
        tic = time.perf_counter()
        prompt_tps = 0.0
        steps = generate_step(
            model,
            prompt,
            cache.kv,
            max_tokens=turn.options.max_tokens,
            sample=turn.sampler(),
            prefill_step_size=prefill_step_size,
            progress=progress,
        )
        # Raised on Metal for the generation (mlx-lm's), so a model that fits is not paged out.
        with closing(steps), wired_limit(model, [generation_stream]):
            for n, (token, distribution) in enumerate(steps, start=1):
                if n == 1:
                    prompt_tps = prompt.length / (time.perf_counter() - tic)
                    tic = time.perf_counter()
                fed.append(token)
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
    finally:
        cache.settle(turn, fed)


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
    options = GenerationOptions(max_tokens, sampling, stop, logprobs, tools, json_schema)
    cache = PrefixCache(model, KVCacheOptions(kv_bits, kv_group_size))
    turn = Turn.from_prompt(
        processor, prompt, images, videos, options, reading(progress), **processor_options
    )
    yield from run_turn(model, turn, cache, progress=progress, prefill_step_size=prefill_step_size)


def generate(model: Model, processor, prompt, images=None, videos=None, **options) -> Answer:
    """The whole answer: its text (a `str`), with `reasoning`, `tool_calls`, `invalid_tool_calls` and
    `finish_reason` beside it (`answer.Answer`); the same arguments as `stream_generate`."""
    return Answer.of(list(stream_generate(model, processor, prompt, images, videos, **options)))
