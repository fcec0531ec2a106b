"""One mesh tile: a :class:`~flowtile.hdl.router.Router` and a :class:`~flowtile.hdl.pe.PE` (which holds the SRAM)."""
from __future__ import annotations

from amaranth.hdl import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from flowtile.arch import Arch

from .layouts import check_arch, flit_signature, load_signature
from .pe import PE
from .router import DirectionalPorts, Router

__all__ = ["Tile", "MESH_PORTS", "tile_signature"]

#: The router ports that face neighbouring tiles (the L port is internal to a tile).
MESH_PORTS = ("N", "E", "S", "W")

#: The load-bus index the tile hands its PE: the tile decodes the address, so the PE's own match is
#: against this constant and the forwarded ``tile`` field is driven to it.
PE_LOAD_INDEX = 0


def tile_signature(arch: Arch) -> wiring.Signature:
    """The ports of :class:`Tile` (seen from the tile), also used by the chip to wire tile instances."""
    check_arch(arch, "tile_signature")
    members = {"row": In(arch.row_bits), "col": In(arch.col_bits)}
    for port in MESH_PORTS:
        members[f"i_{port.lower()}"] = In(flit_signature(arch))
        members[f"o_{port.lower()}"] = Out(flit_signature(arch))
    members["load"] = In(load_signature(arch))
    members["run"] = In(1)
    return wiring.Signature(members)


class Tile(DirectionalPorts, wiring.Component):
    """Any tile of ``arch``: the hardware is the same for every position, which arrives on ports.

    Parameters
    ----------
    arch : the chip's :class:`~flowtile.arch.Arch`.

    Members
    -------
    row, col : In(``arch.row_bits``), In(``arch.col_bits``)
        The tile's position (tie to constants); the router routes from it and the load index is
        ``row * cols + col``.
    i_n, i_e, i_s, i_w / o_n, o_e, o_s, o_w : the router's mesh ports (flit streams).
    load : the chip's load bus. **The tile decodes the load address**: it forwards to its PE only the
        writes whose ``tile`` field equals its own index, with that field replaced by
        :data:`PE_LOAD_INDEX`, and the PE is built as ``PE(arch, PE_LOAD_INDEX)``; so the PE applies exactly
        the writes addressed to this tile, in the same cycle as if it matched the index itself.
    run : to the PE.

    The router's L output feeds the PE input and the PE output feeds the router's L input directly; a
    flit the PE forwards or passes spends at least one cycle in the PE's forward queue
    (docs/architecture.md sections 3, 4 and 6).
    """

    def __init__(self, arch: Arch):
        self.arch = check_arch(arch, "Tile")
        super().__init__(tile_signature(arch))

    def elaborate(self, platform):
        m = Module()
        arch = self.arch
        m.submodules.router = router = Router(arch)
        m.submodules.pe = pe = PE(arch, PE_LOAD_INDEX)
        m.d.comb += [router.row.eq(self.row), router.col.eq(self.col)]
        wiring.connect(m, router.o_l, pe.i_flit)
        wiring.connect(m, pe.o_flit, router.i_l)

        # Load-address decode (see the class docstring): the host encodes the index as
        # ``row * cols + col``; Amaranth widens the product, so the comparison is exact.
        load = self.load.payload
        own_index = self.row * arch.cols + self.col
        m.d.comb += [
            pe.load.valid.eq(self.load.valid & (load.tile == own_index)),
            pe.load.payload.eq(load),
            pe.load.payload.tile.eq(PE_LOAD_INDEX),
        ]
        m.d.comb += pe.run.eq(self.run)
        for port in MESH_PORTS:
            wiring.connect(m, wiring.flipped(self.input_port(port)), router.input_port(port))
            wiring.connect(m, router.output_port(port), wiring.flipped(self.output_port(port)))
        return m
