"""Helpers shared by the suites that run real workers (tests/worker, tests/faults).

Importable as ``tests.support`` (pytest's ``pythonpath`` includes the repository root).
"""

from __future__ import annotations

import io
import os
import random
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine_build.manifest import Manifest
from training.checkpoint import save_checkpoint
from training.models import build_model
from training.preprocessing import PreprocessSpec

CLASSES = [
    {"make": "Audi", "model": "A4", "make_id": 1, "model_id": 11},
    {"make": "Audi", "model": "Q5", "make_id": 1, "model_id": 12},
    {"make": "BMW", "model": "X5", "make_id": 2, "model_id": 22},
    {"make": "Citroen", "model": "C3", "make_id": 3, "model_id": 33},
]
IMAGE_SIZE = 32
REPO = Path(__file__).resolve().parents[1]


def in_ci() -> bool:
    """CI=true (or 1/yes): the integration tests must run there, never skip."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing_tool(message: str) -> None:
    """Skip for a tool this machine lacks, except on CI, where its absence is a failure."""
    if in_ci():
        pytest.fail(message)
    pytest.skip(message)


def tiny_manifest(
    labels: list[dict] | None = None, preprocess: PreprocessSpec | None = None
) -> Manifest:
    """A manifest for the pure pipeline tests (Audi A4 and BMW X5 unless ``labels`` given)."""
    labels = labels or [{"make": "Audi", "model": "A4"}, {"make": "BMW", "model": "X5"}]
    return Manifest(
        model_name="m",
        model_version="v1",
        arch="resnet18",
        num_classes=len(labels),
        labels=labels,
        preprocess=preprocess or PreprocessSpec(),
        artifacts=[],
        created_at="2026-11-24T00:00:00Z",
    )


def worker_cli(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m worker ARGS`` with only ``env`` as CARSTREAM_* (the caller's are dropped)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CARSTREAM_")}
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        cwd=REPO,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@dataclass
class Rec:
    """The fields of a kafka ConsumerRecord that the pure pipeline functions read."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list | None = None
    timestamp: int = -1  # ms since the epoch; -1: none, as a record of before Kafka 0.10


class DoneFuture:
    """A finished Future holding ``value`` (what Pending.prepared is in the pure tests)."""

    def __init__(self, value=None):
        self.value = value

    def result(self, timeout=None):
        return self.value


def image_bytes(rng: np.random.Generator, fmt: str = "PNG", size=(48, 64)) -> bytes:
    """A small noisy image of one random colour, encoded as ``fmt``."""
    base = rng.integers(0, 255, size=3)
    pixels = np.clip(base + rng.integers(-40, 40, size=(*size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def build_worker_bundle(work: Path) -> Path:
    """A real fp32 + int8 bundle of a small resnet18 over CLASSES, built by engine_build."""
    from engine_build.build import build_bundle

    torch.manual_seed(0)
    model = build_model("resnet18", len(CLASSES))
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, IMAGE_SIZE, IMAGE_SIZE))
        model.fc.weight.mul_(20.0)  # spread the logits so the four classes all occur
    save_checkpoint(
        work / "ckpt",
        {
            "arch": "resnet18",
            "num_classes": len(CLASSES),
            "classes": CLASSES,
            "level": "model",
            "preprocess": PreprocessSpec.for_image_size(IMAGE_SIZE).model_dump(mode="json"),
            "state_dict": model.state_dict(),
            "epoch": 1,
            "args": {"arch": "resnet18", "dataset": "folder"},
        },
    )
    rng = np.random.default_rng(1)
    for cls in CLASSES:
        (work / "parity" / cls["model"]).mkdir(parents=True)
        for i in range(3):
            (work / "parity" / cls["model"] / f"{i}.png").write_bytes(image_bytes(rng))
    return build_bundle(
        work / "ckpt",
        work / "bundle",
        precisions="fp32,int8",
        parity_data=work / "parity",
        max_batch=16,
        threads=1,
    )


def make_certificates(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A one-day test CA and a server certificate and key for 127.0.0.1 it signed (PEM files:
    ca, cert, key); skips the test without the openssl CLI."""
    import pytest

    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed: cannot make a test certificate")
    ca_key, ca, key, csr, crt = (
        tmp_path / n for n in ("ca.key", "ca.crt", "s.key", "s.csr", "s.crt")
    )

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(ca_key),
        "-out",
        str(ca),
        "-days",
        "1",
        "-subj",
        "/CN=carstream-test-ca",
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(csr),
        "-subj",
        "/CN=127.0.0.1",
    )
    ext = tmp_path / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    run(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca),
        "-CAkey",
        str(ca_key),
        "-CAcreateserial",
        "-out",
        str(crt),
        "-days",
        "1",
        "-extfile",
        str(ext),
    )
    return ca, crt, key


def http_get(url: str, timeout: float = 5) -> tuple[int, str]:
    """(status, body) of a GET; status 0 (and the error) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (32768 when it cannot be read)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port_run(n: int) -> int:
    """A port P with P..P+n-1 all free now (a --processes supervisor's and its children's).

    Picked below the ephemeral range: a port the kernel handed out (bind to 0) is in that range,
    so any outgoing connection of a test running beside (a Kafka client) may take it before the
    process meant to listen there starts, which the demo does only after training (a CI run
    once lost a replica's metrics port that way)."""
    low = _ephemeral_low()
    rng = random.Random()
    for _ in range(200):
        if low - n > 10_000:
            base = rng.randrange(10_000, low - n)
        else:  # an unusual range: take one the kernel hands out
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                base = probe.getsockname()[1]
        held: list[socket.socket] = []
        try:
            for port in range(base, base + n):
                held.append(socket.socket())
                held[-1].bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise RuntimeError(f"no run of {n} free loopback ports")
