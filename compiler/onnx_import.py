"""ONNX -> a list of quantized dense, convolution and max-pooling layers.

Accepted models are MLPs and CNNs, a chain from the graph input to the graph output with residual blocks:

* int8 QDQ models as ``onnxruntime.quantization.quantize_static`` writes them::

      x -> [Flatten|Reshape] -> Q -> DQ -> (MatMul|Gemm)(DQ(W int8)[, DQ(b int32) | float b])
        -> [Add(bias)] -> [Relu] -> Q -> DQ -> [Relu -> Q -> DQ] -> next layer ... -> y

  (the quantizer folds a Relu away when the output zero point already clips at zero; it is then
  implicit in the output clamp). Weights are int8 with zero point 0, per tensor or per output
  channel; activations are int8 or uint8, per tensor, with any zero point.
* CNNs (docs/architecture.md section 4.1), input ``[N, C, H, W]``::

      x -> Q -> DQ -> Conv(DQ(W int8 [O, C, KH, KW]), DQ(b int32)) -> [Relu|Clip(0, m)] -> Q -> DQ
        -> MaxPool -> Q -> DQ (same scale and zero point as its input) -> [Relu -> Q -> DQ] ...
        -> Flatten|Reshape -> [Q -> DQ] -> Gemm/MatMul layers as above

  Conv: 2-D, dilation 1, kernel 1..255 (up to the padded map; 8-bit registers), equal strides 1..3, pads below
  the kernel (top/bottom < KH, left/right < KW), auto_pad NOTSET.
  Depthwise Conv (group = input channels = output channels, weight ``[C, 1, KH, KW]``): the same limits,
  imported as op ``"DepthwiseConv"``; other grouped Convs become a Conv with a block-diagonal weight.
  MaxPool: the same limits, ceil_mode 0.
  AveragePool (same limits, ``count_include_pad = 1`` unless unpadded; :mod:`.normalize` makes one window over
  the whole map, whatever its strides, a GlobalAveragePool) and GlobalAveragePool (the whole map,
  ``H x W`` window): ``DQ -> pool -> [Relu|Clip] -> Q -> DQ``, the output scale possibly new (quantize_static
  keeps an AveragePool's input quantization, but a folded Relu or a GlobalAveragePool gets its own).
  Depthwise Conv and the average pools are *lane layers* (:data:`LANE_OPS`, op LANE of section 4.1):
  :class:`DenseLayer` with weight ``[C, 1, KH, KW]`` (all ones and weight scale ``1 / (KH*KW)`` for pools).
  The dense layer after the flatten keeps its ONNX weight (NCHW column order) and records the map
  it reads (:attr:`DenseLayer.input_map`); lowering maps it to the on-chip pixel-major order.
* residual blocks (docs/architecture.md sections 4.2, 4.3): a feature map that feeds two branches of Conv /
  pool layers (one branch may be empty: an identity shortcut) which meet at one ``Add`` of two maps of the
  same shape, ``DQ(a) + DQ(b) -> [Relu|Clip] -> Q -> DQ``, or one channel ``Concat`` (axis 1) of two maps of
  the same height and width, the inputs' scales and zero points free. The layers
  keep their sources (:func:`layer_sources`); the shorter branch is listed first. Nested forks, forks of
  vectors, forks into more than two readers and broadcasting Adds are rejected naming the tensor or node.
* a per-channel affine step after a requantized layer, between its own Q/DQ pairs (two roundings, as
  ``quantize_static`` writes a float ``MatMul + Add`` such as torch's unfused ``nn.Linear``, or a Conv followed by a
  BatchNormalization node)::

      layer -> Q -> DQ -> (Add(DQ(b) | b) | Mul(DQ(a) | a) | BatchNormalization) -> [Relu|Clip] -> Q -> DQ

  the constants per tensor or per channel: a second, lane layer of op ``"Affine"`` (:func:`match_affine`; its
  integers and error bound: :func:`compiler.lower.affine_integers`).
* a trailing ``Softmax [-> Q -> DQ]`` (the network's last op) runs on the host in float: the program's output is
  the Softmax's input, with the post-op recorded in its :class:`~flowtile.program.TensorSpec`
  (:func:`match_host_softmax`). A Softmax anywhere else is rejected naming it.
* float models of the same ops (plus Add as a MatMul bias or a residual join), which :func:`import_onnx` first
  quantizes with ``quantize_static`` (QDQ format) and then imports as above.
* sequences ``[N, T, C]`` (a 3-D graph input, ``nn.Linear`` on a sequence; tf2onnx's Dense on a sequence)::

      x [N, T, C] -> Q -> DQ -> MatMul(DQ(W int8 [C, K])) [-> Add(bias)] [-> Relu|Clip] -> Q -> DQ
        -> [affine step, e.g. quantize_static's bias Add] -> [MatMul ... (another such layer)]
        -> Flatten|Reshape to [N, T*K] -> [Q -> DQ] -> Gemm/MatMul layers as above

  A MatMul over the last axis is a 1x1 convolution over a 1 x T map of C channels, and ``[T][C]`` row-major is
  the on-chip pixel-major order: the layer is op ``"MatMul"`` with a 1x1 :class:`Window` over ``(C, 1, T)`` and
  weight ``[K, C, 1, 1]``, ``channels_last`` (its maps in model order ``t*C + c``); the input's layout is ``"tc"``
  (:class:`~flowtile.program.TensorSpec`); the dense layer after the flatten reads ``input_map = (K, 1, T)`` with
  its columns in that order. ``T`` up to 255 (the 8-bit map registers). Other uses of a sequence (a MatMul of two
  activations, a reduction over ``T``, a BatchNormalization over ``T``) are rejected naming node, op and input.

Anything else raises :class:`CompileError` naming the node, its op and, where it applies, the attribute.
"""
from __future__ import annotations

import dataclasses
import math
import logging
import os
import tempfile
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from flowtile.host import published_to_model
from flowtile.program import TensorSpec

from .errors import CompileError, describe
from .normalize import host_transpose, normalize
from .qoperator import qoperator_to_qdq

__all__ = ["QuantParams", "DenseLayer", "AddLayer", "ConcatLayer", "layer_sources", "LANE_OPS", "Window", "PoolLayer", "ImportedModel", "import_onnx", "load_model", "quantize_float_model", "int8_model", "is_quantized",
           "fuse_matmul_add", "DEFAULT_CALIBRATION_SAMPLES"]

#: Samples in the seeded random-normal calibration set used when none is given.
DEFAULT_CALIBRATION_SAMPLES = 256

_QUANT_DTYPES = {onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8"}
_FLOAT_OPS = {"Gemm", "MatMul", "Add", "Relu", "Flatten", "Reshape", "Conv", "MaxPool", "Clip", "AveragePool",
              "GlobalAveragePool", "Concat", "Mul", "BatchNormalization", "Softmax"}
#: Layers the PE computes lane by lane (op = LANE, docs/architecture.md section 4.1).
LANE_OPS = ("DepthwiseConv", "AveragePool", "GlobalAveragePool", "Affine")
_RESHAPE_OPS = {"Flatten", "Reshape"}


@dataclass(frozen=True)
class QuantParams:
    """Per-tensor quantization of an activation: ``real = scale * (q - zero_point)``, q of ``dtype``."""

    scale: float
    zero_point: int
    dtype: str  # "int8" or "uint8"

    @property
    def int8_zero_point(self) -> int:
        """The zero point in the on-chip int8 domain (uint8 tensors travel as ``q - 128``)."""
        return self.zero_point - 128 if self.dtype == "uint8" else self.zero_point


@dataclass(frozen=True)
class Window:
    """Geometry of a windowed layer (docs/architecture.md section 4.1).

    Input map ``channels x height x width``; window ``kernel_h x kernel_w`` moved by ``stride`` in both
    directions from ``(-pad_top, -pad_left)``; output map ``out_height x out_width``. Bottom/right
    padding is implicit: window positions beyond the map read the pad value.
    """

    channels: int
    height: int
    width: int
    kernel_h: int
    kernel_w: int
    stride: int
    pad_top: int
    pad_left: int
    out_height: int
    out_width: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)


@dataclass
class DenseLayer:
    """One quantized dense layer ``y = Q(relu?(DQ(x) @ DQ(W)^T + DQ(b)))`` as the ONNX model states it.

    ``weight`` is int8 ``[n_out, n_in]`` (weight zero point 0), ``weight_scales`` float64 ``[n_out]``
    (per-tensor scales are broadcast), ``bias`` int32 ``[n_out]`` in units of
    ``input.scale * weight_scales``. ``relu`` is an explicit Relu; a Relu the quantizer folded into the
    output zero point is implicit in the output clamp. ``name`` is the MatMul/Gemm node's name.
    """

    name: str
    op: str
    weight: np.ndarray
    bias: np.ndarray
    input: QuantParams
    weight_scales: np.ndarray
    output: QuantParams
    relu: bool
    #: Conv only: the window geometry; ``weight`` is then int8 ``[n_out, C, KH, KW]``. Lane layers
    #: (``op`` in :data:`LANE_OPS`: depthwise Conv, AveragePool, GlobalAveragePool) have ``weight`` int8
    #: ``[C, 1, KH, KW]`` (all ones for the average pools, whose ``weight_scales`` are ``1 / (KH*KW)``).
    window: Window | None = None
    #: Gemm/MatMul reading a flattened feature map: its ``(C, H, W)`` (weight columns in NCHW order).
    input_map: tuple[int, int, int] | None = None
    #: Clip(0, clip_max) before the output quantization: the real upper bound, else None.
    clip_max: float | None = None
    #: Index of the layer whose output this layer reads (-1: the graph input); () means the layer before.
    sources: tuple[int, ...] = ()
    #: Conv only: its ONNX ``group`` when it is a grouped (not depthwise) convolution, whose ``weight`` is
    #: then already expanded to block-diagonal ``[n_out, C, KH, KW]``; 1 otherwise.
    groups: int = 1
    #: op "Affine" (a requantized per-channel ``y = a_c * x + b_c``: BatchNormalization, a bias Add, a Mul by a
    #: constant, between their own Q/DQ pairs): float64 ``(a [C], b [C])`` as the model states them. ``weight``
    #: (int8 ``[C, 1, 1, 1]``), ``bias`` and ``weight_scales`` are placeholders until
    #: :func:`compiler.lower.lower_layer` chooses them (``window``: the map, or a vector as ``(n, 1, 1)``, 1x1).
    affine: tuple[np.ndarray, np.ndarray] | None = None
    #: A sequence layer (``window`` over ``(C, 1, T)``: MatMul over the last axis of ``[N, T, C]``, or an affine
    #: step on a sequence) reading and writing ``[T, C]`` in model order ``t*C + c``; or a dense layer after the
    #: flatten of a sequence (``input_map = (C, 1, T)``), its weight columns in order ``t*C + c``.
    channels_last: bool = False

    @property
    def is_lane(self) -> bool:
        return self.op in LANE_OPS

    @property
    def n_in(self) -> int:
        """Input elements per output (dense) or input channels (Conv, lane layers)."""
        return self.window.channels if self.is_lane else int(self.weight.shape[1])

    @property
    def n_out(self) -> int:
        """Output elements (dense) or output channels (Conv)."""
        return int(self.weight.shape[0])

    @property
    def out_shape(self) -> tuple[int, ...]:
        if self.window is None:
            return (self.n_out,)
        return (self.n_out, self.window.out_height, self.window.out_width)


@dataclass
class PoolLayer:
    """A MaxPool on int8 values: input and output share one quantization (``input == output``)."""

    name: str
    op: str
    window: Window
    input: QuantParams
    output: QuantParams
    relu: bool
    sources: tuple[int, ...] = ()

    @property
    def n_in(self) -> int:
        return self.window.channels

    @property
    def n_out(self) -> int:
        return self.window.channels

    @property
    def out_shape(self) -> tuple[int, ...]:
        return (self.window.channels, self.window.out_height, self.window.out_width)


class _MapJoin:
    """What the two joins (Add, Concat) share: an output map ``shape``, read as a 1x1 window."""

    @property
    def window(self) -> Window:
        """The output map as a 1x1 window: every output pixel reads the same pixel of both operands."""
        channels, height, width = self.shape
        return Window(channels, height, width, 1, 1, 1, 0, 0, height, width)

    @property
    def input(self) -> QuantParams:
        return self.inputs[0]

    @property
    def n_in(self) -> int:
        return self.shape[0]

    @property
    def n_out(self) -> int:
        return self.shape[0]

    @property
    def out_shape(self) -> tuple[int, int, int]:
        return self.shape


@dataclass
class AddLayer(_MapJoin):
    """A residual join ``y = Q(relu?(DQ_a(a) + DQ_b(b)))`` of two feature maps of one shape (section 4.2).

    ``sources`` are the layers producing ``a`` and ``b`` (-1: the graph input), in the Add node's input
    order; ``inputs`` their quantizations.
    """

    name: str
    shape: tuple[int, int, int]
    inputs: tuple[QuantParams, QuantParams]
    output: QuantParams
    relu: bool
    sources: tuple[int, int]
    clip_max: float | None = None
    op: str = "Add"


@dataclass
class ConcatLayer(_MapJoin):
    """A channel concatenation ``y = Q(relu?(concat(DQ_a(a), DQ_b(b))))`` of two maps of one height and width
    (section 4.3); ``shape`` is the output's, ``channels_a`` the first input's channel count."""

    name: str
    shape: tuple[int, int, int]
    channels_a: int
    inputs: tuple[QuantParams, QuantParams]
    output: QuantParams
    relu: bool
    sources: tuple[int, int]
    clip_max: float | None = None
    op: str = "Concat"


def layer_sources(layers: list) -> list[tuple[int, ...]]:
    """Each layer's source layer indices (-1: the graph input), an empty ``sources`` meaning the layer before."""
    return [tuple(layer.sources) if layer.sources else (index - 1,) for index, layer in enumerate(layers)]


@dataclass
class ImportedModel:
    """What the importer hands to lowering: the layers, the host tensors, and the QDQ model they came from."""

    name: str
    layers: list[DenseLayer | PoolLayer | AddLayer | ConcatLayer]
    input: TensorSpec
    output: TensorSpec
    qdq_model: onnx.ModelProto


# ---------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------
def load_model(model: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Load ``model`` (path or ModelProto), check it and run shape inference; CompileError if malformed."""
    if isinstance(model, onnx.ModelProto):
        proto, source = model, "model"
    else:
        path = Path(model)
        if not path.is_file():
            raise CompileError(f"ONNX file '{path}' does not exist")
        try:
            proto = onnx.load(str(path))
        except Exception as error:  # protobuf raises DecodeError, but also others on garbage
            raise CompileError(f"'{path}' is not a valid ONNX model: {type(error).__name__}: "
                               f"{_one_line(error)}") from None
        source = f"'{path}'"
    try:
        onnx.checker.check_model(proto)
        return onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except Exception as error:
        raise CompileError(f"{source} is not a valid ONNX model: {type(error).__name__}: "
                           f"{_one_line(error)}") from None


def _one_line(error: Exception) -> str:
    text = " ".join(str(error).split())
    return text[:300] + ("..." if len(text) > 300 else "")


# ---------------------------------------------------------------------------------------------------
# graph access
# ---------------------------------------------------------------------------------------------------
class _Graph:
    """Producer/consumer maps and constants of one ONNX graph."""

    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        self.model = model
        self.nodes = list(graph.node)
        self.consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        for node in self.nodes:
            if node.op_type == "Constant" and not node.input:
                attribute = node.attribute[0]
                if attribute.name != "value":
                    raise CompileError(f"{describe(node)}: attribute '{attribute.name}' is unsupported (only 'value')")
                self.consts[node.output[0]] = numpy_helper.to_array(attribute.t)
        self.producer = {out: node for node in self.nodes for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.nodes:
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        self.outputs = [o.name for o in graph.output]
        self.shapes = {v.name: v.type.tensor_type.shape
                       for v in list(graph.input) + list(graph.value_info) + list(graph.output)}

    def const(self, name: str) -> np.ndarray | None:
        return self.consts.get(name)

    def readers(self, tensor: str) -> list[onnx.NodeProto]:
        """The nodes that read ``tensor`` (several: a fork), in graph order; [] at the graph output."""
        readers = self.consumers.get(tensor, [])
        if readers and tensor in self.outputs:
            raise CompileError(f"tensor '{tensor}' is the graph output and also feeds "
                               f"{' and '.join(describe(n) for n in readers)}; unsupported")
        if not readers and tensor not in self.outputs:
            raise CompileError(f"tensor '{tensor}' is read by no node and is not the graph output")
        return readers

    def consumer(self, tensor: str) -> onnx.NodeProto | None:
        """The single node that reads ``tensor`` (None at the graph output); a second reader is a branch."""
        readers = self.consumers.get(tensor, [])
        if len(readers) + (tensor in self.outputs) > 1:
            names = [describe(n) for n in readers] + (["the graph output"] if tensor in self.outputs else [])
            raise CompileError(f"tensor '{tensor}' feeds {' and '.join(names)}: branches are unsupported "
                               f"(flowtile compiles a single chain of dense layers)")
        if not readers:
            if tensor not in self.outputs:
                raise CompileError(f"tensor '{tensor}' is read by no node and is not the graph output")
            return None
        return readers[0]

    def attrs(self, node: onnx.NodeProto) -> dict:
        return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _graph_input(graph: _Graph) -> tuple[str, tuple[int, ...]]:
    """The one non-initializer graph input and its shape without the batch dimension."""
    inputs = [i for i in graph.model.graph.input if i.name not in graph.consts]
    if len(inputs) != 1:
        raise CompileError(f"the graph has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                           f"flowtile compiles models with exactly one")
    tensor = inputs[0]
    if tensor.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise CompileError(f"graph input '{tensor.name}' has element type "
                           f"{onnx.TensorProto.DataType.Name(tensor.type.tensor_type.elem_type)}, expected FLOAT")
    dims = list(tensor.type.tensor_type.shape.dim)
    if len(dims) < 2:
        raise CompileError(f"graph input '{tensor.name}' has rank {len(dims)}; expected [batch, features...]")
    shape = []
    for axis, dim in enumerate(dims[1:], start=1):
        if not dim.HasField("dim_value") or dim.dim_value <= 0:
            raise CompileError(f"graph input '{tensor.name}' dimension {axis} is dynamic "
                               f"('{dim.dim_param or '?'}'); only the batch dimension may be")
        shape.append(int(dim.dim_value))
    return tensor.name, tuple(shape)


def _batch_dim(graph: _Graph, name: str) -> int | None:
    """The fixed batch size of the graph input, or None if it is symbolic."""
    tensor = next(i for i in graph.model.graph.input if i.name == name)
    dim = tensor.type.tensor_type.shape.dim[0]
    return int(dim.dim_value) if dim.HasField("dim_value") else None


# ---------------------------------------------------------------------------------------------------
# pattern matchers: each recognizes one node (and its constant operands) or raises naming it
# ---------------------------------------------------------------------------------------------------
def _expect(node: onnx.NodeProto | None, ops: set[str], where: str, after: str) -> onnx.NodeProto:
    if node is None:
        raise CompileError(f"the graph ends at '{after}' but {where} was expected there")
    if node.op_type not in ops:
        raise CompileError(f"{describe(node)}: unsupported op here (expected {where}); "
                           f"flowtile compiles chains of quantized Conv/MaxPool/MatMul/Gemm [+Add] [+Relu] layers")
    return node


def _scalar(graph: _Graph, node: onnx.NodeProto, index: int, what: str) -> np.ndarray:
    value = graph.const(node.input[index]) if len(node.input) > index and node.input[index] else None
    if value is None:
        raise CompileError(f"{describe(node)}: {what} '{node.input[index] if len(node.input) > index else ''}' "
                           f"must be a constant")
    if value.size != 1:
        raise CompileError(f"{describe(node)}: {what} has {value.size} values; activations must be "
                           f"quantized per tensor")
    return value


def match_quantize(graph: _Graph, node: onnx.NodeProto) -> QuantParams:
    """QuantizeLinear with constant per-tensor scale and int8/uint8 zero point."""
    attrs = graph.attrs(node)
    scale = float(_scalar(graph, node, 1, "scale").reshape(()))
    if len(node.input) > 2 and node.input[2]:
        zp = _scalar(graph, node, 2, "zero point")
        dtype = _QUANT_DTYPES.get(helper.np_dtype_to_tensor_dtype(zp.dtype))
        zero_point = int(zp.reshape(()))
    else:  # no zero point: ONNX says uint8 unless output_dtype says otherwise
        dtype = _QUANT_DTYPES.get(attrs.get("output_dtype", onnx.TensorProto.UINT8))
        zero_point = 0
    if dtype is None:
        raise CompileError(f"{describe(node)}: quantized type must be int8 or uint8")
    if attrs.get("saturate", 1) != 1 or attrs.get("block_size", 0) != 0:
        raise CompileError(f"{describe(node)}: attribute 'saturate'/'block_size' is unsupported")
    if not (scale > 0 and math.isfinite(scale)):
        raise CompileError(f"{describe(node)}: scale {scale} must be positive and finite")
    return QuantParams(scale, zero_point, dtype)


def match_dequantize(graph: _Graph, node: onnx.NodeProto, expected: QuantParams) -> None:
    """DequantizeLinear undoing the QuantizeLinear just before it (same scale and zero point)."""
    got = match_quantize(graph, node)
    if got != expected:
        raise CompileError(f"{describe(node)}: dequantizes with {got}, but its QuantizeLinear used {expected}")


def match_quantized_const(graph: _Graph, name: str, consumer: onnx.NodeProto, what: str):
    """``DequantizeLinear(constant)``: returns (q int64 array, scale float64 array, zp array, axis) or None."""
    node = graph.producer.get(name)
    if node is None or node.op_type != "DequantizeLinear":
        return None
    q = graph.const(node.input[0])
    scale = graph.const(node.input[1])
    has_zp = len(node.input) > 2 and node.input[2]
    zp = graph.const(node.input[2]) if has_zp else np.zeros((), q.dtype if q is not None else np.uint8)
    if q is None or scale is None or zp is None:
        raise CompileError(f"{describe(node)} feeding the {what} of {describe(consumer)}: "
                           f"input, scale and zero point must be constants")
    attrs = graph.attrs(node)
    if attrs.get("block_size", 0) != 0:
        raise CompileError(f"{describe(node)}: attribute 'block_size' (blocked quantization) is unsupported")
    axis = attrs.get("axis", 1)
    if axis < 0:
        axis += q.ndim
    return q, scale.astype(np.float64), zp, axis


def _per_channel(values: np.ndarray, axis: int, rank: int, channel_axis: int, n: int,
                 node: onnx.NodeProto, what: str) -> np.ndarray:
    """A scale or zero point as ``[n]`` along the output channel, or CompileError if along another axis."""
    flat = values.reshape(-1)
    if flat.size == 1:
        return np.full(n, flat[0])
    if flat.size == n and (axis == channel_axis or rank == 1):
        return flat
    raise CompileError(f"{describe(node)}: {what} has {flat.size} values along axis {axis}; only per-tensor or "
                       f"per-output-channel (axis {channel_axis}, {n} values) quantization is supported")


def _quantized_at_run_time(graph: _Graph, name: str, consumer: onnx.NodeProto, what: str, report: bool = True):
    """``DQ(Q(float constant))`` with constant parameters (``quantize_static`` on a weight the exporter computes, e.g.
    TorchScript without constant folding: ``Transpose(W)``, folded on import, then quantized as an activation, per
    tensor with a zero point) -> ``(q - zp`` int8, scale, zero point 0, axis), or None for any other form.

    The values onnxruntime multiplies are ``(q - zp) * scale`` exactly, so the centred integers with zero point 0 are
    the same weight when they fit int8. An output channel whose centred values do not (the zero point moves the range
    to e.g. -133..122) is requantized symmetrically with scale ``max|q - zp| * scale / 127``: not exact (each weight
    within half a new step), logged as a warning; a per-axis scale along another axis raises naming the
    QuantizeLinear."""
    dq = graph.producer.get(name)
    quantize = graph.producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
    if quantize is None or quantize.op_type != "QuantizeLinear":
        return None
    values = graph.const(quantize.input[0])
    params = [graph.const(n) if len(node.input) > i and node.input[i] else None
              for node in (quantize, dq) for i, n in ((1, node.input[1]), (2, node.input[2] if len(node.input) > 2
                                                                            else ""))]
    if values is None or values.dtype.kind != "f" or any(p is None for p in params):
        return None
    scale, zp, dq_scale, dq_zp = params
    axis = graph.attrs(quantize).get("axis", 1)
    if (graph.attrs(dq).get("axis", 1) != axis or scale.shape != dq_scale.shape or zp.shape != dq_zp.shape
            or np.any(scale != dq_scale) or np.any(zp != dq_zp) or zp.dtype not in (np.int8, np.uint8)):
        raise CompileError(f"{describe(dq)} feeding the {what} of {describe(consumer)}: dequantizes with other "
                           f"parameters than {describe(quantize)} quantizes with")
    if axis < 0:
        axis += values.ndim
    shape = [1] * values.ndim
    if scale.size > 1:
        shape[axis] = -1
    lo, hi = (-128, 127) if zp.dtype == np.int8 else (0, 255)
    q = np.clip(np.rint(values.astype(np.float32) / scale.astype(np.float32).reshape(shape))
                + zp.astype(np.int64).reshape(shape if zp.size > 1 else ()), lo, hi).astype(np.int64)
    centred = q - zp.astype(np.int64).reshape(shape if zp.size > 1 else ())
    if centred.min() >= -128 and centred.max() <= 127:
        return centred.astype(np.int8), scale.astype(np.float64), np.zeros(zp.shape, np.int8), axis
    # The centred values reach beyond int8 (a zero point moves the range): per output channel (axis ``channel``),
    # a channel that does not fit is requantized symmetrically, scale max|q - zp| * s / 127, rounding to nearest.
    # Not exact: each of its weights moves by at most half its new scale.
    channel = 0 if consumer.op_type == "Gemm" and graph.attrs(consumer).get("transB", 0) else values.ndim - 1
    moved = np.moveaxis(centred, channel, 0).reshape(centred.shape[channel], -1).astype(np.float64)
    base = np.broadcast_to(scale.astype(np.float64).reshape(shape), values.shape)
    base = np.moveaxis(base, channel, 0).reshape(centred.shape[channel], -1)
    if np.any(base != base[:, :1]):
        raise CompileError(f"{describe(quantize)} quantizes the {what} of {describe(consumer)} with zero point "
                           f"{int(np.ravel(zp)[0])}: centred values reach {int(centred.min())}..{int(centred.max())}, "
                           f"outside int8; the PE multiplies raw int8 weights (zero point 0)")
    peak = np.abs(moved).max(axis=1)
    factor = np.where(peak > 127, peak / 127.0, 1.0)
    requantized = np.clip(np.rint(moved / factor[:, None]), -127, 127).astype(np.int8)
    out = np.moveaxis(requantized.reshape(np.moveaxis(centred, channel, 0).shape), 0, channel)
    if report:
        logging.getLogger(__name__).warning(
            "%s quantizes the %s of %s with zero point %s: %d output channel(s) requantized symmetrically to fit int8 "
            "(within half a new weight step of the model's weights)", describe(quantize), what, describe(consumer),
            int(np.ravel(zp)[0]), int((peak > 127).sum()))
    return out, base[:, 0] * factor, np.zeros(centred.shape[channel], np.int8), channel


def match_weight(graph: _Graph, node: onnx.NodeProto, transposed: bool):
    """The weight operand (input 1) of MatMul/Gemm: ``DQ(int8 W, scale, zp=0)`` -> (W [n_out, n_in], s_w [n_out]);
    also ``DQ(Q(float W))`` (:func:`_quantized_at_run_time`)."""
    found = (_quantized_at_run_time(graph, node.input[1], node, "weight")
             or match_quantized_const(graph, node.input[1], node, "weight"))
    if found is None:
        raise CompileError(f"{describe(node)}: weight '{node.input[1]}' must be a DequantizeLinear of a constant "
                           f"int8 tensor (a quantized model); got "
                           f"{'a float constant' if graph.const(node.input[1]) is not None else 'a computed tensor'}")
    q, scale, zp, axis = found
    dq = graph.producer[node.input[1]]
    if q.ndim != 2:
        raise CompileError(f"{describe(node)}: weight has rank {q.ndim}, expected a 2-D matrix")
    channel_axis = 0 if transposed else 1
    n_out = q.shape[channel_axis]
    zp = _per_channel(zp, axis, q.ndim, channel_axis, n_out, dq, "weight zero point").astype(np.int64)
    if q.dtype not in (np.int8, np.uint8):
        raise CompileError(f"{describe(dq)}: weight type {q.dtype} is unsupported "
                           f"(int8, or uint8 with zero point 128)")
    offset = 128 if q.dtype == np.uint8 else 0  # uint8 weights with zero point 128 are int8 weights + 128
    if np.any(zp != offset):
        raise CompileError(f"{describe(dq)}: non-zero weight zero point {int(zp[zp != offset][0]) - offset}"
                           f"{' (int8 domain)' if offset else ''}; the PE multiplies raw int8 weights, so weights "
                           f"must be quantized symmetrically (zero point 0)")
    q = q.astype(np.int64) - offset
    scales = _per_channel(scale, axis, q.ndim, channel_axis, n_out, dq, "weight scale")
    if not np.all((scales > 0) & np.isfinite(scales)):
        raise CompileError(f"{describe(dq)}: weight scales must be positive and finite")
    weight = q.astype(np.int8) if transposed else q.T.astype(np.int8)
    return np.ascontiguousarray(weight), scales


def match_bias(graph: _Graph, name: str, consumer: onnx.NodeProto, acc_scale: np.ndarray) -> np.ndarray:
    """A bias operand -> int32 ``[n_out]`` in accumulator units (``s_x * s_w[o]``).

    Either ``DQ(int32 constant)`` (the quantizer's form: taken as is when its scale is the accumulator's)
    or a float constant (rounded to the accumulator's scale, as a float add followed by requantization
    would within half a unit of the accumulator).
    """
    n_out = acc_scale.size
    found = match_quantized_const(graph, name, consumer, "bias")
    if found is not None:
        q, scale, zp, axis = found
        scale = _per_channel(scale, axis, q.ndim, 0 if q.ndim == 1 else q.ndim - 1, n_out,
                             graph.producer[name], "bias scale")
        zp = _per_channel(zp, axis, q.ndim, 0 if q.ndim == 1 else q.ndim - 1, n_out,
                          graph.producer[name], "bias zero point").astype(np.int64)
        q = _broadcast_vector(q, n_out, consumer, "bias").astype(np.int64)
        if np.all(zp == 0) and np.allclose(scale, acc_scale, rtol=1e-6, atol=0):
            return _to_int32(q, consumer)
        real = (q - zp) * scale
    else:
        value = graph.const(name)
        if value is None:
            raise CompileError(f"{describe(consumer)}: bias '{name}' must be a constant (branches are unsupported)")
        real = _broadcast_vector(value, n_out, consumer, "bias").astype(np.float64)
    return _to_int32(np.rint(real / acc_scale), consumer)


def _broadcast_vector(value: np.ndarray, n: int, node: onnx.NodeProto, what: str) -> np.ndarray:
    if value.size == 1:
        return np.full(n, value.reshape(-1)[0])
    if value.size == n and value.shape[-1] == n:
        return value.reshape(n)
    raise CompileError(f"{describe(node)}: {what} of shape {list(value.shape)} does not broadcast to [{n}]")


def _to_int32(values: np.ndarray, node: onnx.NodeProto) -> np.ndarray:
    if np.any(np.abs(values) > 2**31 - 1):
        raise CompileError(f"{describe(node)}: bias exceeds the int32 range at the accumulator's scale")
    return values.astype(np.int32)


def match_dense(graph: _Graph, node: onnx.NodeProto, x: str, x_params: QuantParams, n_in: int):
    """MatMul(x, DQ(W)) or Gemm(x, DQ(W)[, bias]) -> (weight, weight scales, bias or None)."""
    attrs = graph.attrs(node)
    if node.input[0] != x:
        raise CompileError(f"{describe(node)}: the activation must be the first input (A), not the weight")
    transposed = False
    if node.op_type == "Gemm":
        for name, ok in (("alpha", 1.0), ("beta", 1.0), ("transA", 0)):
            if attrs.get(name, ok) != ok:
                raise CompileError(f"{describe(node)}: attribute '{name}' = {attrs[name]} is unsupported "
                                   f"(must be {ok})")
        transposed = bool(attrs.get("transB", 0))
    weight, scales = match_weight(graph, node, transposed)
    if weight.shape[1] != n_in:
        raise CompileError(f"{describe(node)}: weight has {weight.shape[1]} inputs, the activation has {n_in}")
    bias = None
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        bias = match_bias(graph, node.input[2], node, x_params.scale * scales)
    return weight, scales, bias


def match_bias_add(graph: _Graph, node: onnx.NodeProto, x: str, acc_scale: np.ndarray) -> np.ndarray:
    """Add(x, bias constant) straight after MatMul/Gemm (before any requantization)."""
    other = [name for name in node.input if name != x]
    if len(other) != 1:
        raise CompileError(f"{describe(node)}: expected Add(activation, bias constant)")
    return match_bias(graph, other[0], node, acc_scale)


def match_flatten(graph: _Graph, node: onnx.NodeProto, shape: tuple[int, ...]) -> int:
    """Flatten(axis=1) or Reshape to ``[batch, n]``: returns n."""
    n = int(np.prod(shape))
    if node.op_type == "Flatten":
        if graph.attrs(node).get("axis", 1) != 1:
            raise CompileError(f"{describe(node)}: attribute 'axis' = {graph.attrs(node)['axis']} is unsupported "
                               f"(only axis 1 flattens to [batch, n])")
        return n
    target = graph.const(node.input[1])
    if target is None:
        raise CompileError(f"{describe(node)}: the target shape must be a constant")
    target = [int(v) for v in target.reshape(-1)]
    if len(target) == 2 and ((target[1] == n and target[0] in (-1, 0)) or (target[1] == -1 and target[0] == 0)):
        return n
    raise CompileError(f"{describe(node)}: reshapes to {target}; only [batch, {n}] (e.g. [-1, {n}]) is supported")


# ---------------------------------------------------------------------------------------------------
# the chain walk
# ---------------------------------------------------------------------------------------------------
class _Cursor:
    """Walks the chain: ``tensor`` is the current activation, ``node`` its single reader (None at the end
    or at a fork, where ``forks`` lists the readers)."""

    def __init__(self, graph: _Graph, tensor: str, visited: set | None = None):
        self.graph, self.visited = graph, visited if visited is not None else set()
        self.move_to(tensor)

    def move_to(self, tensor: str) -> None:
        readers = self.graph.readers(tensor)
        self.tensor, self.forks = tensor, readers if len(readers) > 1 else []
        self.node = readers[0] if len(readers) == 1 else None
        if self.node is not None:
            self.visited.add(id(self.node))

    def branch(self, reader: onnx.NodeProto) -> "_Cursor":
        """A cursor at this fork's tensor that follows only ``reader``."""
        cursor = _Cursor.__new__(_Cursor)
        cursor.graph, cursor.visited, cursor.tensor, cursor.node, cursor.forks = (
            self.graph, self.visited, self.tensor, reader, [])
        self.visited.add(id(reader))
        return cursor

    def at_join(self) -> bool:
        """At an Add or Concat of two activations (the join of a residual block), not of a constant."""
        return (self.at("Add", "Concat") and len(self.node.input) == 2
                and all(_affine_constant(self.graph, name) is None for name in self.node.input))

    def at(self, *ops: str) -> bool:
        return self.node is not None and self.node.op_type in ops

    def take(self, ops: set[str], what: str) -> onnx.NodeProto:
        """The current node, which must be one of ``ops``; the cursor moves to its output."""
        if self.forks:
            raise CompileError(f"tensor '{self.tensor}' feeds {' and '.join(describe(n) for n in self.forks)} where "
                               f"{what} was expected; flowtile compiles a fork only as a residual block (two branches "
                               f"of feature-map layers that meet at one Add)")
        node = _expect(self.node, ops, what, self.tensor)
        self.move_to(node.output[0])
        return node


def match_qdq(cursor: _Cursor, what: str) -> QuantParams:
    """QuantizeLinear -> DequantizeLinear with the same parameters: the activation's quantization."""
    params = match_quantize(cursor.graph, cursor.take({"QuantizeLinear"}, what))
    match_dequantize(cursor.graph, cursor.take({"DequantizeLinear"}, "DequantizeLinear"), params)
    return params


def match_flattens(cursor: _Cursor, shape: tuple[int, ...], params: QuantParams | None) -> int:
    """Flatten/Reshape to ``[batch, n]``, each optionally followed by a Q/DQ pair with unchanged
    ``params`` (a relabelling of the same quantized values); returns n."""
    n = int(np.prod(shape))
    while cursor.at(*_RESHAPE_OPS):
        n = match_flatten(cursor.graph, cursor.take(_RESHAPE_OPS, "Flatten or Reshape"), shape)
        if params is not None and cursor.at("QuantizeLinear"):
            node = cursor.node
            if match_qdq(cursor, "QuantizeLinear") != params:
                raise CompileError(f"{describe(node)}: requantizes a reshaped tensor to new parameters; unsupported")
    return n


def match_relu_requantized(cursor: _Cursor, params: QuantParams) -> bool:
    """A Relu on a dequantized activation, requantized with the same parameters (= ``max(q, zp)``) or
    ending the graph (= the dequantization of ``max(q, zp)``)."""
    if not cursor.at("Relu"):
        return False
    relu = cursor.take({"Relu"}, "Relu")
    if cursor.node is not None:
        requantize = cursor.node
        if match_qdq(cursor, "QuantizeLinear after Relu") != params:
            raise CompileError(f"{describe(requantize)}: requantizes the output of {describe(relu)} to new "
                               f"parameters; unsupported")
    return True


def match_output(cursor: _Cursor, producer: onnx.NodeProto) -> tuple[QuantParams, bool, float | None]:
    """[Relu | Clip(0, m)] -> Q -> DQ [-> Relu [-> Q -> DQ]] after ``producer``: (output params, relu, clip max)."""
    relu, clip_max = False, None
    if cursor.at("Relu"):
        cursor.take({"Relu"}, "Relu")
        relu = True
    elif cursor.at("Clip"):
        clip = cursor.node
        lo = _clip_bound(cursor.graph, clip, 1, "min")
        hi = _clip_bound(cursor.graph, clip, 2, "max")
        if lo is None or lo != 0.0 or (hi is not None and not hi > 0):
            raise CompileError(f"{describe(clip)}: attribute/input 'min' = {lo}, 'max' = {hi} is unsupported "
                               f"(only Clip(0, m) with m > 0, a ReLU with an upper bound)")
        cursor.take({"Clip"}, "Clip")
        relu, clip_max = True, hi
    out_params = match_qdq(cursor, f"the QuantizeLinear of {describe(producer)}'s output")
    relu = match_relu_requantized(cursor, out_params) or relu
    return out_params, relu, clip_max


def _clip_bound(graph: _Graph, node: onnx.NodeProto, index: int, what: str) -> float | None:
    attrs = graph.attrs(node)
    if what in attrs:  # opset < 11
        return float(attrs[what])
    if len(node.input) <= index or not node.input[index]:
        return None
    value = graph.const(node.input[index])
    if value is None or value.size != 1:
        raise CompileError(f"{describe(node)}: input '{what}' must be a scalar constant")
    return float(value.reshape(()))


def match_layer(cursor: _Cursor, x_params: QuantParams, n_in: int, index: int,
                input_map: tuple[int, int, int] | None = None) -> DenseLayer:
    """MatMul/Gemm(DQ(W)[, bias]) [-> Add(bias)] [-> Relu] -> Q -> DQ [-> Relu [-> Q -> DQ]]."""
    graph = cursor.graph
    x = cursor.tensor
    if cursor.at("Conv", "MaxPool", "AveragePool"):  # a windowed op on a tensor that is not a (C, H, W) map
        node = cursor.node
        check_window_attributes(node, {a.name: helper.get_attribute_value(a) for a in node.attribute}, None)
        raise CompileError(f"{describe(node)}: its input '{x}' is not a 2-D feature map [N, C, H, W]; windowed "
                           f"layers need one")
    dense = cursor.take({"MatMul", "Gemm"}, "MatMul or Gemm")
    weight, scales, bias = match_dense(graph, dense, x, x_params, n_in)
    acc_scale = x_params.scale * scales
    if cursor.at("Add"):
        if bias is not None:
            raise CompileError(f"{describe(cursor.node)}: a second bias after {describe(dense)} is unsupported")
        bias = match_bias_add(graph, cursor.node, cursor.tensor, acc_scale)
        cursor.take({"Add"}, "Add")
    out_params, relu, clip_max = match_output(cursor, dense)
    # An Add(bias) after the requantization (quantize_static's MatMul -> Q -> DQ -> Add -> Q -> DQ) is a layer of
    # its own: the chain walk matches it as an affine step (match_affine), so both roundings happen.
    if bias is None:
        bias = np.zeros(weight.shape[0], np.int32)
    return DenseLayer(dense.name or f"{dense.op_type.lower()}_{index}", dense.op_type, weight, bias, x_params,
                      scales, out_params, relu, input_map=input_map, clip_max=clip_max)


def _sequence(shape: tuple[int, int]) -> str:
    return f"a sequence [N, {shape[0]}, {shape[1]}]"


def match_sequence_linear(cursor: _Cursor, x_params: QuantParams, seq: tuple[int, int], index: int) -> DenseLayer:
    """``MatMul(DQ(x [N, T, C]), DQ(W int8 [C, K])) [-> Add(bias)] [-> Relu|Clip] -> Q -> DQ``: ``nn.Linear`` over the
    last axis of a sequence, i.e. a 1x1 convolution over the 1 x T map of C channels the sequence is on chip
    (``[T][C]`` row-major is pixel-major). Returns op ``"MatMul"`` with weight ``[K, C, 1, 1]``, a 1x1 window over
    ``(C, 1, T)`` and ``channels_last`` (its output, ``[N, T, K]``, in model order ``t*K + k``)."""
    graph, node = cursor.graph, cursor.node
    steps, channels = seq
    if node.input[0] != cursor.tensor:
        raise CompileError(f"{describe(node)}: its input '{cursor.tensor}' is {_sequence(seq)} read as the second "
                           f"operand (B); flowtile compiles a MatMul over the last axis of a sequence (nn.Linear: "
                           f"x @ W, W a constant [C, K])")
    if _affine_constant(graph, node.input[1]) is None and \
            _quantized_at_run_time(graph, node.input[1], node, "weight", report=False) is None:
        raise CompileError(f"{describe(node)}: its input '{cursor.tensor}' is {_sequence(seq)} multiplied by the "
                           f"computed tensor '{node.input[1]}'; a MatMul of two activations (attention) is "
                           f"unsupported (only nn.Linear: a constant weight [C, K])")
    if steps > MAX_MAP:
        raise CompileError(f"{describe(node)}: its input '{cursor.tensor}' is {_sequence(seq)}; T = {steps} exceeds "
                           f"{MAX_MAP} (the sequence runs as a 1 x T map; 8-bit map registers)")
    layer = match_layer(cursor, x_params, channels, index)
    n_out = layer.n_out
    layer.weight = np.ascontiguousarray(layer.weight.reshape(n_out, channels, 1, 1))
    layer.window = Window(channels, 1, steps, 1, 1, 1, 0, 0, 1, steps)
    layer.channels_last = True
    return layer


#: Limits of the windowing registers (flowtile.arch.CONFIG_FIELDS widths: kernel_h/kernel_w, pad_top/pad_left,
#: the map registers 8 bits, stride 2 bits). Pads are further kept below the kernel (:func:`check_window_attributes`).
MAX_KERNEL = 255
MAX_STRIDE = 3
MAX_PAD = MAX_KERNEL - 1  # pads stay below the kernel
MAX_MAP = 255


def _ints(attrs: dict, name: str, default: list[int]) -> list[int]:
    return [int(v) for v in attrs.get(name, default)]


def check_window_attributes(node: onnx.NodeProto, attrs: dict, kernel: tuple[int, int] | None):
    """The attribute checks of Conv/MaxPool/AveragePool that need no shapes (also run on float models before
    quantizing): returns (kernel_shape, strides, pads) or raises CompileError naming node, op and attribute.
    (A Conv's ``group`` needs the channel counts: :func:`match_conv` checks it.)
    """
    if node.op_type in ("MaxPool", "AveragePool") and attrs.get("ceil_mode", 0) != 0:
        raise CompileError(f"{describe(node)}: attribute 'ceil_mode' = {attrs['ceil_mode']} is unsupported (only 0)")
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        value = attrs["auto_pad"]
        raise CompileError(f"{describe(node)}: attribute 'auto_pad' = "
                           f"{value.decode() if isinstance(value, bytes) else value} is unsupported (only NOTSET, "
                           f"with explicit 'pads')")
    shape = _ints(attrs, "kernel_shape", list(kernel) if kernel is not None else [])
    if len(shape) != 2 or (kernel is not None and tuple(shape) != tuple(kernel)):
        raise CompileError(f"{describe(node)}: attribute 'kernel_shape' = {shape} is unsupported "
                           f"(2-D windows{f' matching the weight {list(kernel)}' if kernel is not None else ''})")
    if not all(1 <= k <= MAX_KERNEL for k in shape):
        raise CompileError(f"{describe(node)}: attribute 'kernel_shape' = {shape} is unsupported "
                           f"(1..{MAX_KERNEL} each: 8-bit kernel registers)")
    dilations = _ints(attrs, "dilations", [1, 1])
    if any(d != 1 for d in dilations):
        raise CompileError(f"{describe(node)}: attribute 'dilations' = {dilations} is unsupported (only 1)")
    strides = _ints(attrs, "strides", [1, 1])
    if len(strides) != 2 or strides[0] != strides[1] or not 1 <= strides[0] <= MAX_STRIDE:
        raise CompileError(f"{describe(node)}: attribute 'strides' = {strides} is unsupported "
                           f"(equal strides 1..{MAX_STRIDE})")
    pads = _ints(attrs, "pads", [0, 0, 0, 0])
    kh, kw = shape
    # pads = [top, left, bottom, right]; below the kernel, every window reads at least one map row and column
    # (so every band of output rows stores input rows, section 8)
    if len(pads) != 4 or not all(0 <= p < k for p, k in zip(pads, (kh, kw, kh, kw))):
        raise CompileError(f"{describe(node)}: attribute 'pads' = {pads} is unsupported (below the {kh}x{kw} "
                           f"kernel: top and bottom 0..{kh - 1}, left and right 0..{kw - 1})")
    if node.op_type == "AveragePool" and attrs.get("count_include_pad", 0) == 0 and any(pads):
        raise CompileError(f"{describe(node)}: attribute 'count_include_pad' = 0 with 'pads' = {pads} is unsupported "
                           f"(border windows would divide by their own sizes; use count_include_pad = 1 or no padding)")
    return shape, strides, pads


def match_window(graph: _Graph, node: onnx.NodeProto, in_shape: tuple[int, int, int],
                 kernel: tuple[int, int] | None, allowed: set[str]) -> Window:
    """The common window attributes of Conv/MaxPool/AveragePool -> :class:`Window`, or CompileError naming the
    attribute."""
    attrs = graph.attrs(node)
    for name in sorted(set(attrs) - allowed):
        raise CompileError(f"{describe(node)}: attribute '{name}' = {attrs[name]} is unsupported")
    channels, height, width = in_shape
    shape, strides, pads = check_window_attributes(node, attrs, kernel)
    (kh, kw), stride = shape, strides[0]
    top, left, bottom, right = pads
    out_h = (height + top + bottom - kh) // stride + 1
    out_w = (width + left + right - kw) // stride + 1
    if out_h < 1 or out_w < 1:
        raise CompileError(f"{describe(node)}: attribute 'kernel_shape' = {[kh, kw]} is unsupported: the window "
                           f"does not fit the padded {height}x{width} input map")
    for what, value in (("input height", height), ("input width", width), ("output height", out_h),
                        ("output width", out_w)):
        if value > MAX_MAP:
            raise CompileError(f"{describe(node)}: {what} {value} exceeds {MAX_MAP} (8-bit map registers)")
    return Window(channels, height, width, kh, kw, stride, top, left, out_h, out_w)


def match_conv(cursor: _Cursor, x_params: QuantParams, in_shape: tuple[int, int, int], index: int) -> DenseLayer:
    """Conv(DQ(x), DQ(W int8 [O, C, KH, KW]), [DQ(b int32)]) [-> Relu|Clip] -> Q -> DQ [-> Relu -> Q -> DQ]."""
    graph = cursor.graph
    x = cursor.tensor
    conv = cursor.take({"Conv"}, "Conv")
    if conv.input[0] != x:
        raise CompileError(f"{describe(conv)}: the activation must be the first input (X)")
    attrs = graph.attrs(conv)
    group = attrs.get("group", 1)
    found = match_quantized_const(graph, conv.input[1], conv, "weight")
    if found is None:
        raise CompileError(f"{describe(conv)}: weight '{conv.input[1]}' must be a DequantizeLinear of a constant "
                           f"int8 tensor (a quantized model)")
    q, scale, zp, axis = found
    dq = graph.producer[conv.input[1]]
    if q.ndim != 4:
        raise CompileError(f"{describe(conv)}: weight has rank {q.ndim}; only 2-D convolutions are supported")
    depthwise = group != 1 and group == in_shape[0] == q.shape[0] and q.shape[1] == 1
    if group < 1 or in_shape[0] % group or q.shape[0] % group:
        raise CompileError(f"{describe(conv)}: attribute 'group' = {group} does not divide the {in_shape[0]} input "
                           f"and {q.shape[0]} output channels")
    if q.shape[1] * group != in_shape[0]:
        raise CompileError(f"{describe(conv)}: weight has {q.shape[1]} input channels, the input map has "
                           f"{in_shape[0]}")
    if q.dtype not in (np.int8, np.uint8):
        raise CompileError(f"{describe(dq)}: weight type {q.dtype} is unsupported (int8)")
    n_out = q.shape[0]
    offset = 128 if q.dtype == np.uint8 else 0
    zp = _per_channel(zp, axis, q.ndim, 0, n_out, dq, "weight zero point").astype(np.int64)
    if np.any(zp != offset):
        raise CompileError(f"{describe(dq)}: non-zero weight zero point {int(zp[zp != offset][0]) - offset}; the PE "
                           f"multiplies raw int8 weights, so weights must be quantized symmetrically (zero point 0)")
    scales = _per_channel(scale, axis, q.ndim, 0, n_out, dq, "weight scale")
    if not np.all((scales > 0) & np.isfinite(scales)):
        raise CompileError(f"{describe(dq)}: weight scales must be positive and finite")
    window = match_window(graph, conv, in_shape, q.shape[2:],
                          {"auto_pad", "dilations", "group", "kernel_shape", "pads", "strides"})
    bias = None
    if len(conv.input) > 2 and conv.input[2]:
        bias = match_bias(graph, conv.input[2], conv, x_params.scale * scales)
    if cursor.at("Add"):
        raise CompileError(f"{describe(cursor.node)}: an Add after {describe(conv)} is unsupported "
                           f"(residual connections and separate biases are not compiled yet)")
    out_params, relu, clip_max = match_output(cursor, conv)
    if bias is None:
        bias = np.zeros(n_out, np.int32)
    weight = (q.astype(np.int64) - offset).astype(np.int8)
    groups = 1
    if group != 1 and not depthwise:
        # Other grouped convolutions run as an ordinary Conv whose weight is block-diagonal over the groups:
        # exact, at the cost of the zero products (not counted as useful MACs in the report).
        groups, per_group, outs = group, in_shape[0] // group, n_out // group
        dense = np.zeros((n_out, in_shape[0], *q.shape[2:]), np.int8)
        for g in range(group):
            dense[g * outs:(g + 1) * outs, g * per_group:(g + 1) * per_group] = weight[g * outs:(g + 1) * outs]
        weight = dense
    return DenseLayer(conv.name or f"conv_{index}", "DepthwiseConv" if depthwise else "Conv", weight, bias,
                      x_params, scales, out_params, relu, window=window, clip_max=clip_max, groups=groups)


def match_avgpool(cursor: _Cursor, x_params: QuantParams, in_shape: tuple[int, int, int], index: int) -> DenseLayer:
    """(Global)AveragePool(DQ(x)) [-> Relu|Clip] -> Q -> DQ [-> Relu -> Q -> DQ]: a lane layer with all-one
    weights, weight scale ``1 / (KH*KW)`` and no bias (the output scale may differ from the input's).

    GlobalAveragePool windows the whole map (``H x W`` kernel, one output pixel). AveragePool: kernel 1..255,
    equal strides 1..3, pads below the kernel, ``count_include_pad = 1`` unless unpadded, ceil_mode 0, dilation 1;
    an unpadded ``H x W`` window (one output pixel, e.g. ResNet-8's 8x8 AveragePool) is a GlobalAveragePool.
    """
    graph = cursor.graph
    pool = cursor.take({"AveragePool", "GlobalAveragePool"}, "AveragePool or GlobalAveragePool")
    channels, height, width = in_shape
    op_type = pool.op_type
    if pool.op_type == "GlobalAveragePool":
        if height > MAX_MAP or width > MAX_MAP:
            raise CompileError(f"{describe(pool)}: a {height}x{width} window exceeds {MAX_MAP} (8-bit kernel registers)")
        window = Window(channels, height, width, height, width, 1, 0, 0, 1, 1)
        name = pool.name or f"globalaveragepool_{index}"
    else:
        window = match_window(graph, pool, in_shape, None, {"auto_pad", "ceil_mode", "count_include_pad",
                                                            "dilations", "kernel_shape", "pads", "strides"})
        name = pool.name or f"averagepool_{index}"
    if cursor.node is None:
        raise CompileError(f"{describe(pool)}: its output is not quantized (the graph ends there); flowtile needs "
                           f"a QuantizeLinear after it")
    out_params, relu, clip_max = match_output(cursor, pool)
    area = window.kernel_h * window.kernel_w
    weight = np.ones((channels, 1, window.kernel_h, window.kernel_w), np.int8)
    return DenseLayer(name, op_type, weight, np.zeros(channels, np.int32), x_params,
                      np.full(channels, 1.0 / area), out_params, relu, window=window, clip_max=clip_max)


def match_maxpool(cursor: _Cursor, x_params: QuantParams, in_shape: tuple[int, int, int], index: int) -> PoolLayer:
    """MaxPool(DQ(x)) -> Q -> DQ with ``x``'s scale and zero point [-> Relu -> Q -> DQ]."""
    graph = cursor.graph
    pool = cursor.take({"MaxPool"}, "MaxPool")
    if len(pool.output) > 1 and pool.output[1]:
        raise CompileError(f"{describe(pool)}: output 'Indices' is unsupported")
    attrs = graph.attrs(pool)
    if attrs.get("ceil_mode", 0) != 0:
        raise CompileError(f"{describe(pool)}: attribute 'ceil_mode' = {attrs['ceil_mode']} is unsupported (only 0)")
    if attrs.get("storage_order", 0) != 0:
        raise CompileError(f"{describe(pool)}: attribute 'storage_order' = {attrs['storage_order']} is unsupported")
    window = match_window(graph, pool, in_shape, None,
                          {"auto_pad", "ceil_mode", "dilations", "kernel_shape", "pads", "strides", "storage_order"})
    node = cursor.node
    out_params = match_qdq(cursor, f"the QuantizeLinear of {describe(pool)}'s output")
    if out_params != x_params:
        raise CompileError(f"{describe(pool)}: its output is quantized with {out_params} (by "
                           f"{describe(node)}), its input with {x_params}; max pooling on int8 values needs "
                           f"equal scales and zero points (a Relu right after a MaxPool is folded into its output "
                           f"quantization by quantize_static: put the Relu before the MaxPool)")
    relu = match_relu_requantized(cursor, out_params)
    return PoolLayer(pool.name or f"maxpool_{index}", "MaxPool", window, x_params, out_params, relu)


_WINDOWED_OPS = ("Conv", "MaxPool", "AveragePool", "GlobalAveragePool")


def _match_windowed(cursor: _Cursor, x_params: QuantParams, fmap: tuple[int, int, int],
                    index: int) -> DenseLayer | PoolLayer:
    """The Conv, MaxPool or average pool at the cursor, on the feature map ``fmap``."""
    if cursor.at("Conv"):
        return match_conv(cursor, x_params, fmap, index)
    if cursor.at("AveragePool", "GlobalAveragePool"):
        return match_avgpool(cursor, x_params, fmap, index)
    return match_maxpool(cursor, x_params, fmap, index)


def _match_residual(cursor: _Cursor, x_params: QuantParams, fmap: tuple[int, int, int], source: int,
                    layers: list) -> tuple[_Cursor, QuantParams, tuple[int, int, int], int]:
    """A residual block at a fork: two branches of windowed layers (one may be empty: an identity shortcut)
    from the fork's tensor to one Add or channel Concat, then the join's output quantization
    (docs/architecture.md sections 4.2, 4.3).

    Appends the branches' layers, the shorter branch first (its output then rides in the stream while the
    longer one computes), and the :class:`AddLayer` or :class:`ConcatLayer` to ``layers``; returns the cursor
    after the join, its output quantization and shape, and its layer index.
    """
    fork = cursor.tensor
    readers = cursor.forks
    if len(readers) != 2:
        raise CompileError(f"tensor '{fork}' feeds {len(readers)} nodes ({', '.join(describe(n) for n in readers)}); "
                           f"flowtile compiles forks into two branches that meet at one Add")
    branches = []
    for reader in readers:
        walker = cursor.branch(reader)
        found, params, shape = [], x_params, fmap
        while not walker.at_join():
            if walker.forks:
                raise CompileError(f"tensor '{walker.tensor}' forks again inside the residual branch from '{fork}'; "
                                   f"nested residual blocks are unsupported")
            if walker.node is None:
                raise CompileError(f"the branch from tensor '{fork}' through {describe(reader)} ends at "
                                   f"'{walker.tensor}' without meeting an Add or Concat; flowtile compiles forks "
                                   f"only as residual blocks")
            if _at_affine(walker):
                layer = match_affine(walker, params, shape, len(layers) + len(found))
                found.append(layer)
                params, shape = layer.output, layer.out_shape
                continue
            if not walker.at(*_WINDOWED_OPS):
                _reject_unsupported(walker)
                raise CompileError(f"{describe(walker.node)}: unsupported op inside a residual branch (Conv, "
                                   f"depthwise Conv, MaxPool, AveragePool and GlobalAveragePool layers)")
            layer = _match_windowed(walker, params, shape, len(layers) + len(found))
            found.append(layer)
            params, shape = layer.output, layer.out_shape
        branches.append((walker, found, params, shape))
    add = branches[0][0].node
    if branches[1][0].node is not add:
        raise CompileError(f"the branches from tensor '{fork}' end at {describe(add)} and "
                           f"{describe(branches[1][0].node)}; flowtile compiles forks whose branches meet at one "
                           f"Add or Concat")
    if add.op_type == "Concat":
        axis = cursor.graph.attrs(add).get("axis")
        if axis not in (1, -3):
            raise CompileError(f"{describe(add)}: attribute 'axis' = {axis} is unsupported (only 1: channels)")
        if branches[0][3][1:] != branches[1][3][1:]:
            raise CompileError(f"{describe(add)}: concatenates maps of shapes {list(branches[0][3])} and "
                               f"{list(branches[1][3])}; their heights and widths must agree")
    elif branches[0][3] != branches[1][3]:
        raise CompileError(f"{describe(add)}: adds maps of shapes {list(branches[0][3])} and {list(branches[1][3])}; "
                           f"only maps of one shape are added (no broadcasting)")
    ends = []
    for order in sorted(range(2), key=lambda i: len(branches[i][1])):  # the shorter branch first
        previous = source
        for layer in branches[order][1]:
            layer.sources = (previous,)
            layers.append(layer)
            previous = len(layers) - 1
        ends.append((order, previous))
    end_of = dict(ends)
    # Which Add input each branch feeds (both may be the fork's tensor itself: Add(x, x)).
    operand_branch = [0, 1] if (add.input[0] == branches[0][0].tensor and add.input[1] == branches[1][0].tensor) \
        else [1, 0]
    walker = branches[0][0]
    walker.take({"Add", "Concat"}, "Add or Concat")
    out_params, relu, clip_max = match_output(walker, add)
    first, second = branches[operand_branch[0]], branches[operand_branch[1]]
    inputs, sources = (first[2], second[2]), (end_of[operand_branch[0]], end_of[operand_branch[1]])
    if add.op_type == "Concat":
        shape = (first[3][0] + second[3][0], *first[3][1:])
        layers.append(ConcatLayer(add.name or f"concat_{len(layers)}", shape, first[3][0], inputs, out_params, relu,
                                  sources, clip_max))
    else:
        shape = tuple(first[3])
        layers.append(AddLayer(add.name or f"add_{len(layers)}", shape, inputs, out_params, relu, sources, clip_max))
    return walker, out_params, shape, len(layers) - 1


def _reject_unsupported(cursor: _Cursor) -> None:
    """A clear message for the ops CNNs commonly use that flowtile does not compile yet."""
    node = cursor.node
    if node is not None and node.op_type == "Add":
        raise CompileError(f"{describe(node)}: an Add here is unsupported (flowtile compiles an Add as the join of a "
                           f"residual block of feature maps, or as a MatMul's bias)")
    if node is not None and node.op_type == "Concat":
        raise CompileError(f"{describe(node)}: a Concat here is unsupported (flowtile compiles a Concat as the join "
                           f"of a block whose two branches fork from one feature map)")
    if node is not None and node.op_type == "Softmax":
        raise CompileError(f"{describe(node)}: a Softmax is supported only as the network's last op (it runs on the "
                           f"host, after the chip's last layer)")
    if node is not None and node.op_type == "Mul":
        raise CompileError(f"{describe(node)}: unsupported op here (flowtile compiles a Mul only by a per-channel "
                           f"constant after a requantized layer, between Q/DQ pairs)")
    if node is not None and node.op_type in ("GlobalMaxPool",
                                              "BatchNormalization", "ConvTranspose", "Pad", "Resize"):
        raise CompileError(f"{describe(node)}: unsupported op (flowtile compiles Conv, depthwise Conv, MaxPool, "
                           f"AveragePool, GlobalAveragePool, Relu, Flatten/Reshape and MatMul/Gemm layers)")


_AFFINE_OPS = {"Add", "Mul", "BatchNormalization"}


def _affine_constant(graph: _Graph, name: str) -> np.ndarray | None:
    """A constant operand as onnxruntime sees it (float32): a float initializer/Constant, or a DequantizeLinear of
    constants (``(q - zp) * scale``, per-axis scales broadcast); None for anything computed."""
    value = graph.const(name)
    if value is not None:
        return value.astype(np.float32) if value.dtype.kind == "f" else None
    node = graph.producer.get(name)
    if node is None or node.op_type != "DequantizeLinear":
        return None
    q, scale = graph.const(node.input[0]), graph.const(node.input[1])
    has_zp = len(node.input) > 2 and node.input[2]
    zp = graph.const(node.input[2]) if has_zp else np.zeros((), np.int64)
    if q is None or scale is None or zp is None:
        return None
    if scale.size > 1 or zp.size > 1:
        axis = graph.attrs(node).get("axis", 1)
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zp = scale.reshape(shape) if scale.size > 1 else scale, zp.reshape(shape) if zp.size > 1 else zp
    return (q.astype(np.int64) - zp.astype(np.int64)).astype(np.float32) * scale.astype(np.float32)


def _at_affine(cursor: _Cursor) -> bool:
    """At a BatchNormalization, or an Add/Mul of the activation and a constant (plain or dequantized)."""
    if cursor.forks or cursor.node is None or not cursor.at(*_AFFINE_OPS):
        return False
    node = cursor.node
    if node.op_type == "BatchNormalization":
        return True
    return len(node.input) == 2 and [_affine_constant(cursor.graph, name) is None for name in node.input].count(True) == 1


def _channel_vector(graph: _Graph, node: onnx.NodeProto, name: str, shape: tuple[int, ...], what: str,
                    channels_last: bool = False) -> np.ndarray:
    """The constant ``name`` broadcast against the activation ``[N, *shape]`` -> one float64 value per channel
    (``shape[0]``; ``shape[-1]`` with ``channels_last``: a sequence ``(T, C)``), or CompileError if it would change
    the shape or vary within a channel."""
    value = _affine_constant(graph, name)
    if value is None:
        raise CompileError(f"{describe(node)}: {what} '{name}' must be a constant (or a DequantizeLinear of one)")
    if node.op_type == "BatchNormalization":  # its parameters are 1-D [C], not broadcast
        if value.ndim != 1 or value.size != shape[0]:
            raise CompileError(f"{describe(node)}: {what} has shape {list(value.shape)}, expected [{shape[0]}]")
        return value.astype(np.float64)
    full = (1, *shape)
    try:
        if value.ndim > len(full) or np.broadcast_shapes(value.shape, full) != full:
            raise ValueError
        expanded = np.broadcast_to(value, full)[0]
        expanded = (np.moveaxis(expanded, -1, 0) if channels_last else expanded).reshape(shape[-1 if channels_last
                                                                                            else 0], -1)
    except ValueError:
        raise CompileError(f"{describe(node)}: {what} of shape {list(value.shape)} does not broadcast to the "
                           f"activation [N, {', '.join(map(str, shape))}]") from None
    if np.any(expanded != expanded[:, :1]):
        raise CompileError(f"{describe(node)}: {what} of shape {list(value.shape)} varies within a channel; only "
                           f"per-tensor or per-channel constants are supported")
    return expanded[:, 0].astype(np.float64)


def match_affine(cursor: _Cursor, x_params: QuantParams, shape: tuple[int, ...], index: int,
                 sequence: bool = False) -> DenseLayer:
    """A per-channel affine step ``y = a_c * DQ(x) + b_c`` after a requantized layer, with its own output
    quantization: ``BatchNormalization`` (inference form, on a map or on a vector ``[N, C]`` as torch's
    ``BatchNorm1d`` after ``nn.Linear``), ``Add(x, b)`` (e.g. quantize_static's int8 bias after a
    requantized MatMul) or ``Mul(x, a)``, the constant per tensor or per channel, plain or ``DQ(constant)``;
    then ``[Relu|Clip] -> Q -> DQ``. ``shape``: the activation, a map ``(C, H, W)`` or a vector ``(n,)`` (channel
    = element), or with ``sequence`` a sequence ``(T, C)`` (channels last: the constant broadcasts over ``T``).
    Returns a lane layer of op ``"Affine"`` (1x1 window) carrying ``(a, b)``; its integer weight and
    bias are chosen by lowering (:func:`compiler.lower.lower_layer`, where the error bound is derived).
    """
    graph = cursor.graph
    x = cursor.tensor
    node = cursor.take(_AFFINE_OPS, "an affine step")
    channels = shape[-1] if sequence else shape[0]
    if sequence and node.op_type == "BatchNormalization":
        raise CompileError(f"{describe(node)}: its input '{x}' is a sequence [N, {', '.join(map(str, shape))}]; a "
                           f"BatchNormalization normalizes axis 1 (T), not the channels: unsupported")
    if node.op_type == "BatchNormalization":
        attrs = graph.attrs(node)
        if attrs.get("training_mode", 0) != 0:
            raise CompileError(f"{describe(node)}: attribute 'training_mode' = {attrs['training_mode']} is "
                               f"unsupported (only inference, 0)")
        if any(name for name in node.output[1:]):
            raise CompileError(f"{describe(node)}: outputs 'running_mean'/'running_var' are unsupported")
        if node.input[0] != x or len(node.input) != 5:
            raise CompileError(f"{describe(node)}: expected BatchNormalization(X, scale, B, mean, var)")
        gamma, beta, mean, var = (_channel_vector(graph, node, name, shape, what) for name, what in
                                  zip(node.input[1:], ("input 'scale'", "input 'B'", "input 'input_mean'",
                                                       "input 'input_var'")))
        a = gamma / np.sqrt(var + float(attrs.get("epsilon", 1e-5)))
        b = beta - mean * a
    else:
        operand = node.input[1] if node.input[0] == x else node.input[0]
        value = _channel_vector(graph, node, operand, shape, "constant operand", channels_last=sequence)
        a, b = (np.ones(channels), value) if node.op_type == "Add" else (value, np.zeros(channels))
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise CompileError(f"{describe(node)}: its per-channel scale or offset is not finite")
    out_params, relu, clip_max = match_output(cursor, node)
    if sequence:  # the sequence (T, C) as the 1 x T map it is on chip
        window = Window(channels, 1, shape[0], 1, 1, 1, 0, 0, 1, shape[0])
    elif len(shape) == 3:
        window = Window(channels, shape[1], shape[2], 1, 1, 1, 0, 0, shape[1], shape[2])
    else:
        window = Window(channels, 1, 1, 1, 1, 1, 0, 0, 1, 1)
    return DenseLayer(node.name or f"affine_{index}", "Affine", np.zeros((channels, 1, 1, 1), np.int8),
                      np.zeros(channels, np.int32), x_params, np.ones(channels), out_params, relu, window=window,
                      clip_max=clip_max, affine=(a, b), channels_last=sequence)


def match_host_softmax(cursor: _Cursor, shape: tuple[int, ...]) -> dict:
    """The network's last op: ``Softmax [-> Q -> DQ]`` after the chip's last layer, run on the host in float.

    Returns the output :class:`TensorSpec` fields (``post``, ``post_axis``, ``post_quant``, ``post_name``) and
    ``chip_output``: the Softmax's input, the tensor the chip computes. A Softmax that is not last raises naming it.
    """
    graph = cursor.graph
    chip_output = cursor.tensor
    softmax = cursor.take({"Softmax"}, "Softmax")
    attrs = graph.attrs(softmax)
    opset = next((o.version for o in graph.model.opset_import if o.domain in ("", "ai.onnx")), 13)
    rank = len(shape) + 1
    axis = attrs.get("axis", -1 if opset >= 13 else 1)
    if not -rank <= axis < rank:
        raise CompileError(f"{describe(softmax)}: attribute 'axis' = {axis} is out of range for rank {rank}")
    axis %= rank
    if axis == 0 or (opset < 13 and axis != rank - 1):
        raise CompileError(f"{describe(softmax)}: attribute 'axis' = {attrs.get('axis')} is unsupported "
                           f"({'the batch axis' if axis == 0 else 'opset < 13 flattens from the axis'}; "
                           f"the host applies Softmax along one non-batch axis)")
    post_quant = None
    if cursor.at("QuantizeLinear"):
        params = match_qdq(cursor, f"the QuantizeLinear of {describe(softmax)}'s output")
        post_quant = (params.scale, params.zero_point, params.dtype)
    if cursor.node is not None or cursor.forks:
        following = cursor.node or cursor.forks[0]
        raise CompileError(f"{describe(softmax)} is not the network's last op ({describe(following)} follows); "
                           f"flowtile runs a Softmax on the host only after the chip's last layer")
    return {"chip_output": chip_output, "post": "softmax", "post_axis": axis, "post_quant": post_quant,
            "post_name": cursor.tensor}


def _check_all_nodes_on_chain(graph: _Graph, cursor: _Cursor) -> None:
    for node in graph.nodes:
        if id(node) in cursor.visited or node.op_type == "Constant":
            continue
        if node.op_type == "DequantizeLinear" and graph.const(node.input[0]) is not None:
            continue  # a quantized weight or bias, matched through its consumer
        source = graph.producer.get(node.input[0])
        if node.op_type == "QuantizeLinear" and graph.const(node.input[0]) is not None or (
                node.op_type == "DequantizeLinear" and source is not None and source.op_type == "QuantizeLinear"
                and graph.const(source.input[0]) is not None):
            continue  # a weight quantized at run time (_quantized_at_run_time), matched through its consumer
        raise CompileError(f"{describe(node)} is not on the chain from the input to the output "
                           f"(branches are unsupported)")


def _walk_qdq(graph: _Graph, model_name: str) -> ImportedModel:
    """input [-> Flatten] -> Q -> DQ -> layer -> layer ... -> output, or CompileError at the first mismatch.

    The activation between layers is either a feature map ``(C, H, W)`` (``fmap``) or a vector of ``n``.
    """
    input_name, input_shape = _graph_input(graph)
    cursor = _Cursor(graph, input_name)
    fmap = input_shape if len(input_shape) == 3 and not cursor.at(*_RESHAPE_OPS) else None
    # a sequence [N, T, C] (nn.Linear over its last axis: match_sequence_linear), as (T, C)
    seq = input_shape if len(input_shape) == 2 and not cursor.at(*_RESHAPE_OPS) else None
    if cursor.at("AveragePool", "GlobalAveragePool"):
        raise CompileError(f"{describe(cursor.node)}: an average pool on the float graph input is left unquantized "
                           f"by onnxruntime's quantizer (it quantizes an average pool only after a quantized "
                           f"layer); put a Conv before it")
    input_flattened = cursor.at(*_RESHAPE_OPS)
    n = match_flattens(cursor, input_shape, None)  # flatten of the float input
    in_params = x_params = match_qdq(cursor, "the input QuantizeLinear")
    layers: list[DenseLayer | PoolLayer | AddLayer] = []
    source = -1  # the layer whose output the cursor's tensor is (-1: the graph input)
    host_post: dict = {}  # a trailing Softmax run on the host (match_host_softmax)
    while not layers or cursor.node is not None or cursor.forks:
        if cursor.forks and fmap is not None:
            cursor, x_params, fmap, source = _match_residual(cursor, x_params, fmap, source, layers)
            continue
        if layers and _at_affine(cursor):  # a requantized per-channel affine step: a second (LANE) layer
            layer = match_affine(cursor, x_params, fmap if fmap is not None else (seq or (n,)), len(layers),
                                 sequence=seq is not None)
            layer.sources = (source,)
            layers.append(layer)
            x_params, source = layer.output, len(layers) - 1
            continue
        if layers and cursor.at("Softmax"):
            host_post = match_host_softmax(cursor, fmap if fmap is not None else (seq or (n,)))
            break
        _reject_unsupported(cursor)
        if seq is not None and cursor.forks:
            raise CompileError(f"tensor '{cursor.tensor}' is {_sequence(seq)} read by "
                               f"{' and '.join(describe(n) for n in cursor.forks)}; forks of a sequence (attention: a "
                               f"MatMul of two activations) are unsupported")
        if seq is not None and cursor.at("MatMul"):  # nn.Linear over the sequence's last axis
            layer = match_sequence_linear(cursor, x_params, seq, len(layers))
            layer.sources = (source,)
            layers.append(layer)
            x_params, seq, source = layer.output, (seq[0], layer.n_out), len(layers) - 1
            continue
        if seq is not None and cursor.node is not None and not cursor.at(*_RESHAPE_OPS, *_WINDOWED_OPS):
            # (a windowed op reads [N, C, L], not a sequence: match_layer names its attribute)
            raise CompileError(f"{describe(cursor.node)}: its input '{cursor.tensor}' is {_sequence(seq)}; on a "
                               f"sequence flowtile compiles a MatMul over the last axis (nn.Linear), per-channel "
                               f"affine steps and a Flatten/Reshape to [N, T*C] into dense layers")
        sequence_flatten = seq is not None and bool(layers)  # dense columns in the sequence's order t*C + c
        if seq is not None:
            fmap = (seq[1], 1, seq[0])
        if fmap is not None and cursor.at(*_WINDOWED_OPS):
            layer = _match_windowed(cursor, x_params, fmap, len(layers))
            layer.sources = (source,)
            layers.append(layer)
            x_params, fmap, source = layer.output, layer.out_shape, len(layers) - 1
            continue
        source_map = fmap if layers else None  # a flat input keeps model order: nothing to permute
        input_flattened = input_flattened or (not layers and cursor.at(*_RESHAPE_OPS))
        n = match_flattens(cursor, seq or (fmap if fmap is not None else (input_shape if not layers else (n,))),
                           x_params)
        seq = None
        if not layers and not input_flattened and len(input_shape) > 2 and cursor.at("MatMul"):
            raise CompileError(f"{describe(cursor.node)}: its input '{cursor.tensor}' is the {len(input_shape) + 1}-D "
                               f"graph input [N, {', '.join(map(str, input_shape))}]; a MatMul over the last axis of a "
                               f"{len(input_shape) + 1}-D tensor is unsupported (dense layers read a vector [N, n] or a "
                               f"sequence [N, T, C]: flatten the input first)")
        fmap = None
        _reject_unsupported(cursor)
        if source_map is not None and not cursor.at("MatMul", "Gemm"):
            node = cursor.node
            if node is not None and node.op_type in ("Conv", "MaxPool", "AveragePool", "GlobalAveragePool"):
                raise CompileError(f"{describe(node)}: its input is not a [N, C, H, W] feature map")
        layers.append(match_layer(cursor, x_params, n, len(layers), input_map=source_map))
        layers[-1].channels_last = sequence_flatten
        layers[-1].sources = (source,)
        x_params, n, source = layers[-1].output, layers[-1].n_out, len(layers) - 1
    if len(graph.outputs) != 1:
        raise CompileError(f"the graph has {len(graph.outputs)} outputs; flowtile compiles models with exactly one")
    _check_all_nodes_on_chain(graph, cursor)
    windowed_input = layers[0].window is not None
    if windowed_input and getattr(layers[0], "channels_last", False):  # a sequence [N, T, C]: a 1 x T map
        input_spec = TensorSpec(input_name, input_shape, in_params.scale, in_params.zero_point, in_params.dtype,
                                layout="tc")
    elif windowed_input:
        input_spec = TensorSpec(input_name, input_shape, in_params.scale, in_params.zero_point, in_params.dtype,
                                layout="chw")
    else:
        input_spec = TensorSpec(input_name, input_shape, in_params.scale, in_params.zero_point, in_params.dtype)
    chip_output = host_post.pop("chip_output", cursor.tensor)  # with a host Softmax: the Softmax's input
    if seq is not None:
        output_spec = TensorSpec(chip_output, tuple(seq), x_params.scale, x_params.zero_point, x_params.dtype,
                                 layout="tc", **host_post)
    elif fmap is not None:
        output_spec = TensorSpec(chip_output, tuple(fmap), x_params.scale, x_params.zero_point, x_params.dtype,
                                 layout="chw", **host_post)
    else:
        output_spec = TensorSpec(chip_output, (n,), x_params.scale, x_params.zero_point, x_params.dtype,
                                 **host_post)
    return ImportedModel(name=model_name, layers=layers, input=input_spec, output=output_spec,
                         qdq_model=graph.model)


# ---------------------------------------------------------------------------------------------------
# float models: check, fuse MatMul+Add into Gemm, quantize with onnxruntime
# ---------------------------------------------------------------------------------------------------
def is_quantized(model: onnx.ModelProto) -> bool:
    """Whether ``model`` is already int8: QDQ nodes, or QOperator nodes (rewritten to QDQ on import)."""
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul")
               for n in model.graph.node)


def int8_model(model: str | os.PathLike | onnx.ModelProto, calibration: np.ndarray | None = None, *,
               per_channel: bool = True, activation_type: str = "int8") -> onnx.ModelProto:
    """The int8 model flowtile compiles: ``model`` itself if it is quantized, else ``model`` quantized once by
    :func:`quantize_float_model`. Hand the same result to :func:`~flowtile.compiler.compile_model` and to the
    onnxruntime oracle, so both see one int8 network (quantizing twice could differ in calibration)."""
    proto = normalize(load_model(model))  # exporter forms -> the forms the matcher knows (compiler/normalize.py)
    if is_quantized(proto):
        return proto
    if calibration is not None:  # given in the published input layout (an NHWC image): as the normalized model's
        calibration = published_to_model(calibration, host_transpose(proto), _graph_input(_Graph(proto))[1])
    return load_model(quantize_float_model(proto, calibration=calibration, per_channel=per_channel,
                                           activation_type=activation_type))


def _check_float_ops(model: onnx.ModelProto) -> None:
    consts = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type not in _FLOAT_OPS | {"Constant"} or node.domain not in ("", "ai.onnx"):
            raise CompileError(f"{describe(node)}: unsupported op; float models may use "
                               f"{', '.join(sorted(_FLOAT_OPS))}")
        if node.op_type in ("Conv", "MaxPool", "AveragePool"):  # before quantize_static, which may fail less clearly
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            kernel = None
            if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in consts:
                dims = list(consts[node.input[1]].dims)
                kernel = tuple(dims[2:]) if len(dims) == 4 else None
            check_window_attributes(node, attrs, kernel)


def fuse_matmul_add(model: onnx.ModelProto) -> onnx.ModelProto:
    """MatMul(x, W) -> Add(b) becomes Gemm(x, W, b) so that the quantizer makes an int32 bias.

    Quantized separately, the quantizer would requantize the MatMul output to int8 before adding an
    int8 bias: two roundings that one PE layer cannot reproduce. Gemm biases are also made 1-D, which
    onnxruntime's per-channel quantizer needs.
    """
    model = onnx.shape_inference.infer_shapes(model)  # a copy, with the ranks the fusion checks
    graph = _Graph(model)
    inits = {t.name: t for t in model.graph.initializer}
    new_nodes, dropped = [], set()
    for node in graph.nodes:
        if id(node) in dropped:
            continue
        a_shape = graph.shapes.get(node.input[0])
        a_is_matrix = a_shape is not None and len(a_shape.dim) == 2  # Gemm takes [batch, n] only
        if (node.op_type == "MatMul" and a_is_matrix and graph.const(node.input[1]) is not None
                and graph.const(node.input[1]).ndim == 2):
            readers = graph.consumers.get(node.output[0], [])
            add = readers[0] if len(readers) == 1 and node.output[0] not in graph.outputs else None
            n_out = graph.const(node.input[1]).shape[1]
            if add is not None and add.op_type == "Add":
                other = [name for name in add.input if name != node.output[0]]
                bias = graph.const(other[0]) if len(other) == 1 else None
                if bias is not None and bias.size == n_out and bias.shape[-1] == n_out and other[0] in inits:
                    inits[other[0]].CopyFrom(numpy_helper.from_array(bias.reshape(n_out).astype(np.float32), other[0]))
                    new_nodes.append(helper.make_node("Gemm", [node.input[0], node.input[1], other[0]], [add.output[0]],
                                                      name=node.name or add.name))
                    dropped.add(id(add))
                    continue
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] in inits:
            bias = graph.const(node.input[2])
            if bias.ndim != 1:
                inits[node.input[2]].CopyFrom(numpy_helper.from_array(bias.reshape(-1), node.input[2]))
        new_nodes.append(_copy(node))
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    return model


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    return copy


class _ArrayReader(CalibrationDataReader):
    """A CalibrationDataReader over one array, in batches the model's input accepts."""

    def __init__(self, input_name: str, data: np.ndarray, batch: int):
        self.batches = iter([{input_name: data[i:i + batch]} for i in range(0, len(data) - batch + 1, batch)])

    def get_next(self):
        return next(self.batches, None)

    def rewind(self):  # part of CalibrationDataReader's protocol; one pass is all MinMax needs
        pass


def quantize_float_model(model: onnx.ModelProto, calibration: np.ndarray | None = None, *, per_channel: bool = True,
                         activation_type: str = "int8") -> onnx.ModelProto:
    """Quantize a float MLP with ``onnxruntime.quantization.quantize_static`` (QDQ, int8 weights).

    ``calibration`` is ``[n, *input shape]``; without it a seeded random-normal set of
    :data:`DEFAULT_CALIBRATION_SAMPLES` samples is used (with a warning: real data gives better ranges).
    """
    _check_float_ops(model)
    graph = _Graph(model)
    input_name, input_shape = _graph_input(graph)
    if calibration is None:
        warnings.warn(f"no calibration data given: quantizing with {DEFAULT_CALIBRATION_SAMPLES} seeded "
                      f"random-normal samples; activation ranges will not match real inputs", stacklevel=3)
        calibration = np.random.default_rng(0).standard_normal((DEFAULT_CALIBRATION_SAMPLES, *input_shape))
    calibration = np.asarray(calibration, dtype=np.float32)
    if calibration.ndim != len(input_shape) + 1 or tuple(calibration.shape[1:]) != input_shape or len(calibration) < 1:
        raise CompileError(f"calibration data has shape {list(calibration.shape)}, expected "
                           f"[n, {', '.join(map(str, input_shape))}] for input '{input_name}'")
    batch = _batch_dim(graph, input_name) or min(len(calibration), 256)
    if len(calibration) < batch:
        raise CompileError(f"calibration data has {len(calibration)} samples, the model's fixed batch is {batch}")
    if model.opset_import and next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13) < 13:
        model = onnx.version_converter.convert_version(model, 13)  # per-channel DequantizeLinear needs opset 13
    model = fuse_matmul_add(model)
    # onnxruntime quantizes a pool only after a quantized node, so a pool reading the graph input would stay float;
    # ForceQuantizeNoInputCheck quantizes it like every other pool. Only then, so that other models keep exactly the
    # quantization onnxruntime gives them by default (and the accuracy comparisons stay like for like).
    pool_first = any(node.op_type in ("MaxPool", "AveragePool", "GlobalAveragePool") and input_name in node.input
                     for node in model.graph.node)
    extra_options = {"ForceQuantizeNoInputCheck": True} if pool_first else {}
    reader = _ArrayReader(input_name, calibration, batch)
    types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    if activation_type not in types:
        raise CompileError(f"activation type '{activation_type}' is unsupported (int8 or uint8)")
    with tempfile.TemporaryDirectory(prefix="flowtile-quant-") as tmp:
        out = Path(tmp) / "quantized.onnx"
        try:
            # quantize_static logs pre-processing advice through the root logger on every call.
            root_logger, level = logging.getLogger(), logging.getLogger().level
            root_logger.setLevel(logging.ERROR)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    quantize_static(model, str(out), reader, quant_format=QuantFormat.QDQ,
                                    activation_type=types[activation_type], weight_type=QuantType.QInt8,
                                    per_channel=per_channel, extra_options=extra_options)
            finally:
                root_logger.setLevel(level)
        except CompileError:
            raise
        except Exception as error:
            raise CompileError(f"onnxruntime quantize_static failed: {type(error).__name__}: "
                               f"{_one_line(error)}") from None
        return onnx.load(str(out))


def import_onnx(model: str | os.PathLike | onnx.ModelProto, *, calibration: np.ndarray | None = None,
                per_channel: bool = True, activation_type: str = "int8") -> ImportedModel:
    """Load an MLP (int8 QDQ, or float which is quantized first) and return its dense layers.

    ``calibration``, ``per_channel`` and ``activation_type`` apply to float models only.
    Raises :class:`CompileError` for anything that is not a supported MLP.
    """
    name = Path(model).stem if not isinstance(model, onnx.ModelProto) else (model.graph.name or "model")
    proto = int8_model(model, calibration, per_channel=per_channel, activation_type=activation_type)
    transpose = host_transpose(proto)  # the host transposes the published input (normalize.channels_last_input)
    proto = qoperator_to_qdq(proto)  # QLinearConv/QLinearMatMul (QOperator format) -> QDQ
    imported = _walk_qdq(_Graph(proto), name)
    if transpose is not None:
        imported.input = dataclasses.replace(imported.input, host_transpose=transpose)
    return imported
