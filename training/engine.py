"""One training epoch and one evaluation pass; every object they use is passed in.

Both take a ``stop`` Event (set by SIGTERM's handler, :func:`training.cli.stop_on_sigterm`) and
return early once it is set, between two batches: the caller ends the run as an interruption.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from training.datasets.base import DatasetError

NOTHING_DECODED = "none of the evaluation images could be decoded"


def split_batch(batch, unreadable: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, targets)`` of a loader batch; the images that did not decode (the third
    element that ``collate_skipping_unreadable`` adds) go to the ``unreadable`` tally."""
    images, targets, *rest = batch
    if rest and rest[0] and unreadable is not None:
        unreadable.add(rest[0])
    return images, targets


def step_agreement(n: int, stopping: bool, device: torch.device) -> tuple[int, bool]:
    """The smallest of this step's batch sizes over all ranks, and whether any rank was asked to
    stop (``(n, stopping)`` outside DDP): a batch one rank skips must be skipped by all, and a
    rank that stops alone would leave the others waiting in the next gradient all-reduce. One
    collective carries both."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return n, stopping
    t = torch.tensor([n, -int(stopping)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t[0].item()), bool(t[1].item() < 0)


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable,
    device: torch.device,
    epoch: int,
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
    ema: torch.optim.swa_utils.AveragedModel | None = None,
    channels_last: bool = False,
    progress: bool = False,
    writer: Any = None,
    global_step: int = 0,
    unreadable: Any = None,
    stop: threading.Event | None = None,
) -> dict[str, float]:
    """Train for one pass over ``loader``; the scheduler steps per iteration.

    A batch left with fewer than 2 images after unreadable ones were dropped is not trained on
    (BatchNorm needs 2), but the LR schedule still advances so it stays in step with the epoch.
    Once ``stop`` is set (on any rank, under DDP) it returns before the next step, with
    ``stopped`` 1.0 in its stats: the epoch is unfinished and must not be checkpointed.
    """
    model.train()
    use_amp = scaler is not None
    total_loss, correct, seen = 0.0, 0, 0
    stopped = False
    start = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not progress, leave=False)
    for batch in bar:
        images, targets = split_batch(batch, unreadable)
        smallest, stopped = step_agreement(
            targets.shape[0], stop is not None and stop.is_set(), device
        )
        if stopped:
            break
        if smallest < 2:
            if scheduler is not None:
                scheduler.step()
            global_step += 1
            continue
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            logits = model(images)
            loss = criterion(logits, targets)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss.item()} at epoch {epoch}; lower --lr, --head-lr-mult or the "
                "weight decay (--weight-decay, --norm-weight-decay, --bias-weight-decay)"
            )
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        n = targets.shape[0]
        total_loss += loss.item() * n
        correct += int((logits.argmax(1) == targets).sum())
        seen += n
        global_step += 1
        if writer is not None:
            writer.add_scalar("train/loss", loss.item(), global_step)
            writer.add_scalar("train/lr", optimizer.param_groups[-1]["lr"], global_step)
        bar.set_postfix(loss=f"{total_loss / seen:.3f}")
    seconds = time.perf_counter() - start
    return {
        "loss": total_loss / max(seen, 1),
        "acc": correct / max(seen, 1),
        "images": seen,
        "seconds": seconds,
        "images_per_s": seen / seconds if seconds > 0 else 0.0,
        "global_step": global_step,
        "stopped": float(stopped),
    }


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    *,
    amp: bool = False,
    channels_last: bool = False,
    progress: bool = False,
    unreadable: Any = None,
    allow_empty: bool = False,
    stop: threading.Event | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All logits (float32, CPU) and targets of ``loader``, model in eval mode; images that
    did not decode are left out (and handed to ``unreadable``). ``allow_empty``: a loader that
    yields no decodable image (one rank's shard of a small or damaged test set) gives empty
    tensors instead of an error, which only the whole test set can justify. Once ``stop`` is
    set it returns what it has (possibly nothing): the caller checks ``stop`` and discards it."""
    model.eval()
    all_logits, all_targets = [], []
    for batch in tqdm(loader, desc="eval", disable=not progress, leave=False):
        if stop is not None and stop.is_set():
            break
        images, targets = split_batch(batch, unreadable)
        if targets.shape[0] == 0:
            continue
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            logits = model(images)
        all_logits.append(logits.float().cpu())
        all_targets.append(targets)
    if not all_logits:
        if allow_empty or (stop is not None and stop.is_set()):
            return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
        raise DatasetError(NOTHING_DECODED)
    return torch.cat(all_logits), torch.cat(all_targets)
