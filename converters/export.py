"""Export any ``torch.nn.Module`` image classifier to an onnxmod source model.

The written graph follows the canonical input of docs/DESIGN.md: one input ``input``
float32 ``[N, C, H, W]`` (N dynamic) with pixel values in ``[0, 1]``; the model's own
preprocessing ``(x * scale - mean) / std`` is a small prologue inside the graph; one
output ``logits`` ``[N, K]``. Metadata: ``onnxmod.kind = source``, ``onnxmod.classes``
and ``onnxmod.preprocess`` (``in_graph: true``).

Two exporters:

* ``legacy`` (default): TorchScript-based ``torch.onnx.export(..., dynamo=False)``,
  opset 17, ``do_constant_folding=True``. In eval mode this exporter fuses every
  BatchNormalization that follows a Conv into the Conv's weight and bias: the graph
  has no BatchNormalization nodes. Global average pooling is ``GlobalAveragePool``
  followed by ``Flatten``.
* ``dynamo``: ``torch.onnx.export(..., dynamo=True)``, opset 18, the batch dimension
  declared dynamic with ``torch.export.Dim``. Its onnxscript optimizer fuses Conv+BN
  as well, so BN is folded here too. Global average pooling comes out as
  ``ReduceMean(axes=[-1, -2])`` followed by ``Reshape([-1, C])``. The export goes to a
  temp dir and is re-saved as one self-contained file (no external data).

Both graphs then go through :func:`onnxmod.graphio.fold_constants` (the legacy exporter leaves the
``pads`` of ``F.pad`` as a chain of small constant ops) and the full ONNX checker.
``keep_batchnorm=True`` (legacy only) exports without constant folding, so the
BatchNormalization nodes stay (inference form); ``sample_graphs/make_tiny.py`` uses it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import onnx
import torch
import torch.nn as nn

from onnxmod import graphio, modelio
from onnxmod.errors import OnnxmodError

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
EXPORTERS = ("legacy", "dynamo")
DEFAULT_OPSET = {"legacy": 17, "dynamo": 18}


class Normalized(nn.Module):
    """``model((x * scale - mean) / std)``; mean/std per channel."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float], scale: float = 1.0):
        super().__init__()
        self.model = model
        self.scale = float(scale)
        c = len(mean)
        self.register_buffer("mean", torch.tensor([float(m) for m in mean], dtype=torch.float32).reshape(1, c, 1, 1))
        self.register_buffer("std", torch.tensor([float(s) for s in std], dtype=torch.float32).reshape(1, c, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            x = x * self.scale
        return self.model((x - self.mean) / self.std)


def _check_args(input_shape, classes, mean, std, scale, exporter) -> tuple[int, int, int]:
    if exporter not in EXPORTERS:
        raise OnnxmodError(f"unknown exporter {exporter!r}; use one of {', '.join(EXPORTERS)}")
    if len(input_shape) != 3 or not all(int(d) > 0 for d in input_shape):
        raise OnnxmodError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
    c, h, w = (int(d) for d in input_shape)
    if len(mean) != c or len(std) != c:
        raise OnnxmodError(f"mean and std need {c} values (one per input channel), got {len(mean)} and {len(std)}")
    if any(float(s) == 0.0 for s in std):
        raise OnnxmodError("std values must be non-zero")
    if not float(scale) > 0:
        raise OnnxmodError(f"scale must be > 0, got {scale}")
    if not classes:
        raise OnnxmodError("classes must be a non-empty list of names")
    if len(set(classes)) != len(classes):
        raise OnnxmodError("class names must be unique")
    modelio.check_class_names(list(classes), "classes")
    return c, h, w


def _export_legacy(wrapped: nn.Module, example: torch.Tensor, path: Path, opset: int, keep_batchnorm: bool) -> None:
    # eval mode + constant folding fuses Conv+BN; without folding BatchNormalization stays
    # (inference form, training_mode=0) and graphio.fold_constants() cleans up what torch left.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapped,
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            do_constant_folding=not keep_batchnorm,
            training=torch.onnx.TrainingMode.EVAL,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}},
        )


def _export_dynamo(wrapped: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    batch = torch.export.Dim("N", min=1, max=1 << 20)
    # the dynamo exporter and its optimizer are chatty on stdout/stderr
    sink = io.StringIO()
    onnx_logger = logging.getLogger("torch.onnx")
    old_level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            _dynamo_call(wrapped, example, path, opset, batch)
    finally:
        onnx_logger.setLevel(old_level)


def _dynamo_call(wrapped: nn.Module, example: torch.Tensor, path: Path, opset: int, batch) -> None:
    torch.onnx.export(
        wrapped,
        (example,),
        str(path),
        dynamo=True,
        opset_version=opset,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: batch},),
        external_data=False,
        optimize=True,
        verbose=False,
    )


def _fix_io_names_and_batch(model: onnx.ModelProto) -> None:
    """Make sure the graph IO are ``input``/``logits`` with a symbolic batch dim ``N``."""
    g = model.graph
    inits = {i.name for i in g.initializer}
    real_inputs = [i for i in g.input if i.name not in inits]
    if len(real_inputs) != 1 or len(g.output) != 1:
        raise RuntimeError(
            f"exported graph has {len(real_inputs)} inputs and {len(g.output)} outputs, expected 1 and 1"
        )
    if real_inputs[0].name != INPUT_NAME or g.output[0].name != OUTPUT_NAME:
        raise RuntimeError(
            f"exported graph IO are {real_inputs[0].name!r} -> {g.output[0].name!r}, expected {INPUT_NAME!r} -> {OUTPUT_NAME!r}"
        )
    for vi in (real_inputs[0], g.output[0]):
        d0 = vi.type.tensor_type.shape.dim[0]
        d0.ClearField("dim_value")
        d0.dim_param = "N"


def export(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    input_shape: Sequence[int] = (3, 32, 32),
    classes: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    scale: float = 1.0,
    exporter: str = "legacy",
    opset: int | None = None,
    keep_batchnorm: bool = False,
) -> Path:
    """Write ``model`` as an onnxmod source model at ``path``; returns the path.

    ``model`` must map a normalised float32 ``[N, C, H, W]`` batch to logits ``[N, K]``
    with ``K == len(classes)``. It is put in eval mode (and left there).
    ``keep_batchnorm=True`` (legacy exporter only) keeps BatchNormalization nodes
    instead of fusing them into the preceding Conv.
    """
    classes = [str(c) for c in classes]
    c, h, w = _check_args(input_shape, classes, mean, std, scale, exporter)
    opset = int(opset) if opset is not None else DEFAULT_OPSET[exporter]
    if keep_batchnorm and exporter != "legacy":
        raise OnnxmodError("keep_batchnorm is only supported with the legacy exporter")
    path = Path(path)

    model.eval()
    wrapped = Normalized(model, mean, std, scale).eval()
    example = torch.rand(2, c, h, w, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = wrapped(example)
    if out.dim() != 2 or out.shape[1] != len(classes):
        raise OnnxmodError(
            f"model output has shape {tuple(out.shape)}; expected [N, {len(classes)}] for {len(classes)} classes"
        )

    with tempfile.TemporaryDirectory(prefix="onnxmod-export-") as tmp:
        tmp_path = Path(tmp) / "model.onnx"
        with torch.no_grad():
            if exporter == "legacy":
                _export_legacy(wrapped, example, tmp_path, opset, keep_batchnorm)
            else:
                _export_dynamo(wrapped, example, tmp_path, opset)
        # onnx.load pulls in any external data files next to the model, so the
        # re-saved model is one self-contained file.
        onnx_model = onnx.load(str(tmp_path), load_external_data=True)

    onnx_model = graphio.fold_constants(onnx_model)
    _fix_io_names_and_batch(onnx_model)
    onnx_model.graph.name = type(model).__name__
    modelio.set_meta(
        onnx_model,
        {
            modelio.KIND: "source",
            modelio.CLASSES: classes,
            modelio.PREPROCESS: {
                "mean": [float(m) for m in mean],
                "std": [float(s) for s in std],
                "scale": float(scale),
                "in_graph": True,
                "input_size": [h, w],
            },
        },
    )
    return modelio.save_model(onnx_model, path)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
