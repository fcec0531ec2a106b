"""The processing element of one tile: SRAM (weights and two activation banks), parameter table, result
buffer, forward queue and its three concurrent sides, input, compute and output (docs/architecture.md
section 4; windowed layers, convolution, max pooling and lane-wise multiply-accumulate (depthwise
convolution, average pools), section 4.1; store and forward ranges of a stream that carries several
tensors, and the elementwise residual join op ADD, section 4.2; the channel concatenation op CONCAT,
section 4.3; the per-pixel interleaved output order of output-channel groups (register pass_per_pixel),
section 4.4; timing, section 6 rule 4)."""
from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Mux, ResetInserter, Signal, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.fifo import SyncFIFO
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2, exact_log2

from flowtile.arch import ACC_BITS, ADD_MULT_BITS, CONFIG_FIELDS, OP_ADD, OP_CONCAT, OP_LANE, OP_MAX, Arch

from .layouts import (LANE_BITS, LOAD_TARGET_CONFIG, LOAD_TARGET_PARAMS, LOAD_TARGET_SRAM, check_arch,
                      config_layout, flit_signature, load_signature, param_layout)

__all__ = ["PE", "COMPUTE_DRAIN_CYCLES"]


#: Cycles COMPUTE lasts beyond its ``I`` issue cycles: one to accumulate (or max) the last
#: read words, one to requantize (or clamp) and write the last result.
COMPUTE_DRAIN_CYCLES = 2


class PE(wiring.Component):
    """PE of the tile with load-bus index ``tile_index`` (``row * cols + col``).

    Ports:
        i_flit: flits from the router's L output. o_flit: flits into the router's L input.
        load: the chip's load bus (:func:`hdl.layouts.load_signature`); this PE takes the writes whose
            ``tile`` equals ``tile_index``, and only while ``run = 0``.
        run: while 0 every side is held at the start of inference 0 (input and compute bank 0, every
            counter and flag and the compute pipeline cleared, the forward queue held in reset, hence
            empty) and no flit is transferred; config, SRAM and parameters keep what was loaded.

    Three sides work concurrently, each a fixed sequence per inference ``s = 0, 1, ...`` (section 4;
    ``K = n_in_words``, ``P = n_pass``, ``B = store_end - store_begin``, ``F = arch.forward_queue_words``,
    ``t`` = the cycle of a transfer):

    * input side: ``K`` RECV then ``P`` PASS transfers on ``i_flit``, one a cycle at most, in order. RECV
      word ``k`` is written to SRAM word ``act_base + (s mod 2) * B + k - store_begin`` iff
      ``store_begin <= k < store_end`` and pushed into the forward queue iff
      ``forward_begin <= k < forward_end``; every PASS word is pushed. A pushing transfer needs a free
      queue slot (``i_flit.ready`` depends on the queue's fill level, never on ``o_flit``). In a computing
      tile the first transfer of inference ``s >= 1`` happens at a cycle ``>= c_{s-1}`` (possibly in
      cycle ``c_{s-1}`` itself).
    * forward queue: a :class:`~amaranth.lib.fifo.SyncFIFO` of ``F`` words: pushable iff it holds fewer
      than ``F`` words (also in a cycle it is popped), a word pushed in cycle ``t`` is poppable from
      ``t + 1``.
    * compute side (only if ``n_out > 0``): COMPUTE of inference ``s`` occupies exactly the cycles
      ``[c_s, c_s + I + 2)`` (``I`` = :func:`flowtile.program.compute_issue_cycles`), with
      ``c_s = max(t(RECV word store_end - 1 of s) + 1, c_{s-1} + I + 2, t(last EMIT of s - 1) + 1)``,
      and reads activation bank ``s mod 2`` (every activation address below is relative to
      ``act_base + (s mod 2) * B``).
    * output side: ``Q = (forward_end - forward_begin) + P`` pops (the queue's head word leaves on
      ``o_flit``) and ``E`` = :func:`flowtile.program.result_words` EMIT transfers (EMIT ``j`` sends result
      word ``j``), one a cycle at most, in this order (section 4.4, ``n_pix = out_rows * out_width``,
      ``W_px = E / n_pix``, ``R = pass_per_pixel``): ``Q - n_pix * R`` pops, then for each output pixel
      ``q``: ``R`` pops and EMITs ``q*W_px .. q*W_px + W_px - 1`` (with ``R = 0``: all pops, then all
      EMITs). A pop needs the queue's head; the first EMIT of ``s`` happens at a cycle ``>= c_s + I + 2``
      (the last result, written in cycle ``c_s + I + 1``, is read through the result buffer's
      combinational port), every later EMIT of ``s`` only after its predecessor.

    A tile with ``n_out = 0`` has no compute side and no EMITs. Every emitted flit carries the configured
    destination; ``o_flit.valid`` never depends on ``o_flit.ready``. Arithmetic, windowing (MAC: dense
    and convolution, a dense layer being the 1x1 case; MAX: max pooling; LANE: lane-wise MAC) and
    pipeline: sections 4 and 4.1 of docs/architecture.md; the RECV ranges and op ADD: section 4.2; op
    CONCAT: section 4.3.

    ADD runs LANE's loop nest with the 1x2 kernel the compiler writes for it: issue ``(pixel p = oy*in_width
    + ox, word cw, kx)`` reads activation word ``act_base + operand_a_offset + p*CW + cw`` (operand ``a``,
    ``kx = 0``) or ``act_base + operand_b_offset + p*CW + cw`` (operand ``b``, ``kx = 1``; either operand
    may come first in the stored words), no weight word, and lane ``l`` multiplies it by ``add_mult_a`` or
    ``add_mult_b`` instead of a weight; accumulation from the bias at ``kx = 0``, requantization with row
    ``cw*L + l`` and the pipeline are LANE's.

    CONCAT runs the same loop nest with a 1x1 kernel: one issue per (pixel ``p``, output word ``cw``),
    reading ``act_base + operand_a_offset + p*CWa + cw`` times ``add_mult_a`` if ``cw < CWa =
    concat_words_a``, else ``act_base + operand_b_offset + p*CWb + (cw - CWa)`` times ``add_mult_b``
    (``CWb = CW - CWa``); every issue is a whole output word (bias plus one product per lane), requantized
    with row ``cw*L + l`` into result word ``q*CW + cw``. Each lane therefore has one int8 x 24-bit signed
    multiplier (a weight lane sign-extended, or an unsigned 23-bit operand multiplier) shared by MAC,
    LANE, ADD and CONCAT, and the activation address has one wide multiplier ``p * pitch`` whose pitch is
    ``CW``, ``CWa`` or ``CWb``.

    Registers an op does not read (the operand offsets, multipliers and ``concat_words_a`` of MAC, MAX and
    LANE; ``concat_words_a`` of ADD) do not affect it.

    The parameter table is banked by lane (row ``r`` in bank ``r % L`` at address ``r // L``) so that
    LANE, ADD and CONCAT read the ``L`` rows ``cw*L + l`` of one word in one cycle; MAC reads row ``o``
    from bank ``o % L``. The load bus still addresses rows, the banking is internal.
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
        # One parameter bank per lane: row r lives in bank r % L at address r // L.
        param_bank_depth = -(-arch.max_tile_outputs // lanes)
        param_writes, param_reads = [], []
        for lane in range(lanes):
            bank = Memory(shape=params, depth=param_bank_depth, init=[])
            m.submodules[f"param_bank{lane}"] = bank
            param_writes.append(bank.write_port())
            param_reads.append(bank.read_port())
        m.submodules.result_buffer = result_buffer = Memory(
            shape=unsigned(arch.flit_data_bits), depth=arch.result_words, init=[])
        result_write = result_buffer.write_port(granularity=LANE_BITS)
        result_read = result_buffer.read_port(domain="comb")

        config = Signal(config_layout())
        n_in_words, n_pass = config.n_in_words, config.n_pass
        # A tile computes iff N_o > 0 (section 4). COMPUTE also needs stored words inside the K RECV words
        # and a non-empty window loop nest (section 4.1); a config with n_out > 0 but without them (rejected
        # by encode_config) behaves as n_out = 0 rather than waiting or issuing forever.
        computes = Signal()
        m.d.comb += computes.eq((config.n_out != 0) & (n_in_words != 0) & (config.store_begin < config.store_end)
                                & (config.store_end <= n_in_words) & (config.words_per_pixel != 0)
                                & (config.kernel_h != 0) & (config.kernel_w != 0) & (config.out_rows != 0)
                                & (config.out_width != 0))
        n_out = Mux(computes, config.n_out, 0)
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
        param_load = load_here & (load.target == LOAD_TARGET_PARAMS) & (load.addr < arch.max_tile_outputs)
        load_bank = load.addr[:lane_bits_log2] if lane_bits_log2 else 0
        for lane, param_write in enumerate(param_writes):
            m.d.comb += [
                param_write.addr.eq(load.addr >> lane_bits_log2),
                param_write.data.eq(load.data[:params.size]),
                param_write.en.eq(param_load & (load_bank == lane)),
            ]

        # --- the three sides (section 4): input, compute, output --------------------------------------
        # Counts of one inference. B: stored words (the bank size); Q: words popped from the forward queue.
        bank_words = Signal.like(config.store_end)
        m.d.comb += bank_words.eq(Mux(config.store_end > config.store_begin, config.store_end - config.store_begin, 0))
        forwarded = Mux(config.forward_end > config.forward_begin, config.forward_end - config.forward_begin, 0)
        input_words = Signal(len(n_in_words) + 1)       # K + P
        popped_words = Signal(len(n_in_words) + 1)      # Q = (forward_end - forward_begin) + P
        m.d.comb += [input_words.eq(n_in_words + n_pass), popped_words.eq(forwarded + n_pass)]

        # The forward queue: F words, SyncFIFO's rule (section 4). Held in reset while run = 0, so it is empty
        # when run rises (whatever an interrupted run left in it).
        queue = SyncFIFO(width=arch.flit_data_bits, depth=arch.forward_queue_words)
        m.submodules.forward_queue = ResetInserter({"sync": ~self.run})(queue)

        running = self.run
        # Compute side state. ``compute_bank``: the bank (inference parity) of the COMPUTE running or next
        # to run; it flips when a COMPUTE ends. ``stored``: RECV word store_end - 1 of the inference of the
        # next COMPUTE has been received. ``results_pending``: the result buffer holds results whose EMITs
        # are not all done (set in the cycle after COMPUTE's last cycle, cleared by the last EMIT).
        computing = Signal()
        compute_bank = Signal()
        stored = Signal()
        results_pending = Signal()
        # c_s = max(t(RECV word store_end - 1) + 1, c_{s-1} + I + 2, t(last EMIT of s-1) + 1): every term
        # is a registered flag here, so compute_start depends on no handshake of this cycle.
        compute_start = Signal()
        m.d.comb += compute_start.eq(running & computes & stored & ~computing & ~results_pending)
        in_compute = running & (computing | compute_start)
        #: Internal signals a simulation testbench may watch (not ports): COMPUTE begins in this cycle
        #: (``c_s``), and the bank COMPUTE reads or will read next.
        self.probes = {"compute_start": compute_start, "compute_bank": compute_bank}

        # --- input side: K RECV transfers, then P PASS transfers, per inference ----------------------
        i_flit, o_flit = self.i_flit, self.o_flit
        in_index = Signal.like(input_words)             # transfer k of the current inference
        in_bank = Signal()                              # s mod 2 of the input side's inference s
        receiving = in_index < n_in_words
        stores = receiving & (in_index >= config.store_begin) & (in_index < config.store_end)
        pushes = ~receiving | ((in_index >= config.forward_begin) & (in_index < config.forward_end))
        # A computing tile starts inference s >= 1 at a cycle >= c_{s-1}. At in_index = 0 of inference s
        # the COMPUTEs begun so far (this cycle's included) number s - 1 or s (COMPUTE of s needs a RECV of
        # s; inference s - 1 began at >= c_{s-2}), so comparing parities decides. s = 0: both are 0.
        computes_begun_parity = compute_bank ^ (computing | compute_start)
        may_begin = ~computes | (in_index != 0) | (computes_begun_parity == in_bank)
        m.d.comb += i_flit.ready.eq(running & (input_words != 0) & may_begin & (~pushes | queue.w_rdy))
        input_transfer = i_flit.valid & i_flit.ready
        m.d.comb += [queue.w_data.eq(i_flit.payload.data), queue.w_en.eq(input_transfer & pushes)]
        with m.If(input_transfer):
            with m.If(in_index == input_words - 1):
                m.d.sync += [in_index.eq(0), in_bank.eq(~in_bank)]
            with m.Else():
                m.d.sync += in_index.eq(in_index + 1)

        sram_address_bits = max(ceil_log2(arch.sram_words), 1)
        with m.If(~running):
            m.d.comb += [
                sram_write.addr.eq(load.addr),
                sram_write.data.eq(load.data[:arch.flit_data_bits]),
                sram_write.en.eq(load_here & (load.target == LOAD_TARGET_SRAM) & (load.addr < arch.sram_words)),
            ]
        with m.Else():
            # Section 4.2: RECV word k is stored iff store_begin <= k < store_end, into bank s mod 2.
            bank_base = config.act_base + Mux(in_bank, bank_words, 0)
            m.d.comb += [
                sram_write.addr.eq((bank_base + in_index - config.store_begin)[:sram_address_bits]),
                sram_write.data.eq(i_flit.payload.data),
                sram_write.en.eq(input_transfer & stores),
            ]

        with m.If(compute_start):
            m.d.sync += [computing.eq(1), stored.eq(0)]
        # Set after the clear: RECV word store_end - 1 of inference s + 1 may arrive in cycle c_s itself.
        with m.If(input_transfer & stores & (in_index + 1 == config.store_end)):
            m.d.sync += stored.eq(1)

        # The op decides the loop nest of COMPUTE (below) and the result words a pixel (the output side).
        is_max = config.op == OP_MAX
        is_lane = config.op == OP_LANE
        is_add = config.op == OP_ADD
        is_concat = config.op == OP_CONCAT
        # ADD and CONCAT read two operand maps (at their own stored-word offsets) and multiply by an
        # operand multiplier instead of a weight.
        two_operands = is_add | is_concat
        # LANE, ADD and CONCAT accumulate and requantize each lane on its own, with parameter row cw*L + l.
        lane_wise = is_lane | two_operands
        # MAX, LANE, ADD and CONCAT produce one whole result word per (pixel, cw) and preserve channels.
        per_word = is_max | lane_wise
        # W_px: result words a pixel (N_r for MAC, CW for the channel-preserving ops).
        pixel_result_words = Signal(max(len(config.words_per_pixel), len(n_result_words)))
        m.d.comb += pixel_result_words.eq(Mux(per_word, config.words_per_pixel, n_result_words))

        # --- output side (sections 4 and 4.4), per inference: Q_f + P_bulk pops ("bulk"), then for each
        # output pixel q: pass_per_pixel pops and the W_px EMITs of result words q*W_px .. q*W_px + W_px - 1.
        # With pass_per_pixel = 0: Q pops, then E EMITs. n_pix * pass_per_pixel multiplies registers that
        # only change while run = 0. A config that breaks section 4.4's rule (a tile that does not compute,
        # or n_pix * pass_per_pixel > n_pass; rejected by encode_config) behaves as pass_per_pixel = 0.
        interleaved_pops = Signal(len(config.out_rows) + len(config.out_width) + len(config.pass_per_pixel))
        m.d.comb += interleaved_pops.eq(config.out_rows * config.out_width * config.pass_per_pixel)
        interleaves = computes & (config.pass_per_pixel != 0) & (interleaved_pops <= n_pass)
        pixel_pops = Mux(interleaves, config.pass_per_pixel, 0)
        bulk_pops = Signal.like(popped_words)          # Q_f + P_bulk
        m.d.comb += bulk_pops.eq(popped_words - Mux(interleaves, interleaved_pops, 0))
        out_index = Signal.like(popped_words)          # pop of the bulk
        out_emitting = Signal()                        # past this inference's bulk pops: in its pixels
        pixel_popped = Signal()                        # the current pixel's pops are done
        pixel_word = Signal(max(len(config.pass_per_pixel), len(pixel_result_words)))   # pop or EMIT in the pixel
        # EMIT transfers of this inference (n_pix * N_r), counted up by COMPUTE.
        emit_words = Signal(max(len(popped_words), len(config.n_out)))
        emit_index = Signal.like(emit_words)           # EMIT j = q*W_px + j': result word j
        in_pixels = computes & (out_emitting | (bulk_pops == 0))
        emit_phase = in_pixels & (pixel_popped | (pixel_pops == 0))
        pop_phase = Mux(in_pixels, ~emit_phase, bulk_pops != 0)
        m.d.comb += [
            o_flit.valid.eq(running & Mux(emit_phase, results_pending, pop_phase & queue.r_rdy)),
            o_flit.payload.data.eq(Mux(emit_phase, result_read.data, queue.r_data)),
            o_flit.payload.dest_row.eq(config.dest_row),
            o_flit.payload.dest_col.eq(config.dest_col),
            o_flit.payload.dest_host.eq(config.dest_host),
            queue.r_en.eq(running & pop_phase & o_flit.ready),
            result_read.addr.eq(emit_index),
        ]
        output_transfer = o_flit.valid & o_flit.ready
        with m.If(output_transfer):
            with m.If(emit_phase):
                with m.If(emit_index == emit_words - 1):
                    # The inference's last EMIT: the result buffer is free for the next COMPUTE.
                    m.d.sync += [emit_index.eq(0), pixel_word.eq(0), pixel_popped.eq(0), out_emitting.eq(0),
                                 results_pending.eq(0)]
                with m.Else():
                    m.d.sync += emit_index.eq(emit_index + 1)
                    with m.If(pixel_word == pixel_result_words - 1):
                        m.d.sync += [pixel_word.eq(0), pixel_popped.eq(0)]
                    with m.Else():
                        m.d.sync += pixel_word.eq(pixel_word + 1)
            with m.Elif(in_pixels):
                with m.If(pixel_word == pixel_pops - 1):
                    m.d.sync += [pixel_word.eq(0), pixel_popped.eq(1)]
                with m.Else():
                    m.d.sync += pixel_word.eq(pixel_word + 1)
            with m.Else():
                with m.If(out_index == bulk_pops - 1):
                    m.d.sync += [out_index.eq(0), out_emitting.eq(computes)]
                with m.Else():
                    m.d.sync += out_index.eq(out_index + 1)

        # --- COMPUTE: issue (cycle c), accumulate or max (c+1), requantize or clamp and write (c+2) --
        # Loop nest of section 4.1, innermost last. MAC: output row, output column, output channel o,
        # ky, kx, cw (the weight order). MAX, LANE, ADD and CONCAT: output row, output column, cw, ky, kx
        # (LANE's weight order; ADD's 1x2 "kernel" is its two operands, CONCAT's 1x1 kernel makes one issue
        # per output word). Each counter steps when every counter inside it wraps; the two orders only
        # differ in where cw sits.
        out_row = Signal.like(config.out_rows)            # relative to out_row_begin
        out_col = Signal.like(config.out_width)
        channel = Signal.like(config.n_out)              # output channel o (MAC only)
        kernel_y = Signal.like(config.kernel_h)
        kernel_x = Signal.like(config.kernel_w)
        word = Signal.like(config.words_per_pixel)       # cw
        issue_done = Signal()
        drain = Signal(range(COMPUTE_DRAIN_CYCLES))
        issuing = in_compute & ~issue_done

        last_word = word == config.words_per_pixel - 1
        last_kernel_x = kernel_x == config.kernel_w - 1
        last_kernel_y = kernel_y == config.kernel_h - 1
        last_channel = channel == n_out - 1
        last_out_col = out_col == config.out_width - 1
        last_out_row = out_row == config.out_rows - 1
        window_done = last_kernel_x & last_kernel_y
        # One output value (MAC: channel o; the per-word ops: word cw) is finished with this issue.
        first_of_output = Signal()
        last_of_output = Signal()
        pixel_done = Signal()
        step_word, step_kernel_x, step_kernel_y, step_channel = Signal(), Signal(), Signal(), Signal()
        with m.If(per_word):
            m.d.comb += [
                step_kernel_x.eq(1),
                step_kernel_y.eq(last_kernel_x),
                step_word.eq(window_done),
                first_of_output.eq((kernel_x == 0) & (kernel_y == 0)),
                last_of_output.eq(window_done),
                pixel_done.eq(window_done & last_word),
            ]
        with m.Else():
            m.d.comb += [
                step_word.eq(1),
                step_kernel_x.eq(last_word),
                step_kernel_y.eq(last_word & last_kernel_x),
                step_channel.eq(last_word & window_done),
                first_of_output.eq((word == 0) & (kernel_x == 0) & (kernel_y == 0)),
                last_of_output.eq(last_word & window_done),
                pixel_done.eq(last_word & window_done & last_channel),
            ]

        def count(counter, step, last):
            with m.If(step):
                m.d.sync += counter.eq(Mux(last, 0, counter + 1))

        # Result words of the pixels issued so far (q * N_r for MAC, q * CW for the per-word ops): a
        # running sum instead of a multiplier. It survives COMPUTE as the EMIT count.
        result_base = Signal.like(emit_words)
        weight_address = Signal(sram_address_bits)
        with m.If(issuing):
            count(word, step_word, last_word)
            count(kernel_x, step_kernel_x, last_kernel_x)
            count(kernel_y, step_kernel_y, last_kernel_y)
            count(channel, step_channel, last_channel)
            count(out_col, pixel_done, last_out_col)
            count(out_row, pixel_done & last_out_col, last_out_row)
            # A pixel reads its weights in issue order (MAC: w_base .. w_base + N_o*K_w - 1; LANE:
            # w_base .. w_base + CW*KH*KW - 1), then starts over. MAX, ADD and CONCAT ignore the word read.
            m.d.sync += weight_address.eq(Mux(pixel_done, config.w_base, weight_address + 1))
            with m.If(pixel_done):
                m.d.sync += [result_base.eq(result_base + pixel_result_words),
                             emit_words.eq(result_base + pixel_result_words)]
                with m.If(last_out_col & last_out_row):
                    m.d.sync += issue_done.eq(1)
        with m.Elif(in_compute):
            m.d.sync += drain.eq(drain + 1)
            with m.If(drain == COMPUTE_DRAIN_CYCLES - 1):
                # Cycle c_s + I + 1, COMPUTE's last: its last result is written now and readable (the
                # result buffer's read port is combinational) from the next cycle, when EMIT may begin.
                m.d.sync += [computing.eq(0), results_pending.eq(1), compute_bank.eq(~compute_bank),
                             drain.eq(0), issue_done.eq(0), result_base.eq(0)]
        with m.If(~in_compute):
            m.d.sync += [word.eq(0), kernel_x.eq(0), kernel_y.eq(0), channel.eq(0), out_col.eq(0),
                         out_row.eq(0), result_base.eq(0), issue_done.eq(0), drain.eq(0),
                         weight_address.eq(config.w_base)]

        # Input position of this issue. oy*S and ox*S (S <= 3) and iy*in_width (8 x 8 bits) are small
        # multipliers; pixel_index*pitch (pitch CW, or CONCAT's CWa or CWb) is the one wide product. An
        # incremental activation address would need row and column pitches (in_width*CW, S*CW, ...)
        # precomputed per config, so the straightforward form is kept until synthesis timing asks for it.
        # ADD's window does not move with kx: its two issues of a word read the same pixel p of operand a
        # (kx = 0) and of operand b (kx = 1), each map at its own stored-word offset (section 4.2).
        # CONCAT's output word cw comes from operand a's word cw while cw < CWa, else from operand b's word
        # cw - CWa; the maps have CWa and CWb = CW - CWa words a pixel (section 4.3). MAC, MAX and LANE read
        # the one map at act_base (offset 0, pitch CW) whatever the operand registers hold.
        concat_words_b = Signal.like(config.words_per_pixel)
        m.d.comb += concat_words_b.eq(config.words_per_pixel - config.concat_words_a)
        in_operand_b_words = word >= config.concat_words_a
        operand_b = (is_add & (kernel_x != 0)) | (is_concat & in_operand_b_words)
        operand_offset = Mux(two_operands, Mux(operand_b, config.operand_b_offset, config.operand_a_offset), 0)
        # Words a pixel of the map this issue reads, and the word within its pixel. The pitch is a mux in
        # front of the one wide multiplier rather than a second (and third) multiplier.
        pixel_pitch = Mux(is_concat, Mux(operand_b, concat_words_b, config.concat_words_a), config.words_per_pixel)
        operand_word = Mux(is_concat & operand_b, word - config.concat_words_a, word)[:len(word)]
        out_y = config.out_row_begin + out_row
        window_y = out_y * config.stride + kernel_y          # iy + pad_top
        window_x = out_col * config.stride + Mux(is_add, 0, kernel_x)   # ix + pad_left
        in_bounds = ((window_y >= config.pad_top) & (window_y < config.pad_top + config.in_height)
                     & (window_x >= config.pad_left) & (window_x < config.pad_left + config.in_width))
        input_y = (window_y - config.pad_top)[:len(config.in_height)]
        input_x = (window_x - config.pad_left)[:len(config.in_width)]
        pixel_index = input_y * config.in_width + input_x
        activation_offset = operand_offset + pixel_index * pixel_pitch + operand_word
        m.d.comb += [
            weight_read.addr.eq(weight_address),
            # Section 4: COMPUTE of inference s reads bank s mod 2, act_base + (s mod 2) * B onwards.
            activation_read.addr.eq((config.act_base + Mux(compute_bank, bank_words, 0) + activation_offset)
                                    [:sram_address_bits]),
        ]
        # MAC needs row o (bank o % L, address o // L); LANE, ADD and CONCAT need rows cw*L + l of every
        # lane l (address cw in every bank).
        param_address = Mux(lane_wise, word, channel >> lane_bits_log2)
        for param_read in param_reads:
            m.d.comb += param_read.addr.eq(param_address)

        # Stage 1: the words read for cycle c are present. The in-bounds decision was registered at
        # issue; a padded position replaces the (meaningless) SRAM word by pad_value in every lane.
        stage1_valid = Signal()
        stage1_first = Signal()
        stage1_last = Signal()
        stage1_padded = Signal()
        stage1_operand_b = Signal()
        stage1_result_address = Signal.like(result_base)
        stage1_result_lane = Signal(max(lane_bits_log2, 1))
        result_offset = Mux(per_word, word, channel >> lane_bits_log2)
        m.d.sync += [
            stage1_valid.eq(issuing),
            stage1_first.eq(first_of_output),
            stage1_last.eq(last_of_output),
            stage1_padded.eq(~in_bounds),
            stage1_operand_b.eq(operand_b),
            stage1_result_address.eq(result_base + result_offset),
            stage1_result_lane.eq(channel[:lane_bits_log2] if lane_bits_log2 else 0),
        ]
        activation = Mux(stage1_padded, Cat(*([config.pad_value] * lanes)), activation_read.data)

        def lane_of(value, lane):
            return value[LANE_BITS * lane:LANE_BITS * (lane + 1)].as_signed()

        # Parameter rows present in stage 1, one per lane: LANE, ADD, CONCAT use bank l for lane l; MAC uses only
        # lane 0's accumulator and requantizer, fed with row o from bank o % L (stage1_result_lane is
        # o mod L, registered with the read address).
        mac_param_row = param_reads[0].data
        if lanes > 1:
            mac_param_row = Signal(params)
            with m.Switch(stage1_result_lane):
                for lane in range(lanes):
                    with m.Case(lane):
                        m.d.comb += mac_param_row.eq(param_reads[lane].data)
        lane0_param_row = Signal(params)
        m.d.comb += lane0_param_row.eq(Mux(lane_wise, param_reads[0].data.as_value(), mac_param_row.as_value()))
        lane_param_rows = [lane0_param_row] + [param_reads[lane].data for lane in range(1, lanes)]

        # One multiplier per lane, int8 activation x signed 24-bit multiplicand: the weight lane
        # (sign-extended int8) for MAC and LANE, or the unsigned 23-bit operand multiplier of ADD and
        # CONCAT (add_mult_a for operand a, add_mult_b for operand b, as registered at issue), shared
        # rather than a second multiplier. |int8 x uint23| < 2^30, so the product fits 31 signed bits.
        add_multiplier = Mux(stage1_operand_b, config.add_mult_b, config.add_mult_a)
        products = []
        for lane in range(lanes):
            multiplicand = Mux(two_operands, add_multiplier, lane_of(weight_read.data, lane))
            product = Signal(signed(LANE_BITS + ADD_MULT_BITS), name=f"product{lane}")
            m.d.comb += product.eq(multiplicand * lane_of(activation, lane))
            products.append(product)
        # MAC sums int8 x int8 products, which fit 16 bits (|w*a| <= 2^14): the adder tree stays narrow.
        narrow_products = [product[:2 * LANE_BITS].as_signed() for product in products]
        lane_sum = Signal(signed(2 * LANE_BITS + lane_bits_log2))
        m.d.comb += lane_sum.eq(sum(narrow_products[1:], narrow_products[0]))
        # MAC accumulates the lane sum in accumulator 0; LANE, ADD and CONCAT accumulate each lane's
        # product in its own (CONCAT's 1x1 window: bias + one product, first and last issue at once).
        accumulators = [Signal(signed(ACC_BITS), name=f"accumulator{lane}") for lane in range(lanes)]
        addends = [Mux(lane_wise, products[0], lane_sum)] + products[1:]
        # MAX: lane-wise signed maximum over the window, starting from its first word.
        window_max = Signal(unsigned(arch.flit_data_bits))
        with m.If(stage1_valid & ~is_max):
            for accumulator, addend, param_row in zip(accumulators, addends, lane_param_rows):
                # Assigning into ACC_BITS wraps modulo 2**ACC_BITS, as the contract requires.
                m.d.sync += accumulator.eq(Mux(stage1_first, param_row.bias, accumulator) + addend)
        with m.If(stage1_valid & is_max):
            m.d.sync += window_max.eq(Cat(*(
                Mux(stage1_first | (lane_of(activation, lane) > lane_of(window_max, lane)),
                    lane_of(activation, lane), lane_of(window_max, lane))
                for lane in range(lanes))))

        # Stage 2: requantize the finished accumulators on the exact wide value (MAC: lane 0 only;
        # LANE, ADD and CONCAT: all lanes in parallel), or clamp the window maximum lane by lane (MAX).
        stage2_valid = Signal()
        stage2_result_address = Signal.like(stage1_result_address)
        stage2_result_lane = Signal.like(stage1_result_lane)
        m.d.sync += [
            stage2_valid.eq(stage1_valid & stage1_last),
            stage2_result_address.eq(stage1_result_address),
            stage2_result_lane.eq(stage1_result_lane),
        ]
        stage2_multipliers, stage2_shifts = [], []
        for lane, param_row in enumerate(lane_param_rows):
            multiplier = Signal.like(param_row.multiplier, name=f"stage2_multiplier{lane}")
            shift = Signal.like(param_row.shift, name=f"stage2_shift{lane}")
            m.d.sync += [multiplier.eq(param_row.multiplier), shift.eq(param_row.shift)]
            stage2_multipliers.append(multiplier)
            stage2_shifts.append(shift)

        def clamp(value):
            lower_bounded = Mux(value < config.clamp_lo, config.clamp_lo, value)
            return Mux(lower_bounded > config.clamp_hi, config.clamp_hi, lower_bounded)

        def requantize(lane, accumulator, multiplier, shift):
            """Section 4's y = clamp(round_half_even(acc * M / 2^S) + zp_out) on the exact wide value.

            Ties to even as ONNX QuantizeLinear rounds: add 2^(S-1) - 1, plus one more when the truncated
            quotient is odd, then shift. Shift 0 (only in unused all-zero parameter rows) passes through.
            """
            product = accumulator * multiplier
            rounding_width = product.shape().width + 1
            half = (Const(1, rounding_width) << shift)[:rounding_width] >> 1
            quotient_is_odd = (product >> shift)[0]
            rounded = (product + half - 1 + quotient_is_odd) >> shift
            shifted = Mux(shift == 0, product, rounded)
            result = Signal(signed(LANE_BITS), name=f"requantized{lane}")
            m.d.comb += result.eq(clamp(shifted + config.zp_out))
            return result

        requantized = [requantize(lane, *operands)
                       for lane, operands in enumerate(zip(accumulators, stage2_multipliers, stage2_shifts))]
        clamped_max = Signal(unsigned(arch.flit_data_bits))
        m.d.comb += clamped_max.eq(Cat(*(clamp(lane_of(window_max, lane))[:LANE_BITS] for lane in range(lanes))))

        all_lanes = (1 << lanes) - 1
        m.d.comb += result_write.addr.eq(stage2_result_address)
        with m.If(stage2_valid & in_compute):
            with m.If(is_max):
                m.d.comb += [result_write.data.eq(clamped_max), result_write.en.eq(all_lanes)]
            with m.Elif(lane_wise):
                m.d.comb += [result_write.data.eq(Cat(*requantized)), result_write.en.eq(all_lanes)]
            with m.Elif(stage2_result_lane == 0):
                # Lane 0 opens a word: clear the lanes beyond N_o left over from an earlier inference.
                m.d.comb += [
                    result_write.data.eq(requantized[0].as_unsigned()),
                    result_write.en.eq(all_lanes),
                ]
            with m.Else():
                m.d.comb += [
                    result_write.data.eq(Cat(*([requantized[0]] * lanes))),
                    result_write.en.eq(Const(1, lanes) << stage2_result_lane),
                ]

        # --- run = 0: every side held at the start of inference 0 -------------------------------------
        with m.If(~running):
            m.d.sync += [stage1_valid.eq(0), stage2_valid.eq(0), in_index.eq(0), in_bank.eq(0), computing.eq(0),
                         compute_bank.eq(0), stored.eq(0), results_pending.eq(0), out_index.eq(0),
                         out_emitting.eq(0), pixel_popped.eq(0), pixel_word.eq(0), emit_index.eq(0)]
        return m
