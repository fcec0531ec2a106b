"""Train the bundled example CNN and write it as ONNX (float and int8 QDQ) plus its test split.

    python models/make_digits_cnn.py          # needs torch (optional dependency, this script only)

A small CNN on scikit-learn's bundled 8x8 digits (no download; pixels scaled to [0, 1]), input
``x`` [N, 1, 8, 8]: Conv 3x3 pad 1 (8 ch) + ReLU -> MaxPool 2 -> Conv 3x3 pad 1 (16 ch) + ReLU ->
MaxPool 2 -> Flatten -> Gemm 10 (logits). Trained with torch (one thread, fixed seed) on the same
80/20 stratified split as ``make_digits_mlp.py``, exported with ``torch.onnx.export(dynamo=False)``,
then quantized with onnxruntime's ``quantize_static`` (QDQ, per-channel int8 weights, int8
activations) calibrated on a subset of the training split. Writes, next to this script:

* ``digits_cnn_float.onnx``: the float network;
* ``digits_cnn.onnx``: the int8 QDQ network (what ``flowtile compile`` takes);
* ``digits_cnn_test.npz``: the held-out split, ``x`` float32 ``[n, 1, 8, 8]`` and ``y`` int64 ``[n]``.

Prints float and int8 test accuracy (int8 by onnxruntime with graph optimizations disabled).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from model_tools import ArrayReader, accuracy  # a sibling of this script

HERE = Path(__file__).resolve().parent
SEED = 0
EPOCHS = 60
CALIBRATION_SAMPLES = 256
OPSET = 17


def data() -> tuple[np.ndarray, ...]:
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)  # pixels are 0..16
    y = digits.target.astype(np.int64)
    return train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)


def train(x_train: np.ndarray, y_train: np.ndarray):
    import torch
    from torch import nn

    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 2 * 2, 10))
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    x, y = torch.from_numpy(x_train), torch.from_numpy(y_train)
    generator = torch.Generator().manual_seed(SEED)
    for _ in range(EPOCHS):
        for batch in torch.randperm(len(x), generator=generator).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(x[batch]), y[batch]).backward()
            optimizer.step()
    return net.eval()


def export(net, path: Path) -> None:
    import torch

    torch.onnx.export(net, torch.zeros(1, 1, 8, 8), str(path), input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, opset_version=OPSET, dynamo=False)
    model = onnx.load(str(path))
    counts: dict[str, int] = {}
    short = {"Conv": "conv", "Relu": "relu", "MaxPool": "pool", "Flatten": "flatten", "Gemm": "fc"}
    for node in model.graph.node:  # readable node names (conv1, pool1, ..., fc1) for compiler messages
        prefix = short.get(node.op_type, node.op_type.lower())
        counts[prefix] = counts.get(prefix, 0) + 1
        node.name = f"{prefix}{counts[prefix]}"
    onnx.save(model, str(path))


def main() -> None:
    x_train, x_test, y_train, y_test = data()
    net = train(x_train, y_train)
    float_path, int8_path = HERE / "digits_cnn_float.onnx", HERE / "digits_cnn.onnx"
    export(net, float_path)
    calibration = x_train[np.random.default_rng(SEED).permutation(len(x_train))[:CALIBRATION_SAMPLES]]
    logging.getLogger().setLevel(logging.ERROR)  # quantize_static's "consider pre-processing" advice
    quantize_static(str(float_path), str(int8_path), ArrayReader(calibration), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True)
    np.savez_compressed(HERE / "digits_cnn_test.npz", x=x_test, y=y_test)
    print(f"float ONNX test accuracy:          {accuracy(float_path, x_test, y_test):.4f}")
    print(f"int8 QDQ ONNX test accuracy (ORT): {accuracy(int8_path, x_test, y_test):.4f}")
    print(f"wrote {float_path.name}, {int8_path.name}, digits_cnn_test.npz ({len(y_test)} test samples)")


if __name__ == "__main__":
    main()
