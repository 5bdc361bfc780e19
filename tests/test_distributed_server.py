"""server.py across two ranks (serving/lockstep.py), started as `mlx.launch --backend ring -n 2` starts
them (tests/test_distributed.py's `start_ranks`): rank 0 serves HTTP, rank 1 runs each of its engine's
steps. The official openai client must get what a single-process server answers: four requests at once
(an image among them, decoded together) and a conversation continued from the prompt cache, greedy. Then
the run ends as a user's would: in tensor mode rank 1 is killed during a streamed answer (rank 0 ends the
stream and exits with one line naming it); in pipeline mode a Ctrl-C reaches both ranks, as a terminal
sends it to every process of the launch, and both exit cleanly."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from terminal import LOAD_TIMEOUT
from test_distributed import LOST_RANK_SECONDS, RANKS, start_ranks
from test_server import KEY, Server, data_url, image_part, png, user

QUESTIONS = [
    [{"role": "user", "content": "Question number one?"}],
    [user(image_part(data_url(png(3))), "What is in the picture?")],
    [{"role": "user", "content": "Another question, a longer one, with more words in it?"}],
    [{"role": "user", "content": "Last one."}],
]
GREEDY = {"max_tokens": 8, "temperature": 0}


def answers(client: openai.OpenAI) -> list[str]:
    """The four questions at once, then the first conversation continued (its prefix from the cache)."""

    def ask(messages):
        reply = client.chat.completions.create(model="tiny", messages=messages, **GREEDY)
        return reply.choices[0].message.content

    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        first = list(pool.map(ask, QUESTIONS))
    continued = QUESTIONS[0] + [{"role": "assistant", "content": first[0]}, user("And then?")]
    return first + [ask(continued)]


@pytest.fixture(scope="module")
def single_process(tiny_checkpoint) -> list[str]:
    server = Server(tiny_checkpoint)
    try:
        return answers(server.client)
    finally:
        server.close()


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


def wait_until_serving(ranks: list[subprocess.Popen], url: str) -> None:
    deadline = time.monotonic() + LOAD_TIMEOUT
    while time.monotonic() < deadline:
        for r, rank in enumerate(ranks):
            assert rank.poll() is None, f"rank {r} exited: {rank.stderr.read().decode()[-3000:]}"
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        time.sleep(0.2)
    pytest.fail("the server did not start")


def own_lines(rank: subprocess.Popen) -> list[str]:
    """A rank's standard error without uvicorn's log and MLX's ring backend's own reports."""
    text = rank.stderr.read().decode()
    return [line for line in text.splitlines() if not line.startswith(("INFO:", "[ring]"))]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
def test_the_server_across_ranks_answers_as_one_process(mode, tiny_checkpoint, single_process, tmp_path):
    port = free_port()
    command = [sys.executable, "server.py", "--model", str(tiny_checkpoint), "--dtype", "float32"]
    command += ["--port", str(port), "--api-key", KEY] + (["--pipeline"] if mode == "pipeline" else [])
    ranks = start_ranks(command, tmp_path, [subprocess.PIPE] * RANKS)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(ranks, url)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=LOAD_TIMEOUT)
        assert answers(client) == single_process
        if mode == "tensor":
            stream = client.chat.completions.create(
                model="tiny", messages=QUESTIONS[0], max_tokens=100000, temperature=0, stream=True
            )
            assert next(iter(stream)).choices, "no answer began"
            ranks[1].send_signal(signal.SIGKILL)
            killed = time.monotonic()
            with pytest.raises((openai.APIError, openai.APIConnectionError)):
                for _ in stream:  # the stream ends with the engine's error, or its connection drops
                    pass
            ranks[0].wait(timeout=LOST_RANK_SECONDS)
            assert time.monotonic() - killed <= LOST_RANK_SECONDS
            expected = [1]
        else:
            for rank in ranks:
                rank.send_signal(signal.SIGINT)
            for rank in ranks:
                rank.wait(timeout=LOST_RANK_SECONDS)
            expected = [0, 0]
    finally:
        for rank in ranks:
            rank.kill()
            rank.wait()
    assert [rank.returncode for rank in ranks[: len(expected)]] == expected
    lines = own_lines(ranks[0])
    assert not any("Traceback" in line for line in lines), "\n".join(lines)
    if mode == "tensor":
        lost = "rank 0: lost the connection to rank 1 (it stopped or cannot be reached); exiting"
        assert lines[-1] == f"server.py: error: {lost}"
    else:
        assert own_lines(ranks[1]) == []
