"""The FP16 export the TensorRT plan is built from: BatchNorm folded in FP32, then cast to half."""

from __future__ import annotations

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
