"""Long float32 attention with numpy: scores in tiles that stay in a core's cache, exponentials with the
CPU's vector units, a tile per core through the system OpenBLAS (`numpy_attention`). The vision tower's
long segments and the decoder's long float32 prompt chunks take it (`attention.py` decides)."""

from __future__ import annotations

from functools import cache

import mlx.core as mx
import numpy as np

from . import openblas
from .scheduling import on_cores

# The scores one worker of `numpy_attention` holds at a time: query rows x keys, 3 MiB of float32, in the
# cache from the product that makes them to the one that reads them, and rows enough for BLAS to run at
# its full rate (tiles from about 1.5 to 5 MiB do equally well; a segment's whole rows, which leave the
# cache, are slower: bench/results' vision-large-image-tiles).
NUMPY_TILE = (512, 1536)
# Scores within +-64 need no shift before their exponentials: each is then a normal float32 (no overflow, no
# precision lost below the normal range), and their sum over any segment stays finite.
SAFE_EXPONENT = 64.0


def numpy_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    scale: float,
    causal: bool = False,
    tile: tuple[int, int] | None = None,
) -> mx.array:
    """Float32 attention of q [segments, heads, Lq, d] over k, v [segments, kv_heads, Lk, d] (kv_heads
    dividing heads: grouped-query attention) with numpy and BLAS, in tasks of one head's block of tile[0]
    queries, each over its keys tile[1] at a time (`tile`: NUMPY_TILE by default). `causal`: the queries
    are the last Lq of the Lk positions (a prompt chunk after the cached context), each seeing the keys up
    to its own.

    Long attention spends its time in the two products and the softmax's exponentials, which numpy
    computes with the CPU's vector units (MLX's CPU backend one value at a time). A tile of scores stays
    in the core's cache from the first product through its exponentials to the second, which adds its
    share to the block's output (flash attention's recurrence; the scores of whole rows would not fit).
    Where a score could leave float32's exponent range (|q.k| <= |q| |k| beyond SAFE_EXPONENT), each row
    is shifted by its largest score so far, and what was summed before rescaled when that grows;
    otherwise nothing is shifted (the softmax is the same for any shift of a row). With the system
    OpenBLAS, each of CORES threads takes tasks in turn and runs their products on its own core
    (`openblas.single_threaded`), so no product waits for the library's threads to meet, which costs most
    when other processes share the cores. Otherwise the tasks run one after another with numpy's own
    products. MLX's buffers are read in place; the output is written in the layout the caller wants."""
    mx.eval(q, k, v)
    qn, kn, vn = (openblas.unit_stride_rows(np.asarray(x)) for x in (q, k, v))
    count, heads, length, _ = qn.shape
    group, keys, depth = heads // kn.shape[1], kn.shape[2], vn.shape[-1]
    past = keys - length  # causal: the positions before the first query's
    out = np.empty((count, length, heads, depth), np.float32)
    rows, cols = tile or NUMPY_TILE
    tasks = iter([(c, h, s) for c in range(count) for h in range(heads) for s in range(0, length, rows)])
    product = openblas.sgemm if openblas.loaded else numpy_product
    key_norms = _row_norms(kn).max(axis=-1) * scale  # [segments, kv heads]

    def work(_) -> None:
        scores, weighted = np.empty(rows * cols, np.float32), np.empty((rows, depth), np.float32)
        sums, largest = np.empty((rows, 1), np.float32), np.empty((rows, 1), np.float32)
        for c, h, start in tasks:  # one iterator shared by the workers: each task is taken once
            end, kv = min(start + rows, length), h // group
            n, seen = end - start, past + end if causal else keys  # the keys any query of the block sees
            queries = qn[c, h, start:end]
            shift = _row_norms(queries).max() * key_norms[c, kv] > SAFE_EXPONENT
            for first in range(0, seen, cols):
                last = min(first + cols, seen)
                block = scores[: n * (last - first)].reshape(n, last - first)  # contiguous: no copies
                product(queries, kn[c, kv, first:last], block, scale, transpose_b=True)
                if causal and last - 1 > past + start:  # keys after some query's own position
                    _mask_after_positions(block, past + start - first)
                if shift:
                    _shift_rows(block, largest[:n], (weighted[:n], sums[:n]), first == 0)
                np.exp(block, out=block)
                if first == 0:
                    np.sum(block, axis=-1, keepdims=True, out=sums[:n])
                else:
                    sums[:n] += block.sum(axis=-1, keepdims=True)
                product(block, vn[c, kv, first:last], weighted[:n], beta=0.0 if first == 0 else 1.0)
            np.divide(weighted[:n], sums[:n], out=out[c, start:end, h])

    on_cores(work)
    return mx.array(out).transpose(0, 2, 1, 3)


def _mask_after_positions(block: np.ndarray, offset: int) -> None:
    """Set to -inf the scores of a tile whose key (column j) comes after its query (row i): j - i > offset.
    Columns past the diagonal's band are set whole; the band takes a window of a cached triangle."""
    n, cols = block.shape
    band_start, band_end = max(offset + 1, 0), min(offset + n, cols)  # some rows see these keys
    block[:, max(band_end, band_start) :] = -np.inf
    if band_end > band_start:
        triangle = _after_diagonal(n)[:, band_start - offset : band_end - offset]
        np.copyto(block[:, band_start:band_end], -np.inf, where=triangle)


@cache
def _after_diagonal(size: int) -> np.ndarray:
    """[size, size], True above the diagonal."""
    return np.triu(np.ones((size, size), dtype=bool), 1)


def _shift_rows(block: np.ndarray, largest: np.ndarray, summed: tuple[np.ndarray, ...], first: bool) -> None:
    """Subtract from each row of a tile of scores its row's largest score so far (`largest`, updated),
    rescaling what was summed over the row's earlier tiles (`summed`) when that grows. A row's first tile
    holds a key it sees (key 0), so `largest` is finite from then on."""
    if first:
        np.max(block, axis=-1, keepdims=True, out=largest)
    else:
        grown = np.maximum(largest, block.max(axis=-1, keepdims=True))
        rescale = np.exp(largest - grown)
        for total in summed:
            total *= rescale
        largest[...] = grown
    block -= largest


def _row_norms(x: np.ndarray) -> np.ndarray:
    return np.sqrt(np.einsum("...i,...i->...", x, x))


def numpy_product(a, b, out, alpha: float = 1.0, transpose_b: bool = False, beta: float = 0.0) -> None:
    """`openblas.sgemm` through numpy's matmul, for beta 0 or 1: where the system OpenBLAS is not bound."""
    a, b = a if alpha == 1.0 else a * np.float32(alpha), b.T if transpose_b else b
    if beta:
        out += a @ b
    else:
        np.matmul(a, b, out=out)
