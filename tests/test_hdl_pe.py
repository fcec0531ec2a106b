"""PE (docs/architecture.md sections 4 to 4.4) in Amaranth's simulator: arithmetic against golden
functions (dense; convolution, max pooling and LANE written as plain loops from section 4.1; ADD from
section 4.2's formula and CONCAT from section 4.3's in numpy, both cross-checked against scalar loops), the
store and forward ranges of a stream carrying several tensors, the two activation banks, section 4.1's bands
of output pixels (partial first and last rows: out_col_begin, out_col_end; every golden iterates
TileConfig.output_pixel_positions), section 4.4's per-pixel interleaved output order of an
output-channel group (pass_per_pixel) and the channel groups of MAX, LANE and ADD (group_word_begin, group_words;
their goldens cross-checked against the emulator's pe_results), and the cycle of every input and output transfer, every COMPUTE start c_s and every result word's first issue a_j against section 6 rule 4's
three chains (input side, compute side result word by result word, output side; coupled through the forward
queue of F = the tile's register queue_words words, a circular region of its SRAM, and the result ring of R =
Arch.result_words words), over several inferences, seeded random input gaps and output back-pressure, queue depths
from 1 word to all the SRAM the weights and banks leave free (the SRAM after a run: the queue's region holds the
words last pushed), and rings from 1 word (smaller than an inference's results) to more than an inference's."""
import random

import numpy as np
import pytest
from amaranth.sim import Simulator

from flowtile.arch import (ACTIVATION_BANKS, ADD_MULT_MAX, CONFIG_FIELDS, OP_ADD, OP_BCAST, OP_CONCAT, OP_LANE, OP_MAC,
                           OP_MAX, Arch,
                           dense_window_registers, stream_registers)
from flowtile.testing.archs import lean_arch
from flowtile.hdl.layouts import (LOAD_TARGET_CONFIG, LOAD_TARGET_PARAMS, LOAD_TARGET_SRAM, LoadEncodingError,
                         config_field_index, encode_config, encode_config_value, encode_param_entry, pack_lanes,
                         unpack_lanes)
from flowtile.hdl.pe import PE
from flowtile.testing.program_builder import config_with_queue
from flowtile.tile_config import ConfigError, TileConfig

pytestmark = [pytest.mark.filterwarnings("ignore:.*created but never used"),
              pytest.mark.usefixtures("collect_unused_components")]


def shift_round_half_even(value, shift):
    """``value / 2^shift`` rounded to nearest, ties to even (section 4), by floor division."""
    quotient, remainder = value >> shift, value - ((value >> shift) << shift)
    half = 1 << (shift - 1)
    return quotient + ((remainder > half) | ((remainder == half) & ((quotient & 1) == 1)))

ARCH = lean_arch(rows=1, cols=2, lanes=4, sram_bytes=256, max_tile_outputs=12, result_ring_words=3, router_fifo_depth=2)
TILE = 1          # the PE under test; loads for tile 0 must not reach it
DEST = {"dest_row": 0, "dest_col": 0, "dest_host": 1}


def make_config(*, forward=0, **overrides):
    """A tile config; unless overridden, the windowing registers are the dense (1x1) case and the
    stream holds only the layer's input: all ``n_in_words`` stored, all forwarded iff ``forward``."""
    config = {name: 0 for name, _, _ in CONFIG_FIELDS}
    config.update(clamp_lo=-128, clamp_hi=127, **DEST)
    config.update(dense_window_registers(overrides.get("n_in_words", 0)))
    config.update(stream_registers(overrides.get("n_in_words", 0), forward=bool(forward)))
    config.update(overrides)
    return config


def tile_config(config):
    """The :class:`TileConfig` of a register dict (:func:`make_config`'s), for its derived counts."""
    return TileConfig.from_dict(config)


def queue_image(config, inputs, n_inferences):
    """{SRAM address: lanes} of the forward queue's region after ``n_inferences`` inferences of ``inputs`` went
    through the tile: push i (the forwarded RECV words, then the passed words, inference by inference) in word
    queue_base + i mod F, the later pushes over the earlier ones (section 4)."""
    k_words, per_inference = config["n_in_words"], config["n_in_words"] + config["n_pass"]
    pushed = [flit for s in range(n_inferences) for k, flit in enumerate(inputs[s * per_inference:][:per_inference])
              if k >= k_words or is_forwarded(config, k)]
    image = {}
    for index, flit in enumerate(pushed):
        image[config["queue_base"] + index % config["queue_words"]] = flit
    return image


def is_forwarded(config, k):
    """Section 4.2: RECV word k is re-emitted iff forward_begin <= k < forward_end."""
    return config["forward_begin"] <= k < config["forward_end"]


def stored_part(config, flits):
    """The RECV words of one inference a tile stores, as they lie in its activation bank (section 4.2): those of
    the first store range (store_begin <= k < store_end), then those of the second (store2_begin <= k <
    store2_end; none when both are 0)."""
    return flits[config["store_begin"]:config["store_end"]] + flits[config["store2_begin"]:config["store2_end"]]


# --- golden models ---------------------------------------------------------------------------------

def wrap32(value):
    return ((value + (1 << 31)) % (1 << 32)) - (1 << 31)


def golden_outputs(weights, activations, params, config):
    """y_o of section 4 on exact Python integers; weights [N_o*K][L], activations [K][L] (the stored words:
    K = :attr:`TileConfig.stored_words`, which is n_in_words when the stream holds only the layer's input)."""
    k_words, n_out = tile_config(config).stored_words, config["n_out"]
    result = []
    for o in range(n_out):
        bias, multiplier, shift = params[o]
        acc = bias + sum(w * a for k in range(k_words)
                         for w, a in zip(weights[o * k_words + k], activations[k]))
        acc = wrap32(acc)
        y = shift_round_half_even(acc * multiplier, shift) + config["zp_out"]
        result.append(min(max(y, config["clamp_lo"]), config["clamp_hi"]))
    return result


def golden_result_words(outputs, lanes):
    words = []
    for j in range(-(-len(outputs) // lanes)):
        chunk = outputs[j * lanes:(j + 1) * lanes]
        words.append(chunk + [0] * (lanes - len(chunk)))
    return words


def output_order(config, lanes):
    """The kinds of one inference's output transfers in order, "forward" (a pop) or "emit" (section 4.4):
    Q_f + P_bulk pops, then for each output pixel q pass_per_pixel pops and its W_px EMITs (with
    pass_per_pixel = 0: all Q pops, then all E EMITs)."""
    counts = tile_config(config)
    n_pops = counts.forwarded_words + config["n_pass"]
    n_emits = counts.result_words(lanes) if config["n_out"] else 0
    n_pix = counts.output_pixels if n_emits else 1       # section 4.1's pixel list (a band of pixels)
    per_pixel = config["pass_per_pixel"] if n_emits else 0
    assert n_emits % n_pix == 0 and n_pix * per_pixel <= config["n_pass"], "config outside section 4.4"
    order = ["forward"] * (n_pops - n_pix * per_pixel)
    for _ in range(n_pix):
        order += ["forward"] * per_pixel + ["emit"] * (n_emits // n_pix)
    return order


def expected_stream(config, lanes, flits, results):
    """One inference's output words: the forwarded RECV words and the passed words (in input order) as
    popped, and ``results`` (result word j at EMIT j), in :func:`output_order`."""
    k_words = config["n_in_words"]
    pops = [flit for k, flit in enumerate(flits[:k_words]) if is_forwarded(config, k)] + list(flits[k_words:])
    pops, results = iter(pops), iter(results)
    stream = [next(pops) if kind == "forward" else next(results) for kind in output_order(config, lanes)]
    assert next(pops, None) is None and next(results, None) is None, "output order misses words"
    return stream


class Schedule:
    """Section 6 rule 4 for one PE: the cycle of every transfer of its three chains.

    ``inputs``: [(kind, inference, t)] in input order, kind "recv" or "pass"; ``outputs``: [(kind,
    inference, t)] in output order, kind "forward" (a pop of the forward queue) or "emit"; ``words``: [a_j],
    the first issue cycle of every result word j (numbered across inferences); ``compute``: [c_s] (a_j of
    the first word of s); ``queue_waits``: how many input transfers waited for queue space; ``ring_waits``:
    how many result words waited for a ring slot (the EMIT j - R term beyond every other bound).
    ``available[i]``: first cycle input flit i is offered (it stays offered until accepted); ``ready[t]``:
    o_flit.ready in cycle t; ``queue_words``: F (the tile's register queue_words); ``ring_words``: R."""

    def __init__(self, config, lanes, n_inferences, available, ready, queue_words, ring_words):
        k_words, n_pass = config["n_in_words"], config["n_pass"]
        computes = config["n_out"] > 0
        issue_cycles = tile_config(config).compute_issue_cycles
        # (kind, inference, word k, pushes into the queue)
        in_actions = [(("recv", s, k, is_forwarded(config, k)) if k < k_words else ("pass", s, k, True))
                      for s in range(n_inferences) for k in range(k_words + n_pass)]
        # Section 4.4's order: bulk pops, then per output pixel its interleaved pops and its EMITs.
        out_actions = [(kind, s) for s in range(n_inferences) for kind in output_order(config, lanes)]
        last_stored = tile_config(config).store_until - 1      # the last stored RECV word (section 4.2)
        # Section 4's result ring: d_j issue cycles of each result word of one inference (one pixel's
        # words, pixel after pixel), the same for every inference.
        n_pix = tile_config(config).output_pixels if computes else 0       # section 4.1's pixel list
        durations = tile_config(config).result_word_issue_cycles(lanes) * n_pix if computes else []
        per_inference = len(durations)
        assert sum(durations) == (issue_cycles if computes else 0)
        durations = durations * n_inferences

        def first_ready(t):
            while not ready[t]:
                t += 1
                assert t < len(ready), "golden schedule runs past the ready pattern"
            return t

        # Least solution of the max-plus system by sweeps from below: every constraint only pushes a time
        # later and the system is acyclic, so the sweeps converge to its unique solution.
        never = -(1 << 40)
        t_in, t_out = [never] * len(in_actions), [never] * len(out_actions)
        a, c = [never] * len(durations), [never] * n_inferences
        while True:
            pops = [t for (kind, _), t in zip(out_actions, t_out) if kind == "forward"]
            pushes, new_in, previous, queue_waits = [], [], -1, 0
            for j, (kind, s, k, pushes_word) in enumerate(in_actions):
                t = max(previous + 1, available[j])
                if pushes_word and len(pushes) >= queue_words:
                    space = pops[len(pushes) - queue_words] + 1        # push i >= pop i - F + 1
                    queue_waits += space > t
                    t = max(t, space)
                if computes and s >= 1 and k == 0 and config["single_bank"]:
                    last = s * per_inference - 1                        # COMPUTE of s - 1 has ended (one bank)
                    t = max(t, a[last] + durations[last] + 2)
                elif computes and s >= 1 and k == 0:
                    t = max(t, c[s - 1])                                # COMPUTE of s - 1 has begun
                if pushes_word:
                    pushes.append(t)
                new_in.append(t)
                previous = t
            # Compute side, one event per result word (section 4): a_j.
            emits = [t for (kind, _), t in zip(out_actions, t_out) if kind == "emit"]
            new_a, ring_waits, start_ring_waits = [], 0, 0
            for j, duration in enumerate(durations):
                s, index = divmod(j, per_inference)
                if index == 0:
                    bound = new_in[s * (k_words + n_pass) + last_stored] + 1
                    if j:
                        bound = max(bound, new_a[j - 1] + durations[j - 1] + 2)   # the pipeline drains
                else:
                    bound = new_a[j - 1] + durations[j - 1]                       # back to back
                if j >= ring_words:
                    slot = emits[j - ring_words] + 1                              # slot j mod R emitted
                    ring_waits += slot > bound
                    start_ring_waits += slot > bound and index == 0
                    bound = max(bound, slot)
                new_a.append(bound)
            new_c = new_a[::per_inference] if computes else []
            new_out, previous, pop_index, emit_index = [], -1, 0, 0
            for kind, s in out_actions:
                t = previous + 1
                if kind == "forward":
                    t = max(t, pushes[pop_index] + 1)                   # pop i >= push i + 1
                    pop_index += 1
                else:
                    t = max(t, new_a[emit_index] + durations[emit_index] + 2)   # word j written at a_j + d_j + 1
                    emit_index += 1
                t = first_ready(max(t, 0))
                new_out.append(t)
                previous = t
            if (new_in, new_a, new_out) == (t_in, a, t_out):
                break
            t_in, a, c, t_out = new_in, new_a, new_c, new_out
        self.inputs = [(kind, s, t) for (kind, s, _, _), t in zip(in_actions, t_in)]
        self.outputs = [(kind, s, t) for (kind, s), t in zip(out_actions, t_out)]
        self.words = a
        self.durations = durations
        self.compute = c
        #: Input transfers the queue's space rule delayed (beyond every other bound).
        self.queue_waits = queue_waits
        #: Result words the ring's rule delayed (beyond every other bound), and how many of them were the
        #: first word of an inference (a COMPUTE start c_s the ring delayed).
        self.ring_waits = ring_waits
        self.start_ring_waits = start_ring_waits
        self.issue_cycles = issue_cycles


def golden_schedule(config, lanes, n_inferences, available, ready, queue_words, ring_words):
    """The transfer cycles of section 6 rule 4 (see :class:`Schedule`)."""
    return Schedule(config, lanes, n_inferences, available, ready, queue_words, ring_words)


# --- simulation ------------------------------------------------------------------------------------

class ProbedPE(PE):
    """A PE whose SRAM the testbench can read (``ctx.get(dut.sram.data[address])``) after elaboration."""

    def elaborate(self, platform):
        m = super().elaborate(platform)
        self.sram = m.submodules["sram"]
        return m


#: Cycles the testbench keeps running after the last expected transfer, checking that nothing more leaves.
TAIL_CYCLES = 4


def raw_config_pairs(config):
    """Load pairs of every register of ``config`` range-checked one by one but without encode_config's rules
    across registers: a config the PE must survive though encode_config rejects it."""
    return [(config_field_index(name), encode_config_value(name, config[name])) for name, _, _ in CONFIG_FIELDS]


def simulate(config, sram, params, inputs, available, ready, n_outputs, *, arch=ARCH, sram_image=None,
             loaded=None):
    """Load ``config`` (or, if given, the unchecked ``loaded`` config: :func:`raw_config_pairs`) / ``sram``
    {addr: lanes} / ``params`` into tile TILE, then run with run = 1
    from cycle 0. Input flit i is offered from cycle available[i] until accepted; o_flit.ready
    follows ``ready``. Runs until every input is accepted and ``n_outputs`` flits left, then TAIL_CYCLES
    more in which o_flit.valid must stay low. Returns ([accept cycle], [(lanes, dest, cycle)],
    [compute start cycle], [first issue cycle of a result word]); ``sram_image``, if a list, receives the
    SRAM contents after the run (one lane list per word)."""
    ARCH = arch   # noqa: N806 (the module default, or a larger arch for windowed layers)
    dut = ProbedPE(ARCH, TILE)
    accepted, emitted, starts, word_starts = [], [], [], []

    async def load(ctx, tile, target, addr, data):
        ctx.set(dut.load.valid, 1)
        ctx.set(dut.load.payload, {"tile": tile, "target": target, "addr": addr, "data": data})
        await ctx.tick()
        ctx.set(dut.load.valid, 0)

    async def testbench(ctx):
        for addr, data in encode_config(ARCH, config) if loaded is None else raw_config_pairs(loaded):
            await load(ctx, TILE, LOAD_TARGET_CONFIG, addr, data)
        for addr, lanes in sram.items():
            await load(ctx, TILE, LOAD_TARGET_SRAM, addr, pack_lanes(lanes, ARCH.lanes))
        for row, entry in enumerate(params):
            await load(ctx, TILE, LOAD_TARGET_PARAMS, row, encode_param_entry(*entry))
        # Writes addressed to the other tile must be ignored.
        await load(ctx, 1 - TILE, LOAD_TARGET_CONFIG, 0, 0)
        await load(ctx, 1 - TILE, LOAD_TARGET_PARAMS, 0, encode_param_entry(7, 7, 7))
        ctx.set(dut.run, 1)
        cycle, tail = 0, 0
        while tail < TAIL_CYCLES:
            if len(emitted) >= n_outputs and len(accepted) >= len(inputs):
                tail += 1
                assert not ctx.get(dut.o_flit.valid), f"o_flit valid in cycle {cycle}, after the last expected output"
            assert cycle < len(ready) - 1, (f"PE stopped: {len(accepted)} of {len(inputs)} inputs accepted, "
                                            f"{len(emitted)} of {n_outputs} outputs by cycle {cycle}")
            offering = len(accepted) < len(inputs) and available[len(accepted)] <= cycle
            ctx.set(dut.i_flit.valid, offering)
            if offering:
                ctx.set(dut.i_flit.payload, {"data": pack_lanes(inputs[len(accepted)], ARCH.lanes),
                                             "dest_row": 0, "dest_col": 1, "dest_host": 0})
            # o_flit.valid never depends on o_flit.ready, nor does i_flit.ready (it depends on queue space).
            ctx.set(dut.o_flit.ready, not ready[cycle])
            handshake = ctx.get(dut.o_flit.valid), ctx.get(dut.i_flit.ready)
            ctx.set(dut.o_flit.ready, ready[cycle])
            assert (ctx.get(dut.o_flit.valid), ctx.get(dut.i_flit.ready)) == handshake, \
                f"o_flit.valid or i_flit.ready follows o_flit.ready in cycle {cycle}"
            took = ctx.get(dut.i_flit.valid) and ctx.get(dut.i_flit.ready)
            if ctx.get(dut.o_flit.valid) and ready[cycle]:
                payload = ctx.get(dut.o_flit.payload)
                emitted.append((unpack_lanes(int(payload.data), ARCH.lanes),
                                (int(payload.dest_row), int(payload.dest_col), int(payload.dest_host)), cycle))
            if ctx.get(dut.probes["compute_start"]):
                starts.append(cycle)
            if ctx.get(dut.probes["word_start"]):
                word_starts.append(cycle)
            if took:
                accepted.append(cycle)
            await ctx.tick()
            cycle += 1
        if sram_image is not None:
            sram_image.extend(unpack_lanes(ctx.get(dut.sram.data[address]), ARCH.lanes)
                              for address in range(ARCH.sram_words))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    return accepted, emitted, starts, word_starts


def dense_case(rng, k_words, n_out, lanes):
    weights = [[rng.randint(-128, 127) for _ in range(lanes)] for _ in range(n_out * k_words)]
    params = [(rng.randint(-5000, 5000), rng.randint(1 << 30, (1 << 31) - 1), rng.randint(36, 42))
              for _ in range(n_out)]
    return weights, params


def check_run(config, weights, params, inputs, available, ready, *, arch=ARCH, golden=None, sram=None,
              sram_image=None, loaded=None):
    """Run the PE and compare every transfer (content and cycle), every COMPUTE start and every result word's
    first issue with the golden models (F = the register ``queue_words``, R = ``arch.result_words``).
    ``golden(stored words)`` gives one inference's result words (default: the dense golden over the weights).
    ``sram`` {addr: lanes} is the SRAM image loaded (default: ``weights`` at ``w_base``); ``sram_image`` receives
    the SRAM after the run (see :func:`simulate`). ``loaded``: the (unchecked) config written to the PE's registers
    instead of ``config``, which then only describes the expected behaviour. Returns ([(lanes, dest, cycle, kind)]
    of the output transfers, kind "forward" or "emit", the :class:`Schedule`)."""
    ARCH = arch   # noqa: N806
    k_words, n_pass = config["n_in_words"], config["n_pass"]
    per_inference = k_words + n_pass
    n_inferences = len(inputs) // per_inference
    assert n_inferences * per_inference == len(inputs)
    if sram is None:
        sram = {config["w_base"] + a: w for a, w in enumerate(weights)}
    schedule = golden_schedule(config, ARCH.lanes, n_inferences, available, ready, config["queue_words"],
                               ARCH.result_words)
    accepted, emitted, starts, word_starts = simulate(config, sram, params, inputs, available, ready,
                                                      len(schedule.outputs), arch=arch, sram_image=sram_image,
                                                      loaded=loaded)
    if golden is None:
        def golden(activations):
            return golden_result_words(golden_outputs(weights, activations, params, config), ARCH.lanes)

    assert accepted == [t for _, _, t in schedule.inputs], "input transfer cycles differ from rule 4"
    assert starts == schedule.compute, "COMPUTE start cycles differ from c_s of section 4"
    assert word_starts == schedule.words, "first issue cycles of the result words differ from a_j of section 4"
    expected_out = []
    for i in range(n_inferences):
        flits = inputs[i * per_inference:(i + 1) * per_inference]
        results = golden(stored_part(config, flits[:k_words])) if config["n_out"] else []
        expected_out += expected_stream(config, ARCH.lanes, flits, results)
    dest = (config["dest_row"], config["dest_col"], config["dest_host"])
    assert [lanes for lanes, *_ in emitted] == expected_out, "output words differ from the golden model"
    assert all(d == dest for _, d, *_ in emitted)
    assert [t for _, _, t in emitted] == [t for _, _, t in schedule.outputs], "output transfer cycles differ from rule 4"
    return [(lanes, d, t, kind) for (lanes, d, t), (kind, _, _) in zip(emitted, schedule.outputs)], schedule


# --- tests -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("forward, back_pressure, queue_words",
                         [(1, False, None), (1, True, None), (0, True, None), (1, False, 1), (1, True, 1),
                          (1, True, 2), (0, True, 1), (1, True, 4)])
def test_transfer_cycles_follow_rule_4(forward, back_pressure, queue_words):
    """A dense tile that forwards (or not) and passes: every transfer and every COMPUTE start against rule 4,
    with forward queues from one word (every push waits for the pop before it) to more than an inference's
    K_f + P words (7, or 2 without forwarding; F = 1, 2, 4 fill while COMPUTE or back-pressure holds the
    output side; None: the 14 SRAM words behind the banks [40, 50), which never fill)."""
    rng = random.Random(7 + forward + 2 * back_pressure + 4 * (queue_words or 1024))
    k_words, n_pass, n_out, n_inferences = 5, 2, 6, 3
    config = config_with_queue(make_config(n_in_words=k_words, forward=forward, n_pass=n_pass, n_out=n_out,
                                    w_base=4, act_base=40, zp_out=-3), ARCH, queue_words)
    assert (config["queue_base"], config["queue_words"]) == (50, queue_words or 14)
    weights, params = dense_case(rng, k_words, n_out, ARCH.lanes)
    inputs = [[rng.randint(-128, 127) for _ in range(ARCH.lanes)] for _ in range((k_words + n_pass) * n_inferences)]
    horizon = 600
    if back_pressure:
        available, cycle = [], 0
        for _ in inputs:
            cycle += rng.choice([0, 0, 1, 4])
            available.append(cycle)
        ready = [rng.random() < 0.6 for _ in range(horizon)]
    else:
        available, ready = [0] * len(inputs), [True] * horizon
    sram_image = []
    emitted, schedule = check_run(config, weights, params, inputs, available, ready, sram_image=sram_image)
    # The SRAM after the run: the weights, the last two inferences' banks and the queue's region (push i in word
    # queue_base + i mod F), nothing else written.
    sram = {config["w_base"] + a: w for a, w in enumerate(weights)}
    assert sram_image == expected_banks(config, inputs, sram, ARCH.sram_words, ARCH.lanes, n_inferences)
    issue_cycles = n_out * k_words
    emit_cycles = [t for _, _, t, kind in emitted if kind == "emit"]
    accepted = [t for _, _, t in schedule.inputs]
    # A queue shorter than the K_f + P words of an inference fills (a push waits for a pop); a long one never.
    assert (schedule.queue_waits > 0) == (config["queue_words"] < tile_config(config).forwarded_words + n_pass)
    if not back_pressure and queue_words is None:
        # Spelled out: inference 0 RECV at 0..4, PASS at 5, 6 (popped at 1..7 if forwarded, else 6, 7);
        # COMPUTE [5, 5 + I + 2 = 37): result word 0 (channels 0..3, d = 4 * K = 20 issues) from a_0 = 5, word 1
        # (channels 4, 5, d = 10) from a_1 = 25; word 0 is written at 26 and EMITted at 27, word 1 at 35 + 2 = 37.
        # Inference 1's input side begins at 7 (>= c_0 = 5) (RECV word 4 at 11); c_1 = max(11 + 1, a_1 + 10 + 2
        # = 37) = 37 (no longer after inference 0's last EMIT); inference 2's input side waits for c_1.
        assert accepted[:8] == [0, 1, 2, 3, 4, 5, 6, 7] and accepted[14] == 37
        assert schedule.compute == [5, 37, 69] and schedule.words[:4] == [5, 25, 37, 57]
        assert emit_cycles[:4] == [27, 37, 59, 69]
        # Steady state of a tile alone: COMPUTE back to back with 2 drain cycles (section 6 rule 4).
        period = tile_config(config).tile_period_cycles(ARCH.lanes)
        assert schedule.compute[2] - schedule.compute[1] == period == issue_cycles + 2
    elif not back_pressure:
        # F = 1: a push waits for the pop of the word before it (pushed at t, popped at t + 1, so the next
        # push at t + 2): the input side takes a word every other cycle; COMPUTE begins after RECV word 4 at 8.
        assert accepted[:7] == [0, 2, 4, 6, 8, 10, 12] and schedule.compute[0] == 9
        assert [t for _, _, t, kind in emitted if kind == "forward"][:7] == [1, 3, 5, 7, 9, 11, 13]


def test_bank_alternation_and_queue_depth_matter():
    """Inference s + 1 is received into the other bank while COMPUTE of s reads its own: with K = 2 and a
    long COMPUTE (I = 12), inference 1 arrives in cycles 2, 3, inside COMPUTE of inference 0 [2, 16), and
    inference 2 overwrites bank 0 while COMPUTE of 1 reads bank 1. One bank would give inference 0 results
    over inference 1's words (and inference 1 over 2's): they differ, and the results must match the golden.
    Then the same forwarding tile with F = 1 and F = 16 under the same stalls: both exact, and only the
    small queue makes the input side wait for space. The 16-word queue is the free region between the weights and
    the banks (words [24, 40)), the 1-word one the word behind the banks."""
    rng = random.Random(31)
    k_words, n_out, n_inferences = 2, 6, 3
    config = make_config(n_in_words=k_words, n_out=n_out, w_base=0, act_base=40)
    weights, params = dense_case(rng, k_words, n_out, ARCH.lanes)
    inputs = [[rng.randint(-128, 127) for _ in range(ARCH.lanes)] for _ in range(k_words * n_inferences)]
    emitted, schedule = check_run(config, weights, params, inputs, [0] * len(inputs), [True] * 200)
    c_0, c_1 = schedule.compute[:2]
    issue_cycles = n_out * k_words
    assert [t for _, s, t in schedule.inputs if s == 1] == [2, 3] and c_0 == 2 and 3 < c_0 + issue_cycles + 2
    assert all(c_1 <= t < c_1 + issue_cycles + 2 for _, s, t in schedule.inputs if s == 2)
    per_inference = [golden_result_words(golden_outputs(weights, inputs[s * k_words:(s + 1) * k_words], params,
                                                        config), ARCH.lanes) for s in range(n_inferences)]
    assert per_inference[0] != per_inference[1] and per_inference[1] != per_inference[2]
    assert [word for word, *_, kind in emitted if kind == "emit"] == [w for words in per_inference for w in words]

    forward_config = make_config(n_in_words=6, forward=1, n_pass=2, n_out=4, w_base=0, act_base=40)
    weights, params = dense_case(rng, 6, 4, ARCH.lanes)
    inputs = [[rng.randint(-128, 127) for _ in range(ARCH.lanes)] for _ in range(8 * n_inferences)]
    available, ready = random_stalls(rng, len(inputs), 600)
    accepted = {}
    for queue_words, queue_base in ((1, 52), (16, 24)):
        queued = dict(forward_config, queue_base=queue_base, queue_words=queue_words)
        sram_image = []
        _, schedule = check_run(queued, weights, params, inputs, available, ready, sram_image=sram_image)
        sram = {a: w for a, w in enumerate(weights)}
        assert sram_image == expected_banks(queued, inputs, sram, ARCH.sram_words, ARCH.lanes, n_inferences)
        accepted[queue_words] = [t for _, _, t in schedule.inputs]
        assert (schedule.queue_waits > 0) == (queue_words == 1)
    assert all(small >= large for small, large in zip(accepted[1], accepted[16])) and accepted[1] != accepted[16]


@pytest.mark.parametrize("forward, back_pressure", [(0, False), (1, False), (1, True)])
def test_single_bank_receives_the_next_inference_after_compute_ends(forward, back_pressure):
    """One activation bank (register single_bank): every inference's stored words go to act_base onwards, and the
    first input transfer of inference s + 1 waits until COMPUTE of s has ended (the cycle after its last drain
    cycle), so COMPUTE never reads words of the next inference: results, transfer cycles and the SRAM after the run
    (one bank, the last inference's words) match the golden models, under random stalls too. With K = 2 and I = 12
    two banks would receive inference 1 inside COMPUTE of inference 0; one bank receives it after."""
    rng = random.Random(53 + forward + 2 * back_pressure)
    k_words, n_pass, n_out, n_inferences = 2, forward, 6, 4
    config = config_with_queue(make_config(n_in_words=k_words, forward=forward, n_pass=n_pass, n_out=n_out,
                                           w_base=0, act_base=40, single_bank=1), ARCH, None)
    assert tile_config(config).activation_words == k_words and config["queue_base"] == (42 if forward else 0)
    weights, params = dense_case(rng, k_words, n_out, ARCH.lanes)
    inputs = [[rng.randint(-128, 127) for _ in range(ARCH.lanes)] for _ in range((k_words + n_pass) * n_inferences)]
    available, ready = (random_stalls(rng, len(inputs), 600) if back_pressure
                        else ([0] * len(inputs), [True] * 600))
    sram_image = []
    _, schedule = check_run(config, weights, params, inputs, available, ready, sram_image=sram_image)
    assert sram_image == expected_banks(config, inputs, {a: w for a, w in enumerate(weights)}, ARCH.sram_words,
                                        ARCH.lanes, n_inferences)
    issue_cycles = n_out * k_words
    per_inference = k_words + n_pass
    for s in range(1, n_inferences):
        first = schedule.inputs[s * per_inference][2]
        assert first >= schedule.compute[s - 1] + issue_cycles + 2, "RECV of s + 1 began before COMPUTE of s ended"
    if not back_pressure:
        # inference 0 arrives in cycles 0, 1 and computes [2, 16); inference 1 arrives from cycle 16, not 2
        assert schedule.compute[0] == 2 and schedule.inputs[per_inference][2] == 16
        period = tile_config(config).tile_period_cycles(ARCH.lanes)
        assert schedule.compute[2] - schedule.compute[1] == period == k_words + issue_cycles + 2


def test_single_bank_weights_may_not_overlap_the_bank():
    """With one bank the next inference overwrites it while nothing orders that against COMPUTE's weight reads: a
    config whose weights overlap the bank is refused, naming both regions (two banks allow it, section 4)."""
    overlapping = make_config(n_in_words=2, n_out=4, w_base=0, act_base=4, single_bank=1)
    with pytest.raises(ConfigError, match=r"single_bank = 1: the weights \[w_base, w_base \+ weight words\) = \[0, 8\) "
                                          r"overlap the activation bank \[act_base, act_base \+ .*\) = \[4, 6\)"):
        tile_config(overlapping).validate(ARCH)
    tile_config(dict(overlapping, single_bank=0)).validate(ARCH)
    tile_config(dict(overlapping, act_base=8)).validate(ARCH)


@pytest.mark.parametrize("relu", [False, True])
def test_arithmetic_edge_cases(relu):
    lanes, k_words = ARCH.lanes, 2
    rng = random.Random(99)
    zero = [0] * lanes
    zp_out = 3
    # (weights of chunk 0, weights of chunk 1, bias, multiplier, shift): one output per row.
    rows = [
        (zero, zero, 3, 1, 1),                        # +1.5 rounds to even: 2
        (zero, zero, -3, 1, 1),                       # -1.5 rounds to even: -2
        (zero, zero, 5, 1, 1),                        # +2.5 rounds to even: 2 (half up would give 3)
        (zero, zero, -5, 1, 1),                       # -2.5 rounds to even: -2
        ([127] * lanes, [-128] * lanes, (1 << 31) - 1, 1 << 20, 21),  # accumulator wraps negative
        (zero, zero, (1 << 31) - 1, (1 << 31) - 1, 62),             # widest exact product, shift 62
        (zero, zero, 1_000_000, 1 << 30, 31),         # saturates at clamp_hi
        (zero, zero, -1_000_000, 1 << 30, 31),        # saturates at clamp_lo (ReLU: zp_out)
        ([-128] * lanes, [-128] * lanes, 0, 1 << 30, 40),            # largest lane products
    ] + [([rng.randint(-128, 127) for _ in range(lanes)], [rng.randint(-128, 127) for _ in range(lanes)],
          rng.randint(-20000, 20000), rng.randint(1 << 30, (1 << 31) - 1), rng.randint(30, 40))
         for _ in range(2)]
    n_out = len(rows)
    assert n_out <= ARCH.max_tile_outputs and n_out % lanes != 0   # last word has padded lanes
    weights = [w for r in rows for w in r[:2]]
    params = [r[2:] for r in rows]
    config = make_config(n_in_words=k_words, n_out=n_out, w_base=0, act_base=60, zp_out=zp_out,
                         clamp_lo=max(-128, zp_out) if relu else -128, clamp_hi=127)
    inputs = [[127] * lanes, [-128] * lanes, [rng.randint(-128, 127) for _ in range(lanes)],
              [rng.randint(-128, 127) for _ in range(lanes)]]
    emitted, schedule = check_run(config, weights, params, inputs, [0] * len(inputs), [True] * 200)

    first = golden_outputs(weights, inputs[:2], params, config)
    lo = config["clamp_lo"]
    assert first[:4] == [max(lo, v + zp_out) for v in (2, -2, 2, -2)]   # ties to even
    assert wrap32((1 << 31) - 1 + lanes * (127 * 127 + 128 * 128)) < 0 and first[4] == config["clamp_lo"]
    assert first[5] == max(lo, 1 + zp_out) and first[6] == 127
    assert first[7] == (zp_out if relu else -128)
    last_word = emitted[-1][0]
    assert last_word[n_out % lanes:] == [0] * (lanes - n_out % lanes)


def test_pass_only_tile_passes_from_cycle_0_and_idle_tile_never_accepts():
    config = config_with_queue(make_config(n_pass=2), ARCH)
    inputs = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]]
    emitted, schedule = check_run(config, [], [], inputs, [0] * 4, [True] * 50)
    # Each word spends one cycle in the forward queue.
    assert [t for _, _, t, _ in emitted] == [1, 2, 3, 4]


@pytest.mark.parametrize("forward", [0, 1])
def test_run_low_holds_the_initial_phase_clears_counters_and_blocks_loads_while_running(forward):
    """A flit accepted before run drops is forgotten: after run rises again RECV restarts at word 0 of
    bank 0, and (``forward``) the word it pushed into the forward queue is gone (the queue is emptied while
    run = 0). A config load issued while run = 1 is ignored (the destination stays)."""
    k_words, n_out = 2, 3
    rng = random.Random(5)
    config = config_with_queue(make_config(n_in_words=k_words, n_out=n_out, w_base=0, act_base=30, forward=forward), ARCH)
    weights, params = dense_case(rng, k_words, n_out, ARCH.lanes)
    flits = [[rng.randint(-128, 127) for _ in range(ARCH.lanes)] for _ in range(3)]
    dut = PE(ARCH, TILE)
    log = {"accepted": [], "emitted": []}

    async def testbench(ctx):
        async def load(target, addr, value):
            ctx.set(dut.load.valid, 1)
            ctx.set(dut.load.payload, {"tile": TILE, "target": target, "addr": addr, "data": value})
            await ctx.tick()
            ctx.set(dut.load.valid, 0)

        for addr, value in encode_config(ARCH, config):
            await load(LOAD_TARGET_CONFIG, addr, value)
        for addr, lanes in enumerate(weights):
            await load(LOAD_TARGET_SRAM, addr, pack_lanes(lanes, ARCH.lanes))
        for row, entry in enumerate(params):
            await load(LOAD_TARGET_PARAMS, row, encode_param_entry(*entry))
        ctx.set(dut.o_flit.ready, 1)
        sent = 0
        for cycle in range(60):
            running = not 1 <= cycle < 4
            ctx.set(dut.run, running)
            ctx.set(dut.i_flit.valid, sent < len(flits))
            if sent < len(flits):
                ctx.set(dut.i_flit.payload, {"data": pack_lanes(flits[sent], ARCH.lanes)})
            if not running:
                assert not ctx.get(dut.i_flit.ready) and not ctx.get(dut.o_flit.valid)
            if cycle == 5:   # ignored: loads only act while run = 0
                ctx.set(dut.load.valid, 1)
                ctx.set(dut.load.payload, {"tile": TILE, "target": LOAD_TARGET_CONFIG,
                                           "addr": [n for n, _, _ in CONFIG_FIELDS].index("dest_host"), "data": 0})
            else:
                ctx.set(dut.load.valid, 0)
            if ctx.get(dut.i_flit.valid) and ctx.get(dut.i_flit.ready):
                log["accepted"].append(cycle)
                sent += 1
            if ctx.get(dut.o_flit.valid):
                payload = ctx.get(dut.o_flit.payload)
                log["emitted"].append((unpack_lanes(int(payload.data), ARCH.lanes), int(payload.dest_host), cycle))
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    assert log["accepted"] == [0, 4, 5]
    expected = golden_result_words(golden_outputs(weights, flits[1:], params, config), ARCH.lanes)
    forwarded = flits[1:] if forward else []
    assert [(lanes, host) for lanes, host, _ in log["emitted"]] == [(word, 1) for word in forwarded + expected]
    # Forwarded words popped the cycle after their RECV (5, 6); COMPUTE from 6 for N_o * K + 2 cycles.
    first_emit = 5 + n_out * k_words + 3
    assert [t for *_, t in log["emitted"]] == [5, 6][:len(forwarded)] + [first_emit + j for j in range(len(expected))]


def test_idle_tile_holds_its_input():
    dut = PE(ARCH, 0)

    async def testbench(ctx):
        ctx.set(dut.run, 1)
        ctx.set(dut.o_flit.ready, 1)
        ctx.set(dut.i_flit.valid, 1)
        for _ in range(5):
            assert not ctx.get(dut.i_flit.ready) and not ctx.get(dut.o_flit.valid)
            await ctx.tick()

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()


# --- windowed layers (section 4.1) -----------------------------------------------------------------

#: Forward queue depths (the tile's register queue_words) the case lists below cycle through: one word, two, three
#: (all smaller than most inferences' forwarded plus passed words, so the queue fills) and None, every SRAM word
#: the weights and banks leave free (:func:`config_with_queue`; what a compiled program gets).
QUEUE_DEPTHS = (1, 2, 3, None)


def with_queue_depths(cases, first=1):
    """``cases`` (id first) as pytest parameters with a forward queue depth appended, cycling through
    QUEUE_DEPTHS, each with its id and ``-F<depth>`` (``-Ffree`` for None)."""
    depths = [QUEUE_DEPTHS[i % len(QUEUE_DEPTHS)] for i in range(len(cases))]
    return [pytest.param(*case[first:], depth, id=f"{case[0]}-F{'free' if depth is None else depth}")
            for case, depth in zip(cases, depths)]


#: Room for 5x5 maps: 1024 SRAM words, 64 result words.
WINDOW_ARCH = ARCH.replace(sram_bytes=4096, max_tile_outputs=256, result_ring_words=64)


def golden_window(config, sram, params, activations, lanes):
    """One inference's result words, straight from section 4.1 with nested loops.
    ``sram`` {addr: lanes} holds the weights; ``activations`` is the stored input map [K][L]. MAX and LANE compute
    the channel group of section 4.4 (as emulator/functional.py's _gather_windows): channel words first_word + cw
    of each pixel for cw < N_g (group_word_begin, N_g = group_words or all words_per_pixel), with the group-local
    LANE weight word w_base + cw*KH*KW + ky*KW + kx and parameter row cw*L + l, into result word q*N_g + cw."""
    height, width, cw_words = config["in_height"], config["in_width"], config["words_per_pixel"]
    kh, kw, stride = config["kernel_h"], config["kernel_w"], config["stride"]
    first_word, group_words = config["group_word_begin"], tile_config(config).computed_words

    def input_word(iy, ix, cw):
        if 0 <= iy < height and 0 <= ix < width:
            return activations[(iy * width + ix) * cw_words + cw]
        return [config["pad_value"]] * lanes

    def clamp(value):
        return min(max(value, config["clamp_lo"]), config["clamp_hi"])

    words = []
    # Section 4.1's output pixels in order: the rows of the band, the first from out_col_begin, the last up to
    # out_col_end (0: out_width).
    for oy, ox in tile_config(config).output_pixel_positions():
        if config["op"] == OP_MAC:
            outputs = []
            for o in range(config["n_out"]):
                bias, multiplier, shift = params[o]
                acc = bias
                for ky in range(kh):
                    for kx in range(kw):
                        for cw in range(cw_words):
                            k = (ky * kw + kx) * cw_words + cw
                            weight = sram.get(config["w_base"] + o * kh * kw * cw_words + k, [0] * lanes)
                            a = input_word(oy * stride + ky - config["pad_top"],
                                           ox * stride + kx - config["pad_left"], cw)
                            acc += sum(w * x for w, x in zip(weight, a))
                acc = wrap32(acc)
                outputs.append(clamp(shift_round_half_even(acc * multiplier, shift) + config["zp_out"]))
            words += golden_result_words(outputs, lanes)
        elif config["op"] == OP_LANE:
            # Depthwise: lane l of word cw of the group is channel c = cw*L + l, with its own weights and row c.
            for cw in range(group_words):
                word = []
                for lane in range(lanes):
                    bias, multiplier, shift = params[cw * lanes + lane]
                    acc = bias
                    for ky in range(kh):
                        for kx in range(kw):
                            weight = sram.get(config["w_base"] + cw * kh * kw + ky * kw + kx, [0] * lanes)
                            a = input_word(oy * stride + ky - config["pad_top"],
                                           ox * stride + kx - config["pad_left"], first_word + cw)
                            acc += weight[lane] * a[lane]
                    acc = wrap32(acc)
                    word.append(clamp(shift_round_half_even(acc * multiplier, shift) + config["zp_out"]))
                words.append(word)
        elif config["op"] == OP_BCAST:
            # Section 4.5: lane l of output word g is channel o = g*L + l; every input channel c of every window
            # position multiplies weight word w_base + g*KH*KW*C + (ky*KW + kx)*C + c (lane l) by the one value
            # lane c mod L of input word c div L.
            channels = config["in_channels"]

            def value(iy, ix, c):
                if not (0 <= iy < height and 0 <= ix < width):
                    return config["pad_value"]
                if config["in_dense"]:   # byte in_dense_offset + p*C + c of the stored words
                    byte = config["in_dense_offset"] + (iy * width + ix) * channels + c
                    return activations[byte // lanes][byte % lanes]
                return activations[(iy * width + ix) * cw_words + c // lanes][c % lanes]
            for g in range(group_words):
                word = []
                for lane in range(lanes):
                    bias, multiplier, shift = params[g * lanes + lane]
                    acc = bias
                    for ky in range(kh):
                        for kx in range(kw):
                            for c in range(channels):
                                address = config["w_base"] + (g * kh * kw + ky * kw + kx) * channels + c
                                weight = sram.get(address, [0] * lanes)
                                acc += weight[lane] * value(oy * stride + ky - config["pad_top"],
                                                            ox * stride + kx - config["pad_left"], c)
                    acc = wrap32(acc)
                    word.append(clamp(shift_round_half_even(acc * multiplier, shift) + config["zp_out"]))
                words.append(word)
        else:
            for cw in range(group_words):
                window = [input_word(oy * stride + ky - config["pad_top"], ox * stride + kx - config["pad_left"],
                                     first_word + cw) for ky in range(kh) for kx in range(kw)]
                words.append([clamp(max(w[lane] for w in window)) for lane in range(lanes)])
    return words


#: (id, registers, n_pass, forward, back pressure, inferences). Maps are 5x5 unless stated.
WINDOW_CASES = [
    ("conv3x3-s1-p1", dict(op=OP_MAC, in_height=5, in_width=5, words_per_pixel=2, kernel_h=3, kernel_w=3, stride=1,
                           pad_top=1, pad_left=1, pad_value=-7, out_row_begin=0, out_rows=5, out_width=5, n_out=5,
                           zp_out=-3), 0, 1, False, 3),
    ("conv3x3-s2-p0", dict(op=OP_MAC, in_height=5, in_width=5, words_per_pixel=1, kernel_h=3, kernel_w=3, stride=2,
                           pad_top=0, pad_left=0, pad_value=0, out_row_begin=0, out_rows=2, out_width=2, n_out=6,
                           zp_out=4, clamp_lo=4), 2, 0, True, 3),
    ("conv3x3-band-pad5", dict(op=OP_MAC, in_height=5, in_width=5, words_per_pixel=1, kernel_h=3, kernel_w=3,
                               stride=1, pad_top=1, pad_left=1, pad_value=5, out_row_begin=3, out_rows=2, out_width=5,
                               n_out=3), 1, 1, True, 3),
    # 5 rows x 4 columns, a 2x3 kernel with stride 3 and uneven padding: rows/columns must not be swapped.
    ("conv2x3-s3-5x4", dict(op=OP_MAC, in_height=5, in_width=4, words_per_pixel=2, kernel_h=2, kernel_w=3,
                            stride=3, pad_top=1, pad_left=2, pad_value=-1, out_row_begin=0, out_rows=2, out_width=2,
                            n_out=4), 0, 0, False, 3),
    ("maxpool2x2-s2", dict(op=OP_MAX, in_height=4, in_width=4, words_per_pixel=2, kernel_h=2, kernel_w=2, stride=2,
                           pad_top=0, pad_left=0, pad_value=-128, out_row_begin=0, out_rows=2, out_width=2, n_out=8,
                           clamp_lo=-100, clamp_hi=90), 0, 1, True, 3),
    ("maxpool3x3-s1-p1-band", dict(op=OP_MAX, in_height=5, in_width=5, words_per_pixel=1, kernel_h=3, kernel_w=3,
                                   stride=1, pad_top=1, pad_left=1, pad_value=-128, out_row_begin=1, out_rows=3,
                                   out_width=5, n_out=4, clamp_lo=-20, clamp_hi=100), 2, 0, False, 3),
]


#: Other lane counts (the lane index of o is o's low bits; with one lane there are none).
WINDOW_LANE_CASES = [
    ("conv3x3-s2-p1-lanes1", dict(op=OP_MAC, in_height=5, in_width=5, words_per_pixel=2, kernel_h=3, kernel_w=3,
                                  stride=2, pad_top=1, pad_left=1, pad_value=3, out_row_begin=1, out_rows=2,
                                  out_width=3, n_out=3), 1, 1, True, 3, 1),
    ("maxpool1x1-lanes1", dict(op=OP_MAX, in_height=3, in_width=3, words_per_pixel=2, kernel_h=1, kernel_w=1,
                               stride=2, pad_top=0, pad_left=0, pad_value=-128, out_row_begin=0, out_rows=2,
                               out_width=2, n_out=2, clamp_lo=-3, clamp_hi=3), 0, 0, False, 3, 1),
    ("conv3x3-s1-p1-lanes8", dict(op=OP_MAC, in_height=4, in_width=3, words_per_pixel=1, kernel_h=3, kernel_w=3,
                                  stride=1, pad_top=1, pad_left=1, pad_value=-9, out_row_begin=0, out_rows=4,
                                  out_width=3, n_out=10), 0, 1, False, 3, 8),
    ("maxpool3x3-s2-p1-lanes8", dict(op=OP_MAX, in_height=5, in_width=5, words_per_pixel=1, kernel_h=3, kernel_w=3,
                                     stride=2, pad_top=1, pad_left=1, pad_value=-128, out_row_begin=0, out_rows=3,
                                     out_width=3, n_out=8, clamp_lo=0, clamp_hi=127), 2, 1, True, 3, 8),
]


@pytest.mark.parametrize("registers, n_pass, forward, back_pressure, n_inferences, lanes, queue_words",
                         with_queue_depths([case + (WINDOW_ARCH.lanes,) for case in WINDOW_CASES]
                                            + WINDOW_LANE_CASES))
def test_windowed_layer_matches_golden_and_rule_4(registers, n_pass, forward, back_pressure, n_inferences, lanes,
                                                  queue_words):
    run_window_case(registers, n_pass, forward, back_pressure, n_inferences, lanes, queue_words=queue_words)


def run_window_case(registers, n_pass, forward, back_pressure, n_inferences, lanes, *, queue_words, average=False,
                    result_words_per_tile=None, ready_bursts=False, unread=None):
    """One windowed layer on a PE with ``lanes`` lanes, checked value by value and cycle by cycle.
    ``average``: all-one weights and multipliers near 2^S / (KH*KW) (an average pool as a LANE layer).
    ``result_words_per_tile``: result ring depth R (default: ceil(WINDOW_ARCH's max_tile_outputs / ``lanes``), a
    ring of as many words as the tile's largest result count).
    ``back_pressure``: seeded random input gaps and o_flit.ready stalls (:func:`bursty_ready` if
    ``ready_bursts``, else high in 60% of the cycles). ``unread``: registers the op does not read, loaded (unchecked,
    encode_config may reject them) on top of the config, which must behave as without them. ``queue_words``: the
    forward queue's words (:func:`config_with_queue`; None: all free SRAM). Also checks the SRAM after the run
    (:func:`expected_banks`: weights, banks, the queue's region). Returns (config, weights, params, inputs, emitted,
    schedule)."""
    ring_words = -(-WINDOW_ARCH.max_tile_outputs // lanes)
    arch = WINDOW_ARCH.replace(lanes=lanes, sram_bytes=1024 * lanes, result_ring_words=ring_words)
    if result_words_per_tile is not None:
        arch = arch.replace(max_tile_outputs=result_words_per_tile * lanes, result_ring_words=result_words_per_tile)
    rng = random.Random(repr(sorted(registers.items())) + str(lanes))   # a str seed is stable across runs
    k_words = registers["in_height"] * registers["in_width"] * registers["words_per_pixel"]
    if registers.get("in_dense"):   # section 4.5: the map's bytes back to back from in_dense_offset
        k_words = -(-(registers["in_dense_offset"] + registers["in_height"] * registers["in_width"]
                      * registers["in_channels"]) // lanes)
    config = make_config(n_in_words=k_words, forward=forward, n_pass=n_pass, w_base=3, **registers)
    # Registers MAC, MAX and LANE do not read (sections 4.2, 4.3) hold non-zero values: they must not move
    # the map or change a product (a separate generator keeps the case's own draws unchanged).
    unused = random.Random("unused" + repr(sorted(registers.items())))
    config.update(operand_a_offset=unused.randint(1, 40), operand_b_offset=unused.randint(1, 40),
                  concat_words_a=unused.randint(1, 3), add_mult_a=unused.randint(1, (1 << 23) - 1),
                  add_mult_b=unused.randint(1, (1 << 23) - 1))
    n_weight_words = tile_config(config).weight_words
    config["act_base"] = config["w_base"] + n_weight_words + 1
    config = config_with_queue(config, arch, queue_words)
    if average:
        weights = [[1] * lanes for _ in range(n_weight_words)]
    else:
        weights = [[rng.randint(-128, 127) for _ in range(lanes)] for _ in range(n_weight_words)]
    if registers["op"] == OP_MAX:
        params = [(0, 0, 0)] * config["n_out"]   # the table holds n_out zero rows, never read
    elif average:
        # Per-channel scale s_x / (KH*KW*s_y) with s_x / s_y in [0.8, 1.2), and a small bias.
        shift, window = 30, registers["kernel_h"] * registers["kernel_w"]
        params = [(rng.randint(-window * 4, window * 4),
                   int((1 << shift) * rng.uniform(0.8, 1.2) / window), shift) for _ in range(config["n_out"])]
    else:
        params = [(rng.randint(-3000, 3000), rng.randint(1 << 30, (1 << 31) - 1), rng.randint(34, 38))
                  for _ in range(config["n_out"])]
    inputs = [[rng.randint(-128, 127) for _ in range(lanes)] for _ in range((k_words + n_pass) * n_inferences)]
    if registers["op"] == OP_MAX:
        # A few all-minimum words, so a window may hold nothing but -128 (and padding).
        for flit in rng.sample(range(len(inputs)), 3):
            inputs[flit] = [-128] * lanes
    issue_cycles = tile_config(config).compute_issue_cycles
    horizon = 3 * n_inferences * (issue_cycles + k_words + n_pass + tile_config(config).result_words(lanes) + 3) + 200
    if back_pressure:
        available, cycle = [], 0
        for _ in inputs:
            cycle += rng.choice([0, 0, 1, 3])
            available.append(cycle)
        ready = bursty_ready(rng, 6 * horizon) if ready_bursts else [rng.random() < 0.6 for _ in range(horizon)]
    else:
        available, ready = [0] * len(inputs), [True] * horizon
    sram = {config["w_base"] + a: w for a, w in enumerate(weights)}
    sram_image = []
    emitted, schedule = check_run(config, weights, params, inputs, available, ready, arch=arch,
                                  golden=lambda activations: golden_window(config, sram, params, activations, lanes),
                                  loaded=dict(config, **unread) if unread else None, sram_image=sram_image)
    assert sram_image == expected_banks(config, inputs, sram, arch.sram_words, lanes, n_inferences)
    if not back_pressure and not n_pass and config["queue_words"] >= tile_config(config).forwarded_words:
        # Spelled out for inference 0: last RECV at K - 1, result word 0 issued for d_0 cycles from K, then
        # EMITted 2 cycles later (written at K + d_0 + 1), while COMPUTE still runs.
        emit_cycles = [t for _, _, t, kind in emitted if kind == "emit"]
        assert emit_cycles[0] == (k_words - 1) + 1 + tile_config(config).result_word_issue_cycles(lanes)[0] + 2
        assert len(emit_cycles) == n_inferences * tile_config(config).result_words(lanes)
    return config, weights, params, inputs, emitted, schedule


#: Result ring depth of the LANE cases at every lane count: a 5x5 map of 2 words a pixel (a ring that never
#: fills without back-pressure).
LANE_RESULT_WORDS = 64

#: LANE layers (section 4.1, op = LANE): (id, registers, n_pass, forward, back pressure, inferences,
#: average). n_out = CW * L is filled in per lane count.
LANE_OP_CASES = [
    # Depthwise 3x3, pad 1 with a non-zero pad value (an input zero point), per-channel parameters.
    ("depthwise3x3-s1-p1", dict(op=OP_LANE, in_height=5, in_width=5, words_per_pixel=2, kernel_h=3, kernel_w=3,
                                stride=1, pad_top=1, pad_left=1, pad_value=-6, out_row_begin=0, out_rows=5,
                                out_width=5, zp_out=-2), 0, 1, False, 3, False),
    ("depthwise3x3-band-bp", dict(op=OP_LANE, in_height=5, in_width=4, words_per_pixel=1, kernel_h=3, kernel_w=3,
                                  stride=2, pad_top=1, pad_left=1, pad_value=9, out_row_begin=1, out_rows=2,
                                  out_width=2, zp_out=5, clamp_lo=5), 2, 1, True, 3, False),
    # AveragePool 2x2 stride 2: all-one weights.
    ("avgpool2x2-s2", dict(op=OP_LANE, in_height=4, in_width=6, words_per_pixel=2, kernel_h=2, kernel_w=2, stride=2,
                           pad_top=0, pad_left=0, pad_value=0, out_row_begin=0, out_rows=2, out_width=3,
                           zp_out=1), 0, 0, False, 3, True),
    # GlobalAveragePool of an 8x8 map: one 8x8 window (kernel registers beyond the convolution limit 7).
    ("global8x8", dict(op=OP_LANE, in_height=8, in_width=8, words_per_pixel=1, kernel_h=8, kernel_w=8, stride=1,
                       pad_top=0, pad_left=0, pad_value=0, out_row_begin=0, out_rows=1, out_width=1,
                       zp_out=-1), 1, 0, True, 3, True),
]


@pytest.mark.parametrize("lanes", [4, 8])
@pytest.mark.parametrize("registers, n_pass, forward, back_pressure, n_inferences, average, queue_words",
                         with_queue_depths(LANE_OP_CASES))
def test_lane_layer_matches_golden_and_rule_4(registers, n_pass, forward, back_pressure, n_inferences, average,
                                              queue_words, lanes):
    registers = dict(registers, n_out=registers["words_per_pixel"] * lanes)
    config, weights, params, inputs, emitted, _ = run_window_case(
        registers, n_pass, forward, back_pressure, n_inferences, lanes, queue_words=queue_words, average=average,
        result_words_per_tile=LANE_RESULT_WORDS)
    assert len(weights) == config["words_per_pixel"] * config["kernel_h"] * config["kernel_w"]
    # Every lane has its own parameter row (a mix-up of banks or rows would go unnoticed otherwise).
    assert len(set(params)) == config["n_out"]
    results = [word for word, _, _, kind in emitted if kind == "emit"]
    if not average:
        # Not all saturated: the values carry the arithmetic.
        assert len({value for word in results for value in word}) > 2 * lanes


#: BCAST layers (section 4.5): (id, registers, n_pass, forward, back pressure, inferences). n_out = group_words * L
#: is filled in per lane count; in_channels below one word, exactly one, and across words.
BCAST_OP_CASES = [
    ("bcast3x3-c1-s1-p1", dict(op=OP_BCAST, in_height=5, in_width=4, words_per_pixel=1, in_channels=1, group_words=2,
                               kernel_h=3, kernel_w=3, stride=1, pad_top=1, pad_left=1, pad_value=-6, out_row_begin=0,
                               out_rows=5, out_width=4, zp_out=-2), 0, 1, False, 3),
    ("bcast4x2-c3-s2-band-bp", dict(op=OP_BCAST, in_height=6, in_width=5, words_per_pixel=1, in_channels=3,
                                    group_words=1, kernel_h=4, kernel_w=2, stride=2, pad_top=1, pad_left=0,
                                    pad_value=9, out_row_begin=1, out_rows=2, out_width=3, zp_out=5, clamp_lo=5),
     2, 1, True, 3),
    ("bcast2x2-c6-words2", dict(op=OP_BCAST, in_height=4, in_width=4, words_per_pixel=2, in_channels=6,
                                group_words=2, kernel_h=2, kernel_w=2, stride=1, pad_top=0, pad_left=0, pad_value=0,
                                out_row_begin=0, out_rows=3, out_width=3, zp_out=1), 1, 0, True, 3),
    # dense maps: pixels' channels back to back, across word boundaries, from a byte offset (a band's first row)
    ("bcast3x3-c3-dense", dict(op=OP_BCAST, in_height=5, in_width=5, words_per_pixel=1, in_channels=3, in_dense=1,
                               in_dense_offset=0, group_words=1, kernel_h=3, kernel_w=3, stride=1, pad_top=1,
                               pad_left=1, pad_value=-4, out_row_begin=0, out_rows=5, out_width=5, zp_out=-1),
     0, 1, True, 3),
    ("bcast3x2-c1-dense-offset3", dict(op=OP_BCAST, in_height=4, in_width=5, words_per_pixel=1, in_channels=1,
                                       in_dense=1, in_dense_offset=3, group_words=2, kernel_h=3, kernel_w=2, stride=2,
                                       pad_top=0, pad_left=1, pad_value=7, out_row_begin=0, out_rows=1, out_width=3,
                                       zp_out=2), 2, 0, False, 3),
]


@pytest.mark.parametrize("lanes", [4, 8])
@pytest.mark.parametrize("registers, n_pass, forward, back_pressure, n_inferences, queue_words",
                         with_queue_depths(BCAST_OP_CASES))
def test_broadcast_layer_matches_golden_and_rule_4(registers, n_pass, forward, back_pressure, n_inferences,
                                                   queue_words, lanes):
    registers = dict(registers, n_out=registers["group_words"] * lanes)
    if registers["in_channels"] > registers["words_per_pixel"] * lanes:
        pytest.skip("fewer lanes than the case's input channels")
    config, weights, params, inputs, emitted, _ = run_window_case(
        registers, n_pass, forward, back_pressure, n_inferences, lanes, queue_words=queue_words,
        result_words_per_tile=LANE_RESULT_WORDS)
    assert len(weights) == (config["group_words"] * config["kernel_h"] * config["kernel_w"]
                            * config["in_channels"])
    results = [word for word, _, _, kind in emitted if kind == "emit"]
    assert len({value for word in results for value in word}) > lanes   # not all saturated


def test_broadcast_golden_is_a_convolution():
    """Cross-check the BCAST golden against the MAC golden of the same convolution: weight W[o, c, ky, kx] at BCAST
    word (g*KH*KW + ky*KW + kx)*C + c lane l (o = g*L + l), at MAC word o*KH*KW*CW + (ky*KW + kx)*CW + c div L
    lane c mod L."""
    rng = random.Random(23)
    lanes, channels, outputs = 4, 3, 8
    registers = dict(in_height=4, in_width=5, words_per_pixel=1, kernel_h=3, kernel_w=2, stride=1, pad_top=1,
                     pad_left=0, pad_value=-3, out_row_begin=0, out_rows=4, out_width=4, zp_out=2)
    k_words = 4 * 5
    weight = [[[[rng.randint(-128, 127) for _ in range(2)] for _ in range(3)] for _ in range(channels)]
              for _ in range(outputs)]
    bcast_config = make_config(n_in_words=k_words, op=OP_BCAST, n_out=outputs, group_words=outputs // lanes,
                               in_channels=channels, **registers)
    bcast_weights = {}
    for g in range(outputs // lanes):
        for ky in range(3):
            for kx in range(2):
                for c in range(channels):
                    bcast_weights[(g * 6 + ky * 2 + kx) * channels + c] = [weight[g * lanes + l][c][ky][kx]
                                                                          for l in range(lanes)]
    mac_config = make_config(n_in_words=k_words, op=OP_MAC, n_out=outputs, **registers)
    mac_weights = {}
    for o in range(outputs):
        for ky in range(3):
            for kx in range(2):
                mac_weights[o * 6 + ky * 2 + kx] = [weight[o][c][ky][kx] if c < channels else 0 for c in range(lanes)]
    params = [(rng.randint(-999, 999), rng.randint(1 << 30, (1 << 31) - 1), 33) for _ in range(outputs)]
    activations = [[rng.randint(-128, 127) for _ in range(lanes)] for _ in range(k_words)]
    assert (golden_window(bcast_config, bcast_weights, params, activations, lanes)
            == golden_window(mac_config, mac_weights, params, activations, lanes))


def test_lane_golden_is_a_depthwise_convolution():
    """Cross-check the LANE golden against a MAC golden run channel by channel (one-hot weights)."""
    rng = random.Random(17)
    lanes = 4
    registers = dict(in_height=4, in_width=4, words_per_pixel=2, kernel_h=3, kernel_w=3, stride=1, pad_top=1,
                     pad_left=1, pad_value=-3, out_row_begin=0, out_rows=4, out_width=4, zp_out=2)
    k_words = 4 * 4 * 2
    lane_config = make_config(n_in_words=k_words, op=OP_LANE, n_out=2 * lanes, **registers)
    lane_weights = {a: [rng.randint(-128, 127) for _ in range(lanes)]
                    for a in range(tile_config(lane_config).weight_words)}
    params = [(rng.randint(-999, 999), rng.randint(1 << 30, (1 << 31) - 1), 36) for _ in range(2 * lanes)]
    activations = [[rng.randint(-128, 127) for _ in range(lanes)] for _ in range(k_words)]
    lane_words = golden_window(lane_config, lane_weights, params, activations, lanes)
    for channel in range(2 * lanes):
        cw, lane = divmod(channel, lanes)
        mac_config = dict(lane_config, op=OP_MAC, n_out=1)
        mac_weights = {}
        for ky in range(3):
            for kx in range(3):
                word = [0] * lanes
                word[lane] = lane_weights[cw * 9 + ky * 3 + kx][lane]
                mac_weights[(ky * 3 + kx) * 2 + cw] = word
        mac_words = golden_window(mac_config, mac_weights, [params[channel]], activations, lanes)
        assert [w[0] for w in mac_words] == [lane_words[q * 2 + cw][lane] for q in range(16)]


# --- output-channel groups: per-pixel interleaved output order (section 4.4) ----------------------------

def draw_group_case(name, op, lanes, channels):
    """Seeded random registers of one (band, group) tile of a layer split over output channels: a small map,
    a random window, an output band of >= 2 pixels, ``pass_per_pixel`` = R >= 1 interleaved words a pixel
    and P_bulk >= 0 passed words before them. ``channels``: "multiple" (n_out a multiple of L), "partial"
    (not: the last result word of a pixel is partly zero), both with W_px = 2 result words a pixel, or
    "preserve" (the channel-preserving ``op``, W_px = words_per_pixel).
    Returns (registers, n_pass, forward)."""
    rng = random.Random("group-" + name)
    while True:
        height, width = rng.randint(2, 3), rng.randint(2, 4)
        kernel_h, kernel_w, stride = rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 2)
        pad_top, pad_left = rng.randint(0, kernel_h // 2), rng.randint(0, kernel_w // 2)
        out_height = (height + 2 * pad_top - kernel_h) // stride + 1
        out_width = (width + 2 * pad_left - kernel_w) // stride + 1
        if out_height < 1 or out_width < 1:
            continue
        row_begin = rng.randint(0, out_height - 1)
        out_rows = rng.randint(1, out_height - row_begin)
        if out_rows * out_width >= 2:
            break
    words_per_pixel = rng.randint(1, 2)
    if channels == "preserve":
        n_out = words_per_pixel * lanes
    elif channels == "multiple":
        n_out = 2 * lanes
    else:
        n_out = lanes + rng.randint(1, lanes - 1)
    registers = dict(op=op, in_height=height, in_width=width, words_per_pixel=words_per_pixel, kernel_h=kernel_h,
                     kernel_w=kernel_w, stride=stride, pad_top=pad_top, pad_left=pad_left,
                     pad_value=-128 if op == OP_MAX else rng.randint(-9, 9), out_row_begin=row_begin,
                     out_rows=out_rows, out_width=out_width, n_out=n_out, zp_out=rng.randint(-4, 4),
                     pass_per_pixel=rng.randint(1, 3))
    n_pass = out_rows * out_width * registers["pass_per_pixel"] + rng.randint(0, 3)
    return registers, n_pass, rng.randint(0, 1)


#: (id, op, lanes, channels) of the seeded random group tiles; one of each kind also without P_bulk and
#: forwarded words ("-nobulk"), so the output side begins with pixel 0's interleaved pops.
GROUP_CASES = [
    ("mac-multiple-l4", OP_MAC, 4, "multiple"),
    ("mac-partial-l4", OP_MAC, 4, "partial"),
    ("mac-multiple-l8-nobulk", OP_MAC, 8, "multiple"),
    ("mac-partial-l8", OP_MAC, 8, "partial"),
    ("lane-l4-nobulk", OP_LANE, 4, "preserve"),
    ("max-l8", OP_MAX, 8, "preserve"),
]


@pytest.mark.parametrize("op, lanes, channels, queue_words", with_queue_depths(GROUP_CASES))
def test_output_channel_group_interleaves_passed_words_per_pixel(request, op, lanes, channels, queue_words):
    """Section 4.4 under random input gaps and output back-pressure, three inferences: every output word
    (bulk pops, then per output pixel its pass_per_pixel passed words and its own result words) and every
    transfer cycle against rule 4, COMPUTE starts, and the interleaving itself (the passed words of a pixel
    sit between the previous pixel's last result word and the pixel's first one)."""
    name = request.node.callspec.id.rsplit("-F", 1)[0]
    registers, n_pass, forward = draw_group_case(name, op, lanes, channels)
    n_pix = tile_config(make_config(**registers)).output_pixels   # the counts want a whole config
    if name.endswith("-nobulk"):
        n_pass, forward = n_pix * registers["pass_per_pixel"], 0
    n_inferences = 3
    config, _, _, inputs, emitted, _ = run_window_case(
        registers, n_pass, forward, True, n_inferences, lanes, queue_words=queue_words,
        result_words_per_tile=None if op == OP_MAC else LANE_RESULT_WORDS)
    assert config["pass_per_pixel"] >= 1 and n_pix >= 2
    if channels == "partial":
        assert config["n_out"] % lanes
    elif channels == "multiple":
        assert config["n_out"] % lanes == 0
    check_interleaving(config, n_pass, inputs, emitted, n_inferences, lanes)


def check_interleaving(config, n_pass, inputs, emitted, n_inferences, lanes):
    """Section 4.4's order located by content in ``emitted`` (from :func:`check_run`): per inference the bulk
    pops, then for each of the n_pix output pixels (section 4.1's pixel list) its pass_per_pixel passed words
    (the last n_pix * pass_per_pixel of the inference's passed words, in order) and its W_px EMITs. Passed
    word i of inference s is input flit s*(K + P) + K + i (random data; a collision would only make the check
    weaker, never wrong)."""
    k_words, per_pixel = config["n_in_words"], config["pass_per_pixel"]
    n_pix = tile_config(config).output_pixels
    w_px = tile_config(config).result_words(lanes) // n_pix
    bulk = tile_config(config).forwarded_words + n_pass - n_pix * per_pixel
    per_inference = bulk + n_pix * (per_pixel + w_px)
    assert len(emitted) == n_inferences * per_inference
    for s in range(n_inferences):
        words = emitted[s * per_inference:(s + 1) * per_inference]
        passed = inputs[s * (k_words + n_pass) + k_words:(s + 1) * (k_words + n_pass)]
        interleaved = passed[n_pass - n_pix * per_pixel:]
        for q in range(n_pix):
            block = words[bulk + q * (per_pixel + w_px):bulk + (q + 1) * (per_pixel + w_px)]
            assert [kind for *_, kind in block] == ["forward"] * per_pixel + ["emit"] * w_px, \
                f"inference {s}, pixel {q}: not {per_pixel} pops then {w_px} EMITs"
            assert [lanes_ for lanes_, *_ in block[:per_pixel]] == interleaved[q * per_pixel:(q + 1) * per_pixel], \
                f"inference {s}, pixel {q}: the interleaved words are not passed words {q * per_pixel}.."
        # The emitted cycles increase (one transfer a cycle at most) across the interleaving.
        cycles = [t for _, _, t, _ in words]
        assert cycles == sorted(set(cycles))


def test_window_golden_reduces_to_the_dense_golden():
    """The 1x1 case of the section 4.1 golden is the section 4 golden (what keeps dense timing/values)."""
    rng = random.Random(3)
    k_words, n_out, lanes = 3, 6, ARCH.lanes
    config = make_config(n_in_words=k_words, n_out=n_out, w_base=2, zp_out=1)
    weights, params = dense_case(rng, k_words, n_out, lanes)
    sram = {config["w_base"] + a: w for a, w in enumerate(weights)}
    activations = [[rng.randint(-128, 127) for _ in range(lanes)] for _ in range(k_words)]
    assert golden_window(config, sram, params, activations, lanes) == \
        golden_result_words(golden_outputs(weights, activations, params, config), lanes)
    counts = tile_config(config)
    assert counts.compute_issue_cycles == n_out * k_words and counts.result_words(lanes) == -(-n_out // lanes)


# --- several tensors in one stream and op ADD (section 4.2) ---------------------------------------

def random_stalls(rng, n_inputs, horizon):
    """Arrival cycles with random gaps and a random o_flit.ready pattern (seeded: reproducible)."""
    available, cycle = [], 0
    for _ in range(n_inputs):
        cycle += rng.choice([0, 0, 1, 3])
        available.append(cycle)
    return available, [rng.random() < 0.6 for _ in range(horizon)]


def bursty_ready(rng, horizon):
    """An o_flit.ready pattern of ``horizon`` cycles in bursts (seeded): high for 1..6 cycles, then low for
    0..30, about a fifth of the cycles ready. Long low stretches let a small result ring fill while COMPUTE
    runs; short high ones let the output side fall behind and catch up."""
    ready = []
    while len(ready) < horizon:
        ready += [True] * rng.randint(1, 6) + [False] * rng.randint(0, 30)
    return ready[:horizon]


#: A dense layer (or no layer) reading one tensor of a stream of several: (id, n_in_words,
#: (store_begin, store_end), (forward_begin, forward_end), n_out, n_pass).
STREAM_CASES = [
    ("store-middle-forward-prefix", 9, (3, 6), (0, 3), 4, 0),
    ("store-middle-forward-suffix", 9, (2, 5), (5, 9), 6, 1),
    ("store-middle-forward-all", 8, (2, 5), (0, 8), 3, 0),
    ("store-suffix-forward-overlapping", 7, (4, 7), (1, 6), 5, 2),
    ("store-prefix-forward-nothing", 5, (0, 2), (0, 0), 4, 0),
    # A tile that computes nothing and only drops the tensor no longer needed (the stream's prefix).
    ("store-nothing-drop-prefix", 6, (0, 0), (2, 6), 0, 1),
]


@pytest.mark.parametrize("k_words, store, forward, n_out, n_pass, queue_words", with_queue_depths(STREAM_CASES))
def test_stream_of_several_tensors_stores_one_range_and_forwards_another(k_words, store, forward, n_out, n_pass,
                                                                         queue_words):
    """Section 4.2 with random valid/ready stalls: every emitted flit (forwarded words in order, passed
    words, results) and its cycle, the results over the stored words only, and the SRAM after the run:
    the weights untouched, the two activation banks holding the stored words of the last two inferences
    (inference s in bank s mod 2, at act_base + (s mod 2) * B) and nothing else written (the activation
    region sits right after zero words and right before the weights, so a write of a word outside the store
    range, or to a wrong address, shows), and the forward queue's region behind the weights holding the words last
    pushed (push i in word queue_base + i mod F)."""
    rng = random.Random("stream-" + repr((k_words, store, forward, n_out, n_pass)))
    stored = store[1] - store[0]
    act_base = 6
    config = make_config(n_in_words=k_words, n_out=n_out, n_pass=n_pass, act_base=act_base,
                         w_base=act_base + ACTIVATION_BANKS * stored, zp_out=2, **dense_window_registers(stored))
    config.update(store_begin=store[0], store_end=store[1], forward_begin=forward[0], forward_end=forward[1])
    config = config_with_queue(config, ARCH, queue_words)
    assert (tile_config(config).stored_words, tile_config(config).forwarded_words) == (stored, forward[1] - forward[0])
    weights, params = dense_case(rng, stored, n_out, ARCH.lanes)
    n_inferences = 3
    inputs = [[rng.randint(-128, 127) for _ in range(ARCH.lanes)] for _ in range((k_words + n_pass) * n_inferences)]
    available, ready = random_stalls(rng, len(inputs), 600)
    sram_image = []
    emitted, schedule = check_run(config, weights, params, inputs, available, ready, sram_image=sram_image)
    assert sum(kind == "forward" for *_, kind in emitted) == n_inferences * (forward[1] - forward[0] + n_pass)

    expected = [[0] * ARCH.lanes for _ in range(ARCH.sram_words)]
    per_inference = k_words + n_pass
    for s in (n_inferences - 2, n_inferences - 1):
        flits = inputs[s * per_inference:(s + 1) * per_inference]
        bank = act_base + (s % 2) * stored
        expected[bank:bank + stored] = flits[store[0]:store[1]]
    expected[config["w_base"]:config["w_base"] + len(weights)] = weights
    for address, flit in queue_image(config, inputs, n_inferences).items():
        expected[address] = flit
    assert sram_image == expected


def round_half_even_array(value, shift):
    """``value / 2^shift`` to nearest, ties to even, elementwise on int64 arrays (section 4's rne)."""
    quotient = value >> shift
    remainder = value - (quotient << shift)
    half = np.int64(1) << (shift - 1)
    return quotient + ((remainder > half) | ((remainder == half) & ((quotient & 1) == 1)))



def requantize_array(acc, table, config):
    """Section 4's requantization of int64 accumulators with parameter rows ``table[..., (bias unused,
    multiplier, shift)]``: wrap to 32 bits, rne(acc * M, S) + zp_out, clamp."""
    acc = ((acc + (1 << 31)) % (1 << 32)) - (1 << 31)
    y = round_half_even_array(acc * table[..., 1], table[..., 2]) + config["zp_out"]
    return np.clip(y, config["clamp_lo"], config["clamp_hi"])


def band_pixels(config, rows):
    """The output pixels of section 4.1's band (:meth:`TileConfig.output_pixel_positions`, in order) out of ``rows`` =
    the array of the band's whole rows, (out_rows, out_width, ...)."""
    positions = tile_config(config).output_pixel_positions()
    return rows[[oy - config["out_row_begin"] for oy, _ in positions], [ox for _, ox in positions]]


def golden_add(config, params, stored, lanes):
    """One inference's result words of op ADD, section 4.2 in numpy: operand a = the stored words from
    operand_a_offset, b = from operand_b_offset, both (in_height, in_width, CW, L), of which the channel group's
    words [group_word_begin, + N_g) (section 4.4; N_g = group_words or all CW; as emulator/functional.py's
    _two_operand_results); output pixels (:func:`band_pixels`) of the rows [out_row_begin, +out_rows)."""
    height, width, cw_words = config["in_height"], config["in_width"], config["words_per_pixel"]
    n_map = height * width * cw_words
    group = slice(config["group_word_begin"], config["group_word_begin"] + tile_config(config).computed_words)
    words = np.array(stored, dtype=np.int64)
    a = words[config["operand_a_offset"]:][:n_map].reshape(height, width, cw_words, lanes)[:, :, group]
    b = words[config["operand_b_offset"]:][:n_map].reshape(height, width, cw_words, lanes)[:, :, group]
    rows = slice(config["out_row_begin"], config["out_row_begin"] + config["out_rows"])
    table = np.array(params, dtype=np.int64).reshape(-1, lanes, 3)   # row c = cw*L + l, cw < N_g
    acc = table[..., 0] + a[rows] * config["add_mult_a"] + b[rows] * config["add_mult_b"]
    return band_pixels(config, requantize_array(acc, table, config)).reshape(-1, lanes).tolist()   # word q*N_g + cw


def golden_concat(config, params, stored, lanes):
    """One inference's result words of op CONCAT, section 4.3 in numpy: operand a (CWa = concat_words_a
    words a pixel, from stored word operand_a_offset) times add_mult_a, concatenated along the word axis
    with operand b (CW - CWa words a pixel, from operand_b_offset) times add_mult_b; bias c = cw*L + l
    added, requantized with row c; output pixels (:func:`band_pixels`) of the rows [out_row_begin, +out_rows)."""
    height, width, cw_words = config["in_height"], config["in_width"], config["words_per_pixel"]
    words_a = config["concat_words_a"]
    words_b = cw_words - words_a
    words = np.array(stored, dtype=np.int64)
    a = words[config["operand_a_offset"]:][:height * width * words_a].reshape(height, width, words_a, lanes)
    b = words[config["operand_b_offset"]:][:height * width * words_b].reshape(height, width, words_b, lanes)
    x = np.concatenate([a * config["add_mult_a"], b * config["add_mult_b"]], axis=2)
    rows = slice(config["out_row_begin"], config["out_row_begin"] + config["out_rows"])
    table = np.array(params, dtype=np.int64).reshape(cw_words, lanes, 3)
    return band_pixels(config, requantize_array(table[..., 0] + x[rows], table, config)).reshape(-1, lanes).tolist()


def two_operand_stream(sizes, order, stream):
    """RECV layout of an ADD or CONCAT tile whose operands have ``sizes`` = (words of a, words of b):
    (n_in_words, (store_begin, store_end), (forward_begin, forward_end), operand_a_offset,
    operand_b_offset). ``order``: "a-first" or "b-first" in the stored words. ``stream``: "joined" (just
    the two maps, back to back, all stored, nothing forwarded) or "prefix-gap" (a 3-word tensor in front
    that is forwarded and not stored; a stored gap word between the operands and a stored word after
    them, neither read; 2 words behind that are neither stored nor forwarded)."""
    prefix, gap, after, suffix = (0, 0, 0, 0) if stream == "joined" else (3, 1, 1, 2)
    size = dict(zip("ab", sizes))
    first, second = ("a", "b") if order == "a-first" else ("b", "a")
    offsets = {first: 0, second: size[first] + gap}
    stored = size[first] + gap + size[second] + after
    return prefix + stored + suffix, (prefix, prefix + stored), (0, prefix), offsets["a"], offsets["b"]


def add_operands(rng, mode, cw_words, lanes):
    """(add_mult_a, add_mult_b, parameter rows, zp_out, float reference or None) as the compiler
    lowers y = rne(((a - z_a) s_a + (b - z_b) s_b) / s_y) + z_y (section 4.2), zero points folded in
    the bias. ``mode``: "scales" (random scales; one multiplier is ADD_MULT_MAX), "random" (random
    multipliers up to 2^22 and per-channel M, S and bias offsets), "extremes" (both multipliers
    ADD_MULT_MAX, zero points 127: the accumulator's largest magnitude), "ties" (multipliers 1,
    M/2^S = 1/2: half the sums round a tie to even)."""
    z_a, z_b, z_y = (rng.randint(-128, 127) for _ in range(3))
    n_rows = cw_words * lanes
    reference = None
    if mode in ("scales", "extremes"):
        s_a, s_b, s_y = (rng.uniform(0.01, 0.1) for _ in range(3))
        if mode == "extremes":
            s_a = s_b = 0.05
            z_a = z_b = 127
        m_a, m_b, multiplier, shift = lowered_scales(s_a, s_b, s_y)
        rows = [(-(z_a * m_a + z_b * m_b), multiplier, shift)] * n_rows

        def reference(a, b):
            exact = ((np.asarray(a, np.float64) - z_a) * s_a + (np.asarray(b, np.float64) - z_b) * s_b) / s_y
            return np.clip(np.round(exact) + z_y, -128, 127)
    elif mode == "random":
        m_a, m_b = rng.randint(0, ADD_MULT_MAX), rng.randint(0, ADD_MULT_MAX)
        rows = [(-(z_a * m_a + z_b * m_b) + rng.randint(-999, 999), rng.randint(1 << 30, (1 << 31) - 1),
                 rng.randint(50, 54)) for _ in range(n_rows)]
    else:
        m_a = m_b = 1
        rows = [(rng.randint(-9, 9), 1, 1) for _ in range(n_rows)]
    return m_a, m_b, rows, z_y, reference


def lowered_scales(s_a, s_b, s_y):
    """Sections 4.2 / 4.3's lowering: add_mult_{a,b} = round(2^22 s_{a,b} / max(s_a, s_b)) and
    M / 2^S ~= max(s_a, s_b) / (2^22 s_y) with the largest S in [1, 53] that keeps M < 2^31."""
    top = max(s_a, s_b)
    m_a, m_b = round(ADD_MULT_MAX * s_a / top), round(ADD_MULT_MAX * s_b / top)
    shift = 53
    multiplier = round((1 << shift) * top / (ADD_MULT_MAX * s_y))
    while multiplier >= 1 << 31:
        shift -= 1
        multiplier = round((1 << shift) * top / (ADD_MULT_MAX * s_y))
    return m_a, m_b, multiplier, shift


def run_two_operand_case(config, params, lanes, stream_prefix, rng, *, n_inferences, back_pressure, extremes,
                         golden, queue_words, ring_words=32, ready_bursts=False, unread=None, sram_image=None):
    """Run an ADD or CONCAT tile (``config`` complete) on an arch with ``lanes`` lanes and a result ring of
    ``ring_words`` words for ``n_inferences`` random inferences, with seeded random stalls if ``back_pressure``
    (o_flit.ready in :func:`bursty_ready` bursts if ``ready_bursts``), checking every transfer against
    ``golden`` and rule 4 with a forward queue of ``queue_words`` (None: all free SRAM; :func:`config_with_queue`, which
    sets registers queue_base and queue_words of ``config`` in place); random "weights" fill the SRAM below
    act_base (neither op reads a weight). ``unread``: as :func:`run_window_case`'s; ``sram_image``: as
    :func:`simulate`'s. Returns (inputs, emitted, schedule)."""
    arch = WINDOW_ARCH.replace(lanes=lanes, sram_bytes=256 * lanes, max_tile_outputs=ring_words * lanes,
                               result_ring_words=ring_words)
    config.update(config_with_queue(config, arch, queue_words))
    k_words, n_pass = config["n_in_words"], config["n_pass"]
    assert tile_config(config).weight_words == 0 and stream_prefix == config["store_begin"]
    sram = {address: [rng.randint(-128, 127) for _ in range(lanes)] for address in range(config["act_base"])}
    inputs = [[rng.randint(-128, 127) for _ in range(lanes)] for _ in range((k_words + n_pass) * n_inferences)]
    if extremes:
        for flit in inputs:
            for lane in range(lanes):
                flit[lane] = rng.choice([-128, -128, 127, flit[lane]])
    issue_cycles = tile_config(config).compute_issue_cycles
    horizon = 3 * n_inferences * (issue_cycles + k_words + n_pass + tile_config(config).result_words(lanes) + 3) + 200
    if back_pressure:
        available, ready = random_stalls(rng, len(inputs), horizon)
        if ready_bursts:
            ready = bursty_ready(rng, 6 * horizon)
    else:
        available, ready = [0] * len(inputs), [True] * horizon
    emitted, schedule = check_run(config, [], params, inputs, available, ready, arch=arch, sram=sram,
                                  golden=lambda stored: golden(config, params, stored, lanes),
                                  loaded=dict(config, **unread) if unread else None, sram_image=sram_image)
    emits = [t for _, _, t, kind in emitted if kind == "emit"]
    assert len(emits) == n_inferences * tile_config(config).result_words(lanes)
    until = tile_config(config).store_until
    if (not back_pressure and not n_pass and config["queue_words"] >= tile_config(config).forwarded_words
            and config["forward_end"] <= until):
        # Spelled out for inference 0: last stored RECV word (store_until - 1, section 4.2) at cycle store_until - 1,
        # result word 0 issued from store_until (ADD: 2 issues, CONCAT: 1), written at store_until + d_0 + 1 and
        # EMITted in the next cycle, while COMPUTE still runs (every forwarded word has been popped by then).
        assert emits[0] == (until - 1) + 1 + tile_config(config).result_word_issue_cycles(lanes)[0] + 2
    return inputs, emitted, schedule


#: op ADD (section 4.2): (id, in_height, in_width, words_per_pixel, out_row_begin, out_rows, order, stream,
#: mode, n_pass, back pressure, lanes). ``order``, ``stream``: :func:`two_operand_stream`.
ADD_CASES = [
    ("skip+main-scales", 3, 3, 2, 0, 3, "a-first", "joined", "scales", 0, False, 4),
    ("prefix-gap-random-bp", 3, 2, 2, 0, 3, "b-first", "prefix-gap", "random", 1, True, 4),
    ("band-random-bp", 4, 3, 1, 1, 2, "b-first", "prefix-gap", "random", 0, True, 8),
    ("main+skip-band-extremes", 4, 2, 2, 2, 2, "b-first", "joined", "extremes", 2, False, 8),
    ("ties", 2, 3, 1, 0, 2, "a-first", "joined", "ties", 0, True, 4),
]


@pytest.mark.parametrize("height, width, cw_words, row_begin, out_rows, order, stream, mode, n_pass, back_pressure, "
                         "lanes, queue_words", with_queue_depths(ADD_CASES))
def test_add_matches_section_4_2_and_rule_4(height, width, cw_words, row_begin, out_rows, order, stream, mode, n_pass,
                                             back_pressure, lanes, queue_words):
    rng = random.Random(f"add-{height}-{width}-{cw_words}-{row_begin}-{order}-{stream}-{mode}-{lanes}")
    n_map = height * width * cw_words
    k_words, store, forward, offset_a, offset_b = two_operand_stream((n_map, n_map), order, stream)
    m_a, m_b, params, zp_out, reference = add_operands(rng, mode, cw_words, lanes)
    # concat_words_a is not read by ADD: a non-zero value must change nothing.
    config = make_config(n_in_words=k_words, n_pass=n_pass, op=OP_ADD, in_height=height, in_width=width,
                         words_per_pixel=cw_words, kernel_h=1, kernel_w=2, stride=1, out_row_begin=row_begin,
                         out_rows=out_rows, out_width=width, n_out=cw_words * lanes, operand_a_offset=offset_a,
                         operand_b_offset=offset_b, concat_words_a=rng.randint(1, 5), add_mult_a=m_a, add_mult_b=m_b,
                         zp_out=0 if mode == "ties" else zp_out, w_base=0, act_base=20,
                         pad_value=rng.randint(-128, 127), store_begin=store[0], store_end=store[1],
                         forward_begin=forward[0], forward_end=forward[1])
    assert tile_config(config).compute_issue_cycles == out_rows * width * cw_words * 2
    n_inferences = 3
    inputs, emitted, _ = run_two_operand_case(config, params, lanes, store[0], rng, n_inferences=n_inferences,
                                           queue_words=queue_words,
                                           back_pressure=back_pressure, extremes=mode == "extremes",
                                           golden=golden_add)
    results = [word for word, _, _, kind in emitted if kind == "emit"]
    if reference is not None:
        # The lowering approximates the float formula within 1 LSB; nothing may be far off.
        for i in range(n_inferences):
            stored = inputs[i * (k_words + n_pass):][store[0]:store[1]]
            a = np.array(stored[offset_a:offset_a + n_map]).reshape(height, width * cw_words * lanes)
            b = np.array(stored[offset_b:offset_b + n_map]).reshape(height, width * cw_words * lanes)
            want = reference(a[row_begin:row_begin + out_rows], b[row_begin:row_begin + out_rows]).reshape(-1, lanes)
            got = np.array(results[i * len(want):(i + 1) * len(want)])
            assert np.abs(got - want).max() <= 1
    # Not all saturated: the values carry the arithmetic. "ties": results come from odd and even sums
    # alike, so ties occurred and were rounded to even; "extremes": inputs are mostly -128 and 127.
    assert len({value for word in results for value in word}) > (4 if mode in ("ties", "extremes") else 2 * lanes)


def test_add_golden_is_the_elementwise_formula():
    """Cross-check golden_add against a scalar loop over the formula of section 4.2 (a band, CW = 2,
    operand b stored before operand a with a gap)."""
    rng = random.Random(23)
    lanes, height, width, cw_words = 4, 3, 2, 2
    offset_a, offset_b = 13, 0
    config = make_config(n_in_words=30, op=OP_ADD, in_height=height, in_width=width, words_per_pixel=cw_words,
                         kernel_h=1, kernel_w=2, out_row_begin=1, out_rows=2, out_width=width, n_out=8,
                         operand_a_offset=offset_a, operand_b_offset=offset_b,
                         add_mult_a=rng.randint(0, ADD_MULT_MAX), add_mult_b=ADD_MULT_MAX,
                         zp_out=-7, clamp_lo=-100, clamp_hi=100)
    params = [(rng.randint(-1 << 30, 1 << 30), rng.randint(1 << 30, (1 << 31) - 1), rng.randint(50, 54))
              for _ in range(8)]
    stored = [[rng.randint(-128, 127) for _ in range(lanes)] for _ in range(26)]
    words = []
    for oy in range(1, 3):
        for ox in range(width):
            for cw in range(cw_words):
                word = []
                for lane in range(lanes):
                    bias, multiplier, shift = params[cw * lanes + lane]
                    pixel_word = (oy * width + ox) * cw_words + cw
                    acc = wrap32(bias + stored[offset_a + pixel_word][lane] * config["add_mult_a"]
                                 + stored[offset_b + pixel_word][lane] * config["add_mult_b"])
                    y = shift_round_half_even(acc * multiplier, shift) + config["zp_out"]
                    word.append(min(max(y, config["clamp_lo"]), config["clamp_hi"]))
                words.append(word)
    assert golden_add(config, params, stored, lanes) == words


# --- op CONCAT (section 4.3) -------------------------------------------------------------------------

# --- a second store range (section 4.2) ------------------------------------------------------------

def split_stream(sizes, prefix, between, after, forward):
    """RECV layout of a tile storing two ranges of its stream: ``prefix`` words, the first range (``sizes[0]``
    words), ``between`` words, the second range (``sizes[1]``), ``after`` words. Returns (n_in_words, (store_begin,
    store_end), (store2_begin, store2_end), (forward_begin, forward_end)); ``forward`` names the forwarded words:
    "none", "prefix", "between", "prefix+first" (the prefix and the first range), "second+after" or "all"."""
    first, second = sizes
    store = (prefix, prefix + first)
    store2 = (store[1] + between, store[1] + between + second)
    k_words = store2[1] + after
    forwards = {"none": (0, 0), "prefix": (0, prefix), "between": (store[1], store2[0]), "prefix+first": (0, store[1]),
                "second+after": (store2[0], k_words), "all": (0, k_words)}
    return k_words, store, store2, forwards[forward]


def expected_banks(config, inputs, sram, sram_words, lanes, n_inferences):
    """The SRAM after a run of ``n_inferences``: the loaded image ``sram`` {addr: lanes}, the two activation
    banks holding the stored words (first range, then second: :func:`stored_part`) of the last two inferences,
    inference s at act_base + (s mod 2) * B, and the forward queue's region holding the words last pushed
    (:func:`queue_image`); every other word 0 (never written)."""
    expected = [[0] * lanes for _ in range(sram_words)]
    for address, word in sram.items():
        expected[address] = word
    per_inference, stored = config["n_in_words"] + config["n_pass"], tile_config(config).stored_words
    banks = tile_config(config).activation_banks         # one bank (single_bank): only the last inference's words
    for s in range(max(0, n_inferences - banks), n_inferences):
        bank = config["act_base"] + (s % banks) * stored
        expected[bank:bank + stored] = stored_part(config, inputs[s * per_inference:(s + 1) * per_inference])
    for address, flit in queue_image(config, inputs, n_inferences).items():
        expected[address] = flit
    return expected


#: op ADD whose operands are two separate ranges of a longer stream (a band of a residual Add stores its rows
#: of both maps): (id, in_height, in_width, words_per_pixel, out_row_begin, out_rows, order, prefix, between, after,
#: forward, mode, n_pass, back pressure, lanes). ``order``: "a-first" (range 1 is operand a: operand_a_offset = 0,
#: operand_b_offset = B1) or "b-first"; the rest: :func:`split_stream`, :func:`add_operands`.
SPLIT_ADD_CASES = [
    ("a|b-forward-between-scales", 3, 2, 2, 0, 3, "a-first", 4, 3, 2, "between", "scales", 0, False, 4),
    ("b|a-forward-prefix-first-bp", 3, 3, 1, 0, 3, "b-first", 2, 3, 1, "prefix+first", "random", 1, True, 4),
    ("band-a|b-forward-second-after-bp", 4, 2, 1, 1, 2, "a-first", 1, 1, 3, "second+after", "random", 0, True, 8),
    ("a|b-adjacent-forward-all-extremes", 2, 3, 2, 0, 2, "a-first", 0, 0, 2, "all", "extremes", 2, False, 4),
]


@pytest.mark.parametrize("height, width, cw_words, row_begin, out_rows, order, prefix, between, after, forward, mode, "
                         "n_pass, back_pressure, lanes, queue_words", with_queue_depths(SPLIT_ADD_CASES))
def test_add_of_two_store_ranges_matches_section_4_2_and_rule_4(height, width, cw_words, row_begin, out_rows, order,
                                                                prefix, between, after, forward, mode, n_pass,
                                                                back_pressure, lanes, queue_words):
    """Section 4.2's second store range: the operands of an ADD are two separate ranges of the stream (other words
    before, between and after them, some forwarded). The stored words are range 1's then range 2's (operand
    offsets 0 and B1), bank s mod 2 at act_base + (s mod 2) * B with B = both ranges' words; COMPUTE waits for RECV
    word store2_end - 1 (rule 4, :class:`Schedule`), not for the words after it. Every output word and cycle is
    checked against the golden, and the SRAM after the run against the two banks."""
    rng = random.Random(f"split-add-{height}-{width}-{cw_words}-{row_begin}-{order}-{prefix}-{between}-{after}-{mode}")
    n_map = height * width * cw_words
    k_words, store, store2, forwards = split_stream((n_map, n_map), prefix, between, after, forward)
    offset_a, offset_b = (0, n_map) if order == "a-first" else (n_map, 0)
    m_a, m_b, params, zp_out, reference = add_operands(rng, mode, cw_words, lanes)
    config = make_config(n_in_words=k_words, n_pass=n_pass, op=OP_ADD, in_height=height, in_width=width,
                         words_per_pixel=cw_words, kernel_h=1, kernel_w=2, stride=1, out_row_begin=row_begin,
                         out_rows=out_rows, out_width=width, n_out=cw_words * lanes, operand_a_offset=offset_a,
                         operand_b_offset=offset_b, add_mult_a=m_a, add_mult_b=m_b, zp_out=zp_out, w_base=0,
                         act_base=9, pad_value=rng.randint(-128, 127), store_begin=store[0], store_end=store[1],
                         store2_begin=store2[0], store2_end=store2[1], forward_begin=forwards[0],
                         forward_end=forwards[1])
    arch = WINDOW_ARCH.replace(lanes=lanes, sram_bytes=256 * lanes)      # run_two_operand_case's SRAM
    config = config_with_queue(config, arch, queue_words)
    tile = tile_config(config)
    tile.validate(arch)
    assert (tile.stored_words, tile.store_until) == (2 * n_map, store2[1])
    assert tile.store_until < k_words      # words after the second range: COMPUTE must not wait for them
    n_inferences = 3
    sram_image = []
    inputs, emitted, schedule = run_two_operand_case(config, params, lanes, store[0], rng, n_inferences=n_inferences,
                                                     queue_words=queue_words, back_pressure=back_pressure,
                                                     extremes=mode == "extremes", golden=golden_add,
                                                     sram_image=sram_image)
    per_inference = k_words + n_pass
    for s, start in enumerate(schedule.compute):
        # Rule 4: COMPUTE of s begins after RECV word store2_end - 1 of s, and (no stalls) right after it.
        last_stored = schedule.inputs[s * per_inference + store2[1] - 1]
        assert start > last_stored[2]
        if not back_pressure and not schedule.queue_waits and s == 0:
            assert start == last_stored[2] + 1 == store2[1]
    assert sum(kind == "forward" for *_, kind in emitted) == n_inferences * (forwards[1] - forwards[0] + n_pass)
    # The stored words of each inference are range 1 then range 2, also in the SRAM.
    sram = {address: word for address, word in enumerate(sram_image[:config["act_base"]])}
    assert sram_image == expected_banks(config, inputs, sram, len(sram_image), lanes, n_inferences)
    results = [word for word, _, _, kind in emitted if kind == "emit"]
    if reference is not None:
        for i in range(n_inferences):
            flits = inputs[i * per_inference:(i + 1) * per_inference]
            a = np.array(flits[store[0]:store[1]] if order == "a-first" else flits[store2[0]:store2[1]])
            b = np.array(flits[store2[0]:store2[1]] if order == "a-first" else flits[store[0]:store[1]])
            rows = slice(row_begin, row_begin + out_rows)
            want = reference(a.reshape(height, -1)[rows], b.reshape(height, -1)[rows]).reshape(-1, lanes)
            got = np.array(results[i * len(want):(i + 1) * len(want)])
            assert np.abs(got - want).max() <= 1
    assert len({value for word in results for value in word}) > (4 if mode == "extremes" else 2 * lanes)


#: Windowed layers whose input map is split over two store ranges (the op does not matter to the input side):
#: (id, registers, words of the map in range 1, prefix, between, after, forward, n_pass, back pressure, lanes).
SPLIT_WINDOW_CASES = [
    ("maxpool2x2-s2", dict(op=OP_MAX, in_height=4, in_width=4, words_per_pixel=2, kernel_h=2, kernel_w=2, stride=2,
                           pad_top=0, pad_left=0, pad_value=-128, out_row_begin=0, out_rows=2, out_width=2, n_out=8,
                           clamp_lo=-100, clamp_hi=90), 12, 3, 4, 2, "between", 1, True, 4),
    ("conv3x3-s1-p1", dict(op=OP_MAC, in_height=3, in_width=3, words_per_pixel=2, kernel_h=3, kernel_w=3, stride=1,
                           pad_top=1, pad_left=1, pad_value=-7, out_row_begin=0, out_rows=3, out_width=3, n_out=5,
                           zp_out=-3), 7, 0, 3, 1, "prefix+first", 0, False, 4),
]


@pytest.mark.parametrize("registers, split, prefix, between, after, forward, n_pass, back_pressure, lanes, "
                         "queue_words", with_queue_depths(SPLIT_WINDOW_CASES))
def test_windowed_layer_over_two_store_ranges_matches_golden_and_rule_4(registers, split, prefix, between, after,
                                                                        forward, n_pass, back_pressure, lanes,
                                                                        queue_words):
    """The second store range is op-independent: a MAX or MAC tile whose map is words [0, split) of range 1 and
    [split, map words) of range 2 (not on a pixel boundary for the MAC) computes what it computes on the map stored
    in one piece; every transfer and cycle against the goldens, and the SRAM after the run."""
    arch = WINDOW_ARCH.replace(lanes=lanes, sram_bytes=1024 * lanes)
    rng = random.Random("split-window-" + repr(sorted(registers.items())) + str(split))
    n_map = registers["in_height"] * registers["in_width"] * registers["words_per_pixel"]
    k_words, store, store2, forwards = split_stream((split, n_map - split), prefix, between, after, forward)
    config = make_config(n_in_words=k_words, n_pass=n_pass, w_base=3, **registers)
    config.update(store_begin=store[0], store_end=store[1], store2_begin=store2[0], store2_end=store2[1],
                  forward_begin=forwards[0], forward_end=forwards[1])
    n_weight_words = tile_config(config).weight_words
    config["act_base"] = config["w_base"] + n_weight_words + 1
    config = config_with_queue(config, arch, queue_words)
    tile_config(config).validate(arch)
    weights = [[rng.randint(-128, 127) for _ in range(lanes)] for _ in range(n_weight_words)]
    if registers["op"] == OP_MAX:
        params = [(0, 0, 0)] * config["n_out"]
    else:
        params = [(rng.randint(-3000, 3000), rng.randint(1 << 30, (1 << 31) - 1), rng.randint(34, 38))
                  for _ in range(config["n_out"])]
    n_inferences = 3
    inputs = [[rng.randint(-128, 127) for _ in range(lanes)] for _ in range((k_words + n_pass) * n_inferences)]
    horizon = 3 * n_inferences * (tile_config(config).compute_issue_cycles + k_words + n_pass
                                  + tile_config(config).result_words(lanes) + 3) + 200
    if back_pressure:
        available, ready = random_stalls(rng, len(inputs), horizon)
    else:
        available, ready = [0] * len(inputs), [True] * horizon
    sram = {config["w_base"] + a: w for a, w in enumerate(weights)}
    sram_image = []
    emitted, schedule = check_run(config, weights, params, inputs, available, ready, arch=arch, sram_image=sram_image,
                                  golden=lambda activations: golden_window(config, sram, params, activations, lanes))
    assert sram_image == expected_banks(config, inputs, sram, arch.sram_words, lanes, n_inferences)
    per_inference = k_words + n_pass
    assert all(start > schedule.inputs[s * per_inference + store2[1] - 1][2]
               for s, start in enumerate(schedule.compute))
    if not back_pressure and not schedule.queue_waits:
        assert schedule.compute[0] == store2[1] < k_words
    # The same map stored in one piece gives the same results (the golden of the joined stored words).
    for i in range(n_inferences):
        flits = inputs[i * per_inference:(i + 1) * per_inference]
        joined = flits[store[0]:store[1]] + flits[store2[0]:store2[1]]
        assert stored_part(config, flits) == joined and len(joined) == n_map


def second_range_add_config(**overrides):
    """:func:`add_config`'s ADD (operands a, b of 4 words each) in a 12-word stream: a = words [0, 4) (range 1),
    b = words [6, 10) (range 2, at stored word B1 = 4)."""
    registers = dict(n_in_words=12, store_begin=0, store_end=4, store2_begin=6, store2_end=10, forward_begin=0,
                     forward_end=0)
    registers.update(overrides)
    return add_config(**registers)


def test_valid_second_store_ranges_encode():
    assert len(encode_config(ARCH, second_range_add_config())) == len(CONFIG_FIELDS)
    # Adjacent ranges, a forwarded prefix and suffix, and a MAX map split in two.
    assert encode_config(ARCH, config_with_queue(second_range_add_config(n_in_words=11, store_begin=2, store_end=6,
                                                                  store2_begin=6, store2_end=10, forward_begin=8,
                                                                  forward_end=11), ARCH))
    assert encode_config(ARCH, config_with_queue(window_config(op=OP_MAX, n_in_words=7, store_begin=1, store_end=2,
                                                        store2_begin=4, store2_end=7, forward_end=7, n_out=4,
                                                        kernel_h=1, kernel_w=1, pad_top=0, pad_left=0, out_rows=2,
                                                        out_width=2), ARCH))
    assert tile_config(second_range_add_config()).store_until == 10
    assert tile_config(second_range_add_config(store2_begin=0, store2_end=0, operand_b_offset=0)).store_until == 4


SECOND_RANGE_MESSAGE = ("config registers store2_begin = {}, store2_end = {} must satisfy store_begin = {} < "
                        "store_end = {} <= store2_begin < store2_end <= n_in_words = {} \\(a second store range after "
                        "a non-empty first; both 0 for none\\)")


@pytest.mark.parametrize("overrides, message", [
    pytest.param(dict(store_begin=6, store_end=10, store2_begin=0, store2_end=4),
                 SECOND_RANGE_MESSAGE.format(0, 4, 6, 10, 12), id="before-the-first"),
    pytest.param(dict(store_begin=0, store_end=6, store2_begin=4, store2_end=8),
                 SECOND_RANGE_MESSAGE.format(4, 8, 0, 6, 12), id="overlapping-the-first"),
    pytest.param(dict(store2_begin=8, store2_end=13), SECOND_RANGE_MESSAGE.format(8, 13, 0, 4, 12),
                 id="beyond-n_in_words"),
    pytest.param(dict(store2_begin=6, store2_end=0), SECOND_RANGE_MESSAGE.format(6, 0, 0, 4, 12),
                 id="begin-without-end"),
    pytest.param(dict(store2_begin=6, store2_end=6), SECOND_RANGE_MESSAGE.format(6, 6, 0, 4, 12), id="empty"),
    pytest.param(dict(store_begin=0, store_end=0, store2_begin=0, store2_end=8),
                 SECOND_RANGE_MESSAGE.format(0, 8, 0, 0, 12), id="empty-first-range"),
    # Both ranges count: 4 + 4 stored words differ from the 2x2 map of one operand ... (MAX reads one map).
    pytest.param(dict(op=OP_MAX, kernel_w=1, n_out=4),
                 r"config registers store_end - store_begin \+ store2_end - store2_begin = 8 stored words differ "
                 r"from in_height \* in_width \* words_per_pixel = 2 \* 2 \* 1 = 4", id="max-map-is-both-ranges"),
    # ... and the operands must lie inside both ranges' words, and the two banks of them inside the SRAM.
    pytest.param(dict(store2_end=9, operand_b_offset=4),
                 r"operand_b_offset \+ in_height \* in_width \* words_per_pixel = 4 \+ 2 \* 2 \* 1 = 8 exceed the 7 "
                 r"stored words \(store_end - store_begin \+ store2_end - store2_begin\)", id="operand-beyond-ranges"),
    pytest.param(dict(act_base=49), r"act_base \+ 2 \* .* = 65 exceed sram_words = 64", id="banks-of-both-ranges"),
])
def test_second_store_range_validation(overrides, message):
    with pytest.raises(LoadEncodingError, match=message):
        encode_config(ARCH, second_range_add_config(**overrides))
    with pytest.raises(ConfigError, match=message):
        tile_config(second_range_add_config(**overrides)).validate(ARCH)


def concat_operands(rng, mode, words_a, words_b, lanes):
    """(add_mult_a, add_mult_b, parameter rows, zp_out, float reference or None) as section 4.3 lowers
    y = Q_y(concat(DQ_a(a), DQ_b(b))): the zero points folded into per-channel biases (bias_c = -z_a m_a for
    a's CWa*L channels, -z_b m_b for b's). ``mode``: "scales" (random scales, one M and S for every
    channel; ``reference(x)`` is the float formula on the concatenated (..., CW, L) map), "random" (random
    multipliers up to 2^22, random per-channel M, S and bias offsets), "extremes" (both multipliers
    ADD_MULT_MAX, zero points 127 and -128: |acc| up to 255 * 2^22)."""
    z_a, z_b, z_y = (rng.randint(-128, 127) for _ in range(3))
    reference = None
    if mode in ("scales", "extremes"):
        s_a, s_b, s_y = (rng.uniform(0.01, 0.1) for _ in range(3))
        if mode == "extremes":
            s_a, s_b, s_y, z_a, z_b = 0.05, 0.05, 0.1, 127, -128
        m_a, m_b, multiplier, shift = lowered_scales(s_a, s_b, s_y)
        rows = ([(-z_a * m_a, multiplier, shift)] * (words_a * lanes)
                + [(-z_b * m_b, multiplier, shift)] * (words_b * lanes))

        def reference(x):
            x = np.asarray(x, np.float64)
            from_a = (np.arange(x.shape[-2]) < words_a)[:, None]
            exact = np.where(from_a, (x - z_a) * s_a, (x - z_b) * s_b) / s_y
            return np.clip(np.round(exact) + z_y, -128, 127)
    else:
        m_a, m_b = rng.randint(0, ADD_MULT_MAX), rng.randint(0, ADD_MULT_MAX)
        rows = [(-(z_a * m_a if c < words_a * lanes else z_b * m_b) + rng.randint(-999, 999),
                 rng.randint(1 << 30, (1 << 31) - 1), rng.randint(52, 55))
                for c in range((words_a + words_b) * lanes)]
    return m_a, m_b, rows, z_y, reference


def draw_concat_cases():
    """op CONCAT cases (section 4.3): (id, shape, order, stream, mode, back pressure, lanes), ``shape`` =
    (in_height, in_width, CWa, CWb, out_row_begin, out_rows, n_pass) drawn at random (seeded; the id
    spells it out) of at most 32 result words. ``order``, ``stream``: :func:`two_operand_stream`."""
    rng = random.Random("concat-cases-0")
    cases = []
    for order, stream, mode, back_pressure, lanes in [
            ("a-first", "joined", "scales", False, 4),
            ("b-first", "prefix-gap", "random", True, 4),
            ("a-first", "prefix-gap", "random", True, 8),
            ("b-first", "joined", "extremes", False, 8),
            ("b-first", "prefix-gap", "scales", True, 8),
            ("a-first", "prefix-gap", "extremes", True, 4)]:
        height, width = rng.randint(1, 4), rng.randint(1, 4)
        words_a, words_b = rng.randint(1, 3), rng.randint(1, 3)
        row_begin = rng.randint(0, height - 1)
        out_rows = rng.randint(1, height - row_begin)
        while out_rows * width * (words_a + words_b) > 32:
            out_rows -= 1
        n_pass = 0 if not back_pressure else rng.randint(0, 2)
        shape = (height, width, words_a, words_b, row_begin, out_rows, n_pass)
        name = (f"{order}-{stream}-{mode}{'-bp' if back_pressure else ''}-l{lanes}-{height}x{width}-cwa{words_a}"
                f"-cwb{words_b}-rows{row_begin}+{out_rows}-pass{n_pass}")
        cases.append((name, shape, order, stream, mode, back_pressure, lanes))
    return cases


CONCAT_CASES = draw_concat_cases()


def test_concat_cases_cover_orders_bands_and_operand_widths():
    """The drawn cases include both orders at both lane counts, a row band strictly inside the map, bands of
    several rows of several pixels, CWa < CWb, CWa = CWb and CWa > CWb, and PASS words."""
    shapes = [case[1] for case in CONCAT_CASES]
    assert {(case[2], case[6]) for case in CONCAT_CASES} >= {("a-first", 4), ("b-first", 4), ("a-first", 8),
                                                              ("b-first", 8)}
    assert any(row_begin > 0 and row_begin + out_rows < height for height, _, _, _, row_begin, out_rows, _ in shapes)
    assert any(a < b for _, _, a, b, *_ in shapes) and any(a > b for _, _, a, b, *_ in shapes)
    assert any(a == b for _, _, a, b, *_ in shapes) and any(shape[-1] for shape in shapes)
    assert sum(width >= 2 and out_rows >= 2 for _, width, _, _, _, out_rows, _ in shapes) >= 2


@pytest.mark.parametrize("shape, order, stream, mode, back_pressure, lanes, queue_words",
                         with_queue_depths(CONCAT_CASES))
def test_concat_matches_section_4_3_and_rule_4(shape, order, stream, mode, back_pressure, lanes, queue_words):
    height, width, words_a, words_b, row_begin, out_rows, n_pass = shape
    cw_words = words_a + words_b
    rng = random.Random(f"concat-{shape}-{order}-{stream}-{mode}-{lanes}")
    pixels = height * width
    k_words, store, forward, offset_a, offset_b = two_operand_stream((pixels * words_a, pixels * words_b), order,
                                                                     stream)
    m_a, m_b, params, zp_out, reference = concat_operands(rng, mode, words_a, words_b, lanes)
    config = make_config(n_in_words=k_words, n_pass=n_pass, op=OP_CONCAT, in_height=height, in_width=width,
                         words_per_pixel=cw_words, concat_words_a=words_a, kernel_h=1, kernel_w=1, stride=1,
                         out_row_begin=row_begin, out_rows=out_rows, out_width=width, n_out=cw_words * lanes,
                         operand_a_offset=offset_a, operand_b_offset=offset_b, add_mult_a=m_a, add_mult_b=m_b,
                         zp_out=zp_out, w_base=0, act_base=20, pad_value=rng.randint(-128, 127),
                         store_begin=store[0], store_end=store[1], forward_begin=forward[0], forward_end=forward[1])
    assert tile_config(config).compute_issue_cycles == out_rows * width * cw_words    # one issue per output word
    n_inferences = 3
    inputs, emitted, _ = run_two_operand_case(config, params, lanes, store[0], rng, n_inferences=n_inferences,
                                           queue_words=queue_words,
                                           back_pressure=back_pressure, extremes=mode == "extremes",
                                           golden=golden_concat)
    results = [word for word, _, _, kind in emitted if kind == "emit"]
    # Not all saturated: the values carry the arithmetic ("extremes": inputs are mostly -128 and 127).
    assert len({value for word in results for value in word}) > (4 if mode == "extremes" else 2 * lanes)
    if reference is not None:
        # The lowering approximates the float Concat-and-requantize within 1 LSB.
        for i in range(n_inferences):
            stored = np.array(inputs[i * (k_words + n_pass):][store[0]:store[1]])
            a = stored[offset_a:offset_a + pixels * words_a].reshape(height, width, words_a, lanes)
            b = stored[offset_b:offset_b + pixels * words_b].reshape(height, width, words_b, lanes)
            want = reference(np.concatenate([a, b], axis=2)[row_begin:row_begin + out_rows]).reshape(-1, lanes)
            got = np.array(results[i * len(want):(i + 1) * len(want)])
            assert np.abs(got - want).max() <= 1


def test_concat_golden_is_section_4_3_issue_by_issue():
    """Cross-check golden_concat against a scalar loop over section 4.3's issues (a band; CWa = 2, CWb = 1;
    operand b stored before operand a, with a gap)."""
    rng = random.Random(29)
    lanes, height, width, words_a, words_b = 4, 3, 2, 2, 1
    cw_words = words_a + words_b
    offset_a, offset_b = 8, 0
    config = make_config(n_in_words=30, op=OP_CONCAT, in_height=height, in_width=width, words_per_pixel=cw_words,
                         concat_words_a=words_a, out_row_begin=1, out_rows=2, out_width=width,
                         n_out=cw_words * lanes, operand_a_offset=offset_a, operand_b_offset=offset_b,
                         add_mult_a=rng.randint(0, ADD_MULT_MAX), add_mult_b=ADD_MULT_MAX, zp_out=5,
                         clamp_lo=-90, clamp_hi=110)
    params = [(rng.randint(-1 << 29, 1 << 29), rng.randint(1 << 30, (1 << 31) - 1), rng.randint(50, 54))
              for _ in range(cw_words * lanes)]
    stored = [[rng.randint(-128, 127) for _ in range(lanes)] for _ in range(offset_a + height * width * words_a)]
    words = []
    for oy in range(1, 3):
        for ox in range(width):
            p = oy * width + ox
            for cw in range(cw_words):
                if cw < words_a:
                    activation, m = stored[offset_a + p * words_a + cw], config["add_mult_a"]
                else:
                    activation, m = stored[offset_b + p * words_b + (cw - words_a)], config["add_mult_b"]
                word = []
                for lane in range(lanes):
                    bias, multiplier, shift = params[cw * lanes + lane]
                    acc = wrap32(bias + activation[lane] * m)
                    y = shift_round_half_even(acc * multiplier, shift) + config["zp_out"]
                    word.append(min(max(y, config["clamp_lo"]), config["clamp_hi"]))
                words.append(word)
    assert golden_concat(config, params, stored, lanes) == words


# --- the result ring: fewer slots than an inference's result words (section 4) ---------------------

def test_more_result_words_than_ring_slots():
    """A 3x3 convolution (pad 1) of a 2x2 map to N_o = 2 channels: E = 4 result words an inference, more than
    the R = 3 words of ARCH's ring (program format 5 rejected such a tile). Exact results and the ring's rule
    spelled out, two inferences: (1) o_flit.ready low until cycle 100, so three written words fill the ring
    and word 3 waits for EMIT 0; (2) always ready: the ring never waits; (3) always ready with R = 1: every
    word waits for the previous word's EMIT, and COMPUTE of inference 1 for inference 0's last EMIT."""
    rng = random.Random(41)
    config = make_config(n_in_words=4, n_out=2, in_height=2, in_width=2, words_per_pixel=1, kernel_h=3, kernel_w=3,
                         stride=1, pad_top=1, pad_left=1, pad_value=-2, out_rows=2, out_width=2, w_base=0,
                         act_base=20, zp_out=1)
    weights = [[rng.randint(-128, 127) for _ in range(ARCH.lanes)] for _ in range(tile_config(config).weight_words)]
    params = [(rng.randint(-3000, 3000), rng.randint(1 << 30, (1 << 31) - 1), rng.randint(34, 37)) for _ in range(2)]
    sram = {a: w for a, w in enumerate(weights)}
    inputs = [[rng.randint(-128, 127) for _ in range(ARCH.lanes)] for _ in range(8)]
    assert tile_config(config).result_words(ARCH.lanes) == 4 > ARCH.result_words == 3
    assert tile_config(config).result_word_issue_cycles(ARCH.lanes) == [18]           # 2 channels * 9 window words

    def run(ready, arch=ARCH):
        emitted, schedule = check_run(config, weights, params, inputs, [0] * len(inputs), ready, arch=arch,
                                      golden=lambda stored: golden_window(config, sram, params, stored, ARCH.lanes))
        results = [word for word, *_, kind in emitted if kind == "emit"]
        assert len({value for word in results for value in word}) > 4     # not all saturated
        return [t for *_, t, kind in emitted if kind == "emit"], schedule

    # (1) RECV at 0..3, c_0 = 4, a = 4, 22, 40 (words written at 23, 41, 59); word 3 needs slot 0: EMIT 0 at
    # 100 (the first ready cycle), a_3 = 101. EMITs 100, 101, 102, then 101 + 18 + 2 = 121. Inference 1 (RECV
    # at 4..7): c_1 = max(8, a_3 + 18 + 2 = 121, EMIT 1 + 1 = 102) = 121, words back to back from there.
    emits, schedule = run([t >= 100 for t in range(400)])
    assert schedule.words == [4, 22, 40, 101, 121, 139, 157, 175] and schedule.compute == [4, 121]
    assert emits == [100, 101, 102, 121, 141, 159, 177, 195] and schedule.ring_waits == 1
    # (2) Always ready: each word leaves 2 cycles after its last issue, long before its slot is needed again;
    # c_1 = a_3 + 18 + 2 = 78 (COMPUTE back to back, 2 drain cycles).
    emits, schedule = run([True] * 300)
    assert schedule.words == [4, 22, 40, 58, 78, 96, 114, 132] and schedule.ring_waits == 0
    assert emits == [a + 18 + 2 for a in schedule.words]
    # (3) R = 1: a_{j+1} = EMIT j + 1 = a_j + 18 + 3; c_1 = max(a_3 + 18 + 2 = 87, EMIT 3 + 1 = 88) = 88.
    emits, schedule = run([True] * 300, ARCH.replace(max_tile_outputs=ARCH.lanes, result_ring_words=1))
    assert schedule.words == [4, 25, 46, 67, 88, 109, 130, 151] and schedule.compute == [4, 88]
    assert emits == [a + 18 + 2 for a in schedule.words] and schedule.ring_waits == 7
    assert schedule.start_ring_waits == 1


#: Tiles on L = 8 lanes whose E = n_pix * W_px result words an inference exceed the ring's R =
#: result_ring_words words: (id, registers, n_pass, forward, R).
RING_CASES = [
    # N_o = 11 = L + 3 (not a multiple of L): two words a pixel, d = 8 * K_w = 16 and 3 * K_w = 6 (a 1x2
    # kernel, short enough words for two to be written during one output stall); 9 pixels, E = 18.
    ("mac-partial-R2", dict(op=OP_MAC, in_height=3, in_width=3, words_per_pixel=1, kernel_h=1, kernel_w=2, stride=1,
                            pad_top=0, pad_left=1, pad_value=-5, out_row_begin=0, out_rows=3, out_width=3, n_out=11,
                            zp_out=-1), 1, 1, 2),
    # N_o = 5 < L: one short word a pixel (d = 5 * K_w); 2 x 4 pixels, E = 8; section 4.4's pass_per_pixel =
    # 1 puts a pop before every EMIT (and 2 bulk passed words before them).
    ("mac-short-interleaved-R1", dict(op=OP_MAC, in_height=3, in_width=4, words_per_pixel=2, kernel_h=2, kernel_w=2,
                                      stride=1, pad_top=0, pad_left=1, pad_value=3, out_row_begin=0, out_rows=2,
                                      out_width=4, n_out=5, pass_per_pixel=1), 10, 0, 1),
    # Max pooling 3x3 stride 1 pad 1, CW = 1: d = 9; 3 x 4 pixels, E = 12.
    ("max-R1", dict(op=OP_MAX, in_height=4, in_width=4, words_per_pixel=1, kernel_h=3, kernel_w=3, stride=1,
                    pad_top=1, pad_left=1, pad_value=-128, out_row_begin=1, out_rows=3, out_width=4, n_out=8,
                    clamp_lo=-90, clamp_hi=100), 0, 1, 1),
    # Depthwise 3x3 (LANE), CW = 2: d = 9 a word; 2 x 3 pixels, E = 12.
    ("lane-R2", dict(op=OP_LANE, in_height=3, in_width=3, words_per_pixel=2, kernel_h=3, kernel_w=3, stride=1,
                     pad_top=1, pad_left=1, pad_value=4, out_row_begin=0, out_rows=2, out_width=3, n_out=16,
                     zp_out=2), 2, 0, 2),
]


@pytest.mark.parametrize("registers, n_pass, forward, ring_words, queue_words", with_queue_depths(RING_CASES))
def test_windowed_layer_through_a_ring_smaller_than_an_inference(registers, n_pass, forward, ring_words,
                                                                 queue_words):
    """Section 4's result ring of R = 1 or 2 words with E = 8..18 result words an inference (L = 8), three
    inferences under seeded random input gaps and o_flit.ready in short bursts between long stalls
    (:func:`bursty_ready`): every output word and transfer cycle, every c_s and every a_j against rule 4. The
    ring really fills: result words wait for a slot (the EMIT j - R term), and with R = 1 every word but
    (possibly) an inference's first does."""
    lanes = 8
    config, _, _, _, emitted, schedule = run_window_case(
        registers, n_pass, forward, True, 3, lanes, queue_words=queue_words, result_words_per_tile=ring_words,
        ready_bursts=True)
    n_words = tile_config(config).result_words(lanes)
    assert 8 <= n_words and ring_words < n_words
    assert schedule.ring_waits > 0
    if ring_words == 1:
        # Every word but an inference's first waits for the previous word's EMIT (at a_{j-1} + d_{j-1} + 2 at
        # the earliest); a first word may wait for its inference's last stored word instead.
        assert schedule.ring_waits >= 3 * (n_words - 1)
    assert len([kind for *_, kind in emitted if kind == "emit"]) == 3 * n_words


@pytest.mark.parametrize("ring_words, cw_words, queue_words", [(1, 1, 2), (2, 2, None)])
def test_add_through_a_ring_smaller_than_an_inference(ring_words, cw_words, queue_words):
    """Op ADD (section 4.2, d = 2 a word) through a ring of R = 1 or 2 words on L = 8 lanes, a 3x3 map of
    CW = 1 or 2 words a pixel (E = 9 or 18 result words an inference), operand b stored first after a
    forwarded prefix, one passed word, three inferences under seeded random input gaps and o_flit.ready in
    :func:`bursty_ready` bursts: results and every transfer cycle, c_s and a_j against rule 4; words wait for slots."""
    lanes, height, width = 8, 3, 3
    rng = random.Random(f"add-ring-{ring_words}-{cw_words}")
    n_map = height * width * cw_words
    k_words, store, forward, offset_a, offset_b = two_operand_stream((n_map, n_map), "b-first", "prefix-gap")
    m_a, m_b, params, zp_out, _ = add_operands(rng, "random", cw_words, lanes)
    config = make_config(n_in_words=k_words, n_pass=1, op=OP_ADD, in_height=height, in_width=width,
                         words_per_pixel=cw_words, kernel_h=1, kernel_w=2, stride=1, out_row_begin=0,
                         out_rows=height, out_width=width, n_out=cw_words * lanes, operand_a_offset=offset_a,
                         operand_b_offset=offset_b, add_mult_a=m_a, add_mult_b=m_b, zp_out=zp_out, w_base=0,
                         act_base=20, store_begin=store[0], store_end=store[1], forward_begin=forward[0],
                         forward_end=forward[1])
    assert tile_config(config).result_words(lanes) == height * width * cw_words > ring_words
    inputs, emitted, schedule = run_two_operand_case(config, params, lanes, store[0], rng, n_inferences=3,
                                                     back_pressure=True, extremes=False, golden=golden_add,
                                                     queue_words=queue_words, ring_words=ring_words,
                                                     ready_bursts=True)
    assert schedule.ring_waits > 0
    results = [word for word, *_, kind in emitted if kind == "emit"]
    assert len(results) == 3 * height * width * cw_words
    assert len({value for word in results for value in word}) > 2 * lanes


# --- bands of output pixels: partial first and last rows (section 4.1) -------------------------------

#: Windowed tiles whose output pixels are a band (registers out_col_begin, out_col_end): (id, registers, n_pass,
#: forward, R, lanes). Every case runs three inferences through a result ring of R words, fewer than the
#: E = n_pix * W_px result words of an inference except for a one-pixel band (R * L >= n_out: R >= W_px = E).
BAND_CASES = [
    # 3 rows of a 5-wide map: row 1 from column 2, row 2 whole, row 3 up to column 2 (out_col_end = 3):
    # n_pix = 15 - 2 - 2 = 11; N_o = 5 on 4 lanes, W_px = 2 (a short last word).
    ("mac-conv3x3-rows3-cols2to3-R2", dict(op=OP_MAC, in_height=5, in_width=5, words_per_pixel=2, kernel_h=3,
                                           kernel_w=3, stride=1, pad_top=1, pad_left=1, pad_value=-4,
                                           out_row_begin=1, out_rows=3, out_width=5, out_col_begin=2,
                                           out_col_end=3, n_out=5, zp_out=-2), 1, 1, 2, 4),
    # One row, columns [1, 4) of 5 (the last row of a 3-row map: its windows reach the bottom padding).
    ("mac-single-row-1to4-R1", dict(op=OP_MAC, in_height=3, in_width=5, words_per_pixel=1, kernel_h=3, kernel_w=3,
                                    stride=1, pad_top=1, pad_left=1, pad_value=2, out_row_begin=2, out_rows=1,
                                    out_width=5, out_col_begin=1, out_col_end=4, n_out=4), 2, 0, 1, 4),
    # Two rows: row 2 from column 3, row 3 up to column 1 (4 pixels, the band ends before it begins).
    ("max3x3-rows2-cols3to2-R1-l8", dict(op=OP_MAX, in_height=5, in_width=5, words_per_pixel=1, kernel_h=3,
                                         kernel_w=3, stride=1, pad_top=1, pad_left=1, pad_value=-128,
                                         out_row_begin=2, out_rows=2, out_width=5, out_col_begin=3, out_col_end=2,
                                         n_out=8, clamp_lo=-100, clamp_hi=110), 0, 1, 1, 8),
    # A whole last row (out_col_end = 0) after a partial first one.
    ("max2x2-s2-begin1-whole-last-R2", dict(op=OP_MAX, in_height=4, in_width=6, words_per_pixel=2, kernel_h=2,
                                            kernel_w=2, stride=2, pad_top=0, pad_left=0, pad_value=-128,
                                            out_row_begin=0, out_rows=2, out_width=3, out_col_begin=1,
                                            out_col_end=0, n_out=8), 1, 0, 2, 4),
    # Depthwise 3x3 stride 2 (LANE), 3 rows of a 3-wide output: row 0 from column 1, row 2 up to column 1.
    ("lane3x3-s2-rows3-cols1to2-R2", dict(op=OP_LANE, in_height=5, in_width=5, words_per_pixel=2, kernel_h=3,
                                          kernel_w=3, stride=2, pad_top=1, pad_left=1, pad_value=-6,
                                          out_row_begin=0, out_rows=3, out_width=3, out_col_begin=1, out_col_end=2,
                                          n_out=8, zp_out=3), 2, 1, 2, 4),
    # LANE with a band of one pixel (row 1, column 1): both partial rows are the same row. Its E = CW = 2
    # words fit the ring (n_out = CW * L <= R * L): inference s + 1's words wait for inference s's EMITs.
    ("lane2x2-one-pixel-R2", dict(op=OP_LANE, in_height=3, in_width=4, words_per_pixel=2, kernel_h=2, kernel_w=2,
                                  stride=1, pad_top=0, pad_left=0, pad_value=0, out_row_begin=1, out_rows=1,
                                  out_width=3, out_col_begin=1, out_col_end=2, n_out=8, zp_out=-1), 1, 0, 2, 4),
    # A whole first row (out_col_begin = 0) and a last row of one pixel, on 8 lanes (N_o = 11: W_px = 2), a 1x2
    # kernel of stride 2 (3 x 3 output pixels).
    ("mac-s2-begin0-end1-R2-l8", dict(op=OP_MAC, in_height=5, in_width=5, words_per_pixel=1, kernel_h=1,
                                      kernel_w=2, stride=2, pad_top=0, pad_left=1, pad_value=-3, out_row_begin=1,
                                      out_rows=2, out_width=3, out_col_begin=0, out_col_end=1, n_out=11), 0, 0, 2, 8),
]


@pytest.mark.parametrize("registers, n_pass, forward, ring_words, lanes, queue_words", with_queue_depths(BAND_CASES))
def test_band_of_output_pixels_matches_golden_and_rule_4(registers, n_pass, forward, ring_words, lanes, queue_words):
    """Section 4.1's band of output pixels (partial first and last rows, one partial row, a single pixel) for
    MAC, MAX and LANE through a result ring of R = 1 or 2 words, three inferences under seeded random input
    gaps and o_flit.ready in :func:`bursty_ready` bursts: every output word and transfer cycle, every c_s and
    a_j against the golden models iterating TileConfig.output_pixel_positions; E = n_pix * W_px EMITs."""
    config, _, _, _, emitted, schedule = run_window_case(
        registers, n_pass, forward, True, 3, lanes, queue_words=queue_words, result_words_per_tile=ring_words,
        ready_bursts=True)
    positions = tile_config(config).output_pixel_positions()
    n_pix = len(positions)
    assert n_pix == tile_config(config).output_pixels < config["out_rows"] * config["out_width"]
    width, end = config["out_width"], config["out_col_end"] or config["out_width"]
    assert positions[0] == (config["out_row_begin"], config["out_col_begin"])
    assert positions[-1] == (config["out_row_begin"] + config["out_rows"] - 1, end - 1)
    assert end < width or config["out_col_begin"] > 0
    n_words = tile_config(config).result_words(lanes)
    assert n_words == n_pix * len(tile_config(config).result_word_issue_cycles(lanes))
    assert n_words > ring_words or n_pix == 1
    assert tile_config(config).compute_issue_cycles == n_pix * sum(tile_config(config).result_word_issue_cycles(lanes))
    assert len([kind for *_, kind in emitted if kind == "emit"]) == 3 * n_words
    assert schedule.ring_waits > 0 or n_words <= ring_words


def test_band_golden_is_the_whole_rows_golden_at_the_band_pixels():
    """The band goldens (windowed ops: the loop over output_pixel_positions; ADD and CONCAT: band_pixels)
    give, pixel for pixel, the whole rows' results at the band's pixels: a band changes which pixels a tile
    computes, never a pixel's window."""
    rng = random.Random(61)
    lanes = 4
    for op, n_out in ((OP_MAC, 6), (OP_MAX, 8), (OP_LANE, 8)):
        registers = dict(op=op, in_height=4, in_width=5, words_per_pixel=2, kernel_h=3, kernel_w=2, stride=1,
                         pad_top=1, pad_left=1, pad_value=-5, out_row_begin=1, out_rows=3, out_width=5, n_out=n_out)
        whole = make_config(n_in_words=40, w_base=0, **registers)
        sram = {a: [rng.randint(-128, 127) for _ in range(lanes)] for a in range(tile_config(whole).weight_words)}
        params = [(rng.randint(-999, 999), rng.randint(1 << 30, (1 << 31) - 1), 36) for _ in range(n_out)]
        activations = [[rng.randint(-128, 127) for _ in range(lanes)] for _ in range(40)]
        words = golden_window(whole, sram, params, activations, lanes)
        w_px = len(words) // 15
        for begin, end in ((2, 3), (0, 1), (4, 0), (3, 4)):
            band = dict(whole, out_col_begin=begin, out_col_end=end)
            indexes = [(oy - 1) * 5 + ox for oy, ox in tile_config(band).output_pixel_positions()]
            assert len(indexes) == tile_config(band).output_pixels == 15 - begin - (5 - (end or 5))
            assert golden_window(band, sram, params, activations, lanes) == \
                [words[q * w_px + w] for q in indexes for w in range(w_px)]
    for op, golden in ((OP_ADD, golden_add), (OP_CONCAT, golden_concat)):
        whole = make_config(n_in_words=60, op=op, in_height=3, in_width=4, words_per_pixel=2, concat_words_a=1,
                            kernel_h=1, kernel_w=2 if op == OP_ADD else 1, out_row_begin=1, out_rows=2, out_width=4,
                            n_out=8, operand_a_offset=0, operand_b_offset=30, add_mult_a=rng.randint(0, ADD_MULT_MAX),
                            add_mult_b=rng.randint(0, ADD_MULT_MAX))
        params = [(rng.randint(-999, 999), rng.randint(1 << 30, (1 << 31) - 1), 52) for _ in range(8)]
        stored = [[rng.randint(-128, 127) for _ in range(lanes)] for _ in range(60)]
        words = golden(whole, params, stored, lanes)
        band = dict(whole, out_col_begin=3, out_col_end=2)      # (1, 3), (2, 0), (2, 1)
        assert tile_config(band).output_pixel_positions() == [(1, 3), (2, 0), (2, 1)]
        assert golden(band, params, stored, lanes) == [words[q * 2 + w] for q in (3, 4, 5) for w in range(2)]


def test_band_compute_iterates_n_pix_pixels():
    """Never stalled, with a ring that never fills: COMPUTE lasts I + 2 = n_pix * N_o * K_w + 2 cycles for
    the n_pix = 3 + 5 + 1 = 9 pixels of a band over 3 rows of 5 (not 15 pixels), back to back; the first EMIT
    follows result word 0 (d_0 = N_o * K_w issues from the cycle after the last RECV) by 2 cycles."""
    registers = dict(op=OP_MAC, in_height=3, in_width=5, words_per_pixel=1, kernel_h=3, kernel_w=3, stride=1,
                     pad_top=1, pad_left=1, pad_value=1, out_row_begin=0, out_rows=3, out_width=5, out_col_begin=2,
                     out_col_end=1, n_out=3)
    config, _, _, _, emitted, schedule = run_window_case(registers, 0, 0, False, 3, 4, queue_words=None)
    n_pix, issue_cycles = 9, 9 * 3 * 9
    assert tile_config(config).output_pixels == n_pix and tile_config(config).compute_issue_cycles == issue_cycles
    k_words = 15
    assert schedule.compute == [k_words, k_words + issue_cycles + 2, k_words + 2 * (issue_cycles + 2)]
    assert schedule.words == [schedule.compute[s] + 27 * q for s in range(3) for q in range(n_pix)]
    emits = [t for *_, t, kind in emitted if kind == "emit"]
    assert emits == [a + 27 + 2 for a in schedule.words] and schedule.ring_waits == 0


#: op ADD and CONCAT with a band of pixels: (id, op, in_height, in_width, CWa, CWb (ADD: CW, CW), out_row_begin,
#: out_rows, out_col_begin, out_col_end, R, lanes, n_pass).
TWO_OPERAND_BAND_CASES = [
    ("add-rows3-cols2to1-R2", OP_ADD, 4, 3, 2, 2, 1, 3, 2, 1, 2, 4, 1),
    ("add-single-row-1to3-R1-l8", OP_ADD, 3, 4, 1, 1, 0, 1, 1, 3, 1, 8, 0),
    ("concat-rows2-begin2-whole-last-R3", OP_CONCAT, 3, 3, 1, 2, 0, 2, 2, 0, 3, 4, 2),
]


@pytest.mark.parametrize("op, height, width, words_a, words_b, row_begin, out_rows, col_begin, col_end, ring_words, "
                         "lanes, n_pass, queue_words", with_queue_depths(TWO_OPERAND_BAND_CASES))
def test_two_operand_band_matches_golden_and_rule_4(op, height, width, words_a, words_b, row_begin, out_rows,
                                                    col_begin, col_end, ring_words, lanes, n_pass, queue_words):
    """ADD (section 4.2) and CONCAT (section 4.3) over a band of output pixels with partial rows, through a
    result ring of R = 1 or 2 words, three inferences under seeded input gaps and o_flit.ready bursts, operand
    b stored first after a forwarded prefix: results and every transfer cycle, c_s and a_j against rule 4."""
    rng = random.Random(f"band-{op}-{height}-{width}-{row_begin}-{out_rows}-{col_begin}-{col_end}-{lanes}")
    pixels = height * width
    if op == OP_ADD:
        cw_words = words_a
        sizes = (pixels * cw_words,) * 2
        m_a, m_b, params, zp_out, _ = add_operands(rng, "random", cw_words, lanes)
        kernel_w, golden = 2, golden_add
    else:
        cw_words = words_a + words_b
        sizes = (pixels * words_a, pixels * words_b)
        m_a, m_b, params, zp_out, _ = concat_operands(rng, "random", words_a, words_b, lanes)
        kernel_w, golden = 1, golden_concat
    k_words, store, forward, offset_a, offset_b = two_operand_stream(sizes, "b-first", "prefix-gap")
    config = make_config(n_in_words=k_words, n_pass=n_pass, op=op, in_height=height, in_width=width,
                         words_per_pixel=cw_words, concat_words_a=words_a, kernel_h=1, kernel_w=kernel_w, stride=1,
                         out_row_begin=row_begin, out_rows=out_rows, out_width=width, out_col_begin=col_begin,
                         out_col_end=col_end, n_out=cw_words * lanes, operand_a_offset=offset_a,
                         operand_b_offset=offset_b, add_mult_a=m_a, add_mult_b=m_b, zp_out=zp_out, w_base=0,
                         act_base=20, store_begin=store[0], store_end=store[1], forward_begin=forward[0],
                         forward_end=forward[1])
    n_pix = tile_config(config).output_pixels
    assert n_pix < out_rows * width and tile_config(config).result_words(lanes) == n_pix * cw_words > ring_words
    _, emitted, schedule = run_two_operand_case(config, params, lanes, store[0], rng, n_inferences=3,
                                                back_pressure=True, extremes=False, golden=golden,
                                                queue_words=queue_words, ring_words=ring_words, ready_bursts=True)
    assert schedule.ring_waits > 0
    results = [word for word, *_, kind in emitted if kind == "emit"]
    assert len(results) == 3 * n_pix * cw_words
    assert len({value for word in results for value in word}) > 2 * lanes


#: Output-channel group tiles (section 4.4) over a band of pixels: (id, registers, n_pass, forward, R, lanes).
GROUP_BAND_CASES = [
    # 3 rows of 5 (a 1x2 kernel, pad_left 1): row 0 from column 3, row 2 up to column 0: n_pix = 15 - 3 - 4 =
    # 8; N_o = 6 on 4 lanes (W_px = 2, d = 8 and 4), 2 passed words before each pixel's own and 1 bulk one.
    ("mac-rows3-cols3to1-R2", dict(op=OP_MAC, in_height=3, in_width=4, words_per_pixel=1, kernel_h=1, kernel_w=2,
                                   stride=1, pad_top=0, pad_left=1, pad_value=-2, out_row_begin=0, out_rows=3,
                                   out_width=5, out_col_begin=3, out_col_end=1, n_out=6, zp_out=1,
                                   pass_per_pixel=2), 8 * 2 + 1, 1, 2, 4),
    # 2 rows of 3: row 1 from column 2, row 2 up to column 1 (n_pix = 3), one passed word a pixel, no bulk.
    ("max-rows2-cols2to2-R1-l8", dict(op=OP_MAX, in_height=4, in_width=4, words_per_pixel=1, kernel_h=2, kernel_w=2,
                                      stride=1, pad_top=0, pad_left=0, pad_value=-128, out_row_begin=1, out_rows=2,
                                      out_width=3, out_col_begin=2, out_col_end=2, n_out=8,
                                      pass_per_pixel=1), 3, 0, 1, 8),
    # One row [1, 3) of 4, a LANE layer, 3 passed words a pixel and 2 bulk.
    ("lane-single-row-1to3-R1", dict(op=OP_LANE, in_height=2, in_width=4, words_per_pixel=1, kernel_h=2,
                                     kernel_w=3, stride=1, pad_top=1, pad_left=1, pad_value=5, out_row_begin=1,
                                     out_rows=1, out_width=4, out_col_begin=1, out_col_end=3, n_out=4,
                                     pass_per_pixel=3), 2 * 3 + 2, 1, 1, 4),
]


@pytest.mark.parametrize("registers, n_pass, forward, ring_words, lanes, queue_words",
                         with_queue_depths(GROUP_BAND_CASES))
def test_output_channel_group_over_a_band_interleaves_per_band_pixel(registers, n_pass, forward, ring_words, lanes,
                                                                     queue_words):
    """Section 4.4's interleaving over section 4.1's pixel list: n_pix * pass_per_pixel interleaved pops (n_pix
    of the band, not out_rows * out_width), pass_per_pixel of them before each band pixel's W_px EMITs, through
    a ring of R = 1 or 2 words, three inferences under seeded input gaps and o_flit.ready bursts: every word
    and transfer cycle, c_s and a_j against the golden models, and the interleaving by content."""
    config, _, _, inputs, emitted, schedule = run_window_case(
        registers, n_pass, forward, True, 3, lanes, queue_words=queue_words, result_words_per_tile=ring_words,
        ready_bursts=True)
    n_pix = tile_config(config).output_pixels
    whole_rows = config["out_rows"] * config["out_width"]
    assert n_pix * config["pass_per_pixel"] <= n_pass < whole_rows * config["pass_per_pixel"]
    assert tile_config(config).result_words(lanes) > ring_words and schedule.ring_waits > 0
    check_interleaving(config, n_pass, inputs, emitted, 3, lanes)


#: Configs encode_config rejects for their band (section 4.1), loaded into the PE anyway: (id, registers).
INVALID_BANDS = [
    ("begin-at-width", dict(out_rows=2, out_width=3, out_col_begin=3)),
    ("begin-beyond-width", dict(out_rows=1, out_width=3, out_col_begin=200, out_col_end=2)),
    ("end-beyond-width", dict(out_rows=2, out_width=3, out_col_end=4)),
    ("one-row-empty", dict(out_rows=1, out_width=3, out_col_begin=2, out_col_end=2)),
    ("one-row-reversed", dict(out_rows=1, out_width=3, out_col_begin=2, out_col_end=1)),
]


@pytest.mark.parametrize("registers", [pytest.param(registers, id=name) for name, registers in INVALID_BANDS])
def test_invalid_band_that_reaches_the_pe_makes_it_a_pass_through_tile(registers):
    """A computing MAC tile (with section 4.4's pass_per_pixel) whose band encode_config rejects, loaded
    unchecked: the PE neither hangs nor issues; it behaves as the same tile with n_out = 0 (every RECV word
    forwarded, every passed word popped, no COMPUTE, no EMIT), checked transfer by transfer."""
    rng = random.Random("invalid-band-" + repr(sorted(registers.items())))
    window = dict(in_height=3, in_width=3, words_per_pixel=1, kernel_h=3, kernel_w=3, stride=1, pad_top=1,
                  pad_left=1, out_row_begin=0)
    loaded = config_with_queue(make_config(n_in_words=9, forward=1, n_out=2, n_pass=6, pass_per_pixel=1, w_base=0,
                                    act_base=30, **window, **registers), ARCH)
    with pytest.raises(LoadEncodingError, match="out_col_begin|out_col_end"):
        encode_config(ARCH, loaded)
    weights = [[rng.randint(-128, 127) for _ in range(ARCH.lanes)] for _ in range(tile_config(loaded).weight_words)]
    params = [(rng.randint(-99, 99), 1 << 30, 36) for _ in range(2)]
    inputs = [[rng.randint(-128, 127) for _ in range(ARCH.lanes)] for _ in range(3 * 15)]
    available, ready = random_stalls(rng, len(inputs), 400)
    expected = dict(loaded, n_out=0, pass_per_pixel=0)
    emitted, schedule = check_run(expected, weights, params, inputs, available, ready, loaded=loaded,
                                  sram={a: w for a, w in enumerate(weights)})
    assert schedule.compute == [] and [kind for *_, kind in emitted] == ["forward"] * 3 * 15


# --- channel groups of the per-word ops MAX, LANE and ADD (section 4.4: group_word_begin, group_words) ------

#: MAX and LANE tiles that compute a channel group: (id, registers, n_pass, forward, back pressure, lanes, average).
#: A group after the first interleaves the words of the groups before it: pass_per_pixel = group_word_begin
#: passed words before each pixel's N_g own ones (n_pass = n_pix * pass_per_pixel + the bulk words).
CHANNEL_GROUP_WINDOW_CASES = [
    # Word 1 of 3 (a middle group of one word), rows 1..2 of a 4x4 map, one bulk passed word.
    ("max3x3-p1-word1of3", dict(op=OP_MAX, in_height=4, in_width=4, words_per_pixel=3, kernel_h=3, kernel_w=3,
                                stride=1, pad_top=1, pad_left=1, pad_value=-128, out_row_begin=1, out_rows=2,
                                out_width=4, n_out=4, clamp_lo=-90, clamp_hi=100, group_word_begin=1,
                                group_words=1, pass_per_pixel=1), 8 * 1 + 1, 1, True, 4, False),
    # The first group, words 0..1 of 3 (nothing before it to interleave), no stalls: timing spelled out.
    ("max2x2-s2-words0to1of3-l8", dict(op=OP_MAX, in_height=4, in_width=4, words_per_pixel=3, kernel_h=2,
                                       kernel_w=2, stride=2, pad_top=0, pad_left=0, pad_value=-128, out_row_begin=0,
                                       out_rows=2, out_width=2, n_out=16, group_word_begin=0, group_words=2),
     0, 0, False, 8, False),
    # The last group, words 1..2 of 3, of a depthwise 3x3 over a band (row 0 from column 1, row 2 up to column 2:
    # n_pix = 10), 2 bulk passed words.
    ("lane3x3-p1-words1to2of3-band", dict(op=OP_LANE, in_height=3, in_width=4, words_per_pixel=3, kernel_h=3,
                                          kernel_w=3, stride=1, pad_top=1, pad_left=1, pad_value=4, out_row_begin=0,
                                          out_rows=3, out_width=4, out_col_begin=1, out_col_end=3, n_out=8, zp_out=-3,
                                          group_word_begin=1, group_words=2, pass_per_pixel=1), 10 * 1 + 2, 0, True,
     4, False),
    # An average pool's group, word 2 of 4, on 8 lanes: two earlier words a pixel, no bulk, the stream forwarded.
    ("avgpool2x2-s2-word2of4-l8", dict(op=OP_LANE, in_height=4, in_width=4, words_per_pixel=4, kernel_h=2,
                                       kernel_w=2, stride=2, pad_top=0, pad_left=0, pad_value=0, out_row_begin=0,
                                       out_rows=2, out_width=2, n_out=8, zp_out=1, group_word_begin=2, group_words=1,
                                       pass_per_pixel=2), 4 * 2, 1, True, 8, True),
]


@pytest.mark.parametrize("registers, n_pass, forward, back_pressure, lanes, average, queue_words",
                         with_queue_depths(CHANNEL_GROUP_WINDOW_CASES))
def test_channel_group_of_max_and_lane_matches_golden_and_rule_4(registers, n_pass, forward, back_pressure, lanes,
                                                                 average, queue_words):
    """Section 4.4's channel groups of MAX and LANE, three inferences: the tile issues the N_g words of its group a
    pixel (I = n_pix * N_g * KH*KW), reads channel words group_word_begin + cw, the group-local weights and
    parameter rows, and emits N_g result words a pixel after the pass_per_pixel words of the groups before it:
    every word and transfer cycle, c_s and a_j against the golden models (golden_window, as the emulator), and the
    interleaving by content."""
    n_inferences = 3
    config, weights, params, inputs, emitted, _ = run_window_case(
        registers, n_pass, forward, back_pressure, n_inferences, lanes, queue_words=queue_words, average=average,
        result_words_per_tile=LANE_RESULT_WORDS)
    counts = tile_config(config)
    n_pix, group_words, window = counts.output_pixels, counts.computed_words, config["kernel_h"] * config["kernel_w"]
    assert group_words == config["group_words"] < config["words_per_pixel"] and config["n_out"] == group_words * lanes
    assert counts.compute_issue_cycles == n_pix * group_words * window
    assert len(weights) == (group_words * window if config["op"] == OP_LANE else 0)
    results = [word for word, *_, kind in emitted if kind == "emit"]
    assert len(results) == n_inferences * n_pix * group_words
    if config["pass_per_pixel"]:
        check_interleaving(config, n_pass, inputs, emitted, n_inferences, lanes)
    # The group's words are not the map's first words: reading words 0.. instead would show.
    per_inference = config["n_in_words"] + n_pass
    stored = [stored_part(config, inputs[s * per_inference:][:config["n_in_words"]]) for s in range(n_inferences)]
    sram = {config["w_base"] + a: w for a, w in enumerate(weights)}
    if config["group_word_begin"]:
        shifted = dict(config, group_word_begin=0)
        assert results != [word for words in stored for word in golden_window(shifted, sram, params, words, lanes)]


#: ADD tiles that compute a channel group: (id, in_height, in_width, words_per_pixel, group_word_begin, group_words,
#: out_row_begin, out_rows, order, stream, mode, bulk passed words, back pressure, lanes); pass_per_pixel =
#: group_word_begin. ``order``, ``stream``: :func:`two_operand_stream`; ``mode``: :func:`add_operands`.
CHANNEL_GROUP_ADD_CASES = [
    ("add-word1of3", 3, 2, 3, 1, 1, 0, 3, "a-first", "joined", "random", 1, True, 4),
    ("add-words1to2of3-band-l8", 4, 2, 3, 1, 2, 1, 2, "b-first", "prefix-gap", "scales", 0, False, 8),
    ("add-words0to1of3", 2, 3, 3, 0, 2, 0, 2, "b-first", "prefix-gap", "random", 2, True, 4),
]


@pytest.mark.parametrize("height, width, cw_words, first_word, group_words, row_begin, out_rows, order, stream, mode, "
                         "bulk, back_pressure, lanes, queue_words", with_queue_depths(CHANNEL_GROUP_ADD_CASES))
def test_channel_group_of_add_matches_golden_and_rule_4(height, width, cw_words, first_word, group_words, row_begin,
                                                        out_rows, order, stream, mode, bulk, back_pressure, lanes,
                                                        queue_words):
    """Section 4.4's channel groups of ADD, three inferences: issue (pixel p, cw, kx) reads word operand_{a,b}_offset
    + p*CW + group_word_begin + cw (cw < N_g), parameter rows cw*L + l, result word q*N_g + cw, after the
    pass_per_pixel words of the groups before it: every word and transfer cycle against golden_add (as the
    emulator) and rule 4, and the interleaving by content."""
    rng = random.Random(f"add-group-{height}-{width}-{cw_words}-{first_word}-{group_words}-{order}-{stream}-{lanes}")
    n_map = height * width * cw_words
    k_words, store, forward, offset_a, offset_b = two_operand_stream((n_map, n_map), order, stream)
    m_a, m_b, params, zp_out, _ = add_operands(rng, mode, group_words, lanes)
    n_pix = out_rows * width
    config = make_config(n_in_words=k_words, n_pass=n_pix * first_word + bulk, op=OP_ADD, in_height=height,
                         in_width=width, words_per_pixel=cw_words, kernel_h=1, kernel_w=2, stride=1,
                         out_row_begin=row_begin, out_rows=out_rows, out_width=width, n_out=group_words * lanes,
                         operand_a_offset=offset_a, operand_b_offset=offset_b, add_mult_a=m_a, add_mult_b=m_b,
                         zp_out=zp_out, w_base=0, act_base=20, store_begin=store[0], store_end=store[1],
                         forward_begin=forward[0], forward_end=forward[1], group_word_begin=first_word,
                         group_words=group_words, pass_per_pixel=first_word)
    assert tile_config(config).compute_issue_cycles == n_pix * group_words * 2
    n_inferences = 3
    inputs, emitted, _ = run_two_operand_case(config, params, lanes, store[0], rng, n_inferences=n_inferences,
                                              queue_words=queue_words, back_pressure=back_pressure, extremes=False,
                                              golden=golden_add)
    results = [word for word, *_, kind in emitted if kind == "emit"]
    assert len(results) == n_inferences * n_pix * group_words
    assert len({value for word in results for value in word}) > 2 * lanes
    if first_word:
        check_interleaving(config, config["n_pass"], inputs, emitted, n_inferences, lanes)
        per_inference = k_words + config["n_pass"]
        stored = [inputs[s * per_inference:][store[0]:store[1]] for s in range(n_inferences)]
        shifted = dict(config, group_word_begin=0)
        assert results != [word for words in stored for word in golden_add(shifted, params, words, lanes)]


def split_into_groups(config, sram, params, groups, lanes):
    """Section 4.4's channel groups of a MAX, LANE or ADD tile ``config`` (no group) computing all CW words:
    one (config, sram, params) per group ``(group_word_begin, group_words)``, each holding only its group's
    weights (LANE: weight words [begin*KH*KW, (begin + N_g)*KH*KW) moved to w_base) and parameter rows
    [begin*L, (begin + N_g)*L), with pass_per_pixel = group_word_begin."""
    window = config["kernel_h"] * config["kernel_w"]
    tiles = []
    for first_word, group_words in groups:
        group = dict(config, group_word_begin=first_word, group_words=group_words, n_out=group_words * lanes,
                     pass_per_pixel=first_word)
        group_sram = {config["w_base"] + a: sram[config["w_base"] + first_word * window + a]
                      for a in range(group_words * window)} if config["op"] == OP_LANE else {}
        tiles.append((group, group_sram, params[first_word * lanes:(first_word + group_words) * lanes]))
    return tiles


def emulator_results(config, sram, params, stored, arch):
    """The emulator's result words of one inference (emulator.functional.pe_results) of a tile loaded with
    ``sram`` {addr: lanes} and ``params``, the stored words ``stored``."""
    from emulator.functional import pe_results
    from emulator.path import tile_counts
    from flowtile.program import TileProgram

    image = np.zeros((arch.sram_words, arch.lanes), dtype=np.int8)
    for address, word in sram.items():
        image[address] = word
    tile = TileProgram(row=0, col=0, config=tile_config(config), sram=image,
                       params=np.array(params, dtype=np.int64).reshape(-1, 3))
    words = pe_results(tile, tile_counts(tile, arch), np.array([stored], dtype=np.int8), arch)
    return words[0].tolist()


@pytest.mark.parametrize("op", [OP_MAX, OP_LANE, OP_ADD])
def test_channel_groups_compose_to_the_whole_layer_and_match_the_emulator(op):
    """The goldens of the channel groups of a layer (CW = 4 words split 1 + 2 + 1), interleaved pixel by pixel as
    section 4.4's chain does (each group after the words of the groups before it), are the golden of the tile that
    computes all words; and each group's golden is the emulator's (emulator/functional.py) bit for bit."""
    rng = random.Random(f"group-compose-{op}")
    lanes, cw_words, groups = 4, 4, [(0, 1), (1, 2), (3, 1)]
    arch = WINDOW_ARCH.replace(lanes=lanes, sram_bytes=1024 * lanes)
    if op == OP_ADD:
        height, width = 3, 2
        n_map = height * width * cw_words
        config = make_config(n_in_words=2 * n_map + 1, op=OP_ADD, in_height=height, in_width=width,
                             words_per_pixel=cw_words, kernel_h=1, kernel_w=2, stride=1, out_row_begin=1, out_rows=2,
                             out_width=width, out_col_begin=1, n_out=cw_words * lanes, operand_a_offset=n_map + 1,
                             operand_b_offset=0, add_mult_a=rng.randint(0, ADD_MULT_MAX),
                             add_mult_b=rng.randint(0, ADD_MULT_MAX), act_base=0, zp_out=-2)
        golden = lambda c, sram, p, stored: golden_add(c, p, stored, lanes)  # noqa: E731
        params = [(rng.randint(-999, 999), rng.randint(1 << 30, (1 << 31) - 1), rng.randint(50, 54))
                  for _ in range(cw_words * lanes)]
    else:
        config = make_config(n_in_words=4 * 4 * cw_words, op=op, in_height=4, in_width=4, words_per_pixel=cw_words,
                             kernel_h=3, kernel_w=3, stride=2, pad_top=1, pad_left=1,
                             pad_value=-128 if op == OP_MAX else 3, out_row_begin=0, out_rows=2, out_width=2,
                             out_col_end=1, n_out=cw_words * lanes, w_base=2, zp_out=1)
        golden = lambda c, sram, p, stored: golden_window(c, sram, p, stored, lanes)  # noqa: E731
        params = ([(0, 0, 0)] * (cw_words * lanes) if op == OP_MAX else
                  [(rng.randint(-3000, 3000), rng.randint(1 << 30, (1 << 31) - 1), rng.randint(34, 38))
                   for _ in range(cw_words * lanes)])
    config["act_base"] = config["w_base"] + tile_config(config).weight_words + 1
    sram = {config["w_base"] + a: [rng.randint(-128, 127) for _ in range(lanes)]
            for a in range(tile_config(config).weight_words)}
    stored = [[rng.randint(-128, 127) for _ in range(lanes)] for _ in range(tile_config(config).stored_words)]
    whole = golden(config, sram, params, stored)
    n_pix = tile_config(config).output_pixels
    assert whole == emulator_results(config, sram, params, stored, arch)
    per_group = []
    for group, group_sram, group_params in split_into_groups(config, sram, params, groups, lanes):
        assert encode_config(arch, config_with_queue(dict(group, n_pass=n_pix * group["pass_per_pixel"]), arch))
        words = golden(group, group_sram, group_params, stored)
        assert len(words) == n_pix * group["group_words"]
        assert words == emulator_results(group, group_sram, group_params, stored, arch)
        per_group.append(words)
    interleaved = [word for q in range(n_pix) for (first_word, group_words), words in zip(groups, per_group)
                   for word in words[q * group_words:(q + 1) * group_words]]
    assert interleaved == whole
    assert len({value for word in whole for value in word}) > 2 * lanes


def test_mac_and_concat_ignore_the_channel_group_registers():
    """MAC and CONCAT do not read group_word_begin and group_words (encode_config rejects non-zero values for
    them): loaded anyway, the tiles compute exactly what they compute without them (a MAC convolution of 2 words
    a pixel, a CONCAT of 2 + 1 words a pixel), every word and transfer cycle against the goldens and rule 4."""
    unread = {"group_word_begin": 1, "group_words": 1}
    registers = dict(op=OP_MAC, in_height=3, in_width=3, words_per_pixel=2, kernel_h=2, kernel_w=2, stride=1,
                     pad_top=0, pad_left=1, pad_value=-5, out_row_begin=0, out_rows=2, out_width=3, n_out=5, zp_out=2)
    with pytest.raises(LoadEncodingError, match="must be 0 for op = OP_MAC"):
        encode_config(WINDOW_ARCH, make_config(n_in_words=18, **registers, **unread))
    run_window_case(registers, 0, 1, True, 2, 4, queue_words=None, unread=unread)

    rng = random.Random("concat-unread-group")
    lanes, height, width, words_a, words_b = 4, 2, 2, 2, 1
    k_words, store, forward, offset_a, offset_b = two_operand_stream((4 * words_a, 4 * words_b), "a-first", "joined")
    m_a, m_b, params, zp_out, _ = concat_operands(rng, "random", words_a, words_b, lanes)
    config = make_config(n_in_words=k_words, op=OP_CONCAT, in_height=height, in_width=width,
                         words_per_pixel=words_a + words_b, concat_words_a=words_a, kernel_h=1, kernel_w=1, stride=1,
                         out_row_begin=0, out_rows=height, out_width=width, n_out=(words_a + words_b) * lanes,
                         operand_a_offset=offset_a, operand_b_offset=offset_b, add_mult_a=m_a, add_mult_b=m_b,
                         zp_out=zp_out, w_base=0, act_base=20, store_begin=store[0], store_end=store[1],
                         forward_begin=forward[0], forward_end=forward[1])
    with pytest.raises(LoadEncodingError, match="must be 0 for op = OP_CONCAT"):
        encode_config(WINDOW_ARCH, dict(config, **unread))
    run_two_operand_case(config, params, lanes, store[0], rng, n_inferences=2, back_pressure=True, extremes=False,
                         golden=golden_concat, queue_words=None, unread=unread)


# --- validation ----------------------------------------------------------------------------------

def add_config(**overrides):
    """A valid ADD of two 2x2 maps (CW = 1) stored back to back, one output row, for the validation cases."""
    registers = dict(n_in_words=8, n_out=4, op=OP_ADD, in_height=2, in_width=2, words_per_pixel=1, kernel_h=1,
                     kernel_w=2, out_rows=1, out_width=2, operand_a_offset=0, operand_b_offset=4, add_mult_a=3,
                     add_mult_b=ADD_MULT_MAX)
    registers.update(overrides)
    return make_config(**registers)


def concat_config(**overrides):
    """A valid CONCAT of a 3x1 map of CWa = 2 words a pixel (6 words) and one of CWb = 1 (3 words), b stored
    first, then a gap word, then a; one output row, for the validation cases."""
    registers = dict(n_in_words=10, n_out=12, op=OP_CONCAT, in_height=3, in_width=1, words_per_pixel=3,
                     concat_words_a=2, kernel_h=1, kernel_w=1, out_row_begin=2, out_rows=1, out_width=1,
                     operand_a_offset=4, operand_b_offset=0, add_mult_a=ADD_MULT_MAX, add_mult_b=5)
    registers.update(overrides)
    return make_config(**registers)


def test_valid_add_concat_and_stream_configs_encode():
    def encodes(config):
        """encode_config of ``config`` with a forward queue in the SRAM behind its weights and banks if it queues
        words (section 4: a tile that forwards or passes words needs one)."""
        return encode_config(ARCH, config_with_queue(config, ARCH))

    assert len(encodes(add_config())) == len(CONFIG_FIELDS)
    assert len(encodes(add_config(n_in_words=11, store_begin=2, store_end=10, forward_begin=10,
                                  forward_end=11, operand_b_offset=4, out_row_begin=1))) == len(CONFIG_FIELDS)
    # Operand b may come first, with a gap; ADD does not read concat_words_a.
    assert encodes(add_config(n_in_words=9, operand_a_offset=5, operand_b_offset=0, concat_words_a=9))
    assert encodes(concat_config())
    assert encodes(concat_config(operand_a_offset=0, operand_b_offset=6, n_in_words=9))
    # A pass-through tile may forward part of its RECV words and store none.
    assert encodes(make_config(n_in_words=5, forward_begin=1, forward_end=5))
    # Section 4.4: n_pix * pass_per_pixel may use up all of n_pass (no bulk passed words), for any op.
    assert encodes(window_config(out_width=2, pass_per_pixel=2, n_pass=4))
    assert encodes(add_config(pass_per_pixel=3, n_pass=6))
    # Section 4.1's bands of pixels: n_pix (here 3 of the 2 x 2 pixels) bounds the interleaved passed words; a
    # single row [1, 2); an empty first row part is impossible (out_col_begin < out_width), a whole last row
    # (out_col_end = 0 or out_width) is fine.
    assert encodes(window_config(out_rows=2, out_width=2, out_col_begin=1, pass_per_pixel=2, n_pass=6,
                                 act_base=20))
    assert encodes(window_config(out_width=2, out_col_begin=1, out_col_end=2))
    assert encodes(add_config(out_rows=2, out_col_begin=1, out_col_end=1, pass_per_pixel=1, n_pass=2))
    assert encodes(concat_config(out_row_begin=1, out_rows=2, out_col_begin=0, out_col_end=1))
    # A tile that does not compute does not read the band registers.
    assert encodes(make_config(n_in_words=2, forward_end=2, out_col_begin=9, out_col_end=200))
    # Registers an op does not read are only checked against their width (as the emulator does).
    assert encodes(make_config(n_in_words=2, n_out=1, add_mult_a=(1 << 23) - 1, operand_a_offset=9,
                               operand_b_offset=1, concat_words_a=7))
    # Results stream out through the ring (section 4): more result words an inference than its R = 3 words
    # (program format 5 rejected these) encode.
    assert ARCH.result_words == 3
    assert encodes(window_config(out_rows=2, out_width=2, act_base=20))     # 4 result words
    assert encodes(add_config(out_rows=2))                                  # 4
    assert encodes(concat_config(out_row_begin=1, out_rows=2))              # 6
    # Section 4.4's channel groups of MAX, LANE and ADD: any words [group_word_begin, + group_words) of a pixel,
    # n_out = group_words * lanes, LANE's weights KH*KW*group_words words; group_words = 0 means all the words.
    assert encodes(window_config(op=OP_MAX, n_in_words=12, words_per_pixel=3, n_out=4,
                                 group_word_begin=2, group_words=1, pass_per_pixel=2, n_pass=2))
    assert encodes(window_config(op=OP_LANE, n_in_words=12, words_per_pixel=3, n_out=8,
                                 group_word_begin=1, group_words=2, w_base=46, act_base=20))
    assert encodes(window_config(op=OP_LANE, n_in_words=8, words_per_pixel=2, n_out=8, group_words=2))
    assert encodes(add_config(n_in_words=24, words_per_pixel=3, operand_b_offset=12, n_out=4,
                              group_word_begin=2, group_words=1, pass_per_pixel=2, n_pass=4))
    # A tile that does not compute does not read the group registers either.
    assert encodes(make_config(n_in_words=2, forward_end=2, group_word_begin=9, group_words=9))
    # Section 4: the forward queue may be any region apart from the weights and the banks (here between them, or
    # reaching the SRAM's last word); a tile that queues nothing may have one.
    dense = make_config(n_in_words=4, n_out=1, forward=1, w_base=0, act_base=20)
    assert encode_config(ARCH, dict(dense, queue_base=4, queue_words=16))
    assert encode_config(ARCH, dict(dense, queue_base=28, queue_words=36))
    assert encode_config(ARCH, dict(dense, forward_end=0, queue_base=63, queue_words=1))
    assert config_with_queue(dense, ARCH) == dict(dense, queue_base=28, queue_words=36)


def window_config(**overrides):
    """A valid 3x3 convolution on a 2x2 map (one result word), for the validation cases."""
    registers = dict(n_in_words=4, n_out=2, in_height=2, in_width=2, words_per_pixel=1, kernel_h=3, kernel_w=3,
                     stride=1, pad_top=1, pad_left=1, out_rows=1, out_width=1)
    registers.update(overrides)
    return make_config(**registers)


def test_zero_parameter_row_of_a_max_pool_tile_encodes():
    """Section 4.1: a max-pooling tile's table holds n_out zero rows; only that row may have shift 0."""
    assert encode_param_entry(0, 0, 0) == 0
    with pytest.raises(LoadEncodingError, match="'shift' = 0 is out of range 1..62"):
        encode_param_entry(1, 0, 0)


@pytest.mark.parametrize("call, message", [
    (lambda: PE("arch", 0), "parameter 'arch' must be a flowtile.arch.Arch"),
    (lambda: PE(ARCH, 2), "parameter 'tile_index' = 2 is outside 0..1"),
    (lambda: PE(ARCH, True), "parameter 'tile_index' must be an integer"),
    (lambda: encode_config(ARCH, make_config(n_out=1)), "n_out = 1 requires n_in_words > 0"),
    (lambda: encode_config(ARCH, make_config(n_in_words=1, n_out=13)), "exceeds max_tile_outputs = 12"),
    (lambda: encode_config(ARCH, make_config(n_in_words=1, act_base=63)),
     r"act_base \+ 2 \* \(store_end - store_begin\) = 65 exceed sram_words = 64 \(2 activation banks "
     r"of the stored words\)"),
    (lambda: encode_config(ARCH, make_config(zp_out=256)), "zp_out' = 256 is out of range -256..255"),
    (lambda: encode_config(ARCH, make_config(dest_host=0, dest_col=2)), "dest_col = 2 outside 0..1"),
    # Section 4: the forward queue, a region of the SRAM, needed by a tile that forwards or passes words.
    (lambda: encode_config(ARCH, make_config(n_in_words=5, forward_begin=1, forward_end=5)),
     r"config register queue_words = 0, but the tile forwards and passes forward_end - forward_begin \+ n_pass = 4 "
     r"words per inference through its forward queue \(queue_words >= 1 needed; section 4\)"),
    (lambda: encode_config(ARCH, make_config(n_pass=2, queue_base=60, queue_words=5)),
     r"config registers queue_base \+ queue_words = 60 \+ 5 = 65 exceed sram_words = 64"),
    (lambda: encode_config(ARCH, make_config(n_in_words=4, n_out=1, forward=1, w_base=0, act_base=20, queue_base=27,
                                             queue_words=4)),
     r"config registers queue_base = 27, queue_words = 4: the forward queue \[27, 31\) overlaps \[act_base, "
     r"act_base \+ 2 \* \(store_end - store_begin\)\) = \[20, 28\) \(section 4\)"),
    (lambda: encode_config(ARCH, make_config(n_in_words=4, n_out=1, forward=1, w_base=0, act_base=20, queue_base=3,
                                             queue_words=17)),
     r"the forward queue \[3, 20\) overlaps \[w_base, w_base \+ the weight words\) = \[0, 4\)"),
    (lambda: encode_config(ARCH, make_config(n_pass=1, queue_words=1 << 17)),
     "config register queue_words' = 131072 is out of range 0..131071"),
    (lambda: encode_config(ARCH, {"n_in_words": 1}), "config is missing register"),
    (lambda: encode_config(ARCH, window_config(kernel_h=0)), "config register kernel_h = 0 must be 1..255"),
    (lambda: encode_config(ARCH, window_config(kernel_w=256)), "kernel_w' = 256 is out of range 0..255"),
    (lambda: encode_config(ARCH, window_config(op=8)), "config register op' = 8 is out of range 0..7"),
    (lambda: encode_config(ARCH, window_config(op=6)),
     r"config register op = 6 is not an op \(known: 0 \(OP_MAC\), 1 \(OP_MAX\), 2 \(OP_LANE\), 3 \(OP_ADD\), "
     r"4 \(OP_CONCAT\), 5 \(OP_BCAST\)\)"),
    (lambda: encode_config(ARCH, window_config(op=OP_BCAST, group_words=1, n_out=2)),
     r"config register in_channels = 0 must be in 1..words_per_pixel \* lanes = \d+ for op = OP_BCAST"),
    (lambda: encode_config(ARCH, window_config(op=OP_BCAST, in_channels=1, group_words=1, n_out=3)),
     r"config registers n_out = 3, group_words = 1: op = OP_BCAST computes group_words >= 1 result words a pixel, "
     r"n_out = group_words \* lanes = 4"),
    (lambda: encode_config(ARCH, window_config(in_channels=2)),
     r"config register in_channels = 2 must be 0 for op = OP_MAC"),
    (lambda: encode_config(ARCH, window_config(op=OP_LANE)),
     "n_out = 2 must be words_per_pixel \\* lanes = 4 for op = OP_LANE"),
    (lambda: encode_config(ARCH, window_config(op=OP_LANE, n_out=4, w_base=60)),
     "w_base \\+ kernel_h \\* kernel_w \\* words_per_pixel = 69 exceed sram_words = 64"),
    (lambda: encode_config(ARCH, window_config(stride=0)), "config register stride = 0 must be 1..3"),
    (lambda: encode_config(ARCH, window_config(words_per_pixel=0)), "words_per_pixel = 0 must be >= 1"),
    (lambda: encode_config(ARCH, window_config(out_rows=0)), "config register out_rows = 0 must be >= 1"),
    (lambda: encode_config(ARCH, window_config(in_width=3)),
     r"store_end - store_begin = 4 stored words differ from in_height \* in_width \* words_per_pixel = "
     r"2 \* 3 \* 1 = 6"),
    (lambda: encode_config(ARCH, window_config(op=OP_MAX)),
     "n_out = 2 must be words_per_pixel \\* lanes = 4 for op = OP_MAX"),
    (lambda: encode_config(ARCH, window_config(n_out=3, w_base=40)),
     "w_base \\+ n_out \\* kernel_h \\* kernel_w \\* words_per_pixel = 67 exceed sram_words = 64"),
    (lambda: encode_config(ARCH, make_config(bogus=1)), "unknown register"),
    # Section 4.2: RECV ranges, op ADD.
    (lambda: encode_config(ARCH, make_config(n_in_words=4, store_end=5)),
     "store_begin = 0, store_end = 5 must satisfy store_begin <= store_end <= n_in_words = 4"),
    (lambda: encode_config(ARCH, make_config(n_in_words=4, store_begin=3, store_end=2)),
     "store_begin = 3, store_end = 2 must satisfy store_begin <= store_end <= n_in_words = 4"),
    (lambda: encode_config(ARCH, make_config(n_in_words=4, forward_begin=1, forward_end=6)),
     "forward_begin = 1, forward_end = 6 must satisfy forward_begin <= forward_end <= n_in_words = 4"),
    (lambda: encode_config(ARCH, make_config(store_end=1)),
     "store_begin = 0, store_end = 1 must satisfy store_begin <= store_end <= n_in_words = 0"),
    (lambda: encode_config(ARCH, make_config(n_in_words=4, n_out=2, store_begin=1)),
     r"store_end - store_begin = 3 stored words differ from in_height \* in_width \* words_per_pixel = "
     r"1 \* 1 \* 4 = 4"),
    (lambda: encode_config(ARCH, make_config(n_in_words=40, store_begin=7, store_end=40)),
     r"act_base \+ 2 \* \(store_end - store_begin\) = 66 exceed sram_words = 64"),
    (lambda: encode_config(ARCH, add_config(kernel_w=3)),
     "config register kernel_w = 3 must be 2 for op = OP_ADD \\(kernel 1x2, stride 1, no padding\\)"),
    (lambda: encode_config(ARCH, add_config(kernel_h=2)), "config register kernel_h = 2 must be 1 for op = OP_ADD"),
    (lambda: encode_config(ARCH, add_config(stride=2)), "config register stride = 2 must be 1 for op = OP_ADD"),
    (lambda: encode_config(ARCH, add_config(pad_left=1)), "config register pad_left = 1 must be 0 for op = OP_ADD"),
    (lambda: encode_config(ARCH, add_config(operand_b_offset=3)),
     r"config registers operand_a_offset = 0 and operand_b_offset = 3 make the operands overlap \(a: stored "
     r"words 0..3, b: 3..6\); they must be disjoint for op = OP_ADD"),
    (lambda: encode_config(ARCH, add_config(operand_a_offset=2, operand_b_offset=0)),
     r"operand_a_offset = 2 and operand_b_offset = 0 make the operands overlap \(a: stored words 2..5, b: 0..3\)"),
    (lambda: encode_config(ARCH, add_config(operand_a_offset=4, operand_b_offset=4)),
     r"operand_a_offset = 4 and operand_b_offset = 4 make the operands overlap"),
    (lambda: encode_config(ARCH, add_config(operand_b_offset=5)),
     r"config registers operand_b_offset \+ in_height \* in_width \* words_per_pixel = 5 \+ 2 \* 2 \* 1 = 9 "
     r"exceed the 8 stored words \(store_end - store_begin\) for op = OP_ADD \(operand b must lie inside them\)"),
    (lambda: encode_config(ARCH, add_config(operand_a_offset=5, operand_b_offset=0)),
     r"config registers operand_a_offset \+ in_height \* in_width \* words_per_pixel = 5 \+ 2 \* 2 \* 1 = 9 "
     r"exceed the 8 stored words"),
    (lambda: encode_config(ARCH, add_config(store_begin=1)), "= 8 exceed the 7 stored words"),
    (lambda: encode_config(ARCH, add_config(add_mult_a=ADD_MULT_MAX + 1)),
     "config register add_mult_a = 4194305 exceeds ADD_MULT_MAX = 4194304 for op = OP_ADD"),
    (lambda: encode_config(ARCH, add_config(add_mult_b=ADD_MULT_MAX + 7)),
     "config register add_mult_b = 4194311 exceeds ADD_MULT_MAX = 4194304 for op = OP_ADD"),
    (lambda: encode_config(ARCH, make_config(add_mult_b=1 << 23)),
     "config register add_mult_b' = 8388608 is out of range 0..8388607"),
    (lambda: encode_config(ARCH, add_config(out_width=1)),
     "config register out_width = 1 must equal in_width = 2 for op = OP_ADD"),
    (lambda: encode_config(ARCH, add_config(out_row_begin=1, out_rows=2)),
     "config registers out_row_begin \\+ out_rows = 3 exceed in_height = 2 for op = OP_ADD"),
    (lambda: encode_config(ARCH, add_config(n_out=2)),
     "n_out = 2 must be words_per_pixel \\* lanes = 4 for op = OP_ADD"),
    (lambda: encode_config(ARCH, add_config(w_base=65)), "config register w_base = 65 exceeds sram_words = 64"),
    # Section 4.3: op CONCAT.
    (lambda: encode_config(ARCH, concat_config(kernel_w=2)),
     "config register kernel_w = 2 must be 1 for op = OP_CONCAT \\(kernel 1x1, stride 1, no padding\\)"),
    (lambda: encode_config(ARCH, concat_config(kernel_h=3)), "config register kernel_h = 3 must be 1 for op = OP_CONCAT"),
    (lambda: encode_config(ARCH, concat_config(stride=3)), "config register stride = 3 must be 1 for op = OP_CONCAT"),
    (lambda: encode_config(ARCH, concat_config(pad_top=1)), "config register pad_top = 1 must be 0 for op = OP_CONCAT"),
    (lambda: encode_config(ARCH, concat_config(concat_words_a=0)),
     r"config register concat_words_a = 0 must be in 1..words_per_pixel - 1 = 2 for op = OP_CONCAT"),
    (lambda: encode_config(ARCH, concat_config(concat_words_a=3)),
     r"config register concat_words_a = 3 must be in 1..words_per_pixel - 1 = 2 for op = OP_CONCAT"),
    (lambda: encode_config(ARCH, concat_config(words_per_pixel=1, n_out=4, concat_words_a=1)),
     r"config register concat_words_a = 1 must be in 1..words_per_pixel - 1 = 0 for op = OP_CONCAT"),
    (lambda: encode_config(ARCH, concat_config(operand_a_offset=5)),
     r"config registers operand_a_offset \+ in_height \* in_width \* concat_words_a = 5 \+ 3 \* 1 \* 2 = 11 "
     r"exceed the 10 stored words \(store_end - store_begin\) for op = OP_CONCAT \(operand a must lie inside them\)"),
    (lambda: encode_config(ARCH, concat_config(operand_a_offset=0, operand_b_offset=8)),
     r"config registers operand_b_offset \+ in_height \* in_width \* \(words_per_pixel - concat_words_a\) = "
     r"8 \+ 3 \* 1 \* \(3 - 2\) = 11 exceed the 10 stored words"),
    (lambda: encode_config(ARCH, concat_config(operand_a_offset=2)),
     r"config registers operand_a_offset = 2 and operand_b_offset = 0 make the operands overlap \(a: stored "
     r"words 2..7, b: 0..2\); they must be disjoint for op = OP_CONCAT"),
    (lambda: encode_config(ARCH, concat_config(operand_a_offset=0, operand_b_offset=5)),
     r"operand_a_offset = 0 and operand_b_offset = 5 make the operands overlap \(a: stored words 0..5, b: 5..7\)"),
    (lambda: encode_config(ARCH, concat_config(add_mult_a=ADD_MULT_MAX + 1)),
     "config register add_mult_a = 4194305 exceeds ADD_MULT_MAX = 4194304 for op = OP_CONCAT"),
    (lambda: encode_config(ARCH, concat_config(add_mult_b=ADD_MULT_MAX + 2)),
     "config register add_mult_b = 4194306 exceeds ADD_MULT_MAX = 4194304 for op = OP_CONCAT"),
    (lambda: encode_config(ARCH, concat_config(out_width=2)),
     "config register out_width = 2 must equal in_width = 1 for op = OP_CONCAT"),
    (lambda: encode_config(ARCH, concat_config(out_row_begin=3)),
     "config registers out_row_begin \\+ out_rows = 4 exceed in_height = 3 for op = OP_CONCAT"),
    (lambda: encode_config(ARCH, concat_config(n_out=8)),
     "n_out = 8 must be words_per_pixel \\* lanes = 12 for op = OP_CONCAT"),
    (lambda: encode_config(ARCH, concat_config(w_base=70)), "config register w_base = 70 exceeds sram_words = 64"),
    # Section 4.4: pass_per_pixel needs a computing tile and n_pix * pass_per_pixel <= n_pass.
    (lambda: encode_config(ARCH, make_config(n_in_words=2, n_pass=3, pass_per_pixel=1)),
     r"config register pass_per_pixel = 1 requires a computing tile \(n_out > 0; section 4.4\)"),
    (lambda: encode_config(ARCH, window_config(pass_per_pixel=3, n_pass=2)),
     r"config registers n_pix \* pass_per_pixel = 1 \* 3 = 3 interleaved passed words exceed n_pass = 2 "
     r"\(n_pix = out_rows \* out_width - out_col_begin - \(out_width - E'\) = 1 \* 1 - 0 - \(1 - 1\) = 1 with "
     r"E' = out_width \(out_col_end = 0\); section 4.4\)"),
    (lambda: encode_config(ARCH, window_config(out_width=2, pass_per_pixel=2, n_pass=3)),
     r"n_pix \* pass_per_pixel = 2 \* 2 = 4 interleaved passed words exceed n_pass = 3"),
    # ... n_pix of a band of pixels (section 4.1): 2 rows of 2 from column 1 hold 3 pixels.
    (lambda: encode_config(ARCH, window_config(out_rows=2, out_width=2, out_col_begin=1, pass_per_pixel=2,
                                               n_pass=5, act_base=20)),
     r"config registers n_pix \* pass_per_pixel = 3 \* 2 = 6 interleaved passed words exceed n_pass = 5 "
     r"\(n_pix = out_rows \* out_width - out_col_begin - \(out_width - E'\) = 2 \* 2 - 1 - \(2 - 2\) = 3"),
    # Section 4.1: a band of output pixels.
    (lambda: encode_config(ARCH, window_config(out_width=2, out_col_begin=2)),
     r"config register out_col_begin = 2 must be < out_width = 2 \(section 4.1: the first output row starts at "
     r"column out_col_begin\)"),
    (lambda: encode_config(ARCH, add_config(out_col_begin=7)),
     "config register out_col_begin = 7 must be < out_width = 2"),
    (lambda: encode_config(ARCH, window_config(out_rows=2, out_width=2, out_col_end=3, act_base=20)),
     r"config register out_col_end = 3 must be <= out_width = 2 \(section 4.1: the last output row ends before "
     r"column out_col_end; 0 means out_width\)"),
    (lambda: encode_config(ARCH, concat_config(out_col_end=2)),
     "config register out_col_end = 2 must be <= out_width = 1"),
    (lambda: encode_config(ARCH, window_config(out_width=2, out_col_begin=1, out_col_end=1)),
     r"config registers out_col_begin = 1, out_col_end = 1 leave no output pixel: n_pix = out_rows \* out_width - "
     r"out_col_begin - \(out_width - E'\) = 1 \* 2 - 1 - \(2 - 1\) = 0 with E' = out_col_end = 1 must be >= 1 "
     r"\(section 4.1\)"),
    (lambda: encode_config(ARCH, window_config(n_in_words=6, in_width=3, out_width=3, out_col_begin=2, out_col_end=1)),
     r"out_col_begin = 2, out_col_end = 1 leave no output pixel: n_pix = .* = 1 \* 3 - 2 - \(3 - 1\) = -1 "),
    (lambda: encode_config(ARCH, window_config(pass_per_pixel=1 << 16, n_pass=5)),
     "config register pass_per_pixel' = 65536 is out of range 0..65535"),
    # Section 4.4: channel groups of MAX, LANE and ADD only, inside a pixel's words, n_out = group_words * lanes.
    (lambda: encode_config(ARCH, window_config(group_words=1)),
     r"config registers group_word_begin = 0, group_words = 1 must be 0 for op = OP_MAC \(channel groups of MAX, "
     r"LANE and ADD only; section 4.4\)"),
    (lambda: encode_config(ARCH, window_config(n_in_words=8, words_per_pixel=2, group_word_begin=1)),
     r"config registers group_word_begin = 1, group_words = 0 must be 0 for op = OP_MAC"),
    (lambda: encode_config(ARCH, concat_config(group_word_begin=1, group_words=1)),
     r"config registers group_word_begin = 1, group_words = 1 must be 0 for op = OP_CONCAT \(channel groups of "
     r"MAX, LANE and ADD only; section 4.4\)"),
    (lambda: encode_config(ARCH, window_config(op=OP_MAX, n_in_words=8, words_per_pixel=2, n_out=4,
                                               group_word_begin=1, group_words=2)),
     r"config registers group_word_begin \+ group_words = 1 \+ 2 exceed words_per_pixel = 2 \(section 4.4\)"),
    # group_words = 0 means all words_per_pixel: then group_word_begin must be 0.
    (lambda: encode_config(ARCH, window_config(op=OP_LANE, n_in_words=8, words_per_pixel=2, n_out=8,
                                               group_word_begin=1)),
     r"config registers group_word_begin \+ group_words = 1 \+ 2 exceed words_per_pixel = 2 \(section 4.4\)"),
    (lambda: encode_config(ARCH, add_config(n_in_words=16, words_per_pixel=2, operand_b_offset=8, n_out=4,
                                            group_word_begin=2, group_words=1)),
     r"config registers group_word_begin \+ group_words = 2 \+ 1 exceed words_per_pixel = 2 \(section 4.4\)"),
    (lambda: encode_config(ARCH, window_config(op=OP_LANE, n_in_words=8, words_per_pixel=2, n_out=8,
                                               group_words=1)),
     r"config register n_out = 8 must be group_words \* lanes = 4 for op = OP_LANE"),
    (lambda: encode_config(ARCH, add_config(n_in_words=24, words_per_pixel=3, operand_b_offset=12, n_out=12,
                                            group_word_begin=1, group_words=2)),
     r"config register n_out = 12 must be group_words \* lanes = 8 for op = OP_ADD"),
    (lambda: encode_config(ARCH, window_config(op=OP_LANE, n_in_words=8, words_per_pixel=2, n_out=4,
                                               group_word_begin=1, group_words=1, w_base=56, act_base=20)),
     r"config registers w_base \+ kernel_h \* kernel_w \* group_words = 65 exceed sram_words = 64"),
    (lambda: encode_config(ARCH, window_config(group_words=1 << 16)),
     "config register group_words' = 65536 is out of range 0..65535"),
    (lambda: encode_param_entry(0, 1 << 31, 1), "'multiplier' = 2147483648 is out of range"),
    (lambda: encode_param_entry(0, 1, 0), "'shift' = 0 is out of range 1..62"),
    (lambda: encode_param_entry(1 << 31, 1, 1), "'bias' = 2147483648 is out of range"),
])
def test_parameter_and_config_validation(call, message):
    with pytest.raises((TypeError, ValueError, LoadEncodingError), match=message):
        call()
