"""Every benchmark runs end to end on tiny settings and writes its results.

Not a measurement (timed assertions do not belong here): it keeps `make bench` from rotting
between the sessions that record figures. The e2e one starts a real Tansu broker and
redis-server, real worker processes and the per-message peer.
"""

from __future__ import annotations

import importlib
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_benchmark(script: str, out_dir: Path, *args: str, timeout: int = 600) -> dict:
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), "--out-dir", str(out_dir), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    name = script.removesuffix(".py")
    assert (out_dir / f"{name}.md").read_text().startswith("# ")
    return json.loads((out_dir / f"{name}.json").read_text())


def benchmark_module(name: str):
    """Import ``benchmarks/<name>.py`` (a script directory, not a package) for its pure parts."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def test_model_throughput_runs(tmp_path):
    result = run_benchmark(
        "model_throughput.py",
        tmp_path,
        *("--arch", "resnet18", "--image-size", "32", "--num-classes", "8", "--batches", "1,4"),
        *("--min-iters", "1", "--min-seconds", "0", "--threads", "2", "--instances", "1,2"),
    )
    rows = [r for r in result["results"] if r["backend"] == "onnxruntime"]
    got = {(r["precision"], r["instances"], r["ort_threads"], r["batch"]) for r in rows}
    assert got >= {(p, n, 2 // n, b) for p in ("fp32", "int8") for n in (1, 2) for b in (1, 4)}
    assert all(r["images_per_s"] > 0 for r in rows)
    # two instances side by side: each makes at least --min-iters calls
    assert all(r["iters"] >= r["instances"] for r in rows)


def test_model_throughput_runs_the_named_engines_round_robin(tmp_path):
    result = run_benchmark(
        "model_throughput.py",
        tmp_path,
        *("--arch", "resnet18", "--image-size", "32", "--num-classes", "8", "--batches", "1,4"),
        *("--min-iters", "1", "--min-seconds", "0", "--threads", "1", "--no-int8"),
        *("--backends", "onnxruntime-fp32", "--rounds", "3"),
    )
    rows = result["results"]
    assert {(r["backend"], r["precision"], r["batch"]) for r in rows} == {
        ("onnxruntime", "fp32", 1),
        ("onnxruntime", "fp32", 4),
    }
    for row in rows:  # the median of the three rounds, each round kept
        reads = row["rounds_images_per_s"]
        assert len(reads) == 3 and row["images_per_s"] == sorted(reads)[1]
    table = (tmp_path / "model_throughput.md").read_text()
    assert " / ".join(str(v) for v in rows[0]["rounds_images_per_s"]) in table


def test_model_throughput_refuses_an_unknown_engine_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "model_throughput.py"), "--out-dir",
         str(tmp_path), "--backends", "onnxruntime-fp32,tensorrt-int4"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "tensorrt-int4" in proc.stderr
    assert not (tmp_path / "model_throughput.json").exists()


def test_decode_throughput_runs(tmp_path):
    result = run_benchmark(
        "decode_throughput.py", tmp_path, *("--threads", "1", "--seconds", "0.05", "--rounds", "2")
    )
    modes = {(r["format"], r["mode"]) for r in result["rows"]}
    assert {("JPEG", "full"), ("JPEG", "draft"), ("JPEG", "draft, resize then crop")} <= modes
    assert ("PNG", "full") in modes and ("PNG", "draft") not in modes
    assert all(r["images_per_s"] > 0 and len(r["rounds"]) == 2 for r in result["rows"])
    assert all(r["images_per_s"] == statistics.median(r["rounds"]) for r in result["rows"])


def test_train_throughput_runs(tmp_path):
    result = run_benchmark(
        "train_throughput.py",
        tmp_path,
        *("--archs", "resnet18", "--image-size", "32", "--batch-size", "2", "--iters", "1"),
    )
    assert [r["arch"] for r in result["results"]] == ["resnet18"]
    assert result["results"][0]["images_per_s"] > 0


@pytest.mark.integration
def test_e2e_throughput_runs_worker_peer_and_latency(tmp_path):
    result = run_benchmark(
        "e2e_throughput.py",
        tmp_path,
        *("--arch", "resnet18", "--image-size", "32", "--num-classes", "8", "--posts", "24"),
        *("--max-batch", "8", "--loads", "0.5", "--load-seconds", "2", "--threads", "1"),
        *("--onnx-precision", "int8", "--model-only-seconds", "0.2"),
    )
    assert result["model_only"]["engine"] == "onnxruntime-int8"
    configs = [s["config"] for s in result["saturation"]]
    assert configs == ["worker (batched)", "worker, batching off", "per-message peer"]
    assert all(s["posts_per_s"] > 0 and s["posts"] == 24 for s in result["saturation"])
    (latency,) = result["latency"]
    assert latency["posts"] >= 5 and 0 < latency["p50_ms"] <= latency["p99_ms"]


@pytest.mark.integration
def test_worker_ab_runs_each_config_and_splits_cpu_by_thread(tmp_path):
    result = run_benchmark(
        "worker_ab.py",
        tmp_path,
        *("--arch", "resnet18", "--image-size", "32", "--num-classes", "8", "--posts", "48"),
        *("--max-batch", "8", "--threads", "1", "--reps", "1", "--engine-instances", "2"),
        *("--config", "base:", "--config", "one-decode:CARSTREAM_DECODE_THREADS=1"),
        *("--config", "peer:CMD=peer", "--baseline", "peer", "--model-only-seconds", "0.2"),
    )
    by_name = {c["config"]: c for c in result["configs"]}
    assert list(by_name) == ["base", "one-decode", "peer"]
    assert result["engine_instances"] == 2 and result["baseline"] == "peer"
    # model-only before the round and after it; each run's ratio uses the pair around it
    (before, after) = result["model_only"]
    assert before > 0 and after > 0
    for config in by_name.values():
        (rate,) = config["posts_per_s"]
        assert config["vs_model_only"] == pytest.approx(rate / ((before + after) / 2))
        assert config["vs_baseline"] == pytest.approx(rate / by_name["peer"]["posts_per_s"][0])
    assert by_name["peer"]["vs_baseline"] == 1.0
    # the worker's metrics endpoint gave its engine's side; the peer has none
    # (a run over before its first result was read has the speed but no busy share)
    busy = by_name["base"]["engine_busy"]
    assert math.isnan(busy) or 0 < busy <= 1.0 + 1e-6
    assert by_name["base"]["engine_images_per_s"] > 0
    assert 1 <= by_name["base"]["mean_batch"] <= result["max_batch"]
    assert math.isnan(by_name["peer"]["engine_busy"])
    assert "| — | — | — |" in (tmp_path / "worker_ab.md").read_text()
    assert by_name["one-decode"]["env"] == {"CARSTREAM_DECODE_THREADS": "1"}
    for config in by_name.values():
        assert config["median_posts_per_s"] > 0
    # the worker's decode threads carry their kernel names (worker.thread_names); the peer
    # decodes on its main thread, so it has no decode group
    assert by_name["base"]["cpu_ms_per_post"]["decode"] > 0
    assert by_name["peer"]["cpu_ms_per_post"]["decode"] == 0
    assert by_name["peer"]["cpu_ms_per_post"]["main"] > 0


@pytest.mark.integration
def test_worker_ab_with_the_stand_in_gpu_engine_runs_both_loops(tmp_path):
    result = run_benchmark(
        "worker_ab.py",
        tmp_path,
        *("--arch", "resnet18", "--image-size", "32", "--num-classes", "8", "--posts", "48"),
        *("--max-batch", "8", "--threads", "1", "--reps", "1", "--images", "thumb"),
        *("--sim-engine", "1,0.1", "--config", "overlapped:CARSTREAM_OVERLAP=on"),
        *("--model-only-seconds", "0.2"),
        *("--config", "serial:CARSTREAM_OVERLAP=off", "--config", "peer:CMD=peer"),
    )
    by_name = {c["config"]: c for c in result["configs"]}
    assert result["image_sizes"] == [[320, 320], [400, 300]]
    # the stand-in sleeps 1 ms + 0.1 ms per image, so a batch of 8 takes 1.8 ms at least
    assert all(0 < x <= 8 / 0.0018 for x in result["model_only"])
    for config in by_name.values():
        assert config["median_posts_per_s"] > 0
    # only the overlapped loop publishes and counts on its delivery thread (its CPU can be
    # under one clock tick in so short a run, so the thread itself is what is checked)
    assert by_name["overlapped"]["threads"]["delivery"] == 1
    assert by_name["serial"]["threads"]["delivery"] == 0
    assert by_name["serial"]["cpu_ms_per_post"]["delivery"] == 0


@pytest.mark.integration
def test_worker_ab_with_the_stand_in_gpu_engine_takes_the_gpu_decode_path(tmp_path):
    # with --gpu-decode the stand-in engine's infer_device and the stand-in nvJPEG run; a worker
    # that failed on that path would publish nothing and the benchmark would fail
    result = run_benchmark(
        "worker_ab.py",
        tmp_path,
        *("--arch", "resnet18", "--image-size", "32", "--num-classes", "8", "--posts", "48"),
        *("--max-batch", "8", "--threads", "1", "--reps", "1", "--sim-engine", "1,0.1"),
        *(
            "--gpu-decode",
            "--config",
            "serial:CARSTREAM_OVERLAP=off",
            "--model-only-seconds",
            "0.2",
        ),
    )
    assert result["configs"][0]["median_posts_per_s"] > 0


def test_stand_in_gpu_decode_replaces_the_device_steps_with_blank_tensors():
    import types

    import torch

    sim_engine = benchmark_module("sim_engine")
    pipeline = types.SimpleNamespace()
    sim_engine.stand_in_gpu_decode(pipeline, decode_ms=0.0)
    spec = types.SimpleNamespace(crop=32)
    images = pipeline.decode_jpegs([b"a", b"b", b"c"], "cpu")
    by_key, failed = pipeline.preprocess_rows(dict(enumerate(images)), spec)
    assert failed == [] and sorted(by_key) == [0, 1, 2]
    rows = [by_key[k] for k in sorted(by_key)]
    assert [tuple(r.shape) for r in rows] == [(3, 32, 32)] * 3
    batch = pipeline.torch_stack(rows)
    assert tuple(batch.shape) == (3, 3, 32, 32) and batch.dtype == torch.float32
    assert tuple(pipeline.torch_stack(rows * 40).shape) == (120, 3, 32, 32)  # grows past 64


def test_a_benchmark_plan_that_would_not_fit_the_memory_only_broker_is_refused(tmp_path):
    e2e = benchmark_module("e2e_throughput")
    gib = 2**30
    assert e2e.broker_memory_problem(13, gib, available=40 * gib) is None
    problem = e2e.broker_memory_problem(13, gib, available=20 * gib)
    assert problem and "13 copies" in problem and "20.0 GiB available" in problem
    assert e2e.broker_memory_problem(100, gib, available=None) is None  # not Linux: no check
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   23000000 kB\n")
    assert e2e.available_memory_bytes(str(meminfo)) == 23000000 * 1024
    assert e2e.available_memory_bytes(str(tmp_path / "missing")) is None


def test_worker_ab_ratios_pair_each_run_with_the_measurements_of_its_own_round():
    worker_ab = benchmark_module("worker_ab")
    # the machine slows from 50 to 30 images/s over two rounds: a run at 45 in the first round
    # and one at 27 in the second are both 0.9x of their moment
    assert worker_ab.bracketed_ratios([45.0, 36.0], [50.0, 50.0, 30.0]) == [0.9, 0.9]
    assert worker_ab.paired_ratios([45.0, 27.0], [30.0, 18.0]) == [1.5, 1.5]
    with pytest.raises(ValueError, match="2 runs need 3 references"):
        worker_ab.bracketed_ratios([1.0, 2.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="2 runs against 1 baseline"):
        worker_ab.paired_ratios([1.0, 2.0], [1.0])


def test_worker_ab_splits_a_gap_to_model_only_into_engine_idle_and_engine_speed():
    worker_ab = benchmark_module("worker_ab")
    text = (
        "# HELP carstream_inference_seconds engine time per batch\n"
        'carstream_inference_seconds_bucket{le="0.5"} 3.0\n'
        "carstream_inference_seconds_count 4.0\n"
        "carstream_inference_seconds_sum 2.5\n"
        "carstream_batch_size_sum 100.0\n"
        "carstream_batch_size_count 4.0\n"
    )
    first = worker_ab.parse_engine_metrics(text)
    assert first == {"infer_s": 2.5, "images": 100.0, "batches": 4.0}
    last = {"infer_s": 10.5, "images": 420.0, "batches": 24.0}
    # 8 s of engine calls in a 10 s window ran 320 images in 20 calls: busy 0.8 at 40
    # images/s, 16 images a batch
    assert worker_ab.engine_split(first, last, 10.0, 1) == {
        "engine_busy": 0.8,
        "engine_images_per_s": 40.0,
        "mean_batch": 16.0,
    }
    # two instances: 8 s of calls between them over 10 s is each busy 0.4 of the time
    two = worker_ab.engine_split(first, last, 10.0, 2)
    assert two == {"engine_busy": 0.4, "engine_images_per_s": 80.0, "mean_batch": 16.0}
    assert math.isnan(worker_ab.engine_split(first, first, 10.0, 1)["engine_busy"])
    # a window from process start: the speed, and no busy share
    from_start = worker_ab.engine_split(first, last, None, 1)
    assert math.isnan(from_start["engine_busy"]) and from_start["engine_images_per_s"] == 40.0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--config", "a:", "--baseline", "peer"], "--baseline 'peer' names no config"),
        (["--config", "a:", "--config", "a:CARSTREAM_MAX_BATCH=8"], "config names repeat: a, a"),
    ],
)
def test_worker_ab_refuses_a_baseline_or_names_that_cannot_be_paired(argv, message):
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "worker_ab.py"), *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("worker_ab.py: error: ") and message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_worker_ab_refuses_a_run_the_broker_cannot_hold_before_starting_anything():
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "worker_ab.py"), "--posts", "2000000"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("worker_ab.py: error: ") and "use fewer --posts" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_benchmark_workers_keep_the_inherited_pythonpath_behind_their_checkout(monkeypatch):
    """On a GPU machine the worker's dependencies are carried on PYTHONPATH: the benchmark's
    worker must keep them, put its own checkout first, and not also this one (SRC=DIR)."""
    e2e = benchmark_module("e2e_throughput")
    monkeypatch.setenv("PYTHONPATH", f"/tmp/site:{REPO}")
    assert e2e.pythonpath().split(":") == [str(REPO), "/tmp/site"]
    assert e2e.pythonpath(Path("/tmp/other")).split(":") == ["/tmp/other", "/tmp/site"]


def test_trends_read_runs(tmp_path):
    result = run_benchmark(
        "trends_read.py",
        tmp_path,
        *("--days", "1", "--minute-hours", "1", "--cities", "3", "--reps", "2"),
    )
    population = result["population"]
    assert population["keys"] > 0 and population["posts"] > 0
    queries = [r["query"] for r in result["rows"]]
    assert "trends --window 30d --every 1d" in queries and len(queries) == len(set(queries))
    assert all(0 < r["median_ms"] <= r["p95_ms"] for r in result["rows"])
