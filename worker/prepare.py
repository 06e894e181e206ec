"""One post's bytes -> a model-ready array, or the reason it cannot be classified.

Runs in the decode thread pool; pure apart from the URL fetch, which its policy guards, and which
runs outside the pool's CPU slot. With
``gpu_jpeg`` a baseline JPEG is only checked from its header here and left for the batched GPU
decoder (worker.gpu_preprocess); every other image is decoded on the CPU as before.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np

from training.preprocessing import PreprocessSpec, preprocess_image
from worker.decoding import (
    decode_base64,
    decode_image,
    draft_factor,
    exif_orientation,
    has_end_of_image,
    jpeg_frame,
    open_checked,
)
from worker.errors import PostError
from worker.schemas import PostEvent, parse_event
from worker.url_fetch import UrlPolicy, fetch_response


@dataclass(frozen=True)
class GpuJpeg:
    """A JPEG left for the batched GPU decoder: its bytes and its EXIF orientation (1..8)."""

    data: bytes
    orientation: int = 1


@dataclass(frozen=True)
class Prepared:
    """A parsed event and its input tensor (or its JPEG for the GPU), or why it goes to the DLQ."""

    event: PostEvent | None
    array: np.ndarray | None
    error: PostError | None
    seconds: float
    jpeg: GpuJpeg | None = None


def _detached(error: PostError) -> PostError:
    """The error without its traceback and the exceptions it was raised from.

    A dead letter's error is kept until its batch is delivered, and a traceback keeps every
    frame it passed through alive with its locals: the post's decoded text, its parsed value,
    its image bytes and decoded pixels, tens of MB per post besides the record's own bytes.
    Only the kind and the reason are needed.
    """
    error.__traceback__ = None
    error.__context__ = error.__cause__ = None
    return error


# Huffman-coded sequential frames (baseline, extended): arithmetic coding (C9), which Pillow's
# decoder refuses, and progressive or lossless frames stay on the CPU path
GPU_JPEG_FRAMES = (0xC0, 0xC1)


def gpu_decodable(img) -> bool:
    """Baseline 8-bit RGB or grey JPEGs: what nvJPEG's batched decoder handles; CMYK,
    progressive and multi-picture files stay on the CPU decoder, and so do RGB-coded ones (an
    Adobe marker with transform 0: libjpeg decodes them without a colour conversion, nvJPEG's
    handling is not verified on a GPU here)."""
    return (
        img.format == "JPEG"
        and img.mode in ("RGB", "L")
        and not img.info.get("progressive")
        and not img.info.get("progression")
        and not (img.mode == "RGB" and img.info.get("adobe_transform") == 0)
    )


def drafts_like_a_block_average(img, spec: PreprocessSpec) -> bool:
    """Whether the GPU path's stand-in for Pillow's draft decode (a block average of the full
    decode) gives the draft's pixels: at full scale always; reduced, only for 4:4:4 and 4:2:0
    chroma. With 4:2:2, 4:4:0 or 4:1:1 libjpeg's scaled decode keeps less chroma than the
    average (up to 44-91 grey levels apart in a review), so those go to the CPU decoder."""
    if draft_factor(*img.size, spec.resize) == 1:
        return True
    layers = getattr(img, "layer", None) or []
    if len(layers) < 3:
        return True  # grey: no chroma
    (_, luma_h, luma_v, _), *chroma = layers
    # each chroma plane at the luma's sampling (4:4:4) or at half of it both ways (4:2:0)
    return all((luma_h, luma_v) in ((h, v), (2 * h, 2 * v)) for _, h, v, _ in chroma)


def prepare(
    raw: bytes | None,
    spec: PreprocessSpec,
    policy: UrlPolicy,
    max_message_bytes: int,
    draft: bool = True,
    gpu_jpeg: bool = False,
    key: bytes | None = None,
    cpu_slot: Callable[[], AbstractContextManager[Any]] = nullcontext,
) -> Prepared:
    """Parse, fetch or decode, and preprocess one record value; never raises for bad input.

    ``max_message_bytes`` bounds the record's key and value together: a huge key is as much a
    hostile record as a huge value (and the dead letter carries both). The CPU work runs inside
    ``cpu_slot()`` and a URL fetch outside it, so a pool can bound its decoders while more of its
    threads wait on hosts (worker/decode_pool.py).
    """
    started = time.perf_counter()
    event = None
    try:
        with cpu_slot():
            if key and len(key) + len(raw or b"") > max_message_bytes:
                raise PostError(
                    "too_large",
                    f"message is {len(key) + len(raw or b'')} bytes (key {len(key)}, value "
                    f"{len(raw or b'')}), limit {max_message_bytes}",
                )
            event = parse_event(raw, max_message_bytes)
            if event.image_b64 is not None:
                data = decode_base64(event.image_b64, policy.max_bytes)
                return _decoded(event, data, spec, draft, gpu_jpeg, started)
        fetched = fetch_response(event.image_url, policy)
        with cpu_slot():
            try:
                return _decoded(event, fetched.data, spec, draft, gpu_jpeg, started)
            except PostError as exc:
                # a CDN's HTML page for an expired link, a body the server compressed: what it
                # said the body is tells the producer more than "not a recognised image"
                if exc.kind != "not_an_image" or not (said := fetched.described()):
                    raise
                raise PostError(exc.kind, f"{exc.reason} ({said})") from None
    except PostError as exc:
        return Prepared(event, None, _detached(exc), time.perf_counter() - started)
    except Exception as exc:  # a decoder bug must not take the worker down with the post
        reason = f"unexpected {exc.__class__.__name__}: {exc}"
        return Prepared(event, None, PostError("internal", reason), time.perf_counter() - started)


def gpu_jpeg_of(data: bytes, spec: PreprocessSpec) -> GpuJpeg | None:
    """``data`` as a JPEG for the GPU's batched decoder, or None when the CPU decodes it (not a
    baseline 8-bit JPEG); raises PostError for an image refused from its header."""
    header = open_checked(data, resize=spec.resize)
    # a truncated JPEG (no end-of-image marker after its scan) goes to the CPU decoder here,
    # which names it for the DLQ: left for the GPU, it would fail its whole batch's nvJPEG
    # call and have every JPEG of that batch decoded again one by one
    if (
        gpu_decodable(header)
        and jpeg_frame(data) in GPU_JPEG_FRAMES
        and drafts_like_a_block_average(header, spec)
        and has_end_of_image(data)
    ):
        return GpuJpeg(data, exif_orientation(header))
    return None


def _decoded(
    event: PostEvent, data: bytes, spec: PreprocessSpec, draft: bool, gpu_jpeg: bool, started: float
) -> Prepared:
    """The image in ``data`` as the model's input, or (``gpu_jpeg``) as a JPEG for the GPU."""
    if gpu_jpeg and (jpeg := gpu_jpeg_of(data, spec)) is not None:
        return Prepared(event, None, None, time.perf_counter() - started, jpeg)
    image = decode_image(data, draft_size=spec.resize if draft else None, resize=spec.resize)
    array = preprocess_image(image, spec)
    return Prepared(event, array, None, time.perf_counter() - started)


def decode_on_cpu(
    prep: Prepared,
    spec: PreprocessSpec,
    cpu_slot: Callable[[], AbstractContextManager[Any]] = nullcontext,
) -> Prepared:
    """The CPU decode of a JPEG the GPU decoder refused: its array, or the PostError for the DLQ.

    The decode runs inside ``cpu_slot()``, as in :func:`prepare` (a slot refused to a thread
    written off meanwhile is this post's ``internal`` error)."""
    if prep.jpeg is None:
        return prep
    started = time.perf_counter()
    try:
        with cpu_slot():
            image = decode_image(prep.jpeg.data, draft_size=spec.resize, resize=spec.resize)
            array = preprocess_image(image, spec)
        return Prepared(prep.event, array, None, prep.seconds + time.perf_counter() - started)
    except PostError as exc:
        return Prepared(
            prep.event, None, _detached(exc), prep.seconds + time.perf_counter() - started
        )
    except Exception as exc:
        reason = f"unexpected {exc.__class__.__name__}: {exc}"
        return Prepared(prep.event, None, PostError("internal", reason), prep.seconds)
