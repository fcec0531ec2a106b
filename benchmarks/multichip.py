"""Chips in a line joined by slow links against one chip as large as all of them: steady-state throughput retained.

For every network and every N in ``--chips``: one chip of ``N*R x C`` tiles (the reference: same tile, same
per-tile SRAM, so the same total tiles and SRAM) and N chips of ``R x C`` tiles (``--grid``) joined by links of
``flit_bits // f`` wire bits per cycle for every ``f`` in ``--fractions`` (a link at 1/f of the on-chip flit
bandwidth: a mesh link carries one ``flit_bits``-bit flit a cycle), latency ``--latency`` cycles, the other link
fields at their Arch defaults. Each system is compiled (a CompileError is reported in one line), a seeded batch is
emulated (exact: RTL == emulator), and the N-chip outputs are checked bit-identical to the one chip's.

Columns of the table:

* ``interval``: the measured steady-state interval, cycles per inference (``flowtile.testing.measure.steady_state``:
  over the last half of the batch);
* ``retained``: ``interval(one chip) / interval(N chips)``, the throughput the N chips keep;
* ``link bound``: the busiest link of the compiled partition, its wire cycles per inference: ``frames x
  frame_beats`` (``flowtile.link_format.LinkGeometry``; ``frames = ceil(flits / frame_flits)`` of the flits that
  cross it per inference, ``Program.links``). No schedule of that partition is faster;
* ``link cap``: ``interval(one chip) / max(interval(one chip), link bound)``: the most throughput that partition
  can keep (the link as the only loss); ``of cap``: ``retained / link cap``, how close the run comes to it;
* ``layout cap``: the same for the one chip's own layout cut into N chips: the one chip's tiles in chain order, cut
  into chips of at most R*C consecutive tiles where the busiest link (the stream crossing each cut:
  ``output_flits`` of the tile before it) is cheapest. It is what cutting the layer chain costs without giving up
  tiles: a partition that keeps every tile the one chip uses cannot keep more (the compiler may give up tiles to
  move a cut to a narrower stream, so it can beat this cap but not ``link cap``);
* ``limiter``: ``link`` (its wire bound is within 5% of the interval), ``link window`` (the compiler's link
  estimate, which adds the credit and go-back-N round trips at this latency, is; the wire alone is not),
  ``tiles`` (no slower than the one chip: the same tiles limit), ``partition`` (the compiler's slowest tile is
  slower than the one chip's: it gave tiles up to pass streams through, or put them where a cut is narrow),
  ``stalls`` (none of these estimates explains the interval: back-pressure);
* ``s``: wall seconds of the row (compile + emulate).

A final line per network checks 4 chips at 1/16 and 1/64 against issue 11's targets: >= 90% retained at 1/16,
>= 75% at 1/64, or, where the link cap is below the target, >= 90% of the link cap.

Networks: the committed MLPerf-Tiny-shaped QDQ models (``models/public/mlperf_{resnet8,dscnn,mobilenet,
autoencoder}_qdq.onnx``; ``mobilenet`` is MobileNetV1-0.25) with ``--sram-bytes`` / ``--queue-words``, and
``mobilenet-1.0``: MobileNetV1 alpha 1.0 at 96x96 with 1000 classes (4.2 M parameters, random fixed weights,
``flowtile.testing.random_models.random_float_mobilenet_v1``, quantized by onnxruntime into a temporary
directory), whose weights do not fit one chip, with ``--large-sram-bytes`` / ``--large-queue-words`` (at 256 KiB
tiles it needs 45 tiles; its 20480-word forward queues let every tile take a whole inference in while it
computes, so the one chip runs at its estimated interval).

Default (about 5 minutes on 2 cores): ``python benchmarks/multichip.py`` = ``--chips 2,4,8 --grid 4x4
--fractions 4,16,64 --batch 16``. The issue's size (8x8 chips; a few times longer):
``python benchmarks/multichip.py --grid 8x8 --large-sram-bytes 65536`` (MobileNet-1.0 then needs 152 tiles: 4 and 8
chips). ``--report`` prints every compile report. Nothing is cached.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = ("resnet8", "dscnn", "mobilenet", "autoencoder")
LARGE = "mobilenet-1.0"
NETS = (*PUBLIC, LARGE)
#: issue 11's targets for 4 chips: retained throughput at a link fraction
TARGETS = {16: 0.90, 64: 0.75}


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Run:
    """One compiled and emulated system, or the one-line reason it did not compile."""
    arch: object
    seconds: float
    program: object = None
    interval: float | None = None
    q: np.ndarray | None = None
    error: str | None = None


def run(model, arch, x, show_report: bool) -> Run:
    from flowtile.compiler import CompileError, compile_model, report
    from flowtile.testing.measure import steady_state
    from flowtile.testing.oracle_checks import emulate_model

    started = time.perf_counter()
    try:
        program = compile_model(model, arch)
    except CompileError as error:
        return Run(arch, time.perf_counter() - started, error=str(error).splitlines()[0])
    if show_report:
        print(report(program))
    emulated = emulate_model(program, x)
    interval = steady_state(program, emulated.result, len(x)).interval
    return Run(arch, time.perf_counter() - started, program, interval, emulated.q)


def wire_cycles(geometry, flits: int) -> int:
    """Wire cycles per inference of a link carrying ``flits`` flits per inference: whole frames, back to back."""
    return geometry.frames(flits) * geometry.frame_beats


def link_bound(program) -> tuple[int, int, int]:
    """(busiest link, its flits per inference, its wire cycles per inference) of a multi-chip program."""
    from flowtile.link_format import LinkGeometry
    geometry = LinkGeometry(program.arch)
    cycles = [wire_cycles(geometry, link.inference_flits) for link in program.links]
    busiest = max(range(len(cycles)), key=cycles.__getitem__)
    return busiest, program.links[busiest].inference_flits, cycles[busiest]


def layout_bound(one_chip, chips: int, chip_tiles: int, geometry) -> int:
    """The cheapest busiest-link wire cycles per inference of the one chip's chain cut into ``chips`` chips of at
    most ``chip_tiles`` consecutive tiles each (a cut before chain position ``c`` carries what tile ``c - 1`` emits,
    the host input for ``c = 0``; chips may end in pass-through tiles)."""
    lanes = one_chip.arch.lanes
    used = max(p for p, tile in enumerate(one_chip.tiles) if tile.config.n_out) + 1
    stream = [one_chip.input_words] + [tile.config.output_flits(lanes) for tile in one_chip.tiles[:used]]
    stream += [one_chip.output_words] * (chips * chip_tiles + 1 - len(stream))
    cost = [wire_cycles(geometry, flits) for flits in stream]

    def feasible(limit: int) -> bool:  # greedy: each chip ends at the last cut within the limit (partition.py)
        start = 0
        for _ in range(chips - 1):
            end = min(start + chip_tiles, used)
            while end >= start and cost[end] > limit:
                end -= 1
            if end < start:
                return False
            start = end
        return used - start <= chip_tiles

    candidates = sorted(set(cost))
    lo, hi = 0, len(candidates) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if feasible(candidates[mid]):
            hi = mid
        else:
            lo = mid + 1
    return candidates[lo]


def limiter(multi: Run, one: Run, bound: tuple[int, int, int]) -> str:
    from flowtile.compiler import link_cycles
    program, lanes = multi.program, multi.arch.lanes
    busiest, flits, wire = bound
    window = link_cycles(multi.arch, flits)
    slowest_tile = max(t.config.tile_period_cycles(lanes) for t in program.tiles)
    one_tile = max(t.config.tile_period_cycles(lanes) for t in one.program.tiles) if one.program else None
    where = f"link {busiest}: {flits} flits/inf"
    if wire >= 0.95 * multi.interval:
        return f"link ({where})"
    if window >= 0.95 * multi.interval:
        return f"link window ({where}, est. {window})"
    if one.interval is not None and multi.interval <= 1.02 * one.interval:
        return "tiles (as one chip)"
    if one_tile is not None and slowest_tile > 1.02 * one_tile:
        by_place = {(t.chip, t.row, t.col): t for t in program.tiles}
        name = next((layer.name for layer in program.layers
                     if any(by_place[tuple(t) if len(t) == 3 else (0, *t)].config.tile_period_cycles(lanes)
                            == slowest_tile for t in layer.tiles)), "pass-through")
        return f"partition (slowest tile {slowest_tile} vs {one_tile}: {name})"
    return f"stalls (tiles est. {slowest_tile}, {where})"


def load(net: str, workdir: Path, seed: int):
    """The int8 model of ``net``."""
    from flowtile.compiler import int8_model
    if net != LARGE:
        return int8_model(ROOT / "models" / "public" / f"mlperf_{net}_qdq.onnx")
    import onnx
    from flowtile.testing.random_models import quantize_qdq, random_float_mobilenet_v1
    rng = np.random.default_rng(seed)
    float_path, qdq_path = workdir / "mobilenet_v1_1.0_96_float.onnx", workdir / "mobilenet_v1_1.0_96_qdq.onnx"
    onnx.save(random_float_mobilenet_v1(rng, alpha=1.0, resolution=96, n_classes=1000), str(float_path))
    calibration = rng.standard_normal((16, 3, 96, 96)).astype(np.float32)
    quantize_qdq(float_path, qdq_path, calibration, activation_uint8=False, per_channel=True)
    return int8_model(qdq_path)


def main() -> None:
    os.environ.setdefault("AMARANTH_USE_YOSYS", "builtin")
    from flowtile.arch import Arch
    from flowtile.link_format import LinkGeometry

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chips", default="2,4,8", help="comma-separated chip counts N (default 2,4,8)")
    parser.add_argument("--grid", default="4x4", help="RxC tiles of one chip (default 4x4; the issue's size: 8x8)")
    parser.add_argument("--fractions", default="4,16,64",
                        help="link bandwidths as fractions 1/f of the flit width (default 4,16,64)")
    parser.add_argument("--latency", type=int, default=64, help="link latency in cycles (default 64)")
    parser.add_argument("--nets", default=",".join(NETS), help=f"comma-separated subset of {','.join(NETS)}")
    parser.add_argument("--sram-bytes", type=int, default=65536, help="per-tile SRAM, MLPerf nets (default 65536)")
    parser.add_argument("--queue-words", type=int, default=4096, help="forward queue depth, MLPerf nets (default 4096)")
    parser.add_argument("--large-sram-bytes", type=int, default=262144,
                        help=f"per-tile SRAM for {LARGE} (default 262144)")
    parser.add_argument("--large-queue-words", type=int, default=20480,
                        help=f"forward queue depth for {LARGE} (default 20480)")
    parser.add_argument("--max-tile-outputs", type=int, default=2048, help="parameter/result depth (default 2048)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", action="store_true", help="also print each compile report")
    args = parser.parse_args()
    chip_counts = [int(n) for n in args.chips.split(",")]
    fractions = [int(f) for f in args.fractions.split(",")]
    nets = args.nets.split(",")
    unknown = sorted(set(nets) - set(NETS))
    if unknown:
        parser.error(f"unknown network(s) {', '.join(unknown)}; known: {', '.join(NETS)}")

    rows = []  # table rows (tuples of str)
    summary = []
    total_started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="flowtile_multichip_") as workdir:
        for net in nets:
            started = time.perf_counter()
            model = load(net, Path(workdir), args.seed)
            progress(f"{net}: loaded in {time.perf_counter() - started:.1f} s")
            shape = tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:])
            x = np.random.default_rng(args.seed).standard_normal((args.batch, *shape)).astype(np.float32)
            large = net == LARGE
            base = Arch(sram_bytes=args.large_sram_bytes if large else args.sram_bytes,
                        max_tile_outputs=args.max_tile_outputs,
                        forward_queue_words=args.large_queue_words if large else args.queue_words,
                        link_latency_cycles=args.latency).with_grid(args.grid)
            retained_at = {}
            for n in chip_counts:
                one_arch = base.replace(rows=n * base.rows)
                progress(f"{net}: one chip of {one_arch.rows}x{one_arch.cols} ...")
                one = run(model, one_arch, x, args.report)
                progress(f"{net}: one chip of {one_arch.rows}x{one_arch.cols}: "
                         + (one.error or f"interval {one.interval:.0f}") + f" ({one.seconds:.1f} s)")
                rows.append((net, f"1 of {one_arch.rows}x{one_arch.cols}", "-",
                             "-" if one.error else f"{one.interval:.0f}", "100%" if not one.error else "-",
                             "-", "-", "-", "-", one.error or "tiles", f"{one.seconds:.0f}"))
                for fraction in fractions:
                    arch = base.replace(chips=n, link_bits_per_cycle=max(1, base.flit_bits // fraction))
                    geometry = LinkGeometry(arch)
                    label = f"1/{fraction} ({arch.link_bits} b)"
                    progress(f"{net}: {n} chips of {args.grid}, link {label} ...")
                    multi = run(model, arch, x, args.report) if n > 1 else None
                    if multi is None or multi.error:
                        why = "needs 2 or more chips" if multi is None else multi.error
                        progress(f"{net}: {n} chips, link {label}: {why}")
                        rows.append((net, f"{n} of {args.grid}", label, "-", "-", "-", "-", "-", "-",
                                     f"does not compile: {why}", f"{multi.seconds if multi else 0:.0f}"))
                        continue
                    bound = link_bound(multi.program)
                    retained = cap = of_cap = layout = None
                    same = ""
                    if one.interval is not None:
                        retained = one.interval / multi.interval
                        cap = one.interval / max(one.interval, bound[2])
                        of_cap = retained / cap
                        layout = one.interval / max(one.interval,
                                                    layout_bound(one.program, n, base.n_tiles, geometry))
                        if not np.array_equal(multi.q, one.q):
                            same = "; OUTPUTS DIFFER FROM ONE CHIP"
                    why = limiter(multi, one, bound) + same
                    if retained is not None:
                        retained_at[(n, fraction)] = (retained, cap, layout, why)
                    progress(f"{net}: {n} chips, link {label}: interval {multi.interval:.0f}"
                             + (f", retained {100 * retained:.1f}%" if retained is not None else "")
                             + f", {why} ({multi.seconds:.1f} s)")

                    def pct(v):
                        return "-" if v is None else f"{100 * v:.1f}%"
                    rows.append((net, f"{n} of {args.grid}", label, f"{multi.interval:.0f}", pct(retained),
                                 str(bound[2]), pct(cap), pct(of_cap), pct(layout), why, f"{multi.seconds:.0f}"))
            summary.append(verdict(net, retained_at))

    header = ("network", "chips", "link", "interval", "retained", "link bound", "link cap", "of cap", "layout cap",
              "limiter", "s")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    right = {3, 4, 5, 6, 7, 8, 10}

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    print(f"\nlinks: latency {args.latency} cycles, frames of {Arch.link_frame_flits} flits, credit "
          f"{Arch.link_credit_frames} frames, replay {Arch.link_replay_frames} frames; batch {args.batch}; tiles: "
          f"{args.sram_bytes} B SRAM, {args.queue_words}-word queues ({LARGE}: {args.large_sram_bytes} B, "
          f"{args.large_queue_words} words); intervals in cycles/inference")
    print(line(header).rstrip())
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row).rstrip())
    print()
    for text in summary:
        print(text)
    progress(f"total {time.perf_counter() - total_started:.0f} s")


def verdict(net: str, retained_at: dict) -> str:
    """One line: 4 chips at 1/16 and 1/64 against the issue's targets."""
    parts = []
    for fraction, target in TARGETS.items():
        if (4, fraction) not in retained_at:
            parts.append(f"1/{fraction}: not run")
            continue
        retained, cap, layout, why = retained_at[(4, fraction)]
        if retained >= target:
            status = "met"
        elif cap < target:
            status = (f"link cap {100 * cap:.1f}% < target, {100 * retained / cap:.1f}% of it: "
                      + ("met" if retained >= 0.9 * cap else "NOT met"))
        else:
            status = f"NOT met: {why.split(' (')[0]}; layout cap {100 * layout:.1f}%"
        parts.append(f"1/{fraction}: {100 * retained:.1f}% (target >= {100 * target:.0f}%: {status})")
    return f"{net}: 4 chips keep " + "; ".join(parts)


if __name__ == "__main__":
    main()
