"""Helpers shared by the tests and the benchmarks: hand-built programs with their golden models, seeded random
ONNX networks. Importable (``flowtile.testing``) so that benchmarks need no ``sys.path`` edits."""
