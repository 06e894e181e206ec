"""StreamWorker delivery and inference isolation, against fake producers and engines (no broker)."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import numpy as np
import pytest
from kafka.errors import KafkaTimeoutError, MessageSizeTooLargeError

from tests.support import DoneFuture, Rec, tiny_manifest
from training.preprocessing import PreprocessSpec
from worker.dead_letter import dlq_headers, parse_dlq_headers
from worker.errors import PostError
from worker.metrics import WorkerMetrics
from worker.pipeline import (
    DLQ_KEY_PREFIX_BYTES,
    Backoff,
    EngineFailedError,
    FatalWorkerError,
    Pending,
    Result,
    StreamWorker,
    infer_isolating,
    make_outputs,
    original_headers,
)
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
        if not all(isinstance(k, str) and isinstance(v, bytes) for k, v in headers or []):
            raise TypeError("All headers items must be (str, bytes) tuples")
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
    worker.metrics = WorkerMetrics()
    worker.backoff = Backoff(0.001, 0.005)
    worker.stop = threading.Event()
    worker.gpu_device = None
    worker._lane = threading.local()  # no inference thread: _infer uses worker.engine
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


def test_a_dead_letter_the_producer_refuses_outright_is_dropped_and_the_batch_goes_on(caplog):
    producer = BrokerLikeProducer()
    worker = worker_with(producer)
    bad = (b"p1", b"x", [("trace", None)])  # as if built without original_headers
    deliver_within(worker, [Result(b"p2", b"{}", "ok")], [bad])
    assert [r[0] for r in producer.delivered] == ["car-predictions"]
    assert "cannot be sent" in caplog.text
    assert _counts(worker.metrics.dead_letters_dropped) == {"internal": 1.0}
    assert _counts(worker.metrics.dead_letters) == {}


def _counts(counter) -> dict[str, float]:
    """A labelled Counter's totals by its one label."""
    return {
        next(iter(s.labels.values())): s.value
        for s in counter.collect()[0].samples
        if s.name.endswith("_total")
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

    def commit(self, offsets=None):
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
    kafka_bootstrap, worker_bundle_dir, monkeypatch, caplog
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
        metrics_port=0,
    )
    assert _serve(settings, threading.Event(), WorkerMetrics(), None) == 1
    assert "stopping: the engine failed on everything" in caplog.text


def test_a_keyless_tombstone_reaches_the_dlq():
    """A record with neither key nor value is a bad post like any other; kafka-python sends no
    record without both, so its dead letter carries an empty value."""
    batch = [Pending(Rec("car-posts", 0, 4, None, None), 0.0, DoneFuture())]
    prepared = [Prepared(None, None, PostError("invalid_json", "empty"), 0.0)]
    producer = BrokerLikeProducer()
    worker = worker_with(producer)
    manifest = tiny_manifest([{"make": "Audi", "model": "A4"}])
    _, dead, _ = make_outputs(batch, prepared, {}, manifest, worker.settings)
    deliver_within(worker, [], dead)
    ((_, key, value, headers),) = producer.delivered
    assert key is None and value == b""
    assert parse_dlq_headers(headers)["source_offset"] == "4"


class _CommitRefuses:
    """A consumer whose commit raises each error of ``errors`` in turn, then succeeds."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.tries = 0

    def commit(self, offsets=None):
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


def test_backoff_survives_an_outage_of_any_length():
    # 0.2 * 2**1024 is past a float: an outage of ~3 hours made the retry loop raise
    stop = threading.Event()
    stop.set()
    assert Backoff(0.2, 10.0).wait(5000, stop) is False  # no OverflowError, and stop is seen
