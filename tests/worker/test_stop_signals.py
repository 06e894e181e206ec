"""SIGTERM while the main thread sits in ``stop.wait()`` must stop it, every time."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.support import REPO

# waits in very short slices, as the supervisor's poll loop does in longer ones. The deadlock
# this module avoids (a handler's stop.set() waiting for the lock its own thread holds inside
# Event.wait) needs the signal to land in a few bytecodes: 2 of about 6 full test runs hit it in
# that loop, and 3,000 signals here did not, so these tests show the flag is set and the loop
# stops from the watcher thread, not the old hang
CHILD = textwrap.dedent(
    """
    import sys, threading
    from worker.stop_signals import stop_on_signals
    stop = threading.Event()
    stop_on_signals(stop)
    print("up", flush=True)
    while not stop.wait(0.0001):
        pass
    print("stopped", flush=True)
    """
)


def test_sigterm_inside_stop_wait_always_stops_the_loop():
    for _ in range(25):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD], cwd=REPO, stdout=subprocess.PIPE, text=True
        )
        try:
            assert child.stdout.readline() == "up\n"
            child.send_signal(signal.SIGTERM)
            out, _ = child.communicate(timeout=20)
        finally:
            child.kill()
        assert child.returncode == 0 and out == "stopped\n"


OTHER_SIGNAL_CHILD = textwrap.dedent(
    """
    import signal, sys, threading
    from worker.stop_signals import stop_on_signals
    stop = threading.Event()
    stop_on_signals(stop)
    # a handler of its own, so SIGUSR1 writes its byte to the wake-up pipe too: the watcher
    # must read it and leave the flag alone
    signal.signal(signal.SIGUSR1, lambda *_: print("usr1", flush=True))
    print("up", flush=True)
    while not stop.wait(0.0001):
        pass
    print("stopped", flush=True)
    """
)


def _line(fd: int) -> bytes:
    """One line read straight from the pipe (print may write its text and newline apart)."""
    line = b""
    while not line.endswith(b"\n"):
        assert select.select([fd], [], [], 20)[0], f"no full line in 20 s, only {line!r}"
        chunk = os.read(fd, 64)
        assert chunk, f"the child closed its output after {line!r}"
        line += chunk
    return line


def test_other_signals_do_not_stop_the_loop_and_sigint_does():
    child = subprocess.Popen([sys.executable, "-c", OTHER_SIGNAL_CHILD], cwd=REPO,
                             stdout=subprocess.PIPE)  # fmt: skip
    try:
        assert child.stdout.readline() == b"up\n"
        child.send_signal(signal.SIGWINCH)  # ignored by default: no byte at all
        child.send_signal(signal.SIGUSR1)  # a byte the watcher must read and pass over
        fd = child.stdout.fileno()  # unbuffered from here: readline() may have read ahead
        assert _line(fd) == b"usr1\n"
        # what should not happen cannot be awaited: a stop from the watcher would print within
        # microseconds, so half a second without output shows the loop is still running
        assert not select.select([fd], [], [], 0.5)[0], "SIGUSR1 stopped the loop"
        assert child.poll() is None
        child.send_signal(signal.SIGINT)
        out, _ = child.communicate(timeout=20)
    finally:
        child.kill()
    assert child.returncode == 0 and out == b"stopped\n"


# stops, then drains for ever: only a second signal ends it
DRAINING_CHILD = textwrap.dedent(
    """
    import threading, time
    from worker.stop_signals import stop_on_signals
    stop = threading.Event()
    stop_on_signals(stop, repeat_after_s=0.5)
    print("up", flush=True)
    stop.wait()
    print("draining", flush=True)
    time.sleep(60)
    """
)


def test_a_second_stop_signal_exits_at_once_with_128_plus_its_number():
    for first, second in ((signal.SIGTERM, signal.SIGTERM), (signal.SIGTERM, signal.SIGINT)):
        child = subprocess.Popen([sys.executable, "-c", DRAINING_CHILD], cwd=REPO,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        try:
            assert child.stdout.readline() == b"up\n"
            child.send_signal(first)
            first_at = time.monotonic()
            assert child.stdout.readline() == b"draining\n"
            # a terminal's Ctrl-C and a wrapper forwarding it: the same stop, twice at once
            child.send_signal(signal.SIGINT)
            with pytest.raises(subprocess.TimeoutExpired):
                child.wait(timeout=max(0.0, first_at + 0.4 - time.monotonic()))
            # the drain takes too long and the operator asks again: this one ends it
            time.sleep(max(0.0, first_at + 0.6 - time.monotonic()))  # the gap is the behaviour
            child.send_signal(second)
            child.wait(timeout=10)
        finally:
            child.kill()
            child.communicate()
        assert child.returncode == 128 + second


# a child whose stop signals are blocked from its start (the supervisor's preexec_fn), and that
# takes a while before installing its handlers (imports, settings)
SLOW_START_CHILD = textwrap.dedent(
    """
    import threading, time
    from worker.stop_signals import stop_on_signals
    print("starting", flush=True)
    time.sleep(1.0)
    stop = threading.Event()
    stop_on_signals(stop)
    stop.wait(20)
    print("stopped" if stop.is_set() else "never stopped", flush=True)
    """
)


def test_a_stop_signal_held_since_start_up_is_a_stop_not_a_kill():
    from worker.stop_signals import block_stop_signals

    child = subprocess.Popen([sys.executable, "-c", SLOW_START_CHILD], cwd=REPO,
                             stdout=subprocess.PIPE, preexec_fn=block_stop_signals)  # fmt: skip
    try:
        assert child.stdout.readline() == b"starting\n"
        child.send_signal(signal.SIGTERM)  # before its handlers: held, not the default action
        out, _ = child.communicate(timeout=20)
    finally:
        child.kill()
    assert child.returncode == 0 and out == b"stopped\n"
