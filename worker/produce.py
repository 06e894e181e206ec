"""Publish post events to the input topic: sample images as posts, or raw JSON lines.

`python -m worker produce --images DIR` wraps every image under DIR in a post event of
DESIGN.md (post_id, image_b64, posted_at = now, city, platform), keyed by post_id;
`--jsonl FILE` sends each line as given (hostile inputs included), so the same tool is the
demo feeder and the load generator. A token bucket on time.monotonic paces `--rate`.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import logging
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from training.cli_errors import fail, first_validation_error

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"})
DEFAULT_PLATFORM = "carstream-produce"


class TokenBucket:
    """Allows `rate` events per second on average, bursts up to `burst`; rate 0 = no limit."""

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate < 0:
            raise ValueError(f"rate must be >= 0, got {rate}")
        self.rate = rate
        self.capacity = max(1.0, burst if burst is not None else rate / 10)
        self._tokens = self.capacity
        self._clock = clock
        self._sleep = sleep
        self._last = clock()

    def acquire(self) -> None:
        """Take one token, sleeping until one has accrued."""
        if self.rate == 0:
            return
        while True:
            now = self._clock()
            self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens >= 1 - 1e-9:  # tolerance: float clocks may fall a hair short
                self._tokens = max(0.0, self._tokens - 1)
                return
            self._sleep((1 - self._tokens) / self.rate)


def rfc3339_now() -> str:
    """Current UTC time as RFC 3339 with milliseconds and a Z suffix."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def build_event(
    image: bytes,
    city: str | None = None,
    platform: str = DEFAULT_PLATFORM,
    post_id: str | None = None,
    posted_at: str | None = None,
) -> dict[str, Any]:
    """A post event of DESIGN.md's input schema carrying the image inline as base64."""
    event: dict[str, Any] = {
        "post_id": post_id or uuid.uuid4().hex,
        "image_b64": base64.b64encode(image).decode("ascii"),
        "posted_at": posted_at or rfc3339_now(),
        "platform": platform,
    }
    if city:
        event["city"] = city
    return event


def find_images(root: Path) -> list[Path]:
    """Image files under `root` (recursively), in a stable order."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


@dataclass(frozen=True, slots=True)
class Message:
    """One Kafka message to send."""

    key: bytes | None
    value: bytes


def image_messages(
    images: Sequence[Path],
    cities: Sequence[str],
    platform: str,
    count: int | None,
) -> Iterator[Message]:
    """Post events from the images (cycled when `count` exceeds them), cities round-robin."""
    city_cycle = itertools.cycle(cities) if cities else itertools.repeat(None)
    source = itertools.cycle(images) if count is not None else iter(images)
    for path in itertools.islice(source, count):
        event = build_event(path.read_bytes(), next(city_cycle), platform)
        yield Message(event["post_id"].encode(), json.dumps(event).encode())


def jsonl_messages(path: Path, count: int | None) -> Iterator[Message]:
    """Each non-blank line as given; keyed by its post_id when it is a JSON object with one."""
    with path.open("rb") as lines:
        stripped = (line.rstrip(b"\r\n") for line in lines)
        for line in itertools.islice((ln for ln in stripped if ln.strip()), count):
            yield Message(_post_id_key(line), line)


def _post_id_key(line: bytes) -> bytes | None:
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    post_id = obj.get("post_id") if isinstance(obj, dict) else None
    return post_id.encode() if isinstance(post_id, str) else None


@dataclass
class SendReport:
    """What a produce run achieved."""

    sent: int = 0
    failed: int = 0
    seconds: float = 0.0


def send_all(
    producer: Any,
    topic: str,
    messages: Iterator[Message],
    bucket: TokenBucket,
    flush_timeout_s: float = 60.0,
) -> SendReport:
    """Send every message at the bucket's pace, then flush; counts acknowledged vs failed."""
    report = SendReport()
    started = time.monotonic()

    def ok(_metadata: Any) -> None:
        report.sent += 1

    def failed(exc: BaseException) -> None:
        report.failed += 1
        logger.warning("send failed: %s", exc)

    for message in messages:
        bucket.acquire()
        future = producer.send(topic, value=message.value, key=message.key)
        future.add_callback(ok)
        future.add_errback(failed)
    producer.flush(timeout=flush_timeout_s)
    report.seconds = time.monotonic() - started
    return report


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Publish car post events to Kafka (demo feeder and load generator).",
        add_help=add_help,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, help="directory of images, one post per image")
    source.add_argument("--jsonl", type=Path, help="file of events, one JSON line each, sent as is")
    parser.add_argument(
        "--rate", type=float, default=0.0, help="events per second (0 = as fast as possible)"
    )
    parser.add_argument(
        "--city",
        action="append",
        default=[],
        help="city of the posts; repeat to spread posts round-robin over several",
    )
    parser.add_argument("--platform", default=DEFAULT_PLATFORM, help="platform field of the posts")
    parser.add_argument(
        "--count",
        type=int,
        default=None,
        help="events to send; images are cycled to reach it (default: each image/line once)",
    )
    parser.add_argument(
        "--bootstrap-servers", default=None, help="Kafka brokers (default: worker settings)"
    )
    parser.add_argument("--topic", default=None, help="topic (default: the worker's input topic)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def main(args: argparse.Namespace) -> int:
    """CLI edge: validate, build the producer from the worker's Kafka settings, report."""
    if args.rate < 0:
        return fail(f"--rate {args.rate}: must be >= 0")
    if args.count is not None and args.count < 1:
        return fail(f"--count {args.count}: must be at least 1")
    if args.images is not None:
        if not args.images.is_dir():
            return fail(f"--images {args.images}: not a directory")
        images = find_images(args.images)
        if not images:
            return fail(f"--images {args.images}: no image files found")
        messages = image_messages(images, args.city, args.platform, args.count)
    else:
        if not args.jsonl.is_file():
            return fail(f"--jsonl {args.jsonl}: not a readable file")
        messages = jsonl_messages(args.jsonl, args.count)

    from kafka import KafkaProducer
    from kafka.errors import KafkaError
    from pydantic import ValidationError

    from worker.connections import kafka_common_config
    from worker.settings import WorkerSettings

    overrides = {"bootstrap_servers": args.bootstrap_servers} if args.bootstrap_servers else {}
    try:
        settings = WorkerSettings(**overrides)
    except ValidationError as exc:
        return fail(f"settings: {first_validation_error(exc)}")
    topic = args.topic or settings.input_topic
    try:
        producer = KafkaProducer(
            **kafka_common_config(settings),
            acks="all",
            linger_ms=20,
            max_request_size=16 * 1024 * 1024,
        )
    except KafkaError as exc:
        print(f"error: cannot reach Kafka at {settings.bootstrap_servers}: {exc}", file=sys.stderr)
        return 1
    try:
        report = send_all(producer, topic, messages, TokenBucket(args.rate))
    finally:
        producer.close()
    rate = report.sent / report.seconds if report.seconds else 0.0
    if args.json:
        print(
            json.dumps(
                {
                    "topic": topic,
                    "sent": report.sent,
                    "failed": report.failed,
                    "seconds": round(report.seconds, 3),
                }
            )
        )
    else:
        print(
            f"sent={report.sent} failed={report.failed} topic={topic} "
            f"seconds={report.seconds:.2f} rate={rate:.1f}/s"
        )
    return 0 if report.failed == 0 else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main(get_args_parser().parse_args()))
