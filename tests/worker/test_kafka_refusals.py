"""A Kafka broker that refuses the worker for good (its certificate, the SASL mechanism or login)
stops it at start with the cause, instead of "no Kafka broker at ...; retry N" for ever."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time

import pytest
from kafka.errors import (
    KafkaConnectionError,
    KafkaTimeoutError,
    SaslAuthenticationFailedError,
    UnsupportedSaslMechanismError,
)
from PIL import Image

from tests.support import make_certificates, worker_cli
from worker.connections import (
    BootstrapFailures,
    KafkaRefusedError,
    kafka_refusal,
    within_deadline,
)


def _handshake_failure(reason: str) -> KafkaConnectionError:
    """What kafka-python 3.0 raises for a failed TLS handshake: its own error, raised while
    handling the ssl one."""
    try:
        try:
            raise ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] {reason}")
        except ssl.SSLError as exc:
            raise KafkaConnectionError(f"Handshake failed: {exc}")  # noqa: B904 (as kafka-python)
    except KafkaConnectionError as exc:
        return exc


def test_kafka_refusal_names_only_errors_no_retry_ends():
    verify = kafka_refusal(_handshake_failure("certificate verify failed: self-signed"))
    assert verify is not None and "check ssl_cafile" in verify and "self-signed" in verify
    mismatch = kafka_refusal(_handshake_failure("certificate verify failed: Hostname mismatch"))
    assert mismatch is not None and "ssl_check_hostname" in mismatch
    assert "sasl_mechanism" in kafka_refusal(UnsupportedSaslMechanismError())
    assert "sasl_password" in kafka_refusal(SaslAuthenticationFailedError("bad login"))
    for passing in (
        KafkaConnectionError("Connection refused"),
        KafkaTimeoutError("Unable to bootstrap from 127.0.0.1:9092"),
        KafkaConnectionError("Handshake failed: [SSL: UNEXPECTED_EOF_WHILE_READING] eof"),
    ):
        assert kafka_refusal(passing) is None, passing


def test_bootstrap_failures_give_the_reason_after_refusals_in_a_row():
    failures = BootstrapFailures(limit=3)
    logger = logging.getLogger(BootstrapFailures.LOGGER)
    refusal = UnsupportedSaslMechanismError()
    with failures.attached():
        logger.warning("Bootstrap connection to %s failed: %s", "b-0", KafkaConnectionError("x"))
        assert failures.cause() == "KafkaConnectionError: x" and failures.refused() is None
        for _ in range(2):
            error = UnsupportedSaslMechanismError()
            logger.error("Connection failed: %s", error)
            logger.warning("Bootstrap connection to %s failed: %s", "b-0", error)  # the same
        assert failures.refused() is None  # two in a row, counted once each
        logger.error("Connection failed: %s", refusal)
        logger.warning("Bootstrap connection to %s failed: %s", "b-0", refusal)
        logger.error("Bootstrap failed: %s", KafkaTimeoutError("Unable to bootstrap from b"))
    assert failures.refused() == kafka_refusal(refusal)
    logger.error("Connection failed: %s", KafkaConnectionError("after"))  # detached: unseen
    assert failures.cause() == str(refusal) and "UnsupportedSaslMechanismError" in str(refusal)


def test_one_refusing_broker_of_several_does_not_stop_the_client():
    # each bootstrap attempt picks a broker at random: three refusals in a row from the one
    # mid-rotation of its certificate said the whole cluster refused (4 in 150 starts)
    failures = BootstrapFailures(limit=3, brokers=2)
    logger = logging.getLogger(BootstrapFailures.LOGGER)
    with failures.attached():
        for _ in range(5):
            logger.warning("Bootstrap connection to %s failed: %s", "bad", _handshake_failure("x"))
        assert failures.refused() is None  # the other broker was not tried yet
        logger.warning("Bootstrap connection to %s failed: %s", "good", KafkaConnectionError("x"))
        assert failures.refused() is None  # down, not refusing: it may come up
        for _ in range(3):
            logger.warning("Bootstrap connection to %s failed: %s", "good", _handshake_failure("y"))
    assert "certificate does not verify" in failures.refused()


def test_within_deadline_gives_up_as_soon_as_the_broker_refuses():
    started = time.monotonic()
    with pytest.raises(KafkaRefusedError, match="the reason"):
        within_deadline(lambda: time.sleep(30), 30, threading.Event(), lambda: "the reason")
    assert time.monotonic() - started < 5


def _run(bundle, bootstrap: str, **env: str):
    env.setdefault("CARSTREAM_KAFKA_CONNECT_TIMEOUT_S", "20")
    proc = worker_cli(
        "run", "--bundle", str(bundle), "--bootstrap-servers", bootstrap, "--metrics-port", "0",
        timeout=90, **env,
    )  # fmt: skip
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("python -m worker run")]
    return proc, errors


def _untrusted_tls_listener(tmp_path) -> socket.socket:
    """A TLS listener whose certificate the system's CAs do not verify; close it when done."""
    _ca, crt, key = make_certificates(tmp_path)  # its CA is not the system's
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(crt, key)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                context.wrap_socket(conn, server_side=True).close()
            except (ssl.SSLError, OSError):
                conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return listener


@pytest.mark.integration
def test_a_broker_certificate_the_ca_does_not_verify_is_one_line_exit_2(
    worker_bundle_dir, tmp_path
):
    listener = _untrusted_tls_listener(tmp_path)
    try:
        started = time.monotonic()
        proc, errors = _run(
            worker_bundle_dir,
            f"127.0.0.1:{listener.getsockname()[1]}",
            CARSTREAM_SECURITY_PROTOCOL="SSL",
        )
    finally:
        listener.close()
    assert proc.returncode == 2, proc.stderr
    assert len(errors) == 1, proc.stderr
    assert "refuses this client (security_protocol SSL)" in errors[0]
    assert "certificate verify failed" in errors[0] and "check ssl_cafile" in errors[0]
    assert "no Kafka broker" not in proc.stderr and "Traceback" not in proc.stderr
    assert time.monotonic() - started < 60  # not after kafka_connect_timeout_s retries


@pytest.mark.integration
def test_a_sasl_mechanism_the_broker_does_not_offer_is_one_line_exit_2(
    worker_bundle_dir, kafka_bootstrap
):
    # Tansu offers no SASL mechanism at all: it answers the handshake with error 33
    proc, errors = _run(
        worker_bundle_dir,
        kafka_bootstrap,
        CARSTREAM_SECURITY_PROTOCOL="SASL_PLAINTEXT",
        CARSTREAM_SASL_MECHANISM="SCRAM-SHA-512",
        CARSTREAM_SASL_USERNAME="carstream",
        CARSTREAM_SASL_PASSWORD="hunter2SECRET",
    )
    assert proc.returncode == 2, proc.stderr
    assert len(errors) == 1, proc.stderr
    assert (
        "sasl_mechanism SCRAM-SHA-512): the broker does not offer this sasl_mechanism"
        in (errors[0])
    )
    assert "hunter2SECRET" not in proc.stderr and "no Kafka broker" not in proc.stderr


@pytest.mark.integration
def test_produce_names_a_certificate_the_ca_does_not_verify(tmp_path):
    # kafka-python says only "Unable to bootstrap" after the whole --timeout
    image = tmp_path / "a.jpg"
    Image.new("RGB", (8, 8)).save(image)
    listener = _untrusted_tls_listener(tmp_path)
    try:
        started = time.monotonic()
        proc = worker_cli(
            "produce", "--images", str(tmp_path), "--timeout", "30",
            "--bootstrap-servers", f"127.0.0.1:{listener.getsockname()[1]}",
            timeout=90, CARSTREAM_SECURITY_PROTOCOL="SSL",
        )  # fmt: skip
    finally:
        listener.close()
    assert proc.returncode == 1, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert "certificate verify failed" in errors[0] and "check ssl_cafile" in errors[0]
    assert time.monotonic() - started < 25  # at the refusal, not at --timeout


@pytest.mark.integration
def test_a_cluster_whose_every_broker_refuses_exits_2_across_short_tries(
    worker_bundle_dir, tmp_path
):
    # a 2 s try reaches only some of 4 brokers (kafka-python picks one at random and waits out
    # its back-off): counted per try, the refusals never covered every broker, and the worker
    # retried "no Kafka broker" for ever
    listeners = [_untrusted_tls_listener(tmp_path) for _ in range(4)]
    try:
        bootstrap = ",".join(f"127.0.0.1:{ln.getsockname()[1]}" for ln in listeners)
        proc, errors = _run(
            worker_bundle_dir, bootstrap,
            CARSTREAM_SECURITY_PROTOCOL="SSL", CARSTREAM_KAFKA_CONNECT_TIMEOUT_S="2",
        )  # fmt: skip
    finally:
        for listener in listeners:
            listener.close()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(errors) == 1 and "refuses this client" in errors[0], proc.stderr[-2000:]
