"""Train-time augmentation and the eval transform (which IS ``preprocess_image``)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from PIL import Image
from torchvision.transforms import v2 as tv

from training.preprocessing import PreprocessSpec, preprocess_image

_INTERP = {
    "bilinear": tv.InterpolationMode.BILINEAR,
    "bicubic": tv.InterpolationMode.BICUBIC,
    "nearest": tv.InterpolationMode.NEAREST,
}


# RandomResizedCrop's area fraction and aspect ratio ranges (the ratio is torchvision's default)
TRAIN_CROP_SCALE = (0.35, 1.0)
TRAIN_CROP_RATIO = (3 / 4, 4 / 3)


def train_draft_size(spec: PreprocessSpec) -> int:
    """The shorter side a training JPEG may be decoded down to (by DCT scaling, ``draft_for``)
    with every random crop still at least ``spec.crop`` pixels a side, so drafting never makes
    the crop's resize an upscale.

    A crop of area fraction s and aspect ratio r of a W x H image (W >= H) is sqrt(s W H / r)
    high and sqrt(s W H r) wide, both at least sqrt(s_min r_min) H (r_min = 1 / r_max); so a
    shorter side of crop / sqrt(s_min r_min) keeps every crop >= crop: 438 px for 224. An
    8000x6000 photo then decodes at 1/8 scale (1000x750) instead of whole (~1.6 s a read).
    """
    s_min, r_min = TRAIN_CROP_SCALE[0], min(TRAIN_CROP_RATIO[0], 1 / TRAIN_CROP_RATIO[1])
    return math.ceil(spec.crop / math.sqrt(s_min * r_min))


def train_transform(spec: PreprocessSpec) -> Callable[[Image.Image], torch.Tensor]:
    """RandomResizedCrop + flip + light colour jitter (no hue: colour is a car's feature)."""
    return tv.Compose(
        [
            tv.RandomResizedCrop(
                spec.crop,
                scale=TRAIN_CROP_SCALE,
                ratio=TRAIN_CROP_RATIO,
                interpolation=_INTERP[spec.interpolation],
            ),
            tv.RandomHorizontalFlip(),
            tv.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
            tv.PILToTensor(),
            tv.ToDtype(torch.float32, scale=True),
            tv.Normalize(spec.mean, spec.std),
        ]
    )


class EvalTransform:
    """``preprocess_image`` with the checkpoint's spec, as a tensor: the worker's exact pixels."""

    def __init__(self, spec: PreprocessSpec):
        self.spec = spec

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(preprocess_image(img, self.spec))
