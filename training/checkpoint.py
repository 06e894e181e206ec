"""The checkpoint directory contract (DESIGN.md Stage 1), shared by training and engine_build.

``checkpoint.pt`` holds only tensors and plain containers so that
``torch.load(..., weights_only=True)`` reads it; writes are atomic and durable (temp file in the
same directory, fsync, ``os.replace``, fsync of the directory).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from training.cli_errors import first_validation_error
from training.models import ARCHS, build_model, torch_load_weights_only
from training.preprocessing import PreprocessSpec

FORMAT_VERSION = 1
CHECKPOINT_FILE = "checkpoint.pt"
LABELS_FILE = "labels.json"
METRICS_FILE = "metrics.json"
ARGS_FILE = "args.json"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be used; the message names the path."""


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (``os.umask`` can only
    be read by setting it, which races with other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through ``write`` to a temp file in ``path``'s directory, flush and fsync it, rename
    it over ``path`` and fsync the directory: after a crash or power loss ``path`` holds either
    the old content or all of the new, never a torn or empty file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 would hide it from other users
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        interrupt = interrupt_behind(exc)
        if interrupt is not None and interrupt is not exc:
            # Ctrl-C or a second SIGTERM mid-write: torch.save's zip writer fails in its
            # __exit__ on the half-written archive, and that RuntimeError would hide the
            # interruption (a traceback and exit 1, the code of a diverged run, not exit 130)
            raise interrupt from None
        raise
    fsync_dir(path.parent)


def interrupt_behind(exc: BaseException) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt that ``exc`` is, or that it was raised while handling (its
    ``__context__`` chain), or None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return current
        seen.add(id(current))
        current = current.__context__
    return None


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def atomic_torch_save(path: Path, obj: Any) -> None:
    _atomic_write(path, lambda f: torch.save(obj, f))


def save_checkpoint(out_dir: Path, ckpt: dict[str, Any]) -> Path:
    """Write ``checkpoint.pt`` and ``labels.json`` atomically.

    Required keys: arch, num_classes, classes (list of {make, model, make_id, model_id} in
    class-index order), level, preprocess (PreprocessSpec dict), state_dict, epoch, args.
    Optional: optimizer, lr_scheduler, scaler, ema_state_dict, rng, metrics, train_class_counts
    (training images per class, for the majority-class baseline; older checkpoints lack it),
    global_step, steps_per_epoch and train_images (what --resume checks the data against; older
    checkpoints lack them).
    """
    out_dir = Path(out_dir)
    ckpt = {"format_version": FORMAT_VERSION, **ckpt}
    atomic_torch_save(out_dir / CHECKPOINT_FILE, ckpt)
    labels = {str(i): c for i, c in enumerate(ckpt["classes"])}
    atomic_write_json(out_dir / LABELS_FILE, labels)
    return out_dir / CHECKPOINT_FILE


def recorded_crop(ckpt: dict[str, Any]) -> str:
    """The crop mode the checkpoint was trained with (``full`` when it records none)."""
    return (ckpt.get("args") or {}).get("crop") or "full"


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint directory (or the ``checkpoint.pt`` in it) with ``weights_only=True``."""
    path = Path(path)
    file = path / CHECKPOINT_FILE if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"no checkpoint at {file}")
    try:
        ckpt = torch_load_weights_only(file)
    except ValueError as exc:
        raise CheckpointError(f"unreadable checkpoint {file}: {exc}") from exc
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"unreadable checkpoint {file}: not a carstream checkpoint")
    missing = [
        k for k in ("arch", "num_classes", "classes", "state_dict", "preprocess") if k not in ckpt
    ]
    if missing:
        raise CheckpointError(f"checkpoint {file} lacks {', '.join(missing)}")
    version = ckpt.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"checkpoint {file} has a non-integer format_version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {file} has format {ckpt['format_version']}, newer than {FORMAT_VERSION}"
        )
    bad = _malformed_field(ckpt)
    if bad:
        raise CheckpointError(f"checkpoint {file} is damaged: {bad}")
    return ckpt


def _malformed_field(ckpt: dict[str, Any]) -> str | None:
    """Why a loaded checkpoint's fields cannot be what training writes, or None: a hand-edited
    or foreign file would otherwise fail later with a traceback far from the file's name."""
    if ckpt["arch"] not in ARCHS:
        return f"unknown arch {ckpt['arch']!r}; choose one of {', '.join(ARCHS)}"
    n = ckpt["num_classes"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return f"num_classes {n!r} is not a positive integer"
    classes = ckpt["classes"]
    if not (isinstance(classes, list) and all(isinstance(c, dict) for c in classes)):
        return "classes is not a list of {make, model, make_id, model_id} entries"
    if len(classes) != n:
        return f"it lists {len(classes)} classes but num_classes is {n}"
    if not isinstance(ckpt["state_dict"], dict):
        return "state_dict is not a dict of tensors"
    counts = ckpt.get("train_class_counts")
    if counts is not None and not (
        isinstance(counts, list)
        and len(counts) == n
        and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)
    ):
        return f"train_class_counts is not a list of {n} image counts"
    if ckpt.get("level") not in (None, "model", "make"):
        return f"level {ckpt['level']!r} is neither model nor make"
    if not isinstance(ckpt.get("args") or {}, dict):
        return "args is not a dict"
    try:
        PreprocessSpec(**ckpt["preprocess"])
    except (TypeError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        detail = first_validation_error(exc) if hasattr(exc, "errors") else str(exc)
        return f"preprocess: {detail}"
    return None


def load_weights(model: nn.Module, state: dict[str, Any], source: object) -> None:
    """``model.load_state_dict(state)``; weights that do not fit (another arch, another class
    count, missing tensors) are a CheckpointError naming ``source``, not torch's traceback."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        detail = " ".join(str(exc).split())
        raise CheckpointError(
            f"{source}: its weights do not fit the model it describes ({detail[:200]})"
        ) from exc


def model_from_checkpoint(
    ckpt: dict[str, Any], use_ema: bool = True, source: object = "checkpoint"
) -> nn.Module:
    """The eval-mode FP32 model a checkpoint describes (EMA weights when present); ``source``
    (its path) names it in the error when the weights do not fit."""
    model = build_model(ckpt["arch"], int(ckpt["num_classes"]))
    state = ckpt.get("ema_state_dict") if use_ema and ckpt.get("ema_state_dict") else None
    load_weights(model, state or ckpt["state_dict"], source)
    return model.eval()


def preprocess_spec_of(ckpt: dict[str, Any]) -> PreprocessSpec:
    return PreprocessSpec(**ckpt["preprocess"])
