"""Emulator vs RTL simulation on the bundled digits models (CNN and MLP), measured in one run.

Prints wall times, the emulator-vs-Verilator speed ratio (goal: >= 100x), simulated cycles per
second of each, and the MAC utilization. Run: ``python benchmarks/emulator_vs_rtl.py [--sim amaranth]``.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    os.environ.setdefault("AMARANTH_USE_YOSYS", "builtin")
    from flowtile.compiler import compile_model
    from flowtile.emulator import emulate
    from flowtile.arch import Arch
    from flowtile.host import input_flits, pad_batch
    from flowtile.rtl.simulate import simulate

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sim", choices=("verilator", "amaranth"), default="verilator")
    parser.add_argument("--batch", type=int, default=0, help="inferences (default: the whole held-out set)")
    parser.add_argument("--repeats", type=int, default=20, help="emulator repetitions (best time is kept)")
    args = parser.parse_args()

    arch = Arch()
    for label, model, data_file in (("digits CNN", "digits_cnn.onnx", "digits_cnn_test.npz"),
                                    ("digits MLP", "digits_mlp.onnx", "digits_test.npz")):
        program = compile_model(ROOT / "models" / model, arch)
        with np.load(ROOT / "models" / data_file) as data:
            x = data["x"]
        if args.batch:
            x = np.resize(x, (args.batch,) + x.shape[1:])
        x = pad_batch(program, x)     # a program of copies takes batches that are multiples of them
        _, flits = input_flits(program, x)
        batch = x.shape[0]

        emu_times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            emu = emulate(program, flits, batch)
            emu_times.append(time.perf_counter() - started)
        emu_seconds = min(emu_times)

        print(f"{label}, batch {batch}, {arch.rows}x{arch.cols} tiles x {arch.lanes} lanes")
        print(f"  simulated cycles          {emu.cycles}")
        print(f"  emulator                  {emu_seconds * 1e3:9.2f} ms  ({emu.cycles / emu_seconds:,.0f} cycles/s)")
        warm = pad_batch(program, x[:1])
        simulate(program, input_flits(program, warm)[1], len(warm), simulator=args.sim)  # warm the build cache
        rtl = simulate(program, flits, batch, simulator=args.sim)
        print(f"  RTL ({args.sim:9s})      {rtl.wall_seconds * 1e3:9.2f} ms  "
              f"({rtl.cycles / rtl.wall_seconds:,.0f} cycles/s)  [build cached]")
        same = np.array_equal(rtl.out_flits, emu.out_flits) and rtl.cycles == emu.cycles
        print(f"  outputs and cycles equal  {same}")
        print(f"  emulator / RTL speed      {rtl.wall_seconds / emu_seconds:,.0f}x  (goal >= 100x)")
        print(f"  MAC utilization           {100 * emu.mac_utilization:.1f}% of {arch.n_tiles * arch.lanes} lanes"
              f"  (latency {emu.latency_cycles} cycles, interval {emu.interval_cycles:.1f} cycles/inference)")


if __name__ == "__main__":
    main()
