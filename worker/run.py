"""``python -m worker run``: the streaming classifier process.

Every :class:`WorkerSettings` field but the passwords is a kebab-case flag; a flag given on the
command line overrides its ``CARSTREAM_*`` environment variable, which overrides the default.
The passwords (``SecretStr`` fields) are read from the environment only: a flag's value shows
in ``ps`` and in the pod's spec.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import threading
import time
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import SecretStr, ValidationError

from training.cli_help import DefaultsHelpFormatter
from worker.backoff import Backoff
from worker.settings import (
    FETCH_MARGIN_BYTES,
    WorkerSettings,
    parse_bootstrap_servers,
    unknown_env_warnings,
)
from worker.stop_signals import stop_on_signals

if typing.TYPE_CHECKING:
    from http.server import ThreadingHTTPServer

    from worker.metrics import WorkerMetrics

log = logging.getLogger(__name__)

CONNECT_BACKOFF = Backoff(first_s=0.5, max_s=10.0)  # a broker that is not up yet, at start

# Largest record the worker sends: an oversized bad post is dead-lettered with its bytes up to
# this size (or the broker's limit); beyond either it is dead-lettered without its value.
DLQ_MAX_REQUEST_BYTES = 64 * 1024 * 1024
CONNECT_GRACE_S = 5.0  # past kafka_connect_timeout_s, for kafka-python to report its own timeout
# longest a send blocks for its topic's metadata or for buffer space (kafka-python's default is
# 60 s): a send to a topic the broker does not have blocks this long, so a round of many dead
# letters to it outlasted the liveness probe. The first send to a topic fetches its metadata
# well within it; check_topics does so at start.
PRODUCER_MAX_BLOCK_MS = 5_000
CLOSE_TIMEOUT_MS = 5_000  # closing the Kafka clients at the end of a drain


def secret_fields() -> list[str]:
    """The settings read from the environment only (``SecretStr``: the passwords)."""
    return [
        name
        for name, field in WorkerSettings.model_fields.items()
        if SecretStr in (field.annotation, *typing.get_args(field.annotation))
    ]


class _EnvironmentOnly(argparse.Action):
    """A password flag: refused in one line naming its variable, without echoing the value."""

    def __call__(self, parser, namespace, values, option_string=None):
        env = "CARSTREAM_" + self.dest.upper()
        parser.error(
            f"{option_string} is not a flag: set {env} in the environment (a flag's value shows "
            "in ps and in the pod's spec)"
        )


def one_line(text: object) -> str:
    """``text`` with its line breaks escaped: an error is one line, whatever a path holds."""
    return str(text).replace("\r", "\\r").replace("\n", "\\n")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    secrets = secret_fields()
    passwords = ", ".join("CARSTREAM_" + name.upper() for name in secrets)
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        add_help=add_help,
        formatter_class=DefaultsHelpFormatter,
    )
    # a group, not an epilog: `python -m worker run` builds its parser with this one as a
    # parent, which passes on groups but not the epilog
    password_group = parser.add_argument_group(
        "passwords",
        f"Passwords are read from the environment only ({passwords}): a flag's value shows in "
        "ps and in the pod's spec.",
    )
    for name, field in WorkerSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if name in secrets:
            password_group.add_argument(
                flag, action=_EnvironmentOnly, nargs="?", default=argparse.SUPPRESS,
                help=argparse.SUPPRESS,
            )  # fmt: skip
            continue
        default = field.get_default(call_default_factory=False)
        desc = field.description or name.replace("_", " ")
        if isinstance(default, SecretStr) or "password" in name:
            shown = "unset"
        elif field.default_factory is not None:
            shown = "computed" if name == "worker_id" else "empty"
        elif default is None:
            # "default: ..." in the description already says what unset means
            shown = None if "default:" in desc or desc.endswith("required") else "unset"
        else:
            shown = default
        env = "CARSTREAM_" + name.upper()
        help_text = f"{desc} [env {env}]" + ("" if shown is None else f" (default: {shown})")
        help_text = help_text.replace("%", "%%")  # argparse %-formats help: a "%" is text here
        annotation = field.annotation
        if annotation is bool:
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            is_list = typing.get_origin(annotation) in (list,) or "list[" in str(annotation)
            parser.add_argument(
                flag,
                default=argparse.SUPPRESS,
                help=help_text,
                metavar="A,B" if is_list else name.split("_")[-1].upper(),
            )
    return parser


def settings_from_args(args: argparse.Namespace) -> WorkerSettings:
    """Flags given on the command line override the environment."""
    return WorkerSettings(**vars(args))


def fetch_wait_ms(settings: WorkerSettings) -> int:
    """The consumer's fetch_max_wait_ms: as set, else the batch wait (10 ms at least)."""
    if settings.fetch_max_wait_ms is not None:
        return settings.fetch_max_wait_ms
    return max(10, settings.max_wait_ms)


def consumer_config(settings: WorkerSettings) -> dict[str, object]:
    """kafka-python KafkaConsumer options (besides the connection ones) for these settings."""
    fetch_wait = fetch_wait_ms(settings)
    opts: dict[str, object] = dict(
        group_id=settings.group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=settings.max_batch,
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms
        or max(100, settings.session_timeout_ms // 3),
        max_poll_interval_ms=settings.max_poll_interval_ms,
        fetch_max_bytes=64 * 1024 * 1024,
        fetch_max_wait_ms=fetch_wait,
        # kafka-python refuses fetch_max_wait_ms >= request_timeout_ms (30 s by default)
        request_timeout_ms=max(30_000, fetch_wait + 10_000),
        max_partition_fetch_bytes=max(1024 * 1024, settings.max_message_bytes + FETCH_MARGIN_BYTES),
        # posts of a transaction their producer aborted must not be classified and counted
        # (kafka-python's default reads them); an open transaction holds its partition back
        # until it ends, as in every read_committed consumer
        isolation_level="read_committed",
    )
    if settings.group_instance_id:
        opts["group_instance_id"] = settings.group_instance_id
    return opts


def precision_option(precision: str) -> dict[str, str]:
    """create_engine's precision, only when not the default fp32: unset, GPU backends do not
    log it as ignored (the benchmarks' model-only rows pass it the same way)."""
    return {} if precision == "fp32" else {"precision": precision}


def engine_options(settings: WorkerSettings) -> dict[str, object]:
    """create_engine's options; each backend takes the ones it knows (factory.create_engine)."""
    opts: dict[str, object] = {}
    if settings.inference_threads:
        opts["threads"] = settings.inference_threads
    opts.update(precision_option(settings.onnx_precision))
    if not settings.inference_spinning:  # likewise
        opts["spinning"] = False
    if settings.cuda_graphs:
        opts["cuda_graphs"] = True
    return opts


def open_engines(
    bundle: Any, backend: str, count: int, opts: dict[str, object], into: list
) -> list:
    """Open ``count`` engine instances into ``into`` (so the caller can close those opened when a
    later one fails). With ``auto`` the first picks the backend and the rest are opened on that
    backend by name: instances on different backends (a later TensorRT instance out of GPU
    memory falling back to the CPU) would run one loop at several speeds and precisions."""
    from engine_build.runtime import backend_of, create_engine, options_for

    for _ in range(count):
        into.append(create_engine(bundle, backend, **opts))
        if backend == "auto":  # the rest get its options only: the first took no others either,
            backend = backend_of(into[0])  # so they must not log that they ignore the others
            opts = options_for(backend, opts)
    return into


def parity_note(parity: dict | None, engine_name: str) -> tuple[str, bool] | None:
    """What the bundle's parity.json measured for a reduced-precision engine, and whether it is
    sound (finite logits): an operator who picks int8 or bf16 sees its cost in the worker's own
    log."""
    if not engine_name.endswith(("-int8", "-bf16")) or not isinstance(parity, dict):
        return None
    entry = (parity.get("artifacts") or {}).get(engine_name)
    if not isinstance(entry, dict):
        return f"{engine_name}: the bundle's parity.json has no entry for it", False
    parts = [f"top-1 agreement with PyTorch {entry.get('top1_agreement')}"]
    if entry.get("accuracy_cost") is not None:
        parts.append(f"accuracy cost {entry['accuracy_cost']}")
    parts.append(f"on {entry.get('n_images')} parity images")
    if entry.get("non_finite_logits"):
        parts.append(f"{entry['non_finite_logits']} non-finite logits")
    return f"{engine_name}: {', '.join(parts)} (parity.json)", not entry.get("non_finite_logits")


def gpu_decode_note(parity: dict | None) -> tuple[str, bool]:
    """What the bundle's parity.json measured for the GPU-decode path (``gpu_decode``: nvJPEG,
    block-average draft, torch resize), and whether it is sound: parity.json certifies every
    artifact on the CPU decode path's pixels, so a GPU worker logs how far its own decode moves
    the answers. Not sound (a WARNING) when the bundle never measured it (built before
    engine_build did, or with no baseline JPEG among its parity images), its gate failed, or the
    gate did not guard it: the measured agreement (near-tie flips not counted, where recorded)
    is below engine_build's default ``--gpu-decode-agreement``, or the gate was not applied (a
    bundle built for CPU pools) or was 0, whatever the agreement."""
    from engine_build.decode_parity import (
        CPU_MEASURED_NOTE,
        GPU_DECODE_AGREEMENT,
        gated_agreement,
    )

    decode = parity.get("decode") if isinstance(parity, dict) else None
    entry = decode.get("gpu_decode") if isinstance(decode, dict) else None
    if not isinstance(entry, dict):
        return (
            "gpu_decode: the bundle's parity.json has no entry for the GPU-decode path (built "
            "before engine_build measured it): how far it moves the answers from the CPU decode "
            "path the parity gate certifies is unmeasured; rebuild the bundle to measure it",
            False,
        )
    if entry.get("top1_agreement") is None:
        why = entry.get("skipped") or entry.get("note") or "no image measured"
        return (
            f"gpu_decode: the bundle's parity.json did not measure the GPU-decode path: {why}",
            False,
        )
    agreement = gated_agreement(entry)
    parts = [f"top-1 agreement with the CPU decode path {entry['top1_agreement']}"]
    if entry.get("near_tie_flips"):
        parts.append(
            f"{agreement} not counting {entry['near_tie_flips']} near-tie flips of the top-1"
        )
    if entry.get("accuracy_cost") is not None:
        parts.append(f"accuracy cost {entry['accuracy_cost']}")
    if entry.get("max_abs_pixel_diff") is not None:
        parts.append(f"max pixel difference {entry['max_abs_pixel_diff']} grey levels")
    parts.append(f"on {entry.get('n_images')} baseline JPEG parity images")
    if entry.get("non_finite_logits"):
        parts.append(f"{entry['non_finite_logits']} non-finite logits")
    device = entry.get("device")
    parts.append(f"measured on {device}")
    gate = entry.get("gate") if isinstance(entry.get("gate"), dict) else {}
    sound = gate.get("passed", True) is True and not entry.get("non_finite_logits")
    text = f"gpu_decode: {', '.join(parts)} (parity.json)"
    if device == "cpu":
        text += f"; {CPU_MEASURED_NOTE}: an estimate of this worker's agreement"
        if entry.get("fallback"):
            text += f" ({entry['fallback']})"
    threshold = gate.get("min_top1_agreement")
    unguarded = gate.get("applied") is False or threshold == 0
    if not isinstance(agreement, int | float) or agreement < GPU_DECODE_AGREEMENT or unguarded:
        sound = False
        if gate.get("applied") is False:
            why = "its gate was not applied at build (a bundle built for CPU worker pools)"
        elif threshold == 0:
            why = "its gate was 0 at build (--gpu-decode-agreement 0: recorded only)"
        elif gate.get("passed") is False:
            why = "its gate failed at build"
        elif threshold is None:
            why = "no gate is recorded"
        else:
            why = f"its gate at build was {threshold}"
        low = not isinstance(agreement, int | float) or agreement < GPU_DECODE_AGREEMENT
        text += (
            f"; not guarded: agreement {agreement} {'is below' if low else 'meets'} the default "
            f"--gpu-decode-agreement {GPU_DECODE_AGREEMENT}, and {why}"
        )
    return text, sound


CPU_ENGINES = ("onnxruntime", "torch-cpu")


def oversubscription_note(
    settings: WorkerSettings, engine_name: str, cores: int | None
) -> str | None:
    """Why the CPU engines' threads outnumber the cores, or None: with ``inference_threads``
    unset each CPU engine instance starts one intra-op thread per core, so N instances run N
    threads a core and wait on one another at every parallel section."""
    if settings.inference_threads or settings.engine_instances < 2 or not cores:
        return None
    if not engine_name.startswith(CPU_ENGINES):
        return None
    return (
        f"engine_instances {settings.engine_instances} with inference_threads unset: each "
        f"{engine_name} instance runs one thread per core ({settings.engine_instances} x "
        f"{cores} threads on {cores} cores); set inference_threads (e.g. "
        f"{max(1, cores // settings.engine_instances)})"
    )


def _warm_up(engine, max_batch: int, bundle: Any) -> None:
    """First calls allocate buffers and pick kernels; do it before taking partitions.

    An engine with its own ``warm_up`` (torch-cuda: one CUDA graph per batch bucket) does it all,
    and then answers one image more (from its batch-1 graph). Every answer must be ``num_classes``
    logits wide (ArtifactMismatchError otherwise): the loop looks up ``labels[argmax]``.
    """
    from engine_build.runtime.base import check_logits

    spec = engine.input_spec()
    if hasattr(engine, "warm_up"):
        engine.warm_up(max_batch)
        sizes = [1]
    else:
        sizes = sorted({1, min(max_batch, engine.max_batch)})
    for n in sizes:
        check_logits(
            engine.infer(np.zeros((n, *spec.shape), dtype=np.float32)), n, bundle, engine.name
        )


def warm_up_all(engines: list, max_batch: int, bundle: Any) -> str | None:
    """Warm every engine up; None, or the one-line error when one fails: a bundle the engine
    cannot serve (ArtifactMismatchError), or anything the backend raised (ONNX Runtime refusing
    the model, CUDA out of memory capturing torch-cuda's graphs), named with the bundle and the
    engine instead of a traceback. The traceback goes to the log at DEBUG."""
    from engine_build.bundle import BundleError
    from engine_build.runtime.base import first_line

    for engine in engines:
        try:
            _warm_up(engine, max_batch, bundle)
        except BundleError as exc:
            return str(exc)
        except Exception as exc:
            log.debug("warm-up of %s failed", engine.name, exc_info=True)
            return (
                f"bundle {bundle.path}: the {engine.name} engine failed its warm-up "
                f"(max batch {max_batch}): {type(exc).__name__}: {first_line(exc)[:300]}"
            )
    return None


def _close_all(engines: list) -> None:
    for engine in engines:
        engine.close()


def check_redis_options(settings: WorkerSettings) -> None:
    """ValueError naming the redacted URL if redis-py refuses the Redis options (a bad
    ``?protocol=``, an unknown query option); builds a client without connecting."""
    from worker.connections import redis_client

    redis_client(settings).close()


def cpu_backend_label(backend: str, dev: Path = Path("/dev")) -> str | None:
    """A label for the CPU backend a setting names or, for ``auto``, will pick here (for the
    warning); None for a GPU backend.

    The supervisor opens no engine, so for ``auto`` it looks for an NVIDIA device node
    instead: without one, auto falls through TensorRT and torch-cuda to ONNX Runtime.
    """
    if backend in ("onnxruntime", "torch-cpu"):
        return backend
    if backend == "auto" and not any(dev.glob("nvidia[0-9]*")):
        return "onnxruntime (auto: no NVIDIA device)"
    return None


def main(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "settings"
        print(f"python -m worker run: error: {loc}: {one_line(first['msg'])}", file=sys.stderr)
        return 2
    try:
        settings.check_files()  # a missing CA file otherwise reads as a broker that is not there
        check_redis_options(settings)  # else a Redis error retried on every batch, for ever
    except ValueError as exc:
        print(f"python -m worker run: error: {one_line(exc)}", file=sys.stderr)
        return 2
    from worker.logging_setup import configure_logging

    configure_logging(settings.log_level, settings.log_json, settings.worker_id)
    for line in unknown_env_warnings():
        log.warning("%s", line)
    for line in settings.ignored_settings():
        log.warning("%s", line)

    # first thing: a SIGTERM while the engine loads must still end in a clean exit 0
    stop = threading.Event()
    stop_on_signals(stop)  # only a flag: the loop drains, commits and returns

    if not settings.bundle:
        print(
            "python -m worker run: error: --bundle (or CARSTREAM_BUNDLE) is required",
            file=sys.stderr,
        )
        return 2

    if settings.processes > 1:
        return _supervise(settings, args, stop)

    from worker.metrics import WorkerMetrics, bind

    # bound before the engine loads: a taken port or unknown host fails in a second, not after
    metrics = WorkerMetrics()
    server = None
    if settings.metrics_port:
        stall_s = max(60.0, settings.max_poll_interval_ms / 1000.0)
        try:
            server = bind(metrics, settings.metrics_host, settings.metrics_port, stall_s)
        except OSError as exc:
            return _cannot_listen(settings, exc)
    try:
        return _serve(settings, stop, metrics, server)
    finally:
        if server is not None:
            server.server_close()


def _cannot_listen(settings: WorkerSettings, exc: OSError) -> int:
    from worker.metrics import host_port

    address = one_line(host_port(settings.metrics_host, settings.metrics_port))
    reason = exc.strerror or str(exc)
    print(
        f"python -m worker run: error: --metrics-host/--metrics-port {address}: "
        f"cannot listen there: {reason}",
        file=sys.stderr,
    )
    return 2


def _supervise(settings: WorkerSettings, args: argparse.Namespace, stop: threading.Event) -> int:
    """``processes > 1``: this process only supervises (worker/supervisor.py)."""
    from engine_build.bundle import BundleError, load_bundle
    from worker import supervisor

    server = None
    if settings.metrics_port:  # first, as in one process: a taken port fails in a second
        try:
            server = supervisor.bind(settings)
        except OSError as exc:
            return _cannot_listen(settings, exc)
    try:
        try:  # checked once here: a bad bundle is one line, not one per child
            load_bundle(settings.bundle)
        except BundleError as exc:
            print(f"python -m worker run: error: {one_line(exc)}", file=sys.stderr)
            return 2
        cpu_backend = cpu_backend_label(settings.backend)
        if cpu_backend is not None:
            log.warning(
                "processes %d with the %s backend: the processes share this machine's "
                "cores; on a CPU, engine_instances in one process is the better fit",
                settings.processes,
                cpu_backend,
            )
        return supervisor.supervise(settings, vars(args), os.environ, stop, server)
    finally:
        if server is not None:
            server.server_close()


def _serve(
    settings: WorkerSettings,
    stop: threading.Event,
    metrics: WorkerMetrics,
    server: ThreadingHTTPServer | None,
) -> int:
    """Load the engine, connect, run the loop until `stop`; `server` is bound, not started."""
    # imported here so `--help` and argument errors never load the model runtime
    from kafka.errors import KafkaError

    from engine_build.bundle import BundleError, load_bundle
    from engine_build.runtime import EngineUnavailableError, on_device
    from worker.connections import redis_client
    from worker.errors import FatalWorkerError
    from worker.logging_setup import ignore_kafka_close_race
    from worker.metrics import start
    from worker.pipeline import StreamWorker
    from worker.thread_names import name_python_threads
    from worker.trends import TrendWriter

    try:
        bundle = load_bundle(settings.bundle)
    except BundleError as exc:
        print(f"python -m worker run: error: {one_line(exc)}", file=sys.stderr)
        return 2
    engines: list = []
    try:
        open_engines(
            bundle, settings.backend, settings.engine_instances, engine_options(settings), engines
        )
    except (EngineUnavailableError, ValueError) as exc:
        for loaded in engines:
            loaded.close()
        print(f"python -m worker run: error: backend {settings.backend}: {exc}", file=sys.stderr)
        return 2
    engine = engines[0]
    log.info("settings: %s", settings.redacted())
    log.info(
        "bundle %s %s on %s x %d",
        bundle.manifest.model_name,
        bundle.manifest.model_version,
        engine.name,
        len(engines),
    )
    crowded = oversubscription_note(settings, engine.name, len(os.sched_getaffinity(0)))
    if crowded is not None:
        log.warning("%s", crowded)
    note = parity_note(bundle.parity, engine.name)
    if note is not None:
        (log.info if note[1] else log.warning)("%s", note[0])
    if settings.gpu_decode and not on_device(engine):
        log.warning("gpu_decode ignored: the %s engine does not run on a GPU", engine.name)
    elif settings.gpu_decode:
        text, sound = gpu_decode_note(bundle.parity)
        (log.info if sound else log.warning)("%s", text)
    metrics.engine_info.labels(
        engine.name, bundle.manifest.model_name, bundle.manifest.model_version
    ).set(1)
    gpu = visible_nvidia_gpu()
    if settings.backend == "auto" and gpu and not on_device(engine):
        log.warning(
            "backend auto chose %s on the CPU although this machine has an NVIDIA GPU (%s): "
            "see the 'backend ... unavailable' lines above for why; set the backend "
            "(tensorrt, torch-cuda) to refuse to start instead",
            engine.name,
            gpu,
        )

    if server is not None:
        metrics.beat()  # liveness counts from here, as before the engine loaded
        start(server)
    # one cleanup path for every way out from here on: connect timeout, bad client settings,
    # a stop before connecting, the loop's end, and any error nobody expected
    try:
        failed = warm_up_all(engines, settings.max_batch, bundle)
        if failed is not None:  # before consuming anything: exit 2, as for a bad bundle
            print(f"python -m worker run: error: {failed}", file=sys.stderr)
            return 2
        log.info(
            "engine warm (%s x %d, max batch %d; the engine runs up to %d at a time)",
            engine.name,
            len(engines),
            settings.max_batch,
            engine.max_batch,
        )
        new_producer = producer_factory(settings, stop)
        connected = _connect(settings, stop, metrics.beat, new_producer)
        if isinstance(connected, int):
            return connected
        consumer, producer = connected
        started = time.monotonic()
        worker = None
        try:
            missing = check_topics(
                producer, [settings.output_topic, settings.dlq_topic], stop, metrics.beat
            )
            if missing is not None:
                print(
                    f"python -m worker run: error: topic {missing} does not exist on Kafka at "
                    f"{settings.bootstrap_servers} (its metadata answers within "
                    f"{PRODUCER_MAX_BLOCK_MS / 1000:g} s do not list it, and it creates no topic "
                    "on request): create it",
                    file=sys.stderr,
                )
                return 2
            # before the loop reads a record, and before this worker is ready
            refused = wait_for_redis(settings, stop, metrics.beat)
            if refused is not None:
                return refused
            writer = TrendWriter(
                redis_client(settings),
                settings.group_id,
                settings.trend_minute_ttl_s,
                settings.trend_hour_ttl_s,
                settings.dedup_ttl_s,
            )
            worker = StreamWorker(
                settings,
                engines,
                bundle.manifest,
                consumer,
                producer,
                writer,
                metrics,
                stop,
                new_producer=new_producer,
            )
            name_python_threads()  # Kafka I/O and metrics threads, for top -H and CPU accounting
            worker.run()
        except FatalWorkerError as exc:
            # the batch in hand stays uncommitted: the replica that gets it next (this one,
            # restarted by its orchestrator) reads it again
            log.error("stopping: %s; the batch in hand is left uncommitted", exc)
            return 1
        except Exception:
            log.exception("stopping on an unexpected error; the batch in hand is left uncommitted")
            return 1
        finally:
            # the clients are closed on every way out, a failure setting up the loop included
            metrics.set_ready(False)
            # kafka-python closes the consumer's sockets under its IO thread's feet, which may
            # then log an ERROR with a traceback for a socket it finds closed
            # (worker/logging_setup.py)
            ignore_kafka_close_race()
            # short: every delivered batch is flushed and committed already, and in a broker
            # outage kafka-python's defaults (30 s each) would take the drain past a pod's grace
            # period (pipeline.DRAIN_DEADLINE_S + these two stay inside Kubernetes' 90 s)
            try:
                consumer.close(autocommit=False, timeout_ms=CLOSE_TIMEOUT_MS)
            except KafkaError as exc:  # a broker outage at shutdown: nothing is lost by it
                log.warning("closing the Kafka consumer: %s", exc)
            # the loop's own: a new one when the first failed for good (it closed that one)
            close_producer(producer if worker is None else worker.producer)
            log.info("stopped after %.1f s", time.monotonic() - started)
        return 0
    finally:
        _close_all(engines)
        if server is not None:
            server.shutdown()


def visible_nvidia_gpu() -> str | None:
    """The first NVIDIA device node this process can see, if any: no CUDA library is needed to
    tell that a GPU pod ended up on a CPU engine."""
    for node in ("/dev/nvidia0", "/dev/nvidiactl"):
        if os.path.exists(node):
            return node
    return None


def connect_config(settings: WorkerSettings) -> tuple[dict[str, object], float]:
    """Every Kafka client's connection options, its bootstrap bounded by
    ``kafka_connect_timeout_s``, and the deadline its constructor gets (``within_deadline``)."""
    from worker.connections import kafka_common_config

    common = kafka_common_config(settings)
    common["bootstrap_timeout_ms"] = int(settings.kafka_connect_timeout_s * 1000)
    return common, settings.kafka_connect_timeout_s + CONNECT_GRACE_S


def close_producer(producer: Any, timeout_s: float = CLOSE_TIMEOUT_MS / 1000) -> None:
    """Close ``producer``, dropping what the broker did not take within ``timeout_s``.

    kafka-python 3.0's ``close`` flushes first and raises when that runs out (a broker outage
    at shutdown), leaving the producer open: the worker then exited 1 with a traceback, and a
    second one from the producer's ``__del__``. What it still held belongs to a batch left
    uncommitted, which is read again after the restart.
    """
    from kafka.errors import KafkaError

    try:
        producer.close(timeout=timeout_s)
    except KafkaError as exc:
        log.warning(
            "closing the Kafka producer: %s; the records it still held are dropped (their batch "
            "is uncommitted, and read again after the restart)",
            exc,
        )
        producer.flush = lambda timeout=None: None  # so that close goes on to force-close
        producer.close(timeout=0)


def producer_factory(settings: WorkerSettings, stop: threading.Event) -> Callable[[], Any]:
    """A function making the worker's KafkaProducer, connected within the connect deadline:
    once at start, and again when kafka-python's idempotent producer fails for good (a broker
    refusing one oversized dead letter leaves it failing every later record)."""
    from kafka import KafkaProducer

    from worker.connections import within_deadline

    common, deadline_s = connect_config(settings)
    make = functools.partial(
        KafkaProducer,
        **common,
        acks="all",
        enable_idempotence=True,
        linger_ms=5,
        max_block_ms=PRODUCER_MAX_BLOCK_MS,
        # dead letters carry the original bytes, which may exceed max_message_bytes
        max_request_size=DLQ_MAX_REQUEST_BYTES,
    )
    return lambda: within_deadline(make, deadline_s, stop)


def check_topics(
    producer: Any, topics: list[str], stop: threading.Event, beat: Callable[[], None]
) -> str | None:
    """The first of ``topics`` the broker answers without (``topic_unknown``), else None once
    each has partitions (or on ``stop``).

    Asks for each topic's partitions as the producer's first send to it would: a broker that
    creates topics on request creates it now. One that does not answers without it, and every
    send to it would block ``max_block_ms`` and fail, batch after batch. A wait that ran out
    with no answer at all (the broker went away after connecting) is retried with backoff,
    each retry a beat, as in ``_connect``. Any other refusal (no describe ACL on the topic) is
    left to the sends, which stop the worker if it lasts.
    """
    from kafka.errors import KafkaError, KafkaTimeoutError

    from worker.connections import metadata_answers, topic_unknown

    attempt = 0
    for topic in topics:
        while not stop.is_set():
            answers = metadata_answers(producer)
            try:
                producer.partitions_for(topic)
                break
            except KafkaTimeoutError as exc:
                if topic_unknown(producer, topic, answers):
                    return topic
                attempt += 1
                log.warning("no metadata for topic %s (%s); retry %d", topic, exc, attempt)
                beat()
                CONNECT_BACKOFF.wait(attempt, stop)
            except KafkaError as exc:
                log.warning("checking topic %s: %s", topic, exc)
                break
    return None


def wait_for_redis(
    settings: WorkerSettings, stop: threading.Event, beat: Callable[[], None]
) -> int | None:
    """None once Redis answers a PING, retrying with backoff while it does not (each retry a
    beat, as ``_connect`` does for Kafka: an outage is not a wedged process); else the exit code:
    2, after one line naming the URL and the reason, when Redis refuses this client for good
    (``connections.redis_refusal``: a wrong password, NOAUTH, an ACL user without permission, a
    certificate the CA does not verify), 0 on ``stop``.

    Before, Redis was first contacted by the loop, which retried every error: a worker with a
    wrong password was ready, and retried for ever.
    """
    import redis

    from worker.connections import error_line, redacted, redis_client, redis_refusal

    url = redacted(settings.redis_url)
    client = redis_client(settings)
    try:
        attempt = 0
        while not stop.is_set():
            try:
                client.ping()
                return None
            except redis.RedisError as exc:
                reason = redis_refusal(exc)
                if reason is not None:
                    print(
                        f"python -m worker run: error: redis_url {url}: {one_line(reason)}",
                        file=sys.stderr,
                    )
                    return 2
                attempt += 1
                log.warning(
                    "no answer from Redis at %s (%s); retry %d", url, error_line(exc), attempt
                )
                beat()
                CONNECT_BACKOFF.wait(attempt, stop)
        log.info("stop requested while connecting to Redis; exiting")
        return 0
    finally:
        client.close()


def _connect(
    settings: WorkerSettings,
    stop: threading.Event,
    beat: Callable[[], None],
    new_producer: Callable[[], Any],
) -> tuple[Any, Any] | int:
    """The consumer and a producer from ``new_producer`` (``producer_factory``), retrying while
    no broker answers; else the exit code:
    1 when a client hangs connecting, 2 for client settings Kafka refuses, 0 on `stop`.

    A broker that refuses this client for good (``connections.kafka_refusal``: its certificate
    does not verify, or it refuses the SASL mechanism or login) is exit 2 with one line naming
    the cause, once ``KAFKA_REFUSAL_LIMIT`` bootstrap attempts in a row failed so: kafka-python
    retries it as an absent broker, which the worker read as "no Kafka broker", for ever.

    ``beat`` marks each retry as liveness: a broker outage is not a wedged process, and a
    restart would not end it (it would only reload the engine, with a back-off growing each time).
    """
    from kafka import KafkaConsumer
    from kafka.errors import KafkaConfigurationError, KafkaError, RetriableError

    from worker.connections import (
        KAFKA_REFUSAL_LIMIT,
        BootstrapFailures,
        ConnectInterruptedError,
        ConnectTimeoutError,
        KafkaRefusedError,
        kafka_refusal,
        within_deadline,
    )

    common, deadline_s = connect_config(settings)
    consumer_opts = consumer_config(settings)
    attempt = 0
    refused_line = (
        f"python -m worker run: error: Kafka at {settings.bootstrap_servers} refuses this client "
        f"(security_protocol {settings.security_protocol}"
        + (f", sasl_mechanism {settings.sasl_mechanism}" if settings.sasl_mechanism else "")
        + "): {}"
    )
    # one count over every try: a try of a few seconds reaches only some of several brokers
    # (kafka-python picks one at random and waits out its back-off), so counted per try, a
    # cluster whose every broker refuses this client was retried as an outage for ever
    failures = BootstrapFailures(
        KAFKA_REFUSAL_LIMIT, len(parse_bootstrap_servers(settings.bootstrap_servers))
    )
    while not stop.is_set():
        consumer = None
        try:
            with failures.attached():
                consumer = within_deadline(
                    functools.partial(KafkaConsumer, **common, **consumer_opts),
                    deadline_s,
                    stop,
                    failures.refused,
                )
                return consumer, new_producer()
        except KafkaRefusedError as exc:
            print(refused_line.format(one_line(exc)), file=sys.stderr)
            if consumer is not None:
                consumer.close(autocommit=False)
            return 2
        except ConnectInterruptedError:
            log.info("stop requested while connecting to Kafka; exiting")
            if consumer is not None:
                consumer.close(autocommit=False)
            return 0
        except ConnectTimeoutError as exc:
            # the hung client cannot be closed or retried in this process: exit, and let the
            # orchestrator restart the replica with a clean one
            print(
                f"python -m worker run: error: Kafka at {settings.bootstrap_servers} did not "
                f"finish connecting ({exc}; security_protocol {settings.security_protocol}: "
                "does the listener speak it?)",
                file=sys.stderr,
            )
            if consumer is not None:
                consumer.close(autocommit=False)
            return 1
        except RetriableError as exc:
            if consumer is not None:  # the producer failed: the next attempt builds both again
                consumer.close(autocommit=False)
            attempt += 1
            # kafka-python's own error says only "Unable to bootstrap": name what it logged
            cause = failures.cause() or f"{type(exc).__name__}: {exc}"
            log.warning(
                "no Kafka broker answers at %s (%s); retry %d",
                settings.bootstrap_servers,
                cause,
                attempt,
            )
            beat()
            CONNECT_BACKOFF.wait(attempt, stop)
        except (KafkaConfigurationError, ValueError) as exc:
            # WorkerSettings refuses what we know of before the model loads; this is the rest
            print(f"python -m worker run: error: Kafka client settings: {exc}", file=sys.stderr)
            if consumer is not None:
                consumer.close(autocommit=False)
            return 2
        except KafkaError as exc:
            # a SASL login refused: kafka-python raises it from the constructor at its next try
            reason = kafka_refusal(exc)
            if consumer is not None:
                consumer.close(autocommit=False)
            if reason is None:
                raise
            print(refused_line.format(one_line(reason)), file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
