"""When and where the CPU backend's work runs: blocks of a large result evaluated one at a time, the
quantized kernel's products split over a CPU stream per core, numpy tasks over a thread per core.

Work split into blocks to bound memory is evaluated one block at a time (`concatenate_evaluated`). MLX
allocates an operation's output when it dispatches it, ahead of its execution, so blocks built lazily in
one graph would all be resident at once.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import mlx.core as mx

from . import openblas

# The cores this process may run on: numpy's workers and the quantized products' streams, one per core.
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def concatenate_evaluated(blocks: Iterable[mx.array], axis: int) -> mx.array:
    """Concatenate lazily produced blocks, evaluating each before the next is built."""
    parts = []
    for block in blocks:
        mx.eval(block)
        parts.append(block)
    return mx.concatenate(parts, axis=axis) if len(parts) > 1 else parts[0]


def output_rows_on_cores(product: Callable[[slice], mx.array], rows: int) -> mx.array:
    """product(part) for CORES consecutive parts of a weight's output rows, each built on a CPU stream of
    its own, concatenated along the last axis. MLX runs each stream's operations on a thread of that
    stream's, so the parts' products run at once, one per core; each output value is the kernel's own.
    The parts are views of the weight, not copies. Another device's default stream takes the whole."""
    parts = min(CORES, rows) if mx.default_device() == mx.cpu else 1
    if parts == 1:
        return product(slice(0, rows))
    bounds = [rows * k // parts for k in range(parts + 1)]
    outputs = []
    for k, stream in enumerate(_streams(parts)):
        with mx.stream(stream):
            outputs.append(product(slice(bounds[k], bounds[k + 1])))
    return mx.concatenate(outputs, axis=-1)


class _ThreadStreams(threading.local):
    extra: list[mx.Stream]

    def __init__(self):
        self.extra = []


_STREAMS = _ThreadStreams()


def _streams(count: int) -> list[mx.Stream]:
    """The calling thread's default CPU stream and count - 1 more, made on first need: an MLX stream
    belongs to the thread that made it (another thread's graph cannot use it)."""
    extra = _STREAMS.extra
    extra.extend(mx.new_stream(mx.cpu) for _ in range(count - 1 - len(extra)))
    return [mx.default_stream(mx.cpu), *extra[: count - 1]]


def on_cores(work: Callable[[int], None]) -> None:
    """work(k) on each of CORES threads, each running its products on its own core
    (`openblas.single_threaded`) and taking tasks from a queue `work` shares; without the system OpenBLAS,
    once, on this thread (numpy's products use the cores already)."""
    if not openblas.loaded:
        work(0)
        return
    with openblas.single_threaded():
        list(_threads().map(work, range(CORES)))


@cache
def _threads() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=CORES, thread_name_prefix="mlx-qwen3vl-numpy")
