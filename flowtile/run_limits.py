"""How long a run may take, the same for the emulator and the RTL runner (docs/architecture.md sections 5 and 6):
a generous cycle budget from a program's registers alone (no model of the machine), stretched by host stalls, and
the no-progress window after which a run counts as stuck. Spec layer: both models read it, neither owns it."""
from __future__ import annotations

import numpy as np

from .host import HOST_PATTERN_CYCLES
from .link_format import LinkGeometry
from .program import Program

__all__ = ["BUDGET_FACTOR", "BUDGET_BASE_CYCLES", "MAX_CYCLE_LIMIT", "FAULT_GO_BACKS", "cycle_budget", "cycle_limit", "stretched",
           "stall_window"]

#: The cycle budget is this many times a sequential (no overlap at all) estimate of the run ...
BUDGET_FACTOR = 4
#: ... plus this many cycles (covers pipeline fill of tiny programs).
BUDGET_BASE_CYCLES = 1000
#: Consecutive go-backs of a faulty link the no-progress window allows for (:func:`stall_window`).
FAULT_GO_BACKS = 16
#: The largest cycle limit the harness's 32-bit cycle counter can compare against.
MAX_CYCLE_LIMIT = (1 << 32) - 1


def cycle_budget(program: Program, batch: int) -> int:
    """A generous cycle limit for ``batch`` inferences of ``program``, from its registers only.

    Upper bound idea: even if no two tiles ever overlapped, every tile's work per inference is its
    input and output transfers (a forwarded or passed word is both), its COMPUTE (``I + 2``, plus 1 to
    enter it; docs/architecture.md section 4) and a few cycles per flit of FIFO hops, and every link's frames each
    a whole round trip (section 12); the budget is
    :data:`BUDGET_FACTOR` times that plus :data:`BUDGET_BASE_CYCLES`.
    """
    arch = program.arch
    hop_cycles = arch.router_fifo_depth + 2
    per_inference = 0
    for tile in program.tiles:
        for config in tile.contexts:   # a tile's contexts (section 4.6) one after another, each like a tile
            # input transfers, output transfers (forwarded and passed words leave through the forward queue) and EMITs
            transfers = (config.n_in_words + 2 * config.n_pass + config.forwarded_words
                         + config.result_words(arch.lanes))
            compute = config.compute_cycles + 1 if config.n_out else 0
            # a tile of several turns (section 12) runs its inference once a turn per program inference
            per_inference += tile.turns * (transfers * hop_cycles + compute)
    host = (program.input_words + program.output_words) * hop_cycles
    # a link (section 12) per inference: its frames one after another, each a whole round trip (frame, wire both
    # ways, a return message period and its delay) as if nothing overlapped
    links = 0
    if program.links:
        geometry = LinkGeometry(arch)
        round_trip = geometry.accept_delay + geometry.message_period + geometry.message_delay
        links = sum(geometry.frames(link.inference_flits) * round_trip for link in program.links)
    budget = BUDGET_FACTOR * (batch * (per_inference + host + links) + arch.system_tiles * hop_cycles) \
        + BUDGET_BASE_CYCLES
    return min(budget, MAX_CYCLE_LIMIT)


def stretched(budget: int, host_pattern=None) -> int:
    """``budget`` stretched by a host pattern's least on-fraction (a stalled host slows the whole run), as the RTL
    runner's limits are: ``ceil(budget / on) + 2 * HOST_PATTERN_CYCLES``, at most :data:`MAX_CYCLE_LIMIT`."""
    if host_pattern is None:
        return budget
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
    the window by the host pattern). With faults on the links (``link_error_rate > 0``) each link may also spend
    :data:`FAULT_GO_BACKS` go-backs in a row (a timeout, then its whole replay window again) before the gap counts
    as stuck: a link too noisy to get a frame through that often is reported as where the run is stuck."""
    window = max(1, cycle_budget(program, 1) // 2)
    if program.links and program.arch.link_error_rate > 0:
        geometry = LinkGeometry(program.arch)
        go_back = geometry.default_timeout() + geometry.replay_frames * geometry.frame_beats
        window += len(program.links) * FAULT_GO_BACKS * go_back
    return window
