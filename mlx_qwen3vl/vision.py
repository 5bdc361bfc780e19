"""The Qwen3-VL vision encoder (SPEC §3): patch embedding, interpolated position embedding, 2-D rope,
ViT blocks with attention confined to each image / video frame pair, the merger and the DeepStack mergers.

Everything that depends only on the grids (interpolation taps, rope positions, attention segments) is
computed on the host with numpy by `VisionLayout`, once per call, and shared by all blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .attention import attention, float32_attention
from .config import VISION_ACTIVATIONS, VisionConfig
from .cpu import LOG2_E, concatenate_evaluated, times_sigmoid
from .rope import inv_freq

LAYER_NORM_EPS = 1e-6  # hard-coded in the reference, not a config key

# Attention scores of one segment are computed in query blocks when they would exceed this many bytes,
# so a large photo costs O(N * block) memory instead of O(N^2) (two buffers of this size live at once:
# the scores and their exponentials). Fused GPU kernels never materialise the scores, so there the whole
# segment goes in one call. Measured on the CPU for a 3072-patch image at the 4B widths (576 MiB of
# scores per block): 76 MiB peak and 2.6 s per attention with 32 MiB blocks; 636 MiB and 3.6 s for MLX's
# fused fallback in one call.
CPU_ATTENTION_SCORE_BYTES = 32 * 2**20
_FUSED_SDPA_HEAD_DIMS = (64, 80, 128)


def merge_block_order(g_h: int, g_w: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of each patch of a g_h x g_w grid in the processor's order (SPEC §3.1): merge-block
    row, merge-block column, in-block row, in-block column."""
    rows, cols = np.meshgrid(np.arange(g_h), np.arange(g_w), indexing="ij")
    shape = (g_h // merge, merge, g_w // merge, merge)
    rows = rows.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    cols = cols.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    return rows, cols


def _bilinear_axis(size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Taps (floor, floor+1) and weights resampling a `side`-long axis to `size` points with
    align_corners=True, in the reference's float32 operation order (SPEC §3.3)."""
    index = np.arange(size, dtype=np.float32)
    src = index * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    offsets = np.array([0, 1], dtype=np.float32)
    taps = np.minimum(floor[:, None].astype(np.int64) + offsets.astype(np.int64), side - 1)
    distance = np.abs((src - floor)[:, None] - offsets)
    weights = np.maximum(np.float32(1) - distance, np.float32(0)).astype(np.float32)
    return taps, weights


def position_embedding_taps(g_h: int, g_w: int, side: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices into the `side x side` learned table and bilinear weights, `[g_h * g_w, 4]` each, for one
    frame, in merge-block order."""
    h_taps, h_weights = _bilinear_axis(g_h, side)
    w_taps, w_weights = _bilinear_axis(g_w, side)
    rows, cols = merge_block_order(g_h, g_w, merge)
    indices = (h_taps[rows][:, :, None] * side + w_taps[cols][:, None, :]).reshape(-1, 4)
    weights = (h_weights[rows][:, :, None] * w_weights[cols][:, None, :]).reshape(-1, 4)
    return indices.astype(np.int32), weights.astype(np.float32)


@dataclass
class VisionLayout:
    """Host-side description of a batch of images/videos: their grids and attention segments."""

    grids: list[tuple[int, int, int]]  # (t, h, w) in patches, per image or video

    @classmethod
    def from_grid_thw(cls, grid_thw) -> VisionLayout:
        grids = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
        return cls([tuple(int(v) for v in g) for g in grids])

    @property
    def num_patches(self) -> int:
        return sum(t * h * w for t, h, w in self.grids)

    def segment_runs(self) -> list[tuple[int, int]]:
        """Attention segments as (length, count) runs: every image and every frame pair of a video attends
        only within itself (SPEC §3.5); consecutive equal segments are batched into one call."""
        runs: list[tuple[int, int]] = []
        for t, h, w in self.grids:
            if runs and runs[-1][0] == h * w:
                runs[-1] = (h * w, runs[-1][1] + t)
            else:
                runs.append((h * w, t))
        return runs


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and rounded once, as PyTorch does for bfloat16 (SPEC §6.2);
    MLX's fused kernel rounds the normalised value before the affine step."""

    def __call__(self, x: mx.array) -> mx.array:
        f32 = mx.float32
        y = mx.fast.layer_norm(x.astype(f32), self.weight.astype(f32), self.bias.astype(f32), self.eps)
        return y.astype(x.dtype)


# gelu_tanh(x) = x * sigmoid(2u), u = sqrt(2 / pi) * (x + 0.044715 x^3): the tanh approximation, with the
# sigmoid as a power of 2 (`cpu.py`): 4x faster on the CPU than `nn.gelu_approx`, as accurate against
# float64 (max abs error 5e-7 vs 4e-7 on N(0, 4)).
_GELU_TANH_FACTOR = 2 * math.sqrt(2 / math.pi) * LOG2_E


@mx.compile
def gelu_tanh(x: mx.array) -> mx.array:
    return times_sigmoid(x, _GELU_TANH_FACTOR * (x + 0.044715 * (x * x * x)))


class WideningLinear(nn.Linear):
    """A Linear whose parameters may be narrower than the activations: under float32 compute a bfloat16
    checkpoint's matrices stay bfloat16 in memory (`loading.in_compute_dtype`) and are widened per call,
    which is exact, so the outputs equal those of widened-at-load weights. The tower's matrices are read
    once per encode, so the casts cost little (measured on the CPU at the 4B widths, 2 blocks and the 4
    mergers: 448x448 1.12 vs 0.93 s, 1024x768 6.55 vs 6.34 s) and halve the tower's memory (0.8 GB less
    for the 4B). A decoder matrix is read every token, so the decoder keeps nn.Linear."""

    def __call__(self, x: mx.array) -> mx.array:
        weight = self.weight.astype(x.dtype)
        if "bias" in self:
            return mx.addmm(self.bias.astype(x.dtype), x, weight.T)
        return x @ weight.T


def _in_float32(fn):
    """Apply an elementwise activation in float32 and round once (PyTorch's opmath, SPEC §6.2)."""
    return lambda x: fn(x.astype(mx.float32)).astype(x.dtype)


class PatchEmbed(nn.Module):
    """The Conv3d with kernel = stride = (2, 16, 16), applied as a Linear on each flattened patch row.
    Its weight is always in the compute dtype, and so sets the dtype of the tower's activations."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        patch_dim = config.in_channels * config.temporal_patch_size * config.patch_size**2
        self.proj = nn.Linear(patch_dim, config.hidden_size, bias=True)

    def __call__(self, pixel_values: mx.array) -> mx.array:
        return self.proj(pixel_values.astype(self.proj.weight.dtype))


def apply_vision_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate-half rope over the full head dim, in float32 (SPEC §3.4). x: [N, heads, d]; cos/sin: [N, d]."""
    x32 = x.astype(mx.float32)
    half = x.shape[-1] // 2
    rotated = mx.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[:, None] + rotated * sin[:, None]).astype(x.dtype)


def _score_budget(head_dim: int) -> int | None:
    if mx.default_device() == mx.gpu and head_dim in _FUSED_SDPA_HEAD_DIMS:
        return None
    return CPU_ATTENTION_SCORE_BYTES


def _in_query_blocks(attend, q, k, v, scale: float, block: int) -> mx.array:
    """One segment's attention, `block` query rows at a time, each evaluated before the next is built
    (`cpu.concatenate_evaluated`). q, k, v: [heads, L, d] -> [1, heads, L, d]."""
    block = max(1, block)
    parts = (attend(q[None, :, s : s + block], k[None], v[None], scale) for s in range(0, q.shape[1], block))
    return concatenate_evaluated(parts, axis=2)


def segment_attention(q, k, v, runs, scale: float, max_score_bytes: int | None) -> mx.array:
    """Non-causal attention within each segment. q, k, v: [N, heads, d] -> [N, heads * d]."""
    n_heads, head_dim = q.shape[1:]
    # Where the scores are materialised, the base-2 version (much faster exponentials on the CPU).
    attend = attention if max_score_bytes is None else float32_attention
    outputs, start = [], 0
    for length, count in runs:
        end = start + length * count

        def batched(t, start=start, end=end, count=count, length=length):
            return t[start:end].reshape(count, length, n_heads, head_dim).transpose(0, 2, 1, 3)

        qs, ks, vs = batched(q), batched(k), batched(v)
        # Bytes of float32 scores for one query row of one segment.
        row_bytes = n_heads * length * 4
        if max_score_bytes is None or count * length * row_bytes <= max_score_bytes:
            out = attend(qs, ks, vs, scale)
        else:
            out = mx.concatenate(
                [
                    _in_query_blocks(attend, qs[i], ks[i], vs[i], scale, max_score_bytes // row_bytes)
                    for i in range(count)
                ],
                axis=0,
            )
        outputs.append(out.transpose(0, 2, 1, 3).reshape(end - start, n_heads * head_dim))
        start = end
    return mx.concatenate(outputs, axis=0) if len(outputs) > 1 else outputs[0]


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv = WideningLinear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.proj = WideningLinear(config.hidden_size, config.hidden_size, bias=True)

    def __call__(self, x, cos, sin, runs, max_score_bytes) -> mx.array:
        qkv = self.qkv(x).reshape(x.shape[0], 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        q, k = apply_vision_rope(q, cos, sin), apply_vision_rope(k, cos, sin)
        return self.proj(segment_attention(q, k, v, runs, self.scale, max_score_bytes))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.linear_fc1 = WideningLinear(config.hidden_size, config.intermediate_size, bias=True)
        self.linear_fc2 = WideningLinear(config.intermediate_size, config.hidden_size, bias=True)
        approximate = VISION_ACTIVATIONS[config.hidden_act]
        self.act = _in_float32(gelu_tanh if approximate else nn.gelu)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.norm2 = LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.attn = VisionAttention(config)
        self.mlp = VisionMLP(config)

    def __call__(self, x, cos, sin, runs, max_score_bytes) -> mx.array:
        x = x + self.attn(self.norm1(x), cos, sin, runs, max_score_bytes)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """2x2 patches -> one LLM token (SPEC §3.6). The main merger normalises each patch before grouping
    them; the DeepStack mergers (`postshuffle`) normalise the grouped vector."""

    def __init__(self, config: VisionConfig, postshuffle: bool):
        super().__init__()
        self.grouped_size = config.hidden_size * config.spatial_merge_size**2
        self.postshuffle = postshuffle
        self.norm = LayerNorm(self.grouped_size if postshuffle else config.hidden_size, eps=LAYER_NORM_EPS)
        self.linear_fc1 = WideningLinear(self.grouped_size, self.grouped_size, bias=True)
        self.linear_fc2 = WideningLinear(self.grouped_size, config.out_hidden_size, bias=True)
        self.act = _in_float32(nn.gelu)  # exact (erf) GELU, unlike the blocks

    def __call__(self, x: mx.array) -> mx.array:
        if self.postshuffle:
            x = self.norm(x.reshape(-1, self.grouped_size))
        else:
            x = self.norm(x).reshape(-1, self.grouped_size)
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionModel(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.side = int(round(config.num_position_embeddings**0.5))
        self.patch_embed = PatchEmbed(config)
        self.pos_embed = nn.Embedding(config.num_position_embeddings, config.hidden_size)
        self.blocks = [VisionBlock(config) for _ in range(config.depth)]
        self.merger = PatchMerger(config, postshuffle=False)
        self.deepstack_merger_list = [
            PatchMerger(config, postshuffle=True) for _ in config.deepstack_visual_indexes
        ]
        self._rope_inv_freq = mx.array(inv_freq(config.rope_theta, config.head_dim // 2))

    def position_embedding(self, layout: VisionLayout, dtype: mx.Dtype) -> mx.array:
        """Bilinearly resampled learned positions, accumulated in float32 and rounded once (SPEC §3.3)."""
        table = self.pos_embed.weight
        per_item = []
        for t, h, w in layout.grids:
            indices, weights = position_embedding_taps(h, w, self.side, self.config.spatial_merge_size)
            indices, weights = mx.array(indices), mx.array(weights)
            frame = sum(table[indices[:, k]].astype(mx.float32) * weights[:, k : k + 1] for k in range(4))
            per_item.append(mx.tile(frame.astype(dtype), (t, 1)))
        return mx.concatenate(per_item, axis=0)

    def rope_cos_sin(self, layout: VisionLayout) -> tuple[mx.array, mx.array]:
        """float32 cos/sin [N, head_dim]: rows (h) on the first quarter of each half, columns (w) on the
        second (SPEC §3.4)."""
        per_item = []
        for t, h, w in layout.grids:
            rows, cols = merge_block_order(h, w, self.config.spatial_merge_size)
            positions = mx.array(np.tile(np.stack([rows, cols], axis=1), (t, 1)).astype(np.float32))
            per_item.append(positions)
        positions = mx.concatenate(per_item, axis=0)
        angles = (positions[:, :, None] * self._rope_inv_freq).reshape(positions.shape[0], -1)
        emb = mx.concatenate([angles, angles], axis=-1)
        return mx.cos(emb), mx.sin(emb)

    def __call__(self, pixel_values: mx.array, grid_thw) -> tuple[mx.array, list[mx.array]]:
        """pixel_values [N, 1536] for all items in order; grid_thw [n_items, 3].
        Returns the merged features [N/4, out_hidden] and one DeepStack feature per tap, same shape."""
        layout = VisionLayout.from_grid_thw(grid_thw)
        x = self.patch_embed(pixel_values)
        x = x + self.position_embedding(layout, x.dtype)
        cos, sin = self.rope_cos_sin(layout)
        runs = layout.segment_runs()
        budget = _score_budget(self.config.head_dim)
        deepstack = []
        taps = {block: j for j, block in enumerate(self.config.deepstack_visual_indexes)}
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, runs, budget)
            if i in taps:
                deepstack.append(self.deepstack_merger_list[taps[i]](x))
        return self.merger(x), deepstack

    @staticmethod
    def sanitize(weights: dict[str, mx.array], channels_last: bool = False) -> dict[str, mx.array]:
        """Adapt checkpoint tensors (keys relative to the vision tower) to this module's layout.
        channels_last: the patch embedding is an MLX Conv3d weight, as mlx-vlm stores it."""
        key = "patch_embed.proj.weight"
        w = weights.get(key)
        if w is not None and w.ndim == 5:
            if channels_last:
                w = w.transpose(0, 4, 1, 2, 3)  # MLX's [D, T, kh, kw, C] back to transformers' order
            # transformers' Conv3d weight [D, C, T, kh, kw]: its flattening order is the pixel row order.
            weights[key] = w.reshape(w.shape[0], -1)
        if {"pos_embed.scales", "pos_embed.biases", "patch_embed.proj.bias"} <= weights.keys():
            # Older mlx-vlm conversions quantized the whole tower; the position table is read by row index
            # (position_embedding), not through the layer, so it is dequantized once here. The tower width,
            # from the patch embedding's bias, fixes bits and group size.
            table, scales = weights["pos_embed.weight"], weights.pop("pos_embed.scales")
            width = weights["patch_embed.proj.bias"].shape[0]
            weights["pos_embed.weight"] = mx.dequantize(
                table,
                scales,
                weights.pop("pos_embed.biases"),
                group_size=width // scales.shape[-1],
                bits=table.shape[-1] * 32 // width,
            )
        return weights
