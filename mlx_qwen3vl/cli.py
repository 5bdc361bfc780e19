"""What the command-line entry points (chat.py, convert.py, server.py) share: errors as one line, no
traceback; the ranks mlx.launch started."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import NoReturn

from .options import DEFAULT_KV_GROUP_SIZE, KV_BITS, KV_GROUP_SIZES, NumberOption

# What mlx.launch (ring, JACCL; MPI's own) sets in each rank's environment.
LAUNCHER_VARIABLES = ("MLX_RANK", "OMPI_COMM_WORLD_RANK")


def fail(message: str, code: int = 2) -> NoReturn:
    print(error_line(message), file=sys.stderr)
    sys.exit(code)


def error_line(message: str) -> str:
    return f"{Path(sys.argv[0]).name}: error: {message}"


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


def add_kv_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """--kv-bits and --kv-group-size (options.KVCacheOptions), for chat.py and server.py alike."""
    group = parser.add_argument_group("KV cache")
    group.add_argument(
        "--kv-bits",
        type=int,
        choices=KV_BITS,
        help="keep the KV cache's keys and values quantized to this many bits: less memory per token of "
        "context (default: unquantized)",
    )
    group.add_argument(
        "--kv-group-size",
        type=int,
        choices=KV_GROUP_SIZES,
        default=DEFAULT_KV_GROUP_SIZE,
        help="values per quantization scale and bias (%(default)s)",
    )


def quiet_libraries() -> None:
    """Keep the terminal to the tools' own output: the libraries' warnings (Pillow's on large images,
    transformers' and huggingface_hub's notices) say nothing a user of these tools can act on, and they
    would print before the one-line errors. The package handles what they warn about itself. Called
    before transformers is imported (it reads its verbosity once)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.simplefilter("ignore")


def join_launched_ranks():
    """The ranks started by `mlx.launch` (rank 0 reads and prints, the others follow), or None."""
    if not any(name in os.environ for name in LAUNCHER_VARIABLES):
        return None  # MLX is not imported for a process that runs alone until it loads the model
    from .distributed import follow_rank_0, launched_group, watch_for_stopped_backend
    from .distributed.interrupt import follow_rank_0_interrupts

    group = launched_group()
    if group is not None:
        follow_rank_0(group)
        follow_rank_0_interrupts(group)
        watch_for_stopped_backend(group, error_line)
    return group
