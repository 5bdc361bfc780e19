"""The sparse MLP of Qwen3-VL-MoE (30B-A3B, 235B-A22B): a router sends each token to a few of many small
SwiGLU experts and sums their outputs by its weights (transformers' Qwen3VLMoeTextSparseMoeBlock).

The experts run through mlx-lm's SwitchGLU, which gathers each token's experts in one matmul per
projection (`mx.gather_mm`, or `mx.gather_qmm` once quantized): no loop over experts. Its attribute
names (`switch_mlp.gate_proj` / `up_proj` / `down_proj`, [experts, out, in] each) are those of mlx-lm's
and mlx-vlm's MoE models, so the MLX community's conversions load as they are; `sanitize` maps
transformers' fused layout to them.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchGLU

from .config import TextConfig


class SparseMoeBlock(nn.Module):
    def __init__(self, config: TextConfig, activation: Callable[[mx.array, mx.array], mx.array]):
        """activation(gate, up): the decoder's gated SiLU, shared with the dense MLP."""
        super().__init__()
        moe = config.moe
        self.top_k = moe.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, moe.num_experts, bias=False)  # the router
        self.switch_mlp = SwitchGLU(
            config.hidden_size,
            moe.moe_intermediate_size,
            moe.num_experts,
            activation=lambda up, gate: activation(gate, up),  # SwitchGLU passes (up, gate)
        )

    def route(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """The experts chosen for each token [..., top_k] (in no particular order) and their weights
        [..., top_k]: as the reference, a float32 softmax over all experts, the top k, renormalised to
        sum to 1, then cast to the activations' dtype."""
        probs = mx.softmax(self.gate(x).astype(mx.float32), axis=-1)
        experts = mx.argpartition(probs, kth=-self.top_k, axis=-1)[..., -self.top_k :]
        weights = mx.take_along_axis(probs, experts, axis=-1)
        weights = weights / weights.sum(axis=-1, keepdims=True)
        return experts, weights.astype(x.dtype)

    def __call__(self, x: mx.array) -> mx.array:
        experts, weights = self.route(x)
        y = self.switch_mlp(x, experts)  # [..., top_k, hidden]: each chosen expert's output
        return (y * weights[..., None]).sum(axis=-2)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """This block's tensors (keys relative to it) in its own layout. Read:
        - transformers' fused experts, `experts.gate_up_proj` (gate rows, then up rows) and
          `experts.down_proj`, in either orientation. transformers 5 holds them as [E, 2I, H] and
          [E, H, I] (out, in: nn.Linear's order) and its save_pretrained writes that; the published hub
          files, written with transformers 4.57 whose experts multiplied `x @ W`, hold [E, H, 2I] and
          [E, I, H]. transformers 5 reads both by the rule of its conversion mapping for qwen3_vl_moe
          (`Transpose(1, 2, check_dims=True)`): a tensor in the module's shape as it is, any other
          transposed; the same rule here. (A tensor square in its last two axes, H == 2I or H == I,
          cannot tell; both then take it as is.)
        - mlx-lm's / mlx-vlm's `switch_mlp.*` (this package's converter writes it too): unchanged."""
        switch = self.switch_mlp
        weights = dict(weights)
        if "experts.gate_up_proj" in weights:
            fused = _out_in(weights.pop("experts.gate_up_proj"), switch.gate_proj.input_dims)
            gate, up = mx.split(fused, 2, axis=1)
            weights["switch_mlp.gate_proj.weight"] = gate
            weights["switch_mlp.up_proj.weight"] = up
        if "experts.down_proj" in weights:
            down = weights.pop("experts.down_proj")
            weights["switch_mlp.down_proj.weight"] = _out_in(down, switch.down_proj.input_dims)
        return weights


def _out_in(weight: mx.array, in_dims: int) -> mx.array:
    """An expert tensor stored [E, in, out] as [E, out, in], the module's order (`SparseMoeBlock.sanitize`);
    one already in that order, or fitting neither (check_weights then names its shape), as it is."""
    if stored_in_out(weight.shape, in_dims):
        return mx.contiguous(weight.swapaxes(1, 2))
    return weight


def stored_in_out(shape: tuple[int, ...], in_dims: int) -> bool:
    """Whether transformers' fused expert tensor of this shape is stored [E, in, out] (`sanitize`'s rule)."""
    return len(shape) == 3 and shape[2] != in_dims and shape[1] == in_dims
