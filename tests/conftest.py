"""Shared fixtures: random-weight checkpoints written by transformers' own `save_pretrained` next to the
real Qwen3-VL-4B-Instruct config, tokenizer and preprocessing files (vendored in tests/data), and the
transformers reference model loaded from the same files.

torch and transformers are imported unconditionally: a missing reference fails the run, never skips it.

Tests marked `slow` (the real widths, a 32K prompt, separate chat.py / convert.py / mlx-vlm processes,
memory measurements, soaks) run with the others; `python -m pytest -m "not slow"` leaves them out for a
quick check of a change.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import mlx_qwen3vl  # noqa: F401  (first: loads the system OpenBLAS before mlx.core, see cpu/openblas.py)

sys.path.insert(0, str(Path(__file__).parent))

import media  # noqa: E402
from checkpoints import THINKING_TEMPLATE, TINY, build_checkpoint, reference_model  # noqa: E402
from prompts import make_prompts  # noqa: E402
from terminal import Terminal  # noqa: E402

torch.set_num_threads(2)


# The two test processes take whole files (`--dist loadfile`), each the next file in collection order
# when it is done with its own. The longest files are collected first, so that neither process is left
# with one of them while the other has finished (`python -m pytest --durations=0` shows the times); the
# other files keep their order.
LONGEST_FIRST = ("test_full_width.py", "test_convert.py", "test_distributed.py", "test_check.py")


def pytest_collection_modifyitems(items) -> None:
    place = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: place.get(item.path.name, len(place)))


@pytest.fixture(scope="session")
def checkpoint_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def tiny_checkpoint(checkpoint_root) -> Path:
    """A 4-layer text / 4-block vision model with three DeepStack taps, saved in bfloat16 and sharded
    (so the index file is exercised), tied embeddings like the 2B/4B models."""
    return build_checkpoint(checkpoint_root / "tiny", TINY, max_shard_size="20MB")


@pytest.fixture(scope="session")
def tiny_f32(tiny_checkpoint):
    """Our model and processor on the tiny checkpoint, in float32."""
    from mlx_qwen3vl import load

    return load(tiny_checkpoint, dtype="float32")


@pytest.fixture(scope="session")
def tiny_thinking(tiny_checkpoint, checkpoint_root) -> Path:
    """The tiny checkpoint as a Thinking model: the same files (weights linked), with the Qwen3-VL
    Thinking chat template (tests/data/qwen3-vl-thinking) in place of the Instruct one."""
    target = checkpoint_root / "tiny-thinking"
    target.mkdir()
    for file in tiny_checkpoint.iterdir():
        (target / file.name).symlink_to(file)
    (target / "chat_template.json").unlink()
    shutil.copy(THINKING_TEMPLATE, target / "chat_template.json")
    return target


@pytest.fixture(scope="session")
def thinking_f32(tiny_thinking):
    """Our model and processor on the Thinking variant of the tiny checkpoint, in float32."""
    from mlx_qwen3vl import load

    return load(tiny_thinking, dtype="float32")


@pytest.fixture(scope="session")
def tiny_gpu_path(tiny_checkpoint):
    """The model as MLX's GPU backends run it (no CPU specialisations: fused projections, fused rope,
    MLX's fused attention), here on the CPU, in float32."""
    from mlx_qwen3vl import load

    return load(tiny_checkpoint, dtype="float32", backend="gpu")


@pytest.fixture(scope="session")
def tiny_reference(tiny_checkpoint):
    return reference_model(tiny_checkpoint, torch.float32)


@pytest.fixture(scope="session")
def prompts(tiny_f32):
    return make_prompts(tiny_f32[1].tokenizer)


@pytest.fixture(scope="session")
def reference_logits(tiny_reference, prompts) -> dict:
    """transformers' float32 logits for every prompt, computed once per run."""
    with torch.no_grad():
        return {name: tiny_reference(**p.torch_inputs()).logits.numpy() for name, p in prompts.items()}


@pytest.fixture(scope="session")
def qwen_vl_utils():
    """qwen-vl-utils' vision_process, the reference for sizing and frame sampling (media.qwen_vl_utils)."""
    return media.qwen_vl_utils()


@pytest.fixture
def red_image(tmp_path) -> Path:
    path = tmp_path / "red.png"
    Image.new("RGB", (64, 48), (220, 30, 30)).save(path)
    return path


@pytest.fixture
def terminal(tmp_path):
    """Start chat.py on a pseudo-terminal (tests/terminal.py); whatever still runs at the end is killed."""
    started = []

    def start(*args: str) -> Terminal:
        started.append(Terminal(args, tmp_path))
        return started[-1]

    yield start
    for t in started:
        t.close()
