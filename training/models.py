"""torchvision ResNets with a fresh head, and where their ImageNet weights come from."""

from __future__ import annotations

import http.client
import logging
import socket
import ssl
import urllib.error
import warnings
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision import models
from torchvision.models import WeightsEnum

from training.datasets.base import message_line

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
        with open(file, "rb") as f:
            head = f.read(4)
    except OSError:
        head = b"PK\x03\x04"  # torch.load's own error names it below
    # torch.save writes a zip archive (PyTorch >= 1.6) or, before that, a pickle (protocol 2+):
    # anything else (the labels.json beside a checkpoint, a text file) is no checkpoint at all,
    # which torch would report as a weights-only refusal of a pickle
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise ValueError(
            f"not a PyTorch {what} file (torch.save writes a zip archive; this one starts "
            f"with {head!r})"
        )
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


# where a checkpoint keeps its weights, in order of preference: with --ema-decay a carstream
# checkpoint's ema_state_dict is the model that was scored and shipped, state_dict the raw weights
CHECKPOINT_WEIGHT_KEYS = ("ema_state_dict", "state_dict")


def weights_key(state: object) -> str | None:
    """The key of ``CHECKPOINT_WEIGHT_KEYS`` that :func:`as_state_dict` takes the weights from
    (None: ``state`` is a state dict itself)."""
    if isinstance(state, dict):
        for key in CHECKPOINT_WEIGHT_KEYS:
            if isinstance(state.get(key), dict) and state[key]:
                return key
    return None


def as_state_dict(state: object) -> dict[str, torch.Tensor]:
    """``state`` (a loaded weights file) as a state dict, taken out of a checkpoint where it is
    one (its ``ema_state_dict`` when it has one, else its ``state_dict``: :func:`weights_key`); a
    ValueError when it maps no parameter names to tensors."""
    key = weights_key(state)
    if key is not None:
        state = state[key]  # type: ignore[index]
    if not (
        isinstance(state, dict)
        and state
        and all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items())
    ):
        raise ValueError(
            f"not a PyTorch state dict or checkpoint (holds a {type(state).__name__} "
            f"that does not map parameter names to tensors)"
        )
    return state


# what a failed download raises (offline, DNS, proxy, TLS, a dropped connection). Not OSError as
# a whole: a cache folder that cannot be written (PermissionError, a full disk) is no network
# problem, and is reported as the path error it is rather than passed off as "offline"
NETWORK_ERRORS = (
    urllib.error.URLError,  # HTTPError too; urlopen wraps DNS, refused and TLS failures in it
    http.client.HTTPException,  # IncompleteRead, RemoteDisconnected: dropped mid-body
    ConnectionError,
    TimeoutError,  # socket.timeout
    socket.gaierror,
    ssl.SSLError,
)


def cached_weights_path(weights: WeightsEnum) -> Path:
    """Where torchvision keeps ``weights`` once downloaded (``load_state_dict_from_url``'s path):
    ``<TORCH_HOME>/hub/checkpoints/<the URL's file name>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def imagenet_state(weights: WeightsEnum, arch: str) -> dict[str, torch.Tensor] | None:
    """torchvision's ImageNet weights for ``arch``: downloaded into TORCH_HOME's cache unless
    there, then read from it; None when the download fails (offline).

    Only a failed download means offline. A cached file that does not load is refused, naming
    it: training from scratch instead would pass a damaged cache off as a network problem, and
    every later run would do the same.
    """
    cached = cached_weights_path(weights)
    if not cached.is_file():
        log.info("downloading ImageNet weights %s to %s", weights.url, cached)
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            # downloads to a temporary file and renames it: a failed download leaves no file.
            # No hash check, as torchvision's get_state_dict makes none (check_hash=False):
            # some of its files' names do not carry their hash (pytorch/vision#7744)
            torch.hub.download_url_to_file(weights.url, str(cached), progress=False)
        except NETWORK_ERRORS as exc:
            log.warning(
                "could not download ImageNet weights %s (%s: %s); training %s FROM SCRATCH",
                weights,
                exc.__class__.__name__,
                message_line(exc),
                arch,
            )
            return None
        except OSError as exc:  # not the network: the cache folder (unwritable, a full disk)
            raise ValueError(
                f"cannot write ImageNet weights to {cached}: {exc.__class__.__name__}: "
                f"{message_line(exc)} (torchvision's cache, under TORCH_HOME)"
            ) from exc
    try:
        return as_state_dict(torch_load_weights_only(cached, "state dict"))
    except ValueError as exc:
        raise ValueError(
            f"cached ImageNet weights {cached}: {exc}; delete the file to download it again "
            "(torchvision's cache, under TORCH_HOME)"
        ) from exc


def pretrained_file(path: Path) -> Path:
    """The weights file ``--pretrained PATH`` names: PATH itself, or a checkpoint directory's
    ``checkpoint.pt``, so a training run's --out works as it does for --resume."""
    from training.checkpoint import CHECKPOINT_FILE  # training.checkpoint imports this module

    if path.is_dir():
        if (path / CHECKPOINT_FILE).is_file():
            return path / CHECKPOINT_FILE
        raise IsADirectoryError(
            f"--pretrained: {path} is a directory with no {CHECKPOINT_FILE}; pass a weights file"
        )
    if not path.is_file():
        raise FileNotFoundError(f"--pretrained: no such weights file: {path}")
    return path


def load_pretrained_backbone(model: nn.Module, arch: str, pretrained: str) -> str:
    """Load ImageNet weights into everything but ``fc``; return where they came from.

    ``pretrained`` is ``imagenet`` (torchvision's download, cached in TORCH_HOME), ``none``, or a
    path to a state_dict or checkpoint file, or to a checkpoint directory (its ``checkpoint.pt``,
    as ``--resume`` and ``evaluate --checkpoint`` take it; recorded as that file). Offline without
    a cached file, training starts from scratch and says so rather than failing; a damaged cached
    file is a ValueError naming it.
    """
    if pretrained == "none":
        return "none (from scratch)"
    if pretrained == "imagenet":
        _, weights = ARCHS[arch]
        state = imagenet_state(weights, arch)
        if state is None:
            return "none (ImageNet weights unavailable offline; from scratch)"
        source = f"torchvision:{weights}"
        where = f"{source} (cached file {cached_weights_path(weights)})"
    else:
        path = pretrained_file(Path(pretrained))
        loaded = torch_load_weights_only(path, "state dict or checkpoint")
        key = weights_key(loaded)
        state = as_state_dict(loaded)
        # which weights of a checkpoint: its EMA (the shipped model) or its raw state_dict
        source = where = f"file:{path}" + (f" ({key})" if key else "")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # same names, other shapes: another arch's weights
        detail = " ".join(str(exc).split())
        raise ValueError(f"pretrained weights {where} do not fit {arch}: {detail[:200]}") from exc
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(
            f"pretrained weights {where} do not fit {arch}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    log.info("loaded backbone weights from %s", source)
    return source
