"""A checkpoint's class list against the data's (``--resume`` and evaluate): names that differ
only by the folder reader's normalisation (NFC, stripped) are the same classes; anything else is
a real difference and refused."""

from __future__ import annotations

import logging
import unicodedata
from pathlib import Path

import pytest
from PIL import Image

from training.__main__ import main as cli_main
from training.checkpoint import load_checkpoint, save_checkpoint
from training.datasets import load_index
from training.train import classes_match

from .test_cli_bad_files import write_ckpt

NFD_CITROEN = unicodedata.normalize("NFD", "Citroën")
assert NFD_CITROEN == "Citroe\u0308n"


def _folder(make: str, model: str | None = None) -> dict:
    """A class as the folder reader writes it: the ids are the names themselves."""
    if model is None:  # a one-level tree, or --level make
        return {"make": make, "model": make, "make_id": make, "model_id": make}
    return {"make": make, "model": model, "make_id": make, "model_id": model}


def _tree(root: Path, names: list[tuple[str, str]]) -> Path:
    for make, model in names:
        folder = root / make / model
        folder.mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", (24, 24), (30 * k, 90, 160)).save(folder / f"{k}.jpg")
    return root


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_names_from_before_normalisation_match_the_readers(tmp_path, caplog):
    """A checkpoint trained on NFD and space-padded folder names matches the classes the reader
    now reads from those very folders, with one warning naming a class."""
    root = _tree(tmp_path / "data", [(NFD_CITROEN, "C4 "), ("Kia ", "Rio")])
    data = load_index("folder", root, "train").classes
    assert [(c["make"], c["model"]) for c in data] == [("Citroën", "C4"), ("Kia", "Rio")]
    old = [
        {"make": NFD_CITROEN, "model": "C4 ", "make_id": NFD_CITROEN, "model_id": "C4 "},
        {"make": "Kia ", "model": "Rio", "make_id": "Kia ", "model_id": "Rio"},
    ]
    with caplog.at_level(logging.WARNING, logger="training.train"):
        assert classes_match(data, old, "--resume ckpt")
    (warning,) = _warnings(caplog)
    assert warning.startswith("--resume ckpt: 2 of the checkpoint's class names differ")
    assert "\n" not in warning and "Citroe\\u0308n" in warning  # which class, escaped


def test_one_level_names_and_compcars_names_match_once_normalised(caplog):
    assert classes_match([_folder("Kia")], [_folder(" Kia ")], "ckpt")
    assert classes_match([_folder("Citroën")], [_folder(NFD_CITROEN)], "ckpt")
    # CompCars-style classes: names normalised on both sides, numeric ids as they are
    data = [{"make": "Citroën", "model": "C4", "make_id": 3, "model_id": 12}]
    old = [{"make": NFD_CITROEN, "model": " C4", "make_id": 3, "model_id": 12}]
    assert classes_match(data, old, "ckpt")


def test_equal_classes_match_without_a_warning(caplog):
    data = [_folder("Audi", "A4"), _folder("Kia", "Rio")]
    with caplog.at_level(logging.WARNING, logger="training.train"):
        assert classes_match(data, [dict(c) for c in data], "ckpt")
    assert not _warnings(caplog)


@pytest.mark.parametrize(
    "old",
    [
        [_folder("Audi", "A4"), _folder("Kia", "Ceed")],  # another model
        [_folder("Audi", "A4"), _folder("kia", "Rio")],  # case is no normalisation
        [_folder("Audi", "A4")],  # a class fewer
        [_folder("Kia", "Rio"), _folder("Audi", "A4")],  # another order: other output rows
        [_folder("Audi", "A4"), {**_folder("Kia", "Rio"), "make_id": "Kia2"}],  # another id
        [_folder("Audi", "A4"), {**_folder("Kia", "Rio"), "make_id": " Kia2"}],
        [_folder("Audi", "A4"), {**_folder("Kia", "Rio"), "web_model_id": 7}],  # another field
    ],
)
def test_a_real_difference_still_fails(old, caplog):
    data = [_folder("Audi", "A4"), _folder("Kia", "Rio")]
    with caplog.at_level(logging.WARNING, logger="training.train"):
        assert not classes_match(data, old, "ckpt")
    assert not _warnings(caplog)


def test_numeric_ids_must_match_exactly():
    """Only names are normalised: a CompCars class with another make_id is another class even
    when the names agree."""
    data = [{"make": "Kia", "model": "Rio", "make_id": 3, "model_id": 12}]
    assert not classes_match(data, [{**data[0], "make_id": 4}], "ckpt")
    assert not classes_match(data, [{**data[0], "model_id": "12"}], "ckpt")
    assert not classes_match(data, [{**data[0], "make": " Kia", "model_id": 13}], "ckpt")


def _folder_splits(root: Path) -> Path:
    """train/ and test/ with the classes (Citroën C4) and (Kia Rio), names as the reader keeps
    them (NFC, no padding)."""
    for split, n in (("train", 4), ("test", 2)):
        for make, model in (("Citroën", "C4"), ("Kia", "Rio")):
            folder = root / split / make / model
            folder.mkdir(parents=True)
            for k in range(n):
                Image.new("RGB", (40, 40), (60 * k, 90, 160)).save(folder / f"{k}.jpg")
    return root


# the same two classes as a checkpoint from before the normalisation has them
OLD_FOLDER_CLASSES = [
    {"make": NFD_CITROEN, "model": "C4 ", "make_id": NFD_CITROEN, "model_id": "C4 "},
    {"make": " Kia", "model": "Rio", "make_id": " Kia", "model_id": "Rio"},
]


def test_resume_continues_a_checkpoint_with_names_from_before_normalisation(tmp_path, caplog):
    data, out = _folder_splits(tmp_path / "data"), tmp_path / "out"
    argv = [
        "train", "--dataset", "folder", "--data", str(data), "--out", str(out),
        "--arch", "resnet18", "--image-size", "32", "--batch-size", "4", "--workers", "0",
        "--pretrained", "none", "--device", "cpu",
    ]  # fmt: skip
    assert cli_main([*argv, "--epochs", "1"]) == 0
    ckpt = load_checkpoint(out)
    assert [c["make"] for c in ckpt["classes"]] == ["Citroën", "Kia"]
    save_checkpoint(out, {**ckpt, "classes": OLD_FOLDER_CLASSES})
    with caplog.at_level(logging.WARNING, logger="training.train"):
        assert cli_main([*argv, "--epochs", "2", "--resume", str(out)]) == 0
    assert any(f"--resume {out}: 2 of the checkpoint's class names" in w for w in _warnings(caplog))
    resumed = load_checkpoint(out)
    assert resumed["epoch"] == ckpt["epoch"] + 1
    assert resumed["classes"] == ckpt["classes"]  # the data's (normalised) names go on


def test_evaluate_accepts_a_checkpoint_with_names_from_before_normalisation(tmp_path, caplog):
    data = _folder_splits(tmp_path / "data")
    ckpt = write_ckpt(tmp_path / "ckpt", OLD_FOLDER_CLASSES)
    argv = ["evaluate", "--checkpoint", str(ckpt), "--dataset", "folder", "--data", str(data),
            "--workers", "0", "--device", "cpu"]  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="training.train"):
        assert cli_main(argv) == 0
    assert any(f"{ckpt}: 2 of the checkpoint's class names" in w for w in _warnings(caplog))
    # a real difference is still refused
    write_ckpt(tmp_path / "other", [OLD_FOLDER_CLASSES[0], _folder("Kia", "Ceed")])
    assert cli_main([*argv[:2], str(tmp_path / "other"), *argv[3:]]) == 2


def test_a_class_of_newly_read_suffixes_is_named_in_the_refusal(tmp_path, capsys):
    """A class folder holding only .gif/.tif/.jfif files was no class before those suffixes were
    read: a checkpoint trained then has a class fewer than its own data set now, and evaluate
    and --resume say which class and why, in their one line."""
    data = _folder_splits(tmp_path / "data")
    ckpt = write_ckpt(tmp_path / "ckpt", [_folder("Citroën", "C4"), _folder("Kia", "Rio")])
    for split, suffix, fmt in (("train", ".gif", "GIF"), ("test", ".tif", "TIFF")):
        folder = data / split / "Opel" / "Corsa"
        folder.mkdir(parents=True)
        for k in range(2):
            Image.new("RGB", (40, 40), (9, 9, 9 * k)).save(folder / f"{k}{suffix}", fmt)
    note = (
        "class Opel/Corsa holds only .gif/.tif files, read since 2026-12-07: move them out or "
        "retrain"
    )
    evaluate = ["evaluate", "--checkpoint", str(ckpt), "--dataset", "folder", "--data", str(data),
                "--workers", "0", "--device", "cpu"]  # fmt: skip
    assert cli_main(evaluate) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {data}: its 3 classes differ from the checkpoint's 2 (")
    assert note in line
    resume = ["train", "--dataset", "folder", "--data", str(data), "--out", str(tmp_path / "out"),
              "--arch", "resnet18", "--image-size", "32", "--batch-size", "4", "--workers", "0",
              "--pretrained", "none", "--device", "cpu", "--resume", str(ckpt)]  # fmt: skip
    assert cli_main(resume) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"error: --resume {ckpt}: checkpoint is resnet18 with 2 classes")
    assert note in line

    # a new class of the suffixes read all along is a plain difference, without the note
    Image.new("RGB", (40, 40)).save(data / "train" / "Opel" / "Corsa" / "2.jpg")
    assert cli_main(evaluate) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "3 classes in the data, 2 in the checkpoint" in line and "read since" not in line
