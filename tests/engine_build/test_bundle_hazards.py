"""Bundles damaged or crafted past what the size and hash checks see: a garbage parity.json, a
schema_version that is not an integer, artifacts that leave the bundle through a symlink, and
manifests that made json raise something other than a decode error."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest

from engine_build import bundle as bundle_module
from engine_build.bundle import MAX_MANIFEST_BYTES, PARITY_FILE, BundleError, load_bundle
from engine_build.manifest import MANIFEST_FILE


@pytest.fixture
def copy_of(bundle_dir, tmp_path) -> Path:
    return Path(shutil.copytree(bundle_dir, tmp_path / "bundle"))


def edit_manifest(bundle: Path, **fields) -> None:
    path = bundle / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest.update(fields)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("garbage", "problem"),
    [
        (b"{trunc", "unreadable"),
        (b'{"reference": "pytorch-fp32", "artifacts": {"onnx', "unreadable"),
        (b"\xff\xfe\x00\x80 not utf-8", "unreadable"),
        (b"", "unreadable"),
        (b"[" * 100_000, "unreadable"),
        (b"[1, 2]", "a JSON list, not an object"),
        (b'"parity"', "a JSON str, not an object"),
        (b"null", "a JSON NoneType, not an object"),
    ],
)
def test_a_damaged_parity_report_is_a_warning_not_a_crash(copy_of, caplog, garbage, problem):
    """worker/run.py reads bundle.parity for every backend: json.loads raised through it and
    the worker died at start over an informational file."""
    (copy_of / PARITY_FILE).write_bytes(garbage)
    bundle = load_bundle(copy_of)  # parity.json is not an artifact: the bundle still loads
    with caplog.at_level(logging.WARNING, logger="engine_build.bundle"):
        assert bundle.parity is None
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert str(copy_of / PARITY_FILE) in record.getMessage()
    assert problem in record.getMessage()


def test_an_intact_parity_report_is_read_without_warning(bundle_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="engine_build.bundle"):
        assert "onnxruntime-fp32" in load_bundle(bundle_dir).parity["artifacts"]
    assert not caplog.records


@pytest.mark.parametrize(
    ("version", "shown"),
    [("9", '"9"'), (2.0, "2.0"), (0, "0"), (-3, "-3"), (True, "true")],
)
def test_schema_version_must_be_an_integer_in_range(copy_of, version, shown):
    """pydantic's lax mode turned "9", 2.0 and true into ints, past the newer-version check."""
    edit_manifest(copy_of, schema_version=version)
    message = f"schema_version {shown}: must be an integer 1..1"
    with pytest.raises(BundleError, match=re.escape(message)) as caught:
        load_bundle(copy_of)
    assert str(copy_of / MANIFEST_FILE) in str(caught.value)


def test_a_newer_schema_version_says_so(copy_of):
    edit_manifest(copy_of, schema_version=2)
    with pytest.raises(BundleError, match="schema_version 2, newer than this worker understands"):
        load_bundle(copy_of)


def move_outside(bundle: Path, outside: Path) -> Path:
    """Move model.pt out of the bundle, unchanged: its size and sha256 still match the manifest."""
    outside.mkdir()
    return Path(shutil.move(bundle / "model.pt", outside / "model.pt"))


def test_an_artifact_symlinked_out_of_the_bundle_is_refused(copy_of, tmp_path):
    """Only the path text was checked ('..', absolute): a symlink led anywhere on the host."""
    target = move_outside(copy_of, tmp_path / "outside")
    (copy_of / "model.pt").symlink_to(target)
    with pytest.raises(BundleError, match=r"escapes the bundle through a symlink: model\.pt"):
        load_bundle(copy_of)


def test_an_artifact_under_a_symlinked_folder_is_refused(copy_of, tmp_path):
    move_outside(copy_of, tmp_path / "outside")
    (copy_of / "sub").symlink_to(tmp_path / "outside", target_is_directory=True)
    manifest = json.loads((copy_of / MANIFEST_FILE).read_text())
    for art in manifest["artifacts"]:
        if art["file"] == "model.pt":
            art["file"] = "sub/model.pt"
    (copy_of / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"escapes the bundle through a symlink: sub/model\.pt"):
        load_bundle(copy_of)


def test_symlinks_that_stay_inside_the_bundle_are_fine(copy_of, tmp_path):
    """A bundle reached through a link (a deploy's `current`), or an artifact linked to a file
    of the same bundle, never leaves it."""
    (copy_of / "weights").mkdir()
    shutil.move(copy_of / "model.pt", copy_of / "weights" / "model.pt")
    (copy_of / "model.pt").symlink_to(Path("weights") / "model.pt")
    current = tmp_path / "current"
    current.symlink_to(copy_of, target_is_directory=True)
    assert load_bundle(current).artifact_path(load_bundle(current).artifact("torch")).is_file()


def test_an_integer_with_5000_digits_is_a_bundle_error(copy_of):
    """json.loads raised ValueError (Python's int_max_str_digits), not JSONDecodeError."""
    path = copy_of / MANIFEST_FILE
    text = path.read_text()
    path.write_text(re.sub(r'"num_classes": \d+', '"num_classes": ' + "7" * 5000, text))
    with pytest.raises(BundleError, match=r"unreadable manifest .*4300 digits"):
        load_bundle(copy_of)


def test_a_manifest_nested_100k_deep_is_a_bundle_error(copy_of):
    """json.loads raised RecursionError."""
    (copy_of / MANIFEST_FILE).write_text('{"labels": ' + "[" * 100_000)
    with pytest.raises(BundleError, match=r"unreadable manifest .*recursion"):
        load_bundle(copy_of)


def test_a_manifest_over_16_mib_is_refused_before_it_is_read(copy_of, monkeypatch):
    path = copy_of / MANIFEST_FILE
    with open(path, "r+b") as f:
        f.truncate(MAX_MANIFEST_BYTES + 1)  # sparse: costs no disk
    monkeypatch.setattr(bundle_module, "open", lambda *a, **k: pytest.fail("read"), raising=False)
    message = f"manifest {path} is {MAX_MANIFEST_BYTES + 1} bytes, at most {MAX_MANIFEST_BYTES}"
    with pytest.raises(BundleError, match=re.escape(message)):
        load_bundle(copy_of)
    assert MAX_MANIFEST_BYTES == 16 * 1024 * 1024


def test_an_artifact_replaced_after_load_is_refused_not_served_under_old_labels(copy_of):
    """A rebuild over the bundle between load_bundle and the engine's load (a replica starting
    during a redeploy) must not pair the old manifest's labels with the new model: the engines
    load the bytes they checked, and the bytes no longer match."""
    from engine_build.runtime.onnxruntime_engine import OnnxRuntimeEngine
    from engine_build.runtime.torch_model import load_torch_model

    loaded = load_bundle(copy_of)
    fp32 = loaded.artifact("onnxruntime", "fp32")
    int8 = loaded.artifact("onnxruntime", "int8")
    torch_artifact = loaded.artifact("torch")
    assert fp32 and int8 and torch_artifact
    # another build's model in its place: a valid ONNX file that ONNX Runtime would load
    loaded.artifact_path(fp32).write_bytes(loaded.artifact_path(int8).read_bytes())
    with pytest.raises(BundleError, match="changed since its manifest was read"):
        OnnxRuntimeEngine(loaded, "fp32")
    pt = loaded.artifact_path(torch_artifact)
    pt.write_bytes(pt.read_bytes() + b"\0")
    with pytest.raises(BundleError, match="changed since its manifest was read"):
        load_torch_model(loaded)
    assert OnnxRuntimeEngine(loaded, "int8").max_batch == 8  # untouched artifacts still load
