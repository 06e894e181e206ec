"""Where parity and calibration images come from when the user names none.

Default: the held-out split of the dataset the checkpoint was trained on, found from the
checkpoint's recorded ``args`` (its data directory) and the dataset layouts fixed in DESIGN.md:
CompCars' ``data/train_test_split/classification/test.txt``, or a class-per-folder tree's
``test/`` or ``val/`` folder. Otherwise ``--parity-data DIR`` is required.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from engine_build.parity import (
    ParityDataError,
    ParitySet,
    evenly_spaced,
    image_dir_parity_set,
    load_images,
)
from training.preprocessing import PreprocessSpec

log = logging.getLogger(__name__)

DATA_DIR_KEYS = ("data_dir", "data_path", "data", "root")
COMPCARS_TEST = Path("data/train_test_split/classification/test.txt")
FOLDER_SPLITS = ("test", "val")


def recorded_data_dir(ckpt: dict) -> Path | None:
    args = ckpt.get("args") or {}
    for key in DATA_DIR_KEYS:
        if isinstance(args.get(key), str) and args[key]:
            return Path(args[key])
    return None


def compcars_parity_set(
    root: Path, classes: list[dict], spec: PreprocessSpec, limit: int
) -> ParitySet:
    """CompCars web-nature test split; labels from <make_id>/<model_id> in each listed path."""
    index = {(str(c.get("make_id")), str(c.get("model_id"))): i for i, c in enumerate(classes)}
    lines = [ln.strip() for ln in (root / COMPCARS_TEST).read_text().splitlines() if ln.strip()]
    chosen = evenly_spaced(sorted(lines), limit)
    files = [root / "data" / "image" / ln for ln in chosen]
    labels = [index.get(tuple(Path(ln).parts[:2]), -1) for ln in chosen]
    return load_images(files, labels, spec, f"{root / COMPCARS_TEST} (CompCars test split)")


def parity_set_for(
    ckpt: dict, spec: PreprocessSpec, parity_data: Path | None, limit: int
) -> ParitySet:
    """``parity_data`` when given, else the checkpoint's own held-out split; never train images."""
    classes = ckpt["classes"]
    if parity_data is not None:
        return image_dir_parity_set(Path(parity_data), classes, spec, limit)
    root = recorded_data_dir(ckpt)
    for candidate in (root, root.parent if root is not None else None):
        # the recorded dir may be the archive root or its ``data/`` folder
        if candidate is not None and (candidate / COMPCARS_TEST).is_file():
            return compcars_parity_set(candidate, classes, spec, limit)
    for split in FOLDER_SPLITS:
        if root is not None and (root / split).is_dir():
            return image_dir_parity_set(root / split, classes, spec, limit)
    raise ParityDataError(
        f"no held-out images: the checkpoint's data dir ({root or 'not recorded'}) has no "
        f"{COMPCARS_TEST} nor {'/'.join(FOLDER_SPLITS)}/ folder; pass --parity-data DIR"
    )


def calibration_images(parity_set: ParitySet, limit: int) -> np.ndarray:
    """INT8 calibration batch: an even spread of the parity images (recorded in parity.json)."""
    idx = evenly_spaced(list(range(len(parity_set.images))), limit)
    return parity_set.images[idx]
