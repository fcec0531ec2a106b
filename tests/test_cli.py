"""The command line as a user meets it: bad input gives one clear line and a non-zero exit."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from flowtile.program import Program

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_mlp.onnx"


def flowtile(*args, cwd=None):
    env = dict(os.environ, AMARANTH_USE_YOSYS="builtin")
    env.pop("FLOWTILE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "flowtile.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd or ROOT, env=env, timeout=600)


def assert_clean_error(result, *fragments):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("flowtile: error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def float_mlp(path: Path, widths, *, op_between="Relu"):
    rng = np.random.default_rng(1)
    nodes, inits = [], []
    current = "x"
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        inits += [numpy_helper.from_array(rng.standard_normal((n_in, n_out)).astype(np.float32) * 0.1, f"w{i}"),
                  numpy_helper.from_array(np.zeros(n_out, np.float32), f"b{i}")]
        nodes.append(helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [f"h{i}"], name=f"gemm_{i}"))
        current = f"h{i}"
        if i < len(widths) - 2:
            nodes.append(helper.make_node(op_between, [current], [f"a{i}"], name=f"act_{i}"))
            current = f"a{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, widths[0]])],
                              [helper.make_tensor_value_info(current, TensorProto.FLOAT, [None, widths[-1]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return path


def test_oversize_model_fails_at_compile_time(tmp_path):
    model = float_mlp(tmp_path / "big.onnx", [300, 300, 300, 300])
    result = flowtile("compile", model, "--grid", "1x2", "-o", tmp_path / "prog")
    assert_clean_error(result, "bytes")
    assert not (tmp_path / "prog").exists(), "no partial output may be left behind"


def test_unsupported_op_is_named(tmp_path):
    model = float_mlp(tmp_path / "sig.onnx", [8, 8, 4], op_between="Sigmoid")
    result = flowtile("compile", model, "-o", tmp_path / "prog")
    assert_clean_error(result, "Sigmoid", "act_0")


def test_malformed_model_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf")
    assert_clean_error(flowtile("compile", bad, "-o", tmp_path / "prog"), "bad.onnx")


def test_bad_arch_field_is_named(tmp_path):
    arch = tmp_path / "a.toml"
    arch.write_text("rows = 4\ncols = 4\nlanes = 3\n")
    assert_clean_error(flowtile("compile", DIGITS, "--arch", arch, "-o", tmp_path / "prog"), "lanes")
    assert_clean_error(flowtile("compile", DIGITS, "--grid", "4by4", "-o", tmp_path / "prog"), "--grid")


def test_wrong_input_shape_names_expected_and_given(tmp_path):
    prog = tmp_path / "prog"
    assert flowtile("compile", DIGITS, "-o", prog).returncode == 0
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((3, 65), np.float32))
    result = flowtile("emulate", prog, "--input", x, "--output", tmp_path / "y.npy")
    assert_clean_error(result, "[3, 65]", "64")
    assert not (tmp_path / "y.npy").exists()


def test_emulate_writes_outputs_report_trace_and_heatmap(tmp_path):
    prog = tmp_path / "prog"
    assert flowtile("compile", DIGITS, "-o", prog).returncode == 0
    with np.load(ROOT / "models" / "digits_test.npz") as data:
        np.save(tmp_path / "x.npy", data["x"][:16])
    result = flowtile("emulate", prog, "--input", tmp_path / "x.npy", "--output", tmp_path / "y.npy",
                      "--report", tmp_path / "r.json", "--trace", tmp_path / "t.json", "--heatmap", tmp_path / "h.png")
    assert result.returncode == 0, result.stderr
    import json
    y = np.load(tmp_path / "y.npy")
    assert y.shape == (16, 10)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["cycles"] > 0 and 0 < report["mac_utilization"] <= 1
    trace = json.loads((tmp_path / "t.json").read_text())
    slices = [event for event in trace["traceEvents"] if event["ph"] == "X"]
    sides = {"RECV": 0, "PASS": 0, "COMPUTE": 1, "FORWARD": 2, "EMIT": 2}
    assert slices and all(sides[event["name"]] == event["tid"] for event in slices)  # one track per PE side
    tracks = {}
    for event in slices:
        tracks.setdefault((event["pid"], event["tid"]), []).append((event["ts"], event["ts"] + event["dur"]))
    for spans in tracks.values():  # a side does one thing at a time
        spans.sort()
        assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))
    computing = {pid for pid, tid in tracks if tid == 1}
    # one COMPUTE per program inference (the default Arch may run copies of the network) and context of a tile
    program = Program.load(prog)
    per_inference = -(-16 // program.replicas)    # the host pads the batch to a multiple of the copies
    expected = [per_inference * sum(1 for config in (tile.config, *tile.later_contexts) if config.n_out)
                for tile in program.tiles]
    assert computing and sorted(len(tracks[(pid, 1)]) for pid in computing) == sorted(n for n in expected if n)
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"


def test_verilog_command_writes_a_module(tmp_path):
    out = tmp_path / "chip.v"
    result = flowtile("verilog", "--grid", "2x2", "-o", out)
    assert result.returncode == 0, result.stderr
    assert "module" in out.read_text()


def _digits_subset(tmp_path, n):
    with np.load(ROOT / "models" / "digits_test.npz") as data:
        path = tmp_path / "digits.npz"
        np.savez(path, x=data["x"][:n], y=data["y"][:n])
    return path


@pytest.mark.rtl
def test_run_compares_rtl_emulator_and_onnxruntime(tmp_path):
    result = flowtile("run", DIGITS, "--input", _digits_subset(tmp_path, 12), "--report", tmp_path / "r.json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS: RTL and emulator agree" in result.stdout
    assert "accuracy flowtile" in result.stdout
    import json
    assert json.loads((tmp_path / "r.json").read_text())["match"] is True


@pytest.mark.rtl
def test_run_exits_1_and_names_the_mismatch(tmp_path, monkeypatch, capsys):
    """A single flipped output bit in the emulator must be caught by the comparison."""
    import flowtile.emulator as emulator
    from flowtile import cli

    real_emulate = emulator.emulate

    def corrupted_emulate(program, flits, batch):
        result = real_emulate(program, flits, batch)
        result.out_flits[3, 0] ^= 1
        return result

    monkeypatch.setattr(emulator, "emulate", corrupted_emulate)
    status = cli.main(["run", str(DIGITS), "--input", str(_digits_subset(tmp_path, 4))])
    out = capsys.readouterr().out
    assert status == 1
    assert "RTL vs emulator outputs" in out and "1 flits differ" in out and "MISMATCH" in out


@pytest.mark.rtl
def test_rtl_command_writes_outputs_and_waves(tmp_path):
    prog = tmp_path / "prog"
    # A traced build is separate from the untraced one: a 2x2 grid keeps its compile short.
    assert flowtile("compile", DIGITS, "--grid", "2x2", "-o", prog).returncode == 0
    with np.load(ROOT / "models" / "digits_test.npz") as data:
        np.save(tmp_path / "x.npy", data["x"][:3])
    waves = tmp_path / "waves.fst"
    result = flowtile("rtl", prog, "--input", tmp_path / "x.npy", "--output", tmp_path / "y.npy",
                      "--waves", waves, "--report", tmp_path / "r.json")
    assert result.returncode == 0, result.stderr
    emulated = flowtile("emulate", prog, "--input", tmp_path / "x.npy", "--output", tmp_path / "y_emu.npy")
    assert emulated.returncode == 0, emulated.stderr
    assert np.array_equal(np.load(tmp_path / "y.npy"), np.load(tmp_path / "y_emu.npy"))
    assert waves.stat().st_size > 0


def test_cnn_input_of_the_wrong_shape_names_expected_and_given(tmp_path):
    prog = tmp_path / "prog"
    assert flowtile("compile", ROOT / "models" / "digits_cnn.onnx", "-o", prog).returncode == 0
    np.save(tmp_path / "flat.npy", np.zeros((2, 64), np.float32))
    result = flowtile("emulate", prog, "--input", tmp_path / "flat.npy", "--output", tmp_path / "y.npy")
    assert_clean_error(result, "[2, 64]", "1, 8, 8")


def test_rtl_batch_larger_than_a_harness_too_small_to_stream_is_a_clean_error(tmp_path):
    arch = tmp_path / "small_host.toml"
    arch.write_text("host_buffer_flits = 4\n")   # below MIN_STREAMING_BUFFER: larger batches cannot stream
    prog = tmp_path / "prog"
    assert flowtile("compile", DIGITS, "--arch", arch, "-o", prog).returncode == 0
    with np.load(ROOT / "models" / "digits_test.npz") as data:
        np.save(tmp_path / "x.npy", data["x"][:3])   # 3 inferences x 8 input flits > 4
    result = flowtile("rtl", prog, "--input", tmp_path / "x.npy", "--output", tmp_path / "y.npy")
    assert_clean_error(result, "host_buffer_flits")
    assert not (tmp_path / "y.npy").exists()


def test_version_and_every_option_shows_its_default():
    result = flowtile("--version")
    assert result.returncode == 0 and result.stdout.startswith("flowtile "), result.stdout + result.stderr
    from flowtile.cli import build_parser
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict)).choices
    for name, sub in subparsers.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                shown = sub.formatter_class("flowtile")._get_help_string(action)
                assert "default" in shown or (action.required and "(required)" in shown), (name, shown)


def test_calibration_on_a_quantized_model_is_an_error(tmp_path):
    np.save(tmp_path / "cal.npy", np.zeros((4, 64), np.float32))
    assert_clean_error(flowtile("compile", DIGITS, "--calibration", tmp_path / "cal.npy", "-o", tmp_path / "p"),
                       "--calibration", "already quantized")
    assert not (tmp_path / "p").exists()
    assert_clean_error(flowtile("run", DIGITS, "--sim", "none", "--calibration", tmp_path / "cal.npy"),
                       "--calibration", "already quantized")


def test_batch_beside_input_is_an_error(tmp_path):
    assert_clean_error(flowtile("run", DIGITS, "--sim", "none", "--input", _digits_subset(tmp_path, 4),
                                "--batch", "3"), "--batch", "--input")
    assert_clean_error(flowtile("run", DIGITS, "--sim", "none", "--batch", "0"), "--batch")


def test_inputs_that_saturate_warn_unless_silenced(tmp_path):
    """The digits MLP takes pixels in 0..1; the same pixels as 0..255 saturate and must be flagged."""
    prog = tmp_path / "prog"
    assert flowtile("compile", DIGITS, "-o", prog).returncode == 0
    with np.load(ROOT / "models" / "digits_test.npz") as data:
        x = data["x"][:8]
    np.save(tmp_path / "ok.npy", x)
    np.save(tmp_path / "scaled.npy", x * 255)
    out = tmp_path / "y.npy"
    quiet = flowtile("emulate", prog, "--input", tmp_path / "ok.npy", "--output", out)
    assert quiet.returncode == 0 and "saturate" not in quiet.stderr, quiet.stderr
    loud = flowtile("emulate", prog, "--input", tmp_path / "scaled.npy", "--output", out)
    assert loud.returncode == 0 and "saturate" in loud.stderr and "--no-range-check" in loud.stderr, loud.stderr
    silenced = flowtile("emulate", prog, "--input", tmp_path / "scaled.npy", "--output", out, "--no-range-check")
    assert silenced.returncode == 0 and "saturate" not in silenced.stderr, silenced.stderr


def test_stall_options_that_do_nothing_are_an_error(tmp_path, digits_program, digits_inputs):
    out = tmp_path / "y.npy"
    assert_clean_error(flowtile("emulate", digits_program, "--input", digits_inputs, "--output", out,
                                "--out-burst", "9"), "--out-burst", "do nothing")
    assert_clean_error(flowtile("emulate", digits_program, "--input", digits_inputs, "--output", out,
                                "--out-duty", "0.5", "--out-burst", "0.2"), "burst")
    assert not out.exists()
