"""Structured output: decoding constrained so that the answer is JSON (`json_object`) or JSON following a
schema, with llguidance as the grammar engine.

llguidance (Microsoft's, used by llama.cpp, vLLM and mlx-vlm) was chosen over xgrammar and outlines-core:
it compiles a JSON schema lazily (an Earley parser over a lexer, no per-schema automaton built ahead, so a
large or recursive schema costs nothing up front, where outlines-core expands it into a regex automaton),
it supports the whole of JSON Schema that strict mode uses, it builds its token trie from the Hugging
Face tokenizer this package already loads, and it computes the allowed-token mask on the CPU in tens of
microseconds, independent of MLX. xgrammar is as fast but ships CUDA-oriented matchers and its own
tokenizer info handling; nothing it offers is needed here.

The mask is applied to the logits as an MLX `where` over the unpacked bitmask, the same on every device.
The constraint needs each sampled token on the host before the next step's mask exists, so a constrained
generation gives up the overlap of one step's computation with the host work of the previous one.
"""

from __future__ import annotations

import json
from functools import lru_cache

import mlx.core as mx
import numpy as np

from .errors import Qwen3VLError

# Any JSON object: what OpenAI's response_format {"type": "json_object"} asks for.
ANY_OBJECT = {"type": "object"}
# The JSON's layout: one space after commas and colons and no other whitespace between tokens. With
# whitespace allowed anywhere, a model can pad an answer with it until max_tokens and never close the
# JSON; this layout is also what Python's json.dumps writes. (A schema's own "x-guidance" wins.)
LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@lru_cache(maxsize=4)
def grammar_tokenizer(tokenizer, vocab_size: int):
    """llguidance's view of a Hugging Face fast tokenizer (built once: about a second)."""
    import llguidance.hf

    hf = getattr(tokenizer, "_tokenizer", tokenizer)  # mlx-lm's TokenizerWrapper holds the HF one
    return llguidance.hf.from_tokenizer(hf, n_vocab=vocab_size)


def check_schema(schema) -> str:
    """The grammar for a JSON schema (a dict, or its JSON text), or one Qwen3VLError line."""
    import llguidance

    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise Qwen3VLError(f"json_schema is not valid JSON ({e})") from None
    if not isinstance(schema, dict):
        raise Qwen3VLError(f"json_schema must be a JSON object (a schema), got {type(schema).__name__}")
    grammar = llguidance.LLMatcher.grammar_from_json_schema({**schema, "x-guidance": LAYOUT} | schema)
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise Qwen3VLError(f"json_schema cannot be used: {error}".splitlines()[0])
    return grammar


class JsonConstraint:
    """A logits processor (mlx-lm's `(tokens, logits) -> logits`) that allows only the tokens that keep the
    answer a prefix of JSON matching the grammar, and the end-of-turn token once the JSON is complete.
    One per generation: it follows the tokens it is shown."""

    def __init__(self, grammar: str, tokenizer, vocab_size: int):
        import llguidance

        self.matcher = llguidance.LLMatcher(grammar_tokenizer(tokenizer, vocab_size), grammar)
        self.vocab_size = vocab_size
        self.started = False
        self.bits = np.arange(32, dtype=np.uint32)

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        import llguidance.numpy

        if self.started:  # the token sampled at the previous step, now known
            self.matcher.consume_token(int(tokens[-1].item()))
        self.started = True
        error = self.matcher.get_error()
        if error:
            raise Qwen3VLError(f"structured output failed: {error}".splitlines()[0])
        words = llguidance.numpy.allocate_token_bitmask(1, self.vocab_size)
        llguidance.numpy.fill_next_token_bitmask(self.matcher, words, 0)
        allowed = (words.view(np.uint32)[0][:, None] >> self.bits) & 1
        allowed = mx.array(allowed.reshape(-1)[: logits.shape[-1]].astype(np.bool_))
        return mx.where(allowed, logits, -mx.inf)
