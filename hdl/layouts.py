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
  tile      :func:`load_tile_bits` = ceil(log2(n_tiles))  tile index ``row * cols + col``
            (at least 1)
  target    :data:`LOAD_TARGET_BITS` = 2                 :data:`LOAD_TARGET_SRAM` (0),
                                                         :data:`LOAD_TARGET_PARAMS` (1),
                                                         :data:`LOAD_TARGET_CONFIG` (2)
  addr      :data:`LOAD_ADDR_BITS` = 16                  SRAM word / parameter row / config register
  data      :func:`load_data_bits` = max(8 * lanes, 69)  see below
  ========  ===========================================  =============================================

  Data per target: SRAM word = a flit's ``data`` (low ``8 * lanes`` bits); parameter entry =
  :func:`param_layout` (bias ``[0, 32)`` signed, multiplier ``[32, 63)``, shift ``[63, 69)``), built
  by :func:`encode_param_entry`; config register ``addr`` = its index in ``CONFIG_FIELDS``, value in
  the low bits, two's complement for signed registers, built by :func:`encode_config`.
  Writes beyond a memory's depth, to an unknown config address or to target 3 are ignored.
"""
from __future__ import annotations

from amaranth.hdl import signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import Out

from flowtile.arch import (ACC_BITS, ACTIVATION_BANKS, ADD_MULT_MAX, CONFIG_FIELDS, MULTIPLIER_BITS, OP_ADD, OP_CONCAT,
                           OP_LANE, OP_MAC, OP_MAX, SHIFT_BITS, Arch)
from flowtile.program import operand_words, output_pixels, stored_words, weight_words

__all__ = [
    "LOAD_TARGET_SRAM", "LOAD_TARGET_PARAMS", "LOAD_TARGET_CONFIG", "LOAD_TARGET_BITS", "LOAD_ADDR_BITS",
    "PARAM_ENTRY_BITS", "OPS", "WINDOW_RANGES", "TWO_OPERAND_WINDOWS", "LoadEncodingError",
    "check_arch", "check_tile_position", "flit_layout", "flit_signature", "load_layout", "load_signature", "load_data_bits",
    "load_tile_bits", "param_layout", "config_layout", "config_field_index",
    "encode_param_entry", "encode_config", "encode_config_value", "pack_lanes", "unpack_lanes",
    "pack_struct", "unpack_struct", "pack_flit", "pack_load", "LANE_BITS",
]

LOAD_TARGET_SRAM = 0
LOAD_TARGET_PARAMS = 1
LOAD_TARGET_CONFIG = 2
#: Width of the load ``target`` field (three targets).
LOAD_TARGET_BITS = 2
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
    return max(1, (arch.n_tiles - 1).bit_length())


def load_layout(arch: Arch) -> data.StructLayout:
    """The load-bus payload (``valid`` is the stream's, see the module docstring)."""
    check_arch(arch, "load_layout")
    return data.StructLayout({
        "tile": unsigned(load_tile_bits(arch)),
        "target": unsigned(LOAD_TARGET_BITS),
        "addr": unsigned(LOAD_ADDR_BITS),
        "data": unsigned(load_data_bits(arch)),
    })


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
    _, width, is_signed = CONFIG_FIELDS[index]
    low, high = (-(1 << (width - 1)), (1 << (width - 1)) - 1) if is_signed else (0, (1 << width) - 1)
    value = _check_range(f"config register {name}", value, low, high)
    return value & ((1 << width) - 1)


def encode_config(arch: Arch, config: dict) -> list[tuple[int, int]]:
    """``(addr, data)`` load pairs for a complete tile config (every register of ``CONFIG_FIELDS``).

    Besides each register's own range, checks the rules of docs/architecture.md sections 4 to 4.4 that the RTL
    relies on: the RECV ranges ``store_begin <= store_end <= n_in_words`` and ``forward_begin <= forward_end <=
    n_in_words``; ``n_out > 0`` requires ``n_in_words > 0``; ``n_out <= max_tile_outputs``; the two activation banks
    of the stored words (``[act_base, act_base + ACTIVATION_BANKS * (store_end - store_begin))``, section 4) and the
    weights fit the SRAM; the destination tile exists; ``op`` is one of :data:`OPS`; and for a computing tile the
    windowing registers (:data:`WINDOW_RANGES`; the stored words are the ``in_height * in_width * words_per_pixel``
    input map, except for the two-operand ops; ``n_out = words_per_pixel * lanes`` for the channel-preserving
    ``OP_MAX``, ``OP_LANE``, ``OP_ADD`` and ``OP_CONCAT``; no bound on the result words, which stream out through
    the result ring, section 4). ``OP_ADD`` and ``OP_CONCAT`` (:func:`_check_two_operands`): the kernel registers of
    :data:`TWO_OPERAND_WINDOWS` (ADD 1x2, CONCAT 1x1; stride 1, no padding); for CONCAT ``1 <= concat_words_a <=
    words_per_pixel - 1``; operand ``a`` (``in_height * in_width * CW`` words for ADD, ``* concat_words_a`` for
    CONCAT) at ``operand_a_offset`` and operand ``b`` (``* CW`` for ADD, ``* (CW - concat_words_a)`` for CONCAT) at
    ``operand_b_offset`` lie inside the stored words and do not overlap (either may come first); ``add_mult_a``,
    ``add_mult_b <= ADD_MULT_MAX``; ``out_width = in_width`` and the output rows inside the map. Section 4.1's band
    of output pixels (a computing tile): ``out_col_begin < out_width``, ``out_col_end <= out_width`` (0 meaning
    ``out_width``) and ``n_pix`` = :func:`flowtile.program.output_pixels` ``>= 1`` (:func:`_check_pixel_band`).
    Section 4.4: ``pass_per_pixel > 0`` requires ``n_out > 0`` and ``n_pix * pass_per_pixel <= n_pass``. Registers
    an op does not read (e.g. ``add_mult_a`` of a MAC tile, ``concat_words_a`` of an ADD tile) are only
    range-checked against their width, as the emulator does.
    """
    check_arch(arch, "encode_config")
    names = [name for name, _, _ in CONFIG_FIELDS]
    missing = [name for name in names if name not in config]
    unknown = sorted(set(config) - set(names))
    if missing:
        raise LoadEncodingError(f"config is missing register(s) {', '.join(missing)}")
    if unknown:
        raise LoadEncodingError(f"config has unknown register(s) {', '.join(unknown)}")
    pairs = [(config_field_index(name), encode_config_value(name, config[name])) for name in names]
    if config["op"] not in OPS:
        raise LoadEncodingError(f"config register op = {config['op']} is not an op (known: "
                                f"{', '.join(f'{value} ({name})' for value, name in OPS.items())})")
    k, n_out = config["n_in_words"], config["n_out"]
    for first, last in (("store_begin", "store_end"), ("forward_begin", "forward_end")):
        if not config[first] <= config[last] <= k:
            raise LoadEncodingError(f"config registers {first} = {config[first]}, {last} = {config[last]} "
                                    f"must satisfy {first} <= {last} <= n_in_words = {k}")
    if n_out > 0 and k == 0:
        raise LoadEncodingError(f"config register n_out = {n_out} requires n_in_words > 0")
    if n_out > arch.max_tile_outputs:
        raise LoadEncodingError(f"config register n_out = {n_out} exceeds max_tile_outputs = "
                                f"{arch.max_tile_outputs}")
    stored = stored_words(config)
    activation_end = config["act_base"] + ACTIVATION_BANKS * stored
    if stored > 0 and activation_end > arch.sram_words:
        raise LoadEncodingError(f"config registers act_base + {ACTIVATION_BANKS} * (store_end - store_begin) = "
                                f"{activation_end} exceed sram_words = {arch.sram_words} ({ACTIVATION_BANKS} "
                                f"activation banks of the stored words)")
    if config["pass_per_pixel"] and n_out == 0:
        raise LoadEncodingError(f"config register pass_per_pixel = {config['pass_per_pixel']} requires a "
                                f"computing tile (n_out > 0; section 4.4)")
    if n_out > 0:
        _check_window(arch, config)
        _check_pixel_band(config)
        n_pix = output_pixels(config)
        interleaved = n_pix * config["pass_per_pixel"]
        if interleaved > config["n_pass"]:
            raise LoadEncodingError(f"config registers n_pix * pass_per_pixel = {n_pix} * "
                                    f"{config['pass_per_pixel']} = {interleaved} interleaved passed words exceed "
                                    f"n_pass = {config['n_pass']} (n_pix = {_pixel_formula(config)}; section 4.4)")
    if not config["dest_host"]:
        if config["dest_row"] >= arch.rows:
            raise LoadEncodingError(f"config register dest_row = {config['dest_row']} outside 0..{arch.rows - 1}")
        if config["dest_col"] >= arch.cols:
            raise LoadEncodingError(f"config register dest_col = {config['dest_col']} outside 0..{arch.cols - 1}")
    if config["clamp_lo"] > config["clamp_hi"]:
        raise LoadEncodingError(f"config registers clamp_lo = {config['clamp_lo']} > clamp_hi = "
                                f"{config['clamp_hi']}")
    return pairs


#: Values of the ``op`` register the PE implements (docs/architecture.md sections 4.1, 4.2 and 4.3).
OPS = {OP_MAC: "OP_MAC", OP_MAX: "OP_MAX", OP_LANE: "OP_LANE", OP_ADD: "OP_ADD", OP_CONCAT: "OP_CONCAT"}

#: Registers of the two-operand ops fixed by sections 4.2 and 4.3: ADD's 1x2 "kernel" (its two operands,
#: one issue each) and CONCAT's 1x1 kernel (one issue per output word), stride 1, no padding.
TWO_OPERAND_WINDOWS = {
    OP_ADD: {"kernel_h": 1, "kernel_w": 2, "stride": 1, "pad_top": 0, "pad_left": 0},
    OP_CONCAT: {"kernel_h": 1, "kernel_w": 1, "stride": 1, "pad_top": 0, "pad_left": 0},
}

#: Ranges of the windowing registers of a computing tile (docs/architecture.md section 4.1), beyond
#: what their widths allow. Kernels may span a whole 8-bit map (global pools as LANE layers); the
#: compiler, not the hardware, limits convolutions to 1..7.
WINDOW_RANGES = {"in_height": (1, None), "in_width": (1, None), "words_per_pixel": (1, None),
                 "kernel_h": (1, 255), "kernel_w": (1, 255), "stride": (1, 3), "out_rows": (1, None),
                 "out_width": (1, None)}


def _check_window(arch: Arch, config: dict) -> None:
    """Sections 4.1 to 4.3's rules for a tile with ``n_out > 0``: the loop nest is non-empty, the
    registers describe the stored input map (ADD, CONCAT: both operand maps), the weights fit the SRAM.
    Nothing bounds the result words: they stream out through the PE's result ring (section 4)."""
    for name, (low, high) in WINDOW_RANGES.items():
        value = config[name]
        if value < low or (high is not None and value > high):
            bound = f"{low}..{high}" if high is not None else f">= {low}"
            raise LoadEncodingError(f"config register {name} = {value} must be {bound} when n_out > 0")
    op, n_out, words_per_pixel = config["op"], config["n_out"], config["words_per_pixel"]
    map_words = config["in_height"] * config["in_width"] * words_per_pixel
    stored = stored_words(config)
    if op in TWO_OPERAND_WINDOWS:
        _check_two_operands(config, stored)
    elif map_words != stored:
        raise LoadEncodingError(f"config registers store_end - store_begin = {stored} stored words differ "
                                f"from in_height * in_width * words_per_pixel = {config['in_height']} * "
                                f"{config['in_width']} * {words_per_pixel} = {map_words}")
    if op in (OP_MAX, OP_LANE, OP_ADD, OP_CONCAT) and n_out != words_per_pixel * arch.lanes:
        raise LoadEncodingError(f"config register n_out = {n_out} must be words_per_pixel * lanes = "
                                f"{words_per_pixel * arch.lanes} for op = {OPS[op]}")
    w_end = config["w_base"] + weight_words(config)
    if w_end > arch.sram_words:
        if op in (OP_MAX, OP_ADD, OP_CONCAT):   # no weights: only the base itself is out of range
            raise LoadEncodingError(f"config register w_base = {w_end} exceeds sram_words = {arch.sram_words}")
        weight_formula = ("kernel_h * kernel_w * words_per_pixel" if op == OP_LANE
                          else "n_out * kernel_h * kernel_w * words_per_pixel")
        raise LoadEncodingError(f"config registers w_base + {weight_formula} = "
                                f"{w_end} exceed sram_words = {arch.sram_words}")


def _pixel_formula(config: dict) -> str:
    """Section 4.1's n_pix of ``config`` spelled out with its register values."""
    width, end = config["out_width"], config["out_col_end"]
    band_end, named = (end, f"out_col_end = {end}") if end else (width, "out_width (out_col_end = 0)")
    return (f"out_rows * out_width - out_col_begin - (out_width - E') = {config['out_rows']} * {width} - "
            f"{config['out_col_begin']} - ({width} - {band_end}) = {output_pixels(config)} with E' = {named}")


def _check_pixel_band(config: dict) -> None:
    """Section 4.1: a computing tile's output pixels are ``out_rows`` rows from ``out_row_begin``, the first
    from column ``out_col_begin``, the last ending before column ``out_col_end`` (0: ``out_width``). Valid
    iff ``out_col_begin < out_width``, ``out_col_end <= out_width`` and the band holds ``n_pix >= 1``
    pixels (the PE treats a tile breaking this as not computing)."""
    begin, end, width = config["out_col_begin"], config["out_col_end"], config["out_width"]
    if begin >= width:
        raise LoadEncodingError(f"config register out_col_begin = {begin} must be < out_width = {width} "
                                f"(section 4.1: the first output row starts at column out_col_begin)")
    if end > width:
        raise LoadEncodingError(f"config register out_col_end = {end} must be <= out_width = {width} "
                                f"(section 4.1: the last output row ends before column out_col_end; 0 means "
                                f"out_width)")
    if output_pixels(config) < 1:
        raise LoadEncodingError(f"config registers out_col_begin = {begin}, out_col_end = {end} leave no output "
                                f"pixel: n_pix = {_pixel_formula(config)} must be >= 1 (section 4.1)")


def _check_two_operands(config: dict, stored: int) -> None:
    """Sections 4.2 (op ADD) and 4.3 (op CONCAT): the fixed kernel registers; CONCAT's
    ``1 <= concat_words_a < words_per_pixel``; operand a at stored offset ``operand_a_offset`` and operand b
    at ``operand_b_offset``, each inside the stored words and not overlapping the other (in either order);
    operand multipliers at most ADD_MULT_MAX (what keeps |acc| < 2^31); full-width rows inside the map."""
    op = config["op"]
    name = OPS[op]
    window = TWO_OPERAND_WINDOWS[op]
    kernel = f"kernel {window['kernel_h']}x{window['kernel_w']}, stride 1, no padding"
    for register, value in window.items():
        if config[register] != value:
            raise LoadEncodingError(f"config register {register} = {config[register]} must be {value} for "
                                    f"op = {name} ({kernel})")
    words_per_pixel, words_a = config["words_per_pixel"], config["concat_words_a"]
    if op == OP_CONCAT and not 1 <= words_a <= words_per_pixel - 1:
        raise LoadEncodingError(f"config register concat_words_a = {words_a} must be in 1..words_per_pixel - 1 "
                                f"= {words_per_pixel - 1} for op = OP_CONCAT (each operand needs a word a pixel)")
    size_a, size_b = operand_words(config)
    height, width = config["in_height"], config["in_width"]
    if op == OP_CONCAT:
        formulas = {"a": ("in_height * in_width * concat_words_a", f"{height} * {width} * {words_a}"),
                    "b": ("in_height * in_width * (words_per_pixel - concat_words_a)",
                          f"{height} * {width} * ({words_per_pixel} - {words_a})")}
    else:
        formulas = dict.fromkeys("ab", ("in_height * in_width * words_per_pixel",
                                        f"{height} * {width} * {words_per_pixel}"))
    spans = {}
    for operand, size in (("a", size_a), ("b", size_b)):
        register = f"operand_{operand}_offset"
        offset = config[register]
        formula, values = formulas[operand]
        if offset + size > stored:
            raise LoadEncodingError(f"config registers {register} + {formula} = {offset} + {values} = "
                                    f"{offset + size} exceed the {stored} stored words (store_end - store_begin) "
                                    f"for op = {name} (operand {operand} must lie inside them)")
        spans[operand] = (offset, offset + size)
    (a_begin, a_end), (b_begin, b_end) = spans["a"], spans["b"]
    if a_begin < b_end and b_begin < a_end:
        raise LoadEncodingError(f"config registers operand_a_offset = {a_begin} and operand_b_offset = {b_begin} "
                                f"make the operands overlap (a: stored words {a_begin}..{a_end - 1}, b: "
                                f"{b_begin}..{b_end - 1}); they must be disjoint for op = {name}")
    for register in ("add_mult_a", "add_mult_b"):
        if config[register] > ADD_MULT_MAX:
            raise LoadEncodingError(f"config register {register} = {config[register]} exceeds ADD_MULT_MAX = "
                                    f"{ADD_MULT_MAX} for op = {name}")
    if config["out_width"] != config["in_width"]:
        raise LoadEncodingError(f"config register out_width = {config['out_width']} must equal in_width = "
                                f"{config['in_width']} for op = {name}")
    if config["out_row_begin"] + config["out_rows"] > config["in_height"]:
        raise LoadEncodingError(f"config registers out_row_begin + out_rows = "
                                f"{config['out_row_begin'] + config['out_rows']} exceed in_height = "
                                f"{config['in_height']} for op = {name}")


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
    ``i_host__payload``)."""
    word = 0
    for name, value in fields.items():
        try:
            field = layout[name]
        except KeyError:
            raise LoadEncodingError(f"'{name}' is not a field of {layout!r}") from None
        width = field.width
        value = int(value)
        low = -(1 << (width - 1)) if field.shape.signed else 0
        high = (1 << (width - 1)) - 1 if field.shape.signed else (1 << width) - 1
        _check_range(name, value, low, high)
        word |= (value & ((1 << width) - 1)) << field.offset
    return word


def unpack_struct(layout: data.StructLayout, word: int) -> dict:
    """The fields of a flattened struct payload as Python integers (signed fields sign-extended)."""
    result = {}
    for name, field in layout:
        value = (int(word) >> field.offset) & ((1 << field.width) - 1)
        if field.shape.signed and value >> (field.width - 1):
            value -= 1 << field.width
        result[name] = value
    return result


def pack_flit(arch: Arch, data: int, dest_row: int = 0, dest_col: int = 0, dest_host: int = 0) -> int:
    """A flit as the integer on ``*__payload`` (``data`` as from :func:`pack_lanes`)."""
    return pack_struct(flit_layout(arch), data=data, dest_row=dest_row, dest_col=dest_col, dest_host=dest_host)


def pack_load(arch: Arch, tile: int, target: int, addr: int, data: int) -> int:
    """A load-bus write as the integer on ``load__payload``."""
    return pack_struct(load_layout(arch), tile=tile, target=target, addr=addr, data=data)
