"""The decoder's quantized linear layer: on the CPU, float32 inputs of many rows go through a dequantized
BLAS product (mlx_qwen3vl/quantized.py); it must give the quantized kernel's numbers, in blocks that
bound the memory, and leave one-row (decode) calls to the kernel."""

from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_qwen3vl import quantized
from mlx_qwen3vl.language import MLP
from mlx_qwen3vl.quantized import BLAS_MIN_ROWS, Linear, QuantizedLinear


@pytest.fixture(autouse=True)
def blas_path(monkeypatch):
    """The path is the CPU's, and its numbers and memory do not depend on the BLAS being fast: test it
    on the CPU device, with the path enabled, on any machine."""
    monkeypatch.setattr(quantized, "FAST_BLAS", True)
    device = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(device)


def quantized_layer(in_dims: int, out_dims: int, bias: bool, bits: int = 4, seed: int = 0) -> QuantizedLinear:
    mx.random.seed(seed)
    layer = Linear(in_dims, out_dims, bias=bias)
    layer.weight = layer.weight.astype(mx.bfloat16)
    q = layer.to_quantized(group_size=64, bits=bits)
    mx.eval(q.parameters())
    return q


def kernel(layer: QuantizedLinear, x: mx.array) -> mx.array:
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


def test_quantizing_the_decoder_gives_this_layer():
    """nn.quantize (the converter's and the loader's path) turns the decoder's Linear into this layer."""
    mlp = MLP(SimpleNamespace(hidden_size=128, intermediate_size=256))
    nn.quantize(mlp, group_size=64, bits=4)
    assert all(type(m) is QuantizedLinear for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
