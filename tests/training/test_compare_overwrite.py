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
