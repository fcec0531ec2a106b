"""Verilog generation for a whole chip, hierarchically: the tile module once, then the chip instantiating it.

Amaranth writes one Verilog module per elaboratable instance, so a chip whose tiles are submodules
repeats the tile's hardware ``rows * cols`` times (75 MB for 11x11). Every tile is the same circuit
(its position arrives on ports), so :func:`chip_verilog` converts ``Tile(arch)`` once and a chip of
``Instance``\\ s of it (``Chip(arch, tiles="instances")``).
"""
from __future__ import annotations

import sys
import time

from amaranth.back import verilog

from flowtile.arch import Arch

from .chip import TILE_MODULE_NAME, Chip
from .layouts import check_arch
from .tile import Tile

__all__ = ["chip_verilog", "tile_verilog", "hierarchical_verilog", "progress",
           "TILE_SECONDS_ESTIMATE", "INSTANCE_SECONDS_ESTIMATE"]

#: Rough cost of converting the tile module, and of each tile instance in the enclosing module,
#: measured on the project's 2-core machine (default Arch); only used for the progress estimate.
TILE_SECONDS_ESTIMATE = 2.0
INSTANCE_SECONDS_ESTIMATE = 0.02


def progress(message: str) -> None:
    """One ``[flowtile] ...`` progress line on stderr (the command line's convention)."""
    print(f"[flowtile] {message}", file=sys.stderr, flush=True)


def _check_name(name, who: str, parameter: str) -> None:
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"{who}: parameter '{parameter}' must be a Verilog identifier, got {name!r}")


def tile_verilog(arch: Arch, name: str = TILE_MODULE_NAME, *, emit_src: bool = False) -> str:
    """Verilog text of ``Tile(arch)`` as module ``name`` (its submodules are named ``name.router`` etc.)."""
    check_arch(arch, "tile_verilog")
    _check_name(name, "tile_verilog", "name")
    return verilog.convert(Tile(arch), name=name, emit_src=emit_src)


def hierarchical_verilog(arch: Arch, top, name: str, *, tile_module: str = TILE_MODULE_NAME,
                         emit_src: bool = False, quiet: bool = False) -> str:
    """Verilog of ``top`` (an elaboratable holding ``Chip(arch, tiles="instances", tile_module=...)``)
    as module ``name``, preceded by the tile module it instantiates.

    Prints progress lines with an estimate and the elapsed time unless ``quiet``.
    """
    check_arch(arch, "hierarchical_verilog")
    _check_name(name, "hierarchical_verilog", "name")
    started = time.perf_counter()
    if not quiet:
        progress(f"generating tile module {tile_module} (usually ~{TILE_SECONDS_ESTIMATE:.0f} s)")
    tile_text = tile_verilog(arch, tile_module, emit_src=emit_src)
    if not quiet:
        estimate = INSTANCE_SECONDS_ESTIMATE * arch.n_tiles + 1
        progress(f"generating {name} with {arch.n_tiles} tile instances (usually ~{estimate:.0f} s)")
    top_text = verilog.convert(top, name=name, emit_src=emit_src)
    if not quiet:
        progress(f"Verilog generated in {time.perf_counter() - started:.1f} s")
    return tile_text + top_text


def chip_verilog(arch: Arch, name: str = "flowtile_chip", *, emit_src: bool = False, quiet: bool = False) -> str:
    """Verilog text of the chip for ``arch`` as module ``name`` plus the one tile module it instantiates
    ``rows * cols`` times (:data:`flowtile.hdl.chip.TILE_MODULE_NAME`).

    The chip's ports flatten as ``load__valid``, ``load__payload``, ``run``, ``i_host__payload/valid/ready``,
    ``o_host__payload/valid/ready`` (plus ``clk`` and ``rst``). ``emit_src`` keeps Amaranth's source
    location attributes (off: they double the text); ``quiet`` silences the progress lines on stderr.
    """
    check_arch(arch, "chip_verilog")
    _check_name(name, "chip_verilog", "name")
    if name == TILE_MODULE_NAME:
        raise ValueError(f"chip_verilog: parameter 'name' must differ from the tile module's name {TILE_MODULE_NAME!r}")
    chip = Chip(arch, tiles="instances")
    # A Component carries its ports in its signature, so convert() needs no port list.
    return hierarchical_verilog(arch, chip, name, emit_src=emit_src, quiet=quiet)
