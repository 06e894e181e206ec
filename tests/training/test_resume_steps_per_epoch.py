"""--resume on a data set of another size: the LR schedule is rebuilt for this run's steps per
epoch but resumed at the checkpoint's step, so the cosine decay would end far from 0 (about 19%
of the peak LR in the reviewer's run). The checkpoint records its steps per epoch and a resume
whose steps differ is refused in one line naming both; older checkpoints still resume."""

from __future__ import annotations

import json

import torch

from training.__main__ import main as cli_main
from training.sample import make_sample

from .test_cli_errors import assert_one_line_error, run_cli
from .test_run_guards import tiny_argv, tiny_sample  # noqa: F401 (fixture)


def test_resume_on_a_data_set_of_another_size_is_refused(tiny_sample, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    assert cli_main(tiny_argv(tiny_sample, out)) == 0
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    images = sum(ckpt["train_class_counts"])
    assert ckpt["train_images"] == images
    assert ckpt["steps_per_epoch"] == images // 4  # batch 4, one process
    bigger = tmp_path / "bigger"  # the same classes, twice the images
    make_sample(bigger, 4, 12, seed=0)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    proc = run_cli(*tiny_argv(bigger, out, "--epochs", "2", "--resume", str(out)))
    assert_one_line_error(proc, f"--resume {out}: this run has ")
    line = next(ln for ln in proc.stderr.splitlines() if "error" in ln)
    assert f"the checkpoint {ckpt['steps_per_epoch']} ({images} training images)" in line
    assert "steps per epoch" in line and "batch 4 x 1 process(es)" in line
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_a_checkpoint_without_steps_per_epoch_still_resumes(tiny_sample, tmp_path):  # noqa: F811
    """Checkpoints written before the field existed are not compared (nothing to compare)."""
    out = tmp_path / "out"
    assert cli_main(tiny_argv(tiny_sample, out)) == 0
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    for key in ("steps_per_epoch", "train_images"):
        del ckpt[key]
    torch.save(ckpt, out / "checkpoint.pt")
    assert cli_main([*tiny_argv(tiny_sample, out, "--epochs", "2"), "--resume", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["epochs_completed"] == 2
    resumed = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert resumed["steps_per_epoch"] == ckpt["global_step"]  # one epoch's steps, recorded now
