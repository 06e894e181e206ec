"""The pure index every reader returns: samples, classes and what was skipped.

Readers never open images for training; they list them. ``ImageDataset`` opens them.
"""

from __future__ import annotations

import logging
import math
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from training.preprocessing import pixel_mode_problem
from training.text_rules import first_unprintable

log = logging.getLogger(__name__)

BBox = tuple[int, int, int, int]
# the photo formats Pillow opens: the worker's (worker.produce) and JPEG's .jfif and TIFF besides
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
# the suffixes the folder reader reads since NEWLY_READ_SINCE (before, the worker's five alone):
# a class folder holding only such files is a class now that was none for a checkpoint before
NEWLY_READ_SUFFIXES = (".jfif", ".gif", ".tif", ".tiff")
NEWLY_READ_SINCE = "2026-12-07"
CLASSES_NAMED = 20  # classes a warning names before "and N more"
BBOX_MARGIN = 0.05
MIN_BOX_SIDE = 8  # pixels: a box (or what is left of it inside the image) smaller holds no car


class DatasetError(ValueError):
    """A data directory that cannot be read as the requested layout; the message names the path."""


def mat_cell_text(item: Any) -> str:
    """The text of one MATLAB cell as ``scipy.io.loadmat`` returns it; '' when it is empty.

    CompCars' ``.mat`` files hold names as char arrays (loaded as a one-element string array), and
    an empty name as an empty array. A name stored as a number (MATLAB keeps every number as a
    double) reads as people write it: ``3.0`` becomes ``"3"``, ``2.5`` stays ``"2.5"``, and NaN or
    infinity, MATLAB's missing values, count as empty. Text is read as the folder reader reads
    folder names (NFC-normalised, stripped): a decomposed "Škoda" in one row and a composed one in
    another are one brand in the results and trend counts, not two.
    """
    arr = np.asarray(item).reshape(-1)
    if not arr.size:
        return ""
    value = arr[0]
    if isinstance(value, (np.floating, float)):
        number = float(value)
        if not math.isfinite(number):
            return ""
        if number == round(number):
            return str(round(number))
    return unicodedata.normalize("NFC", str(value)).strip()


def bbox_crop_box(
    bbox: BBox, size: tuple[int, int], margin: float = BBOX_MARGIN
) -> tuple[int, int, int, int] | None:
    """``bbox`` grown by ``margin`` of its size on each side, clamped to an image of ``size``;
    None when less than ``MIN_BOX_SIDE`` pixels a side of it is left inside the image."""
    x1, y1, x2, y2 = bbox
    mx, my = (x2 - x1) * margin, (y2 - y1) * margin
    w, h = size
    box = (
        max(0, int(x1 - mx)),
        max(0, int(y1 - my)),
        min(w, round(x2 + mx)),
        min(h, round(y2 + my)),
    )
    if box[2] - box[0] < MIN_BOX_SIDE or box[3] - box[1] < MIN_BOX_SIDE:
        return None
    return box


def control_char_problem(text: str) -> str | None:
    """Why ``text`` cannot be a label (it holds a control character or line break), or None: a
    class name goes into labels.json, the checkpoint, the bundle's manifest and every result
    message (``training.text_rules``; engine_build refuses the same characters in --model-name)."""
    bad = first_unprintable(text)
    if bad is None:
        return None
    return f"holds the control character or line break U+{ord(bad):04X} ({text!r})"


@dataclass(frozen=True)
class Sample:
    path: Path
    target: int
    bbox: BBox | None = None  # (x1, y1, x2, y2), 0-based pixels, x2/y2 exclusive


@dataclass
class DatasetIndex:
    """One split: samples in a stable order, the class list in class-index order, skip counts."""

    samples: list[Sample]
    classes: list[dict[str, Any]]
    skipped_missing: int = 0
    skipped_corrupt: int = 0
    source: str = ""
    notes: list[str] = field(default_factory=list)
    # per class (in class-index order): the suffixes, lower case, of the image files the reader
    # found for it in either split, unreadable ones too; empty where a reader does not record
    # them (only the folder reader's classes come from which files a folder holds)
    class_suffixes: list[frozenset[str]] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def class_counts(self) -> list[int]:
        counts = [0] * len(self.classes)
        for s in self.samples:
            counts[s.target] += 1
        return counts


def image_problem(path: Path) -> str | None:
    """Why an image cannot be used, from a cheap check (header + structure, no full decode); None
    when it looks readable.

    An image over Pillow's pixel limit (``Image.MAX_IMAGE_PIXELS``: Pillow warns above it and
    refuses above twice it) counts as unreadable too: decoding it would take gigabytes, and the
    worker refuses such images as well. So does one whose pixels have no faithful RGB picture
    (a float or 32-bit TIFF: ``pixel_mode_problem``), which would be trained on as black or white.
    """
    return image_problem_and_size(path)[0]


def image_problem_and_size(path: Path) -> tuple[str | None, tuple[int, int] | None]:
    """``image_problem(path)`` and the ``(width, height)`` its header gives, from one open: the
    size is None when the image is unusable (the problem then says why)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                size = img.size
                mode_problem = pixel_mode_problem(img.mode, img.format)
                img.verify()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return f"over the pixel limit ({message_line(exc)})", None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        return f"corrupt ({message_line(exc)})", None
    if mode_problem is not None:
        return f"unsupported pixels ({mode_problem})", None
    return None, size


def message_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type when it has none), for one-line errors and
    skip reasons: PIL, torch and pickle messages run to several lines."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def filter_corrupt(samples: list[Sample], strict: bool) -> tuple[list[Sample], int]:
    """Drop unreadable images (counted), or raise on the first with ``strict``."""
    kept, _sizes, corrupt = filter_corrupt_sized(samples, strict)
    return kept, corrupt


def filter_corrupt_sized(
    samples: list[Sample], strict: bool
) -> tuple[list[Sample], list[tuple[int, int]], int]:
    """``filter_corrupt``, also handing over each kept image's ``(width, height)`` (in the kept
    samples' order) as the check read it, so a caller that needs sizes (the box check of
    ``--crop bbox``) does not open every image again."""
    kept: list[Sample] = []
    sizes: list[tuple[int, int]] = []
    for s in samples:
        problem, size = image_problem_and_size(s.path)
        if problem is None and size is not None:
            kept.append(s)
            sizes.append(size)
        elif strict:
            raise DatasetError(f"unusable image (--strict): {s.path}: {problem}")
        else:
            log.warning("skipping image %s: %s", s.path, problem)
    return kept, sizes, len(samples) - len(kept)


def class_names(classes: list[dict[str, Any]], targets: list[int]) -> str:
    """The classes ``targets`` as people read them (``Audi A4L (2/10)``), the first
    ``CLASSES_NAMED`` of them, then how many more."""
    from training.datasets.splits import class_label

    shown = ", ".join(class_label(classes[t]) for t in targets[:CLASSES_NAMED])
    more = len(targets) - CLASSES_NAMED
    return shown + (f" and {more} more" if more > 0 else "")


def warn_classes_without_training_images(
    idx: DatasetIndex, where: str, listed: set[int] | None = None
) -> None:
    """Warn, naming them, about the classes of a training index left with no image (all of
    theirs missing, unreadable or in the test split): the model can never learn them. They stay
    in the class list, so class indices (labels.json, a bundle, a resumed run) do not depend on
    which files happen to be readable, and their test images still count against the model.
    ``listed``: the classes with a line in the training split file, where there is one (a class
    with none was named by split_warnings already)."""
    counts = idx.class_counts()
    empty = [t for t, n in enumerate(counts) if n == 0 and (listed is None or t in listed)]
    if empty:
        log.warning(
            "%s: %d of %d classes have no usable training image (their images are missing, "
            "unreadable or all in the test split): %s; the model cannot learn them (they stay in "
            "the class list)",
            where,
            len(empty),
            len(counts),
            class_names(idx.classes, empty),
        )
