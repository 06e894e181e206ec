"""Per-step LR schedule (linear warm-up, then cosine decay to ``min_factor``) and the EMA's
decay ramp."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

# an EMA forgets its starting weights by a factor e per 1 / (1 - decay) updates; a run shorter
# than this many such horizons averages over a large part of its own history
EMA_MIN_HORIZONS = 5.0


def warmup_cosine_factor(step: int, warmup: int, total: int, min_factor: float = 0.0) -> float:
    """LR factor of 0-based ``step``: (step + 1) / (warmup + 1) during the ``warmup`` steps, so
    the peak 1.0 is reached once, at step ``warmup``, where the cosine decay starts."""
    if warmup > 0 and step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    progress = min(max(progress, 0.0), 1.0)
    return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_factor: float = 0.0
) -> LambdaLR:
    return LambdaLR(
        optimizer, lambda s: warmup_cosine_factor(s, warmup_steps, total_steps, min_factor)
    )


def apply_schedule_lr(scheduler: LambdaLR) -> None:
    """Set every param group's LR to what ``scheduler``'s own lambdas give at its current step.

    After ``load_state_dict`` the optimizer still holds the LR the *saved* schedule computed for
    the next step; when the schedule changed (``--epochs`` on resume), that stale LR would drive
    one step. With an unchanged schedule this recomputes the same value bit for bit (the same
    expression as ``LambdaLR.get_lr``).
    """
    groups = scheduler.optimizer.param_groups
    for group, lmbda, base_lr in zip(groups, scheduler.lr_lambdas, scheduler.base_lrs, strict=True):
        group["lr"] = base_lr * lmbda(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]


def ema_decay_at(decay: float, updates: int) -> float:
    """The decay of an EMA update after ``updates`` earlier ones: ``min(decay, (1 + n) / (10 + n))``
    (TensorFlow's ExponentialMovingAverage with num_updates; timm's EMA warm-up does the same
    job), so early updates follow the fast-moving weights and the set decay applies only once
    about ``9 / (1 - decay)`` updates have been made."""
    return min(decay, (1 + updates) / (10 + updates))


def ema_too_short(decay: float, total_steps: int) -> bool:
    """Whether a run of ``total_steps`` updates spans fewer than ``EMA_MIN_HORIZONS`` of the
    EMA's horizons ``1 / (1 - decay)``: its EMA then averages much of the run (the ramp of
    :func:`ema_decay_at` keeps it off the first weights, but the set decay is barely reached)."""
    return decay > 0 and total_steps * (1 - decay) < EMA_MIN_HORIZONS
