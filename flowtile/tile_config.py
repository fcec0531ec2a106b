"""One tile's configuration registers, typed: what they imply (the counts of docs/architecture.md sections 4 to
4.4) and the one set of rules they must obey (:meth:`TileConfig.validate`).

The emulator, the RTL's load encoding and the compiler all read registers through :class:`TileConfig`; none of them
checks a register rule of its own. Plain dicts (program files, test benches) become a ``TileConfig`` at one
boundary, :meth:`TileConfig.coerce`.
"""
from __future__ import annotations

import dataclasses
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .arch import (ACTIVATION_BANKS, ADD_MULT_MAX, COMPUTE_DRAIN_CYCLES, CONFIG_FIELDS, OP_ADD, OP_BCAST, OP_CONCAT,
                   OP_LANE,
                   OP_MAC, OP_MAX, OP_NAMES, Arch)

__all__ = ["TileConfig", "ConfigError", "REGISTER_NAMES", "register_bounds", "line_buffer_rows_needed", "TWO_OPERAND_WINDOWS", "WINDOW_RANGES"]

#: The register names, in register-address order (:data:`flowtile.arch.CONFIG_FIELDS`).
REGISTER_NAMES = tuple(name for name, _, _ in CONFIG_FIELDS)
_BOUNDS = {name: ((-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1))
           for name, bits, signed in CONFIG_FIELDS}

#: Registers of the two-operand ops fixed by sections 4.2 and 4.3: ADD's 1x2 "kernel" (its two operands,
#: one issue each) and CONCAT's 1x1 kernel (one issue per output word), stride 1, no padding.
TWO_OPERAND_WINDOWS = {
    OP_ADD: {"kernel_h": 1, "kernel_w": 2, "stride": 1, "pad_top": 0, "pad_left": 0},
    OP_CONCAT: {"kernel_h": 1, "kernel_w": 1, "stride": 1, "pad_top": 0, "pad_left": 0},
}

#: Ranges of the windowing registers of a computing tile (section 4.1), beyond what their widths allow. Kernels
#: may span a whole 8-bit map (convolutions and pools alike: a global pool is a window over the whole map); the
#: pads ``pad_top``/``pad_left`` may be anything their 8 bits hold (the compiler keeps them below the kernel, the
#: hardware needs no such rule: a window that reads only padding is computed like any other).
WINDOW_RANGES = {"in_height": (1, None), "in_width": (1, None), "words_per_pixel": (1, None),
                 "kernel_h": (1, 255), "kernel_w": (1, 255), "stride": (1, 3), "out_rows": (1, None),
                 "out_width": (1, None)}


class ConfigError(ValueError):
    """A tile configuration is malformed or breaks a register rule; the message names the registers."""


def register_bounds(name: str) -> tuple[int, int]:
    """``(low, high)`` of config register ``name``: what its width holds (two's complement if signed)."""
    try:
        return _BOUNDS[name]
    except KeyError:
        raise ConfigError(f"unknown config register '{name}'; known: {', '.join(REGISTER_NAMES)}") from None


def line_buffer_rows_needed(spans: Sequence[tuple[int, int]]) -> int:
    """The fewest rows a line buffer needs for output rows reading input rows ``spans`` (``(first, last)`` each, in
    order; :attr:`TileConfig.stream_rows_needed`): the first output row's rows and every row above them, and any
    two consecutive output rows' rows."""
    need = spans[0][1] + 1
    for (first, _), (_, last) in zip(spans, spans[1:]):
        need = max(need, last - first + 1)
    return need


@dataclass(frozen=True)
class TileConfig:
    """Every register of :data:`flowtile.arch.CONFIG_FIELDS` (same names, same order; all default to 0, an idle
    tile). Values are Python ints; :meth:`validate` checks them against their widths and every rule."""

    n_in_words: int = 0
    store_begin: int = 0
    store_end: int = 0
    forward_begin: int = 0
    forward_end: int = 0
    n_pass: int = 0
    n_out: int = 0
    w_base: int = 0
    act_base: int = 0
    dest_row: int = 0
    dest_col: int = 0
    dest_host: int = 0
    zp_out: int = 0
    clamp_lo: int = 0
    clamp_hi: int = 0
    op: int = 0
    in_height: int = 0
    in_width: int = 0
    words_per_pixel: int = 0
    kernel_h: int = 0
    kernel_w: int = 0
    stride: int = 0
    pad_top: int = 0
    pad_left: int = 0
    pad_value: int = 0
    out_row_begin: int = 0
    out_rows: int = 0
    out_width: int = 0
    operand_a_offset: int = 0
    operand_b_offset: int = 0
    add_mult_a: int = 0
    add_mult_b: int = 0
    concat_words_a: int = 0
    pass_per_pixel: int = 0
    out_col_begin: int = 0
    out_col_end: int = 0
    group_word_begin: int = 0
    group_words: int = 0
    store2_begin: int = 0
    store2_end: int = 0
    queue_base: int = 0
    queue_words: int = 0
    in_channels: int = 0
    in_dense: int = 0
    in_dense_offset: int = 0
    param_base: int = 0
    loop_back: int = 0
    single_bank: int = 0
    stream_rows: int = 0
    interleave_rows: int = 0

    def __post_init__(self):
        for name in REGISTER_NAMES:
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, operator.index(value))
            except TypeError:
                raise ConfigError(f"config register '{name}' must be an integer, got {value!r}") from None

    # --- the dict boundary ----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: Mapping) -> "TileConfig":
        """A config from a mapping that names every register exactly once (a program file's, a test bench's)."""
        missing = [name for name in REGISTER_NAMES if name not in values]
        unknown = sorted(set(values) - set(REGISTER_NAMES))
        if missing:
            raise ConfigError(f"config is missing register(s) {', '.join(missing)}")
        if unknown:
            raise ConfigError(f"config has unknown register(s) {', '.join(map(str, unknown))}")
        return cls(**{name: values[name] for name in REGISTER_NAMES})

    @classmethod
    def coerce(cls, config: "TileConfig | Mapping") -> "TileConfig":
        """``config`` itself if it is a TileConfig, else :meth:`from_dict` of it: the one place dicts are taken."""
        return config if isinstance(config, TileConfig) else cls.from_dict(config)

    def to_dict(self) -> dict[str, int]:
        """The registers by name, in register-address order (the program file's ``config``)."""
        return {name: getattr(self, name) for name in REGISTER_NAMES}

    def replace(self, **changes) -> "TileConfig":
        return dataclasses.replace(self, **changes)

    # --- derived counts (sections 4 to 4.4) -----------------------------------------------------
    @property
    def band_end(self) -> int:
        """``E'``: the column before which the band's last output row ends (``out_col_end``; 0 means ``out_width``)."""
        return self.out_col_end or self.out_width

    @property
    def output_pixels(self) -> int:
        """``n_pix`` of section 4.1: ``out_rows`` rows of ``out_width`` pixels, less the first row's columns before
        ``out_col_begin`` and the last row's from ``E'`` (:attr:`band_end`) on."""
        return self.out_rows * self.out_width - self.out_col_begin - (self.out_width - self.band_end)

    def output_pixel_positions(self) -> list[tuple[int, int]]:
        """The ``(oy, ox)`` of the output pixels in order (section 4.1), ``oy`` counting from ``out_row_begin``."""
        width, rows = self.out_width, self.out_rows
        return [(self.out_row_begin + r, x) for r in range(rows)
                for x in range(self.out_col_begin if r == 0 else 0, self.band_end if r == rows - 1 else width)]

    @property
    def stored_words(self) -> int:
        """RECV words written into the activation region per inference (section 4.2): both store ranges."""
        return max(0, self.store_end - self.store_begin) + max(0, self.store2_end - self.store2_begin)

    @property
    def stored_formula(self) -> str:
        """How :attr:`stored_words` is counted, for messages."""
        second = " + store2_end - store2_begin" if self.store2_end > self.store2_begin else ""
        return f"store_end - store_begin{second}"

    @property
    def store_until(self) -> int:
        """One past the last stored RECV word: ``store2_end`` with a second store range, else ``store_end`` (COMPUTE
        of an inference waits for RECV word ``store_until - 1``)."""
        return self.store2_end if self.store2_end > self.store2_begin else self.store_end

    @property
    def forwarded_words(self) -> int:
        """RECV words re-emitted downstream per inference (section 4.2)."""
        return max(0, self.forward_end - self.forward_begin)

    @property
    def queued_words(self) -> int:
        """``Q``: words per inference through the forward queue, forwarded RECV words plus passed words."""
        return self.forwarded_words + self.n_pass

    @property
    def activation_banks(self) -> int:
        """Activation banks of the stored words: :data:`flowtile.arch.ACTIVATION_BANKS`, 1 with ``single_bank``."""
        return 1 if self.single_bank else ACTIVATION_BANKS

    @property
    def activation_words(self) -> int:
        """SRAM words of the activation region: ``[act_base, act_base + activation_banks * stored words)``, or with a
        line buffer (``stream_rows = R``) its ``R`` rows of :attr:`row_words`."""
        if self.stream_rows:
            return self.stream_rows * self.row_words
        return self.activation_banks * self.stored_words

    @property
    def weights_overlap_activations(self) -> bool:
        """Whether the weights ``[w_base, w_base + weight words)`` overlap the activation region (banks or line
        buffer) ``[act_base, act_base + activation_words)``, both non-empty."""
        return bool(self.weight_words and self.stored_words and self.w_base < self.act_base + self.activation_words
                    and self.act_base < self.w_base + self.weight_words)

    @property
    def row_words(self) -> int:
        """Words of one input row of the map: ``in_width * words_per_pixel`` (a line buffer's slot)."""
        return self.in_width * self.words_per_pixel

    def input_rows_of_output_row(self, r: int) -> tuple[int, int]:
        """``(first, last)`` input rows (of the stored map) that output row ``r`` of the band (counting from
        ``out_row_begin``) reads: its windows' rows, clamped to the map (padding reads none)."""
        top = (self.out_row_begin + r) * self.stride - self.pad_top
        return max(0, top), min(self.in_height - 1, top + self.kernel_h - 1)

    @property
    def stream_rows_needed(self) -> int:
        """The fewest rows a line buffer needs so that it never deadlocks: the first output row's rows and every row
        above them must fit (rows are released only as output rows start), and output row ``r + 1``'s rows while row
        ``r``'s are still held (every row below output row ``r``'s first is released when it starts)."""
        return line_buffer_rows_needed([self.input_rows_of_output_row(r) for r in range(self.out_rows)])

    def output_rows_ending(self) -> list[int]:
        """Per input row ``y`` of the map, the band's output rows whose last input row is ``y``
        (:meth:`input_rows_of_output_row`): with ``interleave_rows = 1`` their pixels follow row ``y`` in the streams
        (section 4 "Streaming rows")."""
        ending = [0] * self.in_height
        for r in range(self.out_rows):
            ending[self.input_rows_of_output_row(r)[1]] += 1
        return ending

    @property
    def data_end(self) -> int:
        """One past the highest SRAM word the tile's weights and activation banks use (0 if none)."""
        banks = self.act_base + self.activation_words if self.stored_words else 0
        return max(banks, self.w_base + self.weight_words if self.weight_words else 0)

    def with_queue(self, arch: Arch, words: int | None = None) -> "TileConfig":
        """This config with its forward queue placed right after :attr:`data_end`: ``words`` words, or every free
        word up to ``arch.sram_words`` (None). A tile that queues nothing and gets no ``words`` keeps no queue
        (``queue_base = queue_words = 0``). Raises :class:`ConfigError` if ``words`` do not fit."""
        base = self.data_end
        if words is None:
            words = arch.sram_words - base if self.queued_words else 0
        if words and base + words > arch.sram_words:
            raise ConfigError(f"a forward queue of {words} words does not fit behind the tile's weights and banks "
                              f"(SRAM words {base}..{arch.sram_words - 1} are free, sram_words = {arch.sram_words})")
        return self.replace(queue_base=base if words else 0, queue_words=words)

    @property
    def map_words(self) -> int:
        """Words of the input map the windowing registers describe: ``in_height * in_width * words_per_pixel``."""
        return self.in_height * self.in_width * self.words_per_pixel

    @property
    def channel_preserving(self) -> bool:
        """MAX, LANE, ADD and CONCAT compute one result word per (pixel, word they compute): ``n_out = N_g * L``
        (:attr:`computed_words`)."""
        return self.op in (OP_MAX, OP_LANE, OP_ADD, OP_CONCAT)

    @property
    def computed_words(self) -> int:
        """``N_g``, the result words a pixel a per-word op computes: for the channel-preserving ops ``group_words``,
        or all ``words_per_pixel`` when it is 0 (words ``[group_word_begin, group_word_begin + N_g)``, section
        4.4); for BCAST ``group_words`` (its output channel words, section 4.5)."""
        return self.group_words or self.words_per_pixel

    @property
    def per_word(self) -> bool:
        """The ops that compute a whole result word per (pixel, word): MAX, LANE, ADD, CONCAT and BCAST."""
        return self.channel_preserving or self.op == OP_BCAST

    @property
    def window_issues(self) -> int:
        """Issue cycles of one result word of a per-word op: ``KH * KW`` (MAX, LANE; ADD's 1x2, CONCAT's 1x1),
        ``KH * KW * C`` for BCAST (one per window position and input channel)."""
        window = self.kernel_h * self.kernel_w
        return window * self.in_channels if self.op == OP_BCAST else window

    @property
    def group_slice(self) -> slice:
        """The words of a pixel a channel-preserving op computes: ``[group_word_begin, group_word_begin + N_g)``."""
        return slice(self.group_word_begin, self.group_word_begin + self.computed_words)

    @property
    def weight_words(self) -> int:
        """SRAM words of weights from ``w_base`` (MAC: ``n_out * KH*KW*CW``, LANE: ``KH*KW*N_g``, BCAST:
        ``N_g * KH*KW*C``; else 0)."""
        if not self.n_out or self.op not in (OP_MAC, OP_LANE, OP_BCAST):
            return 0
        if self.op in (OP_LANE, OP_BCAST):
            return self.window_issues * self.computed_words
        return self.n_out * self.kernel_h * self.kernel_w * self.words_per_pixel

    def result_words(self, lanes: int) -> int:
        """Flits emitted from the result buffer per inference (``n_pix * N_r``)."""
        return self.output_pixels * -(-self.n_out // lanes) if self.n_out else 0

    def output_flits(self, lanes: int) -> int:
        """Flits the PE emits per inference (section 4.4): forwarded and passed words, then its result words."""
        return self.queued_words + self.result_words(lanes)

    @property
    def compute_issue_cycles(self) -> int:
        """COMPUTE issue cycles per inference (``I`` of section 4.1; COMPUTE lasts :attr:`compute_cycles`)."""
        if not self.n_out:
            return 0
        if self.per_word:  # ADD: kernel 1x2, one issue per operand; CONCAT: 1x1; BCAST: KH*KW*C a word
            return self.output_pixels * self.computed_words * self.window_issues
        return self.output_pixels * self.n_out * self.kernel_h * self.kernel_w * self.words_per_pixel

    @property
    def compute_cycles(self) -> int:
        """Cycles COMPUTE lasts per inference, ``I + COMPUTE_DRAIN_CYCLES`` (0 without COMPUTE)."""
        return self.compute_issue_cycles + COMPUTE_DRAIN_CYCLES if self.n_out else 0

    def result_word_issue_cycles(self, lanes: int) -> list[int]:
        """Issue cycles ``d`` of each result word of one output pixel, in order (section 4, result ring): COMPUTE
        issues a word's cycles back to back and may wait for a ring slot only before a word. MAC: ``L * K_w`` per
        word of ``L`` channels, ``(N_o mod L) * K_w`` for a last word with fewer; MAX and LANE: ``KH * KW``; ADD: 2
        (its 1x2 operand window); CONCAT: 1; BCAST: ``KH * KW * C``. Sums to ``I / n_pix``."""
        if not self.n_out:
            return []
        if self.per_word:
            return [self.window_issues] * self.computed_words
        per_channel = self.kernel_h * self.kernel_w * self.words_per_pixel
        full, rest = divmod(self.n_out, lanes)
        return [lanes * per_channel] * full + ([rest * per_channel] if rest else [])

    def tile_period_cycles(self, lanes: int) -> int:
        """Cycles per inference of the tile alone in steady state, never stalled (section 6, rule 4): the busiest
        of its input side (``K + P`` transfers), its output side (``Q + E``) and its compute side (COMPUTE's
        ``I + 2`` cycles; results stream out through the ring while it runs); with one activation bank
        (``single_bank``) at least its RECV words up to the last stored one plus COMPUTE, which then alternate."""
        alternating = self.store_until + self.compute_cycles if self.single_bank and self.n_out else 0
        return max(self.n_in_words + self.n_pass, self.output_flits(lanes), self.compute_cycles, alternating)

    @property
    def operand_layout(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """``((offset, words per pixel), ...)`` of operands a and b of an ADD or CONCAT tile (sections 4.2 and
        4.3): each starts at its stored-word offset and holds ``in_height * in_width`` pixels of ``CW`` words
        (ADD), or of ``CWa = concat_words_a`` and ``CW - CWa`` words (CONCAT)."""
        if self.op == OP_CONCAT:
            words_a, words_b = self.concat_words_a, self.words_per_pixel - self.concat_words_a
        else:
            words_a = words_b = self.words_per_pixel
        return (self.operand_a_offset, words_a), (self.operand_b_offset, words_b)

    @property
    def operand_words(self) -> tuple[int, int]:
        """Stored words of the two operand maps of an ADD or CONCAT tile (sections 4.2, 4.3)."""
        pixels = self.in_height * self.in_width
        (_, words_a), (_, words_b) = self.operand_layout
        return pixels * words_a, pixels * words_b

    def pixel_formula(self) -> str:
        """Section 4.1's ``n_pix`` spelled out with the register values (for messages)."""
        width, end = self.out_width, self.out_col_end
        named = f"out_col_end = {end}" if end else "out_width (out_col_end = 0)"
        return (f"out_rows * out_width - out_col_begin - (out_width - E') = {self.out_rows} * {width} - "
                f"{self.out_col_begin} - ({width} - {self.band_end}) = {self.output_pixels} with E' = {named}")

    # --- the rules ------------------------------------------------------------------------------
    def validate(self, arch: Arch) -> None:
        """Raise :class:`ConfigError` unless the registers obey every rule of docs/architecture.md sections 4 to 4.4
        for ``arch``: each register within its width; ``op`` one of :data:`flowtile.arch.OP_NAMES`; the RECV ranges
        ``store_begin <= store_end <= n_in_words`` and ``forward_begin <= forward_end <= n_in_words``; ``n_out > 0``
        requires ``n_in_words > 0``; ``n_out <= max_tile_outputs``; the two activation banks of the stored words
        (``[act_base, act_base + ACTIVATION_BANKS * stored)``) and the weights fit the SRAM; ``pass_per_pixel > 0``
        requires ``n_out > 0``; for a computing tile the windowing registers (:data:`WINDOW_RANGES`), the stored
        words being the input map (ADD, CONCAT: :meth:`_validate_two_operands`), ``n_out = N_g * lanes`` for the
        channel-preserving ops (:attr:`computed_words`; channel groups of MAX, LANE and ADD only, inside the
        pixel), section 4.1's band of output pixels (:meth:`_validate_band`) and
        ``n_pix * pass_per_pixel <= n_pass`` (section 4.4); the destination tile exists; ``clamp_lo <= clamp_hi``;
        the parameter rows ``[param_base, param_base + n_out)`` inside the table (section 4.6; the rules between
        the contexts of one tile are :meth:`flowtile.program.Program.validate`'s).
        The forward queue (:meth:`_validate_queue`): present iff needed, inside the SRAM, apart from banks and weights.
        Registers an op does not read (e.g. ``add_mult_a`` of a MAC tile) are only checked against their width.
        Nothing bounds the result words: they stream out through the PE's result ring (section 4)."""
        for name in REGISTER_NAMES:
            value, (low, high) = getattr(self, name), _BOUNDS[name]
            if not low <= value <= high:
                raise ConfigError(f"config register '{name}' = {value} is out of range {low}..{high}")
        if self.op not in OP_NAMES:
            raise ConfigError(f"config register op = {self.op} is not an op (known: "
                              f"{', '.join(f'{value} ({name})' for value, name in OP_NAMES.items())})")
        k, n_out = self.n_in_words, self.n_out
        for first, last in (("store_begin", "store_end"), ("forward_begin", "forward_end")):
            begin, end = getattr(self, first), getattr(self, last)
            if not begin <= end <= k:
                raise ConfigError(f"config registers {first} = {begin}, {last} = {end} must satisfy "
                                  f"{first} <= {last} <= n_in_words = {k}")
        if (self.store2_begin or self.store2_end) and not (
                self.store_begin < self.store_end <= self.store2_begin < self.store2_end <= k):
            raise ConfigError(f"config registers store2_begin = {self.store2_begin}, store2_end = {self.store2_end} "
                              f"must satisfy store_begin = {self.store_begin} < store_end = {self.store_end} <= "
                              f"store2_begin < store2_end <= n_in_words = {k} (a second store range after a non-empty "
                              f"first; both 0 for none)")
        if n_out > 0 and k == 0:
            raise ConfigError(f"config register n_out = {n_out} requires n_in_words > 0")
        if n_out > arch.max_tile_outputs:
            raise ConfigError(f"config register n_out = {n_out} exceeds max_tile_outputs = {arch.max_tile_outputs}")
        if self.param_base + n_out > arch.max_tile_outputs:
            raise ConfigError(f"config registers param_base + n_out = {self.param_base} + {n_out} exceed "
                              f"max_tile_outputs = {arch.max_tile_outputs} (the parameter table's rows; section 4.6)")
        banks = self.activation_banks
        activation_end = self.act_base + self.activation_words
        if self.stream_rows and activation_end > arch.sram_words:
            raise ConfigError(f"config registers act_base + stream_rows * in_width * words_per_pixel = {self.act_base} "
                              f"+ {self.stream_rows} * {self.in_width} * {self.words_per_pixel} = {activation_end} "
                              f"exceed sram_words = {arch.sram_words} (the line buffer)")
        if activation_end > arch.sram_words:
            raise ConfigError(f"config registers act_base + {banks} * ({self.stored_formula}) = "
                              f"{activation_end} exceed sram_words = {arch.sram_words} ({banks} "
                              f"activation bank{'s' if banks > 1 else ''} of the stored words)")
        if self.single_bank and self.weights_overlap_activations:
            raise ConfigError(f"config register single_bank = 1: the weights [w_base, w_base + weight words) = "
                              f"[{self.w_base}, {self.w_base + self.weight_words}) overlap the activation bank "
                              f"[act_base, act_base + {self.stored_formula}) = [{self.act_base}, {activation_end}), "
                              f"which the next inference overwrites (section 4, one bank)")
        if self.interleave_rows and not (n_out and self.stream_rows):
            raise ConfigError(f"config register interleave_rows = 1 requires a computing tile with a line buffer "
                              f"(n_out = {n_out}, stream_rows = {self.stream_rows}; section 4 \"Streaming rows\")")
        if self.pass_per_pixel and n_out == 0:
            raise ConfigError(f"config register pass_per_pixel = {self.pass_per_pixel} requires a computing tile "
                              f"(n_out > 0; section 4.4)")
        if n_out > 0:
            self._validate_window(arch)
            self._validate_band()
            if self.stream_rows:
                self._validate_stream_rows(arch)
            if self.interleave_rows:
                self._validate_interleave()
            interleaved = self.output_pixels * self.pass_per_pixel
            if interleaved > self.n_pass:
                raise ConfigError(f"config registers n_pix * pass_per_pixel = {self.output_pixels} * "
                                  f"{self.pass_per_pixel} = {interleaved} interleaved passed words exceed n_pass = "
                                  f"{self.n_pass} (n_pix = {self.pixel_formula()}; section 4.4)")
        self._validate_weights(arch)
        self._validate_queue(arch)
        if not self.dest_host:
            if self.dest_row >= arch.rows:
                raise ConfigError(f"config register dest_row = {self.dest_row} outside 0..{arch.rows - 1}")
            if self.dest_col >= arch.cols:
                raise ConfigError(f"config register dest_col = {self.dest_col} outside 0..{arch.cols - 1}")
        if self.clamp_lo > self.clamp_hi:
            raise ConfigError(f"config registers clamp_lo = {self.clamp_lo} > clamp_hi = {self.clamp_hi}")

    def _validate_window(self, arch: Arch) -> None:
        """Sections 4.1 to 4.3 for a tile with ``n_out > 0``: the loop nest is non-empty and the registers describe
        the stored input map (ADD, CONCAT: both operand maps); a channel-preserving op computes ``CW * L``
        outputs."""
        for name, (low, high) in WINDOW_RANGES.items():
            value = getattr(self, name)
            if value < low or (high is not None and value > high):
                bound = f"{low}..{high}" if high is not None else f">= {low}"
                raise ConfigError(f"config register {name} = {value} must be {bound} when n_out > 0")
        if self.op in TWO_OPERAND_WINDOWS:
            self._validate_two_operands()
        elif self.op == OP_BCAST and self.in_dense:
            pass   # a dense map's stored words: _validate_broadcast
        elif self.map_words != self.stored_words:
            raise ConfigError(f"config registers {self.stored_formula} = {self.stored_words} stored words differ "
                              f"from in_height * in_width * words_per_pixel = {self.in_height} * {self.in_width} * "
                              f"{self.words_per_pixel} = {self.map_words}")
        if self.op == OP_BCAST:
            self._validate_broadcast(arch)
            return
        for register in ("in_channels", "in_dense", "in_dense_offset"):
            if getattr(self, register):
                raise ConfigError(f"config register {register} = {getattr(self, register)} must be 0 for op = "
                                  f"{OP_NAMES[self.op]} (an OP_BCAST register; section 4.5)")
        grouped = self.group_word_begin or self.group_words
        if grouped and self.op not in (OP_MAX, OP_LANE, OP_ADD):
            raise ConfigError(f"config registers group_word_begin = {self.group_word_begin}, group_words = "
                              f"{self.group_words} must be 0 for op = {OP_NAMES[self.op]} (channel groups of MAX, "
                              f"LANE and ADD only; section 4.4)")
        if self.group_word_begin + self.computed_words > self.words_per_pixel:
            raise ConfigError(f"config registers group_word_begin + group_words = {self.group_word_begin} + "
                              f"{self.computed_words} exceed words_per_pixel = {self.words_per_pixel} (section 4.4)")
        if self.channel_preserving and self.n_out != self.computed_words * arch.lanes:
            which = "group_words" if self.group_words else "words_per_pixel"
            raise ConfigError(f"config register n_out = {self.n_out} must be {which} * lanes = "
                              f"{self.computed_words * arch.lanes} for op = {OP_NAMES[self.op]}")

    def _validate_broadcast(self, arch: Arch) -> None:
        """Section 4.5 (op BCAST): ``1 <= in_channels <= words_per_pixel * L`` (the channels of the stored pixels it
        reads); its ``N_g = group_words >= 1`` result words a pixel hold ``n_out = N_g * L`` output channels; no
        input channel group (``group_word_begin = 0``)."""
        channels, lanes = self.in_channels, arch.lanes
        if not 1 <= channels <= self.words_per_pixel * lanes:
            raise ConfigError(f"config register in_channels = {channels} must be in 1..words_per_pixel * lanes = "
                              f"{self.words_per_pixel * lanes} for op = OP_BCAST (section 4.5)")
        if self.group_word_begin:
            raise ConfigError(f"config register group_word_begin = {self.group_word_begin} must be 0 for op = "
                              f"OP_BCAST (it reads every input word; section 4.5)")
        if self.group_words < 1 or self.n_out != self.group_words * lanes:
            raise ConfigError(f"config registers n_out = {self.n_out}, group_words = {self.group_words}: op = "
                              f"OP_BCAST computes group_words >= 1 result words a pixel, n_out = group_words * "
                              f"lanes = {self.group_words * lanes} (section 4.5)")
        offset = self.in_dense_offset
        if not self.in_dense:
            if offset:
                raise ConfigError(f"config register in_dense_offset = {offset} must be 0 unless in_dense = 1 "
                                  f"(section 4.5)")
            return
        if offset >= lanes:
            raise ConfigError(f"config register in_dense_offset = {offset} must be < lanes = {lanes} (a byte of "
                              f"the first stored word; section 4.5)")
        dense = self.dense_map_words(lanes)
        if dense != self.stored_words:
            raise ConfigError(f"config registers {self.stored_formula} = {self.stored_words} stored words differ "
                              f"from the dense map's ceil((in_dense_offset + in_height * in_width * in_channels) / "
                              f"lanes) = ceil(({offset} + {self.in_height} * {self.in_width} * {channels}) / "
                              f"{lanes}) = {dense} (section 4.5)")

    def dense_map_words(self, lanes: int) -> int:
        """Words of a densely packed map (op BCAST, ``in_dense = 1``): ``ceil((in_dense_offset + in_height *
        in_width * in_channels) / L)``."""
        return -(-(self.in_dense_offset + self.in_height * self.in_width * self.in_channels) // lanes)

    def _validate_weights(self, arch: Arch) -> None:
        """The weights COMPUTE reads, ``[w_base, w_base + weight_words)``, fit the SRAM."""
        w_end = self.w_base + self.weight_words
        if w_end <= arch.sram_words:
            return
        if not self.weight_words:   # no weights: only the base itself is out of range
            raise ConfigError(f"config register w_base = {w_end} exceeds sram_words = {arch.sram_words}")
        formula = ("group_words * kernel_h * kernel_w * in_channels" if self.op == OP_BCAST
                   else "kernel_h * kernel_w * group_words" if self.op == OP_LANE and self.group_words
                   else "kernel_h * kernel_w * words_per_pixel" if self.op == OP_LANE
                   else "n_out * kernel_h * kernel_w * words_per_pixel")
        raise ConfigError(f"config registers w_base + {formula} = {w_end} exceed sram_words = {arch.sram_words}")

    def _validate_queue(self, arch: Arch) -> None:
        """The forward queue (section 4): a tile that forwards or passes words has one (``queue_words >= 1``); its
        region ``[queue_base, queue_base + queue_words)`` fits the SRAM and overlaps neither the activation banks nor
        the weights (the queue writes its words while COMPUTE reads them)."""
        base, words = self.queue_base, self.queue_words
        if self.queued_words and not words:
            raise ConfigError(f"config register queue_words = 0, but the tile forwards and passes "
                              f"forward_end - forward_begin + n_pass = {self.queued_words} words per inference "
                              f"through its forward queue (queue_words >= 1 needed; section 4)")
        if not words:
            return
        if base + words > arch.sram_words:
            raise ConfigError(f"config registers queue_base + queue_words = {base} + {words} = {base + words} exceed "
                              f"sram_words = {arch.sram_words}")
        regions = [("act_base", self.act_base, self.activation_words,
                    f"{self.activation_banks} * ({self.stored_formula})"),
                   ("w_base", self.w_base, self.weight_words, "the weight words")]
        for register, begin, size, what in regions:
            if size and begin < base + words and base < begin + size:
                raise ConfigError(f"config registers queue_base = {base}, queue_words = {words}: the forward queue "
                                  f"[{base}, {base + words}) overlaps [{register}, {register} + {what}) = "
                                  f"[{begin}, {begin + size}) (section 4)")

    def sram_regions(self) -> list[tuple[str, int, int]]:
        """The SRAM regions the registers claim, as ``(what, begin, end)``: the weights, the two activation banks and
        the forward queue (empty ones left out); the contexts of one tile must keep theirs apart (section 4.6)."""
        regions = [("weights [w_base, w_base + weight words)", self.w_base, self.w_base + self.weight_words),
                   (f"activation banks [act_base, act_base + {self.activation_banks} * stored words)", self.act_base,
                    self.act_base + self.activation_words),
                   ("forward queue [queue_base, queue_base + queue_words)", self.queue_base,
                    self.queue_base + self.queue_words)]
        return [(what, begin, end) for what, begin, end in regions if end > begin]

    def _validate_stream_rows(self, arch: Arch) -> None:
        """A line buffer (``stream_rows = R``, section 4 "Streaming rows"): R a power of two, for a MAC, MAX or LANE
        tile whose one store range is its whole map (rows of ``in_width * words_per_pixel`` words), with two banks'
        rule off (``single_bank = 0``), apart from its weights, and of at least :attr:`stream_rows_needed` rows."""
        rows = self.stream_rows
        if rows & (rows - 1):
            raise ConfigError(f"config register stream_rows = {rows} must be a power of two (a line buffer's slot is "
                              f"the row's low bits)")
        name = OP_NAMES[self.op]
        if self.op not in (OP_MAC, OP_MAX, OP_LANE) or self.in_dense:
            raise ConfigError(f"config register stream_rows = {rows}: a line buffer serves op MAC, MAX or LANE on a "
                              f"map of whole pixels, not op = {name}{' with in_dense = 1' if self.in_dense else ''}")
        if self.single_bank or self.store2_end > self.store2_begin or self.stored_words != self.map_words:
            raise ConfigError(f"config register stream_rows = {rows}: the line buffer holds the map's rows, so the "
                              f"one store range must be the whole map ({self.stored_formula} = {self.stored_words}, "
                              f"in_height * in_width * words_per_pixel = {self.map_words}), with no second range "
                              f"and single_bank = 0")
        last_read = self.input_rows_of_output_row(self.out_rows - 1)[1]
        if last_read != self.in_height - 1:
            raise ConfigError(f"config register stream_rows = {rows}: the band's last output row reads input rows up to "
                              f"{last_read}, not the map's last, {self.in_height - 1} (in_height - 1); a line buffer "
                              f"holds only rows some output row reads (COMPUTE would end before the rest arrive)")
        if rows < self.stream_rows_needed:
            raise ConfigError(f"config register stream_rows = {rows} is less than the {self.stream_rows_needed} input "
                              f"rows two consecutive output rows span (kernel_h = {self.kernel_h}, stride = "
                              f"{self.stride}): the line buffer would deadlock")
        # EMITs come after the inference's queued words (section 4.4); a queued word that arrives only after a row
        # needed a released slot then waits for COMPUTE, which must never wait for those EMITs
        free_words = self.store_begin + rows * self.row_words
        queued_late = self.n_pass or (self.forwarded_words and self.forward_end > free_words)
        if queued_late and not self.interleave_rows and self.result_words(arch.lanes) > arch.result_words:
            raise ConfigError(f"config register stream_rows = {rows}: the tile emits {self.result_words(arch.lanes)} "
                              f"result words an inference, more than the {arch.result_words}-word ring holds, after "
                              f"queued words that arrive behind its first {rows} rows (forward_end = "
                              f"{self.forward_end} > store_begin + stream_rows * row words = {free_words}, or n_pass = "
                              f"{self.n_pass}): COMPUTE would wait for EMITs that wait for those words, which wait "
                              f"for the rows COMPUTE frees (a deadlock)")
        if self.weights_overlap_activations:
            end = self.act_base + self.activation_words
            raise ConfigError(f"config register stream_rows = {rows}: the weights [{self.w_base}, "
                              f"{self.w_base + self.weight_words}) overlap the line buffer [{self.act_base}, {end})")

    def _validate_interleave(self) -> None:
        """Rows interleaved in the streams (``interleave_rows = 1``, section 4 "Streaming rows"): the input stream is
        the map alone (``n_in_words`` its words, stored from word 0), forwarded whole or not at all, the band whole
        output rows, and every passed word one of a pixel's ``pass_per_pixel`` (``n_pass = n_pix * pass_per_pixel``):
        the streams are then rows, each followed by the pixels of the output rows it completes."""
        if self.store_begin or self.n_in_words != self.map_words:
            raise ConfigError(f"config register interleave_rows = 1: the input stream must be the map alone, stored "
                              f"from word 0 (store_begin = {self.store_begin}, n_in_words = {self.n_in_words}, "
                              f"in_height * in_width * words_per_pixel = {self.map_words})")
        if self.forwarded_words not in (0, self.n_in_words) or self.forward_begin:
            raise ConfigError(f"config register interleave_rows = 1: forward_begin = {self.forward_begin}, "
                              f"forward_end = {self.forward_end} must forward the whole map [0, n_in_words = "
                              f"{self.n_in_words}) or nothing (each forwarded row leads the pixels it completes)")
        if self.out_col_begin or self.band_end != self.out_width:
            raise ConfigError(f"config register interleave_rows = 1: the band must be whole output rows "
                              f"(out_col_begin = {self.out_col_begin}, out_col_end = {self.out_col_end}, out_width = "
                              f"{self.out_width})")
        if self.n_pass != self.output_pixels * self.pass_per_pixel:
            raise ConfigError(f"config register interleave_rows = 1: n_pass = {self.n_pass} must be n_pix * "
                              f"pass_per_pixel = {self.output_pixels} * {self.pass_per_pixel} (every passed word "
                              f"belongs to a pixel of the band)")

    def _validate_band(self) -> None:
        """Section 4.1: a computing tile's output pixels are ``out_rows`` rows from ``out_row_begin``, the first
        from column ``out_col_begin``, the last ending before column ``E'`` (:attr:`band_end`). Valid iff
        ``out_col_begin < out_width``, ``out_col_end <= out_width`` and the band holds ``n_pix >= 1`` pixels (the PE
        treats a tile breaking this as not computing)."""
        begin, end, width = self.out_col_begin, self.out_col_end, self.out_width
        if begin >= width:
            raise ConfigError(f"config register out_col_begin = {begin} must be < out_width = {width} (section "
                              f"4.1: the first output row starts at column out_col_begin)")
        if end > width:
            raise ConfigError(f"config register out_col_end = {end} must be <= out_width = {width} (section 4.1: "
                              f"the last output row ends before column out_col_end; 0 means out_width)")
        if self.output_pixels < 1:
            raise ConfigError(f"config registers out_col_begin = {begin}, out_col_end = {end} leave no output "
                              f"pixel: n_pix = {self.pixel_formula()} must be >= 1 (section 4.1)")

    def _validate_two_operands(self) -> None:
        """Sections 4.2 (op ADD) and 4.3 (op CONCAT): the fixed kernel registers; CONCAT's ``1 <= concat_words_a <
        words_per_pixel``; operand a at stored offset ``operand_a_offset`` and operand b at ``operand_b_offset``,
        each inside the stored words and not overlapping the other (in either order); operand multipliers at most
        ADD_MULT_MAX (what keeps |acc| < 2^31); full-width rows inside the map."""
        op, stored = self.op, self.stored_words
        name = OP_NAMES[op]
        window = TWO_OPERAND_WINDOWS[op]
        kernel = f"kernel {window['kernel_h']}x{window['kernel_w']}, stride 1, no padding"
        for register, value in window.items():
            if getattr(self, register) != value:
                raise ConfigError(f"config register {register} = {getattr(self, register)} must be {value} for "
                                  f"op = {name} ({kernel})")
        words_per_pixel, words_a = self.words_per_pixel, self.concat_words_a
        if op == OP_CONCAT and not 1 <= words_a <= words_per_pixel - 1:
            raise ConfigError(f"config register concat_words_a = {words_a} must be in 1..words_per_pixel - 1 = "
                              f"{words_per_pixel - 1} for op = OP_CONCAT (each operand needs a word a pixel)")
        height, width = self.in_height, self.in_width
        if op == OP_CONCAT:
            formulas = {"a": ("in_height * in_width * concat_words_a", f"{height} * {width} * {words_a}"),
                        "b": ("in_height * in_width * (words_per_pixel - concat_words_a)",
                              f"{height} * {width} * ({words_per_pixel} - {words_a})")}
        else:
            formulas = dict.fromkeys("ab", ("in_height * in_width * words_per_pixel",
                                            f"{height} * {width} * {words_per_pixel}"))
        spans = {}
        for operand, size in zip("ab", self.operand_words):
            register = f"operand_{operand}_offset"
            offset = getattr(self, register)
            formula, values = formulas[operand]
            if offset + size > stored:
                raise ConfigError(f"config registers {register} + {formula} = {offset} + {values} = "
                                  f"{offset + size} exceed the {stored} stored words ({self.stored_formula}) "
                                  f"for op = {name} (operand {operand} must lie inside them)")
            spans[operand] = (offset, offset + size)
        (a_begin, a_end), (b_begin, b_end) = spans["a"], spans["b"]
        if a_begin < b_end and b_begin < a_end:
            raise ConfigError(f"config registers operand_a_offset = {a_begin} and operand_b_offset = {b_begin} "
                              f"make the operands overlap (a: stored words {a_begin}..{a_end - 1}, b: "
                              f"{b_begin}..{b_end - 1}); they must be disjoint for op = {name}")
        for register in ("add_mult_a", "add_mult_b"):
            if getattr(self, register) > ADD_MULT_MAX:
                raise ConfigError(f"config register {register} = {getattr(self, register)} exceeds ADD_MULT_MAX = "
                                  f"{ADD_MULT_MAX} for op = {name}")
        if self.out_width != self.in_width:
            raise ConfigError(f"config register out_width = {self.out_width} must equal in_width = {self.in_width} "
                              f"for op = {name}")
        if self.out_row_begin + self.out_rows > self.in_height:
            raise ConfigError(f"config registers out_row_begin + out_rows = {self.out_row_begin + self.out_rows} "
                              f"exceed in_height = {self.in_height} for op = {name}")


assert tuple(f.name for f in dataclasses.fields(TileConfig)) == REGISTER_NAMES, \
    "TileConfig's fields must be CONFIG_FIELDS' registers, in order"
