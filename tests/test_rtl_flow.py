"""The RTL simulation flow: harness -> Verilog -> cached Verilator build -> cocotb job; and Amaranth's simulator.

(a) a stand-in chip checks the flow itself (build cache, job, timing stamps) independent of hdl/chip.py;
(b) a hand-built program on the real chip checks the arithmetic against a numpy golden of section 4
    and that Verilator and Amaranth's simulator agree on every flit, time stamp and cycle count;
    (b') the same for a windowed network of section 4.1 (a convolution split by output rows over two
    tiles, then a max pool, then a depthwise convolution as an op = LANE layer);
    (b'') a residual block of section 4.2 (``program_builder``: a split convolution, its input kept in
    the stream, a split op = ADD join, the skip as operand a or as operand b, either first) and
    a channel concatenation of section 4.3 (a split convolution as operand a, the block input as operand b,
    first in the stream, a split op = CONCAT join) on Verilator, bit- and cycle-exact against the emulator;
(c) ``waves`` writes a non-empty waveform file.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest
from amaranth.hdl import Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from flowtile.arch import (OP_ADD, OP_CONCAT, OP_LANE, OP_MAC, OP_MAX, Arch, CONFIG_FIELDS, dense_window_registers,
                           stream_registers)
from flowtile.testing.archs import lean_arch
from flowtile.program import LayerInfo, Program, TensorSpec, TileProgram
from flowtile.rtl import simulate as rtl
from flowtile.hdl.chip import TILE_MODULE_NAME
from flowtile.rtl.harness import BUFFER_MODULE_NAME, HARNESS_TOP_NAME, Harness, HarnessError
from flowtile.hdl.layouts import LOAD_TARGET_CONFIG, config_field_index, flit_signature, load_signature

from test_emulator import _with_line_buffers


def shift_round_half_even(value, shift):
    """``value / 2^shift`` rounded to nearest, ties to even (section 4), by floor division."""
    quotient, remainder = value >> shift, value - ((value >> shift) << shift)
    half = 1 << (shift - 1)
    return quotient + ((remainder > half) | ((remainder == half) & ((quotient & 1) == 1)))


# --- (a) the flow with a stand-in chip ------------------------------------------------------------

#: The stand-in XORs every lane with the low byte of tile 0's config register 0 (n_in_words), so that
#: its output proves the load bus reached it.
KEY_REGISTER = "n_in_words"
LANE_MASK = 0xFF

FLOW_ARCH = lean_arch(rows=1, cols=2, lanes=4, sram_bytes=256, max_tile_outputs=4, router_fifo_depth=2,
                      host_buffer_flits=64)


class LoopbackChip(wiring.Component):
    """Stand-in with the chip's ports: host input -> one register stage -> host output, data XOR key.

    Timing with an always-ready host output: input flit ``i`` transfers in cycle ``i`` and comes out in
    cycle ``i + 1``.
    """

    def __init__(self, arch: Arch):
        self.arch = arch
        super().__init__({"load": In(load_signature(arch)), "run": In(1),
                          "i_host": In(flit_signature(arch)), "o_host": Out(flit_signature(arch))})

    def elaborate(self, platform):
        m = Module()
        lanes = self.arch.lanes
        key = Signal(8)
        payload = self.load.payload
        with m.If(self.load.valid & ~self.run & (payload.tile == 0) & (payload.target == LOAD_TARGET_CONFIG)
                  & (payload.addr == config_field_index(KEY_REGISTER))):
            m.d.sync += key.eq(payload.data[:8])
        # One-entry output register; it takes a new flit whenever it is empty or being drained.
        can_take = ~self.o_host.valid | self.o_host.ready
        m.d.comb += self.i_host.ready.eq(self.run & can_take)
        with m.If(can_take):
            m.d.sync += self.o_host.valid.eq(self.i_host.valid & self.i_host.ready)
            m.d.sync += self.o_host.payload.data.eq(self.i_host.payload.data ^ key.replicate(lanes))
            m.d.sync += self.o_host.payload.dest_host.eq(1)
        return m


def _idle_config(**overrides) -> dict:
    config = {name: 0 for name, _, _ in CONFIG_FIELDS}
    config.update(overrides)
    return config


def _loopback_program(arch: Arch, key: int, n_values: int) -> Program:
    tiles = [TileProgram(row, col, _idle_config(), np.zeros((0, arch.lanes), np.int8), np.zeros((0, 3), np.int64))
             for row, col in arch.chain]
    tiles[0].config = tiles[0].config.replace(**{KEY_REGISTER: key})
    spec = TensorSpec("x", (n_values,), 1.0, 0)
    return Program(arch=arch, input=spec, output=spec, layers=[], tiles=tiles, model_name="loopback")


LOOPBACK_KEY, LOOPBACK_BATCH, LOOPBACK_VALUES = 0x2A, 3, 10


@pytest.fixture(scope="module")
def loopback_case():
    """(program, input flits, expected output flits, expected output times) for the stand-in chip."""
    program = _loopback_program(FLOW_ARCH, LOOPBACK_KEY, LOOPBACK_VALUES)
    rng = np.random.default_rng(1)
    in_flits = rng.integers(-128, 128, size=(LOOPBACK_BATCH * program.input_words, FLOW_ARCH.lanes)).astype(np.int8)
    expected = (in_flits.view(np.uint8) ^ LOOPBACK_KEY).view(np.int8)
    # Flit i is accepted in cycle i and leaves the one register stage in cycle i + 1.
    return program, in_flits, expected, np.arange(len(in_flits)) + 1


def test_flow_amaranth_with_stand_in_chip(loopback_case):
    program, in_flits, expected, expected_times = loopback_case
    result = rtl.simulate(program, in_flits, LOOPBACK_BATCH, simulator="amaranth", chip_factory=LoopbackChip)
    np.testing.assert_array_equal(result.out_flits, expected)
    np.testing.assert_array_equal(result.out_times, expected_times)
    assert result.out_times.dtype == np.int64 and result.out_flits.dtype == np.int8
    assert result.cycles == len(in_flits) + 1


STREAM_ARCH = FLOW_ARCH.replace(host_buffer_flits=rtl.MIN_STREAMING_BUFFER)


@pytest.mark.parametrize("simulator", ["amaranth", pytest.param("verilator", marks=pytest.mark.rtl)])
def test_batch_larger_than_the_host_buffers_streams_without_changing_timing(simulator, tmp_path):
    """A batch of 25 times the buffers streams through the harness's rings: every flit, every time stamp as if
    the buffers held the whole batch (flit i in cycle i, out in cycle i + 1)."""
    batch = 2 * 25 * STREAM_ARCH.host_buffer_flits // 3 + 1
    program = _loopback_program(STREAM_ARCH, LOOPBACK_KEY, LOOPBACK_VALUES)
    rng = np.random.default_rng(5)
    in_flits = rng.integers(-128, 128, size=(batch * program.input_words, STREAM_ARCH.lanes)).astype(np.int8)
    assert len(in_flits) > 20 * STREAM_ARCH.host_buffer_flits
    result = rtl.simulate(program, in_flits, batch, simulator=simulator, build_root=tmp_path,
                          chip_factory=LoopbackChip)
    np.testing.assert_array_equal(result.out_flits, (in_flits.view(np.uint8) ^ LOOPBACK_KEY).view(np.int8))
    np.testing.assert_array_equal(result.out_times, np.arange(len(in_flits)) + 1)


@pytest.mark.rtl
def test_flow_verilator_with_stand_in_chip_and_build_cache(loopback_case, tmp_path):
    program, in_flits, expected, expected_times = loopback_case
    cold = rtl.build_verilator(FLOW_ARCH, build_root=tmp_path, chip_factory=LoopbackChip)
    warm = rtl.build_verilator(FLOW_ARCH, build_root=tmp_path, chip_factory=LoopbackChip)
    assert not cold.cached and warm.cached and warm.directory == cold.directory
    assert warm.seconds < 1.0, "a cached build must not recompile"

    result = rtl.simulate(program, in_flits, LOOPBACK_BATCH, build_root=tmp_path, chip_factory=LoopbackChip)
    np.testing.assert_array_equal(result.out_flits, expected)
    np.testing.assert_array_equal(result.out_times, expected_times)
    assert result.cycles == len(in_flits) + 1
    builds = sorted(p.name for p in tmp_path.glob(f"{HARNESS_TOP_NAME}-*"))
    assert builds == [cold.directory.name], \
        "simulating must reuse the cached build, not make another"


def test_input_validation_names_the_problem():
    program = _loopback_program(FLOW_ARCH, 1, 8)
    with pytest.raises(ValueError, match="int8"):
        rtl.simulate(program, np.zeros((2, 4), np.int16), 1, simulator="amaranth", chip_factory=LoopbackChip)
    with pytest.raises(ValueError, match=r"expected \[batch\*input_words, lanes\]"):
        rtl.simulate(program, np.zeros((3, 4), np.int8), 1, simulator="amaranth", chip_factory=LoopbackChip)
    tiny = _loopback_program(FLOW_ARCH.replace(host_buffer_flits=rtl.MIN_STREAMING_BUFFER - 1), 1, 8)
    with pytest.raises(ValueError, match="host_buffer_flits"):
        rtl.simulate(tiny, np.zeros((66, 4), np.int8), 33, simulator="amaranth", chip_factory=LoopbackChip)
    with pytest.raises(ValueError, match="simulator must be one of"):
        rtl.simulate(program, np.zeros((2, 4), np.int8), 1, simulator="icarus")


class SilentChip(LoopbackChip):
    """Accepts input and never answers: the run must time out with a clear message."""

    def elaborate(self, platform):
        m = Module()
        m.d.comb += self.i_host.ready.eq(self.run)
        return m


def test_timeout_is_reported():
    program = _loopback_program(FLOW_ARCH, 1, 8)
    with pytest.raises(rtl.RtlTimeoutError, match=r"received 0 of 2 output flits.*accepted 2 of 2"):
        rtl.simulate(program, np.zeros((2, 4), np.int8), 1, simulator="amaranth", chip_factory=SilentChip)


@pytest.mark.rtl
def test_verilator_timeout_and_build_failure_are_reported(tmp_path, monkeypatch):
    program = _loopback_program(FLOW_ARCH, 1, 8)
    with pytest.raises(rtl.RtlTimeoutError, match=r"received 0 of 2 output flits.*accepted 2 of 2"):
        rtl.simulate(program, np.zeros((2, 4), np.int8), 1, build_root=tmp_path, chip_factory=SilentChip)
    monkeypatch.setattr(rtl, "VERILATOR_BUILD_ARGS", rtl.VERILATOR_BUILD_ARGS + ("--no-such-verilator-option",))
    with pytest.raises(rtl.RtlBuildError, match=r"(?s)last lines:.*no-such-verilator-option"):
        rtl.build_verilator(FLOW_ARCH, build_root=tmp_path, chip_factory=SilentChip)


# --- (a') the Verilog the Verilator flow builds ---------------------------------------------------------

def _module_names(text):
    return re.findall(r"^module\s+(\S+?)\s*[(#]", text, re.M)


def test_harness_verilog_is_hierarchical_and_writes_no_buffer_contents():
    # default 65536-flit host buffers
    arch = lean_arch(rows=2, cols=3, lanes=2, sram_bytes=64, max_tile_outputs=4, result_ring_words=2)
    text = rtl.harness_verilog(arch)
    modules = _module_names(text)
    assert modules.count(TILE_MODULE_NAME) == 1 and modules.count(BUFFER_MODULE_NAME) == 1
    assert modules.count(HARNESS_TOP_NAME) == 1
    tiles = re.findall(rf"^\s*{TILE_MODULE_NAME}\s+tile_r\d+c\d+\s*\(", text, re.M)
    assert len(tiles) == arch.n_tiles
    assert len(re.findall(rf"^\s*{BUFFER_MODULE_NAME}\s+#", text, re.M)) == 2
    # The host buffers' contents are not written out word by word (the tile's own small memories are).
    assert not re.search(r"^\s*(in|out)_buffer\[\d+\] =", text, re.M)
    assert len(text) < 1_000_000


def test_stand_in_harness_verilog_has_the_buffer_module_and_no_tile_module():
    text = rtl.harness_verilog(FLOW_ARCH, chip_factory=LoopbackChip)
    modules = _module_names(text)
    assert BUFFER_MODULE_NAME in modules and TILE_MODULE_NAME not in modules


@pytest.mark.usefixtures("collect_unused_components")
def test_harness_rejects_an_unknown_buffer_form():
    with pytest.raises(HarnessError, match=re.escape("parameter 'buffers' must be one of 'memories', 'instances', "
                                                     "got 'registers'")):
        Harness(FLOW_ARCH, chip=LoopbackChip(FLOW_ARCH), buffers="registers")


def test_generation_key_changes_when_an_hdl_source_changes(monkeypatch):
    fingerprint = "{}"
    key = rtl._generation_key(CHIP_ARCH, None, fingerprint)
    assert key == rtl._generation_key(CHIP_ARCH, None, fingerprint)
    import flowtile.hdl.tile as tile_module
    source = Path(tile_module.__file__)
    original = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes",
                        lambda self: original(self) + (b"# edited\n" if self == source else b""))
    rtl._loaded_hdl_sources_digest.cache_clear()
    try:
        assert rtl._generation_key(CHIP_ARCH, None, fingerprint) != key
    finally:
        monkeypatch.undo()
        rtl._loaded_hdl_sources_digest.cache_clear()
    assert rtl._generation_key(CHIP_ARCH, None, fingerprint) == key


def test_build_key_names_the_cocotb_libraries_the_simulator_links():
    """A built simulator loads cocotb's VPI library through a RUNPATH into one virtual environment: the cache key
    holds that directory, so a cache shared with another environment (a CI checkout's) never hands this one a build
    whose library is gone."""
    libs = Path(rtl._tool_versions()["cocotb_libs"])
    assert (libs / "libcocotbvpi_verilator.so").is_file()


def _fake_build(root: Path, name: str, megabytes: float, used: float | None, now: float) -> Path:
    """A cache entry (named by ``name``, one hex digit, repeated to a digest's length) of ``megabytes`` whose stamp
    was last touched ``used`` seconds before ``now`` (None: no stamp, an interrupted build that wrote its harness
    Verilog, its directory that old instead)."""
    directory = root / f"{HARNESS_TOP_NAME}-{name * rtl._BUILD_DIGEST_CHARS}"
    directory.mkdir(parents=True)
    (directory / "obj").write_bytes(b"\0" * int(megabytes * 2**20))
    import os
    if used is None:
        (directory / f"{HARNESS_TOP_NAME}.v").write_text("module flowtile_harness; endmodule\n")
        os.utime(directory, (now - 7200, now - 7200))
    else:
        stamp = directory / rtl._BUILD_STAMP
        stamp.write_text("{}")
        os.utime(stamp, (now - used, now - used))
    return directory


def test_build_cache_evicts_least_recently_used_builds_down_to_its_limit(tmp_path):
    now = time.time()
    hour = rtl.CACHE_IN_USE_SECONDS
    oldest = _fake_build(tmp_path, "a", 3, 10 * hour, now)
    older = _fake_build(tmp_path, "b", 3, 5 * hour, now)
    recent = _fake_build(tmp_path, "c", 3, 2 * hour, now)
    running = _fake_build(tmp_path, "d", 3, hour / 2, now)     # used a moment ago: maybe running
    interrupted = _fake_build(tmp_path, "e", 1, None, now)     # no stamp, 2 hours old
    deleted = rtl.evict_builds(tmp_path, limit_bytes=7 * 2**20, now=now)
    # The interrupted build goes whatever the size; then the oldest until 3 + 3 <= 7 MiB.
    assert deleted == [interrupted, oldest, older]
    assert recent.is_dir() and running.is_dir()
    # Below the limit nothing else goes; a build in use stays even when the limit says otherwise.
    assert rtl.evict_builds(tmp_path, limit_bytes=7 * 2**20, now=now) == []
    assert rtl.evict_builds(tmp_path, limit_bytes=1, now=now, keep=recent) == []
    assert rtl.evict_builds(tmp_path, limit_bytes=1, now=now) == [recent]
    assert running.is_dir()


def test_build_cache_eviction_never_touches_what_it_did_not_write(tmp_path):
    """``build_root`` may be a folder of the user's: only directories this module wrote (its name pattern and a
    stamp or the harness Verilog inside) are ever deleted, never a lookalike, never through a symbolic link."""
    import os
    now, old = time.time(), time.time() - 10 * rtl.CACHE_IN_USE_SECONDS
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    lookalikes = [tmp_path / f"{HARNESS_TOP_NAME}-notes",                            # not a digest
                  tmp_path / f"{HARNESS_TOP_NAME}-{'0' * rtl._BUILD_DIGEST_CHARS}"]  # a digest, but nothing of ours
    for directory in lookalikes:
        directory.mkdir()
        (directory / "data.bin").write_bytes(b"\0" * 2**20)
        os.utime(directory, (old, old))
    link = tmp_path / f"{HARNESS_TOP_NAME}-{'1' * rtl._BUILD_DIGEST_CHARS}"
    link.symlink_to(user, target_is_directory=True)
    (user / rtl._BUILD_STAMP).write_text("{}")     # even a stamp behind the link does not make it ours
    os.utime(user / rtl._BUILD_STAMP, (old, old))
    ours = _fake_build(tmp_path, "f", 1, 10 * rtl.CACHE_IN_USE_SECONDS, now)
    assert rtl.evict_builds(tmp_path, limit_bytes=1, now=now) == [ours]
    assert all(directory.is_dir() for directory in lookalikes) and link.is_symlink()
    assert (user / "notes.txt").read_text() == "keep me"


def test_build_cache_limit_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("FLOWTILE_RTL_CACHE_GB", raising=False)
    assert rtl.cache_limit_bytes() == int(rtl.DEFAULT_CACHE_GB * 2**30)
    monkeypatch.setenv("FLOWTILE_RTL_CACHE_GB", "0.5")
    assert rtl.cache_limit_bytes() == 2**29
    for bad in ("0", "-2", "lots"):
        monkeypatch.setenv("FLOWTILE_RTL_CACHE_GB", bad)
        with pytest.raises(ValueError, match="FLOWTILE_RTL_CACHE_GB = .* must be a number of GiB > 0"):
            rtl.cache_limit_bytes()


# --- (b) a hand-built program on the real chip --------------------------------------------------------

CHIP_ARCH = lean_arch(rows=2, cols=2, lanes=4, sram_bytes=1024, max_tile_outputs=16, result_ring_words=4,
                      router_fifo_depth=4, host_buffer_flits=256)
N_IN, N_OUT, BATCH = 12, 6, 3
ZP_OUT, CLAMP_LO, CLAMP_HI = 3, -100, 100
#: Requantization around 1/1024: multiplier 1.25 * 2^30, shift 40, so outputs hit the clamps sometimes.
MULTIPLIER, SHIFT = 5 << 28, 40


def _dense_program(arch: Arch, seed: int = 0):
    """One dense layer on chain tile 0, pass-through tiles behind it; returns (program, weights, params)."""
    rng = np.random.default_rng(seed)
    lanes = arch.lanes
    k = -(-N_IN // lanes)
    result_words = -(-N_OUT // lanes)
    weights = rng.integers(-128, 128, size=(N_OUT, N_IN)).astype(np.int64)
    bias = rng.integers(-5000, 5000, size=N_OUT)
    params = np.stack([bias, np.full(N_OUT, MULTIPLIER), np.full(N_OUT, SHIFT)], axis=1).astype(np.int64)

    # SRAM: weight row o, chunk c at word w_base + o*K + c (zero-padded lanes); activations after them.
    padded = np.zeros((N_OUT, k * lanes), np.int8)
    padded[:, :N_IN] = weights
    weight_words = padded.reshape(N_OUT * k, lanes)
    w_base, act_base = 0, N_OUT * k
    sram = np.zeros((act_base + k, lanes), np.int8)
    sram[w_base:w_base + N_OUT * k] = weight_words

    chain = arch.chain
    tiles = []
    for position, (row, col) in enumerate(chain):
        last = position == len(chain) - 1
        dest_row, dest_col = chain[position + 1] if not last else (0, 0)
        route = {"dest_row": dest_row, "dest_col": dest_col, "dest_host": int(last)}
        if position == 0:
            config = _idle_config(n_in_words=k, n_out=N_OUT, w_base=w_base, act_base=act_base,
                                  zp_out=ZP_OUT, clamp_lo=CLAMP_LO, clamp_hi=CLAMP_HI, **route,
                                  **dense_window_registers(k), **stream_registers(k, forward=False))
            tiles.append(TileProgram(row, col, config, sram, params))
        else:
            tiles.append(TileProgram(row, col, _idle_config(n_pass=result_words, **route),
                                     np.zeros((0, lanes), np.int8), np.zeros((0, 3), np.int64)))
    for tile in tiles:          # the pass-through tiles' forward queues: all their SRAM
        tile.config = tile.config.with_queue(arch)
    program = Program(arch=arch, input=TensorSpec("x", (N_IN,), 1.0, 0), output=TensorSpec("y", (N_OUT,), 1.0, 0),
                      layers=[LayerInfo("dense", "Gemm", N_IN, N_OUT, (chain[0],))], tiles=tiles,
                      model_name="hand-dense")
    program.validate()
    return program, weights, params


def _golden(x: np.ndarray, weights: np.ndarray, params: np.ndarray) -> np.ndarray:
    """Section 4's arithmetic with Python integers (exact 64-bit product, arithmetic shift)."""
    out = np.zeros((x.shape[0], weights.shape[0]), np.int8)
    for b in range(x.shape[0]):
        for o in range(weights.shape[0]):
            bias, multiplier, shift = (int(v) for v in params[o])
            acc = bias + int(np.dot(weights[o], x[b].astype(np.int64)))
            acc = (acc + (1 << 31)) % (1 << 32) - (1 << 31)  # wrap32
            y = shift_round_half_even(acc * multiplier, shift) + ZP_OUT
            out[b, o] = min(max(y, CLAMP_LO), CLAMP_HI)
    return out


@pytest.fixture(scope="module")
def dense_case():
    program, weights, params = _dense_program(CHIP_ARCH)
    rng = np.random.default_rng(7)
    x = rng.integers(-128, 128, size=(BATCH, N_IN)).astype(np.int8)
    from flowtile.host import pack_flits
    return program, x, pack_flits(x, CHIP_ARCH.lanes), _golden(x, weights, params)


@pytest.fixture(scope="module")
def amaranth_dense(dense_case):
    program, _, in_flits, _ = dense_case
    return rtl.simulate(program, in_flits, BATCH, simulator="amaranth")


def test_dense_layer_amaranth_matches_golden(dense_case, amaranth_dense):
    program, _, _, golden = dense_case
    from flowtile.host import unpack_flits
    np.testing.assert_array_equal(unpack_flits(amaranth_dense.out_flits, BATCH, N_OUT), golden)
    assert np.all(np.diff(amaranth_dense.out_times) >= 1)
    assert amaranth_dense.cycles == amaranth_dense.out_times[-1] + 1


@pytest.mark.rtl
def test_dense_layer_verilator_matches_amaranth(dense_case, amaranth_dense):
    program, _, in_flits, golden = dense_case
    from flowtile.host import unpack_flits
    result = rtl.simulate(program, in_flits, BATCH)
    np.testing.assert_array_equal(unpack_flits(result.out_flits, BATCH, N_OUT), golden)
    np.testing.assert_array_equal(result.out_flits, amaranth_dense.out_flits)
    np.testing.assert_array_equal(result.out_times, amaranth_dense.out_times)
    assert result.cycles == amaranth_dense.cycles
    started = time.perf_counter()
    rtl.build_verilator(CHIP_ARCH)
    assert time.perf_counter() - started < 2.0, "the second build of the same Arch must come from the cache"


# --- (b') a windowed network on the real chip (section 4.1) ---------------------------------------------

#: 2x2 chain: tiles 0 and 1 split a 3x3 convolution (stride 1, pad 1) of a 5x5 map by output rows,
#: tile 2 max-pools its 5x5 output (2x2, stride 2), tile 3 applies a depthwise 3x3 convolution (pad 1,
#: op = LANE, per-channel parameters) to the pooled map and sends the result to the host.
CONV_ARCH = lean_arch(rows=2, cols=2, lanes=4, sram_bytes=512, max_tile_outputs=64, result_ring_words=16,
                      router_fifo_depth=2, host_buffer_flits=256)
CONV_C, CONV_HW, CONV_OUT, CONV_BATCH = 3, 5, 4, 2
CONV_BANDS = ((0, 3), (3, 2))           # (out_row_begin, out_rows) of chain tiles 0 and 1
CONV_PAD_VALUE = -5                      # the input zero point: padding is a real zero
POOL_OUT, POOL_CLAMP_LO = 2, -50
DW_KERNEL, DW_PAD_VALUE, DW_ZP_OUT = 3, 4, -6     # a non-zero pad value: the pooled map's zero point


def _conv_program(arch: Arch, seed: int = 3):
    """Returns (program, weights [O, C, 3, 3], params [O, 3], depthwise weights [O, 3, 3],
    depthwise params [O, 3])."""
    rng = np.random.default_rng(seed)
    lanes, kernel = arch.lanes, 3
    words_per_pixel = -(-CONV_C // lanes)
    weights = rng.integers(-128, 128, size=(CONV_OUT, CONV_C, kernel, kernel)).astype(np.int64)
    params = np.stack([rng.integers(-3000, 3000, size=CONV_OUT), np.full(CONV_OUT, MULTIPLIER),
                       np.full(CONV_OUT, SHIFT + 1)], axis=1).astype(np.int64)
    # Weight word w_base + o*K_w + (ky*KW + kx)*CW + cw holds channels cw*L .. cw*L + L - 1 (padding lanes 0).
    weight_image = np.zeros((CONV_OUT, kernel, kernel, words_per_pixel * lanes), np.int8)
    weight_image[..., :CONV_C] = weights.transpose(0, 2, 3, 1)
    weight_image = weight_image.reshape(-1, lanes)
    k_words = CONV_HW * CONV_HW * words_per_pixel
    w_base, act_base = 0, len(weight_image)
    conv_sram = np.concatenate([weight_image, np.zeros((k_words, lanes), np.int8)])
    chain = arch.chain

    def route(position):
        last = position == len(chain) - 1
        dest_row, dest_col = chain[position + 1] if not last else (0, 0)
        return {"dest_row": dest_row, "dest_col": dest_col, "dest_host": int(last)}

    window = dict(in_height=CONV_HW, in_width=CONV_HW, stride=1, out_width=CONV_HW)
    conv_words = [rows * CONV_HW for _, rows in CONV_BANDS]   # one result word per pixel (CONV_OUT <= L)
    tiles = []
    for position, (begin, rows) in enumerate(CONV_BANDS):
        config = _idle_config(n_in_words=k_words, **stream_registers(k_words, forward=position == 0),
                              n_pass=sum(conv_words[:position]),
                              n_out=CONV_OUT, w_base=w_base, act_base=act_base, zp_out=ZP_OUT, clamp_lo=CLAMP_LO,
                              clamp_hi=CLAMP_HI, op=OP_MAC, words_per_pixel=words_per_pixel, kernel_h=kernel,
                              kernel_w=kernel, pad_top=1, pad_left=1, pad_value=CONV_PAD_VALUE,
                              out_row_begin=begin, out_rows=rows, **window, **route(position))
        tiles.append(TileProgram(*chain[position], config, conv_sram, params))
    pool_words_per_pixel = -(-CONV_OUT // lanes)
    pool_in_words = CONV_HW * CONV_HW * pool_words_per_pixel
    pool = _idle_config(n_in_words=pool_in_words, **stream_registers(pool_in_words, forward=False),
                        n_out=pool_words_per_pixel * lanes,
                        act_base=0, clamp_lo=POOL_CLAMP_LO, clamp_hi=127, op=OP_MAX, in_height=CONV_HW,
                        in_width=CONV_HW, words_per_pixel=pool_words_per_pixel, kernel_h=2, kernel_w=2, stride=2,
                        pad_value=-128, out_rows=POOL_OUT, out_width=POOL_OUT, **route(2))
    tiles.append(TileProgram(*chain[2], pool, np.zeros((0, lanes), np.int8), np.zeros((pool["n_out"], 3), np.int64)))
    # Depthwise layer (op = LANE): weight word ky*KW + kx holds channel l's weight in lane l (CW = 1).
    dw_weights = rng.integers(-128, 128, size=(CONV_OUT, DW_KERNEL, DW_KERNEL)).astype(np.int64)
    dw_params = np.stack([rng.integers(-2000, 2000, size=CONV_OUT), rng.integers(1 << 29, 1 << 31, size=CONV_OUT),
                          rng.integers(SHIFT - 2, SHIFT + 1, size=CONV_OUT)], axis=1).astype(np.int64)
    dw_image = np.zeros((DW_KERNEL, DW_KERNEL, pool_words_per_pixel * lanes), np.int8)
    dw_image[..., :CONV_OUT] = dw_weights.transpose(1, 2, 0)
    dw_image = dw_image.reshape(-1, lanes)
    dw_in_words = POOL_OUT * POOL_OUT * pool_words_per_pixel
    dw = _idle_config(n_in_words=dw_in_words, **stream_registers(dw_in_words, forward=False),
                      n_out=pool_words_per_pixel * lanes, w_base=0, act_base=len(dw_image),
                      zp_out=DW_ZP_OUT, clamp_lo=CLAMP_LO, clamp_hi=CLAMP_HI, op=OP_LANE, in_height=POOL_OUT,
                      in_width=POOL_OUT, words_per_pixel=pool_words_per_pixel, kernel_h=DW_KERNEL,
                      kernel_w=DW_KERNEL, stride=1, pad_top=1, pad_left=1, pad_value=DW_PAD_VALUE,
                      out_rows=POOL_OUT, out_width=POOL_OUT, **route(3))
    dw_table = np.zeros((dw["n_out"], 3), np.int64)
    dw_table[:, 2] = 1                                # padding channels: any parameters with a valid shift
    dw_table[:CONV_OUT] = dw_params
    tiles.append(TileProgram(*chain[3], dw, np.concatenate([dw_image, np.zeros((dw_in_words, lanes), np.int8)]),
                             dw_table))
    for tile in tiles:          # tile 0 forwards the map, tile 1 passes tile 0's rows: queues of all free SRAM
        tile.config = tile.config.with_queue(arch)
    program = Program(arch=arch, input=TensorSpec("x", (CONV_C, CONV_HW, CONV_HW), 1.0, 0, layout="chw"),
                      output=TensorSpec("y", (CONV_OUT, POOL_OUT, POOL_OUT), 1.0, 0, layout="chw"),
                      layers=[LayerInfo("conv", "Conv", CONV_C * CONV_HW ** 2, CONV_OUT * CONV_HW ** 2, chain[:2]),
                              LayerInfo("pool", "MaxPool", CONV_OUT * CONV_HW ** 2, CONV_OUT * POOL_OUT ** 2,
                                        chain[2:3]),
                              LayerInfo("dw", "DepthwiseConv", CONV_OUT * POOL_OUT ** 2, CONV_OUT * POOL_OUT ** 2,
                                        chain[3:4])],
                      tiles=tiles, model_name="hand-conv-pool-dw")
    program.validate()
    return program, weights, params, dw_weights, dw_params


def _conv_pool_golden(x: np.ndarray, weights: np.ndarray, params: np.ndarray) -> np.ndarray:
    """Section 4.1 with plain loops: x [C, H, W] -> pooled [O, POOL_OUT, POOL_OUT]."""
    conv = np.zeros((CONV_OUT, CONV_HW, CONV_HW), np.int64)
    for o in range(CONV_OUT):
        bias, multiplier, shift = (int(v) for v in params[o])
        for oy in range(CONV_HW):
            for ox in range(CONV_HW):
                acc = bias
                for c in range(CONV_C):
                    for ky in range(3):
                        for kx in range(3):
                            iy, ix = oy + ky - 1, ox + kx - 1
                            inside = 0 <= iy < CONV_HW and 0 <= ix < CONV_HW
                            acc += int(weights[o, c, ky, kx]) * (int(x[c, iy, ix]) if inside else CONV_PAD_VALUE)
                acc = (acc + (1 << 31)) % (1 << 32) - (1 << 31)
                y = shift_round_half_even(acc * multiplier, shift) + ZP_OUT
                conv[o, oy, ox] = min(max(y, CLAMP_LO), CLAMP_HI)
    pooled = np.zeros((CONV_OUT, POOL_OUT, POOL_OUT), np.int64)
    for o in range(CONV_OUT):
        for py in range(POOL_OUT):
            for px in range(POOL_OUT):
                pooled[o, py, px] = max(POOL_CLAMP_LO, min(127, conv[o, 2 * py:2 * py + 2, 2 * px:2 * px + 2].max()))
    return pooled


def _depthwise_golden(x: np.ndarray, weights: np.ndarray, params: np.ndarray) -> np.ndarray:
    """Section 4.1's op = LANE with plain loops: x [O, H, W] -> [O, H, W], 3x3, stride 1, pad 1."""
    channels, height, width = x.shape
    y = np.zeros_like(x, dtype=np.int64)
    for c in range(channels):
        bias, multiplier, shift = (int(v) for v in params[c])
        for oy in range(height):
            for ox in range(width):
                acc = bias
                for ky in range(DW_KERNEL):
                    for kx in range(DW_KERNEL):
                        iy, ix = oy + ky - 1, ox + kx - 1
                        inside = 0 <= iy < height and 0 <= ix < width
                        acc += int(weights[c, ky, kx]) * (int(x[c, iy, ix]) if inside else DW_PAD_VALUE)
                acc = (acc + (1 << 31)) % (1 << 32) - (1 << 31)
                value = shift_round_half_even(acc * multiplier, shift) + DW_ZP_OUT
                y[c, oy, ox] = min(max(value, CLAMP_LO), CLAMP_HI)
    return y


def _pixel_flits(maps: np.ndarray, lanes: int) -> np.ndarray:
    """[batch, C, H, W] -> pixel-major flits [batch * H * W * ceil(C / L), L], padding lanes zero."""
    batch, channels, height, width = maps.shape
    words = -(-channels // lanes)
    pixels = np.zeros((batch, height, width, words * lanes), np.int8)
    pixels[..., :channels] = maps.transpose(0, 2, 3, 1)
    return pixels.reshape(-1, lanes)


@pytest.fixture(scope="module")
def conv_case():
    program, weights, params, dw_weights, dw_params = _conv_program(CONV_ARCH)
    rng = np.random.default_rng(11)
    x = rng.integers(-128, 128, size=(CONV_BATCH, CONV_C, CONV_HW, CONV_HW)).astype(np.int8)
    golden = np.stack([_depthwise_golden(_conv_pool_golden(x[b], weights, params), dw_weights, dw_params)
                       for b in range(CONV_BATCH)])
    # The depthwise output must carry information (not all clamped), or the test proves little.
    assert len(np.unique(golden)) > CONV_OUT and np.count_nonzero((golden > CLAMP_LO) & (golden < CLAMP_HI)) > 8
    return program, _pixel_flits(x, CONV_ARCH.lanes), _pixel_flits(golden, CONV_ARCH.lanes)


@pytest.fixture(scope="module")
def amaranth_conv(conv_case):
    program, in_flits, _ = conv_case
    return rtl.simulate(program, in_flits, CONV_BATCH, simulator="amaranth")


def test_conv_pool_amaranth_matches_golden(conv_case, amaranth_conv):
    _, _, golden_flits = conv_case
    np.testing.assert_array_equal(amaranth_conv.out_flits, golden_flits)
    assert np.all(np.diff(amaranth_conv.out_times) >= 1)
    # Inference 0 worked from sections 4 and 6 (results stream out through the ring as each word is written): tile 0
    # RECVs at 1..25 (forwarding through its queue, popped at 2..26), so its first issue is a_0 = 26; each result word
    # (one pixel, 4 channels) takes d = 4*9 issue cycles, so word j is ready at a_j + d + 2 = 64 + 36j and EMITted
    # then: 64, 100, ..., 568. Tile 1 (the layer's last) receives them two hops later, 66 + 36j, and pops them one
    # cycle after that (last at 571); its own 10 words (ready since its COMPUTE began at 29) follow at 572..581.
    # The pool tile RECVs its 25 words, the last 10 at 574..583, so a_0 = 584; words of d = 2*2 are ready at
    # a_j + 6: EMITs at 590, 594, 598, 602. The depthwise (LANE) tile RECVs them at 592..604, so a_0 = 605, words
    # of d = 9 at 605, 614, 623, 632, EMITs at a_j + 11 = 616, 625, 634, 643, and the exit router's read adds 1.
    assert amaranth_conv.out_times[:POOL_OUT * POOL_OUT].tolist() == [617, 626, 635, 644]


@pytest.mark.rtl
def test_conv_pool_verilator_matches_amaranth(conv_case, amaranth_conv):
    program, in_flits, golden_flits = conv_case
    result = rtl.simulate(program, in_flits, CONV_BATCH)
    np.testing.assert_array_equal(result.out_flits, golden_flits)
    np.testing.assert_array_equal(result.out_flits, amaranth_conv.out_flits)
    np.testing.assert_array_equal(result.out_times, amaranth_conv.out_times)
    assert result.cycles == amaranth_conv.cycles


@pytest.mark.rtl
def test_line_buffers_verilator_matches_emulator(conv_case):
    """The conv-pool-depthwise chain with a line buffer where allowed (8 and 2 rows instead of the map twice):
    Verilator and the emulator give the golden outputs at the same cycles."""
    program, in_flits, golden_flits = conv_case
    streaming = _with_line_buffers(np.random.default_rng(0), program, doubled=0)
    # each conv band stores the whole map: the first reads rows 0..3 only (no line buffer: a buffer holds only rows
    # some output row reads), the second starts at output row 3 (rows 2..4): 5 rows in before it, so 8
    assert [t.config.stream_rows for t in streaming.tiles] == [0, 8, 0, 2]
    _assert_verilator_equals_emulator_and_golden(streaming, in_flits, CONV_BATCH, golden_flits)
    banked = {position: tile.config.activation_words for position, tile in enumerate(program.tiles)}
    assert all(tile.config.activation_words < banked[position]
               for position, tile in enumerate(streaming.tiles) if tile.config.stream_rows)


@pytest.mark.rtl
@pytest.mark.parametrize("seed", range(4))
def test_random_line_buffer_chains_verilator_match_emulator(seed):
    """A 3x3 convolution and a depthwise 3x3 (each in 1 or 2 row bands, random map sizes) on CONV_ARCH with a line
    buffer on every tile that may have one (tests/test_emulator.py's rule): Verilator, the emulator and the golden
    agree in every output flit, and Verilator and the emulator in every output cycle."""
    from flowtile.host import pack_flits
    from flowtile.testing.program_builder import Conv, Depthwise, build_program, network_golden
    rng = np.random.default_rng(seed)
    channels, height, width = int(rng.integers(2, 5)), int(rng.integers(4, 8)), int(rng.integers(3, 7))
    layers = [Conv(rng.integers(-128, 128, (4, channels, 3, 3), dtype=np.int8), rng.integers(-3000, 3000, 4),
                   MULTIPLIER, SHIFT + 1, zp_in=-5, zp_out=2, clamp_lo=-100, pads=(1, 1, 1, 1),
                   tiles=int(rng.integers(1, 3))),
              Depthwise(rng.integers(-128, 128, (4, 3, 3), dtype=np.int8), rng.integers(-2000, 2000, 4), MULTIPLIER,
                        SHIFT + 1, zp_in=2, zp_out=-3, clamp_lo=-100, pads=(1, 1, 1, 1), tiles=int(rng.integers(1, 3)))]
    shape = (channels, height, width)
    program = _with_line_buffers(rng, build_program(CONV_ARCH, layers, input_shape=shape, act_fill=rng))
    assert program is not None
    batch = int(rng.integers(2, 5))
    x = rng.integers(-128, 128, (batch, int(np.prod(shape))), dtype=np.int8)
    golden = network_golden(layers, x, shape, CONV_ARCH.lanes)
    assert len(np.unique(golden)) > 8, "the outputs must carry information"
    _assert_verilator_equals_emulator_and_golden(program, pack_flits(x, CONV_ARCH.lanes, program.input), batch, golden)


@pytest.mark.rtl
@pytest.mark.parametrize("seed", range(3))
def test_interleaved_group_chains_verilator_match_emulator(seed):
    """A 3x3 convolution split into 2 or 3 output-channel groups of one band, rows interleaved in the streams between
    its tiles (register interleave_rows with a line buffer: each group forwards row after row and, behind each, the
    pixels of the output rows it completes), then a max pool, on CONV_ARCH: Verilator, the emulator and the golden
    agree in every output flit, Verilator and the emulator in every output cycle."""
    from flowtile.host import pack_flits
    from flowtile.testing.program_builder import Conv, MaxPool, build_program, network_golden
    from test_emulator import _with_interleaved_rows
    rng = np.random.default_rng(100 + seed)
    channels, height, width = int(rng.integers(2, 5)), int(rng.integers(4, 8)), int(rng.integers(3, 5))
    groups = int(rng.integers(2, 4))
    conv = Conv(rng.integers(-128, 128, (4 * groups, channels, 3, 3), dtype=np.int8),
                rng.integers(-3000, 3000, 4 * groups), MULTIPLIER, SHIFT + 1, zp_in=-5, zp_out=2, clamp_lo=-100,
                stride=int(rng.integers(1, 3)), pads=(1, 1, 1, 1), channel_groups=groups)
    layers = [conv, MaxPool(2, 2, 1, tiles=1)][:2 if groups < 3 else 1]
    shape = (channels, height, width)
    program = _with_interleaved_rows(rng, build_program(CONV_ARCH, layers, input_shape=shape, act_fill=rng),
                                     doubled=0)
    assert program is not None and sum(t.config.interleave_rows for t in program.tiles) == groups
    batch = int(rng.integers(2, 5))
    x = rng.integers(-128, 128, (batch, int(np.prod(shape))), dtype=np.int8)
    golden = network_golden(layers, x, shape, CONV_ARCH.lanes)
    assert len(np.unique(golden)) > 8, "the outputs must carry information"
    _assert_verilator_equals_emulator_and_golden(program, pack_flits(x, CONV_ARCH.lanes, program.input), batch, golden)


# --- (b'') a residual block on the real chip (section 4.2) ----------------------------------------------

#: On CONV_ARCH's four tiles: a 3x3 convolution (pad 1, 3 -> 3 channels) split over two tiles by output
#: rows is the main branch; its input stays in the stream in front of its output (the first tile
#: forwards it and so does the last), and two ADD tiles (row bands) join skip and main branch, the skip
#: as operand a or as operand b (``Residual.skip``).
RES_SHAPE, RES_BATCH = (3, 3, 3), 3


@pytest.fixture(scope="module", params=["a", "b"])
def residual_case(request):
    """``skip``: which ADD operand the block input is ("b": operand b first in the stream)."""
    from flowtile.host import pack_flits
    from flowtile.testing.program_builder import AddParams, Conv, Residual, build_program, network_golden
    rng = np.random.default_rng(5)
    channels = RES_SHAPE[0]
    conv = Conv(rng.integers(-128, 128, (channels, channels, 3, 3), dtype=np.int8), rng.integers(-3000, 3000, channels),
                MULTIPLIER, SHIFT + 1, zp_in=-5, zp_out=2, clamp_lo=2, pads=(1, 1, 1, 1), tiles=2)
    add = AddParams(2**22, 3 * 2**20, rng.integers(2**30, 2**31, channels), 53, zp_a=-5, zp_b=2, zp_out=-3,
                    clamp_lo=-100, clamp_hi=100)
    layers = [Residual([conv], add, tiles=2, skip=request.param)]
    program = build_program(CONV_ARCH, layers, input_shape=RES_SHAPE, act_fill=rng)
    x = rng.integers(-128, 128, (RES_BATCH, int(np.prod(RES_SHAPE))), dtype=np.int8)
    golden = network_golden(layers, x, RES_SHAPE, CONV_ARCH.lanes)
    assert len(np.unique(golden)) > 20, "the residual output must carry information"
    return program, pack_flits(x, CONV_ARCH.lanes, program.input), golden, request.param


def _assert_verilator_equals_emulator_and_golden(program, in_flits, batch, golden):
    """Emulator and Verilator both produce ``golden``, with the same output transfer cycles."""
    from flowtile.emulator import emulate
    emulated = emulate(program, in_flits, batch)
    np.testing.assert_array_equal(emulated.out_flits, golden)
    result = rtl.simulate(program, in_flits, batch)
    np.testing.assert_array_equal(result.out_flits, golden)
    np.testing.assert_array_equal(result.out_times, emulated.out_times)
    assert result.cycles == emulated.cycles


@pytest.mark.rtl
def test_residual_block_verilator_matches_emulator(residual_case):
    program, in_flits, golden, skip = residual_case
    assert [t.config.op for t in program.tiles] == [OP_MAC, OP_MAC, OP_ADD, OP_ADD]
    map_words = RES_SHAPE[1] * RES_SHAPE[2]        # 3 channels: one word a pixel
    offsets = (0, map_words) if skip == "a" else (map_words, 0)     # the skip is in front of the main output
    assert [(t.config.operand_a_offset, t.config.operand_b_offset) for t in program.tiles[2:]] == [offsets] * 2
    _assert_verilator_equals_emulator_and_golden(program, in_flits, RES_BATCH, golden)


#: On CONV_ARCH's four tiles: ``concat(conv(x), x)`` for a 3-channel 3x3 map ``x``: the 3x3 convolution
#: (pad 1, 3 -> 4 channels, one word a pixel) split over two tiles keeps ``x`` in the stream in front of
#: its output, so operand b (``x``, with a padding lane) comes first (``operand_b_offset = 0``,
#: ``operand_a_offset = 9``); two CONCAT tiles (row bands) requantize the 4 + 3 channels (2 words a pixel).
CAT_SHAPE, CAT_BATCH = (3, 3, 3), 3


@pytest.fixture(scope="module")
def concat_case():
    from flowtile.host import pack_flits
    from flowtile.testing.program_builder import Concat, ConcatParams, Conv, build_program, network_golden
    rng = np.random.default_rng(6)
    channels = CAT_SHAPE[0]
    conv = Conv(rng.integers(-128, 128, (4, channels, 3, 3), dtype=np.int8), rng.integers(-3000, 3000, 4),
                MULTIPLIER, SHIFT + 1, zp_in=-5, zp_out=2, clamp_lo=2, pads=(1, 1, 1, 1), tiles=2)
    params = ConcatParams(3 * 2**20, 2**22, rng.integers(2**30, 2**31, 4 + channels), 53, zp_a=2, zp_b=-5,
                          zp_out=-3, clamp_lo=-100, clamp_hi=100)
    layers = [Concat([conv], [], params, tiles=2)]
    program = build_program(CONV_ARCH, layers, input_shape=CAT_SHAPE, act_fill=rng)
    x = rng.integers(-128, 128, (CAT_BATCH, int(np.prod(CAT_SHAPE))), dtype=np.int8)
    golden = network_golden(layers, x, CAT_SHAPE, CONV_ARCH.lanes)
    assert len(np.unique(golden)) > 20, "the concat output must carry information"
    return program, pack_flits(x, CONV_ARCH.lanes, program.input), golden


@pytest.mark.rtl
def test_concat_block_verilator_matches_emulator(concat_case):
    program, in_flits, golden = concat_case
    assert [t.config.op for t in program.tiles] == [OP_MAC, OP_MAC, OP_CONCAT, OP_CONCAT]
    assert [(t.config.words_per_pixel, t.config.concat_words_a, t.config.operand_a_offset,
             t.config.operand_b_offset) for t in program.tiles[2:]] == [(2, 1, 9, 0)] * 2
    _assert_verilator_equals_emulator_and_golden(program, in_flits, CAT_BATCH, golden)


# --- (c) waveforms -------------------------------------------------------------------------------------

@pytest.mark.rtl
def test_waves_written_by_both_simulators(tmp_path):
    program = _loopback_program(FLOW_ARCH, 0x11, 8)
    in_flits = np.arange(2 * FLOW_ARCH.lanes, dtype=np.int8).reshape(2, FLOW_ARCH.lanes)
    vcd = tmp_path / "amaranth.vcd"
    rtl.simulate(program, in_flits, 1, simulator="amaranth", waves=vcd, chip_factory=LoopbackChip)
    assert vcd.stat().st_size > 0
    fst = tmp_path / "sim_waves" / "verilator.fst"
    rtl.simulate(program, in_flits, 1, waves=fst, build_root=tmp_path / "build", chip_factory=LoopbackChip)
    assert fst.stat().st_size > 0
