"""Several layers per tile, contexts (docs/architecture.md section 4.6), in the RTL: the load bus's ``context`` field,
the loader's register files, the parameter table's skewed read (register ``param_base``), the three sides serving
the contexts in turn (InputSide, ComputeSequencer, OutputSide against plain lockstep models) and the whole PE with 2
and 3 contexts against golden models written from section 4.6 alone: the data (dense MAC, LANE and MAX contexts
chained through the loop-back FIFO, their parameter rows from unaligned ``param_base`` values; windowed contexts of
every op: BCAST over a dense map, MAC bands in an output-channel group's order, MAX, LANE channel groups, a second
store range, run with COMPUTEs of different contexts back to back) and the cycle of every
transfer, every COMPUTE start and every result word's first issue (section 6 rule 4 with contexts: the sides'
chains concatenate the contexts' actions, the loop-back FIFO and the per-context forward queues are FIFO edges, the
hand-over and the store rule hold per context, the drain separates contexts, one result ring numbers words in compute
order), under seeded input gaps and output back-pressure. And: a tile of one context elaborates to the ports it had
before contexts existed."""
from __future__ import annotations

import random
import re

import pytest
from amaranth.back import verilog
from amaranth.hdl import Elaboratable, Module, Signal, signed
from amaranth.lib import data
from amaranth.sim import Simulator

from flowtile.arch import CONFIG_FIELDS, OP_BCAST, OP_LANE, OP_MAC, OP_MAX, Arch, index_bits
from flowtile.testing.archs import lean_arch
from flowtile.hdl.layouts import (LOAD_TARGET_CONFIG, LOAD_TARGET_PARAMS, LOAD_TARGET_SRAM, LoadEncodingError,
                                  config_layout, encode_config, encode_param_entry, load_context_bits, load_layout,
                                  pack_lanes, pack_load, param_layout, unpack_lanes)
from flowtile.hdl.pe import PE
from flowtile.hdl.pe_compute import ComputeSequencer
from flowtile.hdl.pe_input import InputSide
from flowtile.hdl.pe_loader import PELoader
from flowtile.hdl.pe_output import OutputSide
from flowtile.hdl.pe_params import ParamTable
from flowtile.hdl.tile import Tile
from flowtile.tile_config import TileConfig
from test_hdl_pe import golden_window
from test_hdl_pe_components import as_signed, computes_model

pytestmark = [pytest.mark.filterwarnings("ignore:.*created but never used"),
              pytest.mark.usefixtures("collect_unused_components")]

LANES = 4
ARCH = lean_arch(rows=1, cols=2, lanes=LANES, sram_bytes=1024, max_tile_outputs=32, result_ring_words=3,
                 router_fifo_depth=2, tile_contexts=3)
TILE = 1
DEST = {"dest_row": 0, "dest_col": 0, "dest_host": 1}
FIELD_WIDTHS = {name: width for name, width, _ in CONFIG_FIELDS}
SIGNED_FIELDS = {name for name, _, is_signed in CONFIG_FIELDS if is_signed}


def run_simulation(dut, testbench):
    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()


def config_value(**fields):
    """A whole register file (every register 0 unless given), as a const of config_layout()."""
    return config_layout().const({name: fields.get(name, 0) for name, _, _ in CONFIG_FIELDS})


# --- the load bus and the loader ----------------------------------------------------------------------------------

def test_load_layout_context_field():
    """One context: no ``context`` field (the payload of before); several: ``context`` on top, above ``chip``,
    ``index_bits(tile_contexts)`` wide, no other field moved; pack_load packs it and refuses a context outside the
    arch."""
    for chips in (1, 3):
        one = load_layout(lean_arch(chips=chips))
        assert [name for name, _ in one] == ["tile", "target", "addr", "data", "chip"]
        for contexts in (2, 3, 4, 5, 16):
            arch = lean_arch(chips=chips, tile_contexts=contexts)
            layout = load_layout(arch)
            assert [name for name, _ in layout] == ["tile", "target", "addr", "data", "chip", "context"]
            assert load_context_bits(arch) == index_bits(contexts) == layout["context"].shape.width
            for name, field in one:
                assert (layout[name].offset, layout[name].shape) == (field.offset, field.shape)
            assert layout["context"].offset == one.size
            word = pack_load(arch, tile=3, target=LOAD_TARGET_CONFIG, addr=7, data=9, chip=chips - 1,
                             context=contexts - 1)
            assert word == layout.const({"tile": 3, "target": LOAD_TARGET_CONFIG, "addr": 7, "data": 9,
                                         "chip": chips - 1, "context": contexts - 1}).as_bits()
            assert word >> layout["context"].offset == contexts - 1
            with pytest.raises(LoadEncodingError, match=rf"'context' = {contexts} is out of range 0..{contexts - 1}"):
                pack_load(arch, 0, LOAD_TARGET_CONFIG, 0, 0, context=contexts)
    with pytest.raises(LoadEncodingError, match=r"'context' = 1 is out of range 0..0"):
        pack_load(lean_arch(), 0, LOAD_TARGET_CONFIG, 0, 0, context=1)


@pytest.mark.parametrize("contexts", [2, 3])
def test_loader_sets_the_addressed_context(contexts):
    """Config writes set register ``addr`` of context ``context`` only (a context index beyond the arch's sets
    nothing); SRAM and parameter writes pass whatever their context; ``computes`` bit c follows context c's
    registers. Against a model of C register files, cycle by cycle, under seeded random writes."""
    arch = ARCH.replace(tile_contexts=contexts)
    rng = random.Random(contexts)
    dut = PELoader(arch, TILE)
    files = [{name: 0 for name, _, _ in CONFIG_FIELDS} for _ in range(contexts)]
    base = {"n_out": 1, "n_in_words": 2, "store_begin": 0, "store_end": 1, "words_per_pixel": 1, "kernel_h": 1,
            "kernel_w": 1, "out_rows": 1, "out_width": 3, "out_col_begin": 1, "out_col_end": 2}
    index = {name: i for i, (name, _, _) in enumerate(CONFIG_FIELDS)}
    context_limit = 1 << load_context_bits(arch)
    stimulus = []
    for _ in range(6):
        stimulus += [(0, 1, TILE, LOAD_TARGET_CONFIG, index[name], value, rng.randrange(contexts))
                     for name, value in base.items()]
        for _ in range(40):
            target = LOAD_TARGET_CONFIG if rng.random() < 0.6 else rng.randrange(4)
            addr = rng.choice([index[rng.choice(list(base))], rng.randrange(len(CONFIG_FIELDS) + 2),
                               rng.randrange(arch.sram_words + 2)])
            value = rng.randrange(4) if rng.random() < 0.8 else rng.getrandbits(69)
            stimulus.append((rng.random() < 0.1, rng.random() < 0.9, rng.randrange(2), target, addr, value,
                             rng.randrange(context_limit)))

    async def testbench(ctx):
        for run, valid, tile, target, addr, value, context in stimulus:
            ctx.set(dut.run, run)
            ctx.set(dut.load.valid, valid)
            ctx.set(dut.load.payload, {"tile": tile, "target": target, "addr": addr, "data": value,
                                       "context": context})
            here = valid and not run and tile == TILE
            sram_en = here and target == LOAD_TARGET_SRAM and addr < arch.sram_words
            param_en = here and target == LOAD_TARGET_PARAMS and addr < arch.max_tile_outputs
            assert (ctx.get(dut.sram_write.en), ctx.get(dut.param_write.en)) == (sram_en, param_en)
            if here and target == LOAD_TARGET_CONFIG and addr < len(CONFIG_FIELDS) and context < contexts:
                name, width, _ = CONFIG_FIELDS[addr]
                files[context][name] = as_signed(value, width) if name in SIGNED_FIELDS else value & ((1 << width) - 1)
            await ctx.tick()
            for c in range(contexts):
                assert ctx.get(dut.config[c].as_value()) == config_value(**files[c]).as_bits(), c
                assert (ctx.get(dut.computes) >> c) & 1 == computes_model(files[c])

    run_simulation(dut, testbench)


@pytest.mark.parametrize("rows, lanes", [(12, 4), (13, 4), (6, 2)])
def test_param_table_skewed_read(rows, lanes):
    """With ``read_skew = k`` the table reads the ``lanes`` rows from ``a * lanes + k`` (bank l < k one address
    further), in bank order; rows beyond the table are not compared."""
    rng = random.Random(rows * lanes)
    dut = ParamTable(rows, lanes)
    table = [{"bias": rng.randrange(-1000, 1000), "multiplier": rng.getrandbits(31), "shift": rng.randrange(64)}
             for _ in range(rows)]

    async def testbench(ctx):
        for row, entry in enumerate(table):
            ctx.set(dut.write.en, 1)
            ctx.set(dut.write.addr, row)
            ctx.set(dut.write.data, param_layout().const(entry))
            await ctx.tick()
        ctx.set(dut.write.en, 0)
        ctx.set(dut.read.en, 1)
        for _ in range(60):
            first = rng.randrange(rows)
            ctx.set(dut.read.addr, first // lanes)
            ctx.set(dut.read_skew, first % lanes)
            await ctx.tick()
            for i in range(lanes):
                if first + i < rows:
                    got = ctx.get(dut.read.data[(first + i) % lanes].as_value())
                    assert got == param_layout().const(table[first + i]).as_bits(), (first, i)

    run_simulation(dut, testbench)


# --- the sides with contexts, against lockstep models ---------------------------------------------------------------

class InputContextsModel:
    """Section 4.6's input side: per inference each context's K + P transfers in turn (context 0 .. the first with
    loop_back = 0), bank s mod 2 flipping after the last context; per context the hand-over flag (set by a computing
    turn's first transfer, cleared by that context's COMPUTE start; a turn may begin once it is clear or being
    cleared)."""

    def __init__(self, files, computes):
        self.files, self.computes = files, computes
        self.context = self.index = self.bank = 0
        self.pending = [0] * len(files)

    def cycle(self, run, valid, forward_ready, start, start_context):
        c = self.files[self.context]
        k = self.index
        total = c["n_in_words"] + c["n_pass"]
        computes = self.computes[self.context]
        receiving = k < c["n_in_words"]
        stores = receiving and (c["store_begin"] <= k < c["store_end"] or c["store2_begin"] <= k < c["store2_end"])
        pushes = not receiving or c["forward_begin"] <= k < c["forward_end"]
        may_begin = (not computes or k != 0 or not self.pending[self.context]
                     or (start and start_context == self.context))
        accepting = run and total != 0 and may_begin
        ready = accepting and (not pushes or forward_ready)
        transfer = valid and ready
        first_words = max(c["store_end"] - c["store_begin"], 0)
        bank_words = first_words + max(c["store2_end"] - c["store2_begin"], 0)
        stored_index = k - c["store_begin"] if c["store_begin"] <= k < c["store_end"] else \
            first_words + k - c["store2_begin"]
        store_until = c["store2_end"] if c["store2_end"] > c["store2_begin"] else c["store_end"]
        out = {"context": self.context, "ready": ready, "push": valid and accepting and pushes,
               "store": transfer and stores,
               "address": (c["act_base"] + self.bank * bank_words + stored_index) % ARCH.sram_words,
               "store_done": transfer and stores and k + 1 == store_until}
        if start:
            self.pending[start_context] = 0
        if transfer and k == 0 and computes:
            self.pending[self.context] = 1
        if transfer:
            if k == total - 1:
                last = not c["loop_back"] or self.context == len(self.files) - 1
                self.index, self.context, self.bank = 0, 0 if last else self.context + 1, self.bank ^ last
            else:
                self.index = k + 1
        if not run:
            self.context = self.index = self.bank = 0
            self.pending = [0] * len(self.files)
        return out


def random_context_files(rng, contexts):
    """Register files of ``contexts`` contexts with short random streams; the first ``used`` have loop_back = 1 but
    the last of them (the rest are never served but hold random registers, too)."""
    files = []
    used = rng.randrange(1, contexts + 1)
    for c in range(contexts):
        k = rng.randrange(1, 6)
        begin = rng.randrange(k)
        end = rng.randrange(begin + 1, k + 1)
        forward_begin = rng.randrange(k + 1)
        files.append({"n_in_words": k, "n_pass": rng.randrange(3), "store_begin": begin, "store_end": end,
                      "forward_begin": forward_begin, "forward_end": rng.randrange(forward_begin, k + 1),
                      "act_base": rng.randrange(60), "loop_back": int(c < used - 1 or rng.random() < 0.1 and c >= used),
                      "store2_begin": 0, "store2_end": 0})
    return files


@pytest.mark.parametrize("contexts", [2, 3])
def test_input_side_serves_contexts_in_turn(contexts):
    """InputSide with C contexts against :class:`InputContextsModel`, cycle by cycle: ``context``, ``i_flit.ready``,
    the push, the store (address by the context's registers and the bank), ``store_done``; random COMPUTE starts of
    random contexts release the hand-over; the testbench plays the PE's multiplexer (``config`` and ``computes`` of
    the context the side serves)."""
    arch = ARCH.replace(tile_contexts=contexts)
    rng = random.Random(10 + contexts)
    dut = InputSide(arch)

    async def testbench(ctx):
        for _ in range(12):
            files = random_context_files(rng, contexts)
            computes = [rng.random() < 0.8 for _ in range(contexts)]
            model = InputContextsModel(files, computes)
            ctx.set(dut.run, 0)
            await ctx.tick()
            model.cycle(0, 0, 0, 0, 0)
            for _ in range(80):
                run = rng.random() < 0.98
                valid, forward_ready = rng.random() < 0.8, rng.random() < 0.7
                start, start_context = rng.random() < 0.3, rng.randrange(contexts)
                context = ctx.get(dut.context)
                ctx.set(dut.config, config_value(**files[context]))
                for port, value in ((dut.run, run), (dut.computes, computes[context]), (dut.i_flit.valid, valid),
                                    (dut.o_forward.ready, forward_ready),
                                    (dut.bank_free, start),     # two banks: a bank is free once COMPUTE starts
                                    (dut.compute_context, start_context)):
                    ctx.set(port, value)
                flit = rng.getrandbits(32)
                ctx.set(dut.i_flit.payload, {"data": flit})
                expected = model.cycle(run, valid, forward_ready, start, start_context)
                assert context == expected["context"]
                assert ctx.get(dut.i_flit.ready) == expected["ready"]
                assert ctx.get(dut.o_forward.valid) == expected["push"]
                assert ctx.get(dut.sram_write.en) == expected["store"]
                assert ctx.get(dut.store_done) == expected["store_done"]
                if expected["store"]:
                    assert (ctx.get(dut.sram_write.addr), ctx.get(dut.sram_write.data)) == (expected["address"], flit)
                await ctx.tick()

    run_simulation(dut, testbench)


class OutputContextsModel:
    """Section 4.6's output side, its control only: per context Q pops then E EMITs (pass_per_pixel = 0), the next
    context after the last (or, not computing, after the last pop)."""

    def __init__(self, files, computes):
        self.files, self.computes = files, computes
        self.context = self.position = 0

    def order(self):
        c = self.files[self.context]
        pops = max(c["forward_end"] - c["forward_begin"], 0) + c["n_pass"]
        emits = -(-c["n_out"] // LANES) if self.computes[self.context] else 0
        return ["pop"] * pops + ["emit"] * emits

    def cycle(self, run, queue_valid, results_valid, ready):
        order = self.order()
        kind = order[self.position] if order else None
        valid = bool(run and kind and (queue_valid if kind == "pop" else results_valid))
        out = {"context": self.context, "valid": valid, "kind": kind}
        following = self.context
        if valid and ready:
            if self.position == len(order) - 1:
                c = self.files[self.context]
                last = not c["loop_back"] or self.context == len(self.files) - 1
                following = 0 if last else self.context + 1
                self.position = 0
            else:
                self.position += 1
        out["next_context"] = following
        self.context = following
        if not run:
            self.context = self.position = 0
        return out


@pytest.mark.parametrize("contexts", [2, 3])
def test_output_side_serves_contexts_in_turn(contexts):
    """OutputSide with C contexts (dense registers: Q pops, then ceil(n_out / L) EMITs) against
    :class:`OutputContextsModel`: ``context``, ``next_context`` (the next cycle's, which depends on ``o_flit.ready``
    in a turn's last transfer), which source each transfer takes and the destination registers of the context."""
    arch = ARCH.replace(tile_contexts=contexts)
    rng = random.Random(20 + contexts)
    dut = OutputSide(arch)

    async def testbench(ctx):
        for _ in range(10):
            files = []
            used = rng.randrange(1, contexts + 1)
            for c in range(contexts):
                k = rng.randrange(1, 5)
                fb = rng.randrange(k + 1)
                files.append({"n_in_words": k, "store_begin": 0, "store_end": k, "forward_begin": fb,
                              "forward_end": rng.randrange(fb, k + 1), "n_pass": rng.randrange(3),
                              "n_out": rng.randrange(1, 10), "words_per_pixel": k, "kernel_h": 1, "kernel_w": 1,
                              "in_height": 1, "in_width": 1, "out_rows": 1, "out_width": 1,
                              "dest_row": 0, "dest_col": rng.randrange(2), "dest_host": rng.randrange(2),
                              "loop_back": int(c < used - 1)})
            computes = [rng.random() < 0.85 for _ in range(contexts)]
            # a context that neither pops nor emits would hold the side forever: give it a pop
            for c, file in enumerate(files):
                if not computes[c] and file["forward_end"] == file["forward_begin"] and not file["n_pass"]:
                    file["n_pass"] = 1
            model = OutputContextsModel(files, computes)
            ctx.set(dut.run, 0)
            await ctx.tick()
            model.cycle(0, 0, 0, 0)
            for _ in range(80):
                queue_valid, results_valid, ready = (rng.random() < 0.7 for _ in range(3))
                context = ctx.get(dut.context)
                ctx.set(dut.config, config_value(**files[context]))
                for port, value in ((dut.run, 1), (dut.computes, computes[context]), (dut.i_queue.valid, queue_valid),
                                    (dut.i_results.valid, results_valid), (dut.o_flit.ready, ready)):
                    ctx.set(port, value)
                ctx.set(dut.i_queue.payload, 0x11)
                ctx.set(dut.i_results.payload, 0x22)
                expected = model.cycle(1, queue_valid, results_valid, ready)
                assert context == expected["context"]
                assert ctx.get(dut.o_flit.valid) == expected["valid"]
                if expected["valid"]:
                    payload = ctx.get(dut.o_flit.payload)
                    assert int(payload.data) == (0x11 if expected["kind"] == "pop" else 0x22)
                    assert (int(payload.dest_col), int(payload.dest_host)) == \
                        (files[context]["dest_col"], files[context]["dest_host"])
                assert ctx.get(dut.next_context) == expected["next_context"]
                await ctx.tick()

    run_simulation(dut, testbench)


def dense_registers(k_words, n_out, **overrides):
    registers = {"n_in_words": k_words, "store_begin": 0, "store_end": k_words, "n_out": n_out,
                 "words_per_pixel": k_words, "kernel_h": 1, "kernel_w": 1, "stride": 1, "in_height": 1,
                 "in_width": 1, "out_rows": 1, "out_width": 1, "clamp_lo": -128, "clamp_hi": 127}
    registers.update(overrides)
    return registers


@pytest.mark.parametrize("contexts", [2, 3])
def test_sequencer_serves_contexts_in_turn(contexts):
    """ComputeSequencer with C dense contexts (different w_base, act_base and out_col registers): COMPUTEs in
    context order, each after as many store_done pulses as COMPUTEs before it plus one (store_done may run up to C
    turns ahead: a counter), each starting from its own w_base (the previous context left the counter at its own),
    the context moving on in a COMPUTE's last drain cycle, the bank flipping after the tile's last context only."""
    arch = ARCH.replace(tile_contexts=contexts)
    rng = random.Random(30 + contexts)
    dut = ComputeSequencer(arch)
    files = [dense_registers(k, n, w_base=40 * c + 3, act_base=150 + 12 * c, loop_back=int(c < contexts - 1))
             for c, (k, n) in enumerate([(2, 3), (3, 5), (1, 2)][:contexts])]

    def issues(c):
        """(weight_addr, activation offset) of one dense COMPUTE of context c, in issue order."""
        k, n = files[c]["n_in_words"], files[c]["n_out"]
        return [(files[c]["w_base"] + o * k + w, w) for o in range(n) for w in range(k)]

    async def testbench(ctx):
        ctx.set(dut.run, 1)
        stores, starts, bank, previous, was_computing, last_issue = 0, 0, 0, 0, False, None
        pending_issues, started_contexts = [], []
        for cycle in range(400):
            context = ctx.get(dut.context)
            if context != previous:
                # only in the cycle after a COMPUTE's last (drain) cycle, to the next context; the bank flips after
                # the tile's last context
                assert was_computing and not pending_issues and cycle == last_issue + 3, cycle
                last = previous == contexts - 1
                assert context == (0 if last else previous + 1)
                bank ^= last
            previous = context
            ctx.set(dut.config, config_value(**files[context]))
            ctx.set(dut.computes, 1)
            # store_done as fast as the contexts' turns allow (up to C ahead of COMPUTE), with random gaps
            done = stores - starts < contexts and rng.random() < 0.5
            ctx.set(dut.store_done, done)
            ctx.set(dut.ring_free, rng.random() < 0.8)
            if ctx.get(dut.compute_start):
                assert stores > starts, f"COMPUTE began in cycle {cycle} before its store"
                assert last_issue is None or cycle >= last_issue + 3, "no drain between two COMPUTEs"
                pending_issues = issues(context)
                started_contexts.append(context)
                starts += 1
            if ctx.get(dut.issue.valid):
                payload = ctx.get(dut.issue.payload)
                weight, offset = pending_issues.pop(0)
                assert int(payload.weight_addr) == weight, cycle
                assert int(payload.activation_addr) == files[context]["act_base"] + \
                    bank * files[context]["n_in_words"] + offset
                last_issue = cycle
            assert ctx.get(dut.compute_bank) == bank
            was_computing = ctx.get(dut.in_compute)
            await ctx.tick()
            stores += done
        assert started_contexts == [c % contexts for c in range(len(started_contexts))]
        assert len(started_contexts) >= 4 * contexts

    run_simulation(dut, testbench)


# --- the PE with contexts: golden models --------------------------------------------------------------------------

def rne_shift(value, shift):
    quotient, remainder = value >> shift, value - ((value >> shift) << shift)
    half = 1 << (shift - 1)
    return quotient + ((remainder > half) | ((remainder == half) & ((quotient & 1) == 1)))


def wrap32(value):
    return ((value + (1 << 31)) % (1 << 32)) - (1 << 31)


def requantize(acc, row, c):
    bias, multiplier, shift = row
    y = rne_shift(wrap32(acc + bias) * multiplier, shift) + c["zp_out"]
    return min(max(y, c["clamp_lo"]), c["clamp_hi"])


class Context:
    """One context of a tile under test: its registers (a dict of every register), its weight words and its
    parameter rows (context-relative, row r is table row param_base + r), and its golden results. Kinds: "dense",
    "lane" (1x1), "max" (1x2 window) with their own goldens below, and "window": any windowed op of sections 4.1 to
    4.5 (MAC, MAX, LANE with channel groups, BCAST on a padded or a dense map), by test_hdl_pe's golden_window."""

    def __init__(self, kind, registers, weights, rows):
        self.kind, self.registers, self.weights, self.rows = kind, registers, weights, rows

    @property
    def counts(self):
        return TileConfig.from_dict(self.registers)

    def results(self, stored):
        """One inference's result words from its stored words (section 4 / 4.1 arithmetic)."""
        c = self.registers
        if self.kind == "window":
            weights = {c["w_base"] + i: word for i, word in enumerate(self.weights)}
            return golden_window(c, weights, self.rows, stored, LANES)
        if self.kind == "dense":
            k, outputs = c["words_per_pixel"], []
            for o in range(c["n_out"]):
                acc = sum(w * a for i in range(k) for w, a in zip(self.weights[o * k + i], stored[i]))
                outputs.append(requantize(acc, self.rows[o], c))
            outputs += [0] * (-len(outputs) % LANES)
            return [outputs[i:i + LANES] for i in range(0, len(outputs), LANES)]
        cw, width = c["words_per_pixel"], c["in_width"]
        words = []
        for q in range(c["out_width"]):
            for w in range(cw):
                if self.kind == "lane":      # 1x1 lane-wise MAC, weight word w, parameter rows w*L + l
                    words.append([requantize(self.weights[w][l] * stored[q * cw + w][l], self.rows[w * LANES + l], c)
                                  for l in range(LANES)])
                else:                        # max over the 1x2 window, then clamp
                    words.append([min(max(max(stored[q * cw + w][l], stored[(q + 1) * cw + w][l]), c["clamp_lo"]),
                                      c["clamp_hi"]) for l in range(LANES)])
        assert width >= c["out_width"]
        return words

    def output(self, flits):
        """One inference's output words: the forwarded and passed words as popped and the results, in section 4.4's
        order (pass_per_pixel = 0: all pops, then the results). The stored words are both store ranges' (section
        4.2)."""
        c = self.registers
        k = c["n_in_words"]
        pops = [f for i, f in enumerate(flits[:k]) if c["forward_begin"] <= i < c["forward_end"]] + flits[k:]
        stored = flits[c["store_begin"]:c["store_end"]] + flits[c["store2_begin"]:c["store2_end"]]
        results = self.results(stored)
        per_pixel, n_pix = c["pass_per_pixel"], self.counts.output_pixels
        bulk = len(pops) - n_pix * per_pixel
        out, width = pops[:bulk], len(results) // n_pix
        for q in range(n_pix):
            out += pops[bulk + q * per_pixel:bulk + (q + 1) * per_pixel] + results[q * width:(q + 1) * width]
        return out

    def output_kinds(self):
        c = self.registers
        pops = max(c["forward_end"] - c["forward_begin"], 0) + c["n_pass"]
        per_pixel, n_pix = c["pass_per_pixel"], self.counts.output_pixels
        width = self.counts.result_words(LANES) // n_pix
        return ["pop"] * (pops - n_pix * per_pixel) + (["pop"] * per_pixel + ["emit"] * width) * n_pix


def build_contexts(rng, plan, k_first, queue_first):
    """Contexts of one tile from ``plan``, a list of (kind, store offset from the stream's end, forwarded words,
    passed words, size): each context reads the previous one's output stream (context 0 a stream of ``k_first``
    input words), stores ``store`` words at the end of its RECV words and forwards ``forward`` words in front of
    them. SRAM regions one after another (weights, both banks, the queue); parameter rows one after another, so that
    the second context's param_base is unaligned. Context 0's queue holds ``queue_first`` words; the later contexts'
    a whole inference of what they queue (section 4.6)."""
    contexts, cursor, row_cursor, k_words = [], 0, 0, k_first
    for index, (kind, store, forward, n_pass, size) in enumerate(plan):
        last = index == len(plan) - 1
        k = k_words - n_pass
        store_begin = k - store
        registers = {name: 0 for name, _, _ in CONFIG_FIELDS}
        registers.update({"n_in_words": k, "n_pass": n_pass, "store_begin": store_begin, "store_end": k,
                          "forward_begin": max(store_begin - forward, 0), "forward_end": store_begin,
                          "clamp_lo": -128, "clamp_hi": 127, "zp_out": rng.randrange(-5, 5), "kernel_h": 1,
                          "kernel_w": 1, "stride": 1, "in_height": 1, "out_rows": 1, "loop_back": int(not last),
                          "param_base": row_cursor})
        if last:
            registers.update(DEST)
        if kind == "dense":
            n_out = size
            registers.update(op=OP_MAC, n_out=n_out, words_per_pixel=store, in_width=1, out_width=1)
            weights = [[rng.randint(-128, 127) for _ in range(LANES)] for _ in range(n_out * store)]
            rows = [(rng.randint(-5000, 5000), rng.randint(1 << 30, (1 << 31) - 1), rng.randint(36, 42))
                    for _ in range(n_out)]
        elif kind == "lane":
            cw = size
            registers.update(op=OP_LANE, n_out=cw * LANES, words_per_pixel=cw, in_width=store // cw,
                             out_width=store // cw)
            weights = [[rng.randint(-128, 127) for _ in range(LANES)] for _ in range(cw)]
            rows = [(rng.randint(-3000, 3000), rng.randint(1 << 29, (1 << 31) - 1), rng.randint(30, 34))
                    for _ in range(cw * LANES)]
        else:
            cw = size
            registers.update(op=OP_MAX, n_out=cw * LANES, words_per_pixel=cw, in_width=store // cw,
                             out_width=store // cw - 1, kernel_w=2, pad_value=-128,
                             clamp_lo=rng.randrange(-128, -20))
            weights, rows = [], [(rng.randint(-9, 9), rng.randint(0, 99), rng.randint(1, 9))
                                 for _ in range(cw * LANES)]
        registers["w_base"] = cursor
        cursor += len(weights)
        registers["act_base"] = cursor
        cursor += 2 * store
        counts = TileConfig.from_dict(registers)
        queued = counts.forwarded_words + n_pass
        words = queued if index else queue_first
        registers.update(queue_base=cursor if queued else 0, queue_words=words if queued else 0)
        cursor += registers["queue_words"]
        row_cursor += registers["n_out"]
        encode_config(ARCH, registers)        # every register rule of TileConfig.validate
        context = Context(kind, registers, weights, rows)
        contexts.append(context)
        k_words = len(context.output_kinds())
    assert cursor <= ARCH.sram_words and row_cursor <= ARCH.max_tile_outputs
    return contexts


class ContextSchedule:
    """Section 6 rule 4 with section 4.6's contexts, for one tile: the input chain (every context's K + P transfers
    of inference s in context order, then s + 1), the compute chain (result words in compute order: context 0's
    words of s, context 1's, ...; a drain of 2 between COMPUTEs, whatever their contexts), the output chain (every
    context's Q + E actions in turn); FIFO edges: the tile input (flit i offered from ``available[i]``), context c's
    forward queue (depth F_c: push i >= pop i - F_c + 1, pop i >= push i + 1), the loop-back FIFO (one FIFO of
    depth D through which the outputs of contexts 0 .. C'-2 reach the inputs of contexts 1 .. C'-1, in order),
    the router output (``ready``) and the ring (EMIT j - R); event edges per context: the first input transfer of
    (c, s), s >= 1, at >= c_{c,s-1}; the first word of (c, s) at >= t(RECV store_until - 1 of (c, s)) + 1. Solved
    by sweeps from below to the least solution."""

    def __init__(self, contexts, n_inferences, available, ready, ring_words, fifo_depth):
        in_actions, out_actions, words = [], [], []     # (c, s, k, pushes, source) / (c, s, kind, sink) / (c, s, d)
        tile_in = loop_in = loop_out = 0
        for s in range(n_inferences):
            for c, context in enumerate(contexts):
                r = context.registers
                for k in range(r["n_in_words"] + r["n_pass"]):
                    pushes = k >= r["n_in_words"] or r["forward_begin"] <= k < r["forward_end"]
                    if c == 0:
                        in_actions.append((c, s, k, pushes, ("tile", tile_in)))
                        tile_in += 1
                    else:
                        in_actions.append((c, s, k, pushes, ("loop", loop_in)))
                        loop_in += 1
                for kind in context.output_kinds():
                    if c == len(contexts) - 1:
                        out_actions.append((c, s, kind, ("router", None)))
                    else:
                        out_actions.append((c, s, kind, ("loop", loop_out)))
                        loop_out += 1
                durations = context.counts.result_word_issue_cycles(LANES) * context.counts.output_pixels
                words += [(c, s, d) for d in durations]
        assert loop_in == loop_out
        first_input = {}
        for j, (c, s, k, _, _) in enumerate(in_actions):
            first_input.setdefault((c, s), j)
        last_stored = {(c, s): first_input[(c, s)] + contexts[c].counts.store_until - 1
                       for c in range(len(contexts)) for s in range(n_inferences)}

        def first_ready(t):
            while not ready[t]:
                t += 1
                assert t < len(ready), "golden schedule runs past the ready pattern"
            return t

        never = -(1 << 40)
        t_in, t_out, a = [never] * len(in_actions), [never] * len(out_actions), [never] * len(words)
        while True:
            #: how often each rule set a time beyond every other bound (the last sweep's)
            binding = dict.fromkeys(("hand_over", "queue_space", "loop_read", "loop_space", "ring", "store",
                                     "drain", "router"), 0)
            loop_reads = [t for (_, _, _, _, (src, _)), t in zip(in_actions, t_in) if src == "loop"]
            loop_writes = [t for (_, _, _, (sink, _)), t in zip(out_actions, t_out) if sink == "loop"]
            pops = [[t for (c, _, kind, _), t in zip(out_actions, t_out) if c == q and kind == "pop"]
                    for q in range(len(contexts))]
            starts = {}
            for j, (c, s, _) in enumerate(words):
                starts.setdefault((c, s), a[j])
            # input chain
            new_in, pushes, previous = [], [[] for _ in contexts], -1
            for c, s, k, pushing, (source, index) in in_actions:
                t = previous + 1
                if source == "tile":
                    t = max(t, available[index])
                else:
                    binding["loop_read"] += loop_writes[index] + 1 > t
                    t = max(t, loop_writes[index] + 1)
                if pushing:
                    n, depth = len(pushes[c]), contexts[c].registers["queue_words"]
                    if n >= depth:
                        binding["queue_space"] += pops[c][n - depth] + 1 > t
                        t = max(t, pops[c][n - depth] + 1)
                if k == 0 and s >= 1:
                    binding["hand_over"] += starts[(c, s - 1)] > t
                    t = max(t, starts[(c, s - 1)])
                if pushing:
                    pushes[c].append(t)
                new_in.append(t)
                previous = t
            # compute chain
            emits = [t for (_, _, kind, _), t in zip(out_actions, t_out) if kind == "emit"]
            new_a = []
            for j, (c, s, d) in enumerate(words):
                if j == 0 or words[j - 1][:2] != (c, s):
                    bound = new_in[last_stored[(c, s)]] + 1
                    if j:
                        binding["drain"] += new_a[j - 1] + words[j - 1][2] + 2 > bound
                        binding["store"] += new_a[j - 1] + words[j - 1][2] + 2 < bound
                        bound = max(bound, new_a[j - 1] + words[j - 1][2] + 2)
                else:
                    bound = new_a[j - 1] + words[j - 1][2]
                if j >= ring_words:
                    binding["ring"] += emits[j - ring_words] + 1 > bound
                    bound = max(bound, emits[j - ring_words] + 1)
                new_a.append(bound)
            # output chain
            new_out, previous, popped, emitted = [], -1, [0] * len(contexts), 0
            for c, s, kind, (sink, index) in out_actions:
                t = previous + 1
                if kind == "pop":
                    t = max(t, pushes[c][popped[c]] + 1)
                    popped[c] += 1
                else:
                    t = max(t, new_a[emitted] + words[emitted][2] + 2)
                    emitted += 1
                if sink == "loop":
                    if index >= fifo_depth:
                        binding["loop_space"] += loop_reads[index - fifo_depth] + 1 > t
                        t = max(t, loop_reads[index - fifo_depth] + 1)
                else:
                    binding["router"] += first_ready(max(t, 0)) > t
                    t = first_ready(max(t, 0))
                new_out.append(t)
                previous = t
            if (new_in, new_a, new_out) == (t_in, a, t_out):
                break
            t_in, a, t_out = new_in, new_a, new_out
        self.accepted = [t for (_, _, _, _, (src, _)), t in zip(in_actions, t_in) if src == "tile"]
        self.outputs = [t for (_, _, _, (sink, _)), t in zip(out_actions, t_out) if sink == "router"]
        self.words = a
        self.compute = [t for j, t in enumerate(a) if j == 0 or words[j - 1][:2] != words[j][:2]]
        self.compute_contexts = [c for j, (c, s, _) in enumerate(words) if j == 0 or words[j - 1][:2] != (c, s)]
        self.binding = binding
        self.loop_writes = [t for (_, _, _, (sink, _)), t in zip(out_actions, t_out) if sink == "loop"]
        self.loop_reads = [t for (_, _, _, _, (source, _)), t in zip(in_actions, t_in) if source == "loop"]
        # turns that follow the previous context's last action in the very next cycle (input and output chains),
        # and pops in the first cycle of an output turn (the queue head read a cycle ahead for the next context)
        self.back_to_back_inputs = sum(1 for j in range(1, len(in_actions)) if in_actions[j][0] != in_actions[j - 1][0]
                                       and t_in[j] == t_in[j - 1] + 1)
        self.back_to_back_outputs = sum(1 for j in range(1, len(out_actions))
                                        if out_actions[j][0] != out_actions[j - 1][0] and t_out[j] == t_out[j - 1] + 1)
        self.switch_pops = sum(1 for j in range(1, len(out_actions)) if out_actions[j][0] != out_actions[j - 1][0]
                               and out_actions[j][2] == "pop" and t_out[j] == t_out[j - 1] + 1)
        # COMPUTEs that begin in the cycle after the previous COMPUTE's last drain cycle, as (previous context,
        # context): nothing idles the compute side between them
        self.back_to_back_computes = [(words[j - 1][0], c) for j, (c, s, _) in enumerate(words)
                                      if j and words[j - 1][:2] != (c, s) and a[j] == a[j - 1] + words[j - 1][2] + 2]


class ProbedPE(PE):
    def elaborate(self, platform):
        m = super().elaborate(platform)
        self.sram = m.submodules["sram"]
        return m


TAIL_CYCLES = 4


def simulate_pe(arch, contexts, inputs, available, ready, n_outputs):
    """Load the contexts (registers with the load bus's ``context`` field, SRAM words, parameter rows at
    param_base), run; returns (accepted cycles, [(lanes, dest, cycle)], COMPUTE starts, word starts, the context
    of every COMPUTE start, the cycles of the loop-back FIFO's writes and of its reads)."""
    dut = ProbedPE(arch, TILE)
    accepted, emitted, starts, word_starts, start_contexts = [], [], [], [], []
    loop_writes, loop_reads = [], []

    async def load(ctx, target, addr, value, context=0, tile=TILE):
        ctx.set(dut.load.valid, 1)
        ctx.set(dut.load.payload, {"tile": tile, "target": target, "addr": addr, "data": value,
                                   **({"context": context} if arch.tile_contexts > 1 else {})})
        await ctx.tick()
        ctx.set(dut.load.valid, 0)

    async def testbench(ctx):
        for c, context in enumerate(contexts):
            for addr, value in encode_config(arch, context.registers):
                await load(ctx, LOAD_TARGET_CONFIG, addr, value, c)
            r = context.registers
            for i, word in enumerate(context.weights):
                await load(ctx, LOAD_TARGET_SRAM, r["w_base"] + i, pack_lanes(word, LANES), c)
            for i, row in enumerate(context.rows):
                await load(ctx, LOAD_TARGET_PARAMS, r["param_base"] + i, encode_param_entry(*row), c)
        # writes to the other tile reach nothing
        await load(ctx, LOAD_TARGET_CONFIG, 0, 0, 0, tile=1 - TILE)
        ctx.set(dut.run, 1)
        cycle, tail = 0, 0
        while tail < TAIL_CYCLES:
            if len(emitted) >= n_outputs and len(accepted) >= len(inputs):
                tail += 1
                assert not ctx.get(dut.o_flit.valid), f"o_flit valid in cycle {cycle}, after the last output"
            assert cycle < len(ready) - 1, (f"PE stopped: {len(accepted)} of {len(inputs)} inputs accepted, "
                                            f"{len(emitted)} of {n_outputs} outputs by cycle {cycle}")
            offering = len(accepted) < len(inputs) and available[len(accepted)] <= cycle
            ctx.set(dut.i_flit.valid, offering)
            if offering:
                ctx.set(dut.i_flit.payload, {"data": pack_lanes(inputs[len(accepted)], LANES), "dest_row": 0,
                                             "dest_col": 1, "dest_host": 0})
            # neither o_flit.valid nor i_flit.ready follows o_flit.ready
            ctx.set(dut.o_flit.ready, not ready[cycle])
            handshake = ctx.get(dut.o_flit.valid), ctx.get(dut.i_flit.ready)
            ctx.set(dut.o_flit.ready, ready[cycle])
            assert (ctx.get(dut.o_flit.valid), ctx.get(dut.i_flit.ready)) == handshake, cycle
            if ctx.get(dut.o_flit.valid) and ready[cycle]:
                payload = ctx.get(dut.o_flit.payload)
                emitted.append((unpack_lanes(int(payload.data), LANES),
                                (int(payload.dest_row), int(payload.dest_col), int(payload.dest_host)), cycle))
            if ctx.get(dut.probes["compute_start"]):
                starts.append(cycle)
                start_contexts.append(ctx.get(dut.probes["compute_context"]) if arch.tile_contexts > 1 else 0)
            if ctx.get(dut.probes["word_start"]):
                word_starts.append(cycle)
            if arch.tile_contexts > 1:
                if ctx.get(dut.probes["loop_write"]):
                    loop_writes.append(cycle)
                if ctx.get(dut.probes["loop_read"]):
                    loop_reads.append(cycle)
            if ctx.get(dut.i_flit.valid) and ctx.get(dut.i_flit.ready):
                accepted.append(cycle)
            await ctx.tick()
            cycle += 1

    run_simulation(dut, testbench)
    return accepted, emitted, starts, word_starts, start_contexts, loop_writes, loop_reads


def stimulus(contexts, n_inferences, rng, *, back_pressure, horizon=1500):
    """(input flits, the first cycle each is offered, o_flit.ready by cycle): back to back and always ready, or
    seeded gaps and back-pressure."""
    k_first = contexts[0].registers["n_in_words"] + contexts[0].registers["n_pass"]
    inputs = [[rng.randint(-128, 127) for _ in range(LANES)] for _ in range(k_first * n_inferences)]
    if back_pressure:
        available, cycle = [], 0
        for _ in inputs:
            cycle += rng.choice([0, 0, 1, 3])
            available.append(cycle)
        ready = [rng.random() < 0.55 for _ in range(horizon)]
    else:
        available, ready = [0] * len(inputs), [True] * horizon
    return inputs, available, ready


def check_contexts(contexts, n_inferences, rng, *, back_pressure, arch=ARCH, horizon=1500):
    """Run a PE of ``contexts`` and compare data and every cycle with the golden models; returns the schedule."""
    k_first = contexts[0].registers["n_in_words"] + contexts[0].registers["n_pass"]
    inputs, available, ready = stimulus(contexts, n_inferences, rng, back_pressure=back_pressure, horizon=horizon)
    expected = []
    for s in range(n_inferences):
        stream = inputs[s * k_first:(s + 1) * k_first]
        for context in contexts:
            stream = context.output(stream)
        expected += stream
    schedule = ContextSchedule(contexts, n_inferences, available, ready, arch.result_words, arch.router_fifo_depth)
    assert len(schedule.outputs) == len(expected)
    accepted, emitted, starts, word_starts, start_contexts, loop_writes, loop_reads = simulate_pe(
        arch, contexts, inputs, available, ready, len(expected))
    assert (loop_writes, loop_reads) == (schedule.loop_writes, schedule.loop_reads), \
        "loop-back FIFO transfer cycles differ from section 4.6's rules"
    assert accepted == schedule.accepted, "input transfer cycles differ from section 4.6's rules"
    assert start_contexts == schedule.compute_contexts
    assert starts == schedule.compute, "COMPUTE start cycles differ from c_{c,s}"
    assert word_starts == schedule.words, "first issue cycles of the result words differ from a_j"
    assert [lanes for lanes, _, _ in emitted] == expected, "output words differ from the golden model"
    assert all(dest == (DEST["dest_row"], DEST["dest_col"], DEST["dest_host"]) for _, dest, _ in emitted)
    assert [t for _, _, t in emitted] == schedule.outputs, "output transfer cycles differ from section 4.6's rules"
    return schedule


#: (kind, stored words at the end of the stream, forwarded words before them, passed words, size: n_out for dense,
#: words a pixel for lane and max)
PLANS = {
    "dense-dense": (5, [("dense", 4, 1, 1, 6), ("dense", 2, 2, 0, 5)]),
    "dense-lane-max": (6, [("dense", 4, 2, 0, 7), ("lane", 2, 2, 0, 1), ("max", 3, 1, 0, 1)]),
    "lane-dense-dense": (7, [("lane", 4, 2, 1, 2), ("dense", 3, 1, 0, 3), ("dense", 1, 0, 1, 4)]),
    # COMPUTE-bound: the input side runs ahead and waits for the hand-over of every context
    "compute-bound": (3, [("dense", 2, 1, 0, 8), ("dense", 3, 0, 0, 9), ("lane", 1, 2, 0, 1)]),
}


#: (plan, back_pressure, context 0's queue words or None for a whole inference's)
PE_CASES = [(plan, back_pressure, queue_first) for plan in sorted(PLANS)
            for back_pressure, queue_first in [(False, None), (True, None), (True, 1)]]


def pe_case(plan, back_pressure, queue_first):
    """The contexts of a case and its seeded generator (positioned for :func:`stimulus`)."""
    rng = random.Random(f"{plan}-{back_pressure}-{queue_first}")
    k_first, steps = PLANS[plan]
    queued = steps[0][2] + steps[0][3]
    return build_contexts(rng, steps, k_first, queue_first or queued), rng


@pytest.mark.parametrize("plan, back_pressure, queue_first", PE_CASES)
def test_pe_contexts_match_golden(plan, back_pressure, queue_first):
    """A PE of 2 or 3 contexts (section 4.6) over 3 inferences, every output word and every cycle against the golden
    models: dense, LANE and MAX contexts whose inputs are the previous contexts' outputs through the loop-back FIFO
    (depth 2), forwarded and passed words in the per-context forward queues (context 0's of 1 word or a whole
    inference), parameter rows from unaligned param_base, a result ring of 3 words shared by the contexts."""
    contexts, rng = pe_case(plan, back_pressure, queue_first)
    check_contexts(contexts, 3, rng, back_pressure=back_pressure)


def test_pe_cases_exercise_every_rule():
    """The cases of :func:`test_pe_contexts_match_golden` (their golden schedules only) between them make each rule
    of section 4.6 decide some transfer's cycle: the queue's space, the loop-back FIFO's data and space, the ring,
    the last stored word, the drain between contexts, the router's back-pressure; turns follow each other in
    consecutive cycles on the input and the output side, and a new output turn pops its queue's head in its first
    cycle (read a cycle ahead). The hand-over never decides with two or more contexts: it is implied (the first
    input word of (c, s) comes after an output of (c, s - 1)'s turn, context c's EMITs included, for c >= 1 through
    the loop-back FIFO; for c = 0 after the turn of context C' - 1 of s - 1, fed by EMITs of a later COMPUTE);
    test_pe_one_context_in_a_contexts_arch makes it decide."""
    total = {}
    turns = [0, 0, 0]
    for case in PE_CASES:
        contexts, rng = pe_case(*case)
        _, available, ready = stimulus(contexts, 3, rng, back_pressure=case[1])
        schedule = ContextSchedule(contexts, 3, available, ready, ARCH.result_words, ARCH.router_fifo_depth)
        for rule, count in schedule.binding.items():
            total[rule] = total.get(rule, 0) + count
        turns = [turns[0] + schedule.back_to_back_inputs, turns[1] + schedule.back_to_back_outputs,
                 turns[2] + schedule.switch_pops]
    assert total.pop("hand_over") == 0
    assert all(count >= 2 for count in total.values()), total
    assert min(turns) >= 5, turns


def test_pe_one_context_in_a_contexts_arch():
    """An arch of 3 contexts running a tile of one (loop_back = 0): the PE of sections 4 to 4.5, with a parameter
    table read from param_base = 5 and a queue deep enough that the hand-over decides; the same in an arch of one
    context."""
    rng = random.Random(5)
    contexts = build_contexts(rng, [("dense", 3, 1, 2, 6)], 6, 9)
    contexts[0].registers["param_base"] = 5
    encode_config(ARCH, contexts[0].registers)
    schedule = check_contexts(contexts, 3, rng, back_pressure=False)
    assert schedule.binding["hand_over"] >= 1
    check_contexts(contexts, 3, rng, back_pressure=True)
    check_contexts(contexts, 2, rng, back_pressure=False, arch=ARCH.replace(tile_contexts=1))


# --- windowed contexts: every op, bands, channel groups, second store ranges ----------------------------------------

#: Room for windowed contexts: 1024 SRAM words, 64 parameter rows; ARCH's ring of 3 words and loop-back FIFO of 2.
WINDOW_ARCH = ARCH.replace(sram_bytes=4096, max_tile_outputs=64)


def window_contexts(rng, specs, k_first, arch=WINDOW_ARCH):
    """Contexts of one tile from ``specs``, one a context: the op's registers and its stream registers (``n_pass``,
    the store and forward ranges, ``pass_per_pixel``); ``n_in_words`` is what the previous context emits (context
    0: ``k_first`` words) less ``n_pass``. Random weights, parameter rows, zero point and pad value; SRAM regions and
    parameter rows one after another (a spec may place its rows at a later ``param_base``); every context's queue
    holds a whole inference of what it queues (section 4.6)."""
    contexts, cursor, row_cursor, incoming = [], 0, 0, k_first
    for index, spec in enumerate(specs):
        last = index == len(specs) - 1
        registers = {name: 0 for name, _, _ in CONFIG_FIELDS}
        registers.update({"clamp_lo": -128, "clamp_hi": 127, "stride": 1, "zp_out": rng.randrange(-6, 6),
                          "pad_value": rng.randrange(-20, 20), "loop_back": int(not last), "param_base": row_cursor,
                          **(DEST if last else {})})
        registers.update(spec)
        registers["n_in_words"] = incoming - registers["n_pass"]
        counts = TileConfig.from_dict(registers)
        weights = [[rng.randint(-128, 127) for _ in range(LANES)] for _ in range(counts.weight_words)]
        rows = [(rng.randint(-3000, 3000), rng.randint(1 << 29, (1 << 31) - 1), rng.randint(37, 43))
                for _ in range(registers["n_out"])]
        registers["w_base"] = cursor
        cursor += len(weights)
        registers["act_base"] = cursor
        cursor += 2 * counts.stored_words
        registers.update(queue_base=cursor if counts.queued_words else 0, queue_words=counts.queued_words)
        cursor += counts.queued_words
        row_cursor = registers["param_base"] + registers["n_out"]
        encode_config(arch, registers)        # every register rule of TileConfig.validate
        context = Context("window", registers, weights, rows)
        contexts.append(context)
        incoming = len(context.output_kinds())
    assert cursor <= arch.sram_words and row_cursor <= arch.max_tile_outputs
    return contexts


#: (words into the tile an inference, the contexts' registers, the pairs of contexts (previous, next) whose
#: COMPUTEs run back to back). Each context's band starts at another column than the one before it ends at
#: (out_col_begin differs), and the compute side runs a COMPUTE right after another context's drain
#: (test_window_plans_run_contexts_back_to_back), so that a register or counter a COMPUTE takes over from the
#: previous context's shows.
WINDOW_PLANS = {
    # the compiler's BCAST -> MAX tile: a 2x2 convolution over a densely packed 3-channel map (in_dense_offset 1),
    # a band from column 1, parameter rows from 3; then a 2x2 max pool over its results
    "bcast-dense-max": (9, [
        dict(op=OP_BCAST, in_height=3, in_width=3, words_per_pixel=1, in_channels=3, in_dense=1, in_dense_offset=1,
             kernel_h=2, kernel_w=2, pad_top=1, pad_left=1, out_rows=3, out_width=3, out_col_begin=1, group_words=1,
             n_out=4, n_pass=1, forward_begin=0, forward_end=1, store_begin=1, store_end=8, param_base=3),
        dict(op=OP_MAX, in_height=2, in_width=4, words_per_pixel=1, kernel_h=2, kernel_w=2, pad_value=-128,
             clamp_lo=-50, out_rows=1, out_width=3, out_col_end=2, n_out=4, n_pass=0, forward_begin=0, forward_end=2,
             store_begin=2, store_end=10),
    ], {(1, 0)}),
    # the compiler's MAC -> MAX tile: a 3x3 convolution band of 6 pixels from column 2, 6 outputs (a short last
    # word) in an output-channel group's interleaved order; a 2x2 max pool from column 1, parameter rows from 6
    "mac-max": (14, [
        dict(op=OP_MAC, in_height=2, in_width=4, words_per_pixel=1, kernel_h=3, kernel_w=3, pad_top=1, pad_left=1,
             out_rows=2, out_width=4, out_col_begin=2, n_out=6, n_pass=6, pass_per_pixel=1, store_begin=0,
             store_end=8),
        dict(op=OP_MAX, in_height=3, in_width=3, words_per_pixel=2, kernel_h=2, kernel_w=2, pad_value=-128,
             out_rows=2, out_width=2, out_col_begin=1, n_out=8, n_pass=0, store_begin=0, store_end=18),
    ], {(1, 0)}),
    # a LANE channel group (words 1..2 of 3) over two store ranges with a word between them, a band from column 1;
    # a BCAST from parameter row 10 that stores only the words in front of LANE's results (it passes them), so that
    # its COMPUTE follows LANE's drain within an inference; a MAX channel group over those results, likewise
    "lane-store2-bcast-max": (16, [
        dict(op=OP_LANE, in_height=2, in_width=2, words_per_pixel=3, kernel_h=2, kernel_w=2, pad_top=1, pad_left=1,
             out_rows=2, out_width=2, out_col_begin=1, group_word_begin=1, group_words=2, n_out=8, n_pass=2,
             forward_begin=0, forward_end=1, store_begin=1, store_end=6, store2_begin=7, store2_end=14),
        dict(op=OP_BCAST, in_height=1, in_width=3, words_per_pixel=1, in_channels=3, kernel_h=1, kernel_w=2,
             out_rows=1, out_width=2, group_words=2, n_out=8, n_pass=6, store_begin=0, store_end=3, param_base=10),
        dict(op=OP_MAX, in_height=1, in_width=3, words_per_pixel=2, kernel_h=1, kernel_w=2, pad_value=-128,
             out_rows=1, out_width=2, out_col_begin=1, group_word_begin=1, group_words=1, n_out=4, n_pass=4,
             forward_begin=0, forward_end=6, store_begin=0, store_end=6),
    ], {(0, 1), (1, 2)}),
}


def window_case(plan, back_pressure):
    rng = random.Random(f"window-{plan}-{back_pressure}")
    k_first, specs, _ = WINDOW_PLANS[plan]
    return window_contexts(rng, specs, k_first), rng


@pytest.mark.parametrize("back_pressure", [False, True], ids=["free", "stalled"])
@pytest.mark.parametrize("plan", sorted(WINDOW_PLANS))
def test_pe_window_contexts_match_golden(plan, back_pressure):
    """A PE of 2 or 3 windowed contexts (section 4.6 with sections 4.1 to 4.5) over 3 inferences, every output word
    and every cycle against the golden models: BCAST over a dense map, MAC bands with a short last word and the
    interleaved order of an output-channel group, MAX, LANE channel groups, a second store range, parameter rows
    from unaligned param_base. The cases run COMPUTEs of different contexts back to back: each must start its loop
    nest from its own registers (a regression: the sequencer's column counter kept the previous context's
    out_col_begin for a COMPUTE's first pixel)."""
    contexts, rng = window_case(plan, back_pressure)
    check_contexts(contexts, 3, rng, back_pressure=back_pressure, arch=WINDOW_ARCH)


def test_window_plans_run_contexts_back_to_back():
    """The golden schedules of test_pe_window_contexts_match_golden's cases (without back-pressure) begin a COMPUTE
    in the cycle after another context's last drain cycle, from each plan's listed context to the next (from the
    tile's last context to context 0 of the next inference, or within an inference), between contexts whose bands
    start at different columns."""
    for plan, (_, _, expected) in WINDOW_PLANS.items():
        contexts, rng = window_case(plan, False)
        _, available, ready = stimulus(contexts, 3, rng, back_pressure=False)
        schedule = ContextSchedule(contexts, 3, available, ready, WINDOW_ARCH.result_words,
                                   WINDOW_ARCH.router_fifo_depth)
        pairs = set(schedule.back_to_back_computes)
        assert expected <= pairs, (plan, pairs)
        for previous, context in pairs:
            assert contexts[previous].registers["out_col_begin"] != contexts[context].registers["out_col_begin"]


# --- one context: the design of before ----------------------------------------------------------------------------

#: The ports of ``Tile(lean_arch(rows=1, cols=2, lanes=4, sram_bytes=256, max_tile_outputs=12, result_ring_words=3,
#: router_fifo_depth=2))`` in its Verilog, as they were before contexts existed: (direction, width, name).
PORTS_BEFORE_CONTEXTS = sorted([
    ("input", 1, "clk"), ("input", 1, "rst"), ("input", 1, "row"), ("input", 1, "col"), ("input", 1, "run"),
    ("input", 1, "load__valid"), ("input", 89, "load__payload"),
    *((direction, width, f"{prefix}_{port}__{member}") for port in "nesw"
      for prefix, direction, ready_direction in (("i", "input", "output"), ("o", "output", "input"))
      for member, width, direction in (("valid", 1, direction), ("ready", 1, ready_direction),
                                       ("payload", 35, direction))),
])


def verilog_ports(text, module):
    body = re.search(rf"module {module}\((.*?)\);(.*?)endmodule", text, re.S).group(2)
    ports = []
    for direction, width, name in re.findall(r"^\s*(input|output)\s+(?:wire\s+|reg\s+)?(\[\d+:0\]\s*)?(\w+);",
                                             body, re.M):
        bits = int(re.match(r"\[(\d+):0\]", width).group(1)) + 1 if width else 1
        ports.append((direction, bits, name))
    return sorted(ports)


def test_one_context_tile_has_the_ports_of_before():
    """tile_contexts = 1 elaborates a Tile with exactly the Verilog ports it had before contexts (the load payload
    without a context field); 2 contexts add one load-payload bit and nothing else. The PE's sides of one context
    have no context members."""
    arch = lean_arch(rows=1, cols=2, lanes=4, sram_bytes=256, max_tile_outputs=12, result_ring_words=3, router_fifo_depth=2)
    assert verilog_ports(verilog.convert(Tile(arch), name="tile"), "tile") == PORTS_BEFORE_CONTEXTS
    two = verilog_ports(verilog.convert(Tile(arch.replace(tile_contexts=2)), name="tile"), "tile")
    assert two == sorted((d, w + (n == "load__payload"), n) for d, w, n in PORTS_BEFORE_CONTEXTS)
    for side in (InputSide(arch), ComputeSequencer(arch), OutputSide(arch)):
        assert "context" not in side.signature.members
    assert "compute_bank" in InputSide(arch).signature.members
    assert "bank_free" in InputSide(arch.replace(tile_contexts=2)).signature.members


def test_tile_of_contexts_lints_clean(tmp_path):
    """The tile module of 3 contexts passes `verilator --lint-only -Wall` with tests/test_verilog_lint.py's waivers."""
    import os
    import shutil
    import subprocess

    from flowtile.hdl.verilog import tile_verilog
    verilator = shutil.which("verilator")
    if not verilator:
        pytest.skip("verilator is not on PATH")
    waivers = ["-Wno-WIDTH", "-Wno-CASEINCOMPLETE", "-Wno-CMPCONST", "-Wno-UNSIGNED", "-Wno-PROCASSINIT",
               "-Wno-DECLFILENAME", "-Wno-UNUSEDSIGNAL"]
    path = tmp_path / "tile.v"
    path.write_text(tile_verilog(lean_arch(rows=2, cols=3, lanes=4, sram_bytes=2048, tile_contexts=3), "tile"))
    result = subprocess.run([verilator, "--lint-only", "-Wall", *waivers, "--top-module", "tile", str(path)],
                            capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-4000:]
