"""Damaged files and odd paths given to `python -m training`: one line naming the file, exit 2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from training.checkpoint import save_checkpoint
from training.datasets import load_index
from training.models import build_model
from training.preprocessing import PreprocessSpec

from .test_cli_errors import assert_one_line_error, run_cli
from .test_run_guards import tiny_argv, tiny_sample  # noqa: F401 (fixture)

SPLIT = "data/train_test_split/classification"


def write_ckpt(out: Path, classes: list[dict], **changes) -> Path:
    """A checkpoint as training writes it (resnet18, random weights), with ``changes`` applied."""
    model = build_model("resnet18", len(classes))
    ckpt = {
        "arch": "resnet18",
        "num_classes": len(classes),
        "classes": classes,
        "level": "model",
        "preprocess": PreprocessSpec.for_image_size(32).model_dump(mode="json"),
        "state_dict": model.state_dict(),
        "epoch": 0,
        "args": {},
        **changes,
    }
    save_checkpoint(out, ckpt)
    return out


def sample_classes(root: Path) -> list[dict]:
    return load_index("compcars", root, "test").classes


def test_split_file_that_is_not_utf8(tiny_sample, tmp_path):  # noqa: F811
    split = tiny_sample / SPLIT / "train.txt"
    split.write_bytes(split.read_bytes() + b"\xff\xfe\n")
    proc = run_cli(*tiny_argv(tiny_sample, tmp_path / "out"))
    assert_one_line_error(proc, f"split file {split} is not UTF-8")
    assert not (tmp_path / "out").exists()


def test_names_mat_that_is_garbage(tiny_sample, tmp_path):  # noqa: F811
    mat = tiny_sample / "data/misc/make_model_name.mat"
    mat.write_text("garbage\n")
    proc = run_cli(*tiny_argv(tiny_sample, tmp_path / "out"))
    assert_one_line_error(proc, f"unreadable {mat}")


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"format_version": "2"}, "non-integer format_version"),
        ({"num_classes": 5}, "num_classes is 5"),
        ({"classes": None}, "classes is not a list"),
        ({"preprocess": {"resize": "x"}}, "preprocess: resize"),
        ({"preprocess": None}, "preprocess"),
        ({"level": "bogus"}, "level 'bogus'"),
        ({"arch": None}, "unknown arch None"),
        ({"train_class_counts": [3, 4]}, "train_class_counts is not a list of 1 image counts"),
        ({"train_class_counts": ["3"]}, "train_class_counts is not a list of 1 image counts"),
        ({"train_class_counts": [-1]}, "train_class_counts is not a list of 1 image counts"),
    ],
)
def test_checkpoint_with_damaged_fields(tmp_path, changes, needle):
    ckpt = write_ckpt(tmp_path / "ckpt", [{"make": "A", "model": "B", "make_id": 1, "model_id": 2}])
    (tmp_path / "data").mkdir()
    changes_ckpt = torch.load(ckpt / "checkpoint.pt", weights_only=True) | changes
    torch.save(changes_ckpt, ckpt / "checkpoint.pt")
    proc = run_cli("evaluate", "--checkpoint", str(ckpt), "--data", str(tmp_path / "data"))
    assert_one_line_error(proc, str(ckpt / "checkpoint.pt"))
    assert needle in proc.stderr


def test_checkpoint_whose_weights_do_not_fit(tiny_sample, tmp_path):  # noqa: F811
    classes = sample_classes(tiny_sample)
    ckpt = write_ckpt(tmp_path / "ckpt", classes, arch="resnet34")  # resnet18 weights
    proc = run_cli(
        "evaluate", "--checkpoint", str(ckpt), "--data", str(tiny_sample), "--workers", "0",
        "--device", "cpu",
    )  # fmt: skip
    assert_one_line_error(proc, f"{ckpt}: its weights do not fit the model")


def test_evaluate_names_the_first_differing_class(tiny_sample, tmp_path):  # noqa: F811
    classes = sample_classes(tiny_sample)
    renamed = [dict(classes[0], model="Other"), *classes[1:]]
    ckpt = write_ckpt(tmp_path / "ckpt", renamed)
    proc = run_cli("evaluate", "--checkpoint", str(ckpt), "--data", str(tiny_sample))
    assert_one_line_error(proc, "class 0 is")
    assert "Other" in proc.stderr


def test_evaluate_out_that_is_the_checkpoint_directory(tiny_sample, tmp_path):  # noqa: F811
    ckpt = write_ckpt(tmp_path / "ckpt", sample_classes(tiny_sample))
    (ckpt / "metrics.json").write_text('{"top1": 0.5}\n')
    for checkpoint in (ckpt, ckpt / "checkpoint.pt"):
        proc = run_cli(
            "evaluate", "--checkpoint", str(checkpoint), "--data", str(tiny_sample),
            "--out", str(ckpt),
        )  # fmt: skip
        assert_one_line_error(proc, f"--out {ckpt} is the checkpoint's directory")
    assert (ckpt / "metrics.json").read_text() == '{"top1": 0.5}\n'


@pytest.mark.parametrize("drop", ["optimizer", "weights"])
def test_resume_from_a_checkpoint_that_cannot_continue(tiny_sample, tmp_path, drop):  # noqa: F811
    classes = sample_classes(tiny_sample)
    ckpt = write_ckpt(tmp_path / "ckpt", classes, args=None)
    raw = torch.load(ckpt / "checkpoint.pt", weights_only=True)
    if drop == "weights":
        raw.update(optimizer={}, lr_scheduler={})
        del raw["state_dict"]["fc.bias"]
        needle = f"--resume {ckpt}: its weights do not fit the model"
    else:
        needle = f"--resume {ckpt}: the checkpoint has no optimizer, lr_scheduler"
    torch.save(raw, ckpt / "checkpoint.pt")
    proc = run_cli(*tiny_argv(tiny_sample, tmp_path / "out", "--resume", str(ckpt)))
    assert_one_line_error(proc, needle)


def test_pretrained_weights_of_the_wrong_shape(tiny_sample, tmp_path):  # noqa: F811
    weights = tmp_path / "weights.pt"
    torch.save({"layer1.0.conv1.weight": torch.zeros(1)}, weights)
    argv = tiny_argv(tiny_sample, tmp_path / "out")
    argv[argv.index("--pretrained") + 1] = str(weights)
    proc = run_cli(*argv)
    assert_one_line_error(proc, f"--pretrained {weights}")
    assert "do not fit resnet18" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_out_that_is_not_utf8(tiny_sample, tmp_path):  # noqa: F811
    out = Path(os.fsdecode(os.fsencode(tmp_path) + b"/o\xff"))
    proc = run_cli(*tiny_argv(tiny_sample, out))
    assert_one_line_error(proc, "o\\xff: the path is not UTF-8")
    assert not out.exists()


def test_folder_class_name_that_is_not_utf8(tmp_path):
    root = tmp_path / "photos"
    for name in (b"good", b"bad\xff"):
        folder = Path(os.fsdecode(os.fsencode(root) + b"/" + name))
        folder.mkdir(parents=True)
        (folder / "a.jpg").write_bytes(b"not read")
    proc = run_cli(
        "train", "--dataset", "folder", "--data", str(root), "--out", str(tmp_path / "out"),
        "--pretrained", "none", "--device", "cpu",
    )  # fmt: skip
    assert_one_line_error(proc, "bad\\xff has a name that is not UTF-8")


def test_folder_file_name_that_is_not_utf8_is_split_by_its_bytes(tmp_path):
    from PIL import Image

    folder = tmp_path / "photos" / "car"
    folder.mkdir(parents=True)
    names = [os.fsdecode(f"{i}".encode() + b"\xff.png") for i in range(20)]
    for name in names:
        Image.new("RGB", (8, 8)).save(folder / name)
    train = load_index("folder", tmp_path / "photos", "train")
    test = load_index("folder", tmp_path / "photos", "test")
    assert len(train.samples) + len(test.samples) == len(names)
