"""The PE's loader: its config registers and the load-bus decode (docs/architecture.md section 5, "Chip ports
and loading"; the registers: section 4)."""
from __future__ import annotations

from amaranth.hdl import Module, Mux, unsigned
from amaranth.lib import wiring
from amaranth.lib.memory import WritePort
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2

from flowtile.arch import CONFIG_FIELDS, Arch

from .layouts import (LOAD_TARGET_CONFIG, LOAD_TARGET_PARAMS, LOAD_TARGET_SRAM, check_arch, check_tile_index, config_layout,
                      load_signature, param_layout)

__all__ = ["PELoader", "band_end", "sram_write_signature", "param_write_signature"]


def band_end(config):
    """``E'``, the end column of section 4.1's band of output pixels: ``out_col_end``, or ``out_width`` if 0."""
    return Mux(config.out_col_end != 0, config.out_col_end, config.out_width)


def sram_write_signature(arch: Arch) -> WritePort.Signature:
    """The SRAM's write port (the memory's view): one ``arch.flit_data_bits`` word a write."""
    return WritePort.Signature(addr_width=ceil_log2(arch.sram_words), shape=unsigned(arch.flit_data_bits))


def param_write_signature(arch: Arch) -> WritePort.Signature:
    """The parameter table's write port (the table's view): one :func:`param_layout` row a write,
    addressed by row ``0 .. arch.max_tile_outputs - 1``."""
    return WritePort.Signature(addr_width=ceil_log2(arch.max_tile_outputs), shape=param_layout())


class PELoader(wiring.Component):
    """Config registers of the PE with load-bus index ``tile_index`` and the decode of the load bus
    (docs/architecture.md section 5, "Chip ports and loading"; the register meanings and the rule deciding whether a
    tile computes: section 4).

    A load-bus write takes effect iff ``load.valid``, ``run = 0`` and ``load.payload.tile = tile_index``:
    a config write sets register ``addr`` (its index in ``CONFIG_FIELDS``) from the next cycle; an SRAM
    or parameter write is passed on, in the same cycle, to ``sram_write`` or ``param_write`` with ``en``
    set iff ``addr`` is below the memory's depth. Writes to target 3 or an unknown register are ignored.

    ``computes`` is 1 iff the registers describe a computing tile: ``n_out > 0``, stored words inside
    the ``n_in_words`` RECV words, a non-empty window loop nest and a valid band of output pixels
    (``out_col_begin < out_width``, ``out_col_end <= out_width``, ``n_pix >= 1``). A config with
    ``n_out > 0`` that breaks one of these (``encode_config`` rejects it) makes a pass-through tile.

    Parameters
    ----------
    arch : :class:`flowtile.arch.Arch`
    tile_index : int
        ``row * cols + col``, in ``0 .. arch.n_tiles - 1``.

    Members
    -------
    load : ``In(load_signature(arch))``
    run : ``In(1)``
    config : ``Out(config_layout())``
        The registers (0 after reset).
    computes : ``Out(1)``
    sram_write : ``In(sram_write_signature(arch))``
        Drives the SRAM's write port (only meaningful while ``run = 0``).
    param_write : ``In(param_write_signature(arch))``
        Drives the parameter table's write port.
    """

    def __init__(self, arch: Arch, tile_index: int):
        check_arch(arch, "PELoader")
        check_tile_index(arch, tile_index, "PELoader")
        self.arch, self.tile_index = arch, tile_index
        super().__init__({
            "load": In(load_signature(arch)),
            "run": In(1),
            "config": Out(config_layout()),
            "computes": Out(1),
            "sram_write": In(sram_write_signature(arch)),
            "param_write": In(param_write_signature(arch)),
        })

    def elaborate(self, platform):
        m = Module()
        arch, config = self.arch, self.config
        load = self.load.payload
        here = self.load.valid & ~self.run & (load.tile == self.tile_index)
        with m.If(here & (load.target == LOAD_TARGET_CONFIG)):
            with m.Switch(load.addr):
                for index, (name, width, _) in enumerate(CONFIG_FIELDS):
                    with m.Case(index):
                        offset = config_layout()[name].offset
                        m.d.sync += config.as_value()[offset:offset + width].eq(load.data[:width])
        m.d.comb += [
            self.sram_write.addr.eq(load.addr),
            self.sram_write.data.eq(load.data[:arch.flit_data_bits]),
            self.sram_write.en.eq(here & (load.target == LOAD_TARGET_SRAM) & (load.addr < arch.sram_words)),
            self.param_write.addr.eq(load.addr),
            self.param_write.data.eq(load.data[:param_layout().size]),
            self.param_write.en.eq(here & (load.target == LOAD_TARGET_PARAMS) & (load.addr < arch.max_tile_outputs)),
        ]

        # Section 4.1's band is valid iff out_col_begin < out_width, out_col_end <= out_width and n_pix >= 1;
        # given the first two, n_pix >= 1 fails only for a single row with E' <= out_col_begin.
        band_valid = ((config.out_col_begin < config.out_width) & (config.out_col_end <= config.out_width)
                      & ((config.out_rows != 1) | (band_end(config) > config.out_col_begin)))
        n_in_words = config.n_in_words
        m.d.comb += self.computes.eq(
            (config.n_out != 0) & (n_in_words != 0) & (config.store_begin < config.store_end)
            & (config.store_end <= n_in_words) & (config.words_per_pixel != 0) & (config.kernel_h != 0)
            & (config.kernel_w != 0) & (config.out_rows != 0) & (config.out_width != 0) & band_valid)
        return m
