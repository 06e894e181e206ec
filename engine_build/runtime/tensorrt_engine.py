"""TensorRT 10 plan execution: execute_async_v3 on a CUDA stream with buffers allocated once.

``tensorrt`` is imported lazily so CPU machines never need it; device and pinned host buffers
come from torch.cuda, so no pycuda is needed either.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

import numpy as np
import torch

from engine_build.bundle import Bundle
from engine_build.manifest import Artifact, BatchProfile
from engine_build.runtime.base import (
    ArtifactMismatchError,
    EngineLoadError,
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


_LOGGERS: dict[int, Any] = {}
_LOGGERS_LOCK = threading.Lock()


def tensorrt_logger(trt: Any) -> Any:
    """The one ``trt.ILogger`` of this process, forwarding TensorRT's messages to Python logging.

    TensorRT keeps a single logger pointer for the whole library ("if using multiple builder or
    runtime objects, use the same logger, and ensure that it is thread-safe"), so every Builder and
    Runtime here shares this one. Errors are also kept (the last 50), so that a failed build or
    deserialisation can name TensorRT's own reason in its exception, not only on stderr.
    """
    with _LOGGERS_LOCK:
        if id(trt) not in _LOGGERS:
            _LOGGERS[id(trt)] = _make_logger(trt)
        return _LOGGERS[id(trt)]


def _make_logger(trt: Any) -> Any:
    errors = (trt.Logger.INTERNAL_ERROR, trt.Logger.ERROR)
    levels = {trt.Logger.WARNING: logging.WARNING, trt.Logger.INFO: logging.DEBUG}
    trt_log = logging.getLogger("tensorrt")

    class PythonLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self._lock = threading.Lock()
            self._errors: list[str] = []
            self._count = 0

        def log(self, severity: Any, msg: str) -> None:  # called by TensorRT: must not raise
            try:
                if severity in errors:
                    trt_log.error("%s", msg)
                    with self._lock:
                        self._errors = [*self._errors[-49:], msg]
                        self._count += 1
                elif severity in levels:
                    trt_log.log(levels[severity], "%s", msg)
            except Exception:  # a logging failure must not reach TensorRT
                pass

        def mark(self) -> int:
            """A position; :meth:`errors_since` returns the errors logged after it."""
            with self._lock:
                return self._count

        def errors_since(self, mark: int) -> list[str]:
            with self._lock:
                n = self._count - mark
                return self._errors[-n:] if n > 0 else []

    return PythonLogger()


def trt_errors(logger: Any, mark: int) -> str:
    """TensorRT's errors logged since ``mark``, for an exception message."""
    errors = logger.errors_since(mark)
    return "; ".join(errors) if errors else "no TensorRT error logged"


_MIG_SUFFIX = re.compile(r"\s+MIG\b.*$")


def base_gpu_name(name: str) -> str:
    """``name`` without a MIG profile suffix: "NVIDIA A100-SXM4-80GB MIG 1g.10gb" -> the GPU's."""
    return _MIG_SUFFIX.sub("", name.strip())


def plan_mismatch(
    artifact: Artifact,
    gpu_name: str,
    trt_version: str,
    compute_capability: str | None = None,
) -> str | None:
    """Why a plan cannot run on ``gpu_name`` with TensorRT ``trt_version``; None when it fits.

    A plan is specific to the GPU model (its SM architecture) and the TensorRT version. MIG slices
    of one GPU share its SMs' architecture, so the GPU names are compared without a " MIG ..."
    suffix (a plan built on a whole A100 runs on an A100 MIG slice and the other way round: only
    memory and SM count differ, which TensorRT warns about, see :func:`mig_difference`), and the
    compute capability too where both sides know it.
    """
    info = artifact.tensorrt
    if info is None:
        return f"plan {artifact.file} records no GPU/TensorRT version"
    reasons = []
    if base_gpu_name(info.gpu_name) != base_gpu_name(gpu_name):
        reasons.append(f"built for GPU {info.gpu_name!r}, this is {gpu_name!r}")
    elif (
        compute_capability
        and info.compute_capability
        and info.compute_capability != compute_capability
    ):
        reasons.append(
            f"built for compute capability {info.compute_capability} ({info.gpu_name!r}), "
            f"this is {compute_capability} ({gpu_name!r})"
        )
    if info.version != trt_version:
        reasons.append(f"built with TensorRT {info.version}, this is TensorRT {trt_version}")
    return f"plan {artifact.file} " + "; ".join(reasons) if reasons else None


def mig_difference(artifact: Artifact, gpu_name: str) -> str | None:
    """For a plan that fits (:func:`plan_mismatch` is None): how its MIG profile differs, if it
    does. It runs, but its tactics were timed for another SM count and memory size: slower, and a
    smaller slice may lack the memory for the plan's maximum batch."""
    info = artifact.tensorrt
    if info is None or info.gpu_name.strip() == gpu_name.strip():
        return None
    return (
        f"plan {artifact.file} was built on {info.gpu_name!r} and runs on {gpu_name!r}: same GPU "
        "model, another MIG profile (TensorRT may warn; build on this profile for its best "
        "tactics and to be sure the maximum batch fits its memory)"
    )


def plan_io(
    trt: Any,
    engine: Any,
    input_name: str,
    output_name: str,
    sample_shape: tuple[int, ...],
    num_classes: int,
    where: str = "the TensorRT plan",
) -> tuple[torch.dtype, torch.dtype]:
    """Log every I/O tensor of a deserialised plan and check them against the manifest.

    TensorRT does not fail on a wrong name: ``get_tensor_dtype`` answers FLOAT and
    ``get_tensor_shape`` an empty shape for a name the plan lacks, so the checks are made here,
    over ``num_io_tensors``/``get_tensor_name``/``get_tensor_mode``. Returns the torch dtypes of the
    input and the output; raises ArtifactMismatchError naming every difference, after ``where``
    (e.g. "bundle DIR: model.fp16.plan"). The plan's sha256 matched the manifest, so the bundle
    was built or edited wrong: as for an ONNX model that does not fit, the bundle is refused and
    ``auto`` does not fall back to another backend (unlike a plan for another GPU, or one whose
    profile does not cover the manifest's: PlanMismatchError, see :func:`plan_profile`).
    """
    dtypes = {trt.float32: torch.float32, trt.float16: torch.float16}
    found = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = engine.get_tensor_mode(name)
        shape = tuple(engine.get_tensor_shape(name))
        dtype = engine.get_tensor_dtype(name)
        kind = "input " if mode == trt.TensorIOMode.INPUT else "output"
        log.info("TensorRT plan %s %s shape=%s dtype=%s", kind, name, shape, dtype)
        found[name] = (mode, shape, dtype)
    expected = {
        input_name: (trt.TensorIOMode.INPUT, (-1, *sample_shape)),
        output_name: (trt.TensorIOMode.OUTPUT, (-1, num_classes)),
    }
    problems = [f"unexpected I/O tensor {name!r}" for name in found if name not in expected]
    for name, (mode, shape) in expected.items():
        role = "input" if mode == trt.TensorIOMode.INPUT else "output"
        if name not in found:
            problems.append(f"no {role} {name!r}")
            continue
        got_mode, got_shape, got_dtype = found[name]
        if got_mode != mode:
            problems.append(f"{name!r} is not an {role}")
        if len(got_shape) != len(shape) or got_shape[1:] != shape[1:]:
            problems.append(f"{name!r} has shape {got_shape}, the manifest says {shape}")
        if got_dtype not in dtypes:
            problems.append(f"{name!r} has dtype {got_dtype}, not float32/float16")
    if problems:
        raise ArtifactMismatchError(f"{where} does not fit manifest.json: " + "; ".join(problems))
    return dtypes[found[input_name][2]], dtypes[found[output_name][2]]


def plan_profile(
    engine: Any, input_name: str, sample_shape: tuple[int, ...], manifest: BatchProfile
) -> None:
    """Log the plan's optimisation profile for the input; refuse one that does not cover the
    manifest's.

    The runtime takes batches of 1..``manifest.max`` and pads those below ``manifest.min`` up to
    it, so it only ever sends batches in ``manifest.min..manifest.max``: the plan's profile must
    have min <= the manifest's min, max >= the manifest's max, and the input's (C, H, W). A plan
    that does not (a hand-edited manifest, a plan copied from another build) would fail inside
    TensorRT at ``set_input_shape`` mid-stream, so it is refused here, naming both ranges, as a
    PlanMismatchError (``auto`` warns and falls back). Another ``opt`` only costs speed: a WARNING.
    """
    count = engine.num_optimization_profiles
    if count < 1:
        raise PlanMismatchError("TensorRT plan has no optimisation profile")
    lo, opt, hi = (tuple(s) for s in engine.get_tensor_profile_shape(input_name, 0))
    log.info(
        "TensorRT plan profile 0 of %d for %s: min=%s opt=%s max=%s", count, input_name, lo, opt, hi
    )
    problems = []
    expected = f"(N, {', '.join(map(str, sample_shape))})"
    shapes_ok = all(
        len(s) == 1 + len(sample_shape) and s[1:] == tuple(sample_shape) for s in (lo, opt, hi)
    )
    if not shapes_ok:
        problems.append(f"its profile shapes {lo}/{opt}/{hi} are not {expected}")
    plan_batches = "/".join(str(s[0]) if s else "?" for s in (lo, opt, hi))
    wanted = f"{manifest.min}/{manifest.opt}/{manifest.max}"
    if not (lo and hi and lo[0] <= manifest.min and hi[0] >= manifest.max):
        problems.append(
            f"the plan's batch profile (min/opt/max) is {plan_batches}, the manifest's {wanted}: "
            f"the plan must take every batch of {manifest.min}..{manifest.max}"
        )
    if problems:
        raise PlanMismatchError(
            f"TensorRT plan does not match the bundle manifest: {'; '.join(problems)} "
            "(rebuild the bundle; a plan is only valid with the manifest it was built with)"
        )
    if opt[0] != manifest.opt:
        log.warning(
            "TensorRT plan's batch profile (min/opt/max) is %s, the manifest's %s: it runs, but "
            "its kernels were tuned for batch %d, not %d",
            plan_batches,
            wanted,
            opt[0],
            manifest.opt,
        )


class TensorRTEngine:
    """Runs ``model.fp16.plan``; refuses (PlanMismatchError) a plan for another GPU or TRT, and
    (ArtifactMismatchError: a bad bundle) one whose I/O tensors differ from the manifest's."""

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
        capability = "{}.{}".format(*torch.cuda.get_device_capability(device))
        reasons = [plan_mismatch(a, gpu, trt.__version__, capability) for a in plans]
        if all(reasons):  # a bundle may carry one plan per GPU type; one must fit this GPU
            raise PlanMismatchError("; ".join(r for r in reasons if r))
        fitting = [a for a, r in zip(plans, reasons, strict=True) if r is None]
        # a plan built on this very MIG profile (or the whole GPU) before one from another profile
        artifact = min(fitting, key=lambda a: mig_difference(a, gpu) is not None)
        if (why := mig_difference(artifact, gpu)) is not None:
            log.warning("%s", why)
        m = bundle.manifest
        self.name = f"tensorrt-{precision}"
        self.max_batch = m.batch_profile.max
        self._min_batch = m.batch_profile.min
        self._spec = input_spec_of(bundle)
        self._device = torch.device("cuda", device)
        self.device = self._device
        self._logger = tensorrt_logger(trt)
        mark = self._logger.mark()
        # TensorRT works on the current CUDA device: make it this engine's for every TRT call
        with torch.cuda.device(self._device):
            self._runtime = trt.Runtime(self._logger)
            self._engine = self._runtime.deserialize_cuda_engine(bundle.read_artifact(artifact))
            if self._engine is None:  # out of GPU memory, among other failures
                why = trt_errors(self._logger, mark)
                raise EngineLoadError(
                    f"TensorRT cannot deserialize {artifact.file} (max batch {self.max_batch}; "
                    f"out of GPU memory, or a plan this TensorRT cannot read): {why}"
                )
            self._in_name, self._out_name = m.input_name, m.output_name
            in_dtype, out_dtype = plan_io(
                trt,
                self._engine,
                self._in_name,
                self._out_name,
                self._spec.shape,
                m.num_classes,
                where=f"bundle {bundle.path}: {artifact.file}",
            )
            plan_profile(self._engine, self._in_name, self._spec.shape, m.batch_profile)
            # allocates the activation memory for the profile's largest shape: None is (almost
            # always) a GPU without that much free memory
            self._context = self._engine.create_execution_context()
            if self._context is None:
                why = trt_errors(self._logger, mark)
                raise EngineLoadError(
                    f"TensorRT could not create an execution context for {artifact.file} (max "
                    f"batch {self.max_batch}; usually too little free GPU memory): {why}"
                )
            self._stream = torch.cuda.Stream(self._device)
            self._bind_buffers(in_dtype, out_dtype, m.num_classes)
        log.info("loaded %s (%s, TensorRT %s)", self.name, artifact.file, trt.__version__)

    def _bind_buffers(self, in_dtype: torch.dtype, out_dtype: torch.dtype, classes: int) -> None:
        """Device buffers for ``max_batch`` (pinned host ones beside them), bound to the context.

        Allocated once, here: running out of GPU memory (torch.OutOfMemoryError) fails the load,
        where ``create_engine`` turns it into an EngineLoadError, not the first batch.
        """
        full_in = (self.max_batch, *self._spec.shape)
        full_out = (self.max_batch, classes)
        self._d_in = torch.empty(full_in, dtype=in_dtype, device=self._device)
        self._d_out = torch.empty(full_out, dtype=out_dtype, device=self._device)
        self._h_in = torch.empty(full_in, dtype=torch.float32, pin_memory=True)
        self._h_out = torch.empty(full_out, dtype=torch.float32, pin_memory=True)
        for name, buf in ((self._in_name, self._d_in), (self._out_name, self._d_out)):
            if not self._context.set_tensor_address(name, buf.data_ptr()):
                raise EngineUnavailableError(f"TensorRT refused the address of {name!r}")

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
        mark = self._logger.mark()
        with torch.cuda.device(self._device), torch.cuda.stream(self._stream):
            if run_n > n:
                self._d_in[n:run_n].zero_()
            if not self._context.set_input_shape(self._in_name, (run_n, *self._spec.shape)):
                raise RuntimeError(
                    f"{self.name}: batch {run_n} is outside the plan's optimisation profile"
                )
            if not self._context.execute_async_v3(self._stream.cuda_stream):
                why = trt_errors(self._logger, mark)
                raise RuntimeError(f"{self.name}: execute_async_v3 failed: {why}")
            self._h_out[:run_n].copy_(self._d_out[:run_n], non_blocking=True)
        self._stream.synchronize()
        return self._h_out[:n].numpy().copy()

    def close(self) -> None:
        self._context = None
        self._engine = None
