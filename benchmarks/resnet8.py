"""ResNet-8 (the MLPerf Tiny CIFAR-10 shape: 32x32x3 input, a 16-channel 3x3 stem, basic residual blocks
of 16, 32 (stride 2) and 64 (stride 2) channels, global average pool, 10 classes) with random weights.

Compiles it (float in, quantized by flowtile with a random calibration set) for a grid big enough to hold it,
runs a batch on the emulator, checks the outputs against onnxruntime's int8 model (<= 1 LSB), and prints
per-layer tiles and steady-state MAC utilization (layer MACs / (interval x layer tiles x lanes)) and the
whole network's. Optionally runs the same program in Verilator and compares (the first build of a large grid
takes many minutes). Run: ``python benchmarks/resnet8.py [--grid 11x11] [--batch 256] [--ring-words 1024] [--rtl]``.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

#: ResNet-8's blocks for tests/random_models.random_float_resnet.
RESNET8_BLOCKS = [{"kind": "basic", "out": 16}, {"kind": "basic", "out": 32, "stride": 2},
                  {"kind": "basic", "out": 64, "stride": 2}]


def main() -> None:
    os.environ.setdefault("AMARANTH_USE_YOSYS", "builtin")
    from flowtile.compiler import compile_model, report
    from flowtile.arch import Arch
    from flowtile.compiler import int8_model
    from flowtile.testing.measure import steady_state
    from flowtile.testing.oracle_checks import compare_with_onnxruntime, emulate_model
    from flowtile.testing.random_models import random_float_resnet

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default="11x11", help="tile grid RxC (default 11x11)")
    parser.add_argument("--sram-bytes", type=int, default=65536, help="per-tile SRAM (default 65536)")
    parser.add_argument("--max-tile-outputs", type=int, default=2048, help="parameter/result depth (default 2048)")
    parser.add_argument("--ring-words", type=int, default=Arch.result_ring_words,
                        help=f"per-tile result ring depth (default {Arch.result_ring_words}, the Arch default)")
    parser.add_argument("--batch", type=int, default=256,
                        help="inferences (default 256: a chain of 121 tiles settles after about two inferences a tile)")
    parser.add_argument("--tile-contexts", type=int, default=1,
                        help=f"layers a tile may hold (arch field tile_contexts; default 1, as README's ResNet-8 "
                             f"figures were measured; the Arch default is {Arch.tile_contexts})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rtl", action="store_true", help="also run Verilator and compare")
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    model = random_float_resnet(rng, (3, 32, 32), 16, RESNET8_BLOCKS, 10)
    calibration = rng.standard_normal((64, 3, 32, 32)).astype(np.float32)
    arch = Arch(sram_bytes=args.sram_bytes, max_tile_outputs=args.max_tile_outputs,
                result_ring_words=args.ring_words, tile_contexts=args.tile_contexts).with_grid(args.grid)

    started = time.perf_counter()
    int8 = int8_model(model, calibration)  # quantized once: the compiler and the oracle get the same model
    program = compile_model(int8, arch)
    print(f"compiled in {time.perf_counter() - started:.1f} s")
    print(report(program))

    x = rng.standard_normal((args.batch, 3, 32, 32)).astype(np.float32)
    started = time.perf_counter()
    emulated = emulate_model(program, x)
    emu_seconds = time.perf_counter() - started
    result, flits = emulated.result, emulated.flits
    worst = compare_with_onnxruntime(int8, program, x, emulated=emulated).worst

    # steady state: over the last half of the batch (flowtile.testing.measure); the mean over the whole batch
    # (EmulatorResult.interval_cycles) includes the fill.
    steady = steady_state(program, result, args.batch)
    interval = steady.interval
    print(f"\nemulator: batch {args.batch}, {result.cycles} cycles in {emu_seconds:.2f} s; latency "
          f"{result.latency_cycles}; interval {interval:.1f} cycles/inference over the last half of the batch "
          f"({result.interval_cycles:.1f} over all of it); max |flowtile - onnxruntime| = {worst} LSB")
    print(f"{'layer':18s} {'op':22s} {'tiles':>5s} {'MACs/inf':>10s} {'steady-state util':>18s}")
    for layer in program.layers:
        util = steady.layer_utilization(layer)
        print(f"{layer.name:18s} {layer.op + ('+Relu' if layer.relu else ''):22s} {len(layer.tiles):5d} "
              f"{layer.macs:10d} {100 * util:17.1f}%")
    used, whole = steady.used_tiles, steady.grid_utilization
    print(f"whole network: {program.macs_per_inference} MACs/inference on {arch.n_tiles} tiles ({used} computing): "
          f"steady-state MAC utilization {100 * whole:.1f}% (goal >= 90%); over the whole run "
          f"{100 * result.mac_utilization:.1f}%")
    if worst > 1:
        raise SystemExit(f"outputs differ from onnxruntime by {worst} LSB (> 1)")

    if args.rtl:
        from flowtile.rtl.simulate import simulate
        started = time.perf_counter()
        rtl = simulate(program, flits, args.batch)
        same = np.array_equal(rtl.out_flits, result.out_flits) and rtl.cycles == result.cycles
        print(f"RTL (Verilator, incl. any build): {time.perf_counter() - started:.0f} s, {rtl.cycles} cycles; "
              f"outputs and cycles equal to the emulator: {same}")
        if not same:
            raise SystemExit("RTL and emulator differ")


if __name__ == "__main__":
    main()
