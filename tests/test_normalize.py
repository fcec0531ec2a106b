"""compiler/normalize.py: the graph forms real exporters write, rewritten before matching.

One small hand-built model per rule (onnx.helper). Each is checked twice:

* the rewrite is exact: the normalized float model computes what the model as written computes (onnxruntime,
  graph optimizations off; a fixed-batch model run one sample at a time);
* it compiles (:func:`flowtile.compiler.compile_model`) and the emulator's outputs are within 1 LSB of
  onnxruntime's run of the same int8 model (the contract of tests/test_differential.py).

Plus the rejections: what a rule recognizes but cannot rewrite still ends in one line naming node, op and
attribute.
"""
from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from flowtile.testing.archs import lean_arch
from flowtile.compiler import CompileError, compile_model, int8_model
from flowtile.compiler.normalize import RULES, TARGET_OPSET, normalize
from flowtile.oracle import ort_session
from flowtile.testing.oracle_checks import assert_emulator_matches_onnxruntime

ARCH = lean_arch()
C, H, W = 2, 8, 8  # the test input map
N_OUT = 3


# ---------------------------------------------------------------------------------------------------
# building and checking models
# ---------------------------------------------------------------------------------------------------
def _const(rng, *shape, scale=0.4) -> np.ndarray:
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def make(nodes, inits: dict, *, x_shape=("N", C, H, W), opset=TARGET_OPSET, y_shape=(None, None)) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(y_shape))],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model_gen_version(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = max(model.ir_version, 4)  # IR 3 (opset < 8) would list the initializers as inputs
    onnx.checker.check_model(model)
    return model


def dense_tail(rng, inits: dict, source: str, n_in: int) -> list:
    """Flatten -> Gemm(n_in -> N_OUT) reading ``source``, writing ``y``."""
    inits.update(fc_w=_const(rng, N_OUT, n_in), fc_b=_const(rng, N_OUT))
    return [helper.make_node("Flatten", [source], ["flat"], name="flatten", axis=1),
            helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], name="fc", transB=1)]


def conv(rng, inits: dict, name: str, source: str, out: str, c_out=4, c_in=C, k=3, bias=True, **attrs):
    inits[f"{name}_w"] = _const(rng, c_out, c_in, k, k)
    inputs = [source, f"{name}_w"]
    if bias:
        inits[f"{name}_b"] = _const(rng, c_out, scale=0.1)
        inputs.append(f"{name}_b")
    attrs.setdefault("kernel_shape", [k, k])
    return helper.make_node("Conv", inputs, [out], name=name, **attrs)


def _ort_float(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort_session(model)
    name, batch = session.get_inputs()[0].name, session.get_inputs()[0].shape[0]
    step = batch if isinstance(batch, int) else len(x)
    return np.concatenate([session.run(None, {name: x[i:i + step]})[0] for i in range(0, len(x), step)])


def check(model: onnx.ModelProto, *, x_shape=(C, H, W), seed=0, batch=5, absent=(), present=()) -> onnx.ModelProto:
    """The checks of the module docstring; ``absent``/``present``: ops the normalized float graph must (not) have."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *x_shape)).astype(np.float32)
    normalized = normalize(model)
    ops = {node.op_type for node in normalized.graph.node}
    assert not ops & set(absent), f"still there: {ops & set(absent)}"
    assert set(present) <= ops, f"missing: {set(present) - ops}"
    expected, got = _ort_float(model, x), _ort_float(normalized, x)
    np.testing.assert_allclose(got.reshape(expected.shape), expected, rtol=1e-4, atol=1e-4)

    int8 = int8_model(model, rng.standard_normal((32, *x_shape)).astype(np.float32))
    assert_emulator_matches_onnxruntime(int8, compile_model(int8, ARCH), x)
    return normalized


def rejects(model: onnx.ModelProto, node: str, op: str, what: str) -> None:
    with pytest.raises(CompileError) as caught:
        int8_model(model, np.random.default_rng(0).standard_normal((8, C, H, W)).astype(np.float32))
    message = str(caught.value)
    assert "\n" not in message, message
    assert f"node '{node}' ({op})" in message and re.search(what, message), message


def test_every_rule_has_a_docstring_naming_its_exporter():
    for rule in RULES:
        doc = rule.apply.__doc__ or ""
        assert re.search(r"torch|CNTK|tf2onnx|keras|exporter", doc), rule.apply.__name__


# ---------------------------------------------------------------------------------------------------
# auto_pad -> explicit pads
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,k,stride", [("SAME_UPPER", 3, 1), ("SAME_UPPER", 5, 2), ("SAME_LOWER", 3, 1),
                                           ("SAME_UPPER", 2, 1), ("VALID", 3, 1)])
def test_conv_auto_pad(mode, k, stride):
    rng = np.random.default_rng(1)
    inits = {}
    out = {"VALID": (H - k) // stride + 1}.get(mode, -(-H // stride))
    nodes = [conv(rng, inits, "conv", "x", "c", k=k, auto_pad=mode, strides=[stride, stride]),
             helper.make_node("Relu", ["c"], ["r"], name="relu")] + dense_tail(rng, inits, "r", 4 * out * out)
    normalized = check(make(nodes, inits))
    attrs = {a.name: helper.get_attribute_value(a) for a in normalized.graph.node[0].attribute}
    assert "auto_pad" not in attrs and len(attrs["pads"]) == 4


@pytest.mark.parametrize("op", ["MaxPool", "AveragePool"])
def test_pool_auto_pad_same_upper(op):
    rng = np.random.default_rng(2)
    inits = {}
    extra = {"count_include_pad": 1} if op == "AveragePool" else {}
    nodes = [conv(rng, inits, "conv", "x", "c", pads=[1, 1, 1, 1]),
             helper.make_node(op, ["c"], ["p"], name="pool", kernel_shape=[3, 3], strides=[2, 2],
                              auto_pad="SAME_UPPER", **extra)] + dense_tail(rng, inits, "p", 4 * 4 * 4)
    check(make(nodes, inits))


# ---------------------------------------------------------------------------------------------------
# bias Adds, BatchNormalization, weight Transposes
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias_shape", [(4, 1, 1), (1, 4, 1, 1)])
def test_conv_bias_add_is_folded(bias_shape):
    """CNTK's form (mnist-8): Conv without bias -> Add(B [C, 1, 1])."""
    rng = np.random.default_rng(3)
    inits = {"add_b": _const(rng, *bias_shape)}
    nodes = [conv(rng, inits, "conv", "x", "c", bias=False, pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c", "add_b"], ["a"], name="add"),
             helper.make_node("Relu", ["a"], ["r"], name="relu")] + dense_tail(rng, inits, "r", 4 * H * W)
    check(make(nodes, inits), absent={"Add"})


def test_gemm_and_matmul_bias_adds_are_folded():
    rng = np.random.default_rng(4)
    inits = {"w1": _const(rng, 16, 8), "b1": _const(rng, 8), "w2": _const(rng, 8, 3), "b2": _const(rng, 1, 3)}
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["g"], name="fc1"),
             helper.make_node("Add", ["g", "b1"], ["a"], name="add1"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["m"], name="fc2"),
             helper.make_node("Add", ["m", "b2"], ["y"], name="add2")]
    check(make(nodes, inits, x_shape=("N", 16)), x_shape=(16,), absent={"Add"})


def test_batchnorm_after_conv_is_folded():
    """torch's TorchScript exporter with constant folding off (training-mode export) keeps BatchNormalization."""
    rng = np.random.default_rng(5)
    inits = {"scale": 1 + _const(rng, 4, scale=0.2), "shift": _const(rng, 4), "mean": _const(rng, 4),
             "var": (0.5 + rng.random(4)).astype(np.float32)}
    nodes = [conv(rng, inits, "conv", "x", "c", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["bn"], name="bn",
                              epsilon=1e-5),
             helper.make_node("Relu", ["bn"], ["r"], name="relu")] + dense_tail(rng, inits, "r", 4 * H * W)
    check(make(nodes, inits), absent={"BatchNormalization"})


def test_batchnorm_after_gemm_and_matmul_is_folded():
    """torch's ``nn.Linear -> nn.BatchNorm1d`` on vectors ``[N, C]`` (onnxruntime folds only Conv+BN): a Gemm with
    transB, alpha and beta, and a 2-D MatMul whose BatchNormalization writes the graph output."""
    rng = np.random.default_rng(51)

    def bn_params(prefix, n):
        return {f"{prefix}_s": 1 + _const(rng, n, scale=0.3), f"{prefix}_b": _const(rng, n),
                f"{prefix}_m": _const(rng, n), f"{prefix}_v": (0.5 + rng.random(n)).astype(np.float32)}

    inits = {"w1": _const(rng, 8, 16), "b1": _const(rng, 8), "w2": _const(rng, 8, 5), **bn_params("bn1", 8),
             **bn_params("bn2", 5)}
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["g"], name="fc1", transB=1, alpha=0.8, beta=1.5),
             helper.make_node("BatchNormalization", ["g", "bn1_s", "bn1_b", "bn1_m", "bn1_v"], ["bn1"], name="bn1",
                              epsilon=1e-3),
             helper.make_node("Relu", ["bn1"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["m"], name="fc2"),
             helper.make_node("BatchNormalization", ["m", "bn2_s", "bn2_b", "bn2_m", "bn2_v"], ["y"], name="bn2")]
    normalized = check(make(nodes, inits, x_shape=("N", 16)), x_shape=(16,), absent={"BatchNormalization"})
    assert [n.name for n in normalized.graph.node if n.op_type == "Gemm"] == ["fc1", "fc2"]


def test_batchnorm_after_a_forked_gemm_is_left_to_the_matcher():
    """A Gemm output read by the BatchNormalization and by something else cannot take the BN into its weights."""
    rng = np.random.default_rng(52)
    inits = {"w1": _const(rng, 8, 16), "s": np.ones(8, np.float32), "b": np.zeros(8, np.float32),
             "m": np.zeros(8, np.float32), "v": np.ones(8, np.float32)}
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["g"], name="fc1", transB=1),
             helper.make_node("BatchNormalization", ["g", "s", "b", "m", "v"], ["bn"], name="bn"),
             helper.make_node("Add", ["g", "bn"], ["y"], name="join")]
    normalized = normalize(make(nodes, inits, x_shape=("N", 16)))
    assert "BatchNormalization" in {n.op_type for n in normalized.graph.node}


def test_transposed_constant_weight_is_folded():
    """torch's nn.Linear as ``Transpose(W) -> MatMul -> Add`` (constant folding off)."""
    rng = np.random.default_rng(6)
    inits = {"w": _const(rng, 5, 12), "b": _const(rng, 5)}
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], name="wT", perm=[1, 0]),
             helper.make_node("MatMul", ["x", "wt"], ["m"], name="linear"),
             helper.make_node("Add", ["m", "b"], ["y"], name="bias")]
    check(make(nodes, inits, x_shape=("N", 12)), x_shape=(12,), absent={"Transpose"})


# ---------------------------------------------------------------------------------------------------
# flattens, fixed batches, pass-through nodes, ReduceMean
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target,allowzero,batch", [([1, 4 * H * W], 0, 1), ([0, -1], 0, "N"),
                                                    ([-1, 4 * H * W], 1, "N"), ([1, -1], 1, 1)])
def test_constant_reshape_is_a_flatten(target, allowzero, batch):
    """CNTK's ``Reshape([1, 256])`` with a traced batch of 1; torch dynamo's constant Reshape with allowzero=1."""
    rng = np.random.default_rng(7)
    inits = {"shape": np.array(target, np.int64), "fc_w": _const(rng, 4 * H * W, N_OUT), "fc_b": _const(rng, N_OUT)}
    nodes = [conv(rng, inits, "conv", "x", "c", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "shape"], ["flat"], name="reshape", allowzero=allowzero),
             helper.make_node("MatMul", ["flat", "fc_w"], ["m"], name="fc"),
             helper.make_node("Add", ["m", "fc_b"], ["y"], name="fc_bias")]
    normalized = check(make(nodes, inits, x_shape=(batch, C, H, W)), absent={"Reshape"})
    assert normalized.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # any batch


def test_torchscript_computed_reshape_is_a_flatten():
    """torch's TorchScript exporter: ``Shape -> Gather(0) -> Unsqueeze -> Concat([., -1]) -> Reshape``, traced
    with batch 1."""
    rng = np.random.default_rng(8)
    inits = {"zero": np.array(0, np.int64), "axes0": np.array([0], np.int64), "minus1": np.array([-1], np.int64)}
    nodes = [conv(rng, inits, "conv", "x", "c", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Shape", ["r"], ["s"], name="shape"),
             helper.make_node("Gather", ["s", "zero"], ["n"], name="gather", axis=0),
             helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"], name="unsqueeze"),
             helper.make_node("Concat", ["n1", "minus1"], ["target"], name="concat", axis=0),
             helper.make_node("Reshape", ["r", "target"], ["flat"], name="reshape")]
    inits.update(fc_w=_const(rng, N_OUT, 4 * H * W), fc_b=_const(rng, N_OUT))
    nodes.append(helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], name="fc", transB=1))
    check(make(nodes, inits, x_shape=(1, C, H, W)), absent={"Shape", "Gather", "Concat", "Reshape"})


def test_identity_dropout_and_same_type_cast_are_removed():
    rng = np.random.default_rng(9)
    inits = {}
    nodes = [helper.make_node("Identity", ["x"], ["xi"], name="identity_in"),
             conv(rng, inits, "conv", "xi", "c", pads=[1, 1, 1, 1]),
             helper.make_node("Cast", ["c"], ["cc"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Relu", ["cc"], ["r"], name="relu"),
             helper.make_node("Dropout", ["r"], ["d"], name="dropout")]
    nodes += dense_tail(rng, inits, "d", 4 * H * W)
    nodes[-1].output[0] = "g"
    nodes.append(helper.make_node("Identity", ["g"], ["y"], name="identity_out"))
    check(make(nodes, inits), absent={"Identity", "Dropout", "Cast"})


def _qdq(nodes, inits, opset: int, seed: int) -> onnx.ModelProto:
    """The float model of ``nodes`` quantized outside flowtile, as ``quantize_static`` writes it."""
    from flowtile.testing.random_models import quantize_qdq
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(make(nodes, inits, opset=opset), Path(tmp) / "float.onnx")
        path = quantize_qdq(Path(tmp) / "float.onnx", Path(tmp) / "qdq.onnx",
                            np.random.default_rng(seed).standard_normal((16, C, H, W)).astype(np.float32),
                            activation_uint8=False, per_channel=True)
        return onnx.load(str(path))


@pytest.mark.parametrize("opset", [13, 21])
def test_rules_run_on_qdq_models(opset):
    """The rules also run on int8 models (onnxruntime's optimizations do not): auto_pad, and an Identity and a
    same-type Cast between layers, in a model quantized outside flowtile (opset 21: converted down to 17)."""
    rng = np.random.default_rng(10)
    inits = {}
    nodes = [conv(rng, inits, "conv", "x", "c", auto_pad="SAME_UPPER"),
             helper.make_node("Relu", ["c"], ["r"], name="relu")] + dense_tail(rng, inits, "r", 4 * H * W)
    qdq = _qdq(nodes, inits, opset, 10)
    index = next(i for i, n in enumerate(qdq.graph.node) if n.op_type == "Flatten")
    flatten = qdq.graph.node[index]
    qdq.graph.node.insert(index, helper.make_node("Identity", [flatten.input[0]], ["ident"], name="identity"))
    qdq.graph.node.insert(index + 1, helper.make_node("Cast", ["ident"], ["casted"], name="cast", to=TensorProto.FLOAT))
    flatten.input[0] = "casted"
    check(qdq, absent={"Identity", "Cast"})


def test_qdq_bias_add_with_its_own_quantization_is_left_alone():
    """``MatMul -> Q -> DQ -> Add(DQ(b))`` (quantize_static on a raw export) is the matcher's: two roundings."""
    rng = np.random.default_rng(14)
    inits = {"w": _const(rng, 4 * H * W, N_OUT), "b": _const(rng, N_OUT)}
    nodes = [conv(rng, inits, "conv", "x", "c", pads=[1, 1, 1, 1]),
             helper.make_node("Flatten", ["c"], ["flat"], name="flatten", axis=1),
             helper.make_node("MatMul", ["flat", "w"], ["m"], name="fc"),
             helper.make_node("Add", ["m", "b"], ["y"], name="fc_bias")]
    qdq = _qdq(nodes, inits, TARGET_OPSET, 14)
    assert [n.op_type for n in normalize(qdq).graph.node] == [n.op_type for n in qdq.graph.node]


@pytest.mark.parametrize("flatten_op", ["Flatten", "Reshape"])
def test_flatten_before_the_quantization_of_a_pool_moves_after_it(flatten_op):
    """torch dynamo + quantize_static: ``GlobalAveragePool -> Flatten -> Q -> DQ -> Gemm`` (the pool's output
    quantized after the flatten) -> ``GlobalAveragePool -> Q -> DQ -> Flatten``; compiles within 1 LSB."""
    from flowtile.testing.random_models import quantize_qdq
    import tempfile
    from pathlib import Path
    rng = np.random.default_rng(15)
    inits = {}
    nodes = [conv(rng, inits, "conv", "x", "c", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool")] + dense_tail(rng, inits, "p", 4)
    calibration = rng.standard_normal((16, C, H, W)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(make(nodes, inits), Path(tmp) / "float.onnx")
        qdq = onnx.load(str(quantize_qdq(Path(tmp) / "float.onnx", Path(tmp) / "qdq.onnx", calibration,
                                         activation_uint8=False, per_channel=True)))
    # the dynamo form: the Flatten reads the pool's float output; the pair quantizing it then quantizes the pool
    kept = [n for n in qdq.graph.node if n.name not in ("p_QuantizeLinear", "p_DequantizeLinear")]
    assert len(kept) == len(qdq.graph.node) - 2
    flatten = next(n for n in kept if n.op_type == "Flatten")
    if flatten_op == "Reshape":
        qdq.graph.initializer.append(numpy_helper.from_array(np.array([0, -1], np.int64), "flat_shape"))
        kept[kept.index(flatten)] = helper.make_node("Reshape", ["p", "flat_shape"], list(flatten.output), name="view")
    else:
        flatten.input[0] = "p"
    del qdq.graph.node[:]
    qdq.graph.node.extend(kept)
    onnx.checker.check_model(qdq, full_check=True)
    ops = [n.op_type for n in qdq.graph.node if n.op_type != "DequantizeLinear" or n.input[0] in
           {q.output[0] for q in qdq.graph.node}]
    assert ops[ops.index("GlobalAveragePool") + 1] == flatten_op
    normalized = normalize(qdq)
    ops = [n.op_type for n in normalized.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")]
    assert ops == ["Conv", "GlobalAveragePool", "Flatten", "Gemm"], ops
    pooled = next(n for n in normalized.graph.node if n.op_type == "GlobalAveragePool").output[0]
    assert next(n for n in normalized.graph.node if pooled in n.input).op_type == "QuantizeLinear"
    program = compile_model(int8_model(qdq), ARCH)
    assert_emulator_matches_onnxruntime(qdq, program, rng.standard_normal((4, C, H, W)).astype(np.float32),
                                        one_at_a_time=True)


@pytest.mark.parametrize("keepdims,opset", [(1, 13), (0, 13), (1, 18), (0, 20)])
def test_spatial_reduce_mean_is_a_global_average_pool(keepdims, opset):
    """torch dynamo (opset >= 18: axes an input) and tf2onnx write global average pooling as ReduceMean."""
    rng = np.random.default_rng(11)
    inits = {}
    if opset >= 18:
        inits["axes"] = np.array([-2, -1], np.int64)
        reduce = helper.make_node("ReduceMean", ["r", "axes"], ["m"], name="mean", keepdims=keepdims)
    else:
        reduce = helper.make_node("ReduceMean", ["r"], ["m"], name="mean", axes=[2, 3], keepdims=keepdims)
    nodes = [conv(rng, inits, "conv", "x", "c", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"], name="relu"),
             reduce] + dense_tail(rng, inits, "m", 4)
    check(make(nodes, inits, opset=opset), absent={"ReduceMean"}, present={"GlobalAveragePool"})


# ---------------------------------------------------------------------------------------------------
# tf2onnx's forms (Keras): computed Reshape targets, tensordot, channels-last flatten and input, Squeeze,
# Dense -> BatchNormalization
# ---------------------------------------------------------------------------------------------------
def _quantize_static(model: onnx.ModelProto, calibration: np.ndarray) -> onnx.ModelProto:
    """``model`` as onnxruntime's quantize_static writes it (QDQ, int8, per-channel weights)."""
    from flowtile.testing.random_models import quantize_qdq
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(model, Path(tmp) / "float.onnx")
        return onnx.load(str(quantize_qdq(Path(tmp) / "float.onnx", Path(tmp) / "qdq.onnx", calibration,
                                          activation_uint8=False, per_channel=True)))


def _computed_target(prefix: str, source: str, take, tail: list[int], out: str) -> tuple[list, dict]:
    """tf2onnx's computed Reshape target: ``Cast(Concat(Gather(Cast(Shape(source), int32), take) | its Slice
    [0:1], tail), int64)``; ``take`` a list of indices (tensordot's free axes) or ("perm", perm) (a Flatten after
    a transposed map: Gather the permuted shape, then Slice the batch)."""
    inits = {f"{prefix}_tail": np.array(tail, np.int32)}
    nodes = [helper.make_node("Shape", [source], [f"{prefix}_shape"], name=f"{prefix}/Shape"),
             helper.make_node("Cast", [f"{prefix}_shape"], [f"{prefix}_shape32"], name=f"{prefix}/Cast",
                              to=TensorProto.INT32)]
    if take[0] == "perm":
        inits.update({f"{prefix}_perm": np.array(take[1], np.int64), f"{prefix}_zero": np.array([0], np.int64),
                      f"{prefix}_one": np.array([1], np.int64)})
        nodes += [helper.make_node("Gather", [f"{prefix}_shape32", f"{prefix}_perm"], [f"{prefix}_taken"],
                                   name=f"{prefix}/Gather", axis=0),
                  helper.make_node("Slice", [f"{prefix}_taken", f"{prefix}_zero", f"{prefix}_one", f"{prefix}_zero"],
                                   [f"{prefix}_batch"], name=f"{prefix}/strided_slice")]
        head = f"{prefix}_batch"
    else:
        inits[f"{prefix}_free"] = np.array(take, np.int64)
        nodes.append(helper.make_node("Gather", [f"{prefix}_shape32", f"{prefix}_free"], [f"{prefix}_taken"],
                                      name=f"{prefix}/GatherV2", axis=0))
        head = f"{prefix}_taken"
    nodes += [helper.make_node("Concat", [head, f"{prefix}_tail"], [f"{prefix}_target32"], name=f"{prefix}/concat",
                               axis=0),
              helper.make_node("Cast", [f"{prefix}_target32"], [out], name=f"{prefix}/Cast_1", to=TensorProto.INT64)]
    return nodes, inits


SHAPE_OPS = {"Shape", "Cast", "Gather", "Slice", "Concat"}


@pytest.mark.parametrize("kind,batch", [("float", "N"), ("qdq", "N"), ("float", 1)])
def test_tensordot_dense_on_a_sequence_is_a_3d_matmul(kind, batch):
    """tf2onnx's Keras ``Dense`` on ``[N, T, C]`` (tf.tensordot): ``Reshape(x, [-1, C]) -> MatMul -> Reshape(.,
    computed [N, T, K]) -> Add -> Relu``, then a Keras Flatten and Dense; quantized, a Q/DQ pair after every
    Reshape. Becomes ``MatMul(x [N, T, C], W) -> Add -> Relu`` (a sequence layer); the shape computation goes.
    Traced with a fixed batch of 1, the targets state it (``[T, C]``, ``[1, T, K]``); the batch is then freed."""
    steps, channels, k = 4, 5, 6
    rng = np.random.default_rng(30)
    rows = -1 if batch == "N" else batch * steps
    inits = {"flat_target": np.array([rows, channels], np.int64), "w": _const(rng, channels, k), "b": _const(rng, k),
             "seq_target": np.array([-1, steps * k], np.int64), "w2": _const(rng, steps * k, N_OUT),
             "b2": _const(rng, N_OUT)}
    shape_nodes, shape_inits = _computed_target("td", "x", [0, 1], [k], "td_target")
    inits.update(shape_inits)
    nodes = shape_nodes + [
        helper.make_node("Reshape", ["x", "flat_target"], ["rows"], name="dense/Tensordot/Reshape"),
        helper.make_node("MatMul", ["rows", "w"], ["mm"], name="dense/Tensordot/MatMul"),
        helper.make_node("Reshape", ["mm", "td_target"], ["seq"], name="dense/Tensordot"),
        helper.make_node("Add", ["seq", "b"], ["biased"], name="dense/BiasAdd"),
        helper.make_node("Relu", ["biased"], ["h"], name="dense/Relu"),
        helper.make_node("Reshape", ["h", "seq_target"], ["flat"], name="flatten/Reshape"),
        helper.make_node("MatMul", ["flat", "w2"], ["m2"], name="head/MatMul"),
        helper.make_node("Add", ["m2", "b2"], ["y"], name="head/BiasAdd")]
    model = make(nodes, inits, x_shape=(batch, steps, channels))
    if kind == "qdq":
        model = _quantize_static(model, rng.standard_normal((32, steps, channels)).astype(np.float32))
    normalized = check(model, x_shape=(steps, channels), absent=SHAPE_OPS, batch=4)
    assert normalized.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # any batch
    first = next(n for n in normalized.graph.node if n.op_type == "MatMul")
    source = next((n for n in normalized.graph.node if first.input[0] in n.output), None)
    assert source is None or source.op_type == "DequantizeLinear"  # the MatMul reads the (quantized) 3-D input
    assert sum(n.op_type == "Reshape" for n in normalized.graph.node) == 0  # the flatten became a Flatten


def test_computed_reshape_target_becomes_constant():
    """tf2onnx's Keras Flatten with a dynamic batch: the target computed from the map's shape (Shape -> Gather ->
    Cast -> Slice -> Concat -> Cast), static but for the batch by ONNX's data propagation: a constant, -1 for the
    batch (here a plain NCHW flatten, so a Flatten after that)."""
    rng = np.random.default_rng(31)
    inits = {}
    shape_nodes, shape_inits = _computed_target("fl", "r", ("perm", [0, 1, 2, 3]), [4 * H * W], "fl_target")
    inits.update(shape_inits)
    nodes = [conv(rng, inits, "conv", "x", "c", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu")] + shape_nodes + [
        helper.make_node("Reshape", ["r", "fl_target"], ["flat"], name="flatten/Reshape")]
    inits.update(fc_w=_const(rng, 4 * H * W, N_OUT), fc_b=_const(rng, N_OUT))
    nodes += [helper.make_node("MatMul", ["flat", "fc_w"], ["m"], name="fc"),
              helper.make_node("Add", ["m", "fc_b"], ["y"], name="fc_bias")]
    check(make(nodes, inits), absent=SHAPE_OPS | {"Reshape"}, present={"Flatten"})


@pytest.mark.parametrize("kind", ["float", "qdq"])
def test_channels_last_flatten_permutes_the_dense_weight(kind):
    """tf2onnx's Keras Flatten after a channels-last map: ``Transpose(perm=[0, 2, 3, 1]) -> Reshape(computed [N,
    n]) -> MatMul``; becomes ``Flatten -> MatMul`` with the weight's rows in (c, h, w) order (int8 rows behind the
    per-channel DequantizeLinear, quantized). A non-square map (4 x 3) so that h and w cannot be confused."""
    rng = np.random.default_rng(32)
    height, width, n = 8, 6, 4 * 4 * 3
    inits = {"fc_w": _const(rng, n, N_OUT), "fc_b": _const(rng, N_OUT)}
    shape_nodes, shape_inits = _computed_target("fl", "p", ("perm", [0, 2, 3, 1]), [n], "fl_target")
    inits.update(shape_inits)
    nodes = [conv(rng, inits, "conv", "x", "c", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Transpose", ["p"], ["t"], name="Transpose__7", perm=[0, 2, 3, 1])] + shape_nodes + [
        helper.make_node("Reshape", ["t", "fl_target"], ["flat"], name="flatten/Reshape"),
        helper.make_node("MatMul", ["flat", "fc_w"], ["m"], name="fc/MatMul"),
        helper.make_node("Add", ["m", "fc_b"], ["y"], name="fc/BiasAdd")]
    model = make(nodes, inits, x_shape=("N", C, height, width))
    if kind == "qdq":
        model = _quantize_static(model, rng.standard_normal((32, C, height, width)).astype(np.float32))
    check(model, x_shape=(C, height, width), absent=SHAPE_OPS | {"Transpose", "Reshape"}, present={"Flatten"})


@pytest.mark.parametrize("kind", ["float", "qdq"])
def test_squeeze_after_global_pool_is_a_flatten(kind):
    """tf2onnx's Keras GlobalAveragePooling2D: ``GlobalAveragePool -> Squeeze(axes=[2, 3]) -> MatMul``."""
    rng = np.random.default_rng(33)
    inits = {"axes": np.array([2, 3], np.int64), "fc_w": _const(rng, 4, N_OUT), "fc_b": _const(rng, N_OUT)}
    nodes = [conv(rng, inits, "conv", "x", "c", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["g"], name="mean"),
             helper.make_node("Squeeze", ["g", "axes"], ["s"], name="mean_squeeze"),
             helper.make_node("MatMul", ["s", "fc_w"], ["m"], name="fc/MatMul"),
             helper.make_node("Add", ["m", "fc_b"], ["y"], name="fc/BiasAdd")]
    model = make(nodes, inits)
    if kind == "qdq":
        model = _quantize_static(model, rng.standard_normal((32, C, H, W)).astype(np.float32))
    check(model, absent={"Squeeze"}, present={"Flatten"})


def test_dense_batchnorm_as_mul_add_is_folded():
    """tf2onnx's Keras ``Dense -> BatchNormalization`` on vectors: ``MatMul -> Add(bias) -> Mul(a) -> Add(c) ->
    Relu``; folded into one Gemm."""
    rng = np.random.default_rng(34)
    inits = {"w1": _const(rng, 16, 8), "b1": _const(rng, 8), "a": 1 + _const(rng, 8, scale=0.3), "c": _const(rng, 8),
             "w2": _const(rng, 8, N_OUT), "b2": _const(rng, N_OUT)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m"], name="dense/MatMul"),
             helper.make_node("Add", ["m", "b1"], ["d"], name="dense/BiasAdd"),
             helper.make_node("Mul", ["d", "a"], ["bn_mul"], name="batch_normalization/batchnorm/mul_1"),
             helper.make_node("Add", ["bn_mul", "c"], ["bn"], name="batch_normalization/batchnorm/add_1"),
             helper.make_node("Relu", ["bn"], ["r"], name="re_lu/Relu"),
             helper.make_node("MatMul", ["r", "w2"], ["m2"], name="dense_1/MatMul"),
             helper.make_node("Add", ["m2", "b2"], ["y"], name="dense_1/BiasAdd")]
    normalized = check(make(nodes, inits, x_shape=("N", 16)), x_shape=(16,))
    assert [n.op_type for n in normalized.graph.node] == ["Gemm", "Relu", "Gemm"]


def _nhwc_model(channels: int, form: str) -> onnx.ModelProto:
    """tf2onnx's Keras Conv2D on a channels-last input ``[N, H, W, C]``: ``Transpose(perm=[0, 3, 1, 2])`` first, or
    with one channel ``Reshape(x, [-1, 1, H, W])``."""
    rng = np.random.default_rng(35)
    inits = {}
    if form == "transpose":
        first = helper.make_node("Transpose", ["x"], ["xt"], name="conv2d/BiasAdd__6", perm=[0, 3, 1, 2])
    else:
        inits["new_shape"] = np.array([-1, 1, H, W], np.int64)
        first = helper.make_node("Reshape", ["x", "new_shape"], ["xt"], name="conv2d/BiasAdd__6")
    nodes = [first, conv(rng, inits, "conv2d/BiasAdd", "xt", "c", c_in=channels, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu")] + dense_tail(rng, inits, "r", 4 * H * W)
    return make(nodes, inits, x_shape=("N", H, W, channels))


@pytest.mark.parametrize("channels,form,kind", [(3, "transpose", "float"), (3, "transpose", "qdq"),
                                                (1, "reshape", "float"), (1, "reshape", "qdq")])
def test_channels_last_input_is_transposed_by_the_host(channels, form, kind, tmp_path):
    """The graph input ``[N, H, W, C]`` read by tf2onnx's leading Transpose (or, C = 1, Reshape) becomes ``[N, C, H,
    W]`` and the model records the permutation; the program input carries it (``host_transpose``, saved with the
    program), the host transposes NHWC samples (calibration too), and the result is onnxruntime's on the model as
    published."""
    from flowtile.compiler.normalize import host_transpose
    from flowtile.host import model_layout
    from flowtile.program import Program
    rng = np.random.default_rng(36)
    model = _nhwc_model(channels, form)
    calibration = rng.random((32, H, W, channels)).astype(np.float32)
    if kind == "qdq":
        model = _quantize_static(model, calibration)
    x = rng.random((5, H, W, channels)).astype(np.float32)
    normalized = normalize(model)
    assert [d.dim_value for d in normalized.graph.input[0].type.tensor_type.shape.dim[1:]] == [channels, H, W]
    assert host_transpose(normalized) == (0, 3, 1, 2) and host_transpose(model) is None
    assert not {"Transpose", "Reshape"} & {n.op_type for n in normalized.graph.node}
    np.testing.assert_allclose(_ort_float(normalized, x.transpose(0, 3, 1, 2)), _ort_float(model, x),
                               rtol=1e-5, atol=1e-5)

    int8 = int8_model(model, calibration)  # NHWC calibration samples, as the published model takes them
    program = compile_model(int8, ARCH)
    assert program.input.host_transpose == (0, 3, 1, 2)
    program.save(tmp_path / "prog")
    assert Program.load(tmp_path / "prog").input.host_transpose == (0, 3, 1, 2)
    nchw = model_layout(x, program.input)
    np.testing.assert_array_equal(nchw, x.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(model_layout(nchw, program.input), nchw)  # already the program's layout
    assert_emulator_matches_onnxruntime(int8, program, nchw)


def test_other_input_transposes_are_rejected():
    """Only the NHWC -> NCHW transpose of the graph input is the host's; another one is left for the matcher,
    which names node and op."""
    rng = np.random.default_rng(37)
    inits = {}
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], name="swap_hw", perm=[0, 1, 3, 2]),
             conv(rng, inits, "conv", "xt", "c", pads=[1, 1, 1, 1])] + dense_tail(rng, inits, "c", 4 * H * W)
    rejects(make(nodes, inits), "swap_hw", "Transpose", r"unsupported op")


# ---------------------------------------------------------------------------------------------------
# opsets 7..22, and mnist-8's whole form
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opset", [7, 9, 11, 13, 20, 22])
def test_opsets_are_converted(opset):
    rng = np.random.default_rng(12)
    inits = {}
    nodes = [conv(rng, inits, "conv", "x", "c", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2])]
    nodes += dense_tail(rng, inits, "p", 4 * 4 * 4)
    normalized = check(make(nodes, inits, opset=opset))
    assert normalized.opset_import[0].version in (TARGET_OPSET, opset)


def test_cntk_form_of_mnist8():
    """All of mnist-8's forms at once, at its opset 8: initializers listed as graph inputs, fixed batch 1,
    auto_pad SAME_UPPER, bias Adds of shape [C, 1, 1], a constant Reshape of the dense weight, Reshape([1, n])."""
    rng = np.random.default_rng(13)
    inits = {"b": _const(rng, 4, 1, 1), "wfc": _const(rng, 4, 4, 4, N_OUT), "wshape": np.array([64, N_OUT], np.int64),
             "xshape": np.array([1, 64], np.int64), "bfc": _const(rng, 1, N_OUT)}
    nodes = [helper.make_node("Reshape", ["wfc", "wshape"], ["wfc2"], name="wreshape"),
             conv(rng, inits, "conv", "x", "c", bias=False, auto_pad="SAME_UPPER", kernel_shape=[3, 3]),
             helper.make_node("Add", ["c", "b"], ["a"], name="plus"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Reshape", ["p", "xshape"], ["flat"], name="reshape"),
             helper.make_node("MatMul", ["flat", "wfc2"], ["m"], name="times"),
             helper.make_node("Add", ["m", "bfc"], ["y"], name="plus2")]
    model = make(nodes, inits, x_shape=(1, C, H, W), opset=8)
    model.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in model.graph.initializer)
    model.ir_version = 3
    normalized = check(model, absent={"Reshape", "Add"})
    assert [i.name for i in normalized.graph.input] == ["x"]


# ---------------------------------------------------------------------------------------------------
# rejections: one line naming node, op and attribute
# ---------------------------------------------------------------------------------------------------
def test_reduce_mean_over_channels_is_rejected():
    rng = np.random.default_rng(20)
    inits = {}
    nodes = [conv(rng, inits, "conv", "x", "c", pads=[1, 1, 1, 1]),
             helper.make_node("ReduceMean", ["c"], ["m"], name="mean", axes=[1], keepdims=1)]
    nodes += dense_tail(rng, inits, "m", H * W)
    rejects(make(nodes, inits, opset=13), "mean", "ReduceMean", r"attribute 'axes' = \[1\] is unsupported")


def test_cast_to_another_type_is_rejected():
    rng = np.random.default_rng(21)
    inits = {}
    nodes = [conv(rng, inits, "conv", "x", "c", pads=[1, 1, 1, 1]),
             helper.make_node("Cast", ["c"], ["c16"], name="to_half", to=TensorProto.FLOAT16),
             helper.make_node("Cast", ["c16"], ["cf"], name="to_float", to=TensorProto.FLOAT)]
    nodes += dense_tail(rng, inits, "cf", 4 * H * W)
    rejects(make(nodes, inits), "to_half", "Cast", r"attribute 'to' = FLOAT16 is unsupported")


def test_dropout_mask_is_rejected():
    rng = np.random.default_rng(22)
    inits = {}
    nodes = [conv(rng, inits, "conv", "x", "c", pads=[1, 1, 1, 1]),
             helper.make_node("Dropout", ["c"], ["d", "mask"], name="drop"),
             helper.make_node("Cast", ["mask"], ["maskf"], name="mask_float", to=TensorProto.FLOAT),
             helper.make_node("Mul", ["d", "maskf"], ["dm"], name="mul")]
    nodes += dense_tail(rng, inits, "dm", 4 * H * W)
    rejects(make(nodes, inits), "drop", "Dropout", r"output 'mask' is unsupported")


def test_auto_pad_with_dilation_still_names_the_attribute():
    """auto_pad is made explicit, and the matcher then names what it does not support (dilations)."""
    rng = np.random.default_rng(23)
    inits = {}
    nodes = [conv(rng, inits, "conv", "x", "c", auto_pad="SAME_UPPER", dilations=[2, 2]),
             helper.make_node("Relu", ["c"], ["r"], name="relu")] + dense_tail(rng, inits, "r", 4 * H * W)
    rejects(make(nodes, inits), "conv", "Conv", r"attribute 'dilations' = \[2, 2\] is unsupported")


def test_unsupported_op_after_normalization_still_names_node_and_op():
    rng = np.random.default_rng(24)
    inits = {}
    nodes = [conv(rng, inits, "conv", "x", "c", pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["c"], ["s"], name="gate")] + dense_tail(rng, inits, "s", 4 * H * W)
    rejects(make(nodes, inits), "gate", "Sigmoid", r"unsupported op")
