"""Fetch ``image_url`` posts without letting a post aim the worker at the internal network.

The host name is resolved once, every address is vetted, and the connection goes to the vetted
address (no second lookup, so DNS rebinding cannot swap it). Redirects are followed by hand and
vetted the same way. One wall-clock deadline covers connect, headers and body, so a slow-drip
server cannot hold a decode thread; the body is read in chunks against a size cap.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import NamedTuple
from urllib.parse import quote, urljoin, urlsplit

from worker.errors import PostError
from worker.host_breaker import HostBreaker
from worker.host_names import ascii_host
from worker.thread_names import name_this_thread

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[..., list]
Vetter = Callable[[IPAddress], "str | None"]

_METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_IPV4_COMPAT = ipaddress.ip_network("::/96")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known prefix: embeds an IPv4 address
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # local-use NAT64 (RFC 8215)
_NUMERIC_LABEL = re.compile(r"(0x[0-9a-f]*|[0-9]+)")
_PATH_SAFE = "/%!$&'()*+,;=:@-._~"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # C0 controls and DEL
_CONTROL_NAMES = {"\t": "a tab", "\n": "a line feed", "\r": "a carriage return", "\x7f": "DEL"}
# getaddrinfo cannot be interrupted, so it runs here and the caller waits at most its deadline;
# a resolver stuck past that keeps one of these threads until libc gives up, not a decode thread.
# Concurrent lookups of one name share one thread, and one zone (example.com, for every name
# under it) has at most _ZONE_LOOKUPS in flight: a domain whose DNS never answers, under however
# many names, cannot take every thread and starve every other host's lookups.
_RESOLVE_THREADS = 64
_ZONE_LOOKUPS = 8
# named in the kernel too: a thread inherits the kernel name of the decode thread that starts it
_RESOLVE_POOL = ThreadPoolExecutor(
    max_workers=_RESOLVE_THREADS, thread_name_prefix="url-resolve", initializer=name_this_thread
)
# second-level labels under which names are registered (foo.co.uk): the zone keeps three labels
_SECOND_LEVEL = {"ac", "co", "com", "edu", "gob", "gov", "ne", "net", "or", "org"}
# a timeout is a strike against its origin only when that origin's own work (lookup, connect,
# TLS, response, body) began with at least this share of url_timeout_s left: a redirect that
# used most of the deadline, or a wait for a resolver thread, is not the next origin's fault
_FAIR_SHARE = 0.5
_REDIRECTS = {301, 302, 303, 307, 308}
_CHUNK = 64 * 1024
# a body is refused once it has taken _TINY_READS reads averaging under _MIN_PIECE bytes: each
# read of a 1-byte chunk is pure Python under the GIL, so such a body would hold a CPU core, not
# just a thread, for url_timeout_s; real servers send KBs a read (a TCP segment is ~1.4 KB)
_TINY_READS = 1024
_MIN_PIECE = 256


class FetchTimeoutError(PostError):
    """A fetch or name lookup that ran out of time: a strike against its origin (HostBreaker)
    when the origin's own work had its fair share of the deadline.

    ``began``: when the timed-out lookup started running (monotonic), or None when it never did
    (it waited for a resolver thread all along); unset for a timeout after the lookup.
    """

    def __init__(self, reason: str, began: float | None = None) -> None:
        super().__init__("url_fetch_failed", reason)
        self.began = began


@dataclass(frozen=True)
class UrlPolicy:
    """What ``image_url`` posts may fetch; built once from the worker settings.

    ``breaker``: the replica's one :class:`HostBreaker` (shared by its decode threads), or None.
    """

    enabled: bool = True
    timeout_s: float = 5.0
    max_bytes: int = 20 * 1024 * 1024
    allow_private: bool = False
    allow_hosts: tuple[str, ...] = ()
    max_redirects: int = 3
    breaker: HostBreaker | None = field(default=None, compare=False)

    @classmethod
    def from_settings(
        cls, settings, on_host_pause: Callable[[str], None] | None = None
    ) -> UrlPolicy:
        """The policy of a :class:`worker.settings.WorkerSettings` (any object with its fields);
        ``on_host_pause(host)`` is called each time the breaker pauses a host (a metric)."""
        strikes = settings.url_host_timeouts
        pause_s = settings.url_host_pause_s
        return cls(
            enabled=settings.url_fetch_enabled,
            timeout_s=settings.url_timeout_s,
            max_bytes=settings.url_max_bytes,
            allow_private=settings.url_allow_private,
            allow_hosts=tuple(h.lower() for h in settings.url_allow_hosts),
            breaker=HostBreaker(strikes, pause_s, on_pause=on_host_pause) if strikes else None,
        )


def is_refused_address(ip: IPAddress) -> str | None:
    """Why this address must not be fetched from, or None when it is a public unicast address.

    IPv6 forms that carry an IPv4 address (mapped, compatible, 6to4, Teredo, NAT64) are judged
    by the address they carry, since that is where the packets can end up.
    """
    if ip in _METADATA:
        return "cloud metadata address"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.is_loopback or ip.is_unspecified:
            return "loopback address" if ip.is_loopback else "unspecified address"
        if ip in _IPV4_COMPAT:
            return "IPv4-compatible IPv6 address (deprecated, never a public destination)"
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            reason = is_refused_address(embedded)
            return f"embeds {embedded}: {reason}" if reason else None
        if ip in _NAT64_LOCAL:
            return "local-use NAT64 address"
    checks = [
        ("loopback", ip.is_loopback),
        ("unspecified", ip.is_unspecified),
        ("link-local", ip.is_link_local),
        ("multicast", ip.is_multicast),
        ("reserved", ip.is_reserved),
        ("private", ip.is_private),
        ("site-local", isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local),
        ("carrier-grade NAT", isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT),
        ("not globally routable", not ip.is_global),
    ]
    for reason, hit in checks:
        if hit:
            return f"{reason} address"
    return None


def _parse_ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _refuse_controls(url: str, what: str) -> None:
    """PostError url_refused when ``url`` holds a C0 control character or DEL.

    urlsplit and urljoin drop tabs and line breaks anywhere in a URL and strip the other
    control characters from its ends (WHATWG's cleaning), so the URL fetched would not be the
    one the post (or the redirect) sent: refused, naming the character and where it is.
    """
    found = _CONTROL.search(url)
    if found is not None:
        char = found.group()
        name = _CONTROL_NAMES.get(char, f"control character {char!r}")
        raise PostError("url_refused", f"{what} holds {name} at offset {found.start()}")


def _vet_url(url: str, policy: UrlPolicy) -> tuple[str, str, int, str]:
    """(scheme, host, port, path+query) of an acceptable URL, or PostError url_refused."""
    _refuse_controls(url, "URL")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise PostError("url_refused", f"malformed URL: {exc}") from None
    if port == 0:  # not "no port": the default port would be fetched instead
        raise PostError("url_refused", "port 0 is not a TCP port to fetch from")
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise PostError("url_refused", f"scheme {scheme or '(none)'!r} is not http(s)")
    if parts.username is not None or parts.password is not None:
        raise PostError("url_refused", "credentials in URLs are not accepted")
    host = (parts.hostname or "").lower().removesuffix(".")
    if not host:
        raise PostError("url_refused", "URL has no host")
    literal = _parse_ip_literal(host)
    if literal is None:
        if all(_NUMERIC_LABEL.fullmatch(label) for label in host.split(".")):
            # 2130706433, 0x7f.1, 0177.0.0.1, 127.1: forms libc reads as addresses but that are
            # not the canonical dotted quad; refused rather than re-implementing inet_aton
            raise PostError("url_refused", f"non-canonical numeric host {host!r}")
        try:
            host = ascii_host(host)  # what DNS and the Host header carry, as browsers map it
        except ValueError:
            raise PostError("url_refused", f"invalid host name {host!r}") from None
    # an IPv6 literal has many spellings (2001:db8:0::1): compared in its compressed form
    key = host if literal is None else str(literal)
    if policy.allow_hosts and key not in {h.lower() for h in policy.allow_hosts}:
        raise PostError("url_refused", f"host {host} is not in the allow-list")
    path = quote(parts.path or "/", safe=_PATH_SAFE)
    if parts.query:
        path += "?" + quote(parts.query, safe=_PATH_SAFE + "?")
    return scheme, host, port or (443 if scheme == "https" else 80), path


def _zone(host: str) -> str:
    """The domain a name is registered under, roughly (no public-suffix list): its last two
    labels, or three under a second-level label of a two-letter TLD (img.foo.co.uk: foo.co.uk)."""
    labels = host.split(".")
    keep = 3 if len(labels[-1]) == 2 and len(labels) > 2 and labels[-2] in _SECOND_LEVEL else 2
    return ".".join(labels[-keep:])


@dataclass(eq=False)
class _Lookup:
    """One name lookup in flight, shared by every fetch that wants that name meanwhile."""

    zone: str
    future: Future | None = None
    began: float | None = None  # when a resolver thread took it; None while it waits for one
    waiters: int = 0


_lookups_changed = threading.Condition()
_lookups: dict[tuple[Resolver, str], _Lookup] = {}  # in flight, by (resolver, name)
_zone_lookups: dict[str, int] = {}  # lookups in flight per zone


def _forget(key: tuple[Resolver, str], lookup: _Lookup) -> None:
    """Drop a finished (or never started) lookup; the caller holds ``_lookups_changed``."""
    if _lookups.get(key) is lookup:
        del _lookups[key]
        left = _zone_lookups.pop(lookup.zone) - 1
        if left:
            _zone_lookups[lookup.zone] = left
        _lookups_changed.notify_all()


def _run_lookup(key: tuple[Resolver, str], lookup: _Lookup, port: int) -> list:
    resolver, host = key
    with _lookups_changed:
        lookup.began = time.monotonic()
    try:
        return resolver(host, port, type=socket.SOCK_STREAM)
    finally:
        with _lookups_changed:
            _forget(key, lookup)


def _lookup(host: str, port: int, resolver: Resolver, deadline: float) -> tuple[list, float]:
    """``resolver``'s answer for ``host`` and when this fetch's share of the lookup began;
    FetchTimeoutError at the deadline, its ``began`` None when no resolver thread took it."""
    _remaining(deadline, host)  # an earlier hop used the deadline up: no lookup to start
    key = (resolver, host)
    called = time.monotonic()
    with _lookups_changed:
        zone = _zone(host)
        while (lookup := _lookups.get(key)) is None and _zone_lookups.get(zone, 0) >= _ZONE_LOOKUPS:
            left = deadline - time.monotonic()
            if left <= 0 or not _lookups_changed.wait(left):
                raise FetchTimeoutError(
                    f"timed out resolving {host}: {_ZONE_LOOKUPS} lookups under {zone} "
                    "already in flight"
                )
        if lookup is None:
            lookup = _Lookup(zone)
            # the lookup's thread waits for this lock, so it is registered before it runs
            lookup.future = _RESOLVE_POOL.submit(_run_lookup, key, lookup, port)
            _lookups[key] = lookup
            _zone_lookups[zone] = _zone_lookups.get(zone, 0) + 1
        lookup.waiters += 1
    future = lookup.future
    try:
        infos = future.result(timeout=max(0.0, deadline - time.monotonic()))
    except FutureTimeout:
        began = lookup.began
        raise FetchTimeoutError(
            f"timed out resolving {host}", None if began is None else max(began, called)
        ) from None
    finally:
        with _lookups_changed:
            lookup.waiters -= 1
            if not lookup.waiters and future.cancel():  # never ran, and nobody wants it now
                _forget(key, lookup)
    return infos, max(lookup.began or called, called)


def _resolve(
    host: str, port: int, policy: UrlPolicy, resolver: Resolver, vet: Vetter, deadline: float
) -> tuple[str, float]:
    """The one address to connect to, after vetting every address the name resolves to, and
    when this hop's own work began (its lookup ran, not waited for a thread)."""
    literal = _parse_ip_literal(host)
    if literal is not None:
        addresses = [literal]
        began = time.monotonic()
    else:
        try:
            infos, began = _lookup(host, port, resolver, deadline)
        except (OSError, UnicodeError) as exc:  # socket.gaierror is an OSError
            raise PostError("url_fetch_failed", f"cannot resolve {host}: {exc}") from None
        addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
        if not addresses:
            raise PostError("url_fetch_failed", f"{host} resolves to no address")
    if not policy.allow_private:
        for ip in addresses:
            reason = vet(ip)
            if reason:
                raise PostError("url_refused", f"{host} resolves to {ip}: {reason}")
    return str(addresses[0]), began


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP to an already vetted address: no name lookup happens at connect time."""

    def __init__(self, ip: str, host: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._ip = ip
        self.live_sock: socket.socket | None = None

    def connect(self) -> None:
        self.sock = self.live_sock = socket.create_connection((self._ip, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a vetted address, with SNI and certificate checks against the URL's host name."""

    def __init__(self, ip: str, host: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._ip = ip
        # http.client drops self.sock once a "Connection: close" response starts; the body is
        # still read from this socket, which the deadline must be able to reach
        self.live_sock: socket.socket | None = None

    def connect(self) -> None:
        # live_sock is set before the handshake so the deadline watchdog can cut a slow one
        self.live_sock = socket.create_connection((self._ip, self.port), self.timeout)
        self.sock = self.live_sock = self._context.wrap_socket(
            self.live_sock, server_hostname=self.host
        )


class _DeadlineTimer(threading.Timer):
    """A fetch's deadline thread, named ``url-deadline`` in the kernel too (a thread inherits
    its creator's kernel name: it showed as the decode thread that started the fetch)."""

    def __init__(self, seconds: float, function: Callable[[], None]) -> None:
        super().__init__(seconds, function)
        self.name = "url-deadline"

    def run(self) -> None:
        name_this_thread()
        super().run()


class _Deadline:
    """Wall-clock limit for one fetch.

    Socket timeouts are per operation, so a server dripping one header byte a second would never
    trip them; at the deadline a timer shuts the connection's socket down, which wakes any
    blocked read with an error.
    """

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds
        self.conn: _PinnedHTTPConnection | _PinnedHTTPSConnection | None = None
        self._timer = _DeadlineTimer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        sock = self.conn.live_sock if self.conn is not None else None
        if sock is not None:
            # socket.socket.shutdown, not SSLSocket's, which would unwrap TLS mid-read
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def cancel(self) -> None:
        self._timer.cancel()

    @property
    def passed(self) -> bool:
        return time.monotonic() >= self.at


def _remaining(deadline: float, what: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise FetchTimeoutError(f"timed out fetching {what}")
    return left


class Fetched(NamedTuple):
    """A fetched body, with what the server said it is (for a dead letter's reason)."""

    data: bytes
    content_type: str | None = None
    content_encoding: str | None = None

    def described(self) -> str:
        """``the server sent Content-Type 'text/html'``..., or "" when it said nothing."""
        said = [
            f"{name} {value!r}"
            for name, value in (
                ("Content-Type", self.content_type),
                ("Content-Encoding", self.content_encoding),
            )
            if value
        ]
        return f"the server sent {' and '.join(said)}" if said else ""


def fetch(
    url: str,
    policy: UrlPolicy,
    resolver: Resolver = socket.getaddrinfo,
    *,
    vet: Vetter | None = None,
) -> bytes:
    """The body of ``url``; PostError url_refused, url_fetch_failed or too_large otherwise."""
    return fetch_response(url, policy, resolver, vet=vet).data


def fetch_response(
    url: str,
    policy: UrlPolicy,
    resolver: Resolver = socket.getaddrinfo,
    *,
    vet: Vetter | None = None,
) -> Fetched:
    """:func:`fetch`, with the body's declared type and encoding.

    ``resolver`` (``getaddrinfo``'s signature) and ``vet`` (default :func:`is_refused_address`)
    are injection points for tests; the worker passes neither.
    """
    vet = vet or is_refused_address
    if not policy.enabled:
        raise PostError("url_refused", "fetching image URLs is disabled on this worker")
    breaker = policy.breaker
    deadline = _Deadline(policy.timeout_s)
    try:
        current = url
        for _hop in range(policy.max_redirects + 1):
            scheme, host, port, path = _vet_url(current, policy)
            name = f"[{host}]" if ":" in host else host  # IPv6
            # the breaker's key: a post aiming https at a host's http port, or at a port that
            # drops packets, strikes that origin, not the host's real one
            origin = f"{scheme}://{name}:{port}"
            shown = f"{origin}{path.split('?', 1)[0]}"  # no query: it may hold tokens
            if breaker is not None and (refusal := breaker.refusal(origin)) is not None:
                raise PostError("url_fetch_failed", refusal)
            began: float | None = None
            try:
                ip, began = _resolve(host, port, policy, resolver, vet, deadline.at)
                log.debug("fetching %s from %s", shown, ip)
                location = _get(ip, scheme, host, port, path, shown, policy, deadline)
            except FetchTimeoutError as exc:
                if breaker is not None:
                    _strike(
                        breaker, origin, exc.began if began is None else began, deadline, policy
                    )
                raise
            except PostError:  # an answer, or a refusal that returned at once: not a hang
                if breaker is not None:
                    breaker.answered(origin)
                raise
            if breaker is not None:
                breaker.answered(origin)
            if isinstance(location, Fetched):
                log.debug("fetched %d bytes from %s", len(location.data), shown)
                return location
            _refuse_controls(location, "redirect Location")
            current = urljoin(current, location)
            log.debug("redirect %s -> %s", shown, urlsplit(current)._replace(query="").geturl())
        raise PostError("url_refused", f"more than {policy.max_redirects} redirects")
    finally:
        deadline.cancel()


def _strike(
    breaker: HostBreaker, origin: str, began: float | None, deadline: _Deadline, policy: UrlPolicy
) -> None:
    """Count a timeout against ``origin`` only if its own work began with a fair share of the
    deadline: not time spent waiting for a resolver thread, nor a deadline used up by the hops
    before it (a slow redirect aimed at someone else's host)."""
    share = None if began is None else deadline.at - began
    if share is not None and share >= policy.timeout_s * _FAIR_SHARE:
        breaker.timed_out(origin)
    else:
        log.debug("timeout not counted against %s: its own work had %s s", origin, share)


def _header_text(value: str | None) -> str | None:
    """A response header as quoted in a reason: trimmed and capped (a server writes it)."""
    value = (value or "").strip()
    return value[:100] or None


def _get(
    ip: str,
    scheme: str,
    host: str,
    port: int,
    path: str,
    shown: str,
    policy: UrlPolicy,
    deadline: _Deadline,
) -> Fetched | str:
    """One GET: the body, or the Location of a redirect (not yet vetted)."""
    timeout = _remaining(deadline.at, shown)
    pinned = _PinnedHTTPSConnection if scheme == "https" else _PinnedHTTPConnection
    conn: _PinnedHTTPConnection | _PinnedHTTPSConnection = pinned(ip, host, port, timeout)
    deadline.conn = conn
    response: http.client.HTTPResponse | None = None
    try:
        default_port = 443 if scheme == "https" else 80
        name = f"[{host}]" if ":" in host else host
        conn.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", name if port == default_port else f"{name}:{port}")
        conn.putheader("User-Agent", "carstream-worker/1")
        conn.putheader("Accept", "image/*")
        conn.putheader("Connection", "close")
        conn.endheaders()
        response = conn.getresponse()
        if response.status in _REDIRECTS:
            location = response.getheader("Location")
            if not location:
                raise PostError("url_fetch_failed", f"redirect without Location from {shown}")
            return location
        if not 200 <= response.status < 300:
            raise PostError("url_fetch_failed", f"HTTP {response.status} from {shown}")
        length = response.getheader("Content-Length", "")
        if length.strip().isdigit() and int(length) > policy.max_bytes:
            raise PostError("too_large", f"{shown} is {length} bytes, limit {policy.max_bytes}")
        body = bytearray()
        reads = 0
        while True:
            left = _remaining(deadline.at, shown)
            if conn.live_sock is not None:
                conn.live_sock.settimeout(left)
            chunk = response.read1(_CHUNK)
            if not chunk:
                break
            body += chunk
            reads += 1
            if len(body) > policy.max_bytes:
                raise PostError("too_large", f"{shown} sent over {policy.max_bytes} bytes")
            if reads >= _TINY_READS and len(body) < reads * _MIN_PIECE:
                raise PostError(
                    "url_fetch_failed",
                    f"{shown} sent its body in tiny pieces: {len(body)} bytes in {reads} reads "
                    f"(at least {_MIN_PIECE} bytes a read on average are needed)",
                )
        _remaining(deadline.at, shown)  # the watchdog's shutdown also ends the loop, as an EOF
        if response.length:  # bytes still owed by Content-Length
            raise PostError("url_fetch_failed", f"{shown}: connection closed mid-body")
        return Fetched(
            bytes(body),
            _header_text(response.getheader("Content-Type")),
            _header_text(response.getheader("Content-Encoding")),
        )
    except PostError:
        raise
    except (OSError, http.client.HTTPException, ValueError) as exc:
        if deadline.passed or isinstance(exc, TimeoutError):
            raise FetchTimeoutError(f"timed out fetching {shown}") from None
        raise PostError("url_fetch_failed", f"{shown}: {exc.__class__.__name__}: {exc}") from None
    finally:
        deadline.conn = None
        if response is not None:  # owns the socket once the server says "Connection: close"
            response.close()
        conn.close()
