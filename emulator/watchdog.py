"""The run watchdog (docs/architecture.md sections 5 and 6): how long a run may take, where a run that cannot
finish gets stuck, and the one-line reports the emulator and the RTL runner give instead of hanging.

* :func:`cycle_budget`: a generous, emulator-independent cycle limit for ``batch`` inferences of a program, from
  its registers alone (the RTL harness's ``cycle_limit`` unless ``max_cycles`` is given); :func:`stall_window`:
  the cycles a run may go without a host transfer before the RTL runner calls it stuck (the budget of one
  inference).
* :func:`flit_progress`: follows the program's flit counts (not its cycles) from the host through the tiles
  along their configured destinations, like the hardware would move them, also for programs whose counts do not
  add up: per tile the flits it would receive and emit over the whole batch and, for a tile that cannot finish,
  the inference it waits in, the router port it waits on and the words it has of the words it needs. A program
  whose counts add up finishes (section 6: the data path is acyclic, every side waits only on its own upstream,
  so any FIFO, queue or ring depth >= 1 only slows it down); one whose counts do not stalls exactly where
  :func:`flit_progress` says (or emits flits the program does not account for).
* :func:`progress_at`: from an emulated run's transfer times, each tile's and the host's transfers before a
  cycle limit (what the RTL would show when stopped there).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flowtile.program import Program

from .path import HOST, EmulatorError, TileCounts, _route, tile_counts

__all__ = ["BUDGET_FACTOR", "BUDGET_BASE_CYCLES", "MAX_CYCLE_LIMIT", "cycle_budget", "cycle_limit", "stretched",
           "stall_window", "TileProgress",
           "FlitProgress", "flit_progress", "DeadlockError", "WatchdogError", "progress_at", "stuck_summary"]

#: The cycle budget is this many times a sequential (no overlap at all) estimate of the run ...
BUDGET_FACTOR = 4
#: ... plus this many cycles (covers pipeline fill of tiny programs).
BUDGET_BASE_CYCLES = 1000
#: The largest cycle limit the harness's 32-bit cycle counter can compare against.
MAX_CYCLE_LIMIT = (1 << 32) - 1


def cycle_budget(program: Program, batch: int) -> int:
    """A generous cycle limit for ``batch`` inferences of ``program``, from its registers only.

    Upper bound idea: even if no two tiles ever overlapped, every tile's work per inference is its
    input and output transfers (a forwarded or passed word is both), its COMPUTE (``I + 2``, plus 1 to
    enter it; docs/architecture.md section 4) and a few cycles per flit of FIFO hops; the budget is
    :data:`BUDGET_FACTOR` times that plus :data:`BUDGET_BASE_CYCLES`.
    """
    arch = program.arch
    hop_cycles = arch.router_fifo_depth + 2
    per_inference = 0
    for tile in program.tiles:
        config = tile.config
        # input transfers, output transfers (forwarded and passed words leave through the forward queue) and EMITs
        transfers = (config.n_in_words + 2 * config.n_pass + config.forwarded_words
                     + config.result_words(arch.lanes))
        compute = config.compute_cycles + 1 if config.n_out else 0
        per_inference += transfers * hop_cycles + compute
    host = (program.input_words + program.output_words) * hop_cycles
    budget = BUDGET_FACTOR * (batch * (per_inference + host) + arch.n_tiles * hop_cycles) + BUDGET_BASE_CYCLES
    return min(budget, MAX_CYCLE_LIMIT)


def stretched(budget: int, host_pattern=None) -> int:
    """``budget`` stretched by a host pattern's least on-fraction (a stalled host slows the whole run), as the RTL
    runner's limits are: ``ceil(budget / on) + 2 * HOST_PATTERN_CYCLES``, at most :data:`MAX_CYCLE_LIMIT`."""
    if host_pattern is None:
        return budget
    from flowtile.host import HOST_PATTERN_CYCLES
    on = min(float(host_pattern.out_ready().mean()), float(host_pattern.in_valid().mean()))
    return min(int(np.ceil(budget / on)) + 2 * HOST_PATTERN_CYCLES, MAX_CYCLE_LIMIT)


def cycle_limit(program: Program, batch: int, host_pattern=None) -> int:
    """The default cycle limit of a run, the same on the emulator and the RTL: :func:`cycle_budget` stretched by
    the host pattern (:func:`stretched`)."""
    return stretched(cycle_budget(program, batch), host_pattern)


def stall_window(program: Program) -> int:
    """Cycles without any host transfer (input accepted or output received) after which a run counts as stuck:
    half the budget of a whole inference (:func:`cycle_budget` of batch 1), i.e. twice the sequential estimate of
    one inference (every transfer, hop and COMPUTE of every tile one after the other), which bounds the gap between
    two host transfers of a run that progresses: in the pipeline's fill the first output comes within one
    inference's latency, later outputs within a bottleneck period (without host stalls; the RTL runner stretches
    the window by the host pattern)."""
    return max(1, cycle_budget(program, 1) // 2)


@dataclass(frozen=True)
class TileProgress:
    """One tile on the flits' path, over a whole batch (counts of flits, not cycles)."""

    position: int          # chain position
    row: int
    col: int
    port: str              # the router input port its flits arrive on (N, E, S, W)
    source: str            # "the host" or "tile rXcY"
    reads: int             # flits it reads per inference (n_in_words + n_pass)
    emits: int             # flits it emits per inference
    arriving: int          # flits that reach it over the batch
    received: int          # flits it reads over the batch
    emitted: int           # flits it emits over the batch
    finished: int          # inferences whose every input flit it read
    batch: int

    @property
    def key(self) -> str:
        return f"r{self.row}c{self.col}"

    @property
    def stuck(self) -> bool:
        """Whether its input side waits forever (it never reads all inferences' flits)."""
        return self.finished < self.batch

    @property
    def waiting_has(self) -> int:
        """Flits it has of the inference it waits in (``stuck`` only)."""
        return self.received - self.finished * self.reads

    def describe(self) -> str:
        if self.reads == 0:
            return (f"tile ({self.row},{self.col}) input side reads no flits (n_in_words + n_pass = 0) but "
                    f"{self.source} sends it {self.arriving}")
        total = f" ({self.received} of {self.reads * self.batch} over the batch)" if self.batch > 1 else ""
        return (f"tile ({self.row},{self.col}) input side waits on port {self.port} (from {self.source}) in "
                f"inference {self.finished}: {self.waiting_has} of {self.reads} words received{total}")


@dataclass(frozen=True)
class FlitProgress:
    """Where the flits of a batch go (:func:`flit_progress`)."""

    tiles: tuple[TileProgress, ...]     # in data order
    host_received: int                  # output flits the host would receive
    host_expected: int
    host_sent: int                      # input flits the host sends (tile (0,0) reads at most these)
    cycle: bool                         # the path returns to a tile instead of reaching the host

    @property
    def stuck(self) -> list[TileProgress]:
        return [tile for tile in self.tiles if tile.stuck]

    @property
    def completes(self) -> bool:
        return not self.stuck and not self.cycle and self.host_received >= self.host_expected


def _partial_emits(count: TileCounts, received: int) -> int:
    """Output transfers a tile makes for an inference of which it has read ``received`` input flits: the longest
    prefix of its output order (section 4.4) whose pops have their words pushed and whose EMITs have their COMPUTE
    (which begins once the last stored word arrived)."""
    if received >= count.flits_in:
        return count.flits_out
    recv = min(received, count.n_in_words)
    pushes = max(0, min(recv, count.forward_end) - count.forward_begin) if count.n_forward else 0
    pushes += max(0, received - count.n_in_words)
    computed = bool(count.n_out) and recv >= count.store_end
    done = popped = 0
    for is_pop in count.output_is_pop():
        if is_pop:
            if popped >= pushes:
                break
            popped += 1
        elif not computed:
            break
        done += 1
    return done


def flit_progress(program: Program, batch: int) -> FlitProgress:
    """Follow ``batch`` inferences' flits by their counts along the configured destinations (see the module
    docstring); works on programs whose counts do not add up (the registers must pass ``Program.validate``)."""
    arch = program.arch
    counts = [tile_counts(tile, arch) for tile in program.tiles]
    position_of = {arch.chain_position(p): p for p in range(arch.n_tiles)}
    arriving = batch * program.input_words
    host_sent = arriving
    position, port, source = position_of[(0, 0)], "W", "the host"
    tiles: list[TileProgress] = []
    seen: set[int] = set()
    cycle = False
    while True:
        if position in seen:
            cycle = True
            break
        seen.add(position)
        tile, count = program.tiles[position], counts[position]
        reads = count.flits_in
        if reads:
            finished = min(batch, arriving // reads)
            received = min(arriving, batch * reads)
            emitted = finished * count.flits_out
            if finished < batch:
                emitted += _partial_emits(count, received - finished * reads)
        else:
            finished = batch if arriving == 0 else 0
            received, emitted = 0, 0
        tiles.append(TileProgress(position, tile.row, tile.col, port, source, reads, count.flits_out, arriving,
                                  received, emitted, finished, batch))
        config = tile.config
        if config.dest_host:
            target = arch.exit_tile
        else:
            target = (config.dest_row, config.dest_col)
        expected = batch * program.output_words
        if count.flits_out == 0:
            return FlitProgress(tuple(tiles), 0, expected, host_sent, cycle)
        if not config.dest_host and target == (tile.row, tile.col):
            return FlitProgress(tuple(tiles), 0, expected, host_sent, True)
        try:
            fifos, _ = _route(arch, (tile.row, tile.col), "L", target, bool(config.dest_host), f"tile {tile.key}")
        except EmulatorError:
            return FlitProgress(tuple(tiles), 0, expected, host_sent, cycle)
        if config.dest_host:
            return FlitProgress(tuple(tiles), emitted, expected, host_sent, cycle)
        port, source = fifos[-1][2], f"tile {tile.key}"
        position, arriving = position_of[target], emitted
    return FlitProgress(tuple(tiles), 0, batch * program.output_words, host_sent, cycle)


def stuck_summary(progress: FlitProgress, limit: int = 2) -> str:
    """One clause naming where a run that cannot finish stalls (the first stuck tiles in data order, the host
    output's count), or '' if it finishes."""
    stuck = progress.stuck
    parts = [tile.describe() for tile in stuck[:limit]]
    if len(stuck) > limit:
        parts.append(f"{len(stuck) - limit} more tile(s) downstream starve")
    if progress.cycle:
        parts.append("the data path returns to a tile and never reaches the host")
    if progress.host_received < progress.host_expected:
        parts.append(f"the host output would receive {progress.host_received} of {progress.host_expected} flits")
    return "; ".join(parts)


class DeadlockError(EmulatorError):
    """The program cannot finish: its flit counts do not add up, so a tile waits forever for flits its upstream
    never sends. ``stuck``: the :class:`TileProgress` of the tiles that wait (data order, the root cause first);
    ``progress``: the whole :class:`FlitProgress`."""

    def __init__(self, message: str, progress: FlitProgress | None = None):
        super().__init__(message)
        self.progress = progress
        self.stuck = [] if progress is None else progress.stuck


class WatchdogError(EmulatorError):
    """The run needs more cycles than its limit (``max_cycles``); the message says what each tile had done by
    then. ``limit``: the cycle limit; ``cycles``: what the run needs; ``tiles``: per unfinished tile ``(row, col,
    inputs read, inputs expected, outputs emitted, outputs expected)``."""

    def __init__(self, message: str, limit: int, cycles: int, tiles: list[tuple[int, int, int, int, int, int]]):
        super().__init__(message)
        self.limit, self.cycles, self.tiles = limit, cycles, tiles


def progress_at(program: Program, batch: int, path, timing, limit: int) -> WatchdogError | None:
    """A :class:`WatchdogError` describing an emulated run stopped at cycle ``limit`` (the first ``limit`` cycles
    ``0 .. limit-1`` run), or None if the run's last output transfer falls inside them."""
    out_times = timing.out_times
    cycles = int(out_times[-1]) + 1
    if cycles <= limit:
        return None
    in_done = int(np.count_nonzero(timing.in_times < limit))
    out_done = int(np.count_nonzero(out_times < limit))
    last = [int(t[t < limit].max()) for t in (timing.in_times, out_times) if np.any(t < limit)]
    tiles, parts = [], []
    for position in path.order:
        pe_times, count = timing.pe_times[position], path.counts[position]
        tile = program.tiles[position]
        got = int(np.count_nonzero(pe_times.input < limit))
        sent = int(np.count_nonzero(pe_times.output < limit))
        want_in, want_out = batch * count.flits_in, batch * count.flits_out
        for times in (pe_times.input, pe_times.output):
            if np.any(times < limit):
                last.append(int(times[times < limit].max()))
        if got < want_in or sent < want_out:
            tiles.append((tile.row, tile.col, got, want_in, sent, want_out))
            parts.append(f"({tile.row},{tile.col}) in {got}/{want_in} out {sent}/{want_out}")
    last_progress = max(last) if last else None
    message = (f"run stopped at the cycle limit of {limit} cycles (it needs {cycles}): the host output received "
               f"{out_done} of {out_times.size} flits, the chip accepted {in_done} of {timing.in_times.size} input "
               f"flits, last transfer at cycle {last_progress}; unfinished tiles (flits in/out of expected): "
               + ", ".join(parts[:6]) + (f" and {len(parts) - 6} more" if len(parts) > 6 else ""))
    return WatchdogError(message, limit, cycles, tiles)
