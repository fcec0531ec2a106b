"""Train the bundled example network and write it as ONNX (float and int8 QDQ) plus its test split.

    python models/make_digits_mlp.py

An MLP 64 -> 64 -> 32 -> 10 (ReLU) on scikit-learn's bundled 8x8 digits (no download; pixels scaled
to [0, 1]), trained with ``MLPClassifier`` (fixed seed) on an 80/20 stratified split. The float
network is written by hand with ``onnx.helper`` (Gemm + Relu, logits out), then quantized with
onnxruntime's ``quantize_static`` (QDQ, per-channel int8 weights, int8 activations) calibrated on
a subset of the training split. Writes, next to this script:

* ``digits_mlp_float.onnx``: the float network;
* ``digits_mlp.onnx``: the int8 QDQ network (what ``flowtile compile`` takes);
* ``digits_test.npz``: the held-out split, ``x`` float32 ``[n, 64]`` and ``y`` int64 ``[n]``.

Prints float and int8 test accuracy (int8 by onnxruntime with graph optimizations disabled: its
fused int8 kernels are CPU-dependent).
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

from model_tools import ArrayReader, accuracy  # a sibling of this script

HERE = Path(__file__).resolve().parent
SEED = 0
HIDDEN = (64, 32)
CALIBRATION_SAMPLES = 256
OPSET = 17


def train() -> tuple[MLPClassifier, tuple[np.ndarray, ...]]:
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)  # pixels are 0..16
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings: the accuracy printed below is what counts
        mlp = MLPClassifier(hidden_layer_sizes=HIDDEN, activation="relu", max_iter=400, random_state=SEED)
        mlp.fit(x_train, y_train)
    return mlp, (x_train, x_test, y_train, y_test)


def to_onnx(mlp: MLPClassifier) -> onnx.ModelProto:
    """The float network as Gemm(transB=1) + Relu nodes, input ``x`` [batch, 64], output ``logits`` [batch, 10]."""
    nodes, initializers, tensor = [], [], "x"
    n_layers = len(mlp.coefs_)
    for i, (weight, bias) in enumerate(zip(mlp.coefs_, mlp.intercepts_)):
        initializers += [numpy_helper.from_array(weight.T.astype(np.float32), f"fc{i + 1}.weight"),
                         numpy_helper.from_array(bias.astype(np.float32), f"fc{i + 1}.bias")]
        out = "logits" if i == n_layers - 1 else f"fc{i + 1}"
        nodes.append(helper.make_node("Gemm", [tensor, f"fc{i + 1}.weight", f"fc{i + 1}.bias"], [out],
                                      name=f"fc{i + 1}", transB=1))
        tensor = out
        if i < n_layers - 1:
            nodes.append(helper.make_node("Relu", [tensor], [f"relu{i + 1}"], name=f"relu{i + 1}"))
            tensor = f"relu{i + 1}"
    graph = helper.make_graph(
        nodes, "digits_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="flowtile")
    onnx.checker.check_model(model)
    return model


def main() -> None:
    mlp, (x_train, x_test, y_train, y_test) = train()
    float_path, int8_path = HERE / "digits_mlp_float.onnx", HERE / "digits_mlp.onnx"
    onnx.save(to_onnx(mlp), float_path)
    calibration = x_train[np.random.default_rng(SEED).permutation(len(x_train))[:CALIBRATION_SAMPLES]]
    logging.getLogger().setLevel(logging.ERROR)  # quantize_static's "consider pre-processing" advice
    quantize_static(str(float_path), str(int8_path), ArrayReader(calibration), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True)
    np.savez_compressed(HERE / "digits_test.npz", x=x_test, y=y_test)
    print(f"sklearn MLPClassifier test accuracy: {mlp.score(x_test, y_test):.4f}")
    print(f"float ONNX test accuracy:            {accuracy(float_path, x_test, y_test):.4f}")
    print(f"int8 QDQ ONNX test accuracy (ORT):   {accuracy(int8_path, x_test, y_test):.4f}")
    print(f"wrote {float_path.name}, {int8_path.name}, digits_test.npz ({len(y_test)} test samples)")


if __name__ == "__main__":
    main()
