"""``python -m training {make-sample,train,evaluate,compare}``."""

from __future__ import annotations

import argparse
import sys

from training import compare, evaluate, sample, train
from training.cli import interrupt_on_sigterm, run_guarded, setup_logging
from training.cli_errors import OneLineParser

COMMANDS = {
    "make-sample": sample,
    "train": train,
    "evaluate": evaluate,
    "compare": compare,
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m training",
        description="Fine-tune, evaluate and compare ResNet car make/model classifiers.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for name, module in COMMANDS.items():
        module.get_args_parser(sub.add_parser, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    setup_logging(getattr(args, "verbose", False))
    return run_guarded(COMMANDS[args.command].main, args)


if __name__ == "__main__":
    interrupt_on_sigterm()  # the process's own handler; callers of main() keep theirs
    sys.exit(main())
