"""Sharded DDP evaluation, DDP sampler seeds and the weight-decay split: the pure parts."""

from __future__ import annotations

import argparse
import os

import pytest
import torch
from torch.utils.data import SequentialSampler
from torch.utils.data.distributed import DistributedSampler

from training.checkpoint import CheckpointError
from training.datasets.base import Sample
from training.datasets.image_dataset import UnreadableImage, UnreadableImages
from training.distributed import DistInfo, ShardSampler, shard_range
from training.models import build_model
from training.preprocessing import PreprocessSpec
from training.train import (
    build_optimizer,
    epoch_seed,
    eval_loader,
    param_groups,
    resume_mismatches,
    sampler_seed,
    train_loader,
)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 7])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_cover_the_test_set_once_in_order_in_whole_batches(world, batch_size):
    for n in range(40):
        shards = [shard_range(n, world, rank, batch_size) for rank in range(world)]
        # disjoint, nothing repeated (DistributedSampler would pad), nothing left out, in order
        assert [i for s in shards for i in s] == list(range(n)), (n, shards)
        # each rank's batches are a single process's batches: starts on a batch boundary
        assert all(s.start % batch_size == 0 for s in shards if len(s))
        batches = [-(-len(s) // batch_size) for s in shards]
        assert max(batches) - min(batches) <= 1, (n, shards)  # as even as whole batches allow


def test_a_small_test_set_leaves_some_ranks_nothing_rather_than_duplicates():
    assert [list(shard_range(3, 4, r)) for r in range(4)] == [[], [0], [1], [2]]
    assert [len(shard_range(5, 2, r, batch_size=4)) for r in range(2)] == [4, 1]
    assert [len(shard_range(5, 2, r, batch_size=8)) for r in range(2)] == [0, 5]
    with pytest.raises(ValueError):
        shard_range(10, 2, 2)


def _index(n: int) -> argparse.Namespace:
    samples = [Sample(f"/no/such/{i}.jpg", i % 3, None) for i in range(n)]
    return argparse.Namespace(samples=samples)


def test_each_ranks_eval_loader_reads_only_its_shard():
    args = argparse.Namespace(batch_size=4, workers=0)
    spec = PreprocessSpec.for_image_size(32)
    alone = eval_loader(_index(21), spec, args)
    assert isinstance(alone.sampler, SequentialSampler)  # one process: as before
    seen = []
    for rank in range(3):
        loader = eval_loader(_index(21), spec, args, DistInfo(rank, 3, rank))
        assert isinstance(loader.sampler, ShardSampler)
        assert list(loader.sampler) == list(shard_range(21, 3, rank, 4))
        seen += list(loader.sampler)
    assert seen == list(range(21))


def test_unreadable_images_merge_without_counting_reads_twice():
    tally = UnreadableImages()
    tally.add([UnreadableImage("/a.jpg", "truncated")])
    tally.merge({"/b.jpg": "broken", "/a.jpg": "other words"})
    assert tally.paths == {"/a.jpg": "truncated", "/b.jpg": "broken"}
    assert len(tally) == 2 and tally.occurrences == 1  # occurrences: this rank's own reads


def _ddp_order(seed: int, epoch: int, rank: int = 0, **kw) -> list[int]:
    args = argparse.Namespace(seed=seed, imbalance="none", batch_size=4, workers=0)
    data = list(range(64))
    loader = train_loader(data, [0] * 64, [64], args, epoch, DistInfo(rank, 2, rank), False, **kw)
    assert isinstance(loader.sampler, DistributedSampler)
    return list(loader.sampler)


def test_adjacent_seeds_do_not_share_ddp_shuffles():
    """DistributedSampler shuffles with seed + epoch: seeded with --seed itself, seed 0 epoch 1
    was exactly seed 1 epoch 0."""
    assert _ddp_order(0, 1) != _ddp_order(1, 0)
    assert _ddp_order(1, 2) != _ddp_order(2, 1) != _ddp_order(3, 0)
    orders = {tuple(_ddp_order(s, e)) for s in range(4) for e in range(4)}
    assert len(orders) == 16
    assert _ddp_order(3, 2) == _ddp_order(3, 2)  # a rerun (a resume) of (seed, epoch): the same
    assert sorted(_ddp_order(3, 2, 0) + _ddp_order(3, 2, 1)) == list(range(64))  # one shared draw


def test_resume_keeps_the_sampler_seed_its_checkpoint_ran_with():
    assert sampler_seed(5) == epoch_seed(5, 0)  # a new run
    assert sampler_seed(5, {"sampler_seed": epoch_seed(5, 0)}) == epoch_seed(5, 0)
    assert sampler_seed(5, {"seed": 5}) == 5  # a checkpoint from before: its own orders go on
    assert _ddp_order(5, 3, ddp_seed=5) == _ddp_order_legacy(5, 3)
    with pytest.raises(CheckpointError, match="sampler_seed 'x' is not a seed"):
        sampler_seed(5, {"sampler_seed": "x"}, "--resume ckpt")
    with pytest.raises(CheckpointError, match="is not a seed"):  # past torch's generator seeds
        sampler_seed(5, {"sampler_seed": 2**64}, "--resume ckpt")


def _ddp_order_legacy(seed: int, epoch: int) -> list[int]:
    sampler = DistributedSampler(list(range(64)), 2, 0, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    return list(sampler)


def _groups(**kw) -> dict[str, dict]:
    model = build_model("resnet18", 3)
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for g in param_groups(model, 0.01, 10.0, 1e-4, **kw):
        out[g["name"]] = {
            "lr": g["lr"],
            "weight_decay": g["weight_decay"],
            "names": [names[id(p)] for p in g["params"]],
        }
    return out


def test_default_groups_are_the_two_lr_groups_of_before():
    model = build_model("resnet18", 3)
    groups = param_groups(model, 0.01, 10.0, 1e-4)
    assert [g["name"] for g in groups] == ["backbone", "head"]
    body = [p for n, p in model.named_parameters() if not n.startswith("fc.")]
    head = [p for n, p in model.named_parameters() if n.startswith("fc.")]
    assert groups[0]["params"] == body and groups[1]["params"] == head  # order kept: resume
    assert [g["lr"] for g in groups] == pytest.approx([0.01, 0.1])
    assert [g["weight_decay"] for g in groups] == [1e-4, 1e-4]
    # a decay equal to --weight-decay splits nothing: the grouping follows the values recorded
    assert [g["name"] for g in param_groups(model, 0.01, 10.0, 1e-4, 1e-4, 1e-4)] == [
        "backbone",
        "head",
    ]


def test_norm_weight_decay_splits_batchnorm_params_and_keeps_the_head_lr():
    g = _groups(norm_weight_decay=0.0)
    assert list(g) == ["backbone", "backbone norm", "head"]
    assert g["backbone norm"]["weight_decay"] == 0.0 and g["backbone norm"]["lr"] == 0.01
    assert "bn1.weight" in g["backbone norm"]["names"] and "bn1.bias" in g["backbone norm"]["names"]
    assert all("bn" in n or "downsample.1" in n for n in g["backbone norm"]["names"])
    assert all("conv" in n or "downsample.0" in n for n in g["backbone"]["names"])
    assert g["backbone"]["weight_decay"] == 1e-4
    assert g["head"] == {"lr": 0.1, "weight_decay": 1e-4, "names": ["fc.weight", "fc.bias"]}


def test_bias_weight_decay_takes_every_bias_even_a_norm_layers():
    g = _groups(norm_weight_decay=0.0, bias_weight_decay=0.5)
    assert list(g) == ["backbone", "backbone norm", "backbone bias", "head", "head bias"]
    assert g["backbone bias"]["weight_decay"] == 0.5 and g["backbone bias"]["lr"] == 0.01
    assert all(n.endswith(".bias") for n in g["backbone bias"]["names"])
    assert all(n.endswith(".weight") for n in g["backbone norm"]["names"])
    assert g["head bias"] == {"lr": 0.1, "weight_decay": 0.5, "names": ["fc.bias"]}
    assert g["head"]["names"] == ["fc.weight"]
    only_bias = _groups(bias_weight_decay=0.0)
    assert list(only_bias) == ["backbone", "backbone bias", "head", "head bias"]
    assert "bn1.weight" in only_bias["backbone"]["names"]  # norm weights keep --weight-decay


def test_a_given_bias_decay_equal_to_weight_decay_still_takes_the_norm_layers_biases():
    """--norm-weight-decay 0 --bias-weight-decay equal to --weight-decay: every bias, a norm
    layer's too, decays by the bias decay (torchvision's precedence); only norm weights get 0."""
    g = _groups(norm_weight_decay=0.0, bias_weight_decay=1e-4)
    assert list(g) == ["backbone", "backbone norm", "head"]
    assert all(n.endswith(".weight") for n in g["backbone norm"]["names"])
    assert "bn1.bias" in g["backbone"]["names"] and g["backbone"]["weight_decay"] == 1e-4


def test_the_optimizer_applies_each_groups_decay():
    args = argparse.Namespace(
        opt="sgd", lr=0.01, head_lr_mult=10.0, momentum=0.9, weight_decay=1e-4,
        norm_weight_decay=0.0, bias_weight_decay=None,
    )  # fmt: skip
    opt = build_optimizer(build_model("resnet18", 3), args)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0, 1e-4]
    assert "name" not in opt.param_groups[0]  # the state dict keeps the keys it had before


def test_resume_compares_the_decays_of_a_checkpoint_from_before_the_flags():
    old = {"weight_decay": 1e-4}  # its run decayed every parameter by --weight-decay
    same = {"weight_decay": 1e-4, "norm_weight_decay": 1e-4, "bias_weight_decay": 1e-4}
    assert resume_mismatches(old, same) == []
    changed = {**same, "norm_weight_decay": 0.0}
    assert resume_mismatches(old, changed) == ["--norm-weight-decay 0.0 (checkpoint: 0.0001)"]


def _shard_batches(x, y, bad_at, rank, world, batch_size):
    """What ``eval_loader`` yields on ``rank``: its shard's batches, ``(images, targets, bad)``,
    the image at ``bad_at`` standing in for one that does not decode."""
    shard = shard_range(len(y), world, rank, batch_size)
    out = []
    for i in range(shard.start, shard.stop, batch_size):
        idx = [j for j in range(i, min(i + batch_size, shard.stop)) if j != bad_at]
        bad = (
            [UnreadableImage(f"/img/{bad_at}.jpg", "truncated")]
            if bad_at in range(i, i + batch_size)
            else []
        )
        out.append((x[idx], y[idx], bad))
    return out


def _model_of_rank(rank: int) -> torch.nn.Module:
    torch.manual_seed(0)  # the same weights on every rank, as DDP keeps them ...
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4))
    with torch.no_grad():  # ... but BatchNorm statistics from each rank's own batches
        model[1].running_mean.uniform_(-rank, rank)
    return model


def _evaluate_on_rank(rank: int, world: int, port: int, out_dir: str, strict: bool) -> None:
    import torch.distributed as dist

    from training.datasets.base import DatasetError
    from training.train import evaluate_split

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(1)
        x, y = torch.randn(11, 5), torch.randint(0, 4, (11,))
        tally = UnreadableImages(strict=strict and rank == 1)
        batches = _shard_batches(x, y, 9, rank, world, 3)
        try:
            scored = evaluate_split(
                _model_of_rank(rank), batches, torch.device("cpu"), DistInfo(rank, world, rank),
                amp=False, channels_last=False, unreadable=tally,
            )  # fmt: skip
            result = {"scored": scored, "unreadable": dict(tally.paths)}
        except DatasetError as exc:
            result = {"error": str(exc)}
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


class _LoaderDies:
    """A loader whose worker dies on its first batch (a DataLoader raises RuntimeError then)."""

    def __iter__(self):
        raise RuntimeError("DataLoader worker (pid 42) is killed by signal: Killed")


def _fail_on_rank_1(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from training.train import evaluate_split

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, y = torch.randn(6, 5), torch.randint(0, 4, (6,))
        batches = _LoaderDies() if rank == 1 else _shard_batches(x, y, 99, rank, world, 3)
        try:
            evaluate_split(
                _model_of_rank(rank), batches, torch.device("cpu"), DistInfo(rank, world, rank),
                amp=False, channels_last=False, unreadable=UnreadableImages(strict=False),
            )  # fmt: skip
            result = "returned"
        except Exception as exc:
            result = f"{type(exc).__name__}: {exc}"
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_any_failure_evaluating_on_one_rank_stops_every_rank(tmp_path):
    """A rank whose evaluation dies (out of memory, a killed loader worker) must not leave the
    others waiting in the gather until the collective timeout: each raises."""
    import torch.multiprocessing as mp

    mp.spawn(_fail_on_rank_1, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[1] == "RuntimeError: DataLoader worker (pid 42) is killed by signal: Killed"
    assert ranks[0].startswith("RuntimeError: evaluation failed on rank 1: RuntimeError(")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("strict", [False, True])
def test_evaluate_split_gathers_one_process_logits_on_rank_0(tmp_path, strict):
    """Two Gloo ranks score their shards with rank 0's weights (BatchNorm statistics included)
    and rank 0 gets exactly the logits and targets one process gets, in dataset order; both
    ranks learn of the image only rank 1 could not decode, and a --strict failure on rank 1
    stops rank 0 too instead of leaving it in a collective."""
    import torch.multiprocessing as mp

    from training.engine import evaluate

    mp.spawn(_evaluate_on_rank, args=(2, _free_port(), str(tmp_path), strict), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    if strict:
        assert (
            ranks[0] == ranks[1] == {"error": "unreadable image (--strict): /img/9.jpg: truncated"}
        )
        return
    torch.manual_seed(1)
    x, y = torch.randn(11, 5), torch.randint(0, 4, (11,))
    alone = evaluate(_model_of_rank(0), _shard_batches(x, y, 9, 0, 1, 3), torch.device("cpu"))
    logits, targets = ranks[0]["scored"]
    assert torch.equal(logits, alone[0]) and torch.equal(targets, alone[1])
    assert targets.tolist() == [t for i, t in enumerate(y.tolist()) if i != 9]
    assert ranks[1]["scored"] is None
    assert ranks[0]["unreadable"] == ranks[1]["unreadable"] == {"/img/9.jpg": "truncated"}


def _gather_rows_on_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from training.distributed import gather_rows

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        counts = [3, 0, 5]  # uneven shares, one rank with nothing (fewer batches than ranks)
        rows = torch.arange(sum(counts[:rank]) * 4, sum(counts[: rank + 1]) * 4).reshape(-1, 4)
        rows = rows.float() if counts[rank] else torch.empty(0, 0)
        torch.save(
            gather_rows(rows, counts, 4, DistInfo(rank, world, rank)), f"{out_dir}/r{rank}.pt"
        )
    finally:
        dist.destroy_process_group()


def test_gather_rows_stacks_uneven_shares_in_rank_order_without_padding(tmp_path):
    """Rank 0 gets every rank's rows exactly once, in rank order, none of the padding that
    evens the collective's shapes out; the other ranks get None."""
    import torch.multiprocessing as mp

    mp.spawn(_gather_rows_on_rank, args=(3, _free_port(), str(tmp_path)), nprocs=3)
    got = [torch.load(tmp_path / f"r{r}.pt", weights_only=False) for r in range(3)]
    assert torch.equal(got[0], torch.arange(32).reshape(8, 4).float())
    assert got[1] is None and got[2] is None


def test_gather_rows_refuses_a_share_that_disagrees_with_the_counts():
    from training.distributed import gather_rows

    assert gather_rows(torch.ones(2, 3), [2], 3, DistInfo()).shape == (2, 3)
    with pytest.raises(ValueError, match="rank 1 has 2 rows"):
        gather_rows(torch.ones(2, 3), [2, 5], 3, DistInfo(1, 2, 1))
