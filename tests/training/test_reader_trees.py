"""Trees and archives a reader cannot use as given: each gets a correct reading, a warning naming
the folder or file, or a one-line refusal; never a silently dropped, merged or invented class."""

from __future__ import annotations

import logging
import os
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from training.datasets import DatasetError, load_index
from training.datasets.compcars import read_bbox
from training.sample import make_sample

from .test_other_readers import sv_root  # noqa: F401 (fixture)

SPLIT = "data/train_test_split/classification"
MAT = "data/misc/make_model_name.mat"


def _jpgs(folder: Path, n: int, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{start + k:03d}.jpg" for k in range(n)]
    for p in paths:
        Image.new("RGB", (40, 30), (200, 30, 30)).save(p)
    return paths


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def _both(root: Path, **kw):
    return load_index("folder", root, "train", **kw), load_index("folder", root, "test", **kw)


def _names(idx) -> list[tuple[str, str]]:
    return [(c["make"], c["model"]) for c in idx.classes]


def test_folder_images_below_a_model_folder_are_its_own(tmp_path, caplog):
    _jpgs(tmp_path / "Kia" / "Rio" / "2015", 6)  # year folders, as in CompCars
    _jpgs(tmp_path / "Kia" / "Rio" / "2016", 4)
    _jpgs(tmp_path / "Ford" / "Focus", 5)
    _jpgs(tmp_path / "Ford", 3)  # beside the model folders: which model?
    with caplog.at_level(logging.WARNING, logger="training.datasets"):
        train, test = _both(tmp_path)
    assert _names(train) == [("Ford", "Focus"), ("Kia", "Rio")]
    assert len(train.samples) + len(test.samples) == 15
    left_out = [w for w in _warnings(caplog) if "directly in this make folder" in w]
    assert len(left_out) == 1 and str(tmp_path / "Ford") in left_out[0]
    assert "3 image(s)" in left_out[0] and "Focus/" in left_out[0]


def test_folder_reached_twice_through_links_is_read_once(tmp_path, caplog):
    _jpgs(tmp_path / "BMW", 30)
    os.symlink(tmp_path / "BMW", tmp_path / "BMW_link")
    os.symlink(tmp_path / "BMW", tmp_path / "A_link")  # sorts before the real folder
    with caplog.at_level(logging.WARNING, logger="training.datasets"):
        train, test = _both(tmp_path)
    assert _names(train) == [("BMW", "BMW")]
    tr, te = {s.path for s in train.samples}, {s.path for s in test.samples}
    assert not tr & te and len(tr | te) == 30
    assert all(p.parent == tmp_path / "BMW" for p in tr | te)
    dupes = [w for w in _warnings(caplog) if "same files" in w]
    assert {w.split(":")[0] for w in dupes} == {str(tmp_path / n) for n in ("A_link", "BMW_link")}


def test_a_test_image_linked_from_train_is_read_once(tmp_path):
    (src,) = _jpgs(tmp_path / "train" / "Audi", 1)
    _jpgs(tmp_path / "test" / "Audi", 2, start=5)
    os.symlink(src, tmp_path / "test" / "Audi" / "copy.jpg")
    train, test = _both(tmp_path)
    assert [s.path for s in train.samples] == [src]
    assert src not in {s.path.resolve() for s in test.samples} and len(test.samples) == 2


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (unicodedata.normalize("NFC", "Škoda"), unicodedata.normalize("NFD", "Škoda")),
        ("Audi", "Audi "),
        ("Audi", "audi"),
    ],
)
def test_folder_names_that_read_alike_are_refused(tmp_path, a, b):
    _jpgs(tmp_path / a, 3)
    _jpgs(tmp_path / b, 3)
    with pytest.raises(DatasetError, match="read alike") as info:
        load_index("folder", tmp_path, "train")
    message = str(info.value)
    assert "\n" not in message and ascii(a) in message and ascii(b) in message


def test_folder_names_are_normalised_across_the_splits(tmp_path):
    _jpgs(tmp_path / "train" / unicodedata.normalize("NFD", "Škoda "), 2)
    _jpgs(tmp_path / "test" / unicodedata.normalize("NFC", "Škoda"), 1)
    train, test = _both(tmp_path)
    assert _names(train) == [("Škoda", "Škoda")] and unicodedata.is_normalized("NFC", "Škoda")
    assert len(train.samples) == 2 and len(test.samples) == 1


def test_folder_class_name_with_a_control_character_is_refused(tmp_path):
    _jpgs(tmp_path / "BMW\x1b[31m", 3)
    _jpgs(tmp_path / "Audi", 3)
    with pytest.raises(DatasetError, match=r"U\+001B") as info:
        load_index("folder", tmp_path, "train")
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)


@pytest.mark.parametrize(
    ("text", "bad"),
    [("BMW\x1b[31m", "\x1b"), ("A\nB", "\n"), ("A\tB\0", "\t"), ("A\u2028B", "\u2028"),
     ("A\u2029", "\u2029"), ("A\x7f", "\x7f"), ("Škoda 3 Series", None), ("", None)],
)  # fmt: skip
def test_one_control_character_rule_for_class_names_and_the_manifest(text, bad):
    """The readers' class names and the bundle manifest's names and files share one scan."""
    from engine_build.manifest import artifact_file_problem, label_text_problem
    from training.datasets.base import control_char_problem
    from training.text_rules import first_unprintable

    assert first_unprintable(text) == bad
    assert (control_char_problem(text) is None) == (bad is None)
    if bad is not None:
        code = f"U+{ord(bad):04X}"
        assert code in control_char_problem(text)
        assert code in label_text_problem(text) and code in artifact_file_problem(text)


def test_folder_skips_hidden_files_and_macosx_debris(tmp_path, caplog):
    _jpgs(tmp_path / "Audi", 10)
    sidecar = b"\0\x05\x16\x07\0\x02\0\0Mac OS X        " + b"\0" * 64
    (tmp_path / "Audi" / "._000.jpg").write_bytes(sidecar)
    (tmp_path / "__MACOSX" / "Audi").mkdir(parents=True)
    (tmp_path / "__MACOSX" / "Audi" / "._000.jpg").write_bytes(sidecar)
    with caplog.at_level(logging.WARNING, logger="training.datasets"):
        train, test = _both(tmp_path, strict=True)
    assert _names(train) == [("Audi", "Audi")]
    assert len(train.samples) + len(test.samples) == 10 and not _warnings(caplog)


def test_folder_class_with_no_usable_training_image_is_warned(tmp_path, caplog):
    _jpgs(tmp_path / "train" / "Audi", 3)
    _jpgs(tmp_path / "test" / "Audi", 1)
    (tmp_path / "train" / "Kia").mkdir(parents=True)
    (tmp_path / "train" / "Kia" / "0.jpg").write_bytes(b"not a jpeg")
    _jpgs(tmp_path / "test" / "Kia", 1)
    with caplog.at_level(logging.WARNING, logger="training.datasets"):
        train = load_index("folder", tmp_path, "train")
    assert _names(train) == [("Audi", "Audi"), ("Kia", "Kia")]  # indices stay put
    warned = [w for w in _warnings(caplog) if "no usable training image" in w]
    assert len(warned) == 1 and "1 of 2 classes" in warned[0] and "Kia" in warned[0]


@pytest.fixture
def archive(tmp_path) -> Path:
    root = tmp_path / "sample"
    make_sample(root, 3, 4, seed=0)
    return root


def test_compcars_class_whose_training_images_are_all_missing_is_warned(archive, caplog):
    train = load_index("compcars", archive, "train")
    victim = train.samples[0].target
    for s in train.samples:
        if s.target == victim:
            s.path.unlink()
    with caplog.at_level(logging.WARNING, logger="training.datasets"):
        again = load_index("compcars", archive, "train")
    assert again.num_classes == train.num_classes
    warned = [w for w in _warnings(caplog) if "no usable training image" in w]
    cls = train.classes[victim]
    assert len(warned) == 1 and f"({cls['make_id']}/{cls['model_id']})" in warned[0]
    assert str(archive / SPLIT / "train.txt") in warned[0]


@pytest.mark.parametrize(("var", "name"), [("make_names", "BMW\x1b[31m"), ("model_names", "A\nB")])
def test_compcars_name_with_a_control_character_is_refused(archive, var, name):
    mat = scipy.io.loadmat(archive / MAT)
    first = (archive / SPLIT / "train.txt").read_text().split()[0].split("/")
    row = int(first[0] if var == "make_names" else first[1])
    mat[var][row - 1, 0] = np.array([name])
    scipy.io.savemat(archive / MAT, {k: mat[k] for k in ("make_names", "model_names")})
    with pytest.raises(DatasetError, match=rf"{var} row {row} holds the control character"):
        load_index("compcars", archive, "train")


def test_sv_id_past_the_names_rows_is_warned(sv_root, caplog):  # noqa: F811
    _jpgs(sv_root / "image" / "9", 1)
    train = sv_root / "train_surveillance.txt"
    train.write_text(train.read_text() + "9/000.jpg\n")
    with caplog.at_level(logging.WARNING, logger="training.datasets"):
        load_index("compcars-sv", sv_root, "train")
    warned = [w for w in _warnings(caplog) if "past them" in w]
    assert len(warned) == 1 and "has 3 rows" in warned[0] and "sv_model_id(s) 9" in warned[0]


def test_compcars_ids_past_the_names_rows_are_warned(archive, caplog):
    """Split ids past make_model_name.mat's rows get no name: warned, naming them and how many,
    as the surveillance reader does, rather than shipping as 'make 9' / 'model 98' unremarked."""
    mat = scipy.io.loadmat(archive / MAT)
    n_makes, n_models = len(mat["make_names"]), len(mat["model_names"])
    train = archive / SPLIT / "train.txt"
    extra = [f"1/{n_models + 9}/2015/a.jpg", f"{n_makes + 7}/{n_models + 8}/2015/b.jpg"]
    for line in extra:
        (archive / "data/image" / line).parent.mkdir(parents=True)
        Image.new("RGB", (40, 30), (200, 30, 30)).save(archive / "data/image" / line)
    train.write_text(train.read_text() + "\n".join(extra) + "\n")
    with caplog.at_level(logging.WARNING, logger="training.datasets"):
        idx = load_index("compcars", archive, "train")
        load_index("compcars", archive, "test")  # the same warning, not again
    assert {f"make {n_makes + 7}", f"model {n_models + 9}"} <= {
        v for c in idx.classes for v in (c["make"], c["model"])
    }
    warned = [w for w in _warnings(caplog) if "past them" in w]
    assert len(warned) == 2, _warnings(caplog)
    makes_w, models_w = warned
    assert str(archive / MAT) in makes_w and f"has {n_makes} make_names rows" in makes_w
    assert f"make_id(s) {n_makes + 7} " in makes_w and "(1 in all)" in makes_w
    assert f"has {n_models} model_names rows" in models_w
    assert f"model_id(s) {n_models + 8}, {n_models + 9} " in models_w and "(2 in all)" in models_w


def test_make_level_classes_warn_only_about_make_ids(archive, caplog):
    """Model names are not read for make-level classes: a model id past the rows is no loss."""
    mat = scipy.io.loadmat(archive / MAT)
    line = f"1/{len(mat['model_names']) + 9}/2015/a.jpg"
    (archive / "data/image" / line).parent.mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 30, 30)).save(archive / "data/image" / line)
    train = archive / SPLIT / "train.txt"
    train.write_text(train.read_text() + line + "\n")
    with caplog.at_level(logging.WARNING, logger="training.datasets"):
        load_index("compcars", archive, "train", level="make")
    assert not [w for w in _warnings(caplog) if "past them" in w]


def test_compcars_archive_with_every_id_named_warns_nothing_about_names(archive, caplog):
    with caplog.at_level(logging.WARNING, logger="training.datasets"):
        load_index("compcars", archive, "train")
    assert not [w for w in _warnings(caplog) if "past them" in w]


@pytest.mark.parametrize("values", ["10 10 10 10", "10 10 12 40", "1 1 5 5"])
def test_a_box_too_small_for_a_car_is_no_box(tmp_path, values):
    label = tmp_path / "a.txt"
    label.write_text(f"3\n1\n{values}\n")
    assert read_bbox(label) is None


def test_a_box_outside_the_image_is_counted_and_the_image_used_whole(archive, caplog):
    first = load_index("compcars", archive, "train").samples[0].path
    label = Path(str(first).replace("/image/", "/label/")).with_suffix(".txt")
    label.write_text("1\n1\n5000 5000 6000 6000\n")
    with caplog.at_level(logging.WARNING, logger="training.datasets.compcars"):
        idx = load_index("compcars", archive, "train", crop="bbox")
    assert [s.path for s in idx.samples if s.bbox is None] == [first]
    assert any("1 of" in w and "no usable box" in w for w in _warnings(caplog))


def test_folder_reads_every_photo_format_and_counts_the_files_it_skips(tmp_path, caplog):
    """.jfif, .tif/.tiff, .gif and .webp photos are images (Pillow opens them; they used to
    vanish without a word), and files of any other suffix are counted, by suffix, in one
    warning for the tree."""
    formats = {".jpg": "JPEG", ".jfif": "JPEG", ".tif": "TIFF", ".tiff": "TIFF"}
    formats |= {".gif": "GIF", ".webp": "WEBP", ".png": "PNG", ".bmp": "BMP"}
    for split in ("train", "test"):
        for make in ("Audi", "BMW"):
            folder = tmp_path / split / make / "A"
            folder.mkdir(parents=True)
            for k, (suffix, fmt) in enumerate(formats.items()):
                Image.new("RGB", (40, 30), (20 * k, 30, 30)).save(folder / f"{k}{suffix}", fmt)
    (tmp_path / "train" / "Audi" / "A" / "notes.txt").write_text("taken in 2015")
    (tmp_path / "train" / "BMW" / "A" / "x.heic").write_bytes(b"\0\0\0\x18ftypheic")
    (tmp_path / "test" / "BMW" / "A" / "y.heic").write_bytes(b"\0\0\0\x18ftypheic")
    with caplog.at_level(logging.WARNING, logger="training.datasets"):
        train, test = _both(tmp_path, strict=True)
    assert len(train.samples) == len(test.samples) == 2 * len(formats)
    assert {s.path.suffix for s in train.samples} == set(formats)
    skipped = [w for w in _warnings(caplog) if "not read" in w and ".heic" in w]
    assert len(skipped) == 1, _warnings(caplog)
    assert f"{tmp_path}: 3 file(s) not read" in skipped[0] and "(.heic 2, .txt 1;" in skipped[0]


def test_the_skipped_files_warning_names_the_commonest_suffixes_only(tmp_path, caplog):
    """Files named scan.20190101, scan.20190102, ... have a suffix each: the one warning counts
    the ten commonest and sums up the rest, instead of a line listing thousands."""
    for make in ("Audi", "BMW"):
        _jpgs(tmp_path / make, 3)
        for k in range(300):
            (tmp_path / make / f"scan.{20190101 + k}").write_bytes(b"x")
    for name in ("a.txt", "b.txt", "c.txt"):
        (tmp_path / "Audi" / name).write_text("kept in 2019")
    with caplog.at_level(logging.WARNING, logger="training.datasets"):
        _both(tmp_path)
    (skipped,) = [w for w in _warnings(caplog) if "not read" in w]
    assert f"{tmp_path}: 603 file(s) not read" in skipped
    assert "(.txt 3, .20190101 2, .20190102 2, " in skipped  # the commonest first
    assert ".20190109 2 and 291 more suffixes (582 files); e.g. " in skipped
    assert len(skipped) < 600
