"""Exponential backoff with a cap, shared by every retry loop of the worker (Kafka, Redis, the
connect at start)."""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass
class Backoff:
    """Exponential backoff with a cap; ``wait`` returns False when told to stop."""

    first_s: float = 0.2
    max_s: float = 10.0

    def wait(self, attempt: int, stop: threading.Event) -> bool:
        # the exponent is capped: 2**1024 is past a float, and an outage of hours gets there
        return not stop.wait(min(self.max_s, self.first_s * 2 ** min(attempt, 32)))
