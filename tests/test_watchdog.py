"""The run watchdog (flowtile.emulator.watchdog): programs that cannot finish stop, on the emulator and on the RTL,
with one message naming the stuck tiles, their ports and their flit counts, instead of hanging or returning garbage;
``max_cycles`` / ``--max-cycles`` bounds a run on both.

The broken programs are built with ``program_builder`` and then edited register by register (a tile that waits for
more flits than its upstream sends, a PASS count that never completes, a tile that sends too few flits on).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest

from flowtile import cli
from flowtile.testing.archs import lean_arch
from flowtile.emulator import DeadlockError, EmulatorError, WatchdogError, cycle_budget, emulate, flit_progress
from flowtile.host import pack_flits
from flowtile.testing.program_builder import Dense, build_program

ARCH = lean_arch(rows=2, cols=2, lanes=2, sram_bytes=4096, max_tile_outputs=64, router_fifo_depth=2)
#: The Verilator tests' grid (shared with tests/test_rtl_flow.py, so its build is usually cached).
RTL_ARCH = lean_arch(rows=2, cols=2, lanes=4, sram_bytes=1024, max_tile_outputs=16, result_ring_words=4,
                     router_fifo_depth=4, host_buffer_flits=256)


def _dense(rng, n_in, n_out, tiles=1):
    return Dense(rng.integers(-8, 8, (n_out, n_in)).astype(np.int8), rng.integers(-50, 50, n_out), 1 << 20, 24,
                 tiles=tiles)


def _program(arch=ARCH):
    """Chain r0c0 -> r0c1 (one 2L -> 2L dense layer over two tiles) -> r1c1 (2L -> L) -> r1c0 (pass) -> host:
    the host sends 2 words, r0c0 forwards them and adds its 1 result word, r0c1 reads those 3 and sends 2, r1c1
    sends 1, which r1c0 passes on."""
    rng = np.random.default_rng(3)
    lanes = arch.lanes
    return build_program(arch, [_dense(rng, 2 * lanes, 2 * lanes, tiles=2), _dense(rng, 2 * lanes, lanes)])


def _edited(position, arch=ARCH, **registers):
    program = copy.deepcopy(_program(arch))
    tile = program.tiles[position]
    tile.config = tile.config.replace(**registers)
    return program


def _flits(program, batch):
    return np.zeros((batch * program.input_words, program.arch.lanes), np.int8)


# --- emulator ------------------------------------------------------------------------------------------

def test_tile_expecting_more_words_than_its_upstream_emits_names_tile_port_and_counts():
    program = _edited(1, n_pass=2)       # r0c1 reads 2 + 2 flits, r0c0 sends 3
    with pytest.raises(DeadlockError, match=r"the run would stall: tile \(0,1\) input side waits on port W "
                                            r"\(from tile r0c0\) in inference 0: 3 of 4 words received") as caught:
        emulate(program, _flits(program, 2), 2)
    first = caught.value.stuck[0]
    assert (first.row, first.col, first.port, first.waiting_has, first.reads) == (0, 1, "W", 3, 4)
    # the starved tiles downstream and the host output are named too
    assert "tile (1,1) input side waits on port N" in str(caught.value)
    assert "the host output would receive 0 of 1 flits" in str(caught.value)


def test_pass_count_that_never_completes():
    program = _edited(3, n_pass=2)       # the pass-through tail r1c0 waits for a second word that never comes
    with pytest.raises(DeadlockError, match=r"tile \(1,0\) input side waits on port E \(from tile r1c1\) in "
                                            r"inference 0: 1 of 2 words received"):
        emulate(program, _flits(program, 1), 1)


def test_host_sends_fewer_words_than_the_first_tile_expects():
    program = _edited(0, n_in_words=3)
    with pytest.raises(DeadlockError, match=r"tile \(0,0\) input side waits on port W \(from the host\) in "
                                            r"inference 0: 2 of 3 words received"):
        emulate(program, _flits(_program(), 1), 1)


def test_surplus_flits_are_refused_without_a_stall():
    program = _edited(1, dest_host=1)    # r0c1 sends 2 flits a inference straight to the host, which expects 1
    with pytest.raises(EmulatorError, match="surplus flits would be read as the next inference's") as caught:
        emulate(program, _flits(program, 1), 1)
    assert not isinstance(caught.value, DeadlockError)


def test_flit_progress_over_a_batch():
    """3 of 4 flits per inference reach r0c1: over 4 inferences it reads 12 = 3 whole inferences and waits in the
    fourth with none of its words; its 3 inferences' 9 flits (2 PASS pops + 1 result each) are more than r1c1's 4
    inferences need: no stall downstream (garbage instead)."""
    progress = flit_progress(_edited(1, n_pass=2), 4)
    by_key = {tile.key: tile for tile in progress.tiles}
    assert [tile.key for tile in progress.stuck] == ["r0c1"]
    stuck = by_key["r0c1"]
    assert (stuck.finished, stuck.received, stuck.waiting_has) == (3, 12, 0)
    assert "in inference 3: 0 of 4 words received (12 of 16 over the batch)" in stuck.describe()
    assert not progress.completes
    assert flit_progress(_program(), 4).completes


def test_max_cycles_stops_the_emulator_and_names_unfinished_tiles():
    program, batch = _program(), 3
    cycles = emulate(program, _flits(program, batch), batch).cycles
    assert emulate(program, _flits(program, batch), batch, max_cycles=cycles).cycles == cycles
    with pytest.raises(WatchdogError, match=rf"stopped at the cycle limit of {cycles - 5} cycles \(it needs "
                                            rf"{cycles}\): the host output received \d of 3 flits") as caught:
        emulate(program, _flits(program, batch), batch, max_cycles=cycles - 5)
    assert caught.value.tiles and "unfinished tiles" in str(caught.value)
    assert cycles < cycle_budget(program, batch)       # the default limit never stops a run that finishes


def _save_case(tmp_path, program, batch):
    directory = program.save(tmp_path / "prog")
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((batch, program.input.length), np.float32))
    return str(directory), str(x), str(tmp_path / "y.npy")


def test_cli_emulate_max_cycles(tmp_path, capsys):
    program = _program()
    prog, x, y = _save_case(tmp_path, program, 2)
    assert cli.main(["emulate", prog, "--input", x, "--output", y, "--max-cycles", "10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "flowtile: error: run stopped at the cycle limit of 10 cycles" in err[0]
    assert cli.main(["emulate", prog, "--input", x, "--output", y]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main(["emulate", prog, "--input", x, "--output", y, "--max-cycles", "0"])
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["rtl"].format_help()
    assert "--max-cycles N" in help_text and "derived from the program" in " ".join(help_text.split())


def test_cli_emulate_names_the_stuck_tile(tmp_path, capsys):
    prog, x, y = _save_case(tmp_path, _edited(1, n_pass=2), 1)
    assert cli.main(["emulate", prog, "--input", x, "--output", y]) == 2
    assert "tile (0,1) input side waits on port W" in capsys.readouterr().err


# --- RTL (Verilator) -----------------------------------------------------------------------------------

@pytest.mark.rtl
def test_rtl_stuck_program_stops_within_the_window_and_names_the_tile():
    from flowtile.rtl import simulate as rtl
    # r0c1 waits for a PASS word that never comes (with a larger batch the surplus of its extra PASS pops would
    # feed r1c1 enough flits: garbage, not a stall; the emulator refuses both)
    program, batch = _edited(1, RTL_ARCH, n_pass=2), 1
    with pytest.raises(rtl.RtlTimeoutError) as caught:
        rtl.simulate(program, _flits(program, batch), batch)
    error = caught.value
    message = str(error)
    assert "\n" not in message
    assert error.reason == "no progress" and "no host transfer for" in message
    window = rtl.stall_window(program)
    # stuck within the first inference; stopped 1 to 1.25 windows after the last host transfer
    assert window <= error.cycle <= 1.25 * window + 100 < cycle_budget(program, batch)
    assert f"the chip accepted {error.in_sent} of {batch * program.input_words} input flits" in message
    assert f"received {error.out_received} of {batch * program.output_words} output flits" in message
    # the RTL runner has no model of the machine: the suspects come from the emulator's flit counts, which the CLI
    # appends (checked through the CLI below); here they must name the tile the RTL stopped on
    from flowtile.emulator import flit_progress
    assert flit_progress(program, batch).stuck[0].key == "r0c1"
    assert error.out_received < batch * program.output_words


@pytest.mark.rtl
def test_rtl_max_cycles_is_honoured(tmp_path, capsys):
    from flowtile.rtl import simulate as rtl
    program, batch = _program(RTL_ARCH), 2
    with pytest.raises(rtl.RtlTimeoutError, match=r"timed out after 20 cycles \(max_cycles\): received 0 of "
                                                  r"\d+ output flits \(no output flit\)") as caught:
        rtl.simulate(program, _flits(program, batch), batch, max_cycles=20)
    assert caught.value.reason == "cycle limit" and 20 <= caught.value.cycle <= 22
    # the CLI: one line, exit status 2
    prog, x, y = _save_case(tmp_path, program, batch)
    assert cli.main(["rtl", prog, "--input", x, "--output", y, "--max-cycles", "20"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("flowtile: error")]
    assert len(err) == 1 and "timed out after 20 cycles (max_cycles)" in err[0]


@pytest.mark.rtl
def test_cli_rtl_names_the_stuck_tile(tmp_path, capsys):
    """``flowtile rtl`` on a stuck program: one line, exit 2, the RTL facts plus the suspect from the flit counts."""
    prog, x, y = _save_case(tmp_path, _edited(1, RTL_ARCH, n_pass=2), 1)
    assert cli.main(["rtl", prog, "--input", x, "--output", y]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("flowtile: error")]
    assert len(err) == 1 and "no host transfer for" in err[0], err
    assert "tile (0,1) input side waits on port W (from tile r0c0)" in err[0], err[0]

