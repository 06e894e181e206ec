"""CLI plumbing shared by the subcommands: one-line errors with exit code 2, argument types."""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from training.checkpoint import CheckpointError
from training.cli_errors import EXIT_BAD_INPUT, utf8_problem
from training.datasets.base import DatasetError, message_line
from training.models import UnknownArchError


class BadArgumentError(ValueError):
    """A flag value that is well-formed but unusable; the message names the flag and value."""


class StopRequested(KeyboardInterrupt):
    """Raised by a command, between two steps, once its ``stop`` Event is set (SIGTERM): it ends
    the run exactly as Ctrl-C's KeyboardInterrupt does."""


def raise_if_stopped(stop: threading.Event | None) -> None:
    """End the command here, as an interruption, when a stop was requested."""
    if stop is not None and stop.is_set():
        raise StopRequested


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, with a note from the command on what it leaves behind (``train``: the
    checkpoint to continue from, or that it saved none); :func:`run_guarded` prints it."""


# path problems are the user's to fix too (an --out they cannot write, a file where a folder
# belongs): their message names the path, so one line says everything a traceback would
USER_ERRORS = (
    DatasetError,
    CheckpointError,
    UnknownArchError,
    BadArgumentError,
    FileNotFoundError,
    PermissionError,
    NotADirectoryError,
    IsADirectoryError,
)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity, e.g. a container's cpuset), at least 1: the
    bound for flags that start threads or processes on this machine."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


MAX_SEED = 2**32 - 1  # torch, numpy and Python all take it; training derives per-epoch seeds


def seed_int(text: str) -> int:
    """A random seed in 0..2**32-1: a larger one overflows torch's generator mid-run."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{text!r} must be in 0..{MAX_SEED}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number > 0")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (weight decay, warm-up epochs); torch would refuse a negative weight
    decay only after the data set and model were loaded, with a traceback."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return value


def unit_float(text: str) -> float:
    """A number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be in [0, 1)")
    return value


def check_out_dir(path: Path, flag: str = "--out") -> None:
    """Refuse an output path that cannot become a directory before any work is done, rather
    than with a traceback after an epoch of training."""
    try:
        path.resolve()
    except (RuntimeError, OSError) as exc:  # a symlink loop: RuntimeError before Python 3.13
        raise BadArgumentError(f"{flag} {path}: cannot be resolved ({exc})") from None
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise BadArgumentError(f"{flag} {path}: {p} exists and is not a directory")
            return


def check_utf8_path(path: Path, flag: str = "--out") -> None:
    """Refuse a path whose name is not UTF-8 where a library downstream needs it as text
    (TensorBoard's writer, the ONNX exporter), rather than with a traceback after the work."""
    shown = utf8_problem(path)
    if shown is not None:
        raise BadArgumentError(f"{flag} {shown}: the path is not UTF-8; choose another")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


EXIT_FAILED = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


# a SIGTERM this long after the first is a second one (interrupt now); one sooner is the same
# stop sent twice (a wrapper script that forwards the signal it got, as the terminal sent it too)
STOP_REPEAT_AFTER_S = 2.0


def interrupt_on_sigterm() -> None:
    """SIGTERM (a scheduler's stop, ``kill``) ends a command like Ctrl-C: KeyboardInterrupt
    unwinds it, instead of the process vanishing mid-write. For the commands that do not poll a
    stop Event (evaluate, make-sample); training uses :func:`stop_on_sigterm`."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def stop_on_sigterm(repeat_after_s: float = STOP_REPEAT_AFTER_S) -> threading.Event:
    """SIGTERM (a scheduler's stop, ``kill``) sets the returned Event, and nothing else: training
    checks it between two steps (and before each epoch and evaluation batch) and ends there as
    an interruption (:class:`StopRequested`), so no step, checkpoint write or collective is cut
    in half. A second SIGTERM, ``repeat_after_s`` or more after the first, does not wait for the
    step to end: it raises KeyboardInterrupt at once, as SIGTERM did before (a checkpoint write
    it cuts short removes its temp file; the same one line and exit code 130).

    SIGINT keeps Python's own handler: Ctrl-C interrupts at once, during data loading and
    indexing too, as before. Setting the Event from the handler is safe here, unlike in the
    worker (``worker.stop_signals``): no thread ever waits on it, so the main thread cannot hold
    its lock when the handler runs. Call once, from the main thread."""
    stop = threading.Event()
    first_at: list[float] = []  # when the first SIGTERM came

    def request_stop(signum: int, frame: object) -> None:
        now = time.monotonic()
        if first_at and now - first_at[0] >= repeat_after_s:
            raise KeyboardInterrupt  # the second signal: the documented forced interruption
        if not first_at:
            first_at.append(now)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    return stop


def run_guarded(main: Callable[[argparse.Namespace], object], args: argparse.Namespace) -> int:
    """Run a subcommand; bad input becomes one line on stderr and exit code 2, a diverged run
    (FloatingPointError: the loss went NaN) one line and 1, an interruption one line and 130."""
    try:
        main(args)
    except USER_ERRORS as exc:
        print(f"error: {message_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except FloatingPointError as exc:
        print(f"error: training diverged: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt as exc:
        note = f"; {exc}" if isinstance(exc, Interrupted) and str(exc) else ""
        if os.environ.get("RANK", "0") == "0":  # under torchrun, one line for the whole run
            print(f"interrupted{note}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0
