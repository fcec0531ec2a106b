"""Throughput lost to link faults: a 2-chip MLP whose link is its bottleneck, clean and with faults (with and
without bursts), on the emulator (exact with faults: docs/architecture.md section 12). Prints, per error rate, the
steady-state interval, the loss against the clean run (steady state and whole run), the flips injected, the errors
detected and the replays; every faulty run's outputs are checked equal to the clean run's.

Run: ``python benchmarks/link_faults.py [--batch 4000] [--link-bits 2] [--seed 7]``.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

RATES = ((1e-6, 8), (1e-5, 8), (1e-5, 1))


def main() -> None:
    os.environ.setdefault("AMARANTH_USE_YOSYS", "builtin")
    import onnx
    from flowtile.arch import Arch
    from flowtile.compiler import compile_model
    from flowtile.emulator import emulate
    from flowtile.testing.measure import steady_state
    from flowtile.testing.oracle_checks import input_flits
    from flowtile.testing.random_models import quantize_qdq, random_float_mlp

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4000)
    parser.add_argument("--link-bits", type=int, default=2, help="link_bits_per_cycle (2: the link is the bottleneck)")
    parser.add_argument("--seed", type=int, default=7, help="link_error_seed")
    args = parser.parse_args()

    rng = np.random.default_rng(3)
    with tempfile.TemporaryDirectory() as scratch:
        float_path = Path(scratch) / "float.onnx"
        onnx.save(random_float_mlp(rng, [64, 64, 64, 10]), float_path)
        model = quantize_qdq(float_path, Path(scratch) / "qdq.onnx", rng.standard_normal((16, 64)).astype(np.float32),
                             activation_uint8=False, per_channel=True)
        base = dict(rows=1, cols=2, lanes=8, chips=2, link_bits_per_cycle=args.link_bits)
        clean = compile_model(model, Arch(**base))
        x = rng.standard_normal((args.batch, 64)).astype(np.float32)
        _, flits = input_flits(clean, x)
        reference = emulate(clean, flits, args.batch)
        clean_interval = steady_state(clean, reference, args.batch).interval
        print(f"clean: interval {clean_interval:.1f} cycles/inference, link {100 * reference.links[0].utilization:.1f} % "
              f"busy, {clean.links[0].inference_flits} flits/inference, frames of {clean.arch.link_frame_flits} flits")
        print(f"{'error rate':>10}  {'bursts':>6}  {'interval':>8}  {'loss':>7}  {'whole run':>9}  {'flips':>6}  "
              f"{'detected':>8}  {'replays':>7}  {'seconds':>7}")
        for rate, burst in RATES:
            program = compile_model(model, Arch(**base, link_error_rate=rate, link_burst_cycles=burst,
                                                link_error_seed=args.seed))
            started = time.perf_counter()
            result = emulate(program, flits, args.batch)
            seconds = time.perf_counter() - started
            assert np.array_equal(result.out_flits, reference.out_flits), "faults changed the outputs"
            interval = steady_state(program, result, args.batch).interval
            counters = result.links[0].counters
            print(f"{rate:>10.0e}  {burst:>6}  {interval:>8.1f}  {100 * (interval / clean_interval - 1):>6.2f}%  "
                  f"{100 * (result.cycles / reference.cycles - 1):>8.2f}%  {counters['fwd_flips'] + counters['ret_flips']:>6}  "
                  f"{result.links[0].detected_errors:>8}  {counters['tx_replays']:>7}  {seconds:>7.1f}")


if __name__ == "__main__":
    main()
