"""Tool calls: the prompts that offer tools and carry calls and their results, against transformers'
rendering of the same messages; the calls parsed out of answers (one, several, malformed, streamed in any
pieces); and the Python API's calls, with answers scripted to hold them (the random model makes none)."""

import numpy as np
import pytest
from scripted import say
from transformers import AutoTokenizer

from mlx_qwen3vl import ChatSession, Qwen3VLError, generate, stream_generate
from mlx_qwen3vl.answer import AnswerText
from mlx_qwen3vl.messages import normalize_messages
from mlx_qwen3vl.tools import ToolCallSplit, parse_tool_calls, tool_names

ZOOM = {
    "type": "function",
    "function": {
        "name": "zoom",
        "description": "Zoom into a region of the image.",
        "parameters": {
            "type": "object",
            "properties": {"box": {"type": "array", "items": {"type": "integer"}}},
            "required": ["box"],
        },
    },
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
TOOLS = [ZOOM, WEATHER]

ZOOM_CALL = '<tool_call>\n{"name": "zoom", "arguments": {"box": [10, 20, 30, 40]}}\n</tool_call>'
WEATHER_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>'
END_OF_TURN = 151645


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_checkpoint):
    return AutoTokenizer.from_pretrained(tiny_checkpoint)


# ---- parsing ------------------------------------------------------------------------------------------


def test_one_call_is_taken_out_of_the_text():
    found = parse_tool_calls("I will zoom in.\n" + ZOOM_CALL, TOOLS)
    assert found.text == "I will zoom in."
    assert [(c.name, c.arguments) for c in found.calls] == [("zoom", {"box": [10, 20, 30, 40]})]
    assert found.invalid == []


def test_several_calls_each_get_their_own_id():
    found = parse_tool_calls(ZOOM_CALL + "\n" + WEATHER_CALL + "\n", TOOLS)
    assert found.text == ""
    assert [(c.name, c.arguments) for c in found.calls] == [
        ("zoom", {"box": [10, 20, 30, 40]}),
        ("get_weather", {"city": "Zürich"}),
    ]
    ids = [c.id for c in found.calls]
    assert len(set(ids)) == 2 and all(i.startswith("call_") for i in ids)


def test_arguments_written_as_a_json_string_are_parsed():
    block = '<tool_call>\n{"name": "zoom", "arguments": "{\\"box\\": [1, 2, 3, 4]}"}\n</tool_call>'
    assert parse_tool_calls(block, TOOLS).calls[0].arguments == {"box": [1, 2, 3, 4]}


@pytest.mark.parametrize(
    "block, error",
    [
        ('<tool_call>\n{"name": "zoom", "arguments": {"box": [1, 2}\n</tool_call>', "not JSON"),
        ('<tool_call>\n["zoom", {"box": [1]}]\n</tool_call>', "not a JSON object"),
        ('<tool_call>\n{"arguments": {"box": [1]}}\n</tool_call>', "no function name"),
        ('<tool_call>\n{"name": "fly", "arguments": {}}\n</tool_call>', "no tool named 'fly' was offered"),
        (
            '<tool_call>\n{"name": "zoom", "arguments": [1, 2]}\n</tool_call>',
            "arguments is not a JSON object",
        ),
        ('<tool_call>\n{"name": "zoom", "arguments": {"box": [1', "never closed by </tool_call>"),
    ],
    ids=["bad json", "array", "no name", "unknown tool", "bad arguments", "unclosed"],
)
def test_a_malformed_block_is_reported_and_kept_in_the_text(block, error):
    found = parse_tool_calls("Let me see.\n" + block, TOOLS)
    assert found.calls == []
    assert found.text == "Let me see.\n" + block  # nothing the model wrote is lost
    assert len(found.invalid) == 1
    assert found.invalid[0].text == block and error in found.invalid[0].error


def test_a_valid_call_beside_a_malformed_one_is_still_a_call():
    bad = '<tool_call>\n{"name": "zoom"\n</tool_call>'
    found = parse_tool_calls(bad + "\n" + WEATHER_CALL, TOOLS)
    assert [c.name for c in found.calls] == ["get_weather"]
    assert found.text == bad and len(found.invalid) == 1


@pytest.mark.parametrize(
    "tools, message",
    [
        ("zoom", "tools must be a list"),
        ([{"type": "function", "function": {"parameters": {}}}], "tools item 1"),
        ([ZOOM, {"name": ""}], "tools item 2"),
    ],
)
def test_bad_tool_definitions_are_refused(tools, message):
    with pytest.raises(Qwen3VLError, match=message):
        tool_names(tools)
    assert tool_names([ZOOM, {"name": "bare"}]) == {"zoom", "bare"}  # the function object alone is fine


ANSWER = "Sure.\n" + ZOOM_CALL + "\n" + WEATHER_CALL


def test_calls_streamed_in_any_pieces_give_the_same_result():
    """However the text is cut (every split into two pieces, and one character at a time), the same
    calls come out, and no piece of the text shown holds any part of a call's markup."""
    whole = parse_tool_calls(ANSWER, TOOLS)
    cuts = [[ANSWER[:k], ANSWER[k:]] for k in range(len(ANSWER) + 1)] + [list(ANSWER)]
    for pieces in cuts:
        split = ToolCallSplit({"zoom", "get_weather"})
        found = [split.add(p, final=i == len(pieces) - 1) for i, p in enumerate(pieces)]
        assert "".join(f.text for f in found) == "Sure."
        assert [c.arguments for f in found for c in f.calls] == [c.arguments for c in whole.calls]


def test_text_that_only_looks_like_a_call_is_shown_once_it_cannot_be_one():
    split = ToolCallSplit({"zoom"})
    assert split.add("if a <tool").text == "if a"  # held back: it may become a call
    assert split.add("s> b", final=True).text == " <tools> b"


def answer_pieces(tokenizer, text: str, tools=TOOLS, max_tokens=100, end=True):
    """An answer's pieces, token by token, as the model would write `text`."""
    tokens = tokenizer.encode(text) + ([END_OF_TURN] if end else [])
    answer = AnswerText(tokenizer, [], {END_OF_TURN}, max_tokens, tools=tools)
    pieces = []
    for token in tokens:
        pieces.append(answer.add(token))
        if answer.finish_reason:
            break
    return pieces, answer.finish_reason


def test_token_by_token_the_text_never_shows_markup_and_the_answer_ends_with_tool_calls(tiny_f32):
    tokenizer = tiny_f32[1].tokenizer
    pieces, reason = answer_pieces(tokenizer, ANSWER)
    assert "".join(p.text for p in pieces) == "Sure."
    assert all("<" not in p.text for p in pieces)
    assert [c.name for p in pieces for c in p.tool_calls] == ["zoom", "get_weather"]
    assert reason == "tool_calls"


@pytest.mark.parametrize(
    "text, tools, cut, reason",
    [
        (ZOOM_CALL + "\nDone.", TOOLS, False, "stop"),  # text after the call: the answer does not end with it
        ("A", TOOLS, False, "stop"),
        (ZOOM_CALL + "\n<tool", TOOLS, False, "stop"),  # what was held back after the call is text
        (ZOOM_CALL, TOOLS, True, "length"),  # the call is complete, but max_tokens cut the answer
        (ZOOM_CALL, None, False, "stop"),  # no tools offered: nothing is parsed
    ],
)
def test_finish_reason_says_tool_calls_only_when_the_answer_ends_with_them(
    tiny_f32, text, tools, cut, reason
):
    tokenizer = tiny_f32[1].tokenizer
    max_tokens = len(tokenizer.encode(text)) if cut else 100  # ending on the call's last token
    pieces, finish = answer_pieces(tokenizer, text, tools, max_tokens)
    assert finish == reason
    if tools is None:
        assert "".join(p.text for p in pieces) == ZOOM_CALL and not any(p.tool_calls for p in pieces)
    if text.endswith("<tool"):
        assert "".join(p.text for p in pieces) == "<tool"


# ---- prompts ------------------------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "You look at pictures."},
    {"role": "user", "content": [{"type": "text", "text": "Zoom in on the cat, and the weather in Zürich?"}]},
    {
        "role": "assistant",
        "content": None,  # OpenAI's form of an answer that is only calls
        "tool_calls": [  # arguments as JSON text (OpenAI's) or as an object
            {"id": "c1", "type": "function", "function": {"name": "zoom", "arguments": '{"box": [1, 2]}'}},
            {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Z"}}},
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "zoomed"},
    {"role": "tool", "tool_call_id": "c2", "content": '{"sky": "clear"}'},
    {"role": "assistant", "content": "Let me check once more.", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Bern"}}}]},
    {"role": "tool", "content": "rain"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "zoom", "arguments": {"box": [3, 4]}}}]},
    {"role": "tool", "content": "zoomed again"},
    {"role": "user", "content": "Thanks. And now?"},
]  # fmt: skip


@pytest.mark.parametrize("template", ["instruct", "thinking"])
def test_tools_calls_and_results_render_as_transformers_renders_them(
    template, tiny_f32, thinking_f32, hf_tokenizer
):
    processor = (tiny_f32 if template == "instruct" else thinking_f32)[1]
    for messages in (CONVERSATION, CONVERSATION[:5], CONVERSATION[:8]):
        expected = hf_tokenizer.apply_chat_template(
            messages,
            tools=TOOLS,
            chat_template=processor.chat_template,
            tokenize=False,
            add_generation_prompt=True,
        )
        assert processor.render(normalize_messages(messages), tools=TOOLS) == expected
        ids = processor(messages, tools=TOOLS)["input_ids"][0]
        np.testing.assert_array_equal(ids, hf_tokenizer.encode(expected))
    assert "<tool_response>\nzoomed\n</tool_response>\n<tool_response>" in expected


# ---- the Python API -----------------------------------------------------------------------------------


def test_generate_offers_the_tools_and_returns_the_calls_beside_the_text(tiny_f32, monkeypatch):
    model, processor = tiny_f32
    say(monkeypatch, processor.tokenizer, ANSWER)
    question = [{"role": "user", "content": "What is in the box, and the weather?"}]
    answer = generate(model, processor, question, tools=TOOLS, max_tokens=80)
    assert answer == "Sure." and isinstance(answer, str)
    assert [(c.name, c.arguments) for c in answer.tool_calls] == [
        ("zoom", {"box": [10, 20, 30, 40]}),
        ("get_weather", {"city": "Zürich"}),
    ]
    assert answer.finish_reason == "tool_calls" and answer.invalid_tool_calls == []

    responses = list(stream_generate(model, processor, question, tools=TOOLS, max_tokens=80))
    with_tools = len(processor(question, tools=TOOLS)["input_ids"][0])
    assert responses[0].prompt_tokens == with_tools > len(processor(question)["input_ids"][0])
    completing = [r for r in responses if r.tool_calls]
    assert [len(r.tool_calls) for r in completing] == [1, 1]  # each call as soon as it is closed
    with pytest.raises(Qwen3VLError, match="tools item 1"):
        generate(model, processor, question, tools=[{"function": {}}])


def test_a_malformed_call_comes_back_as_text_and_is_reported(tiny_f32, monkeypatch):
    model, processor = tiny_f32
    bad = '<tool_call>\n{"name": "zoom", "arguments": {"box": [1, 2}\n</tool_call>'
    say(monkeypatch, processor.tokenizer, bad)
    answer = generate(model, processor, "Zoom in.", tools=TOOLS, max_tokens=80)
    assert answer == bad and answer.tool_calls == [] and answer.finish_reason == "stop"
    assert [c.text for c in answer.invalid_tool_calls] == [bad]


def test_a_session_records_the_calls_and_continues_with_their_results(tiny_f32, monkeypatch, hf_tokenizer):
    """The answer's calls are recorded as the template reads them back, so the cache is continued, not
    rewritten; the tool's results are a turn of their own; and the prompt the session built equals
    transformers' rendering of the recorded conversation."""
    model, processor = tiny_f32
    session = ChatSession(model, processor, tools=TOOLS, max_tokens=80)
    say(monkeypatch, processor.tokenizer, "I will zoom in.\n" + ZOOM_CALL)
    first = list(session.ask("What is in the box?"))
    assert first[-1].finish_reason == "tool_calls"
    (call,) = [c for r in first for c in r.tool_calls]
    function = {"name": "zoom", "arguments": {"box": [10, 20, 30, 40]}}
    assert session.messages[-1] == {
        "role": "assistant",
        "content": "I will zoom in.",
        "tool_calls": [{"id": call.id, "type": "function", "function": function}],
    }

    before = len(session.tokens)
    say(monkeypatch, processor.tokenizer, "A cat.")
    list(session.ask([{"role": "tool", "content": "a cat in a box"}]))
    response = "<tool_response>\na cat in a box\n</tool_response>"
    turn = f"\n<|im_start|>user\n{response}<|im_end|>\n<|im_start|>assistant\n"
    assert processor.tokenizer.decode(session.tokens[before : before + session.prefilled]) == turn
    expected = hf_tokenizer.apply_chat_template(
        session.messages[:-1], tools=TOOLS, tokenize=False, add_generation_prompt=True
    )
    prompt_end = len(session.tokens) - len(processor.tokenizer.encode("A cat.")) - 1
    assert processor.tokenizer.decode(session.tokens[:prompt_end]) == expected
    assert session.messages[-1] == {"role": "assistant", "content": "A cat."}
    with pytest.raises(Qwen3VLError, match="a turn adds user or tool messages"):
        list(session.ask([{"role": "assistant", "content": "I said so."}]))
