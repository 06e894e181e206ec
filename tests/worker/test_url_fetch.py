"""The URL policy: address classification, scheme and host rules, and real fetches from a local
HTTP server (ok, 404, oversized, slow drip, redirects)."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from worker.errors import PostError
from worker.url_fetch import UrlPolicy, fetch, is_refused_address


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "fd00:ec2::254",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "2002:7f00:1::1",  # 6to4 embedding 127.0.0.1
        "ff02::1",
    ],
)
def test_internal_addresses_are_refused(address):
    assert is_refused_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "151.101.1.69", "2001:4860:4860::8888"])
def test_public_addresses_are_allowed(address):
    assert is_refused_address(ipaddress.ip_address(address)) is None


def fake_resolver(mapping: dict[str, str]):
    def resolve(host, port, type=socket.SOCK_STREAM):
        if host not in mapping:
            raise socket.gaierror(f"unknown host {host}")
        return [(socket.AF_INET, type, 6, "", (mapping[host], port))]

    return resolve


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://example.com/a.jpg",
        "gopher://example.com/",
        "data:image/png;base64,AAAA",
        "http://user:pw@example.com/a.jpg",
        "http://127.0.0.1/a.jpg",
        "http://[::1]/a.jpg",
        "http://169.254.169.254/latest/meta-data/",
        "http://2130706433/",
        "http://0x7f000001/",
        "http:///nohost",
    ],
)
def test_refused_urls(url):
    with pytest.raises(PostError) as info:
        fetch(url, UrlPolicy(), resolver=fake_resolver({}))
    assert info.value.kind == "url_refused", info.value.reason


def test_a_name_resolving_to_an_internal_address_is_refused():
    with pytest.raises(PostError) as info:
        fetch(
            "http://innocent.example/a.jpg",
            UrlPolicy(),
            fake_resolver({"innocent.example": "10.0.0.5"}),
        )
    assert info.value.kind == "url_refused" and "10.0.0.5" in info.value.reason


def test_allow_list_and_disabled_policy():
    policy = UrlPolicy(allow_hosts=("cdn.example",))
    with pytest.raises(PostError, match="allow-list"):
        fetch("http://other.example/a.jpg", policy, fake_resolver({"other.example": "8.8.8.8"}))
    with pytest.raises(PostError, match="disabled"):
        fetch("http://cdn.example/a.jpg", UrlPolicy(enabled=False))


def test_unresolvable_name_is_a_fetch_failure():
    with pytest.raises(PostError) as info:
        fetch("http://nowhere.invalid/a.jpg", UrlPolicy(), fake_resolver({}))
    assert info.value.kind == "url_fetch_failed"


# --- against a real local server -----------------------------------------------------------

BODY = b"\x89PNG fake image bytes" * 10


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/ok":
            self._send(200, BODY)
        elif self.path == "/host":
            self._send(200, self.headers["Host"].encode())
        elif self.path == "/missing":
            self._send(404, b"no")
        elif self.path == "/big":
            self._send(200, b"x" * 5000)
        elif self.path == "/big-chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for _ in range(10):
                self.wfile.write(b"3e8\r\n" + b"y" * 1000 + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        elif self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b"z")
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass
        elif self.path.startswith("/redirect/"):
            target = self.path.removeprefix("/redirect/")
            self.send_response(302)
            self.send_header("Location", target if "://" in target else "/" + target)
            self.end_headers()
        elif self.path.startswith("/loop"):
            self.send_response(301)
            self.send_header("Location", "/loop")
            self.end_headers()
        else:
            self._send(404, b"")

    def _send(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()


LOCAL = UrlPolicy(allow_private=True, timeout_s=2.0, max_bytes=2000)


def test_fetch_ok_sends_the_host_header(server):
    assert fetch(server + "/ok", LOCAL) == BODY
    assert fetch(server + "/host", LOCAL).decode() == server.removeprefix("http://")


def test_http_errors_are_fetch_failures(server):
    with pytest.raises(PostError) as info:
        fetch(server + "/missing", LOCAL)
    assert info.value.kind == "url_fetch_failed" and "404" in info.value.reason


@pytest.mark.parametrize("path", ["/big", "/big-chunked"])
def test_oversized_bodies_are_refused(server, path):
    with pytest.raises(PostError) as info:
        fetch(server + path, LOCAL)
    assert info.value.kind == "too_large"


def test_slow_drip_is_cut_at_the_deadline(server):
    started = time.monotonic()
    with pytest.raises(PostError) as info:
        fetch(server + "/slow", UrlPolicy(allow_private=True, timeout_s=1.0))
    elapsed = time.monotonic() - started
    assert info.value.kind == "url_fetch_failed"
    assert elapsed < 3.0  # the server would drip for 10 s


def test_redirects_are_followed_within_the_limit(server):
    assert fetch(server + "/redirect/ok", LOCAL) == BODY
    with pytest.raises(PostError) as info:
        fetch(server + "/loop", LOCAL)
    assert info.value.kind == "url_refused" and "redirects" in info.value.reason


def test_every_redirect_hop_is_vetted(server):
    """The local test server stands in for a public host: a vetter that refuses only 10/8
    lets the first hop reach it, and the redirect to 10.0.0.1 must then be refused by the
    same vetter (the worker uses is_refused_address, tested above)."""
    port = int(server.rsplit(":", 1)[1])
    resolver = fake_resolver({"public.test": "127.0.0.1"})

    def vet(ip):
        return "private" if ip in ipaddress.ip_network("10.0.0.0/8") else None

    policy = UrlPolicy(timeout_s=2.0, max_bytes=2000)
    assert fetch(f"http://public.test:{port}/ok", policy, resolver, vet) == BODY
    with pytest.raises(PostError) as info:
        fetch(f"http://public.test:{port}/redirect/http://10.0.0.1/x.jpg", policy, resolver, vet)
    assert info.value.kind == "url_refused" and "10.0.0.1" in info.value.reason
    # and with the real vetter the loopback first hop is refused outright
    with pytest.raises(PostError, match="url_refused"):
        fetch(f"http://public.test:{port}/ok", policy, resolver)
