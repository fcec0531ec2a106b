"""flowtile's compiler: ONNX int8 (or float) MLPs -> a flowtile program (docs/architecture.md sections 1, 7, 8).

    program = compile_model("models/digits_mlp.onnx", Arch())
    print(report(program)); program.save("out/digits")

Stages: :mod:`.onnx_import` (recognize quantized dense layers), :mod:`.lower` (integer parameters),
:mod:`.partition` (chain tiles per layer), :mod:`.emit` (registers, SRAM images, parameter tables).
"""
from .emit import build_program, compile_model, report
from .errors import CompileError
from .lower import LoweredLayer, lower_layers, quantize_multiplier, reference_forward
from .onnx_import import DenseLayer, ImportedModel, QuantParams, import_onnx
from .partition import TileSlice, assign_tiles, tile_cycles

__all__ = ["compile_model", "report", "CompileError", "import_onnx", "lower_layers", "reference_forward",
           "assign_tiles", "build_program", "tile_cycles", "quantize_multiplier", "DenseLayer", "LoweredLayer",
           "ImportedModel", "QuantParams", "TileSlice"]
