"""What a run leaves in --out when it replaces another (--overwrite) or is interrupted, and what
the interruption's one line tells its user to do next."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pytest
import torch

from training import checkpoint as checkpoint_mod
from training import train as train_mod
from training.__main__ import main as cli_main
from training.checkpoint import _atomic_write
from training.cli import EXIT_INTERRUPTED, run_guarded
from training.sample import make_sample

from .test_run_guards import tiny_argv


@pytest.fixture
def sample(tmp_path) -> Path:
    root = tmp_path / "sample"
    make_sample(root, 4, 6, seed=0)
    return root


def _interrupt_in_epoch(monkeypatch: pytest.MonkeyPatch, interrupted: int) -> None:
    """Ctrl-C during epoch ``interrupted`` (0-based) of the next run, as the signal would raise
    it: a KeyboardInterrupt out of the training loop."""
    real = train_mod.train_one_epoch

    def train_one_epoch(model, criterion, optimizer, loader, device, epoch, **kwargs):
        if epoch == interrupted:
            raise KeyboardInterrupt
        return real(model, criterion, optimizer, loader, device, epoch, **kwargs)

    monkeypatch.setattr(train_mod, "train_one_epoch", train_one_epoch)


def _last_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def test_overwrite_interrupted_in_its_first_epoch_leaves_none_of_the_old_runs_files(
    sample, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    assert cli_main(tiny_argv(sample, out, "--seed", "1")) == 0
    old_events = sorted((out / "tb").iterdir())
    assert old_events and (out / "checkpoint.pt").is_file()
    (out / "notes.txt").write_text("the user's own file")  # not training's: it stays
    (out / ".checkpoint.pt.abc.tmp").write_bytes(b"a temp file a killed run left")
    capsys.readouterr()

    _interrupt_in_epoch(monkeypatch, 0)
    argv = tiny_argv(sample, out, "--seed", "2", "--epochs", "2", "--overwrite")
    assert cli_main(argv) == EXIT_INTERRUPTED
    line = _last_line(capsys)
    assert line == f"interrupted; no epoch finished, so this run saved no checkpoint in {out}"
    left = sorted(p.name for p in out.iterdir())
    assert left == [".train.lock", "args.json", "notes.txt", "tb"]
    assert not any(p.exists() for p in old_events)
    assert json.loads((out / "args.json").read_text())["seed"] == 2  # the new run's record
    assert (out / "notes.txt").read_text() == "the user's own file"

    # nothing of the old, finished run is left to be "resumed" in its place
    monkeypatch.undo()
    assert cli_main([*argv, "--resume", str(out)]) == 2
    assert "no checkpoint at" in _last_line(capsys)


def test_an_interrupt_after_a_saved_epoch_names_it_and_the_run_continues_from_it(
    sample, tmp_path, monkeypatch, capsys, caplog
):
    out = tmp_path / "out"
    argv = tiny_argv(sample, out, "--epochs", "3")
    _interrupt_in_epoch(monkeypatch, 1)
    assert cli_main(argv) == EXIT_INTERRUPTED
    assert _last_line(capsys) == (
        f"interrupted; the last finished epoch's checkpoint (epoch 1 of 3) is in {out}; "
        f"continue with --resume {out}"
    )
    run_id = json.loads((out / "args.json").read_text())["run_id"]
    saved = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert saved["epoch"] == 0 and saved["args"]["run_id"] == run_id

    # --resume OUT with --overwrite continues that checkpoint: it is not removed, and an
    # interruption before the next save says the checkpoint is as it was
    _interrupt_in_epoch(monkeypatch, 1)
    assert cli_main([*argv, "--resume", str(out), "--overwrite"]) == EXIT_INTERRUPTED
    assert _last_line(capsys) == (
        f"interrupted; no epoch finished, so this run saved no checkpoint; --resume {out} is as "
        "it was, continue from it again"
    )
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 0

    # an args.json of another run beside the checkpoint is a folder that mixes two runs
    record = json.loads((out / "args.json").read_text())
    (out / "args.json").write_text(json.dumps({**record, "run_id": "another"}))
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING, logger="training.train"):
        assert cli_main([*argv, "--resume", str(out)]) == 0
    assert any("mixes two runs" in r.getMessage() for r in caplog.records)
    # the resumed run is the same run: it keeps the id, in every file it writes
    assert json.loads((out / "args.json").read_text())["run_id"] == run_id
    assert json.loads((out / "metrics.json").read_text())["run_id"] == run_id
    assert torch.load(out / "checkpoint.pt", weights_only=True)["args"]["run_id"] == run_id


def test_overwrite_keeps_the_checkpoint_it_resumes_through_a_linked_file(
    sample, tmp_path, monkeypatch, capsys
):
    """--resume RES whose checkpoint.pt is a symlink to OUT/checkpoint.pt resumes OUT's very
    checkpoint: --overwrite must not remove it (it did, comparing paths, and an interruption
    then left no checkpoint at all while the note said --resume RES was as it was)."""
    out, res = tmp_path / "runX", tmp_path / "resX"
    assert cli_main(tiny_argv(sample, out)) == 0
    res.mkdir()
    (res / "checkpoint.pt").symlink_to(out / "checkpoint.pt")
    capsys.readouterr()

    _interrupt_in_epoch(monkeypatch, 1)
    argv = [*tiny_argv(sample, out, "--epochs", "2"), "--resume", str(res), "--overwrite"]
    assert cli_main(argv) == EXIT_INTERRUPTED
    assert _last_line(capsys) == (
        f"interrupted; no epoch finished, so this run saved no checkpoint; --resume {res} is as "
        "it was, continue from it again"
    )
    assert (out / "checkpoint.pt").is_file() and not (out / "checkpoint.pt").is_symlink()
    assert torch.load(res / "checkpoint.pt", weights_only=True)["epoch"] == 0
    monkeypatch.undo()
    assert cli_main(argv) == 0  # and it is: the run continues from it
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1


@pytest.mark.parametrize(
    ("cut", "named"),
    [
        ("labels.json", 2),  # checkpoint.pt of epoch 2 is in place, labels.json not yet written
        ("checkpoint.pt", 1),  # before the rename: epoch 1's checkpoint.pt stays the last
    ],
)
def test_an_interrupt_inside_a_checkpoint_save_names_the_checkpoint_on_disk(
    sample, tmp_path, monkeypatch, capsys, cut, named
):
    """The note names the epoch whose checkpoint.pt is on disk: an interruption after epoch 2's
    checkpoint.pt was renamed into place but before labels.json followed said epoch 1 (or, in
    a first epoch, that no checkpoint was saved, inviting an --overwrite of it)."""
    out = tmp_path / "out"
    real_json, real_save = checkpoint_mod.atomic_write_json, checkpoint_mod.atomic_torch_save
    writes: list[str] = []

    def cut_on_the_second(path: Path) -> None:
        writes.append(path.name)
        if writes.count(cut) == 2:
            raise KeyboardInterrupt

    def write_json(path, obj):
        cut_on_the_second(path)
        real_json(path, obj)

    def torch_save(path, obj):
        cut_on_the_second(path)
        real_save(path, obj)

    monkeypatch.setattr(checkpoint_mod, "atomic_write_json", write_json)
    monkeypatch.setattr(checkpoint_mod, "atomic_torch_save", torch_save)
    argv = tiny_argv(sample, out, "--epochs", "3", "--eval-every", "0")
    assert cli_main(argv) == EXIT_INTERRUPTED
    assert _last_line(capsys) == (
        f"interrupted; the last finished epoch's checkpoint (epoch {named} of 3) is in {out}; "
        f"continue with --resume {out}"
    )
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == named - 1
    assert not list(out.glob(".*.tmp"))


class _InterruptedWriter:
    """A file whose third write is interrupted, as Ctrl-C or SIGTERM interrupts torch.save."""

    def __init__(self, f):
        self.f, self.writes = f, 0

    def write(self, data: bytes) -> int:
        self.writes += 1
        if self.writes == 3:
            raise KeyboardInterrupt
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def test_an_interrupt_during_a_checkpoint_write_stays_an_interrupt(tmp_path, capsys):
    """torch.save's zip writer fails in its __exit__ on the half-written archive; that
    RuntimeError must not replace the KeyboardInterrupt (exit 1 and a traceback, not 130)."""
    state = {"a": torch.zeros(100_000), "b": torch.ones(100_000)}

    def write_checkpoint(_args):
        _atomic_write(
            tmp_path / "checkpoint.pt", lambda f: torch.save(state, _InterruptedWriter(f))
        )

    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(None)
    assert list(tmp_path.iterdir()) == []  # the temp file is gone
    assert run_guarded(write_checkpoint, argparse.Namespace(command="train")) == EXIT_INTERRUPTED
    assert _last_line(capsys) == "interrupted"


def test_the_summary_line_is_the_commands_not_the_library_runs(sample, tmp_path, capsys):
    out = tmp_path / "out"
    args = train_mod.get_args_parser().parse_args(tiny_argv(sample, out)[1:])
    metrics = train_mod.run(args)
    assert metrics["top1"] >= 0 and capsys.readouterr().out == ""
    assert cli_main(tiny_argv(sample, out, "--overwrite")) == 0
    assert capsys.readouterr().out.startswith(f"resnet18 on compcars:{Path(sample)}")
