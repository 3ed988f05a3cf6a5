"""Framework -> ONNX converters (installed as ``onnxmod.converters``)."""
