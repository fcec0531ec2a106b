"""``flowtile fuzz``: a small fixed slice on a local Dask cluster, resuming, and a forced mismatch.

Every test uses campaign seed 1 with ``--archs 1``: one 3x4 grid (8 lanes), so the Verilator build is made once
(cached across tests and runs).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flowtile import cli
from flowtile.fuzz import AGREEING, CampaignSummary, STATUSES, arch_pool, case_seeds

SLICE = ["fuzz", "--seed", "1", "--archs", "1", "--workers", "1", "--no-progress"]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_arch_pool_and_case_seeds_are_seeded():
    assert arch_pool(1, 3) == arch_pool(1, 3)
    assert arch_pool(1, 3) != arch_pool(2, 3)
    assert case_seeds(1, 3) == [1_000_000, 1_000_001, 1_000_002]
    for arch in arch_pool(0, 20):
        assert arch.lanes in (4, 8, 16) and 1 <= arch.router_fifo_depth <= 4
    for seed in range(5):   # every pool of 3 or more covers every lane count
        assert {arch.lanes for arch in arch_pool(seed, 3)} == {4, 8, 16}


def test_last_line_counts():
    summary = CampaignSummary(programs=5, new=2, architectures=2,
                              counts={"ok": 2, "does-not-fit": 1, "mismatch-cycles": 1, "error": 1}, wall_seconds=3.25)
    assert not summary.agreed
    assert summary.last_line() == ("fuzz: 5 programs run (2 new, 3 from results.jsonl), 2 architectures, 1 mismatch "
                                   "(mismatch-cycles 1), 1 did not fit, 1 error, wall time 3.2 s")
    assert CampaignSummary(1, 1, 1, {"does-not-fit": 1}, 0.0).agreed


def test_bad_arguments_are_refused(tmp_path, capsys):
    assert cli.main(["fuzz", "--programs", "0", "--out", str(tmp_path)]) == cli.EXIT_BAD_INPUT
    assert "--programs must be at least 1" in capsys.readouterr().err


@pytest.mark.rtl
def test_slice_passes_and_resumes(tmp_path, capsys):
    out = tmp_path / "campaign"
    assert cli.main(SLICE + ["--programs", "3", "--out", str(out)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("fuzz: 3 programs run (3 new, 0 from results.jsonl), 1 architecture, 0 mismatches")
    records = _records(out)
    assert len(records) == 3
    assert sorted(r["seed"] for r in records) == case_seeds(1, 3)
    for record in records:
        assert record["status"] in STATUSES and record["status"] in AGREEING, record
        assert record["wall_seconds"] > 0 and record["arch"]["rows"] == arch_pool(1, 1)[0].rows
        assert record["kind"] in ("mlp", "cnn", "resnet")
    assert any(r["status"] == "ok" and r["cycles"] == r["rtl_cycles"] > 0 for r in records)
    # resume: nothing runs again (no cluster is even started), the file keeps its 3 lines
    assert cli.main(SLICE + ["--programs", "3", "--out", str(out)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("fuzz: 3 programs run (0 new, 3 from results.jsonl)")
    assert _records(out) == records
    # a torn last line (an interrupted write) is ignored and the case runs again
    with open(out / "results.jsonl", "a") as results:
        results.write('{"seed": 10000')
    assert cli.main(SLICE + ["--programs", "4", "--out", str(out)]) == 0
    assert "(1 new, 3 from results.jsonl)" in capsys.readouterr().out.strip().splitlines()[-1]


@pytest.mark.rtl
def test_forced_mismatch_saves_a_reproducer(tmp_path, capsys, monkeypatch):
    out = tmp_path / "campaign"
    monkeypatch.setenv("FLOWTILE_FUZZ_FAULT", "flip-emulator-bit")   # flips one emulator output bit in the worker
    status = cli.main(SLICE + ["--programs", "2", "--out", str(out), "--shrink-attempts", "3"])
    monkeypatch.delenv("FLOWTILE_FUZZ_FAULT")
    assert status == cli.EXIT_MISMATCH
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "2 mismatches (mismatch-bits 2)" in last, last
    records = _records(out)
    assert [r["status"] for r in records] == ["mismatch-bits"] * 2
    assert "files" not in records[0] and "output flits differ" in records[0]["message"]
    # shrunk: the fault makes every candidate disagree, so each attempt is kept: one inference, then smaller networks
    for record in records:
        shrunk = record["shrunk"]
        assert 1 <= shrunk["attempts"] <= 3 and shrunk["batch"] == 1 and shrunk["kind"] == record["kind"]
        assert shrunk["network"] != record["network"] or shrunk["attempts"] == 1
    seed = case_seeds(1, 1)[0]
    case = out / f"case_{seed}"
    assert (case / "program" / "program.json").is_file() and (case / "x.npy").is_file()
    assert (case / "model.onnx").is_file()
    repro = out / f"test_repro_{seed}.py"
    assert repro.is_file() and "shrunk in" in repro.read_text()
    # one program inference: as many real ones as the program has copies of the network
    from flowtile.program import Program
    assert len(__import__("numpy").load(case / "x.npy")) == Program.load(case / "program").replicas
    # The fault was injected in the fuzzer, not in the flow: the saved case replays clean.
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(repro)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "2 passed" in run.stdout


def test_every_third_architecture_is_a_line_of_chips():
    """Multi-chip systems are fuzzed too (dense link frames, copies of the network, cuts): every third architecture
    of a pool is 2 or 3 chips with random links (fault free), named with their link fields."""
    from flowtile.fuzz import MULTICHIP_EVERY, arch_name
    pool = arch_pool(4, 9)
    for index, arch in enumerate(pool):
        multichip = index % MULTICHIP_EVERY == MULTICHIP_EVERY - 1
        assert (arch.chips > 1) == multichip and arch.link_error_rate == 0
        assert arch_name(arch).startswith(f"{arch.chips}x-b{arch.link_bits}-") == multichip
        if multichip:
            assert 1 <= arch.link_bits <= arch.flit_data_bits and 1 <= arch.link_credit_frames <= 8
