"""The GPU path's graphs at the real 4B widths and depth, counted on any machine (bench/graph.py: every
fused kernel one node, as on a GPU): each node of a decode step is a kernel launch there, and a 4B decode
step is launch-bound before it is bandwidth-bound."""

import sys
from pathlib import Path

import pytest
from checkpoints import published_config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import graph  # noqa: E402

LAYERS = 36


@pytest.fixture(scope="module")
def config() -> dict:
    return published_config()


def test_counting_gives_the_figure_measured_on_a_gpu(config):
    """mlx-lm's 4-bit Qwen3 decoder at the 4B dimensions: 1,054 nodes per step measured on an H200."""
    assert graph.mlx_lm_decode_step(graph.mlx_lm(config, bits=4))[0] == 1054


@pytest.mark.parametrize("bits", [4, None], ids=["4-bit", "bfloat16"])
def test_a_decode_step_has_at_most_0_8x_the_nodes_of_mlx_lms(config, bits):
    ours, kinds = graph.ours_decode_step(graph.ours(config, bits))
    theirs, _ = graph.mlx_lm_decode_step(graph.mlx_lm(config, bits))
    print(f"decode step: {ours} nodes, mlx-lm {theirs} ({ours / theirs:.2f}x): {kinds}")
    assert ours <= 0.8 * theirs
    assert ours <= (802 if bits else 1232)  # no more than when this test was written
    # Text positions take the fused rope, one node for q and one for k per layer; no per-step
    # Concatenate, Broadcast, Full or AsType nodes.
    assert kinds["RoPE"] == 2 * LAYERS and kinds["ScaledDotProductAttention"] == LAYERS
    assert not {"Concatenate", "Broadcast", "Full", "AsType"} & kinds.keys()
    # q/k/v and gate/up fused: 4 matmuls per layer, and the vocabulary projection.
    assert kinds["QuantizedMatmul" if bits else "Matmul"] == 4 * LAYERS + 1


@pytest.mark.parametrize("grid", [(1, 48, 64), (8, 20, 28)], ids=["1024x768 image", "16-frame video"])
def test_the_vision_tower_graph_stays_small(config, grid):
    """24 blocks at the 4B widths: whatever the medium, ~38 nodes a block plus the embeddings and the
    four mergers (mlx-vlm's tower: 2,058 nodes for the image, 2,328 for the video, counted the same
    way). The segments of a video run as one batched attention: one kernel per block."""
    nodes, kinds = graph.ours_vision(graph.ours(config, bits=4), grid)
    print(f"vision tower {grid}: {nodes} nodes: {kinds}")
    assert nodes <= 1014
    assert kinds["ScaledDotProductAttention"] == 24 and kinds["LayerNorm"] == 2 * 24 + 4
