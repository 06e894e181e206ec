"""Session-scoped fixtures: one synthetic archive and one tiny training run serve many tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training.__main__ import main as cli_main
from training.sample import make_sample

NUM_CLASSES = 6
PER_CLASS = 30


def train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    """A CPU-sized run: resnet18 at 64 px from scratch, AdamW, no loader workers."""
    return [
        "train", "--dataset", "compcars", "--data", str(data), "--out", str(out),
        "--arch", "resnet18", "--image-size", "64", "--batch-size", "16", "--workers", "0",
        "--pretrained", "none", "--opt", "adamw", "--lr", "0.001", "--head-lr-mult", "1",
        "--device", "cpu", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="session", autouse=True)
def _limit_threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compcars_sample")
    make_sample(root, NUM_CLASSES, PER_CLASS, seed=0)
    return root


@pytest.fixture(scope="session")
def trained(sample_root, tmp_path_factory) -> dict:
    """One 6-epoch run on the sample; returns its out dir and metrics."""
    out = tmp_path_factory.mktemp("run") / "ckpt"
    rc = cli_main(train_argv(sample_root, out, "--epochs", "6", "--eval-every", "0"))
    assert rc == 0
    return {"out": out, "metrics": json.loads((out / "metrics.json").read_text())}
