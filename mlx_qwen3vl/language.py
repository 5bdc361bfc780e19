"""The Qwen3 decoder of Qwen3-VL (docs/reference.md §4.2-§4.5): per-head q/k RMSNorm, GQA, interleaved MRoPE
and the DeepStack injection of visual features after the first decoder layers.

This is the model as MLX's GPU backends run it; `cpu/` swaps in what the CPU backend needs at load.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention

from .config import TextConfig
from .moe import SparseMoeBlock
from .rope import rope_periods, text_inv_freq

# Absolute MRoPE positions of a prompt or chunk, [3, B, L] on the host; or, for text that continues
# from an offset (every axis equal and consecutive), that offset alone: an int, or one per batch row.
Positions = np.ndarray | int | mx.array


def mrope_axes(head_dim: int, mrope_section: list[int]) -> np.ndarray:
    """Which position row (0 = t, 1 = h, 2 = w) drives each of the head_dim/2 frequencies: interleaved
    THWTHW... over the first 3 * section[h|w] frequencies, t for the rest (docs/reference.md §4.3)."""
    i = np.arange(head_dim // 2)
    axes = np.zeros_like(i)
    axes[(i % 3 == 1) & (i < 3 * mrope_section[1])] = 1
    axes[(i % 3 == 2) & (i < 3 * mrope_section[2])] = 2
    return axes


def text_offset(positions: np.ndarray) -> int | np.ndarray | None:
    """The start position when every axis is equal and each row consecutive (text; MRoPE is then plain
    rope at that position), else None: one int when the rows start alike, else one per row."""
    t = positions[0]
    if t.shape[1] == 0:
        return 0
    if not ((positions == t).all() and (t == t[:, :1] + np.arange(t.shape[1])).all()):
        return None
    starts = t[:, 0]
    return int(starts[0]) if (starts == starts[0]).all() else starts


class Rope:
    """Rotary embedding of the decoder for any positions. Text (equal axes, consecutive) takes MLX's
    fused rope, one graph node per tensor; inputs with images or videos take the interleaved MRoPE with
    cos/sin tables. Both rotate with the reference's float32 frequency table (rope.py): the fused kernel
    divides 1 by its `freqs`, chosen so that this gives the table exactly.

    With YaRN (a context extended past the trained length) the table is YaRN's, and the reference
    multiplies cos and sin by an attention factor, which scales the rotated q and k alike: the tables
    carry it as the reference's do; the fused kernel has no output scale, so its result is multiplied
    by it (the same value up to one float32 rounding)."""

    def __init__(self, config: TextConfig):
        self.dims = config.head_dim
        table, self.attention_scaling = text_inv_freq(config)
        self.periods = mx.array(rope_periods(table))
        self.inv_freq = mx.array(table)
        self.axes = mx.array(mrope_axes(config.head_dim, config.mrope_section))

    def at(self, positions: Positions, length: int, dtype: mx.Dtype):
        """A function rotating q or k [B, heads, length, head_dim] at these positions."""
        offset = positions if not isinstance(positions, np.ndarray) else text_offset(positions)
        if offset is not None:
            if isinstance(offset, np.ndarray):
                offset = mx.array(offset.astype(np.int32))
            fused = partial(
                mx.fast.rope,
                dims=self.dims,
                traditional=False,
                base=None,
                scale=1.0,
                offset=offset,
                freqs=self.periods,
            )
            if self.attention_scaling == 1.0:
                return fused
            return lambda x: fused(x) * self.attention_scaling  # a Python float keeps x's dtype
        cos, signed_sin = self.tables(mx.array(positions), dtype)
        return partial(apply_rope, cos=cos, signed_sin=signed_sin)

    def tables(self, position_ids: mx.array, dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
        """cos and a signed sin, [B, 1, L, d], for position ids [3, B, L]: float32 angles, cast to the
        activation dtype like the reference, which then rotates in that dtype. sin's first half is
        negated so that `apply_rope` rotates with a single roll (exact: negation commutes with the
        rounding to `dtype`)."""
        per_freq = position_ids.astype(mx.float32)[self.axes]  # [d/2, B, L]
        angles = per_freq.transpose(1, 2, 0) * self.inv_freq  # [B, L, d/2]
        cos, sin = mx.cos(angles), mx.sin(angles)
        if self.attention_scaling != 1.0:  # YaRN: scaled in float32, before the cast, as the reference does
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        cos, sin = cos.astype(dtype), sin.astype(dtype)
        cos = mx.concatenate([cos, cos], axis=-1)
        sin = mx.concatenate([-sin, sin], axis=-1)
        return cos[:, None], sin[:, None]


@mx.compile  # fuses the multiplies and the add into one kernel
def apply_rope(x: mx.array, cos: mx.array, signed_sin: mx.array) -> mx.array:
    """Rotate-half rope, x * cos + [-x2, x1] * sin, as x * cos + roll(x) * signed_sin.
    x: [B, heads, L, d]; cos / signed_sin: [B, 1, L, d] from `Rope.tables`. (Not shapeless: the roll's
    split needs shapes; each new prompt-chunk length traces once.)"""
    return x * cos + mx.roll(x, x.shape[-1] // 2, axis=-1) * signed_sin


def split_heads(x: mx.array, head_dim: int) -> mx.array:
    """[B, L, heads * head_dim] -> [B, heads, L, head_dim]."""
    B, L, _ = x.shape
    if L == 1:  # one token: the transpose moves no data, and a reshape alone is one graph node less
        return x.reshape(B, -1, 1, head_dim)
    return x.reshape(B, L, -1, head_dim).transpose(0, 2, 1, 3)


def merge_heads(x: mx.array) -> mx.array:
    """[B, heads, L, head_dim] -> [B, L, heads * head_dim]."""
    B, _, L, _ = x.shape
    if L == 1:
        return x.reshape(B, 1, -1)
    return x.transpose(0, 2, 1, 3).reshape(B, L, -1)


def fused_linear(layers: list[nn.Module]) -> nn.Module | None:
    """One layer whose output is the given layers' outputs concatenated, or None if they cannot share
    one matrix. Exact, quantized ones included: MLX quantizes in groups along the input dimension, so
    the concatenated rows keep their packed values, scales and biases. Layers of different bit widths
    (mixed quantization recipes) stay apart."""
    first = layers[0]
    if any(type(layer) is not type(first) or "bias" in layer for layer in layers):
        return None
    if isinstance(first, nn.QuantizedLinear):
        settings = {(layer.bits, layer.group_size, layer.mode) for layer in layers}
        if len(settings) > 1:
            return None
    fused = copy.copy(first)  # the same class and settings (bits, group size); its arrays replaced:
    for name, value in first.items():
        if isinstance(value, mx.array):
            fused[name] = mx.concatenate([layer[name] for layer in layers], axis=0)
    return fused


class Attention(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, hidden, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.attend = scaled_dot_product_attention

    def fuse(self) -> None:
        """q, k and v as one matrix (`qkv_proj`): one matmul instead of three per token."""
        fused = fused_linear([self.q_proj, self.k_proj, self.v_proj])
        if fused is not None:
            self.qkv_proj = fused
            del self["q_proj"], self["k_proj"], self["v_proj"]

    def project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """q, k, v as [B, heads, L, head_dim]."""
        if "qkv_proj" not in self:
            return tuple(split_heads(p(x), self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        qkv = split_heads(self.qkv_proj(x), self.head_dim)
        q, k, v = mx.split(qkv, [self.n_heads, self.n_heads + self.n_kv_heads], axis=1)
        if x.shape[1] > 1:
            # Written into the cache as a view, v kept each layer's whole q/k/v product alive until the
            # prompt chunk was evaluated (a chunk x (q + 2 kv) width buffer per layer); its own copy
            # frees that product with the layer. A decode step's product is one row: no copy.
            v = mx.contiguous(v)
        return q, k, v

    def __call__(self, x, rope, mask, cache=None, queries: int | None = None) -> mx.array:
        """Attention of x's positions, or of its last `queries` only (all of them still written to the
        cache): what the last layer computes when only the final position's output is wanted."""
        q, k, v = self.project(x)
        q, k = rope(self.q_norm(q)), rope(self.k_norm(k))
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        if queries is not None:
            q = q[:, :, q.shape[2] - queries :]
            if isinstance(mask, mx.array):  # "causal" is aligned to the end of the keys already
                mask = mask[..., mask.shape[-2] - queries :, :]
        out = self.attend(q, k, v, cache=cache, scale=self.scale, mask=mask)
        return self.o_proj(merge_heads(out))

    def write_cache(self, x, rope, cache) -> None:
        """Only x's keys and values into the cache: a layer whose outputs nothing reads."""
        _, k, v = self.project(x)
        cache.update_and_fetch(rope(self.k_norm(k)), v)


@partial(mx.compile, shapeless=True)
def silu_gate(gate: mx.array, up: mx.array) -> mx.array:
    """SiLU(gate) * up, the SiLU in float32 and rounded once as PyTorch does for bfloat16 (docs/reference.md
    §6.2). One fused kernel, so a prefill chunk holds one intermediate of [tokens, intermediate_size] instead
    of three."""
    g = gate.astype(mx.float32)
    return (g * mx.sigmoid(g)).astype(gate.dtype) * up


class MLP(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.activation = silu_gate

    def fuse(self) -> None:
        """gate and up as one matrix (`gate_up_proj`)."""
        fused = fused_linear([self.gate_proj, self.up_proj])
        if fused is not None:
            self.gate_up_proj = fused
            del self["gate_proj"], self["up_proj"]

    def __call__(self, x: mx.array) -> mx.array:
        if "gate_up_proj" in self:
            gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.activation(gate, up))


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, index: int):
        super().__init__()
        self.self_attn = Attention(config)
        sparse = config.moe is not None and config.moe.is_sparse(index)
        self.mlp = SparseMoeBlock(config, silu_gate) if sparse else MLP(config)
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def __call__(self, x, rope, mask, cache=None, outputs: int | None = None) -> mx.array:
        """The layer's output for x's positions, or for its last `outputs` only (all of them still in
        the cache; 0: the cache alone)."""
        if outputs == 0:
            self.self_attn.write_cache(self.input_layernorm(x), rope, cache)
            return x[:, :0]
        residual = x if outputs is None else x[:, x.shape[1] - outputs :]
        h = residual + self.self_attn(self.input_layernorm(x), rope, mask, cache, outputs)
        return h + self.mlp(self.post_attention_layernorm(h))


class TextModel(nn.Module):
    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [DecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rope = Rope(config)

    def fuse_projections(self) -> None:
        for layer in self.layers:
            if not isinstance(layer, DecoderLayer):  # held by another rank (distributed/pipeline.py)
                continue
            layer.self_attn.fuse()
            if isinstance(layer.mlp, MLP):  # not the experts: SwitchGLU multiplies gate and up apart
                layer.mlp.fuse()

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """The checkpoint's decoder tensors (keys relative to this module) in this tree: a MoE layer's
        MLP maps its experts' layouts (moe.py); the other tensors are named as the modules."""
        for i, layer in enumerate(self.layers):
            if isinstance(layer.mlp, SparseMoeBlock):
                prefix = f"layers.{i}.mlp."
                own = {k[len(prefix) :]: weights.pop(k) for k in list(weights) if k.startswith(prefix)}
                weights.update({prefix + k: v for k, v in layer.mlp.sanitize(own).items()})
        return weights

    def __call__(
        self,
        inputs_embeds: mx.array,
        positions: Positions,
        cache: list | None = None,
        visual_index: mx.array | None = None,
        deepstack: list[mx.array] | None = None,
        outputs: int | None = None,
    ) -> mx.array:
        """inputs_embeds [B, L, H] at `positions`. `deepstack[j]` (rows for the flat positions
        `visual_index` of [B * L]) is added to the output of decoder layer j (docs/reference.md §4.5).

        `outputs`: the hidden states of the last `outputs` positions only (None: all). The last layer
        then computes only those (0: it writes its keys and values to the cache, as a prompt chunk
        before the last needs), unless a DeepStack feature is added after it (a truncated model)."""
        h = inputs_embeds
        B, L, H = h.shape
        rope = self.rope.at(positions, L, h.dtype)
        cache = cache if cache is not None else [None] * len(self.layers)
        mask = create_attention_mask(h, cache[0])
        deepstack = deepstack or []
        # The last layer computes only the outputs asked for, unless a DeepStack feature follows it
        trims = outputs is not None and (outputs == 0 or len(deepstack) < len(self.layers))
        trim_at = len(self.layers) - 1 if trims else -1
        for j, (layer, layer_cache) in enumerate(zip(self.layers, cache, strict=True)):
            trimmed = j == trim_at
            h = layer(h, rope, mask, layer_cache, outputs if trimmed else None)
            if j < len(deepstack) and not trimmed:
                h = add_deepstack(h, visual_index, deepstack[j])
        if outputs == 0:
            return h
        if outputs is not None:
            h = h[:, h.shape[1] - outputs :]
        return self.norm(h)

    def layer_by_layer(
        self,
        inputs_embeds: mx.array,
        positions: Positions,
        visual_index: mx.array | None = None,
        deepstack: list[mx.array] | None = None,
    ) -> Iterator[mx.array]:
        """What `__call__` computes without a cache, a decoder layer per step: yields each layer's output
        (before its DeepStack feature is added), then the final normed hidden states. Each layer is looked
        up when its step runs, so a caller stepping several inputs in turn may drop a layer from
        `self.layers` once all have passed it: the quantization check runs the calibration set through
        two models so, holding one decoder layer of each at a time."""
        h = inputs_embeds
        rope = self.rope.at(positions, h.shape[1], h.dtype)
        mask = create_attention_mask(h, None)
        deepstack = deepstack or []
        for j in range(len(self.layers)):
            h = self.layers[j](h, rope, mask)
            yield h
            if j < len(deepstack):
                h = add_deepstack(h, visual_index, deepstack[j])
        yield self.norm(h)


def add_deepstack(h: mx.array, visual_index: mx.array, feature: mx.array) -> mx.array:
    """h [B, L, H] with a DeepStack feature's rows added at the flat positions `visual_index` of [B * L]."""
    B, L, H = h.shape
    return h.reshape(B * L, H).at[visual_index].add(feature.astype(h.dtype)).reshape(B, L, H)
