"""The flowtile chip: a mesh of tiles with the load bus, ``run`` and the host streams
(docs/architecture.md section 5)."""
from __future__ import annotations

from amaranth.hdl import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from flowtile.arch import Arch

from .layouts import check_arch, flit_signature, load_signature
from .tile import Tile

__all__ = ["Chip"]


class Chip(wiring.Component):
    """A ``rows`` x ``cols`` mesh of :class:`~flowtile.hdl.tile.Tile`.

    Ports (section 5): ``load`` (:func:`flowtile.hdl.layouts.load_signature`; tile index ``row * cols + col``),
    ``run`` (In 1), ``i_host`` (flit stream into the W input FIFO of tile (0, 0)) and ``o_host`` (flit
    stream from the ``arch.exit_direction`` port of ``arch.exit_tile``). Neighbouring routers are
    connected E<->W and S<->N; every other edge input is never valid and every other edge output is
    never ready, so a misrouted flit stalls visibly.
    """

    def __init__(self, arch: Arch):
        self.arch = check_arch(arch, "Chip")
        super().__init__({
            "load": In(load_signature(arch)),
            "run": In(1),
            "i_host": In(flit_signature(arch)),
            "o_host": Out(flit_signature(arch)),
        })

    def elaborate(self, platform):
        m = Module()
        arch = self.arch
        tiles = {}
        for row in range(arch.rows):
            for col in range(arch.cols):
                tile = tiles[row, col] = Tile(arch, row, col)
                m.submodules[f"tile_r{row}c{col}"] = tile
                wiring.connect(m, wiring.flipped(self.load), tile.load)
                m.d.comb += tile.run.eq(self.run)
        for (row, col), tile in tiles.items():
            if col + 1 < arch.cols:
                east = tiles[row, col + 1]
                wiring.connect(m, tile.o_e, east.i_w)
                wiring.connect(m, east.o_w, tile.i_e)
            if row + 1 < arch.rows:
                south = tiles[row + 1, col]
                wiring.connect(m, tile.o_s, south.i_n)
                wiring.connect(m, south.o_n, tile.i_s)
        wiring.connect(m, wiring.flipped(self.i_host), tiles[0, 0].i_w)
        wiring.connect(m, tiles[arch.exit_tile].output_port(arch.exit_direction), wiring.flipped(self.o_host))
        return m
