"""Why a post could not be classified: a kind (a stable, low-cardinality DLQ header and metric
label) and a readable reason; and the error that stops the worker itself."""

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
    "decode_timeout",
    "url_refused",
    "url_fetch_failed",
    "internal",
    "corrupt_record",
]

# kinds whose outcome a second try may change (the image host was down, the decode ran late
# on a loaded machine, the engine failed a row): a redelivery that classifies such a post is
# counted (worker/trends_script.py); the other kinds are properties of the post itself
RETRYABLE_KINDS: frozenset[ErrorKind] = frozenset(
    {"url_fetch_failed", "decode_timeout", "internal"}
)


class PostError(Exception):
    """A post that goes to the dead-letter topic instead of being classified."""

    def __init__(self, kind: ErrorKind, reason: str):
        reason = printable(reason)[:500]
        super().__init__(f"{kind}: {reason}")
        self.kind = kind
        self.reason = reason


def printable(text: str) -> str:
    """`text` with every non-printable character as its escape (``\\x1b``, ``\\ud800``).

    Reasons quote what a post sent (a server's status line, a field's value) and travel as a
    DLQ header, a log line and a metric-free label: raw bytes or terminal escapes have no place
    there, and a lone surrogate cannot even be encoded as UTF-8.
    """
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )


class FatalWorkerError(Exception):
    """The worker cannot go on (the batch stays uncommitted and is redelivered after a restart)."""
