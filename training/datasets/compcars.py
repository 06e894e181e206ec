"""CompCars web-nature, read from the archive exactly as distributed.

Layout (``DIR`` may be the archive root or its ``data/`` folder)::

    data/image/<make_id>/<model_id>/<year>/<name>.jpg      year may be "unknown"
    data/label/<make_id>/<model_id>/<year>/<name>.txt      viewpoint / box count / x1 y1 x2 y2
    data/misc/make_model_name.mat                          make_names (163,1), model_names (2004,1)
    data/train_test_split/classification/{train,test}.txt  make/model/year/name.jpg per line

Only models named in the split files become classes, in (make_id, model_id) order; listed images
missing from the archive are skipped and counted.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from training.datasets.base import (
    MIN_BOX_SIDE,
    BBox,
    DatasetError,
    DatasetIndex,
    Sample,
    bbox_crop_box,
    control_char_problem,
    filter_corrupt_sized,
    mat_cell_text,
    warn_classes_without_training_images,
)
from training.datasets.matfile import names_problem, read_mat
from training.datasets.splits import examples, read_split, split_warnings, warn_once

log = logging.getLogger(__name__)

SPLIT_DIR = Path("train_test_split/classification")
NAMES_MAT = Path("misc/make_model_name.mat")


def find_data_root(data_dir: Path) -> Path:
    """The archive's ``data/`` folder, given the archive root or ``data/`` itself."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DatasetError(f"no such data directory: {data_dir}")
    for cand in (data_dir / "data", data_dir):
        if (cand / SPLIT_DIR).is_dir() and (cand / "image").is_dir():
            return cand
    raise DatasetError(
        f"{data_dir} is not a CompCars archive: expected data/image/ and "
        f"data/{SPLIT_DIR}/ (or image/ and {SPLIT_DIR}/ directly inside it)"
    )


def cell_strings(cell: np.ndarray) -> list[str]:
    """A MATLAB (N,1) cell array of strings as a list; empty cells become '', and a name stored as
    a whole number reads ``3``, not ``3.0`` (see ``mat_cell_text``)."""
    return [mat_cell_text(item) for item in np.asarray(cell, dtype=object).reshape(-1)]


def names_from_mat(mat: dict[str, Any], mat_path: Path) -> dict[str, list[str]]:
    """``{"makes": [...], "models": [...]}`` (raw; empty names kept as '') from a loaded .mat.

    Both variables must be arrays of names: a struct or any other value in their place is refused,
    rather than read as nothing and every class labelled ``make N`` / ``model N``.
    """
    out = {}
    for key, field in (("make_names", "makes"), ("model_names", "models")):
        if key not in mat:
            raise DatasetError(f"{mat_path} has no {key!r} variable")
        if problem := names_problem(mat[key]):
            raise DatasetError(f"{mat_path}: {key} is {problem}")
        out[field] = cell_strings(mat[key])
    return out


def read_names(mat_path: Path) -> tuple[dict[int, str], dict[int, str]]:
    """1-based ``make_id -> name`` and ``model_id -> name`` (raw; empty names kept as '').

    Read in a child process (see ``matfile``): a damaged file can crash scipy's reader.
    """
    names = read_mat(Path(mat_path), "training.datasets.compcars:names_from_mat")
    makes = {i + 1: str(n) for i, n in enumerate(names["makes"])}
    models = {i + 1: str(n) for i, n in enumerate(names["models"])}
    return makes, models


def make_labels(makes: dict[int, str]) -> dict[int, str]:
    """Make labels as people read them: the archive's name, ``make <id>`` when it is empty.

    A name the archive gives two make ids keeps its plain name on both: the results and the
    trend counts are read by brand, and "Audi (make 2)" next to "Audi (make 8)" would split one
    brand's count in two. The classes stay apart by make_id/model_id in labels.json, and the
    training metrics group makes by id.
    """
    return {i: (n or f"make {i}") for i, n in makes.items()}


def parse_split_line(line: str, split_file: Path) -> tuple[int, int]:
    parts = line.split("/")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError) as exc:
        raise DatasetError(
            f"{split_file}: line {line!r} is not make_id/model_id/year/name.jpg"
        ) from exc


MAX_COORD = 2**31 - 1  # Pillow's images are at most this many pixels wide or high


def read_bbox(label_path: Path) -> BBox | None:
    """The first box of a label file as 0-based (x1, y1, x2, y2) with exclusive x2/y2; None when
    there is no usable one.

    The file holds the viewpoint, the box count and ``x1 y1 x2 y2`` in 1-based inclusive pixels.
    A box under ``MIN_BOX_SIDE`` pixels a side (``10 10 10 10``) is no usable box either.
    A value that is not a finite number within an image's reach (``inf``, ``nan``, ``1e400``)
    makes the box unusable like any other malformed one, rather than an OverflowError.
    Lines are counted without the blank ones (a leading blank line, or one before the box, as
    hand-edited files have), so such a file keeps its box; CRLF and CR line ends and a UTF-8
    byte-order mark read as plain lines.
    """
    try:
        text = label_path.read_text().lstrip("\ufeff")
        lines = [ln for ln in (raw.strip() for raw in text.splitlines()) if ln]
        values = [float(v) for v in lines[2].split()[:4]]
    except (OSError, IndexError, ValueError):
        return None
    if len(values) != 4 or not all(math.isfinite(v) and abs(v) <= MAX_COORD for v in values):
        return None
    x1, y1, x2, y2 = (int(v) for v in values)
    box = max(x1 - 1, 0), max(y1 - 1, 0), x2, y2
    if box[2] - box[0] < MIN_BOX_SIDE or box[3] - box[1] < MIN_BOX_SIDE:
        return None  # inverted, or too small to hold a car: a crop of it would be noise
    return box


def build_classes(
    model_keys: set[tuple[int, int]],
    makes: dict[int, str],
    models: dict[int, str],
    level: str,
) -> tuple[list[dict[str, Any]], dict[tuple[int, int], int]]:
    """Class list in (make_id, model_id) order and the (make_id, model_id) -> index map."""
    make_label = make_labels(makes)
    if level == "make":
        make_ids = sorted({mk for mk, _ in model_keys})
        classes = [
            {"make": make_label.get(mk, f"make {mk}"), "model": "", "make_id": mk, "model_id": None}
            for mk in make_ids
        ]
        pos = {mk: i for i, mk in enumerate(make_ids)}
        return classes, {key: pos[key[0]] for key in model_keys}
    keys = sorted(model_keys)
    classes = [
        {
            "make": make_label.get(mk, f"make {mk}"),
            "model": models.get(md) or f"model {md}",
            "make_id": mk,
            "model_id": md,
        }
        for mk, md in keys
    ]
    return classes, {key: i for i, key in enumerate(keys)}


def check_names(
    keys: set[tuple[int, int]], makes: dict[int, str], models: dict[int, str], mat_path: Path
) -> None:
    """Refuse, naming the row, a make or model name of a class that holds a control character:
    it would go into labels.json, the checkpoint and the bundle's manifest."""
    for mk, md in sorted(keys):
        named = (("make_names", mk, makes.get(mk, "")), ("model_names", md, models.get(md, "")))
        for var, row, name in named:
            if problem := control_char_problem(name):
                raise DatasetError(f"{mat_path}: {var} row {row} {problem}; fix the name")


def warn_unnamed_ids(
    keys: set[tuple[int, int]],
    makes: dict[int, str],
    models: dict[int, str],
    mat_path: Path,
    *split_files: Path,
    level: str = "model",
) -> None:
    """Warn, naming a few, about split ids past the .mat's rows (as the surveillance reader
    does): their classes have no name and would ship as ``make N`` / ``model N`` in labels.json,
    the bundle and every result, where a split file for another archive version is the likely
    cause. Model names are not read for make-level classes, so only make ids count there."""
    checks = [("make_names", {mk for mk, _ in keys}, makes)]
    if level != "make":
        checks.append(("model_names", {md for _, md in keys}, models))
    for var, ids, names in checks:
        unnamed = [str(i) for i in sorted(ids) if i not in names]
        if unnamed:
            label = "make" if var == "make_names" else "model"
            warn_once(
                f"{mat_path} has {len(names)} {var} rows, but {label}_id(s) {examples(unnamed)} "
                f"in the split files ({len(unnamed)} in all) are past them: those classes have "
                f"no {label} name (labelled '{label} N'); is the split from another version of "
                "the archive?",
                mat_path,
                *split_files,
            )


def load_compcars(
    data_dir: Path, split: str, level: str = "model", crop: str = "full", strict: bool = False
) -> DatasetIndex:
    """Index one split (``train`` or ``test``); classes come from both split files."""
    root = find_data_root(data_dir)
    mat_path = root / NAMES_MAT
    if not mat_path.is_file():
        raise DatasetError(f"missing {mat_path} (make/model names)")
    makes, models = read_names(mat_path)
    split_files = {s: root / SPLIT_DIR / f"{s}.txt" for s in ("train", "test")}
    lines = {s: read_split(p) for s, p in split_files.items()}
    keyed = {
        s: [(ln, parse_split_line(ln, split_files[s])) for ln in ls] for s, ls in lines.items()
    }
    all_keys = {key for rows in keyed.values() for _, key in rows}
    check_names(all_keys, makes, models, mat_path)
    warn_unnamed_ids(all_keys, makes, models, mat_path, *split_files.values(), level=level)
    classes, index = build_classes(all_keys, makes, models, level)
    rows = {s: [(ln, index[key]) for ln, key in keyed[s]] for s in keyed}
    for message in split_warnings(split_files, rows, classes):
        warn_once(message, *split_files.values())

    samples: list[Sample] = []
    missing = 0
    unboxed: list[Path] = []
    for line, key in keyed[split]:
        path = root / "image" / line
        if not path.is_file():
            missing += 1
            continue
        bbox = None
        if crop == "bbox":
            label = (root / "label" / line).with_suffix(".txt")
            bbox = read_bbox(label)
            if bbox is None:
                unboxed.append(label)
        samples.append(Sample(path, index[key], bbox))
    if missing:
        log.info("%s split: %d listed images missing from the archive, skipped", split, missing)
    # the sizes the corrupt check read: the box check below opens no image again
    samples, sizes, corrupt = filter_corrupt_sized(samples, strict)
    if crop == "bbox":  # a box that leaves (next to) nothing of the image is no usable box
        for k, (s, size) in enumerate(zip(samples, sizes, strict=True)):
            if s.bbox is not None and bbox_crop_box(s.bbox, size) is None:
                unboxed.append(s.path)
                samples[k] = Sample(s.path, s.target, None)
    unboxed_count = sum(1 for s in samples if s.bbox is None) if crop == "bbox" else 0
    if unboxed_count:
        # a run recorded as crop=bbox that mostly saw whole images would say nothing otherwise
        log.warning(
            "%s split, --crop bbox: %d of %d images have no usable box (missing, unreadable or "
            "malformed label file, or a box outside the image or under %d px a side, e.g. %s) "
            "and are used whole",
            split,
            unboxed_count,
            len(samples),
            MIN_BOX_SIDE,
            unboxed[0],
        )
    idx = DatasetIndex(samples, classes, missing, corrupt, source=f"compcars:{root}")
    if split == "train":
        listed = {target for _, target in rows["train"]}
        warn_classes_without_training_images(idx, str(split_files["train"]), listed)
    return idx
