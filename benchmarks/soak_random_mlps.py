"""Soak test: many seeded random MLPs (or CNNs) through compiler, emulator, Verilator and onnxruntime.

Longer than the test suite allows; run it after changing the PE, the router or the timing model:
``python benchmarks/soak_random_mlps.py --models 40 [--cnn]``. Prints one line per model and a summary, and
exits 1 if any model disagrees (RTL vs emulator bits/cycles, or emulator vs onnxruntime > 1 LSB).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    os.environ.setdefault("AMARANTH_USE_YOSYS", "builtin")
    from flowtile.compiler import CompileError, compile_model, int8_model
    from flowtile.emulator import emulate
    from flowtile.arch import Arch
    from flowtile.host import input_flits, outputs_from_flits, pad_batch
    from flowtile.oracle import onnxruntime_int8_output
    from flowtile.rtl.simulate import simulate
    from flowtile.testing.random_models import quantize_qdq, random_float_cnn, random_float_mlp

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=20)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--sim", choices=("verilator", "amaranth"), default="verilator")
    parser.add_argument("--cnn", action="store_true", help="random conv/maxpool networks instead of MLPs")
    args = parser.parse_args()

    archs = [Arch(), Arch(rows=2, cols=3, lanes=4, sram_bytes=16384, router_fifo_depth=2, max_tile_outputs=256),
             Arch(rows=3, cols=2, lanes=16, sram_bytes=65536, router_fifo_depth=1, max_tile_outputs=320)]
    rng = np.random.default_rng(args.seed)
    failures = skipped = 0
    started = time.perf_counter()
    for index in range(args.models):
        arch = archs[index % len(archs)]
        kind = rng.choice(["float", "int8", "uint8", "int8-tensor"])
        batch = int(rng.integers(1, 65))
        if args.cnn:
            in_shape = (int(rng.integers(1, 5)), int(rng.integers(4, 13)), int(rng.integers(4, 13)))
            blocks = [{"out": int(rng.integers(1, 17)), "k": int(rng.choice([1, 3, 5])), "stride": int(rng.integers(1, 3)),
                       "pad": int(rng.integers(0, 3)), "pool": (2, 2) if rng.random() < 0.5 else None}
                      for _ in range(int(rng.integers(1, 3)))]
            blocks = [b | {"pad": min(b["pad"], b["k"] - 1)} for b in blocks]
            network = lambda: random_float_cnn(rng, in_shape, blocks, int(rng.integers(2, 11)))
            widths = [int(np.prod(in_shape)), *(b["out"] for b in blocks)]
            sample_shape = in_shape
        else:
            widths = [int(w) for w in rng.integers(1, 301, size=int(rng.integers(2, 6)))]
            network = lambda: random_float_mlp(rng, widths)
            sample_shape = (widths[0],)
        with tempfile.TemporaryDirectory() as tmp:
            float_path = Path(tmp) / "float.onnx"
            try:
                onnx.save(network(), float_path)
            except Exception as error:  # a random CNN whose maps shrink to nothing
                skipped += 1
                print(f"{index:3d} skipped: {error}")
                continue
            calibration = rng.random((32, *sample_shape)).astype(np.float32)
            model = float_path if kind == "float" else quantize_qdq(
                float_path, Path(tmp) / "qdq.onnx", calibration, activation_uint8=(kind == "uint8"),
                per_channel=(kind != "int8-tensor"))
            label = f"{index:3d} {arch.rows}x{arch.cols}/L{arch.lanes}/D{arch.router_fifo_depth} {kind:11s} " \
                    f"{'-'.join(map(str, widths)):24s} b{batch:<3d}"
            try:
                int8 = int8_model(model, calibration)  # one quantization for the compiler and the oracle
                program = compile_model(int8, arch)
            except CompileError as error:
                skipped += 1
                print(f"{label} does not fit: {str(error)[:80]}")
                continue
            x = rng.random((batch, *sample_shape)).astype(np.float32)
            x = pad_batch(program, x)   # a program of copies takes batches that are multiples of them
            batch = len(x)
            _, flits = input_flits(program, x)
            emu = emulate(program, flits, batch)
            rtl = simulate(program, flits, batch, simulator=args.sim)
            emu_q, _ = outputs_from_flits(program, emu.out_flits, batch)
            ort_q, _ = onnxruntime_int8_output(int8, program, x)
            lsb = int(np.abs(emu_q.astype(int) - ort_q.astype(int)).max())
            same = (np.array_equal(rtl.out_flits, emu.out_flits) and rtl.cycles == emu.cycles
                    and np.array_equal(rtl.out_times, emu.out_times))
            ok = same and lsb <= 1
            failures += not ok
            print(f"{label} cycles {emu.cycles:7d}  util {100 * emu.mac_utilization:5.1f}%  "
                  f"ort {lsb} LSB  {'ok' if ok else 'MISMATCH'}", flush=True)
    print(f"{args.models} models, {failures} mismatches, {skipped} did not fit, "
          f"{time.perf_counter() - started:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
