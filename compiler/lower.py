"""Lowering (docs/architecture.md sections 4.1 and 8): quantized layers -> the PE's integer parameters.

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

Convolutions lower exactly like dense layers, ``sum_j`` running over the ``C x KH x KW`` window, with
``pad_value = z_x``. Lane layers (op LANE: depthwise Conv, AveragePool, GlobalAveragePool) too, per channel
``c`` over its own ``KH x KW`` window: ``bias_c = b_c - z_x * sum W[c]``; an average pool has all-one weights,
``b = 0`` and weight scale ``1 / (KH*KW)``, so ``bias_c = -z_x * KH*KW`` and ``M_c / 2^S_c ~= s_x / (KH*KW*s_y)``. Max pooling has no parameters: ``op`` MAX, ``pad_value = -128``, clamp
``[-128, 127]`` (ReLU raises ``clamp_lo`` to the zero point). An Affine layer (a per-channel ``a_c x + b_c``
between its own Q/DQ pairs after a requantized layer: BatchNormalization, a bias Add, a Mul by a constant) is a
1x1 lane layer with ``W_c = ±127``, ``w_c = |a_c|/127`` and ``B_c = rne(b_c / (s_x w_c))``: within 1 LSB of the
model's second rounding (:func:`affine_integers` derives the bound); then :func:`exact_affine` searches, per
channel, integers equal to the model on all 256 int8 inputs. Weight *values* stay in ONNX order here;
:func:`weight_rows` lays them out in SRAM words for a given lane count (section 4.1).

A residual Add (op ADD, section 4.2) of ``a (s_a, z_a)`` and ``b (s_b, z_b)`` into ``(s_y, z_y)``: operand
weights ``m_{a,b} = round(2^22 s_{a,b} / max(s_a, s_b))`` (``<= ADD_MULT_MAX``), per channel
``bias = -(z_a m_a + z_b m_b)`` and ``M/2^S ~= max(s_a, s_b) / (2^22 s_y)``; ``|acc| <= 255 (m_a + m_b) < 2^31``.
A channel Concat (op CONCAT, section 4.3) lowers the same way with, per output channel, the bias of the
operand it comes from (``-z_a m_a`` or ``-z_b m_b``). The integer weights' relative error is below ``2^-23 * max(s)/min(s)``, far below one output unit, so the
result can differ from the exact ``rne`` only where the exact value is within that of a rounding tie.
"""
from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass

import numpy as np

from flowtile.arch import ACC_BITS, ADD_MULT_MAX, MULTIPLIER_BITS, SHIFT_BITS

from .errors import CompileError
from .onnx_import import LANE_OPS, AddLayer, ConcatLayer, DenseLayer, PoolLayer, Window, layer_sources

__all__ = ["LoweredLayer", "lower_layers", "affine_integers", "exact_affine", "affine_targets", "pack_input_window",
           "lower_layer", "quantize_multiplier", "reference_forward", "weight_rows", "lane_params", "input_words",
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
    #: Conv/MaxPool: the window geometry. Conv ``weight`` is then int8 ``[n_out, C, KH, KW]``; MaxPool's
    #: is ``[C, 0]`` with zero parameters.
    window: Window | None = None
    #: Gemm/MatMul after a flatten: the ``(C, H, W)`` map it reads (``weight`` columns in NCHW order).
    input_map: tuple[int, int, int] | None = None
    #: What out-of-map window positions read: the input zero point (Conv), -128 (MaxPool).
    pad_value: int = 0
    #: Source layer indices (-1: the graph input); () means the layer before.
    sources: tuple[int, ...] = ()
    #: Grouped Conv: the ONNX group count (``weight`` is block-diagonal); 1 otherwise. Report only.
    groups: int = 1
    #: op "Add" / "Concat": the operand weights ``(add_mult_a, add_mult_b)`` in the node's input order.
    add_mult: tuple[int, int] | None = None
    #: op "Concat": channels of the first input (the output's first channels).
    concat_channels_a: int = 0
    #: Sequence layers (``nn.Linear`` over the last axis of ``[N, T, C]``, an affine step on such a sequence): the
    #: maps it reads and writes are sequences ``[T, C]`` run as 1 x T maps, in model element order ``t*C + c``
    #: (channels last, the order onnxruntime's ``[N, T, C]`` tensors have, and the on-chip pixel-major order).
    #: A dense layer after the flatten of such a sequence (``input_map = (C, 1, T)``): its weight columns are in
    #: that order too, ``t*C + c``, not NCHW.
    channels_last: bool = False
    #: An op BCAST convolution (:meth:`broadcasts`) reading the graph input densely packed (layout "dense", section
    #: 4.5): its input map is ``ceil(C*H*W / L)`` words, pixel ``p``'s channel ``c`` at byte ``p*C + c``.
    dense_input: bool = False

    @property
    def is_pool(self) -> bool:
        return self.op == "MaxPool"

    @property
    def is_add(self) -> bool:
        """A residual join (op ADD, section 4.2): ``weight`` is ``[C, 0]``, ``window`` the map as a 1x1 window."""
        return self.op == "Add"

    @property
    def is_concat(self) -> bool:
        """A channel concatenation (op CONCAT, section 4.3): like Add, ``window`` is the output map."""
        return self.op == "Concat"

    @property
    def is_join(self) -> bool:
        """Reads two source tensors (Add, Concat)."""
        return self.is_add or self.is_concat

    @property
    def is_lane(self) -> bool:
        """Computed by op LANE (depthwise Conv, AveragePool, GlobalAveragePool): ``weight`` int8 ``[C, 1, KH, KW]``."""
        return self.op in LANE_OPS

    def broadcasts(self, lanes: int) -> bool:
        """Computed by op BCAST on ``lanes`` lanes (section 4.5): a convolution (a window, one group) whose input
        channels leave padding lanes (``C mod L != 0``) and whose output channels fill whole words (``N_o mod L =
        0``). One input channel an issue, broadcast to ``L`` output channels, takes ``C / (CW * L)`` of op MAC's
        issue cycles and weight words, so such a layer always runs as BCAST."""
        if self.window is None or self.is_pool or self.is_lane or self.is_join or self.groups != 1:
            return False
        return self.window.channels % lanes != 0 and self.n_out % lanes == 0

    @property
    def n_in(self) -> int:
        """Input elements (dense), input channels (Conv, MaxPool, lane layers)."""
        return self.window.channels if self.is_pool or self.is_lane or self.is_join else int(self.weight.shape[1])

    @property
    def n_out(self) -> int:
        return int(self.weight.shape[0])

    @property
    def out_shape(self) -> tuple[int, ...]:
        """``(n_out,)``, or the output map ``(C, OH, OW)`` of a windowed layer."""
        if self.window is None:
            return (self.n_out,)
        return (self.n_out, self.window.out_height, self.window.out_width)

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


def _clamp_hi(clip_max: float | None, output) -> int:
    """Q(min(x, m)) = min(Q(x), Q(m)): QuantizeLinear is monotonic."""
    if clip_max is None:
        return 127
    return int(min(127, max(-128, np.rint(clip_max / output.scale) + output.int8_zero_point)))


def _lower_join(layer: AddLayer | ConcatLayer) -> LoweredLayer:
    """Add (section 4.2) and Concat (section 4.3): operand weights, folded zero points, one (M, S)."""
    where = f"layer '{layer.name}' ({layer.op})"
    (a, b), channels = layer.inputs, layer.shape[0]
    largest = max(a.scale, b.scale)
    mult = tuple(int(round(ADD_MULT_MAX * operand.scale / largest)) for operand in (a, b))
    fold_a, fold_b = -a.int8_zero_point * mult[0], -b.int8_zero_point * mult[1]
    if isinstance(layer, ConcatLayer):  # each channel comes from one operand
        bias = np.where(np.arange(channels) < layer.channels_a, fold_a, fold_b).astype(np.int64)
    else:
        bias = np.full(channels, fold_a + fold_b, np.int64)
    multiplier, shift = quantize_multiplier(largest / (ADD_MULT_MAX * layer.output.scale), where=where)
    zp_out = layer.output.int8_zero_point
    return LoweredLayer(
        name=layer.name, op=layer.op, weight=np.zeros((channels, 0), np.int8), bias=bias,
        multiplier=np.full(channels, multiplier, np.int64), shift=np.full(channels, shift, np.int64), zp_out=zp_out,
        clamp_lo=max(-128, zp_out) if layer.relu else -128, clamp_hi=_clamp_hi(layer.clip_max, layer.output),
        relu=layer.relu or zp_out == -128, window=layer.window, sources=tuple(layer.sources), add_mult=mult,
        concat_channels_a=getattr(layer, "channels_a", 0))


#: The magnitude of an Affine layer's weights (the largest int8 magnitude both signs reach).
AFFINE_WEIGHT = 127


def affine_integers(layer: DenseLayer) -> DenseLayer:
    """An imported op "Affine" layer (a per-channel ``a_c * x + b_c`` between Q/DQ pairs) with its integer weight,
    bias and weight scales chosen, so that :func:`lower_layer` lowers it like any lane layer (op LANE, 1x1).

    The model computes, per channel ``c``, from the first layer's int8 output ``y1`` (``s1, z1``; its clamp and
    rounding are the first layer's own, reproduced by that layer) and the output quantization ``(s2, z2)``::

        v = (s1 (y1 - z1) a_c + b_c) / s2,      y2 = clamp(rne(v) + z2)

    The LANE layer computes ``acc = W_c (y1 - z1) + B_c`` (the ``- W_c z1`` folded into the bias as for every
    layer) and ``y2' = clamp(rne(acc M_c / 2^S_c) + z2)``. Choose ``W_c = sign(a_c) * 127``, weight scale
    ``w_c = |a_c| / 127`` (so ``W_c w_c = a_c`` exactly), ``B_c = rne(b_c / (s1 w_c))`` and
    ``M_c / 2^S_c ~= r_c = s1 w_c / s2`` (:func:`quantize_multiplier`). Then::

        acc r_c = s1 a_c (y1 - z1) / s2 + b_c / s2 + (B_c - b_c / (s1 w_c)) r_c = v + e_bias,
        |e_bias| <= r_c / 2 = s1 |a_c| / (254 s2)

    and the multiplier's relative error ``|M_c / 2^S_c - r_c| / r_c <= 2^-31`` adds ``|e_mult| <= 2^-31 |v|``:
    below ``2^-22`` LSB wherever the output is not saturated (``|v| < 384``; saturated results stay saturated,
    the clamp being monotonic; with ``S_c`` clamped to 62 the absolute error is below ``2^-32`` LSB). So the
    pre-rounding value differs from the model's by ``e <= s1 |a_c| / (254 s2) + 2^-22`` LSB. Whenever ``e < 1``,
    ``rne`` and the clamp move the result by at most 1 LSB, and not at all unless ``v`` lies within ``e`` of a
    rounding tie (for a bias Add, ``a_c = 1`` and ``s1 ~= s2``: ``e ~= 0.004`` LSB, so about 0.8 % of values at
    most, typically fewer). The compiler refuses a channel with ``s1 |a_c| / s2 >= 200`` (``e`` could approach 1:
    one input step would be hundreds of output steps). A channel with ``a_c = 0`` gets ``W_c = 0`` and
    ``w_c = s2 / (127 s1)`` (``r_c = 1/127``: the constant ``b_c / s2`` to within ``1/254`` LSB). ``|B_c|`` must
    leave room for ``|W_c z1| + 128 * 127`` in the 32-bit accumulator, else CompileError (it needs
    ``|b_c / s2| > 2^23 r_c``: an offset of millions of output steps per input step).

    The bound assumes the first layer's ``y1`` equals onnxruntime's; that layer is itself within 1 LSB (section 8)
    and, on the rare ``y1`` that differs, ``y2`` differs by about ``s1 |a_c| / s2`` LSB more.
    """
    a, b = (np.asarray(v, np.float64) for v in layer.affine)
    s1, s2 = float(layer.input.scale), float(layer.output.scale)
    where = f"layer '{layer.name}' (Affine)"
    ratio = s1 * np.abs(a) / s2
    if np.any(ratio >= 200):
        c = int(np.argmax(ratio))
        raise CompileError(f"{where}: channel {c} multiplies the input step by {ratio[c]:.4g} output steps "
                           f"(scale {a[c]:.6g}, s_x {s1:.6g}, s_y {s2:.6g}); one LANE layer stays within 1 LSB "
                           f"only below 200")
    zero = a == 0
    weight_scales = np.where(zero, s2 / (AFFINE_WEIGHT * s1), np.abs(a) / AFFINE_WEIGHT)
    weight = np.where(zero, 0, np.where(a < 0, -AFFINE_WEIGHT, AFFINE_WEIGHT)).astype(np.int64)
    bias = np.rint(b / (s1 * weight_scales))
    room = _ACC_MAX - 128 * AFFINE_WEIGHT - AFFINE_WEIGHT * 128
    if np.any(np.abs(bias) > room):
        c = int(np.argmax(np.abs(bias)))
        raise CompileError(f"{where}: channel {c}'s offset {b[c]:.6g} is {abs(bias[c]):.4g} accumulator units "
                           f"(> {room}); the {ACC_BITS}-bit PE accumulator could wrap")
    return dataclasses.replace(layer, weight=weight.reshape(-1, 1, 1, 1).astype(np.int8),
                               bias=bias.astype(np.int32), weight_scales=weight_scales)


#: Every int8 input value an Affine layer can read: :func:`exact_affine` checks all of them.
_INT8_VALUES = np.arange(-128, 128, dtype=np.int64)


def affine_targets(layer: DenseLayer, lowered: LoweredLayer) -> np.ndarray:
    """The model's int8 results of an Affine layer for every int8 input value: ``[channels, 256]``, entry
    ``[c, y + 128]`` = ``clamp(rne((s1 (y - z1) a_c + b_c) / s2) + z2)`` evaluated in float64 (the exact value of
    the model's constants up to ``2^-52`` relative: ONNX's float32 differs from it only within ``~2^-24`` of a tie)
    with the lowered layer's clamp."""
    a, b = (np.asarray(v, np.float64).reshape(-1, 1) for v in layer.affine)
    s1, s2 = float(layer.input.scale), float(layer.output.scale)
    values = (s1 * (_INT8_VALUES - layer.input.int8_zero_point) * a + b) / s2
    return np.clip(np.rint(values) + lowered.zp_out, lowered.clamp_lo, lowered.clamp_hi).astype(np.int64)


def _multiplier_interval(acc: np.ndarray, wanted: np.ndarray, lowered: LoweredLayer) -> tuple[np.ndarray, np.ndarray]:
    """For candidate accumulators ``acc[k, y]`` with wanted results ``wanted[y]``: per candidate ``k`` the open
    interval ``(lo, hi)`` of ratios ``r > 0`` with ``clamp(rne(acc r) + zp_out) == wanted`` for every ``y`` (empty
    when ``lo >= hi``). A saturated result only needs ``acc r`` on the saturated side."""
    step = (wanted - lowered.zp_out).astype(np.float64)
    low = np.where(wanted > lowered.clamp_lo, step - 0.5, -np.inf)   # acc r must exceed this ...
    high = np.where(wanted < lowered.clamp_hi, step + 0.5, np.inf)   # ... and stay below this
    with np.errstate(divide="ignore", invalid="ignore"):
        positive, negative = acc > 0, acc < 0
        lower = np.where(positive, low / acc, np.where(negative, high / acc, -np.inf))
        upper = np.where(positive, high / acc, np.where(negative, low / acc, np.inf))
    zero_ok = np.where(acc == 0, (low < 0) & (high > 0), True).all(axis=1)
    lo = np.maximum(lower.max(axis=1), 0.0)   # acc == 0 contributes no bound (the where above picks +-inf)
    hi = upper.min(axis=1)
    return np.where(zero_ok, lo, np.inf), hi


def exact_affine(lowered: LoweredLayer, layer: DenseLayer) -> LoweredLayer:
    """Per channel, replace :func:`affine_integers`' parameters (within 1 LSB) by ones whose results equal the
    model's (:func:`affine_targets`) for **every** int8 input, when such integers exist; return the layer.

    The search: a channel computes ``acc = W (y - z1) + B`` and ``clamp(rne(acc M / 2^S) + z2)``. For each
    ``W`` (the sign of ``a_c``, magnitudes 127 down to 1; ``W = 0`` when ``a_c = 0``) and the integers ``B`` next to
    the ideal ``b_c W / (s1 a_c)`` (or the wanted constant when ``W = 0``), the wanted results bound the ratio
    ``r = M / 2^S`` to an open interval (:func:`_multiplier_interval`); the first non-empty one gives ``r`` at its
    middle, rounded by :func:`quantize_multiplier`, and the candidate is kept only if the integer requantization
    of all 256 inputs (as :func:`reference_forward` computes it) gives the wanted results. Why: the two roundings'
    bounded error (up to ``s1 |a_c| / (254 s2)`` LSB) flips about 0.2 % of a BatchNormalization's results, and
    deep networks amplify those flips (the autoencoder's ten affine steps: 8 LSB end to end). A channel with no
    exact integers keeps the bounded parameters.
    """
    wanted_all = affine_targets(layer, lowered)
    a = np.asarray(layer.affine[0], np.float64).reshape(-1)
    b = np.asarray(layer.affine[1], np.float64).reshape(-1)
    s1, z1 = float(layer.input.scale), layer.input.int8_zero_point
    weight = lowered.weight.astype(np.int64).reshape(len(a), -1).copy()
    bias, multiplier, shift = lowered.bias.copy(), lowered.multiplier.copy(), lowered.shift.copy()
    room = _ACC_MAX - AFFINE_WEIGHT * 256
    for c, wanted in enumerate(wanted_all):
        for weights in _affine_weight_candidates(a[c]):
            found = _exact_channel(weights, a[c], b[c], s1, z1, wanted, lowered, room)
            if found is not None:
                weight[c], bias[c], multiplier[c], shift[c] = found
                break
    return dataclasses.replace(lowered, weight=weight.reshape(lowered.weight.shape).astype(np.int8), bias=bias,
                               multiplier=multiplier, shift=shift)


def _affine_weight_candidates(a_c: float) -> list[np.ndarray]:
    """The weights :func:`exact_affine` tries, in order: the largest magnitude first (most channels are exact
    with it), then every smaller one."""
    if a_c == 0:
        return [np.zeros(1, np.int64)]
    sign = int(np.sign(a_c))
    return [np.array([sign * AFFINE_WEIGHT]), sign * np.arange(AFFINE_WEIGHT - 1, 0, -1, dtype=np.int64)]


def _exact_channel(weights: np.ndarray, a_c: float, b_c: float, s1: float, z1: int, wanted: np.ndarray,
                   lowered: LoweredLayer, room: int) -> tuple[int, int, int, int] | None:
    """(weight, folded bias, M, S) of the first exact candidate among ``weights`` (see :func:`exact_affine`)."""
    if a_c == 0:
        ideal = np.array([float(wanted[0] - lowered.zp_out)])
    else:
        ideal = b_c * weights / (s1 * a_c)
    offsets = np.floor(ideal)[:, None] + np.array([0, 1, -1, 2])[None, :]
    w_cand = np.repeat(weights, 4)
    b_cand = offsets.reshape(-1)
    keep = np.abs(b_cand) <= room
    w_cand, b_cand = w_cand[keep], b_cand[keep].astype(np.int64)
    acc = w_cand[:, None] * (_INT8_VALUES - z1)[None, :] + b_cand[:, None]
    lo, hi = _multiplier_interval(acc.astype(np.float64), wanted, lowered)
    for k in np.flatnonzero(lo < hi):
        ratio = (lo[k] + hi[k]) / 2 if np.isfinite(hi[k]) else max(2 * lo[k], 1.0)
        if not 0 < ratio < 2.0 ** (MULTIPLIER_BITS - MIN_SHIFT):
            continue
        m, s = quantize_multiplier(float(ratio))
        trial = dataclasses.replace(lowered, multiplier=np.array([m]), shift=np.array([s]))
        if np.array_equal(_requantize(acc[k], trial, (1,)), wanted):
            return int(w_cand[k]), int(b_cand[k]) - z1 * int(w_cand[k]), m, s
    return None


def lower_layer(layer: DenseLayer | PoolLayer | AddLayer | ConcatLayer) -> LoweredLayer:
    """One imported layer -> :class:`LoweredLayer` (bias folding, multipliers, clamps, overflow proof)."""
    if isinstance(layer, (AddLayer, ConcatLayer)):
        return _lower_join(layer)
    if isinstance(layer, DenseLayer) and layer.op == "Affine" and layer.affine is not None:
        # the integer form of a per-channel affine step (the bound derived there), then made exact where possible
        bounded = lower_layer(dataclasses.replace(affine_integers(layer), affine=None))
        return exact_affine(bounded, layer)
    if isinstance(layer, PoolLayer):
        channels = layer.window.channels
        zero = np.zeros(channels, np.int64)
        zp = layer.output.int8_zero_point
        return LoweredLayer(name=layer.name, op=layer.op, weight=np.zeros((channels, 0), np.int8), bias=zero,
                            multiplier=zero.copy(), shift=zero.copy(), zp_out=0,
                            clamp_lo=max(-128, zp) if layer.relu else -128, clamp_hi=127,
                            relu=layer.relu or zp == -128, window=layer.window, pad_value=-128,
                            sources=tuple(layer.sources))
    where = f"layer '{layer.name}' ({layer.op})"
    weight = layer.weight.astype(np.int64).reshape(layer.weight.shape[0], -1)
    # Input zero point folded into the bias. For a convolution this is exact at the map's border too:
    # out-of-map window positions read pad_value = z_x (section 4.1), so they add W * z_x to the
    # accumulator exactly as a real activation equal to z_x would, and the fold's -z_x * sum(W[o])
    # cancels it: each position contributes W * (a - z_x), i.e. zero for padding (real zero).
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
    clamp_hi = _clamp_hi(layer.clip_max, layer.output)
    return LoweredLayer(
        name=layer.name, op=layer.op, weight=layer.weight.astype(np.int8), bias=bias,
        multiplier=np.array([m for m, _ in pairs], np.int64), shift=np.array([s for _, s in pairs], np.int64),
        zp_out=zp_out, clamp_lo=max(-128, zp_out) if layer.relu else -128, clamp_hi=clamp_hi,
        relu=layer.relu or zp_out == -128, window=layer.window, input_map=layer.input_map,
        pad_value=layer.input.int8_zero_point if layer.window is not None else 0, sources=tuple(layer.sources),
        groups=layer.groups, channels_last=layer.channels_last)


def lower_layers(layers: list[DenseLayer | PoolLayer | AddLayer | ConcatLayer]) -> list[LoweredLayer]:
    """Lower every layer; each layer must agree with its source layers on the activations between them."""
    for index, (after, sources) in enumerate(zip(layers, layer_sources(layers))):
        if after.window is not None:
            expected = after.window.input_shape
        elif getattr(after, "input_map", None) is not None:
            expected = after.input_map
        else:
            expected = (after.n_in,)
        expected_shapes = [expected] * len(sources)
        if isinstance(after, ConcatLayer):
            channels, height, width = after.shape
            expected_shapes = [(after.channels_a, height, width), (channels - after.channels_a, height, width)]
        reads = after.inputs if isinstance(after, (AddLayer, ConcatLayer)) else (after.input,) * len(sources)
        for source, params, expected in zip(sources, reads, expected_shapes):
            if not 0 <= source < index:
                continue  # the graph input: checked against the input spec by the importer
            before = layers[source]
            produced = before.out_shape
            if before.output != params or int(np.prod(produced)) != int(np.prod(expected)):
                raise CompileError(f"layer '{before.name}' outputs {list(produced)} values as {before.output}, "
                                   f"but layer '{after.name}' reads {list(expected)} as {params}")
    lowered = [lower_layer(layer) for layer in layers]
    for layer, sources in zip(lowered, layer_sources(layers)):
        layer.sources = sources
    return lowered


def _wrap32(values: np.ndarray) -> np.ndarray:
    return ((values + (1 << 31)) & ((1 << 32) - 1)) - (1 << 31)


def _words(n: int, lanes: int) -> int:
    return -(-n // lanes)


def input_words(layer: LoweredLayer, lanes: int) -> int:
    """``K = n_in_words``: SRAM words of one input (a whole map for windowed layers and flatten-fed dense)."""
    if layer.window is not None:
        w = layer.window
        return w.height * w.width * _words(w.channels, lanes)
    if layer.input_map is not None:
        channels, height, width = layer.input_map
        return height * width * _words(channels, lanes)
    return _words(layer.n_in, lanes)


def weight_rows(layer: LoweredLayer, lanes: int) -> np.ndarray:
    """The weights as the PE reads them: int8 ``[n_out, words * lanes]``, row ``o`` = output ``o``'s words.

    * dense: ``K = ceil(n_in / L)`` words, zero-padded;
    * dense after a flatten of a ``(C, H, W)`` map: the map travels pixel-major with ``CW = ceil(C / L)``
      words a pixel, so ONNX column ``c*H*W + y*W + x`` moves to ``((y*W + x)*CW + c // L)*L + c % L``;
      padding lanes are zero (``K = H*W*CW``); after the flatten of a sequence (``channels_last``) column
      ``t*C + c`` moves to ``(t*CW + c // L)*L + c % L``;
    * Conv: ``K_w = KH*KW*CW`` words, word ``(ky*KW + kx)*CW + cw`` holding channels ``cw*L .. cw*L+L-1``
      of ``W[o, :, ky, kx]`` (section 4.1);
    * MaxPool, Add, Concat: no weights (``[CW*L, 0]``);
    * lane layers: ``[CW*KH*KW, L]``, *not* one row per output: the SRAM words themselves, word
      ``cw*KH*KW + ky*KW + kx`` holding in lane ``l`` the weight of channel ``cw*L + l`` at ``(ky, kx)``
      (zero for padding channels; section 4.1, op LANE);
    * a convolution run as op BCAST (:meth:`LoweredLayer.broadcasts`): ``[N_g*KH*KW*C, L]``, the SRAM words, word
      ``(g*KH*KW + ky*KW + kx)*C + c`` holding in lane ``l`` ``W[g*L + l, c, ky, kx]`` (section 4.5).
    """
    if layer.is_pool or layer.is_join:
        return np.zeros((_words(layer.n_in, lanes) * lanes, 0), np.int8)
    if layer.broadcasts(lanes):
        # word (g*KH*KW + ky*KW + kx)*C + c, lane l: W[g*L + l, c, ky, kx] (section 4.5)
        n_out, channels, kh, kw = layer.weight.shape
        grouped = layer.weight.reshape(n_out // lanes, lanes, channels, kh, kw).transpose(0, 3, 4, 2, 1)
        return np.ascontiguousarray(grouped.reshape(-1, lanes))
    if layer.is_lane:
        channels, _, kh, kw = layer.weight.shape
        cw = _words(channels, lanes)
        padded = np.zeros((cw * lanes, kh * kw), np.int8)
        padded[:channels] = layer.weight.reshape(channels, kh * kw)
        return np.ascontiguousarray(padded.reshape(cw, lanes, kh * kw).transpose(0, 2, 1).reshape(cw * kh * kw, lanes))
    n_out = layer.n_out
    if layer.window is not None:
        _, channels, kh, kw = layer.weight.shape
        padded = np.zeros((n_out, kh, kw, _words(channels, lanes) * lanes), np.int8)
        padded[..., :channels] = layer.weight.transpose(0, 2, 3, 1)
        return padded.reshape(n_out, -1)
    if layer.input_map is not None:
        channels, height, width = layer.input_map
        padded = np.zeros((n_out, height, width, _words(channels, lanes) * lanes), np.int8)
        if layer.channels_last:  # the flatten of a sequence: columns already pixel-major, t*C + c
            padded[..., :channels] = layer.weight.reshape(n_out, height, width, channels)
        else:
            padded[..., :channels] = layer.weight.reshape(n_out, channels, height, width).transpose(0, 2, 3, 1)
        return padded.reshape(n_out, -1)
    rows = np.zeros((n_out, _words(layer.n_in, lanes) * lanes), np.int8)
    rows[:, :layer.n_in] = layer.weight
    return rows


def lane_params(layer: LoweredLayer, lanes: int) -> np.ndarray:
    """The parameter table of a lane layer's tile: ``CW*L`` rows, channel ``c`` in row ``c``; padding rows
    ``(0, 0, 1)`` (bias 0, multiplier 0, a valid shift of 1)."""
    cw = _words(layer.n_out, lanes)
    table = np.tile(np.array([0, 0, 1], np.int64), (cw * lanes, 1))
    table[:layer.n_out] = layer.params
    return table


def _windows(a: np.ndarray, window: Window, pad_value: int):
    """Yield ``(ky, kx, view)``: ``view[b, c, oy, ox]`` = input at window position (ky, kx) of output (oy, ox),
    ``pad_value`` outside the map (section 4.1)."""
    w = window
    bottom = max(0, (w.out_height - 1) * w.stride + w.kernel_h - w.height - w.pad_top)
    right = max(0, (w.out_width - 1) * w.stride + w.kernel_w - w.width - w.pad_left)
    padded = np.pad(a, ((0, 0), (0, 0), (w.pad_top, bottom), (w.pad_left, right)), constant_values=pad_value)
    for ky in range(w.kernel_h):
        for kx in range(w.kernel_w):
            yield ky, kx, padded[:, :, ky:ky + w.stride * (w.out_height - 1) + 1:w.stride,
                                 kx:kx + w.stride * (w.out_width - 1) + 1:w.stride]


def _requantize(acc: np.ndarray, layer: LoweredLayer, axis_shape) -> np.ndarray:
    mult = layer.multiplier.reshape(axis_shape)
    shift = layer.shift.reshape(axis_shape)
    # Round to nearest, ties to even (section 4): the quotient plus one when the remainder is above half,
    # or exactly half and the quotient odd.
    quotient = (acc * mult) >> shift
    remainder = acc * mult - (quotient << shift)
    half = np.left_shift(np.int64(1), shift - 1)
    scaled = quotient + ((remainder > half) | ((remainder == half) & ((quotient & 1) == 1)))
    return np.clip(scaled + layer.zp_out, layer.clamp_lo, layer.clamp_hi)


def reference_forward(layers: list[LoweredLayer], x_q: np.ndarray) -> np.ndarray:
    """The PE arithmetic of sections 4, 4.1 and 4.2, exactly, in numpy: int8 ``[batch, n_in]`` -> int8 ``[batch, n_out]``.

    ``x_q`` is the on-chip input in model element order (``flowtile.host.quantize`` of the float input, a
    ``chw`` input flattened NCHW); the result is the on-chip output in model order (int8 domain), which
    ``flowtile.host.dequantize`` turns into floats. Feature maps are computed as plain ``[batch, C, H, W]``
    arrays: the on-chip pixel-major layout, its padding lanes and :func:`weight_rows`' permutation change
    the order of the sums only, never a value. Each layer reads its ``sources`` (residual blocks); a source
    outside ``layers`` (a layer checked alone) reads the previous layer's output, or ``x_q``.
    """
    batch = np.asarray(x_q).shape[0]
    outputs = {-1: np.asarray(x_q, dtype=np.int64)}
    for index, (layer, sources) in enumerate(zip(layers, layer_sources(layers))):
        # A source outside ``layers`` (one layer cut out of a network) reads the previous output.
        a, b = (outputs.get(source, outputs[index - 1]) for source in (sources * 2)[:2])
        if layer.is_add:
            shape = (batch, *layer.window.input_shape)
            b = b.reshape(shape)
            acc = layer.bias.reshape(1, -1, 1, 1) + a.reshape(shape) * layer.add_mult[0] + b * layer.add_mult[1]
            a = _requantize(_wrap32(acc), layer, (1, -1, 1, 1))
        elif layer.is_concat:
            channels, height, width = layer.window.input_shape
            a = a.reshape(batch, layer.concat_channels_a, height, width) * layer.add_mult[0]
            b = b.reshape(batch, channels - layer.concat_channels_a, height, width) * layer.add_mult[1]
            acc = layer.bias.reshape(1, -1, 1, 1) + np.concatenate([a, b], axis=1)
            a = _requantize(_wrap32(acc), layer, (1, -1, 1, 1))
        elif layer.window is not None:
            if layer.channels_last:  # a sequence [T, C] in model order: as the (C, 1, T) map it is on chip
                channels, height, width = layer.window.input_shape
                a = a.reshape(batch, height, width, channels).transpose(0, 3, 1, 2)
            else:
                a = a.reshape(batch, *layer.window.input_shape)
            if layer.is_pool:
                out = None
                for _, _, view in _windows(a, layer.window, layer.pad_value):
                    out = view.copy() if out is None else np.maximum(out, view)
                a = np.clip(out, layer.clamp_lo, layer.clamp_hi)
            elif layer.is_lane:  # depthwise: channel c by its own KH x KW kernel
                weight = layer.weight.astype(np.int64)
                acc = layer.bias.reshape(1, -1, 1, 1)
                for ky, kx, view in _windows(a, layer.window, layer.pad_value):
                    acc = acc + view * weight[:, 0, ky, kx].reshape(1, -1, 1, 1)
                a = _requantize(_wrap32(acc), layer, (1, -1, 1, 1))
            else:
                weight = layer.weight.astype(np.int64)
                acc = layer.bias.reshape(1, -1, 1, 1)
                for ky, kx, view in _windows(a, layer.window, layer.pad_value):
                    acc = acc + np.einsum("bchw,oc->bohw", view, weight[:, :, ky, kx])
                a = _requantize(_wrap32(acc), layer, (1, -1, 1, 1))
            if layer.channels_last:  # back to the model order of the sequence [T, C]
                a = np.ascontiguousarray(a.transpose(0, 2, 3, 1))
        else:
            # a flatten: NCHW order (a sequence's: t*C + c), what the ONNX weight columns expect
            a = a.reshape(batch, -1)
            acc = _wrap32(layer.bias + a @ layer.weight.astype(np.int64).T)
            a = _requantize(acc, layer, (1, -1))
        outputs[index] = a
    return a.reshape(batch, -1).astype(np.int8)


def pack_input_window(layers: list[LoweredLayer], input_spec, lanes: int):
    """Pack the first convolution's window into channels on the host (input layout "im2col", section 7) when
    that saves issue cycles: a convolution over ``C`` channels issues ``KH*KW*ceil(C/L)`` words a window, the
    same convolution as a 1x1 one over ``KH*KW*C`` packed channels ``ceil(KH*KW*C/L)`` (a 3-channel 3x3 stem:
    9 words of 3 useful lanes become 4 words of 27/32). The host then sends ``OH*OW`` packed pixels instead of
    the ``H*W`` map. Returns ``(layers, input_spec)``, unchanged when the first layer is not a plain convolution
    of the graph input that nothing else reads, or packing would not save cycles.
    """
    if not layers or input_spec.layout != "chw":
        return layers, input_spec
    first = layers[0]
    readers_of_input = [i for i, sources in enumerate(layer_sources(layers)) if -1 in sources]
    if (first.window is None or first.op != "Conv" or first.is_lane or first.groups != 1
            or readers_of_input != [0]):
        return layers, input_spec
    w = first.window
    packed_channels = w.kernel_h * w.kernel_w * w.channels
    if -(-packed_channels // lanes) >= w.kernel_h * w.kernel_w * -(-w.channels // lanes):
        return layers, input_spec
    # weight [O, C, KH, KW] -> [O, KH*KW*C, 1, 1] with channel (ky*KW + kx)*C + c, as the host packs the window;
    # the bias fold over the window is unchanged (padded positions still carry the input zero point)
    weight = first.weight.transpose(0, 2, 3, 1).reshape(first.n_out, packed_channels, 1, 1)
    window = Window(packed_channels, w.out_height, w.out_width, 1, 1, 1, 0, 0, w.out_height, w.out_width)
    packed = dataclasses.replace(first, weight=np.ascontiguousarray(weight), window=window)
    spec = dataclasses.replace(input_spec, layout="im2col", window=(w.kernel_h, w.kernel_w, w.stride, w.pad_top,
                                                                   w.pad_left, w.out_height, w.out_width))
    return [packed] + list(layers[1:]), spec
