"""KV-cache quantization (`kv_bits`): the bytes the cache holds per token of context, and how far the
logits move from those with the unquantized cache, at the 4B's widths.

    python bench/kv_cache.py --save       # 4B widths, 4 decoder layers, 1 vision block, float32

- bytes per token, float32 and bfloat16: the `nbytes` of one layer's cache (mlx-lm's KVCache or
  QuantizedKVCache) holding 256 tokens of the preset's widths (8 KV heads x 128 at 4B), over 256, times
  the published depth (36 at 4B); beside it the size the widths give (a value in the activation dtype,
  or bits / 8 bytes plus a scale and a bias in the activation dtype per group); and the same from the
  model's cache after the prompt, in the deviation runs.
- deviation, in `--dtypes` (bfloat16 on the CPU has no BLAS: minutes per prompt at the 4B widths): the
  logits after a prompt of a 448x448 image and text (`--prompt-tokens` in all) and after
  each of `--steps` decode steps fed the unquantized cache's greedy tokens: the relative max difference
  (max |difference| / max |unquantized logit|, as the tests measure it), how many of those argmaxes agree,
  and how many of the quantized cache's own greedy tokens equal the unquantized answer's.

The weights are random (bench/presets.py): the figures show the cache's rounding on a model of these
widths; a trained model's keys and values have their own statistics.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(ROOT))

import presets  # noqa: E402
from inputs import noise_image, prompt_ids  # noqa: E402
from measure import finish  # noqa: E402

FULL_DEPTH = {"2b": 28, "4b": 36, "8b": 36, "tiny": 4}  # the published decoder depths
VISION_START = 151652


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="4b", choices=sorted(presets.PRESETS))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vision-blocks", type=int, default=1)
    p.add_argument("--dtypes", default="float32", help="of the deviation runs")
    p.add_argument("--bits", default="8,4")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--cache", type=Path, default=presets.CACHE_ROOT)
    p.add_argument("--label", default="", help="appended to the saved files' names")
    p.add_argument("--save", action="store_true", help="write bench/results/<date>_<backend>_kv-cache.*")
    p.add_argument("--render", type=Path, help="print a saved run's tables again")
    return p.parse_args(argv)


def prompt(processor, length: int):
    """Processor output for a 448x448 image and a question, with English text before the image so that
    the prompt has `length` tokens."""
    import numpy as np

    inputs = processor("Describe this image.", images=[noise_image(448, 448, 1)])
    ids = inputs["input_ids"][0]
    at = int(np.flatnonzero(ids == VISION_START)[0])
    filler = prompt_ids(processor.tokenizer, length - len(ids))
    inputs["input_ids"] = np.concatenate([ids[:at], filler, ids[at:]])[None]
    return inputs


def run_cache(model, inputs, kv, steps: int, forced: list[int] | None):
    """Prefill, then `steps` decode steps fed `forced` (or this cache's greedy tokens); then, from the
    prompt again (the cache trimmed back), this cache's own greedy answer. Logits as float32 rows."""
    import mlx.core as mx
    import numpy as np

    from mlx_qwen3vl.generation import prefill

    cache = model.make_cache(kv)
    images = model.encode_vision(inputs["pixel_values"], inputs["image_grid_thw"])
    prepared = model.prepare(inputs["input_ids"], [images], cache)
    start = time.perf_counter()
    first = prefill(model, prepared, cache)
    mx.eval(first)
    prefill_s = time.perf_counter() - start
    held = sum(c.nbytes for c in cache)
    room = cache[0].keys.shape[2] if not hasattr(cache[0], "bits") else cache[0].keys[0].shape[2]
    rows, fed, logits = [np.array(first[0].astype(mx.float32))], [], first
    start = time.perf_counter()
    for step in range(steps):
        fed.append(forced[step] if forced else int(mx.argmax(logits[0]).item()))
        logits = model(mx.array([[fed[-1]]]), cache=cache)[:, -1]
        rows.append(np.array(logits[0].astype(mx.float32)))
    decode_s = (time.perf_counter() - start) / steps
    for c in cache:
        c.trim(steps)
    own, logits = [], first
    for _ in range(steps):
        own.append(int(mx.argmax(logits[0]).item()))
        logits = model(mx.array([[own[-1]]]), cache=cache)[:, -1]
    return {
        "logits": np.stack(rows),
        "fed": fed,
        "own": own,
        "bytes": held,
        "room": room,
        "prefill_s": prefill_s,
        "decode_ms": decode_s * 1e3,
    }


def computed_bytes_per_token(config, layers: int, bits: int | None, group: int, dtype_bytes: int) -> float:
    """Keys and values of every layer: a value in the activation dtype, or bits / 8 bytes plus a scale and
    a bias per group."""
    values = 2 * layers * config.num_key_value_heads * config.head_dim
    return values * (dtype_bytes if bits is None else bits / 8 + 2 * dtype_bytes / group)


def widths_bytes(text, depth: int, bits: list[int | None], group: int) -> dict:
    """Bytes per token of a cache of these widths, float32 and bfloat16: one layer's `nbytes` holding 256
    tokens (mlx-lm's allocation step), times `depth` layers; and the size the widths give."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache, QuantizedKVCache

    tokens, rows = 256, {}
    for dtype in ("float32", "bfloat16"):
        values = mx.zeros((1, text.num_key_value_heads, tokens, text.head_dim), getattr(mx, dtype))
        for b in bits:
            cache = KVCache() if b is None else QuantizedKVCache(group, b)
            mx.eval(cache.update_and_fetch(values, values))
            rows[f"{dtype} {b}"] = {
                "bytes_per_token": cache.nbytes / tokens * depth,
                "computed_bytes_per_token": computed_bytes_per_token(text, depth, b, group, values.itemsize),
            }
    return rows


def run(args) -> dict:
    import mlx.core as mx

    from mlx_qwen3vl import load
    from mlx_qwen3vl.loading import read_config
    from mlx_qwen3vl.options import KVCacheOptions

    checkpoint = presets.checkpoint(args.preset, args.layers, args.vision_blocks, root=args.cache, fast=True)
    depth = FULL_DEPTH[args.preset]
    bits = [None] + [int(b) for b in args.bits.split(",")]
    text = read_config(checkpoint).text_config
    results = {"checkpoint": checkpoint.name, "depth": depth, "dtypes": {}}
    results["widths"] = widths_bytes(text, depth, bits, args.group_size)
    for dtype in args.dtypes.split(","):
        model, processor = load(checkpoint, dtype=dtype)
        inputs = prompt(processor, args.prompt_tokens)
        runs, reference = {}, None
        for b in bits:
            measured = run_cache(model, inputs, KVCacheOptions(b, args.group_size), args.steps, reference)
            reference = reference or measured["fed"]
            runs[str(b)] = measured
        base = runs["None"]
        rows = {}
        for b in bits:
            r = runs[str(b)]
            per_token_layer = r["bytes"] / (r["room"] * text.num_hidden_layers)
            difference = abs(r["logits"] - base["logits"]).max() / abs(base["logits"]).max()
            rows[str(b)] = {
                "bytes_per_token": per_token_layer * depth,
                "relative_max_diff": float(difference),
                "argmax_agree": int((r["logits"].argmax(-1) == base["logits"].argmax(-1)).sum()),
                "positions": len(r["logits"]),
                "greedy_equal": sum(1 for _ in _common_prefix(r["own"], base["own"])),
                "prefill_s": r["prefill_s"],
                "decode_ms": r["decode_ms"],
            }
            print(f"[kv_cache] {dtype} kv_bits={b}: {rows[str(b)]}", flush=True)
        results["dtypes"][dtype] = {"prompt_tokens": int(inputs["input_ids"].shape[1]), "rows": rows}
        del model
        mx.clear_cache()
    return results


def _common_prefix(a: list[int], b: list[int]):
    for x, y in zip(a, b, strict=True):
        if x != y:
            return
        yield x


def render(output: dict) -> str:
    config, results = output["config"], output["results"]
    depth, group = results["depth"], config["group_size"]
    load = f", load average {output['load_average']:.1f} at the end" if "load_average" in output else ""
    lines = [
        f"## KV-cache quantization ({results['checkpoint']}, {output['backend']})",
        "",
        f"{output['date']}; {output['machine'].get('cpu', '?')} ({output['machine']['cpus']} CPUs{load}); "
        f"group size {group}.",
        "",
        f"Bytes per token of context, {depth} layers: one layer's `nbytes` holding 256 tokens, times "
        f"{depth}; the size the widths give; in the model's cache after the prompt "
        f"({config['layers']} layers, scaled to {depth}).",
        "",
        "| activations | KV cache | bytes / token | computed | vs unquantized | in the model run |",
        "|---|---|---:|---:|---:|---:|",
    ]
    widths = results["widths"]
    for key, r in widths.items():
        dtype, bits = key.split()
        base = widths[f"{dtype} None"]["bytes_per_token"]
        run = results["dtypes"].get(dtype, {}).get("rows", {}).get(bits)
        in_run = f"{run['bytes_per_token']:,.0f}" if run else "-"
        lines.append(
            f"| {dtype} | {'unquantized' if bits == 'None' else f'{bits}-bit'} "
            f"| {r['bytes_per_token']:,.0f} ({r['bytes_per_token'] / 1024:.1f} KiB) "
            f"| {r['computed_bytes_per_token']:,.0f} | {r['bytes_per_token'] / base:.3f} "
            f"| {in_run} |"
        )
    lines += [
        "",
        f"Logits against the unquantized cache's, over the prompt's last position and {config['steps']} "
        "decode steps fed the unquantized cache's greedy tokens; greedy: leading tokens of each cache's "
        "own answer equal to the unquantized one's.",
        "",
        "| activations | KV cache | prompt | relative max diff | argmax agree | greedy equal | prefill "
        "| decode step |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for dtype, part in results["dtypes"].items():
        for bits, r in part["rows"].items():
            lines.append(
                f"| {dtype} | {'unquantized' if bits == 'None' else f'{bits}-bit'} "
                f"| {part['prompt_tokens']} | {r['relative_max_diff']:.2e} "
                f"| {r['argmax_agree']}/{r['positions']} | {r['greedy_equal']}/{config['steps']} "
                f"| {r['prefill_s']:.2f} s | {r['decode_ms']:.0f} ms |"
            )
    lines += ["", "Prompt: a 448x448 noise image (196 tokens) after English text."]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import mlx_qwen3vl  # noqa: F401  (before mlx.core is imported: binds the system OpenBLAS)

    return finish(args, run, render, lambda _: "kv-cache")


if __name__ == "__main__":
    main()
