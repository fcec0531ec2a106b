"""Hand-built flowtile programs for tests: dense, convolution, depthwise, max-pool layers and residual
blocks mapped onto the chain as docs/architecture.md sections 1, 4.1 and 4.2 describe, without the compiler.

    layers = [Dense(W, bias, multiplier, shift, zp_out, clamp_lo, clamp_hi, tiles=2), ...]
    program = build_program(Arch(rows=2, cols=2, lanes=4), layers)
    golden = dense_golden(layers, x_int8)          # plain numpy reference of the same arithmetic

    layers = [Conv(W4, bias, multiplier, shift, zp_in, zp_out, lo, hi, stride=2, pads=(1, 1, 1, 1), tiles=2),
              MaxPool(2, 2, stride=2), Dense(W, ...)]
    program = build_program(arch, layers, input_shape=(C, H, W))   # input travels as a "chw" map
    flits = network_golden(layers, x_int8, (C, H, W), lanes)        # what the host receives

    layers = [Conv(...), Residual(main=[Conv(..., tiles=2), Depthwise(...)],
                                  add=AddParams(mult_a, mult_b, multiplier, shift, zp_a, zp_b, zp_out), tiles=2)]

Mapping: a layer split over ``m`` consecutive chain tiles; ``n_pass`` of tile ``i`` = result words of
tiles ``0..i-1``, destination the next chain tile (the host for the last chain position). The stream a
layer reads holds, per inference, ``B`` words of tensors kept for later (residual skips, section 4.2)
followed by the layer input's ``K_in`` words: every tile has ``n_in_words = K = B + K_in``, stores
``[B, K)``, forwards ``[0, K)`` if it is not the layer's last tile; the last tile forwards ``[0, B)``, or
``[0, K)`` if the layer is the first of a residual main branch (its input is the block's skip). Without
residual blocks ``B = 0``: store everything, forward everything but on the last tile
(``flowtile.arch.stream_registers``). A :class:`Residual` block ends with ADD tiles (row bands; op = ADD,
kernel 1x2, ``out_width = in_width``) that store ``[B, K)`` = skip ++ main output, ``add_offset`` = the
skip's words, ``act_base = 0``, ``n_out = CW * L`` parameter rows from :class:`AddParams` (a flat
vector is a 1x1 map of ``ceil(n / L)`` words, channel ``c`` = element ``c``), and whose last tile
forwards ``[0, B)``.

A dense tile computes a slice of the outputs (a multiple of ``lanes`` except the last), ``w_base = 0``,
``act_base = n_out * K_in``. A windowed tile (section 4.1) computes a band of output rows for every
output channel: a conv tile holds all weights at ``w_base = 0``, SRAM row ``o*K_w + (ky*KW + kx)*CW + cw``
lane ``l`` = weight ``[o, cw*L + l, ky, kx]`` (zero for padding channels), ``act_base = C_out * K_w``,
``pad_value`` = the input zero point; a max-pool tile has no weights (``act_base = 0``), ``n_out = CW * L``
zero parameter rows and ``pad_value = -128``. A depthwise tile (``op = LANE``) holds its ``CW * KH * KW``
weight words at ``w_base = 0``, SRAM row ``cw*KH*KW + ky*KW + kx`` lane ``l`` = weight ``[cw*L + l, ky,
kx]``, ``act_base = CW * KH * KW``, ``n_out = CW * L`` parameter rows ``(bias, multiplier, shift)`` of
channel ``cw*L + l`` (padding channels: zero weights and the row ``(0, 0, 1)``, so their lanes hold
``clamp(zp_out)``), ``pad_value`` = the input zero point; an average pool is a depthwise layer with
all-one weights (:func:`average_pool`). Feature maps travel pixel-major, ``CW = ceil(C / L)`` words a
pixel; a dense layer after a map reads its ``H * W * CW`` words as its input, i.e. its ``n_in`` is
``H * W * CW * L`` (the flattened wire order, padding lanes included).
Tiles after the last layer pass the output through (``tail="pass"``), or stay idle while the last
layer's last tile sends straight to the host along the XY route (``tail="direct"``).

The goldens (:func:`dense_golden`, :func:`network_golden`) compute the network in plain numpy from the
layer parameters, never from tile registers.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from flowtile.arch import ADD_MULT_MAX, CONFIG_FIELDS, OP_ADD, OP_LANE, OP_MAC, OP_MAX, Arch, dense_window_registers
from flowtile.program import LayerInfo, Program, TensorSpec, TileProgram

__all__ = ["Dense", "Conv", "Depthwise", "MaxPool", "AddParams", "Residual", "average_pool", "build_program",
           "dense_golden", "network_golden", "split_outputs", "split_rows", "blank_config", "window_output_size"]


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
    ``tiles``: chain tiles (output row bands), or the explicit output row count of each."""

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

    @property
    def kernel(self) -> tuple[int, int]:
        return self.weights.shape[2], self.weights.shape[3]


class Depthwise(NamedTuple):
    """One int8 depthwise 2-D convolution (``group = C``, one filter per channel; op = LANE of section
    4.1). ``bias``/``multiplier``/``shift`` are scalars or per-channel; padding reads ``zp_in``.
    ``tiles``: chain tiles (output row bands), or the explicit output row count of each."""

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
    """Max pooling over ``kernel_h x kernel_w`` windows (padding never wins: it reads -128), then clamp."""

    kernel_h: int
    kernel_w: int
    stride: int = 1
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    clamp_lo: int = -128
    clamp_hi: int = 127
    tiles: int | Sequence[int] = 1

    @property
    def kernel(self) -> tuple[int, int]:
        return self.kernel_h, self.kernel_w


class AddParams(NamedTuple):
    """The requantized elementwise add of a residual join (op = ADD, section 4.2): element (channel) ``c``
    of ``y`` is ``clamp(round_half_even(wrap32(bias_c + a_c * mult_a + b_c * mult_b) * M_c / 2^S_c) +
    zp_out, clamp_lo, clamp_hi)``, ``a`` the block input (the skip) and ``b`` the main branch's output.
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
    (operand a) and the main branch's output (operand b), which must have ``x``'s shape. Blocks nest
    (not as the first layer of a main branch, which would need ``x`` twice in the stream)."""

    main: Sequence
    add: AddParams
    tiles: int | Sequence[int] = 1


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


def blank_config() -> dict[str, int]:
    """Every register zero: an idle tile."""
    return {name: 0 for name, _, _ in CONFIG_FIELDS}


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
        yield config, np.concatenate([weights, _fill(act_fill, k_words, lanes)]), params, -(-n_out // lanes)
        start += n_out


def _window_tiles(layer, shape: tuple[int, int, int], lanes: int, act_fill):
    """(config, sram, params, result words) per tile of a conv or max-pool layer, and its output shape."""
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
        common.update(op=OP_MAC, n_out=c_out, act_base=c_out * window_words, pad_value=layer.zp_in,
                      zp_out=layer.zp_out)
        out_channels, per_pixel = c_out, -(-c_out // lanes)
    elif isinstance(layer, Depthwise):
        if layer.channels != channels:
            raise ValueError(f"Depthwise has {layer.channels} channels, its input map has {channels}")
        padded, params = layer.lane_parameters(lanes)
        window = kernel_h * kernel_w
        # word cw*KH*KW + ky*KW + kx, lane l: weight of channel cw*L + l at (ky, kx)
        weights = (padded.reshape(words_per_pixel, lanes, window).transpose(0, 2, 1)
                   .reshape(words_per_pixel * window, lanes))
        common.update(op=OP_LANE, n_out=words_per_pixel * lanes, act_base=words_per_pixel * window,
                      pad_value=layer.zp_in, zp_out=layer.zp_out)
        out_channels, per_pixel = channels, words_per_pixel
    else:
        weights = np.zeros((0, lanes), dtype=np.int8)
        params = np.zeros((words_per_pixel * lanes, 3), dtype=np.int64)
        common.update(op=OP_MAX, n_out=words_per_pixel * lanes, act_base=0, pad_value=-128, zp_out=0)
        out_channels, per_pixel = channels, words_per_pixel
    tiles = []
    row = 0
    for rows in split_rows(out_height, layer.tiles):
        config = blank_config()
        config.update(common, out_row_begin=row, out_rows=rows)
        sram = np.concatenate([weights, _fill(act_fill, k_words, lanes)])
        tiles.append((config, sram, params.copy(), rows * out_width * per_pixel))
        row += rows
    return tiles, (out_channels, out_height, out_width)


def _words(shape: tuple[int, ...], lanes: int) -> int:
    """Flits one tensor of ``shape`` takes: a ``(C, H, W)`` map pixel-major, a ``(n,)`` vector flat."""
    if len(shape) == 3:
        return shape[1] * shape[2] * -(-shape[0] // lanes)
    return -(-shape[0] // lanes)


def _add_tiles(add: AddParams, tiles, shape: tuple[int, ...], lanes: int, act_fill):
    """(config, sram, params, result words) per tile of the ADD of a residual join (section 4.2): row
    bands of the map (a flat vector is one 1x1 pixel of ``ceil(n / L)`` words, so one band). The
    registers address operand ``a`` at stored offset 0 and ``b`` at ``add_offset`` = one tensor's
    words; ``n_in_words`` and the RECV ranges are set by the caller."""
    height, width, channels = (shape[1], shape[2], shape[0]) if len(shape) == 3 else (1, 1, shape[0])
    words_per_pixel = -(-channels // lanes)
    map_words = height * width * words_per_pixel
    for name, value in (("mult_a", add.mult_a), ("mult_b", add.mult_b)):
        if not 0 <= value <= ADD_MULT_MAX:
            raise ValueError(f"AddParams.{name} = {value} outside 0..{ADD_MULT_MAX}")
    params = add.lane_parameters(channels, lanes)
    common = dict(op=OP_ADD, in_height=height, in_width=width, words_per_pixel=words_per_pixel, kernel_h=1,
                  kernel_w=2, stride=1, out_width=width, n_out=words_per_pixel * lanes, w_base=0, act_base=0,
                  add_offset=map_words, add_mult_a=add.mult_a, add_mult_b=add.mult_b, zp_out=add.zp_out,
                  clamp_lo=add.clamp_lo, clamp_hi=add.clamp_hi)
    parts, row = [], 0
    for rows in split_rows(height, tiles):
        config = blank_config()
        config.update(common, out_row_begin=row, out_rows=rows)
        parts.append((config, _fill(act_fill, 2 * map_words, lanes), params.copy(), rows * width * words_per_pixel))
        row += rows
    return parts


class _Builder:
    """Places layers on consecutive chain tiles, keeping track of the tensors the stream carries."""

    def __init__(self, arch: Arch, act_fill):
        self.arch, self.act_fill = arch, act_fill
        self.tiles: list[TileProgram] = []
        self.infos: list[LayerInfo] = []

    def place(self, parts, info, *, before: int, stored: int, keep: int) -> None:
        """The tiles of one layer. Its stream per inference is ``before`` words of tensors kept for later,
        then its input (``stored`` words, which every tile stores); every tile but the last forwards the
        whole stream, the last forwards its first ``keep`` words (the tensors still needed after it)."""
        k_words = before + stored
        coords, passed = [], 0
        for i, (config, sram, params, n_words) in enumerate(parts):
            position = len(self.tiles)
            if position >= self.arch.n_tiles:
                raise ValueError(f"the layers need more than the {self.arch.n_tiles} tiles of the grid")
            row, col = self.arch.chain_position(position)
            config.update(n_in_words=k_words, store_begin=before, store_end=k_words, forward_begin=0,
                          forward_end=k_words if i < len(parts) - 1 else keep, n_pass=passed)
            self.tiles.append(TileProgram(row, col, config, sram, params))
            coords.append((row, col))
            passed += n_words
        op, n_in, n_out, relu, macs = info
        self.infos.append(LayerInfo(f"{op}{len(self.infos)}", op, n_in, n_out, tuple(coords), relu=relu,
                                    mac_count=macs))

    def sequence(self, layers, shape: tuple[int, ...], before: int, keep_input: bool) -> tuple[int, ...]:
        """Place ``layers`` reading a stream of ``before`` kept words followed by a tensor of ``shape``;
        ``keep_input``: the first layer keeps its input in the stream (it is a residual block's skip).
        Returns the output shape (the stream then holds ``before`` (+ the input if kept) words and it)."""
        lanes = self.arch.lanes
        for index, layer in enumerate(layers):
            keep = keep_input and index == 0
            in_words = _words(shape, lanes)
            if isinstance(layer, Residual):
                if keep:
                    raise ValueError("a Residual block cannot start a residual main branch (the stream would "
                                     "have to carry the block input twice); put a layer before it")
                if not layer.main:
                    raise ValueError("a Residual block needs at least one main-branch layer")
                main_shape = self.sequence(layer.main, shape, before, keep_input=True)
                if tuple(main_shape) != tuple(shape):
                    raise ValueError(f"Residual main branch maps {list(shape)} to {list(main_shape)}; "
                                     f"the add needs the same shape")
                parts = _add_tiles(layer.add, layer.tiles, shape, lanes, self.act_fill)
                elements = int(np.prod(shape))
                info = ("add", 2 * elements, elements, layer.add.clamp_lo > -128, 0)
                self.place(parts, info, before=before, stored=2 * in_words, keep=before)
                continue
            if isinstance(layer, Dense):
                wire = (shape[1] * shape[2] * -(-shape[0] // lanes) * lanes) if len(shape) == 3 else shape[0]
                if layer.n_in != wire:
                    raise ValueError(f"layer {type(layer).__name__} has {layer.n_in} inputs, its input has {wire} "
                                     f"elements on the wire")
                parts = list(_dense_tiles(layer, in_words, lanes, self.act_fill))
                info = ("dense", layer.n_in, layer.n_out, layer.clamp_lo > -128, None)
                out_shape = (layer.n_out,)
            else:
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
            self.place(parts, info, before=before, stored=in_words, keep=before + in_words if keep else before)
            if keep:
                before += in_words
            shape = out_shape
        return shape


def build_program(arch: Arch, layers: Sequence[Dense | Conv | Depthwise | MaxPool | Residual], *,
                  tail: str = "pass", act_fill: np.random.Generator | None = None,
                  input_shape: tuple[int, int, int] | None = None) -> Program:
    """A validated Program for ``layers`` on ``arch``. ``act_fill``: fill activation buffers with
    random bytes (the hardware overwrites them) instead of zeros. ``input_shape``: ``(C, H, W)`` if the
    network input is a feature map (needed when the first layer is a Conv or MaxPool)."""
    lanes = arch.lanes
    first = layers[0]
    while isinstance(first, Residual):
        first = first.main[0]
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
        config = blank_config()
        if tail == "pass":
            config["n_pass"] = output_words
        elif tail != "direct":
            raise ValueError(f"tail must be 'pass' or 'direct', got {tail!r}")
        tiles.append(TileProgram(row, col, config, np.zeros((0, lanes), np.int8), np.zeros((0, 3), np.int64)))
    for position, tile in enumerate(tiles):
        if tile.config["n_pass"] or tile.config["n_in_words"]:
            last = position == arch.n_tiles - 1 or (tail == "direct" and position == last_layer_tile)
            if last:
                tile.config["dest_host"] = 1
            else:
                tile.config["dest_row"], tile.config["dest_col"] = arch.chain_position(position + 1)
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


def dense_golden(layers: Sequence[Dense | Residual], x: np.ndarray) -> np.ndarray:
    """Plain numpy forward pass of int8 dense layers and residual blocks of them: int8 ``[batch, n_in]``
    -> int8 ``[batch, n_out]``.

    ``acc = wrap32(bias + x @ W^T)``, ``y = clamp(round_half_even(acc * M / 2^S) + zp, lo, hi)``; a
    :class:`Residual` adds its input and its main branch's output with :class:`AddParams`.
    """
    values = np.asarray(x, dtype=np.int64)
    for layer in layers:
        if isinstance(layer, Residual):
            main = dense_golden(layer.main, values).astype(np.int64)
            values = _add_golden(layer.add, values, main, values.shape[1])
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
        if isinstance(layer, Residual):
            main, _ = _golden_sequence(layer.main, values, shape, lanes)
            values = _add_golden(layer.add, values, main, shape[0])
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
    """Plain forward pass straight from sections 4, 4.1 and 4.2 on the wire representation: a feature
    map is int64 ``[batch, H, W, CW*L]`` (padding channels travel as lanes too, and layers compute them
    as the hardware does), a vector ``[batch, words*L]``. Handles every layer type here, residual blocks
    included (the add works lane by lane on the wire representation, padding channels with the
    parameter row ``(0, 0, 1)``).

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
