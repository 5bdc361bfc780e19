"""The synthetic inputs every system gets, written once per run into a folder the workers read:

- `image448.png`, `image1024x768.png`, `image2048x1536.png`: uniform-noise RGB images (PNG, so every
  reader gets the same pixels; the workers decode them before timing starts); the last, a large photo
  of 12,288 patches, only when asked for (`--media`): its attention is quadratic;
- `video16.mp4`: 16 noise frames at 2 fps (every system samples all 16);
- `prompt.npy`: the token ids of the text prompt (exactly `prompt_tokens` ids of English text);
- `vision.npz`: pixel rows and grids of both images and the video, from this package's processor, so
  the vision towers of all systems encode the identical array.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# name -> (width, height)
IMAGES = {"image448": (448, 448), "image1024x768": (1024, 768), "image2048x1536": (2048, 1536)}
VIDEO_FRAMES = 16
VIDEO_FPS = 2.0
# 448x320 frames: sides are multiples of 32 (no resize) and 143,360 pixels is above the per-frame
# minimum of qwen-vl-utils (128 * 32 * 32), so every processor keeps the size: 28x20 patches per frame.
VIDEO_SIZE = (448, 320)

IMAGE_QUESTION = "Describe this image."
VIDEO_QUESTION = "Describe this video."
FOLLOW_UP = "What colours does it have?"

_TEXT = (
    "The history of astronomy is the story of how people came to understand the sky. Early observers "
    "tracked the motions of the sun, the moon and the planets, and used them to keep calendars, to "
    "navigate at sea and to predict the seasons. Later, telescopes revealed moons around other planets, "
    "spots on the sun and countless faint stars, and the study of light showed what distant objects are "
    "made of and how fast they move. "
)


def noise_image(width: int, height: int, seed: int):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def write_video(path: Path, seed: int = 7) -> None:
    import cv2

    width, height = VIDEO_SIZE
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), VIDEO_FPS, (width, height))
    if not writer.isOpened():
        raise SystemExit("OpenCV cannot write mp4v video here")
    rng = np.random.default_rng(seed)
    for _ in range(VIDEO_FRAMES):
        writer.write(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    writer.release()


def prompt_ids(tokenizer, n: int) -> np.ndarray:
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer.encode(_TEXT, add_special_tokens=False)
    return np.array(ids[:n], dtype=np.int32)


def prepare(folder: Path, checkpoint: Path, prompt_tokens: int) -> Path:
    """Write the inputs (once per folder); returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / "inputs.json"
    wanted = {"checkpoint": str(checkpoint), "prompt_tokens": prompt_tokens, "images": list(IMAGES)}
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return folder
    from mlx_qwen3vl.loading import read_config
    from mlx_qwen3vl.processor import Processor
    from mlx_qwen3vl.video import VideoOptions

    processor = Processor.from_pretrained(checkpoint, read_config(checkpoint))
    arrays = {}
    for seed, (name, (width, height)) in enumerate(IMAGES.items(), start=1):
        image = noise_image(width, height, seed)
        image.save(folder / f"{name}.png")
        encoded = processor.read_image(image)
        arrays[f"{name}_pixels"], arrays[f"{name}_grid"] = encoded.pixel_values, np.array([encoded.grid_thw])
    write_video(folder / "video16.mp4")
    video = processor.read_video(str(folder / "video16.mp4"), VideoOptions(nframes=VIDEO_FRAMES))
    arrays["video16_pixels"], arrays["video16_grid"] = video.pixel_values, np.array([video.grid_thw])
    np.savez(folder / "vision.npz", **arrays)
    np.save(folder / "prompt.npy", prompt_ids(processor.tokenizer, prompt_tokens))
    marker.write_text(json.dumps(wanted))
    return folder


class Inputs:
    """What a worker reads: PIL images (decoded), the video path, prompt ids, vision arrays."""

    def __init__(self, folder: Path):
        from PIL import Image

        self.folder = Path(folder)
        self.images = {name: Image.open(self.folder / f"{name}.png").convert("RGB") for name in IMAGES}
        for image in self.images.values():
            image.load()
        self.video = str(self.folder / "video16.mp4")
        self.prompt = np.load(self.folder / "prompt.npy")
        data = np.load(self.folder / "vision.npz")
        self.vision = {name: (data[f"{name}_pixels"], data[f"{name}_grid"]) for name in [*IMAGES, "video16"]}
