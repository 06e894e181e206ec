"""A mistyped ``CARSTREAM_*`` variable is warned about by every CLI that reads the worker's
settings (``run``, ``trends``, ``produce``), not by ``run`` alone: elsewhere it silently left
the default in force (the default Redis read, the default broker sent to)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import redis

from tests.support import worker_cli

TYPO_WARNING = (
    "CARSTREAM_REDIS_UR is not a worker setting and is ignored; did you mean CARSTREAM_REDIS_URL?"
)


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_warning_lines_name_the_variable_and_the_closest_setting():
    from worker.settings import unknown_env_warnings  # the lines every CLI warns with

    env = {"CARSTREAM_REDIS_UR": "x", "CARSTREAM_SOAK": "1", "carstream_max_batch": "8"}
    assert unknown_env_warnings(env) == [
        TYPO_WARNING,
        "CARSTREAM_SOAK is not a worker setting and is ignored",
    ]


@pytest.mark.integration
def test_trends_warns_on_stderr_and_keeps_stdout_for_the_json(redis_url: str) -> None:
    url = redis_url.rsplit("/", 1)[0] + "/9"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    proc = worker_cli(
        "trends", "--redis-url", url, "--json", timeout=60,
        CARSTREAM_REDIS_UR="redis://elsewhere:6379/0",  # the typo
        CARSTREAM_DECODE_THREADS="3",  # a worker setting trends does not use: no warning
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["total"] == 0  # stdout is the JSON alone
    assert proc.stderr.strip().splitlines() == [f"warning: {TYPO_WARNING}"]


def test_produce_warns_about_a_mistyped_variable(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text('{"post_id": "p1"}\n')
    proc = worker_cli(
        "produce", "--jsonl", str(events), "--timeout", "0.5",
        "--bootstrap-servers", f"127.0.0.1:{_closed_port()}",
        CARSTREAM_BOOTSTRAP_SERVER="kafka:9092",  # the typo
        CARSTREAM_MAX_BATCH="8",  # a worker setting: no warning
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr  # for the broker, not the variable
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == (
        "CARSTREAM_BOOTSTRAP_SERVER is not a worker setting and is ignored; "
        "did you mean CARSTREAM_BOOTSTRAP_SERVERS?"
    ), proc.stderr
    assert len(lines) == 2 and lines[1].startswith("error: cannot reach Kafka"), proc.stderr


def test_run_still_warns_as_before():
    proc = worker_cli(
        "run", "--bundle", "/no/such/bundle", CARSTREAM_METRICS_PORT="0", CARSTREAM_REDIS_UR="x"
    )
    assert proc.returncode == 2, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if " WARNING " in line]
    assert len(warnings) == 1 and warnings[0].endswith(f"worker.run: {TYPO_WARNING}")


def test_the_projects_own_variables_are_not_reported_as_typos():
    """deploy/compose.yaml reads CARSTREAM_BUNDLE_DIR on the host; it was "did you mean
    CARSTREAM_BUNDLE?" to a shell that exported it and ran `worker trends`."""
    from worker.settings import unknown_env_settings

    environ = {"CARSTREAM_BUNDLE_DIR": "/b", "CARSTREAM_BUNDEL": "/b"}
    assert unknown_env_settings(environ) == [("CARSTREAM_BUNDEL", "CARSTREAM_BUNDLE")]
