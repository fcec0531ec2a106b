"""Emulator speed: emulated cycles per wall-second for a few hand-built MLP and small CNN programs.

The RTL simulation runs at about 85k cycles/s; the emulator's goal is >= 100x that. Programs are
built with ``tests/program_builder.py`` (no compiler needed). Run:
``python benchmarks/emulator_speed.py [--repeats N]``.

The timing model solves three chains per PE (input side, compute side, output side, docs/architecture.md
section 6 rule 4), so the "solves" column counts chain solves; the cases with a small forward queue
(``F``) make the input sides wait for queue space.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from flowtile.emulator import emulate  # noqa: E402
from flowtile.arch import Arch  # noqa: E402
from flowtile.host import pack_flits  # noqa: E402
from flowtile.testing.program_builder import Conv, Dense, MaxPool, build_program  # noqa: E402

#: Simulated cycles per second of the RTL (Verilator) simulation the emulator is compared with.
RTL_CYCLES_PER_SECOND = 85_000

# (name, arch, layer widths, tiles per layer, batch[, forward queue words of every tile: default all free SRAM])
CASES = [
    ("64-32-10, 1+1 tiles", Arch(), [64, 32, 10], [1, 1], 360),
    ("64-32-10, 4+1 tiles", Arch(), [64, 32, 10], [4, 1], 360),
    ("64-32-10, 4+1 tiles", Arch(), [64, 32, 10], [4, 1], 2000),
    ("256-128-64-10, 6+4+2 tiles", Arch(), [256, 128, 64, 10], [6, 4, 2], 360),
    ("784-128-64-10, 8+4+2 tiles, D=1", Arch(router_fifo_depth=1, sram_bytes=65536), [784, 128, 64, 10],
     [8, 4, 2], 360),
    ("200-64-10 on 3x2, 16 lanes", Arch(rows=3, cols=2, lanes=16, sram_bytes=65536, router_fifo_depth=1),
     [200, 64, 10], [2, 1], 1000),
    ("64-32-10, 4+1 tiles, F=2", Arch(), [64, 32, 10], [4, 1], 2000, 2),
    ("256-128-64-10, 6+4+2 tiles, F=3, D=1", Arch(router_fifo_depth=1), [256, 128, 64, 10], [6, 4, 2], 360, 3),
]


# (name, arch, input (C, H, W), conv output channels, conv row bands, pool bands, dense outputs, batch)
CNN_CASES = [
    ("3x16x16 conv3x3x8 /4, pool2, fc10", Arch(), (3, 16, 16), 8, 4, 1, 10, 100),
    ("1x12x12 conv5x5x16 /6, pool3, fc10", Arch(), (1, 12, 12), 16, 6, 1, 10, 100),
]


def build_cnn(arch: Arch, shape, c_out: int, conv_bands: int, pool_bands: int, n_out: int,
              rng: np.random.Generator):
    """Conv (same padding, ReLU) split in row bands -> max pool -> dense over the flattened map."""
    channels, height, width = shape
    kernel = 3 if c_out <= 8 else 5
    pool = 2 if kernel == 3 else 3
    conv = Conv(rng.integers(-128, 128, (c_out, channels, kernel, kernel), dtype=np.int8),
                rng.integers(-5000, 5000, c_out), 1 << 30, 40, zp_in=-5, zp_out=0, clamp_lo=0,
                pads=(kernel // 2,) * 4, tiles=conv_bands)
    words = (height // pool) * (width // pool) * -(-c_out // arch.lanes)
    dense = Dense(rng.integers(-128, 128, (n_out, words * arch.lanes), dtype=np.int8),
                  rng.integers(-5000, 5000, n_out), 1 << 30, 40, 0, -128, 127, 1)
    return build_program(arch, [conv, MaxPool(pool, pool, pool, tiles=pool_bands), dense], input_shape=shape)


def build(arch: Arch, widths: list[int], tiles: list[int], rng: np.random.Generator, queue_words: int | None = None):
    layers = []
    for n_in, n_out, span in zip(widths[:-1], widths[1:], tiles):
        layers.append(Dense(rng.integers(-128, 128, (n_out, n_in), dtype=np.int8), rng.integers(-5000, 5000, n_out),
                            1 << 30, 40, 0, 0, 127, span))
    return build_program(arch, layers, queue_words=queue_words)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="runs per case (the best time is kept)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'program':38s} {'batch':>6s} {'cycles':>10s} {'best ms':>9s} {'cycles/s':>12s} {'vs RTL':>8s}  timing")
    cases = [(name, arch, batch, build(arch, widths, tiles, rng, *queue)) for name, arch, widths, tiles, batch, *queue in CASES]
    cases += [(name, arch, batch, build_cnn(arch, shape, c_out, conv_bands, pool_bands, n_out, rng))
              for name, arch, shape, c_out, conv_bands, pool_bands, n_out, batch in CNN_CASES]
    for name, arch, batch, program in cases:
        values = rng.integers(-128, 128, (batch, program.input.length), dtype=np.int8)
        flits = pack_flits(values, arch.lanes, program.input)
        best = float("inf")
        for _ in range(args.repeats):
            started = time.perf_counter()
            result = emulate(program, flits, batch)
            best = min(best, time.perf_counter() - started)
        rate = result.cycles / best
        how = (f"extrapolated, {result.timing.solves} solves" if result.timing.extrapolated
               else f"sweeps, {result.timing.solves} solves")
        print(f"{name:38s} {batch:6d} {result.cycles:10d} {best * 1e3:9.2f} {rate:12,.0f} "
              f"{rate / RTL_CYCLES_PER_SECOND:7,.0f}x  {how}")


if __name__ == "__main__":
    main()
