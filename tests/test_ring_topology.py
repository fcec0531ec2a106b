"""Chips in a ring (``Arch.chip_topology = "ring"``, issue 11, docs/architecture.md section 12): the host is attached
to chip 0 only; chips 0 .. N-1 run as in a line and link N-1 (the return link) carries the last chip's output back
to chip 0's board, where its receiver feeds the host output.

Checked here: the program format (``Program.links`` has N entries, the last the output stream; a ring program with
N - 1 is refused in one line naming the field); the compiler (placement as in the line, the return link's stage in
the estimate and the report); the emulator (outputs bit-identical to the line's and to one chip's; the ring's
interval no shorter and its latency longer than the line's: one more link stage; per-link figures include link
N-1); the System in Amaranth's simulator (every link, the return link too, meets the timing contract; the host gets
the flits as the return link's receiver rebuilds them); and on Verilator (marked ``rtl``) the RTL against the emulator
in every output flit, cycle stamp and link counter, faults off and on (a ring of 3 at 1e-3 per bit with the same seed,
also with host output stalls; the outputs equal the clean run's). Nothing compares with hard-coded cycle counts.
"""
from __future__ import annotations

import random
import re
import warnings

import numpy as np
import onnx
import pytest
from amaranth.sim import Simulator

from flowtile.arch import Arch
from flowtile.testing.archs import lean_arch
from flowtile.compiler import compile_model, estimated_interval, link_cycles, report
from flowtile.emulator import emulate
from flowtile.host import HostPattern
from flowtile.link_format import LinkGeometry, flit_lanes, lane_segments_of_tensors
from flowtile.program import Program, ProgramError, link_count
from flowtile.testing.oracle_checks import input_flits
from flowtile.testing.random_models import quantize_qdq, random_float_mlp

#: chips of 2x2 tiles (the MLP below needs two of them), frames of 4 flits, a short wire
CHIP = dict(rows=2, cols=2, lanes=8, sram_bytes=4096, max_tile_outputs=64, result_ring_words=8, link_latency_cycles=16,
            link_frame_flits=4)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """An int8 MLP 24 -> 32 -> 20 -> 12 -> 10 (that of tests/test_multichip_rtl.py)."""
    path = tmp_path_factory.mktemp("ring")
    rng = np.random.default_rng(11)
    onnx.save(random_float_mlp(rng, [24, 32, 20, 12, 10]), path / "float.onnx")
    calibration = rng.standard_normal((16, 24)).astype(np.float32)
    return quantize_qdq(path / "float.onnx", path / "qdq.onnx", calibration, activation_uint8=False, per_channel=True)


def compile_for(model, chips: int, topology: str = "ring", **fields) -> Program:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compile_model(model, lean_arch(chips=chips, chip_topology=topology, **{**CHIP, **fields}), replicas=1)


def run(program: Program, x: np.ndarray, **options):
    _, flits = input_flits(program, x)
    return flits, emulate(program, flits, len(x), **options)


X = np.random.default_rng(2).standard_normal((6, 24)).astype(np.float32)


# --- program format, compiler, emulator ------------------------------------------------------------------------------
@pytest.mark.parametrize("chips", [2, 3])
def test_ring_runs_as_the_line_plus_a_return_link(model, chips):
    line, ring = compile_for(model, chips, "line"), compile_for(model, chips)
    assert len(ring.links) == link_count(ring.arch) == chips and len(line.links) == chips - 1
    # placed as the line; the return link carries the output stream (dense: only the output's channels)
    assert [t.config for t in ring.tiles] == [t.config for t in line.tiles] and ring.links[:-1] == line.links
    assert ring.links[-1].inference_flits == ring.program_output_words
    assert ring.links[-1].segments == lane_segments_of_tensors([(1, 10)], 8)[0]
    assert estimated_interval(ring) >= estimated_interval(line)
    one_chip = compile_for(model, 1, "line", rows=2 * chips)
    _, on_line = run(line, X)
    _, on_ring = run(ring, X)
    _, alone = run(one_chip, X)
    np.testing.assert_array_equal(on_ring.out_flits, on_line.out_flits)
    np.testing.assert_array_equal(on_ring.out_flits, alone.out_flits)
    # one more link stage: no faster, and every inference's results arrive later
    assert on_ring.interval_cycles >= on_line.interval_cycles and on_ring.latency_cycles > on_line.latency_cycles
    np.testing.assert_array_equal(on_ring.timing.link_times[-1].deliver, on_ring.out_times)
    figures = on_ring.report()
    assert figures["chips"] == chips and figures["chip_topology"] == "ring"
    last = figures["links"][-1]
    assert [link["link"] for link in figures["links"]] == list(range(chips))
    assert last["flits"] == len(X) * ring.links[-1].inference_flits == on_ring.out_flits.shape[0]
    assert last["counters"]["rx_frames_accepted"] == len(X) * LinkGeometry(ring.arch).frames(
        ring.links[-1].inference_flits, ring.links[-1].segments)
    assert on_ring.links[-1].carried_bytes_per_inference == int(flit_lanes(ring.links[-1].segments, 2, 8).sum()) == 10


def test_report_names_the_return_link(model, tmp_path):
    text = report(compile_for(model, 3))
    assert re.search(r"^2 \(chip 2 -> host at chip 0\) +2 +1 ", text, re.M)      # flits, frames per inference
    assert re.search(r"^1 \(chip 1 -> 2\) ", text, re.M) and "link bound on the interval" in text
    # a wide output (64 values, 8 flits in frames of 1 flit): the return link is the slowest stage, and counts
    rng = np.random.default_rng(3)
    onnx.save(random_float_mlp(rng, [8, 16, 64]), tmp_path / "float.onnx")
    wide = quantize_qdq(tmp_path / "float.onnx", tmp_path / "qdq.onnx", rng.standard_normal((16, 8)).astype(np.float32),
                        activation_uint8=False, per_channel=True)
    ring = compile_for(wide, 2, link_frame_flits=1)
    stage = link_cycles(ring.arch, ring.links[1].inference_flits, ring.links[1].segments)
    assert estimated_interval(ring) == stage > estimated_interval(compile_for(wide, 2, "line", link_frame_flits=1))
    text = report(ring)
    assert f"estimated interval {stage} cycles/inference (bottleneck: link 1 (chip 1 -> host at chip 0))" in text
    assert f"warning: link 1 (chip 1 -> host at chip 0) is the bottleneck: {stage} cycles/inference" in text


def test_validate_refuses_a_ring_program_without_its_return_link(model, tmp_path):
    ring = compile_for(model, 3)
    ring.save(tmp_path / "ring")                     # the format holds it: N link register sets
    assert Program.load(tmp_path / "ring").links == ring.links
    short = Program(arch=ring.arch, input=ring.input, output=ring.output, layers=ring.layers, tiles=ring.tiles,
                    model_name=ring.model_name, links=ring.links[:-1])
    with pytest.raises(ProgramError) as error:
        short.validate()
    message = str(error.value)
    assert "\n" not in message and message.startswith("program has 2 link register set(s), arch has 3 chip(s) in a "
                                                      "ring (arch field 'chip_topology' = 'ring'")
    assert message.endswith("so 3 link(s)")
    as_line = Program(arch=ring.arch.replace(chip_topology="line"), input=ring.input, output=ring.output,
                      layers=ring.layers, tiles=ring.tiles, links=ring.links)
    with pytest.raises(ProgramError, match=r"has 3 link register set\(s\), arch has 3 chip\(s\) in a line, so 2 link"):
        as_line.validate()
    wrong = Program(arch=ring.arch, input=ring.input, output=ring.output, layers=ring.layers, tiles=ring.tiles,
                    links=ring.links[:-1] + [type(ring.links[-1])(ring.links[-1].inference_flits + 1)])
    with pytest.raises(ProgramError, match=r"^link 2 \(chip 2 -> host at chip 0\): register inference_flits = 3, "
                                           r"but exit tile chip2\.r1c0 of chip 2 sends 2 flits per inference$"):
        wrong.validate()


# --- the System in Amaranth's simulator ------------------------------------------------------------------------------
def test_system_ring_delivers_through_the_return_link_on_the_contracts_cycles():
    """A pass-through program on 2 chips of 1x2 tiles in a ring: the host's flits come out of link 1's receiver in
    order, with the destination fields it rebuilds (0), under random host output stalls; both links meet the timing
    contract cycle by cycle; link 1's registers load over the bus as chip 1's link (target LOAD_TARGET_LINK)."""
    from flowtile.hdl.layouts import LOAD_TARGET_LINK
    from flowtile.hdl.link import LinkFormat
    from flowtile.hdl.system import LINK_STATUS_COUNTERS, System
    from test_hdl_link import LinkProbe, check_link_contract
    from test_hdl_system import ARCH, load, load_program, pass_through_program

    arch = ARCH.replace(chip_topology="ring")
    n_pass, inferences, rng = 5, 3, random.Random(7)
    dut = System(arch)
    assert list(dut.signature.members) == ["load", "run", "i_host", "o_host", "link0", "link1"]
    fmt = LinkFormat(arch)
    sent = [rng.getrandbits(arch.flit_data_bits) for _ in range(n_pass * inferences)]
    received, status = [], []
    probes = [LinkProbe(link) for link in dut.links]

    async def testbench(ctx):
        await load_program(ctx, dut, arch, pass_through_program(arch, n_pass, last_dest=(0, 1)), n_pass)
        await load(ctx, dut, chip=1, tile=0, target=LOAD_TARGET_LINK, addr=0, data=n_pass)   # the return link
        ctx.set(dut.run, 1)
        index, valid, cycle = 0, False, 0
        while len(received) < len(sent) or cycle < 40:
            assert cycle < 4000, f"{len(received)} of {len(sent)} flits out"
            cycle += len(received) == len(sent)
            if not valid and index < len(sent):
                valid = True
                ctx.set(dut.i_host.payload, {"data": sent[index], "dest_row": 0, "dest_col": 0, "dest_host": 0})
            ctx.set(dut.i_host.valid, valid)
            took = valid and ctx.get(dut.i_host.ready)
            ready = rng.random() >= 0.4
            ctx.set(dut.o_host.ready, ready)
            if ready and ctx.get(dut.o_host.valid):
                payload = ctx.get(dut.o_host.payload)
                received.append(tuple(int(payload[name]) for name in ("data", "dest_row", "dest_col", "dest_host")))
            for probe in probes:
                probe.sample(ctx)
            await ctx.tick()
            if took:
                index, valid = index + 1, False
        status.extend({name: ctx.get(getattr(getattr(dut, f"link{k}"), name)) for name in LINK_STATUS_COUNTERS}
                      for k in range(2))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    assert received == [(data, 0, 0, 0) for data in sent]
    frames = inferences * fmt.frames(n_pass)
    for probe, link in zip(probes, status):
        assert check_link_contract(fmt, n_pass, probe.cycles)["frames"] == frames == link["rx_frames_accepted"]


def test_system_verilog_has_a_link_per_chip_in_a_ring():
    from flowtile.hdl.system import LINK_MODULE_NAME
    from flowtile.hdl.verilog import system_verilog
    arch = lean_arch(rows=1, cols=2, lanes=2, sram_bytes=64, max_tile_outputs=4, result_ring_words=2, chips=3,
                     chip_topology="ring", link_latency_cycles=2)
    text = system_verilog(arch, quiet=True)
    assert len(re.findall(rf"^\s*{LINK_MODULE_NAME} \S+ \(", text, re.M)) == 3
    assert re.search(r"\boutput\b[^;]*\blink2__rx_frames_accepted\b", text)


# --- Verilator -------------------------------------------------------------------------------------------------------
@pytest.mark.rtl
def test_ring_rtl_equals_the_emulator(model):
    """A ring of 2 chips, faults off, 40 inferences (the emulator extrapolates a periodic steady state), with and
    without host stalls (the return link's receiver waits for the host output): every output flit, cycle stamp, the
    cycle count and every link's counters."""
    from flowtile.rtl.simulate import simulate
    ring = compile_for(model, 2)
    x = np.random.default_rng(4).standard_normal((40, 24)).astype(np.float32)
    for pattern in (None, HostPattern(seed=5, out_duty=0.3, out_burst=5, in_duty=0.8)):
        flits, emulated = run(ring, x, host_pattern=pattern)
        rtl = simulate(ring, flits, len(x), simulator="verilator", host_pattern=pattern)
        np.testing.assert_array_equal(np.asarray(rtl.out_flits), emulated.out_flits)
        np.testing.assert_array_equal(np.asarray(rtl.out_times), emulated.out_times)
        assert rtl.cycles == emulated.cycles and len(rtl.link_counters) == 2
        for link, counters in zip(emulated.links, rtl.link_counters):
            assert counters == {name: link.counters[name] for name in counters}, link.link


@pytest.mark.rtl
def test_faulty_ring_rtl_equals_the_emulator_and_a_clean_run(model):
    """A ring of 3 chips at 1e-3 per wire bit (seed 2: every link, the return link too, replays frames), with and
    without host output stalls: RTL == emulator in every output flit, stamp, the cycle count and the counters; the
    outputs equal a clean run's."""
    from flowtile.rtl.simulate import simulate
    faulty = compile_for(model, 3, link_error_rate=0.001, link_error_seed=2)
    flits, clean = run(compile_for(model, 3), X)
    for pattern in (None, HostPattern(seed=2, out_duty=0.4, out_burst=6, in_duty=0.7)):
        emulated = emulate(faulty, flits, len(X), host_pattern=pattern)
        np.testing.assert_array_equal(emulated.out_flits, clean.out_flits)
        assert all(link.counters["tx_replays"] > 0 for link in emulated.links), [l.counters for l in emulated.links]
        assert emulated.cycles > clean.cycles
        rtl = simulate(faulty, flits, len(X), simulator="verilator", host_pattern=pattern,
                       max_cycles=20 * emulated.cycles + 10_000)
        np.testing.assert_array_equal(np.asarray(rtl.out_flits), emulated.out_flits)
        np.testing.assert_array_equal(np.asarray(rtl.out_times), emulated.out_times)
        assert rtl.cycles == emulated.cycles and rtl.counters_cycle == emulated.cycles
        for link, counters in zip(emulated.links, rtl.link_counters):
            assert counters == {name: link.counters[name] for name in counters}, link.link
