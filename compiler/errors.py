"""The one exception the compiler raises for a model it cannot compile."""
from __future__ import annotations

__all__ = ["CompileError"]


class CompileError(Exception):
    """A model cannot be compiled for an arch.

    The message is one line and names what is wrong: the ONNX node (name and op) and attribute, or the
    layer, the bytes needed vs available, and the ``Arch`` field that limits it.
    """
