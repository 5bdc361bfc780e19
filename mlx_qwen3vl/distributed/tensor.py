"""Tensor parallelism: each rank holds a slice of every decoder layer and computes that slice's share of
each token; one all-reduce per attention block and one per MLP (dense or MoE) put the shares together.

The splits (docs/distributed.md gives the memory and traffic of each):
- attention: query heads in N consecutive groups, with their key/value heads. With fewer KV heads than
  ranks, a rank holds the one KV head its query heads read (it is replicated over N / kv_heads ranks).
  o_proj is split by its input columns: each rank's output is a partial sum, all-reduced.
- dense MLP: gate and up by output rows, down by input columns (Megatron's split), one all-reduce.
- MoE: every expert split the same way inside (its intermediate width over the ranks), the router
  replicated. Splitting by experts would need the same single all-reduce, but a token's top-k experts
  then fall on few ranks: the busiest rank sets the step's time, and at decode (one token) most ranks
  would idle. Inside the experts every rank does 1/N of every token's work.
- vocabulary projection: its rows over the ranks, the logits gathered. A tied head is a view of the
  rank's rows of the (replicated) embedding, so it costs no memory.
- replicated: the embedding (every rank embeds the prompt), norms, the router, and the vision tower
  (every rank needs the features it places, and computing them costs no traffic).

Quantized layers are split as they are stored: packed rows and their scales split together along the
output axis; along the input axis each rank's width must be whole quantization groups.

The split modules keep their classes (nn.Linear, nn.QuantizedLinear, their CPU versions, SwitchGLU's
layers): only their arrays are cut, each to a `Part` of its features, and the parts are then read from the
files in place of the whole tensors (`parts.py`); the all-reduces are added by the subclasses below,
swapped into the attention and MLP modules as cpu/ swaps its versions in.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..config import TextConfig
from ..errors import Qwen3VLError
from ..language import MLP, Attention
from ..moe import SparseMoeBlock
from .parts import Box


@dataclass(frozen=True)
class HeadSplit:
    """The attention heads one rank holds: `q_heads` query heads from `q_start`, `kv_heads` KV heads from
    `kv_start` (heads in checkpoint order)."""

    q_start: int
    q_heads: int
    kv_start: int
    kv_heads: int

    @classmethod
    def of(cls, config: TextConfig, ranks: int, rank: int) -> HeadSplit:
        heads, kv = config.num_attention_heads, config.num_key_value_heads
        if heads % ranks:
            raise Qwen3VLError(
                f"tensor parallel: {heads} attention heads cannot be split evenly over {ranks} ranks "
                f"(use a number of ranks that divides {heads}, or pipeline mode)"
            )
        q_heads = heads // ranks
        if kv % ranks == 0:
            return cls(rank * q_heads, q_heads, rank * (kv // ranks), kv // ranks)
        if ranks % kv == 0:  # each KV head serves ranks / kv ranks, each holding a copy of it
            return cls(rank * q_heads, q_heads, rank * kv // ranks, 1)
        raise Qwen3VLError(
            f"tensor parallel: {kv} KV heads can neither be split over {ranks} ranks nor replicated "
            f"evenly (the number of ranks must divide {kv} or be a multiple of it)"
        )


class TensorParallelAttention(Attention):
    """This rank's heads; its o_proj's partial outputs summed over the ranks."""

    def __call__(self, *args, **kwargs) -> mx.array:
        return mx.distributed.all_sum(super().__call__(*args, **kwargs), group=self.group)


class TensorParallelMLP(MLP):
    def __call__(self, x: mx.array) -> mx.array:
        return mx.distributed.all_sum(super().__call__(x), group=self.group)


class TensorParallelMoe(SparseMoeBlock):
    def __call__(self, x: mx.array) -> mx.array:
        return mx.distributed.all_sum(super().__call__(x), group=self.group)


class VocabParallelHead(nn.Module):
    """This rank's rows of the vocabulary projection; the logits of all ranks gathered in vocabulary
    order. `tied`: the projection is an embedding (its `as_linear`)."""

    def __init__(self, projection: nn.Module, tied: bool, group: mx.distributed.Group):
        super().__init__()
        self.projection, self.tied, self.group = projection, tied, group

    def __call__(self, h: mx.array) -> mx.array:
        local = self.projection.as_linear(h) if self.tied else self.projection(h)
        # all_gather joins along the first axis: the vocabulary goes there and back.
        gathered = mx.distributed.all_gather(mx.moveaxis(local, -1, 0), group=self.group)
        return mx.moveaxis(gathered, 0, -1)


@dataclass(frozen=True)
class Part:
    """The features [start, stop) of `width` a rank holds of a layer's outputs (side "out") or inputs
    ("in"): the one description of a split, which slices the layer's arrays and says which bytes of the
    stored tensors the rank reads (`parts.py`)."""

    side: str
    start: int
    stop: int
    width: int

    def box(self, name: str, shape: tuple[int, ...]) -> Box | None:
        """Where the part lies in the layer's array `name` of `shape` (stored or loaded alike). Output
        features are the rows of a weight, its scales and quantization biases (the axis before the
        last: an expert layer's first axis is its experts) and the entries of a bias; input features are
        the last axis, packed (32 / bits to a uint32) or grouped (one scale per group). A bias of a
        layer split by its inputs: None (held whole)."""
        if self.side == "out":
            return Box(len(shape) - (1 if name == "bias" else 2), ((self.start, self.stop),))
        if name == "bias":
            return None
        columns = shape[-1]  # stored columns per input feature: columns / width
        return Box(len(shape) - 1, ((self.start * columns // self.width, self.stop * columns // self.width),))


def keep_part(module: nn.Module, part: Part, copy_out: bool = True) -> nn.Module:
    """The module with its arrays cut to `part` (copy_out=False: views of the arrays' buffers)."""
    for name, value in module.items():
        if isinstance(value, mx.array) and (box := part.box(name, value.shape)) is not None:
            module[name] = mx.contiguous(box.take(value)) if copy_out else box.take(value)
    return module


def equal_share(width: int, group: mx.distributed.Group) -> tuple[int, int, int]:
    share = width // group.size()
    return group.rank() * share, (group.rank() + 1) * share, width


def output_width(module: nn.Module) -> int:
    return module["weight"].shape[-2]


def input_width(module: nn.Module) -> int:
    weight = module["weight"]
    bits = getattr(module, "bits", None)
    return weight.shape[-1] * 32 // bits if bits else weight.shape[-1]


def check_input_split(module: nn.Module, name: str, ranks: int) -> None:
    """A layer split along its input: each rank's part must be whole quantization groups."""
    width = input_width(module)
    group_size = getattr(module, "group_size", 1)
    if width % ranks or (width // ranks) % group_size:
        raise Qwen3VLError(
            f"tensor parallel: {name} has {width} inputs, which {ranks} ranks cannot split into whole "
            f"quantization groups of {group_size} (convert with a smaller --q-group-size, or use "
            "pipeline mode)"
        )


def reduce_over_ranks(module: nn.Module, cls: type, group: mx.distributed.Group) -> None:
    """Give a loaded module its tensor-parallel subclass's behaviour in place (it adds an all-reduce)."""
    module.__class__ = cls
    module.group = group


# What a split records: {a split layer's name in the checkpoint's tree: (the module holding its part now,
# the Part)}, from which `parts.py` reads the parts.
Parts = dict[str, tuple[nn.Module, Part]]


def split_layer(parts: Parts, name: str, module: nn.Module, part: Part) -> None:
    parts[name] = (keep_part(module, part), part)


def shard_attention(attention: Attention, split: HeadSplit, group: mx.distributed.Group, name: str) -> Parts:
    d, parts = attention.head_dim, {}
    q_end, kv_end = split.q_start + split.q_heads, split.kv_start + split.kv_heads
    queries = Part("out", split.q_start * d, q_end * d, attention.n_heads * d)
    keys_values = Part("out", split.kv_start * d, kv_end * d, attention.n_kv_heads * d)
    split_layer(parts, f"{name}.q_proj", attention.q_proj, queries)
    split_layer(parts, f"{name}.k_proj", attention.k_proj, keys_values)
    split_layer(parts, f"{name}.v_proj", attention.v_proj, keys_values)
    check_input_split(attention.o_proj, f"{name}.o_proj", group.size())
    # o_proj's inputs are the query heads' outputs: the rank's columns are its heads'.
    heads_inputs = Part("in", queries.start, queries.stop, queries.width)
    split_layer(parts, f"{name}.o_proj", attention.o_proj, heads_inputs)
    attention.n_heads, attention.n_kv_heads = split.q_heads, split.kv_heads
    reduce_over_ranks(attention, TensorParallelAttention, group)
    return parts


def shard_mlp(mlp: nn.Module, group: mx.distributed.Group, name: str) -> Parts:
    """A dense MLP or the experts of a MoE block: gate / up by rows, down by columns."""
    moe = isinstance(mlp, SparseMoeBlock)
    layers, name = (mlp.switch_mlp, f"{name}.switch_mlp") if moe else (mlp, name)
    check_input_split(layers.down_proj, f"{name}.down_proj", group.size())
    share, parts = equal_share(output_width(layers.gate_proj), group), {}
    for projection in ("gate_proj", "up_proj"):
        split_layer(parts, f"{name}.{projection}", layers[projection], Part("out", *share))
    split_layer(parts, f"{name}.down_proj", layers.down_proj, Part("in", *share))
    reduce_over_ranks(mlp, TensorParallelMoe if moe else TensorParallelMLP, group)
    return parts


def shard_vocabulary(model: nn.Module, group: mx.distributed.Group) -> Parts:
    """The vocabulary projection's rows over the ranks (replicated where the vocabulary does not split
    evenly: all_gather needs equal parts)."""
    vocab = model.config.text_config.vocab_size
    if vocab % group.size():
        return {}
    rows = Part("out", *equal_share(vocab, group))
    if "lm_head" not in model:  # tied: a view of the embedding's rows, which every rank holds whole
        embedding = model.model.language_model.embed_tokens
        model.lm_head = VocabParallelHead(keep_part(copy.copy(embedding), rows, copy_out=False), True, group)
        return {}
    model.lm_head = VocabParallelHead(keep_part(model.lm_head, rows), False, group)
    return {"lm_head": (model.lm_head.projection, rows)}


def shard_tensor_parallel(model: nn.Module, group: mx.distributed.Group) -> Parts:
    """Keep this rank's part of a loaded, not yet evaluated model, as lazy slices of the tensors it
    opened; what it returns says which parts to read in their place (`parts.py`)."""
    text = model.config.text_config
    split = HeadSplit.of(text, group.size(), group.rank())
    parts: Parts = {}
    for i, layer in enumerate(model.layers):
        name = f"model.language_model.layers.{i}"
        parts.update(shard_attention(layer.self_attn, split, group, f"{name}.self_attn"))
        parts.update(shard_mlp(layer.mlp, group, f"{name}.mlp"))
    parts.update(shard_vocabulary(model, group))
    return parts
