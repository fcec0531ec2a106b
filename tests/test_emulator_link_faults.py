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

from flowtile.arch import Arch
from flowtile.emulator.link_faults import LINK_COUNTERS, ChannelFlips, simulate_link
from flowtile.hdl.link import Link
from flowtile.link_faults import (CRC16_IBM_3740, CRC32_ISO_HDLC, crc_compute, link_seed, reference_flips,
                                  ret_seed)

pytestmark = [pytest.mark.filterwarnings("ignore:.*created but never used")]

ARCH = Arch(rows=2, cols=2, lanes=2, sram_bytes=64, max_tile_outputs=4)
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
def rtl_link(link_kwargs, inference_flits, flits, offers, rooms, cycles):
    """Run ``Link(ARCH, **link_kwargs)`` for ``cycles`` cycles from run cycle 0: flit ``i`` offered from
    ``offers[i]``, the output ready for flit ``i`` from ``rooms[i]``. Returns accept and deliver cycles, the
    delivered payloads and the counters after the last cycle."""
    dut = Link(ARCH, **link_kwargs)
    accept, deliver, out = [], [], []
    counters = {}

    async def testbench(ctx):
        ctx.set(dut.run, 1)
        ctx.set(dut.inference_flits, inference_flits)
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
    flits = [rng.getrandbits(fmt.flit_bits) for _ in range(n)]
    offers = random_times(rng, n, 40 if stalls else 3)
    rooms = random_times(rng, n, 60 if stalls else 2, start=rng.randrange(50))
    kwargs = dict(SMALL, error_rate=error_rate, burst_cycles=burst, seed=seed)
    fwd = ChannelFlips(seed, fmt.bits, error_rate, burst)
    ret = ChannelFlips(ret_seed(seed), fmt.bits, error_rate, burst)
    model = simulate_link(fmt, inference_flits, offers, rooms, fwd=fwd, ret=ret)
    cycles = int(model.deliver[-1]) + 30
    accept, deliver, out, counters = rtl_link(kwargs, inference_flits, flits, offers, rooms, cycles)
    host = fmt.flit_layout["dest_host"].offset
    assert out == [f & ~(1 << host) for f in flits]
    assert accept == model.accept.tolist()
    assert deliver == model.deliver.tolist()
    model = simulate_link(fmt, inference_flits, offers, rooms, fwd=ChannelFlips(seed, fmt.bits, error_rate, burst),
                          ret=ChannelFlips(ret_seed(seed), fmt.bits, error_rate, burst), end=cycles - 1)
    expected = {name: model.counters[name] for name in counters}
    assert counters == expected
    assert model.counters["undetected"] == 0
