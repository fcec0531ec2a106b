"""The flowtile chip: a mesh of tiles with the load bus, ``run`` and the host streams
(docs/architecture.md section 5)."""
from __future__ import annotations

from amaranth.hdl import ClockSignal, Const, Instance, Module, ResetSignal, Shape, Signal, Value
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from flowtile.arch import Arch

from .layouts import check_arch, flit_layout, flit_signature, load_signature
from .tile import Tile, tile_signature

__all__ = ["Chip", "TILE_FORMS", "TILE_MODULE_NAME"]

#: How the chip holds its tiles: ``"submodules"`` elaborates a :class:`~flowtile.hdl.tile.Tile` per
#: position (what Amaranth's simulator needs: it cannot simulate an ``Instance``); ``"instances"``
#: instantiates one external Verilog module per position (what the Verilog flow uses, so that the tile
#: hardware is written, and compiled by Verilator, once).
TILE_FORMS = ("submodules", "instances")
#: Default Verilog module name of the shared tile in the ``"instances"`` form.
TILE_MODULE_NAME = "flowtile_tile"


class Chip(wiring.Component):
    """A ``rows`` x ``cols`` mesh of :class:`~flowtile.hdl.tile.Tile`.

    Parameters
    ----------
    arch : the chip's :class:`~flowtile.arch.Arch`.
    tiles : one of :data:`TILE_FORMS` (default ``"submodules"``).
    tile_module : Verilog name of the tile module the ``"instances"`` form instantiates; that module
        must be ``Tile(arch)`` converted to Verilog under this name (:func:`flowtile.hdl.verilog.chip_verilog`
        does both).

    Members
    -------
    Ports (section 5): ``load`` (:func:`flowtile.hdl.layouts.load_signature`; tile index ``row * cols + col``),
    ``run`` (In 1), ``i_host`` (flit stream into the W input FIFO of tile (0, 0)) and ``o_host`` (flit
    stream from the ``arch.exit_direction`` port of ``arch.exit_tile``). Neighbouring routers are
    connected E<->W and S<->N; every other edge input is never valid and every other edge output is
    never ready, so a misrouted flit stalls visibly. Each tile's position ports are tied to its
    (row, col). Both forms are the same circuit.
    """

    def __init__(self, arch: Arch, *, tiles: str = "submodules", tile_module: str = TILE_MODULE_NAME):
        self.arch = check_arch(arch, "Chip")
        if tiles not in TILE_FORMS:
            raise ValueError(f"Chip: parameter 'tiles' must be one of {', '.join(map(repr, TILE_FORMS))}, "
                             f"got {tiles!r}")
        if not isinstance(tile_module, str) or not tile_module.isidentifier():
            raise ValueError(f"Chip: parameter 'tile_module' must be a Verilog identifier, got {tile_module!r}")
        self.tiles, self.tile_module = tiles, tile_module
        super().__init__({
            "load": In(load_signature(arch)),
            "run": In(1),
            "i_host": In(flit_signature(arch)),
            "o_host": Out(flit_signature(arch)),
        })

    def _neighbours(self):
        """Every mesh link as (tile, output port, neighbour, its input port): E<->W, then S<->N."""
        arch = self.arch
        for row in range(arch.rows):
            for col in range(arch.cols):
                if col + 1 < arch.cols:
                    yield (row, col), "o_e", (row, col + 1), "i_w"
                    yield (row, col + 1), "o_w", (row, col), "i_e"
                if row + 1 < arch.rows:
                    yield (row, col), "o_s", (row + 1, col), "i_n"
                    yield (row + 1, col), "o_n", (row, col), "i_s"

    def _elaborate_submodules(self, m: Module) -> None:
        arch = self.arch
        tiles = {}
        for row in range(arch.rows):
            for col in range(arch.cols):
                tile = tiles[row, col] = m.submodules[f"tile_r{row}c{col}"] = Tile(arch)
                m.d.comb += [tile.row.eq(row), tile.col.eq(col), tile.run.eq(self.run)]
                wiring.connect(m, wiring.flipped(self.load), tile.load)
        for source, out_port, sink, in_port in self._neighbours():
            wiring.connect(m, getattr(tiles[source], out_port), getattr(tiles[sink], in_port))
        wiring.connect(m, wiring.flipped(self.i_host), tiles[0, 0].i_w)
        exit_port = f"o_{arch.exit_direction.lower()}"
        wiring.connect(m, getattr(tiles[arch.exit_tile], exit_port), wiring.flipped(self.o_host))

    def _elaborate_instances(self, m: Module) -> None:
        """The same circuit as :meth:`_elaborate_submodules`, with each tile an ``Instance``.

        A link is one plain net shared by the two instance ports (no per-tile port wires, no struct
        field wires), which keeps the chip module to a few lines per tile.
        """
        arch = self.arch
        members = [(path, member) for path, member in tile_signature(arch).members.flatten() if member.is_port]
        # nets[row, col][flattened port name]: what that tile's instance port connects to.
        nets = {(row, col): {"row": Const(row, arch.row_bits), "col": Const(col, arch.col_bits),
                             "run": self.run, "load__valid": self.load.valid,
                             "load__payload": Value.cast(self.load.payload)}
                for row in range(arch.rows) for col in range(arch.cols)}
        for source, out_port, sink, in_port in self._neighbours():
            name = f"tile_r{source[0]}c{source[1]}__{out_port}"
            for field, width in (("payload", flit_layout(arch).size), ("valid", 1), ("ready", 1)):
                nets[source][f"{out_port}__{field}"] = nets[sink][f"{in_port}__{field}"] = \
                    Signal(width, name=f"{name}__{field}")
        exit_port = f"o_{arch.exit_direction.lower()}"
        for host, (position, port) in ((self.i_host, ((0, 0), "i_w")), (self.o_host, (arch.exit_tile, exit_port))):
            for field in ("payload", "valid", "ready"):
                nets[position][f"{port}__{field}"] = Value.cast(getattr(host, field))
        for (row, col), tile_nets in nets.items():
            name = f"tile_r{row}c{col}"
            connections = [("i", "clk", ClockSignal()), ("i", "rst", ResetSignal())]
            for path, member in members:
                port = "__".join(path)  # how verilog.convert flattens a Component's ports
                width = Shape.cast(member.shape).width
                if member.flow is wiring.Flow.In:
                    # An edge input: never valid, never ready, so a misrouted flit stalls visibly.
                    connections.append(("i", port, tile_nets.get(port, Const(0, width))))
                else:
                    net = tile_nets[port] if port in tile_nets else Signal(width, name=f"{name}__{port}")
                    connections.append(("o", port, net))
            m.submodules[name] = Instance(self.tile_module, *connections)

    def elaborate(self, platform):
        m = Module()
        if self.tiles == "submodules":
            self._elaborate_submodules(m)
        else:
            self._elaborate_instances(m)
        return m
