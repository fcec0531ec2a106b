"""The processing element of one tile: SRAM (weights and two activation banks), parameter table, result
ring, forward queue and its three concurrent sides, input, compute and output (docs/architecture.md
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
        load: the chip's load bus (:func:`flowtile.hdl.layouts.load_signature`); this PE takes the writes whose
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
    * result ring: ``R = arch.result_words`` words (any ``R >= 1``, not necessarily a power of two).
      Result words are numbered across inferences, ``j = s * E + (index within s)``, ``E = n_pix * W_px``;
      word ``j`` lives in slot ``j mod R`` (a write slot and a read slot register wrap at ``R``). It
      never has to hold an inference's results: nothing bounds ``E``.
    * compute side (only if ``n_out > 0``): COMPUTE of inference ``s`` reads activation bank ``s mod 2``
      (every activation address below is relative to ``act_base + (s mod 2) * B``) and issues, in section 4.1's loop
      order over the tile's output pixels (:func:`flowtile.program.output_pixel_positions`: rows ``out_row_begin
      ..`` of ``out_rows``, the first from column ``out_col_begin``, the last up to column ``E' - 1``, ``E' =
      out_col_end`` or ``out_width`` if 0), result word by result word: word ``j`` takes ``d_j`` issue cycles back
      to back (:func:`flowtile.program.result_word_issue_cycles`: MAC ``L * K_w``, or ``(N_o mod L) * K_w`` for a
      pixel's short last word; MAX, LANE ``KH * KW``; ADD 2; CONCAT 1), from its first issue cycle ``a_j``. COMPUTE
      waits only between words: ``a_j = max(a_{j-1} + d_{j-1}, t(EMIT j - R) + 1)``, and for the first word of ``s``
      also ``>= t(RECV word store_end - 1 of s) + 1`` with ``+ 2`` drain cycles after the previous word (``a_{j-1} +
      d_{j-1} + 2``); the EMIT term (absent for ``j < R``) is implemented as "occupancy < R", occupancy = words
      whose first issue has happened minus words emitted, both registered. ``c_s`` = ``a_j`` of the first word of
      ``s``; COMPUTE occupies ``[c_s, a_last + d_last + 2)`` (``I + 2`` cycles, ``I`` =
      :func:`flowtile.program.compute_issue_cycles`, when it never waits for a slot). While the issue waits, issues
      in flight move on through the pipeline. Word ``j`` is written (its last lane, for MAC) in cycle ``a_j + d_j +
      1``.
    * output side: ``Q = (forward_end - forward_begin) + P`` pops (the queue's head word leaves on
      ``o_flit``) and ``E`` = :func:`flowtile.program.result_words` EMIT transfers (EMIT ``j`` sends result
      word ``j``), one a cycle at most, in this order (section 4.4, ``n_pix`` =
      :func:`flowtile.program.output_pixels` = ``out_rows * out_width - out_col_begin - (out_width - E')``,
      ``W_px = E / n_pix``, ``R_p = pass_per_pixel``): ``Q - n_pix * R_p`` pops, then for each output pixel
      ``q``: ``R_p`` pops and EMITs ``q*W_px .. q*W_px + W_px - 1`` (with ``R_p = 0``: all pops, then all
      EMITs); the output side counts them from the registers (it may be ahead of or behind COMPUTE). A pop
      needs the queue's head; EMIT ``j`` needs its predecessor and word ``j`` written: it happens at a cycle
      ``>= a_j + d_j + 2`` (a registered count of words written minus words emitted is non-zero; the word
      is read through the ring's combinational port).

    A tile with ``n_out = 0`` has no compute side and no EMITs; so has a tile whose registers break a rule COMPUTE
    needs (stored words inside the RECV words, a non-empty window loop nest, a valid pixel band: ``out_col_begin <
    out_width``, ``out_col_end <= out_width``, ``n_pix >= 1``), which encode_config rejects. Every emitted flit
    carries the configured destination; ``o_flit.valid`` never depends on ``o_flit.ready``. Arithmetic, windowing
    (MAC: dense and convolution, a dense layer being the 1x1 case; MAX: max pooling; LANE: lane-wise MAC) and
    pipeline: sections 4 and 4.1 of docs/architecture.md; the RECV ranges and op ADD: section 4.2; op CONCAT:
    section 4.3.

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
        # The result ring (section 4): R = arch.result_words words, result word j (numbered across
        # inferences) in slot j mod R. Written lane by lane (MAC) or a whole word at once; the output side
        # reads the oldest unsent word through a combinational port, so a word written in cycle w is sent
        # from w + 1.
        ring_words = arch.result_words
        m.submodules.result_ring = result_ring = Memory(
            shape=unsigned(arch.flit_data_bits), depth=ring_words, init=[])
        result_write = result_ring.write_port(granularity=LANE_BITS)
        result_read = result_ring.read_port(domain="comb")

        config = Signal(config_layout())
        n_in_words, n_pass = config.n_in_words, config.n_pass
        # Section 4.1's band of output pixels: rows out_row_begin .. + out_rows - 1, the first from column
        # out_col_begin, the last up to column E' - 1, E' = out_col_end or (0) out_width; rows between whole.
        band_end = Signal.like(config.out_width)        # E'
        m.d.comb += band_end.eq(Mux(config.out_col_end != 0, config.out_col_end, config.out_width))
        # The band is valid iff out_col_begin < out_width, out_col_end <= out_width and n_pix >= 1; given the
        # first two, n_pix >= 1 fails only for a single row with E' <= out_col_begin.
        band_valid = ((config.out_col_begin < config.out_width) & (config.out_col_end <= config.out_width)
                      & ((config.out_rows != 1) | (band_end > config.out_col_begin)))
        # A tile computes iff N_o > 0 (section 4). COMPUTE also needs stored words inside the K RECV words
        # and a non-empty window loop nest over a valid pixel band (section 4.1); a config with n_out > 0 but
        # without them (rejected by encode_config) behaves as n_out = 0 rather than waiting or issuing forever.
        computes = Signal()
        m.d.comb += computes.eq((config.n_out != 0) & (n_in_words != 0) & (config.store_begin < config.store_end)
                                & (config.store_end <= n_in_words) & (config.words_per_pixel != 0)
                                & (config.kernel_h != 0) & (config.kernel_w != 0) & (config.out_rows != 0)
                                & (config.out_width != 0) & band_valid)
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
        # Compute side state. ``computing``: a COMPUTE has begun and not ended (it issues, waits between
        # words for a ring slot, or drains). ``compute_bank``: the bank (inference parity) of the COMPUTE
        # running or next to run; it flips when a COMPUTE ends. ``stored``: RECV word store_end - 1 of the
        # inference of the next COMPUTE has been received.
        computing = Signal()
        compute_bank = Signal()
        stored = Signal()
        # Ring occupancy: result words whose first issue has happened minus result words emitted, both
        # counted in earlier cycles (registered). A word's first issue in cycle t needs a free slot,
        # occupancy < R, which is section 4's a_j >= t(EMIT j - R) + 1: words 0 .. j - 1 have had their first
        # issue, so occupancy < R iff EMIT j - R happened before t.
        occupancy = Signal(range(ring_words + 1))
        ring_free = Signal()
        m.d.comb += ring_free.eq(occupancy < ring_words)
        # c_s = max(t(RECV word store_end - 1) + 1, a_last + d_last + 2 of s - 1, t(EMIT j - R) + 1) for the
        # first word j of s: every term is a registered flag or count here (``computing`` stays high
        # through the previous COMPUTE's drain), so compute_start depends on no handshake of this cycle.
        compute_start = Signal()
        m.d.comb += compute_start.eq(running & computes & stored & ~computing & ring_free)
        in_compute = running & (computing | compute_start)

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
        # With pass_per_pixel = 0: Q pops, then E EMITs. n_pix (section 4.1: out_rows * out_width less the
        # first row's out_col_begin columns and the last row's out_width - E') and n_pix * pass_per_pixel
        # are products of registers that only change while run = 0. A config that breaks section 4.4's rule
        # (a tile that does not compute, or n_pix * pass_per_pixel > n_pass; rejected by encode_config)
        # behaves as pass_per_pixel = 0. The output side knows E = n_pix * W_px from the registers alone (it
        # may run ahead of or behind COMPUTE): it counts the EMITs of an inference by output pixel (row of
        # the band, pixel within the row) and word in the pixel, over the same pixel list as COMPUTE.
        n_pix = Signal(len(config.out_rows) + len(config.out_width))
        m.d.comb += n_pix.eq(config.out_rows * config.out_width - config.out_col_begin
                             - (config.out_width - band_end))
        interleaved_pops = Signal(len(n_pix) + len(config.pass_per_pixel))
        m.d.comb += interleaved_pops.eq(n_pix * config.pass_per_pixel)
        interleaves = computes & (config.pass_per_pixel != 0) & (interleaved_pops <= n_pass)
        pixel_pops = Mux(interleaves, config.pass_per_pixel, 0)
        bulk_pops = Signal.like(popped_words)          # Q_f + P_bulk
        m.d.comb += bulk_pops.eq(popped_words - Mux(interleaves, interleaved_pops, 0))
        out_index = Signal.like(popped_words)          # pop of the bulk
        out_emitting = Signal()                        # past this inference's bulk pops: in its pixels
        pixel_popped = Signal()                        # the current pixel's pops are done
        pixel_word = Signal(max(len(config.pass_per_pixel), len(pixel_result_words)))   # pop or EMIT in the pixel
        # Output pixel of the EMITs: its row of the band (0 .. out_rows - 1) and its index within that row's
        # pixels (columns out_col_begin .. out_width - 1 in the first row, 0 .. E' - 1 in the last, all in
        # between; one row: out_col_begin .. E' - 1). Both count from 0, so the run = 0 clear needs no
        # register value.
        emit_col = Signal.like(config.out_width)
        emit_row = Signal.like(config.out_rows)
        emit_last_row = emit_row == config.out_rows - 1
        emit_row_pixels = (Mux(emit_last_row, band_end, config.out_width)
                           - Mux(emit_row == 0, config.out_col_begin, 0))
        # Result words completely written (their last lane or last output) minus result words emitted,
        # registered: the oldest unsent word is readable iff this is non-zero. ``read_slot``: its ring slot.
        written_words = Signal(range(ring_words + 1))
        read_slot = Signal(range(ring_words))
        in_pixels = computes & (out_emitting | (bulk_pops == 0))
        emit_phase = in_pixels & (pixel_popped | (pixel_pops == 0))
        pop_phase = Mux(in_pixels, ~emit_phase, bulk_pops != 0)
        m.d.comb += [
            o_flit.valid.eq(running & Mux(emit_phase, written_words != 0, pop_phase & queue.r_rdy)),
            o_flit.payload.data.eq(Mux(emit_phase, result_read.data, queue.r_data)),
            o_flit.payload.dest_row.eq(config.dest_row),
            o_flit.payload.dest_col.eq(config.dest_col),
            o_flit.payload.dest_host.eq(config.dest_host),
            queue.r_en.eq(running & pop_phase & o_flit.ready),
            result_read.addr.eq(read_slot),
        ]
        output_transfer = o_flit.valid & o_flit.ready
        emit_transfer = output_transfer & emit_phase
        with m.If(output_transfer):
            with m.If(emit_phase):
                m.d.sync += read_slot.eq(Mux(read_slot == ring_words - 1, 0, read_slot + 1))
                with m.If(pixel_word == pixel_result_words - 1):
                    m.d.sync += [pixel_word.eq(0), pixel_popped.eq(0)]
                    with m.If(emit_col == emit_row_pixels - 1):
                        m.d.sync += emit_col.eq(0)
                        with m.If(emit_last_row):
                            # The inference's last EMIT: the next transfer is a pop (or EMIT) of s + 1.
                            m.d.sync += [emit_row.eq(0), out_emitting.eq(0)]
                        with m.Else():
                            m.d.sync += emit_row.eq(emit_row + 1)
                    with m.Else():
                        m.d.sync += emit_col.eq(emit_col + 1)
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
        out_col = Signal.like(config.out_width)           # ox: out_col_begin .. in the band's first row
        channel = Signal.like(config.n_out)              # output channel o (MAC only)
        kernel_y = Signal.like(config.kernel_h)
        kernel_x = Signal.like(config.kernel_w)
        word = Signal.like(config.words_per_pixel)       # cw
        issue_done = Signal()
        drain = Signal(range(COMPUTE_DRAIN_CYCLES))
        # COMPUTE has issues left (it issues now unless the next is a word's first and the ring is full).
        issuing = in_compute & ~issue_done

        last_word = word == config.words_per_pixel - 1
        last_kernel_x = kernel_x == config.kernel_w - 1
        last_kernel_y = kernel_y == config.kernel_h - 1
        last_channel = channel == n_out - 1
        last_out_row = out_row == config.out_rows - 1
        # Section 4.1's pixel band: the last row ends after column E' - 1, every other after out_width - 1.
        last_out_col = out_col == Mux(last_out_row, band_end, config.out_width) - 1
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

        # Result words (section 4, result ring): MAC fills a word with L channels (o mod L = 0 .. L - 1, or
        # up to the last channel), the per-word ops issue a whole word per window. This issue is the first
        # (last) of its result word.
        channel_lane = channel[:lane_bits_log2] if lane_bits_log2 else Const(0, 1)
        word_first = Signal()
        word_last = Signal()
        m.d.comb += [
            word_first.eq(first_of_output & (per_word | (channel_lane == 0))),
            word_last.eq(last_of_output & (per_word | (channel_lane == lanes - 1) | last_channel)),
        ]
        # A word's first issue waits for a free ring slot (occupancy < R); COMPUTE never waits inside a
        # word. While it waits the counters hold and the issues in flight move on through stages 1 and 2.
        # An inference's first issue (in the compute_start cycle) has its slot already: compute_start
        # requires ring_free.
        issue = Signal()
        m.d.comb += issue.eq(issuing & (~word_first | ring_free))
        # Ring slot of the word being issued: j mod R for result word j, counted across inferences.
        write_slot = Signal(range(ring_words))
        weight_address = Signal(sram_address_bits)
        with m.If(issuing):
            with m.If(issue):
                count(word, step_word, last_word)
                count(kernel_x, step_kernel_x, last_kernel_x)
                count(kernel_y, step_kernel_y, last_kernel_y)
                count(channel, step_channel, last_channel)
                # A row after the first starts at column 0; the next inference's first row at out_col_begin.
                with m.If(pixel_done):
                    m.d.sync += out_col.eq(Mux(last_out_col, Mux(last_out_row, config.out_col_begin, 0), out_col + 1))
                count(out_row, pixel_done & last_out_col, last_out_row)
                # A pixel reads its weights in issue order (MAC: w_base .. w_base + N_o*K_w - 1; LANE:
                # w_base .. w_base + CW*KH*KW - 1), then starts over. MAX, ADD and CONCAT ignore the word read.
                m.d.sync += weight_address.eq(Mux(pixel_done, config.w_base, weight_address + 1))
                with m.If(word_last):
                    m.d.sync += write_slot.eq(Mux(write_slot == ring_words - 1, 0, write_slot + 1))
                with m.If(pixel_done & last_out_col & last_out_row):
                    m.d.sync += issue_done.eq(1)
        with m.Elif(in_compute):
            m.d.sync += drain.eq(drain + 1)
            with m.If(drain == COMPUTE_DRAIN_CYCLES - 1):
                # Cycle a_last + d_last + 1, COMPUTE's last: its last result word is written now and
                # readable (the ring's read port is combinational) from the next cycle, when the next
                # COMPUTE may begin too.
                m.d.sync += [computing.eq(0), compute_bank.eq(~compute_bank), drain.eq(0), issue_done.eq(0)]
        with m.If(~in_compute):
            m.d.sync += [word.eq(0), kernel_x.eq(0), kernel_y.eq(0), channel.eq(0), out_col.eq(config.out_col_begin),
                         out_row.eq(0), issue_done.eq(0), drain.eq(0), weight_address.eq(config.w_base)]

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
        stage1_word_last = Signal()
        stage1_result_address = Signal.like(write_slot)
        stage1_result_lane = Signal(max(lane_bits_log2, 1))
        m.d.sync += [
            stage1_valid.eq(issue),
            stage1_first.eq(first_of_output),
            stage1_last.eq(last_of_output),
            stage1_word_last.eq(word_last),
            stage1_padded.eq(~in_bounds),
            stage1_operand_b.eq(operand_b),
            stage1_result_address.eq(write_slot),
            stage1_result_lane.eq(channel_lane),
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
        stage2_word_last = Signal()
        stage2_result_address = Signal.like(stage1_result_address)
        stage2_result_lane = Signal.like(stage1_result_lane)
        m.d.sync += [
            stage2_valid.eq(stage1_valid & stage1_last),
            stage2_word_last.eq(stage1_word_last),
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
        result_writes = stage2_valid & in_compute
        with m.If(result_writes):
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

        # --- the ring's counts: occupancy (first issues minus EMITs) and readiness (words written minus
        # EMITs). A word is complete with the write of its last lane (MAC) or its only write (the per-word
        # ops), in cycle a_j + d_j + 1; it counts from the next cycle, the first it may be emitted in.
        word_issued = Signal()
        word_written = Signal()
        m.d.comb += [word_issued.eq(issue & word_first), word_written.eq(result_writes & stage2_word_last)]
        m.d.sync += [
            occupancy.eq(occupancy + word_issued - emit_transfer),
            written_words.eq(written_words + word_written - emit_transfer),
        ]

        #: Internal signals a simulation testbench may watch (not ports): COMPUTE begins in this cycle
        #: (``c_s``, the first issue of an inference), a result word's first issue happens in this cycle
        #: (``a_j``), and the bank COMPUTE reads or will read next.
        self.probes = {"compute_start": compute_start, "word_start": word_issued, "compute_bank": compute_bank}

        # --- run = 0: every side held at the start of inference 0 -------------------------------------
        with m.If(~running):
            m.d.sync += [stage1_valid.eq(0), stage2_valid.eq(0), in_index.eq(0), in_bank.eq(0), computing.eq(0),
                         compute_bank.eq(0), stored.eq(0), out_index.eq(0), out_emitting.eq(0),
                         pixel_popped.eq(0), pixel_word.eq(0), emit_col.eq(0), emit_row.eq(0), read_slot.eq(0),
                         write_slot.eq(0), occupancy.eq(0), written_words.eq(0)]
        return m
