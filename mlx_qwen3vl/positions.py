"""3-D (temporal, height, width) position ids for the language model's MRoPE (docs/reference.md §4.4).

Plain numpy functions of token ids and grids, so they can be compared one to one with transformers'
`get_rope_index`; used by the model for prefill and by the chat session for follow-up turns.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import Qwen3VLError


def vision_groups(image_grid_thw, video_grid_thw) -> dict[str, list[tuple[int, int]]]:
    """The (merged) h x w token block of every image and of every temporal group of every video, in order.
    Sizes are in patches on input (grid_thw rows), in merged tokens on output."""
    groups: dict[str, list[tuple[int, int]]] = {"image": [], "video": []}
    for kind, grids in (("image", image_grid_thw), ("video", video_grid_thw)):
        if grids is None:
            continue
        for t, h, w in np.asarray(grids, dtype=np.int64).reshape(-1, 3):
            groups[kind].extend([(int(h), int(w))] * int(t))
    return groups


def rope_index(
    input_ids: Sequence[int] | np.ndarray,
    image_grid_thw=None,
    video_grid_thw=None,
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int = 2,
) -> tuple[np.ndarray, int]:
    """Positions `[3, L]` of one sequence and its rope delta (`max position + 1 - L`).

    Text advances every axis by one per token. Each image, and each temporal group of a video, is a
    block of `h x w` merged tokens placed at `t = p`, `h = p + row`, `w = p + col`, after which
    `p += max(h, w)`. A run of vision tokens is split into blocks by the grid sizes, in order."""
    ids = np.asarray(input_ids).reshape(-1)
    merge = spatial_merge_size
    blocks = {
        kind: iter([(h // merge, w // merge) for h, w in sizes])
        for kind, sizes in vision_groups(image_grid_thw, video_grid_thw).items()
    }
    token_kind = {image_token_id: "image", video_token_id: "video"}
    positions = np.empty((3, len(ids)), dtype=np.int64)
    p, i = 0, 0
    is_vision = (ids == image_token_id) | (ids == video_token_id)
    while i < len(ids):
        if not is_vision[i]:
            # A text run: up to the next vision token.
            nxt = np.flatnonzero(is_vision[i:])
            end = i + int(nxt[0]) if len(nxt) else len(ids)
            positions[:, i:end] = p + np.arange(end - i)
            p += end - i
            i = end
            continue
        kind = token_kind[int(ids[i])]
        try:
            h, w = next(blocks[kind])
        except StopIteration:
            raise Qwen3VLError(
                f"more {kind} tokens in the prompt than the {kind} grids account for"
            ) from None
        end = i + h * w
        if end > len(ids) or not np.all(ids[i:end] == ids[i]):
            raise Qwen3VLError(f"a run of {kind} tokens is shorter than its grid ({h} x {w} tokens)")
        rows, cols = np.divmod(np.arange(h * w), w)
        positions[0, i:end] = p
        positions[1, i:end] = p + rows
        positions[2, i:end] = p + cols
        p += max(h, w)
        i = end
    for kind, remaining in blocks.items():
        if next(remaining, None) is not None:
            raise Qwen3VLError(f"the {kind} grids describe more {kind} tokens than the prompt has")
    delta = int(positions.max()) + 1 - len(ids) if len(ids) else 0
    return positions, delta


def batch_rope_index(input_ids: np.ndarray, image_grid_thw=None, video_grid_thw=None, **kwargs):
    """`rope_index` for a batch `[B, L]` of unpadded rows: positions `[3, B, L]`, deltas `[B]`.
    Grids are consumed row by row, in order, like transformers does."""
    ids = np.asarray(input_ids)
    image_groups = _split_grids_by_row(ids, image_grid_thw, kwargs["image_token_id"], kwargs)
    video_groups = _split_grids_by_row(ids, video_grid_thw, kwargs["video_token_id"], kwargs)
    results = [rope_index(row, image_groups[b], video_groups[b], **kwargs) for b, row in enumerate(ids)]
    positions = np.stack([r[0] for r in results], axis=1)
    return positions, np.array([r[1] for r in results], dtype=np.int64)


def _split_grids_by_row(ids: np.ndarray, grids, token_id: int, kwargs) -> list:
    """Assign the grid rows to batch rows by counting each row's placeholder tokens."""
    if grids is None or len(ids) == 1:
        return [grids] * len(ids)
    grids = np.asarray(grids, dtype=np.int64).reshape(-1, 3)
    merge2 = kwargs.get("spatial_merge_size", 2) ** 2
    tokens_per_grid = grids.prod(axis=1) // merge2
    out, g = [], 0
    for row in ids:
        need, start = int((row == token_id).sum()), g
        while need > 0 and g < len(grids):
            need -= int(tokens_per_grid[g])
            g += 1
        out.append(grids[start:g])
    return out
