"""Hand-built flowtile programs for tests: dense, convolution, depthwise and max-pool layers mapped onto the chain
as docs/architecture.md sections 1 and 4.1 describe, without the compiler.

    layers = [Dense(W, bias, multiplier, shift, zp_out, clamp_lo, clamp_hi, tiles=2), ...]
    program = build_program(Arch(rows=2, cols=2, lanes=4), layers)
    golden = dense_golden(layers, x_int8)          # plain numpy reference of the same arithmetic

    layers = [Conv(W4, bias, multiplier, shift, zp_in, zp_out, lo, hi, stride=2, pads=(1, 1, 1, 1), tiles=2),
              MaxPool(2, 2, stride=2), Dense(W, ...)]
    program = build_program(arch, layers, input_shape=(C, H, W))   # input travels as a "chw" map

Mapping: a layer split over ``m`` consecutive chain tiles; tile ``i`` of ``m`` has ``n_in_words = K``
(words of the layer input), stores all of them and forwards all of them iff ``i < m-1``, ``n_pass`` = result words of tiles ``0..i-1``,
destination the next chain tile (the host for the last chain position). A dense tile computes a
slice of the outputs (a multiple of ``lanes`` except the last), ``w_base = 0``, ``act_base = n_out * K``.
A windowed tile (section 4.1) computes a band of output rows for every output channel: a conv tile
holds all weights at ``w_base = 0``, SRAM row ``o*K_w + (ky*KW + kx)*CW + cw`` lane ``l`` = weight
``[o, cw*L + l, ky, kx]`` (zero for padding channels), ``act_base = C_out * K_w``, ``pad_value`` = the
input zero point; a max-pool tile has no weights (``act_base = 0``), ``n_out = CW * L`` zero parameter
rows and ``pad_value = -128``. A depthwise tile (``op = LANE``) holds its ``CW * KH * KW`` weight words at
``w_base = 0``, SRAM row ``cw*KH*KW + ky*KW + kx`` lane ``l`` = weight ``[cw*L + l, ky, kx]``, ``act_base =
CW * KH * KW``, ``n_out = CW * L`` parameter rows ``(bias, multiplier, shift)`` of channel ``cw*L + l``
(padding channels: zero weights and the row ``(0, 0, 1)``, so their lanes hold ``clamp(zp_out)``),
``pad_value`` = the input zero point; an average pool is a depthwise layer with all-one weights
(:func:`average_pool`). Feature maps travel pixel-major, ``CW = ceil(C / L)`` words a pixel;
a dense layer after a map reads its ``H * W * CW`` words as its input, i.e. its ``n_in`` is
``H * W * CW * L`` (the flattened wire order, padding lanes included).
Tiles after the last layer pass the output through (``tail="pass"``), or stay idle while the last
layer's last tile sends straight to the host along the XY route (``tail="direct"``).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from flowtile.arch import CONFIG_FIELDS, OP_LANE, OP_MAC, OP_MAX, Arch, dense_window_registers, stream_registers
from flowtile.program import LayerInfo, Program, TensorSpec, TileProgram

__all__ = ["Dense", "Conv", "Depthwise", "MaxPool", "average_pool", "build_program", "dense_golden", "split_outputs", "split_rows",
           "blank_config", "window_output_size"]


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


def build_program(arch: Arch, layers: Sequence[Dense | Conv | Depthwise | MaxPool], *, tail: str = "pass",
                  act_fill: np.random.Generator | None = None,
                  input_shape: tuple[int, int, int] | None = None) -> Program:
    """A validated Program for ``layers`` on ``arch``. ``act_fill``: fill activation buffers with
    random bytes (the hardware overwrites them) instead of zeros. ``input_shape``: ``(C, H, W)`` if the
    network input is a feature map (needed when the first layer is a Conv or MaxPool)."""
    lanes = arch.lanes
    tiles: list[TileProgram] = []
    infos = []
    shape: tuple[int, ...] = tuple(input_shape) if input_shape is not None else (layers[0].n_in,)
    if input_shape is None and not isinstance(layers[0], Dense):
        raise ValueError("a network starting with a windowed layer needs input_shape=(C, H, W)")
    input_spec = TensorSpec("x", shape, 1.0, 0, layout="chw" if len(shape) == 3 else "flat")
    for index, layer in enumerate(layers):
        if isinstance(layer, Dense):
            wire = (shape[1] * shape[2] * -(-shape[0] // lanes) * lanes) if len(shape) == 3 else shape[0]
            if layer.n_in != wire:
                raise ValueError(f"layer {index} has {layer.n_in} inputs, its input has {wire} elements on the wire")
            k_words = -(-layer.n_in // lanes)
            parts = list(_dense_tiles(layer, k_words, lanes, act_fill))
            info = ("dense", layer.n_in, layer.n_out, layer.clamp_lo > -128)
            shape = (layer.n_out,)
        else:
            if len(shape) != 3:
                raise ValueError(f"layer {index} ({type(layer).__name__}) needs a feature map input")
            parts, out_shape = _window_tiles(layer, shape, lanes, act_fill)
            kernel_h, kernel_w = layer.kernel
            out_pixels = out_shape[1] * out_shape[2]
            if isinstance(layer, Conv):  # report only: n_in * n_out = the layer's MACs
                info = ("conv", shape[0] * kernel_h * kernel_w, out_shape[0] * out_pixels, layer.clamp_lo > -128)
            elif isinstance(layer, Depthwise):
                info = ("depthwise", kernel_h * kernel_w, out_shape[0] * out_pixels, layer.clamp_lo > -128)
            else:
                info = ("maxpool", 0, out_shape[0] * out_pixels, layer.clamp_lo > -128)
            shape = out_shape
        coords = []
        passed = 0
        for i, (config, sram, params, n_words) in enumerate(parts):
            position = len(tiles)
            if position >= arch.n_tiles:
                raise ValueError(f"the layers need more than the {arch.n_tiles} tiles of the grid")
            row, col = arch.chain_position(position)
            config.update(stream_registers(config["n_in_words"], forward=i < len(parts) - 1), n_pass=passed)
            tiles.append(TileProgram(row, col, config, sram, params))
            coords.append((row, col))
            passed += n_words
        op, n_in, n_out, relu = info
        infos.append(LayerInfo(f"{op}{index}", op, n_in, n_out, tuple(coords), relu=relu))
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


def dense_golden(layers: Sequence[Dense], x: np.ndarray) -> np.ndarray:
    """Plain numpy forward pass of int8 dense layers: int8 ``[batch, n_in]`` -> int8 ``[batch, n_out]``.

    ``acc = wrap32(bias + x @ W^T)``, ``y = clamp(((acc * M + 2^(S-1)) >> S) + zp, lo, hi)``.
    """
    values = np.asarray(x, dtype=np.int64)
    for layer in layers:
        acc = values @ layer.weights.astype(np.int64).T + _per_output(layer.bias, layer.n_out)
        acc = (acc + 2**31) % 2**32 - 2**31
        multiplier = _per_output(layer.multiplier, layer.n_out)
        shift = _per_output(layer.shift, layer.n_out)
        scaled = shift_round_half_even(acc * multiplier, shift)
        values = np.clip(scaled + layer.zp_out, layer.clamp_lo, layer.clamp_hi)
    return values.astype(np.int8)
