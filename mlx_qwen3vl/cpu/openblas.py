"""On Linux, let MLX's CPU backend use the system OpenBLAS instead of the reference BLAS in its wheel.

MLX resolves `cblas_sgemm` and friends at load time; a library loaded earlier with RTLD_GLOBAL wins.
Float32 matmuls are an order of magnitude faster with it (`bench/matmul.py`), with the same results. It
must happen before `mlx.core` is imported, so the package does it on import (set MLX_QWEN3VL_OPENBLAS=0
to opt out). Debian/Ubuntu: `apt-get install libopenblas0-pthread`.

The same library also serves callers that split work among their own threads (`sgemm` inside
`single_threaded`): each product then runs on its calling thread, as OpenBLAS advises for threaded callers.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

loaded: str | None = None

# cblas_sgemm's enumerations (cblas.h)
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112


def use_system_openblas() -> str | None:
    """Load the system OpenBLAS globally if possible; returns its path, or None."""
    global loaded
    if loaded or not sys.platform.startswith("linux") or os.environ.get("MLX_QWEN3VL_OPENBLAS") == "0":
        return loaded
    available = [path for path in _CANDIDATES if os.path.exists(path)]
    if "mlx.core" in sys.modules:  # too late: MLX has already bound its BLAS
        mx = sys.modules["mlx.core"]
        if available and not _mapped(available) and mx.default_device() == mx.cpu:
            _warn_imported_too_late()
        return None
    for path in available:
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        loaded = path
        break
    return loaded


def _mapped(paths: list[str]) -> bool:
    """Whether one of these libraries is already in the process (LD_PRELOAD, or loaded by the user)."""
    try:
        with open("/proc/self/maps") as maps:
            text = maps.read()
    except OSError:
        return True  # cannot tell: say nothing
    return any(os.path.realpath(path) in text or path in text for path in paths)


def _warn_imported_too_late() -> None:
    # logging rather than warnings: Python's fallback handler prints the one line, without a source line.
    logging.getLogger("mlx_qwen3vl").warning(
        "mlx_qwen3vl: mlx was imported first, so MLX's CPU matmuls use its slow bundled BLAS instead of "
        "the system OpenBLAS (several times slower); import mlx_qwen3vl before mlx "
        "(MLX_QWEN3VL_OPENBLAS=0 silences this)"
    )


@cache
def _library() -> ctypes.CDLL:
    library = ctypes.CDLL(loaded)
    pointer, integer = ctypes.c_void_p, ctypes.c_int
    library.cblas_sgemm.argtypes = [integer] * 6 + [ctypes.c_float, pointer, integer, pointer, integer]
    library.cblas_sgemm.argtypes += [ctypes.c_float, pointer, integer]
    library.cblas_sgemm.restype = None
    library.openblas_set_num_threads.argtypes = [integer]
    return library


def sgemm(a: np.ndarray, b: np.ndarray, out: np.ndarray, alpha=1.0, transpose_b=False, beta=0.0) -> None:
    """out = alpha * a @ b (b.T with transpose_b) + beta * out with the system OpenBLAS (`loaded`), on the
    calling thread's share of the library's threads. float32 2-D arrays whose rows may be strided but
    whose elements within a row are adjacent; ctypes releases the GIL for the call."""
    m, k = a.shape
    n = out.shape[1]
    ld = [max(x.strides[0] // 4, x.shape[1]) for x in (a, b, out)]  # any stride serves a single row
    _library().cblas_sgemm(
        _ROW_MAJOR, _NO_TRANS, _TRANS if transpose_b else _NO_TRANS, m, n, k, alpha,
        a.ctypes.data, ld[0], b.ctypes.data, ld[1], beta, out.ctypes.data, ld[2],
    )  # fmt: skip


def unit_stride_rows(x: np.ndarray) -> np.ndarray:
    """x, copied unless the elements within its rows are adjacent and its rows apart (what `sgemm` needs;
    a broadcast array's rows share their elements)."""
    row = x.shape[-1] * x.itemsize
    return x if x.strides[-1] == x.itemsize and x.strides[-2] >= row else x.copy()


_single_threaded_section = threading.Lock()


@contextmanager
def single_threaded() -> Iterator[None]:
    """Each `sgemm` inside runs on its calling thread alone. The setting is the library's, so MLX's own
    matmuls started meanwhile from another thread are single-threaded too (slower, not different); such
    sections from several threads take turns, so each restores the count it found."""
    library = _library()
    with _single_threaded_section:
        threads = library.openblas_get_num_threads()
        library.openblas_set_num_threads(1)
        try:
            yield
        finally:
            library.openblas_set_num_threads(threads)
