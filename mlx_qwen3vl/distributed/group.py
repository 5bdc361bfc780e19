"""What the ranks of one run agree on besides the model's numbers: that they loaded the same model, the
random state sampling draws from, the text rank 0 reads, and what a lost rank means."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..errors import Qwen3VLError

# What MLX's backends say when a peer's connection breaks (the ring's TCP sockets; JACCL's and MPI's
# wording is matched by its common part).
LOST_PEER_MARKERS = ("connection to a peer was lost", "closed by the peer", "Connection reset")


def model_fingerprint(path: Path) -> dict[str, bytes]:
    """Digests of what makes a model directory this model: its config.json, and its weight files' names
    and sizes with the index that maps tensors to them (the files' contents would take as long to read
    as loading them)."""
    config = path / "config.json"
    files = sorted(path.glob("*.safetensors"))
    listing = "\n".join(f"{f.name} {f.stat().st_size}" for f in files)
    index = path / "model.safetensors.index.json"
    listing += index.read_text() if index.exists() else ""
    return {
        "config.json": hashlib.sha256(config.read_bytes() if config.exists() else b"").digest(),
        "weight files": hashlib.sha256(listing.encode()).digest(),
    }


def check_same_model(path: Path, group: mx.distributed.Group) -> None:
    """One line naming the rank and the part whose model directory differs from rank 0's."""
    digests = model_fingerprint(path)
    mine = np.frombuffer(b"".join(digests.values()), dtype=np.uint8).astype(np.int32)
    everyone = np.array(mx.distributed.all_gather(mx.array(mine), group=group)).reshape(group.size(), -1)
    for rank in range(1, group.size()):
        for n, part in enumerate(digests):
            if (everyone[rank, n * 32 : (n + 1) * 32] != everyone[0, n * 32 : (n + 1) * 32]).any():
                raise Qwen3VLError(
                    f"rank {rank}'s model directory has another {part} than rank 0's: every rank must "
                    "load the same model (copy the directory to each machine)"
                )


def agree_on_random_state(group: mx.distributed.Group) -> None:
    """Seed MLX's generator alike on every rank (rank 0's draw): sampling without a seed then picks the
    same token everywhere, as each rank's next step needs."""
    seed = int.from_bytes(os.urandom(4), "little") >> 1 if group.rank() == 0 else 0
    seed = mx.distributed.all_sum(mx.array(seed, dtype=mx.int32), group=group).item()
    mx.random.seed(seed)


def shared_bytes(data: bytes | None, group: mx.distributed.Group) -> bytes:
    """Rank 0's bytes on every rank (the others pass None): their length, then, unless empty, the bytes
    themselves, each an all-sum to which the other ranks add zeros."""
    mine = data if group.rank() == 0 else b""
    length = mx.distributed.all_sum(mx.array(len(mine), dtype=mx.int32), group=group).item()
    if length == 0:  # every rank knows it from the length alone: one scalar, the common case of a step
        return b""
    buffer = np.zeros(length, dtype=np.uint8)
    buffer[: len(mine)] = np.frombuffer(mine, dtype=np.uint8)
    return bytes(np.array(mx.distributed.all_sum(mx.array(buffer), group=group)))


def shared_text(text: str | None, group: mx.distributed.Group) -> str | None:
    """Rank 0's text (a line it read) on every rank; None (end of input) stays None."""
    data = shared_bytes(b"\xff" if text is None else text.encode(), group)
    return None if data == b"\xff" else data.decode()


def agreed_vision_budget(budget: float, group: mx.distributed.Group) -> int:
    """The smallest of the ranks' vision budgets, for all: the vision tower then runs in the same pieces
    on every rank (the server's engine pauses after each, and its ranks must pause alike; machines of
    different memory would otherwise cut a video differently)."""
    budgets = mx.distributed.all_gather(mx.array([int(budget)], dtype=mx.int64), group=group)
    return int(mx.min(budgets).item())


def lost_peer(error: BaseException, group: mx.distributed.Group) -> str | None:
    """The one line for an error that says another rank went away, or None for any other error."""
    if not isinstance(error, RuntimeError) or not any(m in str(error) for m in LOST_PEER_MARKERS):
        return None
    return lost_peer_line(group)


def lost_peer_line(group: mx.distributed.Group) -> str:
    """What a rank says when a neighbour in the ring went away."""
    rank, ranks = group.rank(), group.size()
    neighbours = sorted({(rank - 1) % ranks, (rank + 1) % ranks} - {rank})
    which = " or ".join(f"rank {n}" for n in neighbours)
    return f"rank {rank}: lost the connection to {which} (it stopped or cannot be reached); exiting"
