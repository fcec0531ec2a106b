"""Payload layouts shared by every flowtile block, and the host-side encoders of the load bus.

Contract (docs/architecture.md sections 2 and 5):

* **Flit** (:func:`flit_layout`): ``data`` (``8 * lanes`` bits, lane ``l`` at ``[8l, 8l+8)``),
  ``dest_row`` (``arch.row_bits``), ``dest_col`` (``arch.col_bits``), ``dest_host`` (1), packed
  LSB first in that order. Streams of flits are ``stream.Signature(flit_layout(arch))``.

* **Load port** (:func:`load_signature`): a ``wiring.Signature`` with members ``valid`` (1 bit) and
  ``payload`` (:func:`load_layout`), i.e. a stream without ``ready``: every valid cycle is one write
  (loads are always accepted; they only take effect while ``run = 0``). Not
  ``stream.Signature(..., always_ready=True)`` because its constant ``ready`` cannot be a top-level
  Verilog port. Flattened (Verilog) names are ``load__valid`` and ``load__payload``; the payload
  packs LSB first:

  ========  ===========================================  =============================================
  field     width                                        meaning
  ========  ===========================================  =============================================
  tile      :func:`load_tile_bits` = ceil(log2(n_tiles))  tile index ``row * cols + col`` on its chip
            (at least 1)
  target    :data:`LOAD_TARGET_BITS` = 2                 :data:`LOAD_TARGET_SRAM` (0),
                                                         :data:`LOAD_TARGET_PARAMS` (1),
                                                         :data:`LOAD_TARGET_CONFIG` (2),
                                                         :data:`LOAD_TARGET_LINK` (3)
  addr      :data:`LOAD_ADDR_BITS` = 16                  SRAM word / parameter row / config register /
                                                         link register
  data      :func:`load_data_bits` = max(8 * lanes, 69)  see below
  chip      :func:`load_chip_bits` = ceil(log2(chips))   chip ``k`` of a multi-chip system (0 on one chip);
            (at least 1)                                 the most significant field, so that the others
                                                         sit where they did before it existed
  context   :func:`load_context_bits` =                  only when ``arch.tile_contexts > 1``: the context
            ``index_bits(tile_contexts)``                whose register a config write sets (section 4.6);
                                                         SRAM and parameter writes ignore it. Above
                                                         ``chip``, so that no other field moves; a tile of
                                                         one context has no such field (its load bus is
                                                         exactly the one before contexts existed)
  ========  ===========================================  =============================================

  Data per target: SRAM word = a flit's ``data`` (low ``8 * lanes`` bits); parameter entry =
  :func:`param_layout` (bias ``[0, 32)`` signed, multiplier ``[32, 63)``, shift ``[63, 69)``), built
  by :func:`encode_param_entry`; config register ``addr`` = its index in ``CONFIG_FIELDS``, value in
  the low bits, two's complement for signed registers, built by :func:`encode_config`; link register
  (:data:`LOAD_TARGET_LINK`, only :class:`flowtile.hdl.system.System` decodes it): ``addr``
  :data:`LINK_REG_INFERENCE_FLITS` (0) = ``inference_flits`` of link ``chip`` (the link leaving that chip,
  ``Program.links[chip]``), the low :data:`LINK_INFERENCE_FLITS_BITS` bits of ``data``
  (:func:`pack_link_load`); ``addr`` :data:`LINK_REG_LANE_SEGMENT0` + ``s`` (``s <``
  :data:`~flowtile.link_format.LINK_LANE_SEGMENTS`) = lane segment ``s`` of its lane table, encoded by
  :func:`flowtile.link_format.encode_lane_segment` (0: unused; :func:`pack_link_segment_load`); ``tile`` is
  ignored. A :class:`~flowtile.hdl.chip.Chip` ignores ``chip``
  (:class:`~flowtile.hdl.system.System` passes a write to chip ``k`` only if ``chip = k``).
  Writes beyond a memory's depth, to an unknown config or link address, to a chip or link that does
  not exist, or to target 3 of a tile are ignored.
"""
from __future__ import annotations

from amaranth.hdl import signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import Out
from amaranth.utils import ceil_log2

from flowtile.arch import ACC_BITS, CONFIG_FIELDS, MULTIPLIER_BITS, SHIFT_BITS, Arch, index_bits
from flowtile.link_format import LINK_LANE_SEGMENTS, LaneSegment, encode_lane_segment
from flowtile.program import link_count
from flowtile.tile_config import ConfigError, TileConfig, register_bounds

__all__ = [
    "LOAD_TARGET_SRAM", "LOAD_TARGET_PARAMS", "LOAD_TARGET_CONFIG", "LOAD_TARGET_LINK", "LOAD_TARGET_BITS",
    "LOAD_ADDR_BITS", "LINK_REG_INFERENCE_FLITS", "LINK_INFERENCE_FLITS_BITS", "LINK_REG_LANE_SEGMENT0",
    "pack_link_segment_load", "load_chip_bits", "load_context_bits", "pack_link_load",
    "PARAM_ENTRY_BITS", "LoadEncodingError", "encode_registers",
    "check_arch", "check_tile_position", "check_tile_index", "flit_layout", "flit_signature", "load_layout", "load_signature", "load_data_bits",
    "load_tile_bits", "param_layout", "config_layout", "config_field_index",
    "encode_param_entry", "encode_config", "encode_config_value", "pack_lanes", "unpack_lanes",
    "pack_struct", "unpack_struct", "pack_flit", "pack_load", "LANE_BITS",
]

LOAD_TARGET_SRAM = 0
LOAD_TARGET_PARAMS = 1
LOAD_TARGET_CONFIG = 2
#: Link registers (of a multi-chip System; tiles ignore this target).
LOAD_TARGET_LINK = 3
#: Width of the load ``target`` field (four targets).
LOAD_TARGET_BITS = 2
#: Link register address of ``inference_flits`` (flits that cross the link per inference).
LINK_REG_INFERENCE_FLITS = 0
#: Width of a link's ``inference_flits`` register (and of LinkTx's port): up to ``2**24 - 1`` flits per inference.
LINK_INFERENCE_FLITS_BITS = 24
#: Link register address of lane segment 0 of the link's lane table (segment ``s`` at ``+ s``).
LINK_REG_LANE_SEGMENT0 = 1
#: Width of the load ``addr`` field (docs/architecture.md section 5).
LOAD_ADDR_BITS = 16
#: One parameter-table entry: bias, multiplier, shift.
PARAM_ENTRY_BITS = ACC_BITS + MULTIPLIER_BITS + SHIFT_BITS
#: Int8 lane width of a flit.
LANE_BITS = 8


class LoadEncodingError(ValueError):
    """A host-side value does not fit the register or table entry it is meant for; names the field."""


def check_arch(arch, who: str) -> Arch:
    """Raise a TypeError naming ``who`` unless ``arch`` is a :class:`flowtile.arch.Arch`."""
    if not isinstance(arch, Arch):
        raise TypeError(f"{who}: parameter 'arch' must be a flowtile.arch.Arch, got {arch!r}")
    return arch


def check_tile_position(arch: Arch, row: int, col: int, owner: str) -> None:
    """Raise naming ``owner`` and the parameter unless (``row``, ``col``) is a tile of ``arch``."""
    for name, value, limit in (("row", row, arch.rows), ("col", col, arch.cols)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{owner}: parameter '{name}' must be an integer, got {value!r}")
        if not 0 <= value < limit:
            raise ValueError(f"{owner}: parameter '{name}' = {value} is outside 0..{limit - 1} "
                             f"of the {arch.rows}x{arch.cols} arch")


def check_tile_index(arch: Arch, tile_index: int, owner: str) -> int:
    """Raise naming ``owner`` unless ``tile_index`` is a load-bus tile index (``row * cols + col``) of ``arch``."""
    if isinstance(tile_index, bool) or not isinstance(tile_index, int):
        raise TypeError(f"{owner}: parameter 'tile_index' must be an integer, got {tile_index!r}")
    if not 0 <= tile_index < arch.n_tiles:
        raise ValueError(f"{owner}: parameter 'tile_index' = {tile_index} is outside 0..{arch.n_tiles - 1} "
                         f"of the {arch.rows}x{arch.cols} arch")
    return tile_index


def flit_layout(arch: Arch) -> data.StructLayout:
    """The flit: ``data``, ``dest_row``, ``dest_col``, ``dest_host`` packed LSB first."""
    check_arch(arch, "flit_layout")
    return data.StructLayout({
        "data": unsigned(arch.flit_data_bits),
        "dest_row": unsigned(arch.row_bits),
        "dest_col": unsigned(arch.col_bits),
        "dest_host": unsigned(1),
    })


def flit_signature(arch: Arch) -> stream.Signature:
    """A valid/ready stream of flits (``valid`` never depends on ``ready``)."""
    return stream.Signature(flit_layout(arch))


def load_data_bits(arch: Arch) -> int:
    """Width of the load ``data`` field: a whole SRAM word or a whole parameter entry."""
    return max(arch.flit_data_bits, PARAM_ENTRY_BITS)


def load_tile_bits(arch: Arch) -> int:
    """Width of the load ``tile`` field: enough for ``n_tiles - 1``, at least 1."""
    return max(1, ceil_log2(arch.n_tiles))


def load_chip_bits(arch: Arch) -> int:
    """Width of the load ``chip`` field: enough for ``chips - 1``, at least 1."""
    return index_bits(arch.chips)


def load_context_bits(arch: Arch) -> int:
    """Width of the load ``context`` field (docs/architecture.md section 4.6): ``index_bits(tile_contexts)``. The
    field exists only when ``arch.tile_contexts > 1`` (:func:`load_layout`)."""
    return index_bits(arch.tile_contexts)


def load_layout(arch: Arch) -> data.StructLayout:
    """The load-bus payload (``valid`` is the stream's, see the module docstring): ``tile``, ``target``, ``addr``,
    ``data``, ``chip`` and, only when ``arch.tile_contexts > 1``, ``context`` on top (so that with one context
    per tile the payload is bit for bit the one before contexts existed)."""
    check_arch(arch, "load_layout")
    fields = {
        "tile": unsigned(load_tile_bits(arch)),
        "target": unsigned(LOAD_TARGET_BITS),
        "addr": unsigned(LOAD_ADDR_BITS),
        "data": unsigned(load_data_bits(arch)),
        "chip": unsigned(load_chip_bits(arch)),
    }
    if arch.tile_contexts > 1:
        fields["context"] = unsigned(load_context_bits(arch))
    return data.StructLayout(fields)


def load_signature(arch: Arch) -> wiring.Signature:
    """The load port (driver's view): ``valid`` and ``payload``; no ``ready``, one write per valid cycle."""
    return wiring.Signature({"valid": Out(1), "payload": Out(load_layout(arch))})


def param_layout() -> data.StructLayout:
    """One parameter-table row: bias (signed, wraps with the accumulator), multiplier, shift."""
    return data.StructLayout({
        "bias": signed(ACC_BITS),
        "multiplier": unsigned(MULTIPLIER_BITS),
        "shift": unsigned(SHIFT_BITS),
    })


def config_layout() -> data.StructLayout:
    """All config registers of ``CONFIG_FIELDS`` as one struct (signed registers are signed fields)."""
    return data.StructLayout({
        name: (signed(width) if is_signed else unsigned(width)) for name, width, is_signed in CONFIG_FIELDS
    })


def config_field_index(name: str) -> int:
    """Register address of config register ``name`` (its index in ``CONFIG_FIELDS``)."""
    for index, (field_name, _, _) in enumerate(CONFIG_FIELDS):
        if field_name == name:
            return index
    raise LoadEncodingError(f"unknown config register '{name}'; known: "
                            f"{', '.join(field for field, _, _ in CONFIG_FIELDS)}")


def _check_range(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy  # only to accept numpy integers from program files
            if isinstance(value, numpy.integer):
                value = int(value)
        except ImportError:  # pragma: no cover
            pass
    if isinstance(value, bool) or not isinstance(value, int):
        raise LoadEncodingError(f"'{name}' must be an integer, got {value!r}")
    if not low <= value <= high:
        raise LoadEncodingError(f"'{name}' = {value} is out of range {low}..{high}")
    return value


def encode_config_value(name: str, value: int) -> int:
    """The load ``data`` word for config register ``name`` (two's complement if signed)."""
    index = config_field_index(name)
    low, high = register_bounds(name)
    value = _check_range(f"config register {name}", value, low, high)
    return value & ((1 << CONFIG_FIELDS[index][1]) - 1)


def encode_registers(config: TileConfig) -> list[tuple[int, int]]:
    """``(addr, data)`` load pairs of every register of ``config``, in ``CONFIG_FIELDS`` order. Checks only that
    each value fits its register's width (the encoding); the register rules are the spec's
    (:meth:`flowtile.tile_config.TileConfig.validate`, run by :meth:`flowtile.program.Program.validate`)."""
    return [(index, encode_config_value(name, getattr(config, name)))
            for index, (name, _, _) in enumerate(CONFIG_FIELDS)]


def encode_config(arch: Arch, config: TileConfig | dict) -> list[tuple[int, int]]:
    """:func:`encode_registers` of a config not checked yet (a test bench's dict, say): it must name every register
    (:meth:`TileConfig.coerce`), each within its width, and obey every rule of
    :meth:`flowtile.tile_config.TileConfig.validate` for ``arch``; raises :class:`LoadEncodingError` otherwise."""
    check_arch(arch, "encode_config")
    try:
        config = TileConfig.coerce(config)
        pairs = encode_registers(config)
        config.validate(arch)
    except ConfigError as error:
        raise LoadEncodingError(str(error)) from None
    return pairs


def encode_param_entry(bias: int, multiplier: int, shift: int) -> int:
    """The load ``data`` word of one parameter-table row (bias ``[0,32)``, multiplier ``[32,63)``,
    shift ``[63,69)``). The shift must be in ``[1, 62]`` (docs/architecture.md section 4), except in
    the all-zero row: a max-pooling tile's table holds ``n_out`` zero rows that are never read
    (section 4.1)."""
    bias = _check_range("bias", bias, -(1 << (ACC_BITS - 1)), (1 << (ACC_BITS - 1)) - 1)
    multiplier = _check_range("multiplier", multiplier, 0, (1 << MULTIPLIER_BITS) - 1)
    unused_row = bias == 0 and multiplier == 0 and shift == 0
    shift = _check_range("shift", shift, 0 if unused_row else 1, (1 << SHIFT_BITS) - 2)
    return ((bias & ((1 << ACC_BITS) - 1))
            | (multiplier << ACC_BITS)
            | (shift << (ACC_BITS + MULTIPLIER_BITS)))


def pack_lanes(values, lanes: int) -> int:
    """Pack up to ``lanes`` int8 values into a flit ``data`` integer (missing lanes are zero)."""
    values = [int(v) for v in values]
    if len(values) > lanes:
        raise LoadEncodingError(f"{len(values)} values do not fit {lanes} lanes")
    word = 0
    for lane, value in enumerate(values):
        _check_range(f"lane {lane}", value, -(1 << (LANE_BITS - 1)), (1 << (LANE_BITS - 1)) - 1)
        word |= (value & ((1 << LANE_BITS) - 1)) << (LANE_BITS * lane)
    return word


def unpack_lanes(word: int, lanes: int) -> list[int]:
    """The ``lanes`` int8 values of a flit ``data`` integer."""
    out = []
    for lane in range(lanes):
        byte = (word >> (LANE_BITS * lane)) & ((1 << LANE_BITS) - 1)
        out.append(byte - (1 << LANE_BITS) if byte >> (LANE_BITS - 1) else byte)
    return out


def pack_struct(layout: data.StructLayout, **fields) -> int:
    """The integer a flattened port carries for a struct payload (fields LSB first; missing fields 0).

    For drivers that see ports as plain bit vectors (Verilator/cocotb: ``load__payload``,
    ``i_host__payload``). Amaranth's ``Layout.const`` truncates silently, so each value is range-checked first."""
    for name, value in fields.items():
        try:
            shape = layout[name].shape
        except KeyError:
            raise LoadEncodingError(f"'{name}' is not a field of {layout!r}") from None
        low = -(1 << (shape.width - 1)) if shape.signed else 0
        high = (1 << (shape.width - 1)) - 1 if shape.signed else (1 << shape.width) - 1
        _check_range(name, int(value), low, high)
    return layout.const({name: int(value) for name, value in fields.items()}).as_bits()


def unpack_struct(layout: data.StructLayout, word: int) -> dict:
    """The fields of a flattened struct payload as Python integers (signed fields sign-extended)."""
    view = layout.from_bits(int(word))
    return {name: int(view[name]) for name, _field in layout}


def pack_flit(arch: Arch, data: int, dest_row: int = 0, dest_col: int = 0, dest_host: int = 0) -> int:
    """A flit as the integer on ``*__payload`` (``data`` as from :func:`pack_lanes`)."""
    return pack_struct(flit_layout(arch), data=data, dest_row=dest_row, dest_col=dest_col, dest_host=dest_host)


def pack_load(arch: Arch, tile: int, target: int, addr: int, data: int, chip: int = 0, context: int = 0) -> int:
    """A load-bus write as the integer on ``load__payload``; ``context`` (section 4.6) selects the register file a
    config write sets, in ``0 .. arch.tile_contexts - 1`` (an arch of one context per tile has no ``context``
    field: only 0 is accepted)."""
    context = _check_range("context", context, 0, arch.tile_contexts - 1)
    fields = {"context": context} if arch.tile_contexts > 1 else {}
    return pack_struct(load_layout(arch), tile=tile, target=target, addr=addr, data=data, chip=chip, **fields)


def _pack_link_register(arch: Arch, owner: str, chip: int, addr: int, value: int) -> int:
    """The load-bus write of register ``addr`` of link ``chip``; LoadEncodingError unless ``arch`` has link ``chip``
    (:func:`flowtile.program.link_count`: a ring's return link is link ``chips - 1``)."""
    check_arch(arch, owner)
    if arch.chips == 1:
        raise LoadEncodingError("arch has 1 chip, so no link to load")
    _check_range("link chip", chip, 0, link_count(arch) - 1)
    return pack_load(arch, 0, LOAD_TARGET_LINK, addr, value, chip=chip)


def pack_link_load(arch: Arch, chip: int, inference_flits: int) -> int:
    """The load-bus write (the integer on ``load__payload``) setting ``inference_flits`` of link ``chip`` (chip
    ``chip`` -> chip ``chip + 1``, or a ring's return link to the host, ``Program.links[chip]``); raises
    :class:`LoadEncodingError` naming the value if ``arch`` has no link ``chip`` or ``inference_flits`` does not fit
    its register."""
    _check_range("link register inference_flits", inference_flits, 0, (1 << LINK_INFERENCE_FLITS_BITS) - 1)
    return _pack_link_register(arch, "pack_link_load", chip, LINK_REG_INFERENCE_FLITS, inference_flits)


def pack_link_segment_load(arch: Arch, chip: int, index: int, segment: LaneSegment | None) -> int:
    """The load-bus write setting lane segment ``index`` of link ``chip``'s lane table to ``segment`` (``None``:
    unused); raises :class:`LoadEncodingError` naming the value if the link, the index or the segment is invalid."""
    _check_range("link lane segment index", index, 0, LINK_LANE_SEGMENTS - 1)
    try:
        value = encode_lane_segment(segment, arch.lanes)
    except ValueError as error:
        raise LoadEncodingError(f"link {chip} lane segment {index}: {error}") from None
    return _pack_link_register(arch, "pack_link_segment_load", chip, LINK_REG_LANE_SEGMENT0 + index, value)
