"""Fail fast on an image host that keeps timing out (a circuit breaker per origin).

A fetch that times out holds a pool thread for ``url_timeout_s``, and a batch waits for its
slowest post; so a producer whose image host hangs, sending a few posts a second, keeps every
fetch slot busy and delays every other post of the replica by many times the timeout. After
``strikes`` timeouts in a row from one origin (``scheme://host:port``), its posts are
dead-lettered at once (``url_fetch_failed``, replayable from the dead-letter topic) for
``pause_s``; then one fetch is tried while the origin's other posts are still refused: one that
ends in time closes the breaker, a timeout pauses the origin again. Only timeouts count: a
refused connection or an HTTP error returns at once and holds nothing. Keyed by origin, not host
name, so a post aiming ``https`` at a host's plain-HTTP port (a TLS handshake that hangs), or at
a port that drops packets, pauses only that origin; which timeouts are strikes at all (not a
wait for a resolver thread, nor a deadline an earlier redirect used up) is
:mod:`worker.url_fetch`'s call.

Pure and clock-injected; the worker shares one instance between its decode threads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

log = logging.getLogger(__name__)

MAX_HOSTS = 10_000  # origins remembered at most (least recently struck forgotten first)


class HostBreaker:
    """Per origin (any string key; the fetcher passes ``scheme://host:port``): timeouts in a
    row, and until when its fetches are refused."""

    def __init__(
        self,
        strikes: int,
        pause_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_pause: Callable[[str], None] | None = None,
    ) -> None:
        """``on_pause(origin)``: called (outside the lock) each time an origin is newly paused."""
        if strikes < 1 or pause_s <= 0:
            raise ValueError("strikes must be >= 1 and pause_s > 0")
        self.strikes = strikes
        self.pause_s = pause_s
        self.clock = clock
        self.on_pause = on_pause
        self._lock = threading.Lock()
        # origin -> (timeouts in a row, refused until: clock time, 0 when not paused)
        self._hosts: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def refusal(self, origin: str) -> str | None:
        """Why a fetch from ``origin`` is not tried now, or None to try it.

        When a pause ends, one caller gets None: its fetch is the trial, and the origin stays
        paused while it runs. Letting every waiting post through at once would have them all
        hold a fetch thread for ``url_timeout_s`` again, before the first timeout paused it.
        """
        with self._lock:
            count, until = self._hosts.get(origin, (0, 0.0))
            now = self.clock()
            left = until - now
            if left <= 0:
                if until and count >= self.strikes:  # the pause is over: this is the trial
                    self._hosts[origin] = (count, now + self.pause_s)
                return None
        return (
            f"not fetched: {origin} timed out {count} times in a row; its posts are dead-lettered "
            f"without a fetch for {left:.0f} s more"
        )

    def timed_out(self, origin: str) -> None:
        """A fetch from ``origin`` ran out of time: one strike; the last one pauses the origin."""
        with self._lock:
            count, until = self._hosts.pop(origin, (0, 0.0))
            count += 1
            now = self.clock()
            paused = count >= self.strikes and until <= now  # newly: say so
            if count >= self.strikes:  # a trial's timeout pauses the origin again from now
                until = now + self.pause_s
            self._hosts[origin] = (count, until)
            while len(self._hosts) > MAX_HOSTS:
                self._hosts.popitem(last=False)
        if paused:
            if self.on_pause is not None:
                self.on_pause(origin)
            log.warning(
                "image origin %s timed out %d times in a row: its posts are dead-lettered "
                "without a fetch for %g s",
                origin,
                count,
                self.pause_s,
            )

    def answered(self, origin: str) -> None:
        """A fetch from ``origin`` ended in time (an answer or a quick refusal): the row of
        timeouts is broken, and a paused origin is fetched from again."""
        with self._lock:
            if self._hosts.pop(origin, None) is not None:
                log.info("image origin %s no longer times out", origin)
