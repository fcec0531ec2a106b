"""The inter-chip link (hdl/link.py) in Amaranth's simulator against a plain-Python golden model.

The golden model (:class:`Scoreboard`) watches the sender's wire before the fault injector and the flit
streams at both ends: every frame on the wire must decode (LinkFormat, CRC computed in Python), carry the
next sequence number or a resend of an unacknowledged one with the same flits, respect the receiver's
credit (seq < frames the receiver has emptied + credit_frames, as seen at the output stream), and the output
must be the input, each flit once, in order.
"""
import random

import pytest
from amaranth.hdl import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out
from amaranth.sim import Simulator

from flowtile.arch import Arch, ArchError
from flowtile.hdl.link import (FRAME_CRC, Deserializer, Link, LinkChannel, LinkFormat, LinkRx, LinkTx, Serializer, lfsr_seed, lfsr_step,
                               lfsr_step_matrix)

pytestmark = [pytest.mark.filterwarnings("ignore:.*created but never used"),
              pytest.mark.usefixtures("collect_unused_components")]

#: A small chip: 19-bit flits (16 data + row + col + host).
ARCH = Arch(rows=2, cols=2, lanes=2, sram_bytes=64, max_tile_outputs=4)
SMALL = dict(bits=4, frame_flits=4, credit_frames=4, replay_frames=4, latency=6)


class Scoreboard:
    """Go-back-N golden model: checks each frame the sender puts on the wire, and the output order."""

    def __init__(self, fmt: LinkFormat, sent: list[int]):
        self.fmt, self.sent = fmt, sent
        self.frames = []          # unwrapped seq -> flits, as first sent
        self.frame_end = []       # unwrapped seq -> index in `sent` after its last flit
        self.beats = []
        self.resends = 0

    def wire_beat(self, valid, first, data):
        if not valid:
            return
        if first:
            self.beats = []
        self.beats.append(data)
        if len(self.beats) == self.fmt.frame_beats:
            word = sum(beat << (i * self.fmt.bits) for i, beat in enumerate(self.beats))
            self.beats = []
            return word

    def frame(self, word, delivered):
        ok, seq, flits = self.fmt.decode_frame(word)
        assert ok, "the sender put a frame with a bad CRC on the wire"
        modulus = 1 << self.fmt.seq_bits
        base = len(self.frames)
        diff = (seq - base) % modulus
        if diff >= modulus // 2:
            diff -= modulus
        unwrapped = base + diff
        assert unwrapped <= base, f"frame {unwrapped} skips ahead of {base}"
        if unwrapped == base:       # a new frame: the next flits of the input, in order
            start = self.frame_end[-1] if self.frame_end else 0
            assert flits == self.sent[start:start + len(flits)], f"frame {unwrapped} does not carry the next flits"
            self.frames.append(flits)
            self.frame_end.append(start + len(flits))
        else:                       # a resend: the same flits as first sent
            assert flits == self.frames[unwrapped], f"resent frame {unwrapped} differs"
            self.resends += 1
        # Credit: the receiver has room for frame `unwrapped` (frames emptied <= frames fully delivered).
        emptied = sum(1 for end in self.frame_end if end <= delivered)
        assert unwrapped < emptied + self.fmt.credit_frames, \
            f"frame {unwrapped} sent without credit ({emptied} frames emptied)"
        assert unwrapped >= emptied - self.fmt.replay_frames - self.fmt.credit_frames


def run_link(dut, flits, *, in_stall=0.0, out_stall=0.0, seed=0, max_cycles=20000, monitor=True,
             out_hold=0):
    """Drive ``flits`` through ``dut`` (a :class:`Link`) with seeded random stalls on both ends.

    ``out_hold``: the receiver takes nothing for that many cycles first. Returns
    ``(received, out_cycles, counters, scoreboard)``."""
    rng = random.Random(seed)
    fmt = dut.format
    board = Scoreboard(fmt, flits)
    received, out_cycles, counters = [], [], {}

    async def testbench(ctx):
        index, cycle, valid = 0, 0, False
        while len(received) < len(flits) and cycle < max_cycles:
            # producer: valid stays up until the transfer
            if not valid and index < len(flits) and rng.random() >= in_stall:
                valid = True
                ctx.set(dut.i.payload.as_value(), flits[index])
            ctx.set(dut.i.valid, valid)
            took = valid and ctx.get(dut.i.ready)
            # consumer
            ready = cycle >= out_hold and rng.random() >= out_stall
            ctx.set(dut.o.ready, ready)
            if ready and ctx.get(dut.o.valid):
                received.append(ctx.get(dut.o.payload.as_value()))
                out_cycles.append(cycle)
            if monitor:
                word = board.wire_beat(ctx.get(dut.tx.o_wire.valid), ctx.get(dut.tx.o_wire.first),
                                       ctx.get(dut.tx.o_wire.data))
                if word is not None:
                    board.frame(word, len(received))
            await ctx.tick()
            cycle += 1
            if took:
                index, valid = index + 1, False
        for name, _ in dut.signature.members.items():
            if name not in ("i", "o"):
                counters[name] = ctx.get(getattr(dut, name))
        counters["cycles"] = cycle

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    return received, out_cycles, counters, board


def random_flits(fmt, n, seed):
    rng = random.Random(seed)
    return [rng.getrandbits(fmt.flit_bits) for _ in range(n)]


# --- golden format --------------------------------------------------------------------------------------------
def test_format_round_trip_and_geometry():
    fmt = LinkFormat(ARCH, bits=4, frame_flits=4, credit_frames=4, replay_frames=4)
    assert fmt.flit_bits == 19 and fmt.seq_bits == 4 and fmt.count_bits == 2
    assert fmt.payload_bits == 4 + 2 + 4 * 19
    assert fmt.frame_beats == -(-fmt.payload_bits // 4) + 32 // 4 == 29
    assert fmt.ret_beats == -(-(2 * 4 + 1) // 4) + 16 // 4 == 7
    word = fmt.encode_frame(19, [1, 2, 3])
    assert fmt.decode_frame(word) == (True, 3, [1, 2, 3])
    assert not fmt.decode_frame(word ^ (1 << 40))[0]
    assert not fmt.decode_frame(word ^ (1 << (fmt.payload_beats * 4 + 5)))[0]
    # The CRC is CRC-32/ISO-HDLC over the payload's 4-bit beats, as amaranth.lib.crc computes it.
    from amaranth.lib.crc import catalog
    beats = [word >> (4 * i) & 15 for i in range(fmt.payload_beats)]
    assert word >> (4 * fmt.payload_beats) == catalog.CRC32_ISO_HDLC(4).compute(beats)
    msg = fmt.encode_message(5, 3, 1)
    assert fmt.decode_message(msg) == (True, 5, 3, 1)
    assert not fmt.decode_message(msg ^ 2)[0]
    # Defaults: flit 69 bits, 4 wire bits, frames of 4 flits.
    default = LinkFormat(Arch())
    assert (default.bits, default.frame_flits, default.credit_frames, default.replay_frames) == (4, 4, 8, 8)
    assert default.frame_beats == -(-(5 + 2 + 4 * 69) // 4) + 8 == 79


def test_lfsr_matrix_matches_steps():
    state = lfsr_seed(12345, 3)
    masks = lfsr_step_matrix(16)
    stepped = state
    for _ in range(16):
        stepped = lfsr_step(stepped)
    assert stepped == sum((bin(state & mask).count("1") & 1) << i for i, mask in enumerate(masks))


# --- (a) no faults: every flit once, in order, at the formula's throughput ---------------------------------------
def test_no_faults_in_order_and_throughput():
    dut = Link(ARCH, **SMALL)
    fmt = dut.format
    flits = random_flits(fmt, 160, seed=1)
    received, cycles, counters, board = run_link(dut, flits)
    assert received == flits
    assert counters["tx_replays"] == counters["rx_crc_errors"] == counters["tx_ret_crc_errors"] == 0
    assert counters["tx_frames_sent"] == counters["rx_frames_accepted"] == 40 and board.resends == 0
    # Steady state: one full frame per frame_beats cycles, i.e.
    #   flits/cycle = frame_flits / (ceil((seq_bits + count_bits + frame_flits * flit_bits) / bits) + ceil(32 / bits))
    # = 4 / (ceil(82 / 4) + 8) = 4 / 29 here: link_bits_per_cycle times the framing efficiency 76 / 116.
    first, last = 40, 159
    measured = (last - first) / (cycles[last] - cycles[first])
    expected = fmt.frame_flits / fmt.frame_beats
    assert expected == 4 / 29
    assert measured == pytest.approx(expected, rel=0.03), (measured, expected)


def test_random_stalls_both_ends():
    dut = Link(ARCH, **SMALL)
    flits = random_flits(dut.format, 60, seed=2)
    received, _, counters, _ = run_link(dut, flits, in_stall=0.5, out_stall=0.6, seed=3)
    assert received == flits
    assert counters["rx_overflows"] == 0 and counters["tx_replays"] == 0


def test_single_flit_frames_and_one_wire_bit():
    dut = Link(ARCH, bits=1, frame_flits=1, credit_frames=2, replay_frames=3, latency=4)
    flits = random_flits(dut.format, 8, seed=4)
    received, _, counters, _ = run_link(dut, flits, in_stall=0.3, out_stall=0.3, seed=5)
    assert received == flits and counters["rx_overflows"] == 0


# --- (b) receiver stalled: credits, nothing dropped ------------------------------------------------------------------
def test_receiver_stalled_nothing_dropped():
    dut = Link(ARCH, **SMALL)
    fmt = dut.format
    flits = random_flits(fmt, 48, seed=6)
    # The receiver takes nothing for 1500 cycles: the sender must stop after credit_frames frames.
    received, _, counters, board = run_link(dut, flits, out_hold=1500, out_stall=0.7, seed=7)
    assert received == flits
    assert counters["rx_overflows"] == 0 and counters["rx_seq_errors"] == 0 and counters["tx_replays"] == 0
    assert counters["tx_frames_sent"] == counters["rx_frames_accepted"] == 12


# --- (c) bit errors: still exactly once, in order; errors and replays reported ---------------------------------------
def test_bit_errors_recovered_and_counted():
    dut = Link(ARCH, **SMALL, error_rate=0.002, seed=99)
    flits = random_flits(dut.format, 80, seed=8)
    received, _, counters, board = run_link(dut, flits, in_stall=0.2, out_stall=0.3, seed=9)
    assert received == flits
    assert counters["fwd_flips"] > 0 and counters["ret_flips"] > 0
    assert counters["rx_crc_errors"] > 0
    assert counters["tx_replays"] > 0 and board.resends > 0
    assert counters["tx_frames_sent"] > counters["rx_frames_accepted"]
    assert counters["rx_overflows"] == 0


# --- (d) corrupted acks/credits recovered ---------------------------------------------------------------------------
def test_corrupted_messages_recovered():
    """Faults on the return channel only: acks, credits and NAKs get lost; the periodic cumulative
    messages and the sender's timeout recover every one of them."""
    dut = Link(ARCH, **SMALL, error_rate=0.0, ret_error_rate=0.01, seed=5)
    flits = random_flits(dut.format, 48, seed=10)
    received, _, counters, _ = run_link(dut, flits, out_stall=0.6, seed=11)
    assert received == flits
    assert counters["fwd_flips"] == 0 and counters["rx_crc_errors"] == 0
    assert counters["ret_flips"] > 0 and counters["tx_ret_crc_errors"] > 0
    assert counters["rx_overflows"] == 0


def test_lost_nak_recovered_by_timeout():
    dut = Link(ARCH, **SMALL, error_rate=0.003, ret_error_rate=0.02, seed=21)
    flits = random_flits(dut.format, 40, seed=12)
    received, _, counters, _ = run_link(dut, flits, seed=13, max_cycles=30000)
    assert received == flits
    assert counters["tx_timeouts"] > 0 and counters["tx_ret_crc_errors"] > 0 and counters["rx_crc_errors"] > 0


# --- one run at the defaults ----------------------------------------------------------------------------------------
def test_defaults_with_errors():
    arch = Arch(link_error_rate=0.0005, link_error_seed=7)
    dut = Link(arch)
    fmt = dut.format
    assert (fmt.bits, dut.fwd.latency, fmt.frame_beats) == (4, 64, 79)
    flits = random_flits(fmt, 24, seed=14)
    received, _, counters, board = run_link(dut, flits, seed=15)
    assert received == flits and counters["rx_overflows"] == 0
    assert counters["fwd_flips"] > 0 and counters["tx_replays"] > 0 and board.resends > 0


# --- (e) parameter validation -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, error, message", [
    (lambda: LinkChannel(0, latency=4), ValueError, "LinkChannel: parameter 'bits' = 0 is outside 1..1024"),
    (lambda: LinkChannel(4, latency=0), ValueError, "LinkChannel: parameter 'latency' = 0 is outside 1..65536"),
    (lambda: LinkChannel(4, latency=2.5), TypeError, "LinkChannel: parameter 'latency' must be an integer, got 2.5"),
    (lambda: LinkChannel(4, latency=4, error_rate=0.6), ValueError,
     "LinkChannel: parameter 'error_rate' = 0.6 is outside 0.0..0.5"),
    (lambda: LinkChannel(4, latency=4, error_rate=1e-6), ValueError,
     "LinkChannel: parameter 'error_rate' = 1e-06 is below the injector's resolution 2**-17"),
    (lambda: LinkChannel(4, latency=4, error_rate="x"), TypeError,
     "LinkChannel: parameter 'error_rate' must be a number, got 'x'"),
    (lambda: LinkChannel(4, latency=4, seed=0), ValueError,
     "LinkChannel: parameter 'seed' = 0 is outside 1..4294967295"),
    (lambda: LinkTx(ARCH, frame_flits=0), ValueError, "LinkTx: parameter 'frame_flits' = 0 is outside 1..64"),
    (lambda: LinkTx(ARCH, credit_frames=300), ValueError, "LinkTx: parameter 'credit_frames' = 300 is outside 1..256"),
    (lambda: LinkTx(ARCH, replay_frames=True), TypeError, "LinkTx: parameter 'replay_frames' must be an integer"),
    (lambda: LinkTx(ARCH, timeout_cycles=0), ValueError, "LinkTx: parameter 'timeout_cycles' = 0 is outside"),
    (lambda: LinkTx(ARCH, latency=-1), ValueError, "LinkTx: parameter 'latency' = -1 is outside 1..65536"),
    (lambda: LinkTx("arch"), TypeError, "LinkTx: parameter 'arch' must be a flowtile.arch.Arch"),
    (lambda: LinkRx(ARCH, bits=2000), ValueError, "LinkRx: parameter 'bits' = 2000 is outside 1..1024"),
    (lambda: Link(ARCH, ret_error_rate=0.9), ValueError,
     "LinkChannel: parameter 'error_rate' = 0.9 is outside 0.0..0.5"),
])
def test_component_validation(make, error, message):
    with pytest.raises(error) as info:
        make()
    assert message in str(info.value)


@pytest.mark.parametrize("changes, message", [
    ({"chips": 0}, "arch field 'chips' = 0 is invalid: must be in 1..256"),
    ({"chip_topology": "mesh"}, "arch field 'chip_topology' = 'mesh' is invalid: must be 'line' or 'ring'"),
    ({"chip_topology": "ring"}, "'ring' is invalid with chips = 1: a ring needs at least 2 chips"),
    ({"link_bits_per_cycle": 0}, "arch field 'link_bits_per_cycle' = 0 is invalid: must be in 1..69"),
    ({"link_bits_per_cycle": 2.0}, "arch field 'link_bits_per_cycle' must be an integer, got 2.0"),
    ({"link_latency_cycles": 0}, "arch field 'link_latency_cycles' = 0 is invalid: must be in 1..65536"),
    ({"link_frame_flits": 65}, "arch field 'link_frame_flits' = 65 is invalid: must be in 1..64"),
    ({"link_credit_frames": 0}, "arch field 'link_credit_frames' = 0 is invalid: must be in 1..256"),
    ({"link_replay_frames": 0}, "arch field 'link_replay_frames' = 0 is invalid: must be in 1..256"),
    ({"link_error_rate": -0.1}, "arch field 'link_error_rate' = -0.1 is invalid: must be in 0.0..0.5"),
    ({"link_error_rate": "0.1"}, "arch field 'link_error_rate' must be a number, got '0.1'"),
    ({"link_error_rate": 1e-7}, "below the injector's resolution 2**-17"),
    ({"link_error_seed": 0}, "arch field 'link_error_seed' = 0 is invalid: must be in 1..4294967295"),
])
def test_arch_link_field_validation(changes, message):
    with pytest.raises(ArchError) as info:
        Arch(**changes)
    assert message in str(info.value)


def test_arch_link_defaults_and_old_programs():
    arch = Arch()
    assert (arch.chips, arch.chip_topology, arch.link_latency_cycles, arch.link_error_rate) == (1, "line", 64, 0.0)
    assert arch.link_bits_per_cycle is None and arch.link_bits == arch.flit_bits // 16 == 4
    assert Arch(lanes=1, sram_bytes=1024).link_bits == 1   # 13-bit flits
    assert Arch(lanes=32).link_bits == (256 + 2 + 2 + 1) // 16
    assert Arch(link_bits_per_cycle=7).link_bits == 7
    assert Arch(chips=3, chip_topology="ring").chip_topology == "ring"
    # A program.json arch written before these fields existed loads with the defaults.
    old = {"rows": 4, "cols": 4, "lanes": 8, "sram_bytes": 32768, "max_tile_outputs": 512, "router_fifo_depth": 4,
           "forward_queue_words": 1024, "host_buffer_flits": 65536}
    assert Arch.from_dict(old) == Arch()
    assert Arch.from_dict(Arch(chips=2, link_error_rate=0.01).to_dict()) == Arch(chips=2, link_error_rate=0.01)


def test_converts_to_rtlil():
    """Every piece elaborates into a netlist (comb-read memories, LFSRs, CRC processors)."""
    from amaranth.back import rtlil
    text = rtlil.convert(Link(ARCH, **SMALL, error_rate=0.01), name="link")
    assert "module \\link" in text


@pytest.mark.parametrize("error_rate", [0.0, 0.05])
def test_channel_latency_and_injector_golden(error_rate):
    """LinkChannel alone: output = input ``latency`` cycles later, XOR the flips a plain-Python model of the
    per-bit LFSRs predicts; the flip counter counts them; the flip rate is near error_rate."""
    from flowtile.hdl.link import error_threshold
    bits, latency, seed, cycles = 3, 5, 4242, 600
    dut = LinkChannel(bits, latency=latency, error_rate=error_rate, seed=seed)
    threshold = error_threshold("test", error_rate)
    width = bits + 2
    states = [lfsr_seed(seed, b) for b in range(width)]
    rng = random.Random(1)
    inputs = [rng.getrandbits(width) for _ in range(cycles)]
    seen = []

    async def testbench(ctx):
        for cycle in range(cycles):
            word = inputs[cycle]
            ctx.set(dut.i.data, word & ((1 << bits) - 1))
            ctx.set(dut.i.valid, word >> bits & 1)
            ctx.set(dut.i.first, word >> (bits + 1) & 1)
            seen.append(ctx.get(dut.o.data) | ctx.get(dut.o.valid) << bits | ctx.get(dut.o.first) << (bits + 1))
            await ctx.tick()
        seen.append(ctx.get(dut.flips))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    flips_counted = seen.pop()
    flips = 0
    for cycle in range(cycles):
        mask = 0
        for b in range(width):
            if (states[b] & 0xFFFF) < threshold:
                mask |= 1 << b
            for _ in range(16):
                states[b] = lfsr_step(states[b])
        sent = inputs[cycle - latency] if cycle >= latency else 0
        assert seen[cycle] == sent ^ mask, cycle
        flips += bin(mask).count("1")
    assert flips_counted == flips
    if error_rate == 0:
        assert flips == 0
    else:
        assert flips / (cycles * width) == pytest.approx(error_rate, rel=0.25)


# --- serializer and deserializer alone ----------------------------------------------------------------------------

class _SerDes(wiring.Component):
    """A Serializer wired straight into a Deserializer, with a one-bit fault on the wire (``flip``)."""

    def __init__(self, bits, payload_beats):
        crc = FRAME_CRC(data_width=bits)
        self.ser = Serializer(bits, payload_beats, crc)
        crc_beats = -(-crc.algorithm.crc_width // bits)
        self.des = Deserializer(bits, payload_beats + crc_beats, payload_beats, crc)
        super().__init__({"payload": In(payload_beats * bits), "load": In(1), "free": Out(1), "flip": In(1),
                          "valid": Out(1), "crc_ok": Out(1), "word": Out(bits * (payload_beats + crc_beats))})

    def elaborate(self, platform):
        m = Module()
        m.submodules.ser, m.submodules.des = self.ser, self.des
        m.d.comb += [self.ser.payload.eq(self.payload), self.ser.load.eq(self.load), self.free.eq(self.ser.free),
                     self.des.wire.valid.eq(self.ser.wire.valid), self.des.wire.first.eq(self.ser.wire.first),
                     self.des.wire.data.eq(self.ser.wire.data ^ self.flip),
                     self.valid.eq(self.des.valid), self.crc_ok.eq(self.des.crc_ok), self.word.eq(self.des.word)]
        return m


def test_serializer_to_deserializer_round_trip_and_crc_check():
    """Words go through back to back; the deserializer's word equals the payload, and its CRC check fails exactly
    for the words whose wire carried a flipped bit (golden model: the payload and the injected flips)."""
    bits, payload_beats = 5, 3
    dut = _SerDes(bits, payload_beats)
    rng = random.Random(7)
    words = [(rng.getrandbits(bits * payload_beats), rng.random() < 0.3) for _ in range(40)]
    received = []

    async def testbench(ctx):
        pending = list(words)
        flip_word = None
        for _ in range(40 * 20):
            if pending and ctx.get(dut.free):
                payload, corrupt = pending.pop(0)
                ctx.set(dut.payload, payload)
                ctx.set(dut.load, 1)
                flip_word = corrupt
            else:
                ctx.set(dut.load, 0)
            ctx.set(dut.flip, int(bool(flip_word) and rng.random() < 0.2))
            await ctx.tick()
            if ctx.get(dut.valid):
                received.append((ctx.get(dut.word) & ((1 << bits * payload_beats) - 1), ctx.get(dut.crc_ok)))
            if len(received) == len(words):
                break

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    assert len(received) == len(words)
    for (payload, _), (word, crc_ok) in zip(words, received):
        if crc_ok:
            assert word == payload
    assert any(not ok for _, ok in received) and sum(ok for _, ok in received) >= len(words) // 2


@pytest.mark.parametrize("make, message", [
    (lambda: Serializer(0, 3, FRAME_CRC(data_width=4)), "'bits' must be an integer >= 1"),
    (lambda: Serializer(4, 0, FRAME_CRC(data_width=4)), "'payload_beats' must be an integer >= 1"),
    (lambda: Deserializer(4, 2, 1, FRAME_CRC(data_width=4)), "do not fit 2 beats of 4 bits"),
    (lambda: Deserializer(4, 9, -1, FRAME_CRC(data_width=4)), "'crc_after' must be an integer >= 0"),
])
def test_serdes_parameter_validation(make, message, collect_unused_components):
    with pytest.raises(ValueError, match=message):
        make()
