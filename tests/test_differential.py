"""The central contract, checked on networks the project has never seen.

For seeded random MLPs (1-4 layers, widths 1-300), CNNs and residual CNNs (int8 and uint8 activations,
per-tensor and per-channel weights, float models quantized by flowtile) on several architectures:

* RTL (Verilator) == emulator: every output bit, every output flit's cycle stamp, the cycle count;
* emulator == onnxruntime (graph optimizations off) within 1 LSB on every output element.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from flowtile.compiler import compile_model, int8_model
from flowtile.testing.archs import lean_arch
from flowtile.testing.oracle_checks import assert_emulator_matches_onnxruntime, assert_rtl_matches_emulator
from flowtile.testing.random_models import quantize_qdq, random_float_mlp

ARCHS = {
    "4x4-l8": lean_arch(),
    "2x3-l4-d2": lean_arch(rows=2, cols=3, lanes=4, sram_bytes=16384, router_fifo_depth=2, max_tile_outputs=256,
                           host_buffer_flits=8192),
    "3x2-l16-d1": lean_arch(rows=3, cols=2, lanes=16, sram_bytes=65536, router_fifo_depth=1, max_tile_outputs=320,
                            host_buffer_flits=4096),
}

# (seed, arch, widths, batch, kind) -- kind: float | int8 | uint8 | int8-tensor (per-tensor weights)
CASES = [
    (1, "4x4-l8", [64, 32, 10], 7, "int8"),
    (2, "4x4-l8", [300, 300], 3, "float"),
    (3, "4x4-l8", [17, 1, 5], 64, "uint8"),
    (4, "4x4-l8", [96, 130, 70, 33, 12], 5, "int8-tensor"),
    (5, "2x3-l4-d2", [1, 9], 16, "int8"),
    (6, "2x3-l4-d2", [45, 23, 7, 3], 9, "uint8"),
    (7, "2x3-l4-d2", [120, 40], 1, "float"),
    (8, "3x2-l16-d1", [200, 64, 10], 12, "int8"),
    (9, "3x2-l16-d1", [33, 250, 18], 4, "float"),
]


MLP_IDS = [f"{c[1]}-{'-'.join(map(str, c[2]))}-b{c[3]}-{c[4]}" for c in CASES]


def model_of_kind(tmp_path, float_model, calibration, kind):
    """(model path, calibration for compile_model): the float model itself (``kind`` float, quantized by the
    compiler with ``calibration``), or its QDQ model as onnxruntime's quantizer writes it."""
    float_path = tmp_path / "float.onnx"
    onnx.save(float_model, float_path)
    if kind == "float":
        return float_path, calibration
    qdq_path = quantize_qdq(float_path, tmp_path / "qdq.onnx", calibration,
                            activation_uint8=(kind == "uint8"), per_channel=(kind != "int8-tensor"))
    return qdq_path, None


def build_model(tmp_path, seed, widths, kind):
    rng = np.random.default_rng(seed)
    float_model = random_float_mlp(rng, widths)
    return model_of_kind(tmp_path, float_model, rng.standard_normal((32, widths[0])).astype(np.float32), kind)


@pytest.mark.parametrize("seed,arch_name,widths,batch,kind", CASES, ids=MLP_IDS)
def test_emulator_matches_onnxruntime(tmp_path, seed, arch_name, widths, batch, kind):
    model_path, calibration = build_model(tmp_path, seed, widths, kind)
    program = compile_model(model_path, ARCHS[arch_name], calibration=calibration)
    x = np.random.default_rng(seed + 100).standard_normal((batch, widths[0])).astype(np.float32)
    assert_emulator_matches_onnxruntime(int8_model(model_path, calibration), program, x)


@pytest.mark.rtl
@pytest.mark.parametrize("seed,arch_name,widths,batch,kind", CASES, ids=MLP_IDS)
def test_rtl_matches_emulator(tmp_path, seed, arch_name, widths, batch, kind):
    model_path, calibration = build_model(tmp_path, seed, widths, kind)
    program = compile_model(model_path, ARCHS[arch_name], calibration=calibration)
    x = np.random.default_rng(seed + 100).standard_normal((batch, widths[0])).astype(np.float32)
    assert_rtl_matches_emulator(program, x)


# --- convolutional networks (docs/architecture.md section 4.1) --------------------------------------

# (seed, arch, input (C, H, W), blocks, classes, batch, kind)
CNN_CASES = [
    (21, "4x4-l8", (1, 8, 8), [{"out": 8, "k": 3, "pad": 1, "pool": (2, 2)}, {"out": 16, "k": 3, "pad": 1, "pool": (2, 2)}],
     10, 5, "int8"),
    (22, "4x4-l8", (3, 12, 11), [{"out": 10, "k": 5, "stride": 2, "pad": 2}, {"out": 6, "k": 1, "pool": (3, 1)}],
     4, 3, "float"),
    (23, "2x3-l4-d2", (2, 7, 7), [{"out": 5, "k": 3, "stride": 1, "pad": 0, "pool": (2, 2)}], 3, 6, "uint8"),
    (24, "3x2-l16-d1", (4, 5, 4), [{"out": 20, "k": 3, "pad": 1}, {"out": 9, "k": 3, "stride": 2, "pad": 1}],
     5, 2, "int8-tensor"),
]
CNN_IDS = [f"{c[1]}-{'x'.join(map(str, c[2]))}-{len(c[3])}conv-b{c[5]}-{c[6]}" for c in CNN_CASES]


def build_cnn(tmp_path, seed, in_shape, blocks, classes, kind):
    from flowtile.testing.random_models import random_float_cnn
    rng = np.random.default_rng(seed)
    float_model = random_float_cnn(rng, in_shape, blocks, classes)
    return model_of_kind(tmp_path, float_model, rng.random((24, *in_shape)).astype(np.float32), kind)


@pytest.mark.parametrize("seed,arch_name,in_shape,blocks,classes,batch,kind", CNN_CASES, ids=CNN_IDS)
def test_cnn_emulator_matches_onnxruntime(tmp_path, seed, arch_name, in_shape, blocks, classes, batch, kind):
    model_path, calibration = build_cnn(tmp_path, seed, in_shape, blocks, classes, kind)
    program = compile_model(model_path, ARCHS[arch_name], calibration=calibration)
    x = np.random.default_rng(seed + 100).random((batch, *in_shape)).astype(np.float32)
    assert_emulator_matches_onnxruntime(int8_model(model_path, calibration), program, x)


@pytest.mark.rtl
@pytest.mark.parametrize("seed,arch_name,in_shape,blocks,classes,batch,kind", CNN_CASES, ids=CNN_IDS)
def test_cnn_rtl_matches_emulator(tmp_path, seed, arch_name, in_shape, blocks, classes, batch, kind):
    model_path, calibration = build_cnn(tmp_path, seed, in_shape, blocks, classes, kind)
    program = compile_model(model_path, ARCHS[arch_name], calibration=calibration)
    x = np.random.default_rng(seed + 100).random((batch, *in_shape)).astype(np.float32)
    assert_rtl_matches_emulator(program, x)


# --- residual networks (docs/architecture.md section 4.2) -------------------------------------------

# (seed, arch, input (C, H, W), stem channels, blocks, classes, batch, kind)
RESNET_CASES = [
    (31, "4x4-l8", (3, 8, 8), 8, [{"kind": "basic", "out": 16, "stride": 2}], 10, 4, "int8"),
    (32, "2x3-l4-d2", (2, 6, 6), 4, [{"kind": "basic", "out": 4}], 3, 6, "uint8"),
    (33, "3x2-l16-d1", (3, 4, 4), 12, [{"kind": "basic", "out": 12}], 4, 3, "float"),
    (34, "4x4-l8", (4, 8, 8), 8, [{"kind": "inverted", "expand": 16}, {"kind": "basic", "out": 8}], 5, 2,
     "int8-tensor"),
    (35, "4x4-l8", (3, 6, 6), 8, [{"kind": "fire", "squeeze": 4, "expand": 8},
                                  {"kind": "dense", "growth": 8, "identity_first": False}], 4, 3, "uint8"),
    # maps of 2-3 rows: the convolutions split over output-channel groups too (section 4.4), inside the block
    (38, "4x4-l8", (8, 3, 3), 8, [{"kind": "basic", "out": 32}], 4, 3, "int8"),
    (39, "4x4-l8", (8, 2, 3), 16, [{"kind": "basic", "out": 16}], 4, 3, "float"),
]
RESNET_IDS = [f"{c[1]}-{'x'.join(map(str, c[2]))}-{'-'.join(b['kind'] for b in c[4])}-b{c[6]}-{c[7]}"
              for c in RESNET_CASES]


def build_resnet(tmp_path, seed, in_shape, stem, blocks, classes, kind):
    from flowtile.testing.random_models import random_float_resnet
    rng = np.random.default_rng(seed)
    float_model = random_float_resnet(rng, in_shape, stem, blocks, classes)
    return model_of_kind(tmp_path, float_model, rng.standard_normal((24, *in_shape)).astype(np.float32), kind)


@pytest.mark.parametrize("seed,arch_name,in_shape,stem,blocks,classes,batch,kind", RESNET_CASES, ids=RESNET_IDS)
def test_resnet_emulator_matches_onnxruntime(tmp_path, seed, arch_name, in_shape, stem, blocks, classes, batch, kind):
    model_path, calibration = build_resnet(tmp_path, seed, in_shape, stem, blocks, classes, kind)
    program = compile_model(model_path, ARCHS[arch_name], calibration=calibration)
    assert any(layer.op in ("Add", "Concat") for layer in program.layers)
    if seed in (38, 39):
        assert any(tile.config.pass_per_pixel for tile in program.tiles)
    x = np.random.default_rng(seed + 100).standard_normal((batch, *in_shape)).astype(np.float32)
    assert_emulator_matches_onnxruntime(int8_model(model_path, calibration), program, x)


@pytest.mark.rtl
@pytest.mark.parametrize("seed,arch_name,in_shape,stem,blocks,classes,batch,kind", RESNET_CASES, ids=RESNET_IDS)
def test_resnet_rtl_matches_emulator(tmp_path, seed, arch_name, in_shape, stem, blocks, classes, batch, kind):
    model_path, calibration = build_resnet(tmp_path, seed, in_shape, stem, blocks, classes, kind)
    program = compile_model(model_path, ARCHS[arch_name], calibration=calibration)
    x = np.random.default_rng(seed + 100).standard_normal((batch, *in_shape)).astype(np.float32)
    assert_rtl_matches_emulator(program, x)
