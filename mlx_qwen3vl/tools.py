"""Tool calls. Qwen's chat template lists the tools in the system turn and asks for each call as

    <tool_call>
    {"name": <function-name>, "arguments": <args-json-object>}
    </tool_call>

(chat_template.json), and renders an assistant message's OpenAI-style `tool_calls` back in that form. This
module checks the tools a caller offers and finds the calls in a streamed answer: each block is parsed
into a `ToolCall`; a block that is not such a call (not JSON, no name, a tool that was not offered,
arguments that are not an object, never closed) is an `InvalidToolCall` and stays in the answer's text as
the model wrote it, so nothing the model said is lost. Whitespace between the text and a call, and
between calls, is the template's separator, not text.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from .errors import Qwen3VLError
from .markers import held_back

CALL_START, CALL_END = "<tool_call>", "</tool_call>"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    """A call the model made: the function's name and its arguments (parsed JSON)."""

    name: str
    arguments: dict
    id: str = field(default_factory=new_call_id)

    def message_entry(self) -> dict:
        """OpenAI's form in an assistant message's `tool_calls`, which the chat template renders back as
        the model wrote it."""
        function = {"name": self.name, "arguments": self.arguments}
        return {"id": self.id, "type": "function", "function": function}


@dataclass
class InvalidToolCall:
    """A `<tool_call>` block that is not a call: the block as written (it stays in the answer's text) and
    what is wrong with it."""

    text: str
    error: str


def tool_names(tools: list) -> set[str]:
    """The names of offered tools, each checked: OpenAI's `{"type": "function", "function": {"name": ...,
    "parameters": ...}}` or the function object itself (`{"name": ..., ...}`), as the template renders
    either."""
    if not isinstance(tools, (list, tuple)):
        raise Qwen3VLError(f"tools must be a list of function definitions, got {type(tools).__name__}")
    names = set()
    for number, tool in enumerate(tools, start=1):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            raise Qwen3VLError(
                f"tools item {number}: must be {{'type': 'function', 'function': {{'name': ..., "
                f"'parameters': ...}}}}, got {tool!r:.60}"
            )
        names.add(name)
    return names


def parse_call(block: str, names: set[str]) -> ToolCall | InvalidToolCall:
    """One block's inside (between `<tool_call>` and `</tool_call>`) as a call, or why it is not one."""
    written = CALL_START + block + CALL_END
    try:
        value = json.loads(block)
    except json.JSONDecodeError as e:
        return InvalidToolCall(written, f"not JSON ({e})")
    if not isinstance(value, dict):
        return InvalidToolCall(written, "not a JSON object")
    name, arguments = value.get("name"), value.get("arguments", {})
    if not isinstance(name, str) or not name:
        return InvalidToolCall(written, "no function name")
    if name not in names:
        return InvalidToolCall(written, f"no tool named {name!r} was offered")
    if isinstance(arguments, str):  # arguments written as a JSON string rather than an object
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    if not isinstance(arguments, dict):
        return InvalidToolCall(written, "arguments is not a JSON object")
    return ToolCall(name, arguments)


@dataclass
class ToolCallPiece:
    """What one piece of an answer's text adds: text to show, calls completed, invalid blocks found."""

    text: str = ""
    calls: list[ToolCall] = field(default_factory=list)
    invalid: list[InvalidToolCall] = field(default_factory=list)


class ToolCallSplit:
    """Splits an answer's streamed text into its text and its calls. Text that may be the start of
    `<tool_call>` (and the whitespace before it, which would be a separator) is held back until it is
    decided; the inside of a block is shown only if the block turns out invalid.

    The work is linear in the answer's length, however long a block is: the inside of an open block is
    kept as a list of pieces (not one string grown a token at a time), and each piece is searched for
    `</tool_call>` once, with only the few characters before it that a marker split across pieces may
    begin in. `scanned` counts the characters searched."""

    def __init__(self, names: set[str]):
        self.names = names
        self.pending = ""  # text outside a block not decided yet (what may begin a marker or separate)
        self.inside = False
        self.block: list[str] = []  # the inside of the open block so far, as it came
        self.tail = ""  # its last characters, where a `</tool_call>` split across pieces may begin
        self.gap = ""  # the whitespace dropped before the open block, given back if it is invalid
        self.after_call = False  # only whitespace since the last valid call
        self.scanned = 0

    @property
    def ended_with_call(self) -> bool:
        """Whether the answer so far ends with a valid call (whitespace aside)."""
        return self.after_call and not self.inside

    def add(self, text: str, final: bool = False) -> ToolCallPiece:
        """Take the next text (`final`: the answer's last) and say what it decides."""
        piece = ToolCallPiece()
        rest: str | None = text
        while rest is not None:
            rest = self._in_block(rest, piece) if self.inside else self._outside(rest, piece)
        if final:
            self._finish(piece)
        return piece

    def _in_block(self, text: str, piece: ToolCallPiece) -> str | None:
        """Take text inside the open block: the text after the block's end when it ends, else None."""
        self.block.append(text)
        window = self.tail + text
        self.scanned += len(window)
        end = window.find(CALL_END)
        if end < 0:
            self.tail = window[-(len(CALL_END) - 1) :]
            return None
        inside = "".join(self.block)
        cut = len(inside) - len(window) + end  # the window is the end of `inside`
        self.block, self.tail, self.inside = [], "", False
        call = parse_call(inside[:cut], self.names)
        if isinstance(call, ToolCall):
            piece.calls.append(call)
            self.after_call = True
        else:
            piece.invalid.append(call)
            piece.text += self.gap + call.text
            self.after_call = False
        return inside[cut + len(CALL_END) :]

    def _outside(self, text: str, piece: ToolCallPiece) -> str | None:
        """Take text outside a block: what follows a `<tool_call>` it opens, else None."""
        self.pending += text
        if self.after_call:  # whitespace after a call separates it from what follows
            self.pending = self.pending.lstrip()
            if not self.pending:
                return None
        self.scanned += len(self.pending)
        start = self.pending.find(CALL_START)
        if start >= 0:
            before = self.pending[:start]
            text = before.rstrip()
            piece.text += text
            self.after_call = self.after_call and not text
            self.gap = before[len(text) :]
            rest, self.pending, self.inside = self.pending[start + len(CALL_START) :], "", True
            return rest
        undecided = held_back(self.pending, [CALL_START])
        decided = self.pending[: len(self.pending) - undecided]
        undecided += len(decided) - len(decided.rstrip())  # a separator if a call follows
        shown = self.pending[: len(self.pending) - undecided]
        piece.text += shown
        self.after_call = self.after_call and not shown
        self.pending = self.pending[len(shown) :]
        return None

    def _finish(self, piece: ToolCallPiece) -> None:
        if self.inside:  # the answer ended inside a block
            written = CALL_START + "".join(self.block)
            piece.invalid.append(InvalidToolCall(written, f"{CALL_START} is never closed by {CALL_END}"))
            piece.text += self.gap + written
            self.inside, self.after_call, self.block, self.tail = False, False, [], ""
        elif self.pending:  # text held back (after a call, its whitespace is gone already)
            piece.text += self.pending
            self.after_call = False
        self.pending = ""


def parse_tool_calls(text: str, tools: list) -> ToolCallPiece:
    """A whole answer's text, its calls and its invalid blocks."""
    return ToolCallSplit(tool_names(tools)).add(text, final=True)
