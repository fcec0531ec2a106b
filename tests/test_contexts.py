"""Several layers per tile (contexts, ``Arch.tile_contexts``; docs/architecture.md section 4.6; issue "efficiency per
area", item 1), end to end: the program rules between a tile's contexts (each refused in one line naming the rule),
the compiler's packing (a network with more layers than tiles compiles; every packed tile keeps its contexts'
regions apart), the emulator against onnxruntime and against the same network on one context per tile, and, marked
``rtl``, Verilator against the emulator in every output flit and cycle. Nothing compares with hard-coded cycle counts.
"""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import onnx
import pytest

from flowtile.arch import Arch
from flowtile.testing.archs import lean_arch
from flowtile.compiler import CompileError, compile_model, estimated_interval, report
from flowtile.program import Program, ProgramError
from flowtile.testing.oracle_checks import (assert_emulator_matches_onnxruntime, assert_rtl_matches_emulator,
                                            emulate_model)
from flowtile.testing.random_models import quantize_qdq, random_float_cnn, random_float_mlp, random_float_resnet

#: small tiles, so that small networks split and pack
SMALL = dict(lanes=8, sram_bytes=8192, max_tile_outputs=64, result_ring_words=16)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """int8 QDQ models: an MLP 24 -> 32 -> 20 -> 12 -> 10, a residual CNN (stem, a basic block with a projection,
    pooling, a classifier: Conv, Add, pools and Gemm layers) and a plain CNN (two Conv + MaxPool blocks, a Gemm: on
    2x2 tiles a BCAST stem and its pool share a tile, and a convolution band starting inside a row shares one with
    its pool and the classifier)."""
    path = tmp_path_factory.mktemp("contexts")
    rng = np.random.default_rng(31)
    onnx.save(random_float_mlp(rng, [24, 32, 20, 12, 10]), path / "mlp.onnx")
    mlp = quantize_qdq(path / "mlp.onnx", path / "mlp_qdq.onnx", rng.standard_normal((16, 24)).astype(np.float32),
                       activation_uint8=False, per_channel=True)
    onnx.save(random_float_resnet(rng, (3, 6, 6), 8, [{"kind": "basic", "out": 16, "stride": 2}], 5),
              path / "resnet.onnx")
    resnet = quantize_qdq(path / "resnet.onnx", path / "resnet_qdq.onnx",
                          rng.standard_normal((16, 3, 6, 6)).astype(np.float32), activation_uint8=False,
                          per_channel=True)
    onnx.save(random_float_cnn(rng, (1, 8, 8), [{"out": 8, "k": 3, "pad": 1, "pool": (2, 2)},
                                               {"out": 16, "k": 3, "pad": 1, "pool": (2, 2)}], 10), path / "cnn.onnx")
    cnn = quantize_qdq(path / "cnn.onnx", path / "cnn_qdq.onnx", rng.standard_normal((16, 1, 8, 8)).astype(np.float32),
                       activation_uint8=False, per_channel=True)
    return {"mlp": (mlp, (24,)), "resnet": (resnet, (3, 6, 6)), "cnn": (cnn, (1, 8, 8))}


def compiled(model, rows: int, cols: int, contexts: int, **fields) -> Program:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compile_model(model, lean_arch(rows=rows, cols=cols, tile_contexts=contexts, **{**SMALL, **fields}),
                             replicas=1)


def inputs(shape, n: int = 5, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


#: (model, grid rows, cols, tile_contexts): each packs several layers into some tile
CASES = [("mlp", 1, 2, 3), ("mlp", 1, 3, 2), ("resnet", 2, 2, 4), ("resnet", 1, 3, 4), ("cnn", 2, 2, 4)]


def packed(models, name, rows, cols, contexts) -> Program:
    model, _ = models[name]
    program = compiled(model, rows, cols, contexts)
    assert any(tile.later_contexts for tile in program.tiles), "the case should pack layers into a tile"
    return program


# --- program format and rules ----------------------------------------------------------------------------------------
def test_more_layers_than_tiles_compile_only_with_contexts(models):
    model, _ = models["resnet"]
    with pytest.raises(CompileError, match=r"layers but the 2x2 grid .* has 4 tiles, and every layer needs"):
        compiled(model, 2, 2, 1)
    program = compiled(model, 2, 2, 4)
    layers = len(program.layers)
    slices = sum(len(layer.tiles) for layer in program.layers)
    assert layers > 4 and sum(len(t.contexts) for t in program.tiles if t.config.n_out) == slices
    assert all(len(t.contexts) <= 4 for t in program.tiles)
    # every layer's (tile, context) is a distinct context, in chain order
    places = [(tuple(tile), layer.context_of(i)) for layer in program.layers for i, tile in enumerate(layer.tiles)]
    assert len(set(places)) == len(places)
    assert "run several layers in turn" in report(program)


def test_packed_program_round_trips(models, tmp_path):
    program = packed(models, "resnet", 2, 2, 4)
    loaded = Program.load(program.save(tmp_path / "prog"))
    for a, b in zip(loaded.tiles, program.tiles):
        assert a.contexts == b.contexts
        assert np.array_equal(a.sram, b.sram) and np.array_equal(a.params, b.params)
    assert loaded.layers == program.layers


def test_contexts_keep_their_regions_apart(models):
    """merge_contexts relocates each context's weights, banks and parameter rows behind the previous one's; the
    later contexts' queues hold what they forward and pass; the data and rows are the layer's own."""
    for name, rows, cols, contexts in CASES:
        program = packed(models, name, rows, cols, contexts)
        for tile in program.tiles:
            configs = tile.contexts
            assert [c.loop_back for c in configs] == [1] * (len(configs) - 1) + [0]
            assert [c.param_base for c in configs] == list(np.cumsum([0] + [c.n_out for c in configs[:-1]]))
            assert tile.params.shape[0] == sum(c.n_out for c in configs)
            for c in configs[1:]:
                assert c.queue_words >= c.queued_words
            regions = sorted((b, e) for c in configs for _, b, e in c.sram_regions())
            assert all(e <= b2 for (_, e), (b2, _) in zip(regions, regions[1:]))


@pytest.mark.parametrize("breaks, message", [
    (lambda tile: {"later_contexts": tile.later_contexts[:-1] + (tile.later_contexts[-1].replace(loop_back=1),)},
     r"context \d: config register loop_back = 1 must be 0 \(the tile's last context emits to the router"),
    (lambda tile: {"config": tile.config.replace(loop_back=0)}, r"context 0: config register loop_back = 0 must be 1"),
    (lambda tile: {"later_contexts": (tile.later_contexts[0].replace(w_base=tile.config.w_base),)
                   + tile.later_contexts[1:]}, r"context 1's weights .* overlaps context 0's"),
    (lambda tile: {"later_contexts": (tile.later_contexts[0].replace(param_base=0),) + tile.later_contexts[1:]},
     r"context \d's parameter rows from param_base = 0 overlap context \d's"),
])
def test_broken_context_rules_are_refused(models, breaks, message):
    program = packed(models, "resnet", 2, 2, 4)
    index = next(i for i, t in enumerate(program.tiles) if t.later_contexts and t.later_contexts[0].weight_words)
    program.tiles[index] = dataclasses.replace(program.tiles[index], **breaks(program.tiles[index]))
    with pytest.raises(ProgramError, match=message):
        program.validate()


def test_too_many_contexts_and_short_queues_are_refused(models):
    program = packed(models, "resnet", 2, 2, 4)
    narrow = dataclasses.replace(program, arch=dataclasses.replace(program.arch, tile_contexts=1))
    with pytest.raises(ProgramError, match=r"contexts exceed arch field 'tile_contexts' = 1"):
        narrow.validate()
    index, context = next((i, k) for i, t in enumerate(program.tiles)
                          for k, c in enumerate(t.later_contexts) if c.queued_words)
    tile = program.tiles[index]
    later = list(tile.later_contexts)
    later[context] = later[context].replace(queue_words=later[context].queued_words - 1)
    program.tiles[index] = dataclasses.replace(tile, later_contexts=tuple(later))
    with pytest.raises(ProgramError, match=r"loop-back FIFO can deadlock"):
        program.validate()


# --- emulator --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, rows, cols, contexts", CASES)
def test_emulator_matches_onnxruntime_and_one_context_per_tile(models, name, rows, cols, contexts):
    model, shape = models[name]
    program = packed(models, name, rows, cols, contexts)
    x = inputs(shape)
    comparison = assert_emulator_matches_onnxruntime(model, program, x)
    alone = compiled(model, 4, 4, 1)    # one layer a tile: the same integer results
    np.testing.assert_array_equal(comparison.emulated.q, emulate_model(alone, x).q)
    result = comparison.emulated.result
    assert result.cycles > 0 and result.interval_cycles > 0


# --- RTL -------------------------------------------------------------------------------------------------------------
#: the RTL cases: two Verilator builds (1x2 with 3 contexts, 2x2 with 4), the suite's time being what it is; the other
#: cases differ in grid and context count only, which tests/test_hdl_contexts.py covers in Amaranth's simulator
RTL_CASES = [case for case in CASES if (case[1], case[2]) in ((1, 2), (2, 2))]


@pytest.mark.rtl
@pytest.mark.parametrize("name, rows, cols, contexts", RTL_CASES)
def test_rtl_equals_the_emulator(models, name, rows, cols, contexts):
    program = packed(models, name, rows, cols, contexts)
    assert_rtl_matches_emulator(program, inputs(models[name][1], n=4))
