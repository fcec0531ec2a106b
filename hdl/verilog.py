"""Verilog generation for a whole chip."""
from __future__ import annotations

from amaranth.back import verilog

from flowtile.arch import Arch

from .chip import Chip
from .layouts import check_arch

__all__ = ["chip_verilog"]


def chip_verilog(arch: Arch, name: str = "flowtile_chip") -> str:
    """Verilog text of ``Chip(arch)`` as module ``name``; ports flatten as ``load__valid``,
    ``load__payload``, ``run``, ``i_host__payload/valid/ready``, ``o_host__payload/valid/ready``
    (plus ``clk`` and ``rst``)."""
    check_arch(arch, "chip_verilog")
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"chip_verilog: parameter 'name' must be a Verilog identifier, got {name!r}")
    chip = Chip(arch)
    # A Component carries its ports in its signature, so convert() needs no port list.
    return verilog.convert(chip, name=name)
