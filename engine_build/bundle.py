"""Read a model bundle and prove it is the one engine_build wrote.

A bundle is a directory holding ``manifest.json`` plus the artifacts it lists; every artifact's
size and sha256 are checked on load so a truncated copy or a tampered file never reaches a worker.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from engine_build.manifest import MANIFEST_FILE, SCHEMA_VERSION, Artifact, Manifest
from training.cli_errors import path_length_problem
from training.json_keys import unique_keys

log = logging.getLogger(__name__)

PARITY_FILE = "parity.json"
_CHUNK = 1 << 20
# a real manifest is a few KB (labels dominate: ~100 bytes a class); anything this large is not
# one, and reading it whole would only spend the worker's memory
MAX_MANIFEST_BYTES = 16 << 20


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

    def read_artifact(self, artifact: Artifact) -> bytes:
        """The artifact's bytes, checked against the manifest's size and sha256 again.

        Engines load from these bytes, not by opening the path a second time: an
        ``engine_build --force`` over the bundle between ``load_bundle`` and the engine's load
        would otherwise pair this manifest's labels with another build's model, silently.
        """
        file = self.artifact_path(artifact)
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise BundleError(f"bundle artifact {file} cannot be read: {exc}") from None
        if len(data) != artifact.size_bytes or hashlib.sha256(data).hexdigest() != artifact.sha256:
            raise BundleError(
                f"bundle artifact {file} changed since its manifest was read (a bundle built "
                "over this one?): start again to load the bundle now in place"
            )
        return data

    @property
    def parity(self) -> dict | None:
        """The build's parity report, when the bundle has a readable one.

        The report is informational (it is not in the manifest nor hashed): a damaged file is a
        WARNING and None, never a reason for the worker to stop.
        """
        file = self.path / PARITY_FILE
        try:
            if not file.is_file():
                return None
            report = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON or UTF-8
            log.warning("ignoring the parity report %s: unreadable (%s)", file, exc)
            return None
        if not isinstance(report, dict):
            log.warning(
                "ignoring the parity report %s: a JSON %s, not an object",
                file,
                type(report).__name__,
            )
            return None
        return report


def read_manifest(path: Path) -> Manifest:
    """Parse and validate ``manifest.json``; raise BundleError naming the file otherwise."""
    file = Path(path) / MANIFEST_FILE
    if not file.is_file():
        raise BundleError(f"not a model bundle: {file} does not exist")
    try:
        size = file.stat().st_size
    except OSError as exc:
        raise BundleError(f"unreadable manifest {file}: {exc}") from exc
    if size > MAX_MANIFEST_BYTES:
        raise BundleError(
            f"manifest {file} is {size} bytes, at most {MAX_MANIFEST_BYTES} (16 MiB): not a "
            "bundle manifest"
        )
    try:
        with open(file, encoding="utf-8") as f:
            text = f.read(MAX_MANIFEST_BYTES + 1)  # bounded even if the file grows meanwhile
        if len(text) > MAX_MANIFEST_BYTES:
            raise ValueError(f"larger than {MAX_MANIFEST_BYTES} bytes")
        # ValueError: bad UTF-8 or JSON, or an integer over Python's int_max_str_digits;
        # RecursionError: arrays or objects nested thousands deep
        raw = json.loads(text, object_pairs_hook=unique_keys)
    except (OSError, ValueError, RecursionError) as exc:
        raise BundleError(f"unreadable manifest {file}: {exc}") from exc
    if isinstance(raw, dict):
        # engine_build always writes it (build.py tells a bundle from other folders by it)
        if "schema_version" not in raw:
            raise BundleError(
                f"invalid manifest {file}: no schema_version (engine_build writes one in every "
                "manifest)"
            )
        _check_schema_version(file, raw["schema_version"])
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "manifest"  # `[1, 2]`: the whole
        raise BundleError(f"invalid manifest {file}: {where}: {first['msg']}") from exc
    if len(manifest.labels) != manifest.num_classes:
        raise BundleError(
            f"invalid manifest {file}: {len(manifest.labels)} labels for "
            f"{manifest.num_classes} classes"
        )
    return manifest


def _check_schema_version(file: Path, version: object) -> None:
    """A JSON integer in 1..SCHEMA_VERSION; pydantic's lax mode would take "9", 2.0 or true."""
    shown = json.dumps(version)
    shown = shown if len(shown) <= 40 else f"{shown[:40]}..."
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise BundleError(
            f"manifest {file} has schema_version {shown}: must be an integer 1..{SCHEMA_VERSION}"
        )
    if version > SCHEMA_VERSION:
        raise BundleError(
            f"manifest {file} has schema_version {shown}, newer than this worker understands "
            f"(it reads {SCHEMA_VERSION})"
        )


def verify_artifact(bundle_dir: Path, artifact: Artifact) -> None:
    """Raise BundleError unless the artifact file exists with the recorded size and sha256."""
    file = Path(bundle_dir) / artifact.file
    if Path(artifact.file).is_absolute() or ".." in Path(artifact.file).parts:
        raise BundleError(f"artifact path escapes the bundle: {artifact.file}")
    try:  # a symlink (to the file or a folder above it) may lead anywhere: follow them all
        real, root = file.resolve(), Path(bundle_dir).resolve()
    # a symlink loop: RuntimeError before Python 3.13; ValueError: a NUL (the schema refuses it)
    except (OSError, RuntimeError, ValueError) as exc:
        raise BundleError(f"bundle artifact {file} cannot be resolved: {exc}") from None
    if not real.is_relative_to(root):
        raise BundleError(
            f"artifact path escapes the bundle through a symlink: {artifact.file} -> {real}"
        )
    try:  # is_file swallows ENOENT, not ENAMETOOLONG, EACCES or EIO
        is_file = file.is_file()
        size = file.stat().st_size if is_file else None
    except (OSError, ValueError) as exc:
        raise BundleError(f"bundle artifact {file} cannot be read: {exc}") from None
    if size is None:
        raise BundleError(f"bundle artifact missing: {file}")
    if size != artifact.size_bytes:
        raise BundleError(
            f"bundle artifact {file} is {size} bytes, manifest says {artifact.size_bytes} "
            "(truncated or replaced)"
        )
    try:
        digest = sha256_file(file)
    except OSError as exc:  # EACCES, EIO
        raise BundleError(f"bundle artifact {file} cannot be read: {exc}") from None
    if digest != artifact.sha256:
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
