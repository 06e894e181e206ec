"""Decode + preprocess throughput: per format and size, PIL full vs JPEG draft, 1..N threads,
and batched GPU JPEG decoding (torchvision.io.decode_jpeg on CUDA) when a GPU is present.

Uses the worker's own code path (worker.decoding.decode_image + training's preprocess_image)
on photo-like images; the "draft, resize then crop" rows run the same draft through the
two-step resize + centre crop that preprocess_image replaced with one resample of the crop. On
a shared VM a case's rate moves between seconds, so every case runs once per round, rounds go
round robin and the table gives each case's median. Writes
benchmarks/results/decode_throughput.{json,md}.

    python benchmarks/decode_throughput.py
    python benchmarks/decode_throughput.py --threads 1,2,4 --seconds 1 --rounds 5
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).parent))

from bench_args import (  # noqa: E402
    make_parser,
    positive_float,
    positive_int,
    positive_int_list,
)
from e2e_throughput import photo_jpegs  # noqa: E402
from report import (  # noqa: E402
    cpu_model,
    format_versions,
    gpu_name,
    libjpeg_turbo_version,
    package_versions,
    write_results,
)

from training.preprocessing import (  # noqa: E402
    PreprocessSpec,
    center_crop,
    normalized_chw,
    preprocess_image,
    resize_shorter_side,
)
from worker.decoding import decode_image  # noqa: E402
from worker.prepare import prepare  # noqa: E402
from worker.url_fetch import UrlPolicy  # noqa: E402

SIZES = {"1080x1080": (1080, 1080), "1280x960": (1280, 960), "640x640": (640, 640)}


def get_args_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--threads",
        type=positive_int_list,
        default=[1, os.cpu_count() or 1],
        help="comma list of decode thread counts",
    )
    parser.add_argument(
        "--seconds", type=positive_float, default=0.5, help="timed seconds per case"
    )
    parser.add_argument(
        "--rounds", type=positive_int, default=3, help="round-robin rounds (median kept)"
    )
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    return parser


def encoded(fmt: str, size: tuple[int, int]) -> bytes:
    """A photo-like image of ``size`` in ``fmt``."""
    base = Image.open(io.BytesIO(photo_jpegs(1)[0])).convert("RGB").resize(size)
    buf = io.BytesIO()
    kwargs = {"JPEG": {"quality": 85}, "WEBP": {"quality": 85}, "PNG": {}}[fmt]
    base.save(buf, fmt, **kwargs)
    return buf.getvalue()


def rate(fn, data: bytes, threads: int, seconds: float) -> float:
    """Images/s of ``fn(data)`` run by ``threads`` threads for about ``seconds``."""
    fn(data)
    done = 0
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        while time.perf_counter() - start < seconds:
            list(pool.map(fn, [data] * (threads * 4)))
            done += threads * 4
    return done / (time.perf_counter() - start)


def gpu_rows(spec: PreprocessSpec, seconds: float) -> list[dict]:
    """The worker's GPU-decode path (worker.gpu_preprocess): nvJPEG batch decode + resize,
    crop and normalise on the device, for batches of 1080x1080 photo JPEGs."""
    import torch

    if not torch.cuda.is_available():
        return []
    from worker.gpu_preprocess import decode_jpegs, preprocess_batch
    from worker.prepare import GpuJpeg

    rows = []
    jpeg = GpuJpeg(encoded("JPEG", SIZES["1080x1080"]))
    for batch in (32, 128):
        jpegs = [jpeg] * batch

        def run(jpegs=jpegs):
            orientations = [j.orientation for j in jpegs]
            return preprocess_batch(decode_jpegs(jpegs, "cuda"), spec, orientations=orientations)

        run()
        torch.cuda.synchronize()
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            run()
            n += batch
        torch.cuda.synchronize()
        rows.append(
            {
                "format": "JPEG",
                "size": "1080x1080",
                "mode": f"nvjpeg batch {batch}",
                "threads": 1,
                "images_per_s": n / (time.perf_counter() - start),
            }
        )
    return rows


def row(fmt: str, size_name: str, data: bytes, mode: str, threads: int, rates: list[float]):
    """One table row: the median of a case's rounds."""
    return {
        "format": fmt,
        "size": size_name,
        "kb": len(data) // 1024,
        "mode": mode,
        "threads": threads,
        "images_per_s": statistics.median(rates),
        "rounds": rates,
    }


def image_cases(spec: PreprocessSpec) -> list[tuple]:
    """(format, size, data, mode, fn) per format, size and decode mode."""

    def preprocessed(d, draft):
        return preprocess_image(decode_image(d, draft_size=draft), spec)

    def two_step(d):  # the resize + crop preprocess_image did before resized_center_crop
        img = decode_image(d, draft_size=spec.resize)
        img = resize_shorter_side(img, spec.resize, spec.interpolation)
        return normalized_chw(center_crop(img, spec.crop), spec)

    cases = []
    for size_name, size in SIZES.items():
        for fmt in ("JPEG", "PNG", "WEBP"):
            data = encoded(fmt, size)
            cases.append((fmt, size_name, data, "full", partial(preprocessed, draft=None)))
            if fmt == "JPEG":
                cases.append(
                    (fmt, size_name, data, "draft", partial(preprocessed, draft=spec.resize))
                )
                cases.append((fmt, size_name, data, "draft, resize then crop", two_step))
    return cases


def post_cases(spec: PreprocessSpec) -> list[tuple]:
    """A whole post through the decode threads' function (worker.prepare.prepare): JSON parse,
    base64, then either the CPU decode + preprocess or, with --gpu-decode, the header check only
    (the JPEG is then decoded by nvJPEG in the main thread). The second is the CPU cost per post
    left on a GPU worker's decode threads."""
    import base64

    from e2e_throughput import event

    def prepared(raw, gpu):
        out = prepare(raw, spec, UrlPolicy(), 64 * 1024 * 1024, gpu_jpeg=gpu)
        assert out.error is None, out.error
        return out

    cases = []
    for size_name in ("1080x1080", "1280x960"):
        post = event("p1", base64.b64encode(encoded("JPEG", SIZES[size_name])).decode())
        for mode, gpu in (("post, CPU decode", False), ("post, header only (GPU decode)", True)):
            cases.append(("JPEG", size_name, post, mode, partial(prepared, gpu=gpu)))
    return cases


def main(args: argparse.Namespace) -> int:
    spec = PreprocessSpec()
    threads = args.threads
    cases = image_cases(spec) + post_cases(spec)
    rates: dict[tuple[int, int], list[float]] = {}
    for r in range(args.rounds):
        for i, (fmt, size_name, data, mode, fn) in enumerate(cases):
            for t in threads:
                got = rate(fn, data, t, args.seconds)
                rates.setdefault((i, t), []).append(got)
                print(
                    f"round {r + 1}: {fmt:5} {size_name:10} {mode:24} x{t}: {got:7.1f}/s",
                    flush=True,
                )
    rows = [
        row(fmt, size_name, data, mode, t, rates[(i, t)])
        for i, (fmt, size_name, data, mode, _) in enumerate(cases)
        for t in threads
    ]
    rows += gpu_rows(spec, args.seconds)
    result = {
        "command": " ".join(["python", "benchmarks/decode_throughput.py", *sys.argv[1:]]),
        "machine": f"{cpu_model()} ({os.cpu_count()} cores), GPU: {gpu_name()}",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "versions": {
            **package_versions("pillow", "numpy", "torch", "torchvision", "pybase64"),
            "libjpeg-turbo": libjpeg_turbo_version(),
        },
        "preprocess": spec.model_dump(mode="json"),
        "rows": rows,
    }
    lines = [
        "# Decode + preprocess throughput (worker.decoding + preprocess_image)",
        "",
        f"- command: `{result['command']}`",
        f"- machine: {result['machine']}",
        f"- date: {result['date']}",
        f"- versions: {format_versions(result['versions'])}",
        f"- {args.rounds} round(s) of {args.seconds} s per case, round robin; "
        "images/s is the median of the rounds",
        f"- preprocessing: resize {spec.resize}, crop {spec.crop}; images are photo-like; "
        "draft = libjpeg DCT scaling to the smallest scale keeping the resize size; "
        "draft, resize then crop = the same draft through the two-step resize + crop",
        "",
        "| format | size | KB | mode | threads | images/s |",
        "| --- | --- | ---: | --- | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['format']} | {r['size']} | {r.get('kb', '')} | {r['mode']} | "
            f"{r['threads']} | {r['images_per_s']:.1f} |"
        )
    if not any("nvjpeg" in r["mode"] for r in rows):
        lines += ["", "No CUDA GPU here: the batched nvJPEG rows are not measured."]
    write_results(args.out_dir, "decode_throughput", result, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
