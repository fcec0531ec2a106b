"""Seeded random MLPs as ONNX files: float, and int8/uint8 QDQ as onnxruntime's quantizer writes them."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def random_float_mlp(rng: np.random.Generator, widths: list[int], *, relu_last=False) -> onnx.ModelProto:
    """Gemm(+Relu) layers ``widths[0] -> ... -> widths[-1]`` with He-scaled random weights."""
    nodes, inits = [], []
    current = "input"
    n_layers = len(widths) - 1
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        weight = (rng.standard_normal((n_out, n_in)) * np.sqrt(2.0 / n_in)).astype(np.float32)
        bias = (rng.standard_normal(n_out) * 0.1).astype(np.float32)
        inits += [numpy_helper.from_array(weight, f"fc{i}.weight"), numpy_helper.from_array(bias, f"fc{i}.bias")]
        nodes.append(helper.make_node("Gemm", [current, f"fc{i}.weight", f"fc{i}.bias"], [f"fc{i}_out"],
                                      name=f"fc{i}", transB=1))
        current = f"fc{i}_out"
        if i < n_layers - 1 or relu_last:
            nodes.append(helper.make_node("Relu", [current], [f"relu{i}_out"], name=f"relu{i}"))
            current = f"relu{i}_out"
    graph = helper.make_graph(
        nodes, "random_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", widths[0]])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, ["batch", widths[-1]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def quantize_qdq(float_path: Path, out_path: Path, calibration: np.ndarray, *, activation_uint8: bool,
                 per_channel: bool) -> Path:
    """int8 QDQ model exactly as ``onnxruntime.quantization.quantize_static`` writes it.

    The calibration set goes in as one batch (MinMax calibration: the same ranges as row by row) to the
    model's first input; the model's batch dimension must be symbolic.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    input_name = onnx.load(str(float_path)).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{input_name: np.asarray(calibration, dtype=np.float32)}])

        def get_next(self):
            return next(self.batches, None)

    # quantize_static logs pre-processing advice through the root logger on every call.
    root_logger, level = logging.getLogger(), logging.getLogger().level
    root_logger.setLevel(logging.ERROR)
    try:
        quantize_static(str(float_path), str(out_path), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8 if activation_uint8 else QuantType.QInt8,
                        weight_type=QuantType.QInt8, per_channel=per_channel)
    finally:
        root_logger.setLevel(level)
    return out_path


def random_float_cnn(rng: np.random.Generator, in_shape: tuple[int, int, int], blocks: list[dict],
                     n_classes: int) -> onnx.ModelProto:
    """Conv(+Relu)(+MaxPool) blocks, then Flatten and a Gemm: input ``[batch, *in_shape]`` (C, H, W).

    Each block is ``{"out": C_out, "k": kernel, "stride": s, "pad": p, "pool": (kernel, stride) | None}``.
    """
    nodes, inits = [], []
    current, (channels, height, width) = "input", in_shape
    for i, block in enumerate(blocks):
        k, stride, pad = block["k"], block.get("stride", 1), block.get("pad", 0)
        weight = (rng.standard_normal((block["out"], channels, k, k)) * np.sqrt(2.0 / (channels * k * k)))
        inits += [numpy_helper.from_array(weight.astype(np.float32), f"conv{i}.weight"),
                  numpy_helper.from_array((rng.standard_normal(block["out"]) * 0.1).astype(np.float32), f"conv{i}.bias")]
        nodes.append(helper.make_node("Conv", [current, f"conv{i}.weight", f"conv{i}.bias"], [f"conv{i}_out"],
                                      name=f"conv{i}", kernel_shape=[k, k], strides=[stride, stride],
                                      pads=[pad, pad, pad, pad]))
        nodes.append(helper.make_node("Relu", [f"conv{i}_out"], [f"relu{i}_out"], name=f"relu{i}"))
        current = f"relu{i}_out"
        channels = block["out"]
        height = (height + 2 * pad - k) // stride + 1
        width = (width + 2 * pad - k) // stride + 1
        if block.get("pool"):
            pool_k, pool_s = block["pool"]
            nodes.append(helper.make_node("MaxPool", [current], [f"pool{i}_out"], name=f"pool{i}",
                                          kernel_shape=[pool_k, pool_k], strides=[pool_s, pool_s]))
            current = f"pool{i}_out"
            height = (height - pool_k) // pool_s + 1
            width = (width - pool_k) // pool_s + 1
    return _classifier_head(rng, nodes, inits, current, channels * height * width, in_shape, n_classes, "random_cnn")


def _classifier_head(rng, nodes, inits, current, n_in, in_shape, n_classes, name) -> onnx.ModelProto:
    """Flatten ``current`` (``n_in`` values), a Gemm to ``n_classes`` logits, and the checked model."""
    nodes.append(helper.make_node("Flatten", [current], ["flat"], name="flatten", axis=1))
    inits += [numpy_helper.from_array((rng.standard_normal((n_classes, n_in)) * np.sqrt(2.0 / n_in)).astype(np.float32),
                                      "fc.weight"),
              numpy_helper.from_array((rng.standard_normal(n_classes) * 0.1).astype(np.float32), "fc.bias")]
    nodes.append(helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *in_shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n_classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _conv(nodes, inits, rng, name, source, c_in, c_out, k, stride, *, group=1, relu=True):
    """Append Conv(+Relu) ``name`` reading ``source``; returns its output tensor name."""
    weight = rng.standard_normal((c_out, c_in // group, k, k)) * np.sqrt(2.0 / (c_in // group * k * k))
    inits += [numpy_helper.from_array(weight.astype(np.float32), f"{name}.weight"),
              numpy_helper.from_array((rng.standard_normal(c_out) * 0.1).astype(np.float32), f"{name}.bias")]
    pad = k // 2
    nodes.append(helper.make_node("Conv", [source, f"{name}.weight", f"{name}.bias"], [f"{name}_out"], name=name,
                                  kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4, group=group))
    if not relu:
        return f"{name}_out"
    nodes.append(helper.make_node("Relu", [f"{name}_out"], [f"{name}_relu"], name=f"{name}_relu"))
    return f"{name}_relu"


def random_float_resnet(rng: np.random.Generator, in_shape: tuple[int, int, int], stem: int, blocks: list[dict],
                        n_classes: int, *, projection_first: bool = False) -> onnx.ModelProto:
    """A residual CNN: a 3x3 stem Conv+Relu, then blocks, then GlobalAveragePool, Flatten and a Gemm.

    Blocks: ``{"kind": "basic", "out": C, "stride": s}`` is ResNet's basic block (3x3 Conv(stride s)+Relu,
    3x3 Conv, shortcut = identity, or a 1x1 Conv(stride s) when the shape changes, Add, Relu);
    ``{"kind": "inverted", "expand": E}`` is MobileNetV2's stride-1 inverted residual (1x1 Conv to E
    channels + Relu, 3x3 depthwise Conv + Relu, 1x1 Conv back, Add, no Relu);
    ``{"kind": "fire", "squeeze": S, "expand": E}`` is SqueezeNet's fire module (1x1 Conv to S + Relu, then
    Concat(1x1 Conv to E + Relu, 3x3 Conv to E + Relu) along channels);
    ``{"kind": "dense", "growth": G, "identity_first": bool}`` is a DenseNet-style layer, Concat(x, 3x3 Conv
    to G + Relu) (or the Conv first). ``projection_first`` writes a
    projection shortcut's node before the main branch's (ONNX node order is the compiler's layer order).
    """
    nodes, inits = [], []
    channels, height, width = in_shape
    current = _conv(nodes, inits, rng, "stem", "input", channels, stem, 3, 1)
    channels = stem
    for i, block in enumerate(blocks):
        if block["kind"] == "basic":
            out, stride = block["out"], block.get("stride", 1)
            shortcut = current
            if stride != 1 or out != channels:
                projection = []
                shortcut = _conv(projection, inits, rng, f"block{i}_proj", current, channels, out, 1, stride, relu=False)
            else:
                projection = []
            main = []
            branch = _conv(main, inits, rng, f"block{i}_conv1", current, channels, out, 3, stride)
            branch = _conv(main, inits, rng, f"block{i}_conv2", branch, out, out, 3, 1, relu=False)
            nodes += (projection + main) if projection_first else (main + projection)
            nodes.append(helper.make_node("Add", [branch, shortcut], [f"block{i}_add"], name=f"block{i}_add"))
            nodes.append(helper.make_node("Relu", [f"block{i}_add"], [f"block{i}_out"], name=f"block{i}_relu"))
            current, channels = f"block{i}_out", out
            height, width = (height - 1) // stride + 1, (width - 1) // stride + 1
        elif block["kind"] == "inverted":
            expand = block["expand"]
            branch = _conv(nodes, inits, rng, f"block{i}_expand", current, channels, expand, 1, 1)
            branch = _conv(nodes, inits, rng, f"block{i}_dw", branch, expand, expand, 3, 1, group=expand)
            branch = _conv(nodes, inits, rng, f"block{i}_project", branch, expand, channels, 1, 1, relu=False)
            nodes.append(helper.make_node("Add", [current, branch], [f"block{i}_out"], name=f"block{i}_add"))
            current = f"block{i}_out"
        elif block["kind"] == "fire":
            squeeze, expand = block["squeeze"], block["expand"]
            current = _conv(nodes, inits, rng, f"block{i}_squeeze", current, channels, squeeze, 1, 1)
            one = _conv(nodes, inits, rng, f"block{i}_expand1", current, squeeze, expand, 1, 1)
            three = _conv(nodes, inits, rng, f"block{i}_expand3", current, squeeze, expand, 3, 1)
            nodes.append(helper.make_node("Concat", [one, three], [f"block{i}_out"], name=f"block{i}_concat", axis=1))
            current, channels = f"block{i}_out", 2 * expand
        elif block["kind"] == "dense":
            growth = block["growth"]
            new = _conv(nodes, inits, rng, f"block{i}_conv", current, channels, growth, 3, 1)
            inputs = [current, new] if block.get("identity_first", True) else [new, current]
            nodes.append(helper.make_node("Concat", inputs, [f"block{i}_out"], name=f"block{i}_concat", axis=1))
            current, channels = f"block{i}_out", channels + growth
        else:
            raise ValueError(f"block {i}: unknown kind {block['kind']!r}")
    nodes.append(helper.make_node("GlobalAveragePool", [current], ["pooled"], name="gap"))
    return _classifier_head(rng, nodes, inits, "pooled", channels, in_shape, n_classes, "random_resnet")


#: MobileNetV1's 13 depthwise-separable blocks at alpha 1.0: (pointwise output channels, depthwise stride).
MOBILENET_V1_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1),
                       (512, 1), (512, 1), (1024, 2), (1024, 1))


def random_float_mobilenet_v1(rng: np.random.Generator, *, alpha: float = 1.0, resolution: int = 96,
                              n_classes: int = 1000) -> onnx.ModelProto:
    """MobileNetV1 (BN folded into the convolutions' biases) with He-scaled random weights: input ``[batch, 3,
    resolution, resolution]``; a 3x3 stride-2 Conv to ``32 * alpha`` channels + Relu; 13 depthwise-separable blocks
    (:data:`MOBILENET_V1_BLOCKS`: a 3x3 depthwise Conv (``group`` = channels, the block's stride) + Relu, a 1x1
    pointwise Conv + Relu); GlobalAveragePool, Flatten and a Gemm to ``n_classes`` logits.

    At alpha 1.0 and 1000 classes it has 4,221,032 parameters (3,196,032 without the classifier), at any
    resolution; 96x96 gives a 3x3x1024 map before the pool."""
    def width(channels: int) -> int:
        return max(1, int(channels * alpha))

    nodes, inits = [], []
    channels = width(32)
    current = _conv(nodes, inits, rng, "stem", "input", 3, channels, 3, 2)
    for i, (out, stride) in enumerate(MOBILENET_V1_BLOCKS):
        current = _conv(nodes, inits, rng, f"block{i}_dw", current, channels, channels, 3, stride, group=channels)
        current = _conv(nodes, inits, rng, f"block{i}_pw", current, channels, width(out), 1, 1)
        channels = width(out)
    nodes.append(helper.make_node("GlobalAveragePool", [current], ["pooled"], name="gap"))
    return _classifier_head(rng, nodes, inits, "pooled", channels, (3, resolution, resolution), n_classes,
                            "random_mobilenet_v1")
