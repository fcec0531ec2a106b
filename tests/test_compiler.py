"""Compiler tests: ONNX import, lowering (bit-exact to section 4, within 1 LSB of onnxruntime),
partitioning invariants, program emission, and the errors for models it cannot compile."""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from flowtile.compiler import (CompileError, build_program, compile_model, import_onnx, lower_layers,
                      assign_tiles, pack_input_window, quantize_multiplier, reference_forward, report, tile_cycles,
                      weight_rows)
from flowtile.compiler.emit import dense_graph_input
from flowtile.compiler.onnx_import import DenseLayer, QuantParams, fuse_matmul_add
from flowtile.arch import ADD_MULT_MAX, OP_ADD, OP_BCAST, OP_CONCAT, OP_LANE, OP_MAC, OP_MAX, Arch, CONFIG_FIELDS
from flowtile.testing.archs import lean_arch
from flowtile.host import dequantize, input_flits, outputs_from_flits, pack_flits, quantize, unpack_flits
from flowtile.oracle import ort_session
from flowtile.program import Program, TensorSpec

from flowtile.testing import random_models
from flowtile.testing.program_builder import stream_offsets


def shift_round_half_even(value, shift):
    """``value / 2^shift`` rounded to nearest, ties to even (section 4), by floor division."""
    quotient, remainder = value >> shift, value - ((value >> shift) << shift)
    half = 1 << (shift - 1)
    return quotient + ((remainder > half) | ((remainder == half) & ((quotient & 1) == 1)))


MODELS = Path(__file__).resolve().parents[1] / "models"


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


def quantize_qdq(model, calibration, *, activation="int8", per_channel=True, tmp_path=None):
    """The model as onnxruntime's quantize_static writes it (QDQ, int8 weights)."""
    float_path = tmp_path / f"f_{activation}_{per_channel}.onnx"
    # MatMul + Add quantized apart is a network no PE layer computes; the compiler fuses them first
    onnx.save(fuse_matmul_add(model), float_path)
    out = random_models.quantize_qdq(float_path, tmp_path / f"q_{activation}_{per_channel}.onnx", calibration,
                                     activation_uint8=(activation == "uint8"), per_channel=per_channel)
    return onnx.load(str(out))


def run_ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """onnxruntime with graph optimizations off: the QDQ graph op by op (fused int8 kernels vary by CPU)."""
    session = ort_session(model)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def max_lsb_diff(model: onnx.ModelProto, x: np.ndarray, **import_options) -> int:
    """max |reference_forward - onnxruntime| in output LSBs (ORT's float output quantized back)."""
    imported = import_onnx(model, **import_options)
    ours = reference_forward(lower_layers(imported.layers), quantize(x, imported.input)).astype(np.int32)
    theirs = quantize(run_ort(imported.qdq_model, x), imported.output).astype(np.int32)
    assert ours.shape == theirs.shape
    return int(np.abs(ours - theirs).max())


def per_layer_lsb(imported, layers, x: np.ndarray) -> list[int]:
    """max |reference_forward - onnxruntime| of each layer alone, fed onnxruntime's own quantized input.

    Every activation QuantizeLinear output of the QDQ model becomes a graph output; layer ``i``'s output is the
    ``i+1``-th quantization of a computed value (not the requantization of a Relu/Flatten/Reshape of a
    dequantized tensor) followed by such requantizations, its input the quantization just before. End to end,
    one layer's 1-LSB difference (the chip's fixed-point multiplier vs onnxruntime's float scale) can grow
    through later layers.
    """
    model = onnx.ModelProto()
    model.CopyFrom(imported.qdq_model)
    consts = {t.name for t in model.graph.initializer}
    producer = {out: n for n in model.graph.node for out in n.output}

    def requantizes(node):  # Q(Relu|Flatten|Reshape(DQ(...))): the same values, maybe max(q, zp)
        source = producer.get(node.input[0])
        return (source is not None and source.op_type in ("Relu", "Flatten", "Reshape")
                and producer.get(source.input[0]) is not None
                and producer[source.input[0]].op_type == "DequantizeLinear")

    quantized = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in consts]
    params = []
    for n in quantized:
        scale = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == n.input[1]))
        zp = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == n.input[2]))
        params.append(QuantParams(float(scale), int(zp), "uint8" if zp.dtype == np.uint8 else "int8"))
        model.graph.output.append(helper.make_value_info(n.output[0], onnx.TypeProto()))
    session = ort_session(model)
    values = session.run([n.output[0] for n in quantized], {session.get_inputs()[0].name: x})
    values = [v.reshape(len(x), -1).astype(np.int64) - (128 if v.dtype == np.uint8 else 0) for v in values]
    diffs, j = [], 1
    for imported_layer, layer in zip(imported.layers, layers):
        size = int(np.prod(layer.out_shape))
        while requantizes(quantized[j]):
            j += 1
        assert params[j] == imported_layer.output and values[j].shape[1] == size
        source = values[j - 1]
        while j + 1 < len(values) and requantizes(quantized[j + 1]):
            j += 1
        ours = reference_forward([layer], source.astype(np.int8)).astype(np.int64)
        diffs.append(int(np.abs(ours - values[j]).max()))
        j += 1
    return diffs


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
        assert sum(t.config.n_out for t in tiles) == layer.n_out
        passed = 0
        for j, tile in enumerate(tiles):
            c = tile.config
            last = j == len(tiles) - 1
            assert c.n_in_words == k and c.stored_words == k and c.n_pass == passed
            assert c.forwarded_words == (0 if last else k)
            assert 1 <= c.n_out <= arch.max_tile_outputs
            assert last or c.n_out % lanes == 0
            assert c.w_base == 0 and c.act_base == c.n_out * k
            assert (c.n_out + 1) * k <= arch.sram_words
            assert tile.sram.shape == (c.n_out * k, lanes) and tile.params.shape == (c.n_out, 3)
            passed += -(-c.n_out // lanes)
        assert passed == -(-layer.n_out // lanes)
        position += len(tiles)
    for p, tile in enumerate(program.tiles):
        assert list(tile.config.to_dict()) == [name for name, _, _ in CONFIG_FIELDS]
        if p == arch.n_tiles - 1:
            assert tile.config.dest_host == 1
        else:
            assert tile.config.dest_host == 0
            assert (tile.config.dest_row, tile.config.dest_col) == arch.chain_position(p + 1)
        if p >= position:  # pass-through tiles behind the last layer
            assert tile.config.n_out == 0 and tile.config.n_in_words == 0
            assert tile.config.n_pass == program.output_words
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
        weight = np.concatenate([t.sram.reshape(t.config.n_out, -1) for t in tiles])
        assert np.array_equal(weight[:, :layer.n_in], layer.weight) and not weight[:, layer.n_in:].any()
        assert weight.shape[1] % lanes == 0
        assert np.array_equal(np.concatenate([t.params for t in tiles]), layer.params)
        position += len(tiles)


def _pe_results(tile, act: np.ndarray, lanes: int) -> list:
    """COMPUTE + EMIT of one tile as sections 4.1-4.3 state it, word by word from the SRAM image: int8 result words."""
    c = tile.config
    height, width, cw = c.in_height, c.in_width, c.words_per_pixel
    kh, kw, stride, n_out = c.kernel_h, c.kernel_w, c.stride, c.n_out
    two_operands = c.op in (OP_ADD, OP_CONCAT)
    if c.op == OP_BCAST and c.in_dense:  # section 4.5: channel c of pixel p is byte in_dense_offset + p*C + c
        dense = act[c.in_dense_offset:c.in_dense_offset + height * width * c.in_channels]
        words = np.zeros((height, width, cw * lanes), np.int64)
        words[..., :c.in_channels] = dense.reshape(height, width, c.in_channels)
        words = words.reshape(height, width, cw, lanes)
    else:
        words = None if two_operands else act[:height * width * cw * lanes].reshape(height, width, cw, lanes)
    n_r = -(-n_out // lanes)
    group = c.group_slice  # section 4.4: a per-word op's channel group
    if c.op in (OP_MAX, OP_LANE):
        words, cw = words[:, :, group], c.computed_words
    pad = np.full((cw, lanes), c.pad_value, np.int64)
    if c.op == OP_MAC:
        k_w = kh * kw * cw
        weight = tile.sram[c.w_base:c.w_base + n_out * k_w].astype(np.int64).reshape(n_out, k_w * lanes)
        bias, mult, shift = tile.params.T
    elif c.op in (OP_ADD, OP_CONCAT):  # sections 4.2, 4.3: two operand maps at their offsets, lane by lane
        assert n_out == c.computed_words * lanes and (kh, kw) == ((1, 2) if c.op == OP_ADD else (1, 1))
        cw_a = cw if c.op == OP_ADD else c.concat_words_a
        cw_b = cw if c.op == OP_ADD else cw - cw_a
        a0, b0 = c.operand_a_offset * lanes, c.operand_b_offset * lanes
        words_a = act[a0:a0 + height * width * cw_a * lanes].reshape(height, width, cw_a, lanes)
        words_b = act[b0:b0 + height * width * cw_b * lanes].reshape(height, width, cw_b, lanes)
        if c.op == OP_ADD:
            words_a, words_b = words_a[:, :, group], words_b[:, :, group]
        bias, mult, shift = (v.reshape(c.computed_words, lanes) for v in tile.params.T)
    elif c.op == OP_BCAST:  # section 4.5: word (g*KH*KW + ky*KW + kx)*C + c, lane l: W[g*L + l, c, ky, kx]
        groups, channels = c.computed_words, c.in_channels
        assert n_out == groups * lanes
        weight = tile.sram[c.w_base:c.w_base + groups * kh * kw * channels].astype(np.int64).reshape(
            groups, kh * kw, channels, lanes)
        bias, mult, shift = (v.reshape(groups, lanes) for v in tile.params.T)
    elif c.op == OP_LANE:  # word cw*KH*KW + ky*KW + kx, lane l: channel cw*L + l; parameter row cw*L + l
        assert n_out == cw * lanes
        weight = tile.sram[c.w_base:c.w_base + cw * kh * kw].astype(np.int64).reshape(cw, kh * kw, lanes)
        bias, mult, shift = (v.reshape(cw, lanes) for v in tile.params.T)
    out = []
    for oy, ox in c.output_pixel_positions():  # the band's pixels (section 4.1)
        if c.op in (OP_ADD, OP_CONCAT):
            if c.op == OP_ADD:
                acc = bias + words_a[oy, ox] * c.add_mult_a + words_b[oy, ox] * c.add_mult_b
            else:
                acc = bias + np.concatenate([words_a[oy, ox] * c.add_mult_a, words_b[oy, ox] * c.add_mult_b])
            y = np.clip(shift_round_half_even(acc * mult, shift) + c.zp_out, c.clamp_lo, c.clamp_hi)
            out += list(y.astype(np.int8))
            continue
        window = []
        for ky in range(kh):
            for kx in range(kw):
                iy, ix = oy * stride + ky - c.pad_top, ox * stride + kx - c.pad_left
                inside = 0 <= iy < height and 0 <= ix < width
                window.append(words[iy, ix] if inside else pad)
        window = np.stack(window)  # [KH*KW, CW, L]
        if c.op == OP_MAC:
            acc = bias + weight @ window.reshape(-1)
            y = np.clip(shift_round_half_even(acc * mult, shift) + c.zp_out, c.clamp_lo, c.clamp_hi)
        elif c.op == OP_BCAST:  # one input value a product, broadcast over the L output channels of word g
            values = window.reshape(kh * kw, cw * lanes)[:, :c.in_channels]
            acc = bias + np.einsum("gkcl,kc->gl", weight, values)
            y = np.clip(shift_round_half_even(acc * mult, shift) + c.zp_out, c.clamp_lo,
                        c.clamp_hi).reshape(-1)
        elif c.op == OP_LANE:
            acc = bias + np.einsum("wkl,kwl->wl", weight, window)  # lane by lane, [CW, L]
            y = np.clip(shift_round_half_even(acc * mult, shift) + c.zp_out, c.clamp_lo,
                        c.clamp_hi).reshape(-1)
        else:
            y = np.clip(window.max(axis=0).reshape(-1), c.clamp_lo, c.clamp_hi)
        padded = np.zeros(n_r * lanes, np.int64)
        padded[:len(y)] = y
        out += list(padded.astype(np.int8).reshape(n_r, lanes))
    return out


def run_functionally(program: Program, x_q: np.ndarray) -> np.ndarray:
    """Dataflow of sections 4-4.4 without timing: each chain tile per inference receives K flits, stores
    those in its store range and forwards those in its forward range, passes P (the last ``n_pix * pass_per_pixel``
    interleaved with its results pixel by pixel), computes from its SRAM image and parameters; returns the host's."""
    lanes = program.arch.lanes
    results = []
    for sample in x_q:
        stream = list(pack_flits(sample[None, :], lanes, program.input))
        for tile in program.tiles:
            c, out = tile.config, []
            k, p, n_out = c.n_in_words, c.n_pass, c.n_out
            assert len(stream) == k + p, f"tile {tile.key} receives {len(stream)} flits, expects {k + p}"
            stored = stream[c.store_begin:c.store_end] + stream[c.store2_begin:c.store2_end]  # section 4.2
            act = np.array(stored, dtype=np.int64).reshape(-1)
            out += stream[c.forward_begin:c.forward_end]
            results_of_tile = _pe_results(tile, act, lanes) if n_out else []
            # section 4.4: the last n_pix * pass_per_pixel passed words interleave with the results pixel by pixel
            per_pixel = c.pass_per_pixel
            n_pix = c.output_pixels if n_out else 1
            bulk = p - n_pix * per_pixel
            out += stream[k:k + bulk]
            pixel_words = len(results_of_tile) // n_pix
            for q in range(n_pix):
                out += stream[k + bulk + q * per_pixel:k + bulk + (q + 1) * per_pixel]
                out += results_of_tile[q * pixel_words:(q + 1) * pixel_words]
            stream = out
        results.append(unpack_flits(np.array(stream), 1, program.output.length, program.output)[0])
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
    program = compile_model(model, lean_arch())
    check_program(program, tmp_path)
    emulate_weights(program, layers)
    assert np.array_equal(run_functionally(program, quantize(x[:40], program.input)), ours[:40])
    exact = compile_model(model, lean_arch(rows=1, cols=3, lanes=4))  # one tile per layer, no pass-through tiles
    assert [len(layer.tiles) for layer in exact.layers] == [1, 1, 1] and exact.tiles[-1].config.n_out == 10
    check_program(exact, tmp_path)
    assert np.array_equal(run_functionally(exact, quantize(x[:40], exact.input)), ours[:40])
    text = report(program)
    assert "fc1" in text and "64 -> 64" in text and "bottleneck" in text


def test_float_model_is_quantized_with_calibration(tmp_path):
    test = np.load(MODELS / "digits_test.npz")
    x = test["x"]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="no calibration")  # calibration given: no warning
        program = compile_model(MODELS / "digits_mlp_float.onnx", lean_arch(), calibration=x[:100])
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
    for arch in (lean_arch(), lean_arch(rows=3, cols=5, lanes=4, sram_bytes=16384, max_tile_outputs=64)):
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
    arch = lean_arch(rows=2, cols=4, lanes=8, sram_bytes=4096, max_tile_outputs=40)  # 512 words
    layers = [_dense("a", n_in=100, n_out=70), _dense("b", n_in=70, n_out=9), _dense("c", n_in=9, n_out=3)]
    splits = assign_tiles(layers, arch)
    assert sum(len(s) for s in splits) <= arch.n_tiles
    for layer, slices in zip(layers, splits):
        assert sum(s.n_out for s in slices) == layer.n_out
        for s in slices[:-1]:
            assert s.n_out % arch.lanes == 0 and s.forward
        for s in slices:
            assert s.n_out <= arch.max_tile_outputs and (s.n_out + 2) * s.n_in_words <= arch.sram_words
    # The interval is the slowest tile's; check it is the best any split of the bottleneck layer 'a' over the
    # tiles the other layers leave can reach, by enumerating them all (slices of whole flits but the last,
    # each within the tile's capacity of (512 - 2*13) // 13 = 37 outputs).
    def cost(slices):
        n_pass, worst = 0, 0
        for i, n_out in enumerate(slices):
            last = i == len(slices) - 1
            worst = max(worst, tile_cycles(13, n_pass, n_out, 8, 0 if last else 13))
            n_pass += -(-n_out // 8)
        return worst

    def best(remaining, tiles):
        """Every split of ``remaining`` outputs over at most ``tiles`` tiles."""
        results = []
        if remaining <= 37:
            results.append([remaining])
        if tiles > 1:
            for take in range(8, min(remaining - 1, 37) + 1, 8):
                results += [[take] + rest for rest in best(remaining - take, tiles - 1)]
        return results

    slowest = lambda sl: max(tile_cycles(s.n_in_words, s.n_pass, s.n_out, 8, s.n_in_words if s.forward else 0)
                             for s in sl)
    optimum = min(cost(option) for option in best(70, arch.n_tiles - 2))
    assert slowest(splits[0]) == optimum
    assert max(slowest(sl) for sl in splits) == optimum
    assert optimum < min(cost(option) for option in best(70, 3))  # the spare tiles did help


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------
def test_oversize_model_names_bytes_needed_and_available():
    rng = np.random.default_rng(3)
    model = float_mlp(rng, [512, 512, 10])
    calibration = rng.standard_normal((16, 512)).astype(np.float32)
    with pytest.raises(CompileError) as info:
        compile_model(model, lean_arch(rows=2, cols=2), calibration=calibration)
    message = str(info.value)
    assert "dense0" in message and "Gemm" in message
    assert "262144 bytes" in message          # 512 x 512 int8 weights needed
    assert "131072 bytes of SRAM" in message  # 4 tiles x 32768 available
    assert "'sram_bytes'" in message and "\n" not in message


def test_more_layers_than_tiles():
    model = float_mlp(np.random.default_rng(4), [4, 4, 4, 4])
    with pytest.raises(CompileError, match=r"3 layers.*2 tiles"):
        compile_model(model, lean_arch(rows=1, cols=2), calibration=np.zeros((4, 4), np.float32))


def test_unsupported_op_names_node_and_op():
    graph = helper.make_graph(
        [helper.make_node("Sigmoid", ["x"], ["y"], name="squash")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    with pytest.raises(CompileError, match=r"node 'squash' \(Sigmoid\)"):
        compile_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), lean_arch())


def test_malformed_file(tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"\x08\x07this is not a protobuf\xff\xff")
    with pytest.raises(CompileError, match=r"broken.onnx' is not a valid ONNX model"):
        compile_model(path, lean_arch())
    with pytest.raises(CompileError, match="does not exist"):
        compile_model(tmp_path / "missing.onnx", lean_arch())


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


def test_matmul_add_quantized_apart_compiles_as_two_layers(tmp_path):
    rng = np.random.default_rng(8)
    model = float_mlp(rng, [6, 5, 4], form="matmul")
    onnx.save(model, tmp_path / "apart_float.onnx")   # not fused: MatMul and Add get quantized apart
    path = random_models.quantize_qdq(tmp_path / "apart_float.onnx", tmp_path / "apart.onnx",
                                      rng.standard_normal((8, 6)).astype(np.float32), activation_uint8=False,
                                      per_channel=False)
    # each Add after a requantized MatMul is a layer of its own (op Affine), so both roundings happen
    # (tests/test_two_roundings.py compares such models with onnxruntime)
    assert [layer.op for layer in import_onnx(path).layers] == ["MatMul", "Affine", "MatMul", "Affine"]
    assert max_lsb_diff(model, rng.standard_normal((16, 6)).astype(np.float32),  # the float model compiles
                        calibration=rng.standard_normal((8, 6)).astype(np.float32)) <= 1


def test_branch_is_rejected(tmp_path):
    qdq = _qdq_model(tmp_path)
    first_dq = next(n for n in qdq.graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith("x"))
    qdq.graph.node.append(helper.make_node("Relu", [first_dq.output[0]], ["extra"], name="side_branch"))
    qdq.graph.output.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, ["N", 6]))
    with pytest.raises(CompileError, match=r"feeds node 'dense0' \(Gemm\) and node 'side_branch' \(Relu\) where "
                                           r".*a fork only as a residual block"):
        import_onnx(qdq)


def test_dynamic_feature_dimension_is_rejected():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="r")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "F"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "F"])])
    with pytest.raises(CompileError, match="dimension 1 is dynamic"):
        import_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


# --------------------------------------------------------------------------------------------------
# CNNs (docs/architecture.md section 4.1)
# --------------------------------------------------------------------------------------------------
def float_cnn(rng, input_shape, ops, *, opset=17):
    """A float CNN on ``[N, *input_shape]``. ``ops``: ("conv", out_channels, kernel, stride, pads[, extra attrs]),
    ("dw", kernel, stride, pads[, extra attrs]) (depthwise Conv, group = channels), ("pool", kernel, stride,
    pads[, extra attrs]), ("avgpool", kernel, stride, pads[, extra attrs]), ("gap",) (GlobalAveragePool),
    ("relu",), ("clip", max), ("flatten",), ("gemm", n_out), ("node", op_type, attrs) (a raw single-input
    node). Pads are [top, left, bottom, right]."""
    nodes, inits, x = [], [], "x"
    channels, height, width = input_shape
    flat = None
    for i, op in enumerate(ops):
        out = f"t{i}"
        if op[0] == "dw":
            _, k, stride, pads, *extra = op
            op = ("conv", channels, k, stride, pads, {"group": channels, **(extra[0] if extra else {})})
        if op[0] == "conv":
            _, o, k, stride, pads, *extra = op
            kh, kw = (k, k) if isinstance(k, int) else k
            group = (extra[0] if extra else {}).get("group", 1)
            per_group = channels // group if o % group == 0 and channels % group == 0 else channels
            w = (rng.standard_normal((o, per_group, kh, kw)) / np.sqrt(per_group * kh * kw)).astype(np.float32)
            inits += [numpy_helper.from_array(w, f"k{i}"),
                      numpy_helper.from_array((0.1 * rng.standard_normal(o)).astype(np.float32), f"kb{i}")]
            attrs = dict(kernel_shape=[kh, kw], strides=[stride, stride], pads=list(pads), **(extra[0] if extra else {}))
            if "auto_pad" in attrs:
                del attrs["pads"]
            nodes.append(helper.make_node("Conv", [x, f"k{i}", f"kb{i}"], [out], name=f"conv{i}", **attrs))
            channels = o
            dilation = attrs.get("dilations", [1, 1])[0]
            kh, kw = (kh - 1) * dilation + 1, (kw - 1) * dilation + 1
            if attrs.get("auto_pad") == "SAME_UPPER":
                kh = kw = stride = 1
            height = (height + pads[0] + pads[2] - kh) // stride + 1
            width = (width + pads[1] + pads[3] - kw) // stride + 1
        elif op[0] in ("pool", "avgpool"):
            _, k, stride, pads, *extra = op
            attrs = dict(kernel_shape=[k, k], strides=[stride, stride], pads=list(pads), **(extra[0] if extra else {}))
            if op[0] == "pool":
                nodes.append(helper.make_node("MaxPool", [x], [out], name=f"pool{i}", **attrs))
            else:
                attrs.setdefault("count_include_pad", 1)
                nodes.append(helper.make_node("AveragePool", [x], [out], name=f"avgpool{i}", **attrs))
            rounding = np.ceil if attrs.get("ceil_mode") else np.floor
            height = int(rounding((height + pads[0] + pads[2] - k) / stride)) + 1
            width = int(rounding((width + pads[1] + pads[3] - k) / stride)) + 1
        elif op[0] == "gap":
            nodes.append(helper.make_node("GlobalAveragePool", [x], [out], name=f"gap{i}"))
            height = width = 1
        elif op[0] == "relu":
            nodes.append(helper.make_node("Relu", [x], [out], name=f"relu{i}"))
        elif op[0] == "clip":
            inits += [numpy_helper.from_array(np.array(0, np.float32), f"lo{i}"),
                      numpy_helper.from_array(np.array(op[1], np.float32), f"hi{i}")]
            nodes.append(helper.make_node("Clip", [x, f"lo{i}", f"hi{i}"], [out], name=f"clip{i}"))
        elif op[0] == "flatten":
            nodes.append(helper.make_node("Flatten", [x], [out], name=f"flatten{i}", axis=1))
            flat = channels * height * width
        elif op[0] == "reshape":
            flat = channels * height * width
            inits.append(numpy_helper.from_array(np.array([-1, flat], np.int64), f"shape{i}"))
            nodes.append(helper.make_node("Reshape", [x, f"shape{i}"], [out], name=f"reshape{i}"))
        elif op[0] == "gemm":
            w = (rng.standard_normal((op[1], flat)) / np.sqrt(flat)).astype(np.float32)
            inits += [numpy_helper.from_array(w, f"w{i}"),
                      numpy_helper.from_array((0.1 * rng.standard_normal(op[1])).astype(np.float32), f"b{i}")]
            nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [out], name=f"fc{i}", transB=1))
            flat = op[1]
        elif op[0] == "node":
            nodes.append(helper.make_node(op[1], [x], [out], name=f"{op[1].lower()}{i}", **op[2]))
            if op[1].startswith("Global"):
                height = width = 1
            elif "kernel_shape" in op[2]:
                height, width = height - op[2]["kernel_shape"][0] + 1, width - op[2]["kernel_shape"][1] + 1
        x = out
    out_shape = ["N", flat] if flat is not None else ["N", channels, height, width]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *input_shape])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, out_shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def check_windowed_program(program: Program, layers, tmp_path: Path) -> None:
    """Partition invariants for any program: every layer's tiles are consecutive on the chain; a windowed
    layer's bands cover its output rows in order, each band's tiles (one, or a convolution's output-channel groups,
    section 4.4) cover its output channels in order, each tile holding its channels' weights and the input rows its
    band's windows read (two banks; a join both operand maps); pass counts add up; then validate and a save/load
    round trip."""
    arch, lanes = program.arch, program.arch.lanes
    program.validate()
    if program.input.layout == "dense":  # the layers reading the graph input read it densely (section 4.5)
        layers, dense_input = dense_graph_input(layers, dataclasses.replace(program.input, layout="chw"), lanes)
        assert dense_input == program.input
    if program.input.layout == "im2col":  # the host packs the first convolution's window (section 7)
        plain_input = dataclasses.replace(program.input, layout="chw", window=None)
        layers, packed_input = pack_input_window(layers, plain_input, lanes)
        assert packed_input == program.input
    position = 0
    for info, layer in zip(program.layers, layers):
        tiles = program.tiles[position:position + len(info.tiles)]
        assert [(t.row, t.col) for t in tiles] == list(info.tiles)
        passed = 0
        for j, tile in enumerate(tiles):
            c = tile.config
            # a channel group passes the earlier bands' pixels and its band's words of the groups before it
            n_pix = c.output_pixels if layer.window is not None else 1
            assert c.n_pass - n_pix * c.pass_per_pixel == passed
            assert c.stored_words <= c.n_in_words and (layer.window is not None or c.stored_words == c.n_in_words)
            if j < len(tiles) - 1:  # a suffix of its stream: what the next tile receives
                assert c.forward_end == c.n_in_words and c.forwarded_words == tiles[j + 1].config.n_in_words
            else:
                assert c.forwarded_words == 0
            assert c.act_base == c.weight_words and c.act_base + 2 * c.stored_words <= arch.sram_words
            assert tile.params.shape == (c.n_out, 3)
            # a band's later channel groups pass its earlier groups' words of each pixel; a band's first tile none
            band_ends = (layer.window is None or j == len(tiles) - 1 or tiles[j + 1].config.pass_per_pixel == 0)
            if band_ends:
                passed += n_pix * (c.pass_per_pixel + -(-c.n_out // lanes)) if layer.window is not None \
                    else c.result_words(lanes)
        # each later tile's stream starts at the first word it or a tile after it stores (section 4.2: nothing is
        # forwarded that no later tile of the layer reads)
        starts = np.cumsum([0] + [t.config.forward_begin for t in tiles[:-1]])
        firsts = [start + min(b for b, e in ((t.config.store_begin, t.config.store_end),
                                             (t.config.store2_begin, t.config.store2_end)) if e > b)
                  for start, t in zip(starts, tiles)]
        for j in range(1, len(tiles)):
            assert starts[j] == min(firsts[j:]), (info.name, j)
        if layer.window is not None:
            w = layer.window
            cw = -(-w.channels // lanes)
            bands = []  # (first output pixel, pixels, tiles of the band): bands of consecutive row-major pixels
            for t in tiles:
                if bands and t.config.pass_per_pixel:
                    assert t.config.output_pixels == bands[-1][1]
                    bands[-1][2].append(t)
                else:
                    bands.append((sum(b[1] for b in bands), t.config.output_pixels, [t]))
            pixels = [b[1] for b in bands]
            assert sum(pixels) == w.out_height * w.out_width and min(pixels) >= 1
            band_of = {id(t): (begin, n) for begin, n, band in bands for t in band}
            channel_start = {}
            for _, _, band in bands:
                start, before = 0, 0
                assert len(band) == 1 or not getattr(layer, "is_concat", False)
                for t in band:
                    assert t.config.pass_per_pixel == before
                    channel_start[id(t)] = start
                    if layer.is_pool or layer.is_lane or layer.is_join:  # a per-word op's channel group
                        grouped = len(band) > 1
                        assert (t.config.group_word_begin, t.config.group_words) == \
                            ((start // lanes, t.config.n_out // lanes) if grouped else (0, 0))
                    start += t.config.n_out
                    before += -(-t.config.n_out // lanes)
                    if t is not band[-1]:
                        assert t.config.n_out % lanes == 0
                per_word = layer.is_pool or layer.is_lane or layer.is_join
                assert start == band[0].config.n_out if len(band) == 1 else \
                    start == (cw * lanes if per_word else layer.n_out)
            for t in tiles:
                c = t.config
                assert (c.in_width, c.words_per_pixel) == (w.width, cw)
                assert (c.kernel_h, c.kernel_w, c.stride, c.pad_left, c.out_width) == \
                    (w.kernel_h, w.kernel_w, w.stride, w.pad_left, w.out_width)
                begin_pixel, n_pixels = band_of[id(t)]
                begin, n = begin_pixel // w.out_width, (begin_pixel + n_pixels - 1) // w.out_width - begin_pixel // w.out_width + 1
                assert (c.out_rows, c.out_col_begin) == (n, begin_pixel % w.out_width)
                assert (c.out_col_end or w.out_width) == (begin_pixel + n_pixels - 1) % w.out_width + 1
                if layer.is_join and c.store2_end:  # a band of fewer rows stores its rows of both operand maps
                    assert (c.in_height, c.out_row_begin) == (n, 0) and n < w.height
                    assert c.stored_words == (2 if layer.is_add else 1) * n * w.width * cw
                    assert {c.operand_a_offset, c.operand_b_offset} == {0, c.store_end - c.store_begin}
                elif layer.is_join:
                    assert (c.in_height, c.out_row_begin) == (w.height, begin)
                    assert c.stored_words == (2 if layer.is_add else 1) * w.height * w.width * cw
                else:
                    # the band as a map of its own: the input rows its windows read, iy = oy*S + ky - pad_top
                    first = max(0, begin * w.stride - w.pad_top)
                    end = min(w.height, (begin + n - 1) * w.stride + w.kernel_h - w.pad_top)
                    assert (c.out_row_begin, c.in_height, c.pad_top) == \
                        (0, end - first, w.pad_top - begin * w.stride + first)
                    if c.in_dense:  # section 4.5: the rows' bytes, from the word holding the first
                        row_bytes = w.width * w.channels
                        assert program.input.layout == "dense" and layer.dense_input
                        assert c.in_dense_offset == first * row_bytes % lanes
                        assert c.stored_words == -(-(end * row_bytes) // lanes) - first * row_bytes // lanes
                    else:
                        assert c.stored_words == (end - first) * w.width * cw
                    assert c.store_end <= c.n_in_words
                group = slice(channel_start[id(t)], channel_start[id(t)] + c.n_out)
                if layer.is_pool:
                    assert c.op == OP_MAX and c.n_out == c.computed_words * lanes and not t.params.any()
                    assert c.pad_value == -128 and t.sram.shape[0] == 0
                elif layer.is_lane:
                    assert c.op == OP_LANE and c.n_out == c.computed_words * lanes and c.pad_value == layer.pad_value
                    window = w.kernel_h * w.kernel_w
                    rows = weight_rows(layer, lanes)[group.start // lanes * window:group.stop // lanes * window]
                    assert t.sram.shape == (c.computed_words * window, lanes) and np.array_equal(t.sram, rows)
                    padded = np.concatenate([layer.params, np.tile([0, 0, 1], (cw * lanes - w.channels, 1))])
                    assert np.array_equal(t.params, padded[group])
                elif layer.broadcasts(lanes):  # section 4.5: its output words' weight words, every input word
                    issues = w.kernel_h * w.kernel_w * w.channels
                    assert c.op == OP_BCAST and c.pad_value == layer.pad_value and c.in_channels == w.channels
                    assert (c.group_word_begin, c.group_words) == (0, c.n_out // lanes)
                    rows = weight_rows(layer, lanes)[group.start // lanes * issues:group.stop // lanes * issues]
                    assert np.array_equal(t.sram, rows) and np.array_equal(t.params, layer.params[group])
                else:
                    begin, stop = channel_start[id(t)], channel_start[id(t)] + c.n_out
                    assert c.op == OP_MAC and c.pad_value == layer.pad_value
                    assert np.array_equal(t.sram.reshape(c.n_out, -1), weight_rows(layer, lanes)[begin:stop])
                    assert np.array_equal(t.params, layer.params[begin:stop])
            out_words = -(-layer.n_out // lanes) if not (layer.is_pool or layer.is_lane) else cw
            assert passed == w.out_height * w.out_width * out_words
        else:
            assert sum(t.config.n_out for t in tiles) == layer.n_out
            weights = np.concatenate([t.sram.reshape(t.config.n_out, -1) for t in tiles])
            assert np.array_equal(weights, weight_rows(layer, lanes))
        position += len(tiles)
    for tile in program.tiles[position:]:
        assert tile.config.n_out == 0 and tile.config.n_pass == program.output_words
    loaded = Program.load(program.save(tmp_path / "cnn_prog"))
    assert [t.config for t in loaded.tiles] == [t.config for t in program.tiles]
    assert loaded.input == program.input and loaded.output == program.output


def test_bundled_digits_cnn(tmp_path):
    test = np.load(MODELS / "digits_cnn_test.npz")
    x, y = test["x"], test["y"]
    assert x.shape[1:] == (1, 8, 8) and x.dtype == np.float32
    imported = import_onnx(MODELS / "digits_cnn.onnx")
    assert [(l.name, l.op) for l in imported.layers] == [("conv1", "Conv"), ("pool1", "MaxPool"), ("conv2", "Conv"),
                                                        ("pool2", "MaxPool"), ("fc1", "Gemm")]
    assert imported.input.layout == "chw" and imported.input.shape == (1, 8, 8) and imported.output.shape == (10,)
    layers = lower_layers(imported.layers)
    ours = reference_forward(layers, quantize(x, imported.input))
    theirs = quantize(run_ort(imported.qdq_model, x), imported.output)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1
    assert np.mean(np.argmax(dequantize(ours, imported.output), axis=1) == y) >= 0.93
    for arch in (lean_arch(), lean_arch(rows=1, cols=5, lanes=4), lean_arch(rows=2, cols=4, lanes=16, max_tile_outputs=256)):
        program = compile_model(MODELS / "digits_cnn.onnx", arch)
        check_windowed_program(program, layers, tmp_path)
        assert np.array_equal(run_functionally(program, quantize(x[:12], program.input)), ours[:12])
    program = compile_model(MODELS / "digits_cnn.onnx", lean_arch())
    text = report(program)
    assert "conv1" in text and "MaxPool" in text and "bottleneck" in text
    # `make demo` runs the whole test set through the RTL harness in one batch: its input must fit the buffer.
    # conv1 reads one channel: op BCAST (section 4.5) runs it at the host-packed rate from the plain map
    assert program.input.layout == "dense" and program.tiles[0].config.op == OP_BCAST
    assert program.input_words * len(x) <= lean_arch().host_buffer_flits


def test_bundled_digits_cnn_float_model(tmp_path):
    test = np.load(MODELS / "digits_cnn_test.npz")
    x = test["x"]
    imported = import_onnx(MODELS / "digits_cnn_float.onnx", calibration=x[:100])
    ours = reference_forward(lower_layers(imported.layers), quantize(x, imported.input)).astype(int)
    assert np.abs(ours - quantize(run_ort(imported.qdq_model, x), imported.output)).max() <= 1
    check_windowed_program(compile_model(MODELS / "digits_cnn_float.onnx", lean_arch(), calibration=x[:100]),
                           lower_layers(imported.layers), tmp_path)


def test_digits_cnn_on_the_emulator():
    """The emulator (section 4.1 support written concurrently by its own engineer) agrees with reference_forward."""
    emulator = pytest.importorskip("emulator")
    program = compile_model(MODELS / "digits_cnn.onnx", lean_arch())
    test = np.load(MODELS / "digits_cnn_test.npz")
    x, y = test["x"], test["y"]
    x_q, flits = input_flits(program, x)
    try:
        result = emulator.emulate(program, flits, len(x))
    except Exception as error:
        if "emulator" not in type(error).__module__:
            raise
        pytest.skip(f"emulator cannot run windowed layers yet: {type(error).__name__}: {error}")
    q, out = outputs_from_flits(program, result.out_flits, len(x))
    assert np.array_equal(q, reference_forward(lower_layers(import_onnx(MODELS / "digits_cnn.onnx").layers), x_q))
    assert np.mean(np.argmax(out, axis=1) == y) >= 0.93


CNN_CASES = [
    # input (C, H, W), ops, activation, per_channel
    ((1, 8, 8), [("conv", 4, 3, 1, [1, 1, 1, 1]), ("relu",), ("pool", 2, 2, [0, 0, 0, 0]), ("flatten",),
                 ("gemm", 5)], "int8", True),
    ((3, 12, 12), [("conv", 16, 5, 2, [2, 2, 2, 2]), ("relu",), ("conv", 9, 3, 1, [0, 1, 2, 0]), ("relu",),
                   ("flatten",), ("gemm", 7)], "int8", True),
    ((9, 5, 7), [("conv", 12, 1, 1, [0, 0, 0, 0]), ("relu",), ("pool", 3, 2, [1, 1, 1, 1]), ("conv", 3, 3, 2,
                 [1, 0, 0, 1]), ("flatten",), ("gemm", 4)], "uint8", False),
    ((16, 4, 4), [("conv", 16, 3, 1, [1, 1, 1, 1]), ("relu",), ("pool", 2, 1, [0, 0, 0, 0]), ("flatten",),
                  ("gemm", 10), ("relu",), ("gemm", 3)], "int8", True),
    ((2, 10, 6), [("conv", 8, 3, 2, [0, 0, 0, 0]), ("clip", 1.5), ("conv", 5, 1, 1, [0, 0, 0, 0]),
                  ("relu",), ("flatten",), ("gemm", 6)], "uint8", True),
    ((5, 6, 6), [("conv", 13, 3, 1, [1, 1, 1, 1]), ("relu",), ("pool", 2, 2, [0, 0, 0, 0])], "int8", True),
    ((4, 9, 9), [("conv", 7, 5, 1, [2, 2, 2, 2]), ("relu",), ("pool", 3, 3, [0, 0, 0, 0]), ("conv", 16, 3, 1,
                 [1, 1, 1, 1]), ("relu",), ("pool", 3, 1, [0, 0, 0, 0]), ("flatten",), ("gemm", 2)], "int8", False),
    ((1, 4, 4), [("conv", 2, 1, 1, [0, 0, 0, 0]), ("reshape",), ("gemm", 3)], "int8", True),
]


@pytest.mark.parametrize("case", range(len(CNN_CASES)))
def test_random_cnn_matches_onnxruntime(case, tmp_path):
    shape, ops, activation, per_channel = CNN_CASES[case]
    rng = np.random.default_rng(2000 + case)
    model = float_cnn(rng, shape, ops)
    calibration = rng.standard_normal((32, *shape)).astype(np.float32)
    qdq = quantize_qdq(model, calibration, activation=activation, per_channel=per_channel, tmp_path=tmp_path)
    x = rng.standard_normal((64, *shape)).astype(np.float32)
    imported = import_onnx(qdq)
    assert imported.input.layout == "chw"
    layers = lower_layers(imported.layers)
    ours = reference_forward(layers, quantize(x, imported.input)).astype(np.int32)
    theirs = quantize(run_ort(imported.qdq_model, x), imported.output).astype(np.int32)
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= 1
    for arch in (lean_arch(), lean_arch(rows=3, cols=4, lanes=4, max_tile_outputs=256)):
        program = build_program(layers, arch, input_spec=imported.input, output_spec=imported.output)
        check_windowed_program(program, layers, tmp_path)
        assert np.array_equal(run_functionally(program, quantize(x[:3], program.input)), ours[:3])


def test_flatten_permutation_of_gemm_weights():
    """ONNX column c*H*W + y*W + x of the Gemm after a flatten lands on lane c % L of word (y*W + x)*CW + c // L."""
    rng = np.random.default_rng(7)
    layer = DenseLayer("fc", "Gemm", rng.integers(-128, 128, (3, 10 * 2 * 3)).astype(np.int8), np.zeros(3, np.int32),
                       QuantParams(0.1, 0, "int8"), np.ones(3), QuantParams(0.1, 0, "int8"), False,
                       input_map=(10, 2, 3))
    rows = weight_rows(lower_layers([layer])[0], 4)
    assert rows.shape == (3, 2 * 3 * 3 * 4)
    for c in range(10):
        for yy in range(2):
            for xx in range(3):
                assert np.array_equal(rows[:, ((yy * 3 + xx) * 3 + c // 4) * 4 + c % 4],
                                      layer.weight[:, c * 6 + yy * 3 + xx])
    assert np.count_nonzero(rows.reshape(3, 6, 12)[:, :, 10:]) == 0  # padding lanes


def test_conv_bands_split_output_rows(tmp_path):
    rng = np.random.default_rng(3)
    model = float_cnn(rng, (8, 12, 12), [("conv", 16, 3, 1, [1, 1, 1, 1]), ("relu",), ("flatten",), ("gemm", 4)])
    calibration = rng.standard_normal((16, 8, 12, 12)).astype(np.float32)
    imported = import_onnx(model, calibration=calibration)
    layers = lower_layers(imported.layers)
    # 12 rows x 12 pixels x 2 words = 288 result words stream out through a ring of 64 words; the balance splits
    # the rows over several tiles
    arch = lean_arch(rows=4, cols=4, max_tile_outputs=512)
    program = compile_model(model, arch, calibration=calibration)
    conv_tiles = program.layers[0].tiles
    assert len(conv_tiles) >= 6
    check_windowed_program(program, layers, tmp_path)
    x = rng.standard_normal((2, 8, 12, 12)).astype(np.float32)
    x_q = quantize(x, program.input)
    assert np.array_equal(run_functionally(program, x_q), reference_forward(layers, x_q))
    # estimated cycles, the busiest side: max(K + P, K_f + P + n_pix*N_r, I + 2) (results stream out while COMPUTE
    # runs); the first tile forwards the whole map (K_f = K = 144) and passes nothing
    first = program.tiles[0].config
    pixels = first.output_pixels  # a band of pixels, not necessarily whole rows (section 4.1)
    assert pixels < 12 * 12
    assert first.tile_period_cycles(arch.lanes) == max(144, 144 + pixels * 2, pixels * 16 * 9 + 2)


@pytest.mark.parametrize("dtype,kernel,stride,pads,lanes", [("int8", 3, 1, (1, 1), 8), ("uint8", 5, 2, (2, 1), 4),
                                                           ("int8", 2, 2, (0, 0), 16)])
def test_im2col_input_packing_matches_a_direct_window_gather(dtype, kernel, stride, pads, lanes):
    """Layout "im2col" (section 7): output pixel (oy, ox) carries input (c, oy*S + ky - pad_top, ox*S + kx -
    pad_left) as channel (ky*KW + kx)*C + c, the zero point outside the map, whole flits a pixel."""
    rng = np.random.default_rng(7)
    channels, height, width = 3, 7, 6
    out_h = (height + 2 * pads[0] - kernel) // stride + 1
    out_w = (width + 2 * pads[1] - kernel) // stride + 1
    spec = TensorSpec("x", (channels, height, width), 0.1, 131 if dtype == "uint8" else -5, dtype, "im2col",
                      (kernel, kernel, stride, pads[0], pads[1], out_h, out_w))
    values = rng.integers(-128, 128, (2, channels * height * width)).astype(np.int8)
    flits = pack_flits(values, lanes, spec)
    words = -(-kernel * kernel * channels // lanes)
    assert flits.shape == (2 * out_h * out_w * words, lanes) and spec.words(lanes) == out_h * out_w * words
    zero = spec.zero_point - 128 if dtype == "uint8" else spec.zero_point
    got = flits.reshape(2, out_h, out_w, words * lanes)
    maps = values.reshape(2, channels, height, width)
    for b in range(2):
        for oy in range(out_h):
            for ox in range(out_w):
                expected = []
                for ky in range(kernel):
                    for kx in range(kernel):
                        y, x = oy * stride + ky - pads[0], ox * stride + kx - pads[1]
                        for c in range(channels):
                            expected.append(maps[b, c, y, x] if 0 <= y < height and 0 <= x < width else zero)
                expected += [0] * (words * lanes - len(expected))
                assert got[b, oy, ox].tolist() == expected, (b, oy, ox)
    assert TensorSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="im2col input cannot be unpacked"):
        unpack_flits(flits, 2, values.shape[1], spec)


def test_narrow_first_convolution_is_packed_on_the_host(tmp_path):
    """A 3-channel 3x3 first convolution of 5 outputs (op MAC: outputs leave a word's lanes unused, so no BCAST)
    issues 9 words of 3 useful lanes a window; packed by the host it is a 1x1 convolution over 27 channels (4
    words): the program computes the same and its estimate is shorter."""
    rng = np.random.default_rng(45)
    model = float_cnn(rng, (3, 10, 10), [("conv", 5, 3, 1, [1, 1, 1, 1]), ("relu",), ("pool", 2, 2, [0, 0, 0, 0]),
                                         ("conv", 8, 3, 1, [1, 1, 1, 1]), ("flatten",), ("gemm", 4)])
    calibration = rng.standard_normal((16, 3, 10, 10)).astype(np.float32)
    layers = lower_layers(import_onnx(model, calibration=calibration).layers)
    arch = lean_arch(rows=3, cols=3)
    packed = compile_model(model, arch, calibration=calibration)
    plain = compile_model(model, arch, calibration=calibration, pack_input=False)
    assert packed.input.layout == "im2col" and plain.input.layout == "chw"
    assert packed.input.window == (3, 3, 1, 1, 1, 10, 10)
    first = packed.tiles[0].config
    assert (first.kernel_h, first.kernel_w, first.words_per_pixel, first.pad_top) == (1, 1, 4, 0)
    x_q = quantize(rng.standard_normal((4, 3, 10, 10)).astype(np.float32), packed.input)
    expected = reference_forward(layers, x_q)
    assert np.array_equal(run_functionally(packed, x_q), expected)
    assert np.array_equal(run_functionally(plain, x_q), expected)
    from flowtile.compiler.emit import estimated_interval
    assert estimated_interval(packed) < estimated_interval(plain)
    check_windowed_program(packed, layers, tmp_path)


def test_windowed_layer_size_errors():
    rng = np.random.default_rng(4)
    # a band of one output row of a 3x3 pool stores 3 input rows (16 pixels x 4 words each), at least once (one bank)
    model = float_cnn(rng, (8, 16, 16), [("conv", 32, 1, 1, [0, 0, 0, 0]), ("pool", 3, 1, [1, 1, 1, 1]), ("flatten",),
                                         ("gemm", 4)])
    calibration = rng.standard_normal((8, 8, 16, 16)).astype(np.float32)
    with pytest.raises(CompileError, match=r"layer 'pool1' \(MaxPool, 32x16x16 -> 32x16x16\): every tile of it holds "
                                           r"all its weights \(0 bytes\) and the input rows of one output row \(3 rows\) "
                                           r"once \(one activation bank of 1536 bytes\) and a forward queue of at least 2 "
                                           r"words: 1552 bytes, a tile has 1024"):
        compile_model(model, lean_arch(sram_bytes=1024), calibration=calibration)
    # a convolution splits its channels down to one word of them and its rows down to one output row
    model = float_cnn(rng, (8, 16, 16), [("conv", 32, 3, 1, [1, 1, 1, 1]), ("flatten",), ("gemm", 4)])
    with pytest.raises(CompileError, match=r"layer 'conv0' \(Conv.*weights of at least 8 output channels \(576 bytes\)"
                                           r".*input rows of one output row \(3 rows\) once \(one activation bank of 384 "
                                           r"bytes\) and a forward queue of at least 2 words: 976 bytes.*'sram_bytes'"):
        compile_model(model, lean_arch(sram_bytes=512), calibration=calibration)
    # enough SRAM for each layer alone, not enough tiles for all: the error names the layer needing the most
    model = float_cnn(rng, (64, 6, 6), [("conv", 64, 3, 1, [1, 1, 1, 1]), ("relu",), ("flatten",), ("gemm", 5)])
    calibration = rng.standard_normal((8, 64, 6, 6)).astype(np.float32)
    with pytest.raises(CompileError, match=r"model does not fit the 1x2 grid .*its layers need 3 tiles, there are 2; "
                                           r"layer 'conv0' \(Conv, 64x6x6 -> 64x6x6\) alone needs 2: a 32768-byte tile"):
        compile_model(model, lean_arch(rows=1, cols=2, sram_bytes=32768), calibration=calibration)


def test_convolution_too_wide_for_one_tile_splits_over_channel_groups(tmp_path):
    """All weights of a 64 -> 64 3x3 convolution (36864 bytes) exceed a 32 KiB tile: the compiler splits it over
    output-channel groups (section 4.4), each tile holding its group's weights."""
    rng = np.random.default_rng(44)
    model = float_cnn(rng, (64, 6, 6), [("conv", 64, 3, 1, [1, 1, 1, 1]), ("relu",), ("flatten",), ("gemm", 5)])
    calibration = rng.standard_normal((16, 64, 6, 6)).astype(np.float32)
    imported = import_onnx(model, calibration=calibration)
    layers, program = check_reference_and_program(imported, rng.standard_normal((8, 64, 6, 6)).astype(np.float32),
                                                  lean_arch(rows=2, cols=4), 3)
    conv_tiles = program.tiles[:len(program.layers[0].tiles)]
    assert len({t.config.out_row_begin for t in conv_tiles}) < len(conv_tiles)  # some band has several groups
    assert max(t.config.pass_per_pixel for t in conv_tiles) > 0
    assert all(t.config.weight_words * 8 <= 32768 - 2 * 8 * t.config.n_in_words for t in conv_tiles)
    check_windowed_program(program, layers, tmp_path)


UNSUPPORTED = [
    ([("conv", 4, 3, 1, [1, 1, 1, 1], {"dilations": [2, 2]})], r"node 'conv0' \(Conv\): attribute 'dilations'"),
    ([("conv", 4, 3, 1, [1, 1, 1, 1]), ("pool", 3, 1, [0, 0, 3, 0])],
     r"node 'pool1' \(MaxPool\): attribute 'pads' = \[0, 0, 3, 0\] is unsupported \(below the 3x3 kernel"),
    # auto_pad is made explicit on import (compiler/normalize.py); what the matcher cannot take is still named
    ([("conv", 4, 3, 1, [0, 0, 0, 0], {"auto_pad": "SAME_UPPER", "dilations": [2, 2]})],
     r"node 'conv0' \(Conv\): attribute 'dilations' = \[2, 2\]"),
    ([("conv", 4, 3, 1, [8, 8, 8, 8])], r"node 'conv0' \(Conv\): attribute 'pads' = \[8, 8, 8, 8\]"),
    ([("conv", 4, 3, 1, [0, 0, 0, 0]), ("pool", 2, 2, [0, 0, 0, 0], {"ceil_mode": 1})], r"node 'pool1' \(MaxPool\): attribute 'ceil_mode' = 1"),
    ([("conv", 4, 3, 1, [1, 1, 1, 1]), ("avgpool", 3, 1, [1, 1, 1, 1], {"count_include_pad": 0})],
     r"node 'avgpool1' \(AveragePool\): attribute 'count_include_pad' = 0 with 'pads' = \[1, 1, 1, 1\]"),
    ([("conv", 4, 3, 1, [1, 1, 1, 1]), ("avgpool", 2, 2, [0, 0, 0, 0], {"ceil_mode": 1})],
     r"node 'avgpool1' \(AveragePool\): attribute 'ceil_mode' = 1"),
    ([("dw", (5, 3), 1, [2, 3, 2, 1])], r"node 'conv0' \(Conv\): attribute 'pads' = \[2, 3, 2, 1\] is unsupported \(below "
                                        r"the 5x3 kernel"),
]


@pytest.mark.parametrize("case", range(len(UNSUPPORTED)))
def test_unsupported_cnn_attributes_name_node_op_and_attribute(case, tmp_path):
    ops, message = UNSUPPORTED[case]
    rng = np.random.default_rng(50 + case)
    ops = ops + [("flatten",), ("gemm", 3)]
    model = float_cnn(rng, (4, 10, 10), ops)
    calibration = rng.standard_normal((8, 4, 10, 10)).astype(np.float32)
    with pytest.raises(CompileError, match=message):
        import_onnx(model, calibration=calibration)
    try:  # the same model quantized by hand, as an int8 QDQ file
        qdq = quantize_qdq(model, calibration, tmp_path=tmp_path)
    except Exception:
        return  # onnxruntime cannot quantize this one: the float check above is what users see
    with pytest.raises(CompileError, match=message):
        import_onnx(qdq)


def test_maxpool_with_requantized_output_is_rejected(tmp_path):
    rng = np.random.default_rng(9)
    model = float_cnn(rng, (2, 6, 6), [("conv", 4, 3, 1, [1, 1, 1, 1]), ("pool", 2, 2, [0, 0, 0, 0]), ("flatten",),
                                       ("gemm", 3)])
    qdq = quantize_qdq(model, rng.standard_normal((8, 2, 6, 6)).astype(np.float32), tmp_path=tmp_path)
    pool = next(n for n in qdq.graph.node if n.op_type == "MaxPool")
    q = next(n for n in qdq.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == pool.output[0])
    scale = numpy_helper.to_array(next(t for t in qdq.graph.initializer if t.name == q.input[1]))
    qdq.graph.initializer.append(numpy_helper.from_array((scale * 2).astype(np.float32), "pool_scale_x2"))
    dq = next(n for n in qdq.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0])
    q.input[1] = dq.input[1] = "pool_scale_x2"
    with pytest.raises(CompileError, match=r"node 'pool1' \(MaxPool\): its output is quantized with .*equal scales"):
        import_onnx(qdq)


def check_reference_and_program(imported, x: np.ndarray, arch: Arch, samples: int):
    """reference_forward within 1 LSB of onnxruntime on ``x``, and the program built for ``arch`` computing the
    same as reference_forward on the first ``samples`` inputs (run_functionally); returns (layers, program)."""
    layers = lower_layers(imported.layers)
    ours = reference_forward(layers, quantize(x, imported.input)).astype(np.int32)
    theirs = quantize(run_ort(imported.qdq_model, x), imported.output).astype(np.int32)
    assert np.abs(ours - theirs).max() <= 1, f"max {np.abs(ours - theirs).max()} LSB vs onnxruntime"
    program = build_program(layers, arch, input_spec=imported.input, output_spec=imported.output)
    assert np.array_equal(run_functionally(program, quantize(x[:samples], program.input)), ours[:samples])
    return layers, program


def test_residual_add_of_the_graph_input(tmp_path):
    """Add(conv(x), x) with x the graph input: the input itself is the skip tensor (section 4.2)."""
    rng = np.random.default_rng(11)
    model = float_cnn(rng, (2, 6, 6), [("conv", 2, 3, 1, [1, 1, 1, 1]), ("flatten",), ("gemm", 3)])
    conv = model.graph.node[0]
    model.graph.node.insert(1, helper.make_node("Add", [conv.output[0], "x"], ["res"], name="residual"))
    model.graph.node[2].input[0] = "res"
    calibration = rng.standard_normal((32, 2, 6, 6)).astype(np.float32)
    imported = import_onnx(model, calibration=calibration)
    assert [layer.op for layer in imported.layers] == ["Conv", "Add", "Gemm"]
    assert [layer.sources for layer in imported.layers] == [(-1,), (0, -1), (1,)]
    x = rng.standard_normal((32, 2, 6, 6)).astype(np.float32)
    check_reference_and_program(imported, x, lean_arch(rows=2, cols=3), 4)


@pytest.mark.parametrize("first", [("pool", 2, 2, [0, 0, 0, 0]), ("avgpool", 3, 1, [1, 1, 1, 1])])
def test_float_model_whose_first_op_is_a_pool(first):
    """onnxruntime's quantizer leaves a pool on the graph input float unless told otherwise; flowtile quantizes it
    (ForceQuantizeNoInputCheck) and the program computes what onnxruntime's int8 model does."""
    rng = np.random.default_rng(21)
    model = float_cnn(rng, (3, 8, 8), [first, ("conv", 8, 3, 1, [1, 1, 1, 1]), ("relu",), ("flatten",), ("gemm", 4)])
    calibration = rng.standard_normal((32, 3, 8, 8)).astype(np.float32)
    imported = import_onnx(model, calibration=calibration)
    assert [layer.op for layer in imported.layers] == [{"pool": "MaxPool", "avgpool": "AveragePool"}[first[0]],
                                                       "Conv", "Gemm"]
    check_reference_and_program(imported, rng.standard_normal((16, 3, 8, 8)).astype(np.float32), lean_arch(), 4)


@pytest.mark.parametrize("kernel", [[2], [2, 2, 2]])
def test_qdq_pool_that_is_not_2d_names_kernel_shape(kernel):
    """A QDQ model with a 1-D or 3-D pool gets the float path's message, not a complaint about a missing MatMul."""
    spatial = [8] * len(kernel)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q_in"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq_in"),
             helper.make_node("MaxPool", ["xd"], ["p"], name="pool", kernel_shape=kernel),
             helper.make_node("QuantizeLinear", ["p", "s", "z"], ["pq"], name="q_out"),
             helper.make_node("DequantizeLinear", ["pq", "s", "z"], ["y"], name="dq_out")]
    graph = helper.make_graph(
        nodes, "pool_nd", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, *spatial])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, *[7] * len(kernel)])],
        [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(CompileError, match=r"node 'pool' \(MaxPool\): attribute 'kernel_shape' = \[[2, ]+\] is "
                                           r"unsupported \(2-D windows\)"):
        import_onnx(model)


def _insert_after(qdq: onnx.ModelProto, tensor: str, node: onnx.NodeProto) -> None:
    """Make ``node`` (one input, one output) read ``tensor`` and every former reader of ``tensor`` read its output."""
    for reader in qdq.graph.node:
        for i, name in enumerate(reader.input):
            if name == tensor:
                reader.input[i] = node.output[0]
    node.input[0] = tensor
    qdq.graph.node.append(node)
    del qdq.graph.value_info[:]  # let shape inference redo it


def test_explicit_relu_after_maxpool_and_clip_in_qdq_model(tmp_path):
    rng = np.random.default_rng(12)
    model = float_cnn(rng, (3, 7, 7), [("conv", 6, 3, 1, [1, 1, 1, 1]), ("pool", 2, 2, [0, 0, 1, 1]), ("flatten",),
                                       ("gemm", 4)])
    qdq = quantize_qdq(model, rng.standard_normal((16, 3, 7, 7)).astype(np.float32), tmp_path=tmp_path)
    conv = next(n for n in qdq.graph.node if n.op_type == "Conv")
    pool = next(n for n in qdq.graph.node if n.op_type == "MaxPool")
    pool_q = next(n for n in qdq.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == pool.output[0])
    pool_dq = next(n for n in qdq.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == pool_q.output[0])
    # Clip(0, 0.5) between the Conv and its output QuantizeLinear
    qdq.graph.initializer.extend([numpy_helper.from_array(np.array(0, np.float32), "clip_lo"),
                                  numpy_helper.from_array(np.array(0.5, np.float32), "clip_hi")])
    clip = helper.make_node("Clip", ["", "clip_lo", "clip_hi"], ["clipped"], name="clip")
    _insert_after(qdq, conv.output[0], clip)
    # Relu -> Q -> DQ (same parameters) after the MaxPool's DequantizeLinear
    relu = helper.make_node("Relu", [""], ["pool_relu"], name="pool_relu")
    _insert_after(qdq, pool_dq.output[0], relu)
    q = helper.make_node("QuantizeLinear", ["", pool_q.input[1], pool_q.input[2]], ["pool_relu_q"], name="pool_relu_q")
    _insert_after(qdq, "pool_relu", q)
    dq = helper.make_node("DequantizeLinear", ["", pool_q.input[1], pool_q.input[2]], ["pool_relu_dq"],
                          name="pool_relu_dq")
    _insert_after(qdq, "pool_relu_q", dq)
    qdq = onnx.shape_inference.infer_shapes(helper.make_model(
        helper.make_graph(_toposort(qdq.graph.node),
                          "cnn", qdq.graph.input, qdq.graph.output, qdq.graph.initializer),
        opset_imports=qdq.opset_import))
    imported = import_onnx(qdq)
    layers = lower_layers(imported.layers)
    conv_layer, pool_layer = layers[0], layers[1]
    assert conv_layer.clamp_hi < 127 and conv_layer.relu
    assert pool_layer.relu and pool_layer.clamp_lo == max(-128, imported.layers[1].output.int8_zero_point)
    x = rng.standard_normal((64, 3, 7, 7)).astype(np.float32)
    ours = reference_forward(layers, quantize(x, imported.input)).astype(int)
    assert np.abs(ours - quantize(run_ort(qdq, x), imported.output)).max() <= 1
    program = compile_model(qdq, lean_arch())
    assert np.array_equal(run_functionally(program, quantize(x[:3], program.input)), ours[:3])


def _toposort(nodes):
    """Nodes in an order where every input is produced before it is read."""
    nodes, done, produced = list(nodes), [], set()
    outputs = {out for n in nodes for out in n.output}
    while nodes:
        ready = [n for n in nodes if all(not i or i not in outputs or i in produced for i in n.input)]
        assert ready, "cycle"
        for n in ready:
            done.append(n)
            produced.update(n.output)
            nodes.remove(n)
    return done


# --------------------------------------------------------------------------------------------------
# op = LANE (docs/architecture.md section 4.1): depthwise Conv, AveragePool, GlobalAveragePool
# --------------------------------------------------------------------------------------------------
def random_lane_cnn(rng) -> tuple[tuple[int, int, int], list]:
    """A small random CNN with depthwise blocks and average/global pools: maps 4..12, channels 1..20."""
    channels, height, width = int(rng.integers(1, 21)), int(rng.integers(4, 13)), int(rng.integers(4, 13))
    shape = (channels, height, width)
    ops: list = []

    def window(max_kernel):
        side = min(height, width)
        k = int(rng.integers(1, min(max_kernel, side + 2) + 1))
        pads = [int(rng.integers(0, min(k - 1, 3) + 1)) for _ in range(4)]
        while min(height + pads[0] + pads[2], width + pads[1] + pads[3]) < k:
            k -= 1
            pads = [min(p, k - 1) for p in pads]
        stride = int(rng.integers(1, 4))
        return k, stride, pads

    def advance(k, stride, pads):
        return (height + pads[0] + pads[2] - k) // stride + 1, (width + pads[1] + pads[3] - k) // stride + 1

    def activation():
        choice = rng.integers(0, 3)
        if choice == 1:
            ops.append(("relu",))
        elif choice == 2:
            ops.append(("clip", float(rng.choice([0.5, 1.0, 6.0]))))

    if rng.random() < 0.5:  # a dense Conv first, or straight into a depthwise one
        channels = int(rng.integers(1, 21))
        ops.append(("conv", channels, 3, 1, [1, 1, 1, 1]))
    else:
        k, stride, pads = window(7)
        ops.append(("dw", k, stride, pads))
        height, width = advance(k, stride, pads)
    activation()
    for _ in range(int(rng.integers(1, 4))):
        kind = rng.choice(["dw", "avgpool", "conv"], p=[0.45, 0.4, 0.15])
        if min(height, width) < 2 and kind != "conv":
            kind = "conv"
        if kind == "conv":
            channels = int(rng.integers(1, 21))
            ops.append(("conv", channels, 1, 1, [0, 0, 0, 0]))
            activation()
            continue
        k, stride, pads = window(7 if kind == "dw" else 4)
        if kind == "dw":
            ops.append(("dw", k, stride, pads))
            activation()
        else:
            if not any(pads) and rng.random() < 0.5:
                ops.append(("avgpool", k, stride, pads, {"count_include_pad": 0}))
            else:
                ops.append(("avgpool", k, stride, pads))
            if rng.random() < 0.3:
                ops.append(("relu",))
        height, width = advance(k, stride, pads)
    ending = rng.integers(0, 3)
    if ending == 0:
        ops += [("gap",), ("flatten",), ("gemm", int(rng.integers(2, 8)))]
    elif ending == 1:
        ops += [("flatten",), ("gemm", int(rng.integers(2, 8)))]
    return shape, ops


def _lane_case(seed):
    rng = np.random.default_rng(seed)
    shape, ops = random_lane_cnn(rng)
    return rng, shape, ops, "uint8" if seed % 3 == 0 else "int8", seed % 4 != 1


LANE_CASES = [
    # hand-picked: every LANE layer kind, 1 and > L channels, border pads, strides, GAP into Gemm
    ((3, 8, 8), [("conv", 6, 3, 1, [1, 1, 1, 1]), ("relu",), ("dw", 3, 1, [1, 1, 1, 1]), ("relu",),
                 ("avgpool", 2, 2, [0, 0, 0, 0]), ("gap",), ("flatten",), ("gemm", 4)], "int8", True),
    ((1, 12, 12), [("dw", 5, 2, [2, 2, 2, 2]), ("clip", 1.0), ("avgpool", 3, 1, [1, 1, 1, 1]),
                   ("dw", 7, 3, [3, 0, 1, 2]), ("flatten",), ("gemm", 3)], "uint8", True),
    ((20, 5, 7), [("dw", 3, 1, [0, 0, 0, 0]), ("relu",), ("avgpool", 3, 1, [0, 0, 0, 0], {"count_include_pad": 0}),
                  ("gap",), ("reshape",), ("gemm", 5)], "int8", False),
    ((9, 4, 4), [("conv", 17, 1, 1, [0, 0, 0, 0]), ("relu",), ("dw", 2, 1, [0, 0, 1, 1]),
                 ("avgpool", 2, 1, [0, 0, 0, 0])], "int8", True),
    ((5, 6, 9), [("gap",), ("flatten",), ("gemm", 4)], "int8", True),  # quantize_static quantizes a GAP on the input
    ((7, 5, 5), [("conv", 12, 3, 1, [1, 1, 1, 1]), ("relu",), ("gap",)], "uint8", True),  # a (12, 1, 1) map output
]


def _lane_model(case):
    if case < len(LANE_CASES):
        shape, ops, activation, per_channel = LANE_CASES[case]
        rng = np.random.default_rng(3000 + case)
    else:
        rng, shape, ops, activation, per_channel = _lane_case(4000 + case)
    return rng, shape, ops, activation, per_channel


LANE_MAX_DIFF: dict[int, int] = {}


@pytest.mark.parametrize("case", range(len(LANE_CASES) + 16))
def test_lane_layers_match_onnxruntime(case, tmp_path):
    rng, shape, ops, activation, per_channel = _lane_model(case)
    model = float_cnn(rng, shape, ops)
    calibration = rng.standard_normal((32, *shape)).astype(np.float32)
    qdq = quantize_qdq(model, calibration, activation=activation, per_channel=per_channel, tmp_path=tmp_path)
    imported = import_onnx(qdq)
    kinds = {"conv": "Conv", "dw": "DepthwiseConv", "pool": "MaxPool", "avgpool": "AveragePool",
             "gap": "GlobalAveragePool", "gemm": "Gemm"}
    expected = [kinds[op[0]] for op in ops if op[0] in kinds]
    got = [l.op if l.op != "Conv" or e != "DepthwiseConv" or l.n_in > 1 else "DepthwiseConv"  # 1 channel: group 1
           for l, e in zip(imported.layers, expected)]
    assert got == expected
    layers = lower_layers(imported.layers)
    x = rng.standard_normal((64, *shape)).astype(np.float32)
    assert max(per_layer_lsb(imported, layers, x)) <= 1, ops
    ours = reference_forward(layers, quantize(x, imported.input)).astype(np.int32)
    theirs = quantize(run_ort(imported.qdq_model, x), imported.output).astype(np.int32)
    assert ours.shape == theirs.shape
    LANE_MAX_DIFF[case] = int(np.abs(ours - theirs).max())
    # End to end, per-layer 1-LSB differences (the fixed-point multiplier vs onnxruntime's float scale) may
    # accumulate through average pools; measured over these 22 networks: 0 LSB in 17, 1 in 3, 2 in 2.
    assert LANE_MAX_DIFF[case] <= 2, ops
    for arch in (lean_arch(), lean_arch(rows=4, cols=6, lanes=4, max_tile_outputs=256)):
        program = build_program(layers, arch, input_spec=imported.input, output_spec=imported.output)
        check_windowed_program(program, layers, tmp_path)
        assert np.array_equal(run_functionally(program, quantize(x[:3], program.input)), ours[:3])


def test_lane_lowering_of_depthwise_and_average_pools(tmp_path):
    """Weight words, bias folds, multipliers and padding rows of the three LANE layer kinds."""
    rng = np.random.default_rng(31)
    shape = (11, 7, 6)
    model = float_cnn(rng, shape, [("conv", 11, 3, 1, [1, 1, 1, 1]), ("dw", 3, 2, [1, 1, 0, 0]), ("relu",),
                                   ("avgpool", 2, 1, [1, 0, 1, 0]), ("gap",), ("flatten",), ("gemm", 3)])
    qdq = quantize_qdq(model, rng.standard_normal((16, *shape)).astype(np.float32), tmp_path=tmp_path)
    imported = import_onnx(qdq)
    dw, avg, gap = imported.layers[1:4]
    low_dw, low_avg, low_gap = lower_layers(imported.layers)[1:4]
    assert (dw.op, avg.op, gap.op) == ("DepthwiseConv", "AveragePool", "GlobalAveragePool")
    assert dw.weight.shape == (11, 1, 3, 3) and low_dw.n_in == low_dw.n_out == 11
    z = dw.input.int8_zero_point
    assert np.array_equal(low_dw.bias, dw.bias.astype(np.int64) - z * dw.weight.astype(np.int64).sum(axis=(1, 2, 3)))
    assert low_dw.pad_value == z
    for pool, low in ((avg, low_avg), (gap, low_gap)):
        area = pool.window.kernel_h * pool.window.kernel_w
        assert (pool.weight == 1).all() and np.array_equal(low.bias, np.full(11, -pool.input.int8_zero_point * area))
        ratio = pool.input.scale / (area * pool.output.scale)
        assert np.allclose(low.multiplier / 2.0 ** low.shift, ratio, rtol=1e-8)
        assert low.pad_value == pool.input.int8_zero_point
    assert (gap.window.kernel_h, gap.window.kernel_w, gap.window.out_height, gap.window.out_width) == \
        (avg.window.out_height, avg.window.out_width, 1, 1)
    lanes = 4
    words = weight_rows(low_dw, lanes)
    assert words.shape == (3 * 9, lanes)
    for c in range(12):
        for ky in range(3):
            for kx in range(3):
                expected = dw.weight[c, 0, ky, kx] if c < 11 else 0
                assert words[(c // lanes) * 9 + ky * 3 + kx, c % lanes] == expected
    program = build_program(lower_layers(imported.layers), lean_arch(lanes=lanes), input_spec=imported.input,
                            output_spec=imported.output)
    tile = next(t for t in program.tiles if t.config.op == OP_LANE)
    assert tile.config.n_out == 12 and tile.params.shape == (12, 3)
    assert tuple(tile.params[11]) == (0, 0, 1) and np.array_equal(tile.params[:11], low_dw.params)
    assert tile.config.weight_words == 27 and tile.config.act_base == 27
    # report: max(K + P, K_f + P + E, I + 2) per tile; MACs of a lane layer are C * OH*OW * KH*KW
    info = program.layers[1]
    assert info.macs == 11 * dw.window.out_height * dw.window.out_width * 9
    w, config = dw.window, tile.config
    received, emits = w.height * w.width * 3, config.out_rows * w.out_width * 3
    forwarded = config.forward_end - config.forward_begin
    assert config.tile_period_cycles(lanes) == max(received + config.n_pass, forwarded + config.n_pass + emits,
                                               config.out_rows * w.out_width * 3 * 9 + 2)
    assert "DepthwiseConv" in report(program) and "GlobalAveragePool" in report(program)


def test_lane_bands_split_output_rows(tmp_path):
    rng = np.random.default_rng(32)
    shape = (16, 12, 12)
    model = float_cnn(rng, shape, [("conv", 16, 1, 1, [0, 0, 0, 0]), ("dw", 3, 1, [1, 1, 1, 1]), ("relu",),
                                   ("flatten",), ("gemm", 4)])
    calibration = rng.standard_normal((16, *shape)).astype(np.float32)
    imported = import_onnx(model, calibration=calibration)
    layers = lower_layers(imported.layers)
    arch = lean_arch(rows=4, cols=4, max_tile_outputs=512)
    program = build_program(layers, arch, input_spec=imported.input, output_spec=imported.output)
    dw_tiles = [t for t in program.tiles if t.config.op == OP_LANE]
    assert len(dw_tiles) >= 2 and sum(t.config.output_pixels for t in dw_tiles) == 12 * 12
    check_windowed_program(program, layers, tmp_path)
    x_q = quantize(rng.standard_normal((2, *shape)).astype(np.float32), program.input)
    assert np.array_equal(run_functionally(program, x_q), reference_forward(layers, x_q))


def test_lane_network_on_the_emulator(tmp_path):
    """The emulator's op LANE (written concurrently by its own engineer) agrees with reference_forward."""
    emulator = pytest.importorskip("emulator")
    rng, shape, ops, activation, per_channel = _lane_model(0)
    qdq = quantize_qdq(float_cnn(rng, shape, ops), rng.standard_normal((32, *shape)).astype(np.float32),
                       activation=activation, per_channel=per_channel, tmp_path=tmp_path)
    program = compile_model(qdq, lean_arch())
    x = rng.standard_normal((8, *shape)).astype(np.float32)
    x_q, flits = input_flits(program, x)
    try:
        result = emulator.emulate(program, flits, len(x))
    except Exception as error:
        if "emulator" not in type(error).__module__ or "LANE" not in str(error):
            raise
        pytest.skip(f"emulator cannot run op LANE yet: {type(error).__name__}: {error}")
    q, _ = outputs_from_flits(program, result.out_flits, len(x))
    imported = import_onnx(qdq)
    assert np.array_equal(q, reference_forward(lower_layers(imported.layers), x_q))


# --------------------------------------------------------------------------------------------------
# residual blocks (docs/architecture.md section 4.2)
# --------------------------------------------------------------------------------------------------
RESNET_CASES = {
    "basic-identity": ((3, 8, 8), 8, [{"kind": "basic", "out": 8}], {}),
    "basic-projection": ((3, 8, 8), 8, [{"kind": "basic", "out": 16, "stride": 2}], {}),
    "projection-first-uint8": ((3, 8, 8), 8, [{"kind": "basic", "out": 16, "stride": 2}],
                               {"projection_first": True, "activation": "uint8"}),
    "inverted": ((4, 6, 6), 12, [{"kind": "inverted", "expand": 24}], {"per_channel": False}),
    "two-blocks-9ch": ((1, 7, 7), 9, [{"kind": "basic", "out": 9}, {"kind": "basic", "out": 18, "stride": 2}], {}),
    "fire": ((3, 6, 6), 8, [{"kind": "fire", "squeeze": 4, "expand": 8}], {}),
    "dense-identity-first": ((2, 6, 6), 8, [{"kind": "dense", "growth": 5}], {"activation": "uint8"}),
    "dense-conv-first": ((2, 5, 5), 8, [{"kind": "dense", "growth": 8, "identity_first": False}],
                         {"per_channel": False}),
}


def _resnet(case, tmp_path):
    shape, stem, blocks, options = RESNET_CASES[case]
    rng = np.random.default_rng(sum(map(ord, case)))
    model = random_models.random_float_resnet(rng, shape, stem, blocks, 5,
                                              projection_first=options.get("projection_first", False))
    calibration = rng.standard_normal((48, *shape)).astype(np.float32)
    qdq = quantize_qdq(model, calibration, activation=options.get("activation", "int8"),
                       per_channel=options.get("per_channel", True), tmp_path=tmp_path)
    return qdq, rng.standard_normal((48, *shape)).astype(np.float32)


def check_stream_program(program: Program, layers) -> None:
    """Section 4.2 bookkeeping: every tile stores exactly its layer's input (both operands for an Add), the
    stream into a tile has the words the previous tile emits, and only layers inside a residual block carry
    words they do not store."""
    lanes = program.arch.lanes
    emitted = program.input_words
    for tile in program.tiles:
        c = tile.config
        assert c.n_in_words + c.n_pass == emitted, tile.key
        assert 0 <= c.store_begin <= c.store_end <= c.n_in_words
        emitted = c.forwarded_words + c.n_pass + c.result_words(lanes)
    assert emitted == program.output_words
    by_position = {(t.row, t.col): t for t in program.tiles}
    for info, layer in zip(program.layers, layers):
        for key in info.tiles:
            c = by_position[key].config
            # a join's band stores its rows (all, or in_height of them in two store ranges) of both operand maps
            rows = c.in_height if c.store2_end else layer.window.height if layer.is_join else 0
            if layer.is_concat:
                w, words_a = layer.window, layer.concat_channels_a // lanes
                assert c.op == OP_CONCAT and c.concat_words_a == words_a
                assert c.stored_words == rows * w.width * -(-layer.n_out // lanes)
            if layer.is_add:
                map_words = rows * layer.window.width * -(-layer.n_out // lanes)
                assert c.op == OP_ADD and c.stored_words == 2 * map_words
                assert sorted((c.operand_a_offset, c.operand_b_offset)) == [0, map_words]
                assert c.add_mult_a <= ADD_MULT_MAX and c.add_mult_b <= ADD_MULT_MAX
                assert max(c.add_mult_a, c.add_mult_b) == ADD_MULT_MAX


@pytest.mark.parametrize("case", sorted(RESNET_CASES))
def test_residual_blocks_match_onnxruntime(case, tmp_path):
    qdq, x = _resnet(case, tmp_path)
    imported = import_onnx(qdq)
    joins = [layer for layer in imported.layers if layer.op in ("Add", "Concat")]
    assert len(joins) == len(RESNET_CASES[case][2])
    layers = lower_layers(imported.layers)
    ours = reference_forward(layers, quantize(x, imported.input)).astype(np.int32)
    theirs = quantize(run_ort(imported.qdq_model, x), imported.output).astype(np.int32)
    assert np.abs(ours - theirs).max() <= 1, f"max {np.abs(ours - theirs).max()} LSB vs onnxruntime"
    for arch in (lean_arch(rows=4, cols=4, sram_bytes=65536), lean_arch(rows=3, cols=5, lanes=4, sram_bytes=65536)):
        program = build_program(layers, arch, input_spec=imported.input, output_spec=imported.output)
        program.validate()
        check_stream_program(program, layers)
        assert np.array_equal(run_functionally(program, quantize(x[:2], program.input)), ours[:2])


@pytest.mark.parametrize("case", ["basic-identity", "inverted"])
def test_join_bands_store_their_rows_of_both_operands(case, tmp_path):
    """On tiles too small for both operand maps of an Add (twice), the Add splits into bands of rows, each storing
    its rows of both maps in two store ranges (section 4.2): the independent dataflow model above agrees with the
    integer reference."""
    qdq, x = _resnet(case, tmp_path)
    imported = import_onnx(qdq)
    layers = lower_layers(imported.layers)
    program = build_program(layers, lean_arch(rows=6, cols=6, sram_bytes=1552), input_spec=imported.input,
                            output_spec=imported.output)
    assert any(t.config.op == OP_ADD and t.config.store2_end for t in program.tiles)
    check_stream_program(program, layers)
    ours = reference_forward(layers, quantize(x[:2], imported.input)).astype(np.int32)
    assert np.array_equal(run_functionally(program, quantize(x[:2], program.input)), ours)


def test_residual_stream_registers(tmp_path):
    """A projection block: the shorter branch (the 1x1 projection) runs first and its output rides in front of
    the main branch; the main branch's first layer stores the block input and forwards the projection."""
    qdq, _ = _resnet("basic-projection", tmp_path)
    layers = lower_layers(import_onnx(qdq).layers)
    assert [layer.name for layer in layers][1:5] == ["block0_proj", "block0_conv1", "block0_conv2", "block0_add"]
    program = build_program(layers, lean_arch(rows=3, cols=4), input_spec=import_onnx(qdq).input,
                            output_spec=import_onnx(qdq).output)
    by_name = {info.name: [next(t for t in program.tiles if (t.row, t.col) == key).config for key in info.tiles]
               for info in program.layers}
    x_words, p_words = 8 * 8 * 1, 4 * 4 * 2  # the block input (8 ch, 8x8) and the projection (16 ch, 4x4)
    proj, conv1, conv2, add = (by_name[n][-1] for n in ("block0_proj", "block0_conv1", "block0_conv2", "block0_add"))

    def stored_span(name):  # the words of the layer's stream its tiles store, together (each its band's input rows)
        configs = by_name[name]
        offsets = stream_offsets(configs)
        return (min(o + c.store_begin for o, c in zip(offsets, configs)),
                max(o + c.store_end for o, c in zip(offsets, configs)))

    # the 1x1 stride-2 projection reads input rows 0, 2, 4, 6 only: row 7 is never stored
    assert proj.n_in_words == x_words and stored_span("block0_proj") == (0, 7 * 8)
    assert (proj.forward_begin, proj.forward_end) == (0, x_words)        # x is still needed
    # conv1's first tile receives both, its last one only its band's rows of x and the projection behind them,
    # which it alone forwards (section 4.2: a tile forwards only what later tiles read)
    conv1_first, conv1_offset = by_name["block0_conv1"][0], stream_offsets(by_name["block0_conv1"])[-1]
    assert conv1_first.n_in_words == x_words + p_words and stored_span("block0_conv1") == (0, x_words)
    assert conv1.n_in_words == x_words + p_words - conv1_offset and conv1.store_begin == 0 and conv1_offset > 0
    assert (conv1.forward_begin, conv1.forward_end) == (x_words - conv1_offset, x_words + p_words - conv1_offset)
    assert stored_span("block0_conv2") == (p_words, 2 * p_words)
    assert (conv2.forward_begin, conv2.forward_end) == (0, p_words)
    assert (add.n_in_words, add.store_begin, add.store_end, add.forward_end) == (2 * p_words, 0, 2 * p_words, 0)
    # the projection comes first in the stream, but is the Add's second ONNX input
    assert (add.operand_a_offset, add.operand_b_offset) == (p_words, 0)


def test_add_lowering():
    from flowtile.compiler.onnx_import import AddLayer
    from flowtile.compiler.lower import lower_layer
    a, b, y = QuantParams(0.02, 5, "int8"), QuantParams(0.05, 130, "uint8"), QuantParams(0.04, -128, "int8")
    layer = lower_layer(AddLayer("add", (3, 2, 2), (a, b), y, False, (0, 1)))
    m_a, m_b = layer.add_mult
    assert m_b == ADD_MULT_MAX and m_a == round(ADD_MULT_MAX * 0.02 / 0.05)
    assert (layer.bias == -(5 * m_a + 2 * m_b)).all()
    assert abs(layer.multiplier[0] / 2.0 ** layer.shift[0] - 0.05 / (ADD_MULT_MAX * 0.04)) < 1e-9 * 0.05 / 0.04
    assert layer.relu and layer.clamp_lo == -128  # a zero point of -128 is an implicit ReLU


def _graft(model: onnx.ModelProto, nodes: list) -> onnx.ModelProto:
    model.graph.node.extend(nodes)
    return model


@pytest.mark.parametrize("problem", ["three-way", "no-join", "shape", "nested"])
def test_unsupported_forks_name_the_problem(problem):
    rng = np.random.default_rng(5)
    model = float_cnn(rng, (2, 6, 6), [("conv", 4, 3, 1, [1, 1, 1, 1]), ("relu",)])
    t = model.graph.node[-1].output[0]
    w = numpy_helper.from_array((rng.standard_normal((4, 4, 1, 1)) * 0.3).astype(np.float32), "w1x1")
    w2 = numpy_helper.from_array((rng.standard_normal((4, 4, 3, 3)) * 0.3).astype(np.float32), "w3x3")
    model.graph.initializer.extend([w, w2])
    conv = lambda name, src, out, **attrs: helper.make_node("Conv", [src, attrs.pop("w", "w1x1")], [out], name=name,
                                                             **attrs)
    if problem == "three-way":
        nodes = [conv("a", t, "a"), conv("b", t, "b"), helper.make_node("Add", ["a", "b"], ["ab"], name="add_ab"),
                 helper.make_node("Add", ["ab", t], ["y"], name="add_y")]
        expected = r"feeds 3 nodes"
    elif problem == "no-join":
        nodes = [conv("a", t, "a"), conv("b", t, "b"), helper.make_node("Mul", ["a", "b"], ["y"], name="mul")]
        expected = r"branch from tensor .* ends at|unsupported op"
    elif problem == "shape":
        nodes = [helper.make_node("GlobalAveragePool", [t], ["a"], name="gap"),
                 helper.make_node("Add", ["a", t], ["y"], name="add")]  # ONNX broadcasting
        expected = r"node 'add' \(Add\): adds maps of shapes \[4, 1, 1\] and \[4, 6, 6\]"
    else:
        nodes = [conv("a", t, "a"), conv("a1", "a", "a1"), helper.make_node("Add", ["a", "a1"], ["a2"], name="inner"),
                 helper.make_node("Add", ["a2", t], ["y"], name="outer")]
        expected = r"forks again inside the residual branch"
    model = _graft(model, nodes)
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "C", "H", "W"]))
    with pytest.raises(CompileError, match=expected):
        import_onnx(model, calibration=rng.standard_normal((8, 2, 6, 6)).astype(np.float32))


@pytest.mark.parametrize("ops", [
    [("conv", 6, 3, 1, [1, 1, 1, 1]), ("conv", 6, 3, 1, [1, 1, 1, 1], {"group": 3}), ("relu",)],
    [("conv", 6, 3, 1, [1, 1, 1, 1]), ("conv", 12, 3, 2, [1, 1, 1, 1], {"group": 6})],  # depth multiplier 2
    [("conv", 4, 3, 1, [1, 1, 1, 1], {"group": 2})],
], ids=["group3", "multiplier2", "group2-on-input"])
def test_grouped_convolutions_match_onnxruntime(ops, tmp_path):
    """Grouped (not depthwise) Convs run as Convs with block-diagonal weights; the report counts only the
    products inside the groups as MACs."""
    rng = np.random.default_rng(len(str(ops)))
    model = float_cnn(rng, (2, 7, 7), ops)
    calibration = rng.standard_normal((32, 2, 7, 7)).astype(np.float32)
    qdq = quantize_qdq(model, calibration, tmp_path=tmp_path)
    imported = import_onnx(qdq)
    grouped = [layer for layer in imported.layers if layer.groups > 1]
    assert len(grouped) == 1
    x = rng.standard_normal((32, 2, 7, 7)).astype(np.float32)
    _, program = check_reference_and_program(imported, x, lean_arch(rows=2, cols=3), 2)
    layer = grouped[0]
    info = next(i for i in program.layers if i.name == layer.name)
    w = layer.window
    assert info.macs == layer.n_out * w.out_height * w.out_width * (w.channels // layer.groups) * w.kernel_h * w.kernel_w


def test_concat_of_a_channel_count_off_the_lanes_is_rejected(tmp_path):
    """Concat(x, conv(x)) with x of 6 channels on 8 lanes: the second input would start mid-word."""
    rng = np.random.default_rng(3)
    model = random_models.random_float_resnet(rng, (2, 5, 5), 6, [{"kind": "dense", "growth": 4}], 3)
    qdq = quantize_qdq(model, rng.standard_normal((16, 2, 5, 5)).astype(np.float32), tmp_path=tmp_path)
    with pytest.raises(CompileError, match=r"layer 'block0_concat' \(Concat\): its first input has 6 channels, "
                                           r"not a multiple of the 8 lanes \(arch field 'lanes'\)"):
        compile_model(qdq, lean_arch())
    compile_model(qdq, lean_arch(lanes=2))  # 6 channels are 3 whole words of 2 lanes


def test_resnet8_balance_fills_the_grid(tmp_path):
    """The partition of the MLPerf Tiny ResNet-8 shape on 11x11 (benchmarks/resnet8.py measures it on the
    emulator): bands of output pixels with per-band channel groups leave at most one tile idle (the budget below
    which no layer fits; the op BCAST stem, section 4.5, needs a tile fewer than its MAC form did), and the slowest
    tile alone (the compiler's estimate) keeps the whole network's MAC utilization >= 90 %."""
    from flowtile.compiler.emit import estimated_interval
    rng = np.random.default_rng(0)
    blocks = [{"kind": "basic", "out": 16}, {"kind": "basic", "out": 32, "stride": 2},
              {"kind": "basic", "out": 64, "stride": 2}]
    model = random_models.random_float_resnet(rng, (3, 32, 32), 16, blocks, 10)
    calibration = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)
    arch = lean_arch(sram_bytes=65536, max_tile_outputs=2048).with_grid("11x11")
    program = compile_model(model, arch, calibration=calibration)
    assert program.input.layout == "dense" and program.tiles[0].config.op == OP_BCAST   # the 3-channel stem (4.5)
    assert sum(len(layer.tiles) for layer in program.layers) >= arch.n_tiles - 1
    utilization = program.macs_per_inference / (estimated_interval(program) * arch.n_tiles * arch.lanes)
    assert utilization >= 0.90, f"estimated utilization {utilization:.3f}"
    joins = [layer for layer in program.layers if layer.op.startswith("Add")]
    assert [len(layer.tiles) for layer in joins] == [1, 1, 1]  # results stream out: one Add tile per block
    imported = import_onnx(model, calibration=calibration)
    check_stream_program(program, lower_layers(imported.layers))


def test_report_gives_throughput_per_memory_area():
    """The report's MACs/cycle per Mbit is the network's MACs over the estimated interval and the memory bits of all
    tiles (Arch.tile_memory_bits, which flowtile area checks against synthesis)."""
    import re
    from flowtile.compiler import report
    arch = lean_arch(rows=4, cols=4)
    program = compile_model(str(Path(__file__).resolve().parents[1] / "models" / "digits_cnn.onnx"), arch)
    text = report(program)
    interval = int(re.search(r"estimated interval (\d+) cycles/inference", text).group(1))
    per_mbit = float(re.search(r"throughput per area: ([\d.]+) MACs/cycle per Mbit", text).group(1))
    mbit = arch.n_tiles * sum(arch.tile_memory_bits.values()) / 1e6
    assert per_mbit == pytest.approx(program.macs_per_inference / interval / mbit, abs=0.006)
    assert arch.tile_memory_bits["sram"] == 8 * arch.sram_bytes


def test_padded_channel_convolution_runs_as_broadcast(tmp_path):
    """A convolution over 3 channels (5 padding lanes of 8) with 16 outputs runs as op BCAST (section 4.5): ``I =
    n_pix * N_g * KH*KW*C`` = 3/8 of op MAC's, the same rate as the host's window packing, which the compiler then
    does not use (a tie goes to the plain input: fewer host words); a 1-channel convolution too, split over
    output-channel groups on a small grid. Both compute the lowered layers' arithmetic exactly."""
    from flowtile.compiler.emit import estimated_interval
    rng = np.random.default_rng(46)
    model = float_cnn(rng, (3, 10, 10), [("conv", 16, 3, 1, [1, 1, 1, 1]), ("relu",), ("pool", 2, 2, [0, 0, 0, 0]),
                                         ("conv", 8, 3, 1, [1, 1, 1, 1]), ("flatten",), ("gemm", 4)])
    calibration = rng.standard_normal((16, 3, 10, 10)).astype(np.float32)
    imported = import_onnx(model, calibration=calibration)
    layers = lower_layers(imported.layers)
    assert layers[0].broadcasts(8) and not layers[1].broadcasts(8) and not layers[2].broadcasts(8)
    arch = lean_arch(rows=3, cols=3)
    program = compile_model(model, arch, calibration=calibration)
    assert program.input.layout == "dense" and program.input_words == 3 * 10 * 10 // 8 + 1   # was 100: 5/8 padding
    first = program.tiles[0].config
    assert first.op == OP_BCAST and first.in_channels == 3 and first.in_dense
    assert sum(t.config.compute_issue_cycles for t in program.tiles[:len(program.layers[0].tiles)]) == 100 * 2 * 27
    x_q = quantize(rng.standard_normal((3, 3, 10, 10)).astype(np.float32), program.input)
    assert np.array_equal(run_functionally(program, x_q), reference_forward(layers, x_q))
    check_windowed_program(program, layers, tmp_path)
    packed_layers, packed_spec = pack_input_window(layers, imported.input, arch.lanes)
    packed = build_program(packed_layers, arch, input_spec=packed_spec, output_spec=program.output)
    assert estimated_interval(packed) >= estimated_interval(program)

    narrow = float_cnn(rng, (1, 12, 12), [("conv", 32, 5, 1, [2, 2, 2, 2]), ("relu",), ("flatten",), ("gemm", 3)])
    calibration = rng.standard_normal((16, 1, 12, 12)).astype(np.float32)
    layers = lower_layers(import_onnx(narrow, calibration=calibration).layers)
    small = lean_arch(rows=4, cols=4, lanes=8, max_tile_outputs=16)   # 32 outputs: two groups of two words at least
    program = compile_model(narrow, small, calibration=calibration, pack_input=False)
    conv = program.tiles[:len(program.layers[0].tiles)]
    assert {t.config.op for t in conv} == {OP_BCAST} and any(t.config.pass_per_pixel for t in conv)
    x_q = quantize(rng.standard_normal((3, 1, 12, 12)).astype(np.float32), program.input)
    assert np.array_equal(run_functionally(program, x_q), reference_forward(layers, x_q))
    check_windowed_program(program, layers, tmp_path)


@pytest.mark.parametrize("channels, lanes", [(1, 8), (3, 8), (3, 4), (5, 16)])
def test_dense_layout_packs_channels_back_to_back(channels, lanes):
    """Layout "dense" (section 4.5): element (c, y, x) is byte (y*W + x)*C + c of the tensor, L bytes a flit, the
    last flit zero-padded; unpack_flits inverts it."""
    rng = np.random.default_rng(channels * 100 + lanes)
    height, width = 5, 7
    spec = TensorSpec("x", (channels, height, width), 0.1, 3, "int8", "dense")
    values = rng.integers(-128, 128, (2, channels * height * width)).astype(np.int8)
    flits = pack_flits(values, lanes, spec)
    n = channels * height * width
    assert spec.words(lanes) == -(-n // lanes) and flits.shape == (2 * spec.words(lanes), lanes)
    stream = flits.reshape(2, -1)
    maps = values.reshape(2, channels, height, width)
    for b in range(2):
        for c in range(channels):
            for y in range(height):
                for x in range(width):
                    assert stream[b, (y * width + x) * channels + c] == maps[b, c, y, x]
        assert not stream[b, n:].any()
    assert np.array_equal(unpack_flits(flits, 2, n, spec), values)
    assert TensorSpec.from_dict(spec.to_dict()) == spec
