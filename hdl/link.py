"""The inter-chip link: flits between an edge port of one chip and an edge port of the next over a slow,
narrow, lossy wire (issue "Multi-chip: chips joined by slow links"); :class:`flowtile.hdl.system.System` puts one
between every two chips of a line. The geometry and the fault-free timing contract are the spec's
(:class:`flowtile.link_format.LinkGeometry`, whose module docstring is the contract this hardware meets to the cycle).

Pieces (each a ``wiring.Component``):

* :class:`LaneSequencer` -- walks a link's *lane table* (:func:`lane_table_layout`, the spec's
  :class:`~flowtile.link_format.LaneSegment` registers) flit by flit: how many lanes (bytes) the current flit of the
  stream carries (:func:`flowtile.link_format.flit_lanes`) and whether it starts an inference. Sender and receiver
  each hold one, fed from the same registers, so both agree on every flit's lanes and on where frames end.
* :class:`LinkTx` -- packs the carried lanes of flits densely into frames (sequence number, flit count, data area,
  CRC-32; frames never span inferences and are cut greedily where the next flit's lanes no longer fit,
  :func:`flowtile.link_format.frame_sizes`), keeps them in a go-back-N replay buffer until acknowledged, sends one
  only when the receiver has credit for it, and serializes frames onto ``bits`` wire bits per cycle.
* :class:`LinkChannel` -- the wire one way: ``latency`` pipeline stages and a fault injector that flips
  wire bits from seeded LFSRs at a bit-error rate, alone or in bursts (the fault model is defined once, in
  :mod:`flowtile.link_faults`, which the emulator predicts too: emulator/link_faults.py).
* :class:`LinkRx` -- deserializes, checks CRC and sequence number, buffers good in-order frames (at most
  ``credit_frames``) and streams their flits out addressed to tile (0,0) (``dest_row = dest_col = 0``,
  ``dest_host = 0``: only the carried lanes of the data cross the wire, the others arrive zero, see below); while
  ``run`` is high it sends status messages back on its own narrow wire, message ``m`` starting in cycle ``m *
  ret_beats`` of the run.
* :class:`Link` -- TX, a forward channel, RX and a return channel joined: flit stream in, flit stream out.

Wire (both ways, :func:`link_wire_signature`): ``data`` (``bits``), ``valid``, ``first`` (first beat of a
frame or message). The fault injector may flip any of them; the receiver resynchronizes on ``first``.

Forward frame (:class:`LinkFormat`), LSB first: ``seq`` (``seq_bits``), ``count - 1`` (``count_bits = max(1,
ceil_log2(frame_bytes))``; ``count`` in flits, up to ``frame_bytes`` of one lane each), then the data area of
``frame_bytes = frame_flits * lanes`` bytes (``flits_bits`` bits): the carried lanes of the frame's flits back to
back, in flit order, lane 0 first, from bit 0 of the area (byte ``b`` at bits ``[8b, 8b + 8)``), the unused rest
zero. A flit carries lanes ``0 .. c - 1`` with ``c`` from the lane table (:func:`flowtile.link_format.flit_lanes`;
``c = lanes`` for every flit without a table, and then the area is ``frame_flits`` whole data words as before); its
other lanes (channel padding) and its destination do not cross the wire: chip ``k``'s exit tile always sends to
tile (0,0) of chip ``k + 1``, which the receiver writes back, :meth:`flowtile.program.Program.validate`. Frame
boundaries follow from the table alone (a flit joins the open frame iff it belongs to the same inference and its
lanes still fit, :func:`flowtile.link_format.frame_sizes`). ``payload_bits`` in all, zero-padded to
``payload_beats`` beats of ``bits`` bits; then CRC-32/ISO-HDLC of those payload beats (computed a beat at a time,
``bits``-bit words, as they go out), zero-padded to ``crc_beats`` beats. ``frame_beats = payload_beats +
crc_beats``; beat 0 first, each beat's bit 0 on ``data[0]``; the ``first`` line is high on beat 0.

Lane table (:func:`lane_table_layout`): :data:`~flowtile.link_format.LINK_LANE_SEGMENTS` registers, each the
spec's :func:`~flowtile.link_format.encode_lane_segment` (``flits`` bits ``[0, 24)``, ``period`` ``[24, 40)``,
``last_lanes`` from bit 40); a register with ``flits = 0`` ends the table. Sender and receiver count the stream's
flits from reset, back to 0 after ``inference_flits`` of them (never with ``inference_flits = 0``); both must hold
the table and ``inference_flits`` constant while flits move (:class:`flowtile.hdl.system.System` loads them while
``run = 0``).

Return message: ``ack`` (``seq_bits``: the next sequence number the receiver expects; cumulative),
``freed`` (``seq_bits``: frames whose flits have all left the receiver; cumulative credit), ``nak`` (1),
padded to whole beats, then CRC-16/IBM-3740 of those beats, padded likewise (``ret_beats`` in all; the
message is 2 * seq_bits + 1 bits: a 16-bit CRC detects every error of up to 3 bits in it and all bursts up
to 16 bits; its non-zero initial value catches an all-zero wire). The receiver sends one message after another, so every message refreshes the
cumulative ack and credit: a lost message costs only time.

Protocol: the sender may send frame ``s`` only if ``s - freed < credit_frames`` (so the receiver always has
room for an in-order frame: nothing is dropped for back-pressure) and keeps at most ``replay_frames`` frames
past ``ack``. The receiver accepts a frame iff its CRC holds and ``seq == ack``; a bad CRC or a frame ahead
of ``ack`` is dropped and answered by one NAK (once per ``ack`` value); a frame behind ``ack`` (a duplicate)
is dropped silently. On a NAK, or when no ack has advanced for ``timeout_cycles`` while frames are
outstanding, the sender goes back to its oldest unacknowledged frame and resends from there.
Sequence numbers count modulo ``2 ** seq_bits`` with ``2 ** seq_bits >= 2 * (replay + credit)`` rounded up.
"""
from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.crc import catalog
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2

from flowtile.arch import Arch
from flowtile.link_faults import (BURST_FLIP_BIT, LFSR_SEED_MULTIPLIER, LFSR_SEED_STRIDE, STEPS_PER_CYCLE,
                                  THRESHOLD_BITS, burst_threshold, channel_lines, line_threshold, lfsr_seed, lfsr_step,
                                  lfsr_step_matrix, ret_seed)
from flowtile.link_format import (FRAME_CRC_BITS, LANE_SEGMENT_FLITS_BITS, LANE_SEGMENT_PERIOD_BITS,
                                  LINK_LANE_SEGMENTS, MESSAGE_CRC_BITS, LinkGeometry, check_int)

from .layouts import LINK_INFERENCE_FLITS_BITS, check_arch, flit_layout

__all__ = ["LinkFormat", "LinkTx", "LinkRx", "LinkChannel", "Link", "Serializer", "Deserializer", "LaneSequencer",
           "link_wire_signature", "link_signature", "lane_table_layout", "error_threshold", "FRAME_CRC", "MESSAGE_CRC",
           "COUNTER_BITS", "lfsr_step_matrix", "lfsr_seed", "ret_seed"]

#: CRC of a forward frame (the brief's choice: CRC-32, the Ethernet polynomial).
FRAME_CRC = catalog.CRC32_ISO_HDLC
#: CRC of a return message (short messages: 16 bits suffice, see the module docstring).
MESSAGE_CRC = catalog.CRC16_IBM_3740
# The spec sizes frames and messages with these widths (flowtile.link_format).
if FRAME_CRC.crc_width != FRAME_CRC_BITS or MESSAGE_CRC.crc_width != MESSAGE_CRC_BITS:  # pragma: no cover
    raise ImportError(f"hdl.link: FRAME_CRC / MESSAGE_CRC are {FRAME_CRC.crc_width} / {MESSAGE_CRC.crc_width} bits, "
                      f"the spec's FRAME_CRC_BITS / MESSAGE_CRC_BITS {FRAME_CRC_BITS} / {MESSAGE_CRC_BITS}")
#: Width of every status counter (they wrap).
COUNTER_BITS = 32
def link_wire_signature(bits: int) -> wiring.Signature:
    """One direction of the wire, driver's view: ``data`` (``bits``), ``valid``, ``first``."""
    return wiring.Signature({"data": Out(bits), "valid": Out(1), "first": Out(1)})



def error_threshold(owner: str, error_rate) -> int:
    """The injector's line threshold for ``error_rate`` without bursts (:func:`flowtile.link_faults.line_threshold`):
    a line flips when its LFSR's low 16 bits are below it."""
    return line_threshold(owner, error_rate, 1)


class LinkFormat(LinkGeometry):
    """The spec's :class:`~flowtile.link_format.LinkGeometry` (every geometry number and delay is written there,
    once) plus the hardware's CRC parameters and plain-Python encoders/decoders (the tests' golden model).

    Parameters are those of :class:`LinkTx` (``latency`` only sizes the default timeout and the delays);
    ``owner`` names the component in validation messages."""

    def __init__(self, arch: Arch, *, bits=None, frame_flits=None, credit_frames=None, replay_frames=None,
                 latency=None, owner="LinkFormat"):
        check_arch(arch, owner)
        super().__init__(arch, bits=bits, frame_flits=frame_flits, credit_frames=credit_frames,
                         replay_frames=replay_frames, latency=latency, owner=owner)
        self.flit_layout = flit_layout(arch)
        assert self.flit_layout.size == arch.flit_bits, "flit_layout and Arch.flit_bits disagree"
        assert self.flit_layout["data"].offset == 0 and self.flit_layout["data"].shape.width == self.flit_data_bits
        self.frame_crc = FRAME_CRC(self.bits)
        self.msg_crc = MESSAGE_CRC(self.bits)

    # --- golden encoders ------------------------------------------------------------------------------
    def beats_of(self, word: int, beats: int) -> list[int]:
        return [word >> (i * self.bits) & ((1 << self.bits) - 1) for i in range(beats)]

    def encode_frame(self, seq: int, flits: list[int], carried=None) -> int:
        """The frame's bits, beat 0 in the low ``bits`` bits. ``flits`` are data words (``flit_data_bits`` each);
        ``carried`` the lanes each carries (default: all ``lanes``): lanes ``0 .. carried[i] - 1`` of flit ``i`` go
        into the data area back to back, its other lanes are dropped (as the sender drops them)."""
        carried = [self.lanes] * len(flits) if carried is None else [int(c) for c in carried]
        assert len(carried) == len(flits) and 1 <= len(flits) <= self.frame_bytes
        area = fill = 0
        for flit, lanes in zip(flits, carried):
            assert 0 <= flit < 1 << self.flit_data_bits and 1 <= lanes <= self.lanes
            area |= (flit & ((1 << 8 * lanes) - 1)) << (8 * fill)
            fill += lanes
        assert fill <= self.frame_bytes, f"{fill} bytes of lanes do not fit a frame of {self.frame_bytes}"
        payload = seq % (1 << self.seq_bits) | (len(flits) - 1) << self.seq_bits | \
            area << (self.seq_bits + self.count_bits)
        crc = self.frame_crc.compute(self.beats_of(payload, self.payload_beats))
        return payload | crc << (self.payload_beats * self.bits)

    def decode_frame_area(self, frame: int):
        """``(crc_ok, seq, count, area)`` of a frame's bits: ``count`` its flits, ``area`` its data area (an integer
        of ``frame_bytes`` bytes, byte ``b`` at bits ``[8b, 8b + 8)``)."""
        payload = frame & ((1 << (self.payload_beats * self.bits)) - 1)
        crc = frame >> (self.payload_beats * self.bits) & 0xFFFFFFFF
        crc_ok = crc == self.frame_crc.compute(self.beats_of(payload, self.payload_beats))
        seq = payload & ((1 << self.seq_bits) - 1)
        count = (payload >> self.seq_bits & ((1 << self.count_bits) - 1)) + 1
        area = payload >> (self.seq_bits + self.count_bits) & ((1 << self.flits_bits) - 1)
        return crc_ok, seq, count, area

    def decode_frame(self, frame: int, carried=None):
        """``(crc_ok, seq, flits)`` of a frame's bits: ``flits`` the data words rebuilt as the receiver does
        (uncarried lanes zero). ``carried`` gives the lanes of the flits from the frame's first on (at least
        ``count`` entries; default: every flit carries all ``lanes``)."""
        crc_ok, seq, count, area = self.decode_frame_area(frame)
        carried = [self.lanes] * count if carried is None else [int(c) for c in carried[:count]]
        if len(carried) < count:
            raise ValueError(f"decode_frame: the frame holds {count} flits, 'carried' gives the lanes of "
                             f"{len(carried)}")
        flits, fill = [], 0
        for lanes in carried:
            flits.append(area >> (8 * fill) & ((1 << 8 * lanes) - 1))
            fill += lanes
        return crc_ok, seq, flits

    def encode_message(self, ack: int, freed: int, nak: int) -> int:
        msg = ack | freed << self.seq_bits | nak << (2 * self.seq_bits)
        return msg | self.msg_crc.compute(self.beats_of(msg, self.msg_beats)) << (self.msg_beats * self.bits)

    def decode_message(self, bits_: int):
        """``(crc_ok, ack, freed, nak)``."""
        msg = bits_ & ((1 << (self.msg_beats * self.bits)) - 1)
        crc = bits_ >> (self.msg_beats * self.bits) & 0xFFFF
        mask = (1 << self.seq_bits) - 1
        return crc == self.msg_crc.compute(self.beats_of(msg, self.msg_beats)), msg & mask, msg >> self.seq_bits & mask, msg >> (2 * self.seq_bits)


def lane_table_layout(arch: Arch) -> data.ArrayLayout:
    """A link's lane table as a port or register: :data:`~flowtile.link_format.LINK_LANE_SEGMENTS` entries, each a
    ``StructLayout`` of ``flits`` (24 bits), ``period`` (16) and ``last_lanes`` (``ceil_log2(lanes + 1)``), entry
    ``s`` from bit ``s * entry_size``: an entry's bits are :func:`flowtile.link_format.encode_lane_segment` of its
    segment (0: an unused entry, which ends the table)."""
    check_arch(arch, "lane_table_layout")
    entry = data.StructLayout({"flits": LANE_SEGMENT_FLITS_BITS, "period": LANE_SEGMENT_PERIOD_BITS,
                               "last_lanes": ceil_log2(arch.lanes + 1)})
    return data.ArrayLayout(entry, LINK_LANE_SEGMENTS)


class LaneSequencer(wiring.Component):
    """The carried lanes of a link's flit stream, a flit at a time (the hardware form of
    :func:`flowtile.link_format.flit_lanes`).

    The stream position counts the flits from reset (each ``advance`` is one) and goes back to 0 after
    ``inference_flits`` of them (never with ``inference_flits = 0``). At position ``p`` the lane table's segments
    apply in order: flit ``i`` of a segment carries ``last_lanes`` lanes if ``i mod period = period - 1``, all
    ``lanes`` otherwise; a segment with ``flits = 0`` ends the table, and every flit past the table carries all
    ``lanes``. Outside the spec's ranges (:func:`flowtile.link_format.check_lane_table`, which a loaded program
    meets) the hardware is still defined: a ``last_lanes`` of 0 or above ``lanes`` reads as ``lanes`` (every flit
    carries at least one lane), with ``period = 0`` no flit is a pixel's last, and a table longer than
    ``inference_flits`` is cut off where the inference ends.

    Parameters
    ----------
    arch : :class:`~flowtile.arch.Arch` -- ``lanes`` sizes the table's ``last_lanes`` and the output.

    Members
    -------
    segments : In(:func:`lane_table_layout`) -- the table; hold it while flits move.
    inference_flits : In(:data:`~flowtile.hdl.layouts.LINK_INFERENCE_FLITS_BITS`) -- flits per inference (0: no
        boundary); hold it while flits move.
    advance : In(1) -- the current flit moves on (the next one becomes current from the next cycle).
    lanes : Out(range(lanes + 1)) -- lanes the current flit carries, 1 .. ``lanes`` (a function of registers and
        ``segments``: no path from ``advance``).
    inference_start : Out(1) -- the current flit is flit 0 of an inference (never with ``inference_flits = 0``).
    """

    def __init__(self, arch: Arch):
        check_arch(arch, "LaneSequencer")
        self.arch, self.lanes_max = arch, arch.lanes
        super().__init__({"segments": In(lane_table_layout(arch)), "inference_flits": In(LINK_INFERENCE_FLITS_BITS),
                          "advance": In(1), "lanes": Out(range(arch.lanes + 1)), "inference_start": Out(1)})

    def elaborate(self, platform):
        m = Module()
        L, S = self.lanes_max, LINK_LANE_SEGMENTS
        position = Signal(LINK_INFERENCE_FLITS_BITS)       # flits of this inference before the current one
        segment = Signal(range(S))                         # the table entry in use
        done = Signal()                                    # past the last entry
        within = Signal(LANE_SEGMENT_FLITS_BITS)           # flits of this segment before the current one
        phase = Signal(LANE_SEGMENT_PERIOD_BITS)           # within mod period
        entry = self.segments[segment]
        active = Signal()
        pixel_end = Signal()
        m.d.comb += [active.eq(~done & (entry.flits != 0)),
                     pixel_end.eq(phase + 1 == entry.period),
                     self.lanes.eq(Mux(active & pixel_end & (entry.last_lanes != 0) & (entry.last_lanes <= L),
                                       entry.last_lanes, L)),
                     self.inference_start.eq((position == 0) & (self.inference_flits != 0))]
        with m.If(self.advance):
            with m.If((self.inference_flits != 0) & (position + 1 == self.inference_flits)):
                m.d.sync += [position.eq(0), segment.eq(0), done.eq(0), within.eq(0), phase.eq(0)]
            with m.Else():
                m.d.sync += position.eq(position + 1)
                with m.If(active):
                    with m.If(within + 1 == entry.flits):
                        m.d.sync += [within.eq(0), phase.eq(0)]
                        with m.If(segment == S - 1):
                            m.d.sync += done.eq(1)
                        with m.Else():
                            m.d.sync += segment.eq(segment + 1)
                    with m.Else():
                        m.d.sync += [within.eq(within + 1), phase.eq(Mux(pixel_end, 0, phase + 1))]
        return m


class Deserializer(wiring.Component):
    """Receiver of one wire direction: gathers ``beats`` beats of ``bits`` (resynchronizing on ``first``) and feeds
    the first ``crc_after`` of them to a CRC (``params``) as they arrive.

    The cycle after the last beat arrived, ``valid`` is high for one cycle; ``word`` (beat 0 in the low bits) and
    ``crc_ok`` (the CRC of the first ``crc_after`` beats equals the bits after them) hold that word's values until
    the next one.

    Members
    -------
    wire : ``In(link_wire_signature(bits))``
    valid, crc_ok : ``Out(1)``
    word : ``Out(bits * beats)``
    """

    def __init__(self, bits: int, beats: int, crc_after: int, params):
        for name, value, low in (("bits", bits, 1), ("beats", beats, 1), ("crc_after", crc_after, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"Deserializer: parameter '{name}' must be an integer >= {low}, got {value!r}")
        if crc_after * bits + params.algorithm.crc_width > bits * beats:
            raise ValueError(f"Deserializer: {crc_after} CRC'd beats plus a {params.algorithm.crc_width}-bit CRC "
                             f"do not fit {beats} beats of {bits} bits")
        self.bits, self.beats, self.crc_after, self.params = bits, beats, crc_after, params
        super().__init__({"wire": In(link_wire_signature(bits)), "valid": Out(1), "crc_ok": Out(1),
                          "word": Out(bits * beats)})

    def elaborate(self, platform):
        m = Module()
        bits, beats, crc_after, wire = self.bits, self.beats, self.crc_after, self.wire
        m.submodules.crc = crc = self.params.create()
        shift = Signal(bits * beats)
        index = Signal(range(beats + 1))
        word = Signal(bits * beats)
        m.d.comb += word.eq(Cat(shift[bits:], wire.data) if beats > 1 else wire.data)
        beat = Signal()
        position = Signal(range(beats))
        m.d.comb += [beat.eq(wire.valid & (wire.first | (index != 0))),
                     position.eq(Mux(wire.first, 0, index)),
                     crc.start.eq(beat & (position == 0)), crc.valid.eq(beat & (position < crc_after)),
                     crc.data.eq(wire.data)]
        crc_width = self.params.algorithm.crc_width
        last = beat & (position == beats - 1)
        m.d.sync += self.valid.eq(last)
        with m.If(last):
            m.d.sync += [self.word.eq(word),
                         self.crc_ok.eq(crc.crc == word[crc_after * bits:crc_after * bits + crc_width])]
        with m.If(beat):
            m.d.sync += [shift.eq(word), index.eq(Mux(last, 0, position + 1))]
        return m


class Serializer(wiring.Component):
    """Sender of one wire direction: when ``load`` is high and ``free``, takes ``payload`` and sends it as
    ``payload_beats`` beats of ``bits``, then its CRC (``params``, computed a beat at a time as the beats go out)
    as ``ceil(crc_width / bits)`` beats. ``free`` is high when a ``load`` this cycle is taken (idle, or on the last
    beat: words go back to back).

    Members
    -------
    payload : ``In(payload_beats * bits)``
    load : ``In(1)``
    free : ``Out(1)``
    wire : ``Out(link_wire_signature(bits))``
    """

    def __init__(self, bits: int, payload_beats: int, params):
        for name, value in (("bits", bits), ("payload_beats", payload_beats)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Serializer: parameter '{name}' must be an integer >= 1, got {value!r}")
        self.bits, self.payload_beats, self.params = bits, payload_beats, params
        super().__init__({"payload": In(payload_beats * bits), "load": In(1), "free": Out(1),
                          "wire": Out(link_wire_signature(bits))})

    def elaborate(self, platform):
        m = Module()
        bits, payload_beats, wire = self.bits, self.payload_beats, self.wire
        crc_width = self.params.algorithm.crc_width
        crc_beats = -(-crc_width // bits)
        beats = payload_beats + crc_beats
        m.submodules.crc = crc = self.params.create()
        shift = Signal(max(payload_beats, crc_beats) * bits)
        index = Signal(range(beats))
        active = Signal()
        crc_padded = Cat(crc.crc, Const(0, crc_beats * bits - crc_width))
        at_crc = index == payload_beats
        m.d.comb += [self.free.eq(~active | (index == beats - 1)),
                     wire.valid.eq(active), wire.first.eq(active & (index == 0)),
                     wire.data.eq(Mux(at_crc, crc_padded[:bits], shift[:bits])),
                     crc.start.eq(active & (index == 0)), crc.valid.eq(active & (index < payload_beats)),
                     crc.data.eq(shift[:bits])]
        with m.If(active):
            m.d.sync += [shift.eq(Mux(at_crc, crc_padded >> bits, shift >> bits)), index.eq(index + 1)]
            with m.If(index == beats - 1):
                m.d.sync += active.eq(0)
        with m.If(self.load & self.free):
            m.d.sync += [shift.eq(self.payload), index.eq(0), active.eq(1)]
        return m


def _seq(fmt):
    return Signal(fmt.seq_bits)


def _sub(fmt, a, b):
    """``(a - b) mod 2**seq_bits``."""
    return (a - b)[:fmt.seq_bits]


def _lane_mask(fmt, lanes):
    """``8 * lanes`` bits: lanes ``0 .. lanes - 1`` all ones, the others zero."""
    return Cat(*[Mux(lanes > lane, 0xFF, 0) for lane in range(fmt.lanes)])


def _rotate_bytes(m, value, amount, left, name):
    """``value`` (whole bytes) rotated by ``amount`` bytes (a signal below the byte count, which is a power of two):
    one 2:1 multiplexer stage per bit of ``amount``."""
    for bit in range(len(amount)):
        rotated = value.rotate_left(8 << bit) if left else value.rotate_right(8 << bit)
        stage = Signal(len(value), name=f"{name}{bit}")
        m.d.comb += stage.eq(Mux(amount[bit], rotated, value))
        value = stage
    return value


class LinkTx(wiring.Component):
    """Sending side of a link.

    Framing is static (the timing contract of :mod:`flowtile.link_format`): a :class:`LaneSequencer` on the
    ``segments`` and ``inference_flits`` inputs gives the lanes each flit carries and where inferences start. A flit
    joins the frame being assembled iff it belongs to the same inference and the frame's bytes so far plus its
    carried lanes fit ``frame_bytes`` (:func:`flowtile.link_format.frame_sizes`); otherwise that frame is *full*.
    ``i.ready`` is low exactly while the frame is full (non-empty, and the next flit starts an inference or does not
    fit); a full frame closes (into the replay buffer) in the first cycle the go-back-N window has room (``next -
    ack < replay_frames``), and the first flit of the next frame is taken no earlier than the cycle after: ``i.ready``
    is low from the cycle after a frame's last flit is taken through the cycle it closes (at least one cycle), high
    otherwise. Without a table every flit carries all lanes: an inference of ``n = inference_flits`` flits makes
    ``ceil(n / frame_flits)`` frames, all full but the last; ``inference_flits = 0`` means no inference boundary.
    The stream position counts from reset (0: an inference starts with the first flit after reset); ``segments``
    and ``inference_flits`` must hold their values while flits move (System loads them while ``run = 0``).

    Assembly: the frame is a register of ``frame_flits`` words of ``8 * lanes`` bits and a byte fill count ``fill``
    (``lanes`` is a power of two: ``fill // lanes`` and ``fill mod lanes`` are bit slices). A flit's data is rotated
    left by ``fill mod lanes`` bytes (``log2(lanes)`` multiplexer stages over one word); frame byte ``fill + b``
    takes byte lane ``(fill + b) mod lanes`` of it for each carried byte ``b``, in word ``fill // lanes`` or the next:
    a byte-enable per frame byte from a word decoder and two ``lanes``-bit lane ranges, no frame-wide shifter and no
    data multiplexer in front of the frame register. The frame register is cleared when the frame closes, so the
    bytes past ``fill`` are zero.

    Parameters
    ----------
    arch : :class:`~flowtile.arch.Arch`; its ``link_*`` fields give the defaults of the rest.
    bits, frame_flits, credit_frames, replay_frames : int, optional
    timeout_cycles : int, optional (default :meth:`LinkFormat.default_timeout` of ``latency``)
    latency : int, optional -- the wire's latency each way, only to size the default timeout.

    Members
    -------
    i : In(flit stream) -- flits to send; only the carried lanes of their ``data`` are framed (the receiver
        addresses them to tile (0,0) and zeroes the other lanes).
    segments : In(:func:`lane_table_layout`) -- the lane table (all zero: every flit carries all lanes).
    inference_flits : In(:data:`~flowtile.hdl.layouts.LINK_INFERENCE_FLITS_BITS`) -- flits per inference.
    o_wire : Out(:func:`link_wire_signature`) -- forward wire.
    i_ret : In(:func:`link_wire_signature`) -- return wire (messages from the receiver).
    ack, freed : Out(``seq_bits``) -- the receiver's ``ack`` and ``freed`` as the sender holds them (updated
        ``message_delay`` cycles after the start of a good return message).
    frames_sent, replays, naks, timeouts, ret_crc_errors : Out(32) -- frames put on the wire (resends
        included), go-back events (NAK or timeout), NAKs received, timeouts, return messages with a bad CRC.
    """

    def __init__(self, arch, *, bits=None, frame_flits=None, credit_frames=None, replay_frames=None,
                 latency=None, timeout_cycles=None):
        self.format = fmt = LinkFormat(arch, bits=bits, frame_flits=frame_flits, credit_frames=credit_frames,
                                       replay_frames=replay_frames, latency=latency, owner="LinkTx")
        self.latency = fmt.latency
        default = fmt.default_timeout()
        self.timeout_cycles = check_int("LinkTx", "timeout_cycles",
                                         default if timeout_cycles is None else timeout_cycles, 1, 1 << 24)
        super().__init__({
            "i": In(stream.Signature(fmt.flit_layout)),
            "segments": In(lane_table_layout(arch)),
            "inference_flits": In(LINK_INFERENCE_FLITS_BITS),
            "o_wire": Out(link_wire_signature(fmt.bits)),
            "i_ret": In(link_wire_signature(fmt.bits)),
            "ack": Out(fmt.seq_bits), "freed": Out(fmt.seq_bits),
            "frames_sent": Out(COUNTER_BITS), "replays": Out(COUNTER_BITS), "naks": Out(COUNTER_BITS),
            "timeouts": Out(COUNTER_BITS), "ret_crc_errors": Out(COUNTER_BITS),
        })

    def elaborate(self, platform):
        fmt = self.format
        m = Module()
        F, FB, S, W = fmt.frame_flits, fmt.flit_data_bits, fmt.seq_bits, fmt.bits
        depth_bits = ceil_log2(fmt.replay_depth)

        next_seq, send_seq, ack_base, freed = _seq(fmt), _seq(fmt), _seq(fmt), _seq(fmt)
        m.d.comb += [self.ack.eq(ack_base), self.freed.eq(freed)]

        # --- static framing: the next flit's lanes and inference from the lane table --------------------------
        m.submodules.lanes = lanes = LaneSequencer(fmt.arch)
        take = Signal()
        m.d.comb += [lanes.segments.eq(self.segments), lanes.inference_flits.eq(self.inference_flits),
                     lanes.advance.eq(take), take.eq(self.i.valid & self.i.ready)]

        # --- assembler: carried lanes packed at byte `fill`, then the frame into the replay buffer at next_seq --
        asm = Signal(fmt.flits_bits)
        asm_count = Signal(range(fmt.frame_bytes + 1))      # flits in the frame
        fill = Signal(range(fmt.frame_bytes + 1))           # bytes in the frame
        full = Signal()
        m.d.comb += [full.eq((asm_count != 0) & (lanes.inference_start | (fill + lanes.lanes > fmt.frame_bytes))),
                     self.i.ready.eq(~full)]
        # Flit byte b goes to frame byte fill + b (b < its lanes): rotated left by `offset` it sits in byte lane
        # (offset + b) mod L, of word `word` (lanes offset ..) or `word + 1` (lanes .. offset - 1). Each frame byte
        # is written from its lane of the rotated flit when enabled (a flip-flop enable, no data multiplexer);
        # the bytes past `fill` are zero (the frame is cleared when it closes).
        lane_bits = ceil_log2(fmt.lanes)
        offset, word = fill[:lane_bits], fill[lane_bits:]
        rotated = _rotate_bytes(m, self.i.payload.data, offset, True, "asm_rotate")
        end = Signal(range(2 * fmt.lanes))
        m.d.comb += end.eq(offset + lanes.lanes)          # one past the flit's last byte lane (may wrap to word + 1)
        in_word = Cat(*[(lane >= offset) & (lane < end) for lane in range(fmt.lanes)])
        in_next = Cat(*[lane + fmt.lanes < end for lane in range(fmt.lanes)])
        for k in range(F):
            enable = Signal(fmt.lanes, name=f"asm_enable{k}")
            m.d.comb += enable.eq(Mux(word == k, in_word, 0) | (Mux(word == k - 1, in_next, 0) if k else 0))
            for lane in range(fmt.lanes):
                with m.If(take & enable[lane]):
                    byte = (k * fmt.lanes + lane) * 8
                    m.d.sync += asm[byte:byte + 8].eq(rotated[lane * 8:lane * 8 + 8])
        with m.If(take):
            m.d.sync += [asm_count.eq(asm_count + 1), fill.eq(fill + lanes.lanes)]

        m.submodules.replay = replay = Memory(shape=unsigned(fmt.count_bits + fmt.flits_bits),
                                              depth=fmt.replay_depth, init=[])
        wr = replay.write_port()
        rd = replay.read_port(domain="comb")
        window_full = _sub(fmt, next_seq, ack_base) >= fmt.replay_frames
        idle = send_seq == next_seq
        close = Signal()
        m.d.comb += close.eq(~window_full & full)
        m.d.comb += [wr.addr.eq(next_seq[:depth_bits] if depth_bits else 0),
                     wr.data.eq(Cat((asm_count - 1)[:fmt.count_bits], asm)), wr.en.eq(close)]
        with m.If(close):
            m.d.sync += [next_seq.eq(next_seq + 1), asm_count.eq(0), fill.eq(0), asm.eq(0)]

        # --- serializer: the frame at send_seq, if the receiver has credit for it ---------------------------
        m.submodules.frame_serializer = ser = Serializer(W, fmt.payload_beats, fmt.frame_crc)
        wiring.connect(m, ser.wire, wiring.flipped(self.o_wire))
        can_send = ~idle & (_sub(fmt, send_seq, freed) < fmt.credit_frames)
        m.d.comb += [rd.addr.eq(send_seq[:depth_bits] if depth_bits else 0),
                     ser.payload.eq(Cat(send_seq, rd.data)), ser.load.eq(can_send)]
        sent = can_send & ser.free
        with m.If(sent):
            m.d.sync += [send_seq.eq(send_seq + 1), self.frames_sent.eq(self.frames_sent + 1)]

        # --- return messages --------------------------------------------------------------------------------
        m.submodules.msg_deserializer = des = Deserializer(W, fmt.ret_beats, fmt.msg_beats, fmt.msg_crc)
        wiring.connect(m, wiring.flipped(self.i_ret), des.wire)
        msg, msg_pending, msg_good = des.word[:fmt.msg_bits], des.valid, des.crc_ok
        msg_ack, msg_freed, msg_nak = msg[:S], msg[S:2 * S], msg[2 * S]
        msg_ok = Signal()
        m.d.comb += msg_ok.eq(msg_pending & msg_good)
        with m.If(msg_pending & ~msg_good):
            m.d.sync += self.ret_crc_errors.eq(self.ret_crc_errors + 1)

        # Sanity: a message (CRC passed) must not claim frames never sent.
        ack_plausible = _sub(fmt, msg_ack, ack_base) <= _sub(fmt, next_seq, ack_base)
        freed_plausible = _sub(fmt, msg_freed, freed) <= _sub(fmt, msg_ack, freed)
        use = msg_ok & ack_plausible
        advance = use & (msg_ack != ack_base)
        with m.If(use & freed_plausible):
            m.d.sync += freed.eq(msg_freed)
        with m.If(use):
            m.d.sync += ack_base.eq(msg_ack)

        # --- timeout and go-back ----------------------------------------------------------------------------
        timer = Signal(range(self.timeout_cycles + 1))
        timeout = Signal()
        with m.If((send_seq == ack_base) | advance):
            m.d.sync += timer.eq(0)
        with m.Elif(timer == self.timeout_cycles - 1):
            m.d.sync += timer.eq(0)
            m.d.comb += timeout.eq(1)
        with m.Else():
            m.d.sync += timer.eq(timer + 1)
        nak = use & msg_nak
        with m.If(nak):
            m.d.sync += self.naks.eq(self.naks + 1)
        with m.If(timeout & ~nak):
            m.d.sync += self.timeouts.eq(self.timeouts + 1)
        # An ack beyond send_seq (possible after a go-back): skip the frames the receiver already has.
        overtaken = use & (_sub(fmt, msg_ack, ack_base) > _sub(fmt, send_seq, ack_base))
        with m.If(nak | timeout):
            m.d.sync += [self.replays.eq(self.replays + 1), send_seq.eq(Mux(nak, msg_ack, ack_base))]
        with m.Elif(overtaken):
            m.d.sync += send_seq.eq(msg_ack)
        return m


class LinkRx(wiring.Component):
    """Receiving side of a link (parameters as :class:`LinkTx`, less the timeout; ``latency`` only sets the
    format's delays).

    Timing (fault-free; the contract of :mod:`flowtile.link_format`): a frame whose last beat arrives in cycle
    ``t`` is checked and accepted in ``t + 1``; its first flit is offered from ``t + 2``, the others one a cycle as
    ``o.ready`` takes them. Return messages go back to back while ``run`` is high: message ``m`` starts (its
    serializer loads ``ack``, ``freed`` and the NAK flag as they stand in that cycle) in cycle ``m * ret_beats`` of
    the run, cycle 0 being the first with ``run = 1``; none starts while ``run = 0`` (one under way finishes).

    Flits out: the frame at ``freed`` is read from the credit buffer (a combinational read of its whole entry);
    its flits leave one a cycle, flit ``j`` carrying the lanes a :class:`LaneSequencer` (on ``segments`` and
    ``inference_flits``, stepped by each flit delivered, so it sees the sender's stream flit for flit) gives it.
    Its bytes start at byte ``pos`` of the data area (the carried lanes of the frame's flits before it), so flit
    byte ``b`` is byte lane ``(pos + b) mod lanes`` of word ``pos // lanes`` or the next: each byte lane selects its
    word of the entry (together one multiplexer over the frame's words, as wide as a flit's data), the result is
    rotated right by ``pos mod lanes`` bytes and masked to the carried lanes (the other lanes zero). The frame's
    ``count`` says which flit is its last.

    Members
    -------
    i_wire : In(:func:`link_wire_signature`) -- forward wire.
    run : In(1) -- return messages start only while it is high.
    segments : In(:func:`lane_table_layout`) -- the lane table, the sender's (all zero: every lane carried).
    inference_flits : In(:data:`~flowtile.hdl.layouts.LINK_INFERENCE_FLITS_BITS`) -- the sender's.
    o : Out(flit stream) -- flits of good in-order frames, in order: each one's carried lanes of its data, the
        other lanes zero, with ``dest_row = dest_col = 0`` and ``dest_host = 0``. A flit leaves chip ``k`` through
        its host port (``dest_host = 1``, addressed to tile (0,0), :meth:`flowtile.program.Program.validate`), only
        its carried data crosses the wire, and it enters chip ``k + 1`` addressed to its tile (0,0), the next chain
        position.
    o_ret : Out(:func:`link_wire_signature`) -- return wire (status messages, one after another).
    frames_accepted, crc_errors, seq_errors, duplicates, naks_sent, overflows : Out(32) -- frames accepted,
        dropped for a bad CRC, dropped for being ahead of the expected sequence number, dropped as already
        received, NAKs sent, and in-order frames dropped for want of room (never, if the sender honours credit).
    """

    def __init__(self, arch, *, bits=None, frame_flits=None, credit_frames=None, replay_frames=None, latency=None):
        self.format = fmt = LinkFormat(arch, bits=bits, frame_flits=frame_flits, credit_frames=credit_frames,
                                       replay_frames=replay_frames, latency=latency, owner="LinkRx")
        super().__init__({
            "i_wire": In(link_wire_signature(fmt.bits)),
            "run": In(1),
            "segments": In(lane_table_layout(arch)),
            "inference_flits": In(LINK_INFERENCE_FLITS_BITS),
            "o": Out(stream.Signature(fmt.flit_layout)),
            "o_ret": Out(link_wire_signature(fmt.bits)),
            "frames_accepted": Out(COUNTER_BITS), "crc_errors": Out(COUNTER_BITS), "seq_errors": Out(COUNTER_BITS),
            "duplicates": Out(COUNTER_BITS), "naks_sent": Out(COUNTER_BITS), "overflows": Out(COUNTER_BITS),
        })

    def elaborate(self, platform):
        fmt = self.format
        m = Module()
        FB, S, W = fmt.flit_data_bits, fmt.seq_bits, fmt.bits
        depth_bits = ceil_log2(fmt.credit_depth)
        rx_next, rx_freed = _seq(fmt), _seq(fmt)

        # --- deserialize and check ----------------------------------------------------------------------------
        m.submodules.frame_deserializer = des = Deserializer(W, fmt.frame_beats, fmt.payload_beats, fmt.frame_crc)
        wiring.connect(m, wiring.flipped(self.i_wire), des.wire)
        frame, pending, crc_ok = des.word[:fmt.payload_bits], des.valid, des.crc_ok
        seq = frame[:S]
        room = _sub(fmt, rx_next, rx_freed) < fmt.credit_frames
        ahead = _sub(fmt, seq, rx_next)
        accept = Signal()
        m.d.comb += accept.eq(pending & crc_ok & (seq == rx_next) & room)

        m.submodules.buffer = buffer = Memory(shape=unsigned(fmt.count_bits + fmt.flits_bits),
                                              depth=fmt.credit_depth, init=[])
        wr = buffer.write_port()
        rd = buffer.read_port(domain="comb")
        m.d.comb += [wr.addr.eq(rx_next[:depth_bits] if depth_bits else 0), wr.data.eq(frame[S:]),
                     wr.en.eq(accept)]

        nak_pending, nak_sent = Signal(), Signal()
        nak_request = Signal()
        with m.If(accept):
            m.d.sync += [rx_next.eq(rx_next + 1), self.frames_accepted.eq(self.frames_accepted + 1)]
        with m.Elif(pending & ~crc_ok):
            m.d.sync += self.crc_errors.eq(self.crc_errors + 1)
            m.d.comb += nak_request.eq(1)
        with m.Elif(pending & (seq == rx_next)):
            m.d.sync += self.overflows.eq(self.overflows + 1)
        with m.Elif(pending & (ahead < (1 << (S - 1)))):
            m.d.sync += self.seq_errors.eq(self.seq_errors + 1)
            m.d.comb += nak_request.eq(1)
        with m.Elif(pending):
            m.d.sync += self.duplicates.eq(self.duplicates + 1)

        # --- flits out: flit `index` of the frame at rx_freed, its bytes from byte `pos` of the data area --------
        deliver = Signal()
        m.submodules.lanes = lanes = LaneSequencer(fmt.arch)
        m.d.comb += [lanes.segments.eq(self.segments), lanes.inference_flits.eq(self.inference_flits),
                     lanes.advance.eq(deliver), deliver.eq(self.o.valid & self.o.ready)]
        index = Signal(range(fmt.frame_bytes))
        pos = Signal(range(fmt.frame_bytes + 1))
        count_m1 = rd.data[:fmt.count_bits]
        # Flit byte b is frame byte pos + b: byte lane (offset + b) mod L of word `word` (lanes offset ..) or
        # `word + 1` (lanes .. offset - 1). Each byte lane picks its word (one multiplexer over the frame's words,
        # as for whole flits; a zero word past the end), then the lanes are rotated right by `offset` and masked.
        L = fmt.lanes
        lane_bits = ceil_log2(L)
        offset, word = pos[:lane_bits], pos[lane_bits:]
        area = Cat(rd.data[fmt.count_bits:], Const(0, FB))
        picked = []
        for lane in range(L):
            column = Cat(*[area[(k * L + lane) * 8:(k * L + lane) * 8 + 8] for k in range(fmt.frame_flits + 1)])
            row = Signal(range(fmt.frame_flits + 1), name=f"out_word{lane}")
            m.d.comb += row.eq(word + (lane < offset))
            picked.append(column.word_select(row, 8))
        merged = Signal(FB)
        m.d.comb += merged.eq(Cat(*picked))
        flit = Signal(FB)
        m.d.comb += flit.eq(_rotate_bytes(m, merged, offset, False, "out_rotate") & _lane_mask(fmt, lanes.lanes))
        m.d.comb += [rd.addr.eq(rx_freed[:depth_bits] if depth_bits else 0),
                     self.o.valid.eq(rx_next != rx_freed),
                     # the flit rebuilt: its carried lanes (the others zero), addressed to tile (0,0)
                     self.o.payload.data.eq(flit), self.o.payload.dest_row.eq(0), self.o.payload.dest_col.eq(0),
                     self.o.payload.dest_host.eq(0)]
        with m.If(deliver):
            with m.If(index == count_m1):
                m.d.sync += [index.eq(0), pos.eq(0), rx_freed.eq(rx_freed + 1)]
            with m.Else():
                m.d.sync += [index.eq(index + 1), pos.eq(pos + lanes.lanes)]

        # --- return messages: back to back while running, each with the current ack, freed and NAK -------------
        m.submodules.msg_serializer = ser = Serializer(W, fmt.msg_beats, fmt.msg_crc)
        wiring.connect(m, ser.wire, wiring.flipped(self.o_ret))
        m.d.comb += [ser.payload.eq(Cat(rx_next, rx_freed, nak_pending)), ser.load.eq(self.run)]
        with m.If(ser.free & self.run & nak_pending):
            m.d.sync += [nak_pending.eq(0), nak_sent.eq(1), self.naks_sent.eq(self.naks_sent + 1)]
        with m.If(nak_request & ~nak_sent & ~nak_pending):
            m.d.sync += nak_pending.eq(1)
        with m.If(accept):   # a new expected frame: a NAK for the old one is stale, a new loss earns a NAK
            m.d.sync += [nak_pending.eq(0), nak_sent.eq(0)]
        return m


class LinkChannel(wiring.Component):
    """One direction of the wire: ``latency`` register stages, then a fault injector implementing the fault model of
    :mod:`flowtile.link_faults` (the definition: lines, LFSRs, seeds, the per-line and burst rules).

    Each line (``data``, ``valid``, ``first``) has its own 32-bit LFSR (seeded from ``seed`` and the line's index,
    :func:`lfsr_seed`), stepped 16 times a cycle of the run; without bursts a line flips when its LFSR's low 16
    bits are below ``round(error_rate * 2**16)``: a flip probability of ``error_rate`` per line per cycle. With
    ``burst_cycles > 1`` one more LFSR starts bursts of ``burst_cycles`` cycles in which each line flips when bit
    15 of its LFSR is 1.

    Parameters
    ----------
    bits : int -- data bits of the wire, 1..1024.
    latency : int -- 1..65536 stages.
    error_rate : float -- 0.0 (no faults) .. 0.5.
    burst_cycles : int -- 1 (no bursts) .. 4096.
    seed : int -- 1..2**32 - 1 (ignored with ``seed_port``).
    seed_port : bool -- the seed comes from the input port ``seed`` instead (one circuit for any seed, so that a
        Verilog module is written once for links that differ only in their seeds). The port must hold a constant
        1..2**32 - 1 from reset on: the LFSRs take :func:`lfsr_seed` of it in the first cycle with ``run = 1``, so
        the flips are cycle for cycle those of the constant form with that seed.

    Members
    -------
    i : In(:func:`link_wire_signature`);  o : Out(:func:`link_wire_signature`)
    run : In(1, init 1) -- the injector counts only cycles with ``run = 1`` (its LFSRs step and lines flip only
        then): run cycle ``r`` of a system sees the same flips whatever happened before the run.
    seed : In(32), only with ``seed_port``.
    flips : Out(32) -- line flips so far.
    """

    def __init__(self, bits, *, latency, error_rate=0.0, seed=1, seed_port=False, burst_cycles=1):
        self.bits = check_int("LinkChannel", "bits", bits, 1, 1024)
        self.latency = check_int("LinkChannel", "latency", latency, 1, 65536)
        self.threshold = line_threshold("LinkChannel", error_rate, burst_cycles)
        self.burst_threshold = burst_threshold("LinkChannel", error_rate, burst_cycles)
        self.error_rate, self.burst_cycles = error_rate, burst_cycles
        if not isinstance(seed_port, bool):
            raise TypeError(f"LinkChannel: parameter 'seed_port' must be a bool, got {seed_port!r}")
        self.seed_port = seed_port
        members = {"i": In(link_wire_signature(bits)), "o": Out(link_wire_signature(bits)), "run": In(1, init=1),
                   "flips": Out(COUNTER_BITS)}
        if seed_port:
            members["seed"] = In(32)
        else:
            self.seed = check_int("LinkChannel", "seed", seed, 1, (1 << 32) - 1)
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        width = channel_lines(self.bits)
        value = Cat(self.i.data, self.i.valid, self.i.first)
        for stage in range(self.latency):
            reg = Signal(width, name=f"stage{stage}")
            m.d.sync += reg.eq(value)
            value = reg
        if self.threshold == 0 and self.burst_threshold == 0:
            m.d.comb += Cat(self.o.data, self.o.valid, self.o.first).eq(value)
            return m
        masks = lfsr_step_matrix(STEPS_PER_CYCLE)
        flip = Signal(width)
        run = self.run
        if self.seed_port:
            # lfsr_seed in hardware, used in the first run cycle (seeded = 0) instead of the state.
            seeded = Signal()
            with m.If(run):
                m.d.sync += seeded.eq(1)
            mixed = Signal(32)
            m.d.comb += mixed.eq((self.seed * LFSR_SEED_MULTIPLIER)[:32])

        def lfsr(line):
            if self.seed_port:
                state = Signal(32, name=f"lfsr{line}")
                initial = Signal(32, name=f"lfsr{line}_seed")
                m.d.comb += initial.eq((mixed + ((line + 1) * LFSR_SEED_STRIDE & 0xFFFFFFFF))[:32])
                current = Signal(32, name=f"lfsr{line}_now")
                m.d.comb += current.eq(Mux(seeded, state, Mux(initial == 0, 1, initial)))
            else:
                state = current = Signal(32, init=lfsr_seed(self.seed, line), name=f"lfsr{line}")
            with m.If(run):
                m.d.sync += state.eq(Cat(*[(current & Const(mask, 32)).xor() for mask in masks]))
            return current

        active = Const(0, 1)
        if self.burst_threshold:
            burst = lfsr(width)
            left = Signal(range(self.burst_cycles), name="burst_left")
            start = Signal(name="burst_start")
            active = Signal(name="burst_active")
            m.d.comb += [start.eq(run & (left == 0) & (burst < self.burst_threshold)),
                         active.eq(start | (left != 0))]
            with m.If(run):
                with m.If(start):
                    m.d.sync += left.eq(self.burst_cycles - 1)
                with m.Elif(left != 0):
                    m.d.sync += left.eq(left - 1)
        for line in range(width):
            current = lfsr(line)
            m.d.comb += flip[line].eq(run & Mux(active, current[BURST_FLIP_BIT],
                                                current[:THRESHOLD_BITS] < self.threshold))
        m.d.comb += Cat(self.o.data, self.o.valid, self.o.first).eq(value ^ flip)
        m.d.sync += self.flips.eq(self.flips + sum(flip[b] for b in range(width)))
        return m


def link_signature(fmt: LinkFormat, *, seed_port: bool = False) -> wiring.Signature:
    """The ports of :class:`Link` (component's view) for ``fmt``; with ``seed_port`` also ``seed`` (In 32)."""
    members = {"i": In(stream.Signature(fmt.flit_layout)), "o": Out(stream.Signature(fmt.flit_layout)),
               "run": In(1), "inference_flits": In(LINK_INFERENCE_FLITS_BITS),
               "segments": In(lane_table_layout(fmt.arch))}
    if seed_port:
        members["seed"] = In(32)
    members.update({"tx_ack": Out(fmt.seq_bits), "tx_freed": Out(fmt.seq_bits),
                    "fwd_flips": Out(COUNTER_BITS), "ret_flips": Out(COUNTER_BITS)})
    members.update({f"tx_{name}": Out(COUNTER_BITS) for name in Link.TX_COUNTERS})
    members.update({f"rx_{name}": Out(COUNTER_BITS) for name in Link.RX_COUNTERS})
    return wiring.Signature(members)


class Link(wiring.Component):
    """A whole link: :class:`LinkTx` -> forward :class:`LinkChannel` -> :class:`LinkRx`, and the return
    channel back. Parameters default to ``arch``'s ``link_*`` fields; the return channel's injector is
    seeded with :func:`ret_seed` of ``seed`` and flips at ``ret_error_rate`` (default: ``error_rate``); both channels
    have bursts of ``burst_cycles`` (default ``arch.link_burst_cycles``) and count cycles with ``run = 1``.
    With ``seed_port`` the seed is the input port ``seed`` (see :class:`LinkChannel`; the return channel gets
    :func:`ret_seed` of it, computed in hardware) and the ``seed`` parameter is ignored.

    Members (:func:`link_signature`)
    -------
    i : In(flit stream; only ``data`` crosses);  o : Out(flit stream; addressed to tile (0,0), see :class:`LinkRx`)
    run : In(1) -- to :class:`LinkRx` (return messages start only while it is high).
    inference_flits : In(24) -- to :class:`LinkTx` and :class:`LinkRx` (static framing, the inference boundaries
        of the lane table).
    segments : In(:func:`lane_table_layout`) -- the lane table, to :class:`LinkTx` and :class:`LinkRx`.
    seed : In(32), only with ``seed_port``.
    tx_ack, tx_freed : Out(``seq_bits``) -- :class:`LinkTx`'s ``ack`` and ``freed``.
    plus the status counters of the pieces, prefixed: ``tx_*`` (:class:`LinkTx`), ``rx_*`` (:class:`LinkRx`),
    ``fwd_flips``, ``ret_flips``.
    """

    TX_COUNTERS = ("frames_sent", "replays", "naks", "timeouts", "ret_crc_errors")
    RX_COUNTERS = ("frames_accepted", "crc_errors", "seq_errors", "duplicates", "naks_sent", "overflows")

    def __init__(self, arch, *, bits=None, frame_flits=None, credit_frames=None, replay_frames=None,
                 latency=None, error_rate=None, ret_error_rate=None, seed=None, timeout_cycles=None,
                 seed_port=False, burst_cycles=None):
        check_arch(arch, "Link")
        error_rate = arch.link_error_rate if error_rate is None else error_rate
        burst_cycles = arch.link_burst_cycles if burst_cycles is None else burst_cycles
        seed = arch.link_error_seed if seed is None else seed
        self.tx = LinkTx(arch, bits=bits, frame_flits=frame_flits, credit_frames=credit_frames,
                         replay_frames=replay_frames, latency=latency, timeout_cycles=timeout_cycles)
        self.format = fmt = self.tx.format
        self.rx = LinkRx(arch, bits=fmt.bits, frame_flits=fmt.frame_flits, credit_frames=fmt.credit_frames,
                         replay_frames=fmt.replay_frames, latency=fmt.latency)
        if not isinstance(seed_port, bool):
            raise TypeError(f"Link: parameter 'seed_port' must be a bool, got {seed_port!r}")
        self.seed_port = seed_port
        self.fwd = LinkChannel(fmt.bits, latency=fmt.latency, error_rate=error_rate, seed=seed, seed_port=seed_port,
                               burst_cycles=burst_cycles)
        self.ret = LinkChannel(fmt.bits, latency=fmt.latency, seed_port=seed_port, burst_cycles=burst_cycles,
                               seed=ret_seed(seed) if isinstance(seed, int) and not isinstance(seed, bool) else seed,
                               error_rate=error_rate if ret_error_rate is None else ret_error_rate)
        super().__init__(link_signature(fmt, seed_port=seed_port))

    def elaborate(self, platform):
        m = Module()
        m.submodules.tx, m.submodules.rx = self.tx, self.rx
        m.submodules.fwd, m.submodules.ret = self.fwd, self.ret
        wiring.connect(m, wiring.flipped(self.i), self.tx.i)
        wiring.connect(m, self.tx.o_wire, self.fwd.i)
        wiring.connect(m, self.fwd.o, self.rx.i_wire)
        wiring.connect(m, self.rx.o, wiring.flipped(self.o))
        wiring.connect(m, self.rx.o_ret, self.ret.i)
        wiring.connect(m, self.ret.o, self.tx.i_ret)
        m.d.comb += [self.rx.run.eq(self.run), self.fwd.run.eq(self.run), self.ret.run.eq(self.run),
                     self.tx.inference_flits.eq(self.inference_flits), self.rx.inference_flits.eq(self.inference_flits),
                     self.tx.segments.eq(self.segments), self.rx.segments.eq(self.segments),
                     self.tx_ack.eq(self.tx.ack), self.tx_freed.eq(self.tx.freed)]
        if self.seed_port:
            m.d.comb += [self.fwd.seed.eq(self.seed),
                         self.ret.seed.eq(Mux(self.seed == (1 << 32) - 1, 1, self.seed + 1))]
        m.d.comb += [self.fwd_flips.eq(self.fwd.flips), self.ret_flips.eq(self.ret.flips)]
        m.d.comb += [getattr(self, f"tx_{n}").eq(getattr(self.tx, n)) for n in self.TX_COUNTERS]
        m.d.comb += [getattr(self, f"rx_{n}").eq(getattr(self.rx, n)) for n in self.RX_COUNTERS]
        return m
