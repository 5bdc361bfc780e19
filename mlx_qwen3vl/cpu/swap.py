"""Which part of a loaded model gets which CPU version (`specialize`, the subpackage's one entry)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from .. import vision
from ..language import MLP, Attention, Rope, TextModel
from .activations import GELUS, silu_gate
from .attention import decoder_attention, segment_attention_in_blocks
from .quantized import CpuQuantizedEmbedding, CpuQuantizedLinear, CpuQuantizedSwitchLinear
from .rope import TableRope
from .vision_mlp import BLOCKWISE
from .widening import Float32SwitchLinear, WideningLinear


def specialize(model: nn.Module, dtype: mx.Dtype) -> None:
    """Swap the CPU versions into a model built for the GPU backends. Idempotent; call it again after
    quantizing a loaded model in memory."""
    for name, module in model.named_modules():
        in_vision = name.startswith("model.visual.")
        if type(module) is nn.QuantizedLinear and not in_vision:
            become(module, CpuQuantizedLinear)
        elif type(module) is nn.QuantizedEmbedding:
            become(module, CpuQuantizedEmbedding)
        elif type(module) is QuantizedSwitchLinear:
            become(module, CpuQuantizedSwitchLinear)
        elif type(module) is nn.Linear and in_vision and ".patch_embed." not in f".{name}.":
            become(module, WideningLinear)  # the patch embedding sets the tower's compute dtype: kept
        elif type(module) is SwitchLinear:
            become(module, Float32SwitchLinear)
        elif isinstance(module, MLP):
            module.activation = silu_gate
        elif isinstance(module, Attention):
            module.attend = decoder_attention
        elif isinstance(module, (vision.VisionMLP, vision.PatchMerger)):
            module.act = GELUS.get(module.act, module.act)
            if type(module) in BLOCKWISE:
                become(module, BLOCKWISE[type(module)])
        elif isinstance(module, vision.VisionAttention):
            module.attend = segment_attention_in_blocks
        elif isinstance(module, TextModel) and type(module.rope) is Rope:
            become(module.rope, TableRope)


def become(module: nn.Module, cls: type) -> None:
    """Give a loaded module this subclass's behaviour in place. The subclasses here add methods only, no
    state, so the module's parameters and settings stay as they are."""
    assert cls.__base__ is type(module), (cls, type(module))
    module.__class__ = cls
