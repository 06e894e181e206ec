"""Inputs that used to hang, explode or hide the bundle: umask-derived modes, FIFOs and
decompression bombs in --parity-data, `--out .`, symlink loops, checkpoints whose labels or level
the manifest refuses, and a bbox-trained checkpoint served whole photos."""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
from pathlib import Path

import pytest
import torch
from PIL import Image

from engine_build import build as build_module
from engine_build.__main__ import get_args_parser, main
from engine_build.build import BuildError, build_bundle
from engine_build.bundle import PARITY_FILE, load_bundle
from engine_build.parity import image_dir_parity_set
from training.checkpoint import CHECKPOINT_FILE, save_checkpoint
from training.preprocessing import PreprocessSpec

from .conftest import CLASSES, IMAGE_SIZE, write_checkpoint, write_images

FAST = {"precisions": "fp32", "max_batch": 4, "opt_batch": 2, "threads": 2}
SPEC = PreprocessSpec.for_image_size(IMAGE_SIZE)


def run_main(*argv: str) -> int:
    return main(get_args_parser().parse_args([*argv, "--log-level", "ERROR"]))


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m engine_build: error:"), err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_bundle_modes_follow_the_umask(checkpoint_dir, parity_dir, tmp_path, mask):
    """mkdtemp's 0700 was renamed into place: a worker running as another uid (the image's
    10001) could not read the bundle."""
    old = os.umask(mask)
    try:
        out = build_bundle(checkpoint_dir, tmp_path / "bundle", parity_data=parity_dir, **FAST)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    files = list(out.iterdir())
    assert files and all(f.is_file() for f in files)
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == {
        f.name: 0o666 & ~mask for f in files
    }


@pytest.mark.timeout(60)
def test_a_fifo_named_like_an_image_is_skipped(tmp_path, caplog):
    """Opening the FIFO blocked until a writer appeared: the build hung forever."""
    root = write_images(tmp_path / "parity", per_class=1)
    os.mkfifo(root / CLASSES[0]["model"] / "zz.jpg")
    (root / "dir.png").mkdir()  # a folder named like an image is no image either
    with caplog.at_level(logging.WARNING, logger="engine_build.parity"):
        parity = image_dir_parity_set(root, CLASSES, SPEC, limit=16)
    assert len(parity.images) == len(CLASSES)
    assert "zz.jpg: not a regular file" in caplog.text


def test_a_decompression_bomb_is_skipped(tmp_path, caplog):
    """A 20000x20000 PNG (48 KB on disk) made PIL raise DecompressionBombError, uncaught."""
    root = write_images(tmp_path / "parity", per_class=1)
    Image.new("1", (20000, 20000)).save(root / CLASSES[1]["model"] / "huge.png")
    with caplog.at_level(logging.WARNING, logger="engine_build.parity"):
        parity = image_dir_parity_set(root, CLASSES, SPEC, limit=16)
    assert len(parity.images) == len(CLASSES)
    assert "huge.png" in caplog.text and "decompression bomb" in caplog.text


def test_threads_upper_bound_is_refused_in_one_line(tmp_path, capsys):
    assert run_main("--checkpoint", str(tmp_path / "c"), "--out", str(tmp_path / "b"),
                    "--threads", "100000") == 2  # fmt: skip
    err = one_line(capsys)
    assert f"--threads 100000: at most {build_module.max_threads()}" in err


def test_out_dot_in_an_empty_directory_is_used_as_is(
    checkpoint_dir, parity_dir, tmp_path, monkeypatch, capsys
):
    """The temporary build folder was made inside `.`, which then was not empty any more."""
    here = tmp_path / "empty"
    here.mkdir()
    inode = here.stat().st_ino
    monkeypatch.chdir(here)
    assert run_main("--checkpoint", str(checkpoint_dir), "--out", ".",
                    "--parity-data", str(parity_dir), "--precision", "fp32",
                    "--max-batch", "4", "--threads", "2") == 0  # fmt: skip
    assert capsys.readouterr().out.strip() == "."
    assert here.stat().st_ino == inode  # the same directory, filled: the shell's cwd still works
    assert load_bundle(here).manifest.arch == "resnet18"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # no build folder left
    # --force over the bundle in the working directory replaces it in place, never renaming
    # (and then deleting) the directory the shell is in
    first = load_bundle(here).manifest.created_at
    assert run_main("--checkpoint", str(checkpoint_dir), "--out", ".", "--force",
                    "--parity-data", str(parity_dir), "--precision", "fp32",
                    "--max-batch", "4", "--threads", "2", "--model-version", "v2") == 0  # fmt: skip
    assert here.stat().st_ino == inode and os.getcwd() == str(here)
    assert load_bundle(here).manifest.model_version == "v2"
    assert load_bundle(here).manifest.created_at >= first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_out_dot_failed_gate_writes_its_report_beside_it(parity_dir, tmp_path, monkeypatch, capsys):
    """``args.out.with_name`` raised ValueError for `.` (a path with no name)."""
    ckpt = write_checkpoint(tmp_path / "ckpt", nan_logit=True)
    here = tmp_path / "empty"
    here.mkdir()
    monkeypatch.chdir(here)
    assert run_main("--checkpoint", str(ckpt), "--out", ".", "--parity-data", str(parity_dir),
                    "--precision", "fp32") == 2  # fmt: skip
    assert "parity gate failed" in one_line(capsys)
    report = json.loads((tmp_path / "empty.parity-failed.json").read_text())
    assert report["reference_non_finite_images"] > 0
    assert list(here.iterdir()) == []


@pytest.mark.parametrize("flag", ["--out", "--checkpoint"])
def test_symlink_loop_is_one_line(checkpoint_dir, parity_dir, tmp_path, capsys, flag):
    loop = tmp_path / "loop"
    loop.symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(loop)
    paths = {"--out": str(tmp_path / "b"), "--checkpoint": str(checkpoint_dir), flag: str(loop)}
    with pytest.raises(BuildError, match=f"{flag} {loop}: cannot be resolved"):
        build_bundle(paths["--checkpoint"], paths["--out"], parity_data=parity_dir, **FAST)
    assert run_main("--checkpoint", paths["--checkpoint"], "--out", paths["--out"],
                    "--parity-data", str(parity_dir), "--precision", "fp32") == 2  # fmt: skip
    assert str(loop) in one_line(capsys)


def _drop(key: str):
    return lambda c: c["classes"][1].pop(key)


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (lambda c: c.update(level=None), "level None is not one of model, make"),
        (_drop("make"), "classes[1].make is missing, must be text"),
        (_drop("model"), "classes[1].model is missing, must be text"),
        (lambda c: c["classes"][0].update(make=123), "classes[0].make is 123, must be text"),
        (
            lambda c: c["classes"][2].update(model_id=1.5),
            "classes[2].model_id is 1.5, must be an integer, text",
        ),
    ],
)
def test_checkpoint_the_manifest_refuses_is_one_line_before_any_work(
    parity_dir, tmp_path, monkeypatch, capsys, damage, needle
):
    """load_checkpoint accepts these; the manifest did not, with a pydantic traceback (exit 1)
    after the export and the parity runs."""
    ckpt, err = refused_before_any_work(tmp_path, parity_dir, monkeypatch, capsys, damage)
    assert f"checkpoint {ckpt / CHECKPOINT_FILE}: " in err and needle in err
    assert not (tmp_path / "b").exists()


def refused_before_any_work(
    tmp_path: Path, parity_dir: Path, monkeypatch, capsys, damage
) -> tuple[Path, str]:
    """A checkpoint changed by ``damage(raw dict)``, built with the CLI: the build must refuse
    it (exit 2) before any model is built; the checkpoint and its one-line error."""
    ckpt = write_checkpoint(tmp_path / "ckpt")
    raw = torch.load(ckpt / CHECKPOINT_FILE, weights_only=True)
    raw["classes"] = [dict(c) for c in raw["classes"]]
    damage(raw)
    save_checkpoint(ckpt, raw)

    def no_work(*_a, **_k):
        raise AssertionError("the model was built before the checkpoint was checked")

    monkeypatch.setattr(build_module, "model_from_checkpoint", no_work)
    assert run_main("--checkpoint", str(ckpt), "--out", str(tmp_path / "b"),
                    "--parity-data", str(parity_dir), "--precision", "fp32") == 2  # fmt: skip
    return ckpt, one_line(capsys)


def test_bbox_trained_checkpoint_warns_and_records_its_crop(parity_dir, tmp_path, caplog):
    """Its worker classifies whole photos while parity was measured on box crops: say so."""
    ckpt = write_checkpoint(tmp_path / "ckpt", crop="bbox")
    with caplog.at_level(logging.WARNING, logger="engine_build.build"):
        out = build_bundle(ckpt, tmp_path / "b", parity_data=parity_dir, **FAST)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("--crop bbox" in m and "whole photos" in m for m in warned), warned
    assert json.loads((out / PARITY_FILE).read_text())["training_crop"] == "bbox"
    load_bundle(out)  # the manifest's contract (extra fields forbidden) still holds


def test_full_photo_checkpoint_records_its_crop_without_warning(bundle_dir, caplog):
    assert json.loads((bundle_dir / PARITY_FILE).read_text())["training_crop"] == "full"
    with caplog.at_level(logging.WARNING, logger="engine_build.build"):
        assert build_module._warn_about_crop({"args": {"crop": "full"}}, bundle_dir, None) == "full"
    assert not caplog.records


def test_a_labels_json_that_no_longer_matches_the_checkpoint_is_a_warning(tmp_path, caplog):
    import json

    from engine_build.build import _warn_about_labels_file

    classes = [
        {"make": "BMW", "model": "X5", "make_id": 1, "model_id": 10},
        {"make": "Kia", "model": "Rio", "make_id": 2, "model_id": 20},
    ]
    ckpt = {"classes": classes}
    labels = tmp_path / "labels.json"

    def warnings_for(content: str | None) -> str:
        caplog.clear()
        if content is not None:
            labels.write_text(content)
        with caplog.at_level(logging.WARNING, logger="engine_build.build"):
            _warn_about_labels_file(ckpt, labels)
        return caplog.text

    assert warnings_for(None) == ""  # no labels.json: nothing to compare
    as_written = {str(i): c for i, c in enumerate(classes)}
    assert warnings_for(json.dumps(as_written)) == ""
    renamed = {**as_written, "1": {**classes[1], "model": "Rio Sport"}}
    text = warnings_for(json.dumps(renamed))
    assert "first at index 1" in text and "Rio Sport" in text and "not read" in text
    assert "has 1 entries, the checkpoint 2" in warnings_for(json.dumps({"0": classes[0]}))
    assert "unreadable" in warnings_for("{not json")


def test_a_failed_swap_puts_the_old_bundle_back(checkpoint_dir, parity_dir, tmp_path, monkeypatch):
    """--force moved the old bundle aside, then a failed second rename left --out missing (the
    old bundle hidden in `.bundle.old-PID`); nothing was fsynced before the renames either."""
    out = tmp_path / "bundle"
    build_bundle(checkpoint_dir, out, parity_data=parity_dir, model_version="v1", **FAST)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    target = out.resolve()
    real_replace, real_fsync = os.replace, os.fsync
    renames, synced = [], set()

    def fsync(fd):
        synced.add(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def replace(src, dst, **kw):
        if target in (Path(src), Path(dst)):
            renames.append((Path(src), Path(dst)))
            if len(renames) == 2:  # the new bundle over --out: every file and the folder synced
                assert {str(p) for p in Path(src).iterdir()} | {str(src)} <= synced
                raise OSError(errno.EIO, "simulated rename failure", str(src))
        return real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="simulated rename failure"):
        build_bundle(checkpoint_dir, out, parity_data=parity_dir, model_version="v2",
                     overwrite=True, **FAST)  # fmt: skip
    monkeypatch.undo()
    moved_aside, failed, put_back = renames
    assert moved_aside[0] == target and failed[1] == target and put_back == moved_aside[::-1]
    assert load_bundle(out).manifest.model_version == "v1"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no temp or old copy left


def test_force_over_a_manifest_nested_100k_deep_is_one_line(checkpoint_dir, tmp_path, capsys):
    """_is_bundle let json's RecursionError through: a traceback instead of a refusal."""
    out = tmp_path / "b"
    out.mkdir()
    (out / "manifest.json").write_text("[" * 100_000)
    assert run_main("--checkpoint", str(checkpoint_dir), "--out", str(out), "--force") == 2
    assert "is not a bundle" in one_line(capsys)
    assert (out / "manifest.json").is_file()
