"""Live brand/model trends in Redis: the public key schema, the exactly-once writer, a reader.

Key schema (documented for readers in docs/trends.md), all sorted sets of counts:

    carstream:trends:{dim}:m:{YYYYMMDDHHMM}              per event-time minute (UTC)
    carstream:trends:{dim}:h:{YYYYMMDDHH}                per event-time hour (rollup)
    carstream:trends:{dim}:{m|h}:{bucket}:city:{city}    the same, for one city

with dim `make` (member "Toyota"), `model` (member "Toyota|Corolla"), `lowconf` (the
top-1 make guess of low-confidence posts, kept apart from `make`) and `city` (posts per
city; overall keys only). Sorted sets make "top N over a window" one ZUNION of the
window's buckets, summed by Redis, then a sort of a few hundred members at most.

The writer records the TTLs it gives the buckets in the hash `carstream:trends:config`
(`minute_ttl_s`, `hour_ttl_s`); readers choose minute buckets or hour rollups by those.

Exactly once: the counts and the applied offset of each (group, topic, partition), in
`carstream:trends:applied:{group}`, change together in one Lua script call. Within a window
(``dedup_ttl_s``), a post re-sent under the same post_id at a new offset is counted once too:
`carstream:trends:seen:{post_id}` is set (NX, with that TTL) in the same call. A dead letter
whose kind a redelivery may turn out otherwise is noted in `carstream:trends:retry:{group}`, so
that a redelivery which classifies it counts it, once.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import numbers
import re
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

import redis

from worker.schemas import EARLIEST_POSTED_AT, LATEST_POSTED_AT
from worker.trends_script import APPLY_BATCH_LUA

logger = logging.getLogger(__name__)

PREFIX = "carstream:trends:"
MODEL_SEPARATOR = "|"
# the input schema's own bound on city (worker/schemas.py): every city a post may carry keeps
# all of its characters (NFKC can lengthen a few, which are cut here), so two cities that
# differ only after the 64th character are not one (they were, with a cut at 64)
CITY_MAX_CHARS = 128
DEFAULT_MINUTE_TTL_S = 48 * 3600
DEFAULT_HOUR_TTL_S = 30 * 24 * 3600
DEFAULT_DEDUP_TTL_S = 3600
# how long, and how many, dead letters of a kind a redelivery may turn out otherwise are noted
# so that a redelivery that classifies one counts it (see trends_script.py); a redelivery comes
# within minutes of the crash that caused it, so a day covers a long outage of the whole group
RETRY_TTL_S = 24 * 3600
RETRY_MAX_ENTRIES = 100_000
MAX_TTL_S = 100 * 366 * 86400  # a century; far larger ones overflow the datetime arithmetic
# the longest window a reader (and `worker trends --window`) reads: past the hour rollups' TTL
# anyway, and far larger ones cost seconds of key arithmetic before any read
MAX_WINDOW_MINUTES = 366 * 1440
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


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """How many records of a batch were applied, how many were at offsets applied before, and
    how many were new offsets carrying a post_id counted within the dedup window."""

    applied: int
    ignored: int
    duplicates: int = 0


# --- pure key schema -------------------------------------------------------------------


def _utc(ts: datetime) -> datetime:
    if ts.tzinfo is None:
        raise ValueError(f"naive datetime {ts.isoformat()}: event times must carry a timezone")
    return ts.astimezone(UTC)


def minute_bucket(ts: datetime) -> str:
    """`YYYYMMDDHHMM` of the UTC minute that contains `ts`."""
    return _utc(ts).strftime("%Y%m%d%H%M")


def hour_bucket(ts: datetime) -> str:
    """`YYYYMMDDHH` of the UTC hour that contains `ts`."""
    return _utc(ts).strftime("%Y%m%d%H")


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


def _expire_at(key: str, minute_ttl_s: int, hour_ttl_s: int, now: float) -> int:
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


# --- writer ----------------------------------------------------------------------------


class TrendWriter:
    """Applies batches of records to the trend keys exactly once per (group, topic, partition)."""

    def __init__(
        self,
        redis_client: redis.Redis,
        group_id: str,
        minute_ttl_s: int = DEFAULT_MINUTE_TTL_S,
        hour_ttl_s: int = DEFAULT_HOUR_TTL_S,
        dedup_ttl_s: int = DEFAULT_DEDUP_TTL_S,
    ) -> None:
        if minute_ttl_s <= 0 or hour_ttl_s <= 0:
            raise ValueError("trend TTLs must be positive")
        if dedup_ttl_s < 0:
            raise ValueError("the dedup TTL must be 0 (off) or positive")
        self._redis = redis_client
        self._applied_key = applied_key(group_id)
        self._retry_key = retry_key(group_id)
        self._minute_ttl_s = minute_ttl_s
        self._hour_ttl_s = hour_ttl_s
        self._dedup_ttl_s = dedup_ttl_s
        self._script = redis_client.register_script(APPLY_BATCH_LUA)

    def ping(self) -> None:
        """One short command on a connection of its own: how the server answers this client
        now, when a failed write says only that the connection broke."""
        self._redis.ping()

    def apply(self, records: Sequence[TrendRecord], now: float | None = None) -> ApplyResult:
        """Count the records not applied before and advance each partition, atomically.

        Safe to call again with the same batch (after a crash before the offset commit),
        and from a replica that lost its partitions meanwhile: neither changes a count. With a
        dedup TTL, a counted record whose post_id was counted within that TTL (a post re-sent by
        its producer, at a new offset) counts nothing either.
        """
        if not records:
            return ApplyResult(0, 0)
        now = time.time() if now is None else now
        key_index: dict[str, int] = {}
        seen_index: dict[str, int] = {}
        by_partition: dict[str, list[TrendRecord]] = {}
        for rec in records:
            by_partition.setdefault(f"{rec.topic}:{rec.partition}", []).append(rec)
        batch = []
        encoded_all: list[list] = []
        for field, recs in by_partition.items():
            encoded = []
            for rec in sorted(recs, key=lambda r: r.offset):
                flat: list[int | str] = []
                for key, member in increments(rec):
                    flat.append(key_index.setdefault(key, len(key_index) + 1))
                    flat.append(member)
                seen = 0  # dead letters count nothing, so they never mark a post_id seen
                if self._dedup_ttl_s and flat and rec.post_id is not None:
                    seen = seen_index.setdefault(seen_key(rec.post_id), len(seen_index) + 1)
                retry = int(rec.retryable and rec.make is None)
                encoded.append([rec.offset, flat, seen, retry])
            batch.append([field, encoded])
            encoded_all.extend(encoded)
        trend_keys = list(key_index)  # insertion order == index order
        for rec_encoded in encoded_all:  # seen keys follow the trend keys in KEYS
            if rec_encoded[2]:
                rec_encoded[2] += len(trend_keys)
        expire = [_expire_at(k, self._minute_ttl_s, self._hour_ttl_s, now) for k in trend_keys]
        applied, ignored, duplicates = self._script(
            keys=[self._applied_key, *trend_keys, *seen_index, self._retry_key, CONFIG_KEY],
            args=[
                json.dumps(batch, ensure_ascii=False),
                json.dumps(expire),
                self._dedup_ttl_s,
                self._minute_ttl_s,
                self._hour_ttl_s,
                int(now),
                RETRY_TTL_S,
                RETRY_MAX_ENTRIES,
            ],
        )
        if ignored:
            logger.info("trends: %d records already applied were ignored", ignored)
        if duplicates:
            logger.info(
                "trends: %d re-sent posts (post_id seen before) were not counted", duplicates
            )
        return ApplyResult(int(applied), int(ignored), int(duplicates))

    def positions(self) -> dict[tuple[str, int], int]:
        """The last applied offset per (topic, partition) for this writer's group."""
        raw = self._redis.hgetall(self._applied_key)
        out: dict[tuple[str, int], int] = {}
        for field, value in raw.items():
            field = field.decode() if isinstance(field, bytes) else field
            topic, _, partition = field.rpartition(":")
            out[(topic, int(partition))] = int(value)
        return out


# --- reader ----------------------------------------------------------------------------


_MINUTE = timedelta(minutes=1)
_HOUR = timedelta(hours=1)


def _hour_chunks(start: datetime, end: datetime) -> Iterator[tuple[datetime, datetime, datetime]]:
    """``[start, end)`` (whole minutes, UTC) cut at the hours: (its hour, chunk start, chunk
    end); a chunk as long as an hour is that whole hour."""
    t = start
    while t < end:
        hour = t.replace(minute=0)
        stop = min(end, hour + _HOUR)
        yield hour, t, stop
        t = stop


def _minute_keys(dim: Dimension, start: datetime, stop: datetime, city: str | None) -> list[str]:
    """The minute buckets of ``[start, stop)``; ``city`` already normalised."""
    return [
        trend_key(dim, "m", minute_bucket(start + i * _MINUTE), city)
        for i in range((stop - start) // _MINUTE)
    ]


@dataclass(frozen=True, slots=True)
class WindowPlan:
    """The keys a trailing window reads, and the minutes ``[start, end)`` they count.

    ``start``/``end`` are the span the keys actually cover: the window asked for
    (``requested_start``/``requested_end``) unless expired minute buckets at an edge were
    replaced by that hour's rollup, which widens the span to the whole hour, or for the hour
    still running to its minutes so far (``widened``).
    """

    keys: list[str]
    start: datetime
    end: datetime
    requested_start: datetime
    requested_end: datetime

    @property
    def widened(self) -> bool:
        return self.start < self.requested_start or self.end > self.requested_end


def window_plan(
    dim: Dimension,
    window_minutes: int,
    now: datetime,
    city: str | None = None,
    minute_ttl_s: int = DEFAULT_MINUTE_TTL_S,
    wall_now: datetime | None = None,
    *,
    hour_ttl_s: int | None = None,
) -> WindowPlan:
    """Keys that together cover the last `window_minutes` minutes up to and including now's,
    and the span they cover.

    Whole hours inside the window are read from hour rollups, the partial hours at its
    edges from minute buckets. Where a partial hour's minute buckets have already expired
    (older than the minute TTL before ``wall_now``, the real current time, which differs from
    ``now`` when a reader asks about the past), that hour's rollup is used instead: the window
    widens by up to 59 minutes at that edge rather than silently missing counts, and the plan's
    ``start``/``end`` (and ``widened``) say so. Callers must report such a span, never pass it
    off as the window asked for.

    The rollup of the hour still running at ``wall_now`` holds nothing after wall_now's minute
    (but posts dated ahead of the writers' clocks), so its span ends there: with a minute TTL
    under an hour, a live window whose first minutes expired widens back to the hour's start,
    not also forward to its end.
    """
    window_minutes = _check_window(window_minutes)
    _check_now(now)
    norm_city = _key_city(city)
    wall = _utc(now if wall_now is None else wall_now)
    end = _utc(now).replace(second=0, microsecond=0)  # the current minute, included
    start = end - timedelta(minutes=window_minutes - 1)
    horizon = wall - timedelta(seconds=minute_ttl_s)
    counted_until = wall.replace(second=0, microsecond=0) + _MINUTE  # no write is later
    # with ``hour_ttl_s``, hours that have certainly expired (their end plus the TTL has
    # passed) are left out: a 366-day window would otherwise name ~8,800 keys, most long gone
    hours_gone_before = None
    if hour_ttl_s is not None:
        hours_gone_before = kept_after(wall, hour_ttl_s) - _HOUR
    keys: list[str] = []
    spans: list[tuple[datetime, datetime]] = []
    for hour, t, stop in _hour_chunks(start, end + _MINUTE):
        if stop - t == _HOUR or t < horizon:
            # a whole hour asked for keeps its span; an expired partial one widens to its
            # hour, but not past the minutes written so far, nor short of the minutes asked
            spans.append((hour, max(stop, min(hour + _HOUR, counted_until))))
            if hours_gone_before is None or hour > hours_gone_before:
                keys.append(trend_key(dim, "h", hour_bucket(hour), norm_city))
        else:
            spans.append((t, stop))
            keys.extend(_minute_keys(dim, t, stop, norm_city))
    return WindowPlan(keys, spans[0][0], spans[-1][1], start, end + _MINUTE)


def window_keys(
    dim: Dimension,
    window_minutes: int,
    now: datetime,
    city: str | None = None,
    minute_ttl_s: int = DEFAULT_MINUTE_TTL_S,
    wall_now: datetime | None = None,
    *,
    hour_ttl_s: int | None = None,
) -> list[str]:
    """The keys of :func:`window_plan` alone. Where edge minutes have expired they cover more
    than the window (up to 59 minutes at each edge): use :func:`window_plan` to know the span."""
    return window_plan(
        dim, window_minutes, now, city, minute_ttl_s, wall_now, hour_ttl_s=hour_ttl_s
    ).keys


def _check_window(window_minutes: object, name: str = "window_minutes") -> int:
    """A window length in whole minutes, 1 to MAX_WINDOW_MINUTES; ValueError otherwise: a
    fraction would shift the window off the minute buckets, and a huge one costs seconds of
    key arithmetic (or overflows it) before any read."""
    if isinstance(window_minutes, bool) or not isinstance(window_minutes, numbers.Integral):
        raise ValueError(f"{name} {window_minutes!r}: must be a whole number of minutes (an int)")
    if not 1 <= window_minutes <= MAX_WINDOW_MINUTES:
        raise ValueError(
            f"{name} {window_minutes}: must be between 1 and {MAX_WINDOW_MINUTES} (366 days)"
        )
    return int(window_minutes)


def _check_now(now: object) -> None:
    """ValueError unless ``now`` is an aware datetime within the years events may carry (no
    bucket lies outside them, and near datetime's own limits the bucket arithmetic overflows)."""
    if not isinstance(now, datetime):
        raise ValueError(f"now {now!r}: must be a timezone-aware datetime")
    if not EARLIEST_POSTED_AT <= _utc(now) < LATEST_POSTED_AT:
        raise ValueError(
            f"now {now.isoformat()}: must lie between {EARLIEST_POSTED_AT:%Y-%m-%d} and "
            f"{LATEST_POSTED_AT:%Y-%m-%d} UTC, the range of event times"
        )


def _check_top(top: object) -> int | None:
    """``top`` as a cut: None (everything) or a whole number >= 0; ValueError otherwise (a
    negative one would cut from the end, a fraction fail deep in a slice)."""
    if top is None:
        return None
    if isinstance(top, bool) or not isinstance(top, numbers.Integral) or top < 0:
        raise ValueError(f"top {top!r}: must be None (everything) or a whole number >= 0")
    return int(top)


def _key_city(city: str | None) -> str | None:
    """The normalised city of a reader's query; ValueError for a city that normalises to
    nothing (blank, or only invisible characters), which would silently read every city."""
    norm = normalize_city(city)
    if city is not None and norm is None:
        raise ValueError(
            f"city {city!r}: blank once normalised (pass city=None to count every city)"
        )
    return norm


MAX_SERIES_INTERVALS = 1000  # one ZUNION each, sent in one pipeline
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MAX_BREAKDOWN_CITIES = 1000  # one ZUNION each, sent in one pipeline


@dataclass(frozen=True, slots=True)
class Interval:
    """One interval of a series: the minutes [start, end) and every member's count in them.

    ``counts`` is None where the buckets that held the interval have expired: a chart should
    show a gap there, not a dip to zero.
    """

    start: datetime
    end: datetime
    counts: dict[str, int] | None

    @property
    def total(self) -> int | None:
        return None if self.counts is None else sum(self.counts.values())


@dataclass(frozen=True, slots=True)
class Change:
    """A member's count in the current window beside the previous window of the same length."""

    name: str
    count: int
    previous: int | None  # None: the previous window's buckets have expired

    @property
    def change(self) -> int | None:
        return None if self.previous is None else self.count - self.previous


def kept_after(wall_now: datetime, ttl_s: int) -> datetime:
    """Buckets that start after this instant are certainly still kept.

    A bucket expires ``ttl_s`` after the end of its minute or hour, or after the write that
    last set its expiry if that came first (``_expire_at`` caps at the write's time, and a
    live hour is written while it is still running). Either way it outlives its own start by
    ``ttl_s``; a bucket that started earlier may have expired, or may not: a reader cannot tell
    an expired bucket from one that never had a post. The exception is a bucket in the future
    of the writer's clock (a post dated ahead), which expires ``ttl_s`` after it was written.
    """
    return _utc(wall_now) - timedelta(seconds=ttl_s)


def series_bounds(
    window_minutes: int, every_minutes: int, now: datetime
) -> list[tuple[datetime, datetime]]:
    """The intervals ``[start, end)`` of a series, oldest first.

    Intervals sit on a grid of ``every_minutes`` counted from the Unix epoch, so that 15m, 1h
    and 1d intervals are clock quarters, hours and UTC days, and a day older than the minute
    buckets is whole hour rollups. The last interval is the one holding now's minute and ends
    after it (it is in progress); there are ``window_minutes // every_minutes`` in all.
    """
    window_minutes = _check_window(window_minutes)
    every_minutes = _check_window(every_minutes, "every_minutes")
    _check_now(now)
    if window_minutes % every_minutes:
        raise ValueError(
            f"a window of {window_minutes} min is not a whole number of "
            f"{every_minutes}-min intervals"
        )
    n = window_minutes // every_minutes
    if n > MAX_SERIES_INTERVALS:
        raise ValueError(f"{n} intervals, more than {MAX_SERIES_INTERVALS}: use longer ones")
    current = _utc(now).replace(second=0, microsecond=0)
    since_epoch = int((current - _EPOCH).total_seconds()) // 60
    grid = _EPOCH + timedelta(minutes=since_epoch - since_epoch % every_minutes)
    every = timedelta(minutes=every_minutes)
    bounds = [(grid - (n - 1 - i) * every, grid - (n - 2 - i) * every) for i in range(n)]
    bounds[-1] = (grid, current + timedelta(minutes=1))
    return bounds


def compare_bounds(
    window_minutes: int, now: datetime
) -> tuple[tuple[datetime, datetime], tuple[datetime, datetime]]:
    """The previous and the current window: the trailing ``window_minutes`` up to and including
    now's minute (what :meth:`TrendReader.top` counts), and the same length just before it."""
    window_minutes = _check_window(window_minutes)
    end = _utc(now).replace(second=0, microsecond=0) + timedelta(minutes=1)
    window = timedelta(minutes=window_minutes)
    return (end - 2 * window, end - window), (end - window, end)


def interval_keys(
    dim: Dimension,
    start: datetime,
    end: datetime,
    city: str | None,
    minute_ttl_s: int,
    hour_ttl_s: int,
    wall_now: datetime,
) -> list[str] | None:
    """Keys holding exactly the minutes ``[start, end)``, or None where some have expired.

    Unlike :func:`window_plan`, which widens a window to an hour rollup when its edge minutes
    have expired (and says so), an interval of a series is never widened: two neighbours
    reading the same rollup would count its posts twice.
    """
    start, end = _utc(start), _utc(end)
    if start.second or start.microsecond or end.second or end.microsecond:
        raise ValueError(f"interval bounds must be whole minutes, got {start} .. {end}")
    minutes_after = kept_after(wall_now, minute_ttl_s)
    hours_after = kept_after(wall_now, hour_ttl_s)
    norm_city = _key_city(city)
    keys: list[str] = []
    for hour, t, stop in _hour_chunks(start, end):
        if stop - t == _HOUR:
            if hour <= hours_after:
                return None
            keys.append(trend_key(dim, "h", hour_bucket(hour), norm_city))
        else:
            if t <= minutes_after:
                return None
            keys.extend(_minute_keys(dim, t, stop, norm_city))
    return keys


def rank(counts: dict[str, int], top: int | None = None) -> list[tuple[str, int]]:
    """Highest count first, ties by name in code point order (the order of the names' UTF-8
    bytes, not UTF-16's), cut to ``top`` (None: everything; ValueError for anything but an int
    >= 0)."""
    top = _check_top(top)
    ranked = sorted(counts.items(), key=lambda mc: (-mc[1], mc[0]))
    return ranked if top is None else ranked[:top]


def summed_counts(reads: Iterable[dict[str, int] | None]) -> dict[str, int]:
    """Each member's count over several reads (None: expired, counts nothing)."""
    summed: dict[str, int] = {}
    for counts in reads:
        for name, count in (counts or {}).items():
            summed[name] = summed.get(name, 0) + count
    return summed


def series_names(intervals: Sequence[Interval], top: int) -> list[str]:
    """The ``top`` members over the kept intervals together: the lines a chart draws."""
    return [name for name, _ in rank(summed_counts(i.counts for i in intervals), top)]


def changes(
    previous: Interval, current: Interval, top: int, by: Literal["count", "rise"] = "count"
) -> list[Change]:
    """Members with their counts in the current and the previous window.

    ``by="count"``: the current window's ``top`` members. ``by="rise"``: the ``top`` members
    that gained the most posts, over every member of either window (a name that vanished has a
    count of 0); it needs the previous window's counts.
    """
    if by == "count":
        return [
            Change(name, count, None if previous.counts is None else previous.counts.get(name, 0))
            for name, count in rank(current.counts or {}, top)
        ]
    if by != "rise":
        raise ValueError(f"by must be 'count' or 'rise', got {by!r}")
    if previous.counts is None:
        raise ValueError("ranking by rise needs the previous window, whose buckets have expired")
    counts, before = current.counts or {}, previous.counts
    rise = {name: counts.get(name, 0) - before.get(name, 0) for name in {*counts, *before}}
    return [Change(name, counts.get(name, 0), before.get(name, 0)) for name, _ in rank(rise, top)]


@functools.lru_cache(maxsize=4096)  # a series filters the same few hundred members per interval
def _name_key(name: str) -> str:
    """A make or model name as filters compare it: NFKC and casefolded, so that a name typed
    decomposed (``S`` + combining caron + ``koda``, as some keyboards and macOS file names
    give it) or in another case finds the members stored composed; NFKC again after the
    casefold, which can leave a letter decomposed (``ǰ``)."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())


def name_matcher(make: str | None = None, model: str | None = None) -> Callable[[str], bool]:
    """Which members of a make, model or lowconf set a ``--make``/``--model`` filter keeps.

    Case-insensitive (``bmw`` finds ``BMW``) and Unicode-normalised (see :func:`_name_key`),
    as readers type names: a make matches the member itself or the make part of a
    ``Make|Model`` member; a model matches the whole member. Members are kept as stored.
    """
    if make is not None and model is not None:
        raise ValueError("filter by a make or by a model, not both")
    if model is not None:
        make_part, _, model_part = model.partition(MODEL_SEPARATOR)
        wanted = (_name_key(make_part.strip()), _name_key(model_part.strip()))

        def is_model(member: str) -> bool:
            # split before normalising: NFKC turns a fullwidth bar (U+FF5C) into the separator
            member_make, _, member_model = member.partition(MODEL_SEPARATOR)
            return (_name_key(member_make), _name_key(member_model)) == wanted

        return is_model
    if make is not None:
        wanted_make = _name_key(make.strip())
        return lambda member: _name_key(member.partition(MODEL_SEPARATOR)[0]) == wanted_make
    return lambda member: True


def keep(counts: dict[str, int] | None, match: Callable[[str], bool]) -> dict[str, int] | None:
    """The members of ``counts`` that ``match`` keeps (None stays None: an expired interval)."""
    return None if counts is None else {m: c for m, c in counts.items() if match(m)}


@dataclass(frozen=True, slots=True)
class CityCount:
    """Posts of one make (or model) in one city, and all the city's counted posts beside them."""

    city: str
    count: int
    city_total: int


@dataclass(frozen=True, slots=True)
class WindowCounts:
    """Every member's count over a trailing window, and the minutes ``[start, end)`` counted.

    ``widened``: the window's edge minute buckets had expired, so whole hours were counted
    instead and ``[start, end)`` is wider than the window asked for (see :func:`window_plan`).
    """

    counts: dict[str, int]
    start: datetime
    end: datetime
    widened: bool


@dataclass(frozen=True, slots=True)
class CitiesOf:
    """What :meth:`TrendReader.read_cities_of` read: the cities posting a make (or model), how
    many cities the window had, and the minutes ``[start, end)`` counted (as in WindowCounts)."""

    rows: list[CityCount]
    cities: int
    start: datetime
    end: datetime
    widened: bool


class WrongTypeKeyError(redis.ResponseError):
    """A trend key holds something other than a sorted set of counts (written by something
    other than the workers); the message names the key."""


class TrendReader:
    """Top makes, models, cities and low-confidence guesses over a trailing window.

    Which buckets still exist depends on the TTLs the *writers* used, so by default the reader
    takes them from `carstream:trends:config` (defaults where no writer recorded any); pass
    ``minute_ttl_s``/``hour_ttl_s`` only to override.

    Reads raise :class:`WrongTypeKeyError` (a ``redis.ResponseError``) naming the key when a
    bucket's name holds another type, ``redis.DataError`` when a client that decodes replies
    (``decode_responses=True``) meets a member that is not UTF-8 (a reader's client should
    leave replies undecoded, as ``worker trends`` does), and ``redis.ConnectionError`` or
    ``redis.TimeoutError`` when Redis cannot be reached or does not answer: give the client a
    ``socket_timeout`` and ``socket_connect_timeout``, or a silent server blocks a read forever.
    Bad arguments (a window that is not a whole number of minutes from 1 to 366 days, a
    negative ``top``, a ``now`` outside 1970-2100) raise ``ValueError`` before any read.
    """

    def __init__(
        self,
        redis_client: redis.Redis,
        minute_ttl_s: int | None = None,
        hour_ttl_s: int | None = None,
    ):
        self._redis = redis_client
        self._minute_ttl_s = minute_ttl_s
        self._hour_ttl_s = hour_ttl_s
        self._last_widened: tuple[int, datetime, datetime] | None = None  # warned of already

    def ttls(self) -> tuple[int, int]:
        """(minute, hour) bucket TTLs in seconds: the overrides, else the writers' recorded ones."""
        if self._minute_ttl_s is not None and self._hour_ttl_s is not None:
            return self._minute_ttl_s, self._hour_ttl_s
        with _reading():
            try:
                recorded = self._redis.hmget(CONFIG_KEY, ["minute_ttl_s", "hour_ttl_s"])
            except redis.ResponseError as exc:
                if "WRONGTYPE" not in str(exc):
                    raise
                raise self._wrong_type(
                    [CONFIG_KEY], "hash", "the workers' bucket TTLs", "record their TTLs in"
                ) from None
        values = []
        for override, raw, default in zip(
            (self._minute_ttl_s, self._hour_ttl_s),
            recorded,
            (DEFAULT_MINUTE_TTL_S, DEFAULT_HOUR_TTL_S),
            strict=True,
        ):
            if override is not None:
                values.append(override)
                continue
            try:
                value = int(raw) if raw is not None else default
                if not 0 < value <= MAX_TTL_S:
                    raise ValueError(value)
            except ValueError:
                logger.warning("ignoring a malformed TTL %r in %s", raw, CONFIG_KEY)
                value = default
            values.append(value)
        return values[0], values[1]

    def window(
        self,
        window_minutes: int,
        by: Dimension = "make",
        city: str | None = None,
        now: datetime | None = None,
    ) -> dict[str, int]:
        """Every member's count over the trailing window (see :func:`window_plan`), unranked:
        what the top lists cut, and what their shares are of.

        Where expired edge minutes widened the window to whole hours, a warning names the span
        counted; :meth:`read_window` returns it.
        """
        read = self.read_window(window_minutes, by, city, now)
        if read.widened:
            self._warn_widened(window_minutes, read.start, read.end)
        return read.counts

    def read_window(
        self,
        window_minutes: int,
        by: Dimension = "make",
        city: str | None = None,
        now: datetime | None = None,
    ) -> WindowCounts:
        """:meth:`window` with the span it counted: ``[start, end)``, and whether that is wider
        than the window asked for (its edge minutes expired; see :func:`window_plan`)."""
        _check_dimension(by, city)
        wall_now = datetime.now(UTC)
        now = wall_now if now is None else now
        minute_ttl_s, hour_ttl_s = self.ttls()
        plan = window_plan(
            by, window_minutes, now, city, minute_ttl_s, wall_now, hour_ttl_s=hour_ttl_s
        )
        return WindowCounts(self._unions([plan.keys])[0], plan.start, plan.end, plan.widened)

    def _unions(self, key_lists: Sequence[list[str]]) -> list[dict[str, int]]:
        """Each list's keys summed (one pipelined ZUNION per non-empty list); {} for none."""
        wanted = [keys for keys in key_lists if keys]
        replies: list = []
        if wanted:
            pipe = self._redis.pipeline(transaction=False)
            for keys in wanted:
                pipe.zunion(keys, withscores=True, aggregate="SUM")
            with _reading():
                replies = pipe.execute(raise_on_error=False)
        for keys, reply in zip(wanted, replies, strict=True):
            if isinstance(reply, redis.ResponseError) and "WRONGTYPE" in str(reply):
                raise self._wrong_type(keys, "zset", "trend counts", "count into") from None
            if isinstance(reply, Exception):
                raise reply
        merged = iter(replies)
        return [_counts(next(merged)) if keys else {} for keys in key_lists]

    def _wrong_type(
        self, keys: list[str], expected: str, holding: str, writes: str
    ) -> WrongTypeKeyError:
        """The error naming the first of ``keys`` that holds another type than ``expected``:
        the type of ``holding``, which the workers ``writes`` it (worded for the hint)."""
        pipe = self._redis.pipeline(transaction=False)
        for key in keys:
            pipe.type(key)
        with _reading():
            types = [_text(t) for t in pipe.execute()]
        wrong = [(key, kind) for key, kind in zip(keys, types, strict=True)]
        wrong = [(key, kind) for key, kind in wrong if kind not in (expected, "none")]
        if not wrong:  # deleted or replaced since: name the read instead
            return WrongTypeKeyError(f"a key of {keys[0]} .. {keys[-1]} held the wrong type")
        key, kind = wrong[0]
        more = f" (and {_count_keys(len(wrong) - 1)} more)" if len(wrong) > 1 else ""
        return WrongTypeKeyError(
            f"{key} holds a {kind}, not the {expected} of {holding}{more}: something other "
            f"than the workers wrote it; delete it (the workers cannot {writes} it either)"
        )

    def top(
        self,
        window_minutes: int,
        by: Literal["make", "model"] = "make",
        city: str | None = None,
        top: int = 10,
        now: datetime | None = None,
    ) -> list[tuple[str, int]]:
        """The `top` makes (or "Make|Model" models) by posts in the window, highest first;
        ties by name (see :func:`rank`)."""
        if by not in ("make", "model"):
            raise ValueError(f"by must be 'make' or 'model', got {by!r}")
        top = _check_top(top)  # before the read, not after it
        return rank(self.window(window_minutes, by, city, now), top)

    def top_by_city(
        self,
        window_minutes: int,
        cities: Iterable[str],
        by: Literal["make", "model"] = "make",
        top: int | None = 10,
        now: datetime | None = None,
    ) -> dict[str, list[tuple[str, int]]]:
        """:meth:`top` for each of ``cities`` (keyed as given), in two round trips in all: the
        writers' TTLs (none with both overrides), then one pipelined ZUNION per city.

        A per-city dashboard calling :meth:`top` per city pays two round trips a city. The
        answers are the same; a widened window warns once.
        """
        if by not in ("make", "model"):
            raise ValueError(f"by must be 'make' or 'model', got {by!r}")
        if isinstance(cities, str | bytes):
            raise ValueError(f"cities {cities!r}: must be a list of city names, not one name")
        top = _check_top(top)
        names = list(cities)
        if any(city is None for city in names):
            raise ValueError("cities: None is no city (use top() to count every city)")
        norm = [_key_city(city) for city in names]  # a blank city would read every city
        wall_now = datetime.now(UTC)
        now = wall_now if now is None else now
        window_minutes = _check_window(window_minutes)
        _check_now(now)
        if not names:
            return {}
        minute_ttl_s, hour_ttl_s = self.ttls()
        plan = window_plan(
            by, window_minutes, now, None, minute_ttl_s, wall_now, hour_ttl_s=hour_ttl_s
        )
        # each city's keys are the overall ones with its suffix (city_key), as window_plan
        # would build them city by city
        unions = self._unions([[city_key(key, city) for key in plan.keys] for city in norm])
        if plan.widened:
            self._warn_widened(window_minutes, plan.start, plan.end)
        return {city: rank(counts, top) for city, counts in zip(names, unions, strict=True)}

    def cities(
        self, window_minutes: int, top: int | None = None, now: datetime | None = None
    ) -> list[tuple[str, int]]:
        """Classified posts per (normalised) city in the window, highest first."""
        top = _check_top(top)
        return rank(self.window(window_minutes, "city", None, now), top)

    def low_confidence(
        self, window_minutes: int, city: str | None = None, now: datetime | None = None
    ) -> list[tuple[str, int]]:
        """Low-confidence posts in the window by their top-1 make guess (not counted as brands)."""
        return rank(self.window(window_minutes, "lowconf", city, now))

    def cities_of(
        self,
        window_minutes: int,
        match: Callable[[str], bool],
        by: Literal["make", "model"] = "make",
        now: datetime | None = None,
        max_cities: int = MAX_BREAKDOWN_CITIES,
    ) -> tuple[list[CityCount], int]:
        """Where a make (or model) is posted: per city, its posts (members ``match`` keeps) and
        the city's posts, busiest first; one pipelined ZUNION per city.

        Reads the ``max_cities`` busiest cities of the window; also returns how many cities the
        window had, so a caller can say when some were not read. A widened window warns, as
        :meth:`window` does; :meth:`read_cities_of` returns the span.
        """
        read = self.read_cities_of(window_minutes, match, by, now, max_cities)
        if read.widened:
            self._warn_widened(window_minutes, read.start, read.end)
        return read.rows, read.cities

    def _warn_widened(self, window_minutes: int, start: datetime, end: datetime) -> None:
        """Log that a window was widened, naming the span counted; once per span in a row, so
        that a dashboard polling the same window does not log it on every poll."""
        if self._last_widened == (window_minutes, start, end):
            return
        self._last_widened = (window_minutes, start, end)
        logger.warning(
            "the %d-minute window's edge minute buckets have expired: counted whole hours, "
            "%s to %s UTC, instead (read_window/read_cities_of give the span)",
            window_minutes,
            f"{start:%Y-%m-%d %H:%M}",
            f"{end - _MINUTE:%Y-%m-%d %H:%M}",
        )

    def read_cities_of(
        self,
        window_minutes: int,
        match: Callable[[str], bool],
        by: Literal["make", "model"] = "make",
        now: datetime | None = None,
        max_cities: int = MAX_BREAKDOWN_CITIES,
    ) -> CitiesOf:
        """:meth:`cities_of` with the span it counted (see :meth:`read_window`)."""
        if by not in ("make", "model"):
            raise ValueError(f"by must be 'make' or 'model', got {by!r}")
        wall_now = datetime.now(UTC)
        now = wall_now if now is None else now
        minute_ttl_s, hour_ttl_s = self.ttls()

        def overall(dim: Dimension) -> WindowPlan:
            return window_plan(
                dim, window_minutes, now, None, minute_ttl_s, wall_now, hour_ttl_s=hour_ttl_s
            )

        plan = overall(by)  # each city's keys are these with its suffix (city_key): built once
        every_city = rank(self._unions([overall("city").keys])[0])
        cities = [city for city, _ in every_city[:max_cities]]
        rows = []
        if plan.keys:
            per_city = [[city_key(key, city) for key in plan.keys] for city in cities]
            for city, counts in zip(cities, self._unions(per_city), strict=True):
                count = sum(c for member, c in counts.items() if match(member))
                if count:
                    rows.append(CityCount(city, count, sum(counts.values())))
        rows.sort(key=lambda row: (-row.count, row.city))
        return CitiesOf(rows, len(every_city), plan.start, plan.end, plan.widened)

    def series(
        self,
        window_minutes: int,
        every_minutes: int,
        by: Dimension = "make",
        city: str | None = None,
        now: datetime | None = None,
    ) -> list[Interval]:
        """The ``window_minutes // every_minutes`` intervals up to now's, on the grid of
        :func:`series_bounds`, oldest first, with every member's count in each."""
        now = datetime.now(UTC) if now is None else now
        return self.intervals(series_bounds(window_minutes, every_minutes, now), by, city)

    def intervals(
        self,
        bounds: Sequence[tuple[datetime, datetime]],
        by: Dimension = "make",
        city: str | None = None,
    ) -> list[Interval]:
        """Every member's count in each ``[start, end)``, one pipelined ZUNION per interval.

        ``by`` is a key dimension (``make``, ``model``, ``lowconf`` or ``city``). An interval
        whose buckets have expired has ``counts`` None (see :func:`interval_keys`).
        """
        _check_dimension(by, city)
        wall_now = datetime.now(UTC)
        minute_ttl_s, hour_ttl_s = self.ttls()
        plans = [
            interval_keys(by, start, end, city, minute_ttl_s, hour_ttl_s, wall_now)
            for start, end in bounds
        ]
        merged = iter(self._unions([keys for keys in plans if keys is not None]))
        return [
            Interval(start, end, None if keys is None else next(merged))
            for (start, end), keys in zip(bounds, plans, strict=True)
        ]


def _count_keys(n: int) -> str:
    return f"{n} key" if n == 1 else f"{n} keys"


@contextlib.contextmanager
def _reading() -> Iterator[None]:
    """A reply a decoding client (``decode_responses=True``) cannot decode, as one clear
    error rather than a UnicodeDecodeError from deep in redis-py."""
    try:
        yield
    except UnicodeDecodeError as exc:
        raise redis.DataError(
            f"a trend member or value is not UTF-8 ({exc.reason} at byte {exc.start}): read "
            "with a client that leaves replies undecoded (decode_responses=False), which shows "
            "such a member as its escapes"
        ) from None


def _text(value: bytes | str) -> str:
    # backslashreplace: a member some other writer put into a key in another encoding reads
    # as its escapes, not as a traceback
    return value.decode(errors="backslashreplace") if isinstance(value, bytes) else value


def _counts(merged: Iterable[tuple[bytes | str, float]]) -> dict[str, int]:
    """A ZUNION ... WITHSCORES reply as member -> count; a score no count can have (negative,
    fractional, inf, nan: written into a key by something other than the workers, whose
    ZINCRBY only ever adds 1) is left out with a warning."""
    counts = {}
    for member, score in merged:
        score = float(score)
        if math.isfinite(score) and score >= 0 and score.is_integer():
            counts[_text(member)] = int(score)
        else:
            logger.warning(
                "ignoring member %r with the score %r: not a count of posts", _text(member), score
            )
    return counts


def _check_dimension(by: str, city: str | None) -> None:
    if by not in ("make", "model", "lowconf", "city"):
        raise ValueError(f"by must be make, model, lowconf or city, got {by!r}")
    if by == "city" and city is not None:
        raise ValueError("the city dimension has no per-city keys")
    _key_city(city)  # a blank city would silently read every city


def total(counts: Iterable[tuple[str, int]]) -> int:
    """Sum of a reader result's counts."""
    return sum(count for _, count in counts)
