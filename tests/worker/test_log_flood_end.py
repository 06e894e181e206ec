"""A kafka-python flood that ends is told: its dropped count was told only with the next record
of the same message, and when none came (the outage over, or the process exiting) never."""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from worker.logging_setup import RepeatedLineFilter, configure_logging

DEAD = "Marking the coordinator dead (node %s) for group %s: %s."


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def worker_logging() -> Iterator[tuple[logging.StreamHandler, FakeClock]]:
    """configure_logging's handler (writing to a StringIO, ``handler.stream``), its flood filter
    on a fake clock; the root restored after."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("INFO")
        (handler,) = root.handlers
        handler.setStream(io.StringIO())
        (flood,) = [f for f in handler.filters if isinstance(f, RepeatedLineFilter)]
        clock = FakeClock()
        flood.clock = clock
        yield handler, clock
    finally:
        logging.captureWarnings(False)
        root.handlers[:], level = saved
        root.setLevel(level)


def _written(handler: logging.StreamHandler) -> str:
    """What the handler wrote since the last call."""
    text = handler.stream.getvalue()
    handler.stream.seek(0)
    handler.stream.truncate()
    return text


def _flood(n: int) -> None:
    for i in range(n):
        logging.getLogger("kafka.coordinator").warning(DEAD, i, "carstream", "KafkaConnectionError")


def test_a_flood_that_ends_is_told_with_the_next_line_of_any_kind(worker_logging):
    handler, clock = worker_logging
    _flood(5)  # one through, 4 dropped
    clock.now += 31.0  # the outage is over: the message never comes again
    logging.getLogger("worker.pipeline").info("consumer joined")
    logging.getLogger("worker.pipeline").info("consumer joined again")  # told once only
    lines = _written(handler).splitlines()
    assert len(lines) == 4, lines
    assert "WARNING kafka.coordinator: Marking the coordinator dead (node 0)" in lines[0]
    assert lines[1].endswith(
        f"WARNING kafka.coordinator: 4 more {DEAD!r} records were dropped in the last 31 s"
    )
    assert lines[2].endswith("consumer joined") and lines[3].endswith("consumer joined again")


def test_a_flood_still_within_its_interval_is_not_told_yet(worker_logging):
    handler, clock = worker_logging
    _flood(3)
    clock.now += 10.0
    logging.getLogger("worker.pipeline").info("batch done")
    err = _written(handler)
    assert "dropped" not in err and err.count("Marking the coordinator dead") == 1
    clock.now += 21.0  # now it has passed
    _flood(1)  # the message itself again: told on it, as before, not twice
    logging.getLogger("worker.pipeline").info("batch done")
    err = _written(handler)
    assert err.count("dropped") == 1 and "(2 more like it dropped in the last 31 s)" in err


def test_a_flood_cut_short_is_told_when_the_handler_closes(worker_logging):
    handler, clock = worker_logging
    _flood(7)
    clock.now += 2.0
    handler.close()  # logging.shutdown does this at exit
    err = _written(handler)
    lines = err.splitlines()
    assert lines, err
    assert lines[-1].endswith(f"6 more {DEAD!r} records were dropped in the last 2 s"), err
    handler.close()  # closed twice: nothing told twice
    assert _written(handler) == ""


def test_a_flood_cut_short_by_the_process_exit_is_told():
    code = (
        "import logging\n"
        "from worker.logging_setup import configure_logging\n"
        "configure_logging('INFO', json_lines=True, worker_id='w1')\n"
        "for i in range(50):\n"
        f"    logging.getLogger('kafka.coordinator').warning({DEAD!r}, i, 'g', 'E')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    lines = proc.stderr.splitlines()
    assert len(lines) == 2, proc.stderr
    assert '"worker_id": "w1"' in lines[1] and '"level": "WARNING"' in lines[1]
    assert "49 more 'Marking the coordinator dead" in lines[1]


def test_the_told_count_is_every_record_dropped_across_threads():
    clock = FakeClock()
    told: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = told.append
    RepeatedLineFilter(loggers="kafka", clock=clock).attach(handler)
    logger = logging.getLogger("kafka.h1-threads")
    logger.addHandler(handler)
    logger.propagate = False
    try:

        def flood() -> None:
            for i in range(500):
                logger.error("Connection to %s failed", i)

        threads = [threading.Thread(target=flood) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        clock.now += 30.0
        logger.error("something else")
        logger.error("and more")
    finally:
        logger.removeHandler(handler)
    messages = [r.getMessage() for r in told]
    assert messages[0].startswith("Connection to ") and messages[2:] == [
        "something else",
        "and more",
    ]
    assert (
        messages[1] == "3999 more 'Connection to %s failed' records were dropped in the last 30 s"
    )
    assert told[1].name == "kafka.h1-threads" and told[1].levelno == logging.ERROR


def test_a_handler_above_the_floods_level_does_not_get_its_count():
    clock = FakeClock()
    told: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = told.append
    flood = RepeatedLineFilter(clock=clock).attach(handler)
    quiet = logging.LogRecord("kafka.x", logging.WARNING, __file__, 1, "w %s", (1,), None)
    for _ in range(3):
        flood.filter(quiet)
    clock.now += 31.0
    handler.handle(logging.LogRecord("kafka.x", logging.ERROR, __file__, 1, "e", (), None))
    assert [r.getMessage() for r in told] == ["e"]
