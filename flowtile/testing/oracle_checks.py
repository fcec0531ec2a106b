"""The project's central checks, shared by the tests and the benchmarks: a compiled program emulated on float
inputs, compared with onnxruntime's run of the same int8 model (graph optimizations off) element by element, and
the RTL compared with the emulator flit for flit and cycle for cycle."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flowtile.emulator import EmulatorResult, emulate
from flowtile.host import input_flits, outputs_from_flits, pad_batch
from flowtile.oracle import onnxruntime_int8_output
from flowtile.program import Program

__all__ = ["Emulated", "OracleComparison", "emulate_batch", "emulate_model", "compare_with_onnxruntime",
           "assert_emulator_matches_onnxruntime", "assert_rtl_matches_emulator"]


def emulate_batch(program: Program, flits: np.ndarray, batch: int, **options) -> EmulatorResult:
    """The emulator's run of ``batch`` real inferences (a multiple of ``program.replicas``, else ValueError:
    :func:`flowtile.host.pad_batch`) on their host input flits: ``batch // replicas`` program inferences
    (:meth:`flowtile.program.Program.program_inferences`); the result counts program inferences, its ``out_flits``
    are the ``batch`` outputs in order."""
    view, count = program.program_inferences(batch)
    return emulate(view, flits, count, **options)


@dataclass(frozen=True)
class Emulated:
    """One emulated run of a batch: the emulator's result, the flits sent, the int8-domain outputs ``q``
    (``[batch, n]``) and the float outputs ``y`` the host makes of them. A replicated program's batch is padded to
    a multiple of its copies (:func:`flowtile.host.pad_batch`): ``result`` and ``flits`` are the padded run's,
    ``q`` and ``y`` the real inferences' only."""
    result: EmulatorResult
    flits: np.ndarray
    q: np.ndarray
    y: np.ndarray


def emulate_model(program: Program, x: np.ndarray) -> Emulated:
    """Emulate ``program`` on the float inputs ``x`` (``[batch, ...]``), as the host sends and reads them (a
    replicated program: ``batch`` a multiple of its copies, :func:`flowtile.host.pad_batch`)."""
    padded = pad_batch(program, x)
    _, flits = input_flits(program, padded)
    result = emulate_batch(program, flits, len(padded))
    q, y = outputs_from_flits(program, result.out_flits, len(padded))
    return Emulated(result, flits, q[:len(x)], y[:len(x)])


@dataclass(frozen=True)
class OracleComparison:
    """The emulation and onnxruntime's outputs (``ort_q``: int8 domain, ``ort_y``: float) for the same inputs."""
    emulated: Emulated
    ort_q: np.ndarray
    ort_y: np.ndarray

    @property
    def diff(self) -> np.ndarray:
        """|flowtile - onnxruntime| in LSB, per output element (int32)."""
        return np.abs(self.emulated.q.astype(np.int32) - self.ort_q.astype(np.int32))

    @property
    def worst(self) -> int:
        """The largest difference in LSB."""
        return int(self.diff.max())

    @property
    def inexact_fraction(self) -> float:
        """The fraction of output elements that differ at all."""
        return float(np.mean(self.diff > 0))


def compare_with_onnxruntime(int8_model, program: Program, x: np.ndarray, *, one_at_a_time: bool = False,
                             emulated: Emulated | None = None) -> OracleComparison:
    """Emulate ``program`` on ``x`` (unless ``emulated``, :func:`emulate_model`'s run of ``x``, is given) and run
    ``int8_model`` (the very int8 model that was compiled: path or ModelProto) in onnxruntime on the same inputs;
    ``one_at_a_time`` runs onnxruntime one sample at a time (a model traced with a fixed batch of 1)."""
    emulated = emulate_model(program, x) if emulated is None else emulated
    if one_at_a_time:
        runs = [onnxruntime_int8_output(int8_model, program, x[i:i + 1]) for i in range(len(x))]
        ort_q, ort_y = np.concatenate([q for q, _ in runs]), np.concatenate([y for _, y in runs])
    else:
        ort_q, ort_y = onnxruntime_int8_output(int8_model, program, x)
    return OracleComparison(emulated, ort_q, ort_y)


def assert_emulator_matches_onnxruntime(int8_model, program: Program, x: np.ndarray, lsb: int = 1, *,
                                        one_at_a_time: bool = False) -> OracleComparison:
    """The contract: the emulator's int8 outputs equal onnxruntime's within ``lsb`` on every element (shapes
    equal). Returns the comparison for further checks."""
    comparison = compare_with_onnxruntime(int8_model, program, x, one_at_a_time=one_at_a_time)
    emu_q, ort_q = comparison.emulated.q, comparison.ort_q
    assert emu_q.shape == ort_q.shape, f"output shapes differ: flowtile {emu_q.shape}, onnxruntime {ort_q.shape}"
    diff = comparison.diff
    worst = np.unravel_index(np.argmax(diff), diff.shape)
    assert diff.max() <= lsb, (f"output {worst} differs by {diff.max()} LSB (> {lsb}; {np.count_nonzero(diff)} of "
                               f"{diff.size} values differ): flowtile {emu_q[worst]}, onnxruntime {ort_q[worst]}")
    return comparison


def assert_rtl_matches_emulator(program: Program, x: np.ndarray) -> None:
    """Verilator's run of the RTL equals the emulator's: every output flit, every output flit's cycle stamp, the
    cycle count (a replicated program: on ``x`` padded to a multiple of its copies)."""
    from flowtile.rtl.simulate import simulate
    x = pad_batch(program, x)
    _, flits = input_flits(program, x)
    emu = emulate_batch(program, flits, len(x))
    rtl = simulate(program, flits, len(x), simulator="verilator")
    rtl_flits, emu_flits = np.asarray(rtl.out_flits), np.asarray(emu.out_flits)
    assert rtl_flits.shape == emu_flits.shape, f"output flits: RTL {rtl_flits.shape} vs emulator {emu_flits.shape}"
    differing = np.flatnonzero(np.any(rtl_flits != emu_flits, axis=1))
    assert differing.size == 0, (f"{differing.size} output flits differ; first, flit {differing[0]}: "
                                 f"RTL {rtl_flits[differing[0]].tolist()} vs emulator "
                                 f"{emu_flits[differing[0]].tolist()}")
    rtl_times, emu_times = np.asarray(rtl.out_times), np.asarray(emu.out_times)
    assert rtl_times.shape == emu_times.shape, f"output times: RTL {rtl_times.shape} vs emulator {emu_times.shape}"
    late = np.flatnonzero(rtl_times != emu_times)
    assert late.size == 0, (f"{late.size} output flits at different cycles; first, flit {late[0]}: "
                            f"RTL cycle {rtl_times[late[0]]} vs emulator {emu_times[late[0]]}")
    assert rtl.cycles == emu.cycles


def compile_first_fitting(int8_model, archs) -> tuple:
    """``(program, arch name)`` for the first ``(name, Arch)`` of ``archs`` the model compiles on; AssertionError
    listing every arch's one-line CompileError if none fits."""
    from flowtile.compiler import CompileError, compile_model
    errors = []
    for arch_name, arch in archs:
        try:
            return compile_model(int8_model, arch), arch_name
        except CompileError as error:
            errors.append(f"{arch_name}: {error}")
    raise AssertionError("compiles for none of the archs; " + " | ".join(errors))
