"""Bands whose COMPUTE outruns the result ring run in series (compiler/partition.py, ``coupled_ring_cycles``).

A band tile emits its results only after the words it passes (the previous bands' results), so what its ring cannot
hold of its COMPUTE runs after the previous band's last EMIT; and a band whose forward queue cannot take its next
inference's words while it emits holds the bands before it back until its last EMIT (docs/architecture.md section 6
rule 4). MobileNetV1-1.0 on 4 chips of 8x8 tiles of 64 KiB stalled 32 % over its estimate this way (its stem's two
bands each held 4.4k results against a 1024-word ring). The partition keeps such runs within the budget; the
emulator (exact) is the independent check: the interval it measures must be the estimate. A layer streaming rows
through a line buffer (section 8, "Layers streaming rows") sidesteps that coupling; the last test runs one compiled
program that has one against onnxruntime, Verilator and the estimate.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import flowtile.compiler.partition as partition
from flowtile.testing.archs import lean_arch
from flowtile.compiler import compile_model, estimated_interval, int8_model
from flowtile.compiler.partition import coupled_ring_cycles, ring_overflow_cycles
from flowtile.testing import random_models
from flowtile.testing.measure import settled, steady_state
from flowtile.testing.oracle_checks import emulate_model


def test_ring_overflow_is_the_compute_behind_the_ring():
    # 4000 results over 100000 issue cycles, a ring of 1000: the last 3000 words' COMPUTE waits for EMITs
    assert ring_overflow_cycles(100_000, 4000, 1000) == 75_000
    assert ring_overflow_cycles(100_000, 1000, 1000) == 0
    assert ring_overflow_cycles(7, 3, 1) == 5     # rounded up: ceil(7 * 2 / 3)


def test_coupled_run_adds_up_only_behind_a_short_queue():
    # (run, overflow, issue cycles, results) of the band before: 40000 issue cycles for 2000 results, a ring of 500,
    # so 30000 overflow cycles, after 10000 of the run before it
    previous = (40_000, 30_000, 40_000, 2000)
    # a queue that takes the next inference's words ends the run: the band alone
    assert coupled_ring_cycles(previous, 5000, 800, queued=3000, queue_words=3000, ring_words=500) == (5000, 5000)
    # 1000 words wait: the previous band's last 1000 EMITs, of which its ring holds 500: 10000 cycles of its COMPUTE
    assert coupled_ring_cycles(previous, 5000, 800, queued=4000, queue_words=3000, ring_words=500) == (15_000, 15_000)
    # 2500 words wait: all of the previous band's results and 500 before them, so its whole run repeats too
    assert coupled_ring_cycles(previous, 5000, 800, queued=5500, queue_words=3000, ring_words=500) == (45_000, 45_000)
    # the band's own EMITs when they take longer than its overflow
    assert coupled_ring_cycles((0, 0, 0, 0), 0, 900, queued=10, queue_words=0, ring_words=500) == (0, 900)


def _mobilenet_front(monkeypatch, blocks: int, resolution: int):
    """MobileNetV1-0.5's stem and first ``blocks`` blocks, a pooled 8-class head, int8."""
    monkeypatch.setattr(random_models, "MOBILENET_V1_BLOCKS", random_models.MOBILENET_V1_BLOCKS[:blocks])
    rng = np.random.default_rng(0)
    float_model = random_models.random_float_mobilenet_v1(rng, alpha=0.5, resolution=resolution, n_classes=8)
    return float_model, rng.standard_normal((2, 3, resolution, resolution)).astype(np.float32)


def _interval(program, resolution: int, batch: int = 32) -> float:
    x = np.random.default_rng(1).standard_normal((batch, 3, resolution, resolution)).astype(np.float32)
    result = emulate_model(program, x).result
    assert settled(program, result, batch)
    return steady_state(program, result, batch).interval


@pytest.mark.parametrize("resolution,sram_bytes,ring_words", [(32, 8192, 16), (48, 16384, 128)])
def test_partition_keeps_coupled_bands_within_the_estimate(monkeypatch, tmp_path, resolution, sram_bytes, ring_words):
    float_model, calibration = _mobilenet_front(monkeypatch, 4, resolution)
    float_path, qdq_path = tmp_path / "float.onnx", tmp_path / "qdq.onnx"
    onnx.save(float_model, str(float_path))
    random_models.quantize_qdq(float_path, qdq_path, calibration, activation_uint8=False, per_channel=True)
    model = int8_model(qdq_path)
    arch = lean_arch(sram_bytes=sram_bytes, max_tile_outputs=512, result_ring_words=ring_words).with_grid("4x6")

    program = compile_model(model, arch, replicas=1)
    interval = _interval(program, resolution)
    assert interval <= estimated_interval(program) * 1.01, (interval, estimated_interval(program))

    # bands alone (no layer streaming its rows, which sidesteps their coupling): within the estimate with the rule ...
    monkeypatch.setattr(partition, "_stream_groups", lambda *args: None)
    banded = compile_model(model, arch, replicas=1)
    interval = _interval(banded, resolution)
    assert interval <= estimated_interval(banded) * 1.01, (interval, estimated_interval(banded))

    # ... and without it the partition's bands stall beyond its estimate, and run slower than with it
    monkeypatch.setattr(partition, "coupled_ring_cycles", lambda *args: (0, 0))
    unruled = compile_model(model, arch, replicas=1)
    unruled_interval = _interval(unruled, resolution)
    assert unruled_interval > estimated_interval(unruled) * 1.05
    assert unruled_interval > interval


@pytest.mark.rtl
def test_compiled_line_buffer_matches_onnxruntime_rtl_and_the_estimate(monkeypatch, tmp_path):
    """A compiled program with a layer on one tile with a line buffer (section 8, "Layers streaming rows"):
    MobileNetV1-0.5's front at 48x48 on the lean 4x4 grid streams its second depthwise layer's rows. Its outputs match
    onnxruntime within 1 LSB, Verilator matches the emulator flit for flit and cycle for cycle, and the emulator
    measures the estimate."""
    from flowtile.testing.oracle_checks import assert_emulator_matches_onnxruntime, assert_rtl_matches_emulator
    float_model, calibration = _mobilenet_front(monkeypatch, 3, 48)
    float_path, qdq_path = tmp_path / "float.onnx", tmp_path / "qdq.onnx"
    onnx.save(float_model, str(float_path))
    random_models.quantize_qdq(float_path, qdq_path, calibration, activation_uint8=False, per_channel=True)
    model = int8_model(qdq_path)
    program = compile_model(model, lean_arch(), replicas=1)
    streaming = [tile.config for tile in program.tiles if tile.config.stream_rows]
    assert streaming and all(config.activation_words < 2 * config.stored_words for config in streaming)
    x = np.random.default_rng(2).standard_normal((2, 3, 48, 48)).astype(np.float32)
    assert_emulator_matches_onnxruntime(model, program, x)
    assert_rtl_matches_emulator(program, x)
    assert _interval(program, 48, batch=24) == estimated_interval(program)
