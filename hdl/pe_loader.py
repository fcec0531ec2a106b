"""The PE's loader: its config registers and the load-bus decode (docs/architecture.md section 5, "Chip ports
and loading"; the registers: section 4)."""
from __future__ import annotations

from amaranth.hdl import Cat, Module, Mux, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.memory import WritePort
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2

from flowtile.arch import CONFIG_FIELDS, Arch

from .layouts import (LOAD_TARGET_CONFIG, LOAD_TARGET_PARAMS, LOAD_TARGET_SRAM, check_arch, check_tile_index, config_layout,
                      load_signature, param_layout)

__all__ = ["PELoader", "band_end", "computes_of", "sram_write_signature", "param_write_signature"]


def band_end(config):
    """``E'``, the end column of section 4.1's band of output pixels: ``out_col_end``, or ``out_width`` if 0."""
    return Mux(config.out_col_end != 0, config.out_col_end, config.out_width)


def computes_of(config):
    """1 iff the registers ``config`` describe a computing tile (context): ``n_out > 0``, stored words inside the
    ``n_in_words`` RECV words, a non-empty window loop nest and a valid band of output pixels (section 4.1:
    ``out_col_begin < out_width``, ``out_col_end <= out_width``, ``n_pix >= 1``)."""
    # Section 4.1's band is valid iff out_col_begin < out_width, out_col_end <= out_width and n_pix >= 1;
    # given the first two, n_pix >= 1 fails only for a single row with E' <= out_col_begin.
    band_valid = ((config.out_col_begin < config.out_width) & (config.out_col_end <= config.out_width)
                  & ((config.out_rows != 1) | (band_end(config) > config.out_col_begin)))
    n_in_words = config.n_in_words
    return ((config.n_out != 0) & (n_in_words != 0) & (config.store_begin < config.store_end)
            & (config.store_end <= n_in_words) & (config.words_per_pixel != 0) & (config.kernel_h != 0)
            & (config.kernel_w != 0) & (config.out_rows != 0) & (config.out_width != 0) & band_valid)


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
    tile computes: section 4; one register file per context: section 4.6).

    The loader holds ``C = arch.tile_contexts`` register files, context ``c``'s in ``config[c]`` (``C = 1``: the
    PE of sections 4 to 4.5, one register file). A load-bus write takes effect iff ``load.valid``, ``run = 0`` and
    ``load.payload.tile = tile_index``: a config write sets register ``addr`` (its index in ``CONFIG_FIELDS``) of
    context ``load.payload.context`` (the field exists only when ``C > 1``; a context index ``>= C`` sets nothing)
    from the next cycle; an SRAM or parameter write (whatever its ``context``) is passed on, in the same cycle, to
    ``sram_write`` or ``param_write`` with ``en`` set iff ``addr`` is below the memory's depth. Writes to target 3
    or an unknown register are ignored.

    ``computes[c]`` is 1 iff context ``c``'s registers describe a computing tile (:func:`computes_of`):
    ``n_out > 0``, stored words inside the ``n_in_words`` RECV words, a non-empty window loop nest and a valid band
    of output pixels (``out_col_begin < out_width``, ``out_col_end <= out_width``, ``n_pix >= 1``). A config with
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
    config : ``Out(data.ArrayLayout(config_layout(), arch.tile_contexts))``
        The register files, one a context (0 after reset).
    computes : ``Out(arch.tile_contexts)``
        Bit ``c``: context ``c`` computes.
    sram_write : ``In(sram_write_signature(arch))``
        Drives the SRAM's write port (only meaningful while ``run = 0``).
    param_write : ``In(param_write_signature(arch))``
        Drives the parameter table's write port.
    """

    def __init__(self, arch: Arch, tile_index: int):
        check_arch(arch, "PELoader")
        check_tile_index(arch, tile_index, "PELoader")
        self.arch, self.tile_index = arch, tile_index
        contexts = arch.tile_contexts
        super().__init__({
            "load": In(load_signature(arch)),
            "run": In(1),
            "config": Out(data.ArrayLayout(config_layout(), contexts)),
            "computes": Out(contexts),
            "sram_write": In(sram_write_signature(arch)),
            "param_write": In(param_write_signature(arch)),
        })

    def elaborate(self, platform):
        m = Module()
        arch = self.arch
        contexts = arch.tile_contexts
        load = self.load.payload
        here = self.load.valid & ~self.run & (load.tile == self.tile_index)
        for context in range(contexts):
            config = self.config[context]
            # Section 4.6: a config write sets register ``addr`` of context ``load.context``; one context: no field.
            selected = here & (load.target == LOAD_TARGET_CONFIG)
            if contexts > 1:
                selected &= load.context == context
            with m.If(selected):
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
            self.computes.eq(Cat(*(computes_of(self.config[context]) for context in range(contexts)))),
        ]
        return m
