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

from engine_build.runtime.base import first_line
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


# How close a BatchNorm fold must stay to the unfused model. Both FP32 models are compared with an
# FP64 run of the unfused one (the fold itself is exact there: FP64 folded vs unfused differ by
# ~4e-13 of the largest logit at ResNet-101), and the folded model's error must be at most
# FOLD_NOISE_FACTOR times the unfused FP32 model's own rounding error, plus FOLD_FLOOR of the
# largest logit (for a model FP32 happens to run almost exactly, where the fold's own rounding
# of the weights is all there is). A fixed tolerance cannot work: FP32 rounding grows with depth
# and with how well the BatchNorms normalise. Measured with torch.fx's fuse on torchvision ResNets
# with 431 classes, BN weight U(0.5, 1.5) and bias U(-0.2, 0.2), running stats from one
# train-mode pass (momentum None) on 8 random 64x64 images, probe 2x3x64x64 as here, 8 seeds
# (max |diff| / largest logit):
#   resnet18   folded vs unfused 2.2-3.6e-6, unfused vs FP64 1.6-2.3e-6
#   resnet50   folded vs unfused 4.0-5.7e-5, unfused vs FP64 3.2-3.7e-5
#   resnet101  folded vs unfused 1.7-3.2e-4, unfused vs FP64 1.0-2.0e-4
# With those stats then randomised (mean + 0.2 std N(0, 1), var x U(0.5, 2)), 6 seeds: all three
# 0.9e-6 to 1.1e-5. Folded-vs-FP64 over unfused-vs-FP64 was 0.66-1.60 in those 42 runs (up to
# 1.76 with uniform random stats that blow the logits up to 1e9-1e21): a fold is no less accurate
# than the model it replaces, so 4x is room for chance, not for a wrong fold. Every folded bias
# off by 3e-6 (ResNet-18 logits moved by 4e-5 of the largest, within the former fixed 1e-4) is
# refused.
FOLD_NOISE_FACTOR = 4.0
FOLD_FLOOR = 1e-5


def _check_fold(model: nn.Module, folded: nn.Module, x: torch.Tensor) -> float:
    """The folded model's max |logit error| vs FP64, after checking it is within FP32 noise
    (see FOLD_NOISE_FACTOR); raise ExportError naming the figures when it is not."""
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(x.double())
        unfused = model(x).double()
        after = folded(x).double()
    scale = float(exact.abs().max())
    noise = float((unfused - exact).abs().max())
    err = float((after - exact).abs().max())
    allowed = FOLD_NOISE_FACTOR * noise + FOLD_FLOOR * scale
    if not err <= allowed:  # also refuses NaN/inf (allowed is NaN/inf then, or err is)
        raise ExportError(
            f"folding BatchNorm into the convolutions changed the FP32 logits: max |diff| vs an "
            f"FP64 run {err:.3g}, the unfused FP32 model's own {noise:.3g} (largest logit "
            f"{scale:.3g}; allowed {FOLD_NOISE_FACTOR:g}x that + {FOLD_FLOOR:g} of the largest)"
        )
    return err


def _reason(exc: BaseException) -> str:
    """``Type: first line of the message``, for a one-line log."""
    return f"{type(exc).__name__}: {first_line(exc)}"


def _fold_by_registration_order(model: nn.Module) -> nn.Module:
    from engine_build.runtime.torch_cpu import fold_batch_norms

    return fold_batch_norms(copy.deepcopy(model))


def fold_batch_norms_fp32(model: nn.Module, probe_size: int = 64) -> nn.Module:
    """A copy of eval-mode ``model`` with every BatchNorm folded into the convolution feeding it,
    computed in FP32, and checked to give the same logits as ``model`` on a random batch (within
    FP32's own rounding noise: see FOLD_NOISE_FACTOR).

    The fold follows the data flow (torch.fx: a Conv whose output only feeds a BatchNorm), not
    module names, so it holds for any traceable model (torchvision ResNets: conv1/bn1,
    layerX.Y.convK/bnK, downsample.0/1). Done in FP32 because the BN scale gamma/sqrt(var+eps)
    of a channel with a tiny running variance overflows or rounds badly in FP16, which is where
    the exporter's own constant folding would compute it for a half model.

    A model torch.fx cannot trace (data-dependent control flow, ``len`` of a tensor, ...) is
    folded by registration order instead (a Conv2d followed by a BatchNorm2d among a module's
    children), with a WARNING; when that fold fails the check too, the model is returned
    unfolded, with another WARNING (the FP16 export then folds BN in FP16, as it did before).
    """
    from torch.fx.experimental.optimization import fuse

    model = copy.deepcopy(model).float().eval()
    x = torch.randn(2, 3, probe_size, probe_size, generator=torch.Generator().manual_seed(0))
    try:  # only the trace and fuse: the check below is not a tracing failure
        folded = fuse(model)
    except Exception as exc:  # TraceError, RuntimeError (len of a proxy), TypeError, ...
        log.warning(
            "torch.fx cannot trace the model (%s); folding BatchNorm by module registration "
            "order instead",
            _reason(exc),
        )
        try:  # a Conv2d/BatchNorm2d pair by order only may not even fit (channel counts)
            folded = _fold_by_registration_order(model)
            err = _check_fold(model, folded, x)
        except (ExportError, RuntimeError) as exc:
            log.warning(
                "folding BatchNorm by registration order failed (%s); exporting the model "
                "unfused (the exporter then folds BatchNorm in FP16, where a channel with a tiny "
                "running variance may overflow; the parity check catches that)",
                _reason(exc),
            )
            return model
    else:
        err = _check_fold(model, folded, x)
    left = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    log.info(
        "folded BatchNorm into the convolutions in FP32 (max |logit diff| vs FP64 %.3g, %d "
        "BatchNorm left unfolded)",
        err,
        left,
    )
    return folded


FP16_MAX = float(torch.finfo(torch.float16).max)


def to_half_checked(model: nn.Module) -> nn.Module:
    """``model`` cast to FP16, refusing (ExportError) a parameter or buffer that is not finite
    there, named: an FP32 value beyond FP16's 65504 would otherwise be inf in the plan and only
    show up as a failed parity check."""
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        t = t.detach()
        if t.is_floating_point() and not bool(torch.isfinite(t.half()).all()):
            finite = t[torch.isfinite(t)]
            big = float(finite.abs().max()) if finite.numel() else float("nan")
            raise ExportError(
                f"{name} is not finite in FP16 (largest finite |value| {big:.3g} in FP32, FP16 "
                f"holds up to {FP16_MAX:g}"
                + (", and it is already non-finite in FP32)" if finite.numel() < t.numel() else ")")
            )
    return model.half()


class HalfPrecision(nn.Module):
    """FP16 weights and activations with FP32 graph I/O: a strongly-typed FP16 network for TRT.

    BatchNorm is folded into the convolutions in FP32 before the cast (see
    :func:`fold_batch_norms_fp32`), and every weight must be finite in FP16; the caller's model
    is left as it was.
    """

    def __init__(self, model: nn.Module, probe_size: int = 64):
        super().__init__()
        self.model = to_half_checked(fold_batch_norms_fp32(model, probe_size))

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
