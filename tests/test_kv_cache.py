"""KV-cache quantization (`kv_bits`): the cache really holds packed keys and values, the logits after a long
text-and-image prompt stay within the bounds measured on the test model (README, "KV-cache quantization"),
the 8-bit cache answers the test prompt with the same greedy tokens, a conversation continues its
quantized cache, and bad values are refused in one line."""

import mlx.core as mx
import numpy as np
import pytest
from compare import bfloat16_ulp, relative_max_diff
from media import picture
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.cache import KVCache, QuantizedKVCache

from mlx_qwen3vl import ChatSession, Qwen3VLError, generate
from mlx_qwen3vl.cpu.attention import decoder_attention, float32_attention
from mlx_qwen3vl.generation import prefill
from mlx_qwen3vl.options import KVCacheOptions

# Relative max difference of the logits from those with the unquantized cache, float32, over the prompt's
# last position and 8 decode steps fed the same tokens. Measured on the tiny test model: 7.1e-3 (8 bits)
# and 0.144 (4 bits), group size 64, on both paths; the bounds leave about twice that.
BOUNDS = {8: 1.5e-2, 4: 0.3}
STEPS = 8


def long_prompt(processor) -> dict:
    """About 400 tokens: some 330 of text and a 200x140 image's 70."""
    text = " ".join(["The quick brown fox jumps over the lazy dog and keeps running."] * 24)
    return processor(text + " Describe the picture.", images=[picture(200, 140, 1)])


def logits_along(model, inputs, kv: KVCacheOptions, tokens: list[int] | None = None):
    """The logits [STEPS + 1, vocab] after the prompt (prefilled in chunks of 128) and after each of
    `tokens` (default: the greedy ones of this cache), the tokens, and the cache."""
    cache = model.make_cache(kv)
    images = model.encode_vision(inputs["pixel_values"], inputs["image_grid_thw"])
    prepared = model.prepare(inputs["input_ids"], [images], cache)
    logits = prefill(model, prepared, cache, step_size=128)
    rows, fed = [np.array(logits[0])], []
    for step in range(STEPS):
        fed.append(tokens[step] if tokens else int(mx.argmax(logits[0]).item()))
        logits = model(mx.array([[fed[-1]]]), cache=cache)[:, -1]
        rows.append(np.array(logits[0]))
    return np.stack(rows), fed, cache


@pytest.fixture(scope="module")
def unquantized(tiny_f32, tiny_gpu_path):
    """The model as the CPU runs it and as the GPU backends do (MLX's fused attention and mlx-lm's
    quantized attention; here on the CPU), each with its prompt and logits with the unquantized cache."""
    runs = {}
    for path, (model, processor) in {"cpu": tiny_f32, "gpu": tiny_gpu_path}.items():
        inputs = long_prompt(processor)
        runs[path] = (model, inputs, *logits_along(model, inputs, KVCacheOptions())[:2])
    return runs


@pytest.mark.parametrize("path", ["cpu", "gpu"])
@pytest.mark.parametrize("bits", [8, 4])
def test_logits_after_a_long_prompt_stay_within_the_measured_bound(unquantized, path, bits):
    model, inputs, expected, tokens = unquantized[path]
    assert inputs["input_ids"].shape[1] > 350
    logits, _, cache = logits_along(model, inputs, KVCacheOptions(bits), tokens)
    assert all(isinstance(c, QuantizedKVCache) and c.bits == bits for c in cache)
    difference = relative_max_diff(logits, expected)
    assert 0 < difference < BOUNDS[bits], difference


@pytest.mark.parametrize("bits, group_size", [(8, 64), (4, 64), (8, 32), (4, 128)])
def test_the_cache_holds_packed_values_with_a_scale_and_bias_per_group(tiny_f32, bits, group_size):
    """Per value: `bits` / 8 bytes, plus a float32 scale and bias per group (the activation dtype),
    against 4 bytes unquantized."""
    model, processor = tiny_f32
    ids = processor("Tell me about the weather today.")["input_ids"]
    held = {}
    for kv in (KVCacheOptions(), KVCacheOptions(bits, group_size)):
        cache = model.make_cache(kv)
        mx.eval(model(ids, cache=cache), [c.state for c in cache])
        held[kv.bits] = sum(c.nbytes for c in cache)
    assert all(isinstance(c, KVCache) for c in model.make_cache())
    assert held[bits] / held[None] == pytest.approx((bits / 8 + 2 * 4 / group_size) / 4)


def test_greedy_tokens_with_8_bits_equal_the_unquantized_cache(tiny_f32):
    model, processor = tiny_f32
    image = picture(200, 140, 1)
    options = {"images": [image], "max_tokens": 16, "temperature": 0}
    answer = generate(model, processor, "Describe the picture.", kv_bits=8, **options)
    assert answer == generate(model, processor, "Describe the picture.", **options)


def test_a_conversation_continues_its_quantized_cache(tiny_f32):
    """The second turn prefills only its new tokens into the quantized cache, and answers as one pass
    over the whole conversation with a fresh quantized cache does."""
    model, processor = tiny_f32
    session = ChatSession(model, processor, max_tokens=6, temperature=0, kv_bits=8, kv_group_size=32)
    image = picture(200, 140, 1)
    list(session.ask("What is this?", images=[image]))
    before = session.cache.offset
    second = list(session.ask("And its colour?"))
    assert 0 < session.prefilled < before
    assert session.cache.offset == len(session.tokens)
    assert all(isinstance(c, QuantizedKVCache) and (c.bits, c.group_size) == (8, 32) for c in session.cache)

    prompt = session.tokens[: before + session.prefilled]
    inputs = processor("What is this?", images=[image])
    cache = model.make_cache(KVCacheOptions(8, 32))
    logits = model(np.array([prompt]), inputs["pixel_values"], inputs["image_grid_thw"], cache=cache)[:, -1]
    tokens = []
    for _ in range(len(second)):
        tokens.append(int(mx.argmax(logits, axis=-1).item()))
        logits = model(mx.array([[tokens[-1]]]), cache=cache)[:, -1]
    assert [r.token for r in second] == tokens

    session.clear()  # a new conversation keeps the session's cache settings
    assert all(isinstance(c, QuantizedKVCache) for c in session.cache)


@pytest.mark.parametrize("queries", [1, 37])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_the_cpus_attention_over_a_quantized_cache(queries, dtype):
    """A decode step (1 query) reads the packed cache; a prompt chunk (37 queries, causal) attends over it
    dequantized. float32: mlx-lm's quantized attention to float32 rounding. bfloat16: float32 attention
    over the dequantized values, as for the unquantized cache (mlx-lm's computes the scores in bfloat16),
    to a few units in bfloat16's last place.

    Bounds relative to the output's scale: float32 1e-5 (measured at most 1.0e-6 over 20 seeds: the
    order of the sums); bfloat16 10 units in the last place at that scale (measured at most 2 over 40
    seeds: the decode step dequantizes inside the product, in float32, where the reference rounds the
    dequantized keys and values to bfloat16 first)."""
    rng = np.random.default_rng(0)
    shapes = [(1, 8, queries, 64), (1, 2, 150, 64), (1, 2, 150, 64)]
    q, k, v = [mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype) for shape in shapes]
    cache = QuantizedKVCache(group_size=32, bits=4)
    keys, values = cache.update_and_fetch(k, v)
    mask = "causal" if queries > 1 else None
    ours = decoder_attention(q, keys, values, cache=cache, scale=0.125, mask=mask)
    ours = np.array(ours.astype(mx.float32))
    if dtype == mx.float32:
        reference = scaled_dot_product_attention(q, keys, values, cache=cache, scale=0.125, mask=mask)
        reference = np.array(reference)
        bound = 1e-5 * np.abs(reference).max()
    else:
        k, v = (mx.dequantize(*packed, group_size=32, bits=4) for packed in (keys, values))
        reference = np.array(float32_attention(q, k, v, 0.125, mask).astype(mx.float32))
        bound = 10 * bfloat16_ulp(np.abs(reference).max())
    assert np.abs(ours - reference).max() <= bound


@pytest.mark.parametrize(
    "options, message",
    [
        ({"kv_bits": 3}, "kv_bits=3 is not supported: must be 4 or 8 (None: unquantized)"),
        ({"kv_bits": "8"}, "kv_bits='8' is not supported: must be 4 or 8 (None: unquantized)"),
        ({"kv_bits": True}, "kv_bits=True is not supported: must be 4 or 8 (None: unquantized)"),
        ({"kv_bits": 8, "kv_group_size": 48}, "kv_group_size=48 is not supported: must be 32, 64 or 128"),
    ],
)
def test_bad_values_are_refused_in_one_line_before_any_media_is_read(tiny_f32, options, message):
    model, processor = tiny_f32
    with pytest.raises(Qwen3VLError) as error:
        generate(model, processor, "Hi", images=["/no/such/image.png"], **options)
    assert str(error.value) == message
    with pytest.raises(Qwen3VLError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ChatSession(model, processor, **options)
