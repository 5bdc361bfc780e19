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
layers): mlx's `shard_inplace` slices their arrays; the all-reduces are added by the subclasses below,
swapped into the attention and MLP modules as cpu/ swaps its versions in.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_inplace

from ..config import TextConfig
from ..errors import Qwen3VLError
from ..language import MLP, Attention
from ..moe import SparseMoeBlock


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


def output_rows(module: nn.Module, start: int, stop: int, copy_out: bool = True) -> nn.Module:
    """A copy of a linear or embedding layer (quantized or not) holding output rows [start, stop) only:
    every array of such a layer has its output rows on axis 0 (packed weight, scales, biases, bias).
    copy_out=False keeps the rows a view of the original's buffer."""
    part = copy.copy(module)
    for name, value in module.items():
        if isinstance(value, mx.array):
            part[name] = mx.contiguous(value[start:stop]) if copy_out else value[start:stop]
    return part


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


def shard_attention(attention: Attention, split: HeadSplit, group: mx.distributed.Group, name: str) -> None:
    d = attention.head_dim
    attention.q_proj = output_rows(attention.q_proj, split.q_start * d, (split.q_start + split.q_heads) * d)
    kv_rows = (split.kv_start * d, (split.kv_start + split.kv_heads) * d)
    attention.k_proj = output_rows(attention.k_proj, *kv_rows)
    attention.v_proj = output_rows(attention.v_proj, *kv_rows)
    check_input_split(attention.o_proj, f"{name}.o_proj", group.size())
    shard_inplace(attention.o_proj, "sharded-to-all", group=group)
    attention.n_heads, attention.n_kv_heads = split.q_heads, split.kv_heads
    reduce_over_ranks(attention, TensorParallelAttention, group)


def shard_mlp(mlp: nn.Module, group: mx.distributed.Group, name: str) -> None:
    """A dense MLP or the experts of a MoE block: gate / up by rows, down by columns."""
    layers = mlp.switch_mlp if isinstance(mlp, SparseMoeBlock) else mlp
    check_input_split(layers.down_proj, f"{name}.down_proj", group.size())
    shard_inplace(layers.gate_proj, "all-to-sharded", group=group)
    shard_inplace(layers.up_proj, "all-to-sharded", group=group)
    shard_inplace(layers.down_proj, "sharded-to-all", group=group)
    reduce_over_ranks(mlp, TensorParallelMoe if isinstance(mlp, SparseMoeBlock) else TensorParallelMLP, group)


def shard_vocabulary(model: nn.Module, group: mx.distributed.Group) -> None:
    """The vocabulary projection's rows over the ranks (replicated where the vocabulary does not split
    evenly: all_gather needs equal parts)."""
    ranks, rank = group.size(), group.rank()
    vocab = model.config.text_config.vocab_size
    if vocab % ranks:
        return
    rows = (rank * vocab // ranks, (rank + 1) * vocab // ranks)
    tied = "lm_head" not in model
    if tied:
        embedding = model.model.language_model.embed_tokens
        model.lm_head = VocabParallelHead(output_rows(embedding, *rows, copy_out=False), True, group)
    else:
        model.lm_head = VocabParallelHead(output_rows(model.lm_head, *rows), False, group)


def shard_tensor_parallel(model: nn.Module, group: mx.distributed.Group) -> None:
    """Keep this rank's part of a loaded, not yet evaluated model: when its layers are evaluated (one at
    a time, `loading.evaluate`), each whole tensor is read and only this rank's slice of it stays."""
    text = model.config.text_config
    split = HeadSplit.of(text, group.size(), group.rank())
    for i, layer in enumerate(model.layers):
        name = f"model.language_model.layers.{i}"
        shard_attention(layer.self_attn, split, group, f"{name}.self_attn")
        shard_mlp(layer.mlp, group, f"{name}.mlp")
    shard_vocabulary(model, group)
