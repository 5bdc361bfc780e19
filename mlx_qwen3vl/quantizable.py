"""Which tensors a quantization may touch, and at what bits: one rule, read by the converter (its plans,
the recipes and a user's per-layer request) and by the quantization check (a checkpoint from anyone).

Quantizing these breaks the model while nothing errors:
- the vision position table (`pos_embed`) is read by row, not applied as a layer: quantized, the small
  differences between neighbouring rows that encode position drown in the rounding (a published
  Qwen3-VL conversion shipped with 99.9 % of its rows zeroed, and every answer about an image got worse);
- the patch embedding casts the pixels to its weight's dtype (vision.py);
- norms scale every value of the residual stream, and biases shift it: MLX quantizes a layer's weight
  only and no norm at all, so these can only be met quantized in a foreign checkpoint;
- the MoE router (each sparse layer's `mlp.gate`) chooses experts by small differences between their
  logits, which a coarse rounding flips: never below 8 bits, as mlx-lm's and mlx-vlm's Qwen3-MoE
  predicates keep it.
"""

from __future__ import annotations

import mlx.nn as nn

from .moe import SparseMoeBlock

ROUTER_BITS = 8
FLOAT_MODULES = {
    "model.visual.pos_embed": "a position table is read by row: rounding erases the differences between "
    "rows that encode position",
    "model.visual.patch_embed.proj": "the patch embedding casts the pixels to its weight's dtype",
}


def router_paths(model: nn.Module) -> set[str]:
    return {f"{path}.gate" for path, module in model.named_modules() if isinstance(module, SparseMoeBlock)}


def refusal(path: str, bits: int, routers: set[str]) -> str | None:
    """Why the module at `path` must not be quantized at `bits`, or None where it may be."""
    if path in FLOAT_MODULES:
        return FLOAT_MODULES[path]
    if "norm" in path.rpartition(".")[2]:
        return "a norm scales every value of the residual stream and stays in float"
    if path in routers and bits < ROUTER_BITS:
        return f"the MoE router picks experts by small logit differences: at least {ROUTER_BITS} bits"
    return None
