"""Pick the fastest backend this machine can run for a bundle (DESIGN.md Stage 3 order)."""

from __future__ import annotations

import logging
from typing import Any

from engine_build.bundle import Bundle
from engine_build.runtime.base import (
    Engine,
    EngineLoadError,
    EngineUnavailableError,
    PlanMismatchError,
    first_line,
)

log = logging.getLogger(__name__)

BACKENDS = ("auto", "tensorrt", "torch-cuda", "torch-cpu", "onnxruntime")
# torch-cpu is not in auto: bfloat16 changes the answers (parity.json measures by how much), so
# an operator opts in, as for onnxruntime int8
AUTO_ORDER = ("tensorrt", "torch-cuda", "onnxruntime")


def _open(bundle: Bundle, backend: str, opts: dict[str, Any]) -> Engine:
    if backend in ("tensorrt", "torch-cuda"):
        return _open_gpu(bundle, backend, opts)
    if backend == "torch-cpu":
        from engine_build.runtime.torch_cpu import TorchCpuEngine

        return TorchCpuEngine(bundle, **opts)
    from engine_build.runtime.onnxruntime_engine import OnnxRuntimeEngine

    return OnnxRuntimeEngine(bundle, **opts)


def _out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is CUDA running out of memory: torch.OutOfMemoryError (an allocation), or
    torch.AcceleratorError whose message says "out of memory" (cudaErrorMemoryAllocation while
    creating the CUDA context or in a first allocation on a full GPU). Nothing else."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    accelerator_error = getattr(torch, "AcceleratorError", None)  # torch >= 2.8
    return (
        accelerator_error is not None
        and isinstance(exc, accelerator_error)
        and "out of memory" in str(exc).lower()
    )


def _open_gpu(bundle: Bundle, backend: str, opts: dict[str, Any]) -> Engine:
    """A CUDA backend; running out of GPU memory while loading it is an EngineLoadError.

    What a load allocates (and so what this covers): the CUDA context; for TensorRT its engine,
    its execution context (activation memory for the profile's largest shape) and the device
    buffers for ``max_batch``; for torch-cuda only the FP16 weights (its activation memory is
    taken by the first batches: the worker's warm-up, after this). Out of memory there is
    torch.OutOfMemoryError or a torch.AcceleratorError saying "out of memory"; only those are
    turned into a load failure: any other exception is a bug and propagates.
    """
    try:
        if backend == "tensorrt":
            from engine_build.runtime.tensorrt_engine import TensorRTEngine

            return TensorRTEngine(bundle, **opts)
        from engine_build.runtime.torch_cuda import TorchCudaEngine

        return TorchCudaEngine(bundle, **opts)
    except Exception as exc:
        if not _out_of_memory(exc):
            raise
        raise EngineLoadError(
            f"out of GPU memory loading {backend} for max batch {bundle.manifest.batch_profile.max}"
            f" ({first_line(exc)}); free the GPU, run fewer engine instances or build with a "
            "smaller --max-batch"
        ) from exc


# the options each backend takes; precision fp32 (the worker passes none: bf16) or bf16 to
# torch-cpu, where int8 is refused
BACKEND_OPTIONS: dict[str, frozenset[str]] = {
    "tensorrt": frozenset(),
    "torch-cuda": frozenset({"cuda_graphs"}),
    "torch-cpu": frozenset({"threads", "precision"}),
    "onnxruntime": frozenset({"precision", "threads", "spinning"}),
}


def options_for(backend: str, opts: dict[str, Any]) -> dict[str, Any]:
    """The part of ``opts`` that ``backend`` (not ``auto``) takes."""
    return {k: v for k, v in opts.items() if k in BACKEND_OPTIONS[backend]}


def backend_of(engine: Engine) -> str:
    """The backend ``engine`` runs on (its name is the backend plus a precision or variant)."""
    for backend in BACKENDS[1:]:
        if engine.name == backend or engine.name.startswith(backend + "-"):
            return backend
    raise ValueError(f"engine {engine.name!r} names no backend of {', '.join(BACKENDS[1:])}")


def create_engine(bundle: Bundle, backend: str = "auto", **opts: Any) -> Engine:
    """The engine for ``backend``; ``auto`` tries TensorRT, then torch-cuda, then ONNX Runtime.

    Options go to the backend that accepts them (``threads``/``precision``/``spinning`` to
    onnxruntime, ``threads``/``precision`` to torch-cpu, ``cuda_graphs`` to torch-cuda). An
    explicitly named backend that cannot run raises EngineUnavailableError (PlanMismatchError
    for a plan built for another GPU/TensorRT or whose profile does not cover the manifest's,
    EngineLoadError when it ran out of GPU memory loading or TensorRT could not deserialise its
    plan); ``auto`` logs those two as WARNINGs and tries the next backend. An artifact that does
    not fit the manifest (an ONNX model or a TensorRT plan whose inputs/outputs differ from it, a
    ``model.pt`` that does not load) raises ArtifactMismatchError under any backend, ``auto``
    included: the bundle is wrong, and no other backend of it is tried.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    accepted = BACKEND_OPTIONS
    if backend != "auto":
        ignored = sorted(set(opts) - accepted[backend])
        if ignored:  # e.g. ONNX Runtime threads set in a config shared with GPU workers
            log.info("backend %s ignores options %s", backend, ", ".join(ignored))
        return _open(bundle, backend, {k: v for k, v in opts.items() if k in accepted[backend]})
    reasons = []
    for candidate in AUTO_ORDER:
        kwargs = {k: v for k, v in opts.items() if k in accepted[candidate]}
        try:
            engine = _open(bundle, candidate, kwargs)
        except (PlanMismatchError, EngineLoadError) as exc:  # not the usual "no GPU here"
            log.warning("backend %s refused: %s; trying the next", candidate, exc)
            reasons.append(f"{candidate}: {exc}")
            continue
        except EngineUnavailableError as exc:
            log.info("backend %s unavailable: %s; trying the next", candidate, exc)
            reasons.append(f"{candidate}: {exc}")
            continue
        log.info("auto backend: %s", engine.name)
        return engine
    raise EngineUnavailableError(f"no backend can run bundle {bundle.path} ({'; '.join(reasons)})")
