"""The whole model against transformers' Qwen3VLForConditionalGeneration on the same random weights."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from checkpoints import reference_greedy, reference_model
from compare import BFLOAT16_MAX, BFLOAT16_MEAN, FLOAT32, relative_max_diff, teacher_forced
from prompts import IMAGE_A, IMAGE_B, Prompt, chat, image_block, pixel_rows
from transformers import Qwen3VLForConditionalGeneration

import mlx_qwen3vl.cpu.activations
import mlx_qwen3vl.cpu.attention
from mlx_qwen3vl import load
from mlx_qwen3vl.language import silu_gate

PROMPTS = ["text", "image", "two_images", "video", "image_and_video"]


@pytest.fixture(scope="module")
def backends(tiny_f32, tiny_gpu_path):
    """float32 models of both backends: the CPU's, and the GPU path (fused projections, fused rope for
    text positions, MLX's fused attention) run here on the CPU."""
    return {"cpu": tiny_f32[0], "gpu": tiny_gpu_path[0]}


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
@pytest.mark.parametrize("case", PROMPTS)
def test_float32_logits_match_transformers_at_every_position(
    case, backend, backends, prompts, reference_logits
):
    prompt = prompts[case]
    logits = backends[backend](prompt.input_ids, **prompt.mlx_inputs())
    assert logits.shape == (1, prompt.input_ids.shape[1], 151936)
    assert relative_max_diff(logits, reference_logits[case]) < FLOAT32


def greedy_decode(model, prompt: Prompt, steps: int):
    """Prefill with the cache, then one token per call; returns the tokens and each step's logits."""
    cache = model.make_cache()
    logits = model(prompt.input_ids, **prompt.mlx_inputs(), cache=cache)[:, -1]
    tokens, step_logits = [], []
    for _ in range(steps):
        token = int(mx.argmax(logits, axis=-1).item())
        tokens.append(token)
        step_logits.append(np.array(logits[0]))
        logits = model(mx.array([[token]]), cache=cache)[:, -1]
    return tokens, np.stack(step_logits)


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
@pytest.mark.parametrize("case", ["image", "video", "image_and_video"])
def test_cached_greedy_decoding_matches_transformers_generate(
    case, backend, backends, tiny_reference, prompts
):
    """Decode steps after a prompt with images or videos (a non-zero rope delta): on the GPU path these
    are fused-rope steps at offset + delta."""
    tokens, logits = greedy_decode(backends[backend], prompts[case], steps=8)
    ref_tokens, ref_logits = reference_greedy(tiny_reference, prompts[case].torch_inputs(), steps=8)
    assert tokens == ref_tokens
    assert relative_max_diff(logits, ref_logits) < FLOAT32


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_prompt_fed_in_pieces_through_the_cache_equals_one_pass(backend, backends, tokenizer_ids):
    """Two turns, each with its own image, prefilled one after the other through the cache: the second
    piece's positions continue from the first's rope delta (a follow-up turn with a new image)."""
    model = backends[backend]
    first = chat(tokenizer_ids, image_block(IMAGE_A), "What is this?")
    second = chat(tokenizer_ids, image_block(IMAGE_B), "And this?")
    pixels_a, pixels_b = pixel_rows([IMAGE_A], seed=11), pixel_rows([IMAGE_B], seed=12)
    whole = model(
        np.concatenate([first, second], axis=1),
        pixel_values=np.concatenate([pixels_a, pixels_b]),
        image_grid_thw=np.array([IMAGE_A, IMAGE_B]),
    )
    cache = model.make_cache()
    part1 = model(first, pixel_values=pixels_a, image_grid_thw=np.array([IMAGE_A]), cache=cache)
    part2 = model(second, pixel_values=pixels_b, image_grid_thw=np.array([IMAGE_B]), cache=cache)
    assert cache.offset == first.shape[1] + second.shape[1]
    # The same logits in other shapes of products (equal here on both BLAS paths): float32 noise at most.
    assert relative_max_diff(part1, whole[:, : first.shape[1]]) < FLOAT32
    assert relative_max_diff(part2, whole[:, first.shape[1] :]) < FLOAT32


@pytest.fixture(scope="module")
def tokenizer_ids(tiny_f32):
    return tiny_f32[1].tokenizer


# ---- bfloat16 ---------------------------------------------------------------------------------------
#
# Within transformers' bf16 (compare.BFLOAT16_MAX / BFLOAT16_MEAN: two correct bf16 implementations are as
# far apart as bf16 is from float32). The bf16 checks are therefore:
#  1. closeness to transformers' bf16 within those bounds;
#  2. accuracy: our bf16 is as close to the float32 reference as transformers' bf16 is;
#  3. with attention rounded exactly like transformers' eager attention, the text-only logits agree >= 4x
#     tighter than the bf16-vs-float32 gap (measured 4.7x; per layer, 0-1.5% of the hidden values differ,
#     by 1 ulp), and the vision tower's first DeepStack tap 10x tighter: every other op (norms,
#     activations, rope, position-embedding interpolation, residual and DeepStack adds, lm_head) rounds
#     where the reference rounds.


@pytest.fixture(scope="module")
def bf16_reference(tiny_checkpoint, prompts):
    reference = reference_model(tiny_checkpoint, torch.bfloat16)
    with torch.no_grad():
        return {c: reference(**prompts[c].torch_inputs()).logits.float().numpy() for c in PROMPTS}


def load_bf16(checkpoint, backend: str):
    """The model in bfloat16. The GPU path's attention is MLX's fused kernel, which accumulates in
    float32 on a GPU; its CPU fallback computes scores and softmax in bfloat16 (~1% further from the
    reference here), so on the CPU the GPU path is tested with the float32-accumulating attention."""
    model, _ = load(checkpoint, dtype="bfloat16", backend=backend)
    if backend == "gpu" and mx.default_device() == mx.cpu:
        for layer in model.layers:
            layer.self_attn.attend = mlx_qwen3vl.cpu.attention.decoder_attention
        for block in model.model.visual.blocks:
            block.attn.attend = mlx_qwen3vl.cpu.attention.segment_attention_in_blocks
    return model


@pytest.fixture(scope="module", params=["cpu", "gpu"])
def bf16_logits(request, tiny_checkpoint, prompts, bf16_reference):
    model = load_bf16(tiny_checkpoint, request.param)
    ours = {}
    for case in PROMPTS:
        p = prompts[case]
        ours[case] = np.array(model(p.input_ids, **p.mlx_inputs()).astype(mx.float32))
    return ours, bf16_reference


def relative_mean_diff(a, b, scale):
    return float(np.abs(a - b).mean() / np.abs(scale).max())


@pytest.mark.parametrize("case", PROMPTS)
def test_bfloat16_logits_close_to_transformers_bfloat16(case, bf16_logits, reference_logits):
    ours, ref = bf16_logits[0][case], bf16_logits[1][case]
    f32 = reference_logits[case]
    assert relative_max_diff(ours, ref) < BFLOAT16_MAX
    assert relative_mean_diff(ours, ref, f32) < BFLOAT16_MEAN
    # As accurate as the reference's own bf16: the mean error against float32 is no larger (+15%).
    assert relative_mean_diff(ours, f32, f32) < 1.15 * relative_mean_diff(ref, f32, f32)


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
@pytest.mark.parametrize("case", ["image", "video"])
def test_bfloat16_decode_steps_after_media_stay_within_the_bounds(case, backend, tiny_checkpoint, prompts):
    """Decode steps in bfloat16 after an image or a video (non-zero rope delta: fused-rope steps on the
    GPU path), fed transformers' own bf16 greedy tokens: within the bf16 bounds of transformers' bf16
    step logits, and as close to float32 as they are."""
    prompt = prompts[case]
    reference = reference_model(tiny_checkpoint, torch.bfloat16)
    ref_tokens, ref_logits = reference_greedy(reference, prompt.torch_inputs(), 8)
    ours = teacher_forced(load_bf16(tiny_checkpoint, backend), prompt, ref_tokens)
    f32 = teacher_forced(load(tiny_checkpoint, dtype="float32", backend=backend)[0], prompt, ref_tokens)
    assert relative_max_diff(ours, ref_logits) < BFLOAT16_MAX
    assert relative_mean_diff(ours, ref_logits, f32) < BFLOAT16_MEAN
    assert relative_mean_diff(ours, f32, f32) < 1.15 * relative_mean_diff(ref_logits, f32, f32)


def eager_attention(q, k, v, scale, mask=None):
    """transformers' eager_attention_forward, op by op: bf16 q k^T, scaled in float32 and rounded,
    float32 softmax rounded to bf16, bf16 P v."""
    n_q, n_kv, L_q, L_k = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    k, v = mx.repeat(k, n_q // n_kv, axis=1), mx.repeat(v, n_q // n_kv, axis=1)
    scores = ((q @ k.swapaxes(-1, -2)).astype(mx.float32) * scale).astype(q.dtype)
    if isinstance(mask, str):
        keep = mx.arange(L_k)[None] <= mx.arange(L_k - L_q, L_k)[:, None]
        scores = mx.where(keep, scores, -mx.inf)
    return mx.softmax(scores.astype(mx.float32), axis=-1, precise=True).astype(q.dtype) @ v


def use_eager_attention(monkeypatch):
    """On the CPU backend in bfloat16, the decoder and the vision tower attend through
    cpu/attention.py's float32_attention: replaced by transformers' eager rounding."""
    monkeypatch.setattr(mlx_qwen3vl.cpu.attention, "float32_attention", eager_attention)


def test_bfloat16_rounds_like_the_reference(tiny_checkpoint, prompts, reference_logits, monkeypatch):
    use_eager_attention(monkeypatch)
    model, _ = load(tiny_checkpoint, dtype="bfloat16")
    reference = Qwen3VLForConditionalGeneration.from_pretrained(
        tiny_checkpoint, dtype=torch.bfloat16, attn_implementation="eager"
    ).eval()
    prompt, f32 = prompts["text"], reference_logits["text"]
    with torch.no_grad():
        ref = reference(**prompt.torch_inputs()).logits.float().numpy()
    ours = np.array(model(prompt.input_ids).astype(mx.float32))
    gap = relative_mean_diff(ref, f32, f32)
    assert relative_mean_diff(ours, ref, f32) < gap / 4


def test_bfloat16_vision_rounds_like_the_reference(tiny_checkpoint, monkeypatch):
    """The first DeepStack tap (after vision block 0) in bf16, with eager-rounded attention, against
    transformers' eager bf16: measured 10% of elements differ (by 1 ulp); the same tensor computed in
    float32 and rounded to bf16 differs from it in 69%. Catches a missed float32 step (position-embedding
    accumulation, LayerNorm, GELU, rope) in the tower."""
    use_eager_attention(monkeypatch)
    model, _ = load(tiny_checkpoint, dtype="bfloat16")
    reference = Qwen3VLForConditionalGeneration.from_pretrained(
        tiny_checkpoint, dtype=torch.bfloat16, attn_implementation="eager"
    ).eval()
    grids = np.array([IMAGE_A, IMAGE_B])
    pixels = pixel_rows(grids, seed=13)
    _, deepstack = model.model.visual(mx.array(pixels), grids)
    with torch.no_grad():
        ref = reference.model.visual(torch.tensor(pixels).bfloat16(), grid_thw=torch.tensor(grids))
    ours, theirs = np.array(deepstack[0].astype(mx.float32)), ref.deepstack_features[0].float().numpy()
    f32 = reference_model(tiny_checkpoint, torch.float32)
    with torch.no_grad():
        exact = f32.model.visual(torch.tensor(pixels), grid_thw=torch.tensor(grids)).deepstack_features[0]
    rounded = exact.bfloat16().float().numpy()
    assert (ours != theirs).mean() < 0.15
    assert (rounded != theirs).mean() > 4 * (ours != theirs).mean()


@pytest.mark.parametrize("silu_gate", [silu_gate, mlx_qwen3vl.cpu.activations.silu_gate], ids=["gpu", "cpu"])
def test_silu_gate_equals_pytorch(silu_gate):
    """The decoder's fused SiLU(gate) * up (on the CPU, the sigmoid as a power of 2) against PyTorch's
    silu, in float32 over the range activations take and at the extremes (no nan), and rounded once in
    bfloat16.

    float32: the exponential of x carries the rounding of x itself, so the relative error grows with |x|:
    against float64, PyTorch's is at most 1.25 (1 + |x|) units of float32's last place and ours 1.85 (both
    versions, 3 seeds of `up`). The bound is 10 (1 + |x|) of them, relative. Beyond x = -87 the sigmoid
    is subnormal, which MLX flushes to zero: there the bound is |x up| times the smallest normal float32. A
    sigmoid in bfloat16 or an approximate SiLU is off by 1e-3 or more."""
    x = np.concatenate([np.linspace(-100, 100, 400001), [-1e30, -1e4, -88.0, 0.0, 88.0, 1e4, 1e30]])
    x = x.astype(np.float32)
    up = np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
    ours = np.array(silu_gate(mx.array(x), mx.array(up)))
    reference = (torch.nn.functional.silu(torch.from_numpy(x)) * torch.from_numpy(up)).numpy()
    float32 = np.finfo(np.float32)
    bound = (1 + np.abs(x.astype(np.float64))) * (
        10 * float32.eps * np.abs(reference) + float32.tiny * np.abs(up)
    )
    assert (np.abs(ours.astype(np.float64) - reference) <= bound).all()

    gate, up = torch.from_numpy(x[:1000]).bfloat16(), torch.from_numpy(up[:1000]).bfloat16()
    reference = (torch.nn.functional.silu(gate.float()).bfloat16() * up).float().numpy()
    ours = silu_gate(
        mx.array(gate.float().numpy()).astype(mx.bfloat16), mx.array(up.float().numpy()).astype(mx.bfloat16)
    )
    np.testing.assert_array_equal(np.array(ours.astype(mx.float32)), reference)


def test_a_prompt_chunk_holds_no_layers_products_past_the_layer(tiny_gpu_path):
    """Prefill of a 512-token chunk through 1, then 13 decoder layers (fused q/k/v; the model's
    layers repeated, each with its own cache): each layer more adds its keys and values to the cache, not
    its whole q/k/v product (measured: 1.1-1.4 MB a layer, 1 MB of it the cache; 2.8 MB while v went into
    the cache as a view of the product).

    On the CPU backend MLX allocates an operation's output when it queues the operation, and frees its
    inputs when a worker thread has run it: on a busy machine the queue runs ahead of the worker and the
    peak holds a few more outputs than the graph needs, once per evaluation, not per layer (up to 3.1 MB
    a layer measured over 3 extra layers beside 6 busy loops). Many layers and the smaller peak of two
    runs keep that out of the per-layer figure."""
    from mlx_lm.models.cache import KVCache

    text_model = tiny_gpu_path[0].model.language_model
    x = mx.random.normal((1, 512, text_model.config.hidden_size))
    mx.eval(x)
    layers = text_model.layers
    more = 12

    def peak(n: int) -> int:
        text_model.layers = [layers[j % len(layers)] for j in range(n)]
        peaks = []
        for _ in range(2):
            cache = [KVCache() for _ in range(n)]
            mx.synchronize()
            mx.clear_cache()
            base = mx.get_active_memory()
            mx.reset_peak_memory()
            mx.eval(text_model(x, 0, cache), [c.state for c in cache])
            peaks.append(mx.get_peak_memory() - base)
            del cache
        return min(peaks)

    try:
        growth = (peak(1 + more) - peak(1)) / more
    finally:
        text_model.layers = layers
    config = text_model.config
    kv_bytes = 2 * config.num_key_value_heads * 512 * config.head_dim * 4
    qkv_bytes = 512 * (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim * 4
    assert growth < kv_bytes + qkv_bytes / 2


def prepared_with_media(model, prompt: Prompt):
    """The prompt's images and videos encoded and placed, as stream_generate prepares them: (prepared
    input, its cache, the encoded images, the encoded videos)."""
    inputs = prompt.mlx_inputs()
    images = model.encode_vision(inputs["pixel_values"], inputs["image_grid_thw"])
    videos = model.encode_vision(inputs["pixel_values_videos"], inputs["video_grid_thw"], kind="video")
    cache = model.make_cache()
    prepared = model.prepare(prompt.input_ids, [images, videos], cache)
    return prepared, cache, images, videos


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_prefill_in_chunks_holds_only_the_features_and_embeds_a_chunk_at_a_time(
    backend, backends, prompts, reference_logits, monkeypatch
):
    """A long prompt in chunks of 8 tokens: the prepared prompt holds the vision features as encoded (no
    copy) and no embeddings; each chunk's embeddings are made when it is fed, with its own features and
    DeepStack rows in place; the last logits are transformers'."""
    from mlx_qwen3vl.generation import prefill

    model, prompt = backends[backend], prompts["image_and_video"]
    fed = []
    embedding = type(model.model.language_model.embed_tokens)
    embed = embedding.__call__
    monkeypatch.setattr(embedding, "__call__", lambda self, ids: fed.append(ids.shape[1]) or embed(self, ids))
    prepared, cache, images, videos = prepared_with_media(model, prompt)
    placed = [part.features for part in prepared.vision]
    assert placed[0] is images.features and placed[1] is videos.features  # the encoder's arrays, no copy
    logits = prefill(model, prepared, cache, step_size=8)
    length = prompt.input_ids.shape[1]
    assert fed == [8] * (length // 8) + ([length % 8] if length % 8 else [])
    assert relative_max_diff(logits[None], reference_logits["image_and_video"][:, -1:]) < FLOAT32


def test_prefill_with_key_blocked_attention_matches_transformers(
    tiny_f32, prompts, reference_logits, monkeypatch
):
    """On the CPU a prompt chunk's attention against a long context goes over key blocks (its scores
    bounded, not the chunk times the context): in chunks of 8 tokens and blocks of 16 keys, the last
    logits are transformers'."""
    from mlx_qwen3vl.cpu import attention
    from mlx_qwen3vl.generation import prefill

    model, prompt = tiny_f32[0], prompts["image_and_video"]
    heads = model.config.text_config.num_attention_heads
    monkeypatch.setattr(attention, "DECODER_SCORE_BYTES", heads * 8 * 16 * 4)
    blocked = []
    in_blocks = attention.key_blocked_attention
    spy = lambda *args: blocked.append(1) or in_blocks(*args)  # noqa: E731
    monkeypatch.setattr(attention, "key_blocked_attention", spy)
    prepared, cache, _, _ = prepared_with_media(model, prompt)
    logits = prefill(model, prepared, cache, step_size=8)
    assert len(blocked) > len(model.layers)
    assert relative_max_diff(logits[None], reference_logits["image_and_video"][:, -1:]) < FLOAT32
