"""Joining the ranks of a run, bounded in time, with one line for a rank that does not come.

MLX's ring waits without end for a rank that never connects to it (its accept has no timeout), and gives
up on one it cannot connect to after its own retries, with an error naming neither rank. So the start is
bounded by an alarm: it interrupts the wait (MLX then reports a failed accept), and either failure
becomes one line naming the ranks this one waits for, its neighbours in the ring. The alarm needs the
main thread (the wait holds Python's lock: no other thread could time it); elsewhere the start is MLX's.
"""

from __future__ import annotations

import json
import os
import signal
import threading

import mlx.core as mx

from ..errors import Qwen3VLError

# How long a rank waits for the others to join, in seconds: the variable, or the default. Ranks started
# by mlx.launch start within seconds of each other; MLX's own connection retries give up sooner.
JOIN_SECONDS_VARIABLE = "MLX_QWEN3VL_JOIN_SECONDS"
DEFAULT_JOIN_SECONDS = 60.0


def join_seconds() -> float:
    text = os.environ.get(JOIN_SECONDS_VARIABLE, "")
    try:
        seconds = float(text) if text else DEFAULT_JOIN_SECONDS
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise Qwen3VLError(f"{JOIN_SECONDS_VARIABLE}={text!r}: must be a number of seconds > 0")
    return seconds


def awaited_ranks() -> str:
    """The ranks this one connects with at the start (its ring neighbours), from mlx.launch's variables."""
    try:
        rank = int(os.environ["MLX_RANK"])
        with open(os.environ["MLX_HOSTFILE"]) as hostfile:
            ranks = len(json.load(hostfile))
    except (KeyError, ValueError, OSError, TypeError):
        return "this rank: the other ranks"
    neighbours = sorted({(rank - 1) % ranks, (rank + 1) % ranks} - {rank})
    return f"rank {rank}: " + " or ".join(f"rank {n}" for n in neighbours)


def join_ranks() -> mx.distributed.Group:
    """mx.distributed.init(), or one line (Qwen3VLError) when the other ranks do not all join in time."""
    seconds = join_seconds()
    expired = threading.Event()
    timed = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    if timed:
        previous = signal.signal(signal.SIGALRM, lambda signum, frame: expired.set())
        signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return mx.distributed.init()
    except RuntimeError as e:
        who = awaited_ranks()
        if expired.is_set():
            raise Qwen3VLError(
                f"{who} did not join within {seconds:g} s (not started, or its address in the hostfile "
                f"cannot be reached); exiting"
            ) from None
        raise Qwen3VLError(f"{who} cannot be reached ({e}); exiting") from None
    finally:
        if timed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
