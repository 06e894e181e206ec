"""The worker (or the per-message peer) with its engine replaced by a stand-in for a GPU.

On a machine without a GPU this shows how a loop behaves when its engine is fast and off the
CPU: the stand-in keeps the bundle's input spec and batch size, checks every batch like the
real engines, and answers each ``infer`` call after ``SIM_BATCH_MS + n * SIM_IMAGE_MS``
milliseconds of sleeping (no CPU, the GIL released), with random logits. Decoding, Kafka and
Redis are the real ones. It also has ``infer_device``, like the CUDA engines, so the worker's
``overlap=auto`` takes the same loop it would take on a GPU (set CARSTREAM_OVERLAP to choose).

With CARSTREAM_GPU_DECODE=true the worker takes its GPU-decode path: the decode threads only
parse posts and check JPEG headers (the real code), and nvJPEG's batched decode, the resize and
the normalisation on the device are stood in for by a sleep of ``SIM_DECODE_MS`` per image and
blank CPU tensors of the crop's size. That measures the one thing a GPU worker's sizing needs
and no CPU machine otherwise shows: how many posts one worker process's CPU side (Kafka,
parsing, header checks, publishing, counting, all sharing Python's GIL) can feed a GPU.

    SIM_BATCH_MS=2 SIM_IMAGE_MS=0.3 CARSTREAM_BUNDLE=... python benchmarks/sim_engine.py worker
    python benchmarks/e2e_throughput.py --sim-engine 2,0.3 --images thumb
    python benchmarks/worker_ab.py --sim-engine 2,0.3 --config on:CARSTREAM_OVERLAP=on ...

The defaults (2 ms per call + 0.3 ms per image: ~2,700 images/s at batch 32; 0.1 ms per image of
GPU decoding, ~10,000 images/s) are of the order of ResNet-50 FP16 and nvJPEG on a data-centre
GPU; they are a stand-in, not a measurement of one.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))  # after PYTHONPATH: worker_ab's SRC=DIR runs another checkout's worker

import engine_build.runtime as runtime  # noqa: E402
from engine_build.runtime.base import check_batch  # noqa: E402

BATCH_MS = float(os.environ.get("SIM_BATCH_MS", "2"))
IMAGE_MS = float(os.environ.get("SIM_IMAGE_MS", "0.3"))
DECODE_MS = float(os.environ.get("SIM_DECODE_MS", "0.1"))


class SleepEngine:
    """An engine that spends no CPU: the time a GPU would take, slept."""

    def __init__(self, real, batch_ms: float = BATCH_MS, image_ms: float = IMAGE_MS) -> None:
        self.max_batch = real.max_batch
        self._spec = real.input_spec()
        self._classes = int(real.infer(np.zeros((1, *self._spec.shape), np.float32)).shape[1])
        real.close()
        self.batch_ms, self.image_ms = batch_ms, image_ms
        self.name = f"sim({batch_ms:g} ms + {image_ms:g} ms/image)"
        self._rng = np.random.default_rng(0)

    def input_spec(self):
        return self._spec

    def infer(self, batch: np.ndarray) -> np.ndarray:
        batch = check_batch(batch, self._spec, self.max_batch)
        time.sleep((self.batch_ms + len(batch) * self.image_ms) / 1000.0)
        return self._rng.standard_normal((len(batch), self._classes)).astype(np.float32)

    device = "cpu"  # where the GPU-decode path puts its tensors (worker.pipeline reads it)

    def infer_device(self, batch):
        """The GPU-decode path's call: a float32 NCHW torch tensor on ``device``."""
        return self.infer(batch.numpy())

    def close(self) -> None:
        pass


def stand_in_gpu_decode(pipeline, decode_ms: float = DECODE_MS) -> None:
    """Replace the pipeline's nvJPEG decode, device preprocessing and batch stacking
    with a sleep and one preallocated blank batch (used only with CARSTREAM_GPU_DECODE=true).

    The stand-ins cost no CPU beyond their Python calls: on a GPU those steps are kernel
    launches (a few per image, some microseconds each), which this leaves out.
    """
    import torch

    torch.set_num_threads(1)  # no intra-op pool spinning beside the worker's threads
    blank = {"batch": torch.zeros((0, 3, 0, 0))}

    def blank_batch(n: int, crop: int) -> torch.Tensor:
        if blank["batch"].shape[0] < n or blank["batch"].shape[-1] != crop:
            blank["batch"] = torch.zeros((max(n, 64), 3, crop, crop), dtype=torch.float32)
        return blank["batch"][:n]

    def decode_jpegs(jpegs, device):
        time.sleep(len(jpegs) * decode_ms / 1000.0)
        return [None] * len(jpegs)

    def preprocess_rows(images, spec, orientations=None):
        row = blank_batch(1, spec.crop)[0]
        return dict.fromkeys(images, row), []

    def torch_stack(rows):
        return blank_batch(len(rows), rows[0].shape[-1])

    pipeline.decode_jpegs, pipeline.preprocess_rows = decode_jpegs, preprocess_rows
    pipeline.torch_stack = torch_stack


def main(argv: list[str]) -> int:
    target = argv[0] if argv else "worker"
    real_create = runtime.create_engine

    def create_engine(bundle, backend="auto", **opts):
        opts.pop("cuda_graphs", None)
        return SleepEngine(real_create(bundle, "onnxruntime", **opts))

    runtime.create_engine = create_engine  # what worker.run and peer_consumer import
    if target == "peer":
        sys.path.insert(0, str(Path(__file__).parent))
        import peer_consumer

        return peer_consumer.main(argv[1:])
    if target != "worker":
        print(f"sim_engine.py: error: unknown target {target!r} (worker or peer)", file=sys.stderr)
        return 2
    if os.environ.get("CARSTREAM_GPU_DECODE", "").lower() in ("1", "true", "yes", "on"):
        import worker.pipeline

        stand_in_gpu_decode(worker.pipeline)
    import worker.supervisor

    # with CARSTREAM_PROCESSES > 1 the children run this stand-in too
    worker.supervisor.CHILD_COMMAND = [sys.executable, str(Path(__file__).resolve()), "worker"]
    from worker.__main__ import main as worker_main

    return worker_main(["run"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
