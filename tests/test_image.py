"""Image preprocessing against transformers' image processor (PIL backend) and qwen-vl-utils' sizing."""

import base64
import http.server
import json
import threading
import warnings

import numpy as np
import pytest
from checkpoints import DATA
from media import png_bytes, png_header
from PIL import Image, ImageOps
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from mlx_qwen3vl.errors import Qwen3VLError
from mlx_qwen3vl.image import PatchSettings, image_patches, load_image, patchify, smart_resize

CONFIG = json.loads((DATA / "preprocessor_config.json").read_text())
SETTINGS = PatchSettings.from_dict(CONFIG)


def reference_processor(**overrides):
    kwargs = {k: v for k, v in CONFIG.items() if k not in ("processor_class", "image_processor_type")}
    return Qwen2VLImageProcessorPil(**{**kwargs, **overrides})


def noise(width, height, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode if mode != "P" else "RGB"]
    array = rng.integers(0, 256, (height, width, channels), dtype=np.uint8).squeeze()
    if mode == "RGBA":
        array[..., 3] = rng.choice([0, 128, 255], (height, width))  # transparent, half, opaque
    image = Image.fromarray(array, "RGB" if mode == "P" else mode)
    return image.quantize(64) if mode == "P" else image


# (name, image, per-call max_pixels). Both sides get the same per-call limit.
IMAGES = [
    ("square", noise(512, 512), None),
    ("landscape 4:3", noise(640, 480), None),
    ("wide 100:1", noise(3200, 32), None),
    ("tall 1:60", noise(40, 2400), None),
    ("smaller than min_pixels", noise(200, 150), None),
    ("larger than max_pixels", noise(1200, 900), 512 * 512),
    ("odd sizes", noise(1001, 333), None),
    ("RGBA with transparency", noise(300, 200, "RGBA"), None),
    ("grayscale", noise(257, 311, "L"), None),
    ("palette", noise(320, 240, "P"), None),
]


@pytest.mark.parametrize("name, image, max_pixels", IMAGES, ids=[i[0] for i in IMAGES])
def test_pixels_and_grid_equal_transformers_pil_backend(name, image, max_pixels):
    overrides = {"size": {**CONFIG["size"], "longest_edge": max_pixels}} if max_pixels else {}
    reference = reference_processor(**overrides)(image, return_tensors="np")
    pixels, grid = image_patches(load_image(image), SETTINGS, max_pixels=max_pixels)
    np.testing.assert_array_equal(grid, reference["image_grid_thw"][0])
    # Same resize (pillow bicubic) and the same float32 arithmetic: identical, bit for bit.
    assert pixels.dtype == np.float32
    np.testing.assert_array_equal(pixels, reference["pixel_values"])


def test_alpha_is_composited_on_white():
    image = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # fully transparent red
    assert np.all(np.asarray(load_image(image)) == 255)


def test_exif_orientation_is_applied(tmp_path):
    image = noise(96, 64)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    loaded = load_image(path)
    assert loaded.size == (64, 96)
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(ImageOps.exif_transpose(Image.open(path))))


# (height, width): the docs/reference.md §5.1 examples, rounding ties, both branches, extremes.
SIZES = [(480, 640), (333, 1001), (150, 200), (3000, 5000), (720, 1280), (48, 48), (80, 16000), (4096, 4096)]


@pytest.mark.parametrize("height, width", SIZES)
def test_smart_resize_equals_transformers_and_qwen_vl_utils(height, width, qwen_vl_utils):
    args = dict(factor=32, min_pixels=65536, max_pixels=16777216)
    assert smart_resize(height, width, **args) == hf_smart_resize(height, width, **args)
    assert smart_resize(height, width, **args) == qwen_vl_utils.smart_resize(height, width, **args)


def test_smart_resize_spec_examples():
    args = dict(factor=32, min_pixels=65536, max_pixels=16777216)
    assert smart_resize(480, 640, **args) == (480, 640)
    assert smart_resize(333, 1001, **args) == (320, 992)
    assert smart_resize(150, 200, **args) == (224, 320)
    assert smart_resize(3000, 5000, **args) == (3008, 4992)


@pytest.fixture
def http_image():
    """A PNG served on the loopback interface."""
    data = png_bytes(noise(64, 48, seed=3))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/cat.png" else 404)
            self.end_headers()
            if self.path == "/cat.png":
                self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_every_source_gives_the_same_pixels(tmp_path, http_image):
    image = noise(64, 48, seed=3)
    expected = np.asarray(image)
    path = tmp_path / "cat.png"
    path.write_bytes(png_bytes(image))
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()
    sources = [
        image,
        expected,
        expected / 255.0,
        png_bytes(image),
        str(path),
        path,
        f"file://{path}",
        data_url,
    ]
    for source in sources + [f"{http_image}/cat.png"]:
        np.testing.assert_array_equal(np.asarray(load_image(source)), expected)


def write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing.png", "no such image file"),
        (lambda d: write(d / "empty.png", b""), "empty image"),
        (lambda d: write(d / "cut.png", png_bytes(noise(64, 64))[:200]), "corrupt or truncated image"),
        (lambda d: write(d / "notes.txt", b"hello"), "not an image in a supported format"),
        (lambda d: "data:image/png;base64,@@@", "invalid base64"),
        (
            lambda d: "data:image/png;base64," + base64.b64encode(b"plain text").decode(),
            "data: URL: not an image in a supported format",
        ),
        (
            lambda d: write(d / "bomb.png", png_header(30000, 30000)),
            r"bomb.png: too large to decode safely \(900,000,000 pixels, over the limit of 178,956,970\)",
        ),
        (lambda d: 3.14, "unsupported image input of type float"),
        (lambda d: np.zeros((4, 4, 2), np.uint8), "HxW, HxWx3 or HxWx4"),
    ],
)
def test_bad_image_sources_get_a_clear_error(tmp_path, make, message):
    with pytest.raises(Qwen3VLError, match=message):
        load_image(make(tmp_path))


def test_a_large_photo_brings_no_library_warning(tmp_path):
    """Pillow warns about images over 89 MP; they are expected here (resized to the pixel budget), so
    its warning never reaches the user, only this package's own error for what is wrong with the file."""
    path = write(tmp_path / "large.png", png_header(10000, 9000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(Qwen3VLError, match="large.png: corrupt or truncated image"):
            load_image(path)


def test_unreachable_url_gets_a_clear_error(http_image):
    with pytest.raises(Qwen3VLError, match="could not download the image"):
        load_image(f"{http_image}/missing.png")


@pytest.mark.parametrize(
    "size, options, message",
    [
        ((10, 10), {}, "smaller than one 16-pixel patch"),
        ((4020, 16), {}, "aspect ratio over 200"),
        ((64, 64), {"min_pixels": 0}, r"min_pixels=0 is out of range: must be a whole number >= 1"),
        ((64, 64), {"max_pixels": float("nan")}, r"max_pixels=nan is out of range"),
    ],
)
def test_images_that_cannot_be_used_are_refused(size, options, message):
    with pytest.raises(Qwen3VLError, match=message):
        image_patches(noise(*size), SETTINGS, **options)


def test_video_rows_follow_the_spec_order():
    """Several frames (an odd count: the last is repeated) against a patch-by-patch reading of
    docs/reference.md §3.1: temporal group, merge-block row, merge-block column, in-block row, in-block
    column; inside a row channel, time, y, x; values float32(x * (1 / 255) in float64), then (v - mean) / std
    in float32."""
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (3, 64, 96, 3), dtype=np.uint8)
    rows, grid = patchify(frames, SETTINGS)
    p, m, tps = SETTINGS.patch_size, SETTINGS.merge_size, SETTINGS.temporal_patch_size
    padded = np.concatenate([frames, frames[-1:]])
    scaled = (padded.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean, std = np.float32(SETTINGS.image_mean), np.float32(SETTINGS.image_std)
    values = (scaled - mean) / std
    expected = []
    for t in range(2):
        for block_row in range(64 // p // m):
            for block_col in range(96 // p // m):
                for i in range(m):
                    for j in range(m):
                        y, x = (block_row * m + i) * p, (block_col * m + j) * p
                        patch = values[t * tps : (t + 1) * tps, y : y + p, x : x + p]  # [time, y, x, C]
                        expected.append(patch.transpose(3, 0, 1, 2).reshape(-1))
    assert grid == (2, 64 // p, 96 // p)
    np.testing.assert_array_equal(rows, np.stack(expected))


def test_normalisation_of_every_byte_value_equals_the_reference_arithmetic():
    """The reference scales in float64 and rounds to float32, then normalises in float32; we divide in
    float32: the same number for each of the 256 byte values, in every channel."""
    patch = np.arange(256, dtype=np.uint8).reshape(16, 16)
    frame = np.repeat(np.tile(patch, (2, 2))[:, :, None], 3, axis=2)  # one 2x2 merge block of patches
    rows, _ = patchify(frame[None], SETTINGS)
    scaled = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    expected = (scaled[:, None] - np.float32(SETTINGS.image_mean)) / np.float32(SETTINGS.image_std)
    # Row 0 is the top-left 16x16 patch: all 256 values once per channel (and twice in time).
    values = rows[0].reshape(3, 2, 256)
    for c in range(3):
        np.testing.assert_array_equal(values[c, 0], expected[:, c])
        np.testing.assert_array_equal(values[c, 1], expected[:, c])


@pytest.mark.parametrize("size, max_pixels", [((1024, 768), 50176), ((64, 64), 10), ((300, 200), 20000)])
def test_max_pixels_below_min_pixels_scales_to_fit_as_transformers_does(size, max_pixels):
    """transformers takes a max_pixels below min_pixels (qwen-vl-utils asserts): the image is scaled to fit
    max_pixels. A 1024x768 image with max_pixels=50176 gives the grid [1, 12, 16]."""
    image = noise(*size)
    ours, grid = image_patches(image, SETTINGS, max_pixels=max_pixels)
    reference = reference_processor(max_pixels=max_pixels)(image, return_tensors="np")
    assert list(grid) == reference["image_grid_thw"][0].tolist()
    np.testing.assert_array_equal(ours, reference["pixel_values"])
    if size == (1024, 768):
        assert list(grid) == [1, 12, 16]


def test_16_bit_images_keep_their_range(tmp_path):
    """A full-range 16-bit grayscale PNG maps to 8 bits over its range (Pillow's conversion, and
    transformers with it, saturates 99.6% of it at 255: a documented deviation); so do uint16 arrays."""
    values = (np.arange(256 * 64).reshape(64, 256) * 4).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    for source in (tmp_path / "deep.png", values):
        pixels = np.asarray(load_image(source))
        assert (pixels == 255).mean() < 0.01
        np.testing.assert_array_equal(pixels[..., 0], np.round(values / 257).astype(np.uint8))


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_image_arrays_that_are_not_finite_are_refused(value):
    array = np.zeros((32, 32, 3), np.float32)
    array[3, 4, 1] = value
    with pytest.raises(Qwen3VLError, match="image array has NaN or infinite values"):
        load_image(array)
