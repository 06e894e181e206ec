"""The pure index every reader returns: samples, classes and what was skipped.

Readers never open images for training; they list them. ``ImageDataset`` opens them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

log = logging.getLogger(__name__)

BBox = tuple[int, int, int, int]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class DatasetError(ValueError):
    """A data directory that cannot be read as the requested layout; the message names the path."""


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


def is_readable_image(path: Path) -> bool:
    """Cheap integrity check (header + structure, no full decode) used to skip corrupt files."""
    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return False


def filter_corrupt(samples: list[Sample], strict: bool) -> tuple[list[Sample], int]:
    """Drop unreadable images (counted), or raise on the first with ``strict``."""
    kept: list[Sample] = []
    for s in samples:
        if is_readable_image(s.path):
            kept.append(s)
        elif strict:
            raise DatasetError(f"corrupt image (--strict): {s.path}")
        else:
            log.warning("skipping corrupt image %s", s.path)
    return kept, len(samples) - len(kept)
