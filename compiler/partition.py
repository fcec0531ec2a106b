"""Tile assignment: which consecutive chain tiles compute which output neurons of which layer.

Rules (docs/architecture.md sections 1 and 6):

* every layer gets >= 1 consecutive chain tiles, layers in model order;
* a tile computes a contiguous slice of its layer's outputs; every slice but the layer's last is a
  multiple of ``lanes``, so that the result flits of consecutive tiles concatenate into the layer's
  output vector without padding lanes in the middle;
* a tile holds ``N_o * K`` weight words (from word 0) plus two ``K``-word activation banks behind
  them, which must fit ``arch.sram_words``, and ``N_o <= arch.max_tile_outputs``;
* tile ``j`` of a layer passes the results of tiles ``0..j-1`` through (``P`` = their result words);
  its estimated cycles per inference are those of its busiest side (section 6 rule 4):
  ``max(K + P, K_f + P + N_r, N_o*K + 2)`` with ``K_f`` its forwarded words (see :func:`tile_cycles`; results
  stream out through the result ring while COMPUTE runs, section 4);
* the pipeline's throughput is set by its slowest tile, so the tiles are balanced by a binary search for the
  smallest per-tile cycle budget at which every layer's fewest tiles within it fit the grid.

Windowed layers (Conv, MaxPool, lane layers; section 4.1) split their *output pixels* instead: every tile of
the layer receives the whole input map, stores only the input rows its band's windows read (twice: two banks;
:func:`band_input_rows`), holds all the weights (``N_o * KH*KW*CW`` words, none for MaxPool, ``CW*KH*KW`` for op
LANE; a convolution's channel group only its own, section 4.4) and computes a band of consecutive output pixels
(row-major; whole rows or not, section 4.1), so that a tile can take any share of a layer. A band of a join (Add,
Concat) stores its rows of both operand maps (all of them for a single band; else in two store ranges, section
4.2). Its estimated cycles per inference are
``max(K + P, K_f + P + n_pix*N_r, I + 2)`` with ``I`` the COMPUTE issue cycles (:func:`window_tile_cycles`).

Several chips (``arch.chips``, a line; section 12): the chips' chains form one system chain, chip ``k``'s last tile
sending over link ``k`` to chip ``k + 1``'s first (a ring adds link ``chips - 1``, the last chip's output stream back
to the host at chip 0: a stage of fixed time, placed around as in a line). A link is a pipeline stage too, of
:func:`link_cycles` cycles per inference for the flits crossing it: the stream at that point, the layer's input and every tensor forwarded past it
(inside a split layer also the results of its tiles so far). :func:`place_layers` balances tiles and links together:
the smallest budget at which every layer's fewest tiles within it can be cut into the chips with every link within
it too, a chip ending early (pass-through tiles) where that puts the next cut at a narrow stream.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from flowtile.arch import ACTIVATION_BANKS, Arch
from flowtile.tile_config import line_buffer_rows_needed, register_bounds
from flowtile.link_format import LaneSegment, LinkGeometry, lane_segments_of_tensors

from .errors import CompileError

__all__ = ["TileSlice", "tile_cycles", "window_tile_cycles", "queue_shortfall_cycles", "ring_overflow_cycles",
           "coupled_ring_cycles", "assign_tiles", "words", "Placement", "place_layers",
           "link_cycles",
           "WindowCosts", "window_costs", "band_input_rows"]


class _Layer(Protocol):
    name: str
    op: str

    @property
    def n_in(self) -> int: ...

    @property
    def n_out(self) -> int: ...


@dataclass(frozen=True)
class TileSlice:
    """One tile's share of a layer: outputs ``[start, start + n_out)``, after ``n_pass`` passed-through words."""

    layer: int
    start: int
    n_out: int
    n_in_words: int
    n_pass: int
    forward: bool  # more tiles of the same layer follow
    #: windowed layers: this tile's band of output pixels ``[pixel_begin, pixel_begin + pixels)`` of the row-major
    #: ``out_height x out_width`` map (``pixels = 0`` for dense layers); a convolution split over output-channel
    #: groups too (section 4.4) has ``start``/``n_out`` = its group's channels and ``pass_per_pixel`` = the words a
    #: pixel of the groups before it
    pixel_begin: int = 0
    pixels: int = 0
    out_width: int = 1
    pass_per_pixel: int = 0
    #: the tile's forward queue: the SRAM words its weights and banks leave free (None: as deep as it needs)
    queue_words: int | None = None
    #: one activation bank (register ``single_bank``, section 4): the stored words take half the SRAM, and the tile's
    #: RECV of an inference waits for the previous COMPUTE to end (windowed layers whose two banks do not fit)
    single_bank: bool = False
    #: a line buffer of this many input rows instead of two banks (register ``stream_rows``, section 4 "Streaming
    #: rows"): the layer is one band of channel groups (:func:`_stream_groups`), its rows interleaved in the streams
    #: between them (register ``interleave_rows``); 0: banks
    stream_rows: int = 0

    @property
    def banks(self) -> int:
        return 1 if self.single_bank else ACTIVATION_BANKS

    @property
    def stop(self) -> int:
        return self.start + self.n_out

    @property
    def row_begin(self) -> int:
        """The band's first output row."""
        return pixel_rows(self.pixel_begin, self.pixels, self.out_width)[0]

    @property
    def rows(self) -> int:
        """Output rows the band touches (its first and last possibly partial)."""
        return pixel_rows(self.pixel_begin, self.pixels, self.out_width)[1] if self.pixels else 0

    @property
    def col_begin(self) -> int:
        """Register ``out_col_begin``: the first pixel's column."""
        return self.pixel_begin % self.out_width

    @property
    def col_end(self) -> int:
        """Register ``out_col_end``: one past the last pixel's column (``out_width`` for a full last row)."""
        return (self.pixel_begin + self.pixels - 1) % self.out_width + 1


def words(n: int, lanes: int) -> int:
    """Flits (SRAM words) holding ``n`` int8 values."""
    return -(-n // lanes)


def tile_cycles(n_in_words: int, n_pass: int, n_out: int, lanes: int, forwarded: int = 0) -> int:
    """Cycles per inference of one unstalled dense tile in steady state (section 6, rule 4): its busiest side.

    Input side: ``K + P`` transfers; output side: ``forwarded + P`` pops and ``N_r`` EMITs; compute side:
    ``N_o*K + 2`` cycles of COMPUTE (its results stream out meanwhile). A pass-through tile (``N_o = 0``) just
    moves its flits.
    """
    results = words(n_out, lanes) if n_out else 0
    compute = n_out * n_in_words + 2 if n_out else 0
    return max(n_in_words + n_pass, forwarded + n_pass + results, compute)


@dataclass(frozen=True)
class WindowCosts:
    """What partitioning needs to know about a windowed layer on a given arch."""

    k: int               # input map words (both operand maps of a join)
    n_out: int           # N_o: output channels (Conv), CW * L (MaxPool, lane layers)
    weight_words: int    # all the layer's weights, held by every tile of it
    row_issue: int       # COMPUTE issue cycles per output row
    row_results: int     # result words per output row (out_width * N_r)
    out_height: int
    #: RECV words of other tensors riding in the same stream (section 4.2): not stored, but each costs a cycle
    carried: int = 0
    #: weight words per output channel (``KH*KW*CW``) of a convolution that may be split over output-channel
    #: groups (section 4.4); 0 for the other layers
    channel_words: int = 0
    out_width: int = 1
    #: geometry of the rows a band stores (section 4.1): input height, words per input row (a join: of both
    #: operand maps), kernel height, stride, top padding
    in_height: int = 1
    row_words: int = 0
    kernel_h: int = 1
    stride: int = 1
    pad_top: int = 0
    #: the per-word ops (MaxPool, lane layers, Add), which split over channel groups of whole words too (section
    #: 4.4): COMPUTE issue cycles and weight words per output word of a pixel; ``word_issue = 0`` for the layers
    #: that cannot (convolutions, which group by channel_words; Concat)
    word_issue: int = 0
    word_weights: int = 0
    #: a join (Add, Concat): ``row_words`` counts a row of both operand maps, which a band stores in two ranges
    join: bool = False
    #: an op MAC, MAX or LANE layer, whose tiles may keep a line buffer (section 4 "Streaming rows")
    line_buffer_able: bool = False
    #: an op BCAST layer reading a densely packed map (section 4.5): bytes a row and lanes a word (a band's rows
    #: start inside a word: it stores ``ceil(rows * row bytes / L) + 1`` words at most)
    dense_row_bytes: int = 0
    dense_lanes: int = 0
    #: the stream's words before the layer's input map, and how many of the stream's first words the layer's tiles
    #: may drop at most (the first word of a tensor still needed after the layer, else all of them): a tile forwards
    #: only the suffix of the stream from the first word a later tile of the layer stores
    #: (:func:`compiler.emit.forward_only_what_follows`); ``stream_keep = 0``: every tile counted with the whole stream
    stream_front: int = 0
    stream_keep: int = 0
    #: the words the layer's last tile forwards (the stream's tensors still needed after the layer,
    #: ``StreamPlan.forward``: the carried ones, and the layer's own input when a later layer reads it too, as a
    #: residual block's first convolution's); None: the carried words
    last_forwarded: int | None = None

    @property
    def groupable(self) -> bool:
        return bool(self.channel_words or self.word_issue)

    def received(self, pixel_begin: int = 0) -> int:
        """``K``, the stream words a tile of the layer whose band starts at output pixel ``pixel_begin`` receives:
        the whole stream (``k`` and the carried words) for the layer's first band; a later band's tile receives it
        from the first word its band stores (or the first word still needed after the layer, if that comes
        earlier)."""
        whole = self.k + self.carried
        if not pixel_begin or not self.stream_keep or not self.row_words:
            return whole
        first_row = band_input_rows(self, *pixel_rows(pixel_begin, 1, self.out_width))[0]
        offset = (first_row * self.dense_row_bytes // self.dense_lanes if self.dense_row_bytes
                  else first_row * self.row_words)
        return whole - min(self.stream_keep, self.stream_front + offset)

    def forwarded(self, forward: bool, pixel_begin: int = 0) -> int:
        """``K_f``, the words a tile of the layer forwards: if more tiles of the layer follow (``forward``) at most
        every word it receives (counted so: the next band starts later), else what the layer's last tile forwards
        (:attr:`last_forwarded`)."""
        if forward:
            return self.received(pixel_begin)
        return self.carried if self.last_forwarded is None else self.last_forwarded

    def group_weights(self, channels: int, lanes: int) -> int:
        """Weight words a tile of a channel group of ``channels`` output channels holds."""
        if self.channel_words:
            return channels * self.channel_words
        return words(channels, lanes) * self.word_weights

    def group_issue(self, channels: int, lanes: int) -> int:
        """COMPUTE issue cycles a pixel of a channel group of ``channels`` output channels."""
        if self.channel_words:
            return channels * self.channel_words
        return words(channels, lanes) * self.word_issue

    def band_work(self, pixels: int, channels: int | None, lanes: int) -> tuple[int, int]:
        """``(COMPUTE issue cycles, result words)`` per inference of a tile computing ``pixels`` output pixels, of
        ``channels`` output channels of a layer split over channel groups (section 4.4), or of all (None)."""
        if channels is None:
            return pixels * self.pixel_issue, pixels * self.result_words_per_pixel
        return pixels * self.group_issue(channels, lanes), pixels * words(channels, lanes)

    def stored_words(self, pixel_begin: int, pixels: int) -> int:
        """Words a tile computing output pixels ``[pixel_begin, pixel_begin + pixels)`` stores per inference (one
        bank): the input rows the windows of the output rows it touches read."""
        if not self.row_words:
            return self.k
        rows = band_input_rows(self, *pixel_rows(pixel_begin, pixels, self.out_width))[1]
        if self.dense_row_bytes:
            return min(self.k, -(-rows * self.dense_row_bytes // self.dense_lanes) + 1)
        return rows * self.row_words

    @property
    def single_bank_able(self) -> bool:
        """Whether a tile of the layer may keep one activation bank (section 4): a layer storing whole input rows of
        one map (not a join's two maps, not a densely packed map)."""
        return not self.join and not self.dense_row_bytes

    def store_until(self, pixel_begin: int, pixels: int) -> int:
        """One past the last stored word of a band's tile in the stream it receives (:meth:`received`), at most:
        with the stream's front known (``stream_keep``) exactly, else every word it receives."""
        received = self.received(pixel_begin)
        if not self.stream_keep or not self.row_words:
            return received
        first, rows = band_input_rows(self, *pixel_rows(pixel_begin, pixels, self.out_width))
        dropped = self.k + self.carried - received
        return min(received, self.stream_front + (first + rows) * self.row_words - dropped)

    def alternation_cycles(self, pixel_begin: int, pixels: int, issue: int) -> int:
        """A one-bank tile's cycles per inference through its input and compute sides in turn (section 4): its RECV
        words up to the last stored one, then COMPUTE (``issue`` cycles and the drain)."""
        return self.store_until(pixel_begin, pixels) + issue + 2

    @property
    def pixel_issue(self) -> int:
        return self.row_issue // self.out_width

    @property
    def result_words_per_pixel(self) -> int:
        return self.row_results // self.out_width


def pixel_rows(pixel_begin: int, pixels: int, width: int) -> tuple[int, int]:
    """(first output row, rows touched) of the row-major pixels ``[pixel_begin, pixel_begin + pixels)`` of a
    ``width``-wide map (``pixels >= 1``)."""
    first = pixel_begin // width
    return first, (pixel_begin + pixels - 1) // width - first + 1


def band_input_rows(window, row_begin: int, rows: int) -> tuple[int, int]:
    """(first input row, row count) the windows of output rows ``[row_begin, row_begin + rows)`` read: rows
    ``iy = oy*S + ky - pad_top`` clipped to the map (``window`` has ``in_height`` or ``height``, ``kernel_h``,
    ``stride``, ``pad_top``)."""
    height = getattr(window, "in_height", None) or window.height
    first = max(0, row_begin * window.stride - window.pad_top)
    end = min(height, (row_begin + rows - 1) * window.stride + window.kernel_h - window.pad_top)
    return first, max(0, end - first)


def window_costs(layer, lanes: int, carried: int = 0) -> WindowCosts:
    """``carried``: stream words of other tensors the layer's tiles receive beyond the ones they store."""
    w = layer.window
    cw = words(w.channels, lanes)
    k = w.height * w.width * cw
    window_words = w.kernel_h * w.kernel_w * cw
    # the joins: a band stores its rows of both operand maps (two store ranges, section 4.2), like a 1x1 window
    join_rows = dict(in_height=w.height, kernel_h=1, stride=1, pad_top=0, join=True)
    if layer.op == "Add":  # op ADD: two issues per (pixel, cw); a row of both maps is 2 * W * CW words
        return WindowCosts(2 * k, cw * lanes, 0, w.out_width * cw * 2, w.out_width * cw, w.out_height, carried,
                           out_width=w.out_width, word_issue=2, row_words=2 * w.width * cw, **join_rows)
    if layer.op == "Concat":  # op CONCAT: one issue per output word; a row of both maps is W * CW words
        return WindowCosts(k, cw * lanes, 0, w.out_width * cw, w.out_width * cw, w.out_height, carried,
                           out_width=w.out_width, row_words=w.width * cw, **join_rows)
    geometry = dict(in_height=w.height, row_words=w.width * cw, kernel_h=w.kernel_h, stride=w.stride,
                    pad_top=w.pad_top)
    if getattr(layer, "broadcasts", None) and layer.broadcasts(lanes):
        # op BCAST (section 4.5): KH*KW*C issues and weight words per output word
        word_issue = w.kernel_h * w.kernel_w * w.channels
        output_words = layer.n_out // lanes
        if getattr(layer, "dense_input", False):  # the graph input packed densely (section 4.5)
            row_bytes = w.width * w.channels
            k = words(w.height * row_bytes, lanes)
            geometry.update(row_words=words(row_bytes, lanes), dense_row_bytes=row_bytes, dense_lanes=lanes)
        return WindowCosts(k, layer.n_out, output_words * word_issue, w.out_width * output_words * word_issue,
                           w.out_width * output_words, w.out_height, carried, 0, w.out_width, **geometry,
                           word_issue=word_issue, word_weights=word_issue)
    if layer.op == "MaxPool":
        n_out, weight_words, row_issue = cw * lanes, 0, w.out_width * window_words
    elif getattr(layer, "is_lane", False):  # op LANE: one weight word per (cw, ky, kx), issued once per pixel
        n_out, weight_words, row_issue = cw * lanes, window_words, w.out_width * window_words
    else:
        n_out = layer.n_out
        weight_words, row_issue = n_out * window_words, w.out_width * n_out * window_words
        return WindowCosts(k, n_out, weight_words, row_issue, w.out_width * words(n_out, lanes), w.out_height,
                           carried, window_words, w.out_width, **geometry, line_buffer_able=True)
    return WindowCosts(k, n_out, weight_words, row_issue, w.out_width * words(n_out, lanes), w.out_height, carried,
                       0, w.out_width, **geometry, word_issue=w.kernel_h * w.kernel_w,
                       word_weights=w.kernel_h * w.kernel_w if weight_words else 0, line_buffer_able=True)


def queue_shortfall_cycles(queued: int, queue_words: int | None) -> int:
    """The estimate's charge for a computing tile whose forward queue is shorter than the ``queued`` words it forwards
    and passes per inference: ``max(0, queued - F)``. The output side sends the queued words of inference ``s + 1``
    only after the results of ``s`` (section 4.4's order), so while COMPUTE of ``s`` runs the queue must take in
    ``s + 1``'s queued words; the input side stalls for those that do not fit, and they follow COMPUTE one a cycle
    instead of overlapping it (section 6, rule 4; the emulator gives the exact interval)."""
    return 0 if queue_words is None else max(0, queued - queue_words)


def window_tile_cycles(costs: WindowCosts, n_pass: int, pixels: int, forward: bool = False,
                       channels: int | None = None, lanes: int = 1, queue_words: int | None = None,
                       pixel_begin: int = 0) -> int:
    """Estimated cycles per inference of a tile computing ``pixels`` output pixels (of ``channels`` output channels of
    a convolution split over channel groups, else all), its busiest side: ``max(K + P, K_f + P + n_pix*N_r,
    I + 2 + shortfall)`` (``K`` = :meth:`WindowCosts.received` of a band from output pixel ``pixel_begin``, counting
    the carried words; ``K_f`` = ``K`` if more tiles of the layer follow (``forward``), else the carried words;
    ``shortfall``: :func:`queue_shortfall_cycles` of ``K_f + P`` with a queue of ``queue_words``)."""
    issue, results = costs.band_work(pixels, channels, lanes)
    forwarded = costs.forwarded(forward, pixel_begin)
    return max(costs.received(pixel_begin) + n_pass, forwarded + n_pass + results,
               issue + 2 + queue_shortfall_cycles(forwarded + n_pass, queue_words))


def ring_overflow_cycles(issue: int, results: int, ring_words: int) -> int:
    """COMPUTE cycles of a tile (``issue`` issue cycles, ``results`` result words per inference) that cannot run
    before its first EMIT of the inference: its result ring takes ``ring_words`` results ahead of the EMITs, then each
    word waits for one (section 4's rule ``a_j >= t(EMIT j - R) + 1``). Results spread evenly over the issue cycles."""
    if results <= ring_words:
        return 0
    return -(-issue * (results - ring_words) // results)


def coupled_ring_cycles(before: tuple[int, int, int, int], overflow: int, results: int, queued: int,
                        queue_words: int, ring_words: int) -> tuple[int, int]:
    """A band tile's place in a run of coupled bands of a windowed layer (:func:`_split_bands`): ``(the run's overflow
    cycles through this tile, the run's cycles per inference)``.

    The tile emits its ``results`` words only after the ``queued`` words it forwards and passes (section 4.4's
    order), the last of them the previous band's results, so its ``overflow`` (:func:`ring_overflow_cycles`) runs after
    the previous band's last EMIT. If its forward queue (``queue_words``) cannot take the ``queued`` words of inference
    ``s + 1`` while it emits ``s``, the last ``queued - queue_words`` of them wait for its last EMIT of ``s`` (section 6
    rule 4): the previous band's last EMITs among them, and the COMPUTE behind them that its ring cannot hold, then
    repeat every inference after this tile's, and so does the run before the previous band if the wait reaches its
    words too. ``before``: the previous band's ``(run, overflow, issue cycles, result words)`` (zeros for none); the
    run takes its overflow cycles, then the tile's own overflow or its EMITs, whichever is longer."""
    run_before, overflow_before, issue_before, results_before = before
    waiting = queued - queue_words
    carried = 0
    if waiting > 0 and results_before:
        blocked = min(waiting, results_before)
        carried = ring_overflow_cycles(-(-issue_before * blocked // results_before), blocked, ring_words)
        if waiting > results_before:
            carried += run_before - overflow_before
    return carried + overflow, carried + max(overflow, results)


def _channel_groups(costs: WindowCosts, groups: int, lanes: int) -> list[int] | None:
    """Output channels per group when a layer's ``N_o`` channels are split into ``groups`` groups of whole
    words (earlier groups take the spare words), or None if there are fewer words than groups."""
    total_words = words(costs.n_out, lanes)
    if groups > total_words:
        return None
    base, extra = divmod(total_words, groups)
    channels = [(base + (g < extra)) * lanes for g in range(groups)]
    channels[-1] -= total_words * lanes - costs.n_out  # the last group holds the ragged rest
    return channels


def line_buffer_rows(costs: WindowCosts) -> int | None:
    """The rows of a line buffer for a tile computing every output row of the layer (section 4 "Streaming rows";
    :attr:`flowtile.tile_config.TileConfig.stream_rows_needed` rounded up to a power of two), or None if the layer
    cannot keep one: not op MAC, MAX or LANE, its last output row not reading the map's last row (the rest would
    arrive after COMPUTE ended), or more rows than the register holds."""
    if not costs.line_buffer_able:
        return None
    spans = [(first, first + rows - 1)
             for first, rows in (band_input_rows(costs, r, 1) for r in range(costs.out_height))]
    if spans[-1][1] != costs.in_height - 1:
        return None
    rows = 1 << (line_buffer_rows_needed(spans) - 1).bit_length()
    return rows if rows <= STREAM_ROWS_MAX else None


#: The largest line buffer: the largest power of two register ``stream_rows`` holds.
STREAM_ROWS_MAX = 1 << (register_bounds("stream_rows")[1].bit_length() - 1)

#: The share of the cycle budget a layer on one tile with a line buffer may take (:func:`_stream_groups`), and a tile
#: of a layer streaming in channel groups. A line buffer holds a few rows, not an inference, so the tile cannot
#: absorb its neighbours' bursts (a chain of bands emits band after band, each band's ring holding its results until
#: the bands before it have gone by; a band chain after it takes the map at its first band's pace): it takes rows at
#: its own pace only while they come in time, and one that is busy every cycle of the period never catches up. The
#: values are measured, not derived: MobileNetV1-1.0's first 12 layers on one 8x8 chip of 64 KiB tiles (section 4
#: "Rows interleaved"): the whole budget allowed, 83162 cycles estimated and 110179 measured (a depthwise layer on one
#: tile at 99.7 % beside the stem's bands); one tile at 0.9, 84994 both; MobileNetV1-0.5's front on 4x6 tiles of 16
#: KiB with a 128-word ring (tests/test_ring_coupling.py): one tile at 0.8, 13286 estimated and 13619 measured (two
#: depthwise layers on one tile at 78 % after band chains), at 0.75 13826 both; groups at 0.9 exact on both.
STREAM_SLACK = 0.75
GROUP_STREAM_SLACK = 0.9


def _stream_groups(costs: WindowCosts, arch: Arch, layer: int, budget: float, max_tiles: float,
                   options: list[list[int]]) -> list[TileSlice] | None:
    """The layer as one band of every output pixel over the fewest channel groups (``options``: channels per group,
    one option per group count) whose tiles each keep a line buffer (:func:`line_buffer_rows`) and take <=
    ``budget`` cycles, the rows interleaved in the streams between them (section 4 "Streaming rows"): each group
    receives the map and the earlier groups' words a pixel, row by row, and forwards the map (but the last) and
    passes them on behind the rows they complete; or None. Only where the stream into the layer is its map alone
    (nothing carried, nothing forwarded past the layer). A group's forward queue keeps what its weights and line
    buffer leave, at least two input rows and two output rows of passed words (the words between a row and the
    pixels it completes); its result ring holds an output row's results: the tile takes its next rows only as COMPUTE
    frees slots, so COMPUTE must not wait for the row's EMITs (which wait for the next tile, and in a group for the
    earlier groups' words of the row); else it couples its input to its output without the slack of a bank."""
    rows = line_buffer_rows(costs)
    if rows is None or costs.carried or costs.stream_front or costs.forwarded(False):
        return None
    lanes, total = arch.lanes, costs.out_height * costs.out_width
    for channels in options:
        if len(channels) > max_tiles:
            return None
        grouped = len(channels) > 1
        before = [sum(words(c, lanes) for c in channels[:g]) for g in range(len(channels))] if grouped else [0]
        slices, start = [], 0
        for g, count in enumerate(channels):
            forward, n_pass = g < len(channels) - 1, total * before[g]
            weights = costs.group_weights(count, lanes) if grouped else costs.weight_words
            queue = arch.sram_words - weights - rows * costs.row_words
            interleaved = forward or n_pass
            reserve = 2 * (costs.row_words + costs.out_width * before[g]) if interleaved else 0
            row_results = costs.out_width * (words(count, lanes) if grouped else costs.result_words_per_pixel)
            if row_results > arch.result_ring_words:
                break   # its rows wait for COMPUTE, which must not wait for the row's EMITs (and the words they follow)
            cycles = window_tile_cycles(costs, n_pass, total, forward, count if grouped else None, lanes)
            if queue < reserve or cycles > budget * (GROUP_STREAM_SLACK if grouped else STREAM_SLACK):
                break
            slices.append(TileSlice(layer, start, count, costs.k, n_pass, forward, 0, total, costs.out_width,
                                    before[g], queue, stream_rows=rows))
            start += count
        else:
            return slices
    return None


def _split_window(costs: WindowCosts, arch: Arch, layer: int, budget: float, max_tiles: float,
                  deep_queues: bool = False, room: tuple[float, int, int] | None = None,
                  streams: bool = False) -> list[TileSlice] | None:
    """Bands of output pixels (x output-channel groups for a convolution, section 4.4) whose tiles each take
    <= ``budget`` cycles, or None (as :func:`_split`): the fewest tiles over every uniform group count and over
    bands that each pick their own group count (each band's tiles are independent of the other bands', so they
    may differ; on a small map with many channels a band's pixel count is coarse and mixing helps).
    ``deep_queues``: every tile's forward queue (the SRAM its weights and banks leave free) also holds all the words
    it forwards and passes per inference, so that it takes a whole inference in while it computes.
    ``room``: as :func:`_split`'s, for the first band (of one tile: all output channels).
    ``streams``: the layer may instead be one band of channel groups streaming rows (:func:`_stream_groups`), taken
    where that needs fewer tiles."""
    lanes = arch.lanes
    max_groups = words(costs.n_out, lanes) if costs.groupable else 1
    options = []
    for groups in range(1, max_groups + 1):
        channels = [costs.n_out] if groups == 1 else _channel_groups(costs, groups, lanes)
        if channels is None:
            break
        if max(channels) <= arch.max_tile_outputs:
            options.append(channels)
    best = None
    for choice in [[channels] for channels in options] + ([options] if len(options) > 1 else []):
        if best is not None and len(choice) == 1 and len(choice[0]) > len(best):
            continue  # a band needs that many tiles: no fewer tiles than the best so far
        found = _split_bands(costs, arch, layer, budget, min(max_tiles, len(best) - 1 if best else max_tiles), choice,
                             deep_queues, room)
        if found is not None:
            best = found
    if streams and room is None:
        streamed = _stream_groups(costs, arch, layer, budget, min(max_tiles, len(best) - 1 if best else max_tiles),
                                  options)
        if streamed is not None:
            best = streamed
    return best


def _split_bands(costs: WindowCosts, arch: Arch, layer: int, budget: float, max_tiles: float,
                 options: list[list[int]], deep_queues: bool = False,
                 room: tuple[float, int, int] | None = None) -> list[TileSlice] | None:
    """Greedy bands of output pixels, each split into one of the channel groupings in ``options`` (``[n_out]``:
    one tile a band): each band takes the most pixels whose tiles fit the budget and the SRAM (both grow with the
    band, so a binary search finds it), with the grouping that gives the most pixels per tile, or, for the last
    band, the fewest tiles that finish the layer. ``room``: the first band is one tile (``[n_out]`` must be among
    the options, else None) of the most pixels that fit the room as a context (:func:`_split`), or None if none.

    Bands whose COMPUTE outruns the result ring run in series (:func:`coupled_ring_cycles`): a band emits its results
    only after the words it passes, the results of the bands before it, so the COMPUTE its ring cannot hold
    (:func:`ring_overflow_cycles`) runs after theirs; and a band whose forward queue cannot take its words of the next
    inference while it emits holds the bands before it back until its last EMIT (section 6 rule 4). Such a run of
    coupled bands repeats every inference, so its overflow cycles, then the last band's EMITs, must fit the budget."""
    lanes = arch.lanes
    pixel_words = costs.result_words_per_pixel
    total = costs.out_height * costs.out_width

    def layout(channels: list[int]):
        grouped = len(channels) > 1
        group_words = [words(c, lanes) for c in channels] if grouped else [pixel_words]
        before = [sum(group_words[:g]) for g in range(len(channels))]
        weights = costs.group_weights(max(channels), lanes) if grouped else costs.weight_words
        return grouped, before, weights

    layouts = [layout(channels) for channels in options]

    def n_pass(begin: int, pixels: int, before: list[int], g: int) -> int:
        return begin * pixel_words + pixels * before[g]

    def queue_words(option: int, begin: int, pixels: int, banks: int = ACTIVATION_BANKS) -> int:
        """The band tile's forward queue: what its weights and ``banks`` leave of the SRAM."""
        return arch.sram_words - layouts[option][2] - banks * costs.stored_words(begin, pixels)

    def overflow(option: int, pixels: int) -> tuple[int, int, int]:
        """(overflow cycles, issue cycles, result words) of the band's tile whose COMPUTE overflows its ring most."""
        channels, (grouped, _, _) = options[option], layouts[option]
        worst = (0, 0, 0)
        for g in range(len(channels)):
            issue, results = costs.band_work(pixels, channels[g] if grouped else None, lanes)
            worst = max(worst, (ring_overflow_cycles(issue, results, arch.result_ring_words), issue, results))
        return worst

    def run_into(option: int, begin: int, pixels: int, last_band: bool,
                 banks: int = ACTIVATION_BANKS) -> tuple[int, int]:
        """:func:`coupled_ring_cycles` of the band after the run of the bands before it."""
        channels, (_, before, _) = options[option], layouts[option]
        queued = costs.forwarded(not (last_band and len(channels) == 1), begin) + n_pass(begin, pixels, before, 0)
        behind, _, results = overflow(option, pixels)
        return coupled_ring_cycles(previous, behind, results, queued, queue_words(option, begin, pixels, banks),
                                   arch.result_ring_words)

    def fits_with(option: int, begin: int, pixels: int, last_band: bool, banks: int) -> bool:
        channels, (grouped, before, weights) = options[option], layouts[option]
        queue = queue_words(option, begin, pixels, banks)
        if run_into(option, begin, pixels, last_band, banks)[1] > budget:
            return False
        for g in range(len(channels)):
            forward = not (last_band and g == len(channels) - 1)
            queued = costs.forwarded(forward, begin) + n_pass(begin, pixels, before, g)
            if queue < min(queued, QUEUE_RESERVE_WORDS) or (deep_queues and queued > queue):
                return False
            if window_tile_cycles(costs, n_pass(begin, pixels, before, g), pixels, forward,
                                  channels[g] if grouped else None, lanes, queue, begin) > budget:
                return False
            if banks == 1:
                issue, _ = costs.band_work(pixels, channels[g] if grouped else None, lanes)
                if costs.alternation_cycles(begin, pixels, issue) > budget:
                    return False
        return True

    def one_bank_able(option: int, begin: int, pixels: int) -> bool:
        """Whether the band's tiles may keep one bank: the next inference then waits for COMPUTE's end, so COMPUTE
        must not wait for this inference's EMITs (which wait for the words the tile passes and forwards and for the
        next tile: the period would take them in too): each tile's results fill at most half its ring (word j waits
        for EMIT j - R, then of two inferences back)."""
        channels, (grouped, _, _) = options[option], layouts[option]
        return costs.single_bank_able and all(
            2 * costs.band_work(pixels, channels[g] if grouped else None, lanes)[1] <= arch.result_ring_words
            for g in range(len(channels)))

    def band_banks(option: int, begin: int, pixels: int, last_band: bool) -> int | None:
        """The band's activation banks: two where they fit, else one where that fits (the SRAM of the second bank
        is worth more than the overlap of RECV and COMPUTE it buys, :func:`one_bank_able`), else None."""
        for banks in (ACTIVATION_BANKS, 1) if one_bank_able(option, begin, pixels) else (ACTIVATION_BANKS,):
            if fits_with(option, begin, pixels, last_band, banks):
                return banks
        return None

    def band_fits(option: int, begin: int, pixels: int, last_band: bool) -> bool:
        return band_banks(option, begin, pixels, last_band) is not None

    def most_pixels(option: int, begin: int, limit: int) -> int:
        lo, hi = 0, limit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if band_fits(option, begin, mid, False):
                lo = mid
            else:
                hi = mid - 1
        return lo

    bands: list[tuple[int, int, int]] = []  # (first pixel, pixels, option)
    previous = (0, 0, 0, 0)   # the previous band's (run, overflow, issue cycles, result words)
    tiles = 0
    begin = 0
    if room is not None:
        single = next((o for o, channels in enumerate(options) if len(channels) == 1), None)
        if single is None:
            return None
        first = _first_band_in(room, costs, layouts[single][2], lanes)
        run = run_into(single, 0, first, first >= total) if first else None
        if run is None or run[1] > room[0]:
            return None
        bands.append((0, first, single, ACTIVATION_BANKS))
        previous = (run[0], *overflow(single, first))
        tiles, begin = 1, first
    while begin < total:
        remaining = total - begin
        finishing = [o for o in range(len(options)) if band_fits(o, begin, remaining, True)]
        takes = [most_pixels(o, begin, remaining - 1) for o in range(len(options))]
        option = max(range(len(options)), key=lambda o: (takes[o] / len(options[o]), -len(options[o])))
        take = takes[option]
        # finish here unless bands at the best pixels-per-tile rate would cover the rest with fewer tiles
        if finishing and (take <= 0 or min(len(options[o]) for o in finishing)
                          <= -(-remaining * len(options[option]) // take)):
            option = min(finishing, key=lambda o: len(options[o]))
            take = remaining
        if take <= 0:
            return None
        tiles += len(options[option])
        if tiles > max_tiles:
            return None
        banks = band_banks(option, begin, take, begin + take >= total)
        bands.append((begin, take, option, banks))
        previous = (run_into(option, begin, take, begin + take >= total, banks)[0], *overflow(option, take))
        begin += take
    slices = []
    for b, (begin, pixels, option, banks) in enumerate(bands):
        channels, (grouped, before, _) = options[option], layouts[option]
        starts = [sum(channels[:g]) for g in range(len(channels))]
        for g in range(len(channels)):
            last = b == len(bands) - 1 and g == len(channels) - 1
            slices.append(TileSlice(layer, starts[g], channels[g], costs.k, n_pass(begin, pixels, before, g), not last,
                                    begin, pixels, costs.out_width, before[g] if grouped else 0,
                                    queue_words(option, begin, pixels, banks), banks == 1))
    return slices


def _first_band_in(room: tuple[float, int, int], costs: WindowCosts, weights: int, lanes: int) -> int:
    """Pixels of a windowed layer's first band, on one tile of all its output channels (``weights`` words), as large
    as fits ``room`` as a context (:func:`_split`): the whole map if it fits, else the most pixels (0: none)."""
    total = costs.out_height * costs.out_width

    def fits(pixels: int) -> bool:
        # as a context the band's queue holds all it queues (section 4.6): no shortfall, its SRAM counts it
        forward = pixels < total
        data = weights + ACTIVATION_BANKS * costs.stored_words(0, pixels)
        return (window_tile_cycles(costs, 0, pixels, forward, None, lanes, None, 0) <= room[0]
                and data + costs.forwarded(forward, 0) <= room[1] and costs.n_out <= room[2])
    if fits(total):
        return total
    lo, hi = 0, total - 1   # cycles and SRAM grow with the band: the most pixels that fit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def _check_window_fits(layer, costs: WindowCosts, arch: Arch) -> None:
    """A tile must hold the smallest share of the layer: all its weights and output channels, or for a layer that
    splits over output-channel groups (a convolution, a pool, a lane layer, an Add; section 4.4) one word of them;
    and, twice (two banks), the input rows of one output row (a join: both operand maps)."""
    lanes = arch.lanes
    what = f"{_describe_window(layer)}"
    groupable = costs.groupable and costs.n_out > lanes
    least_channels = lanes if groupable else costs.n_out
    least_weights = costs.group_weights(lanes, lanes) if groupable else costs.weight_words
    least_stored = max(costs.stored_words(row * costs.out_width, 1) for row in range(costs.out_height))
    # one bank where a tile of one pixel's results of its least channels fills at most half the ring (_split_bands)
    least_results = words(least_channels, lanes) if groupable else costs.result_words_per_pixel
    banks = 1 if costs.single_bank_able and 2 * least_results <= arch.result_ring_words else ACTIVATION_BANKS
    need = (least_weights + banks * least_stored + QUEUE_RESERVE_WORDS) * lanes
    if need > arch.sram_bytes:
        held = (f"the weights of at least {lanes} output channels ({least_weights * lanes} bytes)"
                if groupable and least_weights else f"all its weights ({costs.weight_words * lanes} bytes)")
        stored = ("one row of both operand maps" if costs.join
                  else f"the input rows of one output row ({least_stored // costs.row_words} rows)")
        times = (f"once (one activation bank of {least_stored * lanes} bytes)" if banks == 1 else
                 f"twice ({ACTIVATION_BANKS} banks of {least_stored * lanes} bytes)")
        raise CompileError(
            f"{what}: every tile of it holds {held} and {stored} {times} and a forward queue of at least "
            f"{QUEUE_RESERVE_WORDS} words: {need} bytes, a tile has {arch.sram_bytes} (arch field 'sram_bytes')")
    if least_channels > arch.max_tile_outputs:
        raise CompileError(f"{what}: {costs.n_out} output channels exceed arch field 'max_tile_outputs' = "
                           f"{arch.max_tile_outputs}")


def _describe_window(layer) -> str:
    w = layer.window
    return (f"layer '{layer.name}' ({layer.op}, {w.channels}x{w.height}x{w.width} -> "
            f"{layer.n_out}x{w.out_height}x{w.out_width})")


#: SRAM words a tile that forwards or passes words keeps free for its forward queue (section 4: the queue is the
#: SRAM the weights and banks leave free), at least: two, so that a stream passes through at one word a cycle (a
#: queue of one word halves the rate, section 6 rule 1), or one if it queues one word. Everything else the weights
#: and banks leave free deepens the queue (compiler.emit). Dense tiles and the fit checks keep two always.
QUEUE_RESERVE_WORDS = 2


def _tile_capacity(k: int, arch: Arch) -> int:
    """Most outputs one tile can hold for a layer of ``k`` input words: SRAM (weights, two activation banks and
    :data:`QUEUE_RESERVE_WORDS` of queue) and parameter table."""
    return min(arch.max_tile_outputs, (arch.sram_words - QUEUE_RESERVE_WORDS - ACTIVATION_BANKS * k) // k)


def _dense_cycles(k: int, carried: int, n_pass: int, n_out: int, lanes: int, forwarded: int) -> int:
    """:func:`tile_cycles` of a dense tile that also receives ``carried`` stream words it does not store (the
    other inferences' tensors of a replicated network, section 12)."""
    return max(tile_cycles(k, n_pass, n_out, lanes, forwarded), k + carried + n_pass)


def _split(n_out: int, k: int, arch: Arch, layer: int, budget: float, max_tiles: float,
           carried: int = 0, room: tuple[float, int, int] | None = None) -> list[TileSlice] | None:
    """Greedy split of one layer into slices whose tiles each take <= ``budget`` cycles, or None. ``carried``:
    stream words the tiles receive and forward without storing (the layer's last tile forwards them).

    Taking as many outputs as allowed on each tile is optimal: a fuller prefix only raises the pass
    count of later tiles by one word per ``lanes`` outputs it takes off them, which saves them ``k``
    weight words of compute per output.

    ``room``: ``(cycles, SRAM words, parameter rows)`` left on the tile the previous layer's last slice opened, which
    takes the first slice as one more context (section 4.6): the first slice is then the most outputs that fit it
    (:func:`_first_slice_in`), and the rest split as above.
    """
    lanes = arch.lanes
    capacity = _tile_capacity(k, arch)
    slices: list[TileSlice] = []
    start = n_pass = 0
    if room is not None:
        first = _first_slice_in(room, n_out, k, arch, layer, carried)
        if first is None:
            return None
        slices.append(first)
        start, n_pass = first.n_out, words(first.n_out, lanes)
    while start < n_out:
        if len(slices) >= max_tiles:
            return None
        remaining = n_out - start
        if remaining <= capacity and _dense_cycles(k, carried, n_pass, remaining, lanes, carried) <= budget:
            take = remaining  # the layer's last tile: any size
        else:  # not the last tile: it forwards the k input words
            chunks = min(capacity // lanes, (remaining - 1) // lanes)
            if budget != float("inf"):
                if k + carried + n_pass > budget:
                    return None
                chunks = min(chunks, int((budget - 2) // (lanes * k + 1)), int(budget - k - carried - n_pass))
            if chunks <= 0:
                return None
            take = chunks * lanes
        slices.append(TileSlice(layer, start, take, k, n_pass, forward=False))
        start += take
        n_pass += words(take, lanes)
    return [TileSlice(s.layer, s.start, s.n_out, s.n_in_words, s.n_pass, forward=i < len(slices) - 1)
            for i, s in enumerate(slices)]


def _first_slice_in(room: tuple[float, int, int], n_out: int, k: int, arch: Arch, layer: int,
                    carried: int) -> TileSlice | None:
    """The first slice of a dense layer as large as fits ``room`` (cycles, SRAM words, parameter rows as a context,
    :func:`_slice_cycles` and :func:`_slice_needs`): the whole layer if it fits, else the most whole words of outputs
    (it then forwards the input), or None if not even one word fits."""
    cycles, sram, rows = room
    lanes = arch.lanes

    def fits(s: TileSlice) -> bool:
        need_sram, need_rows = _slice_needs(s, None, carried, arch)
        return _slice_cycles(s, lanes, None, carried) <= cycles and need_sram <= sram and need_rows <= rows

    whole = TileSlice(layer, 0, n_out, k, 0, forward=False)
    if n_out <= _tile_capacity(k, arch) and fits(whole):
        return whole
    # every bound grows with the slice: the most chunks whose slice fits (compute, k words each output, binds first)
    chunks = min((n_out - 1) // lanes, _tile_capacity(k, arch) // lanes, int(max(0, cycles - 2) // (lanes * k)))
    while chunks > 0 and not fits(TileSlice(layer, 0, chunks * lanes, k, 0, forward=True)):
        chunks -= 1
    return TileSlice(layer, 0, chunks * lanes, k, 0, forward=True) if chunks > 0 else None


def _slice_channels(s: TileSlice, costs: WindowCosts) -> int | None:
    """The output channels of a windowed slice's channel group (section 4.4), or None if it computes them all."""
    return s.n_out if costs.channel_words and s.n_out != costs.n_out else None


def _slice_issue(s: TileSlice, costs: WindowCosts, lanes: int) -> int:
    """A windowed slice's COMPUTE issue cycles per inference (:meth:`WindowCosts.band_work`)."""
    return costs.band_work(s.pixels, _slice_channels(s, costs), lanes)[0]


def _slice_cycles(s: TileSlice, lanes: int, costs: WindowCosts | None = None, carried: int = 0) -> int:
    if costs is not None:
        # rows interleaved (a line buffer's groups): the queue holds rows, not an inference ahead (no shortfall)
        cycles = window_tile_cycles(costs, s.n_pass, s.pixels, s.forward, _slice_channels(s, costs), lanes,
                                    None if s.stream_rows else s.queue_words, s.pixel_begin)
        if s.single_bank:
            cycles = max(cycles, costs.alternation_cycles(s.pixel_begin, s.pixels, _slice_issue(s, costs, lanes)))
        return cycles
    return _dense_cycles(s.n_in_words, carried, s.n_pass, s.n_out, lanes,
                         s.n_in_words + carried if s.forward else carried)


def _slice_shortfall(s: TileSlice, costs: WindowCosts | None, lanes: int) -> int:
    """:func:`queue_shortfall_cycles` of a windowed slice (dense slices: 0, their queues are not sized here)."""
    if costs is None or s.stream_rows:
        return 0
    return queue_shortfall_cycles(costs.forwarded(s.forward, s.pixel_begin) + s.n_pass, s.queue_words)


def _slowest(slices: list[TileSlice], lanes: int, costs: WindowCosts | None = None, carried: int = 0) -> int:
    return max(_slice_cycles(s, lanes, costs, carried) for s in slices)


def _describe(layer: _Layer) -> str:
    return f"layer '{layer.name}' ({layer.op}, {layer.n_in} -> {layer.n_out})"


def _check_one_tile_fits(layer: _Layer, k: int, arch: Arch) -> None:
    """A tile must hold one output (or, for a layer split over tiles, one flit of outputs) plus the input."""
    lanes, capacity = arch.lanes, _tile_capacity(k, arch)
    if capacity >= 1 and (layer.n_out <= capacity or capacity >= lanes):
        return
    outputs = 1 if capacity < 1 else lanes
    raise CompileError(
        f"{_describe(layer)}: a tile must hold at least {outputs} output(s), which need "
        f"{(outputs + ACTIVATION_BANKS) * k * lanes} bytes of SRAM ({k}-word weight rows plus two {k * lanes}-byte "
        f"input banks) "
        f"but holds at most {max(capacity, 0)}: a tile has {arch.sram_bytes} bytes (arch field 'sram_bytes') "
        f"and {arch.max_tile_outputs} parameter entries (arch field 'max_tile_outputs')")


def _does_not_fit(layers: Sequence[_Layer], ks: list[int], counts: list[int], arch: Arch, grid: str,
                  packed: int | None = None) -> CompileError:
    """The error for a model whose layers need more tiles than the grid has, naming the largest layer (``packed``:
    the tiles they need with several slices a tile, section 4.6)."""
    lanes = arch.lanes
    worst = max(range(len(layers)), key=lambda i: counts[i])
    layer, k = layers[worst], ks[worst]
    per_tile = _tile_capacity(k, arch)
    limit = "arch field 'max_tile_outputs'" if per_tile == arch.max_tile_outputs else "arch field 'sram_bytes'"
    split_note = (f" ({per_tile // lanes * lanes} in a tile that is not the layer's last: those hold whole "
                  f"{lanes}-lane flits)" if per_tile % lanes and layer.n_out > per_tile else "")
    total = sum(l.n_out * kk * lanes for l, kk in zip(layers, ks))
    needed = (f"{sum(counts)} tiles" if packed is None else
              f"{packed} tiles with up to {arch.tile_contexts} slices a tile (arch field 'tile_contexts')")
    return CompileError(
        f"model does not fit {grid}: its layers need {needed}, there are {_tiles_there(arch)}; "
        f"{_describe(layer)} alone needs {counts[worst]}: its weights need {layer.n_out * k * lanes} bytes "
        f"(rows padded to {k} words of {lanes} bytes) and each of its tiles also buffers the {k * lanes}-byte "
        f"input twice (two banks), so a {arch.sram_bytes}-byte tile holds at most {per_tile} outputs ({limit}){split_note}; "
        f"all weights need {total} bytes, the {'grid has' if arch.chips == 1 else 'chips have'} "
        f"{arch.system_tiles * arch.sram_bytes} bytes of SRAM")


def _tiles_there(arch: Arch) -> str:
    """The tiles there are, for messages: ``16``, or ``32 (16 a chip)``."""
    return str(arch.n_tiles) if arch.chips == 1 else f"{arch.system_tiles} ({arch.n_tiles} a chip)"


def _input_words(layer, lanes: int) -> int:
    """Words a tile of ``layer`` stores per inference (both operand maps for an Add)."""
    if getattr(layer, "window", None) is not None:
        return window_costs(layer, lanes).k
    input_map = getattr(layer, "input_map", None)
    if input_map is not None:  # a flattened feature map travels pixel-major, CW words a pixel
        channels, height, width = input_map
        return height * width * words(channels, lanes)
    return words(layer.n_in, lanes)


def assign_tiles(layers: Sequence[_Layer], arch: Arch, carried: Sequence[int] | None = None,
                 stream_words: Sequence[int] | None = None) -> list[list[TileSlice]]:
    """Slices per layer, in chain order (layer 0 starts at chain position 0); CompileError if it cannot fit.

    ``carried[i]``: stream words layer ``i``'s tiles receive and forward without storing (the other tensors
    of a residual block, section 4.2, or other inferences' of a replicated network, section 12). On several chips
    (``arch.chips > 1``) the slices are those of :func:`place_layers` (which needs ``stream_words``).
    """
    return place_layers(layers, arch, carried, stream_words).splits


@dataclass(frozen=True)
class Placement:
    """Layers over the system chain (``arch.chips`` chips in a line, section 12): each layer's slices, on consecutive
    tiles in model order, and where each chip starts. ``starts[k]`` is the index, in the slices of all layers in
    chain order, of chip ``k``'s first slice: chip ``k`` computes slices ``starts[k] .. starts[k + 1] - 1`` on its
    chain positions ``0, 1, ...`` and passes its stream through its remaining tiles (pads, so that the next chip
    starts at a narrow cut). ``link_words[k]``: flits crossing link ``k`` (chip ``k`` -> ``k + 1``) per inference;
    ``link_segments[k]``: its lane table (the lanes those flits carry, the rest is channel padding). In a ring
    (``arch.chip_topology = "ring"``) both have one more entry, the return link ``chips - 1``: the output stream,
    from the last chip to the host at chip 0."""

    splits: list[list[TileSlice]]
    starts: tuple[int, ...] = (0,)
    link_words: tuple[int, ...] = ()
    link_segments: tuple[tuple[LaneSegment, ...], ...] = ()
    #: consecutive slices that share a tile as its contexts (docs/architecture.md section 4.6): the sizes of the runs,
    #: over all slices in chain order (a run never spans two chips); empty: every slice a tile of its own
    groups: tuple[int, ...] = ()

    def places(self, arch: Arch) -> list[list[tuple[int, int]]]:
        """``(system chain position, context)`` of every slice, per layer."""
        total = sum(len(s) for s in self.splits)
        groups = self.groups or (1,) * total
        bounds = list(self.starts) + [total]
        flat, index, chip = [], 0, 0
        position = 0
        for size in groups:
            while chip + 1 < len(self.starts) and index >= bounds[chip + 1]:
                chip += 1
                position = chip * arch.n_tiles
            assert index + size <= bounds[chip + 1], "a group of contexts spans two chips"
            flat += [(position, context) for context in range(size)]
            index += size
            position += 1
        result, index = [], 0
        for slices in self.splits:
            result.append(flat[index:index + len(slices)])
            index += len(slices)
        return result

    def positions(self, arch: Arch) -> list[list[int]]:
        """System chain position of every slice, per layer (slices sharing a tile as contexts share it)."""
        return [[position for position, _ in layer] for layer in self.places(arch)]


@functools.lru_cache(maxsize=4096)
def link_cycles(arch: Arch, flits: int, segments: tuple[LaneSegment, ...] = ()) -> int:
    """Estimated cycles per inference a link of ``arch`` is busy carrying ``flits`` flits per inference with lane
    table ``segments`` (its stage time in the pipeline; docs/architecture.md section 12, ``flowtile.link_format``):
    its frames (dense: a frame holds ``frame_flits * L`` carried lanes; frames never span inferences, the last may
    be partial), one every ``frame_beats`` cycles, unless the credit or go-back-N window cannot cover a frame's
    round trip (then one window per round trip); and the sender takes at most one flit a cycle plus a cycle to seal
    each frame. The wire latency adds delay, not cycles per inference, as long as the windows cover it."""
    frame_period = _link_frames(arch)[1]
    frames = LinkGeometry(arch).frames(flits, segments)
    return max(frames * frame_period, flits + frames)


@functools.lru_cache(maxsize=64)
def _link_frames(arch: Arch) -> tuple[int, int]:
    """(flits a frame, estimated cycles between frames in steady state) of a link of ``arch``."""
    geometry = LinkGeometry(arch)
    wait = geometry.message_period  # the next return message starts within this many cycles
    credit_trip = geometry.accept_delay + geometry.frame_flits + 1 + wait + geometry.message_delay
    ack_trip = 1 + geometry.accept_delay + 1 + wait + geometry.message_delay
    return geometry.frame_flits, max(geometry.frame_beats, -(-credit_trip // geometry.credit_frames),
                                     -(-ack_trip // geometry.replay_frames))


def _system_name(arch: Arch) -> str:
    if arch.chips == 1:
        return f"the {arch.rows}x{arch.cols} grid (arch fields 'rows', 'cols')"
    return f"{arch.chips} chips of {arch.rows}x{arch.cols} tiles (arch fields 'chips', 'rows', 'cols')"


def _slice_out(s: TileSlice, stream_in: tuple, stream_next: tuple, costs: WindowCosts | None,
               lanes: int) -> tuple[int, tuple]:
    """Flits a tile computing slice ``s`` emits per inference and their tensors ``(pixels, channels)`` (what a link
    behind it carries): the layer's last tile the stream into the next layer, the others the whole stream, then the
    passed words and their results (counted as words whose every lane is carried)."""
    if not s.forward:
        return stream_next
    results = words(s.n_out, lanes) * (s.pixels if costs is not None else 1)
    return stream_in[0] + s.n_pass + results, stream_in[1] + ((s.n_pass + results, lanes),)


def _cut_streams(splits: list[list[TileSlice]], streams: Sequence[tuple], costs, lanes: int,
                 turns: Sequence[int]) -> list[tuple]:
    """``(flits, tensors)`` per (program) inference crossing a cut before slice ``c`` of the chain (``c = 0``: the
    host input; ``c`` = all slices: the output), for every ``c``; ``streams[i]``: ``(flits, tensors)`` into each turn
    of layer ``i``, then the output of a turn of the last layer; ``turns[i]``: layer ``i``'s turns (section 12), whose
    streams follow one another."""
    def repeated(stream: tuple, times: int) -> tuple:
        return stream[0] * times, stream[1] * times

    cut = [repeated(streams[0], turns[0])]
    for i, slices in enumerate(splits):
        feeds = turns[i + 1] if i + 1 < len(turns) else turns[i]   # a layer's last tile: the stream the next reads
        cut += [repeated(_slice_out(s, streams[i], streams[i + 1], costs[i], lanes),
                         turns[i] if s.forward else feeds) for s in slices]
    return cut


def _refuse_cuts_before_linked_single_banks(cycles: list[int], flits: list[int], found: list[list[TileSlice]],
                                            costs: Sequence[WindowCosts | None], turns: Sequence[int], arch: Arch,
                                            budget: float) -> list[int]:
    """``cycles`` (the link time of a chip boundary before each slice, carrying ``flits``) with the boundaries
    refused (:data:`_NO_CUT`) before which the layer that would begin the next chip has a tile of one activation bank
    that could not keep the ``budget`` with its input at the link's pace. Such a tile receives an inference only after its COMPUTE has ended
    (section 4, one bank), so its RECV and COMPUTE alternate; right behind a link its RECV takes the link's cycles a
    flit for every word beyond what the receiver buffers (``link_credit_frames`` frames) while it computed, not one a
    cycle (MobileNetV1-1.0 on 4 chips at 1/64 with the 3x3x1024 pointwise layer first on chip 3: estimated 56450 cycles
    a turn, measured 123849 = its COMPUTE plus the 1152-flit map at 66.75 cycles a flit less the buffered frames)."""
    buffered = arch.link_credit_frames * arch.link_frame_flits
    cycles = list(cycles)
    start = 0
    for layer, slices in enumerate(found):
        for offset in range(len(slices)):
            # a chip beginning at this slice begins with the layer's slices from here on
            if start + offset and costs[layer] is not None and cycles[start + offset] < _NO_CUT:
                per_flit = cycles[start + offset] / max(flits[start + offset], 1)
                if any(turns[layer] * _linked_alternation(s, costs[layer], arch.lanes, buffered, per_flit) > budget
                       for s in slices[offset:] if s.single_bank):
                    cycles[start + offset] = _NO_CUT
        start += len(slices)
    return cycles


def _linked_alternation(s: TileSlice, costs: WindowCosts, lanes: int, buffered: int, per_flit: float) -> float:
    """A one-bank slice's cycles per inference with its input at a link's ``per_flit`` cycles beyond the ``buffered``
    words: COMPUTE, then its RECV words up to the last stored one at the link's pace
    (:meth:`WindowCosts.alternation_cycles` at one word a cycle)."""
    until = costs.store_until(s.pixel_begin, s.pixels)
    return max(costs.alternation_cycles(s.pixel_begin, s.pixels, _slice_issue(s, costs, lanes)),
               _slice_issue(s, costs, lanes) + 2 + (until - buffered) * per_flit)


def _cut_chips(cut_cycles: list[int], arch: Arch, limit: float,
               reach: Callable[[int], int] | None = None) -> tuple[int, ...] | None:
    """Where each chip starts (:attr:`Placement.starts`) so that every link takes <= ``limit`` cycles per inference,
    or None. Each chip takes the most slices it can, up to the last cut within the limit: a chip that starts later
    can finish no fewer slices (the cut it starts at is itself one it may end at), so the greedy fits whenever any
    placement of these slices does. ``reach(begin)``: one past the last slice a chip starting at slice ``begin``
    holds (default ``begin + n_tiles``; with contexts, :func:`_reach`)."""
    total, n = len(cut_cycles) - 1, arch.n_tiles
    reach = reach or (lambda begin: begin + n)
    starts = [0]
    for _ in range(arch.chips - 1):
        begin = starts[-1]
        end = min(reach(begin), total)
        while end >= begin and (cut_cycles[end] > limit or cut_cycles[end] >= _NO_CUT):
            end -= 1
        if end < begin:
            return None
        starts.append(end)
    return tuple(starts) if reach(starts[-1]) >= total else None


def _slice_needs(s: TileSlice, costs: WindowCosts | None, carried: int, arch: Arch) -> tuple[int, int]:
    """``(SRAM words, parameter rows)`` a slice needs as one context of a tile (section 4.6): its weights, its two
    activation banks and a forward queue of every word it forwards and passes per inference (a context then never
    waits on its queue, and a later context must have that much, else the loop-back FIFO could deadlock)."""
    if s.stream_rows:   # a line buffer serves a tile of one context (Program.validate): the whole tile
        return arch.sram_words, s.n_out
    if costs is not None:
        data = arch.sram_words - s.queue_words if s.queue_words is not None else None
        if data is None:
            weights = (costs.weight_words if _slice_channels(s, costs) is None
                       else costs.group_weights(s.n_out, arch.lanes))
            data = weights + s.banks * costs.stored_words(s.pixel_begin, s.pixels)
        queued = costs.forwarded(s.forward, s.pixel_begin) + s.n_pass
    else:
        k = s.n_in_words
        data = s.n_out * k + ACTIVATION_BANKS * k
        queued = (k + carried if s.forward else carried) + s.n_pass
    return data + queued, s.n_out


def _slice_lead(s: TileSlice, costs: WindowCosts | None, carried: int, lanes: int) -> int:
    """A slice's COMPUTE cycles plus the stream words it receives (at most) before its last stored word: a bound on
    the period of a tile whose context 0 it is, when the tile has more contexts (section 4.6,
    :func:`compiler.emit.tile_program_estimate`): context 1's input is context 0's output, whose last word follows
    context 0's COMPUTE, and the input side serves context 0's next inference only after context 1's turn."""
    if costs is not None:
        return _slice_issue(s, costs, lanes) + 2 + costs.received(s.pixel_begin)
    return s.n_out * s.n_in_words + 2 + s.n_in_words + carried


def _run_cycles(run: Sequence[tuple[int, int, int, int]]) -> int:
    """A run of contexts' cycles per inference: the sum of theirs (the sides serve them in turn), and with several at
    least its first slice's lead (:func:`_slice_lead`)."""
    total = sum(need[0] for need in run)
    return max(total, run[0][3]) if len(run) > 1 else total


def _group_totals(needs: Sequence[tuple[int, int, int, int]], arch: Arch,
                  budget: float) -> list[tuple[int, int, int]]:
    """:func:`group_contexts`' runs as their ``(cycles, SRAM words, parameter rows)`` (:func:`_run_cycles`, sums)."""
    totals, index = [], 0
    for size in group_contexts(needs, arch, budget):
        run = needs[index:index + size]
        totals.append((_run_cycles(run), sum(need[1] for need in run), sum(need[2] for need in run)))
        index += size
    return totals


def group_contexts(needs: Sequence[tuple[int, int, int, int]], arch: Arch, budget: float) -> list[int]:
    """Runs of consecutive slices that share a tile as its contexts (section 4.6), greedily: a run takes the next
    slice while it has fewer than ``tile_contexts`` slices, its cycles (:func:`_run_cycles`: the summed cycles, the
    sides serving the contexts in turn, and at least its first slice's lead) stay within ``budget`` and its SRAM
    words and parameter rows within ``sram_words`` and ``max_tile_outputs``. ``needs``: per slice ``(cycles, SRAM
    words, parameter rows, lead)``. Greedy runs are as few as any: every constraint is a sum over the run or fixed by
    its first slice, so a run that takes a slice never forces more runs later."""
    sizes: list[int] = []
    run = None
    for cycles, sram, rows, lead in needs:
        if (run is not None and run[0] < arch.tile_contexts and max(run[1] + cycles, run[4]) <= budget
                and run[2] + sram <= arch.sram_words and run[3] + rows <= arch.max_tile_outputs):
            run = [run[0] + 1, run[1] + cycles, run[2] + sram, run[3] + rows, run[4]]
        else:
            if run is not None:
                sizes.append(run[0])
            run = [1, cycles, sram, rows, lead]
    if run is not None:
        sizes.append(run[0])
    return sizes


#: The link time of a cut the placement must not take.
_NO_CUT = 1 << 62


def place_layers(layers: Sequence[_Layer], arch: Arch, carried: Sequence[int] | None = None,
                 stream_words: Sequence[int] | None = None,
                 stream_tensors: Sequence[Sequence[tuple[int, int]]] | None = None,
                 stream_fronts: Sequence[tuple[int, int]] | None = None,
                 last_forwarded: Sequence[int] | None = None, turns: Sequence[int] | None = None) -> Placement:
    """Slices per layer and their places on the system chain; CompileError if the model cannot fit.

    ``turns``: per layer, the inferences its tiles run per program inference (section 12, a stage the copies of a
    replicated program share; default 1 each): such a layer's slices are split within the budget over its turns and
    cost their turns' cycles, its streams (``stream_words``, ``stream_tensors``: per turn) cross a cut once per turn,
    and no tile holds several contexts when a layer has turns.

    ``stream_words``: flits of the stream into each layer per inference, then those of the output (what a cut
    before each layer and after the last carries; :func:`compiler.emit.plan_streams`); needed on several chips.
    ``stream_tensors``: the tensors ``(pixels, channels)`` of those streams (``StreamPlan.tensors``), from which a
    link's lane table follows (dense frames carry only the channels, not their padding lanes); default: every lane
    of every word carried.
    ``stream_fronts``: per layer ``(stream_front, stream_keep)`` (:class:`WindowCosts`): the bands of a windowed layer
    (not a join) are costed with the stream they receive when each tile forwards only what the later ones store
    (:func:`compiler.emit.forward_only_what_follows`, which the emitter applies to a layer on one chip); default:
    every tile with the whole stream.
    ``last_forwarded``: per layer, the words its last tile forwards (``StreamPlan.forward``); default: the carried
    words. It differs where a later layer reads the layer's input too (a residual block's fork): the last tile then
    forwards that input as well, which its output side and its queue must hold (windowed layers; a dense layer's
    input is never read twice, forks of vectors are not supported).

    One chip: the smallest per-tile cycle budget at which every layer's fewest tiles within it (its greedy split)
    add up to the grid (binary search). Several chips: the smallest budget ``B`` at which those slices can be cut
    into the chips' chains with every link's stage time (:func:`link_cycles` of the flits crossing it) <= ``B`` too;
    a chip may end at any cut (between layers, or between two tiles of a split layer, whose link then carries the
    whole stream there) and passes its stream through its remaining tiles. Then, at that budget, the lowest link
    limit at which the slices still fit, so that among equally fast placements the cuts sit where the stream is
    narrowest.

    A ring (``arch.chip_topology = "ring"``) is placed as a line: its return link (the last chip -> the host at chip
    0) carries the output stream whatever the placement, so it is one more stage of fixed time
    (:attr:`Placement.link_words` and ``link_segments`` name it last) that no cut can shorten.
    """
    lanes, n_tiles = arch.lanes, arch.system_tiles
    grid = _system_name(arch)
    if arch.chips > 1:
        if stream_words is None or len(stream_words) != len(layers) + 1:
            raise CompileError("internal: placing layers on several chips needs the stream words before every layer "
                               "and of the output")
    carried = list(carried) if carried is not None else [0] * len(layers)
    turns = list(turns) if turns is not None else [1] * len(layers)
    ks = [_input_words(layer, lanes) for layer in layers]
    costs = [window_costs(layer, lanes, extra) if getattr(layer, "window", None) is not None else None
             for layer, extra in zip(layers, carried)]
    if stream_fronts is not None:  # the bands' tiles receive the stream from their first stored word on
        costs = [dataclasses.replace(c, stream_front=front, stream_keep=keep) if c is not None and not c.join else c
                 for c, (front, keep) in zip(costs, stream_fronts)]
    if last_forwarded is not None:
        costs = [dataclasses.replace(c, last_forwarded=words_out) if c is not None else c
                 for c, words_out in zip(costs, last_forwarded)]
    if len(layers) > n_tiles * arch.tile_contexts:
        total = sum((c.weight_words if c else layer.n_out * k) * lanes for layer, k, c in zip(layers, ks, costs))
        holds = (f"every layer needs at least one" if arch.tile_contexts == 1 else
                 f"a tile holds at most {arch.tile_contexts} layers (arch field 'tile_contexts')")
        raise CompileError(f"the model has {len(layers)} layers but {grid} {'has' if arch.chips == 1 else 'have'} "
                           f"{n_tiles} tiles, and {holds}; its weights need {total} bytes, the "
                           f"{'grid has' if arch.chips == 1 else 'chips have'} {n_tiles * arch.sram_bytes} bytes "
                           f"of SRAM")
    for layer, k, c in zip(layers, ks, costs):
        if c is not None:
            _check_window_fits(layer, c, arch)
        else:
            _check_one_tile_fits(layer, k, arch)

    if arch.chips > 1:
        if stream_tensors is None:
            stream_tensors = [((n, lanes),) for n in stream_words]
        streams = [(n, tuple(tensors)) for n, tensors in zip(stream_words, stream_tensors)]

    def cut_tables(found: list[list[TileSlice]]) -> list[tuple[int, tuple]]:
        """Per cut: flits per inference and lane table."""
        tables = []
        for flits, tensors in _cut_streams(found, streams, costs, lanes, turns):
            segments, total = lane_segments_of_tensors(tensors, lanes)
            assert total == flits, f"stream tensors make {total} flits, the stream has {flits}"
            tables.append((flits, segments))
        return tables

    def cut_cycles(found: list[list[TileSlice]], tables: list[tuple[int, tuple]] | None = None) -> list[int]:
        """Per cut: the link's cycles (``tables``: :func:`cut_tables` of ``found``, if known)."""
        if arch.chips == 1:
            return [0] * (sum(len(s) for s in found) + 1)
        cycles = [link_cycles(arch, n, segments) for n, segments in (tables or cut_tables(found))]
        at = 0
        for slices in found:   # no chip boundary inside a layer streaming rows: its streams interleave two tensors
            if slices[0].stream_rows:
                cycles[at + 1:at + len(slices)] = [_NO_CUT] * (len(slices) - 1)
            at += len(slices)
        return cycles

    contexts = arch.tile_contexts > 1 and max(turns) == 1

    def slowest(i: int, slices: list[TileSlice]) -> int:
        """Layer ``i``'s slowest slice: its cycles per program inference, over the layer's turns."""
        return turns[i] * _slowest(slices, lanes, costs[i], carried[i])

    def needs_of(found: list[list[TileSlice]]) -> list[tuple[int, int, int, int]]:
        """Per slice in chain order: (cycles, SRAM words, parameter rows, lead) as a context (section 4.6)."""
        return [(_slice_cycles(s, lanes, costs[i], carried[i]), *_slice_needs(s, costs[i], carried[i], arch),
                 _slice_lead(s, costs[i], carried[i], lanes))
                for i, slices in enumerate(found) for s in slices]

    def tiles_needed(found: list[list[TileSlice]], budget: float) -> int:
        """Tiles the slices take on one chain: one each, or with contexts their greedy runs within ``budget``."""
        if not contexts:
            return sum(len(s) for s in found)
        return len(group_contexts(needs_of(found), arch, budget))

    def placement(found: list[list[TileSlice]], limit: float, budget: float = float("inf")) -> Placement | None:
        """The slices cut into the chips (links within ``limit``); with contexts, their runs within the tile
        ``budget`` (each chip's slices grouped from its first)."""
        tables = cut_tables(found) if arch.chips > 1 else None
        cycles = cut_cycles(found, tables)
        if tables is not None and budget != float("inf"):
            cycles = _refuse_cuts_before_linked_single_banks(cycles, [n for n, _ in tables], found, costs, turns,
                                                             arch, budget)
        reach = None
        if contexts:
            needs = needs_of(found)

            def reach(begin: int) -> int:
                sizes = group_contexts(needs[begin:], arch, budget)
                return begin + sum(sizes[:arch.n_tiles])
        starts = _cut_chips(cycles, arch, limit, reach)
        if starts is None:
            return None
        groups = ()
        if contexts:
            bounds = list(starts) + [len(needs)]
            groups = tuple(size for chip in range(len(starts))
                           for size in group_contexts(needs[bounds[chip]:bounds[chip + 1]], arch, budget))
        if arch.chips == 1:
            return Placement(found, groups=groups)
        cut = tables
        # a ring's return link carries the output stream (the last cut) from the last chip to the host at chip 0
        ends = list(starts[1:]) + ([len(cut) - 1] if arch.chip_topology == "ring" else [])
        return Placement(found, starts, tuple(cut[s][0] for s in ends), tuple(cut[s][1] for s in ends), groups)

    def balance(deep: bool, fill: bool) -> Placement | None:
        """The balanced placement; ``deep``: with deep queues (:func:`_split_window`), None if they do not fit."""
        def split(i: int, budget: float, max_tiles: float,
                  room: tuple[float, int, int] | None = None) -> list[TileSlice] | None:
            budget = budget / turns[i]     # a tile of several turns runs its slice once a turn
            if costs[i] is not None:
                return _split_window(costs[i], arch, i, budget, max_tiles, deep, room, streams=True)
            return _split(layers[i].n_out, ks[i], arch, i, budget, max_tiles, carried[i], room)

        def filling_split(found: list[list[TileSlice]], i: int, budget: float) -> list[TileSlice] | None:
            """Layer ``i``'s split after the slices ``found``; with contexts, its first slice (a dense layer's
            outputs, a windowed layer's band of pixels) may fill the room left on the tile of the last run
            (:func:`group_contexts`) when that takes no more tiles: consecutive layers then share tiles the way
            one long layer would (a linear partition of the chain's work), not only whole small slices."""
            plain = split(i, budget, n_tiles)
            if not fill or not found or plain is None:
                return plain
            needs = needs_of(found)
            last = group_contexts(needs, arch, budget)[-1]
            run = needs[len(needs) - last:]
            if last >= arch.tile_contexts or run[0][3] > budget:   # no free context, or no tile of several
                return plain
            room = (budget - sum(n[0] for n in run), arch.sram_words - sum(n[1] for n in run),
                    arch.max_tile_outputs - sum(n[2] for n in run))
            filled = split(i, budget, n_tiles, room)
            if filled is None:
                return plain

            def runs(candidate: list[TileSlice]) -> tuple[int, int]:
                chain = needs + needs_of([candidate])
                sizes = group_contexts(chain, arch, budget)
                return len(sizes), _run_cycles(chain[-sizes[-1]:])
            return filled if runs(filled) <= runs(plain) else plain

        unlimited = float("inf")
        splits = [split(i, unlimited, unlimited) for i in range(len(layers))]
        if deep and any(s is None for s in splits):
            return None
        if tiles_needed(splits, unlimited) > n_tiles:
            if deep:
                return None
            windowed = [i for i in range(len(layers)) if costs[i] is not None]
            worst = max(range(len(layers)), key=lambda i: len(splits[i]))
            if costs[worst] is None or not windowed:
                raise _does_not_fit(layers, ks, [len(s) for s in splits], arch, grid,
                                    tiles_needed(splits, unlimited) if contexts else None)
            c = costs[worst]
            needed = (f"{sum(len(s) for s in splits)} tiles" if not contexts else
                      f"{tiles_needed(splits, unlimited)} tiles with up to {arch.tile_contexts} slices a tile (arch "
                      f"field 'tile_contexts')")
            raise CompileError(
                f"model does not fit {grid}: its layers need {needed}, there are "
                f"{_tiles_there(arch)}; {_describe_window(layers[worst])} alone needs {len(splits[worst])}: a "
                f"{arch.sram_bytes}-byte tile (arch field 'sram_bytes') holds its weights ({c.weight_words * arch.lanes} "
                f"bytes, or a channel group's) and the input rows its band of output pixels reads (two banks of them, "
                f"or one where its results fill at most half the result ring)")

        # balance: the pipeline runs at the pace of its slowest stage (tile or link), so find the smallest budget for
        # which every layer's fewest tiles within it (its greedy split) still fit the chips, cut at links within it.
        def within(budget: float, link_limit: float | None = None) -> Placement | None:
            found = []
            for i in range(len(layers)):
                layer_split = filling_split(found, i, budget)
                if layer_split is None:
                    return None
                found.append(layer_split)
                if sum(len(s) for s in found) > n_tiles * arch.tile_contexts:
                    return None
            if tiles_needed(found, budget) > n_tiles:
                return None
            return placement(found, budget if link_limit is None else link_limit, budget)

        lo, hi = 0, max(max(slowest(i, s) for i, s in enumerate(splits)), max(cut_cycles(splits)))
        if contexts:  # the runs of contexts at the unlimited split's budget take their summed cycles
            hi = max(hi, max(group_cycles for group_cycles, _, _ in _group_totals(needs_of(splits), arch, unlimited)))
        balanced = within(hi) or placement(splits, unlimited, unlimited)  # infeasible at lo, feasible at hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            found = within(mid)
            if found is None:
                lo = mid
            else:
                hi, balanced = mid, found
        budget = hi
        if arch.chips > 1:
            # where a link binds, the chips hold the slices of a lower tile budget too (the spare tiles are left to pass
            # through otherwise): re-split at the lowest tile budget whose cuts keep every link within the interval.
            # The interval stays, and every tile gets slack below it, which absorbs the stalls of the tiles whose
            # queues are shorter than what they forward (section 6 rule 4: they take their stream in bursts)
            interval, lo = hi, 0
            while hi - lo > 1:
                mid = (lo + hi) // 2
                found = within(mid, interval)
                if found is None:
                    lo = mid
                else:
                    hi, balanced = mid, found
            budget = hi
        if arch.chips > 1:  # the same slices, cut where the links carry least
            cycles = cut_cycles(balanced.splits)
            lo, hi = -1, max(cycles[s] for s in balanced.starts[1:])
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if placement(balanced.splits, mid, budget) is None:
                    lo = mid
                else:
                    hi = mid
            balanced = placement(balanced.splits, hi, budget)
        return balanced

    def shortfall(found: Placement) -> int:
        return max(turns[i] * _slice_shortfall(sl, costs[i], lanes) for i, s in enumerate(found.splits) for sl in s)

    def estimate(found: Placement) -> int:
        """The slowest slice (with contexts: the slowest tile, its contexts' summed cycles), plus the largest queue
        shortfall (which holds the tiles before it back)."""
        worst = max(slowest(i, s) for i, s in enumerate(found.splits))
        if found.groups:
            needs, index = needs_of(found.splits), 0
            for size in found.groups:
                worst = max(worst, _run_cycles(needs[index:index + size]))
                index += size
        return worst + shortfall(found)

    def interval(found: Placement) -> int:
        """:func:`estimate`, or the slowest link's stage time if a link binds."""
        return max([estimate(found)] + [link_cycles(arch, words, segments)
                                        for words, segments in zip(found.link_words, found.link_segments)])

    def fastest(deep: bool) -> Placement | None:
        """:func:`balance` with contexts filling tiles across layer boundaries; on several chips also without, and
        the faster of the two: the fill sizes a layer's first slice to the room of the chain's last tile, but a chip
        may start right there (its runs never span chips) and leave that slice a tile of its own."""
        fills = (True, False) if contexts and arch.chips > 1 else (contexts,)
        found = [placement for placement in (balance(deep, fill) for fill in fills) if placement is not None]
        return min(found, key=interval) if found else None

    # deep queues cost tiles (smaller bands) but avoid stalls: keep them unless the shallow placement's estimate,
    # charged with its largest queue shortfall (which holds the tiles before it back), is faster
    shallow = fastest(False)
    if not shortfall(shallow):   # every queue already holds what its tile queues: a deep-queue placement
        return shallow
    deep = fastest(True)
    return deep if deep is not None and estimate(deep) <= estimate(shallow) else shallow
