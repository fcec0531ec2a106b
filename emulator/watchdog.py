"""The run watchdog (docs/architecture.md sections 5 and 6): how long a run may take, where a run that cannot
finish gets stuck, and the one-line reports the emulator and the RTL runner give instead of hanging.

* :func:`cycle_budget`, :func:`stall_window` (defined in the spec, :mod:`flowtile.run_limits`, and shared with
  the RTL runner): a generous cycle limit for ``batch`` inferences from a program's registers alone, and the
  cycles a run may go without a host transfer before it counts as stuck.
* :func:`flit_progress` (in :mod:`.path`, beside the data path it follows): follows the program's flit counts
  (not its cycles) from the host through the tiles along their configured destinations, like the hardware would move them, also for programs whose counts do not
  add up: per tile the flits it would receive and emit over the whole batch and, for a tile that cannot finish,
  the inference it waits in, the router port it waits on and the words it has of the words it needs. A program
  whose counts add up finishes (section 6: the data path is acyclic, every side waits only on its own upstream,
  so any FIFO, queue or ring depth >= 1 only slows it down); one whose counts do not stalls exactly where
  :func:`flit_progress` says (or emits flits the program does not account for).
* :func:`progress_at`: from an emulated run's transfer times, each tile's and the host's transfers before a
  cycle limit (what the RTL would show when stopped there).
"""
from __future__ import annotations

import numpy as np

from flowtile.program import Program
from flowtile.run_limits import (BUDGET_BASE_CYCLES, BUDGET_FACTOR, MAX_CYCLE_LIMIT, cycle_budget, cycle_limit,
                                 stall_window, stretched)

from .path import (DeadlockError, EmulatorError, FlitProgress, TileProgress, flit_progress,  # noqa: F401
                   stuck_summary)

__all__ = ["BUDGET_FACTOR", "BUDGET_BASE_CYCLES", "MAX_CYCLE_LIMIT", "cycle_budget", "cycle_limit", "stretched",
           "stall_window", "TileProgress",
           "FlitProgress", "flit_progress", "DeadlockError", "WatchdogError", "progress_at", "stuck_summary"]

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
        # the flits the tile takes from and gives to its router: with several contexts (section 4.6) its first
        # context's input transfers and its last context's output transfers (the rest cross its loop-back FIFO);
        # with several turns (section 12) all of them
        contexts = timing.context_times[position] if count.contexts and count.turns == 1 else (pe_times,)
        got = int(np.count_nonzero(contexts[0].input < limit))
        sent = int(np.count_nonzero(contexts[-1].output < limit))
        want_in, want_out = batch * count.tile_flits_in, batch * count.tile_flits_out
        for times in (pe_times.input, pe_times.output):
            if np.any(times < limit):
                last.append(int(times[times < limit].max()))
        if got < want_in or sent < want_out:
            tiles.append((tile.row, tile.col, got, want_in, sent, want_out))
            place = f"({tile.row},{tile.col})" if tile.chip == 0 else f"chip {tile.chip} ({tile.row},{tile.col})"
            parts.append(f"{place} in {got}/{want_in} out {sent}/{want_out}")
    links = []
    for index, times in enumerate(getattr(timing, "link_times", [])):   # several chips
        taken, delivered = int(np.count_nonzero(times.accept < limit)), int(np.count_nonzero(times.deliver < limit))
        if delivered < times.deliver.size:
            links.append(f"link {index} took {taken}, delivered {delivered} of {times.deliver.size} flits")
        for events in (times.accept, times.deliver):
            if np.any(events < limit):
                last.append(int(events[events < limit].max()))
    last_progress = max(last) if last else None
    message = (f"run stopped at the cycle limit of {limit} cycles (it needs {cycles}): the host output received "
               f"{out_done} of {out_times.size} flits, the chip accepted {in_done} of {timing.in_times.size} input "
               f"flits, last transfer at cycle {last_progress}; unfinished tiles (flits in/out of expected): "
               + ", ".join(parts[:6]) + (f" and {len(parts) - 6} more" if len(parts) > 6 else "")
               + ("; " + ", ".join(links) if links else ""))
    return WatchdogError(message, limit, cycles, tiles)
