"""CompCars surveillance-nature (``sv_data``).

Layout (``DIR`` is the ``sv_data`` folder)::

    image/<sv_model_id>/<name>.jpg
    sv_make_model_name.mat      one row per sv_model_id (1-based): make name, model name,
                                web-nature model id (the third column is optional here)
    train_surveillance.txt      <sv_model_id>/<name>.jpg per line
    test_surveillance.txt

Assumed from the dataset's README: the .mat holds one variable (``sv_make_model_name``) that is an
(N, 2 or 3) cell array. Surveillance images are already tight crops of the car front, so there are
no boxes. Make ids are not in this file, so a class's make_id is the make name's first sv row.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from training.datasets.base import (
    DatasetError,
    DatasetIndex,
    Sample,
    control_char_problem,
    filter_corrupt,
    mat_cell_text,
    warn_classes_without_training_images,
)
from training.datasets.matfile import cell_problem, read_mat
from training.datasets.splits import examples, read_split, split_warnings, warn_once

NAMES_MAT = "sv_make_model_name.mat"
SPLIT_FILES = {"train": "train_surveillance.txt", "test": "test_surveillance.txt"}


def find_sv_root(data_dir: Path) -> Path:
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DatasetError(f"no such data directory: {data_dir}")
    for cand in (data_dir, data_dir / "sv_data"):
        if (cand / NAMES_MAT).is_file() and (cand / "image").is_dir():
            return cand
    raise DatasetError(
        f"{data_dir} is not a CompCars sv_data folder: expected {NAMES_MAT}, image/ and "
        f"{', '.join(SPLIT_FILES.values())}"
    )


def _cell_id(item: Any) -> int | None:
    """A cell holding an integer id: MATLAB stores numbers as double (``10.0``), and an id may
    also come as an integer of any width or as text; None when empty, non-integral or not a
    number (or negative)."""
    arr = np.asarray(item).reshape(-1)
    if not arr.size:
        return None
    value = arr[0]
    if isinstance(value, (bool, np.bool_)):
        return None
    try:
        number = float(str(value).strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number) or number != round(number) or number < 0:
        return None
    return round(number)


def sv_names_from_mat(mat: dict[str, Any], mat_path: Path) -> list[list[Any]]:
    """``[make, model, web-nature model id or None]`` per sv row, from a loaded .mat.

    The variable must be an (N, 2+) cell array of names: a struct, a nested cell or any other
    value in a cell is refused, rather than printed into a label or read as an empty name.
    """
    keys = [k for k in mat if not k.startswith("__")]
    if not keys:
        raise DatasetError(f"{mat_path} holds no variable")
    key = "sv_make_model_name" if "sv_make_model_name" in mat else keys[0]
    value = mat[key]
    if not isinstance(value, np.ndarray) or value.dtype.names is not None:
        raise DatasetError(f"{mat_path}: {key} is a struct, not a cell array of names")
    if value.dtype.kind not in "OU":
        raise DatasetError(f"{mat_path}: {key} is an array of {value.dtype}, not a cell array")
    cell = np.asarray(value)
    if cell.ndim != 2 or cell.shape[1] < 2:
        raise DatasetError(f"{mat_path}: expected an (N, 2+) cell array, got shape {cell.shape}")
    if not cell.shape[0]:
        raise DatasetError(f"{mat_path}: {key} is empty")
    out = []
    for i, row in enumerate(cell):
        for j in range(min(cell.shape[1], 3)):
            if problem := cell_problem(row[j]):
                raise DatasetError(f"{mat_path}: {key} row {i + 1}, column {j + 1} is {problem}")
        web = _cell_id(row[2]) if cell.shape[1] > 2 else None
        out.append([mat_cell_text(row[0]), mat_cell_text(row[1]), web])
    return out


def read_sv_names(mat_path: Path) -> dict[int, tuple[str, str, int | None]]:
    """``sv_model_id -> (make, model, web-nature model id or None)``.

    Read in a child process (see ``matfile``): a damaged file can crash scipy's reader.
    """
    rows = read_mat(Path(mat_path), "training.datasets.compcars_sv:sv_names_from_mat")
    return {i + 1: (str(make), str(model), web) for i, (make, model, web) in enumerate(rows)}


def load_compcars_sv(
    data_dir: Path, split: str, level: str = "model", crop: str = "full", strict: bool = False
) -> DatasetIndex:
    """Index one surveillance split; classes are the sv models listed in either split file."""
    root = find_sv_root(data_dir)
    names = read_sv_names(root / NAMES_MAT)
    lines = {s: read_split(root / f) for s, f in SPLIT_FILES.items()}
    keyed: dict[str, list[tuple[str, int]]] = {}
    for s, ls in lines.items():
        rows = []
        for ln in ls:
            head = ln.split("/")[0]
            if not head.isdecimal():  # isdigit() takes '²', which int() refuses
                raise DatasetError(f"{root / SPLIT_FILES[s]}: line {ln!r} is not sv_model_id/name")
            rows.append((ln, int(head)))
        keyed[s] = rows
    sv_ids = sorted({i for rows in keyed.values() for _, i in rows})
    mat_path = root / NAMES_MAT
    for i in sv_ids:
        make, model, _web = names.get(i, ("", "", None))
        for column, name in (("make", make), ("model", model)):
            if problem := control_char_problem(name):
                raise DatasetError(f"{mat_path}: row {i}, the {column} name {problem}; fix it")
    unnamed = [str(i) for i in sv_ids if i not in names]
    if unnamed:
        warn_once(
            f"{mat_path} has {len(names)} rows, but sv_model_id(s) {examples(unnamed)} in the "
            f"split files ({len(unnamed)} in all) are past them: those classes have no make or "
            "model name (labelled 'make N'/'model N', make_id null)",
            mat_path,
        )
    first_row_of_make: dict[str, int] = {}
    for i in sorted(names):
        first_row_of_make.setdefault(names[i][0] or f"make {i}", i)

    def make_of(i: int) -> str:
        return (names.get(i, ("", "", None))[0]) or f"make {i}"

    # a make's first sv_model_id in the split files: it orders the unnamed makes ('make N', past
    # the .mat's rows), which all have the row key 0; without it their order followed the string
    # set's iteration, which PYTHONHASHSEED changes per process (torchrun ranks, a --resume or
    # an evaluate would each get another class order)
    first_id_of_make: dict[str, int] = {}
    for i in sv_ids:
        first_id_of_make.setdefault(make_of(i), i)

    def make_order(make: str) -> tuple[int, int]:
        """Named makes by their first .mat row, after the unnamed ones (row key 0, as before,
        so a checkpoint with one unnamed make keeps its order), those by sv_model_id."""
        return first_row_of_make.get(make, 0), first_id_of_make[make]

    if level == "make":
        makes = sorted(first_id_of_make, key=make_order)
        classes = [
            {"make": m, "model": "", "make_id": first_row_of_make.get(m), "model_id": None}
            for m in makes
        ]
        pos = {m: k for k, m in enumerate(makes)}
        index = {i: pos[make_of(i)] for i in sv_ids}
    else:
        classes = []
        for i in sv_ids:
            _make, model, web = names.get(i, ("", "", None))
            classes.append(
                {
                    "make": make_of(i),
                    "model": model or f"model {i}",
                    "make_id": first_row_of_make.get(make_of(i)),
                    "model_id": i,
                    "web_model_id": web,
                }
            )
        index = {i: k for k, i in enumerate(sv_ids)}
    files = {s: root / f for s, f in SPLIT_FILES.items()}
    rows = {s: [(ln, index[i]) for ln, i in keyed[s]] for s in keyed}
    for message in split_warnings(files, rows, classes):
        warn_once(message, *files.values())
    samples, missing = [], 0
    for ln, i in keyed[split]:
        path = root / "image" / ln
        if path.is_file():
            samples.append(Sample(path, index[i], None))
        else:
            missing += 1
    samples, corrupt = filter_corrupt(samples, strict)
    idx = DatasetIndex(samples, classes, missing, corrupt, source=f"compcars-sv:{root}")
    if split == "train":
        listed = {target for _, target in rows["train"]}
        warn_classes_without_training_images(idx, str(files["train"]), listed)
    return idx
