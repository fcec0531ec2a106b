"""Several layers per tile (docs/architecture.md section 4.6, tile contexts) in the emulator.

A program's consecutive computing tiles are packed into the contexts of fewer tiles (:func:`pack_contexts`, written
here from section 4.6: each context's weights and banks relocated into the tile's one SRAM image, its parameter rows
from ``param_base``, ``loop_back`` in all contexts but the last, every later context's forward queue holding a whole
inference of what it forwards and passes). Checked:

(a) data: the packed program's outputs equal the unpacked program's, the numpy golden and, for a compiled network,
    the compiler's integer reference (``reference_forward``);
(b) timing, two independent oracles: a cycle-stepping reference of the whole mesh in which a tile of several
    contexts is stepped from section 4.6's text (:class:`ReferenceContextTile`, its contexts' data and registers
    from ``test_emulator.ReferencePE``), compared transfer by transfer; and a checker of the solved times alone
    (:func:`check_context_tile`): per side one action a cycle in turn order, the per-context event rules, the
    forward queues, the loop-back FIFO, the shared result ring, the router FIFOs around the tile, and that every
    transfer happens in the first cycle its rules allow (the least solution);
(c) the fast paths (probe and extrapolation, windows) against plain whole-batch sweeps, action for action.
"""
from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from flowtile.testing.archs import lean_arch
from flowtile.emulator import EmulatorError, emulate, run_functional
from flowtile.emulator import timing
from flowtile.emulator.path import trace_data_path
from flowtile.emulator.timing import solve_timing
from flowtile.host import HostPattern, pack_flits
from flowtile.program import Program, ProgramError, TileProgram
from flowtile.tile_config import ConfigError, TileConfig
from flowtile.testing.program_builder import Dense, build_program, dense_golden, network_golden

import test_emulator
from test_emulator_fast_paths import _assert_same
from test_emulator import (ReferencePE, assert_same_times, random_layer,
                           random_program, random_residual_program, random_windowed_program, random_grouped_program)


# --- packing consecutive tiles into contexts (section 4.6) ------------------------------------------------------

def pack_contexts(program: Program, groups, *, queue_words=None, tail: str = "pass", ring: int | None = None,
                  depth: int | None = None, whole_queues: bool = True, validate: bool = True) -> Program:
    """``program`` with its computing tiles (a prefix of its data path) packed into tiles of several contexts:
    ``groups`` lists how many consecutive computing tiles each new tile holds, in order; the new tiles take chain
    positions ``0, 1, ...``, the rest pass the output through (``tail = "pass"``) or stay idle while the last new tile
    sends to the host (``"direct"``).

    Each context keeps its tile's registers with its weights and banks moved into the new tile's SRAM image, one
    member after another (``w_base``, ``act_base`` shifted), its parameter rows at ``param_base``, its forward queue
    behind all of them: ``queue_words(context index, words it queues)`` words (default: exactly what it queues), but
    in a tile of several contexts at least what it queues: a later context needs that (section 4.6), and so does
    context 0, whose pops go into the loop-back FIFO, which the input side reads only after context 0's turn (a
    context-0 queue of ``F_0 < Q_0`` words deadlocks once ``Q_0 - F_0`` exceeds what the loop-back FIFO takes in
    meanwhile; ``whole_queues = False`` lifts that for context 0). ``ring``, ``depth``: the arch's result ring and
    FIFO depth (default: ``program``'s). ``validate``: run ``Program.validate`` on the result."""
    arch0 = program.arch
    lanes = arch0.lanes
    order = list(trace_data_path(program).order)
    computing = [p for p in order if program.tiles[p].config.n_out]
    assert order[:len(computing)] == computing, "the computing tiles must lead the data path"
    assert sum(groups) == len(computing), (groups, len(computing))
    packed, start = [], 0
    for size in groups:
        members = [program.tiles[p] for p in computing[start:start + size]]
        start += size
        configs, images, rows, offset, row = [], [], [], 0, 0
        for tile in members:
            config = tile.config
            end = config.data_end
            image = np.zeros((end, lanes), dtype=np.int8)
            image[:min(end, len(tile.sram))] = tile.sram[:end]
            images.append(image)
            rows.append(np.asarray(tile.params)[:config.n_out])
            configs.append(config.replace(w_base=config.w_base + offset if config.weight_words else 0,
                                          act_base=config.act_base + offset, param_base=row))
            offset += end
            row += config.n_out
        for index, config in enumerate(configs):
            queued = config.queued_words
            words = 0
            if queued:
                least = queued if len(configs) > 1 and (index or whole_queues) else 1
                words = queued if queue_words is None else max(queue_words(index, queued), least)
            configs[index] = config.replace(queue_base=offset if words else 0, queue_words=words)
            offset += words
        for index in range(len(configs) - 1):
            configs[index] = configs[index].replace(loop_back=1, dest_row=0, dest_col=0, dest_host=0)
        packed.append((members[0], configs, np.concatenate(images), np.concatenate(rows), offset, row))
    words_needed = max(offset for *_, offset, _ in packed)
    rows_needed = max(row for *_, row in packed)
    sram_words = min(65536, max(arch0.sram_words, words_needed))
    arch = arch0.replace(tile_contexts=max(max(groups), 1), sram_bytes=sram_words * lanes,
                         max_tile_outputs=max(arch0.max_tile_outputs, rows_needed),
                         **({} if ring is None else {"result_ring_words": ring}),
                         **({} if depth is None else {"router_fifo_depth": depth}))
    output_words = program.output_words
    tiles = []
    for position in range(arch.n_tiles):
        row_, col_ = arch.chain_position(position)
        if position < len(packed):
            first, configs, image, params, *_ = packed[position]
            sram = np.zeros((arch.sram_words, lanes), dtype=np.int8)
            sram[:len(image)] = image
            tiles.append(TileProgram(row_, col_, configs[0], sram, params, later_contexts=tuple(configs[1:])))
        elif tail == "pass":
            config = TileConfig(n_pass=output_words).with_queue(arch, None)
            tiles.append(TileProgram(row_, col_, config, np.zeros((0, lanes), np.int8), np.zeros((0, 3), np.int64)))
        else:
            tiles.append(TileProgram(row_, col_, TileConfig(), np.zeros((0, lanes), np.int8),
                                     np.zeros((0, 3), np.int64)))
    working = len(packed) if tail == "direct" else arch.n_tiles
    for position in range(working):
        tile = tiles[position]
        last = tile.contexts[-1]
        if position == working - 1:
            last = last.replace(dest_row=0, dest_col=0, dest_host=1)
        else:
            dest_row, dest_col = arch.chain_position(position + 1)
            last = last.replace(dest_row=dest_row, dest_col=dest_col, dest_host=0)
        if tile.later_contexts:
            tile.later_contexts = (*tile.later_contexts[:-1], last)
        else:
            tile.config = last
    result = Program(arch=arch, input=program.input, output=program.output, layers=program.layers, tiles=tiles,
                     model_name=program.model_name)
    if validate:
        result.validate()
    return result


def random_groups(rng, n: int, most: int) -> list[int]:
    """A random split of ``n`` consecutive tiles into groups of 1..``most``."""
    groups = []
    while n:
        size = int(rng.integers(1, min(most, n) + 1))
        groups.append(size)
        n -= size
    return groups


# --- (b) the cycle-stepping reference of a tile of several contexts -------------------------------------------------

def _turn(widths, n):
    """``(inference, context, index within the context's actions)`` of a side's ``n``-th action, the contexts'
    ``widths`` actions per inference in turn order."""
    s, r = divmod(n, sum(widths))
    for c, width in enumerate(widths):
        if r < width:
            return s, c, r
        r -= width
    raise AssertionError("unreachable")


class ReferenceContextTile:
    """A tile of several contexts stepped cycle by cycle from section 4.6's text. Each context is a
    ``test_emulator.ReferencePE`` of its registers, its parameter rows (``param_base``) and the tile's one SRAM (shared
    by all contexts): it keeps the context's queue, banks, records and arithmetic. The tile serves them in turn:

    * input side: per inference context 0's ``K_0 + P_0`` transfers (from the router's L FIFO), then context 1's (from
      the loop-back FIFO), ...; each with its context's rules (queue space, the first transfer of ``(c, s)`` after
      COMPUTE of ``(c, s - 1)`` began, with one bank ended, which the context's own ReferencePE checks);
    * compute side: result words numbered over contexts and inferences in turn order; word ``j`` begins in the first
      cycle after the previous word's issues (``+ 2`` drain cycles before a context's first word), for a context's
      first word after its RECV word ``store_end - 1`` of that inference, and for ``j >= R`` after the EMIT of word
      ``j - R`` (one ring for all contexts);
    * output side: per inference context 0's ``Q_0 + E_0`` transfers in section 4.4's order, then context 1's, ...;
      a context's EMIT of its word ``w`` is the ring's word ``j`` of that (context, inference), readable from ``a_j +
      d_j + 2``; all but the last context write the loop-back FIFO (depth D: writable iff it held fewer than D words
      at the start of the cycle; a word is readable from the cycle after its write), the last the router.

    Records ``input_times``, ``word_starts`` (a_j, ring numbering), ``output_times`` (the tile's chains in turn order)
    and per (inference, context) the COMPUTE start ``compute_starts``."""

    def __init__(self, tile, arch, position):
        self.contexts = []
        for config in tile.contexts:
            view = TileProgram(tile.row, tile.col, config, tile.sram,
                               np.asarray(tile.params)[config.param_base:config.param_base + config.n_out],
                               chip=tile.chip)
            self.contexts.append(ReferencePE(view, arch, position))
        for context in self.contexts[1:]:
            context.sram = self.contexts[0].sram            # one SRAM for the tile
        self.position = position
        self.dest = self.contexts[-1].dest
        self.depth, self.ring = arch.router_fifo_depth, arch.result_words
        self.in_widths = [c.k + c.p for c in self.contexts]
        self.out_widths = [c.pops + c.emits for c in self.contexts]
        self.word_widths = [c.emits for c in self.contexts]
        self.word_d = [d for c in self.contexts for d in c.word_d]     # per inference, in compute order
        self.loop_back: deque = deque()                                # (word, cycle written)
        self.input_times, self.output_times, self.word_starts, self.emit_times = [], [], [], []
        self.compute_starts: list[int] = []                            # per (s, c), in compute order
        self.planned = []

    idle = False

    def finished(self, batch):
        return (len(self.input_times) == batch * sum(self.in_widths)
                and len(self.word_starts) == batch * sum(self.word_widths)
                and len(self.output_times) == batch * sum(self.out_widths))

    def start_compute(self, cycle):
        j = len(self.word_starts)
        s, c, w = _turn(self.word_widths, j)
        context = self.contexts[c]
        if j and cycle < self.word_starts[-1] + self.word_d[(j - 1) % len(self.word_d)] + (2 if w == 0 else 0):
            return
        if w == 0 and (len(context.stored_done) <= s or context.stored_done[s] >= cycle):
            return
        if j >= self.ring and (len(self.emit_times) <= j - self.ring or self.emit_times[j - self.ring] >= cycle):
            return
        self.word_starts.append(cycle)
        context.word_starts.append(cycle)
        if w == 0:
            self.compute_starts.append(cycle)
            context.compute_starts.append(cycle)
            context.results.append(context.compute(context.config.act_base
                                                   + (s % context.banks) * context.bank_words))

    def _input_turn(self):
        return _turn(self.in_widths, len(self.input_times))[1]

    def _output_turn(self):
        return _turn(self.out_widths, len(self.output_times))[1]

    def input_ready(self, cycle):
        """Ready for a flit from the router in ``cycle``: context 0's turn and its rules."""
        return self._input_turn() == 0 and self.contexts[0].input_ready(cycle)

    def output_word(self, cycle):
        """The word offered to the router: the last context's turn and its rules."""
        c = self._output_turn()
        return self.contexts[c].output_word(cycle) if c == len(self.contexts) - 1 else None

    def plan_loop_back(self, cycle):
        """The loop-back transfers of this cycle, decided on the state at its start."""
        self.planned = []
        c = self._output_turn()
        if c < len(self.contexts) - 1 and len(self.loop_back) < self.depth:
            word = self.contexts[c].output_word(cycle)
            if word is not None:
                self.planned.append(("out", c, word))
        c = self._input_turn()
        if c and self.loop_back and self.loop_back[0][1] < cycle and self.contexts[c].input_ready(cycle):
            self.planned.append(("in", c, self.loop_back[0][0]))

    def _output(self, c, cycle):
        context = self.contexts[c]
        emits = context.out_actions[len(context.output_times) % len(context.out_actions)] is not None
        context.do_output(cycle)
        self.output_times.append(cycle)
        if emits:
            self.emit_times.append(cycle)

    def do_output(self, cycle):
        self._output(len(self.contexts) - 1, cycle)

    def do_input(self, cycle, data):
        self.contexts[0].do_input(cycle, data)
        self.input_times.append(cycle)

    def apply_loop_back(self, cycle):
        for kind, c, word in self.planned:
            if kind == "out":
                self._output(c, cycle)
                self.loop_back.append((list(word), cycle))
            else:
                self.loop_back.popleft()
                self.contexts[c].do_input(cycle, word)
                self.input_times.append(cycle)


def reference_run(program, in_flits, batch, max_cycles=300_000, host_pattern=None):
    """``test_emulator.reference_run`` (the whole mesh stepped every cycle: router FIFOs, round-robin grants, the
    host) with :class:`ReferenceContextTile` for the tiles of several contexts. Returns (out_flits, out_times,
    in_times, PEs by chain position)."""
    def tile_model(tile, arch, position):
        return (ReferenceContextTile if tile.later_contexts else ReferencePE)(tile, arch, position)
    return test_emulator.reference_run(program, in_flits, batch, max_cycles, host_pattern, pe_factory=tile_model)


def assert_matches_reference(program, flits, batch, *, host_pattern=None):
    """The emulator against :func:`reference_run`, flit by flit and cycle by cycle; returns the emulator's result."""
    ref_flits, ref_out, ref_in, ref_pes = reference_run(program, flits, batch, host_pattern=host_pattern)
    result = emulate(program, flits, batch, **({} if host_pattern is None else {"host_pattern": host_pattern}))
    np.testing.assert_array_equal(result.out_flits, ref_flits, err_msg="output flit data")
    assert_same_times(result.in_times, ref_in, "host input transfer cycles")
    assert_same_times(result.out_times, ref_out, "host output transfer cycles")
    for position, pe in enumerate(ref_pes):
        where = f"chain position {position}"
        times = result.timing.pe_times[position]
        if pe.idle:
            assert times is None, f"{where} is idle but has PE times"
            continue
        assert_same_times(times.input, pe.input_times, f"{where}: input-side transfer cycles")
        assert_same_times(times.output, pe.output_times, f"{where}: output-side transfer cycles")
        assert_same_times(result.timing.word_starts[position], pe.word_starts, f"{where}: result word starts a_j")
        if isinstance(pe, ReferenceContextTile):
            assert_same_times(times.compute, pe.compute_starts, f"{where}: COMPUTE starts per (inference, context)")
            for index, (context_times, context) in enumerate(zip(result.timing.context_times[position], pe.contexts)):
                what = f"{where} context {index}"
                assert_same_times(context_times.input, context.input_times, f"{what}: input-side transfer cycles")
                assert_same_times(context_times.compute, context.compute_starts, f"{what}: COMPUTE starts")
                assert_same_times(context_times.output, context.output_times, f"{what}: output-side transfer cycles")
        else:
            assert_same_times(times.compute, pe.compute_starts, f"{where}: COMPUTE starts")
    return result


# --- (b) the solved times against section 4.6's rules ---------------------------------------------------------------

def _router_flits(program, result, index):
    """The times at which chain ``index`` (of ``result.timing``'s streams) writes or reads the router FIFO beside a
    tile: all its actions, or for a tile of several contexts the part that faces the router (the first context's
    input, the last context's output)."""
    name = result.timing.stream_names[index]
    times = result.timing.stream_times[index]
    if name.startswith("link ") and " sender " in name:      # a link's sender: its accepts read the exit FIFO
        return result.timing.link_times[int(name.split()[1])].accept
    for position, tile in enumerate(program.tiles):
        if tile.later_contexts and name.startswith(f"PE {tile.key} "):
            contexts = result.timing.context_times[position]
            if name.endswith("input side"):
                return contexts[0].input
            assert name.endswith("output side"), name
            return contexts[-1].output
    return times


def check_context_tile(program, result, position):
    """The solved times of the tile of several contexts at chain ``position`` against section 4.6 (with sections 4
    and 6), from the times alone: every inequality of the rules, and every transfer at the maximum of its lower bounds
    (the first cycle its rules allow: the least solution)."""
    tile, arch = program.tiles[position], program.arch
    batch = result.batch
    depth, ring = arch.router_fifo_depth, arch.result_words
    configs = tile.contexts
    n = len(configs)
    contexts = result.timing.context_times[position]
    ends = result.timing.context_compute_ends[position]
    pe = result.timing.pe_times[position]
    words = result.timing.word_starts[position]
    counts = result.path.counts[position].contexts
    assert len(contexts) == n == len(counts)
    where = f"tile {tile.key}"
    # the chains, per inference in turn order
    for name, times in (("input", pe.input), ("output", pe.output)):
        assert (np.diff(times) >= 1).all(), f"{where}: two {name} transfers in one cycle"
        np.testing.assert_array_equal(np.concatenate([getattr(c, name).reshape(batch, -1) for c in contexts],
                                                     axis=1).ravel(), times, err_msg=f"{where}: {name} turn order")
    # per context: its words, d, the ring numbering
    d_all, context_of_word, first_of_context = [], [], []
    for index, count in enumerate(counts):
        d = list(count.word_issue_cycles())
        first_of_context += [True] + [False] * (len(d) - 1)
        d_all += d
        context_of_word += [index] * len(d)
    width_words = len(d_all)
    d_batch = np.tile(d_all, batch)
    first_batch = np.tile(first_of_context, batch)
    assert len(words) == batch * width_words
    # EMIT times in ring order: each context's EMITs of inference s, contexts in turn, inferences in order
    emits = np.concatenate([
        np.concatenate([c.output.reshape(batch, -1)[:, ~count.output_is_pop()] for c, count in zip(contexts, counts)],
                       axis=1)], axis=1).ravel()
    assert len(emits) == len(words)
    # --- compute side: a_j = max(a_{j-1} + d_{j-1} (+2 for a context's first word), store + 1, EMIT_{j-R} + 1)
    store_done = []
    for c, count in zip(contexts, counts):
        store_done.append(c.input.reshape(batch, -1)[:, count.store_until - 1])
    word_context = np.tile(context_of_word, batch)
    word_inference = np.repeat(np.arange(batch), width_words)
    for j in range(len(words)):
        bounds = [0]
        if j:
            bounds.append(words[j - 1] + d_batch[j - 1] + (2 if first_batch[j] else 0))
        if first_batch[j]:
            bounds.append(store_done[word_context[j]][word_inference[j]] + 1)
        if j >= ring:
            bounds.append(emits[j - ring] + 1)
        assert words[j] == max(bounds), f"{where}: result word {j} begins at {words[j]}, the rules give {bounds}"
        assert emits[j] >= words[j] + d_batch[j] + 2, f"{where}: EMIT of word {j} before it is written"
    for index, (c, count) in enumerate(zip(contexts, counts)):
        first_words = words.reshape(batch, width_words)[:, context_of_word.index(index)]
        np.testing.assert_array_equal(c.compute, first_words, err_msg=f"{where} context {index}: c_s")
        last = context_of_word.index(index) + count.n_result_words - 1
        np.testing.assert_array_equal(ends[index], words.reshape(batch, width_words)[:, last] + d_all[last] + 2)
    # --- the loop-back FIFO: contexts 0..n-2's output transfers, read by contexts 1..n-1's input transfers
    written = np.concatenate([c.output.reshape(batch, -1) for c in contexts[:-1]], axis=1).ravel()
    read = np.concatenate([c.input.reshape(batch, -1) for c in contexts[1:]], axis=1).ravel()
    assert len(written) == len(read)
    assert (read >= written + 1).all(), f"{where}: a loop-back word read before it was written"
    assert (written[depth:] >= read[:-depth] + 1).all(), f"{where}: a loop-back word written into a full FIFO"
    # --- the router FIFOs beside the tile (the tile's input FIFO, its local output FIFO)
    names = result.timing.stream_names
    in_index, out_index = names.index(f"PE {tile.key} input side"), names.index(f"PE {tile.key} output side")
    router_in = _router_flits(program, result, in_index - 1)       # writes the tile's input FIFO
    router_out = _router_flits(program, result, out_index + 1)     # reads the tile's local FIFO
    assert len(router_in) == len(contexts[0].input) and len(router_out) == len(contexts[-1].output)
    # --- per side, every transfer at the maximum of its bounds
    queues = []
    for index, (c, count, config) in enumerate(zip(contexts, counts, configs)):
        per_in = count.flits_in
        pushing = np.zeros(per_in, dtype=bool)
        pushing[count.forward_begin:count.forward_end] = True
        pushing[count.n_in_words:] = True
        pushes = c.input.reshape(batch, per_in)[:, pushing].ravel()
        pops = c.output.reshape(batch, -1)[:, count.output_is_pop()].ravel()
        assert len(pushes) == len(pops)
        assert (pops >= pushes + 1).all(), f"{where} context {index}: a queue word popped before its push"
        F = config.queue_words
        assert (pushes[F:] >= pops[:-F or None][:len(pushes) - F] + 1).all() if len(pushes) > F else True
        queues.append((pushing, pushes, pops, F))
    # input chain
    loop_read = 0
    lb_index = {}
    k = 0
    for s in range(batch):
        for index, (c, count) in enumerate(zip(contexts, counts)):
            pushing, pushes, pops, F = queues[index]
            push_number = s * int(pushing.sum())
            for a in range(count.flits_in):
                t = int(c.input[s * count.flits_in + a])
                bounds = [int(pe.input[k - 1]) + 1 if k else 0]
                if index == 0:
                    bounds.append(int(router_in[s * count.flits_in + a]) + 1)
                else:
                    bounds.append(int(written[loop_read]) + 1)
                    lb_index[loop_read] = k
                    loop_read += 1
                if pushing[a]:
                    if push_number >= F:
                        bounds.append(int(pops[push_number - F]) + 1)
                    push_number += 1
                if a == 0 and s >= 1:   # the bank hand-over: COMPUTE of (c, s - 1) began, with one bank ended
                    bounds.append(int(ends[index][s - 1] if config.single_bank else c.compute[s - 1]))
                assert t == int(pe.input[k]) and t == max(bounds), \
                    f"{where}: input transfer {a} of context {index}, inference {s}, at {t}; the rules give {bounds}"
                k += 1
    # output chain
    k = word = loop_write = 0
    for s in range(batch):
        for index, (c, count) in enumerate(zip(contexts, counts)):
            pushing, pushes, pops, F = queues[index]
            pop_number = s * int(pushing.sum())
            is_pop = count.output_is_pop()
            for a in range(count.flits_out):
                t = int(c.output[s * count.flits_out + a])
                bounds = [int(pe.output[k - 1]) + 1 if k else 0]
                if is_pop[a]:
                    bounds.append(int(pushes[pop_number]) + 1)
                    pop_number += 1
                else:
                    bounds.append(int(words[word]) + int(d_batch[word]) + 2)
                    word += 1
                if index < n - 1:
                    if loop_write >= depth:
                        bounds.append(int(read[loop_write - depth]) + 1)
                    loop_write += 1
                else:
                    flit = s * count.flits_out + a
                    if flit >= depth:
                        bounds.append(int(router_out[flit - depth]) + 1)
                assert t == int(pe.output[k]) and t == max(bounds), \
                    f"{where}: output transfer {a} of context {index}, inference {s}, at {t}; the rules give {bounds}"
                k += 1
    # the router FIFOs: read after written, written when there is space
    assert (contexts[0].input >= router_in + 1).all()
    assert (router_out >= contexts[-1].output + 1).all()


def check_all_context_tiles(program, result):
    for position, tile in enumerate(program.tiles):
        if tile.later_contexts:
            check_context_tile(program, result, position)


# --- (a) data -------------------------------------------------------------------------------------------------------

def _dense_chain(rng, lanes=4, layers=4):
    arch = lean_arch(rows=2, cols=3, lanes=lanes, sram_bytes=lanes * 4096, router_fifo_depth=2)
    width = int(rng.integers(2, 3 * lanes))
    built = []
    for _ in range(layers):
        n_out = int(rng.integers(1, 3 * lanes))
        built.append(random_layer(rng, width, n_out, 1))
        width = n_out
    return arch, built


@pytest.mark.parametrize("groups", [[2, 2], [3, 1], [1, 3], [4], [2, 1, 1]])
def test_dense_contexts_equal_separate_tiles(groups):
    """Four dense layers, packed 2+2, 3+1, 1+3, 4 or 2+1+1 into tiles of contexts: the outputs equal the layers on
    separate tiles and the numpy golden; the times equal the cycle-stepping reference's and meet every rule."""
    rng = np.random.default_rng(11 + sum(g * 7 ** i for i, g in enumerate(groups)))
    arch, layers = _dense_chain(rng)
    program = build_program(arch, layers, act_fill=rng, queue_words=8)
    batch = 5
    x = rng.integers(-128, 128, (batch, layers[0].n_in), dtype=np.int8)
    flits = pack_flits(x, arch.lanes)
    packed = pack_contexts(program, groups)
    assert [len(t.contexts) for t in packed.tiles[:len(groups)]] == groups
    separate = emulate(program, flits, batch)
    result = assert_matches_reference(packed, flits, batch)
    np.testing.assert_array_equal(result.out_flits, separate.out_flits)
    golden = dense_golden(layers, x)
    np.testing.assert_array_equal(result.out_flits.reshape(batch, -1)[:, :layers[-1].n_out], golden)
    check_all_context_tiles(packed, result)


def _random_source(rng, kind):
    if kind == "dense":
        program, layers, x, batch = random_program(rng)
        return program, layers, None, x, batch
    if kind == "windowed":
        return random_windowed_program(rng, budget=12000)
    if kind == "residual":
        return random_residual_program(rng, budget=12000, concat=0.3)
    return random_grouped_program(rng, budget=12000)


KINDS = ("dense", "windowed", "residual", "grouped")


def _random_packed(rng, kind, *, most=3):
    """A random program of ``kind`` packed into tiles of up to ``most`` contexts (random groups, later queues from
    exactly what they queue to a few words more, context 0's from 1 word), on a ring of its own, a FIFO depth of 1..4
    and a pass or direct tail; with its layers, input shape, input and batch."""
    while True:            # at least two computing tiles, so that some tile gets several contexts
        program, layers, shape, x, batch = _random_source(rng, kind)
        computing = sum(1 for t in program.tiles if t.config.n_out)
        if computing >= 2:
            break
    groups = [1]
    while max(groups) == 1:
        groups = random_groups(rng, computing, most)
    extra = [int(rng.integers(0, 4)) for _ in range(most)]
    small = rng.random() < 0.5

    def queue_words(index, queued):
        if index == 0 and small:
            return int(rng.integers(1, 6))
        return queued + extra[index]

    ring = None
    if rng.random() < 0.4:
        widest = max(-(-t.config.n_out // program.arch.lanes) for t in program.tiles if t.config.n_out)
        ring = int(rng.integers(1, widest + 3)) if rng.random() < 0.5 else int(rng.integers(1, 4))
    depth = int(rng.integers(1, 5))
    packed = pack_contexts(program, groups, queue_words=queue_words, ring=ring, depth=depth,
                           tail="direct" if rng.random() < 0.3 else "pass")
    try:
        trace_data_path(packed)
    except EmulatorError as error:          # a direct tail whose XY route meets another stream: pass instead
        assert "contended" in str(error), error
        packed = pack_contexts(program, groups, queue_words=queue_words, ring=ring, depth=depth)
    return program, packed, layers, shape, x, batch


# 24 seeds (was 48), six of each kind: the fast-path and host-stall tests below pack 28 more random programs of
# the four kinds.
@pytest.mark.parametrize("seed", range(24))
def test_random_packed_programs_match_reference(seed):
    """Random dense, windowed, residual / concat and grouped programs packed into tiles of up to three contexts:
    outputs equal the unpacked program's and the golden; every transfer equals the cycle-stepping reference's and
    meets section 4.6's rules, each at the first cycle they allow."""
    rng = np.random.default_rng(46000 + seed)
    kind = KINDS[seed % 4]
    program, packed, layers, shape, x, batch = _random_packed(rng, kind)
    flits = pack_flits(x, program.arch.lanes, program.input)
    golden = network_golden(layers, x, shape, program.arch.lanes)
    result = assert_matches_reference(packed, flits, batch)
    np.testing.assert_array_equal(result.out_flits, golden)
    check_all_context_tiles(packed, result)


@pytest.mark.parametrize("seed", range(12))
def test_random_packed_single_bank_programs_match_reference(seed):
    """Packed random programs with one activation bank (section 4, "One bank") in a random half of the contexts of
    their tiles of several contexts (at least one): every inference of such a context is stored into bank 0 and
    computed from there. The outputs equal the golden, every transfer the cycle-stepping reference's, each at the
    first cycle section 4.6's rules allow (a third under host stalls). The times equal two banks' (measured on these
    seeds): in a tile of several contexts a context's next inference arrives only after its results went out, so
    after its COMPUTE ended, and the hand-over never decides a cycle (section 4.6)."""
    rng = np.random.default_rng(49000 + seed)
    while True:
        program, packed, layers, shape, x, batch = _random_packed(rng, KINDS[seed % 4])
        able = [(tile, index) for tile in packed.tiles if tile.later_contexts
                for index, config in enumerate(tile.contexts) if _one_bank_valid(config, packed.arch)]
        if able and batch >= 2:
            break
    chosen = [pair for pair in able if rng.random() < 0.5] or [able[int(rng.integers(len(able)))]]
    for tile, index in chosen:
        configs = list(tile.contexts)
        configs[index] = configs[index].replace(single_bank=1)
        tile.config, tile.later_contexts = configs[0], tuple(configs[1:])
    packed.validate()
    pattern = None
    if seed % 3 == 2:
        pattern = HostPattern(int(rng.integers(0, 1 << 16)), 0.5, 3.0, 0.8, 1.0)
    flits = pack_flits(x, program.arch.lanes, program.input)
    result = assert_matches_reference(packed, flits, batch, host_pattern=pattern)
    np.testing.assert_array_equal(result.out_flits, network_golden(layers, x, shape, program.arch.lanes))
    check_all_context_tiles(packed, result)


def _one_bank_valid(config, arch) -> bool:
    try:
        config.replace(single_bank=1).validate(arch)
    except ConfigError:
        return False
    return True


def test_short_first_queue_is_refused_and_a_whole_one_runs():
    """Context 0 of a tile of several contexts sends its pops into the loop-back FIFO, which the input side reads
    only after context 0's turn: a queue of fewer than ``Q_0`` words could wait forever (the cycle-stepping reference
    deadlocked at ``Q_0 - D - 1``), so the program rules refuse any, naming the deadlock; a whole inference's queue
    runs, equal to the reference."""
    rng = np.random.default_rng(5)
    lanes, depth = 4, 2
    arch = lean_arch(rows=1, cols=3, lanes=lanes, sram_bytes=lanes * 4096, router_fifo_depth=depth)
    first = random_layer(rng, 6 * lanes, 2 * lanes, 2)        # over two tiles: the first forwards its 6 input words
    layers = [first, random_layer(rng, 2 * lanes, 5, 1)]
    program = build_program(arch, layers, act_fill=rng, queue_words=8)
    assert program.tiles[0].config.queued_words == 6
    batch = 3
    x = rng.integers(-128, 128, (batch, first.n_in), dtype=np.int8)
    flits = pack_flits(x, lanes)
    for words in (6 - depth - 1, 6 - depth, 6):
        packed = pack_contexts(program, [2, 1], queue_words=lambda index, queued: words if index == 0 else queued,
                               whole_queues=False, validate=False)
        assert packed.tiles[0].config.queue_words == words
        if words < 6:
            with pytest.raises(ProgramError, match=r"context 0: queue_words = \d+ is less than the 6 words .* "
                                                   r"deadlock"):
                packed.validate()
            continue
        result = assert_matches_reference(packed, flits, batch)
        np.testing.assert_array_equal(result.out_flits.reshape(batch, -1)[:, :5], dense_golden(layers, x))
        check_all_context_tiles(packed, result)


# --- (c) the fast paths against plain sweeps ------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(16))
def test_fast_paths_equal_plain_sweeps(seed, monkeypatch):
    """Probes with their periodic extrapolation (whole-batch sweeps of a probe) and windows (a few inferences at a
    time, a PE's compute and output chains solved together through the ring, extrapolation after every window) give
    every action of every chain exactly as plain whole-batch sweeps, on packed random programs over 37 inferences;
    the solved times meet every rule of section 4.6 at the first cycle it allows."""
    rng = np.random.default_rng(47000 + seed)
    program, packed, *_ = _random_packed(rng, KINDS[seed % 4])
    batch = 37
    plain = solve_timing(packed, batch, probe_batch=None)
    for probe in (2, 4, 16):
        _assert_same(plain, solve_timing(packed, batch, probe_batch=probe), f"probe {probe}")
    monkeypatch.setattr(timing, "WINDOW_MIN_ACTIONS", 0)      # windows for these small programs too
    for probe in (1, 4, 16):
        _assert_same(plain, solve_timing(packed, batch, probe_batch=probe), f"windows, probe {probe}")
    monkeypatch.setattr(timing, "WINDOW_PROBE", batch)        # every inference in windows, no extrapolation
    graph = timing.timing_graph(packed, trace_data_path(packed))
    tail = timing._pass_through_tail(graph)
    system, _, extrapolated = timing._solve_in_windows(graph, tail, batch, batch, timing._spaced_delays(graph))
    assert not extrapolated
    for name, a, b in zip(plain.stream_names, plain.stream_times, system.solution()):
        np.testing.assert_array_equal(a, b, err_msg=f"{name}, all windows")
    # the solution against the rules (the emulate() result carries path and batch for the checker)
    flits = np.zeros((batch * packed.input_words, packed.arch.lanes), dtype=np.int8)
    check_all_context_tiles(packed, emulate(packed, flits, batch))


def _windowed_system(packed, batch):
    """``packed``'s chains solved wholly in windows (no extrapolation), with its graph and pass-through tail."""
    graph = timing.timing_graph(packed, trace_data_path(packed))
    tail = timing._pass_through_tail(graph)
    probe = timing.WINDOW_PROBE
    try:
        timing.WINDOW_PROBE = batch
        system, _, _ = timing._solve_in_windows(graph, tail, batch, batch, timing._spaced_delays(graph))
    finally:
        timing.WINDOW_PROBE = probe
    return system, graph, tail


@pytest.mark.parametrize("seed", range(6))
def test_check_finds_the_first_wrong_inference(seed):
    """:meth:`_WindowSystem.exact_until` on a packed random program: the solution continued as a candidate holds to
    the end; one with a single action moved by a cycle (earlier or later) fails exactly at that action's inference,
    in whichever checked stretch it lies, and the stretches before it are kept."""
    rng = np.random.default_rng(53000 + seed)
    _, packed, *_ = _random_packed(rng, KINDS[seed % 4])
    batch = 23
    system, graph, tail = _windowed_system(packed, batch)
    solution = [times.copy() for times in system.times]

    def fill(lo, hi):
        for times, right, w in zip(system.times, candidate, system.widths):
            times[lo * w:hi * w] = right[lo * w:hi * w]

    lo = 3
    candidate = solution
    assert system.exact_until(lo, 2, fill)[0] == batch
    for _ in range(4):
        j = int(rng.integers(0, tail))
        while not system.widths[j]:
            j = int(rng.integers(0, tail))
        wrong = int(rng.integers(lo, batch))
        action = wrong * system.widths[j] + int(rng.integers(0, system.widths[j]))
        candidate = [times.copy() for times in solution]
        candidate[j][action] += int(rng.choice([-1, 1]))
        assert system.exact_until(lo, int(rng.integers(1, 5)), fill)[0] == wrong, graph.chains[j].name
        for times, right, w in zip(system.times, solution, system.widths):
            np.testing.assert_array_equal(times[:wrong * w], right[:wrong * w])


@pytest.mark.parametrize("seed", range(8))
def test_candidates_kept_in_part_equal_plain_sweeps(seed, monkeypatch):
    """Windows whose every look yields a candidate that holds for a few inferences and then fails (the solution with
    one action of a later inference moved by a cycle, as a drifting lead's continuation fails where a FIFO fills):
    the stretches the check keeps and the windows after them give every chain's every time exactly as plain
    whole-batch sweeps."""
    rng = np.random.default_rng(59000 + seed)
    _, packed, *_ = _random_packed(rng, KINDS[seed % 4])
    batch = 37
    plain = solve_timing(packed, batch, probe_batch=None)
    solution = plain.stream_times
    wrong = {}

    def candidate(prefix, chains, probe, drift=False):
        widths = [c.per_inference for c in chains]
        wrong["at"] = probe + int(rng.integers(0, 9))        # sometimes past the batch: the candidate holds
        wrong["chain"] = int(rng.choice([j for j, w in enumerate(widths) if w]))
        return 1, None

    def fill(out, widths, batch_, period, increment, lo, hi):
        for times, right, w in zip(out, solution, widths):
            times[lo * w:hi * w] = right[lo * w:hi * w]
        at, j = wrong["at"], wrong["chain"]
        if lo <= at < hi:
            out[j][at * widths[j] + int(rng.integers(0, widths[j]))] += int(rng.choice([-1, 1]))

    kept = []
    exact_until = timing._WindowSystem.exact_until

    def spy(self, lo, chunk, fill_):
        found = exact_until(self, lo, chunk, fill_)
        kept.append((lo, found[0], wrong["at"]))
        return found

    monkeypatch.setattr(timing, "_periodic", candidate)
    monkeypatch.setattr(timing, "_fill_periodic", fill)
    monkeypatch.setattr(timing._WindowSystem, "exact_until", spy)
    monkeypatch.setattr(timing, "WINDOW_MIN_ACTIONS", 0)
    _assert_same(plain, solve_timing(packed, batch, probe_batch=4), "candidates kept in part")
    assert kept and all(found == min(at, batch) for _, found, at in kept), kept
    assert any(lo < found < batch for lo, found, _ in kept), kept


def test_long_batch_extrapolates():
    """A packed dense chain over 200 inferences: the probe's steady state is extrapolated (the fast path taken), and
    equals plain sweeps."""
    rng = np.random.default_rng(8)
    arch, layers = _dense_chain(rng, layers=5)
    packed = pack_contexts(build_program(arch, layers, act_fill=rng, queue_words=8), [3, 2])
    batch = 200
    fast = solve_timing(packed, batch)
    assert fast.extrapolated
    _assert_same(solve_timing(packed, batch, probe_batch=None), fast, "probe")


# --- (a) a compiled network: the compiler's packing and its integer reference ---------------------------------------

@pytest.fixture(scope="module")
def compiled_models(tmp_path_factory):
    """int8 QDQ models and float inputs: an MLP 24 -> 32 -> 20 -> 12 -> 10 and a residual CNN on an 8-channel 6x6
    map (stem, a basic block with a projection, pooling, a classifier: MAC, ADD, LANE layers; 8 channels, so that no
    layer runs as BCAST, which the cycle-stepping reference does not model)."""
    import onnx
    from flowtile.testing.random_models import quantize_qdq, random_float_mlp, random_float_resnet
    path = tmp_path_factory.mktemp("contexts_models")
    rng = np.random.default_rng(31)
    onnx.save(random_float_mlp(rng, [24, 32, 20, 12, 10]), path / "mlp.onnx")
    onnx.save(random_float_resnet(rng, (8, 6, 6), 8, [{"kind": "basic", "out": 16, "stride": 2}], 5),
              path / "resnet.onnx")
    models = {}
    for name, shape in (("mlp", (24,)), ("resnet", (8, 6, 6))):
        model = quantize_qdq(path / f"{name}.onnx", path / f"{name}_qdq.onnx",
                             rng.standard_normal((16, *shape)).astype(np.float32), activation_uint8=False,
                             per_channel=True)
        models[name] = (model, rng.standard_normal((3, *shape)).astype(np.float32))
    return models


@pytest.mark.parametrize("name, rows, cols, contexts, ring", [
    ("mlp", 1, 2, 3, 16), ("mlp", 1, 3, 2, 16), ("mlp", 1, 2, 4, 2), ("mlp", 1, 2, 4, 1),
    ("resnet", 2, 2, 4, 16), ("resnet", 1, 3, 4, 16), ("resnet", 1, 3, 4, 1)])
def test_compiled_network_in_contexts(compiled_models, name, rows, cols, contexts, ring):
    """The compiler packs a network's layers into tiles of up to ``contexts`` contexts: the emulator's integer
    outputs equal the compiler's integer reference (``reference_forward``) and the same network on one context a
    tile; its times equal the cycle-stepping reference's and meet section 4.6's rules."""
    import warnings
    from flowtile.compiler import compile_model, import_onnx, lower_layers, reference_forward
    from flowtile.host import input_flits, outputs_from_flits, quantize
    model, x = compiled_models[name]
    small = dict(lanes=8, sram_bytes=8192, max_tile_outputs=64, result_ring_words=ring)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = compile_model(model, lean_arch(rows=rows, cols=cols, tile_contexts=contexts, **small), replicas=1)
        alone = compile_model(model, lean_arch(rows=4, cols=4, **small), replicas=1)
    assert any(tile.later_contexts for tile in program.tiles)
    batch = len(x)
    _, flits = input_flits(program, x)
    result = assert_matches_reference(program, flits, batch)
    check_all_context_tiles(program, result)
    chip, _ = outputs_from_flits(program, result.out_flits, batch)
    imported = import_onnx(model)
    np.testing.assert_array_equal(chip, reference_forward(lower_layers(imported.layers), quantize(x, imported.input)))
    _, alone_flits = input_flits(alone, x)
    np.testing.assert_array_equal(chip, outputs_from_flits(alone, emulate(alone, alone_flits, batch).out_flits,
                                                           batch)[0])


# --- host stalls, reports, the watchdog, refusals --------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(12))
def test_packed_programs_under_host_stalls(seed):
    """Host output stalls and input gaps (gated host chains, no pass-through tail) on packed random programs: every
    transfer equals the cycle-stepping reference's, the data the golden."""
    rng = np.random.default_rng(48000 + seed)
    program, packed, layers, shape, x, batch = _random_packed(rng, KINDS[seed % 4])
    duties = [0.8, 0.5, 0.2]
    pattern = HostPattern(int(rng.integers(0, 1 << 16)), float(rng.choice(duties)), float(rng.choice([1, 3, 20])),
                          float(rng.choice(duties + [1.0])), float(rng.choice([1, 3])))
    flits = pack_flits(x, program.arch.lanes, program.input)
    result = assert_matches_reference(packed, flits, batch, host_pattern=pattern)
    np.testing.assert_array_equal(result.out_flits, network_golden(layers, x, shape, program.arch.lanes))
    check_all_context_tiles(packed, result)


def test_timelines_and_busy_cycles_of_a_context_tile():
    """A tile of three contexts: its timeline has per inference each context's RECV (and PASS), then COMPUTE spans in
    turn, then FORWARD / EMIT spans in turn (section 6's conventions: a side's span runs from the end of its previous
    one); its busy cycles and lane-MACs count every context."""
    rng = np.random.default_rng(21)
    arch, layers = _dense_chain(rng, layers=4)
    program = build_program(arch, layers, act_fill=rng, queue_words=8)
    packed = pack_contexts(program, [3, 1])
    batch = 3
    flits = pack_flits(rng.integers(-128, 128, (batch, layers[0].n_in), dtype=np.int8), arch.lanes)
    result = emulate(packed, flits, batch)
    tile, times = packed.tiles[0], result.timing
    contexts = times.context_times[0]
    spans = [(int(s), int(e), str(p)) for s, e, p in result.tile_timelines[0]]
    expected_in, expected_compute, expected_out = [], [], []
    end_in = end_out = 0
    for s in range(batch):
        for index, config in enumerate(tile.contexts):
            ins = contexts[index].input.reshape(batch, -1)[s]
            outs = contexts[index].output.reshape(batch, -1)[s]
            for phase, part in (("RECV", ins[:config.n_in_words]), ("PASS", ins[config.n_in_words:])):
                if len(part):
                    expected_in.append((end_in, int(part[-1]) + 1, phase))
                    end_in = int(part[-1]) + 1
            lead = config.queued_words
            for phase, part in (("FORWARD", outs[:lead]), ("EMIT", outs[lead:])):
                if len(part):
                    expected_out.append((end_out, int(part[-1]) + 1, phase))
                    end_out = int(part[-1]) + 1
            expected_compute.append((int(contexts[index].compute[s]), int(times.context_compute_ends[0][index][s]),
                                     "COMPUTE"))
    assert spans == expected_in + expected_compute + expected_out
    counts = result.path.counts[0].contexts
    row, col = tile.row, tile.col
    assert result.tile_busy_cycles[row, col] == batch * sum(c.compute_issue_cycles + 2 for c in counts)
    assert result.tile_macs[row, col] == batch * arch.lanes * sum(c.issue_cycles for c in counts)
    np.testing.assert_array_equal(times.compute_ends[0],
                                  np.stack(times.context_compute_ends[0], axis=1).ravel())


def test_watchdog_counts_the_router_flits_of_a_context_tile():
    """A run stopped at a cycle limit names, for a tile of several contexts, the flits it took from its router (its
    first context's input transfers) and gave to it (its last context's output transfers)."""
    from flowtile.emulator import WatchdogError
    rng = np.random.default_rng(22)
    arch, layers = _dense_chain(rng, layers=3)
    packed = pack_contexts(build_program(arch, layers, act_fill=rng, queue_words=8), [3])
    batch = 4
    flits = pack_flits(rng.integers(-128, 128, (batch, layers[0].n_in), dtype=np.int8), arch.lanes)
    full = emulate(packed, flits, batch)
    limit = full.cycles // 2
    contexts = full.timing.context_times[0]
    got = int((contexts[0].input < limit).sum())
    sent = int((contexts[-1].output < limit).sum())
    want_in = batch * packed.tiles[0].config.n_in_words
    want_out = batch * -(-layers[-1].n_out // arch.lanes)
    with pytest.raises(WatchdogError, match=rf"\(0,0\) in {got}/{want_in} out {sent}/{want_out}"):
        emulate(packed, flits, batch, max_cycles=limit)


def test_one_context_with_parameter_rows_from_param_base():
    """A tile of one context reads its parameter rows from ``param_base`` too (section 4.6's register): rows moved
    down behind junk rows give the same outputs and times."""
    rng = np.random.default_rng(23)
    arch, layers = _dense_chain(rng, layers=2)
    program = build_program(arch, layers, act_fill=rng, queue_words=8)
    batch = 3
    flits = pack_flits(rng.integers(-128, 128, (batch, layers[0].n_in), dtype=np.int8), arch.lanes)
    before = emulate(program, flits, batch)
    tile = program.tiles[1]
    junk = np.tile(np.array([[123456, 1 << 30, 40]], dtype=np.int64), (5, 1))
    tile.params = np.concatenate([junk, tile.params])
    tile.config = tile.config.replace(param_base=5)
    program.validate()
    after = emulate(program, flits, batch)
    np.testing.assert_array_equal(after.out_flits, before.out_flits)
    np.testing.assert_array_equal(after.out_times, before.out_times)


def test_contexts_whose_counts_do_not_chain_are_refused():
    """Context ``c`` reads what context ``c - 1`` emits: a context whose ``n_in_words + n_pass`` differs is refused,
    naming the tile and both contexts."""
    rng = np.random.default_rng(24)
    arch, layers = _dense_chain(rng, layers=3)
    packed = pack_contexts(build_program(arch, layers, act_fill=rng, queue_words=8), [2, 1])
    tile = packed.tiles[0]
    later = tile.later_contexts[0]
    free = max(end for config in tile.contexts for _, _, end in config.sram_regions())
    tile.later_contexts = (later.replace(n_pass=1, queue_base=free, queue_words=later.queued_words + 1),)
    with pytest.raises((EmulatorError, ProgramError), match=r"context 1\b.*context 0|context 0\b.*context 1"):
        trace_data_path(packed)


@pytest.mark.parametrize("topology, error_rate", [("line", 0.0), ("ring", 0.0), ("line", 1e-3)])
def test_contexts_on_several_chips(compiled_models, topology, error_rate):
    """The residual CNN compiled onto two chips of 1x2 tiles with up to four contexts a tile (chip 0's exit tile, of
    several contexts, feeds link 0; chip 1's last tile the host or a ring's return link; with link faults too): the
    outputs equal the compiler's integer reference, the tiles' times meet section 4.6's rules, and fault free the
    probe's times equal plain sweeps'."""
    import warnings
    from flowtile.compiler import compile_model, import_onnx, lower_layers, reference_forward
    from flowtile.host import input_flits, outputs_from_flits, quantize
    model, x = compiled_models["resnet"]
    arch = lean_arch(rows=1, cols=2, chips=2, chip_topology=topology, tile_contexts=4, lanes=8, sram_bytes=8192,
                     max_tile_outputs=64, result_ring_words=16, link_error_rate=error_rate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = compile_model(model, arch, replicas=1)
    assert program.tiles[1].later_contexts and program.tiles[-1].later_contexts
    batch = len(x)
    _, flits = input_flits(program, x)
    result = emulate(program, flits, batch)
    chip, _ = outputs_from_flits(program, result.out_flits, batch)
    imported = import_onnx(model)
    np.testing.assert_array_equal(chip, reference_forward(lower_layers(imported.layers), quantize(x, imported.input)))
    check_all_context_tiles(program, result)
    if not error_rate:
        longer = 20
        _assert_same(solve_timing(program, longer, probe_batch=None), solve_timing(program, longer),
                            "two chips")


@pytest.mark.parametrize("where, shift", [("first", 1), ("first", 2), ("later", 1), ("later", 2)])
def test_context_weights_overlapping_its_banks(where, shift):
    """A context's weights overlapping its own activation banks (one SRAM, each context's regions its own): COMPUTE
    reads what that context's input side left there, as the reference steps it (``shift`` = 1: bank 0 over the last
    output's weight row; 2: both banks inside the weights). In a tile of several contexts the input side cannot race
    a running COMPUTE: the next inference of a context arrives only after the output side passed every EMIT of that
    context's inference before (context 0's next input follows the last context's input, which is the last but
    one's output, EMITs included, and these follow context 0's COMPUTE in compute order); the emulator, which checks
    the times, and the reference, which refuses a race, agree."""
    rng = np.random.default_rng(25)
    lanes = 4
    arch = lean_arch(rows=1, cols=2, lanes=lanes, sram_bytes=lanes * 1024, router_fifo_depth=2)
    layers = [random_layer(rng, 8, 8, 1), random_layer(rng, 8, 4, 1)]
    packed = pack_contexts(build_program(arch, layers, act_fill=rng, queue_words=8), [2])
    tile = packed.tiles[0]
    index = 0 if where == "first" else 1
    config = tile.contexts[index]
    moved = config.replace(act_base=config.act_base - (config.n_in_words if shift == 1 else 2 * config.n_in_words + 1))
    if index:
        tile.later_contexts = (moved,)
    else:
        tile.config = moved
    packed.validate()
    batch = 3
    x = rng.integers(-128, 128, (batch, 8), dtype=np.int8)
    result = assert_matches_reference(packed, pack_flits(x, lanes), batch)
    check_all_context_tiles(packed, result)
