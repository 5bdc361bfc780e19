"""Benchmark mlx_qwen3vl against mlx-vlm, mlx-lm's Qwen3 decoder and transformers on one random-weight
checkpoint, on identical inputs, in one run. See bench/README.md.

    python bench/bench.py --preset tiny --compare mlx-vlm,mlx-lm,transformers --save
    python bench/bench.py --preset 4b --layers 2 --vision-blocks 2 --dtype float32 --compare mlx-vlm
    python bench/bench.py --render bench/results/FILE.json   # re-render a saved run's tables

Each system runs in its own process (bench/worker.py), `--rounds` times in alternation, so that peak
memory and the BLAS binding are per system and a busy machine slows all of them alike.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

import inputs as bench_inputs  # noqa: E402
import presets  # noqa: E402
import report  # noqa: E402
from measure import machine, memory_bandwidth_gbs  # noqa: E402
from systems.base import DEFAULT_MEDIA, GROUPS, MEDIA  # noqa: E402

PEERS = ("mlx-vlm", "mlx-lm", "transformers")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(presets.PRESETS), default="tiny")
    p.add_argument("--layers", type=int, help="keep only the first N decoder layers")
    p.add_argument("--vision-blocks", type=int, help="keep only the first M vision blocks")
    p.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16")
    p.add_argument(
        "--quantize", type=int, choices=[2, 3, 4, 6, 8], metavar="BITS", help="MLX affine, group 64"
    )
    p.add_argument("--runs", type=int, default=3, help="timed runs per figure, after --warmup")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--load-runs", type=int, help="timed loads (default --runs): each is a full load")
    p.add_argument("--rounds", type=int, default=1, help="run every system this many times, alternating")
    p.add_argument("--tokens", type=int, default=128, help="tokens generated for the decode figure")
    p.add_argument("--chat-tokens", type=int, default=16, help="tokens generated per chat turn")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--compare", default="", help=f"comma-separated peers: {', '.join(PEERS)}")
    p.add_argument(
        "--peer-dtype",
        default="same",
        help="dtype of the peers: 'same' as --dtype, or bfloat16/float32 (e.g. mlx-vlm's native bfloat16)",
    )
    p.add_argument("--no-openblas", action="store_true", help="ours without the system OpenBLAS")
    p.add_argument("--peer-openblas", action="store_true", help="load the system OpenBLAS for peers too")
    p.add_argument("--figures", default=",".join(GROUPS), help=f"groups: {', '.join(GROUPS)}")
    p.add_argument(
        "--media",
        default=",".join(DEFAULT_MEDIA),
        help=f"inputs of the preprocess, vision and TTFT figures: {', '.join(MEDIA)}",
    )
    p.add_argument("--json", type=Path, help="write the full results here")
    p.add_argument("--save", action="store_true", help="write JSON and a Markdown table to bench/results/")
    p.add_argument("--label", default="", help="added to the saved file names")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per worker process")
    p.add_argument("--cache", type=Path, default=presets.CACHE_ROOT, help="checkpoint cache folder")
    p.add_argument(
        "--fast-build",
        action="store_true",
        help="write random weights directly instead of through transformers' init (GPU machine)",
    )
    args = p.parse_args(argv)
    args.peers = [s for s in args.compare.split(",") if s]
    unknown = set(args.peers) - set(PEERS)
    if unknown:
        p.error(f"unknown peer {sorted(unknown)[0]}; choose from {', '.join(PEERS)}")
    args.groups = [g for g in args.figures.split(",") if g]
    if set(args.groups) - set(GROUPS):
        p.error(f"unknown figure group; choose from {', '.join(GROUPS)}")
    args.media_names = [m for m in args.media.split(",") if m]
    if set(args.media_names) - set(MEDIA):
        p.error(f"unknown media; choose from {', '.join(MEDIA)}")
    if args.peer_dtype not in ("same", "bfloat16", "float32", "float16"):
        p.error("--peer-dtype: same, bfloat16, float32 or float16")
    return args


def run_worker(spec: dict, workdir: Path, timeout: int) -> dict:
    name = spec["system"]
    spec_file, out_file = workdir / f"{name}.spec.json", workdir / f"{name}.out.json"
    spec_file.write_text(json.dumps(spec))
    out_file.unlink(missing_ok=True)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    print(
        f"[bench] {name}: dtype {spec['dtype']}, bits {spec['bits']}, openblas {spec['openblas']}", flush=True
    )
    try:
        proc = subprocess.run(
            [sys.executable, str(HERE / "worker.py"), str(spec_file), str(out_file)],
            timeout=timeout,
            capture_output=True,
            text=True,
        )
        log = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        log = f"timed out after {timeout} s\n{e.stdout or ''}{e.stderr or ''}"
    elapsed = time.perf_counter() - started
    (workdir / f"{name}.log").write_text(log if isinstance(log, str) else str(log))
    if not out_file.exists():
        tail = "\n".join(str(log).splitlines()[-15:])
        print(f"[bench] {name} failed:\n{tail}", flush=True)
        return {"system": name, "config": {}, "figures": {}, "info": {}, "errors": {"worker": tail}}
    result = json.loads(out_file.read_text())
    result["info"]["load_average"] = [load_before, os.getloadavg()[0]]
    result["info"]["worker_seconds"] = elapsed
    print(f"[bench] {name}: done in {elapsed:.0f} s", flush=True)
    return result


def kv_bytes(config: dict, context: int, dtype: str) -> int:
    text = config["text_config"]
    width = {"float32": 4}.get(dtype, 2)
    return context * text["num_hidden_layers"] * 2 * text["num_key_value_heads"] * text["head_dim"] * width


def rerender(path: Path) -> str:
    """A saved JSON rendered again with the current report code (comparisons recomputed)."""
    output = json.loads(path.read_text())
    results = output["results"]
    kind = "cpu" if output["backend"].startswith("cpu") else "gpu"
    output["comparisons"] = {
        p: report.compare(results["ours"], r, kind) for p, r in results.items() if p != "ours"
    }
    output["own_targets"] = report.own_rows(results["ours"])
    return render(output)


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--render"]:
        for path in argv[1:]:
            text = rerender(Path(path))
            Path(path).with_suffix(".md").write_text(text + "\n")
            print(text)
        return {}
    args = parse_args(argv)
    checkpoint = presets.checkpoint(
        args.preset, args.layers, args.vision_blocks, root=args.cache, fast=args.fast_build
    )
    name = checkpoint.name
    config = json.loads((checkpoint / "config.json").read_text())
    folder = bench_inputs.prepare(args.cache / "inputs" / name, checkpoint, args.prompt_tokens)
    peer_dtype = args.dtype if args.peer_dtype == "same" else args.peer_dtype
    base = {
        "checkpoint": str(checkpoint),
        "inputs": str(folder),
        "runs": args.runs,
        "load_runs": args.load_runs,
        "warmup": args.warmup,
        "max_tokens": args.tokens,
        "chat_tokens": args.chat_tokens,
        "figures": args.groups,
        "media": args.media_names,
        "bits": args.quantize,
    }
    specs = [{**base, "system": "ours", "dtype": args.dtype, "openblas": not args.no_openblas}]
    for peer in args.peers:
        if peer == "transformers" and args.quantize:
            print("[bench] transformers skipped: no MLX quantization there", flush=True)
            continue
        if peer == "mlx-lm" and config.get("model_type") == "qwen3_vl_moe":
            # mlx-lm's peer is its dense Qwen3 decoder; its qwen3_moe reads per-expert tensors, not these.
            print("[bench] mlx-lm skipped: its peer is the dense Qwen3 decoder, this is an MoE", flush=True)
            continue
        specs.append({**base, "system": peer, "dtype": peer_dtype, "openblas": args.peer_openblas})

    rounds: dict[str, list[dict]] = {s["system"]: [] for s in specs}
    with tempfile.TemporaryDirectory(prefix="mlx-qwen3vl-bench-") as tmp:
        for r in range(args.rounds):
            order = specs if r % 2 == 0 else list(reversed(specs))
            for spec in order:
                rounds[spec["system"]].append(run_worker(spec, Path(tmp), args.timeout))
    results = {system: report.merge(rs) for system, rs in rounds.items()}
    ours = results["ours"]

    backend = ours["info"].get("backend", "cpu")
    backend_kind = "cpu" if backend.startswith("cpu") else "gpu"
    bandwidth = ours["info"].get("device_bandwidth_gbs") if backend_kind == "gpu" else None
    host = memory_bandwidth_gbs()
    bound = report.decode_bound(
        ours,
        bandwidth or host["read"],
        kv_bytes(config, args.prompt_tokens + args.tokens // 2, args.dtype),
    )
    comparisons = {p: report.compare(ours, results[p], backend_kind) for p in results if p != "ours"}
    output = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "backend": backend,
        "device": ours["info"].get("device"),
        "checkpoint": name,
        "config": {
            "preset": args.preset,
            "layers": config["text_config"]["num_hidden_layers"],
            "vision_blocks": config["vision_config"]["depth"],
            "dtype": args.dtype,
            "peer_dtype": peer_dtype,
            "quantize": args.quantize,
            "openblas": not args.no_openblas,
            "peer_openblas": args.peer_openblas,
            "runs": args.runs,
            "warmup": args.warmup,
            "rounds": args.rounds,
            "tokens": args.tokens,
            "prompt_tokens": args.prompt_tokens,
        },
        "host_bandwidth_gbs": host,
        "decode_bound": bound,
        "results": results,
        "comparisons": comparisons,
        "own_targets": report.own_rows(ours),
    }
    text = render(output)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(output, indent=1, default=str))
    if args.save:
        stem = (
            f"{output['date'][:10]}_{backend_kind}_{name}_{args.dtype}"
            f"{f'_q{args.quantize}' if args.quantize else ''}{f'_{args.label}' if args.label else ''}"
        )
        results_dir = HERE / "results"
        results_dir.mkdir(exist_ok=True)
        (results_dir / f"{stem}.json").write_text(json.dumps(output, indent=1, default=str))
        (results_dir / f"{stem}.md").write_text(text + "\n")
        print(f"[bench] saved bench/results/{stem}.json and .md")
    return output


def render(output: dict) -> str:
    cfg = output["config"]
    machine_info = output["machine"]
    ours = output["results"]["ours"]
    bits = f" {cfg['quantize']}-bit" if cfg["quantize"] else ""
    device = f" ({output['device']})" if output.get("device") else ""
    lines = [
        f"## {output['checkpoint']}: ours {cfg['dtype']}{bits}, peers {cfg['peer_dtype']}{bits}",
        "",
        f"{output['date']}; {machine_info.get('cpu', '?')} ({machine_info['cpus']} CPUs), "
        f"{machine_info['platform']}; MLX backend {output['backend']}{device}; ours with OpenBLAS: "
        f"{'yes' if ours['info'].get('openblas') else 'no'}, "
        f"peers: {'yes' if cfg['peer_openblas'] else 'no'}; "
        f"{cfg['runs']} runs after {cfg['warmup']} warm-up x {cfg['rounds']} round(s), median; "
        f"{cfg['prompt_tokens']}-token prompt, {cfg['tokens']} generated tokens.",
    ]
    for peer, rows in output["comparisons"].items():
        lines += ["", f"### ours vs {peer}", "", report.markdown_table(rows, peer)]
        tokens = output["results"][peer]["info"].get("greedy_tokens")
        mine = ours["info"].get("greedy_tokens")
        if tokens and mine:
            same = next((i for i, (a, b) in enumerate(zip(mine, tokens, strict=False)) if a != b), len(mine))
            lines.append(
                f"\nGreedy tokens after the text prompt: the first {same} of {len(mine)} equal ours."
            )
        errors = output["results"][peer].get("errors")
        if errors:
            lines.append(f"\nErrors: {errors}")
    for row in output["own_targets"]:
        status = "met" if row["met"] else "**missed**"
        lines += [
            "",
            f"Second chat turn TTFT {row['ours']:.1f}x faster than the first (target >= 10x): {status}.",
        ]
    bound = output["decode_bound"]
    if bound and bound.get("measured_tps"):
        lines += [
            "",
            f"Decode bandwidth bound: {bound['weight_bytes'] / 1e9:.3f} GB of weights + "
            f"{bound['kv_bytes'] / 1e9:.3f} GB of KV cache per token at {bound['bandwidth_gbs']:.0f} GB/s "
            f"= {bound['bound_tps']:.1f} tok/s; measured {report.fmt(bound['measured_tps'])} tok/s "
            f"({100 * (bound['fraction_of_bound'] or 0):.0f}% of the bound).",
        ]
    if ours.get("errors"):
        lines.append(f"\nErrors (ours): {ours['errors']}")
    lines += ["", "#### spread", ""]
    for result in output["results"].values():
        lines += [report.spread_table(result), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
