"""Class-imbalance handling: weighted sampling or class-balanced loss weights."""

from __future__ import annotations

import torch

MODES = ("none", "weighted-sampler", "class-balanced")


def class_balanced_weights(counts: list[int], beta: float = 0.999) -> torch.Tensor:
    """Effective-number weights (Cui et al., CVPR 2019): (1 - beta) / (1 - beta^n), mean 1."""
    n = torch.tensor(counts, dtype=torch.float64).clamp(min=1)
    w = (1 - beta) / (1 - beta**n)
    return (w / w.mean()).float()


def sample_weights(targets: list[int], counts: list[int]) -> torch.Tensor:
    """Per-sample weights 1/count(class): every class is drawn equally often in expectation."""
    inv = [1.0 / max(c, 1) for c in counts]
    return torch.tensor([inv[t] for t in targets], dtype=torch.double)
