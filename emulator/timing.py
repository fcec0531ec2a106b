"""Exact transfer times of every flit on every stream (docs/architecture.md section 6), without
stepping cycles.

Model. A run is a graph of *chains*. A chain is a sequence of actions ``j`` (repeating per inference)
with times ``t_j = max(lb_j, t_{j-1} + d_j)`` and ``t_{-1} = -1``:

* host input: one write per flit into tile (0,0)'s W FIFO, ``d = 1`` (rule 5);
* link (a router hop): one action per flit that reads a router input FIFO and writes the next one
  in the same cycle (rule 3), ``d = 1`` (rule 2);
* host output: one read per flit, ``d = 1``; the host is ready in every cycle unless a host pattern gates it
  (then the host chains are solved in on-cycle indices, see :func:`solve_timing`);
* every non-idle PE is three chains (section 4, rule 4):

  - input side: per inference ``K`` RECV then ``P`` PASS actions, ``d = 1``; each reads the router FIFO
    before the PE; the forwarded RECV words (``forward_begin <= k < forward_end``) and every PASS push
    the PE's forward queue in the same cycle;
  - compute side (``N_o > 0`` only): one action per RESULT WORD (section 4, result ring), ``a_j``, its
    first issue cycle; the ``E`` words of an inference in issue order, word ``w`` taking ``d_w`` issue
    cycles back to back (:meth:`emulator.path.TileCounts.word_issue_cycles`, from
    ``TileConfig.result_word_issue_cycles``): ``d = d_{w-1}`` for ``w >= 1`` and ``d_{E-1} + 2`` for
    the first word (the previous COMPUTE's pipeline drains; the very first action has ``d = 1``, i.e. no
    bound of its own). ``c_s`` is ``a`` of the first word of ``s``; COMPUTE of ``s`` spans ``[c_s, a_last +
    d_last + 2)``;
  - output side: per inference the ``Q = (forward_end - forward_begin) + P`` pops of the forward queue and
    the ``E = n_pix * N_r`` EMITs in section 4.4's order: ``Q_f + P_bulk`` pops (``P_bulk = P - n_pix *
    pass_per_pixel``), then per output pixel ``pass_per_pixel`` pops and the pixel's ``W_px = E / n_pix``
    EMITs (with ``pass_per_pixel = 0``: all pops, then all EMITs), ``d = 1``; every action writes the PE's
    local router FIFO; the pops are the actions reading the forward queue (not a prefix of the chain when
    ``pass_per_pixel > 0``).

  ``n_pix`` is the number of the tile's output pixels, section 4.1's band (``TileConfig.output_pixels``:
  ``out_rows * out_width - out_col_begin - (out_width - E')``, which may begin and end inside a row); the
  compute chain's ``E = n_pix * N_r`` words, their issue cycles and the per-pixel interleave all run over it
  (:func:`emulator.path.tile_counts`).

* several chips (``Arch.chips``, a line): each chip's chains as above, in system chain order; the first chain is
  chip 0's host input, the last the last chip's host output (in a ring, ``chip_topology = "ring"``, the delivery
  chain of link ``chips - 1``, the return link: it reads the last chip's exit FIFO and hands its flits to the host
  output, ready in every cycle unless a host pattern gates it). Link ``k`` (the timing contract of
  :mod:`flowtile.link_format`, fault free) replaces chip ``k``'s host output and chip ``k + 1``'s host input by
  three chains (:class:`LinkChains`), with ``n`` flits per inference in the frames of its lane table
  (:meth:`flowtile.link_format.LinkGeometry.inference_frame_sizes`: dense frames; ``ceil(n / frame_flits)`` when
  every lane is carried; frames never span inferences; ``f`` counts frames over the batch):

  - sender: per frame its flits' accepts (each reads chip ``k``'s exit FIFO, chip ``k``'s host output
    transfer), then the frame's close, ``d = 1``: in chain order this is ``A(first of f) >= close_{f-1} + 1``,
    ``close_f >= A(last of f) + 1``, ``close_f >= close_{f-1} + 1`` and one flit a cycle;
  - send: one action per frame, ``send_f``, ``d = frame_beats`` (the batch's first ``d = 1``);
  - delivery: one action per flit, writing chip ``k + 1``'s tile (0,0) W FIFO (chip ``k + 1``'s host input
    transfer, with rule 1's space bound), ``d = 1``; for a ring's return link the host output transfer.

* a tile of several contexts (docs/architecture.md section 4.6) is still three chains, whose actions per inference
  are its contexts' actions in turn order (input: context 0's ``K_0 + P_0``, then context 1's ``K_1 + P_1``, ...;
  compute: context 0's ``E_0`` result words, then context 1's, ..., ``d`` the previous word's and ``+ 2`` before
  every context's first word, the pipeline draining between contexts as between inferences; output: context 0's
  ``Q_0 + E_0`` in section 4.4's order, then context 1's, ...): :func:`_add_context_tile`.

The chains are coupled by three kinds of edges:

* FIFO edges (rule 1, depth ``D`` for a router FIFO, ``F`` = the tile's register ``queue_words`` for its
  forward queue): the writes ``w`` of flits ``i`` belong to one chain, the reads ``r`` to another, and
  ``r_i >= w_i + 1``, ``w_i >= r_{i-depth} + 1``. Router FIFOs and the host streams form a line
  ``host input -> FIFO -> [link -> FIFO ->] PE input -> queue -> PE output -> FIFO -> ... -> host output``.
  The result ring of a computing PE is one more FIFO edge, of depth ``R = Arch.result_words``, written by
  the compute chain (push of word ``j`` = ``a_j``) and read by the output side's EMITs, with a read offset
  per word: ``EMIT_j >= a_j + d_j + 2`` (the word is written in ``a_j + d_j + 1``) and ``a_j >= EMIT_{j-R} +
  1`` (the FIFO space rule: slot ``j mod R`` has been emitted);
* event edges ``t_target(s, a) >= t_source(s - shift, b) + offset`` of one PE:
  ``c_s >= input(s, RECV word store_until - 1) + 1`` (``store_until``: one past the last stored word) (compute action 0 of ``s``); ``input(s, 0) >=
  c_{s-1}`` (``s >= 1``);
* with several contexts (section 4.6), per edge the actions of the context it belongs to (:attr:`FifoEdge.write_slots`,
  :attr:`FifoEdge.read_slots`, :attr:`EventEdge` slots): the router FIFO before the tile is read by context 0's
  input actions only; the tile's loop-back FIFO (depth ``D``) runs from the output actions of contexts ``0 .. C' -
  2`` to the input actions of contexts ``1 .. C' - 1``; context ``c``'s forward queue (depth ``F_c``) from its pushes
  to its pops; the result ring is one FIFO edge of depth ``R`` from every word (numbered over contexts and
  inferences in compute order) to its EMIT; the tile's local router FIFO takes the last context's output actions;
  the event edges hold per context (``c_{c,s} >= input(c, s, RECV word store_until_c - 1) + 1``, ``input(c, s, 0)
  >= c_{c,s-1}``);
* frame edges of a link (:class:`FrameEdge`), between per-frame actions numbered over the batch: ``send_f >=
  close_f + 1``; ``deliver(first flit of f) >= send_f + accept_delay + 1``; ``close_f >= ack_seen(f -
  replay_frames)`` with ``ack_seen(g) = next_message(send_g + accept_delay + 1) + message_delay``; ``send_f >=
  freed_seen(f - credit_frames)`` with ``freed_seen(g) = next_message(deliver(last flit of g) + 1) +
  message_delay``; ``next_message(t)`` is the first multiple of ``message_period`` ``>= max(t, 0)``
  (:func:`next_message`). Such a bound is a monotone function of its source time, at least the source plus a
  positive weight, so the sweeps below still climb to the least solution and the exactness argument holds.

Given its lower bounds a chain is solved in closed form (max-plus prefix scan)::

    C = cumsum(d);   t = C + maximum.accumulate(max(lb - C, -1))

The coupled system is solved by Gauss-Seidel sweeps over the chains, alternately downstream (data) and
upstream (back-pressure), starting from "no constraint yet" and re-solving a chain only when a chain it
depends on changed, until nothing changes. Times only increase and the iteration stops at the least
solution, which is the hardware's behaviour (every transfer happens in the first cycle its rules allow). A due
tile's three chains are solved together to their fixed point before the sweep goes on (they bound each other around
loops, once per context through the loop-back FIFO); the order of solves does not change the least solution.

Exact shortcuts keep the number of sweeps small. Delays implied by the rules are built into ``d`` (they
leave the solution unchanged and spare the sweep rounds through which they would otherwise emerge):

* with depth 1 (``D = 1`` for router FIFOs, ``F = 1`` for a queue) rule 1 implies that consecutive
  transfers on one side of that FIFO are >= 2 cycles apart; that spares one sweep round per flit
  (:func:`_space_one_apart`);
* the sides of a computing PE wait on each other around loops that would cost a sweep round per inference
  or per word (:func:`_compute_side`): ``c_s -> input of s + 1 -> c_{s+1}`` (``c_{s+1} >= c_s +
  (store_until - 1) * in_gap + 1``); with a full queue ``c_s -> EMITs of s -> pops of s + 1 -> pushes of s + 1
  -> c_{s+1}`` (an extra event edge ``input(s+1, push F) >= c_s + ...`` and a ``c_{s+1} - c_s`` bound); with
  ``pass_per_pixel > 0`` pushes of ``s`` that wait for pops following EMITs of ``s``. The ``c_{s+1} - c_s``
  bounds exceeding the chain's own per-inference delay become the compute chain's ``skip`` (``t(s, 0) >= t(s
  - 1, 0) + skip``), which its solve handles in closed form too (a scan over inferences, then one per
  inference, :meth:`_ChainSystem._skip_scan`). With a ring of one word (``R = 1``) ``a_j >= EMIT_{j-1} + 1
  >= a_{j-1} + d_{j-1} + 3`` and ``EMIT_j >= EMIT_{j-1} + d_j + 3`` (where one EMIT follows the other) are
  built into the delays. Larger rings that hold COMPUTE back couple the compute and output chains about once
  per ``R`` words; the sweep budget grows with ``E / R`` (:attr:`TimingGraph.ring_rounds`);
* the suffix of pass-through chains before the host output (links, the host output, and the input and
  output sides of PEs that compute nothing and forward or pass every word: each action reads one flit
  and writes it to the next FIFO) never holds anything back and adds exactly one cycle per chain, so it
  is solved in closed form after the rest (:func:`_pass_through_tail`). A pass-through PE is two such
  chains around its queue, so a flit crossing its tile takes 3 cycles (its input side, its output side, the
  link behind its local FIFO) where a plain router hop takes 1. A forward queue of depth 1 behind deeper
  router FIFOs can hold the chain before it back, so the tail then starts behind the last depth-1 FIFO. A link
  is not pass-through (its credit holds the chip before it back), so the tail lies after the last chip's host
  input (and a ring, whose last chain is its return link's delivery, has none);
* a link's send chain carries two implied bounds on itself (:class:`SelfBound`, solved by
  :meth:`_ChainSystem._solve_self_bounded`): the credit round trip ``send_f >= next_message(send_g + accept_delay
  + 2 + span_g) + message_delay`` for ``g = f - credit_frames`` (the last flit of ``g`` leaves no earlier than
  ``span_g`` = its flits - 1, times 2 behind a depth-1 FIFO, cycles after the first) and the ack round trip
  ``send_f >= next_message(send_g + accept_delay + 1) + message_delay + 1`` for ``g = f - replay_frames``
  (through ``close_f``). Without them a credit- or window-limited link would cost a sweep round per
  ``credit_frames`` (``replay_frames``) frames; the sweep budget still allows for it (:attr:`TimingGraph.link_rounds`).

Tiles of several contexts and the shortcuts. The shortcuts above were derived for the PE of one context; for a tile
of several (section 4.6):

* :func:`_compute_side`'s skip and stall bounds are left out (:func:`_context_side`): they only spare sweep rounds,
  and the sweeps reach the same least solution without them (the budget grows with the contexts,
  :attr:`TimingGraph.context_rounds`). The one-word ring's bounds are kept: their derivation uses only the ring's
  FIFO rule and ``EMIT_j >= a_j + d_j + 2``, which hold with the words numbered in compute order over contexts;
* :func:`_space_one_apart` is per FIFO side and its slots: two adjacent actions of a chain that both write (read) one
  FIFO move consecutive flits through it, whatever their contexts, so it holds for the loop-back FIFO, each context's
  queue, the ring and the router FIFOs facing one context alone;
* the pass-through tail never holds a tile of several contexts (every context computes); its writer may be such a
  tile's output chain, writing through its last context's slots: writes into a depth-1 entry FIFO by adjacent
  actions are spaced by rule 1 as before, by non-adjacent ones by at least 2 anyway, so the tail's argument holds;
* the windows (:class:`_WindowSystem`) and the probe's extrapolation and check are unchanged: every edge still runs
  from an action of the same or an earlier inference (the loop-back FIFO within an inference, its space bound and
  the ring's to earlier flits), every edge has weight >= 1 but ``input(c, s, 0) >= c_{c,s-1}`` (from the compute
  chain to the input chain, never alone on a cycle), and the compute and output chains are still coupled by the
  ring alone, so :meth:`_WindowSystem.solve_ring_pair`'s blocks hold (its input chain's bounds, the loop-back FIFO
  included, are those of the chains it does not solve).

Links with faults (``Arch.link_error_rate > 0``). The contract above is the fault-free link. With faults a link's
three chains are solved together by simulating the link cycle by cycle (:func:`emulator.link_faults.simulate_link`,
which mirrors :class:`flowtile.hdl.link.Link` register by register and takes the injector's flips from
:mod:`flowtile.link_faults`): its inputs are the bounds the neighbouring chains put on the link now (chip ``k``
offers flit ``i`` from its exit FIFO write + 1, chip ``k + 1``'s input FIFO has room for it from the read that frees
its slot + 1), its outputs the sender's accepts and closes, the first send of every frame and the deliveries; the
link is re-simulated inside the sweeps whenever those bounds change (restarting from a snapshot before the first
cycle they change), and no frame edge or self bound is added. Why a simulation: a faulty link is not monotone (a
later send can dodge a fault, a NAK waits for the message cadence, a timeout for a timer), so it is no max-plus
chain and the least-solution argument does not apply. What still holds: every dependency has a positive delay (the
link reads an offer or a room only in a later cycle than the transfer that made it; the chips' rules are
unchanged), so the system is causal and its solution, the hardware's behaviour, is the unique fixed point of the
equations: a sweep iteration that stops changing has found it exactly. The sweeps from "no constraint yet"
converge (each round fixes at least every event up to the earliest one still wrong); the round budget of
:meth:`_ChainSystem.sweep_until_stable` bounds them and raises :class:`TimingError` otherwise, and a link that
cannot deliver within its own cycle budget raises it naming the link. Faulty runs are not periodic, so the probe
and its extrapolation are skipped: the whole batch is swept. A fault-free program never takes this path.

Large batches. Sweeps need about one round (downstream + upstream) per inference when a PE's
progress depends on its downstream neighbour's (back-pressure) while that neighbour waits for its
data. So a short probe batch is solved first, its per-inference times are extrapolated once they
repeat with a fixed period, and the candidate is checked with one Jacobi pass: does every chain's
recurrence hold with equality? Why that is exact:

* a prefix of inferences is a closed subsystem: every edge goes from a flit or inference to the same or
  an earlier one (FIFO space: flit ``i - depth``, result ring: word ``j - R``; the event edges and skips:
  inference ``s`` or ``s - 1``; a link's frame edges and self bounds: frame ``f``, ``f - replay_frames`` or ``f -
  credit_frames``), so the
  probe's times are the first inferences' times of the whole batch;
* every edge has weight >= 1 except ``input(s, 0) >= c_{s-1} + 0``, and no cycle consists of that edge
  alone (it runs from a compute chain to an input chain, never back), so every cycle of the dependency
  graph has positive weight (the result ring's edges weigh ``d_j + 2`` and 1, a skip ``> 0``; a frame edge or
  self bound ``t_v >= next_message(t_u + before) + after >= t_u + before + after`` weighs at least 1). A candidate
  satisfying all equations with finite times satisfies ``t_v >= t_u + w`` on every edge, impossible around a
  positive cycle: the graph is acyclic, its solution unique, and the candidate is it. (The implied delays,
  event edges, skips and self bounds hold in the least solution of the rules, so it satisfies the equations with
  them as well: the candidate that passes is that solution.) A link's message rounding makes its times periodic
  only over periods of a multiple of ``message_period`` cycles; a probe that has not found one grows, as through
  any transient.

If the check fails, a longer probe (and in the end the whole batch) is solved by sweeps; a probe whose sweeps
settled in a few rounds (:data:`CHEAP_SWEEP_ROUNDS`) is not grown, the whole batch is swept at once
(nothing couples its inferences round by round, so that is cheaper than probing through a long transient).

Windows (:class:`_WindowSystem`, programs without links or host patterns of at least :data:`WINDOW_MIN_ACTIONS`
actions per inference). Whole-batch sweeps redo every
inference in every round although the first ones settle early (a prefix is closed), so the probe is solved window
by window instead: inferences ``[lo, hi)`` are swept to their fixed point with every earlier inference final (a
chain's solve over a window is the same scan started from its time just before the window), the window growing
while it settles in a couple of rounds and shrinking when wider windows only cost more rounds
(:func:`_solve_in_windows`). Three exact shortcuts make a round cheap: a computing PE's compute and output chains,
which the result ring couples once per ring turn, are solved together (:meth:`_WindowSystem.solve_ring_pair`:
word ``g`` waits for the EMIT of ``g - R``, so in blocks of ``min(R, E)`` words the compute actions, then the output
actions up to the block's last EMIT, each a scan); a chain whose changed neighbours' new bounds its times already
meet is not re-solved (times only grow, so its last solve's least solution still is one, and the least:
:meth:`_WindowSystem._satisfied`); and after every window (from :data:`WINDOW_PROBE` inferences on) the
periodic continuation is tried and checked over the rest of the batch as above, so a network whose steady state
sets in after a few inferences is solved from those. The windows' continuation may let some chains gain on others
at a steady rate (:func:`_periodic` with ``drift``: an upstream PE's lead over the bottleneck that grows by a few
cycles an inference until a FIFO between them fills, which in a large network can take hundreds of inferences), and
its check (:meth:`_WindowSystem.exact_until`) runs stretch by stretch and keeps the inferences up to the first one
whose equations fail: those are exact by the same argument (a prefix of inferences is closed), and the windows go
on from there.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from flowtile.program import Program

from flowtile.arch import COMPUTE_DRAIN_CYCLES
from flowtile.host import HOST_PATTERN_CYCLES, HostPattern
from flowtile.link_faults import link_seed, ret_seed
from flowtile.link_format import LinkGeometry

from .path import HOST, DataPath, EmulatorError, TileCounts, tile_label, trace_data_path

__all__ = ["TimingError", "Chain", "FifoEdge", "EventEdge", "FrameEdge", "LinkChains", "TimingGraph", "PETimes",
           "LinkTimes", "TimingResult", "solve_timing", "timing_graph", "PROBE_BATCH", "NEVER", "Gate",
           "next_message"]

#: "No constraint yet": below any cycle, far enough from the int64 limits that ``+ offset`` and ``- C``
#: cannot overflow.
NEVER = np.int64(-(1 << 62))
#: Inferences solved by sweeps before extrapolating a periodic steady state.
PROBE_BATCH = 16
#: A probe whose sweeps took at most this many rounds (each downstream, then upstream; the last one changes
#: nothing) and did not extrapolate is not grown: the whole batch is swept directly (it converges in as few rounds
#: when no back-pressure couples inferences).
CHEAP_SWEEP_ROUNDS = 2
#: Factor by which the probe grows when it is not yet periodic or its extrapolation fails the check
#: (the solved prefix is kept, so only the new inferences cost sweeps).
PROBE_GROWTH = 2
#: Actions per chain and inference that the search for a period tests first (:func:`_periodic`).
PERIOD_SAMPLE_ACTIONS = 16
#: Sweep rounds allowed per inference (+ per chain): legitimate programs need about one round per
#: inference at worst; one that needs far more (a deadlock, or a model bug) is reported rather than
#: looped on forever.
ROUNDS_PER_INFERENCE = 8
ROUNDS_MINIMUM = 64


class Gate:
    """The cycles in which a host chain may transfer (:class:`flowtile.host.HostPattern`): cycle ``t`` is on iff
    ``bits[t % period]``. Its on cycles in increasing order ``C[0] < C[1] < ...`` (``C[k] = (k // n) * period +
    on[k % n]``, ``n`` on cycles per period).

    A gated chain with ``d = 1`` is ``t_j = next_on(max(lb_j, t_{j-1} + 1))`` (the first on cycle at or after
    the bound). ``next_on`` is monotone, so in on-cycle indices ``k_j`` (``t_j = C[k_j]``) it is again a plain
    max-plus chain, ``k_j = max(rank(lb_j), k_{j-1} + 1)`` with ``rank(x)`` the index of ``next_on(x)``, solved
    by the same prefix scan."""

    def __init__(self, bits: np.ndarray):
        bits = np.asarray(bits, dtype=bool)
        self.bits = bits
        self.period = len(bits)
        self.on = np.flatnonzero(bits).astype(np.int64)
        if not len(self.on):
            raise ValueError("a host pattern needs at least one on cycle per period")
        self.n = len(self.on)

    def rank(self, cycles: np.ndarray) -> np.ndarray:
        """Index of the first on cycle >= ``max(cycles, 0)``."""
        cycles = np.maximum(cycles, 0)
        turns, within = np.divmod(cycles, self.period)
        return turns * self.n + np.searchsorted(self.on, within, side="left")

    def cycle(self, ranks: np.ndarray) -> np.ndarray:
        """``C[ranks]``."""
        turns, within = np.divmod(ranks, self.n)
        return turns * self.period + self.on[within]


def host_gates(host_pattern: HostPattern | None, n_chains: int) -> dict[int, Gate]:
    """Chain index -> :class:`Gate` for the host input (chain 0) and the host output (the last chain: in a ring the
    return link's delivery chain, whose receiver hands its flits to the host output)."""
    gates: dict[int, Gate] = {}
    if host_pattern is not None:
        if host_pattern.gaps_input:
            gates[0] = Gate(host_pattern.in_valid())
        if host_pattern.stalls_output:
            gates[n_chains - 1] = Gate(host_pattern.out_ready())
    return gates


class TimingError(EmulatorError):
    """The timing recurrences did not converge (a deadlock, or a bug in the model)."""


@dataclass(frozen=True)
class Chain:
    """One chain of actions, per inference: ``delays[j]`` is ``d_j`` of action ``j``; ``first_delay``
    replaces ``d`` of the very first action of the batch (counted from ``t_{-1} = -1``) if not None;
    ``skip`` > 0 adds ``t(s, 0) >= t(s - 1, 0) + skip`` (an implied bound between the first actions of
    consecutive inferences, larger than the chain's own per-inference delay; compute chains only)."""

    name: str
    position: int             # chain position of the PE, or HOST for host and link chains
    side: str                 # "host input", "link", "host output", "input", "compute" or "output"
    delays: np.ndarray
    first_delay: int | None = None
    pass_through: bool = False  # one read and one write per action, d = 1, no event edge
    skip: int = 0

    @property
    def per_inference(self) -> int:
        return len(self.delays)


@dataclass(frozen=True)
class FifoEdge:
    """A FIFO of ``depth`` flits between two chains (rule 1). ``write_slots`` / ``read_slots``: the
    actions of one inference that write / read it, in flit order (None: every action, in order).
    ``read_offsets``: per flit of one inference, the cycles after its write from which it can be read
    (None: 1, rule 1; the result ring: ``d_j + 2`` after ``a_j``)."""

    name: str
    writer: int
    reader: int
    depth: int
    write_slots: np.ndarray | None = None
    read_slots: np.ndarray | None = None
    read_offsets: np.ndarray | None = None


@dataclass(frozen=True)
class EventEdge:
    """``t[target](s, target_slot) >= t[source](s - shift, source_slot) + offset`` for ``s >= shift``."""

    target: int
    target_slot: int
    source: int
    source_slot: int
    shift: int
    offset: int


def next_message(cycles, period: int):
    """The start of the first return message in or after ``cycles`` (:mod:`flowtile.link_format`): the smallest
    multiple of ``period`` ``>= max(cycles, 0)``; elementwise on int64 arrays."""
    cycles = np.maximum(cycles, 0)
    return -(-cycles // period) * period


@dataclass(frozen=True)
class FrameEdge:
    """``t[target][target_slots](g) >= round(t[source][source_slots](g - shift) + before) + after`` for every
    ``g >= shift``, ``g`` numbering the slots over the whole batch (``*_slots``: the chain's actions of one
    inference, None: all of them; both sides have as many per inference: one per link frame); ``round`` is
    :func:`next_message` with ``period`` (a link's return messages), or nothing if ``period`` is 0. The bound is
    monotone in the source time and ``>= source + before + after``."""

    name: str
    target: int
    target_slots: np.ndarray | None
    source: int
    source_slots: np.ndarray | None
    shift: int
    before: int
    after: int = 0
    period: int = 0


@dataclass(frozen=True)
class SelfBound:
    """An implied bound of a chain on its own earlier actions (a link's send chain, see :func:`timing_graph`):
    ``t(g) >= next_message(t(g - shift) + before[g mod per_inference], period) + after`` over the whole batch
    (``before``: per action of one inference). Implied by the rules, so it leaves the solution unchanged; it lets
    one chain solve see what would otherwise take a sweep round per ``shift`` actions to emerge."""

    name: str
    chain: int
    shift: int
    before: np.ndarray
    after: int
    period: int


@dataclass(frozen=True)
class LinkChains:
    """The chains of link ``index`` (chip ``index`` -> chip ``index + 1``, or a ring's return link: the last chip ->
    the host output, ``to_host``) and the slots of its events.

    ``sender``: per inference, per frame its flits' accepts (the sender takes flit ``i`` from chip ``index``'s
    exit FIFO: that chip's host output transfer) then the frame's close, ``d = 1``; ``send``: one action per frame,
    the serializer loading it, ``d = frame_beats`` (the batch's first ``d = 1``); ``deliver``: one action per flit,
    the receiver writing it into chip ``index + 1``'s tile (0,0) W FIFO (that chip's host input transfer), or for
    the return link handing it to the host (the host output transfer, the last chain), ``d = 1``.
    ``flit_slots`` / ``close_slots``: the sender's actions of one inference that take a flit / close a frame;
    ``first_flits`` / ``last_flits``: per frame of one inference its first and last flit."""

    index: int
    sender: int
    send: int
    deliver: int
    flits: int                  # per inference
    frames: int                 # per inference
    flit_slots: np.ndarray
    close_slots: np.ndarray
    first_flits: np.ndarray
    last_flits: np.ndarray
    geometry: LinkGeometry
    faults: bool = False        # error rate > 0: solved by the link simulation (emulator/link_faults.py)
    segments: tuple = ()        # the link's lane table (Program.links[index].segments)
    to_host: bool = False       # a ring's return link: its deliveries are the host output transfers


@dataclass(frozen=True)
class TimingGraph:
    """The chains of a program (line order: host input first, host output last; a PE's input, compute,
    output chains in this order; a link's sender, send and delivery chains between the chips it joins), its
    FIFOs, event and frame edges, per chain position the indices of the PE's (input, compute or None, output)
    chains and the links' chains; ``ring_rounds`` scales the sweep budget (a ring that holds back COMPUTE couples
    the compute and output chains about once per ``R`` words), ``link_rounds`` too (a link's credit and replay
    windows couple its chains about once per ``min(credit_frames, replay_frames)`` frames)."""

    chains: list[Chain]
    fifos: list[FifoEdge]
    events: list[EventEdge]
    pe_chains: dict[int, tuple[int, int | None, int]]
    ring_rounds: int = 1      # max over computing PEs of ceil(E / R): result words per ring turn
    frame_edges: list[FrameEdge] = field(default_factory=list)
    links: list[LinkChains] = field(default_factory=list)
    link_rounds: int = 1      # 1 + max over links of ceil(frames per inference / min(credit, replay frames))
    self_bounds: list[SelfBound] = field(default_factory=list)
    context_rounds: int = 1   # the most contexts of a tile (section 4.6: each loop-back turn may cost a round)


def timing_graph(program: Program, path: DataPath) -> TimingGraph:
    """Chains, FIFOs and event edges of a program (section 6)."""
    arch = program.arch
    depth = arch.router_fifo_depth
    chains: list[Chain] = []
    fifos: list[FifoEdge] = []
    events: list[EventEdge] = []
    pe_chains: dict[int, tuple[int, int | None, int]] = {}
    ring = arch.result_words
    ring_rounds = 1
    context_rounds = 1

    ones_of: dict[int, np.ndarray] = {}

    def ones(n: int) -> np.ndarray:  # shared: delays are never changed in place (_spaced_delays copies them)
        if n not in ones_of:
            ones_of[n] = np.ones(n, dtype=np.int64)
        return ones_of[n]

    def add(chain: Chain) -> int:
        chains.append(chain)
        return len(chains) - 1

    frame_edges: list[FrameEdge] = []
    links: list[LinkChains] = []
    self_bounds: list[SelfBound] = []
    link_rounds = 1

    def fifo_name(chip: int, row: int, col: int, port: str) -> str:
        return f"router {tile_label(chip, row, col)} {port} FIFO"

    def add_link(index: int, flits: int, exit_writer: int, exit_fifo: str, to_host: bool,
                 exit_slots: np.ndarray | None = None) -> int:
        """Link ``index``'s chains and edges (module docstring); its sender reads ``exit_fifo`` (written by chain
        ``exit_writer``). Returns the delivery chain (it writes the next chip's tile (0,0) W FIFO; ``to_host``, a
        ring's return link: it is the host output, ready in every cycle unless a host pattern gates it)."""
        nonlocal link_rounds
        geometry = LinkGeometry(arch, owner=f"link {index}")
        sizes = geometry.inference_frame_sizes(flits, program.links[index].segments)
        frames = len(sizes)
        last = np.cumsum(sizes) - 1
        first = last - sizes + 1
        flit_slots = np.arange(flits, dtype=np.int64) + np.repeat(np.arange(frames, dtype=np.int64), sizes)
        close_slots = last + 1 + np.arange(frames, dtype=np.int64)
        label = f"link {index}"
        sender = add(Chain(f"{label} sender (accept, close)", HOST, "link sender", ones(flits + frames)))
        fifos.append(FifoEdge(exit_fifo, exit_writer, sender, depth, write_slots=exit_slots, read_slots=flit_slots))
        send = add(Chain(f"{label} send", HOST, "link send", np.full(frames, geometry.frame_beats, dtype=np.int64),
                         first_delay=1))
        deliver = add(Chain(f"{label} delivery" + (" (host output)" if to_host else ""), HOST,
                            "host output" if to_host else "link delivery", ones(flits)))
        accept = geometry.accept_delay
        if arch.link_error_rate > 0:
            # faults on: the three chains are solved together by simulating the link (module docstring); no
            # frame edge or self bound (they are the fault-free contract)
            links.append(LinkChains(index, sender, send, deliver, flits, frames, flit_slots, close_slots, first, last,
                                    geometry, faults=True, segments=program.links[index].segments, to_host=to_host))
            return deliver
        frame_edges.extend([
            FrameEdge(f"{label}: send_f >= close_f + 1", send, None, sender, close_slots, 0, 1),
            FrameEdge(f"{label}: first flit of f delivered >= send_f + accept_delay + 1", deliver, first, send, None,
                      0, accept + 1),
            FrameEdge(f"{label}: close_f >= ack_seen(f - replay_frames)", sender, close_slots, send, None,
                      geometry.replay_frames, accept + 1, geometry.message_delay, geometry.message_period),
            FrameEdge(f"{label}: send_f >= freed_seen(f - credit_frames)", send, None, deliver, last,
                      geometry.credit_frames, 1, geometry.message_delay, geometry.message_period)])
        # implied (module docstring): without back-pressure from the next chip, frame g's last flit leaves no
        # earlier than send_g + accept + 1 + (its flits - 1) * spacing (2 behind a depth-1 FIFO, rule 1; 1 into
        # the host output), so send_f >= next_message(send_g + accept + 1 + span_g + 1) + message_delay for
        # g = f - credit_frames; and send_f >= close_f + 1 >= next_message(send_g + accept + 1) + message_delay + 1
        # for g = f - replay_frames
        span = (last - first) * (2 if depth == 1 and not to_host else 1)
        period, delay = geometry.message_period, geometry.message_delay
        self_bounds.extend([
            SelfBound(f"{label}: credit round trip", send, geometry.credit_frames, accept + 2 + span, delay, period),
            SelfBound(f"{label}: ack round trip", send, geometry.replay_frames,
                      np.full(frames, accept + 1, dtype=np.int64), delay + 1, period)])
        links.append(LinkChains(index, sender, send, deliver, flits, frames, flit_slots, close_slots, first, last,
                                geometry, to_host=to_host))
        window = min(geometry.credit_frames, geometry.replay_frames)
        link_rounds = max(link_rounds, 1 + -(-frames // window))
        return deliver

    writer = add(Chain("host input", HOST, "host input", ones(program.input_words)))
    # the actions of ``writer`` that write the next FIFO (None: every action; a tile of several contexts: its last
    # context's output actions, section 4.6)
    writer_slots = None
    flits = program.input_words
    for hop in path.hops:
        # the FIFOs on the producer's chip, and after a link those on the next chip (none after a ring's return
        # link, whose delivery chain is the host output)
        segments = [(hop.chip, hop.fifos)] + ([(hop.link + 1, hop.link_fifos)] if hop.link is not None else [])
        for segment, (chip, route) in enumerate(segments):
            for k, (row, col, port) in enumerate(route):
                name = fifo_name(chip, row, col, port)
                if k + 1 < len(route):  # a router hop between every two FIFOs of the route
                    reader = add(Chain(f"{name} -> next hop", HOST, "link", ones(flits), pass_through=True))
                elif segment + 1 < len(segments):  # the chip's exit FIFO, read by the link's sender
                    writer = add_link(hop.link, flits, writer, name, to_host=hop.consumer == HOST,
                                      exit_slots=writer_slots)
                    writer_slots = None
                    continue
                elif hop.consumer == HOST:
                    reader = add(Chain("host output", HOST, "host output", ones(flits), pass_through=True))
                else:
                    reader = None
                if reader is not None:
                    fifos.append(FifoEdge(name, writer, reader, depth, write_slots=writer_slots))
                    writer, writer_slots = reader, None
        if hop.consumer == HOST:
            break
        position = hop.consumer
        count, tile = path.counts[position], program.tiles[position]
        name = f"PE {tile.key}"
        last_fifo = hop.last_fifo
        if count.contexts or count.stream_rows:   # section 4.6: several contexts (section 12: turns; a line buffer)
            input_chain, compute_chain, output_chain, writer_slots = _add_context_tile(
                add, fifos, events, name, position, tile, count, fifo_name(*last_fifo), writer, writer_slots, depth,
                ring)
            ring_rounds = max(ring_rounds, -(-sum(c.n_result_words for c in count.contexts) // ring))
            context_rounds = max(context_rounds, len(count.contexts))
            pe_chains[position] = (input_chain, compute_chain, output_chain)
            writer, flits = output_chain, count.tile_flits_out
            continue
        computes = count.n_out > 0
        queue_depth = tile.config.queue_words      # F: the tile's forward queue, a region of its SRAM
        pushes = count.push_actions()
        pushes_all = count.n_queue == count.flits_in      # every RECV word forwarded (forward = [0, K))
        input_chain = add(Chain(f"{name} input side", position, "input", ones(count.flits_in),
                                pass_through=not computes and pushes_all))
        fifos.append(FifoEdge(fifo_name(*last_fifo), writer, input_chain, depth, write_slots=writer_slots))
        writer_slots = None
        compute_chain = None
        output_delays = ones(count.flits_out)
        output_first = None
        # section 4.4: Q_f + P_bulk pops, then per pixel pass_per_pixel pops and W_px EMITs
        is_pop = count.output_is_pop()
        pop_slots = np.flatnonzero(is_pop).astype(np.int64)
        if computes:
            side = _compute_side(count, pushes, is_pop, depth, queue_depth, ring)
            ring_rounds = max(ring_rounds, -(-count.n_result_words // ring))
            compute_chain = add(Chain(f"{name} compute side", position, "compute", side.compute_delays,
                                      first_delay=1, skip=side.skip))
            output_delays, output_first = side.output_delays, side.output_first
        output_chain = add(Chain(f"{name} output side", position, "output", output_delays,
                                 first_delay=output_first, pass_through=not computes))
        if count.n_queue:
            fifos.append(FifoEdge(f"{name} forward queue", input_chain, output_chain, queue_depth,
                                  write_slots=None if pushes_all else pushes,
                                  read_slots=None if not count.n_result_words else pop_slots))
        if computes:
            # section 4, result ring: word j is pushed at a_j, readable (EMIT) from a_j + d_j + 2, and its slot
            # takes word j + R from the cycle after its EMIT
            emit_slots = np.flatnonzero(~is_pop).astype(np.int64)
            fifos.append(FifoEdge(f"{name} result ring", compute_chain, output_chain, ring,
                                  read_slots=None if not count.n_queue else emit_slots,
                                  read_offsets=side.word_issue + 2))
            events += [EventEdge(compute_chain, 0, input_chain, count.store_until - 1, 0, 1),
                       _bank_edge(input_chain, 0, compute_chain, 0, count)]
            if side.stall is not None:
                events.append(EventEdge(input_chain, side.stall[0], compute_chain, 0, 1, side.stall[1]))
        pe_chains[position] = (input_chain, compute_chain, output_chain)
        writer, flits = output_chain, count.flits_out
    return TimingGraph(chains, fifos, events, pe_chains, ring_rounds, frame_edges, links, link_rounds,
                       self_bounds, context_rounds)


def _bank_edge(input_chain: int, first_input: int, compute_chain: int, first_word: int,
               count: TileCounts, shift: int = 1) -> EventEdge:
    """The bank hand-over of one context (section 4): its first input transfer of inference ``s >= 1`` at a cycle
    ``>= c_{s-1}`` (two banks: COMPUTE of ``s - 1`` has begun, action ``first_word`` of the compute chain), or with
    one bank ``>= a_last + d_last + 2`` of ``s - 1`` (that COMPUTE has ended: its last word's first issue, its
    issues and the drain). ``shift``: chain inferences between the two (a tile's turns, section 12: the previous
    turn is in the same chain inference, ``shift = 0``, but for the first turn)."""
    if not count.single_bank:
        return EventEdge(input_chain, first_input, compute_chain, first_word, shift, 0)
    last_word = first_word + count.n_result_words - 1
    return EventEdge(input_chain, first_input, compute_chain, last_word, shift,
                     int(count.pixel_word_issue[-1]) + COMPUTE_DRAIN_CYCLES)


@dataclass(frozen=True)
class _ComputeSide:
    """What :func:`timing_graph` needs of a computing PE (see :func:`_compute_side`)."""

    word_issue: np.ndarray          # d_w of the E result words of an inference
    compute_delays: np.ndarray      # the compute chain's delays of one inference
    skip: int                       # implied c_{s+1} - c_s bound beyond the chain's own, or 0
    output_delays: np.ndarray
    output_first: int | None
    stall: tuple[int, int] | None   # (input action, offset after c_s of the inference before) or None


def _compute_side(count: TileCounts, pushes: np.ndarray, is_pop: np.ndarray, depth: int, queue_depth: int,
                  ring: int) -> _ComputeSide:
    """The compute chain of a computing PE and the delays implied by section 4's rules (module docstring).

    Compute chain, per inference, one action per result word ``w``: ``a_w - a_{w-1} >= d_{w-1}``, for
    ``w = 0`` ``d_{E-1} + 2`` (after the previous inference's last word); with a ring of one word
    (``R = 1``) ``a_j >= EMIT_{j-1} + 1 >= a_{j-1} + d_{j-1} + 3``, and on the output side ``EMIT_j >=
    a_j + d_j + 2 >= EMIT_{j-1} + d_j + 3`` where EMIT ``j`` directly follows EMIT ``j - 1``.

    ``in_gap`` / ``gap``: the least distance of consecutive input / output transfers (2 when they read /
    write a router FIFO of depth 1, rule 1). Lower bounds of the distance from ``c_s`` to the output
    transfers of ``s``: EMIT of word ``m`` ``>= S_m + d_m + 2`` (``S_m`` = the compute chain's delays
    from word 0 to word ``m``), then the output chain's delays. From them:

    * ``c_{s+1} >= input(s+1, store_until - 1) + 1 >= input(s+1, 0) + (store_until - 1) * in_gap + 1`` and
      ``input(s+1, 0) >= c_s``;
    * if ``Q > F``: push ``F`` of ``s + 1`` needs pop 0 of ``s + 1`` (output transfer 0, a pop whenever ``Q >
      0``), which follows the last output transfer of ``s`` (an EMIT): ``input(s+1, push F) >= c_s +
      last + gap + 1`` (an event edge, ``stall``), and if that push comes before the last stored word,
      ``c_{s+1}`` waits for it;
    * push ``i >= F`` of ``s`` needs pop ``i - F`` of ``s``; where that pop follows an EMIT of ``s``, the rest
      of the input side of ``s`` and the stored words of ``s + 1`` come after it.

    The largest of these ``c_{s+1} - c_s`` bounds becomes the chain's ``skip`` if it exceeds the chain's own
    per-inference delay (``I + 2`` without a one-word ring).
    """
    word_issue = count.word_issue_cycles()
    words = len(word_issue)
    in_gap = gap = 2 if depth == 1 else 1
    previous = np.roll(word_issue, 1)                       # d of the word before, per word
    compute_delays = previous.copy()
    compute_delays[0] += 2
    output_delays = np.ones(count.flits_out, dtype=np.int64)
    output_first = None
    emit_slots = np.flatnonzero(~is_pop)
    if ring == 1:
        np.maximum(compute_delays, previous + 3, out=compute_delays)
        follows = np.flatnonzero(np.diff(emit_slots) == 1) + 1          # words whose EMIT follows EMIT w - 1
        output_delays[emit_slots[follows]] = word_issue[follows] + 3
        if emit_slots[0] == 0:                    # Q = 0: EMIT 0 of s + 1 follows the last EMIT of s
            output_delays[0] = word_issue[0] + 3
            output_first = 1
    # least distance from c_s to each output transfer of s that follows an EMIT of s
    starts = np.zeros(words, dtype=np.int64)
    np.cumsum(compute_delays[1:], out=starts[1:])
    base = np.full(count.flits_out, NEVER)
    base[emit_slots] = starts + word_issue + 2
    steps = np.maximum(output_delays, gap)
    steps[0] = 0
    along = np.cumsum(steps)
    after = np.maximum.accumulate(base - along) + along
    known = np.arange(count.flits_out) >= emit_slots[0]
    last = int(after[-1])                                   # the last output transfer is an EMIT
    bounds = [(count.store_until - 1) * in_gap + 1]
    if count.single_bank:   # input(s+1, 0) >= the end of COMPUTE of s: its later words' delays, d_last and the drain
        bounds.append(int(compute_delays[1:].sum()) + int(word_issue[-1]) + COMPUTE_DRAIN_CYCLES + bounds[0])
    stall = None
    n_queue = len(pushes)
    if n_queue > queue_depth:
        stall = (int(pushes[queue_depth]), last + gap + 1)
        if stall[0] < count.store_until:
            bounds.append(stall[1] + (count.store_until - 1 - stall[0]) * in_gap + 1)
        pop_slots = np.flatnonzero(is_pop)
        waiting = pop_slots[:n_queue - queue_depth]         # pop i - F of push i, i = F..Q-1
        later = known[waiting]
        if later.any():
            reach = after[waiting[later]] + 1 + (count.flits_in - pushes[queue_depth:][later]) * in_gap
            bounds.append(int(reach.max()) + (count.store_until - 1) * in_gap + 1)
    period = int(compute_delays.sum())
    skip = max(bounds)
    return _ComputeSide(word_issue=word_issue, compute_delays=compute_delays, skip=skip if skip > period else 0,
                        output_delays=output_delays, output_first=output_first, stall=stall)


def _offsets(widths: list[int]) -> np.ndarray:
    """Where each part of a concatenation begins: ``[0, w_0, w_0 + w_1, ...]`` (one entry more than ``widths``)."""
    return np.concatenate([[0], np.cumsum(widths)]).astype(np.int64)


def _add_context_tile(add, fifos: list[FifoEdge], events: list[EventEdge], name: str, position: int, tile,
                      count: TileCounts, in_fifo: str, writer: int, writer_slots: np.ndarray | None, depth: int,
                      ring: int) -> tuple[int, int, int, np.ndarray]:
    """The chains and edges of a tile of several contexts (docs/architecture.md section 4.6): three chains whose
    actions per inference are its contexts' actions in turn order (input: context 0's ``K_0 + P_0`` transfers,
    then context 1's, ...; compute: context 0's ``E_0`` result words, then context 1's, ...; output: context 0's
    ``Q_0 + E_0`` transfers in section 4.4's order, then context 1's, ...), coupled by

    * the router FIFO before the tile (written by ``writer``'s actions ``writer_slots``), read by context 0's
      input actions only;
    * the loop-back FIFO (depth ``D``, rule 1): written by the output actions of contexts ``0 .. C' - 2``, read by
      the input actions of contexts ``1 .. C' - 1``, flit for flit in that order (context ``c``'s output stream is
      context ``c + 1``'s input stream);
    * per context ``c`` its forward queue (depth ``F_c`` = its ``queue_words``) from its pushes to its pops;
    * the one result ring (depth ``R``) from every result word (numbered over contexts and inferences in compute
      order) to its EMIT, read offsets ``d_j + 2``;
    * per context the event edges of section 4: input ``(c, s)``'s first action ``>= c_{c, s-1}`` and ``c_{c, s}
      >= input (c, s)``'s RECV word ``store_until_c - 1`` + 1;
    * the compute chain's delays: ``d`` of the word before, ``+ 2`` before the first word of every context (the
      pipeline drains between contexts as between inferences; the batch's very first word has no bound).

    A tile of several turns (``count.turns``, section 12) is built the same way from its turns (its one context's
    counts once per turn), except that every turn reads the router FIFO and writes the router (no loop-back FIFO),
    its one forward queue runs over all its turns' pushes and pops in turn order, and the bank hand-over of a turn
    follows the previous turn's COMPUTE (its inference before; the first turn's, the last turn's of the previous
    chain inference).

    The implied bounds of :func:`_compute_side` were derived for one context: a tile of several gets none of its
    skip and stall bounds (they only spare sweep rounds; the sweeps find the same least solution without them),
    only the bounds of a one-word ring (``R = 1``), which hold for any numbering of the words
    (:func:`_context_side`). Returns (input chain, compute chain, output chain, the output actions that write the
    router: the last context's, every turn's)."""
    contexts = count.per_context
    turns = count.turns > 1
    in_at = _offsets([c.flits_in for c in contexts])
    out_at = _offsets([c.flits_out for c in contexts])
    word_at = _offsets([c.n_result_words for c in contexts])
    is_pop = np.concatenate([c.output_is_pop() for c in contexts])
    word_issue = np.concatenate([c.word_issue_cycles() for c in contexts])
    first_words = word_at[:-1]
    delays, output_delays, output_first = _context_side(word_issue, first_words, is_pop, ring)
    input_chain = add(Chain(f"{name} input side", position, "input", np.ones(int(in_at[-1]), dtype=np.int64)))
    fifos.append(FifoEdge(in_fifo, writer, input_chain, depth, write_slots=writer_slots,
                          read_slots=np.arange(in_at[-1] if turns else in_at[1], dtype=np.int64)))
    compute_chain = add(Chain(f"{name} compute side", position, "compute", delays, first_delay=1))
    output_chain = add(Chain(f"{name} output side", position, "output", output_delays, first_delay=output_first))
    queues = [([], [], config.queue_words) for config in tile.contexts]   # per queue: pushes, pops, depth
    for index, context in enumerate(contexts):
        pushes = context.push_actions()
        pops = np.flatnonzero(context.output_is_pop()).astype(np.int64)
        queue = queues[0 if turns else index]
        queue[0].append(pushes + in_at[index])
        queue[1].append(pops + out_at[index])
    for index, (pushes, pops, queue_words) in enumerate(queues):
        if sum(len(p) for p in pushes):
            fifos.append(FifoEdge(f"{name} {'' if turns else f'context {index} '}forward queue", input_chain,
                                  output_chain, queue_words, write_slots=np.concatenate(pushes),
                                  read_slots=np.concatenate(pops)))
    if not turns and len(contexts) > 1:
        fifos.append(FifoEdge(f"{name} loop-back FIFO", output_chain, input_chain, depth,
                              write_slots=np.arange(out_at[-2], dtype=np.int64),
                              read_slots=np.arange(in_at[1], in_at[-1], dtype=np.int64)))
    fifos.append(FifoEdge(f"{name} result ring", compute_chain, output_chain, ring,
                          read_slots=np.flatnonzero(~is_pop).astype(np.int64), read_offsets=word_issue + 2))
    if count.stream_rows:   # a line buffer's row edges replace the store-until and bank edges (one context, turns)
        events += _stream_edges(input_chain, compute_chain, contexts[0], in_at[:-1], word_at[:-1])
    else:
        for index, context in enumerate(contexts):
            events.append(EventEdge(compute_chain, int(word_at[index]), input_chain,
                                    int(in_at[index] + context.recv_actions()[context.store_until - 1]), 0, 1))
            if turns:   # the previous turn is this tile's inference before (the last turn of the previous chain inference)
                previous = (index - 1) % len(contexts)
                events.append(_bank_edge(input_chain, int(in_at[index]), compute_chain, int(word_at[previous]), context,
                                         shift=0 if index else 1))
            else:
                events.append(_bank_edge(input_chain, int(in_at[index]), compute_chain, int(word_at[index]), context))
    router = np.arange(0 if turns else out_at[-2], out_at[-1], dtype=np.int64)
    return input_chain, compute_chain, output_chain, router


def _stream_edges(input_chain: int, compute_chain: int, count: TileCounts, in_at: np.ndarray,
                  word_at: np.ndarray) -> list[EventEdge]:
    """A line buffer's event edges (section 4, "Streaming rows"; one context, ``R = stream_rows``, ``H`` map rows of
    ``W`` words from RECV word ``store_begin``), for a tile whose chains run ``T`` inferences of it per chain inference
    (its turns, section 12; ``T = 1`` otherwise), turn ``t``'s input actions from ``in_at[t]`` and result words from
    ``word_at[t]``; its rows are numbered over the turns, ``(s T + t) H + y``:

    * the first word of output row ``r`` issues after RECV of the last word of the last input row it reads:
      ``a >= t(RECV store_begin + (last + 1) W - 1) + 1``;
    * input row ``y``'s first word is stored only after its slot's previous row, ``R`` rows earlier (of a turn
      ``ceil((R - t H - y) / (T H))`` chain inferences back if that is negative within this one), was released: the
      cycle after the first issue of the first output row whose rows all lie above it, or at the end of that COMPUTE
      (``a_last + d_last + 2``) if none does.
    """
    rows, words, height = count.stream_rows, count.row_words, count.in_height
    starts, spans = count.output_row_words, count.output_row_inputs
    last_word = count.n_result_words - 1
    end_offset = int(count.pixel_word_issue[-1]) + COMPUTE_DRAIN_CYCLES
    recv = count.recv_actions()         # RECV word k is input action recv[k] (rows interleaved with PASS words)
    turns = len(in_at)
    edges = [EventEdge(compute_chain, int(word_at[t]) + first_word, input_chain,
                       int(in_at[t] + recv[count.store_begin + (last + 1) * words - 1]), 0, 1)
             for t in range(turns) for first_word, (_, last) in zip(starts, spans)]
    per_chain = turns * height                                  # rows of one chain inference
    for t in range(turns):
        for y in range(height):
            old = t * height + y - rows                         # the row that held the slot before
            shift = 0 if old >= 0 else -(old // per_chain)      # chain inferences back
            old_turn, old_row = divmod(old + shift * per_chain, height)
            releaser = next((first_word for first_word, (first, _) in zip(starts, spans) if first > old_row), None)
            first_stored = int(in_at[t] + recv[count.store_begin + y * words])
            if releaser is None:
                edges.append(EventEdge(input_chain, first_stored, compute_chain, int(word_at[old_turn]) + last_word,
                                       shift, end_offset))
            else:
                edges.append(EventEdge(input_chain, first_stored, compute_chain, int(word_at[old_turn]) + releaser,
                                       shift, 1))
    return edges


def _context_side(word_issue: np.ndarray, first_words: np.ndarray, is_pop: np.ndarray,
                  ring: int) -> tuple[np.ndarray, np.ndarray, int | None]:
    """The compute chain's delays of a tile of several contexts (``word_issue``: ``d`` of every result word of an
    inference in compute order; ``first_words``: each context's first word), and its output chain's delays and
    first delay (``is_pop``: its output actions of an inference, pops or EMITs in order).

    ``a_j - a_{j-1} >= d_{j-1}``, ``+ 2`` where ``j`` is a context's first word (section 4.6). With a ring of one
    word (``R = 1``) the bounds of :func:`_compute_side` hold as they are, the ring's words being numbered in compute
    (= emit) order whatever their context: ``a_j >= EMIT_{j-1} + 1 >= a_{j-1} + d_{j-1} + 3``, and ``EMIT_j >= a_j +
    d_j + 2 >= EMIT_{j-1} + d_j + 3`` where EMIT ``j`` directly follows EMIT ``j - 1`` in the output chain (also
    across contexts and, when the first output action is an EMIT, across inferences: the last output action of an
    inference is always an EMIT of its last context)."""
    previous = np.roll(word_issue, 1)
    delays = previous.copy()
    delays[first_words] += COMPUTE_DRAIN_CYCLES
    output_delays = np.ones(len(is_pop), dtype=np.int64)
    output_first = None
    if ring == 1:
        np.maximum(delays, previous + 3, out=delays)
        emit_slots = np.flatnonzero(~is_pop)
        follows = np.flatnonzero(np.diff(emit_slots) == 1) + 1
        output_delays[emit_slots[follows]] = word_issue[follows] + 3
        if emit_slots[0] == 0:
            output_delays[0] = word_issue[0] + 3
            output_first = 1
    return delays, output_delays, output_first


def _space_one_apart(delays: np.ndarray, slots: np.ndarray | None) -> bool:
    """With a FIFO of depth 1, consecutive transfers on one side of it are >= 2 cycles apart.

    Rule 1 implies it (``w_i >= r_{i-1} + 1 >= w_{i-1} + 2`` and ``r_i >= w_i + 1 >= r_{i-1} + 2``),
    so adding it to back-to-back actions (``d >= 2``) leaves the solution unchanged; it lets one
    chain solve see the half rate that would otherwise take a sweep round per flit to emerge.

    ``delays`` are one inference's (changed in place), ``slots`` that inference's actions on this FIFO side
    (None: all). Returns whether the first action of every later inference follows the last slot of the
    inference before it (then its ``d`` is raised too, but not the batch's very first action's).
    """
    n = len(delays)
    if slots is None:
        np.maximum(delays[1:], 2, out=delays[1:])
        return n > 0
    follows = slots[1:][np.diff(slots) == 1]
    delays[follows] = np.maximum(delays[follows], 2)
    return len(slots) > 0 and slots[0] == 0 and slots[-1] == n - 1


def _spaced_delays(graph: TimingGraph) -> list[tuple[np.ndarray, int | None]]:
    """Per chain, ``(delays of one inference, d of the batch's first action or None)`` with the depth-1
    spacing of :func:`_space_one_apart` built in."""
    result = []
    spaced = [(c.delays.copy(), c.first_delay) for c in graph.chains]
    for fifo in graph.fifos:
        if fifo.depth != 1:
            continue
        for chain, slots in ((fifo.writer, fifo.write_slots), (fifo.reader, fifo.read_slots)):
            delays, first = spaced[chain]
            original = int(delays[0]) if len(delays) else 0
            if _space_one_apart(delays, slots) and delays[0] < 2:
                delays[0] = 2
                spaced[chain] = (delays, original if first is None else first)
    for delays, first in spaced:
        result.append((delays, None if first is None or (len(delays) and first == delays[0]) else first))
    return result


def _tile_slots(slots: np.ndarray | None, per_inference: int, batch: int) -> np.ndarray | None:
    if slots is None:
        return None
    return (slots[None, :] + per_inference * np.arange(batch, dtype=np.int64)[:, None]).ravel()


def _edge_skeleton(graph: TimingGraph, solved: int, batch: int):
    """What both sweep systems take from the FIFO and event edges of chains ``0..solved-1``: the FIFOs with both
    ends solved; per writer into the pass-through tail its write slots over the batch (None: every action); per
    chain its event edges; per chain the chains its times constrain (FIFO edges both ways, events forward)."""
    events_into: list[list[EventEdge]] = [[] for _ in range(solved)]
    dependents: list[set[int]] = [set() for _ in range(solved)]
    writes_of: dict[int, np.ndarray | None] = {}
    fifos = []
    for fifo in graph.fifos:
        if fifo.writer >= solved:
            continue
        if fifo.reader >= solved:
            writes_of[fifo.writer] = _tile_slots(fifo.write_slots, graph.chains[fifo.writer].per_inference, batch)
            continue
        fifos.append(fifo)
        dependents[fifo.writer].add(fifo.reader)
        dependents[fifo.reader].add(fifo.writer)
    for event in graph.events:
        events_into[event.target].append(event)
        dependents[event.source].add(event.target)
    return fifos, writes_of, events_into, dependents


class _ChainSystem:
    """The coupled chains ``0..solved-1`` of one batch size, with their current times.

    Chains from ``solved`` on form the pass-through tail: FIFOs they read never hold their writer back,
    so their constraints are left out (only the depth-1 spacing of the writer stays, which rule 1 implies).
    """

    def __init__(self, graph: TimingGraph, solved: int, batch: int, *, times: list[np.ndarray] | None = None,
                 spaced: list[tuple[np.ndarray, int | None]] | None = None, gates: dict[int, Gate] | None = None):
        self.graph, self.solved, self.batch = graph, solved, batch
        # gated host chains (d = 1 for every action, no event edge, no skip): solved in on-cycle indices
        self.gates = {j: gate for j, gate in (gates or {}).items() if j < solved}
        self.gated_flits = sum(batch * graph.chains[j].per_inference for j in self.gates)
        chains = graph.chains[:solved]
        self.sizes = [batch * c.per_inference for c in chains]
        # per chain: (writer times index, global write slots or None, own global read slots or None, read offset
        # - 1 per flit or None)
        self.reads_from: list[list[tuple[int, np.ndarray | None, np.ndarray | None, np.ndarray | None]]] = \
            [[] for _ in chains]
        # per chain: (reader index, reader's global read slots[:-depth] or None, own write slots[depth:] or None, depth)
        self.space_from: list[list[tuple[int, np.ndarray | None, np.ndarray | None, int]]] = [[] for _ in chains]
        fifos, self.writes_of, self.events_into, dependents = _edge_skeleton(graph, solved, batch)
        for fifo in fifos:
            writes = _tile_slots(fifo.write_slots, graph.chains[fifo.writer].per_inference, batch)
            reads = _tile_slots(fifo.read_slots, graph.chains[fifo.reader].per_inference, batch)
            extra = None if fifo.read_offsets is None else np.tile(fifo.read_offsets - 1, batch)
            self.reads_from[fifo.reader].append((fifo.writer, writes, reads, extra))
            source = None if reads is None else reads[:-fifo.depth]
            target = None if writes is None else writes[fifo.depth:]
            self.space_from[fifo.writer].append((fifo.reader, source, target, fifo.depth))
        # per chain: (frame edge, the source's global slots or None, own global target slots[shift:] or None)
        self.frames_into: list[list[tuple[FrameEdge, np.ndarray | None, np.ndarray | None]]] = [[] for _ in chains]
        for edge in graph.frame_edges:
            if edge.target >= solved or edge.source >= solved:  # links end before the last chip: never in the tail
                raise AssertionError(f"frame edge {edge.name} reaches into the pass-through tail")
            sources = _tile_slots(edge.source_slots, graph.chains[edge.source].per_inference, batch)
            targets = _tile_slots(edge.target_slots, graph.chains[edge.target].per_inference, batch)
            self.frames_into[edge.target].append((edge, sources, None if targets is None else targets[edge.shift:]))
            dependents[edge.source].add(edge.target)
        # per chain: its implied bounds on itself (SelfBound), ``before`` over the whole batch
        self.self_bounds: dict[int, list[tuple[int, np.ndarray, int, int]]] = {}
        for bound in graph.self_bounds:
            if bound.chain < solved:
                self.self_bounds.setdefault(bound.chain, []).append(
                    (bound.shift, np.tile(bound.before, batch), bound.after, bound.period))
        # links with faults: their three chains are one simulation (emulator/link_faults.py), re-run when the bounds
        # it reads change (chip k's exit FIFO writes, chip k + 1's input FIFO reads); each chain's solve returns its
        # part of the latest run
        self.faulty: dict[int, LinkChains] = {}
        self.link_runs: dict[int, tuple] = {}     # link index -> (key, {chain: times}, LinkRun)
        self.link_flips: dict[int, tuple] = {}
        self.link_checkpoints: dict[int, object] = {}   # link index -> emulator.link_faults.Checkpoints
        for link in graph.links:
            if not link.faults:
                continue
            group = {link.sender, link.send, link.deliver}
            if max(group) >= solved:  # pragma: no cover - links end before the last chip's host input
                raise AssertionError(f"link {link.index} reaches into the pass-through tail")
            for j in group:
                self.faulty[j] = link
                dependents[j] |= group - {j}
        self.dependents = [sorted(d) for d in dependents]
        # a tile's chains, solved together to their fixed point when one of them is due (sweep_until_stable)
        self.tile_chains: dict[int, tuple[int, ...]] = {}
        for tile in graph.pe_chains.values():
            members = tuple(j for j in tile if j is not None and j < solved)
            if len(members) > 1:
                self.tile_chains.update((j, members) for j in members)
        self.cumulative = []
        inferences = np.arange(batch, dtype=np.int64)[:, None]
        for delays, first in (spaced if spaced is not None else _spaced_delays(graph))[:solved]:
            per_inference = np.cumsum(delays)
            cumulative = (inferences * per_inference[-1] + per_inference).ravel()
            if first is not None:
                cumulative -= delays[0] - first
            self.cumulative.append(cumulative)
        # C - 1 per chain for systems that sweep (many solves); a system built around given times is solved once
        # per chain (the exactness check), where subtracting C and adding 1 in place is cheaper than a copy
        self.cumulative_less_one = [c - 1 for c in self.cumulative] if times is None else None
        # chains with a skip (Chain.skip): (actions per inference, skip - the chain's delay per inference)
        self.skips: list[tuple[int, int] | None] = []
        for chain, (delays, _) in zip(chains, spaced if spaced is not None else _spaced_delays(graph)):
            excess = chain.skip - int(delays.sum()) if chain.skip else 0
            self.skips.append((len(delays), excess) if excess > 0 else None)
        self.steps = {j: np.arange(batch, dtype=np.int64) * skip[1] for j, skip in enumerate(self.skips) if skip}
        self.times = times if times is not None else [np.full(n, NEVER) for n in self.sizes]

    def warm_start(self, prefix: list[np.ndarray]) -> None:
        """Start from exact times of the first inferences (a lower bound of the solution)."""
        for times, known in zip(self.times, prefix):
            times[: len(known)] = known

    def solution(self) -> list[np.ndarray]:
        return list(self.times)

    def solve_chain(self, j: int) -> np.ndarray:
        """Times of chain ``j`` given the others': ``t_k = max(lb_k, t_{k-1} + d_k)``, ``t_{-1} = -1``,
        i.e. ``t = C + cummax(max(lb - C, -1))``.

        Every FIFO bound is ``(a time) + 1``: the maximum ``M`` of those times is taken first and
        ``lb - C = M - (C - 1)``; an event bound ``t + offset`` enters ``M`` as ``t + offset - 1``. The ``-1``
        floor only matters through the prefix maximum, so it is applied to the first element alone."""
        if j in self.faulty:   # a ring's return link: its (gated) delivery chain is part of the link's simulation
            return self._solve_faulty_link(self.faulty[j], j)
        if j in self.gates:
            return self._solve_gated(j)
        lower = self._latest(j)
        if j in self.self_bounds:
            return self._solve_self_bounded(j, lower)
        return self._scan(j, lower)

    def _solve_faulty_link(self, link: LinkChains, j: int) -> np.ndarray:
        """Chain ``j`` of a link with faults: simulate the link (:func:`emulator.link_faults.simulate_link`) with
        chip ``k`` offering flit ``i`` from its exit FIFO write + 1 and chip ``k + 1``'s input FIFO taking it from
        the read that frees its slot + 1 (the bounds the other chains put on the sender and delivery chains now),
        unless those bounds are the last run's."""
        width = link.flits + link.frames
        flit_slots = _tile_slots(link.flit_slots, width, self.batch)
        close_slots = _tile_slots(link.close_slots, width, self.batch)
        offers = self._latest(link.sender)[flit_slots] + 1
        rooms = self._latest(link.deliver) + 1
        key = (offers.tobytes(), rooms.tobytes())
        last = self.link_runs.get(link.index)
        if last is None or last[0] != key:
            run = self._simulate(link, offers, rooms)
            sender = np.empty(width * self.batch, dtype=np.int64)
            sender[flit_slots] = run.accept
            sender[close_slots] = run.close
            last = self.link_runs[link.index] = (key, {link.sender: sender, link.send: run.send,
                                                       link.deliver: run.deliver}, run)
        return last[1][j].copy()

    def _simulate(self, link: LinkChains, offers: np.ndarray, rooms: np.ndarray, end: int | None = None):
        from .link_faults import ChannelFlips, Checkpoints, LinkSimulationError, simulate_link
        arch = link.geometry.arch
        flips = self.link_flips.get(link.index)
        if flips is None:
            self.link_checkpoints[link.index] = Checkpoints()
            seed = link_seed(arch.link_error_seed, link.index)
            flips = self.link_flips[link.index] = tuple(
                ChannelFlips(s, link.geometry.bits, arch.link_error_rate, arch.link_burst_cycles)
                for s in (seed, ret_seed(seed)))
        try:
            # into a depth-1 FIFO deliveries are >= 2 cycles apart (rule 1); said explicitly because the FIFO's reader
            # may be in the pass-through tail, whose space bound is left out (_pass_through_tail). A ring's return
            # link delivers to the host output (no FIFO), in the cycles a host pattern lets it take a flit.
            depth = next((f.depth for f in self.graph.fifos if f.writer == link.deliver), None)
            gate = self.gates.get(link.deliver)
            run = simulate_link(link.geometry, link.flits, np.maximum(offers, 0), np.maximum(rooms, 0),
                                segments=link.segments, fwd=flips[0], ret=flips[1], end=end,
                                checkpoints=self.link_checkpoints[link.index], deliver_gap=2 if depth == 1 else 1,
                                deliver_ready=None if gate is None else gate.bits)
        except LinkSimulationError as error:
            raise TimingError(f"link {link.index}: {error}") from None
        if run.counters["undetected"]:
            raise TimingError(f"link {link.index}: a corrupted frame passed its CRC-32 (an undetected error in the "
                              f"hardware too; the emulator does not model its data)")
        return run

    def link_counters(self, end: int) -> dict[int, object]:
        """Per faulty link, its run through cycle ``end`` (counters as they stand after it), from the solved
        bounds."""
        runs = {}
        for link in {id(link): link for link in self.faulty.values()}.values():
            width = link.flits + link.frames
            flit_slots = _tile_slots(link.flit_slots, width, self.batch)
            offers = self._latest(link.sender)[flit_slots] + 1
            rooms = self._latest(link.deliver) + 1
            runs[link.index] = self._simulate(link, offers, rooms, end=end)
        return runs

    def _scan(self, j: int, lower: np.ndarray) -> np.ndarray:
        """In place: the times of chain ``j`` from ``lower`` = ``lb - 1`` (:meth:`_latest`)."""
        if self.cumulative_less_one is None:
            lower -= self.cumulative[j]
            lower += 1
        else:
            lower -= self.cumulative_less_one[j]
        if len(lower) and lower[0] < -1:
            lower[0] = -1
        skip = self.skips[j]
        if skip is None:
            np.maximum.accumulate(lower, out=lower)
        else:
            self._skip_scan(lower, skip[0], self.steps[j])
        lower += self.cumulative[j]
        return lower

    def _solve_self_bounded(self, j: int, lower: np.ndarray) -> np.ndarray:
        """A chain with implied bounds on itself (:class:`SelfBound`): the plain solve, and if it breaks one of
        them, from the first broken action on ``t_k = max(lb_k, t_{k-1} + d_k, bounds on t_{k - shift})`` one action
        at a time (actions before it are final: the bounds reach forward only)."""
        bounds = self.self_bounds[j]
        times = self._scan(j, lower.copy())
        size, first = len(times), None
        for shift, before, after, period in bounds:
            if size > shift:
                need = next_message(times[:-shift] + before[:size - shift], period) + after
                broken = np.flatnonzero(need > times[shift:])
                if broken.size and (first is None or broken[0] + shift < first):
                    first = int(broken[0]) + shift
        if first is None:
            return times
        cumulative = self.cumulative[j]
        steps = np.diff(cumulative[first - 1:]).tolist()        # d_k for k = first..size-1 (first >= shift >= 1)
        lows = (lower[first:] + 1).tolist()
        values = times.tolist()
        sources = [(shift, before.tolist(), after, period) for shift, before, after, period in bounds]
        previous = values[first - 1]
        for k in range(first, size):
            value = max(lows[k - first], previous + steps[k - first])
            for shift, before, after, period in sources:
                if k >= shift:
                    x = max(values[k - shift] + before[k - shift], 0)
                    value = max(value, -(-x // period) * period + after)
            values[k] = previous = value
        return np.array(values, dtype=np.int64)

    def _latest(self, j: int) -> np.ndarray:
        """``lb - 1`` for every action of chain ``j``: the latest write into the FIFO it reads (rule 1: readable
        the cycle after), the latest freeing of its slot in the FIFO it writes, event bounds ``t + offset - 1``."""
        times, size = self.times, self.sizes[j]
        lower = None
        for writer, writes, reads, extra in self.reads_from[j]:  # rule 1: readable the cycle after its write
            written = times[writer] if writes is None else times[writer][writes]
            fresh = writes is not None              # a new array (fancy indexing), no copy needed
            if extra is not None:   # the result ring: EMIT of word j from a_j + d_j + 2
                written, fresh = written + extra, True
            if reads is None:
                if lower is None:
                    lower = written if fresh else written.copy()
                else:
                    np.maximum(lower, written, out=lower)
            else:
                if lower is None:
                    lower = np.full(size, NEVER)
                lower[reads] = np.maximum(lower[reads], written)
        if lower is None:
            lower = np.full(size, NEVER)
        for reader, source, target, depth in self.space_from[j]:  # rule 1: flit i takes the slot flit i-depth freed
            if target is None:
                if size > depth:
                    np.maximum(lower[depth:], times[reader][:-depth] if source is None else times[reader][source],
                               out=lower[depth:])
            elif len(target):
                lower[target] = np.maximum(lower[target],
                                           times[reader][:-depth] if source is None else times[reader][source])
        width, batch = self.graph.chains[j].per_inference, self.batch
        for event in self.events_into[j]:
            source_width = self.graph.chains[event.source].per_inference
            bound = times[event.source][event.source_slot::source_width][:batch - event.shift] + (event.offset - 1)
            view = lower[event.shift * width + event.target_slot::width]
            np.maximum(view, bound, out=view)
        for edge, sources, targets in self.frames_into[j]:  # a link's frame edges (FrameEdge)
            source = times[edge.source] if sources is None else times[edge.source][sources]
            count = len(source) - edge.shift
            if count <= 0:
                continue
            bound = source[:count] + edge.before
            if edge.period:   # next_message, in place
                np.maximum(bound, 0, out=bound)
                bound += edge.period - 1
                bound //= edge.period
                bound *= edge.period
            bound += edge.after - 1
            if targets is None:
                view = lower[edge.shift:]
                np.maximum(view, bound, out=view)
            else:
                lower[targets] = np.maximum(lower[targets], bound)
        return lower

    def _solve_gated(self, j: int) -> np.ndarray:
        """A gated host chain (:class:`Gate`): ``k = cummax(rank(lb) - i) + i`` in on-cycle indices, ``t = C[k]``
        (``t_{-1} = -1`` makes ``t_0 >= 0``, which ``rank`` already ensures)."""
        gate = self.gates[j]
        ranks = gate.rank(self._latest(j) + 1)
        steps = np.arange(len(ranks), dtype=np.int64)
        ranks -= steps
        np.maximum.accumulate(ranks, out=ranks)
        ranks += steps
        return gate.cycle(ranks)

    def _skip_scan(self, lower: np.ndarray, width: int, steps: np.ndarray) -> None:
        """In place: ``v = cummax(u)`` (``u = lb - C``, ``t = C + v``) with, in addition, ``v(s, 0) >= v(s - 1, 0)
        + excess`` (``excess`` = the chain's skip minus its delay per inference, > 0; ``steps = s * excess``).

        Two levels: the first action of ``s`` is ``h_s = max(U_s, h_{s-1} + excess)`` with ``U_s = max(u(s, 0),
        max_{k >= 1} u(s - 1, k))`` (the previous inference's last action is ``max(h_{s-1}, that max)``, and
        ``excess > 0`` makes ``h_{s-1} + excess`` dominate ``h_{s-1}``), a closed-form scan over inferences;
        then each inference is a plain prefix maximum from ``h_s``."""
        rows = lower.reshape(-1, width)
        first = rows[:, 0].copy()
        if width > 1:
            np.maximum(first[1:], rows[:-1, 1:].max(axis=1), out=first[1:])
        first -= steps
        np.maximum.accumulate(first, out=first)
        first += steps
        rows[:, 0] = first
        np.maximum.accumulate(rows, axis=1, out=rows)

    def sweep_until_stable(self) -> tuple[int, int]:
        """Gauss-Seidel sweeps, downstream then upstream, re-solving only chains a changed chain
        constrains, until no time changes; returns (sweep rounds, chain solves)."""
        n = self.solved
        max_rounds = max(ROUNDS_MINIMUM, ROUNDS_PER_INFERENCE * (self.batch + n) * self.graph.ring_rounds
                         * self.graph.link_rounds * self.graph.context_rounds)
        # a stalled host output behind full FIFOs can take a round per stall that holds the chip back
        max_rounds += 2 * self.gated_flits
        dirty = [True] * n
        solves = 0
        budget = 2 * n * max_rounds     # the solves of max_rounds sweep rounds
        times = self.times
        downstream, upstream = range(n), range(n - 1, -1, -1)

        def solve(j: int) -> None:
            dirty[j] = False
            new = self.solve_chain(j)
            if (new != times[j]).any():
                times[j] = new
                for k in self.dependents[j]:
                    dirty[k] = True

        for rounds in range(1, max_rounds + 1):
            for order in (downstream, upstream):
                for j in order:
                    if not dirty[j]:
                        continue
                    # A tile's input, compute and output chains bound each other around loops (the bank hand-over, the
                    # queue, the ring; with contexts the loop-back FIFO, once per context): settle them together
                    # before going on, instead of a sweep round per lap. Any order of solves that stops when none
                    # changes reaches the same least solution (times only rise), so this is exact; a tile whose
                    # chains keep rising (a deadlock) runs into the rounds' budget of solves, which reports it.
                    tile = self.tile_chains.get(j, ())
                    due = [j]
                    while due and solves <= budget:
                        for k in due:
                            solves += 1
                            solve(k)
                        due = [k for k in tile if dirty[k]]
            if not any(dirty):
                return rounds, solves
            if solves > budget:
                break
        stuck = [self.graph.chains[j].name for j in range(n) if dirty[j]]
        raise TimingError(f"timing did not converge after {max_rounds} sweep rounds (batch {self.batch}): "
                          f"a deadlock or a model bug; still changing: {', '.join(stuck[:4])}"
                          + (f" and {len(stuck) - 4} more" if len(stuck) > 4 else ""))

    def is_exact(self) -> bool:
        """Whether the current times satisfy every chain's recurrence with equality (Jacobi check)."""
        return all(np.array_equal(self.solve_chain(j), self.times[j]) for j in range(self.solved))


#: Index arrays of a window up to this size are kept for the next window of as many inferences.
CACHED_INDEX_ELEMENTS = 1 << 18


def _carry_scan(block: np.ndarray, cumulative: np.ndarray, carry: int) -> int:
    """In place, one block of a chain continued from the block before: ``block`` holds ``lb - 1`` and becomes ``t =
    C + cummax(max(lb - C, carry))`` (``C``: ``cumulative``, the block's cumulative delays); returns the carry for
    the next block (``carry`` unchanged for an empty block)."""
    block -= cumulative
    block += 1
    if len(block):
        if block[0] < carry:
            block[0] = carry
        np.maximum.accumulate(block, out=block)
        carry = int(block[-1])
    block += cumulative
    return carry


def _raise_to(lower: np.ndarray, bounds) -> np.ndarray:
    """``lower`` raised, in place, to every ``(target, values, _)`` of ``bounds``: a slice view (strided, no
    repeats) or an index array of ``lower``, and the values there."""
    for target, values, _ in bounds:
        if isinstance(target, slice):
            view = lower[target]
            np.maximum(view, values, out=view)
        else:
            lower[target] = np.maximum(lower[target], values)
    return lower


class _WindowSystem:
    """The chains ``0..solved-1`` of a whole batch solved window by window: inferences ``[lo, hi)`` are swept to
    their fixed point while every earlier inference is final (a prefix of inferences is a closed subsystem, module
    docstring), so each sweep round costs the window's actions only, not the whole batch's. The same Gauss-Seidel
    sweeps as :class:`_ChainSystem` on the same recurrences; used for programs without links, self bounds or
    host gates (those take :class:`_ChainSystem`'s whole-batch sweeps).

    A chain's solve over a window is the max-plus scan of :meth:`_ChainSystem._scan` started from the chain's
    time just before the window (``t_{k0 - 1}``, final), i.e. ``u[0] >= t_{k0-1} - C_{k0-1}``; a compute chain's
    skip likewise starts from its first action of inference ``lo - 1``."""

    def __init__(self, graph: TimingGraph, solved: int, batch: int,
                 spaced: list[tuple[np.ndarray, int | None]]):
        self.graph, self.solved, self.batch = graph, solved, batch
        chains = graph.chains[:solved]
        self.widths = [c.per_inference for c in chains]
        # times of the inferences before the window being swept; from there on unset (sweep_window starts each
        # window from "no constraint yet")
        self.times = [np.empty(batch * w, dtype=np.int64) for w in self.widths]
        # per chain: per-inference cumulative delays, their sum, the first-action adjustment
        self.delays = []
        self.skips: list[int] = []
        for chain, (delays, first) in zip(chains, spaced[:solved]):
            cs = np.cumsum(delays)
            period = int(cs[-1]) if len(cs) else 0
            adjust = int(delays[0] - first) if first is not None else 0
            self.delays.append((cs, period, adjust))
            excess = chain.skip - int(delays.sum()) if chain.skip else 0
            self.skips.append(excess if excess > 0 else 0)
        # FIFO edges: (writer, reader, flits per inference, write slots, read slots, read offsets - 1, depth)
        self.reads_from: list[list[tuple]] = [[] for _ in chains]
        self.space_from: list[list[tuple]] = [[] for _ in chains]
        fifos, self.writes_of, self.events_into, dependents = _edge_skeleton(graph, solved, batch)
        for fifo in fifos:
            flits = len(fifo.write_slots) if fifo.write_slots is not None else self.widths[fifo.writer]
            extra = None if fifo.read_offsets is None else fifo.read_offsets - 1
            edge = (fifo.writer, fifo.reader, flits, fifo.write_slots, fifo.read_slots, extra, fifo.depth)
            self.reads_from[fifo.reader].append(edge)
            self.space_from[fifo.writer].append(edge)
        self.dependents = [sorted(d) for d in dependents]
        self._cache: dict = {}
        self.seen: list[bool] | None = None   # during a window's sweeps: which chains it has solved
        # a computing PE's compute and output chains, coupled through its result ring once per ring turn: solved
        # together (sweep_window) so that a round does not end after one turn
        self.ring_pair: dict[int, tuple[int, int]] = {}
        for _, compute, output in graph.pe_chains.values():
            if compute is not None and output < solved:
                self.ring_pair[compute] = self.ring_pair[output] = (compute, output)

    # --- index arrays of a window of n inferences, relative to its start (the same for every window of n) ---

    def _slots(self, slots: np.ndarray, width: int, n: int) -> np.ndarray:
        key = ("slots", id(slots), width, n)
        found = self._cache.get(key)
        if found is None:
            found = (slots[None, :] + width * np.arange(n, dtype=np.int64)[:, None]).ravel()
            if len(found) <= CACHED_INDEX_ELEMENTS:
                self._cache[key] = found
        return found

    def _tiled(self, values: np.ndarray, n: int) -> np.ndarray:
        key = ("tile", id(values), n)
        found = self._cache.get(key)
        if found is None:
            found = np.tile(values, n)
            if len(found) <= CACHED_INDEX_ELEMENTS:
                self._cache[key] = found
        return found

    def _space_sources(self, edge: tuple, n: int) -> np.ndarray:
        """Reader action (relative to the window's first reader action, maybe negative) that frees the slot of
        each flit of the window: flit ``f - depth``, i.e. for flit ``s * flits + k`` of the window ``s`` reader
        widths after that of flit ``k``."""
        key = ("space", id(edge), n)
        found = self._cache.get(key)
        if found is None:
            _, reader, flits, _, read_slots, _, depth = edge
            if n == 1:
                x = np.arange(flits, dtype=np.int64) - depth
                if read_slots is None:
                    found = x
                else:
                    turns, within = np.divmod(x, flits)
                    found = turns * self.widths[reader] + read_slots[within]
            else:
                one = self._space_sources(edge, 1)
                found = (one[None, :] + self.widths[reader] * np.arange(n, dtype=np.int64)[:, None]).ravel()
            if n == 1 or n * flits <= CACHED_INDEX_ELEMENTS:
                self._cache[key] = found
        return found

    def _cumulative(self, j: int, lo: int, hi: int) -> np.ndarray:
        """``C`` of chain ``j`` for actions ``[lo * w - 1, hi * w)`` (the action before the window first; for
        ``lo = 0`` that entry is unused)."""
        cs, period, adjust = self.delays[j]
        w = self.widths[j]
        n = hi - lo
        out = np.empty(n * w + 1, dtype=np.int64)
        body = out[1:].reshape(n, w)
        np.add(np.arange(lo, hi, dtype=np.int64)[:, None] * period, cs[None, :], out=body)
        out[0] = lo * period            # C of the inference before's last action (unused for lo = 0)
        out -= adjust
        return out

    def _bounds(self, j: int, lo: int, hi: int, source: int | None = None, exclude: int | None = None):
        """The lower bounds on chain ``j``'s actions of inferences ``[lo, hi)``, edge by edge (of every edge, or
        of those from chain ``source``): ``(target, values, fresh)`` with ``values`` = ``lb - 1`` of the actions
        ``target`` (a slice or an index array, relative to the window) and ``fresh`` whether ``values`` is a new
        array (:meth:`_ChainSystem._latest`: a FIFO read is bounded by the write + 1, a write by the read that
        freed its slot + 1, an event target by its source + offset)."""
        times, w, seen = self.times, self.widths[j], self.seen
        n = hi - lo
        for writer, _, flits, write_slots, read_slots, extra, _ in self.reads_from[j]:
            if (source is not None and writer != source) or writer == exclude or (seen and not seen[writer]):
                continue
            if write_slots is None:
                written, fresh = times[writer][lo * flits:hi * flits], False
            else:
                ww = self.widths[writer]
                written, fresh = times[writer][lo * ww:hi * ww][self._slots(write_slots, ww, n)], True
            if extra is not None:   # the result ring: EMIT of word j from a_j + d_j + 2
                written, fresh = written + self._tiled(extra, n), True
            yield (slice(None) if read_slots is None else self._slots(read_slots, w, n)), written, fresh
        for edge in self.space_from[j]:   # rule 1: flit f takes the slot flit f - depth freed
            _, reader, flits, write_slots, read_slots, _, depth = edge
            if (source is not None and reader != source) or reader == exclude or (seen and not seen[reader]):
                continue
            skip = max(0, depth - lo * flits)
            if skip >= n * flits:
                continue
            reader_times = times[reader]
            if read_slots is None:
                freed, fresh = reader_times[lo * flits - depth + skip:hi * flits - depth], False
            else:
                wr = self.widths[reader]
                freed, fresh = reader_times[lo * wr + self._space_sources(edge, n)[skip:]], True
            yield (slice(skip, None) if write_slots is None else self._slots(write_slots, w, n)[skip:]), freed, fresh
        for event in self.events_into[j]:
            if ((source is not None and event.source != source) or event.source == exclude
                    or (seen and not seen[event.source])):
                continue
            first = max(lo, event.shift)
            if first >= hi:
                continue
            sw = self.widths[event.source]
            begin = (first - event.shift) * sw + event.source_slot
            bound = times[event.source][begin:(hi - event.shift - 1) * sw + event.source_slot + 1:sw] \
                + (event.offset - 1)
            yield slice((first - lo) * w + event.target_slot, None, w), bound, True

    def _lower(self, j: int, lo: int, hi: int, exclude: int) -> np.ndarray:
        """``lb - 1`` of chain ``j``'s actions of inferences ``[lo, hi)`` from every edge but chain ``exclude``'s."""
        return _raise_to(np.full((hi - lo) * self.widths[j], NEVER), self._bounds(j, lo, hi, exclude=exclude))

    def solve_ring_pair(self, compute: int, output: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """The compute and output chains of one PE solved together over inferences ``[lo, hi)``, given the other
        chains: their least solution, which alternating solves of the two (one ring turn each) reach in the end.

        Result word ``g`` (over the window) is bounded by the EMIT of word ``g - R`` (the ring's space) and the
        skip by word ``g - E``; every output transfer up to the EMIT of word ``g`` is bounded by words ``<= g``
        only. So in blocks of ``min(R, E)`` words: the block's compute actions (a scan from the word before),
        then the output actions up to the block's last EMIT (a scan from the action before)."""
        times, widths = self.times, self.widths
        n = hi - lo
        words, flits = widths[compute], widths[output]
        ring = next(edge for edge in self.reads_from[output] if edge[0] == compute)
        _, _, _, _, read_slots, extra, depth = ring
        emits = np.arange(n * words, dtype=np.int64) if read_slots is None else self._slots(read_slots, flits, n)
        extra = self._tiled(extra, n)
        a_low = self._lower(compute, lo, hi, output)
        o_low = self._lower(output, lo, hi, compute)
        sources = self._space_sources(ring, n)         # EMIT of word g - R, relative to the window's output
        before = sources < 0
        first = max(0, depth - lo * words)             # words whose g - R exists
        if before[first:].any():                       # g - R before the window: final times
            index = np.flatnonzero(before[first:]) + first
            np.maximum.at(a_low, index, times[output][lo * flits + sources[index]])
        a_cum = self._cumulative(compute, lo, hi)
        o_cum = self._cumulative(output, lo, hi)
        a_times, o_times = times[compute], times[output]
        if lo == 0:
            a_carry = o_carry = -1
        else:
            a_carry = a_times[lo * words - 1] - a_cum[0]
            o_carry = o_times[lo * flits - 1] - o_cum[0]
        excess = self.skips[compute]
        if excess:
            cs, period, adjust = self.delays[compute]
            skip = excess + period                     # t(s, 0) >= t(s - 1, 0) + skip
            if lo:
                a_low[0] = max(a_low[0], a_times[(lo - 1) * words] + skip - 1)
        a_new = np.empty(n * words, dtype=np.int64)
        o_new = np.empty(n * flits, dtype=np.int64)
        block = min(depth, words)
        total = n * words
        o_start = 0
        for start in range(0, total, block):
            end = min(start + block, total)
            u = a_low[start:end]
            inside = sources[start:end]
            if start + block > depth and end > depth:   # ring bounds from this window's EMITs
                low = max(start, depth)
                view = u[low - start:]
                np.maximum(view, o_new[inside[low - start:]], out=view)
            if excess:
                s0 = -(-max(start, words) // words)    # inference starts in the block (not the window's first)
                for r in range(s0 * words, end, words):
                    bound = a_new[r - words] + skip - 1
                    if u[r - start] < bound:
                        u[r - start] = bound
            a_carry = _carry_scan(u, a_cum[1 + start:1 + end], a_carry)
            a_new[start:end] = u
            o_end = int(emits[end - 1]) + 1 if end < total else n * flits
            v = o_low[o_start:o_end]
            at = emits[start:end] - o_start
            v[at] = np.maximum(v[at], u + extra[start:end])
            o_carry = _carry_scan(v, o_cum[1 + o_start:1 + o_end], o_carry)
            o_new[o_start:o_end] = v
            o_start = o_end
        return a_new, o_new

    def _latest(self, j: int, lo: int, hi: int) -> np.ndarray:
        """``lb - 1`` of chain ``j``'s actions of inferences ``[lo, hi)`` (:meth:`_ChainSystem._latest`)."""
        size = (hi - lo) * self.widths[j]
        bounds = list(self._bounds(j, lo, hi))
        # start from a bound on a contiguous run of actions (a FIFO read or write of every action)
        first = next((i for i, b in enumerate(bounds) if isinstance(b[0], slice) and b[0].step is None), None)
        if first is None:
            lower = np.full(size, NEVER)
        else:
            target, values, fresh = bounds.pop(first)
            begin = target.start or 0
            if begin == 0:
                lower = values if fresh else values.copy()
            else:
                lower = np.empty(size, dtype=np.int64)
                lower[:begin] = NEVER
                lower[begin:] = values
        return _raise_to(lower, bounds)

    def _satisfied(self, j: int, sources, lo: int, hi: int) -> bool:
        """Whether chain ``j``'s current times of inferences ``[lo, hi)`` meet every bound from the chains
        ``sources``: then, the other chains unchanged since ``j``'s last solve and times only growing, that solve
        still gives them (they satisfy the new bounds, which are no lower than the old)."""
        w = self.widths[j]
        current = self.times[j][lo * w:hi * w]
        for k in sources:
            for target, values, _ in self._bounds(j, lo, hi, k):
                if not (values < current[target]).all():
                    return False
        return True

    def solve(self, j: int, lo: int, hi: int) -> np.ndarray:
        """Times of chain ``j``'s actions of inferences ``[lo, hi)`` given the others' (earlier inferences final)."""
        w = self.widths[j]
        lower = self._latest(j, lo, hi)
        cumulative = self._cumulative(j, lo, hi)
        body = cumulative[1:]
        lower -= body
        lower += 1
        times = self.times[j]
        if lo == 0:
            if lower[0] < -1:
                lower[0] = -1
        else:
            carry = times[lo * w - 1] - cumulative[0]
            if lower[0] < carry:
                lower[0] = carry
        excess = self.skips[j]
        if not excess:
            np.maximum.accumulate(lower, out=lower)
        else:
            rows = lower.reshape(-1, w)
            first = rows[:, 0].copy()
            if w > 1:
                np.maximum(first[1:], rows[:-1, 1:].max(axis=1), out=first[1:])
            steps = np.arange(hi - lo, dtype=np.int64) * excess
            if lo:
                # h_{lo-1} + excess: the first action of the inference before, in u = t - C terms
                cs, period, adjust = self.delays[j]
                previous = times[(lo - 1) * w] - ((lo - 1) * period + cs[0] - adjust)
                if first[0] < previous + excess:
                    first[0] = previous + excess
            first -= steps
            np.maximum.accumulate(first, out=first)
            first += steps
            rows[:, 0] = first
            np.maximum.accumulate(rows, axis=1, out=rows)
        lower += body
        return lower

    def sweep_window(self, lo: int, hi: int) -> tuple[int, int]:
        """Gauss-Seidel sweeps (downstream, then upstream) of inferences ``[lo, hi)`` until no time changes;
        returns (rounds, chain solves)."""
        n = self.solved
        max_rounds = max(ROUNDS_MINIMUM, ROUNDS_PER_INFERENCE * (hi - lo + n) * self.graph.ring_rounds
                         * self.graph.link_rounds * self.graph.context_rounds)
        # a chain not yet solved in this window has no times there yet: it bounds nothing ("no constraint yet")
        seen = self.seen = [False] * n
        # per chain: None (its times stand), ALL (solve it) or the chains whose change may have moved its bounds
        ALL = True
        pending: list = [ALL] * n
        solves = 0
        times, widths, pairs = self.times, self.widths, self.ring_pair

        def notify(changed: int) -> None:
            """The chains ``changed`` bounds may have moved: mark it among their pending sources."""
            for k in self.dependents[changed]:
                sources = pending[k]
                if sources is None:
                    pending[k] = {changed}
                elif sources is not ALL:
                    sources.add(changed)

        def update(j: int) -> bool:
            w = widths[j]
            new = self.solve(j, lo, hi)
            current = times[j][lo * w:hi * w]
            if seen[j] and np.array_equal(new, current):
                return False
            seen[j] = True
            current[...] = new
            notify(j)
            return True

        def stands(j: int) -> bool:
            sources = pending[j]
            return sources is None or (sources is not ALL and self._satisfied(j, sources, lo, hi))

        downstream, upstream = range(n), range(n - 1, -1, -1)
        for rounds in range(1, max_rounds + 1):
            for order in (downstream, upstream):
                for j in order:
                    if pending[j] is None:
                        continue
                    pair = pairs.get(j)
                    if pair is None:
                        if not stands(j):
                            pending[j] = None
                            solves += 1
                            update(j)
                        pending[j] = None
                        continue
                    # the compute and output chains of one PE until neither changes (nothing else changes meanwhile)
                    compute, output = pair
                    if stands(compute) and stands(output):
                        pending[compute] = pending[output] = None
                        continue
                    pending[compute] = pending[output] = None
                    # one solve each (enough unless the ring holds COMPUTE back), else solved together
                    old = [times[chain][lo * widths[chain]:hi * widths[chain]].copy() if seen[chain] else None
                           for chain in pair]
                    solves += 2
                    for chain in pair:
                        times[chain][lo * widths[chain]:hi * widths[chain]] = self.solve(chain, lo, hi)
                        seen[chain] = True
                    if not self._satisfied(compute, (output,), lo, hi):
                        solves += 2
                        for chain, new in zip(pair, self.solve_ring_pair(compute, output, lo, hi)):
                            times[chain][lo * widths[chain]:hi * widths[chain]] = new
                    for chain, previous in zip(pair, old):
                        if previous is None or not np.array_equal(
                                previous, times[chain][lo * widths[chain]:hi * widths[chain]]):
                            notify(chain)
                    pending[compute] = pending[output] = None
            if all(sources is None for sources in pending):
                self.seen = None
                return rounds, solves
        self.seen = None
        dirty = [sources is not None for sources in pending]
        stuck = [self.graph.chains[j].name for j in range(n) if dirty[j]]
        raise TimingError(f"timing did not converge after {max_rounds} sweep rounds (inferences {lo}..{hi - 1} of "
                          f"batch {self.batch}): a deadlock or a model bug; still changing: {', '.join(stuck[:4])}"
                          + (f" and {len(stuck) - 4} more" if len(stuck) > 4 else ""))

    def exact_until(self, lo: int, chunk: int, fill) -> tuple[int, int]:
        """How far a candidate for inferences ``[lo, batch)`` (after the solved prefix ``[0, lo)``) is the solution:
        the first inference ``b >= lo`` of which some action's recurrence does not hold with equality, ``batch`` if
        none (the Jacobi check). ``fill(start, end)`` writes the candidate's inferences ``[start, end)`` into the
        times; it is called in order, each stretch before it is checked, none after the one that fails. Returns
        ``(b, chain solves)``.

        Inferences ``[lo, b)`` are then exact: with the prefix before ``lo`` they satisfy every equation of the
        closed subsystem of inferences ``[0, b)`` (every edge runs to the same or a later inference, and a chain's
        solve over ``[start, end)`` gives action ``k`` from its bounds and the action before alone), whose solution is
        unique (module docstring). Checked in stretches of ``chunk`` inferences, doubling, so that a candidate that
        fails early costs little more than the stretch it fails in."""
        start, solves = lo, 0
        while start < self.batch:
            end = min(start + chunk, self.batch)
            fill(start, end)
            for j in range(self.solved):
                w = self.widths[j]
                differ = np.flatnonzero(self.solve(j, start, end) != self.times[j][start * w:end * w])
                solves += 1
                if len(differ):
                    end = start + int(differ[0]) // w      # the later chains need checking before it only
                    if end == start:
                        return start, solves
            if end < min(start + chunk, self.batch):
                return end, solves
            start, chunk = end, chunk * PROBE_GROWTH
        return self.batch, solves

    def solution(self) -> list[np.ndarray]:
        return list(self.times)


def _periodic(prefix: list[np.ndarray], chains: list[Chain], probe: int,
              drift: bool = False) -> tuple[int, np.ndarray] | None:
    """The period ``c`` and the increment (over all actions of all chains, side by side) of the probe's
    per-inference times, or None if they do not yet repeat.

    Looks for the smallest period ``c`` such that ``T[b + c] - T[b]`` is one and the same vector for the last
    ``c + 1`` or more inferences ``b`` of the probe. Without ``drift`` that vector must advance every action alike
    (else None); with ``drift`` it need not: a candidate in which some chains keep gaining on others at a steady
    rate (an upstream PE's lead over the bottleneck growing by a few cycles an inference, for longer than the batch
    lasts, or than the stretch the caller keeps, before the FIFOs between them fill) is returned as well. Either
    way the continuation is only a guess; the caller checks it (module docstring: one that satisfies every equation
    is the solution).
    """
    widths = [c.per_inference for c in chains]
    rows: dict[int, np.ndarray] = {}

    def row(b: int) -> np.ndarray:          # all chains' times of inference b, side by side
        if b not in rows:
            rows[b] = np.concatenate([times[b * width:(b + 1) * width] for times, width in zip(prefix, widths)])
        return rows[b]

    # a few actions of every chain per inference, its first and last among them, and every action a whole row
    # failed on for a shorter period: a period that fails on these fails on all actions, and they are cheap to test
    # every period on (a whole row is not: a drifting lead moves the few actions a FIFO holds back inside a chain
    # from one inference to the next, and they fail every period)
    sample = np.concatenate([times[:probe * width].reshape(probe, width)[:, _sampled_actions(width)]
                             for times, width in zip(prefix, widths)], axis=1)
    steps = np.diff(sample, axis=0)          # steps[b] = T[b + 1] - T[b], sampled
    starts = _offsets(widths)
    for period in range(1, probe // 2):
        # the increments T[b + period] - T[b] of the last period + 1 inferences b of the probe all equal the last
        # one, i.e. the steps of the last 2 * period inferences repeat with the period (the latest first: a
        # transient usually shows there)
        recent, before = probe - period - 1, probe - 2 * period - 1
        if not (np.array_equal(steps[probe - 2], steps[probe - 2 - period])
                and np.array_equal(steps[recent:probe - 1], steps[before:recent])):
            continue
        last = row(probe - 1) - row(probe - 1 - period)
        failed = next((wrong for wrong in (np.flatnonzero(row(b + period) - row(b) != last)
                                           for b in range(probe - 2 - period, probe - 2 * period - 2, -1))
                       if len(wrong)), None)
        if failed is not None:
            chain = np.searchsorted(starts, failed[:PERIOD_SAMPLE_ACTIONS], side="right") - 1
            added = np.stack([prefix[j][a:probe * widths[j]:widths[j]]
                              for j, a in zip(chain, failed[:PERIOD_SAMPLE_ACTIONS] - starts[chain])], axis=1)
            sample = np.concatenate([sample, added], axis=1)
            steps = np.diff(sample, axis=0)
        else:
            # a lasting steady state advances every action of every chain alike (FIFO and event edges bound
            # the distance between chains, a chain's actions are ordered): unequal increments are a transient
            # (an upstream PE's lead over the bottleneck drifting until the FIFOs fill), so no candidate unless
            # the caller asks for one (the drift may outlast the batch)
            if not drift and not (last == last[0]).all():
                return None
            return period, last
    return None


def _sampled_actions(width: int) -> np.ndarray:
    """The actions of a chain (of ``width`` an inference) :func:`_periodic` tests every period on first: up to
    :data:`PERIOD_SAMPLE_ACTIONS` of them, evenly spaced, the first and the last included."""
    return np.unique(np.linspace(0, width - 1, min(width, PERIOD_SAMPLE_ACTIONS)).astype(np.int64))


def _fill_periodic(out: list[np.ndarray], widths: list[int], batch: int, period: int, increment: np.ndarray,
                   lo: int, hi: int) -> None:
    """Write the periodic continuation of :func:`_periodic` into inferences ``[lo, hi)`` of the whole-batch arrays
    ``out`` (one per chain, ``widths`` actions an inference), whose inferences ``[lo - period, lo)`` are set:
    inference ``b`` is inference ``b - period`` one ``increment`` (per action, chains side by side) later."""
    column = 0
    for times, width in zip(out, widths):
        step_up = increment[column:column + width]
        column += width
        full = times.reshape(batch, width)
        # one period after another, doubling the filled stretch each time: lo + f + r repeats lo + r, f / period
        # increments later (f a multiple of the period)
        filled = min(period, hi - lo)
        np.add(full[lo - period:lo - period + filled], step_up, out=full[lo:lo + filled])
        while filled < hi - lo:
            step = min(filled, hi - lo - filled)
            np.add(full[lo:lo + step], (filled // period) * step_up, out=full[lo + filled:lo + filled + step])
            filled += step


def _extrapolate(prefix: list[np.ndarray], chains: list[Chain], probe: int, batch: int) -> list[np.ndarray] | None:
    """Continue the probe's per-inference times periodically (:func:`_periodic`, every action advancing alike), or
    None if they do not yet repeat: whole-batch arrays, one per chain, whose first ``probe`` inferences are the
    probe's and each later inference ``b`` is ``T[b - c] +`` the increment."""
    found = _periodic(prefix, chains, probe)
    if found is None:
        return None
    period, last = found
    widths = [c.per_inference for c in chains]
    extended = []
    for times, width in zip(prefix, widths):
        full = np.empty(batch * width, dtype=np.int64)
        full[:probe * width] = times[:probe * width]
        extended.append(full)
    _fill_periodic(extended, widths, batch, period, last, probe, batch)
    return extended


@dataclass(frozen=True)
class PETimes:
    """Transfer cycles of one PE's three sides (section 4), over all inferences.

    ``input``: int64 ``[batch * (K + P)]``, per inference K RECV then P PASS transfers; ``compute``: int64
    ``[batch]``, ``c_s`` (the first COMPUTE cycle of each inference, ``a`` of its first result word; length 0
    if ``n_out == 0``; :attr:`TimingResult.word_starts` has every word's ``a_j`` and
    :attr:`TimingResult.compute_ends` the ends of the COMPUTE spans);
    ``output``: int64 ``[batch * (Q + E)]``, per inference the Q pops of the forward queue and the E EMITs in
    the output side's order (section 4.4: ``Q_f + P_bulk`` pops, then per output pixel ``pass_per_pixel``
    pops and the pixel's EMITs; :meth:`emulator.path.TileCounts.output_is_pop` marks the pops); with
    ``pass_per_pixel = 0``, Q pops then E EMITs.
    """

    input: np.ndarray
    compute: np.ndarray
    output: np.ndarray


@dataclass(frozen=True)
class LinkTimes:
    """Cycles of link ``k``'s events over the batch (:mod:`flowtile.link_format`, fault free), per flit or frame
    numbered across inferences (each inference's flits form the frames of
    :meth:`flowtile.link_format.LinkGeometry.inference_frame_sizes`: dense frames, by the link's lane table).

    ``accept``: int64 ``[batch * n]``, the sender takes flit ``i`` from chip ``k``'s exit FIFO (chip ``k``'s host
    output transfer); ``close``: int64 ``[batch * frames]``, ``close_f``; ``send``: ``send_f``, the serializer
    loads frame ``f`` (its beat ``b`` is on the sender's wire in ``send_f + 1 + b``); ``received``: the receiver
    accepts frame ``f``, ``send_f + accept_delay``; ``deliver``: int64 ``[batch * n]``, flit ``i`` written into
    chip ``k + 1``'s tile (0,0) W FIFO (chip ``k + 1``'s host input transfer; a ring's return link: the host output
    transfer).

    With faults (``Arch.link_error_rate > 0``, emulator/link_faults.py): ``send`` is each frame's first send,
    ``received`` the cycle the receiver accepted it; ``sends`` lists every load ``(cycle, frame)`` (resends
    included) and ``counters`` the link's status counters at the end of the run (the RTL's names,
    :data:`emulator.link_faults.LINK_COUNTERS`); both None fault free."""

    accept: np.ndarray
    close: np.ndarray
    send: np.ndarray
    received: np.ndarray
    deliver: np.ndarray
    counters: dict | None = None
    sends: list | None = None


@dataclass
class TimingResult:
    """Transfer cycle of every action of every chain.

    ``in_times``: host-input transfer per input flit; ``out_times``: host-output transfer per output
    flit; ``pe_times[p]``: the :class:`PETimes` of the PE at chain position ``p`` (None if idle);
    ``stream_names`` / ``stream_times``: every chain's name and times in line order (diagnostics and
    tests); ``solves``: chain solves used; ``extrapolated``: whether the periodic extrapolation passed (windows:
    for the rest of the batch or, checked, for a stretch of it);
    ``word_starts[p]``: int64 ``[batch * E]``, ``a_j`` (first issue cycle) of every result word of the PE at
    chain position ``p``, numbered across inferences (section 4, result ring; empty without COMPUTE, None if
    idle); ``compute_ends[p]``: int64 ``[batch]``, the end of each COMPUTE, ``a_last + d_last + 2`` (COMPUTE
    of ``s`` spans ``[c_s, compute_ends[p][s])``, waits for the ring included). Chain positions are system chain
    positions (all chips); ``in_times`` is chip 0's host input, ``out_times`` the host output (the last chip's, or
    in a ring the deliveries of the return link, link ``chips - 1``).
    ``link_times[k]``: the :class:`LinkTimes` of link ``k`` (empty for one chip).

    A tile of several contexts (section 4.6): ``pe_times[p]`` holds its three chains, every context's actions in
    turn order (``input``: per inference context 0's ``K_0 + P_0`` transfers, then context 1's, ...; ``output``
    likewise with ``Q_c + E_c``), and in ``compute`` the start ``c`` of every context's COMPUTE, ``[batch * C']``
    inference-major (``compute_ends[p]`` likewise); ``word_starts[p]`` numbers the words in compute order over
    contexts and inferences (the result ring's numbering). ``context_times[p]``: per context the :class:`PETimes`
    a tile of that context alone would have (its own actions, ``c_s`` ``[batch]``), and
    ``context_compute_ends[p]`` its COMPUTE ends; for a tile of one context ``(pe_times[p],)`` and
    ``(compute_ends[p],)`` (None if idle).
    """

    in_times: np.ndarray
    out_times: np.ndarray
    pe_times: list[PETimes | None]
    stream_names: list[str]
    stream_times: list[np.ndarray]
    solves: int
    extrapolated: bool
    word_starts: list[np.ndarray | None] = field(default_factory=list)
    compute_ends: list[np.ndarray | None] = field(default_factory=list)
    link_times: list[LinkTimes] = field(default_factory=list)
    context_times: list[tuple[PETimes, ...] | None] = field(default_factory=list)
    context_compute_ends: list[tuple[np.ndarray, ...] | None] = field(default_factory=list)


def _pass_through_tail(graph: TimingGraph) -> int:
    """Index of the first chain of the pass-through tail (never the host input); ``len(chains)`` if none.

    The tail is a suffix of pass-through chains ``k0 .. n-1`` (each reads every action's flit from the FIFO
    before it and writes it to the FIFO after it; no event edge); the "entry" FIFO is the one chain
    ``k0 - 1`` writes and chain ``k0`` reads. Claim: in the tail, chain ``k`` transfers flit ``i`` at
    ``t_k[i] = t_{k-1}[i] + 1`` (one cycle after its write into the FIFO before it), and the tail never
    holds chain ``k0 - 1`` back. By induction from the host output (always ready: the tail is used only without
    an output pattern): ``t_{k-1}[i] + 1`` meets rule 1's read bound with equality and rule 2 because writes are strictly increasing; rule 1's
    space bound of a FIFO of depth ``n`` asks ``t_k[i] >= t_{k+1}[i-n] + 1 = t_k[i-n] + 2``, true for
    ``n >= 2`` by strict increase, and for ``n = 1`` if the tail's times are >= 2 cycles apart. They are
    if the entry FIFO has depth 1 (rule 1 spaces the writes into it, :func:`_space_one_apart`), so the
    tail is cut to start after its last depth-1 FIFO when the entry FIFO is deeper (a forward queue of
    ``F = 1`` behind router FIFOs of ``D >= 2``). The same argument shows chain ``k0 - 1`` never waits
    for space in the entry FIFO.
    """
    chains = graph.chains
    start = len(chains)
    while start > 1 and chains[start - 1].pass_through:
        start -= 1
    if start == len(chains):
        return start
    depth_into = {fifo.reader: fifo.depth for fifo in graph.fifos}
    if depth_into[start] != 1:
        shallow = [k for k in range(start + 1, len(chains)) if depth_into[k] == 1]
        if shallow:
            start = shallow[-1]
    return start


#: Inferences per window of :class:`_WindowSystem` at first; a cheap window (one that settles in at most
#: :data:`WINDOW_CHEAP_ROUNDS` sweep rounds, or in at most that many chain solves per swept chain) doubles the next
#: one, any other halves it and caps the windows after it at that size (wider windows then only cost more rounds).
#: The solves count too because a round costs the chains it re-solves: a tile of several contexts settles its
#: loop-back FIFO in a round or two more than the rest of the chip (section 4.6), whatever the window's width, but
#: those rounds re-solve its own three chains alone.
WINDOW_FIRST = 1
WINDOW_CHEAP_ROUNDS = 2
#: Programs with fewer actions per inference (over the swept chains) than this are swept over the whole probe as
#: before: their chain solves cost mostly Python overhead, so fewer, wider solves are faster than windows.
WINDOW_MIN_ACTIONS = 16384
#: Windowed solves look for a periodic steady state from this many solved inferences on (or ``probe_batch`` if
#: smaller), after every window; a candidate that fails its check defers the next look until the solved prefix
#: has grown by :data:`PROBE_GROWTH`.
WINDOW_PROBE = 4
#: Inferences of a candidate's first checked stretch at least (:meth:`_WindowSystem.exact_until`; the window width
#: when larger): enough that a candidate which holds costs few stretches, few enough that one which fails soon costs
#: little.
WINDOW_CHECK_FIRST = 8


def _solve_in_windows(graph: TimingGraph, tail: int, batch: int, probe_batch: int,
                      spaced: list[tuple[np.ndarray, int | None]]) -> tuple["_WindowSystem", int, bool]:
    """The probe and extrapolation of :func:`solve_timing`, with the probe solved window by window
    (:class:`_WindowSystem`): the first inferences exactly, then, once ``min(probe_batch, WINDOW_PROBE)`` are
    solved, after every window the periodic candidate for the rest (:func:`_periodic`, drifting leads allowed),
    checked by one Jacobi pass over the inferences after the solved prefix, stretch by stretch
    (:meth:`_WindowSystem.exact_until`); the inferences up to the first one it fails on are kept, and windows
    continue after them, up to the whole batch. Returns (system, chain solves, extrapolated: whether a candidate
    gave any inference)."""
    chains = graph.chains[:tail]
    system = _WindowSystem(graph, tail, batch, spaced)
    solves, done, width, cap = 0, 0, WINDOW_FIRST, batch
    look = min(probe_batch, WINDOW_PROBE)
    extrapolated = False
    while done < batch:
        hi = min(done + width, batch)
        rounds, used = system.sweep_window(done, hi)
        solves += used
        if rounds <= WINDOW_CHEAP_ROUNDS or used <= WINDOW_CHEAP_ROUNDS * tail:
            width = min(width * 2, cap)
        else:
            width = cap = max(1, width // 2)
        done = hi
        if done < look or done >= batch:
            continue
        prefix = [times[:done * w] for times, w in zip(system.times, system.widths)]
        found = _periodic(prefix, chains, done, drift=True)
        if found is None:
            continue
        # the candidate goes into the times of the inferences not solved yet (each window starts its own afresh),
        # stretch by stretch as it is checked
        period, increment = found

        def fill(lo: int, hi: int) -> None:
            _fill_periodic(system.times, system.widths, batch, period, increment, lo, hi)

        exact, used = system.exact_until(done, max(width, WINDOW_CHECK_FIRST), fill)
        solves += used
        if exact >= batch:
            return system, solves, True
        if exact > done:
            # the candidate held up to ``exact`` (a lead that drifted until a FIFO filled): kept; a new steady
            # state may set in soon after, so the windows narrow to look for it early
            extrapolated = True
            look, width = exact, min(width, WINDOW_CHECK_FIRST)
        else:
            # held for no inference: the next look waits until the solved prefix has grown, as a longer probe would
            look = done * PROBE_GROWTH
        done = exact
    return system, solves, extrapolated


def solve_timing(program: Program, batch: int, path: DataPath | None = None, *,
                 probe_batch: int | None = PROBE_BATCH, host_pattern: HostPattern | None = None) -> TimingResult:
    """Solve section 6's recurrences for ``batch`` inferences.

    Sweeps solve the chains before the pass-through tail, first for ``probe_batch`` inferences whose
    periodic continuation is checked against the whole batch (growing the probe while the check
    fails); ``probe_batch=None`` sweeps the whole batch directly (slow for large batches, same result).

    ``host_pattern`` (:class:`flowtile.host.HostPattern`): the host input transfers only in cycles its input is
    offered, the host output only in cycles it is ready (a :class:`Gate` on the first and the last chain).
    A stalled output holds the chain before it back, so there is no pass-through tail then; the gated chains
    keep ``d = 1`` (the depth-1 spacing is implied by rule 1, leaving it out only costs sweep rounds).
    """
    path = path or trace_data_path(program)
    graph = timing_graph(program, path)
    chains = graph.chains
    gates = host_gates(host_pattern, len(chains))
    tail = len(chains) if len(chains) - 1 in gates else _pass_through_tail(graph)
    spaced = _spaced_delays(graph)
    for j in gates:
        spaced[j] = (np.ones(chains[j].per_inference, dtype=np.int64), None)
    solves, full, prefix = 0, None, None
    faulty = any(link.faults for link in graph.links)
    # large programs without links and host gates: the probe is solved window by window (_WindowSystem)
    windowed = (probe_batch is not None and batch > probe_batch and not faulty and not gates and not graph.links
                and not graph.self_bounds and sum(c.per_inference for c in chains[:tail]) >= WINDOW_MIN_ACTIONS)
    if windowed:
        full, solves, extrapolated = _solve_in_windows(graph, tail, batch, probe_batch, spaced)
    elif probe_batch is not None and batch > probe_batch and not faulty:
        probe = probe_batch
        while probe < batch:
            system = _ChainSystem(graph, tail, probe, spaced=spaced, gates=gates)
            if prefix is not None:
                system.warm_start(prefix)
            rounds, probe_solves = system.sweep_until_stable()
            solves += probe_solves
            prefix = system.solution()
            candidate = _extrapolate(prefix, chains[:tail], probe, batch)
            if candidate is not None:
                full = _ChainSystem(graph, tail, batch, times=candidate, spaced=spaced, gates=gates)
                if full.is_exact():
                    break
                full = None
            if rounds <= CHEAP_SWEEP_ROUNDS:
                # the probe settled in a few sweep rounds, i.e. nothing couples inferences round by round: the
                # whole batch settles in as few, cheaper than growing probes through a long transient
                break
            probe *= PROBE_GROWTH
    if not windowed:
        extrapolated = full is not None
    if full is None:
        full = _ChainSystem(graph, tail, batch, spaced=spaced, gates=gates)
        if prefix is not None:
            full.warm_start(prefix)
        solves += full.sweep_until_stable()[1]
    times = full.solution()
    if tail < len(chains):
        writes = full.writes_of[tail - 1]
        into_tail = times[tail - 1] if writes is None else times[tail - 1][writes]
        times += [into_tail + hop for hop in range(1, len(chains) - tail + 1)]
    n_tiles = program.arch.system_tiles
    pe_times: list[PETimes | None] = [None] * n_tiles
    word_starts: list[np.ndarray | None] = [None] * n_tiles
    compute_ends: list[np.ndarray | None] = [None] * n_tiles
    empty = np.empty(0, dtype=np.int64)
    context_times: list[tuple[PETimes, ...] | None] = [None] * n_tiles
    context_ends: list[tuple[np.ndarray, ...] | None] = [None] * n_tiles
    for position, (input_chain, compute_chain, output_chain) in graph.pe_chains.items():
        count = path.counts[position]
        if count.contexts:
            pe_times[position], word_starts[position], compute_ends[position], context_times[position], \
                context_ends[position] = _context_times(count, batch, times[input_chain], times[compute_chain],
                                                        times[output_chain])
            continue
        if compute_chain is None:
            words = starts = ends = empty
        else:
            width = count.n_result_words
            words = times[compute_chain]
            starts = words[::width].copy()
            ends = words[width - 1::width] + (int(count.pixel_word_issue[-1]) + COMPUTE_DRAIN_CYCLES)
        pe_times[position] = PETimes(input=times[input_chain], compute=starts, output=times[output_chain])
        word_starts[position], compute_ends[position] = words, ends
        context_times[position], context_ends[position] = (pe_times[position],), (ends,)
    link_times = []
    runs = full.link_counters(int(times[-1][-1])) if faulty else {}
    for link in graph.links:
        sender, send = times[link.sender], times[link.send]
        width = link.flits + link.frames
        run = runs.get(link.index)
        link_times.append(LinkTimes(accept=sender[_tile_slots(link.flit_slots, width, batch)],
                                    close=sender[_tile_slots(link.close_slots, width, batch)], send=send,
                                    received=send + link.geometry.accept_delay if run is None else run.received,
                                    deliver=times[link.deliver], counters=None if run is None else run.counters,
                                    sends=None if run is None else run.sends))
    return TimingResult(in_times=times[0], out_times=times[-1], pe_times=pe_times,
                        stream_names=[c.name for c in chains], stream_times=times,
                        solves=solves, extrapolated=extrapolated, word_starts=word_starts,
                        compute_ends=compute_ends, link_times=link_times, context_times=context_times,
                        context_compute_ends=context_ends)


def _context_times(count: TileCounts, batch: int, inputs: np.ndarray, words: np.ndarray, outputs: np.ndarray):
    """The times of a tile of several contexts (section 4.6) from its three chains: ``(PETimes of the tile,
    word_starts, compute_ends, PETimes per context, compute ends per context)``; the tile's ``compute`` and
    ``compute_ends`` hold ``c`` and the COMPUTE end of every context of every inference, ``[batch * C']``,
    inference-major."""
    contexts = count.contexts
    in_at = _offsets([c.flits_in for c in contexts])
    out_at = _offsets([c.flits_out for c in contexts])
    word_at = _offsets([c.n_result_words for c in contexts])
    by_input = inputs.reshape(batch, -1)
    by_word = words.reshape(batch, -1)
    by_output = outputs.reshape(batch, -1)
    per_context, ends = [], []
    for index, context in enumerate(contexts):
        first, last = int(word_at[index]), int(word_at[index + 1]) - 1
        end = by_word[:, last] + (int(context.pixel_word_issue[-1]) + COMPUTE_DRAIN_CYCLES)
        per_context.append(PETimes(input=by_input[:, in_at[index]:in_at[index + 1]].ravel(),
                                   compute=by_word[:, first].copy(),
                                   output=by_output[:, out_at[index]:out_at[index + 1]].ravel()))
        ends.append(end)
    starts = np.stack([times.compute for times in per_context], axis=1).ravel()
    tile_ends = np.stack(ends, axis=1).ravel()
    return (PETimes(input=inputs, compute=starts, output=outputs), words, tile_ends, tuple(per_context),
            tuple(ends))
