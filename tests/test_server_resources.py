"""What a request can cost the server: stop strings are bounded in number and length. Each fact is
checked by what the server holds or did, never by how long it took."""

from __future__ import annotations

import random

import pytest
from test_server import Server, post, user

from mlx_qwen3vl import Qwen3VLError, generate
from mlx_qwen3vl.markers import held_back
from mlx_qwen3vl.options import MAX_STOP_CHARS, MAX_STOPS


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    s = Server(tiny_checkpoint)
    yield s
    s.close()


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
