"""Where parity and calibration images come from when the user names none.

Default: the held-out split of the dataset the checkpoint was trained on, read by training's
own dataset reader from the checkpoint's recorded ``args`` (dataset kind, data directory, level,
crop), so the labels and the bbox crop are exactly evaluation's. A checkpoint that records only
a data directory falls back to its ``test/`` or ``val/`` folder. ``--data DIR`` says where that
dataset is now (a build in a container sees it at its mount point, not at the training machine's
path). Otherwise ``--parity-data DIR`` is required.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine_build.parity import (
    UNREADABLE,
    ParityDataError,
    ParitySet,
    evenly_spaced,
    image_dir_parity_set,
)
from training.checkpoint import recorded_crop
from training.datasets import READERS, load_index
from training.datasets.base import DatasetError, Sample
from training.datasets.image_dataset import load_image
from training.preprocessing import PreprocessSpec, preprocess_image

log = logging.getLogger(__name__)

DATA_DIR_KEYS = ("data_dir", "data_path", "data", "root")
FOLDER_SPLITS = ("test", "val")


def recorded_data_dir(ckpt: dict) -> Path | None:
    args = ckpt.get("args") or {}
    for key in DATA_DIR_KEYS:
        if isinstance(args.get(key), str) and args[key]:
            return Path(args[key])
    return None


def class_key(c: dict) -> tuple:
    """What identifies a class across the reader and the checkpoint: the dataset's ids where it
    has them (CompCars: one make name can belong to two make ids, and labels may be renamed
    between versions), else the names (folder data sets)."""
    if c.get("make_id") is not None:
        return ("id", c["make_id"], c.get("model_id"))
    return ("name", str(c.get("make")), str(c.get("model")))


def _moved_hint(root: Path, data_dir: Path | None) -> str:
    if data_dir is None and not root.exists():
        return f"; {root} is not on this machine: pass --data DIR where the dataset is now, or"
    return ";"


@dataclass(frozen=True)
class HeldOut:
    """The held-out samples engine_build uses by default, and how to label them."""

    source: str  # "compcars:/data test split (level model, crop full; 0 missing)"
    root: Path
    chosen: list[Sample]  # evenly spread over the split, at most ``limit``
    to_ckpt: list[int]  # the reader's class index -> the checkpoint's (-1: not in it)


def heldout_samples(ckpt: dict, limit: int, data_dir: Path | None = None) -> HeldOut | None:
    """The held-out split as training's own reader reads it, with the checkpoint's level and
    crop; None when the checkpoint does not record its dataset. ``data_dir``: where that dataset
    is now, instead of its recorded path. Shared by the parity set and the GPU-decode parity,
    so both measure the same images."""
    args = ckpt.get("args") or {}
    kind, root = args.get("dataset"), data_dir or recorded_data_dir(ckpt)
    if kind not in READERS or root is None:
        return None
    level = args.get("level") or ckpt.get("level") or "model"
    crop = recorded_crop(ckpt)
    try:
        index = load_index(kind, root, "test", level=level, crop=crop)
    except DatasetError as exc:
        raise ParityDataError(
            f"held-out split of {root}: {exc}{_moved_hint(root, data_dir)} pass --parity-data DIR"
        ) from exc
    # the checkpoint's class order is authoritative; map the reader's classes onto it by name
    ckpt_index = {class_key(c): i for i, c in enumerate(ckpt["classes"])}
    return HeldOut(
        source=(
            f"{kind}:{root} test split (level {level}, crop {crop}; "
            f"{index.skipped_missing} missing)"
        ),
        root=Path(root),
        chosen=evenly_spaced(index.samples, limit),
        to_ckpt=[ckpt_index.get(class_key(c), -1) for c in index.classes],
    )


def training_parity_set(
    ckpt: dict, spec: PreprocessSpec, limit: int, data_dir: Path | None = None
) -> ParitySet | None:
    """The held-out split (:func:`heldout_samples`) preprocessed as evaluation does, so labels
    and pixels are those of evaluation; None when the checkpoint does not record its dataset.

    The set records its ``files`` when no sample has a box (``--crop full``): its pixels are then
    exactly the worker's CPU decode path (:func:`load_image` drafts and orients as the worker
    does), so the GPU-decode parity reuses them and their FP32 logits instead of listing the
    split again. Box crops are not what a worker decodes: no ``files`` then."""
    held = heldout_samples(ckpt, limit, data_dir)
    if held is None:
        return None
    chosen, to_ckpt, root = held.chosen, held.to_ckpt, held.root
    arrays, labels, files = [], [], []
    for sample in chosen:
        try:
            arrays.append(preprocess_image(load_image(sample, spec.resize), spec))
        except UNREADABLE as exc:
            log.warning("skipping unreadable parity image %s: %s", sample.path, exc)
            continue
        labels.append(to_ckpt[sample.target])
        files.append(str(sample.path))
    if not arrays:
        raise ParityDataError(f"no readable held-out images in {root}; pass --parity-data DIR")
    whole = all(sample.bbox is None for sample in chosen)  # the worker's pixels, row for row
    return ParitySet(
        np.stack(arrays),
        np.asarray(labels, dtype=np.int64),
        held.source,
        tuple(files) if whole else (),
    )


def parity_set_for(
    ckpt: dict,
    spec: PreprocessSpec,
    parity_data: Path | None,
    limit: int,
    data_dir: Path | None = None,
) -> ParitySet:
    """``parity_data`` when given, else the checkpoint's own held-out split (read from
    ``data_dir`` when given, else from the recorded path); never train images."""
    classes = ckpt["classes"]
    if parity_data is not None:
        return image_dir_parity_set(Path(parity_data), classes, spec, limit)
    if data_dir is not None and not Path(data_dir).is_dir():
        raise ParityDataError(f"--data {data_dir}: not a directory")
    recorded = training_parity_set(ckpt, spec, limit, data_dir)
    if recorded is not None:
        return recorded
    root = data_dir or recorded_data_dir(ckpt)
    for split in FOLDER_SPLITS:
        if root is not None and (root / split).is_dir():
            return image_dir_parity_set(root / split, classes, spec, limit)
    if root is None:
        raise ParityDataError(
            "no held-out images: the checkpoint records no dataset or data dir; "
            "pass --parity-data DIR"
        )
    raise ParityDataError(
        f"no held-out images: {root} has no test split ({'/'.join(FOLDER_SPLITS)} folder or "
        f"the dataset's own){_moved_hint(root, data_dir)} pass --parity-data DIR"
    )


def calibration_split(parity_set: ParitySet, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """INT8 calibration images, and the indices of the parity images left to score int8 on.

    Calibration takes an even spread of at most ``limit`` images and at most half the parity
    set: an engine scored on the images it was calibrated on reads optimistic, so int8's parity
    is measured on the others. (A parity set of one image leaves none: the caller then scores
    on it, and says so.)
    """
    n = len(parity_set.images)
    calib = evenly_spaced(list(range(n)), max(1, min(limit, n // 2)))
    return parity_set.images[calib], np.setdiff1d(np.arange(n), calib)
