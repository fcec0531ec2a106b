"""nn.Linear on a sequence: a graph input ``[N, T, C]``, ``MatMul`` over its last axis (+ bias), flattened into dense
layers (compiler/onnx_import.py ``match_sequence_linear``; TensorSpec layout "tc").

A MatMul over the last axis of ``[N, T, C]`` is a 1x1 convolution over a 1 x T map of C channels, and ``[T][C]``
row-major is the on-chip pixel-major order: the host packs the sequence like a ``chw`` map (``ceil(C / L)`` words a
step), the layer runs as op MAC with a 1x1 window, and the dense layer after the flatten reads ``(t, k)`` columns.
Checked against onnxruntime's int8 model (graph optimizations off) within 1 LSB, float and QDQ, int8 and uint8
activations; one case on Verilator, equal to the emulator in flits and cycles.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from flowtile.testing.archs import lean_arch
from flowtile.compiler import CompileError, compile_model, import_onnx, int8_model, lower_layers, reference_forward
from flowtile.emulator import emulate
from flowtile.host import input_flits, outputs_from_flits, pack_flits, quantize, unpack_flits
from flowtile.oracle import onnxruntime_int8_output
from flowtile.program import Program, ProgramError, TensorSpec
from flowtile.testing.oracle_checks import assert_rtl_matches_emulator

T, C, K, CLASSES = 6, 5, 12, 10  # C and K not multiples of the 8 lanes: channel padding on both maps


def _const(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def sequence_model(seed: int = 0, *, linears: int = 1, head: bool = True, tail: str = "flatten",
                   steps: int = T) -> onnx.ModelProto:
    """``x [N, T, C] -> (MatMul(W [c, K]) -> Add(b [K]) -> Relu) * linears -> Flatten|Reshape -> Gemm``, as torch's
    TorchScript exporter writes ``nn.Linear`` on 3-D input (the weight transposed to ``[in, out]``)."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    current, channels = "x", C
    for i in range(linears):
        w = rng.standard_normal((channels, K)) / np.sqrt(channels)
        b = rng.standard_normal(K) * 0.1
        inits += [_const(f"w{i}", w), _const(f"b{i}", b)]
        nodes += [helper.make_node("MatMul", [current, f"w{i}"], [f"mm{i}"], name=f"/proj{i}/MatMul"),
                  helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"add{i}"], name=f"/proj{i}/Add"),
                  helper.make_node("Relu", [f"add{i}"], [f"h{i}"], name=f"/relu{i}")]
        current, channels = f"h{i}", K
    if head:
        if tail == "flatten":
            nodes.append(helper.make_node("Flatten", [current], ["flat"], name="/flatten", axis=1))
        else:  # x.reshape(x.shape[0], -1) with a constant target
            inits.append(numpy_helper.from_array(np.array([-1, steps * K], np.int64), "target"))
            nodes.append(helper.make_node("Reshape", [current, "target"], ["flat"], name="/reshape"))
        inits += [_const("wh", rng.standard_normal((CLASSES, steps * K)) / np.sqrt(steps * K)),
                  _const("bh", rng.standard_normal(CLASSES) * 0.1)]
        nodes.append(helper.make_node("Gemm", ["flat", "wh", "bh"], ["y"], name="/head/Gemm", transB=1))
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", CLASSES])
    else:
        nodes[-1].output[0] = "y"
        out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", steps, K])
    graph = helper.make_graph(nodes, "seq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", steps, C])],
                              [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def samples(n: int, seed: int, steps: int = T) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, steps, C)).astype(np.float32)


def quantize_static_qdq(model: onnx.ModelProto, tmp_path, *, uint8: bool) -> onnx.ModelProto:
    """The model as onnxruntime's quantize_static writes it (QDQ, per-channel int8 weights)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    calibration = samples(64, 1, model.graph.input[0].type.tensor_type.shape.dim[1].dim_value)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"x": calibration}])

        def get_next(self):
            return next(self.batches, None)

    src, dst = tmp_path / "float.onnx", tmp_path / "qdq.onnx"
    onnx.save(model, str(src))
    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.ERROR)
    try:
        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8 if uint8 else QuantType.QInt8, weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    return onnx.load(str(dst))


def check_within_1_lsb(int8, program: Program, x: np.ndarray) -> None:
    """Emulator == the compiler's integer model, and within 1 LSB of onnxruntime's int8 model."""
    _, flits = input_flits(program, x)
    chip, _ = outputs_from_flits(program, emulate(program, flits, len(x)).out_flits, len(x))
    imported = import_onnx(int8)
    meant = reference_forward(lower_layers(imported.layers), quantize(x, imported.input))
    assert np.array_equal(chip, meant), "emulator differs from reference_forward"
    ort_q, _ = onnxruntime_int8_output(int8, program, x)
    assert chip.shape == ort_q.shape
    diff = np.abs(chip.astype(np.int32) - ort_q.astype(np.int32))
    assert diff.max() <= 1, f"{int((diff > 1).sum())} outputs more than 1 LSB off onnxruntime (max {diff.max()})"


@pytest.mark.parametrize("tail", ["flatten", "reshape"])
def test_float_sequence_linear_compiles_and_matches_onnxruntime(tail):
    int8 = int8_model(sequence_model(0, tail=tail), samples(64, 1))
    program = compile_model(int8, lean_arch())
    assert program.input.layout == "tc" and program.input.shape == (T, C)
    assert program.input.words(8) == T * 1
    ops = [layer.op for layer in program.layers]
    assert ops[0] == "MatMul" and ops[-1] == "Gemm", ops
    check_within_1_lsb(int8, program, samples(32, 2))


@pytest.mark.parametrize("uint8", [False, True], ids=["int8", "uint8"])
def test_qdq_sequence_linear_matches_onnxruntime(tmp_path, uint8):
    int8 = int8_model(quantize_static_qdq(sequence_model(3), tmp_path, uint8=uint8))
    program = compile_model(int8, lean_arch())
    assert program.input.layout == "tc"
    check_within_1_lsb(int8, program, samples(32, 4))


def test_two_sequence_linears_then_dense(tmp_path):
    """A MatMul over the last axis of an intermediate [N, T, K] (the first linear's output)."""
    int8 = int8_model(quantize_static_qdq(sequence_model(5, linears=2), tmp_path, uint8=False))
    program = compile_model(int8, lean_arch())
    assert [layer.op for layer in program.layers].count("MatMul") == 2
    check_within_1_lsb(int8, program, samples(32, 6))


@pytest.mark.parametrize("batch", [1, "N"])
def test_fixed_batch_export_with_a_constant_reshape(batch):
    """torch dynamo traces a fixed batch of 1 (``Reshape([1, T*K])``), TorchScript writes ``Reshape([0, T*K])``:
    both a flatten of the sequence; the batch is made symbolic on import."""
    model = sequence_model(9, tail="reshape")
    for tensor in (model.graph.input[0], model.graph.output[0]):
        tensor.type.tensor_type.shape.dim[0].Clear()
        if batch == 1:
            tensor.type.tensor_type.shape.dim[0].dim_value = 1
        else:
            tensor.type.tensor_type.shape.dim[0].dim_param = "N"
    target = next(t for t in model.graph.initializer if t.name == "target")
    target.CopyFrom(numpy_helper.from_array(np.array([1 if batch == 1 else 0, T * K], np.int64), "target"))
    calibration = samples(1 if batch == 1 else 64, 1)
    int8 = int8_model(model, calibration)
    program = compile_model(int8, lean_arch())
    assert program.input.layout == "tc"
    x = samples(8, 10)
    if batch == 1:  # a fixed-batch int8 model runs one sample at a time in onnxruntime
        _, flits = input_flits(program, x)
        chip, _ = outputs_from_flits(program, emulate(program, flits, len(x)).out_flits, len(x))
        ort_q = np.concatenate([onnxruntime_int8_output(int8, program, x[i:i + 1])[0] for i in range(len(x))])
        assert np.abs(chip.astype(np.int32) - ort_q.astype(np.int32)).max() <= 1
    else:
        check_within_1_lsb(int8, program, x)


def test_sequence_output_travels_as_tc():
    """A network ending on the sequence [N, T, K]: the output is unpacked from pixel-major flits to model order."""
    int8 = int8_model(sequence_model(7, head=False), samples(64, 1))
    program = compile_model(int8, lean_arch())
    assert program.output.layout == "tc" and program.output.shape == (T, K)
    check_within_1_lsb(int8, program, samples(16, 8))


def test_host_packs_tc_pixel_major_with_channel_padding():
    spec = TensorSpec("x", (3, 10), 0.1, 0, layout="tc")
    values = np.arange(2 * 30, dtype=np.int64).reshape(2, 30).astype(np.int8)
    flits = pack_flits(values, 8, spec)
    assert flits.shape == (2 * 3 * 2, 8) and spec.words(8) == 6
    # step t of sample b: words 2t, 2t+1 of that sample; channels 0..7 then 8, 9 and six zero lanes
    assert np.array_equal(flits[2 * 1], values[0, 10:18]) and np.array_equal(flits[2 * 1 + 1, :2], values[0, 18:20])
    assert not flits[1::2, 2:].any()
    assert np.array_equal(unpack_flits(flits, 2, 30, spec), values)


def test_tc_layout_validation_and_program_round_trip(tmp_path):
    with pytest.raises(ProgramError, match=r"layout 'tc' needs a \(T, C\) shape"):
        TensorSpec("x", (2, 3, 4), 1.0, 0, layout="tc")
    spec = TensorSpec("x", (T, C), 0.5, 3, "uint8", layout="tc")
    assert TensorSpec.from_dict(spec.to_dict()) == spec
    int8 = int8_model(sequence_model(0), samples(64, 1))
    program = compile_model(int8, lean_arch())
    loaded = Program.load(program.save(tmp_path / "prog"))
    assert loaded.input == program.input and loaded.input.layout == "tc"
    x = samples(4, 9)
    _, flits = input_flits(loaded, x)
    ours = emulate(loaded, flits, len(x)).out_flits
    _, flits = input_flits(program, x)
    assert np.array_equal(ours, emulate(program, flits, len(x)).out_flits)


def _qdq_with(tmp_path, extra_nodes, extra_inits, out_shape) -> onnx.ModelProto:
    """The QDQ sequence model with ``extra_nodes`` reading the first linear's output instead of the head."""
    model = sequence_model(11, head=False)
    graph = model.graph
    graph.node[-1].output[0] = "h0"
    graph.node.extend(extra_nodes)
    graph.initializer.extend(extra_inits)
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape))
    return quantize_static_qdq(model, tmp_path, uint8=False)


def test_reduction_over_the_sequence_is_rejected_naming_node_and_input(tmp_path):
    mean = helper.make_node("ReduceMean", ["h0"], ["y"], name="/mean", axes=[1], keepdims=0)
    int8 = _qdq_with(tmp_path, [mean], [], ["N", K])
    with pytest.raises(CompileError, match=r"node '/mean' \(ReduceMean\): its input '.*' is a sequence \[N, 6, 12\]"):
        compile_model(int8, lean_arch())


def test_attention_like_matmul_of_two_activations_is_rejected(tmp_path):
    transpose = helper.make_node("Transpose", ["h0"], ["ht"], name="/t", perm=[0, 2, 1])
    scores = helper.make_node("MatMul", ["h0", "ht"], ["y"], name="/scores")
    int8 = _qdq_with(tmp_path, [transpose, scores], [], ["N", T, T])
    with pytest.raises(CompileError, match=r"tensor '.*' is a sequence \[N, 6, 12\] read by node '/t' \(Transpose\) "
                                           r"and node '/scores' \(MatMul\); forks of a sequence \(attention"):
        compile_model(int8, lean_arch())


@pytest.mark.rtl
def test_rtl_matches_emulator_on_a_sequence_model(tmp_path):
    int8 = int8_model(quantize_static_qdq(sequence_model(13), tmp_path, uint8=False))
    program = compile_model(int8, lean_arch())
    assert program.input.layout == "tc"
    x = samples(4, 14)
    assert_rtl_matches_emulator(program, x)
