"""Markers in streamed text (stop strings, `<tool_call>`, `</think>`): a stream shows text only once it
can no longer be the start of one, so that a marker split over several tokens never leaks out."""

from __future__ import annotations


def first_marker(text: str, markers) -> int | None:
    """Where the first of `markers` begins in `text`, or None. A stream passes the text it has not shown:
    a marker cannot begin in shown text (`held_back` kept its start back), so each token's search covers
    only the unshown tail, not the whole answer again."""
    positions = [p for p in (text.find(m) for m in markers if m) if p >= 0]
    return min(positions) if positions else None


def held_back(text: str, markers) -> int:
    """How many trailing characters of `text` could be the start of one of `markers` (not shown yet).
    Only the last len(marker) - 1 characters can be, so only they are looked at, and only where the
    marker's first character stands: the work per call is bounded by the markers' lengths, whatever the
    length of `text` (a stream calls this once per token with all its text so far)."""
    longest = 0
    for marker in markers:
        if len(marker) < 2:
            continue
        tail = text[-(len(marker) - 1) :]
        start = tail.find(marker[0])
        while start >= 0:  # leftmost first: the first match is the longest
            if marker.startswith(tail[start:]):
                longest = max(longest, len(tail) - start)
                break
            start = tail.find(marker[0], start + 1)
    return longest
