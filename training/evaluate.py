"""``evaluate``: a checkpoint on a data set's test split, with the eval preprocessing it records.

The crop mode (full image or labelled box) is part of that preprocessing: by default the one
the checkpoint was trained with, so a bbox model is not silently scored on whole photos.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from training import plots
from training.checkpoint import (
    METRICS_FILE,
    atomic_write_json,
    load_checkpoint,
    model_from_checkpoint,
    preprocess_spec_of,
    recorded_crop,
)
from training.cli import BadArgumentError, check_out_dir
from training.cli_errors import OneLineParser, path_arg
from training.cli_help import DefaultsHelpFormatter
from training.datasets import DatasetError, load_index
from training.datasets.image_dataset import UnreadableImages
from training.distributed import DistInfo
from training.engine import evaluate
from training.metrics import classification_metrics, make_level_counts, to_make_level
from training.train import (
    add_data_args,
    check_crop,
    class_difference,
    classes_match,
    eval_loader,
    resolve_device,
)

log = logging.getLogger(__name__)


def get_args_parser(add_parser=None, name: str = "evaluate") -> argparse.ArgumentParser:
    kwargs = {
        "description": "Evaluate a training checkpoint on a data set's test split.",
        "formatter_class": DefaultsHelpFormatter,
    }
    parser = (
        add_parser(name, help="evaluate a checkpoint", **kwargs)
        if add_parser
        else OneLineParser(prog=f"python -m training {name}", **kwargs)
    )
    parser.add_argument("--checkpoint", type=path_arg, required=True, help="checkpoint directory")
    add_data_args(
        parser,
        crop_default=None,
        crop_help="default: the crop the checkpoint was trained with; another one is logged",
        level_default=None,
        level_help="default: the checkpoint's level; make on a model-level checkpoint scores "
        "each make by its best model",
    )
    parser.add_argument("--split", choices=("test", "train"), default="test", help="which split")
    parser.add_argument("--out", type=path_arg, help="write metrics.json and plots here")
    parser.add_argument("--no-ema", action="store_true", help="use raw weights, not EMA")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.out:
        check_out_dir(args.out)
        home = args.checkpoint if args.checkpoint.is_dir() else args.checkpoint.parent
        if args.out.resolve() == home.resolve():
            raise BadArgumentError(
                f"--out {args.out} is the checkpoint's directory: writing there would replace "
                f"training's {METRICS_FILE} and plots; choose another --out"
            )
    ckpt = load_checkpoint(args.checkpoint)
    trained_level = ckpt.get("level") or "model"
    level = args.level or trained_level
    if level != trained_level and trained_level == "make":
        raise BadArgumentError(
            f"--level {level}: {args.checkpoint} classifies makes, it cannot be scored on models"
        )
    trained_crop = recorded_crop(ckpt)
    crop = args.crop or trained_crop
    check_crop(crop, args.dataset)
    if crop != trained_crop:
        log.warning(
            "--crop %s: the checkpoint was trained with crop %s; evaluating on %s anyway",
            crop,
            trained_crop,
            crop,
        )
    index = load_index(args.dataset, args.data, args.split, trained_level, crop, args.strict)
    if not classes_match(index.classes, ckpt["classes"], str(args.checkpoint)):
        raise DatasetError(
            f"{args.data}: its {index.num_classes} classes differ from the checkpoint's "
            f"{ckpt['num_classes']} "
            f"({class_difference(index.classes, ckpt['classes'], index.class_suffixes)}; "
            f"{args.checkpoint})"
        )
    if not index.samples:
        raise DatasetError(f"{args.data}: no {args.split} images found")
    device = resolve_device(args.device, DistInfo())
    model = model_from_checkpoint(ckpt, not args.no_ema, args.checkpoint).to(device)
    spec = preprocess_spec_of(ckpt)
    unreadable = UnreadableImages(strict=args.strict)
    logits, targets = evaluate(model, eval_loader(index, spec, args), device, unreadable=unreadable)
    classes = index.classes
    train_counts = ckpt.get("train_class_counts")  # None in a checkpoint from before them
    if level != trained_level:  # a model-level checkpoint read at make level
        if train_counts is not None:
            train_counts = make_level_counts(train_counts, classes)
        logits, targets, classes = to_make_level(logits, targets, classes)
    m = classification_metrics(logits, targets, classes, train_counts)
    m.update(
        level=level,
        checkpoint_level=trained_level,
        num_classes=len(classes),
        skipped_missing=index.skipped_missing,
        skipped_corrupt=index.skipped_corrupt,
        skipped_unreadable=len(unreadable),
        unreadable_images=list(unreadable.paths)[:100],
        checkpoint=str(args.checkpoint),
        split=args.split,
        crop=crop,
        checkpoint_crop=trained_crop,
    )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.out / METRICS_FILE, m)
        plots.confused_pairs(m["confused_pairs"], classes, args.out / "confused_pairs.png")
    top5 = f"{m['top5']:.4f}" if m["top5_informative"] else f"n/a ({m['top5_k']} classes)"
    print(
        f"top1 {m['top1']:.4f} top5 {top5} balanced {m['balanced_accuracy']:.4f} "
        f"make-top1 {m['make_top1']:.4f} (by id {m['make_top1_by_id']:.4f}) on {m['num_test']} "
        f"{args.split} images, level {level}, crop {crop}, chance top1 {m['chance_top1']:.4f} "
        f"({index.skipped_missing} missing skipped)"
    )
    return m
