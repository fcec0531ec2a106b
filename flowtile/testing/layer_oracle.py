"""onnxruntime's int8 intermediate tensors, mapped to the compiler's lowered layers, for layer-by-layer oracles.

An imported layer (:mod:`flowtile.compiler.onnx_import`) is named after the ONNX node that computes it (the
MatMul/Gemm, Conv, pool, Add, Concat, or the BatchNormalization/Add/Mul of an affine step). Its int8 output in
onnxruntime is the first QuantizeLinear downstream of that node (past a Relu, a Clip or a bias Add), extended
through ``Q -> DQ -> (Relu | Flatten | Reshape) -> Q`` relabellings with the same scale and zero point (a Relu
requantized with its input's parameters is ``max(q, zp)``, part of the layer's clamp). The graph input's int8
tensor is the QuantizeLinear reached from the graph input through Flatten/Reshape only. Every such tensor is made
an extra output of a copy of the QDQ model, run with graph optimizations off (:func:`flowtile.oracle.ort_session`),
so the values are onnxruntime's own: float32 arithmetic, one rounding per QuantizeLinear.

Layouts: onnxruntime's tensors are NCHW (or ``[N, n]``); flattened per sample (``reshape(N, -1)``) they are in
the model element order :func:`flowtile.compiler.reference_forward` reads and writes (feature maps
``[batch, C, H, W]`` flattened NCHW), so no permutation is needed. uint8 tensors are moved to the on-chip int8
domain (``q - 128``), as the compiler's zero points are.

:func:`teacher_forced` runs each lowered layer alone on onnxruntime's int8 input(s) for it (the compiler's own
numpy model, :func:`~flowtile.compiler.reference_forward`); a two-operand layer (residual Add, Concat) is fed
both operands through two exact channel-selecting 1x1 convolutions (weight 0/1, multiplier ``2^30``, shift 30:
``acc * 2^30 >> 30 = acc``, no rounding), so its arithmetic is still the compiler's.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from flowtile.compiler import LoweredLayer, QuantParams, Window, reference_forward
from flowtile.compiler.onnx_import import layer_sources
from flowtile.oracle import ort_session

__all__ = ["LayerTensors", "map_layers", "ort_int8_tensors", "exact_int8_tensors", "with_outputs", "int8_runs",
           "run_layer_alone", "teacher_forced", "free_running", "LayerCheck"]

_RELABEL = ("Relu", "Flatten", "Reshape")
#: The opset whose QuantizeLinear/DequantizeLinear signatures the exact evaluator's kernels take (see the toolchain
#: notes: older QDQ models run on the reference evaluator only with the opset import raised).
_REFERENCE_QDQ_OPSET = 21


@dataclass
class LayerTensors:
    """The onnxruntime tensor names: ``input`` (the graph input's QuantizeLinear output), ``outputs[i]`` (layer
    ``i``'s int8 output)."""

    input: str
    outputs: list[str]


class _Graph:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type == "Constant":
                self.consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for node in model.graph.node:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)
        self.by_name: dict[str, list[onnx.NodeProto]] = {}
        for node in model.graph.node:
            self.by_name.setdefault(node.name, []).append(node)

    def single_reader(self, tensor: str) -> onnx.NodeProto | None:
        readers = self.readers.get(tensor, [])
        return readers[0] if len(readers) == 1 else None

    def qparams(self, node: onnx.NodeProto) -> QuantParams:
        scale = self.consts[node.input[1]]
        zero = self.consts[node.input[2]] if len(node.input) > 2 and node.input[2] else np.zeros((), np.uint8)
        return QuantParams(float(scale.reshape(())), int(zero.reshape(())),
                           "uint8" if zero.dtype == np.uint8 else "int8")


def _extend_relabels(graph: _Graph, quantize: onnx.NodeProto) -> onnx.NodeProto:
    """``Q -> DQ -> Relu|Flatten|Reshape -> Q`` with the same parameters: the later Q (the same values, or max(q, zp))."""
    params = graph.qparams(quantize)
    while True:
        dq = graph.single_reader(quantize.output[0])
        op = graph.single_reader(dq.output[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        q = graph.single_reader(op.output[0]) if op is not None and op.op_type in _RELABEL else None
        if q is None or q.op_type != "QuantizeLinear" or graph.qparams(q) != params:
            return quantize
        quantize = q


def _output_quantize(graph: _Graph, layer, index: int) -> onnx.NodeProto:
    nodes = graph.by_name.get(layer.name, [])
    if len(nodes) != 1:
        raise LookupError(f"layer {index} '{layer.name}' ({layer.op}): {len(nodes)} ONNX nodes have that name; "
                          f"cannot find its output tensor")
    node = nodes[0]
    tensor = node.output[0]
    for _ in range(8):  # past Relu / Clip / bias Add to the output QuantizeLinear
        reader = graph.single_reader(tensor)
        if reader is None:
            break
        if reader.op_type == "QuantizeLinear":
            quantize = _extend_relabels(graph, reader)
            if graph.qparams(quantize) != layer.output:
                raise LookupError(f"layer {index} '{layer.name}': the QuantizeLinear after node '{node.name}' has "
                                  f"{graph.qparams(quantize)}, the layer's output is {layer.output}")
            return quantize
        tensor = reader.output[0]
    raise LookupError(f"layer {index} '{layer.name}': no QuantizeLinear on the single-reader chain after "
                      f"node '{node.name}' ({node.op_type})")


def map_layers(qdq_model: onnx.ModelProto, layers: list) -> LayerTensors:
    """The onnxruntime tensor of the graph input's quantization and of each imported layer's output.

    ``qdq_model`` is :attr:`ImportedModel.qdq_model` (the graph the importer walked), ``layers`` its
    ``layers``. LookupError when a layer cannot be mapped.
    """
    graph = _Graph(qdq_model)
    consts = set(graph.consts)
    inputs = [i.name for i in qdq_model.graph.input if i.name not in consts]
    tensor = inputs[0]
    while True:
        reader = graph.single_reader(tensor)
        if reader is None:
            raise LookupError(f"no QuantizeLinear of the graph input '{inputs[0]}' on its single-reader chain")
        if reader.op_type == "QuantizeLinear":
            input_q = reader.output[0]
            break
        if reader.op_type not in ("Flatten", "Reshape"):
            raise LookupError(f"graph input '{inputs[0]}' reaches node '{reader.name}' ({reader.op_type}) "
                              f"before its QuantizeLinear")
        tensor = reader.output[0]
    return LayerTensors(input_q, [_output_quantize(graph, layer, i).output[0] for i, layer in enumerate(layers)])


def with_outputs(qdq_model: onnx.ModelProto, names: list[str]) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``qdq_model`` with the tensors ``names`` (deduplicated, in order) made graph outputs."""
    model = onnx.ModelProto()
    model.CopyFrom(qdq_model)
    present = {o.name for o in model.graph.output}
    wanted = list(dict.fromkeys(names))
    for name in wanted:
        if name not in present:
            model.graph.output.append(helper.make_value_info(name, onnx.TypeProto()))
    return model, wanted


def int8_runs(run, first_shape, wanted: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    """``run(names, batch)`` over ``x`` in the model's batch size (fixed, or all at once), as int64 ``[batch, n]``
    in the on-chip int8 domain."""
    batch = first_shape[0] if isinstance(first_shape[0], int) and first_shape[0] > 0 else len(x)
    runs = [run(wanted, x[i:i + batch].astype(np.float32)) for i in range(0, len(x), batch)]
    out = {}
    for k, name in enumerate(wanted):
        parts = [np.asarray(r[k]) for r in runs]
        shift = 128 if parts[0].dtype == np.uint8 else 0
        if parts[0].dtype not in (np.uint8, np.int8):
            raise TypeError(f"tensor '{name}' is {parts[0].dtype}, not an int8/uint8 QuantizeLinear output")
        out[name] = np.concatenate([p.reshape(p.shape[0], -1).astype(np.int64) - shift for p in parts])
    return out


def ort_int8_tensors(qdq_model: onnx.ModelProto, names: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    """onnxruntime's values of the int8 tensors ``names`` for float input ``x``: int64 ``[batch, n]`` in the on-chip
    int8 domain (uint8 minus 128), each sample's tensor flattened NCHW. A model with a fixed batch dimension
    (dynamo exports: 1) is run that many samples at a time."""
    model, wanted = with_outputs(qdq_model, names)
    session = ort_session(model)
    first = session.get_inputs()[0]
    return int8_runs(lambda n, xb: session.run(n, {first.name: xb}), first.shape, wanted, x)


class _ExactDequantizeLinear(OpRun):
    """DequantizeLinear in float64: ``(x - zero_point) * scale`` exact for int8 x and float32 scales."""

    op_domain = ""

    def _run(self, x, x_scale, x_zero_point=None, axis=None, block_size=None, output_dtype=None):
        scale, zero = _per_axis(x.ndim, x_scale, x_zero_point, self.axis if axis is None else axis)
        return ((x.astype(np.float64) - zero) * scale,)


class _ExactQuantizeLinear(OpRun):
    """QuantizeLinear of a float64 value: round half to even of ``x / scale`` (one rounding), saturated."""

    op_domain = ""

    def _run(self, x, y_scale, y_zero_point=None, axis=None, saturate=None, block_size=None, output_dtype=None,
             precision=None):
        dtype = np.uint8 if y_zero_point is None else np.asarray(y_zero_point).dtype
        scale, zero = _per_axis(np.ndim(x), y_scale, y_zero_point, self.axis if axis is None else axis)
        info = np.iinfo(dtype)
        return (np.clip(np.rint(np.asarray(x, np.float64) / scale) + zero, info.min, info.max).astype(dtype),)


def _per_axis(ndim: int, scale, zero_point, axis: int) -> tuple[np.ndarray, np.ndarray]:
    scale = np.asarray(scale, np.float64)
    zero = np.zeros((), np.float64) if zero_point is None else np.asarray(zero_point).astype(np.float64)
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
        zero = zero.reshape(shape) if zero.ndim == 1 else zero
    return scale, zero


def exact_int8_tensors(qdq_model: onnx.ModelProto, names: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    """The same tensors as :func:`ort_int8_tensors`, computed by ONNX's reference evaluator
    (``onnx.reference.ReferenceEvaluator``) with DequantizeLinear and QuantizeLinear in float64: every operation
    between two roundings (convolution sums, pools, adds, affine steps) runs in float64, so the result is the
    graph's exact value (its float32 constants taken as exact) rounded once per QuantizeLinear, up to ``~2^-40``
    LSB. onnxruntime computes those sums in float32, which moves results lying within ``~2^-20`` LSB of a rounding
    tie; deep networks carry such flips on. This is the oracle for "does the chip compute the model?"; onnxruntime
    stays the oracle for "does the chip agree with the runtime people use?"."""
    model, wanted = with_outputs(qdq_model, names)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < _REFERENCE_QDQ_OPSET:
            opset.version = _REFERENCE_QDQ_OPSET  # the evaluator's QDQ kernels need it; the graph's ops are unchanged
    evaluator = ReferenceEvaluator(model, new_ops=[_ExactDequantizeLinear, _ExactQuantizeLinear])
    first = model.graph.input[0]
    shape = [d.dim_value if d.HasField("dim_value") else None for d in first.type.tensor_type.shape.dim]
    return int8_runs(lambda n, xb: evaluator.run(n, {first.name: xb}), shape, wanted, x)


def _selector(window_shape: tuple[int, int, int], first: int, count: int, name: str) -> LoweredLayer:
    """An exact 1x1 convolution copying channels ``first .. first+count-1`` of a ``(C, H, W)`` map."""
    channels, height, width = window_shape
    weight = np.zeros((count, channels, 1, 1), np.int8)
    weight[np.arange(count), first + np.arange(count), 0, 0] = 1
    return LoweredLayer(name=name, op="Conv", weight=weight, bias=np.zeros(count, np.int64),
                        multiplier=np.full(count, 1 << 30, np.int64), shift=np.full(count, 30, np.int64), zp_out=0,
                        clamp_lo=-128, clamp_hi=127, relu=False,
                        window=Window(channels, height, width, 1, 1, 1, 0, 0, height, width), sources=(-1,))


def run_layer_alone(layer: LoweredLayer, operands: list[np.ndarray]) -> np.ndarray:
    """:func:`reference_forward` of one lowered layer on given int8 operand(s) ``[batch, n]`` (model order)."""
    if not layer.is_join:
        return reference_forward([layer], operands[0].astype(np.int8)).astype(np.int64)
    a, b = operands
    channels, height, width = layer.window.input_shape
    ca = layer.concat_channels_a if layer.is_concat else channels
    cb = channels - ca if layer.is_concat else channels
    batch = a.shape[0]
    both = np.concatenate([a.reshape(batch, ca, height, width), b.reshape(batch, cb, height, width)], axis=1)
    shape = (ca + cb, height, width)
    join = dataclasses.replace(layer, sources=(0, 1))
    return reference_forward([_selector(shape, 0, ca, "operand a"), _selector(shape, ca, cb, "operand b"), join],
                             both.reshape(batch, -1).astype(np.int8)).astype(np.int64)


@dataclass
class LayerCheck:
    """One layer's teacher-forced comparison: the largest difference (LSB) and how many values differ at all."""

    index: int
    name: str
    op: str
    max_lsb: int
    differing: int
    size: int


def teacher_forced(lowered: list[LoweredLayer], tensors: LayerTensors, values: dict[str, np.ndarray]) -> list[LayerCheck]:
    """Each lowered layer alone, fed onnxruntime's int8 input(s) for it, against onnxruntime's int8 output."""
    checks = []
    for index, (layer, sources) in enumerate(zip(lowered, layer_sources(lowered))):
        operands = [values[tensors.input if s < 0 else tensors.outputs[s]] for s in sources]
        ours = run_layer_alone(layer, operands)
        theirs = values[tensors.outputs[index]]
        if ours.shape != theirs.shape:
            raise AssertionError(f"layer {index} '{layer.name}' ({layer.op}): reference output {ours.shape}, "
                                 f"onnxruntime's tensor '{tensors.outputs[index]}' {theirs.shape}")
        diff = np.abs(ours - theirs)
        checks.append(LayerCheck(index, layer.name, layer.op, int(diff.max()), int((diff > 0).sum()), diff.size))
    return checks


def free_running(lowered: list[LoweredLayer], x_q: np.ndarray, tensors: LayerTensors,
                 values: dict[str, np.ndarray]) -> list[int]:
    """Max |reference - onnxruntime| at each layer's output when the whole network runs from the input (drift:
    each layer's rounding differences carried into the next layers)."""
    drift = []
    for index in range(len(lowered)):
        ours = reference_forward(lowered[:index + 1], x_q).astype(np.int64)
        drift.append(int(np.abs(ours - values[tensors.outputs[index]]).max()))
    return drift
