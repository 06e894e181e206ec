"""``python -m worker {run,trends,produce,stack}``.

Subcommands are imported lazily so that ``trends`` or ``stack`` start without loading the
model runtime.
"""

from __future__ import annotations

import importlib
import os
import sys

from training.cli_errors import OneLineParser
from training.cli_help import DefaultsHelpFormatter

SUBCOMMANDS = {
    "run": ("worker.run", "consume post events, classify them, publish results, count trends"),
    "trends": ("worker.trends_cli", "print live top makes/models/cities from Redis"),
    "produce": ("worker.produce", "publish post events (images or JSON lines); load generator"),
    "stack": ("worker.stack", "start/stop/inspect the local broker + Redis stack"),
}


def _usage() -> str:
    lines = ["usage: python -m worker {run,trends,produce,stack} [--help] ...", ""]
    lines += [f"  {name:<8} {summary}" for name, (_, summary) in SUBCOMMANDS.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        sys.stderr.write(
            f"python -m worker: error: unknown subcommand {name!r} "
            f"(choose from {', '.join(SUBCOMMANDS)})\n"
        )
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    parser = OneLineParser(
        prog=f"python -m worker {name}",
        description=SUBCOMMANDS[name][1],
        parents=[module.get_args_parser(add_help=False)],
        formatter_class=DefaultsHelpFormatter,
        conflict_handler="resolve",
    )
    try:
        return int(module.main(parser.parse_args(rest)) or 0)
    except BrokenPipeError:
        # the reader went away (`trends ... | head`): no traceback, and no second one when the
        # interpreter flushes stdout on exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a shell reports a process killed by SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
