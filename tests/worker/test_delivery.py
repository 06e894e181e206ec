"""StreamWorker delivery and inference isolation, against fake producers and engines (no broker)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import numpy as np
import pytest
from kafka.errors import (
    ClusterAuthorizationFailedError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    ProducerFencedError,
    TopicAuthorizationFailedError,
)

from tests.support import DoneFuture, Rec, tiny_manifest
from training.preprocessing import PreprocessSpec
from worker.backoff import Backoff
from worker.dead_letter import dlq_headers, parse_dlq_headers
from worker.delivery import DLQ_KEY_PREFIX_BYTES, SEND_RETRY_LIMIT, producer_failure
from worker.engine_isolation import EngineFailedError, EngineFailureLog, infer_isolating
from worker.errors import FatalWorkerError, PostError
from worker.metrics import WorkerMetrics
from worker.outputs import Pending, Result, make_outputs, original_headers
from worker.pipeline import BatchAbortedError, StreamWorker
from worker.prepare import Prepared, prepare
from worker.schemas import PostEvent
from worker.settings import WorkerSettings
from worker.url_fetch import UrlPolicy

LIMIT = 1024 * 1024  # Apache Kafka's default max.message.bytes


class _Future(Future):
    def get(self, timeout=None):
        return self.result(timeout)


class BrokerLikeProducer:
    """Acknowledges records up to ``limit`` bytes (key + value + headers), refuses larger ones."""

    def __init__(self, limit: int = LIMIT, fail_first: int = 0) -> None:
        self.limit = limit
        self.fail_first = fail_first  # the first sends time out (a broker hiccup)
        self.sends: list[tuple[str, bytes | None, bytes | None, list]] = []
        self.delivered: list[tuple[str, bytes | None, bytes | None, list]] = []

    def send(self, topic, key=None, value=None, headers=None):
        # what kafka-python's KafkaProducer.send refuses before any I/O
        if key is None and value is None:
            raise ValueError("Need at least one: key or value")
        if not isinstance(headers or [], list):
            raise TypeError("headers must be list-type")
        if not all(
            isinstance(h, tuple)
            and len(h) == 2
            and isinstance(h[0], str)
            and isinstance(h[1], bytes)
            for h in headers or []
        ):
            raise TypeError("All headers items must be (str, bytes) tuples")
        for part in (key, value):
            if type(part) not in (bytes, bytearray, memoryview, type(None)):
                raise TypeError(f"Unsupported type for serialized key: {type(part)}")
        for name, _ in headers or []:
            name.encode("utf-8")  # kafka-python sizes the record: a lone surrogate raises
        record = (topic, key, value, list(headers or []))
        self.sends.append(record)
        future = _Future()
        size = len(key or b"") + len(value or b"")
        size += sum(len(k) + len(v or b"") for k, v in headers or [])
        if len(self.sends) <= self.fail_first:
            future.set_exception(KafkaTimeoutError("no answer"))
        elif size > self.limit:
            future.set_exception(MessageSizeTooLargeError("record too large"))
        else:
            self.delivered.append(record)
            future.set_result(None)
        return future

    def flush(self, timeout=None):
        pass


def worker_with(producer, **settings) -> StreamWorker:
    """A StreamWorker with only what _deliver and _infer touch."""
    worker = object.__new__(StreamWorker)
    worker.settings = WorkerSettings(metrics_port=0, **settings)
    worker.producer = producer
    worker.new_producer = None
    worker.metrics = WorkerMetrics()
    worker.backoff = Backoff(0.001, 0.005)
    worker.stop = threading.Event()
    worker.gpu_device = None
    worker._lane = threading.local()  # no inference thread: _infer uses worker.engine
    worker._loop_thread = None  # no loop: the retries do not refresh the lag gauge
    worker._committed = {}
    worker._engine_failures = EngineFailureLog()
    worker._failed = threading.Event()
    return worker


def deliver_within(worker: StreamWorker, results: list, dead: list, seconds: float = 10) -> None:
    """Run _deliver in a thread; fail (instead of hanging the suite) if it does not return."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            worker._deliver(results, dead)
        except BaseException as exc:  # re-raised below, in the test thread
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        worker.stop.set()
        pytest.fail(
            f"_deliver still retrying after {seconds} s ({len(worker.producer.sends)} sends)"
        )
    if errors:
        raise errors[0]


def _dead(key: bytes | None, value: bytes | None, offset: int = 7):
    return (key, value, dlq_headers(PostError("invalid_json", "x"), "car-posts", 0, offset, "w"))


# --- oversized dead letters -----------------------------------------------------------------


def test_a_key_too_large_for_the_dlq_is_cut_short_and_the_partition_moves_on():
    producer = BrokerLikeProducer()
    worker = worker_with(producer)
    key = b"k" * (2 * LIMIT)  # a hostile producer: 2 MiB key, tiny invalid value
    deliver_within(worker, [], [_dead(key, b"not json")])

    assert len(producer.delivered) == 1
    topic, sent_key, value, headers = producer.delivered[0]
    assert topic == "car-posts.dlq" and value == b""
    assert sent_key == key[:DLQ_KEY_PREFIX_BYTES]
    parsed = parse_dlq_headers(headers)
    assert parsed["original_size"] == "8" and parsed["value_omitted"]
    assert parsed["original_key_size"] == str(len(key)) and parsed["key_truncated"]
    assert parsed["error_kind"] == "invalid_json" and parsed["source_offset"] == "7"
    assert worker.metrics.retries.labels("kafka")._value.get() == 0  # size errors: no backoff


def test_original_headers_too_large_for_the_dlq_are_dropped_after_the_value():
    producer = BrokerLikeProducer()
    worker = worker_with(producer)
    key, value, ours = _dead(b"post-1", b"v" * 10)
    headers = [("trace", b"t" * (2 * LIMIT)), *ours]
    deliver_within(worker, [], [(key, value, headers)])
    (_, sent_key, sent_value, sent_headers) = producer.delivered[0]
    assert sent_key == b"post-1" and sent_value == b""
    assert "trace" not in dict(sent_headers)
    parsed = parse_dlq_headers(sent_headers)
    assert parsed["headers_omitted"] == "1" and "key_truncated" not in parsed
    assert parsed["error_kind"] == "invalid_json"


def test_a_value_too_large_for_the_dlq_keeps_its_key():
    producer = BrokerLikeProducer()
    worker = worker_with(producer)
    key, value, ours = _dead(b"post-1", b"v" * (2 * LIMIT))
    deliver_within(worker, [], [(key, value, [("trace", b"abc"), *ours])])
    (_, key, value, headers) = producer.delivered[0]
    assert key == b"post-1" and value == b""
    assert ("trace", b"abc") in headers  # the original headers go as long as they fit
    assert "key_truncated" not in parse_dlq_headers(headers)


def test_a_dead_letter_the_dlq_refuses_at_any_size_is_dropped_not_retried_for_ever(caplog):
    producer = BrokerLikeProducer(limit=100)  # smaller than the DLQ headers alone
    worker = worker_with(producer)
    good = _dead(b"p2", b"{}", offset=8)
    deliver_within(worker, [], [_dead(b"k" * 5000, b"not json"), good])
    assert producer.delivered == []
    assert len(producer.sends) <= 5  # dead letter 1: 3 tries, dead letter 2: 2 tries
    assert "car-posts/0@7 is too large" in caplog.text and "dropped" in caplog.text
    # counted apart: carstream_dead_letters counts what the DLQ holds
    assert _counts(worker.metrics.dead_letters_dropped) == {"invalid_json": 2.0}
    assert _counts(worker.metrics.dead_letters) == {}


def test_a_keyless_dead_letter_too_large_for_the_dlq_is_sent_without_its_value():
    producer = BrokerLikeProducer()
    worker = worker_with(producer)
    deliver_within(worker, [], [_dead(None, b"x" * (2 * LIMIT))])
    ((_, key, value, headers),) = producer.delivered
    assert key is None and value == b""
    assert parse_dlq_headers(headers)["original_size"] == str(2 * LIMIT)


def test_a_null_header_value_of_the_input_record_does_not_stop_the_worker():
    record = Rec("car-posts", 0, 3, b"p1", b"not json", headers=[("trace", None), ("a", b"1")])
    assert original_headers(record) == [("trace", b""), ("a", b"1")]
    producer = BrokerLikeProducer()
    worker = worker_with(producer)
    key, value, ours = _dead(b"p1", b"not json")
    deliver_within(worker, [], [(key, value, [*original_headers(record), *ours])])
    assert len(producer.delivered) == 1


def test_a_dead_letter_the_producer_refuses_for_a_header_is_sent_without_it(caplog):
    producer = BrokerLikeProducer()
    worker = worker_with(producer)
    key, value, ours = _dead(b"p1", b"not json")
    # as if built without original_headers: a null value, a name that is not UTF-8, not a pair
    bad = [("trace", None), ("\udcff", b"1"), ("x",), ("kept", b"2")]
    deliver_within(worker, [Result(b"p2", b"{}", "ok")], [(key, value, [*bad, *ours])])
    assert sorted(r[0] for r in producer.delivered) == ["car-posts.dlq", "car-predictions"]
    ((_, sent_key, sent_value, headers),) = [r for r in producer.delivered if r[0].endswith("dlq")]
    assert (sent_key, sent_value) == (b"p1", b"not json")  # the original bytes still go
    assert ("kept", b"2") in headers and all(k != "trace" for k, _ in headers)
    parsed = parse_dlq_headers(headers)
    assert parsed["error_kind"] == "invalid_json" and parsed["source_offset"] == "7"
    assert "3 header(s)" in parsed["send_refused"] and "TypeError" in parsed["send_refused"]
    assert "cannot be sent as it is" in caplog.text
    assert _counts(worker.metrics.dead_letters) == {"invalid_json": 1.0}
    assert _counts(worker.metrics.dead_letters_dropped) == {}
    assert worker.metrics.retries.labels("kafka")._value.get() == 0  # not a broker failure


def test_a_dead_letter_whose_key_and_value_are_not_bytes_still_reaches_the_dlq():
    producer = BrokerLikeProducer()
    worker = worker_with(producer)
    _, _, ours = _dead(None, None)
    deliver_within(worker, [], [("p1", {"not": "bytes"}, ours)])
    ((_, key, value, headers),) = producer.delivered
    assert key is None and value == b""
    refused = parse_dlq_headers(headers)["send_refused"]
    assert "key of type str" in refused and "value of type dict" in refused
    assert _counts(worker.metrics.dead_letters) == {"invalid_json": 1.0}


def test_a_result_the_producer_refuses_for_what_it_is_is_still_fatal():
    worker = worker_with(BrokerLikeProducer())
    with pytest.raises(FatalWorkerError, match="key of type str"):
        deliver_within(worker, [Result("p1", b"{}", "ok")], [])


class RacingProducer(BrokerLikeProducer):
    """Raises ``error`` from send for the first ``times`` sends, as kafka-python's does when a
    metadata refresh drops the topic (or its partitions) between its metadata check and its
    partitioner; delivers afterwards."""

    def __init__(self, error: Exception, times: int = 1) -> None:
        super().__init__()
        self.error, self.times, self.raised = error, times, 0

    def send(self, topic, key=None, value=None, headers=None):
        if self.raised < self.times:
            self.raised += 1
            raise self.error
        return super().send(topic, key=key, value=value, headers=headers)


# what KafkaProducer.send (kafka-python 3.0.12) raises for a record it would take, when the
# topic's metadata changes under it: kafka.py send (the partitioner assigns no partition),
# DefaultPartitioner.partition (topic gone; sorted(None); no partitions: % 0, choice([]))
METADATA_RACES = [
    ValueError("Partitioner did not assign a partition for topic car-posts.dlq!"),
    ValueError("Topic car-posts.dlq not found in ClusterMetadata"),
    TypeError("'NoneType' object is not iterable"),
    ZeroDivisionError("integer modulo by zero"),
    IndexError("Cannot choose from an empty sequence"),
]


@pytest.mark.parametrize("error", METADATA_RACES, ids=lambda e: type(e).__name__ + str(e)[:12])
def test_a_dead_letter_send_error_of_a_metadata_change_is_retried_not_dropped(error):
    producer = RacingProducer(error)
    worker = worker_with(producer)
    deliver_within(worker, [], [_dead(b"p1", b"not json")])
    ((topic, key, value, headers),) = producer.delivered
    assert (topic, key, value) == ("car-posts.dlq", b"p1", b"not json")
    assert "send_refused" not in parse_dlq_headers(headers)
    assert _counts(worker.metrics.dead_letters) == {"invalid_json": 1.0}
    assert _counts(worker.metrics.dead_letters_dropped) == {}
    assert worker.metrics.retries.labels("kafka")._value.get() == 1


@pytest.mark.parametrize("error", METADATA_RACES, ids=lambda e: type(e).__name__ + str(e)[:12])
def test_a_result_send_error_of_a_metadata_change_is_retried_not_fatal(error):
    producer = RacingProducer(error, times=2)
    worker = worker_with(producer)
    deliver_within(worker, [Result(b"p1", b"{}", "ok")], [])
    assert [r[:3] for r in producer.delivered] == [("car-predictions", b"p1", b"{}")]
    assert worker.metrics.retries.labels("kafka")._value.get() == 2


def test_a_dead_letter_not_sent_by_shutdown_leaves_the_batch_uncommitted_not_dropped():
    producer = RacingProducer(ValueError("Partitioner did not assign a partition"), times=99)
    worker = worker_with(producer)
    worker.stop.set()  # draining at SIGTERM: one round, then the batch is left uncommitted
    with pytest.raises(BatchAbortedError, match="Partitioner did not assign"):
        deliver_within(worker, [], [_dead(b"p1", b"not json")])
    assert producer.raised == 1 and producer.delivered == []
    assert _counts(worker.metrics.dead_letters_dropped) == {}


def test_outgoing_refused_mirrors_what_kafka_python_send_refuses():
    """Outgoing.refused against a real KafkaProducer (no broker: a record it takes gets as far
    as the metadata wait and times out there); each repaired form gets that far too."""
    from kafka import KafkaProducer
    from kafka.errors import KafkaTimeoutError

    from worker.delivery import SEND_REFUSALS, Outgoing

    producer = KafkaProducer(
        bootstrap_servers="127.0.0.1:9", api_version=(2, 5), max_block_ms=10, acks="all"
    )
    ours = _dead(None, None)[2]
    refused = [
        Outgoing("t", None, None, ours),
        Outgoing("t", b"k", b"v", [("trace", None), *ours]),
        Outgoing("t", b"k", b"v", [("trace",), *ours]),
        Outgoing("t", b"k", b"v", [(b"trace", b"1"), *ours]),
        Outgoing("t", b"k", b"v", [["trace", b"1"], *ours]),
        Outgoing("t", b"k", b"v", tuple(ours)),
        Outgoing("t", "k", b"v", ours),
        Outgoing("t", b"k", "v", ours),
        Outgoing("t", None, 5, ours),
    ]
    taken = [
        Outgoing("t", b"k", b"v", ours),
        Outgoing("t", None, b"", None),
        Outgoing("t", b"k", None, []),
        Outgoing("t", bytearray(b"k"), memoryview(b"v"), [("", b"")]),
    ]
    try:
        for msg in refused:
            with pytest.raises(SEND_REFUSALS):
                producer.send(msg.topic, key=msg.key, value=msg.value, headers=msg.headers)
            assert msg.refused(), msg
            taken.append(msg.sendable(ValueError("x")))
        for msg in taken:
            assert msg.refused() == [] and msg.sendable(ValueError("x")) is None, msg
            with pytest.raises(KafkaTimeoutError):
                producer.send(msg.topic, key=msg.key, value=msg.value, headers=msg.headers)
    finally:
        producer.close(timeout=1)


def _counts(counter) -> dict[str, float]:
    """A labelled Counter's nonzero totals by its one label (each known label value is
    exported at 0 from the start)."""
    return {
        next(iter(s.labels.values())): s.value
        for s in counter.collect()[0].samples
        if s.name.endswith("_total") and s.value
    }


def test_a_result_too_large_for_the_results_topic_is_fatal_not_retried_for_ever():
    producer = BrokerLikeProducer(limit=10)
    worker = worker_with(producer)
    with pytest.raises(FatalWorkerError, match="car-predictions"):
        deliver_within(worker, [Result(b"p1", b'{"status": "ok"}', "ok")], [])
    assert len(producer.sends) == 1


def test_other_send_errors_are_still_retried():
    producer = BrokerLikeProducer(fail_first=2)
    worker = worker_with(producer)
    deliver_within(worker, [Result(b"p1", b"{}", "ok")], [_dead(b"b1", b"x")])
    assert {r[0] for r in producer.delivered} == {"car-predictions", "car-posts.dlq"}
    assert worker.metrics.retries.labels("kafka")._value.get() == 1


class RefusingProducer(BrokerLikeProducer):
    """Fails every send with ``error``: an ACL the broker enforces, or an idempotence state
    kafka-python's producer never leaves."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    def send(self, topic, key=None, value=None, headers=None):
        self.sends.append((topic, key, value, list(headers or [])))
        future = _Future()
        future.set_exception(self.error)
        return future


@pytest.mark.parametrize(
    "error",
    [
        TopicAuthorizationFailedError("car-predictions"),
        ClusterAuthorizationFailedError("IDEMPOTENT_WRITE"),
        ProducerFencedError("fenced"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_producer_the_broker_refuses_for_good_stops_the_worker_not_retried_for_ever(error):
    """A few rounds first: an authorization error from send's metadata wait can pass while ACLs
    or topics catch up with a deploy."""
    worker = worker_with(RefusingProducer(error))
    with pytest.raises(FatalWorkerError, match=type(error).__name__):
        deliver_within(worker, [Result(b"p1", b"{}", "ok")], [_dead(b"b1", b"x")])
    assert worker.metrics.retries.labels("kafka")._value.get() == SEND_RETRY_LIMIT


def test_a_send_error_refused_cannot_explain_stops_the_worker_once_it_persists():
    """A metadata race clears after one refresh; a ValueError that stays (a deleted topic, a bug)
    must not keep the worker retrying behind a green probe, nor drop the dead letter."""

    class RaisingProducer(BrokerLikeProducer):  # raised by send itself, as kafka-python does
        def send(self, topic, key=None, value=None, headers=None):
            self.sends.append((topic, key, value, list(headers or [])))
            raise ValueError("Partitioner did not assign a partition")

    worker = worker_with(RaisingProducer())
    with pytest.raises(FatalWorkerError, match="still fail after"):
        deliver_within(worker, [], [_dead(b"b1", b"x")])
    assert _counts(worker.metrics.dead_letters_dropped) == {}


class _FatalState:
    """kafka-python 3.0's TransactionManager, as far as producer_failure reads it."""

    def __init__(self) -> None:
        self.last_error: Exception | None = None

    def has_fatal_error(self) -> bool:
        return self.last_error is not None


class FailingForGoodProducer(BrokerLikeProducer):
    """An idempotent producer the broker refuses one record of: from then on kafka-python fails
    every record with that record's error (sender._maybe_abort_batches), so each future reads
    'too large' whatever its size."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit=limit)
        self._transaction_manager = _FatalState()
        self.closed = False

    def close(self, timeout=None) -> None:
        self.closed = True

    def send(self, topic, key=None, value=None, headers=None):
        if self._transaction_manager.has_fatal_error():
            self.sends.append((topic, key, value, list(headers or [])))
            future = _Future()
            future.set_exception(self._transaction_manager.last_error)
            return future
        future = super().send(topic, key=key, value=value, headers=headers)
        if future.exception() is not None:
            self._transaction_manager.last_error = future.exception()
        return future


def test_a_producer_failed_for_good_stops_the_worker_before_any_record_is_cut_or_dropped():
    """The broker's size refusal of one dead letter used to read as every record being too large:
    the other dead letters were cut down until dropped (and their batch committed)."""
    producer = FailingForGoodProducer(limit=60)
    worker = worker_with(producer)
    dead = [_dead(b"big", b"x" * 100), _dead(b"small", b"y", offset=8)]
    with pytest.raises(FatalWorkerError, match=r"failed for good.*max\.message\.bytes"):
        deliver_within(worker, [Result(b"p1", b"{}", "ok")], dead)
    assert len(producer.sends) == 3  # one round, nothing resent smaller
    assert _counts(worker.metrics.dead_letters_dropped) == {}


def test_a_producer_failed_for_good_is_replaced_and_only_the_refused_dead_letter_cut_down():
    """With a way to make a new producer the worker goes on: it resends the round one record at
    a time on a new producer, so the dead letter the broker refused is the one cut down, and the
    result and the other dead letter go as they are."""
    made: list[FailingForGoodProducer] = []

    def new_producer() -> FailingForGoodProducer:
        made.append(FailingForGoodProducer(limit=2000))
        return made[-1]

    first = new_producer()
    worker = worker_with(first)
    worker.new_producer = new_producer
    dead = [_dead(b"big", b"x" * 10_000), _dead(b"small", b"y", offset=8)]
    deliver_within(worker, [Result(b"p1", b"{}", "ok")], dead)
    delivered = [d for p in made for d in p.delivered]
    by_key = {key: (topic, value, dict(headers)) for topic, key, value, headers in delivered}
    assert sorted(by_key) == [b"big", b"p1", b"small"]
    assert by_key[b"p1"][:2] == ("car-predictions", b"{}")
    assert by_key[b"small"][1] == b"y"
    assert by_key[b"big"][1] == b"" and "carstream.value_omitted" in by_key[b"big"][2]
    assert len(made) == 3 and all(p.closed for p in made[:2])  # one renewal a refusal
    assert worker.producer is made[-1] and not made[-1].closed
    assert _counts(worker.metrics.dead_letters_dropped) == {}
    assert _counts(worker.metrics.dead_letters) == {"invalid_json": 2}


def test_producer_failure_reads_kafka_pythons_fatal_state():
    from kafka import KafkaProducer

    producer = KafkaProducer(
        bootstrap_servers="127.0.0.1:1", enable_idempotence=True, api_version=(3, 0)
    )
    try:
        assert producer_failure(producer) is None
        refused = MessageSizeTooLargeError("broker")
        producer._transaction_manager.transition_to_fatal_error(refused)
        assert producer_failure(producer) is refused
    finally:
        producer.close(timeout=0)
    assert producer_failure(BrokerLikeProducer()) is None


def test_the_input_size_limit_counts_the_key_too():
    raw = b'{"post_id": "p"}'
    spec, policy = PreprocessSpec(), UrlPolicy()
    limit = 2048
    big_key = b"k" * (limit - len(raw) + 1)
    prep = prepare(raw, spec, policy, limit, key=big_key)
    assert prep.error is not None and prep.error.kind == "too_large"
    assert f"key {len(big_key)}" in prep.error.reason
    fits = prepare(raw, spec, policy, limit, key=big_key[:-1])
    assert fits.error is not None and fits.error.kind == "schema"  # checked further


# --- results metrics ------------------------------------------------------------------------


def test_the_results_metric_uses_the_status_not_a_search_of_the_json():
    """A confident post whose post_id and city are "low_confidence" is counted as ok."""
    manifest = tiny_manifest()
    event = PostEvent(
        post_id="low_confidence",
        image_b64="x",
        posted_at="2026-01-01T00:00:00Z",
        city="low_confidence",
    )
    batch = [Pending(Rec("car-posts", 0, 0, b"low_confidence", b"{}"), 0.0, DoneFuture())]
    prepared = [Prepared(event, np.zeros(1, np.float32), None, 0.0)]
    logits = {0: np.array([10.0, 0.0], np.float32)}  # confident
    producer = BrokerLikeProducer()
    worker = worker_with(producer)
    results, dead, _ = make_outputs(batch, prepared, logits, manifest, worker.settings)
    assert [r.status for r in results] == ["ok"] and b'"low_confidence"' in results[0].value
    deliver_within(worker, results, dead)
    assert worker.metrics.results.labels("ok")._value.get() == 1
    assert worker.metrics.results.labels("low_confidence")._value.get() == 0


# --- engine failures ------------------------------------------------------------------------


class FakeEngine:
    """Runs rows of one float each: fails on a batch of more than one when ``batch_fails``, on
    rows equal to a ``poison`` value, and on everything (blank rows too) when ``dead``."""

    max_batch = 4

    def __init__(self, batch_fails=True, poison=(), dead=False) -> None:
        self.batch_fails, self.poison, self.dead = batch_fails, set(poison), dead
        self.calls: list[int] = []

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self.calls.append(len(batch))
        if self.dead:
            raise RuntimeError("CUDA error: out of memory")
        if len(batch) > 1 and self.batch_fails:
            raise RuntimeError("batch failed")
        if any(float(row[0]) in self.poison for row in batch):
            raise RuntimeError("poison")
        return np.stack([np.array([float(row[0]), 0.0], np.float32) for row in batch])


def _rows(n: int) -> dict[int, np.ndarray]:
    return {i: np.array([float(i + 1)], np.float32) for i in range(n)}


def test_a_poison_row_is_isolated_and_the_others_are_classified():
    engine = FakeEngine(poison={2.0})
    out, failed = infer_isolating(engine.infer, _rows(6), 4, np.stack, np.zeros_like)
    assert sorted(out) == [0, 2, 3, 4, 5] and list(failed) == [1]
    assert "poison" in failed[1]


def test_an_engine_that_runs_nothing_raises_instead_of_dead_lettering_good_posts():
    engine = FakeEngine(dead=True)
    with pytest.raises(EngineFailedError, match=r"all 4 posts .* blank input .*out of memory"):
        infer_isolating(engine.infer, _rows(6), 4, np.stack, np.zeros_like)
    assert engine.calls == [4, 1, 1, 1, 1, 1]  # the chunk, each row alone, the blank probe


def test_rows_that_all_fail_on_a_healthy_engine_are_poison_and_dead_lettered():
    # one post alone in its batch that the engine refuses: not a reason to stop the worker
    engine = FakeEngine(poison={1.0})
    out, failed = infer_isolating(engine.infer, _rows(1), 4, np.stack, np.zeros_like)
    assert out == {} and list(failed) == [0]


class _Recorder:
    def __init__(self) -> None:
        self.calls: list = []

    def commit(self, offsets=None, timeout_ms=None):
        self.calls.append(offsets)

    def apply(self, records):
        self.calls.append(records)


def test_a_batch_on_an_unhealthy_engine_is_neither_published_counted_nor_committed():
    producer = BrokerLikeProducer()
    worker = worker_with(producer)
    worker.engine = FakeEngine(dead=True)
    worker.manifest = tiny_manifest()
    worker.consumer, worker.trends = _Recorder(), _Recorder()
    event = PostEvent(post_id="p", image_b64="x", posted_at="2026-01-01T00:00:00Z")
    batch = [
        Pending(
            Rec("car-posts", 0, off, b"p", b"{}"),
            0.0,
            DoneFuture(Prepared(event, np.ones(1, np.float32), None, 0.0)),
        )
        for off in range(3)
    ]
    with pytest.raises(EngineFailedError):
        worker.process(batch, {})
    assert producer.sends == [] and worker.trends.calls == [] and worker.consumer.calls == []


@pytest.mark.integration
def test_a_fatal_loop_error_is_logged_and_exits_1(
    kafka_bootstrap, redis_url, worker_bundle_dir, monkeypatch, caplog
):
    from worker import pipeline
    from worker.run import _serve

    def fail(self) -> None:
        raise EngineFailedError("the engine failed on everything")

    monkeypatch.setattr(pipeline.StreamWorker, "run", fail)
    settings = WorkerSettings(
        bundle=str(worker_bundle_dir),
        backend="onnxruntime",
        bootstrap_servers=kafka_bootstrap,
        redis_url=redis_url,  # checked at start, before the loop
        metrics_port=0,
    )
    assert _serve(settings, threading.Event(), WorkerMetrics(), None) == 1
    assert "stopping: the engine failed on everything" in caplog.text


def test_a_keyless_tombstone_reaches_the_dlq():
    """A record with neither key nor value is a bad post like any other; kafka-python sends no
    record without both, so its dead letter carries an empty value, and a header that tells it
    from a producer's empty value (which keeps none)."""
    batch = [
        Pending(Rec("car-posts", 0, 4, None, None), 0.0, DoneFuture()),
        Pending(Rec("car-posts", 0, 5, None, b""), 0.0, DoneFuture()),
    ]
    prepared = [Prepared(None, None, PostError("invalid_json", "empty"), 0.0)] * 2
    producer = BrokerLikeProducer()
    worker = worker_with(producer)
    manifest = tiny_manifest([{"make": "Audi", "model": "A4"}])
    _, dead, _ = make_outputs(batch, prepared, {}, manifest, worker.settings)
    deliver_within(worker, [], dead)
    (_, key, value, headers), (_, _, empty, empty_headers) = producer.delivered
    assert key is None and value == b"" == empty
    assert parse_dlq_headers(headers)["source_offset"] == "4"
    assert parse_dlq_headers(headers)["value_null"] == "1"
    assert "value_null" not in parse_dlq_headers(empty_headers)


class _CommitRefuses:
    """A consumer whose commit raises each error of ``errors`` in turn, then succeeds."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.tries = 0

    def commit(self, offsets=None, timeout_ms=None):
        self.tries += 1
        if self.errors:
            raise self.errors.pop(0)


def _offsets():
    from kafka import TopicPartition
    from kafka.structs import OffsetAndMetadata

    return {TopicPartition("car-posts", 0): OffsetAndMetadata(5, "", -1)}


def test_a_commit_refused_during_a_rebalance_is_not_retried(caplog):
    # kafka-python 3 raises RebalanceInProgressError while a join is pending, and only a poll()
    # can finish the join: retrying it stalled the loop ~6 s per batch, past session timeouts
    from kafka.errors import CommitFailedError, RebalanceInProgressError

    for error in (RebalanceInProgressError("joining"), CommitFailedError("kicked out")):
        worker = worker_with(BrokerLikeProducer())
        worker.consumer = _CommitRefuses(error, error, error)
        worker._commit(_offsets())
        assert worker.consumer.tries == 1
    assert "commit refused during a rebalance" in caplog.text


def test_a_failing_commit_is_retried_and_gives_up_sooner_once_stopping():
    from kafka.errors import KafkaTimeoutError

    worker = worker_with(BrokerLikeProducer())
    worker.consumer = _CommitRefuses(KafkaTimeoutError("1"), KafkaTimeoutError("2"))
    worker._commit(_offsets())
    assert worker.consumer.tries == 3  # two failures, then committed

    worker.stop.set()  # draining at SIGTERM: no backoff waits, and 3 tries, not 5
    worker.consumer = _CommitRefuses(*(KafkaTimeoutError(str(i)) for i in range(9)))
    worker._commit(_offsets())
    assert worker.consumer.tries == 3


class _SilentBroker:
    """A producer and a consumer whose broker does not answer: each wait runs its whole timeout
    (kafka-python's flush and future.get raise KafkaTimeoutError then; commit too)."""

    def __init__(self) -> None:
        self.sends: list = []
        self.commit_timeouts: list = []
        self.gone = threading.Event()  # never set

    def send(self, topic, key=None, value=None, headers=None):
        self.sends.append(topic)
        return self

    @property
    def is_done(self) -> bool:
        return False

    def get(self, timeout=None):
        self.gone.wait(timeout)
        raise KafkaTimeoutError(f"Timeout after waiting for {timeout} secs.")

    def flush(self, timeout=None):
        self.get(timeout)

    def commit(self, offsets=None, timeout_ms=None):
        self.commit_timeouts.append(timeout_ms)
        self.gone.wait(30 if timeout_ms is None else timeout_ms / 1000)
        raise KafkaTimeoutError("commit timed out")


def test_once_stopping_a_silent_broker_gets_the_drain_deadline_not_kafkas_timeouts(monkeypatch):
    """SIGTERM during a broker outage: the flush, the acknowledgements and the commit wait only
    what is left of DRAIN_DEADLINE_S, and a failed round is not retried, so the worker leaves
    the batch uncommitted well inside the grace period (it waited 30 s per flush and per
    acknowledgement, and 3 rounds, then 30 s per commit try)."""
    import time

    from worker import pipeline

    monkeypatch.setattr(pipeline, "DRAIN_DEADLINE_S", 1.0)
    broker = _SilentBroker()
    worker = worker_with(broker, dedup_ttl_s=0)
    worker.backoff = Backoff(0.2, 10.0)
    worker.consumer = broker
    results = [Result(b"p1", b"{}", "ok"), Result(b"p2", b"{}", "ok")]
    threading.Timer(0.3, worker.stop.set).start()  # SIGTERM while the flush waits
    started = time.monotonic()
    with pytest.raises(BatchAbortedError, match="results not delivered"):
        deliver_within(worker, results, [], seconds=8)
    assert time.monotonic() - started < 3.0
    assert len(broker.sends) == 2  # one round: not sent again once stopping

    started = time.monotonic()
    worker._commit(_offsets())  # past the deadline: one short try
    assert time.monotonic() - started < 3.0
    assert broker.commit_timeouts == [pipeline.STOP_COMMIT_MIN_MS]


class _SlowBroker(_SilentBroker):
    """A healthy broker that acknowledges ``delay_s`` after each send, and answers commits."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.committed: list = []

    def send(self, topic, key=None, value=None, headers=None):
        self.sends.append(topic)
        self.acked_at = time.monotonic() + self.delay_s
        return self

    @property
    def is_done(self) -> bool:
        return time.monotonic() >= self.acked_at

    def get(self, timeout=None):
        wait = self.acked_at - time.monotonic()
        if wait > timeout:
            time.sleep(timeout)
            raise KafkaTimeoutError(f"Timeout after waiting for {timeout} secs.")
        time.sleep(max(0.0, wait))

    def commit(self, offsets=None, timeout_ms=None):
        self.committed.append(offsets)


def test_a_batch_finished_at_the_drain_deadline_is_still_delivered_and_committed(monkeypatch):
    """A batch whose decode outlasted the drain (a slow URL, a long decode) on a healthy broker:
    flush(timeout=0) failed whatever the broker, so the batch was left uncommitted although its
    results were sent, and published a second time after the restart."""
    from worker import pipeline

    monkeypatch.setattr(pipeline, "DRAIN_DEADLINE_S", 0.0)
    broker = _SlowBroker(delay_s=0.3)  # answers in 0.3 s: well inside STOP_SEND_MIN_S
    worker = worker_with(broker, dedup_ttl_s=0)
    worker.consumer = broker
    worker.stop.set()
    assert worker._drain_left() == 0.0  # the deadline has passed
    deliver_within(worker, [Result(b"p1", b"{}", "ok")], [], seconds=8)
    assert len(broker.sends) == 1
    worker._commit(_offsets())
    assert len(broker.committed) == 1


def test_an_expired_record_is_not_waited_on_slice_after_slice(monkeypatch):
    """kafka-python fails a record that expired in its buffer with KafkaTimeoutError, the same
    error a wait that ran out raises: a done future is not waited on again."""
    import time

    from worker import pipeline

    monkeypatch.setattr(pipeline, "WAIT_SLICE_S", 0.5)
    producer = BrokerLikeProducer(fail_first=1)  # its future fails at once, with that error
    worker = worker_with(producer)
    started = time.monotonic()
    deliver_within(worker, [Result(b"p1", b"{}", "ok")], [], seconds=8)
    assert time.monotonic() - started < 2.0
    assert len(producer.sends) == 2 and len(producer.delivered) == 1


def test_backoff_survives_an_outage_of_any_length():
    # 0.2 * 2**1024 is past a float: an outage of ~3 hours made the retry loop raise
    stop = threading.Event()
    stop.set()
    assert Backoff(0.2, 10.0).wait(5000, stop) is False  # no OverflowError, and stop is seen


@pytest.mark.integration
def test_send_refusals_against_the_real_broker_lose_no_dead_letter_and_stop_no_result(
    kafka_bootstrap, monkeypatch
):
    """A real KafkaProducer on Tansu: a metadata change under send (the topic gone from the
    client's metadata when the partitioner looks, for the first result and the first dead
    letter) is retried, and dead letters the producer refuses for a header still reach the DLQ
    with their bytes."""
    import sys
    import uuid

    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    from worker.stack import create_topics

    tag = uuid.uuid4().hex[:8]
    out, dlq = f"preds-{tag}", f"posts-{tag}.dlq"
    create_topics(kafka_bootstrap, [out, dlq], 1)
    producer = KafkaProducer(
        bootstrap_servers=kafka_bootstrap, acks="all", enable_idempotence=True, linger_ms=5
    )
    metadata = producer._metadata
    real_topics = metadata.topics
    hidden: list[str] = []

    def topics(*args, **kwargs):
        known = real_topics(*args, **kwargs)
        caller = sys._getframe(1).f_code.co_name
        if caller == "_partition" and len(hidden) < 2:  # KafkaProducer._partition: no partition
            hidden.append(caller)
            return set()
        return known

    monkeypatch.setattr(metadata, "topics", topics)
    worker = worker_with(
        producer, output_topic=out, dlq_topic=dlq, bootstrap_servers=kafka_bootstrap
    )
    good = _dead(b"p1", b"not json", offset=1)
    null_header = (b"p2", b"{bad", [("trace", None), *_dead(None, None, offset=2)[2]])
    surrogate = (b"p3", b"\xff", [("\udcff", b"x"), *_dead(None, None, offset=3)[2]])
    try:
        deliver_within(
            worker, [Result(b"p0", b"{}", "ok")], [good, null_header, surrogate], seconds=60
        )
    finally:
        producer.close(timeout=5)
    assert len(hidden) == 2
    assert worker.metrics.retries.labels("kafka")._value.get() == 1
    assert _counts(worker.metrics.dead_letters) == {"invalid_json": 3.0}
    assert _counts(worker.metrics.dead_letters_dropped) == {}

    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, consumer_timeout_ms=2000)
    try:
        consumer.assign([TopicPartition(out, 0), TopicPartition(dlq, 0)])
        consumer.seek_to_beginning()
        records = list(consumer)
    finally:
        consumer.close()
    assert [(r.key, r.value) for r in records if r.topic == out] == [(b"p0", b"{}")]
    letters = {r.key: r for r in records if r.topic == dlq}
    assert {k: r.value for k, r in letters.items()} == {
        b"p1": b"not json",
        b"p2": b"{bad",
        b"p3": b"\xff",
    }
    parsed = {k: parse_dlq_headers(r.headers) for k, r in letters.items()}
    assert "send_refused" not in parsed[b"p1"]
    assert "TypeError" in parsed[b"p2"]["send_refused"]
    assert "UnicodeEncodeError" in parsed[b"p3"]["send_refused"]
    assert sorted(p["source_offset"] for p in parsed.values()) == ["1", "2", "3"]


def test_at_stop_each_partitions_records_from_its_first_undecoded_one_are_given_back():
    """A stop drains only what is decoded: the rest (a slow image_url host, say) could outlast
    the grace period. What is kept is a prefix per partition, so commits stay contiguous."""
    from worker.batching import Batcher

    worker = worker_with(BrokerLikeProducer())
    worker.batcher = Batcher(max_batch=8, max_wait_ms=50)
    worker._lock = threading.Lock()

    def pending(partition: int, offset: int, decoded: bool) -> Pending:
        future: Future = Future()
        if decoded:
            future.set_result(None)
        return Pending(Rec("car-posts", partition, offset, None, b"{}"), 0.0, future)

    # partition 0: decoded, decoded, slow, decoded; partition 1: all decoded;
    # partition 2: its first is slow
    plan = [(0, 10, True), (1, 5, True), (0, 11, True), (2, 7, False), (0, 12, False)]
    plan += [(1, 6, True), (0, 13, True), (2, 8, True)]
    items = [pending(*p) for p in plan]
    for item in items:
        worker.batcher.add(item)
    assert worker._give_back_undecoded() == 4
    kept = [(p.record.partition, p.record.offset) for p in worker.batcher.take()]
    assert kept == [(0, 10), (1, 5), (0, 11), (1, 6)]
    # the undecoded ones are cancelled (work for nothing); the decoded ones left behind stay done
    assert items[3].prepared.cancelled() and items[4].prepared.cancelled()
    assert items[6].prepared.done() and not items[6].prepared.cancelled()


def test_only_dead_letters_a_redelivery_may_classify_are_noted_for_the_trends():
    """A failed fetch, a late decode and an engine's bad row can go otherwise on a redelivery
    (their trend records are noted, worker/trends_script.py); a post that is not an image
    cannot, and a non-finite row is the engine's: noted too."""
    manifest = tiny_manifest()
    kinds = ["url_fetch_failed", "decode_timeout", "not_an_image", "schema"]
    batch = [
        Pending(Rec("car-posts", 0, i, b"k", b"{}"), 0.0, DoneFuture())
        for i in range(len(kinds) + 1)
    ]
    prepared = [Prepared(None, None, PostError(kind, "x"), 0.0) for kind in kinds]
    event = PostEvent(post_id="p", image_b64="x", posted_at="2026-01-01T00:00:00Z")
    prepared.append(Prepared(event, np.zeros(1, np.float32), None, 0.0))
    logits = {len(kinds): np.array([np.nan, 0.0], np.float32)}
    settings = worker_with(BrokerLikeProducer()).settings
    _, dead, trends = make_outputs(batch, prepared, logits, manifest, settings)
    assert len(dead) == 5
    assert [t.retryable for t in trends] == [True, True, False, False, True]
    assert all(t.make is None for t in trends)


class _RefusingTrends:
    """A trends writer whose Redis answers each error of ``errors`` in turn, then applies."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    def apply(self, records):
        from worker.trends import ApplyResult

        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return ApplyResult(applied=len(records), ignored=0, duplicates=0)

    def ping(self):  # the worker's question after a broken connection: an outage answers none
        import redis

        raise redis.ConnectionError("Connection refused")


def test_redis_refusing_the_worker_stops_it_and_an_outage_is_retried():
    """A password rotated or an ACL revoked under a running worker: retried, it kept the pod
    live and ready while nothing was committed; an outage is still retried as long as it lasts."""
    import redis

    worker = worker_with(BrokerLikeProducer())
    worker._ignored_runs = None
    refused = redis.AuthenticationError("invalid username-password pair")
    worker.trends = _RefusingTrends(*[refused] * SEND_RETRY_LIMIT)
    with pytest.raises(FatalWorkerError, match="Redis refuses this worker: authentication"):
        worker._apply_trends([])
    assert worker.trends.calls == SEND_RETRY_LIMIT

    # an outage between refusals resets the count: only refusals in a row stop the worker
    outage = redis.ConnectionError("Connection refused")
    worker.trends = _RefusingTrends(refused, outage, *[outage] * 6, refused, outage)
    worker._watch_ignored = lambda records, result: None
    worker._apply_trends([])
    assert worker.trends.calls == 11


@pytest.mark.integration
def test_closing_a_producer_whose_broker_went_away_drops_its_records_without_raising(
    tmp_path, caplog
):
    """SIGTERM during a broker outage: kafka-python 3.0's close flushes first and raised
    KafkaTimeoutError, so the worker exited 1 with a traceback (and another from __del__)."""
    from kafka import KafkaProducer

    from worker.run import close_producer
    from worker.stack import TansuBroker, create_topics, free_port

    broker = TansuBroker(tmp_path / "tansu", free_port())
    broker.start()
    try:
        create_topics(broker.bootstrap, ["gone"], 1)
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
        producer.send("gone", b"delivered").get(timeout=30)
    finally:
        broker.stop()
    producer.send("gone", b"held")  # metadata cached: it waits in the accumulator
    started = time.monotonic()
    close_producer(producer, timeout_s=1.0)
    assert time.monotonic() - started < 10
    assert producer._closed  # closed for good: its __del__ has nothing left to raise
    assert "records it still held are dropped" in caplog.text
