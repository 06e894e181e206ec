"""Hostile inputs against a running worker: every bad post lands in the DLQ once, byte for byte,
with the expected error kind; good posts interleaved with them are classified and counted
exactly; the worker stays up.

The corpus is generated here: image formats and broken images, decompression bombs, broken
bytes and JSON, schema violations, oversized events and refused URLs (loopback, private,
link-local, metadata, numeric, file:, ftp:, a name resolving to loopback, redirects), plus slow,
endless, failing and looping responses from a local HTTP server.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from worker.dead_letter import parse_dlq_headers

pytestmark = pytest.mark.integration

GOOD_POSTS = 40
DEADLINE_S = 50


# --- corpus pieces -------------------------------------------------------------------------


def _pixels(seed: int, size=(24, 32)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, size=(*size, 3)).astype(np.uint8)


def _encode(fmt: str, seed: int = 0, size=(24, 32)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_pixels(seed, size)).save(buf, format=fmt)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a few bytes of data): a decompression bomb."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )


def gif_claiming(width: int, height: int) -> bytes:
    screen = struct.pack("<HHBBB", width, height, 0, 0, 0)
    frame = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00;"
    return b"GIF89a" + screen + frame


def psd_like() -> bytes:
    header = b"8BPS" + struct.pack(">H", 1) + b"\0" * 6 + struct.pack(">HIIHH", 3, 16, 16, 8, 3)
    return header + struct.pack(">I", 0) * 3 + struct.pack(">H", 0) + b"\0" * (16 * 16 * 3)


def event(post_id: str, now: str, **fields) -> bytes:
    return json.dumps({"post_id": post_id, "posted_at": now, **fields}).encode()


def b64_event(post_id: str, data: bytes, now: str, **fields) -> bytes:
    return event(post_id, now, image_b64=base64.b64encode(data).decode(), **fields)


def url_event(post_id: str, url: str, now: str) -> bytes:
    return event(post_id, now, image_url=url)


# --- a local HTTP server with hostile routes -----------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    png = _encode("PNG", seed=99)

    def log_message(self, *args) -> None:  # keep pytest output quiet
        pass

    def _send(self, code: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path == "/img.png":
                self._send(200, self.png, {"Content-Type": "image/png"})
            elif path == "/redirect-good":
                self._send(302, headers={"Location": "/img.png"})
            elif path == "/redirect-metadata":
                self._send(302, headers={"Location": "http://169.254.169.254/latest/meta-data"})
            elif path == "/redirect-file":
                self._send(302, headers={"Location": "file:///etc/passwd"})
            elif path == "/loop":
                self._send(302, headers={"Location": "/loop"})
            elif path == "/404":
                self._send(404, b"nope")
            elif path == "/html":
                self._send(200, b"<html>not an image</html>", {"Content-Type": "text/html"})
            elif path == "/huge-length":
                self.send_response(200)
                self.send_header("Content-Length", str(10**10))
                self.end_headers()
                self.wfile.write(b"\0" * 1024)
            elif path == "/endless":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.end_headers()
                chunk = b"\x89PNG" + b"\0" * (64 * 1024 - 4)
                for _ in range(100_000):  # ~6 GB, far past any cap: the client hangs up first
                    self.wfile.write(chunk)
            elif path == "/drip":
                self.send_response(200)
                self.send_header("Content-Length", "100")
                self.end_headers()
                for _ in range(100):  # one byte every 0.1 s: 10 s for the body, deadline is 1 s
                    self.wfile.write(b"\0")
                    self.wfile.flush()
                    time.sleep(0.1)
            elif path == "/slow-headers":
                time.sleep(3)
                self._send(200, self.png)
            else:
                self._send(404)
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass  # the worker hung up, as it should


@pytest.fixture
def http_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# --- the run + checks shared by the tests --------------------------------------------------


def run_corpus(
    fx,
    stack,
    kafka_bootstrap,
    bad: dict,
    good: list,
    deadline_s: float = DEADLINE_S,
    bad_first: bool = False,
    before_good: str | None = None,
    **worker_env,
) -> dict:
    """Produce good and bad posts interleaved, run one worker, check everything; returns stats.

    ``bad_first``: the bad posts alone first, and the good ones once all are dead-lettered and
    (``before_good``) this text is in the worker's log."""
    topics, redis_server, fleet = stack
    messages = [(pid.encode(), raw) for pid, raw, _ in good]
    bad_messages = [(key.encode(), raw) for key, (raw, _kind) in bad.items()]
    if not bad_first:
        step = max(1, len(messages) // max(1, len(bad)))
        for i, message in enumerate(bad_messages):
            messages.insert(min(len(messages), 1 + i * (step + 1)), message)
    fx.produce(kafka_bootstrap, topics.input, bad_messages if bad_first else messages)

    started = time.monotonic()
    name = fleet.start("hostile", **worker_env)
    proc = fleet.procs[name]
    results = fx.Reader(kafka_bootstrap, topics.output, topics.partitions)
    dlq = fx.Reader(kafka_bootstrap, topics.dlq, topics.partitions)
    try:
        if bad_first:
            dlq.until(lambda recs: len(recs) >= len(bad), deadline_s, fleet.procs, "dead letters")
            deadline = time.monotonic() + deadline_s
            while before_good is not None and before_good not in fleet.log(name):
                assert time.monotonic() < deadline, f"no {before_good!r} in the worker's log"
                time.sleep(0.1)
            fx.produce(kafka_bootstrap, topics.input, messages)
        results.until(
            lambda recs: fx.distinct_keys(recs) >= len(good), deadline_s, fleet.procs, "results"
        )
        dlq.until(lambda recs: len(recs) >= len(bad), deadline_s, fleet.procs, "dead letters")
        fx.wait_no_lag(kafka_bootstrap, topics, deadline_s=30)
        results.poll(500)
        dlq.poll(500)
    finally:
        results.close()
        dlq.close()

    by_post, dupes = fx.results_by_post_id(results.records)
    assert set(by_post) == {pid for pid, _, _ in good}
    assert dupes == 0, "a single healthy worker repeated results"

    seen = {}
    for rec in dlq.records:
        key = rec.key.decode()
        assert key not in seen, f"{key} dead-lettered twice"
        seen[key] = rec
    assert set(seen) == set(bad)
    wrong = {}
    for key, (raw, kind) in bad.items():
        rec = seen[key]
        headers = parse_dlq_headers(rec.headers)
        assert rec.value == raw, f"{key}: DLQ bytes differ from what was sent"
        assert headers["error_reason"], key
        assert headers["source_topic"] == topics.input
        assert headers["worker_id"] == name
        if headers["error_kind"] != kind:
            wrong[key] = (kind, headers["error_kind"], headers["error_reason"][:120])
    assert not wrong, f"unexpected error kinds (expected, got, reason): {wrong}"

    fx.check_counts(redis_server.url, by_post, {pid: city for pid, _, city in good})
    assert proc.poll() is None, f"the worker died on hostile input:\n{fleet.log(name)[-3000:]}"
    assert fleet.terminate(name) == 0
    return {"results": len(by_post), "dlq": len(dlq.records), "seconds": time.monotonic() - started}


def good_mix(fx, n: int, seed: int) -> list:
    """n plain PNG posts plus JPEG, GIF, WEBP, BMP and data-URI posts (all valid)."""
    now = fx.now_rfc3339()
    good = fx.good_posts(n, seed=seed, prefix="good")
    for i, fmt in enumerate(["JPEG", "GIF", "WEBP", "BMP"]):
        pid = f"good-{fmt.lower()}"
        good.append((pid, b64_event(pid, _encode(fmt, seed=i), now, city="Paris"), "Paris"))
    uri = "data:image/png;base64," + base64.b64encode(_encode("PNG", seed=7)).decode()
    good.append(("good-data-uri", event("good-data-uri", now, image_b64=uri), None))
    return good


# --- tests ---------------------------------------------------------------------------------


def test_hostile_corpus_is_dead_lettered_and_good_posts_are_unaffected(
    fx, stack, kafka_bootstrap, http_server
):
    now = fx.now_rfc3339()
    jpeg, png = _encode("JPEG"), _encode("PNG")
    deep = "[" * 5000 + "]" * 5000
    port = http_server.rsplit(":", 1)[1]
    bad: dict[str, tuple[bytes, str]] = {
        # image bytes
        "truncated-jpeg": (b64_event("b1", jpeg[: len(jpeg) // 2], now), "truncated_image"),
        "truncated-png": (b64_event("b2", png[: len(png) // 2], now), "truncated_image"),
        "zero-byte-image": (event("b3", now, image_b64=""), "not_an_image"),
        "text-as-image": (b64_event("b4", b"just some text, no pixels", now), "not_an_image"),
        "jpeg-header-only": (b64_event("b5", jpeg[:20], now), "not_an_image"),
        "tiff": (b64_event("b6", _encode("TIFF"), now), "unsupported_format"),
        "ico": (b64_event("b7", _encode("ICO"), now), "unsupported_format"),
        "psd-like": (b64_event("b8", psd_like(), now), "unsupported_format"),
        "tga": (b64_event("b9", _encode("TGA"), now), "unsupported_format"),
        "png-bomb-100k": (
            b64_event("b10", png_claiming(100_000, 100_000), now),
            "decompression_bomb",
        ),
        "png-bomb-9000": (b64_event("b11", png_claiming(9000, 9000), now), "decompression_bomb"),
        "gif-huge-dims": (b64_event("b12", gif_claiming(65535, 65535), now), "decompression_bomb"),
        # bytes and JSON
        "malformed-json": (b'{"post_id": "b13", "image_b64": ', "invalid_json"),
        "empty-value": (b"", "invalid_json"),
        "invalid-utf8": (b'{"post_id": "\xff\xfe", "x": "\xc3\x28"}', "invalid_utf8"),
        "json-array": (b'[{"post_id": "b14"}]', "schema"),
        "json-number": (b"42", "schema"),
        "json-null": (b"null", "schema"),
        "json-string": (b'"a post"', "schema"),
        "nested-5000": (deep.encode(), "invalid_json"),
        "nested-in-field": (
            ('{"post_id": "b15", "x": ' + "{" * 5000 + "}" * 5000 + "}").encode(),
            "invalid_json",
        ),
        # schema
        "missing-post-id": (json.dumps({"image_b64": "AAAA", "posted_at": now}).encode(), "schema"),
        "post-id-129": (b64_event("p" * 129, png, now), "schema"),
        "both-images": (
            event("b16", now, image_b64=base64.b64encode(png).decode(), image_url="https://a.b/c"),
            "schema",
        ),
        "neither-image": (event("b17", now), "schema"),
        "naive-posted-at": (b64_event("b18", png, "2026-01-01T12:00:00"), "schema"),
        "numeric-posted-at": (
            json.dumps({"post_id": "b19", "image_b64": "AAAA", "posted_at": 1700000000}).encode(),
            "schema",
        ),
        "post-id-number": (b64_event("x", png, now).replace(b'"x"', b"12345"), "schema"),
        # a Go client's zero time, and datetime's edges: these once overflowed the trend
        # bucket arithmetic after the results were published, crash-looping every replica
        "go-zero-posted-at": (b64_event("b35", png, "0001-01-01T00:00:00Z"), "schema"),
        "year-1-with-offset": (b64_event("b36", png, "0001-01-01T00:00:00+01:00"), "schema"),
        "year-9999-behind-utc": (b64_event("b37", png, "9999-12-31T23:59:59-01:00"), "schema"),
        "epoch-string-posted-at": (b64_event("b38", png, "1700000000"), "schema"),
        # base64
        "bad-base64": (event("b20", now, image_b64="!!!not*base64==="), "bad_base64"),
        "data-uri-not-base64": (event("b21", now, image_b64="data:image/png,%89PNG"), "bad_base64"),
        # URLs, refused before any connection
        "url-file": (url_event("b22", "file:///etc/passwd", now), "url_refused"),
        "url-ftp": (url_event("b23", "ftp://example.com/car.jpg", now), "url_refused"),
        "url-loopback": (url_event("b24", "http://127.0.0.1/car.jpg", now), "url_refused"),
        "url-ipv6-loopback": (url_event("b25", "http://[::1]/car.jpg", now), "url_refused"),
        "url-metadata": (
            url_event("b26", "http://169.254.169.254/latest/meta-data", now),
            "url_refused",
        ),
        "url-private-10": (url_event("b27", "http://10.0.0.1/car.jpg", now), "url_refused"),
        "url-private-192": (url_event("b28", "http://192.168.1.1/car.jpg", now), "url_refused"),
        "url-decimal-ip": (url_event("b29", "http://2130706433/", now), "url_refused"),
        "url-hex-ip": (url_event("b30", "http://0x7f.1/", now), "url_refused"),
        "url-mapped-v6": (url_event("b31", "http://[::ffff:127.0.0.1]/", now), "url_refused"),
        "url-localhost-name": (
            url_event("b32", f"http://localhost:{port}/img.png", now),
            "url_refused",
        ),
        "url-credentials": (url_event("b33", "http://user:pw@example.com/x", now), "url_refused"),
        "url-local-redirect": (
            url_event("b34", f"{http_server}/redirect-metadata", now),
            "url_refused",
        ),
    }
    good = good_mix(fx, GOOD_POSTS, seed=3)
    assert len(bad) >= 30
    stats = run_corpus(
        fx,
        stack,
        kafka_bootstrap,
        bad,
        good,
        CARSTREAM_URL_FETCH_ENABLED="true",
        CARSTREAM_MAX_MESSAGE_BYTES="1048576",
    )
    fx.record_row({"fault": "hostile corpus", "kinds": len(bad), "posts": len(good), **stats})


def test_slow_endless_failing_and_looping_urls_from_a_local_server(
    fx, stack, kafka_bootstrap, http_server
):
    """Private addresses allowed (the only way to reach a local server): the limits still hold."""
    now = fx.now_rfc3339()
    closed = fx.free_port()
    bad = {
        "url-endless-body": (url_event("u1", f"{http_server}/endless", now), "too_large"),
        "url-huge-length": (url_event("u2", f"{http_server}/huge-length", now), "too_large"),
        "url-slow-drip": (url_event("u3", f"{http_server}/drip", now), "url_fetch_failed"),
        "url-slow-headers": (
            url_event("u4", f"{http_server}/slow-headers", now),
            "url_fetch_failed",
        ),
        "url-404": (url_event("u5", f"{http_server}/404", now), "url_fetch_failed"),
        "url-redirect-loop": (url_event("u6", f"{http_server}/loop", now), "url_refused"),
        "url-redirect-file": (url_event("u7", f"{http_server}/redirect-file", now), "url_refused"),
        "url-html": (url_event("u8", f"{http_server}/html", now), "not_an_image"),
        "url-connection-refused": (
            url_event("u9", f"http://127.0.0.1:{closed}/img.png", now),
            "url_fetch_failed",
        ),
    }
    good = fx.good_posts(20, seed=4, prefix="good")
    good.append(("url-good", url_event("url-good", f"{http_server}/img.png", now), None))
    good.append(
        ("url-redirected", url_event("url-redirected", f"{http_server}/redirect-good", now), None)
    )
    started = time.monotonic()
    stats = run_corpus(
        fx,
        stack,
        kafka_bootstrap,
        bad,
        good,
        CARSTREAM_URL_FETCH_ENABLED="true",
        CARSTREAM_URL_ALLOW_PRIVATE="true",
        CARSTREAM_URL_TIMEOUT_S="1",
        CARSTREAM_URL_MAX_BYTES="1048576",
    )
    assert time.monotonic() - started < 60
    fx.record_row({"fault": "hostile URLs (local server)", "kinds": len(bad), **stats})


def test_event_over_max_message_bytes_is_dead_lettered_not_blocking(fx, stack, kafka_bootstrap):
    """A 20 MB event with max_message_bytes = 1 MiB: DLQ'd as too_large, the partition moves on."""
    now = fx.now_rfc3339()
    big = b64_event("big", np.random.default_rng(0).bytes(15 * 1024 * 1024), now)
    assert len(big) > 20 * 1024 * 1024 - 1024 * 1024
    bad = {"event-20mb": (big, "too_large")}
    good = fx.good_posts(10, seed=5, prefix="good")
    stats = run_corpus(
        fx, stack, kafka_bootstrap, bad, good, deadline_s=20, CARSTREAM_MAX_MESSAGE_BYTES="1048576"
    )
    fx.record_row({"fault": "20 MB event", **stats})


def test_a_decode_past_decode_timeout_s_is_dead_lettered_and_the_partition_goes_on(
    fx, stack, kafka_bootstrap
):
    """A legal but slow image (a half-transparent 64-megapixel PNG: ~0.7 s to decode and
    composite on a 2-core Xeon, scratch timing) against a 0.25 s decode deadline stands for an
    input no check foresaw that makes a decoder spin. The margins go both ways: a machine ~3x
    faster still overruns the deadline, and a good post's decode (milliseconds) must stall a
    quarter of a second on a loaded CI to be written off (at 0.1 s with an opaque PNG, ~0.3 s,
    one was, once). The deadline is enforced while the loop waits for a post, so the slow post
    goes alone first, where the loop waits for it at once: interleaved with good posts on a
    loaded CI, its decode once finished while the loop was busy with the batch before, and was
    classified."""
    now = fx.now_rfc3339()
    big = io.BytesIO()
    Image.new("RGBA", (7999, 7999), (90, 120, 200, 128)).save(big, "PNG", compress_level=9)
    bad = {"slow-decode": (b64_event("slow-decode", big.getvalue(), now), "decode_timeout")}
    good = fx.good_posts(12, seed=6, prefix="good")
    stats = run_corpus(
        fx,
        stack,
        kafka_bootstrap,
        bad,
        good,
        deadline_s=60,
        bad_first=True,
        # the written-off decode ends before the good posts come: until then it competes with
        # their decodes, which a 0.1 s deadline could write off too on a loaded machine
        before_good="returned at last",
        CARSTREAM_URL_FETCH_ENABLED="false",
        CARSTREAM_DECODE_TIMEOUT_S="0.25",
    )
    fx.record_row({"fault": "decode past decode_timeout_s", **stats})
