"""Redis password and TLS through the worker's settings, against real redis-server peers."""

from __future__ import annotations

import shutil
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis

from tests.support import make_certificates
from worker.connections import redis_client
from worker.settings import WorkerSettings
from worker.stack import free_port
from worker.trends import TrendReader, TrendRecord, TrendWriter

pytestmark = pytest.mark.integration

SECRET = "s3cret-Redis-pw"


def start_redis(tmp_path: Path, *args: str) -> subprocess.Popen:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (make setup installs it)")
    return subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def wait_for(client: redis.Redis, proc: subprocess.Popen, deadline_s: float = 10) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"redis-server exited: {proc.stdout.read().decode()[-500:]}")
        try:
            client.ping()
            return
        except redis.ConnectionError:
            time.sleep(0.1)
    pytest.fail("redis-server did not answer")


def test_redis_password_is_used_and_required(tmp_path):
    port = free_port()
    proc = start_redis(tmp_path, "--port", str(port), "--requirepass", SECRET)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        settings = WorkerSettings(redis_url=url, redis_password=SECRET)
        client = redis_client(settings)
        wait_for(client, proc)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(url).ping()
        at = datetime.now(UTC)
        TrendWriter(client, "g").apply([TrendRecord("t", 0, 1, at, "Audi", "A4", "Lyon")])
        assert TrendReader(client).top(5, now=at) == [("Audi", 1)]
        assert SECRET not in repr(settings) and SECRET not in str(settings.redacted())
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_redis_tls_with_the_configured_ca(tmp_path):
    ca, crt, key = make_certificates(tmp_path)
    port = free_port()
    proc = start_redis(
        tmp_path,
        "--port",
        "0",
        "--tls-port",
        str(port),
        "--tls-cert-file",
        str(crt),
        "--tls-key-file",
        str(key),
        "--tls-ca-cert-file",
        str(ca),
        "--tls-auth-clients",
        "no",
    )
    try:
        settings = WorkerSettings(
            redis_url=f"rediss://127.0.0.1:{port}/0", redis_tls_ca_certs=str(ca)
        )
        client = redis_client(settings)
        wait_for(client, proc)
        assert client.set("k", "v") and client.get("k") == b"v"
        untrusted = redis.Redis.from_url(f"rediss://127.0.0.1:{port}/0", socket_timeout=3)
        with pytest.raises(redis.ConnectionError):
            untrusted.ping()  # the server's certificate is not signed by a system CA
    finally:
        proc.terminate()
        proc.wait(timeout=10)
