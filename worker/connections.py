"""Kafka and Redis clients built from :class:`WorkerSettings`, with SASL/TLS passed through."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import redis

from worker.settings import WorkerSettings

T = TypeVar("T")


class ConnectTimeoutError(Exception):
    """A Kafka client was still connecting past its deadline (a TLS handshake never answered)."""


class ConnectInterruptedError(Exception):
    """A stop was requested (SIGTERM, Ctrl-C) while a Kafka client was still connecting."""


def within_deadline(
    factory: Callable[[], T], timeout_s: float, stop: threading.Event | None = None
) -> T:
    """factory() in a daemon thread; ConnectTimeoutError if it has not returned in timeout_s,
    ConnectInterruptedError as soon as `stop` is set (a bootstrap retrying an absent broker would
    otherwise hold a Ctrl-C for up to its whole timeout).

    kafka-python 3.0 bounds its bootstrap by bootstrap_timeout_ms except for the TLS handshake,
    which it awaits with no deadline: a peer that accepts and never answers (SSL to a listener
    that waits for the client to speak, or a black-holed proxy) would hang the constructor for
    ever. The abandoned thread holds one socket until the process exits.
    """
    outcome: dict[str, Any] = {}

    def build() -> None:
        try:
            outcome["value"] = factory()
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=build, name="kafka-connect", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while thread.is_alive():
        left = deadline - time.monotonic()
        if left <= 0:
            raise ConnectTimeoutError(f"no answer within {timeout_s:g}s")
        if stop is not None and stop.wait(min(left, 0.1)):
            raise ConnectInterruptedError("stop requested while connecting")
        thread.join(min(left, 0.1) if stop is None else 0)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def kafka_common_config(settings: WorkerSettings) -> dict[str, Any]:
    """kafka-python keyword arguments shared by consumers, producers and admin clients."""
    config: dict[str, Any] = {
        "bootstrap_servers": [
            s.strip() for s in settings.bootstrap_servers.split(",") if s.strip()
        ],
        "security_protocol": settings.security_protocol,
        "client_id": f"carstream-{settings.worker_id}",
    }
    if settings.sasl_mechanism:
        config["sasl_mechanism"] = settings.sasl_mechanism
        if settings.sasl_username is not None:
            config["sasl_plain_username"] = settings.sasl_username
        if settings.sasl_password is not None:
            config["sasl_plain_password"] = settings.sasl_password.get_secret_value()
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        config["ssl_check_hostname"] = settings.ssl_check_hostname
        if settings.ssl_cafile:
            config["ssl_cafile"] = settings.ssl_cafile
        if settings.ssl_certfile:
            config["ssl_certfile"] = settings.ssl_certfile
        if settings.ssl_keyfile:
            config["ssl_keyfile"] = settings.ssl_keyfile
    return config


def redacted(url: str) -> str:
    """The URL without its userinfo and query (which may carry ``password=``), safe to print.

    Keeps the URL's form: ``unix:///run/redis.sock`` stays that, not ``unix:/run/redis.sock``.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host  # IPv6
    netloc = f"{host}:{parts.port}" if parts.port else host
    return f"{parts.scheme}://{netloc}{parts.path}"


_UNKNOWN_OPTION = re.compile(r"unexpected keyword argument '([^']*)'")


def redis_client(settings: WorkerSettings) -> redis.Redis:
    """A Redis client; ``rediss://`` URLs use TLS with the configured certificates.

    ValueError, one line naming the (redacted) URL, for options redis-py refuses: those of the
    URL's query (``?protocol=9``, an unknown ``?foo=1``) it otherwise refuses only at the first
    command, as a ConnectionError that a worker would retry for ever. Connects lazily: no I/O.
    """
    kwargs: dict[str, Any] = {
        "socket_timeout": settings.redis_socket_timeout_s,
        "socket_connect_timeout": settings.redis_socket_timeout_s,
        "health_check_interval": 30,
    }
    if settings.redis_password is not None:
        kwargs["password"] = settings.redis_password.get_secret_value()
    if settings.redis_url.startswith("rediss://"):
        if settings.redis_tls_ca_certs:
            kwargs["ssl_ca_certs"] = settings.redis_tls_ca_certs
        if settings.redis_tls_certfile:
            kwargs["ssl_certfile"] = settings.redis_tls_certfile
        if settings.redis_tls_keyfile:
            kwargs["ssl_keyfile"] = settings.redis_tls_keyfile
    client = None
    try:
        client = redis.Redis.from_url(settings.redis_url, **kwargs)
        pool = client.connection_pool
        pool.connection_class(**pool.connection_kwargs)  # what the first command builds
    except (redis.RedisError, TypeError, ValueError) as exc:
        if client is not None:
            client.close()
        raise ValueError(f"redis_url {redacted(settings.redis_url)}: {_reason(exc)}") from None
    return client


def _reason(exc: Exception) -> str:
    unknown = _UNKNOWN_OPTION.search(str(exc)) if isinstance(exc, TypeError) else None
    if unknown:
        return f"unknown option {unknown.group(1)!r} in the query"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def metadata_answers(producer: Any) -> float:
    """A mark of the producer's last metadata answer from the broker (kafka-python 3.0's
    ClusterMetadata; 0 for a producer without one), for ``topic_unknown``."""
    cluster = getattr(producer, "_metadata", None)
    return getattr(cluster, "_last_successful_refresh_ms", 0)


def topic_unknown(producer: Any, topic: str, answers_before: float) -> bool:
    """Whether the broker answered the producer's metadata requests since ``answers_before``
    (``metadata_answers``) and still lists no ``topic``: a topic that does not exist on a broker
    that does not create topics on request.

    kafka-python reports both that and a broker that does not answer at all as one
    KafkaTimeoutError after ``max_block_ms``; only the second is an outage that retrying ends.
    """
    cluster = getattr(producer, "_metadata", None)
    if cluster is None or metadata_answers(producer) <= answers_before:
        return False
    return cluster.partitions_for_topic(topic) is None
