"""chat.py as a user runs it: with standard input from a pipe, or on a pseudo-terminal read the way a
person reads the screen (progress lines that are cleared are gone, answers stand on their own lines)."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import mlx.core as mx

from mlx_qwen3vl.generation import generation_stream

ROOT = Path(__file__).resolve().parent.parent
GREEDY = ("--max-tokens", "5", "--temperature", "0")
PROMPT = r"\n> \Z"  # the prompt, waiting for input at the end of the screen
# Bounds on waits, so that a hang fails with the output so far instead of never ending; far above what
# loading and a short answer take on a busy machine, never a measure of speed.
LOAD_TIMEOUT = 300
ANSWER_TIMEOUT = 300

# A control sequence (CSI: colours, erasing, cursor moves, readline's bracketed-paste mode), another escape
# sequence, or a control character that moves the cursor.
_TOKEN = re.compile(r"\x1b\[([0-9;?]*)([@-~])|\x1b[^\[]|[\r\n\b]|[^\x1b\r\n\b]+")


def child_env(home: Path) -> dict:
    # HOME: the readline history file goes to the test's folder, not the user's cache.
    return dict(os.environ, HOME=str(home), TERM="xterm", PYTHONIOENCODING="utf-8")


def run_chat(home: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    """chat.py with standard input from a pipe (never a terminal, so never interactive)."""
    return subprocess.run(
        [sys.executable, "chat.py", *args],
        cwd=ROOT,
        input=stdin,
        capture_output=True,
        encoding="utf-8",
        env=child_env(home),
        timeout=LOAD_TIMEOUT,
    )


def render(output: str) -> str:
    """What a terminal shows after `output`: carriage returns, backspaces and cursor moves place the
    characters that follow, erase-in-line (ESC [ K) removes what it covers, line feeds start a new line
    (the terminal driver sends each as CR LF), other escape sequences (colours) show nothing. Lines are
    joined with "\\n"; the last one is the line the cursor is on."""
    lines, row, col = [""], 0, 0
    for match in _TOKEN.finditer(output):
        token, params, command = match[0], match[1], match[2]
        if token == "\n":
            row, col = row + 1, 0
            if row == len(lines):
                lines.append("")
        elif token == "\r":
            col = 0
        elif token == "\b":
            col = max(0, col - 1)
        elif command:
            count = int(params) if params.isdigit() else None
            line = lines[row]
            if command == "K":  # erase in line: 0 (default) to its end, 1 to the cursor, 2 all of it
                if count == 1:
                    lines[row] = " " * min(col + 1, len(line)) + line[col + 1 :]
                else:
                    lines[row] = "" if count == 2 else line[:col]
            elif command == "C":
                col += count or 1
            elif command == "D":
                col = max(0, col - (count or 1))
            elif command == "G":
                col = (count or 1) - 1
        elif not token.startswith("\x1b"):
            line = lines[row].ljust(col)
            lines[row] = line[:col] + token + line[col + len(token) :]
            col += len(token)
    return "\n".join(lines)


class Terminal:
    """chat.py on a pseudo-terminal, so it runs interactively and Ctrl-C is a real SIGINT. `expect` reads
    the screen as rendered; `output` keeps everything written, for what was shown and then cleared
    (progress lines). Every wait is bounded: a hang fails the test with the screen so far."""

    def __init__(self, args: tuple[str, ...], home: Path):
        env = child_env(home)
        # No computation may be in flight in this process when it forks: the last answer's pipelined
        # next step can still be running a BLAS call, and OpenBLAS's fork handlers then leave its
        # thread pool deadlocked for every later float32 matmul here.
        mx.synchronize(generation_stream)
        mx.synchronize()
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child becomes chat.py at once: little else is safe after a fork
            try:
                # A test run started in the background (`pytest &`) ignores SIGINT, and an ignored signal
                # stays ignored across exec: chat.py would never see the Ctrl-Cs typed at it.
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.chdir(ROOT)
                os.execve(sys.executable, [sys.executable, "chat.py", *args], env)
            finally:
                os._exit(127)
        # A wide terminal: readline's line wrapping stays out of the echoed input.
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 250, 0, 0))
        self.raw = b""
        self.seen = 0  # position on the screen after the last match
        self.matched = ""  # the screen up to that position when it matched

    @property
    def output(self) -> str:
        """Everything chat.py has written so far, escape sequences and all."""
        return self.raw.decode("utf-8", "replace")

    def screen(self) -> str:
        return render(self.output)

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def _read(self, until: float) -> bool:
        """Read what arrives before `until`; False once the child has closed the terminal."""
        ready, _, _ = select.select([self.fd], [], [], max(0.0, until - time.monotonic()))
        if not ready:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: nothing is left on the other side
            data = b""
        self.raw += data
        return bool(data)

    def expect(self, pattern: str, timeout: float = ANSWER_TIMEOUT) -> str:
        """Wait for the regex `pattern` on the screen after the previous match (or after what has changed
        since: a line the previous match was on can be redrawn); return the screen from there to its end."""
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            start = min(self.seen, len(os.path.commonprefix([screen, self.matched])))
            match = re.compile(pattern).search(screen, start)
            if match:
                self.seen, self.matched = match.end(), screen[: match.end()]
                return screen[start : match.end()]
            if time.monotonic() > deadline or not self._read(deadline):
                raise AssertionError(f"no {pattern!r} within {timeout} s; screen since:\n{screen[start:]}")

    def expect_output(self, text: str, timeout: float = ANSWER_TIMEOUT) -> None:
        """Wait until chat.py writes `text` (from this call on), whether or not the screen goes on showing
        it: an echo, a line cleared since."""
        deadline, start = time.monotonic() + timeout, len(self.raw)
        while text.encode() not in self.raw[start:]:
            if time.monotonic() > deadline or not self._read(deadline):
                raise AssertionError(
                    f"no {text!r} written within {timeout} s; output:\n{self.output[-2000:]}"
                )

    def exit_code(self, timeout: float = ANSWER_TIMEOUT) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.pid = 0
                return os.waitstatus_to_exitcode(status)
            if not self._read(min(deadline, time.monotonic() + 0.2)):  # keep draining the output
                time.sleep(0.05)
        raise AssertionError(
            f"chat.py did not exit within {timeout} s; screen:\n{self.screen()[self.seen :]}"
        )

    def close(self) -> None:
        if self.pid:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self.fd)
