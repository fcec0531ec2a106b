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

``--issue-table`` prints issue "efficiency per area"'s table instead: the five networks (the four above and the
bundled digits CNN, ``models/digits_cnn.onnx``) each at its recommended grid, on the default Arch (64 KiB tiles of 8
contexts, docs/architecture.md section 4.6) and, for comparison, on ``archs/lean.toml`` (the smallest tile: 32 KiB, one
layer a tile; the default until the eleventh session), measured in steady state, beside SCALE-Sim's figures on the
same shapes as the issue quotes them and the 0.90 target (about 20 minutes: the 12x12 chains need batches of about two
inferences a tile to settle).
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
#: --issue-table: per network, the grid README recommends and SCALE-Sim's steady-state share of the MAC bound on the
#: same shape (issue "efficiency per area")
ISSUE_TABLE = {
    "resnet8": ("12x12", 0.87),
    "dscnn": ("4x4", 0.31),
    "mobilenet": ("12x12", 0.24),
    "autoencoder": ("4x4", 0.055),
    "digits_cnn": ("4x4", 0.39),
}
TARGET = 0.90
#: --issue-table's comparison column: the smallest tile (32 KiB, one layer a tile)
LEAN = ROOT / "archs" / "lean.toml"


def model_path(net: str) -> Path:
    if net == "digits_cnn":
        return ROOT / "models" / "digits_cnn.onnx"
    return ROOT / "models" / "public" / f"mlperf_{net}_qdq.onnx"


def measure(model, arch, x: np.ndarray, show_report: bool = False, program=None) -> dict:
    """Compile ``model`` for ``arch`` (unless ``program`` is its compiled program already), emulate the batch ``x``,
    compare with onnxruntime; the steady-state figures
    (interval per real inference, utilization of the grid and of the computing tiles, the busiest layer), the report's
    estimate and bottleneck, and the worst difference from onnxruntime in LSB."""
    from flowtile.compiler import compile_model, report
    from flowtile.host import pad_batch
    from flowtile.testing.measure import steady_state
    from flowtile.testing.oracle_checks import compare_with_onnxruntime, emulate_model

    started = time.perf_counter()
    program = program or compile_model(model, arch)
    compile_seconds = time.perf_counter() - started
    text = report(program)
    if show_report:
        print(text)
    estimated = re.search(r"estimated interval (\d+) cycles(?:/inference| per program inference) "
                          r"\(bottleneck: ([^)]*)\)", text)
    started = time.perf_counter()
    emulated = emulate_model(program, x)
    emu_seconds = time.perf_counter() - started
    worst = compare_with_onnxruntime(model, program, x, one_at_a_time=True, emulated=emulated).worst
    # a program with copies of the network (compile_model's choice on a large grid) runs program inferences of
    # `replicas` real ones: its steady state is per program inference, its interval per real one
    view, count = program.program_inferences(len(pad_batch(program, x)))
    steady = steady_state(view, emulated.result, count)
    busiest = steady.busiest_layer
    return dict(program=program, compile_seconds=compile_seconds, emu_seconds=emu_seconds, worst=worst,
                interval=steady.interval / program.replicas, used=steady.used_tiles,
                whole=steady.grid_utilization, computing=steady.computing_utilization, busiest=busiest,
                busiest_util=steady.layer_utilization(busiest),
                # the report's interval is per program inference: per real inference here, as the measured one
                estimate=int(estimated.group(1)) / program.replicas if estimated else None,
                bottleneck=estimated.group(2) if estimated else "?")


def seeded_batch(model, batch: int, seed: int) -> np.ndarray:
    shape = tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:])
    return np.random.default_rng(seed).standard_normal((batch, *shape)).astype(np.float32)


def issue_table(args) -> None:
    from flowtile.arch import Arch
    from flowtile.compiler import CompileError, int8_model

    lean = Arch.from_toml(LEAN)
    rows = []
    for net, (grid, scale_sim) in ISSUE_TABLE.items():
        model = int8_model(model_path(net))
        figures = []
        for name, base in (("default Arch", Arch()), (LEAN.name, lean)):
            arch = base.with_grid(grid)
            # a chain settles after about two inferences a tile (copies: per program inference)
            x = seeded_batch(model, max(64, 2 * arch.n_tiles + 32), args.seed)
            try:
                found = measure(model, arch, x, args.report)
            except CompileError as error:
                print(f"{net} {grid} {name}: does not compile: {error}", flush=True)
                figures.append(None)
                continue
            copies = f", {found['program'].replicas} copies" if found["program"].replicas > 1 else ""
            print(f"{net} {grid} {name}{copies}: {100 * found['whole']:.1f}% (interval {found['interval']:.1f}, "
                  f"estimate {found['estimate']:.1f}, limiter {found['bottleneck']}, max |flowtile - onnxruntime| "
                  f"{found['worst']} LSB, emulator {found['emu_seconds']:.1f} s for {len(x)})", flush=True)
            figures.append(found["whole"])
        rows.append((net, grid, figures, scale_sim))

    def cell(figure) -> str:
        return "does not compile" if figure is None else f"{100 * figure:.1f}%"
    print(f"\n{'network':12s} {'grid':6s} {'default Arch':>13s} {LEAN.name:>17s} {'SCALE-Sim':>10s}  "
          f">= {100 * TARGET:.0f}% on the default Arch")
    for net, grid, (default, on_lean), scale_sim in rows:
        verdict = "met" if default is not None and default >= TARGET else "not met"
        print(f"{net:12s} {grid:6s} {cell(default):>13s} {cell(on_lean):>17s} {100 * scale_sim:9.1f}%  {verdict}")


def main() -> None:
    os.environ.setdefault("AMARANTH_USE_YOSYS", "builtin")
    from flowtile.arch import Arch
    from flowtile.compiler import CompileError, int8_model

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
    parser.add_argument("--issue-table", action="store_true",
                        help="the five networks at their recommended grids on the default Arch and on archs/lean.toml, "
                             "beside SCALE-Sim (the other options but --seed and --report are ignored)")
    args = parser.parse_args()
    if args.issue_table:
        issue_table(args)
        return

    summary = []
    for net in args.nets.split(","):
        model = int8_model(model_path(net))
        x = seeded_batch(model, args.batch, args.seed)
        for grid in args.grids.split(","):
            arch = Arch(sram_bytes=args.sram_bytes, max_tile_outputs=args.max_tile_outputs,
                        result_ring_words=args.ring_words, tile_contexts=args.tile_contexts).with_grid(grid)
            try:
                found = measure(model, arch, x, args.report)
            except CompileError as error:
                print(f"{net} {grid}: does not compile: {error}")
                summary.append((net, grid, None, None, None, f"does not compile: {str(error)[:90]}"))
                continue
            program, busiest, worst = found["program"], found["busiest"], found["worst"]
            copies = f", {program.replicas} copies" if program.replicas > 1 else ""
            estimate = "?" if found["estimate"] is None else f"{found['estimate']:.0f}"
            print(f"{net} {grid}: compiled in {found['compile_seconds']:.1f} s{copies}, {found['used']}/{arch.n_tiles} "
                  f"tiles compute, {program.macs_per_inference} MACs/inference; estimated interval {estimate} "
                  f"(bottleneck: {found['bottleneck']}); measured {found['interval']:.0f} cycles/inference "
                  f"(batch {args.batch}, emulator {found['emu_seconds']:.1f} s, max |flowtile - onnxruntime| {worst} "
                  f"LSB); steady-state MAC utilization {100 * found['whole']:.1f}% of the grid, "
                  f"{100 * found['computing']:.1f}% of the computing tiles; busiest layer '{busiest.name}' "
                  f"({busiest.op}, {len(busiest.tiles)} tiles, {100 * found['busiest_util']:.1f}%)")
            summary.append((net, grid, found["interval"], found["whole"], found["computing"],
                            f"bottleneck {found['bottleneck']}; busiest '{busiest.name}'"
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
