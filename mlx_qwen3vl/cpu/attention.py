"""Attention on the CPU: the decoder's (`decoder_attention`) and the vision tower's
(`segment_attention_in_blocks`), each choosing per call among MLX in one call, MLX over blocks, and numpy.

Attention with float32 accumulation for bfloat16 activations (`float32_attention`): MLX's CPU fallback
computes scores and softmax in the activation dtype, which puts ~45% of bfloat16 attention outputs 1 ulp
or more away from PyTorch's kernel; in float32 the fallback is exact and stays. The vision tower's long
segments are attended with numpy in float32 (`numpy_attention.py`: its exponentials use the vector units)
in tiles of scores that stay in cache, one per core at a time, each with its products on its own core
through the system OpenBLAS; so is the decoder's attention of a float32 prompt chunk, causal, with
grouped-query heads. Other prompt chunks against a long context (bfloat16, a batch's padding mask) go
over key blocks with a running softmax (`key_blocked_attention`). Either way the scores held are a
block's, not the chunk's against the whole context.

The block sizes below are read per call, so a test can set them for a whole model; a direct caller may
pass its own instead.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.base import scaled_dot_product_attention

from .activations import LOG2_E
from .numpy_attention import numpy_attention
from .scheduling import concatenate_evaluated

# The vision tower's attention scores of one segment are computed in query blocks when they would exceed
# this many bytes (two buffers of this size live at once: the scores and their exponentials), so a large
# photo costs O(N * block) memory instead of O(N^2); at the 4B widths such blocks are also faster than
# MLX's fallback in one call, whose scores would not fit in cache.
ATTENTION_SCORE_BYTES = 32 * 2**20
# The decoder's attention scores of one call (heads x queries x keys, float32) beyond which the keys are
# taken in blocks (`key_blocked_attention`): MLX's CPU fallback materialises them whole, which for a prompt
# chunk against a long context is a multiple of the chunk's share of the KV cache. Blocks of this size
# are also faster than the whole (less memory traffic).
DECODER_SCORE_BYTES = 32 * 2**20
# From about this many patches per segment (or prompt tokens per chunk), numpy's vectorised exponentials
# outweigh the Python calls it makes per head (`numpy_attention`); shorter segments (small images) and
# chunks (a chat turn's few tokens, a decode step) stay in MLX.
NUMPY_ATTENTION_LENGTH = 192


def float32_attention(q, k, v, scale: float, mask=None) -> mx.array:
    """What PyTorch's CPU flash-attention kernel does: scores, softmax statistics and the P @ V
    accumulation in float32, with only the unnormalised probabilities rounded to the activation dtype
    before P @ V; in float32 this is plain exact attention. The softmax in base 2 (log2(e) folded into
    the scale). q [B, Hq, Lq, d], k/v [B, Hkv, Lk, d] (GQA: Hq a multiple of Hkv); mask None, "causal" or
    an array (boolean keep-mask or additive) broadcastable to [B, Hq, Lq, Lk]."""
    B, n_q, L_q, d = q.shape
    n_kv, L_k = k.shape[1], k.shape[2]
    dtype, f32 = q.dtype, mx.float32
    # Group the query heads that share a kv head instead of repeating k and v.
    q = q.reshape(B, n_kv, n_q // n_kv, L_q, d).astype(f32)
    k, v = k[:, :, None].astype(f32), v[:, :, None].astype(f32)
    # Base-2 logits; scaling q (Lq x d) instead of the scores (Lq x Lk) saves a pass over the scores.
    scores = (q * (scale * LOG2_E)) @ k.swapaxes(-1, -2)
    if isinstance(mask, str):  # "causal", aligned to the end of the keys (cached prefix first)
        keep = mx.arange(L_k)[None] <= mx.arange(L_k - L_q, L_k)[:, None]
        scores = mx.where(keep, scores, -mx.inf)
    elif mask is not None:
        if mask.ndim == 4:  # [b, 1 or Hq, Lq, Lk] -> the grouped head layout
            heads = mask.shape[1]
            mask = mask.reshape(mask.shape[0], n_kv if heads > 1 else 1, -1, *mask.shape[2:])
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, -mx.inf)
        else:
            scores = scores + mask.astype(f32) * LOG2_E
    probs = mx.power(2.0, scores - scores.max(axis=-1, keepdims=True))
    total = probs.sum(axis=-1, keepdims=True)
    out = (probs.astype(dtype).astype(f32) @ v) / total
    return out.reshape(B, n_q, L_q, d).astype(dtype)


def decoder_attention(
    q,
    k,
    v,
    *,
    cache,
    scale: float,
    mask=None,
    score_bytes: int | None = None,
    tile: tuple[int, int] | None = None,
) -> mx.array:
    """The decoder's attention (`Attention.attend`). A float32 prompt chunk of NUMPY_ATTENTION_LENGTH
    tokens or more, causal, with numpy (`numpy_attention` in tiles of `tile`: its scores in tiles, its
    exponentials vectorised, a tile per core). Otherwise scores larger than `score_bytes`
    (DECODER_SCORE_BYTES by default: a short chunk against a long context, bfloat16, a batch's mask) go
    over key blocks of that size (`key_blocked_attention`); others in one call: MLX's fused kernel in
    float32, whose CPU fallback is exact there, float32 accumulation for narrower activations
    (`float32_attention`).

    A quantized KV cache (k and v packed, mlx-lm's QuantizedKVCache): a decode step reads the packed cache
    directly (`quantized_decode_attention`). A prompt chunk takes the layer's keys and values dequantized
    into the paths above: MLX's quantized matmul is a scalar kernel on the CPU (`quantized.py`), several
    times slower than these for many queries, and mlx-lm's quantized attention would hold the chunk's
    whole scores against the context. The same stored values either way; what a chunk holds for a moment
    is one layer's keys and values in the activation dtype."""
    if hasattr(cache, "bits"):
        if q.shape[2] == 1 and mask is None:
            return quantized_decode_attention(q, k, v, cache, scale)
        k, v = (mx.dequantize(*packed, group_size=cache.group_size, bits=cache.bits) for packed in (k, v))
        return decoder_attention(
            q, k, v, cache=None, scale=scale, mask=mask, score_bytes=score_bytes, tile=tile
        )
    batch, heads, queries, _ = q.shape
    causal = isinstance(mask, str)
    if q.dtype == mx.float32 and queries >= NUMPY_ATTENTION_LENGTH and (mask is None or causal):
        return numpy_attention(q, k, v, scale, causal, tile)
    if batch * heads * queries * k.shape[2] * 4 > (score_bytes or DECODER_SCORE_BYTES):
        return key_blocked_attention(q, k, v, scale, mask, score_bytes)
    if q.dtype == mx.float32:
        return scaled_dot_product_attention(q, k, v, cache=cache, scale=scale, mask=mask)
    return float32_attention(q, k, v, scale, mask)


def quantized_decode_attention(q, k, v, cache, scale: float) -> mx.array:
    """One query per sequence against a quantized cache's packed keys and values (mlx-lm's
    `quantized_scaled_dot_product_attention`), with the scores, softmax and accumulation in float32 as in
    `float32_attention`: for bfloat16 activations mlx-lm's computes the scores in bfloat16. q [B, Hq, 1,
    d]; k, v: (packed, scales, biases), each [B, Hkv, Lk, ...]."""
    B, n_q, _, d = q.shape
    n_kv, dtype, f32 = k[0].shape[1], q.dtype, mx.float32
    settings = {"group_size": cache.group_size, "bits": cache.bits}
    q = q.reshape(B, n_kv, n_q // n_kv, 1, d).astype(f32) * (scale * LOG2_E)
    k, v = ([x[:, :, None] for x in packed] for packed in (k, v))  # shared by the group's query heads
    scores = mx.quantized_matmul(q, *k, transpose=True, **settings)
    probs = mx.power(2.0, scores - scores.max(axis=-1, keepdims=True))
    total = probs.sum(axis=-1, keepdims=True)
    out = mx.quantized_matmul(probs.astype(dtype).astype(f32), *v, transpose=False, **settings) / total
    return out.reshape(B, n_q, 1, -1).astype(dtype)


def key_blocked_attention(q, k, v, scale: float, mask=None, score_bytes: int | None = None) -> mx.array:
    """`float32_attention` over blocks of keys with a running softmax (flash attention's recurrence: each
    block's exponentials taken against the largest score so far, earlier sums rescaled when it grows),
    each block evaluated before the next: the scores held are one block's (at most `score_bytes`,
    DECODER_SCORE_BYTES by default), however long the context. The same function up to float32 rounding."""
    B, n_q, L_q, d = q.shape
    n_kv, L_k, f32 = k.shape[1], k.shape[2], mx.float32
    q = (q.reshape(B, n_kv, n_q // n_kv, L_q, d).astype(f32)) * (scale * LOG2_E)
    block = max(1, (score_bytes or DECODER_SCORE_BYTES) // (B * n_q * L_q * 4))
    top = mx.full((B, n_kv, n_q // n_kv, L_q, 1), -mx.inf, f32)
    total, out = mx.zeros_like(top), mx.zeros((B, n_kv, n_q // n_kv, L_q, v.shape[-1]), f32)
    for start in range(0, L_k, block):
        keys = slice(start, min(start + block, L_k))
        scores = q @ k[:, :, None, keys].astype(f32).swapaxes(-1, -2)
        scores = _masked(scores, mask, keys, L_q, L_k, n_kv)
        new_top = mx.maximum(top, scores.max(axis=-1, keepdims=True))
        # A row whose keys so far are all masked keeps -inf as its top: exponentials against 0 there.
        safe_top = mx.where(new_top == -mx.inf, 0.0, new_top)
        probs, rescale = mx.power(2.0, scores - safe_top), mx.power(2.0, top - safe_top)
        total = total * rescale + probs.sum(axis=-1, keepdims=True)
        out = out * rescale + probs.astype(v.dtype).astype(f32) @ v[:, :, None, keys].astype(f32)
        top = new_top
        mx.eval(top, total, out)
    return (out / total).reshape(B, n_q, L_q, -1).astype(v.dtype)


def _masked(scores: mx.array, mask, keys: slice, L_q: int, L_k: int, n_kv: int) -> mx.array:
    """Base-2 scores [B, n_kv, group, L_q, block] of the keys `keys` with the mask applied: None,
    "causal" (aligned to the end of the keys) or an array broadcastable to [B, Hq, L_q, L_k]."""
    if mask is None:
        return scores
    if isinstance(mask, str):
        keep = mx.arange(keys.start, keys.stop)[None] <= mx.arange(L_k - L_q, L_k)[:, None]
        return mx.where(keep, scores, -mx.inf)
    mask = mask[..., keys]
    if mask.ndim == 4:
        heads = mask.shape[1]
        mask = mask.reshape(mask.shape[0], n_kv if heads > 1 else 1, -1, *mask.shape[2:])
    if mask.dtype == mx.bool_:
        return mx.where(mask, scores, -mx.inf)
    return scores + mask.astype(mx.float32) * LOG2_E


def segment_attention_in_blocks(
    q, k, v, scale: float, score_bytes: int | None = None, tile: tuple[int, int] | None = None
) -> mx.array:
    """`vision.fused_attention` for q, k, v [segments, heads, length, d]. In float32, segments of at least
    NUMPY_ATTENTION_LENGTH patches with numpy (`numpy_attention` in tiles of `tile`); shorter ones with
    MLX, in calls of as many segments as `score_bytes` of scores hold (ATTENTION_SCORE_BYTES by default),
    each evaluated before the next; a segment whose scores alone exceed it in query blocks of at most
    that. The path follows the segments' length, never their count, so a video encoded in pieces
    (`Model.encode_vision`) gets the bits of one pass."""
    score_bytes = score_bytes or ATTENTION_SCORE_BYTES
    count, heads, length, _ = q.shape
    row_bytes = heads * length * 4  # float32 scores of one query row
    per_call = score_bytes // (length * row_bytes)
    if q.dtype == mx.float32 and (length >= NUMPY_ATTENTION_LENGTH or not per_call):
        return numpy_attention(q, k, v, scale, False, tile)
    if per_call >= count:
        return float32_attention(q, k, v, scale)
    if per_call:
        calls = range(0, count, per_call)
        parts = (float32_attention(*(x[s : s + per_call] for x in (q, k, v)), scale) for s in calls)
        return concatenate_evaluated(parts, axis=0)
    block = max(1, score_bytes // row_bytes)
    segments = []
    for i in range(count):
        parts = (
            float32_attention(q[i : i + 1, :, s : s + block], k[i : i + 1], v[i : i + 1], scale)
            for s in range(0, length, block)
        )
        segments.append(concatenate_evaluated(parts, axis=2))
    return mx.concatenate(segments, axis=0) if count > 1 else segments[0]
