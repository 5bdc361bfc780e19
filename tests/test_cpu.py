"""The CPU specialisations (mlx_qwen3vl/cpu/), each against what it replaces: the BLAS path of the
quantized layer gives the kernel's numbers in blocks that bound the memory and leaves one-row (decode)
calls to the kernel; the kernel's products split over the cores are its own numbers, on a stream per
core, without copies of the weight; the base-2 activations equal PyTorch's; the vision tower's query
blocks bound the attention's memory; and `specialize` swaps exactly these in. (Their parity with
transformers in a whole model is in test_model.py, test_vision.py and test_full_width.py, for both
backends.)

Float32 results computed in another summation order than their reference are held to `float32_drift`;
results the code says are the reference's own numbers, to equality."""

import contextlib
import math
import threading
import tracemalloc
import warnings
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from compare import relative_max_diff
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear

from mlx_qwen3vl import language, vision
from mlx_qwen3vl.cpu import (
    activations,
    attention,
    openblas,
    quantized,
    scheduling,
    specialize,
    vision_mlp,
    widening,
)
from mlx_qwen3vl.cpu.numpy_attention import numpy_product
from mlx_qwen3vl.cpu.quantized import BLAS_MIN_ROWS, CpuQuantizedLinear
from mlx_qwen3vl.cpu.rope import TableRope
from mlx_qwen3vl.cpu.swap import become

# Float32's unit roundoff: one rounding moves a value by at most this much of it.
UNIT_ROUNDOFF = 2.0**-24


def float32_drift(terms: int, largest_score: float = 0.0) -> float:
    """How far two float32 computations of one result may drift apart in other summation orders (another
    BLAS kernel, tiles, key blocks), relative to the reference's scale, with room for other processors.
    The rounding errors of a sum of `terms` add up like a random walk, about sqrt(terms) roundings: 16
    sqrt(terms) here. Attention also rounds its scores: a score s off in its last place moves exp(s) by
    |s| roundings of it, so the largest score adds 8 |s|. Measured over a dozen seeds, with MLX's and
    numpy's bundled BLAS and with the system OpenBLAS, the drift stays under a tenth of this bound; a
    wrong softmax shift, mask or block boundary moves outputs by 1e-2 of their scale or more."""
    return UNIT_ROUNDOFF * (16 * math.sqrt(terms) + 8 * largest_score)


def largest_score(q: mx.array, k: mx.array, scale: float) -> float:
    """A bound on |scale q.k| over all query and key rows (Cauchy-Schwarz)."""
    norms = [np.linalg.norm(np.array(x, dtype=np.float64), axis=-1).max() for x in (q, k)]
    return scale * norms[0] * norms[1]


def bfloat16_drift(reference) -> float:
    """Two units in the last place of bfloat16 at the reference's scale. Paths that round the softmax's
    probabilities to bfloat16 against different maxima drift apart before the output's own rounding by
    far less than a unit, so outputs differ by one unit at most (the largest measured), or are equal.
    The float32 case of the same test holds the arithmetic to `float32_drift`."""
    return 2 * 2.0 ** (np.floor(np.log2(np.abs(np.asarray(reference)).max())) - 7)


@pytest.fixture(autouse=True)
def on_the_cpu(monkeypatch):
    """These paths are the CPU's, and their numbers and memory do not depend on the BLAS being fast:
    test them on the CPU device, with the BLAS path enabled, on any machine."""
    monkeypatch.setattr(quantized, "FAST_BLAS", True)
    device = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(device)


def quantized_layer(in_dims: int, out_dims: int, bias: bool, bits: int = 4, seed: int = 0):
    mx.random.seed(seed)
    layer = nn.Linear(in_dims, out_dims, bias=bias)
    layer.weight = layer.weight.astype(mx.bfloat16)
    q = layer.to_quantized(group_size=64, bits=bits)
    become(q, CpuQuantizedLinear)
    mx.eval(q.parameters())
    return q


def kernel(layer, x: mx.array) -> mx.array:
    return nn.QuantizedLinear.__call__(layer, x)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("bias", [False, True])
def test_many_rows_give_the_quantized_kernels_numbers(bits, bias, monkeypatch):
    # Small blocks, so the product is assembled from several, the last one ragged.
    monkeypatch.setattr(quantized, "BLOCK_BYTES", 40 * 256 * 4)
    layer = quantized_layer(256, 300, bias, bits)
    x = mx.random.normal((2, BLAS_MIN_ROWS, 256), key=mx.random.key(1))
    ours, reference = layer(x), kernel(layer, x)
    assert ours.shape == reference.shape == (2, BLAS_MIN_ROWS, 300) and ours.dtype == mx.float32
    # The same products of exact float32 weights (bfloat16 scales widen exactly), summed in BLAS's order.
    assert relative_max_diff(ours, reference) < float32_drift(terms=256)


def test_the_tied_vocabulary_projection_of_many_rows_gives_the_kernels_numbers(monkeypatch):
    """The quantization check projects its scored positions onto the vocabulary together: many rows of
    the tied projection go through BLAS as a linear layer's do."""
    monkeypatch.setattr(quantized, "BLOCK_BYTES", 40 * 256 * 4)
    mx.random.seed(0)
    embedding = nn.Embedding(300, 256).to_quantized(group_size=64, bits=4)
    become(embedding, quantized.CpuQuantizedEmbedding)
    h = mx.random.normal((1, 2 * BLAS_MIN_ROWS, 256), key=mx.random.key(1))
    ours, reference = embedding.as_linear(h), nn.QuantizedEmbedding.as_linear(embedding, h)
    assert ours.shape == reference.shape == (1, 2 * BLAS_MIN_ROWS, 300)
    assert relative_max_diff(ours, reference) < float32_drift(terms=256)


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
    monkeypatch.setattr(quantized, "BLOCK_BYTES", block)
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
    become(layer, quantized.CpuQuantizedSwitchLinear)
    mx.eval(layer.parameters())
    return layer


@pytest.mark.parametrize("cores", [2, 3, 8])
def test_products_split_over_the_cores_are_the_kernels_numbers(cores, monkeypatch):
    """Every quantized product the CPU splits by output rows (CORES not dividing them; more parts than
    this machine has cores) equals MLX's kernel on the whole weight bit for bit: linear layers with and
    without bias, 4 and 8 bits, float32 and bfloat16 inputs; the tied vocabulary projection; the MoE
    experts for a decode step and for a sorted prompt."""
    monkeypatch.setattr(scheduling, "CORES", cores)
    for bits, bias in ((4, False), (8, True)):
        layer = quantized_layer(256, 301, bias, bits)
        for x in (mx.random.normal((1, 1, 256)), mx.random.normal((2, 5, 256)).astype(mx.bfloat16)):
            assert mx.array_equal(layer(x), kernel(layer, x)).item()
    embedding = nn.Embedding(301, 128).to_quantized(group_size=64, bits=4)
    become(embedding, quantized.CpuQuantizedEmbedding)
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
    monkeypatch.setattr(scheduling, "CORES", 3)
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
    assert not kinds & {widening.WideningLinear, CpuQuantizedLinear}
    layer, block = on_cpu.layers[0], on_cpu.model.visual.blocks[0]
    assert (
        layer.mlp.activation is activations.silu_gate and gpu.layers[0].mlp.activation is language.silu_gate
    )
    assert layer.self_attn.attend is attention.decoder_attention  # bfloat16 on the CPU: float32 accumulation
    assert block.mlp.act is activations.gelu_tanh and gpu.model.visual.blocks[0].mlp.act is vision.gelu_tanh
    assert on_cpu.model.visual.merger.act is activations.gelu_erf
    assert gpu.model.visual.merger.act is vision.gelu_erf
    assert block.attn.attend is attention.segment_attention_in_blocks
    assert type(block.attn.qkv) is widening.WideningLinear
    assert type(block.mlp) is vision_mlp.BlockwiseVisionMLP
    assert type(on_cpu.model.visual.patch_embed.proj) is nn.Linear  # sets the tower's compute dtype
    assert type(on_cpu.model.language_model.rope) is TableRope
    assert type(gpu.model.language_model.rope) is language.Rope
    in_float32, _ = load(tiny_checkpoint, dtype="float32", backend="cpu", lazy=True)
    assert in_float32.layers[0].self_attn.attend is attention.decoder_attention  # MLX's kernel, or key blocks

    in_decoder = lambda path, m: path.startswith("model.language") and hasattr(m, "to_quantized")  # noqa: E731
    nn.quantize(on_cpu, group_size=64, bits=4, class_predicate=in_decoder)
    specialize(on_cpu, mx.bfloat16)  # again, after quantizing in memory
    assert type(on_cpu.layers[0].mlp.down_proj) is CpuQuantizedLinear
    assert (
        type(on_cpu.model.language_model.embed_tokens) is quantized.CpuQuantizedEmbedding
    )  # tied: the vocabulary


# The GELUs are elementwise, so their bound is per element. Away from the negative tail a float32
# evaluation lands within ~2 units in the last place of PyTorch's (2.3e-7 relative measured, MLX's forms
# and numpy's alike): GELU_RTOL. In the tail x * Phi(x) is a large x times a tiny Phi that carries its
# exponential's rounding, and PyTorch's own float32 kernel flushes to -0 near x = -5: 2.6e-7 absolute
# measured, GELU_ATOL. Both leave ~8x room; a wrong constant or a sign slip moves values by 1e-3 or more.
GELU_RTOL, GELU_ATOL = 2e-6, 2e-6
GELU_INPUTS = np.concatenate([np.linspace(-12, 12, 200001), [-1e30, -1e4, -88.0, 0.0, 88.0, 1e4, 1e30]])


def test_gelu_tanh_equals_pytorch_tanh_approximation():
    """Both forms of the vision blocks' activation (the CPU's with a power of 2) against PyTorch's
    gelu(approximate="tanh"), in float32 over the range activations take, and at the extremes (no
    overflow to nan)."""
    x = GELU_INPUTS.astype(np.float32)
    reference = torch.nn.functional.gelu(torch.from_numpy(x), approximate="tanh").numpy()
    for gelu in (vision.gelu_tanh, activations.gelu_tanh):
        np.testing.assert_allclose(np.array(gelu(mx.array(x))), reference, rtol=GELU_RTOL, atol=GELU_ATOL)
    in_place = x.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the exponential's overflow at the far left is expected, silently
        activations.gelu_tanh_in_place(in_place, np.empty_like(x))  # the numpy MLP's (vision_mlp.py)
    np.testing.assert_allclose(in_place, reference, rtol=GELU_RTOL, atol=GELU_ATOL)


def test_gelu_erf_equals_pytorch_exact_gelu():
    """Both forms of the mergers' exact GELU (the CPU's through erfc with a power of 2) against PyTorch's
    gelu in float64 (its float32 kernel is itself up to ~1e-6 away from it), over the range activations
    take, and at the extremes (no overflow to nan)."""
    x = GELU_INPUTS.astype(np.float32)
    reference = torch.nn.functional.gelu(torch.from_numpy(x).double()).numpy()
    for gelu in (vision.gelu_erf, activations.gelu_erf):
        np.testing.assert_allclose(np.array(gelu(mx.array(x))), reference, rtol=GELU_RTOL, atol=GELU_ATOL)
    in_place = x.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # z^2's overflow at the extremes is expected, silently
        activations.gelu_erf_in_place(in_place, *(np.empty_like(x) for _ in range(3)))  # the numpy MLP's
    np.testing.assert_allclose(in_place, reference, rtol=GELU_RTOL, atol=GELU_ATOL)


def test_the_vision_mlp_in_numpy_blocks_equals_mlx(monkeypatch):
    """A vision block's MLP over 300 float32 rows in numpy blocks of 48 (two workers, the last block
    ragged; the system OpenBLAS's products, or numpy's standing in where there is none) against the plain
    MLP in MLX, bfloat16-stored weights widened as the CPU keeps them. The CPU's MLP takes that path from
    two blocks of NUMPY_MLP_ROWS rows; fewer rows, and bfloat16 inputs, take MLX's path unchanged."""
    if not openblas.loaded:
        monkeypatch.setattr(openblas, "loaded", "numpy")
        monkeypatch.setattr(openblas, "sgemm", numpy_product)
        monkeypatch.setattr(openblas, "single_threaded", contextlib.nullcontext)

    class Config:
        hidden_size, intermediate_size, hidden_act = 40, 88, "gelu_pytorch_tanh"

    mlp = vision.VisionMLP(Config)
    weights = {k: mx.array(np.random.default_rng(i).standard_normal(v.shape).astype(np.float32) * 0.3)
               for i, (k, v) in enumerate(tree_flatten(mlp.parameters()))}  # fmt: skip
    mlp.update(tree_unflatten([(k, v.astype(mx.bfloat16)) for k, v in weights.items()]))
    plain = vision.VisionMLP(Config)
    plain.update(mlp.parameters())
    specialize(mlp, mx.float32)
    assert type(mlp) is vision_mlp.BlockwiseVisionMLP
    monkeypatch.setattr(scheduling, "CORES", 2)
    rows = 2 * vision_mlp.NUMPY_MLP_ROWS
    x = mx.array(np.random.default_rng(9).standard_normal((1, rows, 40)).astype(np.float32) * 3)
    calls, sgemm = [], openblas.sgemm
    monkeypatch.setattr(openblas, "sgemm", lambda *args, **kw: calls.append(args) or sgemm(*args, **kw))
    # fc1 sums 40 products per value and fc2 88, in BLAS's order; the GELUs between agree to ~2 ulps.
    ours = vision_mlp.numpy_mlp(mlp, x[:, :300], block_rows=48)
    assert relative_max_diff(ours, vision.VisionMLP.__call__(plain, x[:, :300])) < float32_drift(terms=88)
    assert len(calls) == 2 * 7  # two products per block
    assert relative_max_diff(mlp(x), vision.VisionMLP.__call__(plain, x)) < float32_drift(terms=88)
    assert len(calls) == 2 * 7 + 2 * 2
    mlp(x[:, : rows - 1])  # under two blocks
    mlp(x.astype(mx.bfloat16))
    assert len(calls) == 2 * 7 + 2 * 2


def test_query_blocks_bound_the_memory_of_a_large_segment(monkeypatch):
    """A 2048-patch segment with 64 MiB of scores in 2 MiB query blocks (bfloat16, MLX: its own peak) or
    tiles of 1 MiB per core (float32, numpy: traced by tracemalloc): the attention's peak memory stays
    within a few blocks, not the whole matrix, nor all blocks at once."""
    n, heads, head_dim, budget = 2048, 4, 32, 2 * 2**20
    rng = np.random.default_rng(1)
    q, k, v = (mx.array(rng.standard_normal((1, heads, n, head_dim)).astype(np.float32)) for _ in range(3))
    mx.eval(q, k, v)
    out_bytes = n * heads * head_dim * 4
    monkeypatch.setattr(scheduling, "CORES", 2)
    in_blocks = partial(attention.segment_attention_in_blocks, score_bytes=budget, tile=(256, 1024))  # 1 MiB

    def mlx_peak(attend, *arrays):
        mx.synchronize()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(attend(*arrays, 0.2))
        return mx.get_peak_memory() - base

    assert (
        mlx_peak(attention.float32_attention, q, k, v) > heads * n * n * 4
    )  # the whole score matrix at once
    bf16 = [t.astype(mx.bfloat16) for t in (q, k, v)]
    mx.eval(bf16)
    assert mlx_peak(in_blocks, *bf16) < 3 * budget + 4 * out_bytes
    tracemalloc.start()
    try:
        mx.eval(in_blocks(q, k, v, 0.2))
        numpy_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert heads * n * n * 4 > 3 * budget + 2 * out_bytes > numpy_peak


def random_qkv(shape, seed: int, dtype=mx.float32) -> list[mx.array]:
    rng = np.random.default_rng(seed)
    return [mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype) for _ in "qkv"]


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_blocked_attention_equals_float32_attention(dtype, monkeypatch):
    """The vision tower's attention on the CPU (numpy in float32, MLX in query blocks otherwise) against
    the exact float32 attention, over segments of several blocks, the last one ragged: numpy's 2 workers
    in tiles of 21 queries by 40 keys, MLX in blocks of 14. MLX's blocks compute each query row as the one
    call does: the same bits."""
    monkeypatch.setattr(scheduling, "CORES", 2)
    q, k, v = random_qkv((2, 3, 100, 16), seed=2, dtype=dtype)
    ours = attention.segment_attention_in_blocks(
        q, k, v, 0.25, score_bytes=2 * 3 * 100 * 4 * 7, tile=(21, 40)
    )
    reference = attention.float32_attention(q, k, v, 0.25)
    if dtype == mx.float32:
        assert relative_max_diff(ours, reference) < float32_drift(100, largest_score(q, k, 0.25))
    else:
        np.testing.assert_array_equal(
            np.array(ours.astype(mx.float32)), np.array(reference.astype(mx.float32))
        )


def test_vision_attention_without_the_system_openblas(monkeypatch):
    """Where MLX has no system OpenBLAS (macOS, or none installed), the same tiles run one after another
    with numpy's products, and give the exact attention too."""
    monkeypatch.setattr(openblas, "loaded", None)
    q, k, v = random_qkv((2, 3, 300, 16), seed=5)
    ours = attention.segment_attention_in_blocks(q, k, v, 0.25, tile=(7, 120))
    reference = attention.float32_attention(q, k, v, 0.25)
    assert relative_max_diff(ours, reference) < float32_drift(300, largest_score(q, k, 0.25))


@pytest.mark.parametrize("tile", [(512, 1536), (64, 48)])
def test_vision_attention_of_scores_beyond_the_exponent_range(tile):
    """Scores of several hundred (float32's exponentials overflow beyond 88): the CPU's float32 path
    shifts such rows by their largest score, as the exact attention does, and gives its result; over
    several tiles of keys, by the largest so far, rescaling the earlier tiles' sums as it grows."""
    q, k, v = random_qkv((2, 2, 200, 16), seed=4)
    ours = attention.segment_attention_in_blocks(q, k, v, 10.0, tile=tile)
    reference = attention.float32_attention(q, k, v, 10.0)
    assert relative_max_diff(ours, reference) < float32_drift(200, largest_score(q, k, 10.0))


def random_attention_inputs(dtype, queries=37, keys=150, heads=4, kv_heads=2, seed=3):
    rng = np.random.default_rng(seed)
    shapes = [(1, heads, queries, 16), (1, kv_heads, keys, 16), (1, kv_heads, keys, 16)]
    return [mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype) for shape in shapes]


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("mask", ["none", "causal", "boolean", "additive"])
def test_key_blocked_attention_equals_float32_attention(dtype, mask):
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
    ours = attention.key_blocked_attention(q, k, v, 0.25, masks[mask], 4 * 37 * 16 * 4).astype(mx.float32)
    reference = attention.float32_attention(q, k, v, 0.25, masks[mask]).astype(mx.float32)
    if dtype == mx.float32:
        assert relative_max_diff(ours, reference) < float32_drift(150, largest_score(q, k, 0.25))
    else:
        assert np.abs(np.array(ours) - np.array(reference)).max() <= bfloat16_drift(reference)


def test_key_blocks_bound_the_scores_of_a_chunk_against_a_long_context():
    """512 bfloat16 queries against 8,192 keys: 64 MiB of float32 scores in one call; the decoder's
    attention on the CPU takes them in key blocks of 1 MiB of scores, and its peak stays within a few
    blocks and its accumulators, with the one call's result."""
    q, k, v = random_attention_inputs(mx.bfloat16, queries=512, keys=8192)
    mx.eval(q, k, v)
    budget = 2**20

    def peak(attend):
        mx.synchronize()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(attend())
        return mx.get_peak_memory() - base

    def decoders():  # as the decoder calls it
        return attention.decoder_attention(q, k, v, cache=None, scale=0.25, mask="causal", score_bytes=budget)

    def one_call():
        return attention.float32_attention(q, k, v, 0.25, "causal")

    accumulators = 3 * 4 * 512 * 16 * 4
    assert peak(one_call) > 4 * 512 * 8192 * 4
    assert peak(decoders) < 4 * budget + accumulators
    ours, reference = (np.array(attend().astype(mx.float32)) for attend in (decoders, one_call))
    assert np.abs(ours - reference).max() <= bfloat16_drift(reference)


@pytest.mark.parametrize("keys", [300, 2000])
@pytest.mark.parametrize("scale", [0.25, 10.0])
def test_a_float32_prompt_chunk_attends_with_numpy_in_bounded_tiles(keys, scale, monkeypatch):
    """A float32 prompt chunk of 300 queries after keys - 300 cached positions (grouped heads; causal, and
    without a mask as a single-row batch passes none) goes through numpy in tiles of 64 queries by 256
    keys, the scores held those of a tile per core (numpy's allocations, traced), with the one call's
    result; also with scores beyond float32's exponent range (scale 10: rows shifted tile by tile)."""
    q, k, v = random_attention_inputs(mx.float32, queries=300, keys=keys, seed=7)
    mx.eval(q, k, v)
    tile_bytes = 64 * 256 * 4
    calls, numpy_attention = [], attention.numpy_attention
    spy = lambda *args: calls.append(args[4]) or numpy_attention(*args)  # noqa: E731  (args[4]: causal)
    monkeypatch.setattr(attention, "numpy_attention", spy)
    for mask in ("causal", None):
        tracemalloc.start()
        ours = attention.decoder_attention(q, k, v, cache=None, scale=scale, mask=mask, tile=(64, 256))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        output = q.size * 4
        assert peak < scheduling.CORES * 2 * tile_bytes + 2 * output  # rows of 2,000 keys would need 4 tiles
        reference = attention.float32_attention(q, k, v, scale, mask)
        assert relative_max_diff(ours, reference) < float32_drift(keys, largest_score(q, k, scale))
    assert calls == [True, False]
