"""Chat with Qwen3-VL about images and videos in the terminal.

    python chat.py --image cat.jpg --prompt "What is in this picture?"   # one answer, then exit
    echo "Write a haiku" | python chat.py                               # the same, question from a pipe
    python chat.py                                                      # a conversation; /help lists commands

Argument parsing and terminal I/O only: loading, prompts, media and generation live in `mlx_qwen3vl`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import termios
import time
from contextlib import closing, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

# Light imports only: --help and argument errors answer before MLX and transformers are loaded.
from mlx_qwen3vl import DEFAULT_MODEL, Qwen3VLError
from mlx_qwen3vl.cli import (
    ArgumentParser,
    add_kv_cache_arguments,
    fail,
    join_launched_ranks,
    number,
    quiet_libraries,
)
from mlx_qwen3vl.options import DEFAULT_MAX_TOKENS, DTYPE_NAMES, MAX_TOKENS, MEDIA, SAMPLING

if TYPE_CHECKING:
    from mlx_qwen3vl import ChatSession
    from mlx_qwen3vl.grounding import Drawings

HISTORY_FILE = Path.home() / ".cache" / "mlx-qwen3vl" / "chat_history"
PROMPT = "> "
HELP = """\
/image PATH   attach an image to the next question
/video PATH   attach a video to the next question
/clear        start a new conversation (the system prompt stays)
/system TEXT  set the system prompt and start a new conversation (no TEXT removes it)
/stats        statistics of the last answer
/draw [DIR]   save again the last answer's boxes and points drawn on its image (each answer that locates
              something on an image is saved as it comes: in --draw DIR, else the current directory)
/help         this list
/quit         quit (or Ctrl-D); Ctrl-C stops an answer, or clears the line at the prompt"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(
        description="Chat with Qwen3-VL about images and videos: one answer with --prompt or a piped "
        "question, else a conversation.",
        epilog="commands in a conversation:\n" + HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help="model directory or Hugging Face repo id (%(default)s)"
    )
    p.add_argument(
        "--dtype", choices=DTYPE_NAMES, help="compute dtype (default: bfloat16 on a GPU, float32 on the CPU)"
    )
    p.add_argument(
        "--image", action="append", default=[], metavar="PATH", help="attach to the first question"
    )
    p.add_argument(
        "--video", action="append", default=[], metavar="PATH", help="attach to the first question"
    )
    p.add_argument("--prompt", help="answer this question and exit")
    p.add_argument("--system", help="system prompt")
    p.add_argument(
        "--hide-thinking",
        action="store_true",
        help="a Thinking model's reasoning is not shown, only its answer (default: shown first, dimmed)",
    )
    p.add_argument(
        "--draw",
        metavar="DIR",
        help="save each answer's boxes and points drawn on its image in DIR (default: none with --prompt "
        "or a piped question, the current directory in a conversation)",
    )
    p.add_argument(
        "--max-tokens", type=number(MAX_TOKENS), default=DEFAULT_MAX_TOKENS, help="per answer (%(default)s)"
    )
    sampling = p.add_argument_group("sampling (unset: the model's generation_config.json)")
    for option in SAMPLING.values():
        sampling.add_argument(f"--{option.name.replace('_', '-')}", type=number(option), help=option.help)
    media = p.add_argument_group("images and videos (unset: the model's preprocessor settings)")
    frames = media.add_mutually_exclusive_group()
    for option in MEDIA.values():
        group = frames if option.name in ("fps", "nframes") else media
        group.add_argument(f"--{option.name.replace('_', '-')}", type=number(option), help=option.help)
    add_kv_cache_arguments(p)
    p.add_argument(
        "--pipeline",
        action="store_true",
        help="under mlx.launch: each rank holds consecutive decoder layers, for slow links (default: "
        "tensor parallel, a slice of every layer on each rank; docs/distributed.md)",
    )
    return p.parse_args(argv)


def given(args: argparse.Namespace, names) -> dict:
    """The options set on the command line; the others keep the package's defaults."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def check_file(path: str, kind: str) -> None:
    """Catch a typo now rather than after the question is typed (or the model loaded)."""
    if path.startswith(("http://", "https://", "data:")):
        return
    if not Path(path.removeprefix("file://")).expanduser().is_file():
        raise Qwen3VLError(f"{path}: no such {kind} file")


def load_model(name: str, dtype: str, group=None, pipeline: bool = False):
    """The model, or under `mlx.launch` this rank's part of it (`group`)."""
    from mlx_qwen3vl import load

    # stderr, so that stdout holds nothing but answers; not one line, because huggingface_hub's
    # download bars would overwrite an unfinished one.
    if group is None or group.rank() == 0:
        print(f"Loading {name} ...", file=sys.stderr, flush=True)
    tic = time.perf_counter()
    model, processor = load(name, dtype=dtype, group=group, pipeline=pipeline)
    if group is None or group.rank() == 0:
        print(f"ready in {time.perf_counter() - tic:.1f} s", file=sys.stderr, flush=True)
    return model, processor


def shared_interrupt(interrupted: bool, group) -> None:
    """Rank 0's Ctrl-C while it read input raised on every rank (they all wait for the input meanwhile),
    so that all handle it alike."""
    from mlx_qwen3vl.distributed.interrupt import interrupted_on_rank_0

    if interrupted_on_rank_0(group, interrupted).item():
        raise KeyboardInterrupt


def read_line(group) -> str | None:
    """The next line typed at rank 0 (None at the end of input), on every rank."""
    line, interrupted = None, False
    if group is None or group.rank() == 0:
        try:
            with ctrl_c_as_a_key():
                line = input(PROMPT).strip()
        except EOFError:
            line = None
        except KeyboardInterrupt:
            if group is None:
                raise
            interrupted = True
    if group is None:
        if line is None:
            raise EOFError
        return line
    from mlx_qwen3vl.distributed import shared_text

    shared_interrupt(interrupted, group)
    line = shared_text(line, group)
    if line is None:
        raise EOFError
    return line


class ProgressLine:
    """Long steps on stderr: what each image or video became (always), and, on a terminal, one line
    updated while a video file's frames are read, the vision tower runs or the prompt's chunks are fed,
    once it takes more than a moment, cleared before the answer prints."""

    LABELS = {
        "reading": "reading the video: frame {done}/{total}",
        "vision": "encoding images and videos: block {done}/{total}",
        "prefill": "reading the prompt: {done:,}/{total:,} tokens",
    }
    DELAY = 0.5  # seconds before a progress line is worth showing

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.live = stream.isatty()
        self.start = time.perf_counter()
        self.shown = False

    def __call__(self, progress) -> None:
        if progress.stage == "media":
            self.clear()  # the reading line, if shown
            print(progress.detail, file=self.stream, flush=True)
        elif self.live and time.perf_counter() - self.start >= self.DELAY:
            label = self.LABELS[progress.stage].format(done=progress.done, total=progress.total)
            self.shown = True  # before the write: a Ctrl-C landing in it still leaves a line to clear
            self.stream.write(f"\r\033[K{label}")
            self.stream.flush()

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.shown = False


class AnswerPrinter:
    """Prints an answer as it arrives: a Thinking model's reasoning first (dimmed on a terminal; not at
    all when hidden), a blank line, then the answer."""

    DIM, NORMAL = "\033[2m", "\033[0m"

    def __init__(self, hide_reasoning: bool = False, stream=None):
        self.hide_reasoning, self.stream = hide_reasoning, stream or sys.stdout
        self.dim = self.stream.isatty()
        self.part: str | None = None  # the part being printed: "reasoning" or "answer"

    def __call__(self, response) -> None:
        reasoning = getattr(response, "reasoning", "")  # what a session that does not think may omit
        if reasoning and not self.hide_reasoning:
            self._write("reasoning", reasoning)
        if response.text:
            self._write("answer", response.text)

    def _write(self, part: str, text: str) -> None:
        if part != self.part:
            if self.part == "reasoning":
                text = (self.NORMAL if self.dim else "") + "\n\n" + text
            if part == "reasoning" and self.dim:
                text = self.DIM + text
            self.part = part
        self.stream.write(text)
        self.stream.flush()

    def close(self) -> None:
        """Back to normal text (after an answer that ended, or was stopped, in its reasoning)."""
        if self.part == "reasoning" and self.dim:
            self.stream.write(self.NORMAL)
            self.stream.flush()


def stream_answer(
    session: ChatSession, question: str, media: dict, options: dict, hide_thinking: bool = False
) -> None:
    """Print the answer as it arrives."""
    progress = ProgressLine()
    printer = AnswerPrinter(hide_thinking)
    # closing(): a Ctrl-C between two pieces closes the generator at once, so the session keeps the
    # answer so far and stays consistent.
    try:
        with closing(session.ask(question, **media, **options, progress=progress)) as answer:
            for response in answer:
                progress.clear()
                printer(response)
    finally:
        progress.clear()
        printer.close()
    print()


def ask(
    session: ChatSession,
    question: str,
    media: dict,
    options: dict,
    drawings: Drawings,
    hide_thinking: bool = False,
) -> None:
    """Answer, then save what the answer locates on the conversation's latest image, if anything."""
    turns = len(session.messages)
    try:
        stream_answer(session, question, media, options, hide_thinking)
    finally:
        if len(session.messages) > turns:  # the question is in the conversation, even if interrupted
            drawings.asked(media["images"], media["videos"])
    answer = session.messages[-1].get("content")
    saved = drawings.answered(answer) if isinstance(answer, str) else None
    if saved:
        print(f"drew {saved[1]}: {saved[0]}", file=sys.stderr)


def stats(session: ChatSession) -> str:
    last = session.last
    if last is None:
        return f"no complete answer yet; conversation: {session.cache.offset} tokens"
    return (
        f"prompt:       {last.prompt_tokens} tokens, {last.prompt_tps:.1f} tokens/s\n"
        f"answer:       {last.generation_tokens} tokens, {last.generation_tps:.1f} tokens/s\n"
        f"peak memory:  {last.peak_memory:.2f} GB\n"
        f"conversation: {session.cache.offset} tokens"
    )


def path_argument(text: str) -> str:
    """One path as typed, or quoted / with escaped spaces as a terminal's drag-and-drop gives it."""
    try:
        words = shlex.split(text)
    except ValueError:  # an unbalanced quote: take the text as it is
        return text
    return words[0] if len(words) == 1 else text


def run_command(line: str, session: ChatSession, pending: dict, drawings: Drawings) -> bool:
    """Carry out a /command; False means quit."""
    name, _, argument = line.partition(" ")
    argument = argument.strip()
    if name in ("/quit", "/exit"):
        return False
    if name in ("/image", "/video"):
        kind = name[1:]
        if not argument:
            print(f"usage: {name} PATH")
            return True
        path = path_argument(argument)
        check_file(path, kind)
        pending[kind + "s"].append(path)
        print(f"{kind} {path} goes with the next question")
    elif name == "/clear":
        session.clear()
        drawings.clear()
        pending.update(images=[], videos=[])
        print("new conversation")
    elif name == "/system":
        session.set_system(argument)
        drawings.clear()
        print(f"system prompt {'set' if argument else 'removed'}; new conversation")
    elif name == "/stats":
        print(stats(session))
    elif name == "/draw":
        path, what = drawings.save(path_argument(argument) if argument else None)
        print(f"drew {what}: {path}")
    elif name == "/help":
        print(HELP)
    else:
        print(f"unknown command {name}; /help lists the commands")
    return True


@contextmanager
def line_editing():
    """Line editing with readline: Ctrl-C clears the line (`ctrl_c_as_a_key`), and the history of
    earlier sessions is kept when the cache is writable."""
    import readline  # imported here: it hooks into input(), which only the interactive mode uses

    if "libedit" in (readline.__doc__ or ""):  # the readline module of some macOS Pythons is libedit
        readline.parse_and_bind("bind ^C em-kill-line")
    else:
        readline.parse_and_bind(r'"\C-c": kill-whole-line')
    readline.set_history_length(1000)
    try:
        HISTORY_FILE.parent.mkdir(parents=True, exist_ok=True)
        if HISTORY_FILE.exists():
            readline.read_history_file(HISTORY_FILE)
    except OSError:  # a convenience only: without a writable cache, history stays in memory
        pass
    try:
        yield
    finally:
        try:
            readline.write_history_file(HISTORY_FILE)
        except OSError:
            pass


@contextmanager
def ctrl_c_as_a_key():
    """While a line is read, Ctrl-C reaches readline as a key (bound to clearing the line) instead of
    raising SIGINT. CPython's readline loop looks for signals only when its wait for input is interrupted,
    so a Ctrl-C that lands while the prompt is being drawn would be held until Enter and then discard the
    line typed. Only the terminal's interrupt character is switched off; Ctrl-Z and Ctrl-\\ keep theirs."""
    fd = sys.stdin.fileno()
    try:
        saved = termios.tcgetattr(fd)
    except termios.error:  # not a terminal: nothing to switch
        saved = None
    if saved is None:
        yield
        return
    changed = [*saved[:6], list(saved[6])]
    try:
        changed[6][termios.VINTR] = bytes([os.fpathconf(fd, "PC_VDISABLE")])
    except (OSError, ValueError):
        changed[6][termios.VINTR] = b"\x00"  # Linux's _POSIX_VDISABLE
    try:
        # A SIGINT from just before the switch is raised as KeyboardInterrupt on return from this call,
        # inside the try: the terminal is restored either way.
        termios.tcsetattr(fd, termios.TCSANOW, changed)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, saved)


def chat(
    session: ChatSession,
    pending: dict,
    options: dict,
    drawings: Drawings,
    hide_thinking: bool = False,
    group=None,
) -> None:
    """The interactive loop, until /quit or Ctrl-D. Errors are reported and the conversation goes on.
    Under mlx.launch rank 0 reads each line and every rank runs it."""
    print("Ask a question; /help lists the commands.")
    while True:
        try:
            line = read_line(group)
        except EOFError:
            print()
            return
        except KeyboardInterrupt:  # a Ctrl-C from just before the prompt: prompt again
            print()
            continue
        try:
            if line.startswith("/"):
                if not run_command(line, session, pending, drawings):
                    return
            elif line:
                media, pending = pending, {"images": [], "videos": []}
                ask(session, line, media, options, drawings, hide_thinking)
        except KeyboardInterrupt:  # the answer so far stays in the conversation
            print()
        except (Qwen3VLError, OSError) as e:  # OSError: a file the system will not let us read
            print(f"error: {e}", file=sys.stderr)


def read_question(args: argparse.Namespace, group=None) -> str | None:
    """The one-shot question: --prompt, else standard input when it is not a terminal; None: interactive.
    Under mlx.launch (`group`) standard input is rank 0's."""
    if args.prompt is not None:
        return readable(args.prompt)
    if group is None:
        return None if sys.stdin.isatty() else sys.stdin.read().strip()
    from mlx_qwen3vl.distributed import shared_text

    piped, interrupted = None, False
    if group.rank() == 0 and not sys.stdin.isatty():
        try:
            piped = sys.stdin.read().strip()
        except KeyboardInterrupt:
            interrupted = True
    shared_interrupt(interrupted, group)
    return shared_text(piped, group)


def readable(text: str) -> str:
    """Command-line text as characters: bytes that are not UTF-8 reach Python as lone surrogates
    (errors="surrogateescape"), which the tokenizer cannot take; they become U+FFFD, as on standard input."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a surrogate that no byte decodes to (a shell's own escapes)
        return text.encode("utf-8", "replace").decode("utf-8")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    # Typed or piped bytes that are not UTF-8 become U+FFFD instead of an error.
    sys.stdin.reconfigure(errors="replace")
    group = None
    try:
        group = join_launched_ranks()
        for kind in ("image", "video"):
            for path in getattr(args, kind):
                check_file(path, kind)
        if args.draw is not None:
            from mlx_qwen3vl.grounding import check_drawing_folder

            check_drawing_folder(args.draw)
        question = read_question(args, group)
        if question == "" and not (args.image or args.video):
            raise Qwen3VLError("no question: the prompt (--prompt or standard input) is empty")
        model, processor = load_model(args.model, args.dtype, group, args.pipeline)
        from mlx_qwen3vl import ChatSession
        from mlx_qwen3vl.grounding import Drawings

        session = ChatSession(
            model,
            processor,
            system=None if args.system is None else readable(args.system),
            max_tokens=args.max_tokens,
            kv_bits=args.kv_bits,
            kv_group_size=args.kv_group_size,
            **given(args, SAMPLING),
        )
        media, options = {"images": args.image, "videos": args.video}, given(args, MEDIA)
        # Pictures of what answers locate: one answer saves them only with --draw (a script's folder
        # stays as it was); a conversation saves them in the current directory unless told otherwise.
        drawings = Drawings(args.draw or (None if question is not None else "."))
        if question is not None:
            ask(session, question, media, options, drawings, args.hide_thinking)
            return 0
    except (Qwen3VLError, OSError) as e:  # OSError: a file the system will not let us read
        fail(str(e))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except RuntimeError as e:
        stop_if_a_rank_is_lost(e, group)
        raise
    try:
        with line_editing():
            chat(session, media, options, drawings, args.hide_thinking, group)
    except RuntimeError as e:
        stop_if_a_rank_is_lost(e, group)
        raise
    return 0


def stop_if_a_rank_is_lost(error: RuntimeError, group) -> None:
    """Under mlx.launch, another rank gone away ends this one with one line, not a traceback."""
    if group is not None:
        from mlx_qwen3vl.distributed import lost_peer

        line = lost_peer(error, group)
        if line:
            fail(line, 1)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        # A Ctrl-C that came while an error was being handled: MLX's ring reports one during its start
        # as a failed accept, and Python raises the KeyboardInterrupt in main's handler of that error.
        print(file=sys.stderr)
        sys.exit(130)
