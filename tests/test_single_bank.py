"""One activation bank (register ``single_bank``, docs/architecture.md section 4 "One bank") on compiled programs.

A tile of one bank stores each inference's input words at ``act_base`` and receives the next inference only after its
COMPUTE has ended. The compiler keeps one bank where two do not fit a band's tile: three pointwise 256 -> 256
convolutions on a 6x6 map do not fit 16 lean tiles with two banks a tile (20 tiles), and do with one. The HDL unit
tests (tests/test_hdl_pe.py) check the rule cycle by cycle against a golden schedule; here the compiled program runs
on the emulator against onnxruntime and the compiler's estimate, and on Verilator against the emulator.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import onnx
import pytest

from flowtile.arch import ACTIVATION_BANKS, Arch
from flowtile.compiler import compile_model, int8_model, report
from flowtile.compiler.emit import estimated_interval
from flowtile.compiler import partition
from flowtile.compiler.partition import QUEUE_RESERVE_WORDS
from flowtile.testing.archs import lean_arch
from flowtile.testing.measure import steady_state
from flowtile.testing.oracle_checks import (assert_emulator_matches_onnxruntime, assert_rtl_matches_emulator,
                                            emulate_model)
from flowtile.testing.random_models import quantize_qdq, random_float_cnn

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (256, 6, 6)


@pytest.fixture(scope="module")
def pointwise_stack(tmp_path_factory):
    """``(int8 QDQ model, program)``: three 1x1 convolutions of 256 -> 256 channels on a 6x6 map, a 3x3 max pool
    and a Gemm to 10 (random weights, quantized by onnxruntime), compiled for 4x4 lean tiles (32 KiB)."""
    rng = np.random.default_rng(5)
    blocks = [{"out": 256, "k": 1}, {"out": 256, "k": 1}, {"out": 256, "k": 1, "pool": (3, 3)}]
    folder = tmp_path_factory.mktemp("single_bank")
    onnx.save(random_float_cnn(rng, SHAPE, blocks, 10), str(folder / "float.onnx"))
    calibration = rng.standard_normal((8, *SHAPE)).astype(np.float32)
    model = int8_model(quantize_qdq(folder / "float.onnx", folder / "qdq.onnx", calibration, activation_uint8=False,
                                      per_channel=True))
    # banks only: a layer on a line buffer (section 4 "Rows interleaved") would take the place of the one-bank tiles
    with warnings.catch_warnings(), mock.patch.object(partition, "_stream_groups", lambda *args: None):
        warnings.simplefilter("ignore")      # the compiler's notes on the layers it splits
        program = compile_model(model, lean_arch().with_grid("4x4"))
    return model, program


def test_compiler_keeps_one_bank_where_two_do_not_fit(pointwise_stack):
    _, program = pointwise_stack
    arch = program.arch
    single = [tile.config for tile in program.tiles if tile.config.single_bank]
    assert single, "no tile keeps one bank"
    for config in single:
        # its weights, the stored words twice and the least forward queue would not fit the SRAM
        assert config.weight_words + ACTIVATION_BANKS * config.stored_words + QUEUE_RESERVE_WORDS > arch.sram_words
        assert config.activation_words == config.stored_words and config.n_out
        assert config.queue_base >= config.act_base + config.stored_words or not config.queue_words
    assert f"{len(single)} tile(s) keep one activation bank" in report(program)
    # a one-bank tile alternates RECV and COMPUTE: the estimate counts both (TileConfig.tile_period_cycles)
    slowest = max(single, key=lambda c: c.tile_period_cycles(arch.lanes))
    assert slowest.tile_period_cycles(arch.lanes) >= slowest.store_until + slowest.compute_cycles


def test_one_bank_outputs_match_onnxruntime_and_the_estimate(pointwise_stack):
    model, program = pointwise_stack
    x = np.random.default_rng(6).standard_normal((24, *SHAPE)).astype(np.float32)
    assert_emulator_matches_onnxruntime(model, program, x, 1)
    emulated = emulate_model(program, x)
    view, count = program.program_inferences(len(x))
    measured = steady_state(view, emulated.result, count).interval
    assert measured == pytest.approx(estimated_interval(program), rel=0.02)


@pytest.mark.rtl
def test_rtl_matches_emulator_with_one_bank_tiles(pointwise_stack):
    _, program = pointwise_stack
    x = np.random.default_rng(7).standard_normal((2, *SHAPE)).astype(np.float32)   # 2 x 75k cycles on Verilator
    assert_rtl_matches_emulator(program, x)


@pytest.mark.rtl
def test_one_bank_contexts_on_the_default_tile_rtl_matches_emulator():
    """The hardware takes one bank in any context, not only where the compiler picks it: the digits CNN on the
    default 4x4 chip (copies on tiles of several contexts) with every other computing context switched to one bank
    (its weights lie below its bank, as the compiler places them). The results are the same words; the
    receptions wait for COMPUTE's end, so the run takes at least as long; Verilator == emulator."""
    program = compile_model(int8_model(ROOT / "models" / "digits_cnn.onnx"), Arch().with_grid("4x4"))
    x = np.random.default_rng(8).standard_normal((2 * program.replicas, 1, 8, 8)).astype(np.float32)
    before = emulate_model(program, x)
    switched = 0
    for tile in program.tiles:
        contexts = []
        for index, config in enumerate(tile.contexts):
            if config.n_out and index % 2 == 0:
                assert config.w_base + config.weight_words <= config.act_base
                config, switched = config.replace(single_bank=1), switched + 1
            contexts.append(config)
        tile.config, tile.later_contexts = contexts[0], tuple(contexts[1:])
    program.validate()
    assert switched and any(len(tile.contexts) > 1 and tile.config.single_bank for tile in program.tiles)
    after = emulate_model(program, x)
    assert np.array_equal(after.q, before.q) and after.result.cycles >= before.result.cycles
    assert_rtl_matches_emulator(program, x)
