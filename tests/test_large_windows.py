"""Kernels and pools as large as the map (issue "Real models as published", item 3).

Kernels 1..255 (the 8-bit ``kernel_h``/``kernel_w`` registers), non-square, pads below the kernel (``pad_top`` and
``pad_left`` are 8-bit registers), equal strides 1..3: the MLPerf Tiny keyword-spotting DS-CNN's first convolution
(10x4, stride 2, SAME-like pads on its 49x10 input), ResNet-8's final 8x8 AveragePool (a global pool written as a
windowed one), a 9x9 convolution. The spec (CONFIG_FIELDS, TileConfig.validate), the compiler against onnxruntime
through the emulator, and the RTL against the emulator (cycle-exact).
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from flowtile.arch import CONFIG_FIELDS, OP_BCAST, OP_LANE, OP_MAC, OP_MAX, Arch
from flowtile.testing.archs import lean_arch
from flowtile.compiler import CompileError, compile_model, import_onnx, int8_model, lower_layers
from flowtile.emulator import emulate
from flowtile.tile_config import ConfigError, TileConfig
from flowtile.testing.oracle_checks import assert_emulator_matches_onnxruntime, assert_rtl_matches_emulator
from flowtile.testing.random_models import quantize_qdq

from test_compiler import check_windowed_program

#: The small grid the RTL tests run on (one Verilator build for all of them).
RTL_ARCH = lean_arch(rows=2, cols=2)


def float_model(rng, input_shape, ops, *, opset=17) -> onnx.ModelProto:
    """A float CNN on ``[N, *input_shape]``. ``ops``: ("conv", out, (kh, kw), stride, pads), ("relu",),
    ("avgpool" | "maxpool", (kh, kw), stride, pads[, attrs]), ("flatten",), ("gemm", n)."""
    nodes, inits = [], []
    channels, height, width = input_shape
    x, flat = "x", None
    for i, op in enumerate(ops):
        out = f"t{i}"
        if op[0] == "conv":
            _, o, (kh, kw), stride, pads = op
            w = (rng.standard_normal((o, channels, kh, kw)) / np.sqrt(channels * kh * kw)).astype(np.float32)
            inits += [numpy_helper.from_array(w, f"k{i}"),
                      numpy_helper.from_array((0.1 * rng.standard_normal(o)).astype(np.float32), f"kb{i}")]
            nodes.append(helper.make_node("Conv", [x, f"k{i}", f"kb{i}"], [out], name=f"conv{i}", kernel_shape=[kh, kw],
                                          strides=[stride, stride], pads=list(pads)))
            channels = o
        elif op[0] in ("avgpool", "maxpool"):
            _, (kh, kw), stride, pads, *extra = op
            attrs = dict(kernel_shape=[kh, kw], strides=[stride, stride], pads=list(pads), **(extra[0] if extra else {}))
            if op[0] == "avgpool":
                attrs.setdefault("count_include_pad", 1)
            nodes.append(helper.make_node("AveragePool" if op[0] == "avgpool" else "MaxPool", [x], [out],
                                          name=f"{op[0]}{i}", **attrs))
        elif op[0] == "relu":
            nodes.append(helper.make_node("Relu", [x], [out], name=f"relu{i}"))
        elif op[0] == "flatten":
            nodes.append(helper.make_node("Flatten", [x], [out], name=f"flatten{i}"))
            flat = channels * height * width
        elif op[0] == "gemm":
            w = (rng.standard_normal((op[1], flat)) / np.sqrt(flat)).astype(np.float32)
            inits += [numpy_helper.from_array(w, f"w{i}"),
                      numpy_helper.from_array((0.1 * rng.standard_normal(op[1])).astype(np.float32), f"b{i}")]
            nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [out], name=f"fc{i}", transB=1))
            flat = op[1]
        if op[0] in ("conv", "avgpool", "maxpool"):
            top, left, bottom, right = op[4] if op[0] == "conv" else op[3]
            (kh, kw), stride = op[2] if op[0] == "conv" else op[1], op[3] if op[0] == "conv" else op[2]
            dilation = (op[4] if op[0] != "conv" and len(op) > 4 else {}).get("dilations", [1, 1])[0]
            kh, kw = (kh - 1) * dilation + 1, (kw - 1) * dilation + 1
            height = (height + top + bottom - kh) // stride + 1
            width = (width + left + right - kw) // stride + 1
        x = out
    out_shape = ["N", flat] if flat is not None else ["N", channels, height, width]
    graph = helper.make_graph(nodes, "large_windows",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *input_shape])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, out_shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def int8(tmp_path, model, calibration, kind):
    """The int8 model compiled and given to the oracle: onnxruntime's QDQ file, or the float model quantized by the
    compiler (:func:`int8_model`)."""
    float_path = tmp_path / "float.onnx"
    onnx.save(model, float_path)
    if kind == "qdq":
        return onnx.load(str(quantize_qdq(float_path, tmp_path / "qdq.onnx", calibration, activation_uint8=False,
                                          per_channel=True)))
    return int8_model(float_path, calibration)


def emulator_vs_onnxruntime(program, model, x):
    """Emulator outputs equal onnxruntime's (graph optimizations off) within 1 LSB, and carry information."""
    comparison = assert_emulator_matches_onnxruntime(model, program, x)
    assert len(np.unique(comparison.ort_q)) > 3, "the outputs must carry information"


def compiled(tmp_path, model, arch, **options):
    program = compile_model(model, arch, **options)
    check_windowed_program(program, lower_layers(import_onnx(model).layers), tmp_path)
    return program


# --------------------------------------------------------------------------------------------------
# (a) the spec: register widths and TileConfig.validate
# --------------------------------------------------------------------------------------------------
def _window_tile(**changes) -> TileConfig:
    """A valid computing tile: a 10x4 convolution, stride 2, pads (4, 1), over a 49x10 one-word map."""
    registers = dict(n_in_words=490, store_begin=0, store_end=490, n_out=8, w_base=0, act_base=320, dest_host=1,
                     clamp_lo=-128, clamp_hi=127, op=OP_MAC, in_height=49, in_width=10, words_per_pixel=1,
                     kernel_h=10, kernel_w=4, stride=2, pad_top=4, pad_left=1, out_rows=25, out_width=5)
    registers.update(changes)
    return TileConfig(**registers)


def test_window_registers_are_8_bits():
    widths = {name: (bits, signed) for name, bits, signed in CONFIG_FIELDS}
    for name in ("kernel_h", "kernel_w", "pad_top", "pad_left"):
        assert widths[name] == (8, False), name


@pytest.mark.parametrize("changes", [
    {}, dict(pad_top=9, pad_left=3), dict(op=OP_MAX, pad_value=-128, kernel_h=255, kernel_w=255, pad_top=254, pad_left=254),
    dict(pad_top=255, pad_left=255),   # a window reading padding only is computed like any other
    dict(op=OP_LANE, n_out=8, w_base=0, act_base=40, kernel_h=49, kernel_w=10, pad_top=0, pad_left=0, out_rows=1,
         out_width=1, stride=1),       # a global pool over the whole 49x10 map
])
def test_tile_config_accepts_large_windows(changes):
    _window_tile(**changes).validate(lean_arch())


@pytest.mark.parametrize("changes, pattern", [
    (dict(pad_top=256), r"config register 'pad_top' = 256 is out of range 0\.\.255"),
    (dict(pad_left=256), r"config register 'pad_left' = 256 is out of range 0\.\.255"),
    (dict(pad_left=-1), r"config register 'pad_left' = -1 is out of range 0\.\.255"),
    (dict(kernel_h=256), r"config register 'kernel_h' = 256 is out of range 0\.\.255"),
    (dict(kernel_w=0), r"config register kernel_w = 0 must be 1\.\.255 when n_out > 0"),
    (dict(stride=4), r"config register 'stride' = 4 is out of range 0\.\.3"),
])
def test_tile_config_rejects_beyond_the_widened_ranges(changes, pattern):
    with pytest.raises(ConfigError, match=pattern):
        _window_tile(**changes).validate(lean_arch())


def test_load_encoding_carries_wide_pads():
    from flowtile.hdl.layouts import config_field_index, encode_config
    tile = _window_tile(op=OP_MAX, pad_value=-128, pad_top=200, pad_left=131, kernel_h=201, kernel_w=132)
    encoded = dict(encode_config(lean_arch(), tile))
    assert [encoded[config_field_index(name)] for name in ("pad_top", "pad_left", "kernel_h", "kernel_w")] == \
        [200, 131, 201, 132]


# --------------------------------------------------------------------------------------------------
# the compiler's limits: one line naming node, op and attribute
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ops, pattern", [
    ([("conv", 4, (3, 3), 1, [3, 1, 1, 1])],
     r"node 'conv0' \(Conv\): attribute 'pads' = \[3, 1, 1, 1\] is unsupported \(below the 3x3 kernel"),
    ([("conv", 4, (10, 4), 2, [4, 4, 5, 1])],
     r"node 'conv0' \(Conv\): attribute 'pads' = \[4, 4, 5, 1\] is unsupported \(below the 10x4 kernel: top and "
     r"bottom 0\.\.9, left and right 0\.\.3\)"),
    ([("conv", 4, (3, 3), 1, [1, 1, 1, 1]), ("maxpool", (2, 4), 2, [0, 0, 2, 0])],
     r"node 'maxpool1' \(MaxPool\): attribute 'pads' = \[0, 0, 2, 0\] is unsupported \(below the 2x4 kernel"),
    ([("conv", 4, (3, 3), 1, [1, 1, 1, 1]), ("avgpool", (3, 3), 1, [0, 0, 0, 0], {"ceil_mode": 1})],
     r"node 'avgpool1' \(AveragePool\): attribute 'ceil_mode' = 1 is unsupported"),
    ([("conv", 4, (3, 3), 1, [1, 1, 1, 1]), ("maxpool", (3, 3), 1, [0, 0, 0, 0], {"dilations": [2, 2]})],
     r"node 'maxpool1' \(MaxPool\): attribute 'dilations' = \[2, 2\] is unsupported"),
    ([("conv", 4, (3, 3), 1, [1, 1, 1, 1]), ("avgpool", (8, 8), 1, [1, 1, 1, 1], {"count_include_pad": 0})],
     r"node 'avgpool1' \(AveragePool\): attribute 'count_include_pad' = 0 with 'pads' = \[1, 1, 1, 1\]"),
])
def test_unsupported_windows_name_node_op_and_attribute(ops, pattern):
    rng = np.random.default_rng(3)
    model = float_model(rng, (2, 8, 8), ops + [("flatten",), ("gemm", 3)])
    with pytest.raises(CompileError, match=pattern) as caught:
        import_onnx(model, calibration=rng.standard_normal((4, 2, 8, 8)).astype(np.float32))
    assert "\n" not in str(caught.value)


def test_unequal_strides_and_huge_kernels_are_rejected():
    rng = np.random.default_rng(4)
    for attrs, pattern in ((dict(kernel_shape=[3, 3], strides=[1, 2]), r"attribute 'strides' = \[1, 2\]"),
                           (dict(kernel_shape=[256, 1]), r"attribute 'kernel_shape' = \[256, 1\] is unsupported "
                                                         r"\(1\.\.255 each")):
        node = helper.make_node("MaxPool", ["x"], ["y"], name="pool", **attrs)
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 8, 8])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, "H", "W"])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        with pytest.raises(CompileError, match=r"node 'pool' \(MaxPool\): " + pattern):
            import_onnx(model, calibration=rng.standard_normal((4, 2, 8, 8)).astype(np.float32))


# --------------------------------------------------------------------------------------------------
# (b) compile + emulator vs onnxruntime
# --------------------------------------------------------------------------------------------------
#: DS-CNN's stem: a 10x4 convolution, stride 2, SAME padding on the 49x10 map (rows: 9 padded, 4 on top and 5
#: below; columns: 2, one each side) -> 25x5; then its average pool over the whole 25x5 map (a global pool).
DS_CNN = [("conv", 8, (10, 4), 2, [4, 1, 5, 1]), ("relu",), ("avgpool", (25, 5), 1, [0, 0, 0, 0]), ("flatten",),
          ("gemm", 6)]


@pytest.mark.parametrize("kind", ["float", "qdq"])
@pytest.mark.parametrize("stem_outputs, layout", [(8, "dense"), (6, "im2col")], ids=["broadcast", "im2col"])
def test_ds_cnn_stem_10x4_stride2(tmp_path, kind, stem_outputs, layout):
    """8 stem outputs fill a word: the stem runs as op BCAST (section 4.5) on the dense map, windowed by bands; 6 do
    not: op MAC, and the host packs its window (im2col, section 8), the faster program."""
    rng = np.random.default_rng(10)
    calibration = rng.standard_normal((16, 1, 49, 10)).astype(np.float32)
    ops = [("conv", stem_outputs, *DS_CNN[0][2:])] + DS_CNN[1:]
    model = int8(tmp_path, float_model(rng, (1, 49, 10), ops), calibration, kind)
    layers = import_onnx(model).layers
    assert [layer.op for layer in layers] == ["Conv", "GlobalAveragePool", "Gemm"]
    w = layers[0].window
    assert (w.kernel_h, w.kernel_w, w.stride, w.pad_top, w.pad_left, w.out_height, w.out_width) == (10, 4, 2, 4, 1,
                                                                                                    25, 5)
    program = compiled(tmp_path, model, lean_arch())
    assert program.input.layout == layout
    conv = program.tiles[:len(program.layers[0].tiles)]
    if layout == "dense":   # the graph input's one channel packed 8 a word (section 4.5)
        assert {t.config.op for t in conv} == {OP_BCAST} and all(t.config.in_dense for t in conv)
        assert {(t.config.kernel_h, t.config.kernel_w) for t in conv} == {(10, 4)}
        assert len(conv) > 1 and max(t.config.pad_top for t in conv) == 4   # bands: the first keeps the top pad
        assert all(t.config.in_height < 49 for t in conv[1:-1])              # a band stores the rows it reads
    x = rng.standard_normal((5, 1, 49, 10)).astype(np.float32)
    emulator_vs_onnxruntime(program, model, x)


@pytest.mark.parametrize("pool, op", [
    (("avgpool", (5, 5), 1, [2, 2, 2, 2]), "AveragePool"),   # SAME, count_include_pad = 1: pads up to kernel - 1
    (("avgpool", (5, 5), 3, [0, 0, 0, 0]), "AveragePool"),
    (("avgpool", (8, 8), 1, [0, 0, 0, 0]), "GlobalAveragePool"),   # ResNet-8's final pool
    (("avgpool", (8, 8), 2, [0, 0, 1, 1]), "GlobalAveragePool"),   # bottom/right pads no window reads
    (("maxpool", (5, 5), 1, [4, 4, 0, 0]), "MaxPool"),
], ids=["avg5-same", "avg5-s3", "avg8-global", "avg8-s2-padded-after", "max5-pad4"])
def test_large_pools_on_an_8x8_map(tmp_path, pool, op):
    rng = np.random.default_rng(11)
    ops = [("conv", 8, (3, 3), 1, [1, 1, 1, 1]), ("relu",), pool, ("flatten",), ("gemm", 5)]
    calibration = rng.standard_normal((16, 3, 8, 8)).astype(np.float32)
    model = int8(tmp_path, float_model(rng, (3, 8, 8), ops), calibration, "float")
    layers = import_onnx(model).layers
    assert layers[1].op == op
    if op == "GlobalAveragePool":
        assert (layers[1].window.kernel_h, layers[1].window.kernel_w, layers[1].window.out_height) == (8, 8, 1)
    program = compiled(tmp_path, model, lean_arch())
    emulator_vs_onnxruntime(program, model, rng.standard_normal((6, 3, 8, 8)).astype(np.float32))


@pytest.mark.parametrize("kind", ["float", "qdq"])
def test_9x9_convolution(tmp_path, kind):
    rng = np.random.default_rng(12)
    ops = [("conv", 3, (3, 3), 1, [1, 1, 1, 1]), ("relu",), ("conv", 8, (9, 9), 1, [4, 4, 4, 4]), ("relu",),
           ("conv", 4, (9, 7), 2, [8, 0, 0, 6]), ("relu",), ("flatten",), ("gemm", 5)]
    calibration = rng.standard_normal((16, 2, 12, 12)).astype(np.float32)
    model = int8(tmp_path, float_model(rng, (2, 12, 12), ops), calibration, kind)
    program = compiled(tmp_path, model, lean_arch(), pack_input=False)
    big = program.tiles[len(program.layers[0].tiles):][:len(program.layers[1].tiles)]
    assert {(t.config.kernel_h, t.config.kernel_w) for t in big} == {(9, 9)}
    emulator_vs_onnxruntime(program, model, rng.standard_normal((4, 2, 12, 12)).astype(np.float32))


# --------------------------------------------------------------------------------------------------
# (c) RTL == emulator, cycle for cycle
# --------------------------------------------------------------------------------------------------
@pytest.mark.rtl
@pytest.mark.parametrize("pack_input", [True, False], ids=["im2col", "windowed"])
def test_rtl_ds_cnn_stem_matches_emulator(tmp_path, pack_input):
    rng = np.random.default_rng(20)
    ops = [("conv", 8, (10, 4), 2, [4, 1, 5, 1]), ("relu",), ("flatten",), ("gemm", 6)]
    calibration = rng.standard_normal((16, 1, 49, 10)).astype(np.float32)
    model = int8(tmp_path, float_model(rng, (1, 49, 10), ops), calibration, "float")
    program = compile_model(model, RTL_ARCH, pack_input=pack_input)
    if not pack_input:
        assert {(t.config.kernel_h, t.config.kernel_w, t.config.stride) for t in
                program.tiles[:len(program.layers[0].tiles)]} == {(10, 4, 2)}
    x = rng.standard_normal((2, 1, 49, 10)).astype(np.float32)
    emulator_vs_onnxruntime(program, model, x)
    assert_rtl_matches_emulator(program, x)


@pytest.mark.rtl
def test_rtl_8x8_average_pool_matches_emulator(tmp_path):
    rng = np.random.default_rng(21)
    ops = [("conv", 8, (3, 3), 1, [1, 1, 1, 1]), ("relu",), ("avgpool", (8, 8), 1, [0, 0, 0, 0]), ("flatten",),
           ("gemm", 5)]
    calibration = rng.standard_normal((16, 3, 8, 8)).astype(np.float32)
    model = int8(tmp_path, float_model(rng, (3, 8, 8), ops), calibration, "float")
    program = compile_model(model, RTL_ARCH)
    pool = program.tiles[len(program.layers[0].tiles)].config
    assert (pool.op, pool.kernel_h, pool.kernel_w, pool.output_pixels) == (OP_LANE, 8, 8, 1)
    x = rng.standard_normal((3, 3, 8, 8)).astype(np.float32)
    emulator_vs_onnxruntime(program, model, x)
    assert_rtl_matches_emulator(program, x)


# --------------------------------------------------------------------------------------------------
# (d) a hand-built program: a 9x9 convolution, pads 4, in two bands, against its golden model
# --------------------------------------------------------------------------------------------------
@pytest.mark.rtl
@pytest.mark.parametrize("shape, kernel, pads, bands, shift", [
    ((3, 10, 10), (9, 9), (4, 4, 4, 4), [37, 63], 39),
    ((2, 3, 4), (12, 10), (11, 9, 11, 9), [100, 82], 37),   # pads beyond the former 3-bit registers
], ids=["9x9-pad4", "12x10-pad11x9"])
def test_rtl_hand_built_large_conv_matches_golden(shape, kernel, pads, bands, shift):
    from flowtile.host import pack_flits
    from flowtile.rtl.simulate import simulate
    from flowtile.testing.program_builder import Conv, build_program, network_golden
    rng = np.random.default_rng(22)
    batch = 2
    conv = Conv(rng.integers(-20, 20, (5, shape[0], *kernel), dtype=np.int8), rng.integers(-3000, 3000, 5),
                5 << 28, shift, zp_in=-3, zp_out=2, clamp_lo=-100, pads=pads, pixel_bands=bands)
    program = build_program(RTL_ARCH, [conv], input_shape=shape, act_fill=rng)
    assert [(t.config.kernel_h, t.config.kernel_w, t.config.pad_left) for t in program.tiles[:2]] == \
        [(*kernel, pads[1])] * 2
    x = rng.integers(-128, 128, (batch, int(np.prod(shape))), dtype=np.int8)
    golden = network_golden([conv], x, shape, RTL_ARCH.lanes)
    assert len(np.unique(golden)) > 20
    flits = pack_flits(x, RTL_ARCH.lanes, program.input)
    emulated = emulate(program, flits, batch)
    np.testing.assert_array_equal(emulated.out_flits, golden)
    result = simulate(program, flits, batch)
    np.testing.assert_array_equal(result.out_flits, golden)
    np.testing.assert_array_equal(result.out_times, emulated.out_times)
    assert result.cycles == emulated.cycles
