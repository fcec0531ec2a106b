"""The timing solver's fast paths against its plain whole-batch sweeps (emulator/timing.py).

``solve_timing(..., probe_batch=None)`` sweeps every chain over the whole batch (:class:`_ChainSystem`); with a probe
the batch is solved window by window (:class:`_WindowSystem`: a few inferences at a time, a PE's compute and output
chains solved together through their result ring, a chain whose new bounds its times already meet left alone) and
extrapolated where periodic. Both must give every chain's every time identically, on random dense and windowed
programs, on the smallest result rings their tiles allow (the ring then holds COMPUTE back every few words). Windows
are used for programs of at least ``WINDOW_MIN_ACTIONS`` actions per inference; here that limit is lifted.
"""
from __future__ import annotations

import numpy as np
import pytest

from flowtile.emulator import timing
from flowtile.emulator.path import trace_data_path
from flowtile.emulator.timing import solve_timing

from test_emulator import _smallest_ring, random_program, random_windowed_program


def _assert_same(plain, fast, what):
    assert plain.stream_names == fast.stream_names
    for name, a, b in zip(plain.stream_names, plain.stream_times, fast.stream_times):
        np.testing.assert_array_equal(a, b, err_msg=f"{name}, {what}")
    for position, (a, b) in enumerate(zip(plain.compute_ends, fast.compute_ends)):
        if a is None:
            assert b is None
        else:
            np.testing.assert_array_equal(a, b, err_msg=f"compute ends of chain position {position}, {what}")


def _programs(seed):
    rng = np.random.default_rng(41000 + seed)
    if seed % 2:
        program = random_windowed_program(rng)[0]
    else:
        program = random_program(rng)[0]
    if seed % 3:
        program = _smallest_ring(program, int(rng.integers(0, 2)))
    return program


@pytest.mark.parametrize("seed", range(24))
def test_windows_equal_plain_sweeps(seed, monkeypatch):
    """Windowed probes (with or without a passing extrapolation) and a batch solved wholly in windows give
    exactly the plain sweeps' times."""
    program = _programs(seed)
    batch = 37
    monkeypatch.setattr(timing, "WINDOW_MIN_ACTIONS", 0)      # windows for these small programs too
    plain = solve_timing(program, batch, probe_batch=None)
    for probe in (1, 4, 16):
        _assert_same(plain, solve_timing(program, batch, probe_batch=probe), f"probe {probe}")
    # every inference solved in windows, no extrapolation
    monkeypatch.setattr(timing, "WINDOW_PROBE", batch)
    path = trace_data_path(program)
    graph = timing.timing_graph(program, path)
    tail = timing._pass_through_tail(graph)
    system, _, extrapolated = timing._solve_in_windows(graph, tail, batch, batch, timing._spaced_delays(graph))
    assert not extrapolated
    for name, a, b in zip(plain.stream_names, plain.stream_times, system.solution()):
        np.testing.assert_array_equal(a, b, err_msg=f"{name}, all windows")


@pytest.mark.parametrize("seed", range(12))
def test_ring_pair_solve_is_the_fixed_point(seed, monkeypatch):
    """Solving a PE's compute and output chains together (block by block through the result ring) gives what
    the sweeps settle on: re-solving any window of the solution changes nothing."""
    program = _smallest_ring(_programs(seed))
    batch = 9
    monkeypatch.setattr(timing, "WINDOW_PROBE", batch)
    path = trace_data_path(program)
    graph = timing.timing_graph(program, path)
    tail = timing._pass_through_tail(graph)
    system, _, _ = timing._solve_in_windows(graph, tail, batch, batch, timing._spaced_delays(graph))
    pairs = {pair for pair in system.ring_pair.values()}
    for lo, hi in ((0, batch), (0, 1), (3, 7), (batch - 1, batch)):
        for compute, output in pairs:
            a, o = system.solve_ring_pair(compute, output, lo, hi)
            np.testing.assert_array_equal(
                a, system.times[compute][lo * system.widths[compute]:hi * system.widths[compute]])
            np.testing.assert_array_equal(
                o, system.times[output][lo * system.widths[output]:hi * system.widths[output]])
