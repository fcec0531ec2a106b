"""flowtile's compiler: ONNX int8 (or float) MLPs and small CNNs -> a flowtile program (docs/architecture.md sections 1, 7, 8).

    program = compile_model("models/digits_mlp.onnx", Arch())
    print(report(program)); program.save("out/digits")

Stages: :mod:`.onnx_import` (recognize quantized dense, Conv, depthwise Conv, MaxPool, AveragePool and
GlobalAveragePool layers and residual Adds), :mod:`.lower` (integer parameters),
:mod:`.partition` (chain tiles per layer; on several chips, where each chip's chain starts), :mod:`.emit` (registers,
SRAM images, parameter tables, link registers).
"""
from .emit import build_program, chip_macs, compile_model, estimated_interval, report
from .errors import CompileError
from .lower import (LoweredLayer, lane_params, lower_layers, pack_input_window, quantize_multiplier,
                    reference_forward, weight_rows)
from .onnx_import import (AddLayer, DenseLayer, ImportedModel, PoolLayer, QuantParams, Window, import_onnx,
                          int8_model, is_quantized)
from .partition import Placement, TileSlice, assign_tiles, link_cycles, place_layers, tile_cycles, window_tile_cycles

__all__ = ["compile_model", "report", "CompileError", "import_onnx", "lower_layers", "reference_forward", "pack_input_window",
           "assign_tiles", "build_program", "tile_cycles", "quantize_multiplier", "DenseLayer", "LoweredLayer",
           "ImportedModel", "QuantParams", "TileSlice", "PoolLayer", "Window", "weight_rows",
           "window_tile_cycles", "lane_params", "AddLayer", "int8_model", "is_quantized", "Placement", "place_layers",
           "link_cycles", "estimated_interval", "chip_macs"]
