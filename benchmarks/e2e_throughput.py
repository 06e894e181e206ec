"""End-to-end throughput and latency of the worker on the local stack, against its peers.

On a real Tansu broker and redis-server (started here on free loopback ports), with a real
ResNet bundle (random weights: speed does not depend on them) and photo-like JPEG posts of
social-media sizes (1080x1080, 1280x960), it measures:

- model-only throughput of the same engine at the worker's batch size (the ceiling);
- saturation throughput of `python -m worker run` (posts produced ahead, drained);
- the same worker with batching off (max_batch 1);
- the per-message peer (benchmarks/peer_consumer.py);
- latency p50/p95/p99 (posted_at -> classified_at) at fixed offered loads, as fractions of the
  worker's saturation: the median of ``--saturation-reps`` batched runs of this invocation
  (unpaired, so one slow or fast moment moves every load; one run by default), or
  ``--load-base`` posts/s given (say a paired worker_ab.py median).

Throughput is counted between batch completions a whole number of engine instances apart,
after every instance's first batch (``throughput``). The paced producer sends pre-serialised
posts whose ``posted_at`` is the post's scheduled send time (start + i / rate), not the moment
it was sent, so a producer that falls behind shows as latency instead of hiding it; each load
records the offered rate it achieved and its largest send lag, and a load whose producer
achieved under 95% of its target is flagged in the table.

Writes benchmarks/results/e2e_throughput.{json,md}.

    python benchmarks/e2e_throughput.py                     # resnet50 @ 224, 240 posts
    python benchmarks/e2e_throughput.py --arch resnet18 --posts 100 --load-seconds 10
    python benchmarks/e2e_throughput.py --backend torch-cuda --gpu-decode --posts 4000   # GPU
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).parent))

from bench_args import (  # noqa: E402
    make_parser,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_float_list,
    positive_int,
)
from model_throughput import WARMUP_CALLS, make_bundle, time_engines  # noqa: E402
from report import cpu_model, write_results  # noqa: E402

from engine_build.bundle import load_bundle  # noqa: E402
from engine_build.runtime import create_engine  # noqa: E402
from worker.run import precision_option  # noqa: E402
from worker.stack import LocalStack, create_topics, free_port  # noqa: E402

PARTITIONS = 4


def get_args_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--posts", type=positive_int, default=240, help="posts per saturation run")
    parser.add_argument(
        "--peer-posts",
        type=positive_int,
        default=None,
        help="posts of the per-message peer's saturation run (default: --posts); the peer is "
        "the slowest run, so a time-boxed session gives it fewer",
    )
    parser.add_argument(
        "--model-only-seconds",
        type=non_negative_float,
        default=5.0,
        help="length of each model-only measurement (3 calls were too few on a noisy VM)",
    )
    add_worker_args(parser)
    parser.add_argument(
        "--saturation-reps",
        type=positive_int,
        default=1,
        help="batched-worker saturation runs; the loads are fractions of their median",
    )
    parser.add_argument(
        "--load-base",
        type=positive_float,
        default=None,
        metavar="POSTS_PER_S",
        help="take the loads as fractions of this rate instead of this run's saturation "
        "(e.g. a paired worker_ab.py median)",
    )
    parser.add_argument(
        "--loads",
        type=positive_float_list,
        default=[0.25, 0.5, 0.9],
        help="comma list of fractions of saturation",
    )
    parser.add_argument("--load-seconds", type=positive_float, default=30.0)
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    return parser


def add_worker_args(parser: argparse.ArgumentParser) -> None:
    """The model and worker settings shared with benchmarks/worker_ab.py."""
    parser.add_argument("--arch", default="resnet50", help="model (random weights)")
    parser.add_argument("--image-size", type=positive_int, default=224, help="model input size")
    parser.add_argument(
        "--num-classes", type=positive_int, default=431, help="CompCars model classes"
    )
    parser.add_argument("--max-batch", type=positive_int, default=32, help="the worker's max batch")
    parser.add_argument(
        "--max-wait-ms", type=non_negative_int, default=50, help="the worker's max wait"
    )
    parser.add_argument(
        "--decode-threads", type=positive_int, default=2, help="the worker's decode pool"
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=os.cpu_count(),
        help="CPU engine threads (per instance)",
    )
    parser.add_argument(
        "--engine-instances",
        type=positive_int,
        default=1,
        help="the worker's engine instances, inferring side by side; the model-only row runs as "
        "many at once, the per-message peer one engine on threads x instances (--peer-threads)",
    )
    parser.add_argument(
        "--peer-threads",
        type=positive_int,
        default=None,
        help="the per-message peer's engine threads (default: threads x engine instances)",
    )
    parser.add_argument(
        "--peer-spinning",
        choices=["on", "off"],
        default=None,
        help="ONNX Runtime thread spinning in the peer's engine (default: the worker's "
        "inference_spinning setting, on)",
    )
    parser.add_argument(
        "--backend",
        default="onnxruntime",
        choices=["onnxruntime", "torch-cpu", "torch-cuda", "tensorrt", "auto"],
        help="engine of the worker, the peer and the model-only row",
    )
    parser.add_argument(
        "--onnx-precision",
        choices=["fp32", "int8"],
        default="fp32",
        help="onnxruntime backend: the ONNX model of the worker, the peer and the model-only row "
        "(int8: the bundle is built with engine_build's static quantisation too)",
    )
    parser.add_argument(
        "--gpu-decode", action="store_true", help="worker decodes JPEGs with nvJPEG (CUDA engines)"
    )
    parser.add_argument(
        "--cuda-graphs", action="store_true", help="torch-cuda engine replays CUDA graphs"
    )
    parser.add_argument(
        "--overlap", choices=["auto", "on", "off"], default="auto", help="the worker's loop"
    )
    parser.add_argument(
        "--images",
        choices=["photo", "thumb"],
        default="photo",
        help="photo: 1080x1080 and 1280x960 JPEGs; thumb: 320x320 and 400x300 (a stand-in for "
        "posts whose decode is nearly free, as with GPU decoding)",
    )
    parser.add_argument(
        "--sim-engine",
        type=sim_times,
        default=None,
        metavar="BATCH_MS,IMAGE_MS",
        help="replace the engine of the worker, the peer and the model-only row by "
        "benchmarks/sim_engine.py's stand-in for a GPU (sleeps BATCH_MS + n * IMAGE_MS per call)",
    )


def sim_times(text: str) -> tuple[float, float]:
    """``BATCH_MS,IMAGE_MS`` -> two non-negative floats."""
    try:
        batch_ms, image_ms = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected BATCH_MS,IMAGE_MS") from None
    if batch_ms < 0 or image_ms < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: times must be >= 0")
    return batch_ms, image_ms


def image_sizes(args) -> tuple[tuple[int, int], ...]:
    return THUMB_SIZES if args.images == "thumb" else PHOTO_SIZES


def commands(args) -> tuple[list[str], list[str]]:
    """The worker's and the peer's command lines (through the stand-in engine with --sim-engine)."""
    here = Path(__file__).parent
    if args.sim_engine:
        sim = [sys.executable, str(here / "sim_engine.py")]
        return [*sim, "worker"], [*sim, "peer"]
    return [sys.executable, "-m", "worker", "run"], [sys.executable, str(here / "peer_consumer.py")]


PHOTO_SIZES = ((1080, 1080), (1280, 960))  # typical social-media uploads
THUMB_SIZES = ((320, 320), (400, 300))


def photo_jpegs(
    count: int, seed: int = 0, sizes: tuple[tuple[int, int], ...] = PHOTO_SIZES
) -> list[bytes]:
    """Photo-like JPEGs (smooth gradients, shapes, sensor noise), sizes taken in turn."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        c = rng.uniform(0, 255, size=(3, 3))
        img = np.stack(
            [c[k, 0] + (c[k, 1] - c[k, 0]) * x / w + c[k, 2] * 0.2 * y / h for k in range(3)],
            axis=-1,
        )
        x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
        img[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.uniform(0, 255, size=3)
        img += rng.normal(0, 8, img.shape)
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def rfc3339(t: float) -> str:
    """Epoch seconds as RFC 3339 UTC with microseconds (always 27 characters, years 1000-9999)."""
    text = dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="microseconds")
    return text.replace("+00:00", "Z")


def now_rfc3339() -> str:
    return rfc3339(time.time())


def event(post_id: str, jpeg_b64: str, posted_at: str | None = None) -> bytes:
    return json.dumps(
        {
            "post_id": post_id,
            "image_b64": jpeg_b64,
            "posted_at": posted_at or now_rfc3339(),
            "city": "Paris",
        }
    ).encode()


STAMP_PLACEHOLDER = "0000-00-00T00:00:00.000000Z"  # as long as any rfc3339() of our era


def event_template(post_id: str, jpeg_b64: str) -> tuple[bytes, bytes]:
    """A post serialised once, split around its posted_at value: ``head + stamp + tail`` is the
    post stamped ``stamp``, with no JSON parse or re-serialisation per send."""
    head, sep, tail = event(post_id, jpeg_b64, STAMP_PLACEHOLDER).partition(
        STAMP_PLACEHOLDER.encode()
    )
    assert sep, "the placeholder is in the serialised post"
    return head, tail


def schedule(n: int, rate: float) -> list[float]:
    """Seconds after the start at which post i is due: i / rate."""
    if n < 0 or not rate > 0:
        raise ValueError(f"schedule of {n} posts at {rate} posts/s")
    return [i / rate for i in range(n)]


LAGGED_BELOW = 0.95  # a load whose producer achieved under this share of its target is flagged


def offered_stats(target: float, due: list[float], sent: list[float]) -> dict:
    """What a paced producer achieved: ``due`` and ``sent`` are each post's scheduled and actual
    hand-over times, in seconds after the start (the first post is due at 0).

    The achieved rate is the posts after the first over the time to the last hand-over, which
    equals ``target`` when every post goes on time; the send lag is how late a post went."""
    if len(due) != len(sent) or not due:
        raise ValueError(f"{len(due)} due times against {len(sent)} send times")
    span = sent[-1]
    achieved = (len(sent) - 1) / span if len(sent) > 1 and span > 0 else target
    return {
        "target_posts_per_s": target,
        "achieved_posts_per_s": achieved,
        "max_send_lag_ms": max(0.0, *(1000 * (s - d) for s, d in zip(sent, due, strict=True))),
        "producer_lagged": achieved < LAGGED_BELOW * target,
    }


class Run:
    """Fresh topics and group for one measurement."""

    def __init__(self, bootstrap: str) -> None:
        tag = uuid.uuid4().hex[:8]
        self.input, self.output, self.dlq = f"bench-{tag}", f"bench-{tag}.out", f"bench-{tag}.dlq"
        self.group = f"bench-{tag}"
        create_topics(bootstrap, [self.input, self.output, self.dlq], PARTITIONS)


def available_memory_bytes(meminfo: str = "/proc/meminfo") -> int | None:
    """MemAvailable from /proc/meminfo, or None where it cannot be read (not Linux)."""
    try:
        with open(meminfo, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def broker_memory_problem(copies: int, payload_bytes: int, available: int | None) -> str | None:
    """Why ``copies`` copies of ``payload_bytes`` of posts (one per run, each produced to a
    fresh topic that the memory-only Tansu broker keeps until it stops, and the benchmark's
    own) would not fit in memory, or None.

    Half the available memory is the budget, the rest is for the broker's overheads, the worker
    and the engine; past it the broker is killed mid-run and the benchmark waits on it.
    """
    planned = copies * payload_bytes
    if available is None or planned <= available // 2:
        return None
    return (
        f"{copies} copies of {payload_bytes / 2**20:.0f} MiB of posts (one per run, which the "
        f"memory-only broker keeps to the end, and this process's) = {planned / 2**30:.1f} GiB; "
        f"this machine has {available / 2**30:.1f} GiB available: use fewer --posts, --reps or "
        "configs"
    )


def pythonpath(src: Path = REPO) -> str:
    """``src`` first, then the inherited PYTHONPATH (where a GPU machine's carried packages
    are) without this checkout, so another checkout's worker (worker_ab's SRC=DIR) is run."""
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    rest = [p for p in inherited if Path(p).resolve() != REPO]
    return os.pathsep.join([str(src), *rest])


def env_for(run: Run, stack: LocalStack, bundle: Path, args, max_batch: int) -> dict:
    return {
        **os.environ,
        "PYTHONPATH": pythonpath(),
        "CARSTREAM_BOOTSTRAP_SERVERS": stack.bootstrap,
        "CARSTREAM_REDIS_URL": stack.redis.url,
        "CARSTREAM_GROUP_ID": run.group,
        "CARSTREAM_INPUT_TOPIC": run.input,
        "CARSTREAM_OUTPUT_TOPIC": run.output,
        "CARSTREAM_DLQ_TOPIC": run.dlq,
        "CARSTREAM_BUNDLE": str(bundle),
        "CARSTREAM_BACKEND": args.backend,
        "CARSTREAM_GPU_DECODE": str(args.gpu_decode).lower(),
        "CARSTREAM_CUDA_GRAPHS": str(args.cuda_graphs).lower(),
        "CARSTREAM_INFERENCE_THREADS": str(args.threads),
        "CARSTREAM_ENGINE_INSTANCES": str(args.engine_instances),
        "CARSTREAM_ONNX_PRECISION": args.onnx_precision,
        "CARSTREAM_DECODE_THREADS": str(args.decode_threads),
        "CARSTREAM_MAX_BATCH": str(max_batch),
        "CARSTREAM_MAX_WAIT_MS": str(args.max_wait_ms),
        "CARSTREAM_SESSION_TIMEOUT_MS": "6000",
        "CARSTREAM_METRICS_PORT": "0",
        "CARSTREAM_MIN_CONFIDENCE": "0",
        "CARSTREAM_OVERLAP": args.overlap,
        **({"PEER_THREADS": str(args.peer_threads)} if getattr(args, "peer_threads", None) else {}),
        **({"PEER_SPINNING": args.peer_spinning} if getattr(args, "peer_spinning", None) else {}),
        **(
            {"SIM_BATCH_MS": str(args.sim_engine[0]), "SIM_IMAGE_MS": str(args.sim_engine[1])}
            if args.sim_engine
            else {}
        ),
    }


def producer_for(bootstrap: str) -> KafkaProducer:
    return KafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_request_size=8 * 1024 * 1024
    )


def produce(bootstrap: str, topic: str, payloads: list[bytes]) -> None:
    """Send ``payloads`` as fast as the producer takes them (saturation runs: produced ahead)."""
    producer = producer_for(bootstrap)
    for value in payloads:
        producer.send(topic, value=value)
    producer.flush()
    producer.close()


def produce_paced(
    bootstrap: str, topic: str, templates: list[tuple[bytes, bytes]], rate: float
) -> dict:
    """Send post i at start + i / rate, stamped posted_at = that scheduled time (so a producer
    that lags is charged to latency, not hidden from it); returns offered_stats."""
    producer = producer_for(bootstrap)
    due = schedule(len(templates), rate)
    sent = []
    wall0, start = time.time(), time.monotonic()
    for (head, tail), at in zip(templates, due, strict=True):
        delay = start + at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        producer.send(topic, value=head + rfc3339(wall0 + at).encode() + tail)
        sent.append(time.monotonic() - start)
    producer.flush()
    producer.close()
    return offered_stats(rate, due, sent)


def collect(bootstrap: str, topic: str, n: int, deadline_s: float, proc) -> list[dict]:
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_bytes=64 * 1024 * 1024
    )
    parts = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + deadline_s
    while len(seen) < n and time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        for batch in consumer.poll(timeout_ms=500).values():
            for rec in batch:
                value = json.loads(rec.value)
                seen.setdefault(value["post_id"], value)
    consumer.close()
    if len(seen) < n:
        raise RuntimeError(f"only {len(seen)}/{n} results within {deadline_s:.0f}s")
    return list(seen.values())


def ts(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def throughput(results: list[dict], servers: int = 1) -> float:
    """Posts/s at saturation from the results' classified_at (one stamp per engine batch).

    ``servers`` engines (engine instances x worker processes) infer batches side by side. The
    window opens when the ``servers``-th batch completes (each engine's first batch, and the
    start-up before it, left out) and closes at the last batch completion a whole multiple of
    ``servers`` batches later; the posts of the batches completing inside it count. For engines
    each completing a batch every T seconds, whatever their phases, any ``servers`` successive
    completions are one of each engine, so the window spans whole periods and the estimate is
    exact; the tail after it (engines idle as the posts run out) is left out too. The first
    version opened at the first completion alone, which counted the other engines' first
    batches, run before the window opened: 1.11x of the ceiling with two instances.
    NaN when the results hold too few batches for one whole round after the first.
    """
    if servers < 1:
        raise ValueError(f"servers must be >= 1, not {servers}")
    sizes: dict[float, int] = {}
    for r in results:
        t = ts(r["classified_at"])
        sizes[t] = sizes.get(t, 0) + 1
    times = sorted(sizes)
    opened = servers - 1
    rounds = (len(times) - 1 - opened) // servers
    if rounds < 1:
        return float("nan")
    closed = opened + rounds * servers
    posts = sum(sizes[t] for t in times[opened + 1 : closed + 1])
    return posts / (times[closed] - times[opened])


def start(cmd: list[str], env: dict, log_path: Path, cwd: Path = REPO) -> subprocess.Popen:
    log = log_path.open("wb")
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def saturation(name, cmd, stack, bundle, args, max_batch, posts, work, servers=1) -> dict:
    run = Run(stack.bootstrap)
    produce(stack.bootstrap, run.input, posts)
    proc = start(cmd, env_for(run, stack, bundle, args, max_batch), work / f"{run.group}.log")
    try:
        results = collect(stack.bootstrap, run.output, len(posts), 900, proc)
    finally:
        stop(proc)
    rate = throughput(results, servers)
    print(f"  {name}: {rate:.2f} posts/s", flush=True)
    return {"config": name, "max_batch": max_batch, "posts": len(posts), "posts_per_s": rate}


def median_saturation(runs: list[dict]) -> dict:
    """One row for repeated runs of a config: the median posts/s, every run's kept."""
    row = dict(runs[0])
    rates = [r["posts_per_s"] for r in runs]
    row["posts_per_s"] = statistics.median(rates)
    if len(runs) > 1:
        row["runs_posts_per_s"] = rates
    return row


def latency(rate: float, seconds: float, stack, bundle, args, jpegs, work) -> dict:
    run = Run(stack.bootstrap)
    proc = start(
        commands(args)[0],
        env_for(run, stack, bundle, args, args.max_batch),
        work / f"{run.group}.log",
    )
    try:
        produce(stack.bootstrap, run.input, [event("warm-0", jpegs[0])])
        collect(stack.bootstrap, run.output, 1, 300, proc)  # started, assigned and warm
        n = max(5, int(rate * seconds))
        templates = [event_template(f"p{i}", jpegs[i % len(jpegs)]) for i in range(n)]
        offered = produce_paced(stack.bootstrap, run.input, templates, rate)
        results = collect(stack.bootstrap, run.output, n + 1, seconds + 600, proc)
    finally:
        stop(proc)
    lat = sorted(
        (ts(r["classified_at"]) - ts(r["posted_at"])) * 1000
        for r in results
        if r["post_id"] != "warm-0"
    )
    q = statistics.quantiles(lat, n=100)
    return {
        "offered_posts_per_s": rate,  # the target; what the producer achieved is below
        **offered,
        "posts": len(lat),
        "p50_ms": q[49],
        "p95_ms": q[94],
        "p99_ms": q[98],
    }


def model_only(bundle: Path, args, size: int, calls: int = 3, min_seconds: float = 0.0) -> dict:
    """Batches of ``size`` through ``--engine-instances`` engines at once, ``calls`` each
    (and for ``min_seconds`` at least).

    ``batch_ms`` is one call's time (the median) while the others run beside it: the batch
    time of the worker's latency target."""
    instances = getattr(args, "engine_instances", 1)
    engines = []
    for _ in range(instances):
        if args.sim_engine:
            from sim_engine import SleepEngine

            real = create_engine(load_bundle(bundle), "onnxruntime", threads=args.threads)
            engines.append(SleepEngine(real, *args.sim_engine))
        else:
            engines.append(
                create_engine(
                    load_bundle(bundle),
                    args.backend,
                    threads=args.threads,
                    cuda_graphs=args.cuda_graphs,
                    **precision_option(args.onnx_precision),
                )
            )
    timing = argparse.Namespace(warmup=WARMUP_CALLS, min_iters=calls, min_seconds=min_seconds)
    timed = time_engines(engines, size, args.image_size, timing)
    name = engines[0].name
    for engine in engines:
        engine.close()
    return {
        "engine": name,
        "instances": instances,
        "batch": size,
        "images_per_s": timed["images_per_s"],
        "batch_ms": timed["latency_ms_p50"],
    }


def or_dash(value: float | None, spec: str) -> str:
    return "—" if value is None or value != value else format(value, spec)


def load_base(args, sat_worker: dict) -> dict:
    """The rate the loads are fractions of, and where it came from."""
    if args.load_base is not None:
        return {"posts_per_s": args.load_base, "source": "--load-base"}
    runs = sat_worker.get("runs_posts_per_s", [sat_worker["posts_per_s"]])
    what = (
        f"median of {len(runs)} batched-worker saturation runs of this invocation"
        if len(runs) > 1
        else "one unpaired batched-worker saturation run of this invocation"
    )
    return {"posts_per_s": sat_worker["posts_per_s"], "source": what}


def render_md(r: dict) -> str:
    lines = [
        f"# End-to-end worker throughput and latency: {r['arch']} @ {r['image_size']}px",
        "",
        f"- command: `{r['command']}`",
        f"- machine: {r['machine']}",
        f"- date: {r['date']}",
        f"- versions: {r['versions']}",
        "- posts: photo-like JPEGs, "
        + " and ".join(f"{w}x{h}" for w, h in r.get("image_sizes", PHOTO_SIZES))
        + f" (mean {r['jpeg_kb']:.0f} KB), base64 "
        f"in JSON; local Tansu broker and redis-server on loopback; engine "
        f"{r['model_only'].get('engine', 'onnxruntime-fp32')} x {r.get('engine_instances', 1)} "
        f"(threads {r['threads']} each); "
        f"GPU decode {'on' if r.get('gpu_decode') else 'off'}; decode threads "
        f"{r['decode_threads']}; max_wait {r['max_wait_ms']} ms; overlap "
        f"{r.get('overlap', 'auto')}",
        "",
        "## Saturation",
        "",
        "| configuration | max batch | posts/s | vs model-only |",
        "| --- | ---: | ---: | ---: |",
        f"| model only (engine.infer, no Kafka/decode) | {r['model_only']['batch']} | "
        f"{r['model_only']['images_per_s']:.2f} | 1.00 |",
        f"| model only, batch 1 (the ceiling of any unbatched loop) | 1 | "
        f"{r['model_only_batch1']['images_per_s']:.2f} | "
        f"{r['model_only_batch1']['images_per_s'] / r['model_only']['images_per_s']:.2f} |",
    ]
    for s in r["saturation"]:
        each = s.get("runs_posts_per_s")
        runs = f" (median of {' / '.join(f'{x:.2f}' for x in each)})" if each else ""
        lines.append(
            f"| {s['config']} | {s['max_batch']} | {s['posts_per_s']:.2f}{runs} | "
            f"{s['posts_per_s'] / r['model_only']['images_per_s']:.2f} |"
        )
    base = r.get("load_base")
    lines += [
        "",
        "## Latency at fixed offered load (posted_at -> classified_at)",
        "",
        (
            f"Loads are fractions of {base['posts_per_s']:.2f} posts/s ({base['source']}). "
            if base
            else ""
        )
        + "posted_at is each post's scheduled send time; achieved is the rate the producer "
        f"kept; a load under {LAGGED_BELOW:.0%} of its target is marked LAGGED.",
        "",
        "| load | target posts/s | achieved posts/s | max send lag ms | posts | p50 ms | p95 ms "
        "| p99 ms |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for frac, lat in zip(r["loads"], r["latency"], strict=True):
        achieved = lat.get("achieved_posts_per_s")
        flag = " LAGGED" if lat.get("producer_lagged") else ""
        lines.append(
            f"| {frac:.0%} | {lat['offered_posts_per_s']:.2f} | "
            + ("—" if achieved is None else f"{achieved:.2f}{flag}")
            + f" | {or_dash(lat.get('max_send_lag_ms'), '.0f')} | {lat['posts']} | "
            f"{lat['p50_ms']:.0f} | {lat['p95_ms']:.0f} | {lat['p99_ms']:.0f} |"
        )
    lines += [
        "",
        f"One batch of {r['model_only']['batch']} takes "
        f"{r['model_only']['batch_ms']:.0f} ms in the engine; the p99 target at 50% load "
        f"is max_wait + two batch times = "
        f"{r['max_wait_ms'] + 2 * r['model_only']['batch_ms']:.0f} ms.",
        "",
    ]
    if r.get("sim_engine"):
        lines[-1:-1] = [
            "The engine is benchmarks/sim_engine.py's stand-in for a GPU (it sleeps "
            f"{r['sim_engine'][0]:g} ms + {r['sim_engine'][1]:g} ms per image per call, using no "
            "CPU); decoding, Kafka and Redis are real.",
            "",
        ]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    import onnxruntime
    import torch

    with tempfile.TemporaryDirectory(prefix="e2e-bench-") as tmp:
        work = Path(tmp)
        stack = LocalStack(work / "stack", kafka_port=free_port(), redis_port=free_port())
        stack.up(topics=(), partitions=PARTITIONS)
        try:
            print("building bundle...", flush=True)
            args.no_int8 = args.onnx_precision != "int8"  # make_bundle's switch
            bundle = make_bundle(args, work, args.max_batch)
            jpegs_raw = photo_jpegs(12, sizes=image_sizes(args))
            jpegs = [base64.b64encode(j).decode() for j in jpegs_raw]
            peer_posts = args.peer_posts or args.posts
            posts = [
                event(f"s{i}", jpegs[i % len(jpegs)]) for i in range(max(args.posts, peer_posts))
            ]
            ref = model_only(bundle, args, args.max_batch, min_seconds=args.model_only_seconds)
            ref1 = model_only(bundle, args, 1, min_seconds=args.model_only_seconds)
            print(f"  model only: {ref['images_per_s']:.2f} images/s", flush=True)
            worker, peer = commands(args)
            k = args.engine_instances
            batched = [
                saturation(
                    "worker (batched)",
                    *(worker, stack, bundle, args, args.max_batch, posts[: args.posts], work, k),
                )
                for _ in range(args.saturation_reps)
            ]
            sat = [
                median_saturation(batched),
                saturation(
                    "worker, batching off",
                    worker,
                    stack,
                    bundle,
                    args,
                    1,
                    posts[: args.posts],
                    work,
                    k,
                ),
                saturation(
                    "per-message peer", peer, stack, bundle, args, 1, posts[:peer_posts], work
                ),
            ]
            loads = args.loads
            base = load_base(args, sat[0])
            lat = []
            for frac in loads:
                rate = frac * base["posts_per_s"]
                lat.append(latency(rate, args.load_seconds, stack, bundle, args, jpegs, work))
                print(f"  {frac:.0%} load: p99 {lat[-1]['p99_ms']:.0f} ms", flush=True)
        finally:
            stack.down()
    result = {
        "command": "python benchmarks/e2e_throughput.py " + " ".join(sys.argv[1:]),
        "machine": f"{cpu_model()} ({os.cpu_count()} cores), GPU: "
        + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "versions": f"python {sys.version.split()[0]}, torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}",
        "arch": args.arch,
        "image_size": args.image_size,
        "threads": args.threads,
        "engine_instances": args.engine_instances,
        "decode_threads": args.decode_threads,
        "gpu_decode": args.gpu_decode,
        "overlap": args.overlap,
        "image_sizes": image_sizes(args),
        "sim_engine": args.sim_engine,
        "max_wait_ms": args.max_wait_ms,
        "jpeg_kb": statistics.mean(len(j) for j in jpegs_raw) / 1024,
        "model_only": ref,
        "model_only_batch1": ref1,
        "saturation": sat,
        "loads": loads,
        "load_base": base,
        "peer_threads": args.peer_threads,
        "peer_spinning": args.peer_spinning,
        "latency": lat,
    }
    write_results(args.out_dir, "e2e_throughput", result, render_md(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
