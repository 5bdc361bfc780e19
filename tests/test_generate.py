"""Generation: greedy tokens against transformers' generate, the chat session's cache reuse, streaming
text, sampling options."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from checkpoints import reference_greedy
from compare import LOGPROB
from media import picture, write_video
from prompts import torch_inputs
from scripted import script

from mlx_qwen3vl import ChatSession, Qwen3VLError, generate, stream_generate
from mlx_qwen3vl.generation import SamplingOptions, prefill


def streamed_tokens(model, processor, prompt, **options):
    responses = list(stream_generate(model, processor, prompt, **options))
    return [r.token for r in responses], responses


def reference_logprobs(reference, inputs, tokens) -> np.ndarray:
    """transformers' log-probabilities over the vocabulary before each of `tokens`, teacher-forced after
    our processor's output `inputs` (equal to its own, see test_processor)."""
    ids = np.concatenate([inputs["input_ids"], [tokens[:-1]]], axis=1)
    with torch.no_grad():
        logits = reference(**torch_inputs({**inputs, "input_ids": ids})).logits[0].double()
    return torch.log_softmax(logits, dim=-1)[-len(tokens) :].numpy()


@pytest.mark.parametrize("media", ["image", "video"])
def test_greedy_stream_generate_equals_transformers_generate(media, tiny_f32, tiny_reference, tmp_path):
    model, processor = tiny_f32
    if media == "image":
        prompt, kwargs = "Describe the picture.", {"images": [picture(200, 140, 1)]}
    else:
        prompt, kwargs = "What happens?", {"videos": [write_video(tmp_path / "clip.avi", frames=24)]}
    tokens, responses = streamed_tokens(model, processor, prompt, max_tokens=16, temperature=0, **kwargs)
    expected, _ = reference_greedy(tiny_reference, torch_inputs(processor(prompt, **kwargs)), 16)
    assert responses[-1].finish_reason == "length"
    assert tokens == expected


def test_logprobs_are_the_models_own_and_equal_transformers(tiny_f32, tiny_reference):
    model, processor = tiny_f32
    prompt, images = "Describe the picture.", [picture(200, 140, 1)]
    tokens, responses = streamed_tokens(
        model, processor, prompt, images=images, max_tokens=8, temperature=0, logprobs=5
    )
    expected = reference_logprobs(tiny_reference, processor(prompt, images=images), tokens)
    for token, response, reference in zip(tokens, responses, expected, strict=True):
        entry = response.logprobs
        assert entry.token == token and len(entry.top) == 5
        assert abs(entry.logprob - reference[token]) < LOGPROB
        assert entry.top[0][0] == token  # greedy takes the most likely
        assert np.allclose([lp for _, lp in entry.top], np.sort(reference)[::-1][:5], rtol=0, atol=LOGPROB)
        assert [t for t, _ in entry.top] == sorted(
            (t for t, _ in entry.top), key=lambda t: -reference[t]
        )  # most likely first
    _, plain = streamed_tokens(model, processor, prompt, images=images, max_tokens=2, temperature=0)
    assert all(r.logprobs is None for r in plain)  # computed only when asked for


def model_logprobs(model, processor, prompt: str, tokens: list[int]) -> np.ndarray:
    """Our model's log-softmax before each of `tokens`, in one pass over the prompt and the answer."""
    ids = processor(prompt)["input_ids"][0].tolist()
    logits = model(mx.array([ids + tokens[:-1]]), cache=model.make_cache())[0, -len(tokens) :]
    shifted = np.array(logits.astype(mx.float32), dtype=np.float64)
    shifted -= shifted.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_logprobs_are_taken_before_penalties_and_temperature(tiny_f32):
    model, processor = tiny_f32
    sampled, responses = streamed_tokens(
        model, processor, "Tell me.", max_tokens=6, temperature=1.5, seed=3, logprobs=0
    )
    expected = model_logprobs(model, processor, "Tell me.", sampled)
    for token, response, row in zip(sampled, responses, expected, strict=True):
        assert response.logprobs.top == [] and abs(response.logprobs.logprob - row[token]) < LOGPROB
    # Greedy with a penalty that forbids repeats: where the model's favourite was a repeat, the token
    # taken is another, and the favourite is still reported first.
    tokens, responses = streamed_tokens(
        model, processor, "Tell me.", max_tokens=12, temperature=0, presence_penalty=1e4, logprobs=1
    )
    expected = model_logprobs(model, processor, "Tell me.", tokens)
    favourites = [int(row.argmax()) for row in expected]
    assert any(f != t for f, t in zip(favourites, tokens, strict=True))
    for token, favourite, response, row in zip(tokens, favourites, responses, expected, strict=True):
        assert response.logprobs.top[0][0] == favourite
        assert abs(response.logprobs.logprob - row[token]) < LOGPROB


def test_chunked_prefill_splitting_an_image_gives_the_same_answer(tiny_f32):
    """7-token prefill chunks cut through the image's 24 tokens and its DeepStack rows."""
    model, processor = tiny_f32
    args = ("Describe.",)
    kwargs = {"images": [picture(128, 96, 2)], "max_tokens": 6, "temperature": 0}
    whole, _ = streamed_tokens(model, processor, *args, **kwargs)
    chunked, _ = streamed_tokens(model, processor, *args, prefill_step_size=7, **kwargs)
    assert chunked == whole


@pytest.mark.parametrize("backend, chunks", [("gpu", 1), ("cpu", 2)])
def test_prompts_are_fed_in_the_backends_chunks(tiny_checkpoint, backend, chunks, monkeypatch):
    """A 600-token prompt: one chunk on the GPU path (2048 tokens, large matmuls), two on the CPU (512,
    bounding the attention fallback's scores); the model's own choice, not the caller's."""
    from mlx_qwen3vl import load
    from mlx_qwen3vl.model import Model

    model, processor = load(tiny_checkpoint, dtype="float32", backend=backend)
    lengths = []
    decode = Model.decode

    def counted(self, prepared, *args, **kwargs):
        lengths.append(prepared.length)
        return decode(self, prepared, *args, **kwargs)

    monkeypatch.setattr(Model, "decode", counted)
    generate(model, processor, "sea " * 600, max_tokens=1, temperature=0)
    prompt_chunks = [n for n in lengths if n > 1]
    assert sum(prompt_chunks) > 600 and len(prompt_chunks) == chunks


@pytest.mark.parametrize("backend", ["gpu", "cpu"])
def test_the_last_layer_computes_only_what_the_answer_reads(tiny_checkpoint, backend, monkeypatch):
    """Of a prompt fed in chunks, the cache keeps every layer's keys and values, and the answer reads the
    last position's output alone: the last layer's MLP runs once, on that one row, while the others run
    on every chunk, and every layer's cache holds the whole prompt. (The logits are transformers': the
    reference tests feed prompts the same way.)"""
    from mlx_qwen3vl import load
    from mlx_qwen3vl.language import MLP

    model, _ = load(tiny_checkpoint, dtype="float32", backend=backend)
    last = model.layers[-1].mlp
    rows = {"last": [], "others": []}
    call = MLP.__call__

    def counted(self, x):
        rows["last" if self is last else "others"].append(x.shape[1])
        return call(self, x)

    monkeypatch.setattr(MLP, "__call__", counted)
    cache = model.make_cache()
    logits = prefill(model, model.prepare(mx.arange(100, 140)), cache, step_size=16)
    assert logits.shape == (1, model.config.text_config.vocab_size)
    assert rows["last"] == [1]
    assert rows["others"] == [16] * (len(model.layers) - 1) * 2 + [8] * (len(model.layers) - 1)
    assert [c.offset for c in cache] == [40] * len(model.layers)


def test_second_turn_reuses_the_cache_and_matches_one_pass(tiny_f32, monkeypatch):
    model, processor = tiny_f32
    session = ChatSession(model, processor, max_tokens=6, temperature=0)
    image = picture(160, 96, 3)
    first = list(session.ask("What is this?", images=[image]))
    assert first[-1].finish_reason in ("length", "stop")
    before = len(session.tokens)

    encodes = []
    monkeypatch.setattr(
        model, "encode_vision", lambda *a: encodes.append(a) or type(model).encode_vision(model, *a)
    )
    second = list(session.ask("And its colour?", logprobs=1))
    assert encodes == []  # the image of turn 1 is not encoded again

    # Only the new turn was prefilled: closing of the answer, the user turn, the generation prompt.
    new = processor.tokenizer.decode(session.tokens[before : before + session.prefilled])
    closing = "\n" if session.tokens[before - 1] in processor.tokenizer.eos_token_ids else "<|im_end|>\n"
    assert new == closing + "<|im_start|>user\nAnd its colour?<|im_end|>\n<|im_start|>assistant\n"
    assert session.prefilled < before

    # One pass over the same conversation tokens, from an empty cache, gives the same answer.
    prompt = session.tokens[: before + session.prefilled]
    inputs = processor("What is this?", images=[image])
    cache = model.make_cache()
    logits = model(
        np.array([prompt]),
        pixel_values=inputs["pixel_values"],
        image_grid_thw=inputs["image_grid_thw"],
        cache=cache,
    )[:, -1]
    tokens, logprobs = [], []
    for _ in range(6):
        tokens.append(int(mx.argmax(logits, axis=-1).item()))
        logprobs.append((logits - mx.logsumexp(logits, axis=-1))[0, tokens[-1]].item())
        logits = model(mx.array([[tokens[-1]]]), cache=cache)[:, -1]
    assert [r.token for r in second] == tokens[: len(second)]
    shown = [r for r in second if r.logprobs]
    assert [r.logprobs.top[0][0] for r in shown] == tokens[: len(shown)]
    assert [r.logprobs.logprob for r in shown] == pytest.approx(logprobs[: len(shown)], rel=0, abs=LOGPROB)


def test_session_clear_and_system_prompt(tiny_f32):
    model, processor = tiny_f32
    session = ChatSession(model, processor, system="Be brief.", max_tokens=3, temperature=0)
    list(session.ask("Hi"))
    assert session.cache.offset > 0 and len(session.messages) == 3
    session.clear()
    assert session.cache.offset == 0 and session.messages == [{"role": "system", "content": "Be brief."}]
    list(session.ask("Hi"))
    assert processor.tokenizer.decode(session.tokens).startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_interrupted_answer_keeps_the_session_consistent(tiny_f32):
    model, processor = tiny_f32
    session = ChatSession(model, processor, max_tokens=50, temperature=0)
    answer = session.ask("Count.")
    next(answer), next(answer), next(answer)
    with pytest.raises(KeyboardInterrupt):
        answer.throw(KeyboardInterrupt)
    assert session.cache.offset == len(session.tokens)
    assert session.messages[-1]["role"] == "assistant"
    list(session.ask("Again."))  # the conversation goes on
    assert session.cache.offset == len(session.tokens)


TEXT = "你好，世界！🙂👍🏽 naïve café — ok"


def scripted_answer(model, processor, monkeypatch, text, **options):
    tokens = processor.tokenizer.encode(text)
    script(monkeypatch, tokens)
    responses = list(stream_generate(model, processor, "Say it.", max_tokens=len(tokens) + 2, **options))
    return tokens, responses


@pytest.mark.parametrize("text", [TEXT, " " + TEXT])
def test_streamed_pieces_join_to_the_decoded_text(tiny_f32, monkeypatch, text):
    model, processor = tiny_f32
    tokens, responses = scripted_answer(model, processor, monkeypatch, text)
    assert len(tokens) > len(text.split())  # characters that span several tokens
    assert "".join(r.text for r in responses) == processor.tokenizer.decode(tokens) == text
    assert responses[-1].finish_reason == "stop"
    assert all("\ufffd" not in r.text for r in responses)  # no half characters shown


def test_every_shown_token_has_its_logprobs_and_the_end_of_turn_none(tiny_f32, monkeypatch):
    model, processor = tiny_f32
    tokens, responses = scripted_answer(model, processor, monkeypatch, TEXT, logprobs=2)
    assert [r.logprobs.token for r in responses[:-1]] == tokens  # pieces of characters included
    assert responses[-1].finish_reason == "stop" and responses[-1].logprobs is None


def test_stop_string_ends_the_answer_and_is_not_shown(tiny_f32, monkeypatch):
    model, processor = tiny_f32
    _, responses = scripted_answer(model, processor, monkeypatch, TEXT, stop=["🙂👍"])
    assert "".join(r.text for r in responses) == "你好，世界！"
    assert responses[-1].finish_reason == "stop_string"


def test_sampling_options_do_what_they_say(tiny_f32):
    model, processor = tiny_f32
    greedy = generate(model, processor, "Tell me.", max_tokens=8, temperature=0)
    assert generate(model, processor, "Tell me.", max_tokens=8, temperature=1.0, top_k=1) == greedy
    one = generate(model, processor, "Tell me.", max_tokens=8, temperature=1.5, seed=7)
    assert generate(model, processor, "Tell me.", max_tokens=8, temperature=1.5, seed=7) == one
    others = {generate(model, processor, "Tell me.", max_tokens=8, temperature=1.5, seed=s) for s in range(3)}
    assert len(others) > 1
    tokens, responses = streamed_tokens(model, processor, "Tell me.", max_tokens=5, temperature=0)
    assert len(tokens) == 5 and responses[-1].finish_reason == "length"
    assert (
        responses[-1].prompt_tokens > 0 and responses[-1].generation_tps > 0 and responses[-1].peak_memory > 0
    )
    # A large presence penalty forbids repeating any token of the last 20.
    repeats, _ = streamed_tokens(model, processor, "Tell me.", max_tokens=12, temperature=0)
    assert len(set(repeats)) < len(repeats)
    distinct, _ = streamed_tokens(
        model, processor, "Tell me.", max_tokens=12, temperature=0, presence_penalty=1e4
    )
    assert len(set(distinct)) == len(distinct)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"temperature": -1}, "temperature=-1 is out of range"),
        ({"top_p": 1.5}, "top_p=1.5 is out of range"),
        ({"top_k": 2.5}, "top_k=2.5 is out of range"),
        ({"temperature": float("inf")}, "temperature=inf is out of range: must be a number >= 0"),
        ({"presence_penalty": float("nan")}, "presence_penalty=nan is out of range: must be a number"),
        ({"repetition_penalty": "1.1"}, "repetition_penalty='1.1' is out of range: must be a number > 0"),
        ({"seed": True}, "seed=True is out of range: must be a whole number"),
        ({"max_tokens": 0}, "max_tokens=0 is out of range"),
        ({"max_tokens": None}, "max_tokens=None is out of range: must be a whole number >= 1"),
        ({"max_tokens": "8"}, "max_tokens='8' is out of range"),
        ({"stop": 5}, "stop=5: must be a string or a list of strings"),
        ({"stop": ["ok", None]}, "must be a string or a list of strings"),
        ({"max_tokens": 300_000}, "exceeds the model's context"),
        ({"fps": 0, "videos": ["x.mp4"]}, "fps"),
        ({"logprobs": 21}, "logprobs=21 is out of range: must be a whole number in \\[0, 20\\]"),
        ({"logprobs": True}, "logprobs=True is out of range"),
    ],
)
def test_out_of_range_options_are_refused(tiny_f32, options, message):
    model, processor = tiny_f32
    with pytest.raises(Qwen3VLError, match=message):
        generate(model, processor, "Hi", **options)
    if options == {"max_tokens": None}:
        return  # for a chat turn, max_tokens=None means the session's own
    session = ChatSession(model, processor)
    with pytest.raises(Qwen3VLError, match=message):
        list(session.ask("Hi", **options))
    assert session.cache.offset == 0 and not session.messages  # refused before anything was done


def test_unset_sampling_options_come_from_generation_config(tiny_f32):
    _, processor = tiny_f32
    options = SamplingOptions().with_defaults(processor.generation_config)
    assert (options.temperature, options.top_p, options.top_k) == (0.7, 0.8, 20)  # the published file
    assert SamplingOptions(temperature=0).with_defaults(processor.generation_config).temperature == 0
    assert SamplingOptions().with_defaults({"do_sample": False}).temperature == 0.0


@pytest.mark.parametrize("end_of_turn", [151645, 151643])
def test_every_end_of_turn_id_stops(tiny_f32, monkeypatch, end_of_turn):
    model, processor = tiny_f32
    tokens = processor.tokenizer.encode("Hello") + [end_of_turn]
    script(monkeypatch, tokens)
    responses = list(stream_generate(model, processor, "Hi", max_tokens=20))
    assert "".join(r.text for r in responses) == "Hello"
    assert responses[-1].finish_reason == "stop" and responses[-1].token == end_of_turn


def test_a_conversation_that_outgrows_the_context_gets_a_clear_message(tiny_f32, monkeypatch):
    model, processor = tiny_f32
    session = ChatSession(model, processor, max_tokens=4, temperature=0)
    list(session.ask("Hi"))
    monkeypatch.setattr(model.config.text_config, "max_position_embeddings", session.cache.offset + 10)
    with pytest.raises(Qwen3VLError, match="exceeds the model's context"):
        list(session.ask("Tell me a much longer story about the sea, please."))
    assert session.cache.offset == len(session.tokens)  # the session is unchanged and usable


def test_interrupt_while_a_token_is_awaited_leaves_cache_and_record_equal(tiny_f32, monkeypatch):
    """Ctrl-C while the next token's value is awaited: that token is already in the cache (it was fed
    before being handed out) but not recorded; the session cuts the cache back to its record."""
    model, processor = tiny_f32
    session = ChatSession(model, processor, max_tokens=50, temperature=0)
    answer = session.ask([{"type": "text", "text": "Count."}])  # content parts of one user turn
    next(answer), next(answer)
    calls = {"n": 0}
    real_item = mx.array.item

    def interrupted_item(self):
        calls["n"] += 1
        raise KeyboardInterrupt

    monkeypatch.setattr(mx.array, "item", interrupted_item)
    with pytest.raises(KeyboardInterrupt):
        next(answer)
    monkeypatch.setattr(mx.array, "item", real_item)
    assert calls["n"] == 1
    assert session.cache.offset == len(session.tokens)
    list(session.ask("Again."))
    assert session.cache.offset == len(session.tokens)


def test_prefill_of_an_empty_prompt_is_refused(tiny_f32):
    model = tiny_f32[0]
    cache = model.make_cache()
    with pytest.raises(Qwen3VLError, match="the prompt is empty"):
        prefill(model, model.prepare(np.zeros((1, 0), np.int32), cache=cache), cache)


def test_progress_says_what_each_medium_became_then_counts_the_work(tiny_f32):
    """What a front end shows for a long input: each image or video as sized, before the vision tower
    runs; then the tower's blocks; then the prompt's chunks. The answer is the same as without."""
    from mlx_qwen3vl.progress import Progress

    model, processor = tiny_f32
    events: list[Progress] = []
    options = {"images": [picture(300, 200, 7)], "max_tokens": 4, "temperature": 0, "prefill_step_size": 32}
    with_progress = generate(model, processor, "Describe.", progress=events.append, **options)
    assert with_progress == generate(model, processor, "Describe.", **options)
    assert [e.stage for e in events][0] == "media"
    assert events[0].detail == "image 300x200 -> 320x224 pixels, 70 tokens"
    blocks = len(model.model.visual.blocks)
    assert [(e.done, e.total) for e in events if e.stage == "vision"] == [
        (i, blocks) for i in range(1, blocks + 1)
    ]
    chunks = [(e.done, e.total) for e in events if e.stage == "prefill"]
    assert chunks and all(done < total for done, total in chunks) and chunks == sorted(chunks)

    session = ChatSession(model, processor, max_tokens=3, temperature=0)
    seen: list[Progress] = []
    list(session.ask("And this?", videos=[write_video_frames()], progress=seen.append))
    assert seen[0].stage == "media" and seen[0].detail.startswith("video, 4 frames of 64x48 -> 2 x ")


def write_video_frames():
    return [np.full((48, 64, 3), 40 * i, np.uint8) for i in range(4)]


def test_json_schema_constrains_the_answer(tiny_f32):
    """The random model writes JSON that follows the schema, from the first token (structured.py);
    a schema that is not one is one line."""
    import json

    model, processor = tiny_f32
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "size": {"type": "integer", "minimum": 0, "maximum": 999},
        },
        "required": ["name", "size"],
        "additionalProperties": False,
    }
    for seed in range(3):
        text = generate(
            model, processor, "Describe.", json_schema=schema, max_tokens=60, temperature=1.0, seed=seed
        )
        value = json.loads(text)
        assert set(value) == {"name", "size"} and isinstance(value["size"], int) and len(value["name"]) <= 8
    assert json.loads(
        generate(model, processor, "Hi", json_schema=json.dumps(schema), max_tokens=60, temperature=0)
    )
    with pytest.raises(Qwen3VLError, match="json_schema must be a JSON object"):
        generate(model, processor, "Hi", json_schema=[1, 2])
    with pytest.raises(Qwen3VLError, match="json_schema is not valid JSON"):
        generate(model, processor, "Hi", json_schema="{nope")
