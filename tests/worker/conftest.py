"""Session fixture: a real redis-server on a free loopback port (the broker: tests/conftest.py).

Each fixture starts its own server in a temporary directory and stops it at the end of the
session. Tests create the topics they need with `worker.stack.create_topics`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import missing_tool
from worker.stack import RedisServer, StackError, free_port, redis_server_available


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """redis:// URL of a throw-away redis-server (skips only if redis-server is not installed)."""
    if not redis_server_available():
        # CI must run the integration tests, never skip them
        missing_tool("redis-server is not installed (make setup installs it with apt-get)")
    server = RedisServer(tmp_path_factory.mktemp("redis"), free_port())
    try:
        server.start()
    except StackError as exc:
        pytest.fail(f"could not start redis-server: {exc}")
    try:
        yield server.url
    finally:
        server.stop()
