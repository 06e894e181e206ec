"""The public Redis key schema of the live trends, and which keys a consumed post adds 1 to.

Apart from the writer and the reader (worker/trends.py) so that what only names keys (settings'
TTL bounds, the producer's city check, the pure window arithmetic of worker/trend_windows.py)
imports neither redis nor the Lua script. Documented for readers in docs/trends.md; all sorted
sets of counts:

    carstream:trends:{dim}:m:{YYYYMMDDHHMM}              per event-time minute (UTC)
    carstream:trends:{dim}:h:{YYYYMMDDHH}                per event-time hour (rollup)
    carstream:trends:{dim}:{m|h}:{bucket}:city:{city}    the same, for one city

with dim `make` (member "Toyota"), `model` (member "Toyota|Corolla"), `lowconf` (the
top-1 make guess of low-confidence posts, kept apart from `make`) and `city` (posts per
city; overall keys only). Sorted sets make "top N over a window" one ZUNION of the
window's buckets, summed by Redis, then a sort of a few hundred members at most.

The writer records the TTLs it gives the buckets in the hash `carstream:trends:config`
(`minute_ttl_s`, `hour_ttl_s`); readers choose minute buckets or hour rollups by those. The
writer's own keys: `carstream:trends:applied:{group}` (applied offsets),
`carstream:trends:seen:{post_id}` (the dedup window) and `carstream:trends:retry:{group}`.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

PREFIX = "carstream:trends:"
MODEL_SEPARATOR = "|"
# the input schema's own bound on city (worker/schemas.py): every city a post may carry keeps
# all of its characters (NFKC can lengthen a few, which are cut here), so two cities that
# differ only after the 64th character are not one (they were, with a cut at 64)
CITY_MAX_CHARS = 128
DEFAULT_MINUTE_TTL_S = 48 * 3600
DEFAULT_HOUR_TTL_S = 30 * 24 * 3600
DEFAULT_DEDUP_TTL_S = 3600
MAX_TTL_S = 100 * 366 * 86400  # a century; far larger ones overflow the datetime arithmetic
Dimension = Literal["make", "model", "lowconf", "city"]
Resolution = Literal["m", "h"]


@dataclass(frozen=True, slots=True)
class TrendRecord:
    """One consumed post as the trends see it; make None means dead-lettered (count nothing).

    For low-confidence posts make/model are the classifier's top-1 guess, counted apart.
    ``post_id`` (the idempotency key) dedupes a post re-sent at another offset; None: no dedup.
    ``retryable``: a dead letter whose kind a redelivery may turn out otherwise (a failed fetch),
    noted so that a redelivery which classifies it counts it once.
    """

    topic: str
    partition: int
    offset: int
    posted_at: datetime
    make: str | None
    model: str | None
    city: str | None
    low_confidence: bool = False
    post_id: str | None = None
    retryable: bool = False


def as_utc(ts: datetime) -> datetime:
    """``ts`` in UTC, the zone of every bucket; ValueError for a naive datetime."""
    if ts.tzinfo is None:
        raise ValueError(f"naive datetime {ts.isoformat()}: event times must carry a timezone")
    return ts.astimezone(UTC)


def minute_bucket(ts: datetime) -> str:
    """`YYYYMMDDHHMM` of the UTC minute that contains `ts`."""
    return as_utc(ts).strftime("%Y%m%d%H%M")


def hour_bucket(ts: datetime) -> str:
    """`YYYYMMDDHH` of the UTC hour that contains `ts`."""
    return as_utc(ts).strftime("%Y%m%d%H")


_BIDI_CONTROLS = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
# invisible characters that make one name look like another: zero-width space, word joiner,
# byte-order mark, soft hyphen, Mongolian vowel separator (the joiners ZWJ/ZWNJ stay: they are
# part of how some scripts spell a name)
_ZERO_WIDTH = "\u200b\u2060\ufeff\u00ad\u180e"
# C0 and C1 controls other than whitespace (which the split below collapses), bidi controls
# and zero-width characters
_INVISIBLE = dict.fromkeys(
    [c for c in range(0x20) if chr(c) not in "\t\n\v\f\r\x1c\x1d\x1e\x1f"]
    + [0x7F, *(c for c in range(0x80, 0xA0) if c != 0x85)]  # NEL is whitespace
    + [ord(c) for c in _BIDI_CONTROLS + _ZERO_WIDTH]
)


def normalize_city(city: str | None) -> str | None:
    """The city as it appears in keys: NFKC, trimmed, inner spaces collapsed, casefolded, capped.

    None for a missing or blank city ("Paris ", "paris" and "PARIS" are one city). A normalised
    name normalises to itself: readers pass names back (`--by city` output into `--city`).
    """
    if city is None:
        return None
    norm = city
    for _ in range(8):  # until it stops changing: the cut can split what NFKC would compose
        done = norm
        norm = _normalize_once(norm)
        if norm == done or not norm:
            break
    return norm or None


_DOTTED_I = re.compile("i\u0307+")


def _normalize_once(city: str) -> str:
    # control characters (a terminal's escape sequences), bidirectional overrides and
    # zero-width characters, which can make one name display as another, are no part of a
    # city's name: a hostile post's city would otherwise reach an analyst's terminal as sent
    city = city.translate(_INVISIBLE)
    norm = " ".join(unicodedata.normalize("NFKC", city).split()).casefold()
    # casefold turns the Turkish dotted capital İ into i + U+0307 (combining dot above), so
    # "İstanbul" and "Istanbul" would be two cities; the dot carries no meaning on a lower i
    norm = _DOTTED_I.sub("i", norm)
    # stripped again after the cut, so that the name does not end in a space
    return norm[:CITY_MAX_CHARS].rstrip()


def model_member(make: str, model: str | None) -> str:
    """Sorted-set member of a model: "Make|Model", unambiguous across makes."""
    return f"{make}{MODEL_SEPARATOR}{model or 'unknown'}"


def trend_key(dim: Dimension, res: Resolution, bucket: str, city: str | None = None) -> str:
    """The Redis key of one bucket; `city` must already be normalised."""
    return city_key(f"{PREFIX}{dim}:{res}:{bucket}", city)


def city_key(key: str, city: str | None) -> str:
    """An overall bucket key's per-city twin; ``city`` must already be normalised."""
    return f"{key}:city:{city}" if city else key


CONFIG_KEY = f"{PREFIX}config"


def applied_key(group_id: str) -> str:
    """Hash of the last applied offset per "<topic>:<partition>" for one consumer group."""
    return f"{PREFIX}applied:{group_id}"


def retry_key(group_id: str) -> str:
    """Sorted set of one group's dead letters a redelivery may still classify (internal)."""
    return f"{PREFIX}retry:{group_id}"


def seen_key(post_id: str) -> str:
    """Marks a post_id counted, for the dedup window (TTL ``dedup_ttl_s``)."""
    return f"{PREFIX}seen:{post_id}"


def increments(record: TrendRecord) -> list[tuple[str, str]]:
    """(key, member) pairs a record adds 1 to; none for a dead-lettered record."""
    if record.make is None:
        return []
    city = normalize_city(record.city)
    pairs: list[tuple[str, str]] = []
    for res, bucket in (
        ("m", minute_bucket(record.posted_at)),
        ("h", hour_bucket(record.posted_at)),
    ):
        if record.low_confidence:
            members: list[tuple[Dimension, str]] = [("lowconf", record.make)]
        else:
            members = [("make", record.make), ("model", model_member(record.make, record.model))]
        for dim, member in members:
            pairs.append((trend_key(dim, res, bucket), member))
            if city:
                pairs.append((trend_key(dim, res, bucket, city), member))
        if city:
            pairs.append((trend_key("city", res, bucket), city))
    return pairs


def expire_at(key: str, minute_ttl_s: int, hour_ttl_s: int, now: float) -> int:
    """Unix time a bucket key expires: end of its bucket (or now, if earlier) plus its TTL.

    Anchoring on event time keeps a bucket's lifetime fixed however late events arrive;
    capping at now keeps a far-future posted_at from living for years. A bucket written while
    its minute or hour is still running therefore expires TTL after that write, the last
    write's time deciding: between TTL after the bucket's start and TTL after its end.
    """
    res, bucket = key[len(PREFIX) :].split(":")[1:3]
    if res == "m":
        end = datetime.strptime(bucket, "%Y%m%d%H%M").replace(tzinfo=UTC) + timedelta(minutes=1)
        ttl = minute_ttl_s
    else:
        end = datetime.strptime(bucket, "%Y%m%d%H").replace(tzinfo=UTC) + timedelta(hours=1)
        ttl = hour_ttl_s
    return int(min(end.timestamp(), now)) + ttl
