"""Time each stage of the worker's CPU decode of one photo post, on one thread.

    python benchmarks/results/omp_wait/decode_stages.py

Uses the benchmarks' photo-like posts (1080x1080 and 1280x960 JPEGs, ~215 KB, base64 in JSON)
and the worker's own functions. Prints milliseconds per post for each stage, then the JPEG decode
of each size at several DCT scales.
"""

from __future__ import annotations

import base64
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import e2e_throughput as e2e  # noqa: E402
from PIL import Image  # noqa: E402

from training.preprocessing import PreprocessSpec, preprocess_image  # noqa: E402
from worker.decoding import decode_base64, decode_image, open_checked  # noqa: E402
from worker.prepare import prepare  # noqa: E402
from worker.schemas import parse_event  # noqa: E402
from worker.url_fetch import UrlPolicy  # noqa: E402

LIMIT = 10**8


def per_call_ms(fn: Callable[[int], object], items: int, calls: int = 60) -> float:
    fn(0)  # warm
    start = time.perf_counter()
    for i in range(calls):
        fn(i % items)
    return 1000 * (time.perf_counter() - start) / calls


def drafted(data: bytes, size: tuple[int, int] | None) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    if size:
        img.draft("RGB", size)
    img.load()
    return img


def main() -> None:
    jpegs = e2e.photo_jpegs(12)
    posts = [e2e.event(f"s{i}", base64.b64encode(j).decode()) for i, j in enumerate(jpegs)]
    spec = PreprocessSpec()
    events = [parse_event(p, LIMIT) for p in posts]
    datas = [decode_base64(e.image_b64, LIMIT) for e in events]
    images = [decode_image(d, draft_size=spec.resize) for d in datas]
    policy = UrlPolicy()
    n = len(posts)
    print(f"posts: {n}, JPEG KB: {[len(j) // 1000 for j in jpegs[:4]]} ...")
    stages = {
        "JSON parse (parse_event)": lambda i: parse_event(posts[i], LIMIT),
        "base64": lambda i: decode_base64(events[i].image_b64, LIMIT),
        "header checks (open_checked)": lambda i: open_checked(datas[i]),
        "JPEG decode, drafted (decode_image)": lambda i: decode_image(
            datas[i], draft_size=spec.resize
        ),
        "resize + normalise (preprocess_image)": lambda i: preprocess_image(images[i], spec),
        "all of prepare": lambda i: prepare(posts[i], spec, policy, LIMIT),
    }
    for name, fn in stages.items():
        print(f"{name:40s} {per_call_ms(fn, n):6.2f} ms")
    for k in (0, 1):
        full = Image.open(io.BytesIO(datas[k])).size
        for size in ((256, 256), (240, 240), (135, 135), None):
            ms = per_call_ms(lambda _i, k=k, size=size: drafted(datas[k], size), 1, 30)
            got = drafted(datas[k], size).size
            print(f"{full} draft {size} -> {got}: {ms:.2f} ms")


if __name__ == "__main__":
    main()
