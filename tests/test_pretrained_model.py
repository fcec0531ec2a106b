"""A pretrained public CNN, float in, quantized by flowtile: the ONNX Model Zoo's MNIST classifier (mnist-8).

``models/mnist8.onnx`` is mnist-8 exactly as the ONNX Model Zoo publishes it (CNTK, Apache-2.0; fetched and
verified by ``models/make_mnist8.py``): fixed batch 1, opset 8, ``auto_pad=SAME_UPPER``, biases as separate
Adds, a constant Reshape as flatten. ``models/mnist8_eval.npz`` holds 1000 labelled MNIST digits and
``mnist8_calibration.npz`` 200 others (see that script for sources and licenses). flowtile normalizes the
published graph (compiler/normalize.py), quantizes the float model with onnxruntime's ``quantize_static``,
compiles it for a 6x6 grid and runs it on the emulator; the results
must stay within 1 LSB of onnxruntime's int8 run of the same quantized model (``flowtile.oracle``) and give
the same top-1 accuracy within 0.5 points.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from flowtile.compiler import compile_model, int8_model
from flowtile.testing.archs import lean_arch
from flowtile.host import input_flits, outputs_from_flits
from flowtile.oracle import onnxruntime_float_output, onnxruntime_int8_output

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
MODEL = MODELS / "mnist8.onnx"
#: mnist-8 as the ONNX Model Zoo publishes it (validated/vision/classification/mnist/model/mnist-8.onnx)
MNIST8_SHA256 = "2f06e72de813a8635c9bc0397ac447a601bdbfa7df4bebc278723b958831c9bf"
GRID = lean_arch(rows=6, cols=6)
#: Evaluation digits run on the emulator (all 1000: about 8.5 s here); the file's order is class-interleaved,
#: so a shorter prefix stays class-balanced.
SLICE = 1000


@pytest.fixture(scope="module")
def data():
    with np.load(MODELS / "mnist8_eval.npz") as evaluation, np.load(MODELS / "mnist8_calibration.npz") as calibration:
        return evaluation["x"], evaluation["y"], calibration["x"]


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits.reshape(len(labels), -1), axis=1) == labels))


def test_packaged_files_agree():
    """mnist8.onnx is the published mnist-8, byte for byte, and the data sets are as described."""
    assert hashlib.sha256(MODEL.read_bytes()).hexdigest() == MNIST8_SHA256
    assert f'MNIST8_SHA256 = "{MNIST8_SHA256}"' in (MODELS / "make_mnist8.py").read_text()  # the script checks it too
    model = onnx.load(str(MODEL))
    onnx.checker.check_model(model)
    assert model.producer_name == "CNTK" and model.opset_import[0].version == 8
    assert [n.op_type for n in model.graph.node] == ["Reshape", "Conv", "Add", "Relu", "MaxPool", "Conv", "Add", "Relu",
                                                     "MaxPool", "Reshape", "MatMul", "Add"]
    assert not (MODELS / "mnist8_weights.npz").exists()
    with np.load(MODELS / "mnist8_eval.npz") as evaluation, np.load(MODELS / "mnist8_calibration.npz") as calibration:
        x, y, x_cal = evaluation["x"], evaluation["y"], calibration["x"]
    assert x.shape == (1000, 1, 28, 28) and x.dtype == np.float32 and y.shape == (1000,)
    assert x_cal.shape == (200, 1, 28, 28) and x_cal.dtype == np.float32
    assert x.min() == 0 and x.max() == 255 and np.array_equal(x, np.round(x))
    assert np.array_equal(np.bincount(y[:SLICE], minlength=10), np.full(10, SLICE // 10))
    # evaluation and calibration digits are disjoint
    assert not {row.tobytes() for row in x} & {row.tobytes() for row in x_cal}


def test_float_model_is_trained(data):
    x, y, _ = data
    float_accuracy = accuracy(onnxruntime_float_output(MODEL, x), y)
    assert float_accuracy >= 0.98, float_accuracy  # measured 0.9930; an untrained network gets about 0.1


def test_emulator_matches_onnxruntime_int8(data):
    emulator = pytest.importorskip("emulator")
    x, y, x_cal = data
    x, y = x[:SLICE], y[:SLICE]
    int8 = int8_model(MODEL, x_cal)  # quantized once: the compiler and the oracle get the same model
    program = compile_model(int8, GRID)
    assert [layer.name for layer in program.layers] == ["Convolution28", "Pooling66", "Convolution110", "Pooling160",
                                                        "Times212"]
    _q_in, flits = input_flits(program, x)
    result = emulator.emulate(program, flits, len(x))
    q_out, y_out = outputs_from_flits(program, result.out_flits, len(x))
    ort_q, ort_y = onnxruntime_int8_output(int8, program, x)
    assert np.abs(q_out.astype(np.int32) - ort_q.astype(np.int32)).max() <= 1
    flowtile_accuracy, ort_accuracy = accuracy(y_out, y), accuracy(ort_y, y)
    assert abs(flowtile_accuracy - ort_accuracy) <= 0.005, (flowtile_accuracy, ort_accuracy)
    assert flowtile_accuracy >= 0.98, flowtile_accuracy


def test_cli_runs_the_float_model(tmp_path, data):
    """``flowtile run`` as the README shows it: float model in, quantized on the way, emulator vs onnxruntime."""
    x, y, _ = data
    np.savez(tmp_path / "digits.npz", x=x[:40], y=y[:40])
    env = dict(os.environ, AMARANTH_USE_YOSYS="builtin")
    env.pop("FLOWTILE_DEBUG", None)
    result = subprocess.run(
        [sys.executable, "-m", "flowtile.cli", "run", str(MODEL), "--grid", "6x6", "--input", str(tmp_path / "digits.npz"),
         "--calibration", str(MODELS / "mnist8_calibration.npz"), "--float-model", str(MODEL), "--sim", "none"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS" in result.stdout and "accuracy flowtile" in result.stdout
    assert "quantizing to int8" in result.stderr
