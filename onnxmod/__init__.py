"""onnxmod: decompose ONNX CNN classifiers into per-class modules and compose them again."""

from pathlib import Path as _Path

__version__ = "0.1.0"

# In a source checkout `cli/` and `converters/` sit beside this package (pip installs them
# as onnxmod.cli / onnxmod.converters). Let `python -m ...` from the repo root find them too.
_repo = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).parent / "cli").is_dir() and (_repo / "cli" / "main.py").is_file():
    __path__.append(str(_repo))  # type: ignore[name-defined]  # noqa: F821

from onnxmod.errors import OnnxmodError  # noqa: E402,F401
