"""The CompCars web-nature reader on a generated archive carrying every quirk of the real one."""

from __future__ import annotations

import logging
import shutil
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from training.datasets import DatasetError, load_index
from training.datasets.compcars import make_labels, read_bbox, read_names
from training.datasets.compcars_sv import read_sv_names
from training.datasets.folder import normal_class_name
from training.datasets.image_dataset import bbox_crop_box
from training.sample import MISSING_PER_SPLIT, TRAIN_FRACTION, plan_classes

from .conftest import NUM_CLASSES, PER_CLASS


def test_only_split_models_become_classes_in_id_order(sample_root):
    idx = load_index("compcars", sample_root, "train")
    planned = plan_classes(NUM_CLASSES)
    in_split = sorted((c.make_id, c.model_id) for c in planned if c.in_split)
    unlisted = [(c.make_id, c.model_id) for c in planned if not c.in_split]
    keys = [(c["make_id"], c["model_id"]) for c in idx.classes]
    assert keys == in_split
    assert unlisted and not set(unlisted) & set(keys)
    assert (sample_root / "data/image" / f"{unlisted[0][0]}/{unlisted[0][1]}").is_dir()


def test_counts_and_missing_are_skipped(sample_root):
    n_train = round(PER_CLASS * TRAIN_FRACTION)
    train = load_index("compcars", sample_root, "train")
    test = load_index("compcars", sample_root, "test")
    assert len(train.samples) == NUM_CLASSES * n_train
    assert len(test.samples) == NUM_CLASSES * (PER_CLASS - n_train)
    assert train.skipped_missing == test.skipped_missing == MISSING_PER_SPLIT
    assert all(s.path.is_file() for s in train.samples + test.samples)
    assert set(Counter(s.target for s in train.samples).values()) == {n_train}
    assert train.classes == test.classes


def test_names_fallback_and_duplicate_make(sample_root):
    idx = load_index("compcars", sample_root, "train")
    makes, models = read_names(sample_root / "data/misc/make_model_name.mat")
    empty = [c for c in idx.classes if models[c["model_id"]] == ""]
    assert len(empty) == 1 and empty[0]["model"] == f"model {empty[0]['model_id']}"
    raw = Counter(makes[c["make_id"]] for c in idx.classes)
    dup_name = next(n for n in raw if sum(1 for v in makes.values() if v == n) > 1)
    dup_ids = {c["make_id"] for c in idx.classes if makes[c["make_id"]] == dup_name}
    assert len(dup_ids) == 2
    labels = {c["make_id"]: c["make"] for c in idx.classes}
    # one brand name on both ids, so results and trend counts read it as one brand
    assert {labels[i] for i in dup_ids} == {dup_name}
    for c in idx.classes:
        assert c["make"] == makes[c["make_id"]]
        assert c["model"] == (models[c["model_id"]] or f"model {c['model_id']}")
    # the classes of the two ids stay distinct classes
    dup_classes = [(c["make_id"], c["model_id"]) for c in idx.classes if c["make_id"] in dup_ids]
    assert len(set(dup_classes)) == len(dup_classes) and {mk for mk, _ in dup_classes} == dup_ids


def _cells(values: list) -> np.ndarray:
    cell = np.empty((len(values), 1), dtype=object)
    for i, v in enumerate(values):
        cell[i, 0] = v
    return cell


def test_names_stored_as_numbers_read_as_written(tmp_path):
    """A name MATLAB stored as a number is a double in the .mat: 3 must read "3", not "3.0".
    Names stored as text (the real make_model_name.mat: char arrays in (N,1) cells, an empty
    cell for a missing name) read exactly as before."""
    mat = tmp_path / "make_model_name.mat"
    makes = ["Audi", np.zeros((0, 0)), np.array([[3.0]]), np.array([[7]], dtype=np.int32)]
    models = ["A4L", " 3 Series ", np.array([[307.0]]), np.array([[2.5]]), np.array([[np.nan]]),
              "", np.array([[1e6]])]  # fmt: skip
    scipy.io.savemat(mat, {"make_names": _cells(makes), "model_names": _cells(models)})
    raw = scipy.io.loadmat(mat)
    assert raw["model_names"][0, 0].dtype.kind == "U"  # text, as in the real file
    assert raw["model_names"][2, 0].dtype == np.float64  # the number really is a double
    got_makes, got_models = read_names(mat)
    assert got_makes == {1: "Audi", 2: "", 3: "3", 4: "7"}
    assert got_models == {1: "A4L", 2: "3 Series", 3: "307", 4: "2.5", 5: "", 6: "", 7: "1000000"}


def test_sv_names_stored_as_numbers_read_as_written(tmp_path):
    mat = tmp_path / "sv_make_model_name.mat"
    cell = np.empty((2, 2), dtype=object)
    cell[0] = ["Peugeot", np.array([[307.0]])]
    cell[1] = [np.array([[3.0]]), "Q5"]
    scipy.io.savemat(mat, {"sv_make_model_name": cell})
    assert read_sv_names(mat) == {1: ("Peugeot", "307", None), 2: ("3", "Q5", None)}


def test_mat_names_are_nfc_normalised_like_folder_names(tmp_path):
    """A decomposed (NFD) "Škoda" in one row and a composed one in another are one brand, as
    the folder reader reads folder names (NFC, stripped), in both names files."""
    nfc = "Škoda"
    nfd = unicodedata.normalize("NFD", nfc)
    assert nfd != nfc
    mat = tmp_path / "make_model_name.mat"
    scipy.io.savemat(
        mat, {"make_names": _cells([nfc, f" {nfd} "]), "model_names": _cells(["C-Élysée"])}
    )
    makes, models = read_names(mat)
    assert makes == {1: nfc, 2: nfc}
    assert models == {1: unicodedata.normalize("NFC", "C-Élysée")}
    assert normal_class_name(nfd) == makes[2]
    sv = tmp_path / "sv_make_model_name.mat"
    cell = np.empty((1, 2), dtype=object)
    cell[0] = [nfd, unicodedata.normalize("NFD", "Octavia Ö")]
    scipy.io.savemat(sv, {"sv_make_model_name": cell})
    assert read_sv_names(sv) == {1: (nfc, unicodedata.normalize("NFC", "Octavia Ö"), None)}


def test_make_labels_pure():
    assert make_labels({1: "Audi", 2: "", 3: "BWM", 4: "Audi"}) == {
        1: "Audi",
        2: "make 2",
        3: "BWM",
        4: "Audi",
    }


def test_unknown_year_images_are_read(sample_root):
    idx = load_index("compcars", sample_root, "train")
    unknown = [s for s in idx.samples if s.path.parent.name == "unknown"]
    assert unknown and all(s.path.is_file() for s in unknown)


def test_make_level_keeps_duplicate_names_apart(sample_root):
    models_idx = load_index("compcars", sample_root, "train")
    makes_idx = load_index("compcars", sample_root, "train", level="make")
    make_ids = sorted({c["make_id"] for c in models_idx.classes})
    assert [c["make_id"] for c in makes_idx.classes] == make_ids
    # one class per make id; only the archive's duplicated name appears twice
    names = Counter(c["make"] for c in makes_idx.classes)
    assert sorted(names.values()) == [1] * (len(make_ids) - 2) + [2]
    for a, b in zip(models_idx.samples, makes_idx.samples, strict=True):
        assert makes_idx.classes[b.target]["make_id"] == models_idx.classes[a.target]["make_id"]


def test_bbox_parsing_is_one_based_inclusive(tmp_path):
    label = tmp_path / "a.txt"
    label.write_text("3\n1\n11 21 50 60\n")
    assert read_bbox(label) == (10, 20, 50, 60)
    label.write_text("garbage")
    assert read_bbox(label) is None


@pytest.mark.parametrize(
    "text",
    [
        "\n3\n1\n11 21 50 60\n",  # a leading blank line
        "3\n1\n\n11 21 50 60\n",  # a blank line before the box
        "3\n\n1\n  \n11 21 50 60",  # blank and space-only lines, no final newline
        "\r\n3\r\n1\r\n\r\n11 21 50 60\r\n",  # CRLF, blank lines
        "3\r1\r11 21 50 60\r",  # old-Mac CR
        "\ufeff3\n1\n11 21 50 60\n",  # a UTF-8 BOM
        "\ufeff\n3\n1\n11 21 50 60\n",  # a BOM on a line of its own
        "  3  \n 1\n\t11 21 50 60 \n",  # padded lines
    ],
)
def test_bbox_lines_are_counted_without_blank_ones(tmp_path, text):
    """Line 3 by position lost the box of a file with a blank line (the image then trained
    whole under --crop bbox); the box is the third non-blank line."""
    label = tmp_path / "a.txt"
    label.write_bytes(text.encode("utf-8"))
    assert read_bbox(label) == (10, 20, 50, 60)


def test_bbox_of_a_file_with_too_few_lines_is_none(tmp_path):
    label = tmp_path / "a.txt"
    label.write_text("3\n\n\n1\n\n")
    assert read_bbox(label) is None


def test_bbox_crop_follows_label_and_is_clamped(sample_root):
    idx = load_index("compcars", sample_root, "train", crop="bbox")
    assert all(s.bbox is not None for s in idx.samples)
    s = idx.samples[0]
    with Image.open(s.path) as img:
        w, h = img.size
        x1, y1, x2, y2 = s.bbox
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
        box = bbox_crop_box(s.bbox, img.size, margin=0.1)  # what load_image cuts
        cropped = img if box is None else img.crop(box)
        assert x2 - x1 <= cropped.size[0] <= min(w, (x2 - x1) * 1.2 + 2)
        # a margin beyond the edges is clamped: the whole image, which needs no crop
        assert bbox_crop_box((0, 0, w, h), img.size, margin=0.5) in (None, (0, 0, w, h))


def test_images_without_a_usable_box_are_counted_in_a_warning(sample_root, tmp_path, caplog):
    root = tmp_path / "copy"
    shutil.copytree(sample_root, root)
    images = [s.path for s in load_index("compcars", root, "train").samples[:2]]
    labels = [Path(str(p).replace("/image/", "/label/")).with_suffix(".txt") for p in images]
    labels[0].unlink()
    labels[1].write_text("garbled\n")
    with caplog.at_level(logging.WARNING, logger="training.datasets.compcars"):
        idx = load_index("compcars", root, "train", crop="bbox")
    assert {s.path for s in idx.samples if s.bbox is None} == set(images)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert f"2 of {len(idx.samples)} images have no usable box" in warnings[0]
    caplog.clear()
    load_index("compcars", sample_root, "train", crop="bbox")
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_bbox_indexing_opens_each_image_once(sample_root, tmp_path, monkeypatch, caplog):
    """With --crop bbox the box check uses the size the corrupt check read: every listed image
    is opened once while indexing (a corrupt one too), with the same skips and warnings."""
    root = tmp_path / "copy"
    shutil.copytree(sample_root, root)
    listed = [s.path for s in load_index("compcars", root, "train").samples]
    corrupt, outside = listed[0], listed[1]
    corrupt.write_bytes(b"not a jpeg at all")
    label = Path(str(outside).replace("/image/", "/label/")).with_suffix(".txt")
    label.write_text("1\n1\n5001 5001 5100 5100\n")  # a box wholly outside the image
    opened: Counter = Counter()
    real_open = Image.open

    def counting_open(fp, *args, **kwargs):
        opened[fp] += 1
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    with caplog.at_level(logging.WARNING, logger="training.datasets"):
        idx = load_index("compcars", root, "train", crop="bbox")
    assert opened == Counter(listed)  # each listed image once, nothing else
    assert idx.skipped_corrupt == 1 and corrupt not in {s.path for s in idx.samples}
    assert [s.path for s in idx.samples if s.bbox is None] == [outside]
    assert len(idx.samples) == len(listed) - 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(corrupt) in w and "corrupt" in w for w in warnings), warnings
    boxes = [w for w in warnings if "no usable box" in w]
    assert len(boxes) == 1 and f"1 of {len(idx.samples)} images" in boxes[0]
    assert str(outside) in boxes[0]


def test_full_crop_has_no_boxes(sample_root):
    assert all(s.bbox is None for s in load_index("compcars", sample_root, "test").samples)


def test_corrupt_images_skipped_or_strict(sample_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(sample_root, root)
    victim = load_index("compcars", root, "train").samples[3].path
    victim.write_bytes(b"not a jpeg at all")
    idx = load_index("compcars", root, "train")
    assert idx.skipped_corrupt == 1 and victim not in {s.path for s in idx.samples}
    with pytest.raises(DatasetError, match=str(victim)):
        load_index("compcars", root, "train", strict=True)


def test_data_dir_given_as_data_folder(sample_root):
    a = load_index("compcars", sample_root, "test")
    b = load_index("compcars", sample_root / "data", "test")
    assert [s.path for s in a.samples] == [s.path for s in b.samples]


@pytest.mark.parametrize("sub", ["nope", "empty"])
def test_bad_data_dir_names_the_path(tmp_path, sub):
    path = tmp_path / sub
    if sub == "empty":
        path.mkdir()
    with pytest.raises(DatasetError, match=str(path)):
        load_index("compcars", path, "train")
