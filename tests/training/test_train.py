"""A real CPU training run on the synthetic sample, its outputs, evaluate, and exact resume."""

from __future__ import annotations

import argparse
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from training import train as train_mod
from training.__main__ import main as cli_main
from training.checkpoint import load_checkpoint, model_from_checkpoint, preprocess_spec_of
from training.datasets import load_index
from training.preprocessing import PreprocessSpec, preprocess_image
from training.schedule import warmup_cosine_factor
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


def _majority_baseline(sample_root, level: str = "model") -> float:
    """Always answering the class with the most training images, scored on the test split."""
    train = load_index("compcars", sample_root, "train", level).class_counts()
    test = load_index("compcars", sample_root, "test", level).class_counts()
    return test[train.index(max(train))] / sum(test)


def test_checkpoint_loads_weights_only(trained, sample_root):
    raw = torch.load(trained["out"] / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert raw["arch"] == "resnet18" and raw["epoch"] == 5
    for key in ("optimizer", "lr_scheduler", "rng", "preprocess", "args"):
        assert key in raw
    assert raw["train_class_counts"] == load_index("compcars", sample_root, "train").class_counts()
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
    baseline = _majority_baseline(sample_root)
    assert m["majority_class_top1"] == trained["metrics"]["majority_class_top1"]
    assert m["majority_class_top1"] == pytest.approx(baseline)
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


def test_resume_reproduces_uninterrupted_run(sample_root, tmp_path, caplog):
    common = ("--epochs", "2", "--eval-every", "0", "--seed", "7", "--ema-decay", "0.9")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert cli_main(train_argv(sample_root, straight, *common)) == 0
    assert cli_main(train_argv(sample_root, split, *common, "--stop-after", "1")) == 0
    assert load_checkpoint(split)["epoch"] == 0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="training"):
        assert cli_main(train_argv(sample_root, split, *common, "--resume", str(split))) == 0
    logged = [r.getMessage() for r in caplog.records]
    assert any("resumed from" in m for m in logged), logged
    assert not [m for m in logged if "from scratch" in m], logged  # it resumed; it did not start
    a, b = load_checkpoint(straight), load_checkpoint(split)
    assert a["epoch"] == b["epoch"] == 1
    for key in ("state_dict", "ema_state_dict"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)


def test_resume_of_a_checkpoint_without_the_ema_count_continues_the_ramp(sample_root, tmp_path):
    """An older checkpoint lacks ``ema_n_averaged``: the EMA's ramp resumes at one update per
    step done (here exactly the count the uninterrupted run had), not at its start."""
    common = ("--image-size", "32", "--epochs", "2", "--eval-every", "0", "--ema-decay", "0.99")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert cli_main(train_argv(sample_root, straight, *common)) == 0
    assert cli_main(train_argv(sample_root, split, *common, "--stop-after", "1")) == 0
    raw = torch.load(split / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert raw["ema_n_averaged"] == raw["global_step"]
    del raw["ema_n_averaged"]
    torch.save(raw, split / "checkpoint.pt")
    assert cli_main(train_argv(sample_root, split, *common, "--resume", str(split))) == 0
    a, b = load_checkpoint(straight), load_checkpoint(split)
    assert a["ema_n_averaged"] == b["ema_n_averaged"] == a["global_step"]
    for name, tensor in a["ema_state_dict"].items():
        assert torch.equal(tensor, b["ema_state_dict"][name]), name


def test_compare_writes_table_json_and_plot(sample_root, tmp_path, capsys):
    argv = train_argv(sample_root, tmp_path, "--epochs", "1", "--eval-every", "0")
    argv = [
        "compare",
        "--archs",
        "resnet18",
        *[a for a in argv[1:] if a not in ("--arch", "resnet18")],
    ]
    assert cli_main(argv) == 0
    # compare's stdout is its table alone: train's summary line is the train command's
    assert capsys.readouterr().out == (tmp_path / "compare.md").read_text() + "\n"
    rows = json.loads((tmp_path / "compare.json").read_text())
    assert [r["arch"] for r in rows] == ["resnet18"]
    r = rows[0]
    assert r["params"] > 1e6 and r["gflops"] > 0 and r["inference_images_per_s"] > 0
    assert 0 <= r["top1"] <= 1 and (tmp_path / "resnet18" / "checkpoint.pt").is_file()
    assert "| resnet18 |" in (tmp_path / "compare.md").read_text()
    assert r["majority_class_top1"] == pytest.approx(_majority_baseline(sample_root))
    assert r["top1_ci"][0] <= r["top1"] <= r["top1_ci"][1] and r["vs_best"] is None
    assert r["inference"]["precision"] == "fp32" and r["inference"]["device"] == "cpu"
    lines = (tmp_path / "compare_predictions.csv").read_text().splitlines()
    assert len(lines) == 1 + r["num_test"]
    assert sum(int(x.split(",")[5]) for x in lines[1:]) == r["top1_correct"]
    assert json.loads((tmp_path / "compare_tests.json").read_text())["best"] == "resnet18"
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
    # make-level classes are make ids; make_top1 counts make names (one name, two ids: Audi)
    assert makes["top1"] == makes["make_top1_by_id"] == models["make_top1_by_id"]
    assert makes["make_top1"] == models["make_top1"] >= models["make_top1_by_id"]
    assert makes["num_test"] == models["num_test"]
    assert makes["majority_class_top1"] == pytest.approx(_majority_baseline(sample_root, "make"))


def test_evaluate_checkpoint_without_train_counts_leaves_the_baseline_out(
    trained, sample_root, tmp_path
):
    """A checkpoint from before train_class_counts still loads; its baseline is null, not the
    test split's own most frequent class (an oracle)."""
    raw = torch.load(trained["out"] / "checkpoint.pt", map_location="cpu", weights_only=True)
    del raw["train_class_counts"]
    (tmp_path / "old").mkdir()
    torch.save(raw, tmp_path / "old" / "checkpoint.pt")
    m = _evaluate(tmp_path / "old", sample_root, tmp_path / "out")
    assert m["majority_class_top1"] is None
    assert abs(m["top1"] - trained["metrics"]["top1"]) < 1e-6


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


def _truncate_a_test_image(root) -> str:
    """Cut a listed test image in half: its header passes the index, its pixels do not decode."""
    split = root / "data/train_test_split/classification/test.txt"
    for line in split.read_text().split():
        path = root / "data/image" / line
        if path.is_file():
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            return str(path)
    raise AssertionError("no test image in the sample")


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def short_ema_run(sample_root, tmp_path_factory) -> dict:
    """6 epochs (42 steps) with --ema-decay 0.999 and the class-balanced loss, on a copy of the
    sample whose first test image does not decode."""
    root = tmp_path_factory.mktemp("ema") / "sample"
    shutil.copytree(sample_root, root)
    bad = _truncate_a_test_image(root)
    out = root.parent / "ckpt"
    handler = _Records()
    logging.getLogger("training").addHandler(handler)
    try:
        rc = cli_main(train_argv(
            root, out, "--image-size", "32", "--epochs", "6", "--eval-every", "0",
            "--ema-decay", "0.999", "--imbalance", "class-balanced",
        ))  # fmt: skip
    finally:
        logging.getLogger("training").removeHandler(handler)
    assert rc == 0
    return {
        "out": out,
        "bad": bad,
        "warnings": handler.messages,
        "metrics": json.loads((out / "metrics.json").read_text()),
        "args": json.loads((out / "args.json").read_text()),
    }


def test_short_ema_run_is_far_above_chance(short_ema_run):
    m = short_ema_run["metrics"]
    assert m["ema"] is True and m["ema_decay"] == 0.999
    # without the decay ramp the EMA stayed near the first step's weights: top-1 at chance
    assert m["top1"] > 3 * (1 / NUM_CLASSES), m
    assert m["ema_top1"] == m["top1"]
    assert m["raw_top1"] > 3 * (1 / NUM_CLASSES), m
    steps = load_checkpoint(short_ema_run["out"])["global_step"]  # 42 on this sample
    warned = [w for w in short_ema_run["warnings"] if w.startswith("--ema-decay 0.999")]
    assert len(warned) == 1 and f"this run has only {steps}" in warned[0]


def test_num_test_counts_the_images_scored(short_ema_run):
    m = short_ema_run["metrics"]
    assert m["unreadable_images"] == [short_ema_run["bad"]]
    assert m["num_test"] == sum(c["support"] for c in m["per_class"])
    assert m["num_test"] == m["num_test_listed"] - 1


def test_args_record_the_class_balanced_loss(short_ema_run):
    args = short_ema_run["args"]
    assert args["imbalance"] == "class-balanced"
    assert "w[y]" in args["loss"] and "label_smoothing=0.1" in args["loss"]
    assert len(args["class_weights"]) == NUM_CLASSES
    assert sum(args["class_weights"]) == pytest.approx(NUM_CLASSES, abs=1e-4)


def test_resume_with_more_epochs_starts_on_the_new_schedule(sample_root, tmp_path, monkeypatch):
    """The first step after resuming with another --epochs uses the new schedule's LR, not the
    one the checkpoint's schedule had set."""
    first_lrs: list[list[float]] = []
    real = train_mod.train_one_epoch

    def recording(model, criterion, optimizer, *args, **kwargs):
        first_lrs.append([g["lr"] for g in optimizer.param_groups])
        return real(model, criterion, optimizer, *args, **kwargs)

    monkeypatch.setattr(train_mod, "train_one_epoch", recording)
    # no warm-up: the resumed step is on the cosine in both schedules (a one-epoch warm-up would
    # put it at the cosine's start, 1.0 in both)
    common = (
        "--image-size",
        "32",
        "--eval-every",
        "0",
        "--stop-after",
        "1",
        "--warmup-epochs",
        "0",
    )
    assert cli_main(train_argv(sample_root, tmp_path, "--epochs", "2", *common)) == 0
    steps = load_checkpoint(tmp_path)["global_step"]  # steps per epoch
    argv = train_argv(sample_root, tmp_path, "--epochs", "6", "--resume", str(tmp_path), *common)
    assert cli_main(argv) == 0
    lr = 0.001  # train_argv's --lr, --head-lr-mult 1
    assert first_lrs[0] == pytest.approx([lr, lr])
    old = lr * warmup_cosine_factor(steps, 0, 2 * steps)  # 0.5 lr: half-way through 2 epochs
    new = lr * warmup_cosine_factor(steps, 0, 6 * steps)  # ~0.93 lr: a sixth of the way
    assert new > 1.5 * old
    assert first_lrs[1] == pytest.approx([new, new])
