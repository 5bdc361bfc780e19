"""One image or video of a prompt, as the vision tower takes it: the object that the processor makes,
the model encodes, a turn places in its prompt and a prefix cache knows by its digest."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np


@dataclass
class MediaItem:
    """One image or video as the vision tower takes it: its kind ("image" or "video"), pixel rows and
    grid (t, h, w), for a video the time of each temporal group, what the input became (for a front
    end: "image 4032x3024 -> ...") and the input's own size (width, height: what grounding coordinates
    are pixels of). Once its features are in a KV cache, the rows may be dropped
    (`spent`): the grid and the digest still describe the prompt's positions and the cache's keys."""

    kind: str
    pixel_values: np.ndarray | None
    grid_thw: tuple[int, int, int]
    timestamps: list[float] | None = None
    description: str = ""
    source_size: tuple[int, int] | None = None

    @cached_property
    def digest(self) -> str:
        """What identifies the item in a prefix cache: its kind, grid and pixel rows (its source as read
        with its options: the same file at another size is another item, a changed file too)."""
        digest = hashlib.blake2b(digest_size=16)
        digest.update(f"{self.kind} {self.grid_thw} {self.timestamps}".encode())
        digest.update(np.ascontiguousarray(self.pixel_values).data)
        return digest.hexdigest()

    @property
    def groups(self) -> int:
        """Blocks of pad tokens in the prompt: one for an image, one per temporal group of a video."""
        return 1 if self.kind == "image" else self.grid_thw[0]

    def tokens_per_group(self, merge_size: int) -> int:
        return self.grid_thw[1] * self.grid_thw[2] // merge_size**2

    def tokens(self, merge_size: int) -> int:
        """The prompt tokens the item fills."""
        return self.groups * self.tokens_per_group(merge_size)

    def spent(self) -> MediaItem:
        """The item without its pixel rows, its digest kept."""
        item = MediaItem(self.kind, None, self.grid_thw, self.timestamps, self.description, self.source_size)
        item.digest = self.digest
        return item


def stack_media(media: list[MediaItem]) -> dict:
    """Concatenate the pixel rows and grids of all images and of all videos, in prompt order (a single
    one's rows as they are: a long video's are large)."""
    out = {}
    for kind, values, grids in (
        ("image", "pixel_values", "image_grid_thw"),
        ("video", "pixel_values_videos", "video_grid_thw"),
    ):
        items = [m for m in media if m.kind == kind]
        rows = [m.pixel_values for m in items]
        out[values] = (rows[0] if len(rows) == 1 else np.concatenate(rows)) if items else None
        out[grids] = np.array([m.grid_thw for m in items], dtype=np.int64) if items else None
    return out
