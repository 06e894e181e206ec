"""The torch Dataset over an index: opens each image, crops to its box, applies a transform."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from training.datasets.base import BBox, Sample

BBOX_MARGIN = 0.05


def crop_to_bbox(img: Image.Image, bbox: BBox, margin: float = BBOX_MARGIN) -> Image.Image:
    """Crop to ``bbox`` grown by ``margin`` of its size on each side, clamped to the image."""
    x1, y1, x2, y2 = bbox
    mx, my = (x2 - x1) * margin, (y2 - y1) * margin
    w, h = img.size
    box = (
        max(0, int(x1 - mx)),
        max(0, int(y1 - my)),
        min(w, round(x2 + mx)),
        min(h, round(y2 + my)),
    )
    if box[2] <= box[0] or box[3] <= box[1]:
        return img
    return img.crop(box)


def load_image(sample: Sample) -> Image.Image:
    """The RGB image of a sample, cropped to its box when it has one."""
    with Image.open(sample.path) as f:
        img = f.convert("RGB")
    return crop_to_bbox(img, sample.bbox) if sample.bbox is not None else img


class ImageDataset(Dataset):
    def __init__(self, samples: list[Sample], transform: Callable[[Image.Image], Any]):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        sample = self.samples[i]
        return self.transform(load_image(sample)), sample.target
