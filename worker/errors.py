"""Why a post could not be classified: a kind (a stable, low-cardinality DLQ header and metric
label) and a readable reason."""

from __future__ import annotations

from typing import Literal

ErrorKind = Literal[
    "too_large",
    "invalid_utf8",
    "invalid_json",
    "schema",
    "bad_base64",
    "not_an_image",
    "unsupported_format",
    "truncated_image",
    "decompression_bomb",
    "url_refused",
    "url_fetch_failed",
    "internal",
    "corrupt_record",
]


class PostError(Exception):
    """A post that goes to the dead-letter topic instead of being classified."""

    def __init__(self, kind: ErrorKind, reason: str):
        super().__init__(f"{kind}: {reason}")
        self.kind = kind
        self.reason = reason[:500]
