"""Bad input from the command line: one line on stderr naming the culprit, exit 2, no traceback."""

from __future__ import annotations

import argparse
import importlib
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "training", *argv], capture_output=True, text=True, timeout=120
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1, proc.stderr
    assert needle in errors[0]


def test_missing_data_dir(tmp_path):
    missing = tmp_path / "no_such_dir"
    proc = run_cli("train", "--data", str(missing), "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, str(missing))


def test_wrong_layout(tmp_path):
    (tmp_path / "images").mkdir()
    proc = run_cli("evaluate", "--checkpoint", str(tmp_path), "--data", str(tmp_path))
    assert_one_line_error(proc, str(tmp_path))


def test_wrong_layout_train(tmp_path):
    proc = run_cli("train", "--data", str(tmp_path), "--out", str(tmp_path / "o"))
    assert_one_line_error(proc, str(tmp_path))


def test_unknown_arch(sample_root, tmp_path):
    proc = run_cli("train", "--data", str(sample_root), "--out", str(tmp_path), "--arch", "vgg99")
    assert_one_line_error(proc, "vgg99")


def test_unreadable_checkpoint(sample_root, tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"\x00garbage")
    proc = run_cli("evaluate", "--checkpoint", str(tmp_path), "--data", str(sample_root))
    assert_one_line_error(proc, str(tmp_path / "checkpoint.pt"))
    assert "not a PyTorch checkpoint" in proc.stderr and "weights_only" not in proc.stderr


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--epochs", "0"),
        ("--lr", "abc"),
        ("--weight-decay", "-1"),
        ("--lr", "inf"),
        ("--seed", str(2**64)),  # overflowed torch's generator with a traceback
    ],
)
def test_bad_numbers(sample_root, tmp_path, flag, value):
    proc = run_cli("train", "--data", str(sample_root), "--out", str(tmp_path), flag, value)
    assert_one_line_error(proc, value)


def test_make_sample_help_says_synthetic():
    proc = run_cli("make-sample", "--help")
    assert proc.returncode == 0 and "SYNTHETIC" in proc.stdout


@pytest.mark.parametrize("content", ["random", "pickled_dict", "tensor_list"])
def test_pretrained_file_that_is_not_a_state_dict(sample_root, tmp_path, content):
    weights = tmp_path / "weights.pt"
    if content == "random":
        weights.write_bytes(bytes(range(256)) * 4)
    elif content == "pickled_dict":
        weights.write_bytes(pickle.dumps({"a": {1, 2}}))
    else:
        torch.save([torch.zeros(2)], weights)
    proc = run_cli(
        "train", "--data", str(sample_root), "--out", str(tmp_path / "o"), "--device", "cpu",
        "--pretrained", str(weights),
    )  # fmt: skip
    assert_one_line_error(proc, str(weights))
    assert "not a PyTorch state dict" in proc.stderr and "weights_only" not in proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("command", "below"), [("make-sample", ""), ("make-sample", "sub"),
                                                ("train", "")])  # fmt: skip
def test_out_that_cannot_be_a_directory(sample_root, tmp_path, command, below):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory\n")
    out = a_file / below if below else a_file
    argv = ["--out", str(out)]
    if command == "train":
        argv += ["--data", str(sample_root), "--pretrained", "none", "--device", "cpu"]
    proc = run_cli(command, *argv)
    assert_one_line_error(proc, f"{a_file} exists and is not a directory")
    assert a_file.read_text() == "not a directory\n"


@pytest.mark.parametrize(
    "error",
    [
        PermissionError(13, "Permission denied", "/srv/runs/x"),
        NotADirectoryError(20, "Not a directory", "/etc/passwd/x"),
        IsADirectoryError(21, "Is a directory", "/tmp"),
    ],
)
def test_path_errors_anywhere_in_a_command_are_one_line(error, capsys):
    from training.cli import run_guarded

    def command(_args):
        raise error

    assert run_guarded(command, None) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and error.filename in err


def test_unexpected_errors_still_raise():
    from training.cli import run_guarded

    def command(_args):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError):
        run_guarded(command, None)


def test_utf8_problem_is_none_for_text_and_shows_other_names_by_their_bytes():
    from training.cli_errors import utf8_problem

    assert utf8_problem("São Paulo") is None
    assert utf8_problem(Path("runs/été")) is None
    bad = os.fsdecode(b"runs/o\xff")  # a file name's bytes arrive with a lone surrogate
    assert utf8_problem(bad) == "runs/o\\xff"
    assert utf8_problem(Path(bad)) == "runs/o\\xff"
    assert utf8_problem("\udcff") == "\\xff"  # an argument from sys.argv, likewise


def test_the_four_utf8_checks_share_one_helper_and_keep_their_messages(tmp_path):
    from training.cli import BadArgumentError, check_utf8_path
    from training.datasets.base import DatasetError
    from training.datasets.folder import _class_name
    from worker.produce import _field_problem

    bad = os.fsdecode(b"o\xff")
    with pytest.raises(BadArgumentError, match=r"^--out o\\xff: the path is not UTF-8; choose"):
        check_utf8_path(Path(bad))
    check_utf8_path(tmp_path)  # UTF-8: no error
    with pytest.raises(DatasetError, match=r"class folder .*/o\\xff has a name that is not UTF-8"):
        _class_name(tmp_path / bad)
    assert _class_name(tmp_path / "Audi") == "Audi"
    assert _field_problem([bad], "p") == "--city 'o\\udcff': not valid UTF-8"
    assert _field_problem(["Lyon"], "\udcff") == "--platform '\\udcff': not valid UTF-8"


# every path flag of every command: "" is pathlib's current directory, so an unset variable in
# `--out "$OUT"` would write into wherever the command ran
PATH_FLAGS = [
    ("training.train", ["--data", "/d", "--out", "/o"], "--out"),
    ("training.train", ["--data", "/d", "--out", "/o"], "--data"),
    ("training.train", ["--data", "/d", "--out", "/o"], "--resume"),
    ("training.evaluate", ["--data", "/d", "--checkpoint", "/c"], "--checkpoint"),
    ("training.evaluate", ["--data", "/d", "--checkpoint", "/c"], "--out"),
    ("training.compare", ["--data", "/d", "--out", "/o"], "--out"),
    ("training.sample", ["--out", "/o"], "--out"),
    ("engine_build.__main__", ["--checkpoint", "/c", "--out", "/o"], "--out"),
    ("engine_build.__main__", ["--checkpoint", "/c", "--out", "/o"], "--checkpoint"),
    ("engine_build.__main__", ["--checkpoint", "/c", "--out", "/o"], "--parity-data"),
    ("engine_build.__main__", ["--checkpoint", "/c", "--out", "/o"], "--timing-cache"),
    ("worker.produce", [], "--images"),
    ("worker.produce", [], "--jsonl"),
    ("worker.stack", ["status"], "--state-dir"),
]


@pytest.mark.parametrize(("module", "valid", "flag"), PATH_FLAGS)
@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("", "no path in ''"),
        ("  ", "no path in '  '"),
        # what the OS refuses as ENAMETOOLONG, which each command met as a traceback
        ("x" * 256, "has a name of 256 bytes, over the 255"),
        ("a/" * 2048, "is 4096 bytes, over the 4095"),
    ],
)
def test_an_empty_or_too_long_path_is_refused_naming_its_flag(
    module, valid, flag, value, says, capsys
):
    parser = importlib.import_module(module).get_args_parser()
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args([*valid, flag, value])
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # (below a usage, where not one
    # line: the commands' own entry points use OneLineParser)
    assert f"argument {flag}: " in error and says in error and len(error) < 300
    assert parser.parse_args([*valid, flag, "/x"]) is not None  # the flag itself is accepted


def test_a_diverged_run_is_one_line_with_exit_1(capsys):
    import argparse

    from training.cli import run_guarded

    def diverge(args):
        raise FloatingPointError("loss is nan at epoch 0; lower --lr")

    assert run_guarded(diverge, argparse.Namespace()) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: training diverged: loss is nan at epoch 0; lower --lr"]


def _parser() -> argparse.ArgumentParser:
    from training.cli_errors import OneLineParser

    parser = OneLineParser(prog="p")
    parser.add_argument("--window", default="60m")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("-n", "--count", type=int, default=1)
    parser.add_argument("--when", default=None)
    parser.add_argument("--whence", default=None)
    return parser


@pytest.mark.parametrize(
    ("argv", "window"),
    [
        (["--window", "-5m"], "-5m"),  # was: "argument --window: expected one argument"
        (["--wind", "-5m"], "-5m"),  # an abbreviation, as argparse allows
        (["--window=-5m"], "-5m"),
        (["--window", "5m", "--json"], "5m"),
    ],
)
def test_a_value_starting_with_a_dash_is_the_flags_value(argv, window):
    assert _parser().parse_args(argv).window == window


@pytest.mark.parametrize(
    "argv",
    [
        ["--window", "--json"],  # a flag is never taken as a value
        ["--window", "-n"],
        ["--window", "-n3"],
        ["--window", "--co=3"],
        ["--window", "--typo"],  # a mistyped flag is not taken for a value
        ["--window", "-x"],
    ],
)
def test_a_flag_after_a_flag_that_takes_a_value_is_still_an_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args(argv)
    assert exit_.value.code == 2
    assert "argument --window: expected one argument" in capsys.readouterr().err


def test_a_subcommands_flags_are_read_by_the_subcommands_parser():
    from training.cli_errors import OneLineParser

    root = OneLineParser(prog="r")
    root.add_argument("--output", default=None)  # takes a value at the top level only
    go = root.add_subparsers(dest="cmd", parser_class=OneLineParser).add_parser("go")
    go.add_argument("--out", action="store_true")
    go.add_argument("--window", default="60m")
    args = root.parse_args(["go", "--out", "--window", "-5m"])
    assert args.out is True and args.window == "-5m"


def test_an_ambiguous_abbreviation_and_values_after_double_dash_are_left_to_argparse(capsys):
    parser = _parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--whe", "-x"])  # --when or --whence: argparse names both
    assert "ambiguous option: --whe" in capsys.readouterr().err
    args, rest = parser.parse_known_args(["--", "--window", "-5m"])
    assert args.window == "60m" and rest == ["--", "--window", "-5m"]


def test_a_negative_quantity_that_is_the_parsers_own_short_flag_stays_a_flag(capsys):
    from training.cli_errors import OneLineParser

    parser = OneLineParser(prog="p")
    parser.add_argument("--window", default="60m")
    parser.add_argument("-5", dest="five", action="store_true")
    with pytest.raises(SystemExit):
        parser.parse_args(["--window", "-5"])
    assert "argument --window: expected one argument" in capsys.readouterr().err
