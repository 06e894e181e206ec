"""Live brand/model trends in Redis: the exactly-once writer and the reader.

The keys they write and read are the public key schema of worker/trend_keys.py (documented for
readers in docs/trends.md); which keys a window or a series reads, and how results rank, is the
pure arithmetic of worker/trend_windows.py. This module is what talks to Redis.

Exactly once: the counts and the applied offset of each (group, topic, partition), in
`carstream:trends:applied:{group}`, change together in one Lua script call. Within a window
(``dedup_ttl_s``), a post re-sent under the same post_id at a new offset is counted once too:
`carstream:trends:seen:{post_id}` is set (NX, with that TTL) in the same call. A dead letter
whose kind a redelivery may turn out otherwise is noted in `carstream:trends:retry:{group}`, so
that a redelivery which classifies it counts it, once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

import redis

from worker.trend_keys import (
    CONFIG_KEY,
    DEFAULT_DEDUP_TTL_S,
    DEFAULT_HOUR_TTL_S,
    DEFAULT_MINUTE_TTL_S,
    MAX_TTL_S,
    Dimension,
    TrendRecord,
    applied_key,
    city_key,
    expire_at,
    increments,
    retry_key,
    seen_key,
)
from worker.trend_windows import (
    Interval,
    WindowPlan,
    check_dimension,
    check_now,
    check_top,
    check_window,
    interval_keys,
    query_city,
    rank,
    series_bounds,
    window_plan,
)
from worker.trend_windows import name_matcher as name_matcher
from worker.trends_script import APPLY_BATCH_LUA

# name_matcher is re-exported: it is the reader API's filter for cities_of, and docs/trends.md
# imports it from here with TrendReader

logger = logging.getLogger(__name__)


# how long, and how many, dead letters of a kind a redelivery may turn out otherwise are noted
# so that a redelivery that classifies one counts it (see trends_script.py); a redelivery comes
# within minutes of the crash that caused it, so a day covers a long outage of the whole group
RETRY_TTL_S = 24 * 3600
RETRY_MAX_ENTRIES = 100_000


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """How many records of a batch were applied, how many were at offsets applied before, and
    how many were new offsets carrying a post_id counted within the dedup window."""

    applied: int
    ignored: int
    duplicates: int = 0


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
        expire = [expire_at(k, self._minute_ttl_s, self._hour_ttl_s, now) for k in trend_keys]
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
MAX_BREAKDOWN_CITIES = 1000  # one ZUNION each, sent in one pipeline


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
        check_dimension(by, city)
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
        top = check_top(top)  # before the read, not after it
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
        top = check_top(top)
        names = list(cities)
        if any(city is None for city in names):
            raise ValueError("cities: None is no city (use top() to count every city)")
        norm = [query_city(city) for city in names]  # a blank city would read every city
        wall_now = datetime.now(UTC)
        now = wall_now if now is None else now
        window_minutes = check_window(window_minutes)
        check_now(now)
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
        top = check_top(top)
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
        check_dimension(by, city)
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
