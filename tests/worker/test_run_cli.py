"""`python -m worker run` start-up errors, and the health/metrics endpoints."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine_build.runtime.base import InputSpec
from tests.support import http_get, worker_cli
from worker.metrics import WorkerMetrics, bind, serve, start
from worker.run import (
    _warm_up,
    cpu_backend_label,
    engine_options,
    oversubscription_note,
    parity_note,
)
from worker.settings import WorkerSettings

REPO = Path(__file__).resolve().parents[2]


def run_worker(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m worker run``, metrics off unless the test says otherwise: the port is bound
    before the bundle loads, and a parallel test (or a demo on the same machine) may hold the
    default 9400 (it failed a fresh-clone CI once, and a full run beside a demo twice)."""
    env.setdefault("CARSTREAM_METRICS_PORT", "0")
    return worker_cli("run", *args, **env)


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        ((), {}, "--bundle"),
        (("--bundle", "/no/such/bundle"), {}, "/no/such/bundle"),
        (("--bundle", "/x", "--max-batch", "abc"), {}, "max_batch"),
        (("--bundle", "/x", "--backend", "gpu-magic"), {}, "backend"),
        (("--bundle", "/x"), {"CARSTREAM_MIN_CONFIDENCE": "2"}, "min_confidence"),
        (("--bundle", "/x", "--security-protocol", "SASL_SSL"), {}, "sasl_mechanism"),
        (("--no-such-flag",), {}, "--no-such-flag"),
        (("--bundle", "/x", "--redis-url", "localhost:6379"), {}, "redis_url"),
        # refused before the engine loads, not by kafka-python / redis-py after it
        (("--bundle", "/x", "--bootstrap-servers", ""), {}, "bootstrap_servers"),
        (("--bundle", "/x", "--bootstrap-servers", "127.0.0.1:abc"), {}, "'abc'"),
        (("--bundle", "/x"), {"CARSTREAM_BOOTSTRAP_SERVERS": "b:70000"}, "bootstrap_servers"),
        (("--bundle", "/x", "--redis-url", "redis://127.0.0.1:99999/0"), {}, "'99999'"),
        # redis-py refuses these only at the first command, which the loop retried for ever
        (
            ("--bundle", "/x", "--redis-url", "redis://u:s3cret@127.0.0.1:6379/0?protocol=9"),
            {},
            "redis_url redis://127.0.0.1:6379/0: protocol must be either 2 or 3",
        ),
        (
            ("--bundle", "/x"),
            {"CARSTREAM_REDIS_URL": "unix:///run/r.sock?password=s3cret&nope=1"},
            "redis_url unix:///run/r.sock: unknown option 'nope' in the query",
        ),
        (
            ("--bundle", "/x", "--metrics-host", "nohost.invalid"),
            {"CARSTREAM_METRICS_PORT": "9400"},  # the default, named in the message
            "nohost.invalid:9400",
        ),
        # a DLQ or results topic that is the input topic loops records back into the worker
        (("--bundle", "/x", "--dlq-topic", "car-posts"), {}, "use three topics"),
        (("--bundle", "/x"), {"CARSTREAM_OUTPUT_TOPIC": "car-posts"}, "use three topics"),
        (("--bundle", "/x", "--output-topic", "car-posts.dlq"), {}, "use three topics"),
        (("--bundle", "/x", "--input-topic", ""), {}, "input_topic"),
        (("--bundle", "/x", "--dlq-topic", "bad topic"), {}, "not a Kafka topic name"),
        (("--bundle", "/x", "--output-topic", ".."), {}, "not a Kafka topic name"),
        (("--bundle", "/x", "--input-topic", "t" * 250), {}, "not a Kafka topic name"),
        # refused by kafka-python or the broker only after the model has loaded, if at all
        (
            ("--bundle", "/x", "--heartbeat-interval-ms", "10000"),
            {},
            "heartbeat_interval_ms (10000) must be below session_timeout_ms (10000)",
        ),
        (
            ("--bundle", "/x", "--session-timeout-ms", "60000", "--max-poll-interval-ms", "30000"),
            {},
            "must not exceed max_poll_interval_ms",
        ),
        (("--bundle", "/x", "--max-message-bytes", "3000000000"), {}, "max_message_bytes"),
        (("--bundle", "/x", "--max-poll-interval-ms", "3000000000"), {}, "max_poll_interval_ms"),
        (("--bundle", "/x", "--redis-socket-timeout-s", "inf"), {}, "redis_socket_timeout_s"),
        # the serial loop would leave a second instance idle
        (
            ("--bundle", "/x", "--engine-instances", "2", "--overlap", "off"),
            {},
            "engine_instances 2 needs the overlapped loop",
        ),
        (("--bundle", "/x", "--engine-instances", "0"), {}, "engine_instances"),
        (("--bundle", "/x", "--onnx-precision", "fp16"), {}, "onnx_precision"),
        # a TLS file the clients cannot open: before, a Kafka "no broker at ..." retried for ever
        # or a Redis "Error 2 ... No such file or directory" on every batch, after the model
        (("--bundle", "/x", "--ssl-cafile", "/no/ca.pem"), {}, "ssl_cafile: '/no/ca.pem': no such"),
        (("--bundle", "/x"), {"CARSTREAM_SSL_CERTFILE": "/dev/null"}, "not a regular file"),
        (("--bundle", "/x"), {"CARSTREAM_REDIS_TLS_CA_CERTS": "/"}, "'/': is a directory"),
    ],
)
def test_bad_settings_are_one_line_exit_2(args, env, needle):
    proc = run_worker(*args, **env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0] and "s3cret" not in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("processes", ["1", "2"])  # the worker's port, or its supervisor's
def test_a_metrics_port_in_use_is_one_line_exit_2_before_the_bundle_loads(tmp_path, processes):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # no bundle there: the bind must fail first, as it would before a real model loads
        proc = run_worker(
            "--bundle", str(tmp_path / "absent"), "--metrics-host", "127.0.0.1",
            "--metrics-port", str(port), "--processes", processes,
        )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0]


@pytest.mark.parametrize("processes", ["1", "2"])  # the worker's own check, or its supervisor's
def test_a_bundle_path_too_long_for_the_os_is_one_line_exit_2(processes):
    proc = run_worker("--bundle", "b" * 300, "--metrics-port", "0", "--processes", processes)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "name of 300 bytes, over the 255" in lines[0]


def test_bind_then_start_serves_only_once_started():
    metrics = WorkerMetrics()
    server = bind(metrics, "127.0.0.1", 0, stall_s=60)
    try:
        with pytest.raises(OSError):  # the port is taken as soon as bind returns
            bind(WorkerMetrics(), "127.0.0.1", server.server_port, stall_s=60)
        start(server)
        assert get(f"http://127.0.0.1:{server.server_port}/healthz")[0] == 200
    finally:
        server.shutdown()
        server.server_close()


def test_help_lists_every_setting_with_its_environment_variable():
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "run", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0
    from worker.settings import WorkerSettings

    for name in WorkerSettings.model_fields:
        assert f"CARSTREAM_{name.upper()}" in proc.stdout, name
    text = " ".join(proc.stdout.split())  # argparse wraps the help text
    # a setting without a default was listed as "(default: None)"
    assert "None" not in text
    assert "--ssl-cafile CAFILE ssl cafile [env CARSTREAM_SSL_CAFILE] (default: unset)" in text
    # passwords are no flags (a flag's value shows in ps and in the pod's spec): the help says
    # where they go instead
    assert "--sasl-password" not in text and "--redis-password" not in text
    assert (
        "Passwords are read from the environment only (CARSTREAM_SASL_PASSWORD, "
        "CARSTREAM_REDIS_PASSWORD)" in text
    )
    # where the description says what unset means, no "(default: ...)" contradicts it
    assert (
        "--heartbeat-interval-ms MS below session_timeout_ms; default: a third of it "
        "[env CARSTREAM_HEARTBEAT_INTERVAL_MS] --max-poll-interval-ms"
    ) in text
    assert "[env CARSTREAM_FETCH_MAX_WAIT_MS] --max-message-bytes" in text
    assert "required [env CARSTREAM_BUNDLE] --backend" in text
    assert "[env CARSTREAM_MAX_BATCH] (default: 32)" in text


def test_an_unknown_carstream_variable_is_a_warning_naming_the_closest_setting():
    # a typo silently left the default in force; other CARSTREAM_* variables (test harnesses,
    # docker compose) are legitimate, so it is a warning and the worker goes on
    proc = run_worker(
        "--bundle", "/no/such/bundle", CARSTREAM_DECODE_THRAEDS="3", CARSTREAM_SOAK="1"
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr  # for the bundle, not for the variables
    warnings = [line for line in proc.stderr.splitlines() if " WARNING " in line]
    assert len(warnings) == 2, proc.stderr
    assert warnings[0].endswith(
        "CARSTREAM_DECODE_THRAEDS is not a worker setting and is ignored; "
        "did you mean CARSTREAM_DECODE_THREADS?"
    )
    assert warnings[1].endswith("CARSTREAM_SOAK is not a worker setting and is ignored")
    assert "/no/such/bundle" in proc.stderr.splitlines()[-1]


def test_known_carstream_variables_in_any_case_give_no_warning():
    proc = run_worker(
        "--bundle", "/no/such/bundle", CARSTREAM_DECODE_THREADS="3", carstream_max_batch="8"
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "WARNING" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


get = http_get


def test_health_ready_and_metrics_endpoints():
    metrics = WorkerMetrics()
    server = serve(metrics, "127.0.0.1", 0, stall_s=60)
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        assert get(base + "/healthz")[0] == 200
        assert get(base + "/readyz")[0] == 503
        metrics.set_ready(True)
        assert get(base + "/readyz")[0] == 200
        metrics.consumed.inc(3)
        metrics.dead_letters.labels("schema").inc()
        status, body = get(base + "/metrics")
        assert status == 200
        assert "carstream_consumed_total 3.0" in body
        assert 'carstream_dead_letters_total{kind="schema"} 1.0' in body
        assert get(base + "/nope")[0] == 404
    finally:
        server.shutdown()


def test_healthz_fails_when_the_loop_stalls():
    metrics = WorkerMetrics()
    server = serve(metrics, "127.0.0.1", 0, stall_s=0.0)
    try:
        assert get(f"http://127.0.0.1:{server.server_port}/healthz")[0] == 503
    finally:
        server.shutdown()


def test_good_settings_at_the_limits_build_a_consumer():
    """What WorkerSettings accepts, kafka-python accepts too (built without a broker)."""
    from kafka import KafkaConsumer

    from worker.run import consumer_config
    from worker.settings import FETCH_MARGIN_BYTES, INT32_MAX, WorkerSettings

    for settings in (
        WorkerSettings(),
        # a fetch wait of 30 s or more was a KafkaConfigurationError after the model loaded
        WorkerSettings(max_wait_ms=60_000),
        WorkerSettings(fetch_max_wait_ms=60_000),
        WorkerSettings(
            session_timeout_ms=3_600_000,
            heartbeat_interval_ms=3_599_999,
            max_poll_interval_ms=INT32_MAX,
            max_message_bytes=INT32_MAX - FETCH_MARGIN_BYTES,
        ),
    ):
        opts = consumer_config(settings)
        assert opts["max_partition_fetch_bytes"] <= INT32_MAX
        consumer = KafkaConsumer(bootstrap_servers="127.0.0.1:1", api_version=(2, 5), **opts)
        # aborted transactions' posts are not read (Tansu, the tests' broker, does not hide
        # them even then, so this is checked here, as the consumer's setting)
        assert consumer.config["isolation_level"] == "read_committed"
        consumer.close()


def test_fetch_wait_follows_the_batch_wait_unless_set():
    from worker.run import fetch_wait_ms
    from worker.settings import WorkerSettings

    # a broker that answers a fetch only when its wait runs out must not add 500 ms to posts
    assert fetch_wait_ms(WorkerSettings(max_wait_ms=50)) == 50
    assert fetch_wait_ms(WorkerSettings(max_wait_ms=0)) == 10
    assert fetch_wait_ms(WorkerSettings(max_wait_ms=50, fetch_max_wait_ms=200)) == 200


class _RecordingEngine:
    name = "recording"
    max_batch = 64

    def __init__(self):
        self.sizes: list[int] = []

    def input_spec(self):
        return InputSpec("images", (3, 4, 4), np.dtype(np.float32))

    def infer(self, batch):
        self.sizes.append(batch.shape[0])
        return np.zeros((batch.shape[0], 2), dtype=np.float32)


class _SelfWarmingEngine(_RecordingEngine):
    def warm_up(self, max_batch):
        self.sizes.append(("warm_up", max_batch))


def _fake_bundle(num_classes: int = 2):
    from types import SimpleNamespace

    labels = [{"make": "M", "model": str(i)} for i in range(num_classes)]
    manifest = SimpleNamespace(num_classes=num_classes, labels=labels)
    return SimpleNamespace(path=Path("/bundles/b"), manifest=manifest)


def test_warm_up_runs_the_largest_batch_the_worker_sends_or_the_engines_own():
    plain = _RecordingEngine()
    _warm_up(plain, 32, _fake_bundle())
    assert plain.sizes == [1, 32]
    capped = _RecordingEngine()
    _warm_up(capped, 128, _fake_bundle())  # never above the engine's own max batch
    assert capped.sizes == [1, 64]
    own = _SelfWarmingEngine()
    _warm_up(own, 32, _fake_bundle())  # torch-cuda captures one CUDA graph per bucket itself
    assert own.sizes == [("warm_up", 32), 1]  # and answers one image, to check its width


@pytest.mark.parametrize("engine_class", [_RecordingEngine, _SelfWarmingEngine])
@pytest.mark.parametrize("num_classes", [1, 3])
def test_a_model_whose_logits_are_not_num_classes_wide_fails_warm_up(engine_class, num_classes):
    # the engines answer 2 logits: with 3 labels the third is never chosen; with 1 label
    # labels[argmax] would raise IndexError on the first batch, in every replica
    from worker.run import warm_up_all

    failed = warm_up_all([engine_class()], 32, _fake_bundle(num_classes))
    assert failed is not None and "\n" not in failed
    assert "/bundles/b" in failed and "(1, 2)" in failed and f"{num_classes} classes" in failed
    assert warm_up_all([engine_class()], 32, _fake_bundle(2)) is None


class _FailingEngine(_RecordingEngine):
    name = "onnxruntime-fp32"

    def infer(self, batch):
        raise RuntimeError(
            "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions\nmore"
        )


def test_any_warm_up_failure_is_one_line_naming_the_bundle_and_engine():
    from worker.run import warm_up_all

    failed = warm_up_all([_FailingEngine()], 8, _fake_bundle())
    assert failed == (
        "bundle /bundles/b: the onnxruntime-fp32 engine failed its warm-up (max batch 8): "
        "RuntimeError: [ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions"
    )


def test_an_int8_worker_on_a_bundle_without_int8_is_one_line_exit_2(worker_bundle_dir, tmp_path):
    import json
    import shutil

    fp32_only = tmp_path / "bundle"
    shutil.copytree(worker_bundle_dir, fp32_only)
    manifest = json.loads((fp32_only / "manifest.json").read_text())
    manifest["artifacts"] = [a for a in manifest["artifacts"] if a["precision"] != "int8"]
    (fp32_only / "manifest.json").write_text(json.dumps(manifest))
    for backend in ("onnxruntime", "auto"):
        proc = run_worker(
            "--bundle", str(fp32_only), "--onnx-precision", "int8", "--backend", backend
        )
        assert proc.returncode == 2
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("python -m worker run")]
        assert len(errors) == 1 and "no onnxruntime int8 artifact" in errors[0], proc.stderr
        assert "Traceback" not in proc.stderr


def test_a_bundle_with_fewer_labels_than_model_outputs_is_one_line_exit_2(
    worker_bundle_dir, tmp_path
):
    # before: it loaded and warmed up, then labels[argmax] raised IndexError on the first batch
    import json
    import shutil

    short = tmp_path / "bundle"
    shutil.copytree(worker_bundle_dir, short)
    manifest = json.loads((short / "manifest.json").read_text())
    manifest["labels"] = manifest["labels"][:2]
    manifest["num_classes"] = 2
    (short / "manifest.json").write_text(json.dumps(manifest))
    proc = run_worker("--bundle", str(short), "--backend", "onnxruntime")
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr and str(short) in last
    assert "model.onnx does not fit manifest.json" in last and "2 classes" in last


def test_a_tls_handshake_nobody_answers_exits_1_with_one_line(worker_bundle_dir):
    # kafka-python 3.0 awaits a TLS handshake with no deadline: without one of its own the
    # worker would hang at start for ever, silently (its liveness already beating)
    with socket.create_server(("127.0.0.1", 0)) as silent:  # the kernel accepts, nobody answers
        proc = run_worker(
            "--bundle",
            str(worker_bundle_dir),
            "--bootstrap-servers",
            f"127.0.0.1:{silent.getsockname()[1]}",
            CARSTREAM_SECURITY_PROTOCOL="SSL",
            CARSTREAM_SSL_CHECK_HOSTNAME="false",
            CARSTREAM_KAFKA_CONNECT_TIMEOUT_S="1",
            CARSTREAM_METRICS_PORT="0",
        )
    assert proc.returncode == 1, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("python -m worker run")]
    assert len(errors) == 1, proc.stderr
    assert "did not finish connecting (no answer within 6s; security_protocol SSL" in errors[0]
    assert "Traceback" not in proc.stderr


def test_within_deadline_returns_raises_or_times_out():
    import threading

    from worker.connections import ConnectInterruptedError, ConnectTimeoutError, within_deadline

    assert within_deadline(lambda: 42, 5) == 42
    with pytest.raises(KeyError, match="boom"):
        within_deadline(lambda: {}["boom"], 5)
    never = threading.Event()
    with pytest.raises(ConnectTimeoutError, match=r"no answer within 0\.1s"):
        within_deadline(never.wait, 0.1)
    # a stop while connecting ends the wait at once, not at the deadline
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    with pytest.raises(ConnectInterruptedError):
        within_deadline(never.wait, 60, stop)
    assert within_deadline(lambda: 7, 5, threading.Event()) == 7
    never.set()


def test_engine_options_pass_precision_only_when_it_is_not_the_default():
    assert engine_options(WorkerSettings(bundle="/b")) == {}
    opts = engine_options(
        WorkerSettings(bundle="/b", onnx_precision="int8", inference_threads=1, cuda_graphs=True)
    )
    assert opts == {"precision": "int8", "threads": 1, "cuda_graphs": True}
    off = engine_options(WorkerSettings(bundle="/b", inference_spinning=False))
    assert off == {"spinning": False}


def test_no_inference_spinning_flag_and_variable_turn_spinning_off(monkeypatch):
    from worker.run import get_args_parser, settings_from_args

    parser = get_args_parser()
    args = parser.parse_args(["--bundle", "/b", "--no-inference-spinning"])
    assert settings_from_args(args).inference_spinning is False
    monkeypatch.setenv("CARSTREAM_INFERENCE_SPINNING", "false")
    assert settings_from_args(parser.parse_args(["--bundle", "/b"])).inference_spinning is False
    monkeypatch.delenv("CARSTREAM_INFERENCE_SPINNING")
    assert settings_from_args(parser.parse_args(["--bundle", "/b"])).inference_spinning is True


def test_oversubscribed_cpu_engines_are_named_with_a_thread_count_to_set():
    two = WorkerSettings(bundle="/b", engine_instances=2)
    text = oversubscription_note(two, "torch-cpu-bf16", 4)
    assert "2 x 4 threads on 4 cores" in text and "inference_threads (e.g. 2)" in text
    assert "onnxruntime-fp32" in oversubscription_note(two, "onnxruntime-fp32", 2)
    assert oversubscription_note(two, "torch-cuda-fp16", 4) is None  # GPU engines: no pool
    one = WorkerSettings(bundle="/b")
    assert oversubscription_note(one, "onnxruntime-fp32", 4) is None
    sized = WorkerSettings(bundle="/b", engine_instances=2, inference_threads=1)
    assert oversubscription_note(sized, "onnxruntime-fp32", 4) is None


def test_parity_note_reports_the_int8_cost_and_flags_non_finite_logits():
    entry = {"top1_agreement": 0.97, "accuracy_cost": 0.01, "n_images": 200, "non_finite_logits": 0}
    parity = {"artifacts": {"onnxruntime-int8": entry}}
    text, sound = parity_note(parity, "onnxruntime-int8")
    assert sound and "0.97" in text and "0.01" in text and "200" in text
    assert parity_note(parity, "onnxruntime-fp32") is None  # full precision: nothing to say
    assert parity_note(None, "onnxruntime-int8") is None  # a bundle without parity.json
    text, sound = parity_note({"artifacts": {}}, "onnxruntime-int8")
    assert not sound and "no entry" in text
    bad = {"artifacts": {"onnxruntime-int8": {**entry, "non_finite_logits": 3}}}
    text, sound = parity_note(bad, "onnxruntime-int8")
    assert not sound and "3 non-finite" in text
    bf16 = {"artifacts": {"torch-cpu-bf16": {**entry, "top1_agreement": 0.996}}}
    text, sound = parity_note(bf16, "torch-cpu-bf16")
    assert sound and "torch-cpu-bf16" in text and "0.996" in text
    text, sound = parity_note(parity, "torch-cpu-bf16")  # built without --precision bf16
    assert not sound and "no entry" in text


class _ClosableEngine:
    name = "onnxruntime-fp32"
    max_batch = 8

    def __init__(self, warm_error: Exception | None = None) -> None:
        self.closed = 0
        self.warm_error = warm_error

    def warm_up(self, _max_batch: int) -> None:
        if self.warm_error is not None:
            raise self.warm_error

    def input_spec(self):
        return InputSpec("images", (3, 4, 4), np.dtype(np.float32))

    def infer(self, batch):
        return np.zeros((batch.shape[0], 2), dtype=np.float32)

    def close(self) -> None:
        self.closed += 1


class _FakeServer:
    def __init__(self) -> None:
        self.shutdowns = 0

    def shutdown(self) -> None:
        self.shutdowns += 1


class _ClosableClient:
    def __init__(self) -> None:
        self.closed = 0

    def close(self, **_kwargs) -> None:
        self.closed += 1


def _serve_with_fakes(
    monkeypatch,
    connect_error=None,
    stop_first=False,
    warm_error=None,
    clients=None,
    metrics=None,
    redis_outcome=None,
):
    """`_serve` with a fake bundle, engines and metrics server, and a connect that fails (or,
    with ``clients``, hands out those fake consumer and producer)."""
    import threading
    import types

    import engine_build.bundle
    import engine_build.runtime
    import worker.connections
    import worker.metrics
    import worker.run
    from worker.run import _serve

    engines = [_ClosableEngine(warm_error), _ClosableEngine()]
    made = iter(engines)
    manifest = types.SimpleNamespace(
        model_name="m", model_version="1", num_classes=2, labels=[1, 2]
    )
    bundle = types.SimpleNamespace(manifest=manifest, parity=None, path=Path("/b"))
    monkeypatch.setattr(engine_build.bundle, "load_bundle", lambda _path: bundle)
    monkeypatch.setattr(engine_build.runtime, "create_engine", lambda *_a, **_k: next(made))
    monkeypatch.setattr(worker.metrics, "start", lambda server: server)

    handed = iter(clients or ())

    def within_deadline(_factory, _timeout_s, _stop=None, _refused=None):
        if clients:
            return next(handed)
        raise connect_error

    monkeypatch.setattr(worker.connections, "within_deadline", within_deadline)
    monkeypatch.setattr(worker.run, "wait_for_redis", lambda *_args: redis_outcome)
    settings = WorkerSettings(bundle="/b", engine_instances=2)
    stop = threading.Event()
    if stop_first:
        stop.set()
    server = _FakeServer()
    outcome: object
    try:
        outcome = _serve(settings, stop, metrics or WorkerMetrics(), server)
    except Exception as exc:  # the test looks at what escaped
        outcome = exc
    return outcome, [e.closed for e in engines], server.shutdowns


def test_every_way_out_of_serve_closes_the_engines_and_the_metrics_server_once(monkeypatch):
    from kafka.errors import KafkaConfigurationError

    from worker.connections import ConnectTimeoutError

    cases = [
        ({"connect_error": ConnectTimeoutError("no answer within 6s")}, 1),
        ({"connect_error": KafkaConfigurationError("bad option")}, 2),
        ({"stop_first": True}, 0),
    ]
    for kwargs, code in cases:
        assert _serve_with_fakes(monkeypatch, **kwargs) == (code, [1, 1], 1), kwargs


def test_an_unexpected_error_starting_up_still_closes_the_engines_and_the_server(monkeypatch):
    # before: the engines stayed open and the metrics thread kept serving a dead worker
    outcome, closed, shutdowns = _serve_with_fakes(monkeypatch, RuntimeError("a bug"))
    assert isinstance(outcome, RuntimeError) and closed == [1, 1] and shutdowns == 1


def test_a_warm_up_failure_is_one_line_exit_2_and_closes_everything(monkeypatch, capsys):
    # before: a traceback, exit 1 (ONNX Runtime refusing the manifest's input, CUDA out of
    # memory capturing torch-cuda's graphs), and a replica restarted into the same failure
    outcome, closed, shutdowns = _serve_with_fakes(monkeypatch, warm_error=MemoryError("oom"))
    assert outcome == 2 and closed == [1, 1] and shutdowns == 1
    err = capsys.readouterr().err
    assert err == (
        "python -m worker run: error: bundle /b: the onnxruntime-fp32 engine failed its warm-up "
        "(max batch 32): MemoryError: oom\n"
    )


def test_a_failure_setting_up_the_loop_closes_the_kafka_clients_too(monkeypatch):
    import worker.pipeline

    def refuse(*_args, **_kwargs):
        raise ValueError("the loop refuses these settings")

    monkeypatch.setattr(worker.pipeline, "StreamWorker", refuse)
    clients = [_ClosableClient(), _ClosableClient()]  # the consumer, then the producer
    outcome, closed, shutdowns = _serve_with_fakes(monkeypatch, clients=clients)
    assert outcome == 1 and closed == [1, 1] and shutdowns == 1
    assert [c.closed for c in clients] == [1, 1]


def test_processes_warn_for_the_cpu_backend_auto_will_pick(tmp_path):
    assert cpu_backend_label("onnxruntime", tmp_path) == "onnxruntime"
    assert cpu_backend_label("torch-cpu", tmp_path) == "torch-cpu"
    assert cpu_backend_label("auto", tmp_path).startswith("onnxruntime (auto")  # no GPU here
    (tmp_path / "nvidia0").touch()
    assert cpu_backend_label("auto", tmp_path) is None  # auto picks a GPU engine
    assert cpu_backend_label("tensorrt", tmp_path) is None
    (tmp_path / "nvidia0").unlink()
    (tmp_path / "nvidiactl").touch()  # the control node alone is no device
    assert cpu_backend_label("auto", tmp_path) is not None


@pytest.mark.parametrize("gpu", [None, "/dev/nvidia0"])
def test_the_engine_in_use_is_a_metric_and_a_cpu_engine_beside_a_gpu_is_a_warning(
    monkeypatch, caplog, gpu
):
    import worker.run

    monkeypatch.setattr(worker.run, "visible_nvidia_gpu", lambda: gpu)
    metrics = WorkerMetrics()
    with caplog.at_level("WARNING", logger="worker.run"):
        assert _serve_with_fakes(monkeypatch, stop_first=True, metrics=metrics)[0] == 0
    labels = {"engine": "onnxruntime-fp32", "model": "m", "version": "1"}
    assert metrics.registry.get_sample_value("carstream_engine_info", labels) == 1
    chose = "backend auto chose onnxruntime-fp32 on the CPU"
    fell_back = [r for r in caplog.records if chose in r.message]
    assert len(fell_back) == (1 if gpu else 0)


def test_auto_opens_every_engine_instance_on_the_backend_the_first_one_got(monkeypatch):
    """A later instance must not fall back elsewhere (say TensorRT out of GPU memory -> the
    CPU): one loop would run instances at several speeds and precisions."""
    from types import SimpleNamespace

    import engine_build.runtime
    from worker.run import open_engines

    asked: list[tuple[str, dict]] = []

    def create(_bundle, backend, **opts):
        asked.append((backend, opts))
        return SimpleNamespace(name="tensorrt-fp16" if backend in ("auto", "tensorrt") else "x")

    monkeypatch.setattr(engine_build.runtime, "create_engine", create)
    opts = {"threads": 2, "cuda_graphs": True}  # what the worker passes for every backend
    engines = open_engines(object(), "auto", 3, opts, [])
    # the later instances get only the options of the backend the first chose (none for
    # TensorRT), so they do not log that they ignore the CPU engines' threads
    assert asked == [("auto", opts), ("tensorrt", {}), ("tensorrt", {})]
    assert [e.name for e in engines] == ["tensorrt-fp16"] * 3
    asked.clear()
    open_engines(object(), "onnxruntime", 2, opts, [])  # named: create_engine says what it ignores
    assert asked == [("onnxruntime", opts)] * 2


def test_engines_opened_before_a_failing_instance_are_left_for_the_caller_to_close(monkeypatch):
    from types import SimpleNamespace

    import engine_build.runtime
    from engine_build.runtime import EngineLoadError
    from worker.run import open_engines

    made = [SimpleNamespace(name="torch-cuda-fp16-graphs")]

    def create(_bundle, backend, **_opts):
        if made:
            return made.pop()
        raise EngineLoadError(f"out of GPU memory loading {backend}")

    monkeypatch.setattr(engine_build.runtime, "create_engine", create)
    into: list = []
    with pytest.raises(EngineLoadError, match="loading torch-cuda"):
        open_engines(object(), "auto", 2, {}, into)
    assert [e.name for e in into] == ["torch-cuda-fp16-graphs"]


@pytest.mark.parametrize("flag", ["--redis-password", "--sasl-password"])
@pytest.mark.parametrize("form", ["apart", "joined"])
def test_a_password_flag_is_refused_naming_its_variable_without_echoing_it(flag, form):
    # a flag's value shows in ps and in the pod's spec: passwords come from the environment
    args = (f"{flag}=s3cret",) if form == "joined" else (flag, "s3cret")
    proc = run_worker("--bundle", "/x", *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    variable = "CARSTREAM_" + flag.removeprefix("--").replace("-", "_").upper()
    assert f"{flag} is not a flag: set {variable} in the environment" in lines[-1]
    assert "s3cret" not in proc.stderr


def test_settings_the_protocol_does_not_use_are_warnings_at_start(tmp_path):
    from tests.support import make_certificates

    ca = make_certificates(tmp_path)[0]
    proc = run_worker(
        "--bundle", "/no/such/bundle", CARSTREAM_REDIS_TLS_CA_CERTS=str(ca),
        CARSTREAM_SASL_USERNAME="u",
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr  # for the bundle
    warnings = [
        line.split(" WARNING ", 1)[1] for line in proc.stderr.splitlines() if " WARNING " in line
    ]
    assert warnings == [
        "worker.run: sasl_username is ignored: security_protocol PLAINTEXT uses no SASL",
        "worker.run: redis_tls_ca_certs is ignored: redis_url is redis://, not rediss:// (TLS)",
    ], proc.stderr


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (("--bundle", "/no/such\nbundle"), {}, "/no/such\\nbundle"),
        # refused as metrics_host by the settings, before any bind
        (("--bundle", "/x", "--metrics-host", "no\nhost.invalid"),
         {"CARSTREAM_METRICS_PORT": "9400"}, "metrics_host: Value error, 'no\\nhost.invalid'"),
    ],
)  # fmt: skip
def test_a_newline_in_a_path_or_host_keeps_the_error_one_line(args, env, needle):
    proc = run_worker(*args, **env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
