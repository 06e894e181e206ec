"""Pure classification metrics over logits and targets (no I/O, no model), and the statistics
that compare two classifiers scored on the same images."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

TOP_K = 5


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean per sample: is the target among the top ``k`` predictions (``k`` is clamped to
    the class count, where the answer is always true: see :func:`top5_k`)."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return (top == targets[:, None]).any(dim=1)


def top5_k(num_classes: int) -> int:
    """The k that ``top5`` really uses: 5, or the class count when there are fewer classes.
    Where it is the class count (5 classes or fewer), top-5 is 1.0 for any model."""
    return min(TOP_K, num_classes)


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    idx = targets.long() * num_classes + preds.long()
    return torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def make_keys(classes: list[dict[str, Any]]) -> list[Any]:
    """The make identity of each class (make_id, or the name where a reader has no ids)."""
    return [c.get("make_id") if c.get("make_id") is not None else c.get("make") for c in classes]


def make_names(classes: list[dict[str, Any]]) -> list[str]:
    """The make name of each class: what the worker reports and the live trends count."""
    return [str(c.get("make", "")) for c in classes]


def _group_index(keys: list[Any]) -> torch.Tensor:
    pos = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    return torch.tensor([pos[k] for k in keys], dtype=torch.long)


def grouped_top1(preds: torch.Tensor, targets: torch.Tensor, keys: list[Any]) -> float:
    """Top-1 where a prediction counts as right when its class has the target's key."""
    group = _group_index(keys)
    return float((group[preds.long()] == group[targets.long()]).float().mean())


def names_with_several_ids(classes: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Make names used by more than one make id (CompCars has a few): name -> its ids."""
    ids: dict[str, list[Any]] = {}
    for name, key in zip(make_names(classes), make_keys(classes), strict=True):
        if key not in ids.setdefault(name, []):
            ids[name].append(key)
    return {n: v for n, v in ids.items() if len(v) > 1}


def majority_class_top1(support: torch.Tensor, train_counts: list[int] | None) -> float | None:
    """Top-1 of always answering the class most frequent in *training* (the first on a tie):
    picking it by the scored split's own counts would be an oracle no model can match. None
    without the training counts (a checkpoint written before they were recorded)."""
    if train_counts is None:
        return None
    if len(train_counts) != len(support):
        raise ValueError(f"{len(train_counts)} train class counts for {len(support)} classes")
    majority = max(range(len(train_counts)), key=train_counts.__getitem__)
    return float(support[majority]) / float(support.sum())


def make_positions(classes: list[dict[str, Any]]) -> tuple[list[Any], dict[Any, int]]:
    """Each class's make key, and each make's position at make level (order of first
    appearance): the one make order of :func:`to_make_level` and :func:`make_level_counts`."""
    keys = make_keys(classes)
    return keys, {k: i for i, k in enumerate(dict.fromkeys(keys))}


def make_level_counts(counts: list[int], classes: list[dict[str, Any]]) -> list[int]:
    """Per-class counts summed per make id, in :func:`to_make_level`'s class order."""
    keys, pos = make_positions(classes)
    out = [0] * len(pos)
    for key, count in zip(keys, counts, strict=True):
        out[pos[key]] += count
    return out


def classification_metrics(
    logits: torch.Tensor,
    targets: torch.Tensor,
    classes: list[dict[str, Any]],
    train_counts: list[int] | None = None,
) -> dict[str, Any]:
    """top1/top5/balanced accuracy/make top1/per-class accuracy/most confused pairs.

    ``make_top1`` counts a prediction right when its make *name* is the target's (what the
    worker reports and the trends count); ``make_top1_by_id`` when its make id is. They differ
    only where one name has several ids. ``top5`` uses ``top5_k`` = min(5, classes): with 5
    classes or fewer it is 1.0 for any model (``top5_informative`` false). Chance levels:
    ``chance_top1`` (1/classes), ``chance_top5`` (top5_k/classes) and ``majority_class_top1``
    (always answering the most frequent class of ``train_counts``, the training split's
    per-class image counts; None when they are not given).
    """
    n = len(classes)
    if len(targets) == 0:
        raise ValueError("no samples to evaluate")
    preds = logits.argmax(dim=1)
    cm = confusion_matrix(preds, targets, n)
    support = cm.sum(dim=1)
    per_class_acc = torch.where(support > 0, cm.diag() / support.clamp(min=1), torch.nan)
    present = support > 0
    off = cm.clone()
    off.fill_diagonal_(0)
    flat = off.flatten()
    order = flat.argsort(descending=True)
    confused = [
        {"true": int(i // n), "pred": int(i % n), "count": int(flat[i])}
        for i in order[:10].tolist()
        if flat[i] > 0
    ]
    k = top5_k(n)
    return {
        "top1": float((preds == targets).float().mean()),
        "top5": float(topk_correct(logits, targets, TOP_K).float().mean()),
        "top5_k": k,
        "top5_informative": n > TOP_K,
        "balanced_accuracy": float(per_class_acc[present].mean()),
        "make_top1": grouped_top1(preds, targets, make_names(classes)),
        "make_top1_by_id": grouped_top1(preds, targets, make_keys(classes)),
        "make_names_with_several_ids": names_with_several_ids(classes),
        "num_test": len(targets),
        "chance_top1": 1.0 / n,
        "chance_top5": k / n,
        "majority_class_top1": majority_class_top1(support, train_counts),
        "per_class": [
            {
                "index": i,
                "make": classes[i]["make"],
                "model": classes[i]["model"],
                "support": int(support[i]),
                "accuracy": None if not present[i] else float(per_class_acc[i]),
            }
            for i in range(n)
        ],
        "confused_pairs": confused,
    }


def to_make_level(
    logits: torch.Tensor, targets: torch.Tensor, classes: list[dict[str, Any]]
) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]:
    """A model-level classifier's output read at make level: each make scores its best model's
    logit (so make top-1 is exactly ``make_top1_by_id``: the make id of the predicted model),
    targets become their make, and the classes are the makes (by id, as ``--level make``
    builds them) in order of first appearance."""
    keys, pos = make_positions(classes)
    makes = list(pos)
    make_of = torch.tensor([pos[k] for k in keys], dtype=torch.long)
    make_logits = torch.full((logits.shape[0], len(makes)), -torch.inf, dtype=logits.dtype)
    make_logits.scatter_reduce_(1, make_of.expand(logits.shape[0], -1), logits, reduce="amax")
    first = {}
    for k, c in zip(keys, classes, strict=True):
        first.setdefault(k, c)
    make_classes = [
        {"make": c["make"], "model": "", "make_id": c.get("make_id"), "model_id": None}
        for c in (first[k] for k in makes)
    ]
    return make_logits, make_of[targets.long()], make_classes


# ---- comparing classifiers scored on the same images ---------------------------------------


def wilson_interval(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``correct / n`` (sound near 0 and 1 and for small
    n, unlike the normal approximation)."""
    if n <= 0:
        raise ValueError("n must be positive")
    if not 0 <= correct <= n:
        raise ValueError(f"correct={correct} is not within 0..{n}")
    from scipy.stats import norm  # ~1 s to import: only where a statistic needs it

    z = float(norm.ppf(0.5 + confidence / 2))
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _as_bool(x: Any) -> np.ndarray:
    return np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x).astype(bool).ravel()


def _paired(a_correct: Any, b_correct: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_bool(a_correct), _as_bool(b_correct)
    if a.shape != b.shape:
        raise ValueError(f"not paired: {a.size} vs {b.size} images")
    if a.size == 0:
        raise ValueError("no images")
    return a, b


def mcnemar_exact(a_correct: Any, b_correct: Any) -> dict[str, Any]:
    """Exact McNemar test of two classifiers' per-image correctness on the same images: a
    two-sided binomial test (p = 1/2) on the discordant pairs. ``a_only``: images only a got
    right; ``b_only``: only b. With no discordant pair the p-value is 1."""
    a, b = _paired(a_correct, b_correct)
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    discordant = a_only + b_only
    from scipy.stats import binomtest

    p = 1.0 if discordant == 0 else float(binomtest(a_only, discordant, 0.5).pvalue)
    return {"a_only": a_only, "b_only": b_only, "p_value": min(1.0, p)}


def paired_bootstrap_diff_ci(
    a_correct: Any,
    b_correct: Any,
    resamples: int = 10_000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile paired-bootstrap interval of top1(b) - top1(a): images are resampled with
    replacement, the same draw for both. The per-image difference takes only the values
    +1 / 0 / -1, so one resample's counts of them are a multinomial draw (exactly the same
    distribution as resampling indices, in O(resamples) memory for any number of images)."""
    a, b = _paired(a_correct, b_correct)
    n = a.size
    counts = np.array([(~a & b).sum(), (a == b).sum(), (a & ~b).sum()], dtype=float)
    draws = np.random.default_rng(seed).multinomial(n, counts / n, size=resamples)
    diffs = (draws[:, 0] - draws[:, 2]) / n
    lo, hi = np.quantile(diffs, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi)


def paired_comparison(
    a_correct: Any,
    b_correct: Any,
    alpha: float = 0.05,
    resamples: int = 10_000,
    seed: int = 0,
) -> dict[str, Any]:
    """b against a on the same images: top-1 of each, the difference b - a, its paired-bootstrap
    (1 - alpha) interval, the exact McNemar p-value and whether p < alpha (``significant``)."""
    a, b = _paired(a_correct, b_correct)
    test = mcnemar_exact(a, b)
    lo, hi = paired_bootstrap_diff_ci(a, b, resamples, seed, 1 - alpha)
    return {
        "num_images": int(a.size),
        "top1_a": float(a.mean()),
        "top1_b": float(b.mean()),
        "diff": float(b.mean() - a.mean()),
        "diff_ci": [lo, hi],
        "a_only": test["a_only"],
        "b_only": test["b_only"],
        "mcnemar_p": test["p_value"],
        "significant": test["p_value"] < alpha,
    }
