"""Read a model bundle and prove it is the one engine_build wrote.

A bundle is a directory holding ``manifest.json`` plus the artifacts it lists; every artifact's
size and sha256 are checked on load so a truncated copy or a tampered file never reaches a worker.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from engine_build.manifest import MANIFEST_FILE, SCHEMA_VERSION, Artifact, Manifest
from training.cli_errors import path_length_problem

PARITY_FILE = "parity.json"
_CHUNK = 1 << 20


class BundleError(ValueError):
    """A bundle that must not be used; the message names the offending file."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed so multi-GB plans do not need to fit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A verified bundle directory and its manifest."""

    path: Path
    manifest: Manifest

    def artifact(self, backend: str, precision: str | None = None) -> Artifact | None:
        """The first artifact for ``backend`` (and ``precision``, when given), else None."""
        for art in self.manifest.artifacts:
            if art.backend == backend and (precision is None or art.precision == precision):
                return art
        return None

    def artifact_path(self, artifact: Artifact) -> Path:
        return self.path / artifact.file

    @property
    def parity(self) -> dict | None:
        """The build's parity report, when the bundle has one."""
        file = self.path / PARITY_FILE
        return json.loads(file.read_text()) if file.is_file() else None


def read_manifest(path: Path) -> Manifest:
    """Parse and validate ``manifest.json``; raise BundleError naming the file otherwise."""
    file = Path(path) / MANIFEST_FILE
    if not file.is_file():
        raise BundleError(f"not a model bundle: {file} does not exist")
    try:
        raw = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"unreadable manifest {file}: {exc}") from exc
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise BundleError(
            f"manifest {file} has schema_version {version}; this build reads {SCHEMA_VERSION}"
        )
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BundleError(f"invalid manifest {file}: {where}: {first['msg']}") from exc
    if len(manifest.labels) != manifest.num_classes:
        raise BundleError(
            f"invalid manifest {file}: {len(manifest.labels)} labels for "
            f"{manifest.num_classes} classes"
        )
    return manifest


def verify_artifact(bundle_dir: Path, artifact: Artifact) -> None:
    """Raise BundleError unless the artifact file exists with the recorded size and sha256."""
    file = Path(bundle_dir) / artifact.file
    if Path(artifact.file).is_absolute() or ".." in Path(artifact.file).parts:
        raise BundleError(f"artifact path escapes the bundle: {artifact.file}")
    if not file.is_file():
        raise BundleError(f"bundle artifact missing: {file}")
    size = file.stat().st_size
    if size != artifact.size_bytes:
        raise BundleError(
            f"bundle artifact {file} is {size} bytes, manifest says {artifact.size_bytes} "
            "(truncated or replaced)"
        )
    if sha256_file(file) != artifact.sha256:
        raise BundleError(f"bundle artifact {file} does not match its sha256 (tampered?)")


def load_bundle(path: Path | str) -> Bundle:
    """Load a bundle, verifying the manifest schema and every artifact's size and hash."""
    path = Path(path)
    if problem := path_length_problem(path):
        raise BundleError(f"model bundle {problem}")
    try:
        is_dir = path.is_dir()
    except OSError as exc:  # what pathlib does not swallow: EACCES on a parent, EIO
        raise BundleError(f"cannot read model bundle {path}: {exc.strerror or exc}") from None
    if not is_dir:
        raise BundleError(f"not a model bundle directory: {path}")
    manifest = read_manifest(path)
    if not manifest.artifacts:
        raise BundleError(f"bundle {path / MANIFEST_FILE} lists no artifacts")
    for artifact in manifest.artifacts:
        verify_artifact(path, artifact)
    return Bundle(path=path.resolve(), manifest=manifest)
