"""Write the Keras part of the public-model regression set: ONNX files as tf2onnx writes them from Keras.

    /tmp/tfenv/bin/python models/make_tf2onnx_models.py   # needs tensorflow, tf2onnx, onnxruntime, scikit-learn

(TensorFlow is for this script only: flowtile and its tests never import it; the files it writes are committed.)
Everything goes to ``models/public/tf_*_{float,qdq}.onnx``; this script replaces its own rows (``tf_*``) in
``models/public/README.md`` and its paragraph there (versions), and keeps every other row
(``models/make_public_models.py``'s) as it is. The conventions are ``make_public_models.py``'s: seed 0, briefly
trained (30 epochs of Adam, lr 3e-3, batches of 64, one thread, TensorFlow's deterministic ops) on
scikit-learn's bundled 8x8 digits (pixels scaled to [0, 1], the 80/20 stratified split), one input ``x`` (its
batch dimension dynamic: ``input_signature`` with ``None``) and one output ``y`` (the last Dense layer is named
``y``), and each model as

* ``*_float.onnx``: ``tf2onnx.convert.from_keras(model, input_signature)``, everything else tf2onnx's default
  (its default opset, its own graph optimizers on), saved as it is returned;
* ``*_qdq.onnx``: onnxruntime's ``quantize_static`` of that file (QDQ, int8 activations, per-channel int8
  weights, calibrated on 128 training images), as a user would.

Reruns give the same weights and graphs; the bytes may still differ in a constant's name (tf2onnx's duplicate-constant
merging keeps one of two equal constants in an order that varies from run to run: ``tf_cnn``'s Slice reads its
``starts`` and ``axes`` from one constant named ``const_axes__NN`` or ``const_starts__NN``), so the committed files
are one run's and the README records their sha256.

The Keras models (the forms a Keras user gets; inputs channels-last, as Keras wants them):

* ``tf_mlp``: ``[N, 64]`` -> Dense 64 -> BatchNormalization -> ReLU -> Dropout 0.2 -> Dense 10;
* ``tf_seq``: ``[N, 8, 8]`` (the image rows as 8 steps of 8 features, ``[N, T, C]``) -> Dense 16 (ReLU), a
  Dense on a 3-D input, which Keras computes with ``tf.tensordot`` -> Flatten -> Dense 10;
* ``tf_cnn``: ``[N, 8, 8, 1]`` (NHWC, grey) -> Conv2D 8 3x3 ``same`` (ReLU) -> MaxPooling2D 2 -> Conv2D 16 3x3
  ``same`` (ReLU) -> MaxPooling2D 2 -> Flatten -> Dropout 0.25 -> Dense 10 (the Keras MNIST example's shape);
* ``tf_cnn_rgb``: ``[N, 8, 8, 3]`` (NHWC; the grey digit in all three channels, as grey images are fed to RGB
  networks) -> Conv2D 8 3x3 ``same`` -> BatchNormalization -> ReLU -> MaxPooling2D 2 -> Conv2D 16 3x3 stride 2
  ``same`` (ReLU) -> GlobalAveragePooling2D -> Dense 10.

What tf2onnx 1.17 writes for them (flowtile's import normalizes each form: compiler/normalize.py, its rules named):

* every Dense: ``MatMul -> Add(bias)``; BatchNormalization on a vector: ``Mul(a) -> Add(beta - mean * a)``
  (``fold_bias_add``, ``fold_dense_scale``); Dropout: nothing;
* Dense on ``[N, T, C]``: ``Reshape(x, [-1, C]) -> MatMul -> Reshape(., Cast(Concat(Gather(Cast(Shape(x), int32),
  [0, 1]), [K]), int64)) -> Add -> Relu`` (``reshape_static_target``, ``tensordot_to_matmul``); Flatten:
  ``Reshape(., [-1, T*K])``;
* an NHWC input: ``Transpose(perm=[0, 3, 1, 2])`` first, with one channel ``Reshape(x, [-1, 1, H, W])``
  (``channels_last_input``: the host transposes); the Conv2Ds, pools and BatchNormalization in NCHW between them
  (``padding='same'`` as explicit, with stride 2 asymmetric, pads; BatchNormalization after a Conv as ``Mul -> Add``,
  which onnxruntime folds into the Conv); Flatten after a map: ``Transpose(perm=[0, 2, 3, 1]) -> Reshape(.,
  Cast(Concat(Slice(Cast(Gather(Shape(map), [0, 2, 3, 1])), 0, 1), [n])))`` (``reshape_static_target``,
  ``channels_last_flatten``); GlobalAveragePooling2D: ``GlobalAveragePool -> Squeeze(axes=[2, 3])``
  (``squeeze_to_flatten``).

``quantize_static`` then adds a Q/DQ pair after every Reshape, Transpose and Squeeze with its input's scale and zero
point, and quantizes bias Adds and BatchNormalization's Mul and Add as separate steps (affine layers).
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = HERE / "public"
README = OUT / "README.md"
SEED = 0
EPOCHS = 30
NETS = ("tf_mlp", "tf_seq", "tf_cnn", "tf_cnn_rgb")
#: The README paragraph this script owns (replaced on every run).
PARAGRAPH = "The `tf_*` rows are written by `/tmp/tfenv/bin/python models/make_tf2onnx_models.py`"


# the torch models' calibration reader and digits split (this script runs beside it, in models/)
from make_public_models import _Reader, digits, ort_accuracy, sha256  # noqa: E402


def as_input(name: str, x: np.ndarray) -> np.ndarray:
    """Flat 64-pixel digits -> the network's input layout."""
    if name == "tf_seq":
        return x.reshape(-1, 8, 8)
    if name == "tf_cnn":
        return x.reshape(-1, 8, 8, 1)
    if name == "tf_cnn_rgb":
        return np.repeat(x.reshape(-1, 8, 8, 1), 3, axis=3)
    return x


def build(name: str):
    import tensorflow as tf
    layers = tf.keras.layers
    if name == "tf_mlp":
        x = tf.keras.Input((64,), name="x")
        h = layers.Dense(64)(x)
        h = layers.BatchNormalization()(h)
        h = layers.ReLU()(h)
        h = layers.Dropout(0.2)(h)
    elif name == "tf_seq":
        x = tf.keras.Input((8, 8), name="x")
        h = layers.Dense(16, activation="relu")(x)
        h = layers.Flatten()(h)
    elif name == "tf_cnn":
        x = tf.keras.Input((8, 8, 1), name="x")
        h = layers.Conv2D(8, 3, padding="same", activation="relu")(x)
        h = layers.MaxPooling2D(2)(h)
        h = layers.Conv2D(16, 3, padding="same", activation="relu")(h)
        h = layers.MaxPooling2D(2)(h)
        h = layers.Flatten()(h)
        h = layers.Dropout(0.25)(h)
    elif name == "tf_cnn_rgb":
        x = tf.keras.Input((8, 8, 3), name="x")
        h = layers.Conv2D(8, 3, padding="same")(x)
        h = layers.BatchNormalization()(h)
        h = layers.ReLU()(h)
        h = layers.MaxPooling2D(2)(h)
        h = layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(h)
        h = layers.GlobalAveragePooling2D()(h)
    else:
        raise ValueError(name)
    return tf.keras.Model(x, layers.Dense(10, name="y")(h), name=name)


def train(name: str, x: np.ndarray, y: np.ndarray):
    import tensorflow as tf
    tf.keras.utils.set_random_seed(SEED)
    model = build(name)
    model.compile(optimizer=tf.keras.optimizers.Adam(3e-3),
                  loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=64, epochs=EPOCHS, shuffle=True, verbose=0)
    return model


def export(model, path: Path) -> int:
    """``tf2onnx.convert.from_keras`` with a dynamic batch, everything else its defaults; returns the opset."""
    import tensorflow as tf
    import tf2onnx
    signature = (tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name="x"),)
    tf2onnx.convert.from_keras(model, input_signature=signature, output_path=str(path))
    return _opset(path)


def quantize(float_path: Path, qdq_path: Path, calibration: np.ndarray) -> None:
    logging.getLogger().setLevel(logging.ERROR)
    quantize_static(str(float_path), str(qdq_path), _Reader(calibration, "x", fixed_batch=False),
                    quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    per_channel=True)


def _opset(path: Path) -> int:
    return next(o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx"))


def update_readme(rows, versions: str) -> None:
    """Replace this script's rows (``tf_*``) and paragraph in models/public/README.md; keep everything else."""
    lines = README.read_text().splitlines() if README.exists() else [
        "# Public-model regression set", "", "| file | made by | opset | notes | bytes | sha256 |",
        "|---|---|---|---|---|---|"]
    kept = [line for line in lines if not line.startswith("| `tf_") and not line.startswith(PARAGRAPH)]
    lines = [line for i, line in enumerate(kept) if line or i == 0 or kept[i - 1]]  # no doubled blank lines
    paragraph = (f"{PARAGRAPH} (Keras models exported by `tf2onnx.convert.from_keras`, its default opset, dynamic "
                 f"batch; trained briefly on the digits; not by `make_public_models.py`), made with {versions}.")
    table = next(i for i, line in enumerate(lines) if line.startswith("| file |"))
    while table > 0 and lines[table - 1] == "":
        table -= 1
    lines[table:table] = ["", paragraph]
    for file, how, opset, notes in rows:
        path = OUT / file
        lines.append(f"| `{file}` | {how} | {opset} | {notes} | {path.stat().st_size} | `{sha256(path)}` |")
    README.write_text("\n".join(lines) + "\n")


def main() -> None:
    import onnxruntime
    import sklearn
    import tensorflow as tf
    import tf2onnx
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.experimental.enable_op_determinism()
    OUT.mkdir(exist_ok=True)
    versions = (f"tensorflow {tf.__version__} (keras {tf.keras.__version__}), tf2onnx {tf2onnx.__version__}, "
                f"onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, scikit-learn {sklearn.__version__}, "
                f"CPython {sys.version.split()[0]}")
    x_train, x_test, y_train, y_test = digits()
    calibration = x_train[np.random.default_rng(SEED).permutation(len(x_train))[:128]]
    rows = []
    for name in NETS:
        model = train(name, as_input(name, x_train), y_train)
        float_path, qdq_path = OUT / f"{name}_float.onnx", OUT / f"{name}_qdq.onnx"
        opset = export(model, float_path)
        quantize(float_path, qdq_path, as_input(name, calibration))
        xs = as_input(name, x_test)
        acc_k = float(np.mean(np.argmax(model.predict(xs, verbose=0), axis=1) == y_test))
        acc_f, acc_q = ort_accuracy(float_path, xs, y_test), ort_accuracy(qdq_path, xs, y_test)
        how = "tf2onnx.convert.from_keras, dynamic batch"
        shape = "x".join(str(d) for d in model.input_shape[1:])
        rows.append((float_path.name, how, opset,
                     f"float; Keras, input [N, {shape.replace('x', ', ')}]; trained on digits, test accuracy "
                     f"{acc_f:.3f} (Keras {acc_k:.3f})"))
        rows.append((qdq_path.name, how + " -> quantize_static", _opset(qdq_path),
                     f"QDQ int8 per-channel; test accuracy {acc_q:.3f}"))
        print(f"{name:11s} opset {opset}: keras {acc_k:.3f}, float {acc_f:.3f}, int8 {acc_q:.3f}")
    update_readme(rows, versions)


if __name__ == "__main__":
    main()
