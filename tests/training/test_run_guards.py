"""What a training run does with bad images and with flags that would spoil it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.__main__ import main as cli_main
from training.sample import make_sample

from .test_cli_errors import assert_one_line_error, run_cli


def tiny_argv(data: Path, out: Path, *extra: str) -> list[str]:
    """The smallest real run: resnet18 at 32 px, batch 4, one epoch, on the CPU."""
    return [
        "train", "--dataset", "compcars", "--data", str(data), "--out", str(out),
        "--arch", "resnet18", "--image-size", "32", "--batch-size", "4", "--workers", "0",
        "--pretrained", "none", "--device", "cpu", "--epochs", "1", *extra,
    ]  # fmt: skip


@pytest.fixture
def tiny_sample(tmp_path) -> Path:
    root = tmp_path / "sample"
    make_sample(root, 4, 6, seed=0)
    return root


def _truncate_a_training_image(root: Path) -> Path:
    split = root / "data/train_test_split/classification/train.txt"
    for line in split.read_text().split():
        path = root / "data/image" / line
        if path.is_file():
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            return path
    raise AssertionError("no training image in the sample")


def test_truncated_jpeg_is_skipped_and_reported(tiny_sample, tmp_path):
    bad = _truncate_a_training_image(tiny_sample)
    out = tmp_path / "out"
    assert cli_main(tiny_argv(tiny_sample, out)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["skipped_unreadable"] == 1
    assert metrics["unreadable_images"] == [str(bad)]


def test_truncated_jpeg_with_strict_is_one_line_naming_it(tiny_sample, tmp_path):
    bad = _truncate_a_training_image(tiny_sample)
    proc = run_cli(*tiny_argv(tiny_sample, tmp_path / "out", "--strict"))
    assert_one_line_error(proc, str(bad))


def test_resume_refuses_changed_run_defining_flags(tiny_sample, tmp_path):
    out = tmp_path / "out"
    assert cli_main(tiny_argv(tiny_sample, out, "--opt", "sgd")) == 0
    proc = run_cli(
        *tiny_argv(tiny_sample, out, "--opt", "adamw", "--image-size", "48"), "--resume", str(out)
    )
    assert_one_line_error(proc, "--opt adamw (checkpoint: sgd)")
    assert "--image-size 48 (checkpoint: 32)" in proc.stderr
    proc = run_cli(*tiny_argv(tiny_sample, out, "--batch-size", "8"), "--resume", str(out))
    assert_one_line_error(proc, "--batch-size 8 (checkpoint: 4)")
    # --epochs may change: extending a finished run continues it
    resumed = [*tiny_argv(tiny_sample, out, "--opt", "sgd"), "--epochs", "2", "--resume", str(out)]
    assert cli_main(resumed) == 0
    assert json.loads((out / "metrics.json").read_text())["epochs_completed"] == 2


def test_resume_accepts_the_same_data_at_another_path(tiny_sample, tmp_path):
    out = tmp_path / "out"
    assert cli_main(tiny_argv(tiny_sample, out)) == 0
    moved = tmp_path / "mounted-elsewhere"
    shutil.copytree(tiny_sample, moved)
    assert cli_main([*tiny_argv(moved, out), "--epochs", "2", "--resume", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["epochs_completed"] == 2


def test_resume_records_the_checkpoints_pretrained_not_the_unused_default(tiny_sample, tmp_path):
    """--pretrained is not used on resume: args.json and the checkpoint keep the first run's
    value next to its pretrained_source, not this command line's default ("imagenet")."""
    out = tmp_path / "out"
    assert cli_main(tiny_argv(tiny_sample, out)) == 0  # --pretrained none
    resumed = [a for a in tiny_argv(tiny_sample, out) if a not in ("--pretrained", "none")]
    assert cli_main([*resumed, "--epochs", "2", "--resume", str(out)]) == 0
    recorded = json.loads((out / "args.json").read_text())
    saved = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["args"]
    for record in (recorded, saved):
        assert record["pretrained"] == "none"
        assert record["pretrained_source"] == "none (from scratch)"


def test_out_holding_a_checkpoint_is_not_overwritten_by_accident(tiny_sample, tmp_path):
    out = tmp_path / "out"
    assert cli_main(tiny_argv(tiny_sample, out, "--seed", "1")) == 0
    before = (out / "checkpoint.pt").read_bytes()
    proc = run_cli(*tiny_argv(tiny_sample, out, "--seed", "2"))
    assert_one_line_error(proc, f"--out {out} already holds checkpoint.pt")
    assert (out / "checkpoint.pt").read_bytes() == before
    assert cli_main(tiny_argv(tiny_sample, out, "--seed", "2", "--overwrite")) == 0
    assert (out / "checkpoint.pt").read_bytes() != before


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (("--batch-size", "1"), "--batch-size 1"),
        (("--image-size", "16"), "--image-size 16"),
        (("--warmup-epochs", "1e308"), "--warmup-epochs 1e+308: must be <= --epochs 1"),
        (("--dataset", "folder", "--crop", "bbox"), "--crop bbox: --dataset folder"),
        (("--dataset", "compcars-sv", "--crop", "bbox"), "--crop bbox: --dataset compcars-sv"),
    ],
)
def test_unusable_train_flags_are_one_line(tiny_sample, tmp_path, extra, needle):
    proc = run_cli(*tiny_argv(tiny_sample, tmp_path / "out", *extra))
    assert_one_line_error(proc, needle)
    assert not (tmp_path / "out").exists()


def test_compare_under_torchrun(tiny_sample, tmp_path):
    """Two CPU processes (Gloo): every rank trains each arch and rescores its share of the test
    set (rank 1 used to wait while rank 0 rescored it all), only rank 0 writes the table, and
    the rescored top-1 is training's own."""
    out = tmp_path / "cmp"
    argv = [a for a in tiny_argv(tiny_sample, out)[1:] if a not in ("--arch", "resnet18")]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "training", "compare", "--archs", "resnet18,resnet34", *argv],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "compare.json").read_text())
    assert [r["arch"] for r in rows] == ["resnet18", "resnet34"]
    rescored = re.findall(r"rank (\d) of 2 rescores its share of (resnet\d+)'s", proc.stderr)
    assert sorted(rescored) == [(r, a) for r in "01" for a in ("resnet18", "resnet34")]
    for row in rows:
        arch = row["arch"]
        assert json.loads((out / arch / "args.json").read_text())["world_size"] == 2
        assert row["top1"] == json.loads((out / arch / "metrics.json").read_text())["top1"]


def test_unreadable_image_under_ddp_skips_the_step_on_every_rank(tiny_sample, tmp_path):
    """With batch 2 the batch holding the bad image is left with 1: both ranks must skip that
    step, or their gradient all-reduces fall out of step and the run hangs."""
    _truncate_a_training_image(tiny_sample)
    out = tmp_path / "out"
    argv = tiny_argv(tiny_sample, out, "--batch-size", "2", "--epochs", "2")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "training", *argv],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["epochs_completed"] == 2


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (("--lr", "1e308"), "--lr 1e+308: must be <= 10"),
        (("--head-lr-mult", "1e308"), "--head-lr-mult 1e+308: must be <= 1000"),
        (("--batch-size", "99999999999999999999"), "must be <= 65536"),
        (("--weight-decay", "1e20"), "--weight-decay 1e+20: must be <= 1"),
        (("--norm-weight-decay", "2"), "--norm-weight-decay 2: must be <= 1"),
        (("--bias-weight-decay", "1e308"), "--bias-weight-decay 1e+308: must be <= 1"),
    ],
)
def test_values_that_can_only_overflow_are_one_line(tiny_sample, tmp_path, extra, needle):
    proc = run_cli(*tiny_argv(tiny_sample, tmp_path / "out", *extra))
    assert_one_line_error(proc, needle)


def test_out_inside_the_data_or_a_symlink_loop_is_refused(tiny_sample, tmp_path):
    proc = run_cli(*tiny_argv(tiny_sample, tiny_sample / "data" / "image" / "runs"))
    assert_one_line_error(proc, "inside --data")
    assert not (tiny_sample / "data" / "image" / "runs").exists()
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert_one_line_error(
        run_cli(*tiny_argv(tiny_sample, loop)), f"--out {loop}: cannot be resolved"
    )
    assert_one_line_error(run_cli(*tiny_argv(loop, tmp_path / "out")), f"--data {loop}: cannot be")


def test_a_second_run_into_the_same_out_is_refused_while_the_first_holds_it(tiny_sample, tmp_path):
    from training.train import hold_out_lock

    out = tmp_path / "out"
    held = hold_out_lock(out)  # what a first run holds for its life
    try:
        proc = run_cli(*tiny_argv(tiny_sample, out))
        assert_one_line_error(proc, f"--out {out}: another training run (pid {os.getpid()}")
        assert not (out / "checkpoint.pt").exists()
    finally:
        held.close()
    assert cli_main(tiny_argv(tiny_sample, out)) == 0  # released with its process (here: closed)


def test_a_training_split_too_small_for_one_step_is_refused(tiny_sample, tmp_path):
    split = tiny_sample / "data/train_test_split/classification/train.txt"
    split.write_text(split.read_text().split()[0] + "\n")
    proc = run_cli(*tiny_argv(tiny_sample, tmp_path / "out"))
    assert_one_line_error(proc, "the training split has 1 readable image(s)")


def test_checkpoint_files_get_the_umask_modes_not_mkstemps_0600(tiny_sample, tmp_path):
    import stat

    old = os.umask(0o022)
    try:
        assert cli_main(tiny_argv(tiny_sample, tmp_path / "out")) == 0
    finally:
        os.umask(old)
    for name in ("checkpoint.pt", "labels.json", "metrics.json", "args.json"):
        assert stat.S_IMODE((tmp_path / "out" / name).stat().st_mode) == 0o644, name


def test_damaged_resume_state_is_one_line(tiny_sample, tmp_path):
    import torch

    out = tmp_path / "out"
    assert cli_main(tiny_argv(tiny_sample, out, "--epochs", "1")) == 0
    original = torch.load(out / "checkpoint.pt", weights_only=True)
    cases = {
        "momentum": lambda c: c["optimizer"]["state"][0].update(momentum_buffer=torch.zeros(3)),
        "epoch": lambda c: c.update(epoch="x"),
        "scheduler": lambda c: c.update(lr_scheduler={}),
    }
    for name, damage in cases.items():
        ckpt = {**original, "optimizer": {**original["optimizer"]}}
        ckpt["optimizer"]["state"] = {k: dict(v) for k, v in original["optimizer"]["state"].items()}
        damage(ckpt)
        damaged = tmp_path / f"damaged-{name}"
        damaged.mkdir()
        torch.save(ckpt, damaged / "checkpoint.pt")
        proc = run_cli(*tiny_argv(tiny_sample, damaged, "--epochs", "2", "--resume", str(damaged)))
        assert_one_line_error(proc, f"--resume {damaged}")


def test_sigterm_mid_run_is_one_line_naming_the_checkpoint_and_leaves_no_temp_file(
    tiny_sample, tmp_path
):
    import signal
    import time

    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "training", *tiny_argv(tiny_sample, out, "--epochs", "200")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.pt").exists():  # the first epoch is saved
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted; the last finished epoch's checkpoint (epoch "), last
    assert last.endswith(f"of 200) is in {out}; continue with --resume {out}"), last
    assert not list(out.glob(".*.tmp"))


def _torchrun(*argv: str, timeout: int = 180) -> subprocess.CompletedProcess:
    """``python -m training ARGV`` as two CPU processes (Gloo)."""
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "training", *argv],
        capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


# every metric of the test set that a single process's evaluate also reports
SCORED_KEYS = (
    "top1", "top5", "balanced_accuracy", "make_top1", "make_top1_by_id", "per_class",
    "confused_pairs", "num_test", "majority_class_top1", "skipped_unreadable", "unreadable_images",
)  # fmt: skip


def test_ddp_ranks_score_their_own_shards_and_the_metrics_are_one_process_metrics(
    tiny_sample, tmp_path
):
    """Each of 2 ranks scores its half of the 8 test images (rank 0 used to score them all while
    rank 1 waited in a barrier); gathered on rank 0, every metric is what one process scores on
    the checkpoint, the EMA's and the raw weights', and the image only rank 1 failed to decode
    is reported too."""
    from training.datasets import load_index

    bad = load_index("compcars", tiny_sample, "test").samples[-1].path  # in rank 1's shard
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    out = tmp_path / "out"
    proc = _torchrun(*tiny_argv(tiny_sample, out, "--batch-size", "2", "--ema-decay", "0.5"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    shards = sorted(set(re.findall(r"rank (\d) of 2 evaluates test images (\d+)\.\.(\d+) of 8",
                                   proc.stderr)))  # fmt: skip
    assert shards == [("0", "0", "4"), ("1", "4", "8")], proc.stderr[-3000:]
    ddp = json.loads((out / "metrics.json").read_text())
    assert ddp["unreadable_images"] == [str(bad)] and ddp["num_test"] == 7
    for flags, top1 in (((), "top1"), (("--no-ema",), "raw_top1")):
        single = tmp_path / f"single{len(flags)}"
        assert cli_main([
            "evaluate", "--checkpoint", str(out), "--data", str(tiny_sample), "--device", "cpu",
            "--workers", "0", "--batch-size", "2", "--out", str(single), *flags,
        ]) == 0  # fmt: skip
        alone = json.loads((single / "metrics.json").read_text())
        assert ddp[top1] == alone["top1"]
        if not flags:
            assert {k: ddp[k] for k in SCORED_KEYS} == {k: alone[k] for k in SCORED_KEYS}


def test_ddp_resume_continues_the_uninterrupted_runs_order(tiny_sample, tmp_path):
    """Under DDP too, --stop-after 1 then --resume ends on the weights of one straight run. A
    resumed folder whose args.json is of another run is warned about once, by rank 0 (each rank
    used to log it)."""
    common = ("--batch-size", "2", "--epochs", "2", "--eval-every", "0", "--seed", "3")
    straight, split = tmp_path / "straight", tmp_path / "split"
    for argv in (
        tiny_argv(tiny_sample, straight, *common),
        tiny_argv(tiny_sample, split, *common, "--stop-after", "1"),
        tiny_argv(tiny_sample, split, *common, "--resume", str(split)),
    ):
        if "--resume" in argv:
            record = json.loads((split / "args.json").read_text())
            (split / "args.json").write_text(json.dumps({**record, "run_id": "another"}))
        proc = _torchrun(*argv)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("the folder mixes two runs' files") == 1, proc.stderr[-3000:]
    a, b = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (straight, split))
    assert a["args"]["sampler_seed"] == b["args"]["sampler_seed"] == 3 * 100_003
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name


@pytest.mark.parametrize("flag", ["--norm-weight-decay", "--bias-weight-decay"])
@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_bad_split_weight_decay_is_one_line(tiny_sample, tmp_path, flag, value):
    proc = run_cli(*tiny_argv(tiny_sample, tmp_path / "out", flag, value))
    assert_one_line_error(proc, f"argument {flag}: '{value}' must be a finite number >= 0")


def test_split_weight_decay_is_recorded_and_resumes_exactly(tiny_sample, tmp_path):
    decay = ("--opt", "sgd", "--norm-weight-decay", "0", "--bias-weight-decay", "0.001")
    common = (*decay, "--epochs", "2", "--eval-every", "0")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert cli_main(tiny_argv(tiny_sample, straight, *common)) == 0
    args = json.loads((straight / "args.json").read_text())
    assert (args["weight_decay"], args["norm_weight_decay"], args["bias_weight_decay"]) == (
        1e-4, 0.0, 0.001,
    )  # fmt: skip
    groups = {g["name"]: g for g in args["param_groups"]}
    assert list(groups) == ["backbone", "backbone norm", "backbone bias", "head", "head bias"]
    assert groups["backbone norm"]["weight_decay"] == 0.0 and groups["head"]["lr"] == 0.01 * 10
    saved = torch.load(straight / "checkpoint.pt", weights_only=True)
    assert [g["weight_decay"] for g in saved["optimizer"]["param_groups"]] == [
        1e-4, 0.0, 0.001, 1e-4, 0.001,
    ]  # fmt: skip
    assert cli_main(tiny_argv(tiny_sample, split, *common, "--stop-after", "1")) == 0
    assert cli_main(tiny_argv(tiny_sample, split, *common, "--resume", str(split))) == 0
    a, b = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (straight, split))
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][name]), name
    # another split on resume: refused in one line naming the flag, not a trace from torch
    proc = run_cli(
        *tiny_argv(tiny_sample, split, *common[:2], "--epochs", "2", "--resume", str(split))
    )
    assert_one_line_error(proc, "--norm-weight-decay 0.0001 (checkpoint: 0.0)")
    assert "--bias-weight-decay 0.0001 (checkpoint: 0.001)" in proc.stderr


def test_a_checkpoint_from_before_the_decay_flags_resumes_with_its_grouping(tiny_sample, tmp_path):
    out = tmp_path / "out"
    assert cli_main(tiny_argv(tiny_sample, out, "--opt", "sgd")) == 0
    raw = torch.load(out / "checkpoint.pt", weights_only=True)
    for key in ("norm_weight_decay", "bias_weight_decay", "param_groups", "sampler_seed"):
        del raw["args"][key]
    torch.save(raw, out / "checkpoint.pt")
    proc = run_cli(*tiny_argv(tiny_sample, out, "--opt", "sgd", "--norm-weight-decay", "0"),
                   "--epochs", "2", "--resume", str(out))  # fmt: skip
    assert_one_line_error(proc, "--norm-weight-decay 0.0 (checkpoint: 0.0001)")
    # a checkpoint whose optimizer was grouped otherwise than its args say: one line, not torch's
    raw["args"]["norm_weight_decay"] = 0.0
    torch.save(raw, out / "checkpoint.pt")
    proc = run_cli(*tiny_argv(tiny_sample, out, "--opt", "sgd", "--norm-weight-decay", "0"),
                   "--epochs", "2", "--resume", str(out))  # fmt: skip
    assert_one_line_error(proc, "--norm-weight-decay and --bias-weight-decay must split")
    del raw["args"]["norm_weight_decay"]
    torch.save(raw, out / "checkpoint.pt")
    resumed = [*tiny_argv(tiny_sample, out, "--opt", "sgd"), "--epochs", "2", "--resume", str(out)]
    assert cli_main(resumed) == 0  # no flags: the two groups it has, as before
    assert json.loads((out / "args.json").read_text())["norm_weight_decay"] == 1e-4
