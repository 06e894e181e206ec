"""The local stack with real processes: idempotent up/down/status, topics, CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from kafka import KafkaAdminClient

from worker.stack import (
    LocalStack,
    StackError,
    StackRecord,
    create_topics,
    free_port,
    redis_server_available,
)

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


def test_cli_status_and_up_use_the_ports_up_recorded(tmp_path: Path) -> None:
    state = ["--state-dir", str(tmp_path / "st")]
    kafka_port, redis_port = free_port(), free_port()
    try:
        up = _cli("up", "--topics", "t-rec", *state, "--kafka-port", str(kafka_port),
                  "--redis-port", str(redis_port))  # fmt: skip
        assert up.returncode == 0, up.stderr
        recorded = json.loads((tmp_path / "st" / "stack.json").read_text())
        assert recorded["kafka_port"] == kafka_port and recorded["redis_port"] == redis_port

        status = _cli("status", "--json", *state)  # no port flags
        assert status.returncode == 0, status.stdout + status.stderr
        ports = {s["name"]: s["port"] for s in json.loads(status.stdout)}
        assert ports == {"tansu": kafka_port, "redis": redis_port}

        again = _cli("up", "--topics", "t-rec", *state)  # no port flags: the same stack
        assert again.returncode == 0, again.stderr
        assert f"127.0.0.1:{kafka_port}" in again.stdout

        for flags, needle in (
            (["--kafka-port", str(free_port())], f"kafka port {kafka_port}"),
            (["--redis-port", str(free_port())], f"redis port {redis_port}"),
            (["--redis-aof"], "redis AOF off"),
        ):
            for action in ("status", "up"):
                clash = _cli(action, *state, *flags)
                assert clash.returncode == 2, (action, flags, clash.stderr)
                lines = clash.stderr.strip().splitlines()
                assert len(lines) == 1 and needle in lines[0], clash.stderr
        assert _cli("status", *state, "--kafka-port", str(kafka_port)).returncode == 0
    finally:
        down = _cli("down", *state)  # no port flags either
    assert down.returncode == 0, down.stderr
    assert "tansu" in down.stdout and "redis" in down.stdout
    assert not (tmp_path / "st" / "stack.json").exists()


def test_up_refuses_other_ports_while_a_stack_runs(tmp_path: Path) -> None:
    stack = LocalStack(tmp_path / "state", free_port(), free_port())
    try:
        stack.redis.start()  # half up: a record must still say which ports are in use
        stack.record.write(stack.state_dir)
        assert LocalStack.running_record(stack.state_dir) == stack.record
        with pytest.raises(StackError, match=f"kafka port {stack.kafka.port}"):
            LocalStack(stack.state_dir, free_port(), stack.redis.port).up(topics=[])
    finally:
        stack.down()
    assert LocalStack.running_record(stack.state_dir) is None


def test_a_stale_or_broken_record_is_ignored(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    StackRecord(free_port(), free_port()).write(state)  # nothing of it runs
    assert StackRecord.read(state) is not None
    assert LocalStack.running_record(state) is None
    (state / "stack.json").write_text("{not json")
    assert StackRecord.read(state) is None
