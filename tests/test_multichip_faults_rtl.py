"""Chips in a line on Verilator with faults on (issue "multi-chip", the bit-error rate done-when): the RTL of chips
joined by faulty links against the emulator (which simulates each faulty link exactly, emulator/link_faults.py),
with the same seed, rate and bursts: every output flit, every output cycle stamp and the cycle count equal; the
outputs equal a clean run's bit for bit; the emulator saw the link detect errors and replay frames.

Error rates are high (1e-3 .. 1e-2) so that a short run sees several errors, with and without bursts; at such rates
the cases use frames of 4 flits (a frame of the default 16 flits of 64 bits is 267 beats of a 4-bit wire: at 2e-3
per line it would see about 3 flips and rarely get through). One case runs the default frames at a rate they
survive. Each Arch is one Verilator build (cached): the link's error rate, seed and bursts are constants of its
Verilog, so every case is a build of its own (15-60 s on a machine without a build cache).

Two cases run only with ``FLOWTILE_LONG=1``, because the cases that always run check the same in kind: "2e-3 per
bit, no bursts" (faults without bursts on 2 chips of 2x2: the default-frames case; frames of 4 flits with faults:
the depth-1 case) and "6e-3 per bit, bursts of 4 cycles" (bursts on 2 chips of 2x2 with frames of 4: the depth-1
case, bursts of 2; longer bursts: the 4-chip case, bursts of 3). tests/test_emulator_link_faults.py checks the
link's own error injection, detection and replay against the RTL over many rates, seeds and bursts.
"""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest

from flowtile.arch import Arch
from flowtile.testing.archs import lean_arch
from flowtile.compiler import compile_model
from flowtile.emulator import emulate
from flowtile.testing.oracle_checks import input_flits
from flowtile.testing.random_models import quantize_qdq, random_float_mlp

pytestmark = pytest.mark.rtl

LONG = pytest.mark.skipif(not os.environ.get("FLOWTILE_LONG"),
                          reason="long: set FLOWTILE_LONG=1 (a Verilator build each; the other cases cover them in kind)")
#: (name, link fields; 2 chips of 2x2 with a latency of 16 and frames of 4 flits unless they say otherwise)
FAULTS = [
    pytest.param("2e-3 per bit, no bursts", {"link_error_rate": 0.002, "link_error_seed": 5}, marks=LONG,
                 id="2e-3 per bit, no bursts"),
    pytest.param("6e-3 per bit, bursts of 4 cycles", {"link_error_rate": 0.006, "link_burst_cycles": 4,
                                                      "link_error_seed": 9}, marks=LONG,
                 id="6e-3 per bit, bursts of 4 cycles"),
    ("4e-3 per bit, bursts of 2, router FIFOs of depth 1",
     {"link_error_rate": 0.004, "link_burst_cycles": 2, "link_error_seed": 4, "router_fifo_depth": 1}),
    ("4 chips of 1x2, 1-bit links, latency 64, window and credit 2, 5e-4 per bit in bursts of 3",
     {"rows": 1, "cols": 2, "chips": 4, "link_bits_per_cycle": 1, "link_latency_cycles": 64, "link_replay_frames": 2,
      "link_credit_frames": 2, "link_error_rate": 0.0005, "link_burst_cycles": 3, "link_error_seed": 12}),
    ("frames of 16 flits (the default), 3e-4 per bit", {"link_frame_flits": 16, "link_error_rate": 0.0003,
                                                        "link_error_seed": 5}),
]


def _mlp(tmp_path):
    rng = np.random.default_rng(11)
    onnx.save(random_float_mlp(rng, [24, 32, 20, 12, 10]), tmp_path / "float.onnx")
    calibration = np.random.default_rng(1).standard_normal((16, 24)).astype(np.float32)
    return quantize_qdq(tmp_path / "float.onnx", tmp_path / "qdq.onnx", calibration, activation_uint8=False,
                        per_channel=True)


@pytest.mark.parametrize("name, faults", FAULTS, ids=[f.id if hasattr(f, "id") else f[0] for f in FAULTS])
def test_faulty_links_rtl_equals_emulator_and_a_clean_run(tmp_path, name, faults):
    from flowtile.rtl.simulate import simulate
    common = dict(rows=2, cols=2, lanes=8, sram_bytes=4096, max_tile_outputs=64, chips=2, link_latency_cycles=16,
                  link_frame_flits=4)
    common.update(faults)
    model = _mlp(tmp_path)
    program = compile_model(model, lean_arch(**common))
    clean = compile_model(model, lean_arch(**{**common, "link_error_rate": 0.0, "link_burst_cycles": 1}))
    x = np.random.default_rng(2).standard_normal((8, 24)).astype(np.float32)
    _, flits = input_flits(program, x)
    batch = len(x)
    emu = emulate(program, flits, batch)
    reference = emulate(clean, flits, batch)
    np.testing.assert_array_equal(emu.out_flits, reference.out_flits)
    counters = {name: sum(link.counters[name] for link in emu.links) for name in emu.links[0].counters}
    assert counters["tx_replays"] > 0 and counters["rx_crc_errors"] + counters["rx_seq_errors"] > 0, counters
    assert counters["undetected"] == 0 and emu.cycles > reference.cycles
    rtl = simulate(program, flits, batch, simulator="verilator", max_cycles=20 * emu.cycles + 10_000)
    np.testing.assert_array_equal(np.asarray(rtl.out_flits), np.asarray(emu.out_flits))
    np.testing.assert_array_equal(np.asarray(rtl.out_times), np.asarray(emu.out_times))
    assert rtl.cycles == emu.cycles
    # every link's status counters (errors detected, replays, NAKs, timeouts, flips injected, ...) as the RTL's
    # registers hold them the cycle after the last output transfer, which is where the emulator reports them
    assert rtl.counters_cycle == emu.cycles and len(rtl.link_counters) == len(emu.links)
    for link, rtl_counters in zip(emu.links, rtl.link_counters):
        assert rtl_counters == {name: link.counters[name] for name in rtl_counters}, (link.link, rtl_counters)
