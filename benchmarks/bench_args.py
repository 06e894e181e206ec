"""Argument checks shared by the benchmarks: a bad flag is one line naming it, exit code 2.

argparse ``type=`` validators (training.cli's, and comma lists of them) on
training.cli_errors.OneLineParser, so ``--batches a`` or ``--posts 0`` is refused before a
bundle is built or a broker started, never with a traceback minutes into a run.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from training.cli import non_negative_float, non_negative_int, positive_float, positive_int
from training.cli_errors import OneLineParser
from training.cli_help import DefaultsHelpFormatter

__all__ = [
    "make_parser",
    "non_negative_float",
    "non_negative_int",
    "positive_float",
    "positive_float_list",
    "positive_int",
    "positive_int_list",
]


def make_parser(description: str) -> argparse.ArgumentParser:
    """A benchmark's parser: defaults in --help, one-line errors."""
    return OneLineParser(description=description, formatter_class=DefaultsHelpFormatter)


def _comma_list(item: Callable[[str], object]) -> Callable[[str], list]:
    def parse(text: str) -> list:
        parts = [p.strip() for p in text.split(",")]
        if not all(parts):
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma list, no empty items")
        try:
            return [item(p) for p in parts]
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None

    return parse


positive_int_list = _comma_list(positive_int)
positive_float_list = _comma_list(positive_float)
