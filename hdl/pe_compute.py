"""The PE's COMPUTE sequencer: when COMPUTE runs and what each issue cycle reads (docs/architecture.md
sections 4 and 4.1 to 4.3)."""
from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, signed
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import exact_log2

from flowtile.arch import COMPUTE_DRAIN_CYCLES, OP_BCAST, Arch

from .layouts import check_arch, config_layout
from .pe_input import bank_words, last_input_row
from .pe_loader import band_end
from .pe_output import channel_group, op_decode

__all__ = ["ComputeSequencer", "issue_layout"]


def issue_layout(arch: Arch) -> data.StructLayout:
    """One issue cycle of COMPUTE: the three read addresses and what the pipeline needs to know of it.

    ``weight_addr``, ``activation_addr``: SRAM words; ``param_addr``: parameter-table bank address
    (row ``o // L`` for MAC, word ``cw`` for the lane-wise ops); ``first`` / ``last``: first / last issue
    of an output value (MAC: channel ``o``; the other ops: word ``cw``); ``word_last``: last issue of a
    result word; ``padded``: the window position lies outside the input map; ``operand_b``: ADD or
    CONCAT reads operand ``b``; ``slot``: the result ring slot of the word; ``lane``: ``o mod L`` (MAC).
    """
    return data.StructLayout({
        "weight_addr": range(arch.sram_words),
        "activation_addr": range(arch.sram_words),
        "param_addr": range(-(-arch.max_tile_outputs // arch.lanes)),
        "first": 1,
        "last": 1,
        "word_last": 1,
        "padded": 1,
        "operand_b": 1,
        "slot": range(arch.result_words),
        "lane": range(arch.lanes),
    })


class ComputeSequencer(wiring.Component):
    """COMPUTE's control and loop nest (docs/architecture.md section 4, bullet "Compute side" and "Pipeline inside COMPUTE"; the window loop
    nest, section 4.1; ADD's operands, section 4.2; CONCAT's, section 4.3; the channel groups of MAX, LANE and ADD,
    section 4.4: their word loop runs over the group's N_g words, read from channel word group_word_begin on; BCAST,
    section 4.5: an input-channel loop inside the window loop).

    COMPUTE of inference ``s`` begins (``compute_start``, cycle ``c_s``) iff ``run``, ``computes``, RECV
    word ``store_until - 1`` of ``s`` (its last stored word, section 4.2) has arrived in an earlier cycle
    (``store_done``), no COMPUTE is running (the previous one's two drain cycles included) and ``ring_free``.
    It reads bank ``s mod 2`` (``compute_bank``, which flips when a COMPUTE ends) and makes one issue a cycle
    (``issue.valid``) in section 4.1's loop order over the band's output pixels, except that a result word's
    first issue waits for ``ring_free``; ``word_issued`` marks a word's first issue (``a_j``). After the last issue
    it drains :data:`COMPUTE_DRAIN_CYCLES` cycles. ``in_compute`` is high from ``c_s`` through the
    last drain cycle. ``run = 0`` clears every flag (bank 0, no COMPUTE, nothing stored, context 0).

    With ``C = arch.tile_contexts > 1`` (section 4.6) COMPUTE serves the contexts in turn, ``0 .. C' - 1`` per
    inference: ``context`` (a register) is the context of the COMPUTE running or next to run, and ``config`` and
    ``computes`` must be that context's (the PE selects them, and the pipeline's registers, by ``context``). A
    COMPUTE of context ``c`` is section 4's COMPUTE with ``c``'s registers; in its last cycle (the last drain cycle)
    ``context`` moves on to ``c + 1``, or to 0 if ``c`` is the tile's last context (``loop_back = 0``, or ``c = C -
    1``), and only then does ``compute_bank`` flip. The drain separates any two words of different contexts (the
    next COMPUTE begins at the earliest in the cycle after the previous one's last drain cycle). ``store_done``
    pulses are counted (up to ``C``: the input side may run up to ``C'`` turns ahead); COMPUTE begins only with a
    count above 0 registered before the cycle, and its start takes one off: the ``n``-th COMPUTE begins after the
    ``n``-th ``store_done`` (the ``n``-th turn's last stored word), in an earlier cycle. The window counters start
    a COMPUTE from its own context's ``out_col_begin`` and ``w_base`` (the previous COMPUTE, possibly begun in the
    cycle after its own last drain cycle, left them at its own): its first issue reads them, and the column and
    weight registers take them in that issue, so that every issue of its first pixel reads its own column. The other
    loop counters (``word``, ``kernel_x``, ``kernel_y``, the channel counter, ``out_row``) wrap to 0 with the
    previous COMPUTE's last issue.

    ``issue`` never stalls (``always_ready``); its payload (:func:`issue_layout`) is meaningful when
    ``issue.valid``.

    A line buffer (``stream_rows = R > 0``, section 4 "Streaming rows"): ``row_done`` pulses (a stored input row's
    last word) are counted in ``pending_rows``, less ``in_height`` at each COMPUTE's last cycle; an output row's first
    issue (and so COMPUTE's start) waits until ``pending_rows`` exceeds the last input row it reads. Its first issue
    releases the rows below its first one (``release_rows``, the count, in that cycle), COMPUTE's last cycle the rest
    of the inference's ``in_height``. Row ``y`` of the COMPUTE's inference is read from slot ``(base + y) mod R``,
    ``base`` advancing by ``in_height`` each COMPUTE.

    Parameters
    ----------
    arch : :class:`flowtile.arch.Arch`

    Members
    -------
    config : ``In(config_layout())``
    computes : ``In(1)``
    run : ``In(1)``
    store_done : ``In(1)``
    row_done : ``In(1)``
        A line buffer's input row was stored (its last word) in this cycle.
    release_rows : ``Out(range(256))``
        Line buffer rows released in this cycle.
    ring_free : ``In(1)``
    issue : ``Out(stream.Signature(issue_layout(arch), always_ready=True))``
    word_issued : ``Out(1)``
    compute_start : ``Out(1)``
    compute_begun : ``Out(1)``
        A COMPUTE is running or begins in this cycle.
    compute_bank : ``Out(1)``
    in_compute : ``Out(1)``
    context : ``Out(range(C))``
        Only with ``C > 1``: the context of the COMPUTE running or next to run.
    bank_free : ``Out(1)``
        Only with ``C > 1``: the COMPUTE of ``context`` no longer reads its bank after this cycle: ``compute_start``
        with two banks, its last (drain) cycle with one (``single_bank``).
    """

    def __init__(self, arch: Arch):
        check_arch(arch, "ComputeSequencer")
        self.arch = arch
        super().__init__({
            "config": In(config_layout()),
            "computes": In(1),
            "run": In(1),
            "store_done": In(1),
            "row_done": In(1),
            "release_rows": Out(range(256)),
            "ring_free": In(1),
            "issue": Out(stream.Signature(issue_layout(arch), always_ready=True)),
            "word_issued": Out(1),
            "compute_start": Out(1),
            "compute_begun": Out(1),
            "compute_bank": Out(1),
            "in_compute": Out(1),
            **({"context": Out(range(arch.tile_contexts)), "bank_free": Out(1)} if arch.tile_contexts > 1 else {}),
        })

    def elaborate(self, platform):
        m = Module()
        arch, config, issue = self.arch, self.config, self.issue.payload
        lane_bits = exact_log2(arch.lanes)
        is_max, is_add, is_concat, two_operands, lane_wise, per_word = op_decode(config)
        is_broadcast = config.op == OP_BCAST
        n_out = Mux(self.computes, config.n_out, 0)

        # ``computing``: a COMPUTE has begun and not ended. ``stored``: RECV word store_until - 1 of the
        # inference of the next COMPUTE has been received. Every term of compute_start is registered.
        contexts = arch.tile_contexts
        computing, compute_bank = Signal(), self.compute_bank
        compute_start, in_compute = self.compute_start, self.in_compute
        if contexts == 1:
            stored = Signal()
        else:
            # Section 4.6: the input side may have stored up to C' turns COMPUTE has not begun.
            stored = Signal(range(contexts + 1))
        # A line buffer (stream_rows): the rows stored and not yet passed by a COMPUTE's end, against the last input
        # row the output row about to start reads (out_row is 0 before COMPUTE begins).
        streaming = config.stream_rows != 0
        out_row = self._out_row = Signal.like(config.out_rows)   # the window's output row, from out_row_begin
        # the output row's top window row plus pad_top: one multiplier for the addresses and the line buffer
        self._row_top = Signal(len(config.out_rows) + 1 + len(config.stride))
        m.d.comb += self._row_top.eq((config.out_row_begin + out_row) * config.stride)
        pending_rows = Signal(range(2 * 256 + 1))
        first_input_row, last_input_row = self._row_span(m)
        rows_in = pending_rows > last_input_row
        ready = Mux(streaming, rows_in, stored if contexts == 1 else stored != 0)
        m.d.comb += [
            compute_start.eq(self.run & self.computes & ready & ~computing & self.ring_free),
            self.compute_begun.eq(computing | compute_start),
            in_compute.eq(self.run & (computing | compute_start)),
        ]
        if contexts == 1:
            with m.If(compute_start):
                m.d.sync += [computing.eq(1), stored.eq(0)]
            # Set after the clear: RECV word store_until - 1 of inference s + 1 may arrive in cycle c_s itself.
            with m.If(self.store_done):
                m.d.sync += stored.eq(1)
        else:
            with m.If(compute_start):
                m.d.sync += computing.eq(1)
            m.d.sync += stored.eq(stored + self.store_done - compute_start)

        # Loop nest of section 4.1, innermost last. MAC: output row, output column, channel o, ky, kx, cw
        # (the weight order). MAX, LANE, ADD, CONCAT: output row, output column, cw, ky, kx. BCAST (section 4.5):
        # output row, output column, cw (its output word g), ky, kx, input channel c (counted in ``channel``).
        out_col_register = Signal.like(config.out_width, name="out_col")   # ox: out_col_begin .. in the first row
        weight_address_register = Signal.like(issue.weight_addr, name="weight_address")
        if contexts == 1:
            out_col, weight_address = out_col_register, weight_address_register
        else:
            # Section 4.6: the previous COMPUTE (another context's, possibly) left the counters at its own
            # out_col_begin and w_base; a COMPUTE's first issue (the cycle it begins) starts from its own.
            out_col = Signal.like(out_col_register, name="out_col_now")
            weight_address = Signal.like(weight_address_register, name="weight_address_now")
            m.d.comb += [out_col.eq(Mux(computing, out_col_register, config.out_col_begin)),
                         weight_address.eq(Mux(computing, weight_address_register, config.w_base))]
        channel = Signal(max(len(config.n_out), len(config.in_channels)))   # o (MAC), c (BCAST)
        kernel_y = Signal.like(config.kernel_h)
        kernel_x = Signal.like(config.kernel_w)
        word = Signal.like(config.words_per_pixel)        # cw (the per-word ops: within the channel group)
        issue_done = Signal()
        drain = Signal(range(COMPUTE_DRAIN_CYCLES))
        issuing = in_compute & ~issue_done
        if contexts > 1:
            last_cycle = in_compute & issue_done & (drain == COMPUTE_DRAIN_CYCLES - 1)
            m.d.comb += self.bank_free.eq(Mux(config.single_bank, last_cycle, compute_start))

        # cw runs over a pixel's words_per_pixel input words (MAC) or the N_g words of the channel group (section
        # 4.4; N_g = words_per_pixel without a group, and always for CONCAT).
        group_first_word, group_words = channel_group(config)
        last_word = word == group_words - 1
        last_kernel_x = kernel_x == config.kernel_w - 1
        last_kernel_y = kernel_y == config.kernel_h - 1
        last_channel = channel == Mux(is_broadcast, config.in_channels, n_out) - 1
        last_out_row = out_row == config.out_rows - 1
        last_out_col = out_col == Mux(last_out_row, band_end(config), config.out_width) - 1
        # a line buffer's output row starts with its first column's first issue
        row_first = ((word == 0) & (kernel_x == 0) & (kernel_y == 0) & (channel == 0)
                     & (out_col == Mux(out_row == 0, config.out_col_begin, 0)))
        window_done = last_kernel_x & last_kernel_y
        pixel_done = Signal()
        step_word, step_kernel_x, step_kernel_y, step_channel = Signal(), Signal(), Signal(), Signal()
        with m.If(per_word):
            # BCAST's input-channel loop runs inside the window loop; the other per-word ops have none (one pass)
            channel_done = ~is_broadcast | last_channel
            m.d.comb += [
                step_channel.eq(is_broadcast), step_kernel_x.eq(channel_done),
                step_kernel_y.eq(channel_done & last_kernel_x), step_word.eq(channel_done & window_done),
                issue.first.eq((~is_broadcast | (channel == 0)) & (kernel_x == 0) & (kernel_y == 0)),
                issue.last.eq(channel_done & window_done),
                pixel_done.eq(channel_done & window_done & last_word),
            ]
        with m.Else():
            m.d.comb += [
                step_word.eq(1), step_kernel_x.eq(last_word), step_kernel_y.eq(last_word & last_kernel_x),
                step_channel.eq(last_word & window_done),
                issue.first.eq((word == 0) & (kernel_x == 0) & (kernel_y == 0)),
                issue.last.eq(last_word & window_done),
                pixel_done.eq(last_word & window_done & last_channel),
            ]

        def count(counter, step, last):
            with m.If(step):
                m.d.sync += counter.eq(Mux(last, 0, counter + 1))

        # Result words: MAC fills a word with L channels, the per-word ops issue a whole word per window.
        channel_lane = channel[:lane_bits]
        word_first = issue.first & (per_word | (channel_lane == 0))
        m.d.comb += [
            issue.word_last.eq(issue.last & (per_word | (channel_lane == arch.lanes - 1) | last_channel)),
            # A word's first issue waits for a free ring slot; COMPUTE never waits inside a word. An
            # inference's first issue has its slot already: compute_start requires ring_free.
            self.issue.valid.eq(issuing & (~word_first | self.ring_free) & (~streaming | ~row_first | rows_in)),
            self.word_issued.eq(self.issue.valid & word_first),
        ]
        write_slot = Signal(range(arch.result_words))     # j mod R of the word being issued
        m.d.comb += issue.slot.eq(write_slot)
        with m.If(issuing):
            with m.If(self.issue.valid):
                count(word, step_word, last_word)
                count(kernel_x, step_kernel_x, last_kernel_x)
                count(kernel_y, step_kernel_y, last_kernel_y)
                count(channel, step_channel, last_channel)
                # A row after the first starts at column 0; the next inference's first row at out_col_begin.
                with m.If(pixel_done):
                    m.d.sync += out_col_register.eq(
                        Mux(last_out_col, Mux(last_out_row, config.out_col_begin, 0), out_col + 1))
                if contexts > 1:
                    # Section 4.6: a COMPUTE's first issue reads its own out_col_begin through ``out_col``; unless
                    # that issue ends a pixel, the register must take it too (it holds what the previous
                    # COMPUTE, another context's, left: that context's out_col_begin), or the following issues of
                    # the first pixel would read the previous context's column.
                    with m.Elif(~computing):
                        m.d.sync += out_col_register.eq(out_col)
                count(out_row, pixel_done & last_out_col, last_out_row)
                # A pixel reads its weights in issue order, then starts over. MAX, ADD, CONCAT ignore them.
                m.d.sync += weight_address_register.eq(Mux(pixel_done, config.w_base, weight_address + 1))
                with m.If(issue.word_last):
                    m.d.sync += write_slot.eq(Mux(write_slot == arch.result_words - 1, 0, write_slot + 1))
                with m.If(pixel_done & last_out_col & last_out_row):
                    m.d.sync += issue_done.eq(1)
        with m.Elif(in_compute):
            m.d.sync += drain.eq(drain + 1)
            with m.If(drain == COMPUTE_DRAIN_CYCLES - 1):
                # COMPUTE's last cycle: its last result word is written now; the next COMPUTE may begin next.
                m.d.sync += [computing.eq(0), drain.eq(0), issue_done.eq(0)]
                if contexts == 1:
                    m.d.sync += compute_bank.eq(~compute_bank)
                else:
                    # Section 4.6: the next context's COMPUTE, or context 0's of s + 1 after the tile's last.
                    context = self.context
                    last_context = ~config.loop_back | (context == contexts - 1)
                    m.d.sync += context.eq(Mux(last_context, 0, context + 1))
                    with m.If(last_context):
                        m.d.sync += compute_bank.eq(~compute_bank)
        # The line buffer: rows released as output rows start and at COMPUTE's end; the inference's first slot.
        released = Signal(8)
        slot_base = Signal(8)
        end_cycle = in_compute & issue_done & (drain == COMPUTE_DRAIN_CYCLES - 1)
        row_start = self.issue.valid & row_first
        m.d.comb += self.release_rows.eq(Mux(~streaming, 0, Mux(row_start, first_input_row - released, 0)
                                             + Mux(end_cycle, config.in_height - released, 0)))
        with m.If(row_start):
            m.d.sync += released.eq(first_input_row)
        with m.If(end_cycle):
            m.d.sync += [released.eq(0), slot_base.eq((slot_base + config.in_height) & (config.stream_rows - 1))]
        m.d.sync += pending_rows.eq(pending_rows + self.row_done - Mux(end_cycle & streaming, config.in_height, 0))
        self._slot_base = slot_base
        with m.If(~in_compute):
            m.d.sync += [word.eq(0), kernel_x.eq(0), kernel_y.eq(0), channel.eq(0),
                         out_col_register.eq(config.out_col_begin), out_row.eq(0), issue_done.eq(0), drain.eq(0),
                         weight_address_register.eq(config.w_base)]

        self._addresses(m, is_add, is_concat, is_broadcast, two_operands, lane_wise, out_row, out_col, channel,
                        kernel_y, kernel_x, word, weight_address, group_first_word)
        with m.If(~self.run):
            m.d.sync += [computing.eq(0), compute_bank.eq(0), stored.eq(0), write_slot.eq(0), pending_rows.eq(0),
                         released.eq(0), slot_base.eq(0)]
            if contexts > 1:
                m.d.sync += self.context.eq(0)
        return m

    def _row_span(self, m):
        """``(first, last)`` input rows of the stored map the current output row reads (clamped to the map):
        :meth:`flowtile.tile_config.TileConfig.input_rows_of_output_row`."""
        config = self.config
        top = Signal(signed(len(self._row_top) + 2))
        first, last = Signal(8), Signal(8)
        m.d.comb += top.eq(self._row_top - config.pad_top)
        bottom = top + config.kernel_h - 1
        m.d.comb += [first.eq(Mux(top < 0, 0, top)), last.eq(last_input_row(config, bottom))]
        return first, last

    def _addresses(self, m, is_add, is_concat, is_broadcast, two_operands, lane_wise, out_row, out_col, channel,
                   kernel_y, kernel_x, word, weight_address, group_first_word):
        """The issue's read addresses and window position (sections 4.1 to 4.3).

        ADD's window does not move with kx: its two issues of a word read pixel p of operand a (kx = 0) and
        of operand b (kx = 1). CONCAT's word cw comes from operand a's word cw while cw < CWa, else from
        operand b's word cw - CWa (maps of CWa and CWb = CW - CWa words a pixel). MAC, MAX and LANE read
        the one map at act_base (offset 0, pitch CW). pixel_index * pitch is the one wide multiplier.
        MAX, LANE and ADD read channel word group_word_begin + cw of a pixel (``group_first_word``, 0 for MAC and
        CONCAT: section 4.4's channel groups); weight and parameter addresses count cw within the group. BCAST reads
        input word ``c div L`` of the window's pixel (its lane ``c mod L`` is the issue's ``lane``).
        """
        config, issue = self.config, self.issue.payload
        concat_words_b = Signal.like(config.words_per_pixel)
        stored_words = Signal(len(config.store_end) + 1)     # B, both store ranges (section 4.2)
        m.d.comb += [
            concat_words_b.eq(config.words_per_pixel - config.concat_words_a),
            stored_words.eq(bank_words(config)),
        ]
        operand_b = (is_add & (kernel_x != 0)) | (is_concat & (word >= config.concat_words_a))
        operand_offset = Mux(two_operands, Mux(operand_b, config.operand_b_offset, config.operand_a_offset), 0)
        dense = is_broadcast & config.in_dense
        pixel_pitch = Mux(dense, config.in_channels,
                          Mux(is_concat, Mux(operand_b, concat_words_b, config.concat_words_a), config.words_per_pixel))
        operand_word = Mux(is_broadcast, channel >> exact_log2(self.arch.lanes),
                           Mux(is_concat & operand_b, (word - config.concat_words_a)[:len(word)],
                               word + group_first_word))
        window_y = self._row_top + kernel_y                                         # iy + pad_top
        window_x = out_col * config.stride + Mux(is_add, 0, kernel_x)               # ix + pad_left
        in_bounds = ((window_y >= config.pad_top) & (window_y < config.pad_top + config.in_height)
                     & (window_x >= config.pad_left) & (window_x < config.pad_left + config.in_width))
        input_y = (window_y - config.pad_top)[:len(config.in_height)]
        # a line buffer (stream_rows = R): row y of the COMPUTE's inference is in slot (base + y) mod R
        input_y = Mux(config.stream_rows != 0, (self._slot_base + input_y) & (config.stream_rows - 1), input_y)
        input_x = (window_x - config.pad_left)[:len(config.in_width)]
        pixel_offset = (input_y * config.in_width + input_x) * pixel_pitch
        # a dense map (section 4.5): channel c of the pixel is byte in_dense_offset + p*C + c of the stored words
        dense_byte = config.in_dense_offset + pixel_offset + channel
        lane_bits = exact_log2(self.arch.lanes)
        activation_offset = Mux(dense, dense_byte >> lane_bits, operand_offset + pixel_offset + operand_word)
        # Section 4: COMPUTE of inference s reads bank s mod 2, act_base + (s mod 2) * B onwards (B: both store
        # ranges' words; the stored words are the first range's then the second's).
        activation_address = (config.act_base + Mux(self.compute_bank & ~config.single_bank & (config.stream_rows == 0),
                                                    stored_words, 0)
                              + activation_offset)
        m.d.comb += [
            issue.weight_addr.eq(weight_address),
            issue.activation_addr.eq(activation_address[:len(issue.activation_addr)]),
            # MAC needs row o (bank o % L, address o // L); the lane-wise ops rows cw*L + l (address cw).
            issue.param_addr.eq(Mux(lane_wise, word, channel >> exact_log2(self.arch.lanes))),
            issue.padded.eq(~in_bounds),
            # MAC: o mod L (the accumulator lane); BCAST: the lane of the activation byte every lane multiplies
            issue.lane.eq(Mux(dense, dense_byte[:lane_bits], channel[:lane_bits])),
            issue.operand_b.eq(operand_b),
        ]
