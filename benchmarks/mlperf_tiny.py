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
bundled digits CNN, ``models/digits_cnn.onnx``) each at its recommended grid, on the default Arch and on the Arch with
the contexts that help it (``tile_contexts``, docs/architecture.md section 4.6), and on the committed preset
``archs/efficient.toml`` (64 KiB tiles, 8 contexts) at its best grid, measured in steady state, beside SCALE-Sim's
figures on the same shapes as the issue quotes them and the 0.90 target (about 20 minutes: the 12x12 chains need
batches of about two inferences a tile to settle).
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
#: --issue-table: per network, the grid README recommends, the batch that settles there, the tile_contexts that help
#: it (1: none do) and SCALE-Sim's steady-state share of the MAC bound on the same shape (issue "efficiency per area")
ISSUE_TABLE = {
    "resnet8": ("12x12", 320, 1, 0.87),
    "dscnn": ("12x12", 320, 1, 0.31),
    "mobilenet": ("12x12", 320, 3, 0.24),
    "autoencoder": ("4x4", 64, 8, 0.055),
    "digits_cnn": ("4x4", 64, 2, 0.39),
}
TARGET = 0.90
#: --issue-table's third column: the committed preset for networks of many small layers, at the grid (of these) where
#: the compiler's estimate is highest (the smallest on a tie)
PRESET = ROOT / "archs" / "efficient.toml"
PRESET_GRIDS = ("4x4", "8x8", "12x12")


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


def best_preset_grid(model, preset):
    """``(grid, program)``: the grid of :data:`PRESET_GRIDS` where the compiler estimates ``model`` on ``preset`` best,
    and the program it compiled there (``(None, None)``: none fits)."""
    import warnings
    from flowtile.compiler import CompileError, compile_model, estimated_interval

    estimates, programs = {}, {}
    for grid in PRESET_GRIDS:
        arch = preset.with_grid(grid)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = compile_model(model, arch)
        except CompileError:
            continue
        interval = estimated_interval(program) / program.replicas
        estimates[grid], programs[grid] = program.macs_per_inference / (interval * arch.n_tiles * arch.lanes), program
    best = max(estimates, key=lambda grid: (round(estimates[grid], 3), -PRESET_GRIDS.index(grid)), default=None)
    return best, programs.get(best)


def issue_table(args) -> None:
    from flowtile.arch import Arch
    from flowtile.compiler import CompileError, int8_model

    preset = Arch.from_toml(PRESET)
    rows = []
    for net, (grid, batch, contexts, scale_sim) in ISSUE_TABLE.items():
        model = int8_model(model_path(net))
        x = seeded_batch(model, batch, args.seed)
        preset_grid, preset_program = best_preset_grid(model, preset)
        if preset_grid is not None:
            on_grid = preset.with_grid(preset_grid)   # a chain settles after about two inferences a tile
            found = measure(model, on_grid, seeded_batch(model, max(64, 2 * on_grid.n_tiles + 32), args.seed),
                            args.report, preset_program)
            print(f"{net} {preset_grid} {PRESET.name}: {100 * found['whole']:.1f}% (interval {found['interval']:.0f}, "
                  f"estimate {found['estimate']:.0f}, max |flowtile - onnxruntime| {found['worst']} LSB)", flush=True)
            preset_figure = (preset_grid, found["whole"])
        else:
            preset_figure = (None, None)
        figures = []
        for tile_contexts in sorted({1, contexts}):
            arch = Arch(tile_contexts=tile_contexts).with_grid(grid)
            try:
                found = measure(model, arch, x, args.report)
            except CompileError as error:
                figures.append((tile_contexts, None, f"does not compile: {error}"))
                continue
            copies = f", {found['program'].replicas} copies" if found["program"].replicas > 1 else ""
            print(f"{net} {grid} tile_contexts={tile_contexts}{copies}: {100 * found['whole']:.1f}% "
                  f"(interval {found['interval']:.0f}, estimate {found['estimate']:.0f}, limiter "
                  f"{found['bottleneck']}, max |flowtile - onnxruntime| {found['worst']} LSB, emulator "
                  f"{found['emu_seconds']:.1f} s)", flush=True)
            figures.append((tile_contexts, found["whole"], copies))
        rows.append((net, grid, figures, preset_figure, scale_sim))

    def cell(figure) -> str:
        return "-" if figure is None else f"{100 * figure:.1f}%"
    print(f"\n{'network':12s} {'grid':6s} {'default Arch':>13s} {'with contexts':>22s} {PRESET.name + ' (grid)':>26s} "
          f"{'SCALE-Sim':>10s}  >= {100 * TARGET:.0f}%")
    for net, grid, figures, (preset_grid, preset_figure), scale_sim in rows:
        default = figures[0][1]
        best_contexts, best, _ = max(figures, key=lambda f: -1 if f[1] is None else f[1])
        with_contexts = (f"{cell(best)} ({best_contexts} contexts)" if best_contexts > 1 else "(none help)")
        on_preset = f"{cell(preset_figure)} ({preset_grid})" if preset_grid else "does not fit"
        verdict = ("met on the default Arch" if default is not None and default >= TARGET else
                   f"met with tile_contexts = {best_contexts}" if best is not None and best >= TARGET else
                   f"met on {PRESET.name}" if preset_figure is not None and preset_figure >= TARGET else "not met")
        print(f"{net:12s} {grid:6s} {cell(default):>13s} {with_contexts:>22s} {on_preset:>26s} "
              f"{100 * scale_sim:9.1f}%  {verdict}")




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
                        help="the five networks at their recommended grids on the default Arch and with contexts, "
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
