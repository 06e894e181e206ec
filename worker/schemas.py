"""Message contracts of DESIGN.md Stage 3: the post event in, the prediction out.

Parsing is a pure function from raw bytes to a validated event or a :class:`PostError`, so every
way an event can be bad has one kind and one reason, tested without a broker.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from json.decoder import JSONArray, JSONObject, scanstring
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from training.json_keys import unique_keys
from worker.errors import PostError

MAX_JSON_DEPTH = 16
MAX_JSON_VALUES = 10_000  # members and elements of all objects and arrays; an event has ~10
_TOO_DEEP = f"JSON nested deeper than {MAX_JSON_DEPTH} levels"
# event times outside these bounds are client bugs (Go's zero time is year 1), and years 1 and
# 9999 overflow datetime arithmetic in the trend buckets: they go to the DLQ as schema errors
EARLIEST_POSTED_AT = datetime(1970, 1, 1, tzinfo=UTC)
LATEST_POSTED_AT = datetime(2100, 1, 1, tzinfo=UTC)
# RFC 3339 date-time: seconds required, fraction optional and of any length (time-secfrac is
# "." 1*DIGIT; pydantic keeps microseconds and drops the rest), offset required (checked apart,
# so a missing offset gets its own message); "T", "t" or a space between date and time
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?P<offset>[Zz]|[+-]\d{2}:\d{2})?"
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


class _OverLimitError(Exception):
    """Raised from inside the parse once the text passes a limit; the partial value is dropped."""


# JSON's number grammar in ASCII digits: json.scanner's pure-Python NUMBER_RE uses ``\d``, which
# also matches other scripts' digits (``1\u0661`` would read as 11), where the C parser refuses them
_INT_DIGITS = 4000  # well under sys.get_int_max_str_digits()'s default, 4300
_NUMBER = re.compile(r"(-?(?:0|[1-9][0-9]*))(\.[0-9]+)?([eE][-+]?[0-9]+)?")


def _bounded_loads(text: str) -> object:
    """``json.loads(text)`` with duplicate keys and NaN/Infinity refused, that stops with
    :class:`_OverLimitError` as soon as the text nests deeper than MAX_JSON_DEPTH or holds more than
    MAX_JSON_VALUES values in its objects and arrays.

    The limits are counted while parsing, not on the parsed value: json.loads of 10 MB of
    ``[[],[],...]`` builds 3.5 million lists (over 200 MB, 3.5 s of the GIL: a scratch
    measurement of 2026-12-07, commit 1e66f34, not recorded in benchmarks/; the 2026-12-06 one
    in docs/faults.md read 3.4 s for the parse, plus 8.5 s for the walk over the parsed value
    that this replaces) before any check could look at them, where this stops after 10,001
    values. The count is exact, not an estimate from the bytes (a comma or bracket inside a
    string is no value), so it refuses exactly the texts whose parsed value breaks a limit,
    and no event of the DESIGN schema (about ten values, two levels) comes near either.
    Strings are read by the C ``scanstring`` that json.loads uses; the containers and scalars
    are walked here, in Python, which costs an event about 20 us more than the C parser.
    """
    values = depth = 0
    memo: dict[str, str] = {}

    def member(string: str, idx: int) -> tuple[object, int]:
        """A value inside an object or array: counted."""
        nonlocal values
        values += 1
        if values > MAX_JSON_VALUES:
            raise _OverLimitError(f"JSON holds over {MAX_JSON_VALUES} values")
        return scan(string, idx)

    def scan(string: str, idx: int) -> tuple[object, int]:
        nonlocal depth
        try:
            nextchar = string[idx]
        except IndexError:
            raise StopIteration(idx) from None
        if nextchar == '"':
            return scanstring(string, idx + 1, True)
        if nextchar == "{" or nextchar == "[":
            depth += 1
            try:
                if depth > MAX_JSON_DEPTH:
                    raise _OverLimitError(_TOO_DEEP)
                if nextchar == "{":
                    return JSONObject((string, idx + 1), True, member, None, unique_keys, memo)
                return JSONArray((string, idx + 1), member)
            finally:
                depth -= 1
        if nextchar == "n" and string.startswith("null", idx):
            return None, idx + 4
        if nextchar == "t" and string.startswith("true", idx):
            return True, idx + 4
        if nextchar == "f" and string.startswith("false", idx):
            return False, idx + 5
        match = _NUMBER.match(string, idx)
        if match is not None:
            integer, frac, exp = match.groups()
            if frac or exp or len(integer) > _INT_DIGITS:
                # an integer past Python's int_max_str_digits is valid JSON: no field of an
                # event is a number, so a float (inf, even) serves an ignored field as well
                return float(integer + (frac or "") + (exp or "")), match.end()
            return int(integer), match.end()
        for constant in ("NaN", "Infinity", "-Infinity"):
            if string.startswith(constant, idx):
                raise ValueError(f"{constant} is not a JSON value")
        raise StopIteration(idx)

    decoder = json.JSONDecoder()
    decoder.scan_once = scan  # raw_decode's entry point: the top-level value, not counted
    return decoder.decode(text)


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
    # a byte order mark, which Windows tools write: RFC 8259 lets a parser ignore it "in the
    # interests of interoperability", and `worker produce --jsonl` (json.loads) does
    text = text.removeprefix("\ufeff")
    try:
        obj = _bounded_loads(text)
    except _OverLimitError as exc:
        raise PostError("invalid_json", str(exc)) from None
    except ValueError as exc:  # JSONDecodeError, a duplicate key, NaN
        raise PostError("invalid_json", f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise PostError("schema", f"expected a JSON object, got {type(obj).__name__}")
    try:
        return PostEvent.model_validate(obj)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'event'}: {e['msg']}" for e in exc.errors()
        )
        raise PostError("schema", problems) from None
