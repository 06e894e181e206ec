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
    max_batch: int
    max_wait_ms: int
    clock: Callable[[], float] = time.monotonic
    _items: list[T] = field(default_factory=list)
    _first_at: float | None = None

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_wait_ms < 0:
            raise ValueError("max_batch must be >= 1 and max_wait_ms >= 0")

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: T) -> None:
        if not self._items:
            self._first_at = self.clock()
        self._items.append(item)

    def ready(self) -> bool:
        """True when a batch is full, or the oldest item has waited ``max_wait_ms``."""
        if not self._items:
            return False
        if len(self._items) >= self.max_batch:
            return True
        return (self.clock() - self._first_at) * 1000.0 >= self.max_wait_ms

    def time_left_ms(self) -> float:
        """How long a poll may block before the current batch is due (max_wait when empty,
        0 when a full batch is already waiting: the rest that ``take`` leaves starts a new wait,
        and a loop that polled for that wait first left a ready batch idle for up to max_wait)."""
        if not self._items:
            return float(self.max_wait_ms)
        if len(self._items) >= self.max_batch:
            return 0.0
        waited = (self.clock() - self._first_at) * 1000.0
        return max(0.0, self.max_wait_ms - waited)

    def take(self) -> list[T]:
        """Remove and return up to ``max_batch`` oldest items; the rest start a new wait."""
        batch, self._items = self._items[: self.max_batch], self._items[self.max_batch :]
        self._first_at = self.clock() if self._items else None
        return batch

    def take_where(self, keep: Callable[[T], bool]) -> list[T]:
        """Remove and return every item for which ``keep`` is False (e.g. revoked partitions)."""
        dropped = [i for i in self._items if not keep(i)]
        self._items = [i for i in self._items if keep(i)]
        if not self._items:
            self._first_at = None
        return dropped
