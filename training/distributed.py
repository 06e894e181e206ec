"""torchrun integration: a process group when WORLD_SIZE > 1, otherwise a no-op single process."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owner: bool = True  # this DistInfo's init_distributed set the process group up

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def backend_for(device: str, cuda_available: bool) -> str:
    """The process group backend for ``--device``: NCCL only moves CUDA tensors, so a CPU run
    needs Gloo even where CUDA is there. ``auto`` is CUDA when available (as ``resolve_device``
    reads it); ``cuda`` without CUDA gets Gloo, so the device check, not NCCL, reports it."""
    on_cuda = device == "auto" or device.startswith("cuda")
    return "nccl" if on_cuda and cuda_available else "gloo"


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group (NCCL for a CUDA ``device``, Gloo for the CPU) when
    launched under it.

    A group that is already up (``compare`` holds one across its training runs: tearing a group
    down and setting it up again on torchrun's store is not reliable) is joined as it is, and
    :func:`cleanup` leaves it to whoever set it up."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if dist.is_initialized():
        return DistInfo(info.rank, info.world_size, info.local_rank, owner=False)
    backend = backend_for(device, torch.cuda.is_available())
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend)
    return info


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def from_main(info: DistInfo, value: Any) -> Any:
    """Rank 0's ``value`` (picklable) on every rank; the others' own ``value`` is ignored."""
    if not info.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def refusal_from_main(info: DistInfo, refusal: str | None) -> str | None:
    """Rank 0's refusal (or None), on every rank: a check only rank 0 can make (the --out lock)
    must stop all ranks, or the others block in their first all-reduce until torchrun kills
    them."""
    return from_main(info, refusal)


def shard_range(n: int, world_size: int, rank: int, batch_size: int = 1) -> range:
    """Rank ``rank``'s contiguous share of ``n`` items for evaluation: the ``ceil(n /
    batch_size)`` batches split as evenly as possible, in rank order.

    The shares are disjoint and together cover ``0..n`` once, in order (DistributedSampler pads
    with repeated items, which would count some images twice in the metrics), and each rank's
    batches are exactly a single process's batches, so the gathered logits are the same too.
    A rank may get nothing when there are fewer batches than ranks.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    if batch_size < 1 or n < 0:
        raise ValueError(f"cannot split {n} items into batches of {batch_size}")
    batches = -(-n // batch_size)
    first, last = batches * rank // world_size, batches * (rank + 1) // world_size
    return range(min(first * batch_size, n), min(last * batch_size, n))


class ShardSampler(Sampler[int]):
    """The indices of one :func:`shard_range`, in order, each once (no padding, no shuffle)."""

    def __init__(self, indices: range):
        self.indices = indices

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def broadcast_weights(module: nn.Module, info: DistInfo) -> None:
    """Rank 0's parameters and buffers on every rank, before the ranks score shards of one
    test set: BatchNorm statistics (and an EMA of them) are updated from each rank's own
    batches, so without this every rank would score with slightly different weights from the
    ones rank 0 saves."""
    if not info.enabled:
        return
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_contiguous():
                dist.broadcast(tensor, src=0)
            else:  # channels_last weights on CUDA: send a dense copy, write it back
                dense = tensor.contiguous()
                dist.broadcast(dense, src=0)
                tensor.copy_(dense)


def all_gather(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` alone."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def gather_rows(
    rows: torch.Tensor, counts: list[int], width: int, info: DistInfo
) -> torch.Tensor | None:
    """Every rank's ``rows`` (``counts[rank]`` x ``width``, on the CPU) stacked in rank order on
    rank 0, None on the others; ``rows`` alone.

    A tensor gather, not ``gather_object``: pickling a large test set's logits holds several
    copies of them on every rank and sends them as one opaque byte blob (100,000 images x 431
    classes is ~170 MB). Every rank pads its rows to the largest count, so the collective moves
    equal shapes, and rank 0 cuts each share back to its own count. ``counts`` and ``width``
    must be the same on every rank (gathered beforehand)."""
    if not info.enabled:
        return rows
    if len(counts) != info.world_size or rows.shape[0] != counts[info.rank]:
        raise ValueError(f"rank {info.rank} has {rows.shape[0]} rows; counts say {counts}")
    # NCCL moves only CUDA tensors; Gloo only CPU ones here
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    on = on or torch.device("cpu")
    most = max(counts)
    padded = torch.zeros((most, width), dtype=rows.dtype, device=on)
    if counts[info.rank]:
        padded[: counts[info.rank]] = rows.reshape(-1, width).to(on)
    out = [torch.empty_like(padded) for _ in counts] if info.is_main else None
    dist.gather(padded, out, dst=0)
    if out is None:
        return None
    return torch.cat([share[:n].cpu() for share, n in zip(out, counts, strict=True)])


def cleanup(info: DistInfo) -> None:
    if info.enabled and info.owner and dist.is_initialized():
        dist.destroy_process_group()
