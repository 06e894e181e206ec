"""SIGTERM reaching a DataLoader worker before it ignores it: the window torch leaves between
installing its worker SIGTERM handler (which dies of any SIGTERM not from the parent) and
calling ``worker_init_fn``. A process group's SIGTERM in that window killed a fresh worker and
the run ended on "DataLoader worker ... killed by signal: Terminated" (CI, under load)."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from training.train import SigtermSafeLoader, ignore_sigterm_in_worker


class Numbers(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([i])


def sigterm_before_ignoring(worker_id: int) -> None:
    """A group's SIGTERM landing at the worst moment, every time: before the init ignores it."""
    os.kill(os.getpid(), signal.SIGTERM)
    ignore_sigterm_in_worker(worker_id)


def run_epoch(loader_class: type[DataLoader]) -> list[int]:
    loader = loader_class(
        Numbers(), batch_size=2, num_workers=2, worker_init_fn=sigterm_before_ignoring
    )
    return sorted(int(v) for batch in loader for v in batch)


def test_a_sigterm_before_the_worker_ignores_it_is_discarded() -> None:
    assert run_epoch(SigtermSafeLoader) == list(range(8))


def test_without_the_block_the_same_sigterm_kills_the_worker() -> None:
    # the control: what the plain DataLoader (train's loaders before) does with that SIGTERM
    with pytest.raises(RuntimeError, match="DataLoader worker"):  # killed, or exited
        run_epoch(DataLoader)


def test_the_main_process_gets_a_sigterm_sent_while_workers_start() -> None:
    # blocked in the main thread only while the workers are made: one sent then still reaches
    # the handler (as the block ends, or at once through another thread of the process: the
    # xdist worker has some), and the main thread ends unblocked
    seen: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:

        class Starting(SigtermSafeLoader):
            def _get_iterator(self):  # runs inside __iter__, under the block
                assert signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])
                os.kill(os.getpid(), signal.SIGTERM)
                return super()._get_iterator()

        loader = Starting(Numbers(), batch_size=4, num_workers=1)
        assert sorted(int(v) for batch in loader for v in batch) == list(range(8))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == [signal.SIGTERM]
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
