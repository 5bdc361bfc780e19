"""chat.py as a user runs it: one-shot answers on stdout, the interactive loop on a pseudo-terminal, and
one-line errors. Each run is a subprocess (a few seconds of imports and loading), so there are few of them.

The tiny model's answers are gibberish but deterministic with temperature 0: the expected text comes from
the package run in this process with the same options and dtype (the per-backend default of both).
"""

from __future__ import annotations

import io
import os
import re
import signal
from types import SimpleNamespace

import numpy as np
import pytest
from media import png_header
from PIL import Image
from terminal import GREEDY, LOAD_TIMEOUT, PROMPT, ROOT, render, run_chat

from mlx_qwen3vl import ChatSession, generate, load


@pytest.fixture(scope="module")
def tiny_bf16(tiny_checkpoint):
    return load(tiny_checkpoint)


def answer(session: ChatSession, question: str, **kwargs) -> str:
    return "".join(r.text for r in session.ask(question, **kwargs))


# ---- one-shot mode ------------------------------------------------------------------------------------


def test_prompt_answers_once_on_stdout(tiny_checkpoint, tiny_bf16, tmp_path):
    result = run_chat(tmp_path, "--model", str(tiny_checkpoint), "--prompt", "Hi", *GREEDY)
    assert result.returncode == 0, result.stderr
    assert result.stdout == generate(*tiny_bf16, "Hi", max_tokens=5, temperature=0) + "\n"
    assert "Loading" in result.stderr and "ready in" in result.stderr  # progress goes to stderr only


@pytest.mark.slow
def test_piped_question_with_an_image(tiny_checkpoint, tiny_bf16, red_image, tmp_path):
    question = "What is in this picture?"
    args = ("--model", str(tiny_checkpoint), "--image", str(red_image), "--min-pixels", "4096", *GREEDY)
    result = run_chat(tmp_path, *args, stdin=question + "\n")
    assert result.returncode == 0, result.stderr
    options = dict(images=[str(red_image)], max_tokens=5, temperature=0)
    expected = generate(*tiny_bf16, question, min_pixels=4096, **options)
    assert result.stdout == expected + "\n"
    # --min-pixels reached the processor: the 64x48 image becomes 64x64 (4 image tokens), not 320x224 (70).
    assert expected != generate(*tiny_bf16, question, **options)


@pytest.mark.slow
def test_kv_bits_quantize_the_cache_of_the_answer(tiny_checkpoint, tiny_bf16, tmp_path):
    args = ("--model", str(tiny_checkpoint), "--prompt", "Hi", "--kv-bits", "4", "--kv-group-size", "32")
    result = run_chat(tmp_path, *args, *GREEDY)
    assert result.returncode == 0, result.stderr
    expected = generate(*tiny_bf16, "Hi", max_tokens=5, temperature=0, kv_bits=4, kv_group_size=32)
    assert result.stdout == expected + "\n"


@pytest.mark.slow
def test_a_thinking_models_reasoning_is_shown_first_or_hidden(tiny_thinking, tmp_path):
    expected = generate(*load(tiny_thinking), "Hi", max_tokens=5, temperature=0)
    assert expected == "" and expected.reasoning  # the random model never closes its reasoning
    shown = run_chat(tmp_path, "--model", str(tiny_thinking), "--prompt", "Hi", *GREEDY)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == expected.reasoning + "\n"  # not a terminal: not dimmed
    hidden = run_chat(tmp_path, "--model", str(tiny_thinking), "--prompt", "Hi", "--hide-thinking", *GREEDY)
    assert hidden.stdout == "\n"


class TerminalStream(io.StringIO):
    """Text written to a terminal, kept as written (escape sequences and all)."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    "stream, hide, stop_in_reasoning, printed",
    [
        (TerminalStream, False, False, "\033[2mTwo cats.\033[0m\n\nThere are two."),
        (io.StringIO, False, False, "Two cats.\n\nThere are two."),
        (TerminalStream, True, False, "There are two."),
        (TerminalStream, False, True, "\033[2mTwo cats.\033[0m"),  # stopped while reasoning: back to normal
    ],
)
def test_reasoning_is_printed_dimmed_before_the_answer(monkeypatch, stream, hide, stop_in_reasoning, printed):
    monkeypatch.syspath_prepend(str(ROOT))
    import chat

    pieces = [("Two", ""), (" cats.", ""), ("", "There"), ("", " are two.")]
    out = stream()
    printer = chat.AnswerPrinter(hide, out)
    for reasoning, text in pieces[:2] if stop_in_reasoning else pieces:
        printer(SimpleNamespace(reasoning=reasoning, text=text))
    printer.close()
    assert out.getvalue() == printed


# ---- errors -------------------------------------------------------------------------------------------


def bad_argument(name: str, problem: str) -> str:
    return f"argument --{name}: {problem} (see --help)"


@pytest.mark.parametrize(
    "args, problem",
    [
        (["--model", "{tmp}/no-model"], "{tmp}/no-model: no such model directory"),  # the later --model wins
        (["--image", "{tmp}/no.png"], "{tmp}/no.png: no such image file"),
        (["--max-tokens", "0"], bad_argument("max-tokens", "0 is out of range: must be a whole number >= 1")),
        (["--temperature", "inf"], bad_argument("temperature", "inf is out of range: must be a number >= 0")),
        (["--presence-penalty", "nan"],
         bad_argument("presence-penalty", "nan is out of range: must be a number")),
        (["--top-k", "2.5"], bad_argument("top-k", "'2.5' is not a whole number")),
        (["--kv-bits", "3"], bad_argument("kv-bits", "invalid choice: 3 (choose from 4, 8)")),
        (["--image", "{tmp}/large.png"],
         "{tmp}/large.png: corrupt or truncated image (cannot load this image)"),
        (["--image", "{tmp}/bomb.png"], "{tmp}/bomb.png: too large to decode safely "
         "(900,000,000 pixels, over the limit of 178,956,970); downscale it first"),
    ],
    ids=["missing model", "missing image", "max tokens 0", "temperature inf", "presence nan", "top-k 2.5",
         "kv-bits 3", "large image", "decompression bomb"],
)  # fmt: skip
def test_user_errors_are_one_line_and_exit_2(tiny_checkpoint, tmp_path, args, problem):
    # A 90-megapixel PNG without pixel data: Pillow warns about its size, then cannot decode it.
    (tmp_path / "large.png").write_bytes(png_header(10000, 9000))
    (tmp_path / "bomb.png").write_bytes(png_header(30000, 30000))
    args = [a.format(tmp=tmp_path) for a in args]
    result = run_chat(tmp_path, "--model", str(tiny_checkpoint), *args, "--prompt", "Hi")
    assert result.returncode == 2
    assert result.stdout == ""
    # The error is the last line and the only one; progress lines may come before it, nothing else.
    lines = result.stderr.splitlines()
    assert lines[-1] == "chat.py: error: " + problem.format(tmp=tmp_path)
    assert all(line.startswith(("Loading ", "ready in ")) for line in lines[:-1]), result.stderr


# ---- interactive mode ---------------------------------------------------------------------------------


def test_the_screen_reads_as_a_terminal_shows_it():
    """How the pseudo-terminal tests read chat.py (terminal.render): a progress line that the answer
    clears is gone, the answer stands on its own line, and a line redrawn by readline shows once."""
    output = "> What?\r\n\r\033[Kencoding images and videos: block 3/4\r\033[KA red square.\r\n> abc"
    assert render(output + "\r\033[K> /stats") == "> What?\nA red square.\n> /stats"
    assert render("\033[2mdim\033[0m text\b\b\b\bT") == "dim Text"


@pytest.mark.slow
def test_interactive_conversation(terminal, tiny_checkpoint, tiny_bf16, red_image, tmp_path):
    session = ChatSession(*tiny_bf16, max_tokens=5, temperature=0)
    first = answer(session, "Hi")
    second = answer(session, "What color is it?", images=[str(red_image)])

    chat = terminal("--model", str(tiny_checkpoint), *GREEDY)
    chat.expect(PROMPT, timeout=LOAD_TIMEOUT)
    chat.send(b"Hi\r")
    assert f"\n{first}\n" in chat.expect(PROMPT)

    chat.send(b"/nope\r")
    assert "unknown command /nope; /help lists the commands" in chat.expect(PROMPT)
    chat.send(f"/image {tmp_path / 'no.png'}\r".encode())
    assert f"{tmp_path / 'no.png'}: no such image file" in chat.expect(PROMPT)
    chat.send(f"/image {red_image}\r".encode())
    chat.expect(PROMPT)
    chat.send(b"What color is it?\r")
    assert f"\n{second}\n" in chat.expect(PROMPT)  # the second turn of one conversation, with the image

    # Ctrl-C at the prompt clears the typed line: "abc/stats" would be a question, not the command.
    chat.send(b"abc")
    chat.expect("abc")
    chat.send(b"\x03/stats\r")
    stats = chat.expect(PROMPT)
    assert re.search(rf"prompt: +{session.last.prompt_tokens} tokens, \d+\.\d tokens/s\n", stats), stats
    assert re.search(r"answer: +5 tokens, \d+\.\d tokens/s\n", stats), stats
    assert re.search(r"peak memory: +\d+\.\d\d GB\n", stats), stats
    assert re.search(rf"conversation: +{session.cache.offset} tokens\n", stats), stats

    chat.send(b"/quit\r")
    assert chat.exit_code() == 0


@pytest.mark.slow
def test_ctrl_c_at_the_prompt_clears_the_line_whenever_it_lands(terminal, tiny_checkpoint, tiny_bf16):
    """A Ctrl-C typed in the same instant as other keys (here, in one write) clears what came before it
    and nothing after: the question typed next is answered. As a signal, it would reach CPython's
    readline loop only once the line was entered, and then discard the line."""
    session = ChatSession(*tiny_bf16, max_tokens=5, temperature=0)
    expected = answer(session, "hello")
    chat = terminal("--model", str(tiny_checkpoint), *GREEDY)
    chat.expect(PROMPT, timeout=LOAD_TIMEOUT)
    chat.send(b"abc\x03hello\r")
    assert f"\n{expected}\n" in chat.expect(PROMPT)
    chat.send(b"/stats\r")
    assert f"conversation: {session.cache.offset} tokens" in chat.expect(PROMPT)
    chat.send(b"\x04")
    assert chat.exit_code() == 0


@pytest.mark.slow
def test_ctrl_c_stops_an_answer_and_the_conversation_goes_on(terminal, tiny_checkpoint, tiny_bf16):
    session = ChatSession(*tiny_bf16, max_tokens=3, temperature=0)
    # What the stream shows of the long answer's first tokens (the last piece only flushes the end).
    opening = "".join(r.text for r in session.ask("Tell me a story") if not r.finish_reason)
    prompt_tokens = session.prefilled
    assert opening

    # The random model's greedy answers never end early: only Ctrl-C stops this one before 3000 tokens
    # (minutes here), and /stats then has no complete answer to show.
    chat = terminal("--model", str(tiny_checkpoint), "--max-tokens", "3000", "--temperature", "0")
    chat.expect(PROMPT, timeout=LOAD_TIMEOUT)
    chat.send(b"Tell me a story\r")
    chat.expect(re.escape(opening))
    chat.send(b"\x03")
    chat.expect(PROMPT)
    chat.send(b"/stats\r")
    kept = re.search(r"no complete answer yet; conversation: (\d+) tokens", chat.expect(PROMPT))
    assert kept and prompt_tokens < int(kept[1]) < prompt_tokens + 3000  # the partial answer stays

    chat.send(b"Hi\r")
    chat.expect(r"Hi\n+ ?\S")  # the next answer streams (it may begin with a space)
    chat.send(b"\x03")
    chat.expect(PROMPT)
    chat.send(b"\x04")  # Ctrl-D at an empty prompt
    assert chat.exit_code() == 0


VISION_BLOCK = re.compile(r"encoding images and videos: block (\d+)/(\d+)")


@pytest.mark.slow
def test_a_large_photo_is_described_and_ctrl_c_stops_its_encoding(terminal, tiny_checkpoint, tmp_path):
    """A 3-megapixel photo: chat.py says what it becomes before encoding it (the pixel budget keeps it
    whole: 11,844 patches, seconds a block of the test model's tower, so its progress line shows), and
    Ctrl-C stops the encoding within the block in flight: the tower runs a block at a time, and no block
    after that one is reported. The conversation is as it was.

    The order of events is made certain by stopping chat.py (SIGSTOP) once a block is reported: the
    blocks reported so far are known, and the Ctrl-C is pending when it continues."""
    photo = tmp_path / "photo.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (1512, 2016, 3), dtype=np.uint8)).save(photo, quality=80)
    chat = terminal("--model", str(tiny_checkpoint), *GREEDY)
    chat.expect(PROMPT, timeout=LOAD_TIMEOUT)
    chat.send(f"/image {photo}\r".encode())
    chat.expect(PROMPT)
    chat.send(b"Describe it.\r")
    chat.expect(r"image 2016x1512 -> \d+x\d+ pixels, [\d,]+ tokens\n")
    chat.expect(VISION_BLOCK.pattern)

    os.kill(chat.pid, signal.SIGSTOP)
    _, status = os.waitpid(chat.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), status
    # A character typed and erased: its echo follows everything chat.py wrote before it stopped.
    chat.send(b"x\x7f")
    chat.expect_output("x\b \b")
    reported = [(int(done), int(total)) for done, total in VISION_BLOCK.findall(chat.output)]
    in_flight, total = reported[-1][0] + 1, reported[-1][1]
    assert in_flight < total, f"the encoding was at block {in_flight} of {total} when stopped"
    chat.send(b"\x03")
    chat.expect_output("^C")  # echoed once the terminal has sent chat.py its SIGINT
    os.kill(chat.pid, signal.SIGCONT)

    chat.expect(PROMPT)
    reported = [int(done) for done, _ in VISION_BLOCK.findall(chat.output)]
    assert max(reported) <= in_flight, reported
    assert "encoding images" not in chat.screen()  # the progress line was cleared
    chat.send(b"/stats\r")
    assert "no complete answer yet; conversation: 0 tokens" in chat.expect(PROMPT)
    chat.send(b"Hi\r")
    chat.expect(r"(?s)Hi\n+ ?\S.*\n> \Z")  # the conversation goes on: an answer, then the prompt
    chat.send(b"\x04")
    assert chat.exit_code() == 0


def test_the_progress_line_shows_a_video_being_read_then_clears_it_for_what_it_became():
    """A long video file takes a while to read: on a terminal its frames are counted on one line, which
    is cleared before the line saying what the video became."""
    import importlib.util

    from mlx_qwen3vl.progress import Progress

    spec = importlib.util.spec_from_file_location("chat_cli", ROOT / "chat.py")
    chat_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chat_cli)

    stream = TerminalStream()
    line = chat_cli.ProgressLine(stream)
    line.start -= line.DELAY  # as if reading had gone on for a moment
    line(Progress("reading", 3, 768))
    line(Progress("media", 1, 1, "video, 768 frames of 1280x720 -> ..."))
    assert stream.getvalue() == (
        "\r\033[Kreading the video: frame 3/768\r\033[Kvideo, 768 frames of 1280x720 -> ...\n"
    )
