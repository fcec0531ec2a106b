"""The PE's input side: RECV and PASS transfers (docs/architecture.md sections 4 and 4.2)."""
from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, signed, unsigned
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from flowtile.arch import Arch

from .layouts import check_arch, config_layout, flit_signature
from .pe_loader import sram_write_signature

__all__ = ["InputSide", "first_range_words", "bank_words", "first_window_bottom", "last_input_row"]


def first_range_words(config):
    """``B1 = store_end - store_begin`` (0 if negative): the first store range's words (section 4.2)."""
    return Mux(config.store_end > config.store_begin, config.store_end - config.store_begin, 0)


def bank_words(config):
    """``B = B1 + (store2_end - store2_begin)`` (each term 0 if negative): the stored words of an inference,
    both store ranges (section 4.2), the size of an activation bank."""
    second = Mux(config.store2_end > config.store2_begin, config.store2_end - config.store2_begin, 0)
    return first_range_words(config) + second


def first_window_bottom(config):
    """``out_row_begin * stride - pad_top + kernel_h - 1``: the bottom window row of the band's first output row
    (unclamped, signed; ``stride`` is 1..3, so no multiplier). Each later output row's is ``stride`` further down."""
    begin = config.out_row_begin
    top = Mux(config.stride == 1, begin, Mux(config.stride == 2, begin << 1, (begin << 1) + begin))
    return top - config.pad_top + config.kernel_h - 1


def window_bottom_signal():
    """A register for :func:`first_window_bottom` and its successors."""
    return Signal(signed(12))


def last_input_row(config, bottom):
    """The last input row of the map that an output row whose bottom window row is ``bottom`` reads (clamped to the
    map: :meth:`flowtile.tile_config.TileConfig.input_rows_of_output_row`)."""
    return Mux(bottom >= config.in_height, config.in_height - 1, Mux(bottom < 0, 0, bottom))


class InputSide(wiring.Component):
    """Input side of a PE (docs/architecture.md section 4, bullet "Input side"; the store and forward ranges,
    section 4.2; contexts, section 4.6).

    Per inference ``s = 0, 1, ...``: ``K = n_in_words`` RECV then ``P = n_pass`` PASS transfers on
    ``i_flit``, at most one a cycle. RECV word ``k`` is stored (``sram_write``, in the transfer's cycle) iff
    ``store_begin <= k < store_end`` (the first store range), to SRAM word ``act_base + (s mod 2) * B + k -
    store_begin``, or iff ``store2_begin <= k < store2_end`` (the second), to SRAM word ``act_base + (s mod 2) *
    B + B1 + k - store2_begin``: the stored words of an inference are the first range's then the second's, back
    to back (``B1 = store_end - store_begin``, ``B = B1 + store2_end - store2_begin``, each difference 0 if
    negative; a non-empty second range lies after the first, ``store_end <= store2_begin``). It is pushed on
    ``o_forward`` iff ``forward_begin <= k < forward_end``; every PASS word is pushed. ``store_done`` is high
    in the cycle of the transfer of RECV word ``store_until - 1`` (``store_until = store2_end`` if
    ``store2_end > store2_begin``, else ``store_end``: :attr:`TileConfig.store_until`).

    ``i_flit.ready`` is high iff ``run``, ``K + P > 0``, the transfer needs no push or
    ``o_forward.ready`` is high, and, in a computing tile (``computes``) at the first transfer of an
    inference, COMPUTE of the same context's previous inference has begun (inference ``s >= 1`` starts at a cycle
    ``>= c_{s-1}``, possibly ``c_{s-1}`` itself). ``o_forward.valid`` does not depend on ``o_forward.ready``
    (it is ``i_flit.valid`` and the other terms). ``run = 0`` returns the side to word 0 of inference 0 (bank 0,
    context 0) and blocks every transfer.

    With ``C = arch.tile_contexts = 1`` (the PE of sections 4 to 4.5) the hand-over compares parities: the
    inference's parity ``s mod 2`` must equal that of the COMPUTEs begun so far (``compute_bank ^ compute_begun``).

    One bank (register ``single_bank``, section 4): every inference's stored words go to ``act_base + k -
    store_begin`` onwards (bank 0), and the first transfer of inference ``s >= 1`` waits until COMPUTE of ``s - 1``
    has ended: it happens at a cycle ``>= e_{s-1}``, the cycle after that COMPUTE's last (drain) cycle. With ``C =
    1`` the parity of the COMPUTEs ended so far (``compute_bank``) must equal ``s mod 2``; with ``C > 1`` the
    context's flag is cleared by ``bank_free`` in that COMPUTE's last cycle.

    A line buffer (``stream_rows = R > 0``, section 4 "Streaming rows"): the stored words (the map's rows, ``in_width *
    words_per_pixel`` words each) go to a circular buffer of ``R`` rows at ``act_base``, row after row (slot ``(s *
    in_height + y) mod R``); no bank rule holds, but a row's first stored word waits for a free slot: a count that
    starts at ``R``, loses one as a row begins and gains the compute side's ``release_rows`` (from the next cycle).
    ``row_done`` is high in the cycle of a row's last stored word.

    Rows interleaved (``interleave_rows = 1`` with a line buffer and ``pass_per_pixel > 0``, section 4 "Streaming
    rows"): the ``K`` RECV words are the map's rows, all stored (and all forwarded, if ``forward_end > forward_begin``),
    and the ``P = n_pix * pass_per_pixel`` PASS transfers come in runs of ``out_width * pass_per_pixel``, one per output
    row of the band, the run of output row ``r`` as soon as the rows up to the last it reads (``last(r)``) are in and
    the runs before it are done. ``store_done`` is then not defined (the compute side does not read it with a line
    buffer).

    With ``C > 1`` (section 4.6) the side serves the contexts in turn, ``0 .. C' - 1`` per inference: ``context``
    (a register) is the context whose ``K + P`` transfers it makes; ``config`` and ``computes`` must be that
    context's (the PE selects them by ``context``; so is ``i_flit``: the router for context 0, the loop-back FIFO
    after it, and ``o_forward``: the context's forward queue). After a context's last transfer the next cycle is in
    the next context, ``context + 1``, or in context 0 of inference ``s + 1`` if the context is the tile's last
    (``loop_back = 0``, or ``context = C - 1``); only then does the bank ``s mod 2`` flip. The hand-over is per
    context: a flag per context, set by the first transfer of a computing context's turn and cleared when COMPUTE
    of that context frees its bank (``bank_free`` with ``compute_context``: as it begins); a turn's first transfer
    needs the flag clear or cleared in the same cycle, i.e. the first transfer of ``(c, s)``, ``s >= 1``, happens at
    a cycle ``>= c_{c,s-1}``.

    Parameters
    ----------
    arch : :class:`flowtile.arch.Arch`

    Members
    -------
    config : ``In(config_layout())``
        The current context's registers.
    computes : ``In(1)``
        The current context computes.
    run : ``In(1)``
    i_flit : ``In(flit_signature(arch))``
    o_forward : ``Out(stream.Signature(unsigned(arch.flit_data_bits)))``
        Into the forward queue (of the current context).
    sram_write : ``In(sram_write_signature(arch))``
        Drives the SRAM's write port (the PE hands it to the input side while ``run = 1``).
    compute_bank : ``In(1)``
        Only with ``C = 1``: the bank of the COMPUTE running or next to run.
    compute_begun : ``In(1)``
        Only with ``C = 1``: a COMPUTE is running or begins in this cycle.
    bank_free : ``In(1)``
        Only with ``C > 1``: a COMPUTE no longer needs its bank after this cycle (it begins now with two banks, it
        ends now with one) ...
    compute_context : ``In(range(C))``
        Only with ``C > 1``: ... of this context.
    context : ``Out(range(C))``
        Only with ``C > 1``: the context served.
    store_done : ``Out(1)``
    row_done : ``Out(1)``
    release_rows : ``In(range(256))``
    """

    def __init__(self, arch: Arch):
        check_arch(arch, "InputSide")
        self.arch = arch
        contexts = arch.tile_contexts
        members = {
            "config": In(config_layout()),
            "computes": In(1),
            "run": In(1),
            "i_flit": In(flit_signature(arch)),
            "o_forward": Out(stream.Signature(unsigned(arch.flit_data_bits))),
            "sram_write": In(sram_write_signature(arch)),
            "store_done": Out(1),
            "row_done": Out(1),
            "release_rows": In(range(256)),
        }
        if contexts == 1:
            members.update({"compute_bank": In(1), "compute_begun": In(1)})
        else:
            members.update({"bank_free": In(1), "compute_context": In(range(contexts)),
                            "context": Out(range(contexts))})
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        config, i_flit = self.config, self.i_flit
        n_in_words = config.n_in_words
        input_words = Signal(len(n_in_words) + 1)       # K + P
        first_words = Signal.like(config.store_end)     # B1
        stored_words = Signal(len(config.store_end) + 1)  # B
        second_range = config.store2_end > config.store2_begin
        store_until = Signal.like(config.store_end)
        m.d.comb += [
            input_words.eq(n_in_words + config.n_pass),
            first_words.eq(first_range_words(config)),
            stored_words.eq(bank_words(config)),
            store_until.eq(Mux(second_range, config.store2_end, config.store_end)),
        ]
        in_index = Signal.like(input_words)             # transfer k of the current inference
        in_bank = Signal()                              # s mod 2 of the input side's inference s
        # Rows interleaved: the rows received so far, the output row whose PASS run is next, its bottom window row,
        # and the run's position (a pixel, a word of its pass_per_pixel)
        interleaving = (config.interleave_rows != 0) & (config.pass_per_pixel != 0)
        rows_in = Signal.like(config.in_height)
        pass_row = Signal.like(config.out_rows)
        pass_bottom = window_bottom_signal()
        pass_pixel = Signal.like(config.out_width)
        pass_word = Signal.like(config.pass_per_pixel)
        passing = interleaving & (pass_row < config.out_rows) & (rows_in > last_input_row(config, pass_bottom))
        receiving = Mux(interleaving, ~passing, in_index < n_in_words)
        stores_first = (in_index >= config.store_begin) & (in_index < config.store_end)
        stores_second = (in_index >= config.store2_begin) & (in_index < config.store2_end)
        # interleaved, every RECV word is stored and forwarded or none is (TileConfig's rules)
        stores = receiving & (interleaving | stores_first | stores_second)
        forwards = Mux(interleaving, config.forward_end > config.forward_begin,
                       (in_index >= config.forward_begin) & (in_index < config.forward_end))
        pushes = ~receiving | forwards
        contexts = self.arch.tile_contexts
        if contexts == 1:
            # At in_index = 0 of inference s the COMPUTEs begun so far (this cycle's included) number s - 1 or s
            # (COMPUTE of s needs a RECV of s; inference s - 1 began at >= c_{s-2}), so comparing parities
            # decides. s = 0: both are 0.
            # One bank (single_bank): the COMPUTEs ended so far number s - 1 or s, and compute_bank is their parity,
            # so it equals s mod 2 once COMPUTE of s - 1 has ended (from the cycle after its last cycle).
            may_begin = ~self.computes | (in_index != 0) | Mux(
                config.single_bank, self.compute_bank == in_bank, (self.compute_bank ^ self.compute_begun) == in_bank)
        else:
            # Section 4.6, per context: pending[c] = the input side began a turn of context c whose COMPUTE has not
            # freed its bank (begun, with two banks); the next turn of c may begin once it has (in the cycle it
            # begins, too). With one bank (single_bank) the flag is cleared when that COMPUTE ends, and the turn
            # begins in the cycle after.
            context = self.context
            pending = Signal(contexts)
            freed_here = self.bank_free & (self.compute_context == context) & ~config.single_bank
            may_begin = ~self.computes | (in_index != 0) | ~pending.bit_select(context, 1) | freed_here
        # A line buffer (section 4 "Streaming rows"): the next stored word's place in the buffer (a row's slot follows
        # the previous one's, so no multiplier), the word within its row as a column and a word of its pixel, the
        # slot, and the free slots.
        streaming = config.stream_rows != 0
        buffer_word = Signal(len(self.sram_write.addr))
        row_column = Signal.like(config.in_width)
        pixel_word = Signal.like(config.words_per_pixel)
        slot = Signal(8)
        free_rows = Signal(range(256 + 1))
        row_begins = stores & (row_column == 0) & (pixel_word == 0)
        may_store = ~streaming | ~row_begins | (free_rows != 0)
        may_begin = Mux(streaming, 1, may_begin)
        accepting = Signal()
        m.d.comb += [
            accepting.eq(self.run & (input_words != 0) & may_begin & may_store),
            self.o_forward.valid.eq(i_flit.valid & accepting & pushes),
            self.o_forward.payload.eq(i_flit.payload.data),
            i_flit.ready.eq(accepting & (~pushes | self.o_forward.ready)),
        ]
        transfer = i_flit.valid & i_flit.ready
        inference_done = transfer & (in_index == input_words - 1)
        if contexts == 1:
            with m.If(transfer):
                with m.If(in_index == input_words - 1):
                    m.d.sync += [in_index.eq(0), in_bank.eq(~in_bank)]
                with m.Else():
                    m.d.sync += in_index.eq(in_index + 1)
        else:
            # The context's turn ends with its last transfer; the tile's last context (loop_back = 0) ends the
            # inference.
            last_context = ~config.loop_back | (context == contexts - 1)
            with m.If(transfer):
                with m.If(in_index == input_words - 1):
                    m.d.sync += [in_index.eq(0), context.eq(Mux(last_context, 0, context + 1))]
                    with m.If(last_context):
                        m.d.sync += in_bank.eq(~in_bank)
                with m.Else():
                    m.d.sync += in_index.eq(in_index + 1)
            for index in range(contexts):
                with m.If(self.bank_free & (self.compute_context == index)):
                    m.d.sync += pending[index].eq(0)
                # Set after the clear: COMPUTE of (c, s - 1) may begin in the cycle of (c, s)'s first transfer.
                with m.If(transfer & (in_index == 0) & self.computes & (context == index)):
                    m.d.sync += pending[index].eq(1)

        # Section 4.2: RECV word k is stored iff store_begin <= k < store_end (stored word k - store_begin) or
        # store2_begin <= k < store2_end (stored word B1 + k - store2_begin), into bank s mod 2. The ranges are
        # disjoint in a valid config; the first one wins otherwise.
        bank_base = config.act_base + Mux(in_bank & ~config.single_bank, stored_words, 0)
        stored_index = Mux(stores_first, in_index - config.store_begin, first_words + in_index - config.store2_begin)
        address = self.sram_write.addr
        stored_here = transfer & stores
        pixel_ends = pixel_word == config.words_per_pixel - 1
        row_ends = pixel_ends & (row_column == config.in_width - 1)
        with m.If(stored_here & streaming):
            last_slot = slot == config.stream_rows - 1
            m.d.sync += [pixel_word.eq(Mux(pixel_ends, 0, pixel_word + 1)),
                         buffer_word.eq(Mux(row_ends & last_slot, 0, buffer_word + 1))]
            with m.If(pixel_ends):
                m.d.sync += row_column.eq(Mux(row_ends, 0, row_column + 1))
            with m.If(row_ends):
                m.d.sync += slot.eq(Mux(last_slot, 0, slot + 1))
        m.d.sync += free_rows.eq(free_rows + self.release_rows - (stored_here & streaming & row_begins))
        with m.If(stored_here & streaming & row_ends):
            m.d.sync += rows_in.eq(rows_in + 1)
        with m.If(transfer & passing):
            pixel_passed = pass_word == config.pass_per_pixel - 1
            m.d.sync += pass_word.eq(Mux(pixel_passed, 0, pass_word + 1))
            with m.If(pixel_passed):
                with m.If(pass_pixel == config.out_width - 1):
                    m.d.sync += [pass_pixel.eq(0), pass_row.eq(pass_row + 1),
                                 pass_bottom.eq(pass_bottom + config.stride)]
                with m.Else():
                    m.d.sync += pass_pixel.eq(pass_pixel + 1)
        with m.If(inference_done | ~self.run):
            m.d.sync += [rows_in.eq(0), pass_row.eq(0), pass_bottom.eq(first_window_bottom(config)),
                         pass_pixel.eq(0), pass_word.eq(0)]
        m.d.comb += [
            self.row_done.eq(stored_here & streaming & row_ends),
            address.eq(Mux(streaming, config.act_base + buffer_word,
                           bank_base + stored_index)[:len(address)]),
            self.sram_write.data.eq(i_flit.payload.data),
            self.sram_write.en.eq(transfer & stores),
            self.store_done.eq(transfer & stores & (in_index + 1 == store_until)),
        ]
        with m.If(~self.run):
            m.d.sync += [in_index.eq(0), in_bank.eq(0), buffer_word.eq(0), row_column.eq(0), pixel_word.eq(0),
                         slot.eq(0), free_rows.eq(config.stream_rows)]
            if contexts > 1:
                m.d.sync += [context.eq(0), pending.eq(0)]
        return m
