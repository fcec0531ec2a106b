"""Host back-pressure and input gaps (flowtile.host.HostPattern): the RTL harness stalls its host output and gaps
its host input from the seeded per-cycle pattern, the emulator predicts every transfer cycle from the same
pattern (emulator.timing.Gate).

(a) the pattern contract itself (reproducible, duty roughly kept, validation);
(b) without RTL: outputs identical with and without stalls, cycles never fewer, duty 1.0 changes nothing,
    every host transfer falls on an on cycle, and a cycle-stepping model of the host's last hop agrees;
(c) Verilator == emulator in out_flits, out_times and cycles on the bundled digits MLP and CNN (default grid),
    several seeds and duties, output stalls heavy enough to back-pressure the chip.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flowtile.testing.archs import lean_arch
from flowtile.host import HOST_PATTERN_CYCLES, HostPattern, input_flits
from flowtile.emulator import emulate

ROOT = Path(__file__).resolve().parents[1]

#: (seed, out_duty, out_burst, in_duty, in_burst): duty 1 = never stalled.
PATTERNS = [
    (0, 1.0, 4, 1.0, 4),          # today's behaviour
    (1, 0.5, 4, 1.0, 4),          # output stalls only
    (2, 1.0, 4, 0.5, 3),          # input gaps only
    (3, 0.3, 10, 0.6, 2),         # both
    (4, 0.05, 200, 0.8, 5),       # long output stalls: back-pressure through the exit FIFO into the chip
]


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def model_case(request):
    from flowtile.compiler import compile_model
    model, data = {"mlp": ("digits_mlp.onnx", "digits_test.npz"),
                   "cnn": ("digits_cnn.onnx", "digits_cnn_test.npz")}[request.param]
    program = compile_model(ROOT / "models" / model, lean_arch())
    batch = 8 if request.param == "mlp" else 4
    with np.load(ROOT / "models" / data) as samples:
        x = samples["x"][:16]
    _, flits = input_flits(program, x[:batch])
    return request.param, program, flits, batch, x


# --- (a) the pattern -------------------------------------------------------------------------------------

def test_pattern_is_reproducible_and_keeps_its_duty():
    pattern = HostPattern(7, 0.4, 6, 0.7, 3)
    again = HostPattern(7, 0.4, 6, 0.7, 3)
    assert pattern.out_ready().shape == (HOST_PATTERN_CYCLES,)
    np.testing.assert_array_equal(pattern.out_ready(), again.out_ready())
    np.testing.assert_array_equal(pattern.in_valid(), again.in_valid())
    assert not np.array_equal(pattern.out_ready(), HostPattern(8, 0.4, 6, 0.7, 3).out_ready())
    assert abs(pattern.out_ready().mean() - 0.4) < 0.1 and abs(pattern.in_valid().mean() - 0.7) < 0.1
    assert HostPattern().out_ready().all() and HostPattern().in_valid().all()
    assert HostPattern(0, 0.001, 1000).out_ready().any()     # never a period without a transfer


@pytest.mark.parametrize("kwargs", [dict(out_duty=0), dict(in_duty=1.5), dict(out_burst=0.5), dict(seed=-1)])
def test_pattern_rejects_bad_parameters(kwargs):
    with pytest.raises(ValueError):
        HostPattern(**kwargs)


# --- (b) emulator only ------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: "-".join(map(str, p)))
def test_stalls_keep_outputs_and_never_save_cycles(model_case, pattern):
    _, program, flits, batch, _ = model_case
    free = emulate(program, flits, batch)
    host = HostPattern(*pattern)
    stalled = emulate(program, flits, batch, host_pattern=host)
    np.testing.assert_array_equal(stalled.out_flits, free.out_flits)
    assert stalled.cycles >= free.cycles
    assert (stalled.out_times >= free.out_times).all() and (stalled.in_times >= free.in_times).all()
    # every host transfer happens in a cycle the pattern allows, at most one a cycle
    assert host.out_ready()[stalled.out_times % HOST_PATTERN_CYCLES].all()
    assert host.in_valid()[stalled.in_times % HOST_PATTERN_CYCLES].all()
    assert (np.diff(stalled.out_times) >= 1).all() and (np.diff(stalled.in_times) >= 1).all()
    if pattern[1] == 1.0 and pattern[3] == 1.0:
        np.testing.assert_array_equal(stalled.out_times, free.out_times)
        np.testing.assert_array_equal(stalled.in_times, free.in_times)


def test_long_output_stalls_back_pressure_the_chip(model_case):
    """With a host that is rarely ready, the exit FIFO fills and the chip itself is held back: the last hop
    before the host transfers later than without stalls."""
    _, program, _, _, x = model_case
    x = np.concatenate([x, x])
    batch = len(x)          # more output flits than the queues and FIFOs between the last computing tile and the host hold
    _, flits = input_flits(program, x)
    free = emulate(program, flits, batch)
    stalled = emulate(program, flits, batch, host_pattern=HostPattern(4, 0.05, 200))
    assert stalled.cycles > free.cycles
    before_host = stalled.timing.stream_times[-2]
    assert (before_host > free.timing.stream_times[-2]).any()


def test_gated_chain_matches_a_cycle_stepping_host(model_case):
    """The host output chain against a cycle loop over its own inputs: given the times its FIFO is written
    (the chain before it), flit ``i`` leaves in the first ready cycle after its write and after flit ``i - 1``."""
    _, program, flits, batch, _ = model_case
    host = HostPattern(5, 0.3, 7, 0.5, 4)
    result = emulate(program, flits, batch, host_pattern=host)
    written = result.timing.stream_times[-2]
    ready = host.out_ready()
    expected, cycle = [], -1
    for w in written:
        cycle = max(cycle + 1, int(w) + 1)
        while not ready[cycle % HOST_PATTERN_CYCLES]:
            cycle += 1
        expected.append(cycle)
    np.testing.assert_array_equal(result.out_times, expected)
    # the host input: flit i offered from its predecessor's transfer on, taken in the first offered cycle in
    # which the FIFO has room (its reads: the first PE-side or link chain after the host input)
    offered = host.in_valid()
    taken = result.in_times
    for i in range(1, len(taken)):
        for cycle in range(int(taken[i - 1]) + 1, int(taken[i])):
            assert not offered[cycle % HOST_PATTERN_CYCLES] or _fifo_full(result, i, cycle, program.arch)


def _fifo_full(result, i, cycle, arch) -> bool:
    """Whether tile (0,0)'s W FIFO is full in ``cycle`` for flit ``i`` (flit ``i - D`` not yet read)."""
    depth = arch.router_fifo_depth
    reads = result.timing.stream_times[1]
    return i >= depth and reads[i - depth] >= cycle


# --- (c) RTL == emulator ----------------------------------------------------------------------------------

RTL_PATTERNS = [PATTERNS[0], PATTERNS[3], PATTERNS[4], (9, 0.6, 3, 0.4, 8)]


@pytest.mark.rtl
@pytest.mark.parametrize("pattern", RTL_PATTERNS, ids=lambda p: "-".join(map(str, p)))
def test_verilator_matches_emulator_under_stalls(model_case, pattern):
    from flowtile.rtl.simulate import simulate
    _, program, flits, batch, _ = model_case
    host = HostPattern(*pattern)
    emulated = emulate(program, flits, batch, host_pattern=host)
    result = simulate(program, flits, batch, host_pattern=host)
    np.testing.assert_array_equal(result.out_flits, emulated.out_flits)
    np.testing.assert_array_equal(result.out_times, emulated.out_times)
    assert result.cycles == emulated.cycles


#: A small chip for Amaranth's simulator (that of tests/test_rtl_flow.py's hand-built dense layer): the harness's
#: pattern memory does not depend on the grid, and a 4x4 chip of the default tiles simulates many times slower.
AMARANTH_ARCH = lean_arch(rows=2, cols=2, lanes=4, sram_bytes=1024, max_tile_outputs=16, result_ring_words=4,
                          host_buffer_flits=256)


@pytest.mark.rtl
def test_amaranth_simulator_matches_emulator_under_stalls():
    """The harness's pattern memory in its Amaranth-memory form (Amaranth's simulator): two dense layers on a 2x2
    chip, two inferences, output stalls and input gaps that cost cycles. (The digits MLP and CNN on the default
    4x4 chip run under stalls on Verilator above, whose harness has the same pattern logic in its Verilog form.)"""
    from flowtile.host import pack_flits
    from flowtile.rtl.simulate import simulate
    from flowtile.testing.program_builder import Dense, build_program, dense_golden
    rng = np.random.default_rng(11)
    layers = [Dense(rng.integers(-128, 128, (10, 12), dtype=np.int8), rng.integers(-2000, 2000, 10),
                    rng.integers(2**30, 2**31, 10), 40, zp_out=3, tiles=1),
              Dense(rng.integers(-128, 128, (6, 10), dtype=np.int8), rng.integers(-2000, 2000, 6),
                    rng.integers(2**30, 2**31, 6), 39, zp_out=-2, tiles=1)]
    program = build_program(AMARANTH_ARCH, layers, act_fill=rng)
    batch = 2
    x = rng.integers(-128, 128, (batch, 12), dtype=np.int8)
    flits = pack_flits(x, AMARANTH_ARCH.lanes)
    host = HostPattern(11, 0.3, 6, 0.5, 3)
    emulated = emulate(program, flits, batch, host_pattern=host)
    np.testing.assert_array_equal(emulated.out_flits.reshape(batch, -1)[:, :6], dense_golden(layers, x))
    assert emulated.cycles > emulate(program, flits, batch).cycles
    result = simulate(program, flits, batch, simulator="amaranth", host_pattern=host)
    np.testing.assert_array_equal(result.out_flits, emulated.out_flits)
    np.testing.assert_array_equal(result.out_times, emulated.out_times)
    assert result.cycles == emulated.cycles


# --- (d) the CLI ------------------------------------------------------------------------------------------

def test_cli_emulate_takes_the_stall_options(digits_program, digits_inputs, tmp_path, capsys):
    import json
    from flowtile import cli
    out = tmp_path / "y.npy"
    assert cli.main(["emulate", str(digits_program), "--input", str(digits_inputs), "--output", str(out)]) == 0
    free = json.loads(capsys.readouterr().out)
    y_free = np.load(out)
    assert cli.main(["emulate", str(digits_program), "--input", str(digits_inputs), "--output", str(out),
                     "--stall-seed", "3", "--out-duty", "0.3", "--out-burst", "10", "--in-duty", "0.5"]) == 0
    stalled = json.loads(capsys.readouterr().out)
    np.testing.assert_array_equal(np.load(out), y_free)
    assert stalled["cycles"] > free["cycles"]
    assert stalled["host_pattern"] == {"seed": 3, "out_duty": 0.3, "out_burst": 10.0, "in_duty": 0.5, "in_burst": 4.0}
    assert "host_pattern" not in free
    assert cli.main(["emulate", str(digits_program), "--input", str(digits_inputs), "--output", str(out),
                     "--out-duty", "0"]) == cli.EXIT_BAD_INPUT
    assert "out_duty" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["emulate", "rtl"])
def test_cli_help_shows_the_stall_defaults(command, capsys):
    from flowtile import cli
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--stall-seed", "--out-duty", "--out-burst", "--in-duty", "--in-burst"):
        assert option in text
    assert "(default: 1.0)" in text and "(default: 4.0)" in text


@pytest.mark.rtl
def test_cli_rtl_takes_the_stall_options(digits_program, digits_inputs, tmp_path, capsys):
    import json
    from flowtile import cli
    options = ["--stall-seed", "5", "--out-duty", "0.4", "--out-burst", "6", "--in-duty", "0.6", "--in-burst", "2"]
    assert cli.main(["emulate", str(digits_program), "--input", str(digits_inputs), "--output",
                     str(tmp_path / "e.npy"), *options]) == 0
    emulated = json.loads(capsys.readouterr().out)
    assert cli.main(["rtl", str(digits_program), "--input", str(digits_inputs), "--output",
                     str(tmp_path / "r.npy"), *options]) == 0
    simulated = json.loads(capsys.readouterr().out)
    assert simulated["cycles"] == emulated["cycles"]
    assert simulated["host_pattern"] == emulated["host_pattern"]
    np.testing.assert_array_equal(np.load(tmp_path / "r.npy"), np.load(tmp_path / "e.npy"))
