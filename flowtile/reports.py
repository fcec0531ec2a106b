"""Pictures and traces people would rather look at: per-tile utilization heatmaps (PNG) and
Perfetto / Chrome trace-event timelines (JSON, open in https://ui.perfetto.dev or chrome://tracing).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .program import Program
from .tile_config import TileConfig

__all__ = ["tile_utilization", "perfetto_trace", "write_visuals", "pixel_band_label"]


def tile_utilization(program: Program, result) -> np.ndarray:
    """[rows, cols] fraction of each PE's lane-cycles that issued a MAC over the whole run (padding lanes of
    a word count as issued; ``result.mac_utilization`` is the useful fraction of the whole chip)."""
    return np.asarray(result.tile_macs, dtype=np.float64) / (max(1, int(result.cycles)) * program.arch.lanes)


def pixel_band_label(config: TileConfig) -> str:
    """A computing windowed tile's output pixels (docs/architecture.md section 4.1), ``"px (oy,ox)..(oy,ox)"``,
    first and last in row-major order (a band may begin and end inside a row); ``""`` for a tile that computes
    nothing or a single pixel (dense layers)."""
    if not config.n_out or config.output_pixels < 2:
        return ""
    first_row, last_row = config.out_row_begin, config.out_row_begin + config.out_rows - 1
    return f"px ({first_row},{config.out_col_begin})..({last_row},{config.band_end - 1})"


#: Which side of a PE (docs/architecture.md section 4) each timeline phase belongs to; each side is one track.
PHASE_SIDES = {"RECV": "input", "PASS": "input", "COMPUTE": "compute", "FORWARD": "output", "EMIT": "output"}
SIDES = ("input", "compute", "output")


def perfetto_trace(program: Program, result) -> dict:
    """Trace-event JSON: one process per tile (chain order; named by position, grid place, layer and, for a
    windowed tile, its band of output pixels, :func:`pixel_band_label`) with one track per PE side (input,
    compute, output), one slice per phase of each inference (``result.tile_timelines``: a COMPUTE slice spans
    ``[c_s, a_last + d_last + 2)``, from the first issue of the inference's first result word to the drain after
    its last one, waits for a free slot of the result ring included; docs/architecture.md sections 4 and 6).

    Timestamps are cycles (shown as microseconds by the viewers: 1 us = 1 cycle).
    """
    events = []
    layer_of = {tuple(t): layer.name for layer in program.layers for t in layer.tiles}
    for position, (tile, spans) in enumerate(zip(program.tiles, result.tile_timelines)):
        label = f"tile {position} ({tile.row},{tile.col})"
        if (tile.row, tile.col) in layer_of:
            label += f" {layer_of[(tile.row, tile.col)]}"
        band = pixel_band_label(tile.config)
        if band:
            label += f" {band}"
        pid = position + 1
        events.append({"ph": "M", "name": "process_name", "pid": pid, "args": {"name": label}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": pid, "args": {"sort_index": position}})
        for tid, side in enumerate(SIDES):
            events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": f"{side} side"}})
            events.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid, "args": {"sort_index": tid}})
        for start, end, phase in spans:
            events.append({"ph": "X", "name": str(phase), "pid": pid, "tid": SIDES.index(PHASE_SIDES[str(phase)]),
                           "ts": int(start), "dur": max(1, int(end) - int(start))})
    return {"traceEvents": events, "displayTimeUnit": "ns",
            "otherData": {"model": program.model_name, "cycles": int(result.cycles),
                          "time_unit": "1 us in the viewer = 1 clock cycle"}}


def write_heatmap(program: Program, result, path: str | Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    util = tile_utilization(program, result)
    arch = program.arch
    fig, ax = plt.subplots(figsize=(1.2 * arch.cols + 2, 1.2 * arch.rows + 1))
    image = ax.imshow(100 * util, vmin=0, vmax=100, cmap="viridis")
    layer_of = {tuple(t): layer.name for layer in program.layers for t in layer.tiles}
    for r in range(arch.rows):
        for c in range(arch.cols):
            text = f"{100 * util[r, c]:.0f}%\n{layer_of.get((r, c), 'pass')}"
            ax.text(c, r, text, ha="center", va="center", fontsize=7,
                    color="white" if util[r, c] < 0.6 else "black")
    ax.set_xticks(range(arch.cols))
    ax.set_yticks(range(arch.rows))
    ax.set_xlabel("column")
    ax.set_ylabel("row")
    ax.set_title(f"MAC lanes issued per tile, {int(result.cycles)} cycles\n"
                 f"(padding lanes count as issued; useful MAC utilization of the chip: "
                 f"{100 * result.mac_utilization:.1f}%)", fontsize=9)
    fig.colorbar(image, ax=ax, label="% of lane-cycles issued")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_visuals(program: Program, result, *, trace=None, heatmap=None) -> None:
    if trace:
        Path(trace).parent.mkdir(parents=True, exist_ok=True)
        Path(trace).write_text(json.dumps(perfetto_trace(program, result)))
    if heatmap:
        write_heatmap(program, result, heatmap)
