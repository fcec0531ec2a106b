"""Chips in a line joined by slow links against one chip as large as all of them: steady-state throughput retained.

For every network and every N in ``--chips``: one chip of ``N*R x C`` tiles (the reference: same tile, same
per-tile SRAM, so the same total tiles and SRAM) and N chips of ``R x C`` tiles (``--grid``) joined by links of
``flit_bits // f`` wire bits per cycle for every ``f`` in ``--fractions`` (a link at 1/f of the on-chip flit
bandwidth: a mesh link carries one ``flit_bits``-bit flit a cycle), latency ``--latency`` cycles, the other link
fields at their Arch defaults. Each system is compiled (a CompileError is reported in one line), a seeded batch is
emulated (exact: RTL == emulator), and the N-chip outputs are checked bit-identical to the one chip's. One chip of
``R x C`` tiles is run too (for the replication estimate). Measured, not asserted.

Rows ``1 of RxC``: a single chip (its interval and its slowest layer); rows ``N of RxC``: the N-chip system, with

* ``interval``: the measured steady-state interval, cycles per inference (``flowtile.testing.measure.steady_state``:
  over the last half of a batch of ``max(--batch, 2 x tiles)`` program inferences, at most 512 program inferences and 6e8 PE (2e8 on linked chips)
  transfers (memory): a chain of many
  tiles settles into its periodic schedule only after a transient of about two inferences a tile; a run whose last
  quarter's interval still differs from its last half's by more than 1 % says so, ``flowtile.testing.measure.settled``);
* ``retained``: ``interval(one N*R x C chip) / interval(N chips)``, the throughput the N chips keep;
* ``link bound``: the busiest link of the compiled partition, its wire cycles per inference: ``frames x
  frame_beats`` (``flowtile.link_format.LinkGeometry.frames`` of the flits that cross it per inference and its lane
  table, ``Program.links``: dense frames carry only channels, not their padding lanes). No schedule of that
  partition is faster;
* ``link cap``: ``interval(one chip) / max(interval(one chip), link bound)``: the most throughput that partition
  can keep (the link as the only loss); ``of cap``: ``retained / link cap``, how close the run comes to it;
* ``layout cap``: the same for the one chip's own layout cut into N chips: the one chip's tiles in chain order, cut
  into chips of at most R*C consecutive tiles where the busiest link (the stream crossing each cut:
  ``output_flits`` of the tile before it, counted with every lane: the one chip's tiles carry no lane table) is
  cheapest. It is what cutting the layer chain costs without giving up
  tiles (the compiler may give tiles up to move a cut to a narrower stream, so it can beat this cap);
* ``any cap``: the most throughput *any* placement can keep with link 0 this slow (an upper bound, so where it is
  below a target the target is impossible): every inference either runs to some cut on chip 0 and sends that cut's
  stream over link 0 in dense frames, or (cut = the output) runs whole on chip 0 and sends its output; chip 0 takes
  ``interval(one R x C chip)`` (where the network fits one; else ``N x interval(one N*R x C chip)``) times the share
  of the MACs before the cut.
  The best mix of cuts (a convex combination, so at most two) minimises ``max(chip 0's cycles, link 0's cycles)``
  per inference (:func:`any_placement_interval`); ``of any``: ``retained / any cap``;
* ``copies``: copies of the network the compiler placed (``--replicas``: ``auto``, its choice; 1: cut the layer
  chain only): a replicated system runs ``--batch`` program inferences of ``copies`` inferences each, and its
  interval, link bound and estimates are per inference (per program inference over ``copies``); with ``--stage``
  (or the compiler's own choice of a stage) only some layers are copied and the others shared, the copies counted
  the same way;
* ``repl cap``: the same for pure replication: each chip runs the whole network on its R x C tiles
  for every N-th inference (``interval(one R x C chip) / N``) and link ``k`` carries the inputs of the chips after
  it and the outputs of those up to it, in dense frames (the plain input's ``C`` channels a pixel, not the host's
  window packing); ``-`` where the network does not fit one R x C chip;
* ``limiter``: ``link`` (the wire bound is within 5% of the interval), ``link window`` (the compiler's link
  estimate, which adds the credit and go-back-N round trips at this latency, is; the wire alone is not),
  ``tiles (as one chip)`` (no slower than the one chip), ``partition`` (the compiler's slowest tile is slower than
  the one chip's: it gave tiles up, to pass streams through to a narrow cut, leaving chips idle), ``stalls`` (the
  interval exceeds the compiler's estimate: back-pressure);
* ``s``: wall seconds of the row (compile + emulate).

A final line per network checks 4 chips at 1/16 and 1/64 against issue 11's targets: >= 90% retained at 1/16,
>= 75% at 1/64, or, where ``any cap`` is below the target (the link makes it impossible), >= 90% of ``any cap``.

Networks: the committed MLPerf-Tiny-shaped QDQ models (``models/public/mlperf_{resnet8,dscnn,mobilenet,
autoencoder}_qdq.onnx``; ``mobilenet`` is MobileNetV1-0.25) with ``--sram-bytes`` tiles, and ``mobilenet-1.0``:
MobileNetV1 alpha 1.0 at 96x96 with 1000 classes (4.2 M parameters, random fixed weights,
``flowtile.testing.random_models.random_float_mobilenet_v1``, quantized by onnxruntime into a temporary directory),
whose weights do not fit one chip, with ``--large-sram-bytes`` tiles (at 256 KiB it needs 45 tiles: 4 and 8 chips of
4x4). Every tile's forward queue is the SRAM its weights and banks leave free (docs/architecture.md section 4); its
result ring holds ``--ring-words`` words (default the Arch's).

Default (about 5 minutes on 2 cores): ``python benchmarks/multichip.py`` = ``--chips 2,4,8 --grid 4x4
--fractions 4,16,64 --batch 16``. The issue's chip size (8x8; longer): ``python benchmarks/multichip.py --grid 8x8
--large-sram-bytes 65536`` (MobileNet-1.0 then needs 152 tiles: 4 and 8 chips; ``--chips 2,4`` takes about 9
minutes, 8 chips much longer).
``--report`` prints every compile report. Nothing is cached.
"""
from __future__ import annotations

import argparse
import os
import re
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
#: the most program inferences a run takes so that its last half is steady state (a chain settles after about two
#: inferences a tile: 512 for 256 tiles; a replicated program's chain is as long as one chip's, so it counts
#: program inferences, not its copies' real ones), and the most PE transfers (input and output sides, over the
#: batch): the emulator holds every transfer time, about 24 bytes each on one chip (512 inferences of ResNet-8 on
#: 32x8 tiles, 5.4e8 transfers, fit in 14 GB) and up to about 70 with links (6e8 transfers of 4 copies of ResNet-8
#: on 4 chips of 8x8 ran out of 24 GB; so did 3.5e8 of MobileNetV1-1.0 on 4 chips of 8x8, whose 4 chips' pass-through
#: and link chains come on top): the caps keep either within about 14 GB
MAX_BATCH = 512
MAX_TRANSFERS_ONE_CHIP = 600_000_000
MAX_TRANSFERS_LINKED = 200_000_000
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


def run(model, arch, x, show_report: bool, replicas: int | None = None,
        max_transfers_linked: int = MAX_TRANSFERS_LINKED, stage: tuple[str, str] | None = None) -> Run:
    """Compile (``replicas``: copies of the network, None: the compiler's choice on several chips) and emulate.
    A replicated program runs ``len(x)`` program inferences (``x`` repeated to ``len(x) * replicas`` real ones), its
    interval is the steady state per program inference over its copies; ``q`` holds the first ``len(x)`` outputs."""
    from flowtile.compiler import CompileError, compile_model, report
    from flowtile.testing.measure import settled, steady_state
    from flowtile.testing.oracle_checks import emulate_model

    started = time.perf_counter()
    try:
        program = compile_model(model, arch, replicas=replicas if arch.chips > 1 else None,
                                stage=stage if arch.chips > 1 else None)
    except CompileError as error:
        return Run(arch, time.perf_counter() - started, error=str(error).splitlines()[0])
    if show_report:
        print(report(program))
    copies = program.replicas
    # a chain of many tiles settles into its periodic schedule only after about two inferences a tile
    # (measure.settled), so the batch grows with the tiles, within MAX_BATCH program inferences and the transfer caps
    transfers = sum(c.n_in_words + c.n_pass + c.output_flits(arch.lanes) for t in program.tiles for c in t.contexts)
    cap = MAX_TRANSFERS_ONE_CHIP if arch.chips == 1 else max_transfers_linked
    count = max(1, min(MAX_BATCH, cap // max(1, transfers), max(len(x), 2 * arch.system_tiles)))
    batch = np.resize(x, (count * copies, *x.shape[1:]))   # x first, repeated: count program inferences
    emulated = emulate_model(program, batch)
    view, count = program.program_inferences(len(batch))
    interval = steady_state(view, emulated.result, count).interval
    if not settled(view, emulated.result, count):
        progress(f"{program.model_name}: not settled after {count} program inferences (the last quarter's interval "
                 f"differs from the last half's by more than 1 %)")
    return Run(arch, time.perf_counter() - started, program, interval / copies, emulated.q[:len(x)])


def wire_cycles(geometry, flits: int, segments=()) -> int:
    """Wire cycles per inference of a link carrying ``flits`` flits per inference with lane table ``segments``:
    whole frames, back to back."""
    return geometry.frames(flits, segments) * geometry.frame_beats


def tensor_wire_cycles(geometry, tensors) -> int:
    """Wire cycles per inference of a link carrying a stream of ``tensors`` (``(pixels, channels)`` each) in dense
    frames (its lane table: :func:`flowtile.link_format.lane_segments_of_tensors`)."""
    from flowtile.link_format import lane_segments_of_tensors
    segments, flits = lane_segments_of_tensors(tensors, geometry.lanes)
    return wire_cycles(geometry, flits, segments)


def link_bound(program) -> tuple[int, int, int]:
    """(busiest link, its flits per program inference, its wire cycles per inference) of a multi-chip program (a
    replicated one: the program inference's cycles over its copies)."""
    from flowtile.link_format import LinkGeometry
    geometry = LinkGeometry(program.arch)
    cycles = [wire_cycles(geometry, link.inference_flits, link.segments) for link in program.links]
    busiest = max(range(len(cycles)), key=cycles.__getitem__)
    return busiest, program.links[busiest].inference_flits, round(cycles[busiest] / program.replicas)


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
    """What limits the N-chip run (see the module docstring)."""
    from flowtile.compiler import estimated_interval, link_cycles
    program, arch = multi.program, multi.arch
    busiest, flits, wire = bound
    copies = program.replicas   # per real inference: a program inference's cycles over its copies
    window = link_cycles(arch, flits, program.links[busiest].segments) / copies
    where = f"link {busiest}: {flits} flits/inf" + (f" of {copies} copies" if copies > 1 else "")
    if wire >= 0.95 * multi.interval:
        return f"link ({where})"
    if window >= 0.95 * multi.interval:
        return f"link window ({where}, est. {window})"
    if one.interval is not None and multi.interval <= 1.02 * one.interval:
        return "tiles (as one chip)"
    parts = []
    slowest, one_slowest = slowest_tile(program), slowest_tile(one.program) if one.program else None
    slowest = (slowest[0] / copies, slowest[1])
    if one_slowest is not None and slowest[0] > 1.02 * one_slowest[0]:
        computing = len({t.chip for t in program.tiles if t.config.n_out})
        parts.append(f"partition (slowest tile {slowest[0]:.0f} vs {one_slowest[0]}: {slowest[1]}; "
                     f"{computing}/{arch.chips} chips compute)")
    estimate = estimated_interval(program) / copies
    if multi.interval > 1.05 * estimate or not parts:
        parts.append(f"stalls (+{100 * (multi.interval / estimate - 1):.0f}% over est. {estimate:.0f})")
    return " + ".join(parts)


def slowest_tile(program) -> tuple[int, str]:
    """(the slowest tile's estimated cycles per inference, its layer) of ``program``."""
    lanes = program.arch.lanes
    by_place = {(t.chip, t.row, t.col): t for t in program.tiles}
    best = (0, "pass-through")
    for layer in program.layers:
        for place in layer.tiles:
            cycles = by_place[tuple(place) if len(place) == 3 else (0, *place)].config.tile_period_cycles(lanes)
            best = max(best, (cycles, layer.name))
    passing = [t.config.tile_period_cycles(lanes) for t in program.tiles if not t.config.n_out]
    return max(best, (max(passing, default=0), "pass-through"))


def queue_note(program) -> str:
    """A note when tiles that compute forward and pass more words per inference than their forward queue holds
    (they cannot take a whole inference in while they compute: the interval exceeds the estimate)."""
    short = [t for t in program.tiles
             if t.config.n_out and t.config.queued_words > t.config.queue_words]
    return f"; {len(short)} tiles' queues too short" if short else ""


def replication_bound(small: Run, one: Run, chips: int, geometry, input_tensor: tuple[int, int]) -> float | None:
    """Throughput kept (vs the one large chip) by pure replication: every chip runs the whole network on its own
    R x C tiles for every N-th inference (``interval(one R x C chip) / N``); link ``k`` then carries the inputs of
    chips ``k + 1 ..`` and the outputs of chips ``.. k``, each inference in its own dense frames
    (``input_tensor``: the plain input's ``(pixels, channels)``; the host's window packing, which the compiler may
    choose on one chip, would send more). None if the network does not fit one R x C chip."""
    if small.interval is None or one.interval is None:
        return None
    wire_in = tensor_wire_cycles(geometry, [input_tensor])
    wire_out = tensor_wire_cycles(geometry, [(1, small.program.output.length)])
    link = max(((chips - 1 - k) * wire_in + (k + 1) * wire_out) / chips for k in range(chips - 1))
    return one.interval / max(one.interval, small.interval / chips, link)


def cut_costs(model, lanes: int) -> tuple[list[float], list[tuple]]:
    """Per cut of the layer chain (before layer 0 = the input, ..., after the last layer = the output): the share of
    the MACs before it and its stream's tensors (plain input, ``compiler.emit.plan_streams``)."""
    from flowtile.compiler.emit import _layer_info, lane_shape, output_shape, plan_streams
    from flowtile.compiler.lower import lower_layers
    from flowtile.compiler.onnx_import import import_onnx
    imported = import_onnx(model)
    layers = lower_layers(imported.layers)
    plans = plan_streams(layers, lanes, imported.input.words(lanes), 1, lane_shape(imported.input, lanes))
    tensors = [plan.tensors for plan in plans] + [(output_shape(layers[-1]),)]
    macs = np.array([0] + [_layer_info(layer, ()).macs for layer in layers], dtype=np.float64)
    return list(np.cumsum(macs) / macs.sum()), tensors


def any_placement_interval(shares: list[float], tensors: list[tuple], chip0_cycles: float, geometry) -> float:
    """The shortest interval per inference any placement can reach through link 0 (see ``any cap``): over mixes of
    cuts ``c`` (chip 0 busy ``shares[c] * chip0_cycles``, link 0 busy its dense frames' wire cycles), the least
    ``max`` of the two, on the lower hull of the points (a mix of at most two cuts)."""
    points = [(share * chip0_cycles, tensor_wire_cycles(geometry, stream)) for share, stream in zip(shares, tensors)]
    best = min(max(a, b) for a, b in points)
    for i, (a1, b1) in enumerate(points):
        for a2, b2 in points[i + 1:]:
            d1, d2 = a1 - b1, a2 - b2
            if d1 * d2 < 0:  # the mix with equal chip and link cycles
                t = d1 / (d1 - d2)
                best = min(best, a1 + t * (a2 - a1))
    return best


def plain_input_tensor(shape: tuple[int, ...]) -> tuple[int, int]:
    """``(pixels, channels)`` of one input of ``shape`` (without the batch) as a plain stream tensor: a ``C x H x W``
    map ``H * W`` pixels of ``C`` channels, anything else one pixel of all its elements."""
    if len(shape) == 3:
        return shape[1] * shape[2], shape[0]
    return 1, int(np.prod(shape))


def short_error(error: str) -> str:
    """A CompileError's first clause, without the arch-field hints (the full text goes to stderr)."""
    error = re.sub(r" \(arch fields? [^)]*\)", "", error)
    return error.split(";")[0]


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


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def main() -> None:
    os.environ.setdefault("AMARANTH_USE_YOSYS", "builtin")
    from flowtile.arch import Arch
    from flowtile.compiler import estimated_interval
    from flowtile.link_format import LinkGeometry

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chips", default="2,4,8", help="comma-separated chip counts N (default 2,4,8)")
    parser.add_argument("--grid", default="4x4", help="RxC tiles of one chip (default 4x4; the issue's size: 8x8)")
    parser.add_argument("--fractions", default="4,16,64",
                        help="link bandwidths as fractions 1/f of the flit width (default 4,16,64)")
    parser.add_argument("--latency", type=int, default=64, help="link latency in cycles (default 64)")
    parser.add_argument("--nets", default=",".join(NETS), help=f"comma-separated subset of {','.join(NETS)}")
    parser.add_argument("--sram-bytes", type=int, default=65536, help="per-tile SRAM, MLPerf nets (default 65536)")
    parser.add_argument("--large-sram-bytes", type=int, default=262144,
                        help=f"per-tile SRAM for {LARGE} (default 262144)")
    parser.add_argument("--ring-words", type=int, default=None,
                        help="per-tile result ring depth (default: the Arch's)")
    parser.add_argument("--max-tile-outputs", type=int, default=2048, help="parameter/result depth (default 2048)")
    parser.add_argument("--tile-contexts", type=int, default=1,
                        help=f"layers a tile may hold (arch field tile_contexts; default 1, as README's tables were "
                             f"measured unless they say otherwise; the Arch default is {Arch.tile_contexts})")
    parser.add_argument("--max-transfers", type=float, default=MAX_TRANSFERS_LINKED,
                        help=f"PE transfers one emulation of linked chips may hold (memory: about 45-70 bytes each; "
                             f"default {MAX_TRANSFERS_LINKED:.0e}); a long chain needs more to settle")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", action="store_true", help="also print each compile report")
    parser.add_argument("--replicas", default="auto",
                        help="copies of the network on N chips (alternate inferences): 'auto' (default, the "
                             "compiler's choice) or a number (1: cut the layer chain only)")
    parser.add_argument("--stage", default=None, metavar="FIRST:LAST",
                        help="on N chips copy only layers FIRST..LAST (--replicas copies, default 2) and share the "
                             "others (docs/architecture.md section 12); use with --nets naming networks that have "
                             "these layers")
    args = parser.parse_args()
    chip_counts = [int(n) for n in args.chips.split(",")]
    replicas = None if args.replicas == "auto" else int(args.replicas)
    stage = tuple(args.stage.split(":")) if args.stage else None
    if stage is not None and len(stage) != 2:
        parser.error(f"--stage must be FIRST:LAST, got {args.stage!r}")
    fractions = [int(f) for f in args.fractions.split(",")]
    nets = args.nets.split(",")
    unknown = sorted(set(nets) - set(NETS))
    if unknown:
        parser.error(f"unknown network(s) {', '.join(unknown)}; known: {', '.join(NETS)}")

    rows = []  # table rows (tuples of str)
    summary = []
    total_started = time.perf_counter()

    def reference(net: str, model, arch, x) -> Run:
        """One chip of ``arch``: a row of the table."""
        grid = f"{arch.rows}x{arch.cols}"
        progress(f"{net}: one chip of {grid} ...")
        one = run(model, arch, x, args.report)
        if one.error:
            progress(f"{net}: one chip of {grid}: {one.error}")
            rows.append((net, f"1 of {grid}", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", "-",
                         f"does not compile: {short_error(one.error)}", f"{one.seconds:.1f}"))
            return one
        estimate = estimated_interval(one.program)
        stalls = (f" + stalls (+{100 * (one.interval / estimate - 1):.0f}% over est. {estimate})"
                  if one.interval > 1.05 * estimate else "")
        why = f"tiles ({slowest_tile(one.program)[1]}){stalls}{queue_note(one.program)}"
        progress(f"{net}: one chip of {grid}: interval {one.interval:.0f}, {why} ({one.seconds:.1f} s)")
        rows.append((net, f"1 of {grid}", "-", str(one.program.replicas), f"{one.interval:.0f}", "-", "-", "-", "-", "-", "-", "-", "-", why,
                     f"{one.seconds:.1f}"))
        return one

    with tempfile.TemporaryDirectory(prefix="flowtile_multichip_") as workdir:
        for net in nets:
            started = time.perf_counter()
            model = load(net, Path(workdir), args.seed)
            progress(f"{net}: loaded in {time.perf_counter() - started:.1f} s")
            shape = tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:])
            x = np.random.default_rng(args.seed).standard_normal((args.batch, *shape)).astype(np.float32)
            base = Arch(sram_bytes=args.large_sram_bytes if net == LARGE else args.sram_bytes,
                        max_tile_outputs=args.max_tile_outputs,
                        result_ring_words=args.ring_words or Arch.result_ring_words,
                        tile_contexts=args.tile_contexts,
                        link_latency_cycles=args.latency).with_grid(args.grid)
            small = reference(net, model, base, x)  # one R x C chip: the replication estimate
            cuts = cut_costs(model, base.lanes)
            retained_at = {}
            for n in chip_counts:
                one = reference(net, model, base.replace(rows=n * base.rows), x)
                for fraction in fractions:
                    arch = base.replace(chips=n, link_bits_per_cycle=max(1, base.flit_bits // fraction))
                    geometry = LinkGeometry(arch)
                    label = f"1/{fraction} ({arch.link_bits} b)"
                    progress(f"{net}: {n} chips of {args.grid}, link {label} ...")
                    multi = (run(model, arch, x, args.report, replicas, int(args.max_transfers), stage) if n > 1
                             else None)
                    if multi is None or multi.error:
                        why = "needs 2 or more chips" if multi is None else multi.error
                        progress(f"{net}: {n} chips, link {label}: {why}")
                        rows.append((net, f"{n} of {args.grid}", label, "-", "-", "-", "-", "-", "-", "-", "-", "-",
                                     "-", f"does not compile: {short_error(why)}", f"{multi.seconds if multi else 0:.1f}"))
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
                    replicated = replication_bound(small, one, n, geometry, plain_input_tensor(shape))
                    any_cap = of_any = None
                    if one.interval is not None:
                        # chip 0 alone: as measured on one R x C chip, else a 1/N share of the large chip
                        chip0 = small.interval if small.interval is not None else n * one.interval
                        fastest = any_placement_interval(*cuts, chip0, geometry)
                        any_cap = min(1.0, one.interval / fastest)
                        of_any = retained / any_cap
                    why = limiter(multi, one, bound) + queue_note(multi.program) + same
                    if retained is not None:
                        retained_at[(n, fraction)] = (retained, any_cap, layout, why)
                    progress(f"{net}: {n} chips, link {label}: interval {multi.interval:.0f}"
                             + (f", retained {100 * retained:.1f}%" if retained is not None else "")
                             + f", {why} ({multi.seconds:.1f} s)")
                    rows.append((net, f"{n} of {args.grid}", label, str(multi.program.replicas),
                                 f"{multi.interval:.0f}", pct(retained), str(bound[2]), pct(cap), pct(of_cap),
                                 pct(any_cap), pct(of_any), pct(layout), pct(replicated), why,
                                 f"{multi.seconds:.1f}"))
            summary.append(verdict(net, retained_at))

    header = ("network", "chips", "link", "copies", "interval", "retained", "link bound", "link cap", "of cap",
              "any cap", "of any", "layout cap", "repl cap", "limiter", "s")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    right = {3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14}

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    print(f"\nlinks: latency {args.latency} cycles, frames of {Arch.link_frame_flits} flits' bytes (dense), credit "
          f"{Arch.link_credit_frames} frames, replay {Arch.link_replay_frames} frames; batch {args.batch}; tiles: "
          f"{args.sram_bytes} B SRAM ({LARGE}: {args.large_sram_bytes} B) holding the forward queues, "
          f"{args.ring_words or Arch.result_ring_words}-word result rings; "
          f"intervals in cycles/inference")
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
            status = (f"any placement's link cap {100 * cap:.1f}% < target, {100 * retained / cap:.1f}% of it: "
                      + ("met" if retained >= 0.9 * cap else "NOT met"))
        else:
            status = f"NOT met: {why.split(' (')[0]}; layout cap {100 * layout:.1f}%"
        parts.append(f"1/{fraction}: {100 * retained:.1f}% (target >= {100 * target:.0f}%: {status})")
    return f"{net}: 4 chips keep " + "; ".join(parts)


if __name__ == "__main__":
    main()
