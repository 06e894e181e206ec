"""Parity images and the numbers that prove an artifact answers like the PyTorch FP32 model."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from PIL.Image import DecompressionBombError

from engine_build.scores import softmax
from training.preprocessing import PreprocessSpec, draft_for, oriented_rgb, preprocess_image

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
# what PIL raises for an image it will not decode (DecompressionBombError: over twice
# Image.MAX_IMAGE_PIXELS, e.g. a 20000x20000 PNG): skipped like any other bad parity image
UNREADABLE = (OSError, UnidentifiedImageError, DecompressionBombError)


class ParityDataError(ValueError):
    """No usable parity images; the message names the directory."""


@dataclass(frozen=True)
class ParitySet:
    """Preprocessed images (N, 3, H, W) and their class indices (-1 where unknown).

    ``files``: the image file of each row, when the set was read from image files exactly as
    the worker decodes a post (:func:`load_images`, and the dataset reader's held-out split of a
    ``--crop full`` checkpoint); empty for a ``--crop bbox`` held-out split, whose pixels are
    box crops the worker never sees.
    """

    images: np.ndarray
    labels: np.ndarray
    source: str
    files: tuple[str, ...] = ()

    @property
    def labelled(self) -> bool:
        return bool((self.labels >= 0).any())


def class_name_index(classes: list[dict]) -> dict[str, int]:
    """Folder names that identify a class: model name, 'make model', 'make_model', model_id;
    for a make-level class (model "", as training's make roll-up writes it) the make name and
    make_id, since 'Audi ' or 'Audi_' is no folder anyone names."""
    index: dict[str, int] = {}
    for i, c in enumerate(classes):
        make, model = str(c.get("make", "")), str(c.get("model", ""))
        if model.strip():
            keys = (model, f"{make} {model}", f"{make}_{model}", c.get("model_id"))
        else:
            keys = (make, c.get("make_id"))
        for key in keys:
            if key is not None and str(key).strip():
                index.setdefault(str(key), i)
    return index


def evenly_spaced(items: list, limit: int) -> list:
    """A deterministic sample of at most ``limit`` items spread over the whole (sorted) list."""
    if len(items) <= limit:
        return items
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]


def load_images(
    files: list[Path], labels: list[int], spec: PreprocessSpec, source: str
) -> ParitySet:
    """Preprocess ``files`` exactly as the worker will (EXIF orientation and alpha included);
    unreadable files (and decompression bombs) are skipped and logged."""
    arrays, kept, kept_files = [], [], []
    for file, label in zip(files, labels, strict=True):
        try:
            with Image.open(file) as img:
                draft_for(img, spec.resize)  # JPEGs at the worker's DCT scale
                arrays.append(preprocess_image(oriented_rgb(img), spec))
        except UNREADABLE as exc:
            log.warning("skipping unreadable parity image %s: %s", file, exc)
            continue
        kept.append(label)
        kept_files.append(str(file))
    if not arrays:
        raise ParityDataError(f"no readable images in {source}")
    return ParitySet(np.stack(arrays), np.asarray(kept, dtype=np.int64), source, tuple(kept_files))


def image_dir_parity_set(
    root: Path, classes: list[dict], spec: PreprocessSpec, limit: int
) -> ParitySet:
    """Images under ``root``; a parent folder named after a class labels them.

    Only regular files (symlinks to them included) count: opening a FIFO named ``zz.jpg`` blocks
    until a writer appears, i.e. forever, and a directory or device named like an image is none.
    """
    root = Path(root)
    if not root.is_dir():
        raise ParityDataError(f"--parity-data: not a directory: {root}")
    named = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
    files = sorted(p for p in named if p.is_file())
    for p in sorted(set(named) - set(files)):
        log.warning("skipping parity path %s: not a regular file", p)
    if not files:
        raise ParityDataError(
            f"--parity-data: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}"
        )
    files = evenly_spaced(files, limit)
    names = class_name_index(classes)
    labels = [names.get(p.parent.name, -1) for p in files]
    return load_images(files, labels, spec, str(root))


def allowed_flips(threshold: float, n: int) -> int:
    """How many of ``n`` images an agreement ``threshold`` lets flip: its share, rounded to the
    nearest image (halves up). Rounded down, a gate of 0.99 on a 54-image parity set (a small
    data set's test split) allowed none, and one near-tie flip failed the build; a floor of one
    instead would let 1 of 8 flip at 0.999 (the batch-1 check) or 1 of 1."""
    return int(np.floor((1.0 - threshold) * n + 0.5 + 1e-9))


def agreement_passes(agreement: float, n: int, threshold: float) -> bool:
    """Whether ``agreement`` over ``n`` images meets ``threshold`` (see :func:`allowed_flips`)."""
    if n <= 0:
        return agreement >= threshold
    flips = round((1.0 - agreement) * n)
    return flips <= allowed_flips(threshold, n)


def finite_rows(logits: np.ndarray) -> np.ndarray:
    """True for each image whose logits are all finite (no NaN, no inf)."""
    return np.isfinite(logits).all(axis=1)


def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float | None:
    """Top-1 accuracy on the labelled images; an image with a non-finite logit counts as wrong."""
    known = labels >= 0
    if not known.any():
        return None
    right = (logits.argmax(1) == labels) & finite_rows(logits)
    return float(right[known].mean())


def _abs_diff(reference: np.ndarray, candidate: np.ndarray) -> tuple[float | None, float | None]:
    """max and mean |reference - candidate|, None when either has a non-finite logit (a NaN
    would otherwise make the report invalid JSON)."""
    with np.errstate(invalid="ignore"):  # inf - inf
        diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    if diff.size == 0 or not np.isfinite(diff).all():
        return None, None
    return float(diff.max()), float(diff.mean())


def max_prob_diff(reference: np.ndarray, candidate: np.ndarray) -> float | None:
    """The largest |difference| of softmax probabilities over every image and class, None when
    either has a non-finite logit: unlike a logit difference it does not grow with the logits'
    scale, and it is what moves a post's confidence (and its low-confidence status)."""
    if reference.size == 0 or not (np.isfinite(reference).all() and np.isfinite(candidate).all()):
        return None
    return float(np.abs(softmax(reference) - softmax(candidate)).max())


def parity_report(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray) -> dict:
    """Agreement of ``candidate`` logits with the FP32 ``reference`` on the same images.

    An image whose candidate logits are not all finite never agrees (NaN argmaxes to 0 and inf
    to its own class, so argmax alone would count them as answers), and ``non_finite_logits``
    counts them for the gate.
    """
    agree = (reference.argmax(1) == candidate.argmax(1)) & finite_rows(candidate)
    ref_acc, cand_acc = top1_accuracy(reference, labels), top1_accuracy(candidate, labels)
    max_diff, mean_diff = _abs_diff(reference, candidate)
    return {
        "n_images": int(reference.shape[0]),
        "n_labelled": int((labels >= 0).sum()),
        "top1_agreement": float(agree.mean()),
        "non_finite_logits": int((~np.isfinite(candidate)).sum()),
        "max_abs_logit_diff": max_diff,
        "mean_abs_logit_diff": mean_diff,
        "max_abs_prob_diff": max_prob_diff(reference, candidate),
        "top1_accuracy_pytorch": ref_acc,
        "top1_accuracy_artifact": cand_acc,
        "accuracy_cost": None if ref_acc is None or cand_acc is None else ref_acc - cand_acc,
    }


NEAR_TIE_RELATIVE = 0.01  # top-1 flips between logits this close are not counted


def near_ties(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """True for each row where ``reference`` itself scored its top-1 class and ``candidate``'s
    top-1 class within NEAR_TIE_RELATIVE of each other (relative to the top logit, at least 1):
    a flip there is a near-tie (slightly different arithmetic or pixels), not a broken path;
    with only a few images, one such flip would otherwise fail a good engine. False where the
    reference is not finite. (True too where both pick the same class: callers combine it with
    their own ``same``.)"""
    r_top, c_top = reference.argmax(1), candidate.argmax(1)
    rows = np.arange(len(reference))
    with np.errstate(invalid="ignore"):
        gap = np.abs(reference[rows, r_top] - reference[rows, c_top])
        return gap <= NEAR_TIE_RELATIVE * np.maximum(1.0, np.abs(reference[rows, r_top]))


def batch1_report(reference: np.ndarray, batched: np.ndarray, single: np.ndarray) -> dict:
    """How the same images answer one at a time (``single``) against the batched run of the same
    artifact and against the reference: batch 1 is the worker's commonest batch and, for a
    TensorRT profile with min > 1, the padding path."""
    max_diff, _ = _abs_diff(reference, single)
    max_vs_batched, _ = _abs_diff(batched, single)
    b_top, s_top = batched.argmax(1), single.argmax(1)
    # a flip between two classes the batched run itself scored within 1% of each other is a
    # near-tie (FP16 kernels for batch 1 differ slightly), not a broken path
    near_tie = near_ties(batched, single)
    finite = finite_rows(single)
    same = (s_top == b_top) & finite
    return {
        "n_images": int(single.shape[0]),
        "non_finite_logits": int((~np.isfinite(single)).sum()),
        "top1_agreement_with_batched": float((same | (near_tie & finite)).mean()),
        "near_tie_flips": int((~same & near_tie & finite).sum()),
        "max_abs_diff_vs_batched": max_vs_batched,
        "max_abs_logit_diff": max_diff,
        "max_abs_prob_diff": max_prob_diff(reference, single),
    }


def run_batched(
    infer: Callable[[np.ndarray], np.ndarray], images: np.ndarray, batch: int
) -> np.ndarray:
    """Logits for ``images`` in batches of at most ``batch``."""
    return np.concatenate([infer(images[i : i + batch]) for i in range(0, len(images), batch)])
