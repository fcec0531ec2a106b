"""Replicated networks (issue 11 item 4): copies of the network on a line of chips taking alternate inferences.

A program with ``replicas = N`` runs N real inferences per program inference: the host sends their inputs back to
back, copy ``j`` reads input ``j`` and the stream ends as the N outputs in order, so the host's flits are those of N
separate inferences. Checked here: the emulated outputs equal the one-copy program's and onnxruntime's (batches
that are and are not multiples of N), the automatic choice, the program artifact, and the RTL against the emulator.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from flowtile.arch import Arch
from flowtile.testing.archs import lean_arch
from flowtile.compiler import compile_model, report
from flowtile.compiler.emit import estimated_interval
from flowtile.host import input_flits, pad_batch
from flowtile.program import Program, ProgramError
from flowtile.testing.measure import steady_state
from flowtile.testing.oracle_checks import (assert_emulator_matches_onnxruntime, assert_rtl_matches_emulator,
                                            emulate_batch, emulate_model)
from flowtile.testing.random_models import quantize_qdq, random_float_cnn, random_float_mlp, random_float_resnet

ROOT = Path(__file__).resolve().parents[1]


def _int8_model(tmp_path, name, float_model, in_shape, seed):
    rng = np.random.default_rng(seed)
    (tmp_path / name).mkdir()
    onnx.save(float_model, tmp_path / name / "float.onnx")
    calibration = rng.standard_normal((16, *in_shape)).astype(np.float32)
    return quantize_qdq(tmp_path / name / "float.onnx", tmp_path / name / "qdq.onnx", calibration,
                        activation_uint8=False, per_channel=True)


def _arch(chips: int, rows: int = 2, cols: int = 2, **link) -> Arch:
    """Small chips with slow links (the default 1/16 of the flit width), frames of 4 flits."""
    return lean_arch(rows=rows, cols=cols, lanes=8, sram_bytes=4096, max_tile_outputs=64, chips=chips,
                     link_frame_flits=4, **link)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("replication")
    rng = np.random.default_rng(5)
    return {
        "mlp": (_int8_model(tmp_path, "mlp", random_float_mlp(rng, [24, 32, 20, 12, 10]), (24,), 1), (24,)),
        # wide hidden layers: a cut inside the network carries 8 flits, one between copies 1 or 2
        "wide": (_int8_model(tmp_path, "wide", random_float_mlp(rng, [8, 64, 64, 4]), (8,), 2), (8,)),
        "cnn": (_int8_model(tmp_path, "cnn", random_float_cnn(rng, (3, 6, 6), [{"out": 8, "k": 3, "pad": 1,
                                                                                "pool": (2, 2)}], 5),
                            (3, 6, 6), 3), (3, 6, 6)),
        # a projection shortcut written first: in a copy after the first, the block's input sits between the later
        # copies' inputs and the shortcut's output and rides along to the Add (plan_streams)
        "resnet": (_int8_model(tmp_path, "resnet", random_float_resnet(
            rng, (3, 6, 6), 8, [{"kind": "basic", "out": 16, "stride": 2}], 5, projection_first=True),
            (3, 6, 6), 4), (3, 6, 6)),
    }


CASES = [("mlp", 2, 2), ("mlp", 4, 2), ("mlp", 4, 4), ("cnn", 2, 2), ("wide", 4, 4), ("resnet", 4, 2)]


@pytest.mark.parametrize("name, chips, replicas", CASES, ids=[f"{n}-{c}chips-x{r}" for n, c, r in CASES])
def test_replicated_outputs_equal_one_copy_and_onnxruntime(models, name, chips, replicas):
    model, in_shape = models[name]
    arch = _arch(chips)
    program = compile_model(model, arch, replicas=replicas)
    single = compile_model(model, arch, replicas=1)
    assert program.replicas == replicas and single.replicas == 1
    assert len(program.layers) == replicas * len(single.layers)
    assert program.layers[len(single.layers)].name.endswith("[copy 1]")
    assert program.output_words == single.output_words
    # the compiler may pack the input (layout im2col) for one copy and not for two (its copies cross links)
    assert program.input_words == single.input_words or program.input.layout != single.input.layout
    assert program.program_input_words == replicas * program.input_words
    assert program.macs_per_inference == single.macs_per_inference
    rng = np.random.default_rng(chips * 10 + replicas)
    for batch in (2 * replicas, 2 * replicas + 1):
        x = rng.standard_normal((batch, *in_shape)).astype(np.float32)
        padded = pad_batch(program, x)
        assert len(padded) % replicas == 0 and len(padded) - batch < replicas
        assert not np.any(padded[batch:])
        comparison = assert_emulator_matches_onnxruntime(model, program, padded)
        one_copy = emulate_model(single, padded)
        np.testing.assert_array_equal(comparison.emulated.result.out_flits, one_copy.result.out_flits)
        np.testing.assert_array_equal(comparison.emulated.q[:batch], one_copy.q[:batch])
        if batch % replicas:
            _, flits = input_flits(program, x)
            with pytest.raises(ValueError, match="not a multiple"):
                emulate_batch(program, flits, batch)
    text = report(program)
    assert f"{replicas} copies of the network (alternate inferences)" in text
    assert "cycles per inference" in text


def test_automatic_choice_replicates_where_it_is_faster(models):
    model, in_shape = models["wide"]
    arch = _arch(2)
    one = compile_model(model, arch, replicas=1)
    two = compile_model(model, arch, replicas=2)
    chosen = compile_model(model, arch)
    assert chosen.replicas == 2
    # the cut inside one copy carries the 64-wide hidden layer; between copies only inputs and outputs
    assert two.links[0].inference_flits < one.links[0].inference_flits
    assert estimated_interval(chosen) / 2 < estimated_interval(one)
    # measured: the emulated steady-state interval per real inference improves as well
    x = np.random.default_rng(0).standard_normal((16, *in_shape)).astype(np.float32)
    measured = {copies: steady_state(program, emulate_model(program, x).result, len(x)).interval
                for copies, program in ((1, one), (2, chosen))}
    assert measured[2] < measured[1], measured
    # one chip: never replicated unless asked
    assert compile_model(model, arch.replace(chips=1)).replicas == 1


def test_automatic_choice_keeps_one_copy_where_replicating_does_not_help(models):
    model, _ = models["mlp"]
    arch = _arch(2, link_latency_cycles=16)
    one = compile_model(model, arch, replicas=1)
    chosen = compile_model(model, arch)
    assert chosen.replicas == 1
    assert estimated_interval(chosen) == estimated_interval(one)


def test_replicated_program_round_trips(models, tmp_path):
    model, _ = models["mlp"]
    program = compile_model(model, _arch(2), replicas=2)
    program.save(tmp_path / "prog")
    manifest = json.loads((tmp_path / "prog" / "program.json").read_text())
    assert manifest["replicas"] == 2
    loaded = Program.load(tmp_path / "prog")
    assert loaded.replicas == 2 and loaded.program_input_words == program.program_input_words
    single = compile_model(model, _arch(2), replicas=1)
    single.save(tmp_path / "single")
    assert "replicas" not in json.loads((tmp_path / "single" / "program.json").read_text())
    manifest["replicas"] = 0
    (tmp_path / "prog" / "program.json").write_text(json.dumps(manifest))
    with pytest.raises(ProgramError, match="replicas"):
        Program.load(tmp_path / "prog")


def test_program_inferences_view(models):
    model, _ = models["mlp"]
    program = compile_model(model, _arch(2), replicas=2)
    view, count = program.program_inferences(6)
    assert count == 3 and view.replicas == 1
    assert view.input_words == program.program_input_words and view.output_words == program.program_output_words
    assert program.program_inferences(1 + 1)[1] == 1
    with pytest.raises(ValueError, match="not a multiple"):
        program.program_inferences(3)
    single = compile_model(model, _arch(2), replicas=1)
    assert single.program_inferences(3) == (single, 3)


@pytest.mark.rtl
def test_replicated_rtl_matches_emulator(models):
    model, in_shape = models["mlp"]
    # rings of 8 words: the Arch of tests/test_multichip_rtl.py's 2-chip system, so the same Verilator build
    program = compile_model(model, _arch(2, link_latency_cycles=16, result_ring_words=8), replicas=2)
    assert program.replicas == 2
    x = np.random.default_rng(3).standard_normal((4, *in_shape)).astype(np.float32)
    assert_rtl_matches_emulator(program, x)


def test_emulate_takes_real_inferences_of_a_replicated_program(models):
    """emulate() counts real inferences: the same flits as the one-copy program's give the same output flits; a
    batch that is not a multiple of the copies is refused in one line."""
    from flowtile.emulator import EmulatorError, emulate
    model, shape = models["mlp"]
    program = compile_model(model, _arch(2), replicas=2)
    single = compile_model(model, _arch(2), replicas=1)
    x = np.random.default_rng(9).standard_normal((4, *shape)).astype(np.float32)
    _, flits = input_flits(single, x)
    np.testing.assert_array_equal(emulate(program, flits, 4).out_flits, emulate(single, flits, 4).out_flits)
    with pytest.raises(EmulatorError, match="not a multiple of the program's 2 copies"):
        emulate(program, flits[: 3 * single.input_words], 3)


def test_automatic_choice_replicates_on_one_large_chip(models):
    """On one chip of at least ONE_CHIP_MIN_TILES tiles compile_model also tries copies (max_copies): where one copy
    cannot use the grid, copies on their own shares of it run alternate inferences faster, the emulator agreeing
    with the estimate's ordering and the outputs those of one copy; a 4x4 chip is never replicated unasked."""
    from flowtile.compiler.emit import ONE_CHIP_MIN_TILES, max_copies
    model, in_shape = models["mlp"]
    arch = lean_arch(rows=8, cols=8, lanes=8, sram_bytes=4096, max_tile_outputs=64)
    assert arch.n_tiles >= ONE_CHIP_MIN_TILES and max_copies(arch, 4) > 1
    one = compile_model(model, arch, replicas=1)
    chosen = compile_model(model, arch)
    assert chosen.replicas > 1
    assert estimated_interval(chosen) / chosen.replicas < estimated_interval(one)
    x = np.random.default_rng(3).standard_normal((8 * chosen.replicas * 8, *in_shape)).astype(np.float32)
    runs = {copies: emulate_model(program, x) for copies, program in ((1, one), (chosen.replicas, chosen))}
    measured = {}
    for copies, program in ((1, one), (chosen.replicas, chosen)):
        view, count = program.program_inferences(len(x))
        measured[copies] = steady_state(view, runs[copies].result, count).interval / copies
    assert measured[chosen.replicas] < measured[1], measured
    assert np.array_equal(runs[chosen.replicas].q, runs[1].q)
    assert compile_model(model, arch.replace(rows=4, cols=4)).replicas == 1


def test_small_chip_of_contexts_tries_copies():
    """Below ONE_CHIP_MIN_TILES tiles copies are tried only when a tile holds several layers: the digits CNN's second
    convolution comes in units of 72 cycles, which one copy on 4x4 cannot balance; with 4 contexts a copy needs 2 tiles,
    and the chosen copies run faster per real inference than one copy, in the emulator as in the estimate, with the
    same outputs."""
    from flowtile.compiler.emit import ONE_CHIP_MIN_TILES, SMALL_CHIP_COPIES, max_copies
    model = onnx.load(ROOT / "models" / "digits_cnn.onnx")
    arch = lean_arch(tile_contexts=4).with_grid("4x4")
    assert arch.n_tiles < ONE_CHIP_MIN_TILES
    assert max_copies(arch.replace(tile_contexts=1), 5) == 1
    assert max_copies(arch, 5) == min(SMALL_CHIP_COPIES, arch.n_tiles // 2)
    chosen = compile_model(model, arch)
    one = compile_model(model, arch, replicas=1)
    assert chosen.replicas > 1
    assert estimated_interval(chosen) / chosen.replicas < estimated_interval(one)
    x = np.random.default_rng(5).standard_normal((12 * chosen.replicas, 1, 8, 8)).astype(np.float32)
    runs = {program.replicas: (program, emulate_model(program, x)) for program in (one, chosen)}
    measured = {}
    for copies, (program, run) in runs.items():
        view, count = program.program_inferences(len(x))
        measured[copies] = steady_state(view, run.result, count).interval / copies
        assert measured[copies] == estimated_interval(program) / copies, (copies, measured)
    assert measured[chosen.replicas] < measured[1]
    assert np.array_equal(runs[chosen.replicas][1].q, runs[1][1].q)
