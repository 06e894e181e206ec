"""JPEG decoding (nvJPEG, batched) and preprocessing on the engine's GPU, for the CUDA backends.

On a GPU the engine outruns CPU JPEG decoding by two orders of magnitude, so with
``gpu_decode`` on the decode threads only parse the post and read the image header; baseline
JPEGs are then decoded for the whole batch at once with ``torchvision.io.decode_jpeg(device=
"cuda")``, resized, cropped and normalised on the device, and handed to the engine without a trip
through host memory. Everything here is written against torch tensors on any device, so the
same code is tested on the CPU and runs on CUDA.

The arithmetic follows the worker's CPU path: a large JPEG is first reduced by the 1/2, 1/4 or
1/8 factor Pillow's draft mode decodes it at (:func:`worker.decoding.decode_image`), here as a
block average of the full-size decode, then turned by its EXIF orientation (after the
reduction, as the CPU path turns its drafted image), then
:func:`training.preprocessing.preprocess_image` (shorter side to ``resize`` with antialiased
bilinear, centre crop with torchvision's rounding, black padding, ``(x/255 - mean) / std``);
resampling differs from Pillow's by a few grey levels on smooth photos (more at sharp edges: a
mean of 1-3 levels on noise). The block average stands for the draft only with 4:4:4 and 4:2:0
chroma, so other subsamplings that would be drafted stay on the CPU path
(:func:`worker.prepare.drafts_like_a_block_average`). The block average also keeps the scale
factor left for ``F.interpolate`` small: its antialiased CUDA kernels refuse large ones ("Too
much shared memory required").
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 -- the conventional name

from training.preprocessing import PreprocessSpec, center_crop_offset, shorter_side_size
from worker.decoding import draft_factor, has_end_of_image
from worker.prepare import GpuJpeg

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
K = TypeVar("K")


def exif_orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation to a CHW tensor, as ``PIL.ImageOps.exif_transpose`` does.

    nvJPEG ignores EXIF (torchvision applies it on the CPU only), so the orientation read from
    the header in the decode thread is applied here.
    """
    h, w = 1, 2
    if orientation == 2:  # mirrored
        return image.flip(w)
    if orientation == 3:  # rotated 180
        return image.flip(h, w)
    if orientation == 4:  # mirrored vertically
        return image.flip(h)
    if orientation == 5:  # transposed
        return image.transpose(h, w)
    if orientation == 6:  # PIL ROTATE_270: 90 degrees clockwise
        return image.transpose(h, w).flip(w)
    if orientation == 7:  # transversed
        return image.transpose(h, w).flip(h, w)
    if orientation == 8:  # PIL ROTATE_90: 90 degrees counter-clockwise
        return image.transpose(h, w).flip(h)
    return image


def decode_jpegs(jpegs: Sequence[GpuJpeg], device: torch.device | str) -> list[torch.Tensor]:
    """Decode JPEGs in one batched call to uint8 RGB CHW tensors on ``device``, as stored: the
    EXIF orientation is applied by :func:`resize_crop`, after the draft reduction (the CPU path
    transposes the drafted image, so a partial block stays at the stored right and bottom edges).

    Raises RuntimeError when any of them fails (torchvision returns no partial results); the
    caller then decodes them one by one to find the bad ones.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    for n, j in enumerate(jpegs):
        if not has_end_of_image(j.data):
            # libjpeg (the CPU decoder) refuses a truncated scan; nvJPEG is not known to, and a
            # half-decoded picture would be classified instead of dead-lettered
            raise RuntimeError(f"JPEG {n} of the batch ends before its EOI marker (truncated?)")
    raw = [torch.frombuffer(bytearray(j.data), dtype=torch.uint8) for j in jpegs]
    return decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)


def decode_bisecting(
    decode: Callable[[list[T]], list[R]], items: dict[int, T]
) -> tuple[dict[int, R], list[int]]:
    """Decoded items by key, and the keys that fail to decode even alone.

    A batched nvJPEG call returns nothing when any of its images fails, so a failed call is split
    in halves and each half decoded again: one bad JPEG in a batch of n costs about 2 log2(n)
    calls, not n single-image calls (and a batch too large for GPU memory gets smaller calls).
    """
    out: dict[int, R] = {}
    bad: list[int] = []
    pending = [sorted(items)]
    calls, first_error = 0, None
    while pending:
        keys = pending.pop()
        calls += 1
        try:
            out.update(zip(keys, decode([items[k] for k in keys]), strict=True))
        except Exception as exc:
            first_error = first_error or exc
            if len(keys) == 1:
                bad.append(keys[0])
            else:
                half = len(keys) // 2
                pending += [keys[half:], keys[:half]]
    if first_error is not None:  # one line per batch, however many calls it took
        log.info(
            "batched GPU decode of %d images failed (%s); %d calls in halves, %d image(s) "
            "left to the CPU decoder",
            len(items),
            first_error,
            calls,
            len(bad),
        )
    return out, sorted(bad)


def resize_crop(
    image: torch.Tensor, spec: PreprocessSpec, draft: bool = True, orientation: int = 1
) -> torch.Tensor:
    """uint8 CHW -> float32 CHW of ``spec.crop``, in 0..255 (normalisation is done per batch).

    ``draft``: the image is a full-size JPEG decode, first reduced as the CPU path's draft-mode
    decode reduces it (a k x k block average, partial blocks at the edges, rounded to uint8
    levels, sides ``ceil(side / k)``, as libjpeg's scaled decode makes them). ``orientation``:
    its EXIF orientation, applied after that reduction as the CPU path applies it: turned
    first, the partial blocks would sit at other edges and shift every block (up to ~70 grey
    levels on a 509x597 photo).
    """
    _, h, w = image.shape
    x = image.float()
    k = draft_factor(w, h, spec.resize) if draft else 1
    if k > 1:
        x = F.avg_pool2d(x.unsqueeze(0), k, stride=k, ceil_mode=True).round_()[0]
    x = exif_orient(x, orientation).unsqueeze(0)
    h, w = x.shape[2], x.shape[3]
    new_w, new_h = shorter_side_size(w, h, spec.resize)
    if (new_h, new_w) != (h, w):
        if spec.interpolation == "nearest":
            x = _nearest_like_pillow(x, new_h, new_w)
        else:
            x = F.interpolate(
                x, size=(new_h, new_w), mode=spec.interpolation, antialias=True, align_corners=False
            )
        x = x.clamp_(0, 255).round_()  # Pillow rounds to uint8 between resize and crop
    size = spec.crop
    if new_w < size or new_h < size:  # pad with black, centred, as center_crop does
        pad_w, pad_h = max(size - new_w, 0), max(size - new_h, 0)
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        new_h, new_w = x.shape[2], x.shape[3]
    left, top = center_crop_offset(new_w, new_h, size)
    # a copy, not a view: a view would keep the whole resized image alive until the batch is
    # stacked (0.75 GB of GPU memory for a 19000x20 post resized to a shorter side of 256)
    return x[0, :, top : top + size, left : left + size].clone()


def _nearest_like_pillow(x: torch.Tensor, new_h: int, new_w: int) -> torch.Tensor:
    """NCHW resized by picking the source pixels Pillow's NEAREST resize picks. Pillow
    (``ImagingScaleAffine``) starts at half a step and adds the step ``in / out`` once per output
    pixel in double precision, truncating each sum; torch's ``nearest-exact`` computes each
    position in float32, so near ties the two pick neighbouring pixels (~1% of them, up to ~90
    grey levels apart). The positions are summed the same way here, on the host."""
    h, w = x.shape[-2:]

    def picks(n_in: int, n_out: int) -> torch.Tensor:
        step = n_in / n_out
        steps = np.full(n_out, step)
        steps[0] = step * 0.5
        at = np.add.accumulate(steps)  # one addition after another, as Pillow's loop does
        index = np.clip(at.astype(np.int64), 0, n_in - 1)
        return torch.from_numpy(index).to(x.device)

    return x.index_select(2, picks(h, new_h)).index_select(3, picks(w, new_w))


def normalize(batch: torch.Tensor, spec: PreprocessSpec) -> torch.Tensor:
    """float NCHW in 0..255 -> ``(x/255 - mean) / std``, in place."""
    std = torch.tensor(spec.std, device=batch.device, dtype=batch.dtype).view(1, 3, 1, 1)
    mean = torch.tensor(spec.mean, device=batch.device, dtype=batch.dtype).view(1, 3, 1, 1)
    return batch.mul_(1.0 / (255.0 * std)).sub_(mean / std)


def preprocess_batch(
    images: Sequence[torch.Tensor],
    spec: PreprocessSpec,
    draft: bool = True,
    orientations: Sequence[int] | None = None,
) -> torch.Tensor:
    """Decoded uint8 CHW images (any sizes, as stored) and their EXIF orientations (default:
    none to apply) -> a normalised float32 NCHW batch on their device."""
    turns = orientations if orientations is not None else [1] * len(images)
    rows = [resize_crop(img, spec, draft, o) for img, o in zip(images, turns, strict=True)]
    return normalize(torch.stack(rows), spec)


def preprocess_rows(
    images: Mapping[K, torch.Tensor],
    spec: PreprocessSpec,
    orientations: Mapping[K, int] | None = None,
) -> tuple[dict[K, torch.Tensor], list[K]]:
    """Normalised CHW rows by key, and the keys whose preprocessing fails even alone.

    One batched call first (one normalise: its mean/std uploads and kernels once per batch, not
    per image). If it fails (CUDA out of memory, a scale the antialiased kernel refuses), one
    image at a time, so a failure costs only the images it fails on: the worker decodes those on
    the CPU instead.
    """
    keys = sorted(images)  # type: ignore[type-var]
    rows: dict[K, torch.Tensor] = {}
    failed: list[K] = []
    if not keys:
        return rows, failed
    turns = orientations or {}
    try:
        batch = preprocess_batch(
            [images[k] for k in keys], spec, orientations=[turns.get(k, 1) for k in keys]
        )
        rows.update(zip(keys, batch, strict=True))
    except Exception as exc:
        log.info("GPU preprocessing of the batch failed (%s); one image at a time", exc)
        for k in keys:
            try:
                rows[k] = preprocess_batch([images[k]], spec, orientations=[turns.get(k, 1)])[0]
            except Exception:
                failed.append(k)
    return rows, failed
