"""compare's report: per-arch intervals, paired tests against the best arch on the same images,
the per-image predictions file, the labelled throughput, and rescoring a trained checkpoint."""

from __future__ import annotations

import argparse
import csv
import io
import json

import pytest
import torch
from torch import nn

from training.compare import (
    inference_throughput,
    markdown_table,
    paired_tests,
    predictions_csv,
    score_checkpoint,
    vs_best,
)
from training.datasets import load_index

CLASSES = [
    {"make": "Audi", "model": "A4L", "make_id": 2, "model_id": 10},
    {"make": "Audi", "model": "Q5", "make_id": 8, "model_id": 20},
]


def _scores(correct: dict[str, list[int]]) -> dict[str, dict]:
    n = len(next(iter(correct.values())))
    images = [f"/data/img{i}.jpg" for i in range(n)]
    targets = [i % 2 for i in range(n)]
    return {
        arch: {
            "images": images,
            "targets": targets,
            "preds": [t if c else 1 - t for t, c in zip(targets, cs, strict=True)],
            "correct": [bool(c) for c in cs],
            "top5_correct": [True] * n,
        }
        for arch, cs in correct.items()
    }


# 20 images: r50 right on 16, r18 on 10 (r50 alone on 7, r18 alone on 1), r34 on 15
R50 = [1] * 16 + [0] * 4
R18 = [1] * 9 + [0] * 7 + [1] + [0] * 3
R34 = [1] * 14 + [0] * 5 + [1]


def test_paired_tests_pick_the_best_and_orient_each_arch_against_it():
    tests = paired_tests(_scores({"r18": R18, "r34": R34, "r50": R50}))
    assert tests["best"] == "r50" and tests["num_images"] == 20
    assert {(p["a"], p["b"]) for p in tests["pairs"]} == {
        ("r18", "r34"), ("r18", "r50"), ("r34", "r50"),
    }  # fmt: skip
    assert vs_best(tests, "r50") is None
    v = vs_best(tests, "r18")
    assert v["diff"] == pytest.approx(10 / 20 - 16 / 20)
    assert (v["only_this_right"], v["only_best_right"]) == (1, 7)
    assert v["mcnemar_p"] == pytest.approx(2 * (1 + 8) / 2**8)  # 0.0703: 1 of 8 discordant
    assert v["significant"] is False
    assert v["diff_ci"][0] <= v["diff"] <= v["diff_ci"][1]
    v34 = vs_best(tests, "r34")
    assert (v34["only_this_right"], v34["only_best_right"]) == (1, 2)
    assert v34["mcnemar_p"] == pytest.approx(1.0)


def test_paired_tests_keep_the_first_arch_on_a_tie_and_refuse_unpaired_scores():
    assert paired_tests(_scores({"r18": R50, "r50": R50}))["best"] == "r18"
    scores = _scores({"r18": R18, "r50": R50})
    scores["r50"]["images"] = scores["r50"]["images"][::-1]
    with pytest.raises(RuntimeError, match="same images"):
        paired_tests(scores)


def _row(arch: str, top1: float, **extra) -> dict:
    return {
        "arch": arch, "top1": top1, "top1_ci": [top1 - 0.1, top1 + 0.1], "top5": 1.0,
        "top5_k": 2, "top5_informative": False, "make_top1": 1.0, "make_top1_by_id": top1,
        "train_seconds": 1.0, "params": 1e6, "gflops": 0.1, "inference_images_per_s": 10.0,
        **extra,
    }  # fmt: skip


def test_markdown_says_when_a_difference_is_not_significant():
    tests = paired_tests(_scores({"r18": R18, "r34": R34, "r50": R50}))
    rows = [_row(a, t, vs_best=vs_best(tests, a)) for a, t in (("r18", .5), ("r34", .75),
                                                                ("r50", .8))]  # fmt: skip
    md = markdown_table(rows, "# t")
    assert "| r18 | 0.500 [0.400, 0.600] | n/a (2 classes) |" in md
    assert "against the best top-1 (r50), on the same 20 test images" in md
    assert "| r18 | -0.300 |" in md and "**not significant**" in md
    assert "Not significantly different from r50 at 5%" in md and "r18, r34" in md
    assert "not corrected for 2 comparisons" in md


def test_markdown_reports_a_significant_difference_as_such():
    a = [1] * 12 + [0] * 8
    b = [1] * 20
    tests = paired_tests(_scores({"r18": a, "r50": b}))  # r50 alone right on 8: p = 2/256
    rows = [_row("r18", 0.6, vs_best=vs_best(tests, "r18")), _row("r50", 1.0, vs_best=None)]
    md = markdown_table(rows, "# t")
    assert "| r18 | -0.400 |" in md and "| 0.00781 | significant |" in md
    assert "not significant" not in md
    # one arch alone: no paired section
    assert "Paired tests" not in markdown_table([_row("r50", 1.0, vs_best=None)], "# t")


def test_predictions_csv_has_one_row_per_image_and_every_arch():
    scores = _scores({"r18": R18, "r50": R50})
    rows = list(csv.DictReader(io.StringIO(predictions_csv(scores, CLASSES).decode())))
    assert len(rows) == 20
    assert rows[0]["image"] == "/data/img0.jpg" and rows[1]["make"] == "Audi"
    assert rows[1]["model"] == "Q5"
    assert sum(int(r["r18_correct"]) for r in rows) == sum(R18)
    assert sum(int(r["r50_correct"]) for r in rows) == sum(R50)
    for r in rows:  # the correctness column agrees with the predicted class
        assert int(r["r18_correct"]) == (r["r18_pred"] == r["target"])


def test_inference_throughput_is_a_labelled_median_of_several_repeats():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    r = inference_throughput(model, 32, torch.device("cpu"), batch=4, repeats=3, iters=1)
    assert (r["backend"], r["precision"], r["device"]) == ("pytorch-eager", "fp32", "cpu")
    assert r["repeats"] == 3 and r["batch"] == 4 and r["warmup_batches"] >= 1
    assert 0 < r["images_per_s_min"] <= r["images_per_s"] <= r["images_per_s_max"]


def test_rescoring_a_checkpoint_reproduces_trainings_evaluation(trained, sample_root):
    index = load_index("compcars", sample_root, "test")
    args = argparse.Namespace(batch_size=16, workers=0, strict=False, no_amp=False)
    score = score_checkpoint(trained["out"], index, args, torch.device("cpu"))
    metrics = json.loads((trained["out"] / "metrics.json").read_text())
    assert score["images"] == [str(s.path) for s in index.samples]
    assert score["targets"] == [s.target for s in index.samples]
    assert sum(score["correct"]) / len(score["correct"]) == pytest.approx(metrics["top1"])
    assert score["metrics"]["make_top1"] == pytest.approx(metrics["make_top1"])
    assert score["metrics"]["top5"] == pytest.approx(metrics["top5"])
