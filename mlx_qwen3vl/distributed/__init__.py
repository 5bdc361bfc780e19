"""Qwen3-VL over several processes (usually several Macs) on MLX's distributed layer: `mlx.launch` starts
one process per rank (ring over TCP, JACCL over Thunderbolt RDMA, MPI), each calls
`load(path, group=mx.distributed.init())` and holds its part of the model; every rank then runs the same
generation, and the ranks' collectives keep them in step. docs/distributed.md says how to run it and
what each split costs.

- tensor.py: tensor parallelism (heads, MLP and expert widths, vocabulary over the ranks), the default
- pipeline.py: pipeline parallelism (consecutive layers per rank), for slow links
- parts.py: reading a rank's slices of the split tensors, and only those, from the files
- start.py: joining the ranks, bounded in time
- group.py: what the ranks agree on besides the model (same model files, random state, rank 0's input)
  and the one line for a lost rank
- watch.py: a lost rank the backend sees but no evaluation reports
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .group import (
    agree_on_random_state,
    agreed_vision_budget,
    check_same_model,
    lost_peer,
    shared_bytes,
    shared_text,
)
from .parts import read_held_parts
from .pipeline import keep_held_layers
from .start import join_ranks
from .tensor import shard_tensor_parallel
from .watch import before_exit, watch_for_stopped_backend

__all__ = [
    "agree_on_random_state",
    "agreed_vision_budget",
    "before_exit",
    "check_same_model",
    "follow_rank_0",
    "is_primary",
    "launched_group",
    "lost_peer",
    "shard",
    "shared_bytes",
    "shared_text",
    "watch_for_stopped_backend",
]


def shard(model: nn.Module, group: mx.distributed.Group, path: Path, pipeline: bool = False) -> None:
    """Keep this rank's part of a model loaded from `path`, not yet evaluated (tensor parallel, or with
    `pipeline` its consecutive layers), and agree on the random state. Pipeline mode drops the other
    ranks' layers, which are then never read; tensor mode reads its slices of the split tensors."""
    if pipeline:
        keep_held_layers(model, group)
    else:
        read_held_parts(model, path, shard_tensor_parallel(model, group))
    model.group = group  # what generation asks to know that it runs across ranks
    agree_on_random_state(group)


def is_primary(group: mx.distributed.Group | None) -> bool:
    """The rank that reads input and writes output (rank 0, or the only process)."""
    return group is None or group.rank() == 0


def launched_group() -> mx.distributed.Group | None:
    """The group of the ranks `mlx.launch` started this process among, or None when it runs alone. A
    rank that does not join in time ends the start with one line naming it (`start.py`)."""
    group = join_ranks()
    return group if group.size() > 1 else None


def follow_rank_0(group: mx.distributed.Group) -> None:
    """On a rank other than 0: standard output goes nowhere (rank 0 prints the answers; the others run
    the same steps silently). Standard error stays, for errors."""
    if group.rank() != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the rest of the process)
