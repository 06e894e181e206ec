"""ONNX -> TensorRT FP16 plan through the TensorRT 10 Python API, Polygraphy-style: every parser
error and every I/O tensor is logged, and a null engine fails loudly.

FP16 uses a *strongly typed* network (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``) over an
ONNX graph that is FP16 inside with FP32 I/O: TensorRT deprecated weak typing (``BuilderFlag.FP16``
precision hints) in 10.12 and removes it in 11. Every TensorRT the project pins (>=10.3,<12) has
the flag, so there is no weak-typing fallback: a TensorRT without it is refused. TensorRT's own
messages reach Python logging through the one process-wide logger of
:func:`engine_build.runtime.tensorrt_engine.tensorrt_logger`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine_build.manifest import BatchProfile, TensorRTInfo
from engine_build.runtime.tensorrt_engine import (
    import_tensorrt,
    tensorrt_logger,
    trt_errors,
)
from training.checkpoint import atomic_write_bytes

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


def _log_io(network: Any, input_name: str) -> None:
    """Log every network input and output; raise unless ``input_name`` is one of the inputs."""
    inputs = []
    for i in range(network.num_inputs):
        t = network.get_input(i)
        inputs.append(t.name)
        log.info("TensorRT input  %s shape=%s dtype=%s", t.name, tuple(t.shape), t.dtype)
    for i in range(network.num_outputs):
        t = network.get_output(i)
        log.info("TensorRT output %s shape=%s dtype=%s", t.name, tuple(t.shape), t.dtype)
    if input_name not in inputs:
        found = ", ".join(inputs) or "none"
        raise TensorRTBuildError(f"the parsed network has no input {input_name!r} (has: {found})")


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
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is None:  # every TensorRT of the pin (>=10.3,<12) has it
        raise TensorRTBuildError(
            f"TensorRT {trt.__version__} has no NetworkDefinitionCreationFlag.STRONGLY_TYPED, "
            "which the FP16 build needs (install tensorrt>=10.3,<12)"
        )
    logger = tensorrt_logger(trt)
    mark = logger.mark()
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(strongly_typed))
    parser = trt.OnnxParser(network, logger)
    parsed = parser.parse_from_file(str(onnx_path))
    errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
    for err in errors:
        log.error("TensorRT ONNX parser: %s", err)
    if not parsed or errors:  # as Polygraphy: any parser error fails, whatever parse returned
        raise TensorRTBuildError(
            f"TensorRT could not parse {onnx_path}: {len(errors)} error(s); first: "
            f"{errors[0] if errors else trt_errors(logger, mark)}"
        )
    _log_io(network, input_name)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    opt_profile = builder.create_optimization_profile()
    chw = (3, image_size, image_size)
    opt_profile.set_shape(input_name, (profile.min, *chw), (profile.opt, *chw), (profile.max, *chw))
    if config.add_optimization_profile(opt_profile) < 0:
        raise TensorRTBuildError(
            f"TensorRT rejected the optimisation profile {profile.min}/{profile.opt}/{profile.max} "
            f"for {input_name!r}: {trt_errors(logger, mark)}"
        )

    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    try:
        cache = config.create_timing_cache(cache_bytes)
    except Exception as exc:  # a damaged file: TensorRT's binding raises or returns None
        log.error("TensorRT could not read timing cache %s: %s", timing_cache, exc)
        cache = None
    # set_timing_cache returns False for a cache from another TensorRT version or GPU
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise TensorRTBuildError(
            f"timing cache {timing_cache or '(new)'} cannot be used here (damaged, or made by "
            f"another TensorRT version or GPU type?): {trt_errors(logger, mark)}; delete it or "
            "pass another --timing-cache"
        )
    log.info(
        "timing cache: %s", f"{timing_cache} ({len(cache_bytes)} bytes)" if cache_bytes else "new"
    )

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTBuildError(
            f"TensorRT returned no engine for {onnx_path}: {trt_errors(logger, mark)}"
        )
    if timing_cache:
        saved = config.get_timing_cache()
        if saved is None:
            log.warning("TensorRT has no timing cache to save to %s", timing_cache)
        else:
            # atomically (a build killed mid-write must not leave a cache the next build refuses),
            # and a cache that cannot be saved costs the next build time, not this build's plan
            try:
                timing_cache.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(timing_cache, bytes(saved.serialize()))
            except OSError as exc:
                log.error("timing cache not saved to %s: %s", timing_cache, exc)
            else:
                log.info("timing cache saved to %s", timing_cache)
    gpu_name, capability = gpu_identity()
    info = TensorRTInfo(
        version=trt.__version__,
        gpu_name=gpu_name,
        compute_capability=capability,
        typing="strong",
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
