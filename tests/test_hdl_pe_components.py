"""Unit tests of the PE's components (hdl/pe_*.py), each against a plain golden model beside it, in the
style of Amaranth's own tests/test_lib_fifo.py: the block is driven by an async testbench with seeded
random stimulus, and the model is stepped in lockstep. The whole PE is tested in test_hdl_pe.py."""
from __future__ import annotations

import random
from collections import deque

import pytest
from amaranth.hdl import Elaboratable, Module, signed, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.memory import Memory
from amaranth.sim import Simulator

from flowtile.arch import CONFIG_FIELDS, OP_ADD, OP_CONCAT, OP_LANE, OP_MAC, OP_MAX, Arch
from flowtile.testing.archs import lean_arch
from flowtile.hdl.layouts import (LOAD_TARGET_CONFIG, LOAD_TARGET_PARAMS, LOAD_TARGET_SRAM, config_layout,
                                  load_data_bits, param_layout)
from flowtile.arch import COMPUTE_DRAIN_CYCLES
from flowtile.hdl.pe_compute import ComputeSequencer
from flowtile.hdl.pe_input import InputSide
from flowtile.hdl.pe_loader import PELoader
from flowtile.hdl.pe_output import OutputSide
from flowtile.hdl.pe_params import ParamTable
from flowtile.hdl.pe_pipeline import ComputePipeline, Requantizer
from flowtile.hdl.pe_queue import ForwardQueue
from flowtile.hdl.pe_ring import ResultRing

pytestmark = [pytest.mark.filterwarnings("ignore:.*created but never used"),
              pytest.mark.usefixtures("collect_unused_components")]

ARCH = lean_arch(rows=1, cols=2, lanes=4, sram_bytes=256, max_tile_outputs=12, result_ring_words=3, router_fifo_depth=2)
LANES = ARCH.lanes
SRAM_BITS = (ARCH.sram_words - 1).bit_length()
WORD_MASK = (1 << ARCH.flit_data_bits) - 1
FIELD_WIDTHS = {name: width for name, width, _ in CONFIG_FIELDS}
SIGNED_FIELDS = {name for name, _, is_signed in CONFIG_FIELDS if is_signed}


def simulate(dut, testbench, clocked=True):
    sim = Simulator(dut)
    if clocked:
        sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()


def as_signed(value, width):
    value &= (1 << width) - 1
    return value - (1 << width) if value >> (width - 1) else value


#: A flit's data word: ``LANES`` int8 lanes, lane ``l`` at bits ``[8l, 8l + 8)``.
WORD_LAYOUT = data.ArrayLayout(signed(8), LANES)


def lanes_of(word):
    view = WORD_LAYOUT.from_bits(word)
    return [view[lane] for lane in range(LANES)]


def word_of(values):
    return WORD_LAYOUT.const(values).as_bits()


def config_value(**fields):
    """A whole config (every register 0 unless given), as a const of config_layout()."""
    return config_layout().const({name: fields.get(name, 0) for name, _, _ in CONFIG_FIELDS})


def round_half_even_shift(value, shift):
    if shift == 0:
        return value
    quotient, remainder = divmod(value, 1 << shift)
    half = 1 << (shift - 1)
    return quotient + (remainder > half or (remainder == half and quotient & 1))


def requantize(accumulator, multiplier, shift, zero_point, low, high):
    """Section 4: clamp(round_half_even(acc * M / 2^S) + zp_out) (min(max(., low), high))."""
    return min(max(round_half_even_shift(accumulator * multiplier, shift) + zero_point, low), high)


# --- PELoader ----------------------------------------------------------------------------------------

def computes_model(c):
    """Section 4: does a tile with these registers compute (the loader's ``computes``)?"""
    end = c["out_col_end"] or c["out_width"]
    band = (c["out_col_begin"] < c["out_width"] and c["out_col_end"] <= c["out_width"]
            and (c["out_rows"] != 1 or end > c["out_col_begin"]))
    return int(bool(c["n_out"] and c["n_in_words"] and c["store_begin"] < c["store_end"] <= c["n_in_words"]
                    and c["words_per_pixel"] and c["kernel_h"] and c["kernel_w"] and c["out_rows"]
                    and c["out_width"] and band))


class LoaderModel:
    def __init__(self, arch, tile):
        self.arch, self.tile = arch, tile
        self.config = {name: 0 for name, _, _ in CONFIG_FIELDS}

    def writes(self, run, valid, tile, target, addr, value):
        """(sram en, param en) of this cycle; applies a config write (seen from the next cycle)."""
        here = valid and not run and tile == self.tile
        if here and target == LOAD_TARGET_CONFIG and addr < len(CONFIG_FIELDS):
            name, width, _ = CONFIG_FIELDS[addr]
            self.config[name] = (as_signed if name in SIGNED_FIELDS else lambda v, w: v & ((1 << w) - 1))(value, width)
        return (here and target == LOAD_TARGET_SRAM and addr < self.arch.sram_words,
                here and target == LOAD_TARGET_PARAMS and addr < self.arch.max_tile_outputs)


def test_loader_matches_model():
    rng = random.Random(1)
    dut = PELoader(ARCH, 1)
    model = LoaderModel(ARCH, 1)

    # Loads of a computing config first, then random writes, most of them to the registers ``computes``
    # reads, with small values (so that ``computes`` changes often); wide values exercise truncation.
    base = {"n_out": 1, "n_in_words": 2, "store_begin": 0, "store_end": 1, "words_per_pixel": 1, "kernel_h": 1,
            "kernel_w": 1, "out_rows": 1, "out_width": 3, "out_col_begin": 1, "out_col_end": 2}
    index = {name: index for index, (name, _, _) in enumerate(CONFIG_FIELDS)}
    stimulus = []
    for _ in range(20):
        stimulus += [(0, 1, 1, LOAD_TARGET_CONFIG, index[name], value) for name, value in base.items()]
        for _ in range(25):
            target = LOAD_TARGET_CONFIG if rng.random() < 0.5 else rng.randrange(4)
            addr = rng.choice([index[rng.choice(list(base))], rng.randrange(len(CONFIG_FIELDS) + 2),
                               rng.randrange(ARCH.sram_words + 2), 0xFFFF])
            value = rng.randrange(4) if rng.random() < 0.8 else rng.getrandbits(load_data_bits(ARCH))
            stimulus.append((rng.random() < 0.1, rng.random() < 0.9, rng.randrange(2), target, addr, value))

    async def testbench(ctx):
        for run, valid, tile, target, addr, value in stimulus:
            ctx.set(dut.run, run)
            ctx.set(dut.load.valid, valid)
            ctx.set(dut.load.payload, {"tile": tile, "target": target, "addr": addr, "data": value})
            sram_en, param_en = model.writes(run, valid, tile, target, addr, value)
            assert ctx.get(dut.sram_write.en) == sram_en and ctx.get(dut.param_write.en) == param_en
            if sram_en:
                assert ctx.get(dut.sram_write.addr) == addr
                assert ctx.get(dut.sram_write.data) == value & WORD_MASK
            if param_en:
                assert ctx.get(dut.param_write.addr) == addr
                assert ctx.get(dut.param_write.data.as_value()) == value & ((1 << param_layout().size) - 1)
            await ctx.tick()
            assert ctx.get(dut.config.as_value()) == config_value(**model.config).as_bits()
            assert ctx.get(dut.computes) == computes_model(model.config)

    simulate(dut, testbench)


# --- ParamTable ----------------------------------------------------------------------------------------

def random_row(rng):
    return {"bias": rng.randrange(-1 << 31, 1 << 31), "multiplier": rng.getrandbits(31), "shift": rng.randrange(64)}


@pytest.mark.parametrize("rows, lanes", [(12, 4), (5, 2), (3, 1)])
def test_param_table_matches_model(rows, lanes):
    rng = random.Random(rows * 10 + lanes)
    dut = ParamTable(rows, lanes)
    zero = {"bias": 0, "multiplier": 0, "shift": 0}
    table = [zero] * rows                        # the model: rows, banking invisible
    reads = data.ArrayLayout(param_layout(), lanes)

    def bank_word(address):
        return reads.const([table[address * lanes + lane] if address * lanes + lane < rows else zero
                            for lane in range(lanes)]).as_bits()

    async def testbench(ctx):
        expected = 0
        for _ in range(200):
            write, row, entry = rng.random() < 0.5, rng.randrange(rows), random_row(rng)
            read_en, address = rng.random() < 0.8, rng.randrange(dut.bank_depth)
            ctx.set(dut.write.en, write)
            ctx.set(dut.write.addr, row)
            ctx.set(dut.write.data, param_layout().const(entry))
            ctx.set(dut.read.en, read_en)
            ctx.set(dut.read.addr, address)
            if read_en:                          # not transparent: the read sees the row before this write
                expected = bank_word(address)
            if write:
                table[row] = entry
            await ctx.tick()
            assert ctx.get(dut.read.data.as_value()) == expected

    simulate(dut, testbench)


# --- ResultRing -----------------------------------------------------------------------------------------

class RingModel:
    def __init__(self, depth):
        self.depth, self.slots = depth, [0] * depth
        self.occupancy = self.written = self.read_slot = 0

    def step(self, write_lanes, write_slot, write_word, issued, completed, sent, clear):
        for lane in range(LANES):
            if write_lanes >> lane & 1:
                mask = 0xFF << (8 * lane)
                self.slots[write_slot] = self.slots[write_slot] & ~mask | write_word & mask
        self.occupancy += issued - sent
        self.written += completed - sent
        self.read_slot = (self.read_slot + sent) % self.depth
        if clear:
            self.occupancy = self.written = self.read_slot = 0


@pytest.mark.parametrize("depth", [1, 3, 4])
def test_result_ring_matches_model(depth):
    rng = random.Random(depth)
    dut = ResultRing(depth, LANES)
    model = RingModel(depth)

    async def testbench(ctx):
        for _ in range(300):
            free, valid = model.occupancy < depth, model.written != 0
            assert ctx.get(dut.free) == free and ctx.get(dut.words.valid) == valid
            if valid:
                assert ctx.get(dut.words.payload) == model.slots[model.read_slot]
            # A well-behaved writer: a word issued only into a free slot, completed only once issued.
            issued = free and rng.random() < 0.5
            completed = model.written < model.occupancy and rng.random() < 0.5
            ready = rng.random() < 0.6
            write_lanes, write_slot, write_word = rng.getrandbits(LANES), rng.randrange(depth), rng.getrandbits(32)
            clear = rng.random() < 0.03
            for port, value in ((dut.word_issued, issued), (dut.word_written, completed), (dut.words.ready, ready),
                                (dut.write.en, write_lanes), (dut.write.addr, write_slot),
                                (dut.write.data, write_word), (dut.clear, clear)):
                ctx.set(port, value)
            # words.valid never depends on words.ready.
            assert ctx.get(dut.words.valid) == valid
            model.step(write_lanes, write_slot, write_word, issued, completed, valid and ready, clear)
            await ctx.tick()

    simulate(dut, testbench)


# --- ForwardQueue ----------------------------------------------------------------------------------------

class QueueModel:
    """Section 4's forward queue, plainly: a FIFO of F words (a deque), pushable iff it holds fewer than F words
    (before this cycle's pop), poppable iff it holds a word pushed in an earlier cycle; emptied by run = 0. The
    items are whatever the testbench pushes (here (word, push cycle))."""

    def __init__(self, depth):
        self.depth, self.words = depth, deque()

    def ready(self, run):
        return bool(run) and len(self.words) < self.depth

    def valid(self, run):
        return bool(run) and len(self.words) > 0

    def step(self, run, pushed, popped):
        """Apply one cycle: ``pushed`` the item pushed (or None), ``popped`` whether the head left."""
        if popped:
            self.words.popleft()
        if pushed is not None:
            self.words.append(pushed)
        if not run:
            self.words.clear()


class QueueBench(Elaboratable):
    """A :class:`ForwardQueue` beside a real SRAM, wired as the PE wires them: write port 0 another writer's (the
    testbench drives ``other_write``; in the PE the loader or input side), write port 1 the queue's, and a read
    port transparent for the queue's write port."""

    def __init__(self, arch):
        self.queue = ForwardQueue(arch)
        self.sram = Memory(shape=unsigned(arch.flit_data_bits), depth=arch.sram_words, init=[])
        self.other_write = self.sram.write_port()

    def elaborate(self, platform):
        m = Module()
        m.submodules.queue, m.submodules.sram = self.queue, self.sram
        queue_write = self.sram.write_port()
        wiring.connect(m, self.queue.sram_write, queue_write)
        wiring.connect(m, self.queue.sram_read, self.sram.read_port(transparent_for=(queue_write,)))
        return m


#: queue_base of the first half of every queue test (the second puts the region at the top of the SRAM).
QUEUE_BASE = 37


@pytest.mark.parametrize("depth", [1, 2, 3, 5, 8])
def test_forward_queue_matches_a_fifo_of_queue_words(depth):
    """The forward queue against a plain FIFO of F = queue_words words, cycle by cycle under seeded random pushes
    and pops, in phases that mostly push (the queue fills: a full queue refuses a push also in a cycle it is
    popped), mostly pop (it empties: a word pushed into an empty queue leaves one cycle later, through the SRAM
    read port's transparency) or both; run = 0 now and then, also with words held (they are gone afterwards).
    Every cycle: w_stream.ready, r_stream.valid (neither depending on r_stream.ready), the payload whenever valid,
    the SRAM write (push i of a run in word queue_base + i mod F) and the read address (inside the region). Another
    write port writes random words outside the region every cycle: the queue must not depend on them. The region
    is at queue_base = 37 first, then (moved while run = 0) at the SRAM's top."""
    rng = random.Random(f"forward-queue-{depth}")
    dut = QueueBench(ARCH)
    queue = dut.queue
    bases = (QUEUE_BASE, ARCH.sram_words - depth)
    seen = {"full_refused": 0, "full_popped": 0, "next_cycle_pops": 0, "cleared": 0, "wraps": 0, "pops": 0}

    async def testbench(ctx):
        for base in bases:
            ctx.set(queue.config, config_value(queue_base=base, queue_words=depth))
            ctx.set(queue.run, 0)
            await ctx.tick()
            model, pushes = QueueModel(depth), 0           # pushes since run rose: the next one's index
            push_chance = pop_chance = 0.5
            for cycle in range(500):
                if cycle % 40 == 0:
                    push_chance, pop_chance = rng.choice([(0.9, 0.2), (0.2, 0.9), (0.6, 0.6), (1.0, 1.0)])
                run = rng.random() >= 0.02
                valid, ready, word = rng.random() < push_chance, rng.random() < pop_chance, rng.getrandbits(32)
                other = rng.choice([a for a in range(ARCH.sram_words) if not base <= a < base + depth])
                for port, value in ((queue.run, run), (queue.w_stream.valid, valid), (queue.w_stream.payload, word),
                                    (queue.r_stream.ready, ready), (dut.other_write.en, 1),
                                    (dut.other_write.addr, other), (dut.other_write.data, rng.getrandbits(32))):
                    ctx.set(port, value)
                push_ready, pop_valid = model.ready(run), model.valid(run)
                assert ctx.get(queue.w_stream.ready) == push_ready, (base, cycle)
                assert ctx.get(queue.r_stream.valid) == pop_valid, (base, cycle)
                if pop_valid:
                    assert ctx.get(queue.r_stream.payload) == model.words[0][0], (base, cycle)
                # Neither r_stream.valid nor w_stream.ready depends on r_stream.ready.
                ctx.set(queue.r_stream.ready, not ready)
                assert (ctx.get(queue.r_stream.valid), ctx.get(queue.w_stream.ready)) == (pop_valid, push_ready)
                ctx.set(queue.r_stream.ready, ready)
                pushed = word if valid and push_ready else None
                popped = pop_valid and ready
                assert ctx.get(queue.sram_write.en) == (pushed is not None)
                if pushed is not None:
                    assert ctx.get(queue.sram_write.addr) == base + pushes % depth
                    assert ctx.get(queue.sram_write.data) == word
                assert base <= ctx.get(queue.sram_read.addr) < base + depth
                full = len(model.words) == depth
                seen["full_refused"] += run and full and valid
                seen["full_popped"] += run and full and valid and popped
                seen["next_cycle_pops"] += popped and model.words[0][1] == cycle - 1
                seen["cleared"] += not run and bool(model.words)
                seen["wraps"] += pushed is not None and pushes % depth == depth - 1
                seen["pops"] += popped
                pushes = 0 if not run else pushes + (pushed is not None)
                model.step(run, pushed if pushed is None else (pushed, cycle), popped)
                await ctx.tick()

    simulate(dut, testbench)
    assert seen["pops"] > 200 and seen["wraps"] >= 20 and seen["cleared"] >= 2
    assert seen["full_refused"] >= 20 and seen["full_popped"] >= 5 and seen["next_cycle_pops"] >= 20, seen


# --- InputSide -------------------------------------------------------------------------------------------

class InputModel:
    """Section 4's input side: K RECV then P PASS transfers an inference; stores and pushes by range."""

    def __init__(self, c):
        self.c, self.index, self.bank = c, 0, 0

    def cycle(self, run, computes, valid, forward_ready, compute_bank, compute_begun):
        c, k = self.c, self.index
        total = c["n_in_words"] + c["n_pass"]
        receiving = k < c["n_in_words"]
        first = c["store_begin"] <= k < c["store_end"]
        second = c["store2_begin"] <= k < c["store2_end"]
        stores = receiving and (first or second)
        pushes = not receiving or c["forward_begin"] <= k < c["forward_end"]
        may_begin = not computes or k != 0 or (compute_bank ^ compute_begun) == self.bank
        accepting = run and total != 0 and may_begin
        ready = accepting and (not pushes or forward_ready)
        transfer = valid and ready
        # Section 4.2: the stored words are the first range's, then the second's; B counts both.
        first_words = max(c["store_end"] - c["store_begin"], 0)
        stored_index = k - c["store_begin"] if first else first_words + k - c["store2_begin"]
        store_until = c["store2_end"] if c["store2_end"] > c["store2_begin"] else c["store_end"]
        out = {"ready": ready, "push": valid and accepting and pushes, "store": transfer and stores,
               "address": (c["act_base"] + self.bank * stored_words(c) + stored_index) % ARCH.sram_words,
               "store_done": transfer and stores and k + 1 == store_until}
        if transfer:
            self.index, self.bank = (0, self.bank ^ 1) if k == total - 1 else (k + 1, self.bank)
        if not run:
            self.index = self.bank = 0
        return out


def stored_words(c):
    """``B`` (section 4.2): the words of both store ranges, each difference 0 if negative."""
    return max(c["store_end"] - c["store_begin"], 0) + max(c["store2_end"] - c["store2_begin"], 0)


def second_store_range(rng, store_end, k, chance=0.5):
    """``store2_begin``, ``store2_end``: a non-empty range in ``[store_end, k)`` with probability ``chance`` (if
    there is room), else none (0, 0)."""
    if store_end >= k or rng.random() >= chance:
        return {"store2_begin": 0, "store2_end": 0}
    begin = rng.randrange(store_end, k)
    return {"store2_begin": begin, "store2_end": rng.randrange(begin + 1, k + 1)}


def random_stream_registers(rng):
    k = rng.randrange(0, 8)
    begin = rng.randrange(k + 1)
    forward_begin = rng.randrange(k + 1)
    end = rng.randrange(begin, k + 1)
    return {"n_in_words": k, "n_pass": rng.randrange(4), "store_begin": begin, "store_end": end,
            "forward_begin": forward_begin, "forward_end": rng.randrange(forward_begin, k + 1),
            "act_base": rng.randrange(40), **second_store_range(rng, end, k)}


def test_input_side_matches_model():
    rng = random.Random(3)
    dut = InputSide(ARCH)

    async def testbench(ctx):
        for _ in range(24):
            registers = random_stream_registers(rng)
            ctx.set(dut.config, config_value(**registers))
            model = InputModel(registers)
            ctx.set(dut.run, 0)
            await ctx.tick()
            model.cycle(0, 0, 0, 0, 0, 0)
            computes = rng.randrange(2)
            for _ in range(40):
                run = rng.random() < 0.97
                valid, forward_ready = rng.random() < 0.7, rng.random() < 0.6
                compute_bank, compute_begun, flit = rng.randrange(2), rng.randrange(2), rng.getrandbits(32)
                for port, value in ((dut.run, run), (dut.computes, computes), (dut.i_flit.valid, valid),
                                    (dut.o_forward.ready, forward_ready), (dut.compute_bank, compute_bank),
                                    (dut.compute_begun, compute_begun)):
                    ctx.set(port, value)
                ctx.set(dut.i_flit.payload, {"data": flit})
                expected = model.cycle(run, computes, valid, forward_ready, compute_bank, compute_begun)
                assert ctx.get(dut.i_flit.ready) == expected["ready"]
                assert ctx.get(dut.o_forward.valid) == expected["push"]
                assert ctx.get(dut.sram_write.en) == expected["store"]
                assert ctx.get(dut.store_done) == expected["store_done"]
                if expected["push"]:
                    assert ctx.get(dut.o_forward.payload) == flit
                if expected["store"]:
                    assert (ctx.get(dut.sram_write.addr), ctx.get(dut.sram_write.data)) == (expected["address"], flit)
                # o_forward.valid never depends on o_forward.ready.
                ctx.set(dut.o_forward.ready, not forward_ready)
                assert ctx.get(dut.o_forward.valid) == expected["push"]
                ctx.set(dut.o_forward.ready, forward_ready)
                await ctx.tick()

    simulate(dut, testbench)


# --- OutputSide ------------------------------------------------------------------------------------------

GROUPED_OPS = (OP_MAX, OP_LANE, OP_ADD)


def group_words(c):
    """``N_g`` (section 4.4): the channel words a pixel of the group MAX, LANE and ADD compute (``group_words``, or
    ``words_per_pixel`` if 0); ``words_per_pixel`` for MAC and CONCAT, which ignore the group registers."""
    return (c["group_words"] or c["words_per_pixel"]) if c["op"] in GROUPED_OPS else c["words_per_pixel"]


def group_first_word(c):
    """The first channel word of the group (``group_word_begin`` for MAX, LANE and ADD, else 0)."""
    return c["group_word_begin"] if c["op"] in GROUPED_OPS else 0


def output_order(c, computes):
    """Section 4.4's transfers of one inference: "pop" (forward queue) and "emit" (result ring)."""
    popped = max(c["forward_end"] - c["forward_begin"], 0) + c["n_pass"]
    if not computes:
        return ["pop"] * popped
    end = c["out_col_end"] or c["out_width"]
    n_pix = c["out_rows"] * c["out_width"] - c["out_col_begin"] - (c["out_width"] - end)
    n_out = c["n_out"]
    per_pixel = group_words(c) if c["op"] != OP_MAC else -(-n_out // LANES)
    pops = c["pass_per_pixel"] if c["pass_per_pixel"] and n_pix * c["pass_per_pixel"] <= c["n_pass"] else 0
    return ["pop"] * (popped - n_pix * pops) + (["pop"] * pops + ["emit"] * per_pixel) * n_pix


def random_output_registers(rng):
    out_rows, out_width = rng.randrange(1, 3), rng.randrange(1, 4)
    begin = rng.randrange(out_width)
    end = rng.choice([0] + list(range(begin + 1 if out_rows == 1 else 1, out_width + 1)))
    forward_begin = rng.randrange(4)
    return {"op": rng.choice([OP_MAC, OP_MAX, OP_LANE, OP_ADD, OP_CONCAT]), "n_out": rng.randrange(1, 10),
            "words_per_pixel": rng.randrange(1, 3), "forward_begin": forward_begin,
            "forward_end": rng.randrange(forward_begin, 6), "n_pass": rng.randrange(8), "out_rows": out_rows,
            "out_width": out_width, "out_col_begin": begin, "out_col_end": end,
            "pass_per_pixel": rng.choice([0, 1, 2]), "dest_row": 0, "dest_col": rng.randrange(2),
            "dest_host": rng.randrange(2), "group_word_begin": rng.randrange(3), "group_words": rng.choice([0, 1, 3])}


def test_output_side_matches_model():
    rng = random.Random(4)
    dut = OutputSide(ARCH)

    async def testbench(ctx):
        for case in range(24):
            registers, computes = random_output_registers(rng), case % 3 != 0
            order = output_order(registers, computes)
            ctx.set(dut.config, config_value(**registers))
            ctx.set(dut.computes, computes)
            ctx.set(dut.run, 0)
            await ctx.tick()
            position, sent = 0, []
            for _ in range(100):
                run = rng.random() < 0.98
                queue_valid, results_valid, ready = (rng.random() < 0.8 for _ in range(3))
                queue_word, result_word = rng.getrandbits(32), rng.getrandbits(32)
                for port, value in ((dut.run, run), (dut.i_queue.valid, queue_valid),
                                    (dut.i_queue.payload, queue_word), (dut.i_results.valid, results_valid),
                                    (dut.i_results.payload, result_word), (dut.o_flit.ready, ready)):
                    ctx.set(port, value)
                head = order[position % len(order)] if order else None
                valid = bool(run and head and (results_valid if head == "emit" else queue_valid))
                assert ctx.get(dut.o_flit.valid) == valid
                assert ctx.get(dut.i_queue.ready) == (run and head == "pop" and ready)
                assert ctx.get(dut.i_results.ready) == (run and head == "emit" and ready)
                # o_flit.valid never depends on o_flit.ready.
                ctx.set(dut.o_flit.ready, not ready)
                assert ctx.get(dut.o_flit.valid) == valid
                ctx.set(dut.o_flit.ready, ready)
                if valid:
                    payload = ctx.get(dut.o_flit.payload)
                    assert int(payload.data) == (result_word if head == "emit" else queue_word)
                    assert (payload.dest_col, payload.dest_host) == (registers["dest_col"], registers["dest_host"])
                if valid and ready:
                    position += 1
                    sent.append(head)
                if not run:
                    position = 0
                await ctx.tick()

    simulate(dut, testbench)


# --- Rows interleaved (section 4 "Streaming rows") --------------------------------------------------------

def random_interleaved_registers(rng):
    """Registers of a windowed tile with rows interleaved (``interleave_rows = 1``): a map of 1..5 rows, a window of
    1..3 rows, stride 1..3, top and bottom padding, the band the whole output; a third of the draws forward nothing,
    a third pass nothing (or None when the window's last output row would not read the map's last row)."""
    height, kernel, stride = rng.randrange(1, 6), rng.randrange(1, 4), rng.randrange(1, 4)
    pad_top, pad_bottom = rng.randrange(kernel), rng.randrange(kernel)
    out_rows = (height + pad_top + pad_bottom - kernel) // stride + 1
    if out_rows < 1 or min(height - 1, (out_rows - 1) * stride - pad_top + kernel - 1) != height - 1:
        return None
    width, per_pixel, out_width = rng.randrange(1, 3), rng.randrange(1, 3), rng.randrange(1, 3)
    words = height * width * per_pixel
    pass_per_pixel = rng.choice([0, 1, 2])
    forwards = rng.random() < 2 / 3
    return {"op": OP_MAX, "n_out": LANES * per_pixel, "words_per_pixel": per_pixel, "in_height": height,
            "in_width": width, "kernel_h": kernel, "kernel_w": 1, "stride": stride, "pad_top": pad_top,
            "out_rows": out_rows, "out_width": out_width, "n_in_words": words, "store_end": words,
            "forward_end": words if forwards else 0, "n_pass": out_rows * out_width * pass_per_pixel,
            "pass_per_pixel": pass_per_pixel, "stream_rows": 128, "interleave_rows": 1, "dest_col": rng.randrange(2)}


def interleaved_orders(c):
    """Both sides' transfers of one inference with rows interleaved, from the registers: input ("recv" or
    "pass") and output ("pop" or "emit"). After each input row come the pixels of the output rows whose windows end
    in it (their last row: top + kernel_h - 1, clamped to the map)."""
    row = c["in_width"] * c["words_per_pixel"]
    ending = [0] * c["in_height"]
    for r in range(c["out_rows"]):
        ending[min(c["in_height"] - 1, r * c["stride"] - c["pad_top"] + c["kernel_h"] - 1)] += 1
    inputs, outputs = [], []
    for rows in ending:
        inputs += ["recv"] * row + ["pass"] * (rows * c["out_width"] * c["pass_per_pixel"])
        outputs += ["pop"] * (row if c["forward_end"] else 0)
        outputs += (["pop"] * c["pass_per_pixel"] + ["emit"] * c["words_per_pixel"]) * (rows * c["out_width"])
    return inputs, outputs


def test_sides_interleave_rows():
    """The input and output sides with ``interleave_rows = 1`` against :func:`interleaved_orders`, under random
    valid/ready; a pushing transfer is a forwarded RECV or a PASS, a store every RECV."""
    rng = random.Random(14)
    inputs, outputs = InputSide(ARCH), OutputSide(ARCH)
    seen = {"pass": 0, "pop": 0, "emit": 0}

    async def testbench(ctx):
        drawn = 0
        while drawn < 30:
            registers = random_interleaved_registers(rng)
            if registers is None:
                continue
            drawn += 1
            in_order, out_order = interleaved_orders(registers)
            for dut in (inputs, outputs):
                ctx.set(dut.config, config_value(**registers))
                ctx.set(dut.computes, 1)
                ctx.set(dut.run, 0)
            await ctx.tick()
            in_at = out_at = 0
            for _ in range(3 * (len(in_order) + len(out_order))):
                valid, forward_ready = rng.random() < 0.8, rng.random() < 0.8
                queue_valid, results_valid, ready = (rng.random() < 0.8 for _ in range(3))
                for port, value in ((inputs.run, 1), (inputs.i_flit.valid, valid),
                                    (inputs.o_forward.ready, forward_ready), (outputs.run, 1),
                                    (outputs.i_queue.valid, queue_valid), (outputs.i_results.valid, results_valid),
                                    (outputs.o_flit.ready, ready)):
                    ctx.set(port, value)
                kind = in_order[in_at % len(in_order)]
                pushes = kind == "pass" or bool(registers["forward_end"])
                assert ctx.get(inputs.i_flit.ready) == (not pushes or forward_ready)
                assert ctx.get(inputs.o_forward.valid) == (valid and pushes)
                assert ctx.get(inputs.sram_write.en) == (valid and kind == "recv" and (not pushes or forward_ready))
                head = out_order[out_at % len(out_order)]
                assert ctx.get(outputs.i_queue.ready) == (head == "pop" and ready)
                assert ctx.get(outputs.i_results.ready) == (head == "emit" and ready)
                if valid and (not pushes or forward_ready):
                    in_at += 1
                    seen["pass"] += kind == "pass"
                if ready and (queue_valid if head == "pop" else results_valid):
                    out_at += 1
                    seen[head] += 1
                await ctx.tick()

    simulate(wiring_pair(inputs, outputs), testbench)
    assert min(seen.values()) > 100, seen


class wiring_pair(Elaboratable):
    """Two components simulated side by side, unconnected."""

    def __init__(self, *parts):
        self.parts = parts

    def elaborate(self, platform):
        m = Module()
        for index, part in enumerate(self.parts):
            m.submodules[f"part{index}"] = part
        return m


# --- Requantizer -----------------------------------------------------------------------------------------

def test_requantizer_matches_section_4():
    rng = random.Random(5)
    dut = Requantizer()

    async def testbench(ctx):
        for case in range(600):
            shift = rng.randrange(1, 63) if case % 50 else 0
            multiplier = rng.getrandbits(31) if case % 3 else 1 << rng.randrange(31)
            accumulator = rng.randrange(-1 << 31, 1 << 31)
            if case % 4 == 0 and shift:             # an exact tie: acc * M = (2q + 1) * 2^(shift - 1)
                shift, multiplier = rng.randrange(1, 31), 1
                accumulator = (2 * rng.randrange(-(1 << (30 - shift)), 1 << (30 - shift)) + 1) << (shift - 1)
            low, high = sorted((rng.randrange(-128, 128), rng.randrange(-128, 128)))
            zero_point = rng.randrange(-256, 256)
            for port, value in ((dut.accumulator, accumulator), (dut.multiplier, multiplier), (dut.shift, shift),
                                (dut.zero_point, zero_point), (dut.clamp_lo, low), (dut.clamp_hi, high)):
                ctx.set(port, value)
            assert ctx.get(dut.result) == requantize(accumulator, multiplier, shift, zero_point, low, high), case

    simulate(dut, testbench, clocked=False)


# --- ComputeSequencer ------------------------------------------------------------------------------------

def band_positions(c):
    end = c["out_col_end"] or c["out_width"]
    for row in range(c["out_rows"]):
        first = c["out_col_begin"] if row == 0 else 0
        last = end if row == c["out_rows"] - 1 else c["out_width"]
        for col in range(first, last):
            yield row, col


def issue_list(c, bank):
    """Section 4.1's issues of one COMPUTE reading bank ``bank``: (word_first, payload fields) in order.
    ``activation_addr`` is None for a padded position (its address is not part of the contract). MAX, LANE and
    ADD issue the N_g words of their channel group (section 4.4), reading channel word group_word_begin + cw."""
    op, cw_words, loop_words = c["op"], c["words_per_pixel"], group_words(c)
    per_word, lane_wise = op != OP_MAC, op in (OP_LANE, OP_ADD, OP_CONCAT)
    bank_words = stored_words(c)
    issues, slot = [], 0
    for row, col in band_positions(c):
        if per_word:
            nest = [(0, cw, ky, kx) for cw in range(loop_words) for ky in range(c["kernel_h"])
                    for kx in range(c["kernel_w"])]
        else:
            nest = [(o, cw, ky, kx) for o in range(c["n_out"]) for ky in range(c["kernel_h"])
                    for kx in range(c["kernel_w"]) for cw in range(cw_words)]
        for index, (o, cw, ky, kx) in enumerate(nest):
            first = kx == 0 and ky == 0 and (per_word or cw == 0)
            last = kx == c["kernel_w"] - 1 and ky == c["kernel_h"] - 1 and (per_word or cw == cw_words - 1)
            lane = o % LANES
            word_first = first and (per_word or lane == 0)
            word_last = last and (per_word or lane == LANES - 1 or o == c["n_out"] - 1)
            y = (c["out_row_begin"] + row) * c["stride"] + ky
            x = col * c["stride"] + (0 if op == OP_ADD else kx)
            padded = not (c["pad_top"] <= y < c["pad_top"] + c["in_height"]
                          and c["pad_left"] <= x < c["pad_left"] + c["in_width"])
            operand_b = (op == OP_ADD and kx != 0) or (op == OP_CONCAT and cw >= c["concat_words_a"])
            offset = (c["operand_b_offset"] if operand_b else c["operand_a_offset"]) if op in (OP_ADD, OP_CONCAT) else 0
            pitch = ((cw_words - c["concat_words_a"] if operand_b else c["concat_words_a"]) if op == OP_CONCAT
                     else cw_words)
            word = cw - c["concat_words_a"] if op == OP_CONCAT and operand_b else group_first_word(c) + cw
            pixel = (y - c["pad_top"]) * c["in_width"] + x - c["pad_left"]
            address = (c["act_base"] + bank * bank_words + offset + pixel * pitch + word) % ARCH.sram_words
            issues.append((word_first, {
                "weight_addr": (c["w_base"] + index) % ARCH.sram_words,
                "activation_addr": None if padded else address,
                "param_addr": cw if lane_wise else o // LANES, "first": int(first), "last": int(last),
                "word_last": int(word_last), "padded": int(padded), "operand_b": int(operand_b), "lane": lane}))
    return issues


def random_window_registers(rng, op):
    """A window layer of op ``op`` whose band lies inside the output map (some positions padded, most not)."""
    cw_words = rng.randrange(2, 4) if op == OP_CONCAT else rng.randrange(1, 3)
    kernel_h, kernel_w = {OP_ADD: (1, 2), OP_CONCAT: (1, 1)}.get(op, (rng.randrange(1, 3), rng.randrange(1, 3)))
    two_operands = op in (OP_ADD, OP_CONCAT)
    stride, pad_top, pad_left = (1, 0, 0) if two_operands else (rng.randrange(1, 3), rng.randrange(2), rng.randrange(2))
    height, width = rng.randrange(2, 5), rng.randrange(2, 5)
    map_height = (height + 2 * pad_top - kernel_h) // stride + 1
    map_width = width if op == OP_ADD else (width + 2 * pad_left - kernel_w) // stride + 1
    row_begin = rng.randrange(map_height)
    out_rows, out_width = rng.randrange(1, map_height - row_begin + 1), map_width
    begin = rng.randrange(out_width)
    k = rng.randrange(2, 8)
    store_begin = rng.randrange(k)
    # Often short of k, leaving room for a second store range (section 4.2), which moves bank 1.
    store_end = rng.randrange(store_begin + 1, k + 1 if rng.random() < 0.4 else max(store_begin + 2, k))
    return {"op": op, "n_in_words": k, "store_begin": store_begin, "store_end": store_end,
            **second_store_range(rng, store_end, k, chance=0.8),
            "n_out": rng.randrange(1, 7), "in_height": height, "in_width": width, "words_per_pixel": cw_words,
            "kernel_h": kernel_h, "kernel_w": kernel_w, "stride": stride, "pad_top": pad_top, "pad_left": pad_left,
            "out_row_begin": row_begin, "out_rows": out_rows, "out_width": out_width, "out_col_begin": begin,
            "out_col_end": rng.choice([0, rng.randrange(begin + 1 if out_rows == 1 else 1, out_width + 1)]),
            "w_base": rng.randrange(20), "act_base": rng.randrange(20), "operand_a_offset": rng.randrange(6),
            "operand_b_offset": rng.randrange(6),
            "concat_words_a": rng.randrange(1, cw_words) if op == OP_CONCAT else 0,
            # Section 4.4's channel group (MAX, LANE, ADD; MAC and CONCAT must ignore the registers).
            "group_word_begin": rng.randrange(3), "group_words": rng.choice([0, 1, 2])}


def test_compute_sequencer_matches_section_4_1():
    rng = random.Random(6)
    dut = ComputeSequencer(ARCH)

    async def testbench(ctx):
        for case in range(20):
            registers = random_window_registers(rng, [OP_MAC, OP_MAX, OP_LANE, OP_ADD, OP_CONCAT][case % 5])
            ctx.set(dut.config, config_value(**registers))
            ctx.set(dut.computes, 1)
            ctx.set(dut.run, 0)
            await ctx.tick()
            ctx.set(dut.run, 1)
            computing = stored = bank = issued = drain = slot = 0
            issues, starts = [], 0
            for cycle in range(600):
                store_done, ring_free = rng.random() < 0.05, rng.random() < 0.8
                ctx.set(dut.store_done, store_done)
                ctx.set(dut.ring_free, ring_free)
                start = stored and not computing and ring_free
                in_compute = computing or start
                if start:
                    issues, issued, starts = issue_list(registers, bank), 0, starts + 1
                assert ctx.get(dut.compute_start) == start and ctx.get(dut.in_compute) == in_compute
                assert ctx.get(dut.compute_bank) == bank and ctx.get(dut.compute_begun) == in_compute
                valid = in_compute and issued < len(issues) and (ring_free or not issues[issued][0])
                assert ctx.get(dut.issue.valid) == valid
                assert ctx.get(dut.word_issued) == (valid and issues[issued][0])
                ends = False
                if valid:
                    expected = dict(issues[issued][1], slot=slot)
                    payload = ctx.get(dut.issue.payload)
                    got = {name: int(getattr(payload, name)) for name in expected}
                    if expected["activation_addr"] is None:
                        got["activation_addr"] = None
                    assert got == expected, (registers, cycle, issued)
                    slot = (slot + expected["word_last"]) % ARCH.result_words
                    issued += 1
                elif in_compute and issued == len(issues):
                    drain += 1
                    ends = drain == COMPUTE_DRAIN_CYCLES
                if start:
                    computing, stored = 1, 0
                stored = stored or store_done
                if ends:
                    computing, bank, drain = 0, bank ^ 1, 0
                await ctx.tick()
            assert starts >= 2

    simulate(dut, testbench)


# --- ComputePipeline ------------------------------------------------------------------------------------

class PipelineModel:
    """Stages 1 and 2 of section 4's compute side, fed with the read data the testbench plays."""

    def __init__(self, c):
        self.c = c
        self.stage1 = self.stage2 = None        # issue payloads (dicts) with their valid bit
        self.accumulators, self.window_max = [0] * LANES, [0] * LANES
        self.multipliers, self.shifts = [0] * LANES, [0] * LANES

    def write(self, enable):
        """(en lanes, slot, word) of this cycle's ring write."""
        c, stage2 = self.c, self.stage2
        if not (stage2 and stage2["valid"] and enable):
            return 0, None, None
        clamp = lambda value: min(max(value, c["clamp_lo"]), c["clamp_hi"])  # noqa: E731
        results = [requantize(acc, m, s, c["zp_out"], c["clamp_lo"], c["clamp_hi"])
                   for acc, m, s in zip(self.accumulators, self.multipliers, self.shifts)]
        if c["op"] == OP_MAX:
            return 0xF, stage2["slot"], word_of([clamp(value) for value in self.window_max])
        if c["op"] != OP_MAC:
            return 0xF, stage2["slot"], word_of(results)
        if stage2["lane"] == 0:
            return 0xF, stage2["slot"], results[0] & 0xFF
        return 1 << stage2["lane"], stage2["slot"], word_of([results[0]] * LANES)

    def step(self, issue, weight, activation, rows, clear):
        c, stage1 = self.c, self.stage1
        lane_wise = c["op"] in (OP_LANE, OP_ADD, OP_CONCAT)
        if stage1:
            lane_rows = [rows[0] if lane_wise else rows[stage1["lane"]]] + rows[1:]
            if stage1["valid"]:
                acts = [c["pad_value"]] * LANES if stage1["padded"] else lanes_of(activation)
                if c["op"] == OP_MAX:
                    self.window_max = [a if stage1["first"] or a > m else m for a, m in zip(acts, self.window_max)]
                else:
                    if c["op"] in (OP_ADD, OP_CONCAT):
                        factors = [c["add_mult_b"] if stage1["operand_b"] else c["add_mult_a"]] * LANES
                    else:
                        factors = lanes_of(weight)
                    products = [f * a for f, a in zip(factors, acts)]
                    addends = products if lane_wise else [sum(products)] + products[1:]
                    self.accumulators = [as_signed((row["bias"] if stage1["first"] else acc) + addend, 32)
                                         for acc, addend, row in zip(self.accumulators, addends, lane_rows)]
            self.multipliers = [row["multiplier"] for row in lane_rows]
            self.shifts = [row["shift"] for row in lane_rows]
            self.stage2 = dict(stage1, valid=stage1["valid"] and stage1["last"])
        self.stage1 = issue
        if clear:
            self.stage1 = self.stage1 and dict(self.stage1, valid=0)
            self.stage2 = self.stage2 and dict(self.stage2, valid=0)


@pytest.mark.parametrize("op", [OP_MAC, OP_MAX, OP_LANE, OP_ADD, OP_CONCAT])
def test_compute_pipeline_matches_model(op):
    rng = random.Random(op)
    dut = ComputePipeline(ARCH)
    registers = {"op": op, "pad_value": rng.randrange(-128, 128), "add_mult_a": rng.getrandbits(23),
                 "add_mult_b": rng.getrandbits(23), "zp_out": rng.randrange(-20, 20), "clamp_lo": rng.randrange(-128, 0),
                 "clamp_hi": rng.randrange(0, 128)}
    model = PipelineModel(registers)

    async def testbench(ctx):
        ctx.set(dut.config, config_value(**registers))
        left = 0                                  # issues left in the current output value
        # The read data present in this cycle: the memories answer the previous cycle's addresses.
        weight = activation = 0
        rows = [{"bias": 0, "multiplier": 0, "shift": 0}] * LANES
        for _ in range(250):
            valid = rng.random() < 0.8
            first = valid and left == 0
            if first:
                left = rng.randrange(1, 5)
            issue = {"weight_addr": rng.randrange(ARCH.sram_words), "activation_addr": rng.randrange(ARCH.sram_words),
                     "param_addr": rng.randrange(3), "first": int(first), "last": int(valid and left == 1),
                     "word_last": rng.randrange(2), "padded": int(rng.random() < 0.2), "operand_b": rng.randrange(2),
                     "slot": rng.randrange(ARCH.result_words), "lane": rng.randrange(LANES)}
            left -= valid
            enable, clear = rng.random() < 0.95, rng.random() < 0.02
            ctx.set(dut.issue.valid, valid)
            ctx.set(dut.issue.payload, issue)
            ctx.set(dut.enable, enable)
            ctx.set(dut.clear, clear)
            assert (ctx.get(dut.weight_read.addr), ctx.get(dut.activation_read.addr),
                    ctx.get(dut.param_read.addr)) == (issue["weight_addr"], issue["activation_addr"], issue["param_addr"])
            en, slot, word = model.write(enable)
            assert ctx.get(dut.result_write.en) == en
            assert ctx.get(dut.word_written) == bool(en and model.stage2["word_last"])
            if en:
                assert ctx.get(dut.result_write.addr) == slot
                mask = sum(0xFF << (8 * lane) for lane in range(LANES) if en >> lane & 1)
                assert ctx.get(dut.result_write.data) & mask == word & mask
            model.step(dict(issue, valid=valid), weight, activation, rows, clear)
            await ctx.tick()
            weight, activation = rng.getrandbits(32), rng.getrandbits(32)
            rows = [{"bias": rng.randrange(-1 << 20, 1 << 20), "multiplier": rng.getrandbits(31),
                     "shift": rng.randrange(20, 40)} for _ in range(LANES)]
            ctx.set(dut.weight_read.data, weight)
            ctx.set(dut.activation_read.data, activation)
            ctx.set(dut.param_read.data, data.ArrayLayout(param_layout(), LANES).const(rows))

    simulate(dut, testbench)


# --- parameter validation -------------------------------------------------------------------------------

@pytest.mark.parametrize("call, message", [
    (lambda: PELoader("arch", 0), r"^PELoader: parameter 'arch' must be a flowtile.arch.Arch, got 'arch'$"),
    (lambda: PELoader(ARCH, 2), r"^PELoader: parameter 'tile_index' = 2 is outside 0..1 of the 1x2 arch$"),
    (lambda: PELoader(ARCH, True), r"^PELoader: parameter 'tile_index' must be an integer, got True$"),
    (lambda: ParamTable(0, 4), r"^ParamTable: parameter 'rows' must be a positive integer, got 0$"),
    (lambda: ParamTable(12, 3), r"^ParamTable: parameter 'lanes' = 3 must be a power of two$"),
    (lambda: ParamTable(12, True), r"^ParamTable: parameter 'lanes' must be a positive integer, got True$"),
    (lambda: ResultRing(0, 4), r"^ResultRing: parameter 'depth' must be a positive integer, got 0$"),
    (lambda: ResultRing(3, "4"), r"^ResultRing: parameter 'lanes' must be a positive integer, got '4'$"),
    (lambda: InputSide(None), r"^InputSide: parameter 'arch' must be a flowtile.arch.Arch, got None$"),
    (lambda: ForwardQueue("arch"), r"^ForwardQueue: parameter 'arch' must be a flowtile.arch.Arch, got 'arch'$"),
    (lambda: OutputSide(4), r"^OutputSide: parameter 'arch' must be a flowtile.arch.Arch, got 4$"),
    (lambda: ComputeSequencer({}), r"^ComputeSequencer: parameter 'arch' must be a flowtile.arch.Arch, got \{\}$"),
    (lambda: ComputePipeline(1.5), r"^ComputePipeline: parameter 'arch' must be a flowtile.arch.Arch, got 1.5$"),
])
def test_constructor_validation(call, message):
    with pytest.raises((TypeError, ValueError), match=message):
        call()
