"""``compare --overwrite`` leaves only the new comparison's output: the old table (compare.md,
.json, .png, the tests and predictions) goes before the first run, so a comparison that fails
or is interrupted leaves no table describing the runs it replaced, and the old comparison's
archs that this one does not train go too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training import train as train_mod
from training.__main__ import main as cli_main
from training.sample import make_sample

from .test_run_guards import tiny_argv

# every file a comparison writes into its --out (training.compare.COMPARE_FILES)
COMPARE_FILES = (
    "compare.json",
    "compare_tests.json",
    "compare_predictions.csv",
    "compare.md",
    "compare.png",
)


def compare_argv(data: Path, out: Path, archs: str, *extra: str) -> list[str]:
    argv = tiny_argv(data, out, *extra)
    i = argv.index("--arch")
    return ["compare", "--archs", archs, "--bench-batch", "2", *argv[1:i], *argv[i + 2 :]]


@pytest.fixture
def sample(tmp_path) -> Path:
    root = tmp_path / "sample"
    make_sample(root, 4, 6, seed=0)
    return root


def test_an_interrupted_overwrite_leaves_no_old_table(sample, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cmp"
    assert cli_main(compare_argv(sample, out, "resnet18")) == 0
    assert all((out / name).is_file() for name in COMPARE_FILES)
    (out / "notes.txt").write_text("the user's own file")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "train_one_epoch", interrupted)
    assert cli_main(compare_argv(sample, out, "resnet18", "--overwrite")) == 130
    assert [name for name in COMPARE_FILES if (out / name).exists()] == []
    assert (out / "notes.txt").is_file()
    assert not (out / "resnet18" / "checkpoint.pt").exists()  # the arch run's own --overwrite


def test_the_old_comparisons_other_archs_go_and_nothing_else(tmp_path):
    from training.compare import remove_previous_comparison

    out = tmp_path / "cmp"
    for arch in ("resnet18", "resnet34"):
        (out / arch / "tb").mkdir(parents=True)
        for name in ("checkpoint.pt", "labels.json", "metrics.json", "args.json"):
            (out / arch / name).write_text("old")
        (out / arch / "tb" / "events.out.tfevents.1").write_text("old")
    (out / "resnet50").mkdir()  # not in the old table: not the old comparison's
    (out / "resnet50" / "checkpoint.pt").write_text("someone else's")
    (out / "resnet34_notes").mkdir()
    rows = [{"arch": a, "checkpoint": str(out / a)} for a in ("resnet18", "resnet34")]
    (out / "compare.json").write_text(json.dumps(rows))
    for name in COMPARE_FILES[1:]:  # compare.json is written above
        (out / name).write_text("old")
    (out / ".compare.md.x1.tmp").write_text("a temp file a killed comparison left")

    removed = remove_previous_comparison(out, ["resnet18"])

    assert "resnet34/" in removed and "compare.md" in removed
    assert sorted(p.name for p in out.iterdir()) == ["resnet18", "resnet34_notes", "resnet50"]
    assert (out / "resnet18" / "checkpoint.pt").is_file()  # this comparison's run replaces it
    assert (out / "resnet50" / "checkpoint.pt").is_file()


def test_a_stale_arch_folder_with_other_files_keeps_them(tmp_path):
    from training.compare import remove_previous_comparison

    out = tmp_path / "cmp"
    (out / "resnet34").mkdir(parents=True)
    (out / "resnet34" / "checkpoint.pt").write_text("old")
    (out / "resnet34" / "mine.txt").write_text("the user's")
    (out / "compare.json").write_text(
        json.dumps([{"arch": "resnet34", "checkpoint": str(out / "resnet34")}])
    )
    remove_previous_comparison(out, ["resnet18"])
    assert sorted(p.name for p in (out / "resnet34").iterdir()) == ["mine.txt"]


def _old_comparison(out: Path) -> dict[str, bytes]:
    """An earlier comparison's files in ``out`` (its table and two arch runs); what is there."""
    for arch in ("resnet18", "resnet34"):
        (out / arch).mkdir(parents=True)
        for name in ("checkpoint.pt", "labels.json", "metrics.json", "args.json"):
            (out / arch / name).write_text(f"old {arch} {name}")
    rows = [{"arch": a, "checkpoint": str(out / a)} for a in ("resnet18", "resnet34")]
    (out / "compare.json").write_text(json.dumps(rows))
    for name in COMPARE_FILES[1:]:
        (out / name).write_text(f"old {name}")
    return _snapshot(out)


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_an_overwrite_refused_for_missing_data_removes_nothing(tmp_path, capsys):
    out = tmp_path / "cmp"
    before = _old_comparison(out)
    argv = compare_argv(tmp_path / "nonexistent", out, "resnet18", "--overwrite")
    assert cli_main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: ")
    assert _snapshot(out) == before


def test_an_overwrite_refused_by_the_leak_check_removes_nothing(sample, tmp_path, capsys):
    split = sample / "data/train_test_split/classification"
    train = split.joinpath("train.txt").read_text().split()[0]
    test = split.joinpath("test.txt").read_text().split()[0]
    image = sample / "data/image"
    (image / test).write_bytes((image / train).read_bytes())  # a test image is a training one
    out = tmp_path / "cmp"
    before = _old_comparison(out)
    argv = compare_argv(sample, out, "resnet18", "--overwrite", "--leak-check", "fail")
    assert cli_main(argv) == 2
    assert "byte-identical" in capsys.readouterr().err
    assert _snapshot(out) == before


@pytest.mark.parametrize(
    "rows",
    [
        [{"arch": ["resnet34"], "checkpoint": "x"}],
        [{"arch": {"a": 1}, "checkpoint": "resnet34"}],
        [{"arch": "resnet34", "checkpoint": ["resnet34"]}],
        [{"arch": "resnet34", "checkpoint": 34}],
        {"arch": "resnet34"},
        "resnet34",
    ],
)
def test_a_malformed_compare_json_names_no_previous_arch(tmp_path, rows):
    from training.compare import previous_archs, remove_previous_comparison

    out = tmp_path / "cmp"
    (out / "resnet34").mkdir(parents=True)
    (out / "resnet34" / "checkpoint.pt").write_text("not listed in a readable table")
    (out / "compare.json").write_text(json.dumps(rows))
    assert previous_archs(out) == []
    assert remove_previous_comparison(out, ["resnet18"]) == ["compare.json"]
    assert (out / "resnet34" / "checkpoint.pt").is_file()


def test_compare_checks_the_data_for_leaks_once_for_all_archs(sample, tmp_path, monkeypatch):
    calls = []
    real = train_mod.find_train_test_duplicates

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "find_train_test_duplicates", counted)
    assert cli_main(compare_argv(sample, tmp_path / "cmp", "resnet18,resnet34")) == 0
    assert len(calls) == 1
    for arch in ("resnet18", "resnet34"):  # each run still records the check's result
        metrics = json.loads((tmp_path / "cmp" / arch / "metrics.json").read_text())
        assert metrics["train_test_duplicates"] == 0
