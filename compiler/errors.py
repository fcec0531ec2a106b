"""The one exception the compiler raises for a model it cannot compile, and how its messages name an ONNX node."""
from __future__ import annotations

__all__ = ["CompileError", "describe"]


class CompileError(Exception):
    """A model cannot be compiled for an arch.

    The message is one line and names what is wrong: the ONNX node (name and op) and attribute, or the
    layer, the bytes needed vs available, and the ``Arch`` field that limits it.
    """


def describe(node) -> str:
    """How every compiler message names an ONNX node: ``node 'NAME' (OP)`` (its first output when unnamed)."""
    return f"node '{node.name or node.output[0]}' ({node.op_type})"
