"""A/B worker settings at saturation, round robin, with the worker's CPU time split by thread.

Each ``--config NAME:VAR=VALUE,...`` sets environment variables of the worker (any
CARSTREAM_* setting; ``CMD=peer`` to run benchmarks/peer_consumer.py instead; or ``SRC=DIR``
to run the worker of another checkout, such as ``git worktree add /tmp/main main``; with
``--sim-engine`` every config runs on benchmarks/sim_engine.py's stand-in for a GPU); each
runs ``--reps`` times in turn, so drift on a shared machine hits all of them alike. The
engine's model-only throughput is measured before each round and after the last, and each run's
ratio to it uses the two measurements either side of its round (a paired ratio: on a VM whose
speed drifts by 10-20% within minutes, one figure before and one after a 20-minute A/B made the
"vs model-only" column a matter of when they fell); ``--baseline NAME`` adds each config's
ratio to that config's run in the same round, paired the same way. CPU time per post is read from
/proc/<pid>/task/*/stat between the first and the last result and split by the kernel thread
names worker.thread_names gives: main (the loop, and inference thread 0), the inference
runtime's pool (with the overlapped loop's inference thread), decode, the overlapped loop's
delivery thread, Kafka I/O. Linux only (it reads /proc). Over the same window the worker's
own metrics endpoint gives the engine's side: the share of the wall time its engine instances
spent in ``engine.infer`` ("engine busy") and the images/s they ran while in it, so a gap to
model-only splits into an engine left waiting and an engine running slower than alone.

    python benchmarks/worker_ab.py --config base: --config one-decode:CARSTREAM_DECODE_THREADS=1
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from kafka import KafkaConsumer, TopicPartition

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).parent))

import e2e_throughput as e2e  # noqa: E402
from bench_args import (  # noqa: E402
    make_parser,
    non_negative_float,
    positive_int,
)
from model_throughput import make_bundle  # noqa: E402
from report import (  # noqa: E402
    cpu_model,
    format_versions,
    gpu_name,
    package_versions,
    write_results,
)

from worker.stack import LocalStack, free_port  # noqa: E402

GROUPS = ("main", "inference pool", "decode", "delivery", "kafka", "other")
COMMANDS = ("worker", "peer")  # what CMD= may name


def parse_config(text: str) -> tuple[str, dict[str, str]]:
    """``name:VAR=VALUE,VAR=VALUE`` -> (name, env); ``name:`` is the defaults."""
    name, sep, rest = text.partition(":")
    if not name or not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME:VAR=VALUE,... (or NAME:)")
    env = {}
    for item in filter(None, rest.split(",")):
        var, eq, value = item.partition("=")
        if not var or not eq:
            raise argparse.ArgumentTypeError(f"{text!r}: {item!r} is not VAR=VALUE")
        env[var] = value
    if env.get("CMD", "worker") not in COMMANDS:
        raise argparse.ArgumentTypeError(
            f"{text!r}: CMD must be one of {', '.join(COMMANDS)}, not {env['CMD']!r}"
        )
    return name, env


def get_args_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--config", type=parse_config, action="append", help="NAME:VAR=VALUE,... (repeatable)"
    )
    parser.add_argument("--reps", type=positive_int, default=3, help="runs of each config")
    parser.add_argument("--posts", type=positive_int, default=320, help="posts per run")
    parser.add_argument(
        "--model-only-seconds",
        type=non_negative_float,
        default=5.0,
        help="length of each model-only measurement (one before each round, one after the last)",
    )
    parser.add_argument(
        "--baseline", metavar="NAME", help="a config to give every config's paired ratio to"
    )
    e2e.add_worker_args(parser)  # a config's CARSTREAM_* variables override these
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    return parser


def child_pids(pid: int) -> list[int]:
    """The worker processes under a CARSTREAM_PROCESSES supervisor (none for one worker)."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def thread_cpu(pid: int) -> tuple[dict[str, float], dict[str, int]]:
    """CPU seconds (user + system) of one process and its children so far (a supervisor's
    worker processes), and their live threads, by group.

    The thread counts say which stages a process runs even where one used less than a clock
    tick of CPU (a short run's delivery thread, say)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = dict.fromkeys(GROUPS, 0.0)
    threads = dict.fromkeys(GROUPS, 0)
    for proc in [pid, *child_pids(pid)]:
        try:
            tids = os.listdir(f"/proc/{proc}/task")
        except OSError:  # the child ended
            continue
        for tid in tids:
            try:
                stat = Path(f"/proc/{proc}/task/{tid}/stat").read_text()
                comm = Path(f"/proc/{proc}/task/{tid}/comm").read_text().strip()
            except OSError:  # the thread ended between listdir and read
                continue
            fields = stat.rsplit(")", 1)[1].split()
            seconds = (int(fields[11]) + int(fields[12])) / tick
            group = group_of(int(tid) == proc, comm)
            out[group] += seconds
            threads[group] += 1
    return out, threads


def group_of(is_main: bool, comm: str) -> str:
    if is_main:
        return "main"
    if comm.startswith("decode"):
        return "decode"
    if comm.startswith("kafka"):
        return "kafka"
    if comm.startswith("delivery"):  # the overlapped loop's publish-and-count thread
        return "delivery"
    if comm == "metrics-http":
        return "other"
    return "inference pool"  # unnamed native threads: the inference runtime's own pool


ENGINE_SAMPLES = {
    "carstream_inference_seconds_sum": "infer_s",  # wall seconds in engine calls, all instances
    "carstream_batch_size_sum": "images",  # posts put through the engine
    "carstream_batch_size_count": "batches",  # engine calls
}


def parse_engine_metrics(text: str) -> dict[str, float]:
    """The engine's totals from a worker's Prometheus text exposition (summed over the
    ``process`` label of a CARSTREAM_PROCESSES supervisor's)."""
    out = dict.fromkeys(ENGINE_SAMPLES.values(), 0.0)
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        name = name.split("{", 1)[0]
        if name in ENGINE_SAMPLES:
            out[ENGINE_SAMPLES[name]] += float(value.split()[0])
    return out


def scrape_engine(port: int):
    """A callable that reads the engine's totals from the worker's metrics endpoint."""

    def scrape() -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            return parse_engine_metrics(resp.read().decode())

    return scrape


def engine_split(
    first: dict, last: dict, seconds: float | None, instances: int
) -> dict[str, float]:
    """The engines' busy share of ``seconds``, their images/s while busy and the mean batch
    they got, between scrapes (``seconds`` None: a window from process start, whose length the
    speed does not need)."""
    nan = float("nan")
    infer_s = last["infer_s"] - first["infer_s"]
    images = last["images"] - first["images"]
    batches = last.get("batches", 0.0) - first.get("batches", 0.0)
    mean_batch = images / batches if batches > 0 else nan
    if infer_s <= 0 or (seconds is not None and seconds <= 0):
        return {"engine_busy": nan, "engine_images_per_s": nan, "mean_batch": mean_batch}
    return {
        "engine_busy": nan if seconds is None else infer_s / (seconds * instances),
        "engine_images_per_s": images / infer_s * instances,
        "mean_batch": mean_batch,
    }


def measure(
    bootstrap: str, topic: str, n: int, proc, deadline_s: float, scrape=None, instances: int = 1
) -> dict:
    """Results, and CPU seconds by group between the first result and the last (and, with
    ``scrape``, the engine's busy share and speed over the same window)."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_bytes=64 * 1024 * 1024
    )
    parts = [TopicPartition(topic, p) for p in range(e2e.PARTITIONS)]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    seen: dict[str, dict] = {}
    # CPU from the first result on (start-up and the first batch excluded); when every result
    # arrives in the first poll (a tiny, fast run), from process start instead
    first_cpu, first_count, window = dict.fromkeys(GROUPS, 0.0), 0, "process start"
    no_engine = dict.fromkeys(ENGINE_SAMPLES.values(), 0.0)  # the metrics at process start
    first_engine, first_t = no_engine, None
    deadline = time.monotonic() + deadline_s
    try:
        while len(seen) < n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(seen)}/{n} results within {deadline_s:.0f}s")
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited with {proc.returncode}")
            for batch in consumer.poll(timeout_ms=200).values():
                for rec in batch:
                    value = json.loads(rec.value)
                    seen.setdefault(value["post_id"], value)
            if seen and window == "process start" and len(seen) < n:
                first_cpu, first_count, window = thread_cpu(proc.pid)[0], len(seen), "first result"
                first_engine, first_t = (scrape() if scrape else no_engine), time.monotonic()
        last_cpu, threads = thread_cpu(proc.pid)
        last_engine, last_t = (scrape() if scrape else None), time.monotonic()
    finally:
        consumer.close()
    missed = [g for g in GROUPS if last_cpu[g] > 0 and last_cpu[g] == first_cpu[g]]
    if window == "first result" and missed:
        # a group that worked but not inside the window: the run (a tiny, fast one) was over
        # before its first result was read, so the window saw none of that work
        first_cpu, first_count, window = dict.fromkeys(GROUPS, 0.0), 0, "process start"
        first_engine, first_t = no_engine, None
    engine = {
        "engine_busy": float("nan"),
        "engine_images_per_s": float("nan"),
        "mean_batch": float("nan"),
    }
    if last_engine is not None:  # None: the peer, which has no metrics endpoint
        seconds = None if first_t is None else last_t - first_t  # None: from process start
        engine = engine_split(first_engine, last_engine, seconds, instances)
    done = len(seen) - first_count
    return {
        "results": list(seen.values()),
        "cpu_window": window,
        **engine,
        "threads": threads,
        "cpu_ms_per_post": {
            g: 1000 * (last_cpu[g] - first_cpu[g]) / done if done else float("nan") for g in GROUPS
        },
    }


def run_config(name, env, stack, bundle, args, posts, work) -> dict:
    run = e2e.Run(stack.bootstrap)
    e2e.produce(stack.bootstrap, run.input, posts)
    worker, peer = e2e.commands(args)
    is_peer = env.get("CMD") == "peer"
    cmd, max_batch = (peer, 1) if is_peer else (worker, args.max_batch)
    full_env = {**e2e.env_for(run, stack, bundle, args, max_batch), **env}
    src = Path(env.get("SRC", e2e.REPO))  # another checkout's worker, e.g. a worktree of main
    full_env["PYTHONPATH"] = e2e.pythonpath(src)
    scrape = None
    if not is_peer:  # the peer has no metrics endpoint
        full_env.setdefault("CARSTREAM_METRICS_HOST", "127.0.0.1")
        if full_env["CARSTREAM_METRICS_PORT"] == "0":
            full_env["CARSTREAM_METRICS_PORT"] = str(free_port())
        scrape = scrape_engine(int(full_env["CARSTREAM_METRICS_PORT"]))
    instances = int(full_env["CARSTREAM_ENGINE_INSTANCES"]) * int(
        full_env.get("CARSTREAM_PROCESSES", "1")
    )
    servers = 1 if is_peer else instances  # the peer runs one engine, one post at a time
    proc = e2e.start(cmd, full_env, work / f"{run.group}.log", cwd=src)
    try:
        got = measure(stack.bootstrap, run.output, len(posts), proc, 900, scrape, instances)
    finally:
        e2e.stop(proc)
    rate = e2e.throughput(got["results"], servers)
    cpu = got["cpu_ms_per_post"]
    print(
        f"  {name}: {rate:.2f} posts/s; engine busy {got['engine_busy']:.2f} at "
        f"{got['engine_images_per_s']:.1f} images/s; CPU ms/post "
        + ", ".join(f"{g} {cpu[g]:.1f}" for g in GROUPS),
        flush=True,
    )
    return {
        "posts_per_s": rate,
        "engine_busy": got["engine_busy"],
        "engine_images_per_s": got["engine_images_per_s"],
        "mean_batch": got["mean_batch"],
        "cpu_ms_per_post": cpu,
        "cpu_window": got["cpu_window"],
        "threads": got["threads"],
    }


def bracketed_ratios(rates: list[float], references: list[float]) -> list[float]:
    """Run i's rate over the mean of the model-only measurements before and after its round."""
    if len(references) != len(rates) + 1:
        raise ValueError(f"{len(rates)} runs need {len(rates) + 1} references: {len(references)}")
    return [rate / ((references[i] + references[i + 1]) / 2) for i, rate in enumerate(rates)]


def paired_ratios(rates: list[float], baseline: list[float]) -> list[float]:
    """Run i's rate over the baseline config's run in the same round."""
    if len(rates) != len(baseline):
        raise ValueError(f"{len(rates)} runs against {len(baseline)} baseline runs")
    return [rate / base for rate, base in zip(rates, baseline, strict=True)]


def median_or_nan(values) -> float:
    """The median of the measured values (NaN: not measured in that run), NaN if none was."""
    got = [v for v in values if v == v]
    return statistics.median(got) if got else float("nan")


def summarise(
    name: str,
    env: dict,
    runs: list[dict],
    references: list[float],
    baseline: list[dict] | None = None,
) -> dict:
    rates = [r["posts_per_s"] for r in runs]
    cpu = {g: statistics.median(r["cpu_ms_per_post"][g] for r in runs) for g in GROUPS}
    ratios = bracketed_ratios(rates, references)
    out = {
        "config": name,
        "env": env,
        "posts_per_s": rates,
        "median_posts_per_s": statistics.median(rates),
        "vs_model_only_each": ratios,
        "vs_model_only": statistics.median(ratios),
        "engine_busy": median_or_nan(r["engine_busy"] for r in runs),
        "engine_images_per_s": median_or_nan(r["engine_images_per_s"] for r in runs),
        "mean_batch": median_or_nan(r.get("mean_batch", float("nan")) for r in runs),
        "cpu_ms_per_post": cpu,
        "cpu_windows": sorted({r["cpu_window"] for r in runs}),
        "threads": {g: max(r["threads"][g] for r in runs) for g in GROUPS},
    }
    if baseline is not None:
        vs_base = paired_ratios(rates, [r["posts_per_s"] for r in baseline])
        out["vs_baseline_each"] = vs_base
        out["vs_baseline"] = statistics.median(vs_base)
    return out


def or_dash(value: float | None, spec: str) -> str:
    return "—" if value is None or value != value else format(value, spec)


def model_only_engine(r: dict) -> str:
    """The model-only row's engine: its name where recorded (runs before 2026-12-06 ran ONNX)."""
    return r.get("model_only_engine") or f"ONNX {r.get('onnx_precision', 'fp32')}"


def render_md(r: dict) -> str:
    lines = [
        f"# Worker A/B at saturation: {r['arch']} @ {r['image_size']}px",
        "",
        f"- command: `{r['command']}`",
        f"- machine: {r['machine']}",
        f"- date: {r['date']}",
        *([f"- versions: {format_versions(r['versions'])}"] if r.get("versions") else []),
        f"- posts: {r['posts']} per run, photo-like JPEGs "
        + " and ".join(f"{w}x{h}" for w, h in r["image_sizes"])
        + ", base64 in JSON; "
        f"local Tansu + redis-server; {r['reps']} runs per config, round robin",
        f"- model-only (engine.infer, {model_only_engine(r)}, "
        f"batch {r['max_batch']}, "
        f"{r.get('engine_instances', 1)} instance(s) at once, threads "
        f"{r.get('ort_threads', '?')} each, {r['model_only_seconds']:g} s per measurement), "
        "before each round and after the last: "
        + " / ".join(f"{x:.2f}" for x in r["model_only"])
        + ' images/s; "vs model-only" is the median of each run\'s ratio to the mean of the '
        "two measurements either side of its round"
        + (
            f"; \"vs {r['baseline']}\" the median of each run's ratio to {r['baseline']}'s run "
            "in the same round"
            if r.get("baseline")
            else ""
        ),
        "- CPU ms/post: median over runs, from /proc per-thread times between the first and the "
        "last result (from process start where a run was over before its first result was read: "
        + (
            ", ".join(c["config"] for c in r["configs"] if "process start" in c["cpu_windows"])
            or "none"
        )
        + "); main = the loop and inference thread 0",
        "- engine busy: the share of that window's wall time the worker's engine instances spent "
        "in engine calls (its `carstream_inference_seconds` metric, over instances); engine "
        "images/s while busy: the posts they ran over that time (compare with model-only: "
        "a worker's rate is about busy x that speed); mean batch: posts per engine call "
        "over that window (the `carstream_batch_size` histogram)",
        "",
        "| config | settings | posts/s (each run) | median | vs model-only | "
        + (f"vs {r['baseline']} | " if r.get("baseline") else "")
        + "engine busy | engine images/s while busy | mean batch | "
        + " | ".join(f"CPU {g}" for g in GROUPS)
        + " | CPU total |",
        "| --- | --- | --- | ---: | ---: | "
        + ("---: | " if r.get("baseline") else "")
        + "---: | ---: | ---: | "
        + " | ".join("---:" for _ in GROUPS)
        + " | ---: |",
    ]
    for c in r["configs"]:
        settings = ", ".join(f"{k}={v}" for k, v in c["env"].items()) or "defaults"
        cpu = c["cpu_ms_per_post"]
        lines.append(
            f"| {c['config']} | {settings} | "
            + " / ".join(f"{x:.1f}" for x in c["posts_per_s"])
            + f" | {c['median_posts_per_s']:.2f} | {c['vs_model_only']:.2f} | "
            + (f"{c['vs_baseline']:.2f} | " if r.get("baseline") else "")
            + f"{or_dash(c.get('engine_busy'), '.2f')} | "
            + f"{or_dash(c.get('engine_images_per_s'), '.1f')} | "
            + f"{or_dash(c.get('mean_batch'), '.1f')} | "
            + " | ".join(f"{cpu[g]:.1f}" for g in GROUPS)
            + f" | {sum(cpu.values()):.1f} |"
        )
    lines.append("")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    configs = args.config or [("defaults", {})]
    names = [name for name, _ in configs]
    if len(set(names)) != len(names):
        print(f"worker_ab.py: error: config names repeat: {', '.join(names)}", file=sys.stderr)
        return 2
    if args.baseline is not None and args.baseline not in names:
        print(
            f"worker_ab.py: error: --baseline {args.baseline!r} names no config "
            f"(configs: {', '.join(names)})",
            file=sys.stderr,
        )
        return 2
    max_batch = max(
        [args.max_batch] + [int(env.get("CARSTREAM_MAX_BATCH", 0)) for _, env in configs]
    )
    sizes = e2e.image_sizes(args)
    jpegs = [base64.b64encode(j).decode() for j in e2e.photo_jpegs(12, sizes=sizes)]
    # checked before the posts exist: this process holds them too (one more copy)
    sample = [len(e2e.event(f"s{i}", j)) for i, j in enumerate(jpegs)]
    payload = sum(sample[i % len(sample)] for i in range(args.posts))
    problem = e2e.broker_memory_problem(
        args.reps * len(configs) + 1, payload, e2e.available_memory_bytes()
    )
    if problem:
        print(f"worker_ab.py: error: {problem}", file=sys.stderr)
        return 2
    posts = [e2e.event(f"s{i}", jpegs[i % len(jpegs)]) for i in range(args.posts)]
    with tempfile.TemporaryDirectory(prefix="worker-ab-") as tmp:
        work = Path(tmp)
        stack = LocalStack(work / "stack", kafka_port=free_port(), redis_port=free_port())
        stack.up(topics=(), partitions=e2e.PARTITIONS)
        try:
            args.no_int8 = args.onnx_precision != "int8"
            bundle = make_bundle(args, work, max_batch)
            references: list[float] = []
            runs: dict[str, list[dict]] = {name: [] for name, _ in configs}
            for rnd in range(args.reps + 1):
                only = e2e.model_only(
                    bundle, args, args.max_batch, min_seconds=args.model_only_seconds
                )
                ref, engine_name = only["images_per_s"], only["engine"]
                references.append(ref)
                print(f"model only: {ref:.2f} images/s", flush=True)
                if rnd == args.reps:
                    break
                for name, env in configs:
                    runs[name].append(run_config(name, env, stack, bundle, args, posts, work))
        finally:
            stack.down()
    baseline = runs[args.baseline] if args.baseline is not None else None
    result = {
        "command": "python benchmarks/worker_ab.py " + " ".join(sys.argv[1:]),
        "machine": f"{cpu_model()} ({os.cpu_count()} cores), GPU: {gpu_name()}",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "versions": package_versions(
            "torch", "onnxruntime", "numpy", "pillow", "kafka-python", "redis"
        ),
        "arch": args.arch,
        "image_size": args.image_size,
        "posts": args.posts,
        "image_sizes": e2e.image_sizes(args),
        "reps": args.reps,
        "max_batch": args.max_batch,
        "engine_instances": args.engine_instances,
        "onnx_precision": args.onnx_precision,
        "backend": args.backend,
        "model_only_engine": engine_name,
        "ort_threads": args.threads,
        "model_only_seconds": args.model_only_seconds,
        "model_only": references,
        "model_only_before": references[0],
        "model_only_after": references[-1],
        "baseline": args.baseline,
        "configs": [
            summarise(name, env, runs[name], references, baseline) for name, env in configs
        ],
    }
    write_results(args.out_dir, "worker_ab", result, render_md(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
