"""How far apart the int8 oracles are, end to end: flowtile beside onnxruntime's own two execution paths.

For every public model (``models/public``, quantized once like the tests do: float files with a seeded
calibration set), on a seeded batch, the max |difference| in LSB of the network's int8 output between:

* ``flowtile``: the compiler's integer model (bit-exact with the emulator and the RTL, tests/test_public_models.py);
* ``ort``: onnxruntime with graph optimizations off (float32 arithmetic between QuantizeLinear nodes: the oracle the
  tests and the issue name);
* ``ort-int8``: onnxruntime with its default graph optimizations (QDQ groups fused into its integer kernels, the
  way onnxruntime normally runs the file; CPU-dependent, see the toolchain notes);
* ``exact``: ONNX's reference evaluator with QuantizeLinear/DequantizeLinear in float64
  (:func:`flowtile.testing.layer_oracle.exact_int8_tensors`), the graph's values rounded once per QuantizeLinear.

Every layer of flowtile is within 1 LSB of both float oracles when fed their own input (the tests' check (b)).
End to end, a deep network carries a rare 1-LSB difference on and can amplify it; this table shows how much the
same happens between two onnxruntime execution paths, i.e. what agreement any int8 implementation can expect.

    python benchmarks/oracle_spread.py [--batch 128] [--models mlperf_mobilenet_qdq.onnx,...]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = ROOT / "models" / "public"


def sample(name: str, n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """The tests' inputs: digits-like pixels for the tv_* models, standard normal for the MLPerf shapes."""
    rng = np.random.default_rng(seed)
    if name.startswith("tv_"):
        return rng.random((n, *shape)).astype(np.float32)
    return rng.standard_normal((n, *shape)).astype(np.float32)


def ort_int8_kernels(model: onnx.ModelProto, name: str, x: np.ndarray) -> np.ndarray:
    """onnxruntime's output tensor ``name`` with its default graph optimizations (integer kernels)."""
    import onnxruntime as ort
    from flowtile.testing.layer_oracle import int8_runs, with_outputs
    probe, wanted = with_outputs(model, [name])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    first = session.get_inputs()[0]
    return int8_runs(lambda names, xb: session.run(names, {first.name: xb}), first.shape, wanted, x)[name]


def main() -> None:
    from flowtile.compiler import import_onnx, int8_model, lower_layers, reference_forward
    from flowtile.host import quantize
    from flowtile.testing.layer_oracle import exact_int8_tensors, map_layers, ort_int8_tensors

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128, help="samples per model (default 128, as the tests)")
    parser.add_argument("--models", default=None, help="comma-separated file names (default: every public model)")
    args = parser.parse_args()
    names = args.models.split(",") if args.models else sorted(p.name for p in PUBLIC.glob("*.onnx"))
    print(f"max |difference| (LSB) of the int8 output over {args.batch} seeded samples; depth = lowered layers")
    print(f"{'model':32s} {'depth':>5s} {'flowtile-ort':>12s} {'ort-int8-ort':>12s} {'flowtile-exact':>14s} "
          f"{'ort-exact':>9s} {'ort-int8-exact':>14s} {'flowtile-ort-int8':>17s}")
    for name in names:
        path = PUBLIC / name
        shape = tuple(d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[1:])
        imported = import_onnx(int8_model(path, sample(name, 32, shape, 1)))
        lowered = lower_layers(imported.layers)
        x = sample(name, args.batch, shape, 2)
        output = map_layers(imported.qdq_model, imported.layers).outputs[-1]
        ours = reference_forward(lowered, quantize(x, imported.input)).astype(np.int64)
        ort = ort_int8_tensors(imported.qdq_model, [output], x)[output]
        ort_int8 = ort_int8_kernels(imported.qdq_model, output, x)
        exact = exact_int8_tensors(imported.qdq_model, [output], x)[output]

        def drift(a, b):
            return int(np.abs(a - b).max())
        print(f"{name:32s} {len(lowered):5d} {drift(ours, ort):12d} {drift(ort_int8, ort):12d} "
              f"{drift(ours, exact):14d} {drift(ort, exact):9d} {drift(ort_int8, exact):14d} {drift(ours, ort_int8):17d}",
              flush=True)


if __name__ == "__main__":
    main()
