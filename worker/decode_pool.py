"""The decode threads, with a way out of a decode that never ends.

A Python thread cannot be killed, and Pillow's C decoders have no cancellation point: a post that
makes a decoder spin (a shape of input no check foresaw) would hold its batch, and the partition
behind it, for ever, and after ``max_poll_interval_ms`` the consumer group would hand the same
batch to the next replica. So the loop waits for each decode until its deadline only; past it,
the post goes to the dead-letter topic, and this pool writes the thread off: a fresh thread takes
its place at once, and the stuck one exits whenever its decode returns. At most ``threads``
written-off threads may run at once (each may hold a decode's memory); beyond that the pool
writes none off, the loop waits, and the liveness probe restarts the replica, whose new pool
then dead-letters the post.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from .thread_names import name_this_thread

log = logging.getLogger(__name__)


class DecodeFuture(Future):
    """A decode's future, which knows when the decode began and on which thread."""

    def __init__(self) -> None:
        super().__init__()
        self.started_at: float | None = None  # time.monotonic() when a thread took it
        self.thread: _DecodeThread | None = None


class _DecodeThread(threading.Thread):
    def __init__(self, pool: DecodePool, name: str) -> None:
        # daemon: a written-off thread may never return, and must not hold the process open at
        # exit; the threads in service are joined by shutdown()
        super().__init__(name=name, daemon=True)
        self.pool = pool
        self.current: DecodeFuture | None = None
        self.written_off = False

    def run(self) -> None:
        name_this_thread()
        self.pool._serve(self)


class DecodePool:
    """A fixed number of decode threads in service; the ``ThreadPoolExecutor`` calls the loop
    uses (``submit``, ``shutdown``), plus ``write_off`` for a decode past its deadline."""

    def __init__(self, threads: int, name_prefix: str = "decode") -> None:
        if threads < 1:
            raise ValueError(f"a decode pool needs at least one thread, not {threads}")
        self.threads = threads
        self.name_prefix = name_prefix
        self._queue: queue.SimpleQueue[tuple[DecodeFuture, Callable[..., Any], tuple, dict]] = (
            queue.SimpleQueue()
        )
        self._lock = threading.Lock()
        self._serving: list[_DecodeThread] = []
        self._written_off = 0  # written-off threads still running
        self._started = 0
        self._shutdown = False
        for _ in range(threads):
            self._start_thread()

    @property
    def written_off(self) -> int:
        """How many written-off threads are still running their decode."""
        with self._lock:
            return self._written_off

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> DecodeFuture:
        future = DecodeFuture()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot submit a decode after the pool was shut down")
            self._queue.put((future, fn, args, kwargs))
        return future

    def write_off(self, future: DecodeFuture) -> bool:
        """Give up on a running decode: its thread leaves service and a fresh one replaces it.

        False when the decode is not running on a thread in service (it has finished, has not
        started, or was written off already), or when ``threads`` written-off threads are still
        running: then nothing changes, and the caller has to wait for the decode after all.
        """
        with self._lock:
            thread = future.thread
            if thread is None or thread.current is not future or thread.written_off:
                return False
            if self._written_off >= self.threads:
                return False
            thread.written_off = True
            self._written_off += 1
            self._serving.remove(thread)
            if not self._shutdown:
                self._start_thread()
        return True

    def shutdown(
        self, wait: bool = True, cancel_futures: bool = False, timeout: float | None = None
    ) -> None:
        """Stop the threads in service once the queue is done (or cancelled); written-off
        threads are not waited for, nor, past ``timeout`` seconds, a thread whose decode has
        not returned."""
        with self._lock:
            if self._shutdown:
                serving = []
            else:
                self._shutdown = True
                serving = list(self._serving)
            if cancel_futures:
                while True:
                    try:
                        future, *_ = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    future.cancel()
            for _ in serving:
                self._queue.put(None)  # type: ignore[arg-type]  # one stop sign per thread
        if not wait:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in serving:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        stuck = [thread.name for thread in serving if thread.is_alive()]
        if stuck:
            log.warning("decode threads still busy at shutdown, left behind: %s", ", ".join(stuck))

    # --- inside the threads -------------------------------------------------------------
    def _start_thread(self) -> None:
        """Start one more thread in service (the caller holds the lock)."""
        thread = _DecodeThread(self, f"{self.name_prefix}_{self._started}")
        self._started += 1
        self._serving.append(thread)
        thread.start()

    def _serve(self, me: _DecodeThread) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, fn, args, kwargs = item
            if not future.set_running_or_notify_cancel():
                continue
            with self._lock:
                future.started_at = time.monotonic()
                future.thread = me
                me.current = future
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)
            with self._lock:
                me.current = None
                if me.written_off:
                    self._written_off -= 1
                    log.info("a written-off decode thread (%s) returned at last", me.name)
                    return
