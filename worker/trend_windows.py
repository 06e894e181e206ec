"""Which trend keys a window, a series interval or a comparison reads, and ranking what came back.

Pure arithmetic on the key schema (worker/trend_keys.py): no Redis here, so that the window and
interval planning, the ranking and the name filters are tested and reused (the reader in
worker/trends.py, `python -m worker trends`) without a server, and without importing redis.
"""

from __future__ import annotations

import functools
import numbers
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from worker.schemas import EARLIEST_POSTED_AT, LATEST_POSTED_AT
from worker.trend_keys import (
    DEFAULT_MINUTE_TTL_S,
    MODEL_SEPARATOR,
    Dimension,
    as_utc,
    hour_bucket,
    minute_bucket,
    normalize_city,
    trend_key,
)

# the longest window a reader (and `worker trends --window`) reads: past the hour rollups' TTL
# anyway, and far larger ones cost seconds of key arithmetic before any read
MAX_WINDOW_MINUTES = 366 * 1440
MAX_SERIES_INTERVALS = 1000  # one ZUNION each, sent in one pipeline
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

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
    window_minutes = check_window(window_minutes)
    check_now(now)
    norm_city = query_city(city)
    wall = as_utc(now if wall_now is None else wall_now)
    end = as_utc(now).replace(second=0, microsecond=0)  # the current minute, included
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


def check_window(window_minutes: object, name: str = "window_minutes") -> int:
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


def check_now(now: object) -> None:
    """ValueError unless ``now`` is an aware datetime within the years events may carry (no
    bucket lies outside them, and near datetime's own limits the bucket arithmetic overflows)."""
    if not isinstance(now, datetime):
        raise ValueError(f"now {now!r}: must be a timezone-aware datetime")
    if not EARLIEST_POSTED_AT <= as_utc(now) < LATEST_POSTED_AT:
        raise ValueError(
            f"now {now.isoformat()}: must lie between {EARLIEST_POSTED_AT:%Y-%m-%d} and "
            f"{LATEST_POSTED_AT:%Y-%m-%d} UTC, the range of event times"
        )


def check_top(top: object) -> int | None:
    """``top`` as a cut: None (everything) or a whole number >= 0; ValueError otherwise (a
    negative one would cut from the end, a fraction fail deep in a slice)."""
    if top is None:
        return None
    if isinstance(top, bool) or not isinstance(top, numbers.Integral) or top < 0:
        raise ValueError(f"top {top!r}: must be None (everything) or a whole number >= 0")
    return int(top)


def query_city(city: str | None) -> str | None:
    """The normalised city of a reader's query; ValueError for a city that normalises to
    nothing (blank, or only invisible characters), which would silently read every city."""
    norm = normalize_city(city)
    if city is not None and norm is None:
        raise ValueError(
            f"city {city!r}: blank once normalised (pass city=None to count every city)"
        )
    return norm


def check_dimension(by: str, city: str | None) -> None:
    """ValueError unless ``by`` is a key dimension and ``city`` one it has keys for."""
    if by not in ("make", "model", "lowconf", "city"):
        raise ValueError(f"by must be make, model, lowconf or city, got {by!r}")
    if by == "city" and city is not None:
        raise ValueError("the city dimension has no per-city keys")
    query_city(city)  # a blank city would silently read every city


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
    last set its expiry if that came first (``expire_at`` caps at the write's time, and a
    live hour is written while it is still running). Either way it outlives its own start by
    ``ttl_s``; a bucket that started earlier may have expired, or may not: a reader cannot tell
    an expired bucket from one that never had a post. The exception is a bucket in the future
    of the writer's clock (a post dated ahead), which expires ``ttl_s`` after it was written.
    """
    return as_utc(wall_now) - timedelta(seconds=ttl_s)


def series_bounds(
    window_minutes: int, every_minutes: int, now: datetime
) -> list[tuple[datetime, datetime]]:
    """The intervals ``[start, end)`` of a series, oldest first.

    Intervals sit on a grid of ``every_minutes`` counted from the Unix epoch, so that 15m, 1h
    and 1d intervals are clock quarters, hours and UTC days, and a day older than the minute
    buckets is whole hour rollups. The last interval is the one holding now's minute and ends
    after it (it is in progress); there are ``window_minutes // every_minutes`` in all.
    """
    window_minutes = check_window(window_minutes)
    every_minutes = check_window(every_minutes, "every_minutes")
    check_now(now)
    if window_minutes % every_minutes:
        raise ValueError(
            f"a window of {window_minutes} min is not a whole number of "
            f"{every_minutes}-min intervals"
        )
    n = window_minutes // every_minutes
    if n > MAX_SERIES_INTERVALS:
        raise ValueError(f"{n} intervals, more than {MAX_SERIES_INTERVALS}: use longer ones")
    current = as_utc(now).replace(second=0, microsecond=0)
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
    window_minutes = check_window(window_minutes)
    end = as_utc(now).replace(second=0, microsecond=0) + timedelta(minutes=1)
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
    start, end = as_utc(start), as_utc(end)
    if start.second or start.microsecond or end.second or end.microsecond:
        raise ValueError(f"interval bounds must be whole minutes, got {start} .. {end}")
    minutes_after = kept_after(wall_now, minute_ttl_s)
    hours_after = kept_after(wall_now, hour_ttl_s)
    norm_city = query_city(city)
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
    top = check_top(top)
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


def total(counts: Iterable[tuple[str, int]]) -> int:
    """Sum of a reader result's counts."""
    return sum(count for _, count in counts)
