"""The decode pool writes off a decode that runs past its deadline, and the loop dead-letters
its post as ``decode_timeout`` while the rest of the batch, and the partition, go on."""

from __future__ import annotations

import threading

import pytest
from kafka import TopicPartition

from tests.support import Rec, tiny_manifest
from worker.dead_letter import parse_dlq_headers
from worker.decode_pool import DecodePool, WrittenOffError
from worker.metrics import WorkerMetrics
from worker.pipeline import StreamWorker
from worker.settings import WorkerSettings

from .test_loop_overlap import FakeConsumer, FakeTrends, GatedEngine, post

WAIT_S = 10.0  # the most any test waits for a condition; none is reached by waiting it out


def wait_for(condition) -> bool:
    """Poll ``condition`` until it holds (at most WAIT_S)."""
    tick = threading.Event()
    for _ in range(int(WAIT_S / 0.01)):
        if condition():
            return True
        tick.wait(0.01)
    return condition()


def started(future) -> bool:
    """Wait until a thread has taken the decode (it records when)."""
    return wait_for(lambda: future.started_at is not None)


def test_results_and_errors_come_back_as_from_an_executor():
    pool = DecodePool(2)
    try:
        assert pool.submit(lambda a, b=0: a + b, 2, b=3).result(WAIT_S) == 5
        with pytest.raises(ZeroDivisionError):
            pool.submit(lambda: 1 / 0).result(WAIT_S)
        names = {pool.submit(lambda: threading.current_thread().name).result(WAIT_S)}
        assert names <= {"decode_0", "decode_1"}
    finally:
        pool.shutdown()


def test_a_written_off_thread_is_replaced_at_once_and_leaves_when_its_decode_returns():
    pool = DecodePool(1)
    release = threading.Event()
    try:
        stuck = pool.submit(release.wait, WAIT_S)
        queued = pool.submit(lambda: "next")
        assert started(stuck)
        # one thread, stuck: the queued decode cannot start until the stuck one is written off
        assert not queued.done() and queued.started_at is None
        assert pool.write_off(stuck)
        assert queued.result(WAIT_S) == "next"  # the replacement took it
        assert pool.written_off == 1
        assert not pool.write_off(stuck)  # once only
        stuck_thread = stuck.thread
        release.set()
        stuck_thread.join(WAIT_S)
        assert not stuck_thread.is_alive()  # it left instead of serving the queue
        assert stuck.result(0) is True and pool.written_off == 0
        assert pool.submit(lambda: "still serving").result(WAIT_S) == "still serving"
    finally:
        release.set()
        pool.shutdown()


def test_only_a_running_decode_can_be_written_off():
    pool = DecodePool(1)
    release = threading.Event()
    try:
        done = pool.submit(lambda: 1)
        done.result(WAIT_S)
        assert not pool.write_off(done)
        busy = pool.submit(release.wait, WAIT_S)
        waiting = pool.submit(lambda: 2)
        assert started(busy)
        assert not pool.write_off(waiting)  # not started: nothing to give up on
        release.set()
        assert waiting.result(WAIT_S) == 2
    finally:
        release.set()
        pool.shutdown()


def test_no_more_threads_are_written_off_than_the_pool_has():
    pool = DecodePool(1)
    release = threading.Event()
    try:
        first = pool.submit(release.wait, WAIT_S)
        second = pool.submit(release.wait, WAIT_S)
        assert started(first) and pool.write_off(first)
        assert started(second)
        assert not pool.write_off(second)  # a second stuck thread would double the memory
        assert pool.written_off == 1
    finally:
        release.set()
        pool.shutdown()


def test_shutdown_cancels_the_queue_and_does_not_wait_past_its_timeout_for_a_stuck_decode():
    pool = DecodePool(1)
    release = threading.Event()
    try:
        stuck = pool.submit(release.wait, WAIT_S)
        queued = pool.submit(lambda: 1)
        assert started(stuck)
        pool.shutdown(wait=True, cancel_futures=True, timeout=0.05)
        assert queued.cancelled() and not stuck.done()
        with pytest.raises(RuntimeError, match="shut down"):
            pool.submit(lambda: 1)
    finally:
        release.set()
    assert stuck.result(WAIT_S) is True


def test_a_pool_needs_a_thread():
    with pytest.raises(ValueError, match="at least one thread"):
        DecodePool(0)


# --- the loop --------------------------------------------------------------------------------
class RecordingProducer:
    def __init__(self) -> None:
        self.sends: list[tuple[str, bytes, dict]] = []

    def send(self, topic, key=None, value=None, headers=None):
        self.sends.append((topic, key, parse_dlq_headers(headers)))
        return self

    def get(self, timeout=None) -> None:
        return None

    def flush(self, timeout=None) -> None:
        pass


@pytest.mark.parametrize("overlap", ["off", "on"])
def test_a_decode_past_its_deadline_is_dead_lettered_and_the_partition_goes_on(overlap):
    records = [Rec("car-posts", 0, i, f"p{i}".encode(), post(i)) for i in range(8)]
    busy = threading.Event()
    engine = GatedEngine(busy)
    consumer = FakeConsumer(records, busy, first=len(records))
    producer = RecordingProducer()
    stop = threading.Event()
    settings = WorkerSettings(
        metrics_port=0,
        max_batch=4,
        max_wait_ms=20,
        decode_threads=2,
        decode_timeout_s=0.3,
        url_fetch_enabled=False,
        dedup_ttl_s=0,
        overlap=overlap,
    )
    metrics = WorkerMetrics()
    worker = StreamWorker(
        settings, [engine], tiny_manifest(), consumer, producer, FakeTrends(), metrics, stop
    )
    release = threading.Event()
    prepare = worker._prepare

    def hangs_on_p2(value, key=None):
        if key == b"p2":
            release.wait(WAIT_S)  # a decoder that spins on this post
        return prepare(value, key=key)

    worker._prepare = hangs_on_p2
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        tp = TopicPartition("car-posts", 0)
        # the batch with the stuck post is finished and committed while the decode still hangs
        assert wait_for(lambda: any(c.get(tp) == 8 for c in consumer.commits))
        assert not release.is_set()
        dead = [(key, headers) for topic, key, headers in producer.sends if topic.endswith(".dlq")]
        assert [key for key, _ in dead] == [b"p2"]
        assert dead[0][1]["error_kind"] == "decode_timeout"
        assert "0.3 s" in dead[0][1]["error_reason"]
        results = sorted(key for topic, key, _ in producer.sends if not topic.endswith(".dlq"))
        assert results == sorted(f"p{i}".encode() for i in range(8) if i != 2)
        gauge = metrics.registry.get_sample_value("carstream_decode_threads_written_off")
        assert gauge == 1
    finally:
        release.set()
        stop.set()
        thread.join(WAIT_S)
    assert not thread.is_alive()


# --- CPU slots: decoding is bounded, fetching is not ----------------------------------------
def test_at_most_threads_tasks_hold_a_cpu_slot_while_io_threads_wait_beside_them():
    pool = DecodePool(1, io_threads=2)
    all_waiting = threading.Barrier(3, timeout=WAIT_S)  # three tasks off the CPU at once
    inside, most = [0], [0]
    count = threading.Lock()

    def task() -> int:
        all_waiting.wait()  # a fetch: needs a thread, not a CPU slot
        with pool.cpu_slot():
            with count:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            threading.Event().wait(0.01)  # a decode long enough to overlap another
            with count:
                inside[0] -= 1
        return 1

    try:
        futures = [pool.submit(task) for _ in range(3)]
        assert sum(f.result(WAIT_S) for f in futures) == 3  # the barrier did not break
        assert most[0] == 1
    finally:
        pool.shutdown()


def test_waiting_for_a_cpu_slot_does_not_count_as_running():
    pool = DecodePool(1, io_threads=1)
    release = threading.Event()

    def hold() -> None:
        with pool.cpu_slot():
            release.wait(WAIT_S)

    def then_decode() -> None:
        with pool.cpu_slot():
            pass

    try:
        holder = pool.submit(hold)
        assert wait_for(lambda: holder.started_at is not None)
        waiter = pool.submit(then_decode)
        assert wait_for(lambda: waiter.waiting_since is not None)
        now = waiter.waiting_since + 100.0
        assert waiter.running_s(now) == waiter.running_s(now + 1000.0) < 100.0
        assert holder.running_s(now + 1000.0) > 1000.0
        release.set()
        waiter.result(WAIT_S)
        assert waiter.waiting_since is None and waiter.slot_wait_s > 0
    finally:
        release.set()
        pool.shutdown()


def test_writing_off_a_thread_in_a_cpu_slot_gives_the_slot_back_once():
    pool = DecodePool(1)
    release = threading.Event()

    def stuck() -> None:
        with pool.cpu_slot():
            release.wait(WAIT_S)

    def decode() -> str:
        with pool.cpu_slot():
            return "decoded"

    try:
        first = pool.submit(stuck)
        second = pool.submit(decode)
        assert started(first) and pool.write_off(first)
        assert second.result(WAIT_S) == "decoded"  # the slot went to the replacement
        pool.submit(lambda: None).result(WAIT_S)
    finally:
        release.set()
    first.thread.join(WAIT_S)
    assert pool.written_off == 0
    # every slot is free again, and only once: the stuck thread did not give its slot back twice
    assert pool._cpu_free == pool.threads
    pool.shutdown(timeout=0.1)


def test_a_written_off_thread_gets_no_cpu_slot_after_its_fetch():
    pool = DecodePool(1, io_threads=1)
    fetched = threading.Event()

    def fetch_then_decode() -> str:
        fetched.wait(WAIT_S)  # the fetch that hung
        with pool.cpu_slot():
            return "decoded"

    try:
        future = pool.submit(fetch_then_decode)
        assert started(future) and pool.write_off(future)
        fetched.set()
        with pytest.raises(WrittenOffError):
            future.result(WAIT_S)
    finally:
        fetched.set()
        pool.shutdown()


def test_url_posts_fetch_beside_the_decode_threads(monkeypatch):
    """prepare() fetches outside its CPU slot: one decode thread and three fetch threads
    fetch four posts at once (each fetch waits for the other three)."""
    import json

    import numpy as np

    import worker.prepare
    from tests.support import image_bytes
    from training.preprocessing import PreprocessSpec
    from worker.prepare import prepare
    from worker.url_fetch import Fetched, UrlPolicy

    jpeg = image_bytes(np.random.default_rng(0), "JPEG")
    together = threading.Barrier(4, timeout=WAIT_S)

    def fetch_response(url, policy):
        together.wait()
        return Fetched(jpeg, "image/jpeg")

    monkeypatch.setattr(worker.prepare, "fetch_response", fetch_response)
    pool = DecodePool(1, io_threads=3)
    spec = PreprocessSpec(resize=36, crop=32)
    events = [
        json.dumps(
            {
                "post_id": f"p{i}",
                "image_url": f"https://cdn.example/{i}.jpg",
                "posted_at": "2026-12-01T10:00:00Z",
            }
        ).encode()
        for i in range(4)
    ]
    try:
        futures = [
            pool.submit(prepare, e, spec, UrlPolicy(), 10**6, cpu_slot=pool.cpu_slot)
            for e in events
        ]
        prepared = [f.result(WAIT_S) for f in futures]
    finally:
        pool.shutdown()
    assert [p.error for p in prepared] == [None] * 4
    assert all(p.array.shape == (3, 32, 32) for p in prepared)


def test_the_deadline_reaches_the_stuck_holder_of_a_slot_another_post_waits_for():
    """A post waiting for a CPU slot does not run (its clock stops), so the loop, waiting on it,
    enforces the deadline on every running post: here a later post's stuck decode, which took
    the only slot while the awaited post was fetching."""
    from .test_loop_overlap import make_worker

    worker, _, _, _ = make_worker([])
    worker.pool.shutdown()
    worker.pool = pool = DecodePool(1, io_threads=1)
    worker.settings = worker.settings.model_copy(update={"decode_timeout_s": 0.2})
    fetched, hang = threading.Event(), threading.Event()

    def url_post() -> str:
        fetched.wait(WAIT_S)  # its fetch ends once the other post holds the slot
        with pool.cpu_slot():
            return "decoded"

    def stuck_post() -> str:
        with pool.cpu_slot():
            fetched.set()
            hang.wait(WAIT_S)
        return "too late"

    try:
        first = pool.submit(url_post)
        assert started(first)
        second = pool.submit(stuck_post)
        assert wait_for(lambda: first.waiting_since is not None)
        assert worker._await_decode(first) == "decoded"  # once the holder was written off
        assert second.timed_out
        late = worker._await_decode(second)
        assert late.error.kind == "decode_timeout"
        assert not first.timed_out
    finally:
        hang.set()
        pool.shutdown()
        worker.inference.shutdown()
        worker.delivery.shutdown()


def test_a_thread_written_off_while_waiting_for_a_slot_passes_the_wake_up_on():
    pool = DecodePool(1, io_threads=2)
    release = threading.Event()

    def hold() -> str:
        with pool.cpu_slot():
            release.wait(WAIT_S)
        return "held"

    def decode() -> str:
        with pool.cpu_slot():
            return "decoded"

    try:
        holder = pool.submit(hold)
        assert started(holder)
        doomed, kept = pool.submit(decode), pool.submit(decode)
        assert wait_for(lambda: doomed.waiting_since is not None)
        assert wait_for(lambda: kept.waiting_since is not None)
        assert pool.write_off(doomed)
        release.set()
        assert kept.result(WAIT_S) == "decoded"  # not left asleep beside a free slot
        with pytest.raises(WrittenOffError):
            doomed.result(WAIT_S)
        assert holder.result(WAIT_S) == "held"
    finally:
        release.set()
        pool.shutdown()


def test_a_finished_task_is_not_written_off():
    pool = DecodePool(1)
    try:
        done = pool.submit(lambda: 1)
        assert done.result(WAIT_S) == 1
        assert pool.write_off_overdue(0.0) == []
        assert not done.timed_out
    finally:
        pool.shutdown()
