"""The torch Dataset over an index: opens each image, crops to its box, applies a transform.

An image that passed the index's cheap header check can still fail to decode (a truncated JPEG:
``Image.verify`` does not decode JPEG data, and decoding all of CompCars' 136k images before
training would cost minutes). Such an image never kills a run: the dataset hands back an
:class:`UnreadableImage` in its place, :func:`collate_skipping_unreadable` leaves it out of the
batch, and the training loop passes it to an :class:`UnreadableImages` tally, which logs each path
once and counts it (or, with ``--strict``, stops the run with a one-line error naming the file).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate

from training.datasets.base import (
    DatasetError,
    Sample,
    bbox_crop_box,
    message_line,
)
from training.preprocessing import draft_for, oriented_rgb

log = logging.getLogger(__name__)

# what PIL raises for a file whose header looked fine but whose data does not decode
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def load_image(sample: Sample, draft_size: int | None = None) -> Image.Image:
    """The RGB picture of a sample as the worker would decode it (training's ``oriented_rgb``:
    EXIF orientation, transparency on white, 16-bit grey rescaled), cropped to its box when it
    has one.

    The box is cut from the pixels as stored and the crop then turned upright: CompCars boxes
    were labelled on stored pixels (MATLAB's imread ignores EXIF orientation).

    ``draft_size``: a JPEG without a box is decoded at the reduced DCT scale that keeps its
    shorter side >= ``draft_size`` (:func:`draft_for`). Evaluation passes its resize, and so
    decodes as the worker decodes every JPEG post; training passes ``train_draft_size``, the
    least that keeps every random crop at full resolution. A boxed sample is decoded whole,
    since its crop, not the file, is what gets resized (the worker never sees boxes).
    """
    with Image.open(sample.path) as f:
        if draft_size and sample.bbox is None:
            draft_for(f, draft_size)
        box = None if sample.bbox is None else bbox_crop_box(sample.bbox, f.size)
        img = oriented_rgb(f, box)
        # closing the file invalidates ``f``; keep a copy when nothing else made a new image
        return img.copy() if img is f else img


class UnreadableImage(NamedTuple):
    """Stands in for a sample whose image did not decode (picklable: crosses loader workers)."""

    path: str
    reason: str


class ImageDataset(Dataset):
    def __init__(
        self,
        samples: list[Sample],
        transform: Callable[[Image.Image], Any],
        draft_size: int | None = None,
    ):
        self.samples = samples
        self.transform = transform
        self.draft_size = draft_size  # see load_image

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int] | UnreadableImage:
        sample = self.samples[i]
        try:
            img = load_image(sample, self.draft_size)
        except DECODE_ERRORS as exc:
            return UnreadableImage(str(sample.path), message_line(exc))
        return self.transform(img), sample.target


def collate_skipping_unreadable(
    batch: list[tuple[Any, int] | UnreadableImage],
) -> tuple[torch.Tensor, torch.Tensor, list[UnreadableImage]]:
    """``(images, targets, unreadable)``: the batch without the images that did not decode
    (``images`` may be empty when none did) and what they were."""
    bad = [b for b in batch if isinstance(b, UnreadableImage)]
    good = [b for b in batch if not isinstance(b, UnreadableImage)]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), bad
    images, targets = default_collate(good)
    return images, targets, bad


class UnreadableImages:
    """The images of a run that failed to decode: each path logged once and counted, or with
    ``strict`` the first one stops the run (a :class:`DatasetError`, one line naming the file)."""

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.paths: dict[str, str] = {}  # path -> reason, in the order they were met
        self.occurrences = 0  # an image read every epoch counts every epoch

    def add(self, bad: Iterable[UnreadableImage]) -> None:
        for item in bad:
            if self.strict:
                raise DatasetError(f"unreadable image (--strict): {item.path}: {item.reason}")
            self.occurrences += 1
            if item.path not in self.paths:
                self.paths[item.path] = item.reason
                log.warning("skipping unreadable image %s: %s", item.path, item.reason)

    def merge(self, paths: dict[str, str]) -> None:
        """Add images another rank met (path -> reason), without logging them again (that rank
        did) or counting them in ``occurrences`` (this rank's reads)."""
        for path, reason in paths.items():
            self.paths.setdefault(path, reason)

    def __len__(self) -> int:
        return len(self.paths)
