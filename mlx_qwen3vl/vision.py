"""The Qwen3-VL vision encoder (docs/reference.md §3): patch embedding, interpolated position embedding, 2-D
rope, ViT blocks with attention confined to each image / video frame pair, the merger and the DeepStack
mergers.

Everything that depends only on the grids (interpolation taps, rope positions, attention segments) is
computed on the host with numpy by `VisionLayout`, once per call, and shared by all blocks. This is the
tower as MLX's GPU backends run it; `cpu/` swaps in what the CPU backend needs at load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import VISION_ACTIVATIONS, VisionConfig
from .language import apply_rope
from .rope import inv_freq

LAYER_NORM_EPS = 1e-6  # hard-coded in the reference, not a config key


def merge_block_order(g_h: int, g_w: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of each patch of a g_h x g_w grid in the processor's order (docs/reference.md §3.1):
    merge-block row, merge-block column, in-block row, in-block column."""
    rows, cols = np.meshgrid(np.arange(g_h), np.arange(g_w), indexing="ij")
    shape = (g_h // merge, merge, g_w // merge, merge)
    rows = rows.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    cols = cols.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    return rows, cols


def _bilinear_axis(size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Taps (floor, floor+1) and weights resampling a `side`-long axis to `size` points with
    align_corners=True, in the reference's float32 operation order (docs/reference.md §3.3)."""
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

    def run_grids(self) -> list[tuple[int, int, list[tuple[int, int, int]]]]:
        """`segment_runs` with the grids each run covers: (length, count, grids)."""
        runs: list[tuple[int, int, list]] = []
        for t, h, w in self.grids:
            if runs and runs[-1][0] == h * w:
                runs[-1] = (h * w, runs[-1][1] + t, runs[-1][2] + [(t, h, w)])
            else:
                runs.append((h * w, t, [(t, h, w)]))
        return runs

    def segment_runs(self) -> list[tuple[int, int]]:
        """Attention segments as (length, count) runs: every image and every frame pair of a video attends
        only within itself (docs/reference.md §3.5); consecutive equal segments are batched into one call."""
        return [(length, count) for length, count, _ in self.run_grids()]

    def split(self, max_patches: int) -> list[tuple[int, int, VisionLayout]]:
        """Consecutive pieces of at most `max_patches` patches (at least one attention segment each: an
        image, or one temporal group of a video), as (first row, end row, layout). A video is cut between
        its temporal groups. Every patch depends only on its own segment, so the pieces encoded one after
        the other give the rows of one pass over the whole."""
        pieces, grids, size, start = [], [], 0, 0
        for t, h, w in self.grids:
            segment = h * w
            while t:
                count = min(t, max(max_patches - size, 0) // segment)
                if count == 0 and size:  # full: close this piece
                    pieces.append((start, start + size, VisionLayout(grids)))
                    grids, start, size = [], start + size, 0
                    continue
                count = max(count, 1)  # a segment larger than the budget goes alone, whole
                grids.append((count, h, w))
                size, t = size + count * segment, t - count
        if grids:
            pieces.append((start, start + size, VisionLayout(grids)))
        return pieces


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and rounded once, as PyTorch does for bfloat16 (docs/reference.md §6.2);
    MLX's fused kernel rounds the normalised value before the affine step. Its parameters are kept in float32
    at load (`float32_parameters`: an exact widening), so a call casts only its input and its output."""

    float32_parameters = True

    def __call__(self, x: mx.array) -> mx.array:
        f32 = mx.float32
        y = mx.fast.layer_norm(x.astype(f32), self.weight.astype(f32), self.bias.astype(f32), self.eps)
        return y.astype(x.dtype)


_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)


@partial(mx.compile, shapeless=True)
def gelu_tanh(x: mx.array) -> mx.array:
    """PyTorch's gelu(approximate="tanh") in float32, rounded once (docs/reference.md §6.2): one kernel."""
    y = x.astype(mx.float32)
    return (0.5 * y * (1 + mx.tanh(_SQRT_2_OVER_PI * (y + 0.044715 * (y * y * y))))).astype(x.dtype)


@partial(mx.compile, shapeless=True)
def gelu_erf(x: mx.array) -> mx.array:
    """The exact (erf) GELU of the mergers, in float32, rounded once."""
    y = x.astype(mx.float32)
    return (0.5 * y * (1 + mx.erf(y * (1 / math.sqrt(2))))).astype(x.dtype)


class PatchEmbed(nn.Module):
    """The Conv3d with kernel = stride = (2, 16, 16), applied as a Linear on each flattened patch row.
    Its weight is always in the compute dtype, and so sets the dtype of the tower's activations."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        patch_dim = config.in_channels * config.temporal_patch_size * config.patch_size**2
        self.proj = nn.Linear(patch_dim, config.hidden_size, bias=True)

    def __call__(self, pixel_values: mx.array) -> mx.array:
        return self.proj(pixel_values.astype(self.proj.weight.dtype))


@mx.compile
def apply_vision_rope(x: mx.array, cos: mx.array, signed_sin: mx.array) -> mx.array:
    """Rotate-half rope over the full head dim in float32, rounded once (docs/reference.md §3.4); cos /
    signed_sin as `VisionModel.rope_tables` gives them."""
    return apply_rope(x.astype(mx.float32), cos, signed_sin).astype(x.dtype)


def fused_attention(q, k, v, scale: float) -> mx.array:
    """q, k, v [segments, heads, length, head_dim]: MLX's fused kernel, which never materialises the
    scores. It takes both of the towers' head dims as they are: 64 (2B, 4B) and 72 (8B, 32B: 1152 wide,
    16 heads). With the MLX this package requires (>= 0.32.4), Metal's full-attention kernel has head_dim
    72 (ml-explore/mlx#4330, in 0.32.2) for segments longer than 8 patches (an image or frame pair at the
    default sizes has at least 16; shorter ones have tiny scores and take MLX's unfused ops), and on CUDA
    cuDNN takes any multiple of 8 up to 128 in bfloat16 / float16 (float32 on CUDA is unfused for every
    head dim). Zero-padding 72 to 80 would be exact too, but only adds work and a copy here.
    `bench/gpu_parity.py` asks for the fused kernel at both head dims on a lent GPU."""
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)
        self.attend = fused_attention

    def __call__(self, x, rope_tables, runs) -> mx.array:
        """Non-causal attention within each segment; `runs` and `rope_tables` from `VisionLayout`: each
        run of equal segments is one batched call (segments never attend to each other, so no mask)."""
        qkv = self.qkv(x)
        heads, head_dim = self.num_heads, self.head_dim
        outputs, start = [], 0
        for (length, count), (cos, signed_sin) in zip(runs, rope_tables, strict=True):
            end = start + length * count
            part = qkv if len(runs) == 1 else qkv[start:end]
            # [count * length, 3 * heads * d] -> [3, count, heads, length, d]: q and k rotated together,
            # then each [count, heads, length, d] (splits and reshapes, no gathers)
            part = part.reshape(count, length, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)
            qk, v = mx.split(part, [2])
            qk = apply_vision_rope(qk, cos, signed_sin).reshape(2 * count, heads, length, head_dim)
            q, k = mx.split(qk, 2)
            out = self.attend(q, k, v.reshape(count, heads, length, head_dim), self.scale)
            outputs.append(out.transpose(0, 2, 1, 3).reshape(end - start, -1))
            start = end
        out = mx.concatenate(outputs, axis=0) if len(outputs) > 1 else outputs[0]
        return self.proj(out)


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.linear_fc2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)
        self.act = gelu_tanh if VISION_ACTIVATIONS[config.hidden_act] else gelu_erf

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.norm2 = LayerNorm(config.hidden_size, eps=LAYER_NORM_EPS)
        self.attn = VisionAttention(config)
        self.mlp = VisionMLP(config)

    def __call__(self, x, rope_tables, runs) -> mx.array:
        x = x + self.attn(self.norm1(x), rope_tables, runs)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """2x2 patches -> one LLM token (docs/reference.md §3.6). The main merger normalises each patch before
    grouping them; the DeepStack mergers (`postshuffle`) normalise the grouped vector."""

    def __init__(self, config: VisionConfig, postshuffle: bool):
        super().__init__()
        self.grouped_size = config.hidden_size * config.spatial_merge_size**2
        self.postshuffle = postshuffle
        self.norm = LayerNorm(self.grouped_size if postshuffle else config.hidden_size, eps=LAYER_NORM_EPS)
        self.linear_fc1 = nn.Linear(self.grouped_size, self.grouped_size, bias=True)
        self.linear_fc2 = nn.Linear(self.grouped_size, config.out_hidden_size, bias=True)
        self.act = gelu_erf  # exact (erf) GELU, unlike the blocks

    def __call__(self, x: mx.array) -> mx.array:
        if self.postshuffle:
            x = self.norm(x.reshape(-1, self.grouped_size))
        else:
            x = self.norm(x).reshape(-1, self.grouped_size)
        return self.mlp(x)

    def mlp(self, x: mx.array) -> mx.array:
        """The grouped vectors' MLP, apart so a backend can swap it (`backend.Backend.specialize`)."""
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
        """Bilinearly resampled learned positions, accumulated in float32 and rounded once (docs/reference.md
        §3.3)."""
        table = self.pos_embed.weight
        per_item = []
        for t, h, w in layout.grids:
            indices, weights = position_embedding_taps(h, w, self.side, self.config.spatial_merge_size)
            indices, weights = mx.array(indices), mx.array(weights)
            frame = sum(table[indices[:, k]].astype(mx.float32) * weights[:, k : k + 1] for k in range(4))
            per_item.append(mx.tile(frame.astype(dtype), (t, 1)))
        return mx.concatenate(per_item, axis=0)

    def rope_tables(self, layout: VisionLayout) -> list[tuple[mx.array, mx.array]]:
        """float32 cos and signed sin (`apply_rope`) per run of equal segments, [count, 1, length,
        head_dim]: rows (h) on the first quarter of each half, columns (w) on the second (docs/reference.md
        §3.4)."""
        merge = self.config.spatial_merge_size
        tables = []
        for length, count, grids in layout.run_grids():
            positions = np.concatenate(
                [np.tile(np.stack(merge_block_order(h, w, merge), axis=1), (t, 1)) for t, h, w in grids]
            )
            angles = mx.array(positions.astype(np.float32))[:, :, None] * self._rope_inv_freq
            angles = angles.reshape(count, 1, length, -1)
            cos, sin = mx.cos(angles), mx.sin(angles)
            tables.append((mx.concatenate([cos, cos], axis=-1), mx.concatenate([-sin, sin], axis=-1)))
        return tables

    def __call__(self, pixel_values: mx.array, grid_thw, progress=None) -> tuple[mx.array, list[mx.array]]:
        """pixel_values [N, 1536] for all items in order; grid_thw [n_items, 3].
        Returns the merged features [N/4, out_hidden] and one DeepStack feature per tap, same shape.
        With `progress(done, total)`, each block is evaluated before the next and reported."""
        layout = VisionLayout.from_grid_thw(grid_thw)
        x = self.patch_embed(pixel_values)
        x = x + self.position_embedding(layout, x.dtype)
        rope_tables, runs = self.rope_tables(layout), layout.segment_runs()
        deepstack = []
        taps = {block: j for j, block in enumerate(self.config.deepstack_visual_indexes)}
        for i, block in enumerate(self.blocks):
            x = block(x, rope_tables, runs)
            if i in taps:
                deepstack.append(self.deepstack_merger_list[taps[i]](x))
            if progress:
                mx.eval(x, deepstack)
                progress(i + 1, len(self.blocks))
        return self.merger(x), deepstack

    def activation_bytes_per_patch(self, dtype: mx.Dtype) -> int:
        """An upper estimate of the memory one patch's activations take while a block is evaluated: the
        residual stream and the attention's tensors (about 12 of the width: qkv, q and k rotated in
        float32, the output and its copies) and the MLP's hidden layer with its activation (2 of its width),
        and the float32 pixel row twice (as given and in MLX)."""
        config = self.config
        pixel_row = 4 * config.in_channels * config.temporal_patch_size * config.patch_size**2
        return dtype.size * (12 * config.hidden_size + 2 * config.intermediate_size) + 2 * pixel_row

    def published_patch_embedding(self, weight: mx.array) -> mx.array:
        """The patch embedding's weight back in transformers' Conv3d layout [D, C, T, kh, kw] (the inverse
        of `sanitize`'s reshape): what a converter writes, so that every reader of the published layout
        (mlx-vlm, transformers, this package) takes its output."""
        c = self.config
        return weight.reshape(-1, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size)

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
