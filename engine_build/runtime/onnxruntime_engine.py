"""ONNX Runtime on the CPU: the backend every machine can run."""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort

from engine_build.bundle import Bundle
from engine_build.runtime.base import (
    ArtifactMismatchError,
    EngineUnavailableError,
    InputSpec,
    check_batch,
    first_line,
    input_spec_of,
)

log = logging.getLogger(__name__)


def make_session(
    model: str | bytes,
    threads: int | None = None,
    providers: list[str] | None = None,
    spinning: bool = True,
) -> ort.InferenceSession:
    """An InferenceSession of ``model`` (a path, or the ONNX file's bytes) with full graph
    optimisation and an explicit thread count.

    ``spinning=False`` stops the intra-op pool busy-waiting for work between and after runs:
    in a worker that decodes on the same cores, that spinning takes CPU from the decode threads.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(
        model, sess_options=options, providers=providers or ["CPUExecutionProvider"]
    )


def _dims(arg) -> str:
    return "(" + ", ".join(str(d) for d in arg.shape) + ")"


def io_problem(session: ort.InferenceSession, bundle: Bundle, max_batch: int) -> str | None:
    """How the session's inputs and outputs differ from what the manifest says the model takes
    and answers, else None: the input ``input_name``, float32 (N, 3, crop, crop), the only one;
    the output ``output_name``, float32 (N, num_classes). A symbolic dimension fits any size (the
    warm-up's logits are checked too); a fixed batch dimension must be the only batch size the
    profile allows."""
    m = bundle.manifest
    inputs, outputs = session.get_inputs(), session.get_outputs()
    names = [i.name for i in inputs]
    if m.input_name not in names or len(names) != 1:
        return f"the model's inputs are {names}, the manifest's input_name is {m.input_name!r}"
    (arg,) = inputs
    want = (None, 3, m.preprocess.crop, m.preprocess.crop)
    if arg.type != "tensor(float)":
        return f"input {arg.name!r} is {arg.type}, not tensor(float)"
    if len(arg.shape) != 4 or any(
        isinstance(d, int) and w is not None and d != w
        for d, w in zip(arg.shape, want, strict=True)
    ):
        return (
            f"input {arg.name!r} has shape {_dims(arg)}, the manifest's is "
            f"(N, 3, {m.preprocess.crop}, {m.preprocess.crop}) (preprocess.crop)"
        )
    batch = arg.shape[0]
    if isinstance(batch, int) and not (m.batch_profile.min == max_batch == batch):
        return (
            f"input {arg.name!r} has a fixed batch size {batch}, the manifest's batch profile is "
            f"{m.batch_profile.min}..{max_batch}"
        )
    by_name = {o.name: o for o in outputs}
    if m.output_name not in by_name:
        return f"the model's outputs are {list(by_name)}, the manifest's output_name is " + repr(
            m.output_name
        )
    out = by_name[m.output_name]
    if out.type != "tensor(float)":
        return f"output {out.name!r} is {out.type}, not tensor(float)"
    if len(out.shape) != 2 or (isinstance(out.shape[1], int) and out.shape[1] != m.num_classes):
        return (
            f"output {out.name!r} has shape {_dims(out)}, the manifest has {m.num_classes} "
            f"classes ({len(m.labels)} labels)"
        )
    return None


class OnnxRuntimeEngine:
    """Runs the bundle's ONNX artifact of ``precision`` (fp32 or the int8 QDQ model)."""

    def __init__(
        self,
        bundle: Bundle,
        precision: str = "fp32",
        threads: int | None = None,
        spinning: bool = True,
    ):
        artifact = bundle.artifact("onnxruntime", precision)
        if artifact is None:
            raise EngineUnavailableError(
                f"bundle {bundle.path} has no onnxruntime {precision} artifact"
            )
        self.name = f"onnxruntime-{precision}"
        self.max_batch = bundle.manifest.batch_profile.max
        self._spec = input_spec_of(bundle)
        self._output = bundle.manifest.output_name
        data = bundle.read_artifact(artifact)
        try:
            self._session = make_session(data, threads, spinning=spinning)
        except Exception as exc:  # ONNX Runtime's own classes: InvalidProtobuf, Fail, ...
            raise ArtifactMismatchError(
                f"bundle {bundle.path}: ONNX Runtime cannot load {artifact.file} "
                f"({type(exc).__name__}: {first_line(exc)})"
            ) from None
        problem = io_problem(self._session, bundle, self.max_batch)
        if problem is not None:
            raise ArtifactMismatchError(
                f"bundle {bundle.path}: {artifact.file} does not fit manifest.json: {problem}"
            )
        log.info(
            "loaded %s from %s (threads=%s, spinning=%s)",
            self.name,
            artifact.file,
            threads or "ort default",
            "on" if spinning else "off",
        )

    def input_spec(self) -> InputSpec:
        return self._spec

    def infer(self, batch: np.ndarray) -> np.ndarray:
        batch = check_batch(batch, self._spec, self.max_batch)
        (logits,) = self._session.run([self._output], {self._spec.name: batch})
        return np.asarray(logits, dtype=np.float32)

    def close(self) -> None:
        self._session = None
