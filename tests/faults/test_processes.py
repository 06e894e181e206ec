"""``--processes 2``: one replica as two worker processes under a supervisor, on a real broker
and a real Redis. The two share the partitions as two replicas would; results, dead letters and
counts are exact; the pod's /metrics, /readyz and SIGTERM cover both; a supervisor killed with
SIGKILL takes its children with it."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import free_port_run
from tests.support import http_get as get

pytestmark = pytest.mark.integration


def start_pod(fleet) -> tuple[str, int]:
    """A replica of two worker processes; its name in the fleet and its metrics port."""
    port = free_port_run(3)
    name = fleet.start(
        "pod", CARSTREAM_PROCESSES="2", CARSTREAM_METRICS_PORT=str(port),
        CARSTREAM_METRICS_HOST="127.0.0.1",
    )  # fmt: skip
    return name, port


def child_pids(log: str) -> list[int]:
    found = re.search(r"2 worker processes: p0 pid (\d+), p1 pid (\d+)", log)
    assert found, log
    return [int(found.group(1)), int(found.group(2))]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (not yet reaped by its new parent) is gone for our purposes
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(cond, deadline_s: float, what: str, proc=None) -> None:
    deadline = time.monotonic() + deadline_s
    while not cond():
        assert proc is None or proc.poll() is None, f"the supervisor exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"timed out after {deadline_s}s waiting for {what}"
        time.sleep(0.2)


def test_two_processes_share_the_partitions_and_count_exactly(fx, stack, kafka_bootstrap):
    topics, redis_server, fleet = stack
    name, port = start_pod(fleet)
    proc = fleet.procs[name]
    base = f"http://127.0.0.1:{port}"
    # ready = both processes warm and holding partitions (or joined with none)
    wait_until(lambda: get(base + "/readyz")[0] == 200, 120, "both processes ready", proc)
    wait_until(lambda: fleet.log(name).count("partitions assigned") >= 2, 60, "both joined", proc)
    posts = fx.good_posts(90, seed=41, prefix="mp")
    bad = [(b"bad-1", b"{not json"), (b"bad-2", json.dumps({"post_id": "x"}).encode())]
    fx.produce(kafka_bootstrap, topics.input, [(p.encode(), m) for p, m, _ in posts] + bad)

    results = fx.Reader(kafka_bootstrap, topics.output, topics.partitions)
    dlq = fx.Reader(kafka_bootstrap, topics.dlq, topics.partitions)
    try:
        results.until(lambda r: fx.distinct_keys(r) >= len(posts), 120, what="every result")
        dlq.until(lambda r: len(r) >= len(bad), 60, what="both dead letters")
        fx.wait_no_lag(kafka_bootstrap, topics, deadline_s=60)
        by_post, _ = fx.results_by_post_id(results.records)
        assert set(by_post) == {p for p, _, _ in posts}
        assert {r["worker_id"] for r in by_post.values()} == {"pod-p0", "pod-p1"}
        assert sorted(r.value for r in dlq.records) == sorted(m for _, m in bad)  # byte for byte
        fx.check_counts(redis_server.url, by_post, {p: c for p, _, c in posts})
    finally:
        results.close()
        dlq.close()

    status, text = get(base + "/metrics")
    assert status == 200
    consumed = {
        s.labels["process"]: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "carstream_consumed_total"
    }
    # each process took its share of the six partitions
    assert set(consumed) == {"p0", "p1"} and all(v > 0 for v in consumed.values()), consumed
    assert sum(consumed.values()) == len(posts) + len(bad)

    pids = child_pids(fleet.log(name))
    assert fleet.terminate(name, timeout=90) == 0, fleet.log(name)
    assert not any(pid_alive(p) for p in pids)
    assert fleet.log(name).count("stopped after") == 2  # each drained and closed its clients


def test_a_supervisor_killed_with_sigkill_takes_its_processes_with_it(fx, stack):
    _, _, fleet = stack
    name, port = start_pod(fleet)
    proc = fleet.procs[name]
    wait_until(lambda: "2 worker processes" in fleet.log(name), 60, "the children", proc)
    pids = child_pids(fleet.log(name))
    wait_until(lambda: get(f"http://127.0.0.1:{port}/healthz")[0] == 200, 120, "live", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    wait_until(lambda: not any(pid_alive(p) for p in pids), 90, "the orphans to stop")
