"""Hand-built flowtile programs for tests: dense, convolution, depthwise, max-pool layers, residual and
concat blocks mapped onto the chain as docs/architecture.md sections 1 and 4.1-4.3 describe, without the
compiler.

    layers = [Dense(W, bias, multiplier, shift, zp_out, clamp_lo, clamp_hi, tiles=2), ...]
    program = build_program(Arch(rows=2, cols=2, lanes=4), layers)
    golden = dense_golden(layers, x_int8)          # plain numpy reference of the same arithmetic

    layers = [Conv(W4, bias, multiplier, shift, zp_in, zp_out, lo, hi, stride=2, pads=(1, 1, 1, 1), tiles=2),
              MaxPool(2, 2, stride=2), Dense(W, ...)]
    program = build_program(arch, layers, input_shape=(C, H, W))   # input travels as a "chw" map
    flits = network_golden(layers, x_int8, (C, H, W), lanes)        # what the host receives

    Conv(..., pixel_bands=[9, 9, 7])      # a 5x5 output split into bands of 9, 9 and 7 pixels (section 4.1)

    layers = [Conv(...), Residual(main=[Conv(..., tiles=2), Depthwise(...)],
                                  add=AddParams(mult_a, mult_b, multiplier, shift, zp_a, zp_b, zp_out), tiles=2),
              Concat(a_branch=[Conv(...)], b_branch=[],          # b = the block input (identity)
                     params=ConcatParams(mult_a, mult_b, multiplier, shift, zp_a, zp_b, zp_out), tiles=2)]

Mapping: a layer split over ``m`` consecutive chain tiles; ``n_pass`` of tile ``i`` = result words of
tiles ``0..i-1``, destination the next chain tile (the host for the last chain position). The stream a
layer reads holds, per inference, ``B`` words of tensors kept for later (residual skips, section 4.2)
followed by the layer input's ``K_in`` words: every tile has ``n_in_words = K = B + K_in``, stores
``[B, K)``, forwards ``[0, K)`` if it is not the layer's last tile; the last tile forwards ``[0, B)``, or
``[0, K)`` if the layer is the first of a residual main branch (its input is the block's skip). Without
residual blocks ``B = 0``: store everything, forward everything but on the last tile
(``flowtile.arch.stream_registers``). A :class:`Residual` block ends with ADD tiles (row bands; op = ADD,
kernel 1x2, ``out_width = in_width``) that store ``[B, K)`` = skip ++ main output, the skip at stored
offset 0 and the main output at the skip's words (``operand_a_offset``/``operand_b_offset`` by
``Residual.skip``), ``act_base = 0``, ``n_out = CW * L`` parameter rows from :class:`AddParams` (a flat
vector is a 1x1 map of ``ceil(n / L)`` words, channel ``c`` = element ``c``), and whose last tile
forwards ``[0, B)``. A :class:`Concat` block (two branches, either may be the identity) ends with
CONCAT tiles (kernel 1x1, ``concat_words_a`` = a's words a pixel) laid out the same way; see
:class:`Concat` for the stream and how the first layer of its second branch reads ``x`` from the middle
of the stream (``store_begin = B``, ``K = B + K_in + first output``).

A dense tile computes a slice of the outputs (a multiple of ``lanes`` except the last), ``w_base = 0``,
``act_base = n_out * K_in``. A windowed tile (section 4.1) computes a band of output rows for every
output channel: a conv tile holds all weights at ``w_base = 0``, SRAM row ``o*K_w + (ky*KW + kx)*CW + cw``
lane ``l`` = weight ``[o, cw*L + l, ky, kx]`` (zero for padding channels), ``act_base = C_out * K_w``,
``pad_value`` = the input zero point. Bands are whole output rows (``tiles``) or, with ``pixel_bands``, any
consecutive runs of row-major output pixels (section 4.1): the band of pixels ``[p0, p1)`` of a map
``out_width`` wide has ``out_row_begin = p0 // out_width``, ``out_rows`` = the rows it touches,
``out_col_begin = p0 mod out_width`` and ``out_col_end = p1 mod out_width`` (0: a full last row;
:func:`pixel_band_registers`); the same goes for the ADD and CONCAT tiles of a join (``Residual.pixel_bands``,
``Concat.pixel_bands``). A conv with ``channel_groups`` (section 4.4) puts ``bands x groups`` tiles on the
chain, band by band, group by group: tile ``(b, g)`` holds only group ``g``'s weight rows (its
``o - o_g`` at ``w_base = 0``, ``act_base = n_out_g * K_w``) and parameter rows, has ``n_out = o_{g+1} - o_g``
and ``pass_per_pixel = sum_{h<g} ceil(n_out_h / L)``, so its ``n_pass`` (the running count above) is the
earlier bands' words plus ``n_pix_b * pass_per_pixel``; a max-pool tile has no weights (``act_base = 0``), ``n_out = CW * L``
zero parameter rows and ``pad_value = -128``. A depthwise tile (``op = LANE``) holds its ``CW * KH * KW``
weight words at ``w_base = 0``, SRAM row ``cw*KH*KW + ky*KW + kx`` lane ``l`` = weight ``[cw*L + l, ky,
kx]``, ``act_base = CW * KH * KW``, ``n_out = CW * L`` parameter rows ``(bias, multiplier, shift)`` of
channel ``cw*L + l`` (padding channels: zero weights and the row ``(0, 0, 1)``, so their lanes hold
``clamp(zp_out)``), ``pad_value`` = the input zero point; an average pool is a depthwise layer with
all-one weights (:func:`average_pool`). Feature maps travel pixel-major, ``CW = ceil(C / L)`` words a
pixel; a dense layer after a map reads its ``H * W * CW`` words as its input, i.e. its ``n_in`` is
``H * W * CW * L`` (the flattened wire order, padding lanes included).
Every tile's activation region holds two banks (``flowtile.arch.ACTIVATION_BANKS``, section 4): it spans
``[act_base, act_base + 2B)`` (``B = store_end - store_begin``), placed right after the weights, so the
SRAM image is the weights followed by ``2B`` activation words (zero, or random bytes with ``act_fill``).
Tiles after the last layer pass the output through (``tail="pass"``), or stay idle while the last
layer's last tile sends straight to the host along the XY route (``tail="direct"``).

The goldens (:func:`dense_golden`, :func:`network_golden`) compute the network in plain numpy from the
layer parameters, never from tile registers.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from flowtile.arch import (ACTIVATION_BANKS, ADD_MULT_MAX, CONFIG_FIELDS, OP_ADD, OP_CONCAT, OP_LANE, OP_MAC,
                           OP_MAX, Arch, dense_window_registers)
from flowtile.program import LayerInfo, Program, TensorSpec, TileProgram
from flowtile.tile_config import TileConfig

__all__ = ["stream_offsets", "Dense", "Conv", "Depthwise", "MaxPool", "AddParams", "Residual", "ConcatParams", "Concat", "average_pool", "build_program",
           "dense_golden", "network_golden", "split_outputs", "split_rows", "split_pixels", "pixel_band_registers",
           "layer_bands", "blank_config", "window_output_size"]


def stream_offsets(configs) -> list[int]:
    """Where each tile's stream starts in its layer's stream (the stream into the layer's first tile), for the
    tiles of one layer in chain order: a tile receives what the one before it forwards (section 4.2), a suffix from
    that tile's ``forward_begin``, so tile ``t``'s RECV word ``k`` is word ``offset[t] + k`` of the layer's stream."""
    offsets = [0]
    for config in list(configs)[:-1]:
        offsets.append(offsets[-1] + config.forward_begin)
    return offsets


def shift_round_half_even(value, shift):
    """``value / 2^shift`` rounded to nearest, ties to even (section 4), by floor division."""
    quotient, remainder = value >> shift, value - ((value >> shift) << shift)
    half = 1 << (shift - 1)
    return quotient + ((remainder > half) | ((remainder == half) & ((quotient & 1) == 1)))

class Dense(NamedTuple):
    """One int8 dense layer. ``multiplier``/``shift`` may be scalars or per-output arrays. ``tiles``
    is the number of chain tiles it spans, or the explicit output count of each of them."""

    weights: np.ndarray            # int8 [n_out, n_in]
    bias: np.ndarray               # int32-range [n_out]
    multiplier: np.ndarray | int
    shift: np.ndarray | int
    zp_out: int = 0
    clamp_lo: int = -128
    clamp_hi: int = 127
    tiles: int | Sequence[int] = 1

    @property
    def n_out(self) -> int:
        return self.weights.shape[0]

    @property
    def n_in(self) -> int:
        return self.weights.shape[1]


class Conv(NamedTuple):
    """One int8 2-D convolution (ONNX QLinearConv semantics, weight zero point 0). ``pads`` are
    ``(top, left, bottom, right)``; padding reads the input zero point ``zp_in`` (real zero).
    ``tiles``: output row bands, or the explicit output row count of each. ``channel_groups``: output-channel
    groups per band (section 4.4), as a count (whole words as evenly as possible, :func:`split_outputs`) or
    the explicit channel count of each group (multiples of ``lanes`` but the last); the layer then takes
    ``bands x groups`` chain tiles, band by band, group by group. ``pixel_bands``: instead of row bands, the
    output pixel count of each band (row-major, summing to ``out_height * out_width``; a band may begin and
    end inside a row, section 4.1); ``tiles`` must then be 1 (the default) or the number of bands."""

    weights: np.ndarray            # int8 [C_out, C_in, KH, KW]
    bias: np.ndarray               # int32-range [C_out]
    multiplier: np.ndarray | int
    shift: np.ndarray | int
    zp_in: int = 0
    zp_out: int = 0
    clamp_lo: int = -128
    clamp_hi: int = 127
    stride: int = 1
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    tiles: int | Sequence[int] = 1
    channel_groups: int | Sequence[int] = 1
    pixel_bands: Sequence[int] | None = None

    @property
    def kernel(self) -> tuple[int, int]:
        return self.weights.shape[2], self.weights.shape[3]


class Depthwise(NamedTuple):
    """One int8 depthwise 2-D convolution (``group = C``, one filter per channel; op = LANE of section
    4.1). ``bias``/``multiplier``/``shift`` are scalars or per-channel; padding reads ``zp_in``.
    ``tiles``: chain tiles (output row bands), or the explicit output row count of each; ``pixel_bands``: the
    output pixel count of each band instead (as for :class:`Conv`)."""

    weights: np.ndarray            # int8 [C, KH, KW]
    bias: np.ndarray | int         # int32-range [C]
    multiplier: np.ndarray | int
    shift: np.ndarray | int
    zp_in: int = 0
    zp_out: int = 0
    clamp_lo: int = -128
    clamp_hi: int = 127
    stride: int = 1
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    tiles: int | Sequence[int] = 1
    pixel_bands: Sequence[int] | None = None

    @property
    def channels(self) -> int:
        return self.weights.shape[0]

    @property
    def kernel(self) -> tuple[int, int]:
        return self.weights.shape[1], self.weights.shape[2]

    def lane_parameters(self, lanes: int) -> tuple[np.ndarray, np.ndarray]:
        """Padded to ``CW * L`` channels: weights int8 ``[CW*L, KH, KW]`` and the parameter table int64
        ``[CW*L, 3]`` (padding channels: zero weights, row ``(0, 0, 1)``)."""
        channels = self.channels
        padded = -(-channels // lanes) * lanes
        weights = np.zeros((padded,) + self.kernel, dtype=np.int8)
        weights[:channels] = np.asarray(self.weights, dtype=np.int8)
        params = np.zeros((padded, 3), dtype=np.int64)
        params[:, 2] = 1
        params[:channels] = np.stack([_per_output(self.bias, channels), _per_output(self.multiplier, channels),
                                      _per_output(self.shift, channels)], axis=1)
        return weights, params


def average_pool(channels: int, kernel_h: int, kernel_w: int, multiplier: int, shift: int, **kwargs) -> Depthwise:
    """An average pool as section 4.1 maps it: a depthwise layer with all-one weights (``M / 2^S ~=
    s_x / (KH*KW*s_y)``; the bias folds the input zero point). ``kwargs``: the other Depthwise fields."""
    kwargs.setdefault("bias", 0)
    return Depthwise(np.ones((channels, kernel_h, kernel_w), np.int8), multiplier=multiplier, shift=shift,
                     **kwargs)


class MaxPool(NamedTuple):
    """Max pooling over ``kernel_h x kernel_w`` windows (padding never wins: it reads -128), then clamp.
    ``tiles`` / ``pixel_bands`` as for :class:`Conv`."""

    kernel_h: int
    kernel_w: int
    stride: int = 1
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    clamp_lo: int = -128
    clamp_hi: int = 127
    tiles: int | Sequence[int] = 1
    pixel_bands: Sequence[int] | None = None

    @property
    def kernel(self) -> tuple[int, int]:
        return self.kernel_h, self.kernel_w


class AddParams(NamedTuple):
    """The requantized elementwise add of a residual join (op = ADD, section 4.2): element (channel) ``c``
    of ``y`` is ``clamp(round_half_even(wrap32(bias_c + a_c * mult_a + b_c * mult_b) * M_c / 2^S_c) +
    zp_out, clamp_lo, clamp_hi)``, ``a`` the block input (the skip) and ``b`` the main branch's output
    (the other way round for ``Residual(skip="b")``).
    ``bias`` defaults to ``-(zp_a * mult_a + zp_b * mult_b)`` (the operands' zero points folded in);
    ``bias``/``multiplier``/``shift`` are scalars or per channel (per element of a flat vector)."""

    mult_a: int                    # 0..ADD_MULT_MAX
    mult_b: int
    multiplier: np.ndarray | int
    shift: np.ndarray | int
    zp_a: int = 0
    zp_b: int = 0
    zp_out: int = 0
    clamp_lo: int = -128
    clamp_hi: int = 127
    bias: np.ndarray | int | None = None

    def lane_parameters(self, channels: int, lanes: int) -> np.ndarray:
        """The parameter table int64 ``[CW*L, 3]``, row ``c = cw*L + l`` for channel ``c``; padding
        channels get ``(0, 0, 1)`` (their lanes hold ``clamp(zp_out)``)."""
        padded = -(-channels // lanes) * lanes
        params = np.zeros((padded, 3), dtype=np.int64)
        params[:, 2] = 1
        bias = -(self.zp_a * self.mult_a + self.zp_b * self.mult_b) if self.bias is None else self.bias
        params[:channels] = np.stack([_per_output(bias, channels), _per_output(self.multiplier, channels),
                                      _per_output(self.shift, channels)], axis=1)
        return params


class Residual(NamedTuple):
    """A residual block ``y = add(x, main(x))`` with an identity skip (section 4.2). The block input ``x``
    stays in the stream in front of the main branch: the first main layer's tiles store their input and
    all forward it, later main layers store only their own input and their last tile forwards ``x``;
    then ``tiles`` ADD tiles (row bands of the map; a flat vector is one pixel, so one tile) read ``x``
    and the main branch's output, which must have ``x``'s shape. ``skip``: which ADD operand the skip is,
    ``"a"`` (``y = add(a=x, b=main(x))``, operand a first in the stream) or ``"b"`` (``y = add(a=main(x),
    b=x)``: operand b comes first in the stream, ``operand_b_offset = 0 < operand_a_offset``). Blocks nest
    (not as the first layer of a main branch, which would need ``x`` twice in the stream). ``pixel_bands``:
    the ADD tiles' output pixel counts instead of row bands (as for :class:`Conv`)."""

    main: Sequence
    add: AddParams
    tiles: int | Sequence[int] = 1
    skip: str = "a"
    pixel_bands: Sequence[int] | None = None


class ConcatParams(NamedTuple):
    """The requantized channel concatenation of a :class:`Concat` join (op = CONCAT, section 4.3). Output
    channel ``c`` (of ``C_a + C_b``; for vectors: element) is ``clamp(round_half_even(wrap32(bias_c + v_c *
    m) * M_c / 2^S_c) + zp_out, clamp_lo, clamp_hi)`` with ``v_c = a_c``, ``m = mult_a`` for ``c < C_a``, else
    ``v_c = b_{c - C_a}``, ``m = mult_b``. ``bias`` defaults to ``-zp_a * mult_a`` for a's channels and
    ``-zp_b * mult_b`` for b's (the operands' zero points folded in); ``bias``/``multiplier``/``shift`` are
    scalars or per output channel."""

    mult_a: int                    # 0..ADD_MULT_MAX
    mult_b: int
    multiplier: np.ndarray | int
    shift: np.ndarray | int
    zp_a: int = 0
    zp_b: int = 0
    zp_out: int = 0
    clamp_lo: int = -128
    clamp_hi: int = 127
    bias: np.ndarray | int | None = None

    def channel_parameters(self, channels_a: int, channels_b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(bias, multiplier, shift) int64 ``[C_a + C_b]``, one entry per output channel."""
        channels = channels_a + channels_b
        if self.bias is None:
            bias = np.concatenate([np.full(channels_a, -self.zp_a * self.mult_a, np.int64),
                                   np.full(channels_b, -self.zp_b * self.mult_b, np.int64)])
        else:
            bias = _per_output(self.bias, channels)
        return bias, _per_output(self.multiplier, channels), _per_output(self.shift, channels)

    def lane_parameters(self, channels_a: int, channels_b: int, lanes: int) -> np.ndarray:
        """The parameter table int64 ``[CW*L, 3]``: row ``c`` for output channel ``c`` (``C_a`` is a multiple
        of ``L``, so b's channel ``j`` is row ``C_a + j``); padding channels get ``(0, 0, 1)``."""
        channels = channels_a + channels_b
        padded = channels_a + -(-channels_b // lanes) * lanes
        params = np.zeros((padded, 3), dtype=np.int64)
        params[:, 2] = 1
        params[:channels] = np.stack(self.channel_parameters(channels_a, channels_b), axis=1)
        return params


class Concat(NamedTuple):
    """A block that forks its input ``x`` into two branches and concatenates their outputs along channels
    (section 4.3): ``y = concat(a_branch(x), b_branch(x))`` requantized with :class:`ConcatParams` by
    ``tiles`` CONCAT tiles (row bands; a flat vector is one pixel, so one tile). An empty branch is the
    identity (that operand is ``x`` itself, which then stays in the stream in front of the other branch);
    not both. Both outputs must have the same height and width (or both be vectors), and a's channel
    count must be a multiple of ``lanes`` (its words end where b's begin).

    Stream: the branch computed first (``first``: ``"a"`` or ``"b"``; an identity operand always comes
    first) keeps ``x`` in the stream; the first layer of the second branch stores ``x`` from between the
    words kept before the block and the first branch's output, and its last tile drops ``x`` if nothing
    precedes it in the stream (forwarded words are one contiguous range), else forwards it along. The
    CONCAT tiles store everything from ``x`` (or the first branch's output) on, so the operand offsets are
    ``0`` / ``x``'s words / ``x``'s words + the first output's words; ``first="b"`` (or an identity b) puts
    operand b first in the stream. ``pixel_bands``: the CONCAT tiles' output pixel counts instead of row
    bands (as for :class:`Conv`)."""

    a_branch: Sequence
    b_branch: Sequence
    params: ConcatParams
    tiles: int | Sequence[int] = 1
    first: str = "a"
    pixel_bands: Sequence[int] | None = None


def window_output_size(size: int, kernel: int, stride: int, pad_before: int, pad_after: int) -> int:
    """Output rows (or columns) of a window layer: ``floor((size + pads - kernel) / stride) + 1``."""
    return (size + pad_before + pad_after - kernel) // stride + 1


def split_rows(out_height: int, tiles: int | Sequence[int]) -> list[int]:
    """Output rows per tile: as evenly as possible (earlier tiles get the extra rows), or the explicit split."""
    if not isinstance(tiles, int):
        counts = list(tiles)
        if sum(counts) != out_height or any(c <= 0 for c in counts):
            raise ValueError(f"row split {counts} of {out_height} output rows: positive, summing to {out_height}")
        return counts
    if not 1 <= tiles <= out_height:
        raise ValueError(f"{out_height} output rows cannot be split over {tiles} tiles")
    return [out_height // tiles + (i < out_height % tiles) for i in range(tiles)]


def split_pixels(out_height: int, out_width: int, tiles: int | Sequence[int],
                 pixel_bands: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """The bands of a layer's ``out_height x out_width`` output pixels, as row-major pixel ranges ``[p0, p1)``
    in chain order: ``pixel_bands`` (explicit pixel counts, positive, summing to the map) if given, else the
    row bands of :func:`split_rows`. With ``pixel_bands``, ``tiles`` must be 1 or ``len(pixel_bands)``."""
    pixels = out_height * out_width
    if pixel_bands is None:
        counts = [rows * out_width for rows in split_rows(out_height, tiles)]
    else:
        counts = [int(c) for c in pixel_bands]
        if sum(counts) != pixels or any(c <= 0 for c in counts):
            raise ValueError(f"pixel bands {counts} of {out_height}x{out_width} = {pixels} output pixels: positive, "
                             f"summing to {pixels}")
        if not (isinstance(tiles, int) and tiles in (1, len(counts))):
            raise ValueError(f"pixel_bands {counts} give {len(counts)} bands; tiles = {tiles} must be 1 or "
                             f"{len(counts)}")
    ranges, begin = [], 0
    for count in counts:
        ranges.append((begin, begin + count))
        begin += count
    return ranges


def pixel_band_registers(begin: int, end: int, out_width: int) -> dict[str, int]:
    """Registers ``out_row_begin``, ``out_rows``, ``out_col_begin``, ``out_col_end`` of the band of row-major
    output pixels ``[begin, end)`` of a map ``out_width`` wide (section 4.1; ``out_col_end = 0``: the last row
    is full). Whole rows give ``out_col_begin = out_col_end = 0``."""
    first, last = begin // out_width, (end - 1) // out_width
    return dict(out_row_begin=first, out_rows=last - first + 1, out_col_begin=begin % out_width,
                out_col_end=end % out_width)


def layer_bands(layer) -> int:
    """Bands (chain tiles per output-channel group) a windowed layer or join is split into."""
    if getattr(layer, "pixel_bands", None) is not None:
        return len(layer.pixel_bands)
    return layer.tiles if isinstance(layer.tiles, int) else len(layer.tiles)


def blank_config() -> dict[str, int]:
    """Every register zero: an idle tile."""
    return {name: 0 for name, _, _ in CONFIG_FIELDS}


def config_with_queue(config: dict[str, int], arch: Arch, words: int | None = None) -> dict[str, int]:
    """A register dict (every register, as :func:`blank_config`'s) with its forward queue placed by
    :meth:`TileConfig.with_queue`: right after its weights and banks, ``words`` words or every SRAM word they leave
    free (None; no queue for a tile that queues nothing)."""
    placed = TileConfig.from_dict(config).with_queue(arch, words)
    return dict(config, queue_base=placed.queue_base, queue_words=placed.queue_words)


def split_outputs(n_out: int, tiles: int | Sequence[int], lanes: int) -> list[int]:
    """Output counts per tile: whole flits as evenly as possible (or the explicit split, checked)."""
    if not isinstance(tiles, int):
        counts = list(tiles)
        if sum(counts) != n_out or any(c <= 0 for c in counts) or any(c % lanes for c in counts[:-1]):
            raise ValueError(f"split {counts} of {n_out} outputs: positive, summing to n_out, "
                             f"multiples of {lanes} except the last")
        return counts
    words = -(-n_out // lanes)
    if not 1 <= tiles <= words:
        raise ValueError(f"{n_out} outputs ({words} flits) cannot be split over {tiles} tiles")
    per_tile = [words // tiles + (i < words % tiles) for i in range(tiles)]
    counts = [w * lanes for w in per_tile]
    counts[-1] -= sum(counts) - n_out
    return counts


def _per_output(value, n: int) -> np.ndarray:
    return np.broadcast_to(np.asarray(value, dtype=np.int64), (n,)).copy()


def _fill(rng: np.random.Generator | None, words: int, lanes: int) -> np.ndarray:
    return (np.zeros((words, lanes), dtype=np.int8) if rng is None
            else rng.integers(-128, 128, (words, lanes), dtype=np.int8))


def _dense_tiles(layer: Dense, k_words: int, lanes: int, act_fill):
    """(config, sram, params, result words) per tile of a dense layer."""
    padded = np.zeros((layer.n_out, k_words * lanes), dtype=np.int8)
    padded[:, : layer.n_in] = layer.weights
    multiplier = _per_output(layer.multiplier, layer.n_out)
    shift = _per_output(layer.shift, layer.n_out)
    bias = _per_output(layer.bias, layer.n_out)
    start = 0
    for n_out in split_outputs(layer.n_out, layer.tiles, lanes):
        weights = padded[start:start + n_out].reshape(n_out * k_words, lanes)
        config = blank_config()
        config.update(n_in_words=k_words, n_out=n_out, w_base=0, act_base=n_out * k_words, zp_out=layer.zp_out,
                      clamp_lo=layer.clamp_lo, clamp_hi=layer.clamp_hi, **dense_window_registers(k_words))
        params = np.stack([bias[start:start + n_out], multiplier[start:start + n_out],
                           shift[start:start + n_out]], axis=1)
        yield (config, np.concatenate([weights, _fill(act_fill, ACTIVATION_BANKS * k_words, lanes)]), params,
               -(-n_out // lanes))
        start += n_out


def _window_tiles(layer, shape: tuple[int, int, int], lanes: int, act_fill):
    """(config, sram, params, result words) per tile of a conv or max-pool layer, and its output shape. A
    conv with output-channel groups (section 4.4) gives, band by band, one tile per group; the caller's
    running ``n_pass`` (result words of the tiles before) is then the earlier bands' pixels with all their
    channels plus ``n_pix`` times the band's ``pass_per_pixel``."""
    channels, height, width = shape
    words_per_pixel = -(-channels // lanes)
    k_words = height * width * words_per_pixel
    kernel_h, kernel_w = layer.kernel
    pad_top, pad_left, pad_bottom, pad_right = layer.pads
    out_height = window_output_size(height, kernel_h, layer.stride, pad_top, pad_bottom)
    out_width = window_output_size(width, kernel_w, layer.stride, pad_left, pad_right)
    if out_height < 1 or out_width < 1:
        raise ValueError(f"{type(layer).__name__} with kernel {layer.kernel} has no output on a {height}x{width} map")
    common = dict(in_height=height, in_width=width, words_per_pixel=words_per_pixel, kernel_h=kernel_h,
                  kernel_w=kernel_w, stride=layer.stride, pad_top=pad_top, pad_left=pad_left, out_width=out_width,
                  n_in_words=k_words, clamp_lo=layer.clamp_lo, clamp_hi=layer.clamp_hi, w_base=0)
    if isinstance(layer, Conv):
        c_out, c_in = layer.weights.shape[:2]
        if c_in != channels:
            raise ValueError(f"Conv has {c_in} input channels, its input map has {channels}")
        window_words = kernel_h * kernel_w * words_per_pixel
        padded = np.zeros((c_out, kernel_h, kernel_w, words_per_pixel * lanes), dtype=np.int8)
        padded[..., :c_in] = np.asarray(layer.weights, dtype=np.int8).transpose(0, 2, 3, 1)
        weights = padded.reshape(c_out * window_words, lanes)
        params = np.stack([_per_output(layer.bias, c_out), _per_output(layer.multiplier, c_out),
                           _per_output(layer.shift, c_out)], axis=1)
        common.update(op=OP_MAC, pad_value=layer.zp_in, zp_out=layer.zp_out)
        out_channels = c_out
        # section 4.4: group g computes channels [o_g, o_{g+1}) with its own weights and parameter rows;
        # pass_per_pixel = the result words a pixel of the groups before it
        groups, first, before = [], 0, 0
        for count in split_outputs(c_out, layer.channel_groups, lanes):
            groups.append(dict(n_out=count, act_base=count * window_words, pass_per_pixel=before,
                               weights=weights[first * window_words:(first + count) * window_words],
                               params=params[first:first + count]))
            first += count
            before += -(-count // lanes)
    elif isinstance(layer, Depthwise):
        if layer.channels != channels:
            raise ValueError(f"Depthwise has {layer.channels} channels, its input map has {channels}")
        padded, params = layer.lane_parameters(lanes)
        window = kernel_h * kernel_w
        # word cw*KH*KW + ky*KW + kx, lane l: weight of channel cw*L + l at (ky, kx)
        weights = (padded.reshape(words_per_pixel, lanes, window).transpose(0, 2, 1)
                   .reshape(words_per_pixel * window, lanes))
        common.update(op=OP_LANE, pad_value=layer.zp_in, zp_out=layer.zp_out)
        out_channels = channels
        groups = [dict(n_out=words_per_pixel * lanes, act_base=words_per_pixel * window, pass_per_pixel=0,
                       weights=weights, params=params)]
    else:
        common.update(op=OP_MAX, pad_value=-128, zp_out=0)
        out_channels = channels
        groups = [dict(n_out=words_per_pixel * lanes, act_base=0, pass_per_pixel=0,
                       weights=np.zeros((0, lanes), dtype=np.int8),
                       params=np.zeros((words_per_pixel * lanes, 3), dtype=np.int64))]
    tiles = []
    for begin, end in split_pixels(out_height, out_width, layer.tiles, layer.pixel_bands):
        for group in groups:
            config = blank_config()
            config.update(common, **pixel_band_registers(begin, end, out_width), n_out=group["n_out"],
                          act_base=group["act_base"], pass_per_pixel=group["pass_per_pixel"])
            sram = np.concatenate([group["weights"], _fill(act_fill, ACTIVATION_BANKS * k_words, lanes)])
            tiles.append((config, sram, group["params"].copy(), (end - begin) * -(-group["n_out"] // lanes)))
    return tiles, (out_channels, out_height, out_width)


def _words(shape: tuple[int, ...], lanes: int) -> int:
    """Flits one tensor of ``shape`` takes: a ``(C, H, W)`` map pixel-major, a ``(n,)`` vector flat."""
    if len(shape) == 3:
        return shape[1] * shape[2] * -(-shape[0] // lanes)
    return -(-shape[0] // lanes)


def _join_tiles(layer, shapes: dict, offsets: dict, stored: int, lanes: int, act_fill):
    """(config, sram, params, result words) per tile of the join of a :class:`Residual` (op = ADD,
    section 4.2) or a :class:`Concat` (op = CONCAT, section 4.3), and the output shape. ``shapes``: the
    operands' shapes, ``offsets``: their stored-word offsets (keys ``"a"``, ``"b"``); ``stored``: the
    words the tiles store. Row bands of the map (a flat vector is one 1x1 pixel of ``ceil(n / L)`` words,
    so one band); ``act_base = 0``; ``n_in_words`` and the RECV ranges are set by the caller."""
    shape_a, shape_b = shapes["a"], shapes["b"]
    is_add = isinstance(layer, Residual)
    params_of = layer.add if is_add else layer.params
    kind = "Residual" if is_add else "Concat"
    if is_add and tuple(shape_a) != tuple(shape_b):
        main, skip = (shape_b, shape_a) if layer.skip == "a" else (shape_a, shape_b)
        raise ValueError(f"Residual main branch maps its input to {list(main)}; the add needs the same shape as "
                         f"the skip {list(skip)}")
    if len(shape_a) != len(shape_b) or tuple(shape_a[1:]) != tuple(shape_b[1:]):
        raise ValueError(f"{kind} operands of shapes {list(shape_a)} and {list(shape_b)} do not match (the concat "
                         f"needs the same height and width, or two vectors)")
    for name in ("mult_a", "mult_b"):
        value = getattr(params_of, name)
        if not 0 <= value <= ADD_MULT_MAX:
            raise ValueError(f"{type(params_of).__name__}.{name} = {value} outside 0..{ADD_MULT_MAX}")
    height, width = (shape_a[1], shape_a[2]) if len(shape_a) == 3 else (1, 1)
    if is_add:
        channels = shape_a[0]
        words_per_pixel = -(-channels // lanes)
        params = params_of.lane_parameters(channels, lanes)
        registers = dict(op=OP_ADD, kernel_w=2, concat_words_a=0)
        out_shape = tuple(shape_a)
    else:
        channels_a, channels_b = shape_a[0], shape_b[0]
        if channels_a % lanes:
            raise ValueError(f"Concat operand a has {channels_a} channels, not a multiple of lanes = {lanes}")
        words_a = channels_a // lanes
        words_per_pixel = words_a + -(-channels_b // lanes)
        params = params_of.lane_parameters(channels_a, channels_b, lanes)
        registers = dict(op=OP_CONCAT, kernel_w=1, concat_words_a=words_a)
        out_shape = (channels_a + channels_b,) + tuple(shape_a[1:])
    common = dict(registers, in_height=height, in_width=width, words_per_pixel=words_per_pixel, kernel_h=1,
                  stride=1, out_width=width, n_out=words_per_pixel * lanes, w_base=0, act_base=0,
                  operand_a_offset=offsets["a"], operand_b_offset=offsets["b"], add_mult_a=params_of.mult_a,
                  add_mult_b=params_of.mult_b, zp_out=params_of.zp_out, clamp_lo=params_of.clamp_lo,
                  clamp_hi=params_of.clamp_hi)
    parts = []
    for begin, end in split_pixels(height, width, layer.tiles, layer.pixel_bands):
        config = blank_config()
        config.update(common, **pixel_band_registers(begin, end, width))
        parts.append((config, _fill(act_fill, ACTIVATION_BANKS * stored, lanes), params.copy(),
                      (end - begin) * words_per_pixel))
    return parts, out_shape


def _branches(block) -> tuple[dict[str, list], list[str]]:
    """The two branches of a join block by operand (``"a"``, ``"b"``; empty: identity) and the order in
    which the non-empty ones are computed."""
    if isinstance(block, Residual):
        if block.skip not in ("a", "b"):
            raise ValueError(f"Residual.skip must be 'a' or 'b', got {block.skip!r}")
        if not block.main:
            raise ValueError("a Residual block needs at least one main-branch layer")
        main = "b" if block.skip == "a" else "a"
        return {main: list(block.main), block.skip: []}, [main]
    if block.first not in ("a", "b"):
        raise ValueError(f"Concat.first must be 'a' or 'b', got {block.first!r}")
    branches = {"a": list(block.a_branch), "b": list(block.b_branch)}
    if not branches["a"] and not branches["b"]:
        raise ValueError("a Concat block needs at least one non-identity branch (concat(x, x) would need x "
                         "twice in the stream)")
    order = [block.first, "b" if block.first == "a" else "a"]
    return branches, [letter for letter in order if branches[letter]]


def _first_layer(layers):
    """The first layer that reads the network input (inside blocks: the first layer of a branch)."""
    first = layers[0]
    while isinstance(first, (Residual, Concat)):
        branches, order = _branches(first)
        first = branches[order[0]][0]
    return first


class _Builder:
    """Places layers on consecutive chain tiles, keeping track of the tensors the stream carries."""

    def __init__(self, arch: Arch, act_fill):
        self.arch, self.act_fill = arch, act_fill
        self.tiles: list[TileProgram] = []
        self.infos: list[LayerInfo] = []

    def place(self, parts, info, *, before: int, stored: int, keep, after: int = 0) -> None:
        """The tiles of one layer. Its stream per inference is ``before`` words of tensors kept for later,
        then its input (``stored`` words, which every tile stores), then ``after`` more words kept for
        later; every tile but the last forwards the whole stream, the last forwards the words ``keep``
        (a ``(begin, end)`` range, or ``end`` for ``(0, end)``: the tensors still needed after it)."""
        k_words = before + stored + after
        keep_begin, keep_end = (0, keep) if isinstance(keep, int) else keep
        if keep_begin >= keep_end:
            keep_begin = keep_end = 0
        coords, passed = [], 0
        for i, (config, sram, params, n_words) in enumerate(parts):
            position = len(self.tiles)
            if position >= self.arch.n_tiles:
                raise ValueError(f"the layers need more than the {self.arch.n_tiles} tiles of the grid")
            row, col = self.arch.chain_position(position)
            last = i == len(parts) - 1
            config.update(n_in_words=k_words, store_begin=before, store_end=before + stored,
                          forward_begin=keep_begin if last else 0, forward_end=keep_end if last else k_words,
                          n_pass=passed)
            self.tiles.append(TileProgram(row, col, config, sram, params))
            coords.append((row, col))
            passed += n_words
        op, n_in, n_out, relu, macs = info
        self.infos.append(LayerInfo(f"{op}{len(self.infos)}", op, n_in, n_out, tuple(coords), relu=relu,
                                    mac_count=macs))

    def layer_parts(self, layer, shape: tuple[int, ...]):
        """(tile parts, layer info, output shape) of one plain layer reading a tensor of ``shape``."""
        lanes = self.arch.lanes
        if isinstance(layer, Dense):
            wire = (shape[1] * shape[2] * -(-shape[0] // lanes) * lanes) if len(shape) == 3 else shape[0]
            if layer.n_in != wire:
                raise ValueError(f"layer {type(layer).__name__} has {layer.n_in} inputs, its input has {wire} "
                                 f"elements on the wire")
            parts = list(_dense_tiles(layer, _words(shape, lanes), lanes, self.act_fill))
            return parts, ("dense", layer.n_in, layer.n_out, layer.clamp_lo > -128, None), (layer.n_out,)
        if len(shape) != 3:
            raise ValueError(f"layer {type(layer).__name__} needs a feature map input")
        parts, out_shape = _window_tiles(layer, shape, lanes, self.act_fill)
        kernel_h, kernel_w = layer.kernel
        out_pixels = out_shape[1] * out_shape[2]
        relu = layer.clamp_lo > -128
        if isinstance(layer, Conv):  # report only: n_in * n_out = the layer's MACs
            info = ("conv", shape[0] * kernel_h * kernel_w, out_shape[0] * out_pixels, relu, None)
        elif isinstance(layer, Depthwise):
            info = ("depthwise", kernel_h * kernel_w, out_shape[0] * out_pixels, relu, None)
        else:
            info = ("maxpool", 0, out_shape[0] * out_pixels, relu, None)
        return parts, info, out_shape

    def join(self, block, shape: tuple[int, ...], before: int) -> tuple[int, ...]:
        """Place a :class:`Residual` or :class:`Concat` block reading a stream of ``before`` kept words
        followed by its input ``x`` of ``shape``; afterwards the stream holds those ``before`` words and
        the block's output. Returns the output shape."""
        lanes = self.arch.lanes
        branches, order = _branches(block)
        in_words = _words(shape, lanes)
        shapes = {letter: tuple(shape) for letter in "ab" if not branches[letter]}   # identity operands
        first = order[0]
        shapes[first] = tuple(self.sequence(branches[first], shape, before, keep_input=True))
        # the stream: before ++ x ++ first output
        x_kept = True
        if len(order) == 2:
            second = order[1]
            shapes[second], x_kept = self.second_branch(branches[second], shape, before, in_words,
                                                        _words(shapes[first], lanes))
        # the stream: before ++ (x if kept) ++ the computed outputs in order; the join stores all after `before`
        offsets, offset = {}, 0
        if x_kept:
            for letter in "ab":
                if not branches[letter]:
                    offsets[letter] = 0
            offset = in_words
        for letter in order:
            offsets[letter] = offset
            offset += _words(shapes[letter], lanes)
        parts, out_shape = _join_tiles(block, shapes, offsets, offset, lanes, self.act_fill)
        elements = int(np.prod(out_shape))
        params = block.add if isinstance(block, Residual) else block.params
        n_in = int(np.prod(shapes["a"])) + int(np.prod(shapes["b"]))
        info = ("add" if isinstance(block, Residual) else "concat", n_in, elements, params.clamp_lo > -128, 0)
        self.place(parts, info, before=before, stored=offset, keep=before)
        return out_shape

    def second_branch(self, layers, shape: tuple[int, ...], before: int, in_words: int,
                      after: int) -> tuple[tuple[int, ...], bool]:
        """Place the branch of a join computed second. Its first layer reads the block input ``x`` (of
        ``shape``, ``in_words`` words) from between ``before`` kept words and the first branch's output
        (``after`` words); its last tile forwards ``after`` alone if ``before`` is 0 (dropping ``x``),
        else everything (forwarded words form one range). Returns (output shape, whether ``x`` stayed)."""
        head, rest = layers[0], layers[1:]
        if isinstance(head, (Residual, Concat)):
            raise ValueError(f"a {type(head).__name__} block cannot start the second branch of a join (its "
                             f"input sits between other tensors in the stream); put a layer before it")
        parts, info, out_shape = self.layer_parts(head, shape)
        x_kept = before > 0
        keep = (0, before + in_words + after) if x_kept else (in_words, in_words + after)
        self.place(parts, info, before=before, stored=in_words, after=after, keep=keep)
        kept = keep[1] - keep[0]
        return tuple(self.sequence(rest, out_shape, kept, keep_input=False)), x_kept

    def sequence(self, layers, shape: tuple[int, ...], before: int, keep_input: bool) -> tuple[int, ...]:
        """Place ``layers`` reading a stream of ``before`` kept words followed by a tensor of ``shape``;
        ``keep_input``: the first layer keeps its input in the stream (it is a join's skip / identity
        operand / the input of its second branch). Returns the output shape (the stream then holds
        ``before`` (+ the input if kept) words and it)."""
        lanes = self.arch.lanes
        for index, layer in enumerate(layers):
            keep = keep_input and index == 0
            in_words = _words(shape, lanes)
            if isinstance(layer, (Residual, Concat)):
                if keep:
                    raise ValueError(f"a {type(layer).__name__} block cannot start a branch of a join (the "
                                     f"stream would have to carry the block input twice); put a layer before it")
                shape = self.join(layer, shape, before)
                continue
            parts, info, out_shape = self.layer_parts(layer, shape)
            self.place(parts, info, before=before, stored=in_words, keep=before + in_words if keep else before)
            if keep:
                before += in_words
            shape = out_shape
        return shape


def build_program(arch: Arch, layers: Sequence[Dense | Conv | Depthwise | MaxPool | Residual | Concat], *,
                  tail: str = "pass", act_fill: np.random.Generator | None = None,
                  input_shape: tuple[int, int, int] | None = None,
                  queue_words: int | Sequence[int] | None = None) -> Program:
    """A validated Program for ``layers`` on ``arch``. ``act_fill``: fill activation buffers with
    random bytes (the hardware overwrites them) instead of zeros. ``input_shape``: ``(C, H, W)`` if the
    network input is a feature map (needed when the first layer is a Conv or MaxPool). ``queue_words``: the forward
    queue of every tile that forwards or passes words (:meth:`TileConfig.with_queue`, right after its weights and
    banks): None, every free SRAM word; an int, that many words; a sequence, one entry per chain position (an entry
    that the tile's free SRAM cannot hold is an error)."""
    lanes = arch.lanes
    first = _first_layer(layers)
    shape: tuple[int, ...] = tuple(input_shape) if input_shape is not None else (first.n_in,)
    if input_shape is None and not isinstance(first, Dense):
        raise ValueError("a network starting with a windowed layer needs input_shape=(C, H, W)")
    input_spec = TensorSpec("x", shape, 1.0, 0, layout="chw" if len(shape) == 3 else "flat")
    builder = _Builder(arch, act_fill)
    shape = builder.sequence(layers, shape, 0, keep_input=False)
    tiles, infos = builder.tiles, builder.infos
    last_layer_tile = len(tiles) - 1
    output_spec = TensorSpec("y", shape, 1.0, 0, layout="chw" if len(shape) == 3 else "flat")
    output_words = output_spec.words(lanes)
    while len(tiles) < arch.n_tiles:
        row, col = arch.chain_position(len(tiles))
        if tail not in ("pass", "direct"):
            raise ValueError(f"tail must be 'pass' or 'direct', got {tail!r}")
        config = TileConfig(n_pass=output_words if tail == "pass" else 0)
        tiles.append(TileProgram(row, col, config, np.zeros((0, lanes), np.int8), np.zeros((0, 3), np.int64)))
    for position, tile in enumerate(tiles):
        words = queue_words if queue_words is None or isinstance(queue_words, int) else queue_words[position]
        if tile.config.queued_words:
            tile.config = tile.config.with_queue(arch, words)
        if tile.config.n_pass or tile.config.n_in_words:
            last = position == arch.n_tiles - 1 or (tail == "direct" and position == last_layer_tile)
            if last:
                tile.config = tile.config.replace(dest_host=1)
            else:
                dest_row, dest_col = arch.chain_position(position + 1)
                tile.config = tile.config.replace(dest_row=dest_row, dest_col=dest_col)
    program = Program(arch=arch, input=input_spec, output=output_spec, layers=infos, tiles=tiles,
                      model_name="program_builder")
    program.validate()
    return program


# --- goldens: plain numpy from the layer parameters (never from tile registers) -------------------

def _requantize(acc, bias, multiplier, shift, zp_out, clamp_lo, clamp_hi):
    acc = (acc + bias + 2**31) % 2**32 - 2**31
    return np.clip(shift_round_half_even(acc * multiplier, shift) + zp_out, clamp_lo, clamp_hi)


def _add_golden(add: AddParams, a: np.ndarray, b: np.ndarray, channels: int) -> np.ndarray:
    """Residual join: int64 ``[..., C']`` operands whose last axis runs over channels (``C' >= channels``:
    padding channels, which get the row ``(0, 0, 1)``); ``acc = bias_c + a*mult_a + b*mult_b``."""
    padded = a.shape[-1]
    bias, multiplier, shift = np.zeros(padded, np.int64), np.zeros(padded, np.int64), np.ones(padded, np.int64)
    default = -(add.zp_a * add.mult_a + add.zp_b * add.mult_b)
    bias[:channels] = _per_output(default if add.bias is None else add.bias, channels)
    multiplier[:channels] = _per_output(add.multiplier, channels)
    shift[:channels] = _per_output(add.shift, channels)
    return _requantize(a * add.mult_a + b * add.mult_b, bias, multiplier, shift, add.zp_out, add.clamp_lo,
                       add.clamp_hi)


def _concat_golden(params: ConcatParams, a: np.ndarray, b: np.ndarray, channels_a: int, channels_b: int) -> np.ndarray:
    """Channel concatenation: int64 operands ``[..., C_a]`` and ``[..., C_b']`` whose last axis runs over
    channels (``C_b' >= channels_b``: padding channels, which get the row ``(0, 0, 1)``); output channel
    ``c`` is ``bias_c + v_c * m`` requantized, ``v = a ++ b``, ``m = mult_a`` on a's channels, else ``mult_b``."""
    padded = channels_a + b.shape[-1]
    bias, multiplier, shift = np.zeros(padded, np.int64), np.zeros(padded, np.int64), np.ones(padded, np.int64)
    channels = channels_a + channels_b
    bias[:channels], multiplier[:channels], shift[:channels] = params.channel_parameters(channels_a, channels_b)
    acc = np.concatenate([a * params.mult_a, b * params.mult_b], axis=-1)
    return _requantize(acc, bias, multiplier, shift, params.zp_out, params.clamp_lo, params.clamp_hi)


def _join_operands(block, golden, values, shape):
    """The two operands of a join block and their shapes: ``golden(branch, values, shape)`` runs a branch
    (the identity if it is empty)."""
    branches, _ = _branches(block)
    operands = {}
    for letter in "ab":
        operands[letter] = golden(branches[letter], values, shape) if branches[letter] else (values, tuple(shape))
    return operands["a"], operands["b"]


def dense_golden(layers: Sequence[Dense | Residual | Concat], x: np.ndarray) -> np.ndarray:
    """Plain numpy forward pass of int8 dense layers and residual / concat blocks of them: int8 ``[batch,
    n_in]`` -> int8 ``[batch, n_out]``.

    ``acc = wrap32(bias + x @ W^T)``, ``y = clamp(round_half_even(acc * M / 2^S) + zp, lo, hi)``; a
    :class:`Residual` adds its input and its main branch's output with :class:`AddParams`, a
    :class:`Concat` concatenates its branches' outputs with :class:`ConcatParams`.
    """
    values = np.asarray(x, dtype=np.int64)
    for layer in layers:
        if isinstance(layer, (Residual, Concat)):
            def golden(branch, inputs, shape):
                out = dense_golden(branch, inputs).astype(np.int64)
                return out, (out.shape[1],)
            (a, _), (b, _) = _join_operands(layer, golden, values, (values.shape[1],))
            if isinstance(layer, Residual):
                values = _add_golden(layer.add, a, b, a.shape[1])
            else:
                values = _concat_golden(layer.params, a, b, a.shape[1], b.shape[1])
            continue
        acc = values @ layer.weights.astype(np.int64).T
        values = _requantize(acc, _per_output(layer.bias, layer.n_out), _per_output(layer.multiplier, layer.n_out),
                             _per_output(layer.shift, layer.n_out), layer.zp_out, layer.clamp_lo, layer.clamp_hi)
    return values.astype(np.int8)


def _inside(iy, ix, height, width):
    return 0 <= iy < height and 0 <= ix < width


def _golden_sequence(layers, values: np.ndarray, shape: tuple[int, ...], lanes: int):
    """``values``: the wire representation of a tensor of ``shape`` (see :func:`network_golden`)."""
    batch = values.shape[0]
    for layer in layers:
        if isinstance(layer, (Residual, Concat)):
            (a, shape_a), (b, shape_b) = _join_operands(
                layer, lambda branch, inputs, in_shape: _golden_sequence(branch, inputs, in_shape, lanes), values, shape)
            if isinstance(layer, Residual):
                values = _add_golden(layer.add, a, b, shape_a[0])
            else:  # a's channels fill whole words (C_a = CWa * L lanes); b's padding lanes follow
                values = _concat_golden(layer.params, a, b, shape_a[0], shape_b[0])
                shape = (shape_a[0] + shape_b[0],) + tuple(shape_a[1:])
            continue
        if isinstance(layer, Dense):  # a dense layer reads the words (pixel-major for a map) as its input
            flat = values.reshape(batch, -1)[:, :layer.n_in].astype(np.int8)
            out = dense_golden([layer], flat).astype(np.int64)
            values = np.zeros((batch, -(-layer.n_out // lanes) * lanes), dtype=np.int64)
            values[:, :layer.n_out] = out
            shape = (layer.n_out,)
            continue
        _, height, width, lane_count = values.shape
        kh, kw = layer.kernel
        top, left, bottom, right = layer.pads
        out_h = window_output_size(height, kh, layer.stride, top, bottom)
        out_w = window_output_size(width, kw, layer.stride, left, right)
        if isinstance(layer, Conv):
            c_out, c_in = layer.weights.shape[:2]
            weights = layer.weights.astype(np.int64)
            bias = _per_output(layer.bias, c_out)
            multiplier = _per_output(layer.multiplier, c_out)
            shift = _per_output(layer.shift, c_out)
            out = np.zeros((batch, out_h, out_w, -(-c_out // lanes) * lanes), dtype=np.int64)
            shape = (c_out, out_h, out_w)
        elif isinstance(layer, Depthwise):
            # every lane is a channel; padding channels: zero weights, parameters (0, 0, 1)
            channels = layer.weights.shape[0]
            weights = np.zeros((lane_count, kh, kw), dtype=np.int64)
            weights[:channels] = layer.weights
            bias, multiplier, shift = (np.zeros(lane_count, np.int64), np.zeros(lane_count, np.int64),
                                       np.ones(lane_count, np.int64))
            bias[:channels] = _per_output(layer.bias, channels)
            multiplier[:channels] = _per_output(layer.multiplier, channels)
            shift[:channels] = _per_output(layer.shift, channels)
            out = np.zeros((batch, out_h, out_w, lane_count), dtype=np.int64)
            shape = (shape[0], out_h, out_w)
        else:
            out = np.zeros((batch, out_h, out_w, lane_count), dtype=np.int64)
            shape = (shape[0], out_h, out_w)
        for oy in range(out_h):
            for ox in range(out_w):
                if isinstance(layer, Conv):
                    acc = np.zeros((batch, c_out), np.int64)
                elif isinstance(layer, Depthwise):
                    acc = np.zeros((batch, lane_count), np.int64)
                else:
                    best = None
                for ky in range(kh):
                    for kx in range(kw):
                        iy, ix = oy * layer.stride + ky - top, ox * layer.stride + kx - left
                        if isinstance(layer, Conv):
                            # padding is the input zero point on every lane (real zero)
                            window = (values[:, iy, ix, :c_in] if _inside(iy, ix, height, width)
                                      else np.full((batch, c_in), layer.zp_in, dtype=np.int64))
                            acc += window @ weights[:, :, ky, kx].T
                        elif isinstance(layer, Depthwise):  # channel by channel; padding reads zp_in
                            window = (values[:, iy, ix] if _inside(iy, ix, height, width)
                                      else np.full((batch, lane_count), layer.zp_in, dtype=np.int64))
                            acc += window * weights[:, ky, kx]
                        else:  # padding reads -128 on every lane, padding channels included
                            window = (values[:, iy, ix] if _inside(iy, ix, height, width)
                                      else np.full((batch, lane_count), -128, dtype=np.int64))
                            best = window if best is None else np.maximum(best, window)
                if isinstance(layer, Conv):
                    out[:, oy, ox, :c_out] = _requantize(acc, bias, multiplier, shift, layer.zp_out,
                                                         layer.clamp_lo, layer.clamp_hi)
                elif isinstance(layer, Depthwise):
                    out[:, oy, ox] = _requantize(acc, bias, multiplier, shift, layer.zp_out, layer.clamp_lo,
                                                 layer.clamp_hi)
                else:
                    out[:, oy, ox] = np.clip(best, layer.clamp_lo, layer.clamp_hi)
        values = out
    return values, shape


def network_golden(layers, x: np.ndarray, input_shape: tuple[int, int, int] | None, lanes: int) -> np.ndarray:
    """Plain forward pass straight from sections 4 to 4.3 on the wire representation: a feature
    map is int64 ``[batch, H, W, CW*L]`` (padding channels travel as lanes too, and layers compute them
    as the hardware does), a vector ``[batch, words*L]``. Handles every layer type here, residual and
    concat blocks included (the add works lane by lane on the wire representation, the concat appends
    b's lanes to a's whole words; padding channels get the parameter row ``(0, 0, 1)``).

    ``x`` is int8 ``[batch, C*H*W]`` in model (CHW) order (``[batch, n]`` if ``input_shape`` is None).
    Returns the int8 flits the host receives, ``[batch * words, L]``."""
    batch = x.shape[0]
    if input_shape is None:
        shape = (x.shape[1],)
        values = np.zeros((batch, -(-x.shape[1] // lanes) * lanes), dtype=np.int64)
        values[:, :x.shape[1]] = x
    else:
        channels, height, width = shape = tuple(input_shape)
        cw_count = -(-channels // lanes)
        values = np.zeros((batch, height, width, cw_count * lanes), dtype=np.int64)
        values[..., :channels] = x.reshape(batch, channels, height, width).transpose(0, 2, 3, 1)
    values, _ = _golden_sequence(layers, values, shape, lanes)
    return values.reshape(-1, lanes).astype(np.int8)
