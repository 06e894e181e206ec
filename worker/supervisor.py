"""``processes > 1``: one replica run as several worker processes that share its GPU.

Why: a worker process's CPU side (Kafka I/O, JSON, base64, JPEG checks, publishing, counting)
runs under one GIL, which caps one process at a few hundred posts/s while a data-centre GPU's
engine runs thousands of images/s (docs/performance.md). Kubernetes gives a GPU to one pod;
several processes in that pod, each a member of the consumer group with its own engine, feed
it as several replicas would, without GPU time-slicing or MPS set up on the node.

The supervisor is thin: it starts the children with the replica's settings (each with its own
worker id, static-membership id and a loopback metrics port), forwards SIGTERM so each drains
and commits, and serves one /metrics (the children's, labelled ``process``), /healthz and
/readyz for the pod. A child that exits on its own ends the replica with the child's code, as a
single-process worker's exit would: the orchestrator restarts the pod (a crash loop is visible
there, not hidden by restarts in here).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from http.server import ThreadingHTTPServer

from worker.metrics import EndpointHandler, EndpointServer, start
from worker.settings import WorkerSettings
from worker.stop_signals import block_stop_signals

log = logging.getLogger(__name__)

# what each child runs; benchmarks/sim_engine.py points it at itself (its stand-in engine)
CHILD_COMMAND = [sys.executable, "-m", "worker", "run"]
CHILD_HOST = "127.0.0.1"  # children's endpoints are the supervisor's, not the network's
PROBE_TIMEOUT_S = 2.0
POLL_S = 0.5  # how soon a child's own exit is noticed (a stop is noticed at once)
_PR_SET_PDEATHSIG = 1


def child_name(index: int) -> str:
    return f"p{index}"


def child_metrics_port(settings: WorkerSettings, index: int) -> int:
    """The loopback port of child ``index``'s endpoint: the replica's port + 1 + index (0: off)."""
    return settings.metrics_port + 1 + index if settings.metrics_port else 0


def child_env(
    base_env: Mapping[str, str],
    given: Mapping[str, object],
    settings: WorkerSettings,
    index: int,
) -> dict[str, str]:
    """The environment of child ``index``: the replica's, with every flag given on the command
    line as its CARSTREAM_* variable (the child gets no flags, so none can override what is
    set here per child), and the child's own id, membership id and metrics port."""
    own = {
        "PROCESSES": "1",
        "WORKER_ID": f"{settings.worker_id}-{child_name(index)}",
        "METRICS_PORT": str(child_metrics_port(settings, index)),
        "METRICS_HOST": CHILD_HOST,
    }
    if settings.group_instance_id:
        own["GROUP_INSTANCE_ID"] = f"{settings.group_instance_id}-{child_name(index)}"
    values: dict[str, str] = {}
    for name, value in given.items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        values[name.upper()] = str(value)
    values.update(own)
    set_here = {"CARSTREAM_" + name for name in values}
    # settings read the environment case-insensitively: drop every spelling of what is set here
    env = {k: v for k, v in base_env.items() if k.upper() not in set_here}
    env.update({"CARSTREAM_" + name: value for name, value in values.items()})
    return env


# --- one /metrics for the pod ---------------------------------------------------------------


def _with_label(sample: str, label: str) -> str:
    """``name{a="b"} 1`` -> ``name{process="p0",a="b"} 1``; ``name 1`` -> ``name{...} 1``."""
    name_end = min((i for i in (sample.find("{"), sample.find(" ")) if i >= 0), default=-1)
    if name_end < 0:
        return sample
    head, rest = sample[:name_end], sample[name_end:]
    if rest.startswith("{}"):
        rest = rest[2:]
    elif rest.startswith("{"):
        return f'{head}{{process="{label}",{rest[1:]}'
    return f'{head}{{process="{label}"}}{rest}'


def merge_expositions(parts: list[tuple[str, str]]) -> str:
    """Prometheus text expositions of the children as one: each family's HELP and TYPE once,
    then every child's samples with a ``process`` label (a family repeated would be invalid)."""
    families: dict[str | None, dict[str, list[str]]] = {}
    for label, text in parts:
        family: str | None = None
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                family = line.split(" ", 3)[2]
                entry = families.setdefault(family, {"meta": [], "samples": []})
                kind = line[:6]
                if not any(m.startswith(kind) for m in entry["meta"]):
                    entry["meta"].append(line)
            elif line.startswith("#"):
                continue
            else:
                entry = families.setdefault(family, {"meta": [], "samples": []})
                entry["samples"].append(_with_label(line, label))
    out: list[str] = []
    for entry in families.values():
        out += entry["meta"] + entry["samples"]
    return "\n".join(out) + "\n" if out else ""


# never through HTTP(S)_PROXY: a pod that sets one for image_url fetches, without a NO_PROXY
# for the loopback address, would send the children's probes to the proxy and never be ready
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _fetch(port: int, path: str) -> tuple[int, bytes]:
    """(status, body) of a child's endpoint; status 0 when it does not answer."""
    try:
        with _LOCAL.open(f"http://{CHILD_HOST}:{port}{path}", timeout=PROBE_TIMEOUT_S) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (OSError, ValueError) as exc:
        return 0, str(exc).encode()


class _Handler(EndpointHandler):
    ports: list[int]

    def do_GET(self) -> None:  # noqa: N802 (http.server calls it by this name)
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            parts = []
            for i, port in enumerate(self.ports):
                status, body = _fetch(port, "/metrics")
                if status == 200:
                    parts.append((child_name(i), body.decode("utf-8", "replace")))
            self._send(200, merge_expositions(parts).encode(), "text/plain; version=0.0.4")
        elif path in ("/healthz", "/readyz"):
            # the pod is live (ready) when every process is: one stalled process holds
            # partitions nobody else reads
            lines, ok = [], True
            for i, port in enumerate(self.ports):
                status, body = _fetch(port, path)
                ok = ok and status == 200
                text = body.decode("utf-8", "replace").strip() if status else "no answer"
                lines.append(f"{child_name(i)}: {text}")
            self._send(200 if ok else 503, ("\n".join(lines) + "\n").encode())
        else:
            self._send(404, b"not found\n")


def bind(settings: WorkerSettings) -> ThreadingHTTPServer:
    """The pod's endpoint on metrics_host:metrics_port, not answering yet; OSError if it cannot."""
    ports = [child_metrics_port(settings, i) for i in range(settings.processes)]
    handler = type("Handler", (_Handler,), {"ports": ports})
    return EndpointServer((settings.metrics_host, settings.metrics_port), handler)


# --- the children ---------------------------------------------------------------------------


def _child_setup(parent: int) -> Callable[[], None]:
    """For the child between fork and exec.

    - SIGTERM and SIGINT blocked until the worker has its handlers (``stop_on_signals``
      unblocks them): a stop forwarded while the child imports and reads its settings is held
      and then drained from like any other, not the default action that kills it (-15, which
      read as a failed drain and made the replica exit 143).
    - Its own process group: a terminal's Ctrl-C reaches the supervisor only, which forwards
      SIGTERM once; reaching the children as well, it would be their second stop signal, which
      ends a worker at once (``worker/stop_signals.py``).
    - Linux: SIGTERM when the supervisor dies, even by SIGKILL, so no orphan keeps consuming
      outside a container that would have reaped it.
    """

    def arm() -> None:
        block_stop_signals()
        os.setpgid(0, 0)
        if sys.platform != "linux":
            return
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            return
        if os.getppid() != parent:  # it died before the prctl: nobody would send the signal
            os._exit(1)

    return arm


def exit_code(returncode: int) -> int:
    """A child's returncode as a process exit status: killed by signal N (-N) -> 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def supervise(
    settings: WorkerSettings,
    given: Mapping[str, object],
    base_env: Mapping[str, str],
    stop: threading.Event,
    server: ThreadingHTTPServer | None = None,
    spawn: Callable[..., subprocess.Popen] = subprocess.Popen,
) -> int:
    """Run ``settings.processes`` children until ``stop`` or until one exits; the exit code.

    0 when stopped and every child drained cleanly; else the first failing child's code (1 for
    a child that ended with 0 unasked, 128 + N for one killed by signal N, as a shell says)."""
    children: list[subprocess.Popen] = []
    failed: tuple[int, int] | None = None
    serving = False
    try:
        for i in range(settings.processes):
            children.append(
                spawn(
                    CHILD_COMMAND,
                    env=child_env(base_env, given, settings, i),
                    preexec_fn=_child_setup(os.getpid()),
                )
            )
        log.info(
            "%d worker processes: %s",
            len(children),
            ", ".join(f"{child_name(i)} pid {c.pid}" for i, c in enumerate(children)),
        )
        if server is not None:
            start(server)  # the pod's endpoint, over all the processes'
            serving = True
        while failed is None and not stop.wait(POLL_S):
            for i, child in enumerate(children):
                code = child.poll()
                if code is not None and not stop.is_set():  # else a Ctrl-C reached it first
                    failed = (i, code)
                    log.error(
                        "worker process %s (pid %d) exited with %d; stopping the others",
                        child_name(i),
                        child.pid,
                        code,
                    )
                    break
        if failed is None:
            log.info("stopping %d worker processes (each drains and commits)", len(children))
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        codes = [child.wait() for child in children]
        if serving:
            server.shutdown()  # (blocks for ever unless serve_forever ran)
    if failed is not None:
        return exit_code(failed[1]) or 1
    bad = [(i, code) for i, code in enumerate(codes) if code != 0]
    for i, code in bad:
        log.error("worker process %s exited with %d while draining", child_name(i), code)
    return exit_code(bad[0][1]) if bad else 0
