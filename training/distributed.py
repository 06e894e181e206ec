"""torchrun integration: a process group when WORLD_SIZE > 1, otherwise a no-op single process."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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


def refusal_from_main(info: DistInfo, refusal: str | None) -> str | None:
    """Rank 0's refusal (or None), on every rank: a check only rank 0 can make (the --out lock)
    must stop all ranks, or the others block in their first all-reduce until torchrun kills
    them."""
    if not info.enabled:
        return refusal
    box = [refusal]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def cleanup(info: DistInfo) -> None:
    if info.enabled and info.owner and dist.is_initialized():
        dist.destroy_process_group()
