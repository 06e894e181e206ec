"""TensorRT 10 plan execution: execute_async_v3 on a CUDA stream with buffers allocated once.

``tensorrt`` is imported lazily so CPU machines never need it; device and pinned host buffers
come from torch.cuda, so no pycuda is needed either.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from engine_build.bundle import Bundle
from engine_build.manifest import Artifact
from engine_build.runtime.base import (
    EngineUnavailableError,
    InputSpec,
    PlanMismatchError,
    check_batch,
    check_device_batch,
    input_spec_of,
)

log = logging.getLogger(__name__)


def import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise EngineUnavailableError(
            "tensorrt is not installed (pip install 'carstream[gpu]')"
        ) from exc
    return trt


def plan_mismatch(artifact: Artifact, gpu_name: str, trt_version: str) -> str | None:
    """Why a plan cannot run on ``gpu_name`` with TensorRT ``trt_version``; None when it fits."""
    info = artifact.tensorrt
    if info is None:
        return f"plan {artifact.file} records no GPU/TensorRT version"
    reasons = []
    if info.gpu_name != gpu_name:
        reasons.append(f"built for GPU {info.gpu_name!r}, this is {gpu_name!r}")
    if info.version != trt_version:
        reasons.append(f"built with TensorRT {info.version}, this is TensorRT {trt_version}")
    return f"plan {artifact.file} " + "; ".join(reasons) if reasons else None


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    return {trt.float32: torch.float32, trt.float16: torch.float16}[dtype]


class TensorRTEngine:
    """Runs ``model.fp16.plan``; refuses (PlanMismatchError) a plan for another GPU or TRT."""

    def __init__(self, bundle: Bundle, precision: str = "fp16", device: int = 0):
        plans = [
            a
            for a in bundle.manifest.artifacts
            if a.backend == "tensorrt" and a.precision == precision
        ]
        if not plans:
            raise EngineUnavailableError(f"bundle {bundle.path} has no TensorRT {precision} plan")
        if not torch.cuda.is_available():
            raise EngineUnavailableError("TensorRT needs a CUDA GPU; torch sees none")
        trt = import_tensorrt()
        gpu = torch.cuda.get_device_name(device)
        reasons = [plan_mismatch(a, gpu, trt.__version__) for a in plans]
        if all(reasons):  # a bundle may carry one plan per GPU type; one must fit this GPU
            raise PlanMismatchError("; ".join(r for r in reasons if r))
        artifact = plans[reasons.index(None)]
        m = bundle.manifest
        self.name = f"tensorrt-{precision}"
        self.max_batch = m.batch_profile.max
        self._min_batch = m.batch_profile.min
        self._spec = input_spec_of(bundle)
        self._device = torch.device("cuda", device)
        self.device = self._device
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(
            bundle.artifact_path(artifact).read_bytes()
        )
        if self._engine is None:
            raise EngineUnavailableError(f"TensorRT could not deserialize {artifact.file}")
        self._context = self._engine.create_execution_context()
        self._stream = torch.cuda.Stream(self._device)
        self._in_name, self._out_name = m.input_name, m.output_name
        in_dtype = _torch_dtype(trt, self._engine.get_tensor_dtype(self._in_name))
        out_dtype = _torch_dtype(trt, self._engine.get_tensor_dtype(self._out_name))
        full_in = (self.max_batch, *self._spec.shape)
        full_out = (self.max_batch, m.num_classes)
        self._d_in = torch.empty(full_in, dtype=in_dtype, device=self._device)
        self._d_out = torch.empty(full_out, dtype=out_dtype, device=self._device)
        self._h_in = torch.empty(full_in, dtype=torch.float32, pin_memory=True)
        self._h_out = torch.empty(full_out, dtype=torch.float32, pin_memory=True)
        self._context.set_tensor_address(self._in_name, self._d_in.data_ptr())
        self._context.set_tensor_address(self._out_name, self._d_out.data_ptr())
        log.info("loaded %s (%s, TensorRT %s)", self.name, artifact.file, trt.__version__)

    def input_spec(self) -> InputSpec:
        return self._spec

    def infer(self, batch: np.ndarray) -> np.ndarray:
        batch = check_batch(batch, self._spec, self.max_batch)
        n = batch.shape[0]
        self._h_in[:n].copy_(torch.from_numpy(batch))
        with torch.cuda.stream(self._stream):
            self._d_in[:n].copy_(self._h_in[:n], non_blocking=True)
        return self._execute(n)

    def infer_device(self, batch: torch.Tensor) -> np.ndarray:
        """Logits for a float32 NCHW batch already on this engine's GPU (no host round trip)."""
        check_device_batch(batch, self._spec, self.max_batch, self._device)
        n = batch.shape[0]
        # the batch was made on the caller's stream: order our copy after it
        self._stream.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(self._stream):
            self._d_in[:n].copy_(batch)
        return self._execute(n)

    def _execute(self, n: int) -> np.ndarray:
        """Run the plan on the first ``n`` rows of the device input buffer."""
        run_n = max(n, self._min_batch)  # pad up to the profile's minimum shape
        with torch.cuda.stream(self._stream):
            if run_n > n:
                self._d_in[n:run_n].zero_()
            self._context.set_input_shape(self._in_name, (run_n, *self._spec.shape))
            if not self._context.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeError(f"{self.name}: execute_async_v3 failed")
            self._h_out[:run_n].copy_(self._d_out[:run_n], non_blocking=True)
        self._stream.synchronize()
        return self._h_out[:n].numpy().copy()

    def close(self) -> None:
        self._context = None
        self._engine = None
