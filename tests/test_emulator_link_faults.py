"""The emulator's link simulation with faults on (emulator/link_faults.py) against the Amaranth RTL of
:class:`flowtile.hdl.link.Link`, and the fault model's bulk generator against its plain-Python definition
(flowtile/link_faults.py).

* :class:`ChannelFlips` (numpy, in blocks) == :func:`reference_flips` (one LFSR step at a time), with and without
  bursts; the long-run flip rate is near the error rate; bursts flip consecutive cycles;
* the spec's CRCs == Amaranth's catalogue;
* :func:`simulate_link` == the RTL: random offer times and output stalls, error rates 1e-3..2e-2 with and without
  bursts, several seeds: every flit's accept and delivery cycle and every counter equal;
* a campaign of injected flips: every delivered flit equals the sent one, no undetected error (the big campaign is
  ``test_undetected_campaign_large``, marked slow).
"""
from __future__ import annotations

import random

import numpy as np
import pytest
from amaranth.lib.crc import catalog
from amaranth.sim import Simulator

from flowtile.testing.archs import lean_arch
from flowtile.emulator.link_faults import LINK_COUNTERS, ChannelFlips, simulate_link
from flowtile.hdl.link import Link
from flowtile.link_format import LaneSegment, flit_lanes
from flowtile.link_faults import (CRC16_IBM_3740, CRC32_ISO_HDLC, crc_compute, link_seed, reference_flips,
                                  ret_seed)

pytestmark = [pytest.mark.filterwarnings("ignore:.*created but never used")]

ARCH = lean_arch(rows=2, cols=2, lanes=2, sram_bytes=64, max_tile_outputs=4)
SMALL = dict(bits=4, frame_flits=4, credit_frames=4, replay_frames=4, latency=6)


@pytest.mark.parametrize("bits, rate, burst, seed", [(3, 0.01, 1, 5), (4, 0.002, 8, 77), (1, 0.05, 3, 2 ** 32 - 1),
                                                    (5, 0.0, 1, 9)])
def test_bulk_flips_equal_the_reference(bits, rate, burst, seed):
    cycles = 9000                      # crosses two chunk boundaries
    golden = reference_flips(seed, bits, rate, burst, cycles)
    flips = ChannelFlips(seed, bits, rate, burst)
    assert [flips.mask(t) for t in range(cycles)] == golden
    assert flips.count(cycles - 1) == sum(bin(m).count("1") for m in golden)


def test_flip_rate_and_bursts():
    bits, rate, burst, cycles = 6, 0.001, 8, 1_000_000
    flips = ChannelFlips(3, bits, rate, burst)
    flips.ensure(cycles - 1)
    count = flips.count(cycles - 1)
    assert count / (cycles * (bits + 2)) == pytest.approx(rate, rel=0.15)
    hit = sorted(t for t in flips.masks if t < cycles)
    runs = sum(1 for a, b in zip(hit, hit[1:]) if b == a + 1)
    assert runs > len(hit) // 2                        # flips come in runs of consecutive cycles
    plain = ChannelFlips(3, bits, rate, 1)
    assert plain.count(cycles - 1) / (cycles * (bits + 2)) == pytest.approx(round(rate * 65536) / 65536, rel=0.1)


def test_crcs_equal_amaranths():
    rng = random.Random(4)
    for bits in (1, 3, 4, 8, 13):
        for params, mine in ((catalog.CRC32_ISO_HDLC, CRC32_ISO_HDLC), (catalog.CRC16_IBM_3740, CRC16_IBM_3740)):
            words = [rng.getrandbits(bits) for _ in range(rng.randrange(1, 30))]
            assert crc_compute(mine, bits, words) == params(bits).compute(words)
            other = [rng.getrandbits(bits) for _ in words]
            xor = [a ^ b for a, b in zip(words, other)]
            assert crc_compute(mine, bits, words) ^ crc_compute(mine, bits, other) == \
                crc_compute(mine, bits, xor, linear=True)


def test_seed_rules_are_the_specs():
    from flowtile.hdl import system
    assert system.link_seed is link_seed and ret_seed(5) == 6


# --- the link against the RTL ----------------------------------------------------------------------------------
def rtl_link(link_kwargs, inference_flits, flits, offers, rooms, cycles, segments=()):
    """Run ``Link(ARCH, **link_kwargs)`` with lane table ``segments`` for ``cycles`` cycles from run cycle 0: flit
    ``i`` offered from ``offers[i]``, the output ready for flit ``i`` from ``rooms[i]``. Returns accept and deliver
    cycles, the delivered payloads and the counters after the last cycle."""
    from flowtile.hdl.link import lane_table_layout
    from flowtile.link_format import LINK_LANE_SEGMENTS, encode_lane_segment
    dut = Link(ARCH, **link_kwargs)
    entry = lane_table_layout(ARCH).elem_shape.size
    table = sum(encode_lane_segment(segment, ARCH.lanes) << (s * entry)
                for s, segment in enumerate(list(segments) + [None] * (LINK_LANE_SEGMENTS - len(segments))))
    accept, deliver, out = [], [], []
    counters = {}

    async def testbench(ctx):
        ctx.set(dut.run, 1)
        ctx.set(dut.inference_flits, inference_flits)
        ctx.set(dut.segments.as_value(), table)
        for t in range(cycles):
            i, k = len(accept), len(deliver)
            offering = i < len(flits) and offers[i] <= t
            ctx.set(dut.i.valid, offering)
            if offering:
                ctx.set(dut.i.payload.as_value(), flits[i])
            ready = k < len(flits) and rooms[k] <= t
            ctx.set(dut.o.ready, ready)
            if offering and ctx.get(dut.i.ready):
                accept.append(t)
            if ready and ctx.get(dut.o.valid):
                deliver.append(t)
                out.append(ctx.get(dut.o.payload.as_value()))
            await ctx.tick()
        for name in LINK_COUNTERS:
            if hasattr(dut, name):
                counters[name] = ctx.get(getattr(dut, name))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    return accept, deliver, out, counters


def random_times(rng, n, spread, start=0):
    times, t = [], start
    for _ in range(n):
        t += rng.choice([0, 0, 0, 1, 1, 2, rng.randrange(spread)])
        times.append(t)
    return times


CASES = [  # (error_rate, burst_cycles, seed, inference_flits, flits, stalls)
    (0.01, 1, 11, 10, 40, True),
    (0.006, 1, 12, 0, 48, False),
    (0.005, 4, 13, 7, 42, True),
    (0.003, 8, 14, 6, 36, True),
    (0.01, 3, 2 ** 32 - 1, 5, 40, True),
    (0.001, 1, 16, 4, 60, False),
] + [(random.Random(s).choice([0.002, 0.004, 0.008]), random.Random(s + 100).choice([1, 2, 5, 16]), 1000 + s,
      random.Random(s).choice([0, 3, 9, 16]), 36, s % 2 == 0) for s in range(6)]


@pytest.mark.parametrize("case", CASES)
def test_link_model_equals_rtl(case):
    error_rate, burst, seed, inference_flits, n, stalls = case
    rng = random.Random(seed)
    from flowtile.hdl.link import LinkFormat
    fmt = LinkFormat(ARCH, **SMALL)
    flits = [rng.getrandbits(ARCH.flit_bits) for _ in range(n)]
    offers = random_times(rng, n, 40 if stalls else 3)
    rooms = random_times(rng, n, 60 if stalls else 2, start=rng.randrange(50))
    kwargs = dict(SMALL, error_rate=error_rate, burst_cycles=burst, seed=seed)
    fwd = ChannelFlips(seed, fmt.bits, error_rate, burst)
    ret = ChannelFlips(ret_seed(seed), fmt.bits, error_rate, burst)
    # every other case with inferences has a lane table: pixels of `period` words, the last carrying some lanes
    segments = ()
    if inference_flits and seed % 2:
        period = rng.randrange(1, 4)
        segments = (LaneSegment(rng.randrange(1, inference_flits + 1), period, rng.randrange(1, ARCH.lanes + 1)),)
    model = simulate_link(fmt, inference_flits, offers, rooms, fwd=fwd, ret=ret, segments=segments)
    cycles = int(model.deliver[-1]) + 30
    accept, deliver, out, counters = rtl_link(kwargs, inference_flits, flits, offers, rooms, cycles, segments)
    # only the carried lanes of the data cross: each flit comes out addressed to tile (0,0) (dest_row = dest_col =
    # dest_host = 0), its other lanes zero
    carried = np.tile(flit_lanes(segments, inference_flits or n, ARCH.lanes), -(-n // (inference_flits or n)))[:n]
    assert out == [f & ((1 << (8 * int(c))) - 1) for f, c in zip(flits, carried)]
    assert accept == model.accept.tolist()
    assert deliver == model.deliver.tolist()
    model = simulate_link(fmt, inference_flits, offers, rooms, fwd=ChannelFlips(seed, fmt.bits, error_rate, burst),
                          ret=ChannelFlips(ret_seed(seed), fmt.bits, error_rate, burst), end=cycles - 1,
                          segments=segments)
    expected = {name: model.counters[name] for name in counters}
    assert counters == expected
    assert model.counters["undetected"] == 0


# --- the simulation without flips is the fault-free contract ------------------------------------------------------
def _multichip_case(seed, **link):
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from test_emulator_multichip import dense, networks, run
    rng = np.random.default_rng(seed)
    layers = [dense(rng, 10, 12), dense(rng, 12, 9, 2)]
    program, single = networks(layers, 2, **link)
    x = rng.integers(-128, 128, (9, 10), dtype=np.int8)
    return program, single, x, run


@pytest.mark.parametrize("link", [{}, {"link_credit_frames": 1, "link_replay_frames": 2, "link_frame_flits": 2},
                                  {"link_bits_per_cycle": 1, "link_latency_cycles": 3}])
def test_simulation_without_flips_is_the_contract(link):
    """Fault free, the emulator solves links in closed form (flowtile/link_format.py's contract); the cycle-exact
    simulation with no flips, given the same offers and rooms, finds the same cycle for every event."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from test_emulator_multichip import link_boundary
    program, _, x, run = _multichip_case(1, **link)
    result = run(program, x, len(x))
    geometry = result.links and __import__("flowtile.link_format", fromlist=["LinkGeometry"]).LinkGeometry(program.arch)
    times = result.timing.link_times[0]
    offers, rooms = link_boundary(program, result, 0)
    off = ChannelFlips(1, geometry.bits, 0.0)
    sim = simulate_link(geometry, program.links[0].inference_flits, offers, rooms, fwd=off, ret=off)
    for name in ("accept", "close", "send", "received", "deliver"):
        np.testing.assert_array_equal(getattr(sim, name), getattr(times, name), err_msg=name)
    assert sim.counters["tx_frames_sent"] == sim.counters["rx_frames_accepted"] == len(times.send)
    assert sim.counters["tx_replays"] == sim.counters["tx_timeouts"] == 0


@pytest.mark.parametrize("rate, burst, seed", [(0.002, 1, 3), (0.004, 4, 5), (0.004, 16, 8)])
def test_emulator_with_faults_outputs_clean_and_links_consistent(rate, burst, seed):
    """With faults the emulator's outputs are the clean run's; each faulty link's events are the simulation's for
    the final offers and rooms (the solution is a fixed point); counters are reported."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from test_emulator_multichip import link_boundary
    program, _, x, run = _multichip_case(2, link_error_rate=rate, link_burst_cycles=burst, link_error_seed=seed)
    clean, _, _, _ = _multichip_case(2)
    result, reference = run(program, x, len(x)), run(clean, x, len(x))
    np.testing.assert_array_equal(result.out_flits, reference.out_flits)
    assert result.cycles >= reference.cycles
    stats = result.links[0]
    assert stats.counters["fwd_flips"] + stats.counters["ret_flips"] > 0 and stats.counters["undetected"] == 0
    report = result.report()["links"][0]
    assert report["detected_errors"] == stats.detected_errors and report["replays"] == stats.counters["tx_replays"]
    from flowtile.link_format import LinkGeometry
    geometry = LinkGeometry(program.arch)
    offers, rooms = link_boundary(program, result, 0)
    sim = simulate_link(geometry, program.links[0].inference_flits, offers, rooms,
                        fwd=ChannelFlips(link_seed(seed, 0), geometry.bits, rate, burst),
                        ret=ChannelFlips(ret_seed(link_seed(seed, 0)), geometry.bits, rate, burst))
    times = result.timing.link_times[0]
    for name in ("accept", "close", "send", "received", "deliver"):
        np.testing.assert_array_equal(getattr(sim, name), getattr(times, name), err_msg=name)


@pytest.mark.parametrize("rate", [0.0, 0.003])
def test_dense_frames_in_the_link_simulation(rate):
    """A link with a lane table (dense frames: 3 pixels of 5 channels a 16-byte frame): the register-level
    simulation frames as the spec says, fault free it is the closed-form contract event for event, and with faults
    each event is the simulation's for the final offers and rooms; outputs equal the clean run's."""
    import copy
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from test_emulator_multichip import dense_frames_case, link_boundary, run
    from flowtile.link_format import LinkGeometry, lane_segments_of_tensors
    segments = lane_segments_of_tensors([(36, 5)], 4)[0]
    clean, _, _, _, x = dense_frames_case(segments, batch=6)
    program, *_ = dense_frames_case(segments, batch=6, link_error_rate=rate, link_error_seed=7)
    result, reference = run(program, x, len(x)), run(clean, x, len(x))
    np.testing.assert_array_equal(result.out_flits, reference.out_flits)
    geometry = LinkGeometry(program.arch)
    offers, rooms = link_boundary(clean if rate == 0 else program, result, 0)
    seed = link_seed(7, 0)
    sim = simulate_link(geometry, 72, offers, rooms, segments=segments,
                        fwd=ChannelFlips(seed, geometry.bits, rate), ret=ChannelFlips(ret_seed(seed), geometry.bits, rate))
    times = result.timing.link_times[0]
    assert len(times.send) == 6 * 12
    for name in ("accept", "close", "send", "received", "deliver"):
        np.testing.assert_array_equal(getattr(sim, name), getattr(times, name), err_msg=name)
    if rate:
        assert result.links[0].counters["fwd_flips"] > 0 and result.links[0].counters["undetected"] == 0


def test_fault_free_reports_counters():
    program, _, x, run = _multichip_case(3)
    stats = run(program, x, len(x)).links[0]
    assert stats.counters["tx_frames_sent"] == stats.counters["rx_frames_accepted"] == stats.frames
    assert stats.detected_errors == 0 and stats.counters["tx_replays"] == 0


# --- undetected errors --------------------------------------------------------------------------------------------
def campaign(flits, rate, burst, seed):
    """A long run of the simulation on a busy link: (flips injected on both channels, counters)."""
    from flowtile.link_format import LinkGeometry
    geometry = LinkGeometry(ARCH, **SMALL)
    offers = list(range(flits))
    fwd = ChannelFlips(seed, geometry.bits, rate, burst)
    ret = ChannelFlips(ret_seed(seed), geometry.bits, rate, burst)
    run = simulate_link(geometry, 12, offers, offers, fwd=fwd, ret=ret)
    assert (run.deliver >= 0).all() and np.all(np.diff(run.deliver) > 0)
    return run.counters["fwd_flips"] + run.counters["ret_flips"], run.counters


def test_undetected_campaign_small():
    """Every corrupted frame whose beats line up is checked exactly (CRC-32 linearity): none passes."""
    flips, counters = campaign(1500, 0.004, 4, 21)
    assert flips > 500 and counters["rx_crc_errors"] + counters["rx_seq_errors"] > 10 and counters["undetected"] == 0



def test_undetected_campaign_large():
    """>= 10**4 injected flips, with and without bursts: zero undetected."""
    total = 0
    for burst, seed in ((1, 31), (4, 32), (16, 33)):
        flips, counters = campaign(6000, 0.004, burst, seed)
        assert counters["undetected"] == 0
        total += flips
    assert total >= 10_000


def test_checkpoints_give_the_fresh_result():
    """A run restarted from the snapshots of earlier runs on other offers and rooms equals a fresh run."""
    from flowtile.emulator.link_faults import Checkpoints
    from flowtile.link_format import LinkGeometry
    geometry = LinkGeometry(ARCH, **SMALL)
    rng = random.Random(5)
    n = 600
    checkpoints = Checkpoints()
    for trial in range(5):
        offers = random_times(rng, n, 30)
        rooms = random_times(rng, n, 40, start=rng.randrange(30))
        if trial % 2:   # change only a late part
            cut = n // 2 + rng.randrange(n // 2)
            offers = offers[:cut] + [x + 50 for x in offers[cut:]]

        def channels():
            return ChannelFlips(8, geometry.bits, 0.004, 3), ChannelFlips(9, geometry.bits, 0.004, 3)
        fwd, ret = channels()
        restarted = simulate_link(geometry, 10, offers, rooms, fwd=fwd, ret=ret, checkpoints=checkpoints,
                                  end=offers[-1] + 5000)
        fwd, ret = channels()
        fresh = simulate_link(geometry, 10, offers, rooms, fwd=fwd, ret=ret, end=offers[-1] + 5000)
        for name in ("accept", "close", "send", "received", "deliver"):
            np.testing.assert_array_equal(getattr(restarted, name), getattr(fresh, name), err_msg=name)
        assert restarted.counters == fresh.counters and restarted.sends == fresh.sends
        assert len(checkpoints.snapshots) > 2


@pytest.mark.skipif(not __import__("os").environ.get("FLOWTILE_LONG"), reason="long: set FLOWTILE_LONG=1 (~3 min)")
def test_undetected_campaign_rtl():
    """The RTL with real data: >= 10**4 flips injected (bursts), every delivered flit equals the sent one, and the
    simulation still equals the RTL in every cycle and counter over the long run."""
    from flowtile.hdl.link import LinkFormat
    fmt = LinkFormat(ARCH, **SMALL)
    rate, burst, seed, n = 0.01, 3, 99, 9000
    rng = random.Random(seed)
    flits = [rng.getrandbits(ARCH.flit_bits) for _ in range(n)]
    offers = rooms = [0] * n
    model = simulate_link(fmt, 8, offers, rooms, fwd=ChannelFlips(seed, fmt.bits, rate, burst),
                          ret=ChannelFlips(ret_seed(seed), fmt.bits, rate, burst))
    cycles = int(model.deliver[-1]) + 30
    accept, deliver, out, counters = rtl_link(dict(SMALL, error_rate=rate, burst_cycles=burst, seed=seed), 8, flits,
                                              offers, rooms, cycles)
    # only the data crosses: each flit comes out addressed to tile (0,0) (dest_row = dest_col = dest_host = 0)
    assert out == [f & ((1 << fmt.flit_data_bits) - 1) for f in flits]
    assert counters["fwd_flips"] + counters["ret_flips"] >= 10_000
    assert deliver == model.deliver.tolist() and accept == model.accept.tolist()
    model = simulate_link(fmt, 8, offers, rooms, fwd=ChannelFlips(seed, fmt.bits, rate, burst),
                          ret=ChannelFlips(ret_seed(seed), fmt.bits, rate, burst), end=cycles - 1)
    assert counters == {name: model.counters[name] for name in counters} and model.counters["undetected"] == 0


@pytest.mark.parametrize("seed", range(60))
def test_random_faulty_multichip_programs(seed):
    """Seeded random multi-chip dense chains (2 or 3 chips, random link geometry and FIFO depths, sometimes a host
    pattern) with faults: the sweeps converge, the outputs are the clean run's, and every faulty link's events are
    the link simulation's for the final offers and rooms."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from test_emulator_multichip import dense, link_boundary, networks, run
    from flowtile.host import HostPattern
    from flowtile.link_format import LinkGeometry
    rng = np.random.default_rng(seed + 500)
    lanes = int(rng.choice([1, 2, 4, 8]))
    chips = int(rng.integers(2, 4))
    n_in = width = int(rng.integers(1, 4 * lanes + 1))
    layers = []
    for _ in range(int(rng.integers(1, 4))):
        n_out = int(rng.integers(1, min(48, 6 * lanes) + 1))
        layers.append(dense(rng, width, n_out))
        width = n_out
    link = {"link_latency_cycles": int(rng.choice([1, 2, 5, 20, 64])),
            "link_frame_flits": int(rng.choice([1, 2, 3, 4, 8])),
            "link_credit_frames": int(rng.choice([1, 2, 3, 8])),
            "link_replay_frames": int(rng.choice([1, 2, 3, 8]))}
    if rng.random() < 0.5:
        link["link_bits_per_cycle"] = int(rng.integers(1, 8 * lanes + 3 + 1))
    depth = int(rng.integers(1, 5))
    clean, _ = networks(layers, chips, 1, 2, lanes=lanes, depth=depth, **link)
    geometry = LinkGeometry(clean.arch)
    burst = int(rng.choice([1, 4, 16]))
    rate = max(2 ** -15, min(0.01, 0.3 / (geometry.frame_beats * (geometry.bits + 2))))
    faulty, _ = networks(layers, chips, 1, 2, lanes=lanes, depth=depth, link_error_rate=rate,
                         link_burst_cycles=burst, link_error_seed=seed + 1, **link)
    batch = int(rng.integers(1, 21))
    x = rng.integers(-128, 128, (batch, n_in), dtype=np.int8)
    options = {}
    if rng.random() < 0.3:
        options["host_pattern"] = HostPattern(seed=seed, out_duty=0.5, out_burst=4.0, in_duty=0.5)
    result, reference = run(faulty, x, batch, **options), run(clean, x, batch, **options)
    np.testing.assert_array_equal(result.out_flits, reference.out_flits)
    for k, times in enumerate(result.timing.link_times):
        offers, rooms = link_boundary(faulty, result, k)
        seed_k = link_seed(faulty.arch.link_error_seed, k)
        sim = simulate_link(geometry, faulty.links[k].inference_flits, offers, rooms,
                            fwd=ChannelFlips(seed_k, geometry.bits, rate, burst),
                            ret=ChannelFlips(ret_seed(seed_k), geometry.bits, rate, burst))
        for name in ("accept", "close", "send", "received", "deliver"):
            np.testing.assert_array_equal(getattr(sim, name), getattr(times, name), err_msg=f"link {k} {name}")
        assert result.links[k].counters["undetected"] == 0
