"""The one evaluation-time preprocessing, shared by training, engine_build and the worker.

Training records a :class:`PreprocessSpec` in the checkpoint; engine_build copies it into the
bundle manifest; the worker applies :func:`preprocess_image` with the manifest's spec. One
implementation means the worker sees exactly the pixels that evaluation saw.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}


class PreprocessSpec(BaseModel):
    """Resize the shorter side to ``resize``, centre-crop ``crop``, scale to [0,1], normalise."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    resize: int = Field(256, ge=1)
    crop: int = Field(224, ge=1)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"
    layout: Literal["NCHW"] = "NCHW"
    color: Literal["RGB"] = "RGB"

    @classmethod
    def for_image_size(cls, image_size: int, **kwargs) -> PreprocessSpec:
        """The torchvision convention: resize to size/0.875, crop to size."""
        return cls(resize=round(image_size / 0.875), crop=image_size, **kwargs)


def resize_shorter_side(img: Image.Image, size: int, interpolation: str) -> Image.Image:
    """Resize so the shorter side is ``size`` (torchvision ``Resize(int)`` rounding)."""
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), _RESAMPLE[interpolation], reducing_gap=None)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Centre crop with torchvision's rounding; pads with black when the image is smaller."""
    w, h = img.size
    if w < size or h < size:
        canvas = Image.new("RGB", (max(w, size), max(h, size)))
        canvas.paste(img, ((max(w, size) - w) // 2, (max(h, size) - h) // 2))
        img, (w, h) = canvas, canvas.size
    top = round((h - size) / 2.0)
    left = round((w - size) / 2.0)
    return img.crop((left, top, left + size, top + size))


def preprocess_image(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """PIL image (any mode) -> float32 array (3, crop, crop), normalised."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    img = resize_shorter_side(img, spec.resize, spec.interpolation)
    img = center_crop(img, spec.crop)
    # (x/255 - mean)/std as one multiply-add per pixel, written straight into the CHW output:
    # two passes over the crop instead of five, which matters in the worker's decode threads
    pixels = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    out = np.empty(pixels.shape, dtype=np.float32)  # C-contiguous CHW, as engines expect
    np.multiply(pixels, 1.0 / (255.0 * std), out=out)
    out += -mean / std
    return out
