"""SIGTERM sets a stop Event that training checks between steps: the run ends as an interruption
(the last finished epoch's checkpoint, the same one line, exit code 130), never mid-step."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from training.checkpoint import load_checkpoint
from training.cli import EXIT_INTERRUPTED
from training.engine import evaluate, train_one_epoch
from training.sample import make_sample

from .test_run_guards import tiny_argv

REPO = Path(__file__).resolve().parents[2]


def _batches(n: int, stop: threading.Event | None = None, set_after: int | None = None):
    """``n`` batches of 4 random 3x8x8 images; ``stop`` is set once ``set_after`` were handed
    out (as SIGTERM would set it while the step on that batch runs)."""
    gen = torch.Generator().manual_seed(0)
    for i in range(n):
        if stop is not None and set_after is not None and i == set_after:
            stop.set()
        yield torch.randn(4, 3, 8, 8, generator=gen), torch.tensor([0, 1, 0, 1])


def _model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))


@pytest.mark.parametrize("set_after", [0, 2])
def test_train_one_epoch_returns_before_the_next_step_once_stop_is_set(set_after):
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stop = threading.Event()
    stats = train_one_epoch(
        model,
        nn.CrossEntropyLoss(),
        optimizer,
        _batches(5, stop, set_after),
        torch.device("cpu"),
        0,
        stop=stop,
    )
    # the batch that was handed out when the flag went up is not trained on
    assert stats["stopped"] and stats["images"] == 4 * set_after
    assert stats["global_step"] == set_after


def test_train_one_epoch_without_a_stop_runs_the_whole_epoch():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = train_one_epoch(
        model,
        nn.CrossEntropyLoss(),
        optimizer,
        _batches(3),
        torch.device("cpu"),
        0,
        stop=threading.Event(),
    )
    assert not stats["stopped"] and stats["images"] == 12 and stats["global_step"] == 3


def test_evaluate_returns_early_once_stop_is_set():
    stop = threading.Event()
    logits, targets = evaluate(_model(), _batches(5, stop, 2), torch.device("cpu"), stop=stop)
    assert logits.shape == (8, 2) and len(targets) == 8
    stop_now = threading.Event()
    stop_now.set()  # nothing scored: no "nothing decoded" error, the caller ends the run
    logits, targets = evaluate(_model(), _batches(5), torch.device("cpu"), stop=stop_now)
    assert len(targets) == 0


def test_the_handler_only_sets_the_event_and_a_later_second_signal_interrupts():
    from training.cli import stop_on_sigterm

    old_term, old_int = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        stop = stop_on_sigterm(repeat_after_s=3600)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.is_set()
        os.kill(os.getpid(), signal.SIGTERM)  # the same stop, sent twice at once: no exception
        assert signal.getsignal(signal.SIGINT) is old_int  # Ctrl-C keeps Python's handler
        stop = stop_on_sigterm(repeat_after_s=0)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.is_set()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)  # the handler runs between bytecodes; the raise lands here at once
    finally:
        signal.signal(signal.SIGTERM, old_term)


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_sigterm_to_a_real_training_run_ends_it_as_an_interruption(tmp_path):
    data, out = tmp_path / "sample", tmp_path / "out"
    make_sample(data, 4, 6, seed=0)
    argv = tiny_argv(data, out, "--epochs", "1000", "--eval-every", "0")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "training", *argv],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(lambda: (out / "labels.json").is_file(), proc)  # epoch 1 checkpointed
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == EXIT_INTERRUPTED, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    prefix = "interrupted; the last finished epoch's checkpoint (epoch "
    assert last.startswith(prefix) and last.endswith(f"is in {out}; continue with --resume {out}")
    epoch = int(last[len(prefix) :].split()[0])
    assert f"(epoch {epoch} of 1000)" in last
    assert load_checkpoint(out)["epoch"] == epoch - 1  # the note names the checkpoint on disk
    assert not list(out.glob(".*.tmp")) and not (out / "metrics.json").exists()
