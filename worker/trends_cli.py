"""`python -m worker trends`: print the live top makes/models (or cities) from Redis.

Connects exactly as `python -m worker run` does (same CARSTREAM_* settings, `--redis-url`
overrides); reads through `TrendReader`, so what it prints is what dashboards get.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from datetime import UTC, datetime, timedelta

from training.cli_errors import fail, first_validation_error, utf8_problem
from training.cli_help import DefaultsHelpFormatter
from worker.connections import redacted
from worker.schemas import EARLIEST_POSTED_AT, LATEST_POSTED_AT, in_event_time_range
from worker.trends import TrendReader, normalize_city

logger = logging.getLogger(__name__)

_WINDOW = re.compile(r"^\s*(\d+)\s*([mhd])\s*$", re.IGNORECASE)
_UNIT_MINUTES = {"m": 1, "h": 60, "d": 1440}
MAX_WINDOW_MINUTES = 366 * 1440
BY_CHOICES = ("make", "model", "city", "low-confidence")


def parse_window(text: str) -> int:
    """Minutes in a window written as 15m, 2h or 1d."""
    match = _WINDOW.match(text)
    if not match:
        raise ValueError(f"--window {text!r}: expected a number with m, h or d (15m, 2h, 1d)")
    minutes = int(match.group(1)) * _UNIT_MINUTES[match.group(2).lower()]
    if not 1 <= minutes <= MAX_WINDOW_MINUTES:
        raise ValueError(f"--window {text!r}: must be between 1m and 366d")
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


def expired_before(wall_now: datetime, hour_ttl_s: int) -> datetime:
    """Start of the oldest hour rollup still alive: counts of event times before it are gone.

    An hour rollup expires ``hour_ttl_s`` after the end of its hour (``_expire_at``), so the
    hour starting at ``s`` lives while ``s + 1 h + ttl > wall_now``.
    """
    oldest = wall_now.astimezone(UTC) - timedelta(seconds=hour_ttl_s, hours=1)
    return oldest.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)


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
    parser.add_argument("--top", type=int, default=10, help="how many to print")
    parser.add_argument("--at", default=None, help="end of the window, RFC 3339 (default: now)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--redis-url", default=None, help="Redis URL (default: the worker's CARSTREAM_REDIS_URL)"
    )
    return parser


def main(args: argparse.Namespace) -> int:
    """CLI edge: parse, read through TrendReader, print a table or JSON."""
    try:
        minutes = parse_window(args.window)
        at = parse_at(args.at) if args.at else datetime.now(UTC)
    except ValueError as exc:
        return fail(str(exc))
    if args.top < 1:
        return fail(f"--top {args.top}: must be at least 1")
    if args.city is not None and args.by == "city":
        return fail("--city cannot be combined with --by city")
    if args.city is not None and normalize_city(args.city) is None:
        return fail(f"--city {args.city!r}: blank (leave --city out to count every city)")
    if args.city is not None and utf8_problem(args.city) is not None:
        return fail(f"--city {args.city!r}: not valid UTF-8")

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
    try:
        minute_ttl_s, hour_ttl_s = reader.ttls()
        # read once: the queries below would read (and warn about a malformed one) again
        reader = TrendReader(client, minute_ttl_s, hour_ttl_s)
        horizon = expired_before(datetime.now(UTC), hour_ttl_s)
        window_start = at - timedelta(minutes=minutes - 1)
        complete = window_start.replace(minute=0, second=0, microsecond=0) >= horizon
        if not complete:
            print(
                f"warning: counts before {horizon:%Y-%m-%d %H:%M} UTC have expired (the workers "
                f"keep hour rollups {hour_ttl_s} s = {hour_ttl_s / 86400:g} d, "
                "CARSTREAM_TREND_HOUR_TTL_S): this window undercounts",
                file=sys.stderr,
            )
        if args.by == "city":
            rows = reader.cities(minutes, top=args.top, now=at)
        elif args.by == "low-confidence":
            rows = reader.low_confidence(minutes, city=args.city, now=at)[: args.top]
        else:
            rows = reader.top(minutes, by=args.by, city=args.city, top=args.top, now=at)
    except redis.RedisError as exc:
        print(f"error: Redis at {redacted(settings.redis_url)}: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()

    if args.json:
        payload = {
            "window_minutes": minutes,
            "by": args.by,
            "city": args.city,
            "at": at.isoformat().replace("+00:00", "Z"),
            "complete": complete,
            "top": [{"name": name, "count": count} for name, count in rows],
        }
        print(json.dumps(payload, ensure_ascii=False))
    else:
        scope = f" in {args.city}" if args.city else ""
        print(f"top {args.by} over the last {args.window}{scope} (up to {at:%Y-%m-%d %H:%M} UTC)")
        if not rows:
            print("  (no posts counted)")
        width = max((len(name) for name, _ in rows), default=0)
        for rank, (name, count) in enumerate(rows, 1):
            print(f"{rank:>3}. {name:<{width}}  {count}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main(get_args_parser().parse_args()))
