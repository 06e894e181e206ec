"""`python -m worker trends`: print the live top makes/models (or cities) from Redis.

Connects exactly as `python -m worker run` does (same CARSTREAM_* settings, `--redis-url`
overrides); reads through `TrendReader`, so what it prints is what dashboards get.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from training.cli_errors import fail, first_validation_error, utf8_problem
from training.cli_help import DefaultsHelpFormatter
from worker.connections import redacted
from worker.schemas import EARLIEST_POSTED_AT, LATEST_POSTED_AT
from worker.trend_keys import MODEL_SEPARATOR, Dimension, normalize_city
from worker.trend_windows import (
    MAX_WINDOW_MINUTES,
    Interval,
    changes,
    compare_bounds,
    keep,
    kept_after,
    name_matcher,
    rank,
    series_bounds,
    series_names,
    summed_counts,
)
from worker.trends import MAX_BREAKDOWN_CITIES, TrendReader
from worker.trends_format import (
    count_of,
    print_compare,
    print_series,
    print_top,
    print_where,
    utc_z,
)

_WINDOW = re.compile(r"^\s*(\d+)\s*([mhd])\s*$", re.IGNORECASE)
_UNIT_MINUTES = {"m": 1, "h": 60, "d": 1440}
BY_CHOICES = ("make", "model", "city", "low-confidence")
_DIMENSION = {"make": "make", "model": "model", "city": "city", "low-confidence": "lowconf"}


def parse_window(text: str, flag: str = "--window") -> int:
    """Minutes in a window (or a series' interval) written as 15m, 2h or 1d (H and D too; an
    uppercase M is refused as ambiguous)."""
    match = _WINDOW.match(text)
    if not match and text.strip().startswith("-"):
        raise ValueError(f"{flag} {text!r}: must be positive, a number with m, h or d (15m)")
    if not match:
        raise ValueError(f"{flag} {text!r}: expected a number with m, h or d (15m, 2h, 1d)")
    if match.group(2) == "M":  # 1M reads as a month as readily as a minute
        raise ValueError(
            f"{flag} {text!r}: M is ambiguous (minutes or months?): write minutes as m "
            f"({match.group(1)}m); there is no month unit (days: d)"
        )
    minutes = int(match.group(1)) * _UNIT_MINUTES[match.group(2).lower()]
    if not 1 <= minutes <= MAX_WINDOW_MINUTES:
        raise ValueError(f"{flag} {text!r}: must be between 1m and 366d")
    return minutes


def parse_at(text: str) -> datetime:
    """An RFC 3339 timestamp with a timezone (Z allowed), in the years events may carry.

    Parsed by the worker's own ``posted_at`` validation (:class:`worker.schemas.PostEvent`), so
    ``--at`` takes exactly what a post's event time may be: a leap second (23:59:60Z) is
    accepted as the worker reads it (23:59:59), ISO 8601 forms RFC 3339 lacks (week dates,
    basic format) are refused.
    """
    from pydantic import ValidationError

    from worker.schemas import PostEvent

    probe = {"post_id": "at", "image_url": "https://at.invalid/", "posted_at": text}
    try:
        at = PostEvent.model_validate(probe).posted_at
    except ValidationError as exc:
        raise ValueError(f"--at {text!r}: {_at_problem(exc)}") from None
    return at.astimezone(UTC)


def _at_problem(exc: Exception) -> str:
    """What the worker's posted_at validation found wrong, worded for --at."""
    errors = [e for e in exc.errors() if e.get("loc") == ("posted_at",)]  # type: ignore[attr-defined]
    message = str(errors[0].get("msg", "")) if errors else ""
    if "not between" in message:
        return (
            f"must be between {EARLIEST_POSTED_AT:%Y-%m-%d} and {LATEST_POSTED_AT:%Y-%m-%d} "
            "UTC, the range of event times"
        )
    if "timezone" in message:
        return "needs a timezone (e.g. Z)"
    if "second 60" in message:
        return "second 60 exists only at 23:59:60 UTC"
    detail = "" if "RFC 3339" in message else f" ({message.removeprefix('Value error, ')})"
    return f"not an RFC 3339 timestamp like 2026-12-06T15:30:00Z{detail}"


def _window_complete(first_minute: datetime, wall_now: datetime, hour_ttl_s: int) -> bool:
    """Whether every count of a window that starts at ``first_minute`` is still kept; warns
    on stderr when not."""
    horizon = kept_after(wall_now, hour_ttl_s)
    if first_minute > horizon:
        return True
    print(
        f"warning: counts from before {horizon:%Y-%m-%d %H:%M} UTC may have expired (the "
        f"workers keep hour rollups {hour_ttl_s} s = {hour_ttl_s / 86400:g} d, "
        "CARSTREAM_TREND_HOUR_TTL_S): this window undercounts",
        file=sys.stderr,
    )
    return False


def _span_exact(
    covered: tuple[datetime, datetime], asked: tuple[datetime, datetime], minute_ttl_s: int
) -> bool:
    """Whether the minutes counted are the window asked for; warns on stderr, naming the span
    counted, where expired edge minutes widened it to whole hours."""
    if covered == asked:
        return True
    print(
        f"warning: the minute buckets at this window's edge have expired (the workers keep "
        f"them {minute_ttl_s} s = {minute_ttl_s / 3600:g} h, CARSTREAM_TREND_MINUTE_TTL_S), so "
        f"whole hours were counted: {_span(covered)}, not {_span(asked)} (a window from an "
        "hh:00 to an hh:59 minute is exact)",
        file=sys.stderr,
    )
    return False


def _span(span: tuple[datetime, datetime]) -> str:
    """[start, end) of whole minutes as its first and last minute: ... 14:00 to ... 15:59 UTC."""
    start, end = span
    return f"{start:%Y-%m-%d %H:%M} to {end - timedelta(minutes=1):%Y-%m-%d %H:%M} UTC"


def _series_complete(intervals: list[dict], minute_ttl_s: int, hour_ttl_s: int) -> bool:
    """Whether no interval of a series is a gap; warns on stderr when some are."""
    gaps = sum(1 for interval in intervals if interval["counts"] is None)
    if not gaps:
        return True
    print(
        f"warning: {gaps} of {count_of(len(intervals), 'interval')} are gaps: their buckets have "
        f"expired (the workers keep minute buckets {minute_ttl_s / 3600:g} h and hour rollups "
        f"{hour_ttl_s / 86400:g} d; whole hours and days reach back further than shorter "
        "intervals)",
        file=sys.stderr,
    )
    return False


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Top car makes/models in Redis over a trailing event-time window.",
        add_help=add_help,
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--window", default="60m", help="trailing window: 15m, 2h, 1d")
    parser.add_argument(
        "--by", choices=BY_CHOICES, default="make", help="what to rank (models are Make|Model)"
    )
    parser.add_argument("--city", default=None, help="only posts from this city")
    which = parser.add_mutually_exclusive_group()
    which.add_argument(
        "--make",
        default=None,
        help="only this make (any case); with --by model its models, with --by city the "
        "cities that post it and its share of their posts",
    )
    which.add_argument(
        "--model",
        default=None,
        help="only this model, written Make|Model; with --by city the cities that post it",
    )
    parser.add_argument("--top", type=int, default=10, help="how many to print")
    parser.add_argument("--at", default=None, help="end of the window, RFC 3339 (default: now)")
    how = parser.add_mutually_exclusive_group()
    how.add_argument(
        "--every",
        default=None,
        help="a series: the counts per interval (15m, 1h, 1d) of the window's top names; "
        "intervals are UTC clock quarters, hours, days, the last one in progress",
    )
    how.add_argument(
        "--compare",
        action="store_true",
        help="each name's count in the window before, of the same length, and the change",
    )
    parser.add_argument(
        "--rank",
        choices=("count", "rise"),
        default="count",
        help="with --compare: rank by posts in the window, or by posts gained on the window "
        "before (the risers first, the fallers last)",
    )
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print JSON instead of a table")
    out.add_argument(
        "--csv",
        action="store_true",
        help="print CSV with a header row, for spreadsheets (cells that a spreadsheet would "
        "run as a formula are quoted with a leading ')",
    )
    parser.add_argument(
        "--redis-url", default=None, help="Redis URL (default: the worker's CARSTREAM_REDIS_URL)"
    )
    return parser


def _by_city_of_a_name(args: argparse.Namespace) -> bool:
    """--by city with --make/--model: the cities that post one make or model."""
    return args.by == "city" and (args.make is not None or args.model is not None)


def name_problem(args: argparse.Namespace) -> str | None:
    """Why the name filters (--make/--model) or --rank cannot apply as given, in one line, or
    None."""
    for flag, value in (("--make", args.make), ("--model", args.model)):
        if value is None:
            continue
        if not value.strip():
            return f"{flag} {value!r}: blank (leave {flag} out to count every name)"
        if utf8_problem(value) is not None:
            return f"{flag} {value!r}: not valid UTF-8"
    if args.make is not None and MODEL_SEPARATOR in args.make:
        return f"--make {args.make!r}: a make has no '|' (for a model: --model Make|Model)"
    if args.model is not None:
        make, _, model = args.model.partition(MODEL_SEPARATOR)
        if not make.strip() or not model.strip():
            return f"--model {args.model!r}: write it as Make|Model (BMW|X5)"
        if args.by not in ("model", "city"):
            return f"--model counts models: use --by model or --by city, not --by {args.by}"
    if args.rank != "count" and not args.compare:
        return f"--rank {args.rank} ranks a comparison: add --compare"
    if _by_city_of_a_name(args) and (args.every is not None or args.compare):
        return "--by city with --make/--model ranks one window: not with --every or --compare"
    return None


def _note_other_cities(city: str, cities: dict[str, int], when: str = "in this window") -> None:
    """Say which cities have posts when ``city`` has none: a typo ("Pariss") otherwise reads
    as a quiet window. ``cities``: the posts per city over the same span; ``when`` names it."""
    norm = normalize_city(city)
    if not cities or norm in cities:  # the city posted, only not what is counted (lowconf)
        return
    listed = ", ".join(name for name, _ in rank(cities, 5))
    more = f" and {len(cities) - 5} more" if len(cities) > 5 else ""
    print(
        f"note: no posts from city {norm!r} {when}; cities with posts: {listed}{more} "
        "(--by city lists them all)",
        file=sys.stderr,
    )


def main(args: argparse.Namespace) -> int:
    """CLI edge: parse, read through TrendReader, print a table, JSON or CSV."""
    try:
        minutes = parse_window(args.window)
        at = parse_at(args.at) if args.at is not None else datetime.now(UTC)  # "" is an error
        every = parse_window(args.every, "--every") if args.every is not None else None
    except ValueError as exc:
        return fail(str(exc))
    bounds = None
    if every is not None:
        try:
            bounds = series_bounds(minutes, every, at)
        except ValueError as exc:
            return fail(f"--every {args.every!r} with --window {args.window!r}: {exc}")
    if args.top < 1:
        return fail(f"--top {args.top}: must be at least 1")
    if args.city is not None and args.by == "city":
        return fail("--city cannot be combined with --by city")
    if args.city is not None and normalize_city(args.city) is None:
        return fail(f"--city {args.city!r}: blank (leave --city out to count every city)")
    if args.city is not None and utf8_problem(args.city) is not None:
        return fail(f"--city {args.city!r}: not valid UTF-8")
    problem = name_problem(args)
    if problem:
        return fail(problem)
    match = name_matcher(args.make, args.model)
    where = _by_city_of_a_name(args)

    import redis
    from pydantic import ValidationError

    from worker.connections import redis_client
    from worker.settings import WorkerSettings, unknown_env_warnings

    try:
        # given empty is an error, not the default
        overrides = {"redis_url": args.redis_url} if args.redis_url is not None else {}
        settings = WorkerSettings(**overrides)
    except ValidationError as exc:
        return fail(f"settings: {first_validation_error(exc)}")
    try:
        settings.check_files()  # a missing CA file otherwise reads as a server not answering
    except ValueError as exc:
        return fail(str(exc))
    # a mistyped variable (CARSTREAM_REDIS_UR) otherwise reads the default Redis, unsaid;
    # stderr, as the other warnings: stdout is the table, JSON or CSV that scripts read
    for line in unknown_env_warnings():
        print(f"warning: {line}", file=sys.stderr)
    try:
        client = redis_client(settings)  # refuses a bad option of the URL before any I/O
    except ValueError as exc:
        return fail(str(exc))
    # replies undecoded whatever the URL says (?decode_responses=true): a member some other
    # writer stored in another encoding then reads as its escapes, not as a traceback
    client.connection_pool.connection_kwargs["decode_responses"] = False
    reader = TrendReader(client)  # bucket TTLs as the workers recorded them
    dim = _DIMENSION[args.by]
    try:
        minute_ttl_s, hour_ttl_s = reader.ttls()
        # read once: the queries below would read (and warn about a malformed one) again
        reader = TrendReader(client, minute_ttl_s, hour_ttl_s)
        if where:
            result = _where(reader, args, minutes, at, match)
        elif bounds is not None:
            result = _series(reader, args, every, bounds, dim, match)
        elif args.compare:
            result, at = _compare(reader, args, minutes, at, dim, match)
        else:
            read = reader.read_window(minutes, dim, args.city, at)
            counts = keep(read.counts, match)
            result = {"total": sum(counts.values()), "top": rank(counts, args.top)}
            result["covered"] = (read.start, read.end)
            if args.city is not None and not read.counts:
                cities = reader.read_window(minutes, "city", None, at).counts
                _note_other_cities(args.city, cities)
    except redis.RedisError as exc:
        print(f"error: Redis at {redacted(settings.redis_url)}: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()

    wall_now = datetime.now(UTC)
    city = normalize_city(args.city) if args.city is not None else None  # the key read
    head = {"window_minutes": minutes, "by": args.by, "city": city, "at": utc_z(at)}
    if bounds is not None:
        head["complete"] = _series_complete(result["intervals"], minute_ttl_s, hour_ttl_s)
    else:
        end = at.replace(second=0, microsecond=0) + timedelta(minutes=1)
        asked = (end - timedelta(minutes=minutes), end)
        covered = result.pop("covered")
        exact = _span_exact(covered, asked, minute_ttl_s)
        result["widened"] = not exact  # for the table's header
        kept = _window_complete(covered[0], wall_now, hour_ttl_s)
        cut = where and result["cities_read"] < result["cities_in_window"]
        head["complete"] = exact and kept and not cut
        head["covered"] = {"start": utc_z(covered[0]), "end": utc_z(covered[1])}
    if args.make is not None or args.model is not None:
        head["make"], head["model"] = args.make, args.model
    if args.compare:
        head["rank"] = result.pop("rank")  # count, where rise fell back for want of a window
    if where:
        print_where(args, head, result)
    elif bounds is not None:
        print_series(args, head, result)
    elif args.compare:
        print_compare(args, head, result)
    else:
        print_top(args, head, result)
    return 0


def _series(
    reader: TrendReader,
    args: argparse.Namespace,
    every: int,
    bounds: list[tuple[datetime, datetime]],
    dim: Dimension,
    match: Callable[[str], bool],
) -> dict:
    read = reader.intervals(bounds, dim, args.city)
    if args.city is not None and not any(i.counts for i in read):
        cities = reader.intervals(bounds, "city")  # the same intervals, every city
        _note_other_cities(args.city, summed_counts([i.counts for i in cities]), "in any interval")
    intervals = [Interval(i.start, i.end, keep(i.counts, match)) for i in read]
    names = series_names(intervals, args.top)
    return {
        "every_minutes": every,
        "names": names,
        "intervals": [
            {
                "start": utc_z(i.start),
                "end": utc_z(i.end),
                "total": i.total,
                "counts": None if i.counts is None else {n: i.counts.get(n, 0) for n in names},
            }
            for i in intervals
        ],
    }


def _compare(
    reader: TrendReader,
    args: argparse.Namespace,
    minutes: int,
    at: datetime,
    dim: Dimension,
    match: Callable[[str], bool],
) -> tuple[dict, datetime]:
    previous, current = reader.intervals(compare_bounds(minutes, at), dim, args.city)
    if previous.counts is None and minutes % 60 == 0:
        # the edges' minute buckets have expired; whole hours up to the last one are all
        # rollups, which live far longer: compare those where they are kept, and say so
        hour_end = at.replace(minute=0, second=0, microsecond=0) - timedelta(minutes=1)
        shifted = reader.intervals(compare_bounds(minutes, hour_end), dim, args.city)
        if shifted[0].counts is not None:
            left_out = int((at - hour_end).total_seconds() // 60)
            print(
                f"note: minute counts this old have expired; comparing the whole hours up to "
                f"{hour_end + timedelta(minutes=1):%Y-%m-%d %H:%M} UTC instead, which leaves out "
                f"the {left_out} minute(s) since (end --at on an hh:59 minute to avoid this)",
                file=sys.stderr,
            )
            at = hour_end
            previous, current = shifted
    covered = (current.start, current.end)
    current_counts = current.counts
    if current_counts is None:  # as the plain top list does: read what is kept, widened
        read = reader.read_window(minutes, dim, args.city, at)
        current_counts, covered = read.counts, (read.start, read.end)
    if args.city is not None and not previous.counts and not current_counts:
        # every city over the same two windows, read the same way
        before, latest = reader.intervals(compare_bounds(minutes, at), "city")
        latest_counts = latest.counts
        if latest_counts is None:
            latest_counts = reader.read_window(minutes, "city", None, at).counts
        _note_other_cities(
            args.city,
            summed_counts([before.counts, latest_counts]),
            "in this window or the one before",
        )
    current = Interval(current.start, current.end, keep(current_counts, match))
    previous = Interval(previous.start, previous.end, keep(previous.counts, match))
    rank_by = args.rank
    if rank_by == "rise" and previous.counts is None:
        print(
            "warning: the previous window's counts have expired: ranked by count instead",
            file=sys.stderr,
        )
        rank_by = "count"
    rows = changes(previous, current, args.top, rank_by)
    return {
        "rank": rank_by,
        "covered": covered,
        "total": current.total,
        "previous": {
            "start": utc_z(previous.start),
            "end": utc_z(previous.end),
            "total": previous.total,
        },
        "top": rows,
    }, at


def _where(
    reader: TrendReader,
    args: argparse.Namespace,
    minutes: int,
    at: datetime,
    match: Callable[[str], bool],
) -> dict:
    by = "make" if args.make is not None else "model"
    read = reader.read_cities_of(minutes, match, by, now=at)
    rows, cities = read.rows, read.cities
    cities_read = min(cities, MAX_BREAKDOWN_CITIES)  # as the reader picks them
    if cities > cities_read:
        name = args.make if args.make is not None else args.model
        print(
            f"note: the window has {cities} cities; read the {cities_read} busiest by all their "
            f"posts, so the total and ranks are of those only, and a city left out may post more "
            f"{name!r} than one listed",
            file=sys.stderr,
        )
    return {
        "total": sum(r.count for r in rows),
        "cities": len(rows),
        "cities_read": cities_read,
        "cities_in_window": cities,
        "top": rows[: args.top],
        "covered": (read.start, read.end),
    }


if __name__ == "__main__":  # the same entry as `python -m worker trends`
    from worker.__main__ import main as worker_main

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(worker_main(["trends", *sys.argv[1:]]))
