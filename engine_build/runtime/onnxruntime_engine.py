"""ONNX Runtime on the CPU: the backend every machine can run."""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort

from engine_build.bundle import Bundle
from engine_build.runtime.base import EngineUnavailableError, InputSpec, check_batch, input_spec_of

log = logging.getLogger(__name__)


def make_session(
    path: str,
    threads: int | None = None,
    providers: list[str] | None = None,
    spinning: bool = True,
) -> ort.InferenceSession:
    """An InferenceSession with full graph optimisation and an explicit thread count.

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
        path, sess_options=options, providers=providers or ["CPUExecutionProvider"]
    )


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
        self._session = make_session(
            str(bundle.artifact_path(artifact)), threads, spinning=spinning
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
