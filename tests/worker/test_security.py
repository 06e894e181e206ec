"""Redis password and TLS through the worker's settings, against real redis-server peers."""

from __future__ import annotations

import shutil
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
import redis

from tests.support import make_certificates
from worker.connections import redis_client
from worker.settings import WorkerSettings
from worker.stack import free_port
from worker.trend_keys import TrendRecord
from worker.trends import TrendReader, TrendWriter

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


# --- a Redis that refuses this worker for good stops it at start ------------------------------


def _wait(settings: WorkerSettings, stop_after_beats: int = 0):
    """run.wait_for_redis with a stop set once it has beaten ``stop_after_beats`` times."""
    import threading

    from worker.run import wait_for_redis

    stop = threading.Event()
    beats = []

    def beat() -> None:
        beats.append(1)
        if len(beats) >= stop_after_beats:
            stop.set()

    return wait_for_redis(settings, stop, beat), len(beats)


@pytest.fixture()
def acl_redis(tmp_path):
    """A redis-server with a password for ``default`` and a user ``weak`` allowed no command."""
    (tmp_path / "users.acl").write_text(
        f"user default on >{SECRET} ~* +@all\nuser weak on >weakpw ~* -@all\n"
    )
    port = free_port()
    proc = start_redis(tmp_path, "--port", str(port), "--aclfile", str(tmp_path / "users.acl"))
    try:
        good = f"redis://127.0.0.1:{port}/0"
        wait_for(redis_client(WorkerSettings(redis_url=good, redis_password=SECRET)), proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize(
    ("url", "password", "reason"),
    [
        ("redis://default:Wr0ngPass@127.0.0.1:{port}/0", None, "authentication failed"),
        ("redis://127.0.0.1:{port}/0", "Wr0ngPass", "authentication failed"),
        ("redis://127.0.0.1:{port}/0", None, "authentication failed"),  # NOAUTH
        ("redis://weak:weakpw@127.0.0.1:{port}/0", None, "the user lacks a permission"),
    ],
)
def test_a_redis_refusing_the_credentials_is_one_line_exit_2(
    acl_redis, capsys, url, password, reason
):
    # before: not contacted at start; the loop retried "invalid username-password pair" for
    # ever while /readyz said ready
    settings = WorkerSettings(redis_url=url.format(port=acl_redis), redis_password=password)
    assert _wait(settings) == (2, 0)
    err = capsys.readouterr().err
    assert err.startswith(f"python -m worker run: error: redis_url redis://127.0.0.1:{acl_redis}/0")
    assert reason in err and len(err.splitlines()) == 1
    assert "Wr0ngPass" not in err and "weakpw" not in err


def test_a_redis_that_answers_passes_and_one_that_is_down_is_retried(acl_redis, capsys):
    good = WorkerSettings(redis_url=f"redis://127.0.0.1:{acl_redis}/0", redis_password=SECRET)
    assert _wait(good) == (None, 0)
    down = WorkerSettings(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    assert _wait(down, stop_after_beats=2) == (0, 2)  # an outage: retried, each retry a beat
    assert capsys.readouterr().err == ""


def test_a_rediss_server_the_ca_does_not_verify_is_one_line_exit_2(tmp_path, capsys):
    ca, crt, key = make_certificates(tmp_path)
    port = free_port()
    proc = start_redis(
        tmp_path, "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(crt),
        "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no",
    )  # fmt: skip
    try:
        wait_for(redis_client(WorkerSettings(
            redis_url=f"rediss://127.0.0.1:{port}/0", redis_tls_ca_certs=str(ca)
        )), proc)  # fmt: skip
        untrusted = WorkerSettings(redis_url=f"rediss://127.0.0.1:{port}/0")  # system CAs
        assert _wait(untrusted) == (2, 0)
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and "certificate verify failed" in err
        assert "check redis_tls_ca_certs" in err
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_redis_refusal_names_only_errors_no_retry_ends():
    from worker.connections import redis_refusal

    assert redis_refusal(redis.AuthenticationError("invalid password")) is not None
    assert redis_refusal(redis.exceptions.NoPermissionError("NOPERM no eval")) is not None
    assert redis_refusal(redis.ResponseError("WRONGPASS invalid username-password")) is not None
    assert redis_refusal(redis.ResponseError("NOAUTH Authentication required.")) is not None
    for passing in (
        redis.ConnectionError("Error 111 connecting"),
        redis.TimeoutError("Timeout reading"),
        redis.exceptions.BusyLoadingError("LOADING"),
        redis.ResponseError("OOM command not allowed"),
    ):
        assert redis_refusal(passing) is None, passing


def test_a_server_that_began_requiring_a_password_refuses_the_trends_write(tmp_path):
    """Redis 7 answers an unauthenticated command of many arguments with "Protocol error:
    unauthenticated multibulk length", not NOAUTH: read as an outage, it kept a worker without
    a password ready and retrying for ever once the server required one."""
    from worker.pipeline import StreamWorker

    port = free_port()
    proc = start_redis(tmp_path, "--port", str(port))
    try:
        client = redis.Redis(port=port)
        wait_for(client, proc)
        at = datetime.now(UTC)
        records = [TrendRecord("t", 0, i, at, "Audi", "A4", "Lyon") for i in range(40)]
        TrendWriter(client, "g").apply(records[:1])
        admin = redis.Redis(port=port)
        admin.config_set("requirepass", SECRET)
        admin.client_kill_filter(_type="normal", skipme=True)  # a rotation drops connections
        writer = TrendWriter(client, "g")
        with pytest.raises(redis.RedisError) as info:
            writer.apply(records[1:])
        # redis-py says "Protocol error: unauthenticated multibulk length", or (when the server
        # dropped the connection first) only that it broke; then the worker asks with a PING
        refusal = StreamWorker._redis_refusal(SimpleNamespace(trends=writer), info.value)
        assert refusal is not None and "authentication" in refusal, info.value
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_worker_with_a_wrong_redis_password_exits_2_and_is_never_ready(
    acl_redis, kafka_bootstrap, worker_bundle_dir
):
    from tests.support import worker_cli

    proc = worker_cli(
        "run", "--bundle", str(worker_bundle_dir), "--bootstrap-servers", kafka_bootstrap,
        "--metrics-port", "0", timeout=120,
        CARSTREAM_REDIS_URL=f"redis://default:Wr0ngPass@127.0.0.1:{acl_redis}/0",
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("python -m worker run")]
    assert errors == [
        f"python -m worker run: error: redis_url redis://127.0.0.1:{acl_redis}/0: "
        "authentication failed (invalid username-password pair or user is disabled.): check the "
        "password and user"
    ], proc.stderr
    assert "Wr0ngPass" not in proc.stderr and "partitions assigned" not in proc.stderr
