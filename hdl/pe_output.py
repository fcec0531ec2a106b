"""The PE's output side: pops of the forward queue and EMITs of result words (docs/architecture.md
sections 4 and 4.4)."""
from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, unsigned
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import exact_log2

from flowtile.arch import OP_ADD, OP_BCAST, OP_CONCAT, OP_LANE, OP_MAX, Arch

from .layouts import check_arch, config_layout, flit_signature
from .pe_input import first_window_bottom, last_input_row, window_bottom_signal
from .pe_loader import band_end

__all__ = ["OutputSide", "op_decode", "channel_group"]


def op_decode(config):
    """The op's decode: ``(is_max, is_add, is_concat, two_operands, lane_wise, per_word)`` (section 4.1)."""
    is_max = config.op == OP_MAX
    is_add = config.op == OP_ADD
    is_concat = config.op == OP_CONCAT
    # ADD and CONCAT read two operand maps and multiply by an operand multiplier instead of a weight.
    two_operands = is_add | is_concat
    # LANE, ADD, CONCAT and BCAST accumulate and requantize each lane on its own, with parameter row cw*L + l.
    lane_wise = (config.op == OP_LANE) | two_operands | (config.op == OP_BCAST)
    # MAX, LANE, ADD, CONCAT and BCAST produce one whole result word per (pixel, cw).
    return is_max, is_add, is_concat, two_operands, lane_wise, is_max | lane_wise


def channel_group(config):
    """``(first word, N_g)`` of the channel group a tile computes (section 4.4): for MAX, LANE and ADD channel words
    ``[group_word_begin, group_word_begin + N_g)`` of each pixel, ``N_g = group_words`` or all ``words_per_pixel``
    if it is 0; for BCAST ``(0, group_words)`` (section 4.5: its output words; it reads every input word); for MAC
    and CONCAT, which do not read the two group registers, ``(0, words_per_pixel)``. ``N_g`` is
    the bound of COMPUTE's word loop ``cw`` (MAC: the input words of a pixel; the per-word ops: the result words of
    a pixel, ``W_px``)."""
    grouped = (config.op == OP_MAX) | (config.op == OP_LANE) | (config.op == OP_ADD) | (config.op == OP_BCAST)
    first_word = Mux(grouped, config.group_word_begin, 0)
    words = Mux(grouped & (config.group_words != 0), config.group_words, config.words_per_pixel)
    return first_word, words


class OutputSide(wiring.Component):
    """Output side of a PE (docs/architecture.md section 4, bullet "Output side"; the per-pixel order of
    output-channel groups, section 4.4).

    Per inference: ``Q = (forward_end - forward_begin) + P`` pops (the head of ``i_queue`` leaves on
    ``o_flit``) and ``E = n_pix * W_px`` EMITs (the head of ``i_results``), at most one transfer a cycle,
    in this order (``R_p = pass_per_pixel``): ``Q - n_pix * R_p`` pops, then for each output pixel ``q``
    of the band (section 4.1), ``R_p`` pops and the ``W_px`` EMITs of result words ``q*W_px ..``
    (``R_p = 0``: all pops, then all EMITs). Rows interleaved (``interleave_rows = 1`` and ``forward_end >
    forward_begin``, section 4 "Streaming rows"; the ``Q - n_pix * R_p`` pops are then the map's ``in_height`` rows):
    before the pixels of output row ``r`` the side pops the forwarded rows up to the last one ``r`` reads, ``last(r)``,
    so that each forwarded row is followed by the pixels of the output rows it completes. ``W_px`` is ``ceil(n_out / L)`` for MAC and the ``N_g``
    words COMPUTE issues a pixel for the other ops (:func:`channel_group`: ``group_words``, or
    ``words_per_pixel`` if it is 0, for MAX, LANE and ADD; ``words_per_pixel`` for CONCAT), which is
    ``ceil(n_out / L)`` too in every config encode_config accepts (``n_out = N_g * L``). A tile that does
    not compute (``computes = 0``), or whose ``n_pix * R_p`` exceeds ``n_pass``, has ``R_p = 0`` and (if
    not computing) no EMITs.

    ``o_flit.valid`` is the chosen source's ``valid`` (and ``run``), never ``o_flit.ready``; the chosen
    source's ``ready`` is ``run & o_flit.ready``, the other's 0. Every flit carries the configured
    destination. ``run = 0`` returns the side to the first transfer of an inference (and to context 0).

    With ``C = arch.tile_contexts > 1`` (section 4.6) the side serves the contexts in turn, ``0 .. C' - 1`` per
    inference: ``context`` (a register) is the context whose ``Q + E`` transfers it makes, and ``config``,
    ``computes`` and ``i_queue`` must be that context's (the PE selects them by ``context``, and routes ``o_flit``
    into the loop-back FIFO while the context's ``loop_back`` is 1, to the router otherwise). A turn ends with the
    context's last transfer (the last EMIT of a computing context; the last pop of one that does not compute); the
    next cycle is in context ``context + 1``, or 0 after the tile's last context (``loop_back = 0``, or ``context =
    C - 1``). ``next_context`` is the context of the next cycle (``context``, or the next one in the cycle of a
    turn's last transfer: it depends on ``o_flit.ready``): the PE reads that context's forward-queue head one cycle
    ahead.

    Parameters
    ----------
    arch : :class:`flowtile.arch.Arch`

    Members
    -------
    config : ``In(config_layout())``
    computes : ``In(1)``
    run : ``In(1)``
    i_queue : ``In(stream.Signature(unsigned(arch.flit_data_bits)))``
        The forward queue's read side.
    i_results : ``In(stream.Signature(unsigned(arch.flit_data_bits)))``
        The result ring's words.
    o_flit : ``Out(flit_signature(arch))``
    context : ``Out(range(C))``
        Only with ``C > 1``: the context served.
    next_context : ``Out(range(C))``
        Only with ``C > 1``: the context served in the next cycle.
    """

    def __init__(self, arch: Arch):
        check_arch(arch, "OutputSide")
        self.arch = arch
        word = unsigned(arch.flit_data_bits)
        members = {
            "config": In(config_layout()),
            "computes": In(1),
            "run": In(1),
            "i_queue": In(stream.Signature(word)),
            "i_results": In(stream.Signature(word)),
            "o_flit": Out(flit_signature(arch)),
        }
        if arch.tile_contexts > 1:
            members.update({"context": Out(range(arch.tile_contexts)), "next_context": Out(range(arch.tile_contexts))})
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        config, computes, o_flit = self.config, self.computes, self.o_flit
        per_word = op_decode(config)[-1]
        n_out = Mux(computes, config.n_out, 0)
        n_result_words = (n_out + (self.arch.lanes - 1)) >> exact_log2(self.arch.lanes)
        _, group_words = channel_group(config)
        pixel_result_words = Signal(max(len(group_words), len(n_result_words)))   # W_px
        forwarded = Mux(config.forward_end > config.forward_begin, config.forward_end - config.forward_begin, 0)
        popped_words = Signal(len(config.n_in_words) + 1)       # Q
        end = Signal.like(config.out_width)                     # E'
        # n_pix (section 4.1) and n_pix * pass_per_pixel are products of registers that only change while
        # run = 0.
        n_pix = Signal(len(config.out_rows) + len(config.out_width))
        interleaved_pops = Signal(len(n_pix) + len(config.pass_per_pixel))
        m.d.comb += [
            # The per-word ops: the N_g words COMPUTE issues a pixel (n_out = N_g * L makes it ceil(n_out / L)).
            pixel_result_words.eq(Mux(per_word, group_words, n_result_words)),
            popped_words.eq(forwarded + config.n_pass),
            end.eq(band_end(config)),
            n_pix.eq(config.out_rows * config.out_width - config.out_col_begin - (config.out_width - end)),
            interleaved_pops.eq(n_pix * config.pass_per_pixel),
        ]
        interleaves = computes & (config.pass_per_pixel != 0) & (interleaved_pops <= config.n_pass)
        pixel_pops = Mux(interleaves, config.pass_per_pixel, 0)
        bulk_pops = Signal.like(popped_words)          # Q_f + P_bulk
        m.d.comb += bulk_pops.eq(popped_words - Mux(interleaves, interleaved_pops, 0))

        out_index = Signal.like(popped_words)          # pop of the bulk
        out_emitting = Signal()                        # past this inference's bulk pops: in its pixels
        pixel_popped = Signal()                        # the current pixel's pops are done
        pixel_word = Signal(max(len(config.pass_per_pixel), len(pixel_result_words)))   # pop or EMIT in the pixel
        # Output pixel of the EMITs: its row of the band and its index within that row's pixels (columns
        # out_col_begin .. in the first row, 0 .. E' - 1 in the last). Both count from 0.
        emit_col = Signal.like(config.out_width)
        emit_row = Signal.like(config.out_rows)
        emit_last_row = emit_row == config.out_rows - 1
        emit_row_pixels = Mux(emit_last_row, end, config.out_width) - Mux(emit_row == 0, config.out_col_begin, 0)

        # Rows interleaved: the forwarded rows popped so far (a row: in_width pixels of words_per_pixel words), and
        # the bottom window row of the output row whose pixels come next; its pixels wait for the rows it reads.
        row_pops = computes & (config.interleave_rows != 0) & (config.forward_end > config.forward_begin)
        rows_out = Signal.like(config.in_height)
        row_pixel = Signal.like(config.in_width)
        row_word = Signal.like(config.words_per_pixel)
        emit_bottom = window_bottom_signal()
        row_due = row_pops & (rows_out <= last_input_row(config, emit_bottom))
        in_pixels = computes & (out_emitting | (bulk_pops == 0) | row_pops) & ~row_due
        emit_phase = in_pixels & (pixel_popped | (pixel_pops == 0))
        pop_phase = Mux(in_pixels, ~emit_phase, (bulk_pops != 0) | row_due)
        m.d.comb += [
            o_flit.valid.eq(self.run & Mux(emit_phase, self.i_results.valid, pop_phase & self.i_queue.valid)),
            o_flit.payload.data.eq(Mux(emit_phase, self.i_results.payload, self.i_queue.payload)),
            o_flit.payload.dest_row.eq(config.dest_row),
            o_flit.payload.dest_col.eq(config.dest_col),
            o_flit.payload.dest_host.eq(config.dest_host),
            self.i_queue.ready.eq(self.run & pop_phase & o_flit.ready),
            self.i_results.ready.eq(self.run & emit_phase & o_flit.ready),
        ]
        # The last transfer of an inference (of the context's turn, section 4.6): its last EMIT, or the last bulk
        # pop of a tile that does not compute.
        contexts = self.arch.tile_contexts
        turn_done = Signal()
        ends_turn = [] if contexts == 1 else [turn_done.eq(1)]
        with m.If(o_flit.valid & o_flit.ready):
            with m.If(emit_phase):
                with m.If(pixel_word == pixel_result_words - 1):
                    m.d.sync += [pixel_word.eq(0), pixel_popped.eq(0)]
                    with m.If(emit_col == emit_row_pixels - 1):
                        m.d.sync += emit_col.eq(0)
                        with m.If(emit_last_row):
                            # The inference's last EMIT: the next transfer is a pop (or EMIT) of s + 1.
                            m.d.sync += [emit_row.eq(0), out_emitting.eq(0), rows_out.eq(0),
                                         emit_bottom.eq(first_window_bottom(config))]
                            m.d.comb += ends_turn
                        with m.Else():
                            m.d.sync += [emit_row.eq(emit_row + 1), emit_bottom.eq(emit_bottom + config.stride)]
                    with m.Else():
                        m.d.sync += emit_col.eq(emit_col + 1)
                with m.Else():
                    m.d.sync += pixel_word.eq(pixel_word + 1)
            with m.Elif(in_pixels):
                with m.If(pixel_word == pixel_pops - 1):
                    m.d.sync += [pixel_word.eq(0), pixel_popped.eq(1)]
                with m.Else():
                    m.d.sync += pixel_word.eq(pixel_word + 1)
            with m.Elif(row_due):
                with m.If(row_word == config.words_per_pixel - 1):
                    m.d.sync += row_word.eq(0)
                    with m.If(row_pixel == config.in_width - 1):
                        m.d.sync += [row_pixel.eq(0), rows_out.eq(rows_out + 1)]
                    with m.Else():
                        m.d.sync += row_pixel.eq(row_pixel + 1)
                with m.Else():
                    m.d.sync += row_word.eq(row_word + 1)
            with m.Else():
                with m.If(out_index == bulk_pops - 1):
                    m.d.sync += [out_index.eq(0), out_emitting.eq(computes)]
                    if ends_turn:
                        with m.If(~computes):
                            m.d.comb += ends_turn
                with m.Else():
                    m.d.sync += out_index.eq(out_index + 1)
        if contexts > 1:
            context = self.context
            last_context = ~config.loop_back | (context == contexts - 1)
            m.d.comb += self.next_context.eq(Mux(turn_done, Mux(last_context, 0, context + 1), context))
            m.d.sync += context.eq(self.next_context)
        with m.If(~self.run):
            m.d.sync += [out_index.eq(0), out_emitting.eq(0), pixel_popped.eq(0), pixel_word.eq(0),
                         emit_col.eq(0), emit_row.eq(0), rows_out.eq(0), row_pixel.eq(0), row_word.eq(0),
                         emit_bottom.eq(first_window_bottom(config))]
            if contexts > 1:
                m.d.sync += self.context.eq(0)
        return m
