"""The model bundle's ``manifest.json``: a versioned pydantic schema (DESIGN.md Stage 2)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from training.preprocessing import PreprocessSpec

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"


class Label(BaseModel):
    model_config = ConfigDict(frozen=True)

    make: str
    model: str
    make_id: int | str | None = None
    model_id: int | str | None = None


class BatchProfile(BaseModel):
    model_config = ConfigDict(frozen=True)

    min: int = Field(1, ge=1)
    opt: int = Field(32, ge=1)
    max: int = Field(64, ge=1)


class TensorRTInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    version: str
    gpu_name: str
    compute_capability: str
    typing: Literal["strong", "weak"]
    timing_cache: str | None = None


class Artifact(BaseModel):
    model_config = ConfigDict(frozen=True)

    backend: Literal["onnxruntime", "tensorrt", "torch"]
    precision: Literal["fp32", "fp16", "int8"]
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = Field(ge=0)
    tensorrt: TensorRTInfo | None = None


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = Field(SCHEMA_VERSION, strict=True, ge=1, le=SCHEMA_VERSION)
    model_name: str
    model_version: str
    arch: str
    level: Literal["model", "make"] = "model"
    num_classes: int
    labels: list[Label]
    preprocess: PreprocessSpec
    input_name: str = "images"
    output_name: str = "logits"
    batch_profile: BatchProfile = BatchProfile()
    artifacts: list[Artifact]
    created_at: str
    source_checkpoint_sha256: str | None = None
