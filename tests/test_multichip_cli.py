"""The command line on several chips: ``--chips N`` on compile, emulate's report and pictures, verilog."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from flowtile import cli
from flowtile.program import Program

from test_cli import DIGITS, ROOT


def test_compile_emulate_and_report_on_two_chips(tmp_path, capsys):
    prog = tmp_path / "prog"
    assert cli.main(["compile", str(DIGITS), "--chips", "2", "--grid", "1x2", "-o", str(prog)]) == 0
    out = capsys.readouterr().out
    assert "link bound on the interval" in out and "0 (chip 0 -> 1)" in out
    program = Program.load(prog)
    assert program.arch.chips == 2 and len(program.links) == 1 and {t.chip for t in program.tiles} == {0, 1}
    with np.load(ROOT / "models" / "digits_test.npz") as data:
        np.save(tmp_path / "x.npy", data["x"][:8])
    paths = {name: tmp_path / name for name in ("y.npy", "r.json", "t.json", "h.png")}
    assert cli.main(["emulate", str(prog), "--input", str(tmp_path / "x.npy"), "--output", str(paths["y.npy"]),
                     "--report", str(paths["r.json"]), "--trace", str(paths["t.json"]),
                     "--heatmap", str(paths["h.png"])]) == 0
    report = json.loads(paths["r.json"].read_text())
    link = report["links"][0]
    assert report["chips"] == 2 and link["flits_per_inference"] == program.links[0].inference_flits
    # per program inference: the default Arch may run copies of the network on the chips
    assert link["frames"] == 8 // program.replicas * link["frames_per_inference"] and 0 < link["utilization"] <= 1
    names = {e["args"]["name"] for e in json.loads(paths["t.json"].read_text())["traceEvents"]
             if e.get("name") == "process_name"}
    assert any(name.startswith("tile 2 chip 1 (0,0)") for name in names), names
    width, height = Image.open(paths["h.png"]).size
    assert width > height   # two chip panels side by side


def test_verilog_of_two_chips_has_one_tile_and_one_link_module(tmp_path, capsys):
    out = tmp_path / "system.v"
    assert cli.main(["verilog", "--chips", "2", "--grid", "1x2", "-o", str(out)]) == 0
    text = out.read_text()
    modules = [line.split("(")[0].split()[1] for line in text.splitlines() if line.startswith("module ")]
    top_level = [m for m in modules if "." not in m and not m.startswith("\\")]
    assert top_level == ["flowtile_tile", "flowtile_link", "flowtile_system"], top_level
    assert "2 chips of 1x2 tiles" in capsys.readouterr().out


def test_chips_out_of_range_is_a_clean_error(tmp_path, capsys):
    assert cli.main(["compile", str(DIGITS), "--chips", "0", "-o", str(tmp_path / "p")]) == cli.EXIT_BAD_INPUT
    assert "arch field 'chips'" in capsys.readouterr().err


def test_compile_and_emulate_a_replicated_stage(tmp_path, capsys):
    """``--stage FIRST:LAST``: two copies of fc2 (docs/architecture.md section 12, replicated stages), fc1 and fc3
    shared in two turns; the outputs equal one copy's. A malformed value or an unknown layer: one-line errors."""
    staged, single = tmp_path / "staged", tmp_path / "single"
    grid = ["--chips", "2", "--grid", "2x2"]
    assert cli.main(["compile", str(DIGITS), *grid, "--stage", "fc2:fc2", "-o", str(staged)]) == 0
    assert "2 copies of layers 'fc2' .. 'fc2'" in capsys.readouterr().out
    assert cli.main(["compile", str(DIGITS), *grid, "--replicas", "1", "-o", str(single)]) == 0
    program = Program.load(staged)
    assert program.replicas == 2
    assert [(layer.name, layer.turns) for layer in program.layers] == [("fc1", 2), ("fc2 [copy 0]", 1),
                                                                      ("fc2 [copy 1]", 1), ("fc3", 2)]
    with np.load(ROOT / "models" / "digits_test.npz") as data:
        np.save(tmp_path / "x.npy", data["x"][:6])
    outputs = {}
    for name in ("staged", "single"):
        outputs[name] = tmp_path / f"{name}.npy"
        assert cli.main(["emulate", str(tmp_path / name), "--input", str(tmp_path / "x.npy"),
                         "--output", str(outputs[name])]) == 0
    np.testing.assert_array_equal(np.load(outputs["staged"]), np.load(outputs["single"]))
    capsys.readouterr()
    assert cli.main(["compile", str(DIGITS), *grid, "--stage", "fc2", "-o", str(tmp_path / "bad")]) != 0
    assert "--stage must be FIRST:LAST" in capsys.readouterr().err
    assert cli.main(["compile", str(DIGITS), *grid, "--stage", "fc2:fc9", "-o", str(tmp_path / "bad")]) \
        == cli.EXIT_BAD_INPUT
    assert "no layer named 'fc9'" in capsys.readouterr().err
