"""ONNX -> TensorRT FP16 plan through the TensorRT 10 Python API, Polygraphy-style: every parser
error and every I/O tensor is logged, and a null engine fails loudly.

FP16 uses a *strongly typed* network (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``) over an
ONNX graph that is FP16 inside with FP32 I/O: TensorRT deprecated weak typing (``BuilderFlag.FP16``
precision hints) in 10.12 and removes it in 11. TensorRT builds older than the flag fall back to
weak typing, and the manifest records which one was used.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine_build.manifest import BatchProfile, TensorRTInfo
from engine_build.runtime.tensorrt_engine import import_tensorrt

log = logging.getLogger(__name__)


class TensorRTBuildError(RuntimeError):
    """The ONNX parser or the builder failed; details are in the log and the message."""


@dataclass(frozen=True)
class PlanBuild:
    plan: bytes
    info: TensorRTInfo


def tensorrt_available() -> str | None:
    """None when a plan can be built here, else why not (for logs and skip reasons)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA GPU visible to torch"
        import_tensorrt()
    except Exception as exc:
        return str(exc)
    return None


def gpu_identity(device: int = 0) -> tuple[str, str]:
    """(GPU name, compute capability 'major.minor') as recorded in the manifest."""
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"{major}.{minor}"


def _log_io(network: Any) -> None:
    for i in range(network.num_inputs):
        t = network.get_input(i)
        log.info("TensorRT input  %s shape=%s dtype=%s", t.name, tuple(t.shape), t.dtype)
    for i in range(network.num_outputs):
        t = network.get_output(i)
        log.info("TensorRT output %s shape=%s dtype=%s", t.name, tuple(t.shape), t.dtype)


def build_fp16_plan(
    onnx_path: Path,
    input_name: str,
    image_size: int,
    profile: BatchProfile,
    workspace_gb: float = 4.0,
    timing_cache: Path | None = None,
) -> PlanBuild:
    """Build a FP16 plan for ``onnx_path`` (FP16 graph, FP32 I/O) over the batch profile."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strong = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strong else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        for err in errors:
            log.error("TensorRT ONNX parser: %s", err)
        raise TensorRTBuildError(
            f"TensorRT could not parse {onnx_path}: {len(errors)} error(s); first: "
            f"{errors[0] if errors else 'unknown'}"
        )
    _log_io(network)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if not strong:
        config.set_flag(trt.BuilderFlag.FP16)
    opt_profile = builder.create_optimization_profile()
    chw = (3, image_size, image_size)
    opt_profile.set_shape(input_name, (profile.min, *chw), (profile.opt, *chw), (profile.max, *chw))
    config.add_optimization_profile(opt_profile)

    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    log.info(
        "timing cache: %s", f"{timing_cache} ({len(cache_bytes)} bytes)" if cache_bytes else "new"
    )

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTBuildError(f"TensorRT returned no engine for {onnx_path} (see log above)")
    if timing_cache:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
        log.info("timing cache saved to %s", timing_cache)
    gpu_name, capability = gpu_identity()
    info = TensorRTInfo(
        version=trt.__version__,
        gpu_name=gpu_name,
        compute_capability=capability,
        typing="strong" if strong else "weak",
        timing_cache=str(timing_cache) if timing_cache else None,
    )
    log.info(
        "TensorRT %s FP16 plan for %s (sm %s), %s typing",
        info.version,
        gpu_name,
        capability,
        info.typing,
    )
    return PlanBuild(plan=bytes(serialized), info=info)
