"""Run by tests/test_distributed.py on every rank of a ring of N ranks: each checkpoint loaded as this
rank's part, its float32 logits for several prompts, the tokens of a greedy two-turn chat, and what the
load took: the rank's resident bytes and the bytes it read from files. Rank 0 writes the results (a
JSON, and the logits beside it as .npz), which the test compares with one process's:

    python tests/distributed_worker.py OUT.json IMAGE OTHER_CHECKPOINT MODE CHECKPOINT...
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
from mlx_qwen3vl.loading import load_model  # noqa: E402
from mlx_qwen3vl.processor import Processor  # noqa: E402

PROMPTS = ("text", "image_and_video")
# The first checkpoint of a run also answers an image alone and a video alone: the vision tower is
# replicated and places its features alike whatever the decoder, so the split decoders of the other
# checkpoints are checked with the two prompts above.
FIRST_PROMPTS = ("text", "image", "video", "image_and_video")
GREEDY_TOKENS = 16
LAST_POSITIONS = 8  # the logits compared: those of the prompt's end, where its images and text have met


def logits_of(model, processor, first: bool) -> dict[str, np.ndarray]:
    prompts = make_prompts(processor.tokenizer)
    out = {}
    for name in FIRST_PROMPTS if first else PROMPTS:
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


def rank_share(name: str, config, ranks: int, rank: int, pipeline: bool) -> float:
    """The fraction of tensor `name` (a parameter's or a stored tensor's) the split docs/distributed.md
    states gives rank `rank`. Tensor parallel: query heads, o_proj, MLP and expert widths and an untied
    lm_head divided over the ranks; KV heads divided, or one each when the ranks outnumber them.
    Pipeline: the rank's consecutive layers, the first ranks one more when they do not divide evenly.
    Everything else (embedding, norms, router, vision tower, and in pipeline mode the lm_head)
    replicated; a tied model's stored lm_head is not read at all."""
    text = config.text_config
    heads, kv, layers = text.num_attention_heads, text.num_key_value_heads, text.num_hidden_layers
    if name.startswith("lm_head.") and config.tie_word_embeddings:
        return 0.0
    if pipeline:
        share, extra = divmod(layers, ranks)
        start = rank * share + min(rank, extra)
        held = range(start, start + share + (rank < extra))
        in_layer = ".layers." in name and "language_model" in name
        return 0.0 if in_layer and int(name.split(".layers.")[1].split(".")[0]) not in held else 1.0
    kv_share = (kv // ranks if kv % ranks == 0 else 1) / kv
    if name.startswith("lm_head."):
        return 1 / ranks
    if "language_model" not in name:
        return 1.0
    if ".self_attn.qkv_proj." in name:  # the fused projection: query rows, then key and value rows
        return heads / (heads + 2 * kv) / ranks + 2 * kv / (heads + 2 * kv) * kv_share
    if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
        return kv_share
    if ".self_attn.q_proj." in name or ".self_attn.o_proj." in name:
        return 1 / ranks
    if ".mlp." in name and ".mlp.gate." not in name:  # dense or expert widths, not the router
        return 1 / ranks
    return 1.0


def expected_rank_bytes(model, ranks: int, rank: int, pipeline: bool) -> int:
    """A rank's resident parameter bytes by the stated split, from the whole model's parameters."""
    return int(
        sum(
            value.nbytes * rank_share(name, model.config, ranks, rank, pipeline)
            for name, value in tree_flatten(model.parameters())
        )
    )


def bytes_read() -> int:
    """The bytes this process has read from files so far (Linux's count of its read calls' bytes)."""
    with open("/proc/self/io") as io:
        return int(next(line for line in io if line.startswith("rchar:")).split()[1])


def main() -> None:
    out, image, other, mode, checkpoints = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
    pipeline = mode == "pipeline"
    group = mx.distributed.init()
    results, logits = {"checkpoints": {}}, {}
    for n, path in enumerate(checkpoints):
        gc.collect()
        mx.clear_cache()
        before, read = mx.get_active_memory(), bytes_read()
        # load_model, not load: the bytes read are then the model's alone (load also reads the tokenizer).
        model = load_model(Path(path), dtype="float32", group=group, pipeline=pipeline)
        measured = [mx.get_active_memory() - before, bytes_read() - read]
        processor = Processor.from_pretrained(Path(path), model.config)
        # Evaluated now, on every rank: a collective left lazy would run later on rank 0 alone.
        everyone = np.array(mx.distributed.all_gather(mx.array([measured]) / 2**20, group=group))  # MiB
        logits.update({f"{n}/{name}": value for name, value in logits_of(model, processor, n == 0).items()})
        results["checkpoints"][path] = {
            "resident": (everyone[:, 0] * 2**20).tolist(),
            "read": (everyone[:, 1] * 2**20).tolist(),
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
