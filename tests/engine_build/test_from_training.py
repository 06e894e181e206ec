"""The real hand-over: `python -m training train` writes a checkpoint, `python -m engine_build`
builds a bundle from it with no --parity-data (the default held-out split must be found through
training's own reader), and the bundle matches the checkpoint's labels and preprocessing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine_build.bundle import load_bundle

REPO = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample")
    run("training", "make-sample", "--out", str(out), "--classes", "4", "--per-class", "10")
    return out


@pytest.mark.parametrize("level", ["model", "make"])
def test_bundle_from_a_trained_checkpoint_passes_parity_on_the_held_out_split(
    sample, tmp_path, level
):
    ckpt, bundle_dir = tmp_path / "ckpt", tmp_path / "bundle"
    run(
        "training",
        "train",
        "--dataset",
        "compcars",
        "--data",
        str(sample),
        "--out",
        str(ckpt),
        "--arch",
        "resnet18",
        "--image-size",
        "32",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--workers",
        "0",
        "--pretrained",
        "none",
        "--level",
        level,
        "--crop",
        "bbox",
    )
    run(
        "engine_build",
        "--checkpoint",
        str(ckpt),
        "--out",
        str(bundle_dir),
        "--precision",
        "fp32",
        "--max-batch",
        "8",
        "--threads",
        "1",
    )
    bundle = load_bundle(bundle_dir)
    labels = json.loads((ckpt / "labels.json").read_text())
    assert [(lab.make, lab.model) for lab in bundle.manifest.labels] == [
        (labels[str(i)]["make"], labels[str(i)]["model"]) for i in range(len(labels))
    ]
    ckpt_args = json.loads((ckpt / "args.json").read_text())
    assert bundle.manifest.preprocess.crop == ckpt_args["image_size"] == 32
    assert bundle.manifest.level == level

    parity = json.loads((bundle_dir / "parity.json").read_text())
    fp32 = parity["artifacts"]["onnxruntime-fp32"]
    assert fp32["n_images"] > 0 and fp32["n_labelled"] == fp32["n_images"]
    assert fp32["top1_agreement"] >= 0.999
    assert "test split" in parity["parity_source"]
    assert f"level {level}" in parity["parity_source"] and "crop bbox" in parity["parity_source"]
    if level == "make":
        assert len(bundle.manifest.labels) < 4  # makes, not the 4 models


def test_held_out_classes_map_to_the_checkpoint_by_dataset_ids_not_names():
    from engine_build.heldout import class_key

    # one make name under two ids (a CompCars quirk) with the same model name: two classes
    a = {"make": "Audi", "model": "A4L", "make_id": 2, "model_id": 10}
    b = {"make": "Audi", "model": "A4L", "make_id": 8, "model_id": 40}
    assert class_key(a) != class_key(b)
    # a checkpoint from before labels were renamed still maps by its ids
    renamed = {**a, "make": "Audi (make 2)"}
    assert class_key(renamed) == class_key(a)
    # make level: no model id; folder data sets: no ids, names identify the class
    assert class_key({"make": "Audi", "model": "", "make_id": 2, "model_id": None}) != class_key(
        {"make": "Audi", "model": "", "make_id": 8, "model_id": None}
    )
    folder = {"make": "Audi", "model": "A4", "make_id": None, "model_id": None}
    assert class_key(folder) == class_key({**folder})
    assert class_key(folder) != class_key({**folder, "model": "A6"})


def test_a_moved_dataset_is_named_and_found_again_with_data(tmp_path_factory, tmp_path):
    # a container sees the dataset at its mount point, not at the training machine's path
    origin = tmp_path_factory.mktemp("trained_on")
    run("training", "make-sample", "--out", str(origin), "--classes", "3", "--per-class", "6")
    ckpt = tmp_path / "ckpt"
    run(
        "training", "train", "--dataset", "compcars", "--data", str(origin), "--out", str(ckpt),
        "--arch", "resnet18", "--image-size", "32", "--epochs", "1", "--batch-size", "8",
        "--workers", "0", "--pretrained", "none",
    )  # fmt: skip
    mounted = tmp_path / "mounted"
    origin.rename(mounted)
    build = [
        sys.executable, "-m", "engine_build", "--checkpoint", str(ckpt), "--precision", "fp32",
        "--max-batch", "4", "--threads", "1", "--out",
    ]  # fmt: skip

    lost = subprocess.run([*build, str(tmp_path / "b0")], capture_output=True, text=True, cwd=REPO)
    assert lost.returncode == 2 and "Traceback" not in lost.stderr
    assert f"{origin} is not on this machine: pass --data DIR" in lost.stderr

    run("engine_build", *build[3:], str(tmp_path / "b1"), "--data", str(mounted))
    parity = json.loads((tmp_path / "b1" / "parity.json").read_text())
    assert parity["parity_source"].startswith(f"compcars:{mounted} test split")

    both = subprocess.run(
        [*build, str(tmp_path / "b2"), "--data", str(mounted), "--parity-data", str(mounted)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    gone = subprocess.run(
        [*build, str(tmp_path / "b3"), "--data", str(tmp_path / "nowhere")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert gone.returncode == 2 and "--data " in gone.stderr and "not a directory" in gone.stderr
