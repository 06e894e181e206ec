"""The overlapped loop keeps reading while a batch is inferred, and commits batches in order.

StreamWorker.run with fake Kafka, Redis and engine objects (no broker): these tests pin the
loop's rules, which the integration and fault suites exercise on the real stack (with both
loops: tests/worker/test_worker_integration.py runs its core tests with overlap on and off).
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections import deque
from concurrent.futures import Future

import numpy as np
import pytest
from kafka import TopicPartition
from kafka.errors import MessageSizeTooLargeError
from kafka.structs import OffsetAndMetadata

from tests.support import Rec, image_bytes, tiny_manifest
from worker.errors import FatalWorkerError
from worker.metrics import WorkerMetrics
from worker.outputs import Pending
from worker.pipeline import BatchAbortedError, InFlight, StreamWorker, overlaps
from worker.settings import WorkerSettings
from worker.trends import ApplyResult

TOPIC = "car-posts"
TP0, TP1 = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)


def post(i: int) -> bytes:
    jpeg = image_bytes(np.random.default_rng(i), "JPEG")
    return json.dumps(
        {
            "post_id": f"p{i}",
            "image_b64": base64.b64encode(jpeg).decode(),
            "posted_at": "2026-12-01T10:00:00Z",
        }
    ).encode()


class FakeConsumer:
    """Hands out its first ``first`` records, and the rest only once a poll comes while the
    engine is inside ``infer`` (``polled_while_busy``): a loop that does not read on while it
    infers never gets them."""

    def __init__(
        self, records: list[Rec], engine_busy: threading.Event, first: int = 4, trickle=None
    ):
        self.records = deque(records)
        self.first = first
        self.trickle = trickle  # records per poll once released (None: as many as asked)
        self.busy_polls: list[int] = []  # the timeout of each poll made while the engine ran
        self.given = 0
        self.positions: dict[TopicPartition, int] = {}
        self.engine_busy = engine_busy
        self.polled_while_busy = threading.Event()
        self.commits: list[dict] = []
        self.held = {TP0, TP1}
        self.idle = threading.Event()  # never set: an empty poll waits out its timeout

    def subscribe(self, topics, listener=None) -> None:
        self.listener = listener

    def poll(self, timeout_ms: int = 0, max_records: int | None = None) -> dict:
        if self.engine_busy.is_set():
            self.polled_while_busy.set()
            self.busy_polls.append(timeout_ms)
        out: dict[TopicPartition, list[Rec]] = {}
        limit = max_records or len(self.records)
        if not self.polled_while_busy.is_set():
            limit = min(limit, self.first - self.given)
        elif self.trickle is not None:
            limit = min(limit, self.trickle)
        for _ in range(min(limit, len(self.records))):
            rec = self.records.popleft()
            tp = TopicPartition(rec.topic, rec.partition)
            out.setdefault(tp, []).append(rec)
            self.positions[tp] = rec.offset + 1
            self.given += 1
        if not out:
            self.idle.wait(timeout_ms / 1000.0)
        return out

    def assignment(self) -> set[TopicPartition]:
        return set(self.held)

    def commit(self, offsets=None, timeout_ms=None) -> None:
        self.commits.append({tp: om.offset for tp, om in offsets.items()})

    def highwater(self, tp):
        return None

    def position(self, tp, timeout_ms=None) -> int | None:
        """The next offset to fetch: one past the last record given (kafka-python's)."""
        return self.positions.get(tp)


class SentFuture:
    """What kafka-python's send returns, already acknowledged."""

    def get(self, timeout=None) -> None:
        return None


class FakeProducer:
    def __init__(self, fail: bool = False) -> None:
        self.sends: list[tuple] = []
        self.fail = fail

    def send(self, topic, key=None, value=None, headers=None):
        if self.fail:  # a result the results topic refuses as too large: the worker stops
            raise MessageSizeTooLargeError("refused")
        self.sends.append((topic, key))
        return SentFuture()

    def flush(self, timeout=None) -> None:
        pass


class FakeTrends:
    def __init__(self) -> None:
        self.applied: list[list[int]] = []

    def apply(self, records):
        self.applied.append([r.offset for r in records])
        return ApplyResult(applied=len(records), ignored=0)


class GatedEngine:
    """Its first call waits (at most ``wait_s``) for the loop to poll meanwhile."""

    max_batch = 4

    def __init__(self, busy: threading.Event, wait_s: float = 10.0) -> None:
        self.busy = busy
        self.wait_s = wait_s
        self.gate: threading.Event | None = None
        self.calls = 0
        self.second_call = threading.Event()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.calls >= 2:
            self.second_call.set()
        self.busy.set()
        try:
            if self.calls == 1 and self.gate is not None:
                self.gate.wait(self.wait_s)
            logits = np.zeros((len(batch), 2), dtype=np.float32)
            logits[:, 0] = 5.0
            return logits
        finally:
            self.busy.clear()


def make_worker(
    records: list[Rec],
    producer=None,
    overlap: str = "on",
    wait_s: float = 10.0,
    engines: list | None = None,
):
    busy = threading.Event()
    engine = GatedEngine(busy, wait_s)
    consumer = FakeConsumer(records, busy)
    engine.gate = consumer.polled_while_busy
    stop = threading.Event()
    settings = WorkerSettings(
        metrics_port=0,
        max_batch=4,
        max_wait_ms=20,
        decode_threads=2,
        dedup_ttl_s=0,
        overlap=overlap,
    )
    worker = StreamWorker(
        settings,
        engines or [engine],
        tiny_manifest(),
        consumer,
        producer or FakeProducer(),
        FakeTrends(),
        WorkerMetrics(),
        stop,
    )
    return worker, consumer, engine, stop


def run_until(worker: StreamWorker, stop: threading.Event, done, seconds: float = 30.0):
    """Run the loop in a thread until ``done()`` holds, then stop it (SIGTERM's path)."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            worker.run()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    finished = threading.Event()
    deadline = time.monotonic() + seconds
    while thread.is_alive() and not done() and time.monotonic() < deadline:
        finished.wait(0.01)
    reached = done()
    stop.set()
    thread.join(seconds)
    assert not thread.is_alive(), "the loop did not stop"
    assert reached or errors, f"not done within {seconds} s"
    return errors


def test_the_consumer_is_polled_while_a_batch_is_inferred_and_every_batch_commits_in_order():
    sent_ms = int(time.time() * 1000) - 5_000  # produced five seconds ago
    records = [
        Rec(TOPIC, i % 2, i // 2, f"p{i}".encode(), post(i), timestamp=sent_ms) for i in range(12)
    ]
    worker, consumer, _, stop = make_worker(records)

    def committed(tp: TopicPartition) -> int:
        return max((c[tp] for c in consumer.commits if tp in c), default=0)

    errors = run_until(worker, stop, lambda: committed(TP0) == committed(TP1) == 6)
    assert errors == []
    # a sequential loop never polls during inference: the engine's first call would time out
    assert consumer.polled_while_busy.is_set()
    # every partition's committed offset only moves forward, and ends past the last record
    for tp in (TP0, TP1):
        seen = [c[tp] for c in consumer.commits if tp in c]
        assert seen == sorted(seen) and seen[-1] == 6
    assert sorted(o for batch in worker.trends.applied for o in batch) == sorted(
        r.offset for r in records
    )
    # each record's age from its Kafka timestamp, the five seconds in the topic included
    ages = {s.name: s.value for s in worker.metrics.record_age_seconds.collect()[0].samples}
    assert ages["carstream_record_age_seconds_count"] == 12
    assert ages["carstream_record_age_seconds_sum"] >= 12 * 5.0


def test_a_batch_behind_a_failed_one_is_neither_counted_nor_published():
    records = [Rec(TOPIC, 0, i, f"p{i}".encode(), post(i)) for i in range(8)]
    worker, _, engine, _ = make_worker(records, FakeProducer(fail=True))
    engine.gate = None
    pending = [
        Pending(rec, 0.0, worker.pool.submit(worker._prepare, rec.value, key=rec.key))
        for rec in records
    ]
    with pytest.raises(FatalWorkerError):
        worker._submit(pending[:4]).result()
    worker.producer = FakeProducer()  # the next batch could be sent now: it must not be
    with pytest.raises(BatchAbortedError):
        worker._submit(pending[4:]).result()
    assert worker.trends.applied == [] and worker.producer.sends == []
    worker.pool.shutdown()
    worker.inference.shutdown()
    worker.delivery.shutdown()


def test_a_finished_batch_commits_only_the_partitions_still_held_and_stops_at_a_failure():
    worker, consumer, _, _ = make_worker([])

    def done(value=None, error=None) -> Future:
        future: Future = Future()
        if error is None:
            future.set_result(value)
        else:
            future.set_exception(error)
        return future

    epochs = {TP0: 0, TP1: 0}
    consumer.held = {TP0}  # TP1 was revoked while its batch was in flight
    offsets = {TP0: OffsetAndMetadata(5, "", -1), TP1: OffsetAndMetadata(9, "", -1)}
    inflight = deque([InFlight(done(offsets), epochs)])
    worker._reap(inflight)
    assert consumer.commits == [{TP0: 5}]

    inflight = deque(
        [
            InFlight(done(error=FatalWorkerError("boom")), epochs),
            InFlight(done({TP0: OffsetAndMetadata(7, "", -1)}), epochs),
        ]
    )
    with pytest.raises(FatalWorkerError):
        worker._reap(inflight)
    assert consumer.commits == [{TP0: 5}]  # the batch behind the failed one is not committed
    worker.pool.shutdown()
    worker.inference.shutdown()
    worker.delivery.shutdown()


def test_a_batch_taken_before_its_partition_was_revoked_is_not_committed_when_it_comes_back():
    # p1 revoked and assigned back while its batch was in flight: the owner between may have
    # committed past the batch, and committing its offset would move the group's back
    records = [Rec(TOPIC, p, i, f"p{p}-{i}".encode(), b"{}") for p in (0, 1) for i in range(2)]
    worker, consumer, _, _ = make_worker([])
    with worker._lock:
        for rec in records:
            worker.batcher.add(Pending(rec, 0.0, Future()))
    batch, epochs = worker._take()
    assert len(batch) == 4 and epochs == {TP0: 0, TP1: 0}
    worker.metrics.lag.labels("1").set(7)
    worker.on_partitions_revoked([TP1])
    # its lag is the next owner's to report: a stale gauge here would be summed with that one
    assert {s.labels["partition"] for s in worker.metrics.lag.collect()[0].samples} == set()
    worker.on_partitions_assigned([TP0, TP1])  # back again, consumer.held unchanged
    offsets = {TP0: OffsetAndMetadata(2, "", -1), TP1: OffsetAndMetadata(2, "", -1)}
    worker._reap(deque([InFlight(_done(offsets), epochs)]))
    assert consumer.commits == [{TP0: 2}]
    # a batch taken after the partition came back commits it as usual
    with worker._lock:
        worker.batcher.add(Pending(Rec(TOPIC, 1, 2, b"k", b"{}"), 0.0, Future()))
    batch, epochs = worker._take()
    assert epochs == {TP1: 1}
    worker._reap(deque([InFlight(_done({TP1: OffsetAndMetadata(3, "", -1)}), epochs)]))
    assert consumer.commits == [{TP0: 2}, {TP1: 3}]
    worker.pool.shutdown()
    worker.inference.shutdown()
    worker.delivery.shutdown()


def _done(value) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


def test_the_serial_loop_never_polls_while_the_engine_runs():
    """overlap off (auto on a CPU engine): the loop polls only between batches, so the engine
    keeps every core; the fake consumer then never releases more than its first records."""
    records = [Rec(TOPIC, i % 2, i // 2, f"p{i}".encode(), post(i)) for i in range(12)]
    worker, consumer, _, stop = make_worker(records, overlap="off", wait_s=0.2)
    assert not worker.overlap

    def committed(tp: TopicPartition) -> int:
        return max((c[tp] for c in consumer.commits if tp in c), default=0)

    errors = run_until(worker, stop, lambda: committed(TP0) == committed(TP1) == 2)
    assert errors == []
    assert not consumer.polled_while_busy.is_set()
    assert consumer.given == 4


class CudaLikeEngine(GatedEngine):
    """The face of the torch-cuda and TensorRT engines (a DeviceEngine)."""

    name = "cuda-like"
    device = "cuda:0"

    def infer_device(self, batch):
        raise AssertionError("not called")

    def input_spec(self):
        raise AssertionError("not called")

    def close(self):
        pass


@pytest.mark.parametrize(
    ("mode", "engine_cls", "expected"),
    [
        ("auto", GatedEngine, False),
        ("auto", CudaLikeEngine, True),
        ("on", GatedEngine, True),
        ("off", CudaLikeEngine, False),
    ],
)
def test_overlap_auto_is_on_for_gpu_engines_only(mode, engine_cls, expected):
    assert overlaps(mode, engine_cls(threading.Event())) is expected


def test_overlap_auto_is_on_for_several_engine_instances_and_off_refuses_them():
    assert overlaps("auto", GatedEngine(threading.Event()), instances=2)
    two = [GatedEngine(threading.Event()), GatedEngine(threading.Event())]
    with pytest.raises(ValueError, match="2 engine instances need the overlapped loop"):
        make_worker([], overlap="off", engines=two)


class MeetingEngine:
    """Each call waits (at most 10 s) at a barrier with the other instance's call: only two
    batches inferred side by side get through. Records the threads that called it."""

    max_batch = 4

    def __init__(self, barrier: threading.Barrier) -> None:
        self.barrier = barrier
        self.threads: set[int] = set()
        self.calls = 0

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self.threads.add(threading.get_ident())
        self.calls += 1
        self.barrier.wait()
        logits = np.zeros((len(batch), 2), dtype=np.float32)
        logits[:, 1] = 5.0
        return logits


def test_two_engine_instances_infer_two_batches_at_once_each_on_its_own_thread():
    records = [Rec(TOPIC, i % 2, i // 2, f"p{i}".encode(), post(i)) for i in range(16)]
    barrier = threading.Barrier(2, timeout=10)
    engines = [MeetingEngine(barrier), MeetingEngine(barrier)]
    worker, consumer, _, stop = make_worker(records, engines=engines)
    consumer.first = len(records)
    assert worker.overlap and worker.max_inflight == 4

    def committed(tp: TopicPartition) -> int:
        return max((c[tp] for c in consumer.commits if tp in c), default=0)

    errors = run_until(worker, stop, lambda: committed(TP0) == committed(TP1) == 8)
    # one instance alone would break the barrier (BrokenBarrierError -> a fatal batch)
    assert errors == [] and not barrier.broken
    assert all(e.calls >= 2 for e in engines)
    # each instance stays on one inference thread, and the two threads differ
    assert all(len(e.threads) == 1 for e in engines)
    assert engines[0].threads != engines[1].threads
    for tp in (TP0, TP1):
        seen = [c[tp] for c in consumer.commits if tp in c]
        assert seen == sorted(seen) and seen[-1] == 8
    assert sorted(o for batch in worker.trends.applied for o in batch) == sorted(
        r.offset for r in records
    )


class FailsAfterTheOtherStarts:
    """Raises on every call, but only once the other instance has started a batch."""

    max_batch = 4

    def __init__(self, other_started: threading.Event) -> None:
        self.other_started = other_started

    def infer(self, batch: np.ndarray) -> np.ndarray:
        assert self.other_started.wait(10), "the second instance never started"
        raise RuntimeError("device lost")


class SignalsStart(MeetingEngine):
    def __init__(self, started: threading.Event) -> None:
        super().__init__(threading.Barrier(1))
        self.started = started

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self.started.set()
        return super().infer(batch)


def test_a_batch_inferred_beside_a_failing_one_is_neither_counted_nor_published():
    """With two instances the batch behind a failed one may already be inferred; its delivery
    must still refuse it, or Redis would move past the failed batch's records."""
    records = [Rec(TOPIC, 0, i, f"p{i}".encode(), post(i)) for i in range(8)]
    started = threading.Event()
    good = SignalsStart(started)
    worker, _, _, _ = make_worker(records, engines=[FailsAfterTheOtherStarts(started), good])
    pending = [
        Pending(rec, 0.0, worker.pool.submit(worker._prepare, rec.value, key=rec.key))
        for rec in records
    ]
    first, second = worker._submit(pending[:4]), worker._submit(pending[4:])
    with pytest.raises(FatalWorkerError):
        first.result(timeout=30)
    with pytest.raises(BatchAbortedError):
        second.result(timeout=30)
    assert good.calls == 1  # the second batch was inferred, on the other instance
    assert worker.trends.applied == [] and worker.producer.sends == []
    worker.pool.shutdown()
    worker.inference.shutdown()
    worker.delivery.shutdown()


class SlowAckProducer(FakeProducer):
    """Its first send waits (at most 10 s) until the engine has started a second batch."""

    def __init__(self, engine: GatedEngine) -> None:
        super().__init__()
        self.engine = engine
        self.engine_ran_meanwhile = False

    def send(self, topic, key=None, value=None, headers=None):
        if not self.sends:
            self.engine_ran_meanwhile = self.engine.second_call.wait(10.0)
        return super().send(topic, key, value, headers)


def test_the_engine_runs_the_next_batch_while_the_one_before_is_published():
    """Publishing and counting are off the engine's thread: a slow broker ack does not keep
    the engine idle (on a GPU, a batch's publish takes as long as its inference)."""
    records = [Rec(TOPIC, i % 2, i // 2, f"p{i}".encode(), post(i)) for i in range(12)]
    worker, consumer, engine, stop = make_worker(records)
    engine.gate = None
    consumer.first = len(records)
    worker.producer = producer = SlowAckProducer(engine)

    def committed(tp: TopicPartition) -> int:
        return max((c[tp] for c in consumer.commits if tp in c), default=0)

    errors = run_until(worker, stop, lambda: committed(TP0) == committed(TP1) == 6)
    assert errors == []
    assert producer.engine_ran_meanwhile


def test_a_poll_the_broker_refuses_for_good_ends_the_loop_and_a_transient_one_is_retried():
    from kafka.errors import (
        FencedInstanceIdError,
        KafkaConnectionError,
        TopicAuthorizationFailedError,
    )

    worker, consumer, _, _ = make_worker([])
    worker.stop.set()  # the retry's wait returns at once

    def failing(error):
        def poll(timeout_ms=0, max_records=None):
            raise error

        return poll

    consumer.poll = failing(KafkaConnectionError("reset"))
    worker._poll(10, 4)  # retried on the next poll, the loop goes on
    for error in (TopicAuthorizationFailedError("car-posts"), FencedInstanceIdError()):
        consumer.poll = failing(error)
        with pytest.raises(FatalWorkerError, match="the broker refuses this consumer"):
            worker._poll(10, 4)
    worker.pool.shutdown()
    worker.inference.shutdown()
    worker.delivery.shutdown()


def test_the_decodes_of_records_dropped_on_revocation_are_cancelled():
    # they are read again from the rewind offset; a queued decode would only delay live posts
    worker, _, _, _ = make_worker([])
    kept, lost = Future(), Future()
    with worker._lock:
        worker.batcher.add(Pending(Rec(TOPIC, 0, 0, b"a", b"{}"), 0.0, kept))
        worker.batcher.add(Pending(Rec(TOPIC, 1, 0, b"b", b"{}"), 0.0, lost))
    worker.on_partitions_revoked([TP1])
    assert lost.cancelled() and not kept.cancelled()
    assert worker._rewind == {TP1: 0}
    worker.pool.shutdown()
    worker.inference.shutdown()
    worker.delivery.shutdown()
