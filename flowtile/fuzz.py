"""``flowtile fuzz``: seeded random networks on seeded random architectures, compiler -> emulator -> Verilator ->
onnxruntime, run on Dask.

A campaign ``(seed, programs, archs)`` is a list of cases. Case ``i`` has the seed
``case_seed = seed * CASE_SEED_STRIDE + i``, which alone determines its network (an MLP, a CNN or a residual CNN
from :mod:`flowtile.testing.random_models`, quantized by onnxruntime's quantizer: int8 or uint8 activations,
per-tensor or per-channel weights), its inputs and which of the campaign's ``archs`` architectures it runs on.
The architectures form a small pool drawn from ``seed`` (:func:`arch_pool`; every third one is a line of chips
joined by links), so each Verilator build is made once and shared by every case (and worker) that uses it, through the RTL build cache and its file locks.

Each case ends in one status:

* ``ok``: RTL == emulator (every output flit, its cycle stamp, the cycle count) and emulator within 1 LSB of
  onnxruntime on every output element;
* ``mismatch-bits``: an RTL output flit differs from the emulator's (or their counts differ);
* ``mismatch-cycles``: same flits, but a cycle stamp or the cycle count differs;
* ``ort-lsb``: RTL == emulator, but the emulator is more than 1 LSB away from onnxruntime;
* ``does-not-fit``: the compiler refused the model for the arch (CompileError) or the batch does not fit the
  harness buffers: not a disagreement;
* ``error``: anything else raised (emulator, RTL timeout, crash): a disagreement.

Results are appended to ``DIR/results.jsonl`` one JSON object a case as cases finish, so an interrupted campaign
resumes: cases whose seed is already in the file are not run again. For each disagreeing case the program
directory, its inputs and its int8 model go to ``DIR/case_<seed>/`` and ``DIR/test_repro_<seed>.py`` replays it
with pytest. Before that the worker shrinks the case (:func:`shrink_case`): one inference instead of the batch,
then fewer and narrower layers and a smaller input, as long as the case still ends in the same status; the saved
reproducer is the smallest such network (its record's ``shrunk`` field says which).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flowtile.arch import Arch

__all__ = ["STATUSES", "AGREEING", "CASE_SEED_STRIDE", "arch_pool", "case_seeds", "run_case", "run_campaign",
           "CampaignSummary", "FAULTS", "shrink_case", "SHRINK_ATTEMPTS"]

STATUSES = ("ok", "mismatch-bits", "mismatch-cycles", "ort-lsb", "does-not-fit", "error")
#: Statuses that are not a disagreement.
AGREEING = ("ok", "does-not-fit")
MISMATCHES = ("mismatch-bits", "mismatch-cycles", "ort-lsb")
#: Case ``i`` of a campaign with seed ``s`` has the seed ``s * CASE_SEED_STRIDE + i``.
CASE_SEED_STRIDE = 1_000_000
#: The emulator may differ from onnxruntime by this many LSB (the project's contract).
ORT_LSB = 1
#: Fault injection for testing the fuzzer itself: "flip-emulator-bit" flips bit 0 of the emulator's first
#: output flit in the worker before the RTL comparison.
FAULTS = ("flip-emulator-bit",)
RESULTS_FILE = "results.jsonl"


# --- what a case is ------------------------------------------------------------------------------

#: Every this-many-th architecture of a pool (the third, sixth, ...) is a line of 2 or 3 chips joined by links.
MULTICHIP_EVERY = 3


def arch_pool(seed: int, count: int) -> list[Arch]:
    """``count`` seeded random architectures: lanes 4/8/16 (each of them in every pool of 3 or more, in a seeded
    order), grids of 1-3 rows by 2-4 columns (mostly not square), router FIFOs of 1-4 flits, result rings and
    parameter tables down to a few words, small SRAMs (the forward queues, in SRAM, are capped per case:
    :data:`QUEUE_CAPS`). Every :data:`MULTICHIP_EVERY`-th is 2 or 3 such chips in a line
    with random links (wire width 1 bit to a whole flit, latency 1-64, frames of 1-16 flits, credit and go-back-N
    windows of 1-8 frames; fault free), which the compiler may fill with copies of the network; its link fields
    come from a generator of their own, so the single-chip architectures are those of pools without them. Every
    other architecture lets a tile hold 2 to 4 layers (``tile_contexts``, docs/architecture.md section 4.6; a
    generator of its own too), so that the compiler packs small layers into contexts."""
    rng = np.random.default_rng([seed, 0xA5C4])
    link_rng = np.random.default_rng([seed, 0x11C4])
    context_rng = np.random.default_rng([seed, 0xC0C7])
    pool = []
    lane_choices = [int(lanes) for lanes in rng.permutation([4, 8, 16])]
    for index in range(count):
        lanes = lane_choices[index % len(lane_choices)]
        arch = Arch(rows=int(rng.integers(1, 4)), cols=int(rng.integers(2, 5)), lanes=lanes,
                    sram_bytes=lanes * int(rng.choice([256, 512, 1024, 2048, 4096])),
                    max_tile_outputs=int(rng.choice([4, 8, 16, 32, 64, 512])),
                    router_fifo_depth=int(rng.integers(1, 5)),
                    result_ring_words=int(rng.choice([1, 2, 4, 8, 32, 1024])),
                    host_buffer_flits=4096, tile_contexts=1)   # one context unless chosen below
        if index % MULTICHIP_EVERY == MULTICHIP_EVERY - 1:
            arch = arch.replace(chips=int(link_rng.integers(2, 4)),
                                link_bits_per_cycle=int(link_rng.integers(1, arch.flit_data_bits + 1)),
                                link_latency_cycles=int(link_rng.choice([1, 3, 16, 64])),
                                link_frame_flits=int(link_rng.choice([1, 2, 4, 16])),
                                link_credit_frames=int(link_rng.integers(1, 9)),
                                link_replay_frames=int(link_rng.integers(1, 9)))
        if index % 2:
            arch = arch.replace(tile_contexts=int(context_rng.integers(2, 5)))
        pool.append(arch)
    return pool


#: The deepest forward queue a case's tiles keep, by the case's arch index (cycling): the compiler gives every tile
#: all the SRAM its weights and banks leave free, so without a cap the fuzzer would hardly ever fill a queue.
QUEUE_CAPS = (1, 2, 4, 8, 32, None)


def queue_cap(arch_index: int) -> int | None:
    """The forward-queue cap of the cases on the pool's ``arch_index``-th architecture (None: no cap)."""
    return QUEUE_CAPS[arch_index % len(QUEUE_CAPS)]


def cap_queues(program, cap: int | None):
    """``program`` with every tile's forward queue shortened to at most ``cap`` words (in place; None: unchanged).
    Still a valid program: a shorter queue only makes the tile wait (section 4); a tile of several contexts keeps
    its whole queues (section 4.6)."""
    if cap is not None:
        for tile in program.tiles:
            # a tile of several contexts keeps whole queues (section 4.6: a short one could deadlock its loop-back)
            if tile.config.queue_words > cap and not tile.later_contexts:
                tile.config = tile.config.with_queue(program.arch, cap)
        program.validate()
    return program


def case_seeds(seed: int, programs: int) -> list[int]:
    return [seed * CASE_SEED_STRIDE + i for i in range(programs)]


def arch_name(arch: Arch) -> str:
    chips = "" if arch.chips == 1 else (
        f"{arch.chips}x-b{arch.link_bits}-d{arch.link_latency_cycles}-F{arch.link_frame_flits}"
        f"-c{arch.link_credit_frames}-r{arch.link_replay_frames}-")
    return (f"{chips}{arch.rows}x{arch.cols}-l{arch.lanes}-s{arch.sram_bytes}-o{arch.max_tile_outputs}"
            f"-f{arch.router_fifo_depth}-r{arch.result_ring_words}"
            + (f"-x{arch.tile_contexts}" if arch.tile_contexts > 1 else ""))


def _draw_network(rng: np.random.Generator, lanes: int):
    """(kind, description, float model, input shape): a small random MLP, CNN or residual CNN. A Concat's first
    input has a multiple of ``lanes`` channels (the compiler's rule for Concat)."""
    from flowtile.testing.random_models import random_float_cnn, random_float_mlp, random_float_resnet
    kind = str(rng.choice(["mlp", "cnn", "resnet"]))
    if kind == "mlp":
        widths = [int(rng.integers(1, 65)) for _ in range(int(rng.integers(2, 5)))]
        return kind, {"widths": widths}, random_float_mlp(rng, widths), (widths[0],)
    channels, height, width = int(rng.integers(1, 4)), int(rng.integers(3, 9)), int(rng.integers(3, 9))
    in_shape = (channels, height, width)
    classes = int(rng.integers(2, 11))
    if kind == "cnn":
        blocks = []
        h, w = height, width
        for _ in range(int(rng.integers(1, 3))):
            k = int(rng.choice([1, 3])) if min(h, w) >= 3 else 1
            pad = int(rng.integers(0, k // 2 + 1))
            stride = int(rng.choice([1, 2])) if min(h, w) >= 4 else 1
            h, w = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
            # whole output words a third of the time: with the input's 1-3 channels, the stem then runs as op BCAST
            # on the dense input (docs/architecture.md section 4.5)
            out = lanes * int(rng.integers(1, 3)) if rng.random() < 1 / 3 else int(rng.integers(2, 9))
            block = {"out": out, "k": k, "stride": stride, "pad": pad, "pool": None}
            if min(h, w) >= 2 and rng.random() < 0.5:
                block["pool"] = (2, 2)
                h, w = (h - 2) // 2 + 1, (w - 2) // 2 + 1
            blocks.append(block)
        return kind, {"in_shape": in_shape, "blocks": blocks, "classes": classes}, \
            random_float_cnn(rng, in_shape, blocks, classes), in_shape
    block_kind = str(rng.choice(["basic", "inverted", "fire", "dense"]))
    if block_kind == "basic":
        block = {"kind": "basic", "out": int(rng.integers(2, 9)), "stride": int(rng.choice([1, 2]))}
    elif block_kind == "inverted":
        block = {"kind": "inverted", "expand": int(rng.integers(2, 13))}
    elif block_kind == "fire":
        block = {"kind": "fire", "squeeze": int(rng.integers(2, 5)), "expand": lanes * int(rng.integers(1, 3))}
    else:
        block = {"kind": "dense", "growth": int(rng.integers(2, 7)), "identity_first": bool(rng.random() < 0.5)}
        if not block["identity_first"]:
            block["growth"] = lanes
    stem = lanes * int(rng.integers(1, 3)) if (block_kind == "dense" and block["identity_first"]) \
        or rng.random() < 1 / 3 else int(rng.integers(2, 9))
    return kind, {"in_shape": in_shape, "stem": stem, "blocks": [block], "classes": classes}, \
        random_float_resnet(rng, in_shape, stem, [block], classes), in_shape


def _build_network(rng: np.random.Generator, kind: str, description: dict):
    """(float model, input shape) of a network ``description`` as :func:`_draw_network` draws them, weights from
    ``rng``; raises (ValueError, KeyError, ...) for a description that makes no valid network."""
    from flowtile.testing.random_models import random_float_cnn, random_float_mlp, random_float_resnet
    if kind == "mlp":
        widths = description["widths"]
        if len(widths) < 2 or min(widths) < 1:
            raise ValueError(f"an MLP needs >= 2 widths >= 1, got {widths}")
        return random_float_mlp(rng, widths), (widths[0],)
    in_shape = tuple(description["in_shape"])
    if kind == "cnn":
        return random_float_cnn(rng, in_shape, description["blocks"], description["classes"]), in_shape
    return random_float_resnet(rng, in_shape, description["stem"], description["blocks"], description["classes"]), \
        in_shape


def _smaller_descriptions(kind: str, description: dict):
    """Candidate reductions of a network description, most drastic first: fewer layers or blocks, then narrower
    ones, then a smaller input and fewer classes. Some candidates make invalid networks (a map too small for a
    kernel, a Concat off the lane grid); the shrinker drops those (they do not reproduce)."""
    import copy

    def variant(change):
        candidate = copy.deepcopy(description)
        change(candidate)
        return candidate

    if kind == "mlp":
        widths = description["widths"]
        for i in range(1, len(widths) - 1):
            yield variant(lambda d, i=i: d["widths"].pop(i))
        for i, width in enumerate(widths):
            if width > 1:
                yield variant(lambda d, i=i: d["widths"].__setitem__(i, max(1, d["widths"][i] // 2)))
        return
    blocks = description["blocks"]
    if kind == "cnn":
        for i in range(len(blocks)):
            if len(blocks) > 1:
                yield variant(lambda d, i=i: d["blocks"].pop(i))
        for i, block in enumerate(blocks):
            if block.get("pool"):
                yield variant(lambda d, i=i: d["blocks"][i].__setitem__("pool", None))
            if block["out"] > 1:
                yield variant(lambda d, i=i: d["blocks"][i].__setitem__("out", max(1, d["blocks"][i]["out"] // 2)))
            if block["k"] > 1:
                yield variant(lambda d, i=i: d["blocks"][i].update(k=1, pad=0))
            if block["stride"] > 1:
                yield variant(lambda d, i=i: d["blocks"][i].__setitem__("stride", 1))
    else:
        if description["stem"] > 1:
            yield variant(lambda d: d.__setitem__("stem", max(1, d["stem"] // 2)))
        for i, block in enumerate(blocks):
            for key in ("out", "expand", "squeeze", "growth"):
                if block.get(key, 0) > 1:
                    yield variant(lambda d, i=i, key=key: d["blocks"][i].__setitem__(key, max(1, d["blocks"][i][key] // 2)))
            if block.get("stride", 1) > 1:
                yield variant(lambda d, i=i: d["blocks"][i].__setitem__("stride", 1))
    channels, height, width = description["in_shape"]
    for axis, size in enumerate((channels, height, width)):
        if size > 1:
            yield variant(lambda d, axis=axis: d.__setitem__(
                "in_shape", [max(1, v // 2) if a == axis else v for a, v in enumerate(d["in_shape"])]))
    if description["classes"] > 2:
        yield variant(lambda d: d.__setitem__("classes", max(2, d["classes"] // 2)))


# --- one case (runs on a Dask worker) ------------------------------------------------------------

def _program_files(program, x: np.ndarray, model_bytes: bytes) -> dict[str, bytes]:
    """The files of a disagreeing case, relative to its case directory: the program, the inputs, the model."""
    files = {}
    with tempfile.TemporaryDirectory(prefix="flowtile-fuzz-save-") as scratch:
        program_dir = program.save(Path(scratch) / "program")
        for path in program_dir.iterdir():
            files[f"program/{path.name}"] = path.read_bytes()
        np.save(Path(scratch) / "x.npy", x)
        files["x.npy"] = (Path(scratch) / "x.npy").read_bytes()
    files["model.onnx"] = model_bytes
    return files


def run_case(case_seed: int, arch: Arch, arch_index: int, fault: str | None = None,
             build_root: str | None = None, shrink_attempts: int | None = None) -> dict:
    """Run one case end to end and return its record (plus ``files`` to save when it disagrees). A disagreeing
    case is shrunk (:func:`shrink_case`, at most ``shrink_attempts`` candidates, default :data:`SHRINK_ATTEMPTS`;
    0: not shrunk); the files saved are then the smallest
    network and batch that still disagree the same way, and ``record["shrunk"]`` describes them."""
    started = time.perf_counter()
    rng = np.random.default_rng(case_seed)
    activation_uint8, per_channel = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
    batch = int(rng.integers(1, 5))
    record = _new_record(case_seed, arch, arch_index, activation_uint8, per_channel, batch)
    try:
        kind, description, float_model, in_shape = _draw_network(rng, arch.lanes)
    except Exception as error:  # noqa: BLE001 -- any failure of the flow is a finding
        record.update(status="error", message=f"{type(error).__name__}: {error}"[:2000],
                      traceback=traceback.format_exc()[-4000:], wall_seconds=round(time.perf_counter() - started, 3))
        return record
    record.update(kind=kind, network=description)
    _evaluate(record, arch, float_model, in_shape, rng, fault, build_root)
    attempts = SHRINK_ATTEMPTS if shrink_attempts is None else shrink_attempts
    if attempts and record["status"] not in AGREEING and "files" in record:
        shrink_case(record, arch, fault, build_root, attempts=attempts)
    record["wall_seconds"] = round(time.perf_counter() - started, 3)
    return record


#: The share of cases whose one-copy program is recompiled with a random replicated stage (two copies of some
#: layers, the others shared in two turns: docs/architecture.md section 12), where that fits.
STAGE_SHARE = 1 / 3


def _maybe_stage(record: dict, arch: Arch, model_path, program):
    """``program``, or for :data:`STAGE_SHARE` of the one-copy programs (drawn from the case's seed alone, so that
    the other draws of a case do not move) the same network with a random stage of its layers copied twice (the
    first stage drawn that compiles; ``record["stage"]`` names it)."""
    from flowtile.compiler import CompileError, compile_model
    rng = np.random.default_rng([record["seed"], 13])
    if program.replicas != 1 or rng.random() >= STAGE_SHARE:
        return program
    names = [layer.name for layer in program.layers]
    for _ in range(4):
        first = int(rng.integers(len(names)))
        last = int(rng.integers(first, len(names)))
        if (first, last) == (0, len(names) - 1):
            continue
        try:
            staged = compile_model(model_path, arch, replicas=2, stage=(names[first], names[last]))
        except CompileError:
            continue
        record["stage"] = [names[first], names[last]]
        return staged
    return program


def _new_record(case_seed, arch, arch_index, activation_uint8, per_channel, batch) -> dict:
    quant = f"{'uint8' if activation_uint8 else 'int8'}-{'per-channel' if per_channel else 'per-tensor'}"
    return {"seed": case_seed, "arch_index": arch_index, "arch_name": arch_name(arch), "arch": arch.to_dict(),
            "queue_cap": queue_cap(arch_index),
            "kind": None, "quant": quant, "batch": batch, "status": "error", "cycles": None,
            "worst_lsb": None, "message": "", "wall_seconds": None, "build_seconds": None}


#: Candidate networks the shrinker tries at most, per disagreeing case (each is a compile, an emulation and an
#: RTL run on the case's cached Verilator build).
SHRINK_ATTEMPTS = 24


def shrink_case(record: dict, arch: Arch, fault: str | None = None, build_root: str | None = None, *,
                attempts: int = SHRINK_ATTEMPTS) -> None:
    """Greedy delta debugging of a disagreeing case, in place: first one inference instead of the batch, then
    smaller networks (:func:`_smaller_descriptions`), keeping each change after which the case still ends in the
    same status, until no candidate does or ``attempts`` candidates ran. Candidates get fresh weights and inputs
    (seeded by the case seed and the attempt), so the reproducer stands alone; ``record["shrunk"]`` holds the
    smallest network, its batch and the attempts made, ``record["files"]`` its files."""
    status = record["status"]
    best = {"kind": record["kind"], "network": record["network"], "batch": record["batch"]}
    best_files = record.get("files")
    budget, attempts = attempts, 0

    def reproduces(description: dict, batch: int) -> dict | None:
        nonlocal attempts
        attempts += 1
        trial = {key: value for key, value in record.items() if key != "files"}
        trial.update(batch=batch, network=description, message="")
        rng = np.random.default_rng([record["seed"], attempts])
        try:
            float_model, in_shape = _build_network(rng, record["kind"], description)
        except Exception:  # noqa: BLE001 -- not a network: does not reproduce
            return None
        _evaluate(trial, arch, float_model, in_shape, rng, fault, build_root)
        return trial if trial["status"] == status and "files" in trial else None

    def keep(trial: dict, description: dict, batch: int) -> None:
        nonlocal best_files
        best.update(network=description, batch=batch)
        best_files, record["message"] = trial["files"], trial["message"] or record["message"]

    if best["batch"] > 1:
        trial = reproduces(best["network"], 1)
        if trial is not None:
            keep(trial, best["network"], 1)
    progressed = True
    while progressed and attempts < budget:
        progressed = False
        for description in _smaller_descriptions(record["kind"], best["network"]):
            if attempts >= budget:
                break
            trial = reproduces(description, best["batch"])
            if trial is not None:
                keep(trial, description, best["batch"])
                progressed = True
                break
    record["shrunk"] = {**best, "attempts": attempts}
    if best_files is not None:
        record["files"] = best_files


def _evaluate(record: dict, arch: Arch, float_model, in_shape, rng: np.random.Generator, fault: str | None,
              build_root: str | None) -> None:
    """Quantize, compile, emulate, simulate and compare one network; fills ``record`` (status, message, cycles,
    and ``files`` when the case disagrees)."""
    from flowtile.compiler import CompileError, compile_model
    from flowtile.host import pad_batch
    from flowtile.rtl.simulate import RtlCapacityError, simulate
    from flowtile.testing.oracle_checks import compare_with_onnxruntime, emulate_model
    from flowtile.testing.random_models import quantize_qdq
    import onnx

    activation_uint8, per_channel = record["quant"].startswith("uint8"), record["quant"].endswith("per-channel")
    batch = record["batch"]
    program, x, model_bytes = None, None, b""
    try:
        calibration = rng.standard_normal((16, *in_shape)).astype(np.float32)
        x = rng.standard_normal((batch, *in_shape)).astype(np.float32)
        with tempfile.TemporaryDirectory(prefix="flowtile-fuzz-") as scratch:
            float_path = Path(scratch) / "float.onnx"
            onnx.save(float_model, float_path)
            model_path = quantize_qdq(float_path, Path(scratch) / "qdq.onnx", calibration,
                                      activation_uint8=activation_uint8, per_channel=per_channel)
            model_bytes = model_path.read_bytes()
            try:
                program = compile_model(model_path, arch)
            except CompileError as error:
                record.update(status="does-not-fit", message=str(error))
                return
            program = cap_queues(_maybe_stage(record, arch, model_path, program), record["queue_cap"])
            record["tiles_used"] = len(program.tiles)
            # copies of the network on several chips run whole program inferences: zero inputs fill the last one
            x = pad_batch(program, x)
            batch = len(x)
            emulated = emulate_model(program, x)
            emu = emulated.result
            record["cycles"] = int(emu.cycles)
            comparison = compare_with_onnxruntime(model_path, program, x, emulated=emulated)
            if comparison.emulated.q.shape != comparison.ort_q.shape:
                raise AssertionError(f"output shapes differ: flowtile {comparison.emulated.q.shape}, "
                                     f"onnxruntime {comparison.ort_q.shape}")
            record["worst_lsb"] = comparison.worst
            emu_flits, emu_times = np.array(emu.out_flits), np.asarray(emu.out_times)
            if fault == "flip-emulator-bit":
                emu_flits[0, 0] ^= 1
            elif fault is not None:
                raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")
            try:
                rtl = simulate(program, emulated.flits, batch, simulator="verilator", build_root=build_root)
            except RtlCapacityError as error:
                record.update(status="does-not-fit", message=str(error))
                return
            record["rtl_cycles"] = int(rtl.cycles)
            record["build_seconds"] = round(rtl.build_seconds, 3)
            rtl_flits, rtl_times = np.asarray(rtl.out_flits), np.asarray(rtl.out_times)
            if rtl_flits.shape != emu_flits.shape or not np.array_equal(rtl_flits, emu_flits):
                differing = (np.flatnonzero(np.any(rtl_flits != emu_flits, axis=1))
                             if rtl_flits.shape == emu_flits.shape else [])
                record.update(status="mismatch-bits", message=(
                    f"output flits: RTL {list(rtl_flits.shape)} vs emulator {list(emu_flits.shape)}"
                    if rtl_flits.shape != emu_flits.shape else
                    f"{len(differing)} output flits differ; first, flit {differing[0]}: RTL "
                    f"{rtl_flits[differing[0]].tolist()} vs emulator {emu_flits[differing[0]].tolist()}"))
            elif not np.array_equal(rtl_times, emu_times) or rtl.cycles != emu.cycles:
                late = np.flatnonzero(rtl_times != emu_times)
                record.update(status="mismatch-cycles", message=(
                    f"{late.size} output flits at different cycles"
                    + (f"; first, flit {late[0]}: RTL {rtl_times[late[0]]} vs emulator {emu_times[late[0]]}"
                       if late.size else "") + f"; cycles RTL {rtl.cycles} vs emulator {emu.cycles}"))
            elif comparison.worst > ORT_LSB:
                record.update(status="ort-lsb", message=(
                    f"emulator vs onnxruntime: {comparison.worst} LSB (> {ORT_LSB}), "
                    f"{np.count_nonzero(comparison.diff)} of {comparison.diff.size} values differ"))
            else:
                record["status"] = "ok"
            if record["status"] not in AGREEING:
                record["files"] = _program_files(program, x, model_bytes)
    except Exception as error:  # noqa: BLE001 -- any failure of the flow is a finding
        record.update(status="error", message=f"{type(error).__name__}: {error}"[:2000],
                      traceback=traceback.format_exc()[-4000:])
        if program is not None and x is not None:
            try:
                record["files"] = _program_files(program, x, model_bytes)
            except Exception:  # noqa: BLE001
                pass


# --- the campaign (client side) ------------------------------------------------------------------

_REPRO = '''"""Reproducer written by `flowtile fuzz` for case seed {seed} ({status}: {message_line}).

Arch {arch_name}; network {kind} ({quant}), batch {batch}{shrunk}. Replays the saved program on the saved inputs.
"""
from pathlib import Path

import numpy as np
import pytest

from flowtile.program import Program
from flowtile.testing.oracle_checks import assert_emulator_matches_onnxruntime, assert_rtl_matches_emulator

CASE = Path(__file__).resolve().parent / "case_{seed}"


@pytest.mark.rtl
def test_rtl_matches_emulator_{seed}():
    program = Program.load(CASE / "program")
    x = np.load(CASE / "x.npy")
    assert_rtl_matches_emulator(program, x)


def test_emulator_matches_onnxruntime_{seed}():
    program = Program.load(CASE / "program")
    x = np.load(CASE / "x.npy")
    assert_emulator_matches_onnxruntime(str(CASE / "model.onnx"), program, x, lsb={lsb})
'''


def _save_case(out_dir: Path, record: dict) -> None:
    files = record.pop("files", None)
    if not files:
        return
    from flowtile.program import check_program_destination
    seed = record["seed"]
    case_dir = out_dir / f"case_{seed}"
    program_dir = case_dir / "program"
    if program_dir.exists():
        check_program_destination(program_dir)   # replace only a program directory
    for relative, data in files.items():
        path = case_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    message_line = record["message"].splitlines()[0] if record["message"] else ""
    (out_dir / f"test_repro_{seed}.py").write_text(_REPRO.format(
        seed=seed, status=record["status"], message_line=message_line.replace('"""', "'''")[:200],
        arch_name=record["arch_name"], kind=record["kind"], quant=record["quant"],
        batch=record.get("shrunk", record)["batch"], lsb=ORT_LSB,
        shrunk=(f", shrunk in {record['shrunk']['attempts']} attempts to {json.dumps(record['shrunk']['network'])}"
                if record.get("shrunk") else "")))
    record["saved"] = str(case_dir)


def read_results(path: Path) -> dict[int, dict]:
    """The records of ``results.jsonl`` by seed (a torn last line from an interrupted run is ignored)."""
    records = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "seed" in record:
                records[record["seed"]] = record
    return records


@dataclass
class CampaignSummary:
    programs: int
    new: int
    architectures: int
    counts: dict
    wall_seconds: float

    @property
    def mismatches(self) -> int:
        return sum(self.counts.get(status, 0) for status in MISMATCHES)

    @property
    def agreed(self) -> bool:
        return all(self.counts.get(status, 0) == 0 for status in STATUSES if status not in AGREEING)

    def last_line(self) -> str:
        detail = ", ".join(f"{status} {self.counts[status]}" for status in MISMATCHES if self.counts.get(status))
        def count(n, noun):
            return f"{n} {noun}{'' if n == 1 else 'es' if noun.endswith('h') else 's'}"
        return (f"fuzz: {count(self.programs, 'program')} run ({self.new} new, {self.programs - self.new} from "
                f"{RESULTS_FILE}), {count(self.architectures, 'architecture')}, "
                f"{count(self.mismatches, 'mismatch')}"
                + (f" ({detail})" if detail else "")
                + f", {self.counts.get('does-not-fit', 0)} did not fit, {count(self.counts.get('error', 0), 'error')}, "
                  f"wall time {self.wall_seconds:.1f} s")


def run_campaign(*, programs: int, seed: int = 0, archs: int = 6, out_dir: str | Path = "fuzz-out",
                 workers: int = 2, scheduler: str | None = None, fault: str | None = None,
                 shrink_attempts: int | None = None, progress: bool = True, log=None) -> CampaignSummary:
    """Run (or resume) a campaign on Dask and return its summary (over every case of the campaign, including
    those already in ``results.jsonl``)."""
    from distributed import Client, LocalCluster, as_completed
    from tqdm import tqdm

    if fault is not None and fault not in FAULTS:
        raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")
    log = log or (lambda message: print(f"[flowtile] {message}", file=sys.stderr, flush=True))
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / RESULTS_FILE
    pool = arch_pool(seed, archs)
    seeds = case_seeds(seed, programs)
    done = read_results(results_path)
    pending = [s for s in seeds if s not in done]
    if len(pending) < len(seeds):
        log(f"{len(seeds) - len(pending)} of {len(seeds)} cases already in {results_path}: skipped")
    records = {s: done[s] for s in seeds if s in done}
    if pending:
        if scheduler:
            client, cluster = Client(scheduler), None
            log(f"running {len(pending)} cases on the Dask scheduler at {scheduler}")
        else:
            # Dask's own transient trouble (a missed heartbeat on a busy machine, recovered) would print tracebacks;
            # a task that really fails is recorded as an "error" case instead
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                   dashboard_address=None, silence_logs=logging.CRITICAL)
            client = Client(cluster)
            log(f"running {len(pending)} cases on a local Dask cluster of {workers} worker processes")
        try:
            futures = []
            for case_seed in pending:
                index = int(np.random.default_rng([case_seed, 0xA2C4]).integers(len(pool)))
                futures.append(client.submit(run_case, case_seed, pool[index], index, fault,
                                             shrink_attempts=shrink_attempts, key=f"flowtile-fuzz-{case_seed}-{fault or 'clean'}", pure=False))
            if results_path.is_file() and results_path.stat().st_size:
                with open(results_path, "rb") as results:
                    results.seek(-1, os.SEEK_END)
                    torn = results.read(1) != b"\n"
                if torn:   # an interrupted write: start on a fresh line (the torn one is ignored when read)
                    with open(results_path, "a") as results:
                        results.write("\n")
            with open(results_path, "a") as results:
                for future in tqdm(as_completed(futures), total=len(futures), desc="fuzz", unit="program",
                                   file=sys.stderr, disable=not progress, dynamic_ncols=True):
                    try:
                        record = future.result()
                    except Exception as error:  # noqa: BLE001 -- a worker died, or the task could not run
                        case_seed = int(future.key.split("-")[2])
                        record = {"seed": case_seed, "status": "error", "kind": None,
                                  "message": f"task failed: {type(error).__name__}: {error}"[:2000]}
                    _save_case(out_dir, record)
                    results.write(json.dumps(record, sort_keys=True) + "\n")
                    results.flush()
                    records[record["seed"]] = record
                    if record["status"] not in AGREEING:
                        tqdm.write(f"[flowtile] case {record['seed']}: {record['status']}: "
                                   f"{record.get('message', '')[:300]}", file=sys.stderr)
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
    counts = {status: 0 for status in STATUSES}
    for record in records.values():
        counts[record["status"]] = counts.get(record["status"], 0) + 1
    architectures = len({json.dumps(r.get("arch"), sort_keys=True) for r in records.values() if r.get("arch")})
    return CampaignSummary(programs=len(records), new=len(pending), architectures=architectures, counts=counts,
                           wall_seconds=time.perf_counter() - started)
