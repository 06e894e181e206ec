"""`python -m worker trends`: print the live top makes/models (or cities) from Redis.

Connects exactly as `python -m worker run` does (same CARSTREAM_* settings, `--redis-url`
overrides); reads through `TrendReader`, so what it prints is what dashboards get.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from training.cli_errors import fail, first_validation_error, utf8_problem
from training.cli_help import DefaultsHelpFormatter
from worker.connections import redacted
from worker.schemas import EARLIEST_POSTED_AT, LATEST_POSTED_AT, in_event_time_range
from worker.trends import (
    MAX_BREAKDOWN_CITIES,
    MODEL_SEPARATOR,
    Change,
    Dimension,
    Interval,
    TrendReader,
    changes,
    compare_bounds,
    keep,
    kept_after,
    name_matcher,
    normalize_city,
    rank,
    series_bounds,
    series_names,
)

logger = logging.getLogger(__name__)

_WINDOW = re.compile(r"^\s*(\d+)\s*([mhd])\s*$", re.IGNORECASE)
_UNIT_MINUTES = {"m": 1, "h": 60, "d": 1440}
MAX_WINDOW_MINUTES = 366 * 1440
BY_CHOICES = ("make", "model", "city", "low-confidence")
_DIMENSION = {"make": "make", "model": "model", "city": "city", "low-confidence": "lowconf"}


def parse_window(text: str, flag: str = "--window") -> int:
    """Minutes in a window (or a series' interval) written as 15m, 2h or 1d."""
    match = _WINDOW.match(text)
    if not match:
        raise ValueError(f"{flag} {text!r}: expected a number with m, h or d (15m, 2h, 1d)")
    minutes = int(match.group(1)) * _UNIT_MINUTES[match.group(2).lower()]
    if not 1 <= minutes <= MAX_WINDOW_MINUTES:
        raise ValueError(f"{flag} {text!r}: must be between 1m and 366d")
    return minutes


def parse_at(text: str) -> datetime:
    """An RFC 3339 timestamp with a timezone (Z allowed), in the years events may carry."""
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"--at {text!r}: not an RFC 3339 timestamp") from None
    if at.tzinfo is None:
        raise ValueError(f"--at {text!r}: needs a timezone (e.g. Z)")
    if not in_event_time_range(at):
        raise ValueError(
            f"--at {text!r}: must be between {EARLIEST_POSTED_AT:%Y-%m-%d} and "
            f"{LATEST_POSTED_AT:%Y-%m-%d} UTC, the range of event times"
        )
    return at.astimezone(UTC)


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


def _series_complete(intervals: list[dict], minute_ttl_s: int, hour_ttl_s: int) -> bool:
    """Whether no interval of a series is a gap; warns on stderr when some are."""
    gaps = sum(1 for interval in intervals if interval["counts"] is None)
    if not gaps:
        return True
    print(
        f"warning: {gaps} of {_count(len(intervals), 'interval')} are gaps: their buckets have "
        f"expired (the workers keep minute buckets {minute_ttl_s / 3600:g} h and hour rollups "
        f"{hour_ttl_s / 86400:g} d; whole hours and days reach back further than shorter "
        "intervals)",
        file=sys.stderr,
    )
    return False


_FORMULA_LEADS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: object) -> object:
    """A value as a CSV cell a spreadsheet shows and never runs.

    Names come from posts (cities) and labels: a city posted as ``=HYPERLINK(...)`` would run as
    a formula in the analyst's spreadsheet, so text cells that start like one get a leading
    ``'`` (OWASP's advice for CSV injection). Numbers are written as they are.
    """
    if isinstance(value, str) and value.startswith(_FORMULA_LEADS):
        return "'" + value
    return value


def _csv(row: list) -> None:
    csv.writer(sys.stdout, lineterminator="\n").writerow([csv_cell(v) for v in row])


def _blank(value: int | None) -> object:
    return "" if value is None else value


def shown(name: str) -> str:
    """A name as a table prints it: what the terminal would act on (an escape sequence in a
    city written before cities dropped control characters) is shown as its escape instead."""
    if name.isprintable():
        return name
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in name)


def _count(n: int, noun: str, plural: str | None = None) -> str:
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def _duration(minutes: int) -> str:
    """15m, 2h, 3d: a window as it would be typed."""
    for unit, size in (("d", 1440), ("h", 60)):
        if minutes % size == 0:
            return f"{minutes // size}{unit}"
    return f"{minutes}m"


def _z(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _scope(args: argparse.Namespace) -> str:
    name = args.make if args.make is not None else args.model
    city = f" in {shown(args.city)}" if args.city else ""
    return (f" for {shown(name)}" if name is not None else "") + city


def _minute(stamp: str) -> str:
    return stamp[:16].replace("T", " ")


def _share(count: int, total: int) -> str:
    return f"{100 * count / total:.1f}%" if total else "-"


def _change(change: Change) -> str:
    if change.previous is None:
        return "(previous: expired)"
    if change.previous == 0:
        return f"(previous 0, +{change.count}, new)"
    pct = 100 * (change.count - change.previous) / change.previous
    return f"(previous {change.previous}, {change.change:+d}, {pct:+.1f}%)"


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


def name_problem(args: argparse.Namespace) -> str | None:
    """Why a --make/--model filter cannot apply, in one line, or None."""
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
    by_city_of_a_name = args.by == "city" and (args.make or args.model) is not None
    if by_city_of_a_name and (args.every is not None or args.compare):
        return "--by city with --make/--model ranks one window: not with --every or --compare"
    return None


def main(args: argparse.Namespace) -> int:
    """CLI edge: parse, read through TrendReader, print a table or JSON."""
    try:
        minutes = parse_window(args.window)
        at = parse_at(args.at) if args.at else datetime.now(UTC)
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
    where = args.by == "city" and (args.make or args.model) is not None

    import redis
    from pydantic import ValidationError

    from worker.connections import redis_client
    from worker.settings import WorkerSettings

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
    try:
        client = redis_client(settings)  # refuses a bad option of the URL before any I/O
    except ValueError as exc:
        return fail(str(exc))
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
            counts = keep(reader.window(minutes, dim, args.city, at), match)
            result = {"total": sum(counts.values()), "top": rank(counts, args.top)}
    except redis.RedisError as exc:
        print(f"error: Redis at {redacted(settings.redis_url)}: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()

    wall_now = datetime.now(UTC)
    if bounds is not None:
        complete = _series_complete(result["intervals"], minute_ttl_s, hour_ttl_s)
    else:
        first_minute = at.replace(second=0, microsecond=0) - timedelta(minutes=minutes - 1)
        complete = _window_complete(first_minute, wall_now, hour_ttl_s)
    head = {"window_minutes": minutes, "by": args.by, "city": args.city, "at": _z(at)}
    head["complete"] = complete
    if args.make is not None or args.model is not None:
        head["make"], head["model"] = args.make, args.model
    if where:
        _print_where(args, head, result)
    elif bounds is not None:
        _print_series(args, head, result)
    elif args.compare:
        _print_compare(args, head, result)
    else:
        _print_top(args, head, result)
    return 0


def _series(
    reader: TrendReader,
    args: argparse.Namespace,
    every: int,
    bounds: list[tuple[datetime, datetime]],
    dim: Dimension,
    match: Callable[[str], bool],
) -> dict:
    intervals = [
        Interval(i.start, i.end, keep(i.counts, match))
        for i in reader.intervals(bounds, dim, args.city)
    ]
    names = series_names(intervals, args.top)
    return {
        "every_minutes": every,
        "names": names,
        "intervals": [
            {
                "start": _z(i.start),
                "end": _z(i.end),
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
            print(
                f"note: minute counts this old have expired; comparing the whole hours up to "
                f"{hour_end + timedelta(minutes=1):%Y-%m-%d %H:%M} UTC instead",
                file=sys.stderr,
            )
            at = hour_end
            previous, current = shifted
    current_counts = current.counts
    if current_counts is None:  # as the plain top list does: read what is kept, widened
        current_counts = reader.window(minutes, dim, args.city, at)
    current = Interval(current.start, current.end, keep(current_counts, match))
    previous = Interval(previous.start, previous.end, keep(previous.counts, match))
    rows = changes(previous, current, args.top)
    return {
        "total": current.total,
        "previous": {"start": _z(previous.start), "end": _z(previous.end), "total": previous.total},
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
    rows, cities = reader.cities_of(minutes, match, by, now=at)
    if cities > MAX_BREAKDOWN_CITIES:
        print(
            f"note: the window has {cities} cities; read the {MAX_BREAKDOWN_CITIES} busiest",
            file=sys.stderr,
        )
    return {"total": sum(r.count for r in rows), "cities": len(rows), "top": rows[: args.top]}


def _print_where(args: argparse.Namespace, head: dict, result: dict) -> None:
    rows = result["top"]
    if args.json:
        top = [{"name": r.city, "count": r.count, "city_total": r.city_total} for r in rows]
        payload = {**head, "total": result["total"], "cities": result["cities"], "top": top}
        print(json.dumps(payload, ensure_ascii=False))
        return
    if args.csv:
        _csv(["rank", "city", "count", "city_total"])
        for place, r in enumerate(rows, 1):
            _csv([place, r.city, r.count, r.city_total])
        return
    name = args.make if args.make is not None else args.model
    print(
        f"cities posting {shown(name)} over the last {_duration(head['window_minutes'])} (up to "
        f"{_minute(head['at'])} UTC): {_count(result['total'], 'post')} in "
        f"{_count(result['cities'], 'city', 'cities')}"
    )
    if not rows:
        print("  (no posts counted)")
    width = max((len(shown(r.city)) for r in rows), default=0)
    for place, r in enumerate(rows, 1):
        share = _share(r.count, r.city_total)
        city = shown(r.city)
        print(f"{place:>3}. {city:<{width}}  {r.count:>6}  {share:>6} of its confident posts")


def _print_top(args: argparse.Namespace, head: dict, result: dict) -> None:
    rows, total = result["top"], result["total"]
    if args.json:
        top = [{"name": name, "count": count} for name, count in rows]
        print(json.dumps({**head, "total": total, "top": top}, ensure_ascii=False))
        return
    if args.csv:
        _csv(["rank", "name", "count", "share"])
        for place, (name, count) in enumerate(rows, 1):
            _csv([place, name, count, round(count / total, 6) if total else ""])
        return
    scope = _scope(args)
    print(
        f"top {args.by} over the last {_duration(head['window_minutes'])}{scope} (up to "
        f"{_minute(head['at'])} UTC): {_count(total, 'post')}"
    )
    if not rows:
        print("  (no posts counted)")
    width = max((len(shown(name)) for name, _ in rows), default=0)
    for place, (name, count) in enumerate(rows, 1):
        print(f"{place:>3}. {shown(name):<{width}}  {count:>6}  {_share(count, total):>6}")


def _print_compare(args: argparse.Namespace, head: dict, result: dict) -> None:
    rows, previous = result["top"], result["previous"]
    if args.json:
        top = [
            {"name": r.name, "count": r.count, "previous": r.previous, "change": r.change}
            for r in rows
        ]
        payload = {**head, "total": result["total"], "previous": previous, "top": top}
        print(json.dumps(payload, ensure_ascii=False))
        return
    if args.csv:
        _csv(["rank", "name", "count", "previous", "change"])
        for place, r in enumerate(rows, 1):
            _csv([place, r.name, r.count, _blank(r.previous), _blank(r.change)])
        return
    scope = _scope(args)
    window = _duration(head["window_minutes"])
    before = "expired" if previous["total"] is None else _count(previous["total"], "post")
    print(
        f"top {args.by} over the last {window}{scope} (up to {_minute(head['at'])} UTC): "
        f"{_count(result['total'], 'post')}; the {window} before: {before}"
    )
    if not rows:
        print("  (no posts counted)")
    width = max((len(shown(r.name)) for r in rows), default=0)
    for place, r in enumerate(rows, 1):
        print(f"{place:>3}. {shown(r.name):<{width}}  {r.count:>6}  {_change(r)}")


def _print_series(args: argparse.Namespace, head: dict, result: dict) -> None:
    names, intervals = result["names"], result["intervals"]
    if args.json:
        print(json.dumps({**head, **result}, ensure_ascii=False))
        return
    if args.csv:
        _csv(["start", "end", "total", *names])
        for i in intervals:
            counts = [_blank(None if i["counts"] is None else i["counts"][n]) for n in names]
            _csv([i["start"], i["end"], _blank(i["total"]), *counts])
        return
    scope = _scope(args)
    print(
        f"{args.by} per {_duration(result['every_minutes'])}{scope}: "
        f"{_count(len(intervals), 'interval')} on the clock, the last up to "
        f"{_minute(head['at'])} UTC; the top {_count(len(names), 'name')} of them"
        if names
        else f"{args.by} per {_duration(result['every_minutes'])}{scope}: no posts counted in "
        f"{_count(len(intervals), 'interval')} up to {_minute(head['at'])} UTC"
    )
    widths = [max(len(shown(name)), 6) for name in names]
    header = "  ".join(f"{shown(name):>{w}}" for name, w in zip(names, widths, strict=True))
    print(f"{'start (UTC)':<16}  {'total':>6}  {header}".rstrip())
    for interval in intervals:
        start = _minute(interval["start"])
        if interval["counts"] is None:
            print(f"{start:<16}  {'expired':>6}")
            continue
        cells = "  ".join(
            f"{interval['counts'][name]:>{w}}" for name, w in zip(names, widths, strict=True)
        )
        print(f"{start:<16}  {interval['total']:>6}  {cells}".rstrip())


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main(get_args_parser().parse_args()))
