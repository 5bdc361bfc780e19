"""An answer's tokens as what it says, token by token, for `stream_generate`, `ChatSession` and the
server alike: its text (mlx-lm's streaming detokenizer, stop strings, end-of-turn ids, max_tokens), each
token's log-probabilities when asked for, and then, for a Thinking model, the reasoning apart from the
answer (reasoning.py), and with tools, the calls apart from the text (tools.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from .markers import first_marker, held_back
from .reasoning import ReasoningSplit
from .tools import InvalidToolCall, ToolCall, ToolCallSplit, tool_names


@dataclass
class TokenLogprobs:
    """A generated token's log-probability under the model and the `top` most likely tokens' (id,
    log-probability), most likely first. The model's own distribution: before repetition penalties,
    temperature, top-p or a schema's mask (as vLLM reports by default), so greedy's token is the first
    of `top`."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def token_logprobs(token: int, distribution: mx.array, top: int) -> TokenLogprobs:
    # On the host: a partial sort of one vocabulary row, no graph of its own each step.
    values = np.asarray(distribution)
    best = np.argpartition(-values, top - 1)[:top] if top else np.array([], dtype=np.int64)
    best = best[np.argsort(-values[best], kind="stable")]
    return TokenLogprobs(token, float(values[token]), [(int(i), float(values[i])) for i in best])


@dataclass
class AnswerPiece:
    """What one token lets show: answer text, reasoning, tool calls completed, invalid call blocks (whose
    text is in `text`)."""

    text: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    invalid_tool_calls: list[InvalidToolCall] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.text or self.reasoning or self.tool_calls)


class AnswerText:
    """One answer's tokens as its pieces: mlx-lm's streaming detokenizer (one per answer), the end-of-turn
    ids, stop strings (never shown: text that could begin one is held back), max_tokens, and each token's
    log-probabilities (`top` alternatives) when asked for. `reasoning`: the answer begins inside a
    reasoning block (a Thinking model). `tools`: the tools offered, whose calls are parsed out of the text.

    `finish_reason` once the answer is over: "stop" (end-of-turn token), "stop_string", "length", or
    "tool_calls" when it stopped right after one or more calls."""

    def __init__(
        self,
        tokenizer,
        stops: list[str],
        stop_ids,
        max_tokens: int,
        top: int | None = None,
        reasoning: bool = False,
        tools: list | None = None,
    ):
        self.detokenizer = tokenizer.detokenizer  # mlx-lm's wrapper gives each caller a fresh copy
        self.stops, self.stop_ids, self.max_tokens, self.top = stops, stop_ids, max_tokens, top
        self.count = 0
        # The answer's text not shown yet: what may still begin a stop string, then the newest piece. Only
        # it is searched for stop strings, so a token's work does not grow with the answer's length.
        self.unshown = ""
        self.cut: int | None = None  # where a stop string begins in `unshown`
        self.finish_reason: str | None = None
        self.logprobs: TokenLogprobs | None = None  # of the last token added
        self.reasoning = ReasoningSplit() if reasoning else None
        self.calls = ToolCallSplit(tool_names(tools)) if tools else None

    def add(self, token: int, distribution: mx.array | None = None) -> AnswerPiece:
        """Take the next token: what it lets show (nothing while a character is incomplete or the tail
        could still become a stop string or a marker); once the answer is over, the rest."""
        text = self._text(token, distribution)
        final = self.finish_reason is not None
        reasoning = ""
        if self.reasoning is not None:
            reasoning, text = self.reasoning.add(text, final)
        if self.calls is None:
            return AnswerPiece(text, reasoning)
        found = self.calls.add(text, final)
        if final and self.finish_reason in ("stop", "stop_string") and self.calls.ended_with_call:
            self.finish_reason = "tool_calls"
        return AnswerPiece(found.text, reasoning, found.calls, found.invalid)

    def _text(self, token: int, distribution) -> str:
        self.count += 1
        if token in self.stop_ids:
            self.logprobs = None
            return self._end("stop")
        if self.top is not None:
            self.logprobs = token_logprobs(token, distribution, self.top)
        self.detokenizer.add_token(token)
        self.unshown += self.detokenizer.last_segment
        self.cut = first_marker(self.unshown, self.stops)
        if self.cut is not None:
            return self._end("stop_string")
        if self.count == self.max_tokens:
            return self._end("length")
        # Shown text never holds the start of a stop string (it was held back), so what may begin one
        # lies within `unshown`.
        visible = len(self.unshown) - held_back(self.unshown, self.stops)
        piece, self.unshown = self.unshown[:visible], self.unshown[visible:]
        return piece

    def _end(self, reason: str) -> str:
        self.finish_reason = reason
        if self.cut is None:
            self.detokenizer.finalize()
            self.unshown += self.detokenizer.last_segment
        return self.unshown[: self.cut]


class Answer(str):
    """`generate`'s result: the answer's text, a `str` as before, with what was said beside it:
    `reasoning` (a Thinking model's), `tool_calls`, `invalid_tool_calls` and `finish_reason`."""

    reasoning: str
    tool_calls: list[ToolCall]
    invalid_tool_calls: list[InvalidToolCall]
    finish_reason: str | None

    @classmethod
    def of(cls, responses) -> Answer:
        """The answer streamed as these responses (generation.GenerationResponse)."""
        answer = cls("".join(r.text for r in responses))
        answer.reasoning = "".join(r.reasoning for r in responses)
        answer.tool_calls = [c for r in responses for c in r.tool_calls]
        answer.invalid_tool_calls = [c for r in responses for c in r.invalid_tool_calls]
        answer.finish_reason = responses[-1].finish_reason if responses else None
        return answer
