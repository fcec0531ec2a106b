"""flowtile.testing.random_models.random_float_mobilenet_v1: MobileNetV1's structure and parameter count, and a
small one (alpha 0.25, 32x32) quantized by onnxruntime, compiled and emulated within 1 LSB of onnxruntime."""
import numpy as np
import onnx

from flowtile.testing.archs import lean_arch
from flowtile.compiler import compile_model, int8_model
from flowtile.testing.oracle_checks import compare_with_onnxruntime
from flowtile.testing.random_models import MOBILENET_V1_BLOCKS, quantize_qdq, random_float_mobilenet_v1


def test_mobilenet_v1_structure():
    model = random_float_mobilenet_v1(np.random.default_rng(0), alpha=0.25, resolution=32, n_classes=10)
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    assert len(convs) == 1 + 2 * len(MOBILENET_V1_BLOCKS) == 27
    groups = [next((a.i for a in node.attribute if a.name == "group"), 1) for node in convs]
    assert groups[1::2] == [8, 16, 32, 32, 64, 64, 128, 128, 128, 128, 128, 128, 256]  # depthwise: group = C
    assert [n.op_type for n in model.graph.node[-3:]] == ["GlobalAveragePool", "Flatten", "Gemm"]
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim][1:] for v in inferred.graph.value_info}
    assert shapes["block12_pw_relu"] == [256, 1, 1]  # stride 32 overall
    assert [d.dim_value for d in inferred.graph.output[0].type.tensor_type.shape.dim][1:] == [10]


def test_mobilenet_v1_parameters():
    # alpha 1.0, 1000 classes: MobileNetV1's 4.2 M parameters (BN folded into the biases); the count does not
    # depend on the resolution, so count a tiny one
    model = random_float_mobilenet_v1(np.random.default_rng(0), resolution=32)
    assert sum(int(np.prod(init.dims)) for init in model.graph.initializer) == 4_221_032


def test_mobilenet_v1_compiles_and_matches_onnxruntime(tmp_path):
    rng = np.random.default_rng(1)
    float_path, qdq_path = tmp_path / "float.onnx", tmp_path / "qdq.onnx"
    onnx.save(random_float_mobilenet_v1(rng, alpha=0.25, resolution=32, n_classes=10), str(float_path))
    quantize_qdq(float_path, qdq_path, rng.standard_normal((8, 3, 32, 32)).astype(np.float32),
                 activation_uint8=False, per_channel=True)
    model = int8_model(qdq_path)
    program = compile_model(model, lean_arch(rows=6, cols=6, sram_bytes=65536, max_tile_outputs=2048))
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    assert compare_with_onnxruntime(model, program, x).worst <= 1
