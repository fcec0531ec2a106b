"""Small chips (2x2, 1x3, 3x1) in Amaranth's simulator running hand-built programs (a one-layer program;
a residual block whose stream carries two tensors into an ADD split over two tiles; the same stream into a
channel CONCAT split over two tiles; a convolution split over bands of output pixels, whole rows or split
inside a row, and output-channel groups), and Verilog generation."""

import re

import numpy as np
import pytest
from amaranth.hdl import Fragment, Instance
from amaranth.sim import Simulator

from flowtile.arch import (ADD_MULT_MAX, CONFIG_FIELDS, OP_ADD, OP_CONCAT, OP_MAC, Arch, dense_window_registers,
                           stream_registers)
from flowtile.testing.archs import lean_arch
from flowtile.hdl.chip import TILE_MODULE_NAME, Chip
from flowtile.hdl.tile import Tile
from flowtile.hdl.layouts import (LOAD_TARGET_CONFIG, LOAD_TARGET_PARAMS, LOAD_TARGET_SRAM, encode_config,
                         encode_param_entry, flit_layout, load_data_bits, load_layout, pack_flit, pack_lanes,
                         pack_load, param_layout, unpack_lanes, unpack_struct)
from flowtile.hdl.verilog import chip_verilog, tile_verilog
from flowtile.testing.program_builder import config_with_queue

pytestmark = [pytest.mark.filterwarnings("ignore:.*created but never used"),
              pytest.mark.usefixtures("collect_unused_components")]


ARCH = lean_arch(rows=2, cols=2, lanes=4, sram_bytes=256, max_tile_outputs=8, result_ring_words=2, router_fifo_depth=2)
#: Also a row (exit by E, eastward hops) and a column (southward hops, exit by E since rows is odd).
GRIDS = [(2, 2), (1, 3), (3, 1)]
N_IN, N_OUT = 7, 6


def blank_config(**values):
    config = {name: 0 for name, _, _ in CONFIG_FIELDS}
    config.update(clamp_lo=-128, clamp_hi=127)
    config.update(values)
    return config


def build_program(rng, arch):
    """Chain tile 0 computes a dense layer N_IN -> N_OUT with ReLU; the other tiles pass its
    results along the chain to the host output."""
    lanes = arch.lanes
    k_words, n_result = -(-N_IN // lanes), -(-N_OUT // lanes)
    weights = rng.integers(-128, 128, size=(N_OUT, N_IN))
    bias = rng.integers(-3000, 3000, size=N_OUT)
    multiplier = rng.integers(1 << 30, 1 << 31, size=N_OUT)
    shift = rng.integers(36, 40, size=N_OUT)
    zp_out = -5
    chain = arch.chain
    configs = {}
    w_base, act_base = 0, N_OUT * k_words
    for position, (row, col) in enumerate(chain):
        last = position == len(chain) - 1
        dest = dict(dest_host=1) if last else dict(dest_row=chain[position + 1][0], dest_col=chain[position + 1][1])
        if position == 0:
            configs[row, col] = blank_config(n_in_words=k_words, n_out=N_OUT, w_base=w_base, act_base=act_base,
                                             zp_out=zp_out, clamp_lo=max(-128, zp_out), **dest,
                                             **dense_window_registers(k_words),
                                             **stream_registers(k_words, forward=False))
        else:
            configs[row, col] = config_with_queue(blank_config(n_pass=n_result, **dest), arch)
    # Weight row o, chunk k is SRAM word w_base + o*K + k; unused lanes are zero.
    padded = np.zeros((N_OUT, k_words * lanes), dtype=np.int64)
    padded[:, :N_IN] = weights
    sram = {w_base + o * k_words + k: list(padded[o, k * lanes:(k + 1) * lanes])
            for o in range(N_OUT) for k in range(k_words)}
    params = list(zip(bias.tolist(), multiplier.tolist(), shift.tolist()))
    golden = dict(weights=weights, bias=bias, multiplier=multiplier, shift=shift, zp_out=zp_out,
                  clamp_lo=max(-128, zp_out), clamp_hi=127)
    return configs, sram, params, golden


def numpy_dense(x, g):
    acc = g["bias"].astype(np.int64) + g["weights"].astype(np.int64) @ x.astype(np.int64)
    acc = ((acc + (1 << 31)) % (1 << 32)) - (1 << 31)
    y = ((acc * g["multiplier"] + (np.int64(1) << (g["shift"] - 1))) >> g["shift"]) + g["zp_out"]
    return np.clip(y, g["clamp_lo"], g["clamp_hi"])


def to_flits(vector, lanes):
    return [pack_lanes(vector[i:i + lanes].tolist(), lanes) for i in range(0, len(vector), lanes)]


def run_chip(arch, configs, srams, tables, flits, n_outputs, max_cycles=300):
    """Load ``configs`` {(row, col): config}, ``srams`` {(row, col): {addr: lanes}} and ``tables``
    {(row, col): [(bias, multiplier, shift)]}, run, send ``flits`` (packed data) back to back into the
    host input and take ``n_outputs`` flits from the always-ready host output: [(lanes, cycle)], cycle 0
    being the first cycle with run = 1."""
    received = []
    dut = Chip(arch)

    async def testbench(ctx):
        async def load(tile, target, addr, value):
            ctx.set(dut.load.valid, 1)
            ctx.set(dut.load.payload, {"tile": tile, "target": target, "addr": addr, "data": value})
            await ctx.tick()

        for (row, col), config in configs.items():
            for addr, value in encode_config(arch, config):
                await load(row * arch.cols + col, LOAD_TARGET_CONFIG, addr, value)
        for (row, col), sram in srams.items():
            for addr, lanes in sram.items():
                await load(row * arch.cols + col, LOAD_TARGET_SRAM, addr, pack_lanes(lanes, arch.lanes))
        for (row, col), table in tables.items():
            for index, entry in enumerate(table):
                await load(row * arch.cols + col, LOAD_TARGET_PARAMS, index, encode_param_entry(*entry))
        ctx.set(dut.load.valid, 0)
        ctx.set(dut.run, 1)
        ctx.set(dut.o_host.ready, 1)
        sent, cycle = 0, 0
        while len(received) < n_outputs:
            assert cycle < max_cycles, "chip stopped"
            ctx.set(dut.i_host.valid, sent < len(flits))
            if sent < len(flits):
                ctx.set(dut.i_host.payload, {"data": flits[sent], "dest_row": 0, "dest_col": 0, "dest_host": 0})
            if ctx.get(dut.i_host.valid) and ctx.get(dut.i_host.ready):
                sent += 1
            if ctx.get(dut.o_host.valid):
                payload = ctx.get(dut.o_host.payload)
                assert int(payload.dest_host) == 1
                received.append((unpack_lanes(int(payload.data), arch.lanes), cycle))
            await ctx.tick()
            cycle += 1

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(testbench)
    sim.run()
    return received


@pytest.mark.parametrize("rows, cols", GRIDS)
def test_two_inferences_through_a_small_chip(rows, cols):
    arch = ARCH.replace(rows=rows, cols=cols)
    rng = np.random.default_rng(2026)
    configs, sram, params, golden = build_program(rng, arch)
    inputs = [rng.integers(-128, 128, size=N_IN) for _ in range(2)]
    flits = [f for x in inputs for f in to_flits(x, arch.lanes)]
    n_result = -(-N_OUT // arch.lanes)
    received = run_chip(arch, configs, {arch.chain[0]: sram}, {arch.chain[0]: params}, flits, 2 * n_result)

    for i, x in enumerate(inputs):
        words = [lanes for lanes, _ in received[i * n_result:(i + 1) * n_result]]
        got = np.array([v for word in words for v in word])
        assert got[:N_OUT].tolist() == numpy_dense(x, golden).tolist()
        assert got[N_OUT:].tolist() == [0] * (len(got) - N_OUT)
    # Worked from section 6 for this chain (K = 2, N_o*K + 2 = 14 COMPUTE cycles, D = 2, a result ring of
    # R = 2 words): inference 0: host flits written at 0, 1, RECV at 1, 2; c_0 = 3. Result word 0 (outputs
    # 0..3, d = 4 * K = 8 issues) from a_0 = 3, written at 12, EMIT at 13; word 1 (outputs 4, 5, d = 4) from
    # a_1 = 11, EMIT at 11 + 4 + 2 = 17. Inference 1 is received into the other bank while inference 0
    # computes: RECV at 3 (>= c_0), 4; c_1 = max(4 + 1, a_1 + 4 + 2 = 17, EMIT 0 + 1 = 14) = 17 (COMPUTE back
    # to back), EMIT at 17 + 10 = 27 and 25 + 6 = 31. Each later (pass-through) tile adds 3 cycles (its input
    # FIFO, its forward queue and the L FIFO), the exit router's read 1 more.
    emits = [13, 17, 27, 31]
    assert [cycle for _, cycle in received] == [t + 3 * (arch.n_tiles - 1) + 1 for t in emits]


def rne(value, shift):
    """``value / 2^shift`` to nearest, ties to even (section 4), elementwise on int64 arrays."""
    quotient = value >> shift
    remainder = value - (quotient << shift)
    half = np.int64(1) << (shift - 1)
    return quotient + ((remainder > half) | ((remainder == half) & ((quotient & 1) == 1)))


def requantize(acc, table, zp_out, clamp_lo=-128, clamp_hi=127):
    acc = ((acc + (1 << 31)) % (1 << 32)) - (1 << 31)
    return np.clip(rne(acc * table[:, 1], table[:, 2]) + zp_out, clamp_lo, clamp_hi)


@pytest.mark.parametrize("ring_words", [4, 1])
@pytest.mark.parametrize("rows, cols", GRIDS)
def test_residual_block_carries_two_tensors_into_a_split_add(rows, cols, ring_words):
    """Section 4.2 end to end: x (a 2x2 map, CW = 1) enters chain tile 0, a 1x1 convolution that forwards
    x and then emits y = conv(x), so the stream is ``x ++ y``; tiles 1 and 2 compute z = ADD(x, y) in two
    row bands (tile 1 forwards both tensors to tile 2, tile 2 forwards none and passes tile 1's row);
    later tiles pass z to the host. With a result ring of 4 words (as many as tile 0's results) and of 1
    word (section 4: every result word then waits for the EMIT of the one before)."""
    lanes = ARCH.lanes
    arch = ARCH.replace(rows=rows, cols=cols, max_tile_outputs=ring_words * lanes, result_ring_words=ring_words)
    rng = np.random.default_rng(4242)
    height, width, n_pix = 2, 2, 4                  # one word (lanes channels) a pixel
    conv_weights = rng.integers(-128, 128, size=(lanes, lanes))
    conv_table = np.stack([rng.integers(-3000, 3000, size=lanes), rng.integers(1 << 30, 1 << 31, size=lanes),
                           rng.integers(36, 40, size=lanes)], axis=1)
    z_x, z_y, z_z = -3, 5, -9
    s_x, s_y, s_z = 0.04, 0.09, 0.1
    m_a, m_b = round(ADD_MULT_MAX * s_x / s_y), ADD_MULT_MAX
    # Section 4.2's lowering: zero points folded in the bias, M / 2^S ~= max(s_x, s_y) / (2^22 s_z).
    add_multiplier = round((1 << 53) * max(s_x, s_y) / (ADD_MULT_MAX * s_z))
    add_table = np.array([(-(z_x * m_a + z_y * m_b), add_multiplier, 53)] * lanes)
    chain = arch.chain
    window = dict(in_height=height, in_width=width, words_per_pixel=1, stride=1, out_width=width, n_out=lanes)
    configs = {}
    for position, (row, col) in enumerate(chain):
        last = position == len(chain) - 1
        dest = dict(dest_host=1) if last else dict(dest_row=chain[position + 1][0], dest_col=chain[position + 1][1])
        if position == 0:
            config = blank_config(n_in_words=n_pix, op=OP_MAC, kernel_h=1, kernel_w=1, out_rows=height, w_base=0,
                                  act_base=lanes, zp_out=z_y, **window, **stream_registers(n_pix, forward=True))
        elif position in (1, 2):
            config = blank_config(n_in_words=2 * n_pix, op=OP_ADD, kernel_h=1, kernel_w=2, out_row_begin=position - 1,
                                  out_rows=1, operand_a_offset=0, operand_b_offset=n_pix, add_mult_a=m_a,
                                  add_mult_b=m_b, act_base=3,
                                  zp_out=z_z, n_pass=width if position == 2 else 0, **window,
                                  **stream_registers(2 * n_pix, forward=position == 1))
        else:
            config = blank_config(n_pass=n_pix)
        configs[row, col] = config_with_queue(dict(config, **dest), arch)
    srams = {chain[0]: {o: conv_weights[o].tolist() for o in range(lanes)}}
    tables = {chain[0]: conv_table.tolist(), chain[1]: add_table.tolist(), chain[2]: add_table.tolist()}
    inputs = [rng.integers(-128, 128, size=(n_pix, lanes)) for _ in range(2)]
    flits = [pack_lanes(pixel.tolist(), lanes) for x in inputs for pixel in x]
    received = run_chip(arch, configs, srams, tables, flits, 2 * n_pix, max_cycles=400)

    for i, x in enumerate(inputs):
        y = requantize(conv_table[:, 0] + x @ conv_weights.T, conv_table, z_y)
        z = requantize(add_table[:, 0] + x * m_a + y * m_b, add_table, z_z)
        assert [lanes for lanes, _ in received[i * n_pix:(i + 1) * n_pix]] == z.tolist()
        # The integer ADD is the float Add of section 4.2 within 1 LSB.
        exact = ((x - z_x) * s_x + (y - z_y) * s_y) / s_z
        assert np.abs(z - np.clip(np.round(exact) + z_z, -128, 127)).max() <= 1
    # Inference 0 worked from sections 4 to 4.2 and 6 (D = 2): tile 0 RECVs x at 1..4 (pushed into its
    # forward queue, popped at 2..5), COMPUTEs from c_0 = 5 for I + 2 = 4 pixels * 4 outputs + 2 = 18 cycles,
    # one result word a pixel (d = 4 issues, from a = 5, 9, 13, 17), and EMITs each 2 cycles after its last
    # issue: y at 11, 15, 19, 23. Tile 1 receives x at 4..7 and y at 13, 17, 21, 25 (2 cycles a hop), pops
    # them at 5..8 and 14, 18, 22, 26, COMPUTEs from 26 for I + 2 = 1 row * 2 pixels * 1 word * 2 + 2 = 6
    # cycles (words from 26 and 28), EMITs at 30, 32. Tile 2 receives the forwarded stream at 7..10 and
    # 16, 20, 24, 28 (c_0 = 29, words EMITtable from 33 and 35), PASSes tile 1's results at 32, 34, pops them
    # at 33, 35, EMITs at 36, 37. Each later (pass-through) tile adds 3 cycles, the exit router's read 1 more.
    # With R = 1, a word's first issue waits for the previous word's EMIT: tile 0's words from a = 5, 12, 19,
    # 26 (EMITs at a + 6: 11, 18, 25, 32); tile 1 receives y at 13, 20, 27, 34, COMPUTEs from 35 (words from
    # 35 and 40 = EMIT 0 + 1), EMITs at 39, 44; tile 2 receives y at 16, 23, 30, 37, COMPUTEs from 38, pops
    # tile 1's results (received at 41, 46) at 42, 47, EMITs word 0 at 48, and word 1 (issued from 49) at 53.
    tile_2 = (33, 35, 36, 37) if ring_words == 4 else (42, 47, 48, 53)
    assert [cycle for _, cycle in received[:n_pix]] == [t + 3 * (arch.n_tiles - 3) + 1 for t in tile_2]


@pytest.mark.parametrize("rows, cols", GRIDS)
def test_conv_and_its_input_concatenated_by_a_split_concat(rows, cols):
    """Section 4.3 end to end: as in the residual test, chain tile 0 forwards x (a 2x2 map, CW = 1) and
    emits y = conv(x), so the stream is ``x ++ y``; tiles 1 and 2 compute z = CONCAT(y, x) (CW = 2: y's
    channels first, so operand a = y is stored after operand b = x) in two row bands; later tiles pass z
    (two words a pixel) to the host."""
    lanes = ARCH.lanes
    arch = ARCH.replace(rows=rows, cols=cols, max_tile_outputs=4 * lanes, result_ring_words=4)
    rng = np.random.default_rng(4343)
    height, width, n_pix = 2, 2, 4
    conv_weights = rng.integers(-128, 128, size=(lanes, lanes))
    conv_table = np.stack([rng.integers(-3000, 3000, size=lanes), rng.integers(1 << 30, 1 << 31, size=lanes),
                           rng.integers(36, 40, size=lanes)], axis=1)
    z_x, z_y, z_z = 7, -4, 2
    s_x, s_y, s_z = 0.05, 0.03, 0.06
    m_a, m_b = round(ADD_MULT_MAX * s_y / max(s_x, s_y)), round(ADD_MULT_MAX * s_x / max(s_x, s_y))
    # Section 4.3's lowering: M / 2^S ~= max(s_x, s_y) / (2^22 s_z); per channel bias -z_a m_a for a's (y's)
    # channels, -z_b m_b for b's (x's).
    multiplier = round((1 << 53) * max(s_x, s_y) / (ADD_MULT_MAX * s_z))
    concat_table = np.array([(-z_y * m_a, multiplier, 53)] * lanes + [(-z_x * m_b, multiplier, 53)] * lanes)
    chain = arch.chain
    configs = {}
    for position, (row, col) in enumerate(chain):
        last = position == len(chain) - 1
        dest = dict(dest_host=1) if last else dict(dest_row=chain[position + 1][0], dest_col=chain[position + 1][1])
        if position == 0:
            config = blank_config(n_in_words=n_pix, op=OP_MAC, in_height=height, in_width=width, words_per_pixel=1,
                                  kernel_h=1, kernel_w=1, stride=1, out_rows=height, out_width=width, n_out=lanes,
                                  w_base=0, act_base=lanes, zp_out=z_y, **stream_registers(n_pix, forward=True))
        elif position in (1, 2):
            config = blank_config(n_in_words=2 * n_pix, op=OP_CONCAT, in_height=height, in_width=width,
                                  words_per_pixel=2, concat_words_a=1, kernel_h=1, kernel_w=1, stride=1,
                                  out_row_begin=position - 1, out_rows=1, out_width=width, n_out=2 * lanes,
                                  operand_a_offset=n_pix, operand_b_offset=0, add_mult_a=m_a, add_mult_b=m_b,
                                  act_base=3, zp_out=z_z, n_pass=2 * width if position == 2 else 0,
                                  **stream_registers(2 * n_pix, forward=position == 1))
        else:
            config = blank_config(n_pass=2 * n_pix)
        configs[row, col] = config_with_queue(dict(config, **dest), arch)
    srams = {chain[0]: {o: conv_weights[o].tolist() for o in range(lanes)}}
    tables = {chain[0]: conv_table.tolist(), chain[1]: concat_table.tolist(), chain[2]: concat_table.tolist()}
    inputs = [rng.integers(-128, 128, size=(n_pix, lanes)) for _ in range(2)]
    flits = [pack_lanes(pixel.tolist(), lanes) for x in inputs for pixel in x]
    received = run_chip(arch, configs, srams, tables, flits, 2 * 2 * n_pix, max_cycles=400)

    for i, x in enumerate(inputs):
        y = requantize(conv_table[:, 0] + x @ conv_weights.T, conv_table, z_y)
        joined = np.concatenate([y * m_a, x * m_b], axis=1)          # pixel p: channels of y, then of x
        z = requantize(concat_table[:, 0] + joined, concat_table, z_z)
        got = [lanes for lanes, _ in received[i * 2 * n_pix:(i + 1) * 2 * n_pix]]
        assert got == z.reshape(2 * n_pix, lanes).tolist()
        # The integer CONCAT is the float Concat of section 4.3 within 1 LSB.
        exact = np.concatenate([(y - z_y) * s_y, (x - z_x) * s_x], axis=1) / s_z
        assert np.abs(z - np.clip(np.round(exact) + z_z, -128, 127)).max() <= 1
    # Inference 0 worked from sections 4, 4.3 and 6 (D = 2): tile 0 as in the residual test (y EMITted at
    # 11, 15, 19, 23). Tile 1 receives x at 4..7 and y at 13, 17, 21, 25, COMPUTEs from 26 for I + 2 = 1 row
    # * 2 pixels * 2 words + 2 = 6 cycles (one issue a word, words from 26..29), EMITs 4 words at 29..32.
    # Tile 2 receives the forwarded stream at 7..10 and 16, 20, 24, 28 (c_0 = 29, words EMITtable from
    # 32..35), PASSes tile 1's results at 31..34, pops them at 32..35, EMITs at 36..39. Each later
    # (pass-through) tile adds 3 cycles, the exit router's read 1 more.
    assert [cycle for _, cycle in received[:2 * n_pix]] == [t + 3 * (arch.n_tiles - 3) + 1 for t in range(32, 40)]


def numpy_conv(x, weights, table, zp_out, pad):
    """A stride-1 convolution of the map x [H, W, C] with weights [O, KH, KW, C], zero padding ``pad``
    (the input zero point is 0), requantized with ``table`` [O, 3]: [H', W', O]."""
    out_channels, kernel_h, kernel_w, _ = weights.shape
    padded = np.pad(x.astype(np.int64), ((pad, pad), (pad, pad), (0, 0)))
    out_h, out_w = padded.shape[0] - kernel_h + 1, padded.shape[1] - kernel_w + 1
    acc = np.zeros((out_h, out_w, out_channels), dtype=np.int64)
    for ky in range(kernel_h):
        for kx in range(kernel_w):
            acc += padded[ky:ky + out_h, kx:kx + out_w] @ weights[:, ky, kx, :].T.astype(np.int64)
    return requantize(table[:, 0] + acc, table, zp_out)


def band_registers(first, last, width):
    """Section 4.1's band registers of output pixels [first, last) of a map ``width`` pixels wide (row-major):
    out_row_begin, out_rows, out_col_begin, out_col_end (0 when the last row is whole)."""
    row_begin, last_row = first // width, (last - 1) // width
    return dict(out_row_begin=row_begin, out_rows=last_row - row_begin + 1, out_col_begin=first % width,
                out_col_end=(last - 1) % width + 1 if (last - 1) % width + 1 < width else 0)


@pytest.mark.parametrize("split, pixel_bands", [("rows", [(0, 4), (4, 6)]), ("pixels", [(0, 3), (3, 6)])])
@pytest.mark.parametrize("rows, cols", [(2, 2)])
def test_convolution_split_over_bands_and_output_channel_groups(rows, cols, split, pixel_bands):
    """Section 4.4 end to end: a 3x3 convolution (pad 1) of a 3x2 map of L channels to 2L + 3 channels split
    over 2 bands of output pixels x 2 output-channel groups (group 0: channels 0..2L-1, two words a pixel;
    group 1: the 3 others, one word), chain tiles (band 0, group 0), (0, 1), (1, 0), (1, 1). The bands are
    whole rows (pixels [0, 4) and [4, 6): rows 0..1 and row 2) or, section 4.1, split inside a row (pixels
    [0, 3): row 0 and row 1's column 0, out_col_end = 1; [3, 6): row 1 from column 1, out_col_begin = 1, and
    row 2). Every tile stores the whole map; the group-1 tiles interleave pass_per_pixel = 2 passed words
    (group 0's) before their own word of each of their pixels, and the band-1 tiles first pass band 0's
    complete pixels (P_bulk). The host receives the whole output map pixel-major with all channels (three
    words a pixel), two inferences."""
    lanes = ARCH.lanes
    arch = ARCH.replace(rows=rows, cols=cols, sram_bytes=128 * lanes, max_tile_outputs=8 * lanes,
                        result_ring_words=8)
    rng = np.random.default_rng(4444)
    height, width, pad = 3, 2, 1
    n_pix = height * width
    groups = [(0, 2 * lanes), (2 * lanes, 2 * lanes + 3)]           # channels [o_g, o_{g+1})
    group_words = [-(-(end - begin) // lanes) for begin, end in groups]
    bands = [band_registers(first, last, width) for first, last in pixel_bands]
    if split == "pixels":
        assert bands == [dict(out_row_begin=0, out_rows=2, out_col_begin=0, out_col_end=1),
                         dict(out_row_begin=1, out_rows=2, out_col_begin=1, out_col_end=0)]
    n_channels = groups[-1][1]
    weights = rng.integers(-128, 128, size=(n_channels, 3, 3, lanes))
    table = np.stack([rng.integers(-3000, 3000, size=n_channels), rng.integers(1 << 30, 1 << 31, size=n_channels),
                      rng.integers(37, 41, size=n_channels)], axis=1)
    zp_out = -2
    chain = arch.chain
    layer_tiles = [(b, g) for b in range(len(bands)) for g in range(len(groups))]
    configs, srams, tables = {}, {}, {}
    passed = 0          # words a tile passes: what the layer's tiles before it emit (besides the forwarded map)
    for position, (row, col) in enumerate(chain):
        last = position == len(chain) - 1
        dest = dict(dest_host=1) if last else dict(dest_row=chain[position + 1][0], dest_col=chain[position + 1][1])
        if position < len(layer_tiles):
            b, g = layer_tiles[position]
            band_pixels_before, band_pixels_end = pixel_bands[b]
            band_pixels = band_pixels_end - band_pixels_before
            begin, end = groups[g]
            per_pixel = sum(group_words[:g])
            n_pass = band_pixels_before * sum(group_words) + band_pixels * per_pixel
            assert passed == n_pass
            n_weights = (end - begin) * 9
            config = blank_config(n_in_words=n_pix, op=OP_MAC, in_height=height, in_width=width, words_per_pixel=1,
                                  kernel_h=3, kernel_w=3, stride=1, pad_top=pad, pad_left=pad, **bands[b],
                                  out_width=width, n_out=end - begin, w_base=0, act_base=n_weights,
                                  zp_out=zp_out, n_pass=n_pass, pass_per_pixel=per_pixel,
                                  **stream_registers(n_pix, forward=position < len(layer_tiles) - 1))
            # Weight of channel o, kernel position (ky, kx): word (o - o_g) * 9 + ky * 3 + kx.
            srams[row, col] = {(o - begin) * 9 + ky * 3 + kx: weights[o, ky, kx].tolist()
                               for o in range(begin, end) for ky in range(3) for kx in range(3)}
            tables[row, col] = table[begin:end].tolist()
            passed = n_pass + band_pixels * group_words[g]
        else:
            config = blank_config(n_pass=passed)
        configs[row, col] = config_with_queue(dict(config, **dest), arch)
    assert passed == n_pix * sum(group_words)
    inputs = [rng.integers(-128, 128, size=(height, width, lanes)) for _ in range(2)]
    flits = [pack_lanes(pixel.tolist(), lanes) for x in inputs for pixel in x.reshape(n_pix, lanes)]
    received = run_chip(arch, configs, srams, tables, flits, 2 * passed, max_cycles=1200)

    for i, x in enumerate(inputs):
        y = numpy_conv(x, weights, table, zp_out, pad).reshape(n_pix, n_channels)
        # Pixel-major, all channels: word j of pixel q holds channels jL .. jL + L - 1 (zero beyond n_channels).
        expected = np.zeros((n_pix, passed // n_pix * lanes), dtype=np.int64)
        expected[:, :n_channels] = y
        got = [word for word, _ in received[i * passed:(i + 1) * passed]]
        assert got == expected.reshape(-1, lanes).tolist(), f"inference {i}: the merged stream is not pixel-major"
        assert len({v for word in got for v in word}) > 2 * lanes, "results saturated: a weak check"
    cycles = [cycle for _, cycle in received]
    assert cycles == sorted(set(cycles))


TINY = lean_arch(rows=1, cols=2, lanes=2, sram_bytes=32, max_tile_outputs=2, result_ring_words=1)


def test_chip_verilog_names_the_module_and_ports():
    text = chip_verilog(TINY, name="tiny_chip", quiet=True)
    assert "module tiny_chip" in text
    for port in ("load__valid", "load__payload", "run", "i_host__payload", "o_host__valid"):
        assert port in text


def _module_names(text):
    return re.findall(r"^module\s+(\S+?)\s*\(", text, re.M)


def _tile_instantiations(text):
    return re.findall(rf"^\s*{TILE_MODULE_NAME}\s+(tile_r\d+c\d+)\s*\(", text, re.M)


@pytest.mark.parametrize("rows, cols", [(2, 3), (3, 3)])
def test_chip_verilog_defines_the_tile_once_and_instantiates_it_per_tile(rows, cols):
    arch = TINY.replace(rows=rows, cols=cols)
    text = chip_verilog(arch, quiet=True)
    modules = _module_names(text)
    assert modules.count(TILE_MODULE_NAME) == 1
    assert modules.count("flowtile_chip") == 1
    # Besides the chip, only the tile and its own submodules (router, PE, FIFOs) are modules.
    assert all(name == "flowtile_chip" or name.lstrip("\\").startswith(TILE_MODULE_NAME) for name in modules)
    assert sorted(_tile_instantiations(text)) == sorted(f"tile_r{r}c{c}" for r in range(rows) for c in range(cols))


def test_chip_verilog_grows_by_about_one_instantiation_per_tile():
    sizes = {n: len(chip_verilog(TINY.replace(rows=1, cols=n), quiet=True)) for n in (2, 4, 8)}
    per_tile = (sizes[8] - sizes[4]) / 4
    assert (sizes[4] - sizes[2]) / 2 == pytest.approx(per_tile, rel=0.25)
    # An instantiation with its nets is a few dozen lines, far below a tile module's text.
    tile_module = len(tile_verilog(TINY))
    assert per_tile < 4000 < tile_module
    assert sizes[8] < tile_module + 8 * 4000


def test_chip_verilog_reports_progress_on_stderr(capsys):
    chip_verilog(TINY)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("[flowtile] generating tile module")
    assert lines[-1].startswith("[flowtile] Verilog generated in")


def test_instance_form_elaborates_one_tile_instance_per_position():
    # The instance form cannot run in Amaranth's simulator, but it elaborates to one Instance per tile.
    chip = Chip(TINY, tiles="instances")
    fragment = Fragment.get(chip, None)
    instances = [sub for sub, _, _ in fragment.subfragments if isinstance(sub, Instance)]
    assert len(instances) == TINY.n_tiles
    assert {instance.type for instance in instances} == {TILE_MODULE_NAME}


@pytest.mark.parametrize("kwargs, error, message", [
    ({"arch": {"rows": 2}}, TypeError, "Chip: parameter 'arch' must be a flowtile.arch.Arch"),
    ({"arch": TINY, "tiles": "flat"}, ValueError,
     "Chip: parameter 'tiles' must be one of 'submodules', 'instances', got 'flat'"),
    ({"arch": TINY, "tile_module": "flowtile tile"}, ValueError,
     "Chip: parameter 'tile_module' must be a Verilog identifier, got 'flowtile tile'"),
])
def test_chip_parameter_validation(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        Chip(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"arch": "2x2"}, "chip_verilog: parameter 'arch' must be a flowtile.arch.Arch"),
    ({"arch": TINY, "name": "1chip"}, "chip_verilog: parameter 'name' must be a Verilog identifier, got '1chip'"),
    ({"arch": TINY, "name": TILE_MODULE_NAME}, "chip_verilog: parameter 'name' must differ from the tile module's name"),
])
def test_chip_verilog_parameter_validation(kwargs, message):
    with pytest.raises((TypeError, ValueError), match=re.escape(message)):
        chip_verilog(**kwargs)


def test_tile_rejects_a_non_arch():
    with pytest.raises(TypeError, match="Tile: parameter 'arch' must be a flowtile.arch.Arch"):
        Tile("4x4")


@pytest.mark.parametrize("lanes", [1, 8, 16])
def test_layout_widths_and_flat_packing_match_amaranth(lanes):
    arch = lean_arch(rows=3, cols=5, lanes=lanes)
    assert flit_layout(arch).size == 8 * lanes + arch.row_bits + arch.col_bits + 1
    assert load_data_bits(arch) == max(8 * lanes, 69)
    assert param_layout().size == 69
    fields = {"tile": 14, "target": LOAD_TARGET_PARAMS, "addr": 511,
              "data": encode_param_entry(-7, (1 << 31) - 1, 62)}
    assert pack_load(arch, **fields) == load_layout(arch).const(fields).as_bits()
    flit = {"data": pack_lanes([-1] * lanes, lanes), "dest_row": 2, "dest_col": 4, "dest_host": 1}
    assert pack_flit(arch, **flit) == flit_layout(arch).const(flit).as_bits()
    assert unpack_struct(param_layout(), fields["data"]) == {"bias": -7, "multiplier": (1 << 31) - 1, "shift": 62}
