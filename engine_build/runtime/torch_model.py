"""The bundle's ``model.pt`` as an eval-mode torchvision model: what both PyTorch engines run."""

from __future__ import annotations

import io
import pickle
import re
import warnings

import torch

from engine_build.bundle import Bundle
from engine_build.runtime.base import ArtifactMismatchError, EngineUnavailableError, first_line
from training.models import build_model


def first_non_finite(state: dict) -> str | None:
    """The name of the first floating-point tensor in ``state`` holding NaN or inf, else None."""
    for name, value in state.items():
        if (
            isinstance(value, torch.Tensor)
            and value.is_floating_point()
            and not bool(torch.isfinite(value).all())
        ):
            return name
    return None


def refused_global(exc: BaseException) -> str:
    """``" (Unsupported global: GLOBAL x.Y)"`` from torch's weights-only refusal, else "": the rest
    of its message advises ``weights_only=False``, which would run whatever the pickle holds."""
    match = re.search(r"Unsupported global: GLOBAL [\w.]+", str(exc))
    return f" ({match.group(0)})" if match else ""


def load_torch_model(bundle: Bundle) -> tuple[torch.nn.Module, str]:
    """The FP32 model of the bundle's torch artifact, on the CPU, and that artifact's file name.

    Raises EngineUnavailableError when the bundle has no ``model.pt``, and ArtifactMismatchError
    (a BundleError: ``auto`` does not fall back from it) naming the file when it holds what a
    weights-only load refuses, is not a state_dict, does not fit the manifest's arch and class
    count, or holds NaN/inf.
    """
    artifact = bundle.artifact("torch")
    if artifact is None:
        raise EngineUnavailableError(f"bundle {bundle.path} has no torch artifact (model.pt)")
    m = bundle.manifest
    file = bundle.artifact_path(artifact)
    data = bundle.read_artifact(artifact)
    try:
        with warnings.catch_warnings():  # torch's pickle-protocol warning is noise here
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's advice (weights_only=False) would be unsafe
        raise ArtifactMismatchError(
            f"bundle artifact {file} holds objects a weights-only load refuses, not a plain "
            f"state_dict of tensors{refused_global(exc)}; rebuild the bundle with engine_build"
        ) from None
    except Exception as exc:  # a damaged zip (RuntimeError), a truncated file (EOFError), ...
        raise ArtifactMismatchError(
            f"bundle artifact {file} is not a readable PyTorch state_dict "
            f"({type(exc).__name__}: {first_line(exc)[:160]})"
        ) from None
    if not isinstance(state, dict):
        raise ArtifactMismatchError(
            f"bundle artifact {file} holds a {type(state).__name__}, not a state_dict"
        )
    model = build_model(m.arch, m.num_classes)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        detail = " ".join(str(exc).split())  # torch's first line only says "Error(s) in ..."
        raise ArtifactMismatchError(
            f"bundle artifact {file} does not match arch {m.arch} with {m.num_classes} classes: "
            f"{detail[:200]}"
        ) from None
    bad = first_non_finite(state)
    if bad is not None:
        raise ArtifactMismatchError(f"bundle artifact {file}: tensor {bad} holds NaN or inf")
    return model.eval(), artifact.file
