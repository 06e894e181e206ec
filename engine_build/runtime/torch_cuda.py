"""PyTorch on CUDA in FP16: the GPU backend when TensorRT is missing or its plan does not fit."""

from __future__ import annotations

import logging

import numpy as np
import torch

from engine_build.bundle import Bundle
from engine_build.runtime.base import (
    EngineUnavailableError,
    InputSpec,
    check_batch,
    check_device_batch,
    input_spec_of,
)
from engine_build.runtime.torch_model import load_torch_model

log = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    """Powers of two up to ``max_batch`` (and max_batch itself): one CUDA graph each."""
    buckets, b = [], 1
    while b < max_batch:
        buckets.append(b)
        b *= 2
    return [*buckets, max_batch]


def bucket_for(n: int, buckets: list[int]) -> int:
    return next(b for b in buckets if b >= n)


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` with its index: ``cuda`` is the current CUDA device, ``cuda:0`` say.

    Tensors always carry an index (``torch.device("cuda") != torch.device("cuda:0")``), so an
    engine whose ``device`` lacked one would refuse every batch made on its GPU (the worker
    decodes onto ``engine.device``) as being on another device.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class TorchCudaEngine:
    """FP16, channels_last ResNet from the bundle's ``model.pt``; CUDA graphs per batch bucket.

    Each instance runs on a CUDA stream of its own, so the worker's engine instances (one per
    inference thread) overlap on the GPU instead of queueing on the default stream.
    """

    def __init__(self, bundle: Bundle, cuda_graphs: bool = False, device: str = "cuda"):
        if not torch.cuda.is_available():
            raise EngineUnavailableError("torch-cuda needs a CUDA GPU; torch sees none")
        model, _ = load_torch_model(bundle)
        m = bundle.manifest
        self._device = resolve_device(device)
        self.device = self._device
        self._model = model.to(self._device, dtype=torch.float16, memory_format=torch.channels_last)
        self.name = "torch-cuda-fp16" + ("-graphs" if cuda_graphs else "")
        self.max_batch = m.batch_profile.max
        self._spec = input_spec_of(bundle)
        self._buckets = batch_buckets(self.max_batch)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._cuda_graphs = cuda_graphs
        self._stream = torch.cuda.Stream(self._device)
        # pinned staging buffer: host-to-device copies of numpy batches run at full PCIe speed
        self._h_in = torch.empty(
            (self.max_batch, *self._spec.shape), dtype=torch.float32, pin_memory=True
        )
        log.info("loaded %s on %s", self.name, torch.cuda.get_device_name(self._device))

    def input_spec(self) -> InputSpec:
        return self._spec

    def warm_up(self, max_batch: int) -> None:
        """Run (and with CUDA graphs, capture) every bucket a batch of up to ``max_batch`` uses.

        Capturing later, mid-stream, would prohibit other threads' CUDA calls during the capture
        (the default global capture mode): the worker warms up before it takes partitions.
        """
        for n in batch_buckets(min(max_batch, self.max_batch)):
            self.infer(np.zeros((n, *self._spec.shape), dtype=np.float32))

    def _graph(self, bucket: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        """Capture (once) a CUDA graph for ``bucket`` images with static in/out buffers."""
        if bucket not in self._graphs:
            static_in = torch.zeros(
                (bucket, *self._spec.shape), device=self._device, dtype=torch.float16
            ).contiguous(memory_format=torch.channels_last)
            # warm-up on a side stream, as the CUDA graphs docs ask, and capture on that same
            # stream (as make_graphed_callables does): libraries' per-stream handles and
            # workspaces are made before the capture, and no instance shares torch.cuda.graph's
            # process-wide default capture stream
            stream = torch.cuda.Stream(self._device)
            stream.wait_stream(torch.cuda.current_stream(self._device))
            with torch.cuda.stream(stream), torch.inference_mode():
                for _ in range(3):
                    self._model(static_in)
            torch.cuda.current_stream(self._device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream), torch.inference_mode():
                static_out = self._model(static_in)
            self._graphs[bucket] = (graph, static_in, static_out)
        return self._graphs[bucket]

    @torch.inference_mode()
    def infer(self, batch: np.ndarray) -> np.ndarray:
        batch = check_batch(batch, self._spec, self.max_batch)
        n = batch.shape[0]
        self._h_in[:n].copy_(torch.from_numpy(batch))
        with torch.cuda.stream(self._stream):
            return self._run(self._h_in[:n].to(self._device, non_blocking=True))

    @torch.inference_mode()
    def infer_device(self, batch: torch.Tensor) -> np.ndarray:
        """Logits for a float32 NCHW batch already on this engine's GPU (no host round trip)."""
        check_device_batch(batch, self._spec, self.max_batch, self._device)
        # the batch was made on the caller's stream: order our work after it
        self._stream.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(self._stream):
            return self._run(batch)

    def _run(self, x: torch.Tensor) -> np.ndarray:
        """Logits on this engine's stream; the blocking copy to the host syncs only that stream,
        so the pinned staging buffer and the caller's batch are free again on return."""
        n = x.shape[0]
        x = x.half()
        if self._cuda_graphs:
            graph, static_in, static_out = self._graph(bucket_for(n, self._buckets))
            static_in[:n].copy_(x)
            graph.replay()
            out = static_out[:n]
        else:
            out = self._model(x.contiguous(memory_format=torch.channels_last))
        return out.float().cpu().numpy()

    def close(self) -> None:
        self._graphs.clear()
        self._model = None
