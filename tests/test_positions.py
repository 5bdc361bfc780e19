"""3-D MRoPE position ids against docs/reference.md §4.4 and transformers' get_rope_index."""

import numpy as np
import pytest
import torch

from mlx_qwen3vl.errors import Qwen3VLError
from mlx_qwen3vl.positions import batch_rope_index, rope_index

IDS = {"image_token_id": 151655, "video_token_id": 151656, "spatial_merge_size": 2}
A, VS, VE, IMG, VID = 1, 151652, 151653, 151655, 151656


def test_worked_example_of_the_spec():
    """docs/reference.md §4.4: [a b VS] image (1,4,6) [VE c] [t1 t2 VS] group (1,4,4) [VE] [t3 VS] group [VE
    d]."""
    ids = [A, A, VS] + [IMG] * 6 + [VE, A] + [A, A, VS] + [VID] * 4 + [VE] + [A, VS] + [VID] * 4 + [VE, A]
    positions, delta = rope_index(ids, [[1, 4, 6]], [[2, 4, 4]], **IDS)
    t = "0 1 2 3 3 3 3 3 3 6 7 8 9 10 11 11 11 11 13 14 15 16 16 16 16 18 19"
    h = "0 1 2 3 3 3 4 4 4 6 7 8 9 10 11 11 12 12 13 14 15 16 16 17 17 18 19"
    w = "0 1 2 3 4 5 3 4 5 6 7 8 9 10 11 12 11 12 13 14 15 16 17 16 17 18 19"
    expected = np.array([[int(v) for v in row.split()] for row in (t, h, w)])
    np.testing.assert_array_equal(positions, expected)
    assert delta == -7


@pytest.mark.parametrize("case", ["text", "image", "two_images", "video", "image_and_video"])
def test_positions_equal_transformers(case, prompts, tiny_reference):
    prompt = prompts[case]
    inputs = prompt.torch_inputs()
    if "mm_token_type_ids" not in inputs:
        inputs["mm_token_type_ids"] = torch.zeros_like(inputs["input_ids"])
    ref_positions, ref_delta = tiny_reference.model.get_rope_index(
        inputs["input_ids"],
        inputs["mm_token_type_ids"],
        inputs.get("image_grid_thw"),
        inputs.get("video_grid_thw"),
    )
    positions, delta = rope_index(prompt.input_ids[0], prompt.image_grid_thw, prompt.video_grid_thw, **IDS)
    np.testing.assert_array_equal(positions, ref_positions.numpy()[:, 0])
    assert delta == int(ref_delta[0, 0])


def test_batch_rows_take_their_own_grids():
    row0 = [A, VS] + [IMG] * 6 + [VE, A, A]
    row1 = [A, A, A, VS] + [IMG] * 4 + [VE, A, A]
    grids = [[1, 4, 6], [1, 4, 4]]
    positions, deltas = batch_rope_index(np.array([row0, row1]), grids, None, **IDS)
    p0, d0 = rope_index(row0, grids[:1], None, **IDS)
    p1, d1 = rope_index(row1, grids[1:], None, **IDS)
    np.testing.assert_array_equal(positions[:, 0], p0)
    np.testing.assert_array_equal(positions[:, 1], p1)
    assert list(deltas) == [d0, d1] == [-3, -2]


@pytest.mark.parametrize(
    "ids, images, message",
    [
        ([A, VS] + [IMG] * 5 + [VE], [[1, 4, 6]], "shorter than its grid"),
        ([A, VS] + [IMG] * 6 + [VE, VS] + [IMG] * 6 + [VE], [[1, 4, 6]], "more image tokens"),
        ([A, VS] + [IMG] * 6 + [VE], [[1, 4, 6], [1, 4, 6]], "more image tokens than the prompt"),
    ],
)
def test_mismatched_grids_are_refused(ids, images, message):
    with pytest.raises(Qwen3VLError, match=message):
        rope_index(ids, images, None, **IDS)
