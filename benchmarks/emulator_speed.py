"""Emulator speed: emulated cycles per wall-second for a few hand-built MLP programs.

The RTL simulation runs at about 85k cycles/s; the emulator's goal is >= 100x that. Programs are
built with ``tests/program_builder.py`` (no compiler needed). Run:
``python benchmarks/emulator_speed.py [--repeats N]``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from emulator import emulate  # noqa: E402
from flowtile.arch import Arch  # noqa: E402
from flowtile.host import pack_flits  # noqa: E402
from program_builder import Dense, build_program  # noqa: E402

#: Simulated cycles per second of the RTL (Verilator) simulation the emulator is compared with.
RTL_CYCLES_PER_SECOND = 85_000

# (name, arch, layer widths, tiles per layer, batch)
CASES = [
    ("64-32-10, 1+1 tiles", Arch(), [64, 32, 10], [1, 1], 360),
    ("64-32-10, 4+1 tiles", Arch(), [64, 32, 10], [4, 1], 360),
    ("64-32-10, 4+1 tiles", Arch(), [64, 32, 10], [4, 1], 2000),
    ("256-128-64-10, 6+4+2 tiles", Arch(), [256, 128, 64, 10], [6, 4, 2], 360),
    ("784-128-64-10, 8+4+2 tiles, D=1", Arch(router_fifo_depth=1, sram_bytes=65536), [784, 128, 64, 10],
     [8, 4, 2], 360),
    ("200-64-10 on 3x2, 16 lanes", Arch(rows=3, cols=2, lanes=16, sram_bytes=65536, router_fifo_depth=1),
     [200, 64, 10], [2, 1], 1000),
]


def build(arch: Arch, widths: list[int], tiles: list[int], rng: np.random.Generator):
    layers = []
    for n_in, n_out, span in zip(widths[:-1], widths[1:], tiles):
        layers.append(Dense(rng.integers(-128, 128, (n_out, n_in), dtype=np.int8), rng.integers(-5000, 5000, n_out),
                            1 << 30, 40, 0, 0, 127, span))
    return build_program(arch, layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="runs per case (the best time is kept)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'program':34s} {'batch':>6s} {'cycles':>10s} {'best ms':>9s} {'cycles/s':>12s} {'vs RTL':>8s}  timing")
    for name, arch, widths, tiles, batch in CASES:
        program = build(arch, widths, tiles, rng)
        flits = pack_flits(rng.integers(-128, 128, (batch, widths[0]), dtype=np.int8), arch.lanes)
        best = float("inf")
        for _ in range(args.repeats):
            started = time.perf_counter()
            result = emulate(program, flits, batch)
            best = min(best, time.perf_counter() - started)
        rate = result.cycles / best
        how = (f"extrapolated, {result.timing.solves} solves" if result.timing.extrapolated
               else f"sweeps, {result.timing.solves} solves")
        print(f"{name:34s} {batch:6d} {result.cycles:10d} {best * 1e3:9.2f} {rate:12,.0f} "
              f"{rate / RTL_CYCLES_PER_SECOND:7,.0f}x  {how}")


if __name__ == "__main__":
    main()
