"""Prometheus metrics and the /metrics, /healthz, /readyz endpoints.

A registry per worker (not the global one) so tests can run several workers in one process.
Liveness means the loop is still turning; readiness means the engine is warm and the consumer
has joined its group at least once (holding partitions or not: a replica beyond the partition
count holds none, and must not hold up a rollout for it). It stays set through later rebalances.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import get_args

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from worker.errors import ErrorKind
from worker.schemas import Prediction

log = logging.getLogger(__name__)

# a probe or scrape sends its request at once; a connection silent this long is dropped
CLIENT_IDLE_S = 10.0

# from 0.25 ms: a TensorRT batch should take a few ms (an unmeasured estimate: no GPU has been
# lent yet) and a GPU-decoded image's CPU part ~0.3 ms (benchmarks/results/sim_gpu_decode),
# which a first bucket of 5 ms would hide
_LATENCY_BUCKETS = (
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
)  # fmt: skip
# how old a post is when its result goes out: seconds in the steady state, hours in a backlog
_AGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 21600)
# the default registry's process (memory, CPU, open files), Python and GC collectors, which a
# registry of one's own leaves out
_RUNTIME_COLLECTORS = (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR)
# what the workers' retries count: a label value appears at 0 from the start, so an
# `increase()` alert sees its first event
RETRY_TARGETS = ("kafka", "redis")


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        for collector in _RUNTIME_COLLECTORS:  # stateless: each collect() reads the process now
            r.register(collector)
        self.consumed = Counter("carstream_consumed", "records consumed", registry=r)
        self.results = Counter("carstream_results", "results published", ["status"], registry=r)
        self.dead_letters = Counter(
            "carstream_dead_letters", "records sent to the DLQ", ["kind"], registry=r
        )
        self.dead_letters_dropped = Counter(
            "carstream_dead_letters_dropped",
            "bad records the DLQ refused even cut down (logged, committed, not in the DLQ)",
            ["kind"],
            registry=r,
        )
        self.batch_size = Histogram(
            "carstream_batch_size",
            "records per flushed batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=r,
        )
        self.decode_seconds = Histogram(
            "carstream_decode_seconds",
            "decode+preprocess time per image",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "carstream_inference_seconds",
            "engine time per batch",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.end_to_end_seconds = Histogram(
            "carstream_end_to_end_seconds",
            "from consumption until its result is published and counted (the offset commit "
            "follows), per record",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.record_age_seconds = Histogram(
            "carstream_record_age_seconds",
            "from the record's Kafka timestamp (its producer's send time, or the broker's append "
            "time) until its result or dead letter is published, per record: the wait in the "
            "topic included, which end_to_end_seconds leaves out",
            buckets=_AGE_BUCKETS,
            registry=r,
        )
        self.lag = Gauge(
            "carstream_lag",
            "records of the partition not committed yet: its end offset minus this worker's "
            "last commit (or the first offset it read); the end offset comes from fetches, or "
            "from the broker every few seconds while the loop does not fetch",
            ["partition"],
            registry=r,
        )
        self.last_commit = Gauge(
            "carstream_last_commit_timestamp_seconds",
            "Unix time of this worker's last offset commit (its start until the first): with "
            "carstream_lag > 0, a stuck worker",
            registry=r,
        )
        self.last_commit.set_to_current_time()
        self.retries = Counter(
            "carstream_retries", "retried Kafka/Redis operations", ["target"], registry=r
        )
        self.ready = Gauge("carstream_ready", "1 when the worker is ready", registry=r)
        self.trends_ignored = Counter(
            "carstream_trend_records_ignored",
            "records the trends writer ignored as at or below the partition's stored applied "
            "offset: a redelivery after a crash or rebalance (counted before), or, in a long run "
            "(logged as a WARNING), a recreated topic or reset offsets (never counted)",
            registry=r,
        )
        self.trend_duplicates = Counter(
            "carstream_trend_duplicates",
            "posts not counted because their post_id was counted within the dedup window",
            registry=r,
        )
        self.engine_info = Gauge(
            "carstream_engine_info",
            "1 for the engine this worker runs (backend-precision) and the bundle's model",
            ["engine", "model", "version"],
            registry=r,
        )
        self.url_host_pauses = Counter(
            "carstream_url_host_pauses",
            "image origins (scheme://host:port) paused by the breaker after url_host_timeouts "
            "timeouts in a row (their posts dead-lettered without a fetch for url_host_pause_s)",
            registry=r,
        )
        self.decode_threads_written_off = Gauge(
            "carstream_decode_threads_written_off",
            "decode threads given up on past decode_timeout_s and still running",
            registry=r,
        )
        # labelled counters exist from the start, at 0, for every value the worker uses
        for status in get_args(Prediction.model_fields["status"].annotation):
            self.results.labels(status)
        for kind in get_args(ErrorKind):
            self.dead_letters.labels(kind)
            self.dead_letters_dropped.labels(kind)
        for target in RETRY_TARGETS:
            self.retries.labels(target)
        self._last_beat = time.monotonic()
        self._ready = False

    def beat(self) -> None:
        self._last_beat = time.monotonic()

    def set_ready(self, ready: bool) -> None:
        self._ready = ready
        self.ready.set(1 if ready else 0)

    def is_alive(self, stall_s: float) -> bool:
        return time.monotonic() - self._last_beat < stall_s

    def is_ready(self) -> bool:
        return self._ready


class EndpointHandler(BaseHTTPRequestHandler):
    """What the worker's and a --processes supervisor's endpoints share: replies, logging.

    Each connection gets a thread that waits for its request: without a timeout, a client that
    connects and sends nothing (or half a request line) held a thread and a file descriptor for
    as long as it stayed connected, and anyone who reaches the port could pile them up.
    """

    timeout = CLIENT_IDLE_S  # socket timeout for each read: the connection is then closed

    def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("http %s", format % args)


class _Handler(EndpointHandler):
    metrics: WorkerMetrics
    stall_s: float

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            ok = self.metrics.is_alive(self.stall_s)
            self._send(200 if ok else 503, b"ok\n" if ok else b"stalled\n")
        elif path == "/readyz":
            ok = self.metrics.is_ready()
            self._send(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
        else:
            self._send(404, b"not found\n")


def bare_host(host: str) -> str:
    """``host`` without the brackets an IPv6 address may be written in (``[::1]`` -> ``::1``)."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def is_ipv6_literal(host: str) -> bool:
    """Whether ``host`` (brackets or not) is an IPv6 address, which needs an AF_INET6 socket."""
    try:
        return ipaddress.ip_address(bare_host(host)).version == 6
    except ValueError:
        return False


def host_port(host: str, port: int) -> str:
    """``host:port`` as a URL writes it: ``[::1]:9100`` for an IPv6 address, whose colons would
    otherwise run into the port's (``::1:9100`` is itself an address)."""
    host = bare_host(host)
    return f"[{host}]:{port}" if is_ipv6_literal(host) else f"{host}:{port}"


class EndpointServer(ThreadingHTTPServer):
    """The HTTP server of an endpoint, IPv4 or IPv6 as its host is.

    ThreadingHTTPServer always makes an AF_INET socket, which cannot bind an IPv6 address (``::``
    failed with "Address family for hostname not supported"): an IPv6 literal, with or without
    brackets, gets an AF_INET6 one; ``::`` then also takes IPv4 (dual stack, as ``python -m
    http.server --bind ::`` does). A host name is still looked up as IPv4.
    """

    daemon_threads = True

    def __init__(
        self, server_address: tuple[str, int], handler: type[BaseHTTPRequestHandler]
    ) -> None:
        host, port = server_address
        if is_ipv6_literal(host):
            self.address_family = socket.AF_INET6
        super().__init__((bare_host(host), port), handler)

    def server_bind(self) -> None:
        if (
            self.address_family == socket.AF_INET6
            and ipaddress.ip_address(self.server_address[0].partition("%")[0]).is_unspecified
        ):
            with contextlib.suppress(AttributeError, OSError):  # no dual stack: IPv6 only
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def handle_error(self, request: object, client_address: tuple) -> None:
        """Through logging, not a traceback on stderr (which breaks --log-json): a probe that
        gave up before the answer (requests queued while the engine loads) is routine."""
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError):  # BrokenPipe, ConnectionReset, ...
            log.debug("metrics client %s went away: %s", client_address, exc)
        else:
            log.warning("metrics request from %s failed", client_address, exc_info=True)


def bind(metrics: WorkerMetrics, host: str, port: int, stall_s: float) -> ThreadingHTTPServer:
    """Listen on host:port without answering yet (``start`` does); OSError if it cannot.

    `python -m worker run` binds before loading the engine, so a taken port or an unknown host
    is a one-line error within a second, not a crash after a model load.
    """
    handler = type("Handler", (_Handler,), {"metrics": metrics, "stall_s": stall_s})
    return EndpointServer((host, port), handler)


def start(server: ThreadingHTTPServer) -> ThreadingHTTPServer:
    """Answer requests from a daemon thread; returns the server (``.shutdown()`` to stop)."""
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    host, port = server.server_address[:2]
    log.info("metrics on http://%s/metrics (healthz, readyz)", host_port(host, port))
    return server


def serve(metrics: WorkerMetrics, host: str, port: int, stall_s: float) -> ThreadingHTTPServer:
    """Start the endpoint in a daemon thread; returns the server (``.shutdown()`` to stop)."""
    return start(bind(metrics, host, port, stall_s))
