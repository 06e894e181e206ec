"""`make demo` (deploy/local/demo.sh) end to end, twice in the same folder.

The README's quick start is `make demo`; a user runs it again after a first try, so the second
run must start over from the first one's files rather than refuse them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import free_port_run, missing_tool
from worker.stack import free_port, redis_server_available

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _redis_server_installed() -> None:
    if not redis_server_available():
        missing_tool("redis-server is not installed (make setup installs it with apt-get)")


def run_demo(demo_dir: Path) -> subprocess.CompletedProcess:
    # the replicas listen on metrics + 1 and metrics + 2: every port of the run must be free,
    # not only the first (a busy CI host once had one of them in use)
    metrics = free_port_run(3)
    env = {
        **os.environ,
        "PY": sys.executable,
        "DEMO_DIR": str(demo_dir),
        "DEMO_EPOCHS": "1",
        "DEMO_KAFKA_PORT": str(free_port()),
        "DEMO_REDIS_PORT": str(free_port()),
        "DEMO_METRICS_PORT": str(metrics),
    }
    return subprocess.run(
        ["bash", str(REPO / "deploy" / "local" / "demo.sh")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_the_demo_counts_every_post_and_runs_again_in_the_same_folder(tmp_path):
    for attempt in (1, 2):
        proc = run_demo(tmp_path / "demo")
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"run {attempt}:\n{out[-4000:]}"
        counted = re.findall(r"counted (\d+)/(\d+)", out)
        assert counted and counted[-1][0] == counted[-1][1] != "0", out[-4000:]
        assert "top makes, last 60 minutes" in out and "demo done" in out
        assert re.search(r"where .+ is posted", out), out[-4000:]
        assert "of its confident posts" in out, out[-4000:]
        # the top-makes header plus the low-confidence line account for every counted post
        shown = int(re.search(r"top make over the last 1h \(.*?\): (\d+) post", out).group(1))
        low = re.search(r"\((\d+) more below the confidence threshold", out)
        assert shown + (int(low.group(1)) if low else 0) == int(counted[-1][0]), out[-4000:]
