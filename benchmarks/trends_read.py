"""Trend reads: what a dashboard's queries cost a real redis-server, per query shape.

Fills a fresh redis-server (started here on a free loopback port) with the bucket keys that a
steady post rate leaves behind: minute buckets for the minute TTL (48 h), hour rollups for
``--days``, overall and per city, makes and models drawn from Zipf laws (a few brands take most
posts, as on social media). Then times each reader query the trends CLI runs: top lists over
60 min to 30 days, series of quarter hours to days, a window-on-window comparison and the
per-city breakdown of one make. Latency is per call (client + Redis, loopback), median and p95
of ``--reps`` calls after one warm-up. Writes benchmarks/results/trends_read.{json,md}.

    python benchmarks/trends_read.py
    python benchmarks/trends_read.py --posts-per-minute 1000 --cities 200 --reps 50
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import redis

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).parent))

from report import cpu_model, write_results  # noqa: E402

from training.cli import positive_int  # noqa: E402
from training.cli_help import DefaultsHelpFormatter  # noqa: E402
from worker.stack import RedisServer, free_port  # noqa: E402
from worker.trend_keys import (  # noqa: E402
    DEFAULT_MINUTE_TTL_S,
    hour_bucket,
    minute_bucket,
    trend_key,
)
from worker.trend_windows import compare_bounds, name_matcher  # noqa: E402
from worker.trends import TrendReader  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=DefaultsHelpFormatter
    )
    parser.add_argument(
        "--posts-per-minute", type=positive_int, default=100, help="steady classified post rate"
    )
    parser.add_argument("--makes", type=positive_int, default=40, help="makes posted")
    parser.add_argument("--models", type=positive_int, default=400, help="models posted")
    parser.add_argument("--cities", type=positive_int, default=50, help="cities posted from")
    parser.add_argument(
        "--days", type=positive_int, default=30, help="days of hour rollups (the hour TTL)"
    )
    parser.add_argument(
        "--minute-hours",
        type=positive_int,
        default=DEFAULT_MINUTE_TTL_S // 3600,
        help="hours of minute buckets (the minute TTL)",
    )
    parser.add_argument("--reps", type=positive_int, default=20, help="timed calls per query")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the post mix")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    return parser


def zipf(n: int, s: float = 1.1) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1) ** s
    return weights / weights.sum()


def post_mix(args: argparse.Namespace, rng: np.random.Generator) -> tuple[list, list, np.ndarray]:
    """Model members ("Make|Model"), city names (None: no city) and the probability of each
    (city, model) cell: a third of posts carry no city."""
    makes = [f"Make{i:02d}" for i in range(args.makes)]
    owner = rng.choice(args.makes, size=args.models, p=zipf(args.makes))
    owner[: args.makes] = np.arange(args.makes)[: args.models]  # every make has a model
    models = [f"{makes[m]}|Model{i:03d}" for i, m in enumerate(owner)]
    cities = [None, *(f"city{i:03d}" for i in range(args.cities))]
    p_city = np.concatenate([[1 / 3], zipf(args.cities) * 2 / 3])
    p = np.outer(p_city, zipf(args.models)[rng.permutation(args.models)])
    return models, cities, p / p.sum()


def fill(client: redis.Redis, args: argparse.Namespace, now: dt.datetime) -> dict:
    """Write every bucket key the rate leaves behind; returns how many keys and posts."""
    rng = np.random.default_rng(args.seed)
    models, cities, p = post_mix(args, rng)
    makes = [m.split("|", 1)[0] for m in models]
    flat = p.ravel()
    end_minute = now.replace(second=0, microsecond=0)
    buckets = [
        ("h", end_minute.replace(minute=0) - dt.timedelta(hours=h)) for h in range(args.days * 24)
    ]
    buckets += [("m", end_minute - dt.timedelta(minutes=m)) for m in range(args.minute_hours * 60)]
    keys = posts = 0
    pipe = client.pipeline(transaction=False)
    for res, start in buckets:
        n = rng.poisson(args.posts_per_minute * (60 if res == "h" else 1))
        grid = rng.multinomial(n, flat).reshape(p.shape)
        posts += n
        bucket = hour_bucket(start) if res == "h" else minute_bucket(start)
        for ci, city in enumerate(cities):
            row = grid[ci] if city is not None else grid.sum(axis=0)
            if not row.any():
                continue
            by_model = {models[j]: int(c) for j, c in enumerate(row) if c}
            by_make: dict[str, int] = {}
            for j, c in enumerate(row):
                if c:
                    by_make[makes[j]] = by_make.get(makes[j], 0) + int(c)
            pipe.zadd(trend_key("model", res, bucket, city), by_model)
            pipe.zadd(trend_key("make", res, bucket, city), by_make)
            keys += 2
        per_city = {
            city: int(grid[ci].sum()) for ci, city in enumerate(cities) if city and grid[ci].any()
        }
        if per_city:
            pipe.zadd(trend_key("city", res, bucket), per_city)
            keys += 1
        if len(pipe) > 2000:
            pipe.execute()
    pipe.execute()
    share: dict[str, float] = {}
    for make, weight in zip(makes, p.sum(axis=0), strict=True):
        share[make] = share.get(make, 0.0) + float(weight)
    return {"keys": keys, "posts": posts, "top_make": max(share, key=share.get)}


def queries(reader: TrendReader, now: dt.datetime, top_make: str) -> list[tuple[str, Callable]]:
    """(what the CLI runs, the reader call it makes)."""
    of_top_make = name_matcher(make=top_make)
    return [
        ("trends --window 60m", lambda: reader.window(60, "make", now=now)),
        ("trends --window 24h --by model", lambda: reader.window(1440, "model", now=now)),
        ("trends --window 30d", lambda: reader.window(30 * 1440, "make", now=now)),
        ("trends --window 60m --city city000", lambda: reader.window(60, "make", "city000", now)),
        ("trends --window 60m --compare", lambda: reader.intervals(compare_bounds(60, now))),
        ("trends --window 24h --compare", lambda: reader.intervals(compare_bounds(1440, now))),
        ("trends --window 24h --every 15m", lambda: reader.series(1440, 15, now=now)),
        ("trends --window 24h --every 1h", lambda: reader.series(1440, 60, now=now)),
        ("trends --window 30d --every 1d", lambda: reader.series(30 * 1440, 1440, now=now)),
        (
            "trends --window 7d --every 1h --by model",
            lambda: reader.series(7 * 1440, 60, "model", now=now),
        ),
        (
            f"trends --window 60m --by city --make {top_make}",
            lambda: reader.cities_of(60, of_top_make, now=now),
        ),
        (
            f"trends --window 24h --by city --make {top_make}",
            lambda: reader.cities_of(1440, of_top_make, now=now),
        ),
    ]


def timed(call: Callable, reps: int) -> list[float]:
    call()  # warm-up: the connection and the first reply
    out = []
    for _ in range(reps):
        started = time.perf_counter()
        call()
        out.append((time.perf_counter() - started) * 1000)
    return out


def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="trends-bench-") as tmp:
        server = RedisServer(Path(tmp), free_port())
        server.start()
        try:
            client = redis.Redis.from_url(server.url)
            now = dt.datetime.now(dt.UTC)
            started = time.perf_counter()
            filled = fill(client, args, now)
            fill_s = time.perf_counter() - started
            memory = client.info("memory")["used_memory"]
            print(
                f"filled {filled['keys']} keys ({filled['posts']} posts) in {fill_s:.1f} s",
                flush=True,
            )
            reader = TrendReader(client)
            rows = []
            for name, call in queries(reader, now, filled["top_make"]):
                ms = timed(call, args.reps)
                ms.sort()
                row = {
                    "query": name,
                    "median_ms": statistics.median(ms),
                    "p95_ms": ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))],
                }
                rows.append(row)
                print(f"{name:55} {row['median_ms']:8.2f} ms  p95 {row['p95_ms']:8.2f}", flush=True)
            client.close()
        finally:
            server.stop()
    result = {
        "command": " ".join(["python", "benchmarks/trends_read.py", *sys.argv[1:]]),
        "machine": f"{cpu_model()} ({os.cpu_count()} cores)",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "population": {
            "posts_per_minute": args.posts_per_minute,
            "makes": args.makes,
            "models": args.models,
            "cities": args.cities,
            "days": args.days,
            "minute_hours": args.minute_hours,
            **filled,
            "redis_used_memory_bytes": memory,
        },
        "reps": args.reps,
        "rows": rows,
    }
    lines = [
        "# Trend reads (worker.trends.TrendReader against a real redis-server on loopback)",
        "",
        f"- command: `{result['command']}`",
        f"- machine: {result['machine']}",
        f"- date: {result['date']}",
        f"- population: {args.posts_per_minute} classified posts/min, {args.makes} makes, "
        f"{args.models} models, {args.cities} cities (a third of posts without one), Zipf "
        f"mixes; {args.minute_hours} h of minute buckets and {args.days} d of hour rollups: "
        f"{filled['keys']} keys, Redis used_memory {memory / 2**20:.0f} MiB",
        f"- latency per reader call, median and p95 of {args.reps} after one warm-up; the CLI "
        "adds its Python start-up once per command",
        "",
        "| query (the reader call behind it) | median ms | p95 ms |",
        "| --- | ---: | ---: |",
    ]
    lines += [f"| `{r['query']}` | {r['median_ms']:.2f} | {r['p95_ms']:.2f} |" for r in rows]
    write_results(args.out_dir, "trends_read", result, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
