"""One-line command-line errors, shared by the three packages' CLIs.

A user who mistypes a flag or feeds a bad file gets one line naming it and exit code 2, never a
usage dump or a traceback. Dependency-free so the worker's light CLIs (produce, trends) can use it
without importing torch.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2
# "-5m", "-1h", "-0.5": what a user writes for a negative amount, which argparse reads as a flag
_NEGATIVE_QUANTITY = re.compile(r"-\.?\d")


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (no usage dump), still exiting 2.

    A negative quantity argparse does not read as a number (``--window -5m``) is taken as the
    value of the flag before it (``--window=-5m``): argparse would answer "expected one
    argument", where the flag's own check names what is wrong. Only ``-`` and a digit: a
    mistyped flag (``--out --overwirte``) stays an error rather than becoming a path.
    """

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        argv = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(self._dash_values_joined(argv), namespace)

    def _takes_one_value(self, token: str) -> bool:
        """Whether ``token`` names (or, with abbreviations on, uniquely begins) a long flag that
        takes exactly one value."""
        if not token.startswith("--") or "=" in token:
            return False
        longs = [s for s in self._option_string_actions if s.startswith("--")]
        names = [token] if token in longs else []
        if not names and self.allow_abbrev:
            names = [s for s in longs if s.startswith(token)]
        actions = {self._option_string_actions[s] for s in names}
        return len(actions) == 1 and next(iter(actions)).nargs is None

    def _is_flag(self, value: str) -> bool:
        """Whether a negative quantity is one of this parser's own short flags after all
        (``-5``, ``-5=...`` or ``-5VALUE`` where the parser has a ``-5`` option)."""
        return (
            value.split("=", 1)[0] in self._option_string_actions
            or value[:2] in self._option_string_actions
        )

    def _subcommands(self) -> set[str]:
        return {
            name
            for action in self._actions
            if isinstance(action, argparse._SubParsersAction)
            for name in action.choices
        }

    def _dash_values_joined(self, argv: list[str]) -> list[str]:
        out: list[str] = []
        subcommands = self._subcommands()
        i = 0
        while i < len(argv):
            token = argv[i]
            if token == "--" or token in subcommands:  # the rest is argparse's (a subcommand's)
                out.extend(argv[i:])
                break
            value = argv[i + 1] if i + 1 < len(argv) else None
            if (
                value is not None
                and _NEGATIVE_QUANTITY.match(value)
                and self._takes_one_value(token)
                and not self._is_flag(value)
            ):
                out.append(f"{token}={value}")
                i += 2
                continue
            out.append(token)
            i += 1
        return out


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
