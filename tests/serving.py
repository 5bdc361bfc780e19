"""Starting server.py in a process of its own, for the tests that need the real command line."""

from __future__ import annotations

import contextlib
import subprocess
import time
import urllib.request
from collections.abc import Callable


def wait_until_healthy(
    process: subprocess.Popen, port: int, bound: float, log: Callable[[], str] = lambda: ""
) -> None:
    """Until the server on `port` answers /health. Fails with its log if the process exits first, or
    after `bound` seconds: a bound that makes a hang fail, not a measure of speed."""
    deadline = time.monotonic() + bound
    while True:
        assert process.poll() is None, f"the server exited: {log()}"
        assert time.monotonic() < deadline, f"the server did not start: {log()}"
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                if response.status == 200:
                    return
        time.sleep(0.2)
