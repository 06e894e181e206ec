"""PyTorch on the CPU in bfloat16: oneDNN's AMX / AVX-512 BF16 kernels on CPUs that have them.

On a Xeon with AMX (Sapphire Rapids and later) ResNet-50 in bfloat16 runs several times faster
than ONNX Runtime's FP32 on the same cores (benchmarks/results/amx_bf16). Without native bf16
instructions oneDNN emulates bfloat16 and is slower than FP32, so the engine refuses to start
there rather than run slowly.
"""

from __future__ import annotations

import itertools
import logging
import threading

import numpy as np
import torch

from engine_build.bundle import Bundle
from engine_build.runtime.base import EngineUnavailableError, InputSpec, check_batch, input_spec_of
from engine_build.runtime.torch_model import load_torch_model

log = logging.getLogger(__name__)

PRECISIONS = ("bf16", "fp32")


def native_bf16() -> str | None:
    """The CPU feature that makes bfloat16 fast here (``amx`` or ``avx512_bf16``), else None."""
    cpu = torch.cpu
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "amx"
    if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "avx512_bf16"
    return None


def fold_batch_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every eval-mode BatchNorm2d into the Conv2d before it (one pass less per layer).

    Exact in real arithmetic; in float32 it moves logits by ~1e-5. Handles torchvision ResNets,
    whose BatchNorm follows its conv as a sibling attribute (``convN``/``bnN``, ``downsample``).
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    def fold(parent: torch.nn.Module) -> None:
        names = list(parent._modules)
        for prev, name in itertools.pairwise(names):
            conv, bn = parent._modules[prev], parent._modules[name]
            if isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d):
                parent._modules[prev] = fuse_conv_bn_eval(conv, bn)
                parent._modules[name] = torch.nn.Identity()
        for child in parent.children():
            fold(child)

    # torchvision's Bottleneck/BasicBlock register conv1, bn1, conv2, bn2, ... in that order
    fold(model)
    return model


def folded_checked(model: torch.nn.Module, size: int) -> torch.nn.Module:
    """``model`` with its BatchNorms folded, after checking it still answers like the original
    on a random batch: the fold trusts registration order, and a model it misreads fails here,
    at load, not in wrong answers later."""
    import copy

    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # not inference_mode: the folded weights must stay normal tensors
        before = model(x)
        folded = fold_batch_norms(copy.deepcopy(model))
        after = folded(x)
    scale = float(before.abs().max()) + 1e-6
    if not torch.allclose(after, before, atol=1e-3 * scale, rtol=1e-3):
        raise EngineUnavailableError(
            f"folding BatchNorm into the convolutions changed the model's answers (max |diff| "
            f"{float((after - before).abs().max()):.3g}); torch-cpu handles torchvision ResNets"
        )
    return folded


class TorchCpuEngine:
    """ResNet from the bundle's ``model.pt`` on the CPU, channels_last, in ``precision``.

    ``threads`` is set (``torch.set_num_threads``) on every thread that calls :meth:`infer`: the
    OpenMP team belongs to the calling thread, so N instances on N inference threads with 1
    thread each use N cores. It is also PyTorch's process-wide default from then on, which the
    threads started later inherit.
    """

    def __init__(self, bundle: Bundle, precision: str = "bf16", threads: int | None = None):
        if precision not in PRECISIONS:
            raise EngineUnavailableError(
                f"torch-cpu runs {' or '.join(PRECISIONS)}, not {precision!r} (int8 is ONNX "
                "Runtime's: onnx_precision applies to the onnxruntime backend)"
            )
        feature = native_bf16()
        if precision == "bf16" and feature is None:
            raise EngineUnavailableError(
                "torch-cpu bf16 needs a CPU with AMX or AVX-512 BF16 (this one has neither, and "
                "emulated bfloat16 is slower than onnxruntime's FP32)"
            )
        model, weights_file = load_torch_model(bundle)
        m = bundle.manifest
        model = folded_checked(model, min(m.preprocess.crop, 64))
        model = model.to(memory_format=torch.channels_last)
        self._dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self._model = model.to(self._dtype)
        self._threads = threads
        self._local = threading.local()
        self.name = f"torch-cpu-{precision}"
        self.max_batch = m.batch_profile.max
        self._spec = input_spec_of(bundle)
        log.info(
            "loaded %s from %s (threads=%s, cpu bf16: %s)",
            self.name,
            weights_file,
            threads or f"torch default {torch.get_num_threads()}",
            feature or "none",
        )

    def input_spec(self) -> InputSpec:
        return self._spec

    def _set_threads(self) -> None:
        if self._threads and getattr(self._local, "threads", None) != self._threads:
            torch.set_num_threads(self._threads)
            self._local.threads = self._threads

    @torch.inference_mode()
    def infer(self, batch: np.ndarray) -> np.ndarray:
        batch = check_batch(batch, self._spec, self.max_batch)
        self._set_threads()
        x = torch.from_numpy(batch).to(self._dtype).contiguous(memory_format=torch.channels_last)
        return self._model(x).float().numpy()

    def close(self) -> None:
        self._model = None
