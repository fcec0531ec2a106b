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
    """[chips, rows, cols] fraction of each PE's lane-cycles that issued a MAC over the whole run (padding lanes of
    a word count as issued; ``result.mac_utilization`` is the useful fraction of all chips)."""
    arch = program.arch
    macs = np.asarray(result.tile_macs, dtype=np.float64).reshape(arch.chips, arch.rows, arch.cols)
    return macs / (max(1, int(result.cycles)) * arch.lanes)


def _layer_places(program: Program) -> dict[tuple[int, int, int], str]:
    """(chip, row, col) -> name of the layer computing there (``LayerInfo.tiles`` holds (row, col) on one chip)."""
    return {tuple(t) if len(t) == 3 else (0, *t): layer.name for layer in program.layers for t in layer.tiles}


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
    layer_of = _layer_places(program)
    for position, (tile, spans) in enumerate(zip(program.tiles, result.tile_timelines)):
        chip = f"chip {tile.chip} " if program.arch.chips > 1 else ""
        label = f"tile {position} {chip}({tile.row},{tile.col})"
        if (tile.chip, tile.row, tile.col) in layer_of:
            label += f" {layer_of[(tile.chip, tile.row, tile.col)]}"
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
    # one panel per chip, side by side in line order (the links join each panel's exit to the next one's (0,0))
    fig, axes = plt.subplots(1, arch.chips, figsize=(arch.chips * (1.2 * arch.cols + 0.5) + 1.5, 1.2 * arch.rows + 1.2),
                             squeeze=False)
    layer_of = _layer_places(program)
    for chip, ax in enumerate(axes[0]):
        image = ax.imshow(100 * util[chip], vmin=0, vmax=100, cmap="viridis")
        for r in range(arch.rows):
            for c in range(arch.cols):
                text = f"{100 * util[chip, r, c]:.0f}%\n{layer_of.get((chip, r, c), 'pass')}"
                ax.text(c, r, text, ha="center", va="center", fontsize=7,
                        color="white" if util[chip, r, c] < 0.6 else "black")
        ax.set_xticks(range(arch.cols))
        ax.set_yticks(range(arch.rows))
        ax.set_xlabel("column")
        ax.set_ylabel("row")
        if arch.chips > 1:
            ax.set_title(f"chip {chip}", fontsize=9)
    whole = "the chip" if arch.chips == 1 else f"all {arch.chips} chips"
    fig.suptitle(f"MAC lanes issued per tile, {int(result.cycles)} cycles\n"
                 f"(padding lanes count as issued; useful MAC utilization of {whole}: "
                 f"{100 * result.mac_utilization:.1f}%)", fontsize=9)
    fig.colorbar(image, ax=list(axes[0]), label="% of lane-cycles issued")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def write_visuals(program: Program, result, *, trace=None, heatmap=None) -> None:
    if trace:
        Path(trace).parent.mkdir(parents=True, exist_ok=True)
        Path(trace).write_text(json.dumps(perfetto_trace(program, result)))
    if heatmap:
        write_heatmap(program, result, heatmap)
