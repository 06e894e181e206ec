"""Plain or JSON-lines logs for the worker process."""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from datetime import UTC, datetime


class JsonFormatter(logging.Formatter):
    """One JSON object per line: what log shippers (Loki, Cloud Logging, ELK) parse as is."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in ("worker_id", "batch", "partition"):
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class WorkerIdFilter(logging.Filter):
    """Every record carries the worker's id: the processes of one replica (``--processes``)
    share its stderr, and a JSON line must say which of them wrote it."""

    def __init__(self, worker_id: str) -> None:
        super().__init__()
        self.worker_id = worker_id

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "worker_id"):
            record.worker_id = self.worker_id
        return True


def configure_logging(
    level: str = "INFO", json_lines: bool = False, worker_id: str | None = None
) -> None:
    handler = FloodTellingHandler(sys.stderr)
    if worker_id is not None:
        handler.addFilter(WorkerIdFilter(worker_id))
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("kafka").setLevel(max(logging.WARNING, root.level))
    # kafka-python logs each failed retry of an outage, several times over: rate-limited on
    # the handler, so handlers of its own loggers (connections.BootstrapFailures) see them all
    RepeatedLineFilter(loggers="kafka").attach(handler)
    # Python warnings (Pillow's "Corrupt EXIF data" for a post's bad EXIF block) go through the
    # same handler, so --log-json output stays one JSON object a line
    logging.captureWarnings(True)


# kafka.net.transport's messages for a failed read (kafka-python 3.0.x)
_READ_ERRORS = (
    "%s: Error receiving network data closing socket",
    "%s: socket disconnected",
)


class ClosedTransportReadFilter(logging.Filter):
    """Drops kafka-python's read errors on a connection that was already being closed.

    kafka-python 3.0's ``KafkaConsumer.close()`` closes its connections on the calling thread
    (``KafkaNetClient.close`` -> ``KafkaConnectionManager.close`` -> ``transport._close``, which
    sets the socket to None) while its ``kafka-io`` thread still runs the event loop. An IO thread
    that is between "socket readable" and ``recv()`` at that moment calls ``None.recv`` and logs
    ``<KafkaTCPTransport [none] (closed)>: Error receiving network data closing socket`` with an
    ``AttributeError`` traceback at ERROR (or ``socket disconnected``, when it read the socket just
    after the shutdown): a clean stop looks like a failure to anything alerting on ERROR. Nothing
    is lost, the connection was being closed anyway; there is no public way to close the
    connections on the IO thread, so the record is dropped instead. Only records about a
    transport that is closing are dropped: the same messages during operation (a broker that goes
    away) come from an open transport and still get through.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg not in _READ_ERRORS or not isinstance(record.args, tuple) or not record.args:
            return True
        is_closing = getattr(record.args[0], "is_closing", None)
        return not (callable(is_closing) and is_closing())


def ignore_kafka_close_race() -> None:
    """Install :class:`ClosedTransportReadFilter`; call it when shutdown begins, not before."""
    logger = logging.getLogger("kafka.net.transport")
    if not any(isinstance(f, ClosedTransportReadFilter) for f in logger.filters):
        logger.addFilter(ClosedTransportReadFilter())


# kafka-python 3.0 (kafka.coordinator.base) logs this on every failed coordinator request: with
# the broker out, thousands of lines a second (78,642 in 152 s in one outage)
_COORDINATOR_DEAD = "Marking the coordinator dead (node %s) for group %s: %s."
REPEAT_EVERY_S = 30.0


def _causes(record: logging.LogRecord) -> tuple[str, ...]:
    """The types of the exceptions among a record's arguments, and of what each was raised
    from: a new cause under the same template ("Connection failed: %s", an expired certificate
    after a refused connection, both KafkaConnectionError to kafka-python) is no repeat."""
    if not isinstance(record.args, tuple):
        return ()
    out = []
    for arg in record.args:
        if isinstance(arg, BaseException):
            inner = arg.__cause__ or arg.__context__
            out.append(type(arg).__name__ + ("<" + type(inner).__name__ if inner else ""))
    return tuple(out)


# set on the line that tells a flood's dropped count: the filter lets it through untouched
_FLOOD_SUMMARY = "carstream_flood_summary"


class RepeatedLineFilter(logging.Filter):
    """Lets one record of each message (format string, per logger) through per ``every_s``;
    the next one let through says how many were dropped since.

    An outage must show in the log, once, with its rate; not bury everything else (a broker
    outage: 2,735 "Marking the coordinator dead" lines a second, and dozens of kafka-python
    ERRORs in 15 s, which fire ERROR-rate alerts). A record is dropped only when the same
    message of the same logger got through less than ``every_s`` ago. Only ``messages`` are
    limited when given, and only records of ``loggers`` (a logger name and the loggers under it)
    when given. ``clock`` is injected so the rule is tested without waiting.

    A flood that ends is told too, not only when its message comes again (which it may never
    do: the count was lost). Once :meth:`attach`-ed to a handler, the filter tells each flood
    whose ``every_s`` has passed, in one line of the flood's logger and level, ``N more
    '<template>' records were dropped in the last S s``, when it sees the next record of any
    kind (before that record), and every flood still untold when the handler closes
    (``logging.shutdown`` at exit closes it; a :class:`FloodTellingHandler` asks its filters).
    The line is handed to the handler's ``handle`` from the filter, outside the filter's lock
    (each count is taken, under it, exactly once, whichever thread sees it first), and is
    marked so that the filter lets it through at once: no recursion, and no logger's other
    handlers see it. Not a timer thread: a flood ends unseen only until the next line or exit.
    Not attached (added with ``addFilter``, or on a logger), a count is told only with the next
    record of its message.
    """

    def __init__(
        self,
        messages: Iterable[str] | None = None,
        every_s: float = REPEAT_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
        loggers: str | None = None,
    ) -> None:
        super().__init__()
        self.messages = None if messages is None else frozenset(messages)
        self.every_s = every_s
        self.clock = clock
        self.loggers = loggers
        self._lock = threading.Lock()  # kafka-python logs from its IO thread and the caller's
        # key -> (let through at, dropped since, level of the last one dropped)
        self._last: dict[tuple[str, ...], tuple[float, int, int]] = {}
        self._due = math.inf  # when the first flood in _last may be told as ended
        # weak: the handler holds this filter, and a cycle would keep a replaced handler (and
        # its stream) alive until exit, when closing it would tell its floods to a dead stream
        self._handlers: list[weakref.ref[logging.Handler]] = []

    def attach(self, handler: logging.Handler) -> RepeatedLineFilter:
        """Filter ``handler``'s records, and tell it the floods that end; returns self."""
        handler.addFilter(self)
        self._handlers.append(weakref.ref(handler))
        return self

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, _FLOOD_SUMMARY, False):
            return True
        now = self.clock()
        keep = self._keep(record, now)
        if self._handlers:
            self._tell(self.ended(now))
        return keep

    def _keep(self, record: logging.LogRecord, now: float) -> bool:
        if self.loggers is not None and not (
            record.name == self.loggers or record.name.startswith(self.loggers + ".")
        ):
            return True
        if not isinstance(record.msg, str):
            return True
        if self.messages is not None and record.msg not in self.messages:
            return True
        key = (record.name, record.msg, *_causes(record))
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last[0] < self.every_s:
                self._last[key] = (last[0], last[1] + 1, record.levelno)
                self._due = min(self._due, last[0] + self.every_s)
                return False
            self._last[key] = (now, 0, record.levelno)
        if last is not None and last[1]:
            record.msg = (
                f"{record.getMessage()} ({last[1]} more like it dropped in the last "
                f"{now - last[0]:.0f} s)"
            )
            record.args = ()
        return True

    def ended(self, now: float, every: bool = False) -> list[logging.LogRecord]:
        """The lines that tell the floods over at ``now`` (their ``every_s`` passed; with
        ``every``, all of them), each count taken so that it is told once."""
        with self._lock:
            if now < self._due and not every:
                return []
            told, due = [], math.inf
            for key, (since, dropped, level) in list(self._last.items()):
                if every or now - since >= self.every_s:
                    del self._last[key]  # a later record of it is let through as a first one
                    if dropped:
                        told.append((key, since, dropped, level))
                elif dropped:
                    due = min(due, since + self.every_s)
            self._due = due
        return [
            _flood_summary(name, template, dropped, now - since, level)
            for (name, template, *_), since, dropped, level in told
        ]

    def tell_all(self) -> None:
        """Tell every flood with records dropped, over or not (the handler is closing)."""
        self._tell(self.ended(self.clock(), every=True))

    def _tell(self, lines: list[logging.LogRecord]) -> None:
        for line in lines:
            for ref in self._handlers:
                handler = ref()
                if handler is not None and line.levelno >= handler.level:
                    handler.handle(line)


def _flood_summary(
    name: str, template: str, dropped: int, seconds: float, level: int
) -> logging.LogRecord:
    line = logging.LogRecord(
        name,
        level,
        __file__,
        0,
        f"{dropped} more {template!r} records were dropped in the last {seconds:.0f} s",
        (),
        None,
    )
    setattr(line, _FLOOD_SUMMARY, True)
    return line


class FloodTellingHandler(logging.StreamHandler):
    """A StreamHandler whose :class:`RepeatedLineFilter` filters tell their untold floods when
    it closes, so a flood the process's exit cuts short still shows its count."""

    def close(self) -> None:
        if not getattr(self.stream, "closed", False):  # a test's captured stream, at exit
            for flood in [f for f in self.filters if isinstance(f, RepeatedLineFilter)]:
                flood.tell_all()
        super().close()
