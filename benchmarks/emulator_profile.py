"""Whole-network emulation time, split into its parts: MobileNetV1-0.25 and ResNet-8 (the committed MLPerf Tiny
QDQ files) on the README's grids, a batch of 64 by default.

Prints, per network, the best of ``--repeats`` runs of each part of :func:`flowtile.emulator.emulate`: the data
path (``trace_data_path``), the timing model (``solve_timing``: sweeps, extrapolation and its check) and the data
model (``run_functional``), with the cycles, the chain solves and whether the steady state was extrapolated.
``--profile`` adds the top entries of a cProfile run of each part. Run:
``python benchmarks/emulator_profile.py [--nets mobilenet,resnet8] [--batch 64] [--repeats 3] [--profile]``.

Measured (issue 12 item 4, batch 64, seconds on a lightly loaded 2-core machine, best of 3; ``emulate_model`` as a
whole in brackets, cold). Before the windows (11x11 tiles of 64 KiB for ResNet-8, 8x8 for MobileNet, one context a
tile):

=============  ==========================  ==========================
network        before (timing + data)      after (timing + data)
=============  ==========================  ==========================
MobileNet      6.8 + 0.30 = 7.1            0.47 + 0.23 = 0.70 (0.87)
ResNet-8       5.8 + 0.18 = 5.9            0.62 + 0.16 = 0.78 (1.36)
=============  ==========================  ==========================

Before: whole-batch Gauss-Seidel sweeps of a 16-inference probe (MobileNet: 96 rounds, 40,034 chain solves, one
ring turn of a PE's result ring per round), and for ResNet-8, whose times never become periodic within 64
inferences, probes of 16 and 32 and then the whole batch. After: windows of a few inferences
(emulator/timing.py, :class:`_WindowSystem`), the compute and output chains of a PE solved together, no re-solve
of chains whose new bounds already hold, extrapolation tried after every window (MobileNet's steady state sets in
after 5 inferences); the same times, action for action (tests/test_emulator_fast_paths.py). A cold run of
ResNet-8 spends about 0.5 s of its time first touching the 540 MB of times (68 M transfers) the result holds.

The default Arch's tiles of 8 contexts, on the README's grids (12x12 both; this script's defaults since;
``emulate_model`` as a whole in brackets, the second run in a process):

=====================  ==========================  ==========================
network                before (timing + data)      after (timing + data)
=====================  ==========================  ==========================
MobileNet              0.47 + 0.39 = 0.86 (1.10)   0.50 + 0.28 = 0.78 (1.03)
ResNet-8               1.78 + 0.44 = 2.23 (2.6)    0.89 + 0.23 = 1.13 (1.45)
ResNet-8, 1 context    0.82 + 0.24 = 1.06 (1.5)    0.83 + 0.16 = 1.00 (1.34)
=====================  ==========================  ==========================

Before: ResNet-8's tile of 4 contexts settles its loop-back FIFO a sweep round later than the rest, so every window
took 3 rounds and the windows shrank to one inference (64 windows, 37,939 solves); after, a window also counts as
cheap by its solves per chain (7 windows, 4,155 solves), BCAST results come from one GEMM and passed flits are
interleaved by slices. A batch of 320 (ResNet-8, 12x12, 8 contexts): 55.7 s before, 7.7 to 11 s after (one
context: 5.6 to 6.6 s): from inference 104 on its first 22 chains run 36 cycles an inference ahead of the rest, a
drifting candidate that the windows' check keeps up to inference 170, where a FIFO fills.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

NETS = ("mobilenet", "resnet8")


#: The README's grids (its MLPerf Tiny table), on the default Arch.
README_GRIDS = {"mobilenet": "12x12", "resnet8": "12x12"}


def arch_for(net: str, tile_contexts: int | None = None):
    """The default Arch on ``net``'s README grid; ``tile_contexts``: that many contexts a tile instead."""
    from flowtile.arch import Arch
    arch = Arch() if tile_contexts is None else Arch(tile_contexts=tile_contexts)
    return arch.with_grid(README_GRIDS[net])


def best_of(repeats: int, run):
    """(best wall seconds, best CPU seconds of this process, the last value): on a busy machine the CPU time is
    the closer to what the run takes alone."""
    best, cpu, value = float("inf"), float("inf"), None
    for _ in range(repeats):
        started, started_cpu = time.perf_counter(), time.process_time()
        value = run()
        best = min(best, time.perf_counter() - started)
        cpu = min(cpu, time.process_time() - started_cpu)
    return best, cpu, value


def profile(label: str, run) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    run()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(12)
    print(f"--- {label}\n" + "\n".join(out.getvalue().splitlines()[4:]))


def main() -> None:
    os.environ.setdefault("AMARANTH_USE_YOSYS", "builtin")
    from flowtile.compiler import compile_model, int8_model
    from flowtile.emulator import run_functional, solve_timing, trace_data_path
    from flowtile.host import input_flits

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default=",".join(NETS), help=f"comma-separated subset of {','.join(NETS)}")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="runs per part (the best time is kept)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="also print a cProfile summary of each part")
    parser.add_argument("--tile-contexts", type=int, default=None,
                        help="contexts a tile (default: the default Arch's)")
    args = parser.parse_args()

    print(f"{'network':10s} {'batch':>5s} {'path s':>7s} {'timing s':>9s} {'data s':>7s} {'total s':>8s} "
          f"{'(CPU s)':>8s} {'cycles':>10s} {'solves':>7s}  steady state")
    for net in args.nets.split(","):
        model = int8_model(ROOT / "models" / "public" / f"mlperf_{net}_qdq.onnx")
        program = compile_model(model, arch_for(net, args.tile_contexts))
        shape = tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:])
        x = np.random.default_rng(args.seed).standard_normal((args.batch, *shape)).astype(np.float32)
        _, flits = input_flits(program, x)
        path_s, path_cpu, path = best_of(args.repeats, lambda: trace_data_path(program))
        timing_s, timing_cpu, timing = best_of(args.repeats, lambda: solve_timing(program, args.batch, path))
        data_s, data_cpu, _ = best_of(args.repeats, lambda: run_functional(program, flits, args.batch, path, timing))
        print(f"{net:10s} {args.batch:5d} {path_s:7.2f} {timing_s:9.2f} {data_s:7.2f} "
              f"{path_s + timing_s + data_s:8.2f} {path_cpu + timing_cpu + data_cpu:8.2f} "
              f"{int(timing.out_times[-1]) + 1:10d} {timing.solves:7d}  "
              f"{'extrapolated' if timing.extrapolated else 'solved to the end'}")
        if args.profile:
            profile(f"{net}: timing", lambda: solve_timing(program, args.batch, path))
            profile(f"{net}: data", lambda: run_functional(program, flits, args.batch, path, timing))


if __name__ == "__main__":
    main()
