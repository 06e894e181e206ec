"""torchvision ResNets with a fresh head, and where their ImageNet weights come from."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import nn
from torchvision import models

log = logging.getLogger(__name__)

ARCHS: dict[str, tuple] = {
    "resnet18": (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (models.resnet34, models.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (models.resnet50, models.ResNet50_Weights.IMAGENET1K_V2),
    "resnet101": (models.resnet101, models.ResNet101_Weights.IMAGENET1K_V2),
}


class UnknownArchError(ValueError):
    pass


def torch_load_weights_only(file: Path, what: str = "checkpoint") -> object:
    """``torch.load(weights_only=True)`` on CPU; a file it cannot read is a ValueError saying so.

    torch's own message talks about weights_only, which would send users the wrong way, and its
    pickle-protocol warning is noise here.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"not a PyTorch {what}, or a damaged one ({exc.__class__.__name__})"
        ) from exc


def build_model(arch: str, num_classes: int) -> nn.Module:
    """An untrained ``arch`` whose ``fc`` has ``num_classes`` outputs."""
    if arch not in ARCHS:
        raise UnknownArchError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    ctor, _ = ARCHS[arch]
    model = ctor(weights=None)
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def load_pretrained_backbone(model: nn.Module, arch: str, pretrained: str) -> str:
    """Load ImageNet weights into everything but ``fc``; return where they came from.

    ``pretrained`` is ``imagenet`` (torchvision's download, cached in TORCH_HOME), ``none``, or a
    path to a state_dict file. Offline without a cached file, training starts from scratch and
    says so rather than failing.
    """
    if pretrained == "none":
        return "none (from scratch)"
    if pretrained == "imagenet":
        _, weights = ARCHS[arch]
        try:
            state = weights.get_state_dict(progress=False)
        except Exception as exc:  # offline, DNS failure, proxy: all surface differently
            log.warning(
                "could not get ImageNet weights %s (%s); training %s FROM SCRATCH",
                weights,
                exc.__class__.__name__,
                arch,
            )
            return "none (ImageNet weights unavailable offline; from scratch)"
        source = f"torchvision:{weights}"
    else:
        path = Path(pretrained)
        if not path.is_file():
            raise FileNotFoundError(f"--pretrained: no such weights file: {path}")
        state = torch_load_weights_only(path, "state dict or checkpoint")
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not (
            isinstance(state, dict)
            and state
            and all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items())
        ):
            raise ValueError(
                f"not a PyTorch state dict or checkpoint (holds a {type(state).__name__} "
                f"that does not map parameter names to tensors)"
            )
        source = f"file:{path}"
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # same names, other shapes: another arch's weights
        detail = " ".join(str(exc).split())
        raise ValueError(f"pretrained weights {source} do not fit {arch}: {detail[:200]}") from exc
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(
            f"pretrained weights {source} do not fit {arch}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    log.info("loaded backbone weights from %s", source)
    return source
