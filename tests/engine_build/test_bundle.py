"""A bundle is accepted only as engine_build wrote it: schema, sizes and hashes are verified."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from engine_build.bundle import BundleError, load_bundle
from engine_build.manifest import MANIFEST_FILE, Manifest
from training.checkpoint import load_checkpoint, preprocess_spec_of


@pytest.fixture
def copy_of(bundle_dir, tmp_path) -> Path:
    return Path(shutil.copytree(bundle_dir, tmp_path / "bundle"))


def test_manifest_round_trip(bundle_dir, checkpoint_dir):
    bundle = load_bundle(bundle_dir)
    text = (bundle_dir / MANIFEST_FILE).read_text()
    assert Manifest.model_validate_json(bundle.manifest.model_dump_json()) == bundle.manifest
    assert Manifest.model_validate_json(text) == bundle.manifest
    ckpt = load_checkpoint(checkpoint_dir)
    m = bundle.manifest
    assert m.preprocess == preprocess_spec_of(ckpt)  # the worker preprocesses as eval did
    assert [lb.model for lb in m.labels] == [c["model"] for c in ckpt["classes"]]
    assert m.num_classes == len(m.labels) and m.arch == "resnet18"
    assert (m.batch_profile.min, m.batch_profile.opt, m.batch_profile.max) == (1, 4, 8)
    kinds = {(a.backend, a.precision) for a in m.artifacts}
    assert kinds == {("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("torch", "fp32")}
    assert bundle.artifact("onnxruntime", "int8").file == "model.int8.onnx"
    assert bundle.artifact("tensorrt") is None
    assert bundle.artifact_path(bundle.artifact("torch")).is_file()


@pytest.mark.parametrize("file", ["model.onnx", "model.int8.onnx", "model.pt"])
def test_tampered_artifact_refused(copy_of, file):
    path = copy_of / file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"{file}.*sha256"):
        load_bundle(copy_of)


def test_truncated_artifact_refused(copy_of):
    path = copy_of / "model.onnx"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(BundleError, match=r"model\.onnx is 1000 bytes"):
        load_bundle(copy_of)


def test_missing_artifact_refused(copy_of):
    (copy_of / "model.pt").unlink()
    with pytest.raises(BundleError, match=r"missing.*model\.pt"):
        load_bundle(copy_of)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m.pop("arch"), "arch"),
        (lambda m: m["artifacts"][0].update(sha256="xyz"), "sha256"),
        (lambda m: m.update(schema_version=99), "schema_version 99"),
        (lambda m: m["labels"].pop(), "labels for"),
        (lambda m: m["artifacts"][0].update(file="../../etc/passwd"), "escapes"),
    ],
)
def test_invalid_manifest_refused(copy_of, edit, match):
    path = copy_of / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=match):
        load_bundle(copy_of)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match=r"manifest\.json does not exist"):
        load_bundle(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(BundleError, match="unreadable manifest"):
        load_bundle(tmp_path)
    assert issubclass(BundleError, ValueError)
