"""server.py's API as clients use it: the official `openai` client against a server on a free port with
the test checkpoint, answers compared with the package's own `generate` (greedy, the same tokens), the
prompt cache across requests, concurrent requests, and every kind of bad request answered with OpenAI's
error shape and a 4xx status while the server goes on."""

from __future__ import annotations

import base64
import http.client
import http.server
import json
import re
import socket
import socketserver
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import openai
import pytest
import uvicorn
from compare import LOGPROB
from media import picture, png_bytes, write_video
from mlx_lm.models.cache import QuantizedKVCache
from scripted import say

from mlx_qwen3vl import ChatSession, generate, load, stream_generate
from mlx_qwen3vl.messages import normalize_messages
from mlx_qwen3vl.options import KVCacheOptions
from mlx_qwen3vl.serving.app import create_app
from mlx_qwen3vl.serving.engine import Engine
from mlx_qwen3vl.serving.media import MediaPolicy

KEY = "test-key"
GREEDY = {"max_tokens": 6, "temperature": 0}
HANG = 300  # seconds: a bound on waits, so that a hang fails; far above what any wait here takes


class Server:
    """create_app + uvicorn in a thread of this process, so tests can look at the engine."""

    def __init__(self, checkpoint: Path, engine_options: dict | None = None, access=None, **policy):
        model, processor = load(checkpoint, dtype="float32")
        self.engine = Engine(model, processor, **(engine_options or {}))
        self.engine.start()
        # A socket bound here to a port the system picks: no other process can take the port meanwhile.
        listening = socket.create_server(("127.0.0.1", 0))
        self.port = listening.getsockname()[1]
        app = create_app(self.engine, "tiny", api_key=KEY, policy=MediaPolicy(**policy), access=access)
        config = uvicorn.Config(app, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [listening]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + HANG
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=120)

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.engine.stop()


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    # Private URLs allowed: the media tests fetch from a web server of their own on the loopback address.
    s = Server(
        tiny_checkpoint, connect_timeout=1.0, total_timeout=2.0, max_bytes=2_000_000, allow_private_urls=True
    )
    yield s
    s.close()


@pytest.fixture(scope="module")
def local(tiny_checkpoint):
    """The package in this process, for the expected answers."""
    return load(tiny_checkpoint, dtype="float32")


def png(seed: int, size=(96, 64)) -> bytes:
    return png_bytes(picture(*size, seed))


def data_url(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def ask(server, messages, **options) -> str:
    response = server.client.chat.completions.create(model="tiny", messages=messages, **(GREEDY | options))
    return response.choices[0].message.content


def user(*parts) -> dict:
    content = [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]
    return {"role": "user", "content": content}


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


class Files(http.server.SimpleHTTPRequestHandler):
    """A local web server for the media tests: files of a folder, a path that never answers while the
    tests run (the server under test gives up after its own time limit), a redirect loop."""

    stalled = threading.Event()  # set when the tests are done, to let a stalled answer go

    def do_GET(self):
        if self.path.startswith("/slow"):
            self.stalled.wait(HANG)
        if self.path.startswith("/loop"):
            self.send_response(302)
            self.send_header("Location", self.path + "x")
            self.end_headers()
            return
        super().do_GET()

    def log_message(self, *args):
        pass

    def handle(self):
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):  # the server stopped reading: as it should
            pass


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    folder = tmp_path_factory.mktemp("web")
    (folder / "cat.png").write_bytes(png(3))
    (folder / "big.bin").write_bytes(b"\0" * 3_000_000)
    (folder / "notes.txt").write_text("not an image")
    handler = lambda *a, **k: Files(*a, directory=str(folder), **k)  # noqa: E731
    httpd = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", folder
    Files.stalled.set()
    httpd.shutdown()


# ---- answers ------------------------------------------------------------------------------------------


def test_health_models_and_the_api_key(server):
    assert call(server, "GET", "/health", key=None) == (200, {"status": "ok"})
    assert [m.id for m in server.client.models.list().data] == ["tiny"]
    status, body = call(server, "POST", "/v1/chat/completions", b'{"messages": []}', key=None)
    assert status == 401 and body["error"]["type"] == "authentication_error"


def test_text_answers_equal_the_package_streamed_or_not(server, local):
    expected = generate(*local, "Hi there", **GREEDY)
    assert ask(server, [{"role": "user", "content": "Hi there"}]) == expected
    stream = server.client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hi there"}],
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-1].usage.prompt_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_logprobs_streamed_or_not_equal_the_package(server, local):
    messages = [{"role": "user", "content": "Tell me a story."}]
    options = GREEDY | {"max_tokens": 12}
    expected = [r.logprobs for r in stream_generate(*local, messages, logprobs=3, **options) if r.logprobs]
    response = server.client.chat.completions.create(
        model="tiny", messages=messages, logprobs=True, top_logprobs=3, **options
    )
    content = response.choices[0].logprobs.content
    assert len(content) == len(expected) == 12
    for item, entry in zip(content, expected, strict=True):
        assert abs(item.logprob - entry.logprob) < LOGPROB
        assert [t.logprob for t in item.top_logprobs] == pytest.approx(
            [lp for _, lp in entry.top], rel=0, abs=LOGPROB
        )
        assert item.token == bytes(item.bytes).decode("utf-8", "replace")
        assert item.top_logprobs[0].bytes == list(local[1].tokenizer.decode([entry.top[0][0]]).encode())
    # The tokens' bytes, joined, are the answer.
    assert b"".join(bytes(item.bytes) for item in content).decode() == response.choices[0].message.content
    stream = server.client.chat.completions.create(
        model="tiny", messages=messages, logprobs=True, top_logprobs=3, stream=True, **options
    )
    streamed = [
        item for c in stream if c.choices and c.choices[0].logprobs for item in c.choices[0].logprobs.content
    ]
    assert [i.token for i in streamed] == [i.token for i in content]
    # (this one continues from the cache the first left: the same numbers but for rounding)
    assert [i.logprob for i in streamed] == pytest.approx([i.logprob for i in content], rel=0, abs=LOGPROB)
    without = server.client.chat.completions.create(model="tiny", messages=messages, **options)
    assert without.choices[0].logprobs is None


def test_images_by_data_url_and_http_url(server, local, web):
    url, folder = web
    expected = generate(
        *local,
        [user(image_part("x"), "What is it?")][0]["content"]
        and [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
        images=[png(3)],
        **GREEDY,
    )
    for source in (data_url(png(3)), f"{url}/cat.png"):
        response = server.client.chat.completions.create(
            model="tiny", messages=[user(image_part(source), "What is it?")], **GREEDY
        )
        assert response.choices[0].message.content == expected
        assert response.usage.prompt_tokens > 24  # the image's tokens are counted


def test_a_video_by_data_url(server, local, tmp_path):
    path = write_video(tmp_path / "clip.avi", frames=16)
    expected = generate(*local, "What happens?", videos=[path], **GREEDY)
    part = {"type": "video_url", "video_url": {"url": data_url(Path(path).read_bytes(), "video/x-msvideo")}}
    assert ask(server, [user(part, "What happens?")]) == expected


def test_a_conversation_continues_from_the_cache_with_the_same_answer(server, local):
    """Each turn resends the whole conversation: the image and earlier turns come from the KV cache
    (neither decoded nor encoded again), and the answers are those computed without any cache."""
    image = data_url(png(5, (160, 96)))
    messages = [user(image_part(image), "Describe it.")]
    first = ask(server, messages)
    messages += [{"role": "assistant", "content": first}, user("And the colours?")]
    second = ask(server, messages)
    assert server.engine.reused > 60  # the first turn's prompt, image included
    fresh_messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "And the colours?"},
    ]
    assert second == generate(*local, fresh_messages, images=[png(5, (160, 96))], **GREEDY)


def test_a_chat_session_and_a_server_conversation_continue_the_same_prefix(server, local, monkeypatch):
    """One conversation through `ChatSession` and through the server, which receives it whole each turn:
    the second turn continues the same prefix of the same prompt and answers with the same tokens. (The
    first answer is scripted text, so that the client's copy of it tokenizes as the model wrote it.)"""
    image = png(7, (128, 96))
    session = ChatSession(*local, max_tokens=6, temperature=0)
    say(monkeypatch, local[1].tokenizer, "A square of noise.")
    first = "".join(r.text for r in session.ask("Describe it.", images=[image]))
    messages = [user(image_part(data_url(image)), "Describe it.")]
    assert ask(server, messages) == first == "A square of noise."
    monkeypatch.undo()

    second = [r for r in session.ask("And the colours?")]
    messages += [{"role": "assistant", "content": first}, user("And the colours?")]
    response = server.client.chat.completions.create(model="tiny", messages=messages, **GREEDY)
    assert response.choices[0].message.content == "".join(r.text for r in second)
    prompt = response.usage.prompt_tokens
    assert prompt == len(session.tokens) - len(second)  # the same prompt
    assert server.engine.reused == prompt - session.prefilled > 60  # the same prefix, image included


def test_a_changed_image_at_the_same_address_is_read_again(server, local, web):
    """The same messages, the image behind the same URL changed: the answer is the new image's, never one
    continued from the cache of the old (whose keys hold the old picture's digest)."""
    address, folder = web
    messages = [user(image_part(f"{address}/changing.png"), "What is it?")]
    expected = {seed: generate(*local, "What is it?", images=[png(seed)], **GREEDY) for seed in (8, 9)}
    assert expected[8] != expected[9]  # the pictures' answers tell them apart
    for seed in (8, 9):
        (folder / "changing.png").write_bytes(png(seed))
        assert ask(server, messages) == expected[seed]
        assert server.engine.reused < 10  # at most the template's opening, before the image


def test_concurrent_requests_equal_the_same_requests_one_at_a_time(server, local):
    questions = [f"Question number {i}?" for i in range(8)]
    expected = [generate(*local, q, **GREEDY) for q in questions]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda q: ask(server, [{"role": "user", "content": q}]), questions))
    assert answers == expected


def test_a_quantized_kv_cache_decodes_together_and_continues_conversations(tiny_checkpoint, local):
    """--kv-bits: every request's cache is quantized. mlx-lm has no batched form of that cache, so the
    answers advance together a forward pass each (serving/batch.py); they equal the package's with the
    same cache, and a conversation continues from its stored quantized cache."""
    quantized = Server(tiny_checkpoint, engine_options={"kv_cache": KVCacheOptions(8)})
    try:
        questions = [f"Question number {i}?" for i in range(6)]
        expected = [generate(*local, q, kv_bits=8, **GREEDY) for q in questions]
        with ThreadPoolExecutor(len(questions)) as pool:
            answers = list(pool.map(lambda q: ask(quantized, [{"role": "user", "content": q}]), questions))
        assert answers == expected
        assert quantized.engine.widest > 1
        for question, answer in zip(questions, expected, strict=True):  # from the caches given back
            assert ask(quantized, [{"role": "user", "content": question}]) == answer
            assert quantized.engine.reused > 0

        image = png(5, (160, 96))
        messages = [user(image_part(data_url(image)), "Describe it.")]
        first = ask(quantized, messages)
        messages += [{"role": "assistant", "content": first}, user("And the colours?")]
        second = ask(quantized, messages)
        assert quantized.engine.reused > 60  # the first turn's prompt, image included
        entries = quantized.engine.store.entries
        assert entries and all(isinstance(c, QuantizedKVCache) for e in entries for c in e)
        fresh_messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]},
            {"role": "assistant", "content": first},
            {"role": "user", "content": "And the colours?"},
        ]
        assert second == generate(*local, fresh_messages, images=[image], kv_bits=8, **GREEDY)
    finally:
        quantized.close()


def test_concurrent_requests_with_their_own_settings_are_decoded_together_as_alone(server):
    """Requests of every kind decoded in one batch (greedy, sampled with a seed, penalties, a stop
    string, log-probabilities, an image, a JSON schema, different lengths) answer as each does alone."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    bodies = [
        {"messages": [user("Question A?")], "max_tokens": 24, "temperature": 0},
        {"messages": [user("Question B?")], "max_tokens": 7, "temperature": 0, "logprobs": True,
         "top_logprobs": 2},
        {"messages": [user("Question C?")], "max_tokens": 24, "temperature": 1.0, "seed": 5},
        {"messages": [user("Question F?")], "max_tokens": 24, "temperature": 1.0, "seed": 11},
        {"messages": [user(image_part(data_url(png(3))), "What?")], "max_tokens": 16, "temperature": 0,
         "presence_penalty": 1.5},
        {"messages": [user("Question D?")], "max_tokens": 24, "temperature": 0, "stop": [" fiat"]},
        {"messages": [user("Question E?")], "max_tokens": 20, "temperature": 0,
         "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}},
    ]  # fmt: skip
    alone = [post(server, body) for body in bodies]
    server.engine.store.clear()  # the same work again, not continued from the first answers' caches
    server.engine.widest = 0
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda body: post(server, body), bodies))
    assert server.engine.widest > 1  # decoded in one batch
    for (status, one), (status_together, batched) in zip(alone, together, strict=True):
        assert status == status_together == 200, batched
        first, second = one["choices"][0], batched["choices"][0]
        assert second["message"] == first["message"] and second["finish_reason"] == first["finish_reason"]
        assert batched["usage"] == one["usage"]
        if first["logprobs"]:
            alone_entries, batched_entries = first["logprobs"]["content"], second["logprobs"]["content"]
            assert [e["token"] for e in batched_entries] == [e["token"] for e in alone_entries]
            expected = [e["logprob"] for e in alone_entries]
            assert [e["logprob"] for e in batched_entries] == pytest.approx(expected, rel=0, abs=LOGPROB)


def test_json_schema_and_json_object_answers_parse(server):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 10}, "count": {"type": "integer"}},
        "required": ["name", "count"],
        "additionalProperties": False,
    }
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "thing", "schema": schema, "strict": True},
    }
    for stream in (False, True):
        options = {"max_tokens": 60, "temperature": 0, "response_format": response_format}
        if stream:
            chunks = server.client.chat.completions.create(
                model="tiny", messages=[user("A thing, as JSON.")], stream=True, **options
            )
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            text = ask(server, [user("A thing, as JSON.")], **options)
        value = json.loads(text)
        assert set(value) == {"name", "count"} and isinstance(value["count"], int)
    text = ask(
        server,
        [user(image_part(data_url(png(6))), "JSON")],
        max_tokens=3,
        temperature=0,
        response_format={"type": "json_object"},
    )
    assert text.startswith("{")  # cut by max_tokens, but JSON from the first token


# ---- tool calls and reasoning ---------------------------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALLS = (
    "I will check both.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Bern"}}\n</tool_call>'
)


def test_tool_calls_come_back_in_openais_shape(server, local, monkeypatch):
    say(monkeypatch, local[1].tokenizer, CALLS)
    messages = [user("Weather in Zürich and Bern?")]
    response = server.client.chat.completions.create(
        model="tiny", messages=messages, tools=[WEATHER], max_tokens=80
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "I will check both."
    calls = choice.message.tool_calls
    assert [(c.type, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("function", "get_weather", {"city": "Zürich"}),
        ("function", "get_weather", {"city": "Bern"}),
    ]
    assert len({c.id for c in calls}) == 2
    # The tools were in the prompt: the template's tool section is counted.
    assert response.usage.prompt_tokens == len(local[1](messages, tools=[WEATHER])["input_ids"][0])

    # The calls sent back (arguments as JSON text) with their results: the conversation goes on.
    say(monkeypatch, local[1].tokenizer, "Rain in both.")
    results = [{"role": "tool", "tool_call_id": c.id, "content": "rain"} for c in calls]
    assistant = choice.message.model_dump(exclude_none=True)
    follow_up = messages + [assistant] + results
    answer = server.client.chat.completions.create(
        model="tiny", messages=follow_up, tools=[WEATHER], max_tokens=80
    )
    assert answer.choices[0].message.content == "Rain in both."
    assert answer.choices[0].finish_reason == "stop" and not answer.choices[0].message.tool_calls
    expected = local[1](normalize_messages(follow_up), tools=[WEATHER])["input_ids"][0]
    assert answer.usage.prompt_tokens == len(expected)


def test_streamed_tool_calls_come_as_delta_tool_calls_and_no_markup_leaks(server, local, monkeypatch):
    say(monkeypatch, local[1].tokenizer, CALLS)
    chunks = list(
        server.client.chat.completions.create(
            model="tiny", messages=[user("Weather?")], tools=[WEATHER], max_tokens=80, stream=True
        )
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    contents = [d.content for d in deltas if d.content]
    assert "".join(contents) == "I will check both."
    assert not any("<" in c for c in contents)  # no part of <tool_call> was ever shown
    calls = [t for d in deltas for t in d.tool_calls or []]
    assert [(t.index, t.function.name, json.loads(t.function.arguments)) for t in calls] == [
        (0, "get_weather", {"city": "Zürich"}),
        (1, "get_weather", {"city": "Bern"}),
    ]
    assert all(t.id.startswith("call_") and t.type == "function" for t in calls)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_a_malformed_call_stays_in_the_content(server, local, monkeypatch):
    bad = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Bern"\n</tool_call>'
    say(monkeypatch, local[1].tokenizer, bad)
    response = server.client.chat.completions.create(
        model="tiny", messages=[user("Weather?")], tools=[WEATHER], max_tokens=80
    )
    choice = response.choices[0]
    assert choice.message.content == bad and not choice.message.tool_calls
    assert choice.finish_reason == "stop"


def test_tool_choice_none_offers_no_tools_and_parses_nothing(server, local, monkeypatch):
    say(monkeypatch, local[1].tokenizer, CALLS)
    messages = [user("Weather?")]
    response = server.client.chat.completions.create(
        model="tiny", messages=messages, tools=[WEATHER], tool_choice="none", max_tokens=80
    )
    assert response.choices[0].message.content == CALLS and not response.choices[0].message.tool_calls
    assert response.usage.prompt_tokens == len(local[1](messages)["input_ids"][0])


@pytest.fixture(scope="module")
def thinking_server(tiny_thinking):
    s = Server(tiny_thinking)
    yield s
    s.close()


def test_a_thinking_models_reasoning_comes_as_reasoning_content(thinking_server, local, monkeypatch):
    say(monkeypatch, local[1].tokenizer, "Two cats, no dogs.\n</think>\n\nTwo cats.")
    options = {"model": "tiny", "messages": [user("Cats?")], "max_tokens": 60}
    message = thinking_server.client.chat.completions.create(**options).choices[0].message
    assert message.content == "Two cats." and message.reasoning_content == "Two cats, no dogs."
    chunks = list(thinking_server.client.chat.completions.create(**options, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = [getattr(d, "reasoning_content", None) or "" for d in deltas]
    assert "".join(reasoning) == "Two cats, no dogs."
    assert "".join(d.content or "" for d in deltas) == "Two cats."
    assert not any(r and d.content for r, d in zip(reasoning, deltas, strict=True))  # one part per piece


# ---- bad requests -------------------------------------------------------------------------------------


def call(server, method: str, path: str, body: bytes | None = None, key: str | None = KEY):
    """A raw HTTP request (for what the openai client would not send): status and parsed JSON body."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    connection.request(method, path, body=body, headers=headers)
    response = connection.getresponse()
    status, data = response.status, json.loads(response.read())
    connection.close()
    return status, data


def post(server, body, raw: bool = False) -> tuple[int, dict]:
    data = body if raw else json.dumps(body)
    return call(server, "POST", "/v1/chat/completions", data.encode())


@pytest.mark.parametrize(
    "body, message",
    [
        ("{not json", "the request body is not valid JSON"),
        ([1, 2], "the request body must be a JSON object"),
        ({"messages": "hi"}, "messages: Input should be a valid list"),
        ({"messages": [user("Hi")], "temperature": "hot"}, "temperature='hot' is out of range"),
        ({"messages": [user("Hi")], "n": 2}, "n=2: this server answers with one choice"),
        ({"messages": [user("Hi")], "max_tokens": 0}, "max_tokens=0 is out of range"),
        ({"messages": [{"role": "robot", "content": "Hi"}]}, "message 1 has role 'robot'"),
        ({"messages": [user({"type": "input_audio", "input_audio": {}})]}, "unknown type 'input_audio'"),
        ({"messages": [user(image_part(data_url(b"plain text")))]}, "not an image in a supported format"),
        ({"messages": [user(image_part("/etc/passwd"))]}, "local files are not served"),
        ({"messages": [user(image_part("file:///etc/passwd"))]}, "local files are not served"),
        ({"messages": [user("Hi")], "max_tokens": 10**6}, "exceeds the model's context"),
        ({"messages": [user("Hi")], "response_format": {"type": "xml"}}, "response_format.type 'xml'"),
        ({"messages": [user("Hi")], "logprobs": "yes"}, "logprobs='yes': must be true or false"),
        ({"messages": [user("Hi")], "top_logprobs": 2}, "top_logprobs needs logprobs: true"),
        ({"messages": [user("Hi")], "logprobs": True, "top_logprobs": 21}, "top_logprobs=21 is out of range"),
        ({"messages": [user("Hi")], "tools": [WEATHER], "tool_choice": "required"}, "tool_choice='required'"),
        ({"messages": [user("Hi")], "tools": [{"type": "function"}]}, "tools item 1"),
    ],
    ids=lambda v: str(v)[:40],
)  # fmt: skip
def test_bad_requests_get_the_error_shape_and_a_400(server, body, message):
    status, response = post(server, body, raw=isinstance(body, str))
    assert status == 400, response
    error = response["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    "path, message",
    [
        ("/slow.png", "took more than|did not answer within"),
        ("/big.bin", "over the limit of 2,000,000 bytes"),
        ("/loop", "redirects more than 5 times"),
        ("/missing.png", "answered HTTP 404"),
        ("/notes.txt", "not an image in a supported format"),
    ],
)
def test_bad_media_urls_get_a_400(server, web, path, message):
    url, _ = web
    status, response = post(server, {"messages": [user(image_part(url + path))]})
    assert status == 400, response
    assert re.search(message, response["error"]["message"])


def test_local_files_only_when_allowed(tiny_checkpoint, web):
    _, folder = web
    allowed = Server(tiny_checkpoint, allow_local_files=folder)
    try:
        answer = ask(allowed, [user(image_part(str(folder / "cat.png")), "What?")])
        assert isinstance(answer, str) and answer
    finally:
        allowed.close()


def drop_after(server, body: dict, events: int) -> None:
    """A streaming request whose client reads a few events and goes away."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    connection.request(
        "POST", "/v1/chat/completions", body=json.dumps(body | {"stream": True}), headers=headers
    )
    response = connection.getresponse()
    lines = [response.readline() for _ in range(2 * events)]  # "data: ..." and a blank line each
    assert sum(line.startswith(b"data: ") for line in lines) == events
    connection.close()


def idle(server) -> None:
    """Wait until the engine decodes nothing (bounded: a hang fails)."""
    deadline = time.monotonic() + HANG
    while server.engine.sequences:
        assert time.monotonic() < deadline, len(server.engine.sequences)
        time.sleep(0.05)


def answers_held(server, local, question: str) -> list[int]:
    """How many answer tokens follow the prompt of `question` in each cache the server keeps."""
    prompt = local[1]([{"role": "user", "content": question}])["input_ids"][0].tolist()
    entries = server.engine.store.entries
    return [len(e.keys) - len(prompt) for e in entries if [t for t, _ in e.keys[: len(prompt)]] == prompt]


def test_a_client_that_goes_away_stops_its_generation(server, local):
    """A stream dropped after a few chunks: its generation stops, far short of the 2,000 tokens asked for
    (the cache it leaves holds the answer so far), other requests are answered meanwhile, and that
    cache gives the same answers."""
    story = "Tell me a long story."
    drop_after(server, {"messages": [user(story)], "max_tokens": 2000, "temperature": 0}, 6)
    assert ask(server, [user("Hi")]) == generate(*local, "Hi", **GREEDY)
    idle(server)
    held = answers_held(server, local, story)
    assert held and max(held) < 2000, held
    assert ask(server, [user(story)]) == generate(*local, story, **GREEDY)


def test_a_client_gone_from_a_batch_leaves_the_others_answers_unchanged(server, local):
    """Two long answers decoded with a third whose client leaves mid-stream: the row is taken out of the
    batch within a token, the others answer as alone, and the batch is empty after."""
    questions = ["Tell me a long story.", "Write a poem about the sea."]
    expected = [generate(*local, q, max_tokens=40, temperature=0) for q in questions]
    server.engine.widest = 0
    long_body = {"messages": [user("Count to a thousand.")], "max_tokens": 2000, "temperature": 0}
    with ThreadPoolExecutor(3) as pool:
        answers = [pool.submit(ask, server, [user(q)], max_tokens=40) for q in questions]
        pool.submit(drop_after, server, long_body, 4).result()
        assert [a.result() for a in answers] == expected
    assert server.engine.widest >= 2
    idle(server)
    held = answers_held(server, local, "Count to a thousand.")
    assert held and max(held) < 2000, held  # the dropped row left the batch long before its end


@pytest.mark.slow
def test_a_soak_of_mixed_requests_leaves_the_server_answering_in_bounded_memory(server, local):
    """Hundreds of requests from four clients at once, most of them refused and some abandoned
    mid-stream: every greedy answer stays right, and memory stays bounded."""
    expected = generate(*local, "Hi", **GREEDY)
    bad = [
        ("{oops", True),
        ({"messages": [user("x")], "top_p": 7}, False),
        ({"messages": [user(image_part(data_url(b"junk")))]}, False),
        ({"messages": [{"role": "user"}], "n": 3}, False),
    ]
    ask(server, [user("Hi")])
    mx.synchronize()
    baseline = mx.get_active_memory()

    def one(i: int) -> None:
        if i % 10 == 0:
            assert ask(server, [user("Hi")]) == expected
        elif i % 10 in (1, 6):
            ask(server, [user(f"Different question {i}")], max_tokens=2)
        elif i % 10 == 7:
            drop_after(server, {"messages": [user(f"Story {i}")], "max_tokens": 500, "temperature": 0}, 3)
        else:
            body, raw = bad[i % len(bad)]
            assert post(server, body, raw=raw)[0] == 400

    with ThreadPoolExecutor(4) as pool:  # good, bad and abandoned requests, four at a time
        list(pool.map(one, range(240)))
    assert ask(server, [user("Hi")]) == expected
    grown = mx.get_active_memory() - baseline
    assert grown < 200 * 10**6, grown  # the prompt cache is bounded (in bytes)
    idle(server)  # the abandoned answers leave


def test_a_running_stream_waits_at_most_one_piece_while_a_request_with_an_image_is_admitted(
    server, monkeypatch
):
    """While an answer streams, another request's image and prompt are encoded and prefilled in pieces
    (a vision block, a prompt chunk), each followed by a decode step of the running answer: told by the
    order of the engine's work, not by a clock."""
    engine = server.engine
    order: list[tuple[str, int]] = []  # ("piece" or "decode", answers being decoded then)
    decode_step, pause = engine._decode_step, engine.admission.pause

    def decode():
        order.append(("decode", len(engine.sequences)))
        decode_step()

    def piece(progress=None):
        order.append(("piece", len(engine.sequences)))
        pause(progress)

    monkeypatch.setattr(engine, "_decode_step", decode)
    monkeypatch.setattr(engine.admission, "pause", piece)
    long_prompt = "Tell me a long story about a lighthouse keeper. " * 60  # two prompt chunks or more
    stream = server.client.chat.completions.create(
        model="tiny", messages=[user("Count slowly.")], max_tokens=200, temperature=0, stream=True
    )
    chunks = iter(stream)
    next(chunks)  # the role: the first answer is in the batch
    other = ask(server, [user(image_part(data_url(png(5, (448, 448)))), long_prompt)], max_tokens=2)
    rest = [chunk for chunk in chunks]
    assert other is not None and rest[-1].choices[0].finish_reason == "length"
    pieces = [i for i, (kind, running) in enumerate(order) if kind == "piece" and running > 0]
    blocks = len(engine.model.model.visual.blocks)
    assert len(pieces) >= blocks + 1, order  # every vision block and prompt chunk a piece of its own
    assert all(order[i + 1][0] == "decode" for i in pieces), order
