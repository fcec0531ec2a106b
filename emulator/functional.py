"""Bit-exact data model of a flowtile run (docs/architecture.md sections 1-4).

Everything here is derived from the tiles' configuration registers, SRAM images and parameter tables,
never from the compiler's layer descriptions. Two parts:

* :func:`emulator.path.trace_data_path` (shared with the timing model) follows the flits the way the hardware
  moves them and gives each PE's counts.
* :func:`run_functional` computes, vectorized over the batch, every PE's output flit stream:
  per inference ``(RECV words forward_begin..forward_end) ++ (the P_bulk first pass flits) ++ per output
  pixel q (pass_per_pixel pass flits ++ its W_px result words of pixel q)`` (section 4: the output side
  pops the forward queue, which the input side fills with the forwarded RECV words and the PASS words in
  order, and EMITs the results; section 4.4: ``P_bulk = P - n_pix * pass_per_pixel``, ``W_px = E / n_pix``;
  with ``pass_per_pixel = 0`` this is all pops, then all EMITs). Output pixels are section 4.1's pixel list of
  the tile (``TileConfig.output_pixel_positions``): ``out_rows`` rows from ``out_row_begin``, the first from
  column ``out_col_begin``, the last ending before column ``out_col_end`` (0: ``out_width``); ``n_pix``, the
  result word numbering and the interleaving run over it. COMPUTE of inference ``s``
  reads the stored RECV words ``store_begin..store_end`` (and ``store2_begin..store2_end``) of ``s`` from activation bank ``s mod 2``
  (section 4.2: a stream may hold several tensors, one after the other); weights overlapping the banks are
  modelled bank by bank (:func:`weight_memory`), and refused where what COMPUTE reads would depend on
  timing. Results follow section 4.1 (windowed layers): the windows of
  every output pixel are gathered im2col-style with index arrays; a dense layer is the 1x1 case and
  takes the same path. The same gather serves MAC (a GEMM over the window), MAX (a lane-wise max) and
  LANE (a lane-wise multiply-accumulate with per-lane requantization: depthwise convolution, average
  pools). ADD (section 4.2, residual joins) and CONCAT (section 4.3, channel concatenation) need no
  gather: each of their two operands is a contiguous slice of the stored words (at ``operand_a_offset``
  and ``operand_b_offset``, in either order).

A tile of several contexts (section 4.6) runs its contexts in turn on the stream: context ``c`` reads context ``c -
1``'s output stream, each with its own registers, weights and banks in the tile's one SRAM image and its parameter
rows from ``param_base`` (:func:`context_program`); the last context's output is the tile's. A tile of several
turns (section 12, replicated stages) runs its one context ``turns`` times per program inference, each turn on the
next part of the stream, and its output is the turns' outputs one after the other.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from flowtile.arch import ACC_BITS, ACTIVATION_BANKS, OP_ADD, OP_BCAST, OP_CONCAT, OP_LANE, OP_MAC, OP_MAX, Arch
from flowtile.link_format import flit_lanes
from flowtile.program import Program, TileProgram
from flowtile.tile_config import TileConfig

from .path import DataPath, EmulatorError, TileCounts, trace_data_path

__all__ = ["FunctionalResult", "run_functional", "pe_results", "weight_memory", "racing_banks", "check_bank_races",
           "window_pixels", "check_input_flits", "context_program"]


# --- arithmetic ---------------------------------------------------------------------------------

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


def _int8_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` of two int8 matrices as int64, by one float64 GEMM: exact, since every partial sum is an integer of
    magnitude at most ``K * 2^14`` (``K`` = ``a.shape[1]``, far below ``2^53`` for any window a tile reads)."""
    return (a.astype(np.float64) @ b.astype(np.float64)).astype(np.int64)


def _wrap_accumulator(values: np.ndarray) -> np.ndarray:
    """Two's-complement wrap of int64 values to ACC_BITS bits."""
    half = np.int64(1 << (ACC_BITS - 1))
    return ((values + half) & np.int64((1 << ACC_BITS) - 1)) - half


def window_pixels(config: TileConfig) -> np.ndarray:
    """Input pixel read by each window position of each output pixel: int64 ``[n_pix, KH*KW]``,
    pixel index ``y * in_width + x``, or ``in_height * in_width`` (the padding pixel) outside the map.

    Output pixels are section 4.1's band (:meth:`TileConfig.output_pixel_positions`): rows
    ``[out_row_begin, out_row_begin + out_rows)`` row-major, the first from column ``out_col_begin``, the last
    ending before column ``out_col_end`` (0: ``out_width``), i.e. the ``n_pix`` consecutive row-major pixels of
    an ``out_width``-wide output map from ``out_row_begin * out_width + out_col_begin`` on; window positions run
    ``ky * KW + kx``."""
    height, width = config.in_height, config.in_width
    kernel_h, kernel_w, stride = config.kernel_h, config.kernel_w, config.stride
    oy, ox = _band_positions(config)
    iy = oy[:, None, None] * stride + np.arange(kernel_h)[None, :, None] - config.pad_top
    ix = ox[:, None, None] * stride + np.arange(kernel_w)[None, None, :] - config.pad_left
    inside = (iy >= 0) & (iy < height) & (ix >= 0) & (ix < width)
    pixel = np.where(inside, iy * width + ix, height * width)
    return pixel.reshape(len(oy), kernel_h * kernel_w).astype(np.int64)


def _band_positions(config: TileConfig) -> tuple[np.ndarray, np.ndarray]:
    """``(oy, ox)``, int64 ``[n_pix]`` each, of a tile's output pixels in COMPUTE's order (section 4.1; the
    same list as :meth:`TileConfig.output_pixel_positions`): the band is ``n_pix`` consecutive pixels of
    the row-major ``out_width``-wide output map, starting at ``out_row_begin * out_width + out_col_begin``."""
    width = config.out_width
    first = config.out_row_begin * width + config.out_col_begin
    index = first + np.arange(max(0, config.output_pixels), dtype=np.int64)
    return index // width, index % width


#: Most window elements gathered at once (about this many x 9 bytes of temporaries).
IM2COL_ELEMENTS = 1 << 22

_DENSE_WINDOW = {"in_height": 1, "in_width": 1, "kernel_h": 1, "kernel_w": 1, "pad_top": 0, "pad_left": 0,
                 "out_row_begin": 0, "out_rows": 1, "out_width": 1}


def _is_dense(config: TileConfig) -> bool:
    """One 1x1 window on a one-pixel map at its only pixel (stride and pad_value never matter)."""
    return all(getattr(config, name) == value for name, value in _DENSE_WINDOW.items())


def _gather_windows(config: TileConfig, activations: np.ndarray, lanes: int) -> np.ndarray:
    """im2col: int8 ``[batch, n_pix, KH*KW, CW, L]``, the activation words every issue cycle reads (MAX and LANE:
    only their channel group's ``N_g`` words of a pixel, from ``group_word_begin``, section 4.4).

    ``activations`` is int8 ``[batch, stored words, L]`` (what RECV wrote at ``act_base``); padding positions
    read a word whose every lane is ``pad_value``."""
    batch = activations.shape[0]
    n_pixels = config.in_height * config.in_width
    if config.op == OP_BCAST and config.in_dense:   # section 4.5: byte in_dense_offset + p*C + c -> pixel-major
        channels, offset = config.in_channels, config.in_dense_offset
        dense = activations.reshape(batch, -1)[:, offset:offset + n_pixels * channels]
        padded = np.zeros((batch, n_pixels, config.words_per_pixel * lanes), dtype=np.int8)
        padded[:, :, :channels] = dense.reshape(batch, n_pixels, channels)
        activations = padded
    pixels = activations.reshape(batch, n_pixels, config.words_per_pixel, lanes)
    if config.op in (OP_MAX, OP_LANE):
        pixels = pixels[:, :, config.group_slice]
    words_per_pixel = pixels.shape[2]
    if _is_dense(config):  # the single window is the whole input
        return pixels[:, None]
    index = window_pixels(config)
    if (index == n_pixels).any():
        padded = np.empty((batch, n_pixels + 1, words_per_pixel, lanes), dtype=np.int8)
        padded[:, :n_pixels] = pixels
        padded[:, n_pixels] = config.pad_value
        pixels = padded
    return pixels[:, index]


def pe_results(tile: TileProgram, count: TileCounts, activations: np.ndarray, arch: Arch,
               weights: np.ndarray | None = None) -> np.ndarray:
    """Result words of one PE for a batch: int8 ``[batch, n_pix * N_r, L]`` (sections 4 to 4.3).

    ``activations`` is int8 ``[batch, B, L]``, the stored RECV flits of each inference ``s`` (both store ranges,
    the second's after the first's), written to SRAM bank ``s mod 2`` (words ``act_base + (s mod 2) * B + k -
    store_begin`` for the first range)
    before COMPUTE reads them. MAC and LANE also read weight words (MAC: ``w_base + o*K_w + k``, LANE:
    ``w_base + cw*KH*KW + ky*KW + kx``); ``weights`` is what they read, int8 ``[w_words, L]`` or per inference
    ``[batch, w_words, L]`` (default: :func:`weight_memory` of the whole batch; give it when ``activations``
    is a slice of the batch, since what a weight word overlapping a bank holds depends on the inference's
    index). ADD and CONCAT read stored words only (their operands lie inside them: ``TileConfig.validate``).
    """
    lanes, batch = arch.lanes, activations.shape[0]
    config = tile.config
    if count.op in (OP_ADD, OP_CONCAT):
        return _two_operand_results(tile, count, activations, lanes)
    if weights is None and count.op in (OP_MAC, OP_LANE, OP_BCAST):
        weights = weight_memory(tile, count, activations, lanes)
    # im2col copies every window: bound its size (float64 / int64 below) by working on slices of the batch
    per_inference = (count.n_result_words * config.kernel_h * config.kernel_w
                     * config.words_per_pixel * lanes)
    if count.op == OP_LANE:  # n_pix * KH*KW * N_g * L window elements (n_result_words already counts N_g)
        per_inference //= config.words_per_pixel
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
        pooled = np.clip(pooled, config.clamp_lo, config.clamp_hi).astype(np.int8)
        return pooled.reshape(batch, count.n_result_words, lanes)
    if count.op == OP_LANE:
        return _lane_results(tile, count, windows, weights, lanes)
    if count.op == OP_BCAST:
        return _broadcast_results(tile, windows, weights, lanes)

    n_out = count.n_out
    window_words = windows.shape[2] * windows.shape[3]           # K_w = KH*KW*CW
    params = np.asarray(tile.params, dtype=np.int64)
    bias, multiplier, shift = params[:, 0], params[:, 1], params[:, 2]
    columns = windows.reshape(batch, n_pix, window_words * lanes)
    if weights.ndim == 2:
        dot = _int8_matmul(columns.reshape(batch * n_pix, window_words * lanes),
                           weights.reshape(n_out, window_words * lanes).T).reshape(batch, n_pix, n_out)
    else:  # the weight region overlaps the activation banks: each inference reads its own weights
        matrix = weights.reshape(batch, n_out, window_words * lanes).astype(np.int64)
        dot = np.einsum("bqi,boi->bqo", columns.astype(np.int64), matrix)
    accumulator = _wrap_accumulator(bias + dot)
    scaled = _shift_round_half_even(accumulator * multiplier, shift)
    result = np.clip(scaled + config.zp_out, config.clamp_lo, config.clamp_hi)
    per_pixel = count.n_result_words // n_pix                     # N_r
    words = np.zeros((batch, n_pix, per_pixel * lanes), dtype=np.int8)
    words[:, :, :n_out] = result
    return words.reshape(batch, count.n_result_words, lanes)


def _bank_bases(tile: TileProgram, count: TileCounts) -> list[int]:
    """First SRAM word of each activation bank (section 4: bank ``b`` at ``act_base + b * B``)."""
    return [tile.config.act_base + b * count.n_stored for b in range(tile.config.activation_banks)]


def racing_banks(tile: TileProgram, count: TileCounts, batch: int) -> list[int]:
    """The activation banks ``b`` that overlap the weight words COMPUTE reads and that the input side fills
    with inference ``s + 1`` while COMPUTE of some inference ``s`` (``(s + 1) mod 2 = b``, ``s < batch - 1``)
    may be running: whether it writes an overlapping word during that COMPUTE depends on the timing."""
    w_base = tile.config.w_base
    w_end = w_base + tile.config.weight_words
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
    w_base = tile.config.w_base
    w_end = w_base + tile.config.weight_words
    inputs = pe_times.input.reshape(batch, count.flits_in)
    bank_words = count.n_stored
    for b in racing_banks(tile, count, batch):
        base = _bank_bases(tile, count)[b]
        first, last = max(w_base, base), min(w_end, base + bank_words)      # overlapping SRAM words
        recv = count.stored_recv_words[first - base:last - base]           # the RECV words written there
        readers = np.arange(batch - 1)
        readers = readers[(readers + 1) % ACTIVATION_BANKS == b]           # COMPUTE of s, RECV of s + 1
        writes = inputs[readers + 1][:, count.recv_actions()[recv]]
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
    w_words = tile.config.weight_words
    w_base, act_base = config.w_base, config.act_base
    w_end, act_end = w_base + w_words, act_base + config.activation_banks * bank
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
    rounded = product >> shift          # the same sum, in place (five passes over the products, no temporaries)
    rounded &= 1
    rounded += product
    rounded += np.left_shift(np.int64(1), shift - 1) - 1
    rounded >>= shift
    return rounded


def _requantize(accumulator: np.ndarray, bias: np.ndarray, multiplier: np.ndarray, shift: np.ndarray,
                config: TileConfig) -> np.ndarray:
    """Section 4: ``clamp(round_half_even(wrap32(bias + acc) * M / 2^S) + zp_out, clamp_lo, clamp_hi)``,
    int64 in, int64 out (parameters broadcast against ``accumulator``)."""
    accumulator = _wrap_accumulator(bias + accumulator)
    scaled = _shift_round_half_even(accumulator * multiplier, shift)
    return np.clip(scaled + config.zp_out, config.clamp_lo, config.clamp_hi)


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
    # exact in int32: |sum| <= KH*KW * 2^14 <= 255^2 * 2^14 < 2^31 (KH, KW <= 255)
    if weights.ndim == 3:
        dot = np.einsum("bqkcl,kcl->bqcl", windows, weights, dtype=np.int32)
    else:
        dot = np.einsum("bqkcl,bkcl->bqcl", windows, weights, dtype=np.int32)
    dot = dot.astype(np.int64)
    params = np.asarray(tile.params, dtype=np.int64).reshape(words_per_pixel, lanes, 3)
    result = _requantize(dot, params[..., 0], params[..., 1], params[..., 2], config)
    return result.astype(np.int8).reshape(batch, n_pix * words_per_pixel, lanes)


def _broadcast_results(tile: TileProgram, windows: np.ndarray, weights: np.ndarray, lanes: int) -> np.ndarray:
    """op = BCAST (section 4.5): lane ``l`` of word ``g`` of output pixel ``q`` accumulates
    ``bias_o + sum_{ky,kx,c} W[w_base + g*KH*KW*C + (ky*KW + kx)*C + c][l] * A[(ky, kx), c div L][c mod L]``
    (``o = g*L + l``; every lane reads the same activation byte) and is requantized with parameter row ``o``;
    result word ``q*N_g + g``.

    ``windows`` is the im2col gather int8 ``[batch, n_pix, KH*KW, CW, L]``; ``weights`` the weight words,
    ``[N_g*KH*KW*C, L]`` or per inference ``[batch, N_g*KH*KW*C, L]`` (:func:`weight_memory`)."""
    config = tile.config
    batch, n_pix, window = windows.shape[:3]
    channels, groups = config.in_channels, config.computed_words
    values = windows.reshape(batch, n_pix, window, -1)[..., :channels]                    # [b, q, k, c]
    weights = weights.reshape(weights.shape[:-2] + (groups, window, channels, lanes))
    if weights.ndim == 4:
        dot = _int8_matmul(values.reshape(batch * n_pix, window * channels),
                           weights.transpose(1, 2, 0, 3).reshape(window * channels, groups * lanes))
        dot = dot.reshape(batch, n_pix, groups, lanes)
    else:
        dot = np.einsum("bqkc,bgkcl->bqgl", values.astype(np.int64), weights.astype(np.int64))
    params = np.asarray(tile.params, dtype=np.int64).reshape(groups, lanes, 3)
    result = _requantize(dot, params[..., 0], params[..., 1], params[..., 2], config)
    return result.astype(np.int8).reshape(batch, n_pix * groups, lanes)


def _operand_rows(activations: np.ndarray, config: TileConfig, offset: int, words_per_pixel: int,
                  n_pix: int) -> np.ndarray:
    """The words of one ADD / CONCAT operand that the tile's output band reads: int8 ``[batch, n_pix,
    words_per_pixel, L]``. The band (section 4.1) is ``n_pix`` consecutive row-major pixels of a map
    ``out_width = in_width`` wide, from column ``out_col_begin`` of row ``out_row_begin`` on, so it is one
    contiguous slice starting at stored word ``offset + (out_row_begin * in_width + out_col_begin) *
    words_per_pixel``."""
    first_pixel = config.out_row_begin * config.in_width + config.out_col_begin
    first = offset + first_pixel * words_per_pixel
    band = activations[:, first:first + n_pix * words_per_pixel]
    return band.reshape(activations.shape[0], n_pix, words_per_pixel, activations.shape[2])


def _two_operand_results(tile: TileProgram, count: TileCounts, activations: np.ndarray,
                         lanes: int) -> np.ndarray:
    """op = ADD (section 4.2) and op = CONCAT (section 4.3); result word ``q*CW + cw`` of output pixel ``q``
    at ``(oy, ox)`` (``p = oy*in_width + ox``), lane ``l``, parameter row ``c = cw*L + l``:

    * ADD: ``requantize(bias_c + A_a[l] * add_mult_a + A_b[l] * add_mult_b)`` with ``A_a``, ``A_b`` the
      stored words ``operand_{a,b}_offset + p*CW + group_word_begin + cw`` (``cw < N_g``, result word ``q*N_g +
      cw``, parameter row ``cw*L + l``: a channel group, section 4.4);
    * CONCAT: ``requantize(bias_c + A[l] * m)`` with ``A`` the stored word ``operand_a_offset + p*CWa + cw``
      and ``m = add_mult_a`` if ``cw < CWa = concat_words_a``, else ``operand_b_offset + p*CWb + (cw - CWa)``
      and ``m = add_mult_b`` (``CWb = CW - CWa``).
    """
    config = tile.config
    words_per_pixel = config.computed_words          # ADD: its channel group's N_g words (section 4.4)
    batch, n_pix = activations.shape[0], count.n_result_words // words_per_pixel
    (offset_a, words_a), (offset_b, words_b) = config.operand_layout
    operand_a = _operand_rows(activations, config, offset_a, words_a, n_pix).astype(np.int64)
    operand_b = _operand_rows(activations, config, offset_b, words_b, n_pix).astype(np.int64)
    if count.op == OP_ADD:
        operand_a, operand_b = operand_a[:, :, config.group_slice], operand_b[:, :, config.group_slice]
    mult_a, mult_b = config.add_mult_a, config.add_mult_b
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
    (system chain position) emits, in emission order; None for idle tiles. ``out_flits`` is what the host
    receives (from the last chip). Several chips: a link carries the lanes of its flits' data that its lane table
    says they carry (their destination and padding lanes do not cross: chip ``k + 1`` receives them addressed to
    its tile (0,0), the other lanes zero), so chip ``k + 1``'s input stream is what chip ``k``'s sending PE emits
    with those lanes zeroed (:func:`link_stream`)."""

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

    ``timing`` (an :class:`emulator.timing.TimingResult` of the same run, or a function without arguments that
    solves it) is needed only by a tile whose weights overlap an activation bank the input side may write during a
    COMPUTE (:func:`racing_banks`); :func:`emulator.run_functional` passes the solver."""
    arch = program.arch
    path = path or trace_data_path(program)
    stream = check_input_flits(program, in_flits, batch).reshape(batch, program.input_words, arch.lanes)
    tile_out: list[np.ndarray | None] = [None] * arch.system_tiles
    with _single_threaded_blas():
        for step, position in enumerate(path.order):
            tile, counts = program.tiles[position], path.counts[position].per_context
            if tile.turns > 1:
                # section 12: the tile's turns, each an inference of its own on the next part of the stream (the
                # weights apart from the banks, Program.validate, so no bank race to check)
                turn = counts[0]
                parts = stream.reshape(batch * tile.turns, turn.flits_in, arch.lanes)
                stream = _pe_stream(context_program(tile, 0), turn, parts, arch).reshape(batch, -1, arch.lanes)
                counts = ()
            # section 4.6: a tile's contexts in turn, each reading what the one before emits
            for index, count in enumerate(counts):
                context = context_program(tile, index)
                race_checked = False
                if count.n_out and racing_banks(context, count, batch):
                    if timing is None:
                        raise EmulatorError(f"tile {tile.key}: its weights overlap an activation bank the input side "
                                            f"may write during COMPUTE; run_functional needs the run's timing for it")
                    if callable(timing):
                        timing = timing()
                    check_bank_races(context, count, batch, timing.context_times[position][index], position,
                                     timing.context_compute_ends[position][index])
                    race_checked = True
                stream = _pe_stream(context, count, stream, arch, race_checked)
            tile_out[position] = stream.reshape(-1, arch.lanes)
            link = path.hops[step + 1].link      # the hop to the next PE (or the host) crosses this link, if any
            if link is not None:
                stream = link_stream(program.links[link], stream, arch.lanes)
    return FunctionalResult(tile_out_flits=tile_out, out_flits=stream.reshape(-1, arch.lanes))


def context_program(tile: TileProgram, index: int) -> TileProgram:
    """Context ``index`` of ``tile`` as a tile of its own (section 4.6): its registers, the tile's SRAM image (its
    weights and banks are at its own ``w_base`` and ``act_base``) and its parameter rows, table rows ``param_base
    .. param_base + n_out - 1``. A tile of one context with ``param_base = 0`` is returned as it is."""
    config = tile.contexts[index] if index else tile.config
    if not index and not tile.later_contexts and not config.param_base:
        return tile
    params = np.asarray(tile.params)[config.param_base:config.param_base + config.n_out]
    return TileProgram(tile.row, tile.col, config, tile.sram, params, chip=tile.chip)


def link_stream(link, stream: np.ndarray, lanes: int) -> np.ndarray:
    """What a link with registers ``link`` (:class:`flowtile.program.LinkProgram`) delivers of ``stream``
    (``[batch, flits, L]`` per inference): the lanes its lane table carries, the others zero."""
    if not link.segments:
        return stream
    carried = flit_lanes(link.segments, stream.shape[1], lanes)
    return np.where(np.arange(lanes)[None, :] < carried[:, None], stream, np.int8(0))


def _pe_stream(tile: TileProgram, count: TileCounts, stream: np.ndarray, arch: Arch,
               race_checked: bool = False) -> np.ndarray:
    """One PE's output per inference, ``[batch, flits_out, L]``, from its input ``[batch, K + P, L]``:
    the Q words of the forward queue (the forwarded RECV words, then the P passed flits) and the E result
    words, in the output side's order (sections 4, 4.2 and 4.4): the forwarded words and the first
    ``P_bulk`` passed flits, then per output pixel ``pass_per_pixel`` passed flits and the pixel's ``W_px``
    result words; with rows interleaved (register ``interleave_rows``) the input's RECV and PASS words and the
    output's pops and EMITs alternate row by row (:meth:`TileCounts.input_is_pass`, :meth:`TileCounts.output_is_pop`)."""
    if count.rows_ending:
        parts = [stream[:, count.push_actions()]]
        stream = stream[:, count.recv_actions()]
    elif count.n_forward and count.forward_end < count.n_in_words:
        parts = [stream[:, count.forward_begin:count.forward_end], stream[:, count.n_in_words:]]
    else:   # the forwarded words (if any) run into the passed flits: one slice, no copy
        parts = [stream[:, count.forward_begin if count.n_forward else count.n_in_words:]]
    if not count.n_out:
        return np.concatenate(parts, axis=1)
    activations = count.stored(stream)
    weights = None
    if count.op in (OP_MAC, OP_LANE, OP_BCAST):
        weights = weight_memory(tile, count, activations, arch.lanes, race_checked=race_checked)
    results = pe_results(tile, count, activations, arch, weights)
    if not count.pass_per_pixel and not count.rows_ending:
        parts.append(results)
        return np.concatenate(parts, axis=1)
    queued = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    return count.interleave_output(queued, results)
