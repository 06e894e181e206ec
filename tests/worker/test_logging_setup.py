"""The worker's log configuration: kafka-python's close race is not an ERROR at shutdown."""

from __future__ import annotations

import logging
import socket

import pytest
from kafka.net.transport import KafkaTCPTransport

from worker.logging_setup import ClosedTransportReadFilter, ignore_kafka_close_race


class StubNet:
    """What a transport's close asks of its event loop."""

    def unregister_event(self, sock, event):
        pass

    def cancel(self, task):
        pass


@pytest.fixture
def transport_logger():
    logger = logging.getLogger("kafka.net.transport")
    saved = logger.filters[:]
    # a test before this one may have run a worker's shutdown in this process, which installs
    # the filter for good: start from kafka-python's own logging
    logger.filters[:] = [f for f in saved if not isinstance(f, ClosedTransportReadFilter)]
    yield logger
    logger.filters[:] = saved


def read_after_close(caplog) -> list[logging.LogRecord]:
    """What kafka-io logs when it recv()s a socket KafkaConsumer.close() just closed.

    KafkaNetClient.close closes the connections on the caller's thread while the IO thread
    still polls them; the IO thread's read then finds the transport closed, its socket None.
    """
    a, b = socket.socketpair()
    transport = KafkaTCPTransport(StubNet(), a, host="127.0.0.1")
    transport.close()  # the main thread, in consumer.close()
    b.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kafka"):
        _data, err = transport._sock_recv()  # the IO thread, a moment too late
    assert err is not None
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_kafka_python_logs_a_read_on_a_closed_transport_as_an_error(caplog, transport_logger):
    # the record the filter is for, exactly as kafka-python 3.0 emits it: if this changes with a
    # kafka-python upgrade, the filter below no longer matches and needs a look
    (record,) = read_after_close(caplog)
    assert record.name == "kafka.net.transport"
    assert "[none] (closed)" in record.getMessage()
    assert "Error receiving network data" in record.getMessage()
    assert record.exc_info is not None and isinstance(record.exc_info[1], AttributeError)


def test_once_shutdown_begins_a_read_on_a_closed_transport_is_not_logged(caplog, transport_logger):
    ignore_kafka_close_race()
    ignore_kafka_close_race()  # idempotent
    assert sum(isinstance(f, ClosedTransportReadFilter) for f in transport_logger.filters) == 1
    assert read_after_close(caplog) == []


def test_read_errors_on_an_open_transport_still_get_through(caplog, transport_logger):
    ignore_kafka_close_race()
    a, b = socket.socketpair()
    transport = KafkaTCPTransport(StubNet(), a, host="127.0.0.1")
    b.close()  # the broker went away: recv() returns b""
    with caplog.at_level(logging.WARNING, logger="kafka"):
        _data, err = transport._sock_recv()
    a.close()
    assert err is not None
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        f"{transport}: socket disconnected"
    ]


def test_json_lines_carry_the_worker_id_unless_the_record_names_one(capsys):
    import json

    from worker.logging_setup import configure_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("INFO", json_lines=True, worker_id="pod-a-p1")
        logging.getLogger("worker.test").info("hello")
        logging.getLogger("worker.test").info("other", extra={"worker_id": "explicit"})
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(x["msg"], x["worker_id"]) for x in lines] == [
        ("hello", "pod-a-p1"),
        ("other", "explicit"),
    ]


def test_python_warnings_become_json_log_lines(capsys):
    import json
    import warnings

    from worker.logging_setup import configure_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        with warnings.catch_warnings():  # pytest's own capture swaps showwarning: start clean
            logging.captureWarnings(False)
            warnings.showwarning = warnings._showwarning_orig
            configure_logging("INFO", json_lines=True, worker_id="w")
            warnings.simplefilter("always")
            warnings.warn("Corrupt EXIF data", UserWarning, stacklevel=1)
    finally:
        logging.captureWarnings(False)
        root.handlers[:], level = saved
        root.setLevel(level)
    (line,) = capsys.readouterr().err.splitlines()
    record = json.loads(line)
    assert record["logger"] == "py.warnings" and "Corrupt EXIF data" in record["msg"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _coordinator_dead(node: int = 111) -> logging.LogRecord:
    return logging.LogRecord(
        "kafka.coordinator", logging.WARNING, __file__, 1,
        "Marking the coordinator dead (node %s) for group %s: %s.",
        (f"coordinator-{node}", "carstream", "KafkaConnectionError"), None,
    )  # fmt: skip


def test_a_flood_of_coordinator_dead_lines_is_one_line_then_a_count_per_interval():
    from worker.logging_setup import _COORDINATOR_DEAD, RepeatedLineFilter

    clock = FakeClock()
    flood = RepeatedLineFilter([_COORDINATOR_DEAD], every_s=30.0, clock=clock)
    first = _coordinator_dead()
    assert flood.filter(first)
    assert first.getMessage().startswith("Marking the coordinator dead (node coordinator-111)")
    kept = []
    for _ in range(2734):  # a second of the outage seen
        clock.now += 29.0 / 2734
        record = _coordinator_dead()
        if flood.filter(record):
            kept.append(record)
    assert kept == []
    clock.now = 1030.0
    record = _coordinator_dead(112)
    assert flood.filter(record)
    assert record.getMessage() == (
        "Marking the coordinator dead (node coordinator-112) for group carstream: "
        "KafkaConnectionError. (2734 more like it dropped in the last 30 s)"
    )
    clock.now += 31.0  # quiet since: the next one alone, no count
    record = _coordinator_dead()
    assert flood.filter(record) and "more like it" not in record.getMessage()
    other = logging.LogRecord("kafka.coordinator", logging.WARNING, __file__, 1, "x %s", (1,), None)
    assert all(flood.filter(other) for _ in range(3))  # other messages untouched


def test_configure_logging_limits_every_kafka_loggers_floods_on_its_handler(capsys):
    """A 15 s broker outage logged 64 kafka-python ERRORs from six loggers; the handler lets
    one of each through per interval, the worker's own lines all, and a handler of kafka's own
    loggers (connections.BootstrapFailures) still sees every record."""
    from worker.logging_setup import RepeatedLineFilter, configure_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    seen: list[logging.LogRecord] = []
    counter = logging.Handler()
    counter.emit = seen.append
    cluster = logging.getLogger("kafka.cluster")
    cluster.addHandler(counter)
    try:
        configure_logging("INFO")
        configure_logging("INFO")
        (handler,) = root.handlers
        assert sum(isinstance(f, RepeatedLineFilter) for f in handler.filters) == 1
        for _ in range(20):
            cluster.error("No node available for metadata refresh: %s", "x")
            logging.getLogger("kafka.net.connection").error("Connection to %s failed", "b-0")
            logging.getLogger("worker.pipeline").warning("applying trends failed; retry")
    finally:
        cluster.removeHandler(counter)
        root.handlers[:], level = saved
        root.setLevel(level)
    err = capsys.readouterr().err
    assert err.count("No node available") == 1 and err.count("Connection to b-0 failed") == 1
    assert err.count("applying trends failed") == 20
    assert len(seen) == 20


def test_a_new_cause_under_a_limited_template_is_not_hidden():
    """An outage's "Connection failed: [Errno 111]" must not hide the expired certificate that
    follows under the same template: kafka-python raises both as KafkaConnectionError."""
    import ssl

    from kafka.errors import KafkaConnectionError

    from worker.logging_setup import RepeatedLineFilter

    def failed(cause: BaseException) -> logging.LogRecord:
        try:
            try:
                raise cause
            except OSError as exc:
                raise KafkaConnectionError(str(exc))  # noqa: B904 (as kafka-python does)
        except KafkaConnectionError as error:
            args = (error,)
        return logging.LogRecord(
            "kafka.net.manager", logging.ERROR, __file__, 1, "Connection failed: %s", args, None
        )

    flood = RepeatedLineFilter(loggers="kafka", clock=FakeClock())
    assert flood.filter(failed(ConnectionRefusedError(111, "refused")))
    assert not flood.filter(failed(ConnectionRefusedError(111, "refused")))  # a repeat
    assert flood.filter(failed(ssl.SSLCertVerificationError(1, "certificate has expired")))
