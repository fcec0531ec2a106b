"""The inter-chip link (hdl/link.py) in Amaranth's simulator against a plain-Python golden model.

The golden model (:class:`Scoreboard`) watches the sender's wire before the fault injector and the flit
streams at both ends: every frame on the wire must decode (LinkFormat, CRC computed in Python), carry the
next sequence number or a resend of an unacknowledged one (the same bits), hold the flits static framing
puts in it (dense frames: the carried lanes of the lane table packed back to back, frames split at inference
boundaries and where the next flit's lanes do not fit, :func:`flowtile.link_format.frame_sizes`), respect the
receiver's credit (seq < frames the receiver has emptied + credit_frames, as seen at the output stream), and the
output must be the input's carried lanes (the others zero) addressed to tile (0,0) (``dest_row = dest_col =
dest_host = 0``), each flit once, in order.

:func:`check_link_contract` checks a fault-free run cycle by cycle against the timing contract of
flowtile/link_format.py (also used by tests/test_hdl_system.py).
"""
import random

import pytest
from amaranth.hdl import Module, Shape
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out
from amaranth.sim import Simulator

from flowtile.arch import Arch, ArchError
from flowtile.testing.archs import lean_arch
from flowtile.hdl.link import (FRAME_CRC, MESSAGE_CRC, Deserializer, LaneSequencer, Link, LinkChannel, LinkFormat,
                               LinkRx, LinkTx, Serializer, lane_table_layout, lfsr_seed, lfsr_step, lfsr_step_matrix,
                               ret_seed)
from flowtile.link_format import (FRAME_CRC_BITS, LINK_LANE_SEGMENTS, MESSAGE_CRC_BITS, LaneSegment, LinkGeometry,
                                  encode_lane_segment, flit_lanes)
from flowtile.link_format import frame_sizes as spec_frame_sizes

pytestmark = [pytest.mark.filterwarnings("ignore:.*created but never used"),
              pytest.mark.usefixtures("collect_unused_components")]

#: A small chip: 19-bit flits (16 data + row + col + host).
ARCH = lean_arch(rows=2, cols=2, lanes=2, sram_bytes=64, max_tile_outputs=4)
#: Eight lanes (67-bit flits): lane tables with up to 8 lanes a flit.
ARCH8 = lean_arch(rows=1, cols=2, lanes=8, sram_bytes=64, max_tile_outputs=8)
SMALL = dict(bits=4, frame_flits=4, credit_frames=4, replay_frames=4, latency=6)


def stream_lanes(inference_flits: int, total: int, lanes: int, segments=()) -> list[int]:
    """Lanes carried by each of the first ``total`` flits of a link's stream (the lane table restarts with every
    inference of ``inference_flits`` flits; 0: one endless inference)."""
    if inference_flits == 0:
        return [int(c) for c in flit_lanes(segments, total, lanes)]
    one = flit_lanes(segments, inference_flits, lanes)
    return [int(one[j % inference_flits]) for j in range(total)]


def frame_sizes(inference_flits: int, total: int, frame_flits: int, lanes: int = 1, segments=()) -> list[int]:
    """Golden static framing: the sizes of the frames of ``total`` flits of ``lanes`` lanes with lane table
    ``segments``, frames of ``frame_flits * lanes`` bytes never spanning an inference of ``inference_flits`` flits
    (0: no boundary; the spec's :func:`flowtile.link_format.frame_sizes` per inference); a trailing frame the flits
    do not fill (which would take more flits) is left out."""
    frame_bytes = frame_flits * lanes
    if inference_flits == 0:
        # the flits after `total` (by the table) decide whether the last frames are closed
        per_stream = spec_frame_sizes(flit_lanes(segments, total + frame_bytes + 1, lanes), frame_bytes)
    else:
        per_stream = spec_frame_sizes(flit_lanes(segments, inference_flits, lanes), frame_bytes)
    sizes, used = [], 0
    while True:
        for size in per_stream:
            if used + size > total:
                return sizes
            sizes.append(int(size))
            used += size
        if inference_flits == 0:
            return sizes


def data_of(fmt: LinkFormat, flit: int) -> int:
    """``flit``'s data field (the low ``flit_data_bits`` bits)."""
    return flit & ((1 << fmt.flit_data_bits) - 1)


def carried_data(fmt: LinkFormat, flit: int, lanes: int) -> int:
    """What crosses the wire of ``flit`` carrying ``lanes`` lanes: lanes ``0 .. lanes - 1`` of its data."""
    return flit & ((1 << 8 * lanes) - 1)


def rebuilt(fmt: LinkFormat, flit: int, lanes: int | None = None) -> int:
    """``flit`` as the link delivers it: its carried lanes (default all), the others zero, ``dest_row = dest_col =
    dest_host = 0`` (tile (0,0))."""
    layout = fmt.flit_layout
    assert layout["data"].offset == 0 and layout.size == fmt.arch.flit_bits
    return carried_data(fmt, flit, fmt.lanes if lanes is None else lanes)


def table_value(arch: Arch, segments) -> int:
    """The lane table port's value for ``segments`` (unused entries 0): entry ``s`` is encode_lane_segment, from bit
    ``s`` times the entry's size."""
    entry = lane_table_layout(arch).elem_shape.size
    padded = list(segments) + [None] * (LINK_LANE_SEGMENTS - len(segments))
    return sum(encode_lane_segment(segment, arch.lanes) << (s * entry) for s, segment in enumerate(padded))


class Scoreboard:
    """Go-back-N golden model: checks each frame the sender puts on the wire, and the output order."""

    def __init__(self, fmt: LinkFormat, sent: list[int], inference_flits: int = 0, segments=()):
        self.fmt = fmt
        self.carried = stream_lanes(inference_flits, len(sent), fmt.lanes, segments)
        self.sent = [carried_data(fmt, flit, lanes) for flit, lanes in zip(sent, self.carried)]
        self.sizes = frame_sizes(inference_flits, len(sent), fmt.frame_flits, fmt.lanes, segments)
        self.frames = []          # unwrapped seq -> flits (the carried data), as first sent
        self.words = []           # unwrapped seq -> the frame's bits, as first sent
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
        ok, seq, count, _ = self.fmt.decode_frame_area(word)
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
            assert count == self.sizes[unwrapped], \
                f"frame {unwrapped} has {count} flits, static framing says {self.sizes[unwrapped]}"
            _, _, flits = self.fmt.decode_frame(word, self.carried[start:])
            assert flits == self.sent[start:start + count], f"frame {unwrapped} does not carry the next flits"
            # the whole frame, bit for bit: dense data area (unused bytes zero), count, seq, CRC
            assert word == self.fmt.encode_frame(seq, flits, self.carried[start:start + count])
            self.frames.append(flits)
            self.words.append(word)
            self.frame_end.append(start + count)
        else:                       # a resend: the same frame as first sent
            assert word == self.words[unwrapped], f"resent frame {unwrapped} differs"
            self.resends += 1
        # Credit: the receiver has room for frame `unwrapped` (frames emptied <= frames fully delivered).
        emptied = sum(1 for end in self.frame_end if end <= delivered)
        assert unwrapped < emptied + self.fmt.credit_frames, \
            f"frame {unwrapped} sent without credit ({emptied} frames emptied)"
        assert unwrapped >= emptied - self.fmt.replay_frames - self.fmt.credit_frames


class LinkProbe:
    """Records, each cycle, what :func:`check_link_contract` needs of a :class:`Link` (inside a larger design too)."""

    def __init__(self, link: Link):
        self.link = link
        self.cycles = []

    def sample(self, ctx):
        link = self.link
        self.cycles.append(dict(
            i_valid=ctx.get(link.i.valid), i_ready=ctx.get(link.i.ready),
            o_valid=ctx.get(link.o.valid), o_ready=ctx.get(link.o.ready),
            wire_first=ctx.get(link.tx.o_wire.valid) and ctx.get(link.tx.o_wire.first),
            ret_first=ctx.get(link.rx.o_ret.valid) and ctx.get(link.rx.o_ret.first),
            accepted=ctx.get(link.rx_frames_accepted), ack=ctx.get(link.tx_ack), freed=ctx.get(link.tx_freed),
            o_dest=tuple(int(ctx.get(getattr(link.o.payload, name)))
                         for name in ("dest_row", "dest_col", "dest_host"))))


def check_link_contract(fmt: LinkGeometry, inference_flits: int, cycles: list[dict], segments=()) -> dict:
    """Check a fault-free run of a link against the timing contract of flowtile/link_format.py, cycle by cycle.

    ``cycles[t]`` (:class:`LinkProbe`) is cycle ``t`` of the run (``run = 1`` from cycle 0); ``segments`` is the
    link's lane table (the frames follow from it: :func:`frame_sizes`). From what the
    neighbours did (the cycles the sender's input offered flits, the receiver's output took them), the contract's
    formulas give every other event; each must be observed in exactly that cycle: when the sender takes each flit
    (the first of a frame no earlier than close + 1 of the one before), the serializer loads of frames (``send_f``,
    one cycle before beat 0), the receiver's accepts (``send_f + accept_delay``), the cycles each flit is offered
    (first one the cycle after the accept), the message starts (``m * ret_beats``) and the sender's ``ack`` and
    ``freed`` registers in every cycle (``ack_seen``, ``freed_seen``). Returns counts of what was checked and of
    the frames whose close waited for an ack (window) and whose send waited for credit."""
    F, FB, RB = fmt.frame_flits, fmt.frame_beats, fmt.ret_beats
    R, C, MD, AD = fmt.replay_frames, fmt.credit_frames, fmt.message_delay, fmt.accept_delay
    T = len(cycles)
    col = {name: [c[name] for c in cycles] for name in cycles[0]}
    takes = [t for t in range(T) if col["i_valid"][t] and col["i_ready"][t]]
    delivers = [t for t in range(T) if col["o_valid"][t] and col["o_ready"][t]]
    sends = [t - 1 for t in range(T) if col["wire_first"][t]]
    accepts = [t for t in range(T - 1) if col["accepted"][t + 1] != col["accepted"][t]]
    starts = [t - 1 for t in range(T) if col["ret_first"][t]]

    def next_message(t):
        return -(-t // RB) * RB

    sizes = frame_sizes(inference_flits, len(takes), F, fmt.lanes, segments)
    assert sum(sizes) == len(takes), f"{len(takes)} flits taken, not a whole number of frames {sizes}"
    assert len(delivers) == len(takes), "every flit taken must have been delivered by the end of the trace"
    ends = [sum(sizes[:f + 1]) for f in range(len(sizes))]
    close, send, accept, ack_seen, freed_seen = [], [], [], [], []
    window_bound = credit_bound = 0
    for f, size in enumerate(sizes):
        c = takes[ends[f] - 1] + 1
        if f:
            c = max(c, close[f - 1] + 1)
        if f >= R and ack_seen[f - R] > c:
            c, window_bound = ack_seen[f - R], window_bound + 1
        close.append(c)
        s = c + 1
        if f:
            s = max(s, send[f - 1] + FB)
        if f >= C and freed_seen[f - C] > s:
            s, credit_bound = freed_seen[f - C], credit_bound + 1
        send.append(s)
        accept.append(s + AD)
        ack_seen.append(next_message(accept[f] + 1) + MD)
        freed_seen.append(next_message(delivers[ends[f] - 1] + 1) + MD)
    assert sends == send, f"serializer loads {sends}, contract {send}"
    assert accepts == accept, f"receiver accepts {accepts}, contract {accept}"
    # The sender's input: flit j is taken as soon as offered, the first of frame f no earlier than close_{f-1} + 1.
    first_of = {ends[f]: close[f] + 1 for f in range(len(sizes) - 1)}
    previous = -1
    for j, taken in enumerate(takes):
        offered = next(t for t in range(previous + 1, T) if col["i_valid"][t])
        assert taken == max(offered, first_of.get(j, 0)), f"flit {j} offered in {offered}, taken in {taken}"
        previous = taken
    # The receiver's output: flit j offered from max(accept of its frame + 1, delivery of flit j - 1 + 1).
    valid = [0] * T
    previous = -1
    frame = 0
    for j, delivered in enumerate(delivers):
        while j >= ends[frame]:
            frame += 1
        offer = max(accept[frame] + 1, previous + 1)
        assert delivered >= offer, f"flit {j} delivered in {delivered}, before its offer in {offer}"
        for t in range(offer, delivered + 1):
            valid[t] = 1
        previous = delivered
    mismatch = [t for t in range(T) if valid[t] != col["o_valid"][t]]
    assert not mismatch, f"receiver's o.valid differs from the contract in cycles {mismatch[:10]}"
    # Return messages back to back from cycle 0; the sender's registers follow them message_delay later.
    assert starts == [m * RB for m in range(len(starts))] and starts[-1] >= T - 2 * RB - 1, starts[:10]
    modulus = 1 << fmt.seq_bits
    for t in range(T):
        assert col["ack"][t] == sum(1 for x in ack_seen if x <= t) % modulus, f"sender's ack in cycle {t}"
        assert col["freed"][t] == sum(1 for x in freed_seen if x <= t) % modulus, f"sender's freed in cycle {t}"
    return dict(frames=len(sizes), messages=len(starts), window_bound=window_bound, credit_bound=credit_bound,
                last_freed_seen=freed_seen[-1] if freed_seen else 0)


def run_link(dut, flits, *, in_stall=0.0, out_stall=0.0, seed=0, max_cycles=20000, monitor=True,
             out_hold=0, inference_flits=None, probe=None, tail=0, segments=()):
    """Drive ``flits`` through ``dut`` (a :class:`Link`, ``run = 1`` from cycle 0) with seeded random stalls on
    both ends; ``inference_flits`` (default: all of ``flits``, one inference) and the lane table ``segments`` go to
    its registers.

    ``out_hold``: the receiver takes nothing for that many cycles first; ``probe``: a :class:`LinkProbe` sampled
    every cycle; ``tail``: cycles to run on after the last flit came out. Returns
    ``(received, out_cycles, counters, scoreboard)``."""
    rng = random.Random(seed)
    fmt = dut.format
    inference_flits = len(flits) if inference_flits is None else inference_flits
    board = Scoreboard(fmt, flits, inference_flits, segments)
    received, out_cycles, counters = [], [], {}

    async def testbench(ctx):
        ctx.set(dut.run, 1)
        ctx.set(dut.inference_flits, inference_flits)
        ctx.set(dut.segments.as_value(), table_value(fmt.arch, segments))
        index, cycle, valid, extra = 0, 0, False, 0
        while (len(received) < len(flits) or extra < tail) and cycle < max_cycles:
            if len(received) == len(flits):
                extra += 1
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
            if probe is not None:
                probe.sample(ctx)
            await ctx.tick()
            cycle += 1
            if took:
                index, valid = index + 1, False
        for name, _ in dut.signature.members.items():
            if name not in ("i", "o", "run", "inference_flits", "seed", "segments"):
                counters[name] = ctx.get(getattr(dut, name))
        counters["cycles"] = cycle

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    return received, out_cycles, counters, board


def random_flits(fmt, n, seed):
    rng = random.Random(seed)
    return [rng.getrandbits(fmt.arch.flit_bits) for _ in range(n)]


def delivered(fmt, flits, inference_flits=0, segments=()):
    """What the link's output carries for ``flits`` (whole flits, random destinations): their carried lanes (the
    lane table ``segments``, restarting every ``inference_flits`` flits), the others zero, addressed to tile
    (0,0)."""
    carried = stream_lanes(inference_flits, len(flits), fmt.lanes, segments)
    return [rebuilt(fmt, flit, lanes) for flit, lanes in zip(flits, carried)]


# --- golden format --------------------------------------------------------------------------------------------
def test_format_round_trip_and_geometry():
    fmt = LinkFormat(ARCH, bits=4, frame_flits=4, credit_frames=4, replay_frames=4)
    # only the 16 data bits of a 19-bit flit cross
    # count_bits: a frame of 4 * 2 bytes holds up to 8 one-lane flits
    assert (ARCH.flit_bits, fmt.flit_data_bits, fmt.seq_bits, fmt.frame_bytes, fmt.count_bits) == (19, 16, 4, 8, 3)
    assert fmt.payload_bits == 4 + 3 + 4 * 16
    assert fmt.frame_beats == -(-fmt.payload_bits // 4) + 32 // 4 == 26
    assert fmt.ret_beats == -(-(2 * 4 + 1) // 4) + 16 // 4 == 7
    word = fmt.encode_frame(19, [1, 2, 0xFFFF])
    assert fmt.decode_frame(word) == (True, 3, [1, 2, 0xFFFF])
    with pytest.raises(AssertionError):
        fmt.encode_frame(0, [1 << 16])       # a flit's data word: 16 bits here
    assert not fmt.decode_frame(word ^ (1 << 40))[0]
    assert not fmt.decode_frame(word ^ (1 << (fmt.payload_beats * 4 + 5)))[0]
    # The CRC is CRC-32/ISO-HDLC over the payload's 4-bit beats, as amaranth.lib.crc computes it.
    from amaranth.lib.crc import catalog
    beats = [word >> (4 * i) & 15 for i in range(fmt.payload_beats)]
    assert word >> (4 * fmt.payload_beats) == catalog.CRC32_ISO_HDLC(4).compute(beats)
    msg = fmt.encode_message(5, 3, 1)
    assert fmt.decode_message(msg) == (True, 5, 3, 1)
    assert not fmt.decode_message(msg ^ 2)[0]
    # Defaults: flit 69 bits of which 64 data cross, 4 wire bits, frames of 16 flits (128 bytes); seq_bits =
    # ceil(log2(2 * (8 + 8))) = 5, count_bits = ceil(log2(128)) = 7.
    default = LinkFormat(lean_arch())
    assert (default.bits, default.frame_flits, default.credit_frames, default.replay_frames) == (4, 16, 8, 8)
    assert (lean_arch().flit_bits, default.flit_data_bits, default.seq_bits, default.count_bits) == (69, 64, 5, 7)
    assert default.payload_bits == 5 + 7 + 16 * 64 == 1036
    assert default.frame_beats == -(-1036 // 4) + 32 // 4 == 267
    # data is 16 * 64 of the frame's 267 * 4 wire bits: 95.9% (frames of 4 whole 69-bit flits: 4 * 64 of 79 * 4, 81.0%)
    assert round(100 * default.flits_bits / (default.frame_beats * default.bits), 1) == 95.9


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
    assert received == delivered(dut.format, flits)
    assert counters["tx_replays"] == counters["rx_crc_errors"] == counters["tx_ret_crc_errors"] == 0
    assert counters["tx_frames_sent"] == counters["rx_frames_accepted"] == 40 and board.resends == 0
    # Steady state: one full frame per frame_beats cycles, i.e.
    #   flits/cycle = frame_flits / (ceil((seq_bits + count_bits + frame_flits * flit_data_bits) / bits)
    #                                + ceil(32 / bits))
    # = 4 / (ceil(71 / 4) + 8) = 4 / 26 here: link_bits_per_cycle times the framing efficiency 64 / 104.
    first, last = 40, 159
    measured = (last - first) / (cycles[last] - cycles[first])
    expected = fmt.frame_flits / fmt.frame_beats
    assert expected == 4 / 26
    assert measured == pytest.approx(expected, rel=0.03), (measured, expected)


def test_random_stalls_both_ends():
    dut = Link(ARCH, **SMALL)
    flits = random_flits(dut.format, 60, seed=2)
    received, _, counters, _ = run_link(dut, flits, in_stall=0.5, out_stall=0.6, seed=3)
    assert received == delivered(dut.format, flits)
    assert counters["rx_overflows"] == 0 and counters["tx_replays"] == 0


def test_single_flit_frames_and_one_wire_bit():
    dut = Link(ARCH, bits=1, frame_flits=1, credit_frames=2, replay_frames=3, latency=4)
    flits = random_flits(dut.format, 8, seed=4)
    received, _, counters, _ = run_link(dut, flits, in_stall=0.3, out_stall=0.3, seed=5)
    assert received == delivered(dut.format, flits) and counters["rx_overflows"] == 0


# --- (b) receiver stalled: credits, nothing dropped ------------------------------------------------------------------
def test_receiver_stalled_nothing_dropped():
    dut = Link(ARCH, **SMALL)
    fmt = dut.format
    flits = random_flits(fmt, 48, seed=6)
    # The receiver takes nothing for 1500 cycles: the sender must stop after credit_frames frames.
    received, _, counters, board = run_link(dut, flits, out_hold=1500, out_stall=0.7, seed=7)
    assert received == delivered(dut.format, flits)
    assert counters["rx_overflows"] == 0 and counters["rx_seq_errors"] == 0 and counters["tx_replays"] == 0
    assert counters["tx_frames_sent"] == counters["rx_frames_accepted"] == 12


# --- (c) bit errors: still exactly once, in order; errors and replays reported ---------------------------------------
def test_bit_errors_recovered_and_counted():
    dut = Link(ARCH, **SMALL, error_rate=0.002, seed=99)
    flits = random_flits(dut.format, 80, seed=8)
    received, _, counters, board = run_link(dut, flits, in_stall=0.2, out_stall=0.3, seed=9)
    assert received == delivered(dut.format, flits)
    assert counters["fwd_flips"] > 0 and counters["ret_flips"] > 0
    assert counters["rx_crc_errors"] > 0
    assert counters["tx_replays"] > 0 and board.resends > 0
    assert counters["tx_frames_sent"] > counters["rx_frames_accepted"]
    assert counters["rx_overflows"] == 0


def test_burst_errors_recovered_and_counted():
    """Bursts (flowtile/link_faults.py): runs of corrupted beats on both channels; still exactly once, in order."""
    dut = Link(ARCH, **SMALL, error_rate=0.006, burst_cycles=6, seed=31)
    assert dut.fwd.burst_cycles == dut.ret.burst_cycles == 6 and dut.fwd.threshold == 0
    flits = random_flits(dut.format, 80, seed=16)
    received, _, counters, board = run_link(dut, flits, in_stall=0.2, out_stall=0.3, seed=17, max_cycles=40000)
    assert received == delivered(dut.format, flits)
    assert counters["fwd_flips"] > 0 and counters["ret_flips"] > 0
    assert counters["rx_crc_errors"] + counters["rx_seq_errors"] > 0
    assert counters["tx_replays"] > 0 and board.resends > 0 and counters["rx_overflows"] == 0


@pytest.mark.parametrize("error_rate, burst, seed_port", [(0.01, 1, False), (0.004, 5, False), (0.004, 5, True),
                                                         (0.02, 2, True)])
def test_channel_injector_is_the_spec_model_and_counts_run_cycles(error_rate, burst, seed_port):
    """LinkChannel == flowtile.link_faults.reference_flips in run cycles, with bursts; while run = 0 nothing flips
    and the generators hold (run cycle r sees the same flips however many cycles passed before)."""
    from flowtile.link_faults import reference_flips
    bits, latency, cycles, seed = 3, 4, 2400, 4242
    dut = LinkChannel(bits, latency=latency, error_rate=error_rate, seed=seed, seed_port=seed_port,
                      burst_cycles=burst)
    golden = reference_flips(seed, bits, error_rate, burst, cycles)
    rng = random.Random(3)
    runs = [rng.random() < 0.7 for _ in range(2000)]
    seen = []

    async def testbench(ctx):
        if seed_port:
            ctx.set(dut.seed, seed)
        for run in runs:
            ctx.set(dut.run, run)
            seen.append((run, ctx.get(dut.o.data) | ctx.get(dut.o.valid) << bits | ctx.get(dut.o.first) << (bits + 1)))
            await ctx.tick()
        seen.append((None, ctx.get(dut.flips)))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    flips_counted = seen.pop()[1]
    r = flips = 0
    for run, value in seen:
        if not run:
            assert value == 0
            continue
        if r < cycles:
            assert value == golden[r], r
            flips += bin(golden[r]).count("1")
        r += 1
    assert r > 1200 and any(golden[:r])
    assert flips_counted == flips


# --- (d) corrupted acks/credits recovered ---------------------------------------------------------------------------
def test_corrupted_messages_recovered():
    """Faults on the return channel only: acks, credits and NAKs get lost; the periodic cumulative
    messages and the sender's timeout recover every one of them."""
    dut = Link(ARCH, **SMALL, error_rate=0.0, ret_error_rate=0.01, seed=5)
    flits = random_flits(dut.format, 48, seed=10)
    received, _, counters, _ = run_link(dut, flits, out_stall=0.6, seed=11)
    assert received == delivered(dut.format, flits)
    assert counters["fwd_flips"] == 0 and counters["rx_crc_errors"] == 0
    assert counters["ret_flips"] > 0 and counters["tx_ret_crc_errors"] > 0
    assert counters["rx_overflows"] == 0


def test_lost_nak_recovered_by_timeout():
    dut = Link(ARCH, **SMALL, error_rate=0.003, ret_error_rate=0.02, seed=21)
    flits = random_flits(dut.format, 40, seed=12)
    received, _, counters, _ = run_link(dut, flits, seed=13, max_cycles=30000)
    assert received == delivered(dut.format, flits)
    assert counters["tx_timeouts"] > 0 and counters["tx_ret_crc_errors"] > 0 and counters["rx_crc_errors"] > 0


# --- one run at the defaults ----------------------------------------------------------------------------------------
def test_defaults_with_errors():
    arch = lean_arch(link_error_rate=0.0005, link_error_seed=7)
    dut = Link(arch)
    fmt = dut.format
    assert (fmt.bits, dut.fwd.latency, fmt.frame_flits, fmt.frame_beats) == (4, 64, 16, 267)
    flits = random_flits(fmt, 24, seed=14)
    received, _, counters, board = run_link(dut, flits, seed=15)
    assert received == delivered(dut.format, flits) and counters["rx_overflows"] == 0
    assert counters["fwd_flips"] > 0 and counters["tx_replays"] > 0 and board.resends > 0


# --- static framing, the run gate and the timing contract (flowtile/link_format.py) ----------------------------------
def test_format_is_the_spec_geometry():
    """Every geometry number comes from flowtile.link_format.LinkGeometry; the CRCs have the spec's widths."""
    for arch, kwargs in ((ARCH, SMALL), (lean_arch(), {}), (ARCH, dict(bits=1, frame_flits=1, credit_frames=2,
                                                                    replay_frames=3, latency=4))):
        fmt = LinkFormat(arch, **kwargs)
        geometry = LinkGeometry(arch, **kwargs)
        assert isinstance(fmt, LinkGeometry)
        for name in ("bits", "frame_flits", "credit_frames", "replay_frames", "latency", "seq_bits", "count_bits",
                     "payload_bits", "payload_beats", "crc_beats", "frame_beats", "msg_bits", "msg_beats",
                     "ret_beats", "accept_delay", "message_delay", "message_period", "flit_data_bits", "flits_bits",
                     "frame_bytes", "lanes"):
            assert getattr(fmt, name) == getattr(geometry, name), name
        assert fmt.default_timeout() == geometry.default_timeout()
        assert fmt.flit_layout.size == arch.flit_bits and fmt.flit_data_bits == arch.flit_data_bits
    assert FRAME_CRC.crc_width == FRAME_CRC_BITS and MESSAGE_CRC.crc_width == MESSAGE_CRC_BITS
    assert LinkTx(ARCH, **SMALL).timeout_cycles == LinkGeometry(ARCH, **SMALL).default_timeout()


def test_golden_frame_sizes():
    assert frame_sizes(7, 21, 4) == [4, 3, 4, 3, 4, 3]
    assert frame_sizes(8, 16, 4) == [4, 4, 4, 4]
    assert frame_sizes(2, 6, 4) == [2, 2, 2]
    assert frame_sizes(0, 10, 4) == [4, 4]      # no boundary: full frames; 2 flits left over
    assert frame_sizes(5, 5, 1) == [1] * 5


@pytest.mark.parametrize("inference_flits, n, frame_flits", [(7, 21, 4), (2, 12, 4), (9, 18, 3), (0, 16, 4),
                                                               (1, 5, 4)])
def test_static_framing_splits_frames_at_inference_boundaries(inference_flits, n, frame_flits):
    """Frames never span inferences (the scoreboard checks every frame's size against frame_sizes), whatever the
    input stalls; the output is the input's data addressed to tile (0,0); frame count = inferences * ceil(n / F)."""
    dut = Link(ARCH, **{**SMALL, "frame_flits": frame_flits})
    flits = random_flits(dut.format, n, seed=n)
    received, _, counters, board = run_link(dut, flits, in_stall=0.4, out_stall=0.4, seed=inference_flits,
                                            inference_flits=inference_flits)
    assert received == delivered(dut.format, flits)
    assert counters["tx_frames_sent"] == len(board.frames) == len(frame_sizes(inference_flits, n, frame_flits))
    assert [len(frame) for frame in board.frames] == frame_sizes(inference_flits, n, frame_flits)


def test_a_partial_frame_waits_for_its_flits():
    """The old rule (a partial frame goes when the input pauses) is gone: 3 flits of a 4-flit frame wait for the
    4th, however long the input pauses; then one frame of 4 goes."""
    dut = Link(ARCH, **SMALL)
    fmt = dut.format
    flits = random_flits(fmt, 4, seed=30)
    seen = {}

    async def testbench(ctx):
        ctx.set(dut.run, 1)
        ctx.set(dut.inference_flits, 4)
        ctx.set(dut.o.ready, 1)
        out = []
        for cycle in range(400):
            index = 3 if cycle >= 300 else cycle
            ctx.set(dut.i.valid, cycle < 3 or cycle == 300)
            if index < 4:
                ctx.set(dut.i.payload.as_value(), flits[index])
            if cycle == 299:
                seen["before"] = (ctx.get(dut.tx_frames_sent), ctx.get(dut.tx.o_wire.valid), ctx.get(dut.i.ready))
            if ctx.get(dut.o.valid):
                out.append(ctx.get(dut.o.payload.as_value()))
            await ctx.tick()
        seen["after"], seen["out"] = ctx.get(dut.tx_frames_sent), out

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    assert seen["before"] == (0, 0, 1)
    assert seen["after"] == 1 and seen["out"] == delivered(fmt, flits)


def test_inference_flits_zero_means_full_frames_only():
    """inference_flits = 0: no boundary, every frame full; 6 flits with frames of 4 send one frame, the 2 others
    wait for more."""
    dut = Link(ARCH, **SMALL)
    flits = random_flits(dut.format, 6, seed=31)
    received, _, counters, _ = run_link(dut, flits, inference_flits=0, max_cycles=600, monitor=False)
    assert received == delivered(dut.format, flits[:4]) and counters["tx_frames_sent"] == 1


def test_run_gates_the_return_messages():
    """No message starts while run = 0 (so the sender gets no credit beyond its initial credit_frames: no frame
    after them is accepted); from the first cycle with run = 1, message m starts in cycle m * ret_beats (beat 0 on the receiver's
    return wire the cycle after)."""
    dut = Link(ARCH, **SMALL)
    fmt = dut.format
    flits = random_flits(fmt, 40, seed=32)
    RUN_AT = 500
    ret_firsts, wire_valid_before = [], []
    received = []

    async def testbench(ctx):
        ctx.set(dut.inference_flits, 40)
        ctx.set(dut.o.ready, 1)
        index = 0
        for cycle in range(RUN_AT + 800):
            ctx.set(dut.run, cycle >= RUN_AT)
            ctx.set(dut.i.valid, index < len(flits))
            if index < len(flits):
                ctx.set(dut.i.payload.as_value(), flits[index])
            took = index < len(flits) and ctx.get(dut.i.ready)
            if ctx.get(dut.rx.o_ret.valid):
                if cycle < RUN_AT:
                    wire_valid_before.append(cycle)
                elif ctx.get(dut.rx.o_ret.first):
                    ret_firsts.append(cycle - RUN_AT)
            if ctx.get(dut.o.valid):
                received.append(ctx.get(dut.o.payload.as_value()))
            if cycle == RUN_AT - 1:   # (resends after timeouts are duplicates: no new frame without credit)
                assert ctx.get(dut.rx_frames_accepted) == fmt.credit_frames
                assert ctx.get(dut.tx_ack) == 0 and ctx.get(dut.tx_freed) == 0
            await ctx.tick()
            index += took

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    assert wire_valid_before == []
    assert ret_firsts[:20] == [m * fmt.ret_beats + 1 for m in range(20)]
    assert received == delivered(fmt, flits)


#: Link configurations for the contract check: the window (replay) and the credit both bind in some.
CONTRACT_CASES = {
    "window-and-credit": (dict(bits=8, frame_flits=4, credit_frames=2, replay_frames=2, latency=6), 7, 0.3, 0.5),
    "one-frame-each": (dict(bits=8, frame_flits=3, credit_frames=1, replay_frames=1, latency=1), 5, 0.2, 0.3),
    "wide-wire": (dict(bits=19, frame_flits=1, credit_frames=3, replay_frames=2, latency=3), 0, 0.0, 0.6),
    "narrow-wire": (dict(bits=3, frame_flits=4, credit_frames=4, replay_frames=4, latency=9), 10, 0.5, 0.2),
}


@pytest.mark.parametrize("case", sorted(CONTRACT_CASES))
def test_timing_contract_cycle_by_cycle(case):
    """A fault-free run with random stalls on both ends: every event in the cycle flowtile/link_format.py says
    (check_link_contract); the window and the credit each bind at least once over the cases."""
    kwargs, inference_flits, in_stall, out_stall = CONTRACT_CASES[case]
    dut = Link(ARCH, **kwargs)
    fmt = dut.format
    n = 3 * (inference_flits or 8)
    flits = random_flits(fmt, n, seed=40)
    probe = LinkProbe(dut)
    received, _, counters, _ = run_link(dut, flits, in_stall=in_stall, out_stall=out_stall, seed=41,
                                        inference_flits=inference_flits, probe=probe,
                                        tail=fmt.message_delay + 2 * fmt.ret_beats)
    assert received == delivered(fmt, flits)
    stats = check_link_contract(fmt, inference_flits, probe.cycles)
    assert stats["frames"] == counters["tx_frames_sent"] == len(frame_sizes(inference_flits, n, fmt.frame_flits))
    assert stats["last_freed_seen"] < len(probe.cycles)
    TIMING_BINDS[case] = stats


TIMING_BINDS = {}


def test_timing_contract_cases_exercise_window_and_credit():
    """(After the parametrized runs.) The cases above hit both the window rule and the credit rule."""
    for case in CONTRACT_CASES:
        if case not in TIMING_BINDS:
            test_timing_contract_cycle_by_cycle(case)
    assert any(stats["window_bound"] for stats in TIMING_BINDS.values())
    assert any(stats["credit_bound"] for stats in TIMING_BINDS.values())


# --- dense frames: lane tables (flowtile/link_format.py: LaneSegment, flit_lanes, frame_sizes) -----------------------
def random_table(rng, lanes, limit=None, max_flits=12):
    """0 .. LINK_LANE_SEGMENTS random segments (periods 1..4, any last_lanes) covering at most ``limit`` flits."""
    segments, total = [], 0
    for _ in range(rng.randint(0, LINK_LANE_SEGMENTS)):
        flits = rng.randint(1, max_flits)
        if limit is not None:
            flits = min(flits, limit - total)
            if flits < 1:
                break
        segments.append(LaneSegment(flits, rng.randint(1, 4), rng.randint(1, lanes)))
        total += flits
    return tuple(segments)


def test_lane_table_layout_is_the_spec_encoding():
    """Entry s of the table port holds encode_lane_segment of segment s (flits [0,24), period [24,40), last_lanes
    from 40), entry s from bit s * entry size."""
    for arch in (ARCH, ARCH8, lean_arch(lanes=1, sram_bytes=1024), lean_arch(lanes=32)):
        layout = lane_table_layout(arch)
        entry = layout.elem_shape
        assert layout.length == LINK_LANE_SEGMENTS
        assert [(name, field.offset, Shape.cast(field.shape).width) for name, field in entry] == \
            [("flits", 0, 24), ("period", 24, 16), ("last_lanes", 40, (arch.lanes).bit_length())]
        segments = (LaneSegment(5, 3, 1), LaneSegment((1 << 24) - 1, (1 << 16) - 1, arch.lanes))
        value = table_value(arch, segments)
        assert value == encode_lane_segment(segments[0], arch.lanes) | \
            encode_lane_segment(segments[1], arch.lanes) << entry.size
        as_view = layout.const([{"flits": s.flits, "period": s.period, "last_lanes": s.last_lanes}
                                for s in segments] + [{"flits": 0, "period": 0, "last_lanes": 0}] * 2)
        assert as_view.as_value().value == value


def test_format_dense_round_trip():
    """encode_frame packs the carried lanes back to back from bit 0 of the data area (the rest zero);
    decode_frame rebuilds the flits with the other lanes zero, decode_frame_area gives count and area."""
    fmt = LinkFormat(ARCH8, bits=8, frame_flits=2)
    assert (fmt.frame_bytes, fmt.count_bits, fmt.flits_bits) == (16, 4, 128)
    flits = [0x0706050403020100, 0x1716151413121110, 0x2726252423222120, 0x3736353433323130]
    word = fmt.encode_frame(9, flits, [3, 8, 1, 4])
    ok, seq, count, area = fmt.decode_frame_area(word)
    assert (ok, seq, count) == (True, 9 % (1 << fmt.seq_bits), 4)
    assert area.to_bytes(16, "little") == bytes([0, 1, 2, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x20,
                                                 0x30, 0x31, 0x32, 0x33])
    assert fmt.decode_frame(word, [3, 8, 1, 4, 8, 8]) == (True, seq, [0x020100, 0x1716151413121110, 0x20,
                                                                      0x33323130])
    # 16 one-lane flits fill a frame; without 'carried' every flit carries all lanes (the old format)
    assert fmt.decode_frame_area(fmt.encode_frame(0, list(range(16)), [1] * 16))[2] == 16
    assert fmt.decode_frame(fmt.encode_frame(1, flits[:2]))[2] == flits[:2]
    with pytest.raises(AssertionError):
        fmt.encode_frame(0, flits[:3], [8, 8, 1])     # 17 bytes
    with pytest.raises(ValueError, match=r"decode_frame: the frame holds 4 flits, 'carried' gives the lanes of 3"):
        fmt.decode_frame(word, [3, 8, 1])


def run_sequencer(arch, segments_value, inference_flits, steps, seed):
    """Advance a LaneSequencer on random cycles; returns [(lanes, inference_start)] of each flit it passed."""
    dut = LaneSequencer(arch)
    rng = random.Random(seed)
    seen = []

    async def testbench(ctx):
        ctx.set(dut.segments.as_value(), segments_value)
        ctx.set(dut.inference_flits, inference_flits)
        while len(seen) < steps:
            advance = rng.random() < 0.7
            ctx.set(dut.advance, advance)
            if advance:
                seen.append((ctx.get(dut.lanes), ctx.get(dut.inference_start)))
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    return seen


@pytest.mark.parametrize("seed", range(6))
def test_lane_sequencer_is_flit_lanes(seed):
    """The sequencer's lanes, flit by flit, are flit_lanes of the table, restarting every inference_flits flits
    (0: never); inference_start marks flit 0 of each inference. Random tables (periods > 1, tables longer than an
    inference: cut off), several inferences, random advance gaps."""
    rng = random.Random(seed)
    arch = (ARCH, ARCH8)[seed % 2]
    inference_flits = (0, 1, 7, 13, 30, 21)[seed]
    segments = random_table(rng, arch.lanes)
    steps = 3 * (inference_flits or 25) + 2
    seen = run_sequencer(arch, table_value(arch, segments), inference_flits, steps, seed)
    lanes = stream_lanes(inference_flits, steps, arch.lanes, segments)
    starts = [int(bool(inference_flits) and j % inference_flits == 0) for j in range(steps)]
    assert seen == list(zip(lanes, starts))


def test_lane_sequencer_table_ends_at_an_empty_entry_and_out_of_range_values():
    """An entry with flits = 0 ends the table (the ones after it are ignored); a last_lanes of 0 or above lanes
    reads as all lanes; period = 0: no flit is a pixel's last."""
    entry = lane_table_layout(ARCH8).elem_shape.size

    def raw(flits, period, last):
        return flits | period << 24 | last << 40

    value = raw(4, 2, 3) | raw(0, 1, 1) << entry | raw(5, 1, 1) << 2 * entry
    seen = run_sequencer(ARCH8, value, 0, 8, 1)
    assert [lanes for lanes, _ in seen] == [8, 3, 8, 3, 8, 8, 8, 8]
    value = raw(2, 1, 0) | raw(2, 1, 9) << entry | raw(3, 0, 2) << 2 * entry | raw(2, 1, 5) << 3 * entry
    seen = run_sequencer(ARCH8, value, 0, 11, 2)
    assert [lanes for lanes, _ in seen] == [8, 8, 8, 8, 8, 8, 8, 5, 5, 8, 8]


#: (arch, link parameters, inference_flits, flits, in_stall, out_stall) of the dense-frame runs; the lane tables are
#: random (seeded by the case's index).
DENSE_CASES = [
    (ARCH, SMALL, 11, 33, 0.4, 0.5),
    (ARCH, dict(SMALL, frame_flits=1), 6, 24, 0.3, 0.3),           # frames of 2 bytes: 1 or 2 flits
    (ARCH8, dict(bits=8, frame_flits=2, credit_frames=3, replay_frames=2, latency=4), 17, 51, 0.3, 0.6),
    (ARCH8, dict(bits=5, frame_flits=3, credit_frames=2, replay_frames=3, latency=2), 0, 40, 0.5, 0.2),
    (ARCH8, dict(bits=8, frame_flits=1, credit_frames=4, replay_frames=4, latency=3), 9, 36, 0.2, 0.4),
]


@pytest.mark.parametrize("case", range(len(DENSE_CASES)))
def test_dense_frames_random_lane_tables(case):
    """Random lane tables, random stalls on both ends: every frame on the wire is the spec's (the scoreboard: the
    flits frame_sizes puts in it, their carried lanes packed densely, the rest zero), the output is each input flit
    with its uncarried lanes zero, and the frames sent and accepted are as many as frame_sizes says."""
    arch, kwargs, inference_flits, n, in_stall, out_stall = DENSE_CASES[case]
    rng = random.Random(100 + case)
    segments = random_table(rng, arch.lanes, inference_flits or None)
    while not segments:
        segments = random_table(rng, arch.lanes, inference_flits or None)
    dut = Link(arch, **kwargs)
    fmt = dut.format
    flits = random_flits(fmt, n, seed=case)
    received, _, counters, board = run_link(dut, flits, in_stall=in_stall, out_stall=out_stall, seed=case,
                                            inference_flits=inference_flits, segments=segments)
    sizes = frame_sizes(inference_flits, n, fmt.frame_flits, fmt.lanes, segments)
    expected = delivered(fmt, flits, inference_flits, segments)
    # a trailing frame that never fills (inference_flits = 0) stays in the sender
    assert received == expected[:sum(sizes)] if not inference_flits else received == expected
    assert [len(frame) for frame in board.frames] == sizes
    assert counters["tx_frames_sent"] == counters["rx_frames_accepted"] == len(sizes)
    assert counters["tx_replays"] == counters["rx_overflows"] == 0
    if inference_flits:
        per_inference = LinkGeometry(arch, **{k: v for k, v in kwargs.items() if k != "latency"}).frames(
            inference_flits, segments)
        assert len(sizes) == per_inference * (n // inference_flits)


def test_dense_frames_carry_more_flits():
    """One-lane flits of 8 lanes: a 2-flit frame holds 16 of them (count up to frame_bytes); an inference of 16
    one-lane flits then 3 full ones makes frames of 16 and 2 + 1 (the full ones: 16 bytes a frame)."""
    segments = (LaneSegment(16, 1, 1),)
    dut = Link(ARCH8, bits=8, frame_flits=2, credit_frames=4, replay_frames=4, latency=3)
    fmt = dut.format
    assert frame_sizes(19, 38, 2, 8, segments) == [16, 2, 1, 16, 2, 1]
    flits = random_flits(fmt, 38, seed=5)
    received, _, counters, board = run_link(dut, flits, out_stall=0.3, seed=6, inference_flits=19,
                                            segments=segments)
    assert received == delivered(fmt, flits, 19, segments)
    assert all(flit >> 8 == 0 for flit in received[:16]) and [len(f) for f in board.frames] == [16, 2, 1] * 2
    assert counters["tx_frames_sent"] == 6


#: Dense-frame links for the contract check (arch, parameters, inference_flits, lane table, stalls).
DENSE_CONTRACT_CASES = {
    "dense-window-and-credit": (ARCH8, dict(bits=8, frame_flits=2, credit_frames=2, replay_frames=2, latency=5), 14,
                                (LaneSegment(6, 3, 2), LaneSegment(5, 1, 5)), 0.3, 0.6),
    "dense-endless": (ARCH, dict(bits=3, frame_flits=3, credit_frames=3, replay_frames=2, latency=2), 0,
                      (LaneSegment(9, 2, 1), LaneSegment(4, 1, 1)), 0.4, 0.3),
    "dense-one-flit-frames": (ARCH8, dict(bits=16, frame_flits=1, credit_frames=1, replay_frames=1, latency=1), 7,
                              (LaneSegment(7, 1, 3),), 0.2, 0.2),
}


@pytest.mark.parametrize("case", sorted(DENSE_CONTRACT_CASES))
def test_dense_frames_meet_the_timing_contract(case):
    """With lane tables the timing contract is unchanged (the frames are frame_sizes'): every event on its cycle."""
    arch, kwargs, inference_flits, segments, in_stall, out_stall = DENSE_CONTRACT_CASES[case]
    dut = Link(arch, **kwargs)
    fmt = dut.format
    n = 3 * (inference_flits or 13)
    flits = random_flits(fmt, n, seed=50)
    probe = LinkProbe(dut)
    if not inference_flits:       # endless: only whole frames go; offer exactly those flits
        n = sum(frame_sizes(0, n, fmt.frame_flits, fmt.lanes, segments))
        flits = flits[:n]
    received, _, counters, _ = run_link(dut, flits, in_stall=in_stall, out_stall=out_stall, seed=51,
                                        inference_flits=inference_flits, probe=probe, segments=segments,
                                        tail=fmt.message_delay + 2 * fmt.ret_beats)
    assert received == delivered(fmt, flits, inference_flits, segments)
    stats = check_link_contract(fmt, inference_flits, probe.cycles, segments)
    assert stats["frames"] == counters["tx_frames_sent"] == len(frame_sizes(inference_flits, n, fmt.frame_flits,
                                                                            fmt.lanes, segments))
    assert stats["frames"] < len(frame_sizes(inference_flits, n, fmt.frame_flits))   # fewer than without a table


def test_dense_frames_with_bit_errors():
    """Faults on both channels with a lane table: resends carry the same dense frames; every flit once, in order,
    its uncarried lanes zero."""
    segments = (LaneSegment(5, 2, 3), LaneSegment(6, 3, 1), LaneSegment(2, 1, 7))
    dut = Link(ARCH8, bits=8, frame_flits=2, credit_frames=3, replay_frames=3, latency=4, error_rate=0.003, seed=77)
    fmt = dut.format
    flits = random_flits(fmt, 60, seed=18)
    received, _, counters, board = run_link(dut, flits, in_stall=0.2, out_stall=0.3, seed=19, inference_flits=15,
                                            segments=segments, max_cycles=40000)
    assert received == delivered(fmt, flits, 15, segments)
    assert counters["rx_crc_errors"] > 0 and counters["tx_replays"] > 0 and board.resends > 0
    assert counters["rx_frames_accepted"] == len(frame_sizes(15, 60, 2, 8, segments))
    assert counters["rx_overflows"] == 0


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
    (lambda: LinkChannel(4, latency=4, burst_cycles=0), ValueError,
     "LinkChannel: parameter 'burst_cycles' = 0 is outside 1..4096"),
    (lambda: LinkChannel(4, latency=4, burst_cycles=2.0), TypeError,
     "LinkChannel: parameter 'burst_cycles' must be an integer, got 2.0"),
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
    (lambda: LinkChannel(4, latency=4, seed_port=1), TypeError,
     "LinkChannel: parameter 'seed_port' must be a bool, got 1"),
    (lambda: Link(ARCH, seed_port="yes"), TypeError, "Link: parameter 'seed_port' must be a bool, got 'yes'"),
    (lambda: Link(ARCH, seed=0), ValueError, "LinkChannel: parameter 'seed' = 0 is outside 1..4294967295"),
    (lambda: LinkRx(ARCH, latency=0), ValueError, "LinkRx: parameter 'latency' = 0 is outside 1..65536"),
    (lambda: LaneSequencer("arch"), TypeError,
     "LaneSequencer: parameter 'arch' must be a flowtile.arch.Arch, got 'arch'"),
    (lambda: lane_table_layout(None), TypeError, "lane_table_layout: parameter 'arch' must be a flowtile.arch.Arch"),
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
    ({"link_error_rate": 1e-7}, "without bursts the injector's resolution is 2**-17"),
    ({"link_error_seed": 0}, "arch field 'link_error_seed' = 0 is invalid: must be in 1..4294967295"),
    ({"link_burst_cycles": 0}, "arch field 'link_burst_cycles' = 0 is invalid: must be in 1..4096"),
    ({"link_burst_cycles": 4097}, "arch field 'link_burst_cycles' = 4097 is invalid: must be in 1..4096"),
    ({"link_burst_cycles": 1.5}, "arch field 'link_burst_cycles' must be an integer, got 1.5"),
])
def test_arch_link_field_validation(changes, message):
    with pytest.raises(ArchError) as info:
        lean_arch(**changes)
    assert message in str(info.value)


def test_with_bursts_any_error_rate_is_representable():
    assert lean_arch(link_error_rate=1e-7, link_burst_cycles=8).link_error_rate == 1e-7


def test_arch_link_defaults_and_old_programs():
    arch = lean_arch()
    assert (arch.chips, arch.chip_topology, arch.link_latency_cycles, arch.link_error_rate) == (1, "line", 64, 0.0)
    assert arch.link_bits_per_cycle is None and arch.link_bits == arch.flit_bits // 16 == 4
    assert lean_arch(lanes=1, sram_bytes=1024).link_bits == 1   # 13-bit flits
    assert lean_arch(lanes=32).link_bits == (256 + 2 + 2 + 1) // 16
    assert lean_arch(link_bits_per_cycle=7).link_bits == 7
    assert lean_arch(chips=3, chip_topology="ring").chip_topology == "ring"
    # A program.json arch written before these fields existed loads with the defaults.
    old = {"rows": 4, "cols": 4, "lanes": 8, "sram_bytes": 32768, "max_tile_outputs": 512, "router_fifo_depth": 4,
           "host_buffer_flits": 65536}
    assert Arch.from_dict(old) == Arch(sram_bytes=32768)
    assert Arch.from_dict(lean_arch(chips=2, link_error_rate=0.01).to_dict()) == lean_arch(chips=2, link_error_rate=0.01)


def test_converts_to_rtlil():
    """Every piece elaborates into a netlist (comb-read memories, LFSRs, CRC processors)."""
    from amaranth.back import rtlil
    text = rtlil.convert(Link(ARCH, **SMALL, error_rate=0.01), name="link")
    assert "module \\link" in text


@pytest.mark.parametrize("error_rate, seed, seed_port", [(0.0, 4242, False), (0.05, 4242, False), (0.05, 4242, True),
                                                         (0.05, (1 << 32) - 1, True)])
def test_channel_latency_and_injector_golden(error_rate, seed, seed_port):
    """LinkChannel alone: output = input ``latency`` cycles later, XOR the flips a plain-Python model of the
    per-bit LFSRs predicts; the flip counter counts them; the flip rate is near error_rate. With ``seed_port`` the
    seed is an input port (held from reset): the same flips, cycle for cycle."""
    from flowtile.hdl.link import error_threshold
    bits, latency, cycles = 3, 5, 600
    dut = LinkChannel(bits, latency=latency, error_rate=error_rate, seed=seed, seed_port=seed_port)
    threshold = error_threshold("test", error_rate)
    width = bits + 2
    states = [lfsr_seed(seed, b) for b in range(width)]
    rng = random.Random(1)
    inputs = [rng.getrandbits(width) for _ in range(cycles)]
    seen = []

    async def testbench(ctx):
        if seed_port:
            ctx.set(dut.seed, seed)
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
    assert ret_seed(seed) == (seed + 1 if seed < (1 << 32) - 1 else 1)
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
