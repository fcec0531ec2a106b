"""The processing element of one tile: SRAM, parameter table, result buffer and the phase FSM
(docs/architecture.md section 4)."""
from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import enum, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2, exact_log2

from flowtile.arch import ACC_BITS, CONFIG_FIELDS, Arch

from .layouts import (LANE_BITS, LOAD_TARGET_CONFIG, LOAD_TARGET_PARAMS, LOAD_TARGET_SRAM, check_arch,
                      config_layout, flit_signature, load_signature, param_layout)

__all__ = ["PE", "Phase"]


class Phase(enum.Enum, shape=3):
    """PE phases of one inference, in order; IDLE is the state of a tile whose counts are all zero."""
    IDLE = 0
    RECV = 1
    PASS = 2
    COMPUTE = 3
    EMIT = 4


#: Cycles COMPUTE lasts beyond its ``N_o * K`` issue cycles: one to multiply-accumulate the last
#: read words, one to requantize and write the last result.
COMPUTE_DRAIN_CYCLES = 2


class PE(wiring.Component):
    """PE of the tile with load-bus index ``tile_index`` (``row * cols + col``).

    Ports:
        i_flit: flits from the router's L output. o_flit: flits into the router's L input.
        load: the chip's load bus (:func:`hdl.layouts.load_signature`); this PE takes the writes whose
            ``tile`` equals ``tile_index``, and only while ``run = 0``.
        run: while 0 the FSM is held in its initial phase (the first non-empty phase of the current
            config) with every counter and the compute pipeline cleared, and no flit is transferred.

    Behaviour per inference: RECV (``n_in_words`` transfers, stored at ``act_base + k``, re-emitted if
    ``forward``), COMPUTE (exactly ``n_out * n_in_words + 2`` cycles, no transfers), PASS (``n_pass``
    transfers), EMIT (``ceil(n_out / lanes)`` transfers); an empty phase costs no cycle. Every
    emitted flit carries the configured destination. Arithmetic and pipeline: section 4 of
    docs/architecture.md.
    """

    def __init__(self, arch: Arch, tile_index: int):
        check_arch(arch, "PE")
        if isinstance(tile_index, bool) or not isinstance(tile_index, int):
            raise TypeError(f"PE: parameter 'tile_index' must be an integer, got {tile_index!r}")
        if not 0 <= tile_index < arch.n_tiles:
            raise ValueError(f"PE: parameter 'tile_index' = {tile_index} is outside 0..{arch.n_tiles - 1} "
                             f"of the {arch.rows}x{arch.cols} arch")
        self.arch, self.tile_index = arch, tile_index
        super().__init__({
            "i_flit": In(flit_signature(arch)),
            "o_flit": Out(flit_signature(arch)),
            "load": In(load_signature(arch)),
            "run": In(1),
        })

    def elaborate(self, platform):
        m = Module()
        arch = self.arch
        lanes = arch.lanes
        lane_bits_log2 = exact_log2(lanes)
        params = param_layout()

        # --- storage -----------------------------------------------------------------------------
        m.submodules.sram = sram = Memory(shape=unsigned(arch.flit_data_bits), depth=arch.sram_words, init=[])
        sram_write = sram.write_port()
        weight_read = sram.read_port()
        activation_read = sram.read_port()
        m.submodules.param_table = param_table = Memory(shape=params, depth=arch.max_tile_outputs, init=[])
        param_write = param_table.write_port()
        param_read = param_table.read_port()
        m.submodules.result_buffer = result_buffer = Memory(
            shape=unsigned(arch.flit_data_bits), depth=arch.result_words, init=[])
        result_write = result_buffer.write_port(granularity=LANE_BITS)
        result_read = result_buffer.read_port(domain="comb")

        config = Signal(config_layout())
        n_in_words, n_pass = config.n_in_words, config.n_pass
        # COMPUTE needs K > 0 (section 4); a config with n_out > 0 but K = 0 (rejected by
        # encode_config) behaves as n_out = 0 rather than computing from nothing forever.
        n_out = Mux(n_in_words != 0, config.n_out, 0)
        n_result_words = (n_out + (lanes - 1)) >> lane_bits_log2

        # --- loading (only while run = 0) --------------------------------------------------------
        load = self.load.payload
        load_here = self.load.valid & ~self.run & (load.tile == self.tile_index)
        with m.If(load_here & (load.target == LOAD_TARGET_CONFIG)):
            with m.Switch(load.addr):
                for index, (name, width, _) in enumerate(CONFIG_FIELDS):
                    with m.Case(index):
                        offset = config_layout()[name].offset
                        m.d.sync += config.as_value()[offset:offset + width].eq(load.data[:width])
        m.d.comb += [
            param_write.addr.eq(load.addr),
            param_write.data.eq(load.data[:params.size]),
            param_write.en.eq(load_here & (load.target == LOAD_TARGET_PARAMS)
                              & (load.addr < arch.max_tile_outputs)),
        ]

        # --- phase sequencing --------------------------------------------------------------------
        def first_nonempty(candidates, otherwise):
            """The first phase of ``candidates`` ((phase, count) pairs) with a non-zero count."""
            result = otherwise
            for phase, count in reversed(candidates):
                result = Mux(count != 0, phase, result)
            return result

        # Phase order RECV, COMPUTE, PASS, EMIT: a tile computes as soon as its input vector is stored,
        # in parallel with the other tiles of its layer, and only then passes their results on.
        initial_phase = Signal(Phase)
        m.d.comb += initial_phase.eq(first_nonempty(
            [(Phase.RECV, n_in_words), (Phase.COMPUTE, n_out), (Phase.PASS, n_pass)], Phase.IDLE))
        after_recv = first_nonempty([(Phase.COMPUTE, n_out), (Phase.PASS, n_pass)], initial_phase)
        after_compute = first_nonempty([(Phase.PASS, n_pass)], Phase.EMIT)
        after_pass = first_nonempty([(Phase.EMIT, n_out)], initial_phase)

        # While run = 0 (and in the first running cycle) the phase follows the config combinationally,
        # so a config written in the cycle before run rises takes effect at once.
        held = Signal(init=1)
        phase_register = Signal(Phase)
        phase = Signal(Phase)
        m.d.comb += phase.eq(Mux(held, initial_phase, phase_register))
        m.d.sync += held.eq(~self.run)
        with m.If(self.run):
            m.d.sync += phase_register.eq(phase)

        # Counts the transfers of the current RECV, PASS or EMIT phase.
        transfers = Signal(max(len(n_in_words), len(n_pass), len(config.n_out)))

        def finish_phase(next_phase):
            m.d.sync += [phase_register.eq(next_phase), transfers.eq(0)]

        # --- flit ports --------------------------------------------------------------------------
        i_flit, o_flit = self.i_flit, self.o_flit
        running = self.run
        m.d.comb += [
            o_flit.payload.dest_row.eq(config.dest_row),
            o_flit.payload.dest_col.eq(config.dest_col),
            o_flit.payload.dest_host.eq(config.dest_host),
            result_read.addr.eq(transfers),
        ]
        input_transfer = i_flit.valid & i_flit.ready
        output_transfer = o_flit.valid & o_flit.ready

        sram_address_bits = ceil_log2(arch.sram_words)
        with m.If(~running):
            m.d.comb += [
                sram_write.addr.eq(load.addr),
                sram_write.data.eq(load.data[:arch.flit_data_bits]),
                sram_write.en.eq(load_here & (load.target == LOAD_TARGET_SRAM) & (load.addr < arch.sram_words)),
            ]
            m.d.sync += transfers.eq(0)
        with m.Else():
            m.d.comb += [
                sram_write.addr.eq((config.act_base + transfers)[:max(sram_address_bits, 1)]),
                sram_write.data.eq(i_flit.payload.data),
            ]
            with m.Switch(phase):
                with m.Case(Phase.RECV):
                    m.d.comb += [
                        o_flit.payload.data.eq(i_flit.payload.data),
                        o_flit.valid.eq(i_flit.valid & config.forward),
                        i_flit.ready.eq(Mux(config.forward, o_flit.ready, 1)),
                        sram_write.en.eq(input_transfer),
                    ]
                    with m.If(input_transfer):
                        m.d.sync += transfers.eq(transfers + 1)
                        with m.If(transfers == n_in_words - 1):
                            finish_phase(after_recv)
                with m.Case(Phase.PASS):
                    m.d.comb += [
                        o_flit.payload.data.eq(i_flit.payload.data),
                        o_flit.valid.eq(i_flit.valid),
                        i_flit.ready.eq(o_flit.ready),
                    ]
                    with m.If(input_transfer):
                        m.d.sync += transfers.eq(transfers + 1)
                        with m.If(transfers == n_pass - 1):
                            finish_phase(after_pass)
                with m.Case(Phase.EMIT):
                    m.d.comb += [
                        o_flit.payload.data.eq(result_read.data),
                        o_flit.valid.eq(1),
                    ]
                    with m.If(output_transfer):
                        m.d.sync += transfers.eq(transfers + 1)
                        with m.If(transfers == n_result_words - 1):
                            finish_phase(initial_phase)

        # --- COMPUTE: issue (cycle c), multiply-accumulate (c+1), requantize and write (c+2) ------
        in_compute = running & (phase == Phase.COMPUTE)
        chunk = Signal.like(n_in_words)
        output_index = Signal.like(config.n_out)
        weight_address = Signal(max(sram_address_bits, 1))
        drain = Signal(range(COMPUTE_DRAIN_CYCLES))
        issuing = in_compute & (output_index != n_out)
        last_chunk = chunk == n_in_words - 1
        m.d.comb += [
            weight_read.addr.eq(weight_address),
            activation_read.addr.eq(config.act_base + chunk),
            param_read.addr.eq(output_index),
        ]
        with m.If(issuing):
            m.d.sync += [
                chunk.eq(Mux(last_chunk, 0, chunk + 1)),
                output_index.eq(output_index + last_chunk),
                weight_address.eq(weight_address + 1),
            ]
        with m.Elif(in_compute):
            m.d.sync += drain.eq(drain + 1)
            with m.If(drain == COMPUTE_DRAIN_CYCLES - 1):
                finish_phase(after_compute)
        with m.If(~in_compute):
            m.d.sync += [chunk.eq(0), output_index.eq(0), weight_address.eq(config.w_base), drain.eq(0)]

        # Stage 1: the words read for cycle c are present; accumulate (from the bias on chunk 0).
        stage1_valid = Signal()
        stage1_first = Signal()
        stage1_last = Signal()
        stage1_output = Signal.like(config.n_out)
        m.d.sync += [
            stage1_valid.eq(issuing),
            stage1_first.eq(chunk == 0),
            stage1_last.eq(last_chunk),
            stage1_output.eq(output_index),
        ]
        param_row = param_read.data
        products = [
            weight_read.data[LANE_BITS * lane:LANE_BITS * (lane + 1)].as_signed()
            * activation_read.data[LANE_BITS * lane:LANE_BITS * (lane + 1)].as_signed()
            for lane in range(lanes)
        ]
        lane_sum = Signal(signed(2 * LANE_BITS + lane_bits_log2))
        m.d.comb += lane_sum.eq(sum(products[1:], products[0]))
        accumulator = Signal(signed(ACC_BITS))
        with m.If(stage1_valid):
            # Assigning into ACC_BITS wraps modulo 2**ACC_BITS, as the contract requires.
            m.d.sync += accumulator.eq(Mux(stage1_first, param_row.bias, accumulator) + lane_sum)

        # Stage 2: requantize the finished accumulator on the exact wide value.
        stage2_valid = Signal()
        stage2_output = Signal.like(config.n_out)
        stage2_multiplier = Signal.like(param_row.multiplier)
        stage2_shift = Signal.like(param_row.shift)
        m.d.sync += [
            stage2_valid.eq(stage1_valid & stage1_last),
            stage2_output.eq(stage1_output),
            stage2_multiplier.eq(param_row.multiplier),
            stage2_shift.eq(param_row.shift),
        ]
        product = accumulator * stage2_multiplier
        rounding_width = product.shape().width + 1
        rounding = (Const(1, rounding_width) << stage2_shift)[:rounding_width] >> 1
        shifted = (product + rounding) >> stage2_shift
        with_zero_point = shifted + config.zp_out
        lower_bounded = Mux(with_zero_point < config.clamp_lo, config.clamp_lo, with_zero_point)
        requantized = Signal(signed(LANE_BITS))
        m.d.comb += requantized.eq(Mux(lower_bounded > config.clamp_hi, config.clamp_hi, lower_bounded))

        result_lane = stage2_output[:lane_bits_log2]
        all_lanes = (1 << lanes) - 1
        m.d.comb += result_write.addr.eq(stage2_output >> lane_bits_log2)
        with m.If(stage2_valid & in_compute):
            with m.If(result_lane == 0):
                # Lane 0 opens a word: clear the lanes beyond N_o left over from an earlier inference.
                m.d.comb += [
                    result_write.data.eq(requantized.as_unsigned()),
                    result_write.en.eq(all_lanes),
                ]
            with m.Else():
                m.d.comb += [
                    result_write.data.eq(Cat(*([requantized] * lanes))),
                    result_write.en.eq(Const(1, lanes) << result_lane),
                ]

        with m.If(~running):
            m.d.sync += [stage1_valid.eq(0), stage2_valid.eq(0)]
        return m
