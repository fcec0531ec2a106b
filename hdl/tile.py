"""One mesh tile: a :class:`~flowtile.hdl.router.Router` and a :class:`~flowtile.hdl.pe.PE` (which holds the SRAM)."""
from __future__ import annotations

from amaranth.hdl import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from flowtile.arch import Arch

from .layouts import check_arch, check_tile_position, flit_signature, load_signature
from .pe import PE
from .router import DirectionalPorts, Router

__all__ = ["Tile", "MESH_PORTS"]

#: The router ports that face neighbouring tiles (the L port is internal to a tile).
MESH_PORTS = ("N", "E", "S", "W")


class Tile(DirectionalPorts, wiring.Component):
    """Tile (``row``, ``col``) of ``arch``: ports ``i_n, i_e, i_s, i_w`` / ``o_n, ..., o_w`` are the
    router's mesh ports; ``load`` and ``run`` go to the PE (which listens to load index
    ``row * cols + col``). The router's L output feeds the PE input and the PE output feeds the
    router's L input directly; a flit the PE forwards or passes spends at least one cycle in the PE's
    forward queue (docs/architecture.md sections 3, 4 and 6).
    """

    def __init__(self, arch: Arch, row: int, col: int):
        check_arch(arch, "Tile")
        check_tile_position(arch, row, col, "Tile")
        self.arch, self.row, self.col = arch, row, col
        members = {}
        for port in MESH_PORTS:
            members[f"i_{port.lower()}"] = In(flit_signature(arch))
            members[f"o_{port.lower()}"] = Out(flit_signature(arch))
        members["load"] = In(load_signature(arch))
        members["run"] = In(1)
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        m.submodules.router = router = Router(self.arch, self.row, self.col)
        m.submodules.pe = pe = PE(self.arch, self.row * self.arch.cols + self.col)
        wiring.connect(m, router.o_l, pe.i_flit)
        wiring.connect(m, pe.o_flit, router.i_l)
        wiring.connect(m, wiring.flipped(self.load), pe.load)
        m.d.comb += pe.run.eq(self.run)
        for port in MESH_PORTS:
            wiring.connect(m, wiring.flipped(self.input_port(port)), router.input_port(port))
            wiring.connect(m, router.output_port(port), wiring.flipped(self.output_port(port)))
        return m
