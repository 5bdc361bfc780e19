"""Graph nodes of one decode step and of one vision block on the GPU path, counted on any machine: the
models are built at a config's real widths and depth with parameters that take no memory
(`measure.skeleton`), and the graph under `measure.fused_kernels_as_nodes`, so that every fused kernel is
the one node it is on a GPU. For mlx-lm's Qwen3 at the 4B dimensions this gives 1,054 nodes per step,
the figure measured on an H200 (../shared/GPU.md). Used by the bench's `ops` figure and pinned by
tests/test_graph.py.
"""

from __future__ import annotations

import mlx.core as mx
from measure import count_ops, fused_kernels_as_nodes, quantize, skeleton

DTYPES = {"bfloat16": mx.bfloat16, "float32": mx.float32, "float16": mx.float16}
CACHED_TOKENS = 16  # what the cache holds before the counted step (its size changes no node)


def ours(config: dict, bits: int | None = None, dtype: str = "bfloat16", backend: str = "gpu"):
    """This package's model as `load()` builds it for `backend`, quantized like a `convert.py` checkpoint
    (the decoder at `bits`, the vision tower kept)."""
    from mlx.utils import tree_flatten, tree_unflatten

    from mlx_qwen3vl.backend import Backend
    from mlx_qwen3vl.config import ModelConfig
    from mlx_qwen3vl.loading import in_compute_dtype
    from mlx_qwen3vl.model import Model

    model = Model(ModelConfig.from_dict(config))
    model.set_dtype(DTYPES[dtype])
    if bits:
        quantize(model, bits, skip=("model.visual",))
    model.fuse_projections()
    chosen = Backend.choose(backend, dtype)
    chosen.specialize(model)
    params = in_compute_dtype(model, dict(tree_flatten(model.parameters())), chosen.dtype)
    model.update(tree_unflatten(list(params.items())))
    skeleton(model)
    return model


def ours_decode_step(model) -> tuple[int, dict]:
    """Nodes of `model(token, cache=cache)` (what generation runs per token) up to the last logits."""
    cache = model.make_cache()
    fill(cache, model.config.text_config, model.layers[0].input_layernorm.weight.dtype)
    with fused_kernels_as_nodes() as calls:
        logits = model(mx.array([[5]]), cache=cache)[:, -1]
        return count_ops(logits, fused=calls)


def qwen3_args(config: dict):
    """mlx-lm's Qwen3 arguments at a Qwen3-VL checkpoint's text dimensions."""
    from mlx_lm.models.qwen3 import ModelArgs

    text = config["text_config"]
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    return ModelArgs(
        model_type="qwen3",
        hidden_size=text["hidden_size"],
        num_hidden_layers=text["num_hidden_layers"],
        intermediate_size=text["intermediate_size"],
        num_attention_heads=text["num_attention_heads"],
        rms_norm_eps=text["rms_norm_eps"],
        vocab_size=text["vocab_size"],
        num_key_value_heads=text["num_key_value_heads"],
        max_position_embeddings=text["max_position_embeddings"],
        head_dim=text["head_dim"],
        tie_word_embeddings=config.get("tie_word_embeddings", True),
        rope_theta=text.get("rope_theta", rope.get("rope_theta")),
    )


def mlx_lm(config: dict, bits: int | None = None, dtype: str = "bfloat16"):
    """mlx-lm's Qwen3 at the checkpoint's text dimensions (bench/systems/mlx_lm_peer.py)."""
    from mlx_lm.models.qwen3 import Model

    model = Model(qwen3_args(config))
    model.set_dtype(DTYPES[dtype])
    if bits:
        quantize(model, bits, skip=())
    skeleton(model)
    return model


def mlx_lm_decode_step(model) -> tuple[int, dict]:
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    args = model.args
    fill(cache, args, model.model.norm.weight.dtype)
    with fused_kernels_as_nodes() as calls:
        logits = model(mx.array([[5]]), cache=cache)[:, -1, :]
        return count_ops(logits, fused=calls)


def fill(cache, dims, dtype: mx.Dtype) -> None:
    """Put CACHED_TOKENS tokens of keys and values into every layer's cache."""
    shape = (1, dims.num_key_value_heads, CACHED_TOKENS, dims.head_dim)
    for layer in cache:
        layer.update_and_fetch(mx.zeros(shape, dtype), mx.zeros(shape, dtype))
    mx.eval([layer.state for layer in cache])


def ours_vision(model, grid: tuple[int, int, int]) -> tuple[int, dict]:
    """Nodes of the vision tower on one image or video of this (t, h, w) patch grid."""
    import numpy as np

    patches = mx.zeros((int(np.prod(grid)), model.model.visual.patch_embed.proj.weight.shape[1]))
    mx.eval(patches)
    with fused_kernels_as_nodes() as calls:
        features, deepstack = model.model.visual(patches, np.array([grid]))
        return count_ops(features, *deepstack, fused=calls)
