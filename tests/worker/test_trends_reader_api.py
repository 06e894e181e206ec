"""The reader API's contract: arguments it refuses before any read, the tie rule of its
rankings (and the raw-Redis recipe docs/trends.md gives for it), the batch read of many
cities' top lists, and the city normalisation test vectors docs/trends.md lists.

The argument checks and the doc's vectors are pure; the rest runs against a real redis-server.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis

from worker import trends_cli
from worker.trend_keys import TrendRecord, normalize_city, trend_key
from worker.trend_windows import (
    MAX_WINDOW_MINUTES,
    compare_bounds,
    rank,
    series_bounds,
    window_plan,
)
from worker.trends import TrendReader, TrendWriter, WrongTypeKeyError

DOC = Path(__file__).resolve().parents[2] / "docs" / "trends.md"
MIN_TTL = 48 * 3600
HOUR_TTL = 30 * 24 * 3600
NOW = datetime(2026, 12, 6, 15, 30, tzinfo=UTC)


def _offline_reader() -> TrendReader:
    """A reader whose client has no server (port 1): any read would raise ConnectionError, so
    a ValueError proves the argument was refused before reading."""
    return TrendReader(redis.Redis(port=1, socket_connect_timeout=1), MIN_TTL, HOUR_TTL)


# --- pure: arguments refused before any read -----------------------------------------------


BAD_WINDOWS = [0, -5, 2.5, 1.5, True, "60", None, MAX_WINDOW_MINUTES + 1, 3000 * 366 * 1440]


@pytest.mark.parametrize("window", BAD_WINDOWS, ids=repr)
def test_a_window_that_is_not_whole_minutes_in_range_is_refused(window: object) -> None:
    with pytest.raises(ValueError, match=r"^window_minutes .*: must be"):
        window_plan("make", window, NOW)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^window_minutes .*: must be"):
        _offline_reader().top(window, now=NOW)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^window_minutes .*: must be"):
        _offline_reader().top_by_city(window, ["paris"], now=NOW)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^window_minutes .*: must be"):
        compare_bounds(window, NOW)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^(window|every)_minutes .*: must be"):
        series_bounds(window, 1, NOW)  # type: ignore[arg-type]


def test_the_longest_window_is_the_clis() -> None:
    assert trends_cli.MAX_WINDOW_MINUTES is MAX_WINDOW_MINUTES == 366 * 1440
    plan = window_plan("make", MAX_WINDOW_MINUTES, NOW, hour_ttl_s=HOUR_TTL)
    assert plan.requested_end - plan.requested_start == timedelta(days=366)


@pytest.mark.parametrize("top", [-1, -2, 2.5, True, "3"], ids=repr)
def test_a_top_that_is_not_a_count_is_refused(top: object) -> None:
    with pytest.raises(ValueError, match=r"^top .*: must be None \(everything\) or a whole"):
        rank({"BMW": 2, "Audi": 1}, top)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^top "):
        _offline_reader().top(60, top=top, now=NOW)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^top "):
        _offline_reader().cities(60, top=top, now=NOW)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^top "):
        _offline_reader().top_by_city(60, ["paris"], top=top, now=NOW)  # type: ignore[arg-type]


def test_top_zero_and_none_still_cut_as_before() -> None:
    assert rank({"BMW": 2, "Audi": 1}, 0) == []
    assert rank({"BMW": 2, "Audi": 1}, None) == [("BMW", 2), ("Audi", 1)]


@pytest.mark.parametrize(
    "now",
    [
        datetime(1, 1, 1, 0, 30, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, tzinfo=UTC),
        datetime(2100, 1, 1, tzinfo=UTC),
        "2026-12-06T15:30:00Z",
    ],
    ids=str,
)
def test_a_now_outside_the_years_of_events_is_refused(now: object) -> None:
    with pytest.raises(ValueError, match=r"^now .*: must (lie between 1970-01-01 and 2100|be a)"):
        window_plan("make", 60, now)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^now "):
        _offline_reader().top(60, now=now)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^now "):
        series_bounds(60, 15, now)  # type: ignore[arg-type]
    edge = window_plan("make", 60, datetime(1970, 1, 1, tzinfo=UTC), hour_ttl_s=HOUR_TTL)
    assert edge.requested_start == datetime(1969, 12, 31, 23, 1, tzinfo=UTC)


def test_top_by_city_refuses_a_lone_name_a_none_and_a_blank_city() -> None:
    reader = _offline_reader()
    with pytest.raises(ValueError, match=r"^cities 'paris': must be a list"):
        reader.top_by_city(60, "paris", now=NOW)
    with pytest.raises(ValueError, match=r"^cities: None is no city"):
        reader.top_by_city(60, ["paris", None], now=NOW)  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"^city ' \\u200b': blank"):
        reader.top_by_city(60, ["paris", " \u200b"], now=NOW)
    with pytest.raises(ValueError, match=r"^by must be 'make' or 'model'"):
        reader.top_by_city(60, ["paris"], by="city", now=NOW)  # type: ignore[arg-type]
    assert reader.top_by_city(60, [], now=NOW) == {}  # nothing to read, no round trip


# --- pure: ties, and the city test vectors of docs/trends.md --------------------------------


def test_ties_rank_by_code_point_which_is_utf8_byte_order_not_utf16() -> None:
    # U+FF21 (fullwidth A) before U+1F697 (an astral car) by code point and by UTF-8 bytes; in
    # UTF-16 (JavaScript's string order) the car's surrogate 0xD83D comes first
    counts = {"\U0001f697": 2, "\uff21": 2, "b": 2, "B": 2, "Audi": 3}
    ranked = [name for name, _ in rank(counts)]
    assert ranked == ["Audi", "B", "b", "\uff21", "\U0001f697"]
    assert ranked[1:] == sorted(ranked[1:], key=lambda name: name.encode())
    assert ranked[1:] != sorted(ranked[1:], key=lambda name: name.encode("utf-16-be"))


def _doc_city_vectors() -> list[tuple[str, str | None]]:
    """The rows of docs/trends.md's city normalisation table: JSON strings in backticks."""
    text = DOC.read_text(encoding="utf-8")
    section = text.split("<!-- city-vectors -->", 2)
    assert len(section) == 3, "docs/trends.md lost its <!-- city-vectors --> markers"
    rows = re.findall(r"^\s*\| `(.+?)` \| `(.+?)` \|", section[1], flags=re.MULTILINE)
    return [(json.loads(given), json.loads(key)) for given, key in rows]


def test_the_docs_city_vectors_are_what_normalize_city_gives() -> None:
    vectors = _doc_city_vectors()
    assert len(vectors) >= 8
    assert [(given, normalize_city(given)) for given, _ in vectors] == vectors
    given = dict(vectors)
    assert given["Vi\u0307lnius"] == "vilnius"  # U+0307 after any i, not only İ's
    assert given["\u0130\u0301zmir"] == "\u00edzmir"  # a second pass composes i + U+0301


# --- against a real redis-server ------------------------------------------------------------


@pytest.fixture()
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + "/13")
    client.flushdb()
    yield client
    client.close()


class _Counting(redis.Connection):
    """A real connection that counts its sends: one per round trip (a pipeline sends all its
    commands at once, then reads their replies)."""

    sends = 0

    def send_packed_command(self, command, check_health=True) -> None:  # type: ignore[no-untyped-def]
        type(self).sends += 1
        super().send_packed_command(command, check_health)


@pytest.fixture()
def counting(r: redis.Redis) -> Iterator[tuple[redis.Redis, type[_Counting]]]:
    """A client of the same server and db whose round trips are counted, connected already
    (the handshake's commands are not counted)."""
    conn_class = type("Counting", (_Counting,), {"sends": 0})
    kwargs = r.connection_pool.connection_kwargs
    pool = redis.ConnectionPool(connection_class=conn_class, **kwargs)
    client = redis.Redis(connection_pool=pool)
    client.ping()
    conn_class.sends = 0
    yield client, conn_class
    client.close()


def _fill(client: redis.Redis, now: datetime) -> None:
    """Posts in the last hour (with ties at a top-3 cut) and before it, in five cities."""
    posts = {
        "Paris": {"BMW": 3, "Audi": 2, "Dacia": 2, "Citroen": 2, "Toyota": 1},
        "PARIS ": {"Audi": 1},  # the same city: Audi now leads the tie with BMW
        "Lyon": {"Renault": 2, "Peugeot": 2},
        "\u0130stanbul": {"Fiat": 4, "Tofa\u015f": 4, "\U0001f697Car": 4, "\uff21udi": 4},
        "São Paulo": {"Fiat": 1},
        "Lille": {},
    }
    records = []
    for city, makes in posts.items():
        for make, count in makes.items():
            for _ in range(count):
                at = now - timedelta(minutes=(len(records) * 7) % 59)
                records.append(TrendRecord("t", 0, len(records), at, make, "X", city))
    records.append(TrendRecord("t", 0, len(records), now - timedelta(hours=3), "Opel", "X", "Lyon"))
    TrendWriter(client, "api").apply(records)


CITIES = ["Paris", "lyon", "ISTANBUL", "são  paulo", "Lille", "Atlantis", "paris"]


@pytest.mark.integration
@pytest.mark.parametrize("by", ["make", "model"])
@pytest.mark.parametrize("top", [3, None])
def test_top_by_city_answers_as_top_per_city_in_two_round_trips(
    r: redis.Redis, counting: tuple[redis.Redis, type[_Counting]], by: str, top: int | None
) -> None:
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    _fill(r, now)
    client, conn = counting
    reader = TrendReader(client)
    batch = reader.top_by_city(60, CITIES, by, top, now)  # type: ignore[arg-type]
    assert conn.sends == 2  # the writers' TTLs, then one pipeline of every city's ZUNION
    one_by_one = {city: reader.top(60, by, city, top, now) for city in CITIES}  # type: ignore[arg-type]
    assert conn.sends == 2 + 2 * len(CITIES)
    assert batch == one_by_one
    if by == "make" and top == 3:
        assert batch["Paris"] == [("Audi", 3), ("BMW", 3), ("Citroen", 2)]
        assert batch["lyon"] == [("Peugeot", 2), ("Renault", 2)]  # not the Opel of 3 h ago
        assert batch["Atlantis"] == batch["Lille"] == []
    fixed = TrendReader(client, MIN_TTL, HOUR_TTL)
    conn.sends = 0
    assert fixed.top_by_city(60, CITIES, by, top, now) == batch  # type: ignore[arg-type]
    assert conn.sends == 1  # TTLs given: the pipeline alone


@pytest.mark.integration
def test_top_by_city_widens_as_top_does_and_warns_once(
    r: redis.Redis, counting: tuple[redis.Redis, type[_Counting]], caplog
) -> None:
    # workers keep minute buckets 1 h: a window reaching 2 h back reads that hour's rollup
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    old_hour = now.replace(minute=0) - timedelta(hours=2)
    records = [
        TrendRecord("t", 0, m, old_hour + timedelta(minutes=m), "Toyota", "C", "Paris")
        for m in range(30)
    ]
    records.append(TrendRecord("t", 0, 30, now, "BMW", "X5", "Lyon"))
    TrendWriter(r, "api", minute_ttl_s=3600).apply(records)
    window = now.minute + 66  # starts at old_hour + 55 min, whose minutes have expired
    client, _ = counting
    with caplog.at_level("WARNING", logger="worker.trends"):
        batch = TrendReader(client).top_by_city(window, ["Paris", "Lyon"], now=now)
    assert [rec.getMessage() for rec in caplog.records if "whole hours" in rec.getMessage()]
    assert len(caplog.records) == 1
    assert batch == {"Paris": [("Toyota", 30)], "Lyon": [("BMW", 1)]}
    reader = TrendReader(client)
    assert batch == {city: reader.top(window, city=city, now=now) for city in batch}


@pytest.mark.integration
def test_the_docs_raw_redis_recipe_ranks_as_the_reader_does(r: redis.Redis) -> None:
    # what docs/trends.md tells raw clients: ZUNION ... WITHSCORES, then count descending and
    # member bytes ascending; ZREVRANGE's own tie order (bytes descending) differs
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    _fill(r, now)
    plan = window_plan("make", 60, now, "Istanbul", MIN_TTL, hour_ttl_s=HOUR_TTL)
    raw = r.zunion(plan.keys, withscores=True, aggregate="SUM")
    recipe = sorted(raw, key=lambda ms: (-ms[1], ms[0]))[:3]
    api = TrendReader(r).top(60, city="Istanbul", top=3, now=now)
    assert [(m.decode(), int(s)) for m, s in recipe] == api
    assert api == [("Fiat", 4), ("Tofa\u015f", 4), ("\uff21udi", 4)]
    minute = trend_key("make", "m", now.strftime("%Y%m%d%H%M"), "istanbul")
    r.delete(minute)
    r.zadd(minute, {"Audi": 1, "BMW": 1, "Citroen": 1, "Dacia": 1})
    assert r.zrevrange(minute, 0, 1) == [b"Dacia", b"Citroen"]  # not what rank() keeps
    assert TrendReader(r).top(1, city="Istanbul", top=2, now=now) == [("Audi", 1), ("BMW", 1)]


@pytest.mark.integration
def test_a_plain_set_at_a_bucket_reads_as_counts_of_one(r: redis.Redis) -> None:
    # ZUNION takes a set as scores of 1: the reader counts it (docs/trends.md says so); the
    # writer refuses it
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    key = trend_key("make", "m", now.strftime("%Y%m%d%H%M"))
    r.sadd(key, "BMW", "Audi")
    assert TrendReader(r, MIN_TTL, HOUR_TTL).top(5, now=now) == [("Audi", 1), ("BMW", 1)]
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        TrendWriter(r, "api").apply([TrendRecord("t", 0, 0, now, "BMW", "X5", None)])


@pytest.mark.integration
def test_a_string_at_the_config_key_is_named_as_the_ttl_hash(r: redis.Redis) -> None:
    r.set("carstream:trends:config", "oops")
    with pytest.raises(
        WrongTypeKeyError,
        match=r"^carstream:trends:config holds a string, not the hash of the workers' bucket "
        r"TTLs: something other than the workers wrote it; delete it \(the workers cannot "
        r"record their TTLs in it either\)$",
    ):
        TrendReader(r).ttls()
