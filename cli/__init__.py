"""The ``onnxmod`` command line (installed as ``onnxmod.cli``)."""
