"""Inference that isolates a poison input: a failing chunk is run again row by row.

One post the engine cannot take (a kernel error on odd values, say) must cost only its own post,
not its batch; an engine that fails on everything, a blank input included, must stop the worker
rather than dead-letter every good post. Pure apart from logging: the engine is a callable.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from worker.errors import FatalWorkerError

log = logging.getLogger(__name__)


class EngineFailedError(FatalWorkerError):
    """The engine fails on every input, a blank one included: it is unhealthy, not the posts."""


class EngineFailureLog:
    """Engine failures on posts, logged without flooding the log.

    An engine that fails on every real post while it still runs a blank one (a bad model, a
    broken kernel) is not stopped, only dead-letters: one traceback per failing chunk was
    thousands of lines a minute. The first failure's traceback is logged, then at most one every
    ``traceback_every_s``; in between, one line counting them at most every ``summary_every_s``
    (``carstream_dead_letters_total{kind="internal"}`` counts every post). Thread-safe: the
    inference threads share one.
    """

    def __init__(
        self,
        traceback_every_s: float = 300.0,
        summary_every_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.traceback_every_s = traceback_every_s
        self.summary_every_s = summary_every_s
        self._clock = clock
        self._lock = threading.Lock()
        self._traceback_at: float | None = None  # clock() of the last traceback logged
        self._traceback_wall = ""  # and its wall-clock time, for the summary line
        self._window_at = 0.0  # clock() of the last line logged
        self._chunks = 0  # failing chunks counted since then
        self._posts = 0  # posts dead-lettered since then

    def chunk_failed(self, size: int) -> bool:
        """In an ``except`` block: log the traceback of a chunk of ``size`` that failed, or
        count it. True when it was logged."""
        with self._lock:
            now = self._clock()
            if self._traceback_at is not None and now - self._traceback_at < self.traceback_every_s:
                self._chunks += 1
                self._summarise(now)
                return False
            self._traceback_at = self._window_at = now
            self._traceback_wall = datetime.now(UTC).strftime("%H:%M:%S UTC")
            log.exception(
                "engine failed on a batch of %d; retrying one by one (its next traceback in "
                "%.0f s at the earliest, counted in between)",
                size,
                self.traceback_every_s,
            )
            return True

    def posts_failed(self, count: int, logged: bool) -> None:
        """``count`` posts the engine failed on alone, to be dead-lettered; ``logged`` when
        their chunk's traceback was just logged (they are then named with it)."""
        if logged:
            log.warning("the engine runs but failed on %d posts: dead-lettering them", count)
            return
        with self._lock:
            self._posts += count
            self._summarise(self._clock())

    def _summarise(self, now: float) -> None:
        if now - self._window_at < self.summary_every_s:
            return
        log.warning(
            "the engine failed on %d batches in the last %.0f s (%d posts dead-lettered as "
            "internal); last traceback logged at %s",
            self._chunks,
            now - self._window_at,
            self._posts,
            self._traceback_wall,
        )
        self._window_at, self._chunks, self._posts = now, 0, 0


def infer_isolating(
    run: Callable[[Any], Any],
    rows: dict[int, Any],
    step: int,
    stack: Callable[[list[Any]], Any],
    blank: Callable[[Any], Any],
    observe: Callable[[float], None] = lambda seconds: None,
    failures: EngineFailureLog | None = None,
) -> tuple[dict[int, Any], dict[int, str]]:
    """Logits by position, and why the engine failed on each position it failed on.

    Rows go to ``run`` in chunks of ``step``. A chunk that fails is run again one row at a time,
    so one poison input costs only its own post. When every row of the chunk fails alone too,
    the engine is run on a ``blank`` (all zeros) row like its first: if that fails as well, the
    engine itself is unhealthy (CUDA out of memory for good, a lost device), and
    EngineFailedError is raised rather than dead-lettering good posts (the batch stays
    uncommitted; a restarted worker reads it again). ``observe`` gets each chunk's seconds;
    ``failures`` logs the failures (a traceback, then counts; a worker passes its own, so the
    rate limit spans its batches; without one, each call logs its first traceback).
    """
    failures = failures if failures is not None else EngineFailureLog()
    out: dict[int, Any] = {}
    failed: dict[int, str] = {}
    good = sorted(rows)
    for start in range(0, len(good), step):
        idx = good[start : start + step]
        t0 = time.perf_counter()
        try:
            logits = run(stack([rows[i] for i in idx]))
        except Exception:
            logged = failures.chunk_failed(len(idx))
        else:
            observe(time.perf_counter() - t0)
            out.update(zip(idx, logits, strict=True))
            continue
        errors: dict[int, str] = {}
        for i in idx:
            try:
                out[i] = run(rows[i][None])[0]
            except Exception as exc:
                errors[i] = f"{exc.__class__.__name__}: {exc}"
        if errors and len(errors) == len(idx):
            try:
                run(blank(rows[idx[0]][None]))
            except Exception as exc:
                raise EngineFailedError(
                    f"the engine failed on all {len(idx)} posts of a batch, one by one, and on a "
                    f"blank input ({exc.__class__.__name__}: {exc})"
                ) from exc
        if errors:
            failures.posts_failed(len(errors), logged)
        failed.update(errors)
    return out, failed
