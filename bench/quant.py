"""Uniform 4-bit from our converter and from mlx-vlm's, on the same source, measured by the same check:
next-token KL and top-1 agreement on the calibration set, file size, conversion time, check time.

    python bench/quant.py [--layers 3] [--vision-blocks 4] [--save [--label NAME]]

The source is a random-weight checkpoint at the real 4B widths (tests/checkpoints.py FULL_WIDTH_4B: text
2560 wide, vision 1024, the full 151,936-token vocabulary) with few layers, written by transformers; both
converters read the same directory (its config.json in the published layout, which mlx-vlm reads). Each
conversion runs in its own process, timed around the conversion call alone (not the imports), with its
peak resident memory and the bytes it read (Linux). Ours runs with its check, as convert.py does: the
conversion's time and the check's are its report's (the check runs on each tensor as it is written). The
check as a command (`mlx_qwen3vl.check`) then compares each output with the source in this process,
reading both again.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(1, str(ROOT))

CONVERTERS = {
    "ours": "from mlx_qwen3vl.convert import convert\n"
    "read_before, start = read_so_far(), time.perf_counter()\n"
    "convert(source, out, q_bits=4, q_group_size=64, progress=False, check=True)\n",
    "mlx-vlm": "from mlx_vlm.convert import convert\n"
    "read_before, start = read_so_far(), time.perf_counter()\n"
    "convert(source, out, quantize=True, q_bits=4, q_group_size=64)\n",
}


# The bytes this process has read through system calls, files included (Linux's /proc/self/io; -1 where
# there is none): the conversion's reading, the page cache's hits included.
READ_SO_FAR = """
def read_so_far():
    try:
        return int(open("/proc/self/io").read().split("rchar:")[1].split()[0])
    except OSError:
        return -1
"""

# The process's own peak resident size: Linux's VmHWM (getrusage's ru_maxrss there keeps the parent's
# peak across exec), macOS's ru_maxrss (bytes there).
PEAK_RESIDENT = """
import resource
try:
    status = open("/proc/self/status").read()
    peak = int(status.split("VmHWM:")[1].split()[0]) * 1024
except OSError:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
"""


def convert_in_process(name: str, source: Path, out: Path) -> tuple[float, int, int | None]:
    """The conversion's seconds, its process's peak resident memory and the bytes it read (None where
    not counted), in bytes."""
    script = (
        f"import sys, time\nsys.path.insert(0, {str(ROOT)!r})\nsource, out = {str(source)!r}, {str(out)!r}\n"
        + READ_SO_FAR
        + CONVERTERS[name]
        + "seconds, read = time.perf_counter() - start, read_so_far() - read_before\n"
        + f"{PEAK_RESIDENT}print(seconds, peak, read if read_before >= 0 else -1)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    if result.returncode:
        raise SystemExit(f"{name} conversion failed:\n{result.stderr[-2000:]}")
    seconds, peak, read = result.stdout.strip().splitlines()[-1].split()
    return float(seconds), int(peak), None if int(read) < 0 else int(read)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--vision-blocks", type=int, default=4)
    parser.add_argument("--save", action="store_true", help="write bench/results/<date>_quant_4b-....json")
    parser.add_argument("--label", help="appended to the saved file's name, so that runs of a day are kept")
    parser.add_argument("--json", type=Path, help="also write the record there (gpu.sh's results)")
    args = parser.parse_args()

    import mlx_qwen3vl  # noqa: F401, I001  first: it binds the system OpenBLAS before MLX loads
    from checkpoints import FULL_WIDTH_4B, build_checkpoint, config_with

    from mlx_qwen3vl.check import REPORT_FILE, check
    from mlx_qwen3vl.loading import weight_files

    overrides = {
        "text_config": {**FULL_WIDTH_4B["text_config"], "num_hidden_layers": args.layers},
        "vision_config": {
            **FULL_WIDTH_4B["vision_config"],
            "depth": args.vision_blocks,
            "deepstack_visual_indexes": list(range(args.vision_blocks))[-3:],
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        source = build_checkpoint(Path(tmp) / "source", overrides)
        (source / "config.json").write_text(json.dumps(config_with(overrides)))  # the published layout
        results = {}
        for name in CONVERTERS:
            out = Path(tmp) / name
            seconds, peak, read = convert_in_process(name, source, out)
            own = json.loads((out / REPORT_FILE).read_text()) if name == "ours" else None
            report = check(out, source)
            results[name] = {
                "kl": report.kl,
                "top1": report.top1,
                "positions": report.positions,
                "bytes": sum(f.stat().st_size for f in weight_files(out)),
                "conversion_s": own["conversion_seconds"] if own else seconds,
                "check_in_conversion_s": own["seconds"] if own else None,
                "tensor_comparison_in_conversion_s": own["tensor_seconds"] if own else None,
                "tensor_comparison_s": report.tensor_seconds,
                "conversion_peak_bytes": peak,
                "conversion_read_bytes": read,
                "check_s": report.seconds,
                "check_passed": report.passed,
                "failures": [f"{f.tensor}: {f.reason}" for f in report.failures],
                "layers": report.layers,
            }
        source_bytes = sum(f.stat().st_size for f in weight_files(source))

    shape = f"{args.layers} decoder layers, {args.vision_blocks} vision blocks"
    print(f"4B widths, {shape}; source {source_bytes:,} B")
    print(
        f"{'':10}{'KL (nats)':>12}{'top-1':>8}{'bytes':>15}{'convert s':>11}{'peak GB':>9}{'read GB':>9}"
        f"{'check in it s':>15}{'check s':>9}  check"
    )
    for name, r in results.items():
        verdict = "passed" if r["check_passed"] else "FAILED " + "; ".join(r["failures"])
        inside, read = r["check_in_conversion_s"], r["conversion_read_bytes"]
        print(
            f"{name:10}{r['kl']:12.5f}{r['top1']:8.3f}{r['bytes']:15,}{r['conversion_s']:11.1f}"
            f"{r['conversion_peak_bytes'] / 1e9:9.2f}{'-' if read is None else f'{read / 1e9:.2f}':>9}"
            f"{'-' if inside is None else f'{inside:.1f}':>15}"
            f"{r['check_s']:9.1f}  {verdict}"
        )
    import mlx.core as mx

    record = {
        "machine": f"{platform.machine()} {platform.system()}",
        "device": str(mx.default_device()),
        "layers": args.layers,
        "vision_blocks": args.vision_blocks,
        "source_bytes": source_bytes,
        "results": results,
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    if args.save:
        label = f"_{args.label}" if args.label else ""
        name = f"{date.today().isoformat()}_quant_4b-L{args.layers}-V{args.vision_blocks}{label}.json"
        (HERE / "results" / name).write_text(json.dumps(record, indent=2) + "\n")
        print(f"saved bench/results/{name}")


if __name__ == "__main__":
    main()
