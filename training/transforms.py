"""Train-time augmentation and the eval transform (which IS ``preprocess_image``)."""

from __future__ import annotations

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


def train_transform(spec: PreprocessSpec) -> Callable[[Image.Image], torch.Tensor]:
    """RandomResizedCrop + flip + light colour jitter (no hue: colour is a car's feature)."""
    return tv.Compose(
        [
            tv.RandomResizedCrop(
                spec.crop, scale=(0.35, 1.0), interpolation=_INTERP[spec.interpolation]
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
