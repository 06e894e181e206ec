"""Metrics by make name and by make id, top-5's k and chance levels, and the paired statistics
compare uses: pure functions, checked against values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.metrics import (
    classification_metrics,
    make_level_counts,
    mcnemar_exact,
    paired_bootstrap_diff_ci,
    paired_comparison,
    to_make_level,
    wilson_interval,
)

# one make name under two make ids, as in CompCars (and the sample's Audi, ids 2 and 8)
CLASSES = [
    {"make": "Audi", "model": "A4L", "make_id": 2, "model_id": 10},
    {"make": "Audi", "model": "Q5", "make_id": 8, "model_id": 20},
    {"make": "BMW", "model": "3", "make_id": 5, "model_id": 30},
    {"make": "BMW", "model": "5", "make_id": 5, "model_id": 31},
]


def _metrics(preds, targets, classes=CLASSES, train_counts=None):
    logits = torch.nn.functional.one_hot(torch.tensor(preds), len(classes)).float()
    return classification_metrics(logits, torch.tensor(targets), classes, train_counts)


def test_make_top1_counts_a_brand_by_its_name_and_keeps_the_by_id_figure():
    # A4L -> Q5 (same name, other id), A4L right, BMW 3 -> BMW 5 (same id), BMW 5 -> A4L
    m = _metrics(preds=[1, 0, 3, 0], targets=[0, 0, 2, 3])
    assert m["top1"] == pytest.approx(1 / 4)
    assert m["make_top1"] == pytest.approx(3 / 4)  # what the worker would report as right
    assert m["make_top1_by_id"] == pytest.approx(2 / 4)
    assert m["make_names_with_several_ids"] == {"Audi": [2, 8]}


def test_make_by_name_equals_by_id_where_every_name_has_one_id():
    classes = [dict(c, make=f"{c['make']}{c['make_id']}") for c in CLASSES]
    m = _metrics(preds=[1, 0, 3, 0], targets=[0, 0, 2, 3], classes=classes)
    assert m["make_top1"] == m["make_top1_by_id"] == pytest.approx(2 / 4)
    assert m["make_names_with_several_ids"] == {}


def test_make_level_reading_matches_by_id_and_by_name_figures():
    rng = np.random.default_rng(0)
    logits = torch.tensor(rng.normal(size=(200, 4)), dtype=torch.float32)
    targets = torch.tensor(rng.integers(0, 4, 200))
    models = classification_metrics(logits, targets, CLASSES)
    make_logits, make_targets, make_classes = to_make_level(logits, targets, CLASSES)
    makes = classification_metrics(make_logits, make_targets, make_classes)
    assert [c["make_id"] for c in make_classes] == [2, 8, 5]  # --level make's classes: by id
    assert makes["top1"] == pytest.approx(models["make_top1_by_id"])
    assert makes["make_top1"] == pytest.approx(models["make_top1"])
    assert models["make_top1"] > models["make_top1_by_id"]  # this draw confuses the two Audis


def test_top5_records_its_k_and_is_flagged_trivial_with_five_classes_or_fewer():
    m = _metrics(preds=[1, 0, 3, 0, 0], targets=[0, 0, 2, 3, 0], train_counts=[9, 1, 1, 1])
    assert m["top5"] == 1.0 and m["top5_k"] == 4 and m["top5_informative"] is False
    assert m["chance_top1"] == pytest.approx(1 / 4)
    assert m["chance_top5"] == 1.0
    assert m["majority_class_top1"] == pytest.approx(3 / 5)  # class 0 (most trained) is 3 of 5

    classes = [{"make": "M", "model": str(i), "make_id": 1, "model_id": i} for i in range(7)]
    logits = torch.arange(7.0).repeat(7, 1)  # ranks 6, 5, 4, 3, 2 on top for every image
    m = classification_metrics(logits, torch.arange(7), classes, [3] * 7)
    assert m["top5_k"] == 5 and m["top5_informative"] is True
    assert m["top5"] == pytest.approx(5 / 7)
    assert m["chance_top1"] == pytest.approx(1 / 7)
    assert m["chance_top5"] == pytest.approx(5 / 7)
    assert m["majority_class_top1"] == pytest.approx(1 / 7)  # a tie: the first class, 1 of 7


def test_majority_class_baseline_picks_its_class_by_the_training_counts():
    # the test split's most frequent class is 0 (3 of 5), but training saw class 1 the most:
    # always answering class 1 scores its 1 of 5, not the oracle's 3 of 5
    m = _metrics(preds=[0, 0, 0, 1, 2], targets=[0, 0, 0, 1, 2], train_counts=[10, 40, 10, 10])
    assert m["majority_class_top1"] == pytest.approx(1 / 5)
    # a class never seen in the test split: always answering it gets none right
    m = _metrics(preds=[0, 0], targets=[0, 0], train_counts=[1, 1, 1, 5])
    assert m["majority_class_top1"] == 0.0
    # without the training counts (a checkpoint from before they were kept) there is none
    assert _metrics(preds=[0, 0, 1], targets=[0, 0, 1])["majority_class_top1"] is None
    with pytest.raises(ValueError, match="3 train class counts for 4 classes"):
        _metrics(preds=[0], targets=[0], train_counts=[1, 2, 3])


def test_make_level_counts_sum_each_make_id_in_to_make_levels_order():
    logits = torch.zeros(1, 4)
    _, _, make_classes = to_make_level(logits, torch.tensor([0]), CLASSES)
    assert [c["make_id"] for c in make_classes] == [2, 8, 5]
    assert make_level_counts([4, 3, 2, 7], CLASSES) == [4, 3, 9]


@pytest.mark.parametrize(
    ("correct", "n", "lo", "hi"),
    [
        (3, 10, 0.10779, 0.60322),  # (p + z²/2n ∓ z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)
        (0, 10, 0.0, 0.27753),
        (10, 10, 0.72247, 1.0),
        (50, 100, 0.40383, 0.59617),
    ],
)
def test_wilson_interval_hand_values(correct, n, lo, hi):
    got = wilson_interval(correct, n)
    assert got == pytest.approx((lo, hi), abs=5e-5)


def test_wilson_interval_refuses_impossible_counts():
    with pytest.raises(ValueError):
        wilson_interval(0, 0)
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def _pairs(a_only: int, b_only: int, both: int, neither: int) -> tuple[list[bool], list[bool]]:
    a = [True] * a_only + [False] * b_only + [True] * both + [False] * neither
    b = [False] * a_only + [True] * b_only + [True] * both + [False] * neither
    return a, b


@pytest.mark.parametrize(
    ("a_only", "b_only", "p"),
    [
        (1, 6, 16 / 128),  # 2 * (C(7,0) + C(7,1)) / 2^7
        (0, 5, 2 / 32),  # 2 * (1/2)^5
        (6, 0, 2 / 64),
        (3, 3, 1.0),
        (0, 0, 1.0),  # no discordant image: no evidence of a difference
    ],
)
def test_mcnemar_exact_hand_values(a_only, b_only, p):
    for both, neither in ((0, 1), (40, 7)):  # concordant images do not change the test
        a, b = _pairs(a_only, b_only, both, neither)
        got = mcnemar_exact(a, b)
        assert (got["a_only"], got["b_only"]) == (a_only, b_only)
        assert got["p_value"] == pytest.approx(p)


def test_mcnemar_accepts_tensors_and_refuses_unpaired_input():
    a, b = _pairs(1, 6, 3, 2)
    assert mcnemar_exact(torch.tensor(a), torch.tensor(b))["p_value"] == pytest.approx(0.125)
    with pytest.raises(ValueError, match="not paired"):
        mcnemar_exact(a, b[:-1])


def test_paired_bootstrap_degenerate_cases_are_exact():
    a, b = _pairs(0, 0, 20, 10)
    assert paired_bootstrap_diff_ci(a, b) == (0.0, 0.0)  # identical: no difference at all
    a, b = _pairs(12, 0, 0, 0)
    assert paired_bootstrap_diff_ci(a, b) == (-1.0, -1.0)  # b is wrong wherever a is right
    # two images, d = (-1, +1): resampled means -1, 0, +1 with chances 1/4, 1/2, 1/4
    assert paired_bootstrap_diff_ci([True, False], [False, True]) == (-1.0, 1.0)


def test_paired_bootstrap_matches_index_resampling_and_is_seeded():
    rng = np.random.default_rng(1)
    a = rng.random(60) < 0.4
    b = rng.random(60) < 0.6
    ci = paired_bootstrap_diff_ci(a, b, resamples=20_000, seed=3)
    assert ci == paired_bootstrap_diff_ci(a, b, resamples=20_000, seed=3)  # reproducible
    idx = np.random.default_rng(7).integers(0, 60, (20_000, 60))  # the textbook resampling
    ref = np.quantile(b[idx].mean(1) - a[idx].mean(1), [0.025, 0.975])
    assert ci == pytest.approx(tuple(ref), abs=0.02)
    d = b.mean() - a.mean()
    assert ci[0] < d < ci[1]


def test_paired_comparison_direction_and_verdict():
    a, b = _pairs(0, 6, 10, 0)  # b right on 6 images a missed, never the other way
    r = paired_comparison(a, b)
    assert r["num_images"] == 16
    assert r["top1_a"] == pytest.approx(10 / 16) and r["top1_b"] == pytest.approx(1.0)
    assert r["diff"] == pytest.approx(6 / 16)
    assert (r["a_only"], r["b_only"]) == (0, 6)
    assert r["mcnemar_p"] == pytest.approx(2 / 64) and r["significant"] is True
    assert 0 < r["diff_ci"][0] <= r["diff"] <= r["diff_ci"][1]

    a, b = _pairs(4, 7, 20, 19)  # 3 images apart out of 50: not evidence of a difference
    r = paired_comparison(a, b)
    assert r["diff"] == pytest.approx(3 / 50)
    assert r["mcnemar_p"] > 0.05 and r["significant"] is False
    assert r["diff_ci"][0] < 0 < r["diff_ci"][1]
