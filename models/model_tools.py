"""Shared by the scripts that build the bundled models: calibration reader and the accuracy oracle."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader


class ArrayReader(CalibrationDataReader):
    """Feeds the whole calibration set as one batch to the input named ``x``."""

    def __init__(self, x: np.ndarray):
        self.batches = iter([{"x": x}])

    def get_next(self):
        return next(self.batches, None)


def accuracy(model_path: Path, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of an ONNX model on (x, y), onnxruntime with graph optimizations off (the oracle)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    logits = session.run(None, {"x": x})[0]
    return float(np.mean(np.argmax(logits, axis=1) == y))
