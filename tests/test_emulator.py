"""The emulator against (1) a naive cycle-stepping simulator written here from docs/architecture.md
sections 3-6, flit by flit and cycle by cycle, (2) a plain numpy golden of dense layers, and (3) its
error reporting on programs it cannot run."""
from __future__ import annotations

import copy
from collections import deque

import numpy as np
import pytest

from emulator import EmulatorError, emulate
from emulator.functional import run_functional
from emulator.timing import PROBE_BATCH, solve_timing
from flowtile.arch import Arch
from flowtile.host import pack_flits
from program_builder import Dense, build_program, dense_golden

PORT_ORDER = ("L", "N", "E", "S", "W")
STEP = {"N": (-1, 0), "E": (0, 1), "S": (1, 0), "W": (0, -1)}
OPPOSITE = {"N": "S", "S": "N", "E": "W", "W": "E"}


# --- (1) the reference: every FIFO, router and PE stepped every cycle ----------------------------

class ReferencePE:
    """The phase FSM of section 4 (RECV, COMPUTE, PASS, EMIT), one cycle at a time, with a
    plain-Python SRAM and arithmetic."""

    def __init__(self, tile, arch):
        config = tile.config
        self.config, self.arch, self.lanes = config, arch, arch.lanes
        self.k, self.forward = config["n_in_words"], bool(config["forward"])
        self.n_out = config["n_out"]
        self.dest = (config["dest_row"], config["dest_col"], config["dest_host"])
        self.sram = [[0] * arch.lanes for _ in range(arch.sram_words)]
        for address, word in enumerate(tile.sram.tolist()):
            self.sram[address] = word
        self.params = tile.params.tolist()
        compute = self.n_out * self.k + 2 if self.n_out else 0
        phases = [("RECV", self.k), ("COMPUTE", compute), ("PASS", config["n_pass"]),
                  ("EMIT", -(-self.n_out // arch.lanes))]
        self.phases = [p for p in phases if p[1] > 0]
        self.phase, self.count, self.phase_start = 0, 0, 0
        self.results: list[list[int]] = []
        self.spans: list[tuple[int, int, str]] = []
        self.action_times: list[int] = []

    @property
    def idle(self):
        return not self.phases

    @property
    def name(self):
        return self.phases[self.phase][0] if self.phases else "IDLE"

    def compute(self):
        config, lanes, k = self.config, self.lanes, self.k
        results = []
        for o in range(self.n_out):
            bias, multiplier, shift = self.params[o]
            acc = bias
            for chunk in range(k):
                weight = self.sram[config["w_base"] + o * k + chunk]
                activation = self.sram[config["act_base"] + chunk]
                acc += sum(w * a for w, a in zip(weight, activation))
            acc = (acc + 2**31) % 2**32 - 2**31
            y = ((acc * multiplier + (1 << (shift - 1))) >> shift) + config["zp_out"]
            results.append(min(max(y, config["clamp_lo"]), config["clamp_hi"]))
        results += [0] * (-len(results) % lanes)
        self.results = [results[i:i + lanes] for i in range(0, len(results), lanes)]

    def advance(self, cycle):
        """Count one transfer (or COMPUTE cycle) done in ``cycle``; move on after the phase's last."""
        self.count += 1
        if self.count == self.phases[self.phase][1]:
            self.spans.append((self.phase_start, cycle + 1, self.name))
            self.phase_start, self.count = cycle + 1, 0
            self.phase = (self.phase + 1) % len(self.phases)
            if self.name == "COMPUTE":
                self.compute()


def reference_run(program, in_flits, batch, max_cycles=200_000):
    """Step the whole mesh cycle by cycle. Returns (out_flits, out_times, in_times, PEs by chain position)."""
    arch = program.arch
    depth, lanes = arch.router_fifo_depth, arch.lanes
    tiles = {(t.row, t.col): t for t in program.tiles}
    fifos = {(pos, port): deque() for pos in tiles for port in PORT_ORDER}
    pointers = {(pos, port): 0 for pos in tiles for port in PORT_ORDER}
    pes = {pos: ReferencePE(tiles[pos], arch) for pos in tiles}
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
        if len(out_flits) == expected:
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
        # PE handshakes
        pe_in_ready, pe_out_fire = {}, {}
        for pos, pe in pes.items():
            if pe.idle:
                pe_in_ready[pos], pe_out_fire[pos] = False, False
                continue
            space = writable[(pos, "L")]
            in_valid = (pos, "L") in grants
            phase = pe.name
            if phase == "RECV":
                pe_in_ready[pos] = space if pe.forward else True
                out_valid = in_valid and pe.forward
            elif phase == "PASS":
                pe_in_ready[pos], out_valid = space, in_valid
            else:
                pe_in_ready[pos], out_valid = False, phase == "EMIT"
            pe_out_fire[pos] = out_valid and space
        # router transfers (decided on start-of-cycle state, applied afterwards)
        pushes, to_pe = [], {}
        for (pos, out), granted in grants.items():
            if out == "L":
                ready = pe_in_ready[pos]
            elif pos == arch.exit_tile and out == arch.exit_direction:
                ready = True
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
        if len(in_times) < len(host_in) and writable[((0, 0), "W")]:
            pushes.append((((0, 0), "W"), host_in[len(in_times)]))
            in_times.append(cycle)
        # PE state updates
        for pos, pe in pes.items():
            if pe.idle:
                continue
            phase = pe.name
            if phase in ("RECV", "PASS") and pos in to_pe:
                data = to_pe[pos][0]
                pe.action_times.append(cycle)
                if phase == "RECV":
                    pe.sram[pe.config["act_base"] + pe.count] = list(data)
                if pe_out_fire[pos]:
                    pushes.append(((pos, "L"), (data, pe.dest)))
                pe.advance(cycle)
            elif phase == "COMPUTE":
                pe.advance(cycle)
            elif phase == "EMIT" and pe_out_fire[pos]:
                pe.action_times.append(cycle)
                pushes.append(((pos, "L"), (pe.results[pe.count], pe.dest)))
                pe.advance(cycle)
        for key, flit in pushes:
            fifos[key].append(flit)
    else:
        raise AssertionError(f"reference did not finish in {max_cycles} cycles")
    by_position = [pes[arch.chain_position(p)] for p in range(arch.n_tiles)]
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


def random_program(rng, *, max_batch=6):
    lanes = int(rng.choice([1, 2, 4, 8]))
    rows, cols = int(rng.integers(1, 3)), int(rng.integers(1, 4))
    arch = Arch(rows=rows, cols=cols, lanes=lanes, sram_bytes=lanes * 512, max_tile_outputs=64,
                router_fifo_depth=int(rng.integers(1, 5)))
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
    program = build_program(arch, layers, tail=tail, act_fill=rng)
    batch = int(rng.integers(1, max_batch + 1))
    x = rng.integers(-128, 128, (batch, layers[0].n_in), dtype=np.int8)
    return program, layers, x, batch


def assert_matches_reference(program, x, batch):
    flits = pack_flits(x, program.arch.lanes)
    result = emulate(program, flits, batch)
    ref_flits, ref_out, ref_in, ref_pes = reference_run(program, flits, batch)
    np.testing.assert_array_equal(result.in_times, ref_in, err_msg="host input transfer cycles")
    np.testing.assert_array_equal(result.out_times, ref_out, err_msg="host output transfer cycles")
    np.testing.assert_array_equal(result.out_flits, ref_flits, err_msg="output flit data")
    assert result.cycles == ref_out[-1] + 1
    words = program.output_words
    assert result.latency_cycles == ref_out[words - 1] + 1
    for position, pe in enumerate(ref_pes):
        pe_times = result.timing.pe_times[position]
        if pe.idle:
            assert pe_times is None and len(result.tile_timelines[position]) == 0
            continue
        np.testing.assert_array_equal(pe_times, pe.action_times, err_msg=f"PE at chain position {position}")
        spans = [(int(s), int(e), str(p)) for s, e, p in result.tile_timelines[position]]
        assert spans == pe.spans, f"phase spans of chain position {position}"
    return result


@pytest.mark.parametrize("seed", range(300))
def test_random_programs_match_reference(seed):
    rng = np.random.default_rng(seed)
    program, layers, x, batch = random_program(rng)
    result = assert_matches_reference(program, x, batch)
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


def _layer(rng, n_in, n_out, tiles=1):
    return random_layer(rng, n_in, n_out, tiles)


@pytest.mark.parametrize("depth", [1, 2])
def test_slow_tile_behind_fast_ones_depth(depth):
    """Heavy back-pressure: a long COMPUTE at the end of the chain stalls every FIFO before it."""
    rng = np.random.default_rng(100 + depth)
    arch = Arch(rows=2, cols=2, lanes=2, sram_bytes=4096, max_tile_outputs=64, router_fifo_depth=depth)
    layers = [_layer(rng, 4, 4), _layer(rng, 4, 2), _layer(rng, 2, 24)]
    program = build_program(arch, layers)
    x = rng.integers(-128, 128, (6, 4), dtype=np.int8)
    assert_matches_reference(program, x, 6)


def test_forwarding_chain_longer_than_its_fifos():
    """A layer split over 3 tiles with K = 6 > 2D: forwarding stalls on the next tile's COMPUTE."""
    rng = np.random.default_rng(7)
    arch = Arch(rows=2, cols=2, lanes=2, sram_bytes=4096, max_tile_outputs=64, router_fifo_depth=1)
    layers = [_layer(rng, 12, 6, tiles=3)]
    program = build_program(arch, layers)
    x = rng.integers(-128, 128, (5, 12), dtype=np.int8)
    assert_matches_reference(program, x, 5)


def test_long_batch_extrapolation_matches_reference():
    """Batch above the probe: the periodic extrapolation, checked cycle by cycle."""
    rng = np.random.default_rng(8)
    arch = Arch(rows=2, cols=3, lanes=2, sram_bytes=4096, max_tile_outputs=64, router_fifo_depth=2)
    layers = [_layer(rng, 6, 6, tiles=2), _layer(rng, 6, 3, tiles=2)]
    program = build_program(arch, layers)
    batch = 3 * PROBE_BATCH
    x = rng.integers(-128, 128, (batch, 6), dtype=np.int8)
    result = assert_matches_reference(program, x, batch)
    assert result.timing.extrapolated


def test_overlapping_weight_and_activation_regions():
    """COMPUTE reads the SRAM as RECV left it: weights overlapping the buffer see this inference's inputs."""
    rng = np.random.default_rng(9)
    arch = Arch(rows=1, cols=2, lanes=4, sram_bytes=1024, max_tile_outputs=16, router_fifo_depth=2)
    program = build_program(arch, [_layer(rng, 8, 4)])
    tile = program.tiles[0]
    tile.config["act_base"] = 3  # weights at words 0..7, inputs at words 3..4
    x = rng.integers(-128, 128, (3, 8), dtype=np.int8)
    assert_matches_reference(program, x, 3)


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
    arch = Arch(rows=2, cols=4, lanes=4, sram_bytes=16384, max_tile_outputs=64, router_fifo_depth=depth)
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
    arch = Arch(rows=2, cols=2, lanes=4, sram_bytes=4096, max_tile_outputs=64, router_fifo_depth=2)
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
    arch = Arch(rows=1, cols=3, lanes=4, sram_bytes=4096, max_tile_outputs=64, router_fifo_depth=2)
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
    arch = Arch(rows=1, cols=3, lanes=2, sram_bytes=4096, max_tile_outputs=64, router_fifo_depth=2)
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
    arch = Arch(rows=2, cols=2, lanes=2, sram_bytes=4096, max_tile_outputs=64, router_fifo_depth=2)
    return build_program(arch, [_layer(rng, 4, 4, tiles=2), _layer(rng, 4, 2)])


def _mutated(change):
    program = copy.deepcopy(_base_program())
    change(program)
    return program


@pytest.mark.parametrize("change,message", [
    (lambda p: p.tiles[1].config.update(n_pass=2), r"reads n_in_words \+ n_pass = 2 \+ 2 = 4 flits per inference, but tile r0c0 sends it 3"),
    (lambda p: p.tiles[3].config.update(n_pass=2), r"sends it 1"),
    (lambda p: p.tiles[0].config.update(n_in_words=3), r"reads n_in_words \+ n_pass = 3 \+ 0 = 3 flits per inference, but the host sends it 2"),
    (lambda p: p.tiles[2].config.update(n_in_words=0, n_pass=0), r"needs n_in_words > 0"),
    (lambda p: p.tiles[1].config.update(dest_row=1, dest_col=7), r"outside the 2x2 grid"),
    (lambda p: p.tiles[1].config.update(dest_row=0, dest_col=1), r"sends its flits to itself"),
    # back to the first tile: its L output would carry the host's stream and this one
    (lambda p: p.tiles[2].config.update(dest_row=0, dest_col=0), r"output L, which host input also uses; contended"),
    (lambda p: p.tiles[3].config.update(dest_host=0, dest_row=1, dest_col=1), r"output L, which tile r0c1 .* also uses"),
    (lambda p: p.tiles[1].config.update(dest_host=1), r"sends 2 flits per inference to the host, the program's output needs 1"),
    (lambda p: p.tiles[0].params.__setitem__((0, 2), 63), r"shift 63, outside 1..62"),
    (lambda p: p.tiles[0].params.__setitem__((1, 1), 2**31), r"multiplier 2147483648"),
    (lambda p: p.tiles[0].params.__setitem__((0, 0), 2**31), r"bias 2147483648"),
    (lambda p: p.tiles[0].config.update(clamp_lo=5, clamp_hi=4), r"clamp_lo 5 > clamp_hi 4"),
])
def test_inconsistent_programs_are_refused(change, message):
    program = _mutated(change)
    x = np.zeros((2, 4), dtype=np.int8)
    with pytest.raises(EmulatorError, match=message):
        emulate(program, pack_flits(x, 2), 2)


def test_unreached_configured_tile_is_refused():
    rng = np.random.default_rng(15)
    arch = Arch(rows=1, cols=3, lanes=2, sram_bytes=4096, max_tile_outputs=64, router_fifo_depth=2)
    program = build_program(arch, [_layer(rng, 4, 2)], tail="direct")
    program.tiles[2].config["n_pass"] = 1
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
