"""Kernel thread names: what `top -H` shows and benchmarks/worker_ab.py splits CPU time by."""

from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from worker.thread_names import name_python_threads, name_this_thread, os_thread_name

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="thread names live in Linux's /proc"
)


def comm(native_id: int) -> str:
    return Path(f"/proc/self/task/{native_id}/comm").read_text().strip()


@pytest.mark.parametrize(
    ("python_name", "expected"),
    [
        ("decode_0", "decode_0"),
        ("kafka-io-carstream-host-4242", "kafka-io"),
        ("carstream-host-4242-network-thread", "kafka-producer"),
        ("metrics-http", "metrics-http"),
        ("a-thread-name-longer-than-fifteen", "a-thread-name-l"),
    ],
)
def test_os_thread_name_is_short_and_says_what_the_thread_does(python_name, expected):
    assert os_thread_name(python_name) == expected


@linux_only
def test_pool_initializer_names_each_decode_thread():
    with ThreadPoolExecutor(2, thread_name_prefix="decode", initializer=name_this_thread) as pool:
        names = set(pool.map(lambda _: comm(threading.get_native_id()), range(8)))
    assert names <= {"decode_0", "decode_1"} and names


@linux_only
def test_running_threads_are_named_but_not_the_main_thread():
    main_before = comm(threading.main_thread().native_id)
    started, release = threading.Event(), threading.Event()

    def park():
        started.set()
        release.wait(10)

    thread = threading.Thread(target=park, name="kafka-io-test-client")
    thread.start()
    try:
        started.wait(10)
        assert name_python_threads() >= 1
        assert comm(thread.native_id) == "kafka-io"
        assert comm(threading.main_thread().native_id) == main_before
    finally:
        release.set()
        thread.join()


@linux_only
def test_a_url_fetchs_resolver_and_deadline_threads_are_named_for_what_they_do():
    # they inherit the kernel name of the decode thread that starts them, which counted their
    # CPU as decoding in benchmarks/worker_ab.py and showed extra decode_N threads in top -H
    import socket

    from worker.url_fetch import UrlPolicy, fetch

    seen: dict[str, str] = {}

    def resolve(host, port, type=socket.SOCK_STREAM):
        seen["resolver"] = comm(threading.get_native_id())
        for thread in threading.enumerate():
            if thread.name == "url-deadline" and thread.native_id is not None:
                seen["deadline"] = comm(thread.native_id)
        raise socket.gaierror("no such host")

    def decode_thread() -> None:
        name_this_thread()
        try:
            fetch("http://img.example/a.jpg", UrlPolicy(timeout_s=5.0), resolve)
        except Exception as exc:  # url_fetch_failed, as no name resolves
            seen["error"] = type(exc).__name__

    thread = threading.Thread(target=decode_thread, name="decode_7")
    thread.start()
    thread.join(30)
    assert seen["resolver"].startswith("url-resolve")
    assert seen["deadline"] == "url-deadline"
    assert seen["error"] == "PostError"
