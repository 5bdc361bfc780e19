"""Decode speed, time to first token and bytes sent per token for 1 rank and for 2 ranks on this machine
(`mlx.launch --backend ring -n 2`, tensor and pipeline mode), on a random-weight checkpoint at the 4B's
widths with few layers (bench/presets.py). docs/distributed.md has the estimate for two Macs.

    python bench/distributed.py --layers 2 --tokens 32 --prompt-tokens 256 --save

Two ranks on one machine share its cores and talk over loopback: the figures show the cost of the
collectives and of the split, not the speed of two Macs. Each rank is pinned to its own core and the
single process to one core too, so that the three runs do the same work per core. The bytes each rank
sends per token are counted from the collectives a decode step builds (ring algorithms: an all-reduce of
n bytes over N ranks sends 2 (N - 1) / N x n from each rank, an all-gather (N - 1) x its part). Across
ranks a decode step then agrees on whether rank 0 saw a Ctrl-C (one all-reduce of one number, evaluated
after the step, distributed/interrupt.py): its time is the last column.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
# Ctrl-C agreements timed one after another, for the time of one.
AGREEMENTS = 200


def pin_to_one_core() -> None:
    """This process on one core of its own (a rank's index among the cores), before MLX starts threads."""
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[int(os.environ.get("MLX_RANK", 0)) % len(cores)]})
    os.environ["OPENBLAS_NUM_THREADS"] = "1"


class SentBytes:
    """Counts what this rank sends in the collectives built while it is active."""

    def __init__(self, mx):
        self.mx, self.total, self.active = mx, 0, False
        distributed = mx.distributed
        self.originals = {name: getattr(distributed, name) for name in ("all_sum", "all_gather", "send")}
        for name, original in self.originals.items():
            setattr(distributed, name, self.counting(name, original))

    def counting(self, name, original):
        def call(x, *args, group=None, **kwargs):
            if self.active:
                ranks = (group or self.mx.distributed.init()).size()
                share = {"all_sum": 2 * (ranks - 1) / ranks, "all_gather": ranks - 1, "send": 1}[name]
                self.total += share * x.nbytes
            return original(x, *args, group=group, **kwargs)

        return call


def worker(args: argparse.Namespace) -> None:
    pin_to_one_core()
    sys.path.insert(0, str(ROOT))
    import mlx.core as mx
    import numpy as np

    from mlx_qwen3vl import load
    from mlx_qwen3vl.distributed.interrupt import interrupted_on_rank_0
    from mlx_qwen3vl.generation import generate_step

    sent = SentBytes(mx)
    group = mx.distributed.init()
    group = group if group.size() > 1 else None
    tic = time.perf_counter()
    model, _ = load(args.checkpoint, dtype=args.dtype, group=group, pipeline=args.pipeline)
    load_seconds = time.perf_counter() - tic
    vocab = model.config.text_config.vocab_size
    ids = np.random.default_rng(0).integers(0, vocab - 1000, (1, args.prompt_tokens))
    ttfts, rates = [], []
    for _ in range(args.runs):
        cache = model.make_cache()
        tic = time.perf_counter()
        steps = generate_step(model, model.prepare(ids), cache, max_tokens=args.tokens + 1)
        next(steps)
        ttfts.append(time.perf_counter() - tic)
        tic = time.perf_counter()
        for _ in steps:
            pass
        rates.append(args.tokens / (time.perf_counter() - tic))
    cache = model.make_cache()
    mx.eval(model(mx.array(ids), cache=cache))
    sent.active = True
    logits = model(mx.array([[1]]), cache=cache)  # one decode step's graph
    mx.eval(logits)
    # Across ranks a decode step then agrees on whether rank 0 saw a Ctrl-C (distributed/interrupt.py).
    agreement = None if group is None else interrupted_on_rank_0(group)
    sent.active = False
    mx.eval([] if agreement is None else agreement)
    agreement_ms = 0.0
    if group is not None:  # that agreement's time: one all-reduce of one number, evaluated apart
        tic = time.perf_counter()
        for _ in range(AGREEMENTS):
            mx.eval(interrupted_on_rank_0(group))
        agreement_ms = (time.perf_counter() - tic) / AGREEMENTS * 1000
    result = {
        "ranks": 1 if group is None else group.size(),
        "mode": "single" if group is None else ("pipeline" if args.pipeline else "tensor"),
        "load_s": load_seconds,
        "ttft_s": sorted(ttfts)[len(ttfts) // 2],
        "decode_tps": sorted(rates)[len(rates) // 2],
        "sent_bytes_per_token": sent.total,
        "agreement_ms": agreement_ms,
        "active_memory_bytes": mx.get_active_memory(),
    }
    if group is None or group.rank() == 0:
        Path(args.out).write_text(json.dumps(result))


def run(args: argparse.Namespace, ranks: int, pipeline: bool, out: Path) -> dict:
    command = [sys.executable, __file__, "--worker", str(out), "--checkpoint", str(args.checkpoint)]
    command += ["--dtype", args.dtype, "--tokens", str(args.tokens), "--runs", str(args.runs)]
    command += ["--prompt-tokens", str(args.prompt_tokens)] + (["--pipeline"] if pipeline else [])
    if ranks > 1:
        launcher = [str(Path(sys.executable).parent / "mlx.launch"), "--backend", "ring", "-n", str(ranks)]
        command = launcher + ["--python", sys.executable] + command[1:]
    subprocess.run(command, check=True, cwd=ROOT)
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vision-blocks", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--modes", default="single,tensor,pipeline", help="which runs (comma-separated)")
    p.add_argument("--save", action="store_true")
    p.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    p.add_argument("--pipeline", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.out = args.worker
        worker(args)
        return
    sys.path.insert(0, str(ROOT / "bench"))
    from presets import checkpoint

    args.checkpoint = checkpoint("4b", args.layers, args.vision_blocks)
    rows = []
    runs = {"single": (1, False), "tensor": (2, False), "pipeline": (2, True)}
    for ranks, pipeline in (runs[mode] for mode in args.modes.split(",")):
        rows.append(run(args, ranks, pipeline, Path(f"/tmp/bench-distributed-{os.getpid()}.json")))
        print(json.dumps(rows[-1]), flush=True)
    name = f"4b-L{args.layers}-V{args.vision_blocks}"
    table = [
        f"# Distributed on one machine: {name}, {args.dtype}, prompt {args.prompt_tokens} tokens, "
        f"{args.tokens} decoded, median of {args.runs}",
        "",
        "| ranks | mode | TTFT (s) | decode (tokens/s) | sent per token per rank | resident (rank 0) "
        "| Ctrl-C agreement (ms per token) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        table.append(
            f"| {r['ranks']} | {r['mode']} | {r['ttft_s']:.3f} | {r['decode_tps']:.2f} | "
            f"{r['sent_bytes_per_token'] / 1024:.1f} KiB | {r['active_memory_bytes'] / 2**20:.0f} MiB | "
            f"{r['agreement_ms']:.3f} |"
        )
    print("\n".join(table))
    if args.save:
        modes = "" if args.modes == "single,tensor,pipeline" else "_" + args.modes.replace(",", "-")
        stem = RESULTS / f"{time.strftime('%Y-%m-%d')}_cpu_{name}_{args.dtype}_distributed{modes}"
        stem.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
        stem.with_suffix(".md").write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
