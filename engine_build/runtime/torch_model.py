"""The bundle's ``model.pt`` as an eval-mode torchvision model: what both PyTorch engines run."""

from __future__ import annotations

import torch

from engine_build.bundle import Bundle
from engine_build.runtime.base import EngineUnavailableError
from training.models import build_model


def load_torch_model(bundle: Bundle) -> tuple[torch.nn.Module, str]:
    """The FP32 model of the bundle's torch artifact, on the CPU, and that artifact's file name.

    Raises EngineUnavailableError when the bundle has no ``model.pt``.
    """
    artifact = bundle.artifact("torch")
    if artifact is None:
        raise EngineUnavailableError(f"bundle {bundle.path} has no torch artifact (model.pt)")
    m = bundle.manifest
    state = torch.load(bundle.artifact_path(artifact), map_location="cpu", weights_only=True)
    model = build_model(m.arch, m.num_classes)
    model.load_state_dict(state)
    return model.eval(), artifact.file
