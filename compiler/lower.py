"""Lowering (docs/architecture.md section 8): quantized dense layers -> the PE's integer parameters.

For a layer with input ``(s_x, z_x)``, weight scales ``s_w[o]``, output ``(s_y, z_y)`` and int32 bias
``b`` (all zero points in the int8 domain, ``z - 128`` for uint8 tensors):

* ``bias_o = b_o - z_x * sum_j W[o, j]``: the input zero point folded into the bias, so the PE
  multiplies raw int8 activations;
* ``(M_o, S_o)`` with ``M_o / 2^S_o ~= s_x s_w[o] / s_y``, ``M_o`` in ``[2^30, 2^31)``, ``S_o`` in ``[1, 62]``.
  A ratio ``>= 2^30`` cannot be represented (it would need ``S_o < 1``): CompileError. A ratio below
  ``2^-32`` would need ``S_o > 62``: the shift is clamped to 62 and ``M_o = round(ratio * 2^62)``
  (``< 2^30``, possibly 0). That loses nothing that matters: ``|acc| < 2^31`` then moves the output
  by less than one unit, so it is ``zp_out`` either way up to rounding;
* ``zp_out = z_y``, clamp ``[-128, 127]``, with ReLU ``[max(-128, z_y), 127]``;
* an accumulator proof: ``|bias_o| + 128 * sum_j |W[o, j]| <= 2^31 - 1`` for every output, else
  CompileError naming the layer (the PE accumulator would wrap).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from flowtile.arch import ACC_BITS, MULTIPLIER_BITS, SHIFT_BITS

from .errors import CompileError
from .onnx_import import DenseLayer

__all__ = ["LoweredLayer", "lower_layers", "lower_layer", "quantize_multiplier", "reference_forward",
           "MIN_SHIFT", "MAX_SHIFT"]

MIN_SHIFT = 1
MAX_SHIFT = (1 << SHIFT_BITS) - 2  # 62: keeps acc * M + 2^(S-1) inside a signed 64-bit product
_ACC_MAX = (1 << (ACC_BITS - 1)) - 1


@dataclass
class LoweredLayer:
    """A dense layer as the PE computes it (docs/architecture.md section 4).

    ``weight`` int8 ``[n_out, n_in]``; ``bias``, ``multiplier``, ``shift`` int64 ``[n_out]``;
    ``zp_out``, ``clamp_lo``, ``clamp_hi`` in the int8 domain. ``relu``: the output never goes below real
    zero, by an explicit Relu or because the quantizer folded one into an output zero point of -128.
    """

    name: str
    op: str
    weight: np.ndarray
    bias: np.ndarray
    multiplier: np.ndarray
    shift: np.ndarray
    zp_out: int
    clamp_lo: int
    clamp_hi: int
    relu: bool

    @property
    def n_in(self) -> int:
        return int(self.weight.shape[1])

    @property
    def n_out(self) -> int:
        return int(self.weight.shape[0])

    @property
    def params(self) -> np.ndarray:
        """The parameter table, int64 ``[n_out, 3]`` rows ``(bias, multiplier, shift)``."""
        return np.stack([self.bias, self.multiplier, self.shift], axis=1).astype(np.int64)


def quantize_multiplier(ratio: float, *, where: str = "layer") -> tuple[int, int]:
    """``ratio`` -> ``(M, S)`` with ``M / 2^S ~= ratio``, ``M`` in ``[2^30, 2^31)`` and ``S`` in ``[1, 62]``.

    Ratios that would need ``S > 62`` get ``S = 62`` and a smaller ``M`` (see the module docstring);
    ratios ``>= 2^30`` (or not positive and finite) raise CompileError mentioning ``where``.
    """
    if not (math.isfinite(ratio) and ratio > 0):
        raise CompileError(f"{where}: requantization scale s_x*s_w/s_y = {ratio!r} must be positive and finite")
    mantissa, exponent = math.frexp(ratio)          # ratio = mantissa * 2^exponent, mantissa in [0.5, 1)
    multiplier = round(mantissa * (1 << MULTIPLIER_BITS))
    if multiplier == 1 << MULTIPLIER_BITS:          # mantissa rounded up to 1.0
        multiplier, exponent = multiplier >> 1, exponent + 1
    shift = MULTIPLIER_BITS - exponent
    if shift < MIN_SHIFT:
        raise CompileError(f"{where}: requantization scale s_x*s_w/s_y = {ratio:.6g} is too large "
                           f"(>= 2^{MULTIPLIER_BITS - MIN_SHIFT}); the PE's shift must be >= {MIN_SHIFT}")
    if shift > MAX_SHIFT:
        return round(math.ldexp(ratio, MAX_SHIFT)), MAX_SHIFT
    return multiplier, shift


def lower_layer(layer: DenseLayer) -> LoweredLayer:
    """One :class:`DenseLayer` -> :class:`LoweredLayer` (bias folding, multipliers, clamps, overflow proof)."""
    where = f"layer '{layer.name}' ({layer.op})"
    weight = layer.weight.astype(np.int64)
    bias = layer.bias.astype(np.int64) - layer.input.int8_zero_point * weight.sum(axis=1)
    worst = np.abs(bias) + 128 * np.abs(weight).sum(axis=1)
    if np.any(worst > _ACC_MAX):
        o = int(np.argmax(worst))
        raise CompileError(f"{where}: output {o} can reach |accumulator| = {int(worst[o])} "
                           f"(|bias| {int(abs(bias[o]))} + 128 * sum|W| {int(np.abs(weight[o]).sum())}) > 2^31 - 1; "
                           f"the {ACC_BITS}-bit PE accumulator could wrap")
    ratios = np.float64(layer.input.scale) * layer.weight_scales.astype(np.float64) / np.float64(layer.output.scale)
    pairs = [quantize_multiplier(float(r), where=f"{where} output {o}") for o, r in enumerate(ratios)]
    zp_out = layer.output.int8_zero_point
    return LoweredLayer(
        name=layer.name, op=layer.op, weight=layer.weight.astype(np.int8), bias=bias,
        multiplier=np.array([m for m, _ in pairs], np.int64), shift=np.array([s for _, s in pairs], np.int64),
        zp_out=zp_out, clamp_lo=max(-128, zp_out) if layer.relu else -128, clamp_hi=127,
        relu=layer.relu or zp_out == -128)


def lower_layers(layers: list[DenseLayer]) -> list[LoweredLayer]:
    """Lower every layer; consecutive layers must agree on the activation between them."""
    for before, after in zip(layers, layers[1:]):
        if before.output != after.input or before.n_out != after.n_in:
            raise CompileError(f"layer '{before.name}' outputs {before.n_out} values as {before.output}, "
                               f"but layer '{after.name}' reads {after.n_in} as {after.input}")
    return [lower_layer(layer) for layer in layers]


def _wrap32(values: np.ndarray) -> np.ndarray:
    return ((values + (1 << 31)) & ((1 << 32) - 1)) - (1 << 31)


def reference_forward(layers: list[LoweredLayer], x_q: np.ndarray) -> np.ndarray:
    """The PE arithmetic of section 4, exactly, in numpy: int8 ``[batch, n_in]`` -> int8 ``[batch, n_out]``.

    ``x_q`` is the on-chip input (``flowtile.host.quantize`` of the float input); the result is the
    on-chip output (int8 domain), which ``flowtile.host.dequantize`` turns into floats.
    """
    a = np.asarray(x_q, dtype=np.int64)
    for layer in layers:
        acc = _wrap32(layer.bias + a @ layer.weight.astype(np.int64).T)
        scaled = (acc * layer.multiplier + np.left_shift(np.int64(1), layer.shift - 1)) >> layer.shift
        a = np.clip(scaled + layer.zp_out, layer.clamp_lo, layer.clamp_hi)
    return a.astype(np.int8)
