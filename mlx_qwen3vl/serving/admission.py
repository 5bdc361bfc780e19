"""A new request's prefill in pieces, taking turns with the decode steps of the answers already running.

Encoding a large image and prefilling a long prompt take far longer than one decode step; run whole, they
would freeze every running stream for that long. The prefill path already stops at natural boundaries to
report progress: after each block of the vision tower (over the pieces `Model.vision_pieces` makes) and
after each prompt chunk of `prefill_step_size` tokens, with everything computed so far evaluated. So the
admission runs that same path on a thread of its own, and its progress callback hands control back to the
engine's thread at each of those boundaries: the two threads take turns, never run at once, and a running
stream waits at most one piece (one vision block over one image's or video piece's patches, or one prompt
chunk) between two of its tokens.

Why a thread and not a generator: the boundaries lie deep inside the vision tower and the chunked prefill,
which report through callbacks; a thread that waits in its callback turns them into pause points without
rewriting those loops as generators. Only one of the two threads runs at any time, so the model, the
caches and MLX see one sequence of work, as with a single thread; each thread evaluates on its own stream
(`generation_stream` is thread-local), and everything a piece computed is evaluated before it pauses.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import mlx.core as mx


class _Stopped(Exception):
    """The engine stopped while a work was paused."""


class Admission:
    """One admission at a time, run on a worker thread piece by piece: the engine's thread calls `step`,
    which lets the work run until its next pause (`pause`, passed to the work) or its end, and returns
    whether it ended. The work's result or exception is then `result` / `error`."""

    def __init__(self):
        self._go = threading.Semaphore(0)  # the worker may run
        self._paused = threading.Semaphore(0)  # the worker paused or ended
        self._work: Callable | None = None
        self.result = None
        self.error: BaseException | None = None
        self.done = True
        self._stopping = False
        self.pieces = 0  # pieces run by the current work (for tests and logs)
        self._thread = threading.Thread(target=self._loop, name="mlx-qwen3vl-admission", daemon=True)
        self._thread.start()

    def begin(self, work: Callable) -> None:
        """Start `work(pause)` with the next `step` (the previous work must have ended)."""
        assert self.done, "one admission at a time"
        self._work, self.result, self.error, self.done, self.pieces = work, None, None, False, 0

    def step(self) -> bool:
        """Let the work run one piece; True when it has ended (see `result` and `error`)."""
        self._go.release()
        self._paused.acquire()
        return self.done

    def pause(self, _progress=None) -> None:
        """Called by the work, on the worker thread, at a piece boundary: wait for the next `step`."""
        self.pieces += 1
        self._paused.release()
        self._go.acquire()
        if self._stopping:
            raise _Stopped

    def stop(self) -> None:
        """End the worker thread (a paused work ends with an exception, so that it gives back what it
        took), and wait for it: MLX must not be torn down at exit under a thread still using it."""
        self._stopping = True
        self._go.release()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stopping:
            self._go.acquire()
            if self._stopping:
                break
            try:
                self.result = self._work(self.pause)
            except BaseException as e:  # handed to the engine's thread, which reports it
                self.error = e
            self._work, self.done = None, True
            if not self._stopping:
                self._paused.release()
        # This thread's streams released before it ends: otherwise MLX can abort the process at exit.
        mx.clear_streams()
