"""Compiler tests: ONNX import, lowering (bit-exact to section 4, within 1 LSB of onnxruntime),
partitioning invariants, program emission, and the errors for models it cannot compile."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from compiler import (CompileError, compile_model, import_onnx, lower_layers, assign_tiles, quantize_multiplier,
                      reference_forward, report, tile_cycles)
from compiler.onnx_import import DenseLayer, QuantParams, fuse_matmul_add
from flowtile.arch import Arch, CONFIG_FIELDS
from flowtile.host import dequantize, pack_flits, quantize, unpack_flits
from flowtile.program import Program

MODELS = Path(__file__).resolve().parents[1] / "models"
logging.getLogger().setLevel(logging.ERROR)  # quantize_static's "consider pre-processing" advice


# --------------------------------------------------------------------------------------------------
# helpers: float MLPs built with onnx.helper, quantized with onnxruntime, run as the oracle
# --------------------------------------------------------------------------------------------------
def float_mlp(rng, widths, *, form="gemm_t", input_shape=None, relu_last=False, flatten="Flatten"):
    """A float MLP ``widths[0] -> ... -> widths[-1]`` with ReLU between layers.

    ``form``: "gemm_t" (Gemm transB=1), "gemm" (transB=0) or "matmul" (MatMul + Add).
    ``input_shape`` (without batch) other than ``(widths[0],)`` puts a Flatten/Reshape first.
    """
    input_shape = tuple(input_shape or (widths[0],))
    nodes, inits, x = [], [], "x"
    if input_shape != (widths[0],):
        if flatten == "Flatten":
            nodes.append(helper.make_node("Flatten", [x], ["flat"], name="flatten", axis=1))
        else:
            inits.append(numpy_helper.from_array(np.array([-1, widths[0]], np.int64), "flat_shape"))
            nodes.append(helper.make_node("Reshape", [x, "flat_shape"], ["flat"], name="reshape"))
        x = "flat"
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        w = (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)
        b = (0.1 * rng.standard_normal(n_out)).astype(np.float32)
        inits += [numpy_helper.from_array(w if form == "gemm_t" else w.T.copy(), f"w{i}"),
                  numpy_helper.from_array(b, f"b{i}")]
        if form == "matmul":
            nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"mm{i}"], name=f"matmul{i}"),
                      helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"h{i}"], name=f"add{i}")]
        else:
            nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [f"h{i}"], name=f"dense{i}",
                                          transB=int(form == "gemm_t")))
        x = f"h{i}"
        if i < len(widths) - 2 or relu_last:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"], name=f"relu{i}"))
            x = f"r{i}"
    graph = helper.make_graph(nodes, "mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *input_shape])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", widths[-1]])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


class _Reader(CalibrationDataReader):
    def __init__(self, x):
        self.batches = iter([{"x": x}])

    def get_next(self):
        return next(self.batches, None)


def quantize_qdq(model, calibration, *, activation="int8", per_channel=True, tmp_path=None):
    """The model as onnxruntime's quantize_static writes it (QDQ, int8 weights)."""
    out = tmp_path / f"q_{activation}_{per_channel}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # MatMul + Add quantized apart is a network no PE layer computes; the compiler fuses them first
        quantize_static(fuse_matmul_add(model), str(out), _Reader(calibration), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QInt8 if activation == "int8" else QuantType.QUInt8,
                        weight_type=QuantType.QInt8, per_channel=per_channel)
    return onnx.load(str(out))


def run_ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """onnxruntime with graph optimizations off: the QDQ graph op by op (fused int8 kernels vary by CPU)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def max_lsb_diff(model: onnx.ModelProto, x: np.ndarray, **import_options) -> int:
    """max |reference_forward - onnxruntime| in output LSBs (ORT's float output quantized back)."""
    imported = import_onnx(model, **import_options)
    ours = reference_forward(lower_layers(imported.layers), quantize(x, imported.input)).astype(np.int32)
    theirs = quantize(run_ort(imported.qdq_model, x), imported.output).astype(np.int32)
    assert ours.shape == theirs.shape
    return int(np.abs(ours - theirs).max())


def check_program(program: Program, tmp_path: Path) -> None:
    """Partition and emission invariants, then validate and a save/load round trip."""
    arch, lanes = program.arch, program.arch.lanes
    program.validate()
    assert len(program.tiles) == arch.n_tiles
    position = 0
    for index, layer in enumerate(program.layers):
        k = -(-layer.n_in // lanes)
        tiles = program.tiles[position:position + len(layer.tiles)]
        assert [(t.row, t.col) for t in tiles] == list(layer.tiles)  # consecutive on the chain
        assert sum(t.config["n_out"] for t in tiles) == layer.n_out
        passed = 0
        for j, tile in enumerate(tiles):
            c = tile.config
            last = j == len(tiles) - 1
            assert c["n_in_words"] == k and c["forward"] == int(not last) and c["n_pass"] == passed
            assert 1 <= c["n_out"] <= arch.max_tile_outputs
            assert last or c["n_out"] % lanes == 0
            assert c["w_base"] == 0 and c["act_base"] == c["n_out"] * k
            assert (c["n_out"] + 1) * k <= arch.sram_words
            assert tile.sram.shape == (c["n_out"] * k, lanes) and tile.params.shape == (c["n_out"], 3)
            passed += -(-c["n_out"] // lanes)
        assert passed == -(-layer.n_out // lanes)
        position += len(tiles)
    for p, tile in enumerate(program.tiles):
        assert set(tile.config) == {name for name, _, _ in CONFIG_FIELDS}
        if p == arch.n_tiles - 1:
            assert tile.config["dest_host"] == 1
        else:
            assert tile.config["dest_host"] == 0
            assert (tile.config["dest_row"], tile.config["dest_col"]) == arch.chain_position(p + 1)
        if p >= position:  # pass-through tiles behind the last layer
            assert tile.config["n_out"] == 0 and tile.config["n_in_words"] == 0
            assert tile.config["n_pass"] == program.output_words
    loaded = Program.load(program.save(tmp_path / "prog"))
    assert [t.config for t in loaded.tiles] == [t.config for t in program.tiles]
    for a, b in zip(loaded.tiles, program.tiles):
        assert np.array_equal(a.sram, b.sram) and np.array_equal(a.params, b.params)
    assert loaded.input == program.input and loaded.output == program.output and loaded.layers == program.layers


def emulate_weights(program: Program, layers) -> None:
    """The SRAM images and parameter tables hold exactly the lowered layers' weights and parameters."""
    lanes = program.arch.lanes
    position = 0
    for info, layer in zip(program.layers, layers):
        tiles = program.tiles[position:position + len(info.tiles)]
        weight = np.concatenate([t.sram.reshape(t.config["n_out"], -1) for t in tiles])
        assert np.array_equal(weight[:, :layer.n_in], layer.weight) and not weight[:, layer.n_in:].any()
        assert weight.shape[1] % lanes == 0
        assert np.array_equal(np.concatenate([t.params for t in tiles]), layer.params)
        position += len(tiles)


def run_functionally(program: Program, x_q: np.ndarray) -> np.ndarray:
    """Dataflow of section 4 without timing: each chain tile per inference stores K flits (forwarding them
    if ``forward``), passes P, computes from its SRAM image and parameters and emits; returns the host's."""
    lanes = program.arch.lanes
    results = []
    for sample in x_q:
        stream = list(pack_flits(sample[None, :], lanes))
        for tile in program.tiles:
            c, out = tile.config, []
            k, p, n_out = c["n_in_words"], c["n_pass"], c["n_out"]
            assert len(stream) == k + p, f"tile {tile.key} receives {len(stream)} flits, expects {k + p}"
            act = np.array(stream[:k], dtype=np.int64).reshape(-1)
            out += stream[:k] if c["forward"] else []
            out += stream[k:k + p]
            if n_out:
                weight = tile.sram[c["w_base"]:c["w_base"] + n_out * k].astype(np.int64).reshape(n_out, k * lanes)
                bias, mult, shift = tile.params.T
                acc = bias + weight @ act
                y = np.clip(((acc * mult + (1 << (shift - 1))) >> shift) + c["zp_out"], c["clamp_lo"], c["clamp_hi"])
                out += list(pack_flits(y.astype(np.int8)[None, :], lanes))
            stream = out
        results.append(unpack_flits(np.array(stream), 1, program.output.length)[0])
    return np.array(results, dtype=np.int8)


# --------------------------------------------------------------------------------------------------
# the bundled model
# --------------------------------------------------------------------------------------------------
def test_bundled_digits_model(tmp_path):
    model = MODELS / "digits_mlp.onnx"
    test = np.load(MODELS / "digits_test.npz")
    x, y = test["x"], test["y"]
    imported = import_onnx(model)
    assert [(l.name, l.n_in, l.n_out) for l in imported.layers] == [("fc1", 64, 64), ("fc2", 64, 32), ("fc3", 32, 10)]
    assert imported.input.shape == (64,) and imported.output.shape == (10,)
    layers = lower_layers(imported.layers)
    ours = reference_forward(layers, quantize(x, imported.input))
    theirs = quantize(run_ort(imported.qdq_model, x), imported.output)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1
    assert np.mean(np.argmax(dequantize(ours, imported.output), axis=1) == y) >= 0.93
    program = compile_model(model, Arch())
    check_program(program, tmp_path)
    emulate_weights(program, layers)
    assert np.array_equal(run_functionally(program, quantize(x[:40], program.input)), ours[:40])
    exact = compile_model(model, Arch(rows=1, cols=3, lanes=4))  # one tile per layer, no pass-through tiles
    assert [len(layer.tiles) for layer in exact.layers] == [1, 1, 1] and exact.tiles[-1].config["n_out"] == 10
    check_program(exact, tmp_path)
    assert np.array_equal(run_functionally(exact, quantize(x[:40], exact.input)), ours[:40])
    text = report(program)
    assert "fc1" in text and "64 x 64" in text and "bottleneck" in text


def test_float_model_is_quantized_with_calibration(tmp_path):
    test = np.load(MODELS / "digits_test.npz")
    x = test["x"]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="no calibration")  # calibration given: no warning
        program = compile_model(MODELS / "digits_mlp_float.onnx", Arch(), calibration=x[:100])
    check_program(program, tmp_path)
    with pytest.warns(UserWarning, match="calibration"):
        import_onnx(MODELS / "digits_mlp_float.onnx")


# --------------------------------------------------------------------------------------------------
# seeded random MLPs against onnxruntime
# --------------------------------------------------------------------------------------------------
RANDOM_CASES = [
    # widths, form, activation, per_channel, input_shape
    ([64, 64, 10], "gemm_t", "int8", True, None),
    ([7, 1], "gemm_t", "int8", True, None),
    ([300, 1], "gemm", "uint8", False, None),
    ([13, 300, 27, 5], "matmul", "int8", False, None),
    ([1, 9, 17, 33, 2], "gemm_t", "uint8", True, None),
    ([20, 8, 3], "gemm", "int8", True, (4, 5)),
    ([24, 100, 12], "matmul", "uint8", True, (2, 3, 4)),
    ([150, 257, 40], "gemm_t", "int8", False, None),
]


@pytest.mark.parametrize("case", range(len(RANDOM_CASES)))
def test_random_mlp_matches_onnxruntime(case, tmp_path):
    widths, form, activation, per_channel, input_shape = RANDOM_CASES[case]
    rng = np.random.default_rng(1000 + case)
    model = float_mlp(rng, widths, form=form, input_shape=input_shape, relu_last=case % 2 == 1,
                      flatten="Flatten" if case % 2 else "Reshape")
    shape = tuple(input_shape or (widths[0],))
    calibration = rng.standard_normal((64, *shape)).astype(np.float32)
    x = (1.5 * rng.standard_normal((128, *shape))).astype(np.float32)  # beyond the calibration range too
    qdq = quantize_qdq(model, calibration, activation=activation, per_channel=per_channel, tmp_path=tmp_path)
    assert max_lsb_diff(qdq, x) <= 1
    layers = lower_layers(import_onnx(qdq).layers)
    for arch in (Arch(), Arch(rows=3, cols=5, lanes=4, sram_bytes=16384, max_tile_outputs=64)):
        program = compile_model(qdq, arch)
        check_program(program, tmp_path)
        emulate_weights(program, layers)
        x_q = quantize(x[:8], program.input)
        assert np.array_equal(run_functionally(program, x_q), reference_forward(layers, x_q))
    assert program.input.dtype == activation and program.input.shape == shape


def test_float_path_per_tensor_uint8_matches_onnxruntime():
    rng = np.random.default_rng(7)
    model = float_mlp(rng, [30, 19, 4], form="matmul")
    calibration = rng.standard_normal((64, 30)).astype(np.float32)
    x = rng.standard_normal((64, 30)).astype(np.float32)
    for per_channel in (True, False):
        for activation in ("int8", "uint8"):
            assert max_lsb_diff(model, x, calibration=calibration, per_channel=per_channel,
                                activation_type=activation) <= 1


def _insert_explicit_relu(qdq: onnx.ModelProto, *, after_dq: bool) -> onnx.ModelProto:
    """Put a Relu on the first layer's output: before its QuantizeLinear, or after its DequantizeLinear
    followed by a QuantizeLinear/DequantizeLinear pair with the same parameters."""
    model = onnx.ModelProto()
    model.CopyFrom(qdq)
    nodes = list(model.graph.node)
    dense = next(n for n in nodes if n.op_type == "Gemm")
    q = next(n for n in nodes if n.input and n.input[0] == dense.output[0])
    if not after_dq:
        relu = helper.make_node("Relu", [dense.output[0]], ["relu_out"], name="explicit_relu")
        q.input[0] = "relu_out"
        new = nodes[:nodes.index(q)] + [relu] + nodes[nodes.index(q):]
    else:
        dq = next(n for n in nodes if n.input and n.input[0] == q.output[0])
        readers = [n for n in nodes if dq.output[0] in n.input]
        relu = helper.make_node("Relu", [dq.output[0]], ["relu_out"], name="explicit_relu")
        q2 = helper.make_node("QuantizeLinear", ["relu_out", q.input[1], q.input[2]], ["relu_q"], name="relu_q")
        dq2 = helper.make_node("DequantizeLinear", ["relu_q", q.input[1], q.input[2]], ["relu_dq"], name="relu_dq")
        for reader in readers:
            reader.input[list(reader.input).index(dq.output[0])] = "relu_dq"
        new = nodes[:nodes.index(dq) + 1] + [relu, q2, dq2] + nodes[nodes.index(dq) + 1:]
    del model.graph.node[:]
    model.graph.node.extend(new)
    return model


def _append_final_relu(qdq: onnx.ModelProto) -> onnx.ModelProto:
    """A float Relu on the dequantized graph output."""
    model = onnx.ModelProto()
    model.CopyFrom(qdq)
    output = model.graph.output[0]
    model.graph.node.append(helper.make_node("Relu", [output.name], ["relu_y"], name="final_relu"))
    output.name = "relu_y"
    return model


@pytest.mark.parametrize("where", ["before_q", "after_dq", "graph_end"])
def test_explicit_relu(where, tmp_path):
    rng = np.random.default_rng(11)
    model = float_mlp(rng, [12, 20, 6], relu_last=False)
    calibration = rng.standard_normal((64, 12)).astype(np.float32)
    qdq = quantize_qdq(model, calibration, tmp_path=tmp_path)
    qdq = _append_final_relu(qdq) if where == "graph_end" else _insert_explicit_relu(qdq, after_dq=where == "after_dq")
    imported = import_onnx(qdq)
    relu_layer = -1 if where == "graph_end" else 0
    assert imported.layers[relu_layer].relu
    layers = lower_layers(imported.layers)
    assert layers[relu_layer].clamp_lo == max(-128, layers[relu_layer].zp_out)
    assert max_lsb_diff(qdq, rng.standard_normal((64, 12)).astype(np.float32)) <= 1


@pytest.mark.parametrize("as_matmul_add", [False, True])
def test_float_bias_in_qdq_model(as_matmul_add, tmp_path):
    """A QDQ model whose bias is a float constant: on the Gemm, or in an Add right after a MatMul."""
    rng = np.random.default_rng(12)
    qdq = quantize_qdq(float_mlp(rng, [10, 21, 5], form="gemm"), rng.standard_normal((64, 10)).astype(np.float32),
                       tmp_path=tmp_path)
    nodes = list(qdq.graph.node)
    for dense in [n for n in nodes if n.op_type == "Gemm"]:
        bias_dq = next(n for n in nodes if n.output[0] == dense.input[2])
        consts = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
        real = (consts[bias_dq.input[0]].astype(np.float64) * consts[bias_dq.input[1]]).astype(np.float32)
        qdq.graph.initializer.append(numpy_helper.from_array(real, dense.name + "_float_bias"))
        nodes.remove(bias_dq)
        if as_matmul_add:
            add = helper.make_node("Add", [dense.name + "_mm", dense.name + "_float_bias"], [dense.output[0]],
                                   name=dense.name + "_add")
            matmul = helper.make_node("MatMul", [dense.input[0], dense.input[1]], [dense.name + "_mm"], name=dense.name)
            nodes[nodes.index(dense):nodes.index(dense) + 1] = [matmul, add]
        else:
            dense.input[2] = dense.name + "_float_bias"
    del qdq.graph.node[:]
    qdq.graph.node.extend(nodes)
    layers = import_onnx(qdq).layers
    assert [l.op for l in layers] == (["MatMul"] * 2 if as_matmul_add else ["Gemm"] * 2)
    assert max_lsb_diff(qdq, rng.standard_normal((128, 10)).astype(np.float32)) <= 1


def test_flatten_between_quantized_tensors(tmp_path):
    """x -> Q -> DQ -> Flatten -> Q -> DQ (same parameters) -> Gemm: a relabelling, not a requantization."""
    rng = np.random.default_rng(13)
    calibration = rng.standard_normal((64, 3, 4)).astype(np.float32)
    qdq = quantize_qdq(float_mlp(rng, [12, 9, 4], input_shape=(3, 4)), calibration, tmp_path=tmp_path)
    nodes = list(qdq.graph.node)
    flatten = next(n for n in nodes if n.op_type == "Flatten")
    q = next(n for n in nodes if n.op_type == "QuantizeLinear" and n.input[0] == flatten.output[0])
    dq = next(n for n in nodes if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0])
    dense = next(n for n in nodes if n.op_type == "Gemm")
    q.input[0] = "x"
    flatten.input[0], flatten.output[0] = dq.output[0], "flat_dq"
    q2 = helper.make_node("QuantizeLinear", ["flat_dq", q.input[1], q.input[2]], ["flat_q"], name="flat_q")
    dq2 = helper.make_node("DequantizeLinear", ["flat_q", q.input[1], q.input[2]], ["flat_x"], name="flat_x")
    dense.input[0] = "flat_x"
    nodes.remove(flatten)
    nodes[nodes.index(dq) + 1:nodes.index(dq) + 1] = [flatten, q2, dq2]
    del qdq.graph.node[:]
    qdq.graph.node.extend(nodes)
    imported = import_onnx(qdq)
    assert imported.input.shape == (3, 4) and imported.layers[0].n_in == 12
    assert max_lsb_diff(qdq, rng.standard_normal((64, 3, 4)).astype(np.float32)) <= 1


# --------------------------------------------------------------------------------------------------
# lowering details
# --------------------------------------------------------------------------------------------------
def test_quantize_multiplier_ranges():
    for ratio in (1e-6, 0.37, 0.5, 1.0, 3.99, 1234.5, 2.0**-31):
        m, s = quantize_multiplier(ratio)
        assert 2**30 <= m < 2**31 and 1 <= s <= 62
        assert abs(m / 2**s - ratio) <= ratio * 2**-30
    m, s = quantize_multiplier(2.0**-40)  # tiny: shift clamped to 62, multiplier below 2^30
    assert s == 62 and m == 2**22
    assert quantize_multiplier(1e-30) == (0, 62)
    with pytest.raises(CompileError, match="too large"):
        quantize_multiplier(2.0**31, where="layer 'x'")


def _dense(name="big", n_in=4, n_out=3, bias=0, zp_in=0, dtype="int8"):
    return DenseLayer(name, "Gemm", np.ones((n_out, n_in), np.int8), np.full(n_out, bias, np.int32),
                      QuantParams(0.1, zp_in, dtype), np.full(n_out, 0.01), QuantParams(0.05, 3, "int8"), True)


def test_bias_folding_and_uint8_zero_point():
    layer = lower_layers([_dense(bias=10, zp_in=130, dtype="uint8")])[0]
    assert np.all(layer.bias == 10 - (130 - 128) * 4)
    assert layer.zp_out == 3 and layer.clamp_lo == 3 and layer.clamp_hi == 127


def test_accumulator_overflow_is_rejected():
    with pytest.raises(CompileError, match=r"layer 'big'.*2\^31 - 1"):
        lower_layers([_dense(bias=2**31 - 100)])


# --------------------------------------------------------------------------------------------------
# partitioning
# --------------------------------------------------------------------------------------------------
def test_partition_balances_and_respects_limits():
    arch = Arch(rows=2, cols=4, lanes=8, sram_bytes=4096, max_tile_outputs=40)  # 512 words
    layers = [_dense("a", n_in=100, n_out=70), _dense("b", n_in=70, n_out=9), _dense("c", n_in=9, n_out=3)]
    splits = assign_tiles(layers, arch)
    assert sum(len(s) for s in splits) <= arch.n_tiles
    for layer, slices in zip(layers, splits):
        assert sum(s.n_out for s in slices) == layer.n_out
        for s in slices[:-1]:
            assert s.n_out % arch.lanes == 0 and s.forward
        for s in slices:
            assert s.n_out <= arch.max_tile_outputs and (s.n_out + 1) * s.n_in_words <= arch.sram_words
    # layer 'a' fits in 3 tiles (32 + 32 + 6 outputs); as the bottleneck it gets all 3 spare tiles,
    # split (16, 16, 8, 8, 8, 14): later tiles pass more result flits, so they compute fewer outputs
    assert [len(s) for s in splits] == [6, 1, 1]
    slowest = max(tile_cycles(s.n_in_words, s.n_pass, s.n_out, 8) for sl in splits for s in sl)
    assert slowest == tile_cycles(13, 2, 16, 8) < tile_cycles(13, 4, 32, 8)


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------
def test_oversize_model_names_bytes_needed_and_available():
    rng = np.random.default_rng(3)
    model = float_mlp(rng, [512, 512, 10])
    calibration = rng.standard_normal((16, 512)).astype(np.float32)
    with pytest.raises(CompileError) as info:
        compile_model(model, Arch(rows=2, cols=2), calibration=calibration)
    message = str(info.value)
    assert "dense0" in message and "Gemm" in message
    assert "262144 bytes" in message          # 512 x 512 int8 weights needed
    assert "131072 bytes of SRAM" in message  # 4 tiles x 32768 available
    assert "'sram_bytes'" in message and "\n" not in message


def test_more_layers_than_tiles():
    model = float_mlp(np.random.default_rng(4), [4, 4, 4, 4])
    with pytest.raises(CompileError, match=r"3 layers.*2 tiles"):
        compile_model(model, Arch(rows=1, cols=2), calibration=np.zeros((4, 4), np.float32))


def test_unsupported_op_names_node_and_op():
    graph = helper.make_graph(
        [helper.make_node("Sigmoid", ["x"], ["y"], name="squash")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    with pytest.raises(CompileError, match=r"node 'squash' \(Sigmoid\)"):
        compile_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), Arch())


def test_conv_in_qdq_model_names_node_and_op(tmp_path):
    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.standard_normal((2, 1, 3, 3)).astype(np.float32), "k"),
             numpy_helper.from_array(rng.standard_normal((3, 8)).astype(np.float32), "w"),
             numpy_helper.from_array(np.zeros(3, np.float32), "b")]
    nodes = [helper.make_node("Conv", ["x", "k"], ["c"], name="conv_7"),
             helper.make_node("Flatten", ["c"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "w", "b"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(CompileError, match=r"node 'conv_7' \(Conv\)"):  # float: rejected before quantizing
        import_onnx(model)
    qdq = quantize_qdq(model, rng.standard_normal((8, 1, 4, 4)).astype(np.float32), tmp_path=tmp_path)
    with pytest.raises(CompileError, match=r"node 'conv_7' \(Conv\): unsupported op"):
        import_onnx(qdq)


def test_malformed_file(tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"\x08\x07this is not a protobuf\xff\xff")
    with pytest.raises(CompileError, match=r"broken.onnx' is not a valid ONNX model"):
        compile_model(path, Arch())
    with pytest.raises(CompileError, match="does not exist"):
        compile_model(tmp_path / "missing.onnx", Arch())


def _qdq_model(tmp_path, seed=6):
    rng = np.random.default_rng(seed)
    return quantize_qdq(float_mlp(rng, [6, 5, 4]), rng.standard_normal((8, 6)).astype(np.float32), tmp_path=tmp_path)


def test_gemm_alpha_is_rejected_naming_attribute(tmp_path):
    qdq = _qdq_model(tmp_path)
    dense = next(n for n in qdq.graph.node if n.op_type == "Gemm")
    dense.attribute.append(helper.make_attribute("alpha", 2.0))
    with pytest.raises(CompileError, match=r"node 'dense0' \(Gemm\): attribute 'alpha' = 2.0"):
        import_onnx(qdq)


def test_nonzero_weight_zero_point_is_rejected(tmp_path):
    qdq = _qdq_model(tmp_path)
    zp = next(t for t in qdq.graph.initializer if t.name.startswith("w0") and "zero_point" in t.name)
    zp.CopyFrom(numpy_helper.from_array(np.full(numpy_helper.to_array(zp).shape, 3, np.int8), zp.name))
    with pytest.raises(CompileError, match=r"DequantizeLinear\): non-zero weight zero point 3"):
        import_onnx(qdq)


def test_matmul_add_quantized_apart_is_rejected(tmp_path):
    rng = np.random.default_rng(8)
    model = float_mlp(rng, [6, 5, 4], form="matmul")
    path = tmp_path / "apart.onnx"
    quantize_static(model, str(path), _Reader(rng.standard_normal((8, 6)).astype(np.float32)),
                    quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    with pytest.raises(CompileError, match=r"node 'add0' \(Add\): adds a bias after node 'matmul0' \(MatMul\)"):
        import_onnx(path)
    assert max_lsb_diff(model, rng.standard_normal((16, 6)).astype(np.float32),  # the float model compiles
                        calibration=rng.standard_normal((8, 6)).astype(np.float32)) <= 1


def test_branch_is_rejected(tmp_path):
    qdq = _qdq_model(tmp_path)
    first_dq = next(n for n in qdq.graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith("x"))
    qdq.graph.node.append(helper.make_node("Relu", [first_dq.output[0]], ["extra"], name="side_branch"))
    qdq.graph.output.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, ["N", 6]))
    with pytest.raises(CompileError, match=r"feeds node 'dense0' \(Gemm\) and node 'side_branch' \(Relu\): branches"):
        import_onnx(qdq)


def test_dynamic_feature_dimension_is_rejected():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="r")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "F"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "F"])])
    with pytest.raises(CompileError, match="dimension 1 is dynamic"):
        import_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
