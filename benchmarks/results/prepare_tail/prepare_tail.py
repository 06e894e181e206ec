"""Time what the worker's CPU decode does after the JPEG decode, per photo post, on one thread:
the resample of the crop's box, the normalisation to float32 CHW, and the batch's np.stack
(float32 against uint8), to see what moving normalisation into the engine could save.

    python benchmarks/results/prepare_tail/prepare_tail.py
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import e2e_throughput as e2e  # noqa: E402
import numpy as np  # noqa: E402

from training.preprocessing import (  # noqa: E402
    PreprocessSpec,
    normalized_chw,
    resized_center_crop,
)
from worker.decoding import decode_image  # noqa: E402


def per_call_ms(fn: Callable[[int], object], items: int, calls: int = 200) -> float:
    fn(0)  # warm
    start = time.perf_counter()
    for i in range(calls):
        fn(i % items)
    return 1000 * (time.perf_counter() - start) / calls


def main() -> None:
    spec = PreprocessSpec()
    images = [decode_image(j, draft_size=spec.resize) for j in e2e.photo_jpegs(8)]
    crops = [resized_center_crop(im, spec.resize, spec.crop, spec.interpolation) for im in images]
    n = len(images)
    for _ in range(3):
        resize = per_call_ms(
            lambda i: resized_center_crop(images[i], spec.resize, spec.crop, spec.interpolation),
            n,
        )
        normalise = per_call_ms(lambda i: normalized_chw(crops[i], spec), n)
        as_uint8 = per_call_ms(lambda i: np.asarray(crops[i], dtype=np.uint8), n)
        print(
            f"resample crop box {resize:.3f} ms, normalise {normalise:.3f} ms, "
            f"uint8 array {as_uint8:.3f} ms"
        )
    floats = [normalized_chw(c, spec) for c in crops] * 4
    bytes_ = [np.asarray(c) for c in crops] * 4
    for name, arrays in (("float32", floats), ("uint8", bytes_)):
        start = time.perf_counter()
        for _ in range(20):
            np.stack(arrays)
        per_image = 1000 * (time.perf_counter() - start) / 20 / len(arrays)
        print(f"np.stack of a batch of 32, {name}: {per_image:.3f} ms per image")


if __name__ == "__main__":
    main()
