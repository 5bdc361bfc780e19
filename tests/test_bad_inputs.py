"""Every bad input a new user may send gets one clear line naming the problem (a Qwen3VLError; on the
command line, one line and exit status 2): model directories whose files have the wrong shape, weights
that went bad without changing length, tool messages of the wrong shape, odd standard input, and an
answer's tool-call parsing kept linear in the answer's length."""

from __future__ import annotations

import asyncio
import copy
import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from checkpoints import published_config
from serving import wait_until_healthy
from terminal import ROOT, child_env, run_chat

from mlx_qwen3vl import BrokenWeightsError, ChatSession, Qwen3VLError, generate, load
from mlx_qwen3vl.answer import AnswerText
from mlx_qwen3vl.config import ModelConfig
from mlx_qwen3vl.messages import normalize_messages
from mlx_qwen3vl.serving.engine import Engine, Job
from mlx_qwen3vl.serving.protocol import parse_request
from mlx_qwen3vl.tools import ToolCallSplit
from mlx_qwen3vl.turn import Turn

# Bounds on waits, so that a hang fails; far above what the waits take on a busy machine.
HANG = 300
SHUTDOWN_BOUND = 30  # after SIGINT; the server should exit in a few seconds


@pytest.fixture(scope="module")
def tiny_default(tiny_checkpoint):
    """The tiny model as chat.py loads it (the backend's default dtype)."""
    return load(tiny_checkpoint)


# ---- model directories whose files have the wrong shape -------------------------------------------


def edited(path: str, value):
    """The published config with the value at `path` ("text_config.hidden_size") replaced."""
    params = copy.deepcopy(published_config())
    *sections, key = path.split(".")
    target = params
    for section in sections:
        target = target[section]
    target[key] = value
    return params


@pytest.mark.parametrize(
    "path, value, rule",
    [
        ("text_config.hidden_size", "2560", "a whole number >= 1"),
        ("text_config.num_hidden_layers", -2, "a whole number >= 1"),
        ("text_config.num_attention_heads", 0, "a whole number >= 1"),
        ("text_config.num_key_value_heads", 8.5, "a whole number >= 1"),
        ("text_config.head_dim", None, "a whole number >= 1"),
        ("text_config.intermediate_size", [9728], "a whole number >= 1"),
        ("text_config.vocab_size", True, "a whole number >= 1"),
        ("text_config.rms_norm_eps", "1e-6", "a number > 0"),
        ("text_config.rope_theta", -1, "a number > 0"),
        ("text_config.max_position_embeddings", "262144", "a whole number >= 1"),
        ("text_config.hidden_act", 7, "a string"),
        ("text_config.attention_bias", "false", "true or false"),
        ("text_config.rope_scaling", "default", "an object"),
        ("text_config.rope_scaling.mrope_section", 64, "a list of whole numbers >= 0"),
        ("vision_config.depth", "24", "a whole number >= 1"),
        ("vision_config.hidden_size", 1024.0, "a whole number >= 1"),
        ("vision_config.num_heads", -16, "a whole number >= 1"),
        ("vision_config.patch_size", 0, "a whole number >= 1"),
        ("vision_config.deepstack_visual_indexes", "5,11,17", "a list of whole numbers >= 0"),
        ("vision_config.deepstack_visual_indexes", [5, -1], "a list of whole numbers >= 0"),
        ("vision_config.rope_parameters", [10000.0], "an object"),
        ("image_token_id", "151655", "a whole number >= 0"),
        ("vision_start_token_id", -1, "a whole number >= 0"),
        ("tie_word_embeddings", 1, "true or false"),
    ],
)
def test_config_values_of_the_wrong_type_or_range_name_their_field(path, value, rule):
    with pytest.raises(Qwen3VLError) as error:
        ModelConfig.from_dict(edited(path, value))
    message = str(error.value)
    assert message.startswith(f"config.json: {path} is "), message
    assert message.endswith(f"must be {rule}"), message
    assert "\n" not in message


def test_a_moe_configs_expert_values_are_checked_too():
    params = edited("model_type", "qwen3_vl_moe")
    params["text_config"].update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64)
    params["text_config"]["mlp_only_layers"] = 3
    with pytest.raises(Qwen3VLError, match=r"^config.json: text_config.mlp_only_layers is 3, must be a list"):
        ModelConfig.from_dict(params)
    params["text_config"].update(mlp_only_layers=None, num_experts="8")
    with pytest.raises(Qwen3VLError, match=r"^config.json: text_config.num_experts is '8', must be a whole"):
        ModelConfig.from_dict(params)


@pytest.fixture
def model_copy(tiny_checkpoint, tmp_path):
    """The tiny checkpoint's files linked into a folder of their own, where a test may replace one."""
    target = tmp_path / "model"
    target.mkdir()
    for file in tiny_checkpoint.iterdir():
        (target / file.name).symlink_to(file)
    return target


def replace(path, name: str, content: str) -> None:
    (path / name).unlink()
    (path / name).write_text(content)


def edit_json(path, name: str, edit) -> None:
    content = json.loads((path / name).read_text())
    edit(content)
    replace(path, name, json.dumps(content))


@pytest.mark.parametrize(
    "breakage, message",
    [
        (
            lambda p: edit_json(p, "config.json", lambda c: c["text_config"].update(hidden_size="128")),
            "config.json: text_config.hidden_size is '128', must be a whole number >= 1",
        ),
        (
            lambda p: edit_json(p, "config.json", lambda c: c["text_config"].update(num_hidden_layers=-4)),
            "config.json: text_config.num_hidden_layers is -4, must be a whole number >= 1",
        ),
        (
            lambda p: replace(p, "config.json", "[1, 2]"),
            "config.json: must be a JSON object, not list",
        ),
        (
            lambda p: edit_json(
                p, "model.safetensors.index.json", lambda c: c.update(weight_map=list(c["weight_map"]))
            ),
            "model.safetensors.index.json: weight_map is [",
        ),
        (
            lambda p: edit_json(p, "model.safetensors.index.json", lambda c: c.pop("weight_map")),
            "model.safetensors.index.json: weight_map is None, must be an object",
        ),
        (
            lambda p: replace(p, "tokenizer.json", "{this is not json"),
            "tokenizer.json: cannot be read as a tokenizer",
        ),
        (
            lambda p: replace(p, "generation_config.json", '["greedy"]'),
            "generation_config.json: must be a JSON object, not list",
        ),
        (
            lambda p: edit_json(p, "generation_config.json", lambda c: c.update(eos_token_id="<|im_end|>")),
            "generation_config.json: eos_token_id is '<|im_end|>', must be a whole number >= 0",
        ),
        (
            lambda p: edit_json(p, "preprocessor_config.json", lambda c: c.update(patch_size="16")),
            "preprocessor_config.json: patch_size is '16', must be a whole number >= 1",
        ),
        (
            lambda p: edit_json(p, "preprocessor_config.json", lambda c: c.update(image_std=[0.5, 0, 0.5])),
            "preprocessor_config.json: image_std is [0.5, 0, 0.5], must be a list of numbers > 0",
        ),
        (
            lambda p: edit_json(p, "chat_template.json", lambda c: c.update(chat_template=["{{ x }}"])),
            "chat_template.json: chat_template must be a string",
        ),
    ],
    ids=[
        "hidden_size string",
        "negative layers",
        "config list",
        "weight_map list",
        "no weight_map",
        "tokenizer not json",
        "generation list",
        "eos string",
        "patch_size string",
        "image_std zero",
        "template list",
    ],
)
def test_model_files_of_the_wrong_shape_get_one_line_naming_file_and_field(model_copy, breakage, message):
    breakage(model_copy)
    with pytest.raises(Qwen3VLError) as error:
        load(model_copy, lazy=True)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_chat_py_reports_a_broken_config_in_one_line_and_exits_2(model_copy, tmp_path):
    edit_json(model_copy, "config.json", lambda c: c["text_config"].update(hidden_size="128"))
    result = run_chat(tmp_path, "--model", str(model_copy), "--prompt", "Hi")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"chat.py: error: {model_copy}/config.json: text_config.hidden_size is '128', "
        "must be a whole number >= 1"
    )


# ---- weights that went bad without changing length ------------------------------------------------


def spoil_tensor(path, name: str) -> None:
    """Overwrite tensor `name`'s data in its (copied) shard with 0xFF bytes: NaN in bfloat16 and float32,
    the file's length and header unchanged, as a disk or a transfer may leave it."""
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    shard = path / index[name]
    data = bytearray(shard.read_bytes())
    shard.unlink()  # a linked file: the copy is this folder's own
    header_length = int.from_bytes(data[:8], "little")
    start, end = json.loads(data[8 : 8 + header_length])[name]["data_offsets"]
    offset = 8 + header_length
    data[offset + start : offset + end] = b"\xff" * (end - start)
    shard.write_bytes(bytes(data))


BROKEN = "the model's output for this prompt is not a number (NaN or infinite logits)"


def test_weights_spoiled_in_place_stop_the_first_answer_with_one_line(model_copy, tmp_path):
    spoil_tensor(model_copy, "model.language_model.norm.weight")
    model, processor = load(model_copy, dtype="float32")  # loads: every shape still fits
    with pytest.raises(BrokenWeightsError) as error:
        generate(model, processor, "Hi", max_tokens=5, temperature=0)
    assert str(error.value).startswith(BROKEN) and "sha256sum" in str(error.value)
    with pytest.raises(BrokenWeightsError):
        list(ChatSession(model, processor, max_tokens=5).ask("Hi"))

    result = run_chat(tmp_path, "--model", str(model_copy), "--prompt", "Hi", "--max-tokens", "5")
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines()[-1].startswith(f"chat.py: error: {BROKEN}"), result.stderr
    assert "Traceback" not in result.stderr


def test_the_server_fails_a_request_on_spoiled_weights_with_a_500_and_the_reason(model_copy):
    """A 500, not a 400: the request is fine, the server's model is not."""
    spoil_tensor(model_copy, "model.language_model.norm.weight")
    model, processor = load(model_copy, dtype="float32")
    engine = Engine(model, processor)
    engine.start()
    try:
        request = parse_request({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5})
        turn = Turn.from_messages(processor, request.messages, [], request.options)

        async def first_event():
            job = Job(request, turn, asyncio.get_running_loop())
            engine.submit(job)
            return await asyncio.wait_for(job.events.get(), timeout=HANG)

        event = asyncio.run(first_event())
    finally:
        engine.stop()
    assert (event.kind, event.status) == ("error", 500)
    assert event.text.startswith(BROKEN)


# ---- server.py's own arguments ----------------------------------------------------------------------


def run_server(*args: str, timeout: float = HANG) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "server.py", *args],
        cwd=ROOT,
        capture_output=True,
        encoding="utf-8",
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "args, problem",
    [
        (["--port", "70000"], "argument --port: 70000 is out of range: must be a whole number in [0, 65535]"),
        (["--port", "-1"], "argument --port: -1 is out of range: must be a whole number in [0, 65535]"),
        (["--cache-gb", "nan"], "argument --cache-gb: nan is out of range: must be a number >= 0"),
        (["--cache-gb", "-2"], "argument --cache-gb: -2 is out of range: must be a number >= 0"),
        (["--max-media-bytes", "-5"],
         "argument --max-media-bytes: -5 is out of range: must be a whole number >= 1"),
        (["--max-media-bytes", "1e6"], "argument --max-media-bytes: '1e6' is not a whole number"),
    ],
    ids=["port 70000", "port -1", "cache nan", "cache negative", "media negative", "media 1e6"],
)  # fmt: skip
def test_server_arguments_are_checked_before_the_model_loads(tiny_checkpoint, args, problem):
    result = run_server("--model", str(tiny_checkpoint), *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"server.py: error: {problem} (see --help)"]


def test_a_port_in_use_is_refused_before_the_model_loads(tiny_checkpoint):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = run_server("--model", str(tiny_checkpoint), "--port", str(port))
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"server.py: error: cannot listen on 127.0.0.1:{port}: "), line


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


@pytest.mark.slow
def test_ctrl_c_while_a_stream_is_answered_stops_the_server(tiny_checkpoint, tmp_path):
    """The first SIGINT ends the answers in flight (their streams say why) and the server exits; the wait
    is a bound that makes a hang fail, not a measure of speed."""
    port = free_port()
    log = (tmp_path / "server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "server.py", "--model", str(tiny_checkpoint), "--port", str(port)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until_healthy(process, port, HANG, (tmp_path / "server.log").read_text)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=HANG)
        body = {"messages": [{"role": "user", "content": "Tell a long story."}], "stream": True}
        body |= {"max_tokens": 100_000, "temperature": 0}
        connection.request(
            "POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        assert [response.readline() for _ in range(6)][4].startswith(b"data: ")  # answering
        # The stream is read meanwhile, in a thread of its own: a server that never ends it must not
        # hold up the bound on the wait.
        rest: list[bytes] = []
        reader = threading.Thread(target=lambda: rest.append(response.read()), daemon=True)
        reader.start()
        process.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        code = process.wait(timeout=SHUTDOWN_BOUND)
        elapsed = time.monotonic() - interrupted
        reader.join(timeout=SHUTDOWN_BOUND)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
    print(f"the server exited {elapsed:.1f} s after SIGINT")  # reported with -s, never asserted
    assert code == 0, (tmp_path / "server.log").read_text()
    stream = rest[0].decode() if rest else ""
    assert "the server is shutting down" in stream and stream.endswith("data: [DONE]\n\n"), stream[-300:]
    assert "Traceback" not in (tmp_path / "server.log").read_text()


# ---- chat.py --draw -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "draw, problem",
    [
        ("{tmp}/a-file", "{tmp}/a-file: is a file; drawings are saved in a folder (give a folder's path)"),
        (
            "{tmp}/a-file/sub",
            "{tmp}/a-file/sub: cannot create this folder for the drawings ({tmp}/a-file is a file)",
        ),
    ],
    ids=["a file", "under a file"],
)
def test_draw_names_what_it_expects_and_what_is_wrong(tiny_checkpoint, tmp_path, draw, problem):
    (tmp_path / "a-file").write_text("not a folder")
    draw = draw.format(tmp=tmp_path)
    result = run_chat(tmp_path, "--model", str(tiny_checkpoint), "--draw", draw, "--prompt", "Hi")
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"chat.py: error: {problem.format(tmp=tmp_path)}"]


# ---- tool messages of the wrong shape ------------------------------------------------------------------

CALL = {"type": "function", "function": {"name": "zoom", "arguments": {"box": [1, 2]}}}


def with_arguments(arguments) -> dict:
    return {"type": "function", "function": {"name": "zoom", "arguments": arguments}}


@pytest.mark.parametrize(
    "messages, message",
    [
        ([{"role": "user", "content": "Hi"}, {"role": "tool", "content": "42"}],
         "message 2: a tool message must follow the assistant message with the tool_calls it answers, "
         "not come after a user message"),
        ([{"role": "tool", "content": "42"}],
         "message 1: a tool message must follow the assistant message with the tool_calls it answers, "
         "not come first"),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
          {"role": "tool", "content": "42"}],
         "message 3: a tool message must follow the assistant message with the tool_calls it answers, "
         "not come after a assistant message"),
        ([{"role": "assistant", "content": None, "tool_calls": [with_arguments([1, 2])]}],
         "message 1, tool_calls item 1: arguments must be a JSON object (or its JSON text), got [1, 2]"),
        ([{"role": "assistant", "content": None, "tool_calls": [with_arguments("[1, 2]")]}],
         "message 1, tool_calls item 1: arguments must be a JSON object (or its JSON text), got '[1, 2]'"),
        ([{"role": "assistant", "content": None, "tool_calls": [with_arguments("{box")]}],
         "message 1, tool_calls item 1: arguments '{box' is not JSON"),
        ([{"role": "assistant", "content": None, "tool_calls": [CALL, {"function": {"arguments": {}}}]}],
         "message 1, tool_calls item 2: must be {'function': {'name': ..., 'arguments': ...}}"),
        ([{"role": "assistant", "content": None, "tool_calls": CALL}],
         "message 1: tool_calls must be a list, got dict"),
        ([{"role": "user", "content": "Hi", "tool_calls": [CALL]}],
         "message 1: only assistant messages have tool_calls, this one has role 'user'"),
    ],
    ids=["after user", "first", "after an answer without calls", "arguments list", "arguments text list",
         "arguments not json", "no name", "calls not a list", "calls of a user"],
)  # fmt: skip
def test_tool_messages_of_the_wrong_shape_are_refused(messages, message):
    with pytest.raises(Qwen3VLError) as error:
        normalize_messages(messages)
    assert str(error.value).startswith(message), str(error.value)


def test_tool_results_that_answer_calls_pass(tiny_f32):
    conversation = [
        {"role": "user", "content": "Zoom in."},
        {"role": "assistant", "content": None, "tool_calls": [CALL, with_arguments('{"box": [3]}')]},
        {"role": "tool", "content": "zoomed"},
        {"role": "tool", "content": "zoomed again"},
    ]
    assert normalize_messages(conversation) == conversation
    # A session's tool turn answers the calls of its last answer, if it made any.
    session = ChatSession(*tiny_f32, max_tokens=2, temperature=0)
    list(session.ask("Hi"))  # the random model makes no call
    with pytest.raises(Qwen3VLError, match="message 1: a tool message must follow"):
        list(session.ask([{"role": "tool", "content": "42"}]))


# ---- tool-call parsing, linear in the answer's length -----------------------------------------------


def stream_block(size: int) -> tuple[ToolCallSplit, list]:
    """A call whose arguments hold `size` characters, fed a few characters at a time as tokens come."""
    text = (
        f'<tool_call>\n{{"name": "zoom", "arguments": {{"note": "{"ab cd " * (size // 6)}"}}}}\n</tool_call>'
    )
    split = ToolCallSplit({"zoom"})
    calls = []
    for i in range(0, len(text), 3):
        calls += split.add(text[i : i + 3]).calls
    calls += split.add("", final=True).calls
    return split, calls


def test_a_long_tool_call_block_is_parsed_in_work_linear_in_its_length():
    """A 300 KB call block streamed three characters at a time: the characters searched grow as the
    block does (tenfold for tenfold), where searching the open block again per token grew as its square."""
    short, calls = stream_block(30_000)
    long, long_calls = stream_block(300_000)
    assert [c.name for c in calls] == [c.name for c in long_calls] == ["zoom"]
    assert len(long_calls[0].arguments["note"]) == 300_000
    assert long.scanned < 11 * short.scanned
    assert long.scanned < 6 * 300_000  # a few times each character: the piece and a marker's length before it


def test_a_long_answer_is_read_in_work_linear_in_its_length(tiny_default):
    """A long answer with a stop string offered, token by token: the answer reader takes only each
    token's new text from the detokenizer (`last_segment`), never the whole answer again (reading it per
    token copied the answer at every token), and the pieces it shows are exactly the decoded tokens."""
    _model, processor = tiny_default
    tokenizer = processor.tokenizer
    text = '<tool_call> {"note": "' + "ab cd é " * 6_000 + '"} </tool_call> done'
    tokens = tokenizer.encode(text, add_special_tokens=False)
    end = min(tokenizer.eos_token_ids)
    answer = AnswerText(tokenizer, ["never said"], {end}, max_tokens=len(tokens) + 1)
    answer.detokenizer = watched = WholeTextReads(answer.detokenizer)
    pieces = [answer.add(token).text for token in tokens]
    pieces.append(answer.add(end).text)  # the end of the turn: what was held back comes out
    assert answer.finish_reason == "stop"
    assert "".join(pieces) == tokenizer.decode(tokens)
    assert watched.reads == 0


class WholeTextReads:
    """A detokenizer that counts the reads of its whole text (`text`) from outside."""

    def __init__(self, detokenizer):
        self.detokenizer, self.reads = detokenizer, 0

    def __getattr__(self, name):
        self.reads += name == "text"
        return getattr(self.detokenizer, name)


# ---- odd standard input and arguments -------------------------------------------------------------------


def test_stdin_that_is_not_utf8_is_read_with_replacement(tiny_checkpoint, tiny_default, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "chat.py",
            "--model",
            str(tiny_checkpoint),
            "--max-tokens",
            "5",
            "--temperature",
            "0",
        ],
        cwd=ROOT,
        input=b"caf\xe9 \xff?\n",
        capture_output=True,
        env=child_env(tmp_path),
        timeout=HANG,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    expected = generate(*tiny_default, "caf\ufffd \ufffd?", max_tokens=5, temperature=0)
    assert result.stdout.decode() == expected + "\n"


def test_a_prompt_argument_with_bytes_that_are_not_utf8_is_read_with_replacement(
    tiny_checkpoint, tiny_default, tmp_path
):
    args = [sys.executable, "chat.py", "--model", str(tiny_checkpoint), "--max-tokens", "5"]
    result = subprocess.run(
        [*args, "--temperature", "0", "--prompt", b"caf\xe9?"],
        cwd=ROOT,
        capture_output=True,
        env=child_env(tmp_path),
        timeout=HANG,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    expected = generate(*tiny_default, "caf\ufffd?", max_tokens=5, temperature=0)
    assert result.stdout.decode() == expected + "\n"


def test_text_with_a_lone_surrogate_is_refused_in_one_line(tiny_default):
    with pytest.raises(Qwen3VLError, match=r"^the prompt holds '\\udce9', a lone surrogate"):
        generate(*tiny_default, "caf\udce9?", max_tokens=2)
