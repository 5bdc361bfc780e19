"""How outputs are compared with the reference."""

import mlx.core as mx
import numpy as np


def relative_max_diff(ours, reference) -> float:
    """max |ours - reference| relative to the reference tensor's scale (its max magnitude)."""
    ours, reference = np.asarray(ours, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def teacher_forced(model, prompt, tokens: list[int]) -> np.ndarray:
    """Our logits (float32) before each of `tokens`, fed one per decode step after the prompt: decode
    steps compared with the reference's on the same tokens, whatever each side would have sampled."""
    cache = model.make_cache()
    logits = model(prompt.input_ids, **prompt.mlx_inputs(), cache=cache)[:, -1]
    steps = []
    for token in tokens:
        steps.append(np.array(logits[0].astype(mx.float32)))
        logits = model(mx.array([[token]]), cache=cache)[:, -1]
    return np.stack(steps)
