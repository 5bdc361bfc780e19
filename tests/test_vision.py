"""The vision tower against transformers' Qwen3VLVisionModel on the same random weights (float32)."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from compare import relative_max_diff
from prompts import IMAGE_A, IMAGE_B, VIDEO, pixel_rows
from transformers.vision_utils import get_vision_interpolation_indices_and_weights

from mlx_qwen3vl import vision
from mlx_qwen3vl.vision import VisionLayout, position_embedding_taps, segment_attention

# float32 on both sides; the remaining difference is summation order in matmuls and attention.
TOLERANCE = 1e-4

CASES = {
    "non_square_image": [IMAGE_A],
    "two_images_of_different_sizes": [IMAGE_A, IMAGE_B],
    "video_with_3_temporal_groups": [VIDEO],
    "video_then_image": [VIDEO, IMAGE_B],
}


def reference_vision(reference, pixels, grids):
    with torch.no_grad():
        out = reference.model.visual(torch.tensor(pixels), grid_thw=torch.tensor(grids))
    return out.pooler_output.numpy(), [f.numpy() for f in out.deepstack_features]


@pytest.mark.parametrize("case", CASES)
def test_vision_tower_matches_transformers(case, tiny_f32, tiny_reference):
    grids = np.array(CASES[case])
    pixels = pixel_rows(grids, seed=7)
    features, deepstack = tiny_f32[0].model.visual(mx.array(pixels), grids)
    ref_features, ref_deepstack = reference_vision(tiny_reference, pixels, grids)

    assert features.shape == (int(grids.prod(axis=1).sum()) // 4, 128)
    assert relative_max_diff(features, ref_features) < TOLERANCE
    assert len(deepstack) == len(ref_deepstack) == 3
    for ours, ref in zip(deepstack, ref_deepstack, strict=True):
        assert relative_max_diff(ours, ref) < TOLERANCE


@pytest.mark.parametrize("grid", [(1, 6, 10), (1, 48, 48), (1, 2, 2), (2, 70, 4), (1, 100, 36)])
def test_position_embedding_taps_equal_transformers(grid):
    t, h, w = grid
    ref_index, ref_weight = get_vision_interpolation_indices_and_weights(
        torch.tensor([grid]), 48, mode="bilinear", align_corners=True, spatial_merge_size=2
    )
    index, weight = position_embedding_taps(h, w, 48, 2)
    np.testing.assert_array_equal(np.tile(index, (t, 1)), ref_index.numpy())
    np.testing.assert_array_equal(np.tile(weight, (t, 1)), ref_weight.numpy())


def naive_segment_attention(q, k, v, lengths, scale):
    out, start = [], 0
    for n in lengths:
        qs, ks, vs = (x[start : start + n].transpose(1, 0, 2).astype(np.float64) for x in (q, k, v))
        scores = qs @ ks.transpose(0, 2, 1) * scale
        p = np.exp(scores - scores.max(-1, keepdims=True))
        out.append(((p / p.sum(-1, keepdims=True)) @ vs).transpose(1, 0, 2).reshape(n, -1))
        start += n
    return np.concatenate(out)


@pytest.mark.parametrize("budget", [None, 10_000, 200])
def test_attention_is_confined_to_segments_and_exact_in_query_blocks(budget):
    grids = [(2, 6, 4), (1, 4, 10), (1, 6, 4)]
    layout = VisionLayout.from_grid_thw(grids)
    assert layout.segment_runs() == [(24, 2), (40, 1), (24, 1)]
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((layout.num_patches, 2, 8)).astype(np.float32) for _ in range(3))
    ours = segment_attention(mx.array(q), mx.array(k), mx.array(v), layout.segment_runs(), 0.35, budget)
    expected = naive_segment_attention(q, k, v, [24, 24, 40, 24], 0.35)
    np.testing.assert_allclose(np.array(ours), expected, atol=1e-5)


def test_large_image_in_query_blocks_matches_transformers(tiny_f32, tiny_reference, monkeypatch):
    """A budget small enough that every block of the tower splits its queries into 8-row blocks."""
    grids = np.array([(1, 16, 20)])
    pixels = pixel_rows(grids, seed=8)
    monkeypatch.setattr(vision, "CPU_ATTENTION_SCORE_BYTES", 2 * 320 * 4 * 8)
    features, deepstack = tiny_f32[0].model.visual(mx.array(pixels), grids)
    ref_features, ref_deepstack = reference_vision(tiny_reference, pixels, grids)
    assert relative_max_diff(features, ref_features) < TOLERANCE
    assert relative_max_diff(deepstack[-1], ref_deepstack[-1]) < TOLERANCE


def test_gelu_tanh_equals_pytorch_tanh_approximation():
    """The power-of-2 form of the vision blocks' activation against PyTorch's gelu(approximate="tanh"),
    in float32 over the range activations take, and at the extremes (no overflow to nan)."""
    x = np.concatenate([np.linspace(-12, 12, 200001), [-1e30, -1e4, -88.0, 0.0, 88.0, 1e4, 1e30]])
    x = x.astype(np.float32)
    ours = np.array(vision.gelu_tanh(mx.array(x)))
    reference = torch.nn.functional.gelu(torch.from_numpy(x), approximate="tanh").numpy()
    np.testing.assert_allclose(ours, reference, rtol=2e-6, atol=1e-6)


def test_query_blocks_bound_the_memory_of_a_large_segment():
    """A 2048-patch segment with 64 MiB of scores in 2 MiB query blocks: the attention's peak memory
    stays within a few blocks (not the whole matrix, nor all blocks at once)."""
    n, heads, head_dim, budget = 2048, 4, 32, 2 * 2**20
    rng = np.random.default_rng(1)
    q, k, v = (mx.array(rng.standard_normal((n, heads, head_dim)).astype(np.float32)) for _ in range(3))
    mx.eval(q, k, v)
    out_bytes = n * heads * head_dim * 4

    def peak(max_score_bytes):
        mx.synchronize()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(segment_attention(q, k, v, [(n, 1)], 0.2, max_score_bytes))
        return mx.get_peak_memory() - base

    assert peak(None) > heads * n * n * 4  # the whole score matrix at once
    assert peak(budget) < 3 * budget + 4 * out_bytes
