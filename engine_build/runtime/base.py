"""The one inference interface every backend implements, and its input checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from engine_build.bundle import Bundle, BundleError


class EngineUnavailableError(RuntimeError):
    """This backend cannot run here (no GPU, library missing, no artifact in the bundle)."""


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message ("no detail" when it has none), for one-line logs and
    errors: CUDA and torch.fx messages run to several lines."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no detail"


class PlanMismatchError(EngineUnavailableError):
    """A TensorRT plan built for another GPU model or TensorRT version than the one in hand, or
    whose optimisation profile does not cover the manifest's batch range and input shape."""


class EngineLoadError(EngineUnavailableError):
    """The backend runs here but could not load this bundle: out of GPU memory for its CUDA
    context, weights, buffers or TensorRT execution context (another process on the GPU, a small
    MIG slice, a large ``max_batch``), or TensorRT could not deserialise its plan (which it also
    answers on out of memory). ``auto`` warns and falls back; a named backend raises it."""


class ArtifactMismatchError(BundleError):
    """A verified artifact that cannot serve its manifest: an ONNX model whose inputs/outputs
    differ from the manifest's names, crop or class count, a TensorRT plan whose I/O tensors
    differ from them (names, input/output mode, shape, dtype), a ``model.pt`` that does not load
    into the manifest's arch, or an engine whose logits are not ``num_classes`` wide. Its sha256
    matches, so the bundle was built or edited wrong: the bundle is refused (a BundleError, a
    ``ValueError``), and ``auto`` does not fall back to another backend of it (a corrupt
    ``model.pt`` on a GPU node would otherwise run silently on the CPU)."""


def check_logits(logits: object, rows: int, bundle: Bundle, engine_name: str) -> None:
    """Raise ArtifactMismatchError unless ``logits`` (an engine's answer to ``rows`` images) is
    ``(rows, num_classes)``: the worker looks up ``labels[argmax]``, and a model with more
    outputs than labels would fail there on the first batch, one with fewer answer wrongly."""
    m = bundle.manifest
    shape = tuple(getattr(logits, "shape", ()))
    if shape != (rows, m.num_classes):
        raise ArtifactMismatchError(
            f"bundle {bundle.path}: the {engine_name} engine answers logits of shape {shape} for "
            f"{rows} image(s), the manifest has {m.num_classes} classes ({len(m.labels)} "
            "labels); the model and the manifest's labels do not match"
        )


@dataclass(frozen=True)
class InputSpec:
    """What ``infer`` takes: a float32 batch of shape (N, *shape) named ``name`` in the model."""

    name: str
    shape: tuple[int, int, int]
    dtype: np.dtype


@runtime_checkable
class Engine(Protocol):
    """Raw logits for a preprocessed float32 NCHW batch of 1..max_batch images.

    The CUDA backends are ``DeviceEngine``s too: ``infer_device(batch)`` takes the batch as a
    float32 torch tensor already on their ``device`` (the worker's GPU-decode path).
    """

    name: str
    max_batch: int

    def infer(self, batch: np.ndarray) -> np.ndarray: ...

    def input_spec(self) -> InputSpec: ...

    def close(self) -> None: ...


@runtime_checkable
class DeviceEngine(Engine, Protocol):
    """An engine on a GPU (the CUDA backends): it also takes a batch already on its ``device``,
    so the worker can decode, resize and normalise there and hand the tensor over as it is."""

    device: object  # a torch.device; torch is not imported on CPU-only hosts

    def infer_device(self, batch: object) -> np.ndarray: ...


def on_device(engine: Engine) -> bool:
    """Whether ``engine`` runs on a GPU and takes device batches (a ``DeviceEngine``)."""
    return isinstance(engine, DeviceEngine)


def input_spec_of(bundle: Bundle) -> InputSpec:
    crop = bundle.manifest.preprocess.crop
    return InputSpec(
        name=bundle.manifest.input_name, shape=(3, crop, crop), dtype=np.dtype(np.float32)
    )


def check_batch(batch: np.ndarray, spec: InputSpec, max_batch: int) -> np.ndarray:
    """Validate shape and batch size; return a C-contiguous float32 view or copy."""
    if not isinstance(batch, np.ndarray) or batch.ndim != 4 or batch.shape[1:] != spec.shape:
        shape = getattr(batch, "shape", type(batch).__name__)
        raise ValueError(
            f"expected a batch of shape (N, {', '.join(map(str, spec.shape))}); got {shape}"
        )
    if not 1 <= batch.shape[0] <= max_batch:
        raise ValueError(f"batch size {batch.shape[0]} outside 1..{max_batch}")
    return np.ascontiguousarray(batch, dtype=np.float32)


def check_device_batch(batch, spec: InputSpec, max_batch: int, device) -> None:
    """The checks of :func:`check_batch` for a torch tensor already on the engine's device."""
    if batch.ndim != 4 or tuple(batch.shape[1:]) != spec.shape:
        raise ValueError(
            f"expected a batch of shape (N, {', '.join(map(str, spec.shape))}); got "
            f"{tuple(batch.shape)}"
        )
    if not 1 <= batch.shape[0] <= max_batch:
        raise ValueError(f"batch size {batch.shape[0]} outside 1..{max_batch}")
    if batch.device != device:
        raise ValueError(f"batch is on {batch.device}, the engine on {device}")
