"""Public-model regression: ONNX files as torch's exporters and onnxruntime's quantizer write them.

``models/public/`` (made by ``models/make_public_models.py``, provenance in its README.md) holds small
torchvision-style modules exported three ways (TorchScript with and without constant folding, dynamo) and
the MLPerf Tiny shapes (ResNet-8, DS-CNN, MobileNetV1-0.25, the FC autoencoder), each as float and as
onnxruntime QDQ int8. For every file: quantize once (:func:`flowtile.compiler.int8_model`; float files with a
seeded calibration set), compile on the first architecture it fits (the default 4x4 Arch, then 8x8, then
12x12 with larger SRAM, parameter tables and forward queues), run a small seeded batch on the emulator and
compare with onnxruntime (graph optimizations off) within 1 LSB.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import onnx
import pytest

from flowtile.arch import Arch
from flowtile.compiler import CompileError, compile_model, int8_model
from flowtile.emulator import emulate
from flowtile.host import input_flits, outputs_from_flits
from flowtile.oracle import onnxruntime_int8_output

PUBLIC = Path(__file__).resolve().parents[1] / "models" / "public"

#: Tried in order; a model is compiled for the first one it fits.
BIG = dict(sram_bytes=65536, max_tile_outputs=2048, forward_queue_words=4096)
ARCHS = [("4x4 (default)", Arch()), ("8x8 big", Arch(**BIG).with_grid("8x8")),
         ("12x12 big", Arch(**BIG).with_grid("12x12"))]

TV = [f"tv_{net}_{form}_{kind}.onnx" for net in ("mlp", "seq", "cnn") for form in ("ts_fold", "ts_nofold", "dynamo")
      for kind in ("float", "qdq")]
MLPERF = [f"mlperf_{net}_{kind}.onnx" for net in ("resnet8", "dscnn", "mobilenet", "autoencoder")
          for kind in ("float", "qdq")]
MODELS = TV + MLPERF
#: The smallest model (about 1.4k parameters), the one compared with Verilator.
SMALLEST = "tv_cnn_ts_fold_qdq.onnx"
BATCH = 16


def input_shape(model: onnx.ModelProto) -> tuple[int, ...]:
    """One sample's shape (the batch dimension, fixed 1 or symbolic, dropped)."""
    return tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:])


def seeded(name: str, n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Digits-like pixels in [0, 1) for the tv_* models (trained on them), standard normal for the MLPerf shapes."""
    rng = np.random.default_rng(seed)
    if name.startswith("tv_"):
        return rng.random((n, *shape)).astype(np.float32)
    return rng.standard_normal((n, *shape)).astype(np.float32)


def compiled(name: str):
    """(int8 model, program, arch name): the model quantized once and compiled for the first arch it fits."""
    path = PUBLIC / name
    shape = input_shape(onnx.load(str(path)))
    int8 = int8_model(path, seeded(name, 32, shape, 1))
    errors = []
    for arch_name, arch in ARCHS:
        try:
            return int8, compile_model(int8, arch), arch_name
        except CompileError as error:
            errors.append(f"{arch_name}: {error}")
    raise AssertionError(f"{name} compiles for none of the archs; " + " | ".join(errors))


def onnxruntime_per_sample(int8: onnx.ModelProto, program, x: np.ndarray) -> np.ndarray:
    """onnxruntime's int8-domain outputs one sample at a time (the dynamo exports have a fixed batch of 1)."""
    return np.concatenate([onnxruntime_int8_output(int8, program, x[i:i + 1])[0] for i in range(len(x))])


@pytest.mark.parametrize("name", MODELS)
def test_emulator_matches_onnxruntime(name):
    int8, program, arch_name = compiled(name)
    x = seeded(name, BATCH, input_shape(int8), 2)
    _, flits = input_flits(program, x)
    result = emulate(program, flits, len(x))
    ours, _ = outputs_from_flits(program, result.out_flits, len(x))
    theirs = onnxruntime_per_sample(int8, program, x)
    assert ours.shape == theirs.shape, f"{arch_name}: output shape {ours.shape}, onnxruntime {theirs.shape}"
    diff = np.abs(ours.astype(np.int32) - theirs.astype(np.int32))
    worst = np.unravel_index(np.argmax(diff), diff.shape)
    assert diff.max() <= 1, (f"{arch_name}: output {worst} differs by {diff.max()} LSB: flowtile {ours[worst]}, "
                             f"onnxruntime {theirs[worst]}")


@pytest.mark.rtl
def test_rtl_matches_emulator_on_smallest_model():
    from flowtile.rtl.simulate import simulate
    int8, program, _ = compiled(SMALLEST)
    x = seeded(SMALLEST, BATCH, input_shape(int8), 2)
    _, flits = input_flits(program, x)
    emu = emulate(program, flits, len(x))
    rtl = simulate(program, flits, len(x), simulator="verilator")
    differing = np.flatnonzero(np.any(rtl.out_flits != emu.out_flits, axis=1))
    assert differing.size == 0, f"{differing.size} output flits differ, first flit {differing[0]}"
    assert np.array_equal(np.asarray(rtl.out_times), np.asarray(emu.out_times))
    assert rtl.cycles == emu.cycles


def test_every_public_model_is_tested_and_its_provenance_recorded():
    on_disk = sorted(p.name for p in PUBLIC.glob("*.onnx"))
    assert on_disk == sorted(MODELS), f"models/public and MODELS differ: {set(on_disk) ^ set(MODELS)}"
    readme = (PUBLIC / "README.md").read_text()
    recorded = dict(re.findall(r"^\| `([^`]+\.onnx)` \|.*\| `([0-9a-f]{64})` \|$", readme, flags=re.M))
    for name in MODELS:
        assert name in recorded, f"models/public/README.md does not list {name}"
        digest = hashlib.sha256((PUBLIC / name).read_bytes()).hexdigest()
        assert recorded[name] == digest, f"{name}: sha256 {digest} is not the one models/public/README.md records"
