"""Model inputs built at the token level (the preprocessing issue builds them from real media): random
pixel rows with the processor's shapes, and prompts laid out as the chat template and processor do."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END = 151655, 151656, 151652, 151653
PATCH_DIM = 3 * 2 * 16 * 16


@dataclass
class Prompt:
    input_ids: np.ndarray  # [1, L]
    image_grid_thw: np.ndarray | None = None
    pixel_values: np.ndarray | None = None
    video_grid_thw: np.ndarray | None = None
    pixel_values_videos: np.ndarray | None = None
    extra: dict = field(default_factory=dict)

    def mlx_inputs(self) -> dict:
        return {
            "pixel_values": self.pixel_values,
            "image_grid_thw": self.image_grid_thw,
            "pixel_values_videos": self.pixel_values_videos,
            "video_grid_thw": self.video_grid_thw,
        }

    def torch_inputs(self) -> dict:
        return torch_inputs({"input_ids": self.input_ids, **self.mlx_inputs()})


def torch_inputs(inputs: dict, pads: tuple[int, int] = (IMAGE_PAD, VIDEO_PAD)) -> dict:
    """transformers' arguments for model inputs held as arrays (a Prompt's, or our processor's output),
    including the mm_token_type_ids 5.24 requires with grids (from the image and video pad ids `pads`)."""
    ids = np.asarray(inputs["input_ids"]).astype(np.int64)
    arguments = {"input_ids": torch.tensor(ids)}
    for name in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        if inputs.get(name) is not None:
            arguments[name] = torch.tensor(np.asarray(inputs[name]))
    if inputs.get("image_grid_thw") is not None or inputs.get("video_grid_thw") is not None:
        types = (ids == pads[0]) * 1 + (ids == pads[1]) * 2
        arguments["mm_token_type_ids"] = torch.tensor(types)
    return arguments


def pixel_rows(grids, seed: int) -> np.ndarray:
    """Normalised pixel rows in [-1, 1] for these grids, as the processor emits them."""
    n = int(np.prod(np.asarray(grids), axis=1).sum())
    return np.random.default_rng(seed).uniform(-1, 1, (n, PATCH_DIM)).astype(np.float32)


def image_block(grid) -> list[int]:
    return [VISION_START] + [IMAGE_PAD] * (int(np.prod(grid)) // 4) + [VISION_END]


def video_blocks(tokenizer, grid, seconds) -> list[int]:
    """Per temporal group: `<t seconds><|vision_start|><|video_pad|>...<|vision_end|>` (docs/reference.md
    §7)."""
    t, h, w = grid
    ids: list[int] = []
    for g in range(t):
        ids += tokenizer.encode(f"<{seconds[g]:.1f} seconds>") + [VISION_START] + [VIDEO_PAD] * (h * w // 4)
        ids += [VISION_END]
    return ids


def chat(tokenizer, content: list[int], question: str) -> np.ndarray:
    ids = tokenizer.encode("<|im_start|>user\n") + content + tokenizer.encode(question)
    ids += tokenizer.encode("<|im_end|>\n<|im_start|>assistant\n")
    return np.array([ids], dtype=np.int64)


# Grids in patches (t, h, w). The first image is non-square; the video has 3 temporal groups.
IMAGE_A = (1, 6, 10)
IMAGE_B = (1, 8, 4)
VIDEO = (3, 4, 6)


def make_prompts(tokenizer) -> dict[str, Prompt]:
    video_ids = video_blocks(tokenizer, VIDEO, [0.3, 1.3, 2.4])
    images_ab = np.array([IMAGE_A, IMAGE_B])
    return {
        "text": Prompt(chat(tokenizer, [], "Write a haiku about the sea.")),
        "image": Prompt(
            chat(tokenizer, image_block(IMAGE_A), "Describe this image."),
            image_grid_thw=np.array([IMAGE_A]),
            pixel_values=pixel_rows([IMAGE_A], seed=1),
        ),
        "two_images": Prompt(
            chat(tokenizer, image_block(IMAGE_A) + image_block(IMAGE_B), "What differs?"),
            image_grid_thw=images_ab,
            pixel_values=pixel_rows(images_ab, seed=2),
        ),
        "video": Prompt(
            chat(tokenizer, video_ids, "What happens?"),
            video_grid_thw=np.array([VIDEO]),
            pixel_values_videos=pixel_rows([VIDEO], seed=3),
        ),
        "image_and_video": Prompt(
            chat(tokenizer, image_block(IMAGE_B) + video_ids, "Is the picture in the video?"),
            image_grid_thw=np.array([IMAGE_B]),
            pixel_values=pixel_rows([IMAGE_B], seed=4),
            video_grid_thw=np.array([VIDEO]),
            pixel_values_videos=pixel_rows([VIDEO], seed=5),
        ),
    }
