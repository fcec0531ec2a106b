"""The processing element of one tile: SRAM (weights, two activation banks and the forward queue's region),
parameter table, result ring, forward queue and its three concurrent sides, input, compute and output
(docs/architecture.md section 4; windowed layers, convolution, max pooling and lane-wise multiply-accumulate (depthwise
convolution, average pools), section 4.1; store and forward ranges of a stream that carries several
tensors, and the elementwise residual join op ADD, section 4.2; the channel concatenation op CONCAT,
section 4.3; the per-pixel interleaved output order of output-channel groups (register pass_per_pixel) and
the channel groups of MAX, LANE and ADD (registers group_word_begin, group_words), section 4.4; timing,
section 6 rule 4)."""
from __future__ import annotations

from amaranth.hdl import Module, Mux, ResetInserter, Signal, unsigned
from amaranth.lib import wiring
from amaranth.lib.fifo import SyncFIFO
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from flowtile.arch import Arch

from .layouts import check_arch, check_tile_index, flit_signature, load_signature
from .pe_compute import ComputeSequencer
from .pe_input import InputSide
from .pe_loader import PELoader
from .pe_output import OutputSide
from .pe_params import ParamTable
from .pe_pipeline import ComputePipeline
from .pe_queue import ForwardQueue
from .pe_ring import ResultRing

__all__ = ["PE"]


def _select(m, index, values):
    """``values[index]`` (a list of same-shaped values; ``index`` within the list), as a signal driven by a
    switch."""
    selected = Signal.like(values[0])
    with m.Switch(index):
        for case, value in enumerate(values):
            with m.Case(case):
                m.d.comb += selected.eq(value)
    return selected


class PE(wiring.Component):
    """PE of the tile with load-bus index ``tile_index`` (``row * cols + col``).

    Three sides work concurrently, each a fixed sequence per inference ``s = 0, 1, ...`` (section 4;
    ``K = n_in_words``, ``P = n_pass``, ``B = B1 + (store2_end - store2_begin)`` the stored words of an inference
    with ``B1 = store_end - store_begin`` (each difference 0 if negative), ``F = queue_words`` (the register),
    ``t`` = the cycle of a transfer):

    * input side: ``K`` RECV then ``P`` PASS transfers on ``i_flit``, one a cycle at most, in order. RECV
      word ``k`` is written to SRAM word ``act_base + (s mod 2) * B + k - store_begin`` iff
      ``store_begin <= k < store_end`` (the first store range), to ``act_base + (s mod 2) * B + B1 + k -
      store2_begin`` iff ``store2_begin <= k < store2_end`` (the second, after the first: the stored words are
      the first range's then the second's, section 4.2), and pushed into the forward queue iff
      ``forward_begin <= k < forward_end``; every PASS word is pushed. A pushing transfer needs a free
      queue slot (``i_flit.ready`` depends on the queue's fill level, never on ``o_flit``). In a computing
      tile the first transfer of inference ``s >= 1`` happens at a cycle ``>= c_{s-1}`` (possibly in
      cycle ``c_{s-1}`` itself).
    * forward queue (:class:`~flowtile.hdl.pe_queue.ForwardQueue`): a FIFO of ``F`` words kept in the SRAM's
      circular region ``[queue_base, queue_base + F)`` (push ``i`` of a run in word ``queue_base + i mod F``):
      pushable iff it holds fewer than ``F`` words (also in a cycle it is popped), a word pushed in cycle ``t`` is
      poppable from ``t + 1``. A tile with ``F = 0`` pushes nothing (its input side then waits at a word it would
      push); encode_config requires ``F >= 1`` of a tile that forwards or passes words, and a region that overlaps
      neither the activation banks nor the weights.
    * result ring: ``R = arch.result_words`` words (any ``R >= 1``, not necessarily a power of two).
      Result words are numbered across inferences, ``j = s * E + (index within s)``, ``E = n_pix * W_px``;
      word ``j`` lives in slot ``j mod R`` (a write slot and a read slot register wrap at ``R``). It
      never has to hold an inference's results: nothing bounds ``E``.
    * compute side (only if ``n_out > 0``): COMPUTE of inference ``s`` reads activation bank ``s mod 2``
      (every activation address below is relative to ``act_base + (s mod 2) * B``) and issues, in section 4.1's loop
      order over the tile's output pixels (:meth:`TileConfig.output_pixel_positions`: rows ``out_row_begin
      ..`` of ``out_rows``, the first from column ``out_col_begin``, the last up to column ``E' - 1``, ``E' =
      out_col_end`` or ``out_width`` if 0), result word by result word: word ``j`` takes ``d_j`` issue cycles back
      to back (:meth:`TileConfig.result_word_issue_cycles`: MAC ``L * K_w``, or ``(N_o mod L) * K_w`` for a
      pixel's short last word; MAX, LANE ``KH * KW``; ADD 2; CONCAT 1), from its first issue cycle ``a_j``. COMPUTE
      waits only between words: ``a_j = max(a_{j-1} + d_{j-1}, t(EMIT j - R) + 1)``, and for the first word of ``s``
      also ``>= t(RECV word store_until - 1 of s) + 1`` (the last stored word: ``store_until`` is ``store2_end``
      with a second store range, else ``store_end``) with ``+ 2`` drain cycles after the previous word (``a_{j-1} +
      d_{j-1} + 2``); the EMIT term (absent for ``j < R``) is implemented as "occupancy < R", occupancy = words
      whose first issue has happened minus words emitted, both registered. ``c_s`` = ``a_j`` of the first word of
      ``s``; COMPUTE occupies ``[c_s, a_last + d_last + 2)`` (``I + 2`` cycles, ``I`` =
      :attr:`TileConfig.compute_issue_cycles`, when it never waits for a slot). While the issue waits, issues
      in flight move on through the pipeline. Word ``j`` is written (its last lane, for MAC) in cycle ``a_j + d_j +
      1``.
    * output side: ``Q = (forward_end - forward_begin) + P`` pops (the queue's head word leaves on
      ``o_flit``) and ``E`` = :meth:`TileConfig.result_words` EMIT transfers (EMIT ``j`` sends result
      word ``j``), one a cycle at most, in this order (section 4.4, ``n_pix`` =
      :attr:`TileConfig.output_pixels` = ``out_rows * out_width - out_col_begin - (out_width - E')``,
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

    Channel groups (section 4.4): MAX, LANE and ADD compute the ``N_g`` channel words ``[group_word_begin,
    group_word_begin + N_g)`` of each pixel (``N_g = group_words``, or ``words_per_pixel`` if it is 0; ``n_out =
    N_g * L``): their word loop runs ``cw = 0 .. N_g - 1``, issue ``(pixel, cw, ky, kx)`` reads channel word
    ``group_word_begin + cw`` of its pixel (``p*CW + group_word_begin + cw`` of the map, of each operand for ADD),
    LANE weight word ``w_base + cw*KH*KW + ky*KW + kx`` and parameter rows ``cw*L + l`` (both group-local), and
    writes result word ``q*N_g + cw``; ``W_px = N_g``. MAC and CONCAT do not read the two registers.

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
    LANE; ``concat_words_a`` of ADD; ``group_word_begin`` and ``group_words`` of MAC and CONCAT) do not affect it.

    The parameter table is banked by lane (row ``r`` in bank ``r % L`` at address ``r // L``) so that
    LANE, ADD and CONCAT read the ``L`` rows ``cw*L + l`` of one word in one cycle; MAC reads row ``o``
    from bank ``o % L``. The load bus still addresses rows, the banking is internal. Register ``param_base``
    (section 4.6) moves every row a context reads: its row ``r`` is table row ``param_base + r``; the ``L`` rows of
    a lane-wise word then start in any bank (the table reads banks below the first row's one address further, the
    pipeline rotates them into lanes).

    Contexts (docs/architecture.md section 4.6; ``C = arch.tile_contexts``, ``C = 1`` being everything above). The
    PE holds ``C`` register files (the load bus's ``context`` field picks the one a config write sets) and runs
    contexts ``0 .. C' - 1`` per inference, the tile's last being the first with ``loop_back = 0``. Each side
    serves them in turn with the registers of the context it serves (a ``context`` register per side): the input
    side context 0's ``K + P`` transfers (from the router), then context 1's (from the loop-back FIFO), ...; COMPUTE
    context 0's result words, then context 1's, ... (each a COMPUTE of section 4 with its drain, the pipeline
    working with the sequencer's context's registers); the output side context 0's ``Q + E`` transfers (into the
    loop-back FIFO while ``loop_back = 1``), then context 1's, ..., the last context's to the router. A side's turn
    ends with its context's last transfer (COMPUTE: its last drain cycle) and the next context's first transfer may
    come in the next cycle. Context ``c``'s transfers store into its own banks (``act_base``, bank ``s mod 2``) and
    push into and pop from its own forward queue (a :class:`~flowtile.hdl.pe_queue.ForwardQueue` a context,
    submodules ``forward_queue.context0`` ...): the queues share the SRAM's queue write port (the input side's context
    pushes) and its queue read port, which reads the next head of the queue the output side serves in the next
    cycle (``OutputSide.next_context``), so that a turn's first pop finds its head word on the read data. The
    hand-over holds per context: the first input transfer of ``(c, s)``, ``s >= 1``, at ``>= c_{c,s-1}``; COMPUTE
    of the ``n``-th turn begins after the input side's ``n``-th ``store_done`` (a count: it may be up to ``C'``
    turns ahead). The loop-back FIFO (submodule ``loop_back``, an :class:`~amaranth.lib.fifo.SyncFIFO` of
    ``router_fifo_depth`` words of flit data: section 6 rule 1) is emptied while ``run = 0``. The result ring, the
    pipeline, the SRAM and the parameter table are shared; the ring numbers words in compute order over contexts.

    The PE is a composition (each part's docstring states its share of this contract):
    :class:`~flowtile.hdl.pe_loader.PELoader` (config registers, load decode),
    :class:`~flowtile.hdl.pe_params.ParamTable`, :class:`~flowtile.hdl.pe_ring.ResultRing`, the SRAM (a
    :class:`~amaranth.lib.memory.Memory`, submodule ``sram``, with two write ports and three read ports: write port
    0 the loader's while ``run = 0`` and the input side's while ``run = 1``, write port 1 the forward queue's; the
    pipeline's two read ports (weights, activations) and the queue's, transparent for the queue's write port), the
    forward queue (:class:`~flowtile.hdl.pe_queue.ForwardQueue`, submodule ``forward_queue``: its control, the words
    being in the SRAM), :class:`~flowtile.hdl.pe_input.InputSide`, :class:`~flowtile.hdl.pe_compute.ComputeSequencer`
    and :class:`~flowtile.hdl.pe_pipeline.ComputePipeline` (the compute side) and
    :class:`~flowtile.hdl.pe_output.OutputSide`; with several contexts also the loop-back FIFO.

    Parameters
    ----------
    arch : :class:`flowtile.arch.Arch`
    tile_index : int
        ``row * cols + col``, in ``0 .. arch.n_tiles - 1``.

    Members
    -------
    i_flit : ``In(flit_signature(arch))``
        Flits from the router's L output.
    o_flit : ``Out(flit_signature(arch))``
        Flits into the router's L input.
    load : ``In(load_signature(arch))``
        The load bus; this PE takes the writes whose ``tile`` equals ``tile_index``, and only while
        ``run = 0`` (a config write into the register file of context ``context``, a field only when ``C > 1``).
    run : ``In(1)``
        While 0 every side is held at the start of inference 0 (input and compute bank 0, context 0, every counter
        and flag and the compute pipeline cleared, the forward queues and the loop-back FIFO emptied) and no
        flit is transferred; config, SRAM and parameters keep what was loaded.
    """

    def __init__(self, arch: Arch, tile_index: int):
        check_arch(arch, "PE")
        check_tile_index(arch, tile_index, "PE")
        self.arch, self.tile_index = arch, tile_index
        super().__init__({
            "i_flit": In(flit_signature(arch)),
            "o_flit": Out(flit_signature(arch)),
            "load": In(load_signature(arch)),
            "run": In(1),
        })

    def elaborate(self, platform):
        m = Module()
        arch, run = self.arch, self.run
        contexts = arch.tile_contexts
        m.submodules.loader = loader = PELoader(arch, self.tile_index)
        m.submodules.sram = sram = Memory(shape=unsigned(arch.flit_data_bits), depth=arch.sram_words, init=[])
        m.submodules.params = params = ParamTable(arch.max_tile_outputs, arch.lanes)
        m.submodules.result_ring = ring = ResultRing(arch.result_words, arch.lanes)
        # The forward queue: F = queue_words words of the SRAM (section 4), emptied while run = 0 (whatever an
        # interrupted run left in it). Section 4.6: one a context, each with its own region and state.
        queues = [ForwardQueue(arch) for _ in range(contexts)]
        if contexts == 1:
            m.submodules.forward_queue = queues[0]
        else:
            # one submodule holding the contexts' queues (forward_queue.context<c>), so that a hierarchy by
            # component (flowtile area) finds them where a single context's is
            holder = Module()
            for index, queue in enumerate(queues):
                holder.submodules[f"context{index}"] = queue
            m.submodules.forward_queue = holder
        m.submodules.input_side = input_side = InputSide(arch)
        m.submodules.sequencer = sequencer = ComputeSequencer(arch)
        m.submodules.pipeline = pipeline = ComputePipeline(arch)
        m.submodules.output_side = output_side = OutputSide(arch)

        wiring.connect(m, wiring.flipped(self.load), loader.load)
        if contexts == 1:
            for side in (input_side, sequencer, pipeline, output_side, queues[0]):
                m.d.comb += side.config.eq(loader.config[0])
            for side in (input_side, sequencer, output_side):
                m.d.comb += [side.run.eq(run), side.computes.eq(loader.computes[0])]
        else:
            # Section 4.6: each side works with the registers of the context it serves; the pipeline with the
            # sequencer's (the drain keeps two contexts' words apart); each queue with its own context's.
            for side, context in ((input_side, input_side.context), (sequencer, sequencer.context),
                                  (output_side, output_side.context)):
                m.d.comb += [side.config.eq(loader.config[context]), side.run.eq(run),
                             side.computes.eq(loader.computes.bit_select(context, 1))]
            m.d.comb += pipeline.config.eq(loader.config[sequencer.context])
            for index, queue in enumerate(queues):
                m.d.comb += queue.config.eq(loader.config[index])
        m.d.comb += [loader.run.eq(run), pipeline.clear.eq(~run), ring.clear.eq(~run)]
        for queue in queues:
            m.d.comb += queue.run.eq(run)

        # The SRAM's write port 0: the loader's while run = 0, the input side's while run = 1. Write port 1: the
        # forward queues' (they write only while run = 1, into their regions, which no other write reaches).
        sram_write = sram.write_port()
        for member in ("addr", "data", "en"):
            m.d.comb += getattr(sram_write, member).eq(
                Mux(run, getattr(input_side.sram_write, member), getattr(loader.sram_write, member)))
        queue_write = sram.write_port()
        wiring.connect(m, pipeline.weight_read, sram.read_port())
        wiring.connect(m, pipeline.activation_read, sram.read_port())
        # The queue reads its next head word a cycle ahead; a word it writes in the same cycle is read through.
        queue_read = sram.read_port(transparent_for=(queue_write,))
        wiring.connect(m, loader.param_write, params.write)
        wiring.connect(m, pipeline.param_read, params.read)
        m.d.comb += params.read_skew.eq(pipeline.param_skew)

        # Input side -> forward queue -> output side; sequencer -> pipeline -> result ring -> output side.
        if contexts == 1:
            wiring.connect(m, queues[0].sram_write, queue_write)
            wiring.connect(m, queues[0].sram_read, queue_read)
            wiring.connect(m, wiring.flipped(self.i_flit), input_side.i_flit)
            wiring.connect(m, input_side.o_forward, queues[0].w_stream)
            wiring.connect(m, queues[0].r_stream, output_side.i_queue)
            m.d.comb += [
                input_side.compute_bank.eq(sequencer.compute_bank),
                input_side.compute_begun.eq(sequencer.compute_begun),
            ]
        else:
            self._connect_contexts(m, queues, queue_write, queue_read, input_side, sequencer, output_side)
        m.d.comb += [
            sequencer.store_done.eq(input_side.store_done),
            sequencer.row_done.eq(input_side.row_done),
            input_side.release_rows.eq(sequencer.release_rows),
            sequencer.ring_free.eq(ring.free),
            ring.word_issued.eq(sequencer.word_issued),
            pipeline.enable.eq(sequencer.in_compute),
            ring.word_written.eq(pipeline.word_written),
        ]
        wiring.connect(m, sequencer.issue, pipeline.issue)
        wiring.connect(m, pipeline.result_write, ring.write)
        wiring.connect(m, ring.words, output_side.i_results)
        if contexts == 1:
            wiring.connect(m, output_side.o_flit, wiring.flipped(self.o_flit))

        #: Internal signals a simulation testbench may watch (not ports): COMPUTE begins in this cycle
        #: (``c_s``, the first issue of an inference), a result word's first issue happens in this cycle
        #: (``a_j``), and the bank COMPUTE reads or will read next; with contexts (section 4.6) also the context
        #: each side serves (``input_context``, ``compute_context``, ``output_context``) and the loop-back FIFO's
        #: writes and reads in this cycle (``loop_write``, ``loop_read``).
        self.probes = {"compute_start": sequencer.compute_start, "word_start": sequencer.word_issued,
                       "compute_bank": sequencer.compute_bank}
        if contexts > 1:
            self.probes.update({"input_context": input_side.context, "compute_context": sequencer.context,
                                "output_context": output_side.context, "loop_write": self._loop_write,
                                "loop_read": self._loop_read})
        return m

    def _connect_contexts(self, m, queues, queue_write, queue_read, input_side, sequencer, output_side):
        """Section 4.6's wiring of ``C > 1`` contexts: the loop-back FIFO, the sides' sources and sinks by context,
        the forward queues sharing the SRAM's queue write port (the input side's context pushes) and its read port
        (the head of the output side's next-cycle context is read one cycle ahead), the per-context hand-over."""
        arch, run = self.arch, self.run
        in_context, out_context = input_side.context, output_side.context
        out_loops_back = output_side.config.loop_back
        # The loop-back FIFO: D = router_fifo_depth words of flit data (section 6 rule 1, as a router FIFO), from
        # the output side of a context with loop_back = 1 to the input side of the next context; emptied while
        # run = 0.
        loop_back = SyncFIFO(width=arch.flit_data_bits, depth=arch.router_fifo_depth)
        m.submodules.loop_back = ResetInserter(~run)(loop_back)
        self._loop_write, self._loop_read = Signal(), Signal()      # probes: a word enters / leaves the FIFO
        m.d.comb += [self._loop_write.eq(loop_back.w_en & loop_back.w_rdy),
                     self._loop_read.eq(loop_back.r_en & loop_back.r_rdy)]

        # Input side: context 0 reads the router, the later contexts the loop-back FIFO.
        from_router = in_context == 0
        m.d.comb += [
            input_side.i_flit.valid.eq(Mux(from_router, self.i_flit.valid, loop_back.r_rdy)),
            input_side.i_flit.payload.data.eq(Mux(from_router, self.i_flit.payload.data, loop_back.r_data)),
            input_side.i_flit.payload.dest_row.eq(self.i_flit.payload.dest_row),
            input_side.i_flit.payload.dest_col.eq(self.i_flit.payload.dest_col),
            input_side.i_flit.payload.dest_host.eq(self.i_flit.payload.dest_host),
            self.i_flit.ready.eq(input_side.i_flit.ready & from_router),
            loop_back.r_en.eq(input_side.i_flit.ready & ~from_router),
        ]
        # Output side: a context with loop_back = 1 emits into the loop-back FIFO, the tile's last to the router.
        out_flit = output_side.o_flit
        m.d.comb += [
            self.o_flit.valid.eq(out_flit.valid & ~out_loops_back),
            self.o_flit.payload.eq(out_flit.payload),
            loop_back.w_en.eq(out_flit.valid & out_loops_back),
            loop_back.w_data.eq(out_flit.payload.data),
            out_flit.ready.eq(Mux(out_loops_back, loop_back.w_rdy, self.o_flit.ready)),
        ]

        # The forward queues: pushes go to the input side's context, pops come from the output side's.
        forward = input_side.o_forward
        m.d.comb += [
            forward.ready.eq(_select(m, in_context, [queue.w_stream.ready for queue in queues])),
            output_side.i_queue.valid.eq(_select(m, out_context, [queue.r_stream.valid for queue in queues])),
            output_side.i_queue.payload.eq(queue_read.data),
        ]
        for index, queue in enumerate(queues):
            m.d.comb += [
                queue.w_stream.valid.eq(forward.valid & (in_context == index)),
                queue.w_stream.payload.eq(forward.payload),
                queue.r_stream.ready.eq(output_side.i_queue.ready & (out_context == index)),
                queue.sram_read.data.eq(queue_read.data),
            ]
        # Only the input side's context pushes (one push a cycle): its queue drives the queue write port.
        for member in ("addr", "data", "en"):
            m.d.comb += getattr(queue_write, member).eq(
                _select(m, in_context, [getattr(queue.sram_write, member) for queue in queues]))
        # One read port for every queue: it reads the head (after this cycle's pop) of the queue the output side
        # serves next cycle, whose payload it is then (a queue's read address is its own next head).
        m.d.comb += [queue_read.addr.eq(_select(m, output_side.next_context,
                                                [queue.sram_read.addr for queue in queues])),
                     queue_read.en.eq(1)]

        # The bank hand-over, per context (section 4.6): the input side counts its turns against COMPUTE's starts.
        m.d.comb += [input_side.bank_free.eq(sequencer.bank_free),
                     input_side.compute_context.eq(sequencer.context)]
