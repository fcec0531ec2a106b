"""The one architecture description shared by the HDL generator, the emulator and the compiler.

Every width, depth and latency that more than one of them needs derives from an :class:`Arch`.
An ``Arch`` is frozen: build a new one with :meth:`Arch.replace` instead of mutating it.
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from .link_faults import line_threshold

__all__ = ["Arch", "ArchError", "ACC_BITS", "MULTIPLIER_BITS", "SHIFT_BITS", "CONFIG_FIELDS", "OP_MAC",
           "OP_MAX", "OP_LANE", "OP_ADD", "OP_CONCAT", "OP_BCAST", "ADD_MULT_BITS", "ADD_MULT_MAX", "dense_window_registers",
           "stream_registers", "ACTIVATION_BANKS", "OP_NAMES", "COMPUTE_DRAIN_CYCLES", "index_bits"]

#: Accumulator width of a PE. Accumulation wraps modulo 2**ACC_BITS (two's complement); the
#: compiler proves that no layer it emits can reach the wrap (see docs/architecture.md).
ACC_BITS = 32
#: Requantization multiplier: unsigned, in [0, 2**MULTIPLIER_BITS).
MULTIPLIER_BITS = 31
#: Requantization right shift: unsigned, in [1, 2**SHIFT_BITS - 2].
SHIFT_BITS = 6

#: Width of the ADD operand multipliers (``add_mult_a``, ``add_mult_b``); the compiler keeps them
#: <= ADD_MULT_MAX so that ``|(a - z_a) m_a + (b - z_b) m_b| <= 255 * 2 * ADD_MULT_MAX < 2**31``.
ADD_MULT_BITS = 23
ADD_MULT_MAX = 1 << 22

#: The per-tile configuration registers, in register-address order, with their widths in bits
#: and whether they are signed. Program files name them; the RTL loader writes them by index.
CONFIG_FIELDS: tuple[tuple[str, int, bool], ...] = (
    ("n_in_words", 16, False),   # K: RECV words (input flits) per inference; the store range below is stored
    # RECV word k (0 <= k < K) of inference s is stored at act_base + (s mod 2) * B + k - store_begin
    # (activation bank s mod 2; B = stored words of both store ranges, the bank size) iff store_begin <= k < store_end,
    # and re-emitted downstream iff forward_begin <= k < forward_end (section 4.2: several tensors
    # travel in one stream; a tile stores the one it reads and forwards those still needed later).
    ("store_begin", 16, False),
    ("store_end", 16, False),
    ("forward_begin", 16, False),
    ("forward_end", 16, False),
    ("n_pass", 16, False),       # P: flits passed through unchanged after the input flits
    ("n_out", 16, False),        # N_o: output neurons this tile computes (0: pass-through tile)
    ("w_base", 16, False),       # SRAM word address of weight row 0, chunk 0
    ("act_base", 16, False),     # SRAM word address of activation bank 0 (bank 1 at act_base + B)
    ("dest_row", 8, False),      # destination tile of every flit this PE emits
    ("dest_col", 8, False),
    ("dest_host", 1, False),     # 1: flits go to the chip's host output port instead
    ("zp_out", 9, True),         # output zero point (int8 domain)
    ("clamp_lo", 8, True),       # output saturation bounds (int8 domain); ReLU raises clamp_lo to zp_out
    ("clamp_hi", 8, True),
    # Windowed layers (docs/architecture.md section 4.1). A dense layer is the 1x1 case:
    # in_height = in_width = 1, words_per_pixel = n_in_words, 1x1 kernel, one output pixel.
    ("op", 3, False),            # OP_MAC (dense/conv), OP_MAX (max pool), OP_LANE (depthwise conv, average pools),
                                 # OP_ADD (residual Add), OP_CONCAT (channel Concat), OP_BCAST (conv, lanes over
                                 # output channels)
    ("in_height", 8, False),     # input feature map, stored pixel-major (row-major), words_per_pixel words a pixel
    ("in_width", 8, False),
    ("words_per_pixel", 16, False),
    ("kernel_h", 8, False),      # window size, 1..255 (any window up to the map: e.g. a global pool's H x W)
    ("kernel_w", 8, False),
    ("stride", 2, False),        # 1..3, both directions
    ("pad_top", 8, False),       # window origin offset; positions outside the map read pad_value lanes (the
    ("pad_left", 8, False),      # compiler keeps pads < kernel; the registers hold 0..255, as wide as the kernel)
    ("pad_value", 8, True),      # the input zero point for OP_MAC, -128 for OP_MAX
    ("out_row_begin", 8, False), # this tile computes output rows [out_row_begin, out_row_begin + out_rows)
    ("out_rows", 8, False),
    ("out_width", 8, False),     # ... of out_width columns each (rows in between whole; the first row
                                 # starts at out_col_begin, the last ends before out_col_end, below)
    # op = ADD / CONCAT (sections 4.2, 4.3): the two operand maps start at these stored-word offsets.
    ("operand_a_offset", 16, False),
    ("operand_b_offset", 16, False),
    ("add_mult_a", ADD_MULT_BITS, False),  # integer weights of the two operands, <= ADD_MULT_MAX
    ("add_mult_b", ADD_MULT_BITS, False),
    ("concat_words_a", 16, False),         # op = CONCAT: words per pixel of operand a (the rest are b's)
    # Output-channel groups (section 4.4): passed words a pixel that precede this tile's own words of that pixel.
    ("pass_per_pixel", 16, False),
    # Bands of output pixels (section 4.1): the first output row starts at column out_col_begin, the last
    # ends before out_col_end (0: out_width, a full row); rows in between are whole.
    ("out_col_begin", 8, False),
    ("out_col_end", 8, False),
    # Channel groups of the per-word ops MAX, LANE and ADD (section 4.4): the tile computes channel words
    # [group_word_begin, group_word_begin + N_g) of each pixel, N_g = group_words (0: all words_per_pixel).
    # Both 0 for MAC (its groups are its weights' rows) and CONCAT.
    ("group_word_begin", 16, False),
    ("group_words", 16, False),
    # A second store range (section 4.2): RECV word k is also stored iff store2_begin <= k < store2_end, behind the
    # first range's words (a band of a join stores its rows of both operands); 0, 0: none.
    ("store2_begin", 16, False),
    ("store2_end", 16, False),
    # The forward queue lives in the tile's SRAM (section 4): the circular region [queue_base, queue_base +
    # queue_words) holds the forwarded and passed words between the input side and the output side. A tile that
    # forwards or passes anything needs queue_words >= 1; the region overlaps neither the weights nor the banks.
    ("queue_base", 16, False),
    ("queue_words", 17, False),
    # op = BCAST (section 4.5): the input channels C a window position reads, one an issue cycle (lane c mod L of
    # word c div L, broadcast to every lane); 0 for the other ops.
    ("in_channels", 16, False),
    # op = BCAST over a densely packed map (section 4.5): channel c of stored pixel p is byte in_dense_offset + p*C + c
    # of the stored words (word f div L, lane f mod L); 0, 0: the map is pixel-major with CW words a pixel.
    ("in_dense", 1, False),
    ("in_dense_offset", 8, False),
    # Several layers per tile (section 4.6): the context's parameter row r is table row param_base + r; loop_back = 1
    # sends what the context emits into the tile's loop-back FIFO, to its next context (0: the tile's last context).
    ("param_base", 16, False),
    ("loop_back", 1, False),
    # One activation bank (section 4, "One bank"): the stored words of every inference go to act_base onwards, and
    # the first input transfer of inference s >= 1 waits until COMPUTE of s - 1 has ended (two banks: begun). A tile
    # whose COMPUTE is long against its RECV (a large weight matrix over a small map) halves its activation SRAM
    # for a few cycles an inference. The weights may not overlap the bank (TileConfig.validate).
    ("single_bank", 1, False),
    # Line buffer (section 4, "Streaming rows"): 0, or R (a power of two) input rows kept in a circular buffer at
    # act_base instead of banks: row y of inference s in slot (s * in_height + y) mod R; an output row computes as
    # soon as the rows it reads are in, and a row's slot is taken only after the compute side released its old row.
    ("stream_rows", 8, False),
    # Rows interleaved in the stream (section 4 "Streaming rows", program format 14): 1 only with a line buffer. The
    # input side takes, after each input row y, the PASS words of the output rows whose last input row is y (per
    # pixel pass_per_pixel); the output side sends, after each forwarded input row, the pixels of those output rows
    # (each pixel's passed words, then its own result words). The tiles of a layer split into channel groups then
    # pass each output row along as it is computed instead of after the whole map.
    ("interleave_rows", 1, False),
)

#: Activation banks per PE: the input side fills bank ``s mod 2`` with inference ``s`` while COMPUTE reads
#: the other (docs/architecture.md section 4); a tile's activation region is this many times its stored words,
#: unless its register ``single_bank`` is 1 (one bank; :attr:`flowtile.tile_config.TileConfig.activation_banks`).
ACTIVATION_BANKS = 2

#: Values of the ``op`` register.
OP_MAC = 0
OP_MAX = 1
OP_LANE = 2
OP_ADD = 3
OP_CONCAT = 4
OP_BCAST = 5
#: Values of the ``op`` register and their names (the register is 3 bits; 6 and 7 are undefined).
OP_NAMES = {OP_MAC: "OP_MAC", OP_MAX: "OP_MAX", OP_LANE: "OP_LANE", OP_ADD: "OP_ADD", OP_CONCAT: "OP_CONCAT",
            OP_BCAST: "OP_BCAST"}

#: Cycles COMPUTE lasts beyond its ``I`` issue cycles (section 4.1; ``N_o * K`` for a dense layer):
#: multiply-accumulate (or max) of the last read words, then requantization (or clamp) of the last output.
COMPUTE_DRAIN_CYCLES = 2


def dense_window_registers(n_in_words: int) -> dict[str, int]:
    """The windowing registers of a dense layer with ``n_in_words`` input words (the 1x1 case)."""
    return {"op": OP_MAC, "in_height": 1, "in_width": 1, "words_per_pixel": n_in_words,
            "kernel_h": 1, "kernel_w": 1, "stride": 1, "pad_top": 0, "pad_left": 0, "pad_value": 0,
            "out_row_begin": 0, "out_rows": 1, "out_width": 1, "operand_a_offset": 0, "operand_b_offset": 0,
            "add_mult_a": 0, "add_mult_b": 0, "concat_words_a": 0, "pass_per_pixel": 0}


def stream_registers(n_in_words: int, *, forward: bool) -> dict[str, int]:
    """RECV registers of a tile whose stream holds only its layer's input: store all ``n_in_words``
    words; forward all of them (``forward``: more tiles of the layer follow) or none."""
    return {"store_begin": 0, "store_end": n_in_words, "forward_begin": 0,
            "forward_end": n_in_words if forward else 0}


class ArchError(ValueError):
    """An architecture description is invalid; the message names the field."""


def index_bits(n: int) -> int:
    """Bits of an index into ``n >= 1`` things: ``ceil(log2(n))``, at least 1 (the spec's one ceil-log2)."""
    return max(1, (n - 1).bit_length())


@dataclass(frozen=True)
class Arch:
    """A flowtile chip: a ``rows`` x ``cols`` mesh of tiles, each a router, a PE and an SRAM.

    Fields:
        rows, cols: tile grid size.
        lanes: int8 MAC lanes per PE; also the number of int8 values in one flit.
        sram_bytes: per-tile SRAM (weights, the two activation banks and the forward queue, each where the tile's
            registers put it), in bytes; a word is ``lanes`` bytes. There is no forward queue beside it: a tile's
            queue is the SRAM its weights and banks leave free (registers ``queue_base``, ``queue_words``,
            docs/architecture.md section 4), so a tile that stores a band of a map has a deep queue and takes a
            whole inference in while it computes.
        max_tile_outputs: depth of a tile's per-output parameter table (bias, multiplier, shift): the most
            output channels one tile computes.
        result_ring_words: words of a PE's result ring (:attr:`result_words`, ``R``): results stream out through it
            while COMPUTE runs, so it bounds no tile's result count, but COMPUTE runs at most ``R`` words ahead of
            the output side, which sends a tile's results only after the words it passes (section 4.4's order).
            A tile of a split layer whose passed words arrive at the pace of the tiles before it computes freely
            only if the ring holds its results of an inference: the default 1024 (8 KiB at 8 lanes) does for
            the MLPerf-Tiny networks on 8x8 tiles (docs/architecture.md section 4; docs/area.md).
        router_fifo_depth: flits each router input FIFO holds (and a tile's loop-back FIFO between contexts).
        tile_contexts: the most contexts a tile holds (docs/architecture.md section 4.6): consecutive layers a
            tile runs in turn, each with a register file of its own; 1 is the PE of sections 4 to 4.5.
        host_buffer_flits: depth of the simulation harness's input and output buffers (not part of the chip).

    Multi-chip fields (docs/architecture.md section 12; ``rows`` x ``cols`` is the grid of one chip):
        chips: chips joined by links (1: a single chip, no link). The host feeds chip 0's host input and takes
            results from the last chip's host output (in a ring, behind the return link); chip ``k``'s host output
            feeds link ``k`` into chip ``k + 1``'s host input.
        chip_topology: ``"line"`` (chip ``i`` feeds chip ``i + 1``) or ``"ring"`` (at least 2 chips): as the line,
            plus link ``chips - 1`` (the return link) from the last chip's exit port back to chip 0's board, where
            its receiver feeds the host output: the host is attached to chip 0 only, and the results pay that
            link's serialization, latency and faults (docs/architecture.md section 12).
        link_bits_per_cycle: wire bits a link carries per cycle each way; ``None`` (the default) means
            ``max(1, flit_bits // 16)`` (:attr:`link_bits`).
        link_latency_cycles: pipeline stages of the wire, each way.
        link_frame_flits: flits per link frame (one sequence number, one flit count and one CRC-32 per frame; a
            flit crosses as its ``flit_data_bits`` data bits only). The default 16 makes a frame of 64-bit flits
            about 96% data.
        link_credit_frames: frames the receiver buffers; the sender holds one credit per frame.
        link_replay_frames: sent frames the sender keeps until acknowledged (go-back-N window).
        link_error_rate: probability that a wire bit flips in a cycle (fault injection; 0.0: none).
        link_error_seed: seed of the fault injector's LFSRs (1..2**32 - 1).
        link_burst_cycles: length of a fault burst in cycles (1..4096; 1: no bursts, every wire bit flips on its
            own). Above 1 every fault comes in bursts of that many cycles, in which each wire bit flips with
            probability 1/2; bursts start often enough that the long-run rate stays ``link_error_rate``
            (flowtile/link_faults.py).
    """

    rows: int = 4
    cols: int = 4
    lanes: int = 8
    sram_bytes: int = 65536
    max_tile_outputs: int = 512
    result_ring_words: int = 1024
    router_fifo_depth: int = 4
    host_buffer_flits: int = 65536
    tile_contexts: int = 8
    chips: int = 1
    chip_topology: str = "line"
    link_bits_per_cycle: int | None = None
    link_latency_cycles: int = 64
    link_frame_flits: int = 16
    link_credit_frames: int = 8
    link_replay_frames: int = 8
    link_error_rate: float = 0.0
    link_error_seed: int = 1
    link_burst_cycles: int = 1

    def __post_init__(self):
        def check(name, ok, why):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ArchError(f"arch field '{name}' must be an integer, got {value!r}")
            if not ok(value):
                raise ArchError(f"arch field '{name}' = {value} is invalid: {why}")

        check("rows", lambda v: 1 <= v <= 64, "must be in 1..64")
        check("cols", lambda v: 1 <= v <= 64, "must be in 1..64")
        check("lanes", lambda v: v in (1, 2, 4, 8, 16, 32), "must be one of 1, 2, 4, 8, 16, 32")
        check("sram_bytes", lambda v: v > 0 and v % self.lanes == 0 and v // self.lanes <= 65536,
              f"must be a positive multiple of lanes ({self.lanes}) and at most {65536 * self.lanes}")
        check("max_tile_outputs", lambda v: 1 <= v <= 65535, "must be in 1..65535")
        check("result_ring_words", lambda v: 1 <= v <= 65536, "must be in 1..65536")
        check("router_fifo_depth", lambda v: 1 <= v <= 1024, "must be in 1..1024")
        check("host_buffer_flits", lambda v: 1 <= v <= (1 << 24), "must be in 1..16777216")
        check("tile_contexts", lambda v: 1 <= v <= 16, "must be in 1..16")
        check("chips", lambda v: 1 <= v <= 256, "must be in 1..256")
        if self.chip_topology not in ("line", "ring"):
            raise ArchError(f"arch field 'chip_topology' = {self.chip_topology!r} is invalid: "
                            f"must be 'line' or 'ring'")
        if self.chip_topology == "ring" and self.chips < 2:
            raise ArchError(f"arch field 'chip_topology' = 'ring' is invalid with chips = {self.chips}: "
                            f"a ring needs at least 2 chips")
        if self.link_bits_per_cycle is not None:
            check("link_bits_per_cycle", lambda v: 1 <= v <= self.flit_bits,
                  f"must be in 1..{self.flit_bits} (the flit width), or None for flit_bits // 16")
        check("link_latency_cycles", lambda v: 1 <= v <= 65536, "must be in 1..65536")
        check("link_frame_flits", lambda v: 1 <= v <= 64, "must be in 1..64")
        check("link_credit_frames", lambda v: 1 <= v <= 256, "must be in 1..256")
        check("link_replay_frames", lambda v: 1 <= v <= 256, "must be in 1..256")
        rate = self.link_error_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)):
            raise ArchError(f"arch field 'link_error_rate' must be a number, got {rate!r}")
        if not 0.0 <= rate <= 0.5:
            raise ArchError(f"arch field 'link_error_rate' = {rate} is invalid: must be in 0.0..0.5")
        check("link_error_seed", lambda v: 1 <= v < (1 << 32), "must be in 1..4294967295")
        check("link_burst_cycles", lambda v: 1 <= v <= 4096, "must be in 1..4096")
        try:
            line_threshold("arch", rate, self.link_burst_cycles)
        except ValueError:
            raise ArchError(f"arch field 'link_error_rate' = {rate} is invalid: without bursts the injector's "
                            f"resolution is 2**-17 (use 0.0 for no faults, or link_burst_cycles > 1, with which "
                            f"any rate > 0 is representable)") from None

    # --- derived quantities -------------------------------------------------------------------
    @property
    def n_tiles(self) -> int:
        return self.rows * self.cols

    @property
    def flit_data_bits(self) -> int:
        return 8 * self.lanes

    @property
    def flit_bits(self) -> int:
        """Width of a whole flit (``hdl.layouts.flit_layout``): data, dest_row, dest_col, dest_host."""
        return self.flit_data_bits + self.row_bits + self.col_bits + 1

    @property
    def link_bits(self) -> int:
        """Wire bits per cycle of an inter-chip link: ``link_bits_per_cycle``, or ``max(1, flit_bits // 16)``."""
        if self.link_bits_per_cycle is not None:
            return self.link_bits_per_cycle
        return max(1, self.flit_bits // 16)

    @property
    def sram_words(self) -> int:
        return self.sram_bytes // self.lanes

    @property
    def result_words(self) -> int:
        """Depth ``R`` of a PE's result ring, in flits (section 4): ``result_ring_words``."""
        return self.result_ring_words

    @property
    def param_rows_per_lane(self) -> int:
        """Rows of each of a PE's ``lanes`` parameter-table banks: ``ceil(max_tile_outputs / lanes)``."""
        return -(-self.max_tile_outputs // self.lanes)

    @property
    def row_bits(self) -> int:
        return index_bits(self.rows)

    @property
    def col_bits(self) -> int:
        return index_bits(self.cols)

    @property
    def tile_memory_bits(self) -> dict[str, int]:
        """Memory bits of one tile by memory (what ``flowtile area`` measures as memory bits, docs/area.md): the
        SRAM (which holds the forward queue too) and the result ring (``8 * lanes`` bits a word), the parameter
        table (one bank per lane of ``ceil(max_tile_outputs / lanes)`` rows of bias, multiplier and shift) and the
        router's five input FIFOs of whole flits."""
        word = 8 * self.lanes
        return {"sram": self.sram_bytes * 8, "result_ring": self.result_words * word,
                "params": self.lanes * self.param_rows_per_lane * (ACC_BITS + MULTIPLIER_BITS + SHIFT_BITS),
                "router": 5 * self.router_fifo_depth * self.flit_bits}

    @property
    def param_bytes_per_output(self) -> int:
        """SRAM-equivalent bytes of one parameter-table entry (bias 32 + multiplier 31 + shift 6 bits)."""
        return -(-(ACC_BITS + MULTIPLIER_BITS + SHIFT_BITS) // 8)

    # --- the tile chain -------------------------------------------------------------------------
    def chain_position(self, position: int) -> tuple[int, int]:
        """(row, col) of the tile at ``position`` on the serpentine chain.

        Even rows run west to east, odd rows east to west, so consecutive positions are mesh neighbours.
        """
        if not 0 <= position < self.n_tiles:
            raise ArchError(f"chain position {position} outside 0..{self.n_tiles - 1}")
        row, offset = divmod(position, self.cols)
        col = offset if row % 2 == 0 else self.cols - 1 - offset
        return row, col

    @property
    def system_tiles(self) -> int:
        """Tiles of all chips: ``chips * n_tiles``."""
        return self.chips * self.n_tiles

    def system_position(self, position: int) -> tuple[int, int, int]:
        """(chip, row, col) of the tile at ``position`` on the system chain: chip ``position // n_tiles``'s
        serpentine chain, the chips in line order (the last tile of chip ``k`` sends over link ``k`` to tile
        (0, 0) of chip ``k + 1``)."""
        if not 0 <= position < self.system_tiles:
            raise ArchError(f"system chain position {position} outside 0..{self.system_tiles - 1}")
        chip, within = divmod(position, self.n_tiles)
        return (chip, *self.chain_position(within))

    @property
    def chain(self) -> tuple[tuple[int, int], ...]:
        return tuple(self.chain_position(p) for p in range(self.n_tiles))

    @property
    def exit_tile(self) -> tuple[int, int]:
        """The tile whose router drives the chip's host output port (the end of the chain)."""
        return self.chain_position(self.n_tiles - 1)

    @property
    def exit_direction(self) -> str:
        """Edge port of the exit tile's router wired to the host output: 'E' or 'W'."""
        return "E" if (self.rows - 1) % 2 == 0 else "W"

    # --- construction ---------------------------------------------------------------------------
    def replace(self, **changes) -> "Arch":
        return dataclasses.replace(self, **changes)

    def with_grid(self, grid: str | None) -> "Arch":
        """Apply a ``RxC`` grid string (e.g. ``"4x4"``), as given to ``--grid``."""
        if grid is None:
            return self
        try:
            rows, cols = (int(part) for part in grid.lower().split("x"))
        except ValueError:
            raise ArchError(f"--grid '{grid}' is not of the form RxC (e.g. 4x4)") from None
        return self.replace(rows=rows, cols=cols)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, *, source: str = "arch") -> "Arch":
        known = {f.name for f in fields(cls)}
        if "forward_queue_words" in values:
            raise ArchError(f"{source}: arch field 'forward_queue_words' no longer exists: a tile's forward queue is "
                            f"the SRAM its weights and banks leave free (registers queue_base and queue_words, "
                            f"docs/architecture.md section 4); size the tile with 'sram_bytes'")
        unknown = sorted(set(values) - known)
        if unknown:
            raise ArchError(f"{source}: unknown arch field(s) {', '.join(map(repr, unknown))}; "
                            f"known fields: {', '.join(sorted(known))}")
        return cls(**values)

    @classmethod
    def from_toml(cls, path: str | Path) -> "Arch":
        """Load an Arch from a TOML file: top-level keys, or an ``[arch]`` table."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ArchError(f"arch file '{path}' does not exist") from None
        except tomllib.TOMLDecodeError as error:
            raise ArchError(f"arch file '{path}' is not valid TOML: {error}") from None
        if "arch" in data and isinstance(data["arch"], dict):
            data = data["arch"]
        return cls.from_dict(data, source=str(path))
