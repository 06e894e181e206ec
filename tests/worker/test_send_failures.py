"""Send failures the worker must name and stop on, not wait out behind a green probe: a results or
dead-letter topic the broker does not have, a topic that refuses a record, and an engine that
fails on every post (logged without flooding the log)."""

from __future__ import annotations

import logging
import threading
import uuid

import numpy as np
import pytest
from kafka.errors import InvalidRecordError, KafkaTimeoutError, UnknownTopicOrPartitionError

from tests.worker.test_delivery import (
    BrokerLikeProducer,
    FailingForGoodProducer,
    _counts,
    _dead,
    deliver_within,
)
from tests.worker.test_delivery import worker_with as _worker_with
from worker.connections import metadata_answers, topic_unknown
from worker.delivery import SEND_RETRY_LIMIT
from worker.engine_isolation import EngineFailureLog, infer_isolating
from worker.errors import FatalWorkerError
from worker.metrics import WorkerMetrics
from worker.outputs import Result
from worker.pipeline import BatchAbortedError, StreamWorker
from worker.settings import WorkerSettings


def worker_with(producer, **settings) -> StreamWorker:
    """test_delivery's, on no consumer loop thread (its retries only beat)."""
    worker = _worker_with(producer, **settings)
    worker._loop_thread = None
    return worker


def hide_topic(monkeypatch: pytest.MonkeyPatch, topic: str) -> None:
    """Every kafka-python client's metadata answers list ``topic`` as UNKNOWN_TOPIC_OR_PARTITION:
    a broker that does not have it and does not create topics on request (Tansu always creates
    them, so the answer is rewritten as it arrives)."""
    from kafka.cluster import ClusterMetadata

    real = ClusterMetadata.update_metadata

    def update_metadata(self, metadata):
        for t in metadata.topics:
            if t.name == topic:
                t.error_code = UnknownTopicOrPartitionError.errno
                t.partitions = []
        return real(self, metadata)

    monkeypatch.setattr(ClusterMetadata, "update_metadata", update_metadata)


# --- a topic the broker does not have --------------------------------------------------------


class _Metadata:
    """kafka-python 3.0's ClusterMetadata, as far as topic_unknown reads it."""

    def __init__(self, topics: set[str]) -> None:
        self.topics = topics
        self._last_successful_refresh_ms = 0.0

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        return {0} if topic in self.topics else None


class MetadataTimeoutProducer(BrokerLikeProducer):
    """send() to ``missing`` blocks and raises KafkaTimeoutError, as kafka-python's does when no
    metadata for the topic comes within max_block_ms: with the broker answering without the
    topic (``answers``), or not answering at all, for its first ``times_out`` sends."""

    def __init__(self, missing: str, answers: bool, times_out: int = 10**9) -> None:
        super().__init__()
        self.missing, self.answers, self.times_out = missing, answers, times_out
        self._metadata = _Metadata({"car-predictions", "car-posts.dlq"} - {missing})
        self.timeouts = 0

    def send(self, topic, key=None, value=None, headers=None):
        if topic == self.missing and self.timeouts < self.times_out:
            self.timeouts += 1
            self.sends.append((topic, key, value, list(headers or [])))
            if self.answers:
                self._metadata._last_successful_refresh_ms += 100
            raise KafkaTimeoutError("Failed to update metadata after 5.0 secs.")
        return super().send(topic, key=key, value=value, headers=headers)


def test_a_topic_the_broker_answers_without_stops_the_worker_naming_it():
    """Each send to it blocked max_block_ms (60 s by default) and failed, one by one, and it was
    retried for ever: 20 dead letters held the loop 20 minutes a round while liveness went red."""
    producer = MetadataTimeoutProducer("car-posts.dlq", answers=True)
    worker = worker_with(producer)
    dead = [_dead(f"b{i}".encode(), b"x", offset=i) for i in range(20)]
    with pytest.raises(FatalWorkerError) as caught:
        deliver_within(worker, [Result(b"p1", b"{}", "ok")], dead, seconds=5)
    assert str(caught.value).startswith(
        f"sends to car-posts.dlq still fail after {SEND_RETRY_LIMIT + 1} tries"
    )
    assert "the broker answers without topic car-posts.dlq: create it" in str(caught.value)
    # one blocking send to the topic a round, not one per dead letter
    assert producer.timeouts == SEND_RETRY_LIMIT + 1
    assert worker.metrics.retries.labels("kafka")._value.get() == SEND_RETRY_LIMIT
    assert not any(_counts(worker.metrics.dead_letters_dropped).values())


def test_a_metadata_wait_no_broker_answered_is_an_outage_retried_not_fatal():
    producer = MetadataTimeoutProducer(
        "car-posts.dlq", answers=False, times_out=SEND_RETRY_LIMIT + 3
    )
    worker = worker_with(producer)
    dead = [_dead(f"b{i}".encode(), b"x", offset=i) for i in range(3)]
    deliver_within(worker, [Result(b"p1", b"{}", "ok")], dead)
    assert {r[1] for r in producer.delivered} == {b"p1", b"b0", b"b1", b"b2"}
    assert producer.timeouts == SEND_RETRY_LIMIT + 3  # one blocking send a round
    assert _counts(worker.metrics.dead_letters)["invalid_json"] == 3.0


def test_a_metadata_wait_run_out_stops_the_delivery_at_a_stop_request():
    """SIGTERM's drain waited out every dead letter's metadata wait before it could end."""
    producer = MetadataTimeoutProducer("car-posts.dlq", answers=False)
    worker = worker_with(producer)
    worker.stop.set()
    dead = [_dead(f"b{i}".encode(), b"x", offset=i) for i in range(20)]
    with pytest.raises(BatchAbortedError):
        deliver_within(worker, [], dead)
    # one blocking send for the round, not one per dead letter; and once stopping a failed
    # round is not retried (the batch stays uncommitted, read again after the restart)
    assert producer.timeouts == 1


@pytest.mark.integration
def test_a_topic_the_real_broker_answers_without_stops_delivery(kafka_bootstrap, monkeypatch):
    """A real KafkaProducer, its metadata answers rewritten to lack the DLQ topic: kafka-python's
    own metadata wait runs out, and the worker tells that from an outage."""
    from kafka import KafkaProducer

    from worker.stack import create_topics

    tag = uuid.uuid4().hex[:8]
    out, dlq = f"preds-{tag}", f"posts-{tag}.dlq"
    create_topics(kafka_bootstrap, [out], 1)
    hide_topic(monkeypatch, dlq)
    producer = KafkaProducer(
        bootstrap_servers=kafka_bootstrap, acks="all", enable_idempotence=True, max_block_ms=300
    )
    worker = worker_with(
        producer, output_topic=out, dlq_topic=dlq, bootstrap_servers=kafka_bootstrap
    )
    try:
        with pytest.raises(FatalWorkerError, match=f"sends to {dlq} still fail.*create it"):
            deliver_within(worker, [Result(b"p1", b"{}", "ok")], [_dead(b"b1", b"x")], seconds=60)
    finally:
        producer.close(timeout=5)


@pytest.mark.integration
def test_topic_unknown_reads_kafka_pythons_metadata(kafka_bootstrap):
    from kafka import KafkaProducer

    from worker.stack import create_topics

    known = f"known-{uuid.uuid4().hex[:8]}"
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, max_block_ms=5000)
    try:
        create_topics(kafka_bootstrap, [known], 1)  # after connecting: not in its metadata yet
        before = metadata_answers(producer)
        producer.partitions_for(known)  # a metadata answer
        assert metadata_answers(producer) > before
        assert topic_unknown(producer, "never-created", before)
        assert not topic_unknown(producer, known, before)
        # no answer since: an outage, not a missing topic
        assert not topic_unknown(producer, "never-created", metadata_answers(producer))
    finally:
        producer.close(timeout=5)


class _AnsweringProducer:
    """partitions_for as kafka-python's: KafkaTimeoutError for a topic the broker lists not
    (answering each time, or not at all for the first ``silent`` calls)."""

    def __init__(self, missing: set[str], silent: int = 0) -> None:
        self._metadata = _Metadata({"car-predictions", "car-posts.dlq"} - missing)
        self.silent = silent
        self.asked: list[str] = []

    def partitions_for(self, topic: str) -> set[int]:
        self.asked.append(topic)
        if self.silent:
            self.silent -= 1
            raise KafkaTimeoutError("Failed to update metadata after 5.0 secs.")
        self._metadata._last_successful_refresh_ms += 100
        found = self._metadata.partitions_for_topic(topic)
        if found is None:
            raise KafkaTimeoutError("Failed to update metadata after 5.0 secs.")
        return found


def test_check_topics_names_the_first_topic_the_broker_lists_not(monkeypatch):
    from worker import run

    monkeypatch.setattr(run, "CONNECT_BACKOFF", run.Backoff(0.001, 0.002))
    beats: list[int] = []
    topics = ["car-predictions", "car-posts.dlq"]
    stop = threading.Event()
    missing = _AnsweringProducer({"car-posts.dlq"})
    assert run.check_topics(missing, topics, stop, lambda: beats.append(1)) == "car-posts.dlq"
    assert beats == []
    # a broker that did not answer at first: retried, each retry a beat
    late = _AnsweringProducer(set(), silent=2)
    assert run.check_topics(late, topics, stop, lambda: beats.append(1)) is None
    assert late.asked == ["car-predictions"] * 3 + ["car-posts.dlq"] and len(beats) == 2


@pytest.mark.integration
def test_a_missing_dlq_topic_is_one_line_exit_2_at_start(
    kafka_bootstrap, worker_bundle_dir, monkeypatch, capsys
):
    from worker import pipeline
    from worker.run import _serve

    ran: list[bool] = []
    monkeypatch.setattr(pipeline.StreamWorker, "run", lambda self: ran.append(True))
    tag = uuid.uuid4().hex[:8]
    dlq = f"posts-{tag}.dlq"
    hide_topic(monkeypatch, dlq)
    settings = WorkerSettings(
        bundle=str(worker_bundle_dir),
        backend="onnxruntime",
        bootstrap_servers=kafka_bootstrap,
        input_topic=f"posts-{tag}",
        output_topic=f"preds-{tag}",
        dlq_topic=dlq,
        group_id=f"g-{tag}",
        metrics_port=0,
    )
    assert _serve(settings, threading.Event(), WorkerMetrics(), None) == 2
    assert ran == []  # refused before the loop, which would block on each dead letter
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"python -m worker run: error: topic {dlq} does not exist")
    assert lines[0].endswith("create it")


# --- a topic that refuses a record -----------------------------------------------------------


def test_a_producer_failed_for_good_names_the_topic_and_the_refused_record():
    """It said only 'a restart makes a new producer', which reads as a fix; the restart reads
    the same batch and fails on the same record."""
    made: list[FailingForGoodProducer] = []

    class Refusing(FailingForGoodProducer):
        def send(self, topic, key=None, value=None, headers=None):
            if topic == "car-posts.dlq" and self._transaction_manager.last_error is None:
                self._transaction_manager.last_error = InvalidRecordError(None)
            return super().send(topic, key=key, value=value, headers=headers)

    def new_producer() -> Refusing:
        made.append(Refusing(limit=10_000))
        return made[-1]

    worker = worker_with(new_producer())
    worker.new_producer = new_producer
    dead = [_dead(b"b1", b"x", offset=17), _dead(b"b2", b"y", offset=18)]
    with pytest.raises(FatalWorkerError) as caught:
        deliver_within(worker, [], dead)
    message = str(caught.value)
    assert message.startswith(
        "the Kafka producer failed for good: car-posts.dlq refuses the dead letter of "
        "car-posts/0@17 (invalid_json, key 'b1') (InvalidRecordError"
    )
    assert "a restart reads the same batch and fails the same way" in message
    assert "makes a new producer" not in message


def test_a_producer_failed_for_good_with_no_new_one_names_the_topics_it_refused():
    producer = FailingForGoodProducer(limit=60)
    worker = worker_with(producer)
    dead = [_dead(b"big", b"x" * 100), _dead(b"small", b"y", offset=8)]
    with pytest.raises(FatalWorkerError) as caught:
        deliver_within(worker, [Result(b"p1", b"{}", "ok")], dead)
    assert "car-posts.dlq refused one of the 2 records not delivered" in str(caught.value)
    assert "raise the topic's max.message.bytes" in str(caught.value)


# --- an engine that fails on every post ------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _poisoned(batch: np.ndarray) -> np.ndarray:
    """An engine that runs a blank input and fails on every real one (a bad model)."""
    if np.any(batch != 0):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    return np.zeros((len(batch), 2), np.float32)


def _records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "worker.engine_isolation"]


def test_an_engine_failing_on_every_post_logs_one_traceback_then_counted_summaries(caplog):
    """Every failing chunk logged its traceback and a warning: 4,522 lines in 40 s."""
    clock = _Clock()
    failures = EngineFailureLog(traceback_every_s=300, summary_every_s=60, clock=clock)
    rows = {i: np.ones(1, np.float32) for i in range(4)}
    caplog.set_level(logging.INFO, logger="worker.engine_isolation")
    for _ in range(100):  # 100 batches of 4 within the first minute
        _, failed = infer_isolating(_poisoned, rows, 2, np.stack, np.zeros_like, failures=failures)
        assert len(failed) == 4
        clock.now += 0.5
    logged = _records(caplog)
    assert [r.levelname for r in logged] == ["ERROR", "WARNING"]
    assert logged[0].exc_info is not None and "next traceback in 300 s" in logged[0].getMessage()
    assert logged[1].getMessage() == "the engine runs but failed on 2 posts: dead-lettering them"

    clock.now += 10  # past the minute: the next failure brings the count
    infer_isolating(_poisoned, rows, 4, np.stack, np.zeros_like, failures=failures)
    summary = _records(caplog)[-1]
    assert summary.levelname == "WARNING" and summary.exc_info is None
    assert summary.getMessage().startswith(
        "the engine failed on 200 batches in the last 60 s (398 posts dead-lettered as internal)"
    )  # 199 chunks after the first and this one; the posts after the first 2 (this chunk's 4
    # are counted once it has failed them, in the next summary)
    assert len(_records(caplog)) == 3

    clock.now += 300  # five minutes on: a traceback again
    caplog.clear()
    infer_isolating(_poisoned, rows, 4, np.stack, np.zeros_like, failures=failures)
    assert [r.levelname for r in _records(caplog)] == ["ERROR", "WARNING"]
    assert _records(caplog)[0].exc_info is not None
