"""A multi-chip system: ``arch.chips`` chips in a line (or a ring), each joined to the next by an inter-chip link
(docs/architecture.md section 12; issue "multi-chip").

::

    line: i_host --> chip 0 --o_host--> link 0 --> chip 1 --o_host--> link 1 --> ... --> chip n-1 --o_host--> o_host
    ring: i_host --> chip 0 --o_host--> link 0 --> chip 1 --o_host--> link 1 --> ... --> chip n-1 --o_host--> link n-1
                                                                                                      --> o_host

Chip ``k``'s host output feeds link ``k`` (:class:`flowtile.hdl.link.Link`), whose output feeds chip ``k + 1``'s host
input: only the flits' data crosses the link, and each flit enters chip ``k + 1`` addressed to its tile (0,0)
(``dest_row = dest_col = dest_host = 0``), the next chain position (chip ``k``'s exit tile sends to tile (0,0) with
``dest_host = 1``, :meth:`flowtile.program.Program.validate`). In a ring (``arch.chip_topology = "ring"``) the host
is attached to chip 0's board only: one more link, link ``n - 1`` (the return link), carries the last chip's host
output back to chip 0's board, where its receiver is the system's host output (its flits as the receiver rebuilds
them: the data, destination fields 0; no chip takes them in). The system's ports are the chip's (``load``, ``run``,
``i_host``, ``o_host``), so a harness built for a :class:`~flowtile.hdl.chip.Chip` drives a System unchanged; the
load bus has a ``chip`` field (:func:`flowtile.hdl.layouts.load_layout`) and one more target, the link registers.
With ``arch.chips = 1`` a System is one chip (no link) that takes only the load writes with ``chip = 0``.
"""
from __future__ import annotations

from amaranth.hdl import ClockSignal, Const, Instance, Module, ResetSignal, Shape, Signal, Value
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from flowtile.arch import Arch
from flowtile.link_faults import link_seed  # the seed rule is the spec's (re-exported here)
from flowtile.link_format import LINK_LANE_SEGMENTS
from flowtile.program import link_count

from .chip import TILE_FORMS, TILE_MODULE_NAME, Chip
from .layouts import (LINK_INFERENCE_FLITS_BITS, LINK_REG_INFERENCE_FLITS, LINK_REG_LANE_SEGMENT0, LOAD_TARGET_LINK,
                      check_arch, flit_signature, load_signature)
from .link import COUNTER_BITS, Link, LinkFormat, lane_table_layout, link_signature

__all__ = ["System", "LINK_MODULE_NAME", "LINK_STATUS_COUNTERS", "link_seed", "link_status_signature"]

#: Default Verilog module name of the shared link (``Link(arch, seed_port=True)``) in the instance form.
LINK_MODULE_NAME = "flowtile_link"
#: The 32-bit status counters of a link the system brings out (:class:`flowtile.hdl.link.Link`'s names).
LINK_STATUS_COUNTERS = tuple(f"tx_{name}" for name in Link.TX_COUNTERS) + \
    tuple(f"rx_{name}" for name in Link.RX_COUNTERS) + ("fwd_flips", "ret_flips")


def link_status_signature(fmt: LinkFormat) -> wiring.Signature:
    """What the system shows of each link (driver's view): ``inference_flits`` (the register, 24 bits),
    ``tx_ack`` and ``tx_freed`` (the sender's view of the receiver, ``seq_bits`` each) and the 32-bit counters of
    :data:`LINK_STATUS_COUNTERS` (wrapping)."""
    members = {"inference_flits": Out(LINK_INFERENCE_FLITS_BITS),
               "tx_ack": Out(fmt.seq_bits), "tx_freed": Out(fmt.seq_bits)}
    members.update({name: Out(COUNTER_BITS) for name in LINK_STATUS_COUNTERS})
    return wiring.Signature(members)


class System(wiring.Component):
    """``arch.chips`` :class:`~flowtile.hdl.chip.Chip`\\ s of ``arch`` in a line, joined by ``arch.chips - 1`` links, or
    in a ring, with one more link from the last chip to the host output (:func:`flowtile.program.link_count`).

    Parameters
    ----------
    arch : :class:`~flowtile.arch.Arch`; ``rows`` x ``cols`` is one chip, the ``link_*`` fields set every link
        (``bits = arch.link_bits``, latency, frame, credit and replay frames, error rate and burst length; link
        ``k``'s seed is :func:`link_seed` of ``arch.link_error_seed`` and ``k``, :mod:`flowtile.link_faults`; the
        injectors count the cycles with ``run = 1``, so run cycle ``r`` sees the flips the emulator predicts).
        ``chip_topology``: ``"line"``, or ``"ring"`` (link ``chips - 1`` from the last chip to ``o_host``).
    tiles, tile_module : as :class:`~flowtile.hdl.chip.Chip` (every chip holds its tiles that way).
    link_module : ``None`` (default): each link is a :class:`~flowtile.hdl.link.Link` submodule (what Amaranth's
        simulator needs); a Verilog identifier: each link is an ``Instance`` of that module, which must be
        ``Link(arch, seed_port=True)`` converted under that name (:func:`flowtile.hdl.verilog.system_verilog` does
        both). Every link of a system is the same circuit but for its seed, which arrives on the link's ``seed``
        port as a constant; both forms are that circuit.

    Members
    -------
    load : ``In(load_signature(arch))`` -- a write goes to chip ``k`` iff ``payload.chip = k`` and its target is not
        :data:`~flowtile.hdl.layouts.LOAD_TARGET_LINK` (the chip decodes ``tile``, ``target``, ``addr`` as ever). A
        write with target ``LOAD_TARGET_LINK``, ``chip = k`` while ``run = 0`` sets a register of link ``k``
        from the next cycle (all 0 after reset): ``addr = 0``
        (:data:`~flowtile.hdl.layouts.LINK_REG_INFERENCE_FLITS`) its ``inference_flits`` to the low 24 bits of
        ``data``; ``addr = LINK_REG_LANE_SEGMENT0 + s`` (``s <``
        :data:`~flowtile.link_format.LINK_LANE_SEGMENTS`) entry ``s`` of its lane table to the low bits of
        ``data`` (the entry's size, :func:`~flowtile.hdl.link.lane_table_layout`: the segment as
        :func:`~flowtile.link_format.encode_lane_segment` encodes it, 0 for an unused entry). Both go to the
        link's sender and receiver. Other link addresses, and chips or links that do not exist, are ignored.
    run : ``In(1)`` -- to every chip and every link (return messages start with it: the timing contract's cycle 0 is
        the first cycle with ``run = 1``; keep it high for the whole run).
    i_host : ``In(flit stream)`` -- chip 0's host input.
    o_host : ``Out(flit stream)`` -- the last chip's host output; in a ring the output of link ``chips - 1`` (the
        last chip's host output after the return link: the flits' data, ``dest_row = dest_col = dest_host = 0``).
    link0, link1, ... : ``Out(link_status_signature(...))``, one per link (none with one chip; ``chips`` of them in a
        ring) -- flattened
        ``link{k}__inference_flits``, ``link{k}__tx_ack``, ``link{k}__tx_freed``, ``link{k}__tx_frames_sent``,
        ... (:data:`LINK_STATUS_COUNTERS`).

    Attributes: ``chips`` (the :class:`Chip` of each position) and ``links`` (the :class:`Link`\\ s; empty in the
    instance form).
    """

    def __init__(self, arch: Arch, *, tiles: str = "submodules", tile_module: str = TILE_MODULE_NAME,
                 link_module: str | None = None):
        self.arch = check_arch(arch, "System")
        if tiles not in TILE_FORMS:
            raise ValueError(f"System: parameter 'tiles' must be one of {', '.join(map(repr, TILE_FORMS))}, "
                             f"got {tiles!r}")
        if not isinstance(tile_module, str) or not tile_module.isidentifier():
            raise ValueError(f"System: parameter 'tile_module' must be a Verilog identifier, got {tile_module!r}")
        if link_module is not None:
            if not isinstance(link_module, str) or not link_module.isidentifier():
                raise ValueError(f"System: parameter 'link_module' must be None or a Verilog identifier, "
                                 f"got {link_module!r}")
            if link_module == tile_module:
                raise ValueError(f"System: parameters 'link_module' and 'tile_module' must differ, both are "
                                 f"{link_module!r}")
        self.tiles, self.tile_module, self.link_module = tiles, tile_module, link_module
        self.n_links = link_count(arch)    # a ring: one more, the return link to the host output
        self.format = LinkFormat(arch, owner="System")
        members = {
            "load": In(load_signature(arch)),
            "run": In(1),
            "i_host": In(flit_signature(arch)),
            "o_host": Out(flit_signature(arch)),
        }
        members.update({f"link{k}": Out(link_status_signature(self.format)) for k in range(self.n_links)})
        super().__init__(members)
        self.chips = [Chip(arch, tiles=tiles, tile_module=tile_module) for _ in range(arch.chips)]
        self.links = [Link(arch, seed_port=True) for _ in range(self.n_links)] if link_module is None else []

    def elaborate(self, platform):
        m = Module()
        arch, load = self.arch, self.load.payload
        for k, chip in enumerate(self.chips):
            m.submodules[f"chip{k}"] = chip
            m.d.comb += [chip.load.valid.eq(self.load.valid & (load.chip == k) & (load.target != LOAD_TARGET_LINK)),
                         chip.load.payload.eq(load), chip.run.eq(self.run)]
        wiring.connect(m, wiring.flipped(self.i_host), self.chips[0].i_host)
        if self.n_links < arch.chips:  # a line: the last chip's host output is the system's (a ring: its return link's)
            wiring.connect(m, self.chips[-1].o_host, wiring.flipped(self.o_host))

        link_write = self.load.valid & ~self.run & (load.target == LOAD_TARGET_LINK)
        table_layout = lane_table_layout(arch)
        entry_bits = table_layout.elem_shape.size
        for k in range(self.n_links):
            register = Signal(LINK_INFERENCE_FLITS_BITS, name=f"link{k}_inference_flits")
            segments = Signal(table_layout, name=f"link{k}_segments")
            with m.If(link_write & (load.chip == k)):
                with m.Switch(load.addr):
                    with m.Case(LINK_REG_INFERENCE_FLITS):
                        m.d.sync += register.eq(load.data[:LINK_INFERENCE_FLITS_BITS])
                    for s in range(LINK_LANE_SEGMENTS):
                        with m.Case(LINK_REG_LANE_SEGMENT0 + s):
                            m.d.sync += segments[s].eq(load.data[:entry_bits])
            status = getattr(self, f"link{k}")
            m.d.comb += status.inference_flits.eq(register)
            # link k feeds chip k + 1; a ring's return link (k = chips - 1) the host output on chip 0's board
            returns = k + 1 == arch.chips
            source, sink = self.chips[k].o_host, self.o_host if returns else self.chips[k + 1].i_host
            seed = Const(link_seed(arch.link_error_seed, k), 32)
            if self.link_module is None:
                link = m.submodules[f"link{k}"] = self.links[k]
                wiring.connect(m, source, link.i)
                wiring.connect(m, link.o, wiring.flipped(sink) if returns else sink)
                m.d.comb += [link.run.eq(self.run), link.inference_flits.eq(register), link.segments.eq(segments),
                             link.seed.eq(seed)]
                m.d.comb += [getattr(status, name).eq(getattr(link, name))
                             for name in ("tx_ack", "tx_freed", *LINK_STATUS_COUNTERS)]
            else:
                nets = {"run": self.run, "inference_flits": register, "segments": segments.as_value(), "seed": seed}
                for port, stream in (("i", source), ("o", sink)):
                    for field in ("payload", "valid", "ready"):
                        nets[f"{port}__{field}"] = Value.cast(getattr(stream, field))
                for name in ("tx_ack", "tx_freed", *LINK_STATUS_COUNTERS):
                    nets[name] = getattr(status, name)
                connections = [("i", "clk", ClockSignal()), ("i", "rst", ResetSignal())]
                for path, member in link_signature(self.format, seed_port=True).members.flatten():
                    if not member.is_port:
                        continue
                    port = "__".join(path)  # how verilog.convert flattens a Component's ports
                    net = nets[port]
                    assert Shape.cast(member.shape).width == len(net), port
                    connections.append(("i" if member.flow is wiring.Flow.In else "o", port, net))
                m.submodules[f"link{k}"] = Instance(self.link_module, *connections)
        return m
