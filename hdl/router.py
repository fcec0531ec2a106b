"""The 5-port mesh router of one tile (docs/architecture.md section 3)."""
from __future__ import annotations

from amaranth.hdl import Cat, Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.fifo import SyncFIFO
from amaranth.lib.wiring import In, Out

from flowtile.arch import Arch

from .layouts import check_arch, flit_layout, flit_signature

__all__ = ["Router", "DirectionalPorts", "PORT_ORDER", "route_direction"]

#: Router ports in round-robin scan order (L first); lower-case letters name the component ports.
PORT_ORDER = ("L", "N", "E", "S", "W")


def route_direction(arch: Arch, row: int, col: int, dest_row: int, dest_col: int, dest_host: int) -> str:
    """Output port ('L', 'N', 'E', 'S', 'W') that XY routing picks at tile (row, col).

    A plain-Python statement of the rule the :class:`Router` implements in hardware; tests use it
    as the golden model.
    """
    if dest_host:
        dest_row, dest_col = arch.exit_tile
    if dest_col > col:
        return "E"
    if dest_col < col:
        return "W"
    if dest_row > row:
        return "S"
    if dest_row < row:
        return "N"
    return arch.exit_direction if dest_host else "L"


class DirectionalPorts:
    """Access a component's ``i_<port>`` / ``o_<port>`` members by direction letter (N, E, S, W, L)."""

    def input_port(self, port: str):
        return getattr(self, f"i_{port.lower()}")

    def output_port(self, port: str):
        return getattr(self, f"o_{port.lower()}")


class Router(DirectionalPorts, wiring.Component):
    """The router of any tile of ``arch``; its position arrives on ports, so every tile shares one design.

    Parameters
    ----------
    arch : the chip's :class:`~flowtile.arch.Arch`.

    Members
    -------
    row, col : In(``arch.row_bits``), In(``arch.col_bits``)
        The tile's position; must hold a tile of ``arch`` (constant while flits move).
    i_l, i_n, i_e, i_s, i_w : In(flit stream);  o_l, o_n, o_e, o_s, o_w : Out(flit stream)

    Each input has a ``SyncFIFO`` of depth ``arch.router_fifo_depth``; its head is routed XY (columns first;
    ``dest_host`` targets ``arch.exit_tile`` and leaves there by ``arch.exit_direction``). Each output
    grants, combinationally, the first requesting input in the order L, N, E, S, W starting at its
    pointer; after a transfer the pointer moves to the input after the granted one. A grant depends
    on the requests only, so an output's ``valid`` never depends on its ``ready``; a head flit whose
    output is ready leaves in the first cycle it is readable (one cycle per hop).
    """

    def __init__(self, arch: Arch):
        self.arch = check_arch(arch, "Router")
        flit = flit_signature(arch)
        # The same widths as the flit's dest_row / dest_col, so the comparisons below are like for like.
        members = {"row": In(arch.row_bits), "col": In(arch.col_bits)}
        for port in PORT_ORDER:
            members[f"i_{port.lower()}"] = In(flit)
            members[f"o_{port.lower()}"] = Out(flit)
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        arch = self.arch
        layout = flit_layout(arch)
        exit_row, exit_col = arch.exit_tile
        n_ports = len(PORT_ORDER)

        heads, readable, read_enables, routes = [], [], [], []
        for port in PORT_ORDER:
            fifo = m.submodules[f"fifo_{port.lower()}"] = SyncFIFO(
                width=layout.size, depth=arch.router_fifo_depth)
            wiring.connect(m, wiring.flipped(self.input_port(port)), fifo.w_stream)
            head = layout(fifo.r_data)
            target_row = Mux(head.dest_host, exit_row, head.dest_row)
            target_col = Mux(head.dest_host, exit_col, head.dest_col)
            route = Signal(range(n_ports), name=f"route_{port.lower()}")
            with m.If(target_col > self.col):
                m.d.comb += route.eq(PORT_ORDER.index("E"))
            with m.Elif(target_col < self.col):
                m.d.comb += route.eq(PORT_ORDER.index("W"))
            with m.Elif(target_row > self.row):
                m.d.comb += route.eq(PORT_ORDER.index("S"))
            with m.Elif(target_row < self.row):
                m.d.comb += route.eq(PORT_ORDER.index("N"))
            with m.Elif(head.dest_host):
                m.d.comb += route.eq(PORT_ORDER.index(arch.exit_direction))
            with m.Else():
                m.d.comb += route.eq(PORT_ORDER.index("L"))
            heads.append(head)
            readable.append(fifo.r_rdy)
            read_enables.append(fifo.r_en)
            routes.append(route)

        # read_grants[i]: input i is granted by its output and that output is ready this cycle.
        read_grants = [[] for _ in PORT_ORDER]
        for out_index, port in enumerate(PORT_ORDER):
            out = self.output_port(port)
            requests = [readable[i] & (routes[i] == out_index) for i in range(n_ports)]
            pointer = Signal(range(n_ports), name=f"rr_pointer_{port.lower()}")
            grant = Signal(range(n_ports), name=f"grant_{port.lower()}")
            with m.Switch(pointer):
                for start in range(n_ports):
                    with m.Case(start):
                        # Built last-to-first so the earliest input in scan order wins.
                        for offset in reversed(range(n_ports)):
                            candidate = (start + offset) % n_ports
                            with m.If(requests[candidate]):
                                m.d.comb += grant.eq(candidate)
            any_request = Signal(name=f"request_{port.lower()}")
            m.d.comb += any_request.eq(Cat(*requests).any())
            m.d.comb += out.valid.eq(any_request)
            with m.Switch(grant):
                for i in range(n_ports):
                    with m.Case(i):
                        m.d.comb += out.payload.eq(heads[i])
            with m.If(out.valid & out.ready):
                m.d.sync += pointer.eq(Mux(grant == n_ports - 1, 0, grant + 1))
            for i in range(n_ports):
                read_grants[i].append(requests[i] & (grant == i) & out.ready)

        for i in range(n_ports):
            m.d.comb += read_enables[i].eq(Cat(*read_grants[i]).any())
        return m
