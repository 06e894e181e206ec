"""The worker's one settings class: flags or ``CARSTREAM_*`` environment variables.

Frozen so a running worker cannot drift from what it logged at start; secrets are ``SecretStr``
so they never reach logs, metrics or ``repr``.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import socket
import ssl
import stat
from collections.abc import Mapping
from typing import Annotated, Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from worker.host_names import ascii_host
from worker.trend_keys import MAX_TTL_S

Backend = Literal["auto", "tensorrt", "torch-cuda", "torch-cpu", "onnxruntime"]
SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"]


MASK = "**********"
# a character that ends a URL's authority (RFC 3986): an "@" after one is no userinfo's
_AUTHORITY_END = re.compile(r"[/?#]")


def at_after_authority(url: str) -> bool:
    """Whether an ``@`` follows the URL's authority, in its path, query or fragment.

    A password holding an unencoded ``/``, ``?`` or ``#`` ends the authority there for
    urlsplit (and redis-py): ``redis://default:2024#S3cr3t@10.0.0.5/0`` reads as host
    ``default``, port 2024 and a fragment ``S3cr3t@10.0.0.5/0``, and the password is no longer
    where a mask looks for it. Such a URL cannot be told from a host and a path apart.
    """
    rest = url.partition("://")[2]
    end = _AUTHORITY_END.search(rest)
    return end is not None and "@" in rest[end.start() :]


def _mask_query(query: str, fragment: str | None) -> str:
    """``query`` (and ``#fragment``, when not None) with everything from a ``password=`` value
    on masked: a password holding an unencoded ``&`` or ``#`` runs into the next field or the
    fragment, and only the part before them would otherwise be masked."""
    fields = []
    for field in query.split("&"):
        name, sep, _value = field.partition("=")
        if sep and unquote(name).strip().lower() == "password":
            fields.append(f"{name}={MASK}")
            return "&".join(fields)  # the rest may be the password's own tail
        fields.append(field)
    return "&".join(fields) + ("" if fragment is None else f"#{fragment}")


def _mask_url_password(url: str) -> str:
    """``redis://user:pw@host`` -> ``redis://user:**********@host``, and a ``password`` in the
    query (redis-py reads one there too, its name percent-decoded) masked the same way: URLs
    are logged.

    When in doubt (an ``@`` after the authority: ``at_after_authority``) everything between
    ``://`` and the last ``@`` is masked, and the rest too if a ``password=`` precedes that
    ``@`` (which may then be the query's password's own): a mask that shows too little is
    harmless, one that shows a password is not.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:  # no URL: nothing in it can be told from a password
        return MASK
    if at_after_authority(url):
        userinfo, _, tail = rest.rpartition("@")
        if "password=" in unquote(userinfo).lower():
            return f"{scheme}://{MASK}"
        head, qsep, query = tail.partition("?")
        query, fsep, fragment = query.partition("#")
        masked_tail = head + (qsep + _mask_query(query, fragment if fsep else None) if qsep else "")
        return f"{scheme}://{MASK}@{masked_tail}"
    authority_end = _AUTHORITY_END.search(rest)
    authority = rest[: authority_end.start()] if authority_end else rest
    after = rest[len(authority) :]
    userinfo, at, hostport = authority.rpartition("@")
    if at and ":" in userinfo:
        user = userinfo.partition(":")[0]
        authority = f"{user}:{MASK}@{hostport}"
    path, qsep, query = after.partition("?")
    if not qsep:
        return f"{scheme}://{authority}{after}"
    query, fsep, fragment = query.partition("#")
    return f"{scheme}://{authority}{path}?{_mask_query(query, fragment if fsep else None)}"


def _check_port(text: str, where: str = "") -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"{where}port {text!r} is not a TCP port (1-65535)")
    return int(text)


def parse_bootstrap_servers(value: str) -> list[str]:
    """``host[:port][,host[:port]...]`` (IPv6 as ``[addr][:port]``) -> the entries, stripped.

    A broker without a port is kafka-python's default port 9092, as kafka-python reads it.
    Raises ValueError naming the first bad entry: kafka-python would otherwise fail with an
    IndexError or an int() error deep inside the first client it builds.
    """
    servers = [entry.strip() for entry in value.split(",") if entry.strip()]
    if not servers:
        raise ValueError("no broker given; expected host:port[,host:port...]")
    for entry in servers:
        # kafka-python drops a leading SECURITY_PROTOCOL://, as the Java client does
        address = re.sub(r"^[A-Za-z_]+://", "", entry)
        if address.startswith("[") and address.endswith("]"):
            host, sep, port = address, "", ""  # [IPv6] alone: the default port
        elif ":" not in address:
            host, sep, port = address, "", ""  # host alone: the default port
        else:
            host, sep, port = address.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host or "[" in host or "]" in host:
            raise ValueError(f"{entry!r}: write an IPv6 broker as [address]:port")
        if not host or any(c.isspace() for c in host) or "/" in host:
            raise ValueError(f"{entry!r}: expected host:port")
        try:
            check_host_name(host)
        except ValueError as exc:
            raise ValueError(f"{entry!r}: {exc}") from None
        if sep:
            _check_port(port, f"{entry!r}: ")
    return servers


def check_redis_url(value: str) -> str:
    """The URL if redis-py can connect with it: known scheme, a host name a resolver can look
    up, port 1-65535, numeric database."""
    if at_after_authority(value):
        # before any other check: each would read a piece of the password as the host, port or
        # database, and quote it
        raise ValueError(
            "an '@' after the host, path or query: percent-encode / ? # @ in the password "
            "(%2F %3F %23 %40)"
        )
    if not value.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("must start with redis://, rediss:// (TLS) or unix://")
    parts = urlsplit(value)
    if parts.scheme != "unix":
        netloc = parts.netloc.rpartition("@")[2]
        _host, sep, port = netloc.rpartition(":")
        if sep and not netloc.endswith("]"):  # "[::1]" alone has colons but no port
            try:
                _check_port(port)
            except ValueError:
                # a password with an unencoded / ? # splits the URL there, and what looks like
                # the port is then a piece of the password: keep it out of the message
                if "@" in value:
                    raise ValueError(
                        "the port is not a number in 1-65535 (percent-encode / ? # @ in the "
                        "password)"
                    ) from None
                raise
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise ValueError(f"database {db!r} in the path is not a number")
    from redis.connection import parse_url  # what redis_client() will run on it

    try:
        host = parse_url(value).get("host")
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    if host is not None:
        check_host_name(host)
    return value


def url_has_password(url: str) -> bool:
    """Whether redis-py reads a password from the URL (its userinfo or a ``password=`` in the
    query), which then wins over a ``password`` passed beside it."""
    from redis.connection import parse_url

    try:
        return bool(parse_url(url).get("password"))
    except ValueError:
        return False


def check_host_name(host: str) -> None:
    """ValueError naming a host no resolver can look up: the socket module encodes a host name
    as IDNA when it connects, and a label that is empty (``a..b``), over 63 characters or holds
    a character IDNA refuses fails there as a UnicodeError, not a Redis or Kafka error: ``worker
    trends`` printed a traceback, a worker's Redis retries would not catch it, and a Kafka
    client retried it until its timeout as if the broker were down."""
    try:
        ipaddress.ip_address(host)  # an IP literal ([::1], fe80::1%eth0) is not looked up
        return
    except ValueError:
        pass
    try:
        host.encode("idna")
    except UnicodeError:
        raise ValueError(
            f"host {host!r} is not a valid host name (an empty label, a label over 63 "
            "characters, or a character a host name cannot hold)"
        ) from None


# Kafka carries these settings as int32: a larger value crashes kafka-python (struct.error)
# or is refused by the broker, which a consumer then answers by retrying its join forever
INT32_MAX = 2**31 - 1
# the consumer fetches up to max_message_bytes plus this much per partition (record overhead)
FETCH_MARGIN_BYTES = 1024
# a legal Kafka topic name (Kafka's Topic.validate); "." and ".." are refused apart
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")


def check_topic_name(value: str) -> str:
    """The name if Kafka accepts it as a topic: 1-249 of ``A-Za-z0-9._-``, not ``.`` or ``..``."""
    if not _TOPIC_NAME.fullmatch(value) or value in (".", ".."):
        raise ValueError(
            f"{value!r} is not a Kafka topic name (1-249 characters of A-Z a-z 0-9 . _ -, "
            "not '.' or '..')"
        )
    return value


# the settings that name a file the Kafka or Redis client opens when it connects
FILE_SETTINGS = (
    "ssl_cafile",
    "ssl_certfile",
    "ssl_keyfile",
    "redis_tls_ca_certs",
    "redis_tls_certfile",
    "redis_tls_keyfile",
)


# the CA bundles and the client certificate/key pairs among them, which Python's ssl module loads
# as the clients do (load_verify_locations, load_cert_chain)
CA_SETTINGS = ("ssl_cafile", "redis_tls_ca_certs")
CERT_KEY_SETTINGS = (("ssl_certfile", "ssl_keyfile"), ("redis_tls_certfile", "redis_tls_keyfile"))


_SSL_SOURCE = re.compile(r"\s*\(_ssl\.c:\d+\)")


def _ssl_reason(exc: Exception) -> str:
    """OpenSSL's reason in words, without the ``(_ssl.c:NNNN)`` location."""
    reason = getattr(exc, "reason", None)
    text = _SSL_SOURCE.sub("", str(exc))
    if reason == "NO_CERTIFICATE_OR_CRL_FOUND":
        return "no PEM certificate in it"
    if reason == "KEY_VALUES_MISMATCH":
        return "the key does not match the certificate"
    if "PEM lib" in text:
        return "a damaged or unreadable PEM block"
    return text


def bad_ca_file_reason(path: str) -> str | None:
    """None if ``path`` holds PEM CA certificates, else why not: a file that is not one
    otherwise reads, inside kafka-python, as a broker that cannot be bootstrapped."""
    try:  # what kafka-python and redis-py do with it (without the system store, not needed)
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except (ssl.SSLError, OSError, ValueError) as exc:
        return f"not a CA certificate file: {_ssl_reason(exc)}"
    return None


def _no_key_password() -> bytes:
    # carstream has no key-password setting: an encrypted key must fail, not prompt on a TTY
    raise ValueError("the key is encrypted, and carstream takes no key password; decrypt it")


def bad_cert_chain_reason(certfile: str, keyfile: str | None) -> str | None:
    """None if the client certificate (with its key, in ``keyfile`` or in the same file) loads
    as the clients load it, else why not: no certificate, no key, a key that does not match,
    an encrypted key."""
    if bad_ca_file_reason(certfile) is not None:  # holds no certificate at all
        return "no PEM certificate in it"
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(
            certfile, keyfile, password=_no_key_password
        )
    except ssl.SSLError as exc:
        if getattr(exc, "reason", None) == "KEY_VALUES_MISMATCH":
            return _ssl_reason(exc)
        if keyfile is None:
            return "no PEM private key in it, and no key file is set"
        return "the key file holds no PEM private key"
    except (OSError, ValueError) as exc:
        return str(exc)
    return None


def unreadable_file_reason(path: str) -> str | None:
    """None if ``path`` is a regular file this process can open for reading, else why not."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "no such file"
    except OSError as exc:  # a parent that is a file, a parent we may not search, ...
        return (exc.strerror or str(exc)).lower()
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    if not stat.S_ISREG(mode):
        return "not a regular file"
    if not os.access(path, os.R_OK):
        return f"not readable by this user (uid {os.getuid()})"
    try:  # os.access answers for the real uid and ignores ACLs/LSMs: opening is the proof
        with open(path, "rb"):
            pass
    except OSError as exc:
        return (exc.strerror or str(exc)).lower()
    return None


MAX_WORKER_ID_CHARS = 200
_NOT_IN_A_HOST = re.compile(r"[/@?#*\s]|://")


def check_listen_host(value: str) -> str:
    """``metrics_host`` as the endpoint binds it: an IP address (an IPv6 one with or without
    brackets, returned without) or a host name; ValueError in one line otherwise.

    Before, a value no socket can bind (a port in it, a URL) was only found by the bind, with
    the OS's words. An empty value is socket's own spelling of every IPv4 interface, and kept
    working: it becomes 0.0.0.0, which the log then shows.
    """
    if value == "":
        return "0.0.0.0"
    bracketed = value.startswith("[") and value.endswith("]")
    host = value[1:-1] if bracketed else value
    if not host:
        raise ValueError(f"{value!r}: no address inside the brackets")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is not None:
        if bracketed and address.version == 4:
            raise ValueError(f"{value!r}: brackets are for an IPv6 address; write {host}")
        if getattr(address, "scope_id", None):
            raise ValueError(
                f"{value!r}: an address with a zone (%{address.scope_id}) is not supported; "
                "listen on :: or on the pod's own address"
            )
        return host
    if bracketed:
        raise ValueError(f"{value!r}: not an IPv6 address inside the brackets")
    if not host.isprintable() or any(c.isspace() for c in host):
        raise ValueError(f"{value!r}: a host name holds no space or control character")
    if _NOT_IN_A_HOST.search(host):
        raise ValueError(f"{value!r}: a host name or IP address, not a URL")
    if ":" in host:
        raise ValueError(
            f"{value!r}: a host name or IP address without a port (the port is metrics_port; "
            "an IPv6 address is written ::1 or [::1])"
        )
    check_host_name(host)
    return host


def allow_list_host(entry: str) -> str:
    """An allow-list entry as the fetcher compares hosts: lower case, no trailing dot, IDNA
    (``bücher.de`` -> ``xn--bcher-kva.de``), an IPv6 literal without brackets; "" to skip.

    Raises ValueError for an entry no URL host could ever equal (a URL, a port, a wildcard),
    which would otherwise refuse every post of that host as ``url_refused``.
    """
    host = entry.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    host = host.removesuffix(".")
    if not host:
        return ""
    if "*" in host:
        raise ValueError(
            f"url_allow_hosts entry {entry!r}: wildcards are not supported; list each host"
        )
    if _NOT_IN_A_HOST.search(host):
        raise ValueError(
            f"url_allow_hosts entry {entry!r}: a host name like example.com, not a URL"
        )
    if ":" in host:
        try:
            return str(ipaddress.IPv6Address(host))  # compressed, as the fetcher compares
        except ValueError:
            raise ValueError(
                f"url_allow_hosts entry {entry!r}: a host name without a port"
            ) from None
    try:
        return ascii_host(host)
    except ValueError:
        raise ValueError(f"url_allow_hosts entry {entry!r}: not a valid host name") from None


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class WorkerSettings(BaseSettings):
    """Everything `python -m worker run` needs; every field is also a kebab-case flag."""

    # allow_inf_nan=False: every float setting must be a finite number. NaN compares false with
    # every bound, so "nan" was refused only by accident of which bound pydantic checks last,
    # with a message about that bound ("less than or equal to 3600")
    model_config = SettingsConfigDict(
        env_prefix="CARSTREAM_",
        frozen=True,
        extra="forbid",
        case_sensitive=False,
        allow_inf_nan=False,
        # a ValidationError's text otherwise quotes the input, SecretStr fields and the
        # redis_url's password included, to whoever prints or logs it
        hide_input_in_errors=True,
    )

    # Kafka
    bootstrap_servers: str = Field("127.0.0.1:9092", description="Kafka brokers, comma separated")
    group_id: str = Field("carstream-workers", min_length=1, description="consumer group")
    group_instance_id: str | None = Field(
        None, description="static group membership id (e.g. the pod name); unset = dynamic"
    )
    input_topic: str = "car-posts"
    output_topic: str = "car-predictions"
    dlq_topic: str = "car-posts.dlq"
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_check_hostname: bool = True
    kafka_connect_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="longest a Kafka client may take to connect at start; an unreachable broker "
        "is retried, a TLS handshake still unanswered 5 s past it exits 1",
    )
    session_timeout_ms: int = Field(10_000, ge=1_000, le=3_600_000)
    heartbeat_interval_ms: int | None = Field(
        None, ge=100, description="below session_timeout_ms; default: a third of it"
    )
    max_poll_interval_ms: int = Field(
        300_000, ge=1_000, le=INT32_MAX, description="at least session_timeout_ms"
    )
    fetch_max_wait_ms: int | None = Field(
        None,
        ge=0,
        le=60_000,
        description="longest a fetch waits at the broker for new posts; default: max_wait_ms "
        "(at least 10): a broker that answers only when this runs out (Tansu does) would "
        "otherwise add kafka-python's 500 ms to every quiet-time post",
    )
    max_message_bytes: int = Field(
        10 * 1024 * 1024,
        ge=1024,
        le=INT32_MAX - FETCH_MARGIN_BYTES,
        description="input events whose key + value are larger go to the DLQ",
    )

    # Redis
    redis_url: str = Field("redis://127.0.0.1:6380/0", description="redis:// or rediss:// (TLS)")
    redis_password: SecretStr | None = None
    redis_tls_ca_certs: str | None = None
    redis_tls_certfile: str | None = None
    redis_tls_keyfile: str | None = None
    redis_socket_timeout_s: float = Field(5.0, gt=0, le=3600)
    # at most a century: the trends reader ignores a larger recorded TTL as malformed
    trend_minute_ttl_s: int = Field(
        48 * 3600, ge=60, le=MAX_TTL_S, description="TTL of per-minute buckets"
    )
    trend_hour_ttl_s: int = Field(
        30 * 24 * 3600, ge=3600, le=MAX_TTL_S, description="TTL of hourly rollups"
    )
    dedup_ttl_s: int = Field(
        3600,
        ge=0,
        le=INT32_MAX,
        description="a post re-sent under the same post_id within this many seconds is counted "
        "once (one Redis key per post for this long); 0 disables",
    )

    # Model and batching
    bundle: str | None = Field(
        None, description="model bundle directory (engine_build output); required"
    )
    backend: Backend = "auto"
    inference_threads: int | None = Field(
        None,
        ge=1,
        description="intra-op threads of a CPU engine, ONNX Runtime or torch-cpu (per instance)",
    )
    onnx_precision: Literal["fp32", "int8"] = Field(
        "fp32",
        description="onnxruntime backend: which of the bundle's ONNX models to run; int8 is "
        "engine_build's static-quantised model (--precision int8), faster on CPUs with int8 "
        "dot-product instructions, at the accuracy cost its parity.json records (logged at "
        "start)",
    )
    inference_spinning: bool = Field(
        True,
        description="ONNX Runtime's intra-op threads busy-wait for work between runs (its "
        "default); off, they sleep, leaving the CPU to the decode threads in between (measured "
        "1.5-2.3 core-ms per post less pool CPU on a 2-core EPYC VM in two A/Bs, a throughput "
        "gain within its noise; on a 2-core Xeon VM 8% fewer posts/s)",
    )
    engine_instances: int = Field(
        1,
        ge=1,
        le=64,
        description="copies of the engine, each inferring its own batch on its own inference "
        "thread (the overlapped loop); on a CPU, N single-thread ONNX Runtime instances keep the "
        "cores busier than one N-thread instance",
    )
    processes: int = Field(
        1,
        ge=1,
        le=64,
        description="worker processes in this replica, each a consumer-group member with its "
        "own engine on the replica's GPU, under a supervisor that serves their metrics on "
        "metrics_port (theirs: loopback, metrics_port+1..+N): for GPU nodes, where one "
        "process's CPU side, under one GIL, cannot feed the engine (docs/worker.md)",
    )
    max_batch: int = Field(32, ge=1, le=4096)
    max_wait_ms: int = Field(50, ge=0, le=60_000)
    decode_threads: int = Field(4, ge=1, le=256)
    fetch_threads: int = Field(
        8,
        ge=0,
        le=256,
        description="threads beyond decode_threads that wait on image_url fetches: at most "
        "decode_threads decode at once, while up to decode_threads + fetch_threads posts fetch "
        "(each may hold up to url_max_bytes); unused when URL fetching is off",
    )
    decode_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="a post whose decode (URL fetch included) runs longer is dead-lettered as "
        "decode_timeout and its decode thread replaced; above url_timeout_s, below "
        "max_poll_interval_ms",
    )
    cuda_graphs: bool = Field(
        False,
        description="torch-cuda backend: replay one captured CUDA graph per batch-size bucket "
        "(powers of two up to max_batch) instead of launching kernels one by one",
    )
    gpu_decode: bool = Field(
        False,
        description="decode baseline JPEGs in batches with nvJPEG and preprocess them on the "
        "engine's GPU (torch-cuda and tensorrt backends; ignored with a warning otherwise)",
    )
    overlap: Literal["auto", "on", "off"] = Field(
        "auto",
        description="run the engine on an inference thread and publish + count on a delivery "
        "thread while the main thread polls, decodes and commits; auto: on for GPU engines "
        "(torch-cuda, tensorrt) and for engine_instances above 1, off for one CPU engine "
        "instance (onnxruntime, torch-cpu), whose parallel sections lose to polling beside them",
    )
    min_confidence: float = Field(0.5, ge=0.0, le=1.0)
    top_k: int = Field(5, ge=1, le=100)

    # URL fetching (image_url events)
    url_fetch_enabled: bool = True
    url_timeout_s: float = Field(5.0, gt=0, le=120)
    url_max_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    url_allow_private: bool = Field(
        False, description="allow private, loopback and link-local addresses (tests only)"
    )
    url_allow_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="if set, only these host names may be fetched"
    )
    url_host_timeouts: int = Field(
        3,
        ge=0,
        le=1000,
        description="fetches in a row from one origin (scheme://host:port) that time out before "
        "its posts are dead-lettered without a fetch for url_host_pause_s (0: never)",
    )
    url_host_pause_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="how long an origin that keeps timing out is not fetched from",
    )

    # Operations
    metrics_port: int = Field(9400, ge=0, le=65535, description="0 disables the HTTP endpoint")
    metrics_host: str = Field(
        "0.0.0.0",
        description="address the endpoint listens on: an IPv4 or IPv6 address (:: or [::] for "
        "every interface) or a host name (looked up as IPv4)",
    )
    log_json: bool = False
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    worker_id: str = Field(
        default_factory=default_worker_id,
        description="names this replica in results, dead-letter headers and the Kafka client id "
        "(1-200 printable characters; default host-pid)",
    )

    @field_validator("bootstrap_servers")
    @classmethod
    def _bootstrap(cls, value: str) -> str:
        return ",".join(parse_bootstrap_servers(value))

    @field_validator("input_topic", "output_topic", "dlq_topic")
    @classmethod
    def _topic(cls, value: str) -> str:
        return check_topic_name(value)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        return check_redis_url(value)

    @field_validator("sasl_mechanism")
    @classmethod
    def _sasl_mechanism(cls, value: str | None) -> str | None:
        # kafka-python's OAUTHBEARER needs a token provider object, which no setting can give:
        # it failed each handshake, read as "no Kafka broker at ...; retry" for ever
        if value == "OAUTHBEARER":
            raise ValueError(
                "OAUTHBEARER is not supported (no setting supplies the token provider "
                "kafka-python needs); use PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"
            )
        return value

    @field_validator("url_allow_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            stripped = value.strip()
            if stripped.startswith("["):
                import json

                return json.loads(stripped)
            return [h.strip().lower() for h in stripped.split(",") if h.strip()]
        return value

    @field_validator("url_allow_hosts")
    @classmethod
    def _allow_hosts(cls, value: list[str]) -> list[str]:
        return [host for host in map(allow_list_host, value) if host]

    @field_validator("metrics_host")
    @classmethod
    def _metrics_host(cls, value: str) -> str:
        return check_listen_host(value)

    @field_validator("worker_id")
    @classmethod
    def _worker_id(cls, value: str) -> str:
        # Kafka's client id is a 16-bit length string; headers and logs want one printable line
        if not value.strip():
            raise ValueError("worker_id is empty")
        if len(value) > MAX_WORKER_ID_CHARS:
            raise ValueError(f"worker_id is {len(value)} characters, at most {MAX_WORKER_ID_CHARS}")
        if not value.isprintable():
            raise ValueError(f"worker_id {value[:40]!r} holds a control or separator character")
        return value

    @model_validator(mode="after")
    def _check_security(self) -> WorkerSettings:
        if self.security_protocol.startswith("SASL") and not self.sasl_mechanism:
            raise ValueError(f"security_protocol {self.security_protocol} needs sasl_mechanism")
        if self.sasl_mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512") and (
            not self.sasl_username or self.sasl_password is None
        ):
            raise ValueError(
                f"sasl_mechanism {self.sasl_mechanism} needs sasl_username and sasl_password"
            )
        return self

    @model_validator(mode="after")
    def _check_redis_password(self) -> WorkerSettings:
        # redis-py lets the URL's password win over the one passed beside it: rotating the
        # Secret behind CARSTREAM_REDIS_PASSWORD would silently change nothing
        if self.redis_password is not None and url_has_password(self.redis_url):
            raise ValueError(
                "redis_url carries a password and redis_password (CARSTREAM_REDIS_PASSWORD) is "
                "set too; redis-py would use the URL's alone: set one of them"
            )
        return self

    @model_validator(mode="after")
    def _check_instances(self) -> WorkerSettings:
        # the serial loop infers on its own thread, one batch at a time: a second instance
        # would sit idle
        if self.engine_instances > 1 and self.overlap == "off":
            raise ValueError(
                f"engine_instances {self.engine_instances} needs the overlapped loop, "
                "but overlap is off (set overlap to auto or on)"
            )
        return self

    @model_validator(mode="after")
    def _check_processes(self) -> WorkerSettings:
        if self.processes > 1 and self.metrics_port + self.processes > 65535:
            raise ValueError(
                f"processes {self.processes} need metrics ports {self.metrics_port + 1}.."
                f"{self.metrics_port + self.processes}, past 65535 (lower metrics_port)"
            )
        return self

    @model_validator(mode="after")
    def _check_topics(self) -> WorkerSettings:
        # dead letters or results written to the input topic are read again: a bad post would
        # loop through the DLQ for ever, a result would come back as a bad post
        topics = [
            ("input_topic", self.input_topic),
            ("output_topic", self.output_topic),
            ("dlq_topic", self.dlq_topic),
        ]
        for i, (name, value) in enumerate(topics):
            for other, other_value in topics[i + 1 :]:
                if value == other_value:
                    raise ValueError(f"{name} and {other} are both {value!r}; use three topics")
        return self

    @model_validator(mode="after")
    def _check_group_timing(self) -> WorkerSettings:
        # kafka-python refuses a heartbeat at or above the session timeout only when the
        # consumer is built, after the model has loaded; a session longer than the poll interval
        # makes a stalled loop look alive to the group for longer than it may stall
        if (
            self.heartbeat_interval_ms is not None
            and self.heartbeat_interval_ms >= self.session_timeout_ms
        ):
            raise ValueError(
                f"heartbeat_interval_ms ({self.heartbeat_interval_ms}) must be below "
                f"session_timeout_ms ({self.session_timeout_ms})"
            )
        if self.session_timeout_ms > self.max_poll_interval_ms:
            raise ValueError(
                f"session_timeout_ms ({self.session_timeout_ms}) must not exceed "
                f"max_poll_interval_ms ({self.max_poll_interval_ms})"
            )
        return self

    @model_validator(mode="after")
    def _check_decode_timeout(self) -> WorkerSettings:
        # the URL fetch runs inside the decode's time; a deadline the group's poll interval
        # cannot hold would let a stuck decode hand its batch from replica to replica
        if self.url_fetch_enabled and self.decode_timeout_s <= self.url_timeout_s:
            raise ValueError(
                f"decode_timeout_s ({self.decode_timeout_s:g}) must exceed url_timeout_s "
                f"({self.url_timeout_s:g}): a post's URL fetch counts towards its decode time"
            )
        if self.decode_timeout_s * 1000 >= self.max_poll_interval_ms:
            raise ValueError(
                f"decode_timeout_s ({self.decode_timeout_s:g}) must be below "
                f"max_poll_interval_ms ({self.max_poll_interval_ms} ms)"
            )
        return self

    def check_files(self) -> None:
        """Raise ValueError naming the first file setting whose file cannot be read.

        Paths are quoted (``!r``): a newline in one must not break the one-line error.
        Not a validator: the settings stay a description of a deployment (tests/deploy builds
        them from manifests whose mounted files exist only in the pod); a process that is about
        to connect calls this first. Without it a missing CA file surfaces as a broker that
        "is not there" retried for ever, or as a Redis "Error 2" on every batch.
        """
        for name in FILE_SETTINGS:
            path = getattr(self, name)
            if not path:  # unset (an empty variable is unset for the clients too)
                continue
            reason = unreadable_file_reason(path)
            if reason is not None:
                raise ValueError(f"{name}: {path!r}: {reason}")
        for name in CA_SETTINGS:
            path = getattr(self, name)
            reason = bad_ca_file_reason(path) if path else None
            if reason is not None:
                raise ValueError(f"{name}: {path!r}: {reason}")
        for cert, key in CERT_KEY_SETTINGS:
            certfile, keyfile = getattr(self, cert), getattr(self, key) or None
            reason = bad_cert_chain_reason(certfile, keyfile) if certfile else None
            if reason is not None:
                shown = f"{cert}: {certfile!r}" + (f" with {key}: {keyfile!r}" if keyfile else "")
                raise ValueError(f"{shown}: {reason}")

    def ignored_settings(self) -> list[str]:
        """One line for each TLS or SASL setting that is set but unused: the protocol in force
        does not use it (``ssl_*`` under a PLAINTEXT protocol, ``sasl_*`` without SASL, and
        ``redis_tls_*`` with a ``redis://`` or ``unix://`` URL). Not refused: one ConfigMap may
        name the CA files for every environment; but an operator who meant TLS or SASL
        otherwise sees nothing say it is off."""
        lines = []
        protocol = self.security_protocol
        if protocol in ("PLAINTEXT", "SASL_PLAINTEXT"):
            for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
                if getattr(self, name):
                    lines.append(f"{name} is ignored: security_protocol {protocol} uses no TLS")
            if not self.ssl_check_hostname:
                lines.append(
                    f"ssl_check_hostname false is ignored: security_protocol {protocol} uses no TLS"
                )
        if not protocol.startswith("SASL"):
            for name in ("sasl_mechanism", "sasl_username", "sasl_password"):
                if getattr(self, name) is not None:
                    lines.append(f"{name} is ignored: security_protocol {protocol} uses no SASL")
        if not self.redis_url.startswith("rediss://"):
            scheme = self.redis_url.partition("://")[0]
            for name in ("redis_tls_ca_certs", "redis_tls_certfile", "redis_tls_keyfile"):
                if getattr(self, name):
                    lines.append(
                        f"{name} is ignored: redis_url is {scheme}://, not rediss:// (TLS)"
                    )
        return lines

    def __repr_args__(self):
        for key, value in super().__repr_args__():
            yield key, (_mask_url_password(value) if key == "redis_url" else value)

    def redacted(self) -> dict:
        """The settings as logged at start: secrets masked."""
        data = self.model_dump(mode="json")
        for key in ("sasl_password", "redis_password"):
            if data.get(key) is not None:
                data[key] = "**********"
        data["redis_url"] = _mask_url_password(self.redis_url)
        return data


# CARSTREAM_* variables the project's own files read that are no worker setting: exported in a
# shell that also runs `worker trends`, they are not typos
PROJECT_VARIABLES = frozenset({"CARSTREAM_BUNDLE_DIR"})  # deploy/compose.yaml's bundle mount


def unknown_env_settings(
    environ: Mapping[str, str] | None = None,
) -> list[tuple[str, str | None]]:
    """``CARSTREAM_*`` variables that are no setting, each with the closest setting's variable.

    WorkerSettings reads the variables of its fields and ignores every other one, so a typo
    (``CARSTREAM_DECODE_THRAEDS``) silently leaves the default in force. Not an error: test
    harnesses and docker compose use ``CARSTREAM_*`` variables of their own.
    """
    environ = os.environ if environ is None else environ
    prefix = WorkerSettings.model_config["env_prefix"].lower()
    fields = list(WorkerSettings.model_fields)
    found: list[tuple[str, str | None]] = []
    for key in sorted(environ):
        if not key.lower().startswith(prefix) or key.upper() in PROJECT_VARIABLES:
            continue
        name = key[len(prefix) :].lower()
        if name in WorkerSettings.model_fields:  # case_sensitive=False: any case is read
            continue
        close = difflib.get_close_matches(name, fields, n=1, cutoff=0.75)
        found.append((key, (prefix + close[0]).upper() if close else None))
    return found


def unknown_env_warnings(environ: Mapping[str, str] | None = None) -> list[str]:
    """One line per :func:`unknown_env_settings` variable, as every CLI that reads the worker's
    settings (``run``, ``trends``, ``produce``) warns about it, each in its own way."""
    return [
        f"{variable} is not a worker setting and is ignored"
        + (f"; did you mean {closest}?" if closest else "")
        for variable, closest in unknown_env_settings(environ)
    ]
