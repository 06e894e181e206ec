"""Fault injection on the real local stack: 3 worker replicas, a Tansu broker, an AOF Redis.

Posts flow from a feeder thread while replicas are killed, paused, added and removed and
Redis is restarted. After each scenario: every valid post has a result (repeats only as exact
copies of the same post_id's result), the Redis counts by make, model and city equal the tally
of the distinct results exactly, every bad post is in the DLQ as sent, and the group has no lag.

``CARSTREAM_SOAK=N`` multiplies posts and injections for local soak runs; set
``CARSTREAM_FAULTS_REPORT=path.jsonl`` to collect the figures of docs/faults.md.
"""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from datetime import UTC, datetime

import pytest
import redis

from worker.dead_letter import parse_dlq_headers
from worker.trend_keys import TrendRecord, applied_key
from worker.trends import TrendWriter
from worker.trends_script import APPLY_BATCH_LUA

pytestmark = pytest.mark.faults

REPLICAS = 3


class Feeder(threading.Thread):
    """Produces the scenario's messages in small chunks at a steady rate, in the background."""

    def __init__(self, fx, bootstrap: str, topic: str, messages: list, chunk: int, every_s: float):
        super().__init__(daemon=True)
        self.fx, self.bootstrap, self.topic = fx, bootstrap, topic
        self.messages, self.chunk, self.every_s = messages, chunk, every_s
        self.error: BaseException | None = None
        self.sent = 0
        self.halt = threading.Event()
        # messages from index `hold_from` on wait for `release`: a fault test that needs posts
        # to arrive *during* its fault sets both, instead of racing fast workers to the end
        self.hold_from: int | None = None
        self.release = threading.Event()

    def _released(self) -> bool:
        """Wait for ``release``; False when halted first."""
        while not self.release.wait(0.2):
            if self.halt.is_set():
                return False
        return True

    def run(self) -> None:
        try:
            p = self.fx.producer(self.bootstrap)
            for i in range(0, len(self.messages), self.chunk):
                if self.hold_from is not None and i >= self.hold_from and not self._released():
                    break
                futures = [
                    p.send(self.topic, key=k, value=v) for k, v in self.messages[i : i + self.chunk]
                ]
                p.flush()
                for f in futures:
                    f.get(timeout=30)
                self.sent += len(futures)
                if self.halt.wait(self.every_s):
                    break
            p.close()
        except BaseException as exc:  # reported by Scenario.finish
            self.error = exc


class Scenario:
    """One fault run: posts with known cities, a few bad posts, 3 replicas, a results reader."""

    def __init__(self, fx, stack, bootstrap: str, name: str, posts: int, seed: int):
        self.fx, self.bootstrap, self.name = fx, bootstrap, name
        self.topics, self.redis_server, self.fleet = stack
        n = posts * fx.SOAK_FACTOR
        self.posts = fx.good_posts(n, seed=seed, prefix=name)
        self.city_of = {pid: city for pid, _, city in self.posts}
        now = fx.now_rfc3339()
        self.bad = {
            f"bad-{name}-{i}": json.dumps({"post_id": f"bad-{i}", "posted_at": now}).encode()
            for i in range(max(1, n // 60))
        }
        messages = [(pid.encode(), raw) for pid, raw, _ in self.posts]
        for i, (key, raw) in enumerate(self.bad.items()):
            messages.insert((i * 61 + 7) % len(messages), (key.encode(), raw))
        self.feeder = Feeder(fx, bootstrap, self.topics.input, messages, chunk=12, every_s=0.2)
        self.results = fx.Reader(bootstrap, self.topics.output, self.topics.partitions)
        self.injected = 0
        self.recover_s: list[float] = []
        self.started = time.monotonic()

    def start(self, replicas: int = REPLICAS) -> None:
        for _ in range(replicas):
            self.fleet.start()
        self.feeder.start()

    def progress(self) -> int:
        self.results.poll(200)
        return self.fx.distinct_keys(self.results.records)

    def wait_progress(self, at_least: int, deadline_s: float = 90) -> None:
        self.results.until(
            lambda recs: self.fx.distinct_keys(recs) >= at_least,
            deadline_s,
            self.fleet.procs,
            f"{at_least} distinct results",
        )

    def recovered(self, since: dict[int, int], deadline_s: float = 90) -> float:
        """Seconds until every partition moved again: its committed offset passed ``since``
        (the committed offsets when the fault was injected) or reached the topic's end."""
        t0 = time.monotonic()
        got: dict[int, int] = {}
        while time.monotonic() < t0 + deadline_s:
            got = self.fx.committed(self.bootstrap, self.topics)
            end = self.fx.end_offsets(self.bootstrap, self.topics)
            if all(got.get(p, 0) > since.get(p, 0) or got.get(p, 0) >= e for p, e in end.items()):
                return time.monotonic() - t0
            if not self.fleet.alive():
                pytest.fail("every worker exited")
            self.results.poll(200)
        pytest.fail(f"partitions did not move again: committed {got}, at the fault {since}")

    def committed(self) -> dict[int, int]:
        return self.fx.committed(self.bootstrap, self.topics)

    def finish(self, **extra) -> dict:
        """Wait for every post, then check results, DLQ, counts and lag; returns the table row."""
        self.feeder.join(timeout=120)
        assert self.feeder.error is None, f"feeder failed: {self.feeder.error!r}"
        assert self.feeder.sent == len(self.posts) + len(self.bad)
        self.wait_progress(len(self.posts), deadline_s=120)
        self.fx.wait_no_lag(self.bootstrap, self.topics, deadline_s=90)
        self.results.poll(500)
        self.results.close()
        by_post, dupes = self.fx.results_by_post_id(self.results.records)
        assert set(by_post) == set(self.city_of), "a valid post has no result (or a stranger)"

        dlq = self.fx.Reader(self.bootstrap, self.topics.dlq, self.topics.partitions)
        try:
            dlq.until(lambda recs: {r.key.decode() for r in recs} >= set(self.bad), 30)
            dlq.poll(300)
        finally:
            dlq.close()
        for rec in dlq.records:
            key = rec.key.decode()
            assert key in self.bad, f"a valid post was dead-lettered: {key}"
            assert rec.value == self.bad[key], f"{key}: DLQ bytes differ"
            assert parse_dlq_headers(rec.headers)["error_kind"] == "schema"

        truth = self.fx.truth_counts(by_post, self.city_of)
        got = self.fx.redis_counts(self.redis_server.url, self.city_of.values())
        off = self.fx.counts_off_by(truth, got)
        row = {
            "fault": self.name,
            "injected": self.injected,
            "posts": len(self.posts) + len(self.bad),
            "results": len(by_post),
            "duplicates": dupes,
            "counts_off_by": off,
            "dlq": len(dlq.records),
            "recover_s": [round(s, 1) for s in self.recover_s],
            "seconds": round(time.monotonic() - self.started, 1),
            **extra,
        }
        self.fx.record_row(row)
        assert got == truth, f"Redis counts off by {off}: {row}"
        return row


def _wait_all_joined(s: Scenario, deadline_s: float = 60) -> None:
    deadline = time.monotonic() + deadline_s
    while not all("partitions assigned" in s.fleet.log(n) for n in s.fleet.alive()):
        assert time.monotonic() < deadline, "a replica never joined the group"
        s.results.poll(200)


def _pick(fleet, rng: random.Random) -> str:
    alive = sorted(fleet.alive())
    assert alive, "no worker left alive"
    return rng.choice(alive)


# --- scenarios ------------------------------------------------------------------------------


def test_kill_9_random_replica_mid_batch_three_times(fx, stack, kafka_bootstrap):
    s = Scenario(fx, stack, kafka_bootstrap, "kill-9", posts=480, seed=11)
    rng = random.Random(11)
    kills = 3 * fx.SOAK_FACTOR
    s.feeder.every_s = 0.3  # posts keep flowing through all three kills
    s.start()
    n = len(s.posts)
    for i in range(kills):
        s.wait_progress((i + 1) * n // (kills + 2))
        victim = _pick(s.fleet, rng)
        s.fleet.kill(victim)  # SIGKILL while batches are in flight
        s.injected += 1
        since = s.committed()
        s.fleet.start(f"{victim}-r{i}")
        s.recover_s.append(s.recovered(since))
    s.finish()


def test_sigstop_past_session_timeout_then_sigcont_changes_no_count(fx, stack, kafka_bootstrap):
    s = Scenario(fx, stack, kafka_bootstrap, "sigstop", posts=360, seed=12)
    # half the posts arrive only once the victim is paused, so its partitions have work that the
    # others can only take after its session expires (fast workers once finished everything
    # before the pause, the session never expired, and the test waited for a rejoin in vain)
    s.feeder.hold_from = len(s.feeder.messages) // 2
    s.start()
    s.wait_progress(len(s.posts) // 4)
    victim = _pick(s.fleet, random.Random(12))
    proc = s.fleet.procs[victim]
    proc.send_signal(signal.SIGSTOP)
    s.feeder.release.set()
    s.injected += 1
    since = s.committed()
    try:
        # the others must take its partitions (session timeout 6 s) and finish everything
        s.recover_s.append(s.recovered(since))
        s.feeder.join(timeout=120)
        s.wait_progress(len(s.posts), deadline_s=120)
        fx.wait_no_lag(kafka_bootstrap, s.topics, deadline_s=90)
        before = fx.redis_counts(s.redis_server.url, s.city_of.values())
    finally:
        proc.send_signal(signal.SIGCONT)
    # the resumed replica finishes whatever it held, then rejoins: wait for it to be assigned
    log_at_resume = s.fleet.log(victim).count("partitions assigned")
    deadline = time.monotonic() + 60
    while s.fleet.log(victim).count("partitions assigned") <= log_at_resume:
        assert proc.poll() is None, "the paused replica died after SIGCONT"
        assert time.monotonic() < deadline, "the resumed replica never rejoined the group"
        s.results.poll(300)
    fx.wait_no_lag(kafka_bootstrap, s.topics, deadline_s=60)
    after = fx.redis_counts(s.redis_server.url, s.city_of.values())
    assert after == before, "the paused replica's late writes changed a count"
    late = s.fleet.log(victim)
    s.finish(
        late_ignored="already applied were ignored" in late,
        late_commit_refused="commit refused" in late,
    )


def test_redis_restarted_mid_run_workers_back_off_and_commit_nothing_unapplied(
    fx, stack, kafka_bootstrap
):
    s = Scenario(fx, stack, kafka_bootstrap, "redis-restart", posts=360, seed=13)
    s.feeder.hold_from = len(s.feeder.messages) // 2  # the second half arrives in the outage
    s.start()
    s.wait_progress(len(s.posts) // 3)
    server = s.redis_server
    server.stop()  # SIGTERM: the AOF is flushed, the port freed
    s.feeder.release.set()  # fast workers may have drained the first half: give them work
    s.injected += 1
    deadline = time.monotonic() + 60

    def retries() -> int:
        return sum(s.fleet.log(n).count("applying trends failed") for n in s.fleet.procs)

    while retries() < 2 * REPLICAS:  # every replica hit the outage and is backing off
        assert time.monotonic() < deadline, "workers never noticed Redis was down"
        s.results.poll(300)
    during = fx.committed(kafka_bootstrap, s.topics)
    server.start()  # same port, same AOF directory
    since = s.committed()
    applied = {
        part: off
        for (topic, part), off in TrendWriter(redis.Redis.from_url(server.url), s.topics.group)
        .positions()
        .items()
        if topic == s.topics.input
    }
    ahead = {p: (c, applied.get(p, -1)) for p, c in during.items() if c > applied.get(p, -1) + 1}
    assert not ahead, f"offsets committed while their counts were not applied: {ahead}"
    s.recover_s.append(s.recovered(since))
    assert all(p.poll() is None for p in s.fleet.procs.values()), "a worker died on the outage"
    s.finish()


@pytest.mark.parametrize("overlap", ["off", "on"])
def test_rebalance_storm_replicas_added_and_removed_while_posts_flow(
    overlap, fx, stack, kafka_bootstrap
):
    # overlap on: partitions are revoked while batches are in flight on the inference thread
    # (the GPU engines' loop, run here on the CPU engine)
    stack[2].env["CARSTREAM_OVERLAP"] = overlap
    label = "rebalance-storm" + ("-overlapped" if overlap == "on" else "")
    s = Scenario(fx, stack, kafka_bootstrap, label, posts=480, seed=14)
    rng = random.Random(14)
    s.feeder.every_s = 0.4  # posts keep flowing through the whole storm
    s.start(replicas=1)
    steps = ["add", "add", "term", "add", "kill", "add", "term"] * fx.SOAK_FACTOR
    n = len(s.posts)
    for i, step in enumerate(steps):
        s.wait_progress((i + 1) * n // (len(steps) + 2))
        if step == "add" or len(s.fleet.alive()) < 2:
            s.fleet.start()  # joins pile up: adds do not wait for the previous rebalance
        elif step == "term":
            # Removing a member while others are still joining stalls the group on Tansu for
            # good (docs/faults.md), and a replica still starting has no SIGTERM handler yet:
            # removals wait until every live replica has joined.
            _wait_all_joined(s)
            name = _pick(s.fleet, rng)
            assert s.fleet.terminate(name) == 0, f"{name} did not drain cleanly on SIGTERM"
        else:
            _wait_all_joined(s)
            s.fleet.kill(_pick(s.fleet, rng))
        s.injected += 1
        s.recover_s.append(s.recovered(s.committed()))
    s.finish(replicas_started=len(s.fleet.procs))


def test_broker_unreachable_workers_retry_and_recover_without_restart(fx, proxied_stack):
    """Tansu is memory-only, so it is not restarted: every client reaches it through a TCP
    proxy (Tansu advertises the proxy's address), and the proxy is cut and restored."""
    stack, bootstrap, proxy = proxied_stack
    s = Scenario(fx, stack, bootstrap, "broker-unreachable", posts=360, seed=15)
    s.feeder.every_s = 0.05  # produce most posts before the cut; the rest wait in the producer
    s.start()
    s.wait_progress(len(s.posts) // 4)
    pids = {n: p.pid for n, p in s.fleet.procs.items()}
    marks = {n: len(s.fleet.log(n)) for n in pids}
    since = s.committed()
    proxy.cut()
    s.injected += 1
    deadline = time.monotonic() + 60
    # out long enough that every replica saw the broker go and its session could expire
    while not all("ECONNREFUSED" in s.fleet.log(n)[marks[n] :] for n in pids):
        assert time.monotonic() < deadline, "workers never noticed the broker was gone"
        assert all(p.poll() is None for p in s.fleet.procs.values()), "a worker exited"
        s.feeder.join(timeout=0.3)
    outage_t0 = time.monotonic()
    # the fault's length (not a wait for a condition): past the 6 s session timeout
    while time.monotonic() < outage_t0 + 7:
        assert all(p.poll() is None for p in s.fleet.procs.values()), "a worker exited"
        s.feeder.join(timeout=0.3)
    proxy.restore()
    s.recover_s.append(s.recovered(since))  # from the restore until every partition moved
    s.finish()
    assert {n: p.pid for n, p in s.fleet.procs.items()} == pids, "a worker was restarted"
    assert all(p.poll() is None for p in s.fleet.procs.values())


# --- the suite can fail -----------------------------------------------------------------


def _records(topic: str, n: int) -> tuple[list[TrendRecord], dict, dict]:
    makes = [("Audi", "A4"), ("BMW", "X5"), ("Citroen", "C3")]
    now = datetime.now(UTC)
    recs, by_post, city_of = [], {}, {}
    for i in range(n):
        make, model = makes[i % 3]
        city = ["Paris", "Lyon", None][i % 3]
        recs.append(TrendRecord(topic, i % 2, i, now, make, model, city))
        by_post[f"p{i}"] = {"make": make, "model": model, "status": "ok"}
        city_of[f"p{i}"] = city
    return recs, by_post, city_of


def test_exactly_once_check_has_teeth(fx, redis_server):
    """Redelivery through the real script keeps the counts exact; with the offset check removed
    from a copy of the script, or the applied-offset hash deleted, the same check fails."""
    client = redis.Redis.from_url(redis_server.url)
    recs, by_post, city_of = _records("teeth", 30)

    writer = TrendWriter(client, "g-real")
    assert writer.apply(recs).applied == 30
    assert writer.apply(recs).ignored == 30  # a redelivered batch changes nothing
    fx.check_counts(redis_server.url, by_post, city_of)

    # 1) the same batch through a copy of the Lua without the offset check
    unchecked = APPLY_BATCH_LUA.replace("if offset <= position then", "if false then")
    assert unchecked != APPLY_BATCH_LUA, "the offset check moved: update this test"
    client.flushdb()
    broken = TrendWriter(client, "g-broken")
    broken._script = client.register_script(unchecked)
    broken.apply(recs)
    broken.apply(recs)  # a redelivery after a crash
    with pytest.raises(AssertionError, match="off by 100"):
        fx.check_counts(redis_server.url, by_post, city_of)

    # 2) the real script, but the applied positions lost between the two deliveries
    client.flushdb()
    writer.apply(recs)
    client.delete(applied_key("g-real"))
    writer.apply(recs)
    with pytest.raises(AssertionError, match="off by"):
        fx.check_counts(redis_server.url, by_post, city_of)
    client.close()
