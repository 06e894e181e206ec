"""`python -m worker trends`: window parsing (pure) and the CLI against a real Redis."""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta

import pytest
import redis

from tests.support import worker_cli
from worker.trend_keys import TrendRecord
from worker.trend_windows import kept_after
from worker.trends import TrendWriter
from worker.trends_cli import parse_window, redacted


@pytest.mark.parametrize(("text", "minutes"), [("15m", 15), ("2h", 120), ("1d", 1440), ("3H", 180)])
def test_parse_window(text: str, minutes: int) -> None:
    assert parse_window(text) == minutes


@pytest.mark.parametrize("text", ["", "15", "m", "0m", "1w", "-5m", "1.5h", "400d"])
def test_parse_window_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="--window"):
        parse_window(text)


def test_an_uppercase_m_is_refused_as_ambiguous() -> None:
    # was one minute: 1M reads as a month as readily
    with pytest.raises(
        ValueError, match=r"--window '1M': M is ambiguous .*write minutes as m \(1m\)"
    ):
        parse_window("1M")
    assert parse_window("1m") == 1


def test_redacted_drops_credentials() -> None:
    assert redacted("redis://user:s3cret@host:6380/2") == "redis://host:6380/2"
    assert redacted("redis://user:s3cret@[::1]:6380/2") == "redis://[::1]:6380/2"
    assert redacted("redis://cache?password=s3cret") == "redis://cache"


def test_redacted_keeps_the_form_of_a_unix_socket_url() -> None:
    assert redacted("unix:///run/redis.sock") == "unix:///run/redis.sock"  # was unix:/run/...
    assert redacted("unix://user:s3cret@/run/redis.sock?db=2") == "unix:///run/redis.sock"


def _trends(*args: str) -> subprocess.CompletedProcess[str]:
    return worker_cli("trends", *args, timeout=60)


@pytest.fixture()
def trends_url(redis_url: str) -> str:
    url = redis_url.rsplit("/", 1)[0] + "/8"
    client = redis.Redis.from_url(url)
    client.flushdb()
    at = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=10)
    records = [
        ("Toyota", "Corolla", "Paris", 0),
        ("Toyota", "Yaris", "Paris", 1),
        ("Toyota", "Corolla", "Lyon", 2),
        ("BMW", "X5", "Lyon", 3),
        ("Audi", "A4", None, 60),  # an hour before: outside 15m, inside 2h
    ]
    TrendWriter(client, "cli").apply(
        [
            TrendRecord("t", 0, i, at - timedelta(minutes=back), make, model, city, False)
            for i, (make, model, city, back) in enumerate(records)
        ]
    )
    client.close()
    return url


@pytest.mark.integration
def test_cli_json_top_makes_and_models(trends_url: str) -> None:
    out = _trends("--redis-url", trends_url, "--window", "15m", "--json")
    assert out.returncode == 0, out.stderr
    payload = json.loads(out.stdout)
    assert payload["window_minutes"] == 15
    assert payload["top"] == [{"name": "Toyota", "count": 3}, {"name": "BMW", "count": 1}]

    out = _trends(
        "--redis-url", trends_url, "--window", "2h", "--by", "model", "--top", "2", "--json"
    )
    assert json.loads(out.stdout)["top"] == [
        {"name": "Toyota|Corolla", "count": 2},
        {"name": "Audi|A4", "count": 1},
    ]


@pytest.mark.integration
def test_cli_city_filter_and_table(trends_url: str) -> None:
    out = _trends("--redis-url", trends_url, "--window", "15m", "--city", " LYON", "--json")
    assert [(r["name"], r["count"]) for r in json.loads(out.stdout)["top"]] == [
        ("BMW", 1),
        ("Toyota", 1),
    ]
    table = _trends("--redis-url", trends_url, "--window", "15m", "--by", "city")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[1].split() == ["1.", "lyon", "2", "50.0%"]
    assert lines[2].split() == ["2.", "paris", "2", "50.0%"]


@pytest.mark.integration
def test_a_city_without_posts_names_the_cities_that_have_some(trends_url: str) -> None:
    # a typo otherwise reads as a quiet window: 0 posts and exit 0
    out = _trends("--redis-url", trends_url, "--window", "15m", "--city", "Pariss", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["top"] == []
    assert (
        "note: no posts from city 'pariss' in this window; cities with posts: lyon, paris "
        "(--by city lists them all)"
    ) in out.stderr
    out = _trends("--redis-url", trends_url, "--window", "15m", "--city", "Paris")
    assert out.returncode == 0 and "note:" not in out.stderr


@pytest.mark.parametrize(
    ("mode", "when"),
    [
        (["--window", "2h", "--every", "1h"], "in any interval"),
        (["--window", "15m", "--compare"], "in this window or the one before"),
    ],
)
@pytest.mark.integration
def test_a_city_without_posts_is_noted_in_a_series_and_a_comparison(
    trends_url: str, mode: list[str], when: str
) -> None:
    # the plain list's note was missing: a typo read as a table of quiet intervals
    out = _trends("--redis-url", trends_url, "--city", "Pariss", *mode, "--json")
    assert out.returncode == 0, out.stderr
    assert (
        f"note: no posts from city 'pariss' {when}; cities with posts: lyon, paris "
        "(--by city lists them all)"
    ) in out.stderr
    out = _trends("--redis-url", trends_url, "--city", "Paris", *mode)
    assert out.returncode == 0 and "note:" not in out.stderr, out.stderr


@pytest.mark.integration
def test_a_city_with_posts_but_none_counted_is_not_noted_as_postless(trends_url: str) -> None:
    # paris posted (classified), only no low-confidence posts: "no posts from city" was false
    out = _trends("--redis-url", trends_url, "--window", "15m", "--city", "Paris",
                  "--by", "low-confidence")  # fmt: skip
    assert out.returncode == 0 and "note:" not in out.stderr, out.stderr


@pytest.mark.integration
def test_a_make_typed_decomposed_finds_the_make_stored_composed(trends_url: str) -> None:
    # "S" + combining caron found 0 posts while "Škoda" found them; the header looked the same
    client = redis.Redis.from_url(trends_url)
    at = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=10)
    TrendWriter(client, "cli").apply(
        [TrendRecord("t", 2, i, at, "Škoda", "Octavia", "Brno") for i in range(2)]
    )
    client.close()
    base = ("--redis-url", trends_url, "--window", "15m", "--json")
    made = json.loads(_trends(*base, "--make", "S\u030ckoda").stdout)
    assert made["total"] == 2 and made["top"] == [{"name": "Škoda", "count": 2}]  # as stored
    model = json.loads(_trends(*base, "--by", "model", "--model", "s\u030cKODA|octavia").stdout)
    assert model["top"] == [{"name": "Škoda|Octavia", "count": 2}]
    where = json.loads(_trends(*base, "--by", "city", "--make", "S\u030ckoda").stdout)
    assert [(row["name"], row["count"]) for row in where["top"]] == [("brno", 2)]


@pytest.mark.integration
def test_cli_says_when_a_window_reaches_past_the_hour_rollups(trends_url: str) -> None:
    recent = _trends("--redis-url", trends_url, "--window", "2h", "--json")
    assert json.loads(recent.stdout)["complete"] is True and not recent.stderr

    long = _trends("--redis-url", trends_url, "--window", "40d", "--json")
    assert long.returncode == 0, long.stderr
    payload = json.loads(long.stdout)
    assert payload["complete"] is False
    assert payload["top"][0] == {"name": "Toyota", "count": 3}  # what has not expired still counts
    assert "may have expired" in long.stderr and "undercounts" in long.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--window", "15x"], "'15x'"),
        (["--top", "0"], "--top 0"),
        (["--at", "yesterday"], "yesterday"),
        (["--at", ""], "--at '': not an RFC 3339 timestamp"),  # was silently now
        (["--at", "0001-01-01T00:00:00Z"], "between 1970-01-01 and 2100-01-01"),
        (["--at", "9999-12-31T23:59:59-01:00"], "9999"),
        (["--redis-url", "localhost:6379"], "redis_url"),
        (["--city", "   "], "--city '   ': blank"),  # would silently count every city
        (["--city", "\udcff"], "not valid UTF-8"),  # a non-UTF-8 byte: was a traceback
        (["--redis-url", ""], "redis_url"),  # was silently the default URL
        # redis-py refuses these only at the first command: exit 1 "error: Redis at ..." before
        (
            ["--redis-url", "redis://u:s3cret@localhost:6379/0?protocol=9"],
            "error: redis_url redis://localhost:6379/0: protocol must be either 2 or 3",
        ),
        (["--redis-url", "redis://localhost/0?foo=1"], "unknown option 'foo' in the query"),
    ],
)
def test_cli_bad_values_exit_2_with_one_line(args: list[str], needle: str) -> None:
    out = _trends(*args)
    assert out.returncode == 2
    assert needle in out.stderr and "s3cret" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_buckets_are_certainly_kept_only_when_they_started_within_the_ttl() -> None:
    # a live hour is written while it runs, and each write sets its expiry to the write's time
    # plus the TTL: an hour rollup can expire up to an hour before its hour's end + TTL, so
    # only buckets that started within the TTL are certain to be there
    wall = datetime(2026, 11, 25, 17, 47, tzinfo=UTC)
    assert kept_after(wall, 30 * 86400) == datetime(2026, 10, 26, 17, 47, tzinfo=UTC)


@pytest.mark.integration
def test_cli_full_hour_rollup_window_is_complete(trends_url: str) -> None:
    # 30 days is exactly the hour rollups' TTL: its first hour is still alive. It ends on this
    # hour's hh:59, so it is whole hours: no edge minutes (expired after 48 h) widen it
    end = datetime.now(UTC).replace(minute=59, second=0, microsecond=0)
    out = _trends("--redis-url", trends_url, "--window", "30d", "--json", "--at", _z(end))
    assert out.returncode == 0, out.stderr
    payload = json.loads(out.stdout)
    assert payload["complete"] is True and not out.stderr
    start = end + timedelta(minutes=1) - timedelta(days=30)
    assert payload["covered"] == {"start": _z(start), "end": _z(end + timedelta(minutes=1))}


def _z(ts: datetime) -> str:
    return ts.isoformat().replace("+00:00", "Z")


@pytest.mark.integration
def test_cli_completeness_uses_the_workers_hour_ttl(trends_url: str) -> None:
    client = redis.Redis.from_url(trends_url)
    client.hset("carstream:trends:config", "hour_ttl_s", 86400)  # as workers with a 1-day TTL
    client.close()
    out = _trends("--redis-url", trends_url, "--window", "3d", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["complete"] is False
    assert "keep hour rollups 86400 s = 1 d" in out.stderr


@pytest.mark.integration
def test_cli_ignores_an_out_of_range_ttl_in_the_config(trends_url: str) -> None:
    client = redis.Redis.from_url(trends_url)
    client.hset("carstream:trends:config", "hour_ttl_s", "9" * 20)  # overflowed: a traceback
    client.close()
    out = _trends("--redis-url", trends_url, "--window", "15m", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["top"][0] == {"name": "Toyota", "count": 3}
    assert out.stderr.strip().splitlines() == [  # the config is read once
        f"ignoring a malformed TTL b'{'9' * 20}' in carstream:trends:config"
    ]


@pytest.mark.integration
def test_the_city_read_is_the_one_named(trends_url: str) -> None:
    # the header and JSON echoed the raw value (" LYON"), not the city whose keys were read
    args = ("--redis-url", trends_url, "--window", "15m", "--city", "  LYON ")
    payload = json.loads(_trends(*args, "--json").stdout)
    assert payload["city"] == "lyon" and payload["total"] == 2
    table = _trends(*args, "--make", "bmw")
    assert table.stdout.splitlines()[0].startswith("top make over the last 15m for bmw in lyon (")


@pytest.mark.integration
def test_a_breakdown_of_the_busiest_cities_only_says_it_is_cut(trends_url: str) -> None:
    # 1,502 cities: the reader reads the 1,000 busiest by all their posts; a city left out
    # (city1499, its one post a BMW) may post more of the make than one read
    args = ("--redis-url", trends_url, "--window", "15m", "--by", "city", "--make", "BMW")
    whole = json.loads(_trends(*args, "--json").stdout)  # lyon and paris: all read
    assert whole["complete"] is True and whole["cities_read"] == whole["cities_in_window"] == 2
    client = redis.Redis.from_url(trends_url)
    at = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=10)
    TrendWriter(client, "cli").apply(
        [
            TrendRecord("t", 1, i, at, "BMW" if i == 1499 else "Toyota", "X", f"city{i:04}")
            for i in range(1500)
        ]
    )
    client.close()
    out = _trends(*args, "--json")
    assert out.returncode == 0, out.stderr
    payload = json.loads(out.stdout)
    assert payload["complete"] is False  # was true, with the total of the cities read
    assert (payload["cities_read"], payload["cities_in_window"]) == (1000, 1502)
    assert (payload["total"], payload["cities"], payload["top"][0]["name"]) == (1, 1, "lyon")
    assert "read the 1000 busiest by all their posts" in out.stderr
    assert "a city left out may post more 'BMW'" in out.stderr
    head = _trends(*args).stdout.splitlines()[0]
    assert head.endswith(
        "1 post in 1 city, of the window's 1000 busiest cities (by all their posts) of 1502: a "
        "city left out may post more BMW than one listed"
    )


def test_json_output_escapes_del_and_c1_controls_and_keeps_other_text():
    """A label or city holding U+009B (a terminal's CSI) must not reach the terminal raw through
    --json, where JSON itself escapes only C0; readable non-ASCII text stays as it is."""
    import json

    from worker.trends_format import json_line

    value = {"make": "BMW\x9b31m\x1b\x7f", "city": "são paulo"}
    line = json_line(value)
    assert json.loads(line) == value
    assert not any(c in line for c in "\x1b\x7f\x9b")
    assert "são paulo" in line


@pytest.mark.parametrize(("flag", "value"), [("--window", "-5m"), ("--every", "-1h")])
def test_a_negative_window_is_named_by_its_own_check_not_argparse(flag, value, capsys) -> None:
    # was: "argument --window: expected one argument" (argparse read -5m as an unknown flag)
    from worker.__main__ import main as worker_main

    assert worker_main(["trends", flag, value, "--redis-url", "redis://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {flag} {value!r}: must be positive, a number with m, h or d (15m)"]
