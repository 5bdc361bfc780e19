"""Qwen3-VL across processes on MLX's distributed layer (docs/distributed.md): two ranks of a ring on
this machine, talking over localhost. chat.py runs under `mlx.launch --backend ring -n 2` itself; the
other tests start the ranks as it does (`start_ranks`). Every start costs two Python processes, so each
test bundles its checks into one (tests/distributed_worker.py runs them on every rank).

The comparison is with one process running the whole model: float32 logits within 1e-5 of their scale
(the ranks' partial sums are added in another order than one matmul adds them: a few float32 roundings)
and the same greedy tokens. One process's model is compared with transformers by the other test files.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import distributed_worker as worker
import media
import numpy as np
import pytest
from checkpoints import TINY, TINY_MOE, build_checkpoint
from safetensors import safe_open
from terminal import GREEDY, LOAD_TIMEOUT, ROOT

from mlx_qwen3vl import Qwen3VLError, generate, load
from mlx_qwen3vl.convert import convert
from mlx_qwen3vl.distributed.start import JOIN_SECONDS_VARIABLE
from mlx_qwen3vl.distributed.tensor import HeadSplit

MLX_LAUNCH = Path(sys.executable).parent / "mlx.launch"
WORKER = Path(__file__).parent / "distributed_worker.py"
RANKS = 2
# The float32 bound, relative to the largest logit (module docstring).
TOLERANCE = 1e-5
# A rank whose peer is gone must say so and exit within this many seconds.
LOST_RANK_SECONDS = 10
# How long the rank whose peer never starts waits for it (MLX_QWEN3VL_JOIN_SECONDS).
JOIN_SECONDS = "2"
# A rank's resident parameters against the split docs/distributed.md states.
RESIDENT_BOUND = 0.05
# The bytes a rank reads from the weight files against its share of the stored tensors: beyond them it
# reads the files' headers and config.json, and tensors split by columns into runs shorter than a memory
# page are read whole (docs/distributed.md).
READ_BOUND = 0.05


def free_ports(count: int) -> int:
    """The first of `count` consecutive free ports on localhost (mlx.launch takes one per rank)."""
    for _ in range(100):
        with socket.create_server(("127.0.0.1", 0)) as first:
            start = first.getsockname()[1]
            try:
                others = [socket.create_server(("127.0.0.1", start + i)) for i in range(1, count)]
            except OSError:
                continue
            for s in others:
                s.close()
            return start
    raise RuntimeError("no free ports")


# A test run started in the background (`pytest &`, or a harness's background job) ignores SIGINT, and an
# ignored signal stays ignored across exec: a rank would never see a Ctrl-C. Ranks start as from a
# terminal: this restores the default, then becomes the command.
CTRL_C_AS_FROM_A_TERMINAL = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


def start_ranks(
    command: list[str], folder: Path, outputs: list, started: int = RANKS, **variables: str
) -> list[subprocess.Popen]:
    """The ranks of a ring on localhost, started as `mlx.launch --backend ring` starts them (each with
    MLX_RANK and a hostfile of one port per rank in MLX_HOSTFILE), without the launcher: its I/O loop
    polls without pause (a third of a core for the whole run), and it stops the other ranks itself when
    one fails. outputs[r]: rank r's standard output and error. Only the first `started` ranks are
    started, with `variables` added to their environment."""
    port = free_ports(RANKS)
    hostfile = folder / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port + r}"] for r in range(RANKS)]))
    environment = {**os.environ, "MLX_HOSTFILE": str(hostfile), "TOKENIZERS_PARALLELISM": "false"}
    return [
        subprocess.Popen(
            [sys.executable, "-c", CTRL_C_AS_FROM_A_TERMINAL, *command],
            cwd=ROOT,
            env={**environment, **variables, "MLX_RANK": str(r)},
            stdout=outputs[r],
            stderr=outputs[r],
        )
        for r in range(started)
    ]


def run_ranks(command: list[str], folder: Path) -> None:
    """Every rank run to its end; the test fails with a rank's output if any exits with an error."""
    logs = [folder / f"rank{r}.log" for r in range(RANKS)]
    with contextlib.ExitStack() as files:
        ranks = start_ranks(command, folder, [files.enter_context(log.open("w")) for log in logs])
        try:
            codes = [rank.wait(timeout=LOAD_TIMEOUT) for rank in ranks]
        finally:
            for rank in ranks:
                rank.kill()
    for code, log in zip(codes, logs, strict=True):
        assert code == 0, log.read_text()[-3000:]


def launch(*command: str, timeout: float = LOAD_TIMEOUT) -> subprocess.CompletedProcess:
    """`mlx.launch --backend ring -n 2` of a Python script from the checkout's root."""
    return subprocess.run(
        [str(MLX_LAUNCH), "--backend", "ring", "-n", str(RANKS), "--starting-port", str(free_ports(RANKS))]
        + ["--python", sys.executable, *command],
        cwd=ROOT,
        capture_output=True,
        encoding="utf-8",
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"},
    )


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint, checkpoint_root) -> dict[str, Path]:
    """Dense with a tied head and 2 KV heads (one per rank); dense with an untied head and one KV head
    (replicated on both ranks); the MoE (untied); 4-bit conversions of the tied dense model and of the
    MoE (groups of 32: its experts' 192 columns split into 96 a rank)."""
    untied_kv1 = {
        **TINY,
        "tie_word_embeddings": False,
        "text_config": {**TINY["text_config"], "num_key_value_heads": 1, "tie_word_embeddings": False},
    }
    moe = build_checkpoint(checkpoint_root / "distributed-moe", TINY_MOE)
    return {
        "dense tied": tiny_checkpoint,
        "dense untied, 1 KV head": build_checkpoint(checkpoint_root / "distributed-untied-kv1", untied_kv1),
        "moe": moe,
        "dense tied 4-bit": convert(
            tiny_checkpoint, checkpoint_root / "distributed-q4", q_bits=4, progress=False
        ),
        "moe 4-bit": convert(
            moe, checkpoint_root / "distributed-moe-q4", q_bits=4, q_group_size=32, progress=False
        ),
    }


# The checkpoint each mode's run starts with (it answers every kind of prompt, distributed_worker.py).
FIRST = "dense tied"


@pytest.fixture(scope="module")
def one_process(checkpoints, picture) -> dict[str, dict]:
    """What the whole model in this process gives for what the worker runs, and the bytes each rank of
    each mode should hold (the split docs/distributed.md states)."""
    found = {}
    for name, path in checkpoints.items():
        model, processor = load(path, dtype="float32")
        found[name] = {
            "logits": worker.logits_of(model, processor, name == FIRST),
            "tokens": worker.chat_tokens(model, processor, str(picture)),
            "bytes": {
                mode: [worker.expected_rank_bytes(model, RANKS, r, mode == "pipeline") for r in range(RANKS)]
                for mode in ("tensor", "pipeline")
            },
            "read": {
                mode: [expected_read_bytes(path, model.config, r, mode == "pipeline") for r in range(RANKS)]
                for mode in ("tensor", "pipeline")
            },
        }
    return found


# Bytes per element of safetensors' dtypes in the test checkpoints.
STORED_SIZES = {"F32": 4, "BF16": 2, "F16": 2, "U32": 4}


def expected_read_bytes(path: Path, config, rank: int, pipeline: bool) -> int:
    """The bytes of a checkpoint's stored tensors that rank `rank` holds by the stated split: what it
    should read from the weight files."""
    total = 0.0
    for file in path.glob("*.safetensors"):
        with safe_open(file, framework="numpy") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no iteration)
                tensor = f.get_slice(name)
                size = np.prod(tensor.get_shape()) * STORED_SIZES[tensor.get_dtype()]
                total += size * worker.rank_share(name, config, RANKS, rank, pipeline)
    return int(total)


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("distributed") / "picture.png"
    media.picture(64, 48, seed=0).save(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
def test_distributed_model_matches_one_process(mode, checkpoints, one_process, picture, tmp_path):
    """Per checkpoint, from one start of the ranks: the logits at the end of a text and an image + video
    prompt (for the first, also of an image alone and a video alone), a greedy two-turn chat with an
    image (the second turn continues the cache), each rank's resident bytes and the bytes it read from
    the weight files; then directories that differ across ranks, refused at load on every rank.
    Pipeline mode moves whole layers, whatever they hold: the tied dense model (DeepStack features added
    on both ranks) and the 4-bit MoE (quantized experts, an untied head) stand for the others."""
    names = list(checkpoints) if mode == "tensor" else [FIRST, "moe 4-bit"]
    assert names[0] == FIRST
    out = tmp_path / "results.json"
    other = checkpoints["dense untied, 1 KV head"]
    paths = [str(checkpoints[name]) for name in names]
    run_ranks([sys.executable, str(WORKER), str(out), str(picture), str(other), mode, *paths], tmp_path)
    results = json.loads(out.read_text())
    logits = np.load(out.with_suffix(".npz"))
    for n, name in enumerate(names):
        expected, found = one_process[name], results["checkpoints"][str(checkpoints[name])]
        for prompt, single in expected["logits"].items():
            difference = np.abs(logits[f"{n}/{prompt}"] - single).max()
            assert difference <= TOLERANCE * np.abs(single).max(), (name, prompt, difference)
        assert found["tokens"] == expected["tokens"], name
        assert all(len(tokens) == worker.GREEDY_TOKENS for tokens in found["tokens"]), name
        splits = expected["bytes"][mode]
        for rank, (resident, split) in enumerate(zip(found["resident"], splits, strict=True)):
            assert abs(resident - split) <= RESIDENT_BOUND * split, (name, rank, resident, split)
        shares = expected["read"][mode]
        for rank, (read, share) in enumerate(zip(found["read"], shares, strict=True)):
            assert abs(read - share) <= READ_BOUND * share, (name, rank, read, share)
    assert "rank 1's model directory has another config.json than rank 0's" in results["mismatch"]


@pytest.mark.slow
def test_chat_under_mlx_launch_prints_what_one_process_prints(tiny_checkpoint, tiny_f32):
    result = launch("chat.py", "--model", str(tiny_checkpoint), "--prompt", "Hi", *GREEDY)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == generate(*tiny_f32, "Hi", max_tokens=5, temperature=0) + "\n"


@pytest.mark.slow
def test_a_lost_or_unreachable_rank_ends_the_other_with_one_line(tiny_checkpoint, tmp_path):
    """Two ranks of chat.py started as mlx.launch starts them (its environment, without the launcher,
    which would stop the survivor itself); rank 1 killed while rank 0 prints its answer. Meanwhile, rank 0
    of another ring whose rank 1 is never started (MLX's ring would wait for it without end)."""
    command = [sys.executable, "chat.py", "--model", str(tiny_checkpoint), "--prompt", "Hi"]
    command += ["--max-tokens", "100000", "--temperature", "0"]
    (tmp_path / "alone").mkdir()
    alone = start_ranks(
        command, tmp_path / "alone", [subprocess.PIPE], started=1, **{JOIN_SECONDS_VARIABLE: JOIN_SECONDS}
    )[0]
    ranks = start_ranks(command, tmp_path, [subprocess.PIPE] * RANKS)
    try:
        readable, _, _ = select.select([ranks[0].stdout], [], [], LOAD_TIMEOUT)
        assert readable and ranks[0].stdout.read(1), "rank 0 printed no answer"
        ranks[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        ranks[0].wait(timeout=LOST_RANK_SECONDS)
        assert time.monotonic() - killed <= LOST_RANK_SECONDS
    finally:
        for rank in ranks:
            rank.kill()
            rank.wait()
    assert ranks[0].returncode == 1
    # Lines of our own: MLX's ring backend reports each failed socket operation on stderr itself.
    lines = [line for line in ranks[0].stderr.read().decode().splitlines() if not line.startswith("[ring]")]
    assert (
        lines[-1]
        == "chat.py: error: rank 0: lost the connection to rank 1 (it stopped or cannot be reached); exiting"
    )
    assert sum("lost the connection" in line for line in lines) == 1
    try:
        assert alone.wait(timeout=LOAD_TIMEOUT) == 2
    finally:
        alone.kill()
    lines = [line for line in alone.stderr.read().decode().splitlines() if not line.startswith("[ring]")]
    assert lines == [
        f"chat.py: error: rank 0: rank 1 did not join within {JOIN_SECONDS} s (not started, or its address "
        "in the hostfile cannot be reached); exiting"
    ]


@pytest.mark.slow
def test_ctrl_c_during_an_answer_ends_every_rank_as_one_process(tiny_checkpoint, tmp_path):
    """Two ranks of chat.py answering; Ctrl-C reaches rank 1 (which leaves the decision to rank 0 and
    goes on), then rank 0, as the terminal's Ctrl-C reaches the ranks of mlx.launch's machine (or rank 0
    alone, the others being elsewhere): every rank stops the answer at the same token and ends as one
    process does, with status 130 and no traceback."""
    command = [sys.executable, "chat.py", "--model", str(tiny_checkpoint), "--prompt", "Hi"]
    command += ["--max-tokens", "100000", "--temperature", "0"]
    ranks = start_ranks(command, tmp_path, [subprocess.PIPE] * RANKS)
    try:
        readable, _, _ = select.select([ranks[0].stdout], [], [], LOAD_TIMEOUT)
        assert readable and ranks[0].stdout.read(1), "rank 0 printed no answer"
        ranks[1].send_signal(signal.SIGINT)
        # Rank 1 still answering a moment later: had it stopped, rank 0 would lose it at its next step.
        time.sleep(1)
        assert ranks[1].poll() is None, ranks[1].stderr.read().decode()[-3000:]
        ranks[0].send_signal(signal.SIGINT)
        codes = []
        for rank in ranks:
            with contextlib.suppress(subprocess.TimeoutExpired):
                rank.wait(timeout=LOST_RANK_SECONDS)
            codes.append(rank.returncode)  # None: still running (its output below says where)
    finally:
        for rank in ranks:
            rank.kill()
            rank.wait()
    errors = [rank.stderr.read().decode()[-3000:] for rank in ranks]
    assert codes == [130, 130], errors
    assert not any("Traceback" in error for error in errors), errors


@pytest.mark.parametrize(
    "heads, kv_heads, ranks, rank, expected",
    [
        (32, 8, 2, 1, HeadSplit(q_start=16, q_heads=16, kv_start=4, kv_heads=4)),  # the 4B's
        (4, 1, 2, 1, HeadSplit(q_start=2, q_heads=2, kv_start=0, kv_heads=1)),  # one KV head, replicated
        (64, 4, 8, 5, HeadSplit(q_start=40, q_heads=8, kv_start=2, kv_heads=1)),  # 235B: 4 KV heads, 8 ranks
    ],
)
def test_head_split(heads, kv_heads, ranks, rank, expected):
    """A rank's query heads read only its KV heads: query head i reads KV head i // (heads / kv_heads)."""
    config = SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv_heads)
    split = HeadSplit.of(config, ranks, rank)
    assert split == expected
    group = heads // kv_heads
    assert split.q_start // group >= split.kv_start
    assert (split.q_start + split.q_heads - 1) // group < split.kv_start + split.kv_heads


@pytest.mark.parametrize(
    "heads, kv_heads, ranks, message",
    [
        (6, 2, 4, "6 attention heads cannot be split evenly over 4 ranks"),
        (12, 3, 2, "3 KV heads can neither be split over 2 ranks nor replicated evenly"),
    ],
)
def test_a_model_that_cannot_be_split_is_refused_with_its_numbers(heads, kv_heads, ranks, message):
    config = SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv_heads)
    with pytest.raises(Qwen3VLError, match=message):
        HeadSplit.of(config, ranks, 0)
