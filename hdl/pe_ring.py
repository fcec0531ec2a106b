"""The PE's result ring (docs/architecture.md section 4, bullet "Result ring")."""
from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, unsigned
from amaranth.lib import stream, wiring
from amaranth.lib.memory import Memory, WritePort
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2

from .layouts import LANE_BITS

__all__ = ["ResultRing"]


class ResultRing(wiring.Component):
    """Ring of ``depth`` result words of ``lanes`` int8 lanes (docs/architecture.md section 4, bullet "Result
    ring"; any ``depth >= 1``, not necessarily a power of two).

    Result words are numbered across inferences; word ``j`` lives in slot ``j mod depth``. The writer
    (the compute pipeline) computes slots itself and writes through ``write`` (lane-granular). The ring
    keeps two registered counts: occupancy, words whose first issue was announced on ``word_issued``
    minus words sent, and ready words, words whose completion was announced on ``word_written`` minus
    words sent. ``free = (occupancy < depth)``.

    ``words`` streams the oldest unsent word: ``valid`` iff the ready count is non-zero (never
    depending on ``ready``), ``payload`` the word at the read slot through a combinational port, so a
    word completed in cycle ``w`` can be sent from ``w + 1``; a transfer advances the read slot (modulo
    ``depth``). ``clear`` (synchronous) empties the ring: both counts and the read slot return to 0; the
    contents stay.

    Parameters
    ----------
    depth : int
        Slots, ``>= 1``.
    lanes : int
        Lanes a word, ``>= 1``.

    Members
    -------
    write : ``Out(WritePort.Signature(addr_width=ceil_log2(depth), shape=unsigned(8 * lanes),
        granularity=8))``
    word_issued : ``In(1)``
    word_written : ``In(1)``
    free : ``Out(1)``
    words : ``Out(stream.Signature(unsigned(8 * lanes)))``
    clear : ``In(1)``
    """

    def __init__(self, depth: int, lanes: int):
        for name, value in (("depth", depth), ("lanes", lanes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TypeError(f"ResultRing: parameter '{name}' must be a positive integer, got {value!r}")
        self.depth, self.lanes = depth, lanes
        word = unsigned(LANE_BITS * lanes)
        super().__init__({
            "write": Out(WritePort.Signature(addr_width=ceil_log2(depth), shape=word, granularity=LANE_BITS)),
            "word_issued": In(1),
            "word_written": In(1),
            "free": Out(1),
            "words": Out(stream.Signature(word)),
            "clear": In(1),
        })

    def elaborate(self, platform):
        m = Module()
        depth = self.depth
        m.submodules.memory = memory = Memory(shape=unsigned(LANE_BITS * self.lanes), depth=depth, init=[])
        wiring.connect(m, wiring.flipped(self.write), memory.write_port(granularity=LANE_BITS))
        read = memory.read_port(domain="comb")

        occupancy = Signal(range(depth + 1))
        written = Signal(range(depth + 1))
        read_slot = Signal(range(depth))
        sent = self.words.valid & self.words.ready
        m.d.comb += [
            self.free.eq(occupancy < depth),
            read.addr.eq(read_slot),
            self.words.payload.eq(read.data),
            self.words.valid.eq(written != 0),
        ]
        with m.If(sent):
            m.d.sync += read_slot.eq(Mux(read_slot == depth - 1, 0, read_slot + 1))
        m.d.sync += [
            occupancy.eq(occupancy + self.word_issued - sent),
            written.eq(written + self.word_written - sent),
        ]
        with m.If(self.clear):
            m.d.sync += [read_slot.eq(0), occupancy.eq(0), written.eq(0)]
        return m
