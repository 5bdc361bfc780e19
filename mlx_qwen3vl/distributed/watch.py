"""A lost rank that MLX's ring backend sees but no evaluation reports.

When a peer's connection breaks, the ring's socket threads fail the transfers then pending, and stop. An
evaluation waiting on one of those raises (the usual case: `group.lost_peer` makes it one line), but a
collective queued after the threads stopped is never carried out, and the evaluation waiting on it never
returns: no exception reaches Python. The backend does say it has stopped, on standard error ("Too many
send/recv errors"). So, across ranks, standard error passes through a pipe read by a thread of ours that
forwards every byte and looks for that line; if the process has not ended by itself shortly after, it
ends it with the one line (after `before_exit`, such as the server ending its answers in flight).

A pipe rather than a wait with a timeout: a step's collectives may legitimately wait long (a long
prompt's chunk on the slowest rank), and only the backend knows that the connection is gone.
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Callable

import mlx.core as mx

from .group import lost_peer_line

# What the ring backend writes once its socket threads have stopped.
STOPPED = b"Too many send/recv errors"
# Seconds left to the process to end by itself (its evaluation raised) before it is ended.
GRACE = 2.0


class StoppedBackendWatch:
    """Standard error (file descriptor 2) through a pipe, forwarded and watched (module docstring)."""

    def __init__(self, message: str, line: str):
        self.message, self.line = message, line  # the line: the message as the program reports errors
        self.before_exit: list[Callable[[str], None]] = []
        self.stderr = os.dup(2)
        reading, writing = os.pipe()
        os.dup2(writing, 2)
        os.close(writing)
        self.reading = reading
        self.forwarder = threading.Thread(target=self._forward, name="mlx-qwen3vl-stderr", daemon=True)
        self.forwarder.start()
        atexit.register(self.close)

    def _forward(self) -> None:
        tail = b""  # the end of what came before, for a line split between two reads
        while data := os.read(self.reading, 65536):
            os.write(self.stderr, data)
            if STOPPED in tail + data:
                timer = threading.Timer(GRACE, self._end)
                timer.daemon = True  # a process ending meanwhile (its evaluation raised) is not held up
                timer.start()
            tail = data[-len(STOPPED) :]

    def _end(self) -> None:
        """The backend stopped and the process is still here: an evaluation waits on it forever."""
        for hook in self.before_exit:
            hook(self.message)
        os.write(self.stderr, (self.line + "\n").encode())
        os._exit(1)

    def close(self) -> None:
        """At exit: standard error back to its own file, and what the pipe still holds forwarded."""
        os.dup2(self.stderr, 2)  # the pipe's last writer gone: the forwarder reads to its end and stops
        self.forwarder.join(timeout=GRACE)


_watch: StoppedBackendWatch | None = None


def watch_for_stopped_backend(group: mx.distributed.Group, report: Callable[[str], str]) -> None:
    """Across ranks, watch standard error for the ring backend's stop (module docstring);
    `report(message)` is the line the process then ends with."""
    global _watch
    if _watch is None:
        message = lost_peer_line(group)
        _watch = StoppedBackendWatch(message, report(message))


def before_exit(hook: Callable[[str], None]) -> None:
    """`hook(message)` runs before the watch ends the process (nothing happens when no watch runs)."""
    if _watch is not None:
        _watch.before_exit.append(hook)
