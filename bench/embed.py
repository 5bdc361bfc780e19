"""Embeddings per second, ours (`mlx_qwen3vl.embed`) against mlx-vlm 0.7.10's Qwen3-VL-Embedding model
(`mlx_vlm.models.qwen3_vl_embedding`), in one run on one random-weight checkpoint at a preset's widths:
448x448 images and short texts, a batch at a time, and each system's MLX peak memory.

    python bench/embed.py --preset 2b --layers 2 --vision-blocks 2 --save

Both get the same prompts: Qwen's reference layout (docs/embeddings.md), rendered by our processor for
ours and by mlx-vlm's own processor (`apply_chat_template`, `prepare_inputs`, right padding) for mlx-vlm;
the images are 448x448 (a 28x28 patch grid, 196 tokens each in both). Each figure is the best of
`--runs` passes over all inputs after one warm-up pass; the cosine of each pair of vectors checks that
the two systems compute the same thing. Each system runs in a process of its own (peak memory and the
BLAS binding its own: ours binds the system OpenBLAS where there is one, mlx-vlm as shipped does not).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx_qwen3vl  # noqa: F401  (before mlx.core: binds the system OpenBLAS unless told not to)

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from inputs import noise_image  # noqa: E402
from measure import Clock, finish, mlx_memory, system_openblas  # noqa: E402
from presets import checkpoint, checkpoint_name  # noqa: E402

from mlx_qwen3vl.retrieval import EMBED_INSTRUCTION  # noqa: E402

TEXTS = [
    "A woman playing with her dog on a beach at sunset.",
    "Quarterly revenue grew by twelve percent in the third quarter.",
    "Screenshot of a settings page with the dark mode switch turned on.",
    "A red bicycle leaning against a brick wall in the rain.",
]
SIDE = 448  # pixels: a 28 x 28 patch grid, 196 merged tokens


def batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class Ours:
    name = "ours"

    def __init__(self, path: Path, dtype: str, batch: int):
        import mlx_qwen3vl.retrieval as retrieval
        from mlx_qwen3vl import load

        retrieval.BATCH = batch
        self.model, self.processor = load(path, dtype=dtype, task="embed")

    def embed(self, kind: str, items: list) -> np.ndarray:
        from mlx_qwen3vl import embed

        inputs = [{"image": x} for x in items] if kind == "image" else items
        return np.array(embed(self.model, self.processor, inputs))


class MlxVlm:
    """mlx-vlm's embedding model, loaded as its embedding loader does, with `qwen3_vl` mapped to its
    `qwen3_vl_embedding` (the published config names the chat model's type)."""

    name = "mlx-vlm"

    def __init__(self, path: Path, dtype: str, batch: int):
        from mlx_vlm.encoder_loader import load_encoder_model
        from mlx_vlm.utils import load_processor

        self.batch = batch
        self.model = load_encoder_model(path, model_remapping={"qwen3_vl": "qwen3_vl_embedding"})
        if dtype != "bfloat16":
            self.model.set_dtype(getattr(mx, dtype))
        mx.eval(self.model.parameters())
        self.processor = load_processor(path, add_detokenizer=False)

    def prompt(self, content: dict) -> str:
        messages = [
            {"role": "system", "content": [{"type": "text", "text": EMBED_INSTRUCTION}]},
            {"role": "user", "content": [content]},
        ]
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def embed(self, kind: str, items: list) -> np.ndarray:
        from mlx_vlm.utils import prepare_inputs

        out = []
        for group in batches(items, self.batch):
            if kind == "image":
                prompts = [self.prompt({"type": "image"}) for _ in group]
                inputs = prepare_inputs(self.processor, images=group, prompts=prompts, padding_side="right")
            else:
                prompts = [self.prompt({"type": "text", "text": t}) for t in group]
                inputs = prepare_inputs(self.processor, prompts=prompts, padding_side="right")
            arguments = {
                k: inputs[k]
                for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")
                if inputs.get(k) is not None
            }
            # mlx-vlm keeps the last call's 3-D positions on the language model and reuses them for a call
            # without pixels (a batch of a different size then fails to broadcast): cleared per call.
            self.model.language_model._position_ids = self.model.language_model._rope_deltas = None
            vectors = self.model(**arguments).text_embeds
            mx.eval(vectors)
            out.append(np.array(vectors.astype(mx.float32)))
        return np.concatenate(out)


SYSTEMS = {"ours": Ours, "mlx-vlm": MlxVlm}


def measure(system, kind: str, items: list, runs: int) -> tuple[dict, np.ndarray]:
    vectors = system.embed(kind, items)  # warm-up (and the vectors compared)
    times = []
    for _ in range(runs):
        with Clock() as clock:
            system.embed(kind, items)
        times.append(clock.seconds)
    return {"per_second": len(items) / min(times), "seconds": times, "count": len(items)}, vectors


def worker(args) -> None:
    """One system's figures (`--worker NAME`): its row as JSON on stdout, its vectors in `--vectors`."""
    images = [noise_image(SIDE, SIDE, seed=k) for k in range(args.images)]
    texts = [TEXTS[k % len(TEXTS)] + f" ({k})" for k in range(args.texts)]
    mlx_memory(reset=True)
    system = SYSTEMS[args.worker](
        checkpoint(args.preset, args.layers, args.vision_blocks), args.dtype, args.batch
    )
    row, vectors = {"load_peak_gb": mlx_memory(reset=True), "system_openblas": system_openblas()}, {}
    for kind, items in (("image", images), ("text", texts)):
        row[kind], vectors[kind] = measure(system, kind, items, args.runs)
        row[kind]["peak_gb"] = mlx_memory(reset=True)
    np.savez(args.vectors, **vectors)
    print(json.dumps(row))


def run(args) -> dict:
    checkpoint(args.preset, args.layers, args.vision_blocks)  # built once, before any timing
    names, results, vectors = args.systems.split(","), {}, {}
    options = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k in WORKER_OPTIONS]
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            file = Path(folder) / f"{name}.npz"
            # mlx-vlm as shipped: MLX's own CPU matmuls, not the system OpenBLAS ours binds on import.
            env = {**os.environ, **({"MLX_QWEN3VL_OPENBLAS": "0"} if name != "ours" else {})}
            out = subprocess.run(
                [sys.executable, __file__, "--worker", name, "--vectors", str(file), *options],
                env=env,
                capture_output=True,
                text=True,
            )
            if out.returncode:
                raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
            vectors[name] = dict(np.load(file))
    if len(names) == 2:
        for kind in ("image", "text"):
            a, b = (vectors[n][kind] for n in names)
            cosine = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
            results[f"min_cosine_{kind}"] = float(cosine.min())
    results["checkpoint"] = checkpoint_name(args.preset, args.layers, args.vision_blocks)
    return results


# The options a worker takes from the run.
WORKER_OPTIONS = ("preset", "layers", "vision_blocks", "dtype", "images", "texts", "batch", "runs")


def render(output: dict) -> str:
    results, config = output["results"], output["config"]
    names = [n for n in config["systems"].split(",")]
    lines = [
        f"Embeddings per second, {results['checkpoint']} ({config['dtype']}), batches of {config['batch']}, "
        f"load average {output['load_average']:.1f}; system OpenBLAS bound: "
        + ", ".join(f"{n} {'yes' if results[n]['system_openblas'] else 'no'}" for n in names),
        "",
        "| system | 448x448 images / s | short texts / s | peak memory: images (GB) | texts (GB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for n in names:
        r = results[n]
        lines.append(
            f"| {n} | {r['image']['per_second']:.3g} | {r['text']['per_second']:.3g} | "
            f"{r['image']['peak_gb']:.2f} | {r['text']['peak_gb']:.2f} |"
        )
    if len(names) == 2:
        a, b = (results[n] for n in names)
        lines += [
            "",
            f"{names[0]} / {names[1]}: images {a['image']['per_second'] / b['image']['per_second']:.2f}x, "
            f"texts {a['text']['per_second'] / b['text']['per_second']:.2f}x; smallest cosine between their "
            f"vectors: images {results['min_cosine_image']:.6f}, texts {results['min_cosine_text']:.6f}",
        ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="2b")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vision-blocks", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--texts", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--systems", default="ours,mlx-vlm")
    p.add_argument("--save", action="store_true")
    p.add_argument("--label", default="embed")
    p.add_argument("--render", type=Path)
    p.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    p.add_argument("--vectors", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    finish(args, run, render, lambda results: f"{results['checkpoint']}_{args.dtype}")


if __name__ == "__main__":
    main()
