"""What a stuck worker shows: carstream_lag counts from the last commit and keeps growing while
a batch retries through a Redis outage (real broker, real redis-server stopped and started), and
a partition whose records the trends writer ignores for longer than a redelivery lasts is logged
as a WARNING (a recreated topic)."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import redis
from kafka import KafkaConsumer, KafkaProducer

from tests.support import missing_tool, tiny_manifest
from tests.worker.test_loop_overlap import post
from worker import pipeline
from worker.metrics import WorkerMetrics
from worker.pipeline import StreamWorker, partition_lag
from worker.run import consumer_config
from worker.settings import WorkerSettings
from worker.stack import RedisServer, create_topics, free_port, redis_server_available
from worker.trend_keys import TrendRecord
from worker.trends import ApplyResult, TrendWriter

pytestmark = pytest.mark.integration


class FirstLabelEngine:
    """Every post is the manifest's first label (the engine is not what is under test)."""

    max_batch = 4

    def infer(self, batch: np.ndarray) -> np.ndarray:
        logits = np.zeros((len(batch), 2), dtype=np.float32)
        logits[:, 0] = 5.0
        return logits


def sample(metrics: WorkerMetrics, name: str, labels: dict[str, str] | None = None):
    return metrics.registry.get_sample_value(name, labels or {})


def wait_for(
    condition: Callable[[], bool],
    what: str,
    errors: list,
    seconds: float = 60.0,
    show: Callable[[], object] = lambda: "",
) -> None:
    """Poll ``condition`` until it holds; fail naming ``what``, ``show()`` and the loop's error."""
    tick = threading.Event()
    deadline = time.monotonic() + seconds
    while not condition():
        assert not errors, f"the loop failed before {what}: {errors[0]!r}"
        assert time.monotonic() < deadline, f"not within {seconds} s: {what} ({show()})"
        tick.wait(0.05)


def test_partition_lag_counts_from_the_commit_and_is_unknown_without_either_end():
    assert partition_lag(110, 100) == 10
    assert partition_lag(100, 100) == 0
    assert partition_lag(0, 100) == 0  # a recreated topic: never negative
    assert partition_lag(None, 100) is None
    assert partition_lag(100, None) is None
    # every polled record committed: what lies up to the position is control records only
    assert partition_lag(4, 3, position=4) == 0
    assert partition_lag(10, 3, position=4) == 6
    assert partition_lag(4, 3, position=None) == 1


class LiveWorker:
    """A StreamWorker on fresh topics of the real broker and a redis-server of its own, run on a
    thread (stopped and checked by ``close``); ``feeder`` writes the input topic."""

    def __init__(
        self, kafka_bootstrap: str, tmp_path: Path, overlap: str = "off", **feeder: object
    ) -> None:
        tag = uuid.uuid4().hex[:8]
        self.topic, group = f"lag-{tag}", f"lag-workers-{tag}"
        create_topics(kafka_bootstrap, [self.topic, f"{self.topic}.out", f"{self.topic}.dlq"], 1)
        self.redis_dir, self.redis_port = tmp_path / "redis", free_port()
        self.server = RedisServer(self.redis_dir, self.redis_port)
        self.server.start()
        settings = WorkerSettings(
            bootstrap_servers=kafka_bootstrap,
            group_id=group,
            input_topic=self.topic,
            output_topic=f"{self.topic}.out",
            dlq_topic=f"{self.topic}.dlq",
            metrics_port=0,
            max_batch=4,
            max_wait_ms=20,
            decode_threads=2,
            dedup_ttl_s=0,
            overlap=overlap,
        )
        self.consumer = KafkaConsumer(
            bootstrap_servers=kafka_bootstrap, **consumer_config(settings)
        )
        self.producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
        if "transactional_id" in feeder:
            feeder["transactional_id"] = f"{feeder['transactional_id']}-{tag}"
        self.feeder = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", **feeder)
        self.client = redis.Redis.from_url(self.server.url)
        self.metrics, self.stop = WorkerMetrics(), threading.Event()
        self.worker = StreamWorker(
            settings,
            [FirstLabelEngine()],
            tiny_manifest(),
            self.consumer,
            self.producer,
            TrendWriter(self.client, group, dedup_ttl_s=0),
            self.metrics,
            self.stop,
        )
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        try:
            self.worker.run()
        except BaseException as exc:
            self.errors.append(exc)

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        return sample(self.metrics, name, labels)

    def lag(self) -> float | None:
        return self.sample("carstream_lag", {"partition": "0"})

    def ok(self) -> float | None:
        return self.sample("carstream_results_total", {"status": "ok"})

    def close(self) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(60)
        self.consumer.close(autocommit=False)
        self.producer.close(timeout=5)
        self.feeder.close(timeout=5)
        self.client.close()
        self.server.stop()
        assert not self.thread.is_alive(), "the loop did not stop"
        assert not self.errors, self.errors


def test_an_idle_worker_on_a_transactional_topic_reads_lag_0(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A transaction's commit marker takes an offset after its last record: committing that
    record + 1 left end - committed at 1 for ever, and the documented stuck-worker alert fired
    on every idle pod fed by a transactional producer (Kafka Streams, Connect with EOS)."""
    if not redis_server_available():
        missing_tool("redis-server is not installed (make setup installs it with apt-get)")
    live = LiveWorker(kafka_bootstrap, tmp_path, transactional_id="feeder")
    try:
        live.feeder.init_transactions()
        live.feeder.begin_transaction()
        for i in range(3):
            live.feeder.send(live.topic, key=f"k{i}".encode(), value=post(i))
        live.feeder.commit_transaction()
        live.thread.start()
        wait_for(lambda: live.ok() == 3, "the 3 posts classified", live.errors, show=live.ok)
        wait_for(lambda: live.lag() == 0, "lag 0 past the marker", live.errors, show=live.lag)
    finally:
        live.close()


AT = datetime(2026, 12, 1, 10, tzinfo=UTC)


def recs(partition: int, offsets: range) -> list[TrendRecord]:
    return [TrendRecord("posts", partition, o, AT, "Audi", "A4", None) for o in offsets]


def test_a_partition_counts_as_ignored_only_when_nothing_of_it_was_applied():
    batch = recs(0, range(0, 4)) + recs(1, range(10, 14))
    # p0 read below its stored position (recreated); p1 applied up to 13
    got = pipeline.fully_ignored(batch, ApplyResult(4, 4), {("posts", 0): 900, ("posts", 1): 13})
    assert got == {("posts", 0): (True, 4, 0, 3), ("posts", 1): (False, 4, 10, 13)}
    # a redelivered batch: its stored position is its last offset, and every record was ignored
    got = pipeline.fully_ignored(recs(0, range(4, 8)), ApplyResult(0, 4), {("posts", 0): 7})
    assert got == {("posts", 0): (True, 4, 4, 7)}
    # a batch straddling the stored position: applied from there on
    got = pipeline.fully_ignored(recs(0, range(4, 8)), ApplyResult(2, 2), {("posts", 0): 7})
    assert got == {("posts", 0): (False, 4, 4, 7)}


def test_a_run_of_ignored_records_warns_past_the_threshold_then_at_most_every_period():
    runs = pipeline.IgnoredRuns(threshold=10, every_s=300.0)
    key = ("posts", 0)
    assert runs.add(key, True, 4, now=0.0) is None
    assert runs.add(key, True, 4, now=1.0) is None  # 8: what a redelivery ignores
    assert runs.add(key, False, 4, now=2.0) is None  # counted again: the run ends
    assert runs.add(key, True, 8, now=3.0) is None
    assert runs.add(key, True, 4, now=4.0) == 12  # 12 in a row: warn
    assert runs.add(key, True, 4, now=100.0) is None  # not again within the period
    assert runs.add(("posts", 1), True, 12, now=100.0) == 12  # each partition on its own
    assert runs.add(key, True, 4, now=304.0) == 20  # again after the period, the run grown


@pytest.mark.parametrize("overlap", ["off", "on"])
def test_lag_grows_while_a_batch_is_stuck_on_redis_and_falls_once_it_commits(
    overlap: str, kafka_bootstrap: str, tmp_path: Path, monkeypatch
) -> None:
    if not redis_server_available():
        missing_tool("redis-server is not installed (make setup installs it with apt-get)")
    # the stuck loop asks the broker for the end offsets every 0.2 s here, not every 10 s
    monkeypatch.setattr(pipeline, "LAG_END_REFRESH_S", 0.2)
    live = LiveWorker(kafka_bootstrap, tmp_path, overlap)
    live.worker.backoff.max_s = 0.2  # the stuck batch retries (and refreshes the gauge) often
    errors, lag = live.errors, live.lag

    def send(first: int, count: int) -> None:
        # a record batch each: Tansu answers end_offsets with its last batch's first offset + 1
        for i in range(first, first + count):
            live.feeder.send(live.topic, key=f"k{i}".encode(), value=post(i))
            live.feeder.flush()

    try:
        started = live.sample("carstream_last_commit_timestamp_seconds")
        send(0, 4)
        live.thread.start()
        wait_for(lambda: live.ok() == 4 and lag() == 0, "the first 4 posts committed", errors)
        committed_at = live.sample("carstream_last_commit_timestamp_seconds")
        assert committed_at >= started

        live.server.stop()
        send(4, 6)
        # the old gauge counted from the last record polled and froze at 0 here
        wait_for(lambda: lag() == 6, "lag 6 with the batch stuck on Redis", errors, show=lag)
        send(10, 3)  # produced while stuck: no fetch brings their end offset, the broker does
        wait_for(lambda: lag() == 9, "lag 9 after 3 more posts", errors, show=lag)
        assert live.sample("carstream_last_commit_timestamp_seconds") == committed_at

        live.server = RedisServer(live.redis_dir, live.redis_port)
        live.server.start()
        wait_for(lambda: lag() == 0, "lag 0 once Redis is back", errors)
        assert live.sample("carstream_last_commit_timestamp_seconds") > committed_at
        assert live.sample("carstream_retries_total", {"target": "redis"}) > 0
    finally:
        live.close()


def test_a_long_run_of_ignored_records_is_a_warning_naming_the_position_to_delete(
    redis_url: str, caplog
) -> None:
    # a topic recreated under a group whose applied positions stayed: offsets restart at 0
    group = f"recreated-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(redis_url)
    writer = TrendWriter(client, group, dedup_ttl_s=0)
    client.hset(f"carstream:trends:applied:{group}", "posts:0", 5000)
    worker = object.__new__(StreamWorker)
    worker.settings = WorkerSettings(metrics_port=0, max_batch=4, group_id=group)
    worker.trends = writer
    worker.metrics = WorkerMetrics()
    worker._ignored_runs = pipeline.IgnoredRuns(pipeline.IGNORED_RUN_BATCHES * 4)
    at = datetime(2026, 12, 1, 10, tzinfo=UTC)

    def batch(first: int) -> list:
        return [TrendRecord("posts", 0, o, at, "Audi", "A4", None) for o in range(first, first + 4)]

    with caplog.at_level(logging.WARNING, logger="worker.pipeline"):
        for first in range(0, 36, 4):  # 36 records: under 10 batches of 4, a redelivery's worth
            worker._apply_trends(batch(first))
        assert not caplog.records
        worker._apply_trends(batch(36))  # the 40th record in a row
        worker._apply_trends(batch(40))  # warned once, not again within IGNORED_WARN_EVERY_S
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert "40 records of posts:0 in a row were ignored" in warnings[0]
    assert "stored applied offset is 5000, and the worker reads offsets 36..39" in warnings[0]
    assert f"HDEL carstream:trends:applied:{group} posts:0" in warnings[0]
    assert sample(worker.metrics, "carstream_trend_records_ignored_total") == 44
    client.close()
