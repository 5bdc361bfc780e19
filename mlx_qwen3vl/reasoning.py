"""Reasoning, for the Thinking checkpoints (Qwen3-VL-*-Thinking). Their chat template opens the answer
with `<|im_start|>assistant\\n<think>\\n`, so the model writes its reasoning first and closes it with
`</think>`; the answer follows. The template reads an assistant message back the same way: the reasoning
is what comes before `</think>` (or the message's `reasoning_content`), stripped of newlines at both ends,
and the answer what follows, stripped of newlines at its start; it keeps the reasoning only of the answers
after the last question, so earlier turns' reasoning leaves the conversation (chat_session.py follows it).

`ReasoningSplit` applies those rules to a streamed answer: the newlines at the edges are held back until
it is known whether more text follows, as is text that may be the start of `</think>`.
"""

from __future__ import annotations

from .markers import held_back

REASONING_START, REASONING_END = "<think>", "</think>"


def opens_reasoning(generation_prompt: str) -> bool:
    """Whether a template's generation prompt leaves the model inside a reasoning block."""
    return generation_prompt.rstrip("\n").endswith(REASONING_START)


class ReasoningSplit:
    """Splits an answer's streamed text into reasoning and answer. An answer that ends before `</think>`
    is all reasoning (it never got to the answer)."""

    def __init__(self):
        self.reasoning = True
        self.started = False  # some text of the current part was seen (leading newlines are dropped)
        self.pending = ""  # reasoning not shown yet: the end may be newlines or the start of </think>

    def add(self, text: str, final: bool = False) -> tuple[str, str]:
        """(reasoning, answer) that the next text decides; `final`: it is the answer's last."""
        if not self.reasoning:
            return "", self._answer(text)
        self.pending += text
        if not self.started:
            self.pending = self.pending.lstrip("\n")
            self.started = bool(self.pending)
        end = self.pending.find(REASONING_END)
        if end >= 0:
            reasoning, rest = self.pending[:end].rstrip("\n"), self.pending[end + len(REASONING_END) :]
            self.reasoning, self.started, self.pending = False, False, ""
            return reasoning, self._answer(rest)
        if final:
            reasoning, self.pending = self.pending.rstrip("\n"), ""
            return reasoning, ""
        undecided = held_back(self.pending, [REASONING_END])
        decided = self.pending[: len(self.pending) - undecided]
        shown = decided.rstrip("\n")
        self.pending = self.pending[len(shown) :]
        return shown, ""

    def _answer(self, text: str) -> str:
        if not self.started:
            text = text.lstrip("\n")
            self.started = bool(text)
        return text
