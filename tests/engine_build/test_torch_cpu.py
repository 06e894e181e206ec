"""torch-cpu: the bfloat16 CPU backend (AMX / AVX-512 BF16), and its FP32 mode everywhere."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from engine_build.build import BuildError, ParityGateError, build_bundle
from engine_build.bundle import PARITY_FILE, load_bundle
from engine_build.runtime import Engine, EngineUnavailableError, create_engine, torch_cpu
from engine_build.runtime.torch_cpu import (
    TorchCpuEngine,
    fold_batch_norms,
    folded_checked,
    native_bf16,
)
from training.models import build_model
from worker.run import parity_note

from .conftest import batch, write_checkpoint

BF16 = native_bf16()
needs_bf16 = pytest.mark.skipif(
    BF16 is None, reason="this CPU has neither AMX nor AVX-512 BF16: torch-cpu bf16 refuses here"
)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_folding_batch_norms_keeps_the_answers_and_leaves_no_batch_norm(arch):
    torch.manual_seed(0)
    model = build_model(arch, 7).train()
    with torch.no_grad():  # running statistics away from (0, 1), as after training
        model(torch.randn(4, 3, 64, 64) * 3 + 1)
    model.eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        before = model(x)
        folded = fold_batch_norms(model)
        after = folded(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n", [1, 3, 8])
def test_fp32_matches_pytorch_at_any_batch_size(bundle, reference, n):
    engine = TorchCpuEngine(bundle, precision="fp32", threads=1)
    assert isinstance(engine, Engine) and engine.name == "torch-cpu-fp32"
    x = batch(n, seed=n)
    logits = engine.infer(x)
    assert logits.shape == (n, 3) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, reference(x), atol=1e-4, rtol=1e-4)
    engine.close()


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (np.zeros((9, 3, 32, 32), np.float32), r"batch size 9 outside 1\.\.8"),
        (np.zeros((2, 3, 64, 64), np.float32), r"\(N, 3, 32, 32\)"),
    ],
)
def test_bad_batches_are_refused(bundle, x, match):
    engine = TorchCpuEngine(bundle, precision="fp32")
    with pytest.raises(ValueError, match=match):
        engine.infer(x)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """The engine's thread setting is also PyTorch's process default: later tests (in this
    pytest process) must not inherit a test's engine's."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_apply_to_the_thread_that_infers(bundle):
    # PyTorch's intra-op team belongs to the calling thread: the worker's inference thread must
    # get the setting when it infers, whatever it inherited
    torch.set_num_threads(2)
    engine = TorchCpuEngine(bundle, precision="fp32", threads=1)
    seen: list[int] = []

    def infer() -> None:
        seen.append(torch.get_num_threads())
        engine.infer(batch(1))
        seen.append(torch.get_num_threads())

    t = threading.Thread(target=infer)
    t.start()
    t.join()
    assert seen == [2, 1]  # built without touching threads; set by the first infer


def test_bf16_refuses_a_cpu_without_native_bfloat16(bundle, monkeypatch):
    monkeypatch.setattr(torch_cpu, "native_bf16", lambda: None)
    with pytest.raises(EngineUnavailableError, match="AMX or AVX-512 BF16"):
        create_engine(bundle, "torch-cpu")
    with pytest.raises(EngineUnavailableError, match="not 'int8'"):
        TorchCpuEngine(bundle, precision="int8")


def test_create_engine_passes_precision_and_refuses_onnx_runtimes_int8(bundle):
    # fp32 runs anywhere (for checks); the worker's onnx_precision int8 is a mistake with
    # torch-cpu, refused in one line rather than silently run in bf16
    assert create_engine(bundle, "torch-cpu", precision="fp32").name == "torch-cpu-fp32"
    with pytest.raises(EngineUnavailableError, match="int8 is ONNX Runtime's"):
        create_engine(bundle, "torch-cpu", precision="int8")


def test_auto_never_picks_torch_cpu(bundle):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: auto picks a GPU backend here")
    assert create_engine(bundle, "auto", threads=1).name == "onnxruntime-fp32"


@needs_bf16
def test_bf16_answers_like_fp32_within_bfloat16_precision(bundle, reference):
    # the worker passes no precision for its default fp32, and ONNX Runtime's spinning is ignored
    engine = create_engine(bundle, "torch-cpu", threads=1, spinning=False)
    assert engine.name == "torch-cpu-bf16"
    x = batch(8, seed=3)
    logits, ref = engine.infer(x), reference(x)
    assert logits.dtype == np.float32 and np.isfinite(logits).all()
    # bfloat16 keeps 8 bits of mantissa: logits move by a few per cent of their range
    assert np.abs(logits - ref).max() < 0.05 * np.abs(ref).max() + 0.05
    margin = np.sort(ref, axis=1)[:, -1] - np.sort(ref, axis=1)[:, -2]
    clear = margin > 0.1 * np.abs(ref).max()
    assert (logits.argmax(1) == ref.argmax(1))[clear].all()


def test_bundle_build_refuses_bf16_on_a_cpu_without_it(
    checkpoint_dir, parity_dir, tmp_path, monkeypatch
):
    monkeypatch.setattr(torch_cpu, "native_bf16", lambda: None)
    with pytest.raises(BuildError, match="--precision bf16: this CPU has neither AMX"):
        build_bundle(checkpoint_dir, tmp_path / "b", precisions="fp32,bf16", parity_data=parity_dir)
    assert not (tmp_path / "b").exists()


@needs_bf16
def test_bundle_build_with_bf16_records_its_parity_and_the_worker_logs_it(
    checkpoint_dir, parity_dir, tmp_path
):
    out = build_bundle(
        checkpoint_dir, tmp_path / "b", precisions="fp32,bf16", parity_data=parity_dir, max_batch=8
    )
    report = json.loads((out / PARITY_FILE).read_text())["artifacts"]["torch-cpu-bf16"]
    assert report["file"] == "model.pt" and report["n_images"] == 12
    assert report["gate"]["min_top1_agreement"] == 0.98
    assert report["max_abs_logit_diff"] > 0  # really bfloat16, not the FP32 model again
    assert report["top1_agreement"] >= 0.98 and report["non_finite_logits"] == 0
    bundle = load_bundle(out)
    assert [a.file for a in bundle.manifest.artifacts] == ["model.onnx", "model.pt"]
    text, sound = parity_note(bundle.parity, "torch-cpu-bf16")
    assert sound and "12 parity images" in text


@needs_bf16
def test_bf16_gate_fails_a_model_bfloat16_cannot_reproduce(parity_dir, tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt", near_tie=True)
    with pytest.raises(ParityGateError, match=r"model\.pt: top-1 agreement .* < 0\.98"):
        build_bundle(ckpt, tmp_path / "b", precisions="fp32,bf16", parity_data=parity_dir)
    assert not (tmp_path / "b").exists()


def test_a_model_the_fold_misreads_is_refused_at_load():
    class BatchNormBeforeItsConv(torch.nn.Module):
        # registered conv, bn, but run bn first: folding by registration order would be wrong
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(3)

        def forward(self, x):
            return self.conv(self.bn(x))

    model = BatchNormBeforeItsConv()
    with torch.no_grad():
        model.bn.running_mean.fill_(2.0)
        model.bn.running_var.fill_(4.0)
    with pytest.raises(EngineUnavailableError, match="changed the model's answers"):
        folded_checked(model.eval(), 16)
    assert isinstance(folded_checked(build_model("resnet18", 3).eval(), 32).bn1, torch.nn.Identity)
