"""flowtile's bit- and cycle-exact emulator (docs/architecture.md sections 2-6), without a cycle loop.

    result = emulate(program, in_flits, batch)
    result.out_flits, result.out_times, result.cycles, result.report()

:mod:`.functional` computes the data of every flit from the tiles' registers, SRAM images and
parameter tables; :mod:`.timing` computes the cycle of every transfer by solving the max-plus
recurrences of section 6.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from flowtile.program import Program

from .functional import (DataPath, EmulatorError, FunctionalResult, run_functional, trace_data_path)
from .timing import TimingError, TimingResult, solve_timing

__all__ = ["emulate", "EmulatorResult", "EmulatorError", "TimingError", "PHASE_SPAN_DTYPE",
           "run_functional", "solve_timing", "trace_data_path"]

#: One span of a PE's phase FSM: cycles ``[start, end)`` spent in ``phase`` (RECV, COMPUTE, PASS, EMIT).
PHASE_SPAN_DTYPE = np.dtype([("start", np.int64), ("end", np.int64), ("phase", "U7")])


@dataclass
class EmulatorResult:
    """What one emulated run produces (cycle numbers count from the first cycle with ``run = 1``).

    ``out_flits``: int8 ``[batch * output_words, L]`` as the host receives them; ``out_times`` /
    ``in_times``: int64 host-output / host-input transfer cycle per flit; ``cycles``: last output
    transfer + 1; ``latency_cycles``: last output flit of inference 0 + 1; ``interval_cycles``: mean
    distance between the last output flits of consecutive inferences (``cycles`` if batch is 1);
    ``mac_utilization``: network MACs / (cycles x tiles x lanes); ``tile_busy_cycles`` /
    ``tile_macs``: int64 ``[rows, cols]``, COMPUTE cycles (``I + 2`` per inference) and lane-MACs
    issued (``I * L`` per inference for a MAC tile, ``I = n_pix * N_o * K_w`` of section 4.1, which is
    ``N_o*K`` for a dense layer; ``I * L`` for a LANE tile, ``I = n_pix * CW * KH*KW``, every lane
    multiplying; ``I * L`` for an ADD tile, ``I = n_pix * CW * 2``, and for a CONCAT tile,
    ``I = n_pix * CW``, each issue multiplying an operand word by ``add_mult_a`` or ``add_mult_b``; 0 for
    max pooling, which multiplies nothing) per PE;
    ``tile_timelines[p]``: the phase spans of the PE at chain position ``p``, a
    :data:`PHASE_SPAN_DTYPE` array (iterates as ``(start, end, phase)``), in time order, per inference
    the FSM occupancy of each non-empty phase: a phase begins when the previous one ends (cycle 0 for
    the first) and ends after its last transfer (COMPUTE after ``I + 2`` cycles); empty for idle
    tiles.
    """

    batch: int
    out_flits: np.ndarray
    out_times: np.ndarray
    in_times: np.ndarray
    cycles: int
    latency_cycles: int
    interval_cycles: float
    mac_utilization: float
    tile_busy_cycles: np.ndarray
    tile_macs: np.ndarray
    functional: FunctionalResult
    timing: TimingResult
    path: DataPath

    @cached_property
    def tile_timelines(self) -> list[np.ndarray]:
        """Per chain position, the PE's phase spans (computed on first use)."""
        timelines = []
        for position, pe_times in enumerate(self.timing.pe_times):
            timelines.append(np.empty(0, dtype=PHASE_SPAN_DTYPE) if pe_times is None
                             else _phase_spans(pe_times, self.path.counts[position], self.batch))
        return timelines

    def report(self) -> dict:
        return {"batch": int(self.batch), "cycles": int(self.cycles), "latency_cycles": int(self.latency_cycles),
                "interval_cycles": float(self.interval_cycles), "mac_utilization": float(self.mac_utilization)}


def _phase_spans(pe_times: np.ndarray, count, batch: int) -> np.ndarray:
    """FSM phase spans of one PE from its action times (see :class:`EmulatorResult`).

    Per inference the actions are K RECV, P PASS, n_pix * N_r EMIT transfers; COMPUTE, between RECV and
    PASS, lasts ``I + 2`` cycles from the cycle after the last RECV (section 4.1's count).
    """
    times = pe_times.reshape(batch, -1)
    begin = np.empty(batch, dtype=np.int64)
    begin[0] = 0
    begin[1:] = times[:-1, -1] + 1
    k_words, n_pass = count.n_in_words, count.n_pass
    phases = []  # (name, start, end) columns
    if k_words:
        end = times[:, k_words - 1] + 1
        phases.append(("RECV", begin, end))
        begin = end
    if count.n_out:
        end = begin + count.compute_cycles
        phases.append(("COMPUTE", begin, end))
        begin = end
    if n_pass:
        end = times[:, k_words + n_pass - 1] + 1
        phases.append(("PASS", begin, end))
        begin = end
    if count.n_out:
        phases.append(("EMIT", begin, times[:, -1] + 1))
    spans = np.empty((batch, len(phases)), dtype=PHASE_SPAN_DTYPE)
    for column, (name, start, end) in enumerate(phases):
        spans["start"][:, column] = start
        spans["end"][:, column] = end
        spans["phase"][:, column] = name
    return spans.ravel()


def emulate(program: Program, in_flits: np.ndarray, batch: int) -> EmulatorResult:
    """Run ``batch`` inferences of ``program`` on host input flits int8 ``[batch * input_words, lanes]``."""
    arch = program.arch
    program.validate()
    path: DataPath = trace_data_path(program)
    functional = run_functional(program, in_flits, batch, path)
    timing = solve_timing(program, batch, path)

    words = program.output_words
    out_times = timing.out_times
    cycles = int(out_times[-1]) + 1
    last_flits = out_times[words - 1::words]
    interval = float(cycles) if batch == 1 else float(last_flits[-1] - last_flits[0]) / (batch - 1)
    busy = np.zeros((arch.rows, arch.cols), dtype=np.int64)
    macs = np.zeros((arch.rows, arch.cols), dtype=np.int64)
    for position, tile in enumerate(program.tiles):
        count = path.counts[position]
        busy[tile.row, tile.col] = count.compute_cycles * batch
        macs[tile.row, tile.col] = count.mac_issue_cycles * arch.lanes * batch
    return EmulatorResult(
        batch=batch, out_flits=functional.out_flits, out_times=out_times, in_times=timing.in_times,
        cycles=cycles, latency_cycles=int(last_flits[0]) + 1, interval_cycles=interval,
        mac_utilization=program.macs_per_inference * batch / (cycles * arch.n_tiles * arch.lanes),
        tile_busy_cycles=busy, tile_macs=macs, functional=functional, timing=timing, path=path)
