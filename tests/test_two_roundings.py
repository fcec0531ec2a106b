"""Two roundings where the model has two: a per-channel affine step between its own Q/DQ pairs after a
requantized layer (quantize_static's ``MatMul -> Q -> DQ -> Add(int8 bias) -> Q -> DQ``, a
``Conv -> Q -> DQ -> BatchNormalization -> Q -> DQ``, a ``Mul`` by a per-channel constant) compiles to a second,
LANE layer (op "Affine") and stays within 1 LSB of onnxruntime (graph optimizations off).

The models are float graphs quantized by onnxruntime's ``quantize_static`` as published models are (not by the
compiler, which would fuse a 2-D MatMul + Add into a Gemm first). Test inputs are 1.5x wider than the calibration
data, so the first QuantizeLinear saturates on some values (reproduced by the first layer's clamp). The compiler
takes a graph input ``[N, n]`` or ``[N, C, H, W]`` only, so ``nn.Linear`` on a 3-D ``[N, T, C]`` input is
rejected naming the MatMul (tests/test_normalize.py).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from flowtile.arch import Arch
from flowtile.testing.archs import lean_arch
from flowtile.compiler import CompileError, compile_model, import_onnx
from flowtile.compiler.lower import affine_integers, lower_layer, quantize_multiplier
from flowtile.compiler.onnx_import import DenseLayer, QuantParams, Window
from flowtile.testing.oracle_checks import assert_emulator_matches_onnxruntime, assert_rtl_matches_emulator
from flowtile.testing.random_models import quantize_qdq

ARCHS = {"4x4-l8": lean_arch(), "2x3-l4": lean_arch(rows=2, cols=3, lanes=4, sram_bytes=16384, max_tile_outputs=256)}
#: The RTL case's Arch: 2x3-l4 with the router FIFOs and host buffers of tests/test_differential.py's "2x3-l4-d2", so
#: that it runs on that test's Verilator build instead of a build of its own (neither field touches the arithmetic).
RTL_ARCH = ARCHS["2x3-l4"].replace(router_fifo_depth=2, host_buffer_flits=8192)


def _model(nodes, inits, in_shape, out_name, out_shape, name="two_roundings"):
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                          ["batch", *in_shape])],
                              [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["batch", *out_shape])],
                              [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def float_linear_mlp(rng, widths, *, relu=True, mul=False):
    """``nn.Linear`` layers as exporters write them unfused: ``MatMul(x, W^T) -> Add(b)`` [-> Mul(per-channel)]
    [-> Relu] for every layer but the last."""
    nodes, inits, current = [], {}, "input"
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        inits[f"w{i}"] = rng.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in)
        inits[f"b{i}"] = rng.standard_normal(n_out) * 0.5
        nodes += [helper.make_node("MatMul", [current, f"w{i}"], [f"mm{i}"], name=f"matmul{i}"),
                  helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"add{i}"], name=f"bias{i}")]
        current = f"add{i}"
        if mul:
            inits[f"a{i}"] = rng.uniform(-2, 2, (1, n_out))
            nodes.append(helper.make_node("Mul", [current, f"a{i}"], [f"mul{i}"], name=f"mul{i}"))
            current = f"mul{i}"
        if relu and i < len(widths) - 2:
            nodes.append(helper.make_node("Relu", [current], [f"relu{i}"], name=f"relu{i}"))
            current = f"relu{i}"
    return _model(nodes, inits, [widths[0]], current, [widths[-1]])


def float_conv_bn(rng, in_shape, channels, k, classes, *, relu=True, mul=False):
    """``Conv -> BatchNormalization [-> Mul([C, 1, 1])] [-> Relu] -> Flatten -> Gemm``, BN kept as a node."""
    c_in, height, width = in_shape
    inits = {"cw": rng.standard_normal((channels, c_in, k, k)) * np.sqrt(2.0 / (c_in * k * k)),
             "gamma": rng.uniform(0.3, 2.0, channels) * rng.choice([-1, 1], channels),
             "beta": rng.standard_normal(channels) * 0.5, "mean": rng.standard_normal(channels) * 0.3,
             "var": rng.uniform(0.3, 2.0, channels)}
    nodes = [helper.make_node("Conv", ["input", "cw"], ["conv"], name="conv", pads=[k // 2] * 4),
             helper.make_node("BatchNormalization", ["conv", "gamma", "beta", "mean", "var"], ["bn"], name="bn",
                              epsilon=1e-3)]
    current = "bn"
    if mul:
        inits["scale"] = rng.uniform(0.5, 2.0, (channels, 1, 1))
        nodes.append(helper.make_node("Mul", [current, "scale"], ["mul"], name="mul"))
        current = "mul"
    if relu:
        nodes.append(helper.make_node("Relu", [current], ["relu"], name="relu"))
        current = "relu"
    inits["fw"] = rng.standard_normal((classes, channels * height * width)) * np.sqrt(2.0 / (channels * height * width))
    inits["fb"] = rng.standard_normal(classes) * 0.1
    nodes += [helper.make_node("Flatten", [current], ["flat"], name="flatten"),
              helper.make_node("Gemm", ["flat", "fw", "fb"], ["logits"], name="fc", transB=1)]
    return _model(nodes, inits, list(in_shape), "logits", [classes])


def quantized(tmp_path, float_model, calibration, *, uint8=False, per_channel=True):
    onnx.save(float_model, tmp_path / "float.onnx")
    return onnx.load(str(quantize_qdq(tmp_path / "float.onnx", tmp_path / "qdq.onnx", calibration,
                                      activation_uint8=uint8, per_channel=per_channel)))


# (seed, arch, widths, mul, uint8, per_channel, batch)
MLP_CASES = [
    (1, "4x4-l8", [12, 9], False, False, True, 64),
    (2, "4x4-l8", [40, 33, 10], False, False, True, 32),
    (3, "2x3-l4", [7, 20, 5], False, True, False, 48),
    (4, "4x4-l8", [16, 11, 6], True, False, True, 32),
    (5, "2x3-l4", [30, 3], True, True, True, 40),
]


@pytest.mark.parametrize("seed,arch,widths,mul,uint8,per_channel,batch", MLP_CASES,
                         ids=[f"{c[1]}-{'-'.join(map(str, c[2]))}{'-mul' if c[3] else ''}-"
                              f"{'uint8' if c[4] else 'int8'}" for c in MLP_CASES])
def test_matmul_add_two_roundings(tmp_path, seed, arch, widths, mul, uint8, per_channel, batch):
    rng = np.random.default_rng(seed)
    model = quantized(tmp_path, float_linear_mlp(rng, widths, mul=mul),
                      rng.standard_normal((128, widths[0])).astype(np.float32), uint8=uint8, per_channel=per_channel)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Add") == len(widths) - 1 and "Gemm" not in ops  # the unfused, doubly rounded form
    program = compile_model(model, ARCHS[arch])
    affine = [layer for layer in program.layers if layer.op.startswith("Affine")]
    assert len(affine) == (len(widths) - 1) * (2 if mul else 1)
    x = (1.5 * np.random.default_rng(seed + 100).standard_normal((batch, widths[0]))).astype(np.float32)
    assert assert_emulator_matches_onnxruntime(model, program, x).inexact_fraction < 0.05


# (seed, arch, input, channels, kernel, classes, relu, mul, uint8, batch)
CNN_CASES = [
    (11, "4x4-l8", (3, 6, 6), 8, 3, 5, True, False, False, 16),
    (12, "2x3-l4", (2, 5, 7), 6, 3, 4, False, False, True, 12),
    (13, "4x4-l8", (1, 8, 8), 10, 1, 3, True, True, False, 10),
]


@pytest.mark.parametrize("seed,arch,in_shape,channels,k,classes,relu,mul,uint8,batch", CNN_CASES,
                         ids=[f"{c[1]}-{'x'.join(map(str, c[2]))}-c{c[3]}k{c[4]}{'-relu' if c[6] else ''}"
                              f"{'-mul' if c[7] else ''}" for c in CNN_CASES])
def test_conv_batchnorm_two_roundings(tmp_path, seed, arch, in_shape, channels, k, classes, relu, mul, uint8, batch):
    rng = np.random.default_rng(seed)
    model = quantized(tmp_path, float_conv_bn(rng, in_shape, channels, k, classes, relu=relu, mul=mul),
                      rng.standard_normal((64, *in_shape)).astype(np.float32), uint8=uint8)
    assert "BatchNormalization" in [n.op_type for n in model.graph.node]
    program = compile_model(model, ARCHS[arch])
    assert [layer.op.split("+")[0] for layer in program.layers] == ["Conv", "Affine"] + ["Affine"] * mul + ["Gemm"]
    x = (1.5 * np.random.default_rng(seed + 100).standard_normal((batch, *in_shape))).astype(np.float32)
    assert_emulator_matches_onnxruntime(model, program, x)


def test_affine_output_exact(tmp_path):
    """Each layer's int8 output against onnxruntime's QuantizeLinear output of that tensor: the Conv and the
    BatchNormalization (its second rounding, made exact per channel by compiler.lower.exact_affine) both exact
    (onnxruntime's float32 could differ from the model only on a value within ~2^-20 LSB of a rounding tie)."""
    from flowtile.compiler import lower_layers, reference_forward
    from flowtile.host import quantize
    from flowtile.oracle import ort_session
    rng = np.random.default_rng(14)
    in_shape = (3, 6, 6)
    model = quantized(tmp_path, float_conv_bn(rng, in_shape, 12, 3, 4, relu=False),
                      rng.standard_normal((64, *in_shape)).astype(np.float32))
    imported = import_onnx(model)
    layers = lower_layers(imported.layers)
    x = (1.5 * np.random.default_rng(15).standard_normal((64, *in_shape))).astype(np.float32)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    quantized_tensors = [n.output[0] for n in probe.graph.node if n.op_type == "QuantizeLinear"]  # input, conv, bn, fc
    probe.graph.output.extend(helper.make_tensor_value_info(name, TensorProto.INT8, None) for name in quantized_tensors)
    ort = ort_session(probe).run(quantized_tensors, {"input": x})
    x_q = quantize(x.reshape(len(x), -1), imported.input)
    conv = reference_forward(layers[:1], x_q)
    bn = reference_forward(layers[:2], x_q)
    assert np.array_equal(conv, ort[1].reshape(len(x), -1))
    diff = np.abs(bn.astype(np.int32) - ort[2].reshape(len(x), -1))
    assert diff.max() == 0, f"{int((diff > 0).sum())} of {diff.size} BatchNormalization outputs differ"


def test_batchnorm_inside_a_residual_branch(tmp_path):
    """``conv -> relu -> [conv -> BN] + identity -> relu``: the Affine layer inside the residual branch, the block's
    Add of two activations still a join."""
    rng = np.random.default_rng(41)
    c = 4
    inits = {"w0": rng.standard_normal((c, 2, 3, 3)) * 0.4, "wa": rng.standard_normal((c, c, 3, 3)) * 0.3,
             "gamma": rng.uniform(0.5, 2, c), "beta": rng.standard_normal(c) * 0.3,
             "mean": rng.standard_normal(c) * 0.2, "var": rng.uniform(0.5, 2, c),
             "fw": rng.standard_normal((3, c * 25)) * 0.2, "fb": np.zeros(3)}
    nodes = [helper.make_node("Conv", ["input", "w0"], ["c0"], name="conv0", pads=[1] * 4),
             helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
             helper.make_node("Conv", ["r0", "wa"], ["ca"], name="conva", pads=[1] * 4),
             helper.make_node("BatchNormalization", ["ca", "gamma", "beta", "mean", "var"], ["bn"], name="bn"),
             helper.make_node("Add", ["bn", "r0"], ["sum"], name="join"),
             helper.make_node("Relu", ["sum"], ["r1"], name="relu1"),
             helper.make_node("Flatten", ["r1"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "fw", "fb"], ["y"], name="fc", transB=1)]
    model = quantized(tmp_path, _model(nodes, inits, [2, 5, 5], "y", [3]),
                      rng.standard_normal((64, 2, 5, 5)).astype(np.float32))
    program = compile_model(model, ARCHS["4x4-l8"])
    assert [layer.op.split("+")[0] for layer in program.layers] == ["Conv", "Conv", "Affine", "Add", "Gemm"]
    x = (1.5 * rng.standard_normal((8, 2, 5, 5))).astype(np.float32)
    assert_emulator_matches_onnxruntime(model, program, x)


@pytest.mark.parametrize("uint8,arch", [(False, "4x4-l8"), (True, "2x3-l4")])
def test_batchnorm_on_vectors_two_roundings(tmp_path, uint8, arch):
    """torch's ``nn.Linear -> nn.BatchNorm1d -> ReLU`` quantized outside flowtile: ``Gemm -> Q -> DQ ->
    BatchNormalization -> Q -> DQ`` on a vector ``[N, C]``, an Affine layer on an ``(n, 1, 1)`` map."""
    rng = np.random.default_rng(61)
    n_in, hidden, classes = 12, 9, 4
    inits = {"w1": rng.standard_normal((hidden, n_in)) * 0.4, "b1": rng.standard_normal(hidden) * 0.2,
             "gamma": rng.uniform(0.5, 2, hidden), "beta": rng.standard_normal(hidden) * 0.3,
             "mean": rng.standard_normal(hidden) * 0.2, "var": rng.uniform(0.5, 2, hidden),
             "w2": rng.standard_normal((classes, hidden)) * 0.4, "b2": rng.standard_normal(classes) * 0.1}
    nodes = [helper.make_node("Gemm", ["input", "w1", "b1"], ["g1"], name="fc1", transB=1),
             helper.make_node("BatchNormalization", ["g1", "gamma", "beta", "mean", "var"], ["bn"], name="bn1"),
             helper.make_node("Relu", ["bn"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2", transB=1)]
    model = quantized(tmp_path, _model(nodes, inits, [n_in], "y", [classes]),
                      rng.standard_normal((64, n_in)).astype(np.float32), uint8=uint8)
    assert "BatchNormalization" in [n.op_type for n in model.graph.node]
    program = compile_model(model, ARCHS[arch])
    assert [layer.op.split("+")[0] for layer in program.layers] == ["Gemm", "Affine", "Gemm"]
    x = (1.5 * rng.standard_normal((24, n_in))).astype(np.float32)
    assert_emulator_matches_onnxruntime(model, program, x)


def _affine_layer(a, b, s1, s2, z1=3, z2=-5):
    n = len(a)
    return DenseLayer("affine", "Affine", np.zeros((n, 1, 1, 1), np.int8), np.zeros(n, np.int32),
                      QuantParams(s1, z1, "int8"), np.ones(n), QuantParams(s2, z2, "int8"), False,
                      window=Window(n, 1, 1, 1, 1, 1, 0, 0, 1, 1), affine=(np.asarray(a, float), np.asarray(b, float)))


def test_affine_integers_error_bound():
    """The pre-rounding value differs from the model's by at most s1|a|/(254 s2) + 2^-22 LSB (the docstring of
    compiler.lower.affine_integers), on every int8 input, including a = 0 and negative a."""
    rng = np.random.default_rng(7)
    for _ in range(20):
        n = 16
        s1, s2 = float(rng.uniform(0.005, 0.1)), float(rng.uniform(0.005, 0.1))
        a = rng.uniform(-3, 3, n) * rng.choice([0, 1], n, p=[0.1, 0.9])
        b = rng.standard_normal(n) * 2
        layer = affine_integers(_affine_layer(a, b, s1, s2))
        y1 = np.arange(-128, 128)[:, None]
        exact = (s1 * (y1 - 3) * a + b) / s2
        ratio = s1 * layer.weight_scales / s2
        pairs = [quantize_multiplier(float(r)) for r in ratio]
        mult = np.array([m / 2.0 ** s for m, s in pairs])
        acc = layer.weight.reshape(-1).astype(np.int64) * (y1 - 3) + layer.bias.astype(np.int64)
        bound = s1 * np.abs(np.where(a == 0, s2 / s1, a)) / (254 * s2) + 2.0 ** -22
        assert np.all(np.abs(acc * mult - exact) <= bound * (1 + 1e-9) + 1e-9 * np.abs(exact))


def _hardware_results(lowered, y1):
    """The PE's LANE arithmetic for a 1x1 Affine layer, written out: acc = W y + bias, rne(acc M / 2^S) + zp,
    clamp (ties to even: exact integer arithmetic on Python ints)."""
    out = []
    for c in range(len(lowered.bias)):
        row = []
        for y in y1:
            acc = int(lowered.weight.reshape(-1)[c]) * int(y) + int(lowered.bias[c])
            num, shift = acc * int(lowered.multiplier[c]), int(lowered.shift[c])
            q, r = divmod(num, 1 << shift)
            half = 1 << (shift - 1)
            q += (r > half) or (r == half and q % 2 == 1)
            row.append(min(lowered.clamp_hi, max(lowered.clamp_lo, q + lowered.zp_out)))
        out.append(row)
    return np.array(out)


@pytest.mark.parametrize("seed", range(6))
def test_exact_affine_equals_the_model_on_every_int8_input(seed):
    """compiler.lower.exact_affine: each channel's integers give the model's second rounding (float64
    ``clamp(rne((s1 (y - z1) a + b) / s2) + z2)``) for all 256 int8 inputs, with a = 0, negative a, steep and
    shallow slopes, ReLU and Clip clamps."""
    rng = np.random.default_rng(seed)
    n = 24
    s1, s2 = float(rng.uniform(0.003, 0.1)), float(rng.uniform(0.003, 0.1))
    a = rng.uniform(-3, 3, n) * rng.choice([0, 1], n, p=[0.1, 0.9]) * rng.choice([0.01, 1, 20], n)
    a = np.where(s1 * np.abs(a) / s2 >= 200, 0.5, a)
    b = rng.standard_normal(n) * rng.choice([0.01, 1, 5])
    z1, z2 = int(rng.integers(-128, 128)), int(rng.integers(-128, 100))
    imported = dataclasses.replace(_affine_layer(a, b, s1, s2, z1, z2), relu=bool(seed % 2),
                                   clip_max=float(s2 * 60) if seed % 3 == 0 else None)
    lowered = lower_layer(imported)
    y1 = np.arange(-128, 128)
    model = np.rint((s1 * (y1[None, :] - z1) * a[:, None] + b[:, None]) / s2) + z2
    wanted = np.clip(model, lowered.clamp_lo, lowered.clamp_hi)
    got = _hardware_results(lowered, y1)
    inexact = np.flatnonzero((got != wanted).any(axis=1))
    assert inexact.size == 0, (f"channels {inexact.tolist()} differ from the model on "
                               f"{int((got != wanted).sum())} inputs (max {int(np.abs(got - wanted).max())} LSB)")


def test_affine_too_steep_is_refused():
    with pytest.raises(CompileError, match=r"layer 'affine' \(Affine\): channel 1 multiplies the input step"):
        affine_integers(_affine_layer([1.0, 500.0], [0.0, 0.0], 0.05, 0.05))


def test_import_names_the_affine_layers(tmp_path):
    rng = np.random.default_rng(3)
    model = quantized(tmp_path, float_linear_mlp(rng, [6, 4]), rng.standard_normal((32, 6)).astype(np.float32))
    layers = import_onnx(model).layers
    assert [layer.op for layer in layers] == ["MatMul", "Affine"]
    a, b = layers[1].affine
    assert np.all(a == 1) and layers[1].window.input_shape == (4, 1, 1)


@pytest.mark.rtl
def test_two_roundings_rtl_matches_emulator(tmp_path):
    rng = np.random.default_rng(31)
    model = quantized(tmp_path, float_conv_bn(rng, (2, 4, 4), 4, 3, 3, relu=True),
                      rng.standard_normal((32, 2, 4, 4)).astype(np.float32))
    program = compile_model(model, RTL_ARCH)
    x = (1.5 * np.random.default_rng(32).standard_normal((3, 2, 4, 4))).astype(np.float32)
    assert_emulator_matches_onnxruntime(model, program, x)
    assert_rtl_matches_emulator(program, x)
