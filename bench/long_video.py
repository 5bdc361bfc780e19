"""Long videos: reading a long file at the default sampling, and the vision tower's peak memory as the
frame count grows.

    python bench/long_video.py decode --save                    # 10-minute and 1-hour 720p files
    python bench/long_video.py vision --preset tiny --compare mlx-vlm --save
    python bench/long_video.py vision --preset 4b --vision-blocks 1 --save
    python bench/long_video.py ttft --preset 4b --layers 1 --vision-blocks 1 --compare mlx-vlm --save

- decode: `load_video` at the default sampling (2 frames a second, at most 768 frames) of synthetic 720p
  files at 30 fps: mp4v (OpenCV's writer, a keyframe every 12 frames) and H.264 (x264 through PyAV, its
  default keyframe interval of 250 and B-frames). A 25-second piece is encoded once and its packets are
  repeated with shifted timestamps up to 10 minutes and 1 hour, so an hour-long file takes seconds to
  write and every frame of it still has to be decoded. "grab every frame" is the reading without the
  keyframe index (a seek only past gaps longer than 250 frames: the reading before the index was added);
  "keyframe index" reads the keyframes from the packets and seeks wherever one lies ahead, with one
  capture, or "in parts": `load_video` as it is, several captures at once (video.READERS), each over a
  contiguous part of the planned frames. All give the same frames (checked).
- vision: the vision tower on the pixel rows of a 1280x720 video sampled to 16, 256 and 768 frames at the
  default per-frame sizes (the processor's grids; random pixel values), until the features are
  evaluated: MLX's peak memory (weights included) and the time. "ours" encodes in pieces that fit the
  vision budget (`--budget-gb`, default: the package's, an eighth of MLX's memory limit); "ours, one pass"
  sets an unlimited budget; mlx-vlm runs its `vision_tower` over the whole input, as its generation does.
  Each (system, frame count) runs in its own process; a run whose peak, extrapolated from the system's
  smaller runs, would exceed `--max-gb` is not started.
- ttft: a question about the synthetic 1-hour and 10-minute mp4v files (above) answered through each
  system's `stream_generate` at 2 frames a second, at most 768 (our default; mlx-vlm is given `fps=2,
  max_frames=768`, its own default keeping 16 frames), each frame sized by the system's default: ours
  qwen-vl-utils' (128000 x 32^2 x 0.9 pixels shared among the frames, at least 128 x 32^2 each),
  mlx-vlm transformers' processor's (25,165,824 pixels shared, 7x fewer tokens here);
  `--video-options` sets ours to mlx-vlm's sizes for a run of equal work. Float32: the time from the call
  to the first token (reading the file, the vision tower, the prefill of the whole prompt) and the peak
  memory: MLX's (weights, activations, KV cache) and the process's resident size (frames read into numpy
  included).
  Each run is its own process with its address space capped at `--max-gb` (RLIMIT_AS), so a system
  that needs more fails with an allocation error instead of taking the machine's memory.

Both systems bind MLX's float32 matmuls to the system OpenBLAS (this package's import does it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(ROOT))

import presets  # noqa: E402
from measure import finish  # noqa: E402

WIDTH, HEIGHT, FPS = 1280, 720, 30
PIECE_SECONDS = 25  # 750 frames: three of x264's default keyframe intervals
LENGTHS = {"10min": 600, "1h": 3600}
FRAME_COUNTS = (16, 256, 768)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["decode", "vision", "ttft"])
    p.add_argument("--preset", default="tiny", choices=sorted(presets.PRESETS))
    p.add_argument("--layers", type=int, default=1, help="decoder layers (ttft)")
    p.add_argument("--vision-blocks", type=int)
    p.add_argument("--lengths", default=",".join(LENGTHS), help="ttft: which synthetic files")
    p.add_argument(
        "--video-options",
        default="{}",
        help='ttft: our video options as JSON, e.g. {"min_pixels": 4096, "max_pixels": 40960} for frames '
        "the size of mlx-vlm's (transformers' processor shares 25,165,824 pixels among the frames)",
    )
    p.add_argument("--compare", default="", help="mlx-vlm, for the vision and ttft figures")
    p.add_argument("--frames", default=",".join(map(str, FRAME_COUNTS)))
    p.add_argument("--budget-gb", type=float, help="our vision budget (default: the package's)")
    p.add_argument(
        "--max-gb", type=float, default=10.0, help="vision: start no run predicted above it; ttft: a cap"
    )
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--cache", type=Path, default=presets.CACHE_ROOT)
    p.add_argument("--label", default="")
    p.add_argument("--save", action="store_true", help="write bench/results/<date>_<backend>_..._<what>.*")
    p.add_argument("--render", type=Path, help="print a saved run's tables again")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- decode ----------------------------------------------------------------------------------------------


def synthetic_frame(n: int):
    """A moving gradient, so that consecutive frames differ as in real footage."""
    import numpy as np

    x = (np.arange(WIDTH, dtype=np.int32)[None, :] + 4 * n) % 256
    y = np.arange(HEIGHT, dtype=np.int32)[:, None] // 3
    frame = np.empty((HEIGHT, WIDTH, 3), np.uint8)
    frame[..., 0], frame[..., 1], frame[..., 2] = x, (y + n) % 256, (x // 2 + y) % 256
    return frame


def write_piece(path: Path, codec: str) -> None:
    frames = PIECE_SECONDS * FPS
    if codec == "mp4v":
        import cv2

        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (WIDTH, HEIGHT))
        for n in range(frames):
            writer.write(synthetic_frame(n))
        writer.release()
        return
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for n in range(frames):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(synthetic_frame(n), format="rgb24")))
        container.mux(stream.encode())


def repeat_piece(piece: Path, target: Path, seconds: int) -> None:
    """The piece's packets again and again, timestamps shifted, up to `seconds`: no re-encoding."""
    import av

    with av.open(str(piece)) as source, av.open(str(target), "w") as out:
        stream = source.streams.video[0]
        packets = [p for p in source.demux(stream) if p.size]
        span = max(p.pts for p in packets) - min(p.pts for p in packets)
        period = span * len(packets) // (len(packets) - 1)  # the piece's duration in its time base
        copy = out.add_stream_from_template(stream)
        for r in range(seconds // PIECE_SECONDS):
            for p in packets:
                q = av.Packet(bytes(p))
                q.pts, q.dts, q.time_base = p.pts + r * period, p.dts + r * period, p.time_base
                q.is_keyframe, q.stream = p.is_keyframe, copy
                out.mux(q)


def long_files(root: Path) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    files = {}
    for codec in ("mp4v", "h264"):
        piece = root / f"{codec}-720p-piece.mp4"
        if not piece.exists():
            write_piece(piece, codec)
        for name, seconds in LENGTHS.items():
            files[f"{codec} {name}"] = target = root / f"{codec}-720p-{name}.mp4"
            if not target.exists():
                repeat_piece(piece, target, seconds)
    return files


# How each reading is set up (video.py's attributes replaced for its run): the reading before the keyframe
# index; the index with one capture; the index with the file's frames read in parts by several captures
# at once (load_video as it is).
WAYS = {
    "grab every frame": {"_keyframes": lambda _: None},
    "keyframe index, one capture": {"READERS": 1},
    "keyframe index, in parts": {},
}


def read_seconds(path: Path, way: str):
    from unittest import mock

    from mlx_qwen3vl import video

    with mock.patch.multiple(video, **WAYS[way]) if WAYS[way] else contextlib.nullcontext():
        start = time.perf_counter()
        frames = video.load_video(path).frames
    return time.perf_counter() - start, frames


def decode(args) -> dict:
    import numpy as np

    results = {}
    for name, path in long_files(args.cache / "long-video").items():
        row = {"file_mb": path.stat().st_size / 1e6}
        for run in range(args.runs):
            # Alternate the order, so that no way always reads a file another left in the page cache.
            outputs = {}
            for way in list(WAYS)[:: 1 if run % 2 else -1]:
                seconds, outputs[way] = read_seconds(path, way)
                row.setdefault(way, []).append(seconds)
            first = next(iter(outputs.values()))
            same = all(np.array_equal(first, o) for o in outputs.values())
            assert same, f"{name}: the ways read different frames"
            row["frames"] = first.shape
        print(f"[decode] {name}: {row}", flush=True)
        results[name] = row
    return results


def render_decode(output: dict) -> str:
    lines = [
        f"## Reading long 720p videos at the default sampling ({output['backend']})",
        "",
        f"{output['date']}; {output['machine'].get('cpu', '?')} ({output['machine']['cpus']} CPUs); "
        f"median of {output['config']['runs']} run(s) each, alternating; files at {FPS} fps, "
        f"{PIECE_SECONDS}-second pieces repeated (every frame still decoded).",
        "",
        "| file | frames kept | " + " | ".join(WAYS) + " | speedup |",
        "|---|---:|" + "---:|" * (len(WAYS) + 1),
    ]
    for name, row in output["results"].items():
        seconds = [statistics.median(row[way]) for way in WAYS if way in row]
        kept = f"{row['frames'][0]} of {LENGTHS[name.split()[1]] * FPS:,}"
        times = " | ".join(f"{s:.1f} s" for s in seconds)
        lines.append(f"| {name} | {kept} | {times} | {seconds[0] / seconds[-1]:.1f}x |")
    return "\n".join(lines)


# ---- vision ----------------------------------------------------------------------------------------------


def video_grid(frames: int, merge: int = 2, patch: int = 16) -> tuple[int, int, int]:
    """The processor's grid for a 1280x720 video sampled to `frames` frames at the default sizes."""
    from mlx_qwen3vl.video import VideoOptions, _frame_size

    height, width = _frame_size(HEIGHT, WIDTH, frames, VideoOptions())
    return frames // 2, height // patch, width // patch


def vision_worker(spec: dict) -> dict:
    """One system encoding one frame count, in this process; MLX's peak memory and the time."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    grid = np.array([video_grid(spec["frames"])])
    patches = int(grid.prod())
    pixels = np.random.default_rng(0).uniform(-1, 1, (patches, 1536)).astype(np.float32)
    if spec["system"] == "mlx-vlm":
        from mlx_vlm import load

        model, _ = load(spec["checkpoint"])
        model.set_dtype(mx.float32)
        mx.eval(model.parameters())
        tower = model.vision_tower

        def encode():
            return tower(mx.array(pixels), mx.array(grid))
    else:
        from mlx_qwen3vl import load

        model, _ = load(spec["checkpoint"], dtype="float32")
        if spec["system"] == "ours, one pass":
            model.vision_budget = 2**62
        elif spec.get("budget_gb"):
            model.vision_budget = int(spec["budget_gb"] * 1e9)
        pieces = len(model.vision_pieces(grid))

        def encode():
            encoded = model.encode_vision(pixels, grid)
            return encoded.features, encoded.deepstack

    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    mx.clear_cache()
    mx.reset_peak_memory()
    start = time.perf_counter()
    features, deepstack = encode()
    mx.eval(features, deepstack)
    seconds = time.perf_counter() - start
    return {
        "patches": patches,
        "tokens": patches // 4,
        "peak_gb": mx.get_peak_memory() / 1e9,
        "weights_gb": weights / 1e9,
        "features_gb": sum(a.nbytes for a in (features, *deepstack)) / 1e9,
        "seconds": seconds,
        "pieces": pieces if spec["system"] != "mlx-vlm" else 1,
    }


def vision(args) -> dict:
    import mlx.core as mx

    from mlx_qwen3vl.model import VISION_MEMORY_SHARE

    checkpoint = presets.checkpoint(args.preset, 1, args.vision_blocks, root=args.cache, fast=True)
    systems = ["ours", "ours, one pass"] + [s for s in args.compare.split(",") if s]
    budget_gb = args.budget_gb or mx.get_memory_limit() * VISION_MEMORY_SHARE / 1e9
    frames = [int(f) for f in args.frames.split(",")]
    results: dict = {}
    for system in systems:
        results[system] = {}
        for count in frames:
            done = results[system]
            predicted = predict(done, video_grid(count), budget_gb if system == "ours" else None)
            if predicted and predicted > args.max_gb:
                done[count] = {"skipped": f"predicted {predicted:.1f} GB > --max-gb {args.max_gb:g}"}
                print(f"[vision] {system}, {count} frames: {done[count]['skipped']}", flush=True)
                continue
            spec = {"system": system, "frames": count, "checkpoint": str(checkpoint)}
            spec["budget_gb"] = args.budget_gb
            command = [sys.executable, __file__, "vision", "--worker", json.dumps(spec)]
            run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
            if run.returncode:
                done[count] = {"error": (run.stderr.strip().splitlines() or ["?"])[-1]}
            else:
                done[count] = json.loads(run.stdout.strip().splitlines()[-1])
            print(f"[vision] {system}, {count} frames: {done[count]}", flush=True)
    return {"checkpoint": checkpoint.name, "budget_gb": budget_gb, "results": results}


def predict(done: dict, grid, budget_gb: float | None = None) -> float | None:
    """Peak GB extrapolated linearly in patches from the two largest runs so far, or in proportion to the
    one run so far (None before any). With a vision budget (ours in pieces), at most the weights, the
    budget and the features (twice: joining them)."""
    runs = sorted((r["patches"], r["peak_gb"]) for r in done.values() if "peak_gb" in r)
    patches = grid[0] * grid[1] * grid[2]
    if runs and budget_gb is not None:
        last = max((r for r in done.values() if "peak_gb" in r), key=lambda r: r["patches"])
        return last["weights_gb"] + budget_gb + 2 * last["features_gb"] * patches / last["patches"]
    if len(runs) == 1:  # the weights stay, the rest grows with the patches
        (p1, m1), weights = runs[0], next(r["weights_gb"] for r in done.values() if "peak_gb" in r)
        return weights + (m1 - weights) * patches / p1
    if not runs:
        return None
    (p0, m0), (p1, m1) = runs[-2:]
    return m1 + (m1 - m0) / max(p1 - p0, 1) * (patches - p1)


def render_vision(output: dict) -> str:
    results = output["results"]["results"]
    systems = list(results)
    lines = [
        f"## Vision tower on a 1280x720 video at the default sampling: peak memory "
        f"({output['results']['checkpoint']}, float32, {output['backend']})",
        "",
        f"{output['date']}; {output['machine'].get('cpu', '?')} ({output['machine']['cpus']} CPUs); "
        "MLX's peak memory over the encode, weights included; one run each, each in its own process.",
        "",
        "| frames | grid (t x h x w) | tokens | features | "
        + " | ".join(f"{s}: peak, time" for s in systems)
        + " |",
        "|---:|---|---:|---:|" + "---:|" * len(systems),
    ]
    for count in next(iter(results.values())):
        t, h, w = video_grid(int(count))
        first = next((r for r in (results[s][count] for s in systems) if "tokens" in r), None)
        cells = []
        for system in systems:
            r = results[system][count]
            if "peak_gb" in r:
                pieces = f", {r['pieces']} pieces" if r["pieces"] > 1 else ""
                cells.append(f"{r['peak_gb']:.2f} GB, {r['seconds']:.1f} s{pieces}")
            else:
                cells.append(f"not run ({r.get('skipped') or r.get('error')})")
        tokens = f"{first['tokens']:,}" if first else "?"
        features = f"{first['features_gb']:.2f} GB" if first else "?"
        lines.append(f"| {count} | {t} x {h} x {w} | {tokens} | {features} | " + " | ".join(cells) + " |")
    weights = {s: r.get("weights_gb") for s in systems for r in results[s].values() if "weights_gb" in r}
    lines += [
        "",
        "Weights (in the peak): " + ", ".join(f"{s} {w:.2f} GB" for s, w in weights.items()) + ". "
        f"Ours in pieces: a vision budget of {output['results']['budget_gb']:.2f} GB. A run not started is "
        "predicted from the system's largest runs (its peak beyond the weights grows with the patches).",
    ]
    return "\n".join(lines)


# ---- time to first token ---------------------------------------------------------------------------------

QUESTION = "What happens in this video?"


def ttft_worker(spec: dict) -> dict:
    """One system answering about one file, in this process: time to the first token, peak memory."""
    import resource

    import mlx.core as mx

    if spec["system"] == "mlx-vlm":
        from mlx_vlm import load, stream_generate
        from mlx_vlm.prompt_utils import apply_chat_template

        model, processor = load(spec["checkpoint"])
        model.set_dtype(mx.float32)
        mx.eval(model.parameters())
        prompt = apply_chat_template(processor, model.config, QUESTION, num_images=0, video=spec["video"])

        def answer():  # our default sampling (qwen-vl-utils'), where mlx-vlm's own keeps 16 frames
            return stream_generate(
                model, processor, prompt, video=spec["video"], max_tokens=1, fps=2.0, max_frames=768
            )

    else:
        from mlx_qwen3vl import load, stream_generate

        model, processor = load(spec["checkpoint"], dtype="float32")

        def answer():
            options = spec.get("options", {})
            return stream_generate(model, processor, QUESTION, [], [spec["video"]], max_tokens=1, **options)

    mx.clear_cache()
    mx.reset_peak_memory()
    start = time.perf_counter()
    first = next(iter(answer()))
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "prompt_tokens": first.prompt_tokens,
        "peak_gb": mx.get_peak_memory() / 1e9,
        "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
    }


def capped(gigabytes: float):
    """For subprocess.run's preexec_fn: the child's address space limited to `gigabytes`."""
    import resource

    limit = int(gigabytes * 1e9)
    return lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def ttft(args) -> dict:
    files = long_files(args.cache / "long-video")
    checkpoint = presets.checkpoint(args.preset, args.layers, args.vision_blocks, root=args.cache, fast=True)
    systems = ["ours"] + [s for s in args.compare.split(",") if s]
    results: dict = {}
    for length in args.lengths.split(","):
        results[length] = {}
        for system in systems:
            spec = {"system": system, "video": str(files[f"mp4v {length}"]), "checkpoint": str(checkpoint)}
            spec["options"] = json.loads(args.video_options) if system == "ours" else {}
            command = [sys.executable, __file__, "ttft", "--worker", json.dumps(spec)]
            cap = capped(args.max_gb)
            run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, preexec_fn=cap)
            if run.returncode:
                lines = run.stderr.strip().splitlines() or [f"exit status {run.returncode}"]
                results[length][system] = {"error": lines[-1][:200]}
            else:
                results[length][system] = json.loads(run.stdout.strip().splitlines()[-1])
            print(f"[ttft] {length}, {system}: {results[length][system]}", flush=True)
    return {"checkpoint": checkpoint.name, "cap_gb": args.max_gb, "results": results}


def render_ttft(output: dict) -> str:
    results = output["results"]["results"]
    systems = list(next(iter(results.values())))
    options = output["config"].get("video_options", "{}")
    lines = [
        f"## A question about a long video: time to first token and peak memory "
        f"({output['results']['checkpoint']}, float32, {output['backend']})",
        "",
        f"{output['date']}; {output['machine'].get('cpu', '?')} ({output['machine']['cpus']} CPUs); "
        f"synthetic 1280x720 mp4v files at {FPS} fps, sampled at 2 frames a second, at most 768, each frame "
        "sized by the system's default (ours qwen-vl-utils', mlx-vlm transformers' processor's)"
        + (f", ours with {options}" if options != "{}" else "")
        + "; one run each, each in its own process, its address space capped at "
        f"{output['results']['cap_gb']:g} GB.",
        "",
        "| video | system | prompt tokens | time to first token | MLX peak | resident peak |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for length, row in results.items():
        for system in systems:
            r = row[system]
            if "seconds" in r:
                lines.append(
                    f"| {length} | {system} | {r['prompt_tokens']:,} | {r['seconds']:.1f} s | "
                    f"{r['peak_gb']:.2f} GB | {r['rss_gb']:.2f} GB |"
                )
            else:
                lines.append(f"| {length} | {system} | | failed: {r['error']} | | |")
    return "\n".join(lines)


FIGURES = {"decode": (decode, render_decode), "vision": (vision, render_vision), "ttft": (ttft, render_ttft)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    import mlx_qwen3vl  # noqa: F401  (before mlx.core is imported: binds the system OpenBLAS)

    if args.worker:
        worker = vision_worker if args.what == "vision" else ttft_worker
        print(json.dumps(worker(json.loads(args.worker))))
        return {}
    run, render = FIGURES[args.what]
    names = {
        "decode": lambda _: "video-decode",
        "vision": lambda results: f"{results['checkpoint']}_video-vision-memory",
        "ttft": lambda results: f"{results['checkpoint']}_float32_long-video-ttft",
    }
    return finish(args, run, render, names[args.what])


if __name__ == "__main__":
    main()
