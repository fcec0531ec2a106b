"""PE (docs/architecture.md section 4) in Amaranth's simulator: arithmetic against a golden function,
and the cycle of every input and output transfer against timing rule 4 of section 6."""
import random

import pytest
from amaranth.sim import Simulator

from flowtile.arch import CONFIG_FIELDS, Arch
from hdl.layouts import (LOAD_TARGET_CONFIG, LOAD_TARGET_PARAMS, LOAD_TARGET_SRAM, LoadEncodingError,
                         encode_config, encode_param_entry, pack_lanes, unpack_lanes)
from hdl.pe import PE

pytestmark = [pytest.mark.filterwarnings("ignore:.*created but never used"),
              pytest.mark.usefixtures("collect_unused_components")]


ARCH = Arch(rows=1, cols=2, lanes=4, sram_bytes=256, max_tile_outputs=12, router_fifo_depth=2)
TILE = 1          # the PE under test; loads for tile 0 must not reach it
DEST = {"dest_row": 0, "dest_col": 0, "dest_host": 1}


def make_config(**overrides):
    config = {name: 0 for name, _, _ in CONFIG_FIELDS}
    config.update(clamp_lo=-128, clamp_hi=127, **DEST)
    config.update(overrides)
    return config


# --- golden models ---------------------------------------------------------------------------------

def wrap32(value):
    return ((value + (1 << 31)) % (1 << 32)) - (1 << 31)


def golden_outputs(weights, activations, params, config):
    """y_o of section 4 on exact Python integers; weights [N_o*K][L], activations [K][L]."""
    k_words, n_out = config["n_in_words"], config["n_out"]
    result = []
    for o in range(n_out):
        bias, multiplier, shift = params[o]
        acc = bias + sum(w * a for k in range(k_words)
                         for w, a in zip(weights[o * k_words + k], activations[k]))
        acc = wrap32(acc)
        y = ((acc * multiplier + (1 << (shift - 1))) >> shift) + config["zp_out"]
        result.append(min(max(y, config["clamp_lo"]), config["clamp_hi"]))
    return result


def golden_result_words(outputs, lanes):
    words = []
    for j in range(-(-len(outputs) // lanes)):
        chunk = outputs[j * lanes:(j + 1) * lanes]
        words.append(chunk + [0] * (lanes - len(chunk)))
    return words


def golden_schedule(config, lanes, n_inferences, available, ready):
    """Rule 4: t_j = max(lb_j, t_{j-1} + d_j), with lb_j the first cycle at which the action's
    input flit is offered (testbench arrival time) and, if it emits, the output is ready."""
    k_words, n_pass, n_out = config["n_in_words"], config["n_pass"], config["n_out"]
    n_result = -(-n_out // lanes)
    actions = []   # (kind, emits, first transfer after COMPUTE)
    for _ in range(n_inferences):
        actions += [("recv", bool(config["forward"]), False)] * k_words
        after_compute = [("pass", True, False)] * n_pass + [("emit", True, False)] * (n_result if n_out else 0)
        if n_out and after_compute:
            after_compute[0] = after_compute[0][:2] + (True,)
        actions += after_compute
    times, previous, read_index = [], -1, 0
    for kind, emits, first_after_compute in actions:
        t = previous + (n_out * k_words + 3 if first_after_compute else 1)
        if kind != "emit":
            t = max(t, available[read_index])
            read_index += 1
        while emits and not ready[t]:
            t += 1
        times.append((kind, t))
        previous = t
    return times


# --- simulation ------------------------------------------------------------------------------------

def simulate(config, sram, params, inputs, available, ready, *, mid_run_hold=None):
    """Load ``config`` / ``sram`` {addr: lanes} / ``params`` into tile TILE, then run with run = 1
    from cycle 0. Input flit i is offered from cycle available[i] until accepted; o_flit.ready
    follows ``ready``. Returns ([accept cycle], [(lanes, dest, cycle)])."""
    dut = PE(ARCH, TILE)
    accepted, emitted = [], []
    total_outputs = len(golden_schedule(config, ARCH.lanes, len(inputs) // max(1, config["n_in_words"] + config["n_pass"]),
                                        available, ready))

    async def load(ctx, tile, target, addr, data):
        ctx.set(dut.load.valid, 1)
        ctx.set(dut.load.payload, {"tile": tile, "target": target, "addr": addr, "data": data})
        await ctx.tick()
        ctx.set(dut.load.valid, 0)

    async def testbench(ctx):
        for addr, data in encode_config(ARCH, config):
            await load(ctx, TILE, LOAD_TARGET_CONFIG, addr, data)
        for addr, lanes in sram.items():
            await load(ctx, TILE, LOAD_TARGET_SRAM, addr, pack_lanes(lanes, ARCH.lanes))
        for row, entry in enumerate(params):
            await load(ctx, TILE, LOAD_TARGET_PARAMS, row, encode_param_entry(*entry))
        # Writes addressed to the other tile must be ignored.
        await load(ctx, 1 - TILE, LOAD_TARGET_CONFIG, 0, 0)
        await load(ctx, 1 - TILE, LOAD_TARGET_PARAMS, 0, encode_param_entry(7, 7, 7))
        ctx.set(dut.run, 1)
        cycle = 0
        while len(accepted) + sum(1 for *_, kind in emitted if kind == "emit") < total_outputs or \
                len(accepted) < len(inputs):
            assert cycle < len(ready) - 1, "PE stopped"
            offering = len(accepted) < len(inputs) and available[len(accepted)] <= cycle
            ctx.set(dut.i_flit.valid, offering)
            if offering:
                ctx.set(dut.i_flit.payload, {"data": pack_lanes(inputs[len(accepted)], ARCH.lanes),
                                             "dest_row": 0, "dest_col": 1, "dest_host": 0})
            ctx.set(dut.o_flit.ready, ready[cycle])
            took = ctx.get(dut.i_flit.valid) and ctx.get(dut.i_flit.ready)
            out_valid = ctx.get(dut.o_flit.valid)
            if out_valid and ready[cycle]:
                payload = ctx.get(dut.o_flit.payload)
                emitted.append((unpack_lanes(int(payload.data), ARCH.lanes),
                                (int(payload.dest_row), int(payload.dest_col), int(payload.dest_host)),
                                cycle, "forward" if took else "emit"))
            if took:
                accepted.append(cycle)
            await ctx.tick()
            cycle += 1

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    return accepted, emitted


def dense_case(rng, k_words, n_out, lanes):
    weights = [[rng.randint(-128, 127) for _ in range(lanes)] for _ in range(n_out * k_words)]
    params = [(rng.randint(-5000, 5000), rng.randint(1 << 30, (1 << 31) - 1), rng.randint(36, 42))
              for _ in range(n_out)]
    return weights, params


def check_run(config, weights, params, inputs, available, ready):
    """Run the PE and compare every transfer (content and cycle) with the golden models."""
    k_words, n_pass = config["n_in_words"], config["n_pass"]
    per_inference = k_words + n_pass
    n_inferences = len(inputs) // per_inference
    sram = {config["w_base"] + a: w for a, w in enumerate(weights)}
    accepted, emitted = simulate(config, sram, params, inputs, available, ready)
    schedule = golden_schedule(config, ARCH.lanes, n_inferences, available, ready)

    assert accepted == [t for kind, t in schedule if kind != "emit"]
    expected_out = []
    for i in range(n_inferences):
        flits = inputs[i * per_inference:(i + 1) * per_inference]
        if config["forward"]:
            expected_out += flits[:k_words]
        expected_out += flits[k_words:]
        if config["n_out"]:
            expected_out += golden_result_words(
                golden_outputs(weights, flits[:k_words], params, config), ARCH.lanes)
    dest = (config["dest_row"], config["dest_col"], config["dest_host"])
    assert [lanes for lanes, *_ in emitted] == expected_out
    assert all(d == dest for _, d, *_ in emitted)
    assert [t for _, _, t, _ in emitted] == [t for kind, t in schedule
                                            if kind in ("emit", "pass") or config["forward"]]
    return emitted


# --- tests -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("forward, back_pressure", [(1, False), (1, True), (0, True)])
def test_transfer_cycles_follow_rule_4(forward, back_pressure):
    rng = random.Random(7 + forward + 2 * back_pressure)
    k_words, n_pass, n_out, n_inferences = 3, 2, 6, 3
    config = make_config(n_in_words=k_words, forward=forward, n_pass=n_pass, n_out=n_out,
                         w_base=4, act_base=40, zp_out=-3)
    weights, params = dense_case(rng, k_words, n_out, ARCH.lanes)
    inputs = [[rng.randint(-128, 127) for _ in range(ARCH.lanes)] for _ in range((k_words + n_pass) * n_inferences)]
    horizon = 400
    if back_pressure:
        available, cycle = [], 0
        for _ in inputs:
            cycle += rng.choice([0, 0, 1, 4])
            available.append(cycle)
        ready = [rng.random() < 0.6 for _ in range(horizon)]
    else:
        available, ready = [0] * len(inputs), [True] * horizon
    emitted = check_run(config, weights, params, inputs, available, ready)
    if not back_pressure:
        # Spelled out for inference 0: RECV at 0,1,2, COMPUTE 3..3+N_o*K+1, PASS twice, EMIT next.
        first_emit = 2 + n_out * k_words + 3 + n_pass
        emit_cycles = [t for _, _, t, kind in emitted if kind == "emit"][:2]
        assert emit_cycles == [first_emit, first_emit + 1]


@pytest.mark.parametrize("relu", [False, True])
def test_arithmetic_edge_cases(relu):
    lanes, k_words = ARCH.lanes, 2
    rng = random.Random(99)
    zero = [0] * lanes
    zp_out = 3
    # (weights of chunk 0, weights of chunk 1, bias, multiplier, shift): one output per row.
    rows = [
        (zero, zero, 3, 1, 1),                        # +1.5 rounds half up to 2
        (zero, zero, -3, 1, 1),                       # -1.5 rounds half toward +inf to -1
        (zero, zero, -6, 1, 2),                       # -1.5 again with shift 2
        (zero, zero, 5, 1, 2),                        # 1.25 -> 1
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
    emitted = check_run(config, weights, params, inputs, [0] * len(inputs), [True] * 200)

    first = golden_outputs(weights, inputs[:2], params, config)
    lo = config["clamp_lo"]
    assert first[:4] == [max(lo, v + zp_out) for v in (2, -1, -1, 1)]
    assert wrap32((1 << 31) - 1 + lanes * (127 * 127 + 128 * 128)) < 0 and first[4] == config["clamp_lo"]
    assert first[5] == max(lo, 1 + zp_out) and first[6] == 127
    assert first[7] == (zp_out if relu else -128)
    last_word = emitted[-1][0]
    assert last_word[n_out % lanes:] == [0] * (lanes - n_out % lanes)


def test_pass_only_tile_passes_from_cycle_0_and_idle_tile_never_accepts():
    config = make_config(n_pass=2)
    inputs = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]]
    emitted = check_run(config, [], [], inputs, [0] * 4, [True] * 50)
    assert [t for _, _, t, _ in emitted] == [0, 1, 2, 3]


def test_run_low_holds_the_initial_phase_clears_counters_and_blocks_loads_while_running():
    """A flit accepted before run drops is forgotten: after run rises again RECV restarts at word 0.
    A config load issued while run = 1 is ignored (the destination stays)."""
    k_words, n_out = 2, 3
    rng = random.Random(5)
    config = make_config(n_in_words=k_words, n_out=n_out, w_base=0, act_base=30)
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
    assert [(lanes, host) for lanes, host, _ in log["emitted"]] == [(word, 1) for word in expected]
    assert log["emitted"][0][2] == 5 + n_out * k_words + 3


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


@pytest.mark.parametrize("call, message", [
    (lambda: PE("arch", 0), "parameter 'arch' must be a flowtile.arch.Arch"),
    (lambda: PE(ARCH, 2), "parameter 'tile_index' = 2 is outside 0..1"),
    (lambda: PE(ARCH, True), "parameter 'tile_index' must be an integer"),
    (lambda: encode_config(ARCH, make_config(n_out=1)), "n_out = 1 requires n_in_words > 0"),
    (lambda: encode_config(ARCH, make_config(n_in_words=1, n_out=13)), "exceeds max_tile_outputs = 12"),
    (lambda: encode_config(ARCH, make_config(n_in_words=1, act_base=64)), "exceed sram_words = 64"),
    (lambda: encode_config(ARCH, make_config(forward=2)), "config register forward' = 2 is out of range 0..1"),
    (lambda: encode_config(ARCH, make_config(zp_out=256)), "zp_out' = 256 is out of range -256..255"),
    (lambda: encode_config(ARCH, make_config(dest_host=0, dest_col=2)), "dest_col = 2 outside 0..1"),
    (lambda: encode_config(ARCH, {"n_in_words": 1}), "config is missing register"),
    (lambda: encode_config(ARCH, make_config(bogus=1)), "unknown register"),
    (lambda: encode_param_entry(0, 1 << 31, 1), "'multiplier' = 2147483648 is out of range"),
    (lambda: encode_param_entry(0, 1, 0), "'shift' = 0 is out of range 1..62"),
    (lambda: encode_param_entry(1 << 31, 1, 1), "'bias' = 2147483648 is out of range"),
])
def test_parameter_and_config_validation(call, message):
    with pytest.raises((TypeError, ValueError, LoadEncodingError), match=message):
        call()
