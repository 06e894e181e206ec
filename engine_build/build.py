"""Checkpoint -> verified model bundle: export, quantise, build plans, prove parity, install.

``build_bundle`` is the whole stage as one function (the CLI in ``__main__`` is a thin adapter):
every artifact is checked against the PyTorch FP32 model on held-out images before the bundle
directory appears, and a failed gate leaves no bundle behind.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError

from engine_build import heldout
from engine_build.bundle import (
    PARITY_FILE,
    Bundle,
    BundleError,
    load_bundle,
    read_manifest,
    sha256_file,
)
from engine_build.decode_parity import (
    GPU_DECODE_AGREEMENT,
    GPU_DECODE_ENTRY,
    gate_applies,
    gate_gpu_decode,
    gpu_decode_entry,
)
from engine_build.manifest import (
    MANIFEST_FILE,
    MAX_BATCH,
    MAX_LABEL_CHARS,
    Artifact,
    BatchProfile,
    Label,
    Manifest,
    crop_problem,
    label_text_problem,
    labels_problem,
)
from engine_build.onnx_export import MAX_OPSET, MIN_OPSET, HalfPrecision, export_onnx
from engine_build.parity import (
    ParityDataError,
    ParitySet,
    agreement_passes,
    allowed_flips,
    batch1_report,
    finite_rows,
    parity_report,
    run_batched,
)
from engine_build.runtime.onnxruntime_engine import OnnxRuntimeEngine
from training.checkpoint import (
    CHECKPOINT_FILE,
    LABELS_FILE,
    CheckpointError,
    current_umask,
    fsync_dir,
    load_checkpoint,
    model_from_checkpoint,
    preprocess_spec_of,
    recorded_crop,
)
from training.cli import usable_cpus
from training.preprocessing import PreprocessSpec

log = logging.getLogger(__name__)

PRECISIONS = ("fp16", "fp32", "int8", "bf16")
BUILD_BACKENDS = ("auto", "tensorrt", "onnxruntime")
ONNX_FILE, INT8_FILE, FP16_ONNX_FILE = "model.onnx", "model.int8.onnx", "model.fp16.onnx"
TORCH_FILE, PLAN_FILE = "model.pt", "model.fp16.plan"
BATCH1_IMAGES = 8  # parity images also run one at a time through every artifact
# --threads above this many per usable CPU only oversubscribes the cores (ONNX Runtime's spinning
# pool: 1024 threads on 2 CPUs made a 9 s build take 100 s; 100000 never finished)
THREADS_PER_CPU = 4
LEVELS = ("model", "make")
# the default --max-prob-diff of FP32 artifacts: ONNX Runtime FP32 matches PyTorch to ~1e-7 in
# probability (the limit leaves room for TF32, were an FP32 path ever run on a GPU), while a wrong
# export that keeps every top-1 (fc weights x5, a noisy conv1) moved them by 0.23 and 0.034 in
# the tests; reduced precisions are held to a limit only when --max-prob-diff is given (their
# spread depends on the model)
FP32_MAX_PROB_DIFF = 0.01
# each class entry's manifest fields and what Label accepts in them, for one-line refusals
LABEL_FIELDS = {
    "make": "text",
    "model": "text",
    "make_id": "an integer, text or absent",
    "model_id": "an integer, text or absent",
}


def max_threads() -> int:
    """The largest --threads accepted here: the parity runs happen on this machine, and more
    threads than its CPUs can only slow them down."""
    return THREADS_PER_CPU * usable_cpus()


def check_label_text(flag: str, value: str | None) -> None:
    """Refuse a --model-name / --model-version that is empty, only whitespace, longer than
    MAX_LABEL_CHARS, or holds a control character (None: the default is used); the manifest's
    schema holds the same rule (manifest.label_text_problem)."""
    if value is None:
        return
    problem = label_text_problem(value)
    if problem is None:
        return
    shown = f"{value[:40]!r}..." if len(value) > MAX_LABEL_CHARS else repr(value)
    raise BuildError(f"{flag} {shown}: {problem}")


class BuildError(ValueError):
    """Bad build input (checkpoint, options, parity data); the message names it."""


class ParityGateError(RuntimeError):
    """An artifact disagrees with the PyTorch model more than its threshold allows."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class BuildOptions:
    precisions: tuple[str, ...] = ("fp16", "fp32")
    backends: tuple[str, ...] = ("auto",)
    min_batch: int = 1
    opt_batch: int | None = None  # default: 32, clamped into [min_batch, max_batch]
    max_batch: int = 64
    parity_data: Path | None = None
    data_dir: Path | None = None  # where the checkpoint's dataset is now, if it moved
    parity_images: int = 256
    calibration_images: int = 128
    workspace_gb: float = 4.0
    timing_cache: Path | None = None
    fp32_agreement: float = 0.999
    fp16_agreement: float = 0.995
    int8_agreement: float = 0.0
    bf16_agreement: float = 0.98
    gpu_decode_agreement: float = GPU_DECODE_AGREEMENT
    max_prob_diff: float | None = None  # None: FP32_MAX_PROB_DIFF for fp32, unchecked otherwise
    model_name: str | None = None
    model_version: str | None = None
    opset: int = 17
    threads: int | None = None
    overwrite: bool = False

    @property
    def opt(self) -> int:
        """--opt-batch, else 32 clamped into [min, max]: ``--min-batch 48`` alone must not
        make a default optimum below its own minimum."""
        if self.opt_batch is not None:
            return self.opt_batch
        return max(self.min_batch, min(32, self.max_batch))

    @property
    def profile(self) -> BatchProfile:
        return BatchProfile(min=self.min_batch, opt=self.opt, max=self.max_batch)

    def prob_limit(self, precision: str) -> float | None:
        """The largest softmax-probability difference an artifact of ``precision`` may show
        against PyTorch FP32 (None: not checked, only its top-1 agreement)."""
        if self.max_prob_diff is not None:
            return self.max_prob_diff
        return FP32_MAX_PROB_DIFF if precision == "fp32" else None

    def validate(self) -> None:
        bad = [p for p in self.precisions if p not in PRECISIONS]
        if bad or not self.precisions:
            raise BuildError(
                f"--precision: unknown {', '.join(bad) or '(empty)'}; "
                f"choose from {', '.join(PRECISIONS)}"
            )
        bad = [b for b in self.backends if b not in BUILD_BACKENDS]
        if bad or not self.backends:
            raise BuildError(
                f"--backends: unknown {', '.join(bad) or '(empty)'}; "
                f"choose from {', '.join(BUILD_BACKENDS)}"
            )
        opt = self.opt
        if not 1 <= self.min_batch <= opt <= self.max_batch:
            raise BuildError(
                f"batch profile must satisfy 1 <= min <= opt <= max; got "
                f"{self.min_batch}/{opt}/{self.max_batch}"
            )
        if self.max_batch > MAX_BATCH:
            raise BuildError(
                f"--max-batch {self.max_batch}: must be <= {MAX_BATCH} (the worker's largest "
                "max_batch)"
            )
        check_label_text("--model-name", self.model_name)
        check_label_text("--model-version", self.model_version)
        for flag in (
            "fp32_agreement",
            "fp16_agreement",
            "int8_agreement",
            "bf16_agreement",
            "gpu_decode_agreement",
        ):
            if not 0.0 <= getattr(self, flag) <= 1.0:
                raise BuildError(
                    f"--{flag.replace('_', '-')} must be in [0, 1]; got {getattr(self, flag)}"
                )
        limit = self.max_prob_diff
        if limit is not None and not 0.0 <= limit <= 1.0:  # NaN fails this too
            raise BuildError(f"--max-prob-diff must be in [0, 1]; got {limit}")
        if self.threads is not None and self.threads < 1:
            raise BuildError(f"--threads must be >= 1; got {self.threads}")
        if self.threads is not None and self.threads > max_threads():
            raise BuildError(
                f"--threads {self.threads}: at most {max_threads()} ({THREADS_PER_CPU} per CPU, "
                f"{usable_cpus()} CPUs here); more only oversubscribes the parity runs"
            )
        if not (self.workspace_gb > 0 and math.isfinite(self.workspace_gb)):
            raise BuildError(f"--workspace-gb must be > 0; got {self.workspace_gb}")
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise BuildError(
                f"--opset must be in {MIN_OPSET}..{MAX_OPSET} (int8 QDQ needs >= {MIN_OPSET}; "
                f"torch's TorchScript exporter supports <= {MAX_OPSET}); got {self.opset}"
            )
        if self.parity_images < 1:
            raise BuildError(f"--parity-images must be >= 1; got {self.parity_images}")
        if self.parity_data is not None and self.data_dir is not None:
            raise BuildError(
                "--data and --parity-data exclude each other: --data reads the held-out split "
                "of the checkpoint's dataset, --parity-data a folder of your own"
            )
        if "int8" in self.precisions and self.calibration_images < 1:
            raise BuildError(
                f"--calibration-images must be >= 1 with --precision int8; "
                f"got {self.calibration_images}"
            )
        if "tensorrt" in self.backends and "fp16" not in self.precisions:
            # the plan is the fp16 artifact: demanding it without fp16 would build nothing
            raise BuildError(
                f"--backends tensorrt demands the FP16 TensorRT plan, but --precision is "
                f"{','.join(self.precisions)}; add fp16"
            )


def default_model_version(ckpt: dict) -> str:
    """``epoch<N>`` with N the epochs trained, as the training log counts them (``epoch 8/8``).

    The checkpoint stores the 0-based index of its last epoch, which read as a version is one
    less than every other place that counts epochs.
    """
    epoch = ckpt.get("epoch")
    return f"epoch{int(epoch) + 1}" if isinstance(epoch, int) and epoch >= 0 else "epoch0"


def _as_tuple(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    return tuple(value)  # type: ignore[arg-type]


def _artifact(bundle_dir: Path, file: str, backend: str, precision: str, **extra) -> Artifact:
    path = bundle_dir / file
    return Artifact(
        backend=backend,
        precision=precision,
        file=file,
        sha256=sha256_file(path),
        size_bytes=path.stat().st_size,
        **extra,
    )


def _gate(
    name: str, report: dict, threshold: float, max_prob_diff: float | None = None
) -> list[str]:
    """Record the gate's verdict in ``report``; return why it failed (empty when it passed).

    An artifact passes when its top-1 agreement reaches ``threshold``, every logit it gave is
    finite, images run one at a time answer like the batched run (same threshold), and, when
    ``max_prob_diff`` is given, no softmax probability, batched or at batch 1, is further than
    that from PyTorch's: top-1 alone passes an artifact that keeps every answer but moves every
    confidence (and so which posts read as low confidence).
    """
    n = report["n_images"]
    failures = []
    if report["non_finite_logits"]:
        failures.append(f"{report['non_finite_logits']} non-finite logits (NaN/inf) on {n} images")
    if not agreement_passes(report["top1_agreement"], n, threshold):
        diff = report["max_abs_logit_diff"]
        failures.append(
            f"top-1 agreement {report['top1_agreement']:.4f} < {threshold} on {n} images "
            f"(at most {allowed_flips(threshold, n)} may flip; "
            f"max |logit diff| {'n/a' if diff is None else f'{diff:.4g}'})"
        )
    prob = report.get("max_abs_prob_diff")
    if max_prob_diff is not None and prob is not None and prob > max_prob_diff:
        failures.append(
            f"max |probability diff| {prob:.4g} > {max_prob_diff} (--max-prob-diff) on {n} "
            f"images (top-1 agreement {report['top1_agreement']:.4f})"
        )
    one = report.get("batch1")
    if one and one["non_finite_logits"]:
        failures.append(
            f"batch 1 gives {one['non_finite_logits']} non-finite logits (NaN/inf) on "
            f"{one['n_images']} images"
        )
    if one and not agreement_passes(one["top1_agreement_with_batched"], one["n_images"], threshold):
        failures.append(
            f"batch 1 top-1 agreement with the batched run "
            f"{one['top1_agreement_with_batched']:.4f} < {threshold} on {one['n_images']} images"
        )
    one_prob = one.get("max_abs_prob_diff") if one else None
    if max_prob_diff is not None and one_prob is not None and one_prob > max_prob_diff:
        failures.append(
            f"batch 1 max |probability diff| {one_prob:.4g} > {max_prob_diff} (--max-prob-diff) "
            f"on {one['n_images']} images"
        )
    report["gate"] = {
        "min_top1_agreement": threshold,
        "allowed_flips": allowed_flips(threshold, n),
        "max_prob_diff": max_prob_diff,
        "passed": not failures,
        "failures": failures,
    }
    log.info(
        "parity %s: agreement %.4f (gate %.4f), max|dprob| %s (gate %s), max|dlogit| %s, "
        "non-finite %d, n=%d%s",
        name,
        report["top1_agreement"],
        threshold,
        prob,
        max_prob_diff,
        report["max_abs_logit_diff"],
        report["non_finite_logits"],
        n,
        f"; FAILED: {'; '.join(failures)}" if failures else "",
    )
    return failures


def _tensorrt_wanted(opts: BuildOptions) -> str | None:
    """None when a TensorRT plan should be built, else why not (raises if it was demanded)."""
    if "fp16" not in opts.precisions:
        return "fp16 not requested"
    if "tensorrt" not in opts.backends and "auto" not in opts.backends:
        return "tensorrt backend not requested"
    from engine_build.tensorrt_build import tensorrt_available

    why = tensorrt_available()
    if why and "tensorrt" in opts.backends:
        raise BuildError(f"--backends tensorrt: cannot build a TensorRT plan here: {why}")
    return why


# keys every bundle manifest has and a web app's or a package's manifest.json does not
BUNDLE_KEYS = frozenset({"model_name", "labels", "artifacts"})
SHOWN_FOREIGN = 5  # paths named in a refusal, then a count


def _looks_like_bundle(path: Path) -> bool:
    """Whether ``path``'s manifest.json is a JSON object with a bundle manifest's keys (a web
    app's {"schema_version": 2, "icons": []} is not); valid or not."""
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
    except (OSError, ValueError, RecursionError):  # RecursionError: '[' nested 100k deep
        return False
    return isinstance(manifest, dict) and manifest.keys() >= BUNDLE_KEYS


def _foreign_paths(out_dir: Path, manifest: Manifest) -> list[str]:
    """What under ``out_dir`` a build never writes there: anything but manifest.json,
    parity.json and the manifest's artifacts (a symlink counts as itself, never followed)."""
    own = {MANIFEST_FILE, PARITY_FILE, *(Path(a.file).as_posix() for a in manifest.artifacts)}
    folders = {p.as_posix() for name in own for p in Path(name).parents if p != Path(".")}
    foreign = []
    for dirpath, dirs, files in os.walk(out_dir, onerror=lambda exc: foreign.append(exc.filename)):
        rel = Path(dirpath).relative_to(out_dir)
        for name in sorted(dirs):
            if (rel / name).as_posix() not in folders or os.path.islink(Path(dirpath, name)):
                foreign.append((rel / name).as_posix() + "/")
                dirs.remove(name)  # not walked: it is refused whole
        foreign.extend(p for p in ((rel / n).as_posix() for n in files) if p not in own)
    return sorted(str(p) for p in foreign)


def _check_out(out_dir: Path, overwrite: bool) -> None:
    """An --out the build may fill: absent, empty, or (with --force) an existing bundle.

    --force deletes what --out names, so it never touches a directory that is not a bundle: a
    checkpoint, a data set or a home directory given as --out by mistake is refused, not erased;
    and so is a bundle folder holding anything a build does not write there (notes, a timing
    cache, another bundle), or one whose manifest cannot be read (which files are its own is
    then unknown: the user removes it).
    """
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    if not _looks_like_bundle(out_dir):
        raise BuildError(
            f"--out {out_dir} exists and is not empty, and is not a bundle (no bundle "
            f"{MANIFEST_FILE}): --force replaces only a bundle; choose another --out"
        )
    if not overwrite:
        raise BuildError(f"--out {out_dir} exists and is not empty (pass --force to replace)")
    try:
        manifest = read_manifest(out_dir)
    except BundleError as exc:
        raise BuildError(
            f"--out {out_dir} holds a bundle whose manifest cannot be read ({exc}), so which "
            "files are its own is unknown: --force does not replace it; remove it yourself or "
            "choose another --out"
        ) from None
    foreign = _foreign_paths(out_dir, manifest)
    if foreign:
        shown = ", ".join(foreign[:SHOWN_FOREIGN])
        more = len(foreign) - SHOWN_FOREIGN
        raise BuildError(
            f"--out {out_dir} holds files that are not its bundle's: {shown}"
            f"{f' and {more} more' if more > 0 else ''}; --force replaces only a bundle's own "
            "files: move them out or choose another --out"
        )


def _check_not_checkpoint(out_dir: Path, checkpoint_dir: Path) -> None:
    """Refuse an --out that is, contains or lies inside the checkpoint's directory."""
    home = checkpoint_dir if checkpoint_dir.is_dir() else checkpoint_dir.parent
    out, ckpt = out_dir.resolve(), home.resolve()
    if out == ckpt:
        where = "is"
    elif out in ckpt.parents:
        where = "contains"
    elif ckpt in out.parents:
        where = "is inside"
    else:
        return
    raise BuildError(
        f"--out {out_dir} {where} the checkpoint directory {home}; write the bundle elsewhere"
    )


def _check_timing_cache_outside(out_dir: Path, timing_cache: Path | None) -> None:
    """Refuse a --timing-cache inside --out before the build: the install needs --out empty or
    the bundle's own files alone, so such a cache failed the build after TensorRT's long run."""
    if timing_cache is None:
        return
    out = out_dir.resolve()
    if out == timing_cache.resolve() or out in timing_cache.resolve().parents:
        raise BuildError(
            f"--timing-cache {timing_cache} is inside --out {out_dir}, which holds only the "
            "bundle's files; keep the cache elsewhere (it outlives bundles: one per GPU type)"
        )


def resolved(flag: str, path: Path) -> Path:
    """``path`` made absolute with its symlinks followed; a symlink loop is a BuildError naming
    the flag, not Path.resolve's RuntimeError (OSError from Python 3.13)."""
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError) as exc:
        raise BuildError(f"{flag} {path}: cannot be resolved ({exc})") from None


def failed_report_path(out_dir: Path) -> Path:
    """Where a failed gate's report goes: ``<out>.parity-failed.json`` beside --out, named from
    the resolved path so that ``--out .`` (which has no name) works too."""
    target = resolved("--out", out_dir)
    return target.with_name(f"{target.name}.parity-failed.json")


def checkpoint_labels(ckpt: dict, source: Path) -> tuple[list[Label], str]:
    """The manifest's labels and level, checked before any expensive work.

    ``load_checkpoint`` accepts a ``level`` of None and class entries of any shape; the manifest
    does not, and would otherwise fail with a pydantic traceback (or write names no worker can
    serve: a line break, a lone surrogate, two classes alike) after the export and parity runs.
    """
    level = ckpt.get("level", "model")
    if level not in LEVELS:
        raise BuildError(f"checkpoint {source}: level {level!r} is not one of {', '.join(LEVELS)}")
    labels = []
    for i, c in enumerate(ckpt["classes"]):
        try:
            labels.append(Label(**{k: c.get(k) for k in LABEL_FIELDS}))
        except ValidationError as exc:
            error = exc.errors()[0]
            field = str(error["loc"][0])
            if error["type"] == "value_error":  # a name Label's rules refuse: say which rule
                reason = str(error["ctx"]["error"])
                raise BuildError(f"checkpoint {source}: classes[{i}].{field} {reason}") from None
            raise BuildError(
                f"checkpoint {source}: classes[{i}].{field} is "
                f"{repr(c[field]) if field in c else 'missing'}, must be "
                f"{LABEL_FIELDS[field]}"
            ) from None
    if problem := labels_problem(labels, level, where="classes"):
        raise BuildError(f"checkpoint {source}: {problem}")
    return labels, level


def _warn_about_labels_file(ckpt: dict, labels_file: Path) -> None:
    """WARNING when the ``labels.json`` beside the checkpoint no longer matches its class list.

    Training writes both from one list; the bundle's labels come from ``checkpoint.pt`` alone.
    A ``labels.json`` edited by hand (to rename a class, say) would otherwise look as if it had
    been taken into the bundle.
    """
    if not labels_file.is_file():
        return
    try:
        written = json.loads(labels_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        log.warning(
            "%s is unreadable (%s); the bundle's labels come from the checkpoint", labels_file, exc
        )
        return
    classes = ckpt["classes"]
    if not isinstance(written, dict) or len(written) != len(classes):
        size = len(written) if isinstance(written, dict) else type(written).__name__
        log.warning(
            "%s has %s entries, the checkpoint %d classes; the bundle's labels come from the "
            "checkpoint",
            labels_file,
            size,
            len(classes),
        )
        return
    for i, c in enumerate(classes):
        entry = written.get(str(i))
        if not isinstance(entry, dict) or any(entry.get(k) != c.get(k) for k in LABEL_FIELDS):
            log.warning(
                "%s differs from the checkpoint's class list (first at index %d: %r there, %r "
                "in the checkpoint); the bundle's labels come from the checkpoint, labels.json "
                "is not read",
                labels_file,
                i,
                entry,
                {k: c.get(k) for k in LABEL_FIELDS},
            )
            return


def _open_modes(root: Path) -> None:
    """Give the bundle the modes a plain mkdir/open would have (0o777/0o666 less the umask).

    mkdtemp makes the build folder 0700 (and a helper's mkstemp makes files 0600): renamed into
    place as is, a worker running as another uid (the image's 10001) could not read the bundle.
    """
    mask = current_umask()
    for dirpath, _dirs, files in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in files:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def _fill(tmp: Path, target: Path) -> None:
    """Move the finished files into an existing empty --out, which is used as is (it may be the
    shell's working directory or a mount point): manifest.json goes last, so a reader sees no
    bundle until every artifact is in place."""
    names = [*sorted(p.name for p in tmp.iterdir() if p.name != MANIFEST_FILE), MANIFEST_FILE]
    moved = []
    try:
        for name in names:
            if name == MANIFEST_FILE:  # a move across file systems is an unsynced copy
                _fsync_tree(target)
            moved.append(name)  # before the move: a copy across file systems may stop halfway
            shutil.move(tmp / name, target / name)
    except BaseException:
        for name in moved:  # never leave a half bundle that a rerun would refuse as foreign
            (target / name).unlink(missing_ok=True)
        raise
    _fsync_tree(target)


def _empty_bundle(target: Path) -> None:
    """Remove a bundle's files from its directory (checked to be a bundle by ``_check_out``)."""
    (target / MANIFEST_FILE).unlink(missing_ok=True)
    for child in target.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every folder (``root`` last): the renames that
    install the bundle must not reach the disk before the data they name (after a power loss
    --out would hold empty or torn artifacts under a valid manifest)."""
    dirs = []
    for dirpath, _dirs, files in os.walk(root):
        dirs.append(dirpath)
        for name in files:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for dirpath in reversed(dirs):
        fsync_dir(Path(dirpath))


def _install(tmp: Path, target: Path, overwrite: bool) -> None:
    """Move the finished bundle into place (``target`` resolved); a reader never sees a
    half-written bundle."""
    if target.exists():
        _check_out(target, overwrite)  # again: --out may have changed during the build
        if target.is_dir() and not any(target.iterdir()):
            _fill(tmp, target)
            return
        if target == Path.cwd().resolve() or os.path.ismount(target):
            # renaming it away would leave the shell in a deleted directory (or fail: EBUSY on
            # a mount point): empty the old bundle in place, its manifest first so no reader
            # takes the rest for a bundle, then fill it
            _empty_bundle(target)
            _fill(tmp, target)
            return
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            _restore(old, target)  # --out must still hold the old bundle, not nothing
            raise
        fsync_dir(target.parent)  # the new bundle is durable before the old one goes
        shutil.rmtree(old, ignore_errors=True)
        return
    os.replace(tmp, target)
    fsync_dir(target.parent)


def _restore(old: Path, target: Path) -> None:
    """Rename the bundle moved aside back to ``target`` after a failed install; if even that
    fails, say where it is (a hidden sibling) rather than lose it silently."""
    try:
        os.replace(old, target)
    except OSError as exc:
        log.error("could not put the old bundle back at %s; it is at %s (%s)", target, old, exc)
        return
    fsync_dir(target.parent)


def _warn_about_crop(ckpt: dict, source: Path, parity_data: Path | None) -> str:
    """The crop the checkpoint was trained with; WARNING when it is not the whole photo.

    A model trained on bounding-box crops is served whole photos (posts carry no boxes), while
    its default parity images are box crops: parity.json then overstates its accuracy in service.
    """
    crop = recorded_crop(ckpt)
    if crop != "full":
        measured = (
            "on the images in --parity-data"
            if parity_data is not None
            else f"on {crop} crops of the held-out split"
        )
        log.warning(
            "checkpoint %s was trained with --crop %s, but the worker classifies whole photos "
            "(posts carry no boxes): parity is measured %s, and accuracy on real posts may be "
            "much lower; retrain with --crop full to serve whole photos",
            source,
            crop,
            measured,
        )
    return crop


def build_bundle(checkpoint_dir: Path | str, out_dir: Path | str, **options) -> Path:
    """Build a bundle from ``checkpoint_dir`` into ``out_dir``; options as in BuildOptions.

    Raises BuildError for bad input and ParityGateError when an artifact fails its gate.
    """
    for key in ("precisions", "backends"):
        if key in options:
            options[key] = _as_tuple(options[key])
    try:
        opts = BuildOptions(**options)
    except TypeError as exc:
        raise BuildError(f"build_bundle: {exc}") from exc
    opts.validate()
    if "bf16" in opts.precisions:
        from engine_build.runtime.torch_cpu import native_bf16

        if native_bf16() is None:
            raise BuildError(
                "--precision bf16: this CPU has neither AMX nor AVX-512 BF16, so the torch-cpu "
                "bf16 engine cannot be checked here; build on the CPU type the workers run on"
            )
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    resolved("--checkpoint", checkpoint_dir)
    target = resolved("--out", out_dir)  # `.` has no name nor a parent of its own
    # first: an --out that cannot be written fails now, naming it, not after the parity pass
    created: list[Path] = []
    tmp = _build_folder(out_dir, target, created)
    try:
        built = _build_in(tmp, checkpoint_dir, out_dir, target, opts)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)  # the parents made for --out, as before a failed build
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    return built


def _build_folder(out_dir: Path, target: Path, created: list[Path]) -> Path:
    """The hidden build folder beside the resolved --out (its parents made, and listed in
    ``created``); a BuildError naming --out when it cannot be made there."""
    missing = [p for p in (target.parent, *target.parent.parents) if not p.exists()]
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        created.extend(missing)  # deepest first: the order to remove them in
        return Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.building-"))
    except OSError as exc:  # EACCES, EROFS, ENOSPC, ENOTDIR, ...
        _remove_empty(created)
        raise BuildError(
            f"--out {out_dir}: cannot write in {target.parent} ({exc.strerror or exc})"
        ) from None


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _batchnorm_eps(model: torch.nn.Module | None) -> dict[str, float]:
    """Each BatchNorm-like module's ``eps`` by its ``running_var``'s name in the state dict."""
    if model is None:
        return {}
    return {
        f"{name}.running_var" if name else "running_var": float(module.eps)
        for name, module in model.named_modules()
        if isinstance(getattr(module, "eps", None), float | int)
        and isinstance(getattr(module, "running_var", None), torch.Tensor)
    }


def _negative_variance(state: dict, model: torch.nn.Module | None = None) -> str | None:
    """The first BatchNorm ``running_var`` in ``state`` whose value plus its module's ``eps``
    is <= 0, described (the value, its flat index and the eps), else None.

    Eval-mode BatchNorm divides by sqrt(running_var + eps): a slightly negative variance (float
    round-off, -1e-7 with eps 1e-5) still gives finite output and is not refused. ``model``: the
    model the checkpoint describes, whose modules hold each eps (the state dict has none); a
    ``running_var`` with no module there (no model given) is held to eps 0.
    """
    eps_of = _batchnorm_eps(model)
    for name, value in state.items():
        if not (name == "running_var" or name.endswith(".running_var")):
            continue
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            continue
        eps = eps_of.get(name, 0.0)
        flat = value.detach().reshape(-1)
        bad = (flat + eps <= 0).nonzero()
        if bad.numel():
            index = int(bad[0, 0])
            return (
                f"{name} has a value {float(flat[index]):g} at index {index} that its "
                f"BatchNorm's eps {eps:g} does not lift above 0 (running_var + eps <= 0: eval "
                "mode divides by its square root); the checkpoint is corrupt"
            )
    return None


def _weights_problem(
    ckpt: dict, model: torch.nn.Module | None = None, use_ema: bool = True
) -> str | None:
    """What is wrong with the weights the build exports, naming the first bad tensor, else None:
    one holding NaN or inf, or a BatchNorm ``running_var`` that its module's eps (read from
    ``model``, built from ``ckpt``) leaves <= 0 (eval mode takes the square root of their sum:
    NaN or inf). The parity gate would otherwise refuse the build only as a non-finite
    reference."""
    from engine_build.runtime.torch_model import first_non_finite

    key = "ema_state_dict" if use_ema and ckpt.get("ema_state_dict") else "state_dict"
    bad = first_non_finite(ckpt[key])
    if bad is not None:
        return f"{key} tensor {bad} holds NaN or inf"
    negative = _negative_variance(ckpt[key], model)
    return None if negative is None else f"{key} tensor {negative}"


def _refused_pickle(exc: BaseException) -> bool:
    """Whether a checkpoint failed to load because a weights-only load refused an object in it."""
    seen = exc
    while seen is not None:
        if isinstance(seen, pickle.UnpicklingError) and "weights only" in str(seen).lower():
            return True
        seen = seen.__cause__
    return False


def _build_in(
    tmp: Path, checkpoint_dir: Path, out_dir: Path, target: Path, opts: BuildOptions
) -> Path:
    try:
        ckpt = load_checkpoint(checkpoint_dir)
    except CheckpointError as exc:
        if _refused_pickle(exc):
            file = checkpoint_dir / CHECKPOINT_FILE if checkpoint_dir.is_dir() else checkpoint_dir
            raise BuildError(
                f"unreadable checkpoint {file}: it holds objects a weights-only load refuses "
                "(a carstream checkpoint holds only tensors and plain data); it was not written "
                "by training, and is not loaded"
            ) from None
        raise BuildError(str(exc)) from exc
    ckpt_file = checkpoint_dir / CHECKPOINT_FILE if checkpoint_dir.is_dir() else checkpoint_dir
    labels, level = checkpoint_labels(ckpt, ckpt_file)
    _warn_about_labels_file(ckpt, ckpt_file.parent / LABELS_FILE)
    crop = _warn_about_crop(ckpt, ckpt_file, opts.parity_data)
    _check_not_checkpoint(out_dir, checkpoint_dir)
    _check_timing_cache_outside(out_dir, opts.timing_cache)
    _check_out(out_dir, opts.overwrite)
    no_trt = _tensorrt_wanted(opts)

    spec = preprocess_spec_of(ckpt)
    if problem := crop_problem(spec):
        raise BuildError(f"checkpoint {ckpt_file}: preprocess: {problem}")
    try:
        model = model_from_checkpoint(ckpt, source=checkpoint_dir)
    except CheckpointError as exc:
        raise BuildError(str(exc)) from exc
    if problem := _weights_problem(ckpt, model):
        raise BuildError(f"checkpoint {ckpt_file}: {problem}; it cannot be exported")
    try:
        parity_set = heldout.parity_set_for(
            ckpt, spec, opts.parity_data, opts.parity_images, data_dir=opts.data_dir
        )
    except ParityDataError as exc:
        raise BuildError(str(exc)) from exc
    log.info(
        "parity set: %d images (%d labelled) from %s",
        len(parity_set.images),
        int((parity_set.labels >= 0).sum()),
        parity_set.source,
    )
    with torch.inference_mode():
        reference = run_batched(_fp32_infer(model), parity_set.images, opts.max_batch)
    broken = int((~finite_rows(reference)).sum())
    if broken:  # nothing to compare against: every artifact would "agree" with NaN
        raise ParityGateError(
            f"parity gate failed: the PyTorch FP32 reference itself gives non-finite logits "
            f"(NaN/inf) on {broken} of {len(reference)} parity images; the checkpoint "
            f"{checkpoint_dir} is broken",
            {
                "reference": "pytorch-fp32",
                "parity_source": parity_set.source,
                "training_crop": crop,
                "reference_non_finite_images": broken,
                "artifacts": {},
            },
        )

    # tmp: a sibling of the resolved --out: inside it (`--out .`) the build would fill the very
    # directory it must find empty
    manifest, report = _build_into(
        tmp, ckpt, model, spec, opts, parity_set, reference, no_trt, ckpt_file, labels, level
    )
    report["training_crop"] = crop
    (tmp / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")
    (tmp / PARITY_FILE).write_text(json.dumps(report, indent=2) + "\n")
    load_bundle(tmp)  # the bundle we hand over must pass the worker's own checks
    _open_modes(tmp)
    _fsync_tree(tmp)
    _install(tmp, target, opts.overwrite)
    log.info("bundle written to %s", target)
    return out_dir


def _build_into(
    tmp: Path,
    ckpt: dict,
    model: torch.nn.Module,
    spec: PreprocessSpec,
    opts: BuildOptions,
    parity_set: ParitySet,
    reference: np.ndarray,
    no_trt: str | None,
    ckpt_file: Path,
    labels: list[Label],
    level: str,
) -> tuple[Manifest, dict]:
    profile = opts.profile
    draft = Manifest(
        model_name=opts.model_name or f"carstream-{ckpt['arch']}",
        model_version=opts.model_version or default_model_version(ckpt),
        arch=ckpt["arch"],
        level=level,
        num_classes=int(ckpt["num_classes"]),
        labels=labels,
        preprocess=spec,
        batch_profile=profile,
        artifacts=[],
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        source_checkpoint_sha256=sha256_file(ckpt_file),
    )
    report: dict = {
        "reference": "pytorch-fp32",
        "parity_source": parity_set.source,
        "artifacts": {},
    }
    artifacts: list[Artifact] = []
    _check_gpu_decode(report, ckpt, model, spec, opts, parity_set, reference)

    def check(
        art: Artifact,
        infer: Callable[[np.ndarray], np.ndarray],
        threshold: float,
        key: str | None = None,
        indices: np.ndarray | None = None,
        precision: str | None = None,
    ) -> None:
        """Run the parity images (those at ``indices``, default all) through ``infer`` in
        batches of up to max_batch, and the first few one at a time (batch 1, and the padding
        path of a TensorRT profile with min > 1). ``key`` names the report entry (default
        ``backend-precision`` of the artifact); ``precision``: the one ``infer`` runs in, which
        sets the probability limit (default the artifact's)."""
        key = key or f"{art.backend}-{art.precision}"
        images, labels, ref = parity_set.images, parity_set.labels, reference
        if indices is not None:
            images, labels, ref = images[indices], labels[indices], ref[indices]
        logits = run_batched(infer, images, opts.max_batch)
        k = min(BATCH1_IMAGES, len(logits))
        single = run_batched(infer, images[:k], 1)
        entry = parity_report(ref, logits, labels)
        entry["batch1"] = batch1_report(ref[:k], logits[:k], single)
        entry["file"] = art.file
        failures = _gate(key, entry, threshold, opts.prob_limit(precision or art.precision))
        report["artifacts"][key] = entry
        if failures:
            raise ParityGateError(
                f"parity gate failed for {art.file}: {'; '.join(failures)}", report
            )

    def ort_check(art: Artifact, threshold: float, indices: np.ndarray | None = None) -> None:
        partial = draft.model_copy(update={"artifacts": [art]})
        engine = OnnxRuntimeEngine(Bundle(tmp, partial), art.precision, threads=opts.threads)
        try:
            check(art, engine.infer, threshold, indices=indices)
        finally:
            engine.close()

    # FP32 ONNX: always; the CPU path and the source of every other artifact.
    export_onnx(model, tmp / ONNX_FILE, spec.crop, draft.input_name, draft.output_name, opts.opset)
    fp32 = _artifact(tmp, ONNX_FILE, "onnxruntime", "fp32")
    ort_check(fp32, opts.fp32_agreement)
    artifacts.append(fp32)

    # FP32 state_dict: what the torch-cuda backend runs in FP16 on GPUs without TensorRT.
    torch.save(model.state_dict(), tmp / TORCH_FILE)
    weights = _artifact(tmp, TORCH_FILE, "torch", "fp32")
    artifacts.append(weights)

    if "bf16" in opts.precisions:
        # the same model.pt, run by the torch-cpu backend in bfloat16: no file of its own, but a
        # parity entry under the engine's name, which the worker logs at start
        from engine_build.runtime.torch_cpu import TorchCpuEngine

        partial = draft.model_copy(update={"artifacts": [weights]})
        engine = TorchCpuEngine(Bundle(tmp, partial), "bf16", threads=opts.threads)
        try:
            check(weights, engine.infer, opts.bf16_agreement, key=engine.name, precision="bf16")
        finally:
            engine.close()

    if "int8" in opts.precisions:
        from engine_build.quantize import quantize_int8

        calib, scored = heldout.calibration_split(parity_set, opts.calibration_images)
        quantize_int8(tmp / ONNX_FILE, tmp / INT8_FILE, draft.input_name, calib, tmp)
        int8 = _artifact(tmp, INT8_FILE, "onnxruntime", "int8")
        apart = len(scored) > 0
        if not apart:
            log.warning("one parity image: int8 is scored on its own calibration image")
        ort_check(int8, opts.int8_agreement, scored if apart else None)
        entry = report["artifacts"]["onnxruntime-int8"]
        entry["calibration_images"] = len(calib)
        entry["scored_apart_from_calibration"] = apart
        artifacts.append(int8)

    if no_trt is None:
        artifacts.append(_build_plan(tmp, model, draft, opts, check))
    elif "fp16" in opts.precisions:
        log.warning("no TensorRT plan built: %s", no_trt)
        report["tensorrt_skipped"] = no_trt
    return draft.model_copy(update={"artifacts": artifacts}), report


def _fp32_infer(model: torch.nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    """The PyTorch FP32 reference as numpy in, numpy out (call it under inference_mode)."""
    return lambda x: model(torch.from_numpy(x)).numpy()


def _check_gpu_decode(
    report: dict,
    ckpt: dict,
    model: torch.nn.Module,
    spec: PreprocessSpec,
    opts: BuildOptions,
    parity_set: ParitySet,
    reference: np.ndarray,
) -> None:
    """Measure the GPU workers' decode path (worker ``gpu_decode``: nvJPEG, block-average draft,
    torch resize) with the FP32 model, record it as ``report["decode"]["gpu_decode"]``, and
    raise ParityGateError when it misses ``--gpu-decode-agreement`` in a bundle meant for GPU
    workers (``--backends`` with tensorrt, or a build on CUDA: ``gate_applies``); for any other
    bundle a miss is recorded and logged as a WARNING. Run before any export: a bundle whose GPU
    pool would answer otherwise fails in seconds, not after a TensorRT build."""
    with torch.inference_mode():
        entry = gpu_decode_entry(
            parity_set,
            reference,
            ckpt,
            spec,
            _fp32_infer(model),
            opts.max_batch,
            opts.parity_images,
            opts.data_dir,
        )
    report["decode"] = {GPU_DECODE_ENTRY: entry}
    applied, why = gate_applies(opts.backends)
    failures = gate_gpu_decode(entry, opts.gpu_decode_agreement, applied, why)
    if failures and applied:
        raise ParityGateError(
            f"parity gate failed for the GPU-decode path (workers with gpu_decode): "
            f"{'; '.join(failures)}; --gpu-decode-agreement 0 records it without failing",
            report,
        )
    if failures:
        log.warning(
            "the GPU-decode path (workers with gpu_decode) misses --gpu-decode-agreement %s: %s; "
            "not failing the build, %s (a build with --backends tensorrt or on a GPU fails)",
            opts.gpu_decode_agreement,
            "; ".join(failures),
            why,
        )


def _build_plan(
    tmp: Path,
    model: torch.nn.Module,
    draft: Manifest,
    opts: BuildOptions,
    check: Callable[[Artifact, Callable[[np.ndarray], np.ndarray], float], None],
) -> Artifact:
    """TensorRT FP16 plan from an FP16-inside ONNX export, checked on this GPU."""
    import copy

    from engine_build.runtime.tensorrt_engine import TensorRTEngine
    from engine_build.tensorrt_build import build_fp16_plan

    fp16_onnx = tmp / FP16_ONNX_FILE
    export_onnx(
        HalfPrecision(copy.deepcopy(model)),
        fp16_onnx,
        draft.preprocess.crop,
        draft.input_name,
        draft.output_name,
        opts.opset,
    )
    built = build_fp16_plan(
        fp16_onnx,
        draft.input_name,
        draft.preprocess.crop,
        draft.batch_profile,
        opts.workspace_gb,
        opts.timing_cache,
    )
    fp16_onnx.unlink()
    (tmp / PLAN_FILE).write_bytes(built.plan)
    plan = _artifact(tmp, PLAN_FILE, "tensorrt", "fp16", tensorrt=built.info)
    engine = TensorRTEngine(Bundle(tmp, draft.model_copy(update={"artifacts": [plan]})))
    try:
        check(plan, engine.infer, opts.fp16_agreement)
    finally:
        engine.close()
    return plan
