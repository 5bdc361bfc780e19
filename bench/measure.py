"""Measuring helpers shared by the workers: repeated timings, MLX graph size, in-memory quantization,
memory and machine facts. Nothing here imports mlx at module level: a worker decides which BLAS MLX binds
(see mlx_qwen3vl/cpu/openblas.py) before mlx.core is first imported.
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
from contextlib import contextmanager

GROUP_SIZE = 64
ROUTER_BITS = 8


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


def count_ops(*arrays, fused: Counter | None = None) -> tuple[int, dict]:
    """The number of MLX primitives that evaluating these arrays runs (every unevaluated node of their
    graph, as `mx.export_to_dot` writes it), and a histogram by primitive. This is what a backend has to
    dispatch per call, before `mx.compile` fusion: a measure of per-step overhead that does not depend on
    the machine. `fused`: the kernels `fused_kernels_as_nodes` stood in for while the graph was built."""
    import mlx.core as mx

    buffer = io.StringIO()
    mx.export_to_dot(buffer, *arrays)
    labels = Counter(re.findall(r'\[label ="([^"]+)", shape=rectangle\]', buffer.getvalue()))
    if fused is not None:
        stand_ins = labels.pop("Depends", 0)
        if stand_ins == sum(fused.values()):
            labels.update(fused)
        else:  # a compiled function replays the stand-ins it traced once: the kinds are unknown
            labels["fused kernel"] = stand_ins
    return sum(labels.values()), dict(labels.most_common())


# MLX's fused kernels: one graph node each on its GPU backends (Metal, CUDA), while its CPU backend builds
# their fallback graphs when they are called (a rope is ~30 nodes, an RMSNorm ~15).
FUSED_KERNELS = {
    "rms_norm": "RMSNorm",
    "layer_norm": "LayerNorm",
    "rope": "RoPE",
    "scaled_dot_product_attention": "ScaledDotProductAttention",
}


@contextmanager
def fused_kernels_as_nodes():
    """While active, each of MLX's fused kernels (and `mx.dequantize`) adds one node to the graph, as on
    a GPU, whatever the machine: a stand-in of the output's shape and dtype that depends on the inputs
    (`mx.depends`). The graph is for counting only, never for evaluating. Yields the calls made, by kernel,
    for `count_ops(..., fused=calls)`. On a GPU the two counts should agree: the bench reports both."""
    import mlx.core as mx

    calls: Counter = Counter()

    def stand_in(name, shape_of, *arrays):
        calls[name] += 1
        like = arrays[0]
        out = mx.zeros(shape_of(like, arrays), like.dtype)
        mx.eval(out)  # a constant, not a node
        return mx.depends(out, [a for a in arrays if isinstance(a, mx.array)])

    same = lambda x, arrays: x.shape  # noqa: E731
    real = {name: getattr(mx.fast, name) for name in FUSED_KERNELS}
    real_dequantize = mx.dequantize
    mx.fast.rms_norm = lambda x, weight, eps, **k: stand_in("RMSNorm", same, x, weight)
    mx.fast.layer_norm = lambda x, weight, bias, eps, **k: stand_in("LayerNorm", same, x, weight, bias)
    mx.fast.rope = lambda x, dims, **k: stand_in("RoPE", same, x, k.get("offset"), k.get("freqs"))
    mx.fast.scaled_dot_product_attention = lambda q, k, v, **kw: stand_in(
        "ScaledDotProductAttention",
        lambda q, arrays: (*q.shape[:-1], arrays[2].shape[-1]),
        q,
        k,
        v,
        kw.get("mask") if isinstance(kw.get("mask"), mx.array) else None,
    )

    def dequantize(w, scales, biases=None, group_size=64, bits=4, **k):
        shape = lambda s, arrays: (*w.shape[:-1], w.shape[-1] * 32 // bits)  # noqa: E731
        return stand_in("Dequantize", shape, scales, w, biases)

    mx.dequantize = dequantize
    try:
        yield calls
    finally:
        for name, fn in real.items():
            setattr(mx.fast, name, fn)
        mx.dequantize = real_dequantize


def decode_step_ops(build_step) -> dict:
    """The nodes of one decode step counted two ways: as this backend builds its graph ("native"), and
    with every fused kernel one node, as a GPU builds it ("gpu_path"). `build_step()` must build the
    step's logits afresh on each call, on `fresh_caches` (an update of the same cache would chain the two
    graphs)."""
    native = count_ops(build_step())
    with fused_kernels_as_nodes() as calls:
        gpu_path = count_ops(build_step(), fused=calls)
    return {"gpu_path": gpu_path, "native": native}


def fresh_caches(caches) -> list:
    """Copies of KV caches that share their evaluated state: building a step on a copy leaves the
    original as it was (a cache's update assigns into its key and value arrays in place)."""
    import copy

    import mlx.core as mx

    copies = []
    for cache in caches:
        fresh = copy.copy(cache)
        for name in ("keys", "values"):
            if getattr(cache, name, None) is not None:
                setattr(fresh, name, mx.array(getattr(cache, name)))  # a new array object, no new node
        copies.append(fresh)
    return copies


def skeleton(model) -> None:
    """Every parameter replaced by an evaluated array of its shape and dtype that takes no memory (a
    broadcast scalar): a model at full size to build graphs of, never to run."""
    import mlx.core as mx
    from mlx.utils import tree_map

    model.update(tree_map(lambda p: mx.broadcast_to(mx.zeros((), p.dtype), p.shape), model.parameters()))
    mx.eval(model.parameters())


def quantize(model, bits: int, skip: tuple[str, ...]) -> int:
    """MLX affine quantization (group size 64) of every Linear and Embedding outside the `skip` prefixes
    whose input width divides by the group size, as mlx-lm's and mlx-vlm's converters do (they also
    quantize the embedding, which is the lm_head of tied models). Returns the number of layers quantized.
    The activations keep the dtype of the non-quantized parameters (scales included).
    MoE models: the experts (mlx-lm's and mlx-vlm's `SwitchLinear`, one per projection) too, and each
    router (`mlp.gate`) at 8 bits, as this package's converter and mlx-vlm's quant_predicate keep it."""
    import mlx.nn as nn

    count = 0

    def predicate(path: str, module) -> bool | dict:
        nonlocal count
        experts = type(module).__name__.endswith("SwitchLinear")  # also cpu/widening.py's Float32SwitchLinear
        if path.startswith(skip) or not (experts or isinstance(module, (nn.Linear, nn.Embedding))):
            return False
        if module.weight.shape[-1] % GROUP_SIZE:
            return False
        count += 1
        if path.endswith("mlp.gate") and isinstance(module, nn.Linear):
            return {"group_size": GROUP_SIZE, "bits": ROUTER_BITS}
        return True

    nn.quantize(model, group_size=GROUP_SIZE, bits=bits, class_predicate=predicate)
    return count


def weight_bytes_per_token(
    model, decoder_prefixes: tuple[str, ...], embedding: str, tied: bool, text_config=None
) -> int:
    """Bytes of parameters one decode step reads: every decoder parameter, the lm_head, and of the input
    embedding only one row unless it is tied to the lm_head (then all of it is read by the projection);
    of a MoE layer's experts (`switch_mlp`, [experts, ...]) the chosen ones, num_experts_per_tok of
    num_experts (read from `text_config`)."""
    from mlx.utils import tree_flatten

    experts = getattr(text_config, "num_experts", 0) or 0
    chosen = getattr(text_config, "num_experts_per_tok", 0) or 0
    total = 0
    for name, value in tree_flatten(model.parameters()):
        if not name.startswith(decoder_prefixes):
            continue
        if name.startswith(embedding) and not tied:
            total += value.nbytes // value.shape[0]
        elif ".switch_mlp." in name and experts:
            total += value.nbytes * chosen // experts
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


def run_record(args, results) -> dict:
    """A bench run as saved: when, where, the arguments, the results. The load average is kept because
    other processes on the cores make the times noisy."""
    import datetime
    import os
    from pathlib import Path

    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "load_average": os.getloadavg()[0],
        "backend": backend()[0],
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "results": results,
    }


def save_record(record: dict, text: str, name: str, label: str = "") -> str:
    """bench/results/<date>_<backend>_<name>[_<label>].json and .md; the stem written."""
    import json
    from pathlib import Path

    stem = f"{record['date'][:10]}_{record['backend']}_{name}" + (f"_{label}" if label else "")
    results = Path(__file__).resolve().parent / "results"
    (results / f"{stem}.json").write_text(json.dumps(record, indent=1, default=str))
    (results / f"{stem}.md").write_text(text + "\n")
    print(f"[bench] saved bench/results/{stem}.json and .md")
    return stem


def finish(args, run, render, name) -> dict:
    """A bench script's end: print a saved run again (`--render`), or run, print and (`--save`) save it
    under `name(results)`."""
    import json

    if args.render:
        output = json.loads(args.render.read_text())
        print(render(output))
        return output
    output = run_record(args, run(args))
    text = render(output)
    print(text)
    if args.save:
        save_record(output, text, name(output["results"]), args.label)
    return output
