"""Fetch ``image_url`` posts without letting a post aim the worker at the internal network.

The host name is resolved once, every address is vetted, and the connection goes to the vetted
address (no second lookup, so DNS rebinding cannot swap it). Redirects are followed by hand and
vetted the same way. One wall-clock deadline covers connect, headers and body, so a slow-drip
server cannot hold a decode thread; the body is read in chunks against a size cap.
"""

from __future__ import annotations

import http.client
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from worker.errors import PostError

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[..., list]
Vetter = Callable[[IPAddress], "str | None"]

_METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_REDIRECTS = {301, 302, 303, 307, 308}
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class UrlPolicy:
    enabled: bool = True
    timeout_s: float = 5.0
    max_bytes: int = 20 * 1024 * 1024
    allow_private: bool = False
    allow_hosts: tuple[str, ...] = ()
    max_redirects: int = 3

    @classmethod
    def from_settings(cls, settings) -> UrlPolicy:
        return cls(
            enabled=settings.url_fetch_enabled,
            timeout_s=settings.url_timeout_s,
            max_bytes=settings.url_max_bytes,
            allow_private=settings.url_allow_private,
            allow_hosts=tuple(h.lower() for h in settings.url_allow_hosts),
        )


def is_refused_address(ip: IPAddress) -> str | None:
    """Why this address must not be fetched from, or None when it is a public unicast address."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _METADATA:
            return "cloud metadata address"
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None:
            reason = is_refused_address(embedded)
            return f"embeds {embedded}: {reason}" if reason else None
        if ip in ipaddress.ip_network("::/96"):  # IPv4-compatible (deprecated)
            return "IPv4-compatible IPv6 address"
    if ip in _METADATA:
        return "cloud metadata address"
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
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _vet_url(url: str, policy: UrlPolicy) -> tuple[str, str, int, str]:
    """(scheme, host, port, path+query) of an acceptable URL, or PostError url_refused."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise PostError("url_refused", f"malformed URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise PostError("url_refused", f"scheme {scheme or '(none)'!r} is not http(s)")
    if parts.username is not None or parts.password is not None:
        raise PostError("url_refused", "credentials in URLs are not accepted")
    host = (parts.hostname or "").lower()
    if not host:
        raise PostError("url_refused", "URL has no host")
    if policy.allow_hosts and host not in policy.allow_hosts:
        raise PostError("url_refused", f"host {host} is not in the allow-list")
    if _parse_ip_literal(host) is None and (
        host.replace(".", "").isdigit() or host.startswith("0x")
    ):
        # 2130706433, 0x7f.1, 017700000001: numeric forms libc would read as addresses
        raise PostError("url_refused", f"non-canonical numeric host {host!r}")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return scheme, host, port or (443 if scheme == "https" else 80), path


def _resolve(host: str, port: int, policy: UrlPolicy, resolver: Resolver, vet: Vetter) -> str:
    """The one address to connect to, after vetting every address the name resolves to."""
    literal = _parse_ip_literal(host)
    if literal is not None:
        addresses = [literal]
    else:
        try:
            infos = resolver(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError, OSError) as exc:
            raise PostError("url_fetch_failed", f"cannot resolve {host}: {exc}") from None
        addresses = [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]
        if not addresses:
            raise PostError("url_fetch_failed", f"{host} resolves to no address")
    if not policy.allow_private:
        for ip in addresses:
            reason = vet(ip)
            if reason:
                raise PostError("url_refused", f"{host} resolves to {ip}: {reason}")
    return str(addresses[0])


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a fixed address, with SNI and certificate checks against the URL's host name."""

    def __init__(self, ip: str, host: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._ip = ip

    def connect(self) -> None:
        sock = socket.create_connection((self._ip, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _remaining(deadline: float, url: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise PostError("url_fetch_failed", f"timed out fetching {url}")
    return left


def fetch(
    url: str,
    policy: UrlPolicy,
    resolver: Resolver = socket.getaddrinfo,
    vet: Vetter | None = None,
) -> bytes:
    """The body of ``url``; PostError url_refused, url_fetch_failed or too_large otherwise.

    ``resolver`` and ``vet`` (default :func:`is_refused_address`) are injectable for tests.
    """
    vet = vet or is_refused_address
    if not policy.enabled:
        raise PostError("url_refused", "fetching image URLs is disabled on this worker")
    deadline = time.monotonic() + policy.timeout_s
    current = url
    for _hop in range(policy.max_redirects + 1):
        scheme, host, port, path = _vet_url(current, policy)
        ip = _resolve(host, port, policy, resolver, vet)
        shown = f"{scheme}://{host}:{port}{urlsplit(current).path}"  # no query: it may hold tokens
        timeout = _remaining(deadline, shown)
        if scheme == "https":
            conn: http.client.HTTPConnection = _PinnedHTTPSConnection(ip, host, port, timeout)
        else:
            conn = http.client.HTTPConnection(ip, port, timeout=timeout)
        try:
            default_port = 443 if scheme == "https" else 80
            host_header = host if port == default_port else f"{host}:{port}"
            if ":" in host and not host.startswith("["):
                host_header = f"[{host}]" if port == default_port else f"[{host}]:{port}"
            conn.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", host_header)
            conn.putheader("User-Agent", "carstream-worker/1")
            conn.putheader("Accept", "image/*")
            conn.endheaders()
            response = conn.getresponse()
            if response.status in _REDIRECTS:
                location = response.getheader("Location")
                if not location:
                    raise PostError("url_fetch_failed", f"redirect without Location from {shown}")
                current = urljoin(current, location)
                log.debug("redirect %s -> %s", shown, urlsplit(current).path)
                continue
            if not 200 <= response.status < 300:
                raise PostError("url_fetch_failed", f"HTTP {response.status} from {shown}")
            length = response.getheader("Content-Length")
            if length and length.isdigit() and int(length) > policy.max_bytes:
                raise PostError("too_large", f"{shown} is {length} bytes, limit {policy.max_bytes}")
            body = bytearray()
            while True:
                if conn.sock is not None:
                    conn.sock.settimeout(_remaining(deadline, shown))
                chunk = (
                    response.read1(_CHUNK) if hasattr(response, "read1") else response.read(_CHUNK)
                )
                if not chunk:
                    break
                body += chunk
                if len(body) > policy.max_bytes:
                    raise PostError("too_large", f"{shown} sent over {policy.max_bytes} bytes")
                _remaining(deadline, shown)
            return bytes(body)
        except PostError:
            raise
        except (OSError, http.client.HTTPException) as exc:
            if time.monotonic() >= deadline or isinstance(exc, TimeoutError | socket.timeout):
                raise PostError("url_fetch_failed", f"timed out fetching {shown}") from None
            raise PostError(
                "url_fetch_failed", f"{shown}: {exc.__class__.__name__}: {exc}"
            ) from None
        finally:
            conn.close()
    raise PostError("url_refused", f"more than {policy.max_redirects} redirects from {url}")
