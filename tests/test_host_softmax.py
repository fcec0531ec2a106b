"""The network's last Softmax runs on the host (float, after the chip's last layer), with or without the Q/DQ
pair onnxruntime's quantizer puts after it.

* the chip's int8 output (the Softmax's input, the logits) is within 1 LSB of onnxruntime's (graph optimizations
  off; the oracle adds the Softmax's input as an extra graph output);
* the host's float output is close to onnxruntime's final output. Tolerance: Softmax moves an output by at most
  half the largest change of its inputs (the rows of its Jacobian sum in absolute value to 2 p (1 - p) <= 1/2), so
  a 1-LSB logit difference moves it by <= s_logits / 2; with Q/DQ after the Softmax one more quantization step
  (its scale) for a value pushed across a rounding boundary; plus 1e-6 for float32 arithmetic.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from flowtile import cli
from flowtile.testing.archs import lean_arch
from flowtile.compiler import CompileError, compile_model, int8_model, report
from flowtile.host import apply_post, dequantize
from flowtile.program import FORMAT_VERSION, Program, TensorSpec
from flowtile.testing.oracle_checks import assert_emulator_matches_onnxruntime
from flowtile.testing.random_models import quantize_qdq


def _model(nodes, inits, in_shape, out_name, out_shape, opset=17):
    graph = helper.make_graph(nodes, "softmax_net", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                   ["batch", *in_shape])],
                              [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["batch", *out_shape])],
                              [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def float_mlp_softmax(rng, widths, *, after=()):
    """Gemm + Relu layers, the last Gemm's logits into Softmax(axis -1), then the ops in ``after``."""
    nodes, inits, current = [], {}, "input"
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        inits[f"w{i}"] = rng.standard_normal((n_out, n_in)) * np.sqrt(2.0 / n_in)
        inits[f"b{i}"] = rng.standard_normal(n_out) * 0.2
        nodes.append(helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [f"fc{i}"], name=f"fc{i}", transB=1))
        current = f"fc{i}"
        if i < len(widths) - 2:
            nodes.append(helper.make_node("Relu", [current], [f"relu{i}"], name=f"relu{i}"))
            current = f"relu{i}"
    nodes.append(helper.make_node("Softmax", [current], ["probs"], name="softmax", axis=-1))
    current = "probs"
    for j, op in enumerate(after):
        inits[f"after_w{j}"] = rng.standard_normal((widths[-1], widths[-1])) * 0.3
        nodes.append(helper.make_node(op, [current, f"after_w{j}"], [f"after{j}"], name=f"after{j}", transB=1))
        current = f"after{j}"
    return _model(nodes, inits, [widths[0]], current, [widths[-1]])


def float_cnn_softmax(rng, in_shape, channels, classes):
    c_in, height, width = in_shape
    inits = {"cw": rng.standard_normal((channels, c_in, 3, 3)) * np.sqrt(2.0 / (9 * c_in)),
             "cb": rng.standard_normal(channels) * 0.1,
             "fw": rng.standard_normal((classes, channels * height * width // 4)) * 0.2,
             "fb": rng.standard_normal(classes) * 0.1}
    nodes = [helper.make_node("Conv", ["input", "cw", "cb"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
             helper.make_node("MaxPool", ["relu"], ["pool"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "fw", "fb"], ["logits"], name="fc", transB=1),
             helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=1)]
    return _model(nodes, inits, list(in_shape), "probs", [classes])


def quantized(tmp_path, float_model, calibration, *, uint8=False, keep_softmax_qdq=True):
    """quantize_static's QDQ model; without ``keep_softmax_qdq`` the Q/DQ pair after the Softmax is removed (the
    Softmax then writes the graph output itself, as a model quantized with the Softmax excluded would)."""
    onnx.save(float_model, tmp_path / "float.onnx")
    model = onnx.load(str(quantize_qdq(tmp_path / "float.onnx", tmp_path / "qdq.onnx", calibration,
                                       activation_uint8=uint8, per_channel=True)))
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    quantize = next(n for n in model.graph.node if softmax.output[0] in n.input)
    assert quantize.op_type == "QuantizeLinear"  # the quantizer's form: Softmax -> Q -> DQ -> output
    if not keep_softmax_qdq:
        dequantize = next(n for n in model.graph.node if quantize.output[0] in n.input)
        model.graph.node.remove(quantize)
        model.graph.node.remove(dequantize)
        softmax.output[0] = dequantize.output[0]
        onnx.checker.check_model(model)
    return model


def check_against_onnxruntime(model, program, x):
    comparison = assert_emulator_matches_onnxruntime(model, program, x)  # the logits
    emu_y, ort_q, ort_y = comparison.emulated.y, comparison.ort_q, comparison.ort_y
    spec = program.output
    tolerance = spec.scale / 2 + (spec.post_quant[0] if spec.post_quant else 0) + 1e-6
    assert emu_y.shape == ort_y.shape
    assert np.max(np.abs(emu_y - ort_y)) <= tolerance, (np.max(np.abs(emu_y - ort_y)), tolerance)
    # the host's Softmax of onnxruntime's own logits is onnxruntime's output (a float32 ulp or so; with Q/DQ after,
    # equal unless a value lands on a rounding tie)
    host_of_ort = apply_post(dequantize(ort_q, spec), spec)
    assert np.mean(np.abs(host_of_ort - ort_y) <= 1e-6) >= 0.99
    assert np.max(np.abs(host_of_ort - ort_y)) <= (spec.post_quant[0] if spec.post_quant else 1e-6) + 1e-6
    return emu_y, ort_y


@pytest.mark.parametrize("keep_qdq", [True, False], ids=["softmax-qdq", "softmax-float"])
@pytest.mark.parametrize("seed,widths,uint8", [(1, [20, 16, 10], False), (2, [9, 5], True)],
                         ids=["20-16-10-int8", "9-5-uint8"])
def test_mlp_softmax_on_host(tmp_path, seed, widths, uint8, keep_qdq):
    rng = np.random.default_rng(seed)
    model = quantized(tmp_path, float_mlp_softmax(rng, widths),
                      rng.standard_normal((64, widths[0])).astype(np.float32), uint8=uint8, keep_softmax_qdq=keep_qdq)
    program = compile_model(model, lean_arch())
    spec = program.output
    assert spec.post == "softmax" and spec.post_axis == 1 and (spec.post_quant is not None) == keep_qdq
    assert spec.name != spec.post_name and spec.post_name == model.graph.output[0].name
    x = np.random.default_rng(seed + 10).standard_normal((24, widths[0])).astype(np.float32)
    emu_y, _ = check_against_onnxruntime(model, program, x)
    if not keep_qdq:
        assert np.allclose(emu_y.sum(axis=1), 1, atol=1e-5)


def test_cnn_softmax_on_host(tmp_path):
    rng = np.random.default_rng(5)
    model = quantized(tmp_path, float_cnn_softmax(rng, (2, 6, 6), 4, 5), rng.standard_normal((32, 2, 6, 6)).astype(np.float32))
    program = compile_model(model, lean_arch())
    x = np.random.default_rng(6).standard_normal((8, 2, 6, 6)).astype(np.float32)
    check_against_onnxruntime(model, program, x)


def test_float_model_with_softmax_compiles(tmp_path):
    """A float classifier ending in Softmax: quantized once by int8_model, compiled as published."""
    rng = np.random.default_rng(8)
    calibration = rng.standard_normal((64, 12)).astype(np.float32)
    model = int8_model(float_mlp_softmax(rng, [12, 8, 4]), calibration)
    program = compile_model(model, lean_arch())
    assert program.output.post == "softmax"
    check_against_onnxruntime(model, program, rng.standard_normal((10, 12)).astype(np.float32))


def test_program_round_trip_and_report(tmp_path):
    rng = np.random.default_rng(3)
    model = quantized(tmp_path, float_mlp_softmax(rng, [10, 6]), rng.standard_normal((32, 10)).astype(np.float32))
    program = compile_model(model, lean_arch())
    text = report(program)
    assert "Softmax" in text and "host" in text and program.output.post_name in text
    program.save(tmp_path / "prog")
    manifest = json.loads((tmp_path / "prog" / "program.json").read_text())
    assert manifest["version"] == FORMAT_VERSION and manifest["output"]["post"]["op"] == "softmax"
    loaded = Program.load(tmp_path / "prog")
    assert loaded.output == program.output
    # a program without a post-op writes no "post" key
    plain = TensorSpec("y", (4,), 0.1, 0, "int8")
    assert "post" not in plain.to_dict() and TensorSpec.from_dict(plain.to_dict()) == plain


def test_softmax_not_last_is_refused(tmp_path):
    rng = np.random.default_rng(4)
    model = quantized(tmp_path, float_mlp_softmax(rng, [8, 6], after=("Gemm",)),
                      rng.standard_normal((32, 8)).astype(np.float32))
    with pytest.raises(CompileError, match=r"node 'softmax' \(Softmax\) is not the network's last op"):
        compile_model(model, lean_arch())


def test_softmax_axis_over_batch_is_refused(tmp_path):
    rng = np.random.default_rng(4)
    model = float_mlp_softmax(rng, [8, 6])
    next(n for n in model.graph.node if n.op_type == "Softmax").attribute[0].i = 0
    model = quantized(tmp_path, model, rng.standard_normal((32, 8)).astype(np.float32))
    with pytest.raises(CompileError, match=r"node 'softmax' \(Softmax\): attribute 'axis' = 0 is unsupported"):
        compile_model(model, lean_arch())


def test_cli_run_with_host_softmax(tmp_path, capsys):
    rng = np.random.default_rng(9)
    model = quantized(tmp_path, float_mlp_softmax(rng, [16, 12, 5]), rng.standard_normal((64, 16)).astype(np.float32))
    onnx.save(model, tmp_path / "softmax_qdq.onnx")
    x = rng.standard_normal((6, 16)).astype(np.float32)
    np.savez(tmp_path / "input.npz", x=x, y=np.arange(6) % 5)
    status = cli.main(["run", str(tmp_path / "softmax_qdq.onnx"), "--sim", "none", "--input",
                       str(tmp_path / "input.npz"), "--report", str(tmp_path / "run.json")])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "Softmax" in out and "emulator vs onnxruntime int8" in out and "accuracy flowtile" in out
    assert json.loads((tmp_path / "run.json").read_text())["match"] is True
