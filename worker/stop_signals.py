"""SIGTERM / SIGINT -> a stop Event, set from a thread instead of the signal handler.

A Python signal handler runs on the main thread between two bytecodes, which can be inside
``stop.wait()`` while that thread holds the Event's lock: a handler that calls ``stop.set()``
then waits for that lock for ever. The supervisor polls ``stop.wait()`` all the time, so a
SIGTERM from Kubernetes could hang it until the grace period's SIGKILL (seen in CI: a stand-in
child hung inside Condition.__exit__ -> handler -> Event.set -> Condition.__enter__). Here the C
level handler writes the signal's number to a pipe (``signal.set_wakeup_fd``), and a daemon
thread that reads it sets the Event, taking the lock like any other thread.

A second stop signal (the operator's second Ctrl-C, a ``kill`` repeated because the drain takes
too long) ends the process at once with exit code 128 + the signal's number (143 for SIGTERM, 130
for SIGINT), without finishing or committing anything more: what was not committed is read again
after the restart, and Redis counts it once. Only a signal at least ``REPEAT_AFTER_S`` after the
first counts as a second: a terminal's Ctrl-C reaches every process of its group, and a wrapper
script that traps it and forwards a SIGTERM (deploy/local/demo.sh) sends the same stop twice
within milliseconds. A stop the worker set itself (a fatal error) is no first signal either.

The supervisor starts its children with these signals blocked (``block_stop_signals``), so that
one arriving before the child has its handlers (while it imports and reads its settings) is held
and then taken as a stop, instead of killing it by the default action; ``stop_on_signals``
unblocks them once the handlers are in place.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEAT_AFTER_S = 2.0  # a stop signal this long after the first is a second one (exit now)


def stop_on_signals(
    stop: threading.Event,
    signals: tuple[signal.Signals, ...] = STOP_SIGNALS,
    on_repeat: Callable[[int], None] | None = None,
    repeat_after_s: float = REPEAT_AFTER_S,
) -> None:
    """Set ``stop`` when one of ``signals`` arrives; call once, from the main thread.

    One arriving ``repeat_after_s`` or more after the first calls ``on_repeat`` with its
    number; by default (``exit_now``) the process exits at once with 128 + that number. One
    arriving sooner is the same stop, sent twice. The signals are unblocked here, so one held
    since the process started (``block_stop_signals``) arrives now.
    """
    repeat = exit_now if on_repeat is None else on_repeat
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)  # the C handler must never block on a full pipe
    wanted = {int(s) for s in signals}
    for sig in signals:
        # a Python-level handler must exist for the wake-up byte to be written; it does nothing
        # itself: the flag is set by the thread below
        signal.signal(sig, _noted)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

    def watch() -> None:
        first_at: float | None = None  # when the first stop signal came
        while True:
            data = os.read(read_fd, 64)
            if not data:
                return
            for byte in data:
                if byte not in wanted:
                    continue
                now = time.monotonic()
                if first_at is None:
                    first_at = now
                    stop.set()
                elif now - first_at >= repeat_after_s:
                    repeat(byte)
                else:
                    log.debug(
                        "signal %d again %.3f s after the first: one stop", byte, now - first_at
                    )

    threading.Thread(target=watch, name="stop-signals", daemon=True).start()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)


def block_stop_signals(signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
    """Hold ``signals`` until ``stop_on_signals`` unblocks them: for a child between fork and
    exec (the blocked set survives exec), so a stop signal sent while it starts is not fatal."""
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)


def exit_now(signum: int) -> None:
    """A second stop signal: exit at once, 128 + its number, committing nothing more."""
    log.warning(
        "%s again while stopping: exiting now, without finishing or committing the batches in "
        "flight (they are read again after the restart)",
        signal.Signals(signum).name,
    )
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(128 + signum)


def _noted(signum: int, frame: object) -> None:
    """The Python-level half: nothing to do (see the module docstring)."""
