"""A plain class-per-folder tree: ``<make>/<model>/*.jpg`` or ``<class>/*.jpg``.

If ``DIR`` has a ``train/`` folder and a held-out one (``test/``, ``val/``, ``valid/`` or
``validation/``, in that order of preference) they are the splits; with no split-like folder, a
stable hash of each file's relative path puts ``TEST_PERCENT`` % of every class in ``test``. A tree
with some split-like folders but not that pair is refused: reading them as makes would mix the
held-out images into training.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

from training.cli_errors import utf8_problem
from training.datasets.base import (
    IMAGE_SUFFIXES,
    DatasetError,
    DatasetIndex,
    Sample,
    filter_corrupt,
)

log = logging.getLogger(__name__)

TEST_PERCENT = 20
SPLIT_DIRS = {"train": ("train",), "test": ("test", "val", "valid", "validation")}
SPLIT_NAMES = {name for names in SPLIT_DIRS.values() for name in names}


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_name(folder: Path) -> str:
    """A class folder's name, which becomes a label in labels.json, the plots and the bundle
    manifest: it must be text, so a name that is not UTF-8 is refused, naming the folder."""
    if utf8_problem(folder.name) is not None:  # the whole path is then not UTF-8 either
        raise DatasetError(
            f"class folder {utf8_problem(folder)} has a name that is not UTF-8 (it would be a "
            "label); rename it"
        )
    return folder.name


def scan_tree(root: Path) -> dict[tuple[str, str], list[Path]]:
    """``(make, model) -> images``; a one-level tree uses the class name for both."""
    out: dict[tuple[str, str], list[Path]] = {}
    for top in _subdirs(root):
        nested = [d for d in _subdirs(top) if _images(d)]
        if nested:
            for d in nested:
                out[(_class_name(top), _class_name(d))] = _images(d)
        elif _images(top):
            out[(_class_name(top), _class_name(top))] = _images(top)
    return out


def _in_test(rel: str) -> bool:
    # fsencode: the name's bytes as stored, also for a name that is not UTF-8
    return int(hashlib.sha1(os.fsencode(rel)).hexdigest()[:8], 16) % 100 < TEST_PERCENT


def find_split_dirs(root: Path) -> dict[str, Path]:
    """``{"train": dir, "test": dir}`` when ``root`` has a train folder and a held-out one
    (names matched case-insensitively); ``{}`` when it has no split-like folder at all."""
    found = {d.name.lower(): d for d in _subdirs(root) if d.name.lower() in SPLIT_NAMES}
    if not found:
        return {}
    train = found.get("train")
    held_out = next((found[n] for n in SPLIT_DIRS["test"] if n in found), None)
    if train is None or held_out is None:
        names = ", ".join(f"{d.name}/" for d in sorted(found.values()))
        raise DatasetError(
            f"{root} has split folder(s) {names} but not both train/ and a held-out test/, val/, "
            "valid/ or validation/; add the missing one, or put the classes directly under "
            f"{root} for a {TEST_PERCENT}% hash split"
        )
    unused = ", ".join(f"{d.name}/" for d in sorted(found.values()) if d not in (train, held_out))
    if unused:
        log.warning("%s: using %s/ as the test split; %s not used", root, held_out.name, unused)
    return {"train": train, "test": held_out}


def load_folder(
    data_dir: Path, split: str, level: str = "model", crop: str = "full", strict: bool = False
) -> DatasetIndex:
    root = Path(data_dir)
    if not root.is_dir():
        raise DatasetError(f"no such data directory: {root}")
    split_roots = find_split_dirs(root)
    if split_roots:
        trees = {s: scan_tree(r) for s, r in split_roots.items()}
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
