"""The vision MLPs (the blocks' and the mergers') for many float32 rows with numpy and the system
OpenBLAS, a block of rows per core, the GELU with numpy's vectorised exp (`numpy_mlp`)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import vision
from . import openblas
from .activations import NUMPY_GELUS
from .scheduling import on_cores

# Rows per block of the vision MLPs' numpy path (`numpy_mlp`): enough for BLAS to run at its full
# rate (fewer cost more at the 4B widths); what a core holds beyond the output is its block's intermediate
# activations and as much scratch (8 MiB each at the 4B widths), not the whole input's intermediate.
# Inputs of fewer than two blocks keep MLX.
NUMPY_MLP_ROWS = 512
# Values per piece of `_in_pieces`: the piece and its scratch buffers (1 MiB in all) stay in a core's cache
# through the GELU's dozen passes, and numpy's calls per piece cost little beside them.
GELU_PIECE = 65536


class BlockwiseVisionMLP(vision.VisionMLP):
    """A vision block's MLP, many float32 rows of it through `numpy_mlp`."""

    def __call__(self, x: mx.array) -> mx.array:
        return numpy_mlp(self, x) if numpy_mlp_takes(self, x) else super().__call__(x)


class BlockwisePatchMerger(vision.PatchMerger):
    """A patch merger whose MLP takes many float32 rows through `numpy_mlp`."""

    def mlp(self, x: mx.array) -> mx.array:
        return numpy_mlp(self, x) if numpy_mlp_takes(self, x) else super().mlp(x)


# The vision MLPs with a numpy path for many rows (`swap.specialize`).
BLOCKWISE = {vision.VisionMLP: BlockwiseVisionMLP, vision.PatchMerger: BlockwisePatchMerger}


def numpy_mlp_takes(module: nn.Module, x: mx.array) -> bool:
    """Whether `numpy_mlp` serves: float32, two blocks of rows or more, the system OpenBLAS, a GELU."""
    rows = x.size // x.shape[-1]
    fits = x.dtype == mx.float32 and rows >= 2 * NUMPY_MLP_ROWS
    return fits and openblas.loaded is not None and module.act in NUMPY_GELUS


def numpy_mlp(module: nn.Module, x: mx.array, block_rows: int | None = None) -> mx.array:
    """fc2(act(fc1(x))) of a vision MLP (a block's or a merger's) for many float32 rows, with the system
    OpenBLAS and numpy: a block of `block_rows` rows (NUMPY_MLP_ROWS by default) at a time, a block per
    core (`openblas.single_threaded`), the GELU in pieces that stay in cache (`_in_pieces`). MLX's CPU
    backend computes the GELU one value at a time on one core and holds the whole intermediate (rows x
    intermediate size) between the products. The same function, to float32 rounding."""
    block_rows = block_rows or NUMPY_MLP_ROWS
    fc1, fc2, activation = module.linear_fc1, module.linear_fc2, NUMPY_GELUS[module.act]
    params = [p.astype(mx.float32) for p in (fc1.weight, fc1.bias, fc2.weight, fc2.bias)]
    mx.eval(x, params)
    w1, b1, w2, b2 = (np.asarray(p) for p in params)
    rows = x.size // x.shape[-1]
    xn = openblas.unit_stride_rows(np.asarray(x).reshape(rows, -1))
    out = np.empty((rows, w2.shape[0]), np.float32)
    blocks = iter(range(0, rows, block_rows))

    def work(_) -> None:
        hidden = np.empty((block_rows, w1.shape[0]), np.float32)
        scratch = [np.empty(GELU_PIECE, np.float32) for _ in range(3)]
        for start in blocks:  # shared by the workers: each block is taken once
            end = min(start + block_rows, rows)
            h, y = hidden[: end - start], out[start:end]
            h[...] = b1
            openblas.sgemm(xn[start:end], w1, h, transpose_b=True, beta=1.0)
            _in_pieces(activation, h, scratch)
            y[...] = b2
            openblas.sgemm(h, w2, y, transpose_b=True, beta=1.0)

    on_cores(work)
    return mx.array(out).reshape(*x.shape[:-1], -1)


def _in_pieces(activation, h: np.ndarray, scratch: list[np.ndarray]) -> None:
    """activation(piece, *scratch) on consecutive pieces of the contiguous array h, in place."""
    flat = h.reshape(-1)
    for start in range(0, flat.size, GELU_PIECE):
        piece = flat[start : start + GELU_PIECE]
        activation(piece, *(buffer[: piece.size] for buffer in scratch))
