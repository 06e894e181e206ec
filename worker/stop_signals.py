"""SIGTERM / SIGINT -> a stop Event, set from a thread instead of the signal handler.

A Python signal handler runs on the main thread between two bytecodes, which can be inside
``stop.wait()`` while that thread holds the Event's lock: a handler that calls ``stop.set()``
then waits for that lock for ever. The supervisor polls ``stop.wait()`` all the time, so a
SIGTERM from Kubernetes could hang it until the grace period's SIGKILL (seen in CI: a stand-in
child hung inside Condition.__exit__ -> handler -> Event.set -> Condition.__enter__). Here the C
level handler writes the signal's number to a pipe (``signal.set_wakeup_fd``), and a daemon
thread that reads it sets the Event, taking the lock like any other thread.
"""

from __future__ import annotations

import os
import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def stop_on_signals(
    stop: threading.Event, signals: tuple[signal.Signals, ...] = STOP_SIGNALS
) -> None:
    """Set ``stop`` when one of ``signals`` arrives; call once, from the main thread."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)  # the C handler must never block on a full pipe
    wanted = {int(s) for s in signals}
    for sig in signals:
        # a Python-level handler must exist for the wake-up byte to be written; it does nothing
        # itself: the flag is set by the thread below
        signal.signal(sig, _noted)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

    def watch() -> None:
        while True:
            data = os.read(read_fd, 64)
            if not data:
                return
            if any(byte in wanted for byte in data):
                stop.set()

    threading.Thread(target=watch, name="stop-signals", daemon=True).start()


def _noted(signum: int, frame: object) -> None:
    """The Python-level half: nothing to do (see the module docstring)."""
