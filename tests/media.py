"""Test media: pictures, PNG bytes and video files made here, and qwen-vl-utils (the reference for image
sizing and video frame sampling) imported with a stand-in for torchvision."""

from __future__ import annotations

import importlib
import importlib.util
import io
import struct
import sys
import types
import zlib
from collections.abc import Callable
from functools import cache
from pathlib import Path

import cv2
import numpy as np
from PIL import Image


def picture(width: int, height: int, seed: int) -> Image.Image:
    """An RGB image of random pixels (noise: every resampling step changes every pixel)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares its size and has no pixel data: what Pillow's size checks see first."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def shade(size: tuple[int, int]) -> Callable[[int], np.ndarray]:
    """Frames of one grey level each, a different one per frame."""
    width, height = size
    return lambda i: np.full((height, width, 3), (i * 7) % 256, np.uint8)


def write_video(
    path: Path | str,
    frames: int,
    fps: float = 8.0,
    size: tuple[int, int] = (96, 64),
    fourcc: str = "MJPG",
    frame: Callable[[int], np.ndarray] | None = None,
) -> str:
    """A video file of `frames` frames of `size` (width, height): frame i is `frame(i)`, an RGB array
    (default: grey levels, `shade`). MJPG in .avi is written by every OpenCV build."""
    frame = frame or shade(size)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, size)
    assert writer.isOpened(), f"OpenCV cannot write {fourcc} to {path}"
    for i in range(frames):
        writer.write(cv2.cvtColor(frame(i), cv2.COLOR_RGB2BGR))
    writer.release()
    return str(path)


@cache
def qwen_vl_utils() -> types.ModuleType:
    """qwen-vl-utils' vision_process. It imports torchvision (and requests) at import time, and no
    torchvision build matches the pinned CPU torch: where absent, empty stand-ins with the names it
    imports are present only while it is imported, so that nothing else (transformers' availability
    checks) ever sees them. The functions compared with need only math; its module keeps its references
    to the stand-ins (a test replaces `transforms.functional.resize` where it needs one)."""
    stubs = {}
    if importlib.util.find_spec("torchvision") is None:
        torchvision = types.ModuleType("torchvision")
        io_module = types.ModuleType("torchvision.io")
        transforms = types.ModuleType("torchvision.transforms")
        transforms.InterpolationMode = types.SimpleNamespace(BICUBIC="bicubic")
        transforms.functional = types.SimpleNamespace(resize=None)
        torchvision.io, torchvision.transforms, torchvision.__version__ = io_module, transforms, "0.0"
        stubs = {
            "torchvision": torchvision,
            "torchvision.io": io_module,
            "torchvision.transforms": transforms,
        }
    if importlib.util.find_spec("requests") is None:
        stubs["requests"] = types.ModuleType("requests")
    sys.modules.update(stubs)
    try:
        return importlib.import_module("qwen_vl_utils.vision_process")
    finally:
        for name in stubs:
            sys.modules.pop(name, None)
