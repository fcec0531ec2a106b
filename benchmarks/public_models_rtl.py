"""Verilator vs emulator on the public models (models/public): each model quantized once, compiled on the first of
the test suite's archs it fits, a small seeded batch run on both; prints bits/cycles agreement and wall times.

Too slow for the test suite (one Verilator build per arch, MobileNet's 96x96 maps): tests/test_public_models.py
runs the smallest model on Verilator, this script the rest.

    python benchmarks/public_models_rtl.py [--batch 2] [--models mlperf_dscnn_qdq.onnx,...]
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = ROOT / "models" / "public"
BIG = dict(sram_bytes=65536, max_tile_outputs=2048)


def main() -> int:
    os.environ.setdefault("AMARANTH_USE_YOSYS", "builtin")
    from flowtile.arch import Arch
    from flowtile.compiler import int8_model
    from flowtile.emulator import emulate
    from flowtile.host import input_flits, model_layout, pad_batch
    from flowtile.rtl.simulate import simulate
    from flowtile.testing.oracle_checks import compile_first_fitting

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2, help="inferences per model (default 2)")
    parser.add_argument("--models", default=None, help="comma-separated file names (default: every QDQ file)")
    args = parser.parse_args()
    names = args.models.split(",") if args.models else sorted(p.name for p in PUBLIC.glob("*_qdq.onnx"))
    archs = [("4x4 (default)", Arch()), ("8x8 big", Arch(**BIG).with_grid("8x8")),
             ("12x12 big", Arch(**BIG).with_grid("12x12"))]
    failures = 0
    for name in names:
        path = PUBLIC / name
        shape = tuple(d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[1:])
        rng = np.random.default_rng(1)
        draw = rng.random if name.startswith("tv_") else rng.standard_normal
        int8 = int8_model(path, draw((32, *shape)).astype(np.float32))
        program, arch_name = compile_first_fitting(int8, archs)
        x = model_layout(draw((args.batch, *shape)).astype(np.float32), program.input)   # NHWC models: transposed
        x = pad_batch(program, x)   # a program of copies takes batches that are multiples of them
        _, flits = input_flits(program, x)
        emu = emulate(program, flits, len(x))
        started = time.perf_counter()
        rtl = simulate(program, flits, len(x), simulator="verilator")
        seconds = time.perf_counter() - started
        same = (np.array_equal(rtl.out_flits, emu.out_flits) and rtl.cycles == emu.cycles
                and np.array_equal(np.asarray(rtl.out_times), np.asarray(emu.out_times)))
        failures += not same
        print(f"{name:34s} {arch_name:14s} batch {args.batch}: RTL {rtl.cycles} cycles, emulator {emu.cycles}: "
              f"{'bit- and cycle-identical' if same else 'MISMATCH'} ({seconds:.0f} s incl. build "
              f"{rtl.build_seconds:.0f} s)", flush=True)
    print(f"{len(names)} models, {failures} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
