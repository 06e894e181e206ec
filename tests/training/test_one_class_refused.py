"""A data set of one class is refused in one line (exit 2) before anything is written: it used to
train to top-1 1.0 "(1 classes, chance 1.0000)" and exit 0, a model that can only say one name.
The usual cause is a folder tree read one level off (a CompCars root as --dataset folder reads as
the one class data/image)."""

from __future__ import annotations

from pathlib import Path

from .test_cli_errors import assert_one_line_error, run_cli
from .test_run_guards import tiny_argv, tiny_sample  # noqa: F401 (fixture)

SPLITS = ("train", "test")


def _keep_split_lines(root: Path, keep) -> None:
    """Rewrite both split files keeping the lines ``keep(make_id, model_id)`` accepts."""
    for split in SPLITS:
        path = root / f"data/train_test_split/classification/{split}.txt"
        lines = [ln for ln in path.read_text().split() if keep(*ln.split("/")[:2])]
        path.write_text("\n".join(lines) + "\n")


def _first_model(root: Path) -> tuple[str, str]:
    first = (root / "data/train_test_split/classification/train.txt").read_text().split()[0]
    make_id, model_id = first.split("/")[:2]
    return make_id, model_id


def test_a_compcars_root_read_as_a_folder_tree_is_refused(tiny_sample, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    argv = tiny_argv(tiny_sample, out)
    argv[argv.index("--dataset") + 1] = "folder"
    proc = run_cli(*argv)
    assert_one_line_error(proc, f"folder:{tiny_sample}: one class found (data/image)")
    assert "--dataset folder wants one folder per class" in proc.stderr
    assert not out.exists()


def test_a_split_naming_one_model_is_refused(tiny_sample, tmp_path):  # noqa: F811
    make_id, model_id = _first_model(tiny_sample)
    _keep_split_lines(tiny_sample, lambda mk, md: (mk, md) == (make_id, model_id))
    out = tmp_path / "out"
    proc = run_cli(*tiny_argv(tiny_sample, out))
    assert_one_line_error(proc, f"compcars:{tiny_sample / 'data'}: the split files name one class")
    assert f"({make_id}/{model_id})" in proc.stderr
    assert not out.exists()


def test_level_make_on_a_split_of_one_make_is_refused(tiny_sample, tmp_path):  # noqa: F811
    make_id, _ = _first_model(tiny_sample)
    _keep_split_lines(tiny_sample, lambda mk, _md: mk == make_id)
    out = tmp_path / "out"
    proc = run_cli(*tiny_argv(tiny_sample, out, "--level", "make"))
    assert_one_line_error(proc, "the split files name one make")
    assert not out.exists()


def test_compare_refuses_one_class_and_keeps_the_previous_comparison(tiny_sample, tmp_path):  # noqa: F811
    out = tmp_path / "cmp"
    out.mkdir()
    previous = out / "compare.md"
    previous.write_text("the previous comparison\n")
    argv = [a for a in tiny_argv(tiny_sample, out)[1:] if a not in ("--arch", "resnet18")]
    argv[argv.index("--dataset") + 1] = "folder"
    proc = run_cli("compare", "--archs", "resnet18", *argv, "--overwrite")
    assert_one_line_error(proc, "one class found (data/image)")
    assert previous.read_text() == "the previous comparison\n"
    assert sorted(p.name for p in out.iterdir()) == ["compare.md"]
