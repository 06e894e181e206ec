"""The Engine interface: ONNX Runtime here, GPU backends where the hardware exists."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine_build.bundle import load_bundle
from engine_build.manifest import Artifact, TensorRTInfo
from engine_build.runtime import (
    Engine,
    EngineUnavailableError,
    OnnxRuntimeEngine,
    create_engine,
)
from engine_build.runtime.tensorrt_engine import mig_difference, plan_mismatch
from engine_build.runtime.torch_cuda import batch_buckets, bucket_for, resolve_device

from .conftest import batch

HAS_CUDA = torch.cuda.is_available()
try:
    import tensorrt  # noqa: F401

    HAS_TRT = True
except ImportError:
    HAS_TRT = False


def test_onnxruntime_spinning_off_sets_the_session_option_and_answers_the_same(bundle, reference):
    # the option reaches the session (create_engine passes it to onnxruntime, and only there)
    spin = create_engine(bundle, "onnxruntime", threads=2)
    still = create_engine(bundle, "onnxruntime", threads=2, spinning=False)
    key = "session.intra_op.allow_spinning"
    assert still._session.get_session_options().get_session_config_entry(key) == "0"
    with pytest.raises(RuntimeError):  # unset: ONNX Runtime's default (spinning)
        spin._session.get_session_options().get_session_config_entry(key)
    x = batch(4, seed=7)
    np.testing.assert_allclose(still.infer(x), reference(x), atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(still.infer(x), spin.infer(x))
    spin.close()
    still.close()


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_onnxruntime_fp32_any_batch_size_matches_pytorch(bundle, reference, n):
    engine = OnnxRuntimeEngine(bundle, "fp32", threads=1)
    assert isinstance(engine, Engine)
    spec = engine.input_spec()
    assert (spec.name, spec.shape, spec.dtype) == ("images", (3, 32, 32), np.float32)
    x = batch(n, seed=n)
    logits = engine.infer(x)
    assert logits.shape == (n, 3) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, reference(x), atol=1e-4, rtol=1e-4)
    engine.close()


def test_onnxruntime_int8_runs_close_to_fp32(bundle, reference):
    engine = create_engine(bundle, "onnxruntime", precision="int8", threads=1)
    assert engine.name == "onnxruntime-int8" and engine.max_batch == 8
    x = batch(8)
    logits = engine.infer(x)
    assert logits.shape == (8, 3)
    ref = reference(x)
    assert np.abs(logits - ref).max() < 0.5 * np.abs(ref).max()  # quantised, not garbage


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (np.zeros((9, 3, 32, 32), np.float32), r"batch size 9 outside 1\.\.8"),
        (np.zeros((0, 3, 32, 32), np.float32), "batch size 0"),
        (np.zeros((2, 3, 64, 64), np.float32), r"\(N, 3, 32, 32\)"),
        (np.zeros((3, 32, 32), np.float32), r"\(N, 3, 32, 32\)"),
    ],
)
def test_infer_rejects_bad_batches(bundle, x, match):
    engine = OnnxRuntimeEngine(bundle)
    with pytest.raises(ValueError, match=match):
        engine.infer(x)


def test_auto_picks_onnxruntime_without_gpu(bundle):
    if HAS_CUDA:
        pytest.skip("a CUDA GPU is present: auto picks a GPU backend here")
    engine = create_engine(bundle, "auto", threads=1)
    assert engine.name == "onnxruntime-fp32"
    assert engine.infer(batch(2)).shape == (2, 3)


def test_options_of_other_backends_are_ignored_not_fatal(bundle):
    # one worker config serves CPU and GPU replicas: cuda_graphs must not break onnxruntime
    engine = create_engine(bundle, "onnxruntime", threads=1, cuda_graphs=True)
    assert engine.name == "onnxruntime-fp32"
    assert engine.infer(batch(1)).shape == (1, 3)


def test_explicit_gpu_backends_refuse_without_gpu(bundle):
    if HAS_CUDA:
        pytest.skip("a CUDA GPU is present")
    with pytest.raises(EngineUnavailableError, match="CUDA"):
        create_engine(bundle, "torch-cuda")
    with pytest.raises(EngineUnavailableError, match="no TensorRT fp16 plan"):
        create_engine(bundle, "tensorrt")
    with pytest.raises(ValueError, match="unknown backend"):
        create_engine(bundle, "openvino")


def _plan(gpu: str = "NVIDIA H100 80GB HBM3", version: str = "10.13.0") -> Artifact:
    info = TensorRTInfo(version=version, gpu_name=gpu, compute_capability="9.0", typing="strong")
    return Artifact(
        backend="tensorrt",
        precision="fp16",
        file="model.fp16.plan",
        sha256="0" * 64,
        size_bytes=1,
        tensorrt=info,
    )


def test_plan_mismatch_names_gpu_and_version():
    assert plan_mismatch(_plan(), "NVIDIA H100 80GB HBM3", "10.13.0") is None
    why = plan_mismatch(_plan(), "NVIDIA L4", "10.13.0")
    assert "NVIDIA H100 80GB HBM3" in why and "NVIDIA L4" in why and "TensorRT" not in why
    why = plan_mismatch(_plan(), "NVIDIA H100 80GB HBM3", "10.9.0")
    assert "10.13.0" in why and "10.9.0" in why and "GPU" not in why


def test_cuda_graph_buckets_cover_every_batch():
    buckets = batch_buckets(48)
    assert buckets == [1, 2, 4, 8, 16, 32, 48]
    assert all(bucket_for(n, buckets) >= n for n in range(1, 49))
    assert bucket_for(33, buckets) == 48 and bucket_for(4, buckets) == 4


def test_torch_cuda_device_carries_an_index(monkeypatch):
    # a tensor's device always has one: an engine on plain "cuda" refused every GPU-decoded batch
    assert torch.device("cuda") != torch.device("cuda:0")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert resolve_device("cuda") == torch.device("cuda:1")
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="torch-cuda engine needs a CUDA GPU; none visible")
def test_torch_cuda_infer_device_takes_a_batch_made_on_plain_cuda(bundle, reference):
    engine = create_engine(bundle, "torch-cuda")
    assert engine.device.index is not None
    x = batch(3)
    logits = engine.infer_device(torch.from_numpy(x).to("cuda"))
    assert (logits.argmax(1) == reference(x).argmax(1)).mean() >= 0.99


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="torch-cuda engine needs a CUDA GPU; none visible")
@pytest.mark.parametrize("graphs", [False, True])
def test_torch_cuda_fp16_matches_pytorch(bundle, reference, graphs):
    engine = create_engine(bundle, "torch-cuda", cuda_graphs=graphs)
    for n in (1, 3, 8):
        x = batch(n, seed=n)
        agree = (engine.infer(x).argmax(1) == reference(x).argmax(1)).mean()
        assert agree >= 0.99


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="torch-cuda engine needs a CUDA GPU; none visible")
def test_torch_cuda_warm_up_captures_every_bucket_the_worker_can_send(bundle):
    engine = create_engine(bundle, "torch-cuda", cuda_graphs=True)
    engine.warm_up(6)
    captured = set(engine._graphs)
    assert {bucket_for(n, engine._buckets) for n in range(1, 7)} <= captured
    engine.infer(batch(5))  # a size between the warm-up's: no capture mid-stream
    assert set(engine._graphs) == captured


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="torch-cuda engine needs a CUDA GPU; none visible")
@pytest.mark.parametrize("graphs", [False, True])
def test_torch_cuda_instances_infer_side_by_side_on_their_own_streams(bundle, reference, graphs):
    from concurrent.futures import ThreadPoolExecutor

    engines = [create_engine(bundle, "torch-cuda", cuda_graphs=graphs) for _ in range(2)]
    for engine in engines:
        engine.warm_up(8)
    assert engines[0]._stream != engines[1]._stream
    xs = [batch(8, seed=s) for s in range(16)]

    def run_all(engine):  # each instance on one thread only, as the worker's inference threads
        return [engine.infer(x) for x in xs]

    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(run_all, engines))
    for out in outs:
        for x, logits in zip(xs, out, strict=True):
            assert (logits.argmax(1) == reference(x).argmax(1)).mean() >= 0.99


@pytest.mark.gpu
@pytest.mark.skipif(
    not (HAS_CUDA and HAS_TRT),
    reason="TensorRT plan tests need a CUDA GPU and the tensorrt package",
)
def test_tensorrt_plan_build_and_infer(checkpoint_dir, parity_dir, tmp_path, reference):
    from engine_build.build import build_bundle

    out = build_bundle(
        checkpoint_dir,
        tmp_path / "b",
        precisions="fp16,fp32",
        backends="tensorrt",
        parity_data=parity_dir,
        max_batch=8,
        opt_batch=4,
        timing_cache=tmp_path / "timing.cache",
    )
    bundle = load_bundle(out)
    plan = bundle.artifact("tensorrt", "fp16")
    assert plan.tensorrt.typing in {"strong", "weak"} and (tmp_path / "timing.cache").is_file()
    engine = create_engine(bundle, "auto")
    assert engine.name == "tensorrt-fp16"
    for n in (1, 5, 8):
        x = batch(n, seed=n)
        assert (engine.infer(x).argmax(1) == reference(x).argmax(1)).mean() >= 0.99


@pytest.mark.parametrize(
    ("built_on", "running_on"),
    [
        ("NVIDIA A100-SXM4-80GB", "NVIDIA A100-SXM4-80GB MIG 1g.10gb"),
        ("NVIDIA A100-SXM4-80GB MIG 1g.10gb", "NVIDIA A100-SXM4-80GB"),
        ("NVIDIA A100-SXM4-80GB MIG 3g.40gb", "NVIDIA A100-SXM4-80GB MIG 1g.10gb"),
    ],
)
def test_a_plan_fits_every_mig_slice_of_the_gpu_model_it_was_built_on(built_on, running_on):
    # MIG slices share the GPU's SM architecture: before, the names were compared whole
    plan = _plan(built_on)
    assert plan_mismatch(plan, running_on, "10.13.0") is None
    assert plan_mismatch(plan, running_on, "10.13.0", "9.0") is None
    assert "MIG" in mig_difference(plan, running_on)
    assert mig_difference(plan, built_on) is None


def test_mig_slices_of_another_gpu_model_or_capability_are_refused():
    why = plan_mismatch(
        _plan("NVIDIA A100-SXM4-80GB MIG 1g.10gb"), "NVIDIA H100 80GB HBM3 MIG 1g.10gb", "10.13.0"
    )
    assert "A100" in why and "H100" in why
    assert plan_mismatch(_plan("NVIDIA A100-SXM4-40GB"), "NVIDIA A100-SXM4-80GB", "10.13.0")
    why = plan_mismatch(_plan(), "NVIDIA H100 80GB HBM3", "10.13.0", "8.9")
    assert "compute capability 9.0" in why and "8.9" in why


@pytest.mark.parametrize(
    ("name", "backend"),
    [
        ("tensorrt-fp16", "tensorrt"),
        ("tensorrt-int8", "tensorrt"),
        ("torch-cuda-fp16", "torch-cuda"),
        ("torch-cuda-fp16-graphs", "torch-cuda"),
        ("torch-cpu-bf16", "torch-cpu"),
        ("onnxruntime-fp32", "onnxruntime"),
    ],
)
def test_backend_of_names_the_backend_an_engine_runs_on(name, backend):
    from types import SimpleNamespace

    from engine_build.runtime import backend_of

    assert backend_of(SimpleNamespace(name=name)) == backend


def test_backend_of_refuses_a_name_of_no_backend():
    from types import SimpleNamespace

    from engine_build.runtime import backend_of

    with pytest.raises(ValueError, match="torch-cudax"):
        backend_of(SimpleNamespace(name="torch-cudax"))
