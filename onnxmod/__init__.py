"""onnxmod: decompose ONNX CNN classifiers into per-class modules and compose them again."""

__version__ = "0.1.0"

from onnxmod.errors import OnnxmodError  # noqa: E402,F401
