"""The real 4B widths with few layers: text 2560 (32 query / 8 kv heads of 128, so head_dim differs from
hidden / heads), vision 1024 x 16 heads, 4096-wide mergers into 2560, three DeepStack taps."""

import numpy as np
import pytest
import torch
from checkpoints import FULL_WIDTH_4B, build_checkpoint, reference_model
from compare import relative_max_diff
from prompts import make_prompts

from mlx_qwen3vl import load

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def full_width_checkpoint(checkpoint_root):
    return build_checkpoint(checkpoint_root / "full_width_4b", FULL_WIDTH_4B)


@pytest.fixture(scope="module", params=["cpu", "gpu"])
def full_width(request, full_width_checkpoint):
    """Both backends: the CPU's, and the GPU path run on the CPU."""
    model, processor = load(full_width_checkpoint, dtype="float32", backend=request.param)
    return model, processor, reference_model(full_width_checkpoint, torch.float32)


@pytest.mark.parametrize("case", ["image_and_video"])
def test_full_width_logits_and_vision_match_transformers(case, full_width):
    model, processor, reference = full_width
    config = model.config
    assert (config.text_config.hidden_size, config.text_config.head_dim) == (2560, 128)
    assert config.text_config.num_attention_heads * config.text_config.head_dim != 2560
    prompt = make_prompts(processor.tokenizer)[case]
    logits = model(prompt.input_ids, **prompt.mlx_inputs())
    with torch.no_grad():
        ref = reference(**prompt.torch_inputs()).logits.numpy()
    assert relative_max_diff(logits, ref) < TOLERANCE

    encoded = model.encode_vision(prompt.pixel_values, prompt.image_grid_thw)
    features, deepstack = encoded.features, encoded.deepstack
    with torch.no_grad():
        ref_vision = reference.model.visual(
            torch.tensor(prompt.pixel_values), grid_thw=torch.tensor(prompt.image_grid_thw)
        )
    assert features.shape == (int(np.prod(prompt.image_grid_thw)) // 4, 2560)
    assert relative_max_diff(features, ref_vision.pooler_output.numpy()) < TOLERANCE
    for ours, ref_ds in zip(deepstack, ref_vision.deepstack_features, strict=True):
        assert relative_max_diff(ours, ref_ds.numpy()) < TOLERANCE
