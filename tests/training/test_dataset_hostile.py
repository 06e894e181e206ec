"""Hostile data files given to the dataset readers: damaged names .mat files (including ones that
crash scipy's reader), oversized images, tampered split files and boxes that are not numbers.
Each is refused in one line naming the file, or skipped with a warning, never a traceback."""

from __future__ import annotations

import io
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from training.datasets import DatasetError, load_index, matfile
from training.datasets.compcars import read_bbox, read_names
from training.datasets.compcars_sv import read_sv_names
from training.sample import cell_array, make_sample

from .test_cli_errors import assert_one_line_error, run_cli
from .test_other_readers import sv_root  # noqa: F401 (fixture)
from .test_run_guards import tiny_argv

SPLIT = "data/train_test_split/classification"
MAT = "data/misc/make_model_name.mat"


@pytest.fixture
def archive(tmp_path) -> Path:
    root = tmp_path / "sample"
    make_sample(root, 3, 4, seed=0)
    return root


def names_mat_bytes() -> bytes:
    buf = io.BytesIO()
    scipy.io.savemat(
        buf, {"make_names": cell_array(["Audi", "BMW"]), "model_names": cell_array(["A4", "X5"])}
    )
    return buf.getvalue()


def flipped(data: bytes, pos: int, value: int) -> bytes:
    out = bytearray(data)
    out[pos] = value
    return bytes(out)


# one byte changed in a small names file; with scipy 1.17 these make loadmat raise TypeError,
# UnboundLocalError and MemoryError, and (the last) segfault
@pytest.mark.parametrize(("pos", "value"), [(128, 0), (144, 0), (167, 127), (220, 0)])
def test_damaged_names_mat_is_one_data_error_naming_it(tmp_path, pos, value):
    mat = tmp_path / "make_model_name.mat"
    mat.write_bytes(flipped(names_mat_bytes(), pos, value))
    with pytest.raises(DatasetError, match=str(mat)) as info:
        read_names(mat)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("exc", [MemoryError, UnboundLocalError, TypeError, KeyError])
def test_any_exception_from_loadmat_becomes_a_data_error(tmp_path, monkeypatch, exc):
    mat = tmp_path / "x.mat"
    mat.write_bytes(names_mat_bytes())

    def broken(*_args, **_kwargs):
        raise exc("boom")

    monkeypatch.setattr(scipy.io, "loadmat", broken)
    with pytest.raises(DatasetError, match=f"unreadable {mat}: {exc.__name__}"):
        matfile.parse_mat(mat, "training.datasets.compcars:names_from_mat")


def test_reader_crash_is_one_line_with_the_signal(tmp_path, monkeypatch):
    mat = tmp_path / "x.mat"
    mat.write_bytes(names_mat_bytes())
    monkeypatch.setattr(matfile, "CHILD_CODE", "import os, signal; os.kill(os.getpid(), 11)")
    with pytest.raises(DatasetError, match=r"could not be read \(the reader crashed: signal 11"):
        read_names(mat)


def test_a_crashing_names_mat_is_one_line_from_the_cli(archive, tmp_path):
    mat = archive / MAT
    mat.write_bytes(flipped(names_mat_bytes(), 220, 0))
    proc = run_cli(*tiny_argv(archive, tmp_path / "out"))
    assert_one_line_error(proc, str(mat))
    assert "the reader crashed: signal" in proc.stderr or "unreadable" in proc.stderr


def test_names_are_read_by_one_child_per_file(archive, monkeypatch):
    calls = []
    real = matfile.run_child
    monkeypatch.setattr(matfile, "run_child", lambda *a: calls.append(a) or real(*a))
    train = load_index("compcars", archive, "train")
    test = load_index("compcars", archive, "test")
    assert len(calls) == 1 and train.classes == test.classes
    assert {c["make"] for c in train.classes} <= {"Audi", "BMW", "Toyota"}


def _struct(names: list[str]) -> np.ndarray:
    st = np.empty((len(names), 1), dtype=[("name", "O"), ("id", "O")])
    for i, n in enumerate(names):
        st[i, 0] = (n, i)
    return st


@pytest.mark.parametrize(
    ("makes", "needle"),
    [
        (_struct(["Audi", "BMW"]), "make_names is a struct"),
        (cell_array([cell_array(["Audi"]), "BMW"]), "element 1 is a nested cell array"),
        (np.array([[1.0, 2.0]]), "make_names is an array of float64"),
        (np.zeros((0, 0), dtype=object), "make_names is empty"),
    ],
)
def test_names_that_are_not_strings_are_refused(tmp_path, makes, needle):
    mat = tmp_path / "make_model_name.mat"
    scipy.io.savemat(mat, {"make_names": makes, "model_names": cell_array(["A4"])})
    with pytest.raises(DatasetError, match=needle) as info:
        read_names(mat)
    assert str(mat) in str(info.value)


def test_sv_names_that_are_not_strings_are_refused(tmp_path):
    mat = tmp_path / "sv_make_model_name.mat"
    scipy.io.savemat(mat, {"sv_make_model_name": _struct(["Audi", "BMW"])})
    with pytest.raises(DatasetError, match="is a struct"):
        read_sv_names(mat)
    cell = np.empty((1, 2), dtype=object)
    cell[0, 0], cell[0, 1] = "Audi", _struct(["A4"])
    scipy.io.savemat(mat, {"sv_make_model_name": cell})
    with pytest.raises(DatasetError, match="row 1, column 2 is a struct"):
        read_sv_names(mat)
    scipy.io.savemat(mat, {"sv_make_model_name": np.ones((2, 3))})
    with pytest.raises(DatasetError, match="is an array of float64"):
        read_sv_names(mat)


def test_damaged_sv_names_mat_is_one_data_error(sv_root):  # noqa: F811
    mat = sv_root / "sv_make_model_name.mat"
    data = mat.read_bytes()
    mat.write_bytes(data[:128] + b"\x00" + data[129:])
    with pytest.raises(DatasetError, match=str(mat)):
        load_index("compcars-sv", sv_root, "train")


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` (Pillow reads the size from the header alone)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


# 20000 x 20000 is over twice Pillow's limit (it raises), 10000 x 10000 over it (it warns)
@pytest.mark.parametrize("side", [20000, 10000])
def test_image_over_the_pixel_limit_is_skipped_or_strict(tmp_path, caplog, side):
    for k in range(3):
        (tmp_path / "cls").mkdir(exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "cls" / f"{k}.png")
    huge = tmp_path / "cls" / "huge.png"
    huge.write_bytes(png_header(side, side))
    with caplog.at_level(logging.WARNING, logger="training.datasets.base"):
        idx = [load_index("folder", tmp_path, s) for s in ("train", "test")]
    assert sum(i.skipped_corrupt for i in idx) == 1
    assert huge not in {s.path for i in idx for s in i.samples}
    warned = [r.getMessage() for r in caplog.records]
    assert any(str(huge) in w and "over the pixel limit" in w for w in warned), warned
    split = next(s for s, i in zip(("train", "test"), idx, strict=True) if i.skipped_corrupt)
    with pytest.raises(DatasetError, match="pixel limit") as info:
        load_index("folder", tmp_path, split, strict=True)
    assert str(huge) in str(info.value)


def test_split_file_with_a_bom_is_read(archive, sv_root):  # noqa: F811
    plain = load_index("compcars", archive, "train")
    split = archive / SPLIT / "train.txt"
    split.write_bytes(b"\xef\xbb\xbf" + split.read_bytes())
    assert [s.path for s in load_index("compcars", archive, "train").samples] == [
        s.path for s in plain.samples
    ]
    sv_plain = load_index("compcars-sv", sv_root, "train")
    sv_split = sv_root / "train_surveillance.txt"
    sv_split.write_bytes(b"\xef\xbb\xbf" + sv_split.read_bytes())
    assert len(load_index("compcars-sv", sv_root, "train").samples) == len(sv_plain.samples)


@pytest.mark.parametrize(
    ("line", "problem"),
    [("2/10/2010/../../../../../../etc/passwd", "'..'"), ("/etc/passwd", "absolute")],
)
def test_split_line_escaping_the_archive_is_refused(archive, line, problem):
    split = archive / SPLIT / "test.txt"
    count = len(split.read_text().splitlines())
    split.write_text(split.read_text() + line + "\n")
    with pytest.raises(DatasetError, match="escapes the archive") as info:
        load_index("compcars", archive, "train")
    msg = str(info.value)
    assert f"{split}, line {count + 1}" in msg and problem in msg and line in msg


def test_sv_split_line_escaping_the_archive_is_refused(sv_root):  # noqa: F811
    split = sv_root / "train_surveillance.txt"
    split.write_text("1/../../../secret.jpg\n" + split.read_text())
    with pytest.raises(DatasetError, match=f"{split}, line 1: .* escapes the archive"):
        load_index("compcars-sv", sv_root, "test")


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_duplicates_and_leakage_are_warned_once(archive, caplog):
    train, test = archive / SPLIT / "train.txt", archive / SPLIT / "test.txt"
    train_lines, test_lines = train.read_text().split(), test.read_text().split()
    train.write_text("\n".join([*train_lines, train_lines[0], train_lines[0], train_lines[1]]))
    test.write_text("\n".join([*test_lines, train_lines[2]]))
    with caplog.at_level(logging.WARNING, logger="training.datasets"):
        load_index("compcars", archive, "train")
        load_index("compcars", archive, "test")
    warned = _warnings(caplog)
    dups = [w for w in warned if "duplicate line" in w]
    assert len(dups) == 1, warned
    assert str(train) in dups[0] and "3 duplicate line(s), 2 image(s)" in dups[0]
    assert train_lines[0] in dups[0]
    leaks = [w for w in warned if "listed in both" in w]
    assert len(leaks) == 1, warned
    assert "1 image(s)" in leaks[0] and train_lines[2] in leaks[0]


def test_class_with_test_images_but_no_training_images_is_warned(archive, caplog):
    train = archive / SPLIT / "train.txt"
    lines = train.read_text().split()
    victim = "/".join(lines[0].split("/")[:2]) + "/"
    train.write_text("\n".join(ln for ln in lines if not ln.startswith(victim)) + "\n")
    with caplog.at_level(logging.WARNING, logger="training.datasets"):
        idx = load_index("compcars", archive, "test")
    warned = [w for w in _warnings(caplog) if "no line in" in w]
    assert len(warned) == 1, _warnings(caplog)
    make_id, model_id = victim.strip("/").split("/")
    assert f"1 of {idx.num_classes} classes" in warned[0]
    assert f"({make_id}/{model_id})" in warned[0]


def test_sv_leakage_is_warned(sv_root, caplog):  # noqa: F811
    test = sv_root / "test_surveillance.txt"
    first_train = (sv_root / "train_surveillance.txt").read_text().split()[0]
    test.write_text(test.read_text() + first_train + "\n")
    with caplog.at_level(logging.WARNING, logger="training.datasets"):
        load_index("compcars-sv", sv_root, "test")
    assert [w for w in _warnings(caplog) if "listed in both" in w and first_train in w]


def test_clean_archive_warns_nothing_about_splits(archive, caplog):
    with caplog.at_level(logging.WARNING, logger="training.datasets"):
        load_index("compcars", archive, "train")
    assert not _warnings(caplog)


@pytest.mark.parametrize(
    "values", ["1 1 inf 50", "1 1 nan 50", "1 1 1e400 50", "1 -inf 5 50", "1 1 1e300 50"]
)
def test_box_values_that_are_not_finite_coordinates_are_malformed(tmp_path, values):
    label = tmp_path / "a.txt"
    label.write_text(f"3\n1\n{values}\n")
    assert read_bbox(label) is None


def test_bbox_crop_with_an_infinite_box_uses_the_image_whole(archive, caplog):
    first = load_index("compcars", archive, "train").samples[0].path
    label = Path(str(first).replace("/image/", "/label/")).with_suffix(".txt")
    label.write_text("1\n1\n1 1 inf 50\n")
    with caplog.at_level(logging.WARNING, logger="training.datasets.compcars"):
        idx = load_index("compcars", archive, "train", crop="bbox")
    assert [s.path for s in idx.samples if s.bbox is None] == [first]
    assert any("1 of" in w and "no usable box" in w for w in _warnings(caplog))
