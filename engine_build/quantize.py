"""INT8 for the CPU path: ONNX Runtime static quantisation (QDQ) calibrated on real images."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

log = logging.getLogger(__name__)


class ImageCalibrationReader(CalibrationDataReader):
    """Feeds preprocessed images to the calibrator in small batches."""

    def __init__(self, input_name: str, images: np.ndarray, batch: int = 8):
        self._batches = iter(
            [{input_name: images[i : i + batch]} for i in range(0, len(images), batch)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantize_int8(
    fp32_path: Path, out_path: Path, input_name: str, calibration: np.ndarray, work_dir: Path
) -> Path:
    """QDQ int8 model (per-channel weights, MinMax activations) next to ``fp32_path``."""
    prepared = Path(work_dir) / "model.preprocessed.onnx"
    quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
    quantize_static(
        str(prepared),
        str(out_path),
        ImageCalibrationReader(input_name, calibration.astype(np.float32)),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        calibrate_method=CalibrationMethod.MinMax,
    )
    prepared.unlink(missing_ok=True)
    log.info("int8 QDQ model calibrated on %d images -> %s", len(calibration), out_path.name)
    return Path(out_path)
