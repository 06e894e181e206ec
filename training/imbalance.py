"""Class-imbalance handling: weighted sampling or class-balanced loss weights."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.data import Sampler

MODES = ("none", "weighted-sampler", "class-balanced")


def class_balanced_weights(counts: list[int], beta: float = 0.999) -> torch.Tensor:
    """Effective-number weights (Cui et al., CVPR 2019): (1 - beta) / (1 - beta^n), mean 1 over
    the classes that have training images (they sum to that class count, as in the paper);
    :class:`ClassBalancedLoss` applies them.

    A class with no training image gets weight 0 and is left out of the mean: no sample ever
    carries it, and counting it (as n=1, the largest weight of all) would shrink every real
    class's weight and so silently scale the whole loss down.
    """
    n = torch.tensor(counts, dtype=torch.float64)
    present = n > 0
    w = torch.zeros_like(n)
    w[present] = (1 - beta) / (1 - beta ** n[present])
    if present.any():
        w[present] /= w[present].mean()
    return w.float()


class ClassBalancedLoss(nn.Module):
    """Class-balanced cross-entropy of Cui et al. (CVPR 2019): each sample's loss, label smoothing
    included, is scaled by its true class's weight ``w[y]`` and the batch takes the plain mean.

    ``nn.CrossEntropyLoss(weight=w, label_smoothing=eps)`` is not this: it weights each class's
    smoothing term by that class's own ``w_c`` (pulling every image towards the rare classes) and
    divides by the batch's sum of ``w[y]`` rather than its size (a batch of common-class images
    gets full-size gradients, undoing the down-weighting).
    """

    def __init__(self, weight: torch.Tensor, label_smoothing: float = 0.0):
        super().__init__()
        self.register_buffer("weight", torch.as_tensor(weight, dtype=torch.float32))
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per_sample = nn.functional.cross_entropy(
            logits, target, label_smoothing=self.label_smoothing, reduction="none"
        )
        return (self.weight[target].to(per_sample.dtype) * per_sample).mean()

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}, weight={self.weight.tolist()}"


def sample_weights(targets: list[int], counts: list[int]) -> torch.Tensor:
    """Per-sample weights 1/count(class): every class that has training images is drawn equally
    often in expectation (a class with none has no sample to weight, so it takes no share)."""
    inv = [1.0 / c if c > 0 else 0.0 for c in counts]
    return torch.tensor([inv[t] for t in targets], dtype=torch.double)


class DistributedWeightedSampler(Sampler[int]):
    """Weighted sampling with replacement under DDP: each rank takes its share of one draw.

    Every rank draws the same ``len(weights)`` (rounded down to a multiple of ``num_replicas``)
    indices from a generator seeded by (seed, epoch) and keeps every ``num_replicas``-th one
    from position ``rank``, so together the ranks see exactly one weighted epoch, as a single
    process's WeightedRandomSampler would, without talking to each other. Call
    :meth:`set_epoch` each epoch (as with DistributedSampler) for a fresh draw; rank and world
    size are explicit, so no process group is needed to build or test it.
    """

    def __init__(self, weights: torch.Tensor, num_replicas: int, rank: int, seed: int = 0):
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in a world of {num_replicas}")
        self.weights = torch.as_tensor(weights, dtype=torch.double)
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.num_samples = len(self.weights) // num_replicas  # drop_last, as DistributedSampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        # (seed, epoch) pairs never share a stream: seed 0 epoch 1 is not seed 1 epoch 0
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        total = self.num_samples * self.num_replicas
        if total == 0:  # fewer samples than ranks: every rank gets none, as DistributedSampler
            return iter([])
        drawn = torch.multinomial(self.weights, total, replacement=True, generator=gen)
        return iter(drawn[self.rank : total : self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples
