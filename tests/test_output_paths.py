"""No command of flowtile deletes or overwrites a file that is not its own output (issue: reliability, item 1).

Each case runs the command line in-process, as a user would call it, and checks three things: exit status 2, one
line ``flowtile: error: ...`` naming the path, and every file that was there before still there, byte for byte.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from flowtile import cli
from flowtile.program import Program
from flowtile.testing.cli_checks import assert_cli_refuses as refused

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_mlp.onnx"


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_compile_into_a_directory_of_user_files_is_refused(tmp_path, capsys):
    mydata = tmp_path / "mydata"
    mydata.mkdir()
    (mydata / "notes.txt").write_text("precious")
    (mydata / "sub").mkdir()
    (mydata / "sub" / "more.bin").write_bytes(b"\0\1")
    before = snapshot(mydata)
    refused(capsys, ["compile", DIGITS, "-o", mydata], "mydata", "not a flowtile program", "notes.txt")
    assert snapshot(mydata) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mydata"], "no staging directory left behind"


def test_compile_into_an_empty_directory_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    refused(capsys, ["compile", DIGITS, "-o", tmp_path / "empty"], "no program.json")
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())


def test_compile_into_the_working_directory_is_refused(tmp_path, capsys, monkeypatch):
    model = tmp_path / "model.onnx"
    model.write_bytes(DIGITS.read_bytes())
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    refused(capsys, ["compile", "model.onnx", "-o", "."])
    assert snapshot(tmp_path) == before
    refused(capsys, ["compile", "model.onnx", "-o", tmp_path.parent])  # a directory holding the working directory
    assert snapshot(tmp_path) == before


def test_compile_onto_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "result.bin"
    target.write_bytes(b"user data")
    refused(capsys, ["compile", DIGITS, "-o", target], "result.bin", "not a directory")
    assert target.read_bytes() == b"user data"
    model = tmp_path / "model.onnx"
    model.write_bytes(DIGITS.read_bytes())
    refused(capsys, ["compile", model, "-o", model], "model.onnx")
    assert model.read_bytes() == DIGITS.read_bytes()


def test_compile_under_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "plain").write_text("x")
    refused(capsys, ["compile", DIGITS, "-o", tmp_path / "plain" / "prog"], "is a file")


def test_compile_directory_holding_a_foreign_program_json_is_refused(tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "program.json").write_text('{"format": "something-else"}')
    refused(capsys, ["compile", DIGITS, "-o", other], "not a flowtile-program manifest")
    assert (other / "program.json").read_text() == '{"format": "something-else"}'


def compile_digits(out: Path, *options) -> dict[str, bytes]:
    """``flowtile compile`` of the digits MLP into ``out`` (``options`` before ``-o``) succeeds; returns the
    program directory's :func:`snapshot`."""
    assert cli.main(["compile", str(DIGITS), *options, "-o", str(out)]) == 0
    return snapshot(out)


def test_compile_replaces_its_own_program_directory_atomically(tmp_path, capsys):
    prog = tmp_path / "prog"
    first = compile_digits(prog)
    second = compile_digits(prog, "--grid", "2x3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prog"], "no staging or replaced directory left"
    assert second != first and Program.load(prog).arch.cols == 3
    # A program directory with a file the user added is no longer flowtile's alone: refused, nothing lost.
    (prog / "my_notes.txt").write_text("mine")
    refused(capsys, ["compile", DIGITS, "-o", prog], "my_notes.txt")
    assert (prog / "my_notes.txt").read_text() == "mine"


def test_failed_compile_keeps_the_previous_program(tmp_path, capsys):
    prog = tmp_path / "prog"
    before = compile_digits(prog)
    # 3 layers do not fit one tile of one context
    refused(capsys, ["compile", DIGITS, "--arch", ROOT / "archs" / "lean.toml", "--grid", "1x1", "-o", prog])
    assert snapshot(prog) == before


def test_program_directory_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        assert cli.main(["compile", str(DIGITS), "-o", str(tmp_path / "prog")]) == 0
        os.umask(0o027)
        assert cli.main(["compile", str(DIGITS), "-o", str(tmp_path / "prog2")]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "prog").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "prog" / "program.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "prog2").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "prog2" / "arrays.npz").stat().st_mode) == 0o640


@pytest.mark.parametrize("option", ["--output", "--report", "--trace", "--heatmap"])
def test_emulate_output_that_is_a_directory_is_refused_before_work(tmp_path, capsys, digits_program, digits_inputs,
                                                                   option):
    paths = {"--output": tmp_path / "y.npy", "--report": None, "--trace": None, "--heatmap": None}
    paths[option] = tmp_path / "adir"
    (tmp_path / "adir").mkdir()
    argv = ["emulate", digits_program, "--input", digits_inputs]
    for name, path in paths.items():
        if path is not None:
            argv += [name, path]
    refused(capsys, argv, option, "adir", "is a directory")
    assert not (tmp_path / "y.npy").exists(), "the check comes before the work"


def test_emulate_output_over_its_input_is_refused(tmp_path, capsys, digits_program, digits_inputs):
    before = digits_inputs.read_bytes()
    refused(capsys, ["emulate", digits_program, "--input", digits_inputs, "--output", digits_inputs],
            "--output", "--input")
    assert digits_inputs.read_bytes() == before
    refused(capsys, ["emulate", digits_program, "--input", digits_inputs, "--output", tmp_path / "y.npy",
                     "--report", tmp_path / "y.npy"], "--report", "--output")


def test_emulate_output_under_a_file_is_refused(tmp_path, capsys, digits_program, digits_inputs):
    (tmp_path / "plain").write_text("x")
    refused(capsys, ["emulate", digits_program, "--input", digits_inputs, "--output", tmp_path / "plain" / "y.npy"],
            "is a file")


def test_rtl_output_and_waves_are_checked_before_the_build(tmp_path, capsys, digits_program, digits_inputs):
    (tmp_path / "adir").mkdir()
    refused(capsys, ["rtl", digits_program, "--input", digits_inputs, "--output", tmp_path / "adir"],
            "--output", "adir")
    refused(capsys, ["rtl", digits_program, "--input", digits_inputs, "--output", tmp_path / "y.npy",
                     "--waves", tmp_path / "adir"], "--waves", "adir")
    assert not (tmp_path / "y.npy").exists()


def test_run_report_trace_heatmap_are_checked_before_work(tmp_path, capsys):
    (tmp_path / "adir").mkdir()
    for option in ("--report", "--trace", "--heatmap"):
        refused(capsys, ["run", DIGITS, "--sim", "none", option, tmp_path / "adir"], option, "adir")
    refused(capsys, ["run", DIGITS, "--sim", "none", "--report", DIGITS], "--report", "model")


def test_verilog_output_directory_is_refused_at_once(tmp_path, capsys):
    (tmp_path / "adir").mkdir()
    refused(capsys, ["verilog", "--grid", "11x11", "-o", tmp_path / "adir"], "-o/--output", "is a directory")
