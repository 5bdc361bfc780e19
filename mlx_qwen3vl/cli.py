"""What the command-line entry points (chat.py, convert.py) share: errors as one line, no traceback."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn


def fail(message: str, code: int = 2) -> NoReturn:
    print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
    sys.exit(code)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line instead of argparse's usage block: the problem is what the user needs to see.
        fail(f"{message} (see --help)")
