"""MLPerf-Tiny-shaped networks on several grids: steady-state MAC utilization and the layer that limits it.

Takes the committed QDQ int8 files ``models/public/mlperf_{resnet8,dscnn,mobilenet,autoencoder}_qdq.onnx``
(made by ``models/make_public_models.py``: the MLPerf Tiny reference shapes with random fixed weights), compiles
each for every grid given, runs a seeded batch on the emulator, checks it against onnxruntime (<= 1 LSB), and
prints per (network, grid): tiles used, the compile report's estimated interval and bottleneck, the measured
steady-state interval (over the last half of the batch, as ``benchmarks/resnet8.py`` measures it: the pipeline
settles into its periodic schedule only after a transient) and the steady-state MAC utilization
(MACs/inference / (interval x tiles x lanes)), over the whole grid and over the tiles that compute, and the layer
whose tiles are busiest (the measured limiter: the highest per-tile utilization).

Run: ``python benchmarks/mlperf_tiny.py [--grids 4x4,8x8,12x12] [--nets resnet8,dscnn] [--batch 16] [--report]``.
"""
from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
NETS = ("resnet8", "dscnn", "mobilenet", "autoencoder")


def main() -> None:
    os.environ.setdefault("AMARANTH_USE_YOSYS", "builtin")
    import onnx
    from flowtile.arch import Arch
    from flowtile.compiler import CompileError, compile_model, int8_model, report
    from flowtile.host import pad_batch
    from flowtile.testing.measure import steady_state
    from flowtile.testing.oracle_checks import compare_with_onnxruntime, emulate_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grids", default="4x4,8x8,12x12", help="comma-separated RxC grids (default 4x4,8x8,12x12)")
    parser.add_argument("--nets", default=",".join(NETS), help=f"comma-separated subset of {','.join(NETS)}")
    parser.add_argument("--sram-bytes", type=int, default=65536, help="per-tile SRAM (default 65536)")
    parser.add_argument("--max-tile-outputs", type=int, default=2048, help="parameter/result depth (default 2048)")
    parser.add_argument("--ring-words", type=int, default=Arch.result_ring_words,
                        help=f"per-tile result ring depth (default {Arch.result_ring_words}, the Arch default)")
    parser.add_argument("--tile-contexts", type=int, default=Arch.tile_contexts,
                        help=f"layers a tile may hold (arch field tile_contexts, default {Arch.tile_contexts})")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", action="store_true", help="also print each compile report")
    args = parser.parse_args()

    summary = []
    for net in args.nets.split(","):
        path = ROOT / "models" / "public" / f"mlperf_{net}_qdq.onnx"
        model = int8_model(path)
        shape = tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:])
        x = np.random.default_rng(args.seed).standard_normal((args.batch, *shape)).astype(np.float32)
        for grid in args.grids.split(","):
            arch = Arch(sram_bytes=args.sram_bytes, max_tile_outputs=args.max_tile_outputs,
                        result_ring_words=args.ring_words, tile_contexts=args.tile_contexts).with_grid(grid)
            started = time.perf_counter()
            try:
                program = compile_model(model, arch)
            except CompileError as error:
                print(f"{net} {grid}: does not compile: {error}")
                summary.append((net, grid, None, None, None, f"does not compile: {str(error)[:90]}"))
                continue
            compile_seconds = time.perf_counter() - started
            text = report(program)
            if args.report:
                print(text)
            estimated = re.search(r"estimated interval (\d+) cycles(?:/inference| per program inference) "
                                  r"\(bottleneck: ([^)]*)\)", text)

            started = time.perf_counter()
            emulated = emulate_model(program, x)
            emu_seconds = time.perf_counter() - started
            worst = compare_with_onnxruntime(model, program, x, one_at_a_time=True, emulated=emulated).worst

            # a program with copies of the network (compile_model's choice on a large grid) runs program inferences
            # of `replicas` real ones: its steady state is per program inference, its interval per real one
            view, count = program.program_inferences(len(pad_batch(program, x)))
            steady = steady_state(view, emulated.result, count)
            interval, used = steady.interval / program.replicas, steady.used_tiles
            macs = program.macs_per_inference
            whole, computing = steady.grid_utilization, steady.computing_utilization
            busiest = steady.busiest_layer
            busiest_util = steady.layer_utilization(busiest)
            copies = f", {program.replicas} copies" if program.replicas > 1 else ""
            # the report's interval is per program inference: per real inference here, as the measured one
            estimate = f"{int(estimated.group(1)) / program.replicas:.0f}" if estimated else "?"
            print(f"{net} {grid}: compiled in {compile_seconds:.1f} s{copies}, {used}/{arch.n_tiles} tiles compute, "
                  f"{macs} MACs/inference; estimated interval {estimate} "
                  f"(bottleneck: {estimated.group(2) if estimated else '?'}); measured {interval:.0f} cycles/inference "
                  f"(batch {args.batch}, emulator {emu_seconds:.1f} s, max |flowtile - onnxruntime| {worst} LSB); "
                  f"steady-state MAC utilization {100 * whole:.1f}% of the grid, {100 * computing:.1f}% of the "
                  f"computing tiles; busiest layer '{busiest.name}' ({busiest.op}, {len(busiest.tiles)} tiles, "
                  f"{100 * busiest_util:.1f}%)")
            summary.append((net, grid, interval, whole, computing,
                            f"bottleneck {estimated.group(2) if estimated else '?'}; busiest '{busiest.name}'"
                            + ("" if worst <= 1 else f"; end-to-end drift {worst} LSB (1-LSB per-layer differences "
                                                     f"carried through a deep network: see tests/test_public_models.py)")))

    print(f"\n{'network':12s} {'grid':6s} {'interval':>9s} {'util grid':>10s} {'util used':>10s}  limiter")
    for net, grid, interval, whole, computing, note in summary:
        if interval is None:
            print(f"{net:12s} {grid:6s} {'-':>9s} {'-':>10s} {'-':>10s}  {note}")
        else:
            print(f"{net:12s} {grid:6s} {interval:9.0f} {100 * whole:9.1f}% {100 * computing:9.1f}%  {note}")


if __name__ == "__main__":
    main()
