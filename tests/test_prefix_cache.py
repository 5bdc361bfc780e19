"""The one rule for "how much of this cache is still valid for this prompt?" (prefix_cache.py), read on
real turns of the test model: keys are token ids plus each image's digest, a shared prefix is cut before
an image it would split and kept one token short of the prompt; and a turn run against a cache that holds
its prefix gives the tokens it gives from an empty one."""

from __future__ import annotations

import gc
import weakref

import pytest
from media import picture
from PIL import Image

from mlx_qwen3vl.generation import run_turn
from mlx_qwen3vl.options import GenerationOptions, SamplingOptions
from mlx_qwen3vl.prefix_cache import PrefixCache
from mlx_qwen3vl.turn import Turn

GREEDY = GenerationOptions(max_tokens=4, sampling=SamplingOptions(temperature=0))


def noise(seed: int) -> Image.Image:
    return picture(96, 64, seed)


def conversation(first_image, question: str = "And the colours?") -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "image", "image": first_image}, "Describe it."]},
        {"role": "assistant", "content": "A picture of noise."},
        {"role": "user", "content": question},
    ]


def turn_of(processor, messages) -> Turn:
    return Turn.from_prompt(processor, messages, options=GREEDY)


def answered(model, turn: Turn, cache: PrefixCache) -> tuple[list[int], int]:
    """The answer's tokens and how many prompt tokens were prefilled for it."""
    responses = list(run_turn(model, turn, cache))
    return [r.token for r in responses], responses[0].prompt_tokens


@pytest.fixture(scope="module")
def held(tiny_f32):
    """A cache holding the first conversation's prompt and answer."""
    model, processor = tiny_f32
    turn = turn_of(processor, conversation(noise(1)))
    cache = PrefixCache(model)
    tokens, _ = answered(model, turn, cache)
    return turn, tokens, cache


def test_the_same_prompt_is_continued_one_token_short(tiny_f32, held):
    turn, tokens, cache = held
    assert cache.offset == len(turn.ids) + len(tokens)
    again = turn_of(tiny_f32[1], conversation(noise(1)))
    assert cache.usable(again) == len(again.ids) - 1  # its last position's logits are needed


def test_an_edited_later_message_is_continued_up_to_the_edit(tiny_f32, held):
    turn, _, cache = held
    edited = turn_of(tiny_f32[1], conversation(noise(1), "And the shapes?"))
    edit = next(i for i, (a, b) in enumerate(zip(turn.ids, edited.ids, strict=False)) if a != b)
    assert edit > turn.spans[0][1]  # after the image
    assert cache.usable(edited) == edit


def test_another_image_in_the_same_place_is_never_taken_from_the_cache(tiny_f32, held):
    """The same text and the same number of image tokens, another picture: the keys differ at the image's
    first pad token, and the cut goes back to the image's start."""
    turn, _, cache = held
    other = turn_of(tiny_f32[1], conversation(noise(2)))
    assert other.ids == turn.ids  # the token ids alone cannot tell
    assert cache.usable(other) == other.spans[0][0]


def test_a_turn_continued_from_a_cache_answers_as_from_an_empty_one(tiny_f32, held):
    """The cache is trimmed to the edited turn's shared prefix and the rest prefilled: the same tokens as
    the whole turn from an empty cache, with the rope delta an image leaves."""
    model, processor = tiny_f32
    turn, tokens, _ = held
    cache = PrefixCache(model)
    answered(model, turn, cache)
    edited = turn_of(processor, conversation(noise(1), "And the shapes?"))
    reusable = cache.usable(edited)
    continued, prefilled = answered(model, edited, cache)
    assert prefilled == len(edited.ids) - reusable < len(edited.ids) - turn.spans[0][1]
    fresh, _ = answered(model, edited, PrefixCache(model))
    assert continued == fresh
    assert cache.offset == len(edited.ids) + len(continued)
    assert cache.keys[: len(edited.ids)] == edited.keys  # the cache says what it holds


def test_a_kept_cache_lets_go_of_its_turns_pixel_rows(tiny_f32):
    """A cache kept past its turn (a chat session's, the server's store) holds keys, not the turn: the
    images' pixel rows are freed with the turn, and the keys still know the image."""
    model, processor = tiny_f32
    turn = turn_of(processor, conversation(noise(3)))
    rows = weakref.ref(turn.media[0].pixel_values)
    cache = PrefixCache(model)
    answered(model, turn, cache)
    cache.keep()
    digest = turn.media[0].digest
    del turn
    gc.collect()
    assert rows() is None
    assert any(key[1] == digest for key in cache.keys)
