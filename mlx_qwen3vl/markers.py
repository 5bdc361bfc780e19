"""Markers in streamed text (stop strings, `<tool_call>`, `</think>`): a stream shows text only once it
can no longer be the start of one, so that a marker split over several tokens never leaks out."""

from __future__ import annotations


def first_marker(text: str, markers, start: int = 0) -> int | None:
    """Where the first of `markers` begins in `text` at or after `start`, or None. A stream passes the
    length it has shown: a marker cannot begin in shown text (`held_back` kept its start back), so each
    token's search covers only the unshown tail, not the whole answer again."""
    positions = [p for p in (text.find(m, start) for m in markers if m) if p >= 0]
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
