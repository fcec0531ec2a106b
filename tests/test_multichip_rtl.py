"""Several chips in a line on Verilator (issue "multi-chip", faults off): the RTL of chips joined by links against
the emulator, bit for bit and cycle for cycle, and the outputs against one chip with the same tiles.

Networks come from :mod:`flowtile.testing.random_models` (quantized by onnxruntime), compiled by the multi-chip
partitioner; the chips are small (2x2 and 1x2 tiles) so that each network needs the chips and every link carries a
stream. Each Arch is one Verilator build (cached).
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from flowtile.arch import Arch
from flowtile.testing.archs import lean_arch
from flowtile.compiler import CompileError, compile_model
from flowtile.testing.oracle_checks import assert_rtl_matches_emulator, emulate_model
from flowtile.testing.random_models import quantize_qdq, random_float_mlp, random_float_resnet

pytestmark = pytest.mark.rtl

#: (name, chips, one chip's grid, link fields): fast and slow links, a window and a credit of one frame.
SYSTEMS = [
    # frames of 4 flits: with the default 16 the partitioner keeps the MLP on chip 0 (its cuts would cost a whole
    # 16-flit frame per inference); the 4-chip system runs the default frames
    ("2 chips of 2x2, link 1/16, latency 16, frames of 4", 2, (2, 2), {"link_latency_cycles": 16,
                                                                      "link_frame_flits": 4}),
    ("4 chips of 1x2, 1-bit link, latency 64, window and credit 2", 4, (1, 2),
     {"link_bits_per_cycle": 1, "link_latency_cycles": 64, "link_replay_frames": 2, "link_credit_frames": 2}),
]


def _int8_model(tmp_path, float_model, in_shape, seed):
    rng = np.random.default_rng(seed)
    onnx.save(float_model, tmp_path / "float.onnx")
    calibration = rng.standard_normal((16, *in_shape)).astype(np.float32)
    return quantize_qdq(tmp_path / "float.onnx", tmp_path / "qdq.onnx", calibration, activation_uint8=False,
                        per_channel=True)


def _networks(tmp_path):
    rng = np.random.default_rng(11)
    mlp = random_float_mlp(rng, [24, 32, 20, 12, 10])
    resnet = random_float_resnet(rng, (3, 6, 6), 8, [{"kind": "basic", "out": 8, "stride": 1}], 5)
    (tmp_path / "mlp").mkdir()
    (tmp_path / "resnet").mkdir()
    return [("mlp", _int8_model(tmp_path / "mlp", mlp, (24,), 1), (24,)),
            ("resnet", _int8_model(tmp_path / "resnet", resnet, (3, 6, 6), 2), (3, 6, 6))]


@pytest.mark.parametrize("name, chips, grid, link", SYSTEMS, ids=[s[0] for s in SYSTEMS])
def test_chips_in_a_line_match_the_emulator_and_one_chip(tmp_path, name, chips, grid, link):
    # rings of 8 words (what max_tile_outputs = 64 gave before the ring had its field): rings that fill
    arch = lean_arch(rows=grid[0], cols=grid[1], lanes=8, sram_bytes=4096, max_tile_outputs=64, result_ring_words=8,
                     chips=chips, **link)
    big = lean_arch(rows=grid[0] * chips, cols=grid[1], lanes=8, sram_bytes=4096, max_tile_outputs=64, result_ring_words=8)
    rng = np.random.default_rng(chips)
    for network, model, in_shape in _networks(tmp_path):
        if chips == 4:   # these chips are too small for either network alone
            with pytest.raises(CompileError):
                compile_model(model, arch.replace(chips=1))
        program = compile_model(model, arch)
        crossing = [link.inference_flits for link in program.links]
        assert len(crossing) == chips - 1 and min(crossing) > 0, (network, crossing)
        used = {tile.chip for tile in program.tiles if tile.config.n_out}
        assert len(used) >= 2, f"{network} computes on chips {sorted(used)} only"
        x = rng.standard_normal((3, *in_shape)).astype(np.float32)
        assert_rtl_matches_emulator(program, x)
        # the outputs are those of one chip with as many tiles (the links move flits, never change them)
        one_chip = emulate_model(compile_model(model, big), x)
        # (N chips may run copies of the network on alternate inferences: their batch is padded to a multiple)
        np.testing.assert_array_equal(emulate_model(program, x).result.out_flits[:len(one_chip.result.out_flits)],
                                      one_chip.result.out_flits)


def test_dense_frames_with_pixel_periods_match_the_emulator():
    """Lane tables whose pixels span two words (12 channels in 8 lanes: 8 + 4 bytes a pixel) on the Verilator build
    of the second system above (same Arch, so the same cached build): a 3x3 convolution in two row bands on chip 0,
    whose output crosses link 0 as 12 bytes a pixel instead of 16, then a max pool and a dense layer. RTL ==
    emulator in every output flit and cycle; the outputs are the network's (program_builder's golden model)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from test_emulator_multichip import dense, networks, run
    from flowtile.host import pack_flits
    from flowtile.link_format import LaneSegment, lane_segments_of_tensors
    from flowtile.rtl.simulate import simulate
    from flowtile.testing.program_builder import Conv, MaxPool, network_golden
    rng = np.random.default_rng(23)
    shape, lanes = (1, 6, 6), 8
    conv = Conv(rng.integers(-128, 128, (12, 1, 3, 3), dtype=np.int8), rng.integers(-500, 500, 12), 2**30, 38,
                zp_in=-3, zp_out=2, clamp_lo=-128, pads=(1, 1, 1, 1), tiles=2)
    layers = [conv, MaxPool(2, 2, stride=2, tiles=1), dense(rng, 3 * 3 * 2 * lanes, 7, 1)]
    tables = [lane_segments_of_tensors([(36, 12)], lanes)[0], lane_segments_of_tensors([(1, 7)], lanes)[0],
              lane_segments_of_tensors([(1, 7)], lanes)[0]]
    assert tables[0] == (LaneSegment(72, 2, 4),)
    link = SYSTEMS[1][3]
    program, _ = networks(layers, 4, 1, 2, lanes=lanes, input_shape=shape, segments=tables, **link)
    assert program.arch == lean_arch(rows=1, cols=2, lanes=8, sram_bytes=4096, max_tile_outputs=64, result_ring_words=8,
                                     chips=4, **link)
    assert program.links[0].inference_flits == 72
    batch = 4
    x = rng.integers(-128, 128, (batch, 36), dtype=np.int8)
    emulated = run(program, x, batch)
    # 10 pixels (120 bytes) a frame of 128 bytes: 36 pixels in 4 frames (5 with every lane sent)
    assert emulated.links[0].frames_per_inference == 4
    np.testing.assert_array_equal(emulated.out_flits, network_golden(layers, x, shape, lanes))
    rtl = simulate(program, pack_flits(x, lanes, program.input), batch, simulator="verilator")
    np.testing.assert_array_equal(np.asarray(rtl.out_flits), emulated.out_flits)
    np.testing.assert_array_equal(np.asarray(rtl.out_times), emulated.out_times)
    assert rtl.cycles == emulated.cycles
