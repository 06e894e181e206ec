"""Metrics, imbalance weights and the LR schedule: pure functions, checked on hand-made input."""

from __future__ import annotations

import argparse
import os
import random
import stat

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data.distributed import DistributedSampler

from training import distributed
from training.checkpoint import load_checkpoint, save_checkpoint
from training.distributed import DistInfo, backend_for
from training.imbalance import (
    DistributedWeightedSampler,
    class_balanced_weights,
    sample_weights,
)
from training.metrics import classification_metrics
from training.models import build_model
from training.schedule import warmup_cosine_factor
from training.train import build_optimizer, epoch_seed, train_loader

CLASSES = [
    {"make": "Audi", "model": "A4", "make_id": 1, "model_id": 10},
    {"make": "Audi", "model": "Q5", "make_id": 1, "model_id": 11},
    {"make": "Kia", "model": "K5", "make_id": 2, "model_id": 20},
]


def test_metrics_top1_make_and_balanced():
    targets = torch.tensor([0, 0, 0, 1, 2])
    preds = torch.tensor([0, 0, 1, 1, 0])  # one same-make mistake, one cross-make mistake
    logits = torch.nn.functional.one_hot(preds, 3).float()
    m = classification_metrics(logits, targets, CLASSES)
    assert m["top1"] == pytest.approx(3 / 5)
    assert m["make_top1"] == pytest.approx(4 / 5)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert m["top5"] == 1.0
    assert [p["accuracy"] for p in m["per_class"]] == pytest.approx([2 / 3, 1.0, 0.0])
    assert {(p["true"], p["pred"]) for p in m["confused_pairs"]} == {(0, 1), (2, 0)}


def test_class_balanced_weights_favour_rare_classes():
    w = class_balanced_weights([1000, 100, 10], beta=0.999)
    assert w[0] < w[1] < w[2]
    assert w.mean().item() == pytest.approx(1.0)
    assert torch.allclose(class_balanced_weights([5, 5, 5]), torch.ones(3))


def test_sample_weights_equalise_classes():
    targets = [0, 0, 0, 1]
    w = sample_weights(targets, [3, 1])
    assert w[:3].sum().item() == pytest.approx(w[3].item())


def _ranks(weights, world: int, epoch: int, seed: int = 0) -> list[list[int]]:
    out = []
    for rank in range(world):
        sampler = DistributedWeightedSampler(weights, world, rank, seed=seed)
        sampler.set_epoch(epoch)
        out.append(list(sampler))
        assert len(out[-1]) == len(sampler)
    return out


def test_distributed_weighted_sampler_splits_one_balanced_draw_between_ranks():
    targets = [0] * 900 + [1] * 90 + [2] * 10  # 90:9:1 imbalance
    w = sample_weights(targets, [900, 90, 10])
    r0, r1 = _ranks(w, world=2, epoch=0)
    assert len(r0) == len(r1) == 500 and r0 != r1
    assert _ranks(w, world=2, epoch=0) == [r0, r1]  # every rank derives the same draw
    per_class = np.bincount([targets[i] for i in r0 + r1], minlength=3)
    assert per_class.min() > 250, per_class  # about 1000/3 each, not 900/90/10
    for ranks in (r0, r1):  # each rank alone is balanced too, not one class per rank
        assert np.bincount([targets[i] for i in ranks], minlength=3).min() > 100
    assert _ranks(w, world=2, epoch=1) != [r0, r1]  # set_epoch gives a fresh draw
    assert _ranks(w, world=2, epoch=0, seed=1) != [r0, r1]
    assert _ranks(w, world=2, epoch=1, seed=0) != _ranks(w, world=2, epoch=0, seed=1)
    assert [len(r) for r in _ranks(w[:999], world=2, epoch=0)] == [499, 499]  # drop_last
    # fewer samples than ranks: every rank yields none (multinomial refuses to draw 0)
    assert _ranks(w[:1], world=2, epoch=0) == [[], []]


def test_ddp_train_loader_keeps_the_weighted_sampler():
    """Under torchrun, --imbalance weighted-sampler must not fall back to a plain sampler."""
    targets = [0] * 30 + [1] * 3
    dataset = list(range(len(targets)))
    args = argparse.Namespace(seed=0, imbalance="weighted-sampler", batch_size=4, workers=0)
    loader = train_loader(dataset, targets, [30, 3], args, 2, DistInfo(1, 2, 1), pin=False)
    assert isinstance(loader.sampler, DistributedWeightedSampler)
    assert loader.sampler.rank == 1 and loader.sampler.num_replicas == 2
    assert loader.sampler.epoch == 2 and len(loader.sampler) == 16


@pytest.mark.parametrize("imbalance", ["weighted-sampler", "none"])
def test_ddp_ranks_augment_differently_but_split_one_shared_draw(imbalance):
    """Each rank's loader generator (its workers' augmentation seeds) differs, and is the same
    on a rerun of that (seed, epoch, rank), so resume stays exact; the samplers keep the shared
    seed, so the ranks' shards still split one draw."""
    targets = [0] * 30 + [1] * 3
    dataset = list(range(len(targets)))
    args = argparse.Namespace(seed=7, imbalance=imbalance, batch_size=4, workers=0)

    def loader(rank: int, epoch: int):
        return train_loader(dataset, targets, [30, 3], args, epoch, DistInfo(rank, 2, rank), False)

    r0, r1 = loader(0, 2), loader(1, 2)
    assert r0.generator.initial_seed() != r1.generator.initial_seed()
    assert loader(1, 2).generator.initial_seed() == r1.generator.initial_seed()
    assert loader(1, 3).generator.initial_seed() != r1.generator.initial_seed()
    seeds = {loader(r, e).generator.initial_seed() for r in (0, 1) for e in range(4)}
    assert len(seeds) == 8  # no (epoch, rank) pair shares another's stream
    if imbalance == "weighted-sampler":
        expected = _ranks(sample_weights(targets, [30, 3]), world=2, epoch=2, seed=7)
    else:
        expected = []
        for rank in (0, 1):
            sampler = DistributedSampler(dataset, 2, rank, seed=epoch_seed(7, 0), drop_last=True)
            sampler.set_epoch(2)
            expected.append(list(sampler))
        assert sorted(expected[0] + expected[1]) == sorted(set(expected[0] + expected[1]))
    assert [list(r0.sampler), list(r1.sampler)] == expected


def test_single_process_loader_keeps_the_epoch_seed():
    """One process: the (seed, epoch) seed as before, so existing runs resume on their streams."""
    args = argparse.Namespace(seed=7, imbalance="none", batch_size=4, workers=0)
    loader = train_loader(list(range(10)), [0] * 10, [10], args, 3, DistInfo(), pin=False)
    assert loader.generator.initial_seed() == epoch_seed(7, 3)


@pytest.mark.parametrize(("momentum", "nesterov"), [(0.0, False), (0.9, True)])
def test_sgd_uses_nesterov_only_with_momentum(momentum, nesterov):
    """torch refuses Nesterov with zero momentum: --opt sgd --momentum 0 is plain SGD."""
    args = argparse.Namespace(
        opt="sgd",
        lr=0.01,
        head_lr_mult=10.0,
        momentum=momentum,
        weight_decay=1e-4,
        norm_weight_decay=None,
        bias_weight_decay=None,
    )
    opt = build_optimizer(build_model("resnet18", 3), args)
    assert isinstance(opt, torch.optim.SGD)
    assert opt.defaults["nesterov"] is nesterov and opt.defaults["momentum"] == momentum


@pytest.mark.parametrize(
    ("device", "cuda", "backend"),
    [
        ("cpu", True, "gloo"),  # NCCL cannot move the CPU tensors of a --device cpu run
        ("cpu", False, "gloo"),
        ("auto", True, "nccl"),
        ("auto", False, "gloo"),
        ("cuda", True, "nccl"),
        ("cuda:1", True, "nccl"),
        ("cuda", False, "gloo"),  # resolve_device then reports the missing CUDA in one line
    ],
)
def test_process_group_backend_follows_the_device(device, cuda, backend):
    assert backend_for(device, cuda) == backend


def test_init_distributed_with_device_cpu_joins_gloo_where_cuda_is_available(monkeypatch):
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda b: calls.append(b))
    assert distributed.init_distributed("cpu") == DistInfo(1, 2, 1)
    assert calls == ["gloo"]
    calls.clear()
    distributed.init_distributed("cuda")
    assert calls == [("set_device", 1), "nccl"]


def test_warmup_then_cosine():
    assert warmup_cosine_factor(0, 10, 100) == pytest.approx(1 / 11)
    assert warmup_cosine_factor(9, 10, 100) == pytest.approx(10 / 11)  # the peak is held once,
    assert warmup_cosine_factor(10, 10, 100) == pytest.approx(1.0)  # at the first cosine step
    assert warmup_cosine_factor(55, 10, 100) == pytest.approx(0.5)
    assert warmup_cosine_factor(100, 10, 100) == pytest.approx(0.0)


def test_preprocess_image_normalises_like_torchvision_and_returns_contiguous_chw():
    import torchvision.transforms.functional as tvf

    from training.preprocessing import PreprocessSpec, preprocess_image, resized_center_crop

    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 256, size=(300, 400, 3), dtype=np.uint8))
    spec = PreprocessSpec.for_image_size(64, mean=(0.1, 0.5, 0.9), std=(0.2, 0.3, 0.4))
    out = preprocess_image(img, spec)
    assert out.shape == (3, 64, 64) and out.dtype == np.float32
    assert out.flags["C_CONTIGUOUS"]
    # the same crop through torchvision's to_tensor + normalize
    crop = tvf.center_crop(tvf.resize(img, spec.resize), spec.crop)
    expected = tvf.normalize(tvf.to_tensor(crop), spec.mean, spec.std).numpy()
    np.testing.assert_allclose(out, expected, atol=2e-2)  # PIL vs tensor resize rounding
    # torchvision's Resize + CenterCrop on the PIL image, to within one grey level
    # (resized_center_crop resamples only the crop), then exactly the normalisation
    one_level = np.max(1.0 / (255.0 * np.asarray(spec.std))) + 1e-5
    exact = (np.asarray(crop, dtype=np.float32) / 255.0 - spec.mean) / spec.std
    np.testing.assert_allclose(out, exact.transpose(2, 0, 1), atol=one_level)
    ours = np.asarray(resized_center_crop(img, spec.resize, spec.crop, "bilinear"), np.float32)
    ours = (ours / 255.0 - spec.mean) / spec.std
    np.testing.assert_allclose(out, ours.transpose(2, 0, 1), atol=1e-5)


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth gradient plus noise: what resampling filters see in a photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([x / w * 200, y / h * 200, (x + y) / (w + h) * 255], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


_RANDOM_SIZES = [
    (random.Random(i).randint(100, 1600), random.Random(-i).randint(100, 1600)) for i in range(8)
]


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize(
    "size", [(640, 480), (480, 640), (270, 270), (500, 375), (1001, 257), *_RANDOM_SIZES]
)
def test_resized_center_crop_matches_resize_then_crop_to_one_grey_level(size, interpolation):
    from training.preprocessing import center_crop, resize_shorter_side, resized_center_crop

    img = _photo(*size)
    for resize, crop in ((256, 224), (146, 128)):
        two_step = center_crop(resize_shorter_side(img, resize, interpolation), crop)
        one_step = resized_center_crop(img, resize, crop, interpolation)
        assert one_step.size == two_step.size == (crop, crop)
        diff = np.abs(np.asarray(one_step, np.int16) - np.asarray(two_step, np.int16))
        assert diff.max() <= 1, (size, resize, crop, diff.max())
        assert diff.mean() < 0.25  # most pixels identical


@pytest.mark.parametrize(
    ("size", "resize", "crop", "interpolation"),
    [
        ((200, 900), 256, 224, "bilinear"),  # upscaled
        ((256, 300), 256, 224, "bicubic"),  # shorter side already the target
        ((300, 200), 48, 64, "bilinear"),  # smaller than the crop: black padding
        ((500, 375), 256, 224, "nearest"),
    ],
)
def test_resized_center_crop_keeps_the_two_step_pixels_where_it_does_not_shrink(
    size, resize, crop, interpolation
):
    from training.preprocessing import center_crop, resize_shorter_side, resized_center_crop

    img = _photo(*size, seed=1)
    two_step = center_crop(resize_shorter_side(img, resize, interpolation), crop)
    one_step = resized_center_crop(img, resize, crop, interpolation)
    assert np.array_equal(np.asarray(one_step), np.asarray(two_step))


def test_checkpoint_write_is_fsynced_before_and_after_the_rename(tmp_path, monkeypatch):
    """The temp file's data reach the disk before it replaces checkpoint.pt, and the rename
    itself is made durable by an fsync of the directory."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        events.append(("fsync", kind if kind == "dir" else os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    ckpt = {
        "arch": "resnet18", "num_classes": 1, "classes": CLASSES[:1], "level": "model",
        "preprocess": {}, "state_dict": {"w": torch.zeros(2)}, "epoch": 0, "args": {},
    }  # fmt: skip
    save_checkpoint(tmp_path, ckpt)
    final = str(tmp_path / "checkpoint.pt")
    at = events.index(("replace", final))
    assert events[at - 1][0] == "fsync" and ".checkpoint.pt." in events[at - 1][1], events
    assert events[at + 1] == ("fsync", "dir"), events
    assert torch.equal(load_checkpoint(tmp_path)["state_dict"]["w"], torch.zeros(2))


def test_center_crop_offset_is_torchvision_center_crops_rounding():
    import torch
    import torchvision.transforms.functional as tvf

    from training.preprocessing import center_crop_offset

    for w, h, size in [(7, 7, 3), (8, 7, 3), (256, 341, 224), (301, 256, 224), (5, 9, 4)]:
        img = torch.arange(w * h).reshape(1, h, w)
        left, top = center_crop_offset(w, h, size)
        assert torch.equal(
            tvf.center_crop(img, [size, size]), img[:, top : top + size, left : left + size]
        )


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("std", (0.229, 0.0, 0.225), "must be > 0"),
        ("std", (0.229, float("nan"), 0.225), "must be finite"),
        ("mean", (0.485, float("inf"), 0.406), "must be finite"),
    ],
)
def test_a_preprocess_spec_that_would_turn_pixels_into_nan_is_refused(field, value, needle):
    from pydantic import ValidationError

    from training.preprocessing import PreprocessSpec

    with pytest.raises(ValidationError, match=needle):
        PreprocessSpec(**{field: value})
