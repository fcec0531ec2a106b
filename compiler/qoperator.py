"""QOperator -> QDQ: rewrite onnxruntime's QOperator-format nodes into the QDQ subgraphs the importer knows.

:func:`qoperator_to_qdq` replaces, in the default ONNX domain:

* ``QLinearConv(x, x_s, x_zp, w, w_s, w_zp, y_s, y_zp[, B])`` by::

      DequantizeLinear(x, x_s, x_zp) -> Conv(DequantizeLinear(w), [DequantizeLinear(B, x_s * w_s)])
        -> QuantizeLinear(y_s, y_zp) -> y

  (Conv keeps the node's attributes and its name, so the importer's messages name the original node);
* ``QLinearMatMul(a, a_s, a_zp, b, b_s, b_zp, y_s, y_zp)`` by
  ``DequantizeLinear(a) -> MatMul(DequantizeLinear(b)) -> QuantizeLinear(y_s, y_zp)``;
* ``MaxPool`` on an int8/uint8 tensor whose quantization is known from its producer (a per-tensor
  QuantizeLinear, one of the two nodes above, or such a MaxPool), as QOperator models keep it, by
  ``DequantizeLinear -> MaxPool -> QuantizeLinear`` with that one scale and zero point (max commutes with the
  monotonic dequantization, and padding is ignored by both: exact).

Equivalence: both forms compute ``y = saturate(round_half_even(acc * x_s * w_s / y_s) + y_zp)`` with the exact
integer accumulator ``acc = sum (x - x_zp)(w - w_zp) [+ B]``; the QDQ form evaluates the scaling in float32,
so the two agree up to float32 rounding (a tie of the rounding can flip by 1 LSB, which in practice happens
only for specially chosen scales).

**Constant weights are re-expressed with zero point 0 as int8**, the only weight form the chip multiplies
(docs/architecture.md section 8): the real weight ``w_s * (w - w_zp)`` is written as int8 ``(w - w_zp) / g``
with scale ``g * w_s``, ``g`` the smallest integer per output channel that makes it an exact int8
(``g = 1`` whenever ``w - w_zp`` already fits; ``g`` must also divide that channel's int32 bias, so the
bias stays exact in the new accumulator units). The real weights are unchanged; only the scale ``g * w_s``
rounds to float32 (relative 2^-24, far below the 1 LSB the compiler promises). Weights for which no such
``g`` exists are left as ``DequantizeLinear(w, w_s, w_zp)`` and the importer rejects their zero point.

Scales of another float type (QLinearMatMul-21 allows float16/bfloat16) are cast to float32, so the float
part always computes in float32. Models below opset 13 are converted to opset 13 first (per-axis
DequantizeLinear needs it). Nodes whose quantization parameters have unknown shapes are left alone (the
importer then names them as unsupported). A model without such nodes is returned as is (the same object).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import CompileError, describe

__all__ = ["qoperator_to_qdq", "QOPERATOR_OPS", "symmetric_int8"]

#: The QOperator nodes rewritten (MaxPool only when it reads an int8/uint8 tensor).
QOPERATOR_OPS = ("QLinearConv", "QLinearMatMul")
_MIN_OPSET = 13
_INT8_TYPES = (TensorProto.INT8, TensorProto.UINT8)


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _is_default_domain(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx")


def symmetric_int8(q: np.ndarray, zero_point: np.ndarray, channel_axis: int,
                   bias: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
    """``q - zero_point`` as exact int8 values over a per-channel integer factor.

    Returns ``(int8 values, factors g [n] int64, bias / g or None)`` with ``(q - zp) == values * g`` along
    ``channel_axis`` (and ``bias == bias / g * g``), ``g`` the smallest such factor per channel, or None if some
    channel has no factor making its values fit int8. ``zero_point`` is a scalar or one value per channel.
    """
    q = q.astype(np.int64)
    n = q.shape[channel_axis]
    zp = np.asarray(zero_point, np.int64).reshape(-1)
    if zp.size not in (1, n):
        return None
    shape = [1] * q.ndim
    shape[channel_axis] = n
    values = np.moveaxis(q - (zp.reshape(shape) if zp.size == n else zp[0]), channel_axis, 0).reshape(n, -1)
    factors = np.ones(n, np.int64)
    for o in range(n):
        row = values[o] if bias is None else np.append(values[o], bias[o])
        if values[o].size and (values[o].min() < -128 or values[o].max() > 127):
            common = int(np.gcd.reduce(np.abs(row)))  # <= max |w - w_zp| <= 255 for 8-bit weights
            lowest = max(2, -(-int(-values[o].min()) // 128), -(-int(values[o].max()) // 127))
            factor = next((g for g in range(lowest, common + 1) if common % g == 0), None)
            if factor is None:
                return None
            factors[o] = factor
    scaled = np.moveaxis((values // factors[:, None]).reshape(np.moveaxis(q, channel_axis, 0).shape), 0,
                         channel_axis)
    return scaled.astype(np.int8), factors, (None if bias is None else bias.astype(np.int64) // factors)


class _Rewriter:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        graph = model.graph
        self.consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        for node in graph.node:
            if node.op_type == "Constant" and not node.input and node.attribute and node.attribute[0].name == "value":
                self.consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        self.types: dict[str, onnx.TypeProto] = {v.name: v.type for v in
                                                  list(graph.input) + list(graph.value_info) + list(graph.output)}
        self.producer = {out: node for node in graph.node for out in node.output}
        self.names = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output} | \
                     {i.name for i in graph.input} | {n.name for n in graph.node}
        self.new_inits: list[onnx.TensorProto] = []

    # --- helpers ---------------------------------------------------------------------------------
    def unique(self, name: str) -> str:
        candidate, i = name, 1
        while candidate in self.names:
            candidate, i = f"{name}_{i}", i + 1
        self.names.add(candidate)
        return candidate

    def constant(self, name: str, array: np.ndarray) -> str:
        name = self.unique(name)
        self.new_inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def shape(self, name: str) -> tuple[int | None, ...] | None:
        if name in self.consts:
            return tuple(self.consts[name].shape)
        t = self.types.get(name)
        if t is None or not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
            return None
        return tuple(d.dim_value if d.HasField("dim_value") else None for d in t.tensor_type.shape.dim)

    def elem_type(self, name: str) -> int | None:
        if name in self.consts:
            return helper.np_dtype_to_tensor_dtype(self.consts[name].dtype)
        t = self.types.get(name)
        return t.tensor_type.elem_type if t is not None and t.HasField("tensor_type") else None

    def param(self, name: str, base: str, nodes: list, float_: bool) -> tuple[str, bool] | None:
        """A scale (``float_``) or zero point -> (tensor name, per_axis), per-tensor ones made scalars and
        scales made float32; None if its shape (or a scale's type) is unknown."""
        if not name:
            return name, False
        shape = self.shape(name)
        if shape is None or len(shape) > 1:
            return None
        if name in self.consts:
            value = self.consts[name]
            per_axis = value.ndim == 1 and value.size != 1
            converted = value.astype(np.float32) if float_ and value.dtype != np.float32 else value
            if value.ndim == 1 and value.size == 1:
                converted = converted.reshape(())
            if converted is value:
                return name, per_axis
            return self.constant(f"{base}/{name}", converted), per_axis
        elem_type = self.elem_type(name)
        if float_ and elem_type in (None, TensorProto.UNDEFINED):
            return None
        per_axis = len(shape) == 1 and shape[0] != 1  # a 1-D tensor of unknown length is per axis
        if len(shape) == 1 and shape[0] == 1:
            out = self.unique(f"{base}/{name}_scalar")
            nodes.append(helper.make_node("Squeeze", [name], [out], name=self.unique(f"{base}/squeeze_{name}")))
            name = out
        if float_ and elem_type != TensorProto.FLOAT:
            out = self.unique(f"{base}/{name}_float")
            nodes.append(helper.make_node("Cast", [name], [out], to=TensorProto.FLOAT,
                                          name=self.unique(f"{base}/cast_{name}")))
            name = out
        return name, per_axis

    def dequantize(self, x: str, scale: tuple[str, bool], zp: tuple[str, bool], axis: int, base: str,
                   what: str, nodes: list) -> str:
        out = self.unique(f"{base}/{what}_dequantized")
        inputs = [x, scale[0]] + ([zp[0]] if zp[0] else [])
        attrs = {"axis": axis} if scale[1] or zp[1] else {}
        nodes.append(helper.make_node("DequantizeLinear", inputs, [out], name=self.unique(f"{base}/dequantize_{what}"),
                                      **attrs))
        return out

    def weight(self, node: onnx.NodeProto, w: str, w_scale: str, w_zp: str, channel_axis: int, base: str,
               nodes: list, bias: np.ndarray | None = None):
        """DequantizeLinear of a constant weight, int8 with zero point 0 where exactly possible.

        Returns (dequantized name, the new weight scales (float64, per channel or a scalar) or None when the
        weight is not constant, ``bias / g`` or None) or None if a quantization parameter's shape is unknown."""
        q, scale, zp = self.consts.get(w), self.consts.get(w_scale), self.consts.get(w_zp) if w_zp else None
        if q is not None and scale is not None and (zp is not None or not w_zp) and scale.ndim <= 1:
            if zp is None:
                zp = np.zeros((), q.dtype)
            n = q.shape[channel_axis]
            if scale.size in (1, n) and zp.size in (1, n):
                found = symmetric_int8(q, zp, channel_axis, bias)
                if found is not None:
                    values, factors, new_bias = found
                    scales = np.broadcast_to(scale.astype(np.float64).reshape(-1), (n,)) * factors
                    per_axis = scale.size != 1 or np.any(factors != 1)
                    scale_value = (scales.astype(np.float32) if per_axis
                                   else scale.astype(np.float32).reshape(()))
                    out = self.dequantize(self.constant(f"{base}/{w}_int8", values),
                                          (self.constant(f"{base}/{w_scale}_int8", scale_value), per_axis), ("", False),
                                          channel_axis, base, "w", nodes)
                    return out, scale_value.astype(np.float64), new_bias
        s, z = self.param(w_scale, base, nodes, True), self.param(w_zp, base, nodes, False)
        if s is None or z is None:
            return None
        return self.dequantize(w, s, z, channel_axis, base, "w", nodes), None, None

    def activation(self, x: str, x_scale: str, x_zp: str, axis: int, base: str, what: str, nodes: list):
        s, z = self.param(x_scale, base, nodes, True), self.param(x_zp, base, nodes, False)
        if s is None or z is None:
            return None
        return self.dequantize(x, s, z, axis, base, what, nodes)

    def quantize(self, value: str, y: str, y_scale: str, y_zp: str, axis: int, base: str, nodes: list) -> bool:
        s, z = self.param(y_scale, base, nodes, True), self.param(y_zp, base, nodes, False)
        if s is None or z is None:
            return False
        attrs = {"axis": axis} if s[1] or z[1] else {}
        nodes.append(helper.make_node("QuantizeLinear", [value, s[0]] + ([z[0]] if z[0] else []), [y],
                                      name=self.unique(f"{base}/quantize_y"), **attrs))
        return True

    # --- the rewrites ----------------------------------------------------------------------------
    def qlinearconv(self, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        x, x_s, x_zp, w, w_s, w_zp, y_s, y_zp = (list(node.input) + [""] * 8)[:8]
        b = node.input[8] if len(node.input) > 8 else ""
        base = node.name or node.output[0]
        nodes: list[onnx.NodeProto] = []
        x_dq = self.activation(x, x_s, x_zp, 1, base, "x", nodes)
        bias = self.consts.get(b) if b else None
        bias_vec = bias.reshape(-1).astype(np.int64) if bias is not None and w in self.consts else None
        if bias_vec is not None and bias_vec.size != self.consts[w].shape[0]:
            bias_vec = None
        found = self.weight(node, w, w_s, w_zp, 0, base, nodes, bias_vec)
        if x_dq is None or found is None:
            return None
        w_dq, w_scales, new_bias = found
        inputs = [x_dq, w_dq]
        if b:
            # The bias's real value is B * x_s * w_s. Constant scales: a constant DequantizeLinear scale (with
            # rescaled weights, B / g at x_s * w_s * g, exact because g divides B); else Mul(x_s, w_s).
            x_scale, w_scale = self.consts.get(x_s), self.consts.get(w_s)
            if new_bias is not None and x_scale is not None and x_scale.size == 1:
                b_q = self.constant(f"{base}/{b}_int32", new_bias.astype(np.int32))
                b_scale = (np.float64(x_scale.reshape(())) * w_scales).astype(np.float32)
            elif x_scale is not None and x_scale.size == 1 and w_scale is not None and w_scale.ndim <= 1:
                b_q = b
                b_scale = (np.float64(x_scale.reshape(())) * w_scale.astype(np.float64).reshape(-1)).astype(np.float32)
            else:
                b_q, b_scale = b, None
            if b_scale is not None:
                per_axis = b_scale.size > 1
                scale_name = self.constant(f"{base}/bias_scale", b_scale if per_axis else b_scale.reshape(()))
                b_dq = self.dequantize(b_q, (scale_name, per_axis), ("", False), 0, base, "bias", nodes)
            else:
                s_x, s_w = self.param(x_s, base, nodes, True), self.param(w_s, base, nodes, True)
                if s_x is None or s_w is None:
                    return None
                product = self.unique(f"{base}/bias_scale")
                nodes.append(helper.make_node("Mul", [s_x[0], s_w[0]], [product],
                                              name=self.unique(f"{base}/mul_bias_scale")))
                b_dq = self.dequantize(b, (product, s_w[1]), ("", False), 0, base, "bias", nodes)
            inputs.append(b_dq)
        conv_out = self.unique(f"{base}/conv_output")
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        nodes.append(helper.make_node("Conv", inputs, [conv_out], name=base, **attrs))
        if not self.quantize(conv_out, node.output[0], y_s, y_zp, 1, base, nodes):
            return None
        return nodes

    def qlinearmatmul(self, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        a, a_s, a_zp, b, b_s, b_zp, y_s, y_zp = (list(node.input) + [""] * 8)[:8]
        base = node.name or node.output[0]
        nodes: list[onnx.NodeProto] = []
        a_dq = self.activation(a, a_s, a_zp, -2, base, "a", nodes)  # per row when a_s has one value a row
        b_shape = self.shape(b)
        if b_shape is None or len(b_shape) != 2:
            b_dq = self.activation(b, b_s, b_zp, -1, base, "b", nodes)  # per column
        else:
            found = self.weight(node, b, b_s, b_zp, 1, base, nodes)
            b_dq = None if found is None else found[0]
        if a_dq is None or b_dq is None:
            return None
        product = self.unique(f"{base}/matmul_output")
        nodes.append(helper.make_node("MatMul", [a_dq, b_dq], [product], name=base))
        if not self.quantize(product, node.output[0], y_s, y_zp, -2, base, nodes):
            return None
        return nodes

    def quantization_of(self, tensor: str) -> tuple[str, str] | None:
        """(scale, zero point) of an int8/uint8 tensor from its producer, or None."""
        producer = self.producer.get(tensor)
        if producer is None or not _is_default_domain(producer):
            return None
        if producer.op_type == "QuantizeLinear":
            zp = producer.input[2] if len(producer.input) > 2 else ""
            if self.shape(producer.input[1]) not in ((), (1,)) or (
                    not zp and any(a.name == "output_dtype" for a in producer.attribute)):
                return None  # per axis, or a type only an attribute states: not re-expressible here
            return producer.input[1], zp
        if producer.op_type in QOPERATOR_OPS:
            return producer.input[6], producer.input[7]
        if producer.op_type == "MaxPool":
            return self.quantization_of(producer.input[0])
        return None

    def maxpool(self, node: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        if self.elem_type(node.input[0]) not in _INT8_TYPES or len([o for o in node.output if o]) != 1:
            return None
        params = self.quantization_of(node.input[0])
        if params is None:
            return None
        base = node.name or node.output[0]
        nodes: list[onnx.NodeProto] = []
        x_dq = self.activation(node.input[0], params[0], params[1], 1, base, "x", nodes)
        if x_dq is None:
            return None
        pooled = self.unique(f"{base}/maxpool_output")
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        del copy.input[:]
        del copy.output[:]
        copy.input.append(x_dq)
        copy.output.append(pooled)
        copy.name = base
        nodes.append(copy)
        if not self.quantize(pooled, node.output[0], params[0], params[1], 1, base, nodes):
            return None
        return nodes


def _needs_rewrite(model: onnx.ModelProto) -> bool:
    """A QOperator node, or a MaxPool reading (through MaxPools) a QuantizeLinear's or QOperator node's output."""
    producers = {out: node for node in model.graph.node for out in node.output}

    def quantized_source(node: onnx.NodeProto | None) -> bool:
        while node is not None and node.op_type == "MaxPool" and _is_default_domain(node):
            node = producers.get(node.input[0])
        return node is not None and node.op_type in ("QuantizeLinear",) + QOPERATOR_OPS

    return any(_is_default_domain(node) and (node.op_type in QOPERATOR_OPS or (
        node.op_type == "MaxPool" and quantized_source(producers.get(node.input[0]))))
        for node in model.graph.node)


def qoperator_to_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite QLinearConv / QLinearMatMul and integer MaxPool into QDQ form (module docstring).

    Returns ``model`` itself when it has no such node, else a new checked and shape-inferred model;
    raises :class:`CompileError` naming the node if the rewritten model is not valid ONNX.
    """
    if not _needs_rewrite(model):
        return model
    original = model
    if _default_opset(model) < _MIN_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, _MIN_OPSET)
        except Exception as error:
            raise CompileError(f"converting the QOperator model from opset {_default_opset(model)} to "
                               f"{_MIN_OPSET} failed: {type(error).__name__}: {' '.join(str(error).split())[:200]}") from None
    else:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        model = copy
    model = onnx.shape_inference.infer_shapes(model)
    rewriter = _Rewriter(model)
    new_nodes: list[onnx.NodeProto] = []
    rewritten: list[onnx.NodeProto] = []
    for node in model.graph.node:
        replacement, added = None, len(rewriter.new_inits)
        if _is_default_domain(node):
            if node.op_type == "QLinearConv":
                replacement = rewriter.qlinearconv(node)
            elif node.op_type == "QLinearMatMul":
                replacement = rewriter.qlinearmatmul(node)
            elif node.op_type == "MaxPool":
                replacement = rewriter.maxpool(node)
        if replacement is None:  # left alone (the importer names it): drop what the attempt created
            del rewriter.new_inits[added:]
            new_nodes.append(node)
        else:
            new_nodes.extend(replacement)
            rewritten.append(node)
    if not rewritten:
        return original
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    model.graph.initializer.extend(rewriter.new_inits)
    del model.graph.value_info[:]  # stale for the replaced tensors' types; inferred again below
    try:
        onnx.checker.check_model(model)
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as error:
        names = ", ".join(describe(n) for n in rewritten)
        raise CompileError(f"rewriting {names} into QDQ form gave an invalid model: {type(error).__name__}: "
                           f"{' '.join(str(error).split())[:200]}") from None
