"""The producer: token bucket and event building (pure), the CLI against the real broker."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition
from PIL import Image

from worker.produce import (
    MAX_TIMEOUT_S,
    Message,
    ProduceAbortedError,
    SendReport,
    TokenBucket,
    build_event,
    find_images,
    image_messages,
    jsonl_messages,
    max_image_bytes,
    post_size,
    read_image,
    send_all,
    worker_max_message_bytes,
)
from worker.stack import TansuBroker, create_topics, free_port


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.t += seconds


def test_token_bucket_paces_to_the_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=20, burst=1, clock=clock, sleep=clock.sleep)
    for _ in range(41):
        bucket.acquire()
    assert clock.t - 100.0 == pytest.approx(2.0, abs=1e-6)  # 1 free + 40 at 20/s


def test_token_bucket_allows_bursts_then_waits() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10, burst=5, clock=clock, sleep=clock.sleep)
    for _ in range(5):
        bucket.acquire()
    assert clock.t == 100.0
    bucket.acquire()
    assert clock.t == pytest.approx(100.1)


def test_zero_rate_never_waits() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=0, clock=clock, sleep=clock.sleep)
    for _ in range(1000):
        bucket.acquire()
    assert clock.t == 100.0


@pytest.mark.parametrize("rate", [-1.0, float("nan"), float("inf")])
def test_token_bucket_refuses_a_rate_it_cannot_pace(rate: float) -> None:
    with pytest.raises(ValueError, match="finite number >= 0"):
        TokenBucket(rate)


def test_token_bucket_waits_of_a_tiny_rate_stay_sleepable() -> None:
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        raise KeyboardInterrupt  # one wait is enough to look at

    bucket = TokenBucket(rate=1e-300, sleep=sleep)
    bucket.acquire()
    with pytest.raises(KeyboardInterrupt):
        bucket.acquire()
    assert waits == [MAX_TIMEOUT_S]  # 1e300 s overflowed time.sleep (a traceback)


def test_build_event_matches_the_input_schema() -> None:
    event = build_event(b"\x89PNG...", city="Lyon", platform="x")
    assert set(event) == {"post_id", "image_b64", "posted_at", "platform", "city"}
    assert base64.b64decode(event["image_b64"]) == b"\x89PNG..."
    assert event["posted_at"].endswith("Z")
    posted = datetime.fromisoformat(event["posted_at"].replace("Z", "+00:00"))
    assert abs(datetime.now(UTC) - posted) < timedelta(seconds=5)
    assert build_event(b"x")["post_id"] != build_event(b"x")["post_id"]
    assert "city" not in build_event(b"x")


def test_jsonl_lines_pass_through_unchanged(tmp_path: Path) -> None:
    lines = [b'{"post_id": "a1", "image_url": "http://x"}', b"not json", b"", b'["list"]']
    path = tmp_path / "e.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    messages = list(jsonl_messages(path, None))
    assert [m.value for m in messages] == [lines[0], lines[1], lines[3]]
    assert [m.key for m in messages] == [b"a1", None, None]
    assert len(list(jsonl_messages(path, 2))) == 2


def test_jsonl_keys_of_post_ids_that_cannot_be_keys_are_none(tmp_path: Path) -> None:
    lines = [b'{"post_id": "\\ud800"}', b"[" * 100_000, b'{"post_id": "ok"}']
    path = tmp_path / "e.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    messages = list(jsonl_messages(path, None))  # a lone surrogate or deep nesting: tracebacks
    assert [m.value for m in messages] == lines
    assert [m.key for m in messages] == [None, None, b"ok"]


def test_a_huge_image_is_refused_by_its_size_without_being_read(tmp_path: Path) -> None:
    huge = tmp_path / "huge.jpg"
    with huge.open("wb") as f:
        f.truncate(4 << 30)  # 4 GiB, sparse: reading it whole took 4 GiB of memory first
    reason = read_image(huge, worker_max_message_bytes())
    assert reason == (
        f"--images: {huge}: {4 << 30} bytes, over the 7864320 bytes (7.5 MiB) an image can have "
        "in a post of at most 10485760 bytes (10 MiB) (its base64; --max-message-bytes); not read"
    )
    small = tmp_path / "small.png"
    small.write_bytes(b"\x89PNG" * 10)
    messages = list(image_messages([small, huge, small], ["Paris", "Lyon"], "p", None))
    assert [m.refused for m in messages] == [None, reason, None]
    cities = [json.loads(m.payload())["city"] for m in messages if m.refused is None]
    assert cities == ["Paris", "Paris"]  # round-robin over the posts the huge one would have had


def test_a_file_without_a_size_is_read_with_a_bounded_read(tmp_path: Path) -> None:
    import threading

    fifo = tmp_path / "pipe.png"
    for payload, expected in [(b"y" * 30, b"y" * 30), (b"y" * 31, None)]:
        os.mkfifo(fifo)
        writer = threading.Thread(target=lambda p=payload: fifo.write_bytes(p))
        writer.start()
        got = read_image(fifo, max_message_bytes=40)  # base64: 30 bytes at most
        writer.join(5)
        fifo.unlink()
        if expected is None:
            assert isinstance(got, str) and f"{fifo}: more, over the" in got
        else:
            assert got == expected


def test_images_the_worker_would_dead_letter_as_too_large_are_refused(tmp_path: Path) -> None:
    # the worker's default max_message_bytes is 10 MiB: an 8 MiB image's post is over it
    # (its base64 alone is 10.7 MiB); images up to 12 MiB were sent, and dead-lettered
    from worker.settings import WorkerSettings

    assert worker_max_message_bytes() == WorkerSettings.model_fields["max_message_bytes"].default
    big = tmp_path / "big.jpg"
    with big.open("wb") as f:
        f.truncate(8 << 20)
    [message] = image_messages([big], [], "p", None)
    assert message.refused is not None and message.refused.startswith(f"--images: {big}: ")
    assert "in a post of at most 10485760 bytes (10 MiB)" in message.refused


def test_the_json_around_an_image_counts_toward_the_message_size(tmp_path: Path) -> None:
    # an image whose base64 alone fits, but not with post_id, posted_at, city and the field
    # names: was sent, and refused by kafka-python (or dead-lettered) without naming the file
    limit = 4000
    exact = tmp_path / "exact.png"
    exact.write_bytes(b"x" * 2000)
    fits = next(image_messages([exact], ["São Paulo"], "p", None, limit))
    size = post_size(fits.event)
    assert size == len(fits.key) + len(fits.payload())  # exact: what is sent
    exact.write_bytes(b"x" * (2000 + (limit - size) // 4 * 3))  # the largest image that fits
    fits = next(image_messages([exact], ["São Paulo"], "p", None, limit))
    assert fits.refused is None and limit - 4 < len(fits.key) + len(fits.payload()) <= limit
    over = tmp_path / "over.png"
    over.write_bytes(b"x" * (exact.stat().st_size + 3))  # 4 more base64 bytes: over by 1-4
    assert over.stat().st_size <= max_image_bytes(limit)  # its base64 alone would fit
    [refused] = image_messages([over], ["São Paulo"], "p", None, limit)
    assert refused.refused is not None
    assert refused.refused.startswith(f"--images: {over}: a post of ")
    assert refused.refused.endswith(
        "bytes (key + JSON), over the 4000 bytes the worker takes (--max-message-bytes); not sent"
    )


def test_a_jsonl_line_whose_key_makes_the_record_too_large_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    line = b'{"post_id": "abc", "x": 1}'  # 26 bytes, key 3: a record of 29
    path.write_bytes(line + b"\n")
    assert [m.value for m in jsonl_messages(path, None, max_bytes=29)] == [line]
    [message] = jsonl_messages(path, None, max_bytes=28)  # was sent, past the request size
    assert message.refused == (
        f"--jsonl {path}: line 1: 26 bytes and a key of 3, over the "
        f"{28 / 1024 / 1024:g} MiB of a record; not sent"
    )


def test_jsonl_lines_over_the_record_size_are_refused_and_skipped(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    path.write_bytes(b'{"post_id": "a"}\n' + b"z" * 100 + b"\r\n\n" + b"w" * 20 + b"\n" + b"q" * 21)
    messages = list(jsonl_messages(path, None, max_bytes=20))
    assert [m.value for m in messages] == [b'{"post_id": "a"}', b"", b"w" * 20, b""]
    assert [m.key for m in messages] == [b"a", None, None, None]
    assert messages[1].refused == f"--jsonl {path}: line 2: 100 bytes, over the " + (
        f"{20 / 1024 / 1024:g} MiB of a record; not read whole"
    )
    assert messages[3].refused is not None and "line 5: 21 bytes" in messages[3].refused


def test_refused_messages_count_as_failed_without_reaching_the_producer(caplog) -> None:
    producer = FakeProducer(max_bytes=100)
    messages = [Message(None, b"x"), Message(None, b"", refused="--images: big.jpg: too large")]
    with caplog.at_level("WARNING", logger="worker.produce"):
        report = send_all(producer, "t", iter(messages * 2), TokenBucket(0))
    assert (report.attempted, report.sent, report.failed) == (4, 2, 2)
    assert report.failures == {"MessageSizeTooLargeError": 2} and producer.calls == 2
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and warnings[0].startswith("record 2 not sent: ")
    assert "MessageSizeTooLargeError: --images: big.jpg: too large" in warnings[0]


def test_each_file_refused_for_its_size_is_named_once(caplog) -> None:
    # only the first refusal of a kind was logged: later files refused were never named
    producer = FakeProducer(max_bytes=100)
    big, bigger = (Message(None, b"", refused=f"--images: {n}: too large") for n in ("a", "b"))
    messages = [Message(None, b"x"), big, bigger, big, Message(None, b"y" * 500)]
    with caplog.at_level("WARNING", logger="worker.produce"):
        report = send_all(producer, "t", iter(messages), TokenBucket(0))
    assert (report.sent, report.failed) == (1, 4)
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings[:2] == [
        "record 2 not sent: [Error 10] MessageSizeTooLargeError: --images: a: too large",
        "record 3 not sent: [Error 10] MessageSizeTooLargeError: --images: b: too large",
    ]  # a, cycled again as record 4, is named once
    assert len(warnings) == 3 and warnings[2].startswith("record 5 not sent: ")


def test_a_count_beyond_the_jsonl_lines_sends_each_once_with_one_warning(
    tmp_path: Path, caplog
) -> None:
    path = tmp_path / "e.jsonl"
    path.write_bytes(b'{"post_id": "a"}\n\n{"post_id": "b"}\n')
    with caplog.at_level("WARNING", logger="worker.produce"):
        assert len(list(jsonl_messages(path, 5))) == 2  # not cycled, as before
        assert len(list(jsonl_messages(path, 2))) == 2  # enough lines: no warning
        assert len(list(jsonl_messages(path, None))) == 2
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [
        f"--count 5 but {path} has 2 non-blank lines: each is sent once (--count cycles "
        "--images only)"
    ]


def _images(root: Path, n: int) -> list[Path]:
    root.mkdir(parents=True)
    paths = []
    for i in range(n):
        path = root / f"sub{i % 2}" / f"car{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(path)
        paths.append(path)
    (root / "notes.txt").write_text("not an image")
    return paths


def _produce(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", "produce", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _consume(bootstrap: str, topic: str, expected: int, timeout_s: float = 30.0) -> list:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        consumer.assign(partitions)
        consumer.seek_to_beginning()
        records: list = []
        deadline = time.monotonic() + timeout_s
        while len(records) < expected and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()


@pytest.mark.integration
def test_produce_images_round_trip(kafka_bootstrap: str, tmp_path: Path) -> None:
    create_topics(kafka_bootstrap, ["produce-images"], 2)
    paths = _images(tmp_path / "imgs", 3)
    result = _produce(
        "--images", str(tmp_path / "imgs"), "--city", "Paris", "--city", "Lyon",
        "--count", "5", "--rate", "200", "--topic", "produce-images",
        "--bootstrap-servers", kafka_bootstrap, "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["sent"] == 5
    records = _consume(kafka_bootstrap, "produce-images", 5)
    assert len(records) == 5
    events = [json.loads(r.value) for r in records]
    assert all(r.key.decode() == e["post_id"] for r, e in zip(records, events, strict=True))
    assert len({e["post_id"] for e in events}) == 5
    assert sorted(e["city"] for e in events) == ["Lyon", "Lyon", "Paris", "Paris", "Paris"]
    sent = sorted(base64.b64decode(e["image_b64"]) for e in events)
    files = [p.read_bytes() for p in sorted(paths)]
    assert sent == sorted(files + files[:2])  # 3 images cycled to 5 posts
    assert find_images(tmp_path / "imgs") == sorted(paths)


@pytest.mark.integration
def test_produce_refuses_posts_over_the_message_size_naming_each(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    create_topics(kafka_bootstrap, ["produce-limit"], 1)
    _images(tmp_path / "imgs", 3)
    wrapped = tmp_path / "imgs" / "wrapped.png"  # its base64 fits 1024 bytes, the post does not
    wrapped.write_bytes(b"w" * 700)
    big = tmp_path / "imgs" / "big.png"
    big.write_bytes(b"b" * 2000)
    result = _produce(
        "--images", str(tmp_path / "imgs"), "--max-message-bytes", "1024", "--city", "Paris",
        "--topic", "produce-limit", "--bootstrap-servers", kafka_bootstrap, "--json",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert (report["sent"], report["failed"]) == (3, 2)
    logged = result.stderr.strip().splitlines()
    assert len(logged) == 2
    assert f"--images: {big}: 2000 bytes, over the 768 bytes an image can have" in logged[0]
    assert f"--images: {wrapped}: a post of " in logged[1]
    assert "over the 1024 bytes the worker takes (--max-message-bytes)" in logged[1]
    records = _consume(kafka_bootstrap, "produce-limit", 3)
    assert len(records) == 3 and all(len(r.key) + len(r.value) <= 1024 for r in records)


@pytest.mark.integration
def test_produce_jsonl_round_trip(kafka_bootstrap: str, tmp_path: Path) -> None:
    create_topics(kafka_bootstrap, ["produce-jsonl"], 1)
    lines = [
        json.dumps({"post_id": f"p{i}", "image_url": "https://example.com/x.jpg"}) for i in range(3)
    ]
    lines.append("{broken")
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(lines) + "\n")
    result = _produce(
        "--jsonl", str(path), "--topic", "produce-jsonl", "--bootstrap-servers", kafka_bootstrap
    )
    assert result.returncode == 0, result.stderr
    assert "sent=4 failed=0" in result.stdout
    records = _consume(kafka_bootstrap, "produce-jsonl", 4)
    assert [r.value.decode() for r in records] == lines
    assert [r.key for r in records] == [b"p0", b"p1", b"p2", None]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--images", "/nonexistent/dir"], "/nonexistent/dir"),
        (["--jsonl", "/nonexistent/e.jsonl"], "/nonexistent/e.jsonl"),
        (["--images", ".", "--rate", "-1"], "--rate -1"),
        (["--images", ".", "--timeout", "0"], "--timeout 0"),
        (["--images", ".", "--timeout", "1e308"], "--timeout 1e+308"),
        (["--images", ".", "--timeout", "nan"], "--timeout nan"),
        (["--images", ".", "--rate", "nan"], "--rate nan"),
        (["--images", ".", "--rate", "inf"], "--rate inf"),
        (["--jsonl", "pyproject.toml", "--bootstrap-servers", ""], "bootstrap_servers"),
        # each of these was a traceback or a silent surprise
        (["--images", ".", "--count", str(2**64)], f"--count {2**64}"),
        (["--images", ".", "--rate", "1e-300"], "--rate 1e-300"),
        (["--images", ".", "--topic", ""], "--topic '' is not a Kafka topic name"),
        (["--images", ".", "--topic", "bad topic!"], "--topic 'bad topic!' is not"),
        (["--images", ".", "--city", "  "], "--city '  ': blank"),
        (["--images", ".", "--city", "\udcff"], "--city '\\udcff': not valid UTF-8"),
        (["--images", ".", "--city", "x" * 129], "at most 128 characters"),
        (["--images", ".", "--platform", "x" * 65], "at most 64 characters"),
        (["--jsonl", "pyproject.toml", "--city", "Paris"], "--city applies to --images only"),
        (
            ["--jsonl", "pyproject.toml", "--max-message-bytes", "2000"],
            "--max-message-bytes applies to --images only",
        ),
        (["--images", ".", "--max-message-bytes", "1023"], "--max-message-bytes 1023: must be"),
        (["--images", ".", "--max-message-bytes", str(2**31)], f"--max-message-bytes {2**31}"),
        (["--jsonl", "EMPTY"], "no events (every line is blank)"),
        (["--jsonl", "BLANK"], "no events (every line is blank)"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args: list[str], needle: str, tmp_path: Path) -> None:
    (tmp_path / "EMPTY").write_bytes(b"")
    (tmp_path / "BLANK").write_bytes(b"\n  \r\n\n")
    args = [str(tmp_path / a) if a in ("EMPTY", "BLANK") else a for a in args]
    result = _produce(*args)
    assert result.returncode == 2
    assert needle in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


class _Future:
    def __init__(self) -> None:
        self.callbacks: list = []
        self.errbacks: list = []

    def add_callback(self, fn) -> None:
        self.callbacks.append(fn)

    def add_errback(self, fn) -> None:
        self.errbacks.append(fn)


class FakeProducer:
    """Acknowledges at flush; refuses values over `max_bytes`; times out from `timeout_at`."""

    def __init__(self, max_bytes: int = 100, timeout_at: int | None = None, flush_fails=False):
        self.max_bytes = max_bytes
        self.timeout_at = timeout_at
        self.flush_fails = flush_fails
        self.pending: list[_Future] = []
        self.calls = 0
        self.closed_with: list = []

    def send(self, topic: str, value: bytes, key: bytes | None = None) -> _Future:
        from kafka.errors import KafkaTimeoutError, MessageSizeTooLargeError

        self.calls += 1
        if self.timeout_at is not None and self.calls >= self.timeout_at:
            raise KafkaTimeoutError(f"Failed to update metadata after 1.0 secs: {topic}")
        if len(value) > self.max_bytes:
            raise MessageSizeTooLargeError(f"The message is {len(value)} bytes")
        future = _Future()
        self.pending.append(future)
        return future

    def flush(self, timeout: float | None = None) -> None:
        from kafka.errors import KafkaTimeoutError

        if self.flush_fails:
            raise KafkaTimeoutError("Timeout waiting for future")
        for future in self.pending:
            for fn in future.callbacks:
                fn(None)
        self.pending.clear()

    def close(self, timeout: float | None = None) -> None:
        self.closed_with.append(timeout)


def _messages(sizes: list[int]) -> list[Message]:
    return [Message(None, b"x" * n) for n in sizes]


def test_oversized_records_fail_and_the_rest_are_sent(caplog) -> None:
    producer = FakeProducer(max_bytes=100)
    with caplog.at_level("WARNING", logger="worker.produce"):
        report = send_all(producer, "t", iter(_messages([10, 500, 20, 600, 30])), TokenBucket(0))
    assert (report.sent, report.failed, report.unconfirmed) == (3, 2, 0)
    assert report.failures == {"MessageSizeTooLargeError": 2}
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "record 2 not sent" in warnings[0]  # once per kind


def test_a_metadata_timeout_aborts_with_the_counts_so_far() -> None:
    producer = FakeProducer(timeout_at=3)
    report = SendReport()
    with pytest.raises(ProduceAbortedError, match=r"'typo-topic'.*does the topic exist"):
        send_all(producer, "typo-topic", iter(_messages([1] * 5)), TokenBucket(0), report=report)
    assert (report.attempted, report.sent, report.failed, report.unconfirmed) == (3, 0, 0, 3)
    assert report.seconds > 0


def test_a_flush_timeout_aborts() -> None:
    report = SendReport()
    with pytest.raises(ProduceAbortedError, match="unacknowledged after 2s"):
        producer = FakeProducer(flush_fails=True)
        send_all(producer, "t", iter(_messages([1, 1])), TokenBucket(0), 2.0, report)
    assert report.unconfirmed == 2


class _LostStateProducer(FakeProducer):
    """Acknowledges the first ``good`` records at once, then fails every record at once, as a
    broker restarted without its state does (UnknownProducerIdError, then InitProducerId
    errors): no send ever times out."""

    def __init__(self, good: int) -> None:
        super().__init__()
        self.good = good

    def send(self, topic: str, value: bytes, key: bytes | None = None):
        from kafka.errors import KafkaError

        self.calls += 1
        future = _Future()
        ok = self.calls <= self.good
        future.add_callback = (lambda fn: fn(None)) if ok else (lambda fn: None)
        future.add_errback = (
            (lambda fn: None) if ok else (lambda fn: fn(KafkaError("InitProducerId failed")))
        )
        return future


def test_a_broker_that_fails_every_record_stops_the_run() -> None:
    producer = _LostStateProducer(good=5)
    report = SendReport()
    messages = (Message(None, b"x") for _ in range(1_000_000))  # far more than 0.05 s of sends
    with pytest.raises(ProduceAbortedError, match=r"no record acknowledged for 0.05s while \d+"):
        send_all(producer, "t", messages, TokenBucket(0), 0.05, report)
    assert report.sent == 5 and 0 < report.failed < 1_000_000 - 5
    assert report.failures == {"KafkaError": report.failed}


def test_one_failed_record_at_a_slow_rate_does_not_stop_the_run() -> None:
    """The clock runs from the first failure since the last acknowledgement, and one failure is
    no outage: at 1 post a minute and a 60 s timeout, a single transient failure ended runs."""

    class OneFails(FakeProducer):
        def send(self, topic, value, key=None):
            from kafka.errors import KafkaError

            self.calls += 1
            future = _Future()
            fails = self.calls == 2
            future.add_callback = (lambda fn: None) if fails else (lambda fn: fn(None))
            future.add_errback = (
                (lambda fn: fn(KafkaError("transient"))) if fails else (lambda fn: None)
            )
            return future

    report = send_all(OneFails(), "t", iter(_messages([1] * 3)), TokenBucket(0), 1e-9)
    assert (report.sent, report.failed, report.error) == (2, 1, None)


def test_records_refused_for_their_size_do_not_stop_the_run() -> None:
    """A run of oversized records is the records' fault, not the broker's: it goes on."""
    report = send_all(
        FakeProducer(max_bytes=1), "t", iter(_messages([5] * 3000 + [1])), TokenBucket(0), 1e-9
    )
    assert (report.sent, report.failed, report.error) == (1, 3000, None)


def test_rate_is_acknowledged_posts_per_second() -> None:
    assert SendReport(sent=30, seconds=2.0).rate == 15.0
    assert SendReport(sent=0, seconds=0.0).rate == 0.0


def test_cli_reports_a_missing_topic_in_one_line_with_counts(monkeypatch, tmp_path, capsys):
    import kafka

    from worker import produce

    lines = tmp_path / "e.jsonl"
    lines.write_text('{"post_id": "a"}\n{"post_id": "b"}\n{"post_id": "c"}\n')
    made: list[FakeProducer] = []

    def fake(**config):
        assert config["max_block_ms"] == 1500  # --timeout bounds the metadata wait
        made.append(FakeProducer(timeout_at=2))
        return made[-1]

    monkeypatch.setattr(kafka, "KafkaProducer", fake)
    args = produce.get_args_parser().parse_args(
        ["--jsonl", str(lines), "--topic", "typo", "--timeout", "1.5", "--json",
         "--bootstrap-servers", "127.0.0.1:1"]
    )  # fmt: skip
    assert produce.main(args) == 1
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["error"] and "'typo'" in report["error"]
    assert (report["sent"], report["failed"], report["unconfirmed"]) == (0, 0, 2)
    assert "rate" in report
    assert len(err.strip().splitlines()) == 1
    assert "does the topic exist" in err and "unconfirmed=2" in err
    assert made[0].closed_with  # closed, not left to __del__


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs Linux /proc")
def test_an_input_that_fails_to_read_exits_2_with_one_line() -> None:
    result = _produce("--jsonl", "/proc/self/mem")  # a regular file whose read() fails: EIO
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --jsonl /proc/self/mem: cannot read: Input/output error"
    ]


def test_an_image_gone_mid_run_stops_the_run_with_the_counts(monkeypatch, tmp_path, capsys):
    import kafka

    from worker import produce

    last = sorted(_images(tmp_path / "imgs", 3))[-1]
    made: list[FakeProducer] = []

    class Producer(FakeProducer):
        def send(self, topic, value, key=None):
            last.unlink(missing_ok=True)  # gone after the scan, before it is read: was a traceback
            return super().send(topic, value, key)

    def fake(**config):
        assert config["bootstrap_timeout_ms"] == 1500  # --timeout bounds the connect too
        made.append(Producer(max_bytes=10**6))
        return made[-1]

    monkeypatch.setattr(kafka, "KafkaProducer", fake)
    args = produce.get_args_parser().parse_args(
        ["--images", str(tmp_path / "imgs"), "--timeout", "1.5", "--json",
         "--bootstrap-servers", "127.0.0.1:1"]
    )  # fmt: skip
    assert produce.main(args) == 2
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert (report["sent"], report["failed"], report["unconfirmed"]) == (2, 0, 0)  # flushed
    assert report["error"] == f"--images: cannot read {last}: No such file or directory"
    assert err.strip().splitlines() == [
        f"error: {report['error']} (stopped after sent=2 failed=0 unconfirmed=0)"
    ]


def test_an_unreachable_broker_fails_within_the_timeout(tmp_path: Path) -> None:
    _images(tmp_path / "imgs", 1)
    started = time.monotonic()
    result = _produce(
        "--images", str(tmp_path / "imgs"), "--timeout", "1",
        "--bootstrap-servers", f"127.0.0.1:{free_port()}",
    )  # fmt: skip
    assert time.monotonic() - started < 20  # kafka-python alone waits 30 s to bootstrap
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach Kafka at 127.0.0.1:" in lines[0]
    assert "within --timeout 1s" in lines[0]


def test_a_tls_handshake_nobody_answers_fails_within_the_timeout(tmp_path: Path) -> None:
    import socket

    _images(tmp_path / "imgs", 1)
    with socket.create_server(("127.0.0.1", 0)) as silent:  # the kernel accepts, nobody answers
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "worker", "produce", "--images", str(tmp_path / "imgs"),
             "--timeout", "1", "--bootstrap-servers", f"127.0.0.1:{silent.getsockname()[1]}"],
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "CARSTREAM_SECURITY_PROTOCOL": "SSL"},
        )  # fmt: skip
    assert time.monotonic() - started < 20  # kafka-python waits on that handshake for ever
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "within --timeout 1s: no answer to the SSL handshake" in lines[0]


@pytest.mark.integration
def test_produce_counts_oversized_lines_as_failed(kafka_bootstrap: str, tmp_path: Path) -> None:
    create_topics(kafka_bootstrap, ["produce-big"], 1)
    big = "x" * (17 * 1024 * 1024)  # over the producer's 16 MiB max_request_size
    path = tmp_path / "big.jsonl"
    path.write_text("\n".join(['{"post_id": "a"}', big, '{"post_id": "b"}', big]) + "\n")
    result = _produce(
        "--jsonl", str(path), "--topic", "produce-big", "--bootstrap-servers", kafka_bootstrap,
        "--json",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert (report["sent"], report["failed"], report["unconfirmed"]) == (2, 2, 0)
    assert report["failures"] == {"MessageSizeTooLargeError": 2}
    assert report["rate"] > 0 and report["error"] is None
    logged = result.stderr.strip().splitlines()
    assert len(logged) == 2 and all("MessageSizeTooLargeError" in line for line in logged)
    assert f"{path}: line 2: " in logged[0] and f"{path}: line 4: " in logged[1]  # each named
    assert len(_consume(kafka_bootstrap, "produce-big", 2)) == 2


def _wait_for_records(
    bootstrap: str, topic: str, timeout_s: float = 30.0, at_least: int = 1
) -> None:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        tp = TopicPartition(topic, 0)
        deadline = time.monotonic() + timeout_s
        while consumer.end_offsets([tp])[tp] < at_least:
            assert time.monotonic() < deadline, f"nothing reached {topic}"
            time.sleep(0.1)
    finally:
        consumer.close()


@pytest.mark.integration
def test_produce_stops_with_one_line_when_the_broker_goes_away(tmp_path: Path) -> None:
    broker = TansuBroker(tmp_path / "tansu", free_port())
    broker.start()
    try:
        create_topics(broker.bootstrap, ["gone"], 1)
        path = tmp_path / "e.jsonl"
        path.write_text("".join(json.dumps({"post_id": f"p{i}"}) + "\n" for i in range(40)))
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "produce", "--jsonl", str(path), "--topic", "gone",
             "--rate", "10", "--timeout", "2", "--json", "--bootstrap-servers", broker.bootstrap],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        # some acknowledged, most not sent yet: the first record's acknowledgement is in by the
        # time the third is written (one record was once written but not yet acknowledged when
        # the broker died, on a loaded CI machine)
        _wait_for_records(broker.bootstrap, "gone", at_least=3)
        os.kill(broker.pid(), signal.SIGKILL)  # gone at once (on SIGTERM Tansu drains clients)
    finally:
        broker.stop()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert "Traceback" not in err and "Exception ignored" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "is the broker up" in lines[0]
    report = json.loads(out)
    assert report["error"]
    assert 0 < report["sent"] < 40
    assert report["sent"] + report["failed"] + report["unconfirmed"] == 40


@pytest.mark.integration
def test_ctrl_c_mid_run_reports_the_counts_and_exits_130(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    create_topics(kafka_bootstrap, ["produce-ctrl-c"], 1)
    path = tmp_path / "e.jsonl"
    path.write_text("".join(json.dumps({"post_id": f"p{i}"}) + "\n" for i in range(40)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "produce", "--jsonl", str(path), "--topic",
         "produce-ctrl-c", "--rate", "10", "--json", "--bootstrap-servers", kafka_bootstrap],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_for_records(kafka_bootstrap, "produce-ctrl-c")  # mid-run: most not sent yet
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Exception ignored" not in err
    report = json.loads(out)
    assert report["error"] == "interrupted"
    assert 0 < report["sent"] < 40 and report["failed"] == 0
    lines = err.strip().splitlines()
    assert lines == [
        f"interrupted: stopped after sent={report['sent']} failed=0 "
        f"unconfirmed={report['unconfirmed']}"
    ]
    assert len(_consume(kafka_bootstrap, "produce-ctrl-c", report["sent"])) >= report["sent"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        # the worker's normalize_city drops these, so the post was counted without a city
        (["--city", "\u200b"], "--city '\\u200b': blank"),  # zero-width space
        (["--city", "\u202e"], "--city '\\u202e': blank"),  # bidi override
        (["--city", "\x1b"], "--city '\\x1b': blank"),  # a terminal escape
        (["--city", "\u00ad"], "--city '\\xad': blank"),  # soft hyphen
        (["--city", "Lyon", "--city", " \u200b\u2060 "], "--city ' \\u200b\\u2060 ': blank"),
        (["--platform", ""], "--platform '': blank"),  # docs: a blank platform is refused
        (["--platform", "   "], "--platform '   ': blank"),
    ],
)
def test_invisible_cities_and_blank_platforms_are_refused(args: list[str], needle: str) -> None:
    result = _produce("--images", ".", *args)
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


class _Recording(FakeProducer):
    def __init__(self) -> None:
        super().__init__(max_bytes=10**6)
        self.values: list[bytes] = []

    def send(self, topic: str, value: bytes, key: bytes | None = None) -> _Future:
        self.values.append(value)
        return super().send(topic, value, key)


def test_image_posts_are_dated_when_sent_not_when_built(monkeypatch, tmp_path: Path) -> None:
    from worker import produce

    clock = FakeClock()  # the rate limiter's clock, and the one posted_at is read from
    monkeypatch.setattr(produce, "rfc3339_now", lambda: f"t={clock():.1f}")
    messages = image_messages(_images(tmp_path / "imgs", 3), [], "p", None)
    first = next(messages)  # as main reads the first post before it connects
    clock.t += 30  # the producer takes a while to connect
    bucket = TokenBucket(rate=0.2, burst=1, clock=clock, sleep=clock.sleep)  # one post per 5 s
    producer = _Recording()
    report = send_all(producer, "t", iter([first, *messages]), bucket)
    assert report.sent == 3
    # each is dated after the bucket's wait: was 100.0 (before connecting), 130.0, 135.0
    posted = [json.loads(v)["posted_at"] for v in producer.values]
    assert posted == ["t=130.0", "t=135.0", "t=140.0"]


def test_jsonl_lines_keep_their_own_posted_at(monkeypatch, tmp_path: Path) -> None:
    from worker import produce

    monkeypatch.setattr(produce, "rfc3339_now", lambda: "stamped")
    line = b'{"post_id": "a", "posted_at": "2026-12-06T15:30:00Z", "image_url": "http://x"}'
    path = tmp_path / "e.jsonl"
    path.write_bytes(line + b"\n" + b'{"post_id": "b"}\n')
    producer = _Recording()
    send_all(producer, "t", jsonl_messages(path, None), TokenBucket(0))
    assert producer.values == [line, b'{"post_id": "b"}']  # as given, never stamped
