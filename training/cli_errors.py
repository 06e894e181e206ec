"""One-line command-line errors, shared by the three packages' CLIs.

A user who mistypes a flag or feeds a bad file gets one line naming it and exit code 2, never a
usage dump or a traceback. Dependency-free so the worker's light CLIs (produce, trends) can use it
without importing torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (no usage dump), still exiting 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def fail(message: str) -> int:
    """Print ``error: message`` on stderr; return the bad-input exit code."""
    print(f"error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def utf8_problem(name: str | os.PathLike[str]) -> str | None:
    """None when ``name`` (text or a path) is UTF-8; else the name shown for a one-line error.

    A name that is not UTF-8 (a file name's bytes, a command-line argument) reaches Python with
    lone surrogates, which text consumers (labels, JSON, TensorBoard, Redis keys) cannot take.
    It is shown from its bytes with backslashreplace: ``b\xff`` rather than a traceback.
    """
    text = os.fspath(name)
    try:
        text.encode()
    except UnicodeEncodeError:
        return os.fsencode(text).decode(errors="backslashreplace")
    return None


def first_validation_error(exc: Exception) -> str:
    """One line out of a pydantic ValidationError: the field and what is wrong with it."""
    errors = exc.errors()  # type: ignore[attr-defined]
    if not errors:
        return str(exc).splitlines()[0]
    err = errors[0]
    field = ".".join(str(p) for p in err.get("loc", ())) or "settings"
    return f"{field}: {err.get('msg', 'invalid')}"


def path_arg(text: str) -> Path:
    """argparse type for path flags: refuses an empty or blank value.

    ``Path("")`` is the current directory, so ``--out "$OUT"`` with OUT unset would write a
    data set, checkpoint or bundle into wherever the command ran, and ``--images ""`` would
    post every image under it.
    """
    if not text.strip():
        raise argparse.ArgumentTypeError(f"no path in {text!r} (an unset variable?)")
    if problem := path_length_problem(text):
        raise argparse.ArgumentTypeError(problem)
    return Path(text)


NAME_MAX, PATH_MAX = 255, 4096  # Linux's limits, in bytes, on a name and on a whole path


def path_length_problem(text: str | os.PathLike[str]) -> str | None:
    """Why the OS would refuse this path as too long (ENAMETOOLONG), or None.

    Checked up front because every command would otherwise meet it as an OSError from whichever
    call touches the path first, not all of which expect one.
    """
    raw = os.fsencode(text)
    shown = os.fsdecode(raw[:40]) + "..."
    if len(raw) >= PATH_MAX:
        return f"path {shown!r} is {len(raw)} bytes, over the {PATH_MAX - 1} a path can have"
    longest = max(raw.split(b"/"), key=len)
    if len(longest) > NAME_MAX:
        return (
            f"path {shown!r} has a name of {len(longest)} bytes, over the {NAME_MAX} a file "
            "or directory name can have"
        )
    return None
