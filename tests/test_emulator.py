"""The emulator against (1) a naive cycle-stepping simulator written here from docs/architecture.md
sections 3-6 (the PE of section 4 with its concurrent input, compute and output sides, its forward queue,
two activation banks and the result ring through which COMPUTE streams its results word by word; 4.1 for
windowed layers and a tile's band of output pixels, which may begin and end inside a row, 4.2 for streams of
several tensors and op = ADD, 4.3 for op = CONCAT, 4.4 for the per-pixel interleaved output order of
output-channel groups), flit by flit and cycle by cycle, itself checked against cycles worked out by hand, (2)
plain numpy goldens (``program_builder``) of dense, convolution (also split over output-channel groups),
depthwise / average-pool (op = LANE), max-pool layers, residual blocks (op = ADD) and concat blocks (op =
CONCAT), split into row bands or bands of output pixels, and (3) its error reporting on programs it cannot
run.
"""
from __future__ import annotations

import copy
from collections import deque

import numpy as np
import pytest

from flowtile.emulator import EmulatorError, emulate, run_functional
from flowtile.emulator.timing import PROBE_BATCH, solve_timing
from flowtile.arch import OP_ADD, OP_CONCAT, OP_LANE, OP_MAX, Arch
from flowtile.testing.archs import lean_arch
from flowtile.host import pack_flits
from flowtile.program import ProgramError, TileProgram
from flowtile.tile_config import ConfigError, TileConfig
from flowtile.testing.program_builder import (AddParams, Concat, ConcatParams, Conv, Dense, Depthwise, MaxPool, Residual, average_pool,
                             build_program, dense_golden, layer_bands, network_golden, pixel_band_registers,
                             split_pixels, window_output_size)


def set_registers(tile, **changes):
    """Change registers of a tile of a built program (a TileConfig is frozen: the tile gets a new one)."""
    tile.config = tile.config.replace(**changes)


def shift_round_half_even(value, shift):
    """``value / 2^shift`` rounded to nearest, ties to even (section 4), by floor division."""
    quotient, remainder = value >> shift, value - ((value >> shift) << shift)
    half = 1 << (shift - 1)
    return quotient + ((remainder > half) | ((remainder == half) & ((quotient & 1) == 1)))

PORT_ORDER = ("L", "N", "E", "S", "W")
STEP = {"N": (-1, 0), "E": (0, 1), "S": (1, 0), "W": (0, -1)}
OPPOSITE = {"N": "S", "S": "N", "E": "W", "W": "E"}


# --- (1) the reference: every FIFO, router and PE stepped every cycle ----------------------------

def band_pixels(config):
    """Section 4.1's output pixels of a tile, ``(oy, ox)`` in COMPUTE's order, worked out here from the
    registers: rows ``out_row_begin .. out_row_begin + out_rows - 1`` row-major, the first row from column
    ``out_col_begin``, the last up to column ``E' - 1`` (``E' = out_col_end``, or ``out_width`` if 0), the rows
    in between whole (one row: columns ``out_col_begin .. E' - 1``)."""
    width, first_row, rows = config.out_width, config.out_row_begin, config.out_rows
    last_end = config.out_col_end if config.out_col_end else width
    pixels = []
    for oy in range(first_row, first_row + rows):
        begin = config.out_col_begin if oy == first_row else 0
        end = last_end if oy == first_row + rows - 1 else width
        pixels.extend((oy, ox) for ox in range(begin, end))
    return pixels


class ReferencePE:
    """Section 4's PE, one cycle at a time: an input side (per inference K RECV then P PASS transfers), a
    forward queue of F = queue_words words (the tile's register; a circular region of its SRAM from queue_base:
    queue word i is written at SRAM word queue_base + i mod F and popped from there), a compute side issuing
    result word by result word into a result ring of R = Arch.result_words words, and an output side (per
    inference Q pops then E EMIT transfers; with pass_per_pixel > 0, section 4.4, Q_f + P_bulk pops, then per
    output pixel pass_per_pixel pops and the pixel's W_px EMITs), with a plain-Python SRAM holding two activation banks (one with single_bank) and plain-Python arithmetic.
    Output pixels are section 4.1's pixel list of the tile (:func:`band_pixels`, from the registers: a band
    may begin and end inside a row); n_pix, I, E, the word numbering q * W_px + ... and the per-pixel pops run
    over it.
    Each side decides in cycle ``t`` from what happened before ``t`` (a FIFO or queue word written in ``t``
    is readable from ``t + 1``; a full FIFO or queue is not writable in a cycle in which it is read; a ring
    slot emitted in ``t`` can take a new word from ``t + 1``), except that the input side sees a COMPUTE that
    begins in ``t`` (section 4: the first input transfer of inference ``s >= 1`` happens at a cycle
    ``>= c_{s-1}``).

    Compute side (section 4, "Result ring" and "Compute side"): result words are numbered across inferences,
    ``j = s * E + w``; word ``j`` takes ``d_j`` issue cycles back to back (worked out here from the registers:
    MAC ``L * K_w`` per word of L channels and ``(N_o mod L) * K_w`` for a short last word of a pixel, MAX and
    LANE ``KH * KW``, ADD 2, CONCAT 1) and begins in the first cycle ``a_j`` in which the previous word's
    issues are over (``a_{j-1} + d_{j-1}``, plus 2 drain cycles before the first word of an inference, which
    also needs RECV word store_end - 1 of its inference before ``a_j``) and, for ``j >= R``, EMIT of word
    ``j - R`` happened before ``a_j`` (its ring slot is free). ``c_s`` is ``a`` of the first word of ``s``;
    COMPUTE of ``s`` spans ``[c_s, a_last + d_last + 2)``. EMIT of word ``j`` may happen from
    ``a_j + d_j + 2``.

    Per PE it records ``input_times`` (per inference K RECV then P PASS), ``compute_starts`` (``c_s``),
    ``word_starts`` (``a_j`` of every result word), ``emit_times`` (the EMIT of every result word, in word
    order), ``output_times`` (per inference its Q + E pops and EMITs in the order of ``out_actions``) and
    ``spans`` ((start, end, phase) in the order of the ``tile_timelines`` interface: input spans, COMPUTE
    spans, output spans).

    The result of COMPUTE ``s`` is taken from the SRAM as it stands when COMPUTE begins (``c_s``), reading
    bank ``s mod 2`` and the weights. The contract does not say in which order a COMPUTE read and an input
    side write of the same word in the same window happen, so the reference refuses (AssertionError) a run
    in which the input side writes a word that a running COMPUTE (its whole span) reads (weights
    overlapping the bank being filled): tests must not depend on it.
    """

    def __init__(self, tile, arch, position):
        config = tile.config
        # section 4.1: the tile's output pixels (a computing tile's band must be valid and non-empty)
        self.pixels = band_pixels(config) if config.n_out else []
        if config.n_out:
            assert (config.out_col_begin < config.out_width and config.out_col_end <= config.out_width
                    and self.pixels), (f"chain position {position}: invalid output pixel band out_col_begin = "
                                       f"{config.out_col_begin}, out_col_end = {config.out_col_end}, out_rows = "
                                       f"{config.out_rows}, out_width = {config.out_width} (section 4.1)")
        self.config, self.arch, self.lanes, self.position = config, arch, arch.lanes, position
        self.turns = tile.turns      # section 12: the hardware runs a tile's turns as inferences of its own
        self.k, self.p = config.n_in_words, config.n_pass
        # section 4.2: RECV word k is stored iff in [store_begin, store_end) (at act_base + (s mod 2) * B +
        # k - store_begin), forwarded (pushed into the queue) iff in [forward_begin, forward_end)
        self.store = range(config.store_begin, config.store_end)
        self.forward = range(config.forward_begin, config.forward_end)
        self.bank_words = len(self.store)                       # B
        # section 4, "One bank": with single_bank = 1 every inference stores into bank 0, and the next inference's
        # first input transfer waits for COMPUTE's end instead of its start
        self.banks = 1 if config.single_bank else 2
        # section 4, "Streaming rows": a line buffer of R rows instead of banks; the band's output rows, each with its
        # first result word and the input rows it reads; per global input row (s * in_height + y) the cycle its last
        # word was stored and the cycle from which its slot is free again
        self.stream_rows = config.stream_rows if config.n_out else 0
        self.row_starts: dict[int, tuple[int, int, int]] = {}     # first word w of an output row -> (oy, first, last)
        self.row_done_times: list[int] = []
        self.release_times: dict[int, int] = {}
        self.n_out = config.n_out
        self.dest = (config.dest_row, config.dest_col, config.dest_host)
        self.sram = [[0] * arch.lanes for _ in range(arch.sram_words)]
        for address, word in enumerate(tile.sram.tolist()):
            self.sram[address] = word
        self.params = tile.params.tolist()
        # section 4.1's counts over the pixel list: I issue cycles, n_pix * N_r result words (a dense layer:
        # N_o*K and N_r)
        n_pix = len(self.pixels)
        window = config.kernel_h * config.kernel_w
        if config.op in (OP_MAX, OP_LANE, OP_ADD, OP_CONCAT):   # ADD: kernel 1x2, one issue per operand
            # word; CONCAT: kernel 1x1, one issue per output word
            self.issue = n_pix * config.words_per_pixel * window
            weight_words = 0 if config.op != OP_LANE else config.words_per_pixel * window
        else:
            self.issue = n_pix * self.n_out * window * config.words_per_pixel
            weight_words = self.n_out * window * config.words_per_pixel
        self.computes = self.n_out > 0
        self.emits = n_pix * -(-self.n_out // arch.lanes) if self.computes else 0   # E
        # section 4's result ring: d of each result word of an inference, in section 4.1's loop order (pixel
        # by pixel, the pixel's W_px words in order), from the registers alone
        if not self.computes:
            per_pixel_d = []
        elif config.op in (OP_MAX, OP_LANE, OP_ADD, OP_CONCAT):   # one word per (pixel, word), KH*KW issues
            per_pixel_d = [window] * config.words_per_pixel
        else:   # MAC: K_w = KH*KW*CW issues per channel, L channels a word, the last word may be short
            k_w = window * config.words_per_pixel
            full, short = divmod(self.n_out, arch.lanes)
            per_pixel_d = [arch.lanes * k_w] * full + ([short * k_w] if short else [])
        self.word_d = per_pixel_d * n_pix if self.computes else []           # d_w, w = word index within s
        if self.stream_rows:
            for q, (oy, _) in enumerate(self.pixels):
                if q == 0 or oy != self.pixels[q - 1][0]:
                    self.row_starts[q * len(per_pixel_d)] = (oy, *config.input_rows_of_output_row(
                        oy - config.out_row_begin))
        assert sum(self.word_d) == self.issue, (self.word_d, self.issue)
        assert len(self.word_d) == self.emits
        self.ring = arch.result_words                                         # R
        self.pops = len(self.forward) + self.p                              # Q
        # section 4.4: the output side's Q + E transfers of an inference, in order: Q_f + P_bulk pops, then
        # per output pixel q pass_per_pixel pops and the W_px = E / n_pix EMITs of result words q*W_px ..
        # q*W_px + W_px - 1 (pass_per_pixel = 0: all pops, then all EMITs). Entry None = a pop, an int = the
        # EMIT of that result word.
        self.pass_per_pixel = config.pass_per_pixel
        if self.pass_per_pixel:
            assert self.computes and n_pix * self.pass_per_pixel <= self.p, (
                f"chain position {position}: pass_per_pixel = {self.pass_per_pixel} needs n_out > 0 and "
                f"n_pix * pass_per_pixel = {n_pix * self.pass_per_pixel} <= n_pass = {self.p} (section 4.4)")
        self.lead_pops = self.pops - n_pix * self.pass_per_pixel            # Q_f + P_bulk
        self.out_actions: list[int | None] = [None] * self.lead_pops
        # the input side's K + P transfers of an inference: (RECV word k, None) or (None, PASS word p)
        self.in_actions: list[tuple[int | None, int | None]] = [(k, None) for k in range(self.k)] + [
            (None, p) for p in range(self.p)]
        if self.computes and config.interleave_rows:
            # section 4 "Streaming rows", rows interleaved: after input row y (its W words; forwarded, if the tile
            # forwards) come the pixels of the output rows whose windows end in row y: on the input side their
            # pass_per_pixel PASS words, on the output side those pops and the pixel's EMITs
            self.in_actions, self.out_actions, self.lead_pops = [], [], None
            per_pixel, width, row = self.emits // n_pix, config.out_width, config.row_words
            last_rows = [config.input_rows_of_output_row(r)[1] for r in range(config.out_rows)]
            passed = q = 0
            for y in range(config.in_height):
                self.in_actions += [(y * row + c, None) for c in range(row)]
                self.out_actions += [None] * (row if len(self.forward) else 0)
                for _ in range(last_rows.count(y) * width):
                    if self.lead_pops is None:
                        self.lead_pops = len(self.out_actions)
                    self.in_actions += [(None, passed + i) for i in range(self.pass_per_pixel)]
                    passed += self.pass_per_pixel
                    self.out_actions += [None] * self.pass_per_pixel + list(range(q * per_pixel, (q + 1) * per_pixel))
                    q += 1
        elif self.computes:
            per_pixel = self.emits // n_pix                                  # W_px
            for q in range(n_pix):
                self.out_actions += [None] * self.pass_per_pixel + list(range(q * per_pixel, (q + 1) * per_pixel))
        assert len(self.out_actions) == self.pops + self.emits
        assert len(self.in_actions) == self.k + self.p
        self.last_recv = max((j for j, (k, _) in enumerate(self.in_actions) if k is not None), default=-1)
        self.weights = range(config.w_base, config.w_base + weight_words) if self.computes else range(0)
        self.queue_words = config.queue_words                               # F: this tile's queue depth
        self.queue_base = config.queue_base
        assert self.queue_words or not self.pops, (f"chain position {position}: {self.pops} words per inference "
                                                   f"through a forward queue of 0 words")
        # state of the three sides and the queue
        self.queue: deque = deque()           # (SRAM address, cycle pushed) of every word in the queue
        self.pushed = 0                       # words pushed into the queue so far
        self.max_queued = 0                   # the most words the queue held at the end of a cycle
        self.input_times: list[int] = []
        self.output_times: list[int] = []
        self.compute_starts: list[int] = []
        self.word_starts: list[int] = []      # a_j of every result word j (numbered across inferences)
        self.emit_times: list[int] = []       # cycle of the EMIT of every result word j
        self.stored_done: list[int] = []      # per inference: cycle of RECV word store_end - 1
        self.results: list[list[list[int]]] = []   # per inference: its result words (what the ring carries)
        self.input_spans: list[tuple[int, int, str]] = []
        self.compute_spans: list[tuple[int, int, str]] = []
        self.output_spans: list[tuple[int, int, str]] = []
        self.sram_writes: list[tuple[int, int]] = []   # (cycle, address) of every input-side SRAM write

    @property
    def idle(self):
        return not (self.k or self.p or self.n_out)

    @property
    def spans(self):
        return self.input_spans + self.compute_spans + self.output_spans

    def finished(self, batch):
        """Whether it ran ``batch`` (program) inferences: each of its turns (section 12) an inference of its own."""
        batch *= self.turns
        return (len(self.input_times) == batch * (self.k + self.p) and len(self.word_starts) == batch * self.emits
                and len(self.output_times) == batch * (self.pops + self.emits))

    def word_d_of(self, j):
        """d_j of result word j (numbered across inferences)."""
        return self.word_d[j % self.emits]

    def compute_end(self, s):
        """End of COMPUTE of inference s (a_last + d_last + 2), None while its last word has not begun."""
        last = (s + 1) * self.emits - 1
        return self.word_starts[last] + self.word_d_of(last) + 2 if len(self.word_starts) > last else None

    # --- the three sides, in the order the reference evaluates them in cycle t ---------------------
    def start_compute(self, cycle):
        """Compute side: result word j = s * E + w begins (a_j = ``cycle``) in the first cycle in which the
        previous word's issue cycles are over (a_{j-1} + d_{j-1}; + 2 if w = 0), for w = 0 RECV word
        store_end - 1 of s is done, and for j >= R the EMIT of word j - R is done (all before ``cycle``).
        Never more than one word a cycle (d >= 1); a word, once begun, issues d_j cycles without waiting."""
        if not self.computes:
            return
        j = len(self.word_starts)
        s, w = divmod(j, self.emits)
        if j:
            previous_end = self.word_starts[-1] + self.word_d_of(j - 1) + (2 if w == 0 else 0)
            if cycle < previous_end:
                return
        row = self.row_starts.get(w) if self.stream_rows else None
        if self.stream_rows:   # an output row's first word: the last input row it reads stored before this cycle
            if row is not None:
                needed = s * self.config.in_height + row[2]
                if len(self.row_done_times) <= needed or self.row_done_times[needed] >= cycle:
                    return
        elif w == 0 and (len(self.stored_done) <= s or self.stored_done[s] >= cycle):
            return
        if j >= self.ring and (len(self.emit_times) <= j - self.ring or self.emit_times[j - self.ring] >= cycle):
            return
        self.word_starts.append(cycle)
        if w == 0:
            self.compute_starts.append(cycle)
            self.results.append([] if self.stream_rows else
                                self.compute(self.config.act_base + (s % self.banks) * self.bank_words))
        if row is not None:   # the row's results from the line buffer as it stands; rows above it are released
            oy, first, _ = row
            height = self.config.in_height
            self.results[s] += self.compute(self.config.act_base, only_row=oy, slot_base=s * height)
            for y in range(first):
                self.release_times.setdefault(s * height + y, cycle + 1)
        if w == self.emits - 1:
            self.compute_spans.append((self.compute_starts[s], self.compute_end(s), "COMPUTE"))
            if self.stream_rows:   # COMPUTE's end releases the rest of the inference's rows
                height = self.config.in_height
                for y in range(height):
                    self.release_times.setdefault(s * height + y, self.compute_end(s))

    def input_action(self):
        """(inference, index in K + P, RECV word k or None for a PASS, pushes into the queue) of the next input
        transfer."""
        per = self.k + self.p
        s, j = divmod(len(self.input_times), per)
        k = self.in_actions[j][0]
        return s, j, k, (k in self.forward) if k is not None else True

    def input_ready(self, cycle):
        """in.ready in ``cycle`` (after start_compute): a pushing transfer needs a free queue slot (the
        queue as it stood at the start of the cycle); in a computing tile the first transfer of inference
        s >= 1 waits for COMPUTE of s - 1 to have begun, with one bank (single_bank) to have ended
        (``e_{s-1} = a_last + d_last + 2 <= cycle``)."""
        if not self.k + self.p:
            return False
        s, j, k, pushes = self.input_action()
        if pushes and len(self.queue) >= self.queue_words:
            return False
        if self.stream_rows:   # a row's first stored word: its slot's previous row released
            stored = k - self.config.store_begin if k is not None else -1
            if 0 <= stored < len(self.store) and stored % self.config.row_words == 0:
                row = s * self.config.in_height + stored // self.config.row_words
                if row >= self.stream_rows and self.release_times.get(row - self.stream_rows, cycle + 1) > cycle:
                    return False
            return True
        if self.computes and j == 0 and s >= 1:
            if len(self.compute_starts) < s:
                return False
            if self.banks == 1 and (self.compute_end(s - 1) is None or self.compute_end(s - 1) > cycle):
                return False
        return True

    def output_word(self, cycle):
        """The word the output side offers in this cycle (o_flit.valid), or None: the queue head if it was
        pushed before ``cycle`` (pops), result word w of inference s (j = s * E + w) from cycle a_j + d_j + 2
        (it is written into the ring in a_j + d_j + 1) (EMITs)."""
        per = self.pops + self.emits
        if not per:
            return None
        s, j = divmod(len(self.output_times), per)
        word = self.out_actions[j]
        if word is None:
            if self.queue and self.queue[0][1] < cycle:
                return list(self.sram[self.queue[0][0]])
            return None
        index = s * self.emits + word
        if len(self.word_starts) > index and cycle >= self.word_starts[index] + self.word_d_of(index) + 2:
            return self.results[s][word]
        return None

    def do_input(self, cycle, data):
        """One input transfer of ``data`` in ``cycle``: store, push, record."""
        s, j, k, pushes = self.input_action()
        if k is not None and k in self.store:
            if self.stream_rows:   # row y of inference s into slot (s * in_height + y) mod R
                row, column = divmod(k - self.store.start, self.config.row_words)
                global_row = s * self.config.in_height + row
                address = self.config.act_base + (global_row % self.stream_rows) * self.config.row_words + column
                if column == self.config.row_words - 1:
                    self.row_done_times.append(cycle)
            else:
                address = self.config.act_base + (s % self.banks) * self.bank_words + k - self.store.start
                self.check_no_race(cycle, address)
            self.sram[address] = list(data)
            self.sram_writes.append((cycle, address))
            if k == self.store.stop - 1:
                self.stored_done.append(cycle)
        if pushes:   # the queue's slot in the SRAM (never a word COMPUTE reads: the region is apart)
            address = self.queue_base + self.pushed % self.queue_words
            self.check_no_race(cycle, address)
            self.sram[address] = list(data)
            self.queue.append((address, cycle))
            self.pushed += 1
            self.max_queued = max(self.max_queued, len(self.queue))
        self.input_times.append(cycle)
        begin = self.input_spans[-1][1] if self.input_spans else 0
        if j == self.last_recv:
            self.input_spans.append((begin, cycle + 1, "RECV"))
        elif j == self.k + self.p - 1:
            self.input_spans.append((begin, cycle + 1, "PASS"))

    def do_output(self, cycle):
        """One output transfer in ``cycle``: pop (the queue head) or EMIT; record."""
        per = self.pops + self.emits
        s, j = divmod(len(self.output_times), per)
        if self.out_actions[j] is None:
            self.queue.popleft()
        else:
            assert s * self.emits + self.out_actions[j] == len(self.emit_times), "EMITs out of word order"
            self.emit_times.append(cycle)
        self.output_times.append(cycle)
        # spans: FORWARD = the Q_f + P_bulk leading pops (none if zero), EMIT = the rest up to the last output
        # transfer of the inference (section 4.4: interleaved pops included)
        begin = self.output_spans[-1][1] if self.output_spans else 0
        if j == self.lead_pops - 1:
            self.output_spans.append((begin, cycle + 1, "FORWARD"))
        elif j == per - 1:
            self.output_spans.append((begin, cycle + 1, "EMIT"))

    def check_rules(self, batch):
        """After a run of ``batch`` (program) inferences: the recorded times obey section 4's rules and section 6
        rule 4's inequalities (a second look at the cycle loop, from the times alone)."""
        batch *= self.turns     # section 12: each turn an inference of the PE's own
        where = f"reference PE at chain position {self.position}"
        per_in, per_out = self.k + self.p, self.pops + self.emits
        for name, times in (("input", self.input_times), ("output", self.output_times)):
            assert all(b >= a + 1 for a, b in zip(times, times[1:])), f"{where}: {name} times {times} overlap"
        pushes = [t for i, t in enumerate(self.input_times)
                  if self.in_actions[i % per_in][0] is None or self.in_actions[i % per_in][0] in self.forward]
        pops = [t for i, t in enumerate(self.output_times) if self.out_actions[i % per_out] is None]
        assert len(pushes) == len(pops) == batch * self.pops, f"{where}: {len(pushes)} pushes, {len(pops)} pops"
        for i, (push, pop) in enumerate(zip(pushes, pops)):
            assert pop >= push + 1, f"{where}: queue word {i} popped at {pop}, pushed at {push}"
            if i >= self.queue_words:
                assert push >= pops[i - self.queue_words] + 1, f"{where}: queue word {i} pushed into a full queue"
        if not self.computes:
            return
        stop = self.store.stop - 1
        c_height = self.config.in_height
        emits = [t for i, t in enumerate(self.output_times) if self.out_actions[i % per_out] is not None]
        assert emits == self.emit_times and len(emits) == len(self.word_starts) == batch * self.emits, \
            f"{where}: {len(emits)} EMITs, {len(self.word_starts)} result words"
        for j, start in enumerate(self.word_starts):
            s, w = divmod(j, self.emits)
            bounds = []
            if j:
                bounds.append(self.word_starts[j - 1] + self.word_d_of(j - 1) + (2 if w == 0 else 0))
            if self.stream_rows and w in self.row_starts:   # the last input row the output row reads
                bounds.append(self.row_done_times[s * c_height + self.row_starts[w][2]] + 1)
            elif w == 0 and not self.stream_rows:
                bounds.append(self.input_times[s * per_in + stop] + 1)
            if j >= self.ring:
                bounds.append(emits[j - self.ring] + 1)
            assert start == max(bounds), f"{where}: a_{j} = {start}, section 4 gives max({bounds})"
            assert emits[j] >= start + self.word_d_of(j) + 2, \
                f"{where}: EMIT of result word {j} at {emits[j]}, before it is written ({start} + {self.word_d_of(j)} + 1)"
        assert self.compute_starts == self.word_starts[::self.emits]
        for s in range(1, batch if not self.stream_rows else 1):
            assert self.input_times[s * per_in] >= self.compute_starts[s - 1], \
                f"{where}: inference {s} received before COMPUTE of inference {s - 1} began"

    def check_no_race(self, cycle, address):
        """The input side writes ``address`` in ``cycle``: no running COMPUTE may read that word."""
        if not self.compute_starts:
            return
        s = len(self.compute_starts) - 1
        start, end = self.compute_starts[s], self.compute_end(s)
        if end is not None and cycle >= end:
            return
        bank = self.config.act_base + (s % 2) * self.bank_words
        assert not (address in self.weights or bank <= address < bank + self.bank_words), (
            f"chain position {self.position}: the input side writes SRAM word {address} in cycle {cycle} while "
            f"COMPUTE of inference {s} (cycles {start}..{'' if end is None else end - 1}) reads it (weights "
            f"{self.weights.start}..{self.weights.stop - 1}, bank {bank}..{bank + self.bank_words - 1}): the "
            f"result would depend on an order the contract leaves open")

    def compute(self, act_base, only_row=None, slot_base=0):
        """Section 4.1 word by word, reading the SRAM as the input side left it; ``act_base``: the bank base. With a
        line buffer, only output row ``only_row``'s pixels, input row ``y`` read from slot ``(slot_base + y) mod R``."""
        c, lanes = self.config, self.lanes
        height, width, cw_count = c.in_height, c.in_width, c.words_per_pixel
        kh, kw, stride = c.kernel_h, c.kernel_w, c.stride
        window_words = kh * kw * cw_count
        words = []
        for oy, ox in self.pixels:   # section 4.1's pixel list, q = 0 .. n_pix - 1
            if only_row is not None and oy != only_row:
                continue
            pixel = oy * width + ox
            if c.op == OP_ADD:   # section 4.2: operands at act_base + operand_{a,b}_offset + pixel word
                for cw in range(cw_count):
                    a = self.sram[act_base + c.operand_a_offset + pixel * cw_count + cw]
                    b = self.sram[act_base + c.operand_b_offset + pixel * cw_count + cw]
                    word = []
                    for l in range(lanes):
                        bias, multiplier, shift = self.params[cw * lanes + l]
                        acc = bias + a[l] * c.add_mult_a + b[l] * c.add_mult_b
                        acc = (acc + 2**31) % 2**32 - 2**31
                        y = shift_round_half_even(acc * multiplier, shift) + c.zp_out
                        word.append(min(max(y, c.clamp_lo), c.clamp_hi))
                    words.append(word)
                continue
            if c.op == OP_CONCAT:   # section 4.3: one issue per output word, from operand a or b
                words_a = c.concat_words_a
                words_b = cw_count - words_a
                for cw in range(cw_count):
                    if cw < words_a:
                        source = self.sram[act_base + c.operand_a_offset + pixel * words_a + cw]
                        factor = c.add_mult_a
                    else:
                        source = self.sram[act_base + c.operand_b_offset + pixel * words_b + cw - words_a]
                        factor = c.add_mult_b
                    word = []
                    for l in range(lanes):
                        bias, multiplier, shift = self.params[cw * lanes + l]
                        acc = bias + source[l] * factor
                        acc = (acc + 2**31) % 2**32 - 2**31
                        y = shift_round_half_even(acc * multiplier, shift) + c.zp_out
                        word.append(min(max(y, c.clamp_lo), c.clamp_hi))
                    words.append(word)
                continue

            def activation(ky, kx, cw):
                iy, ix = oy * stride + ky - c.pad_top, ox * stride + kx - c.pad_left
                if not (0 <= iy < height and 0 <= ix < width):
                    return [c.pad_value] * lanes
                if self.stream_rows:
                    return self.sram[act_base + ((slot_base + iy) % self.stream_rows) * width * cw_count
                                     + ix * cw_count + cw]
                return self.sram[act_base + (iy * width + ix) * cw_count + cw]
            if c.op == OP_MAX:
                for cw in range(cw_count):
                    best = None
                    for ky in range(kh):
                        for kx in range(kw):
                            a = activation(ky, kx, cw)
                            best = list(a) if best is None else [max(m, v) for m, v in zip(best, a)]
                    words.append([min(max(v, c.clamp_lo), c.clamp_hi) for v in best])
                continue
            if c.op == OP_LANE:
                for cw in range(cw_count):
                    word = []
                    for l in range(lanes):
                        bias, multiplier, shift = self.params[cw * lanes + l]
                        acc = bias
                        for ky in range(kh):
                            for kx in range(kw):
                                weight = self.sram[c.w_base + cw * kh * kw + ky * kw + kx]
                                acc += weight[l] * activation(ky, kx, cw)[l]
                        acc = (acc + 2**31) % 2**32 - 2**31
                        y = shift_round_half_even(acc * multiplier, shift) + c.zp_out
                        word.append(min(max(y, c.clamp_lo), c.clamp_hi))
                    words.append(word)
                continue
            results = []
            for o in range(self.n_out):
                bias, multiplier, shift = self.params[o]
                acc = bias
                for ky in range(kh):
                    for kx in range(kw):
                        for cw in range(cw_count):
                            k = (ky * kw + kx) * cw_count + cw
                            weight = self.sram[c.w_base + o * window_words + k]
                            acc += sum(w * a for w, a in zip(weight, activation(ky, kx, cw)))
                acc = (acc + 2**31) % 2**32 - 2**31
                y = shift_round_half_even(acc * multiplier, shift) + c.zp_out
                results.append(min(max(y, c.clamp_lo), c.clamp_hi))
            results += [0] * (-len(results) % lanes)
            words += [results[i:i + lanes] for i in range(0, len(results), lanes)]
        return words


def reference_run(program, in_flits, batch, max_cycles=200_000, host_pattern=None, pe_factory=None):
    """Step the whole mesh cycle by cycle. Returns (out_flits, out_times, in_times, PEs by chain position)
    (each PE's ``input_times``, ``compute_starts``, ``output_times``, ``spans``). ``host_pattern``
    (:class:`flowtile.host.HostPattern`): the host output is ready and the host input offered only in the
    cycles its bits allow (default: always). ``pe_factory(tile, arch, position)``: the model of each tile (default
    :class:`ReferencePE`); a model with ``plan_loop_back(cycle)`` and ``apply_loop_back(cycle)`` (a tile of several
    contexts, tests/test_emulator_contexts.py) gets them called after its handshakes and after its updates."""
    from flowtile.host import HOST_PATTERN_CYCLES, HostPattern
    host_pattern = host_pattern or HostPattern()
    host_ready, host_offers = host_pattern.out_ready(), host_pattern.in_valid()
    arch = program.arch
    depth, lanes = arch.router_fifo_depth, arch.lanes
    tiles = {(t.row, t.col): t for t in program.tiles}
    fifos = {(pos, port): deque() for pos in tiles for port in PORT_ORDER}
    pointers = {(pos, port): 0 for pos in tiles for port in PORT_ORDER}
    pes = {(t.row, t.col): (pe_factory or ReferencePE)(t, arch, p) for p, t in enumerate(program.tiles)}
    host_in = [(list(map(int, f)), (0, 0, 0)) for f in np.asarray(in_flits)]
    out_flits, out_times, in_times = [], [], []
    expected = batch * program.output_words

    def route(pos, dest):
        row, col = pos
        d_row, d_col, d_host = dest
        if d_host:
            d_row, d_col = arch.exit_tile
        if d_col != col:
            return "E" if d_col > col else "W"
        if d_row != row:
            return "S" if d_row > row else "N"
        return arch.exit_direction if d_host else "L"

    for cycle in range(max_cycles):
        # done when the host has every output and every PE every transfer and COMPUTE (a PE whose results
        # are dropped downstream may still be emitting them after the last output flit)
        if len(out_flits) == expected and all(pe.finished(batch) for pe in pes.values()):
            break
        writable = {key: len(fifo) < depth for key, fifo in fifos.items()}
        # routers: requests and round-robin grants (they depend on the FIFO heads only)
        grants = {}
        for pos in tiles:
            requests = {}
            for port in PORT_ORDER:
                if fifos[(pos, port)]:
                    requests.setdefault(route(pos, fifos[(pos, port)][0][1]), []).append(port)
            for out, inputs in requests.items():
                start = pointers[(pos, out)]
                grants[(pos, out)] = next(PORT_ORDER[(start + i) % 5] for i in range(5)
                                          if PORT_ORDER[(start + i) % 5] in inputs)
        # PE handshakes: the compute side first (the input side sees a COMPUTE beginning in this cycle),
        # then in.ready and o_flit.valid from the state at the start of the cycle
        pe_in_ready, pe_out_word = {}, {}
        for pos, pe in pes.items():
            if pe.idle:
                pe_in_ready[pos], pe_out_word[pos] = False, None
                continue
            pe.start_compute(cycle)
            pe_in_ready[pos] = pe.input_ready(cycle)
            word = pe.output_word(cycle)
            pe_out_word[pos] = word if word is not None and writable[(pos, "L")] else None
            if hasattr(pe, "plan_loop_back"):
                pe.plan_loop_back(cycle)
        # router transfers (decided on start-of-cycle state, applied afterwards)
        pushes, to_pe = [], {}
        for (pos, out), granted in grants.items():
            if out == "L":
                ready = pe_in_ready[pos]
            elif pos == arch.exit_tile and out == arch.exit_direction:
                ready = bool(host_ready[cycle % HOST_PATTERN_CYCLES])
            else:
                neighbour = (pos[0] + STEP[out][0], pos[1] + STEP[out][1])
                ready = neighbour in tiles and writable[(neighbour, OPPOSITE[out])]
            if not ready:
                continue
            flit = fifos[(pos, granted)].popleft()
            pointers[(pos, out)] = (PORT_ORDER.index(granted) + 1) % 5
            if out == "L":
                to_pe[pos] = flit
            elif pos == arch.exit_tile and out == arch.exit_direction:
                out_flits.append(flit[0])
                out_times.append(cycle)
            else:
                pushes.append(((neighbour, OPPOSITE[out]), flit))
        if len(in_times) < len(host_in) and writable[((0, 0), "W")] and host_offers[cycle % HOST_PATTERN_CYCLES]:
            pushes.append((((0, 0), "W"), host_in[len(in_times)]))
            in_times.append(cycle)
        # PE state updates
        for pos, pe in pes.items():
            if pe_out_word[pos] is not None:
                pe.do_output(cycle)
                pushes.append(((pos, "L"), (list(pe_out_word[pos]), pe.dest)))
            if pos in to_pe:
                pe.do_input(cycle, to_pe[pos][0])
            if hasattr(pe, "apply_loop_back"):
                pe.apply_loop_back(cycle)
        for key, flit in pushes:
            fifos[key].append(flit)
    else:
        raise AssertionError(f"reference did not finish in {max_cycles} cycles")
    by_position = [pes[arch.chain_position(p)] for p in range(arch.n_tiles)]
    for pe in by_position:
        if isinstance(pe, ReferencePE) and not pe.idle:
            pe.check_rules(batch)
    return (np.array(out_flits, dtype=np.int8).reshape(-1, lanes), np.array(out_times), np.array(in_times),
            by_position)


# --- random programs -----------------------------------------------------------------------------

def random_layer(rng, n_in, n_out, tiles, *, extreme=False):
    weights = rng.integers(-128, 128, (n_out, n_in), dtype=np.int8)
    if extreme:  # wraps and saturates: huge biases, small shifts
        bias = rng.integers(-2**31, 2**31, n_out)
        multiplier = rng.integers(0, 2**31, n_out)
        shift = rng.integers(1, 63, n_out)
    else:  # results that mostly land inside int8
        bias = rng.integers(-2000, 2000, n_out)
        multiplier = rng.integers(2**30, 2**31, n_out)
        shift = np.full(n_out, 31 + max(0, int(np.log2(max(1, n_in)) + 4)))
    zp_out = int(rng.integers(-20, 21))
    relu = bool(rng.integers(0, 2))
    clamp_lo = max(-128, zp_out) if relu else -128
    return Dense(weights, bias, multiplier, shift, zp_out, clamp_lo, 127, tiles)


def random_queue_words(rng, n_tiles):
    """``build_program``'s ``queue_words`` (each tile's register queue_words, section 4): None (every queue all
    the SRAM its tile's weights and banks leave free, hundreds of words or more in these programs) or per chain
    position a queue of 1..5 words (or, one in five, all the free SRAM), so that input sides wait for queue
    space in a good share of the random programs, with different depths on different tiles."""
    if rng.random() < 0.5:
        return None
    return [int(rng.integers(1, 6)) if rng.random() < 0.8 else None for _ in range(n_tiles)]


def random_program(rng, *, max_batch=6):
    """Seeded random dense chain (lanes 1..8, 1x1..2x3 grids, 1-3 layers split over tiles, per-tile queues of
    1..5 words or large, FIFO depths 1..4), sometimes on the smallest result ring its tiles allow (section 4)."""
    lanes = int(rng.choice([1, 2, 4, 8]))
    rows, cols = int(rng.integers(1, 3)), int(rng.integers(1, 4))
    arch = lean_arch(rows=rows, cols=cols, lanes=lanes, sram_bytes=lanes * 512, max_tile_outputs=64,
                     result_ring_words=64 // lanes, router_fifo_depth=int(rng.integers(1, 5)))   # rings of 8..64 words
    queues = random_queue_words(rng, arch.n_tiles)
    n_tiles = arch.n_tiles
    n_layers = int(rng.integers(1, min(3, n_tiles) + 1))
    spans = [1] * n_layers
    for _ in range(int(rng.integers(0, n_tiles - n_layers + 1))):
        spans[int(rng.integers(0, n_layers))] += 1
    width = int(rng.integers(1, 5 * lanes + 1))
    layers = []
    for span in spans:
        n_out = int(rng.integers((span - 1) * lanes + 1, (span + 2) * lanes + 1))
        layers.append(random_layer(rng, width, n_out, span, extreme=rng.random() < 0.2))
        width = n_out
    tail = "direct" if rng.random() < 0.3 else "pass"
    program = _random_ring(rng, build_program(arch, layers, tail=tail, act_fill=rng, queue_words=queues))
    batch = int(rng.integers(1, max_batch + 1))
    x = rng.integers(-128, 128, (batch, layers[0].n_in), dtype=np.int8)
    return program, layers, x, batch


def _side_actions(pe, side):
    """Names of one side's actions per inference, for error messages."""
    if side == "input":
        return [f"RECV word {k}" for k in range(pe.k)] + [f"PASS word {j}" for j in range(pe.p)]
    names, pops = [], 0
    for word in pe.out_actions:   # section 4.4's order
        names.append(f"pop {pops}" if word is None else f"EMIT word {word}")
        pops += word is None
    return names


def assert_same_times(actual, expected, what, actions=None):
    """``actual`` (the emulator) == ``expected`` (the reference), else name the first differing action."""
    actual, expected = np.asarray(actual), np.asarray(expected, dtype=np.int64)
    assert actual.shape == expected.shape, (f"{what}: the emulator has {actual.shape[0]} times, the reference "
                                            f"{expected.shape[0]}")
    differing = np.flatnonzero(actual != expected)
    if differing.size:
        index = int(differing[0])
        name = f"inference {index}" if not actions else \
            f"inference {index // len(actions)}, {actions[index % len(actions)]}"
        raise AssertionError(f"{what}: {differing.size} times differ; first at index {index} ({name}): emulator "
                             f"cycle {actual[index]}, reference cycle {expected[index]}")


def assert_matches_reference(program, x, batch, *, flits=None, golden=None, host_pattern=None):
    """The emulator against the reference, flit by flit and cycle by cycle; ``golden``: the reference's output
    flits are first checked against it (so a failure of the emulator alone still shows the reference agreeing)."""
    flits = pack_flits(x, program.arch.lanes) if flits is None else flits
    ref_flits, ref_out, ref_in, ref_pes = reference_run(program, flits, batch, host_pattern=host_pattern)
    if golden is not None:
        np.testing.assert_array_equal(ref_flits, golden, err_msg="the reference's output vs the numpy golden")
    result = emulate(program, flits, batch, **({} if host_pattern is None else {"host_pattern": host_pattern}))
    assert_same_times(result.in_times, ref_in, "host input transfer cycles")
    assert_same_times(result.out_times, ref_out, "host output transfer cycles")
    np.testing.assert_array_equal(result.out_flits, ref_flits, err_msg="output flit data")
    assert result.cycles == ref_out[-1] + 1
    words = program.output_words
    assert result.latency_cycles == ref_out[words - 1] + 1
    for position, pe in enumerate(ref_pes):
        pe_times = result.timing.pe_times[position]
        timeline = result.tile_timelines[position]
        if pe.idle:
            assert pe_times is None, f"chain position {position} is idle but has PE times"
            assert len(timeline) == 0, f"chain position {position} is idle but has a timeline"
            continue
        assert pe_times is not None, f"chain position {position} works but has no PE times"
        for name in ("input", "compute", "output"):
            assert getattr(pe_times, name).dtype == np.int64, f"PETimes.{name} of chain position {position} is " \
                                                             f"{getattr(pe_times, name).dtype}, not int64"
        where = f"chain position {position}"
        assert_same_times(pe_times.input, pe.input_times, f"{where}: input-side transfer cycles",
                          _side_actions(pe, "input"))
        assert_same_times(pe_times.compute, pe.compute_starts, f"{where}: COMPUTE start cycles")
        # every result word's first issue cycle a_j (TimingResult.word_starts, where the emulator reports it)
        word_starts = getattr(result.timing, "word_starts", None)
        if word_starts:
            assert_same_times(word_starts[position], pe.word_starts, f"{where}: result word first issue cycles a_j",
                              [f"result word {w}" for w in range(pe.emits)] or None)
        assert_same_times(pe_times.output, pe.output_times, f"{where}: output-side transfer cycles",
                          _side_actions(pe, "output"))
        spans = [(int(s), int(e), str(p)) for s, e, p in timeline]
        if spans != pe.spans:
            padded = max(len(spans), len(pe.spans))
            first = next(i for i, (a, b) in enumerate(zip(spans + [None] * padded, pe.spans + [None] * padded))
                         if a != b)
            raise AssertionError(f"{where}: phase spans differ ({len(spans)} in the emulator, {len(pe.spans)} in "
                                 f"the reference); first at span {first}: emulator "
                                 f"{spans[first] if first < len(spans) else None}, reference "
                                 f"{pe.spans[first] if first < len(pe.spans) else None}")
    return result


def assert_long_batch(program, layers, shape, x, *, reference=True):
    """A batch of ``x`` (past the probe): outputs equal the numpy golden, and the times (extrapolated where the
    emulator could) equal plain sweeps'; ``reference``: also cycle by cycle against the stepping reference."""
    batch, lanes = len(x), program.arch.lanes
    flits = pack_flits(x, lanes, program.input)
    golden = network_golden(layers, x, shape, lanes)
    result = (assert_matches_reference(program, x, batch, flits=flits, golden=golden) if reference
              else emulate(program, flits, batch))
    np.testing.assert_array_equal(result.out_flits, golden)
    plain = solve_timing(program, batch, probe_batch=None)
    np.testing.assert_array_equal(plain.out_times, result.out_times)
    return result


@pytest.mark.parametrize("seed", range(300))
def test_random_programs_match_reference(seed):
    rng = np.random.default_rng(seed)
    program, layers, x, batch = random_program(rng)
    result = assert_matches_reference(program, x, batch)
    golden = dense_golden(layers, x)
    np.testing.assert_array_equal(result.out_flits.reshape(batch, -1)[:, :layers[-1].n_out], golden)


def random_host_pattern(rng):
    """A seeded :class:`flowtile.host.HostPattern`: output stalls and/or input gaps, short or long bursts."""
    from flowtile.host import HostPattern
    duties = [1.0, 0.8, 0.5, 0.2, 0.05]
    return HostPattern(int(rng.integers(0, 1 << 16)), float(rng.choice(duties)), float(rng.choice([1, 3, 20, 100])),
                       float(rng.choice(duties)), float(rng.choice([1, 3, 20])))


@pytest.mark.parametrize("seed", range(120))
def test_random_programs_under_host_stalls_match_reference(seed):
    """Host output stalls and input gaps (flowtile.host.HostPattern): every transfer cycle against the
    cycle-stepping reference, data unchanged."""
    rng = np.random.default_rng(7000 + seed)
    program, layers, x, batch = random_program(rng, max_batch=8)
    result = assert_matches_reference(program, x, batch, host_pattern=random_host_pattern(rng))
    golden = dense_golden(layers, x)
    np.testing.assert_array_equal(result.out_flits.reshape(batch, -1)[:, :layers[-1].n_out], golden)


@pytest.mark.parametrize("seed", range(30))
def test_random_long_batches_match_reference(seed):
    """Batches past the probe: periodic extrapolation (or its fallback), cycle by cycle."""
    rng = np.random.default_rng(1000 + seed)
    program, layers, x, _ = random_program(rng)
    batch = int(rng.integers(2 * PROBE_BATCH, 4 * PROBE_BATCH))
    x = rng.integers(-128, 128, (batch, layers[0].n_in), dtype=np.int8)
    result = assert_matches_reference(program, x, batch)
    np.testing.assert_array_equal(result.out_flits.reshape(batch, -1)[:, :layers[-1].n_out], dense_golden(layers, x))



@pytest.mark.parametrize("seed", range(20))
def test_random_long_batches_under_host_stalls_match_reference(seed):
    """Batches past the probe under host stalls: the probe/extrapolation path (or its fallback) cycle by cycle,
    and the same times as plain sweeps of the whole batch."""
    rng = np.random.default_rng(9000 + seed)
    program, layers, x, _ = random_program(rng)
    batch = int(rng.integers(2 * PROBE_BATCH, 4 * PROBE_BATCH))
    x = rng.integers(-128, 128, (batch, layers[0].n_in), dtype=np.int8)
    pattern = random_host_pattern(rng)
    result = assert_matches_reference(program, x, batch, host_pattern=pattern)
    np.testing.assert_array_equal(result.out_flits.reshape(batch, -1)[:, :layers[-1].n_out], dense_golden(layers, x))
    plain = solve_timing(program, batch, probe_batch=None, host_pattern=pattern)
    np.testing.assert_array_equal(plain.out_times, result.out_times)

def _layer(rng, n_in, n_out, tiles=1):
    return random_layer(rng, n_in, n_out, tiles)


@pytest.mark.parametrize("depth", [1, 2])
def test_slow_tile_behind_fast_ones_depth(depth):
    """Heavy back-pressure: a long COMPUTE at the end of the chain stalls every FIFO before it."""
    rng = np.random.default_rng(100 + depth)
    arch = lean_arch(rows=2, cols=2, lanes=2, sram_bytes=4096, max_tile_outputs=64, router_fifo_depth=depth)
    layers = [_layer(rng, 4, 4), _layer(rng, 4, 2), _layer(rng, 2, 24)]
    program = build_program(arch, layers)
    x = rng.integers(-128, 128, (6, 4), dtype=np.int8)
    assert_matches_reference(program, x, 6)


def test_forwarding_chain_longer_than_its_fifos():
    """A layer split over 3 tiles with K = 6 > 2D: forwarding stalls on the next tiles' input sides, which
    wait for their COMPUTE of the previous inference to begin."""
    rng = np.random.default_rng(7)
    arch = lean_arch(rows=2, cols=2, lanes=2, sram_bytes=4096, max_tile_outputs=64, router_fifo_depth=1)
    layers = [_layer(rng, 12, 6, tiles=3)]
    program = build_program(arch, layers)
    x = rng.integers(-128, 128, (5, 12), dtype=np.int8)
    assert_matches_reference(program, x, 5)


def test_long_batch_extrapolation_matches_reference():
    """Batch above the probe: the periodic extrapolation, checked cycle by cycle."""
    rng = np.random.default_rng(8)
    arch = lean_arch(rows=2, cols=3, lanes=2, sram_bytes=4096, max_tile_outputs=64, router_fifo_depth=2)
    layers = [_layer(rng, 6, 6, tiles=2), _layer(rng, 6, 3, tiles=2)]
    program = build_program(arch, layers)
    batch = 3 * PROBE_BATCH
    x = rng.integers(-128, 128, (batch, 6), dtype=np.int8)
    result = assert_matches_reference(program, x, batch)
    assert result.timing.extrapolated


def test_overlapping_weight_and_activation_regions():
    """COMPUTE reads the SRAM as the input side left it: weights overlapping activation bank 0 see inference
    0's inputs in both inferences (inference 1 is stored in bank 1 and leaves bank 0 alone)."""
    rng = np.random.default_rng(9)
    arch = lean_arch(rows=1, cols=2, lanes=4, sram_bytes=1024, max_tile_outputs=16, router_fifo_depth=2)
    layer = _layer(rng, 8, 4)
    program = build_program(arch, [layer])
    tile = program.tiles[0]
    set_registers(tile, act_base=6)  # weights at words 0..7 (output 3: words 6..7), bank 0 at 6..7, bank 1 at 8..9
    x = rng.integers(-128, 128, (2, 8), dtype=np.int8)
    result = assert_matches_reference(program, x, 2)
    # output 3's weight row is what bank 0 holds when COMPUTE runs: x[0] for both inferences
    weights = layer.weights.copy()
    weights[3] = x[0]
    golden = dense_golden([layer._replace(weights=weights)], x)
    assert (golden[:, 3] != dense_golden([layer], x)[:, 3]).any()
    np.testing.assert_array_equal(result.out_flits.reshape(2, -1)[:, :4], golden)


def test_reference_refuses_a_compute_read_racing_an_input_write():
    """Weights overlapping bank 1: inference 1 is received into bank 1 while COMPUTE of inference 0 reads
    those words as weights, an order the contract leaves open: the reference refuses the run."""
    rng = np.random.default_rng(9)
    arch = lean_arch(rows=1, cols=2, lanes=4, sram_bytes=1024, max_tile_outputs=16, router_fifo_depth=2)
    program = build_program(arch, [_layer(rng, 8, 4)])
    set_registers(program.tiles[0], act_base=3)  # bank 0 at words 3..4, bank 1 at 5..6: both inside the weights
    x = rng.integers(-128, 128, (3, 8), dtype=np.int8)
    with pytest.raises(AssertionError, match=r"chain position 0: the input side writes SRAM word 5 in cycle \d+ "
                                             r"while COMPUTE of inference 0 .* reads it"):
        reference_run(program, pack_flits(x, 4), 3)
    reference_run(program, pack_flits(x[:1], 4), 1)   # one inference: no race


# --- hand-computed cycles of the three-sided PE (section 4, section 6 rule 4) ----------------------

def _hand_case(name):
    """Tiny programs whose every transfer is worked out by hand below (lanes 2, router FIFOs of depth 2,
    dense layers of K = 2 input words, I = N_o * K = 4 so COMPUTE lasts 6 cycles, E = 1, batch 3).
    Returns (program, x, expected): expected per chain position the input / compute / output times and
    (for some) the spans, plus the host's in_times and out_times."""
    rng = np.random.default_rng(17)
    lanes, batch = 2, 3
    if name == "one-tile":
        # One dense tile, n_out = L: one result word per inference, d = L * K_w = 2 * 2 = 4 = I, ring R =
        # ceil(16 / 2) = 8 words (never full here). The host writes flit i at cycle i (the W FIFO drains in
        # time); RECV of inference 0 at 1, 2 (a flit written at t is readable at t + 1); a_0 = c_0 = 2 + 1 = 3,
        # COMPUTE [3, a_0 + d + 2 = 9); inference 1 may start at c_0 = 3: RECV at 3, 4; EMIT of word 0 at
        # a_0 + d + 2 = 9, to the host at 10; c_1 = a_1 = max(4 + 1, a_0 + d + 2 = 9) = 9 (no term for the
        # EMIT of inference 0 any more: it would have been 10); inference 2 waits for c_1: RECV at 9, 10; EMIT
        # 1 at 9 + 6 = 15; c_2 = max(10 + 1, 9 + 6) = 15; EMIT 2 at 21.
        arch = lean_arch(rows=1, cols=1, lanes=lanes, sram_bytes=1024, max_tile_outputs=16, router_fifo_depth=2)
        layers = [_layer(rng, 4, 2)]
        expected = {"in_times": [0, 1, 2, 3, 4, 5], "out_times": [10, 16, 22], 0: {
            "input": [1, 2, 3, 4, 9, 10], "compute": [3, 9, 15], "output": [9, 15, 21],
            "spans": [(0, 3, "RECV"), (3, 5, "RECV"), (5, 11, "RECV"),
                      (3, 9, "COMPUTE"), (9, 15, "COMPUTE"), (15, 21, "COMPUTE"),
                      (0, 10, "EMIT"), (10, 16, "EMIT"), (16, 22, "EMIT")]}}
    elif name == "pass-tail":
        # The same tile followed by a pass-through tile (K = 0, P = 1, Q = 1): PE 0 runs exactly as above;
        # each EMIT (9, 15, 21) reaches PE 1 two cycles later (PASS at 11, 17, 23), is popped one cycle
        # after its push (12, 18, 24) and reaches the host one cycle later: 3 cycles more than without the
        # pass-through tile (section 6).
        arch = lean_arch(rows=1, cols=2, lanes=lanes, sram_bytes=1024, max_tile_outputs=16, router_fifo_depth=2)
        layers = [_layer(rng, 4, 2)]
        expected = {"in_times": [0, 1, 2, 3, 4, 5], "out_times": [13, 19, 25],
                    0: {"input": [1, 2, 3, 4, 9, 10], "compute": [3, 9, 15], "output": [9, 15, 21]},
                    1: {"input": [11, 17, 23], "compute": [], "output": [12, 18, 24],
                        "spans": [(0, 12, "PASS"), (12, 18, "PASS"), (18, 24, "PASS"),
                                  (0, 13, "FORWARD"), (13, 19, "FORWARD"), (19, 25, "FORWARD")]}}
    elif name in ("split", "split-queue-1"):
        # One dense layer (4 outputs) over two tiles of 2: tile 0 stores and forwards x (Q = 2 pops), tile 1
        # stores x and passes tile 0's result word (P = 1, Q = 1). A hop from PE 0's output to PE 1's input
        # takes 2 cycles (PE 0's L FIFO, PE 1's W FIFO). Both tiles: one result word, d = 4, R = 8.
        # "split": both tiles' queues all their free SRAM (hundreds of words, never full); "split-queue-1":
        # queue_words = 1 on both tiles.
        queue = None if name == "split" else 1
        arch = lean_arch(rows=1, cols=2, lanes=lanes, sram_bytes=1024, max_tile_outputs=16, router_fifo_depth=2)
        layers = [_layer(rng, 4, 4, tiles=2)]
        if queue is None:
            # PE 0: RECV 1, 2 (pushed), pops at 2, 3 (a word pushed at t can be popped from t + 1), c_0 = 3;
            # inference 1 is received at 3, 4 into the queue while COMPUTE 0 runs; EMIT 0 at 3 + 4 + 2 = 9,
            # then the queued pops at 10, 11; c_1 = max(4 + 1, 3 + 4 + 2) = 9; inference 2 at 9, 10 (>= c_1),
            # EMIT 1 at 9 + 6 = 15, pops at 16, 17; c_2 = max(10 + 1, 9 + 6) = 15, EMIT 2 at 21.
            # PE 1 receives each PE 0 output 2 cycles later: x at 4, 5 (c_0 = 6), r0 passed at 11; pop r0
            # at 12, EMIT 0 at max(12 + 1, c_0 + 4 + 2 = 12) = 13; inference 1: x at 12, 13, r1 at 17; c_1 =
            # max(13 + 1, 6 + 6) = 14; pop 18, EMIT 1 at max(19, 14 + 6) = 20; inference 2: x at 18, 19 (>= c_1),
            # r2 at 23; c_2 = max(19 + 1, 14 + 6) = 20; pop 24, EMIT 2 at max(25, 20 + 6) = 26; the host gets
            # each 1 cycle later.
            expected = {"in_times": [0, 1, 2, 3, 4, 5], "out_times": [13, 14, 19, 21, 25, 27],
                        0: {"input": [1, 2, 3, 4, 9, 10], "compute": [3, 9, 15],
                            "output": [2, 3, 9, 10, 11, 15, 16, 17, 21],
                            "spans": [(0, 3, "RECV"), (3, 5, "RECV"), (5, 11, "RECV"),
                                      (3, 9, "COMPUTE"), (9, 15, "COMPUTE"), (15, 21, "COMPUTE"),
                                      (0, 4, "FORWARD"), (4, 10, "EMIT"), (10, 12, "FORWARD"), (12, 16, "EMIT"),
                                      (16, 18, "FORWARD"), (18, 22, "EMIT")]},
                        1: {"input": [4, 5, 11, 12, 13, 17, 18, 19, 23], "compute": [6, 14, 20],
                            "output": [12, 13, 18, 20, 24, 26],
                            "spans": [(0, 6, "RECV"), (6, 12, "PASS"), (12, 14, "RECV"), (14, 18, "PASS"),
                                      (18, 20, "RECV"), (20, 24, "PASS"),
                                      (6, 12, "COMPUTE"), (14, 20, "COMPUTE"), (20, 26, "COMPUTE"),
                                      (0, 13, "FORWARD"), (13, 14, "EMIT"), (14, 19, "FORWARD"), (19, 21, "EMIT"),
                                      (21, 25, "FORWARD"), (25, 27, "EMIT")]}}
        else:
            # F = 1: a push needs an empty queue at the start of the cycle (a full queue is not pushable
            # in the cycle it is popped). PE 0: RECV 1 (push), pop 2, RECV 3 (push), pop 4, c_0 = 4;
            # inference 1: RECV at 5 (the queue was full at 4), then the queue stays full until the pops of
            # inference 1, which follow EMIT 0 at 4 + 4 + 2 = 10: pop 11, RECV 12, pop 13, c_1 = max(12 + 1,
            # 4 + 6) = 13; RECV 14, EMIT 1 at 19, pop 20, RECV 21, pop 22, c_2 = max(22, 19), EMIT 2 at 28.
            # The queue, not the result ring, bounds this tile: the same times as with the old result buffer.
            # The host's W FIFO (depth 2) fills up: flits written at 0, 1, 2, 4, 6, 13.
            # PE 1: x at 4, 6 (c_0 = 7), r0 at 12, pop 13, EMIT 14; x at 13, 15 (c_1 = max(16, 7 + 6)), r1 at
            # 21, pop 22, EMIT at max(23, 16 + 6) = 23; x at 22, 24 (c_2 = max(25, 16 + 6)), r2 at 30, pop 31,
            # EMIT 32.
            expected = {"in_times": [0, 1, 2, 4, 6, 13], "out_times": [14, 15, 23, 24, 32, 33],
                        0: {"input": [1, 3, 5, 12, 14, 21], "compute": [4, 13, 22],
                            "output": [2, 4, 10, 11, 13, 19, 20, 22, 28]},
                        1: {"input": [4, 6, 12, 13, 15, 21, 22, 24, 30], "compute": [7, 16, 25],
                            "output": [13, 14, 22, 23, 31, 32]}}
    else:
        raise ValueError(name)
    program = build_program(arch, layers, queue_words=queue if name.startswith("split") else None)
    if name == "split":
        assert min(t.config.queue_words for t in program.tiles) >= 400, "the split case's queues are never full"
    x = rng.integers(-128, 128, (batch, 4), dtype=np.int8)
    return program, layers, x, expected


HAND_CASES = ("one-tile", "pass-tail", "split", "split-queue-1")


@pytest.mark.parametrize("name", HAND_CASES)
def test_reference_hand_computed_cycles(name):
    """The reference itself against cycles worked out by hand from sections 3, 4 and 6."""
    program, layers, x, expected = _hand_case(name)
    batch = x.shape[0]
    flits, out_times, in_times, pes = reference_run(program, pack_flits(x, 2), batch)
    assert in_times.tolist() == expected["in_times"], "host input transfer cycles"
    assert out_times.tolist() == expected["out_times"], "host output transfer cycles"
    np.testing.assert_array_equal(flits.reshape(batch, -1)[:, :layers[-1].n_out], dense_golden(layers, x))
    for position, pe in enumerate(pes):
        if position not in expected:
            assert pe.idle, f"chain position {position} should be idle"
            continue
        want = expected[position]
        assert pe.input_times == want["input"], f"chain position {position}: input-side cycles"
        assert pe.compute_starts == want["compute"], f"chain position {position}: COMPUTE starts"
        assert pe.output_times == want["output"], f"chain position {position}: output-side cycles"
        if "spans" in want:
            assert pe.spans == want["spans"], f"chain position {position}: spans"


def test_pe_times_interface():
    """emulator.timing.PETimes: a frozen dataclass of exactly input, compute, output; TimingResult.pe_times
    holds one per chain position (None for an idle PE); the timelines use PHASE_SPAN_DTYPE."""
    import dataclasses
    from flowtile.emulator import PHASE_SPAN_DTYPE
    from flowtile.emulator.timing import PETimes
    assert dataclasses.is_dataclass(PETimes) and PETimes.__dataclass_params__.frozen
    assert [f.name for f in dataclasses.fields(PETimes)] == ["input", "compute", "output"]
    program, _, x, _ = _hand_case("pass-tail")
    program = build_program(program.arch.replace(cols=3), [_layer(np.random.default_rng(17), 4, 2)], tail="direct")
    result = emulate(program, pack_flits(x, 2), 3)
    assert len(result.timing.pe_times) == 3 and result.timing.pe_times[1] is None is result.timing.pe_times[2]
    assert isinstance(result.timing.pe_times[0], PETimes)
    assert [len(t) for t in result.tile_timelines] == [9, 0, 0]
    assert all(t.dtype == PHASE_SPAN_DTYPE for t in result.tile_timelines)


@pytest.mark.parametrize("name", HAND_CASES)
def test_emulator_hand_computed_cycles(name):
    """The emulator's PETimes and timelines against the same hand-computed cycles."""
    program, layers, x, expected = _hand_case(name)
    batch = x.shape[0]
    result = emulate(program, pack_flits(x, 2), batch)
    assert result.in_times.tolist() == expected["in_times"], "host input transfer cycles"
    assert result.out_times.tolist() == expected["out_times"], "host output transfer cycles"
    np.testing.assert_array_equal(result.out_flits.reshape(batch, -1)[:, :layers[-1].n_out], dense_golden(layers, x))
    for position, want in ((p, w) for p, w in expected.items() if isinstance(p, int)):
        pe_times = result.timing.pe_times[position]
        assert pe_times.input.tolist() == want["input"], f"chain position {position}: PETimes.input"
        assert pe_times.compute.tolist() == want["compute"], f"chain position {position}: PETimes.compute"
        assert pe_times.output.tolist() == want["output"], f"chain position {position}: PETimes.output"
        if "spans" in want:
            spans = [(int(s), int(e), str(p)) for s, e, p in result.tile_timelines[position]]
            assert spans == want["spans"], f"chain position {position}: tile_timelines"


def test_per_tile_queue_depths_set_the_interval():
    """Each tile's forward queue holds its own register queue_words (F, section 4; a region of its SRAM), not one
    depth for every tile. A dense layer of K = 8 input words split over two tiles, then a pass-through tile: tile 0
    forwards all 8 words of an inference through its queue, tile 1 passes 1, tile 2 passes 2. Tile 0's depth F_0
    alone sets the interval: the smaller F_0, the longer, down to F_0 = 8, beyond which nothing changes; tiles 1
    and 2 at F = 1 change nothing. Every run equals the cycle-stepping reference cycle by cycle (and the golden),
    and the reference's tile 0 queue fills to exactly F_0 words whenever F_0 <= 8."""
    rng = np.random.default_rng(31)
    arch = lean_arch(rows=1, cols=3, lanes=2, sram_bytes=1024, max_tile_outputs=16, router_fifo_depth=2)
    layers = [random_layer(rng, 16, 4, 2)]
    batch = 12
    x = rng.integers(-128, 128, (batch, 16), dtype=np.int8)
    golden = dense_golden(layers, x)
    base = build_program(arch, layers)

    def run(depths):
        program = build_program(arch, layers, queue_words=depths)
        assert [t.config.queued_words for t in program.tiles] == [8, 1, 2]
        for tile, plain, depth in zip(program.tiles, base.tiles, depths):   # only queue_words differs
            assert tile.config.replace(queue_words=plain.config.queue_words) == plain.config
            assert tile.config.queue_words == (plain.config.queue_words if depth is None else depth)
        result = assert_matches_reference(program, x, batch)
        np.testing.assert_array_equal(result.out_flits.reshape(batch, -1)[:, :4], golden)
        pes = reference_run(program, pack_flits(x, 2), batch)[3]
        last = result.out_times.reshape(batch, program.output_words)[:, -1]
        steady = np.diff(last)[batch // 2:]
        assert (steady == steady[0]).all(), f"queues {depths}: no steady interval, {np.diff(last)}"
        return int(steady[0]), pes[0].max_queued

    free = base.tiles[0].config.queue_words
    assert free >= 400
    intervals = {}
    for depth in (1, 2, 3, 4, 6, 7, 8, 12, None):
        intervals[depth], queued = run([depth, None, None])
        if depth is not None and depth <= 8:
            assert queued == depth, f"F_0 = {depth}: tile 0's queue held at most {queued} words"
        else:
            assert 8 <= queued <= min(depth or free, free)
    small = [intervals[d] for d in (1, 2, 3, 4, 6, 7, 8)]
    assert all(a > b for a, b in zip(small, small[1:])), f"intervals by F_0: {intervals}"
    assert intervals[8] == intervals[12] == intervals[None]
    assert intervals[1] > 1.5 * intervals[None]
    # the other tiles' depths do not bind here: F = 1 on tiles 1 and 2 leaves the interval alone
    assert run([None, 1, 1])[0] == intervals[None]
    assert run([1, 1, 1])[0] == intervals[1]


# --- the result ring (section 4): COMPUTE waits for a free ring slot -------------------------------

def _ring_case(name):
    """Tiny one-tile programs (lanes 2, router FIFOs of depth 1, batch 2) whose every transfer is worked out
    by hand below from section 4's ring rules. A depth-1 FIFO written at t is read at t + 1 and, being full at
    the start of t + 1, takes the next flit at t + 2: the output side emits at most every other cycle (the
    slow consumer), while COMPUTE could write a word a cycle. The host writes flit i when the W FIFO is
    empty, RECV reads it one cycle later. Returns (program, layers, input_shape, x, expected)."""
    lanes = 2
    rng = np.random.default_rng(18)
    if name.startswith("maxpool"):
        # a 1x1 max pool over one channel on a 1x3 map: K = 3 words, E = 3 words (one a pixel), d = KH*KW = 1
        # each, I = 3. Host flits written at 0, 2, 4, 6, 8, 10; inference 0 RECV at 1, 3, 5; inference 1 (its
        # first transfer >= c_0 = 6) at 7, 9, 11. a_0 = c_0 = 5 + 1 = 6 in every case.
        ring = {"maxpool-R1": 1, "maxpool-R2": 2, "maxpool-R8": 8}[name]
        layers, shape = [MaxPool(1, 1)], (1, 1, 3)
        x = rng.integers(-128, 128, (2, 3), dtype=np.int8)
        if ring == 1:
            # R = 1: word j waits for EMIT of word j - 1. EMIT 0 at a_0 + d + 2 = 9; a_1 = max(6 + 1, 9 + 1) =
            # 10, EMIT 1 at 13; a_2 = 14, EMIT 2 at 17; COMPUTE of 0 spans [6, 14 + 1 + 2 = 17). Inference 1:
            # a_3 = c_1 = max(RECV 11 + 1, a_2 + d + 2 = 17, EMIT 2 + 1 = 18) = 18, EMIT 3 at 21; a_4 = 22,
            # EMIT 4 at 25; a_5 = 26, EMIT 5 at 29; COMPUTE [18, 29). The host gets each EMIT one cycle later.
            expected = {"in_times": [0, 2, 4, 6, 8, 10], "out_times": [10, 14, 18, 22, 26, 30], 0: {
                "input": [1, 3, 5, 7, 9, 11], "compute": [6, 18], "output": [9, 13, 17, 21, 25, 29],
                "spans": [(0, 6, "RECV"), (6, 12, "RECV"), (6, 17, "COMPUTE"), (18, 29, "COMPUTE"),
                          (0, 18, "EMIT"), (18, 30, "EMIT")]}}
        elif ring == 2:
            # R = 2: a_1 = 7; a_2 waits for EMIT 0 at 9: a_2 = 10. EMIT 1 at >= 7 + 3 = 10, but the L FIFO
            # written at 9 is full at 10: 11; EMIT 2 at max(13, 10 + 3) = 13; COMPUTE [6, 13). Inference 1:
            # a_3 = c_1 = max(12, 10 + 1 + 2 = 13, EMIT 1 + 1 = 12) = 13; a_4 = max(14, EMIT 2 + 1 = 14) = 14;
            # EMIT 3 at max(13 + 2, 13 + 3) = 16; a_5 = max(15, EMIT 3 + 1 = 17) = 17; EMIT 4 at max(18, 14 +
            # 3) = 18; EMIT 5 at max(20, 17 + 3) = 20; COMPUTE [13, 20).
            expected = {"in_times": [0, 2, 4, 6, 8, 10], "out_times": [10, 12, 14, 17, 19, 21], 0: {
                "input": [1, 3, 5, 7, 9, 11], "compute": [6, 13], "output": [9, 11, 13, 16, 18, 20],
                "spans": [(0, 6, "RECV"), (6, 12, "RECV"), (6, 13, "COMPUTE"), (13, 20, "COMPUTE"),
                          (0, 14, "EMIT"), (14, 21, "EMIT")]}}
        else:
            # R = 8, never full: a = 6, 7, 8, COMPUTE [6, 11); EMITs at 9, max(10, 11) = 11, max(11, 13) = 13;
            # a_3 = c_1 = max(12, 8 + 1 + 2) = 12, a = 12, 13, 14, COMPUTE [12, 17); EMITs at max(15, 15) =
            # 15, max(16, 17) = 17, max(17, 19) = 19.
            expected = {"in_times": [0, 2, 4, 6, 8, 10], "out_times": [10, 12, 14, 16, 18, 20], 0: {
                "input": [1, 3, 5, 7, 9, 11], "compute": [6, 12], "output": [9, 11, 13, 15, 17, 19],
                "spans": [(0, 6, "RECV"), (6, 12, "RECV"), (6, 11, "COMPUTE"), (12, 17, "COMPUTE"),
                          (0, 14, "EMIT"), (14, 20, "EMIT")]}}
        arch = lean_arch(rows=1, cols=1, lanes=lanes, sram_bytes=1024, max_tile_outputs=lanes * ring, result_ring_words=ring,
                         router_fifo_depth=1)
    elif name == "mac-short-R2":
        # a 1x1 conv from one channel to N_o = 3 channels (L does not divide N_o) on a 1x2 map, a ring of a
        # pixel's result words (R = result_ring_words = 2): per pixel word 0 (channels 0, 1) of
        # d = L * K_w = 2 and the short word 1 (channel 2) of d = (3 mod 2) * K_w = 1; E = 4, I = 6.
        # Host flits written at 0, 2, 4, 6; RECV 1, 3 and (>= c_0) 5, 7.
        # Inference 0: a_0 = c_0 = 4, a_1 = 6; a_2 = max(6 + 1, EMIT 0 + 1) with EMIT 0 at 4 + 2 + 2 = 8: 9;
        # EMIT 1 at max(6 + 1 + 2, 8 + 2) = 10; a_3 = max(9 + 2, EMIT 1 + 1) = 11; EMIT 2 at max(12, 9 + 4) = 13;
        # EMIT 3 at max(15, 11 + 3) = 15; COMPUTE [4, 11 + 1 + 2 = 14). Inference 1: a_4 = c_1 = max(7 + 1, 11 +
        # 1 + 2 = 14, EMIT 2 + 1 = 14) = 14; a_5 = max(14 + 2, EMIT 3 + 1) = 16; EMIT 4 at max(17, 14 + 4) = 18;
        # a_6 = max(16 + 1, EMIT 4 + 1) = 19; EMIT 5 at max(20, 16 + 3) = 20; a_7 = max(19 + 2, EMIT 5 + 1) =
        # 21; EMIT 6 at max(22, 19 + 4) = 23; EMIT 7 at max(25, 21 + 3) = 25; COMPUTE [14, 24).
        arch = lean_arch(rows=1, cols=1, lanes=lanes, sram_bytes=1024, max_tile_outputs=3, result_ring_words=2,
                         router_fifo_depth=1)
        layers, shape = [Conv(np.array([3, -2, 5], np.int8).reshape(3, 1, 1, 1), [1, 2, 3], 2**30, 30)], (1, 1, 2)
        x = rng.integers(-40, 40, (2, 2), dtype=np.int8)
        expected = {"in_times": [0, 2, 4, 6], "out_times": [9, 11, 14, 16, 19, 21, 24, 26], 0: {
            "input": [1, 3, 5, 7], "compute": [4, 14], "output": [8, 10, 13, 15, 18, 20, 23, 25],
            "spans": [(0, 4, "RECV"), (4, 8, "RECV"), (4, 14, "COMPUTE"), (14, 24, "COMPUTE"),
                      (0, 16, "EMIT"), (16, 26, "EMIT")]}}
    else:
        raise ValueError(name)
    program = build_program(arch, layers, input_shape=shape)
    return program, layers, shape, x, expected


RING_CASES = ("maxpool-R1", "maxpool-R2", "maxpool-R8", "mac-short-R2")


def _check_ring_case(what, program, layers, shape, x, expected, in_times, out_times, flits, pe_times, spans):
    assert list(in_times) == expected["in_times"], f"{what}: host input transfer cycles"
    assert list(out_times) == expected["out_times"], f"{what}: host output transfer cycles"
    np.testing.assert_array_equal(flits, network_golden(layers, x, shape, program.arch.lanes),
                                  err_msg=f"{what}: output flits")
    want = expected[0]
    for name in ("input", "compute", "output"):
        assert list(pe_times[name]) == want[name], f"{what}: {name} cycles"
    assert spans == want["spans"], f"{what}: spans"


@pytest.mark.parametrize("name", RING_CASES)
def test_reference_hand_computed_ring(name):
    """The reference against ring waits worked out by hand (section 4: a_j, EMIT j - R, d_j per word)."""
    program, layers, shape, x, expected = _ring_case(name)
    assert program.arch.result_words == {"maxpool-R1": 1, "maxpool-R2": 2, "maxpool-R8": 8, "mac-short-R2": 2}[name]
    flits, out_times, in_times, pes = reference_run(program, _map_flits(program, x), len(x))
    pe = pes[0]
    _check_ring_case("reference", program, layers, shape, x, expected, in_times.tolist(), out_times.tolist(), flits,
                     dict(input=pe.input_times, compute=pe.compute_starts, output=pe.output_times), pe.spans)


@pytest.mark.parametrize("name", RING_CASES)
def test_emulator_hand_computed_ring(name):
    program, layers, shape, x, expected = _ring_case(name)
    result = emulate(program, _map_flits(program, x), len(x))
    times = result.timing.pe_times[0]
    _check_ring_case("emulator", program, layers, shape, x, expected, result.in_times.tolist(),
                     result.out_times.tolist(), result.out_flits,
                     dict(input=times.input.tolist(), compute=times.compute.tolist(), output=times.output.tolist()),
                     [(int(s), int(e), str(p)) for s, e, p in result.tile_timelines[0]])


@pytest.mark.parametrize("name", RING_CASES)
def test_ring_cases_long_batch(name):
    """The hand-computed ring programs over a batch past the probe: the emulator against the reference, cycle
    by cycle, and against plain sweeps."""
    program, layers, shape, _, _ = _ring_case(name)
    rng = np.random.default_rng(19)
    x = rng.integers(-128, 128, (3 * PROBE_BATCH, int(np.prod(shape))), dtype=np.int8)
    assert_long_batch(program, layers, shape, x)


@pytest.mark.parametrize("ring", [1, 2, 3])
@pytest.mark.parametrize("depth", [1, 2])
def test_ring_behind_a_slower_tile(ring, depth):
    """A max pool (E = 4 words of d = 1 per inference) with a ring of 1..3 words feeding a dense tile that
    computes 10 cycles per inference and receives inference s + 1 only once COMPUTE of s has begun: the
    pool's output side stalls on the link, its ring fills and its COMPUTE waits between words."""
    rng = np.random.default_rng(20 + ring)
    lanes = 2
    arch = lean_arch(rows=1, cols=2, lanes=lanes, sram_bytes=1024, max_tile_outputs=lanes * ring, result_ring_words=ring,
                     router_fifo_depth=depth)
    layers, shape = [MaxPool(1, 1), random_layer(rng, 8, 2, 1)], (1, 1, 4)
    program = build_program(arch, layers, input_shape=shape)
    assert program.arch.result_words == ring and program.tiles[0].config.result_words(lanes) == 4
    x = rng.integers(-128, 128, (3 * PROBE_BATCH, 4), dtype=np.int8)
    assert_long_batch(program, layers, shape, x)
    # the ring did make COMPUTE wait: some pool COMPUTE spans are longer than I + 2 = 6 cycles
    _, _, _, pes = reference_run(program, _map_flits(program, x[:6]), 6)
    assert max(end - start for start, end, phase in pes[0].spans if phase == "COMPUTE") > 6


@pytest.mark.parametrize("ring", [1, 2, 8])
def test_results_beyond_the_ring_run(ring):
    """E > R (validate no longer refuses it, section 4): a 1x1 max pool of 9 pixels x 2 words (E = 18) and a
    3x3 conv of 16 pixels x 1 word (E = 16), through rings of 1, 2 and 8 words: golden data and the reference
    cycle by cycle."""
    lanes = 2
    rng = np.random.default_rng(25)
    arch = lean_arch(rows=1, cols=2, lanes=lanes, sram_bytes=4096, max_tile_outputs=max(4, lanes * ring),
                     result_ring_words=max(2, ring), router_fifo_depth=2)
    program = build_program(arch, [MaxPool(1, 1)], input_shape=(3, 3, 3))   # n_out 4: R >= 2
    assert program.tiles[0].config.result_words(lanes) == 18 > program.arch.result_words
    x = rng.integers(-128, 128, (3, 27), dtype=np.int8)
    result = assert_matches_reference(program, x, 3, flits=_map_flits(program, x))
    np.testing.assert_array_equal(result.out_flits, network_golden([MaxPool(1, 1)], x, (3, 3, 3), lanes))
    conv = Conv(rng.integers(-128, 128, (2, 3, 3, 3), dtype=np.int8), rng.integers(-500, 500, 2), 2**30, 40,
                zp_in=3, pads=(1, 1, 1, 1))
    program = build_program(arch.replace(max_tile_outputs=lanes * ring, result_ring_words=ring), [conv],
                            input_shape=(3, 4, 4))
    assert (program.arch.result_words, program.tiles[0].config.result_words(lanes)) == (ring, 16)
    x = rng.integers(-128, 128, (3, 48), dtype=np.int8)
    result = assert_matches_reference(program, x, 3, flits=_map_flits(program, x))
    np.testing.assert_array_equal(result.out_flits, network_golden([conv], x, (3, 4, 4), lanes))


def test_short_last_word_under_a_small_ring():
    """MAC with N_o = 7 on 4 lanes (each pixel: a word of d = 4 * K_w, then a short one of 3 * K_w), the
    smallest ring the tile allows (R = 2), a depth-1 link and a split layer behind it."""
    rng = np.random.default_rng(26)
    lanes = 4
    conv = Conv(rng.integers(-128, 128, (7, 3, 2, 2), dtype=np.int8), rng.integers(-500, 500, 7), 2**30, 39,
                zp_in=-2, pads=(0, 0, 1, 1))
    layers, shape = [conv, random_layer(rng, 3 * 3 * 8, 6, 2)], (3, 3, 3)
    arch = lean_arch(rows=1, cols=3, lanes=lanes, sram_bytes=8192, max_tile_outputs=7, result_ring_words=2,
                     router_fifo_depth=1)
    program = build_program(arch, layers, input_shape=shape)
    assert program.arch.result_words == 2 and program.tiles[0].config.result_words(lanes) == 18
    assert program.tiles[0].config.result_word_issue_cycles(lanes) == [4 * 4, 3 * 4]
    x = rng.integers(-128, 128, (2 * PROBE_BATCH + 3, 27), dtype=np.int8)
    assert_long_batch(program, layers, shape, x)


def _smallest_ring(program, extra=0):
    """A copy of ``program`` on an arch whose result ring (``result_ring_words``) holds the most result words a
    pixel of any tile has plus ``extra`` words (R = that, and the parameter table the smallest that holds every
    tile's outputs, max_tile_outputs = L * R, as when R was the table's depth)."""
    lanes = program.arch.lanes
    widest = max([-(-t.config.n_out // lanes) for t in program.tiles if t.config.n_out] or [1])
    program = copy.deepcopy(program)
    program.arch = program.arch.replace(max_tile_outputs=lanes * (widest + extra), result_ring_words=widest + extra)
    program.validate()
    return program


def _random_ring(rng, program):
    """``program`` as drawn, or (40 %) on the smallest ring its tiles allow plus 0..2 words."""
    return program if rng.random() < 0.6 else _smallest_ring(program, int(rng.integers(0, 3)))


@pytest.mark.parametrize("extra", [0, 1, 4])
@pytest.mark.parametrize("seed", range(16))
def test_random_programs_over_ring_sizes(seed, extra):
    """Random dense, windowed, residual / concat and grouped programs on the smallest ring their tiles allow
    plus ``extra`` words: the emulator against the reference cycle by cycle, outputs against the golden."""
    rng = np.random.default_rng(15000 + seed)
    kind = seed % 4
    if kind == 0:
        program, layers, x, batch = random_program(rng)
        shape, flits = None, pack_flits(x, program.arch.lanes)
    else:
        draw = (random_windowed_program, random_residual_program, random_grouped_program)[kind - 1]
        program, layers, shape, x, batch = draw(rng, budget=15000) if kind != 2 else draw(rng, budget=15000,
                                                                                            concat=0.4)
        flits = _map_flits(program, x)
    program = _smallest_ring(program, extra)
    result = assert_matches_reference(program, x, batch, flits=flits)
    np.testing.assert_array_equal(result.out_flits, network_golden(layers, x, shape, program.arch.lanes))


def _draw_of_kind(rng, kind):
    """A random program of ``kind`` (0 dense, 1 windowed, 2 residual / concat, 3 grouped) as ``(program, layers,
    input shape, x, batch, input flits)``."""
    if kind == 0:
        program, layers, x, batch = random_program(rng)
        return program, layers, None, x, batch, pack_flits(x, program.arch.lanes)
    draw = (random_windowed_program, random_residual_program, random_grouped_program)[kind - 1]
    program, layers, shape, x, batch = draw(rng, budget=15000)
    return program, layers, shape, x, batch, _map_flits(program, x)


def _with_single_banks(rng, program):
    """A copy of ``program`` with ``single_bank = 1`` (section 4, "One bank") on a random half of its computing
    tiles of one context (at least one) whose weights do not overlap the first bank (TileConfig.validate), or None
    if it has none such."""
    program = copy.deepcopy(program)
    able = []
    for tile in program.tiles:
        if not tile.config.n_out or tile.later_contexts:
            continue
        try:
            tile.config.replace(single_bank=1).validate(program.arch)
        except ConfigError:
            continue
        able.append(tile)
    if not able:
        return None
    chosen = [tile for tile in able if rng.random() < 0.5] or [able[int(rng.integers(len(able)))]]
    for tile in chosen:
        tile.config = tile.config.replace(single_bank=1)
    program.validate()
    return program


@pytest.mark.parametrize("seed", range(48))
def test_random_single_bank_programs_match_reference(seed):
    """One activation bank on random tiles of random dense, windowed, residual / concat and grouped programs (the
    next inference's first input transfer after COMPUTE's end, section 4): the emulator against the cycle-stepping
    reference cycle by cycle (a third of them under host stalls), outputs against the golden."""
    rng = np.random.default_rng(31000 + seed)
    kind = seed % 4
    while True:
        program, layers, shape, x, batch, flits = _draw_of_kind(rng, kind)
        if batch >= 2 and (program := _with_single_banks(rng, program)) is not None:
            break
    pattern = random_host_pattern(rng) if seed % 3 == 2 else None
    result = assert_matches_reference(program, x, batch, flits=flits, host_pattern=pattern)
    np.testing.assert_array_equal(result.out_flits, network_golden(layers, x, shape, program.arch.lanes))


@pytest.mark.parametrize("seed", range(6))
def test_single_bank_long_batches_match_reference(seed):
    """Batches past the probe with one bank on random tiles: the probe and its extrapolation (or fallback) against
    the reference cycle by cycle and against plain sweeps of the whole batch."""
    rng = np.random.default_rng(32000 + seed)
    program = None
    while program is None:
        drawn, layers, _, _ = random_program(rng)
        program = _with_single_banks(rng, drawn)
    batch = int(rng.integers(2 * PROBE_BATCH, 3 * PROBE_BATCH))
    x = rng.integers(-128, 128, (batch, layers[0].n_in), dtype=np.int8)
    result = assert_matches_reference(program, x, batch)
    np.testing.assert_array_equal(result.out_flits.reshape(batch, -1)[:, :layers[-1].n_out], dense_golden(layers, x))
    plain = solve_timing(program, batch, probe_batch=None)
    np.testing.assert_array_equal(plain.out_times, result.out_times)


def _with_line_buffers(rng, program, doubled=1 / 3):
    """A copy of ``program`` with a line buffer (``stream_rows``, section 4 "Streaming rows") on every computing tile
    of one context that TileConfig.validate allows one: the fewest rows it needs, rounded up to a power of two, or
    (a ``doubled`` share of them) twice that; None if no tile takes one."""
    program = copy.deepcopy(program)
    taken = 0
    for tile in program.tiles:
        config = tile.config
        if not config.n_out or tile.later_contexts or tile.turns > 1:
            continue
        rows = 1 << (config.stream_rows_needed - 1).bit_length()
        try:
            streaming = config.replace(stream_rows=rows * (2 if rng.random() < doubled else 1))
            streaming.validate(program.arch)
        except ConfigError:
            continue
        tile.config = streaming
        taken += 1
    if not taken:
        return None
    program.validate()
    return program


@pytest.mark.parametrize("seed", range(48))
def test_random_line_buffer_programs_match_reference(seed):
    """Line buffers (section 4, "Streaming rows") on random windowed, grouped, residual and dense programs: an
    output row computes once its rows are in, a row waits for its slot; the emulator against the cycle-stepping
    reference cycle by cycle (a third under host stalls), outputs against the golden."""
    rng = np.random.default_rng(34000 + seed)
    kind = seed % 4
    while True:
        program, layers, shape, x, batch, flits = _draw_of_kind(rng, kind)
        if (program := _with_line_buffers(rng, program)) is not None:
            break
    pattern = random_host_pattern(rng) if seed % 3 == 2 else None
    result = assert_matches_reference(program, x, batch, flits=flits, host_pattern=pattern)
    np.testing.assert_array_equal(result.out_flits, network_golden(layers, x, shape, program.arch.lanes))


_WINDOW_REGISTERS = ("op", "in_height", "in_width", "words_per_pixel", "kernel_h", "kernel_w", "stride", "pad_top",
                     "pad_left", "out_row_begin", "out_rows", "out_width", "out_col_begin", "out_col_end")


def _with_interleaved_rows(rng, program, doubled=1 / 3):
    """A copy of ``program`` in which every layer split into output-channel groups of one band (consecutive tiles of
    one window, each after the first passing ``pass_per_pixel`` words a pixel) streams its rows interleaved (section 4
    "Streaming rows": ``interleave_rows = 1`` and a line buffer on each of its tiles, the fewest rows it needs as a
    power of two, or for a ``doubled`` share of the layers twice that), where TileConfig.validate allows it and the layer's last tile forwards
    nothing (its output is then the plain map); None if no layer qualifies."""
    program = copy.deepcopy(program)
    tiles = program.tiles
    runs: list[list[int]] = []
    for index, tile in enumerate(tiles):
        config = tile.config
        same = runs and all(getattr(tiles[runs[-1][-1]].config, name) == getattr(config, name)
                            for name in _WINDOW_REGISTERS)
        if config.n_out and config.pass_per_pixel and same and not tile.later_contexts:
            runs[-1].append(index)
        else:
            runs.append([index])
    taken = 0
    for run in runs:
        configs = [tiles[index].config for index in run]
        if len(run) < 2 or configs[-1].forwarded_words or any(tiles[index].later_contexts for index in run):
            continue
        rows = 1 << (configs[0].stream_rows_needed - 1).bit_length()
        rows *= 2 if rng.random() < doubled else 1
        try:
            configs = [config.replace(stream_rows=rows, interleave_rows=1) for config in configs]
            for config in configs:
                config.validate(program.arch)
        except ConfigError:
            continue
        for index, config in zip(run, configs):
            tiles[index].config = config
        taken += 1
    if not taken:
        return None
    program.validate()
    return program


@pytest.mark.parametrize("seed", range(24))
def test_random_interleaved_rows_match_reference(seed):
    """Layers split into channel groups of one band with their rows interleaved in the streams (register
    interleave_rows, section 4 "Streaming rows"): each group tile forwards input row after input row and, behind
    each, the pixels of the output rows it completes; the emulator against the cycle-stepping reference cycle by
    cycle (a third under host stalls), outputs against the golden."""
    rng = np.random.default_rng(36000 + seed)
    while True:
        program, layers, shape, x, batch = random_grouped_program(rng, budget=15000)
        if (interleaved := _with_interleaved_rows(rng, program)) is not None:
            break
    pattern = random_host_pattern(rng) if seed % 3 == 2 else None
    result = assert_matches_reference(interleaved, x, batch, flits=_map_flits(program, x), host_pattern=pattern)
    np.testing.assert_array_equal(result.out_flits, network_golden(layers, x, shape, program.arch.lanes))


def _in_turns(program, turns):
    """``program`` with every computing tile in ``turns`` turns (section 12) and ``replicas = turns``, its
    pass-through tiles passing ``turns`` inferences' words a program inference: the same registers as far as the
    hardware goes, which has no notion of turns."""
    turned = copy.deepcopy(program)
    for tile in turned.tiles:
        if tile.config.n_out:
            tile.turns = turns
        elif tile.config.n_pass:
            assert not tile.config.n_in_words
            tile.config = tile.config.replace(n_pass=turns * tile.config.n_pass)
    turned.replicas = turns
    turned.validate()
    return turned


@pytest.mark.parametrize("seed", range(24))
def test_tiles_in_turns_run_as_their_inferences(seed):
    """A tile of several turns runs its registers once per turn (section 12): every tile of a random program in 2
    or 3 turns is the same hardware as the program itself, so ``N`` program inferences must give exactly the
    outputs, host transfer cycles and per-tile transfer cycles of ``turns * N`` plain inferences (one bank on
    random tiles of a third of them, line buffers on another third)."""
    rng = np.random.default_rng(33000 + seed)
    program, layers, _, x, batch, flits = _draw_of_kind(rng, seed % 4)
    if seed % 3 == 0:
        program = _with_single_banks(rng, program) or program
    elif seed % 3 == 1:   # line buffers (section 4, "Streaming rows"): a row's slot may be a previous turn's
        program = _with_line_buffers(rng, program) or program
    turns = 2 + seed % 2
    count = max(2, batch // turns)   # two program inferences at least: a turn's edges reach into the one before
    flits = np.resize(flits, (turns * count * program.input_words, program.arch.lanes))
    plain = emulate(program, flits, turns * count)
    view, program_inferences = _in_turns(program, turns).program_inferences(turns * count)
    assert program_inferences == count
    turned = emulate(view, flits, count)
    np.testing.assert_array_equal(turned.out_flits, plain.out_flits)
    assert_same_times(turned.in_times, plain.in_times, "host input transfer cycles")
    assert_same_times(turned.out_times, plain.out_times, "host output transfer cycles")
    for position, times in enumerate(plain.timing.pe_times):
        if times is not None:
            for side in ("input", "compute", "output"):
                assert_same_times(getattr(turned.timing.pe_times[position], side), getattr(times, side),
                                  f"chain position {position}: {side} transfer cycles")


@pytest.mark.parametrize("change, message", [
    (lambda tile: setattr(tile, "turns", 0), r"turns must be a positive integer"),
    (lambda tile: setattr(tile, "turns", 1.5), r"turns must be a positive integer"),
    (lambda tile: (setattr(tile, "turns", 2), setattr(tile, "config", tile.config.replace(n_out=0))),
     r"turns = 2 but n_out = 0"),
    (lambda tile: (setattr(tile, "turns", 2), setattr(tile, "config", tile.config.replace(w_base=tile.config.act_base))),
     r"turns = 2, and its weights .* overlap its activation banks"),
])
def test_bad_turns_are_refused(change, message):
    program = _base_program()
    change(program.tiles[0])
    with pytest.raises(ProgramError, match=message):
        program.validate()


@pytest.mark.parametrize("seed", range(20))
def test_extrapolation_equals_plain_sweeps(seed):
    """Probe + extrapolation (including failed probes) give exactly the times sweeps give."""
    rng = np.random.default_rng(200 + seed)
    program, _, x, _ = random_program(rng)
    batch = 40
    plain = solve_timing(program, batch, probe_batch=None)
    for probe in (2, 3, 8):
        fast = solve_timing(program, batch, probe_batch=probe)
        for name, a, b in zip(plain.stream_names, plain.stream_times, fast.stream_times):
            np.testing.assert_array_equal(a, b, err_msg=f"{name}, probe {probe}")


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_deep_forwarding_chain_converges(depth):
    """A layer forwarded across six tiles with K >> 2D: every PE waits on the next one each inference."""
    rng = np.random.default_rng(300 + depth)
    arch = lean_arch(rows=2, cols=4, lanes=4, sram_bytes=16384, max_tile_outputs=64, router_fifo_depth=depth)
    layers = [_layer(rng, 96, 24, tiles=6), _layer(rng, 24, 5)]
    program = build_program(arch, layers)
    batch = 50
    plain = solve_timing(program, batch, probe_batch=None)
    fast = solve_timing(program, batch)
    for name, a, b in zip(plain.stream_names, plain.stream_times, fast.stream_times):
        np.testing.assert_array_equal(a, b, err_msg=name)
    x = rng.integers(-128, 128, (4, 96), dtype=np.int8)
    assert_matches_reference(program, x, 4)


def test_report_and_per_tile_statistics():
    rng = np.random.default_rng(11)
    arch = lean_arch(rows=2, cols=2, lanes=4, sram_bytes=4096, max_tile_outputs=64, router_fifo_depth=2)
    layers = [_layer(rng, 10, 9, tiles=2), _layer(rng, 9, 5)]
    program = build_program(arch, layers)
    batch = 4
    x = rng.integers(-128, 128, (batch, 10), dtype=np.int8)
    result = emulate(program, pack_flits(x, 4), batch)
    last = result.out_times[program.output_words - 1::program.output_words]
    assert result.interval_cycles == pytest.approx((last[-1] - last[0]) / (batch - 1))
    assert result.mac_utilization == pytest.approx((10 * 9 + 9 * 5) * batch / (result.cycles * 4 * 4))
    k_words = 3  # both layers read ceil(10 / 4) = ceil(9 / 4) = 3 words
    n_outs = {(0, 0): 8, (0, 1): 1, (1, 1): 5}
    for (row, col), n_out in n_outs.items():
        assert result.tile_busy_cycles[row, col] == (n_out * k_words + 2) * batch
        assert result.tile_macs[row, col] == n_out * k_words * 4 * batch
    assert result.tile_busy_cycles[1, 0] == 0  # the pass-through tile
    report = result.report()
    assert set(report) == {"cycles", "latency_cycles", "interval_cycles", "mac_utilization", "batch"}
    single = emulate(program, pack_flits(x[:1], 4), 1)
    assert single.interval_cycles == single.cycles == single.latency_cycles


# --- (2) functional results against numpy -----------------------------------------------------

def test_saturation_wrap_and_relu():
    rng = np.random.default_rng(12)
    arch = lean_arch(rows=1, cols=3, lanes=4, sram_bytes=4096, max_tile_outputs=64, router_fifo_depth=2)
    n_in = 8
    weights = np.full((6, n_in), 127, dtype=np.int8)
    bias = np.array([2**31 - 1, -2**31, 0, 0, 5, -5])   # outputs 0 and 1 wrap
    multiplier = np.array([2**30, 2**30, 2**31 - 1, 2**31 - 1, 2**30, 2**30])
    shift = np.array([31, 31, 1, 1, 3, 3])             # outputs 2 and 3 saturate
    relu = Dense(weights, bias, multiplier, shift, zp_out=-10, clamp_lo=-10, clamp_hi=127)
    plain = Dense(rng.integers(-128, 128, (3, 6), dtype=np.int8), rng.integers(-100, 100, 3), 2**30, 33)
    x = np.concatenate([np.full((1, n_in), 127), np.full((1, n_in), -128),
                        rng.integers(-128, 128, (3, n_in))]).astype(np.int8)
    for layers in ([relu], [relu, plain]):
        program = build_program(arch, layers)
        out = emulate(program, pack_flits(x, 4), len(x)).out_flits.reshape(len(x), -1)[:, :layers[-1].n_out]
        np.testing.assert_array_equal(out, dense_golden(layers, x))
    first = run_functional(build_program(arch, [relu]), pack_flits(x, 4), len(x)).out_flits
    values = first.reshape(len(x), -1)[:, :6].astype(int)
    assert values[0, 2] == 127 and values[1, 3] == -10          # saturated high / clamped at the ReLU floor
    acc0 = (2**31 - 1 + 127 * 127 * n_in + 2**31) % 2**32 - 2**31   # wrapped to a negative accumulator
    assert acc0 < 0 and values[0, 0] == max(-10, ((acc0 * 2**30 + 2**30) >> 31) - 10)
    assert (values >= -10).all()


def test_functional_streams_on_every_link():
    """Tile p's stream per inference: forwarded inputs ++ passed flits ++ its result words."""
    rng = np.random.default_rng(13)
    arch = lean_arch(rows=1, cols=3, lanes=2, sram_bytes=4096, max_tile_outputs=64, router_fifo_depth=2)
    layers = [_layer(rng, 4, 5, tiles=2)]
    program = build_program(arch, layers)
    x = rng.integers(-128, 128, (3, 4), dtype=np.int8)
    flits = pack_flits(x, 2)
    streams = run_functional(program, flits, 3).tile_out_flits
    golden = pack_flits(dense_golden(layers, x), 2).reshape(3, 3, 2)
    np.testing.assert_array_equal(streams[0].reshape(3, 4, 2)[:, :2], flits.reshape(3, 2, 2))
    np.testing.assert_array_equal(streams[0].reshape(3, 4, 2)[:, 2:], golden[:, :2])
    np.testing.assert_array_equal(streams[1].reshape(3, 3, 2), golden)
    np.testing.assert_array_equal(streams[2].reshape(3, 3, 2), golden)


# --- (3) programs the emulator must refuse --------------------------------------------------------

def _base_program():
    rng = np.random.default_rng(14)
    arch = lean_arch(rows=2, cols=2, lanes=2, sram_bytes=4096, max_tile_outputs=64, router_fifo_depth=2)
    return build_program(arch, [_layer(rng, 4, 4, tiles=2), _layer(rng, 4, 2)])


def _mutated(change):
    program = copy.deepcopy(_base_program())
    change(program)
    return program


@pytest.mark.parametrize("change,message", [
    (lambda p: set_registers(p.tiles[1], n_pass=2), r"reads n_in_words \+ n_pass = 2 \+ 2 = 4 flits per inference, but tile r0c0 sends it 3"),
    (lambda p: set_registers(p.tiles[3], n_pass=2), r"sends it 1"),
    (lambda p: set_registers(p.tiles[0], n_in_words=3), r"reads n_in_words \+ n_pass = 3 \+ 0 = 3 flits per inference, but the host sends it 2"),
    (lambda p: set_registers(p.tiles[2], n_in_words=0, n_pass=0, store_end=0, forward_end=0), r"tile r1c1: config register n_out = 2 requires n_in_words > 0"),
    (lambda p: set_registers(p.tiles[1], dest_row=1, dest_col=7), r"tile r0c1: config register dest_col = 7 outside 0..1"),
    (lambda p: set_registers(p.tiles[1], dest_row=0, dest_col=1), r"sends its flits to itself"),
    # back to the first tile: its L output would carry the host's stream and this one
    (lambda p: set_registers(p.tiles[2], dest_row=0, dest_col=0), r"output L, which host input also uses; contended"),
    (lambda p: set_registers(p.tiles[3], dest_host=0, dest_row=1, dest_col=1), r"output L, which tile r0c1 .* also uses"),
    (lambda p: set_registers(p.tiles[1], dest_host=1), r"sends 2 flits per inference to the host, the program's output needs 1"),
    (lambda p: p.tiles[0].params.__setitem__((0, 2), 63), r"shift 63, outside 1..62"),
    (lambda p: p.tiles[0].params.__setitem__((1, 1), 2**31), r"multiplier 2147483648"),
    (lambda p: p.tiles[0].params.__setitem__((0, 0), 2**31), r"bias 2147483648"),
    (lambda p: set_registers(p.tiles[0], clamp_lo=5, clamp_hi=4), r"tile r0c0: config registers clamp_lo = 5 > clamp_hi = 4"),
])
def test_inconsistent_programs_are_refused(change, message):
    """Register rules are the spec's (Program.validate, which the emulator runs first: ProgramError); what the
    exact data path needs beyond them is the emulator's (EmulatorError)."""
    program = _mutated(change)
    x = np.zeros((2, 4), dtype=np.int8)
    with pytest.raises((EmulatorError, ProgramError), match=message):
        emulate(program, pack_flits(x, 2), 2)


def test_unreached_configured_tile_is_refused():
    rng = np.random.default_rng(15)
    arch = lean_arch(rows=1, cols=3, lanes=2, sram_bytes=4096, max_tile_outputs=64, router_fifo_depth=2)
    program = build_program(arch, [_layer(rng, 4, 2)], tail="direct")
    program.tiles[2].config = program.tiles[2].config.replace(n_pass=1).with_queue(arch)
    with pytest.raises(EmulatorError, match=r"tile r0c2 .* no flits reach it"):
        emulate(program, np.zeros((2, 2), np.int8), 1)


@pytest.mark.parametrize("flits,batch,message", [
    (np.zeros((3, 2), np.int8), 2, r"shape \[3, 2\], expected \[4, 2\]"),
    (np.zeros((4, 3), np.int8), 2, r"expected \[4, 2\]"),
    (np.zeros((4, 2), np.float32), 2, r"must be int8"),
    (np.zeros((0, 2), np.int8), 0, r"batch must be a positive integer"),
])
def test_bad_input_is_refused(flits, batch, message):
    with pytest.raises(EmulatorError, match=message):
        emulate(_base_program(), flits, batch)


# --- (4) windowed layers (section 4.1): convolution and max pooling ------------------------------

def _random_clamp(rng, zp_out):
    lo = max(-128, zp_out) if rng.random() < 0.5 else -128
    hi = 127 if rng.random() < 0.8 else int(rng.integers(max(lo, 0), 128))
    return lo, hi


WINDOW_KINDS = ("conv", "maxpool", "depthwise", "average")


def _program_within_budget(rng, arch, layers, input_shape, max_batch, budget, queues):
    """The program of ``layers`` with a random tail and batch, and a random input, as
    ``(program, layers, input_shape, x, batch)``; None when the reference would take more than ``budget``.
    ``queues``: ``build_program``'s ``queue_words``."""
    program = build_program(arch, layers, tail="direct" if rng.random() < 0.3 else "pass", act_fill=rng,
                            input_shape=input_shape, queue_words=queues)
    batch = int(rng.integers(1, max_batch + 1))
    if _reference_cost(program, batch) > budget:
        return None
    program = _random_ring(rng, program)
    x = rng.integers(-128, 128, (batch, int(np.prod(input_shape))), dtype=np.int8)
    return program, layers, input_shape, x, batch


def _random_conv_requantization(rng, c_out, window):
    """Random (bias, multiplier, shift, zp_in, zp_out, clamp_lo, clamp_hi) of a convolution over ``window``
    lane values: mostly in range, 15 % with values that wrap and saturate."""
    if rng.random() < 0.15:  # wraps and saturates
        bias, multiplier, shift = (rng.integers(-2**31, 2**31, c_out), rng.integers(0, 2**31, c_out),
                                   rng.integers(1, 63, c_out))
    else:
        bias, multiplier = rng.integers(-2000, 2000, c_out), rng.integers(2**30, 2**31, c_out)
        shift = np.full(c_out, 31 + int(np.log2(window)) + 4)
    zp_in, zp_out = int(rng.integers(-128, 128)), int(rng.integers(-20, 21))
    return (bias, multiplier, shift, zp_in, zp_out, *_random_clamp(rng, zp_out))


def _random_window_layer(rng, shape, lanes, max_tiles, *, kind):
    """A random Conv, MaxPool, Depthwise or average-pool (all-one Depthwise) layer for an input map
    ``shape``, or None if the draw has no output. Pools and depthwise layers sometimes take a global
    window (the whole map, up to 9x9)."""
    channels, height, width = shape
    if kind != "conv" and rng.random() < 0.3:  # global pool / depthwise: one output pixel (or a few, padded)
        kh, kw, stride = height, width, int(rng.integers(1, 4))
        pads = (0, 0, 0, 0) if rng.random() < 0.7 else tuple(int(v) for v in rng.integers(0, 2, 4))
    else:
        kh, kw = int(rng.integers(1, 6)), int(rng.integers(1, 6))
        stride = int(rng.integers(1, 4))
        pads = (int(rng.integers(0, kh)), int(rng.integers(0, kw)), int(rng.integers(0, kh)),
                int(rng.integers(0, kw)))
    out_h = window_output_size(height, kh, stride, pads[0], pads[2])
    out_w = window_output_size(width, kw, stride, pads[1], pads[3])
    if out_h < 1 or out_w < 1:
        return None
    tiles = int(rng.integers(1, min(3, out_h, max_tiles) + 1))
    if kind == "maxpool":
        zp = int(rng.integers(-20, 21))
        lo, hi = _random_clamp(rng, zp)
        return MaxPool(kh, kw, stride, pads, lo, hi, tiles)
    if kind in ("depthwise", "average"):
        zp_in, zp_out = int(rng.integers(-128, 128)), int(rng.integers(-20, 21))
        lo, hi = _random_clamp(rng, zp_out)
        window = kh * kw
        if rng.random() < 0.15:  # wraps and saturates
            bias, multiplier, shift = (rng.integers(-2**31, 2**31, channels), rng.integers(0, 2**31, channels),
                                       rng.integers(1, 63, channels))
        elif kind == "average":  # M / 2^S ~= 1 / window (within 2x), bias folding the input zero point
            bias = -zp_in * window + rng.integers(-3, 4, channels)
            multiplier = rng.integers(2**30, 2**31, channels)
            shift = np.full(channels, 31 + int(np.ceil(np.log2(window))))
        else:
            bias, multiplier = rng.integers(-2000, 2000, channels), rng.integers(2**30, 2**31, channels)
            shift = np.full(channels, 31 + int(np.log2(window)) + 4)
        if kind == "average":
            return average_pool(channels, kh, kw, multiplier, shift, bias=bias, zp_in=zp_in, zp_out=zp_out,
                                clamp_lo=lo, clamp_hi=hi, stride=stride, pads=pads, tiles=tiles)
        weights = rng.integers(-128, 128, (channels, kh, kw), dtype=np.int8)
        return Depthwise(weights, bias, multiplier, shift, zp_in, zp_out, lo, hi, stride, pads, tiles)
    c_out = int(rng.integers(1, 21))
    weights = rng.integers(-128, 128, (c_out, channels, kh, kw), dtype=np.int8)
    window = kh * kw * -(-channels // lanes) * lanes
    bias, multiplier, shift, zp_in, zp_out, lo, hi = _random_conv_requantization(rng, c_out, window)
    return Conv(weights, bias, multiplier, shift, zp_in, zp_out, lo, hi, stride, pads, tiles)


def _reference_cost(program, batch):
    """Cycles one inference keeps its busiest tile going, times the batch (the reference steps them all)."""
    lanes = program.arch.lanes
    per_tile = [t.config.n_in_words + t.config.n_pass + t.config.compute_issue_cycles
                + t.config.result_words(lanes) for t in program.tiles]
    return batch * (max(per_tile) + sum(per_tile) // 4)


def random_windowed_program(rng, *, max_batch=4, budget=30000):
    """Seeded random chain of conv / max-pool / depthwise / average-pool layers (maps 3x3..9x9, channels
    1..20, kernels 1..5 or global windows for pools and depthwise, strides 1..3, paddings, row bands
    over 1-3 tiles), sometimes followed by dense layers after a
    flatten; redrawn until the cycle-stepping reference can run it in ``budget`` cycles or so; sometimes on
    the smallest result ring its tiles allow (section 4)."""
    while True:
        lanes = int(rng.choice([1, 2, 4, 8]))
        rows, cols = int(rng.integers(1, 3)), int(rng.integers(1, 4))
        arch = lean_arch(rows=rows, cols=cols, lanes=lanes, sram_bytes=lanes * 65536, max_tile_outputs=65535,
                         router_fifo_depth=int(rng.integers(1, 5)))
        queues = random_queue_words(rng, arch.n_tiles)
        shape = (int(rng.integers(1, 21)), int(rng.integers(3, 10)), int(rng.integers(3, 10)))
        input_shape = shape
        layers, used = [], 0
        for _ in range(int(rng.integers(1, 3))):
            if used >= arch.n_tiles:
                break
            kind = str(rng.choice(WINDOW_KINDS, p=[0.45, 0.2, 0.2, 0.15]))
            layer = _random_window_layer(rng, shape, lanes, arch.n_tiles - used, kind=kind)
            if layer is None:
                continue
            channels = layer.weights.shape[0] if isinstance(layer, Conv) else shape[0]
            top, left, bottom, right = layer.pads
            shape = (channels, window_output_size(shape[1], layer.kernel[0], layer.stride, top, bottom),
                     window_output_size(shape[2], layer.kernel[1], layer.stride, left, right))
            layers.append(layer)
            used += layer.tiles
        if not layers:
            continue
        if used < arch.n_tiles and rng.random() < 0.5:  # flatten, then dense layers
            n_in = shape[1] * shape[2] * -(-shape[0] // lanes) * lanes
            for _ in range(int(rng.integers(1, min(2, arch.n_tiles - used) + 1))):
                if used >= arch.n_tiles:
                    break
                n_out = int(rng.integers(1, 3 * lanes + 1))
                span = int(rng.integers(1, min(-(-n_out // lanes), arch.n_tiles - used) + 1))
                layers.append(random_layer(rng, n_in, n_out, span, extreme=rng.random() < 0.15))
                used += span
                n_in = n_out
        drawn = _program_within_budget(rng, arch, layers, input_shape, max_batch, budget, queues)
        if drawn is not None:
            return drawn


def _map_flits(program, x):
    return pack_flits(x, program.arch.lanes, program.input)


# 60 seeds (was 100): seeds 0-39 also run under host stalls below, and 60 more windowed programs run in
# test_random_windowed_programs_match_golden; the fast-path tests draw from the same generator.
@pytest.mark.parametrize("seed", range(60))
def test_random_windowed_programs_match_reference(seed):
    rng = np.random.default_rng(5000 + seed)
    program, layers, shape, x, batch = random_windowed_program(rng)
    flits = _map_flits(program, x)
    golden = network_golden(layers, x, shape, program.arch.lanes)
    np.testing.assert_array_equal(run_functional(program, flits, batch).out_flits, golden)
    assert_matches_reference(program, x, batch, flits=flits)


@pytest.mark.parametrize("seed", range(40))
def test_random_windowed_programs_under_host_stalls_match_reference(seed):
    """Windowed programs under host output stalls and input gaps, cycle by cycle against the reference."""
    rng = np.random.default_rng(5000 + seed)
    program, layers, shape, x, batch = random_windowed_program(rng)
    flits = _map_flits(program, x)
    golden = network_golden(layers, x, shape, program.arch.lanes)
    assert_matches_reference(program, x, batch, flits=flits, golden=golden, host_pattern=random_host_pattern(rng))


@pytest.mark.parametrize("seed", range(60))
def test_random_windowed_programs_match_golden(seed):
    """Larger programs, batches and maps than the reference can step: functional results only."""
    rng = np.random.default_rng(7000 + seed)
    program, layers, shape, x, _ = random_windowed_program(rng, budget=10**9)
    batch = int(rng.integers(1, 40))
    x = rng.integers(-128, 128, (batch, x.shape[1]), dtype=np.int8)
    result = emulate(program, _map_flits(program, x), batch)
    np.testing.assert_array_equal(result.out_flits, network_golden(layers, x, shape, program.arch.lanes))


def test_hand_computed_conv_and_pool():
    """Small cases worked out by hand: a 3x3 box filter with padding reading the input zero point,
    then max pooling whose padding never wins and whose ReLU floor also lifts the padding lane."""
    arch = lean_arch(rows=1, cols=2, lanes=2, sram_bytes=4096, max_tile_outputs=64, router_fifo_depth=2)
    x = np.arange(9, dtype=np.int8).reshape(1, 9)                  # one channel, 3x3 map [[0,1,2],[3,4,5],[6,7,8]]
    box = Conv(np.ones((1, 1, 3, 3), np.int8), [0], 1 << 30, 30, zp_in=5, pads=(1, 1, 1, 1))
    program = build_program(arch, [box], input_shape=(1, 3, 3))
    out = emulate(program, pack_flits(x, 2, program.input), 1).out_flits
    expected = [[8 + 25, 15 + 15, 12 + 25], [21 + 15, 36, 27 + 15], [20 + 25, 33 + 15, 24 + 25]]
    np.testing.assert_array_equal(out[:, 0].reshape(3, 3), expected)
    assert (out[:, 1] == 0).all()                                   # padding lane of a MAC result

    x = np.array([[1, -3, 2, 0, 5, -7, 4, -2, -1]], dtype=np.int8)
    pool = MaxPool(2, 2, stride=2, pads=(0, 0, 1, 1), clamp_lo=-5)
    program = build_program(arch, [pool], input_shape=(1, 3, 3))
    out = emulate(program, pack_flits(x, 2, program.input), 1).out_flits
    np.testing.assert_array_equal(out[:, 0].reshape(2, 2), [[5, 2], [4, -1]])
    np.testing.assert_array_equal(out[:, 1], [0, 0, 0, 0])          # padding lane: max(0, -128 pads) = 0
    program = build_program(arch, [pool._replace(clamp_lo=3)], input_shape=(1, 3, 3))
    out = emulate(program, pack_flits(x, 2, program.input), 1).out_flits
    np.testing.assert_array_equal(out, [[5, 3], [3, 3], [4, 3], [3, 3]])


def _conv_pool_dense(rng, arch, bands=(2, 1)):
    conv = Conv(rng.integers(-128, 128, (5, 3, 3, 3), dtype=np.int8), rng.integers(-500, 500, 5), 2**30, 40,
                zp_in=-3, zp_out=2, clamp_lo=2, stride=1, pads=(1, 1, 1, 1), tiles=bands[0])
    pool = MaxPool(2, 2, stride=2, tiles=bands[1])
    lanes = arch.lanes
    dense = random_layer(rng, 3 * 3 * -(-5 // lanes) * lanes, 7, 1)
    return [conv, pool, dense], (3, 6, 6)


def test_windowed_statistics():
    rng = np.random.default_rng(21)
    arch = lean_arch(rows=2, cols=3, lanes=4, sram_bytes=16384, max_tile_outputs=512, router_fifo_depth=2)
    layers, shape = _conv_pool_dense(rng, arch)
    program = build_program(arch, layers, input_shape=shape)
    batch = 3
    x = rng.integers(-128, 128, (batch, 3 * 6 * 6), dtype=np.int8)
    result = emulate(program, pack_flits(x, 4, program.input), batch)
    # conv bands of 3 rows x 6 columns, 5 channels, K_w = 3*3*1 words; pool 3x3 pixels, CW = 2, 2x2 windows
    issue = {(0, 0): 18 * 5 * 9, (0, 1): 18 * 5 * 9, (0, 2): 9 * 2 * 4, (1, 2): 7 * 18}
    for (row, col), cycles in issue.items():
        assert result.tile_busy_cycles[row, col] == (cycles + 2) * batch
        expected_macs = 0 if (row, col) == (0, 2) else cycles * 4 * batch
        assert result.tile_macs[row, col] == expected_macs
    macs = 6 * 6 * 5 * 3 * 9 + 0 + 3 * 3 * 8 * 7
    assert program.macs_per_inference == macs
    assert result.mac_utilization == pytest.approx(macs * batch / (result.cycles * 6 * 4))
    np.testing.assert_array_equal(result.out_flits, network_golden(layers, x, shape, 4))
    assert_matches_reference(program, x, batch, flits=pack_flits(x, 4, program.input))


def test_windowed_long_batch_matches_reference():
    """Batch past the probe through conv bands and a pool: extrapolation, cycle by cycle."""
    rng = np.random.default_rng(22)
    arch = lean_arch(rows=2, cols=2, lanes=8, sram_bytes=16384, max_tile_outputs=512, router_fifo_depth=1)
    conv = Conv(rng.integers(-128, 128, (4, 2, 2, 2), dtype=np.int8), rng.integers(-500, 500, 4), 2**30, 38,
                zp_in=7, stride=2, pads=(1, 0, 0, 1), tiles=2)
    pool = MaxPool(3, 2, stride=1, pads=(1, 1, 1, 0), tiles=2)
    layers, shape = [conv, pool], (2, 5, 4)
    program = build_program(arch, layers, input_shape=shape)
    batch = 3 * PROBE_BATCH
    x = rng.integers(-128, 128, (batch, 40), dtype=np.int8)
    assert_long_batch(program, layers, shape, x)


@pytest.mark.parametrize("change,message", [
    (lambda t: set_registers(t, n_out=t.config.n_out + 1), r"config register n_out = 5 must be words_per_pixel \* lanes = 4 for op = OP_MAX"),
    (lambda t: set_registers(t, stride=0), r"config register stride = 0 must be 1..3 when n_out > 0"),
    (lambda t: set_registers(t, kernel_w=0), r"config register kernel_w = 0 must be 1..255 when n_out > 0"),
    (lambda t: set_registers(t, out_rows=0), r"config register out_rows = 0 must be >= 1 when n_out > 0"),
])
def test_bad_window_registers_are_refused(change, message):
    arch = lean_arch(rows=1, cols=2, lanes=2, sram_bytes=4096, max_tile_outputs=64, router_fifo_depth=2)
    program = build_program(arch, [MaxPool(2, 2)], input_shape=(3, 3, 3))
    change(program.tiles[0])
    program.tiles[0].params = np.zeros((program.tiles[0].config.n_out, 3), np.int64)
    with pytest.raises((EmulatorError, ProgramError), match=message):
        emulate(program, np.zeros((18, 2), np.int8), 1)


@pytest.mark.parametrize("change,message", [
    (lambda t: set_registers(t, stream_rows=3), r"stream_rows = 3 must be a power of two"),
    (lambda t: set_registers(t, stream_rows=2), r"stream_rows = 2 is less than the 4 input rows"),
    (lambda t: set_registers(t, stream_rows=4, single_bank=1), r"the one store range must be the whole map"),
    (lambda t: set_registers(t, stream_rows=4, out_rows=3), r"reads input rows up to 3, not the map's last, 5"),
    (lambda t: set_registers(t, stream_rows=4, w_base=t.config.act_base), r"overlap the line buffer"),
    (lambda t: set_registers(t, stream_rows=4, act_base=4095), r"exceed sram_words = \d+ \(the line buffer\)"),
    (lambda t: set_registers(t, interleave_rows=1), r"interleave_rows = 1 requires a computing tile with a line buffer "
                                                    r"\(n_out = 4, stream_rows = 0"),
    (lambda t: set_registers(t, stream_rows=4, interleave_rows=1, n_in_words=37, forward_end=37),
     r"interleave_rows = 1: the input stream must be the map alone"),
    (lambda t: set_registers(t, stream_rows=4, interleave_rows=1, forward_end=18),
     r"forward_begin = 0, forward_end = 18 must forward the whole map \[0, n_in_words = 36\) or nothing"),
    (lambda t: set_registers(t, stream_rows=4, interleave_rows=1, out_col_begin=1),
     r"interleave_rows = 1: the band must be whole output rows \(out_col_begin = 1"),
    (lambda t: set_registers(t, stream_rows=4, interleave_rows=1, n_pass=3, queue_words=3),
     r"interleave_rows = 1: n_pass = 3 must be n_pix \* pass_per_pixel = 36 \* 0"),
])
def test_bad_line_buffers_are_refused(change, message):
    """Every rule of a line buffer (section 4, "Streaming rows") names the register and why, on a 3x3 depthwise
    layer of a 6x6 map (pad 1: output rows 0 and 1 read rows 0..2, so 4 rows are needed)."""
    rng = np.random.default_rng(24)
    arch = lean_arch(rows=1, cols=2, lanes=4, sram_bytes=4096, max_tile_outputs=64, router_fifo_depth=2)
    depthwise = Depthwise(rng.integers(-128, 128, (4, 3, 3), dtype=np.int8), rng.integers(-500, 500, 4), 2**30, 38,
                          zp_in=1, pads=(1, 1, 1, 1))
    program = build_program(arch, [depthwise], input_shape=(4, 6, 6))
    change(program.tiles[0])
    with pytest.raises((ConfigError, ProgramError), match=message):
        program.validate()


def test_line_buffer_rules_hold_beside_queued_words():
    """A line buffer whose tile queues words behind its first rows (here the second band, which passes the first
    band's results) must have a ring that holds an inference's results (its EMITs wait for those words); an ADD
    tile, and a tile of several turns, get none."""
    rng = np.random.default_rng(25)
    depthwise = Depthwise(rng.integers(-128, 128, (4, 3, 3), dtype=np.int8), rng.integers(-500, 500, 4), 2**30, 38,
                          zp_in=1, pads=(1, 1, 1, 1), tiles=2)
    arch = lean_arch(rows=1, cols=3, lanes=4, sram_bytes=4096, max_tile_outputs=64, router_fifo_depth=2,
                     result_ring_words=4)
    second = build_program(arch, [depthwise], input_shape=(4, 6, 6)).tiles[1].config
    assert second.n_pass and second.result_words(4) > 4
    with pytest.raises(ConfigError, match=r"more than the 4-word ring holds, after queued words"):
        second.replace(stream_rows=8).validate(arch)
    roomy = arch.replace(result_ring_words=64)
    second.replace(stream_rows=8).validate(roomy)
    program = build_program(roomy, [depthwise], input_shape=(4, 6, 6))
    program.tiles[1].config = program.tiles[1].config.replace(stream_rows=8)
    program.validate()
    program = build_program(roomy.replace(tile_contexts=2), [depthwise], input_shape=(4, 6, 6))
    program.tiles[1].later_contexts = (program.tiles[1].config.replace(stream_rows=8),)
    with pytest.raises(ProgramError, match=r"a line buffer \(stream_rows\) serves a tile of one context"):
        program.validate()
    layers, shape = _conv_residual(rng, 4, bands=(1, 1, 1))
    wide = arch.replace(cols=4, sram_bytes=16384)
    add_tile = next(t for t in build_program(wide, layers, input_shape=shape).tiles if t.config.op == OP_ADD)
    with pytest.raises(ConfigError, match=r"a line buffer serves op MAC, MAX or LANE on a map of whole pixels, not "
                                          r"op = OP_ADD"):
        add_tile.config.replace(stream_rows=1).validate(wide)


def test_large_batches_are_gathered_in_slices(monkeypatch):
    """The im2col gather works on slices of the batch when it would be large: same results."""
    rng = np.random.default_rng(23)
    arch = lean_arch(rows=2, cols=3, lanes=4, sram_bytes=16384, max_tile_outputs=512, router_fifo_depth=2)
    layers, shape = _conv_pool_dense(rng, arch)
    program = build_program(arch, layers, input_shape=shape)
    x = rng.integers(-128, 128, (7, 3 * 6 * 6), dtype=np.int8)
    flits = pack_flits(x, 4, program.input)
    import flowtile.emulator.functional as functional
    monkeypatch.setattr(functional, "IM2COL_ELEMENTS", 1000)      # about one inference a slice
    np.testing.assert_array_equal(run_functional(program, flits, 7).out_flits, network_golden(layers, x, shape, 4))


def test_more_results_than_the_ring_holds_run():
    """Program format 6 (section 4): E = 9 pixels x 2 words = 18 > R = 8 words is valid and runs (it was
    refused while the result buffer had to hold an inference's results)."""
    arch = lean_arch(rows=1, cols=1, lanes=2, sram_bytes=4096, max_tile_outputs=16, result_ring_words=8, router_fifo_depth=2)
    program = build_program(arch, [MaxPool(1, 1)], input_shape=(3, 3, 3))
    assert program.tiles[0].config.result_words(2) == 18 > arch.result_words == 8
    x = np.random.default_rng(27).integers(-128, 128, (4, 27), dtype=np.int8)
    result = assert_matches_reference(program, x, 4, flits=pack_flits(x, 2, program.input))
    np.testing.assert_array_equal(result.out_flits, network_golden([MaxPool(1, 1)], x, (3, 3, 3), 2))


# --- (5) op = LANE (section 4.1): depthwise convolution and average pools -------------------------

def test_hand_computed_depthwise_and_average_pool():
    """A 2x2 depthwise filter per channel (lane by lane, per-lane parameters), a global average pool
    rounding to nearest, and a padded average pool whose folded bias cancels the input zero point."""
    arch = lean_arch(rows=1, cols=2, lanes=2, sram_bytes=4096, max_tile_outputs=64, router_fifo_depth=2)
    x = np.concatenate([np.arange(9), np.full(9, 2)]).astype(np.int8).reshape(1, 18)   # 2 channels, 3x3
    weights = np.array([[[1, 0], [0, -1]], [[1, 1], [1, 1]]], np.int8)
    layer = Depthwise(weights, [0, 4], 1 << 30, [30, 31], zp_out=1)
    program = build_program(arch, [layer], input_shape=(2, 3, 3))
    tile = program.tiles[0]
    assert tile.config.op == OP_LANE and tile.config.n_out == 2 and tile.params.shape == (2, 3)
    np.testing.assert_array_equal(tile.sram[:4], [[1, 1], [0, 1], [0, 1], [-1, 1]])   # word ky*KW + kx
    out = emulate(program, pack_flits(x, 2, program.input), 1).out_flits
    # channel 0: x[y][x] - x[y+1][x+1] = -4, + 1; channel 1: (4 + 8) / 2 = 6, + 1
    np.testing.assert_array_equal(out, [[-3, 7]] * 4)

    x = np.arange(9, dtype=np.int8).reshape(1, 9)
    mean = average_pool(1, 3, 3, 954437177, 33)           # 954437177 / 2^33 ~= 1/9
    program = build_program(arch, [mean], input_shape=(1, 3, 3))
    out = emulate(program, pack_flits(x, 2, program.input), 1).out_flits
    np.testing.assert_array_equal(out, [[4, 0]])          # 36/9 (just above 4 - 1/2); padding lane clamp(zp_out)

    pool = average_pool(1, 2, 2, 1 << 30, 32, bias=12, zp_in=-3, stride=2, pads=(1, 1, 0, 0), clamp_lo=-1, zp_out=-1)
    program = build_program(arch, [pool], input_shape=(1, 3, 3))
    out = emulate(program, pack_flits(x, 2, program.input), 1).out_flits
    # acc = 12 + window sum of q (padding reads -3) = the window sum of the real values q + 3
    expected = []
    grid = np.pad(np.arange(9).reshape(3, 3), ((1, 0), (1, 0)), constant_values=-3)
    for oy in range(2):
        for ox in range(2):
            acc = 12 + grid[2 * oy:2 * oy + 2, 2 * ox:2 * ox + 2].sum()
            expected.append(max(-1, int(shift_round_half_even(int(acc) << 30, 32)) - 1))
    assert expected == [0, 1, 3, 8]   # real means 3/4 -> 1, 9/4 -> 2, 15/4 -> 4, 36/4 = 9, - 1
    np.testing.assert_array_equal(out[:, 0], expected)
    np.testing.assert_array_equal(out[:, 1], [-1] * 4)   # padding lane: clamp(zp_out = -1)


def _conv_depthwise_pool_dense(rng, lanes):
    conv = Conv(rng.integers(-128, 128, (5, 3, 3, 3), dtype=np.int8), rng.integers(-500, 500, 5), 2**30, 40,
                zp_in=-3, zp_out=2, clamp_lo=2, pads=(1, 1, 1, 1), tiles=2)
    depthwise = Depthwise(rng.integers(-128, 128, (5, 3, 3), dtype=np.int8), rng.integers(-500, 500, 5),
                          rng.integers(2**30, 2**31, 5), 36, zp_in=2, zp_out=-4, stride=2, pads=(1, 1, 0, 0))
    mean = average_pool(5, 3, 3, rng.integers(2**30, 2**31, 5), 35, bias=36, zp_in=-4, zp_out=3)
    dense = random_layer(rng, -(-5 // lanes) * lanes, 7, 1)
    return [conv, depthwise, mean, dense], (3, 6, 6)


def test_lane_statistics_and_chain():
    """Conv -> depthwise (stride 2) -> global average pool -> dense: LANE issue counts, lane-MACs,
    report MACs, golden data and the cycle-stepping reference."""
    rng = np.random.default_rng(31)
    arch = lean_arch(rows=2, cols=3, lanes=4, sram_bytes=16384, max_tile_outputs=512, router_fifo_depth=2)
    layers, shape = _conv_depthwise_pool_dense(rng, 4)
    program = build_program(arch, layers, input_shape=shape)
    batch = 3
    x = rng.integers(-128, 128, (batch, 3 * 6 * 6), dtype=np.int8)
    flits = pack_flits(x, 4, program.input)
    result = emulate(program, flits, batch)
    # conv bands of 3 rows; depthwise 3x3 pixels x CW = 2 x 3x3 window; mean 1 pixel x 2 x 3x3; dense 7 x 2 words
    issue = {(0, 0): 18 * 5 * 9, (0, 1): 18 * 5 * 9, (0, 2): 9 * 2 * 9, (1, 2): 1 * 2 * 9, (1, 1): 7 * 2}
    tiles = {(t.row, t.col): t for t in program.tiles}
    assert [tiles[(0, 2)].config.op, tiles[(1, 2)].config.op] == [OP_LANE, OP_LANE]
    for (row, col), cycles in issue.items():
        assert tiles[(row, col)].config.compute_issue_cycles == cycles
        assert result.tile_busy_cycles[row, col] == (cycles + 2) * batch
        assert result.tile_macs[row, col] == cycles * 4 * batch
    assert result.tile_macs[1, 0] == 0
    macs = 6 * 6 * 5 * 3 * 9 + 3 * 3 * 5 * 9 + 5 * 9 + 8 * 7
    assert program.macs_per_inference == macs
    golden = network_golden(layers, x, shape, 4)
    np.testing.assert_array_equal(result.out_flits, golden)
    assert_matches_reference(program, x, batch, flits=flits)


def test_lane_long_batch_and_slices(monkeypatch):
    """Past the probe (extrapolation) through LANE bands, and the im2col gather in slices."""
    rng = np.random.default_rng(32)
    arch = lean_arch(rows=2, cols=2, lanes=8, sram_bytes=16384, max_tile_outputs=512, router_fifo_depth=1)
    depthwise = Depthwise(rng.integers(-128, 128, (10, 3, 2), dtype=np.int8), rng.integers(-500, 500, 10),
                          2**30, 37, zp_in=7, stride=1, pads=(1, 0, 1, 1), clamp_lo=0, tiles=2)
    mean = average_pool(10, 2, 2, 2**31 - 1, 33, stride=2, tiles=2)
    layers, shape = [depthwise, mean], (10, 5, 4)
    program = build_program(arch, layers, input_shape=shape)
    batch = 3 * PROBE_BATCH
    x = rng.integers(-128, 128, (batch, 200), dtype=np.int8)
    flits = pack_flits(x, 8, program.input)
    result = assert_matches_reference(program, x, batch, flits=flits)
    golden = network_golden(layers, x, shape, 8)
    np.testing.assert_array_equal(result.out_flits, golden)
    import flowtile.emulator.functional as functional
    monkeypatch.setattr(functional, "IM2COL_ELEMENTS", 500)
    np.testing.assert_array_equal(run_functional(program, flits, batch).out_flits, golden)


def test_lane_weights_overlapping_activations():
    """A LANE tile whose weight words overlap activation bank 0: inference 0 reads its own inputs as
    weights, inference 1 (stored in bank 1) reads inference 0's."""
    rng = np.random.default_rng(33)
    arch = lean_arch(rows=1, cols=2, lanes=4, sram_bytes=1024, max_tile_outputs=16, router_fifo_depth=2)
    layer = Depthwise(rng.integers(-128, 128, (6, 2, 2), dtype=np.int8), rng.integers(-99, 99, 6), 2**30, 36)
    program = build_program(arch, [layer], input_shape=(6, 3, 2))
    set_registers(program.tiles[0], act_base=5)   # weights at words 0..7, bank 0 at words 5..16, bank 1 at 17..28
    x = rng.integers(-128, 128, (2, 36), dtype=np.int8)   # a third inference would overwrite bank 0 mid-COMPUTE
    result = assert_matches_reference(program, x, 2, flits=pack_flits(x, 4, program.input))
    first = emulate(program, pack_flits(x[:1], 4, program.input), 1)
    np.testing.assert_array_equal(result.out_flits[:first.out_flits.shape[0]], first.out_flits)


def test_global_average_pool_over_a_large_map():
    """A global window larger than any convolution kernel (kernel registers are 8 bits): 12x20."""
    rng = np.random.default_rng(34)
    arch = lean_arch(rows=1, cols=2, lanes=4, sram_bytes=65536, max_tile_outputs=64, router_fifo_depth=2)
    mean = average_pool(6, 12, 20, rng.integers(2**30, 2**31, 6), 38, bias=240 * 5, zp_in=-5, zp_out=-2)
    layers, shape = [mean], (6, 12, 20)
    program = build_program(arch, layers, input_shape=shape)
    assert (program.tiles[0].config.kernel_h, program.tiles[0].config.kernel_w) == (12, 20)
    x = rng.integers(-128, 128, (2, 6 * 240), dtype=np.int8)
    flits = pack_flits(x, 4, program.input)
    result = assert_matches_reference(program, x, 2, flits=flits)
    golden = network_golden(layers, x, shape, 4)
    np.testing.assert_array_equal(result.out_flits, golden)


@pytest.mark.parametrize("change,message", [
    (lambda t: set_registers(t, n_out=t.config.n_out + 1), r"config register n_out = 5 must be words_per_pixel \* lanes = 4 for op = OP_LANE"),
    (lambda t: t.params.__setitem__((3, 2), 0), r"output 3 has shift 0"),   # padding channel: valid shift too
])
def test_bad_lane_tiles_are_refused(change, message):
    arch = lean_arch(rows=1, cols=2, lanes=2, sram_bytes=4096, max_tile_outputs=64, router_fifo_depth=2)
    program = build_program(arch, [average_pool(3, 2, 2, 2**30, 32)], input_shape=(3, 3, 3))
    tile = program.tiles[0]
    change(tile)
    if tile.params.shape[0] != tile.config.n_out:
        tile.params = np.concatenate([tile.params, [[0, 0, 1]]])
    with pytest.raises((EmulatorError, ProgramError), match=message):
        emulate(program, np.zeros((18, 2), np.int8), 1)


# --- (6) several tensors in one stream (section 4.2): residual joins, op = ADD ---------------------

def _same_padding(kernel):
    before = (kernel - 1) // 2
    return before, kernel - 1 - before


def _random_add(rng, channels):
    """AddParams: usually a quantized add (zero points folded into the bias, M/2^S ~= 2^-22), sometimes
    wrapping and saturating parameters, sometimes per-channel ones."""
    mult_a, mult_b = (int(v) for v in rng.integers(0, 2**22 + 1, 2))
    if rng.random() < 0.2:
        mult_a = 2**22
    zp_a, zp_b, zp_out = int(rng.integers(-128, 128)), int(rng.integers(-128, 128)), int(rng.integers(-20, 21))
    lo, hi = _random_clamp(rng, zp_out)
    if rng.random() < 0.15:  # wraps and saturates
        return AddParams(mult_a, mult_b, rng.integers(0, 2**31, channels), rng.integers(1, 63, channels),
                         zp_out=zp_out, clamp_lo=lo, clamp_hi=hi, bias=rng.integers(-2**31, 2**31, channels))
    multiplier = rng.integers(2**30, 2**31, channels) if rng.random() < 0.5 else int(rng.integers(2**30, 2**31))
    return AddParams(mult_a, mult_b, multiplier, 53, zp_a, zp_b, zp_out, lo, hi)


def _random_same_shape_layer(rng, kind, channels_in, channels_out, lanes, height, tiles):
    """A stride-1 "same" Conv / Depthwise / MaxPool (kernel 1..3) from channels_in to channels_out."""
    kernel_h, kernel_w = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    (top, bottom), (left, right) = _same_padding(kernel_h), _same_padding(kernel_w)
    pads = (top, left, bottom, right)
    tiles = min(tiles, height)
    zp_in, zp_out = int(rng.integers(-128, 128)), int(rng.integers(-20, 21))
    lo, hi = _random_clamp(rng, zp_out)
    if kind == "maxpool":
        return MaxPool(kernel_h, kernel_w, 1, pads, lo, hi, tiles)
    if kind == "depthwise":
        window = kernel_h * kernel_w
        return Depthwise(rng.integers(-128, 128, (channels_in, kernel_h, kernel_w), dtype=np.int8),
                         rng.integers(-2000, 2000, channels_in), rng.integers(2**30, 2**31, channels_in),
                         31 + int(np.log2(window)) + 4, zp_in, zp_out, lo, hi, 1, pads, tiles)
    window = kernel_h * kernel_w * -(-channels_in // lanes) * lanes
    return Conv(rng.integers(-128, 128, (channels_out, channels_in, kernel_h, kernel_w), dtype=np.int8),
                rng.integers(-2000, 2000, channels_out), rng.integers(2**30, 2**31, channels_out),
                31 + int(np.log2(window)) + 4, zp_in, zp_out, lo, hi, 1, pads, tiles)


def _random_main_branch(rng, shape, lanes):
    """1 or 2 shape-preserving layers (the first may change the channel count, the last restores it)."""
    channels, height, _ = shape
    if rng.random() < 0.5:  # two layers: conv to other channels and back, or a pool / depthwise then conv
        first_kind = str(rng.choice(["conv", "maxpool", "depthwise"]))
        middle = int(rng.integers(1, 13)) if first_kind == "conv" else channels
        return [_random_same_shape_layer(rng, first_kind, channels, middle, lanes, height, int(rng.integers(1, 3))),
                _random_same_shape_layer(rng, "conv", middle, channels, lanes, height, int(rng.integers(1, 3)))]
    kind = str(rng.choice(["conv", "depthwise", "maxpool"]))
    return [_random_same_shape_layer(rng, kind, channels, channels, lanes, height, int(rng.integers(1, 3)))]


def _layer_tiles(layers):
    total = 0
    for layer in layers:
        if isinstance(layer, Residual):
            total += _layer_tiles(layer.main)
        elif isinstance(layer, Concat):
            total += _layer_tiles(layer.a_branch) + _layer_tiles(layer.b_branch)
        total += layer_bands(layer)
    return total


def _random_skip(rng):
    """Which ADD operand the skip is: "b" puts operand b first in the stream (operand_b_offset = 0)."""
    return "a" if rng.random() < 0.6 else "b"


def _random_residual(rng, shape, lanes, tiles):
    return Residual(_random_main_branch(rng, shape, lanes), _random_add(rng, shape[0]), tiles, _random_skip(rng))


def _random_concat_params(rng, channels):
    """ConcatParams like :func:`_random_add`: usually a quantized concat (zero points folded into the bias,
    M/2^S ~= 2^-22), sometimes wrapping and saturating or per-channel parameters."""
    mult_a, mult_b = (int(v) for v in rng.integers(0, 2**22 + 1, 2))
    if rng.random() < 0.3:
        (mult_a, mult_b) = (2**22, mult_b) if rng.random() < 0.5 else (mult_a, 2**22)
    zp_a, zp_b, zp_out = int(rng.integers(-128, 128)), int(rng.integers(-128, 128)), int(rng.integers(-20, 21))
    lo, hi = _random_clamp(rng, zp_out)
    if rng.random() < 0.15:  # wraps and saturates
        return ConcatParams(mult_a, mult_b, rng.integers(0, 2**31, channels), rng.integers(1, 63, channels),
                            zp_out=zp_out, clamp_lo=lo, clamp_hi=hi, bias=rng.integers(-2**31, 2**31, channels))
    multiplier = rng.integers(2**30, 2**31, channels) if rng.random() < 0.5 else int(rng.integers(2**30, 2**31))
    return ConcatParams(mult_a, mult_b, multiplier, 53, zp_a, zp_b, zp_out, lo, hi)


def _random_concat(rng, shape, lanes, tiles):
    """A Concat block on a map: operand a ends with a multiple of ``lanes`` channels (a conv, maybe after a
    pool / depthwise, or the identity if the input has such a channel count), operand b is the identity or
    1-2 "same" layers; sometimes a residual block nested after a branch's first layer; random ``first``.
    Returns the block and its output shape."""
    channels, height, _ = shape
    identity = None
    if rng.random() < 0.4:
        identity = "a" if channels % lanes == 0 and rng.random() < 0.5 else "b"
    a_branch, b_branch = [], []
    channels_a = channels_b = channels
    if identity != "a":
        channels_a = lanes * int(rng.integers(1, max(1, 8 // lanes) + 1))
        if rng.random() < 0.4:
            kind = str(rng.choice(["maxpool", "depthwise"]))
            a_branch.append(_random_same_shape_layer(rng, kind, channels, channels, lanes, height, int(rng.integers(1, 3))))
        a_branch.append(_random_same_shape_layer(rng, "conv", channels, channels_a, lanes, height, int(rng.integers(1, 3))))
    if identity != "b":
        kind = str(rng.choice(["conv", "depthwise", "maxpool"]))
        channels_b = int(rng.integers(1, 11)) if kind == "conv" else channels
        b_branch.append(_random_same_shape_layer(rng, kind, channels, channels_b, lanes, height, int(rng.integers(1, 3))))
        if rng.random() < 0.3:
            middle, channels_b = channels_b, int(rng.integers(1, 11))
            b_branch.append(_random_same_shape_layer(rng, "conv", middle, channels_b, lanes, height, 1))
    if rng.random() < 0.15:  # a residual block nested after a branch's first layer
        branch, branch_channels = ((a_branch, channels_a) if a_branch and (not b_branch or rng.random() < 0.5)
                                   else (b_branch, channels_b))
        branch_shape = (branch_channels,) + tuple(shape[1:])
        branch.append(_random_residual(rng, branch_shape, lanes, 1))
    block = Concat(a_branch, b_branch, _random_concat_params(rng, channels_a + channels_b), tiles,
                   first=str(rng.choice(["a", "b"])))
    return block, (channels_a + channels_b,) + tuple(shape[1:])


def random_residual_program(rng, *, lanes=None, depth=None, max_batch=3, budget=25000, concat=0.0):
    """Seeded random network with residual blocks: a feature map (channels 1..12, 2x2..5x5) through an
    optional layer, one or two residual blocks (main branches of 1-2 "same" conv / depthwise / max-pool
    layers over 1-2 row bands, ADD over 1-2 row bands, the skip as operand a or b, sometimes a block
    nested after a main layer), optionally a pool or a dense layer; or a flat vector through a residual
    block of dense layers. With probability ``concat`` each block is a Concat instead (section 4.3), flat
    ones included; if ``concat > 0`` the program has at least one. Redrawn until the cycle-stepping
    reference can run it in ``budget`` cycles or so; sometimes on the smallest result ring its tiles allow."""
    while True:
        lanes_now = int(rng.choice([1, 2, 4, 8])) if lanes is None else lanes
        if rng.random() < 0.25:  # flat: dense main branch, one ADD tile (or dense branches, one CONCAT tile)
            n = int(rng.integers(1, 4 * lanes_now + 1))
            if rng.random() < concat:
                n_a = lanes_now * int(rng.integers(1, 4))
                a_branch = [] if n % lanes_now == 0 and rng.random() < 0.3 else [random_layer(rng, n, n_a, 1)]
                n_a = n if not a_branch else n_a
                b_out = int(rng.integers(1, 3 * lanes_now + 1))
                b_branch = [] if a_branch and rng.random() < 0.3 else [random_layer(rng, n, b_out, 1)]
                if len(b_branch) and rng.random() < 0.4:
                    n_b = int(rng.integers(1, 3 * lanes_now + 1))
                    b_branch.append(random_layer(rng, b_out, n_b, int(rng.integers(1, min(2, -(-n_b // lanes_now)) + 1))))
                n_b = b_branch[-1].n_out if b_branch else n
                layers = [Concat(a_branch, b_branch, _random_concat_params(rng, n_a + n_b),
                                 first=str(rng.choice(["a", "b"])))]
                width = n_a + n_b
            else:
                middle = int(rng.integers(1, 4 * lanes_now + 1))
                first = random_layer(rng, n, middle, int(rng.integers(1, min(2, -(-middle // lanes_now)) + 1)))
                second = random_layer(rng, middle, n, int(rng.integers(1, min(2, -(-n // lanes_now)) + 1)))
                main = [first, second] if rng.random() < 0.7 else [random_layer(rng, n, n, 1)]
                layers = [Residual(main, _random_add(rng, n), 1, _random_skip(rng))]
                width = n
            if rng.random() < 0.4:
                layers.append(random_layer(rng, width, int(rng.integers(1, 3 * lanes_now + 1)), 1))
            input_shape, n_in = None, n
        else:
            shape = (int(rng.integers(1, 13)), int(rng.integers(2, 6)), int(rng.integers(2, 6)))
            input_shape, layers = shape, []
            if rng.random() < 0.5:  # the skip comes from a tile, not from the host
                kind = str(rng.choice(["conv", "depthwise"]))
                channels = int(rng.integers(1, 13)) if kind == "conv" else shape[0]
                layers.append(_random_same_shape_layer(rng, kind, shape[0], channels, lanes_now, shape[1], 1))
                shape = (channels,) + shape[1:]
            for block in range(int(rng.integers(1, 3))):
                tiles = int(rng.integers(1, min(2, shape[1]) + 1))
                if rng.random() < concat:
                    join, shape = _random_concat(rng, shape, lanes_now, tiles)
                    layers.append(join)
                    continue
                main = _random_main_branch(rng, shape, lanes_now)
                if rng.random() < 0.15:  # a block nested after the main branch's first layer
                    kind = str(rng.choice(["conv", "depthwise", "maxpool"]))
                    main = [_random_same_shape_layer(rng, kind, shape[0], shape[0], lanes_now, shape[1], 1),
                            _random_residual(rng, shape, lanes_now, 1)]
                layers.append(Residual(main, _random_add(rng, shape[0]), tiles, _random_skip(rng)))
            if rng.random() < 0.3:
                layers.append(MaxPool(2, 2, 2, (0, 0, 1, 1), tiles=1))
            elif rng.random() < 0.3:
                wire = shape[1] * shape[2] * -(-shape[0] // lanes_now) * lanes_now
                layers.append(random_layer(rng, wire, int(rng.integers(1, 2 * lanes_now + 1)), 1))
            n_in = int(np.prod(input_shape))
        needed = _layer_tiles(layers) + int(rng.integers(0, 2))
        rows = int(rng.integers(1, 4))
        cols = -(-needed // rows)
        if cols > 8:
            continue
        arch = lean_arch(rows=rows, cols=cols, lanes=lanes_now, sram_bytes=lanes_now * 65536, max_tile_outputs=65535,
                         router_fifo_depth=int(rng.integers(1, 5)) if depth is None else depth)
        queues = random_queue_words(rng, arch.n_tiles)
        program = build_program(arch, layers, tail="direct" if rng.random() < 0.3 else "pass", act_fill=rng,
                                input_shape=input_shape, queue_words=queues)
        if concat and not any(t.config.op == OP_CONCAT and t.config.n_out for t in program.tiles):
            continue
        batch = int(rng.integers(1, max_batch + 1))
        if _reference_cost(program, batch) <= budget:
            program = _random_ring(rng, program)
            x = rng.integers(-128, 128, (batch, n_in), dtype=np.int8)
            return program, layers, input_shape, x, batch


# 30 seeds (was 60): the concat families below draw from the same generator (with residual blocks too), and
# test_random_residual_programs_match_golden runs 30 more residual programs.
@pytest.mark.parametrize("seed", range(30))
def test_random_residual_programs_match_reference(seed):
    """Residual programs: data against the numpy golden, every flit time against the cycle-stepping reference."""
    rng = np.random.default_rng(9000 + seed)
    program, layers, shape, x, batch = random_residual_program(rng)
    flits = pack_flits(x, program.arch.lanes, program.input)
    golden = network_golden(layers, x, shape, program.arch.lanes)
    assert any(t.config.op == OP_ADD and t.config.n_out for t in program.tiles)
    result = assert_matches_reference(program, x, batch, flits=flits)
    np.testing.assert_array_equal(result.out_flits, golden)


@pytest.mark.parametrize("seed", range(30))
def test_random_residual_programs_match_golden(seed):
    """Larger batches than the reference steps (extrapolated timing checked against plain sweeps)."""
    rng = np.random.default_rng(9500 + seed)
    program, layers, shape, x, _ = random_residual_program(rng, budget=10**6)
    batch = int(rng.integers(2 * PROBE_BATCH + 1, 3 * PROBE_BATCH))
    x = rng.integers(-128, 128, (batch, x.shape[1]), dtype=np.int8)
    assert_long_batch(program, layers, shape, x, reference=False)


def test_hand_computed_identity_skip():
    """y = x + 2 * main(x) with main = a 1x1 max pool (a copy): every value is 3x plus the folded bias,
    clamped; the skip travels in front of the main branch's output."""
    arch = lean_arch(rows=1, cols=3, lanes=2, sram_bytes=1024, max_tile_outputs=16, router_fifo_depth=1)
    x = np.array([[1, -3, 40, 7, 0, -50]], dtype=np.int8)                 # 3 channels, 1x2 map
    add = AddParams(1, 2, 1 << 30, 30, zp_a=0, zp_b=-2, zp_out=5, clamp_lo=-100, clamp_hi=100)
    layers = [Residual([MaxPool(1, 1)], add)]
    program = build_program(arch, layers, input_shape=(3, 1, 2))
    pool, join = program.tiles[0].config, program.tiles[1].config
    assert (pool.n_in_words, pool.store_begin, pool.store_end, pool.forward_begin, pool.forward_end) \
        == (4, 0, 4, 0, 4)
    assert (join.op, join.n_in_words, join.store_begin, join.store_end, join.operand_a_offset,
            join.operand_b_offset, join.forward_end) == (OP_ADD, 8, 0, 8, 0, 4, 0)
    flits = pack_flits(x, 2, program.input)
    result = assert_matches_reference(program, x, 1, flits=flits)
    # channel c at pixel p: a + 2 * (b - (-2)) + 5 = 3a + 9 with a = b; padding lane (channel 3): clamp(zp_out)
    values = x.reshape(3, 2).T.astype(int)                          # [pixel, channel]
    expected = np.clip(3 * values + 9, -100, 100)
    np.testing.assert_array_equal(result.out_flits.reshape(2, 4)[:, :3], expected)
    np.testing.assert_array_equal(result.out_flits.reshape(2, 4)[:, 3], [5, 5])
    np.testing.assert_array_equal(result.out_flits, network_golden(layers, x, (3, 1, 2), 2))


def _conv_residual(rng, lanes, channels=6, size=(5, 4), bands=(2, 2, 2)):
    """Conv (split) -> Depthwise (split) main branch over a 6-channel map, ADD in row bands."""
    height, _ = size
    conv = Conv(rng.integers(-128, 128, (channels, channels, 3, 3), dtype=np.int8), rng.integers(-500, 500, channels),
                rng.integers(2**30, 2**31, channels), 41, zp_in=-7, zp_out=3, clamp_lo=3, pads=(1, 1, 1, 1),
                tiles=bands[0])
    depthwise = Depthwise(rng.integers(-128, 128, (channels, 3, 1), dtype=np.int8), rng.integers(-500, 500, channels),
                          2**30, 36, zp_in=3, zp_out=-2, pads=(1, 0, 1, 0), tiles=bands[1])
    add = AddParams(2**22, 3 * 2**20, rng.integers(2**30, 2**31, channels), 53, zp_a=-7, zp_b=-2, zp_out=1,
                    clamp_lo=1)
    return [Residual([conv, depthwise], add, tiles=bands[2])], (channels,) + tuple(size)


@pytest.mark.parametrize("lanes,depth,batch", [(4, 1, 3), (8, 1, 2), (8, 2, 4), (4, 4, 5), (2, 3, 2)])
def test_split_residual_block_across_archs(lanes, depth, batch):
    """Split main layers and a split ADD, several arch configurations: golden data, reference timing."""
    rng = np.random.default_rng(40 + lanes + depth)
    layers, shape = _conv_residual(rng, lanes)
    arch = lean_arch(rows=2, cols=4, lanes=lanes, sram_bytes=16384, max_tile_outputs=1024, router_fifo_depth=depth)
    program = build_program(arch, layers, input_shape=shape, act_fill=rng)
    x = rng.integers(-128, 128, (batch, int(np.prod(shape))), dtype=np.int8)
    flits = pack_flits(x, lanes, program.input)
    result = assert_matches_reference(program, x, batch, flits=flits)
    golden = network_golden(layers, x, shape, lanes)
    np.testing.assert_array_equal(result.out_flits, golden)
    assert len(np.unique(golden)) > 20        # not all clamped
    # the ADD tiles: I = n_pix * CW * 2 issue cycles, lane-MACs I * L
    words_per_pixel = -(-shape[0] // lanes)
    for tile, rows in zip(program.tiles[4:6], (3, 2)):
        issue = rows * shape[2] * words_per_pixel * 2
        assert tile.config.op == OP_ADD and tile.config.compute_issue_cycles == issue
        assert result.tile_busy_cycles[tile.row, tile.col] == (issue + 2) * batch
        assert result.tile_macs[tile.row, tile.col] == issue * lanes * batch


def test_residual_long_batch_matches_reference():
    """Batch past the probe with router_fifo_depth 1: the extrapolated timing, cycle by cycle."""
    rng = np.random.default_rng(41)
    layers, shape = _conv_residual(rng, 4, channels=3, size=(3, 3), bands=(2, 1, 2))
    arch = lean_arch(rows=2, cols=3, lanes=4, sram_bytes=8192, max_tile_outputs=256, result_ring_words=64,
                     router_fifo_depth=1)
    program = build_program(arch, layers, input_shape=shape)
    batch = 3 * PROBE_BATCH
    x = rng.integers(-128, 128, (batch, 27), dtype=np.int8)
    assert_long_batch(program, layers, shape, x)


def test_skip_forwarded_through_split_layers():
    """The stream on every link of a dense residual block: X ++ partial results, X ++ the main layers'
    outputs, then the sum (section 4.2: forwarded words ++ passed words ++ results)."""
    rng = np.random.default_rng(42)
    lanes, n, middle = 2, 5, 6
    first, second = random_layer(rng, n, middle, 3), random_layer(rng, middle, n, 2)
    add = AddParams(2**21, 2**22, 2**31 - 1, 54, zp_a=3, zp_b=first.zp_out, zp_out=-4)
    layers = [Residual([first, second], add)]
    arch = lean_arch(rows=2, cols=3, lanes=lanes, sram_bytes=4096, max_tile_outputs=64, router_fifo_depth=2)
    program = build_program(arch, layers)
    batch = 3
    x = rng.integers(-128, 128, (batch, n), dtype=np.int8)
    flits = pack_flits(x, lanes)
    streams = run_functional(program, flits, batch).tile_out_flits

    def words(values):
        return pack_flits(values, lanes).reshape(batch, -1, lanes)

    skip = words(x)                                                      # 3 words
    hidden = words(dense_golden([first], x))                             # 3 words, 1 per first-layer tile
    main = words(dense_golden([first, second], x))                       # 3 words: 2 + 1
    out = network_golden(layers, x, None, lanes).reshape(batch, -1, lanes)   # padding lane: clamp(zp_out)
    np.testing.assert_array_equal(out[:, :, :].reshape(batch, -1)[:, :n], dense_golden(layers, x))
    expected = [np.concatenate([skip, hidden[:, :1]], axis=1), np.concatenate([skip, hidden[:, :2]], axis=1),
                np.concatenate([skip, hidden], axis=1),                  # the last first-layer tile keeps X
                np.concatenate([skip, hidden, main[:, :2]], axis=1),     # a split later layer forwards everything
                np.concatenate([skip, main], axis=1),                    # ... its last tile only X
                out]
    for position, stream in enumerate(expected):
        np.testing.assert_array_equal(streams[position].reshape(batch, -1, lanes), stream, err_msg=f"tile {position}")
    configs = [t.config for t in program.tiles]
    assert [(c.store_begin, c.store_end, c.forward_begin, c.forward_end) for c in configs] == \
        [(0, 3, 0, 3)] * 3 + [(3, 6, 0, 6), (3, 6, 0, 3), (0, 6, 0, 0)]
    assert_matches_reference(program, x, batch)


def test_nested_residual_blocks():
    """A block nested inside a main branch: the stream carries two skips at once."""
    rng = np.random.default_rng(43)
    lanes, channels, shape = 4, 5, (5, 3, 3)
    inner = Residual([_random_same_shape_layer(rng, "conv", channels, channels, lanes, 3, 2)],
                     _random_add(rng, channels), tiles=2)
    outer = Residual([_random_same_shape_layer(rng, "depthwise", channels, channels, lanes, 3, 1), inner],
                     _random_add(rng, channels))
    layers = [outer, MaxPool(2, 2, 1)]
    arch = lean_arch(rows=2, cols=4, lanes=lanes, sram_bytes=16384, max_tile_outputs=512, router_fifo_depth=2)
    program = build_program(arch, layers, input_shape=shape, act_fill=rng)
    k_map = 9 * 2
    inner_add = program.tiles[4].config
    assert (inner_add.n_in_words, inner_add.store_begin, inner_add.operand_a_offset,
            inner_add.operand_b_offset) == (3 * k_map, k_map, 0, k_map)
    x = rng.integers(-128, 128, (3, 45), dtype=np.int8)
    result = assert_matches_reference(program, x, 3, flits=pack_flits(x, lanes, program.input))
    np.testing.assert_array_equal(result.out_flits, network_golden(layers, x, shape, lanes))


@pytest.mark.parametrize("keep,forward", [("skip", (0, 3)), ("main", (3, 6)), ("middle", (2, 5))])
def test_tile_that_only_forwards_part_of_its_stream(keep, forward):
    """A tile without COMPUTE that forwards a part of its RECV words: the others are read without waiting
    for forward-queue space and dropped."""
    rng = np.random.default_rng(44)
    lanes = 2
    first = random_layer(rng, 6, 6, 2)
    layers = [Residual([first], AddParams(1, 1, 1 << 30, 30))]
    arch = lean_arch(rows=1, cols=4, lanes=lanes, sram_bytes=4096, max_tile_outputs=64, router_fifo_depth=1)
    program = build_program(arch, layers)
    drop = program.tiles[2]
    assert drop.config.op == OP_ADD
    config = TileConfig(n_in_words=6, forward_begin=forward[0], forward_end=forward[1],
                        dest_row=drop.config.dest_row, dest_col=drop.config.dest_col).with_queue(arch)
    drop.config, drop.sram, drop.params = config, np.zeros((0, lanes), np.int8), np.zeros((0, 3), np.int64)
    batch = 4
    x = rng.integers(-128, 128, (batch, 6), dtype=np.int8)
    result = assert_matches_reference(program, x, batch)
    stream = np.concatenate([x, dense_golden([first], x)], axis=1)   # X ++ main, 3 words each
    expected = stream[:, 2 * forward[0]:2 * forward[1]]
    np.testing.assert_array_equal(result.out_flits.reshape(batch, -1), expected)


def _residual_base():
    rng = np.random.default_rng(45)
    arch = lean_arch(rows=1, cols=4, lanes=2, sram_bytes=4096, max_tile_outputs=64, router_fifo_depth=2)
    layers = [Residual([MaxPool(1, 1), MaxPool(3, 3, 1, (1, 1, 1, 1))], _random_add(rng, 3), tiles=2)]
    return build_program(arch, layers, input_shape=(3, 2, 2))


@pytest.mark.parametrize("change,message", [
    (lambda t: set_registers(t[2], add_mult_b=2**22 + 1),
     r"tile r0c2: config register add_mult_b = 4194305 exceeds ADD_MULT_MAX = 4194304 for op = OP_ADD"),
    (lambda t: set_registers(t[3], add_mult_a=2**23 - 1), r"tile r0c3: config register add_mult_a = 8388607 exceeds"),
    (lambda t: set_registers(t[2], operand_b_offset=9),
     r"tile r0c2: config registers operand_b_offset \+ in_height \* in_width \* words_per_pixel = 9 \+ 2 \* 2 \* 2 = "
     r"17 exceed the 16 stored words \(store_end - store_begin\) for op = OP_ADD \(operand b must lie inside them\)"),
    (lambda t: set_registers(t[2], operand_b_offset=7),
     r"tile r0c2: config registers operand_a_offset = 0 and operand_b_offset = 7 make the operands overlap"),
    (lambda t: set_registers(t[3], operand_a_offset=4, operand_b_offset=12),
     r"tile r0c3: config registers operand_b_offset \+ .* = 20 exceed the 16 stored words"),
    (lambda t: set_registers(t[2], operand_a_offset=8, operand_b_offset=1),
     r"tile r0c2: config registers operand_a_offset = 8 and operand_b_offset = 1 make the operands overlap"),
    (lambda t: set_registers(t[2], store_begin=1),
     r"tile r0c2: config registers operand_b_offset \+ .* = 16 exceed the 15 stored words"),
    (lambda t: set_registers(t[2], op=6),
     r"tile r0c2: config register op = 6 is not an op \(known: 0 \(OP_MAC\), .*5 \(OP_BCAST\)\)"),
    (lambda t: set_registers(t[3], out_width=1),
     r"tile r0c3: config register out_width = 1 must equal in_width = 2 for op = OP_ADD"),
    (lambda t: set_registers(t[3], out_rows=2),
     r"tile r0c3: config registers out_row_begin \+ out_rows = 3 exceed in_height = 2 for op = OP_ADD"),
    (lambda t: set_registers(t[2], kernel_w=1),
     r"tile r0c2: config register kernel_w = 1 must be 2 for op = OP_ADD \(kernel 1x2, stride 1, no padding\)"),
    (lambda t: set_registers(t[2], n_out=2),
     r"tile r0c2: config register n_out = 2 must be words_per_pixel \* lanes = 4 for op = OP_ADD"),
    (lambda t: set_registers(t[1], store_begin=2, store_end=8),
     r"tile r0c1: config registers store_end - store_begin = 6 stored words differ from in_height \* in_width \* "
     r"words_per_pixel = 2 \* 2 \* 2 = 8"),
    (lambda t: set_registers(t[0], forward_end=9),
     r"tile r0c0: config registers forward_begin = 0, forward_end = 9 must satisfy forward_begin <= forward_end <= "
     r"n_in_words = 8"),
    (lambda t: set_registers(t[1], forward_end=7),
     r"tile r0c2 .*reads n_in_words \+ n_pass = 16 \+ 0 = 16 flits per inference, but tile r0c1 sends it 15"),
])
def test_bad_residual_programs_are_refused(change, message):
    """Register rules (section 4.2): Program.validate names tile and register; the data path (flit counts) is the
    emulator's. Every entry point of the emulator refuses them: trace_data_path validates first."""
    from flowtile.emulator.path import trace_data_path
    program = _residual_base()
    change(program.tiles)
    x = np.zeros((8, 2), np.int8)
    with pytest.raises((EmulatorError, ProgramError), match=message):
        trace_data_path(program)
    with pytest.raises((EmulatorError, ProgramError), match=message):
        emulate(program, x, 1)


def test_hand_computed_skip_as_operand_b():
    """Residual(skip="b"): y = add(a = main(x), b = x), operand b first in the stream (operand_b_offset = 0,
    operand_a_offset = x's words). main = a 1x1 max pool raised to 0 (a ReLU copy), so swapping the
    operands would change every negative value."""
    arch = lean_arch(rows=1, cols=3, lanes=2, sram_bytes=1024, max_tile_outputs=16, router_fifo_depth=1)
    x = np.array([[1, -3, 40, -7, 0, -50], [-128, 127, -1, 2, -60, 60]], dtype=np.int8)   # 3 channels, 1x2 map
    add = AddParams(1, 2, 1 << 30, 30, zp_a=-2, zp_b=0, zp_out=5, clamp_lo=-100, clamp_hi=100)
    layers = [Residual([MaxPool(1, 1, clamp_lo=0)], add, skip="b")]
    program = build_program(arch, layers, input_shape=(3, 1, 2))
    join = program.tiles[1].config
    assert (join.op, join.store_begin, join.store_end, join.operand_a_offset, join.operand_b_offset) \
        == (OP_ADD, 0, 8, 4, 0)
    flits = pack_flits(x, 2, program.input)
    result = assert_matches_reference(program, x, 2, flits=flits)
    values = x.reshape(2, 3, 2).transpose(0, 2, 1).astype(int)            # [batch, pixel, channel]
    expected = np.clip(np.maximum(values, 0) + 2 * values + 2 + 5, -100, 100)   # bias = -(zp_a*1 + zp_b*2) = 2
    out = result.out_flits.reshape(2, 2, 4)
    np.testing.assert_array_equal(out[..., :3], expected)
    np.testing.assert_array_equal(out[..., 3], 5)                         # padding channel: clamp(zp_out)
    np.testing.assert_array_equal(result.out_flits, network_golden(layers, x, (3, 1, 2), 2))


def test_add_operands_inside_a_larger_stored_region():
    """Both operand offsets non-zero: the inner ADD of a nested block also stores the outer skip in front of
    its operands (store_begin = 0, offsets shifted by its words): same results, same timing."""
    rng = np.random.default_rng(46)
    lanes, channels, shape = 4, 5, (5, 3, 3)
    inner = Residual([_random_same_shape_layer(rng, "conv", channels, channels, lanes, 3, 1)],
                     _random_add(rng, channels), tiles=2, skip="b")
    outer = Residual([_random_same_shape_layer(rng, "depthwise", channels, channels, lanes, 3, 1), inner],
                     _random_add(rng, channels))
    arch = lean_arch(rows=2, cols=3, lanes=lanes, sram_bytes=16384, max_tile_outputs=512, router_fifo_depth=2)
    program = build_program(arch, [outer], input_shape=shape, act_fill=rng)
    x = rng.integers(-128, 128, (3, 45), dtype=np.int8)
    flits = pack_flits(x, lanes, program.input)
    plain = emulate(program, flits, 3)
    k_map = 9 * 2
    for tile in program.tiles[2:4]:
        config = tile.config
        assert (config.store_begin, config.operand_a_offset, config.operand_b_offset) == (k_map, k_map, 0)
        set_registers(tile, store_begin=0, operand_a_offset=2 * k_map, operand_b_offset=k_map)
        tile.config = tile.config.with_queue(arch)   # the larger banks: the queue (still thousands of words) behind
        tile.sram = rng.integers(-128, 128, (3 * k_map, lanes), dtype=np.int8)
    result = assert_matches_reference(program, x, 3, flits=flits)
    np.testing.assert_array_equal(result.out_flits, plain.out_flits)
    np.testing.assert_array_equal(result.out_flits, network_golden([outer], x, shape, lanes))
    np.testing.assert_array_equal(result.out_times, plain.out_times)


# --- (7) channel concatenation (section 4.3), op = CONCAT -------------------------------------------

# 20 seeds (was 40): test_random_concat_programs_match_golden runs 15 more concat programs.
@pytest.mark.parametrize("seed", range(20))
def test_random_concat_programs_match_reference(seed):
    """Programs with Concat blocks (and residual blocks): data against the numpy golden, every flit time
    against the cycle-stepping reference."""
    rng = np.random.default_rng(12000 + seed)
    program, layers, shape, x, batch = random_residual_program(rng, concat=0.6)
    flits = pack_flits(x, program.arch.lanes, program.input)
    golden = network_golden(layers, x, shape, program.arch.lanes)
    result = assert_matches_reference(program, x, batch, flits=flits)
    np.testing.assert_array_equal(result.out_flits, golden)


@pytest.mark.parametrize("seed", range(15))
def test_random_concat_programs_match_golden(seed):
    """Concat programs past the probe batch: golden data, extrapolated timing against plain sweeps."""
    rng = np.random.default_rng(12500 + seed)
    program, layers, shape, x, _ = random_residual_program(rng, budget=10**6, concat=0.6)
    batch = int(rng.integers(2 * PROBE_BATCH + 1, 3 * PROBE_BATCH))
    x = rng.integers(-128, 128, (batch, x.shape[1]), dtype=np.int8)
    assert_long_batch(program, layers, shape, x, reference=False)


@pytest.mark.parametrize("identity", ["a", "b"])
def test_hand_computed_concat(identity):
    """concat(x, f(x)) and concat(g(x), x) on 2 lanes: a 2-channel identity operand (one word a pixel) and a
    computed one, each channel requantized with its operand's multiplicand (M / 2^S = 1, so y = acc + zp_out)."""
    arch = lean_arch(rows=1, cols=3, lanes=2, sram_bytes=1024, max_tile_outputs=16, router_fifo_depth=1)
    x = np.array([[1, -3, 40, -7], [-128, 127, -1, 60]], dtype=np.int8)       # 2 channels, 1x2 map
    params = ConcatParams(1, 2, 1 << 30, 30, zp_a=3, zp_b=-1, zp_out=-4, clamp_lo=-100, clamp_hi=100)
    values = x.reshape(2, 2, 2).transpose(0, 2, 1).astype(int)               # [batch, pixel, channel]
    if identity == "a":   # b = a 1x1 conv to 3 channels (x0, x1, x0 + x1): b has a padding lane
        conv = Conv(np.array([[1, 0], [0, 1], [1, 1]], np.int8).reshape(3, 2, 1, 1), np.zeros(3, np.int64),
                    1 << 30, 30)
        block = Concat([], [conv], params)
        computed = np.clip(np.stack([values[..., 0], values[..., 1], values.sum(-1)], -1), -128, 127)
        expected = np.concatenate([values * 1 - 3 - 4, computed * 2 + 2 - 4, np.full((2, 2, 1), -4)], -1)
        registers = (6, 3, 1, 0, 2)         # store_end, words_per_pixel, concat_words_a, operand a and b offsets
    else:                  # a = a 1x1 conv swapping the channels; b = x, first in the stream
        conv = Conv(np.array([[0, 1], [1, 0]], np.int8).reshape(2, 2, 1, 1), np.zeros(2, np.int64), 1 << 30, 30)
        block = Concat([conv], [], params)
        expected = np.concatenate([values[..., ::-1] * 1 - 3 - 4, values * 2 + 2 - 4], -1)
        registers = (4, 2, 1, 2, 0)
    expected = np.clip(expected, -100, 100)
    program = build_program(arch, [block], input_shape=(2, 1, 2))
    join = program.tiles[1].config
    assert (join.op, join.kernel_h, join.kernel_w, join.store_begin, join.forward_end) == \
        (OP_CONCAT, 1, 1, 0, 0)
    assert (join.store_end, join.words_per_pixel, join.concat_words_a, join.operand_a_offset,
            join.operand_b_offset) == registers
    result = assert_matches_reference(program, x, 2, flits=pack_flits(x, 2, program.input))
    np.testing.assert_array_equal(result.out_flits.reshape(2, 2, -1), expected)
    np.testing.assert_array_equal(result.out_flits, network_golden([block], x, (2, 1, 2), 2))
    assert program.output.shape == (expected.shape[-1] - (identity == "a"), 1, 2)


def _conv_concat(rng, lanes, first, size=(5, 4), bands=(2, 2, 2)):
    """Conv 6 -> 8 channels (split) as operand a, Depthwise (split) as operand b, CONCAT in row bands."""
    channels, (height, _) = 6, size
    conv = Conv(rng.integers(-128, 128, (8, channels, 3, 3), dtype=np.int8), rng.integers(-500, 500, 8),
                rng.integers(2**30, 2**31, 8), 41, zp_in=-7, zp_out=3, clamp_lo=3, pads=(1, 1, 1, 1), tiles=bands[0])
    depthwise = Depthwise(rng.integers(-128, 128, (channels, 3, 1), dtype=np.int8), rng.integers(-500, 500, channels),
                          2**30, 36, zp_in=-7, zp_out=-2, pads=(1, 0, 1, 0), tiles=bands[1])
    params = ConcatParams(2**22, 3 * 2**20, rng.integers(2**30, 2**31, 8 + channels), 53, zp_a=3, zp_b=-2,
                          zp_out=1, clamp_lo=-90, clamp_hi=110)
    return [Concat([conv], [depthwise], params, tiles=bands[2], first=first)], (channels,) + tuple(size)


@pytest.mark.parametrize("lanes,depth,batch,first", [(4, 1, 3, "a"), (8, 1, 2, "b"), (8, 2, 4, "a"), (4, 4, 5, "b"),
                                                     (4, 3, 2, "a"), (8, 4, 3, "b")])
def test_split_concat_block_across_archs(lanes, depth, batch, first):
    """Both branches computed and split, a split CONCAT, either branch first: golden data, reference timing,
    the stream registers of section 4.2 and the counts of section 4.3."""
    rng = np.random.default_rng(60 + lanes + depth)
    layers, shape = _conv_concat(rng, lanes, first)
    arch = lean_arch(rows=2, cols=4, lanes=lanes, sram_bytes=16384, max_tile_outputs=1024, router_fifo_depth=depth)
    program = build_program(arch, layers, input_shape=shape, act_fill=rng)
    x = rng.integers(-128, 128, (batch, int(np.prod(shape))), dtype=np.int8)
    result = assert_matches_reference(program, x, batch, flits=pack_flits(x, lanes, program.input))
    golden = network_golden(layers, x, shape, lanes)
    np.testing.assert_array_equal(result.out_flits, golden)
    assert len(np.unique(golden)) > 20        # not all clamped
    pixels, words_a, words_b = 5 * 4, 8 // lanes, -(-6 // lanes)
    x_words = pixels * words_b
    first_words, second_words = (pixels * words_a, pixels * words_b)[::1 if first == "a" else -1]
    configs = [t.config for t in program.tiles]
    # the first branch keeps x; the second branch's first layer reads x from the middle and drops it
    assert [(c.n_in_words, c.store_begin, c.store_end, c.forward_begin, c.forward_end)
            for c in configs[:6]] == \
        [(x_words, 0, x_words, 0, x_words)] * 2 + \
        [(x_words + first_words, 0, x_words, 0, x_words + first_words),
         (x_words + first_words, 0, x_words, x_words, x_words + first_words)] + \
        [(first_words + second_words, 0, first_words + second_words, 0, first_words + second_words),
         (first_words + second_words, 0, first_words + second_words, 0, 0)]
    offsets = (0, first_words) if first == "a" else (first_words, 0)
    for tile, rows in zip(program.tiles[4:6], (3, 2)):
        config = tile.config
        assert (config.op, config.words_per_pixel, config.concat_words_a, config.operand_a_offset,
                config.operand_b_offset) == (OP_CONCAT, words_a + words_b, words_a, *offsets)
        issue = rows * 4 * (words_a + words_b)         # I = n_pix * CW, one issue per output word
        assert config.compute_issue_cycles == issue
        assert result.tile_busy_cycles[tile.row, tile.col] == (issue + 2) * batch
        assert result.tile_macs[tile.row, tile.col] == issue * lanes * batch


def test_concat_inside_a_residual_main_branch():
    """A Concat after the first layer of a residual main branch: the stream already carries the skip, so the
    second branch's first layer keeps the whole stream (forwarded words must be contiguous) and the CONCAT
    tile's operands both start past the block input it also stores."""
    rng = np.random.default_rng(61)
    lanes, shape = 2, (4, 3, 2)
    pool = MaxPool(3, 3, 1, (1, 1, 1, 1))
    a_conv = _random_same_shape_layer(rng, "conv", 4, 2, lanes, 3, 2)
    b_conv = _random_same_shape_layer(rng, "conv", 4, 2, lanes, 3, 1)
    concat = Concat([a_conv], [b_conv], _random_concat_params(rng, 4), tiles=1)
    layers = [Residual([pool, concat], _random_add(rng, 4), skip="b")]
    arch = lean_arch(rows=2, cols=3, lanes=lanes, sram_bytes=8192, max_tile_outputs=256, router_fifo_depth=2)
    program = build_program(arch, layers, input_shape=shape, act_fill=rng)
    x_words, half = 6 * 2, 6            # the map (and the pool's output): 2 words a pixel; a conv output: 1
    configs = [t.config for t in program.tiles]
    assert [(c.n_in_words, c.store_begin, c.store_end, c.forward_begin, c.forward_end)
            for c in configs[:6]] == [
        (x_words, 0, x_words, 0, x_words),                                          # pool keeps the skip
        (2 * x_words, x_words, 2 * x_words, 0, 2 * x_words),                        # a: keeps its input too
        (2 * x_words, x_words, 2 * x_words, 0, 2 * x_words),
        (2 * x_words + half, x_words, 2 * x_words, 0, 2 * x_words + half),          # b: keeps all
        (2 * x_words + 2 * half, x_words, 2 * x_words + 2 * half, 0, x_words),      # CONCAT: drops the pool output
        (2 * x_words, 0, 2 * x_words, 0, 0)]                                        # ADD
    assert (configs[4].operand_a_offset, configs[4].operand_b_offset) == (x_words, x_words + half)
    assert (configs[5].operand_a_offset, configs[5].operand_b_offset) == (x_words, 0)
    x = rng.integers(-128, 128, (3, 24), dtype=np.int8)
    result = assert_matches_reference(program, x, 3, flits=pack_flits(x, lanes, program.input))
    np.testing.assert_array_equal(result.out_flits, network_golden(layers, x, shape, lanes))


def test_concat_of_downsampling_branches():
    """Both branches halve the map (strided conv, strided max pool): the CONCAT map is the branches' 3x3,
    not the block input's 5x5; a dense layer reads the result."""
    rng = np.random.default_rng(62)
    lanes = 4
    conv = Conv(rng.integers(-128, 128, (4, 3, 3, 3), dtype=np.int8), rng.integers(-500, 500, 4),
                rng.integers(2**30, 2**31, 4), 40, zp_in=-5, zp_out=2, stride=2, pads=(1, 1, 1, 1))
    pool = MaxPool(3, 3, 2, (1, 1, 1, 1), tiles=2)
    layers = [Concat([conv], [pool], _random_concat_params(rng, 7), tiles=(2, 1), first="b"),
              random_layer(rng, 9 * 2 * lanes, 5, 1)]
    arch = lean_arch(rows=2, cols=3, lanes=lanes, sram_bytes=8192, max_tile_outputs=256, router_fifo_depth=3)
    program = build_program(arch, layers, input_shape=(3, 5, 5), act_fill=rng)
    join = program.tiles[3].config
    assert (join.in_height, join.in_width, join.words_per_pixel, join.out_rows) == (3, 3, 2, 2)
    x = rng.integers(-128, 128, (4, 75), dtype=np.int8)
    result = assert_matches_reference(program, x, 4, flits=pack_flits(x, lanes, program.input))
    np.testing.assert_array_equal(result.out_flits, network_golden(layers, x, (3, 5, 5), lanes))


def test_flat_concat_of_dense_branches():
    """Vectors: concat(dense_a(x), dense_b(dense_b'(x))) in one CONCAT tile, against dense_golden too."""
    rng = np.random.default_rng(63)
    lanes = 2
    a = random_layer(rng, 5, 4, 2)
    b1, b2 = random_layer(rng, 5, 6, 2), random_layer(rng, 6, 3, 1)
    layers = [Concat([a], [b1, b2], _random_concat_params(rng, 7), first="b")]
    arch = lean_arch(rows=2, cols=3, lanes=lanes, sram_bytes=4096, max_tile_outputs=64, router_fifo_depth=1)
    program = build_program(arch, layers, act_fill=rng)
    x = rng.integers(-128, 128, (4, 5), dtype=np.int8)
    result = assert_matches_reference(program, x, 4)
    np.testing.assert_array_equal(result.out_flits.reshape(4, -1)[:, :7], dense_golden(layers, x))
    np.testing.assert_array_equal(result.out_flits, network_golden(layers, x, None, lanes))


def test_concat_long_batch_matches_reference():
    """Batch past the probe with router_fifo_depth 1: the extrapolated timing, cycle by cycle."""
    rng = np.random.default_rng(64)
    layers, shape = _conv_concat(rng, 4, "b", size=(3, 3), bands=(2, 1, 2))
    arch = lean_arch(rows=2, cols=3, lanes=4, sram_bytes=8192, max_tile_outputs=256, result_ring_words=64,
                     router_fifo_depth=1)
    program = build_program(arch, layers, input_shape=shape)
    batch = 3 * PROBE_BATCH
    x = rng.integers(-128, 128, (batch, 54), dtype=np.int8)
    assert_long_batch(program, layers, shape, x)


def test_builder_refuses_unmappable_concats():
    arch = lean_arch(rows=2, cols=4, lanes=4, sram_bytes=8192, max_tile_outputs=256)
    rng = np.random.default_rng(65)
    three = _random_same_shape_layer(rng, "conv", 4, 3, 4, 3, 1)
    params = _random_concat_params(rng, 7)
    with pytest.raises(ValueError, match="Concat operand a has 3 channels, not a multiple of lanes = 4"):
        build_program(arch, [Concat([three], [], params)], input_shape=(4, 3, 3))
    with pytest.raises(ValueError, match="needs at least one non-identity branch"):
        build_program(arch, [Concat([], [], params)], input_shape=(4, 3, 3))
    with pytest.raises(ValueError, match="cannot start the second branch"):
        build_program(arch, [Concat([three], [Residual([MaxPool(1, 1)], _random_add(rng, 4))], params)],
                      input_shape=(4, 3, 3))
    with pytest.raises(ValueError, match="do not match"):
        build_program(arch, [Concat([], [MaxPool(2, 2)], params)], input_shape=(4, 3, 3))


def _concat_base():
    """Conv (3 -> 2 channels, 1 word a pixel) as operand a after x (3 channels, 2 words a pixel) as the
    identity operand b: the CONCAT tiles store 8 + 4 words, b at 0, a at 8; CW = 3, concat_words_a = 1."""
    rng = np.random.default_rng(66)
    arch = lean_arch(rows=1, cols=4, lanes=2, sram_bytes=4096, max_tile_outputs=64, router_fifo_depth=2)
    conv = _random_same_shape_layer(rng, "conv", 3, 2, 2, 2, 1)
    layers = [Concat([conv], [], _random_concat_params(rng, 5), tiles=2)]
    program = build_program(arch, layers, input_shape=(3, 2, 2))
    assert [getattr(program.tiles[2].config, name) for name in ("n_in_words", "store_end", "words_per_pixel", "concat_words_a",
                                                       "operand_a_offset", "operand_b_offset")] == [12, 12, 3, 1, 8, 0]
    return program


@pytest.mark.parametrize("change,message", [
    (lambda t: set_registers(t[2], concat_words_a=0),
     r"tile r0c2: config register concat_words_a = 0 must be in 1..words_per_pixel - 1 = 2 for op = OP_CONCAT"),
    (lambda t: set_registers(t[1], concat_words_a=3), r"tile r0c1: config register concat_words_a = 3 must be in"),
    (lambda t: set_registers(t[2], concat_words_a=2),
     r"tile r0c2: config registers operand_a_offset \+ in_height \* in_width \* concat_words_a = 8 \+ .* = 16 exceed "
     r"the 12 stored words"),
    (lambda t: set_registers(t[2], operand_a_offset=7),
     r"tile r0c2: config registers operand_a_offset = 7 and operand_b_offset = 0 make the operands overlap"),
    (lambda t: set_registers(t[1], operand_a_offset=0, operand_b_offset=3),
     r"tile r0c1: config registers operand_a_offset = 0 and operand_b_offset = 3 make the operands overlap"),
    (lambda t: set_registers(t[2], operand_a_offset=9),
     r"tile r0c2: config registers operand_a_offset \+ .* = 13 exceed the 12 stored words"),
    (lambda t: set_registers(t[2], kernel_w=2),
     r"tile r0c2: config register kernel_w = 2 must be 1 for op = OP_CONCAT \(kernel 1x1, stride 1, no padding\)"),
    (lambda t: set_registers(t[1], pad_top=1), r"tile r0c1: config register pad_top = 1 must be 0 for op = OP_CONCAT"),
    (lambda t: set_registers(t[2], n_out=4),
     r"tile r0c2: config register n_out = 4 must be words_per_pixel \* lanes = 6 for op = OP_CONCAT"),
    (lambda t: set_registers(t[2], add_mult_b=2**22 + 1),
     r"tile r0c2: config register add_mult_b = 4194305 exceeds ADD_MULT_MAX = 4194304 for op = OP_CONCAT"),
    (lambda t: set_registers(t[1], out_width=1),
     r"tile r0c1: config register out_width = 1 must equal in_width = 2 for op = OP_CONCAT"),
    (lambda t: set_registers(t[1], out_row_begin=0, out_rows=3),
     r"tile r0c1: config registers out_row_begin \+ out_rows = 3 exceed in_height = 2 for op = OP_CONCAT"),
    (lambda t: set_registers(t[2], op=OP_ADD), r"tile r0c2: config register kernel_w = 1 must be 2 for op = OP_ADD"),
    (lambda t: set_registers(t[2], op=7), r"tile r0c2: config register op = 7 is not an op"),
])
def test_bad_concat_programs_are_refused(change, message):
    """Register rules (section 4.3): Program.validate names tile and register, for every entry point of the
    emulator (trace_data_path validates first)."""
    from flowtile.emulator.path import trace_data_path
    program = _concat_base()
    change(program.tiles)
    with pytest.raises(ProgramError, match=message):
        program.validate()
    with pytest.raises(ProgramError, match=message):
        trace_data_path(program)
    with pytest.raises(ProgramError, match=message):
        emulate(program, np.zeros((8, 2), np.int8), 1)


# --- (7) output-channel groups (section 4.4): per-pixel interleaved output order -------------------

def _random_group_split(rng, c_out, lanes, groups):
    """Explicit channel counts of ``groups`` groups of ``c_out`` channels: whole words but the last group,
    which is ragged whenever ``c_out`` is not a multiple of ``lanes``."""
    words = -(-c_out // lanes)
    cuts = np.sort(rng.choice(np.arange(1, words), groups - 1, replace=False))
    counts = [int(b - a) * lanes for a, b in zip([0, *cuts], [*cuts, words])]
    counts[-1] -= words * lanes - c_out
    return counts


def _grouped_conv(rng, shape, lanes, c_out, *, bands, groups, same=False):
    """A random Conv over a ``shape`` map split into ``bands`` row bands x ``groups`` channel groups (or
    None if the draw has fewer output rows than bands); ``same``: stride 1 with "same" padding."""
    channels, height, width = shape
    kh, kw = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    if same:
        (top, bottom), (left, right) = _same_padding(kh), _same_padding(kw)
        stride, pads = 1, (top, left, bottom, right)
    else:
        stride = int(rng.integers(1, 3))
        pads = (int(rng.integers(0, kh)), int(rng.integers(0, kw)), int(rng.integers(0, kh)),
                int(rng.integers(0, kw)))
    out_h = window_output_size(height, kh, stride, pads[0], pads[2])
    if out_h < bands or window_output_size(width, kw, stride, pads[1], pads[3]) < 1:
        return None
    window = kh * kw * -(-channels // lanes) * lanes
    bias, multiplier, shift, zp_in, zp_out, lo, hi = _random_conv_requantization(rng, c_out, window)
    split = _random_group_split(rng, c_out, lanes, groups) if rng.random() < 0.7 else groups
    return Conv(rng.integers(-128, 128, (c_out, channels, kh, kw), dtype=np.int8), bias, multiplier, shift,
                zp_in, zp_out, lo, hi, stride, pads, bands, split)


def _conv_out_shape(conv, shape):
    top, left, bottom, right = conv.pads
    return (conv.weights.shape[0], window_output_size(shape[1], conv.kernel[0], conv.stride, top, bottom),
            window_output_size(shape[2], conv.kernel[1], conv.stride, left, right))


def random_grouped_program(rng, *, max_batch=4, budget=25000):
    """Seeded random chain around a convolution split over 1-3 row bands x 2-3 output-channel groups
    (section 4.4): maps of 1..10 channels, 3..6 pixels a side, 2..16 output channels (group splits in whole
    words with a ragged last group, or as even as possible), small and large forward queues. The grouped
    conv stands alone, after a max pool, or as the main branch of a residual block (its last tile then
    forwards the block input: Q_f > 0 before its P_bulk and interleaved pops), and is sometimes followed by
    a max pool (which reads the merged pixel-major stream) or a dense layer. Redrawn until the reference can
    step it in about ``budget`` cycles; sometimes on the smallest result ring its tiles allow."""
    while True:
        lanes = int(rng.choice([1, 2, 4, 8]))
        shape = (int(rng.integers(1, 11)), int(rng.integers(3, 7)), int(rng.integers(3, 7)))
        input_shape = shape
        layers = []
        if rng.random() < 0.2:
            layers.append(MaxPool(2, 2, 1, (0, 0, 1, 1), tiles=1))
        residual = rng.random() < 0.3
        c_out = shape[0] if residual else int(rng.integers(2, 17))
        words = -(-c_out // lanes)
        if words < 2:
            continue
        groups = int(rng.integers(2, min(3, words) + 1))
        bands = int(rng.integers(1, 4))
        conv = _grouped_conv(rng, shape, lanes, c_out, bands=bands, groups=groups, same=residual)
        if conv is None:
            continue
        if residual:
            layers.append(Residual([conv], _random_add(rng, c_out), tiles=1, skip=str(rng.choice(["a", "b"]))))
            out_shape = shape
        else:
            layers.append(conv)
            out_shape = _conv_out_shape(conv, shape)
        follow = rng.random()
        if follow < 0.25 and min(out_shape[1:]) >= 2:
            layers.append(MaxPool(2, 2, 1, tiles=1))
        elif follow < 0.45:
            n_in = out_shape[1] * out_shape[2] * -(-out_shape[0] // lanes) * lanes
            layers.append(random_layer(rng, n_in, int(rng.integers(1, 2 * lanes + 1)), 1))
        needed = len(layers) - 1 + bands * groups + residual
        cols = int(rng.integers(2, 5))
        rows = -(-needed // cols) + int(rng.integers(0, 2))
        arch = lean_arch(rows=rows, cols=cols, lanes=lanes, sram_bytes=lanes * 65536, max_tile_outputs=65535,
                         router_fifo_depth=int(rng.integers(1, 4)))
        queues = random_queue_words(rng, arch.n_tiles)
        drawn = _program_within_budget(rng, arch, layers, input_shape, max_batch, budget, queues)
        if drawn is not None:
            return drawn


def _interleaving_tiles(program):
    return [t for t in program.tiles if t.config.pass_per_pixel]


# 15 seeds (was 30): the long-batch family below and the fast-path tests draw from the same generator.
@pytest.mark.parametrize("seed", range(15))
def test_random_grouped_programs_match_reference(seed):
    rng = np.random.default_rng(9000 + seed)
    program, layers, shape, x, batch = random_grouped_program(rng)
    assert _interleaving_tiles(program), "the random grouped program has no tile with pass_per_pixel > 0"
    flits = _map_flits(program, x)
    golden = network_golden(layers, x, shape, program.arch.lanes)
    np.testing.assert_array_equal(run_functional(program, flits, batch).out_flits, golden,
                                  err_msg="functional output of the grouped program vs the unsplit numpy golden")
    result = assert_matches_reference(program, x, batch, flits=flits)
    np.testing.assert_array_equal(result.out_flits, golden, err_msg="emulated output vs the unsplit numpy golden")


@pytest.mark.parametrize("seed", range(5))
def test_random_grouped_long_batches_match_reference(seed):
    """Batches past the probe (periodic extrapolation or its fallback), cycle by cycle."""
    rng = np.random.default_rng(9500 + seed)
    program, layers, shape, x, _ = random_grouped_program(rng, max_batch=1, budget=600)
    batch = int(rng.integers(2 * PROBE_BATCH, 3 * PROBE_BATCH))
    x = rng.integers(-128, 128, (batch, x.shape[1]), dtype=np.int8)
    result = assert_matches_reference(program, x, batch, flits=_map_flits(program, x))
    np.testing.assert_array_equal(result.out_flits, network_golden(layers, x, shape, program.arch.lanes))


@pytest.mark.parametrize("queue", [None, 2], ids=["free-sram", "2"])
def test_grouped_conv_long_batch_extrapolates(queue):
    """Two bands x three groups (a ragged last one) and a pool reading the merged stream, batch past the
    probe: the times equal the reference's and plain sweeps'. With 2-word queues back-pressure couples the
    inferences and the steady state is extrapolated; with large queues (all the free SRAM, thousands of words)
    the probe settles in a few sweep rounds and the emulator sweeps the whole batch directly
    (emulator.timing.CHEAP_SWEEP_ROUNDS)."""
    rng = np.random.default_rng(23)
    arch = lean_arch(rows=2, cols=4, lanes=2, sram_bytes=16384, max_tile_outputs=512, router_fifo_depth=2)
    conv = Conv(rng.integers(-128, 128, (5, 2, 2, 2), dtype=np.int8), rng.integers(-500, 500, 5), 2**30, 38,
                zp_in=7, pads=(1, 0, 0, 1), tiles=2, channel_groups=[2, 2, 1])
    layers, shape = [conv, MaxPool(2, 2, stride=2)], (2, 3, 3)
    program = build_program(arch, layers, input_shape=shape, queue_words=queue)
    queued = [t.config.queue_words for t in program.tiles if t.config.queued_words]
    assert queued and (all(q == 2 for q in queued) if queue else min(queued) >= 1024)
    assert [t.config.pass_per_pixel for t in program.tiles[:6]] == [0, 1, 2] * 2
    batch = 6 * PROBE_BATCH   # long enough for the longer probe this program needs with a large queue
    x = rng.integers(-128, 128, (batch, 18), dtype=np.int8)
    result = assert_long_batch(program, layers, shape, x)
    if queue == 2:
        assert result.timing.extrapolated, "the steady state of this program should extrapolate"


def test_builder_groups_registers():
    """program_builder's grouped conv (section 4.4): tile (b, g) holds group g's channels, pass_per_pixel
    the words a pixel of the groups before g, n_pass the earlier bands' pixels (all channels) plus n_pix_b *
    pass_per_pixel; every group but the last must be whole words."""
    rng = np.random.default_rng(24)
    lanes = 4
    arch = lean_arch(rows=2, cols=4, lanes=lanes, sram_bytes=65536, max_tile_outputs=512)
    weights = rng.integers(-128, 128, (11, 3, 3, 3), dtype=np.int8)
    conv = Conv(weights, np.arange(11) * 10, np.arange(11) + 2**30, 40, pads=(1, 1, 1, 1), tiles=[2, 3],
                channel_groups=[8, 3])
    program = build_program(arch, [conv], input_shape=(3, 5, 4))
    counts, words_before = [8, 3], [0, 2]
    for b, rows in enumerate([2, 3]):
        for g in range(2):
            tile = program.tiles[2 * b + g]
            c = tile.config
            assert (c.n_out, c.out_row_begin, c.out_rows) == (counts[g], 2 * b, rows), f"tile {b},{g}"
            assert c.pass_per_pixel == words_before[g], f"tile ({b}, {g}): pass_per_pixel"
            assert c.n_pass == 2 * b * 4 * 3 + rows * 4 * words_before[g], f"tile ({b}, {g}): n_pass"
            first = sum(counts[:g])
            np.testing.assert_array_equal(tile.params[:, 0], np.arange(first, first + counts[g]) * 10)
            np.testing.assert_array_equal(tile.sram[:counts[g] * 9, 0],
                                          weights[first:first + counts[g], 0].reshape(-1),
                                          err_msg=f"tile ({b}, {g}): weight rows of its channels")
    with pytest.raises(ValueError, match=r"multiples of 4 except the last"):
        build_program(arch, [conv._replace(channel_groups=[6, 5])], input_shape=(3, 5, 4))


def _hand_groups_case():
    """Section 4.4 by hand: lanes 2, router FIFOs of depth 2, one input channel on a 1x2 map (K = 2 words),
    a 1x1 conv to 3 channels over 2 groups of one band: tile 0 = channels 0, 1 (n_out 2, I = n_pix * N_o * K_w
    = 2 * 2 * 1 = 4, COMPUTE 6 cycles, E = 2, forwards x: Q = 2), tile 1 = channel 2 (n_out 1, I = 2, COMPUTE 4
    cycles, E = 2, pass_per_pixel = 1, n_pass = 2 * 1, Q_f = 0, P_bulk = 0: per inference pop, EMIT word 0,
    pop, EMIT word 1), batch 2.

    Result words (section 4's ring, R = ceil(16 / 2) = 8, never full here): tile 0 has one word per pixel
    of d = L * K_w = 2 * 1 = 2 issue cycles; tile 1 one short word per pixel of d = (N_o mod L) * K_w = 1.

    Host flits written at 0, 1, 2, 3. PE 0: RECV 1, 2 (pushed), pops 2, 3, a_0 = c_0 = 3, a_1 = a_0 + 2 = 5,
    COMPUTE [3, a_1 + 2 + 2 = 9); inference 1 at 3, 4 (>= c_0); EMIT word 0 at a_0 + d + 2 = 7, word 1 at
    a_1 + d + 2 = 9, pops 10, 11; a_2 = c_1 = max(4 + 1, a_1 + 2 + 2 = 9) = 9, a_3 = 11, COMPUTE [9, 15);
    EMIT word 2 at max(11 + 1, 9 + 4) = 13, word 3 at 11 + 4 = 15. Each PE 0 output reaches PE 1 two cycles
    later. PE 1: RECV 4, 5, a_0 = c_0 = 6, a_1 = 7, COMPUTE [6, 7 + 1 + 2 = 10), PASS 9, 11 (pushed); pop 10
    (pixel 0's group-0 word), EMIT word 0 at max(10 + 1, a_0 + 1 + 2 = 9) = 11, pop 12, EMIT word 1 at 13
    (>= a_1 + 3 = 10); inference 1: RECV 12, 13, PASS 15, 17, a_2 = c_1 = max(13 + 1, a_1 + 1 + 2 = 10) =
    14, a_3 = 15, COMPUTE [14, 18); pop 16, EMIT word 2 at max(17, 14 + 3) = 17, pop 18, EMIT word 3 at
    max(19, 15 + 3) = 19; the host gets each one cycle later. Output spans of PE 1: no FORWARD (Q_f + P_bulk
    = 0), EMIT from the end of the previous output span to the last output transfer + 1."""
    arch = lean_arch(rows=1, cols=2, lanes=2, sram_bytes=1024, max_tile_outputs=16, router_fifo_depth=2)
    conv = Conv(np.array([3, -2, 5], np.int8).reshape(3, 1, 1, 1), [1, 2, 3], 2**30, 30, zp_out=-1,
                channel_groups=[2, 1])
    x = np.array([[4, -7], [10, 20]], np.int8)
    expected = {"in_times": [0, 1, 2, 3], "out_times": [11, 12, 13, 14, 17, 18, 19, 20],
                0: {"input": [1, 2, 3, 4], "compute": [3, 9], "output": [2, 3, 7, 9, 10, 11, 13, 15],
                    "spans": [(0, 3, "RECV"), (3, 5, "RECV"), (3, 9, "COMPUTE"), (9, 15, "COMPUTE"),
                              (0, 4, "FORWARD"), (4, 10, "EMIT"), (10, 12, "FORWARD"), (12, 16, "EMIT")]},
                1: {"input": [4, 5, 9, 11, 12, 13, 15, 17], "compute": [6, 14],
                    "output": [10, 11, 12, 13, 16, 17, 18, 19],
                    "spans": [(0, 6, "RECV"), (6, 12, "PASS"), (12, 14, "RECV"), (14, 18, "PASS"),
                              (6, 10, "COMPUTE"), (14, 18, "COMPUTE"), (0, 14, "EMIT"), (14, 20, "EMIT")]}}
    # y_c = clamp(x * w_c + bias_c + zp_out) (M / 2^S = 1); pixel-major, word 0 = channels 0, 1, word 1 =
    # channel 2 and a zero padding lane
    flits = [[4 * 3 + 1 - 1, 4 * -2 + 2 - 1], [4 * 5 + 3 - 1, 0], [-7 * 3 + 1 - 1, -7 * -2 + 2 - 1],
             [-7 * 5 + 3 - 1, 0], [10 * 3 + 1 - 1, 10 * -2 + 2 - 1], [10 * 5 + 3 - 1, 0],
             [20 * 3 + 1 - 1, 20 * -2 + 2 - 1], [20 * 5 + 3 - 1, 0]]
    program = build_program(arch, [conv], input_shape=(1, 1, 2))
    return program, [conv], x, expected, np.array(flits, np.int8)


def _check_hand(what, in_times, out_times, flits, pe_times, spans, expected, expected_flits):
    assert list(in_times) == expected["in_times"], f"{what}: host input transfer cycles"
    assert list(out_times) == expected["out_times"], f"{what}: host output transfer cycles"
    np.testing.assert_array_equal(flits, expected_flits, err_msg=f"{what}: output flits")
    for position in (0, 1):
        want = expected[position]
        for name in ("input", "compute", "output"):
            assert list(pe_times[position][name]) == want[name], f"{what}, chain position {position}: {name} cycles"
        assert spans[position] == want["spans"], f"{what}, chain position {position}: spans"


def test_reference_hand_computed_output_groups():
    program, layers, x, expected, expected_flits = _hand_groups_case()
    np.testing.assert_array_equal(network_golden(layers, x, (1, 1, 2), 2), expected_flits,
                                  err_msg="the numpy golden disagrees with the hand-computed flits")
    assert [t.config.pass_per_pixel for t in program.tiles] == [0, 1]
    flits, out_times, in_times, pes = reference_run(program, _map_flits(program, x), 2)
    pe_times = [dict(input=pe.input_times, compute=pe.compute_starts, output=pe.output_times) for pe in pes]
    _check_hand("reference", in_times.tolist(), out_times.tolist(), flits, pe_times, [pe.spans for pe in pes],
                expected, expected_flits)


def _check_emulator_hand(program, x, expected, expected_flits) -> None:
    """The emulator on a hand-computed two-inference case: every transfer time, span and flit."""
    result = emulate(program, _map_flits(program, x), 2)
    pe_times = [dict(input=t.input.tolist(), compute=t.compute.tolist(), output=t.output.tolist())
                for t in result.timing.pe_times]
    spans = [[(int(s), int(e), str(p)) for s, e, p in timeline] for timeline in result.tile_timelines]
    _check_hand("emulator", result.in_times.tolist(), result.out_times.tolist(), result.out_flits, pe_times,
                spans, expected, expected_flits)


def test_emulator_hand_computed_output_groups():
    program, _, x, expected, expected_flits = _hand_groups_case()
    _check_emulator_hand(program, x, expected, expected_flits)


@pytest.mark.parametrize("change,message", [
    (lambda p: set_registers(p.tiles[0], pass_per_pixel=1), r"config registers n_pix \* pass_per_pixel = 2 \* 1 = 2 "
                                                            r"interleaved passed words exceed n_pass = 0"),
    (lambda p: set_registers(p.tiles[1], pass_per_pixel=2), r"config registers n_pix \* pass_per_pixel = 2 \* 2 = 4 "
                                                            r"interleaved passed words exceed n_pass = 2"),
])
def test_bad_pass_per_pixel_is_refused(change, message):
    program = copy.deepcopy(_hand_groups_case()[0])
    change(program)
    with pytest.raises((EmulatorError, ProgramError), match=message):
        emulate(program, np.zeros((2, 2), np.int8), 1)


# --- (8) bands of output pixels (section 4.1: out_col_begin, out_col_end) ---------------------------

def _band_registers(config):
    return tuple(getattr(config, name) for name in ("out_row_begin", "out_rows", "out_col_begin", "out_col_end"))


def test_band_pixels_from_registers():
    """Every band [p0, p1) of row-major pixels of maps up to 4x6: the builder's registers give back exactly
    those pixels in the reference's pixel list, n_pix = out_rows * out_width - out_col_begin - (out_width - E')
    (TileConfig.output_pixels) and the contract's own output_pixel_positions agree; whole rows keep both
    new registers 0."""
    for width in range(1, 7):
        for height in range(1, 5):
            for begin in range(height * width):
                for end in range(begin + 1, height * width + 1):
                    config = TileConfig(**pixel_band_registers(begin, end, width), out_width=width)
                    pixels = band_pixels(config)
                    assert pixels == [(p // width, p % width) for p in range(begin, end)], (width, begin, end)
                    last = config.out_col_end or width
                    n_pix = config.out_rows * width - config.out_col_begin - (width - last)
                    assert len(pixels) == n_pix == config.output_pixels, (width, begin, end)
                    assert pixels == config.output_pixel_positions(), (width, begin, end)
                    assert config.out_col_begin < width and config.out_col_end <= width
                    if begin % width == 0 and end % width == 0:
                        assert config.out_col_begin == config.out_col_end == 0
    assert band_pixels(TileConfig(out_row_begin=2, out_rows=1, out_width=5, out_col_begin=1, out_col_end=4)) == \
        [(2, 1), (2, 2), (2, 3)]
    assert band_pixels(TileConfig(out_row_begin=0, out_rows=2, out_width=3, out_col_begin=2, out_col_end=0)) == \
        [(0, 2), (1, 0), (1, 1), (1, 2)]


def test_builder_pixel_band_registers():
    """program_builder's pixel bands: a 5x5 output split into 9, 9 and 7 pixels cuts rows 1 and 3 in the
    middle; n_pass counts the earlier bands' words (9 pixels x N_r = 2); groups split each band; bad splits
    are refused."""
    rng = np.random.default_rng(40)
    arch = lean_arch(rows=2, cols=3, lanes=2, sram_bytes=16384, max_tile_outputs=64)
    conv = Conv(rng.integers(-128, 128, (3, 2, 3, 3), dtype=np.int8), rng.integers(-500, 500, 3), 2**30, 40,
                pads=(1, 1, 1, 1), pixel_bands=[9, 9, 7])
    program = build_program(arch, [conv], input_shape=(2, 5, 5))
    assert [_band_registers(t.config) for t in program.tiles[:3]] == [(0, 2, 0, 4), (1, 3, 4, 3), (3, 2, 3, 0)]
    assert [t.config.n_pass for t in program.tiles[:4]] == [0, 18, 36, 50]
    assert [t.config.result_words(2) for t in program.tiles[:3]] == [18, 18, 14]
    grouped = build_program(arch, [conv._replace(channel_groups=[2, 1], pixel_bands=[12, 13])], input_shape=(2, 5, 5))
    assert [_band_registers(t.config) for t in grouped.tiles[:4]] == [(0, 3, 0, 2)] * 2 + [(2, 3, 2, 0)] * 2
    assert [(t.config.pass_per_pixel, t.config.n_pass) for t in grouped.tiles[:4]] == \
        [(0, 0), (1, 12), (0, 24), (1, 24 + 13)]
    assert split_pixels(4, 3, 2) == [(0, 6), (6, 12)] and split_pixels(4, 3, 1, [5, 7]) == [(0, 5), (5, 12)]
    with pytest.raises(ValueError, match=r"pixel bands \[9, 9, 6\] of 5x5 = 25 output pixels"):
        build_program(arch, [conv._replace(pixel_bands=[9, 9, 6])], input_shape=(2, 5, 5))
    with pytest.raises(ValueError, match=r"tiles = 2 must be 1 or 3"):
        build_program(arch, [conv._replace(tiles=2)], input_shape=(2, 5, 5))


def _hand_pixel_band_case():
    """Section 4.1 by hand: lanes 2, router FIFOs of depth 2, a 1x1 max pool (the identity) over one channel
    on a 2x3 map (K = 6 words, one word a pixel), split into bands of 4 and 2 pixels: tile 0 = row 0 and
    column 0 of row 1 (out_rows 2, out_col_end 1: n_pix = 2 * 3 - 0 - (3 - 1) = 4, E = I = 4, forwards x),
    tile 1 = columns 1, 2 of row 1 (out_col_begin 1: n_pix = 2, E = I = 2, P = 4 passed words); batch 2, ring
    R = 8 (never full), d = 1 per word.

    Host flits written at 0..11 (the W FIFO never fills). PE 0: RECV 1..6 (pushed), pops 2..7, a_0 = c_0 = 7,
    a = 7, 8, 9, 10, COMPUTE [7, 13), EMITs at a + 3 = 10..13; inference 1 RECV 7..12 (>= c_0), pops 14..19
    (after EMIT 3), c_1 = max(12 + 1, 10 + 1 + 2) = 13, COMPUTE [13, 19), EMITs after the pops: 20..23. Each
    PE 0 output reaches PE 1 two cycles later. PE 1: RECV 4..9, c_0 = 10, a = 10, 11, COMPUTE [10, 14), PASS
    12..15, pops 13..16, EMITs at max(17, 13) = 17, 18; inference 1: RECV 16..21, PASS 22..25, c_1 = max(21 +
    1, 11 + 1 + 2) = 22, COMPUTE [22, 26), pops 23..26, EMITs 27, 28. The host gets each one cycle later.
    Data: the input pixels in row-major order, band after band (padding lane 0)."""
    arch = lean_arch(rows=1, cols=2, lanes=2, sram_bytes=1024, max_tile_outputs=16, router_fifo_depth=2)
    layers, shape = [MaxPool(1, 1, pixel_bands=[4, 2])], (1, 2, 3)
    x = np.array([[5, -3, 7, 100, -128, 1], [-9, 2, 64, -1, 0, 127]], np.int8)
    expected = {"in_times": list(range(12)), "out_times": [14, 15, 16, 17, 18, 19, 24, 25, 26, 27, 28, 29],
                0: {"input": list(range(1, 13)), "compute": [7, 13],
                    "output": [2, 3, 4, 5, 6, 7, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23],
                    "spans": [(0, 7, "RECV"), (7, 13, "RECV"), (7, 13, "COMPUTE"), (13, 19, "COMPUTE"),
                              (0, 8, "FORWARD"), (8, 14, "EMIT"), (14, 20, "FORWARD"), (20, 24, "EMIT")]},
                1: {"input": [4, 5, 6, 7, 8, 9, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25],
                    "compute": [10, 22], "output": [13, 14, 15, 16, 17, 18, 23, 24, 25, 26, 27, 28],
                    "spans": [(0, 10, "RECV"), (10, 16, "PASS"), (16, 22, "RECV"), (22, 26, "PASS"),
                              (10, 14, "COMPUTE"), (22, 26, "COMPUTE"),
                              (0, 17, "FORWARD"), (17, 19, "EMIT"), (19, 27, "FORWARD"), (27, 29, "EMIT")]}}
    flits = np.stack([x.reshape(-1), np.zeros(12, np.int8)], axis=1)
    program = build_program(arch, layers, input_shape=shape)
    assert [_band_registers(t.config) for t in program.tiles] == [(0, 2, 0, 1), (1, 1, 1, 0)]
    return program, layers, shape, x, expected, flits


def test_reference_hand_computed_pixel_bands():
    program, layers, shape, x, expected, expected_flits = _hand_pixel_band_case()
    np.testing.assert_array_equal(network_golden(layers, x, shape, 2), expected_flits,
                                  err_msg="the numpy golden disagrees with the hand-computed flits")
    flits, out_times, in_times, pes = reference_run(program, _map_flits(program, x), 2)
    assert [pe.pixels for pe in pes] == [[(0, 0), (0, 1), (0, 2), (1, 0)], [(1, 1), (1, 2)]]
    pe_times = [dict(input=pe.input_times, compute=pe.compute_starts, output=pe.output_times) for pe in pes]
    _check_hand("reference", in_times.tolist(), out_times.tolist(), flits, pe_times, [pe.spans for pe in pes],
                expected, expected_flits)


def test_emulator_hand_computed_pixel_bands():
    program, _, _, x, expected, expected_flits = _hand_pixel_band_case()
    _check_emulator_hand(program, x, expected, expected_flits)


def _pixel_band_case(name):
    """(program, layers, input shape, x, expected band registers of the layer's tiles) of small programs whose
    bands begin or end inside rows (section 4.1)."""
    rng = np.random.default_rng({"conv-partial-rows": 41, "conv-single-row": 42, "maxpool": 43, "depthwise": 44,
                                 "average": 45, "add": 46, "add-skip-b": 47, "concat": 48, "groups": 49}[name])

    def conv(c_out, c_in, kh, kw, lanes, **kwargs):
        window = kh * kw * -(-c_in // lanes) * lanes
        return Conv(rng.integers(-128, 128, (c_out, c_in, kh, kw), dtype=np.int8), rng.integers(-2000, 2000, c_out),
                    rng.integers(2**30, 2**31, c_out), 31 + int(np.log2(window)) + 4, int(rng.integers(-128, 128)),
                    int(rng.integers(-20, 21)), **kwargs)

    if name == "conv-partial-rows":
        # 5x6 output, 5 channels on 4 lanes (a short last word): bands of 4, 17 and 9 pixels; the middle one
        # runs from (0, 4) to (3, 2): a partial first row, two whole rows, a partial last row
        lanes, shape = 4, (3, 5, 6)
        layers = [conv(5, 3, 3, 3, lanes, pads=(1, 1, 1, 1), pixel_bands=[4, 17, 9])]
        bands = [(0, 1, 0, 4), (0, 4, 4, 3), (3, 2, 3, 0)]
    elif name == "conv-single-row":
        # 3x4 output: single-row bands [0, 1), [1, 3) (partial at both ends), [3, 4) (ending at the row's end:
        # out_col_end = 0), then (1, 0)..(2, 0) and (2, 1)..(2, 3)
        lanes, shape = 2, (2, 4, 5)
        layers = [conv(3, 2, 2, 2, lanes, clamp_lo=-10, pixel_bands=[1, 2, 1, 5, 3])]
        bands = [(0, 1, 0, 1), (0, 1, 1, 3), (0, 1, 3, 0), (1, 2, 0, 1), (2, 1, 1, 0)]
    elif name == "maxpool":
        lanes, shape = 4, (5, 4, 4)
        layers = [MaxPool(2, 2, 1, (0, 0, 1, 1), clamp_lo=-20, pixel_bands=[3, 6, 7])]
        bands = [(0, 1, 0, 3), (0, 3, 3, 1), (2, 2, 1, 0)]
    elif name == "depthwise":
        lanes, shape = 2, (3, 5, 5)
        layers = [Depthwise(rng.integers(-128, 128, (3, 3, 3), dtype=np.int8), rng.integers(-2000, 2000, 3),
                            rng.integers(2**30, 2**31, 3), 31 + 3 + 4, zp_in=-7, zp_out=3, stride=2,
                            pads=(1, 1, 1, 1), pixel_bands=[2, 5, 2])]
        bands = [(0, 1, 0, 2), (0, 3, 2, 1), (2, 1, 1, 0)]
    elif name == "average":
        lanes, shape = 2, (3, 4, 4)
        layers = [average_pool(3, 2, 2, 2**30, 32, bias=-4 * 9, zp_in=9, stride=2, pixel_bands=[1, 3])]
        bands = [(0, 1, 0, 1), (0, 2, 1, 0)]
    elif name in ("add", "add-skip-b"):
        # a residual block on a 5x4 map: the main conv in bands of 7 and 13 pixels, the ADD tiles in bands of
        # 5, 6 and 9 pixels ((0, 0)..(1, 0), (1, 1)..(2, 2), (2, 3)..(4, 3))
        lanes, shape = 2, (3, 5, 4)
        add = AddParams(int(rng.integers(2**21, 2**22)), 2**22, int(rng.integers(2**30, 2**31)), 53, zp_a=-5,
                        zp_b=6, zp_out=-2, clamp_lo=-2)
        main = [conv(3, 3, 3, 3, lanes, pads=(1, 1, 1, 1), pixel_bands=[7, 13])]
        layers = [Residual(main, add, skip="a" if name == "add" else "b", pixel_bands=[5, 6, 9])]
        bands = [(0, 2, 0, 1), (1, 2, 1, 3), (2, 3, 3, 0)]
    elif name == "concat":
        lanes, shape = 2, (3, 3, 4)
        params = ConcatParams(2**22, int(rng.integers(2**21, 2**22)), int(rng.integers(2**30, 2**31)), 53,
                              zp_a=4, zp_b=-3, zp_out=1)
        layers = [Concat([conv(4, 3, 1, 1, lanes)], [], params, pixel_bands=[6, 5, 1])]
        bands = [(0, 2, 0, 2), (1, 2, 2, 3), (2, 1, 3, 0)]
    elif name == "groups":
        # a conv over 2 bands (4 and 5 pixels of a 3x3 output) x 3 channel groups (2, 2, 1 channels on 2
        # lanes): the group tiles interleave pass_per_pixel = 1, 2 pops per pixel of their partial bands
        lanes, shape = 2, (2, 3, 3)
        layers = [conv(5, 2, 2, 2, lanes, pads=(1, 0, 0, 1), channel_groups=[2, 2, 1], pixel_bands=[4, 5]),
                  MaxPool(2, 2)]
        bands = [(0, 2, 0, 1)] * 3 + [(1, 2, 1, 0)] * 3
    else:
        raise ValueError(name)
    tiles = _layer_tiles(layers) + (4 if name == "groups" else 0)   # _layer_tiles counts bands, not groups
    arch = lean_arch(rows=2, cols=-(-(tiles + 1) // 2), lanes=lanes, sram_bytes=lanes * 4096, max_tile_outputs=64,
                     result_ring_words=64 // lanes, router_fifo_depth=2)
    program = build_program(arch, layers, input_shape=shape, act_fill=rng)
    x = rng.integers(-128, 128, (3, int(np.prod(shape))), dtype=np.int8)
    return program, layers, shape, x, bands


PIXEL_BAND_CASES = ("conv-partial-rows", "conv-single-row", "maxpool", "depthwise", "average", "add", "add-skip-b",
                    "concat", "groups")


@pytest.mark.parametrize("name", PIXEL_BAND_CASES)
def test_pixel_band_cases(name):
    """Bands that begin or end inside a row, for every op: the expected registers, the functional result and
    the emulator's against the unsplit numpy golden, and the emulator against the reference cycle by cycle."""
    program, layers, shape, x, bands = _pixel_band_case(name)
    op = {"maxpool": OP_MAX, "depthwise": OP_LANE, "average": OP_LANE, "add": OP_ADD, "add-skip-b": OP_ADD,
          "concat": OP_CONCAT}.get(name, 0)
    banded = [t for t in program.tiles if t.config.n_out and t.config.op == op][-len(bands):]
    assert [_band_registers(t.config) for t in banded] == bands
    if name == "groups":
        assert [t.config.pass_per_pixel for t in banded] == [0, 1, 2] * 2
        assert [t.config.n_pass for t in banded] == [0, 4, 8, 12, 12 + 5, 12 + 10]
    batch = len(x)
    flits = _map_flits(program, x)
    golden = network_golden(layers, x, shape, program.arch.lanes)
    result = assert_matches_reference(program, x, batch, flits=flits, golden=golden)
    np.testing.assert_array_equal(result.out_flits, golden, err_msg="emulated output vs the unsplit numpy golden")
    np.testing.assert_array_equal(run_functional(program, flits, batch).out_flits, golden,
                                  err_msg="functional output vs the unsplit numpy golden")


def test_pixel_band_chain_long_batch():
    """A 5x5-output conv over 3 bands of 9, 9 and 7 pixels (cutting rows 1 and 3 in the middle), a max pool
    over bands of 6 and 10 pixels of its 4x4 output and a dense layer; a batch past the probe: outputs against
    the numpy golden, the emulator's times against the reference's (cycle by cycle) and plain sweeps'."""
    rng = np.random.default_rng(50)
    lanes = 2
    arch = lean_arch(rows=2, cols=3, lanes=lanes, sram_bytes=16384, max_tile_outputs=64, router_fifo_depth=2)
    conv = Conv(rng.integers(-128, 128, (3, 2, 3, 3), dtype=np.int8), rng.integers(-500, 500, 3), 2**30, 39,
                zp_in=-4, zp_out=1, clamp_lo=1, pads=(1, 1, 1, 1), pixel_bands=[9, 9, 7])
    pool = MaxPool(2, 2, stride=1, pixel_bands=[6, 10])
    dense = random_layer(rng, 4 * 4 * 2 * lanes, 5, 1)
    layers, shape = [conv, pool, dense], (2, 5, 5)
    program = build_program(arch, layers, input_shape=shape)
    assert [_band_registers(t.config) for t in program.tiles[:5]] == [(0, 2, 0, 4), (1, 3, 4, 3), (3, 2, 3, 0),
                                                                     (0, 2, 0, 2), (1, 3, 2, 0)]
    x = rng.integers(-128, 128, (3 * PROBE_BATCH, 50), dtype=np.int8)
    assert_long_batch(program, layers, shape, x)


def _random_pixel_split(rng, pixels, bands):
    """``bands`` positive pixel counts summing to ``pixels``, cut at random pixels."""
    cuts = np.sort(rng.choice(np.arange(1, pixels), bands - 1, replace=False)) if bands > 1 else np.zeros(0, int)
    return [int(b - a) for a, b in zip([0, *cuts], [*cuts, pixels])]


def _as_pixel_bands(rng, layers, shape):
    """``layers`` with every windowed layer's and map join's bands redrawn as random bands of output pixels
    (the same number of bands, so the same tiles); returns (layers, output shape)."""
    out = []
    for index, layer in enumerate(layers):
        if len(shape) != 3:   # a vector: dense layers and joins of them only from here on
            return out + list(layers[index:]), None
        height, width = shape[1:]
        if isinstance(layer, Dense):
            out.append(layer)
            shape = (layer.n_out,)
            continue
        if isinstance(layer, Residual):
            main, _ = _as_pixel_bands(rng, layer.main, shape)
            bands = layer_bands(layer)
            out.append(layer._replace(main=main, tiles=bands,
                                      pixel_bands=_random_pixel_split(rng, height * width, bands)))
            continue
        if isinstance(layer, Concat):
            a_branch, shape_a = _as_pixel_bands(rng, layer.a_branch, shape) if layer.a_branch else ([], shape)
            b_branch, shape_b = _as_pixel_bands(rng, layer.b_branch, shape) if layer.b_branch else ([], shape)
            bands = layer_bands(layer)
            out.append(layer._replace(a_branch=a_branch, b_branch=b_branch, tiles=bands,
                                      pixel_bands=_random_pixel_split(rng, height * width, bands)))
            shape = (shape_a[0] + shape_b[0], height, width)
            continue
        top, left, bottom, right = layer.pads
        out_shape = (layer.weights.shape[0] if isinstance(layer, Conv) else shape[0],
                     window_output_size(height, layer.kernel[0], layer.stride, top, bottom),
                     window_output_size(width, layer.kernel[1], layer.stride, left, right))
        bands = layer_bands(layer)
        out.append(layer._replace(tiles=bands,
                                  pixel_bands=_random_pixel_split(rng, out_shape[1] * out_shape[2], bands)))
        shape = out_shape
    return out, shape


def random_pixel_band_program(rng, *, budget=20000):
    """A random windowed, residual / concat or grouped program (the generators above) whose row bands are
    redrawn as random bands of output pixels over the same tiles, redrawn until some band begins or ends
    inside a row and the reference can step it in about ``budget`` cycles."""
    while True:
        kind = int(rng.integers(0, 3))
        if kind == 0:
            program, layers, shape, x, batch = random_windowed_program(rng, budget=budget)
        elif kind == 1:
            program, layers, shape, x, batch = random_residual_program(rng, budget=budget, concat=0.3)
        else:
            program, layers, shape, x, batch = random_grouped_program(rng, budget=budget)
        if shape is None:
            continue
        layers, _ = _as_pixel_bands(rng, layers, shape)
        banded = build_program(program.arch, layers, tail="direct" if rng.random() < 0.3 else "pass", act_fill=rng,
                               input_shape=shape)
        if not any(t.config.out_col_begin or t.config.out_col_end for t in banded.tiles):
            continue
        if _reference_cost(banded, batch) <= 2 * budget:
            return banded, layers, shape, x, batch


# 20 seeds (was 40): the long-batch family below draws from the same generator.
@pytest.mark.parametrize("seed", range(20))
def test_random_pixel_band_programs_match_reference(seed):
    """Random programs split into bands of output pixels: functional and emulated outputs against the numpy
    golden, the emulator against the reference cycle by cycle."""
    rng = np.random.default_rng(17000 + seed)
    program, layers, shape, x, batch = random_pixel_band_program(rng)
    flits = _map_flits(program, x)
    golden = network_golden(layers, x, shape, program.arch.lanes)
    result = assert_matches_reference(program, x, batch, flits=flits, golden=golden)
    np.testing.assert_array_equal(run_functional(program, flits, batch).out_flits, golden,
                                  err_msg="functional output vs the unsplit numpy golden")
    np.testing.assert_array_equal(result.out_flits, golden, err_msg="emulated output vs the unsplit numpy golden")


@pytest.mark.parametrize("seed", range(6))
def test_random_pixel_band_long_batches_match_reference(seed):
    """Batches past the probe (periodic extrapolation or its fallback) through random pixel bands: outputs
    against the golden, times against the reference cycle by cycle and against plain sweeps."""
    rng = np.random.default_rng(27000 + seed)
    program, layers, shape, x, _ = random_pixel_band_program(rng, budget=1500)
    batch = int(rng.integers(2 * PROBE_BATCH, 3 * PROBE_BATCH))
    assert_long_batch(program, layers, shape, rng.integers(-128, 128, (batch, x.shape[1]), dtype=np.int8))


@pytest.mark.parametrize("change,message", [
    (dict(out_col_begin=3), r"config register out_col_begin = 3 must be < out_width = 3"),
    (dict(out_col_end=4), r"config register out_col_end = 4 must be <= out_width = 3"),
    (dict(out_rows=1, out_col_begin=2, out_col_end=2),
     r"config registers out_col_begin = 2, out_col_end = 2 leave no output pixel: n_pix = .* = 0 with E' = "
     r"out_col_end = 2 must be >= 1"),
])
def test_bad_pixel_bands_are_refused(change, message):
    """Section 4.1's validity rule: out_col_begin < out_width, out_col_end <= out_width, n_pix >= 1 (here on
    the hand-computed program's first tile, out_width = 3)."""
    program = copy.deepcopy(_hand_pixel_band_case()[0])
    set_registers(program.tiles[0], **change)
    with pytest.raises(ProgramError, match=message):
        emulate(program, np.zeros((6, 2), np.int8), 1)


# --- (9) the spec's register rules the programs above do not reach ----------------------------------

_SPEC_ARCH = lean_arch(rows=1, cols=2, lanes=2, sram_bytes=128, max_tile_outputs=4, router_fifo_depth=2)   # 64 words
#: A dense MAC tile of 2 outputs over 2 words: weights at words 0..3, activation banks at 4..7.
_SPEC_TILE = TileConfig(n_in_words=2, store_end=2, n_out=2, w_base=0, act_base=4, dest_host=1, clamp_lo=-128,
                        clamp_hi=127, in_height=1, in_width=1, words_per_pixel=2, kernel_h=1, kernel_w=1, stride=1,
                        out_rows=1, out_width=1)


@pytest.mark.parametrize("changes,message", [
    (dict(n_out=5), r"^config register n_out = 5 exceeds max_tile_outputs = 4$"),
    (dict(act_base=61), r"^config registers act_base \+ 2 \* \(store_end - store_begin\) = 65 exceed sram_words = 64 "
                        r"\(2 activation banks of the stored words\)$"),
    (dict(w_base=61, act_base=8), r"^config registers w_base \+ n_out \* kernel_h \* kernel_w \* words_per_pixel = 65 "
                                  r"exceed sram_words = 64$"),
    (dict(n_out=0, w_base=65), r"^config register w_base = 65 exceeds sram_words = 64$"),
    (dict(n_out=0, n_pass=1, pass_per_pixel=1),
     r"^config register pass_per_pixel = 1 requires a computing tile \(n_out > 0; section 4.4\)$"),
    (dict(zp_out=256), r"^config register 'zp_out' = 256 is out of range -256..255$"),
    (dict(dest_host=0, dest_row=1), r"^config register dest_row = 1 outside 0..0$"),
])
def test_spec_register_rules(changes, message):
    """TileConfig.validate, the one home of the register rules (Program.validate runs it per tile, prefixing the
    tile; the emulator and the RTL's encode_config go through it)."""
    _SPEC_TILE.validate(_SPEC_ARCH)
    with pytest.raises(ConfigError, match=message):
        _SPEC_TILE.replace(**changes).validate(_SPEC_ARCH)


def test_spec_config_boundary():
    """Dicts become TileConfigs at one boundary: every register named once, integers only."""
    registers = _SPEC_TILE.to_dict()
    assert TileConfig.from_dict(registers) == TileConfig.coerce(registers) == _SPEC_TILE
    assert TileConfig.coerce(_SPEC_TILE) is _SPEC_TILE
    assert TileConfig(n_out=np.int64(3)).n_out == 3 and type(TileConfig(n_out=np.int64(3)).n_out) is int
    with pytest.raises(ConfigError, match=r"config is missing register\(s\) n_in_words"):
        TileConfig.from_dict({k: v for k, v in registers.items() if k != "n_in_words"})
    with pytest.raises(ConfigError, match=r"config has unknown register\(s\) turbo"):
        TileConfig.from_dict(dict(registers, turbo=1))
    with pytest.raises(ConfigError, match=r"config register 'n_out' must be an integer, got 2.5"):
        TileConfig(n_out=2.5)
    with pytest.raises(ProgramError, match=r"tile r0c1: config is missing register"):
        TileProgram(0, 1, {"n_out": 1}, np.zeros((0, 2), np.int8), np.zeros((0, 3), np.int64))
