"""Writing an output model directory without ever losing what was there.

The converter writes into a hidden staging folder beside the target and swaps it in only once it is
complete: an interrupted or failed conversion leaves the target as it was. An existing target is replaced
(`force`) only when it is recognisably a model directory that a converter wrote (model files, tokenizer and
template files, a model card, nothing else); anything else is refused with the names of what is in the
way. The old directory is moved aside before the new one is renamed into place, and deleted last.

Staging folders are named after the target and the writing process (`.<name>.converting-<pid>`, and
`.<name>.replaced-<pid>` for the old directory during the swap), so a later run to the same path finds the
ones a killed run (`kill -9`) left behind: it removes its half-written output, and puts back an old
directory that was moved aside but never replaced.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import Qwen3VLError

# What converters (this one, mlx-lm's, mlx-vlm's) and the hub put in a model directory. Exact names, not
# "*.json" or "*.txt": a folder with a user's notes.txt or settings.json in it is not replaced.
MODEL_DIRECTORY_FILES = (
    "*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
    "README.md",
    "quantization_report.json",  # check.py's
    ".gitattributes",
    ".DS_Store",  # Finder's, on a Mac
)


def is_model_file(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in MODEL_DIRECTORY_FILES)


@dataclass
class Target:
    """An output directory: `path` absolute with its parents resolved, `shown` as the user gave it."""

    path: Path
    shown: str

    @classmethod
    def from_user(cls, given) -> Target:
        shown = str(given)
        absolute = Path(os.path.abspath(Path(given).expanduser()))
        if not absolute.name:
            raise Qwen3VLError(f"{shown}: the file system's root cannot be the output directory")
        return cls(absolute.parent.resolve() / absolute.name, shown)

    def staging(self, kind: str, pid: int | None = None) -> Path:
        return self.path.parent / f".{self.path.name}.{kind}-{os.getpid() if pid is None else pid}"


def check_replaceable(target: Target, source: Path, force: bool) -> None:
    """Refuse, with one line, an output path whose writing could lose something."""
    path, shown = target.path, target.shown
    resolved_source = source.resolve()
    if path.resolve() == resolved_source or path.resolve() in resolved_source.parents:
        raise Qwen3VLError(f"{shown}: the output directory would replace the source model")
    cwd = Path.cwd().resolve()
    if path.resolve() == cwd or path.resolve() in cwd.parents:
        raise Qwen3VLError(f"{shown} is the current directory or contains it; choose another output path")
    if not path.exists() and not path.is_symlink():
        existing = next(parent for parent in path.parents if parent.exists())
        if not existing.is_dir():
            raise Qwen3VLError(f"{shown}: {existing} is a file, not a directory")
        return
    if not force:
        raise Qwen3VLError(
            f"{shown} already exists: choose another output path or pass --force to replace it"
        )
    if path.is_symlink():
        raise Qwen3VLError(f"{shown} is a symbolic link; not replacing it, even with --force")
    if not path.is_dir():
        raise Qwen3VLError(f"{shown} exists and is not a directory; not replacing it, even with --force")
    in_the_way = foreign_entries(path)
    if in_the_way:
        more = len(in_the_way) - 3
        names = ", ".join(in_the_way[:3]) + (f" and {more} more" if more > 0 else "")
        raise Qwen3VLError(
            f"{shown} holds {names}, which a converter did not write; not replacing it, even with --force"
        )


def foreign_entries(directory: Path) -> list[str]:
    """What in `directory` is not part of a model directory (folders get a trailing /). A non-empty
    directory without config.json is not a model directory at all."""
    try:
        entries = sorted(directory.iterdir())
    except OSError as e:
        raise Qwen3VLError(f"{directory}: cannot list it ({e.strerror})") from None
    foreign = [
        f"{e.name}/" if e.is_dir() else e.name
        for e in entries
        if e.is_dir() or e.is_symlink() or not is_model_file(e.name)
    ]
    if entries and not foreign and not (directory / "config.json").is_file():
        foreign = [e.name for e in entries]
    return foreign


def _leftovers(target: Target) -> Iterator[tuple[str, int, Path]]:
    """(kind, pid, path) of every staging folder for this target."""
    pattern = re.compile(rf"\.{re.escape(target.path.name)}\.(converting|replaced)-(\d+)")
    try:
        siblings = list(target.path.parent.iterdir())
    except OSError:
        return
    for sibling in siblings:
        match = pattern.fullmatch(sibling.name)
        if match and sibling.is_dir() and not sibling.is_symlink():
            yield match[1], int(match[2]), sibling


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers (an earlier call in this process) are never in use now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def clean_leftovers(target: Target) -> list[str]:
    """Remove what killed runs to this target left behind; an old directory a killed run had moved aside
    goes back in place when nothing has taken it. Returns what was done, for the user."""
    done = []
    for kind, pid, path in sorted(_leftovers(target)):
        if _running(pid):
            continue
        if kind == "replaced" and not target.path.exists() and not target.path.is_symlink():
            path.rename(target.path)
            done.append(f"restored {target.shown}, which an interrupted conversion had moved aside")
        else:
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed {path.name}, left by an interrupted conversion")
    return done


def _write_error(target: Target, error: Exception) -> Qwen3VLError:
    """An error while writing, reported under the user's name for the output, not the staging one."""
    if isinstance(error, OSError):
        full = error.errno in (errno.ENOSPC, errno.EDQUOT)
        reason = error.strerror or str(error)
    else:  # MLX's safetensors writer: "[write] Unable to write N bytes to file."
        wanted = re.search(r"write (\d+) bytes", str(error))
        full = wanted is not None and _free_bytes(target.path.parent) < int(wanted[1])
        reason = str(error)
    if full:
        return Qwen3VLError(f"{target.shown}: the disk is full; nothing was written")
    return Qwen3VLError(f"{target.shown}: cannot write the output directory ({reason}); nothing was written")


def _free_bytes(directory: Path) -> int:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return 0


def _is_write_failure(error: RuntimeError) -> bool:
    return str(error).startswith("[write]")


@contextmanager
def staged(target: Target, source: Path, force: bool) -> Iterator[Path]:
    """A fresh staging folder to write the output into; swapped in for the target when the block
    completes, removed when it fails. The checks run again just before the swap, so a folder that changed
    during a long conversion is still never replaced unless it may be."""
    staging = target.staging("converting")
    try:
        target.path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            yield staging
        except RuntimeError as e:
            if not _is_write_failure(e):
                raise
            raise _write_error(target, e) from None
        check_replaceable(target, source, force)
        swap_in(staging, target)
    except OSError as e:
        raise _write_error(target, e) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def swap_in(staging: Path, target: Target) -> None:
    """Rename the complete staging folder to the target; an existing target is moved aside first and
    deleted only after the new one is in place (put back if the rename fails)."""
    if not target.path.exists():
        staging.rename(target.path)
        return
    aside = target.staging("replaced")
    target.path.rename(aside)
    try:
        staging.rename(target.path)
    except OSError:
        aside.rename(target.path)
        raise
    shutil.rmtree(aside)
