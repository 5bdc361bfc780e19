"""The model's worker: one thread that owns the model (MLX builds and runs one graph at a time). It takes
requests from a queue, prefills each from the longest prefix the prompt cache holds, and decodes the
answers of up to `max_batch` requests together (batch.py), streaming each back to its request's event
loop. A request can be cancelled (its client went away): it stops within a token and its cache,
consistent, goes back to the store, as every finished answer's does.

Across ranks (`mlx.launch ... server.py`), every rank runs this engine and rank 0 alone serves HTTP: rank
0 decides at the start of each step which requests came and which were cancelled, and shares that with
the others, whose engines then run the same steps (lockstep.py).

A new request is prefilled as it arrives, in pieces taken in turn with the decode steps of the others
(admission.py), so a running stream pauses at most one piece (a vision block or a prompt chunk) between
two tokens however large the new request's images or prompt. Its media were fetched and read, and its
prompt rendered and tokenized (its turn), beforehand by the web layer, so a slow download or a large image
never holds up the model's thread.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import traceback
import weakref
from collections import deque
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.generate import wired_limit

from ..answer import AnswerText
from ..distributed import lost_peer
from ..errors import BrokenWeightsError, Qwen3VLError
from ..generation import check_finite, generation_stream, logits_are_finite, prefill
from ..model import Model
from ..options import KVCacheOptions
from ..prefix_cache import PrefixCache, PrefixCacheStore
from ..processor import Processor
from ..progress import Progress
from ..sampling import TokenSampler
from ..structured import grammar_tokenizer
from ..tools import ToolCall
from ..turn import Turn
from .admission import Admission
from .batch import make_batch
from .lockstep import Lockstep, Step
from .protocol import Request, logprob_entry


class Cancelled(Exception):
    """The request's client went away."""


@dataclass
class Event:
    """What a job reports: "text" (a piece of the answer: its text, a Thinking model's reasoning, tool
    calls completed), "done" (finish reason and counts), "error" (an HTTP status and message; before
    any text, the request fails with it) or "cancelled" (the job was cancelled: no more events come)."""

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
    """One request in the engine: its checked request, its turn (built by the web layer, off the model's
    thread), and the queue its events go to on the caller's event loop. `cancelled` is set by the web
    layer at any time; `dropped`, the engine's view of it, is taken at the start of an engine step."""

    numbers = itertools.count()

    def __init__(
        self,
        request: Request | None,
        turn: Turn,
        loop: asyncio.AbstractEventLoop | None,
        number: int | None = None,
    ):
        self.request, self.turn, self.loop = request, turn, loop
        self.number = next(Job.numbers) if number is None else number  # what ranks name it by (lockstep.py)
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.dropped = False

    @classmethod
    def mirror(cls, number: int, turn: Turn) -> Job:
        """On a rank other than 0, the stand-in of rank 0's request `number`: run alike, answering no one."""
        return cls(None, turn, None, number)

    def emit(self, event: Event) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        """Stop the job (its client went away): the engine drops it within a token, and whoever awaits
        its events is woken (the engine sends none for a cancelled job)."""
        if not self.cancelled.is_set():
            self.cancelled.set()
            if not self.loop.is_closed():  # (a stream closed as the server stops: no one waits)
                self.emit(Event("cancelled"))


@dataclass
class Sequence:
    """A request being answered: its turn, the cache it continues (whose layers the batch holds meanwhile),
    its answer so far and its sampler, the tokens it fed to its cache, and the log-probabilities of tokens
    whose text is not out yet (part of a character, or what may begin a stop string), sent with the next
    text."""

    job: Job
    turn: Turn
    cache: PrefixCache
    answer: AnswerText
    sampler: TokenSampler
    logits: mx.array | None  # of the prompt's last position, until the first token is sampled
    fed: list[int] = field(default_factory=list)
    pending: list[dict] = field(default_factory=list)


class Engine:
    def __init__(
        self,
        model: Model,
        processor: Processor,
        cache_bytes: int = 2 * 10**9,
        max_batch: int = 8,
        kv_cache: KVCacheOptions | None = None,
    ):
        self.model, self.processor = model, processor
        self.kv_cache = kv_cache or KVCacheOptions()
        self.store = PrefixCacheStore(model, cache_bytes, self.kv_cache)
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="mlx-qwen3vl-engine", daemon=True)
        self.max_batch = max_batch
        self.batch = make_batch(model, self.kv_cache)
        self.sequences: list[Sequence] = []  # one per row of the batch, in its order
        self.waiting: deque[Job] = deque()  # arrived, to be admitted one after another
        self.admitting: Job | None = None  # the one whose prefill `admission` runs piece by piece
        self.admission = Admission()
        # Every request submitted and still referenced by its web handler, to end them all at shutdown.
        self.submitted: weakref.WeakSet[Job] = weakref.WeakSet()
        self.submitting = threading.Lock()
        self.closing: str | None = None  # why new requests are refused: the server is shutting down
        self.reused = 0  # prompt tokens the last request found in the cache (for tests and logs)
        self.widest = 0  # the most rows decoded together so far (for tests and logs)
        self.tokens_generated = 0  # every answer's tokens so far, the cancelled ones' included (/metrics)
        group = getattr(model, "group", None)
        self.lockstep = None if group is None else Lockstep(group, processor, Job.mirror)
        self.lost: str | None = None  # why the engine stopped, when a rank went away
        self.on_lost = None  # called then (the server stops)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=30)
        self.admission.stop()

    def submit(self, job: Job) -> None:
        with self.submitting:
            if self.closing is None:
                self.submitted.add(job)
                self.jobs.put(job)
                return
        job.emit(Event("error", text=self.closing, status=503))

    def end_all(self, reason: str) -> None:
        """End every request submitted, running or waiting, with an error event saying `reason` (a 503),
        and refuse those that come later: a server shutting down would otherwise wait for each streamed
        answer to run to its end, since its connection stays open until then. The engine's thread drops
        the cancelled requests within a token (or a prompt chunk)."""
        with self.submitting:
            self.closing = reason
            jobs = list(self.submitted)
        for job in jobs:  # the error first: whoever awaits the job's events reads it before the wake-up
            job.emit(Event("error", text=reason, status=503))
            job.cancel()

    def follow(self) -> None:
        """On a rank other than 0: run rank 0's steps until it stops (or goes away: `lost` says so)."""
        self._run()

    def _run(self) -> None:
        # Raised on Metal for as long as the engine runs (mlx-lm's), so a model that fits is not paged out.
        with wired_limit(self.model, [generation_stream]):
            try:
                while self._start_step():
                    self._admit_piece()
                    if self.sequences:
                        self._decode_step()
            except Exception as e:
                self.lost = self._lost_rank(e)
                if self.lost is None:
                    raise
                self.end_all(self.lost)
                if self.on_lost is not None:
                    self.on_lost()
        # This thread's streams released before it ends: otherwise MLX can abort the process at exit.
        mx.clear_streams()

    def _lost_rank(self, error: Exception) -> str | None:
        """The one line for an error that says another rank went away, or None."""
        return None if self.lockstep is None else lost_peer(error, self.lockstep.group)

    def _start_step(self) -> bool:
        """Take the requests that came and note those cancelled since the last step; False: the engine
        stops. Decided here alone, or by rank 0 for every rank (lockstep.py)."""
        if self.lockstep is not None and not self.lockstep.leads:
            step = self.lockstep.share()
        else:
            jobs = self._arrivals()
            held = self._held() + (jobs or [])
            dropped = [job.number for job in held if job.cancelled.is_set() and not job.dropped]
            step = Step(jobs or [], dropped, stop=jobs is None)
            if self.lockstep is not None:
                self.lockstep.share(step)
        if step.stop:
            return False
        self.waiting.extend(step.arrivals)
        if step.dropped:  # most steps drop nothing
            for job in self._held():
                job.dropped = job.dropped or job.number in step.dropped
        return True

    def _held(self) -> list[Job]:
        """The requests the engine holds: being decoded, being admitted, waiting."""
        admitting = [] if self.admitting is None else [self.admitting]
        return [s.job for s in self.sequences] + admitting + list(self.waiting)

    def _arrivals(self) -> list[Job] | None:
        """The requests that came: waits for one when there is nothing to do, else takes what has come, up
        to the batch's room. None: the engine is stopping."""
        busy = self.sequences or self.waiting or self.admitting
        jobs = [] if busy else [self.jobs.get()]
        taken = len(self.sequences) + len(self.waiting) + (self.admitting is not None)
        while taken + len(jobs) < self.max_batch:
            try:
                jobs.append(self.jobs.get_nowait())
            except queue.Empty:
                break
        return None if None in jobs else jobs

    # ---- one request ----------------------------------------------------------------------------------

    def _admit_piece(self) -> None:
        """One piece of the prefill of the request being admitted (the next waiting one, if none is). When
        its prefill ends, the request joins the batch; a refusal or failure ends it alone."""
        while self.admitting is None and self.waiting:
            job = self.waiting.popleft()
            if not job.dropped:
                self.admitting = job
                self.admission.begin(lambda pause, job=job: self._prefill(job, pause))
        if self.admitting is None or not self.admission.step():
            return
        job, self.admitting = self.admitting, None
        try:
            if self.admission.error is not None:
                raise self.admission.error
            self._join(self.admission.result)
        except Cancelled:
            pass
        except BrokenWeightsError as e:  # the server's fault, not the request's
            job.emit(Event("error", text=str(e), status=500))
        except Qwen3VLError as e:
            job.emit(Event("error", text=str(e), status=400))
        except Exception as e:  # a bug must fail its request, never the server
            if self._lost_rank(e) is not None:
                raise
            traceback.print_exc()
            job.emit(Event("error", text=f"internal error: {type(e).__name__}: {e}", status=500))

    def _prefill(self, job: Job, pause) -> Sequence:
        """On the admission's thread: the turn's remainder encoded and prefilled, pausing after each vision
        block and prompt chunk (`pause`); the cache and the last logits evaluated, for the engine's thread
        to take over (MLX evaluates a graph only on streams of the thread that evaluates it), with the
        answer's sampler and reader made."""
        turn = job.turn

        def piece_done(progress: Progress):  # after a vision block or a prompt chunk, all evaluated
            if job.dropped:
                raise Cancelled
            if progress.stage in ("vision", "prefill"):
                pause()
                if job.dropped:
                    raise Cancelled

        with self.store.lend(turn) as cache:  # back in the store at once if this fails
            prompt = cache.remainder(turn, piece_done)
            self.reused = len(turn.ids) - prompt.length
            logits = prefill(self.model, prompt, cache.kv, progress=piece_done)
            with mx.stream(generation_stream):
                finite = logits_are_finite(logits)
            mx.eval(logits, finite, [layer.state for layer in cache.kv])
            check_finite(finite)
            sampler, answer = turn.sampler(), turn.answer_text()
        return Sequence(job, turn, cache, answer, sampler, logits)

    def _join(self, sequence: Sequence) -> None:
        """A prefilled request's first token sampled, on the engine's thread (where its sampler's state,
        such as a JSON constraint's, then lives), and the request in the batch."""
        with mx.stream(generation_stream):
            token, distribution = sequence.sampler(sequence.logits)
        sequence.logits = None
        self.sequences.append(sequence)
        self.batch.add(sequence.cache.kv, sequence.sampler, token, distribution)
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
                removed = self.batch.remove(over)
                # Evaluated here: the admission's thread may continue these caches, and MLX evaluates a
                # graph only on streams of the thread that evaluates it.
                mx.eval([[layer.state for layer in kv] for kv in removed])
                for i, kv in zip(over, removed, strict=True):
                    sequence = self.sequences[i]
                    sequence.cache.kv = kv
                    self.store.give_back(sequence.cache, sequence.turn, sequence.fed)
                leaving = set(over)
                self.sequences = [s for i, s in enumerate(self.sequences) if i not in leaving]
        except Exception as e:  # a bug fails the requests being decoded, never the server
            if self._lost_rank(e) is not None:
                raise
            traceback.print_exc()
            for sequence in self.sequences:
                sequence.job.emit(Event("error", text=f"internal error: {type(e).__name__}: {e}", status=500))
            self.sequences, self.batch = [], make_batch(self.model, self.kv_cache)

    def _take(self, sequence: Sequence, token: int, distribution) -> bool:
        """A sequence's next token (already fed to its cache): send what it adds to the answer. True when
        the sequence is over (answered, or its client gone)."""
        sequence.fed.append(token)
        self.tokens_generated += 1
        job, answer = sequence.job, sequence.answer
        if job.dropped:
            return True
        piece = answer.add(token, distribution)
        logprobs = sequence.turn.options.logprobs is not None
        if logprobs and answer.logprobs is not None:
            sequence.pending.append(logprob_entry(answer.logprobs, self.token_bytes))
        if piece or (sequence.pending and answer.finish_reason):
            parts = {"text": piece.text, "reasoning": piece.reasoning, "tool_calls": piece.tool_calls}
            job.emit(Event("text", **parts, logprobs=sequence.pending if logprobs else None))
            sequence.pending = []
        if answer.finish_reason:
            counts = {"prompt_tokens": len(sequence.turn.ids), "tokens": answer.count}
            job.emit(Event("done", finish=answer.finish_reason, **counts))
        return answer.finish_reason is not None

    def token_bytes(self, token: int) -> bytes:
        """A token's exact bytes (llguidance's table of the tokenizer, built once and shared with the
        JSON constraint)."""
        vocab = self.model.config.text_config.vocab_size
        return grammar_tokenizer(self.processor.tokenizer, vocab).decode_bytes([token])
