"""The model bundle's ``manifest.json``: a versioned pydantic schema (DESIGN.md Stage 2).

Every model (the manifest and each nested object) forbids fields it does not know, and the
schema holds engine_build's own rules (a batch profile with min <= opt <= max <= MAX_BATCH, a
printable model name and version, plain artifact file names), so a hand-edited manifest that
engine_build would never write is refused at load, naming the field. Class names follow
training's rules too (``Label``): printable UTF-8 text, NFC-normalised and stripped as the
dataset readers write them, and no two classes that read alike.
"""

from __future__ import annotations

import logging
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from training.datasets.folder import normal_class_name
from training.preprocessing import PreprocessSpec
from training.text_rules import first_unprintable

SCHEMA_VERSION = 1
log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
# the worker's max_batch is at most 4096 (worker/settings.py), so a larger profile is never used;
# TensorRT would still allocate for it (--max-batch 40960 at 224 px: a 23 GiB input buffer)
MAX_BATCH = 4096
MAX_LABEL_CHARS = 128  # the post_id's bound too: a label, not a document
# a class name's bound: a folder name's (255 bytes on Linux), so every class a folder tree or
# CompCars names fits; far beyond it is not a name (it would go into every result message)
MAX_CLASS_NAME_CHARS = 255
# worker/trend_keys.py (model_member) joins a make and its model with it ("Make|Model") and
# splits at the first one
MODEL_SEPARATOR = "|"
# training.models.ARCHS' keys (not imported: that pulls in torchvision for every manifest reader)
Arch = Literal["resnet18", "resnet34", "resnet50", "resnet101"]
ARCHS: tuple[str, ...] = get_args(Arch)
# an artifact's path inside the bundle: each part a file name the filesystem takes (255 bytes on
# Linux), the whole far below PATH_MAX
MAX_FILE_PART_BYTES = 255
MAX_FILE_CHARS = 1024


def label_text_problem(value: str) -> str | None:
    """Why ``value`` cannot be a model name or version (the manifest's and --model-name's rule:
    not blank, at most MAX_LABEL_CHARS, no control character or line break), else None."""
    if not value.strip():
        return "must not be empty or only whitespace"
    if len(value) > MAX_LABEL_CHARS:
        return (
            f"{len(value)} characters, at most {MAX_LABEL_CHARS} (it goes into every result "
            "message)"
        )
    bad = first_unprintable(value)
    if bad is not None:
        return f"holds the control character or line break U+{ord(bad):04X}; use printable text"
    return None


def artifact_file_problem(name: str) -> str | None:
    """Why ``name`` cannot be an artifact's file inside a bundle, else None: it must be a relative
    path of ordinary names (an absolute path or ``..`` is refused, naming the file, when the
    artifact is verified)."""
    if not name or not name.strip():
        return "is empty"
    if len(name) > MAX_FILE_CHARS:
        return f"is {len(name)} characters long, at most {MAX_FILE_CHARS}"
    bad = first_unprintable(name)
    if bad is not None:  # NUL included: no filesystem call takes it
        return f"holds the control character U+{ord(bad):04X}"
    for part in name.split("/"):
        if len(part.encode("utf-8", "surrogatepass")) > MAX_FILE_PART_BYTES:
            return f"has a part of over {MAX_FILE_PART_BYTES} bytes ({part[:40]!r}...)"
    return None


def class_name_problem(value: str) -> str | None:
    """Why ``value`` cannot be a class's make or model name, else None: it goes into every result
    message, the logs and CSV exports, so it must be UTF-8 text (not a lone surrogate, which
    ``json`` reads from a ``\\udcff`` escape and the worker could not serialise) of at most
    MAX_CLASS_NAME_CHARS without a control character or line break (``training.text_rules``)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"is not UTF-8 text (it holds the lone surrogate U+{ord(value[exc.start]):04X})"
    bad = first_unprintable(value)
    if bad is not None:
        return f"holds the control character or line break U+{ord(bad):04X}; use printable text"
    if len(value) > MAX_CLASS_NAME_CHARS:
        return f"is {len(value)} characters long, at most {MAX_CLASS_NAME_CHARS}"
    return None


def _fold(value: int | str | None) -> int | str | None:
    """What makes two names (or ids) read alike: NFC and case-insensitive."""
    return normal_class_name(value).casefold() if isinstance(value, str) else value


class Label(BaseModel):
    """One class: a make and a model name (model ``""`` in a make-level bundle) and the dataset's
    ids. Names are read NFC-normalised and stripped (an id that is its name, as a folder data
    set's, with it); a name that is not printable UTF-8, a blank make and a make holding the
    trends' ``|`` separator are refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    make: str
    model: str
    make_id: int | str | None = None
    model_id: int | str | None = None

    @field_validator("make", "model")
    @classmethod
    def _name(cls, value: str) -> str:
        problem = class_name_problem(value)
        if problem is not None:
            raise ValueError(f"{_shown(value)} {problem}")
        normal = normal_class_name(value)
        if normal != value:  # a bundle built before names were normalised: say it changed
            log.warning(
                "class name %r is read as %r (NFC, stripped): results and trend counts use this "
                "spelling, so counts under the old one are a different member",
                value,
                normal,
            )
        return normal

    @field_validator("make")
    @classmethod
    def _make(cls, value: str) -> str:
        if not value:
            raise ValueError("must not be empty or only whitespace (every class has a make)")
        if MODEL_SEPARATOR in value:
            raise ValueError(
                f"{_shown(value)} holds {MODEL_SEPARATOR!r}, which separates a make from its "
                "model in the trend counts"
            )
        return value

    @field_validator("make_id", "model_id")
    @classmethod
    def _id(cls, value: int | str | None) -> int | str | None:
        """A text id (a folder data set's is its name) is written into the manifest as well."""
        if isinstance(value, str) and (problem := class_name_problem(value)) is not None:
            raise ValueError(f"{_shown(value)} {problem}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _ids_follow_names(cls, data: object) -> object:
        """An id that is its name (a folder data set's) is normalised with it."""
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, key in (("make", "make_id"), ("model", "model_id")):
            text, ident = data.get(name), data.get(key)
            if isinstance(text, str) and ident == text and class_name_problem(text) is None:
                out[key] = normal_class_name(text)
        return out


def _shown(value: str) -> str:
    """``value`` for a one-line message: repr (escapes show), at most 40 characters of it."""
    return f"{value[:40]!r}..." if len(value) > 40 else repr(value)


def labels_problem(labels: list[Label], level: str, where: str = "labels") -> str | None:
    """Why ``labels`` cannot be a bundle's class list at ``level``, else None: a model-level
    class without a model name, or two classes that read alike (the same make and model once
    NFC-normalised and casefolded, with the same ids). One name under two ids stays two classes:
    CompCars gives one make name to two make ids, and the results read it by brand. ``where``
    names the list in the message (a checkpoint's is ``classes``)."""
    seen: dict[tuple, int] = {}
    for i, label in enumerate(labels):
        if level == "model" and not label.model:
            return (
                f"{where}[{i}] ({label.make!r}) has no model name; only a make-level bundle "
                '(level "make") has classes without one'
            )
        key = tuple(_fold(v) for v in (label.make, label.model, label.make_id, label.model_id))
        if key in seen:
            return (
                f"{where}[{i}] ({label.make!r} {label.model!r}) reads as {where}[{seen[key]}] "
                "(the same make and model, ignoring case and Unicode normalisation, with the "
                "same ids): two classes no result could tell apart"
            )
        seen[key] = i
    return None


class BatchProfile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    min: int = Field(1, ge=1, le=MAX_BATCH)
    opt: int = Field(32, ge=1, le=MAX_BATCH)
    max: int = Field(64, ge=1, le=MAX_BATCH)

    @model_validator(mode="after")
    def _ordered(self) -> BatchProfile:
        if not self.min <= self.opt <= self.max:
            raise ValueError(
                f"min {self.min}, opt {self.opt}, max {self.max}: must be min <= opt <= max"
            )
        return self


class TensorRTInfo(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    version: str
    gpu_name: str
    compute_capability: str
    typing: Literal["strong", "weak"]
    timing_cache: str | None = None


class Artifact(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: Literal["onnxruntime", "tensorrt", "torch"]
    precision: Literal["fp32", "fp16", "int8"]
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(ge=0)
    tensorrt: TensorRTInfo | None = None

    @field_validator("file")
    @classmethod
    def _plain_file(cls, value: str) -> str:
        problem = artifact_file_problem(value)
        if problem is not None:
            raise ValueError(f"{value[:40]!r}{'...' if len(value) > 40 else ''} {problem}")
        return value


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = Field(SCHEMA_VERSION, strict=True, ge=1, le=SCHEMA_VERSION)
    model_name: str
    model_version: str
    arch: Arch
    level: Literal["model", "make"] = "model"
    num_classes: int = Field(strict=True, ge=1)
    labels: list[Label]
    preprocess: PreprocessSpec
    input_name: str = "images"
    output_name: str = "logits"
    batch_profile: BatchProfile = BatchProfile()
    artifacts: list[Artifact]
    created_at: str
    source_checkpoint_sha256: str | None = None

    @field_validator("model_name", "model_version")
    @classmethod
    def _printable(cls, value: str) -> str:
        problem = label_text_problem(value)
        if problem is not None:
            raise ValueError(f"{value[:40]!r}: {problem}")
        return value

    @model_validator(mode="after")
    def _labels_apart(self) -> Manifest:
        problem = labels_problem(self.labels, self.level)
        if problem is not None:
            raise ValueError(problem)
        return self

    @field_validator("preprocess")
    @classmethod
    def _crop_fits(cls, spec: PreprocessSpec) -> PreprocessSpec:
        problem = crop_problem(spec)
        if problem is not None:
            raise ValueError(problem)
        return spec


def crop_problem(spec: PreprocessSpec) -> str | None:
    """Why a model bundle cannot serve ``spec``, else None: a crop larger than the resized shorter
    side pads every image with black (training never records one; PreprocessSpec itself takes it
    so the padding path can be exercised)."""
    if spec.crop > spec.resize:
        return (
            f"crop {spec.crop} is larger than resize {spec.resize}: every image would be padded "
            "with black (training writes crop <= resize)"
        )
    return None
