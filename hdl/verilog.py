"""Verilog generation for a whole chip or system, hierarchically: the tile module once (and the link module once),
then the chip or system instantiating them.

Amaranth writes one Verilog module per elaboratable instance, so a chip whose tiles are submodules
repeats the tile's hardware ``rows * cols`` times (75 MB for 11x11). Every tile is the same circuit
(its position arrives on ports), so :func:`chip_verilog` converts ``Tile(arch)`` once and a chip of
``Instance``\\ s of it (``Chip(arch, tiles="instances")``). Likewise every link of a system is the same circuit
but for its fault seed, which arrives on a port: :func:`system_verilog` converts ``Link(arch, seed_port=True)`` once
(:func:`link_verilog`) and a system whose chips hold tile instances and whose links are instances of it.
"""
from __future__ import annotations

import sys
import time

from amaranth.back import verilog

from flowtile.arch import Arch

from .chip import TILE_MODULE_NAME, Chip
from .layouts import check_arch
from .link import Link
from .system import LINK_MODULE_NAME, System
from .tile import Tile

__all__ = ["chip_verilog", "tile_verilog", "link_verilog", "system_verilog", "hierarchical_verilog", "progress",
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


def link_verilog(arch: Arch, name: str = LINK_MODULE_NAME, *, emit_src: bool = False) -> str:
    """Verilog text of ``Link(arch, seed_port=True)`` (every parameter from ``arch``'s ``link_*`` fields, the fault
    seed on the 32-bit input port ``seed``) as module ``name``: the one link module of :func:`system_verilog`."""
    check_arch(arch, "link_verilog")
    _check_name(name, "link_verilog", "name")
    return verilog.convert(Link(arch, seed_port=True), name=name, emit_src=emit_src)


def hierarchical_verilog(arch: Arch, top, name: str, *, tile_module: str = TILE_MODULE_NAME,
                         link_module: str | None = None, emit_src: bool = False, quiet: bool = False) -> str:
    """Verilog of ``top`` (an elaboratable holding ``Chip(arch, tiles="instances", tile_module=...)``, or
    ``System(arch, tiles="instances", tile_module=..., link_module=...)``) as module ``name``, preceded by the tile
    module it instantiates and, with ``link_module`` (for a System of ``arch.chips > 1``), the link module.

    Prints progress lines with an estimate and the elapsed time unless ``quiet``.
    """
    check_arch(arch, "hierarchical_verilog")
    _check_name(name, "hierarchical_verilog", "name")
    if link_module is not None:
        _check_name(link_module, "hierarchical_verilog", "link_module")
    started = time.perf_counter()
    if not quiet:
        progress(f"generating tile module {tile_module} (usually ~{TILE_SECONDS_ESTIMATE:.0f} s)")
    text = tile_verilog(arch, tile_module, emit_src=emit_src)
    if link_module is not None and arch.chips > 1:
        if not quiet:
            progress(f"generating link module {link_module}")
        text += link_verilog(arch, link_module, emit_src=emit_src)
    if not quiet:
        instances = arch.n_tiles * arch.chips
        estimate = INSTANCE_SECONDS_ESTIMATE * instances + 1
        progress(f"generating {name} with {instances} tile instances (usually ~{estimate:.0f} s)")
    top_text = verilog.convert(top, name=name, emit_src=emit_src)
    if not quiet:
        progress(f"Verilog generated in {time.perf_counter() - started:.1f} s")
    return text + top_text


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


def system_verilog(arch: Arch, name: str = "flowtile_system", *, emit_src: bool = False, quiet: bool = False) -> str:
    """Verilog text of the system for ``arch`` (``arch.chips`` chips in a line or a ring,
    :class:`flowtile.hdl.system.System`) as module ``name``, preceded by the one tile module
    (:data:`flowtile.hdl.chip.TILE_MODULE_NAME`) and, with more than one chip, the one link module
    (:data:`flowtile.hdl.system.LINK_MODULE_NAME`, :func:`link_verilog`) it instantiates; each chip is a small module
    of tile instances.

    Ports as :func:`chip_verilog`'s (``load__payload`` has the ``chip`` field on top) plus, per link ``k``
    (``chips - 1`` links in a line, ``chips`` in a ring), the status outputs ``link{k}__inference_flits``,
    ``link{k}__tx_ack``, ``link{k}__tx_freed`` and ``link{k}__<counter>``
    (:data:`flowtile.hdl.system.LINK_STATUS_COUNTERS`).
    """
    check_arch(arch, "system_verilog")
    _check_name(name, "system_verilog", "name")
    if name in (TILE_MODULE_NAME, LINK_MODULE_NAME):
        raise ValueError(f"system_verilog: parameter 'name' must differ from the tile and link modules' names "
                         f"{TILE_MODULE_NAME!r}, {LINK_MODULE_NAME!r}")
    system = System(arch, tiles="instances", link_module=LINK_MODULE_NAME)
    return hierarchical_verilog(arch, system, name, link_module=LINK_MODULE_NAME, emit_src=emit_src, quiet=quiet)
