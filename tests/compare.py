"""How outputs are compared with the reference."""

import numpy as np


def relative_max_diff(ours, reference) -> float:
    """max |ours - reference| relative to the reference tensor's scale (its max magnitude)."""
    ours, reference = np.asarray(ours, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())
