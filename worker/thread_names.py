"""OS names for the worker's threads, so ``top -H`` and CPU accounting can tell them apart.

Python 3.11 names threads only inside the interpreter; the kernel sees every thread as
``python``. With these names, ``top -H -p <pid>`` shows decode threads, the overlapped loop's
inference and delivery threads, Kafka I/O and the metrics server, and what is still called
``python`` besides the main thread is the inference runtime's own pool (ONNX Runtime's intra-op
threads). benchmarks/worker_ab.py reads them to split the worker's CPU time by stage. Linux
only; elsewhere, and where /proc is read-only, naming is skipped.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)

COMM_MAX = 15  # the kernel keeps 15 bytes of a thread name


def os_thread_name(python_name: str) -> str:
    """A short, recognisable kernel name for a Python thread name."""
    if python_name.endswith("-network-thread"):  # kafka-python's producer sender
        return "kafka-producer"
    if python_name.startswith("kafka-io"):  # kafka-python 3's client I/O thread
        return "kafka-io"
    return python_name[:COMM_MAX]


def set_os_thread_name(native_id: int, name: str) -> bool:
    """Write a thread's kernel name (``/proc/self/task/<tid>/comm``); False where that fails."""
    try:
        with open(f"/proc/self/task/{native_id}/comm", "w", encoding="ascii") as comm:
            comm.write(name.encode("ascii", "replace").decode()[:COMM_MAX])
        return True
    except (OSError, UnicodeError) as exc:
        log.debug("cannot name thread %d %r: %s", native_id, name, exc)
        return False


def name_this_thread() -> None:
    """Give the calling thread its Python name in the kernel (a pool's ``initializer``)."""
    thread = threading.current_thread()
    if thread.native_id is not None:
        set_os_thread_name(thread.native_id, os_thread_name(thread.name))


def name_python_threads() -> int:
    """Name every running Python thread but the main one (whose name is the process name)."""
    named = 0
    for thread in threading.enumerate():
        if thread is threading.main_thread() or thread.native_id is None:
            continue
        named += set_os_thread_name(thread.native_id, os_thread_name(thread.name))
    return named
