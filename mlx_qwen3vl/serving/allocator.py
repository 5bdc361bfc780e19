"""The C allocator's setting that a long-running server needs on Linux.

glibc's malloc serves a large block with mmap and unmaps it when freed, but after the first such free it
raises that threshold to the freed block's size (up to 32 MB): from then on the buffers of decoded images
and their pixel rows come from the heap, where freed space lies between live small objects and is not
given back. The process then grows with every large request it serves, refused or answered. Setting the
threshold once turns that adjustment off, so large buffers stay on mmap and go back to the system when
freed. macOS's allocator returns large blocks by itself: nothing is set there.
"""

from __future__ import annotations

import ctypes
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
LARGE_BLOCK = 1 << 20  # bytes: blocks this large or larger are mapped, and unmapped when freed


def return_large_blocks() -> bool:
    """Keep large blocks on mmap (glibc only); whether the setting was made."""
    if not sys.platform.startswith("linux"):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # glibc's; musl has none
    return mallopt is not None and bool(mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK))
