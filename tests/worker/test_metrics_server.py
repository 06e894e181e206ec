"""The metrics endpoint's error path: a probe that hung up is a log line, not stderr noise."""

from __future__ import annotations

import logging
import socket
import struct
import time

from worker.metrics import CLIENT_IDLE_S, EndpointHandler, WorkerMetrics, bind, start


def test_a_client_that_hung_up_is_logged_not_printed(caplog, capfd):
    # requests queued while the engine loads (bound, not yet started), whose clients gave up
    server = bind(WorkerMetrics(), "127.0.0.1", 0, stall_s=60)
    try:
        client = socket.create_connection(("127.0.0.1", server.server_port))
        client.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # RST: the server's read or write fails with a ConnectionError
        with caplog.at_level(logging.DEBUG, logger="worker.metrics"):
            start(server)
            deadline = time.monotonic() + 10
            while not any("went away" in r.getMessage() for r in caplog.records):
                assert time.monotonic() < deadline, "the failed request was never logged"
                time.sleep(0.05)
    finally:
        server.shutdown()
        server.server_close()
    assert "Traceback" not in capfd.readouterr().err


def test_a_connection_that_sends_nothing_is_closed(monkeypatch):
    # each connection has a thread waiting for its request: 200 silent clients held 200 threads
    # and file descriptors for as long as they stayed connected
    assert vars(EndpointHandler)["timeout"] == CLIENT_IDLE_S  # the server's own, not inherited
    monkeypatch.setattr(EndpointHandler, "timeout", 0.5)
    server = start(bind(WorkerMetrics(), "127.0.0.1", 0, stall_s=60))
    try:
        silent = socket.create_connection(("127.0.0.1", server.server_port))
        half = socket.create_connection(("127.0.0.1", server.server_port))
        half.sendall(b"GET /metr")  # half a request line
        for client in (silent, half):
            client.settimeout(10)
            assert client.recv(1024) == b""  # the server closed it; no answer was due
            client.close()
        # and the endpoint still answers whole requests
        probe = socket.create_connection(("127.0.0.1", server.server_port))
        probe.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        probe.settimeout(10)
        assert probe.recv(1024).startswith(b"HTTP/1.0 200")
        probe.close()
    finally:
        server.shutdown()
        server.server_close()
