"""Options with no sane use — an extra zero in --max-batch, a blank model name, a newline in the
version that would land in the manifest and every result message — are one line and exit 2
before the checkpoint is even opened."""

from __future__ import annotations

import pytest

from engine_build.__main__ import get_args_parser, main
from engine_build.build import MAX_BATCH, BuildError, BuildOptions, max_threads


def run_main(tmp_path, *options: str) -> int:
    argv = ["--checkpoint", str(tmp_path / "no_ckpt"), "--out", str(tmp_path / "b")]
    return main(get_args_parser().parse_args([*argv, "--log-level", "ERROR", *options]))


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (["--max-batch", "640000"], "--max-batch 640000"),
        (["--max-batch", str(MAX_BATCH + 1)], f"--max-batch {MAX_BATCH + 1}"),
        (["--model-name", ""], "--model-name ''"),
        (["--model-name", "  \t"], "--model-name"),
        (["--model-name", "cars\nv2"], "U+000A"),
        (["--model-version", "v1\n"], "--model-version 'v1\\n'"),
        (["--model-version", "v1\r"], "U+000D"),
        (["--model-version", "v\x1b[31m1"], "U+001B"),
        (["--model-version", "v1\u2028"], "U+2028"),
        (["--model-version", ""], "--model-version ''"),
        (["--model-name", "x" * 129], "129 characters, at most 128"),
        (["--model-version", "1" * 5000], "5000 characters, at most 128"),
        (["--threads", "100000"], f"--threads 100000: at most {max_threads()}"),
        (["--threads", str(max_threads() + 1)], f"--threads {max_threads() + 1}"),
    ],
)
def test_refused_in_one_line_before_any_work(tmp_path, capsys, options, needle):
    assert run_main(tmp_path, *options) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m engine_build: error:"), err
    assert needle in err and "no_ckpt" not in err
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "options",
    [
        {"max_batch": MAX_BATCH, "opt_batch": 32},
        {"model_name": "carstream-r50 (Ünïcode ok)", "model_version": "2024.06 rc1"},
        {"model_name": "n" * 128, "model_version": "v" * 128},
        {"threads": max_threads()},
    ],
)
def test_sane_values_still_pass(options):
    BuildOptions(precisions=("fp32",), **options).validate()


def test_python_api_refuses_a_blank_name_too():
    with pytest.raises(BuildError, match="--model-name"):
        BuildOptions(model_name=" ").validate()


def test_bounds_are_in_the_help():
    helps = {a.dest: a.help for a in get_args_parser()._actions}
    assert str(MAX_BATCH) in helps["max_batch"]
    assert f"({max_threads()} here)" in helps["threads"]
    assert "control characters" in helps["model_name"]
    assert "control characters" in helps["model_version"]
    assert "128" in helps["model_name"] and "128" in helps["model_version"]


@pytest.mark.parametrize(
    ("min_batch", "max_batch", "opt"),
    [(48, 64, 48), (1, 64, 32), (1, 8, 8), (64, 4096, 64), (4, 4, 4)],
)
def test_default_opt_batch_is_clamped_into_min_max(min_batch, max_batch, opt):
    """The default was min(32, max): `--min-batch 48 --max-batch 64` was refused as 48/32/64."""
    args = get_args_parser().parse_args(
        ["--checkpoint", "c", "--out", "o", "--min-batch", str(min_batch),
         "--max-batch", str(max_batch)]
    )  # fmt: skip
    options = BuildOptions(
        precisions=("fp32",), min_batch=args.min_batch, opt_batch=args.opt_batch,
        max_batch=args.max_batch,
    )  # fmt: skip
    options.validate()
    assert (options.profile.min, options.profile.opt, options.profile.max) == (
        min_batch, opt, max_batch,
    )  # fmt: skip


def test_min_batch_alone_passes_the_option_checks(tmp_path, capsys):
    assert run_main(tmp_path, "--min-batch", "48", "--max-batch", "64") == 2
    err = capsys.readouterr().err
    assert "48/32/64" not in err and "no_ckpt" in err  # refused for the checkpoint, not the batch
