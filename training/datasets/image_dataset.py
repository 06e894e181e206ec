"""The torch Dataset over an index: opens each image, crops to its box, applies a transform."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from training.datasets.base import BBox, Sample
from training.preprocessing import oriented_rgb

BBOX_MARGIN = 0.05


def bbox_crop_box(
    bbox: BBox, size: tuple[int, int], margin: float = BBOX_MARGIN
) -> tuple[int, int, int, int] | None:
    """``bbox`` grown by ``margin`` of its size on each side, clamped to an image of ``size``;
    None when nothing of it is left inside the image."""
    x1, y1, x2, y2 = bbox
    mx, my = (x2 - x1) * margin, (y2 - y1) * margin
    w, h = size
    box = (
        max(0, int(x1 - mx)),
        max(0, int(y1 - my)),
        min(w, round(x2 + mx)),
        min(h, round(y2 + my)),
    )
    if box[2] <= box[0] or box[3] <= box[1]:
        return None
    return box


def crop_to_bbox(img: Image.Image, bbox: BBox, margin: float = BBOX_MARGIN) -> Image.Image:
    """Crop to ``bbox`` grown by ``margin`` of its size on each side, clamped to the image."""
    box = bbox_crop_box(bbox, img.size, margin)
    return img if box is None else img.crop(box)


def load_image(sample: Sample) -> Image.Image:
    """The RGB picture of a sample as the worker would decode it (training's ``oriented_rgb``:
    EXIF orientation, transparency on white, 16-bit grey rescaled), cropped to its box when it
    has one.

    The box is cut from the pixels as stored and the crop then turned upright: CompCars boxes
    were labelled on stored pixels (MATLAB's imread ignores EXIF orientation).
    """
    with Image.open(sample.path) as f:
        box = None if sample.bbox is None else bbox_crop_box(sample.bbox, f.size)
        img = oriented_rgb(f, box)
        # closing the file invalidates ``f``; keep a copy when nothing else made a new image
        return img.copy() if img is f else img


class ImageDataset(Dataset):
    def __init__(self, samples: list[Sample], transform: Callable[[Image.Image], Any]):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        sample = self.samples[i]
        return self.transform(load_image(sample)), sample.target
