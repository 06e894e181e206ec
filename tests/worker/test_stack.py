"""The local stack with real processes: idempotent up/down/status, topics, CLI errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import redis
from kafka import KafkaAdminClient

from worker.stack import LocalStack, create_topics, free_port, redis_server_available

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not redis_server_available(), reason="redis-server is not installed"),
]


def _partitions(bootstrap: str, topic: str) -> int:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        (info,) = admin.describe_topics([topic])
        return len(info["partitions"])
    finally:
        admin.close()


def test_up_is_idempotent_and_down_stops_everything(tmp_path: Path) -> None:
    stack = LocalStack(tmp_path / "state", free_port(), free_port())
    try:
        stack.up(topics=["t-a", "t-b"], partitions=3)
        first = {s.name: s.pid for s in stack.status()}
        assert all(s.running and s.answering for s in stack.status())
        assert _partitions(stack.bootstrap, "t-a") == 3

        stack.up(topics=["t-a", "t-b"], partitions=3)  # second up: same processes
        assert {s.name: s.pid for s in stack.status()} == first
        assert redis.Redis.from_url(stack.redis_url).ping()
    finally:
        stopped = stack.down()
    assert sorted(stopped) == ["redis", "tansu"]
    assert not any(s.running or s.answering for s in stack.status())
    assert stack.down() == []  # nothing left to stop


def test_create_topics_only_creates_missing(kafka_bootstrap: str) -> None:
    assert create_topics(kafka_bootstrap, ["ct-1", "ct-2"], 2) == ["ct-1", "ct-2"]
    assert create_topics(kafka_bootstrap, ["ct-1", "ct-2", "ct-3"], 2) == ["ct-3"]
    assert _partitions(kafka_bootstrap, "ct-3") == 2


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.stack", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_up_status_down(tmp_path: Path) -> None:
    flags = [
        "--state-dir",
        str(tmp_path / "st"),
        "--kafka-port",
        str(free_port()),
        "--redis-port",
        str(free_port()),
    ]
    try:
        up = _cli("up", "--partitions", "2", *flags)
        assert up.returncode == 0, up.stderr
        status = _cli("status", "--json", *flags)
        assert status.returncode == 0
        assert '"answering": true' in status.stdout
    finally:
        down = _cli("down", *flags)
    assert down.returncode == 0
    assert "tansu" in down.stdout and "redis" in down.stdout
    assert _cli("status", *flags).returncode == 3  # down


@pytest.mark.parametrize(
    ("args", "needle"),
    [(["up", "--partitions", "0"], "--partitions 0"), (["up", "--kafka-port", "70000"], "70000")],
)
def test_cli_bad_arguments_exit_2_with_one_line(args: list[str], needle: str) -> None:
    result = _cli(*args)
    assert result.returncode == 2
    assert needle in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
