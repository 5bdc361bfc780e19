"""Scaled dot-product attention for the decoder and the vision tower.

On a GPU, MLX's fused kernel is used: it never materialises the scores and accumulates in float32.
MLX's CPU fallback, however, computes the scores and softmax in the activation dtype, which in bfloat16
puts ~45% of attention outputs 1 ulp or more away from PyTorch's CPU flash-attention kernel. Written by
hand here (no library has it) is what that kernel does: scores, softmax statistics and the P @ V
accumulation in float32, with only the unnormalised probabilities rounded to the activation dtype
before P @ V. In float32 this is plain exact attention; on CPU float32 matmuls also go through BLAS,
which is much faster there than MLX's bfloat16 kernels.

The softmax is taken in base 2 with log2(e) folded into the score scale (`cpu.py`: MLX's CPU exp is
a scalar polynomial, its power of 2 ~2.6x faster). The vision tower uses this version on the CPU in
float32 too (`vision.segment_attention`), where the exponentials of its long non-causal segments
dominate; it holds two score buffers where the fused fallback holds one, which the tower's query blocks
bound. The decoder keeps the fused fallback in float32: its prefill is matmul-bound, and a long
prompt's scores are large.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.base import scaled_dot_product_attention as fused_attention

from .cpu import LOG2_E


def _use_fused_kernel(dtype: mx.Dtype, cache) -> bool:
    # In float32 the CPU fallback is exact attention too, and one graph node instead of a dozen.
    return mx.default_device() == mx.gpu or dtype == mx.float32 or hasattr(cache, "bits")


def float32_attention(q, k, v, scale: float, mask=None) -> mx.array:
    """q [B, Hq, Lq, d], k/v [B, Hkv, Lk, d] (GQA: Hq a multiple of Hkv); mask None, "causal" or an array
    (boolean keep-mask or additive) broadcastable to [B, Hq, Lq, Lk]."""
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


def attention(q, k, v, scale: float, mask=None, cache=None) -> mx.array:
    """softmax(q k^T * scale + mask) v for q [B, Hq, Lq, d] and k, v [B, Hkv, Lk, d]."""
    if _use_fused_kernel(q.dtype, cache):
        return fused_attention(q, k, v, cache=cache, scale=scale, mask=mask)
    return float32_attention(q, k, v, scale, mask)
