"""The PE's input side: RECV and PASS transfers (docs/architecture.md sections 4 and 4.2)."""
from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, unsigned
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from flowtile.arch import Arch

from .layouts import check_arch, config_layout, flit_signature
from .pe_loader import sram_write_signature

__all__ = ["InputSide", "first_range_words", "bank_words"]


def first_range_words(config):
    """``B1 = store_end - store_begin`` (0 if negative): the first store range's words (section 4.2)."""
    return Mux(config.store_end > config.store_begin, config.store_end - config.store_begin, 0)


def bank_words(config):
    """``B = B1 + (store2_end - store2_begin)`` (each term 0 if negative): the stored words of an inference,
    both store ranges (section 4.2), the size of an activation bank."""
    second = Mux(config.store2_end > config.store2_begin, config.store2_end - config.store2_begin, 0)
    return first_range_words(config) + second


class InputSide(wiring.Component):
    """Input side of a PE (docs/architecture.md section 4, bullet "Input side"; the store and forward ranges,
    section 4.2).

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
    inference, the inference's parity ``s mod 2`` equals that of the COMPUTEs begun so far
    (``compute_bank ^ compute_begun``): inference ``s >= 1`` starts at a cycle ``>= c_{s-1}``.
    ``o_forward.valid`` does not depend on ``o_forward.ready`` (it is ``i_flit.valid`` and the other
    terms). ``run = 0`` returns the side to word 0 of inference 0 (bank 0) and blocks every transfer.

    Parameters
    ----------
    arch : :class:`flowtile.arch.Arch`

    Members
    -------
    config : ``In(config_layout())``
    computes : ``In(1)``
    run : ``In(1)``
    i_flit : ``In(flit_signature(arch))``
    o_forward : ``Out(stream.Signature(unsigned(arch.flit_data_bits)))``
        Into the forward queue.
    sram_write : ``In(sram_write_signature(arch))``
        Drives the SRAM's write port (the PE hands it to the input side while ``run = 1``).
    compute_bank : ``In(1)``
        The bank of the COMPUTE running or next to run.
    compute_begun : ``In(1)``
        A COMPUTE is running or begins in this cycle.
    store_done : ``Out(1)``
    """

    def __init__(self, arch: Arch):
        check_arch(arch, "InputSide")
        self.arch = arch
        super().__init__({
            "config": In(config_layout()),
            "computes": In(1),
            "run": In(1),
            "i_flit": In(flit_signature(arch)),
            "o_forward": Out(stream.Signature(unsigned(arch.flit_data_bits))),
            "sram_write": In(sram_write_signature(arch)),
            "compute_bank": In(1),
            "compute_begun": In(1),
            "store_done": Out(1),
        })

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
        receiving = in_index < n_in_words
        stores_first = (in_index >= config.store_begin) & (in_index < config.store_end)
        stores_second = (in_index >= config.store2_begin) & (in_index < config.store2_end)
        stores = receiving & (stores_first | stores_second)
        pushes = ~receiving | ((in_index >= config.forward_begin) & (in_index < config.forward_end))
        # At in_index = 0 of inference s the COMPUTEs begun so far (this cycle's included) number s - 1 or s
        # (COMPUTE of s needs a RECV of s; inference s - 1 began at >= c_{s-2}), so comparing parities
        # decides. s = 0: both are 0.
        may_begin = ~self.computes | (in_index != 0) | ((self.compute_bank ^ self.compute_begun) == in_bank)
        accepting = Signal()
        m.d.comb += [
            accepting.eq(self.run & (input_words != 0) & may_begin),
            self.o_forward.valid.eq(i_flit.valid & accepting & pushes),
            self.o_forward.payload.eq(i_flit.payload.data),
            i_flit.ready.eq(accepting & (~pushes | self.o_forward.ready)),
        ]
        transfer = i_flit.valid & i_flit.ready
        with m.If(transfer):
            with m.If(in_index == input_words - 1):
                m.d.sync += [in_index.eq(0), in_bank.eq(~in_bank)]
            with m.Else():
                m.d.sync += in_index.eq(in_index + 1)

        # Section 4.2: RECV word k is stored iff store_begin <= k < store_end (stored word k - store_begin) or
        # store2_begin <= k < store2_end (stored word B1 + k - store2_begin), into bank s mod 2. The ranges are
        # disjoint in a valid config; the first one wins otherwise.
        bank_base = config.act_base + Mux(in_bank, stored_words, 0)
        stored_index = Mux(stores_first, in_index - config.store_begin, first_words + in_index - config.store2_begin)
        address = self.sram_write.addr
        m.d.comb += [
            address.eq((bank_base + stored_index)[:len(address)]),
            self.sram_write.data.eq(i_flit.payload.data),
            self.sram_write.en.eq(transfer & stores),
            self.store_done.eq(transfer & stores & (in_index + 1 == store_until)),
        ]
        with m.If(~self.run):
            m.d.sync += [in_index.eq(0), in_bank.eq(0)]
        return m
