"""Session fixtures shared by every suite: a real Tansu broker and the workers' model bundle."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import build_worker_bundle
from worker.stack import StackError, TansuBroker, free_port


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """bootstrap_servers ("127.0.0.1:port") of a memory-only Tansu broker."""
    broker = TansuBroker(tmp_path_factory.mktemp("tansu"), free_port())
    try:
        broker.start()
    except StackError as exc:
        pytest.fail(f"could not start the Tansu broker: {exc}")
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def worker_bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real fp32 resnet18 bundle (tests.support.CLASSES) for worker subprocesses."""
    return build_worker_bundle(tmp_path_factory.mktemp("worker-bundle"))
