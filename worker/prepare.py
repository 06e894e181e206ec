"""One post's bytes -> a model-ready array, or the reason it cannot be classified.

Runs in the decode thread pool; pure apart from the URL fetch, which its policy guards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from training.preprocessing import PreprocessSpec, preprocess_image
from worker.decoding import decode_base64, decode_image
from worker.errors import PostError
from worker.schemas import PostEvent, parse_event
from worker.url_fetch import UrlPolicy, fetch


@dataclass(frozen=True)
class Prepared:
    """A parsed event and its input tensor, or the error that sends the record to the DLQ."""

    event: PostEvent | None
    array: np.ndarray | None
    error: PostError | None
    seconds: float


def prepare(
    raw: bytes | None,
    spec: PreprocessSpec,
    policy: UrlPolicy,
    max_message_bytes: int,
    draft: bool = True,
) -> Prepared:
    """Parse, fetch or decode, and preprocess one record value; never raises for bad input."""
    started = time.perf_counter()
    event = None
    try:
        event = parse_event(raw, max_message_bytes)
        if event.image_b64 is not None:
            data = decode_base64(event.image_b64, policy.max_bytes)
        else:
            data = fetch(event.image_url, policy)
        image = decode_image(data, draft_size=spec.resize if draft else None)
        array = preprocess_image(image, spec)
        return Prepared(event, array, None, time.perf_counter() - started)
    except PostError as exc:
        return Prepared(event, None, exc, time.perf_counter() - started)
    except Exception as exc:  # a decoder bug must not take the worker down with the post
        reason = f"unexpected {exc.__class__.__name__}: {exc}"
        return Prepared(event, None, PostError("internal", reason), time.perf_counter() - started)
