"""The worker end to end: real Tansu broker, real redis-server, `python -m worker run` replicas.

The truth for each good post is what the bundle's engine says for it (computed here through the
same prepare + engine path); the tests check delivery and counting, not model accuracy: every
post has exactly one distinct result, Redis counts equal the tally of those results by make,
model and city, every bad post sits in the DLQ byte for byte with its reason, and nothing is
left uncommitted.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import redis
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition

from tests.support import image_bytes
from worker.dead_letter import parse_dlq_headers
from worker.stack import create_topics
from worker.trends import TrendReader

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CITIES = ["Paris", "Lyon", "Berlin", None]
PARTITIONS = 4
LOG_SECRET = "sasl-Secret-never-logged"


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def bundle_dir(worker_bundle_dir: Path) -> Path:
    return worker_bundle_dir


@pytest.fixture(scope="session")
def truth_engine(bundle_dir):
    from engine_build.bundle import load_bundle
    from engine_build.runtime import create_engine

    bundle = load_bundle(bundle_dir)
    engine = create_engine(bundle, "onnxruntime", threads=1)
    yield bundle.manifest, engine
    engine.close()


def expected_label(raw: bytes, truth_engine) -> tuple[str, str]:
    from worker.postprocess import classify
    from worker.prepare import prepare
    from worker.url_fetch import UrlPolicy

    manifest, engine = truth_engine
    prep = prepare(raw, manifest.preprocess, UrlPolicy(), 10 * 1024 * 1024)
    assert prep.error is None, prep.error
    c = classify(engine.infer(prep.array[None]), 5, 0.0)[0]
    label = manifest.labels[c.index]
    return label.make, label.model


class Topics:
    def __init__(self, bootstrap: str) -> None:
        tag = uuid.uuid4().hex[:8]
        self.input, self.output, self.dlq = f"posts-{tag}", f"preds-{tag}", f"posts-{tag}.dlq"
        self.group = f"workers-{tag}"
        create_topics(bootstrap, [self.input, self.output, self.dlq], PARTITIONS)


# Redis has 16 databases: each test takes the next one (flushed first, and the tests of one
# pytest process run one at a time with their workers stopped at teardown), cycling so that a
# 16th test reuses database 1 instead of failing at setup
_db_counter = itertools.cycle(range(1, 16))


@pytest.fixture
def env(kafka_bootstrap, redis_url, bundle_dir):
    """Fresh topics, a fresh Redis database, and the worker's environment for them."""
    topics = Topics(kafka_bootstrap)
    url = redis_url.rsplit("/", 1)[0] + f"/{next(_db_counter)}"
    redis.Redis.from_url(url).flushdb()
    worker_env = {
        **os.environ,
        "CARSTREAM_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "CARSTREAM_REDIS_URL": url,
        "CARSTREAM_GROUP_ID": topics.group,
        "CARSTREAM_INPUT_TOPIC": topics.input,
        "CARSTREAM_OUTPUT_TOPIC": topics.output,
        "CARSTREAM_DLQ_TOPIC": topics.dlq,
        "CARSTREAM_BUNDLE": str(bundle_dir),
        "CARSTREAM_BACKEND": "onnxruntime",
        "CARSTREAM_INFERENCE_THREADS": "1",
        "CARSTREAM_DECODE_THREADS": "2",
        "CARSTREAM_MAX_BATCH": "8",
        "CARSTREAM_MAX_WAIT_MS": "50",
        "CARSTREAM_SESSION_TIMEOUT_MS": "6000",
        "CARSTREAM_METRICS_PORT": "0",
        "CARSTREAM_URL_FETCH_ENABLED": "false",
        "CARSTREAM_SASL_PASSWORD": LOG_SECRET,  # set (unused on PLAINTEXT): must never be logged
        "PYTHONPATH": str(REPO),
    }
    procs: list[subprocess.Popen] = []
    yield topics, url, worker_env, procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=30)


def start_worker(worker_env: dict, procs: list, name: str, log_dir: Path) -> subprocess.Popen:
    log = open(log_dir / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "run"],
        env={**worker_env, "CARSTREAM_WORKER_ID": name},
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    procs.append(proc)
    return proc


def wait_all_hold_partitions(log_dir: Path, names: list[str], procs: list, deadline_s=120.0):
    """Wait until each named worker's latest assignment (its log) holds a partition: only then
    do all of them share the posts produced next, whatever the machine's load."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        latest = {}
        for name in names:
            lines = [
                ln
                for ln in (log_dir / f"{name}.log").read_text(errors="replace").splitlines()
                if "partitions assigned: " in ln
            ]
            latest[name] = lines[-1] if lines else ""
        if all(ln and not ln.endswith("partitions assigned: []") for ln in latest.values()):
            return
        assert all(p.poll() is None for p in procs), "a worker exited while joining"
        time.sleep(0.2)
    raise AssertionError(f"not every worker holds a partition after {deadline_s} s: {latest}")


def good_posts(n: int, seed: int = 0) -> list[tuple[str, bytes, str | None]]:
    rng = np.random.default_rng(seed)
    posts = []
    for i in range(n):
        post_id = f"post-{seed}-{i}"
        city = CITIES[i % len(CITIES)]
        event = {
            "post_id": post_id,
            "image_b64": base64.b64encode(image_bytes(rng)).decode(),
            "posted_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "platform": "test",
        }
        if city:
            event["city"] = city
        posts.append((post_id, json.dumps(event).encode(), city))
    return posts


def produce(bootstrap: str, topic: str, messages: list[tuple], headers: dict | None = None):
    """Send (key, value) pairs; ``headers`` maps a message's index to its Kafka headers."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    futures = [
        producer.send(topic, key=k, value=v, headers=(headers or {}).get(i))
        for i, (k, v) in enumerate(messages)
    ]
    producer.flush()
    for f in futures:
        f.get(timeout=30)
    producer.close()


def consume_all(bootstrap: str, topic: str, until, deadline_s: float, procs=()) -> list:
    """Read a topic from the start until ``until(records)`` holds or the deadline passes.

    Fails at once when every worker in ``procs`` has exited (its log says why).
    """
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, consumer_timeout_ms=500
    )
    parts = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    records: list = []
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline and not until(records):
        if procs and all(p.poll() is not None for p in procs):
            pytest.fail(f"every worker exited: {[p.returncode for p in procs]}")
        for batch in consumer.poll(timeout_ms=500).values():
            records.extend(batch)
    consumer.close()
    return records


def read_to_end(bootstrap: str, topic: str, deadline_s: float = 60) -> list:
    """Every record of a topic that is no longer being written, up to its end offsets."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    parts = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    try:
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        end = consumer.end_offsets(parts)
        records: list = []
        deadline = time.monotonic() + deadline_s
        while any(consumer.position(tp) < end[tp] for tp in parts):
            if time.monotonic() > deadline:
                pytest.fail(f"{topic}: read {len(records)} records, not to its end {end}")
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()


def wait_no_lag(bootstrap: str, topics: Topics, deadline_s: float = 60) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    probe = KafkaConsumer(bootstrap_servers=bootstrap)
    parts = [TopicPartition(topics.input, p) for p in range(PARTITIONS)]
    end = probe.end_offsets(parts)
    deadline = time.monotonic() + deadline_s
    committed = {}
    try:
        while time.monotonic() < deadline:
            offsets = admin.list_group_offsets({topics.group: parts})[topics.group]
            committed = {tp: om.offset for tp, om in offsets.items() if om is not None}
            if all(committed.get(tp, 0) >= end[tp] for tp in parts if end[tp] > 0):
                return
            time.sleep(0.3)
    finally:
        admin.close()
        probe.close()
    pytest.fail(f"consumer group still lags: committed {committed}, end {end}")


def check_counts(url: str, results_by_post: dict, city_of: dict) -> None:
    reader = TrendReader(redis.Redis.from_url(url))
    makes = Counter(r["make"] for r in results_by_post.values() if r["status"] == "ok")
    models = Counter(
        f"{r['make']}|{r['model']}" for r in results_by_post.values() if r["status"] == "ok"
    )
    assert dict(reader.top(60, by="make", top=1000)) == dict(makes)
    assert dict(reader.top(60, by="model", top=1000)) == dict(models)
    for city in {c for c in city_of.values() if c}:
        in_city = Counter(
            r["make"]
            for pid, r in results_by_post.items()
            if city_of[pid] == city and r["status"] == "ok"
        )
        assert dict(reader.top(60, by="make", city=city, top=1000)) == dict(in_city), city


def results_by_post_id(records) -> dict[str, dict]:
    """Distinct results per post; a repeat must be the same answer."""
    out: dict[str, dict] = {}
    for rec in records:
        value = json.loads(rec.value)
        assert rec.key.decode() == value["post_id"]
        prev = out.setdefault(value["post_id"], value)
        assert (prev["make"], prev["model"], prev["source"]) == (
            value["make"],
            value["model"],
            value["source"],
        ), "a duplicate result differs from the first"
    return out


def one_worker_results(
    kafka_bootstrap: str,
    topics: Topics,
    worker_env: dict,
    procs: list,
    log_dir: Path,
    expected: set[str],
) -> dict[str, dict]:
    """Start one worker and wait until it has published a result for every post in ``expected``
    (and for no other)."""
    start_worker(worker_env, procs, "w1", log_dir)
    results = consume_all(
        kafka_bootstrap,
        topics.output,
        lambda recs: {r.key.decode() for r in recs} >= expected,
        deadline_s=120,
        procs=procs,
    )
    by_post = results_by_post_id(results)
    assert set(by_post) == expected
    return by_post


# --- tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overlap", "instances"),
    [("off", 1), ("on", 1), ("auto", 2)],
    ids=["serial", "overlapped", "two-instances"],
)
def test_every_post_one_result_and_exact_counts_with_bad_input_dead_lettered(
    overlap, instances, env, kafka_bootstrap, truth_engine, tmp_path
):
    topics, url, worker_env, procs = env
    worker_env["CARSTREAM_OVERLAP"] = overlap  # auto is off on one CPU engine, on for two
    worker_env["CARSTREAM_ENGINE_INSTANCES"] = str(instances)
    posts = good_posts(40)
    rng = np.random.default_rng(5)
    png = image_bytes(rng)
    now = datetime.now(UTC).isoformat()
    bad = {
        "invalid_utf8": b"\xff\xfe\x00garbage",
        "invalid_json": b'{"post_id": "x",',
        "schema": json.dumps({"post_id": "", "image_b64": "", "posted_at": now}).encode(),
        "bad_base64": json.dumps(
            {"post_id": "b1", "image_b64": "!!!notbase64", "posted_at": now}
        ).encode(),
        "not_an_image": json.dumps(
            {"post_id": "b2", "image_b64": base64.b64encode(b"hello").decode(), "posted_at": now}
        ).encode(),
        "truncated_image": json.dumps(
            {
                "post_id": "b3",
                "image_b64": base64.b64encode(png[: len(png) // 2]).decode(),
                "posted_at": now,
            }
        ).encode(),
        "url_refused": json.dumps(
            {"post_id": "b4", "image_url": "http://127.0.0.1/x.jpg", "posted_at": now}
        ).encode(),
    }
    messages = [(pid.encode(), raw) for pid, raw, _ in posts]
    # interleave the bad ones between good posts
    for i, raw in enumerate(bad.values()):
        messages.insert(3 + i * 5, (f"bad-{i}".encode(), raw))
    trace = [("trace-id", b"t-123"), ("carstream.error_kind", b"stale")]
    produce(kafka_bootstrap, topics.input, messages, headers={3 + 1 * 5: trace})

    start_worker(worker_env, procs, "w1", tmp_path)
    results = consume_all(
        kafka_bootstrap,
        topics.output,
        lambda recs: len({r.key for r in recs}) >= len(posts),
        deadline_s=120,
        procs=procs,
    )
    by_post = results_by_post_id(results)
    assert set(by_post) == {pid for pid, _, _ in posts}

    for pid, raw, _ in posts:
        assert (by_post[pid]["make"], by_post[pid]["model"]) == expected_label(raw, truth_engine)

    dead = consume_all(kafka_bootstrap, topics.dlq, lambda recs: len(recs) >= len(bad), 60)
    assert len(dead) == len(bad)
    got = {parse_dlq_headers(r.headers)["error_kind"]: r for r in dead}
    assert set(got) == set(bad)
    for kind, raw in bad.items():
        headers = parse_dlq_headers(got[kind].headers)
        assert got[kind].value == raw  # byte for byte
        assert headers["error_reason"]
        assert headers["source_topic"] == topics.input
        assert headers["worker_id"] == "w1"
    # the producer's own headers stay on the dead letter; an old carstream verdict does not
    assert got["invalid_json"].headers[0] == ("trace-id", b"t-123")
    assert [k for k, _ in got["invalid_json"].headers].count("carstream.error_kind") == 1

    wait_no_lag(kafka_bootstrap, topics)
    # one healthy worker, no redelivery: one result per post, not merely every post_id
    assert len(read_to_end(kafka_bootstrap, topics.output)) == len(posts)
    check_counts(url, by_post, {pid: city for pid, _, city in posts})
    assert procs[0].poll() is None, "the worker died on bad input"

    procs[0].send_signal(signal.SIGTERM)
    assert procs[0].wait(timeout=60) == 0
    log_text = (tmp_path / "w1.log").read_text()
    assert "settings:" in log_text and LOG_SECRET not in log_text
    loop = "overlapped" if (overlap, instances) != ("off", 1) else "serial"
    assert f"loop: {loop}" in log_text and f"x {instances}, max batch 8;" in log_text


@pytest.mark.parametrize("overlap", ["off", "on"])
def test_two_replicas_split_partitions_and_a_killed_one_loses_nothing(
    overlap, env, kafka_bootstrap, tmp_path
):
    topics, url, worker_env, procs = env
    worker_env["CARSTREAM_OVERLAP"] = overlap  # auto is off on this CPU engine
    first = good_posts(60, seed=1)
    start_worker(worker_env, procs, "w1", tmp_path)
    start_worker(worker_env, procs, "w2", tmp_path)
    # both in the group before any post: on a loaded machine the first to join could otherwise
    # take every post before the second is assigned a partition (seen with 4 pytest workers)
    wait_all_hold_partitions(tmp_path, ["w1", "w2"], procs)
    produce(kafka_bootstrap, topics.input, [(p.encode(), raw) for p, raw, _ in first])

    # wait until some results exist, then kill -9 one replica mid-stream
    consume_all(kafka_bootstrap, topics.output, lambda recs: len(recs) >= 10, 120, procs)
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait(timeout=30)
    second = good_posts(60, seed=2)
    produce(kafka_bootstrap, topics.input, [(p.encode(), raw) for p, raw, _ in second])
    start_worker(worker_env, procs, "w1-restarted", tmp_path)

    every = first + second
    results = consume_all(
        kafka_bootstrap,
        topics.output,
        lambda recs: len({r.key for r in recs}) >= len(every),
        deadline_s=180,
        procs=procs,
    )
    by_post = results_by_post_id(results)
    assert set(by_post) == {pid for pid, _, _ in every}
    workers = {r["worker_id"] for r in by_post.values()}
    assert len(workers) >= 2, f"one replica did all the work: {workers}"

    wait_no_lag(kafka_bootstrap, topics, deadline_s=90)
    check_counts(url, by_post, {pid: city for pid, _, city in every})


def test_a_post_re_sent_by_its_producer_gets_a_result_each_time_and_is_counted_once(
    env, kafka_bootstrap, tmp_path
):
    topics, url, worker_env, procs = env
    posts = good_posts(6, seed=3)
    resent = posts[0]
    # the producer timed out waiting for its ack and sent post 0 again: a new offset, same post_id
    messages = [(p.encode(), raw) for p, raw, _ in posts] + [(resent[0].encode(), resent[1])]
    produce(kafka_bootstrap, topics.input, messages)
    start_worker(worker_env, procs, "w1", tmp_path)
    results = consume_all(
        kafka_bootstrap, topics.output, lambda recs: len(recs) >= len(messages), 120, procs
    )
    values = [json.loads(r.value) for r in results]
    copies = [v for v in values if v["post_id"] == resent[0]]
    # the results topic is unchanged: one result per record, both keyed by the post_id
    assert len(copies) == 2 and len({v["source"]["offset"] for v in copies}) == 2
    assert (copies[0]["make"], copies[0]["model"]) == (copies[1]["make"], copies[1]["model"])
    wait_no_lag(kafka_bootstrap, topics)
    by_post = {v["post_id"]: v for v in values}  # what the counts must equal: each post once
    check_counts(url, by_post, {pid: city for pid, _, city in posts})
    assert redis.Redis.from_url(url).exists(f"carstream:trends:seen:{resent[0]}")


def serve_and_stop(env, kafka_bootstrap, tmp_path, posts) -> tuple[dict, str]:
    """Produce ``posts``, run one worker until each has a result, check nothing is left
    uncommitted and Redis counts equal the results, stop it with SIGTERM (exit 0); return the
    results by post_id and the worker's log."""
    topics, url, worker_env, procs = env
    produce(kafka_bootstrap, topics.input, [(p.encode(), raw) for p, raw, _ in posts])
    start_worker(worker_env, procs, "w1", tmp_path)
    results = consume_all(
        kafka_bootstrap, topics.output, lambda recs: len(recs) >= len(posts), 120, procs
    )
    by_post = results_by_post_id(results)
    assert set(by_post) == {pid for pid, _, _ in posts}
    wait_no_lag(kafka_bootstrap, topics)
    check_counts(url, by_post, {pid: city for pid, _, city in posts})
    procs[0].send_signal(signal.SIGTERM)
    assert procs[0].wait(timeout=60) == 0
    return by_post, (tmp_path / "w1.log").read_text()


def test_an_int8_worker_runs_the_bundles_quantised_model_and_logs_its_parity(
    env, kafka_bootstrap, bundle_dir, tmp_path
):
    from engine_build.bundle import load_bundle
    from engine_build.runtime import create_engine

    worker_env = env[2]
    worker_env["CARSTREAM_ONNX_PRECISION"] = "int8"
    bundle = load_bundle(bundle_dir)
    int8 = create_engine(bundle, "onnxruntime", precision="int8", threads=1)
    posts = good_posts(12, seed=11)
    by_post, log_text = serve_and_stop(env, kafka_bootstrap, tmp_path, posts)
    for pid, raw, _ in posts:  # the int8 model's own answers, not the fp32 model's
        assert (by_post[pid]["make"], by_post[pid]["model"]) == expected_label(
            raw, (bundle.manifest, int8)
        )
    agreement = bundle.parity["artifacts"]["onnxruntime-int8"]["top1_agreement"]
    assert "on onnxruntime-int8 x 1" in log_text
    assert f"onnxruntime-int8: top-1 agreement with PyTorch {agreement}" in log_text
    int8.close()


def _native_bf16() -> str | None:
    from engine_build.runtime.torch_cpu import native_bf16

    return native_bf16()


@pytest.mark.skipif(
    _native_bf16() is None,
    reason="this CPU has neither AMX nor AVX-512 BF16: the torch-cpu bf16 worker refuses here",
)
def test_a_torch_cpu_bf16_worker_with_two_instances_counts_exactly(
    env, kafka_bootstrap, bundle_dir, tmp_path
):
    from engine_build.bundle import load_bundle
    from engine_build.runtime import create_engine

    worker_env = env[2]
    worker_env["CARSTREAM_BACKEND"] = "torch-cpu"
    worker_env["CARSTREAM_ENGINE_INSTANCES"] = "2"
    bundle = load_bundle(bundle_dir)
    bf16 = create_engine(bundle, "torch-cpu", threads=1)
    posts = good_posts(24, seed=13)
    by_post, log_text = serve_and_stop(env, kafka_bootstrap, tmp_path, posts)
    # bfloat16's own answers; oneDNN may pick other kernels per batch size, so a near tie can
    # fall either way between a batch of one here and the worker's batches
    same = sum(
        (by_post[pid]["make"], by_post[pid]["model"])
        == expected_label(raw, (bundle.manifest, bf16))
        for pid, raw, _ in posts
    )
    assert same >= len(posts) - 2
    assert "on torch-cpu-bf16 x 2" in log_text and "loop: overlapped" in log_text
    # the test bundle was built without --precision bf16: the worker says its cost is unmeasured
    assert "torch-cpu-bf16: the bundle's parity.json has no entry for it" in log_text
    bf16.close()


class _NotUtf8HeaderKey(str):
    """A header key whose bytes are not UTF-8, as a librdkafka producer (C strings) can send;
    kafka-python's producer only takes str, so its encoding is overridden."""

    def encode(self, *args, **kwargs) -> bytes:
        return b"\xff\xfe-key"


def test_a_record_the_kafka_client_cannot_parse_is_dead_lettered_not_blocking(
    env, kafka_bootstrap, tmp_path
):
    topics, _, worker_env, procs = env
    posts = good_posts(12, seed=7)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    sent = []
    for i, (pid, raw, _) in enumerate(posts):
        sent.append(producer.send(topics.input, key=pid.encode(), value=raw, partition=0))
        if i == 5:  # kafka-python's consumer raises CorruptRecordError on this one, for ever
            headers = [(_NotUtf8HeaderKey("x"), b"v")]
            bad = producer.send(topics.input, key=b"bad", value=b"{}", partition=0, headers=headers)
            sent.append(bad)
    producer.flush()
    bad_offset = bad.get(timeout=30).offset
    for future in sent:
        future.get(timeout=30)
    producer.close()

    expected = {pid for pid, _, _ in posts}
    one_worker_results(kafka_bootstrap, topics, worker_env, procs, tmp_path, expected)
    (dead,) = consume_all(kafka_bootstrap, topics.dlq, lambda recs: len(recs) >= 1, 60)
    headers = parse_dlq_headers(dead.headers)
    assert headers["error_kind"] == "corrupt_record"
    assert (headers["source_partition"], headers["source_offset"]) == ("0", str(bad_offset))
    assert dead.value == b""  # the client cannot read the original bytes
    wait_no_lag(kafka_bootstrap, topics)
    assert procs[0].poll() is None


def test_records_after_an_unparseable_one_in_its_batch_are_dead_lettered_then_reading_goes_on(
    env, kafka_bootstrap, tmp_path
):
    """A fetch returns whole record batches and kafka-python parses one from its start, so the
    records behind the bad one in the same batch are unreadable too; later batches are not."""
    topics, _, worker_env, procs = env
    posts = good_posts(8, seed=8)
    producer = KafkaProducer(
        bootstrap_servers=kafka_bootstrap, acks="all", linger_ms=500, batch_size=4 << 20
    )
    batch = [
        producer.send(topics.input, key=p.encode(), value=raw, partition=1)
        for p, raw, _ in posts[:3]
    ]
    headers = [(_NotUtf8HeaderKey("x"), b"v")]
    batch.append(producer.send(topics.input, key=b"bad", value=b"{}", partition=1, headers=headers))
    batch += [
        producer.send(topics.input, key=p.encode(), value=raw, partition=1)
        for p, raw, _ in posts[3:6]
    ]
    producer.flush()
    offsets = [f.get(timeout=30).offset for f in batch]
    later = [
        producer.send(topics.input, key=p.encode(), value=raw, partition=1)
        for p, raw, _ in posts[6:]
    ]
    producer.flush()
    for f in later:
        f.get(timeout=30)
    producer.close()

    readable = {pid for pid, _, _ in posts[:3] + posts[6:]}
    one_worker_results(kafka_bootstrap, topics, worker_env, procs, tmp_path, readable)
    dead = consume_all(kafka_bootstrap, topics.dlq, lambda recs: len(recs) >= 4, 60)
    got = sorted(int(parse_dlq_headers(r.headers)["source_offset"]) for r in dead)
    assert got == offsets[3:]  # the bad record and the three behind it in its batch
    assert {parse_dlq_headers(r.headers)["error_kind"] for r in dead} == {"corrupt_record"}
    wait_no_lag(kafka_bootstrap, topics)


@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4", "zstd"])
def test_posts_compressed_by_the_producer_are_read(codec, env, kafka_bootstrap, tmp_path):
    """Producers (and brokers) may compress batches with any Kafka codec; without the codec's
    library kafka-python cannot read the batch, and the worker stopped on it."""
    topics, _, worker_env, procs = env
    posts = good_posts(4, seed=9)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, compression_type=codec)
    for pid, raw, _ in posts:
        producer.send(topics.input, key=pid.encode(), value=raw)
    producer.flush()
    producer.close()
    expected = {pid for pid, _, _ in posts}
    one_worker_results(kafka_bootstrap, topics, worker_env, procs, tmp_path, expected)


def test_a_batch_whose_compressed_payload_does_not_decode_is_dead_lettered(
    env, kafka_bootstrap, tmp_path, monkeypatch
):
    """A gzip-labelled batch whose payload is not gzip (its CRC is valid: the producer computes
    it over what it sends) raised BadGzipFile from poll, outside kafka-python's error wrapping:
    the worker exited, and crash-looped on the same batch after every restart."""
    import kafka.record.default_records as default_records

    topics, _, worker_env, procs = env
    posts = good_posts(3, seed=10)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, compression_type="gzip")
    producer.send(topics.input, key=posts[0][0].encode(), value=posts[0][1], partition=2).get(30)
    with monkeypatch.context() as patch:
        patch.setattr(default_records, "gzip_encode", lambda data: b"\x1f\x8bnot-gzip")
        bad = producer.send(topics.input, key=b"z", value=b"x" * 200, partition=2).get(30).offset
    for pid, raw, _ in posts[1:]:
        producer.send(topics.input, key=pid.encode(), value=raw, partition=2).get(30)
    producer.close()

    expected = {pid for pid, _, _ in posts}
    one_worker_results(kafka_bootstrap, topics, worker_env, procs, tmp_path, expected)
    (dead,) = consume_all(kafka_bootstrap, topics.dlq, lambda recs: len(recs) >= 1, 60)
    headers = parse_dlq_headers(dead.headers)
    assert headers["error_kind"] == "corrupt_record" and headers["source_offset"] == str(bad)
    wait_no_lag(kafka_bootstrap, topics)
    assert procs[0].poll() is None
