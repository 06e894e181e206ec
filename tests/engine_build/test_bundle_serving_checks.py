"""A bundle the worker cannot serve is refused at load, in one line naming the file: manifest
rules engine_build applies, artifacts that do not fit the manifest, weights that are not finite."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from engine_build.bundle import BundleError, load_bundle, read_manifest
from engine_build.runtime import create_engine
from engine_build.runtime.base import ArtifactMismatchError
from training.preprocessing import PreprocessSpec

from .conftest import write_checkpoint


def _edit(manifest: dict, code: str) -> None:
    exec(code, {"m": manifest})


MANIFEST_EDITS = [
    ('m["num_classes"] = 0; m["labels"] = []', "num_classes"),
    ('m["batch_profile"] = {"min": 8, "opt": 4, "max": 2}', "must be min <= opt <= max"),
    ('m["batch_profile"]["max"] = 100_000_000', "batch_profile.max"),
    ('m["batch_profile"]["x"] = 1', "batch_profile.x: Extra inputs"),
    ('m["labels"][0]["x"] = 1', "labels.0.x: Extra inputs"),
    ('m["artifacts"][0]["x"] = 1', "artifacts.0.x: Extra inputs"),
    ('m["model_name"] = ""', "model_name: "),
    ('m["model_version"] = "v\\n1"', "U+000A"),
    ('m["model_version"] = "v\\x1b[31m"', "U+001B"),
    ('m["artifacts"][0]["file"] = "model.onnx\\x00x"', "U+0000"),
    ('m["artifacts"][0]["file"] = "a" * 5000', "at most 1024"),
    ('m["artifacts"][0]["file"] = "a" * 300 + ".onnx"', "over 255 bytes"),
    ('m["preprocess"]["crop"] = 64', "crop 64 is larger than resize 37"),
    ('m["preprocess"]["resize"] = 10**9', "preprocess.resize"),
    ('m["preprocess"]["std"] = [1e-300, 0.2, 0.2]', "must be >= 1e-06"),
]


@pytest.mark.parametrize(("code", "needle"), MANIFEST_EDITS)
def test_a_manifest_engine_build_would_never_write_is_one_line(bundle_dir, tmp_path, code, needle):
    raw = json.loads((bundle_dir / "manifest.json").read_text())
    _edit(raw, code)
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError) as info:
        read_manifest(tmp_path)
    text = str(info.value)
    assert needle in text and str(tmp_path / "manifest.json") in text
    assert "\n" not in text


def test_a_manifest_that_is_not_an_object_names_the_manifest(tmp_path):
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(BundleError, match=r"manifest\.json: manifest: Input should be"):
        read_manifest(tmp_path)


def test_every_spec_training_writes_still_loads():
    for size in (32, 224, 4096):  # train.py's --image-size range
        spec = PreprocessSpec.for_image_size(size)
        assert PreprocessSpec(**spec.model_dump()) == spec


def _copy(bundle_dir: Path, tmp_path: Path, code: str = "") -> Path:
    out = tmp_path / "bundle"
    shutil.copytree(bundle_dir, out)
    raw = json.loads((out / "manifest.json").read_text())
    _edit(raw, code)
    (out / "manifest.json").write_text(json.dumps(raw))
    return out


def _rehash(bundle: Path, file: str) -> None:
    raw = json.loads((bundle / "manifest.json").read_text())
    data = (bundle / file).read_bytes()
    for art in raw["artifacts"]:
        if art["file"] == file:
            art["sha256"], art["size_bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    (bundle / "manifest.json").write_text(json.dumps(raw))


@pytest.mark.parametrize(
    ("code", "needle"),
    [
        ('m["labels"] = m["labels"][:2]; m["num_classes"] = 2', "has shape (batch, 3)"),
        ('m["input_name"] = "foo"', "the manifest's input_name is 'foo'"),
        ('m["output_name"] = "bar"', "the manifest's output_name is 'bar'"),
        ('m["preprocess"].update(crop=64, resize=73)', "(N, 3, 64, 64) (preprocess.crop)"),
    ],
)
@pytest.mark.parametrize("backend", ["onnxruntime", "auto"])
def test_an_onnx_model_that_does_not_fit_its_manifest_is_refused_at_open(
    bundle_dir, tmp_path, code, needle, backend
):
    bad = load_bundle(_copy(bundle_dir, tmp_path, code))
    with pytest.raises(ArtifactMismatchError) as info:  # auto does not fall back from it
        create_engine(bad, backend)
    text = str(info.value)
    assert needle in text and "model.onnx does not fit manifest.json" in text
    assert isinstance(info.value, BundleError) and "\n" not in text


def test_an_onnx_file_onnx_runtime_cannot_read_is_one_line(bundle_dir, tmp_path):
    out = _copy(bundle_dir, tmp_path)
    (out / "model.onnx").write_bytes(b"not a model")
    _rehash(out, "model.onnx")
    with pytest.raises(ArtifactMismatchError, match=r"ONNX Runtime cannot load model\.onnx"):
        create_engine(load_bundle(out), "onnxruntime")


class _Evil:
    pass


def _bad_state(kind: str):
    import torchvision

    if kind == "pickle":
        return {"x": _Evil()}
    if kind == "arch":
        return torchvision.models.resnet34(num_classes=3).state_dict()
    state = torch.load(kind, weights_only=True)  # kind: the good model.pt; poison one tensor
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    return state


@pytest.mark.parametrize(
    ("kind", "needle"),
    [
        ("pickle", "holds objects a weights-only load refuses"),
        ("arch", "does not match arch resnet18 with 3 classes: Error(s) in loading state_dict"),
        ("nan", "tensor layer2.0.conv1.weight holds NaN or inf"),
    ],
)
def test_a_model_pt_that_cannot_serve_is_one_line_naming_it(bundle_dir, tmp_path, kind, needle):
    from engine_build.runtime.torch_model import load_torch_model

    out = _copy(bundle_dir, tmp_path)
    torch.save(_bad_state(str(out / "model.pt") if kind == "nan" else kind), out / "model.pt")
    _rehash(out, "model.pt")
    with pytest.raises(ArtifactMismatchError) as info:
        load_torch_model(load_bundle(out))
    text = str(info.value)
    assert needle in text and str(out / "model.pt") in text and "\n" not in text
    assert "weights_only=False" not in text


@pytest.mark.parametrize("poison", ["nan", "inf"])
def test_a_checkpoint_with_non_finite_weights_names_the_tensor(tmp_path, parity_dir, poison):
    from engine_build.build import BuildError, build_bundle

    ckpt = write_checkpoint(tmp_path / "ckpt")
    raw = torch.load(ckpt / "checkpoint.pt", weights_only=True)
    raw["state_dict"]["fc.weight"][1, 2] = float(poison)
    torch.save(raw, ckpt / "checkpoint.pt")
    with pytest.raises(BuildError, match=r"state_dict tensor fc\.weight holds NaN or inf"):
        build_bundle(ckpt, tmp_path / "out", parity_data=parity_dir, max_batch=8)
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_with_a_negative_batchnorm_variance_names_the_tensor(
    tmp_path, parity_dir, capsys
):
    # before: export ran, and the parity gate refused it only as a NaN reference (eval-mode
    # BatchNorm takes the square root of running_var), naming no tensor
    from engine_build.__main__ import get_args_parser, main
    from engine_build.build import BuildError, build_bundle

    ckpt = write_checkpoint(tmp_path / "ckpt")
    raw = torch.load(ckpt / "checkpoint.pt", weights_only=True)
    raw["state_dict"]["layer1.0.bn1.running_var"][3] = -0.5
    torch.save(raw, ckpt / "checkpoint.pt")
    needle = (
        r"state_dict tensor layer1\.0\.bn1\.running_var has a value -0\.5 at index 3 that its "
        r"BatchNorm's eps 1e-05 does not lift above 0 \(running_var \+ eps <= 0: eval mode "
        r"divides by its square root\); the checkpoint is corrupt"
    )
    with pytest.raises(BuildError, match=needle):
        build_bundle(ckpt, tmp_path / "out", parity_data=parity_dir, max_batch=8)
    assert not (tmp_path / "out").exists()
    argv = ["--checkpoint", str(ckpt), "--out", str(tmp_path / "out"), "--log-level", "ERROR"]
    assert main(get_args_parser().parse_args([*argv, "--parity-data", str(parity_dir)])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "layer1.0.bn1.running_var has a value -0.5" in err, err
    assert not (tmp_path / "out").exists()


def test_a_tiny_negative_batchnorm_variance_that_eps_lifts_above_0_is_built(tmp_path, parity_dir):
    # before: any running_var < 0 was refused, though BatchNorm divides by
    # sqrt(running_var + eps): -1e-7 with eps 1e-5 gives finite output (float round-off)
    from engine_build.build import build_bundle

    ckpt = write_checkpoint(tmp_path / "ckpt")
    raw = torch.load(ckpt / "checkpoint.pt", weights_only=True)
    raw["state_dict"]["layer1.0.bn1.running_var"][3] = -1e-7
    torch.save(raw, ckpt / "checkpoint.pt")
    out = build_bundle(ckpt, tmp_path / "out", parity_data=parity_dir, max_batch=8)
    parity = json.loads((out / "parity.json").read_text())
    assert parity["artifacts"]["onnxruntime-fp32"]["gate"]["passed"] is True


def test_the_variance_is_held_to_its_own_modules_eps():
    from engine_build.build import _negative_variance

    model = torch.nn.Sequential(torch.nn.BatchNorm2d(4, eps=1e-3), torch.nn.BatchNorm2d(4))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["0.running_var"][1] = -5e-4  # lifted above 0 by its eps 1e-3
    assert _negative_variance(state, model) is None
    state["1.running_var"][2] = -5e-4  # not by the default 1e-5
    problem = _negative_variance(state, model)
    assert problem is not None and problem.startswith(
        "1.running_var has a value -0.0005 at index 2"
    )
    assert "eps 1e-05" in problem
    state["1.running_var"][2] = -1e-5  # running_var + eps == 0: sqrt(0), a division by zero
    assert _negative_variance(state, model) is not None
    # without the model (no eps known) any value <= 0 is refused
    state["1.running_var"][2] = 1.0
    assert _negative_variance(state, model) is None
    assert "0.running_var has a value -0.0005" in _negative_variance(state)


def test_a_checkpoint_holding_objects_is_said_to_be_refused_by_a_weights_only_load(tmp_path):
    from engine_build.build import BuildError, build_bundle

    (tmp_path / "ckpt").mkdir()
    torch.save({"arch": _Evil()}, tmp_path / "ckpt" / "checkpoint.pt")
    with pytest.raises(BuildError, match="holds objects a weights-only load refuses"):
        build_bundle(tmp_path / "ckpt", tmp_path / "out")


def test_a_checkpoint_whose_crop_exceeds_its_resize_is_refused_before_export(tmp_path):
    from engine_build.build import BuildError, build_bundle

    ckpt = write_checkpoint(tmp_path / "ckpt")
    raw = torch.load(ckpt / "checkpoint.pt", weights_only=True)
    raw["preprocess"]["crop"] = 64
    torch.save(raw, ckpt / "checkpoint.pt")
    with pytest.raises(BuildError, match="crop 64 is larger than resize 37"):
        build_bundle(ckpt, tmp_path / "out")


def test_an_out_that_cannot_be_written_fails_first_naming_out(tmp_path, monkeypatch):
    import tempfile

    from engine_build import build
    from engine_build.build import BuildError, build_bundle

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / ".out.building-x"))

    def never(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before --out was checked")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    monkeypatch.setattr(build, "load_checkpoint", never)
    out = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(BuildError) as info:
        build_bundle(tmp_path / "no-such-checkpoint", out)
    assert str(info.value) == f"--out {out}: cannot write in {out.parent} (Read-only file system)"
    assert not (tmp_path / "new").exists()  # the parents it made are gone again


def test_an_os_error_while_building_is_one_line_exit_2(monkeypatch, capsys, tmp_path):
    from engine_build import __main__ as cli

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out"))

    monkeypatch.setattr(cli, "build_bundle", full)
    args = cli.get_args_parser().parse_args(
        ["--checkpoint", str(tmp_path), "--out", str(tmp_path / "out")]
    )
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err
