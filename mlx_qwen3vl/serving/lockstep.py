"""The server across ranks (`mlx.launch ... server.py`, docs/distributed.md): rank 0 serves HTTP and runs
the engine; every other rank runs the same engine with no web layer, and its answers go nowhere.

Each forward pass holds collectives that must pair up across the ranks, so every rank's engine must run
the same passes in the same order. An engine's steps depend on its own computation, which is the same on
every rank (the same code on the same numbers: logits are gathered whole on every rank, the random state
and the vision tower's pieces are agreed at load), and on three things from outside: which requests
came, which were cancelled (a client gone, the server stopping) and when to stop. Rank 0 decides those at
the start of each step and shares them (`Lockstep.share`); what follows from them (the prompt cache's
choices, the batch's rows, sampling, where an answer ends) then happens alike everywhere.

The cost: one scalar all-sum per step when nothing came, the common decode step; a request that came is
sent once with its prompt's token ids and its media's pixel rows, which rank 0 alone fetched and read.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field

import mlx.core as mx

from ..distributed import shared_bytes
from ..processor import Processor
from ..turn import Turn


@dataclass
class Step:
    """What an engine step starts with besides what the engine holds: the requests that came (Jobs, each
    numbered by rank 0), the numbers of those cancelled, and whether the engine stops instead."""

    arrivals: list = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    stop: bool = False


class Lockstep:
    """Rank 0's steps shared with the other ranks of `group`. There, `processor` rebuilds each request's
    turn from its token ids, media and options, and `mirror(number, turn)` makes the request's stand-in,
    whose answer goes nowhere."""

    def __init__(self, group: mx.distributed.Group, processor: Processor, mirror):
        self.group, self.processor, self.mirror = group, processor, mirror

    @property
    def leads(self) -> bool:
        return self.group.rank() == 0

    def share(self, step: Step | None = None) -> Step:
        """On rank 0, send its `step` to the other ranks; on another rank, the step rank 0 sent."""
        if self.leads:
            quiet = not (step.arrivals or step.dropped or step.stop)
            requests = [(job.number, job.turn.ids, job.turn.media, job.turn.options) for job in step.arrivals]
            shared_bytes(b"" if quiet else pickle.dumps((requests, step.dropped, step.stop)), self.group)
            return step
        data = shared_bytes(None, self.group)
        if not data:
            return Step()
        # Rank 0's own pickle, over the connection of ranks the user launched together (the same trust
        # as the model files every rank loads).
        requests, dropped, stop = pickle.loads(data)  # noqa: S301
        arrivals = [
            self.mirror(number, Turn(self.processor, ids, media, options))
            for number, ids, media, options in requests
        ]
        return Step(arrivals, dropped, stop)
