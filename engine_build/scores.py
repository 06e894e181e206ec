"""Class probabilities from logits: the one softmax that the worker scores posts with and the
parity gate compares backends by, so the gate measures what a result's confidence will be."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable row-wise softmax in float64 (FP16 logits overflow exp otherwise)."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z
