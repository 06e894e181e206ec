"""``processes > 1``: the children's settings, the merged /metrics, and the supervisor's
handling of its children (real subprocesses standing in for workers; no broker needed here,
tests/faults/test_processes.py runs real workers under it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from tests.support import free_port_run, http_get, worker_cli
from worker import supervisor
from worker.settings import WorkerSettings


def settings(**kw) -> WorkerSettings:
    return WorkerSettings(bundle="/b", worker_id="pod-a", **kw)


# --- children's environment ------------------------------------------------------------------


def test_child_env_carries_every_given_flag_and_each_childs_own_ids_and_port():
    s = settings(processes=3, metrics_port=9400, group_instance_id="pod-a", max_batch=16)
    given = {"max_batch": "16", "gpu_decode": True, "log_json": False, "processes": "3"}
    base = {"PATH": "/bin", "CARSTREAM_MAX_WAIT_MS": "20"}
    envs = [supervisor.child_env(base, given, s, i) for i in range(3)]
    for i, env in enumerate(envs):
        assert env["PATH"] == "/bin" and env["CARSTREAM_MAX_WAIT_MS"] == "20"  # inherited
        assert env["CARSTREAM_MAX_BATCH"] == "16"
        assert env["CARSTREAM_GPU_DECODE"] == "true" and env["CARSTREAM_LOG_JSON"] == "false"
        assert env["CARSTREAM_PROCESSES"] == "1"  # a child never supervises
        assert env["CARSTREAM_WORKER_ID"] == f"pod-a-p{i}"
        assert env["CARSTREAM_GROUP_INSTANCE_ID"] == f"pod-a-p{i}"
        assert env["CARSTREAM_METRICS_PORT"] == str(9401 + i)
        assert env["CARSTREAM_METRICS_HOST"] == "127.0.0.1"
    # what the child parses is what the supervisor was given, bar its own fields
    child = WorkerSettings(**{k[len("CARSTREAM_") :].lower(): v for k, v in envs[1].items()
                              if k.startswith("CARSTREAM_")})  # fmt: skip
    assert (child.max_batch, child.gpu_decode, child.max_wait_ms) == (16, True, 20)
    assert (child.processes, child.worker_id, child.metrics_port) == (1, "pod-a-p1", 9402)


def test_child_env_drops_every_spelling_of_what_it_sets():
    # settings read the environment case-insensitively: a lower-case duplicate would race
    s = settings(processes=2, metrics_port=9400)
    base = {"carstream_metrics_port": "9400", "Carstream_Max_Batch": "8", "carstream_top_k": "3"}
    env = supervisor.child_env(base, {"max_batch": "4"}, s, 0)
    assert "carstream_metrics_port" not in env and "Carstream_Max_Batch" not in env
    assert env["CARSTREAM_METRICS_PORT"] == "9401" and env["CARSTREAM_MAX_BATCH"] == "4"
    assert env["carstream_top_k"] == "3"  # not set here: left as it was


def test_no_metrics_port_means_none_for_the_children_and_no_membership_id_unless_set():
    env = supervisor.child_env({}, {}, settings(processes=2, metrics_port=0), 1)
    assert env["CARSTREAM_METRICS_PORT"] == "0"
    assert "CARSTREAM_GROUP_INSTANCE_ID" not in env


def test_processes_whose_ports_pass_65535_are_refused():
    with pytest.raises(ValidationError, match="past 65535"):
        settings(processes=4, metrics_port=65533)
    assert settings(processes=4, metrics_port=0).processes == 4
    with pytest.raises(ValidationError, match="processes"):
        settings(processes=0)


# --- one /metrics ----------------------------------------------------------------------------


def exposition(consumed: float, results: dict[str, float]) -> str:
    r = CollectorRegistry()
    Counter("carstream_consumed", "records consumed", registry=r).inc(consumed)
    c = Counter("carstream_results", "results published", ["status"], registry=r)
    for status, n in results.items():
        c.labels(status=status).inc(n)
    h = Histogram("carstream_batch_size", "records per batch", buckets=(1, 8), registry=r)
    h.observe(consumed)
    return generate_latest(r).decode()


def test_merged_metrics_parse_with_each_family_once_and_every_sample_labelled():
    merged = supervisor.merge_expositions(
        [("p0", exposition(5, {"ok": 4, "low_confidence": 1})), ("p1", exposition(7, {"ok": 7}))]
    )
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    types = [line.split()[2] for line in merged.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types)) and any("carstream_consumed" in t for t in types)
    consumed = {
        s.labels["process"]: s.value
        for s in families["carstream_consumed"].samples
        if s.name == "carstream_consumed_total"
    }
    assert consumed == {"p0": 5, "p1": 7}
    results = {
        (s.labels["process"], s.labels["status"]): s.value
        for s in families["carstream_results"].samples
        if s.name == "carstream_results_total"
    }
    assert results == {("p0", "ok"): 4, ("p0", "low_confidence"): 1, ("p1", "ok"): 7}
    buckets = [s for s in families["carstream_batch_size"].samples if s.name.endswith("_bucket")]
    assert {s.labels["process"] for s in buckets} == {"p0", "p1"}
    assert all("le" in s.labels for s in buckets)


def test_merging_nothing_is_empty_and_labels_go_in_front_of_existing_ones():
    assert supervisor.merge_expositions([]) == ""
    assert supervisor._with_label('a_total{x="1 2"} 3', "p0") == 'a_total{process="p0",x="1 2"} 3'
    assert supervisor._with_label("a_total 3", "p1") == 'a_total{process="p1"} 3'
    assert supervisor._with_label("a_total{} 3", "p1") == 'a_total{process="p1"} 3'


# --- the supervisor with stand-in children ---------------------------------------------------

# a child that answers /healthz, /readyz and /metrics on its port like a worker, exits on
# SIGTERM with CHILD_EXIT_ON_TERM, or by itself after CHILD_EXIT_AFTER_S with CHILD_EXIT
CHILD = textwrap.dedent(
    """
    import faulthandler, http.server, os, signal, sys, threading, time
    faulthandler.register(signal.SIGUSR1, file=sys.stdout, all_threads=True)  # join()'s report
    port = int(os.environ["CARSTREAM_METRICS_PORT"])
    ready = os.environ.get("CHILD_READY", "1") == "1"
    wid = os.environ["CARSTREAM_WORKER_ID"]
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = {"/metrics": f"# HELP c x\\n# TYPE c counter\\nc_total 1\\n",
                    "/healthz": "ok\\n", "/readyz": "ready\\n" if ready else "not ready\\n"}
            code = 503 if self.path == "/readyz" and not ready else 200
            self.send_response(code); self.end_headers()
            self.wfile.write(body.get(self.path, "").encode())
        def log_message(self, *a): pass
    # a worker reads its settings and imports before it installs its handlers
    time.sleep(float(os.environ.get("CHILD_START_DELAY_S", "0") or 0))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    stop = threading.Event()
    # as the worker does: a handler that called stop.set() itself could hang for ever when the
    # signal lands while the main thread is inside stop.wait() (worker/stop_signals.py)
    from worker.stop_signals import stop_on_signals
    stop_on_signals(stop)
    print(wid, "up", flush=True)
    after = float(os.environ.get("CHILD_EXIT_AFTER_S", "0") or 0)
    if after and wid.endswith("-p1"):
        time.sleep(after); sys.exit(int(os.environ["CHILD_EXIT"]))
    # in slices, as the supervisor polls; the flag itself is set by stop_on_signals' thread
    while not stop.wait(0.1):
        pass
    print(wid, "drained", flush=True)
    sys.exit(int(os.environ.get("CHILD_EXIT_ON_TERM", "0")))
    """
)


get = http_get


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


class Supervised:
    """supervise() on a thread with CHILD as the worker command."""

    def __init__(self, monkeypatch, n: int = 2, **env: str) -> None:
        monkeypatch.setattr(supervisor, "CHILD_COMMAND", [sys.executable, "-c", CHILD])
        self.port = free_port_run(n + 1)
        self.settings = settings(processes=n, metrics_port=self.port, metrics_host="127.0.0.1")
        self.server = supervisor.bind(self.settings)
        self.stop = threading.Event()
        self.children: list[subprocess.Popen] = []

        def spawn(cmd, **kw):
            kw["stdout"] = subprocess.PIPE
            child = subprocess.Popen(cmd, text=True, **kw)
            self.children.append(child)
            return child

        base = {**os.environ, **env}
        self.code: int | None = None
        self.thread = threading.Thread(
            target=lambda: setattr(
                self,
                "code",
                supervisor.supervise(self.settings, {}, base, self.stop, self.server, spawn),
            )
        )
        self.thread.start()

    def wait_up(self, deadline_s: float = 30) -> None:
        deadline = time.monotonic() + deadline_s
        while get(f"http://127.0.0.1:{self.port}/healthz")[0] != 200:
            assert time.monotonic() < deadline, "the children never answered"
            assert self.thread.is_alive(), f"supervise returned {self.code}"
            time.sleep(0.1)

    def join(self, timeout: float = 30) -> int | None:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError(f"supervise did not return; children:\n{self.stuck_report()}")
        self.server.server_close()
        return self.code

    def stuck_report(self) -> str:
        """Each child's state, and the Python stacks of those still running (then killed), so
        a hang says where each child waits."""
        lines = []
        for child in self.children:
            lines.append(f"pid {child.pid}: {_state(child.pid)}")
            if child.poll() is None:
                child.send_signal(signal.SIGUSR1)  # faulthandler writes every thread's stack
                time.sleep(0.5)  # (the report is best effort; the child is killed next)
                child.kill()
                lines.append(child.communicate()[0])
        return "\n".join(lines)


def test_stop_forwards_sigterm_every_child_drains_and_the_code_is_0(monkeypatch):
    sup = Supervised(monkeypatch)
    sup.wait_up()
    status, body = get(f"http://127.0.0.1:{sup.port}/metrics")
    assert status == 200
    samples = [s for f in text_string_to_metric_families(body) for s in f.samples]
    assert sorted(s.labels["process"] for s in samples) == ["p0", "p1"]
    assert get(f"http://127.0.0.1:{sup.port}/readyz") == (200, "p0: ready\np1: ready\n")
    sup.stop.set()
    assert sup.join() == 0
    for child in sup.children:
        assert child.returncode == 0
        assert "drained" in child.stdout.read()  # SIGTERM, handled: not killed


def test_a_stop_while_the_children_start_still_drains_them_and_the_code_is_0(monkeypatch):
    # SIGTERM forwarded before a child has its handlers killed it (-15): the replica exited 143
    sup = Supervised(monkeypatch, CHILD_START_DELAY_S="1.5")
    time.sleep(0.5)  # the children run, without their handlers yet
    assert all(child.poll() is None for child in sup.children)
    sup.stop.set()
    assert sup.join() == 0
    for child in sup.children:
        assert child.returncode == 0
        assert "drained" in child.stdout.read()


def test_a_child_not_ready_makes_the_pod_not_ready(monkeypatch):
    sup = Supervised(monkeypatch, CHILD_READY="0")
    try:
        sup.wait_up()
        status, body = get(f"http://127.0.0.1:{sup.port}/readyz")
        assert status == 503 and "p0: not ready" in body
    finally:
        sup.stop.set()
        sup.join()


def test_a_child_that_exits_stops_the_others_and_its_code_is_the_replicas(monkeypatch):
    sup = Supervised(monkeypatch, CHILD_EXIT_AFTER_S="0.5", CHILD_EXIT="3")
    assert sup.join(timeout=60) == 3  # no stop asked: p1's own exit ended it
    p0, p1 = sup.children
    assert p1.returncode == 3
    assert p0.returncode == 0 and "drained" in p0.stdout.read()


def test_a_child_that_exits_0_unasked_is_still_a_failure(monkeypatch):
    sup = Supervised(monkeypatch, CHILD_EXIT_AFTER_S="0.5", CHILD_EXIT="0")
    assert sup.join(timeout=60) == 1


def test_a_child_killed_by_a_signal_gives_128_plus_the_signal(monkeypatch):
    sup = Supervised(monkeypatch)
    sup.wait_up()
    sup.children[1].send_signal(signal.SIGKILL)  # the OOM killer, say
    assert sup.join(timeout=60) == 128 + signal.SIGKILL
    assert supervisor.exit_code(-15) == 143 and supervisor.exit_code(2) == 2


def test_a_child_failing_while_it_drains_gives_its_code(monkeypatch):
    sup = Supervised(monkeypatch, CHILD_EXIT_ON_TERM="1")
    sup.wait_up()
    sup.stop.set()
    assert sup.join() == 1


def test_a_silent_child_reads_as_no_answer(monkeypatch):
    sup = Supervised(monkeypatch)
    try:
        sup.wait_up()
        sup.children[0].send_signal(signal.SIGSTOP)  # alive, answering nothing
        status, body = get(f"http://127.0.0.1:{sup.port}/healthz")
        assert status == 503 and "p0: no answer" in body and "p1: ok" in body
    finally:
        sup.children[0].send_signal(signal.SIGCONT)
        sup.stop.set()
        sup.join()


def test_a_bad_bundle_is_one_line_before_any_child_starts(tmp_path):
    proc = worker_cli("run", "--bundle", str(tmp_path / "absent"), "--processes", "3",
                      "--metrics-port", "0")  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "absent" in lines[0], proc.stderr


def test_the_childrens_probes_never_go_through_an_http_proxy(monkeypatch):
    """A pod may set HTTP_PROXY for image_url fetches without a NO_PROXY for the loopback
    address; the supervisor's probes of its children must still reach them."""
    import http.server
    import urllib.request

    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ok\n")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        dead_proxy = f"http://127.0.0.1:{free_port_run(1)}"  # nothing listens there
        for name in ("http_proxy", "HTTP_PROXY"):
            monkeypatch.setenv(name, dead_proxy)
        for name in ("no_proxy", "NO_PROXY"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setattr(urllib.request, "_opener", None)  # urlopen's, read from the env anew
        assert supervisor._fetch(server.server_address[1], "/healthz") == (200, b"ok\n")
    finally:
        server.shutdown()
        server.server_close()
