"""Trends over time: series and window-on-window comparison.

The interval arithmetic and ranking are pure; the reader and `worker trends --every/--compare`
run against a real redis-server.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from itertools import pairwise

import pytest
import redis

from tests.support import worker_cli
from worker.trend_keys import TrendRecord, normalize_city, trend_key
from worker.trend_windows import (
    Interval,
    changes,
    compare_bounds,
    interval_keys,
    keep,
    name_matcher,
    series_bounds,
    series_names,
    window_keys,
)
from worker.trends import TrendReader, TrendWriter
from worker.trends_format import csv_cell, shown, utc_z

MIN_TTL = 48 * 3600
HOUR_TTL = 30 * 24 * 3600
WALL = datetime(2024, 3, 10, 13, 37, 25, tzinfo=UTC)


def _t(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2024, 3, day, hour, minute, tzinfo=UTC)


# --- pure: intervals, keys, ranking ------------------------------------------------------


def test_series_intervals_sit_on_the_clock_and_the_last_ends_after_now() -> None:
    bounds = series_bounds(60, 15, WALL)
    assert bounds == [
        (_t(10, 12, 45), _t(10, 13, 0)),
        (_t(10, 13, 0), _t(10, 13, 15)),
        (_t(10, 13, 15), _t(10, 13, 30)),
        (_t(10, 13, 30), _t(10, 13, 38)),  # in progress: up to and including 13:37
    ]
    days = series_bounds(3 * 1440, 1440, WALL)
    assert [start for start, _ in days] == [_t(8, 0), _t(9, 0), _t(10, 0)]
    assert days[-1][1] == _t(10, 13, 38)


def test_series_intervals_do_not_overlap_or_leave_gaps() -> None:
    bounds = series_bounds(7 * 1440, 90, WALL)
    assert len(bounds) == 7 * 16
    assert all(a_end == b_start for (_, a_end), (b_start, _) in pairwise(bounds))


@pytest.mark.parametrize(
    ("window", "every", "needle"),
    [(60, 7, "not a whole number"), (60, 120, "not a whole number"), (1440, 1, "more than 1000")],
)
def test_series_bounds_refuse_uneven_or_too_many_intervals(window, every, needle) -> None:
    with pytest.raises(ValueError, match=needle):
        series_bounds(window, every, WALL)


def test_compare_windows_are_the_trailing_window_and_the_one_before() -> None:
    previous, current = compare_bounds(60, WALL)
    assert current == (_t(10, 12, 38), _t(10, 13, 38))
    assert previous == (_t(10, 11, 38), _t(10, 12, 38))


def test_interval_keys_use_whole_hour_rollups_and_edge_minutes() -> None:
    keys = interval_keys("make", _t(10, 11, 50), _t(10, 13, 5), None, MIN_TTL, HOUR_TTL, WALL)
    minutes = [trend_key("make", "m", f"20240310115{i}") for i in range(10)]
    hour = [trend_key("make", "h", "2024031012")]
    edge = [trend_key("make", "m", f"20240310130{i}") for i in range(5)]
    assert keys == minutes + hour + edge


def test_interval_keys_never_widen_an_interval_whose_minutes_expired() -> None:
    # three days ago: minute buckets are gone, so a quarter hour cannot be told apart ...
    old = _t(7, 10, 15)
    assert (
        interval_keys("make", old, old + timedelta(minutes=15), None, MIN_TTL, HOUR_TTL, WALL)
        is None
    )
    # ... but a whole hour or day still can, from the rollups
    assert interval_keys("make", _t(7, 10), _t(7, 11), None, MIN_TTL, HOUR_TTL, WALL) == [
        trend_key("make", "h", "2024030710")
    ]
    # and past the hour rollups' TTL nothing is kept
    gone = _t(10, 10) - timedelta(days=31)
    assert (
        interval_keys("make", gone, gone + timedelta(hours=1), None, MIN_TTL, HOUR_TTL, WALL)
        is None
    )


def test_an_hour_rollup_is_a_gap_once_its_start_is_older_than_the_ttl() -> None:
    # written live at 10:05, the 10:00 rollup expires at 10:05 + TTL, before 11:00 + TTL
    hour = WALL.replace(minute=0, second=0) - timedelta(seconds=HOUR_TTL)
    assert interval_keys("make", hour, hour + timedelta(hours=1), None, 60, HOUR_TTL, WALL) is None
    later = hour + timedelta(hours=1)
    assert interval_keys("make", later, later + timedelta(hours=1), None, 60, HOUR_TTL, WALL)


def test_interval_keys_refuse_bounds_that_are_not_whole_minutes() -> None:
    start = _t(10, 12) + timedelta(seconds=30)
    with pytest.raises(ValueError, match="whole minutes"):
        interval_keys("make", start, start + timedelta(minutes=30), None, MIN_TTL, HOUR_TTL, WALL)


def test_a_stored_city_normalises_to_itself() -> None:
    # cut at 64 characters right after a space: stored with it, the name read back from the
    # city keys normalised to another key and its posts were not found
    long = "Municipio de San Cristóbal de las Casas, Chiapas, Estado Unidos Mexicanos"
    stored = normalize_city(long)
    assert stored == normalize_city(stored) and not stored.endswith(" ")


def test_interval_keys_per_city() -> None:
    keys = interval_keys("model", _t(10, 12), _t(10, 13), " LYON ", MIN_TTL, HOUR_TTL, WALL)
    assert keys == [trend_key("model", "h", "2024031012", "lyon")]


def test_series_names_rank_over_the_kept_intervals() -> None:
    intervals = [
        Interval(_t(10, 10), _t(10, 11), {"BMW": 5, "Audi": 1}),
        Interval(_t(10, 11), _t(10, 12), None),  # expired: no counts, no weight
        Interval(_t(10, 12), _t(10, 13), {"Audi": 3, "Toyota": 4, "BMW": 1}),
    ]
    assert series_names(intervals, 3) == ["BMW", "Audi", "Toyota"]  # 6, then 4 and 4 by name
    assert series_names(intervals, 1) == ["BMW"]
    assert intervals[1].total is None and intervals[2].total == 8


def test_changes_rank_the_current_window_and_name_what_is_new() -> None:
    previous = Interval(_t(10, 11), _t(10, 12), {"BMW": 4, "Audi": 9})
    current = Interval(_t(10, 12), _t(10, 13), {"BMW": 6, "Tesla": 2, "Audi": 1})
    rows = changes(previous, current, 2)
    assert [(r.name, r.count, r.previous, r.change) for r in rows] == [
        ("BMW", 6, 4, 2),
        ("Tesla", 2, 0, 2),
    ]
    expired = changes(Interval(_t(10, 11), _t(10, 12), None), current, 1)
    assert expired[0].previous is None and expired[0].change is None


def test_rising_ranks_by_posts_gained_and_counts_a_vanished_name() -> None:
    previous = Interval(_t(10, 11), _t(10, 12), {"BMW": 9, "Audi": 1, "Lada": 4})
    current = Interval(_t(10, 12), _t(10, 13), {"BMW": 10, "Audi": 6, "Tesla": 3})
    rows = changes(previous, current, 10, "rise")
    assert [(r.name, r.count, r.previous, r.change) for r in rows] == [
        ("Audi", 6, 1, 5),
        ("Tesla", 3, 0, 3),
        ("BMW", 10, 9, 1),
        ("Lada", 0, 4, -4),  # gone this window: the biggest faller, last
    ]
    with pytest.raises(ValueError, match="expired"):
        changes(Interval(_t(10, 11), _t(10, 12), None), current, 3, "rise")


def test_a_make_filter_keeps_the_make_and_its_models_in_any_case() -> None:
    counts = {"BMW": 3, "BMW|X5": 2, "bmw|M3": 1, "Audi|A4": 4, "BMWX|Q": 9}
    assert keep(counts, name_matcher(make=" bmw")) == {"BMW": 3, "BMW|X5": 2, "bmw|M3": 1}
    assert keep(counts, name_matcher(model="BMW|x5")) == {"BMW|X5": 2}
    assert keep(counts, name_matcher()) == counts
    assert keep(None, name_matcher(make="BMW")) is None  # an expired interval stays a gap
    with pytest.raises(ValueError, match="not both"):
        name_matcher(make="BMW", model="BMW|X5")


def test_the_city_dimension_has_no_per_city_window() -> None:
    with pytest.raises(ValueError, match="no per-city keys"):
        TrendReader(None, MIN_TTL, HOUR_TTL).window(60, "city", city="paris")


# --- the reader and the CLI against a real redis-server ------------------------------------


@pytest.fixture()
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + "/10")
    client.flushdb()
    yield client
    client.close()


def _write(client: redis.Redis, posts: list[tuple[datetime, str, str | None]]) -> None:
    TrendWriter(client, "series", MIN_TTL, HOUR_TTL).apply(
        [
            TrendRecord("t", 0, i, at, make, "X", city, False)
            for i, (at, make, city) in enumerate(posts)
        ]
    )


def _quarter_now() -> datetime:
    """Ten minutes into a quarter hour, so that a test's posts fall in known intervals."""
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    return now - timedelta(minutes=now.minute % 15) - timedelta(minutes=5)


@pytest.mark.integration
def test_a_series_adds_up_to_the_window_it_covers(r: redis.Redis) -> None:
    now = _quarter_now()
    grid = now - timedelta(minutes=10)  # start of now's quarter hour
    posts = [
        (grid - timedelta(minutes=40), "BMW", "Paris"),  # two quarters back
        (grid - timedelta(minutes=16), "BMW", None),  # the quarter before
        (grid - timedelta(minutes=1), "Audi", "Paris"),  # the quarter before, last minute
        (grid, "Audi", "Lyon"),  # now's quarter, first minute
        (now, "Toyota", "Paris"),  # now's minute
        (now + timedelta(minutes=1), "Tesla", None),  # a minute in the future: not yet shown
    ]
    _write(r, posts)
    reader = TrendReader(r)
    series = reader.series(60, 15, "make", now=now)
    assert [i.counts for i in series] == [
        {"BMW": 1},
        {"BMW": 1},
        {"Audi": 1},
        {"Audi": 1, "Toyota": 1},
    ]
    assert series[-1].end == now + timedelta(minutes=1)
    covered = int((now - series[0].start).total_seconds() // 60) + 1
    assert sum(i.total for i in series) == sum(reader.window(covered, "make", now=now).values())
    paris = reader.series(60, 15, "make", city="paris", now=now)
    assert [i.counts for i in paris] == [{"BMW": 1}, {}, {"Audi": 1}, {"Toyota": 1}]
    cities = reader.series(30, 15, "city", now=now)
    assert cities[-1].counts == {"lyon": 1, "paris": 1}


@pytest.mark.integration
def test_a_series_shows_expired_minutes_as_gaps_not_zeros(r: redis.Redis) -> None:
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=3)
    _write(r, [(hour + timedelta(minutes=20), "BMW", None)])  # its minute bucket expires at once
    reader = TrendReader(r)
    quarters = reader.series(60, 15, "make", now=hour + timedelta(minutes=59))
    assert [i.counts for i in quarters] == [None, None, None, None]
    hours = reader.series(120, 60, "make", now=hour + timedelta(minutes=59))
    assert [i.counts for i in hours] == [{}, {"BMW": 1}]


@pytest.mark.integration
def test_cities_of_a_make_rank_cities_by_its_posts_with_their_share(r: redis.Redis) -> None:
    now = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=1)
    posts = [(now, "BMW", "München")] * 3 + [(now, "Audi", "München")]
    posts += [(now, "BMW", "Paris")] + [(now, "Toyota", "Paris")] * 3
    posts += [
        (now, "BMW", None),
        (now, "Toyota", "Lyon"),
        (now - timedelta(hours=2), "BMW", "Lyon"),
    ]
    _write(r, posts)
    rows, cities = TrendReader(r).cities_of(60, name_matcher(make="bmw"), now=now)
    assert [(c.city, c.count, c.city_total) for c in rows] == [("münchen", 3, 4), ("paris", 1, 4)]
    assert cities == 3  # lyon posted, but no BMW within the hour
    busiest, _ = TrendReader(r).cities_of(60, name_matcher(make="bmw"), now=now, max_cities=1)
    assert [c.city for c in busiest] == ["münchen"]  # the busiest city of the window only
    models, _ = TrendReader(r).cities_of(60, name_matcher(model="bmw|x"), "model", now=now)
    assert [(c.city, c.count) for c in models] == [("münchen", 3), ("paris", 1)]


@pytest.mark.integration
def test_members_no_worker_would_write_read_without_a_traceback(r: redis.Redis) -> None:
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    key = trend_key("make", "m", now.strftime("%Y%m%d%H%M"))
    r.zadd(key, {b"\xff\xfeLatin1": 2, "Inf": float("inf"), "BMW": 3})
    counts = TrendReader(r).window(5, "make", now=now)
    assert counts == {"\\xff\\xfeLatin1": 2, "BMW": 3}  # the inf score is left out


def test_window_keys_leave_out_hours_past_their_ttl() -> None:
    keys = window_keys("make", 366 * 1440, WALL, None, MIN_TTL, WALL, hour_ttl_s=HOUR_TTL)
    hours = [k for k in keys if ":h:" in k]
    assert 30 * 24 <= len(hours) <= 30 * 24 + 2  # not ~8,800: the rest are certainly gone
    assert len(window_keys("make", 366 * 1440, WALL, None, MIN_TTL, WALL)) > 8000


@pytest.mark.integration
def test_cities_of_finds_a_city_cut_at_a_space(r: redis.Redis) -> None:
    city = "Municipio de San Cristóbal de las Casas, Chiapas, Estado Unidos Mexicanos"
    now = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=1)
    _write(r, [(now, "BMW", city)] * 3 + [(now, "Audi", city)])
    rows, _ = TrendReader(r).cities_of(60, name_matcher(make="BMW"), now=now)
    assert [(c.city, c.count, c.city_total) for c in rows] == [(normalize_city(city), 3, 4)]


@pytest.mark.integration
def test_cli_compare_keeps_its_window_when_the_previous_one_is_gone(r: redis.Redis) -> None:
    url = r.connection_pool.connection_kwargs
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    _write(
        r, [(now - timedelta(minutes=5), "BMW", None), (now - timedelta(minutes=30), "Audi", None)]
    )
    redis_url = f"redis://{url['host']}:{url['port']}/{url['db']}"
    at = now - timedelta(minutes=1) if now.minute == 59 else now  # not a window of whole hours
    out = _trends(
        "--redis-url", redis_url, "--window", "16d", "--compare", "--json", "--at", utc_z(at)
    )
    assert out.returncode == 0, out.stderr
    payload = json.loads(out.stdout)
    # the 16 days before reach past the 30-day hour rollups: no shift to whole hours helps,
    # so the current window is counted as the plain top list counts it and only the previous
    # one reads as expired; its first minutes expired, so that is widened to a whole hour,
    # which the payload and a warning say (the hour is no longer passed off as complete)
    assert payload["total"] == 2 and payload["previous"]["total"] is None
    assert payload["complete"] is False and "note:" not in out.stderr
    start = at + timedelta(minutes=1) - timedelta(days=16)
    assert payload["covered"]["start"] == utc_z(start.replace(minute=0))
    assert payload["covered"]["end"] == utc_z(at + timedelta(minutes=1))
    assert "whole hours were counted" in out.stderr
    assert {row["name"]: row["previous"] for row in payload["top"]} == {"BMW": None, "Audi": None}


@pytest.mark.integration
def test_cli_compare_shifts_to_whole_hours_and_says_what_it_left_out(r: redis.Redis) -> None:
    url = r.connection_pool.connection_kwargs
    redis_url = f"redis://{url['host']}:{url['port']}/{url['db']}"
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
    at = hour + timedelta(minutes=30)  # half an hour into a past hour
    _write(
        r,
        [(hour - timedelta(minutes=90), "BMW", None), (hour + timedelta(minutes=10), "Audi", None)],
    )
    out = _trends("--redis-url", redis_url, "--window", "3d", "--compare", "--json",
                  "--at", utc_z(at))  # fmt: skip
    assert out.returncode == 0, out.stderr
    payload = json.loads(out.stdout)
    # 3-6 days back the minute buckets are gone: whole hours up to `hour` compare instead,
    # which counts BMW and leaves out Audi's minutes after the hour, and the note says so
    assert payload["at"] == utc_z(hour - timedelta(minutes=1))
    assert {row["name"]: row["count"] for row in payload["top"]} == {"BMW": 1}
    assert "comparing the whole hours" in out.stderr and "leaves out the 31 minute(s)" in out.stderr


@pytest.mark.integration
def test_cli_series_with_gaps_says_so_and_is_not_complete(r: redis.Redis) -> None:
    url = r.connection_pool.connection_kwargs
    redis_url = f"redis://{url['host']}:{url['port']}/{url['db']}"
    _write(r, [(datetime.now(UTC) - timedelta(minutes=1), "BMW", None)])
    out = _trends("--redis-url", redis_url, "--window", "3d", "--every", "1h", "--json")
    assert out.returncode == 0, out.stderr
    payload = json.loads(out.stdout)
    assert payload["complete"] is True  # whole hours reach back 30 days
    out = _trends("--redis-url", redis_url, "--window", "3d", "--every", "15m", "--json")
    payload = json.loads(out.stdout)
    gaps = [i for i in payload["intervals"] if i["counts"] is None]
    assert payload["complete"] is False and gaps and gaps[0] == payload["intervals"][0]
    assert f"{len(gaps)} of 288 intervals are gaps" in out.stderr
    assert sum(i["total"] or 0 for i in payload["intervals"]) == 1


def _trends(*args: str) -> subprocess.CompletedProcess[str]:
    return worker_cli("trends", *args, timeout=60)


@pytest.fixture()
def series_url(redis_url: str) -> Iterator[tuple[str, datetime]]:
    url = redis_url.rsplit("/", 1)[0] + "/11"
    client = redis.Redis.from_url(url)
    client.flushdb()
    now = _quarter_now()
    posts = [(now - timedelta(minutes=70 + i), "BMW", "Paris") for i in range(4)]
    posts += [(now - timedelta(minutes=65), "Audi", None)]
    posts += [(now - timedelta(minutes=i), "Tesla", "Lyon") for i in range(3)]
    posts += [(now - timedelta(minutes=5), "BMW", None)]
    _write(client, posts)
    client.close()
    yield url, now


@pytest.mark.integration
def test_cli_compare_gives_each_name_its_previous_count(series_url) -> None:
    url, now = series_url
    at = now.isoformat().replace("+00:00", "Z")
    out = _trends("--redis-url", url, "--window", "1h", "--at", at, "--compare", "--json")
    assert out.returncode == 0, out.stderr
    payload = json.loads(out.stdout)
    assert payload["total"] == 4 and payload["previous"]["total"] == 5
    assert payload["top"] == [
        {"name": "Tesla", "count": 3, "previous": 0, "change": 3},
        {"name": "BMW", "count": 1, "previous": 4, "change": -3},
    ]
    table = _trends("--redis-url", url, "--window", "1h", "--at", at, "--compare")
    lines = table.stdout.splitlines()
    assert "4 posts; the 1h before: 5 posts" in lines[0]
    assert lines[1].split()[:3] == ["1.", "Tesla", "3"] and "new" in lines[1]
    assert "(previous 4, -3, -75.0%)" in lines[2]


@pytest.mark.integration
def test_cli_compare_ranked_by_rise(series_url) -> None:
    url, now = series_url
    at = now.isoformat().replace("+00:00", "Z")
    args = ("--redis-url", url, "--window", "1h", "--at", at, "--compare", "--rank", "rise")
    payload = json.loads(_trends(*args, "--json").stdout)
    assert payload["rank"] == "rise"
    assert [(r["name"], r["change"]) for r in payload["top"]] == [
        ("Tesla", 3),
        ("Audi", -1),
        ("BMW", -3),
    ]
    assert _trends(*args).stdout.startswith("rising make over the last 1h")


@pytest.mark.integration
def test_cli_series_json_and_table(series_url) -> None:
    url, now = series_url
    at = now.isoformat().replace("+00:00", "Z")
    out = _trends(
        "--redis-url", url, "--window", "2h", "--every", "15m", "--at", at, "--top", "2", "--json"
    )
    assert out.returncode == 0, out.stderr
    payload = json.loads(out.stdout)
    assert payload["every_minutes"] == 15 and payload["names"] == ["BMW", "Tesla"]
    intervals = payload["intervals"]
    end = (now + timedelta(minutes=1)).isoformat().replace("+00:00", "Z")
    assert len(intervals) == 8 and intervals[-1]["end"] == end  # in progress: up to --at
    assert sum(i["total"] for i in intervals) == 9
    assert intervals[-1]["counts"] == {"BMW": 1, "Tesla": 3}
    table = _trends("--redis-url", url, "--window", "2h", "--every", "15m", "--at", at)
    rows = table.stdout.splitlines()
    assert rows[1].split()[:5] == ["start", "(UTC)", "total", "BMW", "Tesla"]
    assert rows[-1].split()[2:5] == ["4", "1", "3"]  # total, BMW, Tesla of now's quarter


@pytest.mark.integration
def test_cli_plain_top_reports_the_total_and_shares(series_url) -> None:
    url, now = series_url
    at = now.isoformat().replace("+00:00", "Z")
    payload = json.loads(_trends("--redis-url", url, "--window", "2h", "--at", at, "--json").stdout)
    assert payload["total"] == 9
    table = _trends("--redis-url", url, "--window", "2h", "--at", at).stdout.splitlines()
    assert table[0].endswith(": 9 posts")
    assert table[1].split() == ["1.", "BMW", "5", "55.6%"]


@pytest.mark.integration
def test_cli_by_city_of_a_make_and_models_of_a_make(series_url) -> None:
    url, now = series_url
    at = now.isoformat().replace("+00:00", "Z")
    out = _trends("--redis-url", url, "--window", "2h", "--at", at, "--by", "city", "--make", "bmw")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].endswith(": 4 posts in 1 city")  # the fifth BMW post has no city
    assert lines[1].split() == ["1.", "paris", "4", "100.0%", "of", "its", "confident", "posts"]
    models = _trends(
        "--redis-url", url, "--window", "2h", "--at", at, "--by", "model", "--make", "BMW", "--json"
    )
    assert json.loads(models.stdout)["top"] == [{"name": "BMW|X", "count": 5}]
    series = _trends(
        "--redis-url",
        url,
        "--window",
        "2h",
        "--every",
        "1h",
        "--at",
        at,
        "--make",
        "tesla",
        "--json",
    )
    payload = json.loads(series.stdout)
    assert payload["names"] == ["Tesla"] and payload["make"] == "tesla"
    assert [i["total"] for i in payload["intervals"]] == [0, 3]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--make", "  "], "--make '  ': blank"),
        (["--model", "X5"], "write it as Make|Model"),
        (["--model", "|", "--by", "model"], "write it as Make|Model"),
        (["--make", "BMW|X5"], "a make has no '|'"),
        (["--rank", "rise"], "add --compare"),
        (["--model", "BMW|X5"], "use --by model or --by city, not --by make"),
        (["--by", "city", "--make", "BMW", "--compare"], "not with --every or --compare"),
        (["--make", "BMW", "--model", "BMW|X5"], "not allowed with"),
        (["--every", "7m"], "not a whole number of 7-min intervals"),
        (["--every", "1m", "--window", "30d"], "more than 1000"),
        (["--every", "0m"], "--every '0m'"),
        (["--every", "1h", "--compare"], "not allowed with"),
    ],
)
def test_cli_bad_series_values_exit_2_with_one_line(args: list[str], needle: str) -> None:
    out = _trends(*args)
    assert out.returncode == 2
    assert needle in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("value", "cell"),
    [
        ('=HYPERLINK("http://x")', '\'=HYPERLINK("http://x")'),
        ("+1", "'+1"),
        ("-cmd", "'-cmd"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\tx", "\\tx"),  # a control character: its escape, which no spreadsheet runs
        ("paris", "paris"),
        (-3, -3),  # a number is a number
        ("", ""),
    ],
)
def test_csv_cells_never_run_as_formulas(value, cell) -> None:
    assert csv_cell(value) == cell


@pytest.mark.parametrize(
    ("value", "cell"),
    [
        ("\x1b]0;pwned\x07BMW", "\\x1b]0;pwned\\x07BMW"),  # ESC, BEL: were passed through raw
        ("Audi\x9b2J", "Audi\\x9b2J"),  # a C1 control (CSI)
        ("\x1b=cmd", "\\x1b=cmd"),
        ("=A1\x1b", "'=A1\\x1b"),
    ],
)
def test_csv_cells_show_what_a_terminal_would_act_on_as_escapes(value, cell) -> None:
    assert csv_cell(value) == cell


def test_csv_round_trips_ordinary_names_and_escapes_controls(capsys) -> None:
    import csv
    import io

    from worker.trends_format import _csv

    names = ["são paulo", "a, b", 'say "hi"', "Mercedes-Benz|C-Class", "tehr\u200can", "münchen"]
    for name in [*names, "\x1b[2JBMW\x07"]:
        _csv([1, name, 2])
    out = capsys.readouterr().out
    cells = [row[1] for row in csv.reader(io.StringIO(out))]
    assert cells == [*names, "\\x1b[2JBMW\\x07"]  # the last was written raw


@pytest.mark.integration
def test_cli_csv_series_and_a_hostile_city(series_url) -> None:
    import csv
    import io

    url, now = series_url
    at = now.isoformat().replace("+00:00", "Z")
    out = _trends("--redis-url", url, "--window", "2h", "--every", "1h", "--at", at, "--csv")
    assert out.returncode == 0, out.stderr
    rows = list(csv.reader(io.StringIO(out.stdout)))
    header = rows[0]
    assert header[:3] == ["start", "end", "total"] and {"BMW", "Tesla"} <= set(header[3:])
    assert len(rows) == 3  # the hour before, and now's hour so far
    now_hour = dict(zip(header, rows[2], strict=True))
    assert now_hour["total"] == "4" and now_hour["Tesla"] == "3" and now_hour["BMW"] == "1"
    client = redis.Redis.from_url(url)
    hostile = TrendRecord("t", 1, 0, now, "BMW", "X", '=HYPERLINK("http://evil")', False)
    TrendWriter(client, "series", MIN_TTL, HOUR_TTL).apply([hostile])  # partition 1: a new offset
    client.close()
    out = _trends("--redis-url", url, "--window", "1h", "--at", at, "--by", "city", "--csv")
    cities = [r[1] for r in csv.reader(io.StringIO(out.stdout))][1:]
    assert '\'=hyperlink("http://evil")' in cities and "lyon" in cities


def test_a_city_normalises_to_itself_whatever_it_is() -> None:
    # the cut at 64 characters can split what NFKC composes (Greek with dialytika and tonos),
    # and a dotted capital I followed by a combining dot leaves one dot after the first pass
    import random

    rng = random.Random(0)
    alphabet = "aİıΐΰϊ\u0307\u0308\u0301 \x85\u200b\u202eßﬁ①Ｓ"
    samples = ["a" * 62 + "ΐzz", "İ\u0307stanbul", "a" * 63 + " b"]
    samples += [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 80))) for _ in range(3000)
    ]
    for city in samples:
        once = normalize_city(city)
        assert once is None or normalize_city(once) == once, repr(city)


def test_a_city_keeps_nel_as_a_space_and_drops_zero_width_characters() -> None:
    assert normalize_city("Saint\x85Denis") == normalize_city("Saint Denis") == "saint denis"
    assert normalize_city("Paris\u200b") == normalize_city("\ufeffParis\u2060") == "paris"


def test_a_model_filter_ignores_spaces_around_the_separator() -> None:
    assert keep({"BMW|X5": 2, "BMW|X6": 1}, name_matcher(model="bmw | x5")) == {"BMW|X5": 2}


def test_a_city_drops_control_characters_and_bidi_overrides() -> None:
    assert normalize_city("\x1b[2J\x1b[31mParis\x07") == "[2j[31mparis"
    assert normalize_city("Par\u202eis") == "paris"  # would display as "Parsi"
    assert normalize_city("\x85 Lyon\x1c") == "lyon"
    assert normalize_city("\x1b\x00") is None
    assert normalize_city("Tehr\u200can") == "tehr\u200can"  # a joiner is part of a spelling


def test_tables_show_what_a_terminal_would_act_on_as_escapes() -> None:
    assert shown("são paulo") == "são paulo"
    assert shown("a\x1b[2Jb") == "a\\x1b[2Jb"


@pytest.mark.integration
def test_cli_csv_shows_control_characters_as_escapes(series_url) -> None:
    import csv
    import io

    url, now = series_url
    client = redis.Redis.from_url(url)
    make = "\x1b]0;pwned\x07\x1b[2JBMW\x9b"  # makes and models are not normalised as cities are
    TrendWriter(client, "series", MIN_TTL, HOUR_TTL).apply(
        [TrendRecord("t", 3, 0, now, make, "X", None, False)]
    )
    client.close()
    at = now.isoformat().replace("+00:00", "Z")
    out = _trends("--redis-url", url, "--window", "1h", "--at", at, "--csv")
    assert out.returncode == 0, out.stderr
    assert not any(c in out.stdout for c in "\x1b\x07\x9b")  # were written raw
    names = [row[1] for row in csv.reader(io.StringIO(out.stdout))][1:]
    assert "\\x1b]0;pwned\\x07\\x1b[2JBMW\\x9b" in names and "Tesla" in names


@pytest.mark.integration
def test_a_hostile_city_never_reaches_the_terminal_raw(series_url) -> None:
    url, now = series_url
    client = redis.Redis.from_url(url)
    city = "\x1b]0;pwned\x07\x1b[2JLyon\u202e"
    TrendWriter(client, "series", MIN_TTL, HOUR_TTL).apply(
        [TrendRecord("t", 2, 0, now, "BMW", "X", city, False)]
    )
    client.close()
    at = now.isoformat().replace("+00:00", "Z")
    out = _trends("--redis-url", url, "--window", "1h", "--at", at, "--by", "city")
    assert out.returncode == 0, out.stderr
    assert "\x1b" not in out.stdout and "\u202e" not in out.stdout and "\x07" not in out.stdout
    assert "2. ]0;pwned[2jlyon" in out.stdout or "1. ]0;pwned[2jlyon" in out.stdout
