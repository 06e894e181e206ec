"""A real CPU training run on the synthetic sample, its outputs, evaluate, and exact resume."""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from PIL import Image

from training.__main__ import main as cli_main
from training.checkpoint import load_checkpoint, model_from_checkpoint, preprocess_spec_of
from training.datasets import load_index
from training.preprocessing import PreprocessSpec, preprocess_image
from training.train import eval_loader
from training.transforms import EvalTransform

from .conftest import NUM_CLASSES, train_argv

METRIC_KEYS = {
    "top1", "top5", "balanced_accuracy", "make_top1", "num_classes", "num_train", "num_test",
    "skipped_missing", "per_class",
}  # fmt: skip


def test_learns_far_above_chance(trained):
    m = trained["metrics"]
    assert set(m) >= METRIC_KEYS
    assert m["num_classes"] == NUM_CLASSES
    assert m["top1"] > 3 * (1 / NUM_CLASSES), m["top1"]
    assert m["make_top1"] >= m["top1"]
    assert m["top5"] >= m["top1"]
    assert len(m["per_class"]) == NUM_CLASSES


def test_outputs_follow_the_contract(trained, sample_root):
    out = trained["out"]
    for name in ("checkpoint.pt", "labels.json", "metrics.json", "args.json",
                 "per_class_accuracy.png", "confused_pairs.png"):  # fmt: skip
        assert (out / name).is_file(), name
    assert any((out / "tb").iterdir())
    labels = json.loads((out / "labels.json").read_text())
    classes = load_index("compcars", sample_root, "train").classes
    assert [labels[str(i)] for i in range(len(labels))] == classes
    args = json.loads((out / "args.json").read_text())
    assert args["dataset"] == "compcars"
    assert load_index(args["dataset"], args["data_dir"], "test").samples
    assert args["pretrained_source"].startswith("none")


def test_checkpoint_loads_weights_only(trained):
    raw = torch.load(trained["out"] / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert raw["arch"] == "resnet18" and raw["epoch"] == 5
    for key in ("optimizer", "lr_scheduler", "rng", "preprocess", "args"):
        assert key in raw
    assert PreprocessSpec(**raw["preprocess"]) == PreprocessSpec.for_image_size(64)


def test_eval_preprocessing_is_preprocess_image(sample_root):
    spec = PreprocessSpec.for_image_size(64)
    idx = load_index("compcars", sample_root, "test")
    loader = eval_loader(idx, spec, argparse.Namespace(batch_size=4, workers=0))
    assert isinstance(loader.dataset.transform, EvalTransform)
    with Image.open(idx.samples[0].path) as img:
        expected = preprocess_image(img, spec)
    x, _ = loader.dataset[0]
    np.testing.assert_array_equal(x.numpy(), expected)


def test_evaluate_cli_reproduces_training_metrics(trained, sample_root, tmp_path):
    rc = cli_main([
        "evaluate", "--checkpoint", str(trained["out"]), "--data", str(sample_root),
        "--workers", "0", "--device", "cpu", "--out", str(tmp_path),
    ])  # fmt: skip
    assert rc == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert abs(m["top1"] - trained["metrics"]["top1"]) < 1e-6
    ckpt = load_checkpoint(trained["out"])
    model = model_from_checkpoint(ckpt)
    spec = preprocess_spec_of(ckpt)
    sample = load_index("compcars", sample_root, "test").samples[0]
    with Image.open(sample.path) as img:
        x = torch.from_numpy(preprocess_image(img, spec))[None]
    with torch.inference_mode():
        assert model(x).shape == (1, NUM_CLASSES)


def _evaluate(ckpt_dir, sample_root, out, *extra: str) -> dict:
    rc = cli_main([
        "evaluate", "--checkpoint", str(ckpt_dir), "--data", str(sample_root),
        "--workers", "0", "--device", "cpu", "--out", str(out), *extra,
    ])  # fmt: skip
    assert rc == 0
    return json.loads((out / "metrics.json").read_text())


def test_evaluate_uses_the_checkpoints_recorded_crop(trained, sample_root, tmp_path, caplog):
    raw = torch.load(trained["out"] / "checkpoint.pt", map_location="cpu", weights_only=True)
    raw["args"]["crop"] = "bbox"  # as if trained with --crop bbox
    bbox_ckpt = tmp_path / "bbox_ckpt"
    bbox_ckpt.mkdir()
    torch.save(raw, bbox_ckpt / "checkpoint.pt")

    default = _evaluate(bbox_ckpt, sample_root, tmp_path / "default")
    assert default["crop"] == default["checkpoint_crop"] == "bbox"
    explicit = _evaluate(bbox_ckpt, sample_root, tmp_path / "explicit", "--crop", "bbox")
    assert default["per_class"] == explicit["per_class"] and default["top1"] == explicit["top1"]
    assert not [r for r in caplog.records if r.levelname == "WARNING"]

    overridden = _evaluate(bbox_ckpt, sample_root, tmp_path / "full", "--crop", "full")
    assert overridden["crop"] == "full" and overridden["checkpoint_crop"] == "bbox"
    assert abs(overridden["top1"] - trained["metrics"]["top1"]) < 1e-6  # full-image pixels
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "trained with crop bbox" in warnings[0]


def test_resume_reproduces_uninterrupted_run(sample_root, tmp_path):
    common = ("--epochs", "2", "--eval-every", "0", "--seed", "7", "--ema-decay", "0.9")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert cli_main(train_argv(sample_root, straight, *common)) == 0
    assert cli_main(train_argv(sample_root, split, *common, "--stop-after", "1")) == 0
    assert load_checkpoint(split)["epoch"] == 0
    assert cli_main(train_argv(sample_root, split, *common, "--resume", str(split))) == 0
    a, b = load_checkpoint(straight), load_checkpoint(split)
    assert a["epoch"] == b["epoch"] == 1
    for key in ("state_dict", "ema_state_dict"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)


def test_compare_writes_table_json_and_plot(sample_root, tmp_path):
    argv = train_argv(sample_root, tmp_path, "--epochs", "1", "--eval-every", "0")
    argv = [
        "compare",
        "--archs",
        "resnet18",
        *[a for a in argv[1:] if a not in ("--arch", "resnet18")],
    ]
    assert cli_main(argv) == 0
    rows = json.loads((tmp_path / "compare.json").read_text())
    assert [r["arch"] for r in rows] == ["resnet18"]
    r = rows[0]
    assert r["params"] > 1e6 and r["gflops"] > 0 and r["inference_images_per_s"] > 0
    assert 0 <= r["top1"] <= 1 and (tmp_path / "resnet18" / "checkpoint.pt").is_file()
    assert "| resnet18 |" in (tmp_path / "compare.md").read_text()
    assert (tmp_path / "compare.png").stat().st_size > 0


def test_evaluate_model_checkpoint_at_make_level(trained, sample_root, tmp_path):
    models = _evaluate(trained["out"], sample_root, tmp_path / "model")
    makes = _evaluate(trained["out"], sample_root, tmp_path / "make", "--level", "make")
    assert models["level"] == "model" and makes["level"] == "make"
    assert makes["checkpoint_level"] == "model"
    make_classes = load_index("compcars", sample_root, "test", level="make").classes
    assert makes["num_classes"] == len(make_classes) < models["num_classes"]
    assert [(c["make"], c["model"]) for c in makes["per_class"]] == [
        (c["make"], c["model"]) for c in make_classes
    ]
    assert makes["top1"] == makes["make_top1"] == models["make_top1"]
    assert makes["num_test"] == models["num_test"]


def test_evaluate_make_checkpoint_at_model_level_is_refused(trained, sample_root, tmp_path):
    from .test_cli_errors import assert_one_line_error, run_cli

    raw = torch.load(trained["out"] / "checkpoint.pt", map_location="cpu", weights_only=True)
    raw["level"] = "make"
    (tmp_path / "make_ckpt").mkdir()
    torch.save(raw, tmp_path / "make_ckpt" / "checkpoint.pt")
    proc = run_cli(
        "evaluate", "--checkpoint", str(tmp_path / "make_ckpt"), "--data", str(sample_root),
        "--device", "cpu", "--level", "model",
    )  # fmt: skip
    assert_one_line_error(proc, "--level model")
