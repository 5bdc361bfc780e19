"""Long contexts against transformers: a 32K-token prompt, the context limit, and YaRN (rope_type "yarn",
how Qwen extends Qwen3-VL's 256K context towards 1M) on prompts past the trained length."""

import copy

import mlx.core as mx
import numpy as np
import pytest
import torch
from checkpoints import build_checkpoint, config_with, reference_model
from compare import FLOAT32, relative_max_diff
from prompts import IMAGE_A, Prompt, chat, image_block, make_prompts, pixel_rows
from transformers import Qwen3VLConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

from mlx_qwen3vl import load, stream_generate
from mlx_qwen3vl.config import ModelConfig
from mlx_qwen3vl.errors import Qwen3VLError
from mlx_qwen3vl.generation import prefill
from mlx_qwen3vl.model import PromptCache
from mlx_qwen3vl.rope import text_inv_freq

# float32 on both sides (compare.FLOAT32); at 32K positions the angles reach 3e4 rad, where a float32
# angle is itself only good to ~2e-3 rad: the bound holds because both sides compute the same float32
# products (the reference's frequency table exactly, rope.py) and correctly rounded cos / sin of them.

# The published head_dim (128: the real frequency table and MRoPE sections) with one head and two layers:
# the reference's attention over a 32K prompt is what costs (quadratic), so it has as few heads as can be.
LONG = {
    "text_config": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 1,
        "num_key_value_heads": 1,
        "initializer_range": 0.1,
    },
    "vision_config": {
        "depth": 2,
        "hidden_size": 64,
        "num_heads": 1,
        "intermediate_size": 128,
        "out_hidden_size": 64,
        "deepstack_visual_indexes": [0, 1],
        "initializer_range": 0.1,
    },
}
# YaRN as Qwen's recipe writes it (rope_scaling next to the MRoPE keys), scaled down: a model trained on
# 4096 positions extended 4x, so that a 6K prompt is past its trained length.
TRAINED, FACTOR = 4096, 4.0
YARN = {
    "rope_scaling": {
        "rope_type": "yarn",
        "mrope_section": [24, 20, 20],
        "mrope_interleaved": True,
        "factor": FACTOR,
        "original_max_position_embeddings": TRAINED,
    },
    "max_position_embeddings": TRAINED,
}
# The prompt's last positions compared: the last one fed by the chunked prefill, the others as decode steps.
LAST = 4


@pytest.fixture(scope="module")
def long_checkpoint(checkpoint_root):
    return build_checkpoint(checkpoint_root / "long", LONG)


@pytest.fixture(scope="module")
def yarn_checkpoint(checkpoint_root):
    config = {**LONG, "text_config": {**LONG["text_config"], **YARN}}
    return build_checkpoint(checkpoint_root / "long-yarn", config)


def long_prompt(tokenizer, length: int, with_image: bool, seed: int = 0) -> Prompt:
    """A chat prompt of about `length` tokens of random text, with an image near its start (so every later
    position carries the image's rope delta) or without."""
    filler = np.random.default_rng(seed).integers(0, 150_000, length).tolist()
    if not with_image:
        return Prompt(chat(tokenizer, filler, "Summarise."))
    return Prompt(
        chat(tokenizer, image_block(IMAGE_A) + filler, "Summarise."),
        image_grid_thw=np.array([IMAGE_A]),
        pixel_values=pixel_rows([IMAGE_A], seed=seed + 1),
    )


def prefilled(model, prompt: Prompt) -> tuple[PromptCache, mx.array]:
    """The prompt but its last LAST - 1 tokens prefilled through a new cache in the backend's chunks, the
    way generation gets there: the cache, and the last logits."""
    inputs = prompt.mlx_inputs()
    vision = []
    if prompt.pixel_values is not None:
        vision.append(model.encode_vision(inputs["pixel_values"], inputs["image_grid_thw"]))
    cache = model.make_cache()
    prepared = model.prepare(prompt.input_ids, vision, cache)
    return cache, prefill(model, prepared.chunk(0, prepared.length - (LAST - 1)), cache)


def decoded(model, prompt: Prompt, cache: PromptCache) -> list[mx.array]:
    """The logits after each of the prompt's last LAST - 1 tokens, fed one per decode step after
    `prefilled` (text positions after the image's rope delta: the fused rope on the GPU path)."""
    return [model(mx.array([[int(token)]]), cache=cache)[:, -1] for token in prompt.input_ids[0, 1 - LAST :]]


def last_logits_as_generated(model, prompt: Prompt) -> np.ndarray:
    """Logits at the prompt's last LAST positions: the last of its prefill, then its decode steps."""
    cache, first = prefilled(model, prompt)
    return np.array(mx.concatenate([first, *decoded(model, prompt, cache)]).astype(mx.float32))


def reference_last_logits(checkpoint, prompt: Prompt) -> np.ndarray:
    """transformers' float32 logits at the last LAST positions (SDPA attention: its memory stays linear
    in the prompt; only the kept positions go through the vocabulary projection)."""
    with torch.no_grad():
        logits = reference_model(checkpoint)(**prompt.torch_inputs(), logits_to_keep=LAST).logits
    return logits[0].numpy()


@pytest.fixture(scope="module")
def tokenizer(tiny_f32):
    return tiny_f32[1].tokenizer


# ---- a 32K-token prompt -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prompt_32k(tokenizer):
    return long_prompt(tokenizer, 32 * 1024, with_image=True)


@pytest.fixture(scope="module")
def reference_32k(long_checkpoint, prompt_32k):
    return reference_last_logits(long_checkpoint, prompt_32k)


@pytest.fixture(scope="module")
def prefilled_32k(long_checkpoint, prompt_32k):
    """The 32K prompt but its last tokens, prefilled once by the CPU path in its chunks: the cache and the
    last logits, for each backend to decode the rest from. (The GPU path's own prefill takes minutes here:
    on a CPU its attention is MLX's unfused fallback, quadratic in the context. Its chunks are tested
    past the trained length of the YaRN model below.)"""
    model, _ = load(long_checkpoint, dtype="float32", backend="cpu")
    return prefilled(model, prompt_32k)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_a_32k_prompt_with_an_image_gives_the_reference_logits(
    backend, long_checkpoint, prompt_32k, prefilled_32k, reference_32k
):
    """After the 32K prompt prefilled in chunks, each backend feeds its last tokens as decode steps, at
    positions past 32,767 against the whole context."""
    assert prompt_32k.input_ids.shape[1] > 32 * 1024
    model, _ = load(long_checkpoint, dtype="float32", backend=backend)
    cache, first = prefilled_32k
    length = cache.offset
    try:
        rows = decoded(model, prompt_32k, cache)
    finally:
        for layer in cache:  # the prefilled prompt alone again, for the other backend
            layer.trim(layer.offset - length)
    logits = np.array(mx.concatenate([first, *rows]).astype(mx.float32))
    assert relative_max_diff(logits, reference_32k) < FLOAT32


# ---- the context limit ------------------------------------------------------------------------------


def test_the_context_limit_is_max_position_embeddings_named_in_one_line(tiny_f32):
    model, processor = tiny_f32
    assert model.config.text_config.context_length == 262144
    with pytest.raises(Qwen3VLError) as error:
        list(stream_generate(model, processor, "Hi", max_tokens=262144))
    message = str(error.value)
    assert "\n" not in message and "model's context of 262144 tokens" in message


def test_yarn_extends_the_context_limit_to_factor_times_the_trained_length(yarn_checkpoint):
    model, processor = load(yarn_checkpoint, dtype="float32")
    limit = int(FACTOR * TRAINED)
    assert model.config.text_config.max_position_embeddings == TRAINED
    assert model.config.text_config.context_length == limit
    long_text = " ".join(["sea"] * (TRAINED + 500))
    assert list(stream_generate(model, processor, long_text, max_tokens=1))  # past max_position_embeddings
    with pytest.raises(Qwen3VLError, match=f"model's context of {limit} tokens"):
        list(stream_generate(model, processor, "Hi", max_tokens=limit))


# ---- YaRN -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def yarn_models(yarn_checkpoint):
    return {backend: load(yarn_checkpoint, dtype="float32", backend=backend)[0] for backend in ("cpu", "gpu")}


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
@pytest.mark.parametrize("case", ["text", "image", "video"])
def test_yarn_logits_match_transformers_at_every_position(
    case, backend, yarn_models, yarn_checkpoint, tokenizer
):
    prompt = make_prompts(tokenizer)[case]
    with torch.no_grad():
        reference = reference_model(yarn_checkpoint)(**prompt.torch_inputs()).logits.numpy()
    ours = yarn_models[backend](prompt.input_ids, **prompt.mlx_inputs())
    assert relative_max_diff(ours, reference) < FLOAT32


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
def test_yarn_past_the_trained_length_gives_the_reference_logits(
    with_image, backend, yarn_models, yarn_checkpoint, tokenizer
):
    prompt = long_prompt(tokenizer, TRAINED + 2048, with_image, seed=3)
    assert prompt.input_ids.shape[1] > TRAINED * 1.5
    reference = reference_last_logits(yarn_checkpoint, prompt)
    assert relative_max_diff(last_logits_as_generated(yarn_models[backend], prompt), reference) < FLOAT32


@pytest.mark.parametrize(
    "yarn",
    [
        {"factor": 3.0, "original_max_position_embeddings": 262144},  # Qwen's recipe for 1M
        {"factor": 4.0, "original_max_position_embeddings": 4096},
        {"factor": 3.0, "original_max_position_embeddings": 262144, "truncate": False, "beta_fast": 16},
        {"factor": 2.0, "mscale": 0.7, "mscale_all_dim": 0.5},
        {"factor": 8.0, "original_max_position_embeddings": 32768, "attention_factor": 1.5},
    ],
)
def test_yarn_tables_equal_transformers_bit_for_bit(yarn):
    """The frequency table (both rope paths turn with it) and the cos / sin factor of transformers'
    Qwen3-VL text rotary embedding, from the same config.json."""
    params = config_with({"text_config": {"rope_scaling": {**YARN["rope_scaling"], **yarn}}})
    params["text_config"]["max_position_embeddings"] = 1_000_000
    reference = Qwen3VLTextRotaryEmbedding(Qwen3VLConfig(**copy.deepcopy(params)).text_config)
    table, attention_factor = text_inv_freq(ModelConfig.from_dict(params).text_config)
    assert table.dtype == np.float32
    np.testing.assert_array_equal(table, reference.inv_freq.numpy())
    assert attention_factor == reference.attention_scaling


def test_the_reference_does_apply_yarn(yarn_checkpoint, long_checkpoint, tokenizer):
    """The YaRN checkpoint's reference differs from the same weights without it (the comparisons above
    would not notice a YaRN ignored on both sides): transformers' rotary embedding carries YaRN's
    attention factor, and its logits move."""
    rotary = reference_model(yarn_checkpoint).model.language_model.rotary_emb
    assert rotary.attention_scaling == pytest.approx(0.1 * np.log(FACTOR) + 1)
    prompt = make_prompts(tokenizer)["text"]
    model, _ = load(yarn_checkpoint, dtype="float32")
    plain, _ = load(long_checkpoint, dtype="float32")
    ours, without = (m(prompt.input_ids) for m in (model, plain))
    assert relative_max_diff(without, ours) > 100 * FLOAT32
