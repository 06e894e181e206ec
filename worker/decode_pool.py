"""The decode threads: CPU slots for decoding, room for URL fetches, and a way out of a decode
that never ends.

**Fetches do not hold a decode slot.** A post's work is parse -> (fetch its ``image_url``) ->
decode. Decoding needs a core; a fetch only waits on the network. The pool runs ``threads`` +
``io_threads`` threads, and a task takes one of ``threads`` CPU slots (``cpu_slot()``) around its
CPU work only, so at most ``threads`` decode at once while up to ``io_threads`` more wait on
hosts: a replica sized at one decode thread per spare core still fetches many URLs at a time.

**A deadline, not a hang.** A Python thread cannot be killed, and Pillow's C decoders have no
cancellation point: a post that makes a decoder spin (a shape of input no check foresaw) would
hold its batch, and the partition behind it, for ever, and after ``max_poll_interval_ms`` the
consumer group would hand the same batch to the next replica. So the loop waits for each task
until its deadline only (``DecodeFuture.running_s``: time spent waiting for a CPU slot does not
count), and meanwhile enforces it on every running task (``write_off_overdue``: the task holding
the slot an awaited one waits for may be a later post's); past it, the post goes to the
dead-letter topic and this pool writes the thread off: it
leaves service (and gives back its CPU slot), a fresh thread takes its place at once, and the
stuck one exits whenever its call returns. Written-off threads may still hold memory, so at most
``threads`` of them written off in a decode, and ``threads + io_threads`` in all, run at once;
beyond that the pool writes none off, the loop waits, and the liveness probe restarts the
replica, whose new pool then dead-letters the post.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any

from .thread_names import name_this_thread

log = logging.getLogger(__name__)


class WrittenOffError(RuntimeError):
    """Raised in a written-off thread that asks for a CPU slot: its result is not wanted."""


class DecodeFuture(Future):
    """A task's future, which knows how long the task has been running, and on which thread."""

    def __init__(self, lock: threading.Lock | None = None) -> None:
        super().__init__()
        self._clock_lock = lock  # the pool's: the fields below change together under it
        self.started_at: float | None = None  # time.monotonic() when a thread took it
        self.slot_wait_s = 0.0  # time spent waiting for a CPU slot, finished waits
        self.waiting_since: float | None = None  # set while waiting for one
        self.thread: _DecodeThread | None = None
        self.timed_out = False  # written off past its deadline: the caller dead-letters it

    def running_s(self, now: float | None = None) -> float | None:
        """Seconds since a thread took the task, less its waits for a CPU slot (None: queued)."""
        if self._clock_lock is None:
            return self._running_s(now)
        with self._clock_lock:
            return self._running_s(now)

    def _running_s(self, now: float | None = None) -> float | None:
        started, since = self.started_at, self.waiting_since
        if started is None:
            return None
        now = time.monotonic() if now is None else now
        return now - started - self.slot_wait_s - (now - since if since is not None else 0.0)


class _DecodeThread(threading.Thread):
    def __init__(self, pool: DecodePool, name: str) -> None:
        # daemon: a written-off thread may never return, and must not hold the process open at
        # exit; the threads in service are joined by shutdown()
        super().__init__(name=name, daemon=True)
        self.pool = pool
        self.current: DecodeFuture | None = None
        self.written_off = False
        self.holds_cpu = False
        self.stuck_in_cpu = False  # written off while holding a CPU slot

    def run(self) -> None:
        name_this_thread()
        self.pool._serve(self)


class DecodePool:
    """``threads`` CPU slots and ``threads + io_threads`` threads in service; the
    ``ThreadPoolExecutor`` calls the loop uses (``submit``, ``shutdown``), plus ``cpu_slot`` for
    the tasks and ``write_off`` for a task past its deadline."""

    def __init__(self, threads: int, io_threads: int = 0, name_prefix: str = "decode") -> None:
        if threads < 1:
            raise ValueError(f"a decode pool needs at least one thread, not {threads}")
        if io_threads < 0:
            raise ValueError(f"io_threads must be >= 0, not {io_threads}")
        self.threads = threads
        self.io_threads = io_threads
        self.name_prefix = name_prefix
        self._queue: queue.SimpleQueue[tuple[DecodeFuture, Callable[..., Any], tuple, dict]] = (
            queue.SimpleQueue()
        )
        self._lock = threading.Lock()
        self._cpu_freed = threading.Condition(self._lock)
        self._cpu_free = threads
        self._serving: list[_DecodeThread] = []
        self._written_off = 0  # written-off threads still running
        self._written_off_cpu = 0  # of which written off inside a CPU slot
        self._started = 0
        self._shutdown = False
        for _ in range(threads + io_threads):
            self._start_thread()

    @property
    def written_off(self) -> int:
        """How many written-off threads are still running their task."""
        with self._lock:
            return self._written_off

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> DecodeFuture:
        future = DecodeFuture(self._lock)
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot submit a decode after the pool was shut down")
            self._queue.put((future, fn, args, kwargs))
        return future

    @contextmanager
    def cpu_slot(self) -> Iterator[None]:
        """Hold one of the ``threads`` CPU slots (decoding, parsing); a no-op outside the pool.

        Raises WrittenOffError in a thread written off meanwhile: it is out of service, and its
        task's result will not be read.
        """
        me = threading.current_thread()
        if not isinstance(me, _DecodeThread) or me.pool is not self:
            yield
            return
        future = me.current
        with self._lock:
            if self._cpu_free == 0 and not me.written_off and future is not None:
                future.waiting_since = time.monotonic()
            while self._cpu_free == 0 and not me.written_off:
                self._cpu_freed.wait()
            if future is not None and future.waiting_since is not None:
                future.slot_wait_s += time.monotonic() - future.waiting_since
                future.waiting_since = None
            if me.written_off:
                if self._cpu_free:  # a wake-up meant for a thread in service: pass it on
                    self._cpu_freed.notify_all()
                raise WrittenOffError(f"{me.name} was written off")
            self._cpu_free -= 1
            me.holds_cpu = True
        try:
            yield
        finally:
            with self._lock:
                if me.holds_cpu:  # not given back already by write_off
                    me.holds_cpu = False
                    self._cpu_free += 1
                    self._cpu_freed.notify_all()

    def write_off(self, future: DecodeFuture) -> bool:
        """Give up on a running task: its thread leaves service (giving back its CPU slot), and a
        fresh one replaces it; the future is marked ``timed_out``.

        False when the task is not running on a thread in service (it has finished, has not
        started, or was written off already), or when as many written-off threads as allowed
        are still running: then nothing changes, and the caller has to wait for it after all.
        """
        with self._lock:
            return self._write_off(future)

    def write_off_overdue(self, limit_s: float) -> list[DecodeFuture]:
        """Write off every running task past ``limit_s`` of running time; the ones written off.

        The loop waits for one post at a time, but a post waiting for a CPU slot does not run
        (its clock stops), so the deadline must reach whoever holds the slots: a stuck decode of
        a later post, taken before the awaited one got its slot, would otherwise hold the batch.
        """
        now = time.monotonic()
        with self._lock:
            overdue = [
                t.current
                for t in self._serving
                if t.current is not None and (t.current._running_s(now) or 0.0) >= limit_s
            ]
            return [future for future in overdue if self._write_off(future)]

    def _write_off(self, future: DecodeFuture) -> bool:
        thread = future.thread
        if thread is None or thread.current is not future or thread.written_off:
            return False
        if future.done():  # finished while its thread had not yet left it
            return False
        if self._written_off >= self.threads + self.io_threads:
            return False
        if thread.holds_cpu and self._written_off_cpu >= self.threads:
            return False
        thread.written_off = True
        future.timed_out = True
        self._written_off += 1
        if thread.holds_cpu:
            thread.holds_cpu = False
            thread.stuck_in_cpu = True
            self._written_off_cpu += 1
            self._cpu_free += 1
        # a thread written off while waiting for a slot must not take the next wake-up either
        self._cpu_freed.notify_all()
        self._serving.remove(thread)
        if not self._shutdown:
            self._start_thread()
        return True

    def shutdown(
        self, wait: bool = True, cancel_futures: bool = False, timeout: float | None = None
    ) -> None:
        """Stop the threads in service once the queue is done (or cancelled); written-off
        threads are not waited for, nor, past ``timeout`` seconds, a thread whose task has
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
            except BaseException as exc:  # the waiter gets it, as from an executor
                future.set_exception(exc)
            else:
                future.set_result(result)
            with self._lock:
                me.current = None
                if me.written_off:
                    self._written_off -= 1
                    if me.stuck_in_cpu:
                        self._written_off_cpu -= 1
                    log.info("a written-off decode thread (%s) returned at last", me.name)
                    return
