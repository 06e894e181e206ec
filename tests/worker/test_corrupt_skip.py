"""Locating and skipping records the Kafka client cannot parse, against a fake consumer that can
rebalance in the middle of the search (the real-broker cases are in test_worker_integration)."""

from __future__ import annotations

import threading
from collections.abc import Callable

from kafka import TopicPartition
from kafka.errors import CorruptRecordError, KafkaTimeoutError

from tests.support import Rec
from worker.batching import Batcher
from worker.metrics import WorkerMetrics
from worker.pipeline import StreamWorker, unparseable
from worker.settings import WorkerSettings

P0, P1 = TopicPartition("car-posts", 0), TopicPartition("car-posts", 1)


class FakeConsumer:
    """Partitions as lists of "ok"/"bad" records; ``on_poll`` runs inside a poll, where
    kafka-python runs rebalance callbacks."""

    def __init__(self, logs: dict[TopicPartition, list[str]], assigned: set[TopicPartition]):
        self.logs = logs
        self.assigned = set(assigned)
        self.positions = dict.fromkeys(assigned, 0)
        self.paused: set[TopicPartition] = set()
        self.on_poll: Callable[[], None] | None = None

    def assignment(self):
        return set(self.assigned)

    def position(self, tp):
        return self.positions[tp]

    def seek(self, tp, offset):
        assert tp in self.assigned, f"seek on unassigned {tp}"
        self.positions[tp] = offset

    def pause(self, *tps):
        self.paused |= set(tps)

    def resume(self, *tps):
        assert all(tp in self.assigned for tp in tps), "resume of an unassigned partition"
        self.paused -= set(tps)

    def end_offsets(self, tps):
        return {tp: len(self.logs[tp]) for tp in tps}

    def highwater(self, tp):
        return len(self.logs[tp])

    def poll(self, timeout_ms=0, max_records=1):
        hook, self.on_poll = self.on_poll, None
        if hook:
            hook()
        out = {}
        for tp in sorted(self.assigned - self.paused, key=lambda t: t.partition):
            pos = self.positions[tp]
            if pos >= len(self.logs[tp]):
                continue
            if self.logs[tp][pos] == "bad":
                raise CorruptRecordError("Found invalid record structure")
            out[tp] = [Rec(tp.topic, tp.partition, pos, b"k", b"{}")]
            self.positions[tp] = pos + 1
            break
        return out


def worker_on(consumer: FakeConsumer) -> StreamWorker:
    worker = object.__new__(StreamWorker)
    worker.settings = WorkerSettings(metrics_port=0)
    worker.consumer = consumer
    worker.metrics = WorkerMetrics()
    worker.stop = threading.Event()
    worker.batcher = Batcher(32, 50)
    worker._lock = threading.Lock()
    worker._committed = {}
    worker._end = {}
    worker._fetched_at = worker._end_asked_at = 0.0
    worker._rewind = {}
    worker._rebalances = 0
    return worker


def dead_offsets(worker: StreamWorker) -> list[tuple[int, int]]:
    return [(p.record.partition, p.record.offset) for p in worker.batcher.take()]


def test_the_bad_record_and_its_unreadable_batch_mates_are_dead_lettered_in_order():
    consumer = FakeConsumer({P0: ["ok", "bad", "bad", "ok"], P1: ["ok"]}, {P0, P1})
    consumer.positions[P0] = 1
    worker = worker_on(consumer)
    worker._skip_corrupt_record(CorruptRecordError("x"))
    assert dead_offsets(worker) == [(0, 1), (0, 2)]
    assert consumer.positions == {P0: 3, P1: 0}  # P1 put back where it was
    assert not consumer.paused


def test_a_partition_gained_during_the_search_loses_no_record():
    consumer = FakeConsumer({P0: ["ok", "ok", "ok"], P1: ["bad", "ok"]}, {P1})
    worker = worker_on(consumer)

    def gain_p0():  # a rebalance inside the probe poll hands over P0, which is not paused
        consumer.assigned.add(P0)
        consumer.positions[P0] = 0
        worker.on_partitions_assigned([P0])

    consumer.on_poll = gain_p0
    worker._skip_corrupt_record(CorruptRecordError("x"))
    assert consumer.positions[P0] == 0  # what the probe read from P0 is handed back
    assert dead_offsets(worker) == []  # the search is abandoned and starts over
    worker._skip_corrupt_record(CorruptRecordError("x"))
    assert dead_offsets(worker) == [(1, 0)]
    assert consumer.positions == {P0: 0, P1: 1}
    assert not consumer.paused


def test_losing_the_bad_records_partition_during_the_search_abandons_it():
    consumer = FakeConsumer({P0: ["bad", "bad", "ok"], P1: ["ok"]}, {P0, P1})
    worker = worker_on(consumer)

    def lose_p0():
        consumer.assigned.discard(P0)
        worker.on_partitions_revoked([P0])

    consumer.on_poll = lose_p0
    worker._skip_corrupt_record(CorruptRecordError("x"))  # no seek/resume on P0: no exception
    assert dead_offsets(worker) == []
    assert P0 not in worker._committed
    worker._update_lag()  # a revoked partition is skipped, not asked for its highwater


def test_only_parsing_errors_count_as_unparseable():
    assert unparseable(CorruptRecordError("x"))
    assert not unparseable(KafkaTimeoutError("no answer"))
    assert not unparseable(ValueError("from somewhere else"))
