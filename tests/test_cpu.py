"""The CPU specialisations (mlx_qwen3vl/cpu.py), each against what it replaces: the BLAS path of the
quantized layer gives the kernel's numbers in blocks that bound the memory and leaves one-row (decode)
calls to the kernel; the kernel's products split over the cores are its own numbers, on a stream per
core, without copies of the weight; the base-2 activations equal PyTorch's; the vision tower's query
blocks bound the attention's memory; and `specialize` swaps exactly these in. (Their parity with
transformers in a whole model is in test_model.py, test_vision.py and test_full_width.py, for both
backends.)"""

import threading
import warnings

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

from mlx_qwen3vl import _blas, cpu, language, vision
from mlx_qwen3vl.cpu import BLAS_MIN_ROWS, CpuQuantizedLinear


@pytest.fixture(autouse=True)
def on_the_cpu(monkeypatch):
    """These paths are the CPU's, and their numbers and memory do not depend on the BLAS being fast:
    test them on the CPU device, with the BLAS path enabled, on any machine."""
    monkeypatch.setattr(cpu, "FAST_BLAS", True)
    device = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(device)


def quantized_layer(in_dims: int, out_dims: int, bias: bool, bits: int = 4, seed: int = 0):
    mx.random.seed(seed)
    layer = nn.Linear(in_dims, out_dims, bias=bias)
    layer.weight = layer.weight.astype(mx.bfloat16)
    q = layer.to_quantized(group_size=64, bits=bits)
    cpu.become(q, CpuQuantizedLinear)
    mx.eval(q.parameters())
    return q


def kernel(layer, x: mx.array) -> mx.array:
    return nn.QuantizedLinear.__call__(layer, x)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("bias", [False, True])
def test_many_rows_give_the_quantized_kernels_numbers(bits, bias, monkeypatch):
    # Small blocks, so the product is assembled from several, the last one ragged.
    monkeypatch.setattr(cpu, "BLOCK_BYTES", 40 * 256 * 4)
    layer = quantized_layer(256, 300, bias, bits)
    x = mx.random.normal((2, BLAS_MIN_ROWS, 256), key=mx.random.key(1))
    ours, reference = layer(x), kernel(layer, x)
    assert ours.shape == reference.shape == (2, BLAS_MIN_ROWS, 300) and ours.dtype == mx.float32
    scale = np.abs(np.array(reference)).max()
    np.testing.assert_allclose(np.array(ours), np.array(reference), rtol=0, atol=2e-6 * scale)


def test_one_row_and_non_float32_inputs_use_the_kernel_itself():
    layer = quantized_layer(256, 128, bias=False)
    for x in (
        mx.random.normal((1, 1, 256)),  # a decode step
        mx.random.normal((1, BLAS_MIN_ROWS - 1, 256)),
        mx.random.normal((1, 64, 256)).astype(mx.bfloat16),
    ):
        assert mx.array_equal(layer(x), kernel(layer, x)).item()


def test_blocks_bound_the_extra_memory(monkeypatch):
    """A weight that dequantizes to 16 MiB, in 1 MiB blocks: the call's peak stays within a few blocks
    and its output, not the whole dequantized matrix."""
    block = 2**20
    monkeypatch.setattr(cpu, "BLOCK_BYTES", block)
    layer = quantized_layer(1024, 4096, bias=False)
    x = mx.random.normal((64, 1024))
    mx.eval(x)
    mx.synchronize()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    mx.eval(layer(x))
    output = 64 * 4096 * 4
    assert mx.get_peak_memory() - base < 3 * block + 2 * output < 1024 * 4096 * 4


def plain_switch_call(layer, x, indices, sorted_indices=False):
    return QuantizedSwitchLinear.__call__(layer, x, indices, sorted_indices=sorted_indices)


def quantized_experts(bias: bool, experts: int = 6, in_dims: int = 128, out_dims: int = 100):
    layer = QuantizedSwitchLinear(in_dims, out_dims, experts, bias=bias, group_size=64, bits=4)
    if bias:
        layer.bias = mx.random.normal((experts, out_dims), key=mx.random.key(7))
    cpu.become(layer, cpu.CpuQuantizedSwitchLinear)
    mx.eval(layer.parameters())
    return layer


@pytest.mark.parametrize("cores", [2, 3, 8])
def test_products_split_over_the_cores_are_the_kernels_numbers(cores, monkeypatch):
    """Every quantized product the CPU splits by output rows (CORES not dividing them; more parts than
    this machine has cores) equals MLX's kernel on the whole weight bit for bit: linear layers with and
    without bias, 4 and 8 bits, float32 and bfloat16 inputs; the tied vocabulary projection; the MoE
    experts for a decode step and for a sorted prompt."""
    monkeypatch.setattr(cpu, "CORES", cores)
    for bits, bias in ((4, False), (8, True)):
        layer = quantized_layer(256, 301, bias, bits)
        for x in (mx.random.normal((1, 1, 256)), mx.random.normal((2, 5, 256)).astype(mx.bfloat16)):
            assert mx.array_equal(layer(x), kernel(layer, x)).item()
    embedding = nn.Embedding(301, 128).to_quantized(group_size=64, bits=4)
    cpu.become(embedding, cpu.CpuQuantizedEmbedding)
    h = mx.random.normal((1, 1, 128))
    assert mx.array_equal(embedding.as_linear(h), nn.QuantizedEmbedding.as_linear(embedding, h)).item()

    experts = quantized_experts(bias=True)
    x = mx.random.normal((1, 1, 1, 1, 128))  # a decode step as SwitchGLU shapes it, 3 of 6 experts
    indices = mx.array([[[4, 0, 2]]])
    assert mx.array_equal(experts(x, indices), plain_switch_call(experts, x, indices)).item()
    x = mx.random.normal((12, 1, 128))  # a prompt's tokens, sorted by expert
    indices = mx.sort(mx.random.randint(0, 6, (12,), key=mx.random.key(3)))[:, None]
    ours = experts(x, indices, sorted_indices=True)
    assert mx.array_equal(ours, plain_switch_call(experts, x, indices, True)).item()


def test_the_parts_run_on_streams_of_their_own(monkeypatch):
    """What lets the parts run at once: each product is built on a different stream (MLX runs a stream's
    operations on its own thread), one part per core."""
    monkeypatch.setattr(cpu, "CORES", 3)
    seen = []
    kernel_itself = mx.quantized_matmul

    def spy(x, w, *args, **kwargs):
        seen.append((str(mx.default_stream(mx.cpu)), w.shape[0]))  # Stream: equality, no hash
        return kernel_itself(x, w, *args, **kwargs)

    layer = quantized_layer(128, 301, bias=False)
    monkeypatch.setattr(mx, "quantized_matmul", spy)
    mx.eval(layer(mx.random.normal((1, 128))))
    assert len({stream for stream, _ in seen}) == 3 and sorted(rows for _, rows in seen) == [100, 100, 101]


def test_the_parts_are_views_of_the_weight():
    """Splitting copies nothing of the weight: a one-row product over a 16 MiB packed weight holds what
    the kernel on the whole weight holds (MLX widens the bfloat16 scales and biases for float32 inputs)
    and the parts' outputs before their concatenation, not the weight's bytes."""
    layer = quantized_layer(4096, 8192, bias=False)
    x = mx.random.normal((1, 4096))
    mx.eval(x)

    def peak(product) -> int:
        mx.synchronize()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(product())
        return mx.get_peak_memory() - base

    whole = peak(lambda: kernel(layer, x))
    assert whole < layer["weight"].nbytes / 2
    assert peak(lambda: layer(x)) <= whole + 2 * 8192 * 4


def test_a_model_thread_of_its_own_splits_its_products_too():
    """An MLX stream belongs to the thread that made it: a thread running the model (the server's
    engine) gets streams of its own."""
    layer = quantized_layer(128, 64, bias=False)
    x = mx.random.normal((1, 128))
    mx.eval(layer(x))  # this thread's streams exist now
    results = []
    thread = threading.Thread(
        target=lambda: results.append(mx.array_equal(layer(x), kernel(layer, x)).item())
    )
    thread.start()
    thread.join()
    assert results == [True]


def test_specialize_swaps_in_the_cpu_versions_and_nothing_else(tiny_checkpoint):
    """What the CPU backend changes in a loaded model, and that the GPU backend changes nothing."""
    from mlx_qwen3vl import load

    gpu, _ = load(tiny_checkpoint, dtype="bfloat16", backend="gpu", lazy=True)
    on_cpu, _ = load(tiny_checkpoint, dtype="bfloat16", backend="cpu", lazy=True)
    kinds = {type(m) for _, m in gpu.named_modules()}
    assert not kinds & {cpu.WideningLinear, CpuQuantizedLinear}
    layer, block = on_cpu.layers[0], on_cpu.model.visual.blocks[0]
    assert layer.mlp.activation is cpu.silu_gate and gpu.layers[0].mlp.activation is language.silu_gate
    assert layer.self_attn.attend is cpu.attention  # bfloat16 on the CPU: float32 accumulation
    assert block.mlp.act is cpu.gelu_tanh and gpu.model.visual.blocks[0].mlp.act is vision.gelu_tanh
    assert on_cpu.model.visual.merger.act is cpu.gelu_erf and gpu.model.visual.merger.act is vision.gelu_erf
    assert block.attn.attend is cpu.segment_attention_in_blocks
    assert type(block.attn.qkv) is cpu.WideningLinear
    assert type(block.mlp) is cpu.BlockwiseVisionMLP
    assert type(on_cpu.model.visual.patch_embed.proj) is nn.Linear  # sets the tower's compute dtype
    assert type(on_cpu.model.language_model.rope) is cpu.TableRope
    assert type(gpu.model.language_model.rope) is language.Rope
    in_float32, _ = load(tiny_checkpoint, dtype="float32", backend="cpu", lazy=True)
    assert in_float32.layers[0].self_attn.attend is cpu.attention  # MLX's own kernel, or key blocks

    in_decoder = lambda path, m: path.startswith("model.language") and hasattr(m, "to_quantized")  # noqa: E731
    nn.quantize(on_cpu, group_size=64, bits=4, class_predicate=in_decoder)
    cpu.specialize(on_cpu, mx.bfloat16)  # again, after quantizing in memory
    assert type(on_cpu.layers[0].mlp.down_proj) is CpuQuantizedLinear
    assert type(on_cpu.model.language_model.embed_tokens) is cpu.CpuQuantizedEmbedding  # tied: the vocabulary


def test_gelu_tanh_equals_pytorch_tanh_approximation():
    """Both forms of the vision blocks' activation (the CPU's with a power of 2) against PyTorch's
    gelu(approximate="tanh"), in float32 over the range activations take, and at the extremes (no
    overflow to nan)."""
    x = np.concatenate([np.linspace(-12, 12, 200001), [-1e30, -1e4, -88.0, 0.0, 88.0, 1e4, 1e30]])
    x = x.astype(np.float32)
    reference = torch.nn.functional.gelu(torch.from_numpy(x), approximate="tanh").numpy()
    for gelu in (vision.gelu_tanh, cpu.gelu_tanh):
        np.testing.assert_allclose(np.array(gelu(mx.array(x))), reference, rtol=2e-6, atol=1e-6)
    in_place = x.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the exponential's overflow at the far left is expected, silently
        cpu._gelu_tanh_in_place(in_place, np.empty_like(x))  # the numpy MLP's (cpu.numpy_mlp)
    np.testing.assert_allclose(in_place, reference, rtol=2e-6, atol=1e-6)


def test_the_vision_mlp_in_numpy_blocks_equals_mlx(monkeypatch):
    """A vision block's MLP over 300 float32 rows in numpy blocks of 48 (two workers, the last block
    ragged; the system OpenBLAS's products, or numpy's standing in where there is none) against the plain
    MLP in MLX, bfloat16-stored weights widened as the CPU keeps them; fewer rows than two blocks, and
    bfloat16 inputs, take MLX's path unchanged."""
    import contextlib

    if not _blas.loaded:
        monkeypatch.setattr(_blas, "loaded", "numpy")
        monkeypatch.setattr(_blas, "sgemm", cpu._numpy_product)
        monkeypatch.setattr(_blas, "single_threaded", contextlib.nullcontext)

    class Config:
        hidden_size, intermediate_size, hidden_act = 40, 88, "gelu_pytorch_tanh"

    mlp = vision.VisionMLP(Config)
    weights = {k: mx.array(np.random.default_rng(i).standard_normal(v.shape).astype(np.float32) * 0.3)
               for i, (k, v) in enumerate(tree_flatten(mlp.parameters()))}  # fmt: skip
    mlp.update(tree_unflatten([(k, v.astype(mx.bfloat16)) for k, v in weights.items()]))
    plain = vision.VisionMLP(Config)
    plain.update(mlp.parameters())
    cpu.specialize(mlp, mx.float32)
    assert type(mlp) is cpu.BlockwiseVisionMLP
    monkeypatch.setattr(cpu, "CORES", 2)
    monkeypatch.setattr(cpu, "NUMPY_MLP_ROWS", 48)
    x = mx.array(np.random.default_rng(9).standard_normal((1, 300, 40)).astype(np.float32) * 3)
    reference = np.array(vision.VisionMLP.__call__(plain, x))
    calls, sgemm = [], _blas.sgemm
    monkeypatch.setattr(_blas, "sgemm", lambda *args, **kw: calls.append(args) or sgemm(*args, **kw))
    np.testing.assert_allclose(np.array(mlp(x)), reference, rtol=0, atol=2e-6 * np.abs(reference).max())
    assert len(calls) == 2 * 7  # two products per block
    mlp(x[:, :95])  # under two blocks
    mlp(x.astype(mx.bfloat16))
    assert len(calls) == 2 * 7


def test_gelu_erf_equals_pytorch_exact_gelu():
    """Both forms of the mergers' exact GELU (the CPU's through erfc with a power of 2) against PyTorch's
    gelu in float64 (its float32 kernel is itself up to ~1e-6 away from it), over the range activations
    take, and at the extremes (no overflow to nan)."""
    x = np.concatenate([np.linspace(-12, 12, 200001), [-1e30, -1e4, -88.0, 0.0, 88.0, 1e4, 1e30]])
    x = x.astype(np.float32)
    reference = torch.nn.functional.gelu(torch.from_numpy(x).double()).numpy()
    for gelu in (vision.gelu_erf, cpu.gelu_erf):
        np.testing.assert_allclose(np.array(gelu(mx.array(x))), reference, rtol=2e-6, atol=1e-6)
    in_place = x.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # z^2's overflow at the extremes is expected, silently
        cpu._gelu_erf_in_place(in_place, *(np.empty_like(x) for _ in range(3)))  # cpu.numpy_mlp's
    np.testing.assert_allclose(in_place, reference, rtol=2e-6, atol=1e-6)


def test_query_blocks_bound_the_memory_of_a_large_segment(monkeypatch):
    """A 2048-patch segment with 64 MiB of scores in 2 MiB query blocks (bfloat16, MLX: its own peak) or
    tiles of 1 MiB per core (float32, numpy: traced by tracemalloc): the attention's peak memory stays
    within a few blocks, not the whole matrix, nor all blocks at once."""
    import tracemalloc

    n, heads, head_dim, budget = 2048, 4, 32, 2 * 2**20
    rng = np.random.default_rng(1)
    q, k, v = (mx.array(rng.standard_normal((1, heads, n, head_dim)).astype(np.float32)) for _ in range(3))
    mx.eval(q, k, v)
    out_bytes = n * heads * head_dim * 4
    monkeypatch.setattr(cpu, "ATTENTION_SCORE_BYTES", budget)
    monkeypatch.setattr(cpu, "CORES", 2)
    monkeypatch.setattr(cpu, "NUMPY_TILE", (256, 1024))  # budget / 2 per core

    def mlx_peak(attend, *arrays):
        mx.synchronize()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(attend(*arrays, 0.2))
        return mx.get_peak_memory() - base

    assert mlx_peak(cpu.float32_attention, q, k, v) > heads * n * n * 4  # the whole score matrix at once
    bf16 = [t.astype(mx.bfloat16) for t in (q, k, v)]
    mx.eval(bf16)
    assert mlx_peak(cpu.segment_attention_in_blocks, *bf16) < 3 * budget + 4 * out_bytes
    tracemalloc.start()
    try:
        mx.eval(cpu.segment_attention_in_blocks(q, k, v, 0.2))
        numpy_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert heads * n * n * 4 > 3 * budget + 2 * out_bytes > numpy_peak


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_blocked_attention_equals_float32_attention(dtype, monkeypatch):
    """The vision tower's attention on the CPU (numpy in float32, MLX in query blocks otherwise) against
    the exact float32 attention, over segments of several blocks, the last one ragged: numpy's 2 workers
    in tiles of 21 queries by 40 keys, MLX in blocks of 14."""
    monkeypatch.setattr(cpu, "CORES", 2)
    monkeypatch.setattr(cpu, "ATTENTION_SCORE_BYTES", 2 * 3 * 100 * 4 * 7)
    monkeypatch.setattr(cpu, "NUMPY_TILE", (21, 40))
    rng = np.random.default_rng(2)
    q, k, v = (mx.array(rng.standard_normal((2, 3, 100, 16)).astype(np.float32)).astype(dtype) for _ in "qkv")
    ours = cpu.segment_attention_in_blocks(q, k, v, 0.25).astype(mx.float32)
    reference = cpu.float32_attention(q, k, v, 0.25).astype(mx.float32)
    tolerance = 1e-6 if dtype == mx.float32 else 0
    np.testing.assert_allclose(np.array(ours), np.array(reference), rtol=0, atol=tolerance)


def test_vision_attention_without_the_system_openblas(monkeypatch):
    """Where MLX has no system OpenBLAS (macOS, or none installed), the same tiles run one after another
    with numpy's products, and give the exact attention too."""
    from mlx_qwen3vl import _blas

    monkeypatch.setattr(_blas, "loaded", None)
    monkeypatch.setattr(cpu, "NUMPY_TILE", (7, 120))
    rng = np.random.default_rng(5)
    q, k, v = (mx.array(rng.standard_normal((2, 3, 300, 16)).astype(np.float32)) for _ in "qkv")
    ours = cpu.segment_attention_in_blocks(q, k, v, 0.25)
    reference = cpu.float32_attention(q, k, v, 0.25)
    np.testing.assert_allclose(np.array(ours), np.array(reference), rtol=0, atol=2e-6)


@pytest.mark.parametrize("tile", [(512, 1536), (64, 48)])
def test_vision_attention_of_scores_beyond_the_exponent_range(tile, monkeypatch):
    """Scores of several hundred (float32's exponentials overflow beyond 88): the CPU's float32 path
    shifts such rows by their largest score, as the exact attention does, and gives its result; over
    several tiles of keys, by the largest so far, rescaling the earlier tiles' sums as it grows."""
    monkeypatch.setattr(cpu, "NUMPY_TILE", tile)
    rng = np.random.default_rng(4)
    q, k, v = (mx.array(rng.standard_normal((2, 2, 200, 16)).astype(np.float32)) for _ in "qkv")
    ours = cpu.segment_attention_in_blocks(q, k, v, 10.0)
    reference = cpu.float32_attention(q, k, v, 10.0)
    np.testing.assert_allclose(np.array(ours), np.array(reference), rtol=0, atol=1e-4)


def random_attention_inputs(dtype, queries=37, keys=150, heads=4, kv_heads=2, seed=3):
    rng = np.random.default_rng(seed)
    shapes = [(1, heads, queries, 16), (1, kv_heads, keys, 16), (1, kv_heads, keys, 16)]
    return [mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype) for shape in shapes]


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("mask", ["none", "causal", "boolean", "additive"])
def test_key_blocked_attention_equals_float32_attention(dtype, mask, monkeypatch):
    """A prompt chunk of 37 queries against 150 keys (the cache before it, then itself; grouped heads) in
    key blocks of 16, the last ragged: the running softmax gives the one-call attention, to float32
    rounding; in bfloat16, to the rounding of the probabilities (taken against the running maximum)."""
    q, k, v = random_attention_inputs(dtype)
    masks = {
        "none": None,
        "causal": "causal",
        "boolean": mx.array(np.random.default_rng(4).random((1, 1, 37, 150)) > 0.3),
        "additive": mx.array(np.random.default_rng(5).standard_normal((1, 4, 37, 150)).astype(np.float32)),
    }
    monkeypatch.setattr(cpu, "DECODER_SCORE_BYTES", 4 * 37 * 16 * 4)
    ours = cpu.key_blocked_attention(q, k, v, 0.25, masks[mask]).astype(mx.float32)
    reference = cpu.float32_attention(q, k, v, 0.25, masks[mask]).astype(mx.float32)
    tolerance = 1e-6 if dtype == mx.float32 else 4e-3  # bfloat16: one unit in the last place at 0.5..1
    np.testing.assert_allclose(np.array(ours), np.array(reference), rtol=0, atol=tolerance)


def test_key_blocks_bound_the_scores_of_a_chunk_against_a_long_context(monkeypatch):
    """512 bfloat16 queries against 8,192 keys: 64 MiB of float32 scores in one call; the decoder's
    attention on the CPU takes them in key blocks of 1 MiB of scores, and its peak stays within a few
    blocks and its accumulators, with the one call's result."""
    q, k, v = random_attention_inputs(mx.bfloat16, queries=512, keys=8192)
    mx.eval(q, k, v)
    budget = 2**20
    monkeypatch.setattr(cpu, "DECODER_SCORE_BYTES", budget)

    def peak(attend):
        mx.synchronize()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(attend())
        return mx.get_peak_memory() - base

    def decoders():  # as the decoder calls it
        return cpu.attention(q, k, v, cache=None, scale=0.25, mask="causal")

    def one_call():
        return cpu.float32_attention(q, k, v, 0.25, "causal")

    accumulators = 3 * 4 * 512 * 16 * 4
    assert peak(one_call) > 4 * 512 * 8192 * 4
    assert peak(decoders) < 4 * budget + accumulators
    ours, reference = (np.array(attend().astype(mx.float32)) for attend in (decoders, one_call))
    np.testing.assert_allclose(ours, reference, rtol=0, atol=4e-3)  # bfloat16: as above


@pytest.mark.parametrize("keys", [300, 2000])
@pytest.mark.parametrize("scale", [0.25, 10.0])
def test_a_float32_prompt_chunk_attends_with_numpy_in_bounded_tiles(keys, scale, monkeypatch):
    """A float32 prompt chunk of 300 queries after keys - 300 cached positions (grouped heads; causal, and
    without a mask as a single-row batch passes none) goes through numpy in tiles of 64 queries by 256
    keys, the scores held those of a tile per core (numpy's allocations, traced), with the one call's
    result; also with scores beyond float32's exponent range (scale 10: rows shifted tile by tile)."""
    import tracemalloc

    q, k, v = random_attention_inputs(mx.float32, queries=300, keys=keys, seed=7)
    mx.eval(q, k, v)
    monkeypatch.setattr(cpu, "NUMPY_TILE", (64, 256))
    tile_bytes = 64 * 256 * 4
    calls, numpy_attention = [], cpu.numpy_attention
    spy = lambda *args: calls.append(args[-1]) or numpy_attention(*args)  # noqa: E731
    monkeypatch.setattr(cpu, "numpy_attention", spy)
    for mask in ("causal", None):
        tracemalloc.start()
        ours = cpu.attention(q, k, v, cache=None, scale=scale, mask=mask)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        output = q.size * 4
        assert peak < cpu.CORES * 2 * tile_bytes + 2 * output  # rows of 2,000 keys would need 4 tiles
        reference = cpu.float32_attention(q, k, v, scale, mask)
        tolerance = 1e-6 if scale < 1 else 1e-4  # scores of hundreds: their rounding
        np.testing.assert_allclose(np.array(ours), np.array(reference), rtol=0, atol=tolerance)
    assert calls == [True, False]
