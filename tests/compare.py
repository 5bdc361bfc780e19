"""How outputs are compared with the reference, and the bounds that several test files share.

Each bound is the float noise of the computation compared, measured on the test models over checkpoint and
input seeds (3 of each unless said) on both BLAS paths (MLX's own, and the system OpenBLAS that
`mlx_qwen3vl.cpu.openblas` loads where it is installed), with at least 5x room for other processors' kernels
and summation orders; and each stays far below what a real mistake moves (a wrong rope section, a missed
DeepStack add, a norm's affine part, a logit taken after the temperature: 1e-2 of the scale or more).
"""

import mlx.core as mx
import numpy as np

# float32 on both sides, relative to the reference tensor's scale (`relative_max_diff`): what remains is
# the order of the sums in products, attention and norms. Measured at most 2.4e-6 for the tiny models'
# logits (dense and MoE, 5 prompts, both backends) and vision features, 3.2e-6 at the real widths (one
# seed, the system OpenBLAS); the same bound serves two of our own float32 computations of one result in
# different orders (a prompt in pieces or whole, fused or separate projections, scales widened or not:
# at most 1.2e-6).
FLOAT32 = 1e-4

# Log-probabilities in float32, absolute: a log-softmax moves by at most twice its logits' largest error,
# and the tiny model's logits reach 18 in magnitude, so float32 noise of FLOAT32's kind allows 2 * 2.4e-6
# * 18 = 9e-5. Measured at most 1.4e-5 against transformers (teacher-forced, 8 steps) and 1.2e-5 between
# our cached decode and one pass over the same tokens. Taken after the temperature or a penalty, or in
# bfloat16, a log-probability is off by 1e-2 or more.
LOGPROB = 5e-4

# bfloat16 logits against transformers' bfloat16, relative to the logit scale (max) and their mean
# difference relative to the same scale. Measured on the tiny checkpoint over the five prompts: ours
# against transformers' bf16 (SDPA, its default) max 1.0e-2 to 1.9e-2, mean 1.2e-3 to 1.8e-3;
# transformers' bf16 against its own float32 max 1.2e-2 to 1.6e-2, mean 1.4e-3 to 1.9e-3. The logits are
# bf16 (1 ulp = 0.4-0.8% of the scale here) and random-weight networks amplify single-ulp differences
# layer after layer, so two correct bf16 implementations end up as far apart as bf16 is from float32:
# transformers' own eager and SDPA attention kernels differ from each other by that much too. Hence the
# other bf16 checks of test_model.py (as accurate as the reference's bf16; rounding like it).
BFLOAT16_MAX, BFLOAT16_MEAN = 2.5e-2, 2.5e-3


def relative_max_diff(ours, reference) -> float:
    """max |ours - reference| relative to the reference tensor's scale (its max magnitude)."""
    ours, reference = np.asarray(ours, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def bfloat16_ulp(scale: float) -> float:
    """One unit in the last place of bfloat16 (8 significant bits) at the magnitude `scale`."""
    return float(2.0 ** (np.floor(np.log2(scale)) - 7))


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
