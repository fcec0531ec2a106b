"""Steady-state throughput of an emulated batch, as the benchmarks report it.

The pipeline is many inferences deep (latency / interval) and its tiles settle into their periodic schedule only
after a transient, so the steady-state interval is measured over the last half of the batch; the mean over the
whole batch (:attr:`flowtile.emulator.EmulatorResult.interval_cycles`) includes the fill.
"""
from __future__ import annotations

from dataclasses import dataclass

from flowtile.emulator import EmulatorResult
from flowtile.program import LayerInfo, Program

__all__ = ["SteadyState", "steady_state", "settled"]


@dataclass(frozen=True)
class SteadyState:
    """The steady-state ``interval`` (cycles/inference) of ``program`` and the MAC utilizations it gives
    (MACs / (interval x tiles x lanes))."""
    program: Program
    interval: float

    @property
    def used_tiles(self) -> int:
        """The tiles that compute (those of the layers; a tile of several contexts once, section 4.6)."""
        return len({tuple(tile) for layer in self.program.layers for tile in layer.tiles})

    def layer_utilization(self, layer: LayerInfo) -> float:
        """One layer's MACs (once a turn, section 12) over its own tiles (a tile shared with other layers as contexts
        counts whole)."""
        return layer.macs * layer.turns / (self.interval * len(layer.tiles) * self.program.arch.lanes)

    @property
    def grid_utilization(self) -> float:
        """The network's MACs over the whole grid."""
        arch = self.program.arch
        return self.program.macs_per_inference / (self.interval * arch.system_tiles * arch.lanes)

    @property
    def computing_utilization(self) -> float:
        """The network's MACs over the tiles that compute."""
        return self.program.macs_per_inference / (self.interval * self.used_tiles * self.program.arch.lanes)

    @property
    def busiest_layer(self) -> LayerInfo:
        """The layer whose tiles are busiest (the measured limiter: the highest per-tile utilization)."""
        return max(self.program.layers, key=self.layer_utilization)


def _interval_after(program: Program, result: EmulatorResult, batch: int, first: int) -> float:
    """Mean cycles between the last output flits of consecutive inferences from inference ``first`` on."""
    last_flits = result.out_times.reshape(batch, program.output_words)[:, -1]
    return float(last_flits[-1] - last_flits[first]) / (batch - 1 - first)


def steady_state(program: Program, result: EmulatorResult, batch: int) -> SteadyState:
    """The interval between the last output flits of consecutive inferences over the last half of the batch
    (the whole run's mean, ``result.interval_cycles``, for a batch under 4)."""
    interval = _interval_after(program, result, batch, batch // 2) if batch >= 4 else result.interval_cycles
    return SteadyState(program, interval)


def settled(program: Program, result: EmulatorResult, batch: int, tolerance: float = 0.01) -> bool:
    """Whether the batch's last half is steady state: the interval over its last quarter is within ``tolerance`` of
    the one over its last half (:func:`steady_state`; False for a batch under 8). A chain of many tiles settles into
    its periodic schedule only after a long transient (ResNet-8 on 32x8 tiles: 10069 cycles over the last half of a
    batch of 16, 8730 of 64, 6482, its estimate, of 512; docs/architecture.md section 10), so a benchmark checks it
    instead of reporting part of the fill as steady state."""
    if batch < 8:
        return False
    over_half = _interval_after(program, result, batch, batch // 2)
    over_quarter = _interval_after(program, result, batch, batch - batch // 4)
    return abs(over_half - over_quarter) <= tolerance * over_quarter
