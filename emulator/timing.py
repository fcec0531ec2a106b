"""Exact transfer times of every flit on every stream (docs/architecture.md section 6), without
stepping cycles.

Model. A run is a line of *transfer streams* separated by router input FIFOs of depth ``D``::

    host input -> FIFO -> PE -> FIFO -> link -> FIFO -> PE -> ... -> PE -> FIFO [-> link -> FIFO] -> host output

Each stream is a sequence of actions ``j`` with times ``t_j = max(lb_j, t_{j-1} + d_j)`` and
``t_{-1} = -1``:

* host input: one write per flit, ``d = 1`` (rule 5: ``T[i] >= max(0, T[i-1] + 1)``);
* PE: per inference K RECV, P PASS, N_r EMIT actions, ``d = 1`` except the first EMIT, whose
  ``d = N_o*K + 3`` (rule 4). RECV and PASS read the FIFO before it; forwarded RECV, PASS and EMIT
  write the FIFO after it (the same cycle for a forwarded RECV or a PASS);
* link (a router hop): one action per flit that reads the FIFO before it and writes the FIFO after it
  in the same cycle (rule 3), ``d = 1`` (rule 2);
* host output: one read per flit, ``d = 1``; the host is always ready.

The lower bounds come from rule 1 on the FIFO between two neighbouring streams, whose writes ``w``
belong to the upstream stream and reads ``r`` to the downstream one: a read of flit ``i`` has
``lb >= w_i + 1``, a write of flit ``i`` has ``lb >= r_{i-D} + 1``.

Given its lower bounds a stream is solved in closed form (max-plus prefix scan)::

    C = cumsum(d);   t = C + maximum.accumulate(max(lb - C, -1))

The coupled system is solved by Gauss-Seidel sweeps, alternately downstream and upstream, starting
from "no constraint yet" and re-solving a stream only when a neighbour changed. Times only increase
and the iteration stops at the least solution, which is the hardware's behaviour (every transfer
happens in the first cycle its rules allow).

Large batches. Sweeps need about one round per inference when a PE's progress depends on its
downstream neighbour's (back-pressure) while that neighbour waits for its data. So the system is
solved for a short probe batch first (a prefix of inferences is a closed subsystem: nothing in
inference ``b`` depends on a later one), the per-inference times are extrapolated once they repeat
with a fixed period, and the candidate is checked with one Jacobi pass: every event's defining
equation holds with equality. All dependencies have weight >= 1, so the equations form an acyclic
system whose solution is unique; a candidate that satisfies all of them is therefore exact. If it does
not, a longer probe (and in the end the whole batch) is solved by sweeps.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flowtile.program import Program

from .functional import EMIT_EXTRA_DELAY, HOST, DataPath, EmulatorError, TileCounts, trace_data_path

__all__ = ["TimingError", "StreamTemplate", "TimingResult", "solve_timing", "stream_templates",
           "PROBE_BATCH", "NEVER"]

#: "No constraint yet": below any cycle, far enough from the int64 limits that ``+ 1`` and ``- C``
#: cannot overflow.
NEVER = np.int64(-(1 << 62))
#: Inferences solved by sweeps before extrapolating a periodic steady state.
PROBE_BATCH = 16
#: Longest probe, relative to the previous one, when an extrapolation fails its check.
PROBE_GROWTH = 4
#: Sweep rounds allowed per inference (+ per stream): the slowest legitimate convergence seen is about
#: one round per inference; a program that needs more is reported rather than looped on forever.
ROUNDS_PER_INFERENCE = 8
ROUNDS_MINIMUM = 64


class TimingError(EmulatorError):
    """The timing recurrences did not converge (a deadlock, or a bug in the model)."""


@dataclass(frozen=True)
class StreamTemplate:
    """One transfer stream, per inference.

    ``delays[j]`` is ``d_j`` of action ``j``; ``read_slots``/``write_slots`` are the actions that read
    the FIFO upstream of the stream / write the FIFO downstream of it, in flit order (None: every
    action, in order). The first stream has no upstream FIFO and the last no downstream FIFO.
    """

    name: str
    position: int             # chain position of the PE, or HOST for host and link streams
    delays: np.ndarray
    read_slots: np.ndarray | None = None
    write_slots: np.ndarray | None = None

    @property
    def per_inference(self) -> int:
        return len(self.delays)


def _pe_template(position: int, count: TileCounts, name: str) -> StreamTemplate:
    actions = count.flits_in + count.n_result_words
    delays = np.ones(actions, dtype=np.int64)
    if count.n_result_words:
        delays[count.flits_in] = count.compute_issue_cycles + EMIT_EXTRA_DELAY
    reads = None if count.flits_in == actions else np.arange(count.flits_in)
    first_write = 0 if count.forward else count.n_in_words
    writes = None if first_write == 0 else np.arange(first_write, actions)
    return StreamTemplate(name, position, delays, reads, writes)


def stream_templates(program: Program, path: DataPath) -> list[StreamTemplate]:
    """The line of transfer streams of a program, host input first, host output last."""
    templates = [StreamTemplate("host input", HOST, np.ones(program.input_words, dtype=np.int64))]
    flits = program.input_words
    for hop in path.hops:
        if hop.producer != HOST:
            count = path.counts[hop.producer]
            tile = program.tiles[hop.producer]
            templates.append(_pe_template(hop.producer, count, f"PE {tile.key}"))
            flits = count.flits_out
            for (row, col, port), _ in zip(hop.fifos[:-1], hop.fifos[1:]):
                templates.append(StreamTemplate(f"router r{row}c{col} {port} FIFO -> next hop", HOST,
                                                np.ones(flits, dtype=np.int64)))
    templates.append(StreamTemplate("host output", HOST, np.ones(flits, dtype=np.int64)))
    return templates


def _tile_slots(slots: np.ndarray | None, per_inference: int, batch: int) -> np.ndarray | None:
    if slots is None:
        return None
    return (slots[None, :] + per_inference * np.arange(batch, dtype=np.int64)[:, None]).ravel()


class _StreamSystem:
    """The coupled streams of one batch size, with their current times."""

    def __init__(self, templates: list[StreamTemplate], depth: int, batch: int):
        self.templates, self.depth, self.batch = templates, depth, batch
        self.cumulative = [np.cumsum(np.tile(t.delays, batch)) for t in templates]
        self.reads = [_tile_slots(t.read_slots, t.per_inference, batch) for t in templates]
        self.writes = [_tile_slots(t.write_slots, t.per_inference, batch) for t in templates]
        self.times = [np.full(batch * t.per_inference, NEVER) for t in templates]

    def warm_start(self, prefix: list[np.ndarray]) -> None:
        """Start from exact times of the first inferences (a lower bound of the solution)."""
        for times, known in zip(self.times, prefix):
            times[: len(known)] = known

    def fifo_writes(self, j: int) -> np.ndarray:
        """Write times into the FIFO downstream of stream ``j``."""
        return self.times[j] if self.writes[j] is None else self.times[j][self.writes[j]]

    def fifo_reads(self, j: int) -> np.ndarray:
        """Read times of the FIFO upstream of stream ``j``."""
        return self.times[j] if self.reads[j] is None else self.times[j][self.reads[j]]

    def solve_stream(self, j: int) -> np.ndarray:
        """Times of stream ``j`` given its neighbours': ``t_k = max(lb_k, t_{k-1} + d_k)``, ``t_{-1} = -1``."""
        cumulative, depth = self.cumulative[j], self.depth
        if j > 0:  # rule 1: a flit is readable the cycle after its write
            ready = self.fifo_writes(j - 1) + 1
            if self.reads[j] is None:
                lower = ready
            else:
                lower = np.full(len(cumulative), NEVER)
                lower[self.reads[j]] = ready
        else:
            lower = np.full(len(cumulative), NEVER)
        if j < len(self.times) - 1:  # rule 1: flit i needs the slot that flit i-D frees by being read
            space = self.fifo_reads(j + 1)[:-depth] + 1
            if space.size:
                if self.writes[j] is None:
                    np.maximum(lower[depth:], space, out=lower[depth:])
                else:
                    slots = self.writes[j][depth:]
                    lower[slots] = np.maximum(lower[slots], space)
        return cumulative + np.maximum.accumulate(np.maximum(lower - cumulative, -1))

    def sweep_until_stable(self) -> int:
        """Gauss-Seidel rounds (a downstream sweep then an upstream one) until no time changes."""
        n = len(self.times)
        max_rounds = max(ROUNDS_MINIMUM, ROUNDS_PER_INFERENCE * (self.batch + n))
        dirty = [True] * n
        for rounds in range(max_rounds):
            if not any(dirty):
                return rounds
            for order in (range(n), range(n - 1, -1, -1)):
                for j in order:
                    if not dirty[j]:
                        continue
                    dirty[j] = False
                    new = self.solve_stream(j)
                    if not np.array_equal(new, self.times[j]):
                        self.times[j] = new
                        if j > 0:
                            dirty[j - 1] = True
                        if j < n - 1:
                            dirty[j + 1] = True
        if any(dirty):
            stuck = [self.templates[j].name for j in range(n) if dirty[j]]
            raise TimingError(f"timing did not converge after {max_rounds} sweep rounds (batch {self.batch}); "
                              f"still changing: {', '.join(stuck[:4])}")
        return max_rounds

    def is_exact(self) -> bool:
        """Whether the current times satisfy every stream's recurrence with equality (Jacobi check)."""
        return all(np.array_equal(self.solve_stream(j), self.times[j]) for j in range(len(self.times)))


def _extrapolate(prefix: list[np.ndarray], templates: list[StreamTemplate], probe: int,
                 batch: int) -> list[np.ndarray] | None:
    """Continue the probe's per-inference times periodically, or None if they do not yet repeat.

    Looks for the smallest period ``c`` such that ``T[b + c] - T[b]`` is one and the same vector for
    the last ``c + 1`` or more inferences ``b`` of the probe, then sets ``T[b] = T[b - c] + that``.
    """
    widths = [t.per_inference for t in templates]
    per_inference = np.concatenate([times.reshape(probe, width) for times, width in zip(prefix, widths)], axis=1)
    for period in range(1, probe // 2):
        step = per_inference[period:] - per_inference[:-period]
        differs = np.flatnonzero(np.any(step != step[-1], axis=1))
        repeats = len(step) - (differs[-1] + 1 if differs.size else 0)
        if repeats < period + 1:
            continue
        later = np.arange(probe, batch)
        base = probe - period + (later - probe) % period
        periods = ((later - probe) // period + 1)[:, None]
        full = np.concatenate([per_inference, per_inference[base] + periods * step[-1]], axis=0)
        bounds = np.cumsum([0] + widths)
        return [np.ascontiguousarray(full[:, lo:hi]).ravel() for lo, hi in zip(bounds[:-1], bounds[1:])]
    return None


@dataclass
class TimingResult:
    """Transfer cycle of every action of every stream.

    ``in_times``: host-input transfer per input flit; ``out_times``: host-output transfer per output
    flit; ``pe_times[p]``: the action times of the PE at chain position ``p`` (None if idle), per
    inference K RECV, P PASS then N_r EMIT actions; ``rounds``: sweep rounds used (diagnostics).
    """

    in_times: np.ndarray
    out_times: np.ndarray
    pe_times: list[np.ndarray | None]
    stream_names: list[str]
    stream_times: list[np.ndarray]
    rounds: int
    extrapolated: bool


def solve_timing(program: Program, batch: int, path: DataPath | None = None, *,
                 probe_batch: int | None = PROBE_BATCH) -> TimingResult:
    """Solve section 6's recurrences for ``batch`` inferences (``probe_batch=None``: sweeps only)."""
    path = path or trace_data_path(program)
    templates = stream_templates(program, path)
    depth = program.arch.router_fifo_depth
    full = _StreamSystem(templates, depth, batch)
    rounds, extrapolated = 0, False
    if probe_batch is not None and batch > 2 * probe_batch:
        probe, prefix = probe_batch, None
        while probe * 2 < batch:
            system = _StreamSystem(templates, depth, probe)
            if prefix is not None:
                system.warm_start(prefix)
            rounds += system.sweep_until_stable()
            prefix = system.times
            candidate = _extrapolate(prefix, templates, probe, batch)
            if candidate is not None:
                full.times = candidate
                if full.is_exact():
                    extrapolated = True
                    break
                full.times = [np.full(batch * t.per_inference, NEVER) for t in templates]
            probe *= PROBE_GROWTH
        if not extrapolated:
            full.warm_start(prefix)
    if not extrapolated:
        rounds += full.sweep_until_stable()
    pe_times: list[np.ndarray | None] = [None] * program.arch.n_tiles
    for template, times in zip(templates, full.times):
        if template.position != HOST:
            pe_times[template.position] = times
    return TimingResult(in_times=full.times[0], out_times=full.times[-1], pe_times=pe_times,
                        stream_names=[t.name for t in templates], stream_times=full.times,
                        rounds=rounds, extrapolated=extrapolated)
