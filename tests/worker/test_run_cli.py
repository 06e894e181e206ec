"""`python -m worker run` start-up errors, and the health/metrics endpoints."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support import worker_cli
from worker.metrics import WorkerMetrics, bind, serve, start

REPO = Path(__file__).resolve().parents[2]


def run_worker(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return worker_cli("run", *args, **env)


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        ((), {}, "--bundle"),
        (("--bundle", "/no/such/bundle"), {}, "/no/such/bundle"),
        (("--bundle", "/x", "--max-batch", "abc"), {}, "max_batch"),
        (("--bundle", "/x", "--backend", "gpu-magic"), {}, "backend"),
        (("--bundle", "/x"), {"CARSTREAM_MIN_CONFIDENCE": "2"}, "min_confidence"),
        (("--bundle", "/x", "--security-protocol", "SASL_SSL"), {}, "sasl_mechanism"),
        (("--no-such-flag",), {}, "--no-such-flag"),
        (("--bundle", "/x", "--redis-url", "localhost:6379"), {}, "redis_url"),
        # refused before the engine loads, not by kafka-python / redis-py after it
        (("--bundle", "/x", "--bootstrap-servers", ""), {}, "bootstrap_servers"),
        (("--bundle", "/x", "--bootstrap-servers", "127.0.0.1:abc"), {}, "'abc'"),
        (("--bundle", "/x"), {"CARSTREAM_BOOTSTRAP_SERVERS": "b:70000"}, "bootstrap_servers"),
        (("--bundle", "/x", "--redis-url", "redis://127.0.0.1:99999/0"), {}, "'99999'"),
        (("--bundle", "/x", "--metrics-host", "nohost.invalid"), {}, "nohost.invalid:9400"),
    ],
)
def test_bad_settings_are_one_line_exit_2(args, env, needle):
    proc = run_worker(*args, **env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0]
    assert "Traceback" not in proc.stderr


def test_a_metrics_port_in_use_is_one_line_exit_2_before_the_bundle_loads(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # no bundle there: the bind must fail first, as it would before a real model loads
        proc = run_worker(
            "--bundle", str(tmp_path / "absent"), "--metrics-host", "127.0.0.1",
            "--metrics-port", str(port),
        )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0]


def test_bind_then_start_serves_only_once_started():
    metrics = WorkerMetrics()
    server = bind(metrics, "127.0.0.1", 0, stall_s=60)
    try:
        with pytest.raises(OSError):  # the port is taken as soon as bind returns
            bind(WorkerMetrics(), "127.0.0.1", server.server_port, stall_s=60)
        start(server)
        assert get(f"http://127.0.0.1:{server.server_port}/healthz")[0] == 200
    finally:
        server.shutdown()
        server.server_close()


def test_help_lists_every_setting_with_its_environment_variable():
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "run", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0
    from worker.settings import WorkerSettings

    for name in WorkerSettings.model_fields:
        assert f"CARSTREAM_{name.upper()}" in proc.stdout, name


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_health_ready_and_metrics_endpoints():
    metrics = WorkerMetrics()
    server = serve(metrics, "127.0.0.1", 0, stall_s=60)
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        assert get(base + "/healthz")[0] == 200
        assert get(base + "/readyz")[0] == 503
        metrics.set_ready(True)
        assert get(base + "/readyz")[0] == 200
        metrics.consumed.inc(3)
        metrics.dead_letters.labels("schema").inc()
        status, body = get(base + "/metrics")
        assert status == 200
        assert "carstream_consumed_total 3.0" in body
        assert 'carstream_dead_letters_total{kind="schema"} 1.0' in body
        assert get(base + "/nope")[0] == 404
    finally:
        server.shutdown()


def test_healthz_fails_when_the_loop_stalls():
    metrics = WorkerMetrics()
    server = serve(metrics, "127.0.0.1", 0, stall_s=0.0)
    try:
        assert get(f"http://127.0.0.1:{server.server_port}/healthz")[0] == 503
    finally:
        server.shutdown()


def test_fetch_wait_follows_the_batch_wait_unless_set():
    from worker.run import fetch_wait_ms
    from worker.settings import WorkerSettings

    # a broker that answers a fetch only when its wait runs out must not add 500 ms to posts
    assert fetch_wait_ms(WorkerSettings(max_wait_ms=50)) == 50
    assert fetch_wait_ms(WorkerSettings(max_wait_ms=0)) == 10
    assert fetch_wait_ms(WorkerSettings(max_wait_ms=50, fetch_max_wait_ms=200)) == 200
