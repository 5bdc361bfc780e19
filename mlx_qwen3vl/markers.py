"""Markers in streamed text (stop strings, `<tool_call>`, `</think>`): a stream shows text only once it
can no longer be the start of one, so that a marker split over several tokens never leaks out."""

from __future__ import annotations


def first_marker(text: str, markers) -> int | None:
    """Where the first of `markers` begins in `text`, or None."""
    positions = [text.find(m) for m in markers if m and m in text]
    return min(positions) if positions else None


def held_back(text: str, markers) -> int:
    """How many trailing characters of `text` could be the start of one of `markers` (not shown yet)."""
    longest = 0
    for marker in markers:
        for k in range(min(len(marker) - 1, len(text)), 0, -1):
            if text.endswith(marker[:k]):
                longest = max(longest, k)
                break
    return longest
