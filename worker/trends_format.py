"""How `python -m worker trends` prints what it read: a table, JSON or CSV.

Pure output: every function takes the parsed arguments and the rows the CLI read, and writes to
stdout. Names come from posts (cities), so tables escape what a terminal would act on and CSV
quotes what a spreadsheet would run.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import unicodedata
from datetime import UTC, datetime, timedelta

from worker.trend_windows import Change

_FORMULA_LEADS = ("=", "+", "-", "@", "\t", "\r")
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f]")  # Unicode's Cc: C0, DEL and C1


def csv_cell(value: object) -> object:
    """A value as a CSV cell a spreadsheet shows and never runs, nor a terminal acts on.

    Names come from posts (cities) and labels: a city posted as ``=HYPERLINK(...)`` would run as
    a formula in the analyst's spreadsheet, so text cells that start like one get a leading
    ``'`` (OWASP's advice for CSV injection). Control characters (C0, DEL, C1: ESC, BEL, ...),
    which a terminal acts on when the CSV is read with ``cat``, are written as their escapes
    (``\\x1b``) as tables write them (:func:`shown`); other characters a table escapes (the
    zero-width joiners of a spelling such as ``tehr\\u200can``) stay, so names round-trip.
    Numbers are written as they are.
    """
    if not isinstance(value, str):
        return value
    value = _CONTROLS.sub(lambda c: c.group().encode("unicode_escape").decode(), value)
    return "'" + value if value.startswith(_FORMULA_LEADS) else value


_DEL_AND_C1 = re.compile("[\x7f-\x9f]")


def json_line(value: object) -> str:
    """``value`` as one JSON line, non-ASCII text kept readable but every control character
    escaped: JSON escapes C0 only, and DEL or a C1 character (U+009B is a terminal's CSI) in a
    name would reach the analyst's terminal raw."""
    text = json.dumps(value, ensure_ascii=False)
    return _DEL_AND_C1.sub(lambda c: f"\\u{ord(c.group()):04x}", text)


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


def columns(text: str) -> int:
    """Terminal columns ``text`` takes, so tables line up: a wide (CJK, full-width) character
    takes two and a combining mark none (``len`` counts code points: ``東京`` is 2 of them in 4
    columns, a decomposed ``é`` 2 in 1)."""
    return sum(
        0
        if unicodedata.combining(c) or unicodedata.category(c) in ("Mn", "Me")
        else 2
        if unicodedata.east_asian_width(c) in ("W", "F")
        else 1
        for c in text
    )


def ljust_columns(text: str, width: int) -> str:
    return text + " " * max(0, width - columns(text))


def rjust_columns(text: str, width: int) -> str:
    return " " * max(0, width - columns(text)) + text


def count_of(n: int, noun: str, plural: str | None = None) -> str:
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def _duration(minutes: int) -> str:
    """15m, 2h, 3d: a window as it would be typed."""
    for unit, size in (("d", 1440), ("h", 60)):
        if minutes % size == 0:
            return f"{minutes // size}{unit}"
    return f"{minutes}m"


def utc_z(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _scope(args: argparse.Namespace, head: dict) -> str:
    """The scope a header names (` for BMW in são paulo`): the name filter as given, the city as
    read (normalised, as ``head["city"]`` has it)."""
    name = args.make if args.make is not None else args.model
    city = f" in {shown(head['city'])}" if head.get("city") else ""
    return (f" for {shown(name)}" if name is not None else "") + city


def _minute(stamp: str) -> str:
    return stamp[:16].replace("T", " ")


def _over(head: dict, result: dict, scope: str = "") -> str:
    """The window a header names: "over the last 60m in lyon (up to 15:30 UTC)"; where expired
    edge minutes widened it to whole hours, the minutes actually counted first."""
    asked = f"the last {_duration(head['window_minutes'])}"
    at = f"up to {_minute(head['at'])} UTC"
    if not result.get("widened"):
        return f"over {asked}{scope} ({at})"
    covered = head["covered"]
    last = datetime.fromisoformat(covered["end"].replace("Z", "+00:00")) - timedelta(minutes=1)
    return (
        f"over {_minute(covered['start'])} to {last:%Y-%m-%d %H:%M} UTC{scope} ({asked} {at}, "
        "widened to whole hours: its edge minutes have expired)"
    )


def _share(count: int, total: int) -> str:
    return f"{100 * count / total:.1f}%" if total else "-"


def _change(change: Change) -> str:
    if change.previous is None:
        return "(previous: expired)"
    if change.previous == 0:
        return f"(previous 0, {change.count:+d}, new)"
    pct = 100 * (change.count - change.previous) / change.previous
    return f"(previous {change.previous}, {change.change:+d}, {pct:+.1f}%)"


def _ranked(rows: list[tuple[str, int, str]]) -> None:
    """A ranked table: place, name (escaped, aligned), count and a note per row."""
    if not rows:
        print("  (no posts counted)")
    names = [shown(name) for name, _, _ in rows]
    width = max((columns(name) for name in names), default=0)
    for place, (name, (_, count, note)) in enumerate(zip(names, rows, strict=True), 1):
        print(f"{place:>3}. {ljust_columns(name, width)}  {count:>6}  {note}")


def print_where(args: argparse.Namespace, head: dict, result: dict) -> None:
    rows = result["top"]
    if args.json:
        top = [{"name": r.city, "count": r.count, "city_total": r.city_total} for r in rows]
        counts = {
            key: result[key] for key in ("total", "cities", "cities_read", "cities_in_window")
        }
        print(json_line({**head, **counts, "top": top}))
        return
    if args.csv:
        _csv(["rank", "city", "count", "city_total"])
        for place, r in enumerate(rows, 1):
            _csv([place, r.city, r.count, r.city_total])
        return
    name = args.make if args.make is not None else args.model
    read, in_window = result["cities_read"], result["cities_in_window"]
    cut = (
        f", of the window's {read} busiest cities (by all their posts) of {in_window}: a city "
        f"left out may post more {shown(name)} than one listed"
        if read < in_window
        else ""
    )
    print(
        f"cities posting {shown(name)} {_over(head, result)}: "
        f"{count_of(result['total'], 'post')} in {count_of(result['cities'], 'city', 'cities')}"
        f"{cut}"
    )
    _ranked(
        [
            (r.city, r.count, f"{_share(r.count, r.city_total):>6} of its confident posts")
            for r in rows
        ]
    )


def print_top(args: argparse.Namespace, head: dict, result: dict) -> None:
    rows, total = result["top"], result["total"]
    if args.json:
        top = [{"name": name, "count": count} for name, count in rows]
        print(json_line({**head, "total": total, "top": top}))
        return
    if args.csv:
        _csv(["rank", "name", "count", "share"])
        for place, (name, count) in enumerate(rows, 1):
            _csv([place, name, count, round(count / total, 6) if total else ""])
        return
    print(f"top {args.by} {_over(head, result, _scope(args, head))}: {count_of(total, 'post')}")
    _ranked([(name, count, f"{_share(count, total):>6}") for name, count in rows])


def print_compare(args: argparse.Namespace, head: dict, result: dict) -> None:
    rows, previous = result["top"], result["previous"]
    if args.json:
        top = [
            {"name": r.name, "count": r.count, "previous": r.previous, "change": r.change}
            for r in rows
        ]
        payload = {**head, "total": result["total"], "previous": previous, "top": top}
        print(json_line(payload))
        return
    if args.csv:
        _csv(["rank", "name", "count", "previous", "change"])
        for place, r in enumerate(rows, 1):
            _csv([place, r.name, r.count, _blank(r.previous), _blank(r.change)])
        return
    window = _duration(head["window_minutes"])
    before = "expired" if previous["total"] is None else count_of(previous["total"], "post")
    print(
        f"{'rising' if head['rank'] == 'rise' else 'top'} {args.by} "
        f"{_over(head, result, _scope(args, head))}: "
        f"{count_of(result['total'], 'post')}; the {window} before: {before}"
    )
    _ranked([(r.name, r.count, _change(r)) for r in rows])


def print_series(args: argparse.Namespace, head: dict, result: dict) -> None:
    names, intervals = result["names"], result["intervals"]
    if args.json:
        print(json_line({**head, **result}))
        return
    if args.csv:
        _csv(["start", "end", "total", *names])
        for i in intervals:
            counts = [_blank(None if i["counts"] is None else i["counts"][n]) for n in names]
            _csv([i["start"], i["end"], _blank(i["total"]), *counts])
        return
    scope = _scope(args, head)
    print(
        f"{args.by} per {_duration(result['every_minutes'])}{scope}: "
        f"{count_of(len(intervals), 'interval')} on the clock, the last up to "
        f"{_minute(head['at'])} UTC; the top {count_of(len(names), 'name')} of them"
        if names
        else f"{args.by} per {_duration(result['every_minutes'])}{scope}: no posts counted in "
        f"{count_of(len(intervals), 'interval')} up to {_minute(head['at'])} UTC"
    )
    widths = [max(columns(shown(name)), 6) for name in names]
    header = "  ".join(rjust_columns(shown(name), w) for name, w in zip(names, widths, strict=True))
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
