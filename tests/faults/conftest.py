"""Fault and hostile-input suites: a real Tansu broker, real redis-servers, worker subprocesses.

Patterns are those of tests/worker/test_worker_integration.py, copied here (pytest runs in
importlib mode, so test files cannot import each other): the helpers are exposed through the
``fx`` fixture, which is this module.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import redis
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition

from tests.support import CLASSES, IMAGE_SIZE, image_bytes, missing_tool  # noqa: F401 (fx.* for tests)
from worker.stack import (
    RedisServer,
    StackError,
    TansuBroker,
    create_topics,
    free_port,
    redis_server_available,
)
from worker.trends import TrendReader

REPO = Path(__file__).resolve().parents[2]
CITIES = ["Paris", "Lyon", "Berlin", "Madrid", None]
PARTITIONS = 6
SOAK = int(os.environ.get("CARSTREAM_SOAK", "0") or 0)
SOAK_FACTOR = max(1, SOAK * 5) if SOAK else 1


# --- servers -------------------------------------------------------------------------------


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server with AOF persistence, so a test may stop and restart it."""
    if not redis_server_available():
        missing_tool("redis-server is not installed (make setup installs it)")
    server = RedisServer(tmp_path / "redis", free_port(), appendonly=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# --- model bundle --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def bundle_dir(worker_bundle_dir: Path) -> Path:
    return worker_bundle_dir


# --- topics, workers -----------------------------------------------------------------------


class Topics:
    def __init__(self, bootstrap: str, partitions: int = PARTITIONS) -> None:
        tag = uuid.uuid4().hex[:8]
        self.input, self.output, self.dlq = f"posts-{tag}", f"preds-{tag}", f"posts-{tag}.dlq"
        self.group = f"workers-{tag}"
        self.partitions = partitions
        create_topics(bootstrap, [self.input, self.output, self.dlq], partitions)


class Fleet:
    """Worker subprocesses of one test; all are killed at teardown."""

    def __init__(self, env: dict, log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}
        self._n = 0

    def start(self, name: str | None = None, **extra_env: str) -> str:
        self._n += 1
        name = name or f"w{self._n}"
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "worker", "run"],
            env={**self.env, **extra_env, "CARSTREAM_WORKER_ID": name},
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        return name

    def alive(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.poll() is None]

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def kill(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait(timeout=30)

    def terminate(self, name: str, timeout: float = 60) -> int:
        self.procs[name].send_signal(signal.SIGTERM)
        return self.procs[name].wait(timeout=timeout)

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
            p.wait(timeout=30)


def worker_env(bootstrap: str, redis_url: str, topics: Topics, bundle: Path, **extra) -> dict:
    return {
        **os.environ,
        "CARSTREAM_BOOTSTRAP_SERVERS": bootstrap,
        "CARSTREAM_REDIS_URL": redis_url,
        "CARSTREAM_GROUP_ID": topics.group,
        "CARSTREAM_INPUT_TOPIC": topics.input,
        "CARSTREAM_OUTPUT_TOPIC": topics.output,
        "CARSTREAM_DLQ_TOPIC": topics.dlq,
        "CARSTREAM_BUNDLE": str(bundle),
        "CARSTREAM_BACKEND": "onnxruntime",
        "CARSTREAM_INFERENCE_THREADS": "1",
        "CARSTREAM_DECODE_THREADS": "2",
        "CARSTREAM_MAX_BATCH": "8",
        "CARSTREAM_MAX_WAIT_MS": "50",
        "CARSTREAM_SESSION_TIMEOUT_MS": "6000",
        "CARSTREAM_METRICS_PORT": "0",
        "CARSTREAM_URL_FETCH_ENABLED": "false",
        "CARSTREAM_LOG_LEVEL": "INFO",
        "PYTHONPATH": str(REPO),
        **{k: str(v) for k, v in extra.items()},
    }


@pytest.fixture
def stack(kafka_bootstrap, redis_server, bundle_dir, tmp_path):
    """Fresh topics, a fresh AOF Redis and a worker fleet: (topics, redis_server, fleet)."""
    topics = Topics(kafka_bootstrap)
    fleet = Fleet(worker_env(kafka_bootstrap, redis_server.url, topics, bundle_dir), tmp_path)
    try:
        yield topics, redis_server, fleet
    finally:
        fleet.close()


# --- posts ---------------------------------------------------------------------------------


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def good_posts(n: int, seed: int = 0, prefix: str = "post") -> list[tuple[str, bytes, str | None]]:
    """(post_id, message bytes, city) of small valid PNG posts with known cities."""
    rng = np.random.default_rng(seed)
    posts = []
    for i in range(n):
        post_id = f"{prefix}-{seed}-{i}"
        city = CITIES[i % len(CITIES)]
        event = {
            "post_id": post_id,
            "image_b64": base64.b64encode(image_bytes(rng, size=(24, 32))).decode(),
            "posted_at": now_rfc3339(),
            "platform": "test",
        }
        if city:
            event["city"] = city
        posts.append((post_id, json.dumps(event).encode(), city))
    return posts


def producer(bootstrap: str) -> KafkaProducer:
    return KafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_request_size=32 * 1024 * 1024
    )


def produce(bootstrap: str, topic: str, messages: list[tuple[bytes | None, bytes | None]]):
    p = producer(bootstrap)
    futures = [p.send(topic, key=k, value=v) for k, v in messages]
    p.flush()
    for f in futures:
        f.get(timeout=30)
    p.close()


class Reader:
    """Incremental reader of a whole topic (all partitions, from the beginning)."""

    def __init__(self, bootstrap: str, topic: str, partitions: int = PARTITIONS) -> None:
        self.consumer = KafkaConsumer(
            bootstrap_servers=bootstrap,
            enable_auto_commit=False,
            fetch_max_bytes=64 * 1024 * 1024,
            max_partition_fetch_bytes=32 * 1024 * 1024,
        )
        parts = [TopicPartition(topic, p) for p in range(partitions)]
        self.consumer.assign(parts)
        self.consumer.seek_to_beginning(*parts)
        self.records: list = []

    def poll(self, timeout_ms: int = 300) -> list:
        for batch in self.consumer.poll(timeout_ms=timeout_ms).values():
            self.records.extend(batch)
        return self.records

    def until(
        self, cond: Callable[[list], bool], deadline_s: float, procs=None, what: str = ""
    ) -> list:
        deadline = time.monotonic() + deadline_s
        while not cond(self.records):
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {deadline_s}s waiting for {what or cond}")
            if procs is not None and not any(p.poll() is None for p in procs.values()):
                pytest.fail(f"every worker exited: {[p.returncode for p in procs.values()]}")
            self.poll()
        return self.records

    def close(self) -> None:
        self.consumer.close()


def distinct_keys(records) -> int:
    return len({r.key for r in records})


def committed(bootstrap: str, topics: Topics) -> dict[int, int]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        parts = [TopicPartition(topics.input, p) for p in range(topics.partitions)]
        offsets = admin.list_group_offsets({topics.group: parts})[topics.group]
        return {tp.partition: om.offset for tp, om in offsets.items() if om is not None}
    finally:
        admin.close()


def end_offsets(bootstrap: str, topics: Topics) -> dict[int, int]:
    probe = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        parts = [TopicPartition(topics.input, p) for p in range(topics.partitions)]
        return {tp.partition: off for tp, off in probe.end_offsets(parts).items()}
    finally:
        probe.close()


def wait_no_lag(bootstrap: str, topics: Topics, deadline_s: float = 60) -> float:
    """Polls until every partition's committed offset reached its end; returns seconds taken."""
    started = time.monotonic()
    end = end_offsets(bootstrap, topics)
    got: dict[int, int] = {}
    while time.monotonic() < started + deadline_s:
        got = committed(bootstrap, topics)
        if all(got.get(p, 0) >= e for p, e in end.items() if e > 0):
            return time.monotonic() - started
        time.sleep(0.3)
    pytest.fail(f"consumer group still lags: committed {got}, end {end}")


def results_by_post_id(records) -> tuple[dict[str, dict], int]:
    """Distinct results per post and the number of duplicates; a repeat must be identical."""
    out: dict[str, dict] = {}
    dupes = 0
    for rec in records:
        value = json.loads(rec.value)
        assert rec.key.decode() == value["post_id"]
        prev = out.setdefault(value["post_id"], value)
        if prev is not value:
            dupes += 1
            assert (prev["make"], prev["model"], prev["source"], prev["posted_at"]) == (
                value["make"],
                value["model"],
                value["source"],
                value["posted_at"],
            ), f"a duplicate result for {value['post_id']} differs from the first"
    return out, dupes


def truth_counts(by_post: dict, city_of: dict) -> dict:
    ok = [(pid, r) for pid, r in by_post.items() if r["status"] == "ok"]
    truth = {
        "make": Counter(r["make"] for _, r in ok),
        "model": Counter(f"{r['make']}|{r['model']}" for _, r in ok),
    }
    for city in sorted({c for c in city_of.values() if c}):
        truth[f"make@{city}"] = Counter(r["make"] for pid, r in ok if city_of[pid] == city)
        truth[f"model@{city}"] = Counter(
            f"{r['make']}|{r['model']}" for pid, r in ok if city_of[pid] == city
        )
    return {k: dict(v) for k, v in truth.items()}


def redis_counts(url: str, cities) -> dict:
    client = redis.Redis.from_url(url)
    try:
        reader = TrendReader(client)
        got = {
            "make": dict(reader.top(60, by="make", top=1000)),
            "model": dict(reader.top(60, by="model", top=1000)),
        }
        for city in sorted({c for c in cities if c}):
            got[f"make@{city}"] = dict(reader.top(60, by="make", city=city, top=1000))
            got[f"model@{city}"] = dict(reader.top(60, by="model", city=city, top=1000))
        return got
    finally:
        client.close()


def counts_off_by(truth: dict, got: dict) -> int:
    """Sum over every (dimension, member) of |redis - truth|."""
    off = 0
    for dim in set(truth) | set(got):
        t, g = truth.get(dim, {}), got.get(dim, {})
        off += sum(abs(t.get(m, 0) - g.get(m, 0)) for m in set(t) | set(g))
    return off


def check_counts(url: str, by_post: dict, city_of: dict) -> None:
    truth = truth_counts(by_post, city_of)
    got = redis_counts(url, city_of.values())
    assert got == truth, f"Redis counts off by {counts_off_by(truth, got)}"


def record_row(row: dict) -> None:
    """Append one results-table row (docs/faults.md) to $CARSTREAM_FAULTS_REPORT if set."""
    path = os.environ.get("CARSTREAM_FAULTS_REPORT")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps(row) + "\n")


@pytest.fixture(scope="session")
def fx():
    """This module: the helpers above, for test files (importlib mode cannot import them)."""
    return sys.modules[__name__]


# --- a broker behind a TCP proxy that can be cut ---------------------------------------------


class CuttableProxy:
    """TCP forwarder 127.0.0.1:port -> 127.0.0.1:target; ``cut`` drops every connection and
    refuses new ones (the broker is unreachable), ``restore`` listens again on the same port."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self._conns: list = []
        self._lock = threading.Lock()
        self._listener = None
        self.restore()

    def restore(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        self._listener = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def _accept(self, listener) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self.cut()


class ProxiedTansu(TansuBroker):
    """Tansu listening on its port but advertising the proxy's, so every client goes through it."""

    def __init__(self, state_dir: Path, port: int, advertised_port: int) -> None:
        super().__init__(state_dir, port)
        self.advertised_port = advertised_port

    def argv(self) -> list[str]:
        argv = super().argv()
        i = argv.index("--advertised-listener-url")
        argv[i + 1] = f"tcp://127.0.0.1:{self.advertised_port}"
        return argv


@pytest.fixture
def proxied_broker(tmp_path: Path) -> Iterator[tuple[str, CuttableProxy]]:
    """(bootstrap via the proxy, the proxy) of a fresh Tansu reachable only through the proxy."""
    port = free_port()
    proxy = CuttableProxy(port)
    broker = ProxiedTansu(tmp_path / "tansu", port, proxy.port)
    try:
        broker.start()
    except StackError as exc:
        proxy.close()
        pytest.fail(f"could not start the Tansu broker: {exc}")
    try:
        yield f"127.0.0.1:{proxy.port}", proxy
    finally:
        proxy.close()
        broker.stop()


@pytest.fixture
def proxied_stack(proxied_broker, redis_server, bundle_dir, tmp_path):
    bootstrap, proxy = proxied_broker
    topics = Topics(bootstrap)
    fleet = Fleet(worker_env(bootstrap, redis_server.url, topics, bundle_dir), tmp_path)
    try:
        yield (topics, redis_server, fleet), bootstrap, proxy
    finally:
        fleet.close()
