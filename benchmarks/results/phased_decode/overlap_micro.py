"""Does decoding beside ONNX Runtime cost more than decoding before it? (a one-off experiment)

Per cycle: decode BATCH posts (4 threads, the worker's ``prepare``) and infer one batch of them.
Modes, interleaved round robin, each timed over CYCLES cycles:
  infer:   inference alone (model-only)
  decode:  decoding alone
  phased:  decode the batch, wait, then infer (nothing beside the engine)
  overlap: submit the next batch's decodes, infer this batch meanwhile, then wait for them

    python benchmarks/results/phased_decode/overlap_micro.py BATCH CYCLES ROUNDS spin|nospin
"""

from __future__ import annotations

import argparse
import base64
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

from e2e_throughput import event, photo_jpegs  # noqa: E402
from model_throughput import make_bundle  # noqa: E402

from engine_build.bundle import load_bundle  # noqa: E402
from engine_build.runtime import create_engine  # noqa: E402
from worker.prepare import prepare  # noqa: E402
from worker.url_fetch import UrlPolicy  # noqa: E402


def main() -> None:
    batch, cycles, rounds = (int(a) for a in sys.argv[1:4])
    spin = sys.argv[4] == "spin"
    ns = argparse.Namespace(
        arch="resnet50", num_classes=431, image_size=224, threads=2, no_int8=True
    )
    bundle = load_bundle(make_bundle(ns, Path(tempfile.mkdtemp()), 32))
    engine = create_engine(bundle, "onnxruntime", spinning=spin)
    spec = bundle.manifest.preprocess
    jpegs = photo_jpegs(batch)
    posts = [event(f"p{i}", base64.b64encode(j).decode()) for i, j in enumerate(jpegs)]
    pool = ThreadPoolExecutor(4)

    def submit():
        return [
            pool.submit(prepare, p, spec=spec, policy=UrlPolicy(), max_message_bytes=10 << 20)
            for p in posts
        ]

    def stack(futures):
        return np.stack([f.result().array for f in futures])

    arr = stack(submit())
    engine.infer(arr)

    def infer():
        for _ in range(cycles):
            engine.infer(arr)

    def decode():
        for _ in range(cycles):
            wait(submit())

    def phased():
        for _ in range(cycles):
            futures = submit()
            wait(futures)
            engine.infer(stack(futures))

    def overlap():
        futures = submit()
        wait(futures)
        for _ in range(cycles):
            ready = stack(futures)
            futures = submit()
            engine.infer(ready)
            wait(futures)

    modes = {"infer": infer, "decode": decode, "phased": phased, "overlap": overlap}
    ms = {k: [] for k in modes}
    for r in range(rounds):
        for name, fn in modes.items():
            started = time.perf_counter()
            fn()
            ms[name].append((time.perf_counter() - started) / cycles * 1000)
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.0f} ms" for k, v in ms.items()), flush=True)
    med = {k: statistics.median(v) for k, v in ms.items()}
    medians = ", ".join(f"{k} {v:.0f}" for k, v in med.items())
    print(f"batch {batch} spin={spin} median ms/cycle: {medians}")
    print(
        f"throughput vs inference alone: phased {med['infer'] / med['phased']:.3f}, "
        f"overlap {med['infer'] / med['overlap']:.3f}, "
        f"serial sum {med['infer'] / (med['infer'] + med['decode']):.3f}"
    )


if __name__ == "__main__":
    main()
