"""A fatal error on the loop's thread while the delivery thread retries through an outage.

The worker must go down (not ready, no more liveness beats, run() returning its error), not sit
in the join of a delivery thread that retries Redis for ever while /healthz and /readyz say 200.
"""

from __future__ import annotations

import threading
import time

from kafka.errors import FencedInstanceIdError
from redis.exceptions import ConnectionError as RedisConnectionError

from tests.support import Rec
from tests.worker.test_loop_overlap import TOPIC, make_worker, post
from worker.backoff import Backoff
from worker.errors import FatalWorkerError


class RedisDown:
    """A trends writer whose Redis is out: every apply fails, and says it tried."""

    def __init__(self) -> None:
        self.tries = 0
        self.failing = threading.Event()

    def apply(self, records):
        self.tries += 1
        self.failing.set()
        raise RedisConnectionError("Connection refused")

    def ping(self):  # asked after a broken connection: out, not refusing
        raise RedisConnectionError("Connection refused")


def test_a_fenced_poll_during_a_redis_outage_ends_the_loop_not_ready_and_not_beating():
    records = [Rec(TOPIC, i % 2, i // 2, f"p{i}".encode(), post(i)) for i in range(4)]
    worker, consumer, _engine, _stop = make_worker(records, wait_s=0.0)
    trends = worker.trends = RedisDown()
    worker.backoff = Backoff(0.01, 0.05)  # retries (and their beats) many times a second
    worker.metrics.set_ready(True)  # assigned partitions
    polls = consumer.poll

    def poll(timeout_ms=0, max_records=None):
        if trends.failing.is_set():  # another pod took this group_instance_id
            raise FencedInstanceIdError()
        return polls(timeout_ms, max_records)

    consumer.poll = poll
    errors: list[BaseException] = []
    ended = threading.Event()

    def target() -> None:
        try:
            worker.run()
        except BaseException as exc:
            errors.append(exc)
        finally:
            ended.set()

    threading.Thread(target=target, daemon=True).start()
    try:
        assert ended.wait(10), "run() still joins the delivery thread retrying Redis"
    finally:
        worker.stop.set()  # lets a stuck old-code delivery thread end
    assert len(errors) == 1 and isinstance(errors[0], FatalWorkerError)
    assert not worker.metrics.is_ready()
    tries = trends.tries
    stale = time.monotonic()
    time.sleep(0.3)
    assert trends.tries == tries  # nothing retries behind the loop's back
    assert not worker.metrics.is_alive(time.monotonic() - stale)  # no beat since it ended
    assert consumer.commits == []  # the batch has no counts: not committed
