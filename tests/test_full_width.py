"""Each dense model's real widths with few layers, against transformers on both backends: catches what
the tiny widths cannot (head_dim != hidden / heads, GQA groups of 2 to 8, large mergers, and the 8B / 32B
vision towers' head_dim 72).

- 2B: text 2048 (16 query / 8 kv heads of 128), vision 1024 x 16 heads, merger into 2048, tied lm_head;
- 4B: text 2560 (32 / 8 heads of 128), vision 1024 x 16 heads, merger into 2560, tied;
- 8B: text 4096 (32 / 8 heads of 128), vision 1152 x 16 heads of 72, merger into 4096, untied;
- 32B: text 5120 (64 / 8 heads of 128, MLP 25600), vision 1152 x 16 heads of 72, into 5120, untied.

Every width is the published one; depths are 1-3 layers / 3-4 blocks (tests/checkpoints.py). Each takes
a 4096-token vocabulary (the vision markers renumbered to its last four ids, `checkpoints.with_vocabulary`),
tied or untied as published: the published 151936 rows (an lm_head of 2048 to 5120 wide at every position)
would be most of the memory and time of a test that is about the layers, and the tiny model's tests run
the whole vocabulary, tied and untied. The transformers reference runs once per model and is freed before
ours is loaded, so one model's weights are in memory at a time (the 32B's one layer: 2 GB in float32).
"""

import gc
import shutil

import numpy as np
import pytest
import torch
from checkpoints import (
    FULL_WIDTH_2B,
    FULL_WIDTH_4B,
    FULL_WIDTH_8B,
    FULL_WIDTH_32B,
    build_checkpoint,
    compact_ids,
    reference_model,
    with_vocabulary,
)
from compare import FLOAT32, relative_max_diff
from prompts import Prompt, make_prompts

from mlx_qwen3vl import load
from mlx_qwen3vl.processor import load_tokenizer

pytestmark = pytest.mark.slow  # a few hundred MB of weights per model

SMALL_VOCABULARY = 4096
# A prompt with one image: text and image tokens through every layer at its width, DeepStack rows added.
# Videos take the same layers (their positions and timestamps do not depend on widths: the tiny model's
# tests cover them), and the cost of a test is its prompt's tokens through the full-width layers.
PROMPT = "image"

# name: (config overrides, text hidden size, vision head_dim)
MODELS = {
    "2b": (with_vocabulary(FULL_WIDTH_2B, SMALL_VOCABULARY), 2048, 64),
    "4b": (with_vocabulary(FULL_WIDTH_4B, SMALL_VOCABULARY), 2560, 64),
    "8b": (with_vocabulary(FULL_WIDTH_8B, SMALL_VOCABULARY), 4096, 72),
    "32b": (with_vocabulary(FULL_WIDTH_32B, SMALL_VOCABULARY), 5120, 72),
}


def compact_vocabulary(prompt: Prompt, vocab_size: int) -> Prompt:
    """The prompt in a `vocab_size`-token vocabulary (`checkpoints.compact_ids`)."""
    compact = compact_ids(prompt.input_ids, vocab_size)
    return Prompt(compact, **{k: v for k, v in vars(prompt).items() if k != "input_ids"})


@pytest.fixture(scope="module", params=list(MODELS))
def checkpoint(request, checkpoint_root):
    path = build_checkpoint(checkpoint_root / f"full_width_{request.param}", MODELS[request.param][0])
    yield request.param, path
    shutil.rmtree(path)  # the 32B's layer alone is a GB on disk


@pytest.fixture(scope="module")
def expected(checkpoint):
    """transformers' float32 logits and image features for the image prompt, computed once per
    model; the reference model (not kept in `reference_model`'s cache) is freed on return."""
    path = checkpoint[1]
    reference = reference_model.__wrapped__(path, torch.float32)
    prompt = make_prompts(load_tokenizer(path))[PROMPT]
    inputs = prompt.torch_inputs()  # mm_token_type_ids from the published ids: the same positions
    vocab = reference.config.text_config.vocab_size
    inputs["input_ids"] = torch.tensor(compact_vocabulary(prompt, vocab).input_ids)
    with torch.no_grad():
        logits = reference(**inputs).logits.numpy()
        vision = reference.model.visual(
            torch.tensor(prompt.pixel_values), grid_thw=torch.tensor(prompt.image_grid_thw)
        )
    result = {
        "logits": logits,
        "features": vision.pooler_output.numpy(),
        "deepstack": [d.numpy() for d in vision.deepstack_features],
    }
    del reference, vision
    gc.collect()
    return result


# Both backends: the CPU's, and the GPU path run on the CPU; loaded in the test, so that each model's
# checkpoint and reference are built once for both.
@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_full_width_logits_and_vision_match_transformers(expected, checkpoint, backend):
    model, processor = load(checkpoint[1], dtype="float32", backend=backend)
    _, hidden, vision_head_dim = MODELS[checkpoint[0]]
    text, vision = model.config.text_config, model.config.vision_config
    assert (text.hidden_size, text.head_dim, vision.head_dim) == (hidden, 128, vision_head_dim)
    prompt = make_prompts(processor.tokenizer)[PROMPT]
    prompt = compact_vocabulary(prompt, text.vocab_size)
    logits = model(prompt.input_ids, **prompt.mlx_inputs())
    assert relative_max_diff(logits, expected["logits"]) < FLOAT32

    encoded = model.encode_vision(prompt.pixel_values, prompt.image_grid_thw)
    assert encoded.features.shape == (int(np.prod(prompt.image_grid_thw)) // 4, hidden)
    assert relative_max_diff(encoded.features, expected["features"]) < FLOAT32
    for ours_ds, ref_ds in zip(encoded.deepstack, expected["deepstack"], strict=True):
        assert relative_max_diff(ours_ds, ref_ds) < FLOAT32
