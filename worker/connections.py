"""Kafka and Redis clients built from :class:`WorkerSettings`, with SASL/TLS passed through."""

from __future__ import annotations

import logging
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import redis

from worker.settings import MASK, WorkerSettings, at_after_authority

T = TypeVar("T")


class ConnectTimeoutError(Exception):
    """A Kafka client was still connecting past its deadline (a TLS handshake never answered)."""


class ConnectInterruptedError(Exception):
    """A stop was requested (SIGTERM, Ctrl-C) while a Kafka client was still connecting."""


# kafka-python bootstrap attempts in a row that a broker refuses for good (a certificate the CA
# does not verify, a SASL mechanism or login it refuses) before a command gives up: a few, not
# one, so that one broker of several mid-rotation does not stop it
KAFKA_REFUSAL_LIMIT = 3


class KafkaRefusedError(Exception):
    """Kafka's brokers refuse this client for a reason no retry ends (``kafka_refusal``)."""


def within_deadline(
    factory: Callable[[], T],
    timeout_s: float,
    stop: threading.Event | None = None,
    refused: Callable[[], str | None] | None = None,
) -> T:
    """factory() in a daemon thread; ConnectTimeoutError if it has not returned in timeout_s,
    ConnectInterruptedError as soon as `stop` is set (a bootstrap retrying an absent broker would
    otherwise hold a Ctrl-C for up to its whole timeout), KafkaRefusedError as soon as
    ``refused()`` gives a reason (``BootstrapFailures.refused``: kafka-python retries a broker
    that refuses its certificate or SASL login until its own timeout, and then reports only
    that it could not bootstrap).

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
        reason = refused() if refused is not None and thread.is_alive() else None
        if reason is not None:
            raise KafkaRefusedError(reason)
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
    A URL with an ``@`` after its authority (a password holding an unencoded ``/ ? #``, which
    urlsplit reads as the end of the host: ``settings.at_after_authority``) is cut at its last
    ``@``, and shown as its scheme alone if what precedes it may be a query's password.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return MASK
    if at_after_authority(url):
        userinfo, _, tail = rest.rpartition("@")
        if "password" in unquote(userinfo).lower():
            return f"{scheme}://{MASK}"
        url = f"{scheme}://{tail}"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # a port that is no number: perhaps a piece of a password
        return f"{scheme}://{MASK}"
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host  # IPv6
    netloc = f"{host}:{port}" if port else host
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
    return error_line(exc)


def error_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or its type's name when it has none: one-line logs
    and errors (redis-py's and kafka-python's messages may run to several lines)."""
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    """The exception and those it was raised from or while handling (kafka-python and redis-py
    wrap an ``ssl`` error in their own)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


_SSL_LOCATION = re.compile(r"\s*\(_ssl\.c:\d+\)")


def _tls_refusal(exc: BaseException) -> str | None:
    """The certificate check that failed, in OpenSSL's words, or None."""
    for link in _chain(exc):
        if isinstance(link, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(
            link
        ):
            text = _SSL_LOCATION.sub("", str(link.args[-1] if link.args else link))
            return text.split("] ", 1)[-1]
    return None


def redis_refusal(exc: BaseException) -> str | None:
    """Why Redis refuses this client for good, or None for an error a retry may end.

    For good: a wrong or missing password (redis-py's AuthenticationError, also for WRONGPASS
    and NOAUTH replies), an ACL user without permission for the worker's commands
    (NoPermissionError, AuthorizationError), and a ``rediss://`` server whose certificate the
    configured CA does not verify. Retrying those kept a worker ready and retrying for ever.
    Anything else (a refused or reset connection, a timeout, a server loading its data) is an
    outage, retried.
    """
    tls = _tls_refusal(exc)
    if tls is not None:
        return f"the server's TLS certificate does not verify ({tls}): check redis_tls_ca_certs"
    text = error_line(exc)
    if isinstance(
        exc, redis.AuthenticationError | redis.exceptions.AuthenticationWrongNumberOfArgsError
    ):
        return f"authentication failed ({text}): check the password and user"
    if isinstance(exc, redis.exceptions.NoPermissionError | redis.exceptions.AuthorizationError):
        return f"the user lacks a permission ({text}): check its ACL"
    if isinstance(exc, redis.ResponseError) and text.startswith(("WRONGPASS", "NOAUTH")):
        return f"authentication failed ({text}): check the password and user"
    # Redis 7 answers an unauthenticated command of many arguments (the trends write) with
    # "Protocol error: unauthenticated multibulk length" (or "bulk length") and drops the
    # connection, not with NOAUTH: a server that began requiring a password
    if text.startswith("Protocol error: unauthenticated"):
        return f"authentication required ({text}): set the password"
    if isinstance(exc, redis.ResponseError) and text.startswith("NOPERM"):
        return f"the user lacks a permission ({text}): check its ACL"
    return None


def kafka_refusal(exc: BaseException) -> str | None:
    """Why Kafka's brokers refuse this client for good, or None for an error a retry may end.

    For good: a broker certificate the configured CA does not verify (or a host name it does not
    name), a SASL mechanism the broker does not offer, and a SASL login it refuses. kafka-python
    retries these as it would an absent broker, and its constructor then reports only "Unable to
    bootstrap" (the cause is in its log: ``BootstrapFailures``).
    """
    from kafka.errors import (
        IllegalSaslStateError,
        SaslAuthenticationFailedError,
        UnsupportedSaslMechanismError,
    )

    tls = _tls_refusal(exc)
    if tls is not None:
        hint = " (or ssl_check_hostname)" if "hostname" in tls.lower() else ""
        return f"the broker's TLS certificate does not verify ({tls}): check ssl_cafile{hint}"
    if isinstance(exc, UnsupportedSaslMechanismError):
        return "the broker does not offer this sasl_mechanism (UnsupportedSaslMechanismError)"
    if isinstance(exc, SaslAuthenticationFailedError | IllegalSaslStateError):
        detail = str(exc) or type(exc).__name__
        return f"SASL authentication failed ({detail}): check sasl_username and sasl_password"
    return None


class BootstrapFailures(logging.Handler):
    """What kafka-python logs for each failed bootstrap connection, while ``attached``.

    kafka-python 3.0 retries a broker that refuses its TLS certificate or SASL login as it
    retries one that is down, until ``bootstrap_timeout_ms``, and its constructor then raises
    ``KafkaTimeoutError("Unable to bootstrap ...")``: the cause is only in its log, the failed
    connection's exception among the record's arguments (kafka.net.manager: "Connection
    failed: %s", "Bootstrap connection to %s failed: %s").

    Refusals are counted per bootstrap broker (each attempt picks one at random): the client
    is refused for good only once each of the ``brokers`` listed has refused ``limit`` times in
    a row. One broker of several that refuses (mid-rotation of its certificate) never stops a
    client the others would take.
    """

    LOGGER = "kafka.net.manager"
    _PER_BROKER = "Bootstrap connection to %s failed"  # its args: (node id, exception, ...)

    def __init__(self, limit: int, brokers: int = 1) -> None:
        super().__init__(logging.DEBUG)
        self.limit = limit
        self.brokers = max(1, brokers)
        self.last: BaseException | None = None
        self._streaks: dict[object, int] = {}  # refusals in a row, by bootstrap node id
        self._last_refusal: BaseException | None = None
        self._lock_seen = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        errors = [
            a for a in args if isinstance(a, BaseException) and "Unable to bootstrap" not in str(a)
        ]  # the constructor's own timeout is not a cause
        if not errors:
            return
        error = errors[0]
        with self._lock_seen:
            self.last = error
            if isinstance(record.msg, str) and record.msg.startswith(self._PER_BROKER) and args:
                # one failure is logged twice ("Connection failed" too): counted here only
                refused = kafka_refusal(error) is not None
                self._streaks[args[0]] = self._streaks.get(args[0], 0) + 1 if refused else 0
                if refused:
                    self._last_refusal = error

    def refused(self) -> str | None:
        """The reason once every bootstrap broker refused ``limit`` times in a row."""
        with self._lock_seen:
            streaks, last = list(self._streaks.values()), self._last_refusal
        if last is None or len(streaks) < self.brokers or min(streaks) < self.limit:
            return None
        return kafka_refusal(last)

    def cause(self) -> str | None:
        """The last failure kafka-python logged, one line, or None."""
        last = self.last
        if last is None:
            return None
        text = _SSL_LOCATION.sub("", str(last).splitlines()[0] if str(last) else "")
        name = type(last).__name__
        return text if name in text else (f"{name}: {text}" if text else name)

    @contextmanager
    def attached(self) -> Iterator[BootstrapFailures]:
        logger = logging.getLogger(self.LOGGER)
        logger.addHandler(self)
        try:
            yield self
        finally:
            logger.removeHandler(self)


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
