"""Thinking checkpoints: a model directory with the Qwen3-VL Thinking chat template (tests/data/
qwen3-vl-thinking) loads and renders its prompts as transformers does with that template; its answers
are split into reasoning and answer, on hand-made streams (the random model writes no `</think>` of its
own); and a conversation drops earlier answers' reasoning as the template does."""

import json

import numpy as np
import pytest
from checkpoints import THINKING_TEMPLATE
from scripted import say
from transformers import AutoTokenizer

from mlx_qwen3vl import ChatSession, generate, stream_generate
from mlx_qwen3vl.answer import AnswerText
from mlx_qwen3vl.messages import normalize_messages
from mlx_qwen3vl.reasoning import ReasoningSplit

END_OF_TURN = 151645
TEMPLATE = json.loads(THINKING_TEMPLATE.read_text())["chat_template"]
THOUGHT = "The user asks about the picture.\n\nI see two cats."
ANSWER = "There are two cats."
WRITTEN = f"{THOUGHT}\n</think>\n\n{ANSWER}"  # what the model writes after the prompt's `<think>\n`


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_checkpoint):
    return AutoTokenizer.from_pretrained(tiny_checkpoint)


def reference(hf_tokenizer, messages, **kwargs) -> str:
    return hf_tokenizer.apply_chat_template(
        messages, chat_template=TEMPLATE, tokenize=False, add_generation_prompt=True, **kwargs
    )


def test_a_thinking_model_directory_loads_with_its_template(thinking_f32, tiny_f32):
    processor = thinking_f32[1]
    assert processor.chat_template == TEMPLATE
    assert processor.thinks and not tiny_f32[1].thinks
    assert processor.render([{"role": "user", "content": "Hi"}]).endswith("<|im_start|>assistant\n<think>\n")


def test_a_template_saved_as_chat_template_jinja_is_read(tiny_thinking, tmp_path, thinking_f32):
    """Newer transformers save the template as chat_template.jinja instead of chat_template.json."""
    from mlx_qwen3vl.processor import Processor

    for file in tiny_thinking.iterdir():
        if file.name != "chat_template.json":
            (tmp_path / file.name).symlink_to(file)
    (tmp_path / "chat_template.jinja").write_text(TEMPLATE)
    processor = Processor.from_pretrained(tmp_path, thinking_f32[0].config)
    assert processor.chat_template == TEMPLATE and processor.thinks


IMAGE, VIDEO = {"type": "image"}, {"type": "video"}
CONVERSATIONS = {
    "image and video": [
        {"role": "system", "content": [{"type": "text", "text": "Be exact."}]},
        {"role": "user", "content": [IMAGE, VIDEO, {"type": "text", "text": "Same scene?"}]},
    ],
    "earlier reasoning dropped": [
        {"role": "user", "content": [IMAGE, {"type": "text", "text": "How many cats?"}]},
        {"role": "assistant", "content": ANSWER, "reasoning_content": THOUGHT},
        {"role": "user", "content": "And dogs?"},
    ],
    "reasoning inline in the content": [
        {"role": "user", "content": "How many cats?"},
        {"role": "assistant", "content": f"<think>\n{THOUGHT}\n</think>\n\n{ANSWER}"},
        {"role": "user", "content": [IMAGE, {"type": "text", "text": "And here?"}]},
    ],
    "reasoning kept after the last question": [
        {"role": "user", "content": "Weather in Bern?"},
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "I should look it up.",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Bern"}}}
            ],
        },
        {"role": "tool", "content": "rain"},
    ],
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize("add_vision_id", [False, True])
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_prompts_render_as_transformers_renders_them_with_the_thinking_template(
    name, add_vision_id, thinking_f32, hf_tokenizer
):
    processor = thinking_f32[1]
    messages = CONVERSATIONS[name]
    tools = TOOLS if "tool" in str(messages) else None
    expected = reference(hf_tokenizer, messages, tools=tools, add_vision_id=add_vision_id)
    assert (
        processor.render(normalize_messages(messages), add_vision_id=add_vision_id, tools=tools) == expected
    )
    if name == "earlier reasoning dropped":
        assert THOUGHT not in expected and ANSWER in expected
    if name == "reasoning kept after the last question":
        assert "<think>\nI should look it up.\n</think>" in expected


def test_text_prompt_ids_equal_transformers(thinking_f32, hf_tokenizer):
    messages = CONVERSATIONS["reasoning inline in the content"][:2] + [{"role": "user", "content": "Dogs?"}]
    np.testing.assert_array_equal(
        thinking_f32[1](messages)["input_ids"][0], hf_tokenizer.encode(reference(hf_tokenizer, messages))
    )


# ---- splitting an answer ------------------------------------------------------------------------------


def test_reasoning_and_answer_split_the_same_in_any_pieces():
    """Every cut of the written text into two pieces, and one character at a time: the reasoning and the
    answer are those the template reads (newlines at the edges dropped), and no piece of either shows
    any part of `</think>`."""
    text = "\n" + WRITTEN
    cuts = [[text[:k], text[k:]] for k in range(len(text) + 1)] + [list(text)]
    for pieces in cuts:
        split = ReasoningSplit()
        parts = [split.add(p, final=i == len(pieces) - 1) for i, p in enumerate(pieces)]
        assert "".join(r for r, _ in parts) == THOUGHT
        assert "".join(a for _, a in parts) == ANSWER
        assert not any("<" in r or "<" in a for r, a in parts)


def split_tokens(tokenizer, text: str, max_tokens=200, tools=None):
    tokens = tokenizer.encode(text) + [END_OF_TURN]
    answer = AnswerText(tokenizer, [], {END_OF_TURN}, max_tokens, reasoning=True, tools=tools)
    pieces = []
    for token in tokens:
        pieces.append(answer.add(token))
        if answer.finish_reason:
            break
    reasoning, said = "".join(p.reasoning for p in pieces), "".join(p.text for p in pieces)
    return reasoning, said, pieces, answer.finish_reason


def test_token_by_token_each_piece_belongs_to_one_part(thinking_f32):
    reasoning, said, pieces, reason = split_tokens(thinking_f32[1].tokenizer, WRITTEN)
    assert (reasoning, said, reason) == (THOUGHT, ANSWER, "stop")
    parts = [("reasoning" if p.reasoning else "answer") for p in pieces if p]
    assert parts == sorted(parts, reverse=True)  # all the reasoning, then all the answer


@pytest.mark.parametrize("max_tokens", [5, 200])
def test_an_answer_that_ends_before_closing_its_reasoning_is_all_reasoning(thinking_f32, max_tokens):
    tokenizer = thinking_f32[1].tokenizer
    reasoning, said, _, reason = split_tokens(tokenizer, THOUGHT + "\n", max_tokens)
    written = tokenizer.decode(tokenizer.encode(THOUGHT)[:max_tokens])
    assert said == "" and reasoning == written.rstrip("\n")
    assert reason == ("length" if max_tokens == 5 else "stop")


def test_calls_after_the_reasoning_are_calls(thinking_f32):
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Bern"}}\n</tool_call>'
    text = f"I need the weather.\n</think>\n\n{call}"
    reasoning, said, pieces, reason = split_tokens(thinking_f32[1].tokenizer, text, tools=TOOLS)
    assert (reasoning, said, reason) == ("I need the weather.", "", "tool_calls")
    assert [c.arguments for p in pieces for c in p.tool_calls] == [{"city": "Bern"}]


# ---- the Python API -----------------------------------------------------------------------------------


def test_generate_returns_the_answer_with_its_reasoning_beside_it(thinking_f32, monkeypatch):
    model, processor = thinking_f32
    say(monkeypatch, processor.tokenizer, WRITTEN)
    answer = generate(model, processor, "How many cats?", max_tokens=100)
    assert answer == ANSWER and answer.reasoning == THOUGHT and answer.finish_reason == "stop"
    responses = list(stream_generate(model, processor, "How many cats?", max_tokens=100))
    assert "".join(r.reasoning for r in responses) == THOUGHT
    assert not any(r.reasoning and r.text for r in responses)


def test_a_conversation_drops_earlier_reasoning_as_the_template_does(thinking_f32, monkeypatch, hf_tokenizer):
    """Turn 2's cache holds turn 1's answer without its reasoning: the tokens of the whole
    conversation as the template renders it, and turn 1's answer is fed again as the template writes it."""
    model, processor = thinking_f32
    session = ChatSession(model, processor, max_tokens=100)
    say(monkeypatch, processor.tokenizer, WRITTEN)
    first = list(session.ask("How many cats?"))
    assert "".join(r.text for r in first) == ANSWER
    assert session.messages[-1] == {"role": "assistant", "content": ANSWER, "reasoning_content": THOUGHT}

    second_answer = "No dogs."
    say(monkeypatch, processor.tokenizer, f"Looking for dogs.\n</think>\n\n{second_answer}")
    list(session.ask("And dogs?"))
    expected = reference(hf_tokenizer, session.messages[:-1])
    assert THOUGHT not in expected
    written = processor.tokenizer.encode(f"Looking for dogs.\n</think>\n\n{second_answer}")
    prompt = session.tokens[: len(session.tokens) - len(written) - 1]
    assert processor.tokenizer.decode(prompt) == expected
    assert session.cache.offset == len(session.tokens)
    # Only turn 1's answer (as the template writes it) and the new turn were fed.
    fed = processor.tokenizer.decode(prompt[len(prompt) - session.prefilled :])
    assert (
        fed == f"{ANSWER}<|im_end|>\n<|im_start|>user\nAnd dogs?<|im_end|>\n<|im_start|>assistant\n<think>\n"
    )
