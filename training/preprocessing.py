"""The one evaluation-time preprocessing, shared by training, engine_build and the worker.

Training records a :class:`PreprocessSpec` in the checkpoint; engine_build copies it into the
bundle manifest; the worker applies :func:`preprocess_image` with the manifest's spec. One
implementation means the worker sees exactly the pixels that evaluation saw. That includes the
step before it: :func:`oriented_rgb` (EXIF orientation, transparency, 16-bit grey) turns an
opened image into the RGB picture both the training loader and the worker's decoder hand on.
No torch here: the worker's decode path imports this module.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

log = logging.getLogger(__name__)

EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the transpose that shows the picture upright (as ImageOps.exif_transpose)
_ORIENT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# 16-bit grey in one byte order or another (TIFF's big-endian grey is I;16B): converted to mode I
# before the 16-bit scaling, as Pillow's point() takes none of them but I;16
_16BIT_GREY = ("I;16", "I;16B", "I;16L", "I;16N")

_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}


# the largest crop training takes (train.py's --image-size, MAX_IMAGE_SIZE) and the resize
# for_image_size gives it (4096 / 0.875): every spec training writes fits. A larger resize only
# makes the worker refuse every post as a decompression bomb (its resized size is over budget).
MAX_CROP = 4096
MAX_RESIZE = 4681
# std divides every pixel in float32: below this a std rounds to 0 there (1e-300 is 0.0 in
# float32) or blows pixels up to inf; mean and std above MAX_NORM are no normalisation either
MIN_STD = 1e-6
MAX_NORM = 1e6


class PreprocessSpec(BaseModel):
    """Resize the shorter side to ``resize``, centre-crop ``crop``, scale to [0,1], normalise."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    resize: int = Field(256, ge=1, le=MAX_RESIZE)
    crop: int = Field(224, ge=1, le=MAX_CROP)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"
    layout: Literal["NCHW"] = "NCHW"
    color: Literal["RGB"] = "RGB"

    @field_validator("mean", "std")
    @classmethod
    def _finite(cls, value: tuple[float, float, float], info: ValidationInfo) -> tuple:
        # a zero or NaN std divides every pixel into inf/NaN: every answer the model gives is
        # then noise, found only by a parity gate after numpy warnings, or not at all
        if not all(math.isfinite(v) for v in value):
            raise ValueError(f"{info.field_name} {value} must be finite")
        if info.field_name == "std" and not all(v > 0 for v in value):
            raise ValueError(f"std {value} must be > 0")
        if info.field_name == "std" and not all(v >= MIN_STD for v in value):
            raise ValueError(f"std {value} must be >= {MIN_STD} (float32 divides by it)")
        if not all(abs(v) <= MAX_NORM for v in value):
            raise ValueError(f"{info.field_name} {value} must be within +-{MAX_NORM:g}")
        return value

    @classmethod
    def for_image_size(cls, image_size: int, **kwargs) -> PreprocessSpec:
        """The torchvision convention: resize to size/0.875, crop to size."""
        return cls(resize=round(image_size / 0.875), crop=image_size, **kwargs)


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1..8) of an opened image; 1 when absent or unreadable.

    Broken EXIF is common (phones and editors write it surprisingly often); it means "as
    stored" rather than rejecting an otherwise good photo.
    """
    try:
        value = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception as exc:  # any EXIF parsing failure means "no orientation"
        log.debug("ignoring unreadable EXIF orientation: %s", exc)
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode -> RGB.

    Transparency is composited on white: a cut-out product shot is seen on a white page, while
    dropping alpha would expose whatever colour the transparent pixels happen to store (often
    black), and the model was trained on opaque photos, so white is the nearest to what it knows.
    """
    if img.mode in _16BIT_GREY:
        img = img.convert("I")
    if img.mode == "I":
        # 16-bit grey (mode I only comes from 16-bit PNGs among the worker's formats): scale
        # 0..65535 to 0..255; a plain convert would clip everything above 255 to white. Modes
        # no 8-bit picture can stand for faithfully (F, 32-bit or signed I from TIFF) are
        # refused before training reads them (:func:`pixel_mode_problem`)
        img = img.point(lambda v: v * (255.0 / 65535.0)).convert("L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "PA"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def pixel_mode_problem(mode: str, image_format: str | None) -> str | None:
    """Why pixels of ``mode`` (as Pillow opened an image of ``image_format``) cannot be turned
    into RGB faithfully by :func:`to_rgb`, or None. Mode F (32-bit float: any range, often 0..1)
    comes out black, and mode I from anything but a PNG (TIFF's 32-bit or signed integers) is
    scaled as 16-bit grey, all white or with its negatives clipped: a model trained on those
    pixels learns nothing of the picture, so training counts such images unusable instead."""
    if mode == "F":
        return "32-bit floating-point pixels (mode F) have no faithful 8-bit RGB picture"
    if mode == "I" and image_format != "PNG":
        return (
            "32-bit or signed integer pixels (mode I) have no faithful 8-bit RGB picture; "
            "8- and unsigned 16-bit images are read"
        )
    return None


def draft_for(img: Image.Image, resize: int) -> None:
    """Ask an opened, not yet loaded JPEG to decode at the smallest DCT scale (1/1, 1/2, 1/4,
    1/8) that keeps both sides >= ``resize``: several times faster on photos, and what the
    worker does to every JPEG post, so training's evaluation and engine_build's parity images
    are decoded the same way (other formats are left as they are)."""
    if img.format in ("JPEG", "MPO"):
        img.draft("RGB", (resize, resize))


def oriented_rgb(img: Image.Image, box: tuple[int, int, int, int] | None = None) -> Image.Image:
    """An opened image -> the upright RGB picture a viewer sees: EXIF orientation applied,
    transparency on white, 16-bit grey rescaled (see :func:`to_rgb`).

    ``box`` (left, top, right, bottom) crops *before* orientation, in stored-pixel coordinates:
    CompCars boxes were labelled on pixels as stored (MATLAB's imread ignores EXIF), so the
    box is cut from the stored pixels and the crop is then turned upright like the whole photo.
    The result may be ``img`` itself when nothing needed changing.
    """
    img.load()
    method = _ORIENT.get(exif_orientation(img))
    if box is not None:
        img = img.crop(box)
    if method is not None:
        img = img.transpose(method)
    return to_rgb(img)


def shorter_side_size(w: int, h: int, size: int) -> tuple[int, int]:
    """(width, height) with the shorter side ``size``: torchvision ``Resize(int)`` rounding,
    shared by the CPU and GPU preprocessing and the worker's pixel budget."""
    if w <= h:
        return size, int(size * h / w)
    return int(size * w / h), size


def center_crop_offset(w: int, h: int, size: int) -> tuple[int, int]:
    """(left, top) of a centred ``size`` crop of a ``w`` x ``h`` image: torchvision
    ``CenterCrop``'s rounding, shared by the CPU and GPU preprocessing."""
    return round((w - size) / 2.0), round((h - size) / 2.0)


def resize_shorter_side(img: Image.Image, size: int, interpolation: str) -> Image.Image:
    """Resize so the shorter side is ``size`` (torchvision ``Resize(int)`` rounding)."""
    w, h = img.size
    new_w, new_h = shorter_side_size(w, h, size)
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
    left, top = center_crop_offset(w, h, size)
    return img.crop((left, top, left + size, top + size))


def resized_center_crop(
    img: Image.Image, resize: int, crop: int, interpolation: str
) -> Image.Image:
    """:func:`resize_shorter_side` then :func:`center_crop`, in one resample of only the kept
    pixels where the image shrinks and the crop fits.

    Resampling the crop's source box straight to ``crop`` x ``crop`` puts every output pixel at
    the same source position with the same filter as resizing the whole picture and cutting the
    crop out, and skips the border the crop throws away: 45% less work on a 640x480 JPEG draft,
    the worker's commonest case. It is not bit-identical: Pillow rounds to 8 bits between its
    horizontal and vertical passes and picks their order from the sizes (Pillow 13 changed that
    choice), so on photos the two paths agree to one grey level (on up to ~17% of the pixels at
    some sizes), and on pixel-scale noise with bicubic, where the order matters, to ~20 levels:
    the spread between Pillow versions, or between Pillow and torch's antialiased resize.
    Training's evaluation and the worker both call this, so they see the same pixels. Upscaling,
    padding and nearest keep the two-step path (rare, or cheap).
    """
    w, h = img.size
    new_w, new_h = shorter_side_size(w, h, resize)
    if interpolation == "nearest" or new_w < crop or new_h < crop or new_w >= w or new_h >= h:
        return center_crop(resize_shorter_side(img, resize, interpolation), crop)
    left, top = center_crop_offset(new_w, new_h, crop)
    sx, sy = w / new_w, h / new_h
    box = (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)
    return img.resize((crop, crop), _RESAMPLE[interpolation], box=box, reducing_gap=None)


def preprocess_image(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """PIL image (any mode) -> float32 array (3, crop, crop), normalised."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    return normalized_chw(
        resized_center_crop(img, spec.resize, spec.crop, spec.interpolation), spec
    )


def normalized_chw(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """An RGB crop -> float32 CHW ``(x/255 - mean) / std``, C-contiguous."""
    # (x/255 - mean)/std as one multiply-add per pixel, written straight into the CHW output:
    # two passes over the crop instead of five, which matters in the worker's decode threads
    pixels = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    out = np.empty(pixels.shape, dtype=np.float32)  # C-contiguous CHW, as engines expect
    np.multiply(pixels, 1.0 / (255.0 * std), out=out)
    out += -mean / std
    return out
