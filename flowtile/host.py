"""Host side of a run: float tensors <-> the int8 flit streams the chip consumes and produces.

Shared by the emulator and the RTL drivers so that both see the very same input flits.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .program import Program, TensorSpec

__all__ = ["InputError", "check_input", "published_to_model", "model_layout", "quantize", "dequantize", "pack_flits",
           "unpack_flits", "input_flits", "outputs_from_flits", "apply_post", "HostPattern", "HOST_PATTERN_CYCLES",
           "stall_bits"]

_RANGES = {"int8": (-128, 127), "uint8": (0, 255)}


class InputError(ValueError):
    """A host input does not match the program's input tensor."""


def check_input(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Return ``x`` as float32 ``[batch, *spec.shape]``, or raise naming expected vs given."""
    x = np.asarray(x)
    if x.dtype.kind not in "fiu":
        raise InputError(f"input has dtype {x.dtype}, expected a float array for '{spec.name}'")
    expected = tuple(spec.shape)
    if x.ndim != len(expected) + 1 or tuple(x.shape[1:]) != expected:
        raise InputError(f"input has shape {list(x.shape)}, expected [batch, {', '.join(map(str, expected))}] "
                         f"for '{spec.name}'")
    if x.shape[0] < 1:
        raise InputError("input batch is empty")
    if not np.all(np.isfinite(x)):
        raise InputError("input contains NaN or infinity")
    return x.astype(np.float32)


def published_to_model(x: np.ndarray, perm: tuple[int, ...] | None, shape: tuple[int, ...]) -> np.ndarray:
    """Samples ``x`` in the published model's input layout -> the compiled model's ``[batch, *shape]``: transposed
    by ``perm`` (batch axis included) when ``x`` has the published shape (``shape`` permuted back); ``x`` unchanged
    otherwise (already in the model's layout, or no ``perm``). Where the two layouts have the same shape (an NHWC
    input with H = W = C) ``x`` is taken as published."""
    x = np.asarray(x)
    if perm is None or x.ndim != len(perm):
        return x
    full = (None, *shape)
    published = [0] * len(perm)
    for axis, taken in enumerate(perm):
        published[taken] = full[axis]
    if tuple(x.shape[1:]) != tuple(published[1:]):
        return x
    return np.ascontiguousarray(x.transpose(perm))


def model_layout(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Host inputs as the published model takes them -> the program input's layout ``[batch, *spec.shape]``
    (:attr:`TensorSpec.host_transpose`: e.g. an NHWC image of a tf2onnx model, transposed to NCHW); inputs already
    in the program's layout pass unchanged. The CLI applies it to ``--input`` files."""
    return published_to_model(x, spec.host_transpose, tuple(spec.shape))


def quantize(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """ONNX QuantizeLinear (round half to even, saturate), then map to the on-chip int8 domain."""
    lo, hi = _RANGES[spec.dtype]
    q = np.rint(x.astype(np.float32) / np.float32(spec.scale)) + spec.zero_point
    q = np.clip(q, lo, hi).astype(np.int16)
    if spec.dtype == "uint8":
        q = q - 128
    return q.reshape(q.shape[0], -1).astype(np.int8)


def dequantize(q: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """On-chip int8 values ``[batch, length]`` -> the model's float output ``[batch, *shape]``."""
    values = q.astype(np.int32) + (128 if spec.dtype == "uint8" else 0)
    real = (values - spec.zero_point).astype(np.float32) * np.float32(spec.scale)
    return real.reshape((q.shape[0],) + tuple(spec.shape))


def pack_flits(values: np.ndarray, lanes: int, spec: TensorSpec | None = None) -> np.ndarray:
    """int8 ``[batch, n]`` (model element order) -> ``[batch * words, lanes]`` flits.

    Flat tensors: ``lanes`` consecutive elements a flit. ``chw`` tensors travel pixel-major with the
    channels of a pixel padded to whole flits (docs/architecture.md section 4.1); ``dense`` ones pixel-major with
    no padding (section 4.5). ``tc`` tensors (a sequence
    ``(T, C)``) travel the same way as a 1 x T map: step ``t`` is pixel ``t``. Padding lanes are zero.
    """
    batch, n = values.shape
    if spec is not None and spec.layout == "im2col":
        return _pack_windows(values, lanes, spec)
    if spec is not None and spec.layout == "chw":
        channels, height, width = spec.shape
        words_per_pixel = -(-channels // lanes)
        pixels = np.zeros((batch, height, width, words_per_pixel * lanes), dtype=np.int8)
        pixels[..., :channels] = values.reshape(batch, channels, height, width).transpose(0, 2, 3, 1)
        return pixels.reshape(-1, lanes)
    if spec is not None and spec.layout == "dense":   # pixel-major, channels back to back across flits
        channels, height, width = spec.shape
        packed = np.zeros((batch, spec.words(lanes) * lanes), dtype=np.int8)
        packed[:, :n] = values.reshape(batch, channels, height, width).transpose(0, 2, 3, 1).reshape(batch, n)
        return packed.reshape(-1, lanes)
    if spec is not None and spec.layout == "tc":
        steps, channels = spec.shape
        pixels = np.zeros((batch, steps, -(-channels // lanes) * lanes), dtype=np.int8)
        pixels[..., :channels] = values.reshape(batch, steps, channels)
        return pixels.reshape(-1, lanes)
    words = -(-n // lanes)
    padded = np.zeros((batch, words * lanes), dtype=np.int8)
    padded[:, :n] = values
    return padded.reshape(batch * words, lanes)


def _pack_windows(values: np.ndarray, lanes: int, spec: TensorSpec) -> np.ndarray:
    """Layout "im2col": per output pixel of the first layer's window, its ``KH*KW*C`` values as channels
    ``(ky*KW + kx)*C + c`` (positions outside the map hold the zero point, so they count as real zero), padded
    to whole flits, pixel-major."""
    channels, height, width = spec.shape
    kernel_h, kernel_w, stride, pad_top, pad_left, out_height, out_width = spec.window
    batch = values.shape[0]
    zero = spec.zero_point - 128 if spec.dtype == "uint8" else spec.zero_point
    rows = max(pad_top + height, (out_height - 1) * stride + kernel_h)
    cols = max(pad_left + width, (out_width - 1) * stride + kernel_w)
    padded = np.full((batch, channels, rows, cols), zero, dtype=np.int8)
    padded[:, :, pad_top:pad_top + height, pad_left:pad_left + width] = values.reshape(batch, channels, height, width)
    window_values = kernel_h * kernel_w * channels
    window = np.empty((batch, out_height, out_width, kernel_h, kernel_w, channels), dtype=np.int8)
    for ky in range(kernel_h):
        for kx in range(kernel_w):
            taps = padded[:, :, ky:ky + (out_height - 1) * stride + 1:stride, kx:kx + (out_width - 1) * stride + 1:stride]
            window[:, :, :, ky, kx, :] = taps.transpose(0, 2, 3, 1)
    pixels = np.zeros((batch, out_height, out_width, -(-window_values // lanes) * lanes), dtype=np.int8)
    pixels[..., :window_values] = window.reshape(batch, out_height, out_width, window_values)
    return pixels.reshape(-1, lanes)


def unpack_flits(flits: np.ndarray, batch: int, n: int, spec: TensorSpec | None = None) -> np.ndarray:
    """Inverse of :func:`pack_flits`: ``[batch * words, lanes]`` -> int8 ``[batch, n]`` in model order."""
    flits = np.asarray(flits, dtype=np.int8)
    if spec is not None and spec.layout == "im2col":
        raise ValueError(f"tensor '{spec.name}': an im2col input cannot be unpacked (windows overlap)")
    if spec is not None and spec.layout == "chw":
        channels, height, width = spec.shape
        pixels = flits.reshape(batch, height, width, -1)[..., :channels]
        return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)).reshape(batch, -1)
    if spec is not None and spec.layout == "tc":
        steps, channels = spec.shape
        return np.ascontiguousarray(flits.reshape(batch, steps, -1)[..., :channels]).reshape(batch, -1)
    if spec is not None and spec.layout == "dense":
        channels, height, width = spec.shape
        pixels = flits.reshape(batch, -1)[:, :n].reshape(batch, height, width, channels)
        return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)).reshape(batch, -1)
    return flits.reshape(batch, -1)[:, :n]


def input_flits(program: Program, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float model input -> (int8 values ``[batch, n_in]``, flits to send ``[batch*words, lanes]``)."""
    q = quantize(check_input(x, program.input), program.input)
    return q, pack_flits(q, program.arch.lanes, program.input)


def pad_batch(program: Program, x: np.ndarray) -> np.ndarray:
    """``x`` (``[batch, ...]``) with zero inputs appended up to a multiple of ``program.replicas`` (a replicated
    program runs its copies' inferences together, :attr:`Program.replicas`); the caller drops their outputs."""
    short = -len(x) % program.replicas
    if not short:
        return x
    return np.concatenate([x, np.zeros((short, *x.shape[1:]), dtype=x.dtype)])


def apply_post(y: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """The output's host post-op (``spec.post``) on the dequantized float output ``[batch, *shape]``.

    "softmax": float32 ``exp(y - max) / sum exp(y - max)`` along ``spec.post_axis``, as onnxruntime's Softmax; then,
    if the model quantizes the Softmax's output (``spec.post_quant``), ONNX QuantizeLinear and DequantizeLinear with
    those parameters, so the result is what onnxruntime returns for the model's output.
    """
    if spec.post is None:
        return y
    y = y.astype(np.float32)
    shifted = np.exp(y - np.max(y, axis=spec.post_axis, keepdims=True))
    y = (shifted / np.sum(shifted, axis=spec.post_axis, keepdims=True)).astype(np.float32)
    if spec.post_quant is not None:
        scale, zero_point, dtype = spec.post_quant
        lo, hi = _RANGES[dtype]
        q = np.clip(np.rint(y / np.float32(scale)) + zero_point, lo, hi)
        y = ((q - zero_point) * np.float32(scale)).astype(np.float32)
    return y


def outputs_from_flits(program: Program, flits: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Received flits -> (int8 values ``[batch, n_out]``, float output ``[batch, *shape]``).

    The int8 values are the chip's output; the float output has the host post-op applied (:func:`apply_post`:
    a model's trailing Softmax), so it is the model's output.
    """
    q = unpack_flits(flits, batch, program.output.length, program.output)
    return q, apply_post(dequantize(q, program.output), program.output)


# --- host stalls: a seeded per-cycle pattern of output ready and input valid ----------------------------------

#: Period of a :class:`HostPattern`: the host's bit in run cycle ``t`` is ``bits[t % HOST_PATTERN_CYCLES]``
#: (a power of two: the simulation harness indexes its pattern memory with the low bits of its cycle counter).
HOST_PATTERN_CYCLES = 4096


def stall_bits(rng: np.random.Generator, duty: float, burst: float, cycles: int = HOST_PATTERN_CYCLES) -> np.ndarray:
    """One on/off process as bool ``[cycles]`` (True = on: the host is ready / offers a flit).

    ``duty >= 1``: all on. Otherwise alternating runs, off runs ``Geometric(1 / burst)`` cycles long (mean
    ``burst``), on runs ``Geometric(1 / on_mean)``, ``on_mean = max(1, burst * duty / (1 - duty))`` (so the
    fraction of on cycles is about ``duty``); the first run is on with probability ``duty`` (one uniform draw,
    then ``cycles`` on-run lengths, then ``cycles`` off-run lengths, in this order from ``rng``). A pattern with
    no on cycle gets its cycle 0 on (a host that never transfers would deadlock the run).
    """
    if duty >= 1:
        return np.ones(cycles, dtype=bool)
    first_on = bool(rng.random() < duty)
    on_mean = max(1.0, burst * duty / (1.0 - duty))
    on = rng.geometric(1.0 / on_mean, cycles)
    off = rng.geometric(1.0 / burst, cycles)
    lengths = np.empty(2 * cycles, dtype=np.int64)
    values = np.empty(2 * cycles, dtype=bool)
    lengths[0::2], lengths[1::2] = (on, off) if first_on else (off, on)
    values[0::2], values[1::2] = first_on, not first_on
    bits = np.repeat(values, lengths)[:cycles]
    if not bits.any():
        bits[0] = True
    return bits


@dataclass(frozen=True)
class HostPattern:
    """Host-side back-pressure and input gaps of a run, the same for the RTL harness and the emulator.

    In run cycle ``t`` (0 = the first cycle with ``run = 1``) the host output is ready iff
    ``out_ready()[t % HOST_PATTERN_CYCLES]`` and the host offers its next input flit (if any is left) iff
    ``in_valid()[t % HOST_PATTERN_CYCLES]``. Both are :func:`stall_bits` processes drawn from
    ``numpy.random.default_rng([seed, 0])`` (output: ``out_duty``, ``out_burst``) and ``default_rng([seed,
    1])`` (input: ``in_duty``, ``in_burst``). ``duty`` is the wanted fraction of cycles on, in ``(0, 1]``
    (1: never stalled, today's behaviour); ``burst`` the mean length of an off run in cycles, >= 1. The
    bit vectors are the contract: the RTL runner loads them into the harness's pattern memory and the
    emulator reads the same vectors.
    """

    seed: int = 0
    out_duty: float = 1.0
    out_burst: float = 4.0
    in_duty: float = 1.0
    in_burst: float = 4.0

    def __post_init__(self):
        for name in ("out_duty", "in_duty"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"HostPattern.{name} must be in (0, 1], got {value}")
        for name in ("out_burst", "in_burst"):
            value = getattr(self, name)
            if not value >= 1:
                raise ValueError(f"HostPattern.{name} must be >= 1 (mean stall length in cycles), got {value}")
        if int(self.seed) != self.seed or self.seed < 0:
            raise ValueError(f"HostPattern.seed must be a non-negative integer, got {self.seed}")

    @property
    def stalls_output(self) -> bool:
        return self.out_duty < 1

    @property
    def gaps_input(self) -> bool:
        return self.in_duty < 1

    def out_ready(self) -> np.ndarray:
        """bool ``[HOST_PATTERN_CYCLES]``: host output ready per cycle of the period."""
        return stall_bits(np.random.default_rng([int(self.seed), 0]), self.out_duty, self.out_burst)

    def in_valid(self) -> np.ndarray:
        """bool ``[HOST_PATTERN_CYCLES]``: host input offered per cycle of the period."""
        return stall_bits(np.random.default_rng([int(self.seed), 1]), self.in_duty, self.in_burst)
