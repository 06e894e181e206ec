"""SIGTERM while the main thread sits in ``stop.wait()`` must stop it, every time."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

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


def test_sigint_stops_it_too_and_other_signals_do_not():
    child = subprocess.Popen([sys.executable, "-c", CHILD], cwd=REPO, stdout=subprocess.PIPE,
                             text=True)  # fmt: skip
    try:
        assert child.stdout.readline() == "up\n"
        child.send_signal(signal.SIGWINCH)  # ignored by default, and not a stop signal here
        child.send_signal(signal.SIGINT)
        out, _ = child.communicate(timeout=20)
    finally:
        child.kill()
    assert child.returncode == 0 and out == "stopped\n"
