"""The TensorRT 10 calls of the builder and the runtime, against a small fake ``tensorrt`` module.

TensorRT and a GPU are absent on the development machines, so these tests pin down what the code
does with the API's documented return values (a parser that reports errors, ``-1`` from
``add_optimization_profile``, ``False`` from ``set_timing_cache``, ``None`` from
``build_serialized_network``, FLOAT for an unknown tensor name) without the real library.
"""

from __future__ import annotations

import enum
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from engine_build import tensorrt_build
from engine_build.manifest import BatchProfile
from engine_build.runtime.base import ArtifactMismatchError
from engine_build.runtime.tensorrt_engine import plan_io, tensorrt_logger, trt_errors
from engine_build.tensorrt_build import TensorRTBuildError, build_fp16_plan


class Severity(enum.Enum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class ILogger:
    def __init__(self) -> None:
        pass


class Tensor(SimpleNamespace):
    pass


class FakeNetwork:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.inputs = [Tensor(name="images", shape=(-1, 3, 32, 32), dtype=DataType.FLOAT)]
        self.outputs = [Tensor(name="logits", shape=(-1, 3), dtype=DataType.FLOAT)]

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    @property
    def num_outputs(self) -> int:
        return len(self.outputs)

    def get_input(self, i: int) -> Tensor:
        return self.inputs[i]

    def get_output(self, i: int) -> Tensor:
        return self.outputs[i]


class FakeParser:
    def __init__(self, network: FakeNetwork, logger, behaviour: dict) -> None:
        self.behaviour = behaviour
        self.errors = list(behaviour.get("parser_errors", []))

    def parse_from_file(self, path: str) -> bool:
        self.behaviour["parsed_path"] = path
        return self.behaviour.get("parse_ok", True)

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, i: int) -> str:
        return self.errors[i]


class FakeProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, name, min, opt, max) -> None:
        self.shapes[name] = (tuple(min), tuple(opt), tuple(max))


class FakeTimingCache:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def serialize(self) -> bytes:
        return self.data + b"+new"


class FakeConfig:
    def __init__(self, behaviour: dict) -> None:
        self.behaviour = behaviour
        self.flags: set = set()
        self.pools: dict = {}
        self.profiles: list[FakeProfile] = []
        self.cache: FakeTimingCache | None = None

    def set_memory_pool_limit(self, pool, size: int) -> None:
        self.pools[pool] = size

    def set_flag(self, flag) -> None:
        self.flags.add(flag)

    def add_optimization_profile(self, profile: FakeProfile) -> int:
        if not self.behaviour.get("profile_ok", True):
            return -1
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data: bytes) -> FakeTimingCache:
        return FakeTimingCache(bytes(data))

    def set_timing_cache(self, cache: FakeTimingCache, ignore_mismatch: bool) -> bool:
        self.behaviour["ignore_mismatch"] = ignore_mismatch
        if not self.behaviour.get("cache_ok", True):
            return False
        self.cache = cache
        return True

    def get_timing_cache(self) -> FakeTimingCache | None:
        return self.cache


def fake_trt(strong: bool = True, **behaviour) -> SimpleNamespace:
    """A ``tensorrt`` module with the parts of the TensorRT 10 Python API that the code uses."""
    made: dict = {"behaviour": behaviour}
    flags = {"EXPLICIT_BATCH": 0}
    if strong:
        flags["STRONGLY_TYPED"] = 5

    class Builder:
        def __init__(self, logger) -> None:
            self.logger = logger
            made["builder"] = self

        def create_network(self, flags: int) -> FakeNetwork:
            made["network"] = FakeNetwork(flags)
            if behaviour.get("no_input"):
                made["network"].inputs[0].name = "input.1"
            return made["network"]

        def create_builder_config(self) -> FakeConfig:
            made["config"] = FakeConfig(behaviour)
            return made["config"]

        def create_optimization_profile(self) -> FakeProfile:
            return FakeProfile()

        def build_serialized_network(self, network, config):
            if behaviour.get("build_fails"):
                self.logger.log(Severity.ERROR, "out of memory building the engine")
                return None
            return b"PLAN"

    def parser(network, logger) -> FakeParser:
        made["parser"] = FakeParser(network, logger, behaviour)
        return made["parser"]

    return SimpleNamespace(
        __version__="10.13.0.35",
        made=made,
        ILogger=ILogger,
        Logger=SimpleNamespace(**{s.name: s for s in Severity}),
        NetworkDefinitionCreationFlag=SimpleNamespace(**flags),
        Builder=Builder,
        OnnxParser=parser,
        MemoryPoolType=SimpleNamespace(WORKSPACE="workspace"),
        BuilderFlag=SimpleNamespace(FP16="fp16"),
        TensorIOMode=TensorIOMode,
        float32=DataType.FLOAT,
        float16=DataType.HALF,
        int8=DataType.INT8,
    )


@pytest.fixture
def use_trt(monkeypatch):
    def install(trt):
        monkeypatch.setattr(tensorrt_build, "import_tensorrt", lambda: trt)
        gpu = ("NVIDIA H100 80GB HBM3", "9.0")
        monkeypatch.setattr(tensorrt_build, "gpu_identity", lambda: gpu)
        return trt

    return install


PROFILE = BatchProfile(min=1, opt=4, max=8)


def build(tmp_path, cache=None):
    onnx = tmp_path / "model.fp16.onnx"
    return build_fp16_plan(onnx, "images", 32, PROFILE, workspace_gb=0.5, timing_cache=cache)


def test_strongly_typed_build_logs_io_sets_profile_and_saves_cache(use_trt, tmp_path, caplog):
    trt = use_trt(fake_trt())
    cache = tmp_path / "cache" / "h100.timing"
    with caplog.at_level(logging.INFO, logger="engine_build.tensorrt_build"):
        built = build(tmp_path, cache)
    made = trt.made
    assert made["network"].flags == 1 << 5  # STRONGLY_TYPED alone: EXPLICIT_BATCH is ignored in 10
    config = made["config"]
    assert "fp16" not in config.flags  # no weak-typing precision flag on a strongly typed network
    assert config.pools == {"workspace": 1 << 29}
    assert config.profiles[0].shapes == {"images": ((1, 3, 32, 32), (4, 3, 32, 32), (8, 3, 32, 32))}
    assert made["behaviour"]["ignore_mismatch"] is False
    assert built.plan == b"PLAN" and built.info.typing == "strong"
    assert built.info.version == "10.13.0.35" and built.info.gpu_name == "NVIDIA H100 80GB HBM3"
    assert cache.read_bytes() == b"+new"
    text = caplog.text
    assert "TensorRT input  images shape=(-1, 3, 32, 32)" in text
    assert "TensorRT output logits shape=(-1, 3)" in text


def test_a_tensorrt_without_strong_typing_is_refused_naming_its_version(use_trt, tmp_path):
    # before: a weak-typing fallback (EXPLICIT_BATCH + BuilderFlag.FP16) that no TensorRT of the
    # pin (>=10.3,<12) could reach, and that TensorRT 11, lacking both, could not have run
    trt = use_trt(fake_trt(strong=False))
    with pytest.raises(TensorRTBuildError) as err:
        build(tmp_path)
    why = str(err.value)
    assert "TensorRT 10.13.0.35" in why and "STRONGLY_TYPED" in why and "\n" not in why
    assert "builder" not in trt.made  # refused before any TensorRT object is made


@pytest.mark.parametrize("parse_ok", [False, True])
def test_every_parser_error_is_logged_and_fails_the_build(use_trt, tmp_path, caplog, parse_ok):
    # Polygraphy's check: errors fail the build even when parse_from_file returned True
    errors = ["node Conv_3: unsupported attribute", "node Add_9: shape mismatch"]
    use_trt(fake_trt(parse_ok=parse_ok, parser_errors=errors))
    with pytest.raises(TensorRTBuildError, match=r"2 error.*Conv_3"):
        build(tmp_path)
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert [m for m in logged if "TensorRT ONNX parser" in m] == [
        f"TensorRT ONNX parser: {e}" for e in errors
    ]


def test_a_failed_parse_without_parser_errors_still_fails(use_trt, tmp_path):
    use_trt(fake_trt(parse_ok=False))
    with pytest.raises(TensorRTBuildError, match="could not parse"):
        build(tmp_path)


def test_a_network_without_the_manifest_input_is_refused(use_trt, tmp_path):
    use_trt(fake_trt(no_input=True))
    with pytest.raises(TensorRTBuildError, match=r"no input 'images' \(has: input.1\)"):
        build(tmp_path)


def test_a_rejected_optimisation_profile_fails(use_trt, tmp_path):
    use_trt(fake_trt(profile_ok=False))
    with pytest.raises(TensorRTBuildError, match="optimisation profile 1/4/8"):
        build(tmp_path)


def test_a_timing_cache_from_another_gpu_fails_and_is_left_alone(use_trt, tmp_path):
    use_trt(fake_trt(cache_ok=False))
    cache = tmp_path / "l4.timing"
    cache.write_bytes(b"L4-CACHE")
    with pytest.raises(TensorRTBuildError, match="another TensorRT version or GPU"):
        build(tmp_path, cache)
    assert cache.read_bytes() == b"L4-CACHE"


def test_the_timing_cache_is_replaced_whole_through_a_temp_file(use_trt, tmp_path, monkeypatch):
    import os

    use_trt(fake_trt())
    cache = tmp_path / "h100.timing"
    cache.write_bytes(b"OLD")
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append(b), real_replace(a, b)))
    built = build(tmp_path, cache)
    assert built.plan == b"PLAN" and cache.read_bytes() == b"OLD+new"
    assert replaced == [cache]  # never written in place: a killed build leaves the old cache
    assert sorted(p.name for p in tmp_path.iterdir() if "timing" in p.name) == ["h100.timing"]


def test_a_timing_cache_that_cannot_be_saved_does_not_cost_the_plan(use_trt, tmp_path, caplog):
    use_trt(fake_trt())
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"")
    with caplog.at_level(logging.ERROR, logger="engine_build.tensorrt_build"):
        built = build(tmp_path, blocker / "h100.timing")
    assert built.plan == b"PLAN"
    assert "timing cache not saved to" in caplog.text and str(blocker) in caplog.text


def test_a_null_engine_raises_with_tensorrts_own_error(use_trt, tmp_path, caplog):
    use_trt(fake_trt(build_fails=True))
    with pytest.raises(TensorRTBuildError, match=r"no engine.*out of memory building the engine"):
        build(tmp_path)
    assert any(r.name == "tensorrt" and "out of memory" in r.getMessage() for r in caplog.records)


def test_one_logger_per_process_forwards_to_python_logging(caplog):
    trt = fake_trt()
    logger = tensorrt_logger(trt)
    assert tensorrt_logger(trt) is logger  # TensorRT keeps one logger pointer for the library
    mark = logger.mark()
    with caplog.at_level(logging.DEBUG, logger="tensorrt"):
        logger.log(Severity.WARNING, "fp16 subnormal weights")
        logger.log(Severity.VERBOSE, "tactic 0x1234")  # dropped
        logger.log(Severity.ERROR, "engine plan built for sm_89")
        logger.log("not a severity", "ignored")  # never raises back into TensorRT
    levels = {r.getMessage(): r.levelno for r in caplog.records if r.name == "tensorrt"}
    assert levels == {
        "fp16 subnormal weights": logging.WARNING,
        "engine plan built for sm_89": logging.ERROR,
    }
    assert trt_errors(logger, mark) == "engine plan built for sm_89"
    assert trt_errors(logger, logger.mark()) == "no TensorRT error logged"


class FakeEngine:
    def __init__(self, tensors: dict) -> None:
        self.tensors = tensors

    @property
    def num_io_tensors(self) -> int:
        return len(self.tensors)

    def get_tensor_name(self, i: int) -> str:
        return list(self.tensors)[i]

    def get_tensor_mode(self, name: str):
        return self.tensors.get(name, (TensorIOMode.NONE,))[0]

    def get_tensor_shape(self, name: str):
        return self.tensors[name][1] if name in self.tensors else ()

    def get_tensor_dtype(self, name: str):
        # TensorRT answers FLOAT for a name the plan lacks: never a sign the name is right
        return self.tensors[name][2] if name in self.tensors else DataType.FLOAT


def test_plan_io_logs_every_tensor_and_maps_dtypes(caplog):
    engine = FakeEngine(
        {
            "images": (TensorIOMode.INPUT, (-1, 3, 32, 32), DataType.FLOAT),
            "logits": (TensorIOMode.OUTPUT, (-1, 3), DataType.HALF),
        }
    )
    with caplog.at_level(logging.INFO, logger="engine_build.runtime.tensorrt_engine"):
        dtypes = plan_io(fake_trt(), engine, "images", "logits", (3, 32, 32), 3)
    assert dtypes == (torch.float32, torch.float16)
    assert "TensorRT plan input  images shape=(-1, 3, 32, 32)" in caplog.text
    assert "TensorRT plan output logits shape=(-1, 3)" in caplog.text


def test_plan_io_names_every_difference_from_the_manifest():
    engine = FakeEngine(
        {
            "input.1": (TensorIOMode.INPUT, (-1, 3, 32, 32), DataType.FLOAT),
            "logits": (TensorIOMode.OUTPUT, (-1, 5), DataType.INT8),
        }
    )
    # before: an EngineUnavailableError, which auto took for "no TensorRT here" and fell back from
    with pytest.raises(ArtifactMismatchError) as err:
        plan_io(fake_trt(), engine, "images", "logits", (3, 32, 32), 3, where="bundle b: x.plan")
    why = str(err.value)
    assert why.startswith("bundle b: x.plan does not fit manifest.json: ")
    assert "unexpected I/O tensor 'input.1'" in why and "no input 'images'" in why
    assert "'logits' has shape (-1, 5), the manifest says (-1, 3)" in why
    assert "not float32/float16" in why


# --- the loader (TensorRTEngine) against a fake TensorRT runtime and a fake CUDA device -------


class FakePlanEngine(FakeEngine):
    """A deserialised plan: I/O tensors, one optimisation profile, and a context (or None)."""

    def __init__(self, profile: tuple, context: bool = True, hw=(3, 32, 32)) -> None:
        super().__init__(
            {
                "images": (TensorIOMode.INPUT, (-1, *hw), DataType.FLOAT),
                "logits": (TensorIOMode.OUTPUT, (-1, 3), DataType.FLOAT),
            }
        )
        self.profile = profile
        self.context = context
        self.made: dict = {}  # runtime_trt shares its fake module's

    @property
    def num_optimization_profiles(self) -> int:
        return 1

    def get_tensor_profile_shape(self, name: str, profile_index: int):
        assert (name, profile_index) == ("images", 0)
        return self.profile

    def create_execution_context(self):
        if not self.context:
            return None
        self.made["context"] = FakeContext(self.made)
        return self.made["context"]


class FakeContext:
    """An ``IExecutionContext`` that records every call and whose ``execute_async_v3`` runs a
    stand-in network on the "device" memory at the bound addresses (``fake_gpu`` keeps each
    device buffer by its ``data_ptr``): for each row of the input shape last set,
    logits[i, c] = the mean of channel c of image i. Each execute keeps a copy of the input rows
    it read, as they were when it ran."""

    def __init__(self, made: dict) -> None:
        self.made = made
        self.calls: list[tuple] = []
        self.addresses: dict[str, int] = {}
        self.shape: tuple | None = None
        self.inputs_seen: list[torch.Tensor] = []
        self.execute_ok = True
        self.shape_ok = True

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.calls.append(("set_tensor_address", name))
        self.addresses[name] = ptr
        return True

    def set_input_shape(self, name: str, shape) -> bool:
        self.calls.append(("set_input_shape", name, tuple(shape)))
        self.shape = tuple(shape)
        return self.shape_ok

    def execute_async_v3(self, stream_handle: int) -> bool:
        self.calls.append(("execute_async_v3", stream_handle))
        if not self.execute_ok:
            self.made["logger"].log(Severity.ERROR, "an illegal memory access was encountered")
            return False
        memory = self.made["device_memory"]
        images = memory[self.addresses["images"]][: self.shape[0]]
        logits = memory[self.addresses["logits"]]
        self.inputs_seen.append(images.clone())
        logits[: len(images)] = images.mean(dim=(2, 3)).to(logits.dtype)
        return True


def profile_of(lo: int, opt: int, hi: int, chw=(3, 32, 32)) -> tuple:
    return ((lo, *chw), (opt, *chw), (hi, *chw))


def runtime_trt(engine: FakePlanEngine) -> SimpleNamespace:
    trt = fake_trt()
    trt.made["plans_read"] = []

    if engine is not None:
        engine.made = trt.made  # where its context finds the device memory and the logger

    class Runtime:
        def __init__(self, logger) -> None:
            self.logger = logger
            trt.made["logger"] = logger

        def deserialize_cuda_engine(self, data: bytes) -> FakePlanEngine:
            trt.made["plans_read"].append(bytes(data))
            return engine

    trt.Runtime = Runtime
    return trt


class FakeStream:
    """A ``torch.cuda.Stream``: a handle for TensorRT, and the calls made on it."""

    def __init__(self, handle: int) -> None:
        self.cuda_stream = handle
        self.calls: list[tuple] = []

    def wait_stream(self, other: FakeStream) -> None:
        self.calls.append(("wait_stream", other.cuda_stream))

    def synchronize(self) -> None:
        self.calls.append(("synchronize",))


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch.cuda as on a GPU host named ``name``; device buffers are CPU tensors (or, with
    ``oom``, torch.OutOfMemoryError as from a full GPU; an exception given as ``oom`` is raised
    instead), kept in ``trt.made["device_memory"]`` by ``data_ptr`` for :class:`FakeContext`."""
    import contextlib

    from engine_build.runtime import tensorrt_engine

    def install(trt, name="NVIDIA H100 80GB HBM3", capability=(9, 0), oom=False):
        real_empty = torch.empty
        memory = trt.made.setdefault("device_memory", {})

        # CPU memory stands in for device and pinned buffers: pin_memory needs CUDA, so dropped
        def empty(*shape, device=None, pin_memory=False, **kw):
            if device is not None and torch.device(device).type == "cuda":
                if isinstance(oom, BaseException):
                    raise oom
                if oom:
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
                buffer = real_empty(*shape, **kw)
                memory[buffer.data_ptr()] = buffer
                return buffer
            return real_empty(*shape, **kw)

        def stream(device=None) -> FakeStream:
            trt.made["stream"] = FakeStream(0x5EED)
            return trt.made["stream"]

        monkeypatch.setattr(tensorrt_engine, "import_tensorrt", lambda: trt)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        # one CPU "device": making it or a stream current changes nothing (the real ones would
        # initialise CUDA); the engine's stream is a FakeStream, the caller's another
        monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "Stream", stream)
        monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream(0xCA11))
        monkeypatch.setattr(torch, "empty", empty)
        return trt

    return install


def plan_artifact(path, file="model.fp16.plan", gpu="NVIDIA H100 80GB HBM3", cc="9.0"):
    from engine_build.bundle import sha256_file
    from engine_build.manifest import Artifact, TensorRTInfo

    (path / file).write_bytes(file.encode())
    info = TensorRTInfo(version="10.13.0.35", gpu_name=gpu, compute_capability=cc, typing="strong")
    return Artifact(
        backend="tensorrt",
        precision="fp16",
        file=file,
        sha256=sha256_file(path / file),
        size_bytes=(path / file).stat().st_size,
        tensorrt=info,
    )


@pytest.fixture
def with_plans(bundle_dir, tmp_path):
    """The shared bundle's ONNX model (no model.pt: torch-cuda is skipped) plus the given plans."""
    import shutil

    from engine_build.bundle import Bundle, load_bundle

    shared = load_bundle(bundle_dir)
    onnx = shared.artifact("onnxruntime", "fp32")
    shutil.copy(bundle_dir / onnx.file, tmp_path / onnx.file)

    def make(*plans: dict, batch_profile: BatchProfile | None = None) -> Bundle:
        arts = [onnx, *(plan_artifact(tmp_path, **p) for p in plans)]
        profile = batch_profile or shared.manifest.batch_profile
        update = {"artifacts": arts, "batch_profile": profile}
        return Bundle(tmp_path, shared.manifest.model_copy(update=update))

    return make


def test_the_plans_profile_is_logged_and_a_matching_one_loads(fake_gpu, with_plans, caplog):
    from engine_build.runtime import create_engine

    fake_gpu(runtime_trt(FakePlanEngine(profile_of(1, 4, 8))))  # the manifest's 1/4/8
    with caplog.at_level(logging.INFO, logger="engine_build.runtime"):
        engine = create_engine(with_plans({}), "tensorrt")
    assert engine.name == "tensorrt-fp16" and engine.max_batch == 8
    assert (
        "profile 0 of 1 for images: min=(1, 3, 32, 32) opt=(4, 3, 32, 32) max=(8, 3, 32, 32)"
        in (caplog.text)
    )


@pytest.mark.parametrize(
    ("tensors", "needle"),
    [
        (
            {"logits": (TensorIOMode.OUTPUT, (-1, 5), DataType.FLOAT)},
            r"'logits' has shape \(-1, 5\), the manifest says \(-1, 3\)",
        ),
        (
            {"input.1": (TensorIOMode.INPUT, (-1, 3, 32, 32), DataType.FLOAT), "images": None},
            r"unexpected I/O tensor 'input\.1'; no input 'images'",
        ),
    ],
)
def test_a_plan_whose_io_differs_from_the_manifest_refuses_the_bundle_auto_does_not_fall_back(
    fake_gpu, with_plans, caplog, tensors, needle
):
    # before: an EngineUnavailableError, so auto logged it at INFO as if there were no GPU and
    # served the bundle with ONNX Runtime; its sha256 matched, so the bundle itself is wrong
    from engine_build.runtime import create_engine

    engine = FakePlanEngine(profile_of(1, 4, 8))
    for name, tensor in tensors.items():
        if tensor is None:
            del engine.tensors[name]
        else:
            engine.tensors[name] = tensor
    fake_gpu(runtime_trt(engine))
    bundle = with_plans({})
    for backend in ("tensorrt", "auto"):
        with (
            caplog.at_level(logging.INFO, logger="engine_build.runtime"),
            pytest.raises(ArtifactMismatchError, match=needle) as err,
        ):
            create_engine(bundle, backend, threads=1)
        why = str(err.value)
        assert why.startswith(f"bundle {bundle.path}: model.fp16.plan does not fit manifest.json: ")
        assert "\n" not in why
    assert not [r for r in caplog.records if "auto backend" in r.getMessage()]


@pytest.mark.parametrize(
    ("profile", "needle"),
    [
        (profile_of(1, 4, 4), r"batch profile \(min/opt/max\) is 1/4/4, the manifest's 1/4/8"),
        (profile_of(2, 4, 8), r"is 2/4/8, the manifest's 1/4/8"),  # batch 1 would need padding
        (profile_of(1, 4, 8, (3, 64, 64)), r"\(8, 3, 64, 64\) are not \(N, 3, 32, 32\)"),
    ],
)
def test_a_plan_whose_profile_does_not_cover_the_manifests_is_a_mismatch_auto_warns(
    fake_gpu, with_plans, caplog, profile, needle
):
    # before: loaded, then failed inside TensorRT at set_input_shape on the first odd batch; and
    # then (33ad9dd) a plain EngineUnavailableError that auto logged at INFO, as for no GPU
    from engine_build.runtime import PlanMismatchError, create_engine

    fake_gpu(runtime_trt(FakePlanEngine(profile)))
    bundle = with_plans({})
    with pytest.raises(PlanMismatchError, match=needle):
        create_engine(bundle, "tensorrt")
    with caplog.at_level(logging.INFO, logger="engine_build.runtime.factory"):
        assert create_engine(bundle, "auto", threads=1).name == "onnxruntime-fp32"
    refused = [r for r in caplog.records if "backend tensorrt" in r.getMessage()]
    assert refused and all(r.levelno == logging.WARNING for r in refused)


@pytest.mark.parametrize(
    ("profile", "warns"),
    [
        (profile_of(1, 4, 16), False),  # covers 1..8: the runtime never sends more than 8
        (profile_of(1, 8, 8), True),  # tuned for batch 8, not the manifest's 4
    ],
)
def test_a_plan_whose_profile_covers_the_manifests_loads(
    fake_gpu, with_plans, caplog, profile, warns
):
    from engine_build.runtime import create_engine

    fake_gpu(runtime_trt(FakePlanEngine(profile)))
    with caplog.at_level(logging.WARNING, logger="engine_build.runtime"):
        engine = create_engine(with_plans({}), "tensorrt")
    assert engine.name == "tensorrt-fp16" and engine.max_batch == 8
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert bool([m for m in warned if "opt" in m and "8" in m and "4" in m]) == warns, warned


def test_out_of_gpu_memory_for_the_buffers_is_a_load_error_auto_falls_back(
    fake_gpu, with_plans, caplog
):
    # before: torch.OutOfMemoryError escaped create_engine, past auto's fallback and the worker
    from engine_build.runtime import EngineLoadError, create_engine

    fake_gpu(runtime_trt(FakePlanEngine(profile_of(1, 4, 8))), oom=True)
    bundle = with_plans({})
    with pytest.raises(EngineLoadError, match=r"out of GPU memory loading tensorrt.*max batch 8"):
        create_engine(bundle, "tensorrt")
    with caplog.at_level(logging.WARNING, logger="engine_build.runtime.factory"):
        engine = create_engine(bundle, "auto", threads=1)
    assert engine.name == "onnxruntime-fp32"
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("tensorrt" in m and "out of GPU memory" in m for m in warned)


def test_no_execution_context_is_a_load_error_auto_warns_and_falls_back(
    fake_gpu, with_plans, caplog
):
    from engine_build.runtime import EngineLoadError, create_engine

    fake_gpu(runtime_trt(FakePlanEngine(profile_of(1, 4, 8), context=False)))
    bundle = with_plans({})
    with pytest.raises(EngineLoadError, match=r"execution context.*max batch 8"):
        create_engine(bundle, "tensorrt")
    with caplog.at_level(logging.WARNING, logger="engine_build.runtime.factory"):
        engine = create_engine(bundle, "auto", threads=1)
    assert engine.name == "onnxruntime-fp32"
    assert any("execution context" in r.getMessage() for r in caplog.records)


def test_a_programming_error_while_loading_is_not_swallowed_by_auto(
    fake_gpu, with_plans, monkeypatch
):
    from engine_build.runtime import create_engine
    from engine_build.runtime.tensorrt_engine import TensorRTEngine

    def broken(self, *args):
        raise TypeError("a bug")

    fake_gpu(runtime_trt(FakePlanEngine(profile_of(1, 4, 8))))
    monkeypatch.setattr(TensorRTEngine, "_bind_buffers", broken)
    with pytest.raises(TypeError, match="a bug"):  # only out-of-memory becomes a load failure
        create_engine(with_plans({}), "auto", threads=1)


def test_a_plan_from_the_whole_gpu_runs_on_a_mig_slice_with_a_warning(fake_gpu, with_plans, caplog):
    from engine_build.runtime import create_engine

    mig = "NVIDIA A100-SXM4-80GB MIG 1g.10gb"
    fake_gpu(runtime_trt(FakePlanEngine(profile_of(1, 4, 8))), name=mig, capability=(8, 0))
    bundle = with_plans({"gpu": "NVIDIA A100-SXM4-80GB", "cc": "8.0"})
    with caplog.at_level(logging.WARNING, logger="engine_build.runtime"):
        engine = create_engine(bundle, "tensorrt")
    assert engine.name == "tensorrt-fp16"
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("'NVIDIA A100-SXM4-80GB'" in m and "MIG 1g.10gb" in m for m in warned)


def test_the_plan_built_on_this_mig_profile_is_preferred(fake_gpu, with_plans, caplog):
    from engine_build.runtime import create_engine

    mig = "NVIDIA A100-SXM4-80GB MIG 3g.40gb"
    trt = fake_gpu(runtime_trt(FakePlanEngine(profile_of(1, 4, 8))), name=mig, capability=(8, 0))
    bundle = with_plans(
        {"file": "whole.plan", "gpu": "NVIDIA A100-SXM4-80GB", "cc": "8.0"},
        {"file": "slice.plan", "gpu": mig, "cc": "8.0"},
    )
    with caplog.at_level(logging.WARNING, logger="engine_build.runtime"):
        create_engine(bundle, "tensorrt")
    assert trt.made["plans_read"] == [b"slice.plan"]
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.parametrize("backend", ["tensorrt", "torch-cuda"])
def test_out_of_memory_creating_the_cuda_context_is_a_load_error(
    fake_gpu, with_plans, monkeypatch, caplog, backend
):
    # before: torch.AcceleratorError ("CUDA error: out of memory", the context or first
    # allocation on a full GPU) escaped create_engine, past auto's fallback
    from engine_build.runtime import EngineLoadError, create_engine, torch_cuda

    oom = torch.AcceleratorError(
        "CUDA error: out of memory\nSearch for `cudaErrorMemoryAllocation'"
    )
    fake_gpu(runtime_trt(FakePlanEngine(profile_of(1, 4, 8))), oom=oom)

    class FullGpu:
        def __init__(self, bundle, **opts):
            raise oom

    monkeypatch.setattr(torch_cuda, "TorchCudaEngine", FullGpu)
    bundle = with_plans({})
    with pytest.raises(EngineLoadError, match=rf"out of GPU memory loading {backend}.*max batch 8"):
        create_engine(bundle, backend)
    with caplog.at_level(logging.WARNING, logger="engine_build.runtime.factory"):
        assert create_engine(bundle, "auto", threads=1).name == "onnxruntime-fp32"
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith(f"backend {backend} refused") for m in warned), warned


def test_an_accelerator_error_other_than_out_of_memory_propagates(fake_gpu, with_plans):
    from engine_build.runtime import create_engine

    bad = torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
    fake_gpu(runtime_trt(FakePlanEngine(profile_of(1, 4, 8))), oom=bad)
    with pytest.raises(torch.AcceleratorError, match="illegal memory access"):
        create_engine(with_plans({}), "auto", threads=1)


def test_a_plan_tensorrt_cannot_deserialise_is_a_load_error_auto_warns(
    fake_gpu, with_plans, caplog
):
    # before: a plain EngineUnavailableError, logged at INFO under auto as if there were no GPU
    from engine_build.runtime import EngineLoadError, create_engine

    fake_gpu(runtime_trt(None))  # deserialize_cuda_engine answers None, as on out of memory
    bundle = with_plans({})
    with pytest.raises(EngineLoadError, match=r"cannot deserialize model\.fp16\.plan"):
        create_engine(bundle, "tensorrt")
    with caplog.at_level(logging.INFO, logger="engine_build.runtime.factory"):
        assert create_engine(bundle, "auto", threads=1).name == "onnxruntime-fp32"
    refused = [r for r in caplog.records if "backend tensorrt" in r.getMessage()]
    assert refused and all(r.levelno == logging.WARNING for r in refused)


# --- the hot path: infer / infer_device / _execute on the fake GPU ---------------------------

PADDED = BatchProfile(min=4, opt=4, max=8)  # the plan runs batches of 4..8: smaller ones padded


def stand_in(images: np.ndarray) -> np.ndarray:
    """What FakeContext's network computes: logits[i, c] = the mean of channel c of image i."""
    return images.mean(axis=(2, 3))


@pytest.fixture
def running_plan(fake_gpu, with_plans):
    """A TensorRTEngine loaded on the fake GPU for a manifest of min/opt/max batch 4/4/8."""
    from engine_build.runtime.tensorrt_engine import TensorRTEngine

    trt = fake_gpu(runtime_trt(FakePlanEngine(profile_of(4, 4, 8))))
    engine = TensorRTEngine(with_plans({}, batch_profile=PADDED))
    assert engine.max_batch == 8
    return engine, trt.made


def runs(context: FakeContext) -> list[tuple]:
    """The calls of each batch, after the two set_tensor_address of the load."""
    assert context.calls[:2] == [("set_tensor_address", "images"), ("set_tensor_address", "logits")]
    return context.calls[2:]


def test_infer_pads_a_small_batch_with_zeros_and_returns_only_its_rows(running_plan):
    engine, made = running_plan
    context, stream = made["context"], made["stream"]
    rng = np.random.default_rng(0)
    # a batch of 6 first: it leaves its rows 2..5 in the input buffer, as garbage for the next
    big = rng.normal(5.0, 1.0, size=(6, 3, 32, 32)).astype(np.float32)
    first = engine.infer(big)
    np.testing.assert_array_equal(context.inputs_seen[0].numpy(), big)
    small = rng.normal(-3.0, 1.0, size=(2, 3, 32, 32)).astype(np.float32)
    logits = engine.infer(small)

    assert logits.shape == (2, 3) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, stand_in(small), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(first, stand_in(big), rtol=1e-5, atol=1e-6)  # a copy, not a view
    handle = stream.cuda_stream
    assert runs(context) == [
        ("set_input_shape", "images", (6, 3, 32, 32)),
        ("execute_async_v3", handle),
        ("set_input_shape", "images", (4, 3, 32, 32)),  # max(2, the manifest's min 4)
        ("execute_async_v3", handle),
    ]
    ran = context.inputs_seen[1]  # the input rows as TensorRT read them
    assert ran.shape == (4, 3, 32, 32)
    np.testing.assert_array_equal(ran[:2].numpy(), small)
    assert not ran[2:].any()  # the batch of 6's rows 2..3 were zeroed before the execute
    assert stream.calls == [("synchronize",)] * 2  # each batch waits for its own results


def test_infer_device_orders_after_the_callers_stream_and_pads_the_same_way(running_plan):
    engine, made = running_plan
    context, stream = made["context"], made["stream"]
    # the fake GPU's memory is the CPU's: the engine's device is where a "device" batch lives
    engine._device = engine.device = torch.device("cpu")
    torch.manual_seed(0)
    full = torch.randn(8, 3, 32, 32) + 5.0  # max_batch: taken as it is, no padding
    np.testing.assert_allclose(engine.infer_device(full), stand_in(full.numpy()), rtol=1e-5)
    one = torch.randn(1, 3, 32, 32) - 3.0
    logits = engine.infer_device(one)

    assert logits.shape == (1, 3)
    np.testing.assert_allclose(logits, stand_in(one.numpy()), rtol=1e-5, atol=1e-6)
    assert [c for c in runs(context) if c[0] == "set_input_shape"] == [
        ("set_input_shape", "images", (8, 3, 32, 32)),
        ("set_input_shape", "images", (4, 3, 32, 32)),
    ]
    ran = context.inputs_seen[1]
    np.testing.assert_array_equal(ran[:1].numpy(), one.numpy())
    assert ran.shape == (4, 3, 32, 32) and not ran[1:].any()
    # the copy waits for the stream the caller made the batch on (FakeStream 0xCA11)
    assert stream.calls == [("wait_stream", 0xCA11), ("synchronize",)] * 2


@pytest.mark.parametrize("n", [0, 9])
def test_a_batch_outside_1_to_max_batch_is_refused_before_tensorrt_sees_it(running_plan, n):
    engine, made = running_plan
    engine._device = engine.device = torch.device("cpu")
    with pytest.raises(ValueError, match=rf"batch size {n} outside 1\.\.8"):
        engine.infer(np.zeros((n, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match=rf"batch size {n} outside 1\.\.8"):
        engine.infer_device(torch.zeros(n, 3, 32, 32))
    assert runs(made["context"]) == []


@pytest.mark.parametrize(
    ("refuse", "needle"),
    [
        ("execute_ok", r"^tensorrt-fp16: execute_async_v3 failed: an illegal memory access"),
        ("shape_ok", r"^tensorrt-fp16: batch 4 is outside the plan's optimisation profile$"),
    ],
)
def test_a_refused_execute_or_input_shape_raises_naming_why(running_plan, refuse, needle):
    engine, made = running_plan
    setattr(made["context"], refuse, False)
    with pytest.raises(RuntimeError, match=needle):
        engine.infer(np.ones((3, 3, 32, 32), np.float32))
