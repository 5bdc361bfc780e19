"""What a long step is doing, for a front end to show: one small record that every layer reports with
(the processor reading a video, the prefix cache's remainder encoding media, generation's prefill)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Progress:
    """`stage`: "reading" (frames of a video file read, of `total` kept), "media" (an image or video was
    read and sized: `detail` says what it became), "vision" (blocks of the vision tower done, of `total`),
    "prefill" (prompt tokens fed, of `total`), "inputs" (inputs embedded or documents scored, of `total`:
    `embed`, `rerank`)."""

    stage: str
    done: int
    total: int
    detail: str = ""


def reading(progress):
    """A `Progress` callback as the processor's `reading(done, total)` (None without one)."""
    return (lambda done, total: progress(Progress("reading", done, total))) if progress else None
