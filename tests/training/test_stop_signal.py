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


# a training run in a child process: this checkout's packages, one OpenMP thread (tiny models)
CHILD_ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _start_training(argv: list[str], **popen: object) -> subprocess.Popen:
    """``python -m training ARGV`` in a child of this checkout, its output captured as text."""
    return subprocess.Popen(
        [sys.executable, "-m", "training", *argv],
        cwd=REPO,
        env=CHILD_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


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
    proc = _start_training(argv)
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


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def _group_is_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def test_sigterm_to_the_process_group_with_loader_workers_is_an_interruption(tmp_path):
    """``kill -TERM -PGID`` (Slurm's scancel, systemd) reaches the DataLoader workers too: the
    run still ends as the interruption (130 and its note), not on a dead worker, and leaves no
    worker behind."""
    data, out = tmp_path / "sample", tmp_path / "out"
    make_sample(data, 4, 6, seed=0)
    argv = tiny_argv(data, out, "--epochs", "1000", "--eval-every", "0")
    argv[argv.index("--workers") + 1] = "2"
    proc = _start_training(argv, start_new_session=True)  # its own group, as a job's is
    try:
        _wait_for(lambda: len(_children(proc.pid)) >= 2, proc)  # the loader's workers run
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        deadline = time.monotonic() + 60
        while not _group_is_gone(proc.pid):  # the workers end with the main process
            assert time.monotonic() < deadline, "a loader worker outlived the run"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if not _group_is_gone(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == EXIT_INTERRUPTED, err[-3000:]
    assert "Traceback" not in err and "killed by signal" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("interrupted; "), err[-3000:]


# a real process whose SIGTERM arrives as the epoch's evaluation starts, every time: the wrapper
# sends it from inside train's call of evaluate, before the first evaluation batch
SIGTERM_AT_EVALUATION = """
import os, signal, sys
from training import train
real = train.evaluate
def evaluate(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)
train.evaluate = evaluate
from training.__main__ import main
sys.exit(main(sys.argv[1:], own_signals=True))
"""


def test_sigterm_during_the_epochs_evaluation_keeps_the_trained_epoch(tmp_path):
    data, out = tmp_path / "sample", tmp_path / "out"
    make_sample(data, 4, 6, seed=0)
    argv = tiny_argv(data, out, "--epochs", "3", "--eval-every", "1")
    proc = subprocess.run(
        [sys.executable, "-c", SIGTERM_AT_EVALUATION, *argv],
        cwd=REPO,
        env=CHILD_ENV,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == EXIT_INTERRUPTED, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (
        f"interrupted; the last finished epoch's checkpoint (epoch 1 of 3) is in {out}; "
        f"continue with --resume {out}"
    )
    ckpt = load_checkpoint(out)
    assert ckpt["epoch"] == 0
    assert ckpt["metrics"] == {}  # as an epoch not evaluated records it
    assert not (out / "metrics.json").exists()
