"""Simulation top: a flowtile chip plus host-side input and output buffers (not part of the chip).

The harness implements the "Simulation harness" paragraph of docs/architecture.md, section 5, so that a
whole run (all inference batches) happens in hardware without a testbench touching every cycle:

* before a run the testbench drives the chip's ``load`` bus (passed straight through), fills the input
  buffer through ``in_write_*`` and sets ``in_count`` / ``out_count`` / ``cycle_limit`` / ``in_available``;
* a one-cycle ``start`` pulse starts the run: cycle 0 is the first cycle with the chip's ``run = 1``;
* input flit ``i`` is offered to the chip's host input with destination tile (0,0) from cycle 0 on,
  back to back, each until accepted, and the chip's host output is ready in every cycle, unless host stalls
  gate them (next point);
* host stalls (``flowtile.host.HostPattern``): with ``in_gate`` set, the input is offered only in cycles ``t``
  whose pattern entry ``t % HOST_PATTERN_CYCLES`` has bit 1 (in valid) set; with ``out_gate`` set, the output is
  ready only in cycles whose entry has bit 0 (out ready) set. The testbench writes the pattern memory through
  ``pattern_write_*`` before ``start``; with both gates clear (the default) the pattern is never read;
* every received flit is stored in the output buffer with the number of the cycle of its transfer;
* ``done`` rises once ``out_count`` flits have arrived, ``timed_out`` once ``cycle_limit`` cycles passed
  (``stopped`` is their OR: the one signal a testbench waits for);
* the testbench reads entries back through ``out_read_*`` (combinational read).

Streaming (any batch): both buffers are rings of ``host_buffer_flits`` entries; input flit ``i`` sits in entry
``i % depth``, output flit ``j`` in entry ``j % depth``. A batch larger than the buffers streams: the testbench
tells the harness how many input flits it has written (``in_available``) and how many output entries it has read
(``out_consumed``), and is woken by ``in_low`` (at most half a buffer of unsent input left, more to come) and
``out_high`` (at least half a buffer unread). Moving one entry each way per cycle from then on, it always stays
ahead, so streaming never changes the chip's timing; if it did fall behind, the harness flags it (``underrun``:
an input flit was due but not written; ``unexpected_output``: an output entry would be overwritten unread)
rather than silently stalling the chip.

One run per reset: the counters start from their reset values and ``start`` is ignored while running.
"""
from __future__ import annotations

from types import SimpleNamespace

from amaranth.hdl import ClockSignal, Instance, Module, Mux, Shape, Signal, Value, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from flowtile.arch import Arch
from flowtile.host import HOST_PATTERN_CYCLES

__all__ = ["Harness", "HarnessError", "STAMP_BITS", "HARNESS_TOP_NAME", "BUFFER_FORMS", "BUFFER_MODULE_NAME",
           "BUFFER_VERILOG"]

#: Width of the cycle counter and of each output entry's cycle stamp (2**32 cycles is far beyond any
#: simulation we can afford, so the counter never wraps in practice).
STAMP_BITS = 32

#: Verilog module name of the harness top (what cocotb's runner is told to simulate).
HARNESS_TOP_NAME = "flowtile_harness"

#: How the harness holds its two host buffers: ``"memories"`` (``amaranth.lib.memory.Memory``, what
#: Amaranth's simulator needs) or ``"instances"`` of :data:`BUFFER_MODULE_NAME`, whose Verilog is
#: :data:`BUFFER_VERILOG` (what the Verilator flow uses: Amaranth writes a memory's initial contents word
#: by word, 130k lines and ~30 s of Yosys for the default 65536-flit buffers, and Verilator then compiles
#: them). The buffers' contents before a write are never observed, so both forms behave the same.
BUFFER_FORMS = ("memories", "instances")
#: Verilog module name of a host buffer in the ``"instances"`` form.
BUFFER_MODULE_NAME = "flowtile_harness_buffer"
#: One write port (written at the clock edge when ``we``), one combinational read port; no reset, no
#: initial contents.
BUFFER_VERILOG = f"""module {BUFFER_MODULE_NAME} #(parameter WIDTH = 1, parameter DEPTH = 1, parameter ADDR_BITS = 1) (
  input clk,
  input we,
  input [ADDR_BITS-1:0] waddr,
  input [WIDTH-1:0] wdata,
  input [ADDR_BITS-1:0] raddr,
  output [WIDTH-1:0] rdata
);
  reg [WIDTH-1:0] words [0:DEPTH-1];
  always @(posedge clk) if (we) words[waddr] <= wdata;
  assign rdata = words[raddr];
endmodule
"""

#: Chip ports the harness relies on, with the direction the chip declares them in (section 5).
_REQUIRED_CHIP_PORTS = {"load": wiring.In, "run": wiring.In, "i_host": wiring.In, "o_host": wiring.Out}
#: Fields of the chip's host flits the harness writes (section 2).
_FLIT_FIELDS = ("data", "dest_row", "dest_col", "dest_host")


class HarnessError(ValueError):
    """The harness cannot be built around the given chip; the message names the offending port."""


def _bits_to_address(depth: int) -> int:
    """Bits of an address into ``depth`` entries."""
    return max(1, (depth - 1).bit_length())


def _check_chip_signature(chip) -> None:
    signature = getattr(chip, "signature", None)
    if not isinstance(signature, wiring.Signature):
        raise HarnessError(f"chip {chip!r} is not a wiring.Component (it has no wiring signature)")
    for name, flow in _REQUIRED_CHIP_PORTS.items():
        if name not in signature.members:
            raise HarnessError(f"chip signature lacks port '{name}' (docs/architecture.md section 5 requires "
                               f"{', '.join(_REQUIRED_CHIP_PORTS)}); it has {', '.join(signature.members)}")
        member = signature.members[name]
        if member.flow is not flow:
            raise HarnessError(f"chip port '{name}' must be {flow.name} (seen from the chip), "
                               f"got {member.flow.name}")
    run = signature.members["run"]
    if run.is_signature or Shape.cast(run.shape).width != 1:
        raise HarnessError("chip port 'run' must be a 1-bit signal")
    for name in ("i_host", "o_host"):
        member = signature.members[name]
        if not member.is_signature or not {"valid", "ready", "payload"} <= set(member.signature.members):
            raise HarnessError(f"chip port '{name}' must be a stream (members valid, ready, payload)")
        payload_shape = member.signature.members["payload"].shape
        if not isinstance(payload_shape, data.Layout) or any(
                field not in dict(payload_shape) for field in _FLIT_FIELDS):
            raise HarnessError(f"chip port '{name}' payload must be a flit layout with fields "
                               f"{', '.join(_FLIT_FIELDS)}; got {payload_shape!r}")


class Harness(wiring.Component):
    """Chip + ``arch.host_buffer_flits``-deep input and output buffers, driven by a testbench.

    Parameters:
        arch: the chip's architecture.
        chip: the chip to wrap (a ``wiring.Component`` with ports ``load``, ``run``, ``i_host``,
            ``o_host`` per section 5). Default: ``flowtile.hdl.chip.Chip(arch)``. Tests of the simulation flow
            pass a stand-in here; the Verilog flow passes ``Chip(arch, tiles="instances")``.
        buffers: one of :data:`BUFFER_FORMS` (default ``"memories"``); with ``"instances"`` the Verilog of
            the harness must be accompanied by :data:`BUFFER_VERILOG`.

    Ports (besides the implicit ``clk`` / ``rst``):
        load: the chip's load bus, same signature, passed through unchanged.
        start: pulse for one cycle to start the run (the next cycle is cycle 0).
        in_count, out_count: flits to send / to expect; hold stable from ``start`` to the end.
        in_available: input flits written into the input ring so far (input flit ``i`` may be offered only if
            ``i < in_available``); out_consumed: output entries the testbench has read so far.
        cycle_limit: ``timed_out`` rises when the cycle counter reaches it.
        in_write_en, in_write_addr, in_write_data: write one input flit's data (lane ``l`` in bits
            ``[8l, 8l+8)``) into the input buffer per cycle, before ``start``.
        out_read_addr -> out_read_data, out_read_stamp: combinational read of one output entry.
        pattern_write_en, pattern_write_addr, pattern_write_data: write one entry of the host pattern (bit 0:
            output ready, bit 1: input valid, for cycles ``t`` with ``t % HOST_PATTERN_CYCLES == addr``) per cycle,
            before ``start``.
        out_gate, in_gate: apply the pattern to the host output's ready / the host input's valid; hold stable
            from ``start`` to the end (clear: always ready / offered back to back).
        running: the chip's ``run``; cycle: cycles since cycle 0 (the current cycle's number).
        in_sent: input flits the chip accepted so far; out_received: output flits stored so far.
        done, timed_out, stopped (= done | timed_out): status, sticky for the rest of the run.
        in_low, out_high: the streaming testbench's wake-ups (module docstring).
        unexpected_output: sticky; a flit arrived before ``start``, beyond ``out_count``, or with
            the output ring full of unread entries.
        underrun: sticky; an input flit was due (running, host offering) but not yet written.
        every other output member of the chip (a :class:`flowtile.hdl.system.System`'s ``link{k}`` status
        counters), passed through under its own name.
    """

    def __init__(self, arch: Arch, *, chip=None, buffers: str = "memories"):
        if not isinstance(arch, Arch):
            raise HarnessError(f"arch must be a flowtile.arch.Arch, got {type(arch).__name__}")
        if buffers not in BUFFER_FORMS:
            raise HarnessError(f"parameter 'buffers' must be one of {', '.join(map(repr, BUFFER_FORMS))}, "
                               f"got {buffers!r}")
        self.buffers = buffers
        if chip is None:
            from flowtile.hdl.chip import Chip  # imported here so that stand-in chips work without flowtile.hdl.chip
            chip = Chip(arch)
        _check_chip_signature(chip)
        chip_arch = getattr(chip, "arch", arch)
        if chip_arch != arch:
            raise HarnessError(f"chip was built for {chip_arch}, harness for {arch}")
        self.arch = arch
        self.chip = chip
        chip_ports = chip.signature.members
        flit_layout = chip_ports["i_host"].signature.members["payload"].shape
        data_bits = data.Layout.cast(flit_layout)["data"].shape.width
        if data_bits != arch.flit_data_bits:
            raise HarnessError(f"chip flit 'data' field is {data_bits} bits, arch lanes={arch.lanes} "
                               f"needs {arch.flit_data_bits}")

        depth = arch.host_buffer_flits
        count_bits = STAMP_BITS   # flit counts of a whole streamed batch
        address_bits = _bits_to_address(depth)
        #: One output buffer entry: the received flit's data and the cycle of its transfer.
        self.out_entry_layout = data.StructLayout({"data": unsigned(arch.flit_data_bits),
                                                   "stamp": unsigned(STAMP_BITS)})
        #: The chip's status outputs beyond section 5's ports (a System's ``link{k}`` counters), passed through.
        self.status_ports = [name for name, member in chip_ports.items()
                             if name not in _REQUIRED_CHIP_PORTS and member.flow is wiring.Out]
        super().__init__({
            **{name: chip_ports[name] for name in self.status_ports},
            # The very member the chip declares: same signature, same (input) direction.
            "load": chip_ports["load"],
            "start": In(1),
            "in_count": In(count_bits),
            "out_count": In(count_bits),
            "in_available": In(count_bits),
            "out_consumed": In(count_bits),
            "cycle_limit": In(STAMP_BITS),
            "in_write_en": In(1),
            "in_write_addr": In(address_bits),
            "in_write_data": In(arch.flit_data_bits),
            "out_read_addr": In(address_bits),
            "pattern_write_en": In(1),
            "pattern_write_addr": In(_bits_to_address(HOST_PATTERN_CYCLES)),
            "pattern_write_data": In(2),
            "out_gate": In(1),
            "in_gate": In(1),
            "out_read_data": Out(arch.flit_data_bits),
            "out_read_stamp": Out(STAMP_BITS),
            "running": Out(1),
            "cycle": Out(STAMP_BITS),
            "in_sent": Out(count_bits),
            "out_received": Out(count_bits),
            "done": Out(1),
            "timed_out": Out(1),
            "stopped": Out(1),
            "in_low": Out(1),
            "out_high": Out(1),
            "unexpected_output": Out(1),
            "underrun": Out(1),
        })

    def _buffer(self, m: Module, name: str, shape, depth: int | None = None) -> tuple:
        """A ``depth``-deep (default ``host_buffer_flits``) buffer of ``shape``: (write port, combinational read
        port), each with ``addr`` and ``data`` (the write port also ``en``), in the form chosen by ``buffers``."""
        depth = self.arch.host_buffer_flits if depth is None else depth
        if self.buffers == "memories":
            memory = m.submodules[name] = Memory(shape=shape, depth=depth, init=[])
            return memory.write_port(), memory.read_port(domain="comb")
        address_bits = _bits_to_address(depth)
        write = SimpleNamespace(en=Signal(name=f"{name}_we"), addr=Signal(address_bits, name=f"{name}_waddr"),
                                data=Signal(shape, name=f"{name}_wdata"))
        read = SimpleNamespace(addr=Signal(address_bits, name=f"{name}_raddr"), data=Signal(shape, name=f"{name}_rdata"))
        m.submodules[name] = Instance(
            BUFFER_MODULE_NAME,
            p_WIDTH=Shape.cast(shape).width, p_DEPTH=depth, p_ADDR_BITS=address_bits,
            i_clk=ClockSignal(), i_we=write.en, i_waddr=write.addr, i_wdata=Value.cast(write.data),
            i_raddr=read.addr, o_rdata=Value.cast(read.data))
        return write, read

    def elaborate(self, platform):
        m = Module()
        arch = self.arch
        depth = arch.host_buffer_flits
        m.submodules.chip = chip = self.chip

        # --- load bus: straight through (the chip itself accepts loads only while run = 0) ---------
        if self.signature.members["load"].is_signature:
            wiring.connect(m, wiring.flipped(self.load), chip.load)
        else:
            m.d.comb += chip.load.eq(self.load)

        for name in self.status_ports:
            wiring.connect(m, getattr(chip, name), wiring.flipped(getattr(self, name)))

        # --- run control -----------------------------------------------------------------------
        running = Signal()
        with m.If(self.start & ~running):
            m.d.sync += running.eq(1)
        # The counter is 0 in the first running cycle and counts the cycles of the run from there.
        with m.If(running):
            m.d.sync += self.cycle.eq(self.cycle + 1)
        m.d.comb += [chip.run.eq(running), self.running.eq(running)]

        # --- input side: offer flit `sent` until accepted, back to back ----------------------------
        # Combinational read so that flit `sent` is on the bus in the very cycle `sent` advances to it.
        in_fill, in_feed = self._buffer(m, "in_buffer", unsigned(arch.flit_data_bits))
        m.d.comb += [in_fill.en.eq(self.in_write_en), in_fill.addr.eq(self.in_write_addr),
                     in_fill.data.eq(self.in_write_data)]

        # --- host pattern: entry cycle % HOST_PATTERN_CYCLES (bit 0 output ready, bit 1 input valid) -----
        # An Amaranth memory in both forms: its 4096 two-bit initial entries cost little to write out.
        pattern = m.submodules.pattern = Memory(shape=unsigned(2), depth=HOST_PATTERN_CYCLES, init=[])
        pattern_fill, pattern_now = pattern.write_port(), pattern.read_port(domain="comb")
        pattern_bits = _bits_to_address(HOST_PATTERN_CYCLES)
        m.d.comb += [pattern_fill.en.eq(self.pattern_write_en), pattern_fill.addr.eq(self.pattern_write_addr),
                     pattern_fill.data.eq(self.pattern_write_data),
                     pattern_now.addr.eq(self.cycle[:pattern_bits])]
        host_ready = Signal()
        host_offers = Signal()
        m.d.comb += [host_ready.eq(~self.out_gate | pattern_now.data[0]),
                     host_offers.eq(~self.in_gate | pattern_now.data[1])]

        sent = self.in_sent
        offering, due = Signal(), Signal()
        in_address = Signal(_bits_to_address(depth))     # sent % depth
        m.d.comb += [
            due.eq(running & (sent < self.in_count) & host_offers),
            offering.eq(due & (sent < self.in_available)),
            in_feed.addr.eq(in_address),
            chip.i_host.valid.eq(offering),
            chip.i_host.payload.data.eq(in_feed.data),
            # Host input flits are addressed to tile (0,0) (section 5).
            chip.i_host.payload.dest_row.eq(0),
            chip.i_host.payload.dest_col.eq(0),
            chip.i_host.payload.dest_host.eq(0),
        ]
        with m.If(offering & chip.i_host.ready):
            m.d.sync += [sent.eq(sent + 1), in_address.eq(Mux(in_address == depth - 1, 0, in_address + 1))]
        with m.If(due & ~offering):
            m.d.sync += self.underrun.eq(1)

        # --- output side: ready unless the pattern stalls it, store data + stamp ------------------
        out_store, out_fetch = self._buffer(m, "out_buffer", self.out_entry_layout)
        received = self.out_received
        out_address = Signal(_bits_to_address(depth))    # received % depth
        arriving = chip.o_host.valid & host_ready  # a transfer
        buffer_has_room = (received - self.out_consumed)[:STAMP_BITS] < depth
        m.d.comb += [
            chip.o_host.ready.eq(host_ready),
            out_store.en.eq(arriving & buffer_has_room),
            out_store.addr.eq(out_address),
            out_store.data.data.eq(chip.o_host.payload.data),
            out_store.data.stamp.eq(self.cycle),
            out_fetch.addr.eq(self.out_read_addr),
            self.out_read_data.eq(out_fetch.data.data),
            self.out_read_stamp.eq(out_fetch.data.stamp),
        ]
        with m.If(arriving):
            with m.If(buffer_has_room):
                m.d.sync += [received.eq(received + 1),
                             out_address.eq(Mux(out_address == depth - 1, 0, out_address + 1))]
            with m.If(~running | (received >= self.out_count) | ~buffer_has_room):
                m.d.sync += self.unexpected_output.eq(1)

        # --- status ------------------------------------------------------------------------------
        m.d.comb += [
            self.done.eq(running & (received >= self.out_count)),
            self.timed_out.eq(running & (self.cycle >= self.cycle_limit)),
            self.stopped.eq(self.done | self.timed_out),
            self.in_low.eq((self.in_available < self.in_count)
                           & ((self.in_available - sent)[:STAMP_BITS] <= depth // 2)),
            self.out_high.eq((received - self.out_consumed)[:STAMP_BITS] >= max(1, depth // 2)),
        ]
        return m
