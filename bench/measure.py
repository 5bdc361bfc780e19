"""Measuring helpers shared by the workers: repeated timings, MLX graph size, in-memory quantization,
memory and machine facts. Nothing here imports mlx at module level: a worker decides which BLAS MLX binds
(see mlx_qwen3vl/_blas.py) before mlx.core is first imported.
"""

from __future__ import annotations

import gc
import io
import platform
import re
import resource
import statistics
import time
from collections import Counter
from collections.abc import Callable

GROUP_SIZE = 64


def summary(samples: list[float]) -> dict:
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "samples": samples,
    }


def repeat(fn: Callable[[], float | dict], runs: int, warmup: int = 1) -> dict:
    """Call fn warmup + runs times; fn returns one measured value (or a dict of named values), and the
    values of the timed runs are summarised as median/min/max. `gc.collect` runs between calls, outside
    the measurement."""
    values = []
    for i in range(warmup + runs):
        gc.collect()
        value = fn()
        if i >= warmup:
            values.append(value)
    if isinstance(values[0], dict):
        return {k: summary([v[k] for v in values]) for k in values[0]}
    return summary(values)


class Clock:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start

    def lap(self) -> float:
        return time.perf_counter() - self.start


def count_ops(*arrays) -> tuple[int, dict]:
    """The number of MLX primitives that evaluating these arrays runs (every unevaluated node of their
    graph, as `mx.export_to_dot` writes it), and a histogram by primitive. This is what a backend has to
    dispatch per call, before `mx.compile` fusion: a measure of per-step overhead that does not depend on
    the machine."""
    import mlx.core as mx

    buffer = io.StringIO()
    mx.export_to_dot(buffer, *arrays)
    labels = re.findall(r'\[label ="([^"]+)", shape=rectangle\]', buffer.getvalue())
    return len(labels), dict(Counter(labels).most_common())


def quantize(model, bits: int, skip: tuple[str, ...]) -> int:
    """MLX affine quantization (group size 64) of every Linear and Embedding outside the `skip` prefixes
    whose input width divides by the group size, as mlx-lm's and mlx-vlm's converters do (they also
    quantize the embedding, which is the lm_head of tied models). Returns the number of layers quantized.
    The activations keep the dtype of the non-quantized parameters (scales included)."""
    import mlx.nn as nn

    count = 0

    def predicate(path: str, module) -> bool:
        nonlocal count
        if path.startswith(skip) or not isinstance(module, (nn.Linear, nn.Embedding)):
            return False
        if module.weight.shape[-1] % GROUP_SIZE:
            return False
        count += 1
        return True

    nn.quantize(model, group_size=GROUP_SIZE, bits=bits, class_predicate=predicate)
    return count


def weight_bytes_per_token(model, decoder_prefixes: tuple[str, ...], embedding: str, tied: bool) -> int:
    """Bytes of parameters one decode step reads: every decoder parameter, the lm_head, and of the input
    embedding only one row unless it is tied to the lm_head (then all of it is read by the projection)."""
    from mlx.utils import tree_flatten

    total = 0
    for name, value in tree_flatten(model.parameters()):
        if not name.startswith(decoder_prefixes):
            continue
        if name.startswith(embedding) and not tied:
            total += value.nbytes // value.shape[0]
        else:
            total += value.nbytes
    return total


def mlx_memory(reset: bool = False) -> float:
    """MLX's peak allocation in GB since the last reset (weights included)."""
    import mlx.core as mx

    peak = mx.get_peak_memory() / 1e9
    if reset:
        mx.reset_peak_memory()
    return peak


def max_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def system_openblas() -> str | None:
    """The system OpenBLAS if this process has it mapped (loaded before mlx.core, it serves MLX's
    float32 matmuls). Copies bundled inside wheels (numpy's, OpenCV's) are loaded privately and do not."""
    try:
        maps = open("/proc/self/maps").read()
    except OSError:
        return None
    paths = {p for p in re.findall(r"(/\S*libopenblas\S*\.so\S*)", maps) if "-packages/" not in p}
    return min(paths) if paths else None


def machine() -> dict:
    import os

    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def memory_bandwidth_gbs(gib: float = 1.0) -> dict:
    """Host memory bandwidth from numpy: a 1 GiB float32 sum (read) and copy (read + write), best of 5."""
    import numpy as np

    a = np.ones(int(gib * 2**30) // 4, dtype=np.float32)
    b = np.empty_like(a)
    reads, copies = [], []
    for _ in range(5):
        with Clock() as c:
            a.sum()
        reads.append(c.seconds)
        with Clock() as c:
            np.copyto(b, a)
        copies.append(c.seconds)
    return {"read": a.nbytes / min(reads) / 1e9, "copy": 2 * a.nbytes / min(copies) / 1e9}


def mlx_bandwidth_gbs(gib: float = 1.0) -> float:
    """Device memory bandwidth as MLX sees it: `x + 1` over 1 GiB of float32 (read + write), best of 5."""
    import mlx.core as mx

    x = mx.zeros((int(gib * 2**30) // 4,), dtype=mx.float32)
    mx.eval(x)
    best = float("inf")
    for _ in range(6):
        with Clock() as c:
            mx.eval(x + 1)
        best = min(best, c.seconds)
    return 2 * x.nbytes / best / 1e9


def backend() -> tuple[str, str | None]:
    """("cpu" | "cuda" | "metal", device name) of MLX's default device."""
    import mlx.core as mx

    name = mx.device_info().get("device_name") if hasattr(mx, "device_info") else None
    if mx.default_device() == mx.cpu:
        return "cpu", name
    return ("cuda" if mx.cuda.is_available() else "metal"), name
