"""Trend reads at the edges: windows whose edge minutes expired (widened to whole hours, and
said so), blank cities, scores no worker writes, keys of the wrong type, replies a decoding
client cannot decode, and `--at` parsed as the worker parses posted_at.

The span arithmetic, city checks and parsing are pure; the rest runs against a real redis-server.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import redis

from tests.support import worker_cli
from worker.trend_keys import TrendRecord, trend_key
from worker.trend_windows import Change, interval_keys, keep, name_matcher, window_keys, window_plan
from worker.trends import TrendReader, TrendWriter, WrongTypeKeyError
from worker.trends_cli import parse_at
from worker.trends_format import _change, _ranked, columns, utc_z

MIN_TTL = 48 * 3600
HOUR_TTL = 30 * 24 * 3600


def _t(day: int, hour: int, minute: int = 0, second: int = 0) -> datetime:
    return datetime(2026, 12, day, hour, minute, second, tzinfo=UTC)


# --- pure: the span a window's keys cover ------------------------------------------------


def test_a_window_whose_edge_minutes_expired_reports_the_whole_hour_it_reads() -> None:
    # workers keep minute buckets 1 h; at 16:04 a 70-minute window starts at 14:55, whose
    # minutes are gone: the 14:00 rollup is read, so the keys cover 14:00-16:04, not 14:55-16:04
    wall = _t(6, 16, 4, 30)
    plan = window_plan("make", 70, wall, None, 3600, wall, hour_ttl_s=HOUR_TTL)
    assert plan.keys[0] == trend_key("make", "h", "2026120614")
    assert (plan.requested_start, plan.requested_end) == (_t(6, 14, 55), _t(6, 16, 5))
    assert (plan.start, plan.end) == (_t(6, 14, 0), _t(6, 16, 5)) and plan.widened
    assert window_keys("make", 70, wall, None, 3600, wall, hour_ttl_s=HOUR_TTL) == plan.keys


def test_a_past_window_widens_at_both_edges_and_says_so() -> None:
    wall = _t(11, 9, 0)
    at = _t(6, 15, 30)  # five days ago: both partial hours' minutes are gone
    plan = window_plan("make", 60, at, None, MIN_TTL, wall, hour_ttl_s=HOUR_TTL)
    assert (plan.start, plan.end) == (_t(6, 14, 0), _t(6, 16, 0)) and plan.widened
    exact = window_plan("make", 120, _t(6, 15, 59), None, MIN_TTL, wall, hour_ttl_s=HOUR_TTL)
    assert (exact.start, exact.end) == (_t(6, 14, 0), _t(6, 16, 0)) and not exact.widened


def test_a_live_window_under_a_short_minute_ttl_widens_back_only() -> None:
    # workers keep minute buckets 10 min (settings allow 60 s up): at 06:19, 06:05-06:08 have
    # expired, so the 06:00 rollup is read; it holds the hour so far, not 06:20-06:59. The span
    # was 06:00-07:00, widened into the future at the end too
    wall = _t(7, 6, 19, 30)
    plan = window_plan("make", 15, wall, None, 600, wall, hour_ttl_s=HOUR_TTL)
    assert plan.keys == [trend_key("make", "h", "2026120706")]
    assert (plan.start, plan.end) == (_t(7, 6, 0), _t(7, 6, 20)) and plan.widened
    # reaching back past the hour: the earlier hour whole, the running one up to now
    plan = window_plan("make", 90, wall, None, 600, wall, hour_ttl_s=HOUR_TTL)
    assert (plan.start, plan.end) == (_t(7, 4, 0), _t(7, 6, 20))
    # a window ending ahead of the clock still ends where it was asked to
    ahead = window_plan("make", 35, _t(7, 6, 40), None, 600, wall, hour_ttl_s=HOUR_TTL)
    assert (ahead.start, ahead.end) == (_t(7, 6, 0), _t(7, 6, 41))
    # minutes still kept are read as minutes: exact
    exact = window_plan("make", 5, wall, None, 600, wall, hour_ttl_s=HOUR_TTL)
    assert (exact.start, exact.end) == (_t(7, 6, 15), _t(7, 6, 20)) and not exact.widened


def test_a_recent_window_covers_exactly_what_was_asked() -> None:
    wall = _t(6, 16, 4, 30)
    plan = window_plan("make", 180, wall, "Lyon", MIN_TTL, wall, hour_ttl_s=HOUR_TTL)
    assert (plan.start, plan.end) == (_t(6, 13, 5), _t(6, 16, 5)) and not plan.widened
    assert all(key.endswith(":city:lyon") for key in plan.keys)


# --- pure: --make/--model compare Unicode-normalised names -------------------------------


@pytest.mark.parametrize(
    ("make", "model"),
    [
        ("S\u030ckoda", "S\u030ckoda|Octavia"),  # decomposed: found nothing before
        ("ŠKODA", " s\u030cKODA | octavia "),
        ("\uff33\u030ckoda", "\uff33\u030ckoda|\uff2fctavia"),  # fullwidth, as NFKC folds it
    ],
)
def test_name_filters_find_a_name_however_it_is_composed(make: str, model: str) -> None:
    counts = {"Škoda": 2, "Škoda|Octavia": 5, "Škoda|Fabia": 1, "Skoda|Octavia": 7, "BMW|X5": 3}
    assert keep(counts, name_matcher(make=make)) == {
        "Škoda": 2,
        "Škoda|Octavia": 5,
        "Škoda|Fabia": 1,
    }
    assert keep(counts, name_matcher(model=model)) == {"Škoda|Octavia": 5}  # kept as stored
    decomposed = {"S\u030ckoda|Octavia": 4}  # a member some writer stored decomposed
    assert keep(decomposed, name_matcher(make="Škoda")) == decomposed


# --- pure: a city that normalises to nothing is refused, not read as every city ----------


@pytest.mark.parametrize("city", ["", "   ", "\u200b", "\u202e", "\x1b", "\u00ad\u2060"])
def test_the_reader_refuses_a_city_that_normalises_to_nothing(city: str) -> None:
    reader = TrendReader(None, MIN_TTL, HOUR_TTL)  # refused before any Redis call
    with pytest.raises(ValueError, match=re.escape(f"city {city!r}: blank")):
        reader.top(60, city=city)
    with pytest.raises(ValueError, match=re.escape(f"city {city!r}: blank")):
        reader.low_confidence(60, city=city)
    with pytest.raises(ValueError, match="blank"):
        reader.series(60, 15, city=city)
    with pytest.raises(ValueError, match="blank"):
        window_keys("make", 60, _t(6, 16), city)
    with pytest.raises(ValueError, match="blank"):
        interval_keys("make", _t(6, 15), _t(6, 16), city, MIN_TTL, HOUR_TTL, _t(6, 16))


def test_a_change_from_nothing_is_signed_once() -> None:
    assert _change(Change("BMW", 3, 0)) == "(previous 0, +3, new)"
    assert _change(Change("BMW", -5, 0)) == "(previous 0, -5, new)"  # was "+-5"


# --- pure: --at takes what posted_at takes ----------------------------------------------


def test_at_takes_a_leap_second_as_the_worker_does() -> None:
    assert parse_at("2026-12-06T23:59:60Z") == _t(6, 23, 59, 59)  # was refused
    assert parse_at("2026-12-07T00:59:60+01:00") == _t(6, 23, 59, 59)
    assert parse_at("2026-12-06 15:30:00.5z") == _t(6, 15, 30) + timedelta(milliseconds=500)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("2026-W49-7T15:30Z", "not an RFC 3339 timestamp"),  # ISO week date: was accepted
        ("20261206T1530Z", "not an RFC 3339 timestamp"),  # ISO basic format: was accepted
        ("2026-12-06T15:30Z", "not an RFC 3339 timestamp"),  # no seconds
        ("2026-12-06", "not an RFC 3339 timestamp"),
        ("2026-02-30T00:00:00Z", "not an RFC 3339 timestamp"),
        ("2026-12-06T15:30:60Z", "second 60 exists only at 23:59:60 UTC"),
        ("2026-12-06T15:30:00", "needs a timezone"),
        ("1969-12-31T23:59:59Z", "between 1970-01-01 and 2100-01-01"),
    ],
)
def test_at_refuses_what_posted_at_refuses(text: str, needle: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(f'--at {text!r}: ')}.*{re.escape(needle)}"):
        parse_at(text)
    out = worker_cli("trends", "--at", text, timeout=60)  # before connecting: no Redis needed
    assert out.returncode == 2 and needle in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


# --- against a real redis-server ---------------------------------------------------------


@pytest.fixture()
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + "/12")
    client.flushdb()
    yield client
    client.close()


def _url(client: redis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs['db']}"


def _trends(*args: str) -> subprocess.CompletedProcess[str]:
    return worker_cli("trends", *args, timeout=60)


def _short_minute_ttl(client: redis.Redis) -> tuple[datetime, int]:
    """The reviewer's case: workers keep minute buckets 1 h; 30 posts in the first half of the
    hour two hours back and one now. Returns now's minute and a window whose first minute lies
    in that hour (past the minute TTL), so it reads the whole hour's rollup."""
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    old_hour = now.replace(minute=0) - timedelta(hours=2)
    records = [
        TrendRecord("t", 0, m, old_hour + timedelta(minutes=m), "Toyota", "Corolla", "Paris")
        for m in range(30)
    ]
    records.append(TrendRecord("t", 0, 30, now, "BMW", "X5", "Paris"))
    TrendWriter(client, "edges", minute_ttl_s=3600).apply(records)
    window = now.minute + 66  # starts at old_hour + 55 min: those minutes have expired
    return now, window


@pytest.mark.integration
def test_the_reader_returns_the_span_it_counted(r: redis.Redis, caplog) -> None:
    now, window = _short_minute_ttl(r)
    reader = TrendReader(r)
    read = reader.read_window(window, "make", now=now)
    assert read.counts == {"Toyota": 30, "BMW": 1}  # the 30 are outside the window asked for
    assert read.widened
    assert (read.start, read.end) == (
        now.replace(minute=0) - timedelta(hours=2),
        now + timedelta(minutes=1),
    )
    with caplog.at_level("WARNING", logger="worker.trends"):
        assert reader.top(window, now=now) == [("Toyota", 30), ("BMW", 1)]  # compatible
    assert any("counted whole hours" in rec.getMessage() for rec in caplog.records)
    where = reader.read_cities_of(window, lambda member: member == "BMW", now=now)
    assert [(c.city, c.count) for c in where.rows] == [("paris", 1)]
    assert (where.start, where.widened) == (read.start, True)
    exact = reader.read_window(now.minute + 1, "make", now=now)  # this hour only: exact
    assert exact.counts == {"BMW": 1} and not exact.widened


@pytest.mark.integration
def test_cli_reports_a_widened_window_as_incomplete_with_its_span(r: redis.Redis) -> None:
    now, window = _short_minute_ttl(r)
    start = now.replace(minute=0) - timedelta(hours=2)
    args = ["--redis-url", _url(r), "--window", f"{window}m", "--at", utc_z(now)]
    out = _trends(*args, "--json")
    assert out.returncode == 0, out.stderr
    payload = json.loads(out.stdout)
    assert payload["total"] == 31  # what the keys hold; but never passed off as the window:
    assert payload["complete"] is False
    assert payload["covered"] == {"start": utc_z(start), "end": utc_z(now + timedelta(minutes=1))}
    span = f"{start:%Y-%m-%d %H:%M} to {now:%Y-%m-%d %H:%M} UTC"
    assert out.stderr.startswith("warning: the minute buckets at this window's edge have expired")
    assert f"whole hours were counted: {span}, not" in out.stderr
    assert "keep them 3600 s = 1 h" in out.stderr

    table = _trends(*args)
    head = table.stdout.splitlines()[0]
    assert f"over {start:%Y-%m-%d %H:%M} to {now:%Y-%m-%d %H:%M} UTC" in head
    assert f"the last {window}m up to {now:%Y-%m-%d %H:%M} UTC, widened to whole hours" in head
    csv = _trends(*args, "--csv")
    assert csv.stdout.splitlines()[0] == "rank,name,count,share"
    assert span in csv.stderr
    where = _trends(*args, "--by", "city", "--make", "bmw", "--json")
    assert json.loads(where.stdout)["complete"] is False and span in where.stderr
    assert json.loads(where.stdout)["covered"]["start"] == utc_z(start)


@pytest.mark.integration
def test_cli_at_days_ago_widens_to_the_hours_around_it_and_says_so(r: redis.Redis) -> None:
    day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=5)
    posts = [day + timedelta(hours=14, minutes=5), day + timedelta(hours=15, minutes=50)]
    posts.append(day + timedelta(hours=15))  # inside 14:31-15:30
    TrendWriter(r, "edges").apply(  # default TTLs: minutes of 5 days ago are gone at once
        [TrendRecord("t", 0, i, at, "Audi", "A4", None) for i, at in enumerate(posts)]
    )
    at = day + timedelta(hours=15, minutes=30)
    out = _trends("--redis-url", _url(r), "--at", utc_z(at), "--window", "60m", "--json")
    assert out.returncode == 0, out.stderr
    payload = json.loads(out.stdout)
    assert payload["total"] == 3 and payload["complete"] is False  # was complete: true
    assert payload["covered"] == {
        "start": utc_z(day + timedelta(hours=14)),
        "end": utc_z(day + timedelta(hours=16)),
    }


@pytest.mark.integration
def test_a_recent_window_is_complete_and_covers_what_was_asked(r: redis.Redis) -> None:
    now, _ = _short_minute_ttl(r)
    out = _trends("--redis-url", _url(r), "--window", "15m", "--at", utc_z(now), "--json")
    payload = json.loads(out.stdout)
    assert payload["complete"] is True and not out.stderr
    assert payload["covered"] == {
        "start": utc_z(now - timedelta(minutes=14)),
        "end": utc_z(now + timedelta(minutes=1)),
    }


@pytest.mark.integration
def test_cli_live_window_under_a_short_minute_ttl_does_not_widen_past_now(r: redis.Redis) -> None:
    # workers keeping minute buckets 60 s (the setting's floor): this hour's rollup stands in
    # for its expired minutes; covered ended at the hour's end, minutes that have not happened
    at = datetime.now(UTC).replace(second=0, microsecond=0)
    TrendWriter(r, "edges", minute_ttl_s=60).apply(
        [TrendRecord("t", 0, i, at - timedelta(minutes=i), "BMW", "X5", None) for i in range(3)]
    )
    out = _trends("--redis-url", _url(r), "--window", "15m", "--at", utc_z(at), "--json")
    after = datetime.now(UTC).replace(second=0, microsecond=0)
    assert out.returncode == 0, out.stderr
    payload = json.loads(out.stdout)
    assert payload["total"] == 3
    end = datetime.fromisoformat(payload["covered"]["end"])
    # at's minute, or the next if the clock ticked over meanwhile (its posts may be counted)
    assert at + timedelta(minutes=1) <= end <= after + timedelta(minutes=1), payload["covered"]
    start = datetime.fromisoformat(payload["covered"]["start"])
    assert start.minute == 0 and start <= at - timedelta(minutes=14)


@pytest.mark.integration
def test_scores_no_worker_writes_are_left_out_with_a_warning(r: redis.Redis, caplog) -> None:
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    key = trend_key("make", "m", now.strftime("%Y%m%d%H%M"))
    r.zadd(key, {"Half": 2.5, "Minus": -5, "BMW": 3, "Zero": 0})
    with caplog.at_level("WARNING", logger="worker.trends"):
        assert TrendReader(r).window(5, "make", now=now) == {"BMW": 3, "Zero": 0}
    warned = " ".join(rec.getMessage() for rec in caplog.records)
    assert "'Half' with the score 2.5" in warned and "'Minus' with the score -5.0" in warned
    out = _trends("--redis-url", _url(r), "--window", "5m", "--at", utc_z(now), "--compare")
    assert out.returncode == 0, out.stderr
    assert "Minus" not in out.stdout and "+-" not in out.stdout
    assert "(previous 0, +3, new)" in out.stdout


@pytest.mark.integration
def test_a_key_of_the_wrong_type_is_named(r: redis.Redis) -> None:
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    TrendWriter(r, "edges").apply([TrendRecord("t", 0, 0, now, "BMW", "X5", None)])
    key = trend_key("make", "m", now.strftime("%Y%m%d%H%M"))
    r.delete(key)
    r.set(key, "oops")
    reader = TrendReader(r)
    with pytest.raises(WrongTypeKeyError, match=f"^{re.escape(key)} holds a string, not the zset"):
        reader.window(5, "make", now=now)
    with pytest.raises(WrongTypeKeyError, match=key):
        reader.series(15, 15, "make", now=now)
    assert reader.window(5, "model", now=now) == {"BMW|X5": 1}  # other keys still read
    out = _trends("--redis-url", _url(r), "--window", "5m", "--at", utc_z(now))
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"error: Redis at {_url(r)}: {key} holds a string, not the zset of trend counts: "
        "something other than the workers wrote it; delete it (the workers cannot count into "
        "it either)"
    ]
    r.delete("carstream:trends:config")
    r.set("carstream:trends:config", "oops")
    with pytest.raises(WrongTypeKeyError, match=r"^carstream:trends:config holds a string"):
        TrendReader(r).ttls()


@pytest.mark.integration
def test_a_decoding_client_meets_a_member_that_is_not_utf8(r: redis.Redis) -> None:
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    key = trend_key("make", "m", now.strftime("%Y%m%d%H%M"))
    r.zadd(key, {b"\xff\xfeLatin1": 2, "BMW": 3})
    url = _url(r)
    out = _trends("--redis-url", f"{url}?decode_responses=true", "--window", "5m",
                  "--at", utc_z(now), "--json")  # fmt: skip
    assert out.returncode == 0, out.stderr  # was a UnicodeDecodeError traceback
    top = json.loads(out.stdout)["top"]
    assert top == [{"name": "BMW", "count": 3}, {"name": "\\xff\\xfeLatin1", "count": 2}]
    decoding = redis.Redis.from_url(url, decode_responses=True)
    try:
        with pytest.raises(redis.DataError, match=r"not UTF-8.*decode_responses=False"):
            TrendReader(decoding, MIN_TTL, HOUR_TTL).window(5, "make", now=now)
    finally:
        decoding.close()


# --- pure: tables line up in terminal columns, not code points ---------------------------


def test_wide_and_combining_names_keep_the_columns_aligned(capsys) -> None:
    # 東京車 is 3 code points in 6 columns, a decomposed é 2 in 1: padded by len(), the count
    # column moved 3 right and 1 left of the ASCII rows'
    _ranked([("東京車", 1, "25.0%"), ("Audi", 2, "50.0%"), ("e\u0301", 1, "25.0%")])
    lines = capsys.readouterr().out.splitlines()
    assert columns("東京車") == 6 and columns("e\u0301") == 1 and columns("Audi") == 4
    ends = {columns(line[: line.index("%") + 1]) for line in lines}
    assert len(lines) == 3 and len(ends) == 1, lines
