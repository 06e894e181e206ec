"""Shared fixtures: a tiny resnet18 checkpoint in the training contract and labelled images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.checkpoint import save_checkpoint
from training.models import build_model
from training.preprocessing import PreprocessSpec

CLASSES = [
    {"make": "Audi", "model": "A4", "make_id": 1, "model_id": 11},
    {"make": "BMW", "model": "X5", "make_id": 2, "model_id": 22},
    {"make": "Citroen", "model": "C3", "make_id": 3, "model_id": 33},
]
IMAGE_SIZE = 32


def write_checkpoint(
    out: Path,
    arch: str = "resnet18",
    seed: int = 0,
    near_tie: bool = False,
    nan_logit: bool = False,
    **args,
) -> Path:
    """A checkpoint exactly as training writes it (random weights, BN statistics warmed up).

    ``near_tie`` makes classes 0 and 1 differ by ~1e-6 in every logit, so any quantisation
    flips their order: a model that int8 cannot reproduce, for gate tests. ``nan_logit`` makes
    class 0's logit inf for every image (float32 overflow): a broken checkpoint whose
    reference is not finite.
    """
    torch.manual_seed(seed)
    model = build_model(arch, len(CLASSES))
    model.train()
    with torch.no_grad():  # non-trivial running stats, as after real training
        for _ in range(2):
            model(torch.randn(8, 3, IMAGE_SIZE, IMAGE_SIZE))
        if near_tie:
            fc = model.fc
            fc.weight[1] = fc.weight[0] + 1e-6 * torch.randn_like(fc.weight[0])
            fc.bias[1] = fc.bias[0]
            fc.bias[2] = -100.0
        if nan_logit:  # finite weights (NaN ones are refused at load, naming the tensor)
            model.fc.weight[0] = 3.0e38  # whose logit overflows float32 to inf
            model.fc.bias[0] = 3.0e38
    spec = PreprocessSpec.for_image_size(IMAGE_SIZE)
    save_checkpoint(
        out,
        {
            "arch": arch,
            "num_classes": len(CLASSES),
            "classes": CLASSES,
            "level": "model",
            "preprocess": spec.model_dump(mode="json"),
            "state_dict": model.state_dict(),
            "epoch": 3,
            "args": {"arch": arch, "dataset": "folder", **args},
        },
    )
    return out


def write_images(root: Path, per_class: int = 4, seed: int = 0) -> Path:
    """Class-per-folder images (folders named by model) with distinct colour statistics."""
    rng = np.random.default_rng(seed)
    for k, cls in enumerate(CLASSES):
        folder = root / cls["model"]
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = rng.integers(0, 255, size=3)
            noise = rng.integers(-60, 60, size=(40 + 3 * i, 48, 3))
            pixels = np.clip(base + noise + 30 * k, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="session")
def parity_dir(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("parity"))


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory, checkpoint_dir, parity_dir) -> Path:
    """One fp32 + int8 bundle shared by the read-only tests."""
    from engine_build.build import build_bundle

    out = tmp_path_factory.mktemp("bundles") / "bundle"
    return build_bundle(
        checkpoint_dir,
        out,
        precisions="fp32,int8",
        parity_data=parity_dir,
        max_batch=8,
        opt_batch=4,
        threads=2,
    )


@pytest.fixture(scope="module")
def bundle(bundle_dir):
    """The shared bundle, loaded (engines are built from it)."""
    from engine_build.bundle import load_bundle

    return load_bundle(bundle_dir)


@pytest.fixture(scope="module")
def reference(checkpoint_dir):
    """The checkpoint's PyTorch FP32 model as a numpy function: every engine's truth."""
    from training.checkpoint import load_checkpoint, model_from_checkpoint

    model = model_from_checkpoint(load_checkpoint(checkpoint_dir))

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    return run


def batch(n: int, seed: int = 0) -> np.ndarray:
    """A random float32 batch in the shared bundle's input shape."""
    return (
        np.random.default_rng(seed)
        .standard_normal((n, 3, IMAGE_SIZE, IMAGE_SIZE))
        .astype(np.float32)
    )
