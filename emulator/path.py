"""The data path of a flowtile run (docs/architecture.md sections 3 to 5): each PE's per-inference counts from
its registers (:class:`TileCounts`) and the streams between the PEs (:func:`trace_data_path`). Shared by the
emulator's data model (:mod:`.functional`) and its timing model (:mod:`.timing`); the register rules themselves are
the spec's (:meth:`flowtile.tile_config.TileConfig.validate`, run by :meth:`flowtile.program.Program.validate`).

:func:`trace_data_path` follows the flits the way the hardware moves them: from the host into tile (0,0), then from
every PE along the XY route of its configured destination, to the next PE or to the host output. It checks what
the exact timing model needs beyond a valid program (every router output carries at most one stream, every PE on
the path consumes exactly the flits the previous one emits per inference) and raises :class:`EmulatorError`
otherwise. Several chips (``Arch.chips``) form one system chain: a PE of chip ``k`` that sends to the host port
sends over link ``k`` into chip ``k + 1``'s tile (0,0) W FIFO, as the host feeds chip 0 (the link's timing is
:mod:`.timing`'s, its framing and messages :mod:`flowtile.link_format`'s); in a ring (``chip_topology = "ring"``)
the last chip's exit stream crosses link ``chips - 1``, whose receiver delivers it to the host output.

A tile of several contexts (``TileProgram.later_contexts``, docs/architecture.md section 4.6) is one stop of the
data path: its first context reads the stream that reaches the tile, each later context the one before's output
(through the tile's loop-back FIFO; :func:`trace_data_path` checks the counts match), and its last context's output
leaves the tile by that context's destination registers (``TileProgram.output_config``). :func:`tile_counts` gives
such a tile context 0's counts with every context's in :attr:`TileCounts.contexts`; the ``tile_*`` properties are the
tile's.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from flowtile.arch import COMPUTE_DRAIN_CYCLES, OP_ADD, OP_BCAST, OP_CONCAT, OP_LANE, OP_MAC, Arch
from flowtile.program import Program, TileProgram, link_name
from flowtile.link_format import LinkGeometry

__all__ = ["EmulatorError", "TileCounts", "Hop", "DataPath", "trace_data_path", "tile_counts", "config_counts", "PORTS",
           "HOST", "TileProgress", "FlitProgress", "flit_progress", "stuck_summary", "DeadlockError", "link_delivered",
           "tile_label"]


class EmulatorError(ValueError):
    """The program (or its input) is not one the emulator can run exactly; the message says why."""


#: Router ports; the step each direction takes on the mesh as (d_row, d_col). Rows grow southward.
PORTS = ("L", "N", "E", "S", "W")
_STEP = {"N": (-1, 0), "E": (0, 1), "S": (1, 0), "W": (0, -1)}
_OPPOSITE = {"N": "S", "S": "N", "E": "W", "W": "E"}
#: Stands for the host as the producer of the first stream and the consumer of the last.
HOST = -1


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
    # the second store range (register store2_begin / store2_end; (0, 0): none): its words follow the first's
    store2_begin: int = 0
    store2_end: int = 0
    # section 4.4: per output pixel, pass_per_pixel PASS words (popped) before the pixel's result words
    pass_per_pixel: int = 0
    n_pix: int = 1      # output pixels of a computing tile (section 4.1's band: TileConfig.output_pixels)
    # section 4, result ring: issue cycles d of each result word of one output pixel, in order
    # (TileConfig.result_word_issue_cycles; empty without COMPUTE)
    pixel_word_issue: tuple[int, ...] = ()
    # section 4.6: a tile of several contexts has the counts of context 0 above and every context's counts here, in
    # turn order (context 0's again first, each with no contexts of its own); empty for a tile of one context
    contexts: tuple["TileCounts", ...] = ()
    # section 4, one bank (register single_bank): the first input transfer of inference s >= 1 waits until COMPUTE of
    # s - 1 has ended (two banks: until it has begun)
    single_bank: bool = False
    # section 12, replicated stages: a tile of several turns runs its registers ``turns`` times per program inference,
    # each turn an ordinary inference on the next part of the stream (router in, router out); its ``contexts`` then
    # hold its counts once per turn, and its ``tile_*`` counts are per program inference
    turns: int = 1
    # section 4, streaming rows (register stream_rows = R > 0): a line buffer of R input rows of ``row_words`` words;
    # per output row of the band its first result word and the input rows ``(first, last)`` it reads, and the map's
    # rows (in_height)
    stream_rows: int = 0
    row_words: int = 0
    in_height: int = 0
    output_row_words: tuple[int, ...] = ()
    output_row_inputs: tuple[tuple[int, int], ...] = ()
    # rows interleaved in the streams (register interleave_rows): per input row the band's output rows it completes
    # (TileConfig.output_rows_ending; empty: not interleaved), and the pixels of an output row (out_width)
    rows_ending: tuple[int, ...] = ()
    row_pixels: int = 0

    @property
    def idle(self) -> bool:
        return self.n_in_words == 0 and self.n_pass == 0 and self.n_out == 0

    @property
    def n_stored(self) -> int:
        """RECV words written to the activation region per inference (both store ranges)."""
        return self.store_end - self.store_begin + self.store2_end - self.store2_begin

    @property
    def store_until(self) -> int:
        """One past the last stored RECV word (COMPUTE of an inference waits for word ``store_until - 1``)."""
        return self.store2_end if self.store2_end else self.store_end

    @property
    def stored_recv_words(self) -> np.ndarray:
        """int64 ``[n_stored]``: the RECV word stored at each word of a bank, in order (section 4.2)."""
        return np.concatenate([np.arange(self.store_begin, self.store_end),
                               np.arange(self.store2_begin, self.store2_end)]).astype(np.int64)

    def stored(self, stream: np.ndarray) -> np.ndarray:
        """The stored words of ``stream`` (``[batch, words, ...]``, the RECV words first), as a bank holds them."""
        first = stream[:, self.store_begin:self.store_end]
        if not self.store2_end:
            return first
        return np.concatenate([first, stream[:, self.store2_begin:self.store2_end]], axis=1)

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
        interleaved pops and EMITs (section 4.4; all ``Q`` pops if ``pass_per_pixel = 0``); with rows interleaved
        (``rows_ending``) the forwarded rows before the first row that completes an output row."""
        if self.rows_ending:
            first = next(y for y, rows in enumerate(self.rows_ending) if rows)
            return (first + 1) * self.row_words if self.n_forward else 0
        return self.n_queue - self.n_pix * self.pass_per_pixel if self.n_out else self.n_queue

    def input_is_pass(self) -> np.ndarray:
        """bool ``[K + P]``: which input-side transfers of one inference are PASS transfers (the rest are RECV words
        0, 1, ... in order): the ``K`` RECV then the ``P`` PASS transfers, or with rows interleaved (register
        ``interleave_rows``, section 4 "Streaming rows") per input row its words, then per output row it completes
        ``out_width * pass_per_pixel`` PASS transfers."""
        is_pass = np.zeros(self.flits_in, dtype=bool)
        if not self.rows_ending:
            is_pass[self.n_in_words:] = True
            return is_pass
        at, per_row = 0, self.row_pixels * self.pass_per_pixel
        for rows in self.rows_ending:
            at += self.row_words
            is_pass[at:at + rows * per_row] = True
            at += rows * per_row
        return is_pass

    def recv_actions(self) -> np.ndarray:
        """int64 ``[K]``: the input-side transfer (within an inference) of each RECV word."""
        if not self.rows_ending:
            return np.arange(self.n_in_words, dtype=np.int64)
        return np.flatnonzero(~self.input_is_pass()).astype(np.int64)

    def push_actions(self) -> np.ndarray:
        """int64 ``[Q]``: the input-side transfers (within an inference) that push into the forward queue, in order:
        the forwarded RECV words and every PASS transfer."""
        if not self.rows_ending:
            return np.concatenate([np.arange(self.forward_begin, self.forward_end, dtype=np.int64),
                                   np.arange(self.n_in_words, self.flits_in, dtype=np.int64)])
        pushes = self.input_is_pass()
        if self.n_forward:      # the whole map (TileConfig's rule)
            pushes[:] = True
        return np.flatnonzero(pushes).astype(np.int64)

    @property
    def recv_span(self) -> int:
        """Input-side transfers of an inference up to its last RECV word (the rest are PASS transfers)."""
        return int(self.recv_actions()[-1]) + 1 if self.rows_ending else self.n_in_words

    def output_is_pop(self) -> np.ndarray:
        """bool ``[Q + E]``: which output-side transfers of one inference are pops (the rest are EMITs of
        result words 0, 1, ... in order). Section 4.4: ``Q_f + P_bulk`` pops, then per output pixel
        ``pass_per_pixel`` pops and the pixel's ``W_px`` EMITs; with rows interleaved (``rows_ending``) per input
        row its forwarded words (if it forwards), then the pixels of the output rows it completes."""
        if self.rows_ending:
            pixel = np.zeros(self.pass_per_pixel + self.result_words_per_pixel, dtype=bool)
            pixel[:self.pass_per_pixel] = True
            row = np.ones(self.row_words if self.n_forward else 0, dtype=bool)
            return np.concatenate([np.concatenate([row, np.tile(pixel, rows * self.row_pixels)])
                                   for rows in self.rows_ending])
        is_pop = np.zeros(self.flits_out, dtype=bool)
        lead = self.n_bulk_pops
        is_pop[:lead] = True
        if self.n_out and self.pass_per_pixel:
            step = self.pass_per_pixel + self.result_words_per_pixel
            is_pop[lead:].reshape(self.n_pix, step)[:, :self.pass_per_pixel] = True
        return is_pop

    def interleave_output(self, popped: np.ndarray, results: np.ndarray) -> np.ndarray:
        """``[batch, Q + E, L]``: the output side's flits of each inference, the ``popped`` flits ``[batch, Q, L]``
        and the ``results`` ``[batch, E, L]`` in the order :meth:`output_is_pop` gives, assembled by slices (a
        boolean mask over the stream copies far slower)."""
        batch, lanes = popped.shape[0], popped.shape[2]
        out = np.empty((batch, self.flits_out, lanes), dtype=popped.dtype)
        if self.rows_ending:
            is_pop = self.output_is_pop()
            out[:, np.flatnonzero(is_pop)] = popped
            out[:, np.flatnonzero(~is_pop)] = results
            return out
        lead, per_pass, per_emit = self.n_bulk_pops, self.pass_per_pixel, self.result_words_per_pixel
        out[:, :lead] = popped[:, :lead]
        pixels = out[:, lead:].reshape(batch, self.n_pix, per_pass + per_emit, lanes)
        pixels[:, :, :per_pass] = popped[:, lead:].reshape(batch, self.n_pix, per_pass, lanes)
        pixels[:, :, per_pass:] = results.reshape(batch, self.n_pix, per_emit, lanes)
        return out

    @property
    def first_emit(self) -> int:
        """Output-side transfer index (within an inference) of the first EMIT (section 4.4: after pixel
        0's pops); only meaningful if the tile computes."""
        return self.n_bulk_pops + self.pass_per_pixel

    @property
    def compute_issue_cycles(self) -> int:
        """``I``: the COMPUTE cycles that issue an SRAM read (``TileConfig.compute_issue_cycles``)."""
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
    def per_context(self) -> tuple["TileCounts", ...]:
        """Every context's counts in turn order (section 4.6): ``contexts``, or this one for a tile of one context.
        The other properties of a tile of several contexts are context 0's, except the ``tile_*`` ones."""
        return self.contexts or (self,)

    @property
    def tile_flits_in(self) -> int:
        """Flits the tile takes from its router per (program) inference: its first context's input transfers
        (section 4.6), every turn's with several turns (section 12; :attr:`flits_in` for a tile of one)."""
        if self.turns > 1:
            return sum(count.flits_in for count in self.contexts)
        return self.contexts[0].flits_in if self.contexts else self.flits_in

    @property
    def tile_flits_out(self) -> int:
        """Flits the tile emits to its router per (program) inference: its last context's output transfers
        (section 4.6), every turn's with several turns (section 12; :attr:`flits_out` for a tile of one)."""
        if self.turns > 1:
            return sum(count.flits_out for count in self.contexts)
        return self.contexts[-1].flits_out if self.contexts else self.flits_out

    @property
    def tile_compute_cycles(self) -> int:
        """COMPUTE cycles of the tile per inference, every context's ``I + 2`` (section 4.6)."""
        return sum(count.compute_cycles for count in self.per_context)

    @property
    def tile_mac_issue_cycles(self) -> int:
        """:attr:`mac_issue_cycles` of every context of the tile (section 4.6)."""
        return sum(count.mac_issue_cycles for count in self.per_context)

    @property
    def mac_issue_cycles(self) -> int:
        """Issue cycles that multiply-accumulate ``L`` lanes: every one for MAC, LANE (which
        multiplies lane by lane, ``L`` MACs a cycle), ADD and CONCAT (each issue multiplies an operand
        word by ``add_mult_a`` or ``add_mult_b`` and accumulates, lane by lane), none for max pooling."""
        return self.issue_cycles if self.op in (OP_MAC, OP_LANE, OP_ADD, OP_CONCAT, OP_BCAST) else 0


def _recv_range(begin: int, end: int) -> tuple[int, int]:
    return (begin, end) if begin < end else (0, 0)


def tile_counts(tile: TileProgram, arch: Arch) -> TileCounts:
    """A tile's counts: its one context's, or for a tile of several contexts (section 4.6) context 0's with every
    context's in :attr:`TileCounts.contexts`, or for a tile of several turns (section 12) its context's with one
    copy per turn there and ``turns`` set."""
    if tile.turns > 1:     # section 12: the one context's counts once per turn
        count = config_counts(tile.config, arch)
        return replace(count, contexts=(count,) * tile.turns, turns=tile.turns)
    if not tile.later_contexts:
        return config_counts(tile.config, arch)
    contexts = tuple(config_counts(config, arch) for config in tile.contexts)
    return replace(contexts[0], contexts=contexts)


def config_counts(config, arch: Arch) -> TileCounts:
    """The counts of one context's registers (a :class:`flowtile.tile_config.TileConfig`)."""
    n_out = config.n_out
    store_begin, store_end = _recv_range(config.store_begin, config.store_end)
    store2_begin, store2_end = _recv_range(config.store2_begin, config.store2_end)
    forward_begin, forward_end = _recv_range(config.forward_begin, config.forward_end)
    return TileCounts(n_in_words=config.n_in_words, n_pass=config.n_pass, n_out=n_out,
                      n_result_words=config.result_words(arch.lanes), issue_cycles=config.compute_issue_cycles,
                      op=config.op, store_begin=store_begin, store_end=store_end, store2_begin=store2_begin,
                      store2_end=store2_end, forward_begin=forward_begin,
                      forward_end=forward_end, pass_per_pixel=config.pass_per_pixel,
                      n_pix=max(1, config.output_pixels) if n_out else 1,
                      pixel_word_issue=tuple(config.result_word_issue_cycles(arch.lanes)),
                      single_bank=bool(config.single_bank and n_out), **_stream_counts(config, arch))


def _stream_counts(config, arch: Arch) -> dict:
    """The line buffer's counts of :class:`TileCounts` (empty without ``stream_rows``)."""
    if not (config.stream_rows and config.n_out):
        return {}
    per_pixel = config.result_words(arch.lanes) // config.output_pixels
    rows, before = [], 0
    for oy, _ in config.output_pixel_positions():
        if not rows or oy != rows[-1][0]:
            rows.append((oy, before))
        before += per_pixel
    return {"stream_rows": config.stream_rows, "row_words": config.row_words, "in_height": config.in_height,
            "output_row_words": tuple(first for _, first in rows),
            "output_row_inputs": tuple(config.input_rows_of_output_row(oy - config.out_row_begin) for oy, _ in rows),
            **({"rows_ending": tuple(config.output_rows_ending()), "row_pixels": config.out_width}
               if config.interleave_rows else {})}


@dataclass(frozen=True)
class Hop:
    """The route of one stream between two consumers of flits.

    ``fifos`` are the router input FIFOs the flits pass through on chip ``chip``, in order, as ``(row, col,
    port)``: the producer's L FIFO first (or tile (0,0)'s W FIFO for the host stream), then the input FIFO of
    every router the XY route enters. The last FIFO is read by ``consumer``'s PE, or by the host output port
    when ``consumer`` is :data:`HOST`. A stream that leaves chip ``k`` (not the last) through its host output
    port crosses link ``link = k`` after ``fifos`` (its sender reads the last of them) and continues through
    ``link_fifos``, router input FIFOs on chip ``k + 1``: tile (0,0)'s W FIFO (the link's receiver writes it,
    as the host writes chip 0's, every flit addressed to tile (0,0)), which ``consumer``, tile (0,0) of chip
    ``k + 1``, reads. In a ring the last chip's stream crosses link ``chips - 1`` to the host (``consumer`` is
    :data:`HOST`, ``link_fifos`` empty: the receiver hands each flit to the host output).
    """

    producer: int          # system chain position, or HOST
    consumer: int          # system chain position, or HOST
    fifos: tuple[tuple[int, int, str], ...]
    chip: int = 0          # the chip of ``fifos`` (the producer's; 0 for the host stream)
    link: int | None = None
    link_fifos: tuple[tuple[int, int, str], ...] = ()

    @property
    def last_fifo(self) -> tuple[int, int, int, str]:
        """``(chip, row, col, port)`` of the FIFO the consumer reads."""
        if self.link is None:
            return (self.chip, *self.fifos[-1])
        return (self.link + 1, *self.link_fifos[-1])


@dataclass(frozen=True)
class DataPath:
    """How flits move through a program: PEs in stream order and the hops between them.

    ``order[i]`` is the system chain position of the i-th PE the data visits; ``hops[0]`` runs from the host
    to ``order[0]``, ``hops[i + 1]`` from ``order[i]`` to ``order[i + 1]`` (the last one to the host); a hop
    between chips crosses a link (:attr:`Hop.link`). ``link_flits[k]``: flits crossing link ``k`` per
    inference (empty for one chip).
    """

    order: tuple[int, ...]
    hops: tuple[Hop, ...]
    counts: tuple[TileCounts, ...]   # per system chain position
    link_flits: tuple[int, ...] = ()


def tile_label(chip: int, row: int, col: int) -> str:
    """A tile's name in messages and chain names: ``r{row}c{col}``, prefixed ``chip{k}.`` after the first chip
    (as :attr:`flowtile.program.TileProgram.key`)."""
    return f"r{row}c{col}" if chip == 0 else f"chip{chip}.r{row}c{col}"


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


def _raise_count_mismatch(program: Program, message: str):
    """Raise for flit counts that do not add up: :class:`emulator.watchdog.DeadlockError` (an EmulatorError) if
    the run would stall, naming where (stuck tile, port, words received of expected, for one inference), else
    EmulatorError (the surplus flits would be read as the next inference's)."""
    progress = flit_progress(program, 1)
    summary = stuck_summary(progress)
    if summary:
        raise DeadlockError(f"{message}; the run would stall: {summary}", progress)
    raise EmulatorError(f"{message}; the surplus flits would be read as the next inference's")


def trace_data_path(program: Program) -> DataPath:
    """Follow the flits from the host through the PEs back to the host; raise EmulatorError if the
    program is not a single contention-free stream with consistent per-inference flit counts. Validates the
    program first (:meth:`flowtile.program.Program.validate`: every register rule), so every entry point of the
    emulator runs valid programs only.

    Several chips (``Arch.chips``, a line): chip ``k`` is an ordinary chip; a PE of chip ``k`` (not the last)
    sending to the host port (``dest_host = 1``) sends over link ``k``: its flits leave through chip ``k``'s
    exit port, only their data crosses the link, and they enter chip ``k + 1``'s tile (0,0) W FIFO addressed to
    that tile (the link's receiver rebuilds them with ``dest_row = dest_col = dest_host = 0``; their sender's
    ``dest_row``, ``dest_col`` do not cross, and :meth:`~flowtile.program.Program.validate` requires (0,0) of the
    exit tile). In a ring the last chip's PE sending to the host port sends over link ``chips - 1`` (the return
    link), whose receiver delivers to the host output. Link ``k`` must carry ``Program.links[k].inference_flits``
    flits per inference."""
    program.validate()
    arch = program.arch
    counts = tuple(tile_counts(tile, arch) for tile in program.tiles)
    position_of = {arch.system_position(p): p for p in range(arch.system_tiles)}
    # The host's flits carry destination tile (0,0) and enter its W FIFO (sections 3 and 5).
    host_fifos, host_outputs = _route(arch, (0, 0), "W", (0, 0), False, "host input")
    hops = []
    used_outputs = {(0, *out): "host input" for out in host_outputs}
    order: list[int] = []
    link_flits: list[int] = []
    producer, fifos, chip, link, link_fifos = HOST, host_fifos, 0, None, []
    consumer = position_of[(0, 0, 0)]
    flits_arriving = program.input_words
    while True:
        hops.append(Hop(producer, consumer, tuple(fifos), chip, link, tuple(link_fifos)))
        if consumer == HOST:
            if flits_arriving != program.output_words:
                _raise_count_mismatch(program, f"tile {program.tiles[producer].key} sends {flits_arriving} flits per "
                                      f"inference to the host, the program's output needs "
                                      f"{program.output_words} (output length {program.output.length}, "
                                      f"{arch.lanes} lanes)")
            break
        tile, count = program.tiles[consumer], counts[consumer]
        if producer == HOST:
            source = "the host"
        else:
            source = f"tile {program.tiles[producer].key}" + (f" over link {link}" if link is not None else "")
        if consumer in order:
            raise EmulatorError(f"the flits of {source} return to tile {tile.key}: the data path is a "
                                f"cycle and never reaches the host")
        if count.tile_flits_in != flits_arriving:
            turns = f" in each of its {count.turns} turns" if count.turns > 1 else ""
            _raise_count_mismatch(
                program, f"tile {tile.key} (chain position {consumer}) reads n_in_words + n_pass = "
                f"{count.n_in_words} + {count.n_pass} = {count.flits_in} flits per inference{turns}, but "
                f"{source} sends it {flits_arriving}")
        # a tile's contexts chain their counts and queue whole inferences (section 4.6): Program.validate's rules
        order.append(consumer)
        if count.tile_flits_out == 0:
            raise EmulatorError(f"tile {tile.key} (chain position {consumer}) emits no flits, so nothing "
                                f"reaches the host")
        config = tile.output_config       # the destination registers of the context that emits to the router
        chip = tile.chip
        who = f"tile {tile.key} (chain position {consumer})"
        link, link_fifos, link_outputs = None, [], []
        if config.dest_host:
            target = arch.exit_tile
            if chip == arch.chips - 1 and arch.chip_topology != "ring":
                next_consumer = HOST
            else:
                link = chip
                inference_flits = program.links[link].inference_flits
                if count.tile_flits_out != inference_flits:
                    raise EmulatorError(
                        f"{link_name(arch, link)}: register inference_flits = {inference_flits}, "
                        f"but {who} sends {count.tile_flits_out} flits per inference over it (the link frames "
                        f"each inference's flits by that register)")
                link_flits.append(count.tile_flits_out)
                if chip == arch.chips - 1:
                    # a ring's return link: its receiver, on chip 0's board, delivers to the host output
                    next_consumer = HOST
                else:
                    # only the data crosses: the flits enter chip k + 1 like host input flits, addressed to its tile
                    # (0,0) (the receiver rebuilds dest_row = dest_col = dest_host = 0), through that tile's W FIFO
                    landing = (0, 0)
                    link_fifos, link_outputs = _route(arch, (0, 0), "W", landing, False, f"{who} over link {link}")
                    next_consumer = position_of[(chip + 1, *landing)]
        else:
            target = (config.dest_row, config.dest_col)   # inside the grid: Program.validate
            if target == (tile.row, tile.col):
                raise EmulatorError(f"{who}: sends its flits to itself")
            next_consumer = position_of[(chip, *target)]
        fifos, outputs = _route(arch, (tile.row, tile.col), "L", target, bool(config.dest_host), who)
        for out_chip, used in ((chip, outputs), (chip + 1, link_outputs)):
            for out in used:
                key = (out_chip, *out)
                if key in used_outputs:
                    raise EmulatorError(
                        f"{who}: its route uses router {'' if out_chip == 0 else f'chip {out_chip} '}({out[0]},{out[1]}) "
                        f"output {out[2]}, which {used_outputs[key]} also uses; contended routes are not modelled "
                        f"exactly")
                used_outputs[key] = who
        producer, consumer, flits_arriving = consumer, next_consumer, count.tile_flits_out

    for position, count in enumerate(counts):
        if not count.idle and position not in order:
            raise EmulatorError(f"tile {program.tiles[position].key} (chain position {position}) is "
                                f"configured (n_in_words={count.n_in_words}, n_pass={count.n_pass}, "
                                f"n_out={count.n_out}) but no flits reach it")
    return DataPath(order=tuple(order), hops=tuple(hops), counts=counts, link_flits=tuple(link_flits))


# --- where a program whose flit counts do not add up gets stuck (the watchdog's count model) ---------------

@dataclass(frozen=True)
class TileProgress:
    """One tile on the flits' path, over a whole batch (counts of flits, not cycles)."""

    position: int          # system chain position
    row: int
    col: int
    port: str              # the router input port its flits arrive on (N, E, S, W)
    source: str            # "the host", "tile rXcY" or "tile rXcY over link k"
    reads: int             # flits it reads per inference (n_in_words + n_pass)
    emits: int             # flits it emits per inference
    arriving: int          # flits that reach it over the batch
    received: int          # flits it reads over the batch
    emitted: int           # flits it emits over the batch
    finished: int          # inferences whose every input flit it read
    batch: int
    chip: int = 0

    @property
    def key(self) -> str:
        return tile_label(self.chip, self.row, self.col)

    @property
    def place(self) -> str:
        """``(row,col)``, preceded by ``chip k`` after the first chip."""
        return f"({self.row},{self.col})" if self.chip == 0 else f"chip {self.chip} ({self.row},{self.col})"

    @property
    def stuck(self) -> bool:
        """Whether its input side waits forever (it never reads all inferences' flits)."""
        return self.finished < self.batch

    @property
    def waiting_has(self) -> int:
        """Flits it has of the inference it waits in (``stuck`` only)."""
        return self.received - self.finished * self.reads

    def describe(self) -> str:
        if self.reads == 0:
            return (f"tile {self.place} input side reads no flits (n_in_words + n_pass = 0) but "
                    f"{self.source} sends it {self.arriving}")
        total = f" ({self.received} of {self.reads * self.batch} over the batch)" if self.batch > 1 else ""
        return (f"tile {self.place} input side waits on port {self.port} (from {self.source}) in "
                f"inference {self.finished}: {self.waiting_has} of {self.reads} words received{total}")


@dataclass(frozen=True)
class FlitProgress:
    """Where the flits of a batch go (:func:`flit_progress`)."""

    tiles: tuple[TileProgress, ...]     # in data order
    host_received: int                  # output flits the host would receive
    host_expected: int
    host_sent: int                      # input flits the host sends (tile (0,0) reads at most these)
    cycle: bool                         # the path returns to a tile instead of reaching the host

    @property
    def stuck(self) -> list[TileProgress]:
        return [tile for tile in self.tiles if tile.stuck]

    @property
    def completes(self) -> bool:
        return not self.stuck and not self.cycle and self.host_received >= self.host_expected


def _partial_emits(count: TileCounts, received: int) -> int:
    """Output transfers a tile makes for an inference of which it has read ``received`` input flits: the longest
    prefix of its output order (section 4.4) whose pops have their words pushed and whose EMITs have their COMPUTE
    (which begins once the last stored word arrived)."""
    if received >= count.flits_in:
        return count.flits_out
    recv = int(np.searchsorted(count.recv_actions(), received))         # RECV words among the received flits
    pushes = int(np.searchsorted(count.push_actions(), received))
    computed = bool(count.n_out) and recv >= count.store_until
    done = popped = 0
    for is_pop in count.output_is_pop():
        if is_pop:
            if popped >= pushes:
                break
            popped += 1
        elif not computed:
            break
        done += 1
    return done


def link_delivered(sent: int, link, arch: Arch) -> int:
    """Flits a link with registers ``link`` (:class:`flowtile.program.LinkProgram`) delivers of the ``sent`` its
    sender takes: those of closed frames. Frames never span inferences (:mod:`flowtile.link_format`): each
    inference's ``inference_flits`` form the frames of its lane table, and a frame closes only once it has all its
    flits."""
    inference_flits = link.inference_flits
    if inference_flits <= 0:
        return 0
    whole, rest = divmod(sent, inference_flits)
    ends = np.cumsum(LinkGeometry(arch, owner="link").inference_frame_sizes(inference_flits, link.segments))
    return whole * inference_flits + int(ends[np.searchsorted(ends, rest, side="right") - 1]
                                         if rest >= ends[0] else 0)


def flit_progress(program: Program, batch: int) -> FlitProgress:
    """Follow ``batch`` inferences' flits by their counts along the configured destinations (see the module
    docstring), across the links of a multi-chip program; works on programs whose counts do not add up (the
    registers must pass ``Program.validate``)."""
    arch = program.arch
    counts = [tile_counts(tile, arch) for tile in program.tiles]
    position_of = {arch.system_position(p): p for p in range(arch.system_tiles)}
    arriving = batch * program.input_words
    host_sent = arriving
    position, port, source = position_of[(0, 0, 0)], "W", "the host"
    tiles: list[TileProgress] = []
    seen: set[int] = set()
    cycle = False
    expected = batch * program.output_words
    while True:
        if position in seen:
            cycle = True
            break
        seen.add(position)
        tile, count = program.tiles[position], counts[position]
        reads = count.tile_flits_in
        if reads:
            finished = min(batch, arriving // reads)
            received = min(arriving, batch * reads)
            emitted = finished * count.tile_flits_out
            if finished < batch:
                partial = received - finished * reads
                if count.turns > 1:     # section 12: the turns read the stream one after the other
                    for turn in count.contexts:
                        taken = min(partial, turn.flits_in)
                        emitted += _partial_emits(turn, taken)
                        partial -= taken
                else:
                    for context in count.per_context:   # section 4.6: each context reads what the one before emits
                        partial = _partial_emits(context, partial)
                    emitted += partial
        else:
            finished = batch if arriving == 0 else 0
            received, emitted = 0, 0
        tiles.append(TileProgress(position, tile.row, tile.col, port, source, reads, count.tile_flits_out,
                                  arriving, received, emitted, finished, batch, tile.chip))
        config = tile.output_config
        if config.dest_host:
            target = arch.exit_tile
        else:
            target = (config.dest_row, config.dest_col)
        if count.tile_flits_out == 0:
            return FlitProgress(tuple(tiles), 0, expected, host_sent, cycle)
        if not config.dest_host and target == (tile.row, tile.col):
            return FlitProgress(tuple(tiles), 0, expected, host_sent, True)
        try:
            fifos, _ = _route(arch, (tile.row, tile.col), "L", target, bool(config.dest_host), f"tile {tile.key}")
        except EmulatorError:
            return FlitProgress(tuple(tiles), 0, expected, host_sent, cycle)
        if config.dest_host:
            if tile.chip == arch.chips - 1:
                if arch.chip_topology == "ring":    # the host reads behind the return link
                    emitted = link_delivered(emitted, program.links[tile.chip], arch)
                return FlitProgress(tuple(tiles), emitted, expected, host_sent, cycle)
            link = tile.chip         # over link k into chip k + 1's tile (0,0) W FIFO, addressed to that tile
            landing = (0, 0)
            fifos, _ = _route(arch, (0, 0), "W", landing, False, f"tile {tile.key} over link {link}")
            port, source = fifos[-1][2], f"tile {tile.key} over link {link}"
            arriving = link_delivered(emitted, program.links[link], arch)
            position = position_of[(link + 1, *landing)]
            continue
        port, source = fifos[-1][2], f"tile {tile.key}"
        position, arriving = position_of[(tile.chip, *target)], emitted
    return FlitProgress(tuple(tiles), 0, expected, host_sent, cycle)


def stuck_summary(progress: FlitProgress, limit: int = 2) -> str:
    """One clause naming where a run that cannot finish stalls (the first stuck tiles in data order, the host
    output's count), or '' if it finishes."""
    stuck = progress.stuck
    parts = [tile.describe() for tile in stuck[:limit]]
    if len(stuck) > limit:
        parts.append(f"{len(stuck) - limit} more tile(s) downstream starve")
    if progress.cycle:
        parts.append("the data path returns to a tile and never reaches the host")
    if progress.host_received < progress.host_expected:
        parts.append(f"the host output would receive {progress.host_received} of {progress.host_expected} flits")
    return "; ".join(parts)


class DeadlockError(EmulatorError):
    """The program cannot finish: its flit counts do not add up, so a tile waits forever for flits its upstream
    never sends. ``stuck``: the :class:`TileProgress` of the tiles that wait (data order, the root cause first);
    ``progress``: the whole :class:`FlitProgress`."""

    def __init__(self, message: str, progress: FlitProgress | None = None):
        super().__init__(message)
        self.progress = progress
        self.stuck = [] if progress is None else progress.stuck
