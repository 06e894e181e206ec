"""A plain class-per-folder tree: ``<make>/<model>/*.jpg`` or ``<class>/*.jpg``.

If ``DIR`` has ``train/`` and ``test/`` (or ``val/``) folders they are the splits; otherwise a
stable hash of each file's relative path puts ``TEST_PERCENT`` % of every class in ``test``.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from training.datasets.base import (
    IMAGE_SUFFIXES,
    DatasetError,
    DatasetIndex,
    Sample,
    filter_corrupt,
)

log = logging.getLogger(__name__)

TEST_PERCENT = 20
SPLIT_DIRS = {"train": ("train",), "test": ("test", "val")}


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_tree(root: Path) -> dict[tuple[str, str], list[Path]]:
    """``(make, model) -> images``; a one-level tree uses the class name for both."""
    out: dict[tuple[str, str], list[Path]] = {}
    for top in _subdirs(root):
        nested = [d for d in _subdirs(top) if _images(d)]
        if nested:
            for d in nested:
                out[(top.name, d.name)] = _images(d)
        elif _images(top):
            out[(top.name, top.name)] = _images(top)
    return out


def _in_test(rel: str) -> bool:
    return int(hashlib.sha1(rel.encode()).hexdigest()[:8], 16) % 100 < TEST_PERCENT


def load_folder(
    data_dir: Path, split: str, level: str = "model", crop: str = "full", strict: bool = False
) -> DatasetIndex:
    root = Path(data_dir)
    if not root.is_dir():
        raise DatasetError(f"no such data directory: {root}")
    split_roots = {
        s: next((root / d for d in dirs if (root / d).is_dir()), None)
        for s, dirs in SPLIT_DIRS.items()
    }
    if split_roots["train"] and split_roots["test"]:
        trees = {s: scan_tree(r) for s, r in split_roots.items() if r is not None}
        keys = set(trees["train"]) | set(trees["test"])
        chosen = {k: v for k, v in trees[split].items()}
    else:
        tree = scan_tree(root)
        keys = set(tree)
        chosen = {
            k: [p for p in ps if _in_test(str(p.relative_to(root))) == (split == "test")]
            for k, ps in tree.items()
        }
    if not keys:
        raise DatasetError(
            f"{root} holds no images in <class>/*.jpg or <make>/<model>/*.jpg folders"
        )
    classes: list[dict[str, Any]]
    if level == "make":
        makes = sorted({mk for mk, _ in keys})
        classes = [{"make": m, "model": "", "make_id": m, "model_id": None} for m in makes]
        pos = {m: i for i, m in enumerate(makes)}
        index = {k: pos[k[0]] for k in keys}
    else:
        ordered = sorted(keys)
        classes = [{"make": mk, "model": md, "make_id": mk, "model_id": md} for mk, md in ordered]
        index = {k: i for i, k in enumerate(ordered)}
    samples = [Sample(p, index[k], None) for k in sorted(chosen) for p in chosen[k]]
    samples, corrupt = filter_corrupt(samples, strict)
    return DatasetIndex(samples, classes, 0, corrupt, source=f"folder:{root}")
