"""What the command-line entry points (chat.py, convert.py) share: errors as one line, no traceback."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import NoReturn

from .options import NumberOption


def fail(message: str, code: int = 2) -> NoReturn:
    print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
    sys.exit(code)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line instead of argparse's usage block: the problem is what the user needs to see.
        fail(f"{message} (see --help)")


def number(option: NumberOption):
    """An argparse type from an option's definition (`options.py`): the same ranges as the Python API."""

    def parse(text: str):
        try:
            return option.parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def quiet_libraries() -> None:
    """Keep the terminal to the tools' own output: the libraries' warnings (Pillow's on large images,
    transformers' and huggingface_hub's notices) say nothing a user of these tools can act on, and they
    would print before the one-line errors. The package handles what they warn about itself. Called
    before transformers is imported (it reads its verbosity once)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.simplefilter("ignore")
