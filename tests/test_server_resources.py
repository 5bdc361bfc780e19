"""What a request can cost the server: nothing of a refused, finished or abandoned request stays in memory
but what the caches keep on purpose (the media reader's pixel rows, the store's KV caches), each bounded in
bytes; a client that gives up on an answer stops its decoding; stop strings are bounded in number and
length. Each fact is checked by what the server holds or did, never by how long it took."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from serving import wait_until_healthy
from test_server import (
    HANG,
    KEY,
    Server,
    answers_held,
    ask,
    data_url,
    idle,
    image_part,
    png,
    post,
    user,
)

from mlx_qwen3vl import Qwen3VLError, generate
from mlx_qwen3vl.markers import held_back
from mlx_qwen3vl.options import MAX_STOP_CHARS, MAX_STOPS
from mlx_qwen3vl.prefix_cache import PrefixCacheStore

ROOT = Path(__file__).resolve().parent.parent
# A tiny picture asked for at nearly the largest size there is: its pixel rows take about 400 MB.
HUGE = {"min_pixels": 16_776_192}
PAST_CONTEXT = 10**6  # max_tokens past the test model's context: refused once the turn is built


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    s = Server(tiny_checkpoint)
    yield s
    s.close()


def reader_of(server: Server):
    return server.server.config.app.state.media_reader


def pixel_bytes(reader) -> int:
    """The pixel rows the media reader holds, counted from its entries."""
    return sum(item.pixel_values.nbytes for item in reader.read.values())


def refused_image_request(seed: int) -> dict:
    """A request whose image is read before it is refused (its prompt plus max_tokens passes the
    model's context)."""
    image = image_part(data_url(png(seed, (32, 32))))
    return {"messages": [user(image, "What is it?")], "max_tokens": PAST_CONTEXT, "min_pixels": 512 * 512}


# ---- what the media reader keeps -------------------------------------------------------------------------


def test_refused_requests_leave_nothing_in_the_media_reader_or_the_store(server):
    reader, store = reader_of(server), server.engine.store
    held, stored = pixel_bytes(reader), [id(entry) for entry in store.entries]
    for seed in range(3):
        status, body = post(server, refused_image_request(seed))
        assert status == 400 and "exceeds the model's context" in body["error"]["message"], body
    assert pixel_bytes(reader) == held and [id(entry) for entry in store.entries] == stored
    assert reader.nbytes == pixel_bytes(reader)


def test_an_accepted_requests_images_are_kept_within_the_budget(server):
    """Kept once the engine took the turn and found again when resent; the least recently used out first
    past the budget, and one larger than the whole budget never kept."""
    reader = reader_of(server)

    def held() -> dict[str, int]:
        return {digest: id(item) for digest, item in reader.read.items()}

    def kept(seed: int) -> bool:
        return any(hashlib.sha256(png(seed)).hexdigest() in digest for digest in reader.read)

    messages = [user(image_part(data_url(png(11))), "What is it?")]
    first = ask(server, messages)
    assert kept(11) and reader.nbytes == pixel_bytes(reader) > 0
    before = held()
    assert ask(server, messages) == first and held() == before  # found, not read again

    size = next(item.pixel_values.nbytes for item in reader.read.values())  # every png() has this size
    budget = reader.max_bytes
    try:
        reader.max_bytes = 2 * size + size // 2  # room for two
        for seed in (12, 13):
            ask(server, [user(image_part(data_url(png(seed))), "What is it?")])
        assert [kept(seed) for seed in (11, 12, 13)] == [False, True, True]
        assert reader.nbytes == pixel_bytes(reader) <= reader.max_bytes
        reader.max_bytes = size - 1  # room for none
        ask(server, [user(image_part(data_url(png(14))), "What is it?")])
        assert not kept(14) and reader.nbytes == pixel_bytes(reader) <= reader.max_bytes
    finally:
        reader.max_bytes = budget


# ---- what the store of prefix caches keeps ---------------------------------------------------------------


class Held:
    """A prefix cache as the store sees it: its size and its keys (settling it on its turn changes
    neither)."""

    def __init__(self, name: str, nbytes: int):
        self.name, self.nbytes, self.offset, self.keys = name, nbytes, 1, [(ord(name), None)]

    def settle(self, turn, answer) -> None:
        pass

    def keep(self) -> None:
        pass


def give_back(store: PrefixCacheStore, cache: Held) -> None:
    store.give_back(cache, None, [])


def test_the_store_is_bounded_by_bytes_alone_and_keeps_no_cache_over_its_budget():
    store = PrefixCacheStore(None, max_bytes=1000)
    give_back(store, Held("a", 1500))
    assert store.entries == []
    for name in "bcdef":
        give_back(store, Held(name, 400))
    assert [e.name for e in store.entries] == ["e", "f"] and store.nbytes == 800
    nothing = PrefixCacheStore(None, max_bytes=0)  # (a server started with --cache-gb 0)
    give_back(nothing, Held("g", 1))
    assert nothing.entries == []


def test_the_store_has_no_entry_count_option():
    sys.path.insert(0, str(ROOT))
    import server as command

    with pytest.raises(SystemExit):
        command.parse_args(["--cache-entries", "-1"])
    assert command.parse_args(["--cache-gb", "0.5"]).cache_gb == 0.5


# ---- a client that gives up -----------------------------------------------------------------------------


def test_a_client_that_gives_up_on_a_whole_answer_stops_its_generation(server, tiny_f32):
    """A non-streamed request for 2,000 tokens whose client closes its connection once decoding began:
    the decoding stops (the cache it leaves holds far fewer tokens), and the server answers after."""
    question = "Recite every number you know."
    idle(server)
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    body = {"messages": [user(question)], "max_tokens": 2000, "temperature": 0}
    connection.request("POST", "/v1/chat/completions", body=json.dumps(body), headers=headers)
    deadline = time.monotonic() + HANG
    while not any(s.fed for s in server.engine.sequences):  # its answer has begun
        assert time.monotonic() < deadline, "the request was never decoded"
        time.sleep(0.01)
    connection.close()
    idle(server)
    held = answers_held(server, tiny_f32, question)
    assert held and max(held) < 2000, held
    assert ask(server, [user("Hi")]) == generate(*tiny_f32, "Hi", max_tokens=6, temperature=0)


# ---- stop strings ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stop, message",
    [
        (["a", "b", "c", "d", "e"], f"at most {MAX_STOPS} stop strings"),
        (["x" * (MAX_STOP_CHARS + 1)], f"at most {MAX_STOP_CHARS} characters"),
        ("y" * 2000, f"at most {MAX_STOP_CHARS} characters"),
    ],
    ids=["five", "too-long", "one-long-string"],
)
def test_too_many_or_too_long_stop_strings_are_refused(server, tiny_f32, stop, message):
    status, body = post(server, {"messages": [user("Hi")], "stop": stop})
    assert status == 400 and message in body["error"]["message"], body
    assert body["error"]["param"] == "stop"
    with pytest.raises(Qwen3VLError, match=message):  # the Python API refuses the same
        generate(*tiny_f32, "Hi", max_tokens=2, stop=stop)


def test_the_most_stop_strings_allowed_are_taken(server):
    stops = [chr(ord("a") + i) * MAX_STOP_CHARS for i in range(MAX_STOPS)]
    status, body = post(server, {"messages": [user("Hi")], "stop": stops, "max_tokens": 3})
    assert status == 200, body


def test_held_back_text_is_the_longest_tail_that_begins_a_stop_string():
    """markers.held_back looks only at the text's last characters; what it finds is the definition's:
    the longest k < len(marker) such that the text ends with the marker's first k characters."""

    def by_definition(text: str, markers) -> int:
        lengths = [
            k for m in markers for k in range(1, min(len(m) - 1, len(text)) + 1) if text.endswith(m[:k])
        ]
        return max(lengths, default=0)

    rng = random.Random(0)
    for _ in range(20_000):
        text = "".join(rng.choice("ab") for _ in range(rng.randint(0, 12)))
        markers = ["".join(rng.choice("abc") for _ in range(rng.randint(0, 6))) for _ in range(3)]
        assert held_back(text, markers) == by_definition(text, markers), (text, markers)


# ---- the whole process's memory -------------------------------------------------------------------------


def rss(pid: int) -> int:
    """A process's resident memory in bytes (Linux's /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads resident memory from /proc")
def test_refused_huge_images_leave_the_server_process_no_larger(tiny_checkpoint):
    """server.py in its own process: three requests whose tiny image is read at about 400 MB of pixel
    rows each and then refused leave its resident memory within 200 MB of where it was (each would
    otherwise keep its rows)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, str(ROOT / "server.py"), "--model", str(tiny_checkpoint), "--port", str(port)]
    process = subprocess.Popen(command, cwd=ROOT, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    try:
        wait_until_healthy(process, port, HANG)

        def send(body: dict) -> int:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=HANG)
            connection.request("POST", "/v1/chat/completions", body=json.dumps(body))
            response = connection.getresponse()
            response.read()
            return response.status

        def tiny(seed: int) -> dict:
            return image_part(data_url(png(seed, (16, 16))))

        assert send({"messages": [user(tiny(0), "What?")], "max_tokens": 2}) == 200
        before = rss(process.pid)
        for seed in range(1, 4):
            body = {"messages": [user(tiny(seed), "What?")], "max_tokens": PAST_CONTEXT, **HUGE}
            assert send(body) == 400
        grown = rss(process.pid) - before
        assert grown < 200 * 10**6, grown
    finally:
        process.terminate()
        process.wait(timeout=30)
