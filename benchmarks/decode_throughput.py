"""Decode + preprocess throughput: per format and size, PIL full vs JPEG draft, 1..N threads,
and batched GPU JPEG decoding (torchvision.io.decode_jpeg on CUDA) when a GPU is present.

Uses the worker's own code path (worker.decoding.decode_image + training's preprocess_image)
on photo-like images. Writes benchmarks/results/decode_throughput.{json,md}.

    python benchmarks/decode_throughput.py
    python benchmarks/decode_throughput.py --threads 1,2,4 --seconds 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).parent))

from e2e_throughput import photo_jpegs  # noqa: E402
from report import cpu_model, write_results  # noqa: E402

from training.preprocessing import PreprocessSpec, preprocess_image  # noqa: E402
from worker.decoding import decode_image  # noqa: E402
from worker.prepare import prepare  # noqa: E402
from worker.url_fetch import UrlPolicy  # noqa: E402

SIZES = {"1080x1080": (1080, 1080), "1280x960": (1280, 960), "640x640": (640, 640)}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--threads", default=f"1,{os.cpu_count()}", help="comma list")
    parser.add_argument("--seconds", type=float, default=1.5, help="timed seconds per case")
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
            return preprocess_batch(decode_jpegs(jpegs, "cuda"), spec)

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


def measure_rows(fn, data, fmt, size_name, mode, threads, seconds) -> list[dict]:
    """One table row per thread count: ``fn(data)`` images/s."""
    rows = []
    for t in threads:
        r = rate(fn, data, t, seconds)
        rows.append(
            {
                "format": fmt,
                "size": size_name,
                "kb": len(data) // 1024,
                "mode": mode,
                "threads": t,
                "images_per_s": r,
            }
        )
        print(f"{fmt:5} {size_name:10} {mode:6} x{t}: {r:7.1f}/s", flush=True)
    return rows


def post_rows(spec: PreprocessSpec, threads: list[int], seconds: float) -> list[dict]:
    """A whole post through the decode threads' function (worker.prepare.prepare): JSON parse,
    base64, then either the CPU decode + preprocess or, with --gpu-decode, the header check only
    (the JPEG is then decoded by nvJPEG in the main thread). The second is the CPU cost per post
    left on a GPU worker's decode threads."""
    import base64

    from e2e_throughput import event

    rows = []
    for size_name in ("1080x1080", "1280x960"):
        post = event("p1", base64.b64encode(encoded("JPEG", SIZES[size_name])).decode())
        for mode, gpu in (("post, CPU decode", False), ("post, header only (GPU decode)", True)):

            def fn(raw, gpu=gpu):
                out = prepare(raw, spec, UrlPolicy(), 64 * 1024 * 1024, gpu_jpeg=gpu)
                assert out.error is None, out.error
                return out

            rows += measure_rows(fn, post, "JPEG", size_name, mode, threads, seconds)
    return rows


def main(args: argparse.Namespace) -> int:
    spec = PreprocessSpec()
    threads = [int(t) for t in args.threads.split(",")]
    rows = []
    for size_name, size in SIZES.items():
        for fmt in ("JPEG", "PNG", "WEBP"):
            data = encoded(fmt, size)
            modes = {"full": None, "draft": spec.resize} if fmt == "JPEG" else {"full": None}
            for mode, draft in modes.items():

                def fn(d, draft=draft):
                    return preprocess_image(decode_image(d, draft_size=draft), spec)

                rows += measure_rows(fn, data, fmt, size_name, mode, threads, args.seconds)
    rows += post_rows(spec, threads, args.seconds)
    rows += gpu_rows(spec, args.seconds)
    result = {
        "command": "python benchmarks/decode_throughput.py " + " ".join(sys.argv[1:]),
        "machine": f"{cpu_model()} ({os.cpu_count()} cores)",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "preprocess": spec.model_dump(mode="json"),
        "rows": rows,
    }
    lines = [
        "# Decode + preprocess throughput (worker.decoding + preprocess_image)",
        "",
        f"- command: `{result['command']}`",
        f"- machine: {result['machine']}",
        f"- date: {result['date']}",
        f"- preprocessing: resize {spec.resize}, crop {spec.crop}; images are photo-like; "
        "draft = libjpeg DCT scaling to the smallest scale keeping the resize size",
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
