"""Message contracts of DESIGN.md Stage 3: the post event in, the prediction out.

Parsing is a pure function from raw bytes to a validated event or a :class:`PostError`, so every
way an event can be bad has one kind and one reason, tested without a broker.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from worker.errors import PostError

MAX_JSON_DEPTH = 16
MAX_JSON_VALUES = 10_000  # members and elements of all objects and arrays; an event has ~10
_TOO_DEEP = f"JSON nested deeper than {MAX_JSON_DEPTH} levels"
# event times outside these bounds are client bugs (Go's zero time is year 1), and years 1 and
# 9999 overflow datetime arithmetic in the trend buckets: they go to the DLQ as schema errors
EARLIEST_POSTED_AT = datetime(1970, 1, 1, tzinfo=UTC)
LATEST_POSTED_AT = datetime(2100, 1, 1, tzinfo=UTC)
# RFC 3339 date-time: seconds required, fraction optional, offset required (checked apart, so a
# missing offset gets its own message); "T", "t" or a space between date and time
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?P<offset>[Zz]|[+-]\d{2}:\d{2})?"
)


def _leap_second(value: str, offset: str) -> str:
    """``…:60`` as ``…:59``; only where a leap second can be, the last minute of a UTC day
    (RFC 3339 5.7: 23:59:60Z, or the same instant in another offset)."""
    seconds59 = value[:17] + "59" + value[19:]
    utc_offset = "+00:00" if offset in ("Z", "z") else offset
    try:
        at = datetime.fromisoformat(f"{value[:10]}T{value[11:17]}59{utc_offset}").astimezone(UTC)
    except (ValueError, OverflowError):  # 2026-13-01, year 1 at +01:00: refused below
        at = None
    if at is None or (at.hour, at.minute) != (23, 59):
        raise ValueError(f"posted_at {value[:40]!r}: second 60 exists only at 23:59:60 UTC")
    return seconds59


def in_event_time_range(value: datetime) -> bool:
    """Whether an aware datetime lies in [EARLIEST_POSTED_AT, LATEST_POSTED_AT) UTC."""
    try:
        utc = value.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00
        return False
    return EARLIEST_POSTED_AT <= utc < LATEST_POSTED_AT


class PostEvent(BaseModel):
    """An image post on topic ``car-posts`` (key = post_id). Unknown fields are ignored."""

    model_config = ConfigDict(frozen=True, extra="ignore", str_strip_whitespace=False)

    post_id: str = Field(min_length=1, max_length=128)
    image_b64: str | None = None
    image_url: str | None = Field(None, max_length=4096)
    posted_at: datetime
    platform: str | None = Field(None, max_length=64)
    city: str | None = Field(None, max_length=128)
    lang: str | None = Field(None, max_length=35)

    @field_validator("posted_at", mode="before")
    @classmethod
    def _rfc3339(cls, value: object) -> object:
        """Only RFC 3339 strings: pydantic alone also takes epoch numbers and "1700000000"."""
        if not isinstance(value, str):
            raise ValueError("posted_at must be an RFC 3339 string")
        match = _RFC3339.fullmatch(value)
        if match is None:
            raise ValueError(
                f"posted_at {value[:40]!r} is not an RFC 3339 timestamp like 2026-11-25T14:03:00Z"
            )
        if match.group("offset") is None:
            raise ValueError("posted_at needs a timezone offset (e.g. Z)")
        if value[17:19] == "60":  # an RFC 3339 leap second: datetime has none, so :59
            return _leap_second(value, match.group("offset"))
        return value

    @field_validator("posted_at")
    @classmethod
    def _in_range(cls, value: datetime) -> datetime:
        if value.tzinfo is None:  # unreachable after _rfc3339; kept for model_construct users
            raise ValueError("posted_at needs a timezone offset (e.g. Z)")
        if not in_event_time_range(value):
            raise ValueError(
                f"posted_at {value.isoformat()} is not between {EARLIEST_POSTED_AT:%Y-%m-%d} "
                f"and {LATEST_POSTED_AT:%Y-%m-%d} UTC"
            )
        return value

    @model_validator(mode="after")
    def _one_image(self) -> PostEvent:
        if (self.image_b64 is None) == (self.image_url is None):
            raise ValueError("exactly one of image_b64 and image_url is required")
        return self


class TopKEntry(BaseModel):
    make: str
    model: str
    score: float


class Source(BaseModel):
    topic: str
    partition: int
    offset: int


class Prediction(BaseModel):
    """One result per post on ``car-predictions`` (key = post_id)."""

    post_id: str
    make: str
    model: str
    confidence: float
    top_k: list[TopKEntry]
    status: Literal["ok", "low_confidence"]
    model_name: str
    model_version: str
    posted_at: datetime
    classified_at: datetime
    latency_ms: float
    city: str | None = None
    platform: str | None = None
    source: Source
    worker_id: str


def _shape_problem(obj: object) -> str | None:
    """Why a parsed JSON value is no event's shape: nested deeper than MAX_JSON_DEPTH, or
    holding more than MAX_JSON_VALUES values in its objects and arrays.

    Checked on the parsed value, not the text: json.loads guards its own recursion (a text
    nested past the interpreter's recursion limit raises RecursionError, refused the same way),
    and walking a post's few containers costs microseconds, where any scan of a 280 KB text
    costs more than parsing it (two ``str.count`` passes were half of a GPU worker's CPU per
    post, whose decode threads only parse). The value count stops the walk early: 10 MB of
    ``[[],[],...]`` is two million containers, 8.5 s of the GIL to walk in full.
    """
    stack = [(obj, 1)]
    values = 0
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return _TOO_DEEP
        values += len(value)
        if values > MAX_JSON_VALUES:
            return f"JSON holds over {MAX_JSON_VALUES} values"
        children = value.values() if isinstance(value, dict) else value
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return None


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """An object whose keys are unique: with two ``post_id``s, parsers disagree on which wins."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {duplicate[:64]!r}")
    return obj


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON value")


def parse_event(raw: bytes | None, max_bytes: int) -> PostEvent:
    """Raw message value -> PostEvent, or PostError naming why not."""
    if raw is None:
        raise PostError("schema", "empty message (null value)")
    if len(raw) > max_bytes:
        raise PostError("too_large", f"message is {len(raw)} bytes, limit {max_bytes}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PostError("invalid_utf8", f"not UTF-8 at byte {exc.start}") from None
    try:
        obj = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except RecursionError:
        raise PostError("invalid_json", _TOO_DEEP) from None
    except ValueError as exc:
        raise PostError("invalid_json", f"not JSON: {exc}") from None
    problem = _shape_problem(obj) if isinstance(obj, (dict, list)) else None
    if problem:
        raise PostError("invalid_json", problem)
    if not isinstance(obj, dict):
        raise PostError("schema", f"expected a JSON object, got {type(obj).__name__}")
    try:
        return PostEvent.model_validate(obj)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'event'}: {e['msg']}" for e in exc.errors()
        )
        raise PostError("schema", problems) from None
