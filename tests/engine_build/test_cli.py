"""`python -m engine_build`: bad input is one line on stderr and exit 2; success prints the path."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from engine_build.__main__ import get_args_parser, main
from engine_build.bundle import load_bundle

from .conftest import write_checkpoint


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine_build", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--checkpoint", "/no/such/ckpt", "--out", "{tmp}/b"], "/no/such/ckpt"),
        (["--checkpoint", "{ckpt}", "--out", "{tmp}/b", "--precision", "fp32,fp8"], "'fp32,fp8'"),
        (["--checkpoint", "{ckpt}", "--out", "{tmp}/b", "--max-batch", "x"], "'x'"),
        (["--checkpoint", "{ckpt}", "--out", "{tmp}/b", "--parity-data", "/no/imgs"], "/no/imgs"),
        (["--out", "{tmp}/b"], "--checkpoint"),
        (["--checkpoint", "{ckpt}", "--out", "{tmp}/b", "--threads", "-1"], "--threads"),
        (["--checkpoint", "{ckpt}", "--out", "{tmp}/b", "--workspace-gb", "-5"], "--workspace-gb"),
        (["--checkpoint", "{ckpt}", "--out", "{tmp}/b", "--opset", "7"], "--opset"),
        (
            ["--checkpoint", "{ckpt}", "--out", "{tmp}/a-file/b", "--parity-data", "{parity}"],
            "a-file",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2(checkpoint_dir, parity_dir, tmp_path, args, needle):
    (tmp_path / "a-file").write_text("not a folder")
    args = [a.format(ckpt=checkpoint_dir, tmp=tmp_path, parity=parity_dir) for a in args]
    if "--parity-data" not in args and "--checkpoint" in args:
        # everything else buildable: only the flag under test may be refused
        args += ["--parity-data", str(parity_dir), "--precision", "fp32"]
    proc = run_cli(*args, "--log-level", "ERROR")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert needle in lines[0] and lines[0].startswith("python -m engine_build: error:")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (["--precision", "fp32", "--backends", "tensorrt"], "--backends tensorrt"),
        (["--precision", "fp32,int8", "--calibration-images", "0"], "--calibration-images"),
        (["--precision", "fp32", "--timing-cache", "OUT/trt.cache"], "is inside --out"),
    ],
)
def test_unbuildable_options_are_one_line_exit_2(
    checkpoint_dir, parity_dir, tmp_path, options, needle
):
    """A demanded TensorRT plan without fp16, or int8 with no calibration images, is refused
    before any work, rather than exiting 0 without the plan or dividing by zero."""
    options = [o.replace("OUT", str(tmp_path / "b")) for o in options]
    proc = run_cli(
        "--checkpoint", str(checkpoint_dir), "--out", str(tmp_path / "b"),
        "--parity-data", str(parity_dir), "--log-level", "ERROR", *options,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert needle in lines[0] and lines[0].startswith("python -m engine_build: error:")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("out", ["runs", "runs/r18", "elsewhere"])
def test_force_never_deletes_the_checkpoint_or_a_non_bundle(parity_dir, tmp_path, out):
    """`--checkpoint runs/r18 --out runs --force` used to delete runs, checkpoint included;
    --force now replaces only a bundle and never a folder holding the checkpoint."""
    ckpt = write_checkpoint(tmp_path / "runs" / "r18")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "notes.txt").write_text("mine")
    before = sorted(p.name for p in ckpt.iterdir())
    proc = run_cli(
        "--checkpoint", str(ckpt), "--out", str(tmp_path / out), "--force",
        "--precision", "fp32", "--parity-data", str(parity_dir), "--log-level", "ERROR",
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m engine_build: error: --out ")
    assert str(tmp_path / out) in lines[0]
    assert sorted(p.name for p in ckpt.iterdir()) == before
    assert (tmp_path / "elsewhere" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        ("arch", "its weights do not fit the model"),  # resnet18 weights, resnet34 named
        ("num_classes", "it lists 3 classes but num_classes is 4"),
        ("preprocess", "is damaged: preprocess: crop"),
        ("format_version", "non-integer format_version"),
    ],
)
def test_damaged_checkpoint_is_one_line_exit_2(parity_dir, tmp_path, damage, needle):
    ckpt = write_checkpoint(tmp_path / "ckpt")
    raw = torch.load(ckpt / "checkpoint.pt", weights_only=True)
    raw.update(
        {
            "arch": {"arch": "resnet34"},
            "num_classes": {"num_classes": 4},
            "preprocess": {"preprocess": {**raw["preprocess"], "crop": "big"}},
            "format_version": {"format_version": "1"},
        }[damage]
    )
    torch.save(raw, ckpt / "checkpoint.pt")
    proc = run_cli(
        "--checkpoint", str(ckpt), "--out", str(tmp_path / "b"), "--precision", "fp32",
        "--parity-data", str(parity_dir), "--log-level", "ERROR",
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith("python -m engine_build: error:") and needle in lines[0]
    assert str(ckpt) in lines[0]
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("name", ["labels.json", "empty.pt"])
def test_a_file_that_is_no_torch_file_is_named_as_such(parity_dir, tmp_path, name):
    """The labels.json training writes beside its checkpoint, passed by mistake, is not a
    checkpoint at all; torch would call it a pickle a weights-only load refuses."""
    ckpt = write_checkpoint(tmp_path / "ckpt")
    wrong = ckpt / name
    if name == "labels.json" and not wrong.exists():
        wrong.write_text('{"classes": []}')
    elif name == "empty.pt":
        wrong.write_bytes(b"")
    proc = run_cli(
        "--checkpoint", str(wrong), "--out", str(tmp_path / "b"), "--precision", "fp32",
        "--parity-data", str(parity_dir), "--log-level", "ERROR",
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert f"unreadable checkpoint {wrong}: not a PyTorch checkpoint file" in line
    assert "weights-only" not in line


def test_out_that_is_not_utf8_is_one_line_exit_2(checkpoint_dir, parity_dir, tmp_path):
    """The ONNX exporter takes the path as text: it failed with a TypeError traceback."""
    out = os.fsdecode(os.fsencode(tmp_path) + b"/b\xff")
    proc = run_cli(
        "--checkpoint", str(checkpoint_dir), "--out", out, "--precision", "fp32",
        "--parity-data", str(parity_dir), "--log-level", "ERROR",
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "b\\xff: the path is not UTF-8" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_failed_gate_exit_2_with_report(parity_dir, tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt", near_tie=True)
    proc = run_cli(
        "--checkpoint",
        str(ckpt),
        "--out",
        str(tmp_path / "b"),
        "--precision",
        "fp32,int8",
        "--parity-data",
        str(parity_dir),
        "--int8-agreement",
        "0.9",
        "--log-level",
        "ERROR",
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "parity gate failed" in proc.stderr
    report = json.loads((tmp_path / "b.parity-failed.json").read_text())
    assert report["artifacts"]["onnxruntime-int8"]["gate"]["passed"] is False
    assert not (tmp_path / "b").exists()


def test_cli_builds_a_bundle(checkpoint_dir, parity_dir, tmp_path, capsys):
    out = tmp_path / "bundle"
    args = get_args_parser().parse_args(
        [
            "--checkpoint",
            str(checkpoint_dir),
            "--out",
            str(out),
            "--parity-data",
            str(parity_dir),
            "--max-batch",
            "4",
            "--model-name",
            "cars",
            "--model-version",
            "2024.1",
            "--log-level",
            "WARNING",
        ]
    )
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == str(out)
    manifest = load_bundle(out).manifest
    assert (manifest.model_name, manifest.model_version) == ("cars", "2024.1")
    assert (manifest.batch_profile.opt, manifest.batch_profile.max) == (4, 4)
