"""Flag values with no sane use (an extra zero) and outputs that would be silently replaced: one
line naming the flag, exit 2, before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.__main__ import get_args_parser
from training.__main__ import main as cli_main
from training.compare import MAX_BENCH_BATCH
from training.train import MAX_IMAGE_SIZE, MAX_LOADER_WORKERS


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("command", ["train", "compare"])
@pytest.mark.parametrize("size", ["100000", str(MAX_IMAGE_SIZE + 1)])
def test_image_size_has_an_upper_bound(tmp_path, capsys, command, size):
    # a missing --data: the bound must be checked before anything reads the data set
    argv = [command, "--data", str(tmp_path / "no_data"), "--out", str(tmp_path / "o")]
    assert cli_main([*argv, "--image-size", size, "--device", "cpu"]) == 2
    line = one_error_line(capsys)
    assert f"--image-size {size}" in line and str(MAX_IMAGE_SIZE) in line
    assert not (tmp_path / "o").exists()


def test_bench_batch_has_an_upper_bound_checked_before_training(tmp_path, capsys):
    argv = ["compare", "--data", str(tmp_path / "no_data"), "--out", str(tmp_path / "o")]
    assert cli_main([*argv, "--bench-batch", "160000", "--device", "cpu"]) == 2
    line = one_error_line(capsys)
    assert "--bench-batch 160000" in line and str(MAX_BENCH_BATCH) in line


@pytest.mark.parametrize(
    ("command", "flag", "bound"),
    [("train", "--image-size", MAX_IMAGE_SIZE), ("compare", "--image-size", MAX_IMAGE_SIZE),
     ("compare", "--bench-batch", MAX_BENCH_BATCH)],
)  # fmt: skip
def test_bounds_are_in_the_help(command, flag, bound):
    sub = get_args_parser()._subparsers._group_actions[0].choices[command]
    action = next(a for a in sub._actions if flag in a.option_strings)
    assert str(bound) in action.help


def _sample_argv(out: Path, *extra: str) -> list[str]:
    return ["make-sample", "--out", str(out), "--classes", "3", "--per-class", "2", *extra]


def test_make_sample_refuses_an_existing_out(tmp_path, capsys):
    out = tmp_path / "sample"
    assert cli_main(_sample_argv(out)) == 0
    mat = out / "data/misc/make_model_name.mat"
    before = mat.read_bytes()
    capsys.readouterr()
    assert cli_main(_sample_argv(out, "--seed", "1")) == 2
    line = one_error_line(capsys)
    assert f"--out {out}" in line and "--overwrite" in line
    assert mat.read_bytes() == before


def test_make_sample_refuses_a_non_empty_folder_that_is_no_sample(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine\n")
    assert cli_main(_sample_argv(tmp_path)) == 2
    assert "--overwrite" in one_error_line(capsys)
    assert not (tmp_path / "data").exists()


def test_make_sample_overwrite_and_empty_out(tmp_path):
    out = tmp_path / "sample"
    out.mkdir()  # an empty directory (mktemp, mkdir -p) is used as is
    assert cli_main(_sample_argv(out)) == 0
    assert cli_main(_sample_argv(out, "--overwrite", "--seed", "1")) == 0
    assert (out / "data/misc/make_model_name.mat").is_file()


@pytest.mark.parametrize("command", ["train", "evaluate", "compare"])
def test_loader_workers_have_an_upper_bound(tmp_path, capsys, command):
    """--workers forks that many loader processes: a typo must not fork without limit."""
    data = ["--data", str(tmp_path / "no_data")]
    where = ["--checkpoint", str(tmp_path)] if command == "evaluate" else ["--out", str(tmp_path)]
    bound = str(MAX_LOADER_WORKERS)
    for value in ("99999999999999999999", str(MAX_LOADER_WORKERS + 1)):
        with pytest.raises(SystemExit) as exit_:
            cli_main([command, *data, *where, "--workers", value])
        assert exit_.value.code == 2
        line = one_error_line(capsys)
        assert f"--workers: '{value}' must be <= {bound}" in line
    sub = get_args_parser()._subparsers._group_actions[0].choices[command]
    action = next(a for a in sub._actions if "--workers" in a.option_strings)
    assert f"0..{bound}" in action.help


@pytest.mark.parametrize(
    ("flag", "values", "minimum"),
    [("--classes", ("0", "1", "2"), 3), ("--per-class", ("0", "1"), 2)],
)
def test_make_sample_counts_name_their_real_minimum_at_once(
    tmp_path, capsys, flag, values, minimum
):
    """--classes 0 used to say ">= 1", then --classes 1 ">= 3": one refusal must do."""
    for value in values:
        argv = _sample_argv(tmp_path / "sample")
        argv[argv.index(flag) + 1] = value
        with pytest.raises(SystemExit) as exit_:
            cli_main(argv)
        assert exit_.value.code == 2
        assert f"{flag}: '{value}' must be >= {minimum}" in one_error_line(capsys)
    assert not (tmp_path / "sample").exists()
