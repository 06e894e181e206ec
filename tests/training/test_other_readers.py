"""The surveillance (sv_data) reader and the class-per-folder reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from training.datasets import DatasetError, load_index


def _jpg(path: Path, colour=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), colour).save(path)


@pytest.fixture
def sv_root(tmp_path) -> Path:
    root = tmp_path / "sv_data"
    rows = [("Audi", "A4L", "23"), ("BMW", "", "77"), ("Audi", "Q5", "31")]
    cell = np.empty((len(rows), 3), dtype=object)
    for i, row in enumerate(rows):
        for j, v in enumerate(row):
            cell[i, j] = v
    root.mkdir()
    scipy.io.savemat(root / "sv_make_model_name.mat", {"sv_make_model_name": cell})
    train, test = [], []
    for sv_id in (1, 2, 3):
        for k in range(3):
            rel = f"{sv_id}/{k:04d}.jpg"
            _jpg(root / "image" / rel)
            (train if k < 2 else test).append(rel)
    train.append("3/missing.jpg")
    (root / "train_surveillance.txt").write_text("\n".join(train) + "\n")
    (root / "test_surveillance.txt").write_text("\n".join(test) + "\n")
    return root


def test_sv_reader_classes_names_and_missing(sv_root):
    idx = load_index("compcars-sv", sv_root, "train")
    assert [(c["make"], c["model"], c["model_id"]) for c in idx.classes] == [
        ("Audi", "A4L", 1),
        ("BMW", "model 2", 2),
        ("Audi", "Q5", 3),
    ]
    assert [c["web_model_id"] for c in idx.classes] == [23, 77, 31]
    assert idx.classes[0]["make_id"] == idx.classes[2]["make_id"] != idx.classes[1]["make_id"]
    assert len(idx.samples) == 6 and idx.skipped_missing == 1
    assert len(load_index("compcars-sv", sv_root, "test").samples) == 3


def test_sv_reader_make_level(sv_root):
    idx = load_index("compcars-sv", sv_root, "train", level="make")
    assert [c["make"] for c in idx.classes] == ["Audi", "BMW"]
    assert sorted({s.target for s in idx.samples}) == [0, 1]


def test_sv_reader_rejects_other_layout(tmp_path):
    with pytest.raises(DatasetError, match="sv_data"):
        load_index("compcars-sv", tmp_path, "train")


def test_folder_two_level_with_split_dirs(tmp_path):
    for split, n in (("train", 3), ("val", 1)):
        for make, model in (("Audi", "A4"), ("Audi", "Q5"), ("Kia", "K5")):
            for k in range(n):
                _jpg(tmp_path / split / make / model / f"{k}.jpg")
    train = load_index("folder", tmp_path, "train")
    test = load_index("folder", tmp_path, "test")
    assert [(c["make"], c["model"]) for c in train.classes] == [
        ("Audi", "A4"),
        ("Audi", "Q5"),
        ("Kia", "K5"),
    ]
    assert len(train.samples) == 9 and len(test.samples) == 3
    makes = load_index("folder", tmp_path, "train", level="make")
    assert [c["make"] for c in makes.classes] == ["Audi", "Kia"]


def test_folder_one_level_hash_split_is_disjoint_and_stable(tmp_path):
    for cls in ("sedan_a", "suv_b"):
        for k in range(40):
            _jpg(tmp_path / cls / f"{k}.jpg")
    (tmp_path / "sedan_a" / "notes.txt").write_text("not an image")
    train = load_index("folder", tmp_path, "train")
    test = load_index("folder", tmp_path, "test")
    assert [c["make"] for c in train.classes] == ["sedan_a", "suv_b"]
    tr, te = {s.path for s in train.samples}, {s.path for s in test.samples}
    assert not tr & te and len(tr | te) == 80 and 0 < len(te) < 40
    assert te == {s.path for s in load_index("folder", tmp_path, "test").samples}


def test_folder_without_images_is_an_error(tmp_path):
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DatasetError, match=str(tmp_path)):
        load_index("folder", tmp_path, "train")


def test_sv_reader_web_model_ids_stored_as_numbers(tmp_path):
    """MATLAB cells store numbers as double: a web model id 10 is 10.0 in the .mat."""
    root = tmp_path / "sv_data"
    webs = [np.array([[10.0]]), np.array([[77]], dtype=np.uint16), np.array([[31]], dtype=np.int64),
            "42", np.array([[2.5]]), np.array([[np.nan]]), np.zeros((0, 0))]  # fmt: skip
    cell = np.empty((len(webs), 3), dtype=object)
    for i, web in enumerate(webs):
        cell[i] = ["Audi", f"M{i}", web]
    root.mkdir()
    scipy.io.savemat(root / "sv_make_model_name.mat", {"sv_make_model_name": cell})
    lines = [f"{i + 1}/0.jpg" for i in range(len(webs))]
    for rel in lines:
        _jpg(root / "image" / rel)
    (root / "train_surveillance.txt").write_text("\n".join(lines) + "\n")
    (root / "test_surveillance.txt").write_text("\n".join(lines) + "\n")
    raw = scipy.io.loadmat(root / "sv_make_model_name.mat")["sv_make_model_name"]
    assert raw[0, 2].dtype == np.float64  # the file really stores a double
    idx = load_index("compcars-sv", root, "train")
    assert [c["web_model_id"] for c in idx.classes] == [10, 77, 31, 42, None, None, None]


@pytest.mark.parametrize("held_out", ["test", "val", "valid", "validation", "Validation"])
def test_folder_train_and_any_held_out_name_are_the_splits(tmp_path, held_out):
    for split, n in (("train", 2), (held_out, 1)):
        for cls in ("sedan_a", "suv_b"):
            for k in range(n):
                _jpg(tmp_path / split / cls / f"{k}.jpg")
    train = load_index("folder", tmp_path, "train")
    test = load_index("folder", tmp_path, "test")
    assert [c["make"] for c in train.classes] == ["sedan_a", "suv_b"]
    assert len(train.samples) == 4 and len(test.samples) == 2
    assert all(s.path.parts[-3] == "train" for s in train.samples)
    assert all(s.path.parts[-3] == held_out for s in test.samples)


@pytest.mark.parametrize("dirs", [("train",), ("validation",), ("train", "holdout"), ("val",)])
def test_folder_split_folders_without_a_pair_are_an_error(tmp_path, dirs):
    for d in dirs:
        _jpg(tmp_path / d / "sedan_a" / "0.jpg")
    with pytest.raises(DatasetError, match="split folder") as err:
        load_index("folder", tmp_path, "train")
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)


def test_sv_make_order_of_unnamed_makes_is_the_same_in_every_process(sv_root):
    """sv_model_ids past the .mat's rows are makes 'make N' without a row: their order used to
    follow a string set's iteration, which PYTHONHASHSEED changes from process to process, so
    torchrun's ranks, a --resume and an evaluate each got another class order."""
    import os
    import subprocess
    import sys

    train = sv_root / "train_surveillance.txt"
    lines = train.read_text().split()
    for sv_id in (7, 9, 12, 15):
        _jpg(sv_root / "image" / str(sv_id) / "0000.jpg")
        lines.append(f"{sv_id}/0000.jpg")
    train.write_text("\n".join(lines) + "\n")
    code = (
        "import sys; from training.datasets import load_index; "
        "idx = load_index('compcars-sv', sys.argv[1], 'train', 'make'); "
        "print([c['make'] for c in idx.classes])"
    )
    orders = set()
    for seed in ("1", "2", "3", "4", "5"):
        proc = subprocess.run(
            [sys.executable, "-c", code, str(sv_root)],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        orders.add(proc.stdout.strip())
    assert orders == {"['make 7', 'make 9', 'make 12', 'make 15', 'Audi', 'BMW']"}
