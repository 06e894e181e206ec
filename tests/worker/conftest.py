"""Session fixture: a real redis-server on a free loopback port (the broker: tests/conftest.py).

Each fixture starts its own server in a temporary directory and stops it at the end of the
session. Tests create the topics they need with `worker.stack.create_topics`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from worker.stack import RedisServer, StackError, free_port, redis_server_available


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """redis:// URL of a throw-away redis-server (skips only if redis-server is not installed)."""
    if not redis_server_available():
        message = "redis-server is not installed (make setup installs it with apt-get)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI must run the integration tests, never skip them
        pytest.skip(message)
    server = RedisServer(tmp_path_factory.mktemp("redis"), free_port())
    try:
        server.start()
    except StackError as exc:
        pytest.fail(f"could not start redis-server: {exc}")
    try:
        yield server.url
    finally:
        server.stop()
