"""``flowtile`` command line: compile, emulate, rtl, run, fuzz, verilog.

Every known kind of bad input ends in one line ``flowtile: error: ...`` and exit status 2; a
mismatch found by ``flowtile run`` exits 1. Set ``FLOWTILE_DEBUG=1`` to see tracebacks.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from .arch import Arch, ArchError
from .host import check_input, model_layout
from .output_paths import OutputPathError, check_distinct, check_output_file, check_parent_writable

EXIT_MISMATCH = 1
EXIT_BAD_INPUT = 2
#: ``flowtile run`` without ``--input`` runs this many seeded random inputs unless ``--batch`` says otherwise.
DEFAULT_RANDOM_BATCH = 8
#: Inputs warn when more than this share of their values saturate the model's int8 input range.
SATURATION_WARNING_SHARE = 0.01


class UsageError(Exception):
    """A command-line argument or input file is unusable."""


def _arch_from_args(args) -> Arch:
    arch = Arch.from_toml(args.arch) if getattr(args, "arch", None) else Arch()
    arch = arch.with_grid(getattr(args, "grid", None))
    chips, topology = getattr(args, "chips", None), getattr(args, "topology", None)
    fields = {name: value for name, value in (("chips", chips), ("chip_topology", topology)) if value is not None}
    return arch.replace(**fields) if fields else arch


def _load_array(path: str, what: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Load ``X.npy`` or an ``.npz`` with ``x`` (and optional labels ``y``)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{what} file '{path}' does not exist")
    try:
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as data:
                if "x" not in data:
                    raise UsageError(f"{what} file '{path}' has no array 'x' (has: {', '.join(data.files)})")
                return data["x"], (data["y"] if "y" in data else None)
        return np.load(p, allow_pickle=False), None
    except UsageError:
        raise
    except Exception as error:  # numpy raises several types for a malformed file
        raise UsageError(f"{what} file '{path}' is not a readable .npy/.npz array: {error}") from None


def _save_array(path: str, array: np.ndarray) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".partial.npy")
    np.save(tmp, array)
    tmp.replace(p)


def _write_json(path: str | None, payload: dict) -> None:
    if path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(payload, indent=2) + "\n")


def _progress(message: str) -> None:
    print(f"[flowtile] {message}", file=sys.stderr, flush=True)


# --- commands ---------------------------------------------------------------------------------------

def _check_outputs(outputs: dict[str, str | None], inputs: dict[str, str | None]) -> None:
    """Every output path is checked before the work starts (one line and exit 2 for a bad one)."""
    files = {option: check_output_file(path, option) for option, path in outputs.items()}
    check_distinct(files, {option: Path(path) if path else None for option, path in inputs.items()})


def _load_model(path: str, calibration: str | None):
    """The ONNX model at ``path``, its graph named after the file (the program's ``model_name``);
    ``--calibration`` on an already quantized model is an error (it would be silently ignored)."""
    from flowtile.compiler import is_quantized
    from flowtile.compiler.onnx_import import load_model
    model = load_model(path)
    if calibration and is_quantized(model):
        raise UsageError(f"--calibration applies to float models only; '{path}' is already quantized (int8)")
    model.graph.name = Path(path).stem
    return model


def _warn_if_inputs_saturate(program, x: np.ndarray) -> None:
    """Warn when more than :data:`SATURATION_WARNING_SHARE` of the input values lie beyond the model's int8 input
    range (they saturate): the usual cause is inputs scaled unlike the calibration data, e.g. 0..255 pixels for a
    model calibrated on 0..1. ``--no-range-check`` silences it."""
    from .host import dequantize, quantize
    spec = program.input
    flat = x.reshape(len(x), -1)
    represented = dequantize(quantize(flat, spec), spec).reshape(flat.shape)
    saturated = np.abs(flat - represented) > np.float32(spec.scale)  # more than a step away: clipped
    share = float(np.mean(saturated))
    if share > SATURATION_WARNING_SHARE:
        lowest, highest = float(represented.min()), float(represented.max())
        warnings.warn(f"{100 * share:.1f}% of the input values (seen: {float(flat.min()):g}..{float(flat.max()):g}) "
                      f"fall outside the model's int8 input range and saturate (scale {spec.scale:g}, zero point "
                      f"{spec.zero_point}: representable about {lowest:g}..{highest:g}); are the inputs scaled like "
                      f"the calibration data? (--no-range-check silences this)")


def cmd_compile(args) -> int:
    from flowtile.compiler import compile_model, report
    from .program import check_program_destination
    check_program_destination(args.output)
    check_parent_writable(Path(args.output), "-o/--output")
    check_distinct({"-o/--output": Path(args.output)},
                   {"model": Path(args.model), "--calibration": Path(args.calibration) if args.calibration else None})
    arch = _arch_from_args(args)
    model = _load_model(args.model, args.calibration)
    calibration = _load_array(args.calibration, "calibration")[0] if args.calibration else None
    program = compile_model(model, arch, calibration=calibration, replicas=_replicas(args), stage=_stage(args))
    program.save(args.output)
    print(report(program))
    print(f"program written to {args.output}")
    return 0


def _load_program(path):
    from .program import Program
    return Program.load(path)


def _host_pattern(args):
    """The run's :class:`flowtile.host.HostPattern` from the stall options, or None (never stalled)."""
    from .host import HostPattern
    try:
        pattern = HostPattern(args.stall_seed, args.out_duty, args.out_burst, args.in_duty, args.in_burst)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if args.out_duty >= 1 and args.in_duty >= 1:
        unused = [option for option, value, default in (("--stall-seed", pattern.seed, HostPattern.seed),
                                                        ("--out-burst", pattern.out_burst, HostPattern.out_burst),
                                                        ("--in-burst", pattern.in_burst, HostPattern.in_burst))
                  if value != default]
        if unused:
            raise UsageError(f"{', '.join(unused)} do nothing unless --out-duty or --in-duty is below 1")
        return None
    return pattern


def _pattern_report(host_pattern) -> dict:
    if host_pattern is None:
        return {}
    return {"host_pattern": dataclasses.asdict(host_pattern)}


def _emulate(program, x, host_pattern=None, max_cycles=None):
    from flowtile.emulator import emulate
    from .host import input_flits, outputs_from_flits, pad_batch
    padded = pad_batch(program, x)  # a replicated program: zero inputs up to a multiple of its copies, dropped after
    q_in, flits = input_flits(program, padded)
    view, count = program.program_inferences(padded.shape[0])   # the emulator counts program inferences
    started = time.perf_counter()
    result = emulate(view, flits, count, **({} if host_pattern is None else {"host_pattern": host_pattern}),
                     **({} if max_cycles is None else {"max_cycles": max_cycles}))
    seconds = time.perf_counter() - started
    q_out, y = outputs_from_flits(program, result.out_flits, padded.shape[0])
    return result, q_out[:x.shape[0]], y[:x.shape[0]], seconds


WAVES_DIR = Path("sim_waves")


def _waves_path(waves: str | None, simulator: str, name: str) -> Path | None:
    """Where ``--waves`` writes: a bare file name (or no name at all) lands in ``sim_waves/``."""
    if waves is None:
        return None
    suffix = ".fst" if simulator == "verilator" else ".vcd"
    path = Path(waves) if waves else Path(f"{name or 'flowtile'}{suffix}")
    if path.parent == Path("."):
        path = WAVES_DIR / path
    return check_output_file(path, "--waves")


def _rtl(program, x, simulator, waves_path, host_pattern=None, max_cycles=None):
    from flowtile.rtl.simulate import simulate
    from .host import input_flits, outputs_from_flits, pad_batch
    real = x.shape[0]
    x = pad_batch(program, x)  # a replicated program: zero inputs up to a multiple of its copies, dropped after
    _q_in, flits = input_flits(program, x)
    if waves_path is not None:
        waves_path.parent.mkdir(parents=True, exist_ok=True)
        _progress(f"writing waveform to {waves_path}")
    from flowtile.rtl.simulate import RtlTimeoutError
    try:
        result = simulate(program, flits, x.shape[0], simulator=simulator, waves=waves_path,
                          **({} if host_pattern is None else {"host_pattern": host_pattern}),
                          **({} if max_cycles is None else {"max_cycles": max_cycles}))
    except RtlTimeoutError as error:
        view, _ = program.program_inferences(x.shape[0])   # the runner counts program inferences
        raise RtlTimeoutError(f"{error}; {_suspected_stuck(view, error.batch, error.out_received)}",
                              **{k: v for k, v in vars(error).items() if not k.startswith("_")}) from None
    q_out, y = outputs_from_flits(program, result.out_flits, x.shape[0])
    return result, q_out[:real], y[:real]


def _suspected_stuck(program, batch: int, out_received: int) -> str:
    """Where an RTL run that stopped is stuck, from the program's flit counts as the emulator follows them (the
    RTL runner has no model of the machine; this top layer asks the emulator's)."""
    from flowtile.emulator import flit_progress
    from flowtile.emulator.watchdog import stuck_summary
    progress = flit_progress(program, max(1, batch))
    summary = stuck_summary(progress)
    if summary:
        return f"suspected stuck (the program's flit counts do not add up): {summary}"
    words = program.output_words
    last_tile = progress.tiles[-1].key if progress.tiles else "?"
    return (f"the program's flit counts add up, so no tile should wait forever; the first missing output flit is "
            f"{out_received} (inference {out_received // words}, word {out_received % words}) from tile {last_tile}")


def cmd_emulate(args) -> int:
    from .reports import write_visuals
    _check_outputs({"--output": args.output, "--report": args.report, "--trace": args.trace,
                          "--heatmap": args.heatmap}, {"--input": args.input})
    program = _load_program(args.program)
    host_pattern = _host_pattern(args)
    x = model_layout(_load_array(args.input, "input")[0], program.input)  # e.g. NHWC images: the host transposes
    if args.range_check:
        _warn_if_inputs_saturate(program, check_input(x, program.input))
    # the emulator stops where the RTL harness would: at --max-cycles, by default the program's cycle limit
    from flowtile.emulator import cycle_limit
    from .host import pad_batch
    view, count = program.program_inferences(len(pad_batch(program, x)))  # a replicated program's own inferences
    limit = args.max_cycles if args.max_cycles is not None else cycle_limit(view, count, host_pattern)
    result, _q, y, seconds = _emulate(program, x, host_pattern, limit)
    _save_array(args.output, y)
    report = result.report() | {"emulator_seconds": seconds} | _pattern_report(host_pattern)
    if program.replicas > 1:   # the emulator counted program inferences of replicas real ones (padded batch)
        report |= {"replicas": program.replicas, "inferences": int(x.shape[0]),
                   "interval_cycles_per_inference": report["interval_cycles"] / program.replicas}
    _write_json(args.report, report)
    if args.trace or args.heatmap:
        write_visuals(program, result, trace=args.trace, heatmap=args.heatmap)
    print(json.dumps(report, indent=2))
    return 0


def cmd_rtl(args) -> int:
    program = _load_program(args.program)
    waves = _waves_path(args.waves, args.sim, program.model_name)
    _check_outputs({"--output": args.output, "--report": args.report, "--waves": waves},
                   {"--input": args.input})
    host_pattern = _host_pattern(args)
    x = model_layout(_load_array(args.input, "input")[0], program.input)  # e.g. NHWC images: the host transposes
    if args.range_check:
        _warn_if_inputs_saturate(program, check_input(x, program.input))
    result, _q, y = _rtl(program, x, args.sim, waves, host_pattern, args.max_cycles)
    _save_array(args.output, y)
    report = {"cycles": int(result.cycles), "batch": int(x.shape[0]), "simulator": args.sim,
              "wall_seconds": result.wall_seconds, "build_seconds": result.build_seconds} | _pattern_report(host_pattern)
    _write_json(args.report, report)
    print(json.dumps(report, indent=2))
    return 0


def cmd_verilog(args) -> int:
    from flowtile.hdl.verilog import chip_verilog, system_verilog
    check_output_file(args.output, "-o/--output")
    arch = _arch_from_args(args)
    # one chip: module flowtile_chip; a line or ring of chips: module flowtile_system (chips and links, one tile
    # module and one link module)
    text = system_verilog(arch) if arch.chips > 1 else chip_verilog(arch)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    chips = f"{arch.chips} chips{' in a ring' if arch.chip_topology == 'ring' else ''} of " if arch.chips > 1 else ""
    print(f"wrote {out} ({chips}{arch.rows}x{arch.cols} tiles, {arch.lanes} lanes, {len(text.splitlines())} lines)")
    return 0


def cmd_area(args) -> int:
    """``flowtile area``: per-component hardware cost of one tile, the chip and the link from Yosys
    (:mod:`flowtile.area`); ``--fpga`` adds an ECP5 place and route of one tile."""
    from .area import AreaError, format_table, fpga_tile, synthesise
    check_output_file(args.json, "--json")
    arch = _arch_from_args(args)
    try:
        report = synthesise(arch)
        if args.fpga:
            report.fpga = fpga_tile(arch, report=report)
    except AreaError as error:
        raise UsageError(str(error)) from None
    print(format_table(report))
    if args.json:
        _write_json(args.json, report.to_dict())
        print(f"wrote {args.json}")
    return 0


def cmd_run(args) -> int:
    from flowtile.compiler import compile_model, int8_model, is_quantized, report as compile_report
    from .oracle import onnxruntime_int8_output
    from .reports import write_visuals

    if args.input and args.batch is not None:
        raise UsageError("--batch applies only without --input (the batch is the input file's first dimension)")
    if args.batch is not None and args.batch < 1:
        raise UsageError(f"--batch must be at least 1, got {args.batch}")
    arch = _arch_from_args(args)
    waves = _waves_path(args.waves, args.sim, Path(args.model).stem) if args.sim != "none" else None
    _check_outputs({"--report": args.report, "--trace": args.trace, "--heatmap": args.heatmap, "--waves": waves},
                   {"model": args.model, "--input": args.input, "--calibration": args.calibration,
                    "--float-model": args.float_model})
    if args.input:
        x, labels = _load_array(args.input, "input")
    else:
        x, labels = None, None
    calibration = _load_array(args.calibration, "calibration")[0] if args.calibration else None

    model = _load_model(args.model, args.calibration)
    if not is_quantized(model):
        _progress("float model: quantizing to int8 QDQ with onnxruntime's quantizer")
    model = int8_model(model, calibration)  # quantized once: the compiler and the oracle get the same model
    chips = f"{arch.chips} chips of " if arch.chips > 1 else ""
    _progress(f"compiling {args.model} for {chips}a {arch.rows}x{arch.cols} grid, {arch.lanes} lanes")
    program = compile_model(model, arch, replicas=_replicas(args), stage=_stage(args))
    published_x = x  # the float model (--float-model) takes the input as given
    if x is None:
        batch = args.batch or DEFAULT_RANDOM_BATCH
        x = np.random.default_rng(0).standard_normal((batch,) + tuple(program.input.shape)).astype(np.float32)
        _progress(f"no --input: using {batch} seeded random inputs")
    else:
        x = model_layout(x, program.input)  # e.g. NHWC images of a tf2onnx model: the host transposes
        if args.range_check:
            _warn_if_inputs_saturate(program, check_input(x, program.input))
    with tempfile.TemporaryDirectory(prefix="flowtile-run-") as tmp:
        program.save(Path(tmp) / "prog")   # exercise the artifact: run what was written, as the CLI would
        program = _load_program(Path(tmp) / "prog")
    print(compile_report(program))

    _progress(f"emulating batch {x.shape[0]}")
    emu, emu_q, emu_y, emu_seconds = _emulate(program, x)
    rtl = None
    if args.sim != "none":
        _progress(f"RTL simulation ({args.sim}) of batch {x.shape[0]}: building/simulating")
        rtl, rtl_q, _rtl_y = _rtl(program, x, args.sim, waves)
    _progress("onnxruntime reference (graph optimizations disabled)")
    ort_q, ort_y = onnxruntime_int8_output(model, program, x)  # the very int8 model that was compiled

    rows = []
    ok = True
    ort_diff = int(np.max(np.abs(emu_q.astype(np.int32) - ort_q.astype(np.int32)))) if emu_q.size else 0
    ort_ok = ort_diff <= 1
    ok &= ort_ok
    rows.append(("emulator vs onnxruntime int8", f"max |diff| = {ort_diff} LSB", "ok" if ort_ok else "MISMATCH"))
    if rtl is not None:
        bits_equal = bool(np.array_equal(rtl.out_flits, emu.out_flits))
        times_equal = bool(np.array_equal(np.asarray(rtl.out_times), np.asarray(emu.out_times)))
        cycles_equal = int(rtl.cycles) == int(emu.cycles)
        ok &= bits_equal and times_equal and cycles_equal
        n_bad = int(np.sum(np.any(rtl.out_flits != emu.out_flits, axis=1)))
        rows.append(("RTL vs emulator outputs", "bit-identical" if bits_equal else f"{n_bad} flits differ",
                     "ok" if bits_equal else "MISMATCH"))
        rows.append(("RTL vs emulator cycles", f"{rtl.cycles} vs {emu.cycles}", "ok" if cycles_equal else "MISMATCH"))
        rows.append(("RTL vs emulator per-flit times", "identical" if times_equal else "differ",
                     "ok" if times_equal else "MISMATCH"))
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        rows.append(("accuracy onnxruntime int8", f"{np.mean(np.argmax(ort_y.reshape(len(x), -1), 1) == labels):.4f}", ""))
        rows.append(("accuracy flowtile", f"{np.mean(np.argmax(emu_y.reshape(len(x), -1), 1) == labels):.4f}", ""))
        if args.float_model:
            from .oracle import onnxruntime_float_output
            float_y = onnxruntime_float_output(args.float_model, published_x)
            rows.insert(-2, ("accuracy float (onnxruntime)", f"{np.mean(np.argmax(float_y.reshape(len(x), -1), 1) == labels):.4f}", ""))
    rep = emu.report()
    rows.append(("cycles (batch)", str(rep["cycles"]), ""))
    rows.append(("latency (cycles)", str(rep["latency_cycles"]), ""))
    copies = program.replicas   # the emulator counts program inferences: copies real ones each
    if copies > 1:
        rep["replicas"] = copies
        rows.append(("copies of the network", f"{copies} (alternate inferences)", ""))
    rows.append(("interval (cycles/inference)", f"{rep['interval_cycles'] / copies:.1f}", ""))
    rows.append(("MAC utilization (whole run)", f"{100 * rep['mac_utilization']:.1f}%", ""))
    steady = steady_state_utilization(program, rep["interval_cycles"] / copies)
    rep["steady_state_mac_utilization"] = steady
    rows.append(("MAC utilization (steady state)", f"{100 * steady:.1f}%", ""))
    rows.append(("emulator wall time", f"{emu_seconds * 1e3:.1f} ms", ""))
    if rtl is not None:
        rows.append((f"RTL ({args.sim}) wall time", f"{rtl.wall_seconds:.2f} s (+ build {rtl.build_seconds:.1f} s)", ""))
    width = max(len(r[0]) for r in rows)
    print()
    for name, value, verdict in rows:
        print(f"  {name:<{width}}  {value:<28} {verdict}")
    print()
    if args.trace or args.heatmap:
        write_visuals(program, emu, trace=args.trace, heatmap=args.heatmap)
    _write_json(args.report, rep | {"ort_max_diff_lsb": ort_diff, "match": bool(ok)})
    print("PASS: RTL and emulator agree" if ok and rtl is not None else
          "PASS (RTL skipped)" if ok else "FAIL: see MISMATCH rows above")
    return 0 if ok else EXIT_MISMATCH


def steady_state_utilization(program, interval_cycles: float) -> float:
    """Network MACs per inference / (cycles per inference in steady state x tiles x lanes)."""
    arch = program.arch
    return program.macs_per_inference / (interval_cycles * arch.system_tiles * arch.lanes) if interval_cycles else 0.0


# --- argument parsing -------------------------------------------------------------------------------

def _add_arch_options(parser):
    parser.add_argument("--arch", metavar="A.toml", default=None,
                        help="architecture description (TOML, any Arch field); default: the built-in Arch")
    parser.add_argument("--grid", metavar="RxC", default=None, help="tile grid of the chip, e.g. 4x4; default: the arch's")
    parser.add_argument("--chips", type=int, default=None, metavar="N",
                        help="chips in a line joined by links (the grid is one chip's; link fields via --arch); "
                             "default: the arch's (1)")
    parser.add_argument("--topology", choices=("line", "ring"), default=None,
                        help="how the chips are joined (arch field chip_topology): 'line', or 'ring' (the host on chip "
                             "0 only: one more link returns the last chip's output to it); default: the arch's (line)")


def _add_replicas_option(parser):
    parser.add_argument("--replicas", type=int, default=None, metavar="N",
                        help="copies of the network on the chips, taking alternate inferences (the host sends N "
                             "inputs back to back; a batch is padded to a multiple of N); default: the count with "
                             "the shortest estimated interval per inference, up to one a chip on several chips and "
                             "up to 4 on one chip of 64 tiles or more (1 on smaller chips)")
    parser.add_argument("--stage", default=None, metavar="FIRST:LAST",
                        help="copy only layers FIRST..LAST (names as the compile report gives them; --replicas "
                             "copies, default 2) and let the copies share the layers before and after them, whose "
                             "tiles run once per inference (docs/architecture.md section 12, replicated stages); "
                             "default: on several chips, where no copy of the whole network helps, the slowest "
                             "chip's layers are tried")


def _replicas(args) -> int | None:
    if args.replicas is not None and args.replicas < 1:
        raise UsageError(f"--replicas must be at least 1, got {args.replicas}")
    return args.replicas


def _stage(args) -> tuple[str, str] | None:
    if args.stage is None:
        return None
    first, colon, last = args.stage.partition(":")
    if not colon or not first or not last:
        raise UsageError(f"--stage must be FIRST:LAST (two layer names), got {args.stage!r}")
    if args.replicas is not None and args.replicas < 2:
        raise UsageError(f"--stage copies a stage at least twice; --replicas is {args.replicas}")
    return first, last


def _add_output_options(parser, *, output: bool):
    if output:
        parser.add_argument("--output", required=True, metavar="Y.npy", help="float outputs (required)")
    parser.add_argument("--report", metavar="R.json", default=None, help="JSON report; default: not written")


def _add_visual_options(parser):
    parser.add_argument("--trace", metavar="T.json", default=None,
                        help="Perfetto/Chrome trace of every tile's phases; default: not written")
    parser.add_argument("--heatmap", metavar="H.png", default=None,
                        help="per-tile MAC utilization picture; default: not written")


def _add_model_input_options(parser):
    parser.add_argument("--calibration", metavar="X.npy", default=None,
                        help="calibration inputs, for float models only; default: seeded random-normal samples")
    parser.add_argument("--no-range-check", dest="range_check", action="store_false",
                        help="do not warn when inputs saturate the model's int8 input range (default: warn)")


def _add_stall_options(parser):
    """Host back-pressure and input gaps (flowtile.host.HostPattern); the same options give the same cycles on
    the emulator and the RTL."""
    parser.add_argument("--stall-seed", type=int, default=0, metavar="N",
                        help="seed of the host's per-cycle stall pattern")
    parser.add_argument("--out-duty", type=float, default=1.0, metavar="F",
                        help="fraction of cycles the host output is ready, in (0, 1]; 1 = never stalls")
    parser.add_argument("--out-burst", type=float, default=4.0, metavar="C",
                        help="mean length of a host output stall in cycles (>= 1)")
    parser.add_argument("--in-duty", type=float, default=1.0, metavar="F",
                        help="fraction of cycles the host offers its next input flit, in (0, 1]; 1 = back to back")
    parser.add_argument("--in-burst", type=float, default=4.0, metavar="C",
                        help="mean length of a host input gap in cycles (>= 1)")


def _max_cycles(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if not 1 <= value < 1 << 32:
        raise argparse.ArgumentTypeError(f"must be in 1..{(1 << 32) - 1}, got {value}")
    return value


def _add_max_cycles_option(parser):
    """The run's cycle limit (the watchdog, flowtile.emulator.watchdog): the emulator and the RTL stop at the same
    cycle and name the unfinished or stuck tiles (exit status 2)."""
    parser.add_argument("--max-cycles", type=_max_cycles, default=None, metavar="N",
                        help="stop the run after N cycles and report the stuck tiles (exit 2); default: derived "
                             "from the program (a generous budget from its flit counts, stretched by host stalls)")


class _DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every option's help shows its default: stated in the help text, or appended as ``(default: X)``."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    formatter = _DefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="flowtile", description=__doc__.splitlines()[0], formatter_class=formatter)
    parser.add_argument("--version", action="version", version=f"flowtile {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compile", help="compile an ONNX model into a program directory", formatter_class=formatter)
    p.add_argument("model", metavar="MODEL.onnx", help="int8 (QDQ/QOperator) or float ONNX model")
    _add_arch_options(p)
    _add_replicas_option(p)
    p.add_argument("--calibration", metavar="X.npy", default=None,
                   help="calibration inputs, for float models only; default: seeded random-normal samples")
    p.add_argument("-o", "--output", required=True, metavar="PROG",
                   help="program directory to create; replaces only an existing flowtile program directory (required)")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("emulate", help="run a program on the emulator", formatter_class=formatter)
    p.add_argument("program", metavar="PROG", help="program directory from 'flowtile compile'")
    p.add_argument("--input", required=True, metavar="X.npy", help="float inputs with a leading batch dimension (required)")
    p.add_argument("--no-range-check", dest="range_check", action="store_false",
                   help="do not warn when inputs saturate the model's int8 input range (default: warn)")
    _add_stall_options(p)
    _add_max_cycles_option(p)
    _add_output_options(p, output=True)
    _add_visual_options(p)
    p.set_defaults(func=cmd_emulate)

    p = sub.add_parser("rtl", help="run a program on the RTL (Verilator or Amaranth simulator)",
                       formatter_class=formatter)
    p.add_argument("program", metavar="PROG", help="program directory from 'flowtile compile'")
    p.add_argument("--input", required=True, metavar="X.npy", help="float inputs with a leading batch dimension (required)")
    p.add_argument("--no-range-check", dest="range_check", action="store_false",
                   help="do not warn when inputs saturate the model's int8 input range (default: warn)")
    p.add_argument("--sim", choices=("verilator", "amaranth"), default="verilator", help="RTL simulator")
    p.add_argument("--waves", metavar="FILE", nargs="?", const="", default=None,
                   help="write a waveform (FST for Verilator, VCD for Amaranth); a bare name goes to sim_waves/; "
                        "default: no waveform")
    _add_stall_options(p)
    _add_max_cycles_option(p)
    _add_output_options(p, output=True)
    p.set_defaults(func=cmd_rtl)

    p = sub.add_parser("run", help="compile, emulate, RTL-simulate and compare with onnxruntime",
                       formatter_class=formatter)
    p.add_argument("model", metavar="MODEL.onnx", help="int8 (QDQ/QOperator) or float ONNX model")
    p.add_argument("--input", metavar="X.npy", default=None,
                   help=".npy inputs, or .npz with x and labels y; default: --batch seeded random inputs")
    p.add_argument("--batch", type=int, default=None,
                   help=f"number of seeded random inputs, only without --input; default: {DEFAULT_RANDOM_BATCH}")
    p.add_argument("--float-model", metavar="F.onnx", default=None,
                   help="float model, to report its accuracy too; default: not reported")
    _add_model_input_options(p)
    _add_arch_options(p)
    _add_replicas_option(p)
    p.add_argument("--sim", choices=("verilator", "amaranth", "none"), default="verilator",
                   help="RTL simulator, or none to skip the RTL")
    p.add_argument("--waves", metavar="FILE", nargs="?", const="", default=None,
                   help="waveform of the RTL run; a bare name (or none) goes to sim_waves/; default: no waveform")
    _add_output_options(p, output=False)
    _add_visual_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("fuzz", help="random networks on random archs: compiler, emulator, Verilator, onnxruntime "
                                    "(on Dask)", formatter_class=formatter)
    p.add_argument("--programs", type=int, required=True, metavar="N", help="number of random programs (required)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="campaign seed (case i has seed S*1000000+i)")
    p.add_argument("--archs", type=int, default=6, metavar="K",
                   help="size of the seeded pool of random architectures the cases draw from")
    p.add_argument("--shrink-attempts", type=int, default=None, metavar="N",
                   help="candidate networks tried when shrinking a disagreeing case to a small reproducer "
                        "(0: save the case as it is); default: flowtile.fuzz.SHRINK_ATTEMPTS (24)")
    p.add_argument("--scheduler", metavar="ADDRESS", default=None,
                   help="Dask scheduler address (e.g. tcp://host:8786); default: a local cluster of --workers processes")
    p.add_argument("--workers", type=int, default=2, metavar="W", help="worker processes of the local cluster")
    p.add_argument("--out", metavar="DIR", default="fuzz-out",
                   help="results.jsonl (appended; cases in it are skipped) and reproducers of disagreeing cases")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar (default: a tqdm bar on stderr)")
    p.set_defaults(func=cmd_fuzz)

    p = sub.add_parser("verilog", help="write the chip's Verilog", formatter_class=formatter)
    _add_arch_options(p)
    p.add_argument("-o", "--output", required=True, metavar="FILE.v", help="Verilog file to write (required)")
    p.set_defaults(func=cmd_verilog)

    p = sub.add_parser("area", help="hardware cost per component (cells, flip-flops, multipliers, memory bits) "
                                    "of one tile, the chip and the link, from Yosys", formatter_class=formatter)
    _add_arch_options(p)
    p.add_argument("--fpga", action="store_true",
                   help="also place and route one tile on an ECP5 (LUT4s, DSPs, block RAMs, fmax estimate; minutes) "
                        "(default: off)")
    p.add_argument("--json", metavar="OUT.json", default=None, help="write the numbers as JSON; default: not written")
    p.set_defaults(func=cmd_area)
    return parser


def cmd_fuzz(args) -> int:
    """Exit 0 iff every program agreed (ok or did not fit); the last line is the campaign's summary.
    ``FLOWTILE_FUZZ_FAULT=flip-emulator-bit`` injects a fault in every case (to test the fuzzer itself)."""
    from .fuzz import FAULTS, run_campaign
    fault = os.environ.get("FLOWTILE_FUZZ_FAULT") or None
    if fault is not None and fault not in FAULTS:
        raise UsageError(f"FLOWTILE_FUZZ_FAULT={fault!r} is not a known fault ({', '.join(FAULTS)})")
    for name in ("programs", "archs", "workers"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    if args.shrink_attempts is not None and args.shrink_attempts < 0:
        raise UsageError(f"--shrink-attempts must be >= 0, got {args.shrink_attempts}")
    summary = run_campaign(programs=args.programs, seed=args.seed, archs=args.archs, out_dir=args.out,
                           workers=args.workers, scheduler=args.scheduler,
                           fault=fault, shrink_attempts=args.shrink_attempts,
                           progress=args.progress, log=_progress)
    print(summary.last_line(), flush=True)
    return 0 if summary.agreed else EXIT_MISMATCH


def _version() -> str:
    from importlib import metadata
    try:
        return metadata.version("flowtile")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _known_errors() -> tuple[type, ...]:
    from .program import ProgramError
    from .host import InputError
    known = [ArchError, ProgramError, InputError, UsageError, OutputPathError, FileNotFoundError]
    try:
        from flowtile.compiler.errors import CompileError
        known.append(CompileError)
    except ImportError:
        pass
    try:
        from flowtile.rtl.simulate import RtlError
        known.append(RtlError)
    except ImportError:
        pass
    try:
        from flowtile.emulator import EmulatorError
        known.append(EmulatorError)
    except ImportError:
        pass
    return tuple(known)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"[flowtile] warning: {message}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    os.environ.setdefault("AMARANTH_USE_YOSYS", "builtin")
    warnings.showwarning = _show_warning
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _known_errors() as error:
        if os.environ.get("FLOWTILE_DEBUG"):
            raise
        print(f"flowtile: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("flowtile: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
