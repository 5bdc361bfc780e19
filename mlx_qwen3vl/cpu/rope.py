"""The decoder's rope on the CPU: through tables computed once per forward (`TableRope`)."""

from __future__ import annotations

from functools import partial

import mlx.core as mx
import numpy as np

from ..language import Rope, apply_rope


class TableRope(Rope):
    """The decoder's rope through cos/sin tables for every position, text included. MLX's CPU backend
    builds its fused rope as ~30 graph nodes and their temporaries for every q and k of every layer;
    the tables are computed once per forward and shared by all layers, one compiled kernel per tensor."""

    def at(self, positions, length: int, dtype: mx.Dtype):
        if not isinstance(positions, np.ndarray):  # a text offset: the same start on all three axes
            starts = np.array(positions, dtype=np.int64).reshape(-1, 1)
            positions = np.broadcast_to(starts + np.arange(length), (3, len(starts), length))
        cos, signed_sin = self.tables(mx.array(positions), dtype)
        return partial(apply_rope, cos=cos, signed_sin=signed_sin)
