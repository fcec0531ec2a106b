"""ONNX's own backend node test cases for QLinearConv, ConvInteger, MaxPool, AveragePool and GlobalAveragePool,
run through flowtile (compiler -> emulator) and compared with each case's expected output.

The installed onnx wheel ships the case generators, not the ``backend/test/data/node`` files:
``onnx.backend.test.case.node.collect_testcases()`` builds every case's model and input/expected arrays in
memory. Each case exists at one opset, its op's latest (22 for the pools, 10 for QLinearConv and ConvInteger);
the generators write no ``_expanded`` or ``_verN`` variants of these ops. Every case of the five ops is
classified in exactly one table below (test_every_case_is_classified fails on a new or vanished case, so no
case is silently skipped):

* RUN_EXACT: integer cases, compiled and emulated; the chip's integers equal the expected ones.
* RUN_FLOAT: float cases, quantized with the case's own input as calibration, compiled and emulated; the
  dequantized output is within a bound derived from the input and output scales (see _float_tolerance).
* REJECTED: the compiler raises a one-line CompileError naming the node, its op and the attribute.
* SKIPPED: not run, with the reason (none at present; the table and its staleness check stay).

How a case becomes a model flowtile compiles (flowtile's graph input and output are float tensors that the
host quantizes and dequantizes, docs/architecture.md section 7):

* integer cases get float I/O: ``x_float -> QuantizeLinear(s_x, z_x) -> x`` and ``y -> DequantizeLinear(s_y,
  z_y) -> y_float``, with the case's own scale and zero point (QLinearConv) or scale 1 / zero point 0 (uint8
  MaxPool, where any scale gives the same integers). Their other inputs (scales, zero points, weights) become
  initializers holding the case's values. The integers are fed to and read from the chip directly
  (host.pack_flits / unpack_flits), with no float round trip. QLinearConv and the integer MaxPool are then
  rewritten into QDQ form by compiler/qoperator.py inside the compiler, as any QOperator model is.
* ConvInteger has an int32 output, which the chip cannot emit in general; but ``ConvInteger(x, w, z_x, z_w)
  == QLinearConv(x, 1, z_x, w, 1, z_w, 1, z_y) - z_y`` exactly whenever every output lies in the int8 range
  (the accumulator is exact and ``M / 2^S = 1`` is exact too). Both cases' outputs do (asserted), so the
  harness runs that substitute; onnxruntime confirms the substitute reproduces the case on the case's data.
* float cases go through the compiler's float path (``quantize_float_model``: attribute checks, then
  onnxruntime's quantize_static, calibrated on the case's input). quantize_static by itself leaves a pool that
  reads the float graph input unquantized (it quantizes a pool only after a quantized layer), and every case here
  is a lone pool: the compiler passes ``ForceQuantizeNoInputCheck`` for such models, and the harness checks that
  the pool did get quantized.
"""
from __future__ import annotations

import re
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from flowtile.compiler import CompileError, compile_model
from flowtile.compiler.onnx_import import quantize_float_model
from flowtile.compiler.qoperator import qoperator_to_qdq, symmetric_int8
from flowtile.emulator import emulate
from flowtile.testing.archs import lean_arch
from flowtile.host import input_flits, outputs_from_flits, pack_flits, unpack_flits
from flowtile.oracle import ort_session

OPS = ("QLinearConv", "ConvInteger", "MaxPool", "AveragePool", "GlobalAveragePool")
#: Grids tried in order; a case takes the first its layers fit (the 32x32 maps need 4x4: each tile's result
#: buffer holds 64 words, two output rows of 31 pixels).
GRIDS = (lean_arch(rows=2, cols=2), lean_arch(rows=4, cols=4))

# --------------------------------------------------------------------------------------------------
# the classification: every case name of OPS is in exactly one of these
# --------------------------------------------------------------------------------------------------
RUN_EXACT = {
    "test_qlinearconv",  # uint8 weight 0 with zero point 255: qoperator.py makes it int8 -85 at scale 3 w_s
    "test_convinteger_without_padding",  # via the QLinearConv substitute (module docstring)
    "test_convinteger_with_padding",
    "test_maxpool_2d_uint8",
}

RUN_FLOAT = {
    "test_maxpool_2d_default", "test_maxpool_2d_pads", "test_maxpool_2d_precomputed_pads",
    "test_maxpool_2d_precomputed_strides", "test_maxpool_2d_strides",
    "test_averagepool_2d_default", "test_averagepool_2d_strides", "test_averagepool_2d_precomputed_strides",
    "test_averagepool_2d_pads_count_include_pad", "test_averagepool_2d_precomputed_pads_count_include_pad",
    "test_globalaveragepool", "test_globalaveragepool_precomputed",
}

# case -> (op, regex the one-line CompileError must match: the attribute or output it names)
_AUTO_PAD = r"attribute 'auto_pad' = SAME_(UPPER|LOWER) is unsupported"
_CEIL = r"attribute 'ceil_mode' = 1 is unsupported"
_NOT_2D = r"attribute 'kernel_shape' = \[[0-9, ]+\] is unsupported \(2-D windows\)"
_EXCLUDE_PAD = r"attribute 'count_include_pad' = 0 with 'pads' = \[2, 2, 2, 2\] is unsupported"
REJECTED = {
    "test_maxpool_1d_default": ("MaxPool", _NOT_2D),
    "test_maxpool_3d_default": ("MaxPool", _NOT_2D),
    "test_maxpool_3d_dilations": ("MaxPool", _NOT_2D),
    "test_maxpool_3d_dilations_use_ref_impl": ("MaxPool", _NOT_2D),
    "test_maxpool_3d_dilations_use_ref_impl_large": ("MaxPool", _CEIL),  # ceil_mode is checked first
    "test_maxpool_2d_dilations": ("MaxPool", r"attribute 'dilations' = \[2, 2\] is unsupported"),
    "test_maxpool_2d_ceil": ("MaxPool", _CEIL),
    "test_maxpool_2d_ceil_output_size_reduce_by_one": ("MaxPool", _CEIL),
    "test_maxpool_2d_same_upper": ("MaxPool", _AUTO_PAD),
    "test_maxpool_2d_same_lower": ("MaxPool", _AUTO_PAD),
    "test_maxpool_2d_precomputed_same_upper": ("MaxPool", _AUTO_PAD),
    # the second output (argmax indices) has no int8 chip representation
    "test_maxpool_with_argmax_2d_precomputed_pads": ("MaxPool", r"output 'Indices' is unsupported"),
    "test_maxpool_with_argmax_2d_precomputed_strides": ("MaxPool", r"output 'Indices' is unsupported"),
    "test_averagepool_1d_default": ("AveragePool", _NOT_2D),
    "test_averagepool_3d_default": ("AveragePool", _NOT_2D),
    "test_averagepool_3d_dilations_small": ("AveragePool", _CEIL),
    "test_averagepool_3d_dilations_large_count_include_pad_is_0_ceil_mode_is_True": ("AveragePool", _CEIL),
    "test_averagepool_3d_dilations_large_count_include_pad_is_1_ceil_mode_is_True": ("AveragePool", _CEIL),
    "test_averagepool_3d_dilations_large_count_include_pad_is_0_ceil_mode_is_False": ("AveragePool", _NOT_2D),
    "test_averagepool_3d_dilations_large_count_include_pad_is_1_ceil_mode_is_False": ("AveragePool", _NOT_2D),
    "test_averagepool_2d_dilations": ("AveragePool", _CEIL),  # ceil_mode = 1 and dilations 2: ceil_mode first
    "test_averagepool_2d_ceil": ("AveragePool", _CEIL),
    "test_averagepool_2d_ceil_last_window_starts_on_pad": ("AveragePool", _CEIL),
    "test_averagepool_2d_same_upper": ("AveragePool", _AUTO_PAD),
    "test_averagepool_2d_same_lower": ("AveragePool", _AUTO_PAD),
    "test_averagepool_2d_precomputed_same_upper": ("AveragePool", _AUTO_PAD),
    # border windows would divide by their own (smaller) sizes: not one multiplier per channel
    "test_averagepool_2d_pads": ("AveragePool", _EXCLUDE_PAD),
    "test_averagepool_2d_precomputed_pads": ("AveragePool", _EXCLUDE_PAD),
}

# case -> why it is not run. Empty: every case of OPS currently runs or is rejected with a message. Put a
# case here only with a reason that is not a compiler limitation the compiler itself reports (those belong
# in REJECTED), e.g. an output whose values cannot be represented in int8.
SKIPPED: dict[str, str] = {}


# --------------------------------------------------------------------------------------------------
# the cases
# --------------------------------------------------------------------------------------------------
def _all_cases() -> list:
    from onnx.backend.test.case.node import collect_testcases
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some unrelated generators overflow casts on purpose
        return collect_testcases()  # every node case of every op: the generators run once, a few seconds


_ALL_CASES = _all_cases()


def _collect(ops) -> dict[str, object]:
    """name -> onnx TestCase for every case of ``ops`` (all opset variants the generators write)."""
    found = {}
    for case in _ALL_CASES:
        if {node.op_type for node in case.model.graph.node} & set(ops):
            assert len(case.model.graph.node) == 1, f"{case.name}: expected a single-node case"
            found[case.name] = case
    return found


CASES = _collect(OPS)
#: the QOperator cases compiler/qoperator.py rewrites (QLinearMatMul is outside OPS: rewrite tests only)
QOPERATOR_CASES = _collect(("QLinearConv", "QLinearMatMul"))
CLASSIFIED = [RUN_EXACT, RUN_FLOAT, set(REJECTED), set(SKIPPED)]


def test_every_case_is_classified():
    """Each case of OPS is in exactly one table, and every table names only existing cases (no stale entries)."""
    names = set(CASES)
    for table in CLASSIFIED:
        stale = set(table) - names
        assert not stale, f"tables name cases that onnx no longer generates: {sorted(stale)}"
    counts = {name: sum(name in table for table in CLASSIFIED) for name in names}
    unclassified = sorted(n for n, c in counts.items() if c == 0)
    twice = sorted(n for n, c in counts.items() if c > 1)
    assert not unclassified, f"cases of {OPS} in no table (classify them): {unclassified}"
    assert not twice, f"cases in more than one table: {twice}"
    assert {_op(CASES[n]) for n in names} == set(OPS), "every op should have at least one case"


def test_skip_table_names_existing_cases_with_reasons():
    assert set(SKIPPED) <= set(CASES), f"stale skip entries: {sorted(set(SKIPPED) - set(CASES))}"
    assert all(reason.strip() for reason in SKIPPED.values())


def _op(case) -> str:
    return case.model.graph.node[0].op_type


def _arrays(case):
    (inputs, outputs), = case.data_sets
    return [np.asarray(a) for a in inputs], [np.asarray(a) for a in outputs]


# --------------------------------------------------------------------------------------------------
# building the flowtile model of a case
# --------------------------------------------------------------------------------------------------
def _bind_constants(model: onnx.ModelProto, inputs: list[np.ndarray]) -> onnx.ModelProto:
    """Every graph input but the first becomes an initializer holding the case's value."""
    model = _copy(model)
    graph = model.graph
    keep = [graph.input[0]]
    for value_info, array in zip(list(graph.input)[1:], inputs[1:]):
        graph.initializer.append(numpy_helper.from_array(array, value_info.name))
    del graph.input[:]
    graph.input.extend(keep)
    return model


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _with_float_io(model: onnx.ModelProto, x_q: tuple[float, np.ndarray], y_q: tuple[float, np.ndarray]):
    """``x_float -> QuantizeLinear(x_q) -> x -> ... -> y -> DequantizeLinear(y_q) -> y_float`` around an integer
    model (one input, one output); scales are float32 scalars, zero points scalars of the tensors' types."""
    model = _copy(model)
    graph = model.graph
    x, y = graph.input[0], graph.output[0]
    x_float, y_float = onnx.ValueInfoProto(), onnx.ValueInfoProto()
    for float_info, info, name in ((x_float, x, "x_float"), (y_float, y, "y_float")):
        float_info.CopyFrom(info)  # same shape, symbolic batch included
        float_info.name = name
        float_info.type.tensor_type.elem_type = TensorProto.FLOAT
    graph.initializer.extend([
        numpy_helper.from_array(np.float32(x_q[0]), "harness_x_scale"),
        numpy_helper.from_array(np.asarray(x_q[1]).reshape(()), "harness_x_zero_point"),
        numpy_helper.from_array(np.float32(y_q[0]), "harness_y_scale"),
        numpy_helper.from_array(np.asarray(y_q[1]).reshape(()), "harness_y_zero_point")])
    quantize = helper.make_node("QuantizeLinear", ["x_float", "harness_x_scale", "harness_x_zero_point"], [x.name],
                                name="harness_quantize_x")
    dequantize = helper.make_node("DequantizeLinear", [y.name, "harness_y_scale", "harness_y_zero_point"],
                                  ["y_float"], name="harness_dequantize_y")
    nodes = [quantize] + list(graph.node) + [dequantize]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.input[:]
    graph.input.append(x_float)
    del graph.output[:]
    graph.output.append(y_float)
    return model


def _qlinearconv_for_convinteger(case) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """ConvInteger(x, w, z_x, z_w) as QLinearConv(x, 1, z_x, w, 1, z_w, 1, z_y) with the same attributes and an
    output of x's type (onnxruntime's QLinearConv wants that), z_y its middle (int8 0 / uint8 128): returns
    (model, z_x, z_y)."""
    node = case.model.graph.node[0]
    inputs, outputs = _arrays(case)
    named = dict(zip([n for n in node.input if n], inputs))
    x, w = inputs[0], inputs[1]
    optional = list(node.input[2:]) + ["", ""]
    x_zp = np.asarray(named[optional[0]] if optional[0] else np.zeros((), x.dtype)).reshape(())
    w_zp = np.asarray(named[optional[1]] if optional[1] else np.zeros((), w.dtype))
    y_zp = np.array(128 if x.dtype == np.uint8 else 0, x.dtype)
    inits = {"w": w, "one": np.float32(1.0), "x_zero_point": x_zp, "w_zero_point": w_zp, "y_zero_point": y_zp}
    qnode = helper.make_node("QLinearConv", ["x", "one", "x_zero_point", "w", "one", "w_zero_point", "one",
                                             "y_zero_point"], ["y"], name="convinteger_as_qlinearconv",
                             **{a.name: helper.get_attribute_value(a) for a in node.attribute})
    x_type = helper.np_dtype_to_tensor_dtype(x.dtype)
    graph = helper.make_graph([qnode], case.name, [helper.make_tensor_value_info("x", x_type, list(x.shape))],
                              [helper.make_tensor_value_info("y", x_type, list(outputs[0].shape))],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 10)])
    model.ir_version = 7
    return model, x_zp, y_zp


def _integer_model(case):
    """(float-I/O model, x (scale, zero point), y (scale, zero point), expected integers, offset) of an integer
    case; the chip's output integers minus ``offset`` must equal the expected ones."""
    inputs, outputs = _arrays(case)
    expected = outputs[0]
    op = _op(case)
    if op == "QLinearConv":
        x_q, y_q = (inputs[1], inputs[2]), (inputs[6], inputs[7])
        return _with_float_io(_bind_constants(case.model, inputs), x_q, y_q), x_q, y_q, expected, 0
    if op == "ConvInteger":
        # the substitute is exact only where every output fits the 8-bit output: the condition for running
        assert expected.min() >= -128 and expected.max() <= 127, f"{case.name}: outputs exceed int8"
        model, x_zp, y_zp = _qlinearconv_for_convinteger(case)
        substitute = ort_session(model).run(None, {"x": inputs[0]})[0].astype(np.int64) - int(y_zp)
        np.testing.assert_array_equal(substitute, expected, err_msg="the QLinearConv substitute differs under onnxruntime")
        x_q, y_q = (np.float32(1.0), x_zp), (np.float32(1.0), y_zp)
        return _with_float_io(model, x_q, y_q), x_q, y_q, expected, int(y_zp)
    if op == "MaxPool":
        zero = np.zeros((), inputs[0].dtype)
        return _with_float_io(case.model, (1.0, zero), (1.0, zero)), (1.0, zero), (1.0, zero), expected, 0
    raise AssertionError(f"{case.name}: no integer mapping for {op}")


def _pool_reads_quantized(model: onnx.ModelProto) -> bool:
    producers = {out: node.op_type for node in model.graph.node for out in node.output}
    pools = [n for n in model.graph.node if n.op_type in ("MaxPool", "AveragePool", "GlobalAveragePool")]
    return all(producers.get(pool.input[0]) == "DequantizeLinear" for pool in pools)


def _float_qdq_model(case) -> onnx.ModelProto:
    """The compiler's float path, which must quantize a pool reading the float graph input too."""
    x = _arrays(case)[0][0]
    qdq = quantize_float_model(case.model, calibration=x)
    assert _pool_reads_quantized(qdq), f"{case.name}: the quantized model still has a float pool"
    return qdq


def _compile(model: onnx.ModelProto):
    """compile_model on the first of GRIDS the model fits."""
    for arch in GRIDS:
        try:
            return compile_model(model, arch)
        except CompileError as error:
            if "does not fit" not in str(error) or arch is GRIDS[-1]:
                raise


def _compile_case(case):
    """The case's flowtile program (or CompileError)."""
    if _arrays(case)[0][0].dtype == np.float32:
        return _compile(_float_qdq_model(case))
    return _compile(_integer_model(case)[0])


# --------------------------------------------------------------------------------------------------
# running on the emulator
# --------------------------------------------------------------------------------------------------
_INT_RANGE = {"uint8": (0, 255), "int8": (-128, 127)}


def _emulate_integers(program, x: np.ndarray) -> np.ndarray:
    """Integer input (the spec's type) -> the chip's output integers (the spec's type), no float round trip."""
    spec = program.input
    q = x.astype(np.int16).reshape(x.shape[0], -1) - (128 if spec.dtype == "uint8" else 0)
    result = emulate(program, pack_flits(q.astype(np.int8), program.arch.lanes, spec), x.shape[0])
    out = unpack_flits(result.out_flits, x.shape[0], program.output.length, program.output).astype(np.int64)
    return (out + (128 if program.output.dtype == "uint8" else 0)).reshape((x.shape[0],) + tuple(program.output.shape))


def _emulate_float(program, x: np.ndarray) -> np.ndarray:
    _q, flits = input_flits(program, x)
    result = emulate(program, flits, x.shape[0])
    return outputs_from_flits(program, result.out_flits, x.shape[0])[1]


def _float_tolerance(case, program) -> float:
    """Bound on |flowtile - expected| for a float case, from the input and output scales s_x, s_y.

    * input quantization: each input is rounded to the nearest of s_x-spaced levels, |error| <= s_x / 2
      (calibrated on this very input, so nothing saturates beyond that half step); a max or an average of such
      values is off by at most s_x / 2 as well (zero padding of count_include_pad is exactly the zero point).
    * MaxPool: max commutes with the monotonic quantization and the output keeps the input's scale and zero
      point (the compiler checks it), so nothing more: bound s_x / 2.
    * Average pools: the output is requantized once more, rounding half to even with the 31-bit multiplier
      M / 2^S ~= s_x / (KH*KW*s_y): the rounding is <= s_y / 2 and the multiplier's relative error (<= 2^-31)
      can at most push a value across one rounding boundary, so together <= 1 output LSB s_y (this also covers
      a value at the calibrated range's edge that saturates by up to s_y / 2): bound s_x / 2 + s_y.
    On top, 4 float32 ulps of the largest expected magnitude: the host's float32 division and the float32
    dequantization ``(q - z) * s`` each round once (the MaxPool cases reach their bound exactly: an input lies
    on a rounding tie).
    """
    s_x, s_y = program.input.scale, program.output.scale
    bound = s_x / 2 if _op(case) == "MaxPool" else s_x / 2 + s_y
    largest = float(np.max(np.abs(_arrays(case)[1][0])))
    return bound + 4 * float(np.finfo(np.float32).eps) * max(largest, bound)


# --------------------------------------------------------------------------------------------------
# the per-case test
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CASES))
def test_node_case(name):
    case = CASES[name]
    if name in SKIPPED:
        pytest.skip(SKIPPED[name])
    if name in REJECTED:
        op, pattern = REJECTED[name]
        with pytest.raises(CompileError) as caught:
            _compile_case(case)
        message = str(caught.value)
        assert "\n" not in message, f"not one line: {message!r}"
        assert f"({op})" in message and re.search(r"node '[^']+'", message), f"does not name node and op: {message}"
        assert re.search(pattern, message), f"does not name the attribute ({pattern}): {message}"
        return
    if name in RUN_EXACT:
        _run_exact(case)
    elif name in RUN_FLOAT:
        _run_float(case)
    else:
        pytest.fail(f"{name} is in no table (see test_every_case_is_classified)")


def _run_exact(case):
    model, x_q, y_q, expected, offset = _integer_model(case)
    program = _compile(model)
    # the program's host tensors carry the case's quantization, so the integers mean what the case means
    for spec, (scale, zero_point) in ((program.input, x_q), (program.output, y_q)):
        assert spec.scale == pytest.approx(float(scale), rel=1e-7) and spec.zero_point == int(zero_point)
        assert spec.dtype == np.asarray(zero_point).dtype.name
    x = _arrays(case)[0][0]
    got = _emulate_integers(program, x) - offset
    assert got.shape == expected.shape
    # QLinearConv requantizes with M / 2^S ~= s_x s_w / s_y (31-bit M, round half to even); onnxruntime and the
    # reference use the float product. Those can differ by 1 LSB only where the exact value is within ~2^-31
    # relative of a rounding tie. Such a difference would be allowed (<= 1 LSB, counted below) for QLinearConv;
    # on this case (s_x s_w / s_y ~= 1/255 and the weight -255: y = 255 - x) there is none, and the other
    # integer cases (max pooling, unit scales) are exact by construction.
    diff = np.abs(got - expected.astype(np.int64))
    n_diff = int(np.count_nonzero(diff))
    if _op(case) == "QLinearConv":
        assert diff.max() <= 1, f"{case.name}: max |diff| {diff.max()} LSB ({n_diff} of {diff.size} values differ)"
        assert n_diff == 0, f"{case.name}: {n_diff} of {diff.size} values differ by 1 LSB (multiplier approximation)"
    else:
        assert n_diff == 0, f"{case.name}: {n_diff} of {diff.size} values differ, max |diff| {diff.max()}"


def _run_float(case):
    program = _compile_case(case)
    x, expected = _arrays(case)[0][0], _arrays(case)[1][0]
    got = _emulate_float(program, x)
    assert got.shape == expected.shape
    tolerance = _float_tolerance(case, program)
    error = np.abs(got.astype(np.float64) - expected.astype(np.float64))
    assert error.max() <= tolerance, (f"{case.name}: max |error| {error.max():.6g} > bound {tolerance:.6g} "
                                      f"(s_x {program.input.scale:.6g}, s_y {program.output.scale:.6g}; "
                                      f"{int(np.sum(error > tolerance))} of {error.size} values beyond)")


# --------------------------------------------------------------------------------------------------
# compiler/qoperator.py: the rewritten model computes what the QOperator model computes (onnxruntime,
# graph optimizations disabled, flowtile.oracle.ort_session)
# --------------------------------------------------------------------------------------------------
def _ort(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    return ort_session(model).run(None, feeds)[0]


def _ops(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


@pytest.mark.parametrize("name", sorted(QOPERATOR_CASES))
def test_qoperator_rewrite_of_onnx_cases(name):
    """ONNX's QLinearConv / QLinearMatMul cases as they are (scales and zero points are graph inputs, float16
    scales in some): the rewrite equals the original and the expected output."""
    case = QOPERATOR_CASES[name]
    inputs, outputs = _arrays(case)
    feeds = {v.name: a for v, a in zip(case.model.graph.input, inputs)}
    rewritten = qoperator_to_qdq(case.model)
    assert not {"QLinearConv", "QLinearMatMul"} & set(_ops(rewritten))
    assert {"DequantizeLinear", "QuantizeLinear"} <= set(_ops(rewritten))
    got = _ort(rewritten, feeds)
    np.testing.assert_array_equal(got, _ort(case.model, feeds))
    np.testing.assert_array_equal(got, outputs[0])


def _random_qlinearconv(rng, *, x_type=np.uint8, w_type=np.int8, per_channel=True, bias=True, opset=13,
                        channels=3, outputs=4, kernel=3, pads=1, stride=1, group=1, weight=None, bias_values=None,
                        w_zero_point=None, name="qc"):
    """A QLinearConv model with constant parameters and an integer graph input ``x`` [N, C, 6, 6]."""
    lo, hi = (0, 256) if x_type == np.uint8 else (-128, 128)
    m_shape = (outputs,) if per_channel else ()
    params = {
        "x_scale": np.float32(rng.uniform(0.005, 0.05)),
        "x_zero_point": np.array(rng.integers(lo, hi), x_type),
        "w": weight if weight is not None else rng.integers(*((0, 256) if w_type == np.uint8 else (-128, 128)),
                                                           (outputs, channels // group, kernel, kernel)).astype(w_type),
        "w_scale": rng.uniform(0.002, 0.02, m_shape).astype(np.float32),
        "w_zero_point": (w_zero_point if w_zero_point is not None
                         else np.full(m_shape, 128 if w_type == np.uint8 else 0, w_type)),
        "y_scale": np.float32(rng.uniform(0.02, 0.2)),
        "y_zero_point": np.array(rng.integers(lo, hi), x_type),
    }
    if bias:
        params["B"] = bias_values if bias_values is not None else rng.integers(-3000, 3000, outputs).astype(np.int32)
    node = helper.make_node("QLinearConv", ["x"] + list(params), ["y"], name=name, pads=[pads] * 4,
                            strides=[stride] * 2, group=group, kernel_shape=[kernel, kernel])
    x_type_proto = helper.np_dtype_to_tensor_dtype(np.dtype(x_type))
    out = (6 + 2 * pads - kernel) // stride + 1
    graph = helper.make_graph([node], name, [helper.make_tensor_value_info("x", x_type_proto, ["N", channels, 6, 6])],
                              [helper.make_tensor_value_info("y", x_type_proto, ["N", outputs, out, out])],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in params.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7 if opset < 15 else 8
    return model, params


def _random_x(rng, model, batch=2):
    value_info = model.graph.input[0]
    dtype = helper.tensor_dtype_to_np_dtype(value_info.type.tensor_type.elem_type)
    shape = [batch] + [d.dim_value for d in value_info.type.tensor_type.shape.dim[1:]]
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max + 1, shape).astype(dtype)


_CONV_VARIANTS = {
    "uint8_x_int8_w_per_channel_bias_opset13": {},
    "uint8_x_uint8_w_per_tensor_opset10": dict(w_type=np.uint8, per_channel=False, bias=False, opset=10),
    "int8_x_int8_w_stride2_opset10": dict(x_type=np.int8, stride=2, opset=10),
    "uint8_w_zero_point_100_opset21": dict(w_type=np.uint8, opset=21, w_zero_point=np.full((4,), 100, np.uint8)),
    "depthwise_5x5_pad2": dict(channels=4, group=4, kernel=5, pads=2),
}


@pytest.mark.parametrize("variant", sorted(_CONV_VARIANTS))
def test_qoperator_rewrite_random_qlinearconv(variant):
    rng = np.random.default_rng(sorted(_CONV_VARIANTS).index(variant))
    model, params = _random_qlinearconv(rng, **_CONV_VARIANTS[variant])
    rewritten = qoperator_to_qdq(model)
    assert _ops(rewritten).count("Conv") == 1 and "QLinearConv" not in _ops(rewritten)
    conv = next(n for n in rewritten.graph.node if n.op_type == "Conv")
    assert conv.name == "qc", "Conv keeps the QLinearConv's name, so the importer's messages name it"
    for _ in range(3):
        x = _random_x(rng, model)
        np.testing.assert_array_equal(_ort(rewritten, {"x": x}), _ort(model, {"x": x}))


def _weight_dequantize(model: onnx.ModelProto, consumer: str) -> tuple[np.ndarray, np.ndarray, bool]:
    """(quantized weight, scale, has a zero point) of the DequantizeLinear feeding input 1 of ``consumer``."""
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producers = {out: n for n in model.graph.node for out in n.output}
    node = next(n for n in model.graph.node if n.op_type == consumer)
    dq = producers[node.input[1]]
    return consts[dq.input[0]], consts[dq.input[1]], len(dq.input) > 2 and bool(dq.input[2])


def test_qoperator_weights_become_symmetric_int8():
    """uint8 weights with zero point 128 become int8 w - 128 (exact, same scale); weights whose w - w_zp exceeds
    int8 but share a factor g (and so does the bias) become (w - w_zp) / g at scale g * w_s."""
    rng = np.random.default_rng(7)
    model, params = _random_qlinearconv(rng, w_type=np.uint8)
    q, scale, has_zp = _weight_dequantize(qoperator_to_qdq(model), "Conv")
    assert q.dtype == np.int8 and not has_zp
    np.testing.assert_array_equal(q.astype(np.int64), params["w"].astype(np.int64) - 128)
    np.testing.assert_allclose(scale, params["w_scale"], rtol=0)

    k = rng.integers(-20, 66, (4, 3, 3, 3))
    weight = (3 * k + 60).astype(np.uint8)  # w - 60 = 3k in [-60, 195]: beyond int8 where k > 42, factor 3
    bias = (3 * rng.integers(-1000, 1000, 4)).astype(np.int32)
    model, params = _random_qlinearconv(rng, w_type=np.uint8, weight=weight, bias_values=bias,
                                        w_zero_point=np.full((4,), 60, np.uint8))
    rewritten = qoperator_to_qdq(model)
    q, scale, has_zp = _weight_dequantize(rewritten, "Conv")
    assert q.dtype == np.int8 and not has_zp
    factors = np.abs(weight.astype(np.int64) - 60).reshape(4, -1).max(axis=1) > 127
    np.testing.assert_array_equal(q.astype(np.int64).reshape(4, -1) * np.where(factors, 3, 1)[:, None],
                                  (weight.astype(np.int64) - 60).reshape(4, -1))
    np.testing.assert_allclose(scale, params["w_scale"] * np.where(factors, 3, 1), rtol=1e-7)
    for _ in range(3):
        x = _random_x(rng, model)
        np.testing.assert_array_equal(_ort(rewritten, {"x": x}), _ort(model, {"x": x}))


def test_symmetric_int8():
    cases = [  # (q, zero point, bias) -> (values, factors, bias / g) or None
        (np.array([[0]], np.uint8), np.array([255], np.uint8), None, ([[-85]], [3], None)),
        (np.array([[1, 1], [1, 1]], np.uint8), np.array([0, 1], np.uint8), None, ([[1, 1], [0, 0]], [1, 1], None)),
        (np.array([[0], [254]], np.uint8), np.zeros((), np.uint8), None, ([[0], [127]], [1, 2], None)),
        (np.array([[0], [255]], np.uint8), np.zeros((), np.uint8), np.array([3, 5]), ([[0], [51]], [1, 5], [3, 1])),
    ]
    for q, zp, bias, expected in cases:
        values, factors, new_bias = symmetric_int8(q, zp, 0, bias)
        assert values.dtype == np.int8
        np.testing.assert_array_equal(values, expected[0])
        np.testing.assert_array_equal(factors, expected[1])
        assert (new_bias is None) == (expected[2] is None)
        if new_bias is not None:
            np.testing.assert_array_equal(new_bias, expected[2])
    # 255 - 0 = 255 and 1 - 0 = 1 share no factor: not representable
    assert symmetric_int8(np.array([[255, 1]], np.uint8), np.zeros((), np.uint8), 0) is None
    # the bias must share the factor too (5 does not divide 7)
    assert symmetric_int8(np.array([[0], [255]], np.uint8), np.zeros((), np.uint8), 0, np.array([0, 7])) is None


def test_qoperator_rewrite_random_qlinearmatmul():
    """Constant int8 weights [K, N] with per-column scales (a Gemm-like layer) and a batch of uint8 rows."""
    rng = np.random.default_rng(11)
    params = {"a_scale": np.float32(0.02), "a_zero_point": np.uint8(121),
              "b": rng.integers(-128, 128, (16, 5)).astype(np.int8),
              "b_scale": rng.uniform(0.002, 0.02, 5).astype(np.float32), "b_zero_point": np.zeros(5, np.int8),
              "y_scale": np.float32(0.1), "y_zero_point": np.uint8(130)}
    node = helper.make_node("QLinearMatMul", ["a"] + list(params), ["y"], name="qmm")
    graph = helper.make_graph([node], "qmm", [helper.make_tensor_value_info("a", TensorProto.UINT8, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, ["N", 5])],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in params.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 10)])
    model.ir_version = 7
    rewritten = qoperator_to_qdq(model)
    assert "MatMul" in _ops(rewritten) and "QLinearMatMul" not in _ops(rewritten)
    for _ in range(3):
        a = rng.integers(0, 256, (4, 16)).astype(np.uint8)
        np.testing.assert_array_equal(_ort(rewritten, {"a": a}), _ort(model, {"a": a}))
    # and flowtile runs it as a dense layer, within the 1 LSB it promises against onnxruntime
    program = compile_model(_with_float_io(model, (params["a_scale"], params["a_zero_point"]),
                                           (params["y_scale"], params["y_zero_point"])), GRIDS[0])
    a = rng.integers(0, 256, (8, 16)).astype(np.uint8)
    diff = np.abs(_emulate_integers(program, a) - _ort(model, {"a": a}).astype(np.int64))
    assert diff.max() <= 1, f"max |diff| {diff.max()} LSB ({np.count_nonzero(diff)} of {diff.size} values)"


def test_qoperator_integer_maxpool():
    """MaxPool on a QuantizeLinear's uint8 output (QOperator style) becomes DQ -> MaxPool -> Q, same integers."""
    rng = np.random.default_rng(3)
    model, _ = _random_qlinearconv(rng, bias=False)
    graph = model.graph
    graph.node.append(helper.make_node("MaxPool", ["y"], ["pooled"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                                       strides=[2, 2], name="pool"))
    graph.output[0].CopyFrom(helper.make_tensor_value_info("pooled", TensorProto.UINT8, ["N", 4, 3, 3]))
    rewritten = qoperator_to_qdq(model)
    assert _ops(rewritten)[-3:] == ["DequantizeLinear", "MaxPool", "QuantizeLinear"]
    for _ in range(3):
        x = _random_x(rng, model)
        np.testing.assert_array_equal(_ort(rewritten, {"x": x}), _ort(model, {"x": x}))


def test_qoperator_leaves_other_models_alone():
    """QDQ and float models (and a MaxPool on floats) come back as the very same object."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 2, 2])
    pools = [helper.make_node("MaxPool", ["x"], ["m"], kernel_shape=[2, 2]),
             helper.make_node("MaxPool", ["m"], ["y"], kernel_shape=[2, 2], strides=[1, 1])]
    float_model = helper.make_model(helper.make_graph(pools, "pools", [x], [y]))
    assert qoperator_to_qdq(float_model) is float_model
    qdq = _float_qdq_model(CASES["test_maxpool_2d_precomputed_strides"])
    assert qoperator_to_qdq(qdq) is qdq


def test_qlinearconv_compiles_bit_exact_against_onnxruntime():
    """A random QLinearConv (per-channel weights, bias, padding) through the compiler and the emulator: within
    the 1 LSB that section 8 allows against onnxruntime's QLinearConv (31-bit multiplier vs float scale)."""
    rng = np.random.default_rng(5)
    model, params = _random_qlinearconv(rng)
    program = compile_model(_with_float_io(model, (params["x_scale"], params["x_zero_point"]),
                                           (params["y_scale"], params["y_zero_point"])), GRIDS[0])
    x = _random_x(rng, model, batch=4)
    diff = np.abs(_emulate_integers(program, x) - _ort(model, {"x": x}).astype(np.int64))
    assert diff.max() <= 1, f"max |diff| {diff.max()} LSB ({np.count_nonzero(diff)} of {diff.size} values)"


@pytest.mark.parametrize("change", [
    dict(kernel=9, pads=4),                              # a 9x9 window on the 6x6 map: most positions padded
    dict(kernel=6, pads=5, stride=3, x_type=np.int8),    # the whole map, pads up to kernel - 1
    dict(channels=4, group=4, outputs=4, kernel=6, pads=0),   # depthwise over the whole map (op LANE)
], ids=["9x9-pad4", "6x6-pad5-stride3", "depthwise-6x6"])
def test_qlinearconv_with_windows_as_large_as_the_map(change):
    """Kernels beyond the former 1..7 and pads beyond kernel // 2 (up to kernel - 1): within 1 LSB of onnxruntime."""
    rng = np.random.default_rng(6)
    model, params = _random_qlinearconv(rng, **change)
    program = compile_model(_with_float_io(model, (params["x_scale"], params["x_zero_point"]),
                                           (params["y_scale"], params["y_zero_point"])), GRIDS[0], pack_input=False)
    windows = {(t.config.kernel_h, t.config.kernel_w, t.config.pad_left) for t in program.tiles if t.config.n_out}
    assert windows == {(change["kernel"], change["kernel"], change["pads"])}
    x = _random_x(rng, model, batch=4)
    diff = np.abs(_emulate_integers(program, x) - _ort(model, {"x": x}).astype(np.int64))
    assert diff.max() <= 1, f"max |diff| {diff.max()} LSB ({np.count_nonzero(diff)} of {diff.size} values)"


@pytest.mark.parametrize("change, pattern", [
    (dict(weight=np.array([0, 1] * 54, np.uint8).reshape(4, 3, 3, 3), w_type=np.uint8,
          w_zero_point=np.full((4,), 255, np.uint8)), r"node 'qc/dequantize_w' \(DequantizeLinear\): non-zero weight "
                                                       r"zero point 127"),
    (dict(dilations=True), r"node 'qc' \(Conv\): attribute 'dilations' = \[2, 2\] is unsupported"),
])
def test_qlinearconv_rejections_name_the_node(change, pattern):
    """What the chip cannot run is rejected in one line naming the original node: an asymmetric weight with no
    exact int8 form (w - 255 is -255 or -254: no common factor), a dilated QLinearConv."""
    change = dict(change)
    dilated = change.pop("dilations", False)
    model, params = _random_qlinearconv(np.random.default_rng(0), **change)
    if dilated:
        model.graph.node[0].attribute.append(helper.make_attribute("dilations", [2, 2]))
        model.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.UINT8, ["N", 4, 4, 4]))
    wrapped = _with_float_io(model, (params["x_scale"], params["x_zero_point"]),
                             (params["y_scale"], params["y_zero_point"]))
    with pytest.raises(CompileError) as caught:
        compile_model(wrapped, GRIDS[0])
    assert "\n" not in str(caught.value) and re.search(pattern, str(caught.value)), str(caught.value)
