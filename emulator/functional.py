"""Bit-exact data model of a flowtile run (docs/architecture.md sections 1-4).

Everything here is derived from the tiles' configuration registers, SRAM images and parameter tables,
never from the compiler's layer descriptions. Two parts:

* :func:`trace_data_path` follows the flits the way the hardware moves them: from the host into
  tile (0,0), then from every PE along the XY route of its configured destination, to the next PE
  or to the host output. It checks that the program is one the exact timing model covers (every
  router output carries at most one stream, every PE on the path consumes exactly the flits the
  previous one emits per inference) and raises :class:`EmulatorError` otherwise.
* :func:`run_functional` computes, vectorized over the batch, every PE's output flit stream:
  per inference ``(RECV words forward_begin..forward_end) ++ (the P_bulk first pass flits) ++ per output
  pixel q (pass_per_pixel pass flits ++ its W_px result words of pixel q)`` (section 4: the output side
  pops the forward queue, which the input side fills with the forwarded RECV words and the PASS words in
  order, and EMITs the results; section 4.4: ``P_bulk = P - n_pix * pass_per_pixel``, ``W_px = E / n_pix``;
  with ``pass_per_pixel = 0`` this is all pops, then all EMITs). Output pixels are section 4.1's pixel list of
  the tile (``flowtile.program.output_pixel_positions``): ``out_rows`` rows from ``out_row_begin``, the first from
  column ``out_col_begin``, the last ending before column ``out_col_end`` (0: ``out_width``); ``n_pix``, the
  result word numbering and the interleaving run over it. COMPUTE of inference ``s``
  reads the stored RECV words ``store_begin..store_end`` of ``s`` from activation bank ``s mod 2``
  (section 4.2: a stream may hold several tensors, one after the other); weights overlapping the banks are
  modelled bank by bank (:func:`weight_memory`), and refused where what COMPUTE reads would depend on
  timing. Results follow section 4.1 (windowed layers): the windows of
  every output pixel are gathered im2col-style with index arrays; a dense layer is the 1x1 case and
  takes the same path. The same gather serves MAC (a GEMM over the window), MAX (a lane-wise max) and
  LANE (a lane-wise multiply-accumulate with per-lane requantization: depthwise convolution, average
  pools). ADD (section 4.2, residual joins) and CONCAT (section 4.3, channel concatenation) need no
  gather: each of their two operands is a contiguous slice of the stored words (at ``operand_a_offset``
  and ``operand_b_offset``, in either order).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from flowtile.arch import (ACC_BITS, ACTIVATION_BANKS, ADD_MULT_MAX, MULTIPLIER_BITS, OP_ADD, OP_CONCAT, OP_LANE,
                           OP_MAC, OP_MAX, SHIFT_BITS, Arch)
from flowtile.program import (Program, TileProgram, compute_issue_cycles, operand_words, output_pixels,
                              result_word_issue_cycles, result_words)

__all__ = ["EmulatorError", "TileCounts", "Hop", "DataPath", "FunctionalResult", "trace_data_path",
           "tile_counts", "run_functional", "pe_results", "weight_memory", "racing_banks", "check_bank_races",
           "window_pixels", "operand_layout", "PORTS", "HOST", "COMPUTE_DRAIN_CYCLES"]


class EmulatorError(ValueError):
    """The program (or its input) is not one the emulator can run exactly; the message says why."""


#: Router ports; the step each direction takes on the mesh as (d_row, d_col). Rows grow southward.
PORTS = ("L", "N", "E", "S", "W")
_STEP = {"N": (-1, 0), "E": (0, 1), "S": (1, 0), "W": (0, -1)}
_OPPOSITE = {"N": "S", "S": "N", "E": "W", "W": "E"}
#: Stands for the host as the producer of the first stream and the consumer of the last.
HOST = -1

#: Cycles COMPUTE lasts beyond its ``I`` issue cycles (section 4.1; ``N_o * K`` for a dense layer):
#: multiply-accumulate (or max) of the last read words, then requantization (or clamp) of the last output.
COMPUTE_DRAIN_CYCLES = 2


@dataclass(frozen=True)
class TileCounts:
    """One PE's per-inference counts, from its registers (sections 4, 4.1, 4.2 and 4.3)."""

    n_in_words: int     # K: RECV transfers
    n_pass: int         # P: PASS transfers
    n_out: int          # N_o: output channels computed (0: no COMPUTE, no EMIT)
    n_result_words: int  # n_pix * ceil(N_o / L): EMIT transfers
    issue_cycles: int = 0  # I: COMPUTE cycles that issue an SRAM read (n_pix * N_o * K_w, or n_pix * CW * KH*KW)
    op: int = OP_MAC
    # section 4.2: RECV word k is stored iff store_begin <= k < store_end and emitted (forwarded) iff
    # forward_begin <= k < forward_end (empty ranges are normalized to (0, 0))
    store_begin: int = 0
    store_end: int = 0
    forward_begin: int = 0
    forward_end: int = 0
    # section 4.4: per output pixel, pass_per_pixel PASS words (popped) before the pixel's result words
    pass_per_pixel: int = 0
    n_pix: int = 1      # output pixels of a computing tile (section 4.1's band: flowtile.program.output_pixels)
    # section 4, result ring: issue cycles d of each result word of one output pixel, in order
    # (flowtile.program.result_word_issue_cycles; empty without COMPUTE)
    pixel_word_issue: tuple[int, ...] = ()

    @property
    def idle(self) -> bool:
        return self.n_in_words == 0 and self.n_pass == 0 and self.n_out == 0

    @property
    def n_stored(self) -> int:
        """RECV words written to the activation region per inference."""
        return self.store_end - self.store_begin

    @property
    def n_forward(self) -> int:
        """RECV words also emitted downstream per inference."""
        return self.forward_end - self.forward_begin

    @property
    def forward_range(self) -> range:
        """The forwarded RECV words ``k`` of an inference."""
        return range(self.forward_begin, self.forward_end)

    @property
    def n_queue(self) -> int:
        """``Q``: words per inference that go through the forward queue (section 4): the forwarded RECV
        words and every PASS word are pushed by the input side and popped by the output side."""
        return self.n_forward + self.n_pass

    @property
    def flits_in(self) -> int:
        """Flits the PE reads per inference (input side: K RECV + P PASS transfers)."""
        return self.n_in_words + self.n_pass

    @property
    def flits_out(self) -> int:
        """Flits the PE emits per inference (output side: Q pops + E EMIT transfers)."""
        return self.n_queue + self.n_result_words

    @property
    def result_words_per_pixel(self) -> int:
        """``W_px = E / n_pix``: result words of one output pixel (section 4.4; 0 without COMPUTE)."""
        return self.n_result_words // self.n_pix if self.n_out else 0

    @property
    def n_bulk_pops(self) -> int:
        """``Q_f + P_bulk``: the pops that lead the output side of an inference, before any pixel's
        interleaved pops and EMITs (section 4.4; all ``Q`` pops if ``pass_per_pixel = 0``)."""
        return self.n_queue - self.n_pix * self.pass_per_pixel if self.n_out else self.n_queue

    def output_is_pop(self) -> np.ndarray:
        """bool ``[Q + E]``: which output-side transfers of one inference are pops (the rest are EMITs of
        result words 0, 1, ... in order). Section 4.4: ``Q_f + P_bulk`` pops, then per output pixel
        ``pass_per_pixel`` pops and the pixel's ``W_px`` EMITs."""
        is_pop = np.zeros(self.flits_out, dtype=bool)
        lead = self.n_bulk_pops
        is_pop[:lead] = True
        if self.n_out and self.pass_per_pixel:
            step = self.pass_per_pixel + self.result_words_per_pixel
            is_pop[lead:].reshape(self.n_pix, step)[:, :self.pass_per_pixel] = True
        return is_pop

    @property
    def first_emit(self) -> int:
        """Output-side transfer index (within an inference) of the first EMIT (section 4.4: after pixel
        0's pops); only meaningful if the tile computes."""
        return self.n_bulk_pops + self.pass_per_pixel

    @property
    def compute_issue_cycles(self) -> int:
        """``I``: the COMPUTE cycles that issue an SRAM read (``flowtile.program.compute_issue_cycles``)."""
        return self.issue_cycles

    @property
    def compute_cycles(self) -> int:
        """Cycles COMPUTE lasts per inference (0 if the PE has no COMPUTE phase)."""
        return self.compute_issue_cycles + COMPUTE_DRAIN_CYCLES if self.n_out else 0

    def word_issue_cycles(self) -> np.ndarray:
        """int64 ``[E]``: ``d`` of each result word of an inference, in issue (and EMIT) order (section 4,
        result ring): the pixel's words repeated for the ``n_pix`` output pixels; sums to ``I``."""
        if not self.n_out:
            return np.zeros(0, dtype=np.int64)
        return np.tile(np.asarray(self.pixel_word_issue, dtype=np.int64), self.n_pix)

    @property
    def mac_issue_cycles(self) -> int:
        """Issue cycles that multiply-accumulate ``L`` lanes: every one for MAC, LANE (which
        multiplies lane by lane, ``L`` MACs a cycle), ADD and CONCAT (each issue multiplies an operand
        word by ``add_mult_a`` or ``add_mult_b`` and accumulates, lane by lane), none for max pooling."""
        return self.issue_cycles if self.op in (OP_MAC, OP_LANE, OP_ADD, OP_CONCAT) else 0


def _recv_range(config: dict, first: str, last: str) -> tuple[int, int]:
    begin, end = int(config[first]), int(config[last])
    return (begin, end) if begin < end else (0, 0)


def tile_counts(tile: TileProgram, arch: Arch) -> TileCounts:
    config = tile.config
    n_out = int(config["n_out"])
    store_begin, store_end = _recv_range(config, "store_begin", "store_end")
    forward_begin, forward_end = _recv_range(config, "forward_begin", "forward_end")
    return TileCounts(n_in_words=int(config["n_in_words"]), n_pass=int(config["n_pass"]), n_out=n_out,
                      n_result_words=int(result_words(config, arch.lanes)),
                      issue_cycles=int(compute_issue_cycles(config)), op=int(config["op"]),
                      store_begin=store_begin, store_end=store_end, forward_begin=forward_begin,
                      forward_end=forward_end, pass_per_pixel=int(config["pass_per_pixel"]),
                      n_pix=max(1, int(output_pixels(config))) if n_out else 1,
                      pixel_word_issue=tuple(int(d) for d in result_word_issue_cycles(config, arch.lanes))
                      if n_out else ())


def _check_recv_ranges(tile: TileProgram, count: TileCounts, position: int) -> None:
    """Section 4.2: both RECV ranges lie inside the K words of an inference (Program.validate checks it
    too; the emulator's entry points may be called without it)."""
    config = tile.config
    for first, last in (("store_begin", "store_end"), ("forward_begin", "forward_end")):
        begin, end = int(config[first]), int(config[last])
        if begin > end or end > count.n_in_words:
            raise EmulatorError(f"tile {tile.key} (chain position {position}): registers {first} = {begin}, "
                                f"{last} = {end} must satisfy {first} <= {last} <= n_in_words = "
                                f"{count.n_in_words}")


@dataclass(frozen=True)
class Hop:
    """The route of one stream between two consumers of flits.

    ``fifos`` are the router input FIFOs the flits pass through, in order, as ``(row, col, port)``:
    the producer's L FIFO first (or tile (0,0)'s W FIFO for the host stream), then the input FIFO of
    every router the XY route enters. The last FIFO is read by ``consumer``'s PE, or by the host
    output port when ``consumer`` is :data:`HOST`.
    """

    producer: int          # chain position, or HOST
    consumer: int          # chain position, or HOST
    fifos: tuple[tuple[int, int, str], ...]


@dataclass(frozen=True)
class DataPath:
    """How flits move through a program: PEs in stream order and the hops between them.

    ``order[i]`` is the chain position of the i-th PE the data visits; ``hops[0]`` runs from the host
    to ``order[0]``, ``hops[i + 1]`` from ``order[i]`` to ``order[i + 1]`` (the last one to the host).
    """

    order: tuple[int, ...]
    hops: tuple[Hop, ...]
    counts: tuple[TileCounts, ...]   # per chain position


def _route(arch: Arch, start: tuple[int, int], first_fifo: str, target: tuple[int, int], to_host: bool,
           who: str) -> tuple[list[tuple[int, int, str]], list[tuple[int, int, str]]]:
    """XY route (section 3) from the FIFO ``first_fifo`` of tile ``start``.

    Returns (input FIFOs visited, router outputs used as ``(row, col, port)``); the last output is
    the consumer's L port or the exit port.
    """
    row, col = start
    fifos = [(row, col, first_fifo)]
    outputs = []
    for _ in range(arch.rows + arch.cols):  # an XY route never takes more hops than this
        if target[1] != col:
            port = "E" if target[1] > col else "W"
        elif target[0] != row:
            port = "S" if target[0] > row else "N"
        else:
            outputs.append((row, col, arch.exit_direction if to_host else "L"))
            return fifos, outputs
        outputs.append((row, col, port))
        d_row, d_col = _STEP[port]
        row, col = row + d_row, col + d_col
        if not (0 <= row < arch.rows and 0 <= col < arch.cols):  # unreachable for in-grid targets
            raise EmulatorError(f"{who}: its flits leave the mesh at tile ({row - d_row},{col - d_col}) "
                                f"port {port}")
        fifos.append((row, col, _OPPOSITE[port]))
    raise AssertionError("XY route longer than the mesh")  # pragma: no cover


def trace_data_path(program: Program) -> DataPath:
    """Follow the flits from the host through the PEs back to the host; raise EmulatorError if the
    program is not a single contention-free stream with consistent per-inference flit counts."""
    arch = program.arch
    counts = tuple(tile_counts(tile, arch) for tile in program.tiles)
    position_of = {arch.chain_position(p): p for p in range(arch.n_tiles)}
    for position, (tile, count) in enumerate(zip(program.tiles, counts)):
        _check_recv_ranges(tile, count, position)
        if count.n_out and not count.n_in_words:
            raise EmulatorError(f"tile {tile.key} (chain position {position}): n_out = {count.n_out} "
                                f"needs n_in_words > 0 (COMPUTE reads K activation words per output)")
        if count.n_out:
            _check_window(tile, count, arch, position)
        _check_pass_per_pixel(tile, count, position)

    # The host's flits carry destination tile (0,0) and enter its W FIFO (sections 3 and 5).
    host_fifos, host_outputs = _route(arch, (0, 0), "W", (0, 0), False, "host input")
    hops = []
    used_outputs = {out: "host input" for out in host_outputs}
    order: list[int] = []
    producer, fifos = HOST, host_fifos
    consumer = position_of[(0, 0)]
    flits_arriving = program.input_words
    while True:
        hops.append(Hop(producer, consumer, tuple(fifos)))
        if consumer == HOST:
            if flits_arriving != program.output_words:
                raise EmulatorError(f"tile {program.tiles[producer].key} sends {flits_arriving} flits per "
                                    f"inference to the host, the program's output needs "
                                    f"{program.output_words} (output length {program.output.length}, "
                                    f"{arch.lanes} lanes)")
            break
        tile, count = program.tiles[consumer], counts[consumer]
        source = "the host" if producer == HOST else f"tile {program.tiles[producer].key}"
        if consumer in order:
            raise EmulatorError(f"the flits of {source} return to tile {tile.key}: the data path is a "
                                f"cycle and never reaches the host")
        if count.flits_in != flits_arriving:
            raise EmulatorError(
                f"tile {tile.key} (chain position {consumer}) reads n_in_words + n_pass = "
                f"{count.n_in_words} + {count.n_pass} = {count.flits_in} flits per inference, but "
                f"{source} sends it {flits_arriving}")
        order.append(consumer)
        if count.flits_out == 0:
            raise EmulatorError(f"tile {tile.key} (chain position {consumer}) emits no flits, so nothing "
                                f"reaches the host")
        config = tile.config
        who = f"tile {tile.key} (chain position {consumer})"
        if config["dest_host"]:
            target, next_consumer = arch.exit_tile, HOST
        else:
            target = (int(config["dest_row"]), int(config["dest_col"]))
            if target not in position_of:
                raise EmulatorError(f"{who}: destination ({target[0]},{target[1]}) is outside the "
                                    f"{arch.rows}x{arch.cols} grid")
            if target == (tile.row, tile.col):
                raise EmulatorError(f"{who}: sends its flits to itself")
            next_consumer = position_of[target]
        fifos, outputs = _route(arch, (tile.row, tile.col), "L", target, bool(config["dest_host"]), who)
        for out in outputs:
            if out in used_outputs:
                raise EmulatorError(
                    f"{who}: its route uses router ({out[0]},{out[1]}) output {out[2]}, which "
                    f"{used_outputs[out]} also uses; contended routes are not modelled exactly")
            used_outputs[out] = who
        producer, consumer, flits_arriving = consumer, next_consumer, count.flits_out

    for position, count in enumerate(counts):
        if not count.idle and position not in order:
            raise EmulatorError(f"tile {program.tiles[position].key} (chain position {position}) is "
                                f"configured (n_in_words={count.n_in_words}, n_pass={count.n_pass}, "
                                f"n_out={count.n_out}) but no flits reach it")
    return DataPath(order=tuple(order), hops=tuple(hops), counts=counts)


def _check_pass_per_pixel(tile: TileProgram, count: TileCounts, position: int) -> None:
    """Section 4.4: ``pass_per_pixel > 0`` needs a computing tile and ``n_pix * pass_per_pixel <= n_pass``
    (Program.validate checks it too; the emulator's entry points may be called without it)."""
    if not count.pass_per_pixel:
        return
    who = f"tile {tile.key} (chain position {position})"
    if not count.n_out:
        raise EmulatorError(f"{who}: pass_per_pixel = {count.pass_per_pixel} needs a computing tile "
                            f"(n_out > 0; section 4.4), got n_out = 0")
    interleaved = count.n_pix * count.pass_per_pixel
    if interleaved > count.n_pass:
        raise EmulatorError(f"{who}: pass_per_pixel = {count.pass_per_pixel} over {count.n_pix} output pixels "
                            f"is {interleaved} passed words, more than n_pass = {count.n_pass} (section 4.4)")


def _check_window(tile: TileProgram, count: TileCounts, arch: Arch, position: int) -> None:
    """Windowing registers sections 4.1, 4.2 and 4.3 give a meaning to (Program.validate checks ranges and the
    map size too; the emulator's entry points may be called without it)."""
    config = tile.config
    who = f"tile {tile.key} (chain position {position})"
    for name in ("in_height", "in_width", "words_per_pixel", "kernel_h", "kernel_w", "stride", "out_rows",
                 "out_width"):
        if int(config[name]) < 1:
            raise EmulatorError(f"{who}: n_out = {count.n_out} needs register '{name}' >= 1, got {config[name]}")
    _check_pixel_band(config, who)
    if count.op not in _OP_NAMES:
        raise EmulatorError(f"{who}: register 'op' = {count.op} is none of "
                            + ", ".join(f"{name} ({op})" for op, name in _OP_NAMES.items()))
    words_per_pixel = int(config["words_per_pixel"])
    if count.op != OP_MAC and count.n_out != words_per_pixel * arch.lanes:
        kind = {OP_MAX: "max-pool", OP_LANE: "lane-wise (OP_LANE)", OP_ADD: "residual add (OP_ADD)",
                OP_CONCAT: "channel concat (OP_CONCAT)"}[count.op]
        raise EmulatorError(f"{who}: a {kind} tile needs n_out = words_per_pixel * lanes = "
                            f"{words_per_pixel * arch.lanes}, got {count.n_out}")
    map_words = int(config["in_height"]) * int(config["in_width"]) * words_per_pixel
    stored = f"{count.n_stored} stored words (store_begin..store_end = {config['store_begin']}..{config['store_end']})"
    if count.op not in (OP_ADD, OP_CONCAT):
        if map_words != count.n_stored:
            raise EmulatorError(f"{who}: {stored} but the input map is {config['in_height']}x"
                                f"{config['in_width']}x{config['words_per_pixel']} = {map_words} words")
        return
    _check_two_operands(config, count, who, stored)


def _check_pixel_band(config: dict, who: str) -> None:
    """Section 4.1: a computing tile's output pixels are ``out_rows`` rows from ``out_row_begin``, the first from
    column ``out_col_begin``, the last ending before column ``out_col_end`` (0: ``out_width``). Valid iff
    ``out_col_begin < out_width``, ``out_col_end <= out_width`` and ``n_pix >= 1`` (Program.validate checks it
    too; the emulator's entry points may be called without it)."""
    begin, end, width = int(config["out_col_begin"]), int(config["out_col_end"]), int(config["out_width"])
    if begin >= width:
        raise EmulatorError(f"{who}: register out_col_begin = {begin} must be < out_width = {width} (section "
                            f"4.1: the band's first output row starts at column out_col_begin)")
    if end > width:
        raise EmulatorError(f"{who}: register out_col_end = {end} must be <= out_width = {width} (section 4.1: "
                            f"the band's last output row ends before column out_col_end; 0 means out_width)")
    n_pix = output_pixels(config)
    if n_pix < 1:
        band_end = end or width
        raise EmulatorError(
            f"{who}: registers out_col_begin = {begin}, out_col_end = {end} over out_rows = "
            f"{config['out_rows']} leave no output pixel: n_pix = out_rows * out_width - out_col_begin - "
            f"(out_width - E') = {config['out_rows']} * {width} - {begin} - ({width} - {band_end}) = {n_pix} "
            f"(E' = out_col_end, or out_width if 0) must be >= 1 (section 4.1)")


#: Values of the ``op`` register and their names (the register is 3 bits; 5..7 are undefined).
_OP_NAMES = {OP_MAC: "OP_MAC", OP_MAX: "OP_MAX", OP_LANE: "OP_LANE", OP_ADD: "OP_ADD", OP_CONCAT: "OP_CONCAT"}


def operand_layout(config: dict) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((offset, words per pixel), ...)`` of operands a and b of an ADD or CONCAT tile (sections 4.2 and
    4.3): both start at their stored-word offset and hold ``in_height * in_width`` pixels of ``CW`` words
    (ADD), or of ``CWa = concat_words_a`` and ``CW - CWa`` words (CONCAT)."""
    words_per_pixel = int(config["words_per_pixel"])
    if int(config["op"]) == OP_CONCAT:
        words_a = int(config["concat_words_a"])
        words_b = words_per_pixel - words_a
    else:
        words_a = words_b = words_per_pixel
    return ((int(config["operand_a_offset"]), words_a), (int(config["operand_b_offset"]), words_b))


def _check_two_operands(config: dict, count: TileCounts, who: str, stored: str) -> None:
    """op = ADD (section 4.2) or CONCAT (section 4.3): two disjoint operand maps inside the stored words,
    a band of output pixels inside the map, operand weights within ADD_MULT_MAX (the same rules as
    ``flowtile.program``'s validation, with the emulator's messages)."""
    name = _OP_NAMES[count.op]
    kernel = (1, 2) if count.op == OP_ADD else (1, 1)
    for register, value in (("kernel_h", kernel[0]), ("kernel_w", kernel[1]), ("stride", 1), ("pad_top", 0),
                            ("pad_left", 0)):
        if int(config[register]) != value:
            raise EmulatorError(f"{who}: {name} needs register '{register}' = {value} (kernel {kernel[0]}x"
                                f"{kernel[1]}, stride 1, no padding), got {config[register]}")
    words_per_pixel = int(config["words_per_pixel"])
    if count.op == OP_CONCAT and not 1 <= int(config["concat_words_a"]) < words_per_pixel:
        raise EmulatorError(f"{who}: OP_CONCAT register 'concat_words_a' = {config['concat_words_a']} must be in "
                            f"1..words_per_pixel - 1 = {words_per_pixel - 1} (both operands need a word a pixel)")
    (offset_a, _), (offset_b, _) = operand_layout(config)
    size_a, size_b = (int(words) for words in operand_words(config))
    if max(offset_a + size_a, offset_b + size_b) > count.n_stored or (offset_a < offset_b + size_b
                                                                      and offset_b < offset_a + size_a):
        raise EmulatorError(f"{who}: {name} operands of {size_a} and {size_b} words at registers "
                            f"'operand_a_offset' = {offset_a} and 'operand_b_offset' = {offset_b} must not "
                            f"overlap and must lie inside the {stored}")
    if int(config["out_width"]) != int(config["in_width"]):
        raise EmulatorError(f"{who}: {name} needs register 'out_width' = in_width = {config['in_width']}, "
                            f"got {config['out_width']}")
    row_end = int(config["out_row_begin"]) + int(config["out_rows"])
    if row_end > int(config["in_height"]):
        raise EmulatorError(f"{who}: {name} output rows out_row_begin..out_row_begin + out_rows = "
                            f"{config['out_row_begin']}..{row_end} (registers 'out_row_begin', 'out_rows') "
                            f"leave the {config['in_height']}-row map ({name} has no padding)")
    for register in ("add_mult_a", "add_mult_b"):
        if not 0 <= int(config[register]) <= ADD_MULT_MAX:
            raise EmulatorError(f"{who}: register '{register}' = {config[register]} is outside 0..ADD_MULT_MAX = "
                                f"{ADD_MULT_MAX}")


# --- arithmetic ---------------------------------------------------------------------------------

def _check_parameters(tile: TileProgram, count: TileCounts) -> None:
    params = np.asarray(tile.params)
    if params.shape != (count.n_out, 3):
        raise EmulatorError(f"tile {tile.key}: parameter table must be [{count.n_out}, 3], got {list(params.shape)}")
    bias, multiplier, shift = params[:, 0], params[:, 1], params[:, 2]
    bias_lo, bias_hi = -(1 << (ACC_BITS - 1)), (1 << (ACC_BITS - 1)) - 1
    checks = ((bias, bias_lo, bias_hi, "bias"), (multiplier, 0, (1 << MULTIPLIER_BITS) - 1, "multiplier"),
              (shift, 1, (1 << SHIFT_BITS) - 2, "shift"))
    if count.op == OP_MAX:  # max pooling never reads the table (section 4.1: it holds n_out zero rows)
        checks = ()
    for values, lo, hi, name in checks:
        bad = np.flatnonzero((values < lo) | (values > hi))
        if bad.size:
            raise EmulatorError(f"tile {tile.key}: output {bad[0]} has {name} {values[bad[0]]}, outside {lo}..{hi}")
    if tile.config["clamp_lo"] > tile.config["clamp_hi"]:
        raise EmulatorError(f"tile {tile.key}: clamp_lo {tile.config['clamp_lo']} > clamp_hi "
                            f"{tile.config['clamp_hi']}")


_blas_controller = None


def _single_threaded_blas():
    """Context in which BLAS runs on one thread: the products here are small, and on a busy machine
    waking BLAS worker threads costs far more than the arithmetic (threadpoolctl, if installed)."""
    global _blas_controller
    if _blas_controller is None:
        try:
            from threadpoolctl import ThreadpoolController
            _blas_controller = ThreadpoolController()
        except ImportError:  # pragma: no cover - optional
            _blas_controller = False
    if _blas_controller is False:  # pragma: no cover - optional
        return contextlib.nullcontext()
    return _blas_controller.limit(limits=1, user_api="blas")


def _wrap_accumulator(values: np.ndarray) -> np.ndarray:
    """Two's-complement wrap of int64 values to ACC_BITS bits."""
    half = np.int64(1 << (ACC_BITS - 1))
    return ((values + half) & np.int64((1 << ACC_BITS) - 1)) - half


def window_pixels(config: dict) -> np.ndarray:
    """Input pixel read by each window position of each output pixel: int64 ``[n_pix, KH*KW]``,
    pixel index ``y * in_width + x``, or ``in_height * in_width`` (the padding pixel) outside the map.

    Output pixels are section 4.1's band (:func:`flowtile.program.output_pixel_positions`): rows
    ``[out_row_begin, out_row_begin + out_rows)`` row-major, the first from column ``out_col_begin``, the last
    ending before column ``out_col_end`` (0: ``out_width``), i.e. the ``n_pix`` consecutive row-major pixels of
    an ``out_width``-wide output map from ``out_row_begin * out_width + out_col_begin`` on; window positions run
    ``ky * KW + kx``."""
    height, width = int(config["in_height"]), int(config["in_width"])
    kernel_h, kernel_w, stride = int(config["kernel_h"]), int(config["kernel_w"]), int(config["stride"])
    oy, ox = _band_positions(config)
    iy = oy[:, None, None] * stride + np.arange(kernel_h)[None, :, None] - int(config["pad_top"])
    ix = ox[:, None, None] * stride + np.arange(kernel_w)[None, None, :] - int(config["pad_left"])
    inside = (iy >= 0) & (iy < height) & (ix >= 0) & (ix < width)
    pixel = np.where(inside, iy * width + ix, height * width)
    return pixel.reshape(len(oy), kernel_h * kernel_w).astype(np.int64)


def _band_positions(config: dict) -> tuple[np.ndarray, np.ndarray]:
    """``(oy, ox)``, int64 ``[n_pix]`` each, of a tile's output pixels in COMPUTE's order (section 4.1; the
    same list as :func:`flowtile.program.output_pixel_positions`): the band is ``n_pix`` consecutive pixels of
    the row-major ``out_width``-wide output map, starting at ``out_row_begin * out_width + out_col_begin``."""
    width = int(config["out_width"])
    first = int(config["out_row_begin"]) * width + int(config["out_col_begin"])
    index = first + np.arange(max(0, int(output_pixels(config))), dtype=np.int64)
    return index // width, index % width


#: Most window elements gathered at once (about this many x 9 bytes of temporaries).
IM2COL_ELEMENTS = 1 << 22

_DENSE_WINDOW = {"in_height": 1, "in_width": 1, "kernel_h": 1, "kernel_w": 1, "pad_top": 0, "pad_left": 0,
                 "out_row_begin": 0, "out_rows": 1, "out_width": 1}


def _is_dense(config: dict) -> bool:
    """One 1x1 window on a one-pixel map at its only pixel (stride and pad_value never matter)."""
    return all(int(config[name]) == value for name, value in _DENSE_WINDOW.items())


def _gather_windows(config: dict, activations: np.ndarray, lanes: int) -> np.ndarray:
    """im2col: int8 ``[batch, n_pix, KH*KW, CW, L]``, the activation words every issue cycle reads.

    ``activations`` is int8 ``[batch, stored words, L]`` (what RECV wrote at ``act_base``); padding positions
    read a word whose every lane is ``pad_value``."""
    batch = activations.shape[0]
    words_per_pixel = int(config["words_per_pixel"])
    n_pixels = int(config["in_height"]) * int(config["in_width"])
    pixels = activations.reshape(batch, n_pixels, words_per_pixel, lanes)
    if _is_dense(config):  # the single window is the whole input
        return pixels[:, None]
    index = window_pixels(config)
    if (index == n_pixels).any():
        padded = np.empty((batch, n_pixels + 1, words_per_pixel, lanes), dtype=np.int8)
        padded[:, :n_pixels] = pixels
        padded[:, n_pixels] = int(config["pad_value"])
        pixels = padded
    return pixels[:, index]


def pe_results(tile: TileProgram, count: TileCounts, activations: np.ndarray, arch: Arch,
               weights: np.ndarray | None = None) -> np.ndarray:
    """Result words of one PE for a batch: int8 ``[batch, n_pix * N_r, L]`` (sections 4 to 4.3).

    ``activations`` is int8 ``[batch, store_end - store_begin, L]``, the stored RECV flits of each
    inference ``s``, written to SRAM bank ``s mod 2`` (words ``act_base + (s mod 2) * B + k - store_begin``)
    before COMPUTE reads them. MAC and LANE also read weight words (MAC: ``w_base + o*K_w + k``, LANE:
    ``w_base + cw*KH*KW + ky*KW + kx``); ``weights`` is what they read, int8 ``[w_words, L]`` or per inference
    ``[batch, w_words, L]`` (default: :func:`weight_memory` of the whole batch; give it when ``activations``
    is a slice of the batch, since what a weight word overlapping a bank holds depends on the inference's
    index). ADD and CONCAT read stored words only (their operands lie inside them: ``_check_window``).
    """
    lanes, batch = arch.lanes, activations.shape[0]
    config = tile.config
    if count.op in (OP_ADD, OP_CONCAT):
        return _two_operand_results(tile, count, activations, lanes)
    if weights is None and count.op in (OP_MAC, OP_LANE):
        weights = weight_memory(tile, count, activations, lanes)
    # im2col copies every window: bound its size (float64 / int64 below) by working on slices of the batch
    per_inference = (count.n_result_words * int(config["kernel_h"]) * int(config["kernel_w"])
                     * int(config["words_per_pixel"]) * lanes)
    if count.op == OP_LANE:  # n_pix * KH*KW * CW * L window elements (n_result_words already counts CW)
        per_inference //= int(config["words_per_pixel"])
    chunk = max(1, IM2COL_ELEMENTS // max(1, per_inference))
    if batch > chunk:
        return np.concatenate([
            pe_results(tile, count, activations[start:start + chunk], arch,
                       weights if weights is None or weights.ndim == 2 else weights[start:start + chunk])
            for start in range(0, batch, chunk)])
    windows = _gather_windows(config, activations, lanes)      # [batch, n_pix, KH*KW, CW, L]
    n_pix = windows.shape[1]
    if count.op == OP_MAX:
        # lane-wise signed max over the window, then clamp; result word q*CW + cw
        pooled = windows.max(axis=2)
        pooled = np.clip(pooled, int(config["clamp_lo"]), int(config["clamp_hi"])).astype(np.int8)
        return pooled.reshape(batch, count.n_result_words, lanes)
    if count.op == OP_LANE:
        return _lane_results(tile, count, windows, weights, lanes)

    n_out = count.n_out
    window_words = windows.shape[2] * windows.shape[3]           # K_w = KH*KW*CW
    params = np.asarray(tile.params, dtype=np.int64)
    bias, multiplier, shift = params[:, 0], params[:, 1], params[:, 2]
    columns = windows.reshape(batch, n_pix, window_words * lanes)
    if weights.ndim == 2:
        matrix = weights.reshape(n_out, window_words * lanes).astype(np.float64)
        # float64 matmul is exact: every partial sum is an integer of magnitude <= K_w*L*2^14 < 2^53.
        flat = columns.reshape(batch * n_pix, window_words * lanes).astype(np.float64)
        dot = (flat @ matrix.T).astype(np.int64).reshape(batch, n_pix, n_out)   # one 2-D GEMM
    else:  # the weight region overlaps the activation banks: each inference reads its own weights
        matrix = weights.reshape(batch, n_out, window_words * lanes).astype(np.int64)
        dot = np.einsum("bqi,boi->bqo", columns.astype(np.int64), matrix)
    accumulator = _wrap_accumulator(bias + dot)
    scaled = _shift_round_half_even(accumulator * multiplier, shift)
    result = np.clip(scaled + int(config["zp_out"]), int(config["clamp_lo"]), int(config["clamp_hi"]))
    per_pixel = count.n_result_words // n_pix                     # N_r
    words = np.zeros((batch, n_pix, per_pixel * lanes), dtype=np.int8)
    words[:, :, :n_out] = result
    return words.reshape(batch, count.n_result_words, lanes)


def _weight_words(tile: TileProgram, count: TileCounts) -> int:
    """Weight words COMPUTE reads from ``w_base`` (MAC: ``n_out * K_w``, LANE: ``CW * KH*KW``; else 0)."""
    config = tile.config
    window = int(config["kernel_h"]) * int(config["kernel_w"]) * int(config["words_per_pixel"])
    if count.op == OP_MAC:
        return count.n_out * window
    return window if count.op == OP_LANE else 0


def _bank_bases(tile: TileProgram, count: TileCounts) -> list[int]:
    """First SRAM word of each activation bank (section 4: bank ``b`` at ``act_base + b * B``)."""
    return [int(tile.config["act_base"]) + b * count.n_stored for b in range(ACTIVATION_BANKS)]


def racing_banks(tile: TileProgram, count: TileCounts, batch: int) -> list[int]:
    """The activation banks ``b`` that overlap the weight words COMPUTE reads and that the input side fills
    with inference ``s + 1`` while COMPUTE of some inference ``s`` (``(s + 1) mod 2 = b``, ``s < batch - 1``)
    may be running: whether it writes an overlapping word during that COMPUTE depends on the timing."""
    w_base = int(tile.config["w_base"])
    w_end = w_base + _weight_words(tile, count)
    banks = []
    for b, base in enumerate(_bank_bases(tile, count)):
        first_reader = (b + 1) % ACTIVATION_BANKS      # the first inference s with (s + 1) mod 2 == b
        if w_base < base + count.n_stored and base < w_end and first_reader < batch - 1:
            banks.append(b)
    return banks


def check_bank_races(tile: TileProgram, count: TileCounts, batch: int, pe_times, position: int,
                     compute_ends: np.ndarray) -> None:
    """Refuse a run in which the input side writes an activation word that a running COMPUTE reads as a weight
    word: inference ``s + 1``'s RECV into bank ``(s + 1) mod 2`` during COMPUTE of ``s``, ``[c_s, a_last + d_last
    + 2)`` (section 4, result ring: waits for ring slots between words included). Section 4 does not say
    whether COMPUTE then reads the old or the new word. ``pe_times`` is the PE's
    :class:`emulator.timing.PETimes`, ``compute_ends`` int64 ``[batch]`` the ends of its COMPUTE spans
    (:attr:`emulator.timing.TimingResult.compute_ends`)."""
    w_base = int(tile.config["w_base"])
    w_end = w_base + _weight_words(tile, count)
    inputs = pe_times.input.reshape(batch, count.flits_in)
    bank_words = count.n_stored
    for b in racing_banks(tile, count, batch):
        base = _bank_bases(tile, count)[b]
        first, last = max(w_base, base), min(w_end, base + bank_words)      # overlapping SRAM words
        recv = count.store_begin + np.arange(first - base, last - base)     # the RECV words written there
        readers = np.arange(batch - 1)
        readers = readers[(readers + 1) % ACTIVATION_BANKS == b]           # COMPUTE of s, RECV of s + 1
        writes = inputs[readers + 1][:, recv]
        begin = pe_times.compute[readers][:, None]
        end = compute_ends[readers][:, None]
        racing = (writes >= begin) & (writes < end)
        if racing.any():
            row, column = (int(i) for i in np.argwhere(racing)[0])
            s, address = int(readers[row]), first + column
            start, stop = int(begin[row, 0]), int(end[row, 0])
            region = (base - b * bank_words, base + (ACTIVATION_BANKS - b) * bank_words - 1)
            raise EmulatorError(
                f"tile {tile.key} (chain position {position}): the input side writes SRAM word {address} (activation "
                f"bank {b}, RECV word {int(recv[column])} of inference {s + 1}) in cycle {int(writes[row, column])} "
                f"while COMPUTE of inference {s} (cycles {start}..{stop - 1}) reads it as a "
                f"weight word (weights at SRAM words {w_base}..{w_end - 1}, register 'w_base'); section 4 does not "
                f"define which comes first: place the weights outside the activation region [act_base, act_base + "
                f"2B) = {region[0]}..{region[1]}")


def weight_memory(tile: TileProgram, count: TileCounts, activations: np.ndarray, lanes: int, *,
                  race_checked: bool = False) -> np.ndarray:
    """The weight words COMPUTE reads from ``w_base``, for the whole batch: int8 ``[w_words, L]`` if the
    weight region is disjoint from the activation region ``[act_base, act_base + 2B)``, else per inference
    ``[batch, w_words, L]``.

    Section 4: the input side writes inference ``s``'s stored words into bank ``s mod 2`` (words
    ``act_base + (s mod 2) * B + k - store_begin``), all before COMPUTE of ``s`` begins, and the first input
    transfer of ``s + 1`` comes at ``c_s`` or later; bank ``s mod 2`` is next written by inference ``s + 2``,
    after COMPUTE of ``s + 1`` began, i.e. after COMPUTE of ``s`` ended. So COMPUTE of ``s`` reads, in a weight
    word inside bank ``s mod 2``, inference ``s``'s stored word; inside the other bank, inference ``s - 1``'s
    (the SRAM image for ``s = 0``), unless inference ``s + 1`` overwrites it while COMPUTE of ``s`` runs, a race
    whose outcome section 4 leaves open. ``race_checked``: the caller has ruled that out with the PE's times
    (:func:`check_bank_races`); otherwise a program in which it is possible (:func:`racing_banks`) is refused.
    """
    config = tile.config
    batch, bank = activations.shape[0], count.n_stored
    w_words = _weight_words(tile, count)
    w_base, act_base = int(config["w_base"]), int(config["act_base"])
    w_end, act_end = w_base + w_words, act_base + ACTIVATION_BANKS * bank
    image = np.zeros((max(w_end, act_end), lanes), dtype=np.int8)
    stored = tile.sram[: image.shape[0]]
    image[: stored.shape[0]] = stored
    if w_end <= act_base or act_end <= w_base or not w_words:
        return image[w_base:w_end]
    if not race_checked and racing_banks(tile, count, batch):
        raise EmulatorError(
            f"tile {tile.key}: its weight words {w_base}..{w_end - 1} overlap activation bank(s) "
            f"{racing_banks(tile, count, batch)} of [act_base, act_base + 2B) = {act_base}..{act_end - 1}, which "
            f"the input side may fill with the next inference while COMPUTE reads them; what COMPUTE reads then "
            f"depends on the transfer times (run_functional checks them against the timing model)")
    memory = np.repeat(image[None], batch, axis=0)
    bases = _bank_bases(tile, count)
    for parity, base in enumerate(bases):
        memory[parity::2, base:base + bank] = activations[parity::2]                # bank s mod 2: inference s
        memory[parity + 1::2, base:base + bank] = activations[parity:batch - 1:2]   # the other bank: s - 1
    return memory[:, w_base:w_end]


def _shift_round_half_even(product: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """``product / 2^shift`` rounded to nearest, ties to even (section 4), for ``shift >= 1``.

    The hardware's form: ``(p + 2^(S-1) - 1 + ((p >> S) & 1)) >> S``. ``|p| < 2^62`` and the added term
    is below ``2^61``, so the int64 arithmetic is exact.
    """
    one = np.int64(1)
    return (product + np.left_shift(one, shift - 1) - one + ((product >> shift) & one)) >> shift


def _requantize(accumulator: np.ndarray, bias: np.ndarray, multiplier: np.ndarray, shift: np.ndarray,
                config: dict) -> np.ndarray:
    """Section 4: ``clamp(round_half_even(wrap32(bias + acc) * M / 2^S) + zp_out, clamp_lo, clamp_hi)``,
    int64 in, int64 out (parameters broadcast against ``accumulator``)."""
    accumulator = _wrap_accumulator(bias + accumulator)
    scaled = _shift_round_half_even(accumulator * multiplier, shift)
    return np.clip(scaled + int(config["zp_out"]), int(config["clamp_lo"]), int(config["clamp_hi"]))


def _lane_results(tile: TileProgram, count: TileCounts, windows: np.ndarray, weights: np.ndarray,
                  lanes: int) -> np.ndarray:
    """op = LANE (section 4.1): lane ``l`` of word ``cw`` of output pixel ``q`` accumulates
    ``bias_c + sum_{ky,kx} W[w_base + cw*KH*KW + ky*KW + kx][l] * A[(ky, kx), cw][l]`` (``c = cw*L + l``)
    and is requantized with parameter row ``c``; result word ``q*CW + cw``.

    ``windows`` is the im2col gather int8 ``[batch, n_pix, KH*KW, CW, L]``; ``weights`` the weight words,
    ``[CW*KH*KW, L]`` or per inference ``[batch, CW*KH*KW, L]`` (:func:`weight_memory`)."""
    config = tile.config
    batch, n_pix, window, words_per_pixel = windows.shape[:4]
    # weight word cw*KH*KW + k -> [.., KH*KW, CW, L] like the windows
    weights = np.swapaxes(weights.reshape(weights.shape[:-2] + (words_per_pixel, window, lanes)), -3, -2)
    # exact in int64: |sum| <= KH*KW * 2^14 (KH, KW <= 255)
    if weights.ndim == 3:
        dot = np.einsum("bqkcl,kcl->bqcl", windows, weights, dtype=np.int64)
    else:
        dot = np.einsum("bqkcl,bkcl->bqcl", windows, weights, dtype=np.int64)
    params = np.asarray(tile.params, dtype=np.int64).reshape(words_per_pixel, lanes, 3)
    result = _requantize(dot, params[..., 0], params[..., 1], params[..., 2], config)
    return result.astype(np.int8).reshape(batch, n_pix * words_per_pixel, lanes)


def _operand_rows(activations: np.ndarray, config: dict, offset: int, words_per_pixel: int,
                  n_pix: int) -> np.ndarray:
    """The words of one ADD / CONCAT operand that the tile's output band reads: int8 ``[batch, n_pix,
    words_per_pixel, L]``. The band (section 4.1) is ``n_pix`` consecutive row-major pixels of a map
    ``out_width = in_width`` wide, from column ``out_col_begin`` of row ``out_row_begin`` on, so it is one
    contiguous slice starting at stored word ``offset + (out_row_begin * in_width + out_col_begin) *
    words_per_pixel``."""
    first_pixel = int(config["out_row_begin"]) * int(config["in_width"]) + int(config["out_col_begin"])
    first = offset + first_pixel * words_per_pixel
    band = activations[:, first:first + n_pix * words_per_pixel]
    return band.reshape(activations.shape[0], n_pix, words_per_pixel, activations.shape[2])


def _two_operand_results(tile: TileProgram, count: TileCounts, activations: np.ndarray,
                         lanes: int) -> np.ndarray:
    """op = ADD (section 4.2) and op = CONCAT (section 4.3); result word ``q*CW + cw`` of output pixel ``q``
    at ``(oy, ox)`` (``p = oy*in_width + ox``), lane ``l``, parameter row ``c = cw*L + l``:

    * ADD: ``requantize(bias_c + A_a[l] * add_mult_a + A_b[l] * add_mult_b)`` with ``A_a``, ``A_b`` the
      stored words ``operand_{a,b}_offset + p*CW + cw``;
    * CONCAT: ``requantize(bias_c + A[l] * m)`` with ``A`` the stored word ``operand_a_offset + p*CWa + cw``
      and ``m = add_mult_a`` if ``cw < CWa = concat_words_a``, else ``operand_b_offset + p*CWb + (cw - CWa)``
      and ``m = add_mult_b`` (``CWb = CW - CWa``).
    """
    config = tile.config
    words_per_pixel = int(config["words_per_pixel"])
    batch, n_pix = activations.shape[0], count.n_result_words // words_per_pixel
    (offset_a, words_a), (offset_b, words_b) = operand_layout(config)
    operand_a = _operand_rows(activations, config, offset_a, words_a, n_pix).astype(np.int64)
    operand_b = _operand_rows(activations, config, offset_b, words_b, n_pix).astype(np.int64)
    mult_a, mult_b = int(config["add_mult_a"]), int(config["add_mult_b"])
    # |a*m_a + b*m_b| <= 2 * 128 * 2^22 = 2^30: exact in int64 (wrap32 then adds the bias)
    if count.op == OP_ADD:
        accumulator = operand_a * mult_a + operand_b * mult_b          # [batch, n_pix, CW, L]
    else:
        accumulator = np.concatenate([operand_a * mult_a, operand_b * mult_b], axis=2)
    params = np.asarray(tile.params, dtype=np.int64).reshape(words_per_pixel, lanes, 3)
    result = _requantize(accumulator, params[..., 0], params[..., 1], params[..., 2], config)
    return result.astype(np.int8).reshape(batch, count.n_result_words, lanes)


@dataclass
class FunctionalResult:
    """Flit data of a run. ``tile_out_flits[p]`` is int8 ``[batch * flits_out, L]``, the stream PE ``p``
    (chain position) emits, in emission order; None for idle tiles. ``out_flits`` is what the host receives."""

    tile_out_flits: list[np.ndarray | None]
    out_flits: np.ndarray


def check_input_flits(program: Program, in_flits: np.ndarray, batch: int) -> np.ndarray:
    lanes, words = program.arch.lanes, program.input_words
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise EmulatorError(f"batch must be a positive integer, got {batch!r}")
    flits = np.asarray(in_flits)
    expected = (batch * words, lanes)
    if flits.shape != expected:
        raise EmulatorError(f"input flits have shape {list(flits.shape)}, expected [{expected[0]}, {lanes}] "
                            f"(batch {batch} x {words} words per inference, {lanes} lanes)")
    if flits.dtype != np.int8:
        if flits.dtype.kind not in "iu" or flits.min() < -128 or flits.max() > 127:
            raise EmulatorError(f"input flits must be int8, got {flits.dtype}")
        flits = flits.astype(np.int8)
    return flits


def run_functional(program: Program, in_flits: np.ndarray, batch: int, path: DataPath | None = None,
                   timing=None) -> FunctionalResult:
    """Every PE's output stream, from the host input flits ``[batch * input_words, L]``.

    ``timing`` (an :class:`emulator.timing.TimingResult` of the same run) is needed only by a tile whose
    weights overlap an activation bank the input side may write during a COMPUTE (:func:`racing_banks`);
    if it is not given, it is solved then."""
    arch = program.arch
    path = path or trace_data_path(program)
    stream = check_input_flits(program, in_flits, batch).reshape(batch, program.input_words, arch.lanes)
    tile_out: list[np.ndarray | None] = [None] * arch.n_tiles
    with _single_threaded_blas():
        for position in path.order:
            tile, count = program.tiles[position], path.counts[position]
            race_checked = False
            if count.n_out and racing_banks(tile, count, batch):
                if timing is None:
                    from .timing import solve_timing   # (imports this module)
                    timing = solve_timing(program, batch, path)
                check_bank_races(tile, count, batch, timing.pe_times[position], position,
                                 timing.compute_ends[position])
                race_checked = True
            stream = _pe_stream(tile, count, stream, arch, race_checked)
            tile_out[position] = stream.reshape(-1, arch.lanes)
    return FunctionalResult(tile_out_flits=tile_out, out_flits=stream.reshape(-1, arch.lanes))


def _pe_stream(tile: TileProgram, count: TileCounts, stream: np.ndarray, arch: Arch,
               race_checked: bool = False) -> np.ndarray:
    """One PE's output per inference, ``[batch, flits_out, L]``, from its input ``[batch, K + P, L]``:
    the Q words of the forward queue (the forwarded RECV words, then the P passed flits) and the E result
    words, in the output side's order (sections 4, 4.2 and 4.4): the forwarded words and the first
    ``P_bulk`` passed flits, then per output pixel ``pass_per_pixel`` passed flits and the pixel's ``W_px``
    result words."""
    parts = []
    if count.n_forward:
        parts.append(stream[:, count.forward_begin:count.forward_end])
    parts.append(stream[:, count.n_in_words:])
    if not count.n_out:
        return np.concatenate(parts, axis=1)
    _check_parameters(tile, count)
    activations = stream[:, count.store_begin:count.store_end]
    weights = None
    if count.op in (OP_MAC, OP_LANE):
        weights = weight_memory(tile, count, activations, arch.lanes, race_checked=race_checked)
    results = pe_results(tile, count, activations, arch, weights)
    if not count.pass_per_pixel:
        parts.append(results)
        return np.concatenate(parts, axis=1)
    queued = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    out = np.empty((stream.shape[0], count.flits_out, arch.lanes), dtype=np.int8)
    is_pop = count.output_is_pop()
    out[:, is_pop] = queued
    out[:, ~is_pop] = results
    return out
