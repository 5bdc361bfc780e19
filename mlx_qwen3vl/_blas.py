"""On Linux, let MLX's CPU backend use the system OpenBLAS instead of the reference BLAS in its wheel.

MLX resolves `cblas_sgemm` and friends at load time; a library loaded earlier with RTLD_GLOBAL wins.
Float32 matmuls are an order of magnitude faster with it (`bench/matmul.py`), with the same results. It
must happen before `mlx.core` is imported, so the package does it on import (set MLX_QWEN3VL_OPENBLAS=0
to opt out). Debian/Ubuntu: `apt-get install libopenblas0-pthread`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

loaded: str | None = None


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
