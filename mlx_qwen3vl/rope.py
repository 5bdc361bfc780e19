"""Rotary-embedding frequency tables, bit-exact with the reference (docs/reference.md §3.4, §6.4).

transformers builds `inv_freq = 1 / theta ** (arange(0, dim, 2) / dim)` in torch-CPU float32. MLX's and
numpy's float32 `pow` round some entries differently by an ulp, which drifts the angle by ~6e-8 rad per
unit of position (5e-3 rad at position 1e5), so the published tables are stored as constants.
YaRN's table (a context extended past the trained length) is derived from them with the reference's
float32 operations, so it too is the reference's bit for bit.
"""

from __future__ import annotations

import math

import numpy as np

from .config import TextConfig, YarnScaling

# (theta, dim) -> torch-CPU float32 values, copied from docs/reference.md §6.4 (text) and §3.4 (vision; dim =
# d_v / 2).
_TABLES: dict[tuple[float, int], tuple[float, ...]] = {
    (5000000.0, 128): (
        1, 0.785830021, 0.617528737, 0.485272616, 0.381341755, 0.299669802, 0.235489503, 0.185054719,
        0.14542155, 0.11427661, 0.089801982, 0.0705690905, 0.0554553084, 0.0435784459, 0.0342452489,
        0.026910942, 0.0211474262, 0.0166182797, 0.0130591439, 0.0102622667, 0.00806439668, 0.00633724453,
        0.00497999694, 0.00391343096, 0.00307529117, 0.00241665612, 0.0018990807, 0.00149235455,
        0.00117273699, 0.000921571918, 0.000724198821, 0.000569097116, 0.000447213621, 0.000351433875,
        0.000276167266, 0.000217020512, 0.000170541214, 0.000134016402, 0.000105314102, 8.27589829e-05,
        6.50344882e-05, 5.11060534e-05, 4.01606667e-05, 3.15594589e-05, 2.48003671e-05, 1.94888726e-05,
        1.53149413e-05, 1.20349387e-05, 9.45741613e-06, 7.43192049e-06, 5.84022655e-06, 4.58942486e-06,
        3.60650779e-06, 2.83410191e-06, 2.2271222e-06, 1.7501394e-06, 1.37531208e-06, 1.08076142e-06,
        8.49294793e-07, 6.67401252e-07, 5.24463928e-07, 4.12139485e-07, 3.23871546e-07, 2.54507967e-07,
    ),
    (10000.0, 32): (
        1, 0.562341332, 0.316227764, 0.177827939, 0.100000001, 0.0562341288, 0.0316227786, 0.0177827943,
        0.00999999978, 0.00562341325, 0.00316227786, 0.00177827943, 0.00100000005, 0.000562341302,
        0.000316227786, 0.00017782794,
    ),
    (10000.0, 36): (
        1, 0.599484205, 0.359381378, 0.215443447, 0.129154965, 0.0774263591, 0.046415884, 0.0278255939,
        0.0166810062, 0.00999999978, 0.00599484146, 0.00359381386, 0.00215443433, 0.00129154976,
        0.000774263579, 0.000464158948, 0.000278255931, 0.000166810103,
    ),
}  # fmt: skip


def inv_freq(theta: float, dim: int) -> np.ndarray:
    """The `dim // 2` inverse frequencies of a rope over `dim` features, as float32."""
    table = _TABLES.get((float(theta), int(dim)))
    if table is not None:
        return np.array(table, dtype=np.float32)
    # Other sizes: a float64 power rounded to float32, then a float32 reciprocal. This reproduces torch's
    # float32 table exactly for the vision sizes and to within one entry (1 ulp) for the text size.
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    powers = np.power(np.float64(theta), exponents.astype(np.float64)).astype(np.float32)
    return (np.float32(1.0) / powers).astype(np.float32)


def powers(theta: float, dim: int) -> np.ndarray:
    """`theta ** (arange(0, dim, 2) / dim)` as torch computes it in float32, the table `inv_freq` is the
    reciprocal of: the float64 power rounded to float32, moved by one ulp where that is what gives the
    reference's reciprocal (torch's float32 pow is not always correctly rounded)."""
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    rounded = np.power(np.float64(theta), exponents.astype(np.float64)).astype(np.float32)
    return _nearest_with_reciprocal(rounded, inv_freq(theta, dim))


def text_inv_freq(config: TextConfig) -> tuple[np.ndarray, float]:
    """The decoder's float32 inverse frequencies and the factor its cos and sin are multiplied by:
    the plain table and 1, or YaRN's (`yarn_inv_freq`)."""
    if config.yarn is None:
        return inv_freq(config.rope_theta, config.head_dim), 1.0
    return yarn_inv_freq(config.rope_theta, config.head_dim, config.yarn), yarn_attention_factor(config.yarn)


def yarn_inv_freq(theta: float, dim: int, yarn: YarnScaling) -> np.ndarray:
    """YaRN's table (transformers' `_compute_yarn_parameters`, float32 step for step): the frequencies
    that turn fewer than `beta_slow` times over the trained length are divided by `factor`
    (interpolated, so positions past the trained length land on angles seen in training), those that
    turn more than `beta_fast` times are kept (extrapolated: local order stays sharp), with a linear
    ramp between."""
    f32 = np.float32
    low, high = (
        _correction_dim(rotations, dim, theta, yarn.original_max_position_embeddings)
        for rotations in (yarn.beta_fast, yarn.beta_slow)
    )
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the reference's guard against a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=f32) - f32(low)) / f32(high - low), 0, 1).astype(f32)
    extrapolated_share = f32(1) - ramp
    pos = powers(theta, dim)
    extrapolation = f32(1) / pos
    interpolation = f32(1) / (f32(yarn.factor) * pos)
    return interpolation * (f32(1) - extrapolated_share) + extrapolation * extrapolated_share


def _correction_dim(rotations: float, dim: int, theta: float, length: int) -> float:
    """The (fractional) frequency index that turns `rotations` times over `length` positions."""
    return (dim * math.log(length / (rotations * 2 * math.pi))) / (2 * math.log(theta))


def yarn_attention_factor(yarn: YarnScaling) -> float:
    """What YaRN multiplies cos and sin by (so q.k by its square), keeping attention's sharpness at
    long range: the configured attention_factor, else 0.1 ln(factor) + 1, or the ratio of two such
    terms with mscale and mscale_all_dim, as in the reference."""
    if yarn.attention_factor is not None:
        return float(yarn.attention_factor)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if yarn.mscale and yarn.mscale_all_dim:
        return float(mscale(yarn.factor, yarn.mscale) / mscale(yarn.factor, yarn.mscale_all_dim))
    return mscale(yarn.factor)


def rope_periods(table: np.ndarray) -> np.ndarray:
    """What MLX's fused rope takes as `freqs` to turn with this float32 inverse-frequency table: it
    rotates by position / freqs, computing 1 / freqs in float32, so each entry is the float32 whose
    reciprocal is the table's entry exactly."""
    periods = (np.float64(1) / table.astype(np.float64)).astype(np.float32)
    return _nearest_with_reciprocal(periods, table)


def _nearest_with_reciprocal(values: np.ndarray, table: np.ndarray) -> np.ndarray:
    """`values`, each moved by at most one ulp (itself first) to a float32 whose float32 reciprocal is
    the table's entry, where one exists."""
    periods = values.copy()
    for i, target in enumerate(table):
        candidates = [periods[i], np.nextafter(periods[i], np.float32(0)), np.nextafter(periods[i], np.inf)]
        exact = [p for p in candidates if np.float32(1) / p == target]
        if exact:
            periods[i] = exact[0]
    return periods
