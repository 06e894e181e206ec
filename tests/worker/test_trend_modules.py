"""The key schema and the window arithmetic import without redis.

worker/settings.py reads MAX_TTL_S and the producer normalises cities: neither should load the
Redis client for a constant, and the pure window logic is tested without a server. A fresh
interpreter, since this one has long imported redis through other tests.
"""

import subprocess
import sys
from pathlib import Path

import pytest

REDIS_FREE = ["worker.trend_keys", "worker.trend_windows"]
REPO = Path(__file__).resolve().parents[2]


def redis_modules_after_importing(module: str) -> str:
    """The redis modules a fresh interpreter holds once it imported ``module``, comma-joined."""
    probe = (
        "import importlib, sys\n"
        f"importlib.import_module({module!r})\n"
        "loaded = sorted(m for m in sys.modules if m == 'redis' or m.startswith('redis.'))\n"
        "print(','.join(loaded))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("module", REDIS_FREE)
def test_module_imports_without_redis(module: str) -> None:
    loaded = redis_modules_after_importing(module)
    assert loaded == "", f"{module} imported {loaded}"


def test_the_probe_sees_a_redis_import() -> None:
    """The check above would notice: importing the adapters module does load redis."""
    assert "redis" in redis_modules_after_importing("worker.trends").split(",")
