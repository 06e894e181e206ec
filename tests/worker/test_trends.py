"""Redis trends: the key schema (pure) and the exactly-once Lua writer + reader (real Redis)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import pytest
import redis

from worker.trend_keys import (
    CONFIG_KEY,
    TrendRecord,
    applied_key,
    increments,
    minute_bucket,
    normalize_city,
    retry_key,
    trend_key,
)
from worker.trend_windows import window_keys
from worker.trends import TrendReader, TrendWriter

TOPIC = "car-posts"
MIN_TTL = 48 * 3600
HOUR_TTL = 30 * 24 * 3600


def _base() -> datetime:
    """A whole hour a few hours ago: recent enough for every minute bucket to live."""
    return datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=5)


def rec(
    offset: int,
    at: datetime,
    make: str | None = "Toyota",
    model: str | None = "Corolla",
    city: str | None = None,
    partition: int = 0,
    low: bool = False,
    post_id: str | None = None,
    retryable: bool = False,
) -> TrendRecord:
    return TrendRecord(TOPIC, partition, offset, at, make, model, city, low, post_id, retryable)


# --- pure key schema -------------------------------------------------------------------


def test_buckets_are_utc_minutes_and_hours() -> None:
    paris = datetime(2024, 3, 1, 2, 30, 59, tzinfo=timezone(timedelta(hours=1)))
    assert minute_bucket(paris) == "202403010130"
    keys = {k for k, _ in increments(rec(0, datetime(2024, 3, 1, 23, 59, 1, tzinfo=UTC)))}
    assert "carstream:trends:make:m:202403012359" in keys
    assert "carstream:trends:model:h:2024030123" in keys
    with pytest.raises(ValueError, match="naive"):
        minute_bucket(datetime(2024, 3, 1))


def test_city_normalisation() -> None:
    assert normalize_city("  São   Paulo ") == normalize_city("SÃO PAULO") == "são paulo"
    assert normalize_city("   ") is None
    # casefold gives i + U+0307 for the Turkish dotted capital: still the same city
    assert normalize_city("İSTANBUL") == normalize_city("İstanbul") == "istanbul"
    assert normalize_city("Istanbul") == "istanbul"
    assert normalize_city(None) is None
    assert len(normalize_city("x" * 500) or "") == 128
    # every city the input schema accepts (128 characters) keeps all of them: two that differ
    # only near their end are two cities
    long_name = "Taumatawhakatangihangakoauauotamateaturipukakapikimaungahoronuku"
    north, south = (normalize_city(f"{long_name}-{side}-District") for side in ("North", "South"))
    assert north != south and north.endswith("north-district")
    assert normalize_city("a" * 127 + "b") == "a" * 127 + "b"


def test_increments_per_kind() -> None:
    at = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
    assert increments(rec(0, at, make=None, model=None)) == []  # dead-lettered: count nothing
    ok = increments(rec(0, at, city="Paris"))
    assert ("carstream:trends:model:m:202403011200", "Toyota|Corolla") in ok
    assert ("carstream:trends:make:h:2024030112:city:paris", "Toyota") in ok
    assert ("carstream:trends:city:m:202403011200", "paris") in ok
    low = increments(rec(0, at, low=True))
    assert {k.split(":")[2] for k, _ in low} == {"lowconf"}  # never counted as a brand


def test_window_keys_short_window_uses_minutes() -> None:
    now = datetime(2024, 3, 1, 11, 1, 30, tzinfo=UTC)
    assert window_keys("make", 3, now) == [
        trend_key("make", "m", b) for b in ("202403011059", "202403011100", "202403011101")
    ]


def test_window_keys_long_window_uses_hours_and_edge_minutes() -> None:
    now = datetime(2024, 3, 1, 13, 30, tzinfo=UTC)
    keys = window_keys("make", 180, now, minute_ttl_s=MIN_TTL)  # 10:31 .. 13:30
    minutes = [k for k in keys if ":m:" in k]
    hours = [k.rsplit(":", 1)[1] for k in keys if ":h:" in k]
    assert hours == ["2024030111", "2024030112"]
    assert len(minutes) == 29 + 31  # 10:31-10:59 and 13:00-13:30
    assert len(set(keys)) == len(keys)


def test_window_keys_beyond_minute_ttl_fall_back_to_the_hour() -> None:
    now = datetime(2024, 3, 10, 13, 30, tzinfo=UTC)
    keys = window_keys("make", 3 * 24 * 60, now, minute_ttl_s=MIN_TTL)
    assert keys[0] == trend_key("make", "h", "2024030713")  # leading edge, minutes expired
    assert not any(":m:202403071" in k for k in keys)


def test_window_keys_in_the_past_measure_expiry_from_the_wall_clock() -> None:
    wall = datetime(2024, 3, 10, 13, 30, tzinfo=UTC)
    at = wall - timedelta(days=3)  # `trends --at` three days ago: its minutes are gone
    keys = window_keys("make", 120, at, minute_ttl_s=MIN_TTL, wall_now=wall)  # 11:31 .. 13:30
    assert keys == [trend_key("make", "h", b) for b in ("2024030711", "2024030712", "2024030713")]
    recent = window_keys("make", 120, wall, minute_ttl_s=MIN_TTL, wall_now=wall)
    assert sum(":m:" in k for k in recent) == 29 + 31  # now: the edges still come from minutes


# --- Lua writer + reader against a real redis-server -----------------------------------


@pytest.fixture()
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + "/9")
    client.flushdb()
    yield client
    client.close()


def snapshot(client: redis.Redis) -> dict[bytes, object]:
    """Every trend key with its full contents (what a redelivery must not change)."""
    out: dict[bytes, object] = {}
    for key in client.scan_iter("carstream:trends:*"):
        kind = client.type(key)
        if kind == b"string":  # a post_id seen key
            out[key] = (client.get(key), client.ttl(key))
        else:
            out[key] = client.hgetall(key) if kind == b"hash" else client.zrange(key, 0, -1, True)
    return out


@pytest.mark.integration
def test_a_window_days_ago_counts_from_hour_rollups_after_minutes_expired(r: redis.Redis) -> None:
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=3)
    w = TrendWriter(r, "g", MIN_TTL, HOUR_TTL)  # minute keys of 3 days ago expire at once
    w.apply([rec(0, hour - timedelta(minutes=15)), rec(1, hour + timedelta(minutes=15))])
    assert not list(r.scan_iter("carstream:trends:make:m:*"))
    counts = dict(TrendReader(r, MIN_TTL).top(120, now=hour + timedelta(minutes=30)))
    assert counts == {"Toyota": 2}


@pytest.mark.integration
def test_reader_uses_the_ttls_the_writers_recorded_not_its_own(r: redis.Redis) -> None:
    # workers keep minute buckets 1 h; a reader with default settings (48 h) would read the
    # expired minutes of a partial hour and miss its counts
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    post = now - timedelta(minutes=150)  # its minute bucket has expired, its hour rollup lives
    TrendWriter(r, "g", minute_ttl_s=3600, hour_ttl_s=7 * 86400).apply([rec(0, post, "Old")])
    assert TrendReader(r).ttls() == (3600, 7 * 86400)
    window = int((now - post.replace(minute=0)) / timedelta(minutes=1)) - 5  # starts mid-hour
    assert TrendReader(r).top(window, now=now) == [("Old", 1)]
    assert TrendReader(r, minute_ttl_s=48 * 3600).top(window, now=now) == []  # the old bug
    assert TrendReader(r, hour_ttl_s=86400).ttls() == (3600, 86400)  # overrides win


@pytest.mark.integration
def test_reader_ttls_default_when_no_writer_recorded_them(r: redis.Redis) -> None:
    assert TrendReader(r).ttls() == (MIN_TTL, HOUR_TTL)
    r.hset("carstream:trends:config", mapping={"minute_ttl_s": "junk"})
    assert TrendReader(r).ttls() == (MIN_TTL, HOUR_TTL)
    # out of range: a huge one overflowed the reader's datetime arithmetic (a traceback)
    r.hset("carstream:trends:config", mapping={"minute_ttl_s": "-5", "hour_ttl_s": "9" * 20})
    assert TrendReader(r).ttls() == (MIN_TTL, HOUR_TTL)
    assert TrendReader(r).top(60) == []


@pytest.mark.integration
def test_apply_counts_and_advances_position(r: redis.Redis) -> None:
    at = _base() + timedelta(minutes=10)
    w = TrendWriter(r, "g", MIN_TTL, HOUR_TTL)
    res = w.apply([rec(0, at), rec(1, at, "BMW", "X5"), rec(2, at), rec(3, at, None, None)])
    assert (res.applied, res.ignored) == (4, 0)
    assert w.positions() == {(TOPIC, 0): 3}
    reader = TrendReader(r)
    now = at + timedelta(seconds=30)
    assert reader.top(5, by="make", now=now) == [("Toyota", 2), ("BMW", 1)]
    assert reader.top(5, by="model", now=now) == [("Toyota|Corolla", 2), ("BMW|X5", 1)]


@pytest.mark.integration
def test_redelivered_batch_changes_nothing(r: redis.Redis) -> None:
    at = _base()
    w = TrendWriter(r, "g", MIN_TTL, HOUR_TTL)
    batch = [rec(i, at, partition=i % 2) for i in range(10, 16)]
    assert w.apply(batch).applied == 6
    before = snapshot(r)
    res = w.apply(batch)
    assert (res.applied, res.ignored) == (0, 6)
    assert snapshot(r) == before


@pytest.mark.integration
def test_stale_replica_waking_late_changes_nothing(r: redis.Redis) -> None:
    at = _base()
    new_owner = TrendWriter(r, "g", MIN_TTL, HOUR_TTL)
    stale = TrendWriter(r, "g", MIN_TTL, HOUR_TTL)  # another replica, same group
    new_owner.apply([rec(o, at) for o in range(0, 20)])
    before = snapshot(r)
    res = stale.apply([rec(o, at, "Audi", "A4") for o in range(5, 12)])  # its old batch
    assert (res.applied, res.ignored) == (0, 7)
    assert snapshot(r) == before
    assert new_owner.positions() == {(TOPIC, 0): 19}


@pytest.mark.integration
@pytest.mark.parametrize("foreign", ["last trend key", "applied hash", "config hash"])
def test_a_key_of_the_wrong_type_fails_the_batch_whole_and_its_retry_counts_once(
    r: redis.Redis, foreign: str
) -> None:
    # Redis keeps what a script wrote before an error: without the type check up front, the
    # first records' counts stayed, the position did not move, and every retry counted again
    at = _base()
    w = TrendWriter(r, "g", MIN_TTL, HOUR_TTL)
    batch = [rec(0, at), rec(1, at, "BMW", "X5", city="Paris")]
    key = {
        "last trend key": increments(batch[1])[-1][0],
        "applied hash": applied_key("g"),
        "config hash": CONFIG_KEY,
    }[foreign]
    r.set(key, "written by something else")
    before = snapshot(r)
    for _ in range(3):  # the worker retries a failed apply
        with pytest.raises(redis.ResponseError, match=f"WRONGTYPE carstream: {key} holds a string"):
            w.apply(batch)
    assert snapshot(r) == before
    r.delete(key)
    assert w.apply(batch).applied == 2
    counts = dict(TrendReader(r).top(5, now=at + timedelta(seconds=30)))
    assert counts == {"Toyota": 1, "BMW": 1}


@pytest.mark.integration
def test_mixed_batch_applies_only_the_new_records(r: redis.Redis) -> None:
    at = _base()
    w = TrendWriter(r, "g", MIN_TTL, HOUR_TTL)
    w.apply([rec(o, at) for o in range(0, 6)])  # offsets 0..5 of partition 0
    res = w.apply(
        [rec(o, at, "Audi", "A4") for o in (7, 4, 5, 6)]  # out of order on purpose
        + [rec(0, at, "Audi", "A4", partition=1)]  # partition 1 never applied
    )
    assert (res.applied, res.ignored) == (3, 2)
    counts = dict(TrendReader(r).top(1, now=at))
    assert counts == {"Toyota": 6, "Audi": 3}
    assert w.positions() == {(TOPIC, 0): 7, (TOPIC, 1): 0}


@pytest.mark.integration
def test_a_post_re_sent_at_a_new_offset_is_counted_once_within_the_window(r: redis.Redis) -> None:
    at = _base()
    w = TrendWriter(r, "g", MIN_TTL, HOUR_TTL, dedup_ttl_s=600)
    first = w.apply([rec(0, at, post_id="p1"), rec(1, at, "BMW", "X5", post_id="p2")])
    assert (first.applied, first.ignored, first.duplicates) == (2, 0, 0)
    # the producer retried p1 (offset 2; its guess is the same), and p1 again in one batch with p3
    again = w.apply([rec(2, at, post_id="p1")])
    both = w.apply([rec(3, at, "Audi", "A4", post_id="p3"), rec(4, at, "Audi", "A4", post_id="p3")])
    assert (again.applied, again.duplicates) == (0, 1)
    assert (both.applied, both.duplicates) == (1, 1)
    counts = dict(TrendReader(r).top(5, now=at))
    assert counts == {"Toyota": 1, "BMW": 1, "Audi": 1}
    assert w.positions() == {(TOPIC, 0): 4}  # the offsets move on past duplicates
    assert 590 <= r.ttl("carstream:trends:seen:p1") <= 600
    assert r.get("carstream:trends:seen:p2") == b"1"


@pytest.mark.integration
def test_a_redelivered_batch_does_not_touch_seen_keys(r: redis.Redis) -> None:
    at = _base()
    w = TrendWriter(r, "g", MIN_TTL, HOUR_TTL, dedup_ttl_s=600)
    w.apply([rec(0, at, post_id="p1"), rec(1, at, post_id="p2")])
    r.expire("carstream:trends:seen:p1", 100)
    before = snapshot(r)
    res = w.apply([rec(0, at, post_id="p1"), rec(1, at, post_id="p-new")])  # a redelivery
    assert (res.applied, res.ignored, res.duplicates) == (0, 2, 0)
    assert snapshot(r) == before  # no seen key for p-new, p1's TTL not renewed
    assert not r.exists("carstream:trends:seen:p-new")


@pytest.mark.integration
def test_a_dead_letter_does_not_mark_its_post_id_seen(r: redis.Redis) -> None:
    at = _base()
    w = TrendWriter(r, "g", MIN_TTL, HOUR_TTL, dedup_ttl_s=600)
    w.apply([rec(0, at, None, None, post_id="p1")])  # the first copy failed (e.g. URL fetch)
    assert w.apply([rec(1, at, post_id="p1")]).applied == 1  # the re-sent copy counts
    assert dict(TrendReader(r).top(5, now=at)) == {"Toyota": 1}


@pytest.mark.integration
def test_a_retryable_dead_letter_classified_on_redelivery_is_counted_once(r: redis.Redis) -> None:
    # the first delivery's fetch failed (dead-lettered), the worker crashed before its commit,
    # and the redelivery fetched and classified the post: the counts follow the result the
    # results topic got, once however often the batch is redelivered after that
    at = _base()
    w = TrendWriter(r, "g", MIN_TTL, HOUR_TTL, dedup_ttl_s=600)
    first = [rec(0, at), rec(1, at, None, None, post_id="p1", retryable=True)]
    assert w.apply(first, now=at.timestamp()).applied == 2
    assert r.zrange(retry_key("g"), 0, -1) == [f"{TOPIC}:0:1".encode()]
    again = [rec(0, at), rec(1, at, "BMW", "X5", post_id="p1")]
    res = w.apply(again, now=at.timestamp() + 60)
    assert (res.applied, res.ignored) == (1, 1)
    assert dict(TrendReader(r).top(5, now=at)) == {"Toyota": 1, "BMW": 1}
    assert not r.exists(retry_key("g"))
    before = snapshot(r)
    assert w.apply(again, now=at.timestamp() + 120).ignored == 2
    assert snapshot(r) == before
    assert w.positions() == {(TOPIC, 0): 1}


@pytest.mark.integration
def test_a_retryable_dead_letter_failing_again_stays_noted_and_others_are_not(
    r: redis.Redis,
) -> None:
    at = _base()
    t = at.timestamp()
    w = TrendWriter(r, "g", MIN_TTL, HOUR_TTL)
    w.apply([rec(0, at, None, None, retryable=True), rec(1, at, None, None)], now=t)
    # a redelivery that fails again keeps the note; the deterministic dead letter (offset 1,
    # e.g. not an image) was never noted, so a classification of it later (a new model version
    # reading the same bytes) counts nothing, like any other redelivered record
    assert w.apply([rec(0, at, None, None, retryable=True)], now=t + 1).ignored == 1
    res = w.apply([rec(0, at, "Audi", "A4"), rec(1, at, "BMW", "X5")], now=t + 2)
    assert (res.applied, res.ignored) == (1, 1)
    assert dict(TrendReader(r).top(5, now=at)) == {"Audi": 1}


@pytest.mark.integration
def test_a_retryable_dead_letter_whose_post_id_counted_since_is_a_duplicate(
    r: redis.Redis,
) -> None:
    at = _base()
    t = at.timestamp()
    w = TrendWriter(r, "g", MIN_TTL, HOUR_TTL, dedup_ttl_s=600)
    w.apply([rec(0, at, None, None, post_id="p1", retryable=True)], now=t)
    w.apply([rec(1, at, post_id="p1")], now=t + 1)  # the producer re-sent it; that copy counted
    res = w.apply([rec(0, at, post_id="p1")], now=t + 2)  # the first copy, redelivered
    assert (res.applied, res.duplicates) == (0, 1)
    assert dict(TrendReader(r).top(5, now=at)) == {"Toyota": 1}


@pytest.mark.integration
def test_a_retry_note_from_a_recreated_topic_does_not_count_its_new_record_twice(
    r: redis.Redis,
) -> None:
    at = _base()
    t = at.timestamp()
    w = TrendWriter(r, "g", MIN_TTL, HOUR_TTL, dedup_ttl_s=0)
    w.apply([rec(5, at, None, None, retryable=True)], now=t)
    r.delete(applied_key("g"))  # the topic was recreated: its position deleted, as documented
    assert w.apply([rec(5, at, "BMW", "X5")], now=t + 1).applied == 1  # the new topic's record
    res = w.apply([rec(5, at, "BMW", "X5")], now=t + 2)  # redelivered after a crash
    assert (res.applied, res.ignored) == (0, 1)
    assert dict(TrendReader(r).top(5, now=at)) == {"BMW": 1}


@pytest.mark.integration
def test_retry_notes_expire_after_a_day_and_are_capped(
    r: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    at = _base()
    t = at.timestamp()
    w = TrendWriter(r, "g", MIN_TTL, HOUR_TTL)
    w.apply([rec(0, at, None, None, retryable=True)], now=t)
    assert 0 < r.ttl(retry_key("g")) <= 24 * 3600
    # a redelivery a day and a second later: the note is gone, the record is a plain repeat
    res = w.apply([rec(0, at)], now=t + 24 * 3600 + 1)
    assert (res.applied, res.ignored) == (0, 1)
    monkeypatch.setattr("worker.trends.RETRY_MAX_ENTRIES", 3)
    w.apply([rec(o, at, None, None, retryable=True) for o in range(1, 6)], now=t + 1)
    assert r.zrange(retry_key("g"), 0, -1) == [f"{TOPIC}:0:{o}".encode() for o in (3, 4, 5)]


@pytest.mark.integration
def test_dedup_off_counts_every_offset(r: redis.Redis) -> None:
    at = _base()
    w = TrendWriter(r, "g", MIN_TTL, HOUR_TTL, dedup_ttl_s=0)
    res = w.apply([rec(0, at, post_id="p1"), rec(1, at, post_id="p1")])
    assert (res.applied, res.duplicates) == (2, 0)
    assert dict(TrendReader(r).top(5, now=at)) == {"Toyota": 2}
    assert not list(r.scan_iter("carstream:trends:seen:*"))


@pytest.mark.integration
def test_groups_keep_separate_positions(r: redis.Redis) -> None:
    at = _base()
    TrendWriter(r, "g1").apply([rec(0, at)])
    assert TrendWriter(r, "g2").apply([rec(0, at)]).applied == 1


@pytest.mark.integration
def test_ttls_follow_event_time(r: redis.Redis) -> None:
    w = TrendWriter(r, "g", minute_ttl_s=3600, hour_ttl_s=7200)
    now = datetime.now(UTC)
    old = now - timedelta(minutes=30)
    future = now + timedelta(days=365)  # skewed client clock
    w.apply([rec(0, old), rec(1, future, "Kia", "Rio")])
    old_min_ttl = r.ttl(trend_key("make", "m", minute_bucket(old)))
    assert 3600 - 31 * 60 - 5 <= old_min_ttl <= 3600 - 29 * 60  # anchored on the bucket end
    hour_ttl = r.ttl(trend_key("make", "h", old.strftime("%Y%m%d%H")))
    assert 0 < hour_ttl <= 7200
    future_ttl = r.ttl(trend_key("make", "m", minute_bucket(future)))
    assert 3590 <= future_ttl <= 3600  # capped: as if posted now, not a year ahead
    assert r.ttl("carstream:trends:applied:g") == -1  # positions never expire


@pytest.mark.integration
def test_city_buckets_and_cities(r: redis.Redis) -> None:
    at = _base()
    w = TrendWriter(r, "g")
    w.apply(
        [
            rec(0, at, city=" Paris"),
            rec(1, at, "BMW", "X5", city="PARIS"),
            rec(2, at, "BMW", "X5", city="Lyon"),
            rec(3, at, "BMW", "X1"),
        ]
    )
    reader = TrendReader(r)
    assert reader.top(1, city="paris ", now=at) == [("BMW", 1), ("Toyota", 1)]
    assert reader.top(1, by="model", city="Lyon", now=at) == [("BMW|X5", 1)]
    assert reader.top(1, now=at) == [("BMW", 3), ("Toyota", 1)]
    assert reader.cities(1, now=at) == [("paris", 2), ("lyon", 1)]


@pytest.mark.integration
def test_low_confidence_is_counted_apart(r: redis.Redis) -> None:
    at = _base()
    TrendWriter(r, "g").apply(
        [rec(0, at), rec(1, at, "BMW", "X5", low=True), rec(2, at, "BMW", "X5", "Oslo", low=True)]
    )
    reader = TrendReader(r)
    assert reader.top(1, now=at) == [("Toyota", 1)]
    assert reader.low_confidence(1, now=at) == [("BMW", 2)]
    assert reader.low_confidence(1, city="oslo", now=at) == [("BMW", 1)]


@pytest.mark.integration
def test_window_union_across_minute_and_hour_boundaries(r: redis.Redis) -> None:
    b = _base()  # hh:00
    times = {
        "Audi": b - timedelta(hours=2, seconds=1),  # just before the 3h window
        "BMW": b - timedelta(hours=2) + timedelta(seconds=5),  # first minute of it (edge)
        "Fiat": b - timedelta(minutes=90),  # inside a whole hour (rollup)
        "Kia": b - timedelta(seconds=30),  # last minute of the hour before b
        "Mini": b + timedelta(minutes=59, seconds=59),  # the current minute
    }
    TrendWriter(r, "g").apply([rec(i, t, make) for i, (make, t) in enumerate(times.items())])
    reader = TrendReader(r)
    now = b + timedelta(minutes=59, seconds=59, microseconds=1)

    def makes(window: int) -> set[str]:
        return {m for m, _ in reader.top(window, top=100, now=now)}

    assert makes(1) == {"Mini"}
    assert makes(60) == {"Mini"}
    assert makes(61) == {"Mini", "Kia"}
    assert makes(180) == {"Mini", "Kia", "Fiat", "BMW"}
    assert makes(181) == set(times)
    assert reader.top(181, top=2, now=now) == [("Audi", 1), ("BMW", 1)]


def test_the_manifest_refuses_the_separator_the_trends_split_models_at() -> None:
    """A make holding it would split wrong in `Make|Model` members: the bundle rule and the key
    schema must name the same character."""
    from engine_build import manifest
    from worker import trend_keys

    assert manifest.MODEL_SEPARATOR == trend_keys.MODEL_SEPARATOR
