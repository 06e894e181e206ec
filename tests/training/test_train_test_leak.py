"""Byte-identical images in the training and the test split (--leak-check): found cheaply for
every layout, warned about and counted in metrics.json, or refused with --leak-check fail."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from PIL import Image

from training.__main__ import main as cli_main
from training.datasets import load_index
from training.sample import make_sample

from .test_run_guards import tiny_argv


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_only_byte_identical_files_across_the_splits_are_found(tmp_path):
    from training.datasets.leakage import find_train_test_duplicates

    head = b"H" * 32
    train = [
        _write(tmp_path / "tr/small.jpg", b"same small"),
        _write(tmp_path / "tr/big.jpg", head + b"tail-one"),
        _write(tmp_path / "tr/prefix_only.jpg", head + b"tail-two"),
        _write(tmp_path / "tr/size_only.jpg", b"abcdefghij"),
        _write(tmp_path / "tr/unique.jpg", b"no other file has this size"),
        _write(tmp_path / "tr/twin_in_train.jpg", b"same small"),
    ]
    test = [
        _write(tmp_path / "te/big_copy.jpg", head + b"tail-one"),
        _write(tmp_path / "te/prefix_match.jpg", head + b"tail-3wo"),  # same size and prefix
        _write(tmp_path / "te/small_copy.jpg", b"same small"),
        _write(tmp_path / "te/size_twin.jpg", b"0123456789"),  # size of two train files
        tmp_path / "te/missing.jpg",  # gone since indexing: nothing to compare
    ]
    found = find_train_test_duplicates(train, test, prefix_bytes=16)
    assert found.count == 2
    assert found.pairs == [  # test-index order, each with the first training file it equals
        (tmp_path / "tr/big.jpg", tmp_path / "te/big_copy.jpg"),
        (tmp_path / "tr/small.jpg", tmp_path / "te/small_copy.jpg"),
    ]


def test_files_are_read_only_where_a_size_matches_the_other_split(tmp_path, monkeypatch):
    from training.datasets import leakage

    read = []
    real = leakage._digest

    def digest(path, limit):
        read.append((path.name, limit))
        return real(path, limit)

    monkeypatch.setattr(leakage, "_digest", digest)
    train = [_write(tmp_path / "a.jpg", b"x" * 10), _write(tmp_path / "b.jpg", b"y" * 40)]
    test = [_write(tmp_path / "c.jpg", b"z" * 11), _write(tmp_path / "d.jpg", b"y" * 40)]
    assert leakage.find_train_test_duplicates(train, test, prefix_bytes=16).count == 1
    # a.jpg and c.jpg have sizes of their own: never opened; b/d: prefix, then whole file
    assert sorted(read, key=str) == [
        ("b.jpg", 16),
        ("b.jpg", None),
        ("d.jpg", 16),
        ("d.jpg", None),
    ]


def _leak_one_compcars_image(root: Path) -> tuple[Path, Path]:
    """Copy the first listed training image over the first listed test image."""
    split_dir = root / "data" / "train_test_split" / "classification"
    first = {
        split: next(
            line
            for line in (split_dir / f"{split}.txt").read_text().splitlines()
            if (root / "data" / "image" / line).is_file()
        )
        for split in ("train", "test")
    }
    train, test = (root / "data" / "image" / first[s] for s in ("train", "test"))
    shutil.copyfile(train, test)
    return train, test


@pytest.fixture
def leaky_compcars(tmp_path) -> Path:
    root = tmp_path / "sample"
    make_sample(root, 4, 6, seed=0)
    return root


def test_a_training_run_warns_and_records_the_duplicates(leaky_compcars, tmp_path, caplog):
    train, test = _leak_one_compcars_image(leaky_compcars)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="training.train"):
        assert cli_main(tiny_argv(leaky_compcars, out)) == 0
    warned = [r.getMessage() for r in caplog.records if "byte-identical" in r.getMessage()]
    assert len(warned) == 1 and "1 of " in warned[0] and str(test) in warned[0]
    assert "--leak-check fail" in warned[0]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_test_duplicates"] == 1
    assert metrics["train_test_duplicate_pairs"] == [{"train": str(train), "test": str(test)}]
    assert json.loads((out / "args.json").read_text())["leak_check"] == "warn"


def test_a_clean_run_records_zero_and_off_records_null(leaky_compcars, tmp_path):
    from training.train import check_train_test_leak

    train_idx = load_index("compcars", leaky_compcars, "train")
    test_idx = load_index("compcars", leaky_compcars, "test")
    assert check_train_test_leak(train_idx, test_idx, "warn").count == 0
    assert check_train_test_leak(train_idx, test_idx, "off") is None


def test_leak_check_fail_refuses_the_run_in_one_line(leaky_compcars, tmp_path, capsys):
    _, test = _leak_one_compcars_image(leaky_compcars)
    out = tmp_path / "out"
    assert cli_main(tiny_argv(leaky_compcars, out, "--leak-check", "fail")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "byte-identical" in err[-1] and str(test) in err[-1]
    assert not (out / "checkpoint.pt").exists()


def _folder_tree(root: Path) -> tuple[Path, Path]:
    """train/ and test/ folders of two classes; one test image is a training image's copy."""
    for split in ("train", "test"):
        for c, color in (("Audi", (200, 0, 0)), ("Kia", (0, 0, 200))):
            for i in range(4):
                shade = (i * 40 + (split == "test") * 20) % 256
                img = Image.new("RGB", (40, 40), (color[0], shade, color[2]))
                (root / split / c).mkdir(parents=True, exist_ok=True)
                img.save(root / split / c / f"{i}.png")
    train, test = root / "train" / "Kia" / "2.png", root / "test" / "Kia" / "0.png"
    shutil.copyfile(train, test)
    return train, test


def test_the_folder_layout_is_checked_too(tmp_path, capsys):
    from training.train import check_train_test_leak

    data = tmp_path / "cars"
    train, test = _folder_tree(data)
    train_idx = load_index("folder", data, "train")
    test_idx = load_index("folder", data, "test")
    found = check_train_test_leak(train_idx, test_idx, "warn")
    assert found is not None and found.pairs == [(train, test)]
    argv = tiny_argv(data, tmp_path / "out", "--leak-check", "fail")
    argv[argv.index("compcars")] = "folder"
    assert cli_main(argv) == 2
    assert "byte-identical" in capsys.readouterr().err


def test_the_message_names_a_val_folder_held_out_not_test(tmp_path):
    from training.datasets import DatasetError
    from training.train import check_train_test_leak

    data = tmp_path / "cars"
    _folder_tree(data)
    (data / "test").rename(data / "val")  # the held-out split is called val here
    train_idx = load_index("folder", data, "train")
    test_idx = load_index("folder", data, "test")
    with pytest.raises(DatasetError) as err:
        check_train_test_leak(train_idx, test_idx, "fail")
    message = str(err.value)
    assert "held-out images" in message and "(held-out = train)" in message
    assert "test images" not in message and "test = train" not in message
    assert str(data / "val" / "Kia" / "0.png") in message


def test_under_ddp_only_rank_0_reads_the_files_and_its_refusal_stops_every_rank(
    leaky_compcars, monkeypatch
):
    from training import train as train_mod
    from training.datasets import DatasetError
    from training.distributed import DistInfo

    args = type("Args", (), {})()
    args.dataset, args.data, args.level, args.crop, args.strict = (
        "compcars",
        leaky_compcars,
        "model",
        "bbox",
        False,
    )
    args.leak_check = "fail"

    def not_on_this_rank(*args, **kwargs):
        raise AssertionError("rank 1 read the files for the leak check")

    monkeypatch.setattr(train_mod, "find_train_test_duplicates", not_on_this_rank)
    rank1 = DistInfo(1, 2, 1)
    monkeypatch.setattr(train_mod, "from_main", lambda info, value: (None, None))
    assert train_mod.load_checked_data(args, rank1).duplicates is None  # rank 0's result
    monkeypatch.setattr(train_mod, "from_main", lambda info, value: ("rank 0's refusal", None))
    with pytest.raises(DatasetError, match="rank 0's refusal"):
        train_mod.load_checked_data(args, rank1)
