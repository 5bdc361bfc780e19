"""Run by tests/test_distributed.py on every rank of `mlx.launch --backend ring -n N`: each checkpoint
loaded as this rank's part, its float32 logits for several prompts and the tokens of a greedy two-turn
chat; then, on rank 0 only, the same from the whole model in this process (no group), compared here so
that no logits cross processes. Rank 0 writes one JSON of results:

    python tests/distributed_worker.py OUT.json IMAGE CHECKPOINT...
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

# Ranks that share one machine take a core each (before MLX and OpenBLAS start their threads): two ranks
# each spreading over every core would spend the run preempting each other.
if "MLX_RANK" in os.environ and hasattr(os, "sched_setaffinity"):
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[int(os.environ["MLX_RANK"]) % len(cores)]})
    os.environ["OPENBLAS_NUM_THREADS"] = "1"

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

# This checkout's package and the tests' helpers, whatever the launcher's working directory.
sys.path[:0] = [str(Path(__file__).parent.parent), str(Path(__file__).parent)]

from prompts import make_prompts  # noqa: E402

from mlx_qwen3vl import ChatSession, Qwen3VLError, load  # noqa: E402

PROMPTS = ("text", "image_and_video")
GREEDY_TOKENS = 16
LAST_POSITIONS = 8  # the logits compared: those of the prompt's end, where its images and text have met


def logits_of(model, processor) -> dict[str, np.ndarray]:
    prompts = make_prompts(processor.tokenizer)
    out = {}
    for name in PROMPTS:
        p = prompts[name]
        logits = model(p.input_ids, **p.mlx_inputs())[0, -LAST_POSITIONS:]
        out[name] = np.array(logits.astype(mx.float32))
    return out


def chat_tokens(model, processor, image: str) -> list[list[int]]:
    """A greedy chat: a question with an image, then one that continues its cache."""
    session = ChatSession(model, processor, max_tokens=GREEDY_TOKENS, temperature=0)
    first = [r.token for r in session.ask("Describe this image.", images=[image])]
    second = [r.token for r in session.ask("And what colours does it have?")]
    return [first, second]


def expected_rank_bytes(model, ranks: int, rank: int, pipeline: bool) -> int:
    """The split docs/distributed.md states, from the whole model's parameters. Tensor parallel: query
    heads, o_proj, MLP and expert widths and an untied lm_head divided over the ranks; KV heads divided,
    or one each when the ranks outnumber them. Pipeline: the rank's consecutive layers, the first ranks
    one more when they do not divide evenly. Everything else (embedding, norms, router, vision tower,
    and in pipeline mode the lm_head) replicated."""
    text = model.config.text_config
    heads, kv, layers = text.num_attention_heads, text.num_key_value_heads, text.num_hidden_layers
    share, extra = divmod(layers, ranks)
    start = rank * share + min(rank, extra)
    held = range(start, start + share + (rank < extra))
    total = 0.0
    for name, value in tree_flatten(model.parameters()):
        size = value.nbytes
        if pipeline:
            if ".layers." in name and int(name.split(".layers.")[1].split(".")[0]) not in held:
                size = 0
        elif ".self_attn.qkv_proj." in name:
            kv_share = (kv // ranks if kv % ranks == 0 else 1) / kv
            size = size * heads / (heads + 2 * kv) / ranks + size * 2 * kv / (heads + 2 * kv) * kv_share
        elif ".self_attn.o_proj." in name or (".mlp." in name and ".mlp.gate." not in name):
            size /= ranks
        elif name.startswith("lm_head."):
            size /= ranks
        total += size
    return int(total)


def main() -> None:
    out, image, other, mode, checkpoints = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
    pipeline = mode == "pipeline"
    group = mx.distributed.init()
    results, logits = {"checkpoints": {}}, {}
    for n, path in enumerate(checkpoints):
        gc.collect()
        mx.clear_cache()
        before = mx.get_active_memory()
        model, processor = load(path, dtype="float32", group=group, pipeline=pipeline)
        resident = mx.get_active_memory() - before
        # Evaluated now, on every rank: a collective left lazy would run later on rank 0 alone.
        everyone = np.array(mx.distributed.all_gather(mx.array([resident / 2**20]), group=group))  # MiB
        logits.update({f"{n}/{name}": value for name, value in logits_of(model, processor).items()})
        results["checkpoints"][path] = {
            "resident": (everyone * 2**20).tolist(),
            "tokens": chat_tokens(model, processor, image),
        }
        del model, processor
    try:
        load(checkpoints[0] if group.rank() == 0 else other, dtype="float32", group=group, pipeline=pipeline)
    except Qwen3VLError as e:
        results["mismatch"] = str(e)
    if group.rank() == 0:
        np.savez(Path(out).with_suffix(".npz"), **logits)
        Path(out).write_text(json.dumps(results))
    # The ranks end together: a rank's exit while the other still works reads to it as a lost peer.
    mx.eval(mx.distributed.all_sum(mx.array(0), group=group))


if __name__ == "__main__":
    main()
