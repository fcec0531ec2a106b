"""Write the public-model regression set: ONNX files as torch and onnxruntime publish them.

    python models/make_public_models.py       # needs torch and onnxscript (optional, this script only)

Everything goes to ``models/public/`` with its provenance in ``models/public/README.md`` (what made each
file, exporter, versions, opset, sha256). Seeds are fixed; every model has one input ``x`` and one output ``y``.

1. torchvision-style small modules, briefly trained (one thread, fixed seed) on scikit-learn's bundled 8x8
   digits (no download; pixels scaled to [0, 1]; the 80/20 stratified split of ``make_digits_mlp.py``):

   * ``tv_mlp``: ``[N, 64]`` -> Linear 64 -> BatchNorm1d -> ReLU -> Dropout -> Linear 10 (nn.Linear on 2-D);
   * ``tv_seq``: ``[N, 8, 8]`` (the image rows as 8 steps of 8 features, ``[N, T, C]``) -> Linear 16 ->
     ReLU -> ``x.reshape(x.shape[0], -1)`` -> Linear 10 (nn.Linear on 3-D input, flatten by Reshape);
   * ``tv_cnn``: ``[N, 1, 8, 8]`` -> Conv 3x3 (no bias) + BatchNorm2d + ReLU -> Conv 3x3 stride 2 (no bias) +
     BatchNorm2d + ReLU -> AdaptiveAvgPool2d(1) -> torch.flatten(x, 1) -> Linear 10 (torchvision's ResNet tail).

   each exported three ways: TorchScript exporter (``dynamo=False``) with constant folding on (opset 13,
   dynamic batch), with constant folding off (opset 17, dynamic batch), and the dynamo exporter
   (``dynamo=True``, its default opset, fixed batch 1); each as float (``*_float.onnx``) and quantized by
   onnxruntime's ``quantize_static`` (``*_qdq.onnx``: QDQ, int8 activations, per-channel int8 weights,
   calibrated on 128 training images) applied to the raw export, as a user would.

2. MLPerf-Tiny-shaped networks, as the MLPerf Tiny reference Keras code builds them, written as NCHW torch
   modules with **random but fixed weights** (not trained: these test the compiler, not accuracy); BatchNorm
   running statistics are set from a forward pass over seeded random inputs (so activations keep a sane
   range), BatchNorm affine parameters are random. Exported with the TorchScript exporter (opset 13, constant
   folding on, dynamic batch) as float and QDQ int8 (calibrated on 64 seeded standard-normal inputs):

   * ``mlperf_resnet8``: CIFAR-10 ``[N, 3, 32, 32]``: Conv 3x3 16 + BN + ReLU; 3 stacks of a basic residual
     block (16, 32 stride 2, 64 stride 2 filters; Conv 3x3 + BN + ReLU, Conv 3x3 + BN, shortcut identity or
     Conv 1x1 stride 2, Add, ReLU); AvgPool 8x8 (pool size = map); Flatten; Linear 10; Softmax;
   * ``mlperf_dscnn``: KWS ``[N, 1, 49, 10]``: Conv 10x4 stride 2 64 + BN + ReLU (+ Dropout); 4 x (depthwise
     3x3 + BN + ReLU, pointwise 1x1 64 + BN + ReLU); (Dropout); AvgPool 25x5 (= map); Flatten; Linear 12;
     Softmax;
   * ``mlperf_mobilenet``: VWW ``[N, 3, 96, 96]``: MobileNetV1 alpha 0.25 (Conv 3x3 stride 2 8 + BN + ReLU,
     13 depthwise-separable blocks up to 256 channels, strides as MobileNetV1), AvgPool 3x3 (= map); Flatten;
     Linear 2; Softmax;
   * ``mlperf_autoencoder``: anomaly detection ``[N, 640]``: 4 x (Linear 128 + BN + ReLU), Linear 8 + BN +
     ReLU, 4 x (Linear 128 + BN + ReLU), Linear 640.

   Keras ``padding="same"`` with stride 2 pads asymmetrically (more at the bottom/right); these torch modules
   pad symmetrically, which keeps every map size of the reference (DS-CNN's stem pads (5, 1): 25x5 out).
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.calibrate import CalibrationDataReader

HERE = Path(__file__).resolve().parent
OUT = HERE / "public"
SEED = 0
EPOCHS = 30

# name: (exporter, opset or None for the exporter's default, do_constant_folding, dynamic batch)
EXPORTS = {
    "ts_fold": ("torchscript", 13, True, True),
    "ts_nofold": ("torchscript", 17, False, True),
    "dynamo": ("dynamo", None, True, False),
}


class _Reader(CalibrationDataReader):
    def __init__(self, x: np.ndarray, name: str, fixed_batch: bool):
        # a fixed-batch-1 model takes its calibration one sample at a time
        self.batches = iter([{name: x[i:i + 1]} for i in range(len(x))] if fixed_batch else [{name: x}])

    def get_next(self):
        return next(self.batches, None)


def digits():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    return train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)


# ---------------------------------------------------------------------------------------------- modules

def modules():
    import torch
    from torch import nn
    import torch.nn.functional as F

    class TvMlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(64, 64)
            self.bn1 = nn.BatchNorm1d(64)
            self.drop = nn.Dropout(0.2)
            self.fc2 = nn.Linear(64, 10)

        def forward(self, x):
            return self.fc2(self.drop(F.relu(self.bn1(self.fc1(x)))))

    class TvSeq(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 16)
            self.head = nn.Linear(8 * 16, 10)

        def forward(self, x):  # x [N, T=8, C=8]
            x = F.relu(self.proj(x))
            return self.head(x.reshape(x.shape[0], -1))

    class TvCnn(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(8)
            self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(16)
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            x = F.relu(self.bn1(self.conv1(x)))
            x = F.relu(self.bn2(self.conv2(x)))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    def conv_bn(cin, cout, k, stride, padding, groups=1):
        return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU())

    class Block(nn.Module):  # MLPerf Tiny ResNet-8 stack: basic block, 1x1 conv shortcut when it strides
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
            self.bn2 = nn.BatchNorm2d(cout)
            self.shortcut = nn.Conv2d(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()

        def forward(self, x):
            y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
            return F.relu(y + self.shortcut(x))

    class ResNet8(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU())
            self.stacks = nn.Sequential(Block(16, 16, 1), Block(16, 32, 2), Block(32, 64, 2))
            self.pool = nn.AvgPool2d(8)
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            x = self.pool(self.stacks(self.stem(x)))
            return F.softmax(self.fc(torch.flatten(x, 1)), dim=1)

    class DsCnn(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 64, (10, 4), 2, (5, 1)), nn.BatchNorm2d(64), nn.ReLU(),
                                      nn.Dropout(0.2))
            blocks = []
            for _ in range(4):
                blocks += [nn.Conv2d(64, 64, 3, 1, 1, groups=64), nn.BatchNorm2d(64), nn.ReLU(),
                           nn.Conv2d(64, 64, 1), nn.BatchNorm2d(64), nn.ReLU()]
            self.blocks = nn.Sequential(*blocks, nn.Dropout(0.4))
            self.pool = nn.AvgPool2d((25, 5))
            self.fc = nn.Linear(64, 12)

        def forward(self, x):
            x = self.pool(self.blocks(self.stem(x)))
            return F.softmax(self.fc(torch.flatten(x, 1)), dim=1)

    class MobileNetV1(nn.Module):  # alpha 0.25, 96x96, 2 classes (MLPerf Tiny VWW)
        def __init__(self, alpha=0.25, classes=2):
            super().__init__()
            c = lambda n: int(n * alpha)  # noqa: E731
            layers = [conv_bn(3, c(32), 3, 2, 1)]
            plan = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + \
                   [(1024, 2), (1024, 1)]
            cin = c(32)
            for cout, stride in plan:
                layers += [conv_bn(cin, cin, 3, stride, 1, groups=cin), conv_bn(cin, c(cout), 1, 1, 0)]
                cin = c(cout)
            self.features = nn.Sequential(*layers)
            self.pool = nn.AvgPool2d(3)
            self.fc = nn.Linear(cin, classes)

        def forward(self, x):
            x = self.pool(self.features(x))
            return F.softmax(self.fc(torch.flatten(x, 1)), dim=1)

    class AutoEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            widths = [640, 128, 128, 128, 128, 8, 128, 128, 128, 128]
            layers = []
            for a, b in zip(widths, widths[1:]):
                layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU()]
            self.body = nn.Sequential(*layers)
            self.out = nn.Linear(128, 640)

        def forward(self, x):
            return self.out(self.body(x))

    return {"tv_mlp": (TvMlp, (64,)), "tv_seq": (TvSeq, (8, 8)), "tv_cnn": (TvCnn, (1, 8, 8)),
            "mlperf_resnet8": (ResNet8, (3, 32, 32)), "mlperf_dscnn": (DsCnn, (1, 49, 10)),
            "mlperf_mobilenet": (MobileNetV1, (3, 96, 96)), "mlperf_autoencoder": (AutoEncoder, (640,))}


# ---------------------------------------------------------------------------------------------- making

def train(net, x: np.ndarray, y: np.ndarray):
    import torch
    from torch import nn
    torch.manual_seed(SEED)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(SEED)
    net.train()
    for _ in range(EPOCHS):
        for batch in torch.randperm(len(xt), generator=generator).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(xt[batch]), yt[batch]).backward()
            optimizer.step()
    return net.eval()


def randomize(net, shape: tuple[int, ...], rng: np.random.Generator):
    """Random fixed BN affine parameters; running statistics from one pass over seeded random inputs."""
    import torch
    from torch import nn
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, m.num_features).astype(np.float32)))
                m.bias.copy_(torch.from_numpy(rng.uniform(-0.2, 0.2, m.num_features).astype(np.float32)))
                m.momentum = None  # cumulative average: one pass gives the batch's statistics
                m.reset_running_stats()
        net.train()
        net(torch.from_numpy(rng.standard_normal((256, *shape)).astype(np.float32)))
    return net.eval()


def export(net, shape, path: Path, form: str) -> int:
    """Write ``net`` as ONNX with the exporter ``form`` names; returns the opset written."""
    import torch
    exporter, opset, folding, dynamic = EXPORTS[form]
    example = (torch.zeros(1, *shape),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(net, example, str(path), input_names=["x"], output_names=["y"], opset_version=opset,
                              do_constant_folding=folding, dynamo=False,
                              dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}} if dynamic else None)
        else:
            program = torch.onnx.export(net, example, input_names=["x"], output_names=["y"], dynamo=True,
                                        optimize=True, verbose=False)
            program.save(str(path))
    model = onnx.load(str(path), load_external_data=True)
    onnx.save(model, str(path))  # one self-contained file, no external data
    side = path.with_name(path.name + ".data")
    if side.exists():
        side.unlink()
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def quantize(float_path: Path, qdq_path: Path, calibration: np.ndarray, fixed_batch: bool) -> None:
    logging.getLogger().setLevel(logging.ERROR)
    quantize_static(str(float_path), str(qdq_path), _Reader(calibration, "x", fixed_batch),
                    quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    per_channel=True)


def ort_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    fixed = session.get_inputs()[0].shape[0] == 1
    outs = [session.run(None, {"x": x[i:i + 1]})[0] for i in range(len(x))] if fixed else \
        [session.run(None, {"x": x})[0]]
    return float(np.mean(np.argmax(np.concatenate(outs), axis=1) == y))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    import torch
    import onnxruntime
    torch.set_num_threads(1)
    OUT.mkdir(exist_ok=True)
    nets = modules()
    rows = []  # (file, made by, opset, notes)
    x_train, x_test, y_train, y_test = digits()
    versions = (f"torch {torch.__version__}, onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}, "
                f"onnxscript {_onnxscript_version()}")
    have_dynamo = _onnxscript_version() != "absent"
    if not have_dynamo:
        print("onnxscript is not installed: skipping the dynamo exports", file=sys.stderr)

    for name in ("tv_mlp", "tv_seq", "tv_cnn"):
        cls, shape = nets[name]
        torch.manual_seed(SEED)
        net = train(cls(), x_train.reshape(-1, *shape), y_train)
        xs = x_test.reshape(-1, *shape)
        calibration = x_train[np.random.default_rng(SEED).permutation(len(x_train))[:128]].reshape(-1, *shape)
        for form in EXPORTS:
            if EXPORTS[form][0] == "dynamo" and not have_dynamo:
                continue
            float_path, qdq_path = OUT / f"{name}_{form}_float.onnx", OUT / f"{name}_{form}_qdq.onnx"
            opset = export(net, shape, float_path, form)
            quantize(float_path, qdq_path, calibration, fixed_batch=not EXPORTS[form][3])
            acc_f, acc_q = ort_accuracy(float_path, xs, y_test), ort_accuracy(qdq_path, xs, y_test)
            how = _describe(form)
            rows.append((float_path.name, how, opset, f"float; trained on digits, test accuracy {acc_f:.3f}"))
            rows.append((qdq_path.name, how + " -> quantize_static", _opset(qdq_path),
                         f"QDQ int8 per-channel; test accuracy {acc_q:.3f}"))
            print(f"{name:10s} {form:9s} opset {opset}: float {acc_f:.3f}, int8 {acc_q:.3f}")

    for name in ("mlperf_resnet8", "mlperf_dscnn", "mlperf_mobilenet", "mlperf_autoencoder"):
        cls, shape = nets[name]
        torch.manual_seed(SEED)
        rng = np.random.default_rng(SEED)
        net = randomize(cls(), shape, rng)
        calibration = rng.standard_normal((64, *shape)).astype(np.float32)
        float_path, qdq_path = OUT / f"{name}_float.onnx", OUT / f"{name}_qdq.onnx"
        opset = export(net, shape, float_path, "ts_fold")
        quantize(float_path, qdq_path, calibration, fixed_batch=False)
        params = sum(p.numel() for p in net.parameters())
        how = _describe("ts_fold")
        rows.append((float_path.name, how, opset, f"float; random fixed weights, {params} parameters"))
        rows.append((qdq_path.name, how + " -> quantize_static", _opset(qdq_path), "QDQ int8 per-channel"))
        print(f"{name:18s} {params} parameters, opset {opset}")

    write_readme(rows, versions)


def _onnxscript_version() -> str:
    try:
        import onnxscript
        return onnxscript.__version__
    except ImportError:
        return "absent"


def _opset(path: Path) -> int:
    return next(o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx"))


def _describe(form: str) -> str:
    exporter, opset, folding, dynamic = EXPORTS[form]
    if exporter == "dynamo":
        return "torch.onnx.export(dynamo=True), fixed batch 1"
    return (f"torch.onnx.export(dynamo=False, do_constant_folding={folding}), "
            f"{'dynamic' if dynamic else 'fixed'} batch")


def write_readme(rows, versions: str) -> None:
    lines = ["# Public-model regression set", "",
             "Written by `python models/make_public_models.py` (do not edit by hand; rerun the script). "
             "Checked by `tests/test_public_models.py`; benchmarked by `benchmarks/mlperf_tiny.py`.", "",
             f"Made with {versions}, CPython {sys.version.split()[0]}. Quantized files: onnxruntime "
             "`quantize_static` (QDQ, int8 activations, per-channel int8 weights) on the raw export.", "",
             "The `tv_*` models are briefly trained on scikit-learn's bundled digits; the `mlperf_*` models "
             "have the MLPerf Tiny reference shapes with **random fixed weights** (not trained).", "",
             "| file | made by | opset | notes | bytes | sha256 |", "|---|---|---|---|---|---|"]
    for file, how, opset, notes in rows:
        path = OUT / file
        lines.append(f"| `{file}` | {how} | {opset} | {notes} | {path.stat().st_size} | `{sha256(path)}` |")
    # the tf_* rows and their paragraph are models/make_tf2onnx_models.py's (TensorFlow): kept as they are
    old = (OUT / "README.md").read_text().splitlines() if (OUT / "README.md").exists() else []
    theirs = [line for line in old if line.startswith("The `tf_*` rows")]
    lines[lines.index("| file | made by | opset | notes | bytes | sha256 |"):0] = [*theirs, ""] if theirs else []
    lines += [line for line in old if line.startswith("| `tf_")]
    (OUT / "README.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
