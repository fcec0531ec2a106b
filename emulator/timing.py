"""Exact transfer times of every flit on every stream (docs/architecture.md section 6), without
stepping cycles.

Model. A run is a line of *transfer streams* separated by router input FIFOs of depth ``D``::

    host input -> FIFO -> PE -> FIFO -> link -> FIFO -> PE -> ... -> PE -> FIFO [-> link -> FIFO] -> host output

Each stream is a sequence of actions ``j`` with times ``t_j = max(lb_j, t_{j-1} + d_j)`` and
``t_{-1} = -1``:

* host input: one write per flit, ``d = 1`` (rule 5: ``T[i] >= max(0, T[i-1] + 1)``);
* PE: per inference K RECV, (COMPUTE,) P PASS, ``n_pix * N_r`` EMIT actions, ``d = 1`` except the
  first transfer after COMPUTE (the first PASS, or the first EMIT if P = 0), whose ``d = I + 3``
  counted from the last RECV (rule 4; ``I`` = COMPUTE issue cycles of section 4.1, ``N_o*K`` for a
  dense layer, from ``flowtile.program.compute_issue_cycles``). RECV and PASS read the FIFO before
  it; the forwarded RECV words (``forward_begin <= k < forward_end``, section 4.2), PASS and EMIT
  write the FIFO after it (the same cycle for a forwarded RECV or a PASS); a RECV word that is not
  forwarded only reads;
* link (a router hop): one action per flit that reads the FIFO before it and writes the FIFO after it
  in the same cycle (rule 3), ``d = 1`` (rule 2);
* host output: one read per flit, ``d = 1``; the host is always ready.

The lower bounds come from rule 1 on the FIFO between two neighbouring streams, whose writes ``w``
belong to the upstream stream and reads ``r`` to the downstream one: a read of flit ``i`` has
``lb >= w_i + 1``, a write of flit ``i`` has ``lb >= r_{i-D} + 1``.

Given its lower bounds a stream is solved in closed form (max-plus prefix scan)::

    C = cumsum(d);   t = C + maximum.accumulate(max(lb - C, -1))

The coupled system is solved by Gauss-Seidel sweeps, alternately downstream (data) and upstream
(back-pressure), starting from "no constraint yet" and re-solving a stream only when a neighbour
changed, until nothing changes. Times only increase and the iteration stops at the least solution,
which is the hardware's behaviour (every transfer happens in the first cycle its rules allow).

Two exact shortcuts keep the number of sweeps small:

* with ``D = 1`` rule 1 implies that consecutive transfers on one side of a FIFO are >= 2 cycles
  apart; building that into ``d`` spares one sweep round per flit (:func:`_space_one_apart`);
* the suffix of pass-through streams before the host output (links, pure PASS tiles) never holds
  anything back and adds exactly one cycle per stream, so it is solved in closed form after the rest
  (:func:`_pass_through_tail`).

Large batches. Sweeps need about one round (downstream + upstream) per inference when a PE's
progress depends on its downstream neighbour's (back-pressure) while that neighbour waits for its
data. So a short probe batch is solved first (a prefix of inferences is a closed subsystem: nothing
in inference ``b`` depends on a later one), its per-inference times are extrapolated once they
repeat with a fixed period, and the candidate is checked with one Jacobi pass: does every stream's
recurrence hold with equality? All dependencies have weight >= 1, so the equations form an acyclic
system with a unique solution, and a candidate that satisfies all of them is exact. If it does not,
a longer probe (and in the end the whole batch) is solved by sweeps.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flowtile.program import Program

from .functional import AFTER_COMPUTE_EXTRA_DELAY, HOST, DataPath, EmulatorError, TileCounts, trace_data_path

__all__ = ["TimingError", "StreamTemplate", "TimingResult", "solve_timing", "stream_templates",
           "PROBE_BATCH", "NEVER"]

#: "No constraint yet": below any cycle, far enough from the int64 limits that ``+ 1`` and ``- C``
#: cannot overflow.
NEVER = np.int64(-(1 << 62))
#: Inferences solved by sweeps before extrapolating a periodic steady state.
PROBE_BATCH = 16
#: Factor by which the probe grows when it is not yet periodic or its extrapolation fails the check
#: (the solved prefix is kept, so only the new inferences cost sweeps).
PROBE_GROWTH = 2
#: Sweep rounds allowed per inference (+ per stream): legitimate programs need about one round per
#: inference at worst; one that needs far more (a deadlock, or a model bug) is reported rather than
#: looped on forever.
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
    pass_through: bool = False  # one read and one write per action, d = 1: a link, a pure PASS PE, the host output

    @property
    def per_inference(self) -> int:
        return len(self.delays)


def _pe_template(position: int, count: TileCounts, name: str) -> StreamTemplate:
    actions = count.flits_in + count.n_result_words
    delays = np.ones(actions, dtype=np.int64)
    if count.n_out:  # COMPUTE sits between the last RECV and the first PASS / EMIT
        delays[count.n_in_words] = count.compute_issue_cycles + AFTER_COMPUTE_EXTRA_DELAY
    reads = None if count.flits_in == actions else np.arange(count.flits_in)
    # forwarded RECV words, then every PASS and EMIT action (section 4.2)
    writes = None if count.flits_out == actions else np.concatenate(
        [np.arange(count.forward_begin, count.forward_end), np.arange(count.n_in_words, actions)])
    # no COMPUTE and every RECV word forwarded: each action reads a flit and writes it the same cycle
    pure_pass = count.n_out == 0 and count.n_forward == count.n_in_words
    return StreamTemplate(name, position, delays, reads, writes, pass_through=pure_pass)


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
        for row, col, port in hop.fifos[:-1]:  # a router hop between every two FIFOs of the route
            templates.append(StreamTemplate(f"router r{row}c{col} {port} FIFO -> next hop", HOST,
                                            np.ones(flits, dtype=np.int64), pass_through=True))
    templates.append(StreamTemplate("host output", HOST, np.ones(flits, dtype=np.int64), pass_through=True))
    return templates


def _tile_slots(slots: np.ndarray | None, per_inference: int, batch: int) -> np.ndarray | None:
    if slots is None:
        return None
    return (slots[None, :] + per_inference * np.arange(batch, dtype=np.int64)[:, None]).ravel()


def _space_one_apart(delays: np.ndarray, slots: np.ndarray | None) -> None:
    """With ``D = 1``, consecutive transfers on one FIFO side are >= 2 cycles apart.

    Rule 1 implies it (``w_i >= r_{i-1} + 1 >= w_{i-1} + 2`` and ``r_i >= w_i + 1 >= r_{i-1} + 2``),
    so adding it to back-to-back actions (``d >= 2``) leaves the solution unchanged; it lets one
    stream solve see the half rate that would otherwise take a sweep round per flit to emerge.
    """
    if slots is None:
        np.maximum(delays[1:], 2, out=delays[1:])
    else:
        follows = slots[1:][np.diff(slots) == 1]
        delays[follows] = np.maximum(delays[follows], 2)


class _StreamSystem:
    """The coupled streams of one batch size, with their current times.

    Per stream ``j``: ``cumulative[j]`` = ``C``; ``reads[j]`` / ``writes[j]``: global action indices of
    its FIFO reads / writes (None: every action); for the space rule, ``space_source[j]`` indexes the
    downstream stream's reads of flits ``0..n-D-1`` and ``space_target[j]`` its own writes of flits
    ``D..n-1`` (None: a plain slice).
    """

    def __init__(self, templates: list[StreamTemplate], depth: int, batch: int, *, open_end: bool = False,
                 times: list[np.ndarray] | None = None):
        """``open_end``: the last stream writes a FIFO whose reader never holds it back (a pass-through
        tail). ``times``: initial times (default: no constraint yet, :data:`NEVER`)."""
        self.templates, self.depth, self.batch = templates, depth, batch
        count = len(templates)
        self.reads = [_tile_slots(t.read_slots, t.per_inference, batch) for t in templates]
        self.writes = [_tile_slots(t.write_slots, t.per_inference, batch) for t in templates]
        self.cumulative = []
        inferences = np.arange(batch, dtype=np.int64)[:, None]
        for j, template in enumerate(templates):
            if depth == 1:
                delays = np.tile(template.delays, batch)
                writes_fifo = j < count - 1 or open_end
                for slots, has_fifo in ((self.reads[j], j > 0), (self.writes[j], writes_fifo)):
                    if has_fifo:
                        _space_one_apart(delays, slots)
                self.cumulative.append(np.cumsum(delays))
            else:  # every inference repeats the template's delays
                per_inference = np.cumsum(template.delays)
                self.cumulative.append((inferences * per_inference[-1] + per_inference).ravel())
        self.times = times if times is not None else [np.full(batch * t.per_inference, NEVER) for t in templates]
        self.space_source = [None if j == count - 1 or self.reads[j + 1] is None else self.reads[j + 1][:-depth]
                             for j in range(count)]
        self.space_target = [None if self.writes[j] is None else self.writes[j][depth:] for j in range(count)]

    def warm_start(self, prefix: list[np.ndarray]) -> None:
        """Start from exact times of the first inferences (a lower bound of the solution)."""
        for times, known in zip(self.times, prefix):
            times[: len(known)] = known

    def solution(self) -> list[np.ndarray]:
        return list(self.times)

    def solve_stream(self, j: int) -> np.ndarray:
        """Times of stream ``j`` given its neighbours': ``t_k = max(lb_k, t_{k-1} + d_k)``, ``t_{-1} = -1``,
        i.e. ``t = C + cummax(max(lb - C, -1))``."""
        cumulative, depth, times = self.cumulative, self.depth, self.times
        reads = self.reads[j]
        if j > 0:  # rule 1: a flit is readable the cycle after its write
            upstream, writes = times[j - 1], self.writes[j - 1]
            ready = (upstream if writes is None else upstream[writes]) + 1
            if reads is None:
                lower = ready
            else:
                lower = np.full(len(cumulative[j]), NEVER)
                lower[reads] = ready
        else:
            lower = np.full(len(cumulative[j]), NEVER)
        if j < len(times) - 1 and len(lower) > depth:  # rule 1: flit i takes the slot flit i-D freed
            downstream, source = times[j + 1], self.space_source[j]
            space = (downstream[:-depth] if source is None else downstream[source]) + 1
            target = self.space_target[j]
            if target is None:
                np.maximum(lower[depth:], space, out=lower[depth:])
            else:
                lower[target] = np.maximum(lower[target], space)
        lower -= cumulative[j]
        np.maximum(lower, -1, out=lower)
        np.maximum.accumulate(lower, out=lower)
        lower += cumulative[j]
        return lower

    def sweep_until_stable(self) -> int:
        """Gauss-Seidel sweeps, downstream then upstream, re-solving only streams whose neighbour
        changed, until no time changes; returns the number of stream solves."""
        n = len(self.times)
        max_rounds = max(ROUNDS_MINIMUM, ROUNDS_PER_INFERENCE * (self.batch + n))
        dirty = [True] * n
        solves = 0
        times = self.times
        downstream, upstream = range(n), range(n - 1, -1, -1)
        for _ in range(max_rounds):
            for order in (downstream, upstream):
                for j in order:
                    if not dirty[j]:
                        continue
                    dirty[j] = False
                    solves += 1
                    new = self.solve_stream(j)
                    if (new != times[j]).any():
                        times[j] = new
                        if j > 0:
                            dirty[j - 1] = True
                        if j < n - 1:
                            dirty[j + 1] = True
            if not any(dirty):
                return solves
        stuck = [self.templates[j].name for j in range(n) if dirty[j]]
        raise TimingError(f"timing did not converge after {max_rounds} sweep rounds (batch {self.batch}); "
                          f"still changing: {', '.join(stuck[:4])}")

    def is_exact(self) -> bool:
        """Whether the current times satisfy every stream's recurrence with equality (Jacobi check)."""
        return all(np.array_equal(self.solve_stream(j), self.times[j]) for j in range(len(self.times)))


def _extrapolate(prefix: list[np.ndarray], templates: list[StreamTemplate], probe: int,
                 batch: int) -> list[np.ndarray] | None:
    """Continue the probe's per-inference times periodically, or None if they do not yet repeat.

    Looks for the smallest period ``c`` such that ``T[b + c] - T[b]`` is one and the same vector (over
    all actions of all streams) for the last ``c + 1`` or more inferences ``b`` of the probe, then sets
    ``T[b] = T[b - c] + that vector`` for the rest of the batch.
    """
    widths = [t.per_inference for t in templates]
    per_inference = np.concatenate([times.reshape(probe, width) for times, width in zip(prefix, widths)], axis=1)
    for period in range(1, probe // 2):
        step = per_inference[period:] - per_inference[:-period]
        differs = np.flatnonzero(np.any(step != step[-1], axis=1))
        repeats = len(step) - (differs[-1] + 1 if differs.size else 0)
        if repeats >= period + 1:
            break
    else:
        return None
    later = np.arange(probe, batch)
    base = probe - period + (later - probe) % period          # the probe inference each one repeats
    periods = ((later - probe) // period + 1)[:, None]         # how many periods later it is
    extended, column = [], 0
    for times, width in zip(prefix, widths):
        full = np.empty((batch, width), dtype=np.int64)
        full[:probe] = times.reshape(probe, width)
        increment = step[-1, column:column + width]
        full[probe:] = full[base] + periods * increment
        extended.append(full.ravel())
        column += width
    return extended


@dataclass
class TimingResult:
    """Transfer cycle of every action of every stream.

    ``in_times``: host-input transfer per input flit; ``out_times``: host-output transfer per output
    flit; ``pe_times[p]``: the action times of the PE at chain position ``p`` (None if idle), per
    inference K RECV, P PASS then ``n_pix * N_r`` EMIT actions; ``solves``: stream solves used (diagnostics).
    """

    in_times: np.ndarray
    out_times: np.ndarray
    pe_times: list[np.ndarray | None]
    stream_names: list[str]
    stream_times: list[np.ndarray]
    solves: int
    extrapolated: bool


def _pass_through_tail(templates: list[StreamTemplate]) -> int:
    """Index of the first stream of the longest suffix of pass-through streams (never the host input).

    Claim: in such a tail, stream ``k`` transfers flit ``i`` at ``t_k[i] = t_{k-1}[i] + 1`` (one cycle
    after its write into the FIFO before it), and the tail never holds the stream before it back.
    By induction from the host output (always ready): ``t_{k-1}[i] + 1`` meets rule 1's read bound
    with equality and rule 2 because writes are strictly increasing; rule 1's space bound asks
    ``t_k[i] >= t_{k+1}[i-D] + 1 = t_k[i-D] + 2``, true for ``D >= 2`` by strict increase and for
    ``D = 1`` because that FIFO's writes are >= 2 cycles apart (:func:`_space_one_apart`). The same
    argument shows the stream before the tail never waits for space. So the tail is solved in closed
    form after the rest.
    """
    start = len(templates)
    while start > 1 and templates[start - 1].pass_through:
        start -= 1
    return start


def solve_timing(program: Program, batch: int, path: DataPath | None = None, *,
                 probe_batch: int | None = PROBE_BATCH) -> TimingResult:
    """Solve section 6's recurrences for ``batch`` inferences.

    Sweeps solve the streams before the pass-through tail, first for ``probe_batch`` inferences whose
    periodic continuation is checked against the whole batch (growing the probe while the check
    fails); ``probe_batch=None`` sweeps the whole batch directly (slow for large batches, same result).
    """
    path = path or trace_data_path(program)
    all_templates = stream_templates(program, path)
    tail = _pass_through_tail(all_templates)
    templates, open_end = all_templates[:tail], tail < len(all_templates)
    depth = program.arch.router_fifo_depth
    solves, full, prefix = 0, None, None
    if probe_batch is not None and batch > 2 * probe_batch:
        probe = probe_batch
        while probe * 2 < batch:
            system = _StreamSystem(templates, depth, probe, open_end=open_end)
            if prefix is not None:
                system.warm_start(prefix)
            solves += system.sweep_until_stable()
            prefix = system.solution()
            candidate = _extrapolate(prefix, templates, probe, batch)
            if candidate is not None:
                full = _StreamSystem(templates, depth, batch, open_end=open_end, times=candidate)
                if full.is_exact():
                    break
                full = None
            probe *= PROBE_GROWTH
    extrapolated = full is not None
    if not extrapolated:
        full = _StreamSystem(templates, depth, batch, open_end=open_end)
        if prefix is not None:
            full.warm_start(prefix)
        solves += full.sweep_until_stable()
    times = full.solution()
    if open_end:
        last, writes = times[-1], full.writes[-1]
        into_tail = last if writes is None else last[writes]
        times += [into_tail + hop for hop in range(1, len(all_templates) - tail + 1)]
    pe_times: list[np.ndarray | None] = [None] * program.arch.n_tiles
    for template, stream in zip(all_templates, times):
        if template.position != HOST:
            pe_times[template.position] = stream
    return TimingResult(in_times=times[0], out_times=times[-1], pe_times=pe_times,
                        stream_names=[t.name for t in all_templates], stream_times=times,
                        solves=solves, extrapolated=extrapolated)
