"""``train``: fine-tune a ResNet and write the checkpoint directory of DESIGN.md Stage 1.

Single process, or one process per GPU under ``torchrun`` (DDP; only rank 0 writes). Every epoch
ends with an atomic checkpoint holding optimizer, scheduler, scaler, EMA and RNG states, and each
epoch's shuffling comes from generators seeded by (seed, epoch) and its augmentation from ones
seeded by (seed, epoch, rank), so ``--resume`` continues exactly where the uninterrupted run would
be.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, RandomSampler, Sampler, WeightedRandomSampler
from torch.utils.data.dataloader import _BaseDataLoaderIter
from torch.utils.data.distributed import DistributedSampler

from training import plots
from training.checkpoint import (
    ARGS_FILE,
    CHECKPOINT_FILE,
    LABELS_FILE,
    METRICS_FILE,
    CheckpointError,
    atomic_write_json,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from training.cli import (
    BadArgumentError,
    Interrupted,
    StopRequested,
    check_out_dir,
    check_utf8_path,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    raise_if_stopped,
    seed_int,
    unit_float,
    usable_cpus,
)
from training.cli_errors import OneLineParser, path_arg
from training.cli_help import DefaultsHelpFormatter
from training.datasets import CROPS, LEVELS, READERS, DatasetError, DatasetIndex, load_index
from training.datasets.base import (
    CLASSES_NAMED,
    NEWLY_READ_SINCE,
    NEWLY_READ_SUFFIXES,
    message_line,
)
from training.datasets.folder import normal_class_name
from training.datasets.image_dataset import (
    ImageDataset,
    UnreadableImages,
    collate_skipping_unreadable,
)
from training.datasets.leakage import TrainTestDuplicates, find_train_test_duplicates
from training.datasets.splits import class_label
from training.distributed import (
    DistInfo,
    ShardSampler,
    all_gather,
    barrier,
    broadcast_weights,
    cleanup,
    from_main,
    gather_rows,
    init_distributed,
    refusal_from_main,
    shard_range,
)
from training.engine import NOTHING_DECODED, evaluate, train_one_epoch
from training.imbalance import (
    MODES,
    ClassBalancedLoss,
    DistributedWeightedSampler,
    class_balanced_weights,
    sample_weights,
)
from training.metrics import classification_metrics
from training.models import ARCHS, build_model, load_pretrained_backbone
from training.preprocessing import PreprocessSpec
from training.schedule import (
    EMA_MIN_HORIZONS,
    apply_schedule_lr,
    ema_decay_at,
    ema_too_short,
    warmup_cosine,
)
from training.transforms import EvalTransform, train_draft_size, train_transform

log = logging.getLogger(__name__)

MIN_IMAGE_SIZE = 32  # a ResNet downsamples 32x: smaller inputs leave nothing for the last stage
# 18x the usual 224 px: resnet50's first conv output alone is 1 GiB (fp32) per 4096 px image, and
# training keeps several such maps per image, so a larger size is an extra zero, not a plan
MAX_IMAGE_SIZE = 4096
# past these a run can only diverge or overflow (lr x head mult at 1e308 is inf in SGD's update)
MAX_LR = 10.0
MAX_HEAD_LR_MULT = 1000.0
MAX_BATCH_SIZE = 65_536
# a decay factor past 1 pulls every weight through zero each step (SGD: w -= lr * wd * w), and
# the run diverges with nothing to say which flag did it; usual values are 1e-4 (SGD) to 0.05
MAX_WEIGHT_DECAY = 1.0
DECAY_FLAGS = ("weight_decay", "norm_weight_decay", "bias_weight_decay")
# DataLoader forks this many processes per loader, each holding a copy of the data set's index:
# past a few dozen they only contend for the cores and the disk, and a typo forks without limit
MAX_LOADER_WORKERS = 64
LOCK_FILE = ".train.lock"
PLOT_FILES = ("per_class_accuracy.png", "confused_pairs.png")
TB_DIR = "tb"
# --leak-check: what to do about test images byte-identical to training images
LEAK_CHECKS = ("warn", "fail", "off")
LEAK_EXAMPLES = 3  # duplicate pairs a warning or error names
LEAK_RECORDED = 100  # duplicate pairs metrics.json lists
# every file a run writes into --out (the lock aside): what --overwrite removes of a previous run
RUN_FILES = (CHECKPOINT_FILE, LABELS_FILE, METRICS_FILE, ARGS_FILE, *PLOT_FILES)


def default_loader_workers() -> int:
    """Four loader processes, but never more than the CPUs this process may run on.

    More than that only oversubscribes the cores (PyTorch's DataLoader warns about it) and
    starves the main process that feeds the model.
    """
    return min(4, usable_cpus())


def loader_workers(text: str) -> int:
    """--workers: 0 (load in the main process) to ``MAX_LOADER_WORKERS``."""
    value = non_negative_int(text)
    if value > MAX_LOADER_WORKERS:
        raise argparse.ArgumentTypeError(f"{text!r} must be <= {MAX_LOADER_WORKERS}")
    return value


def add_data_args(
    parser: argparse.ArgumentParser,
    crop_default: str | None = "full",
    crop_help: str = "bbox: crop to label box",
    level_default: str | None = "model",
    level_help: str = "classify models or makes",
) -> None:
    """Flags that say which data set to read; shared with evaluate and compare (evaluate passes
    ``crop_default=None`` so the checkpoint's recorded crop applies unless --crop is given)."""
    parser.add_argument("--dataset", choices=list(READERS), default="compcars", help="layout")
    parser.add_argument("--data", type=path_arg, required=True, help="data directory")
    parser.add_argument("--level", choices=LEVELS, default=level_default, help=level_help)
    parser.add_argument("--crop", choices=CROPS, default=crop_default, help=crop_help)
    parser.add_argument("--strict", action="store_true", help="fail on a corrupt image")
    parser.add_argument(
        "--workers",
        type=loader_workers,
        default=default_loader_workers(),
        help=f"loader processes, 0..{MAX_LOADER_WORKERS} (default: 4, or the CPUs this process "
        "may use if fewer: %(default)s here)",
    )
    parser.add_argument("--batch-size", type=positive_int, default=64, help="per process")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")


def add_train_args(parser: argparse.ArgumentParser) -> None:
    """Flags of one training run; shared with compare."""
    parser.add_argument(
        "--image-size",
        type=positive_int,
        default=224,
        help=f"crop size in px, {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} (beyond {MAX_IMAGE_SIZE} one "
        "image's activations take GiBs: a typo, not a plan)",
    )
    parser.add_argument("--epochs", type=positive_int, default=30, help="total epochs")
    parser.add_argument("--opt", choices=("sgd", "adamw"), default="sgd", help="optimizer")
    parser.add_argument(
        "--lr", type=positive_float, default=0.01, help=f"backbone LR, at most {MAX_LR:g}"
    )
    parser.add_argument(
        "--head-lr-mult",
        type=positive_float,
        default=10.0,
        help=f"head LR factor, at most {MAX_HEAD_LR_MULT:g}",
    )
    parser.add_argument(
        "--momentum", type=unit_float, default=0.9, help="SGD momentum (Nesterov when above 0)"
    )
    parser.add_argument(
        "--weight-decay",
        type=non_negative_float,
        default=1e-4,
        help=f"weight decay, at most {MAX_WEIGHT_DECAY:g}",
    )
    parser.add_argument(
        "--norm-weight-decay",
        type=non_negative_float,
        help="weight decay of normalization layers' weights and biases, at most "
        f"{MAX_WEIGHT_DECAY:g} (default: --weight-decay)",
    )
    parser.add_argument(
        "--bias-weight-decay",
        type=non_negative_float,
        help="weight decay of every bias, a normalization layer's too, at most "
        f"{MAX_WEIGHT_DECAY:g} (default: --weight-decay)",
    )
    parser.add_argument(
        "--warmup-epochs", type=non_negative_float, default=1.0, help="linear warm-up"
    )
    parser.add_argument("--label-smoothing", type=unit_float, default=0.1, help="CE smoothing")
    parser.add_argument("--imbalance", choices=MODES, default="none", help="imbalance handling")
    parser.add_argument("--cb-beta", type=unit_float, default=0.999, help="class-balanced beta")
    parser.add_argument("--ema-decay", type=unit_float, default=0.0, help="EMA decay; 0 = off")
    parser.add_argument(
        "--pretrained",
        default="imagenet",
        help="imagenet, none, a state_dict or checkpoint file, or a checkpoint directory",
    )
    parser.add_argument("--seed", type=seed_int, default=0, help="random seed")
    parser.add_argument("--no-amp", action="store_true", help="disable AMP on CUDA")
    parser.add_argument("--eval-every", type=non_negative_int, default=1, help="0 = only at end")
    parser.add_argument(
        "--leak-check",
        choices=LEAK_CHECKS,
        default="warn",
        help="test images whose bytes equal a training image's (exact duplicates in both "
        "splits): warn and count them in metrics.json, fail (exit 2), or off (no check; it "
        "reads only files whose size matches a file in the other split)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a checkpoint already in --out (without it, only --resume may write there)",
    )


def get_args_parser(add_parser=None, name: str = "train") -> argparse.ArgumentParser:
    kwargs = {
        "description": "Fine-tune a torchvision ResNet on CompCars, CompCars-sv or a folder tree.",
        "formatter_class": DefaultsHelpFormatter,
    }
    parser = (
        add_parser(name, help="fine-tune a classifier", **kwargs)
        if add_parser
        else OneLineParser(prog=f"python -m training {name}", **kwargs)
    )
    add_data_args(parser)
    parser.add_argument("--out", type=path_arg, required=True, help="checkpoint directory")
    parser.add_argument("--arch", choices=list(ARCHS), default="resnet50", help="architecture")
    add_train_args(parser)
    parser.add_argument("--resume", type=path_arg, help="checkpoint directory to continue from")
    parser.add_argument(
        "--stop-after", type=positive_int, help="stop after this many epochs in this invocation"
    )
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser


def resolve_device(name: str, dist_info: DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BadArgumentError(f"--device {name}: CUDA is not available")
        return (
            torch.device("cuda", dist_info.local_rank) if dist_info.enabled else torch.device(name)
        )
    if name != "cpu":
        raise BadArgumentError(f"--device {name!r}: use auto, cpu, cuda or cuda:N")
    return torch.device("cpu")


def check_train_test_leak(
    train_idx: DatasetIndex, test_idx: DatasetIndex, mode: str
) -> TrainTestDuplicates | None:
    """Find test images byte-identical to training images (``--leak-check``): None when
    ``off``; with ``fail`` a DatasetError naming a few pairs; with ``warn`` one warning (under
    DDP only rank 0 checks: :func:`load_checked_data`). Such an image is scored as unseen though
    trained on."""
    if mode == "off":
        return None
    found = find_train_test_duplicates(
        (s.path for s in train_idx.samples), (s.path for s in test_idx.samples)
    )
    if not found.count:
        return found
    shown = "; ".join(f"{test} = {train}" for train, test in found.pairs[:LEAK_EXAMPLES])
    more = f" and {found.count - LEAK_EXAMPLES} more" if found.count > LEAK_EXAMPLES else ""
    message = (
        f"{train_idx.source}: {found.count} of {len(test_idx.samples)} held-out images (the split "
        f"scored as the test set) are byte-identical to a training image, so the test score "
        f"counts images the model trained on (held-out = train): {shown}{more}"
    )
    if mode == "fail":
        raise DatasetError(f"{message}; remove one copy of each, or pass --leak-check warn")
    log.warning("%s; --leak-check fail makes this an error", message)
    return found


def describe_leak(found: TrainTestDuplicates | None) -> dict[str, Any]:
    """The check's result as metrics.json records it (null count: the check was off)."""
    if found is None:
        return {"train_test_duplicates": None, "train_test_duplicate_pairs": []}
    return {
        "train_test_duplicates": found.count,
        "train_test_duplicate_pairs": [
            {"train": str(train), "test": str(test)} for train, test in found.pairs[:LEAK_RECORDED]
        ],
    }


@dataclass(frozen=True)
class CheckedData:
    """The training and held-out splits, loaded and leak-checked (``--leak-check``): what a run
    needs before it may touch --out. ``compare`` loads them once, before its --overwrite removes
    anything, and hands them to every arch's run."""

    train: DatasetIndex
    test: DatasetIndex
    duplicates: TrainTestDuplicates | None  # None: the check was off


def load_checked_data(
    args: argparse.Namespace, dist_info: DistInfo, stop: threading.Event | None = None
) -> CheckedData:
    """Both splits and the leak check. Under DDP only rank 0 reads the files for the check and
    the others take its result (or its refusal, with ``fail``), so every rank stops alike."""
    train_idx, test_idx = load_splits(args)
    if not dist_info.enabled:  # under DDP the first step's agreement takes it, on every rank
        raise_if_stopped(stop)
    mode = getattr(args, "leak_check", "warn")
    duplicates, refusal = None, None
    if dist_info.is_main:
        try:
            duplicates = check_train_test_leak(train_idx, test_idx, mode)
        except DatasetError as exc:
            refusal = str(exc)
    refusal, duplicates = from_main(dist_info, (refusal, duplicates))
    if refusal is not None:
        raise DatasetError(refusal)
    return CheckedData(train_idx, test_idx, duplicates)


def load_splits(args: argparse.Namespace) -> tuple[DatasetIndex, DatasetIndex]:
    train_idx = load_index(args.dataset, args.data, "train", args.level, args.crop, args.strict)
    test_idx = load_index(args.dataset, args.data, "test", args.level, args.crop, args.strict)
    if not train_idx.samples:
        raise DatasetError(f"{args.data}: no training images found")
    if not test_idx.samples:
        raise DatasetError(f"{args.data}: no test images found")
    check_two_classes(train_idx, args.dataset, args.level)
    return train_idx, test_idx


MIN_CLASSES = 2  # one class trains to a top-1 of 1.0 that says nothing


def check_two_classes(idx: DatasetIndex, dataset: str, level: str) -> None:
    """Refuse a data set of one class: it "trains" to top-1 1.0 with chance 1.0, and the model
    can only ever answer that class. For a folder tree that is most often --data one level too
    deep or too high (a CompCars root reads as the one class data/image), so say what it wants."""
    if idx.num_classes >= MIN_CLASSES:
        return
    unit = "make" if level == "make" else "class"
    (cls,) = idx.classes
    if dataset == "folder":
        name = "/".join(dict.fromkeys(str(v) for v in (cls["make_id"], cls["model_id"]) if v))
        raise DatasetError(
            f"{idx.source}: one {unit} found ({name}); training needs at least {MIN_CLASSES} "
            "(--dataset folder wants one folder per class under --data: <class>/*.jpg or "
            "<make>/<model>/*.jpg)"
        )
    raise DatasetError(
        f"{idx.source}: the split files name one {unit} ({class_label(cls)}); training needs "
        f"at least {MIN_CLASSES}"
    )


# the layers torchvision's reference counts as normalization for --norm-weight-decay
NORM_LAYERS = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
)
PARTS = ("backbone", "head")
KINDS = ("", "norm", "bias")  # "": every other parameter (conv and fc weights)


def param_groups(
    model: nn.Module,
    lr: float,
    head_mult: float,
    weight_decay: float = 0.0,
    norm_weight_decay: float | None = None,
    bias_weight_decay: float | None = None,
) -> list[dict[str, Any]]:
    """Backbone at ``lr``, the new head (``fc``) at ``lr * head_mult``; within each, the weights
    of normalization layers get ``norm_weight_decay`` and every bias ``bias_weight_decay``
    (None: ``weight_decay``; a given bias decay takes a normalization layer's bias too), as
    torchvision's reference does: decaying BatchNorm's scale and shift towards 0 fights the
    normalization.

    A kind whose decay equals ``weight_decay`` stays in its part's group, so the grouping
    follows from the recorded values alone and the default is the two groups [backbone, head]
    that optimizer states from before these flags hold (``--resume`` needs the same groups).
    Each group is named (``backbone``, ``backbone norm``, ``head bias``, ...) for the record.
    """
    norm_wd = weight_decay if norm_weight_decay is None else norm_weight_decay
    bias_wd = weight_decay if bias_weight_decay is None else bias_weight_decay
    decay = {"": weight_decay, "norm": norm_wd, "bias": bias_wd}
    buckets: dict[tuple[str, str], list[nn.Parameter]] = {
        (part, kind): [] for part in PARTS for kind in KINDS
    }
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            part = "head" if full.startswith("fc.") else "backbone"
            kind = ""  # torchvision's precedence: a given bias decay takes a norm layer's bias
            if name == "bias" and bias_weight_decay is not None:
                kind = "bias"
            elif isinstance(module, NORM_LAYERS) and norm_weight_decay is not None:
                kind = "norm"
            if decay[kind] == weight_decay:  # the same decay: no group of its own
                kind = ""
            buckets[part, kind].append(param)
    return [
        {
            "name": f"{part} {kind}".strip(),
            "params": params,
            "lr": lr * head_mult if part == "head" else lr,
            "weight_decay": decay[kind],
        }
        for (part, kind), params in buckets.items()
        if params or not kind  # the two plain groups always, as before the split
    ]


def optimizer_groups(model: nn.Module, args: argparse.Namespace) -> list[dict[str, Any]]:
    """:func:`param_groups` for this run's flags."""
    return param_groups(
        model,
        args.lr,
        args.head_lr_mult,
        args.weight_decay,
        args.norm_weight_decay,
        args.bias_weight_decay,
    )


def describe_param_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The optimizer's groups as recorded in args.json: name, LR, weight decay, tensor count."""
    return [
        {
            "name": g["name"],
            "lr": g["lr"],
            "weight_decay": g["weight_decay"],
            "tensors": len(g["params"]),
        }
        for g in groups
    ]


def build_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    # the names are for the record; the optimizer's state dict keeps its pre-split keys
    groups = [{k: v for k, v in g.items() if k != "name"} for g in optimizer_groups(model, args)]
    if args.opt == "adamw":
        return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    # Nesterov needs momentum: torch refuses nesterov=True with --momentum 0 (plain SGD then)
    return torch.optim.SGD(
        groups,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        nesterov=args.momentum > 0,
    )


def build_criterion(args: argparse.Namespace, counts: list[int]) -> nn.Module:
    """Cross-entropy with label smoothing; with ``--imbalance class-balanced`` each sample's loss
    is scaled by its true class's effective-number weight (:class:`ClassBalancedLoss`)."""
    if args.imbalance == "class-balanced":
        return ClassBalancedLoss(class_balanced_weights(counts, args.cb_beta), args.label_smoothing)
    return nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)


def describe_loss(criterion: nn.Module) -> dict[str, Any]:
    """The loss as recorded in args.json: its formula and, when class-balanced, the weights."""
    eps = criterion.label_smoothing
    if isinstance(criterion, ClassBalancedLoss):
        return {
            "loss": f"mean over the batch of w[y] * cross_entropy(label_smoothing={eps})",
            "class_weights": [round(w, 6) for w in criterion.weight.tolist()],
        }
    return {"loss": f"mean over the batch of cross_entropy(label_smoothing={eps})"}


class RampedEMA(AveragedModel):
    """EMA of the weights and buffers whose decay ramps up: update ``n`` (counted by
    ``n_averaged``, which the checkpoint keeps) uses ``ema_decay_at(decay, n)``, so a short run's
    EMA is not stuck near the first step's weights."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__(model, use_buffers=True)
        self.decay = decay

    def update_parameters(self, model: nn.Module) -> None:
        # n_averaged is a CPU buffer (the EMA is never moved as a whole): reading it does not
        # wait for the device
        decay = ema_decay_at(self.decay, int(self.n_averaged))
        self.multi_avg_fn = get_ema_multi_avg_fn(decay)
        super().update_parameters(model)


def warn_if_ema_too_short(decay: float, total_steps: int) -> None:
    if not ema_too_short(decay, total_steps):
        return
    horizon = 1 / (1 - decay)
    log.warning(
        "--ema-decay %g averages over ~%.0f steps, but this run has only %d (fewer than %g "
        "horizons): the decay ramps up as min(decay, (1+n)/(10+n)), reaching %g after ~%.0f "
        "updates, so the EMA weights average much of the run; --ema-decay %.4g or lower suits "
        "a run this short",
        decay,
        horizon,
        total_steps,
        EMA_MIN_HORIZONS,
        decay,
        (10 * decay - 1) / (1 - decay),
        max(0.0, 1 - EMA_MIN_HORIZONS / max(total_steps, 1)),
    )


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


def sampler_seed(seed: int, saved_args: dict[str, Any] | None = None, where: str = "") -> int:
    """The seed DistributedSampler gets; it shuffles epoch ``e`` with ``seed + e``.

    Given ``--seed`` itself, ``--seed 0`` epoch 1 would shuffle exactly as ``--seed 1`` epoch 0,
    so runs with adjacent seeds would share their orders; ``epoch_seed(seed, 0)`` makes each
    epoch's order ``epoch_seed(seed, epoch)``'s, distinct for runs under 100,003 epochs. A
    resumed run keeps the one its checkpoint records (``saved_args``), and a checkpoint from
    before it was recorded the seed itself, so its remaining epochs keep their orders.
    """
    if saved_args is None:
        return epoch_seed(seed, 0)
    recorded = saved_args.get("sampler_seed", seed)
    if not isinstance(recorded, int) or isinstance(recorded, bool) or not 0 <= recorded < 2**62:
        raise CheckpointError(f"{where}: its recorded sampler_seed {recorded!r} is not a seed")
    return recorded


def augment_seed(seed: int, epoch: int, dist_info: DistInfo) -> int:
    """This rank's augmentation seed for ``epoch``: ranks seeded alike would draw the same crops,
    flips and jitter. With one process it is ``epoch_seed``, and (seed, epoch, rank) triples of
    one world size never share a seed."""
    return epoch_seed(seed, epoch) * dist_info.world_size + dist_info.rank


def ignore_sigterm_in_worker(worker_id: int) -> None:
    """A DataLoader worker's init: SIGTERM sent to the whole process group (``kill -TERM
    -PGID``: Slurm's scancel, systemd) must not kill the workers, or the main process fails on
    the dead worker instead of ending at its next step as the interruption it is. The main
    process still ends them: its loader sends them their stop when it is deleted, and a worker
    whose parent is gone exits (torch's watchdog).

    The worker starts with SIGTERM blocked (:class:`SigtermSafeLoader`): torch installs its own
    SIGTERM handler, which dies of any SIGTERM not from the parent, before this runs, so a
    group's SIGTERM in between killed a new worker (seen under load in CI). Ignoring a blocked
    signal discards it if pending; only then is it unblocked."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


class SigtermSafeLoader(DataLoader):
    """A DataLoader whose worker processes start with SIGTERM blocked (inherited through fork,
    kept through exec) until :func:`ignore_sigterm_in_worker` ignores it. The main thread blocks
    it only while the workers are made: a SIGTERM to the process then reaches the stop handler
    as the block ends, or at once through another thread that does not block it."""

    def __iter__(self) -> _BaseDataLoaderIter:
        if self.num_workers == 0:
            return super().__iter__()
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            return super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def train_loader(
    dataset: ImageDataset,
    targets: list[int],
    counts: list[int],
    args: argparse.Namespace,
    epoch: int,
    dist_info: DistInfo,
    pin: bool,
    ddp_seed: int | None = None,
) -> DataLoader:
    """This epoch's loader; its order derives from (seed, epoch), its workers' seeds from (seed,
    epoch, rank): the DDP samplers split one shared draw, the augmentations differ per rank.
    ``ddp_seed``: DistributedSampler's seed (default ``sampler_seed(args.seed)``)."""
    gen = torch.Generator().manual_seed(augment_seed(args.seed, epoch, dist_info))
    sampler: Sampler[int]
    if dist_info.enabled and args.imbalance == "weighted-sampler":
        # this rank's share of one (seed, epoch)-seeded weighted draw over the whole data set
        sampler = DistributedWeightedSampler(
            sample_weights(targets, counts), dist_info.world_size, dist_info.rank, seed=args.seed
        )
        sampler.set_epoch(epoch)
    elif dist_info.enabled:
        sampler = DistributedSampler(
            dataset,
            num_replicas=dist_info.world_size,
            rank=dist_info.rank,
            seed=sampler_seed(args.seed) if ddp_seed is None else ddp_seed,
            drop_last=True,
        )
        sampler.set_epoch(epoch)
    elif args.imbalance == "weighted-sampler":
        w = sample_weights(targets, counts)
        sampler = WeightedRandomSampler(w, len(targets), replacement=True, generator=gen)
    else:
        sampler = RandomSampler(dataset, generator=gen)
    return SigtermSafeLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=args.workers,
        pin_memory=pin,
        drop_last=len(dataset) > args.batch_size * dist_info.world_size,
        generator=gen,
        collate_fn=collate_skipping_unreadable,
        worker_init_fn=ignore_sigterm_in_worker,
    )


def eval_loader(
    index: DatasetIndex,
    spec: PreprocessSpec,
    args: argparse.Namespace,
    dist_info: DistInfo | None = None,
) -> DataLoader:
    """The test set in order; under DDP (``dist_info``) only this rank's :func:`shard_range`."""
    dataset = ImageDataset(index.samples, EvalTransform(spec), draft_size=spec.resize)
    sampler = None
    if dist_info is not None and dist_info.enabled:
        shard = shard_range(len(dataset), dist_info.world_size, dist_info.rank, args.batch_size)
        sampler = ShardSampler(shard)
        log.info(
            "rank %d of %d evaluates test images %d..%d of %d",
            dist_info.rank,
            dist_info.world_size,
            shard.start,
            shard.stop,
            len(dataset),
        )
    return SigtermSafeLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=False,
        sampler=sampler,
        num_workers=args.workers,
        collate_fn=collate_skipping_unreadable,
        worker_init_fn=ignore_sigterm_in_worker,
    )


def evaluate_split(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    dist_info: DistInfo,
    *,
    amp: bool,
    channels_last: bool,
    unreadable: UnreadableImages,
    stop: threading.Event | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """All logits and targets of the test set (rank 0) or None (other ranks).

    Under DDP every rank scores its own shard (``eval_loader``'s) with rank 0's weights, and
    rank 0 gathers the shards in dataset order: exactly what one process would score, without
    N-1 idle GPUs or the others timing out in a barrier. Every rank's ``unreadable`` then holds
    all ranks' images, and a failure on one rank (--strict, nothing decodable) is raised on all,
    so none is left waiting in a collective. A ``stop`` set on any rank raises StopRequested on
    all, once they have gathered.
    """
    if not dist_info.enabled:
        scored = evaluate(
            model,
            loader,
            device,
            amp=amp,
            channels_last=channels_last,
            unreadable=unreadable,
            stop=stop,
        )
        raise_if_stopped(stop)
        return scored
    broadcast_weights(model, dist_info)
    error, logits, targets = None, torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    failed: Exception | None = None
    try:
        logits, targets = evaluate(
            model,
            loader,
            device,
            amp=amp,
            channels_last=channels_last,
            unreadable=unreadable,
            allow_empty=True,
            stop=stop,
        )
    except DatasetError as exc:  # --strict met an unreadable image in this rank's shard
        error = ("dataset", str(exc))
    except Exception as exc:  # out of memory, a killed loader worker: the others must hear of it
        failed = exc
        error = ("other", f"rank {dist_info.rank}: {exc!r}")
    width = logits.shape[1] if len(targets) else 0
    stopping = stop is not None and stop.is_set()
    status = all_gather((error, len(targets), width, dict(unreadable.paths), stopping), dist_info)
    for *_, paths, _ in status:
        unreadable.merge(paths)
    if failed is not None:
        raise failed
    if any(s[-1] for s in status):
        raise StopRequested
    errors = [e for e, *_ in status if e is not None]
    if errors:
        kind, message = errors[0]
        if kind == "dataset":
            raise DatasetError(message)
        raise RuntimeError(f"evaluation failed on {message}")
    counts = [n for _, n, _, _, _ in status]
    if sum(counts) == 0:
        raise DatasetError(NOTHING_DECODED)
    width = max(w for _, _, w, _, _ in status)  # a rank with no images has no logits to measure
    all_logits = gather_rows(logits.float(), counts, width, dist_info)
    all_targets = gather_rows(targets.reshape(-1, 1), counts, 1, dist_info)
    if all_logits is None or all_targets is None:
        return None
    return all_logits, all_targets.reshape(-1)


def recorded_args(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """The resolved arguments as plain JSON values (paths absolute)."""
    out = {k: (str(Path(v).resolve()) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    out.pop("command", None)
    out["data_dir"] = out["data"]
    out.update(extra)
    return out


def full_metrics(
    logits: torch.Tensor,
    targets: torch.Tensor,
    train_idx: DatasetIndex,
    test_idx: DatasetIndex,
    unreadable: UnreadableImages,
    duplicates: TrainTestDuplicates | None = None,
) -> dict[str, Any]:
    m = classification_metrics(logits, targets, test_idx.classes, train_idx.class_counts())
    return {
        **m,  # top1, top5 (+ its k), balanced accuracy, make top1 by name and by id, chance
        "num_classes": test_idx.num_classes,
        "num_train": len(train_idx.samples),
        "num_test": len(targets),  # the images scored: listed ones that decoded
        "num_test_listed": len(test_idx.samples),
        "skipped_missing": train_idx.skipped_missing + test_idx.skipped_missing,
        "skipped_missing_train": train_idx.skipped_missing,
        "skipped_missing_test": test_idx.skipped_missing,
        "skipped_corrupt": train_idx.skipped_corrupt + test_idx.skipped_corrupt,
        "skipped_unreadable": len(unreadable),
        "unreadable_images": list(unreadable.paths)[:100],
        **describe_leak(duplicates),
    }


def write_reports(
    out: Path, metrics: dict[str, Any], train_counts: list[int], classes: list
) -> None:
    atomic_write_json(out / METRICS_FILE, metrics)
    per_class, confused = (out / name for name in PLOT_FILES)
    plots.per_class_vs_frequency(metrics["per_class"], train_counts, per_class)
    plots.confused_pairs(metrics["confused_pairs"], classes, confused)


# flags that define a run: a resumed run must match the checkpoint's on every one (optimizer state,
# step counts per epoch, the LR schedule, the data and the recorded preprocessing depend on them).
# Everything else may change on resume: --epochs (extend or shorten), --stop-after, --workers,
# --device, --no-amp, --eval-every, --leak-check, --strict, --out, --verbose; --pretrained is
# unused.
RESUME_FIXED = (
    "arch",
    "dataset",
    "level",
    "crop",
    "image_size",
    "batch_size",
    "world_size",
    "opt",
    "lr",
    "head_lr_mult",
    "momentum",
    "weight_decay",
    "norm_weight_decay",
    "bias_weight_decay",
    "warmup_epochs",
    "label_smoothing",
    "imbalance",
    "cb_beta",
    "ema_decay",
    "seed",
)


# run-defining flags added later, and the flag whose value an older checkpoint's run had for them
# (before --norm-weight-decay and --bias-weight-decay every parameter decayed by --weight-decay)
LEGACY_SAME_AS = {"norm_weight_decay": "weight_decay", "bias_weight_decay": "weight_decay"}


def resume_mismatches(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``--flag now (checkpoint: then)`` for each run-defining flag that differs; flags the
    checkpoint does not record (an older checkpoint) are not compared, except those of
    ``LEGACY_SAME_AS``, whose value that run had is known."""
    saved = {**{k: saved[v] for k, v in LEGACY_SAME_AS.items() if v in saved}, **saved}
    out = []
    for key in RESUME_FIXED:
        if key in saved and key in current and saved[key] != current[key]:
            flag = "--" + key.replace("_", "-")
            out.append(f"{flag} {current[key]} (checkpoint: {saved[key]})")
    return out


def check_resume(args: argparse.Namespace, ckpt: dict[str, Any], world_size: int) -> None:
    """Refuse to continue a checkpoint with different run-defining flags (one line naming each);
    log a changed --epochs, which stretches or shortens the cosine decay from here on."""
    saved = ckpt.get("args") or {}
    current = recorded_args(args, world_size=world_size)
    diffs = resume_mismatches(saved, current)
    if diffs:
        raise BadArgumentError(
            f"--resume {args.resume}: this run's flags differ from the checkpoint's: "
            f"{'; '.join(diffs)}; only --data (the same data at another path), --epochs, "
            "--stop-after, --workers, --device, --no-amp, --eval-every, --leak-check, --strict "
            "and --out may change on resume"
        )
    if "data" in saved and saved["data"] != current.get("data"):
        # the same archive mounted elsewhere (another node, another job); the class list is
        # compared separately, so a different data set is still refused
        log.warning(
            "--data %s (checkpoint: %s): resuming on data at a new path",
            current.get("data"),
            saved["data"],
        )
    if "epochs" in saved and saved["epochs"] != args.epochs:
        log.warning(
            "--epochs %d (checkpoint: %s): the cosine LR decay is recomputed over %d epochs from "
            "the resumed step on",
            args.epochs,
            saved["epochs"],
            args.epochs,
        )


def check_resume_steps(
    args: argparse.Namespace, ckpt: dict[str, Any], steps: int, images: int, world_size: int
) -> None:
    """Refuse a resume whose steps per epoch differ from the checkpoint's (a data set of another
    size under --data): the LR schedule is rebuilt for this run's steps but resumed at the
    checkpoint's step, so the cosine decay would end far from 0 or reach it early. A checkpoint
    written before it recorded ``steps_per_epoch`` is not checked."""
    saved = ckpt.get("steps_per_epoch")
    if saved is None:
        log.debug(
            "--resume %s: the checkpoint records no steps per epoch; not compared", args.resume
        )
        return
    if saved == steps:
        return
    then = ckpt.get("train_images")
    then_images = f"{then} training images" if isinstance(then, int) else "its data"
    raise BadArgumentError(
        f"--resume {args.resume}: this run has {steps} steps per epoch ({images} training images, "
        f"batch {args.batch_size} x {world_size} process(es)), the checkpoint {saved} "
        f"({then_images}): the LR schedule would not fit; resume on the data set it trained on"
    )


# what a resumed run restores beyond the weights (training writes them every epoch)
RESUME_STATE = ("optimizer", "lr_scheduler", "epoch")
MIN_BATCH_SIZE = 2  # BatchNorm cannot train on one image (a 1x1 map at the last stage)
DATASETS_WITH_BOXES = ("compcars",)  # compcars-sv images are crops already; folders have no labels


def check_crop(crop: str, dataset: str) -> None:
    """--crop bbox needs a reader that has boxes; elsewhere it would be a no-op recorded as bbox."""
    if crop == "bbox" and dataset not in DATASETS_WITH_BOXES:
        raise BadArgumentError(
            f"--crop bbox: --dataset {dataset} has no bounding boxes (only "
            f"{', '.join(DATASETS_WITH_BOXES)} does); use --crop full"
        )


def resolve_weight_decays(args: argparse.Namespace) -> None:
    """--norm-weight-decay and --bias-weight-decay not given: --weight-decay's value, so the
    recorded args (and a resume's comparison) hold the decay each parameter kind really had."""
    for key in ("norm_weight_decay", "bias_weight_decay"):
        if getattr(args, key, None) is None:
            setattr(args, key, args.weight_decay)


def check_train_args(args: argparse.Namespace) -> None:
    """Flag values argparse accepts but a training run cannot use; one line naming each."""
    if args.batch_size < MIN_BATCH_SIZE:
        raise BadArgumentError(
            f"--batch-size {args.batch_size}: must be >= {MIN_BATCH_SIZE} per process "
            "(BatchNorm cannot train on one image)"
        )
    if args.batch_size > MAX_BATCH_SIZE:
        raise BadArgumentError(f"--batch-size {args.batch_size}: must be <= {MAX_BATCH_SIZE}")
    if args.lr > MAX_LR:
        raise BadArgumentError(f"--lr {args.lr:g}: must be <= {MAX_LR:g}")
    if args.head_lr_mult > MAX_HEAD_LR_MULT:
        raise BadArgumentError(
            f"--head-lr-mult {args.head_lr_mult:g}: must be <= {MAX_HEAD_LR_MULT:g}"
        )
    for key in DECAY_FLAGS:
        value = getattr(args, key, None)
        if value is not None and value > MAX_WEIGHT_DECAY:
            flag = "--" + key.replace("_", "-")
            raise BadArgumentError(f"{flag} {value:g}: must be <= {MAX_WEIGHT_DECAY:g}")
    if args.warmup_epochs > args.epochs:
        raise BadArgumentError(
            f"--warmup-epochs {args.warmup_epochs}: must be <= --epochs {args.epochs}"
        )
    if not MIN_IMAGE_SIZE <= args.image_size <= MAX_IMAGE_SIZE:
        raise BadArgumentError(
            f"--image-size {args.image_size}: must be in {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE}"
        )
    check_crop(args.crop, args.dataset)


def class_difference(
    data_classes: list[dict],
    ckpt_classes: list[dict],
    class_suffixes: list[frozenset[str]] | None = None,
) -> str:
    """Where a data set's class list first departs from a checkpoint's, for error messages
    (equal counts alone would read as no difference at all). ``class_suffixes`` (the index's,
    per data class): name the data's classes the checkpoint lacks that hold only files of the
    suffixes read since ``NEWLY_READ_SINCE``, the likely reason a checkpoint trained before no
    longer fits its own data set (:func:`newly_read_classes_note`)."""
    return _class_difference(data_classes, ckpt_classes) + newly_read_classes_note(
        data_classes, ckpt_classes, class_suffixes or []
    )


def _class_difference(data_classes: list[dict], ckpt_classes: list[dict]) -> str:
    if len(data_classes) != len(ckpt_classes):
        return f"{len(data_classes)} classes in the data, {len(ckpt_classes)} in the checkpoint"

    def name(c: dict) -> str:
        return f"{c.get('make')} {c.get('model')} (ids {c.get('make_id')}/{c.get('model_id')})"

    for i, (ours, theirs) in enumerate(zip(data_classes, ckpt_classes, strict=True)):
        if ours != theirs:
            return f"class {i} is {name(ours)} in the data, {name(theirs)} in the checkpoint"
    return "same classes"


def newly_read_classes_note(
    data_classes: list[dict], ckpt_classes: list[dict], class_suffixes: list[frozenset[str]]
) -> str:
    """``; class Opel holds only .gif/.tif files, read since 2026-12-07: move them out or
    retrain`` when some of the data's classes are not in the checkpoint and hold only image
    files of ``NEWLY_READ_SUFFIXES``: folders the reader skipped when the checkpoint was trained
    (a class of .gif files only was no class then); '' otherwise."""
    if len(class_suffixes) != len(data_classes):
        return ""
    known = {json.dumps(_normalised_class(c), sort_keys=True) for c in ckpt_classes}
    new = [
        (cls, suffixes)
        for cls, suffixes in zip(data_classes, class_suffixes, strict=True)
        if suffixes
        and suffixes <= set(NEWLY_READ_SUFFIXES)
        and json.dumps(_normalised_class(cls), sort_keys=True) not in known
    ]
    if not new:
        return ""
    names = [
        "/".join(dict.fromkeys(n for n in (c.get("make"), c.get("model")) if n)) for c, _ in new
    ]
    shown = ", ".join(names[:CLASSES_NAMED]) + (
        f" and {len(names) - CLASSES_NAMED} more" if len(names) > CLASSES_NAMED else ""
    )
    found = "/".join(s for s in NEWLY_READ_SUFFIXES if any(s in x for _, x in new))
    which = f"class {shown} holds" if len(new) == 1 else f"classes {shown} hold"
    return f"; {which} only {found} files, read since {NEWLY_READ_SINCE}: move them out or retrain"


# a class's name fields, each with the id field that holds the same text in the folder reader's
# classes (its ids are the folder names); other ids (CompCars' numbers) are compared as they are
_NAMED_IDS = (("make", "make_id"), ("model", "model_id"))


def _normalised_class(cls: dict) -> dict:
    """``cls`` with its names read as the folder reader reads folder names (``normal_class_name``:
    NFC, stripped), and an id that is the name itself (the folder reader's) along with it."""
    out = dict(cls)
    for name_key, id_key in _NAMED_IDS:
        name = cls.get(name_key)
        if isinstance(name, str):
            out[name_key] = normal_class_name(name)
            if cls.get(id_key) == name:
                out[id_key] = out[name_key]
    return out


def classes_match(data_classes: list[dict], ckpt_classes: list[dict], where: str) -> bool:
    """Whether a checkpoint's class list is the data's, class by class: equal, or equal once the
    names on both sides are normalised as the folder reader normalises folder names, as in a
    checkpoint trained on NFD or space-padded folder names before the reader normalised them
    (ids must match as they are, except the folder reader's, which are the names). That case logs
    one warning (``where`` names the checkpoint); the run goes on with the data's names."""
    if data_classes == ckpt_classes:
        return True
    if [_normalised_class(c) for c in data_classes] != [_normalised_class(c) for c in ckpt_classes]:
        return False
    renamed = [i for i, (a, b) in enumerate(zip(data_classes, ckpt_classes, strict=True)) if a != b]
    first = renamed[0]
    log.warning(
        "%s: %d of the checkpoint's class names differ from the data's only by Unicode "
        "normalisation (NFC) or surrounding spaces, as class folder names read before they were "
        "normalised (e.g. class %d: %s in the checkpoint, %s in the data); using the data's names",
        where,
        len(renamed),
        first,
        ascii(class_label(ckpt_classes[first])),
        ascii(class_label(data_classes[first])),
    )
    return True


def check_no_checkpoint_in_out(args: argparse.Namespace, can_resume: bool = True) -> None:
    """Refuse to train into an --out that holds a checkpoint, unless this run continues that very
    checkpoint (--resume pointing there) or --overwrite says to replace it: a finished model must
    not be overwritten by a mistyped command. ``can_resume``: whether the command has --resume
    to suggest (compare has not)."""
    existing = Path(args.out) / CHECKPOINT_FILE
    if not existing.is_file() or getattr(args, "overwrite", False) or resumes_out(args):
        return
    resume = f"continue it with --resume {args.out}, or " if can_resume else ""
    raise BadArgumentError(
        f"--out {args.out} already holds {CHECKPOINT_FILE}; {resume}pass --overwrite to replace it"
    )


def resumed_file(resume: Path) -> Path:
    """The file ``--resume`` loads: the ``checkpoint.pt`` in a directory, or the file named (as
    :func:`training.checkpoint.load_checkpoint` picks it)."""
    return resume / CHECKPOINT_FILE if resume.is_dir() else resume


def file_identity(path: Path) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of ``path`` itself (a link is not followed), or None when there is
    nothing there: tells whether a rename has put another file in its place."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` are one file once links are followed (a symlink, a hard link, the
    folder reached by another path); False when either is missing."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def resumes_out(args: argparse.Namespace) -> bool:
    """Whether --resume loads the very file that is --out's checkpoint.pt. Compared as files,
    not paths: ``--resume RES`` whose ``checkpoint.pt`` is a link to ``OUT/checkpoint.pt`` resumes
    it as surely as ``--resume OUT``, and --overwrite must not remove it."""
    if getattr(args, "resume", None) is None:
        return False
    return same_file(resumed_file(Path(args.resume)), Path(args.out) / CHECKPOINT_FILE)


def remove_previous_run(out: Path, keep: Path | None = None) -> list[str]:
    """Remove what an earlier run wrote into ``out`` (``RUN_FILES``, their temp files and the
    TensorBoard event files in ``tb/``) and return their names; nothing else in ``out`` is
    touched. ``--overwrite`` calls it before the new run writes its args.json: otherwise a run
    interrupted before its first checkpoint left the old run's checkpoint, labels and metrics
    beside its own args.json, and ``--resume`` then continued the old, finished model. A file
    that is ``keep`` (the checkpoint this run resumes, by whatever name or link) stays: removing
    it would lose the only copy of what the run continues."""
    removed = []
    for name in RUN_FILES:
        for path in (out / name, *sorted(out.glob(f".{name}.*.tmp"))):
            if keep is not None and same_file(path, keep):
                continue
            if path.is_symlink() or path.is_file():
                path.unlink()
                removed.append(path.name)
    tb = out / TB_DIR
    if tb.is_dir() and not tb.is_symlink():
        events = sorted(tb.glob("events.out.tfevents.*"))
        for path in events:
            if path.is_symlink() or path.is_file():
                path.unlink()
        if events:
            removed.append(f"{TB_DIR}/ ({len(events)} event file(s))")
        with contextlib.suppress(OSError):
            tb.rmdir()  # only when nothing else is in it
    return removed


def check_out_not_in_data(out: Path, data: Path) -> None:
    """Refuse an --out inside --data: the plots and checkpoints written there would be read as
    images of a folder data set on the next run (a class folder gains two PNGs)."""
    try:
        out_real, data_real = out.resolve(), data.resolve()
    except (RuntimeError, OSError) as exc:  # a symlink loop: RuntimeError before Python 3.13
        raise BadArgumentError(f"--data {data}: cannot be resolved ({exc})") from None
    if out_real == data_real or data_real in out_real.parents:
        raise BadArgumentError(f"--out {out}: inside --data {data}; write checkpoints elsewhere")


def hold_out_lock(out: Path) -> IO[str]:
    """An exclusive lock on ``out/.train.lock`` for this run's life (released when the process
    ends, however it ends): two runs into one --out would interleave their checkpoints and
    reports."""
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / LOCK_FILE, "a+", encoding="utf-8")  # noqa: SIM115 (held until exit)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise BadArgumentError(
            f"--out {out}: another training run ({holder}) is writing there; wait for it or "
            "choose another --out"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


def check_optimizer_groups(
    saved: dict[str, Any], optimizer: torch.optim.Optimizer, where: str
) -> None:
    """The checkpoint's optimizer has this run's parameter groups (as many, as large): a
    different --norm-weight-decay/--bias-weight-decay split would otherwise fail inside torch's
    ``load_state_dict`` with a message about group sizes that names no flag."""
    theirs = [len(g["params"]) for g in saved["param_groups"]]
    ours = [len(g["params"]) for g in optimizer.param_groups]
    if theirs != ours:
        raise CheckpointError(
            f"{where}: the checkpoint's optimizer has parameter groups of {theirs} tensors, this "
            f"run's {ours}: --norm-weight-decay and --bias-weight-decay must split the weight "
            "decay as the checkpoint's run did"
        )


def check_resumed_state(optimizer: torch.optim.Optimizer, where: str) -> None:
    """Every optimizer state tensor the checkpoint restored has its parameter's shape: a wrong
    one fails only at the first step, mid-epoch, with a shape error from inside torch."""
    for param, state in optimizer.state.items():
        for name, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape != param.shape:
                raise CheckpointError(
                    f"{where}: optimizer state {name!r} has shape {tuple(value.shape)} for a "
                    f"parameter of shape {tuple(param.shape)}"
                )


@dataclass
class RunReport:
    """What one invocation of :func:`run` did, filled in as it goes: the command's own messages
    (its summary line, the note on an interruption) are made from it."""

    source: str = ""  # the data set, as its reader names it
    num_classes: int = 0
    saved_epoch: int | None = None  # the last epoch (1-based) this invocation checkpointed
    # while a checkpoint is written: its epoch (1-based) and the identity of the checkpoint.pt
    # it replaces (None when there was none), for :meth:`settle`
    saving: tuple[int, tuple[int, int] | None] | None = None

    def settle(self, out: Path) -> None:
        """After an interruption: count the epoch whose checkpoint write it cut short once that
        checkpoint.pt is in place (renamed over the old one, labels.json not yet written, or the
        rename's return not yet seen). The note must then name this epoch: saying that no
        checkpoint was saved, or naming the one before, invites an --overwrite of a resumable
        checkpoint."""
        if self.saving is None:
            return
        epoch, before = self.saving
        now = file_identity(Path(out) / CHECKPOINT_FILE)
        if now is not None and now != before:
            self.saved_epoch = epoch


def main(args: argparse.Namespace, stop: threading.Event | None = None) -> dict[str, Any]:
    """The ``train`` command: :func:`run`, then its one summary line on stdout. An interruption
    (Ctrl-C, or ``stop`` set by SIGTERM and seen between steps) says whether this invocation
    saved a checkpoint to continue from (:func:`interrupt_note`)."""
    report = RunReport()
    try:
        metrics = run(args, report, stop=stop)
    except KeyboardInterrupt as exc:
        report.settle(args.out)
        raise Interrupted(interrupt_note(args, report)) from exc
    except Exception as exc:
        if stop is None or not stop.is_set():
            raise
        # a failure once the stop was requested is the stop's doing (a loader worker that got
        # the group's SIGTERM before it could ignore it): the interruption, not a crash
        log.debug("after the stop request: %r", exc)
        report.settle(args.out)
        raise Interrupted(interrupt_note(args, report)) from exc
    if metrics:
        print(
            f"{args.arch} on {report.source}: top1 {metrics['top1']:.4f} top5 "
            f"{metrics['top5']:.4f} make-top1 {metrics['make_top1']:.4f} ({report.num_classes} "
            f"classes, chance {metrics['chance_top1']:.4f}); wrote {args.out}"
        )
    return metrics


def interrupt_note(args: argparse.Namespace, report: RunReport) -> str:
    """Where an interrupted run leaves its user: the checkpoint this invocation saved, or that it
    saved none (an --out with a checkpoint from before is no run of this one's to continue)."""
    out = args.out
    if report.saved_epoch is not None:
        return (
            f"the last finished epoch's checkpoint (epoch {report.saved_epoch} of {args.epochs}) "
            f"is in {out}; continue with --resume {out}"
        )
    if args.resume is not None:
        return (
            f"no epoch finished, so this run saved no checkpoint; --resume {args.resume} is as "
            "it was, continue from it again"
        )
    return f"no epoch finished, so this run saved no checkpoint in {out}"


def run(
    args: argparse.Namespace,
    report: RunReport | None = None,
    stop: threading.Event | None = None,
    data: CheckedData | None = None,
) -> dict[str, Any]:
    """Train; return the final metrics (rank 0) or {} (other ranks). Writes the checkpoint
    directory and logs, but prints nothing: ``compare`` runs it once per arch between its own
    output. ``report`` (optional) is filled in with what this invocation did. Once ``stop`` is
    set the run ends at the next step (or evaluation batch) with StopRequested, a
    KeyboardInterrupt: the epoch in progress is not checkpointed (one whose training finished and
    whose evaluation the stop cut short is). ``data``: the splits, already loaded and checked
    (``compare``); by default the run loads them."""
    dist_info = init_distributed(args.device)
    held: list[IO[str]] = []  # the --out lock, released however the run ends
    try:
        return _train(
            args,
            dist_info,
            held,
            report if report is not None else RunReport(),
            stop if stop is not None else threading.Event(),
            data,
        )
    finally:
        for handle in held:
            handle.close()
        cleanup(dist_info)


def new_run_id(resumed: dict[str, Any] | None) -> str:
    """A run's id, in args.json, the checkpoint's args and metrics.json: a resumed run keeps its
    checkpoint's (the same run, continued), a new run gets a fresh one."""
    saved = (resumed or {}).get("args") or {}
    run_id = saved.get("run_id")
    return run_id if isinstance(run_id, str) and run_id else uuid.uuid4().hex


def warn_if_mixed_run_files(resume: Path, ckpt: dict[str, Any]) -> None:
    """Warn when --resume's directory holds an args.json of another run than its checkpoint.pt
    (files copied together by hand, or left by a version that did not clear an --overwrite's
    folder): the checkpoint is resumed, and is what counts, but the folder's files disagree."""
    folder = resume if resume.is_dir() else resume.parent
    ours = (ckpt.get("args") or {}).get("run_id")
    try:
        theirs = json.loads((folder / ARGS_FILE).read_text(encoding="utf-8")).get("run_id")
    except (OSError, ValueError, AttributeError):
        return
    if ours and theirs and ours != theirs:
        log.warning(
            "--resume %s: its %s is of run %s, its %s of run %s: the folder mixes two runs' "
            "files; resuming the checkpoint's run",
            resume,
            ARGS_FILE,
            theirs,
            CHECKPOINT_FILE,
            ours,
        )


def _train(
    args: argparse.Namespace,
    dist_info: DistInfo,
    held: list[IO[str]],
    report: RunReport,
    stop: threading.Event,
    data: CheckedData | None = None,
) -> dict[str, Any]:
    check_train_args(args)
    resolve_weight_decays(args)
    check_out_dir(args.out)
    check_utf8_path(args.out)  # TensorBoard's writer needs it as text
    check_out_not_in_data(args.out, args.data)
    check_no_checkpoint_in_out(args)
    device = resolve_device(args.device, dist_info)
    on_cuda = device.type == "cuda"
    amp = on_cuda and not args.no_amp
    resume_ckpt = load_checkpoint(args.resume) if args.resume else None
    if resume_ckpt is not None:
        check_resume(args, resume_ckpt, dist_info.world_size)
        if dist_info.is_main:  # one warning, not one per rank
            warn_if_mixed_run_files(Path(args.resume), resume_ckpt)
    ddp_seed = sampler_seed(
        args.seed,
        None if resume_ckpt is None else resume_ckpt.get("args") or {},
        f"--resume {args.resume}",
    )
    torch.manual_seed(args.seed)
    if data is None:
        data = load_checked_data(args, dist_info, stop)
    train_idx, test_idx, duplicates = data.train, data.test, data.duplicates
    classes = train_idx.classes
    counts = train_idx.class_counts()
    report.source, report.num_classes = train_idx.source, len(classes)
    spec = PreprocessSpec.for_image_size(args.image_size)
    log.info(
        "%s: %d classes, %d train / %d test images, %d listed images missing, %d corrupt",
        train_idx.source,
        len(classes),
        len(train_idx.samples),
        len(test_idx.samples),
        train_idx.skipped_missing + test_idx.skipped_missing,
        train_idx.skipped_corrupt + test_idx.skipped_corrupt,
    )

    model = build_model(args.arch, len(classes))
    if resume_ckpt is not None:
        if resume_ckpt["arch"] != args.arch or not classes_match(
            classes, resume_ckpt["classes"], f"--resume {args.resume}"
        ):
            raise BadArgumentError(
                f"--resume {args.resume}: checkpoint is {resume_ckpt['arch']} with "
                f"{resume_ckpt['num_classes']} classes; this run is {args.arch} with {len(classes)}"
                f" ({class_difference(classes, resume_ckpt['classes'], train_idx.class_suffixes)})"
            )
        missing = [k for k in RESUME_STATE if k not in resume_ckpt]
        if missing:
            raise CheckpointError(
                f"--resume {args.resume}: the checkpoint has no {', '.join(missing)} to resume "
                "from (not written by `python -m training train`?)"
            )
        load_weights(model, resume_ckpt["state_dict"], f"--resume {args.resume}")
        saved_args = resume_ckpt.get("args") or {}
        pretrained_source = saved_args.get("pretrained_source", "resumed")
        # --pretrained is not used on resume: the record keeps the first run's value (null when
        # its checkpoint does not say), not this command line's default next to its source
        pretrained = saved_args.get("pretrained")
    else:
        pretrained = args.pretrained
        try:
            pretrained_source = load_pretrained_backbone(model, args.arch, args.pretrained)
        except ValueError as exc:
            raise BadArgumentError(f"--pretrained {args.pretrained}: {exc}") from exc
    model = model.to(device, memory_format=torch.channels_last) if on_cuda else model.to(device)

    if len(train_idx.samples) < MIN_BATCH_SIZE * dist_info.world_size:
        raise DatasetError(
            f"{train_idx.source}: the training split has {len(train_idx.samples)} readable "
            f"image(s); at least {MIN_BATCH_SIZE * dist_info.world_size} are needed for one "
            "training step"
        )
    train_ds = ImageDataset(
        train_idx.samples, train_transform(spec), draft_size=train_draft_size(spec)
    )
    targets = [s.target for s in train_idx.samples]
    steps = math.ceil(len(train_ds) / (args.batch_size * dist_info.world_size))
    if len(train_ds) > args.batch_size * dist_info.world_size:
        steps = len(train_ds) // (args.batch_size * dist_info.world_size)
    if resume_ckpt is not None:
        check_resume_steps(args, resume_ckpt, steps, len(train_ds), dist_info.world_size)
    optimizer = build_optimizer(model, args)
    scheduler = warmup_cosine(optimizer, round(args.warmup_epochs * steps), args.epochs * steps)
    scaler = torch.amp.GradScaler("cuda") if amp else None
    ema = RampedEMA(model, args.ema_decay) if args.ema_decay > 0 else None
    criterion = build_criterion(args, counts).to(device)
    start_epoch, global_step = 0, 0
    if resume_ckpt is not None:
        where = f"--resume {args.resume}"
        try:
            check_optimizer_groups(resume_ckpt["optimizer"], optimizer, where)
            optimizer.load_state_dict(resume_ckpt["optimizer"])
            check_resumed_state(optimizer, where)
            scheduler.load_state_dict(resume_ckpt["lr_scheduler"])
            # the optimizer holds the LR the saved schedule set for the next step; with another
            # --epochs the schedule is another one, and its LR must drive that step
            apply_schedule_lr(scheduler)
            if scaler is not None and resume_ckpt.get("scaler"):
                scaler.load_state_dict(resume_ckpt["scaler"])
            start_epoch = int(resume_ckpt["epoch"]) + 1
            global_step = int(resume_ckpt.get("global_step", start_epoch * steps))
            if ema is not None and resume_ckpt.get("ema_state_dict"):
                ema.module.load_state_dict(resume_ckpt["ema_state_dict"])
                # the update count sets the decay ramp; a checkpoint without it made one EMA
                # update per step (steps skipped for unreadable images aside)
                ema.n_averaged.fill_(int(resume_ckpt.get("ema_n_averaged", max(global_step, 1))))
        except CheckpointError:
            raise
        except (ValueError, KeyError, TypeError, IndexError, AttributeError, RuntimeError) as exc:
            # a tampered or foreign checkpoint: its optimizer, scheduler or counters do not fit
            raise CheckpointError(
                f"{where}: its training state does not fit this run: {message_line(exc)}"
            ) from None
        log.info("resumed from %s at epoch %d", args.resume, start_epoch)

    train_model: nn.Module = model
    if dist_info.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if on_cuda else None
        )
    out: Path = args.out
    writer = None
    record = recorded_args(
        args,
        pretrained=pretrained,
        pretrained_source=pretrained_source,
        world_size=dist_info.world_size,
        device=str(device),
        amp=amp,
        preprocess=spec.model_dump(),
        sampler_seed=ddp_seed,
        run_id=new_run_id(resume_ckpt),
        param_groups=describe_param_groups(optimizer_groups(model, args)),
        **describe_loss(criterion),
    )
    refusal = None
    if dist_info.is_main:
        # taken once the data and model are ready, so a bad data set leaves no --out behind;
        # checked again under the lock: another run may have finished there since the start
        try:
            held.append(hold_out_lock(out))
            check_no_checkpoint_in_out(args)
        except BadArgumentError as exc:
            refusal = str(exc)
    refusal = refusal_from_main(dist_info, refusal)
    if refusal is not None:
        raise BadArgumentError(refusal)
    if dist_info.is_main:
        if args.overwrite and not resumes_out(args):
            # under the lock, before this run writes anything: none of the old run's files may
            # outlive its replacement's start (an interrupted run would leave a mix)
            keep = resumed_file(Path(args.resume)) if args.resume is not None else None
            removed = remove_previous_run(out, keep=keep)
            if removed:
                log.info("--overwrite: removed %s of the previous run from %s", removed, out)
        atomic_write_json(out / ARGS_FILE, record)
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tb"))
        if resume_ckpt is None and pretrained_source.startswith("none"):
            # a resumed run logged "resumed from ..." and keeps its first run's recorded source
            log.warning("training %s from scratch: %s", args.arch, pretrained_source)
        if ema is not None:
            warn_if_ema_too_short(args.ema_decay, args.epochs * steps)

    progress = sys.stderr.isatty() and dist_info.is_main
    eval_dl = eval_loader(test_idx, spec, args, dist_info)
    last_eval: dict[str, Any] = {}
    unreadable = UnreadableImages(strict=args.strict)  # images that pass the index but not decode

    def score(weights: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Every rank scores its shard; rank 0 gets the whole test set's (the others None)."""
        return evaluate_split(
            weights,
            eval_dl,
            device,
            dist_info,
            amp=amp,
            channels_last=on_cuda,
            unreadable=unreadable,
            stop=stop,
        )

    train_seconds = 0.0
    epoch = start_epoch - 1
    for epoch in range(start_epoch, args.epochs):
        if not dist_info.enabled:  # under DDP the epoch's first step agrees on it
            raise_if_stopped(stop)
        torch.manual_seed(augment_seed(args.seed, epoch, dist_info))  # this epoch's augmentations
        skipped_before = unreadable.occurrences
        loader = train_loader(
            train_ds, targets, counts, args, epoch, dist_info, on_cuda, ddp_seed=ddp_seed
        )
        stats = train_one_epoch(
            train_model,
            criterion,
            optimizer,
            loader,
            device,
            epoch,
            scheduler=scheduler,
            scaler=scaler,
            ema=ema,
            channels_last=on_cuda,
            progress=progress,
            writer=writer,
            global_step=global_step,
            unreadable=unreadable,
            stop=stop,
        )
        if stats.get("stopped"):  # every rank alike: the step's agreement said so
            raise StopRequested
        global_step = int(stats["global_step"])
        train_seconds += stats["seconds"]
        log.info(
            "epoch %d/%d: loss %.4f train-acc %.3f (%.1f img/s), %d unreadable images skipped",
            epoch + 1,
            args.epochs,
            stats["loss"],
            stats["acc"],
            stats["images_per_s"],
            unreadable.occurrences - skipped_before,
        )
        eval_model = ema.module if ema is not None else model
        stopped_in_eval = False
        if args.eval_every and (epoch + 1) % args.eval_every == 0:
            try:
                scored = score(eval_model)
            except StopRequested:  # every rank alike (evaluate_split): save the trained epoch
                scored, stopped_in_eval = None, True
            if scored is not None:
                last_eval = classification_metrics(*scored, classes)
                writer.add_scalar("test/top1", last_eval["top1"], epoch + 1)
                writer.add_scalar("test/top5", last_eval["top5"], epoch + 1)
                log.info(
                    "epoch %d: test top1 %.3f top5 %.3f",
                    epoch + 1,
                    last_eval["top1"],
                    last_eval["top5"],
                )
        if dist_info.is_main:
            writer.add_scalar("train/epoch_loss", stats["loss"], epoch + 1)
            # an interruption from here on is settled by the file on disk (RunReport.settle):
            # checkpoint.pt is in place before labels.json is written and before this returns
            report.saving = (epoch + 1, file_identity(out / CHECKPOINT_FILE))
            save_checkpoint(
                out,
                {
                    "arch": args.arch,
                    "num_classes": len(classes),
                    "classes": classes,
                    "train_class_counts": counts,  # for evaluate's majority-class baseline
                    "level": args.level,
                    "preprocess": spec.model_dump(),
                    "state_dict": model.state_dict(),
                    "epoch": epoch,
                    "global_step": global_step,
                    # the schedule's step count rests on it: --resume refuses another value
                    "steps_per_epoch": steps,
                    "train_images": len(train_ds),
                    "args": record,
                    "optimizer": optimizer.state_dict(),
                    "lr_scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "ema_state_dict": ema.module.state_dict() if ema is not None else None,
                    "ema_n_averaged": int(ema.n_averaged) if ema is not None else 0,
                    "rng": {"torch": torch.get_rng_state()},
                    "metrics": {k: last_eval[k] for k in ("top1", "top5")} if last_eval else {},
                },
            )
            report.saved_epoch = epoch + 1
            report.saving = None
        barrier(dist_info)
        if stopped_in_eval:  # its checkpoint records the metrics of an epoch not evaluated
            raise StopRequested
        if args.stop_after and epoch + 1 - start_epoch >= args.stop_after:
            log.info("stopping after epoch %d (--stop-after); continue with --resume", epoch + 1)
            break
    eval_model = ema.module if ema is not None else model
    scored = score(eval_model)
    metrics = (
        {} if scored is None else full_metrics(*scored, train_idx, test_idx, unreadable, duplicates)
    )
    if ema is not None:
        # the raw weights too, once at the end (every epoch would double the evaluation cost)
        raw = score(model)
        if raw is not None:
            raw_logits, raw_tgt = raw
            metrics["ema_top1"] = metrics["top1"]
            metrics["raw_top1"] = float((raw_logits.argmax(1) == raw_tgt).float().mean())
    if not dist_info.is_main:
        return {}
    metrics.update(
        {
            "arch": args.arch,
            "level": args.level,
            "epochs_completed": epoch + 1,
            "epochs": args.epochs,
            "pretrained_source": pretrained_source,
            "imbalance": args.imbalance,
            "ema": ema is not None,
            "ema_decay": args.ema_decay,
            "train_seconds_this_run": round(train_seconds, 3),
            "run_id": record["run_id"],
        }
    )
    write_reports(out, metrics, counts, classes)
    writer.close()
    return metrics
