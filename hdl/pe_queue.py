"""The PE's forward queue: a FIFO kept in a circular region of the tile's SRAM (docs/architecture.md section 4,
bullet "Forward queue" and the rule of the same name)."""
from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, unsigned
from amaranth.lib import stream, wiring
from amaranth.lib.memory import ReadPort
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2

from flowtile.arch import Arch

from .layouts import check_arch, config_layout
from .pe_loader import sram_write_signature

__all__ = ["ForwardQueue"]


class ForwardQueue(wiring.Component):
    """Forward queue of a PE (docs/architecture.md section 4, bullet "Forward queue" and rule "Forward queue"): a
    FIFO of ``F = config.queue_words`` words whose words live in the tile's SRAM, in the circular region
    ``[queue_base, queue_base + F)`` (registers ``queue_base``, ``queue_words``; any ``F``, not necessarily a power
    of two).

    Contract (the router FIFO's rule, section 3, as :class:`~amaranth.lib.fifo.SyncFIFO` has it):

    * ``w_stream.ready`` is ``run`` and "fewer than ``F`` words held", also in a cycle in which a word is popped (a
      full queue is not pushable in a cycle in which it is popped); ``F = 0`` (a tile that queues nothing) is never
      pushable.
    * ``r_stream.valid`` is ``run`` and "at least one word held", a registered count: it never depends on
      ``r_stream.ready``. A word pushed in cycle ``t`` can be popped from ``t + 1``; words leave in push order, the
      head word on ``r_stream.payload`` in every cycle ``r_stream.valid`` is high.
    * ``run = 0`` empties the queue (from the next cycle; while ``run = 0`` it neither takes nor offers a word).
      The SRAM keeps the words.

    Storage: push ``i`` (counted from the last ``run = 0``) writes SRAM word ``queue_base + (i mod F)`` through
    ``sram_write`` in its cycle. The payload comes from a synchronous read port, ``sram_read``, which the queue
    addresses one cycle ahead: in every cycle it reads ``queue_base + h'``, ``h'`` the head offset of the next cycle
    (the head advanced, modulo ``F``, iff this cycle pops: ``sram_read.addr`` may depend on ``r_stream.ready``,
    ``r_stream.valid`` does not), so that the next cycle's head word is on ``sram_read.data``. The read port must be
    transparent for ``sram_write`` (:meth:`Memory.read_port(transparent_for=...)
    <amaranth.lib.memory.Memory.read_port>`): a word pushed into an empty queue in cycle ``t`` is read in ``t`` and is
    the payload in ``t + 1``. No other write port may write the region while ``run = 1``
    (:meth:`TileConfig.validate <flowtile.tile_config.TileConfig.validate>` keeps it apart from the activation banks
    and the weights); the queue reads no other SRAM word. A PE of several contexts (section 4.6) shares one read
    port between its contexts' queues and serves, each cycle, the read address of the queue the output side pops in
    the next cycle: only that queue's payload is then meaningful, which is the one the output side reads.

    The head and tail offsets (``0 .. F - 1``) and the count of words held (``0 .. F``) are registers as wide as
    ``queue_words``: the FIFO behaves for every value the register holds; the SRAM addresses are
    ``queue_base + offset`` truncated to the port width, so only a region inside the SRAM (``queue_base + F <=
    sram_words``, as validation requires) keeps words apart from the rest of the SRAM. The registers must not change
    while ``run = 1``.

    Parameters
    ----------
    arch : :class:`flowtile.arch.Arch`

    Members
    -------
    config : ``In(config_layout())``
        The PE's registers; the queue reads ``queue_base`` and ``queue_words``.
    run : ``In(1)``
    w_stream : ``In(stream.Signature(unsigned(arch.flit_data_bits)))``
        Pushes (from the input side).
    r_stream : ``Out(stream.Signature(unsigned(arch.flit_data_bits)))``
        Pops (to the output side).
    sram_write : ``In(sram_write_signature(arch))``
        Drives an SRAM write port of its own (``WritePort.Signature(addr_width=ceil_log2(arch.sram_words),
        shape=unsigned(arch.flit_data_bits))``).
    sram_read : ``In(ReadPort.Signature(addr_width=ceil_log2(arch.sram_words),
        shape=unsigned(arch.flit_data_bits)))``
        Drives a synchronous SRAM read port, transparent for ``sram_write``'s port.
    """

    def __init__(self, arch: Arch):
        check_arch(arch, "ForwardQueue")
        self.arch = arch
        word = unsigned(arch.flit_data_bits)
        super().__init__({
            "config": In(config_layout()),
            "run": In(1),
            "w_stream": In(stream.Signature(word)),
            "r_stream": Out(stream.Signature(word)),
            "sram_write": In(sram_write_signature(arch)),
            "sram_read": In(ReadPort.Signature(addr_width=ceil_log2(arch.sram_words), shape=word)),
        })

    def elaborate(self, platform):
        m = Module()
        config, run = self.config, self.run
        words = config.queue_words                      # F
        head = Signal.like(words)                       # offset of the oldest word held
        tail = Signal.like(words)                       # offset the next push writes
        level = Signal.like(words)                      # words held, 0 .. F

        def advanced(offset):
            """``offset + 1`` modulo ``F`` (``offset < F``)."""
            return Mux(offset + 1 == words, 0, offset + 1)

        m.d.comb += [
            self.w_stream.ready.eq(run & (level < words)),
            self.r_stream.valid.eq(run & (level != 0)),
        ]
        push = self.w_stream.valid & self.w_stream.ready
        pop = self.r_stream.valid & self.r_stream.ready
        next_head = Signal.like(head)
        m.d.comb += [
            next_head.eq(Mux(pop, advanced(head), head)),
            self.sram_write.addr.eq(config.queue_base + tail),
            self.sram_write.data.eq(self.w_stream.payload),
            self.sram_write.en.eq(push),
            # One cycle ahead: the next cycle's head word (transparent for sram_write: a word pushed now).
            self.sram_read.addr.eq(config.queue_base + next_head),
            self.sram_read.en.eq(1),
            self.r_stream.payload.eq(self.sram_read.data),
        ]
        m.d.sync += [head.eq(next_head), level.eq(level + push - pop)]
        with m.If(push):
            m.d.sync += tail.eq(advanced(tail))
        with m.If(~run):
            m.d.sync += [head.eq(0), tail.eq(0), level.eq(0)]
        return m
