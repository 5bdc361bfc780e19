"""The vision tower against transformers' Qwen3VLVisionModel on the same random weights (float32)."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from compare import relative_max_diff
from prompts import IMAGE_A, IMAGE_B, VIDEO, pixel_rows
from transformers.vision_utils import get_vision_interpolation_indices_and_weights

from mlx_qwen3vl import cpu
from mlx_qwen3vl.vision import VisionLayout, fused_attention, position_embedding_taps

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


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
@pytest.mark.parametrize("case", CASES)
def test_vision_tower_matches_transformers(case, backend, tiny_f32, tiny_gpu_path, tiny_reference):
    model = tiny_f32[0] if backend == "cpu" else tiny_gpu_path[0]
    grids = np.array(CASES[case])
    pixels = pixel_rows(grids, seed=7)
    features, deepstack = model.model.visual(mx.array(pixels), grids)
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


def test_segments_are_grouped_into_runs_of_equal_length():
    layout = VisionLayout.from_grid_thw([(2, 6, 4), (1, 4, 10), (1, 6, 4), (3, 6, 4)])
    assert layout.segment_runs() == [(24, 2), (40, 1), (24, 4)]
    grids = [grids for _, _, grids in layout.run_grids()]
    assert grids == [[(2, 6, 4)], [(1, 4, 10)], [(1, 6, 4), (3, 6, 4)]]


@pytest.mark.parametrize("budget", [10**9, 10_000, 200])
def test_query_blocks_are_exact(budget, monkeypatch):
    """The CPU's attention in query blocks of any size equals the fused kernel's on whole segments."""
    monkeypatch.setattr(cpu, "ATTENTION_SCORE_BYTES", budget)
    rng = np.random.default_rng(0)
    q, k, v = (mx.array(rng.standard_normal((3, 2, 40, 8)).astype(np.float32)) for _ in range(3))
    ours = cpu.segment_attention_in_blocks(q, k, v, 0.35)
    np.testing.assert_allclose(np.array(ours), np.array(fused_attention(q, k, v, 0.35)), atol=1e-5)


def test_large_image_in_query_blocks_matches_transformers(tiny_f32, tiny_reference, monkeypatch):
    """A budget small enough that every block of the tower splits its queries into 8-row blocks."""
    grids = np.array([(1, 16, 20)])
    pixels = pixel_rows(grids, seed=8)
    monkeypatch.setattr(cpu, "ATTENTION_SCORE_BYTES", 2 * 320 * 4 * 8)
    features, deepstack = tiny_f32[0].model.visual(mx.array(pixels), grids)
    ref_features, ref_deepstack = reference_vision(tiny_reference, pixels, grids)
    assert relative_max_diff(features, ref_features) < TOLERANCE
    assert relative_max_diff(deepstack[-1], ref_deepstack[-1]) < TOLERANCE
