"""Corrupt program directories end in one line and exit status 2 from ``emulate`` and ``rtl``, never a traceback
or a silent run (reliability issue, item 6). The program is loaded and validated before any simulation starts, so
the ``rtl`` cases cost no Verilator build."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from flowtile.testing.cli_checks import assert_cli_refuses


@pytest.fixture
def program(tmp_path, digits_program, digits_inputs):
    """A copy of the compiled digits program to corrupt, with ``x.npy`` beside it."""
    copy = tmp_path / "prog"
    shutil.copytree(digits_program, copy)
    return copy


def edit_manifest(program: Path, edit) -> None:
    manifest = json.loads((program / "program.json").read_text())
    edit(manifest)
    (program / "program.json").write_text(json.dumps(manifest))


def first_computing_tile(manifest):
    return next(tile for tile in manifest["tiles"] if tile["config"]["n_out"])


def assert_refused(capsys, program: Path, *fragments):
    for command in ("emulate", "rtl"):
        output = program.parent / f"y_{command}.npy"
        assert_cli_refuses(capsys, [command, program, "--input", program.parent / "x.npy", "--output", output],
                           *fragments)
        assert not output.exists(), f"{command} wrote outputs for a corrupt program"


def test_truncated_arrays(capsys, program):
    data = (program / "arrays.npz").read_bytes()
    (program / "arrays.npz").write_bytes(data[: len(data) // 2])
    assert_refused(capsys, program, "arrays.npz")


def test_missing_arrays(capsys, program):
    (program / "arrays.npz").unlink()
    assert_refused(capsys, program, "arrays.npz")


def test_truncated_manifest(capsys, program):
    text = (program / "program.json").read_text()
    (program / "program.json").write_text(text[: len(text) // 2])
    assert_refused(capsys, program, "program.json", "not valid JSON")


def test_wrong_format_version(capsys, program):
    edit_manifest(program, lambda m: m.update(version=m["version"] + 1))
    assert_refused(capsys, program, "format version")


def test_register_out_of_range(capsys, program):
    edit_manifest(program, lambda m: first_computing_tile(m)["config"].update(kernel_h=100000))
    assert_refused(capsys, program, "kernel_h")


def test_negative_register(capsys, program):
    edit_manifest(program, lambda m: first_computing_tile(m)["config"].update(n_out=-3))
    assert_refused(capsys, program, "n_out")


def test_unknown_register(capsys, program):
    edit_manifest(program, lambda m: first_computing_tile(m)["config"].update(turbo=1))
    assert_refused(capsys, program, "turbo")


def test_missing_register(capsys, program):
    edit_manifest(program, lambda m: first_computing_tile(m)["config"].pop("n_in_words"))
    assert_refused(capsys, program, "n_in_words")


def test_tile_outside_the_grid(capsys, program):
    edit_manifest(program, lambda m: m["tiles"][0].update(row=99))
    assert_refused(capsys, program, "99")


def test_sram_image_of_the_wrong_size(capsys, program):
    with np.load(program / "arrays.npz") as arrays:
        contents = {name: arrays[name] for name in arrays.files}
    name = next(name for name in contents if name.endswith("_sram"))
    contents[name] = np.zeros(len(contents[name]) + 7, np.int8)
    np.savez(program / "arrays.npz", **contents)
    assert_refused(capsys, program, name.removesuffix("_sram"))


def test_array_missing_for_a_listed_tile(capsys, program):
    with np.load(program / "arrays.npz") as arrays:
        contents = {name: arrays[name] for name in arrays.files}
    name = next(name for name in contents if name.endswith("_params"))
    del contents[name]
    np.savez(program / "arrays.npz", **contents)
    assert_refused(capsys, program, "arrays.npz", name)


def test_manifest_missing_a_section(capsys, program):
    edit_manifest(program, lambda m: m.pop("input"))
    assert_refused(capsys, program, "program.json", "input")
