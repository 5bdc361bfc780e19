"""The calibration set the quantization check and the auto recipe run: a few short text prompts, three
images of the kinds users send (a photo, a document page, a chart) and one short video made from frames.

The images and frames are drawn here with numpy and PIL from fixed seeds, so the set is the same on every
machine, ships no file and carries no licence. They are small (about 250 tokens in all): the check
compares two models position by position, and what it needs is every part of the model exercised (the
vision tower on photos, text and graphics; the video path with its timestamps; the decoder on text),
not a benchmark.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 224  # pixels a side as drawn
MODEL_SIZE = 160  # as the model sees them: 5 x 5 merged patches, 25 tokens per image
FRAME_SIZE = 128  # the video's frames: 4 x 4 tokens per temporal group
FRAMES = 4

TEXT_PROMPTS = (
    "Explain in two sentences why the sky is blue.",
    "Write a Python function that returns the n-th Fibonacci number.",
)


def photo(seed: int = 0) -> Image.Image:
    """Photo-like: a sky gradient over a textured ground, a sun, a few soft shapes, sensor noise."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, IMAGE_SIZE)[:, None, None]
    sky = (1 - y) * np.array([90, 150, 235]) + y * np.array([200, 220, 250])
    ground = np.array([70, 120, 50]) + 40 * rng.standard_normal((IMAGE_SIZE, IMAGE_SIZE, 1))
    horizon = (np.arange(IMAGE_SIZE) > IMAGE_SIZE * 0.6)[:, None, None]
    pixels = np.where(horizon, ground, sky) + 6 * rng.standard_normal((IMAGE_SIZE, IMAGE_SIZE, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.ellipse((150, 25, 190, 65), fill=(255, 230, 120))
    draw.polygon([(20, 140), (70, 70), (120, 140)], fill=(110, 100, 95))
    draw.rectangle((140, 120, 200, 160), fill=(170, 60, 50))
    return image


def document() -> Image.Image:
    """A document page: a title, paragraphs of text and a ruled table, black on white."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (250, 250, 245))
    draw = ImageDraw.Draw(image)
    draw.text((12, 8), "QUARTERLY REPORT 2026", fill=(0, 0, 0))
    lines = [
        "Revenue grew in every region, led by",
        "the north (+12%) and the east (+9%).",
        "Costs stayed flat; margins improved.",
        "Outlook: steady demand, new products",
        "in the second half of the year.",
    ]
    for i, line in enumerate(lines):
        draw.text((12, 30 + 13 * i), line, fill=(20, 20, 20))
    for row in range(5):
        draw.line((12, 110 + 20 * row, 212, 110 + 20 * row), fill=(0, 0, 0))
    for col, x in enumerate((12, 80, 146, 212)):
        draw.line((x, 110, x, 190), fill=(0, 0, 0))
        if col < 3:
            for row, text in enumerate(("Region", "North", "East", "West")):
                draw.text((x + 4, 114 + 20 * row), text if col == 0 else f"{(row + 3) * (col + 2)}", fill=0)
    return image


def chart() -> Image.Image:
    """A bar chart with axes, ticks, coloured bars and labels."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.line((30, 20, 30, 190), fill=(0, 0, 0), width=2)
    draw.line((30, 190, 210, 190), fill=(0, 0, 0), width=2)
    colours = [(66, 133, 244), (219, 68, 55), (244, 180, 0), (15, 157, 88), (171, 71, 188)]
    for i, (height, colour) in enumerate(zip((120, 80, 150, 60, 100), colours, strict=True)):
        x = 40 + 34 * i
        draw.rectangle((x, 190 - height, x + 24, 189), fill=colour)
        draw.text((x + 4, 194), "ABCDE"[i], fill=(0, 0, 0))
    for tick in range(0, 170, 40):
        draw.line((26, 190 - tick, 30, 190 - tick), fill=(0, 0, 0))
        draw.text((4, 184 - tick), str(tick), fill=(0, 0, 0))
    draw.text((70, 4), "Sales by product", fill=(0, 0, 0))
    return image


def frames() -> list[np.ndarray]:
    """A short clip: a ball crossing a textured background, FRAMES frames."""
    rng = np.random.default_rng(1)
    background = (120 + 30 * rng.standard_normal((FRAME_SIZE, FRAME_SIZE, 3))).clip(0, 255)
    yy, xx = np.mgrid[:FRAME_SIZE, :FRAME_SIZE]
    clip = []
    for t in range(FRAMES):
        cx, cy = 20 + 28 * t, 40 + 12 * t
        ball = ((xx - cx) ** 2 + (yy - cy) ** 2 < 15**2)[..., None]
        clip.append(np.where(ball, np.array([230, 40, 40]), background).astype(np.uint8))
    return clip


def calibration_inputs(processor) -> list[dict]:
    """The calibration prompts as model inputs (`processor(...)`'s dicts: input_ids and pixel inputs)."""
    inputs = [processor(text) for text in TEXT_PROMPTS]
    images = (
        (photo(), "Describe this photo."),
        (document(), "What does this page say?"),
        (chart(), "Which product sold most?"),
    )
    size = {"min_pixels": MODEL_SIZE * MODEL_SIZE, "max_pixels": MODEL_SIZE * MODEL_SIZE}
    for image, question in images:
        inputs.append(processor(question, images=[image], **size))
    frame_size = {"min_pixels": FRAME_SIZE * FRAME_SIZE, "max_pixels": FRAME_SIZE * FRAME_SIZE}
    inputs.append(processor("What happens in this video?", videos=[frames()], **frame_size))
    return inputs
