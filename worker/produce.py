"""Publish post events to the input topic: sample images as posts, or raw JSON lines.

`python -m worker produce --images DIR` wraps every image under DIR in a post event of
DESIGN.md (post_id, image_b64, posted_at = now, city, platform), keyed by post_id;
`--jsonl FILE` sends each line as given (hostile inputs included), so the same tool is the
demo feeder and the load generator. A token bucket on time.monotonic paces `--rate`.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import itertools
import json
import logging
import math
import os
import stat
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from training.cli_errors import EXIT_BAD_INPUT, fail, first_validation_error, path_arg, utf8_problem
from training.cli_help import DefaultsHelpFormatter

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"})
DEFAULT_PLATFORM = "carstream-produce"
MAX_TIMEOUT_S = 86400.0  # a day; kafka-python and threading overflow on far larger waits
CONNECT_GRACE_S = 5.0  # past --timeout, for kafka-python to report its own bootstrap timeout
MIN_RATE = 1 / MAX_TIMEOUT_S  # one event a day; time.sleep overflows on the wait of a far lower
MAX_REQUEST_BYTES = 16 * 1024 * 1024  # the largest --jsonl record (key + line) sent
# room past key + value in a request: kafka-python adds a batch header and a record's lengths
# (61 + 21 bytes and a few varints) when it checks max_request_size
RECORD_OVERHEAD_BYTES = 1024
_SKIP_CHUNK = 1 << 20  # how much of an over-long JSON line is read at a time, to skip it


class TokenBucket:
    """Allows `rate` events per second on average, bursts up to `burst`; rate 0 = no limit."""

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not (math.isfinite(rate) and rate >= 0):  # a NaN rate would never wait
            raise ValueError(f"rate must be a finite number >= 0, got {rate}")
        self.rate = rate
        self.capacity = max(1.0, burst if burst is not None else rate / 10)
        self._tokens = self.capacity
        self._clock = clock
        self._sleep = sleep
        self._last = clock()

    def acquire(self) -> None:
        """Take one token, sleeping until one has accrued."""
        if self.rate == 0:
            return
        while True:
            now = self._clock()
            self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens >= 1 - 1e-9:  # tolerance: float clocks may fall a hair short
                self._tokens = max(0.0, self._tokens - 1)
                return
            # capped: the wait of a tiny rate overflows time.sleep; the loop sleeps again
            self._sleep(min((1 - self._tokens) / self.rate, MAX_TIMEOUT_S))


def rfc3339_now() -> str:
    """Current UTC time as RFC 3339 with milliseconds and a Z suffix."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def build_event(
    image: bytes,
    city: str | None = None,
    platform: str = DEFAULT_PLATFORM,
    post_id: str | None = None,
    posted_at: str | None = None,
) -> dict[str, Any]:
    """A post event of DESIGN.md's input schema carrying the image inline as base64."""
    event: dict[str, Any] = {
        "post_id": post_id or uuid.uuid4().hex,
        "image_b64": base64.b64encode(image).decode("ascii"),
        "posted_at": posted_at or rfc3339_now(),
        "platform": platform,
    }
    if city:
        event["city"] = city
    return event


def find_images(root: Path) -> list[Path]:
    """Image files under `root` (recursively), in a stable order."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


class InputReadError(Exception):
    """An input file (an image, the JSON lines file) could not be read mid-run."""


@dataclass(frozen=True, slots=True)
class Message:
    """One Kafka message to send; `refused` (why) instead when it cannot be one.

    A post made from an image carries its `event` instead of a `value`: it is serialised at
    send time (:meth:`payload`) with `posted_at` stamped then, after the rate limiter's wait, so
    that a paced post is not dated seconds (or a minute bucket) before it is sent.
    """

    key: bytes | None
    value: bytes
    refused: str | None = None
    event: dict[str, Any] | None = None

    def payload(self) -> bytes:
        """The bytes to send now: `value` as given, or `event` with `posted_at` set to now."""
        if self.event is None:
            return self.value
        return json.dumps({**self.event, "posted_at": rfc3339_now()}).encode()


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):g} MiB"


def _bytes(n: int) -> str:
    """10485760 bytes (10 MiB): a limit as bytes, and in MiB where that reads better."""
    return f"{n} bytes" + (f" ({_mib(n)})" if n >= 1024 * 1024 else "")


def worker_max_message_bytes() -> int:
    """The worker's default max_message_bytes: a post (key + value) larger is dead-lettered."""
    from worker.settings import WorkerSettings  # not at import: pydantic is slow to load

    return WorkerSettings.model_fields["max_message_bytes"].default


def max_image_bytes(max_message_bytes: int) -> int:
    """The largest image whose base64 alone (4 bytes of 3) fits in a message that size."""
    return max_message_bytes // 4 * 3


def read_image(path: Path, max_message_bytes: int) -> bytes | str:
    """The file's bytes, or why it is too large to send (a string), without reading it whole.

    An image over :func:`max_image_bytes` cannot make a post within ``max_message_bytes``. A
    regular file is judged by its size before any read, so a multi-GB file costs one fstat; a
    file whose size says nothing (a pipe, a /proc file: 0) by a read of at most that + 1 byte.
    """
    max_bytes = max_image_bytes(max_message_bytes)
    with path.open("rb") as file:
        info = os.fstat(file.fileno())
        if stat.S_ISREG(info.st_mode) and info.st_size > max_bytes:
            size = f"{info.st_size} bytes"
        else:
            data = file.read(max_bytes + 1)
            if len(data) <= max_bytes:
                return data
            size = "more"
    return (
        f"--images: {path}: {size}, over the {_bytes(max_bytes)} an image can have in a post "
        f"of at most {_bytes(max_message_bytes)} (its base64; --max-message-bytes); not read"
    )


def post_size(event: dict[str, Any]) -> int:
    """Bytes of the message `event` makes: its key (post_id) and its JSON value as sent.

    Exact without serialising the image twice: base64 needs no JSON escapes, and ``posted_at``
    is restamped at send time in the same fixed-length form (:func:`rfc3339_now`).
    """
    wrapper = json.dumps({**event, "image_b64": ""}).encode()
    return len(event["post_id"].encode()) + len(wrapper) + len(event["image_b64"])


def image_messages(
    images: Sequence[Path],
    cities: Sequence[str],
    platform: str,
    count: int | None,
    max_message_bytes: int | None = None,
) -> Iterator[Message]:
    """Post events from the images (cycled when `count` exceeds them), cities round-robin.

    A post larger than `max_message_bytes` (key + JSON value; default: the worker's default
    max_message_bytes), which the worker would dead-letter as too_large, is a refused message
    (counted as failed) naming the file; an image too large to fit is never read whole.
    """
    if max_message_bytes is None:
        max_message_bytes = worker_max_message_bytes()
    city_cycle = itertools.cycle(cities) if cities else itertools.repeat(None)
    source = itertools.cycle(images) if count is not None else iter(images)
    for path in itertools.islice(source, count):
        try:
            image = read_image(path, max_message_bytes)
        except OSError as exc:  # removed, unreadable or failing since find_images listed it
            raise InputReadError(f"--images: cannot read {path}: {exc.strerror or exc}") from exc
        if isinstance(image, str):
            next(city_cycle)  # the posts that are sent keep their round-robin cities
            yield Message(None, b"", refused=image)
            continue
        event = build_event(image, next(city_cycle), platform)  # posted_at: stamped at send
        size = post_size(event)
        if size > max_message_bytes:  # the JSON around the base64 tipped it over
            yield Message(
                None,
                b"",
                refused=f"--images: {path}: a post of {size} bytes (key + JSON), over the "
                f"{_bytes(max_message_bytes)} the worker takes (--max-message-bytes); not sent",
            )
            continue
        yield Message(event["post_id"].encode(), b"", event=event)


def jsonl_messages(
    path: Path, count: int | None, max_bytes: int = MAX_REQUEST_BYTES
) -> Iterator[Message]:
    """Each non-blank line as given; keyed by its post_id when it is a JSON object with one.

    `count` lines at most; fewer lines than `count` are each sent once, with one warning (only
    --images are cycled). A line over `max_bytes` is a refused message (counted as failed): it
    is skipped a chunk at a time, never held whole; so is a line whose key makes the record
    (key + line) larger than `max_bytes`.
    """
    yielded = 0
    try:
        with path.open("rb") as lines:
            for number, line in enumerate(_bounded_lines(lines, max_bytes), 1):
                if isinstance(line, int):
                    yield Message(
                        None,
                        b"",
                        refused=f"--jsonl {path}: line {number}: {line} bytes, over the "
                        f"{_mib(max_bytes)} of a record; not read whole",
                    )
                else:
                    line = line.rstrip(b"\r\n")
                    if not line.strip():
                        continue
                    key = _post_id_key(line)
                    if key and len(key) + len(line) > max_bytes:
                        yield Message(
                            None,
                            b"",
                            refused=f"--jsonl {path}: line {number}: {len(line)} bytes and a key "
                            f"of {len(key)}, over the {_mib(max_bytes)} of a record; not sent",
                        )
                    else:
                        yield Message(key, line)
                yielded += 1
                if yielded == count:
                    return
    except OSError as exc:
        raise InputReadError(f"--jsonl {path}: cannot read: {exc.strerror or exc}") from exc
    if count is not None and yielded:  # none at all is an error the caller reports
        logger.warning(
            "--count %d but %s has %d non-blank line%s: each is sent once (--count cycles "
            "--images only)",
            count,
            path,
            yielded,
            "" if yielded == 1 else "s",
        )


def _bounded_lines(file: Any, max_bytes: int) -> Iterator[bytes | int]:
    """The file's lines (line ends kept), each read with at most max_bytes + 1 bytes held;
    a longer line is skipped and given as its length instead."""
    while line := file.readline(max_bytes + 1):
        if len(line.rstrip(b"\r\n")) <= max_bytes:
            yield line
            continue
        size = len(line)
        while not line.endswith(b"\n") and (line := file.readline(_SKIP_CHUNK)):
            size += len(line)
        yield size - (2 if line.endswith(b"\r\n") else 1 if line.endswith(b"\n") else 0)


def _post_id_key(line: bytes) -> bytes | None:
    try:
        obj = json.loads(line)
        post_id = obj.get("post_id") if isinstance(obj, dict) else None
        # ValueError covers bad UTF-8 and a post_id with a lone surrogate (\ud800) too
        return post_id.encode() if isinstance(post_id, str) else None
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than json can parse
        return None


@dataclass
class SendReport:
    """What a produce run achieved.

    `attempted` records were handed to the producer (or refused by it); each ends `sent`
    (acknowledged), `failed` (refused or rejected, counted per kind in `failures`), or, when the
    run stopped early (`error`), `unconfirmed`: queued or in flight when the broker stopped
    answering, so perhaps written, perhaps not.
    """

    sent: int = 0
    failed: int = 0
    attempted: int = 0
    seconds: float = 0.0
    failures: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    # failures are counted from the main thread (refused sends) and the sender thread (errbacks)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _logged: set[tuple[bool, str]] = field(default_factory=set, repr=False, compare=False)
    # the broker's failures since the last acknowledgement (a record refused for its size is
    # the record's, not the broker's), and when the first of them came (monotonic)
    failing: int = field(default=0, repr=False, compare=False)
    last_failure: str = field(default="", repr=False, compare=False)
    failing_since: float = field(default=0.0, repr=False, compare=False)

    @property
    def unconfirmed(self) -> int:
        return max(0, self.attempted - self.sent - self.failed)

    @property
    def rate(self) -> float:
        """Acknowledged posts per second."""
        return self.sent / self.seconds if self.seconds > 0 else 0.0

    def record_failure(self, number: int, exc: BaseException, named: bool = False) -> None:
        """Count a failed record; log the first failure of each kind only, or (`named`: a
        refusal whose message names its file and line) each distinct refusal once."""
        if self.error is not None:
            return  # abandoned by the close after an abort: unconfirmed, not known to be lost
        kind = type(exc).__name__
        reason = str(exc) if kind in str(exc) else f"{kind}: {exc}"
        seen = (named, reason if named else kind)  # a file cycled by --count is named once
        from kafka.errors import MessageSizeTooLargeError

        with self._lock:
            self.failed += 1
            self.failures[kind] = self.failures.get(kind, 0) + 1
            first = seen not in self._logged
            self._logged.add(seen)
            if not named and not isinstance(exc, MessageSizeTooLargeError):
                if not self.failing:
                    self.failing_since = time.monotonic()
                self.failing += 1
                self.last_failure = reason
        if first and named:
            logger.warning("record %d not sent: %s", number, reason)
        elif first:
            logger.warning(
                "record %d not sent: %s (further %s failures are counted, not logged)",
                number,
                reason,
                kind,
            )


class ProduceAbortedError(RuntimeError):
    """The run cannot go on: the topic has no metadata or the broker stopped answering."""


def send_all(
    producer: Any,
    topic: str,
    messages: Iterator[Message],
    bucket: TokenBucket,
    flush_timeout_s: float = 60.0,
    report: SendReport | None = None,
) -> SendReport:
    """Send every message at the bucket's pace, then flush; counts acknowledged vs failed.

    A record the producer refuses outright (over its max_request_size, say) counts as failed
    and the run goes on. A send or flush that times out (no metadata for the topic within
    max_block_ms: it does not exist and the broker does not create it, or the broker is gone)
    raises ProduceAbortedError; `report` (pass one in to keep it) then holds the counts so far.
    """
    from kafka.errors import KafkaError, KafkaTimeoutError, MessageSizeTooLargeError

    report = report if report is not None else SendReport()
    started = time.monotonic()

    def ok(_metadata: Any) -> None:
        with report._lock:
            report.sent += 1
            report.failing = 0

    try:
        for number, message in enumerate(messages, 1):
            if message.refused is not None:  # too large for the worker or the producer: it
                report.attempted += 1  # fails as the producer's kind, unsent, each one named
                report.record_failure(number, MessageSizeTooLargeError(message.refused), True)
                continue
            bucket.acquire()
            _check_progress(report, topic, flush_timeout_s)
            report.attempted += 1
            value = message.payload()  # an image post is dated now, after the bucket's wait
            try:
                future = producer.send(topic, value=value, key=message.key)
            except KafkaTimeoutError as exc:
                raise ProduceAbortedError(
                    f"topic {topic!r}: no metadata or buffer space within the timeout "
                    f"(does the topic exist? is the broker up?): {exc}"
                ) from exc
            except KafkaError as exc:  # MessageSizeTooLargeError and other refusals
                report.record_failure(number, exc)
                continue
            future.add_callback(ok)
            future.add_errback(functools.partial(report.record_failure, number))
        try:
            producer.flush(timeout=flush_timeout_s)
        except KafkaTimeoutError as exc:
            raise ProduceAbortedError(
                f"topic {topic!r}: records still unacknowledged after {flush_timeout_s:g}s "
                f"(is the broker up?)"
            ) from exc
    finally:
        report.seconds = time.monotonic() - started
    return report


def _check_progress(report: SendReport, topic: str, timeout_s: float) -> None:
    """ProduceAbortedError when records have failed, none acknowledged, for over ``timeout_s``
    since the first of them (two at least: one failure at a slow rate is no outage).

    A broker that restarted without its state (a memory-only one, or a new cluster under the
    same address) fails each record at once (UnknownProducerIdError, then errors on every
    InitProducerId), so no send times out: without this the run went on failing every record
    to its end, at its rate.
    """
    with report._lock:
        failing, last, since = report.failing, report.last_failure, report.failing_since
    if failing >= 2 and time.monotonic() - since > timeout_s:
        raise ProduceAbortedError(
            f"topic {topic!r}: no record acknowledged for {timeout_s:g}s while {failing} "
            f"failed (last: {last}); is the broker up, and does it still hold the topic?"
        )


def close_abandoning(producer: Any, grace_s: float) -> None:
    """Close a producer whose broker stopped answering; records still queued fail (errbacks).

    kafka-python's close(timeout) flushes first and raises when that flush times out, leaving
    the producer open (its __del__ then raises again at exit), so force its sender closed.
    """
    from kafka.errors import KafkaError

    try:
        producer.close(timeout=grace_s)
        return
    except KafkaError:
        pass
    sender = getattr(producer, "_sender", None)
    if sender is not None:
        sender.force_close()  # fails the incomplete batches, which ends the flush below
        sender.join(grace_s)
    with contextlib.suppress(KafkaError):
        producer.close(timeout=grace_s)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Publish car post events to Kafka (demo feeder and load generator).",
        add_help=add_help,
        formatter_class=DefaultsHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=path_arg, help="directory of images, one post per image")
    source.add_argument(
        "--jsonl", type=path_arg, help="file of events, one JSON line each, sent as is"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help=f"events per second (0 = as fast as possible, else at least {MIN_RATE:.3g})",
    )
    parser.add_argument(
        "--city",
        action="append",
        default=[],
        help="city of the posts; repeat to spread posts round-robin over several",
    )
    parser.add_argument("--platform", default=DEFAULT_PLATFORM, help="platform field of the posts")
    parser.add_argument(
        "--max-message-bytes",
        type=int,
        default=None,
        help="--images: the largest post (key + JSON) to send; a larger one, which the worker "
        "would dead-letter as too_large, is refused naming its file (default: the worker's "
        "max_message_bytes, CARSTREAM_MAX_MESSAGE_BYTES)",
    )
    parser.add_argument(
        "--count",
        type=int,
        default=None,
        help="events to send; images are cycled to reach it (default: each image/line once)",
    )
    parser.add_argument(
        "--bootstrap-servers", default=None, help="Kafka brokers (default: worker settings)"
    )
    parser.add_argument("--topic", default=None, help="topic (default: the worker's input topic)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds to wait for the broker at start, for topic metadata or buffer space per "
        f"send, and for the final flush; past it the run stops with an error (at most "
        f"{MAX_TIMEOUT_S:g})",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def main(args: argparse.Namespace) -> int:
    """CLI edge: validate, build the producer from the worker's Kafka settings, report.

    Ctrl-C exits 130: mid-run after handing over what is queued and printing the report.
    """
    try:
        return _main(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)  # before sending (mid-run is handled in _main)
        return 130


def _main(args: argparse.Namespace) -> int:
    if not (math.isfinite(args.rate) and (args.rate == 0 or args.rate >= MIN_RATE)):
        return fail(
            f"--rate {args.rate:g}: must be 0 (no limit) or a finite number of events per "
            f"second >= {MIN_RATE:.3g} (one a day)"
        )
    if not (0 < args.timeout <= MAX_TIMEOUT_S):  # also false for NaN
        return fail(f"--timeout {args.timeout:g}: must be seconds > 0 and <= {MAX_TIMEOUT_S:g}")
    if args.count is not None and not 1 <= args.count <= sys.maxsize:
        return fail(f"--count {args.count}: must be at least 1 and at most {sys.maxsize}")
    if args.topic is not None:  # given empty is an error, not the default
        from worker.settings import check_topic_name

        try:
            check_topic_name(args.topic)
        except ValueError as exc:
            return fail(f"--topic {exc}")
    images_only = {
        "--city": bool(args.city),
        "--platform": args.platform != DEFAULT_PLATFORM,
        "--max-message-bytes": args.max_message_bytes is not None,
    }
    if args.jsonl is not None and any(images_only.values()):
        flag = next(flag for flag, given in images_only.items() if given)
        return fail(f"{flag} applies to --images only (--jsonl lines are sent as given)")
    problem = _field_problem(args.city, args.platform) if args.images is not None else None
    if problem:
        return fail(problem)

    from pydantic import ValidationError

    from worker.settings import WorkerSettings, parse_bootstrap_servers, unknown_env_warnings

    overrides: dict[str, object] = {}
    if args.bootstrap_servers is not None:  # given empty is an error, not the default
        overrides["bootstrap_servers"] = args.bootstrap_servers
    if args.max_message_bytes is not None:  # the worker's own field checks its bounds
        overrides["max_message_bytes"] = args.max_message_bytes
    try:  # before any input is read: its max_message_bytes bounds the posts
        settings = WorkerSettings(**overrides)
    except ValidationError as exc:
        problem = first_validation_error(exc)
        if args.max_message_bytes is not None and problem.startswith("max_message_bytes:"):
            reason = problem.removeprefix("max_message_bytes:").strip()
            return fail(
                f"--max-message-bytes {args.max_message_bytes}: must be a size the worker's "
                f"max_message_bytes takes ({reason})"
            )
        return fail(f"settings: {problem}")
    # a mistyped variable (CARSTREAM_BOOTSTRAP_SERVER) otherwise sends to the default broker,
    # unsaid; logged, as the other warnings (stderr: stdout is the report)
    for line in unknown_env_warnings():
        logger.warning("%s", line)
    max_message_bytes = settings.max_message_bytes  # the flag, or CARSTREAM_MAX_MESSAGE_BYTES
    if args.images is not None:
        if not args.images.is_dir():
            return fail(f"--images {args.images}: not a directory")
        images = find_images(args.images)
        if not images:
            return fail(f"--images {args.images}: no image files found")
        messages = image_messages(images, args.city, args.platform, args.count, max_message_bytes)
    else:
        if not args.jsonl.is_file():
            return fail(f"--jsonl {args.jsonl}: not a readable file")
        messages = jsonl_messages(args.jsonl, args.count)
    try:  # the first record now: an unreadable or empty input fails before connecting
        first = next(messages)
    except InputReadError as exc:
        return fail(str(exc))
    except StopIteration:
        return fail(f"--jsonl {args.jsonl}: no events (every line is blank)")
    read_errors: list[str] = []
    messages = _stop_at_read_error(itertools.chain([first], messages), read_errors)

    from kafka import KafkaProducer
    from kafka.errors import KafkaError, KafkaTimeoutError

    from worker.connections import (
        KAFKA_REFUSAL_LIMIT,
        BootstrapFailures,
        ConnectTimeoutError,
        KafkaRefusedError,
        kafka_common_config,
        within_deadline,
    )

    try:
        settings.check_files()  # a missing CA file otherwise reads as a server not answering
    except ValueError as exc:
        return fail(str(exc))
    topic = args.topic or settings.input_topic
    timeout_ms = max(1, int(args.timeout * 1000))  # 0 ms would not even try
    # room for every record the checks above let through, so none is refused unnamed
    request_bytes = max(MAX_REQUEST_BYTES, max_message_bytes) + RECORD_OVERHEAD_BYTES
    make_producer = functools.partial(
        KafkaProducer,
        **kafka_common_config(settings),
        acks="all",
        linger_ms=20,
        max_request_size=request_bytes,
        max_block_ms=timeout_ms,
        bootstrap_timeout_ms=timeout_ms,  # kafka-python's default is 30 s, whatever --timeout
    )
    # kafka-python reports a broker that refuses its certificate or SASL login only as "Unable
    # to bootstrap" after the whole --timeout: the cause is in its log, which this reads
    failures = BootstrapFailures(
        KAFKA_REFUSAL_LIMIT, len(parse_bootstrap_servers(settings.bootstrap_servers))
    )
    try:
        with failures.attached():
            producer = within_deadline(
                make_producer, args.timeout + CONNECT_GRACE_S, refused=failures.refused
            )
    except (KafkaError, ConnectTimeoutError, KafkaRefusedError) as exc:
        timed_out = isinstance(exc, KafkaTimeoutError | ConnectTimeoutError)
        within = f" within --timeout {args.timeout:g}s" if timed_out else ""
        if isinstance(exc, ConnectTimeoutError):
            reason: object = f"no answer to the {settings.security_protocol} handshake"
        elif timed_out and failures.cause() is not None:
            reason = f"{exc} (last failure: {failures.cause()})"
        else:
            reason = exc
        print(
            f"error: cannot reach Kafka at {settings.bootstrap_servers}{within}: {reason}",
            file=sys.stderr,
        )
        return 1
    report = SendReport()
    interrupted = False
    grace_s = min(5.0, args.timeout)
    try:
        send_all(producer, topic, messages, TokenBucket(args.rate), args.timeout, report)
        producer.close()
    except ProduceAbortedError as exc:
        report.error = str(exc)
        close_abandoning(producer, grace_s)  # what is still queued stays unconfirmed
    except KeyboardInterrupt:
        interrupted = True
        report.error = "interrupted"  # set first: records abandoned below are unconfirmed
        with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C cuts the grace short
            close_abandoning(producer, grace_s)  # hands over what is queued, within the grace
    except BaseException:  # a bug: still hand over what is queued, then re-raise
        close_abandoning(producer, grace_s)
        raise
    if read_errors and report.error is None:  # what was read before it was sent and flushed
        report.error = read_errors[0]
    if args.json:
        print(
            json.dumps(
                {
                    "topic": topic,
                    "sent": report.sent,
                    "failed": report.failed,
                    "unconfirmed": report.unconfirmed,
                    "failures": report.failures,
                    "seconds": round(report.seconds, 3),
                    "rate": round(report.rate, 2),
                    "error": report.error,
                }
            )
        )
    else:
        extra = f" unconfirmed={report.unconfirmed}" if report.unconfirmed else ""
        print(
            f"sent={report.sent} failed={report.failed}{extra} topic={topic} "
            f"seconds={report.seconds:.2f} rate={report.rate:.1f}/s"
        )
    if interrupted:
        print(
            f"interrupted: stopped after sent={report.sent} failed={report.failed} "
            f"unconfirmed={report.unconfirmed}",
            file=sys.stderr,
        )
        return 130
    if report.error:
        print(
            f"error: {report.error} (stopped after sent={report.sent} failed={report.failed} "
            f"unconfirmed={report.unconfirmed})",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT if report.error in read_errors else 1
    return 0 if report.failed == 0 else 1


def _field_problem(cities: Sequence[str], platform: str) -> str | None:
    """Why --city/--platform values would make posts the worker dead-letters or counts cityless."""
    from pydantic import ValidationError

    from worker.schemas import PostEvent
    from worker.trend_keys import normalize_city

    for flag, value in [*(("--city", c) for c in cities), ("--platform", platform)]:
        if utf8_problem(value) is not None:  # shown as repr: the escapes name the bad bytes
            return f"{flag} {value!r}: not valid UTF-8"
        # the worker counts a city as normalize_city gives it: one of only spaces, zero-width,
        # bidi or control characters would be counted as no city at all
        if flag == "--city" and normalize_city(value) is None:
            return f"{flag} {value!r}: blank (leave --city out for posts without a city)"
        if flag == "--platform" and not value.strip():
            return f"{flag} {value!r}: blank (leave --platform out for {DEFAULT_PLATFORM!r})"
        try:
            PostEvent.model_validate(build_event(b"", **{flag[2:]: value}))
        except ValidationError as exc:
            return f"{flag} {value!r}: {first_validation_error(exc)}"
    return None


def _stop_at_read_error(messages: Iterator[Message], errors: list[str]) -> Iterator[Message]:
    """The messages until one cannot be read; its error goes to `errors`, the run then ends."""
    try:
        yield from messages
    except InputReadError as exc:
        errors.append(str(exc))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main(get_args_parser().parse_args()))
