"""flowtile's bit- and cycle-exact emulator (docs/architecture.md sections 2-6), without a cycle loop.

    result = emulate(program, in_flits, batch)
    result.out_flits, result.out_times, result.cycles, result.report()

:mod:`.functional` computes the data of every flit from the tiles' registers, SRAM images and
parameter tables; :mod:`.timing` computes the cycle of every transfer by solving the max-plus
recurrences of section 6: ``result.timing.pe_times[p]`` is the :class:`PETimes` (input-side transfers,
COMPUTE starts, output-side transfers) of the PE at chain position ``p``, ``result.timing.word_starts[p]`` the
first issue cycle of each of its result words (section 4, result ring), ``result.tile_timelines[p]`` its
phase spans per side. A tile of several contexts (docs/architecture.md section 4.6) has its contexts' actions in
turn order on each side (``result.timing.context_times[p]``: per context).

Several chips (``Arch.chips``): chain positions are system chain positions (all chips, in line order); the host
feeds chip 0 and reads the last chip (in a ring, ``chip_topology = "ring"``, behind link ``chips - 1``, the return
link to the host at chip 0); ``result.links[k]`` has link ``k``'s figures (:class:`LinkStats`) and
``result.timing.link_times[k]`` the cycle of each of its events (:class:`emulator.timing.LinkTimes`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from flowtile.host import HostPattern
from flowtile.link_format import LinkGeometry, flit_lanes
from flowtile.program import Program

from . import functional
from .functional import FunctionalResult, check_input_flits
from .link_faults import LINK_COUNTERS
from .path import DataPath, EmulatorError, TileCounts, trace_data_path
from .timing import LinkTimes, PETimes, TimingError, TimingResult, solve_timing
from .watchdog import DeadlockError, WatchdogError, cycle_budget, cycle_limit, flit_progress, progress_at

__all__ = ["emulate", "EmulatorResult", "EmulatorError", "TimingError", "DeadlockError", "WatchdogError",
           "cycle_budget", "cycle_limit", "flit_progress", "PHASE_SPAN_DTYPE", "PETimes", "LinkTimes", "LinkStats",
           "run_functional", "solve_timing", "trace_data_path"]

#: One span of a PE side's activity: cycles ``[start, end)`` spent in ``phase`` (input side: RECV, PASS;
#: compute side: COMPUTE; output side: FORWARD, EMIT).
PHASE_SPAN_DTYPE = np.dtype([("start", np.int64), ("end", np.int64), ("phase", "U7")])


@dataclass(frozen=True)
class LinkStats:
    """Figures of link ``link`` (chip ``link`` -> chip ``link + 1``; a ring's link ``chips - 1``: the last chip -> the
    host at chip 0) over a run, fault free (docs/architecture.md section 12, :mod:`flowtile.link_format`).

    ``flits_per_inference`` / ``frames_per_inference``: what crosses per inference (dense frames by the link's
    lane table, :meth:`flowtile.link_format.LinkGeometry.inference_frame_sizes`; ``ceil(n / frame_flits)`` when
    every lane is carried); ``carried_bytes_per_inference``: the lanes those flits carry over the link (the rest
    is channel padding, not sent); ``flits`` / ``frames``: over the batch; ``frame_beats``: wire cycles a frame
    takes; ``busy_cycles``: ``frames * frame_beats``, the cycles the forward wire carries frame beats;
    ``first_send`` / ``last_send``: the cycles the serializer loads the batch's first and last frame (its beats
    follow from the next cycle); ``last_delivery``: the cycle the receiver hands the batch's last flit to chip
    ``link + 1`` (the return link: to the host); ``utilization``: ``busy_cycles / cycles`` of the run; ``flits_per_cycle``: the link's peak,
    ``frame_flits / frame_beats`` with every lane carried.

    ``counters``: the link's status counters at the end of the run, named as the RTL's
    (:data:`emulator.link_faults.LINK_COUNTERS`: ``tx_frames_sent`` (resends included), ``tx_replays`` (go-backs),
    ``tx_naks``, ``tx_timeouts``, ``tx_ret_crc_errors`` (return messages with a bad CRC-16), ``rx_frames_accepted``,
    ``rx_crc_errors`` (frames with a bad CRC-32), ``rx_seq_errors``, ``rx_duplicates``, ``rx_naks_sent``,
    ``rx_overflows``, ``fwd_flips`` / ``ret_flips`` (bits the injector flipped on each channel), ``undetected``);
    fault free every frame is sent and accepted once and the rest are 0. With faults (``Arch.link_error_rate >
    0``) ``frames`` still counts distinct frames, ``busy_cycles`` every frame put on the wire (resends included).
    ``detected_errors``: frames and messages the link found corrupted or out of order (CRC-32 and CRC-16
    failures, sequence errors)."""

    link: int
    flits_per_inference: int
    frames_per_inference: int
    frame_flits: int
    frame_beats: int
    flits: int
    frames: int
    busy_cycles: int
    first_send: int
    last_send: int
    last_delivery: int
    utilization: float
    flits_per_cycle: float
    counters: dict = field(default_factory=dict)
    carried_bytes_per_inference: int = 0

    @property
    def detected_errors(self) -> int:
        c = self.counters
        return c.get("rx_crc_errors", 0) + c.get("rx_seq_errors", 0) + c.get("tx_ret_crc_errors", 0)

    def report(self) -> dict:
        return {"detected_errors": self.detected_errors, "replays": self.counters.get("tx_replays", 0),
                "counters": dict(self.counters), "link": self.link, "flits": self.flits, "frames": self.frames,
                "flits_per_inference": self.flits_per_inference, "frames_per_inference": self.frames_per_inference,
                "frame_beats": self.frame_beats, "busy_cycles": self.busy_cycles, "first_send": self.first_send,
                "last_send": self.last_send, "last_delivery": self.last_delivery,
                "utilization": float(self.utilization), "flits_per_cycle": float(self.flits_per_cycle)}


@dataclass
class EmulatorResult:
    """What one emulated run produces (cycle numbers count from the first cycle with ``run = 1``).

    ``out_flits``: int8 ``[batch * output_words, L]`` as the host receives them; ``out_times`` /
    ``in_times``: int64 host-output / host-input transfer cycle per flit; ``cycles``: last output
    transfer + 1; ``latency_cycles``: last output flit of inference 0 + 1; ``interval_cycles``: mean
    distance between the last output flits of consecutive inferences (``cycles`` if batch is 1);
    ``mac_utilization``: network MACs / (cycles x tiles x lanes, every chip's tiles); ``tile_busy_cycles`` /
    ``tile_macs``: int64 ``[rows, cols]`` (several chips: ``[chips, rows, cols]``), COMPUTE cycles (``I + 2`` per inference: issue and drain, not the
    waits for a result-ring slot between words that a COMPUTE span of ``tile_timelines`` includes) and lane-MACs
    issued (``I * L`` per inference for a MAC tile, ``I = n_pix * N_o * K_w`` of section 4.1, which is
    ``N_o*K`` for a dense layer; ``I * L`` for a LANE tile, ``I = n_pix * CW * KH*KW``, every lane
    multiplying; ``I * L`` for an ADD tile, ``I = n_pix * CW * 2``, and for a CONCAT tile,
    ``I = n_pix * CW``, each issue multiplying an operand word by ``add_mult_a`` or ``add_mult_b``; 0 for
    max pooling, which multiplies nothing) per PE (a tile of several contexts: the sum over its contexts);
    ``tile_timelines[p]``: the phase spans of the PE at chain position ``p``, a :data:`PHASE_SPAN_DTYPE`
    array (iterates as ``(start, end, phase)``): all input-side spans (per inference RECV then PASS), then
    all COMPUTE spans, then all output-side spans (per inference FORWARD, then EMIT); an empty phase has no
    span; a tile of several contexts (section 4.6) has per inference each context's spans in turn (RECV, PASS of
    context 0, then of context 1, ...; COMPUTE of context 0, 1, ...; FORWARD, EMIT of context 0, then 1, ...).
    FORWARD covers the ``Q_f + P_bulk`` forward-queue pops that lead an inference's output side and
    EMIT the rest of its ``Q + E`` output transfers: with ``pass_per_pixel > 0`` (section 4.4) those are
    the per-pixel interleaved pops and EMITs, so an EMIT span then includes ``n_pix * pass_per_pixel``
    pops; with ``pass_per_pixel = 0`` FORWARD is all ``Q`` pops and EMIT the ``E`` EMITs. An input or
    output span runs from the end of the same side's
    previous span (cycle 0 for its first) to its phase's last transfer + 1, so waiting counts in; a COMPUTE
    span is ``[c_s, a_last + d_last + 2)`` (section 4, result ring: ``I + 2`` cycles, plus any wait for a ring
    slot between result words). Empty for idle tiles. ``links``: per link (several chips) its :class:`LinkStats`;
    empty for one chip. ``chips``, ``chip_topology``: the system's (``Arch.chips``, ``Arch.chip_topology``).
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
    links: list[LinkStats] = field(default_factory=list)
    chips: int = 1
    chip_topology: str = "line"

    @cached_property
    def tile_timelines(self) -> list[np.ndarray]:
        """Per chain position, the PE's phase spans per side (computed on first use)."""
        timelines = []
        for position, pe_times in enumerate(self.timing.pe_times):
            timelines.append(np.empty(0, dtype=PHASE_SPAN_DTYPE) if pe_times is None
                             else _phase_spans(pe_times, self.timing.compute_ends[position],
                                               self.path.counts[position], self.batch))
        return timelines

    def report(self) -> dict:
        """The run's figures; with several chips also ``chips``, ``chip_topology`` and per link
        :meth:`LinkStats.report` (a ring's return link last)."""
        report = {"batch": int(self.batch), "cycles": int(self.cycles), "latency_cycles": int(self.latency_cycles),
                  "interval_cycles": float(self.interval_cycles), "mac_utilization": float(self.mac_utilization)}
        if self.links:
            report["chips"] = int(self.chips)
            report["chip_topology"] = self.chip_topology
            report["links"] = [link.report() for link in self.links]
        return report


def _side_spans(times: np.ndarray, phases: list[tuple[str, int]],
                batch: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Spans of one side (input or output): per inference one span per non-empty phase, ``phases`` =
    ``[(name, transfers per inference), ...]`` in order; a span runs from the end of the side's previous
    span (0 for its first) to its phase's last transfer + 1. Returns ``(name, start, end)`` columns."""
    width = sum(n for _, n in phases)
    if not width:
        return []
    times = times.reshape(batch, width)
    ends, names, last = [], [], 0
    for name, n in phases:
        if n:
            last += n
            ends.append(times[:, last - 1] + 1)
            names.append(name)
    end = np.stack(ends, axis=1).ravel()                 # inference-major, phase-minor
    start = np.empty_like(end)
    start[0] = 0
    start[1:] = end[:-1]
    count = len(names)
    return [(names[c], start[c::count], end[c::count]) for c in range(count)]


def _phase_spans(pe_times: PETimes, compute_ends: np.ndarray, count: TileCounts, batch: int) -> np.ndarray:
    """Phase spans of one PE from its transfer times (see :attr:`EmulatorResult.tile_timelines`): all
    input-side spans (per inference RECV then PASS), then all COMPUTE spans ``[c_s, compute_ends[s])`` (``a_last
    + d_last + 2``, :attr:`emulator.timing.TimingResult.compute_ends`), then all
    output-side spans (per inference FORWARD, the ``Q_f + P_bulk`` leading queue pops, then EMIT, the
    remaining output transfers: with ``pass_per_pixel > 0`` the interleaved per-pixel pops and EMITs, section
    4.4); an empty phase has no span."""
    contexts = count.per_context      # section 4.6: a tile's contexts in turn, each side's spans in turn order
    blocks = [_side_spans(pe_times.input, [phase for c in contexts
                                           for phase in (("RECV", c.recv_span), ("PASS", c.flits_in - c.recv_span))], batch)]
    computing = [index for index, c in enumerate(contexts) if c.n_out]
    if computing:
        width = len(contexts) if count.contexts else 1
        blocks.append([("COMPUTE", pe_times.compute[index::width], compute_ends[index::width])
                       for index in computing])
    blocks.append(_side_spans(pe_times.output, [phase for c in contexts for phase in
                                                (("FORWARD", c.n_bulk_pops), ("EMIT", c.flits_out - c.n_bulk_pops))],
                              batch))
    pieces = []
    for columns in blocks:
        if not columns:
            continue
        spans = np.empty((batch, len(columns)), dtype=PHASE_SPAN_DTYPE)
        for c, (name, start, end) in enumerate(columns):
            spans["start"][:, c] = start
            spans["end"][:, c] = end
            spans["phase"][:, c] = name
        pieces.append(spans.ravel())
    return np.concatenate(pieces) if pieces else np.empty(0, dtype=PHASE_SPAN_DTYPE)


def emulate(program: Program, in_flits: np.ndarray, batch: int, *,
            host_pattern: HostPattern | None = None, max_cycles: int | None = None) -> EmulatorResult:
    """Run ``batch`` inferences of ``program`` on host input flits int8 ``[batch * input_words, lanes]``.

    ``host_pattern``: host output stalls and input gaps (:class:`flowtile.host.HostPattern`); outputs are the
    same with or without, only the cycles change. ``max_cycles``: the run's cycle limit (as the RTL harness's
    ``cycle_limit``): a run that needs more raises :class:`WatchdogError`, naming each unfinished tile's flits
    in and out by then. A program that cannot finish (flit counts that do not add up) raises
    :class:`DeadlockError` naming the stuck tile, its port and its words received of expected.

    ``batch`` counts real inferences: a replicated program (``program.replicas`` copies of the network taking
    alternate inferences) runs ``batch // replicas`` program inferences, each ``replicas`` inferences' flits back to
    back (ValueError if ``batch`` is not a multiple; the host pads). The result counts program inferences."""
    if program.replicas > 1:
        try:
            program, batch = program.program_inferences(batch)
        except ValueError as error:
            raise EmulatorError(str(error)) from None
    arch = program.arch
    path: DataPath = trace_data_path(program)      # validates the program
    check_input_flits(program, in_flits, batch)
    timing = solve_timing(program, batch, path, host_pattern=host_pattern)
    if max_cycles is not None:
        if isinstance(max_cycles, bool) or not isinstance(max_cycles, (int, np.integer)) or max_cycles < 1:
            raise EmulatorError(f"max_cycles must be a positive integer, got {max_cycles!r}")
        stopped = progress_at(program, batch, path, timing, int(max_cycles))
        if stopped is not None:
            raise stopped
    data = functional.run_functional(program, in_flits, batch, path, timing)

    words = program.output_words
    out_times = timing.out_times
    cycles = int(out_times[-1]) + 1
    last_flits = out_times[words - 1::words]
    interval = float(cycles) if batch == 1 else float(last_flits[-1] - last_flits[0]) / (batch - 1)
    busy = np.zeros((arch.chips, arch.rows, arch.cols), dtype=np.int64)
    macs = np.zeros((arch.chips, arch.rows, arch.cols), dtype=np.int64)
    for position, tile in enumerate(program.tiles):
        count = path.counts[position]
        busy[tile.chip, tile.row, tile.col] = count.tile_compute_cycles * batch
        macs[tile.chip, tile.row, tile.col] = count.tile_mac_issue_cycles * arch.lanes * batch
    if arch.chips == 1:
        busy, macs = busy[0], macs[0]
    return EmulatorResult(
        batch=batch, out_flits=data.out_flits, out_times=out_times, in_times=timing.in_times,
        cycles=cycles, latency_cycles=int(last_flits[0]) + 1, interval_cycles=interval,
        mac_utilization=program.macs_per_inference * batch / (cycles * arch.system_tiles * arch.lanes),
        tile_busy_cycles=busy, tile_macs=macs, functional=data, timing=timing, path=path,
        links=link_stats(program, path, timing, batch, cycles), chips=arch.chips, chip_topology=arch.chip_topology)


def link_stats(program: Program, path: DataPath, timing: TimingResult, batch: int, cycles: int) -> list[LinkStats]:
    """Per link of a multi-chip run its :class:`LinkStats` (empty for one chip)."""
    stats = []
    for index, (flits, times) in enumerate(zip(path.link_flits, timing.link_times)):
        geometry = LinkGeometry(program.arch, owner=f"link {index}")
        segments = program.links[index].segments
        frames = geometry.frames(flits, segments)
        counters = times.counters
        if counters is None:
            counters = dict.fromkeys(LINK_COUNTERS, 0)
            counters["tx_frames_sent"] = counters["rx_frames_accepted"] = batch * frames
        busy = counters["tx_frames_sent"] * geometry.frame_beats
        stats.append(LinkStats(
            link=index, flits_per_inference=flits, frames_per_inference=frames, frame_flits=geometry.frame_flits,
            frame_beats=geometry.frame_beats, flits=batch * flits, frames=batch * frames, busy_cycles=busy,
            first_send=int(times.send[0]), last_send=int(times.send[-1] if not times.sends else max(t for t, _ in times.sends)), last_delivery=int(times.deliver[-1]),
            utilization=busy / cycles, flits_per_cycle=geometry.flits_per_cycle, counters=dict(counters),
            carried_bytes_per_inference=int(flit_lanes(segments, flits, geometry.lanes).sum())))
    return stats


def run_functional(program: Program, in_flits: np.ndarray, batch: int, path: DataPath | None = None,
                   timing: TimingResult | None = None) -> FunctionalResult:
    """:func:`emulator.functional.run_functional`, solving the run's timing if a tile needs it (weights that overlap
    an activation bank the input side may write during a COMPUTE) and ``timing`` is not given."""
    path = path or trace_data_path(program)
    return functional.run_functional(program, in_flits, batch, path,
                                     timing or (lambda: solve_timing(program, batch, path)))
