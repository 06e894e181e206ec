"""Pure classification metrics over logits and targets (no I/O, no model)."""

from __future__ import annotations

from typing import Any

import torch


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean per sample: is the target among the top ``k`` predictions."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return (top == targets[:, None]).any(dim=1)


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    idx = targets.long() * num_classes + preds.long()
    return torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes)


def make_keys(classes: list[dict[str, Any]]) -> list[Any]:
    """The make identity of each class (make_id, or the name where a reader has no ids)."""
    return [c.get("make_id") if c.get("make_id") is not None else c.get("make") for c in classes]


def classification_metrics(
    logits: torch.Tensor, targets: torch.Tensor, classes: list[dict[str, Any]]
) -> dict[str, Any]:
    """top1/top5/balanced accuracy/make top1/per-class accuracy/most confused pairs."""
    n = len(classes)
    if len(targets) == 0:
        raise ValueError("no samples to evaluate")
    preds = logits.argmax(dim=1)
    cm = confusion_matrix(preds, targets, n)
    support = cm.sum(dim=1)
    per_class_acc = torch.where(support > 0, cm.diag() / support.clamp(min=1), torch.nan)
    present = support > 0
    keys = make_keys(classes)
    key_id = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    make_of = torch.tensor([key_id[k] for k in keys])
    off = cm.clone()
    off.fill_diagonal_(0)
    flat = off.flatten()
    order = flat.argsort(descending=True)
    confused = [
        {"true": int(i // n), "pred": int(i % n), "count": int(flat[i])}
        for i in order[:10].tolist()
        if flat[i] > 0
    ]
    return {
        "top1": float((preds == targets).float().mean()),
        "top5": float(topk_correct(logits, targets, 5).float().mean()),
        "balanced_accuracy": float(per_class_acc[present].mean()),
        "make_top1": float((make_of[preds] == make_of[targets]).float().mean()),
        "num_test": len(targets),
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
    logit (so make top-1 is exactly ``make_top1``: the make of the predicted model), targets
    become their make, and the classes are the makes in order of first appearance."""
    keys = make_keys(classes)
    makes = list(dict.fromkeys(keys))
    pos = {k: i for i, k in enumerate(makes)}
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
