"""The producer: token bucket and event building (pure), the CLI against the real broker."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition
from PIL import Image

from worker.produce import TokenBucket, build_event, find_images, jsonl_messages
from worker.stack import create_topics


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.t += seconds


def test_token_bucket_paces_to_the_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=20, burst=1, clock=clock, sleep=clock.sleep)
    for _ in range(41):
        bucket.acquire()
    assert clock.t - 100.0 == pytest.approx(2.0, abs=1e-6)  # 1 free + 40 at 20/s


def test_token_bucket_allows_bursts_then_waits() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10, burst=5, clock=clock, sleep=clock.sleep)
    for _ in range(5):
        bucket.acquire()
    assert clock.t == 100.0
    bucket.acquire()
    assert clock.t == pytest.approx(100.1)


def test_zero_rate_never_waits() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=0, clock=clock, sleep=clock.sleep)
    for _ in range(1000):
        bucket.acquire()
    assert clock.t == 100.0


def test_build_event_matches_the_input_schema() -> None:
    event = build_event(b"\x89PNG...", city="Lyon", platform="x")
    assert set(event) == {"post_id", "image_b64", "posted_at", "platform", "city"}
    assert base64.b64decode(event["image_b64"]) == b"\x89PNG..."
    assert event["posted_at"].endswith("Z")
    posted = datetime.fromisoformat(event["posted_at"].replace("Z", "+00:00"))
    assert abs(datetime.now(UTC) - posted) < timedelta(seconds=5)
    assert build_event(b"x")["post_id"] != build_event(b"x")["post_id"]
    assert "city" not in build_event(b"x")


def test_jsonl_lines_pass_through_unchanged(tmp_path: Path) -> None:
    lines = [b'{"post_id": "a1", "image_url": "http://x"}', b"not json", b"", b'["list"]']
    path = tmp_path / "e.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    messages = list(jsonl_messages(path, None))
    assert [m.value for m in messages] == [lines[0], lines[1], lines[3]]
    assert [m.key for m in messages] == [b"a1", None, None]
    assert len(list(jsonl_messages(path, 2))) == 2


def _images(root: Path, n: int) -> list[Path]:
    root.mkdir(parents=True)
    paths = []
    for i in range(n):
        path = root / f"sub{i % 2}" / f"car{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(path)
        paths.append(path)
    (root / "notes.txt").write_text("not an image")
    return paths


def _produce(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", "produce", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _consume(bootstrap: str, topic: str, expected: int, timeout_s: float = 30.0) -> list:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        consumer.assign(partitions)
        consumer.seek_to_beginning()
        records: list = []
        deadline = time.monotonic() + timeout_s
        while len(records) < expected and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()


@pytest.mark.integration
def test_produce_images_round_trip(kafka_bootstrap: str, tmp_path: Path) -> None:
    create_topics(kafka_bootstrap, ["produce-images"], 2)
    paths = _images(tmp_path / "imgs", 3)
    result = _produce(
        "--images", str(tmp_path / "imgs"), "--city", "Paris", "--city", "Lyon",
        "--count", "5", "--rate", "200", "--topic", "produce-images",
        "--bootstrap-servers", kafka_bootstrap, "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["sent"] == 5
    records = _consume(kafka_bootstrap, "produce-images", 5)
    assert len(records) == 5
    events = [json.loads(r.value) for r in records]
    assert all(r.key.decode() == e["post_id"] for r, e in zip(records, events, strict=True))
    assert len({e["post_id"] for e in events}) == 5
    assert sorted(e["city"] for e in events) == ["Lyon", "Lyon", "Paris", "Paris", "Paris"]
    sent = sorted(base64.b64decode(e["image_b64"]) for e in events)
    files = [p.read_bytes() for p in sorted(paths)]
    assert sent == sorted(files + files[:2])  # 3 images cycled to 5 posts
    assert find_images(tmp_path / "imgs") == sorted(paths)


@pytest.mark.integration
def test_produce_jsonl_round_trip(kafka_bootstrap: str, tmp_path: Path) -> None:
    create_topics(kafka_bootstrap, ["produce-jsonl"], 1)
    lines = [
        json.dumps({"post_id": f"p{i}", "image_url": "https://example.com/x.jpg"}) for i in range(3)
    ]
    lines.append("{broken")
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(lines) + "\n")
    result = _produce(
        "--jsonl", str(path), "--topic", "produce-jsonl", "--bootstrap-servers", kafka_bootstrap
    )
    assert result.returncode == 0, result.stderr
    assert "sent=4 failed=0" in result.stdout
    records = _consume(kafka_bootstrap, "produce-jsonl", 4)
    assert [r.value.decode() for r in records] == lines
    assert [r.key for r in records] == [b"p0", b"p1", b"p2", None]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--images", "/nonexistent/dir"], "/nonexistent/dir"),
        (["--jsonl", "/nonexistent/e.jsonl"], "/nonexistent/e.jsonl"),
        (["--images", ".", "--rate", "-1"], "--rate -1"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args: list[str], needle: str) -> None:
    result = _produce(*args)
    assert result.returncode == 2
    assert needle in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
