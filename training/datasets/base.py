"""The pure index every reader returns: samples, classes and what was skipped.

Readers never open images for training; they list them. ``ImageDataset`` opens them.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

BBox = tuple[int, int, int, int]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class DatasetError(ValueError):
    """A data directory that cannot be read as the requested layout; the message names the path."""


def mat_cell_text(item: Any) -> str:
    """The text of one MATLAB cell as ``scipy.io.loadmat`` returns it; '' when it is empty.

    CompCars' ``.mat`` files hold names as char arrays (loaded as a one-element string array), and
    an empty name as an empty array. A name stored as a number (MATLAB keeps every number as a
    double) reads as people write it: ``3.0`` becomes ``"3"``, ``2.5`` stays ``"2.5"``, and NaN or
    infinity, MATLAB's missing values, count as empty.
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
    return str(value).strip()


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
    worker refuses such images as well.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.verify()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return f"over the pixel limit ({message_line(exc)})"
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        return f"corrupt ({message_line(exc)})"
    return None


def message_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type when it has none), for one-line errors and
    skip reasons: PIL, torch and pickle messages run to several lines."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def is_readable_image(path: Path) -> bool:
    """Cheap integrity check used to skip corrupt or oversized files (see ``image_problem``)."""
    return image_problem(path) is None


def filter_corrupt(samples: list[Sample], strict: bool) -> tuple[list[Sample], int]:
    """Drop unreadable images (counted), or raise on the first with ``strict``."""
    kept: list[Sample] = []
    for s in samples:
        problem = image_problem(s.path)
        if problem is None:
            kept.append(s)
        elif strict:
            raise DatasetError(f"unusable image (--strict): {s.path}: {problem}")
        else:
            log.warning("skipping image %s: %s", s.path, problem)
    return kept, len(samples) - len(kept)
