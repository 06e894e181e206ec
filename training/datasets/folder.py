"""A plain class-per-folder tree: ``<make>/<model>/*.jpg`` or ``<class>/*.jpg``.

If ``DIR`` has a ``train/`` folder and a held-out one (``test/``, ``val/``, ``valid/`` or
``validation/``, in that order of preference) they are the splits; with no split-like folder, a
stable hash of each file's relative path puts ``TEST_PERCENT`` % of every class in ``test``. A tree
with some split-like folders but not that pair is refused: reading them as makes would mix the
held-out images into training.

Which folder is a class (below ``DIR``, or below each split folder):

- a top folder with a sub-folder holding images is a make, and each such sub-folder a model: the
  class ``(make, model)`` holds every image below the model folder, at any depth up to
  ``MAX_DEPTH`` (``Kia/Rio/2015/*.jpg`` is a Kia Rio image, as in CompCars' year folders). Images
  directly in the make folder, beside its model folders, are not used (a warning names the folder
  and the count): they have no model;
- otherwise a top folder holding images is a class of its own (make and model both its name).

Nothing is left out silently: images directly in ``DIR``, folders without images, folders deeper
than ``MAX_DEPTH`` and folders other than the splits next to them are each named in a warning.
Hidden entries (``.*``, e.g. macOS's ``._photo.jpg`` sidecars and ``.DS_Store``) and ``__MACOSX``
folders are skipped: they are archive debris, not photos.

Links are followed, but every image is read once: a file reached twice (a linked class folder, a
linked or hard-linked file) belongs to the first path that reaches it without a link (else the
first in sorted order), with a warning naming the other; so no image is in two classes or in both
splits. A folder that links back to a folder above it is not entered again.

A folder's name becomes a label: it is Unicode-normalised (NFC) and stripped of surrounding
spaces, and refused in one line when it is not UTF-8, is then empty, or holds a control
character; two folders whose names then read alike (``Škoda`` in NFC and NFD, ``Audi`` and
``Audi ``, or names differing only in case, ``Audi``/``audi``) are refused in one line naming both
rather than becoming two classes that look the same.
"""

from __future__ import annotations

import hashlib
import logging
import os
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.cli_errors import utf8_problem
from training.datasets.base import (
    IMAGE_SUFFIXES,
    DatasetError,
    DatasetIndex,
    Sample,
    control_char_problem,
    filter_corrupt,
    warn_classes_without_training_images,
)
from training.datasets.splits import examples, warn_once

log = logging.getLogger(__name__)

TEST_PERCENT = 20
SPLIT_DIRS = {"train": ("train",), "test": ("test", "val", "valid", "validation")}
SPLIT_NAMES = {name for names in SPLIT_DIRS.values() for name in names}
MAX_DEPTH = 8  # folders below a model folder that are still read
SKIPPED_DIRS = ("__MACOSX",)
SUFFIXES_NAMED = 10  # suffixes the not-an-image warning counts before "and N more"


def is_hidden(name: str) -> bool:
    """A dotfile or archive debris (``__MACOSX``), never a photo or a class."""
    return name.startswith(".") or name in SKIPPED_DIRS


def _listing(folder: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """``(images, sub-folders, other files)`` of ``folder``, sorted, hidden entries skipped; an
    image is a file with one of ``IMAGE_SUFFIXES``, the other files are counted by the scan."""
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise DatasetError(f"cannot list {folder}: {exc.strerror or exc}") from exc
    images, dirs, others = [], [], []
    for p in entries:
        if is_hidden(p.name):
            continue
        if p.is_dir():
            dirs.append(p)
        elif p.is_file():
            (images if p.suffix.lower() in IMAGE_SUFFIXES else others).append(p)
    return images, dirs, others


def _subdirs(folder: Path) -> list[Path]:
    return _listing(folder)[1]


def suffix_counts(files: list[Path]) -> str:
    """``.txt 3, .heic 2`` (most first; a name without one is ``no suffix``), for a warning: the
    first ``SUFFIXES_NAMED``, then how many more. Files named ``scan.20190101`` and on make a
    suffix each, and 2,000 of them once made a 26 KB warning line."""
    counts = Counter(p.suffix.lower() or "no suffix" for p in files).most_common()
    shown = ", ".join(f"{suffix} {n}" for suffix, n in counts[:SUFFIXES_NAMED])
    more = counts[SUFFIXES_NAMED:]
    if more:
        shown += f" and {len(more)} more suffixes ({sum(n for _, n in more)} files)"
    return shown


def normal_class_name(name: str) -> str:
    """A class folder's name as it becomes a label: Unicode-normalised (NFC) and stripped of
    surrounding spaces. ``--resume`` and evaluate read a checkpoint's class names through it too,
    so one trained on folder names from before this normalisation still matches."""
    return unicodedata.normalize("NFC", name).strip()


def _class_name(folder: Path) -> str:
    """A class folder's name, which becomes a label in labels.json, the plots and the bundle
    manifest: it must be text, so a name that is not UTF-8 is refused, naming the folder; it is
    read NFC-normalised and stripped, and refused when that leaves nothing or it holds a control
    character."""
    if utf8_problem(folder.name) is not None:  # the whole path is then not UTF-8 either
        raise DatasetError(
            f"class folder {utf8_problem(folder)} has a name that is not UTF-8 (it would be a "
            "label); rename it"
        )
    name = normal_class_name(folder.name)
    if not name:
        raise DatasetError(f"class folder {folder!s} has a blank name (it would be a label)")
    if problem := control_char_problem(name):
        raise DatasetError(
            f"class folder {folder.name!a} in {folder.parent} {problem} (it would be a label); "
            "rename it"
        )
    return name


@dataclass(frozen=True)
class _Found:
    split: str
    key: tuple[str, str]
    folder: Path  # the class folder as reached
    make_folder: Path  # the make folder (the class folder itself in a one-level tree)
    path: Path
    linked: bool  # a link led to it (the file or a folder on its way)


class _Scan:
    """One walk over the split roots: every image found, and what was left out."""

    def __init__(self) -> None:
        self.found: list[_Found] = []
        self.warnings: list[str] = []
        self.not_images: list[Path] = []  # files skipped for their suffix

    def listing(self, folder: Path) -> tuple[list[Path], list[Path]]:
        """``(images, sub-folders)`` of ``folder``; its other files are kept for the warning."""
        images, dirs, others = _listing(folder)
        self.not_images += others
        return images, dirs

    def warn_not_images(self, root: Path) -> None:
        """One warning for the tree: how many files of which suffix were not read as images
        (a .heic or .avif photo Pillow cannot open, a README.txt), so none vanishes unsaid."""
        if self.not_images:
            self.warnings.append(
                f"{root}: {len(self.not_images)} file(s) not read, their suffix is no image type "
                f"training reads ({suffix_counts(self.not_images)}; e.g. "
                f"{examples([str(p.relative_to(root)) for p in self.not_images])}); images are "
                f"{', '.join(IMAGE_SUFFIXES)}"
            )

    def below(self, folder: Path, linked: bool, ancestors: tuple[str, ...], depth: int) -> list:
        """``(path, linked)`` of every image in ``folder`` and its sub-folders."""
        real = os.path.realpath(folder)
        if real in ancestors:
            self.warnings.append(f"{folder} links to {real}, a folder it is inside; not read")
            return []
        linked = linked or folder.is_symlink()
        images, dirs = self.listing(folder)
        out = [(p, linked or p.is_symlink()) for p in images]
        for d in dirs:
            if depth >= MAX_DEPTH:
                self.warnings.append(
                    f"{d} is more than {MAX_DEPTH} folders below its class folder; not read"
                )
                continue
            out += self.below(d, linked, (*ancestors, real), depth + 1)
        return out

    def tree(self, split: str, root: Path) -> None:
        direct, tops = self.listing(root)
        if direct:
            self.warnings.append(
                f"{root}: {len(direct)} image(s) directly in it, not in a class folder, are not "
                f"used (e.g. {examples([p.name for p in direct])})"
            )
        root_real = os.path.realpath(root)
        for top in tops:
            top_real = os.path.realpath(top)
            if top_real == root_real:
                self.warnings.append(f"{top} links to {root}, a folder it is inside; not read")
                continue
            images, subs = self.listing(top)
            ancestors = (root_real, top_real)
            models = [(s, self.below(s, top.is_symlink(), ancestors, 1)) for s in subs]
            with_images = [(s, found) for s, found in models if found]
            if with_images:
                make = _class_name(top)
                for s, found in with_images:
                    key = (make, _class_name(s))
                    self.add(split, key, s, top, found)
                if images:
                    self.warnings.append(
                        f"{top}: {len(images)} image(s) directly in this make folder, beside its "
                        f"model folder(s) {examples([s.name + '/' for s, _ in with_images])}, are "
                        "not used (they have no model); move them into a model folder"
                    )
                empty = [s.name + "/" for s, found in models if not found]
                if empty:
                    self.warnings.append(
                        f"{top}: model folder(s) without images, not classes: {', '.join(empty)}"
                    )
            elif images:
                found = [(p, top.is_symlink() or p.is_symlink()) for p in images]
                self.add(split, (_class_name(top), _class_name(top)), top, top, found)
            else:
                self.warnings.append(f"{top} holds no images; not a class")

    def add(
        self, split: str, key: tuple[str, str], folder: Path, make_folder: Path, found: list
    ) -> None:
        self.found += [_Found(split, key, folder, make_folder, p, ln) for p, ln in found]

    def read_once(self) -> list[_Found]:
        """The images found, each file once (see the module's docstring), warning about the
        others per (folder, kept folder)."""
        by_file: dict[Any, list[_Found]] = {}
        for f in self.found:
            try:
                st = f.path.stat()
                ident: Any = (st.st_dev, st.st_ino)
            except OSError:  # gone since the listing: the corrupt check reports it
                ident = os.path.realpath(f.path)
            by_file.setdefault(ident, []).append(f)
        kept: list[_Found] = []
        dropped: dict[tuple[Path, Path], list[Path]] = {}
        for same in by_file.values():
            best = next((f for f in same if not f.linked), same[0])
            kept.append(best)
            for f in same:
                if f is not best:
                    dropped.setdefault((f.folder, best.folder), []).append(f.path)
        for (folder, best_folder), paths in dropped.items():
            self.warnings.append(
                f"{folder}: {len(paths)} image(s) are the same files as ones in {best_folder} (a "
                f"link or a hard link, e.g. {paths[0].name}); each is read once, from {best_folder}"
            )
        order = {id(f): i for i, f in enumerate(self.found)}
        return sorted(kept, key=lambda f: order[id(f)])


def check_names_apart(found: list[_Found]) -> None:
    """Refuse two class folders whose names read alike: the same name once normalised (within a
    split; across the splits that is the same class), or names that differ only in case."""
    same: dict[tuple[str, Any], set[Path]] = {}
    for f in found:
        same.setdefault((f.split, f.key), set()).add(f.folder)
        same.setdefault((f.split, f.key[0]), set()).add(f.make_folder)
    for (_split, name), folders in same.items():
        if len(folders) > 1:
            a, b = sorted(folders)[:2]
            shown = name if isinstance(name, str) else "/".join(dict.fromkeys(name))
            _refuse_alike(a, b, f"the same name ({shown!r}) once Unicode-normalised and stripped")
    by_fold: dict[Any, dict[Any, Path]] = {}
    for f in found:
        by_fold.setdefault(f.key[0].casefold(), {}).setdefault(f.key[0], f.make_folder)
        by_fold.setdefault(tuple(k.casefold() for k in f.key), {}).setdefault(f.key, f.folder)
    for alike in by_fold.values():
        if len(alike) > 1:
            a, b = sorted(alike.values())[:2]
            _refuse_alike(a, b, "names that differ only in case")


def _refuse_alike(a: Path, b: Path, how: str) -> None:
    raise DatasetError(
        f"class folders {a} and {b} (named {a.name!a} and {b.name!a}) have {how}: they would "
        "be two classes that read alike; rename or merge them"
    )


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
    others = [d.name + "/" for d in _subdirs(root) if d.name.lower() not in SPLIT_NAMES]
    if others:
        log.warning(
            "%s: folder(s) beside the split folders are not read: %s", root, examples(others)
        )
    return {"train": train, "test": held_out}


def load_folder(
    data_dir: Path, split: str, level: str = "model", crop: str = "full", strict: bool = False
) -> DatasetIndex:
    root = Path(data_dir)
    if not root.is_dir():
        raise DatasetError(f"no such data directory: {root}")
    split_roots = find_split_dirs(root)
    scan = _Scan()
    if split_roots:
        for s in ("train", "test"):  # train first: an image in both is kept in train
            scan.tree(s, split_roots[s])
    else:
        scan.tree("all", root)
    found = scan.read_once()
    scan.warn_not_images(root)
    for message in scan.warnings:  # once: training indexes both splits, each reading the tree
        warn_once(message)
    check_names_apart(found)
    keys = {f.key for f in found}
    if split_roots:
        chosen_found = [f for f in found if f.split == split]
    else:
        chosen_found = [
            f for f in found if _in_test(str(f.path.relative_to(root))) == (split == "test")
        ]
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
    chosen: dict[tuple[str, str], list[Path]] = {}
    for f in chosen_found:
        chosen.setdefault(f.key, []).append(f.path)
    samples = [Sample(p, index[k], None) for k in sorted(chosen) for p in chosen[k]]
    samples, corrupt = filter_corrupt(samples, strict)
    suffixes: list[set[str]] = [set() for _ in classes]
    for f in found:
        suffixes[index[f.key]].add(f.path.suffix.lower())
    idx = DatasetIndex(
        samples,
        classes,
        0,
        corrupt,
        source=f"folder:{root}",
        class_suffixes=[frozenset(s) for s in suffixes],
    )
    if split == "train":
        warn_classes_without_training_images(idx, str(root))
    return idx
