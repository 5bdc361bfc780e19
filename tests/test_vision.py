"""The vision tower against transformers' Qwen3VLVisionModel on the same random weights (float32)."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from compare import FLOAT32, relative_max_diff
from prompts import IMAGE_A, IMAGE_B, VIDEO, pixel_rows
from transformers.vision_utils import get_vision_interpolation_indices_and_weights

from mlx_qwen3vl.cpu import attention, numpy_attention, vision_mlp
from mlx_qwen3vl.vision import VisionLayout, fused_attention, position_embedding_taps

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
    assert relative_max_diff(features, ref_features) < FLOAT32
    assert len(deepstack) == len(ref_deepstack) == 3
    for ours, ref in zip(deepstack, ref_deepstack, strict=True):
        assert relative_max_diff(ours, ref) < FLOAT32


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
    """The CPU's attention in query blocks of any size (numpy's in tiles of 8 queries by 16 keys) equals
    the fused kernel's on whole segments."""
    monkeypatch.setattr(attention, "ATTENTION_SCORE_BYTES", budget)
    monkeypatch.setattr(numpy_attention, "NUMPY_TILE", (8, 16))
    rng = np.random.default_rng(0)
    q, k, v = (mx.array(rng.standard_normal((3, 2, 40, 8)).astype(np.float32)) for _ in range(3))
    ours = attention.segment_attention_in_blocks(q, k, v, 0.35)
    assert relative_max_diff(ours, fused_attention(q, k, v, 0.35)) < FLOAT32


def test_large_image_in_query_blocks_matches_transformers(tiny_f32, tiny_reference, monkeypatch):
    """Every block of the tower attends in tiles of 8 queries by 96 keys (the last ragged), and runs its
    MLP in numpy blocks of 48 rows."""
    grids = np.array([(1, 16, 20)])
    pixels = pixel_rows(grids, seed=8)
    monkeypatch.setattr(numpy_attention, "NUMPY_TILE", (8, 96))
    monkeypatch.setattr(vision_mlp, "NUMPY_MLP_ROWS", 48)
    features, deepstack = tiny_f32[0].model.visual(mx.array(pixels), grids)
    ref_features, ref_deepstack = reference_vision(tiny_reference, pixels, grids)
    assert relative_max_diff(features, ref_features) < FLOAT32
    assert relative_max_diff(deepstack[-1], ref_deepstack[-1]) < FLOAT32


# ---- long videos in pieces ---------------------------------------------------------------------------------


def budget_for(model, patches: int) -> int:
    """A vision budget that holds `patches` patches (Model.vision_pieces' arithmetic)."""
    return model.model.visual.activation_bytes_per_patch(mx.float32) * patches


def test_pieces_are_whole_segments_in_order():
    """Images stay whole, videos are cut between temporal groups, each piece holds as many segments as fit
    (one at least), and the pieces cover the rows in order."""
    layout = VisionLayout.from_grid_thw([(1, 4, 4), (5, 2, 2), (1, 8, 8), (3, 2, 2)])
    pieces = layout.split(20)
    assert [piece.grids for _, _, piece in pieces] == [
        [(1, 4, 4), (1, 2, 2)],
        [(4, 2, 2)],
        [(1, 8, 8)],  # 64 patches: over the budget, alone
        [(3, 2, 2)],
    ]
    assert [(start, end) for start, end, _ in pieces] == [(0, 20), (20, 36), (36, 100), (100, 112)]
    assert [p.grids for _, _, p in layout.split(10**6)] == [layout.grids]


@pytest.mark.parametrize("backend", ["cpu", "cpu, scores of 2 segments per call", "gpu"])
@pytest.mark.parametrize("patches", [96, 300])
def test_a_video_in_pieces_gives_the_bits_of_one_pass(backend, patches, tiny_f32, tiny_gpu_path, monkeypatch):
    """Every patch attends within its own segment, so pieces of whole temporal groups (96 patches: one
    group each; 300: three groups, or an image beside a group) give exactly the features and DeepStack
    features of one pass; progress counts the blocks of every piece. On the CPU, also when a pass
    attends its segments in several calls (the path a segment takes must not depend on how many are
    attended together)."""
    model = tiny_f32[0] if backend.startswith("cpu") else tiny_gpu_path[0]
    if "scores" in backend:
        monkeypatch.setattr(attention, "ATTENTION_SCORE_BYTES", 2 * 2 * 96 * 96 * 4)
    grids = np.array([(6, 8, 12), (1, 6, 10), (4, 8, 8)])
    pixels = pixel_rows(grids, seed=3)
    one_pass = model.encode_vision(pixels, grids)
    events = []
    model.vision_budget = budget_for(model, patches)
    try:
        pieces = model.vision_pieces(grids)
        in_pieces = model.encode_vision(pixels, grids, lambda done, total: events.append((done, total)))
    finally:
        model.vision_budget = None
    assert len(pieces) == {96: 11, 300: 4}[patches]
    levels = zip(
        (in_pieces.features, *in_pieces.deepstack), (one_pass.features, *one_pass.deepstack), strict=True
    )
    for ours, whole in levels:
        np.testing.assert_array_equal(np.array(ours), np.array(whole))
    steps = len(pieces) * len(model.model.visual.blocks)
    assert events == [(i, steps) for i in range(1, steps + 1)]


def test_a_video_in_pieces_matches_transformers(tiny_f32, tiny_reference):
    model = tiny_f32[0]
    grids = np.array(CASES["video_then_image"])
    pixels = pixel_rows(grids, seed=7)
    model.vision_budget = budget_for(model, 24)  # one temporal group (or the image) per piece
    try:
        assert len(model.vision_pieces(grids)) == 4
        encoded = model.encode_vision(pixels, grids)
    finally:
        model.vision_budget = None
    ref_features, ref_deepstack = reference_vision(tiny_reference, pixels, grids)
    assert relative_max_diff(encoded.features, ref_features) < FLOAT32
    for ours, ref in zip(encoded.deepstack, ref_deepstack, strict=True):
        assert relative_max_diff(ours, ref) < FLOAT32


def vision_memory(model, groups: int) -> int:
    """MLX's peak memory while encoding a video of `groups` temporal groups of 16x16 patches, beyond what
    was held before and the features it returns."""
    grids = np.array([(groups, 16, 16)])
    pixels = pixel_rows(grids, seed=5)
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    encoded = model.encode_vision(pixels, grids)
    mx.eval(encoded.features, encoded.deepstack)
    returned = sum(a.nbytes for a in (encoded.features, *encoded.deepstack))
    return mx.get_peak_memory() - before - returned


@pytest.mark.slow
def test_peak_memory_grows_with_the_piece_not_the_video(tiny_f32):
    """With a budget of 2 temporal groups, a video 4x longer costs no more beyond its features (but, while
    they are joined, one more copy of one feature level), and both stay within the budget; in one pass
    the longer video costs over twice as much (4x the activations, beside what any pass holds)."""
    model = tiny_f32[0]
    budget = model.vision_budget = budget_for(model, 2 * 256)
    try:
        short, long = vision_memory(model, 8), vision_memory(model, 32)
    finally:
        model.vision_budget = None
    feature_level = 32 * 64 * 128 * 4  # one level of the long video's features, float32
    assert long <= short + feature_level and max(short, long) <= budget
    whole_short, whole_long = vision_memory(model, 8), vision_memory(model, 32)
    assert whole_long > 2 * whole_short and whole_long > 3 * long


def test_the_vision_budget_is_a_load_option_with_a_default_from_memory(tiny_checkpoint, monkeypatch):
    """`load(vision_budget=bytes)` sizes the pieces; without it, an eighth of MLX's memory limit does."""
    from mlx_qwen3vl import Qwen3VLError, load

    grids = np.array([(8, 16, 16)])
    model, _ = load(tiny_checkpoint, dtype="float32")
    assert model.vision_budget is None and len(model.vision_pieces(grids)) == 1
    monkeypatch.setattr(mx, "get_memory_limit", lambda: 8 * budget_for(model, 2 * 256))
    assert len(model.vision_pieces(grids)) == 4  # 2 temporal groups of 256 patches each
    model, _ = load(tiny_checkpoint, dtype="float32", vision_budget=budget_for(model, 3 * 256))
    assert len(model.vision_pieces(grids)) == 3  # 3 + 3 + 2
    for bad in (0, -5, 1.5, "1GB", True):
        with pytest.raises(Qwen3VLError, match="vision_budget"):
            load(tiny_checkpoint, vision_budget=bad)
