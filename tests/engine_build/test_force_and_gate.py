"""--force replaces only a bundle's own files, the parity gate holds FP32 confidences (not only
top-1 answers), and make-level class folders label parity images."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from engine_build import build as build_module
from engine_build.__main__ import get_args_parser
from engine_build.build import BuildError, ParityGateError, build_bundle
from engine_build.bundle import PARITY_FILE, load_bundle
from engine_build.parity import class_name_index, image_dir_parity_set
from training.preprocessing import PreprocessSpec

from .conftest import CLASSES, IMAGE_SIZE, write_images
from .test_build_hazards import one_line, run_main

FAST = {"precisions": "fp32", "max_batch": 4, "opt_batch": 2, "threads": 2}
FAST_ARGS = ("--precision", "fp32", "--max-batch", "4", "--threads", "2")


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for a folder)."""
    return {
        p.relative_to(root).as_posix(): None if p.is_dir() else p.read_bytes()
        for p in sorted(root.rglob("*"))
    }


# --force ---------------------------------------------------------------------------------------


def test_force_leaves_a_folder_with_a_web_app_manifest_alone(
    checkpoint_dir, parity_dir, tmp_path, capsys
):
    """Any manifest.json with a schema_version used to pass for a bundle: --force deleted the
    thesis and the photos beside a web app's manifest."""
    out = tmp_path / "my-webapp"
    (out / "photos").mkdir(parents=True)
    (out / "thesis.tex").write_text("\\documentclass{article}")
    (out / "photos" / "1.jpg").write_bytes(b"\xff\xd8\xff")
    (out / "manifest.json").write_text(
        json.dumps({"schema_version": 2, "name": "my-webapp", "icons": []})
    )
    before = tree(out)
    assert run_main("--checkpoint", str(checkpoint_dir), "--out", str(out), "--force",
                    "--parity-data", str(parity_dir), *FAST_ARGS) == 2  # fmt: skip
    assert "is not a bundle" in one_line(capsys)
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my-webapp"]


@pytest.fixture
def old_bundle(bundle_dir, tmp_path) -> Path:
    """A copy of the shared fp32 + int8 bundle, to be replaced."""
    return Path(shutil.copytree(bundle_dir, tmp_path / "bundle"))


def test_force_refuses_a_bundle_holding_other_files(checkpoint_dir, parity_dir, old_bundle):
    """A bundle folder the user also keeps notes (or a timing cache) in was deleted whole."""
    (old_bundle / "notes.txt").write_text("keep me")
    (old_bundle / "runs").mkdir()
    (old_bundle / "runs" / "r1.log").write_text("keep me too")
    before = tree(old_bundle)
    with pytest.raises(BuildError, match=r"not its bundle's: notes\.txt, runs/; --force"):
        build_bundle(checkpoint_dir, old_bundle, parity_data=parity_dir, overwrite=True, **FAST)
    assert tree(old_bundle) == before
    # the bundle's own files alone (model.int8.onnx included, which this build does not make)
    # are replaced
    (old_bundle / "notes.txt").unlink()
    shutil.rmtree(old_bundle / "runs")
    build_bundle(
        checkpoint_dir, old_bundle, parity_data=parity_dir, overwrite=True, model_version="v2",
        **FAST,
    )  # fmt: skip
    assert load_bundle(old_bundle).manifest.model_version == "v2"
    assert sorted(p.name for p in old_bundle.iterdir()) == [
        "manifest.json", "model.onnx", "model.pt", PARITY_FILE,
    ]  # fmt: skip


def test_force_refuses_a_bundle_whose_manifest_is_damaged(
    checkpoint_dir, parity_dir, old_bundle, capsys
):
    """Which files a bundle owns comes from its manifest: without one readable, the user
    removes the folder."""
    manifest = json.loads((old_bundle / "manifest.json").read_text())
    manifest["artifacts"][0]["sha256"] = "not a digest"
    (old_bundle / "manifest.json").write_text(json.dumps(manifest))
    before = tree(old_bundle)
    assert run_main("--checkpoint", str(checkpoint_dir), "--out", str(old_bundle), "--force",
                    "--parity-data", str(parity_dir), *FAST_ARGS) == 2  # fmt: skip
    err = one_line(capsys)
    assert "manifest cannot be read" in err and "remove it yourself" in err
    assert tree(old_bundle) == before


# the parity gate on probabilities -------------------------------------------------------------


def export_changed(monkeypatch, change) -> None:
    """Make the build export a changed copy of the model: the bug the gate exists to catch."""
    real = build_module.export_onnx

    def export(model, *args, **kwargs):
        model = copy.deepcopy(model)
        with torch.no_grad():
            change(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(build_module, "export_onnx", export)


def fc_times_5(model) -> None:
    model.fc.weight.mul_(5)


def noisy_conv1(model) -> None:
    w = model.conv1.weight
    w.add_(0.2 * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("change", [fc_times_5, noisy_conv1])
def test_an_fp32_export_that_keeps_top1_but_moves_confidences_fails(
    checkpoint_dir, parity_dir, tmp_path, monkeypatch, change
):
    """Both passed with top-1 agreement 1.0 while probabilities moved by 0.03-0.23."""
    export_changed(monkeypatch, change)
    with pytest.raises(ParityGateError, match=r"max \|probability diff\| .* > 0\.01") as info:
        build_bundle(checkpoint_dir, tmp_path / "b", parity_data=parity_dir, **FAST)
    entry = info.value.report["artifacts"]["onnxruntime-fp32"]
    assert entry["top1_agreement"] == 1.0  # top-1 alone would have passed it
    assert entry["max_abs_prob_diff"] > 0.01
    assert entry["gate"]["max_prob_diff"] == 0.01 and not entry["gate"]["passed"]
    assert not (tmp_path / "b").exists()


def test_probability_limits_recorded_fp32_by_default_others_when_asked(
    bundle_dir, checkpoint_dir, parity_dir, tmp_path
):
    """The shared bundle was built with the defaults: fp32 held to 0.01, int8 not checked."""
    report = json.loads((bundle_dir / PARITY_FILE).read_text())["artifacts"]
    fp32, int8 = report["onnxruntime-fp32"], report["onnxruntime-int8"]
    assert fp32["gate"]["max_prob_diff"] == 0.01 and fp32["max_abs_prob_diff"] < 1e-4
    assert fp32["batch1"]["max_abs_prob_diff"] < 1e-4
    assert int8["gate"]["max_prob_diff"] is None and int8["gate"]["passed"]
    limit = int8["max_abs_prob_diff"] / 2  # int8 moves probabilities; fp32 stays far below
    with pytest.raises(
        ParityGateError, match=r"model\.int8\.onnx: max \|probability diff\|"
    ) as info:
        build_bundle(
            checkpoint_dir, tmp_path / "b", parity_data=parity_dir, max_prob_diff=limit,
            **{**FAST, "precisions": "fp32,int8"},
        )  # fmt: skip
    assert info.value.report["artifacts"]["onnxruntime-fp32"]["gate"]["passed"]


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan"])
def test_max_prob_diff_outside_0_1_is_refused_in_one_line(tmp_path, capsys, value):
    assert run_main("--checkpoint", str(tmp_path / "c"), "--out", str(tmp_path / "b"),
                    "--max-prob-diff", value) == 2  # fmt: skip
    assert f"--max-prob-diff must be in [0, 1]; got {value}" in one_line(capsys)


def test_help_shows_the_max_prob_diff_default():
    text = get_args_parser().format_help()
    assert "--max-prob-diff" in text and "default 0.01 for the FP32" in " ".join(text.split())


# make-level parity labels ---------------------------------------------------------------------

MAKES = [
    {"make": c["make"], "model": "", "make_id": c["make_id"], "model_id": None} for c in CLASSES
]


def test_make_level_classes_are_found_by_make_name_and_id():
    """Make-level keys were 'Audi ' and 'Audi_', never 'Audi'."""
    index = class_name_index(MAKES)
    assert {k: index.get(k) for k in ("Audi", "BMW", "Citroen", "1", "2", "3")} == {
        "Audi": 0, "BMW": 1, "Citroen": 2, "1": 0, "2": 1, "3": 2,
    }  # fmt: skip
    assert "Audi " not in index and "Audi_" not in index


def test_make_folders_label_the_parity_images_of_a_make_level_bundle(tmp_path):
    root = write_images(tmp_path / "models", per_class=2)
    for c in CLASSES:  # folders named by make: Audi/ BMW/ Citroen/
        (root / c["model"]).rename(root / c["make"])
    spec = PreprocessSpec.for_image_size(IMAGE_SIZE)
    parity = image_dir_parity_set(root, MAKES, spec, limit=100)
    assert sorted(parity.labels.tolist()) == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize(
    ("threshold", "n", "allowed"),
    [
        (0.99, 256, 3),
        (0.99, 54, 1),
        (0.99, 49, 0),
        (0.995, 256, 1),
        (0.98, 54, 1),
        (0.999, 8, 0),
        (0.999, 1, 0),
        (1.0, 54, 0),
        (0.0, 10, 10),
    ],
)
def test_allowed_flips_is_the_share_rounded_to_the_nearest_image(threshold, n, allowed):
    from engine_build.parity import allowed_flips

    assert allowed_flips(threshold, n) == allowed


def test_a_small_parity_set_lets_one_image_flip_not_none():
    """0.99 on the 54 test images of a small split allowed no flip: one near-tie flip failed a
    build that 256 images would pass with two."""
    from engine_build.decode_parity import gate_gpu_decode

    def entry(same: int) -> dict:
        return {"n_images": 54, "top1_agreement": same / 54, "device": "cuda"}

    one, two = entry(53), entry(52)
    assert gate_gpu_decode(one, 0.99) == [] and one["gate"]["allowed_flips"] == 1
    (failure,) = gate_gpu_decode(two, 0.99)
    assert "at most 1 may flip" in failure and not two["gate"]["passed"]
