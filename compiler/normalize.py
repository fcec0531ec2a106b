"""Normalize before matching: rewrite the graph forms real exporters write into the forms the lowering understands.

:func:`normalize` runs at the start of import (:func:`flowtile.compiler.int8_model`, hence :func:`import_onnx`,
:func:`compile_model` and ``flowtile run``), on float and on int8 (QDQ / QOperator) models. It uses ONNX's and
onnxruntime's own tools where they exist, and a small table of rewrite rules for the rest:

1. *prepare*: initializers that old exporters (IR 3: CNTK, early torch) also list as graph inputs become plain
   constants; ``onnx.version_converter`` brings opsets 7..22 to :data:`TARGET_OPSET` (one form per op for the
   matcher; a model the converter cannot take down keeps its opset, the rules below accept both forms);
   ``onnx.shape_inference`` types every tensor.
2. *float models only*: onnxruntime's basic graph optimizations (``ORT_ENABLE_BASIC``, written out through
   ``SessionOptions.optimized_model_filepath``): Conv+BatchNormalization, Conv+Add and Conv+Mul constant folding,
   constant subgraphs, Identity/Dropout elimination. Never on QDQ models (it would fold ``DequantizeLinear`` of
   the weights into float constants).
3. the rewrite table :data:`RULES` to a fixed point: each rule is a small function ``rule(graph, node) -> bool``
   with a docstring naming the exporter that writes the form it rewrites. Rules also run on QDQ models
   (except those marked float-only), and leave Q/DQ nodes alone (exceptions: a Flatten between a layer and
   its per-tensor Q/DQ pair moves after the pair, :func:`flatten_after_its_quantization`; the Q/DQ pair
   ``quantize_static`` writes after a Reshape, Transpose or Squeeze with its input's own scale and zero point, an
   identity, goes with the Reshape or Transpose a rule removes, :func:`_requantization_after`). A computed Reshape
   target is read with ONNX's shape inference with data propagation (:meth:`Graph.propagated_shape`).
4. the graph input's batch dimension becomes symbolic (``batch``): flowtile chooses the batch, whatever the
   exporter traced with.

One rule changes the model's interface: :func:`channels_last_input` makes an NHWC graph input that only a
Transpose to NCHW reads (tf2onnx's Keras image models) the NCHW input itself and records the permutation in the
model's ``metadata_props`` (:data:`INPUT_TRANSPOSE_KEY`, :func:`host_transpose`); the program input carries it
(``TensorSpec.host_transpose``) and the host transposes the published NHWC samples (:func:`flowtile.host.model_layout`).

Anything a rule recognizes but cannot rewrite raises :class:`CompileError` naming node, op and attribute; anything
it does not recognize is left for the matcher (:mod:`.onnx_import`), which names node, op and attribute itself.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import CompileError, describe

__all__ = ["normalize", "RULES", "TARGET_OPSET", "INPUT_TRANSPOSE_KEY", "host_transpose"]

#: The one opset the matcher sees (per-channel DequantizeLinear needs 13; ReduceMean still takes attribute axes).
TARGET_OPSET = 17
#: Ops never evaluated as constants: the quantization the matcher reads must stay as the model states it.
_NO_FOLD = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
            "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
_QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul"}
_INDEX_TYPES = {TensorProto.INT32, TensorProto.INT64}
#: ``metadata_props`` key: the model's input is the published model's input transposed by this permutation
#: (comma-separated, batch axis included), :func:`channels_last_input`; the host transposes (:func:`host_transpose`).
INPUT_TRANSPOSE_KEY = "flowtile.input_transpose"
_MAX_REWRITES = 10_000
#: onnxruntime basic optimizers left out: they merge what the model states twice (two equal Convs, shared
#: constants) -- a change of graph form the matcher would then report about a graph the user did not write.
_ORT_KEEP = ["CommonSubexpressionElimination", "ConstantSharing",
             # MatMulAddFusion writes a 3-D MatMul + Add as Reshape -> Gemm -> Reshape with the traced batch baked
             # into both targets (torch dynamo's nn.Linear on [1, T, C]); 2-D ones become Gemms in the rules and in
             # onnx_import.fuse_matmul_add
             "MatMulAddFusion"]


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for index, attribute in enumerate(node.attribute):
        if attribute.name == name:
            del node.attribute[index]
            break
    if value is not None:
        node.attribute.append(helper.make_attribute(name, value))


# ---------------------------------------------------------------------------------------------------
# the graph the rules see
# ---------------------------------------------------------------------------------------------------
class Graph:
    """A model under rewriting: constants, inferred shapes and types, producers and consumers.

    Rules change ``model`` through the helpers below and return True; the engine then calls :meth:`refresh`.
    """

    def __init__(self, model: onnx.ModelProto, is_float: bool):
        self.model = model
        self.is_float = is_float
        self.refresh()

    def refresh(self) -> None:
        graph = self.model.graph
        del graph.value_info[:]
        try:
            self.model = onnx.shape_inference.infer_shapes(self.model)
        except Exception:  # an unsupported construct: the matcher will name it; keep what we know
            pass
        graph = self.model.graph
        self.consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.shapes, self.types = {}, {}
        for info in list(graph.input) + list(graph.value_info) + list(graph.output):
            tensor = info.type.tensor_type
            self.types[info.name] = tensor.elem_type
            if tensor.HasField("shape"):
                self.shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                               for d in tensor.shape.dim)
        for name, value in self.consts.items():
            self.shapes[name] = tuple(value.shape)
            self.types[name] = helper.np_dtype_to_tensor_dtype(value.dtype)
        self.outputs = {o.name for o in graph.output}
        self._propagated: dict | None = None
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def propagated_shape(self, name: str) -> tuple | None:
        """``name``'s shape as ONNX shape inference gives it with data propagation (``data_prop=True``: the values
        of shape computations, ``Shape -> Cast -> Gather/Slice -> Concat``, followed symbolically, so a computed
        Reshape target has known entries where the batch is symbolic); computed on first use after a rewrite."""
        if self._propagated is None:
            self._propagated = {}
            try:
                inferred = onnx.shape_inference.infer_shapes(self.model, data_prop=True)
            except Exception:
                return None
            for info in list(inferred.graph.value_info) + list(inferred.graph.output):
                tensor = info.type.tensor_type
                if tensor.HasField("shape"):
                    self._propagated[info.name] = tuple(d.dim_value if d.HasField("dim_value") else None
                                                        for d in tensor.shape.dim)
        return self._propagated.get(name)

    @property
    def nodes(self) -> list[onnx.NodeProto]:
        return list(self.model.graph.node)

    def const(self, name: str) -> np.ndarray | None:
        return self.consts.get(name) if name else None

    def static_shape(self, name: str) -> tuple[int, ...] | None:
        shape = self.shapes.get(name)
        return shape if shape is not None and all(isinstance(d, int) and d > 0 for d in shape) else None

    def only_reader(self, name: str) -> onnx.NodeProto | None:
        readers = self.consumers.get(name, [])
        return readers[0] if len(readers) == 1 and name not in self.outputs else None

    def add_const(self, hint: str, value: np.ndarray) -> str:
        names = {t.name for t in self.model.graph.initializer} | {o for n in self.model.graph.node for o in n.output}
        name, k = hint, 0
        while name in names:
            k += 1
            name = f"{hint}_{k}"
        self.model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        self.consts[name] = np.asarray(value)
        return name

    def replace(self, node: onnx.NodeProto, new_nodes: list[onnx.NodeProto]) -> None:
        """Put ``new_nodes`` where ``node`` is (topological order is kept: they read what it read)."""
        nodes = self.model.graph.node
        index = next(i for i, n in enumerate(nodes) if n is node)
        del nodes[index]
        for offset, new in enumerate(new_nodes):
            nodes.insert(index + offset, new)

    def bypass(self, node: onnx.NodeProto, source: str) -> bool:
        """Remove ``node``, whose (first) output equals its input ``source``: readers read ``source`` instead."""
        target = node.output[0]
        graph = self.model.graph
        if target in self.outputs:
            producer = next((n for n in graph.node if source in n.output), None)
            if producer is None or source in self.outputs:
                return False  # graph input (or output) straight to the output: keep the node
            producer.output[list(producer.output).index(source)] = target
            old, new = source, target
        else:
            old, new = target, source
        self.replace(node, [])
        self.redirect_readers(old, new)
        return True

    def redirect_readers(self, old: str, new: str) -> None:
        """Every node reading ``old`` reads ``new`` instead."""
        for other in self.model.graph.node:
            for i, name in enumerate(other.input):
                if name == old:
                    other.input[i] = new


# ---------------------------------------------------------------------------------------------------
# the rewrite table
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    ops: tuple[str, ...]
    apply: Callable[[Graph, onnx.NodeProto], bool]
    float_only: bool = False


#: The rewrite rules in the order they are tried on each node (constant folding first).
RULES: list[Rule] = []


def rule(*ops: str, float_only: bool = False):
    def register(function):
        RULES.append(Rule(ops, function, float_only))
        return function
    return register


def _evaluate(graph: Graph, node: onnx.NodeProto) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator
    inputs = [name for name in node.input if name]
    sub = helper.make_graph([node], "fold", [helper.make_tensor_value_info(name, graph.types[name], None)
                                             for name in inputs],
                           [helper.make_tensor_value_info(name, TensorProto.UNDEFINED, None) for name in node.output])
    model = helper.make_model(sub, opset_imports=list(graph.model.opset_import))
    return ReferenceEvaluator(model).run(None, {name: graph.consts[name] for name in inputs})


@rule("*")
def fold_constants(graph: Graph, node: onnx.NodeProto) -> bool:
    """A node whose inputs are all constants (or a Shape/Size of a statically shaped tensor) becomes constants.

    torch's TorchScript exporter with constant folding off writes weights as ``Transpose(W)`` (nn.Linear on 3-D
    input: ``Transpose(W) -> MatMul -> Add``) and Reshape targets as ``Shape -> Gather/Slice -> Unsqueeze ->
    Concat``; CNTK reshapes its dense weight with a constant ``Reshape``; ``Constant`` nodes (every exporter)
    become initializers. Q/DQ nodes are never folded (the matcher reads them).
    """
    if node.op_type in _NO_FOLD or node.domain not in ("", "ai.onnx") or any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
        return False
    if node.op_type in ("Shape", "Size"):
        shape = graph.static_shape(node.input[0])
        if shape is None:
            return False
        if node.op_type == "Size":
            values = [np.array(int(np.prod(shape)), dtype=np.int64)]
        else:
            attrs = _attrs(node)
            values = [np.array(shape[attrs.get("start", 0):attrs.get("end", len(shape))], dtype=np.int64)]
    else:
        if any(name and graph.const(name) is None for name in node.input):
            return False
        if node.op_type != "Constant" and not any(node.input):
            return False
        try:
            values = _evaluate(graph, node)
        except Exception:
            return False  # the reference cannot evaluate it: leave it for onnxruntime / the matcher
    names = [t.name for t in graph.model.graph.initializer]
    for name, value in zip(node.output, values):
        if name in names or name in graph.outputs:
            return False
    graph.replace(node, [])
    for name, value in zip(node.output, values):
        graph.model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    return True


@rule("Identity", "Dropout")
def remove_identity(graph: Graph, node: onnx.NodeProto) -> bool:
    """``Identity`` (torch.onnx and tf2onnx write them around parameters and outputs) and inference ``Dropout``
    (kept as a node by torch's exporter in training-export mode and by keras2onnx) pass their input through.
    flowtile runs inference: a ``training_mode`` input is ignored, as onnxruntime's EliminateDropout does; a
    Dropout whose ``mask`` output is read is rejected."""
    if node.op_type == "Dropout":
        if len(node.output) > 1 and node.output[1] and (graph.consumers.get(node.output[1]) or
                                                        node.output[1] in graph.outputs):
            raise CompileError(f"{describe(node)}: output 'mask' is unsupported (inference Dropout only)")
    return graph.bypass(node, node.input[0])


@rule("Cast")
def remove_same_type_cast(graph: Graph, node: onnx.NodeProto) -> bool:
    """``Cast`` to the type the tensor already has (torch's exporter writes them around dtype-generic ops, tf2onnx
    after its own conversions). A Cast of a constant was folded before; a Cast between int32 and int64 is shape
    arithmetic (tf2onnx casts every computed Reshape target), left for :func:`reshape_static_target`, which removes
    the computation; any other Cast is rejected naming 'to'."""
    target = _attrs(node).get("to")
    source = graph.types.get(node.input[0])
    if target in _INDEX_TYPES and source in _INDEX_TYPES:
        return False  # shape arithmetic (tf2onnx: Shape -> Cast(int32) -> ... -> Cast(int64) -> Reshape target)
    if target is not None and source is not None and source != target:
        raise CompileError(f"{describe(node)}: attribute 'to' = {TensorProto.DataType.Name(target)} is unsupported "
                           f"(the input is {TensorProto.DataType.Name(source)}; only a Cast to the same type, "
                           f"which is removed)")
    if target is None or source != target:
        return False
    return graph.bypass(node, node.input[0])


def _explicit_pads(node: onnx.NodeProto, mode: str, in_hw: tuple[int, ...], kernel: list[int],
                   strides: list[int], dilations: list[int]) -> list[int]:
    begins, ends = [], []
    for size, k, s, d in zip(in_hw, kernel, strides, dilations):
        if mode == "VALID":
            begins.append(0), ends.append(0)
            continue
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, large = total // 2, total - total // 2
        begins.append(small if mode == "SAME_UPPER" else large)
        ends.append(large if mode == "SAME_UPPER" else small)
    return begins + ends


@rule("Conv", "MaxPool", "AveragePool", "LpPool", "ConvInteger", "QLinearConv")
def explicit_auto_pad(graph: Graph, node: onnx.NodeProto) -> bool:
    """``auto_pad`` = SAME_UPPER / SAME_LOWER / VALID -> explicit ``pads`` computed from the inferred input shape.

    CNTK (the ONNX Model Zoo's mnist-8), tf2onnx and keras2onnx (``padding='same'``) write SAME_UPPER."""
    attrs = _attrs(node)
    mode = attrs.get("auto_pad", b"NOTSET")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode == "NOTSET":
        return False
    if mode not in ("SAME_UPPER", "SAME_LOWER", "VALID"):
        raise CompileError(f"{describe(node)}: attribute 'auto_pad' = {mode} is unsupported")
    shape = graph.shapes.get(node.input[0])
    if shape is None or len(shape) < 3 or not all(isinstance(d, int) and d > 0 for d in shape[2:]):
        raise CompileError(f"{describe(node)}: attribute 'auto_pad' = {mode} is unsupported here: the input "
                           f"shape is not known, so explicit pads cannot be computed")
    spatial = shape[2:]  # the batch may be symbolic
    weight_index = 3 if node.op_type == "QLinearConv" else 1
    weight = graph.const(node.input[weight_index]) if node.op_type in ("Conv", "ConvInteger", "QLinearConv") \
        and len(node.input) > weight_index else None
    if weight is None and node.op_type == "Conv" and len(node.input) > 1:
        weight_shape = graph.static_shape(node.input[1])  # a DequantizeLinear output in QDQ models
    else:
        weight_shape = weight.shape if weight is not None else None
    kernel = [int(k) for k in attrs.get("kernel_shape", weight_shape[2:] if weight_shape else [])]
    if len(kernel) != len(spatial):
        raise CompileError(f"{describe(node)}: attribute 'auto_pad' = {mode} is unsupported here: the kernel "
                           f"shape is not known")
    strides = [int(s) for s in attrs.get("strides", [1] * len(spatial))]
    dilations = [int(d) for d in attrs.get("dilations", [1] * len(spatial))]
    _set_attr(node, "auto_pad", None)
    _set_attr(node, "pads", _explicit_pads(node, mode, spatial, kernel, strides, dilations))
    return True


def _bias_of(graph: Graph, add: onnx.NodeProto, x: str, channels: int, channel_axis: int, rank: int):
    """The constant operand of ``add`` as a per-channel vector, if it is one (else None)."""
    other = [name for name in add.input if name != x]
    if len(other) != 1 or list(add.input).count(x) != 1:
        return None
    value = graph.const(other[0])
    if value is None or value.ndim > rank:
        return None
    full = (1,) * (rank - value.ndim) + value.shape
    if any(d != 1 for axis, d in enumerate(full) if axis != channel_axis) or full[channel_axis] not in (1, channels):
        return None
    return np.broadcast_to(value.reshape(-1), (channels,)).astype(np.float32)


@rule("Conv", "Gemm", "MatMul", float_only=True)
def fold_bias_add(graph: Graph, node: onnx.NodeProto) -> bool:
    """A float ``Add`` of a per-output-channel constant after Conv, Gemm or a 2-D MatMul -> the layer's own bias
    (the MatMul becomes a Gemm, as onnxruntime's MatMulAddFusion would make it).

    CNTK writes every Conv bias this way (mnist-8: ``Conv -> Add(Parameter6 [8, 1, 1])``), so do keras2onnx and
    torch with constant folding off (``nn.Linear`` as ``MatMul -> Add``). A MatMul on a 3-D activation is left as
    it is (the matcher names it); QDQ models' bias Adds with their own Q/DQ are the matcher's."""
    add = graph.only_reader(node.output[0])
    if add is None or add.op_type != "Add":
        return False
    if node.op_type == "MatMul":
        a_shape = graph.shapes.get(node.input[0])
        weight = graph.const(node.input[1])
        if a_shape is None or len(a_shape) != 2 or weight is None or weight.ndim != 2:
            return False
        bias = _bias_of(graph, add, node.output[0], weight.shape[1], 1, 2)
        if bias is None:
            return False
        name = graph.add_const(f"{node.name or node.output[0]}_bias", bias)
        fused = helper.make_node("Gemm", [node.input[0], node.input[1], name], [add.output[0]],
                                 name=node.name or add.name)
        graph.replace(add, [])
        graph.replace(node, [fused])
        return True
    if node.op_type == "Conv":
        weight = graph.const(node.input[1]) if len(node.input) > 1 else None
        shape = graph.shapes.get(node.output[0])
        if weight is None or shape is None:
            return False
        channels, channel_axis, rank = weight.shape[0], 1, len(shape)
        bias = _bias_of(graph, add, node.output[0], channels, channel_axis, rank)
        old = graph.const(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(channels, np.float32)
    else:
        attrs = _attrs(node)
        weight = graph.const(node.input[1])
        if weight is None or weight.ndim != 2:
            return False
        channels = weight.shape[0] if attrs.get("transB", 0) else weight.shape[1]
        bias = _bias_of(graph, add, node.output[0], channels, 1, 2)
        old = np.zeros(channels, np.float32)
        if len(node.input) > 2 and node.input[2]:
            c = graph.const(node.input[2])
            if c is None or c.size not in (1, channels):
                return False
            old = np.broadcast_to(c.reshape(-1), (channels,)) * float(attrs.get("beta", 1.0))
    if bias is None or old is None:
        return False
    name = graph.add_const(f"{node.name or node.output[0]}_bias", (old.reshape(-1) + bias).astype(np.float32))
    inputs = list(node.input[:2]) + [name]
    fused = helper.make_node(node.op_type, inputs, [add.output[0]], name=node.name or add.name)
    fused.attribute.extend(a for a in node.attribute if a.name != "beta")
    graph.replace(add, [])
    graph.replace(node, [fused])
    return True


@rule("Gemm", "MatMul", float_only=True)
def fold_dense_scale(graph: Graph, node: onnx.NodeProto) -> bool:
    """A float ``Mul`` by a per-output-channel constant after a Gemm or a 2-D MatMul (constant 2-D weight) -> the
    layer's weight and bias scaled (a Gemm): ``W' = alpha * W * a`` along the output axis, ``bias' = a * beta * C``.
    A following ``Add`` of a constant is then :func:`fold_bias_add`'s.

    tf2onnx writes Keras' ``Dense -> BatchNormalization`` on vectors this way (TensorFlow's inference batchnorm is
    ``x * a + (beta - mean * a)``: ``MatMul -> Add(bias) -> Mul(a) -> Add(c)``); onnxruntime's basic optimizations
    fold such constants into a Conv, not into a MatMul or Gemm. The same in float arithmetic as the graph states,
    up to float32 rounding."""
    mul = graph.only_reader(node.output[0])
    if mul is None or mul.op_type != "Mul":
        return False
    weight = graph.const(node.input[1]) if len(node.input) > 1 else None
    a_shape = graph.shapes.get(node.input[0])
    if weight is None or weight.ndim != 2 or a_shape is None or len(a_shape) != 2:
        return False
    attrs = _attrs(node) if node.op_type == "Gemm" else {}
    if attrs.get("transA", 0):
        return False
    transposed = bool(attrs.get("transB", 0))
    channels = weight.shape[0] if transposed else weight.shape[1]
    scale = _bias_of(graph, mul, node.output[0], channels, 1, 2)
    if scale is None:
        return False
    old = np.zeros(channels, np.float64)
    if len(node.input) > 2 and node.input[2]:
        c = graph.const(node.input[2])
        if c is None or c.size not in (1, channels):
            return False
        old = np.broadcast_to(c.astype(np.float64).reshape(-1), (channels,)) * float(attrs.get("beta", 1.0))
    a = scale.astype(np.float64)
    scaled = weight.astype(np.float64) * float(attrs.get("alpha", 1.0)) * (a[:, None] if transposed else a[None, :])
    name = node.name or node.output[0]
    w_name = graph.add_const(f"{name}_scaled_weight", scaled.astype(np.float32))
    b_name = graph.add_const(f"{name}_scaled_bias", (old * a).astype(np.float32))
    fused = helper.make_node("Gemm", [node.input[0], w_name, b_name], [mul.output[0]], name=name,
                             transB=int(transposed))
    graph.replace(mul, [])
    graph.replace(node, [fused])
    return True


@rule("BatchNormalization", float_only=True)
def fold_dense_batchnorm(graph: Graph, node: onnx.NodeProto) -> bool:
    """An inference ``BatchNormalization`` on a vector ``[N, C]`` straight after a float Gemm or MatMul (constant
    2-D weight, 2-D activation) -> folded into that layer's weight and bias (a Gemm).

    torch writes ``nn.Linear -> nn.BatchNorm1d`` this way (torchvision-style MLPs, MLPerf Tiny's FC autoencoder);
    onnxruntime's basic optimizations fold Conv+BatchNormalization but not Gemm/MatMul+BatchNormalization. With
    ``a = scale / sqrt(var + epsilon)``: ``W' = alpha * W * a`` along the output axis, ``bias' = a * beta_gemm * C + B - mean * a``
    (so alpha = beta = 1). The same in float arithmetic as the graph states, up to float32 rounding."""
    attrs = _attrs(node)
    if attrs.get("training_mode", 0) != 0 or len(node.input) != 5 or any(name for name in node.output[1:]):
        return False  # the matcher names what it does not support
    shape = graph.shapes.get(node.input[0])
    if shape is None or len(shape) != 2:
        return False
    dense = next((n for n in graph.model.graph.node if node.input[0] in n.output), None)
    if dense is None or dense.op_type not in ("Gemm", "MatMul") or graph.only_reader(node.input[0]) is not node:
        return False
    params = [graph.const(name) for name in node.input[1:]]
    weight = graph.const(dense.input[1]) if len(dense.input) > 1 else None
    a_shape = graph.shapes.get(dense.input[0])
    if weight is None or weight.ndim != 2 or a_shape is None or len(a_shape) != 2 or \
            any(p is None or p.ndim != 1 for p in params):
        return False
    dense_attrs = _attrs(dense)
    if dense.op_type == "Gemm" and dense_attrs.get("transA", 0):
        return False
    transposed = dense.op_type == "Gemm" and bool(dense_attrs.get("transB", 0))
    channels = weight.shape[0] if transposed else weight.shape[1]
    if any(p.size != channels for p in params):
        return False
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    a = gamma / np.sqrt(var + float(attrs.get("epsilon", 1e-5)))
    old = np.zeros(channels)
    if dense.op_type == "Gemm" and len(dense.input) > 2 and dense.input[2]:
        c = graph.const(dense.input[2])
        if c is None or c.size not in (1, channels):
            return False
        old = np.broadcast_to(c.astype(np.float64).reshape(-1), (channels,)) * float(dense_attrs.get("beta", 1.0))
    alpha = float(dense_attrs.get("alpha", 1.0)) if dense.op_type == "Gemm" else 1.0
    scaled = weight.astype(np.float64) * alpha * (a[:, None] if transposed else a[None, :])
    name = dense.name or dense.output[0]
    w_name = graph.add_const(f"{name}_bn_weight", scaled.astype(np.float32))
    b_name = graph.add_const(f"{name}_bn_bias", (old * a + beta - mean * a).astype(np.float32))
    fused = helper.make_node("Gemm", [dense.input[0], w_name, b_name], [node.output[0]], name=name,
                             transB=int(transposed))
    graph.replace(node, [])
    graph.replace(dense, [fused])
    return True


def _flatten_target(graph: Graph, node: onnx.NodeProto) -> bool:
    """Whether the Reshape ``node`` is a flatten ``[N, ...] -> [N, prod(...)]`` (its target shape constant)."""
    target = graph.const(node.input[1]) if len(node.input) > 1 else None
    shape = graph.shapes.get(node.input[0])
    if target is None or shape is None or target.ndim != 1 or len(target) != 2 or len(shape) < 2:
        return False
    rest = shape[1:]
    if not all(isinstance(d, int) and d > 0 for d in rest):
        return False
    n = int(np.prod(rest))
    allowzero = _attrs(node).get("allowzero", 0) == 1
    first, second = int(target[0]), int(target[1])
    batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    keeps_batch = (first == 0 and not allowzero) or (batch is not None and first == batch)
    return (second == n and (keeps_batch or first == -1)) or (second == -1 and keeps_batch)


@rule("Reshape")
def reshape_to_flatten(graph: Graph, node: onnx.NodeProto) -> bool:
    """A ``Reshape`` to ``[N, C*H*W]`` with a constant target -> ``Flatten(axis=1)`` (which keeps any batch).

    CNTK writes ``Reshape([1, 256])`` (mnist-8), torch's dynamo exporter a constant Reshape with ``allowzero=1``,
    the TorchScript exporter a Shape/Gather/Concat target (constant once :func:`fold_constants` ran with the
    traced input shape)."""
    if not _flatten_target(graph, node):
        return False
    graph.replace(node, [helper.make_node("Flatten", [node.input[0]], list(node.output), name=node.name, axis=1)])
    return True


def _producer(graph: Graph, name: str) -> onnx.NodeProto | None:
    return next((n for n in graph.model.graph.node if name in n.output), None)


def _batch_of(graph: Graph, name: str, data: str) -> bool:
    """Whether ``name`` is ``Unsqueeze(Gather(Shape(t), 0), [0])`` (or ``Shape(t, start=0, end=1)``) with ``t``'s
    dimension 0 the same (symbolic) batch as ``data``'s: a Reshape target entry that keeps the batch."""
    node = _producer(graph, name)
    if node is not None and node.op_type == "Unsqueeze":
        axes = graph.const(node.input[1]) if len(node.input) > 1 else np.array(_attrs(node).get("axes", []))
        if axes is None or [int(a) for a in np.ravel(axes)] != [0]:
            return False
        node = _producer(graph, node.input[0])
        if node is None or node.op_type != "Gather" or _attrs(node).get("axis", 0) != 0:
            return False
        index = graph.const(node.input[1])
        if index is None or index.size != 1 or int(index.reshape(())) != 0:
            return False
        node = _producer(graph, node.input[0])
        if node is None or node.op_type != "Shape" or _attrs(node).get("start", 0) != 0:
            return False
    elif node is None or node.op_type != "Shape" or _attrs(node).get("start", 0) != 0 or \
            _attrs(node).get("end") != 1:
        return False
    shape, data_shape = graph.shapes.get(node.input[0]), graph.shapes.get(data)
    return bool(shape) and bool(data_shape) and shape[0] is not None and shape[0] == data_shape[0]


def _remove_dead(graph: Graph, names: list[str]) -> None:
    """Remove the shape computation that produced ``names`` (Concat/Unsqueeze/Gather/Shape) where nothing reads it."""
    pending = list(names)
    while pending:
        node = _producer(graph, pending.pop())
        if node is None or node.op_type not in ("Concat", "Unsqueeze", "Gather", "Shape", "Slice", "Squeeze", "Cast"):
            continue
        read = {i for n in graph.model.graph.node for i in n.input} | graph.outputs
        if any(o in read for o in node.output):
            continue
        graph.replace(node, [])
        pending.extend(i for i in node.input if i)


@rule("Reshape")
def reshape_batch_target_to_flatten(graph: Graph, node: onnx.NodeProto) -> bool:
    """A ``Reshape`` to ``Concat(batch, [n])`` with ``batch`` read from a tensor's shape (``Unsqueeze(Gather(Shape(x),
    0))``, the batch symbolic so :func:`fold_constants` cannot fold it) and ``n = prod(rest)`` or -1 ->
    ``Flatten(axis=1)``; the shape computation is removed.

    torch's TorchScript exporter with a dynamic batch writes ``x.reshape(x.shape[0], -1)`` this way (nn.Linear on a
    sequence, then a flatten: ``Shape -> Gather -> Unsqueeze -> Concat -> Reshape``); quantized, the Shape reads the
    same DequantizeLinear output as the Reshape."""
    if len(node.input) < 2 or graph.const(node.input[1]) is not None:
        return False
    concat = _producer(graph, node.input[1])
    if concat is None or concat.op_type != "Concat" or len(concat.input) != 2 or graph.only_reader(concat.output[0]) \
            is not node:
        return False
    rest = graph.const(concat.input[1])
    shape = graph.shapes.get(node.input[0])
    if rest is None or rest.size != 1 or not shape or len(shape) < 2 or not _batch_of(graph, concat.input[0],
                                                                                        node.input[0]):
        return False
    dims = shape[1:]
    if not all(isinstance(d, int) and d > 0 for d in dims) or int(rest.reshape(-1)[0]) not in (-1, int(np.prod(dims))):
        return False
    graph.replace(node, [helper.make_node("Flatten", [node.input[0]], list(node.output), name=node.name, axis=1)])
    _remove_dead(graph, [node.input[1]])
    return True


# ---------------------------------------------------------------------------------------------------
# tf2onnx (Keras): channels-last inputs and flattens, computed Reshape targets, tensordot, Squeeze
# ---------------------------------------------------------------------------------------------------
def _static(dims) -> bool:
    return all(isinstance(d, int) and d > 0 for d in dims)


def _qdq_after(graph: Graph, tensor: str) -> tuple[onnx.NodeProto, onnx.NodeProto] | None:
    """``tensor -> Q -> DQ``, each the only reader of its input, scale and zero point constant and per tensor."""
    quantize = graph.only_reader(tensor)
    if quantize is None or quantize.op_type != "QuantizeLinear" or quantize.input[0] != tensor:
        return None
    dequantize = graph.only_reader(quantize.output[0])
    if dequantize is None or dequantize.op_type != "DequantizeLinear":
        return None
    params = [name for name in list(quantize.input[1:]) + list(dequantize.input[1:]) if name]
    if any(graph.const(name) is None or graph.const(name).size != 1 for name in params):
        return None
    return quantize, dequantize


def _same_quantization(graph: Graph, a: onnx.NodeProto, b: onnx.NodeProto) -> bool:
    """Whether the Q/DQ nodes ``a`` and ``b`` state equal constant scales and zero points (values and types)."""
    if len(a.input) != len(b.input) or _attrs(a).get("axis", 1) != _attrs(b).get("axis", 1):
        return False
    for x, y in zip(a.input[1:], b.input[1:]):
        vx, vy = graph.const(x), graph.const(y)
        if vx is None or vy is None or vx.dtype != vy.dtype or vx.shape != vy.shape or not np.array_equal(vx, vy):
            return False
    return True


def _requantization_after(graph: Graph, tensor: str, like: onnx.NodeProto | None):
    """``tensor -> Q -> DQ`` quantizing exactly as the DequantizeLinear ``like`` does, where ``tensor`` holds values
    ``like`` wrote (moved, not changed): ``Q(DQ(q)) = q``, an identity (``quantize_static`` writes one after every
    Reshape, Transpose and Squeeze, sharing its input's scale and zero point)."""
    pair = _qdq_after(graph, tensor)
    if pair is None or like is None or like.op_type != "DequantizeLinear":
        return None
    return pair if all(_same_quantization(graph, node, like) for node in pair) else None


@rule("Transpose", "Reshape")
def channels_last_input(graph: Graph, node: onnx.NodeProto) -> bool:
    """The graph input ``[N, H, W, C]`` read only by ``Transpose(perm=[0, 3, 1, 2])`` -> the graph input is
    ``[N, C, H, W]`` (same name) and the Transpose goes: **the host transposes**.

    tf2onnx writes a Keras model's channels-last image input this way (Keras' Conv2D is NHWC, ONNX's Conv NCHW);
    with one channel (``C = 1``) its optimizer writes the transpose as ``Reshape(x, [-1, 1, H, W])``, taken alike.
    The model records the permutation in ``metadata_props`` (:data:`INPUT_TRANSPOSE_KEY` = ``"0,3,1,2"``); the
    importer copies it into the program input's ``TensorSpec.host_transpose``, and the host
    (:func:`flowtile.host.model_layout`: ``flowtile run/emulate/rtl --input``, and the calibration samples of
    :func:`flowtile.compiler.int8_model`) transposes samples given in the published ``[N, H, W, C]`` layout."""
    source = node.input[0]
    graph_input = next((i for i in graph.model.graph.input if i.name == source), None)
    if graph_input is None or graph.only_reader(source) is not node or node.output[0] in graph.outputs or \
            host_transpose(graph.model) is not None:
        return False
    shape = graph.shapes.get(source)
    if shape is None or len(shape) != 4 or not _static(shape[1:]):
        return False
    if node.op_type == "Transpose":
        if [int(p) for p in _attrs(node).get("perm", [])] != [0, 3, 1, 2]:
            return False
    else:
        target = graph.const(node.input[1]) if len(node.input) > 1 else None
        _, height, width, channels = shape
        if target is None or target.size != 4 or channels != 1 or \
                [int(t) for t in target.reshape(-1)[1:]] != [1, height, width]:
            return False
        first = int(target.reshape(-1)[0])
        if not (first == -1 or (first == 0 and not _attrs(node).get("allowzero", 0)) or first == shape[0]):
            return False
    dims = graph_input.type.tensor_type.shape.dim
    published = [onnx.TensorShapeProto.Dimension() for _ in dims]
    for copy, dim in zip(published, dims):
        copy.CopyFrom(dim)
    for axis, taken in enumerate((0, 3, 1, 2)):
        dims[axis].CopyFrom(published[taken])
    graph.replace(node, [])
    graph.redirect_readers(node.output[0], source)
    entry = graph.model.metadata_props.add()
    entry.key, entry.value = INPUT_TRANSPOSE_KEY, "0,3,1,2"
    return True


@rule("Reshape")
def reshape_static_target(graph: Graph, node: onnx.NodeProto) -> bool:
    """A ``Reshape`` whose target is computed from a tensor's shape, whose output ONNX shape inference with data
    propagation knows but for (at most) one entry, the batch -> the constant target, that entry ``-1``; the shape
    computation is removed where nothing else reads it.

    tf2onnx writes Keras' reshapes this way when the batch is dynamic: ``Dense`` on ``[N, T, C]`` (``tf.tensordot``:
    ``Reshape(MatMul, Cast(Concat(Gather(Cast(Shape(x)), [0, 1]), [K])))``) and ``Flatten`` after a channels-last
    map (``Reshape(t, Cast(Concat(Slice(Cast(Gather(Shape(m), perm)), 0, 1), [n])))``); the batch is symbolic, so
    :func:`fold_constants` cannot fold them. The static entries are the values the graph computes; the one unknown
    entry is what ``-1`` gives (the element count is the input's)."""
    if len(node.input) < 2 or not node.input[1] or graph.const(node.input[1]) is not None:
        return False
    out = graph.propagated_shape(node.output[0])
    if not out:
        return False
    unknown = [axis for axis, d in enumerate(out) if not (isinstance(d, int) and d > 0)]
    if len(unknown) > 1:
        return False
    computed = node.input[1]
    node.input[1] = graph.add_const(f"{node.name or node.output[0]}_target",
                                    np.array([-1 if axis in unknown else d for axis, d in enumerate(out)], np.int64))
    _set_attr(node, "allowzero", None)
    _remove_dead(graph, [computed])
    return True


@rule("MatMul")
def tensordot_to_matmul(graph: Graph, node: onnx.NodeProto) -> bool:
    """``x [N, T, C] -> Reshape([-1, C]) -> MatMul(W [C, K]) -> Reshape([-1, T, K])`` -> ``MatMul(x, W)`` on the
    3-D tensor (``nn.Linear``'s form on a sequence, which the matcher takes as a sequence layer). Exact: the same
    rows multiplied. In QDQ models the Q/DQ pairs ``quantize_static`` wrote after the Reshapes, with the scale and
    zero point of their input (identities, :func:`_requantization_after`), go with them.

    tf2onnx writes Keras' ``Dense`` on a 3-D input this way (Keras computes it with ``tf.tensordot``); the second
    target is computed from ``Shape(x)`` (made constant first by :func:`reshape_static_target`)."""
    weight = graph.static_shape(node.input[1]) if len(node.input) > 1 else None
    if weight is None or len(weight) != 2:
        return False
    channels, k = weight
    # backwards: x -> Reshape A -> [Q -> DQ] -> MatMul
    into, head = None, node.input[0]
    producer = _producer(graph, head)
    if producer is not None and producer.op_type == "DequantizeLinear":
        quantize = _producer(graph, producer.input[0])
        if quantize is None or quantize.op_type != "QuantizeLinear" or graph.only_reader(head) is not node or \
                graph.only_reader(quantize.output[0]) is not producer:
            return False
        into, head = (quantize, producer), quantize.input[0]
        producer = _producer(graph, head)
    first = producer
    if first is None or first.op_type != "Reshape" or graph.only_reader(head) is not (into[0] if into else node):
        return False
    target = graph.const(first.input[1]) if len(first.input) > 1 else None
    x = first.input[0]
    shape = graph.shapes.get(x)
    if target is None or shape is None or len(shape) < 3 or shape[-1] != channels or not _static(shape[1:]):
        return False
    steps = [int(d) for d in shape[1:-1]]
    batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None  # a traced batch: targets may state it
    if [int(t) for t in target.reshape(-1)] not in ([-1, channels], [batch and batch * int(np.prod(steps)), channels]):
        return False
    # forwards: MatMul -> [Q -> DQ] -> Reshape B -> [Q -> DQ quantizing as the pair before it]
    pair = _qdq_after(graph, node.output[0])
    tensor = pair[1].output[0] if pair else node.output[0]
    second = graph.only_reader(tensor)
    if second is None or second.op_type != "Reshape" or second.input[0] != tensor:
        return False
    target = graph.const(second.input[1]) if len(second.input) > 1 else None
    if target is None or [int(t) for t in target.reshape(-1)] not in ([-1, *steps, k], [batch, *steps, k]):
        return False
    after = _requantization_after(graph, second.output[0], pair[1]) if pair else None
    last = after[1].output[0] if after else second.output[0]
    if last in graph.outputs:
        return False
    before = _requantization_after(graph, head, _producer(graph, x)) if into else None  # x -> Q -> DQ -> A -> Q -> DQ
    graph.replace(first, [])
    graph.redirect_readers(head, x)
    if before is not None:
        for removed in before:
            graph.replace(removed, [])
        graph.redirect_readers(into[1].output[0], x)
    for removed in [second, *(after or [])]:
        graph.replace(removed, [])
    graph.redirect_readers(last, tensor)
    return True


@rule("Transpose")
def channels_last_flatten(graph: Graph, node: onnx.NodeProto) -> bool:
    """``map [N, C, H, W] -> Transpose(perm=[0, 2, 3, 1]) -> Reshape to [N, H*W*C] | Flatten -> [Q -> DQ] ->
    MatMul | Gemm`` with a constant weight (float, or int8 behind its DequantizeLinear) -> ``map -> Flatten -> [Q ->
    DQ] -> MatMul | Gemm`` with the weight's input rows permuted from ``(h, w, c)`` to ``(c, h, w)`` order (and a
    per-row quantization scale with them). Exact: the same products, summed in another order. In QDQ models the
    identity Q/DQ pair ``quantize_static`` writes after the Transpose goes with it.

    tf2onnx writes Keras' ``Flatten`` after a Conv2D or MaxPooling2D this way (Keras flattens a channels-last map in
    ``(h, w, c)`` order, tf2onnx computes in NCHW and transposes back first)."""
    if [int(p) for p in _attrs(node).get("perm", [])] != [0, 2, 3, 1]:
        return False
    source = node.input[0]
    shape = graph.shapes.get(source)
    if shape is None or len(shape) != 4 or not _static(shape[1:]):
        return False
    channels, height, width = shape[1:]
    middle = _requantization_after(graph, node.output[0], _producer(graph, source))
    tensor = middle[1].output[0] if middle else node.output[0]
    flat = graph.only_reader(tensor)
    if flat is None or flat.input[0] != tensor:
        return False
    if not ((flat.op_type == "Flatten" and _attrs(flat).get("axis", 1) == 1) or
            (flat.op_type == "Reshape" and _flatten_target(graph, flat))):
        return False
    pair = _qdq_after(graph, flat.output[0])
    tensor = pair[1].output[0] if pair else flat.output[0]
    dense = graph.only_reader(tensor)
    if dense is None or dense.op_type not in ("MatMul", "Gemm") or dense.input[0] != tensor or len(dense.input) < 2:
        return False
    attrs = _attrs(dense)
    if dense.op_type == "Gemm" and attrs.get("transA", 0):
        return False
    axis = 1 if dense.op_type == "Gemm" and attrs.get("transB", 0) else 0  # the weight's input axis
    weight_name, dequantize = dense.input[1], None
    value = graph.const(weight_name)
    if value is None:
        dequantize = _producer(graph, weight_name)
        if dequantize is None or dequantize.op_type != "DequantizeLinear" or \
                graph.only_reader(weight_name) is not dense:
            return False
        value = graph.const(dequantize.input[0])
        if value is None or len(graph.consumers.get(dequantize.input[0], [])) != 1:
            return False
    elif len(graph.consumers.get(weight_name, [])) != 1:
        return False
    n = channels * height * width
    if value.ndim != 2 or value.shape[axis] != n:
        return False
    order = np.arange(n).reshape(height, width, channels).transpose(2, 0, 1).reshape(-1)  # (c, h, w) -> (h, w, c)
    permuted = np.take(value, order, axis=axis)
    if dequantize is None:
        dense.input[1] = graph.add_const(f"{weight_name}_chw", permuted)
    else:
        if _attrs(dequantize).get("axis", 1) % 2 == axis:
            for index in (1, 2):
                param = graph.const(dequantize.input[index]) if len(dequantize.input) > index else None
                if param is None and len(dequantize.input) > index and dequantize.input[index]:
                    return False
                if param is not None and param.size > 1:
                    dequantize.input[index] = graph.add_const(f"{dequantize.input[index]}_chw", param[order])
        dequantize.input[0] = graph.add_const(f"{dequantize.input[0]}_chw", permuted)
    graph.replace(flat, [helper.make_node("Flatten", [source], list(flat.output), name=flat.name or flat.output[0],
                                          axis=1)])
    for removed in [node, *(middle or [])]:
        graph.replace(removed, [])
    return True


@rule("Squeeze")
def squeeze_to_flatten(graph: Graph, node: onnx.NodeProto) -> bool:
    """A ``Squeeze`` of size-1 axes (not the batch) that leaves ``[N, n]`` -> ``Flatten(axis=1)``, the same values.

    tf2onnx writes Keras' ``GlobalAveragePooling2D`` as ``GlobalAveragePool -> Squeeze(axes=[2, 3])``."""
    shape = graph.shapes.get(node.input[0])
    if len(node.input) > 1 and node.input[1]:
        axes = graph.const(node.input[1])
        if axes is None:
            return False
        axes = [int(a) for a in axes.reshape(-1)]
    else:
        axes = [int(a) for a in _attrs(node).get("axes", [])]
    if shape is None or len(shape) < 3 or not axes or not _static(shape[1:]):
        return False
    axes = sorted({a % len(shape) for a in axes})
    if 0 in axes or any(shape[a] != 1 for a in axes) or len(shape) - len(axes) != 2:
        return False
    graph.replace(node, [helper.make_node("Flatten", [node.input[0]], list(node.output),
                                          name=node.name or node.output[0], axis=1)])
    return True


@rule("Flatten")
def flatten_after_its_quantization(graph: Graph, node: onnx.NodeProto) -> bool:
    """``layer -> Flatten -> Q -> DQ`` (per-tensor Q/DQ) -> ``layer -> Q -> DQ -> Flatten``: the quantization of the
    layer's output, then the flatten (a relabelling of the same values; exact, as per-tensor Q/DQ are elementwise).

    torch's dynamo exporter followed by onnxruntime's ``quantize_static`` writes it after a pooled 1x1 map
    (``x.mean((2, 3))`` / ``view(N, -1)`` -> ``GlobalAveragePool -> Flatten -> Q -> DQ -> Gemm``). The one rule that
    moves Q/DQ nodes: only this pair, whose scale and zero point stay those the model states."""
    if _attrs(node).get("axis", 1) != 1:
        return False
    source = node.input[0]
    producer = next((n for n in graph.model.graph.node if source in n.output), None)
    if producer is None or producer.op_type in _QUANT_OPS or graph.only_reader(source) is not node:
        return False
    quantize = graph.only_reader(node.output[0])
    if quantize is None or quantize.op_type != "QuantizeLinear" or quantize.input[0] != node.output[0]:
        return False
    dequantize = graph.only_reader(quantize.output[0])
    if dequantize is None or dequantize.op_type != "DequantizeLinear" or dequantize.output[0] in graph.outputs:
        return False
    pair = list(quantize.input[1:]) + list(dequantize.input[1:])
    if any(not name or graph.const(name) is None or graph.const(name).size != 1 for name in pair) or \
            len(quantize.input) != len(dequantize.input):
        return False  # per-axis or computed quantization: left for the matcher, which names it
    taken = {o for n in graph.model.graph.node for o in n.output} | {t.name for t in graph.model.graph.initializer}
    name, k = f"{dequantize.output[0]}_map", 0
    while name in taken:
        k += 1
        name = f"{dequantize.output[0]}_map_{k}"
    flat_output = dequantize.output[0]
    quantize.input[0] = source
    dequantize.output[0] = name
    moved = helper.make_node("Flatten", [name], [flat_output], name=node.name or node.output[0], axis=1)
    graph.replace(node, [])
    nodes = graph.model.graph.node
    nodes.insert(next(i for i, n in enumerate(nodes) if n is dequantize) + 1, moved)
    return True


@rule("ReduceMean")
def reduce_mean_to_global_pool(graph: Graph, node: onnx.NodeProto) -> bool:
    """``ReduceMean`` over the spatial axes of an NCHW map -> ``GlobalAveragePool`` (+ ``Flatten`` if
    ``keepdims=0``). torch's dynamo exporter (``x.mean((2, 3))``, adaptive_avg_pool2d(1)) and tf2onnx
    (``GlobalAveragePooling2D``) write it; axes as attribute (opset < 18) or input (opset >= 18)."""
    attrs = _attrs(node)
    shape = graph.shapes.get(node.input[0])
    if len(node.input) > 1 and node.input[1]:
        axes = graph.const(node.input[1])
        if axes is None:
            return False  # a computed axes input: constant folding may still resolve it
        axes = [int(a) for a in axes.reshape(-1)]
    else:
        axes = [int(a) for a in attrs.get("axes", [])]
    if shape is None:
        return False
    rank = len(shape)
    normalized = sorted(a % rank for a in axes) if axes else list(range(rank))
    if rank == 3 and normalized != [0]:  # a sequence [N, T, C] (nn.Linear's input): no reduction on chip
        raise CompileError(f"{describe(node)}: its input '{node.input[0]}' is a sequence [N, "
                           f"{', '.join(map(str, shape[1:]))}]; attribute 'axes' = {axes or 'all'} is unsupported "
                           f"(only the spatial axes [2, 3] of an NCHW map, as GlobalAveragePool)")
    if rank != 4 or normalized != [2, 3]:
        raise CompileError(f"{describe(node)}: attribute 'axes' = {axes or 'all'} is unsupported (only the spatial "
                           f"axes [2, 3] of an NCHW map, as GlobalAveragePool)")
    name = node.name or node.output[0]
    if attrs.get("keepdims", 1):
        graph.replace(node, [helper.make_node("GlobalAveragePool", [node.input[0]], list(node.output), name=name)])
    else:
        pooled = f"{name}_pooled"
        graph.replace(node, [helper.make_node("GlobalAveragePool", [node.input[0]], [pooled], name=name),
                             helper.make_node("Flatten", [pooled], list(node.output), name=f"{name}_flatten", axis=1)])
    return True


@rule("AveragePool")
def whole_map_average_pool(graph: Graph, node: onnx.NodeProto) -> bool:
    """An ``AveragePool`` whose one window covers the whole map (kernel = map, no top/left padding, a 1x1
    output whatever the strides) -> ``GlobalAveragePool``. Keras' ``AveragePooling2D(pool_size=map)`` (its
    strides default to the pool size) and torch's ``avg_pool2d(x, x.shape[2:])`` write it: MLPerf Tiny's
    ResNet-8 (8x8) and DS-CNN (25x5). The window reads no padding, so ``count_include_pad`` does not matter."""
    shape = graph.shapes.get(node.input[0])
    attrs = _attrs(node)
    if shape is None or len(shape) != 4 or attrs.get("ceil_mode", 0) or \
            attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return False
    height, width = shape[2], shape[3]
    kernel = list(attrs.get("kernel_shape", []))
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    strides = list(attrs.get("strides", [1, 1]))
    if kernel != [height, width] or len(pads) != 4 or pads[0] or pads[1] or len(strides) != 2:
        return False
    if any((size + pad_end - k) // stride + 1 != 1
           for size, pad_end, k, stride in ((height, pads[2], height, strides[0]), (width, pads[3], width, strides[1]))):
        return False
    graph.replace(node, [helper.make_node("GlobalAveragePool", [node.input[0]], list(node.output),
                                          name=node.name or node.output[0])])
    return True


# ---------------------------------------------------------------------------------------------------
# the passes
# ---------------------------------------------------------------------------------------------------
def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), TARGET_OPSET)


def _is_float(model: onnx.ModelProto) -> bool:
    return not any(node.op_type in _QUANT_OPS for node in model.graph.node)


def drop_initializer_inputs(model: onnx.ModelProto) -> None:
    """Initializers also listed as graph inputs (IR version 3, e.g. CNTK's mnist-8) are constants, not inputs."""
    constants = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in constants]
    if len(inputs) != len(model.graph.input):
        del model.graph.input[:]
        model.graph.input.extend(inputs)
        model.ir_version = max(model.ir_version, 4)


def convert_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """``onnx.version_converter`` to :data:`TARGET_OPSET`; a model it cannot convert keeps its opset if that is
    13 or newer (the rules accept both forms), else CompileError."""
    version = _opset(model)
    if version == TARGET_OPSET:
        return model
    try:
        converted = onnx.version_converter.convert_version(model, TARGET_OPSET)
        onnx.checker.check_model(converted)
        return converted
    except Exception as error:
        if version >= 13:
            return model
        text = " ".join(str(error).split())[:200]
        raise CompileError(f"opset {version} could not be converted to opset {TARGET_OPSET} "
                           f"(onnx.version_converter: {text})") from None


def onnxruntime_basic(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's basic graph optimizations of a float model (Conv+BatchNormalization, Conv+Add/Mul constants,
    constant subgraphs, Identity/Dropout/Cast eliminations), or ``model`` unchanged if onnxruntime cannot load it
    (the matcher then names what it does not support)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="flowtile-normalize-") as tmp:
        path = Path(tmp) / "basic.onnx"
        options.optimized_model_filepath = str(path)
        try:
            ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"],
                                 disabled_optimizers=_ORT_KEEP)
            optimized = onnx.load(str(path))
        except Exception as error:
            logging.getLogger(__name__).debug("onnxruntime basic optimizations skipped: %s", error)
            return model
    if any(node.domain not in ("", "ai.onnx") for node in optimized.graph.node):
        return model
    # onnxruntime lists all its domains as opset imports and names fused nodes "<name>/<Fusion>": keep ours
    del optimized.opset_import[:]
    optimized.opset_import.extend(model.opset_import)
    taken = {node.name for node in optimized.graph.node}
    for node in optimized.graph.node:
        base, _, suffix = node.name.rpartition("/")
        if base and suffix.endswith("Fusion") and base not in taken:
            taken.add(base)
            node.name = base
    # ... or "<Fusion>_<Op>" (MatMul+BatchNormalization -> "MatMulBnFusion_Gemm"): the name of the one original
    # node that read the same activation
    original = {node.name for node in model.graph.node}
    for node in optimized.graph.node:
        if "Fusion" in node.name and node.name not in original and node.input:
            readers = [n for n in model.graph.node if n.input and n.input[0] == node.input[0]]
            if len(readers) == 1 and readers[0].name and readers[0].name not in taken:
                taken.add(readers[0].name)
                node.name = readers[0].name
    return optimized


def drop_unused_constants(model: onnx.ModelProto) -> None:
    """Initializers no node reads any more (a folded Reshape's target shape, a fused bias) are dropped."""
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    kept = [t for t in model.graph.initializer if t.name in used]
    if len(kept) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)


def apply_rules(graph: Graph) -> None:
    """Apply :data:`RULES` until none matches (re-inferring shapes after every rewrite)."""
    for _ in range(_MAX_REWRITES):
        changed = False
        for node in graph.nodes:
            for entry in RULES:
                if entry.float_only and not graph.is_float:
                    continue
                if "*" in entry.ops or node.op_type in entry.ops:
                    if entry.apply(graph, node):
                        changed = True
                        break
            if changed:
                break
        if not changed:
            return
        graph.refresh()
    raise CompileError(f"normalization did not settle after {_MAX_REWRITES} rewrites")


def free_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """A graph input (and output) with a fixed batch of 1 gets a symbolic batch: the batch is flowtile's.

    Exporters trace with one example (CNTK, torch without ``dynamic_axes``). Kept fixed if the graph still
    depends on it (shape inference then fails)."""
    constants = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in constants]
    fixed = [i for i in inputs if i.type.tensor_type.shape.dim and i.type.tensor_type.shape.dim[0].dim_value == 1]
    if not fixed:
        return model
    candidate = onnx.ModelProto()
    candidate.CopyFrom(model)
    for tensor in list(candidate.graph.input) + list(candidate.graph.output):
        if tensor.name in constants:
            continue
        dims = tensor.type.tensor_type.shape.dim
        if dims and dims[0].dim_value == 1:
            dims[0].Clear()
            dims[0].dim_param = "batch"
    del candidate.graph.value_info[:]
    try:
        return onnx.shape_inference.infer_shapes(candidate, check_type=True, strict_mode=True)
    except Exception:
        return model


def host_transpose(model: onnx.ModelProto) -> tuple[int, ...] | None:
    """The permutation the host applies to the published model's input (batch axis included) to get this model's
    input, as :func:`channels_last_input` recorded it (:data:`INPUT_TRANSPOSE_KEY`), or None."""
    value = next((p.value for p in model.metadata_props if p.key == INPUT_TRANSPOSE_KEY), None)
    return tuple(int(v) for v in value.split(",")) if value else None


def normalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model in the forms :mod:`.onnx_import` matches (a new ModelProto; ``model`` is not changed)."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    drop_initializer_inputs(work)
    work = convert_opset(work)
    is_float = _is_float(work)
    if is_float:
        work = onnxruntime_basic(work)
    graph = Graph(work, is_float)
    apply_rules(graph)
    drop_unused_constants(graph.model)
    work = free_batch(graph.model)
    work.graph.name = model.graph.name
    return work
