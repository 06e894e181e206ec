"""Dataset readers. :func:`load_index` is the one entry point (also used by engine_build)."""

from __future__ import annotations

from pathlib import Path

from training.datasets.base import DatasetError, DatasetIndex, Sample
from training.datasets.compcars import load_compcars
from training.datasets.compcars_sv import load_compcars_sv
from training.datasets.folder import load_folder

READERS = {"compcars": load_compcars, "compcars-sv": load_compcars_sv, "folder": load_folder}
LEVELS = ("model", "make")
CROPS = ("full", "bbox")
SPLITS = ("train", "test")

__all__ = ["READERS", "DatasetError", "DatasetIndex", "Sample", "load_index"]


def load_index(
    kind: str,
    data_dir: str | Path,
    split: str = "test",
    level: str = "model",
    crop: str = "full",
    strict: bool = False,
) -> DatasetIndex:
    """The samples of one split of a data set (paths, class indices, boxes) and its classes.

    ``kind`` is ``compcars``, ``compcars-sv`` or ``folder``; class order is deterministic and
    identical for both splits.
    """
    if kind not in READERS:
        raise DatasetError(f"unknown dataset kind {kind!r}; choose one of {', '.join(READERS)}")
    if split not in SPLITS or level not in LEVELS or crop not in CROPS:
        raise DatasetError(f"bad split/level/crop: {split!r}/{level!r}/{crop!r}")
    return READERS[kind](Path(data_dir), split, level=level, crop=crop, strict=strict)
