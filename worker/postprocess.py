"""Logits -> what a result says: softmax, top-k labels, confidence status."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine_build.scores import softmax


@dataclass(frozen=True)
class Classified:
    index: int
    confidence: float
    top_k: list[tuple[int, float]]
    low_confidence: bool


def classify(logits: np.ndarray, top_k: int, min_confidence: float) -> list[Classified]:
    """One Classified per row; ties broken by the lower class index (stable argsort)."""
    if logits.ndim != 2 or not np.isfinite(logits).all():
        raise ValueError("logits must be a finite (N, C) array")
    probs = softmax(logits)
    k = min(top_k, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    out = []
    for row, idx in zip(probs, order, strict=True):
        top = [(int(i), float(row[i])) for i in idx]
        out.append(Classified(top[0][0], top[0][1], top, top[0][1] < min_confidence))
    return out
