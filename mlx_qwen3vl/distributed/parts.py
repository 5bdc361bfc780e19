"""A tensor-parallel rank's parts of a checkpoint's tensors, read from its safetensors files without the
rest of those tensors.

MLX's `mx.load` opens a file lazily, but evaluating any slice of a tensor it opened reads the whole tensor
(its load is one read of all the tensor's bytes): a rank slicing those would read every decoder tensor
whole, N times the bytes it keeps. So `tensor.py` describes each split as a `Part` of a layer's features,
which gives a `Box` of each stored tensor; the sliced tensors are read here box by box, and the lazily
opened ones are dropped unread. A box along a tensor's first axis is one read; along a later axis, one
read per contiguous run, except runs shorter than a memory page: the disk reads whole pages, so those are
read with their neighbours, a bounded block at a time, and only the box is kept.

The parts are read as the model is split, before its layers are evaluated: the rank's share is in memory
at once, in the stored dtype: what it holds once loaded, unless the compute dtype is wider (then each
layer is widened as it is evaluated, and its stored part freed).
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import Qwen3VLError

# safetensors' dtype names; bfloat16 has no numpy type, so it is read as its 16 bits and viewed in MLX.
STORED_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
}
# The most bytes read at once for runs shorter than a page (their block, before the box is kept).
BLOCK_BYTES = 16 * 2**20


@dataclass(frozen=True)
class Box:
    """The entries of an array a rank holds: `ranges` along `axis`, concatenated in order, and with
    `swap_last` its last two axes swapped (a stored [E, in, out] expert tensor read as [E, out, in])."""

    axis: int
    ranges: tuple[tuple[int, int], ...]
    swap_last: bool = False

    def take(self, array: mx.array) -> mx.array:
        before = (slice(None),) * self.axis
        pieces = [array[(*before, slice(start, stop))] for start, stop in self.ranges]
        kept = pieces[0] if len(pieces) == 1 else mx.concatenate(pieces, axis=self.axis)
        return kept.swapaxes(-1, -2) if self.swap_last else kept


@dataclass(frozen=True)
class StoredTensor:
    """Where a tensor lies in a safetensors file."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # of its first byte in the file


def stored_tensors(file: Path) -> dict[str, StoredTensor]:
    """The tensors of a safetensors file from its header (an 8-byte length, then JSON)."""
    try:
        with file.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        start = 8 + length  # the data's, which the offsets count from
        return {
            name: StoredTensor(file, info["dtype"], tuple(info["shape"]), start + info["data_offsets"][0])
            for name, info in header.items()
            if name != "__metadata__"
        }
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise Qwen3VLError(f"{file}: cannot read safetensors ({e})") from None


def read_into(handle, offset: int, target: np.ndarray) -> None:
    handle.seek(offset)
    view = memoryview(target).cast("B")
    while view:
        count = handle.readinto(view)
        if not count:
            raise Qwen3VLError(f"{handle.name}: ends inside a tensor (a truncated weight file?)")
        view = view[count:]


def read_box(handle, tensor: StoredTensor, box: Box) -> mx.array:
    """The box of a stored tensor, reading its runs (or, for runs under a page, blocks of whole rows)."""
    if tensor.dtype not in STORED_DTYPES:
        raise Qwen3VLError(f"{tensor.file}: tensor dtype {tensor.dtype} is not supported")
    dtype = np.dtype(STORED_DTYPES[tensor.dtype])
    shape, axis = tensor.shape, box.axis
    outer, extent = prod(shape[:axis]), shape[axis]
    inner = prod(shape[axis + 1 :]) * dtype.itemsize  # the bytes of one step along `axis`
    row = extent * inner
    runs = [(start * inner, (stop - start) * inner) for start, stop in box.ranges]
    kept = sum(size for _, size in runs)
    out = np.empty((outer, kept), np.uint8)
    if outer == 1 or min(size for _, size in runs) >= mmap.PAGESIZE:
        for o in range(outer):
            at = 0
            for start, size in runs:
                read_into(handle, tensor.offset + o * row + start, out[o, at : at + size])
                at += size
    else:
        rows = max(1, BLOCK_BYTES // row)
        for o in range(0, outer, rows):
            block = np.empty((min(rows, outer - o), row), np.uint8)
            read_into(handle, tensor.offset + o * row, block)
            out[o : o + len(block)] = np.concatenate([block[:, s : s + size] for s, size in runs], axis=1)
    values = out.view(dtype).reshape(*shape[:axis], kept // inner, *shape[axis + 1 :])
    array = mx.array(values)
    if tensor.dtype == "BF16":
        array = array.view(mx.bfloat16)
    return array.swapaxes(-1, -2) if box.swap_last else array


def stored_box(name: str, shape: tuple[int, ...], parts: dict) -> Box | None:
    """The box a rank reads of stored tensor `name` (model naming), None for one it holds whole.
    transformers' fused experts (moe.py) map to the parts of the experts' gate and down projections."""
    from ..moe import stored_in_out

    module, _, array = name.rpartition(".")
    if module in parts:
        return parts[module][1].box(array, shape)
    mlp = module.removesuffix(".experts")
    if mlp == module or f"{mlp}.switch_mlp.gate_proj" not in parts:
        return None
    if array == "gate_up_proj":  # gate rows, then up rows: the rank's rows of each
        gate, part = parts[f"{mlp}.switch_mlp.gate_proj"]
        width = part.width
        swapped = stored_in_out(shape, gate.input_dims)
        ranges = ((part.start, part.stop), (width + part.start, width + part.stop))
        return Box(2 if swapped else 1, ranges, swapped)
    if array == "down_proj":
        _, part = parts[f"{mlp}.switch_mlp.down_proj"]
        swapped = stored_in_out(shape, part.width)
        return Box(1 if swapped else 2, ((part.start, part.stop),), swapped)
    return None


def read_held_parts(model: nn.Module, path: Path, parts: dict) -> None:
    """Replace the lazily opened, sliced arrays of `parts` ({module name: (module now holding the part,
    its Part)}) by their boxes read from the files: same shapes, same dtypes."""
    from ..loading import weight_files
    from ..model import MLX_VLM_PREFIXES, rename_mlx_vlm_key

    tensors: dict[str, StoredTensor] = {}
    for file in weight_files(path):
        tensors.update(stored_tensors(file))
    mlx_vlm = any(k.startswith(tuple(MLX_VLM_PREFIXES)) for k in tensors)
    stored = {}
    handles = {}
    try:
        for key, tensor in tensors.items():
            box = stored_box(rename_mlx_vlm_key(key) if mlx_vlm else key, tensor.shape, parts)
            if box is not None:
                if tensor.file not in handles:
                    handles[tensor.file] = tensor.file.open("rb", buffering=0)
                stored[key] = read_box(handles[tensor.file], tensor, box)
    finally:
        for handle in handles.values():
            handle.close()
    for name, value in model.sanitize(stored).items():
        module_name, _, array = name.rpartition(".")
        module = parts[module_name][0]
        if value.shape != module[array].shape:
            raise Qwen3VLError(f"tensor {name}: read {value.shape}, the rank's part is {module[array].shape}")
        module[array] = value.astype(module[array].dtype)
