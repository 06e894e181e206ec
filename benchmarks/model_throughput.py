"""Model-only throughput: images/s and latency p50/p95 per backend, precision and batch size.

Builds a real bundle (the same ``build_bundle`` path as production) for ``--arch`` with random
weights -- speed does not depend on the weights -- then times each Engine the machine can run:
ONNX Runtime FP32 and INT8 and (on CPUs with AMX or AVX-512 BF16) torch-cpu
bfloat16 on the CPU, torch-cuda FP16 and TensorRT FP16 where a GPU exists.
Writes benchmarks/results/model_throughput.{json,md}.

    python benchmarks/model_throughput.py                       # resnet50 @ 224, batches 1..64
    python benchmarks/model_throughput.py --arch resnet18 --batches 1,8 --min-seconds 1
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from bench_args import (
    make_parser,
    non_negative_float,
    non_negative_int,
    positive_int,
    positive_int_list,
)
from PIL import Image
from report import cpu_model, write_results

from engine_build.build import build_bundle
from engine_build.bundle import load_bundle
from engine_build.runtime import EngineUnavailableError, create_engine
from training.checkpoint import save_checkpoint
from training.cli_errors import fail
from training.models import build_model
from training.preprocessing import PreprocessSpec

log = logging.getLogger("model_throughput")


# ONNX Runtime's second run at a new shape is still a setup run (one batch of 32 measured 1.4 s
# steady, 1.7 s and 3.0 s as the second call of two single-thread sessions), so one untimed call
# left it in the timings: the 2 x 1 batch-32 row read 24-36 images/s instead of ~48.
WARMUP_CALLS = 2


def get_args_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--image-size", type=positive_int, default=224)
    parser.add_argument("--num-classes", type=positive_int, default=431, help="CompCars models")
    parser.add_argument(
        "--batches",
        type=positive_int_list,
        default=[1, 8, 32, 64],
        help="comma list of batch sizes",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=os.cpu_count(),
        help="CPU engines' threads (ONNX Runtime, torch-cpu), shared by the instances",
    )
    parser.add_argument(
        "--instances",
        type=positive_int_list,
        default=[1],
        help="comma list: engine copies inferring side by side (the worker's engine_instances); "
        "ONNX Runtime gives each threads / instances threads",
    )
    parser.add_argument(
        "--min-iters", type=positive_int, default=3, help="timed iterations per engine at least"
    )
    parser.add_argument(
        "--min-seconds", type=non_negative_float, default=3.0, help="timed seconds at least"
    )
    parser.add_argument(
        "--warmup",
        type=non_negative_int,
        default=WARMUP_CALLS,
        help="untimed iterations first, per engine",
    )
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 build and run")
    parser.add_argument(
        "--backends",
        default="",
        help="comma list of engine labels to run (onnxruntime-fp32, onnxruntime-int8, "
        "torch-cpu-bf16, torch-cuda-fp16, torch-cuda-graphs-fp16, tensorrt-fp16); default: all",
    )
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=1,
        help="times each engine set runs its batch sizes in turn; the median round is reported, "
        "every round's images/s kept (batch sizes compared within a round, as a VM drifts)",
    )
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    return parser


def make_bundle(args: argparse.Namespace, work: Path, max_batch: int) -> Path:
    """A random-weight checkpoint in the training contract, built into a bundle."""
    torch.manual_seed(0)
    classes = [
        {"make": f"make{i // 10}", "model": f"model{i}", "make_id": i // 10, "model_id": i}
        for i in range(args.num_classes)
    ]
    spec = PreprocessSpec.for_image_size(args.image_size)
    model = build_model(args.arch, args.num_classes)
    save_checkpoint(
        work / "ckpt",
        {
            "arch": args.arch,
            "num_classes": args.num_classes,
            "classes": classes,
            "level": "model",
            "preprocess": spec.model_dump(mode="json"),
            "state_dict": model.state_dict(),
            "epoch": 0,
            "args": {"benchmark": True},
        },
    )
    rng = np.random.default_rng(0)
    (work / "images").mkdir()
    for i in range(16):  # parity + int8 calibration images; speed does not depend on them
        pixels = rng.integers(0, 255, size=(spec.resize, spec.resize + 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(work / "images" / f"{i}.png")
    precisions = "fp16,fp32" if args.no_int8 else "fp16,fp32,int8"
    return build_bundle(
        work / "ckpt",
        work / "bundle",
        precisions=precisions,
        parity_data=work / "images",
        max_batch=max_batch,
        threads=args.threads,
        int8_agreement=0.0,
    )


def window_calls(calls: list[list[tuple[float, float]]], start: float) -> tuple[float, float]:
    """Calls completed inside the window where every engine was running, and its length.

    ``calls`` holds each engine's (begin, end) times of its calls, back to back from ``start``.
    The window is [start, the earliest of the engines' last call ends]: past it one engine had
    stopped, so the others ran with the machine to themselves. A call that straddles the window's
    end counts for the share of its time inside it (its work taken as even over the call). The
    first version divided every call by the time until the slowest engine finished, which
    charged the others' idle tail to them (2 x 1 batch 32: 46.1 images/s recorded where the
    per-call times gave 51.5)."""
    if not calls or not all(calls):
        raise ValueError("every engine needs at least one call")
    end = min(engine_calls[-1][1] for engine_calls in calls)
    done = 0.0
    for engine_calls in calls:
        for t0, t1 in engine_calls:
            if t1 <= end:
                done += 1.0
            elif t0 < end:
                done += (end - t0) / (t1 - t0)
    return done, end - start


def time_engines(engines: list, batch: int, image_size: int, args: argparse.Namespace) -> dict:
    """Every engine infers batches on its own thread at once, from one start to one shared
    deadline (each makes --min-iters calls at least); images/s over the window where all ran
    (window_calls)."""
    x = (
        np.random.default_rng(batch)
        .standard_normal((batch, 3, image_size, image_size))
        .astype(np.float32)
    )
    for engine in engines:
        for _ in range(args.warmup):
            engine.infer(x)
    calls: list[list[tuple[float, float]]] = [[] for _ in engines]
    start = time.perf_counter()
    deadline = start + args.min_seconds

    def run(engine, mine: list[tuple[float, float]]) -> None:
        while len(mine) < args.min_iters or time.perf_counter() < deadline:
            t0 = time.perf_counter()
            engine.infer(x)  # returns host logits: a synchronised, end-to-end call
            mine.append((t0, time.perf_counter()))

    threads = [
        threading.Thread(target=run, args=(e, c)) for e, c in zip(engines, calls, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done, window = window_calls(calls, start)
    latencies = [t1 - t0 for engine_calls in calls for t0, t1 in engine_calls]
    q = (
        statistics.quantiles(latencies, n=20, method="inclusive")
        if len(latencies) > 1
        else [latencies[0]] * 19
    )
    return {
        "batch": batch,
        "iters": len(latencies),
        "images_per_s": round(batch * done / window, 2),
        "window_s": round(window, 3),
        "latency_ms_p50": round(statistics.median(latencies) * 1e3, 2),
        "latency_ms_p95": round(q[18] * 1e3, 2),
    }


ENGINES = [  # (label, backend, options)
    ("onnxruntime", "fp32", "onnxruntime", {"precision": "fp32"}),
    ("onnxruntime", "int8", "onnxruntime", {"precision": "int8"}),
    ("torch-cpu", "bf16", "torch-cpu", {}),
    ("torch-cuda", "fp16", "torch-cuda", {}),
    ("torch-cuda-graphs", "fp16", "torch-cuda", {"cuda_graphs": True}),
    ("tensorrt", "fp16", "tensorrt", {}),
]


def selected_engines(labels: str) -> list[tuple[str, str, str, dict]]:
    """ENGINES, or those named as ``label-precision`` in the comma list."""
    if not labels:
        return ENGINES
    wanted = {name.strip() for name in labels.split(",") if name.strip()}
    known = {f"{label}-{precision}" for label, precision, _, _ in ENGINES}
    if unknown := wanted - known:
        raise ValueError(f"--backends {','.join(sorted(unknown))}: not one of {sorted(known)}")
    return [e for e in ENGINES if f"{e[0]}-{e[1]}" in wanted]


def median_read(reads: list[dict]) -> dict:
    """The median round's figures (by images/s), with every round's images/s beside them."""
    ranked = sorted(reads, key=lambda r: r["images_per_s"])
    row = dict(ranked[(len(ranked) - 1) // 2])
    if len(reads) > 1:
        row["rounds_images_per_s"] = [r["images_per_s"] for r in reads]
    return row


def render_md(result: dict) -> str:
    lines = [
        f"# Model throughput: {result['arch']} @ {result['image_size']}px",
        "",
        f"- command: `{result['command']}`",
        f"- machine: {result['machine']['cpu']} ({result['machine']['cores']} cores), "
        f"GPU: {result['machine']['gpu'] or 'none'}",
        f"- date: {result['date']}; load average at start: {result['machine']['loadavg']}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in result['versions'].items())}",
        f"- random weights; CPU engine threads: {result['threads']}; skipped: "
        f"{'; '.join(result['skipped']) or 'none'}",
        "",
        "| backend | precision | instances x threads | batch | images/s | p50 ms | p95 ms "
        "| iters |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["results"]:
        each = f" x {r['ort_threads']}" if r.get("ort_threads") else ""
        lines.append(
            f"| {r['backend']} | {r['precision']} | {r.get('instances', 1)}{each} | {r['batch']} "
            f"| {r['images_per_s']}{rounds(r)} | {r['latency_ms_p50']} | {r['latency_ms_p95']} "
            f"| {r['iters']} |"
        )
    return "\n".join(lines) + "\n"


def rounds(row: dict) -> str:
    reads = row.get("rounds_images_per_s")
    return f" ({' / '.join(str(v) for v in reads)})" if reads else ""


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING)
    try:
        engine_sets = selected_engines(args.backends)
    except ValueError as exc:
        return fail(str(exc))
    torch.set_num_threads(args.threads)
    batches = args.batches
    instances = args.instances
    result = {
        "command": " ".join(["python", *sys.argv]),
        "arch": args.arch,
        "image_size": args.image_size,
        "threads": args.threads,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "loadavg": [round(v, 2) for v in os.getloadavg()],
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "onnx": onnx.__version__,
            "numpy": np.__version__,
        },
        "results": [],
        "skipped": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        bundle = load_bundle(make_bundle(args, Path(tmp), max(batches)))
        result["bundle_build_s"] = round(time.perf_counter() - t0, 1)
        for label, precision, backend, opts in engine_sets:
            for n in instances:
                cpu_engine = backend in ("onnxruntime", "torch-cpu")
                ort_threads = max(1, args.threads // n) if cpu_engine else None
                if ort_threads:
                    opts = {**opts, "threads": ort_threads}
                engines = []
                try:
                    for _ in range(n):
                        engines.append(create_engine(bundle, backend, **opts))
                except EngineUnavailableError as exc:
                    result["skipped"].append(f"{label}-{precision}: {exc}")
                    for engine in engines:
                        engine.close()
                    break
                reads: dict[int, list[dict]] = {b: [] for b in batches}
                for _ in range(args.rounds):
                    for b in batches:  # round robin: one round's batch sizes share the drift
                        reads[b].append(time_engines(engines, b, args.image_size, args))
                for b in batches:
                    row = {
                        "backend": label,
                        "precision": precision,
                        "instances": n,
                        "ort_threads": ort_threads,
                        **median_read(reads[b]),
                    }
                    print(json.dumps(row), flush=True)
                    result["results"].append(row)
                for engine in engines:
                    engine.close()
    write_results(args.out_dir, "model_throughput", result, render_md(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
