"""Ctrl-C across ranks: rank 0 decides, and every rank stops at the same step.

A KeyboardInterrupt raised wherever each rank's Python happens to be would leave the ranks out of step:
under `mlx.launch` the terminal's Ctrl-C reaches every rank on the launching machine (they share its
process group) and none elsewhere, and ranks started on terminals of their own get it only where it was
pressed; a rank that stops mid-answer leaves the others waiting at their next collective. So:

- while a turn runs (its media encoded, its prompt fed, its answer generated), a Ctrl-C only records
  that it came (`step_boundaries`), and after each prompt chunk and each decoded token every rank learns
  whether rank 0 recorded one (`interrupted_on_rank_0`, one all-reduce of one number): all then raise
  KeyboardInterrupt at the same point, and the turn ends as it does in one process, what it fed so far
  kept in the cache and the answer so far in the conversation (a Ctrl-C during the media's encoding,
  which has no collectives, takes effect at the first prompt chunk);
- elsewhere (reading a question, loading), rank 0 raises KeyboardInterrupt as one process does, and
  the entry point shares that with the others at its next agreement (chat.py's `read_line`); the other
  ranks ignore Ctrl-C themselves (`follow_rank_0_interrupts`).
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

import mlx.core as mx


class RecordedInterrupt:
    """Whether a Ctrl-C came while `step_boundaries` held it back."""

    seen = False


@contextmanager
def step_boundaries(group: mx.distributed.Group | None):
    """Across ranks (`group`), Ctrl-C recorded, not raised, for the duration. Only where Python raises
    it now (the main thread, with its default handler): a rank that ignores Ctrl-C, or a thread, records
    nothing. In one process (None): nothing changes."""
    raises = threading.current_thread() is threading.main_thread()
    if group is None or not raises or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return

    def record(signum, frame):
        RecordedInterrupt.seen = True

    RecordedInterrupt.seen = False
    signal.signal(signal.SIGINT, record)
    try:
        yield
    finally:
        # A Ctrl-C recorded after the last step ends nothing: the answer has ended on every rank.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        RecordedInterrupt.seen = False


def interrupted_on_rank_0(group: mx.distributed.Group, interrupted: bool | None = None) -> mx.array:
    """Whether rank 0 was interrupted (`interrupted`; None: whether it recorded a Ctrl-C), on every rank
    once evaluated."""
    mine = group.rank() == 0 and (RecordedInterrupt.seen if interrupted is None else interrupted)
    return mx.distributed.all_sum(mx.array(mine, dtype=mx.int32), group=group)


def stop_if_rank_0_interrupted(group: mx.distributed.Group | None) -> None:
    """Across ranks: KeyboardInterrupt on every rank if rank 0 has recorded a Ctrl-C (one collective)."""
    if group is not None and interrupted_on_rank_0(group).item():
        raise KeyboardInterrupt


def follow_rank_0_interrupts(group: mx.distributed.Group) -> None:
    """On a rank other than 0: Ctrl-C ignored (rank 0's decides for every rank)."""
    if group.rank() != 0:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
