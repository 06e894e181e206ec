"""The model bundle's ``manifest.json``: a versioned pydantic schema (DESIGN.md Stage 2).

Every model (the manifest and each nested object) forbids fields it does not know, and the
schema holds engine_build's own rules (a batch profile with min <= opt <= max <= MAX_BATCH, a
printable model name and version, plain artifact file names), so a hand-edited manifest that
engine_build would never write is refused at load, naming the field.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from training.preprocessing import PreprocessSpec
from training.text_rules import first_unprintable

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
# the worker's max_batch is at most 4096 (worker/settings.py), so a larger profile is never used;
# TensorRT would still allocate for it (--max-batch 40960 at 224 px: a 23 GiB input buffer)
MAX_BATCH = 4096
MAX_LABEL_CHARS = 128  # the post_id's bound too: a label, not a document
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


class Label(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    make: str
    model: str
    make_id: int | str | None = None
    model_id: int | str | None = None


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
    arch: str
    level: Literal["model", "make"] = "model"
    num_classes: int = Field(ge=1)
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
