"""An IPv6 ``metrics_host`` (``::1``, ``::``, with or without brackets) is served and logged as
``[::1]:port``; ThreadingHTTPServer's AF_INET socket refused it ("Address family for hostname
not supported"). A metrics_host no socket can bind is a one-line error naming the setting."""

from __future__ import annotations

import logging
import socket
import urllib.error
import urllib.request

import pytest
from pydantic import ValidationError

from tests.support import worker_cli
from worker import supervisor
from worker.metrics import WorkerMetrics, bind, start
from worker.settings import WorkerSettings


def _ipv6_loopback_problem() -> str | None:
    """Why this machine cannot listen on ::1, or None."""
    if not socket.has_ipv6:
        return "Python was built without IPv6 (socket.has_ipv6 is False)"
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        return f"no IPv6 loopback here: binding ::1 failed ({exc})"
    return None


needs_ipv6 = pytest.mark.skipif(
    _ipv6_loopback_problem() is not None, reason=str(_ipv6_loopback_problem())
)
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str) -> int:
    try:
        with _DIRECT.open(url, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


@needs_ipv6
@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_an_ipv6_loopback_host_is_served_and_logged_with_brackets(host, caplog):
    server = bind(WorkerMetrics(), host, 0, stall_s=60)
    try:
        assert server.address_family == socket.AF_INET6
        port = server.server_port
        with caplog.at_level(logging.INFO, logger="worker.metrics"):
            start(server)
        assert f"metrics on http://[::1]:{port}/metrics (healthz, readyz)" in caplog.messages
        assert _get(f"http://[::1]:{port}/healthz") == 200
    finally:
        server.shutdown()
        server.server_close()


@needs_ipv6
def test_the_unspecified_ipv6_address_takes_ipv4_too():
    server = bind(WorkerMetrics(), "::", 0, stall_s=60)
    try:
        start(server)
        port = server.server_port
        assert _get(f"http://[::1]:{port}/healthz") == 200
        assert _get(f"http://127.0.0.1:{port}/healthz") == 200  # dual stack
    finally:
        server.shutdown()
        server.server_close()


@needs_ipv6
def test_the_supervisor_endpoint_binds_an_ipv6_host():
    settings = WorkerSettings(processes=2, metrics_host="[::1]", metrics_port=9400)
    assert settings.metrics_host == "::1"  # the brackets dropped, as sockets take it
    settings = settings.model_copy(update={"metrics_port": 0})
    server = supervisor.bind(settings)
    try:
        assert server.address_family == socket.AF_INET6
        assert server.server_address[0] == "::1"
    finally:
        server.server_close()


@needs_ipv6
def test_an_ipv6_port_in_use_is_named_with_brackets():
    with socket.socket(socket.AF_INET6) as taken:
        taken.bind(("::1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = worker_cli(
            "run", "--bundle", "/no/such/bundle", "--metrics-host", "::1",
            "--metrics-port", str(port),
        )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"[::1]:{port}: cannot listen there" in lines[0] and "in use" in lines[0]


def test_host_port_brackets_ipv6_only():
    from worker.metrics import host_port

    assert host_port("::1", 9100) == "[::1]:9100"
    assert host_port("[::1]", 9100) == "[::1]:9100"
    assert host_port("0.0.0.0", 9100) == "0.0.0.0:9100"
    assert host_port("metrics.local", 9100) == "metrics.local:9100"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("::", "::"),
        ("[::]", "::"),
        ("::1", "::1"),
        ("0.0.0.0", "0.0.0.0"),
        ("localhost", "localhost"),
        ("", "0.0.0.0"),  # socket's own spelling of every IPv4 interface, as it bound before
    ],
)
def test_good_metrics_hosts_are_taken(value, expected):
    assert WorkerSettings(metrics_host=value).metrics_host == expected


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("[]", "no address inside the brackets"),
        ("fe80::1%eth0", "an address with a zone (%eth0) is not supported"),
        ("[127.0.0.1]", "brackets are for an IPv6 address"),
        ("[nohost]", "not an IPv6 address inside the brackets"),
        ("127.0.0.1:9100", "without a port"),
        ("[::1]:9100", "without a port"),
        ("http://metrics", "not a URL"),
        ("a b", "no space or control character"),
        ("no\nhost", "no space or control character"),
        ("a..b", "not a valid host name"),
    ],
)
def test_bad_metrics_hosts_are_refused_naming_the_setting(value, needle):
    with pytest.raises(ValidationError) as info:
        WorkerSettings(metrics_host=value)
    (error,) = info.value.errors()
    assert error["loc"] == ("metrics_host",) and needle in error["msg"]


def test_a_metrics_host_with_a_port_is_a_one_line_error_at_start():
    proc = worker_cli("run", "--bundle", "/x", "--metrics-host", "127.0.0.1:9100")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m worker run: error: metrics_host: ")
    assert "'127.0.0.1:9100'" in lines[0] and "without a port" in lines[0]
