"""Image input: every common source to RGB, `smart_resize`, bicubic resize, normalisation and the
patch layout the vision tower expects (docs/reference.md §3.1, §5.1). numpy and pillow only.

The pixels match transformers' PIL-backend image processor (`Qwen2VLImageProcessorPil`); its default
torchvision backend differs from it by at most a few uint8 levels of bicubic rounding (docs/reference.md
§5.1).
"""

from __future__ import annotations

import base64
import io
import math
import re
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import Qwen3VLError
from .file_values import ANY_NUMBER, checked_fields
from .options import MEDIA

MAX_ASPECT_RATIO = 200
URL_TIMEOUT_SECONDS = 30


@dataclass
class PatchSettings:
    """preprocessor_config.json: patch geometry, pixel budget and normalisation."""

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 65536
    max_pixels: int = 16777216
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5], metadata=ANY_NUMBER)
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])

    @classmethod
    def from_dict(cls, params: dict, file: str = "preprocessor_config.json") -> PatchSettings:
        """From a preprocessor config's values, each checked (`file` names it in errors)."""
        size = params.get("size") or {}
        if not isinstance(size, dict):
            raise Qwen3VLError(f"{file}: size is {size!r:.40}, must be an object")
        defaults = cls()
        values = {
            "patch_size": params.get("patch_size", defaults.patch_size),
            "temporal_patch_size": params.get("temporal_patch_size", defaults.temporal_patch_size),
            "merge_size": params.get("merge_size", defaults.merge_size),
            "min_pixels": size.get("shortest_edge", params.get("min_pixels", defaults.min_pixels)),
            "max_pixels": size.get("longest_edge", params.get("max_pixels", defaults.max_pixels)),
            "image_mean": params.get("image_mean", defaults.image_mean),
            "image_std": params.get("image_std", defaults.image_std),
        }
        return cls(**checked_fields(cls, values, file))

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this: one merged 2x2 block of patches."""
        return self.patch_size * self.merge_size


# ---- sources -----------------------------------------------------------------------------------------


def _open(data: bytes, name: str) -> Image.Image:
    if not data:
        raise Qwen3VLError(f"{name}: empty image")
    try:
        with warnings.catch_warnings():
            # Pillow warns from 89 MP on; large photos are expected here (they are resized to the pixel
            # budget), and its hard limit (twice that) is reported below as one line.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
    except UnidentifiedImageError:
        raise Qwen3VLError(f"{name}: not an image in a supported format") from None
    except Image.DecompressionBombError as e:
        pixels = re.findall(r"\d+", str(e))
        size = f"{int(pixels[0]):,} pixels, over the limit of {int(pixels[1]):,}" if len(pixels) >= 2 else e
        raise Qwen3VLError(f"{name}: too large to decode safely ({size}); downscale it first") from None
    except (OSError, ValueError) as e:
        raise Qwen3VLError(f"{name}: corrupt or truncated image ({e})") from None
    return image


def _read_source(source) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        return _from_array(source)
    if isinstance(source, (bytes, bytearray)):
        return _open(bytes(source), "image bytes")
    if isinstance(source, (str, Path)):
        text = str(source)
        if text.startswith(("http://", "https://")):
            try:
                with urllib.request.urlopen(text, timeout=URL_TIMEOUT_SECONDS) as response:
                    return _open(response.read(), text)
            except OSError as e:
                raise Qwen3VLError(f"{text}: could not download the image ({e})") from None
        if text.startswith("data:"):
            header, _, payload = text.partition(",")
            if not header.endswith(";base64"):
                raise Qwen3VLError("data: URL images must be base64-encoded (data:image/...;base64,...)")
            return _open(_decoded(payload, "data: URL image"), "data: URL")
        path = Path(text.removeprefix("file://")).expanduser()
        if not path.is_file():
            raise Qwen3VLError(f"{path}: no such image file")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise Qwen3VLError(f"{path}: cannot read the file ({e.strerror})") from None
        return _open(data, str(path))
    raise Qwen3VLError(f"unsupported image input of type {type(source).__name__}")


def _decoded(payload: str, name: str) -> bytes:
    try:
        return base64.b64decode(payload, validate=True)
    except ValueError:
        raise Qwen3VLError(f"{name}: invalid base64") from None


def image_from_base64(payload: str) -> Image.Image:
    """An image given as base64 text (transformers' "base64" content key): the encoded file itself."""
    return _open(_decoded(payload.strip(), "base64 image"), "base64 image")


def _from_array(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise Qwen3VLError(f"image array must be HxW, HxWx3 or HxWx4, got shape {array.shape}")
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise Qwen3VLError("image array has NaN or infinite values")
        if np.issubdtype(array.dtype, np.floating) and array.size and 0 <= array.min() and array.max() <= 1:
            array = np.round(array * 255)  # floats in [0, 1]
        elif array.dtype == np.uint16:
            array = np.round(array / 257)  # 16 bits over their range, as `_to_8_bit`
        array = np.clip(array, 0, 255).astype(np.uint8)
    return Image.fromarray(array)


def to_rgb(image: Image.Image) -> Image.Image:
    """EXIF orientation applied; grayscale and palette converted; transparency composited on white
    (docs/reference.md §7)."""
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I") or image.mode == "F":
        image = _to_8_bit(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "RGBa"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _to_8_bit(image: Image.Image) -> Image.Image:
    """A 16-bit (or 32-bit integer, or float) grayscale image as 8 bits over its depth's range: Pillow's
    conversion clips at 255, which turns almost every pixel of a 16-bit image white (transformers does
    the same: a documented deviation, README). Integers that fit 16 bits map 0..65535 to 0..255, floats
    in [0, 1] map to 0..255, other values by their own minimum and maximum."""
    values = np.asarray(image, dtype=np.float64)
    if not np.isfinite(values).all():
        raise Qwen3VLError("image has NaN or infinite values")
    low, high = (values.min(), values.max()) if values.size else (0.0, 0.0)
    if image.mode != "F" and low >= 0 and high <= 65535:
        scaled = values / 257
    elif image.mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255
    else:
        scaled = (values - low) / ((high - low) or 1) * 255
    return Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8), "L")


def load_image(source) -> Image.Image:
    """An RGB PIL image from a path, http(s) URL, data: URL, bytes, PIL image or numpy array."""
    return to_rgb(_read_source(source))


# ---- sizing and pixels ---------------------------------------------------------------------------------


def smart_resize(
    height: int,
    width: int,
    factor: int,
    min_pixels: float,
    max_pixels: float,
    *,
    at_least_one_block: bool = False,
    what: str = "image",
) -> tuple[int, int]:
    """transformers' image smart_resize (docs/reference.md §5.1): sides rounded to multiples of `factor`
    (Python round, half to even), then scaled into [min_pixels, max_pixels] keeping the aspect ratio.
    `at_least_one_block` is qwen-vl-utils' variant (its video path): rounded sides start at no less than
    `factor`, which can change the branch taken for sides under factor / 2."""
    if min(height, width) <= 0:
        raise Qwen3VLError(f"{what} of size {width}x{height} has no pixels")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise Qwen3VLError(
            f"{what} of size {width}x{height}: aspect ratio over {MAX_ASPECT_RATIO} is not supported"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if at_least_one_block:
        h_bar, w_bar = max(factor, h_bar), max(factor, w_bar)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        # (qwen-vl-utils can floor a side to 0 here, and then fails to resize: keep one block.)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resize_rgb(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic resize of an HxWx3 uint8 image with pillow (antialiased when shrinking), as transformers'
    PIL backend does."""
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), resample=Image.Resampling.BICUBIC))


def patchify(frames: np.ndarray, settings: PatchSettings) -> tuple[np.ndarray, tuple[int, int, int]]:
    """uint8 frames [T, H, W, 3] -> normalised float32 pixel rows [patches, 3 * t * p * p] and the grid
    (t, h, w).

    Consecutive frame pairs form one temporal patch (an odd count repeats the last frame); rows run over
    temporal group, merge-block row, merge-block column, in-block row, in-block column; each row is
    ordered (channel, time, y, x) like the Conv3d kernel (docs/reference.md §3.1). The patches are gathered
    while the pixels are still bytes, then normalised in place: a quarter of the memory traffic of normalising
    first."""
    tps, p, m = settings.temporal_patch_size, settings.patch_size, settings.merge_size
    if len(frames) % tps:
        frames = np.concatenate([frames, np.repeat(frames[-1:], tps - len(frames) % tps, axis=0)])
    T, H, W, C = frames.shape
    g_t, g_h, g_w = T // tps, H // p, W // p
    x = frames.reshape(g_t, tps, g_h // m, m, p, g_w // m, m, p, C)
    # -> (g_t, block row, block col, in-row, in-col, C, time, y, x)
    x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    rows = x.reshape(g_t * g_h * g_w, C, tps * p * p).astype(np.float32)
    normalize_in_place(rows, settings)
    return rows.reshape(len(rows), C * tps * p * p), (g_t, g_h, g_w)


def normalize_in_place(rows: np.ndarray, settings: PatchSettings) -> None:
    """float32 pixel values 0..255 [..., C, k] -> (x / 255 - mean) / std per channel, bit-identical to the
    reference's float32(x * (1 / 255) in float64), then float32 arithmetic: a float32 division by 255 is
    the same number for every one of the 256 byte values (tests/test_image.py checks all of them)."""
    mean = np.array(settings.image_mean, dtype=np.float32)[:, None]
    std = np.array(settings.image_std, dtype=np.float32)[:, None]
    np.divide(rows, np.float32(255), out=rows)
    np.subtract(rows, mean, out=rows)
    np.divide(rows, std, out=rows)


def image_patches(
    image: Image.Image,
    settings: PatchSettings,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One RGB image -> pixel rows and grid (1, h, w); per-call pixel limits override the model's."""
    # A max_pixels below min_pixels is taken as transformers takes it: the image scaled to fit max_pixels.
    min_pixels = settings.min_pixels if min_pixels is None else MEDIA["min_pixels"].check(min_pixels)
    max_pixels = settings.max_pixels if max_pixels is None else MEDIA["max_pixels"].check(max_pixels)
    width, height = image.size
    if min(width, height) < settings.patch_size:
        raise Qwen3VLError(
            f"image of size {width}x{height} is smaller than one {settings.patch_size}-pixel patch"
        )
    h, w = smart_resize(height, width, settings.factor, min_pixels, max_pixels)
    pixels = resize_rgb(np.asarray(image), h, w)
    # A still image is one temporal patch: the frame repeated (docs/reference.md §3.1).
    return patchify(pixels[None], settings)
