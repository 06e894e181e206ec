"""The micro-batching rule: flush at ``max_batch`` items or ``max_wait_ms`` after the first one.

Pure and clock-injected so the rule is tested without a broker or real time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class Batcher(Generic[T]):
    """Items in arrival order, each with the time it arrived: a batch is due when ``max_batch``
    items wait or the oldest has waited ``max_wait_ms``. Items left behind by a full batch keep
    their arrival times, so none waits longer than ``max_wait_ms`` plus the time the loop takes
    to come back to it (restarting their wait would let them wait up to twice max_wait)."""

    max_batch: int
    max_wait_ms: int
    clock: Callable[[], float] = time.monotonic
    _items: list[T] = field(default_factory=list)
    _arrived: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_wait_ms < 0:
            raise ValueError("max_batch must be >= 1 and max_wait_ms >= 0")

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: T) -> None:
        self._items.append(item)
        self._arrived.append(self.clock())

    # ready() and time_left_ms() read one snapshot of the arrival list: take_where may run on
    # another thread (the worker's rebalance callback) and replaces the list, never edits it

    def ready(self) -> bool:
        """True when a batch is full, or the oldest item has waited ``max_wait_ms``."""
        arrived = self._arrived
        if not arrived:
            return False
        if len(arrived) >= self.max_batch:
            return True
        return (self.clock() - arrived[0]) * 1000.0 >= self.max_wait_ms

    def time_left_ms(self) -> float:
        """How long a poll may block before the current batch is due (max_wait when empty,
        0 when a full batch is already waiting: a loop that polled first would leave a ready
        batch idle)."""
        arrived = self._arrived
        if not arrived:
            return float(self.max_wait_ms)
        if len(arrived) >= self.max_batch:
            return 0.0
        return max(0.0, self.max_wait_ms - (self.clock() - arrived[0]) * 1000.0)

    def take(self) -> list[T]:
        """Remove and return up to ``max_batch`` oldest items; the rest keep their arrival
        times."""
        batch = self._items[: self.max_batch]
        del self._items[: self.max_batch], self._arrived[: self.max_batch]
        return batch

    def take_where(self, keep: Callable[[T], bool]) -> list[T]:
        """Remove and return every item for which ``keep`` is False (e.g. revoked partitions);
        ``keep`` sees the items once each, in arrival order (it may carry state along)."""
        kept = [keep(i) for i in self._items]
        dropped = [i for i, k in zip(self._items, kept, strict=True) if not k]
        self._items = [i for i, k in zip(self._items, kept, strict=True) if k]
        self._arrived = [t for t, k in zip(self._arrived, kept, strict=True) if k]
        return dropped
