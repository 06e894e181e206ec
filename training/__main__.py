"""``python -m training {make-sample,train,evaluate,compare}``."""

from __future__ import annotations

import argparse
import functools
import sys

from training import compare, evaluate, sample, train
from training.cli import interrupt_on_sigterm, run_guarded, setup_logging, stop_on_sigterm
from training.cli_errors import OneLineParser

COMMANDS = {
    "make-sample": sample,
    "train": train,
    "evaluate": evaluate,
    "compare": compare,
}
# the commands whose main takes a ``stop`` Event and checks it between steps: SIGTERM sets it
STOPPABLE = ("train", "compare")


def get_args_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m training",
        description="Fine-tune, evaluate and compare ResNet car make/model classifiers.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for name, module in COMMANDS.items():
        module.get_args_parser(sub.add_parser, name)
    return parser


def main(argv: list[str] | None = None, own_signals: bool = False) -> int:
    """Run one command. ``own_signals`` (the process's entry point only; other callers of main()
    keep their handlers): SIGTERM sets the stop Event of a command in ``STOPPABLE`` (it ends
    between two steps, a second SIGTERM at once), and interrupts the others like Ctrl-C."""
    args = get_args_parser().parse_args(argv)
    setup_logging(getattr(args, "verbose", False))
    command = COMMANDS[args.command].main
    if own_signals and args.command in STOPPABLE:
        command = functools.partial(command, stop=stop_on_sigterm())
    elif own_signals:
        interrupt_on_sigterm()
    return run_guarded(command, args)


if __name__ == "__main__":
    sys.exit(main(own_signals=True))
