"""The PE's compute pipeline: read, accumulate (or max), requantize (or clamp) and write a result
(docs/architecture.md sections 4 and 4.1 to 4.3)."""
from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import ReadPort, WritePort
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2, exact_log2

from flowtile.arch import ACC_BITS, ADD_MULT_BITS, OP_BCAST, Arch

from .layouts import LANE_BITS, check_arch, config_layout, param_layout
from .pe_compute import issue_layout
from .pe_output import op_decode

__all__ = ["ComputePipeline", "Requantizer", "clamp"]


def clamp(value, low, high):
    """``min(max(value, low), high)`` (``low`` first, as section 4 writes it)."""
    lower_bounded = Mux(value < low, low, value)
    return Mux(lower_bounded > high, high, lower_bounded)


class Requantizer(wiring.Component):
    """Requantization of docs/architecture.md section 4, "Arithmetic", combinational: ``result = clamp(round_half_even(
    accumulator * multiplier / 2^shift) + zero_point, clamp_lo, clamp_hi)`` on the exact wide product.

    Ties go to even, as ONNX QuantizeLinear rounds (add ``2^(shift-1) - 1``, plus one when the truncated
    quotient is odd, then shift). ``shift = 0`` (only in unused all-zero parameter rows) passes the
    product through.

    Members
    -------
    accumulator : ``In(signed(ACC_BITS))``
    multiplier : ``In(param_layout().multiplier)``
    shift : ``In(param_layout().shift)``
    zero_point : ``In(config_layout().zp_out)``
    clamp_lo, clamp_hi : ``In(config_layout().clamp_lo)``
    result : ``Out(signed(8))``
    """

    def __init__(self):
        params, config = param_layout(), config_layout()
        super().__init__({
            "accumulator": In(signed(ACC_BITS)),
            "multiplier": In(params["multiplier"].shape),
            "shift": In(params["shift"].shape),
            "zero_point": In(config["zp_out"].shape),
            "clamp_lo": In(config["clamp_lo"].shape),
            "clamp_hi": In(config["clamp_hi"].shape),
            "result": Out(signed(LANE_BITS)),
        })

    def elaborate(self, platform):
        m = Module()
        product = self.accumulator * self.multiplier
        rounding_width = product.shape().width + 1
        half = (Const(1, rounding_width) << self.shift)[:rounding_width] >> 1
        quotient_is_odd = (product >> self.shift)[0]
        rounded = (product + half - 1 + quotient_is_odd) >> self.shift
        shifted = Mux(self.shift == 0, product, rounded)
        m.d.comb += self.result.eq(clamp(shifted + self.zero_point, self.clamp_lo, self.clamp_hi))
        return m


def lane_of(value, lane):
    """Lane ``lane`` of a word, as a signed int8."""
    return value[LANE_BITS * lane:LANE_BITS * (lane + 1)].as_signed()


class ComputePipeline(wiring.Component):
    """COMPUTE's datapath (docs/architecture.md section 4, "Arithmetic" and "Pipeline inside COMPUTE"; windows,
    section 4.1; ADD, section 4.2; CONCAT, section 4.3), three stages behind the sequencer's issue.

    Issue (cycle ``c``, ``issue.valid``): the payload's addresses drive ``weight_read``,
    ``activation_read`` and ``param_read`` (with ``param_skew``: the rows read are the ``L`` table rows from row ``f =
    param_base + r``, ``r`` the issue's first parameter row, ``o`` for MAC (``param_addr * L + lane``), ``cw * L`` for
    the lane-wise ops (``param_addr * L``): ``param_read.addr = f div L``, ``param_skew = f mod L``, section 4.6's
    register ``param_base``; MAC takes row ``f``, lane ``l`` of a lane-wise op row ``f + l``). Stage 1 (``c + 1``): the words read are present; a padded
    issue replaces the activation by ``pad_value`` in every lane. MAC adds the lane sum of the
    int8 x int8 products to accumulator 0, LANE, ADD, CONCAT and BCAST each lane's product to its own (the
    multiplicand is the weight lane, or for ADD and CONCAT the operand multiplier ``add_mult_a`` /
    ``add_mult_b``; BCAST multiplies it by the one activation lane ``issue.lane``, section 4.5), starting from the parameter row's bias at an output's first issue, wrapping modulo
    ``2^ACC_BITS``; MAX keeps the lane-wise maximum. Stage 2 (``c + 2``, for an output's last issue):
    requantize (:class:`Requantizer`) or clamp and write ``result_write`` at the issue's ring slot, if
    ``enable``: the per-word ops a whole word; MAC lane ``o mod L`` (lane 0 writes the whole word,
    clearing lanes beyond ``N_o``). ``word_written`` is high in the cycle a word's last write happens.
    ``clear`` (synchronous) empties both stages.

    Parameters
    ----------
    arch : :class:`flowtile.arch.Arch`

    Members
    -------
    config : ``In(config_layout())``
    issue : ``In(stream.Signature(issue_layout(arch), always_ready=True))``
    enable : ``In(1)``
    clear : ``In(1)``
    weight_read, activation_read : ``In(ReadPort.Signature(addr_width=ceil_log2(arch.sram_words),
        shape=unsigned(arch.flit_data_bits)))``
    param_read : ``In(ReadPort.Signature(addr_width=..., shape=data.ArrayLayout(param_layout(), L)))``
        A :class:`~flowtile.hdl.pe_params.ParamTable`'s read port.
    param_skew : ``Out(range(L))``
        To the table's ``read_skew``: the bank of the first row read.
    result_write : ``In(WritePort.Signature(addr_width=ceil_log2(arch.result_words),
        shape=unsigned(arch.flit_data_bits), granularity=8))``
    word_written : ``Out(1)``
    """

    def __init__(self, arch: Arch):
        check_arch(arch, "ComputePipeline")
        self.arch = arch
        sram_read = ReadPort.Signature(addr_width=ceil_log2(arch.sram_words),
                                              shape=unsigned(arch.flit_data_bits))
        super().__init__({
            "config": In(config_layout()),
            "issue": In(stream.Signature(issue_layout(arch), always_ready=True)),
            "enable": In(1),
            "clear": In(1),
            "weight_read": In(sram_read),
            "activation_read": In(sram_read),
            "param_read": In(ReadPort.Signature(
                addr_width=ceil_log2(-(-arch.max_tile_outputs // arch.lanes)),
                shape=data.ArrayLayout(param_layout(), arch.lanes))),
            "param_skew": Out(range(arch.lanes)),
            "result_write": In(WritePort.Signature(
                addr_width=ceil_log2(arch.result_words), shape=unsigned(arch.flit_data_bits), granularity=LANE_BITS)),
            "word_written": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        lanes, config, issue = self.arch.lanes, self.config, self.issue.payload
        is_max, _, _, two_operands, lane_wise, _ = op_decode(config)
        lane_bits = exact_log2(lanes)
        # Section 4.6: the context's parameter row r is table row param_base + r. The issue's first row r is o
        # (MAC: param_addr * L + lane) or cw * L (the lane-wise ops: param_addr * L); the table returns the L rows
        # from f = param_base + r (bank f mod L first, the window wrapping into the next address).
        first_row = Signal(max(len(config.param_base), len(issue.param_addr) + lane_bits) + 1)
        m.d.comb += [
            first_row.eq(config.param_base + (issue.param_addr << lane_bits) + Mux(lane_wise, 0, issue.lane)),
            self.weight_read.addr.eq(issue.weight_addr),
            self.activation_read.addr.eq(issue.activation_addr),
            self.param_read.addr.eq((first_row >> lane_bits)[:len(self.param_read.addr)]),
        ]
        # Stage 1: the words read for the issue are present.
        stage1_valid = Signal()
        stage1 = Signal(issue_layout(self.arch))
        stage1_skew = Signal(range(lanes))          # f mod L of the rows read
        m.d.sync += [stage1_valid.eq(self.issue.valid), stage1.eq(issue)]
        if lanes > 1:
            m.d.comb += self.param_skew.eq(first_row[:lane_bits])
            m.d.sync += stage1_skew.eq(self.param_skew)
        activation = Mux(stage1.padded, Cat(*([config.pad_value] * lanes)), self.activation_read.data)
        # BCAST (section 4.5) multiplies every lane's weight by one activation byte, lane c mod L of the word.
        is_broadcast = config.op == OP_BCAST
        broadcast = activation.word_select(stage1.lane, LANE_BITS).as_signed() if lanes > 1 else lane_of(activation, 0)
        # Parameter rows, one per lane, from the window of L rows at f = param_base + r read in bank order: lane l
        # takes row f + l from bank (f + l) mod L. The lane-wise ops use every lane; MAC feeds lane 0's accumulator
        # and requantizer with row f = param_base + o (with param_base = 0 this is bank o % L, stage1.lane = o mod L).
        param_rows = self.param_read.data
        if lanes > 1:
            lane_param_rows = []
            for lane in range(lanes):
                row = Signal(param_layout(), name=f"param_row{lane}")
                m.d.comb += row.eq(param_rows[(stage1_skew + lane)[:lane_bits]])
                lane_param_rows.append(row)
        else:
            lane_param_rows = [param_rows[0]]

        # One int8 x signed 24-bit multiplier per lane: the weight lane (MAC, LANE) or the unsigned operand
        # multiplier (ADD, CONCAT). |int8 x uint23| < 2^30 fits 31 signed bits.
        add_multiplier = Mux(stage1.operand_b, config.add_mult_b, config.add_mult_a)
        products = []
        for lane in range(lanes):
            multiplicand = Mux(two_operands, add_multiplier, lane_of(self.weight_read.data, lane))
            product = Signal(signed(LANE_BITS + ADD_MULT_BITS), name=f"product{lane}")
            m.d.comb += product.eq(multiplicand * Mux(is_broadcast, broadcast, lane_of(activation, lane)))
            products.append(product)
        # MAC sums int8 x int8 products, which fit 16 bits: the adder tree stays narrow.
        narrow_products = [product[:2 * LANE_BITS].as_signed() for product in products]
        lane_sum = Signal(signed(2 * LANE_BITS + exact_log2(lanes)))
        m.d.comb += lane_sum.eq(sum(narrow_products[1:], narrow_products[0]))
        accumulators = [Signal(signed(ACC_BITS), name=f"accumulator{lane}") for lane in range(lanes)]
        addends = [Mux(lane_wise, products[0], lane_sum)] + products[1:]
        window_max = Signal(unsigned(self.arch.flit_data_bits))
        with m.If(stage1_valid & ~is_max):
            for accumulator, addend, param_row in zip(accumulators, addends, lane_param_rows):
                m.d.sync += accumulator.eq(Mux(stage1.first, param_row.bias, accumulator) + addend)
        with m.If(stage1_valid & is_max):
            m.d.sync += window_max.eq(Cat(*(
                Mux(stage1.first | (lane_of(activation, lane) > lane_of(window_max, lane)),
                    lane_of(activation, lane), lane_of(window_max, lane))
                for lane in range(lanes))))

        # Stage 2: requantize the finished accumulators, or clamp the window maximum lane by lane.
        stage2_valid = Signal()
        stage2 = Signal(issue_layout(self.arch))
        m.d.sync += [stage2_valid.eq(stage1_valid & stage1.last), stage2.eq(stage1)]
        requantized = []
        for lane, (accumulator, param_row) in enumerate(zip(accumulators, lane_param_rows)):
            m.submodules[f"requantizer{lane}"] = requantizer = Requantizer()
            m.d.sync += [requantizer.multiplier.eq(param_row.multiplier), requantizer.shift.eq(param_row.shift)]
            m.d.comb += [requantizer.accumulator.eq(accumulator), requantizer.zero_point.eq(config.zp_out),
                         requantizer.clamp_lo.eq(config.clamp_lo), requantizer.clamp_hi.eq(config.clamp_hi)]
            requantized.append(requantizer.result)
        clamped_max = Cat(*(clamp(lane_of(window_max, lane), config.clamp_lo, config.clamp_hi)[:LANE_BITS]
                            for lane in range(lanes)))

        write = self.result_write
        all_lanes = (1 << lanes) - 1
        writes = stage2_valid & self.enable
        m.d.comb += [write.addr.eq(stage2.slot), self.word_written.eq(writes & stage2.word_last)]
        with m.If(writes):
            with m.If(is_max):
                m.d.comb += [write.data.eq(clamped_max), write.en.eq(all_lanes)]
            with m.Elif(lane_wise):
                m.d.comb += [write.data.eq(Cat(*requantized)), write.en.eq(all_lanes)]
            with m.Elif(stage2.lane == 0):
                # Lane 0 opens a word: clear the lanes beyond N_o left over from an earlier inference.
                m.d.comb += [write.data.eq(requantized[0].as_unsigned()), write.en.eq(all_lanes)]
            with m.Else():
                m.d.comb += [write.data.eq(Cat(*([requantized[0]] * lanes))),
                             write.en.eq(Const(1, lanes) << stage2.lane)]
        with m.If(self.clear):
            m.d.sync += [stage1_valid.eq(0), stage2_valid.eq(0)]
        return m
