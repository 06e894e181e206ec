"""PyTorch -> ONNX with a dynamic batch axis, checked by onnx.checker and loaded by ONNX Runtime.

The TorchScript exporter (``dynamo=False``) is used: torch 2.14's default torch.export-based
exporter needs ``onnxscript``, which is not a dependency and cannot be fetched offline, and the
TorchScript path exports torchvision ResNets exactly.
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from engine_build.runtime.onnxruntime_engine import make_session

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
# The opsets a build accepts (--opset). Above 20 torch 2.14's TorchScript exporter only warns
# that it does not support the opset (ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET) and errors past 23.
# Below 13 the int8 artifact breaks: ONNX Runtime's per-channel QDQ model puts an ``axis`` on
# DequantizeLinear, which opsets before 13 do not have (the model fails to load); below 9 the
# exporter also keeps weights as graph inputs and skips constant folding. TensorRT 10's parser
# reads opset 9 and up. One range for every build, so an fp32-only bundle can always gain int8.
MIN_OPSET, MAX_OPSET = 13, 20


class ExportError(RuntimeError):
    """The exported graph failed onnx.checker or could not be loaded by ONNX Runtime."""


# fused FP32 vs unfused FP32 logits: ~2e-6 of the largest logit for torchvision ResNets
FOLD_RTOL = 1e-4


def fold_batch_norms_fp32(model: nn.Module, probe_size: int = 64) -> nn.Module:
    """A copy of eval-mode ``model`` with every BatchNorm folded into the convolution feeding it,
    computed in FP32, and checked to give the same logits as ``model`` on a random batch.

    The fold follows the data flow (torch.fx: a Conv whose output only feeds a BatchNorm), not
    module names, so it holds for any traceable model (torchvision ResNets: conv1/bn1,
    layerX.Y.convK/bnK, downsample.0/1). Done in FP32 because the BN scale gamma/sqrt(var+eps)
    of a channel with a tiny running variance overflows or rounds badly in FP16, which is where
    the exporter's own constant folding would compute it for a half model.
    """
    from torch.fx.experimental.optimization import fuse

    model = copy.deepcopy(model).float().eval()
    try:
        folded = fuse(model, inplace=True)
    except torch.fx.proxy.TraceError as exc:  # data-dependent control flow, say
        raise ExportError(f"cannot fold BatchNorm: torch.fx cannot trace the model: {exc}") from exc
    x = torch.randn(2, 3, probe_size, probe_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before, after = model(x), folded(x)
    diff = float((after - before).abs().max())
    scale = float(before.abs().max())
    if not diff <= FOLD_RTOL * scale:  # also refuses NaN
        raise ExportError(
            f"folding BatchNorm into the convolutions changed the FP32 logits by {diff:.3g} "
            f"(largest logit {scale:.3g}, allowed {FOLD_RTOL:g} of it)"
        )
    left = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    log.info(
        "folded BatchNorm into the convolutions in FP32 (max |logit diff| %.3g, %d BatchNorm "
        "left unfolded)",
        diff,
        left,
    )
    return folded


class HalfPrecision(nn.Module):
    """FP16 weights and activations with FP32 graph I/O: a strongly-typed FP16 network for TRT.

    BatchNorm is folded into the convolutions in FP32 before the cast (see
    :func:`fold_batch_norms_fp32`); the caller's model is left as it was.
    """

    def __init__(self, model: nn.Module, probe_size: int = 64):
        super().__init__()
        self.model = fold_batch_norms_fp32(model, probe_size).half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.half()).float()


def export_onnx(
    model: nn.Module,
    path: Path,
    image_size: int,
    input_name: str = "images",
    output_name: str = "logits",
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export ``model`` (eval mode) to ``path`` and prove the file is usable before returning."""
    path = Path(path)
    dummy = torch.zeros(2, 3, image_size, image_size, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy-exporter notice
        torch.onnx.export(
            model.eval(),
            (dummy,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=[input_name],
            output_names=[output_name],
            dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
            do_constant_folding=True,
        )
    check_onnx(path)
    return path


def check_onnx(path: Path) -> None:
    """onnx.checker (full check) and an ONNX Runtime session; raise ExportError on either."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker rejected {path}: {exc}") from exc
    try:
        session = make_session(str(path), threads=1)
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
        raise ExportError(f"ONNX Runtime cannot load {path}: {exc}") from exc
    for io in (*session.get_inputs(), *session.get_outputs()):
        log.info("onnx %s: %s %s %s", path.name, io.name, io.type, io.shape)
