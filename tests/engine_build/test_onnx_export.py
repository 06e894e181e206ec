"""The FP16 export the TensorRT plan is built from: BatchNorm folded in FP32, then cast to half."""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from engine_build.onnx_export import ExportError, HalfPrecision, export_onnx, fold_batch_norms_fp32
from training.models import build_model


def tiny_variance_model() -> nn.Module:
    """Conv -> BatchNorm whose scale gamma/sqrt(var+eps) = 300/sqrt(1.1e-5) ~ 9e4 is above FP16's
    65504 (a channel that barely varied in training), while the folded weights stay small."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )
    with torch.no_grad():
        model[0].weight.mul_(0.05)
        model[1].running_var.fill_(1e-6)
        model[1].running_mean.fill_(0.01)
        model[1].weight.fill_(300.0)
    return model.eval()


def test_fp16_export_of_a_tiny_variance_batchnorm_matches_fp32(tmp_path):
    # before: model.half() then export, and the exporter folded BN in FP16: inf scale, NaN logits
    model = tiny_variance_model()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x).numpy()
    path = export_onnx(HalfPrecision(model), tmp_path / "fp16.onnx", 32)
    (out,) = ort.InferenceSession(str(path)).run(None, {"images": x.numpy()})
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref, atol=2e-3 * np.abs(ref).max())
    assert (out.argmax(1) == ref.argmax(1)).all()


def test_half_precision_leaves_the_callers_model_alone():
    model = tiny_variance_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    HalfPrecision(model)
    after = model.state_dict()
    assert all(v.dtype == before[k].dtype and torch.equal(v, before[k]) for k, v in after.items())
    assert isinstance(model[1], nn.BatchNorm2d)


def test_every_resnet_batchnorm_is_folded_in_fp32_with_the_same_logits():
    torch.manual_seed(0)
    model = build_model("resnet50", 5).train()
    with torch.no_grad():  # non-trivial running statistics
        model(torch.randn(4, 3, 64, 64))
    model.eval()
    folded = fold_batch_norms_fp32(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())  # downsample too
    assert all(p.dtype == torch.float32 for p in folded.parameters())
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = model(x), folded(x)
    assert float((a - b).abs().max()) <= 1e-5 * float(a.abs().max())


def test_a_fold_that_changes_the_answers_is_refused(monkeypatch):
    import torch.nn.utils.fusion as fusion

    real = fusion.fuse_conv_bn_eval

    def wrong(conv, bn, transpose=False):
        fused = real(conv, bn, transpose)
        fused.bias.data += 1.0
        return fused

    monkeypatch.setattr("torch.fx.experimental.optimization.fuse_conv_bn_eval", wrong)
    with pytest.raises(ExportError, match="changed the FP32 logits"):
        fold_batch_norms_fp32(tiny_variance_model())


def calibrated_resnet(arch: str, seed: int = 0) -> nn.Module:
    """``arch`` with realistic BatchNorm statistics: random affine parameters, running stats from
    one train-mode pass (the reviewer's reproduction of FP32 rounding noise at ResNet-101 depth)."""
    torch.manual_seed(seed)
    model = build_model(arch, 431)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # running stats = this batch's
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 64, 64))
    return model.eval()


def test_a_resnet101_with_calibrated_batchnorm_folds_within_fp32_noise():
    # before: FOLD_RTOL 1e-4 of the largest logit, below FP32's own rounding at this depth
    # (~1.5e-4 unfused vs FP64 here), so the fold was refused and no FP16 plan could be built
    model = calibrated_resnet("resnet101")
    folded = fold_batch_norms_fp32(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = model.double()(x.double())
        err = float((folded(x).double() - exact).abs().max() / exact.abs().max())
    assert err < 1e-3  # FP32 rounding, not a misread fold


def test_a_fold_wrong_by_more_than_fp32_noise_is_refused_at_resnet18_depth(monkeypatch):
    # before: a fixed 1e-4 of the largest logit let this through (it moves them by ~4e-5), while
    # FP32's own rounding at ResNet-18 is ~2e-6
    import torch.nn.utils.fusion as fusion

    real = fusion.fuse_conv_bn_eval

    def slightly_wrong(conv, bn, transpose=False):
        fused = real(conv, bn, transpose)
        fused.bias.data += 3e-6
        return fused

    model = calibrated_resnet("resnet18")
    monkeypatch.setattr("torch.fx.experimental.optimization.fuse_conv_bn_eval", slightly_wrong)
    with pytest.raises(ExportError, match="unfused FP32 model's own"):
        fold_batch_norms_fp32(model)


class DataDependent(nn.Module):
    """A Conv -> BatchNorm model torch.fx cannot trace (``len`` of a proxy, or control flow on a
    value), with a tiny-variance BN whose scale overflows FP16 unless folded in FP32 first."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
        with torch.no_grad():
            self.conv.weight.mul_(0.05)
            self.bn.running_var.fill_(1e-6)
            self.bn.running_mean.fill_(0.01)
            self.bn.weight.fill_(300.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "len" and len(x) == 0:  # RuntimeError under fx, not a TraceError
            raise ValueError("empty batch")
        if x.sum() > -1e9:  # TraceError under fx
            x = x * 1.0
        return self.head(self.bn(self.conv(x)))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the ONNX trace of len, if
@pytest.mark.parametrize("how", ["len", "control-flow"])
def test_a_model_fx_cannot_trace_still_exports_with_a_warning(tmp_path, caplog, how):
    # before: RuntimeError escaped raw ("len"), or ExportError ("control-flow"): no FP16 export
    model = DataDependent(how).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x).numpy()
    with caplog.at_level(logging.WARNING, logger="engine_build.onnx_export"):
        path = export_onnx(HalfPrecision(model), tmp_path / "fp16.onnx", 32)
    assert any("torch.fx cannot trace" in r.getMessage() for r in caplog.records)
    (out,) = ort.InferenceSession(str(path)).run(None, {"images": x.numpy()})
    assert np.isfinite(out).all()  # the module-walk fold still folded BN in FP32
    np.testing.assert_allclose(out, ref, atol=2e-3 * np.abs(ref).max())


class BatchNormFirst(nn.Module):
    """Untraceable, and its conv is registered before the BN although the BN runs first: a fold
    by registration order is wrong (``out`` 3: the check refuses it) or does not fit (``out`` 4:
    the channel counts differ and the fold itself raises)."""

    def __init__(self, out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, out, 1)
        self.bn = nn.BatchNorm2d(3)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) == 0:
            raise ValueError("empty batch")
        return self.head(self.conv(self.bn(x)))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the ONNX trace of len, if
@pytest.mark.parametrize(("out", "why"), [(3, "changed the FP32 logits"), (4, "RuntimeError")])
def test_an_untraceable_model_no_fold_fits_is_exported_unfused_with_a_warning(
    tmp_path, caplog, out, why
):
    torch.manual_seed(0)
    model = BatchNormFirst(out).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x).numpy()
    with caplog.at_level(logging.WARNING, logger="engine_build.onnx_export"):
        path = export_onnx(HalfPrecision(model), tmp_path / "fp16.onnx", 16)
    warned = [r.getMessage() for r in caplog.records]
    assert any("exporting the model unfused" in m and why in m for m in warned), warned
    (got,) = ort.InferenceSession(str(path)).run(None, {"images": x.numpy()})
    np.testing.assert_allclose(got, ref, atol=5e-3 * np.abs(ref).max())


def test_a_weight_fp16_cannot_hold_is_named_at_the_cast():
    # before: HalfPrecision built a model with an inf weight; only parity failed, much later
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    with torch.no_grad():
        model[0].weight[1, 2] = 1e6  # > 65504
    with pytest.raises(ExportError, match=r"^0\.weight is not finite in FP16.*1e\+06.*65504"):
        HalfPrecision(model)
