"""Replicated stages (issue 11 item 4, docs/architecture.md section 12): copies of some layers taking alternate
inferences, the layers before and after them shared by the copies.

A program with ``replicas = N`` and a stage ``[a, b)`` runs N real inferences per program inference: the shared
layers' tiles run once per inference (their ``turns``: N ordinary inferences of the hardware, which has no notion of
them), copy ``j`` of the stage takes inference ``j``'s stream. Checked here: outputs equal the one-copy program's
and onnxruntime's, the turns and MACs the compiler records, the emulator against the cycle-stepping reference of
tests/test_emulator.py, the RTL against the emulator, the program artifact, and the refusals.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from flowtile.compiler import CompileError, compile_model, report
from flowtile.compiler.emit import estimated_interval
from flowtile.host import input_flits, pad_batch
from flowtile.program import Program
from flowtile.testing.archs import lean_arch
from flowtile.testing.measure import steady_state
from flowtile.testing.oracle_checks import (assert_emulator_matches_onnxruntime, assert_rtl_matches_emulator,
                                            emulate_model)
from flowtile.testing.random_models import random_float_cnn, random_float_mlp, random_float_resnet

import test_emulator
from test_replication import _arch, _int8_model   # small chips with slow links, frames of 4 flits


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("stages")
    rng = np.random.default_rng(15)
    return {
        "mlp": (_int8_model(tmp_path, "mlp", random_float_mlp(rng, [24, 32, 20, 12, 10]), (24,), 1), (24,)),
        # 8 input channels: no broadcast input (op BCAST), which the cycle-stepping reference does not model
        "cnn": (_int8_model(tmp_path, "cnn", random_float_cnn(rng, (8, 6, 6), [
            {"out": 8, "k": 3, "pad": 1}, {"out": 16, "k": 3, "pad": 1, "pool": (2, 2)},
            {"out": 16, "k": 3, "pad": 1}, {"out": 8, "k": 1}], 5), (8, 6, 6), 2), (8, 6, 6)),
        # a narrow stream (16 wide) around two layers that a chip of 3x3 tiles of 4 KiB cannot run as fast as the
        # wide layers before and after them, whose weights leave no room for a second copy of the whole network
        "narrow": (_int8_model(tmp_path, "narrow", random_float_mlp(np.random.default_rng(0), [32, 200, 16, 96, 96, 16,
                                                                                            200, 10]), (32,), 4), (32,)),
        "resnet": (_int8_model(tmp_path, "resnet", random_float_resnet(
            rng, (3, 6, 6), 8, [{"kind": "basic", "out": 8, "stride": 1}], 5), (3, 6, 6), 3), (3, 6, 6)),
    }


def _names(model, arch) -> list[str]:
    return [layer.name for layer in compile_model(model, arch, replicas=1).layers]


# (model, chips, rows x cols, copies, stage as indices into the one-copy layers)
CASES = [("mlp", 2, (2, 2), 2, (1, 2)), ("mlp", 1, (3, 3), 3, (1, 2)), ("cnn", 1, (3, 4), 2, (3, 4)),
         ("cnn", 2, (2, 3), 2, (3, 4)), ("cnn", 2, (2, 3), 2, (0, 1))]


@pytest.mark.parametrize("name, chips, grid, copies, stage", CASES,
                         ids=[f"{n}-{c}chips-x{k}-{s[0]}..{s[1]}" for n, c, _, k, s in CASES])
def test_stage_outputs_equal_one_copy_and_onnxruntime(models, name, chips, grid, copies, stage):
    model, in_shape = models[name]
    arch = _arch(chips, *grid)
    names = _names(model, arch)
    first, last = stage
    program = compile_model(model, arch, replicas=copies, stage=(names[first], names[last]))
    single = compile_model(model, arch, replicas=1)
    assert program.replicas == copies
    # the stage's layers once per copy (one turn each), the others once, in as many turns as copies
    stage_names = names[first:last + 1]
    expected = (names[:first] + [f"{n} [copy {j}]" for j in range(copies) for n in stage_names]
                + names[last + 1:])
    assert [layer.name for layer in program.layers] == expected
    for layer in program.layers:
        assert layer.turns == (1 if "[copy" in layer.name else copies), layer.name
    placed = {(t.chip, t.row, t.col): t for t in program.tiles}
    for layer in program.layers:
        for place in layer.tiles:
            assert placed[place if len(place) == 3 else (0, *place)].turns == layer.turns
    assert program.macs_per_inference == single.macs_per_inference
    rng = np.random.default_rng(chips * 10 + copies)
    x = rng.standard_normal((2 * copies + 1, *in_shape)).astype(np.float32)
    padded = pad_batch(program, x)
    comparison = assert_emulator_matches_onnxruntime(model, program, padded)
    np.testing.assert_array_equal(comparison.emulated.q, emulate_model(single, padded).q)
    text = report(program)
    assert f"{copies} copies of layers '{names[first]}' .. '{names[last]}'" in text


def test_stage_matches_the_cycle_stepping_reference(models):
    """One chip (the reference steps one mesh): every transfer of every tile, shared ones in turns included, at the
    reference's cycle."""
    model, in_shape = models["cnn"]
    arch = _arch(1, 3, 4)
    names = _names(model, arch)
    program = compile_model(model, arch, replicas=2, stage=(names[3], names[4]))
    assert any(t.turns == 2 for t in program.tiles) and any(t.turns == 1 and t.config.n_out for t in program.tiles)
    x = np.random.default_rng(4).standard_normal((6, *in_shape)).astype(np.float32)
    _, flits = input_flits(program, x)
    view, count = program.program_inferences(len(x))
    test_emulator.assert_matches_reference(view, None, count, flits=flits)


def test_stage_estimate_is_measured(models):
    """The estimate of a replicated stage (shared tiles costed once a turn) is what the emulator measures."""
    model, in_shape = models["cnn"]
    arch = _arch(1, 3, 4)
    names = _names(model, arch)
    program = compile_model(model, arch, replicas=2, stage=(names[3], names[4]))
    x = np.random.default_rng(5).standard_normal((48, *in_shape)).astype(np.float32)
    view, count = program.program_inferences(len(x))
    measured = steady_state(view, emulate_model(program, x).result, count).interval
    assert abs(measured - estimated_interval(program)) <= 0.02 * estimated_interval(program), \
        (measured, estimated_interval(program))


@pytest.mark.rtl
def test_stage_rtl_matches_emulator(models):
    model, in_shape = models["mlp"]
    # the Arch of tests/test_multichip_rtl.py's 2-chip system (rings of 8 words), so the same Verilator build
    arch = _arch(2, link_latency_cycles=16, result_ring_words=8)
    names = _names(model, arch)
    program = compile_model(model, arch, replicas=2, stage=(names[1], names[2]))
    assert {t.turns for t in program.tiles if t.config.n_out} == {1, 2}
    x = np.random.default_rng(3).standard_normal((4, *in_shape)).astype(np.float32)
    assert_rtl_matches_emulator(program, x)


def test_stage_program_round_trips(models, tmp_path):
    model, _ = models["mlp"]
    arch = _arch(2)
    names = _names(model, arch)
    program = compile_model(model, arch, replicas=2, stage=(names[1], names[2]))
    program.save(tmp_path / "prog")
    manifest = json.loads((tmp_path / "prog" / "program.json").read_text())
    assert {t.get("turns", 1) for t in manifest["tiles"]} == {1, 2}
    assert {layer.get("turns", 1) for layer in manifest["layers"]} == {1, 2}
    loaded = Program.load(tmp_path / "prog")
    assert [t.turns for t in loaded.tiles] == [t.turns for t in program.tiles]
    assert [layer.turns for layer in loaded.layers] == [layer.turns for layer in program.layers]


def test_bad_stages_are_refused(models):
    model, _ = models["mlp"]
    arch = _arch(2)
    names = _names(model, arch)
    with pytest.raises(CompileError, match="no layer named 'nope'"):
        compile_model(model, arch, replicas=2, stage=("nope", names[1]))
    with pytest.raises(CompileError, match="comes before"):
        compile_model(model, arch, replicas=2, stage=(names[2], names[1]))
    with pytest.raises(CompileError, match="not the whole network"):
        compile_model(model, arch, replicas=2, stage=(names[0], names[-1]))
    resnet, _ = models["resnet"]
    names = _names(resnet, _arch(1, 4, 4))
    inside = next(i for i, n in enumerate(names) if "conv2" in n or "add" in n.lower())
    with pytest.raises(CompileError, match="holds 2 tensors"):
        compile_model(resnet, _arch(1, 4, 4), replicas=2, stage=(names[1], names[inside]))


def test_automatic_choice_copies_the_slowest_chips_stage(models):
    """On several chips, where no copy of the whole network helps, compile_model tries two copies of the slowest
    chip's layers and keeps them when faster: estimated, and measured by the emulator."""
    model, in_shape = models["narrow"]
    arch = lean_arch(rows=3, cols=3, lanes=8, sram_bytes=4096, max_tile_outputs=256, chips=2, link_frame_flits=4)
    one = compile_model(model, arch, replicas=1)
    chosen = compile_model(model, arch)
    assert chosen.replicas == 2 and {layer.turns for layer in chosen.layers} == {1, 2}
    assert estimated_interval(chosen) / 2 < estimated_interval(one)
    x = np.random.default_rng(0).standard_normal((32, *in_shape)).astype(np.float32)
    measured = {}
    for copies, program in ((1, one), (2, chosen)):
        view, count = program.program_inferences(len(x))
        measured[copies] = steady_state(view, emulate_model(program, x).result, count).interval / copies
    assert measured[2] < measured[1], measured
    with pytest.raises(CompileError, match="needs at least 2 copies"):
        compile_model(model, arch, replicas=1, stage=("fc0", "fc1"))
