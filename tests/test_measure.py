"""flowtile.testing.measure: the steady-state interval the benchmarks report and the check that a batch got past the
pipeline's fill."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from flowtile.testing.archs import lean_arch
from flowtile.emulator import emulate
from flowtile.testing.measure import settled, steady_state
from flowtile.testing.program_builder import Dense, build_program


def _times(last_flit_cycles, words=2):
    """A result whose inferences' last output flits leave at ``last_flit_cycles`` (``words`` flits each)."""
    last = np.asarray(last_flit_cycles, dtype=np.int64)
    return SimpleNamespace(out_times=np.stack([last - 1, last], axis=1).reshape(-1)), SimpleNamespace(
        output_words=words)


def test_settled_tells_a_periodic_tail_from_a_drifting_one():
    periodic, program = _times(100 + 7 * np.arange(16))
    assert settled(program, periodic, 16)
    # intervals still shrinking (a pipeline still filling): the last quarter is faster than the last half
    drifting, program = _times(np.cumsum(np.linspace(20, 8, 16)).astype(int))
    assert not settled(program, drifting, 16)
    assert not settled(program, periodic, 4)      # too short to tell


def test_a_small_pipeline_settles_at_its_interval():
    rng = np.random.default_rng(3)
    layers = [Dense(rng.integers(-128, 128, (16, 32), dtype=np.int8), rng.integers(-99, 99, 16), 1 << 30, 40, 0,
                    -128, 127, 2),
              Dense(rng.integers(-128, 128, (8, 16), dtype=np.int8), rng.integers(-99, 99, 8), 1 << 30, 40, 0,
                    -128, 127, 1)]
    arch = lean_arch(rows=1, cols=4, lanes=8)
    program = build_program(arch, layers)
    batch = 32
    flits = rng.integers(-128, 128, (batch * program.input_words, arch.lanes), dtype=np.int8)
    result = emulate(program, flits, batch)
    assert settled(program, result, batch)
    slowest = max(t.config.tile_period_cycles(arch.lanes) for t in program.tiles)
    assert steady_state(program, result, batch).interval == slowest
