"""onnxruntime as the independent numerical oracle.

The int8 oracle runs the QDQ model with every graph optimization disabled: onnxruntime's fused int8
kernels give CPU-dependent results (see shared/toolchain-notes.md), the unfused reference path does not.
"""
from __future__ import annotations

import numpy as np
import onnx

from .host import quantize
from .program import Program

__all__ = ["ort_session", "onnxruntime_int8_output", "onnxruntime_float_output"]


def ort_session(model: onnx.ModelProto):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort_session(model)
    name = session.get_inputs()[0].name
    return session.run(None, {name: x.astype(np.float32)})[0]


def onnxruntime_int8_output(model, program: Program, x: np.ndarray):
    """(int8-domain outputs ``[batch, n]``, float outputs) of the int8 model as onnxruntime computes it.

    The int8 outputs are those of the chip's output tensor (``program.output.name``): with a host post-op (a
    trailing Softmax, ``program.output.post``) the Softmax's input, quantized with the program's output
    parameters; the float outputs are always the model's final output.

    ``model`` (path or ModelProto) must be the int8 model that was compiled: a float model is quantized once,
    by :func:`flowtile.compiler.int8_model`, and that one result goes to the compiler and here.
    """
    from flowtile.compiler import is_quantized
    model = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    if not is_quantized(model):
        raise ValueError("onnxruntime_int8_output needs the int8 model that was compiled, got a float model: "
                         "quantize it once with flowtile.compiler.int8_model and pass the result to both")
    spec = program.output
    if spec.post is None:
        y = _run(model, x)
        return quantize(y.reshape(y.shape[0], -1), spec), y
    # A host post-op (a trailing Softmax): the chip computes the Softmax's input, so the int8 comparison is against
    # that tensor, made an extra graph output of a copy; the float output is the model's own (after the Softmax).
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    if spec.name not in [o.name for o in copy.graph.output]:
        copy.graph.output.append(onnx.helper.make_tensor_value_info(spec.name, onnx.TensorProto.FLOAT, None))
    session = ort_session(copy)
    names = [o.name for o in session.get_outputs()]
    wanted = [spec.post_name or names[0], spec.name]
    y, logits = session.run(wanted, {session.get_inputs()[0].name: x.astype(np.float32)})
    return quantize(logits.reshape(logits.shape[0], -1), spec), y


def onnxruntime_float_output(model_path, x: np.ndarray) -> np.ndarray:
    """The float model's outputs for ``x``, run as published: a model traced with a fixed batch (mnist-8 as the
    ONNX Model Zoo ships it: batch 1) is run that many samples at a time."""
    model = onnx.load(str(model_path))
    session = ort_session(model)
    batch = session.get_inputs()[0].shape[0]
    if not isinstance(batch, int) or batch == len(x):
        return _run(model, x)
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + batch].astype(np.float32)})[0]
                           for i in range(0, len(x), batch)])
