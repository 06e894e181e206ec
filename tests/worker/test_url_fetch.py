"""The URL policy: address classification, scheme and host rules, and real fetches from local
HTTP(S) servers (ok, 404, oversized, slow drip, redirects, certificate checks)."""

from __future__ import annotations

import contextlib
import gzip
import ipaddress
import json
import logging
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

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
        "2001:0:4136:e378:8000:63bf:f5ff:fffe",  # Teredo, client 10.0.0.1
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        "64:ff9b:1::a00:1",  # local-use NAT64
        "::127.0.0.1",  # IPv4-compatible
        "fec0::1",  # site-local
        "ff02::1",
        "198.18.0.1",  # benchmarking
        "192.0.2.1",  # documentation
    ],
)
def test_internal_addresses_are_refused(address):
    assert is_refused_address(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "address",
    ["8.8.8.8", "151.101.1.69", "2001:4860:4860::8888", "::ffff:8.8.8.8", "64:ff9b::808:808"],
)
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
        "http://0x7f.0.0.1/",
        "http://0177.0.0.1/",
        "http://127.1/",
        "http://127.0.0.1./",
        "http://[::ffff:127.0.0.1]/",
        "http://[fe80::1%25eth0]/",
        "http:///nohost",
        "http://bad..label/",
        "javascript:alert(1)",
    ],
)
def test_refused_urls(url):
    with pytest.raises(PostError) as info:
        fetch(url, UrlPolicy(), resolver=fake_resolver({}))
    assert info.value.kind == "url_refused", info.value.reason


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("http://img.example:0/a.jpg", "port 0"),
        ("https://img.example:000/a.jpg", "port 0"),
        # urlsplit drops tabs and line breaks and strips other controls from the ends: the URL
        # fetched would not be the one sent
        ("http://img.exa\tmple/a.jpg", "a tab at offset 14"),
        ("http://img.example/a\r\nX-Injected: 1", "a carriage return at offset 20"),
        ("http://img.example/a.jpg\n", "a line feed at offset 24"),
        ("\x01http://img.example/a.jpg", "control character '\\x01' at offset 0"),
        ("http://img.example/a\x00.jpg", "control character '\\x00' at offset 20"),
        ("http://img.example/a\x7f.jpg", "DEL at offset 20"),
    ],
)
def test_port_0_and_control_characters_are_refused_before_any_lookup(url, needle):
    asked = []

    def resolve(host, port, type=socket.SOCK_STREAM):  # never connects anywhere
        asked.append((host, port))
        raise socket.gaierror(f"unknown host {host}")

    with pytest.raises(PostError) as info:
        fetch(url, UrlPolicy(timeout_s=2.0), resolve)
    assert info.value.kind == "url_refused" and needle in info.value.reason, info.value.reason
    assert asked == []


def test_a_name_resolving_to_an_internal_address_is_refused():
    with pytest.raises(PostError) as info:
        fetch(
            "http://innocent.example/a.jpg",
            UrlPolicy(),
            fake_resolver({"innocent.example": "10.0.0.5"}),
        )
    assert info.value.kind == "url_refused" and "10.0.0.5" in info.value.reason


def test_any_internal_address_among_several_refuses_the_name():
    def resolve(host, port, type=socket.SOCK_STREAM):
        return [
            (socket.AF_INET, type, 6, "", ("8.8.8.8", port)),
            (socket.AF_INET6, type, 6, "", ("::1", port, 0, 0)),
        ]

    with pytest.raises(PostError) as info:
        fetch("http://mixed.example/a.jpg", UrlPolicy(), resolve)
    assert info.value.kind == "url_refused" and "::1" in info.value.reason


def test_allow_list_and_disabled_policy():
    policy = UrlPolicy(allow_hosts=("CDN.example",))
    with pytest.raises(PostError, match="allow-list"):
        fetch("http://other.example/a.jpg", policy, fake_resolver({"other.example": "8.8.8.8"}))
    # allowed host: gets past the allow-list to the address check
    with pytest.raises(PostError, match=r"resolves to 10\.0\.0\.1"):
        fetch("http://cdn.EXAMPLE/a.jpg", policy, fake_resolver({"cdn.example": "10.0.0.1"}))
    with pytest.raises(PostError, match="disabled"):
        fetch("http://cdn.example/a.jpg", UrlPolicy(enabled=False))


@pytest.mark.parametrize(
    ("url", "name"),
    [
        # IDNA 2003 (Python's "idna" codec) maps these to fass.de and strasse.example, other
        # registrants' domains; browsers (UTS #46, non-transitional) keep the letter
        ("http://faß.de/a.jpg", "xn--fa-hia.de"),
        ("http://STRAßE.example/a.jpg", "xn--strae-oqa.example"),
        ("http://bücher.de/a.jpg", "xn--bcher-kva.de"),
        ("http://☃.net/a.jpg", "xn--n3h.net"),  # a symbol IDNA 2008 refuses; browsers fetch it
        ("http://ＩＭＧ．example/a.jpg", "img.example"),  # full-width letters and dot
        ("http://my_cdn.example/a.jpg", "my_cdn.example"),  # DNS serves underscores
    ],
)
def test_host_names_are_looked_up_as_browsers_map_them(url, name):
    asked = []

    def resolve(host, port, type=socket.SOCK_STREAM):
        asked.append(host)
        raise socket.gaierror(f"unknown host {host}")

    with pytest.raises(PostError) as info:
        fetch(url, UrlPolicy(timeout_s=2.0), resolve)
    assert info.value.kind == "url_fetch_failed", info.value.reason
    assert asked == [name]


def test_unresolvable_name_is_a_fetch_failure():
    with pytest.raises(PostError) as info:
        fetch("http://nowhere.invalid/a.jpg", UrlPolicy(), fake_resolver({}))
    assert info.value.kind == "url_fetch_failed"


def test_a_hanging_resolver_is_cut_at_the_deadline():
    release = threading.Event()

    def hanging(host, port, type=socket.SOCK_STREAM):
        release.wait(30)
        return []

    started = time.monotonic()
    try:
        with pytest.raises(PostError) as info:
            fetch("http://slow-dns.example/a.jpg", UrlPolicy(timeout_s=0.3), hanging)
    finally:
        release.set()
    assert info.value.kind == "url_fetch_failed" and "resolving" in info.value.reason
    assert time.monotonic() - started < 2.0


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
        elif self.path.startswith("/echo"):
            self._send(200, self.path.encode())
        elif self.path == "/missing":
            self._send(404, b"no")
        elif self.path == "/expired-link":  # a CDN's error page, with a 200
            self._send(200, b"<html><body>This link has expired</body></html>", "text/html")
        elif self.path == "/gzipped":  # compressed though the client asked for no encoding
            body = gzip.compress(b"\x89PNG not really")
            self._send(200, body, "image/png", {"Content-Encoding": "gzip"})
        elif self.path == "/big":
            self._send(200, b"x" * 5000)
        elif self.path == "/big-chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:  # the client hangs up once past its byte limit: that is what is tested
                for _ in range(10):
                    self.wfile.write(b"3e8\r\n" + b"y" * 1000 + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")
            except OSError:
                pass
        elif self.path in ("/tiny-chunks", "/small-chunks"):
            # 5000 chunks of 1 byte, or 1100 of 300 bytes (over the read-count floor, but not
            # tiny on average: a server writing small but real pieces)
            piece = b"a" if self.path == "/tiny-chunks" else b"b" * 300
            count = 5000 if self.path == "/tiny-chunks" else 1100
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:  # the client hangs up once it refuses the body: that is what is tested
                self.wfile.write((b"%x\r\n" % len(piece) + piece + b"\r\n") * count)
                self.wfile.write(b"0\r\n\r\n")
            except OSError:
                pass
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
        elif self.path == "/slow-headers":
            try:
                for byte in b"HTTP/1.1 200 OK\r\nX-Padding: " + b"p" * 100:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass
            self.close_connection = True
        elif self.path.startswith("/redirect/"):
            target = self.path.removeprefix("/redirect/")
            self.send_response(302)
            self.send_header("Location", target if "://" in target else "/" + target)
            self.end_headers()
        elif self.path == "/redirect-tab":
            self.send_response(302)
            self.send_header("Location", "/o\tk")  # urljoin would drop the tab: "/ok"
            self.end_headers()
        elif self.path.startswith("/loop"):
            self.send_response(301)
            self.send_header("Location", "/loop")
            self.end_headers()
        else:
            self._send(404, b"")

    def _send(
        self, code: int, body: bytes, content_type: str | None = None, extra: dict | None = None
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        for name, value in {"Content-Type": content_type, **(extra or {})}.items():
            if value:
                self.send_header(name, value)
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
    httpd.server_close()


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


def test_a_body_in_tiny_chunks_is_refused_after_a_bounded_number_of_reads(server, monkeypatch):
    """Each 1-byte chunk is a read in pure Python under the GIL: left alone, such a body keeps a
    CPU core busy for url_timeout_s. It is refused after 1024 reads, however long the deadline."""
    import http.client

    reads = []
    read1 = http.client.HTTPResponse.read1

    def counted(self, n=-1):
        reads.append(n)
        return read1(self, n)

    monkeypatch.setattr(http.client.HTTPResponse, "read1", counted)
    policy = UrlPolicy(allow_private=True, timeout_s=30.0)  # 20 MiB: the size cap is far off
    with pytest.raises(PostError) as info:
        fetch(server + "/tiny-chunks", policy)
    assert info.value.kind == "url_fetch_failed"
    assert "tiny pieces: 1024 bytes in 1024 reads" in info.value.reason, info.value.reason
    assert len(reads) == 1024  # the CPU spent is bounded by reads, not by the deadline
    # pieces of a few hundred bytes are not tiny: fetched, whatever the number of reads
    reads.clear()
    assert fetch(server + "/small-chunks", policy) == b"b" * 300 * 1100
    assert len(reads) >= 1100


@pytest.mark.parametrize("path", ["/slow", "/slow-headers"])
def test_slow_drip_is_cut_at_the_deadline(server, path):
    """Per-read socket timeouts never trip on a byte every 0.1 s; the wall-clock deadline must."""
    started = time.monotonic()
    with pytest.raises(PostError) as info:
        fetch(server + path, UrlPolicy(allow_private=True, timeout_s=1.0))
    elapsed = time.monotonic() - started
    assert info.value.kind == "url_fetch_failed" and "timed out" in info.value.reason
    # a liveness bound, not a timing: the 1 s deadline must cut the drip, which would run 10 s;
    # the margin absorbs a loaded test machine
    assert elapsed < 5.0


def test_paths_are_percent_encoded_and_queries_never_logged(server, caplog):
    caplog.set_level(logging.DEBUG, logger="worker.url_fetch")
    body = fetch(server + "/echo/\u00fc x?token=SECRET&t=\u00e4", LOCAL)
    assert body == b"/echo/%C3%BC%20x?token=SECRET&t=%C3%A4"
    fetch(server + "/redirect/echo?token=SECRET", LOCAL)
    assert "fetching" in caplog.text and "SECRET" not in caplog.text


def test_redirects_are_followed_within_the_limit(server):
    assert fetch(server + "/redirect/ok", LOCAL) == BODY
    with pytest.raises(PostError) as info:
        fetch(server + "/loop", LOCAL)
    assert info.value.kind == "url_refused" and "redirects" in info.value.reason
    assert fetch(server + "/redirect/ok", UrlPolicy(allow_private=True, max_redirects=1)) == BODY
    with pytest.raises(PostError, match="redirects"):
        fetch(server + "/redirect/ok", UrlPolicy(allow_private=True, max_redirects=0))


def test_a_redirect_location_with_a_control_character_is_refused(server):
    with pytest.raises(PostError) as info:
        fetch(server + "/redirect-tab", LOCAL)
    assert info.value.kind == "url_refused"
    assert "redirect Location holds a tab at offset 2" in info.value.reason


# The loopback test server has to stand in for a public host without switching the address check
# off (allow_private=True would skip exactly what is under test). So the injected vetter exempts
# that one address, 127.0.0.1, and defers to the real is_refused_address for every other
# address: a redirect to another loopback address, a private one or the metadata service must
# still be refused on the hop it appears.
STANDIN = ipaddress.ip_address("127.0.0.1")


def standin_vet(ip):
    return None if ip == STANDIN else is_refused_address(ip)


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.2:{port}/ok",
        "http://10.0.0.1/x.jpg",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:{port}/ok",
        "http://2130706433/",
        "http://inside.test/x.jpg",
        "file:///etc/passwd",
    ],
)
def test_every_redirect_hop_is_vetted(server, target):
    port = int(server.rsplit(":", 1)[1])
    resolver = fake_resolver({"public.test": "127.0.0.1", "inside.test": "192.168.0.7"})
    policy = UrlPolicy(timeout_s=2.0, max_bytes=2000)  # allow_private=False
    assert fetch(f"http://public.test:{port}/ok", policy, resolver, vet=standin_vet) == BODY
    assert fetch(f"http://public.test:{port}/redirect/ok", policy, resolver, vet=standin_vet) == (
        BODY
    )
    url = f"http://public.test:{port}/redirect/{target.format(port=port)}"
    with pytest.raises(PostError) as info:
        fetch(url, policy, resolver, vet=standin_vet)
    assert info.value.kind == "url_refused", info.value.reason


def test_the_real_vetter_refuses_the_loopback_stand_in(server):
    port = int(server.rsplit(":", 1)[1])
    with pytest.raises(PostError, match="url_refused"):
        fetch(
            f"http://public.test:{port}/ok",
            UrlPolicy(),
            fake_resolver({"public.test": "127.0.0.1"}),
        )


# --- HTTPS: the connection goes to the vetted address, the certificate is checked for the name


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory) -> Iterator[tuple[int, Path]]:
    if not shutil.which("openssl"):
        pytest.skip("openssl CLI not installed")
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", "/CN=public.test",
         "-addext", "subjectAltName=DNS:public.test",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_port, cert
    httpd.shutdown()
    httpd.server_close()


def test_https_pins_the_address_and_verifies_the_url_host(tls_server, monkeypatch):
    port, cert = tls_server
    resolver = fake_resolver({"public.test": "127.0.0.1", "other.test": "127.0.0.1"})
    policy = UrlPolicy(allow_private=True, timeout_s=3.0)
    with pytest.raises(PostError) as info:  # self-signed: not trusted by the system store
        fetch(f"https://public.test:{port}/ok", policy, resolver)
    assert (
        info.value.kind == "url_fetch_failed" and "CERTIFICATE_VERIFY_FAILED" in info.value.reason
    )

    trusting = ssl.create_default_context(cafile=str(cert))
    monkeypatch.setattr("worker.url_fetch.ssl.create_default_context", lambda: trusting)
    assert fetch(f"https://public.test:{port}/ok", policy, resolver) == BODY
    assert (
        fetch(f"https://public.test:{port}/host", policy, resolver)
        == f"public.test:{port}".encode()
    )
    with pytest.raises(PostError) as info:  # same address, but the certificate is not for this name
        fetch(f"https://other.test:{port}/ok", policy, resolver)
    assert info.value.kind == "url_fetch_failed" and "other.test" in info.value.reason


# --- a host that keeps timing out (worker/host_breaker.py) ----------------------------------


class HangingHandler(BaseHTTPRequestHandler):
    """/hang answers nothing until the test ends (``release``); /ok answers at once."""

    release = threading.Event()
    hung: ClassVar[list[str]] = []

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/hang":
            HangingHandler.hung.append(self.path)
            HangingHandler.release.wait(30)
            return
        if self.path.startswith("/slow-redirect?"):  # a redirect that uses 70% of a 2 s deadline
            HangingHandler.release.wait(1.4)
            self.send_response(302)
            self.send_header("Location", self.path.split("?", 1)[1])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)


@pytest.fixture
def hanging_server() -> Iterator[str]:
    HangingHandler.release.clear()
    HangingHandler.hung.clear()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), HangingHandler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{httpd.server_port}"
    HangingHandler.release.set()
    httpd.shutdown()
    httpd.server_close()


def breaker_policy(strikes: int, pause_s: float) -> tuple[UrlPolicy, list[float]]:
    """A local-server policy with a breaker on a clock the test moves (``now[0]``)."""
    from worker.host_breaker import HostBreaker

    now = [1000.0]
    breaker = HostBreaker(strikes=strikes, pause_s=pause_s, clock=lambda: now[0])
    # 1 s: the answered fetches of these tests must not time out on a loaded machine
    return UrlPolicy(allow_private=True, timeout_s=1.0, breaker=breaker), now


def hang(base: str, policy: UrlPolicy, times: int) -> None:
    """Fetch /hang ``times`` times, each timing out."""
    for _ in range(times):
        with pytest.raises(PostError, match="timed out fetching"):
            fetch(base + "/hang", policy)


def test_a_host_that_keeps_timing_out_is_not_fetched_from_for_a_while(hanging_server, caplog):
    """After ``strikes`` timeouts in a row a host's posts fail at once, without a request, so
    they cannot hold every fetch thread; after the pause one answer closes the breaker."""
    policy, now = breaker_policy(strikes=2, pause_s=60)
    base = f"http://{hanging_server}"
    hang(base, policy, 2)
    assert len(HangingHandler.hung) == 2
    assert any("timed out 2 times in a row" in r.getMessage() for r in caplog.records)
    for path in ("/hang", "/ok"):  # the host, whatever the path
        with pytest.raises(PostError) as info:
            fetch(base + path, policy)
        assert info.value.kind == "url_fetch_failed"
        assert f"http://{hanging_server} timed out 2 times in a row" in info.value.reason
        assert "60 s more" in info.value.reason
    assert len(HangingHandler.hung) == 2  # no request reached the server
    # another host is not affected (localhost resolves to the same server, but is its own name)
    assert fetch(f"http://localhost:{hanging_server.split(':')[1]}/ok", policy) == BODY

    now[0] += 61  # the pause is over: one answer and the host is fetched from as before
    assert fetch(base + "/ok", policy) == BODY
    hang(base, policy, 1)  # one strike of a new row: not paused
    assert fetch(base + "/ok", policy) == BODY


def test_a_host_back_from_its_pause_is_paused_again_by_one_more_timeout(hanging_server):
    policy, now = breaker_policy(strikes=3, pause_s=10)
    base = f"http://{hanging_server}"
    hang(base, policy, 3)
    now[0] += 11
    hang(base, policy, 1)  # the trial fetch hangs too
    with pytest.raises(PostError, match="timed out 4 times in a row"):
        fetch(base + "/ok", policy)
    assert len(HangingHandler.hung) == 4


def test_after_a_pause_one_trial_fetch_goes_through_and_the_others_wait_for_it():
    from worker.host_breaker import HostBreaker

    now = [0.0]
    paused: list[str] = []
    breaker = HostBreaker(strikes=2, pause_s=30, clock=lambda: now[0], on_pause=paused.append)
    breaker.timed_out("cdn.example")
    assert paused == []
    breaker.timed_out("cdn.example")
    assert paused == ["cdn.example"]  # the worker counts these (carstream_url_host_pauses)
    now[0] = 31.0
    let_through = [breaker.refusal("cdn.example") is None for _ in range(16)]
    assert let_through == [True] + [False] * 15  # one trial, not every waiting post at once
    now[0] = 36.0
    breaker.timed_out("cdn.example")  # the trial hung too: paused again, from now
    now[0] = 61.5  # past the first trial's own pause (31 + 30), not past the new one (36 + 30)
    assert breaker.refusal("cdn.example") is not None
    now[0] = 66.5
    assert breaker.refusal("cdn.example") is None  # the next trial
    breaker.answered("cdn.example")
    assert all(breaker.refusal("cdn.example") is None for _ in range(3))  # closed
    assert paused == ["cdn.example"]  # a paused host kept paused by its trial is one pause


def test_quick_failures_break_a_row_of_timeouts():
    from worker.host_breaker import MAX_HOSTS, HostBreaker

    breaker = HostBreaker(strikes=2, pause_s=5, clock=lambda: 0.0)
    breaker.timed_out("a.example")
    breaker.answered("a.example")  # e.g. a 404 at once: the host does not hang
    breaker.timed_out("a.example")
    assert breaker.refusal("a.example") is None
    breaker.timed_out("a.example")
    assert "a.example timed out 2 times" in (breaker.refusal("a.example") or "")
    assert breaker.refusal("b.example") is None
    for i in range(MAX_HOSTS + 5):  # memory stays bounded, however many hosts time out
        breaker.timed_out(f"h{i}.example")
    assert len(breaker._hosts) == MAX_HOSTS
    with pytest.raises(ValueError):
        HostBreaker(strikes=0, pause_s=5)


class _PlainHttp:
    """An HTTP server that answers a request only once it has read one (a blank line): a TLS
    ClientHello, which holds none, gets no answer at all, as from a real plain-HTTP port."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.closing = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.closing.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            seen = b""
            while b"\r\n\r\n" not in seen:
                data = conn.recv(4096)
                if not data:
                    return
                seen += data
            head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
            conn.sendall(head % len(BODY) + BODY)
            conn.shutdown(socket.SHUT_WR)
            self.closing.wait(5)  # until the client has read and closed (or the test ends)

    def close(self) -> None:
        self.closing.set()
        self.sock.close()


@pytest.fixture
def plain_http() -> Iterator[_PlainHttp]:
    served = _PlainHttp()
    yield served
    served.close()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that takes connections and never answers (a firewall that drops packets)."""
    sock = socket.create_server(("127.0.0.1", 0), backlog=16)
    yield sock.getsockname()[1]
    sock.close()


@pytest.mark.parametrize("aim", ["https on the host's http port", "a port that never answers"])
def test_posts_aimed_at_another_origin_of_a_host_do_not_pause_its_real_one(
    plain_http, silent_port, aim
):
    """The breaker keys on scheme, host and port: a producer aiming https at a shared image
    host's plain-HTTP port (the TLS handshake hangs), or at a filtered port, pauses only that
    origin, not everyone's posts to the host's real one."""
    policy, _now = breaker_policy(strikes=2, pause_s=60)
    victim = f"http://127.0.0.1:{plain_http.port}/a.jpg"
    assert fetch(victim, policy) == BODY
    if aim.startswith("https"):
        attack, origin = (
            f"https://127.0.0.1:{plain_http.port}/x",
            f"https://127.0.0.1:{plain_http.port}",
        )
    else:
        attack, origin = f"http://127.0.0.1:{silent_port}/x", f"http://127.0.0.1:{silent_port}"
    for _ in range(2):
        with pytest.raises(PostError, match="timed out fetching"):
            fetch(attack, policy)
    assert fetch(victim, policy) == BODY  # the host's real origin is not paused...
    assert policy.breaker.refusal(f"http://127.0.0.1:{plain_http.port}") is None
    with pytest.raises(PostError) as info:  # ...the origin that hangs is
        fetch(attack, policy)
    assert f"not fetched: {origin} timed out 2 times in a row" in info.value.reason


def test_a_redirect_that_used_up_the_deadline_is_no_strike_against_its_target(hanging_server):
    """A producer's own server answers a 302 late, aimed at a shared CDN: the CDN hop starts
    with too little of the deadline left to be blamed for running out of it."""
    from worker.host_breaker import HostBreaker

    port = hanging_server.split(":")[1]
    resolver = fake_resolver({"attacker.test": "127.0.0.1", "cdn.test": "127.0.0.1"})
    # 2 s, of which the redirect takes 1.4 s: the CDN hop has under half of it left
    policy = UrlPolicy(allow_private=True, timeout_s=2.0, breaker=HostBreaker(2, 60))
    for _ in range(2):
        with pytest.raises(PostError, match=r"timed out fetching http://cdn\.test"):
            fetch(
                f"http://attacker.test:{port}/slow-redirect?http://cdn.test:{port}/hang",
                policy,
                resolver,
            )
    assert len(HangingHandler.hung) == 2  # the CDN hop ran, and it is what timed out
    assert policy.breaker.refusal(f"http://cdn.test:{port}") is None
    assert fetch(f"http://cdn.test:{port}/ok", policy, resolver) == BODY
    # a CDN that hangs with the whole deadline to answer in is still struck, and paused
    for _ in range(2):
        with pytest.raises(PostError, match="timed out fetching"):
            fetch(f"http://cdn.test:{port}/hang", policy, resolver)
    with pytest.raises(PostError, match="timed out 2 times in a row"):
        fetch(f"http://cdn.test:{port}/ok", policy, resolver)


class StuckDns:
    """A resolver for which names under ``stuck`` never answer (until ``release``) and every
    other name is 127.0.0.1; ``entered`` counts the lookups that reached it."""

    def __init__(self, stuck: str) -> None:
        self.stuck = stuck
        self.release = threading.Event()
        self.entered = 0
        self.changed = threading.Condition()

    def __call__(self, host, port, type=socket.SOCK_STREAM):
        if host.endswith(self.stuck):
            with self.changed:
                self.entered += 1
                self.changed.notify_all()
            self.release.wait(30)
            raise socket.gaierror(f"{host}: no answer")
        return [(socket.AF_INET, type, 6, "", ("127.0.0.1", port))]

    def wait_entered(self, count: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: self.entered >= count, timeout=10), self.entered


def start_fetches(urls: list[str], policy: UrlPolicy, resolver) -> list[threading.Thread]:
    def one(url: str) -> None:
        with contextlib.suppress(PostError):
            fetch(url, policy, resolver)

    threads = [threading.Thread(target=one, args=(url,), daemon=True) for url in urls]
    for thread in threads:
        thread.start()
    return threads


def test_a_domain_whose_dns_never_answers_cannot_starve_other_hosts_lookups(
    hanging_server, monkeypatch
):
    """Posts for many names under one domain whose DNS never answers take a few resolver
    threads at most, not all of them: a healthy host's lookups still run at once. A pool of 9
    threads shows the cap itself: without it the 12 stuck names would take all 9."""
    from concurrent.futures import ThreadPoolExecutor

    from worker import url_fetch

    pool = ThreadPoolExecutor(max_workers=url_fetch._ZONE_LOOKUPS + 1)
    monkeypatch.setattr(url_fetch, "_RESOLVE_POOL", pool)
    port = hanging_server.split(":")[1]
    dns = StuckDns(".slow-dns.test")
    slow = UrlPolicy(allow_private=True, timeout_s=30.0)
    names = [f"http://x{i}.slow-dns.test:{port}/a.jpg" for i in range(12)]
    threads = start_fetches(names, slow, dns)
    try:
        dns.wait_entered(url_fetch._ZONE_LOOKUPS)
        policy, _now = breaker_policy(strikes=2, pause_s=60)
        for _ in range(3):
            assert fetch(f"http://cdn.good.test:{port}/ok", policy, dns) == BODY
        assert dns.entered == url_fetch._ZONE_LOOKUPS  # the other 4 wait for their domain's turn
    finally:
        dns.release.set()
        for thread in threads:
            thread.join(10)
        pool.shutdown(wait=True)


def test_a_lookup_that_timed_out_waiting_for_a_resolver_thread_is_no_strike(
    hanging_server, monkeypatch
):
    """Time spent queued for a resolver thread is nobody's fault but the queue's: the host
    whose lookup waited is not struck, however often; once a thread is free it is fetched."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-resolve")
    monkeypatch.setattr("worker.url_fetch._RESOLVE_POOL", pool)
    port = hanging_server.split(":")[1]
    dns = StuckDns(".stuck.test")
    threads = start_fetches([f"http://a.stuck.test:{port}/x"], UrlPolicy(allow_private=True), dns)
    try:
        dns.wait_entered(1)  # the one resolver thread is taken
        policy, _now = breaker_policy(strikes=2, pause_s=60)
        for _ in range(3):
            with pytest.raises(PostError) as info:
                fetch(f"http://cdn.good.test:{port}/ok", policy, dns)
            assert info.value.reason == "timed out resolving cdn.good.test"
        assert policy.breaker.refusal(f"http://cdn.good.test:{port}") is None
    finally:
        dns.release.set()
        for thread in threads:
            thread.join(10)
    assert fetch(f"http://cdn.good.test:{port}/ok", policy, dns) == BODY
    pool.shutdown(wait=True)


def test_an_ipv6_url_is_shown_with_its_brackets():
    with pytest.raises(PostError) as info:
        fetch("http://[::1]:1/x.jpg", UrlPolicy(allow_private=True, timeout_s=2.0))
    assert "http://[::1]:1/x.jpg" in info.value.reason


def test_the_settings_give_the_policy_its_breaker_or_none():
    from worker.settings import WorkerSettings

    seen: list[str] = []
    policy = UrlPolicy.from_settings(
        WorkerSettings(url_host_timeouts=4, url_host_pause_s=9), on_host_pause=seen.append
    )
    assert policy.breaker is not None and (policy.breaker.strikes, policy.breaker.pause_s) == (4, 9)
    for _ in range(4):
        policy.breaker.timed_out("img.example")
    assert seen == ["img.example"]
    assert UrlPolicy.from_settings(WorkerSettings(url_host_timeouts=0)).breaker is None


@pytest.mark.parametrize(
    ("path", "said"),
    [
        ("/expired-link", "the server sent Content-Type 'text/html'"),
        ("/gzipped", "Content-Type 'image/png' and Content-Encoding 'gzip'"),
    ],
)
def test_a_body_that_is_no_image_is_dead_lettered_with_what_the_server_said(server, path, said):
    """A producer reads "not a recognised image format" and cannot tell why; what the server
    declared (an HTML page for an expired link, a compressed body) says it."""
    from training.preprocessing import PreprocessSpec
    from worker.prepare import prepare

    event = {"post_id": "p", "image_url": server + path, "posted_at": "2026-12-07T10:00:00Z"}
    prep = prepare(json.dumps(event).encode(), PreprocessSpec.for_image_size(32), LOCAL, 10**6)
    assert prep.error is not None and prep.error.kind == "not_an_image"
    assert said in prep.error.reason and "not a recognised image" in prep.error.reason
