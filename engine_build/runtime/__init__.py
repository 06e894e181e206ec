"""Runtime side of a bundle: one Engine interface, three backends, and auto selection."""

from engine_build.runtime.base import (
    DeviceEngine,
    Engine,
    EngineLoadError,
    EngineUnavailableError,
    InputSpec,
    PlanMismatchError,
    on_device,
)
from engine_build.runtime.factory import BACKENDS, backend_of, create_engine, options_for
from engine_build.runtime.onnxruntime_engine import OnnxRuntimeEngine


def __getattr__(name: str):
    # GPU engines import lazily so that `import engine_build.runtime` stays cheap on CPU hosts.
    if name == "TorchCudaEngine":
        from engine_build.runtime.torch_cuda import TorchCudaEngine

        return TorchCudaEngine
    if name == "TensorRTEngine":
        from engine_build.runtime.tensorrt_engine import TensorRTEngine

        return TensorRTEngine
    raise AttributeError(name)


__all__ = [
    "BACKENDS",
    "DeviceEngine",
    "Engine",
    "EngineLoadError",
    "EngineUnavailableError",
    "InputSpec",
    "OnnxRuntimeEngine",
    "PlanMismatchError",
    "TensorRTEngine",
    "TorchCudaEngine",
    "backend_of",
    "create_engine",
    "on_device",
    "options_for",
]
