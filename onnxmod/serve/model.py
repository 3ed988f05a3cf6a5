"""One served model: its onnxruntime session, its I/O in protocol terms, and its metadata.

Any onnxmod model with one float32 ``[N, C, H, W]`` image input and a dynamic batch
dimension can be served; every graph output is exposed under its own name:

* composed model: ``probs`` FP32 ``[N, K]`` and ``label`` INT64 ``[N]``;
* exported source: ``logits`` FP32 ``[N, K]`` (the classify route applies softmax, as ``predict`` does);
* module: ``score`` FP32 ``[N, 1]`` (calibrated P(class)) and ``logit`` FP32 ``[N, 1]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from onnxmod import modelio, runtime
from onnxmod.errors import OnnxmodError

PLATFORM = "onnxruntime_onnx"
VERSION = "1"
# A model name is a URL path segment and a Triton repository folder name, never a file we open.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

# ORT's intra-op threads spin between runs by default; a server's runs are spaced by HTTP work that
# needs those cores (measured on 2 cores: ~0.8 vs ~1.3 ms server CPU per request, bench/serve_http.py)
SESSION_CONFIG = {"session.intra_op.allow_spinning": "0"}

# onnxruntime type strings -> protocol datatypes (and numpy dtypes for binary data)
ORT_TO_V2 = {
    "tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(float16)": "FP16",
    "tensor(int64)": "INT64", "tensor(int32)": "INT32", "tensor(int16)": "INT16", "tensor(int8)": "INT8",
    "tensor(uint64)": "UINT64", "tensor(uint32)": "UINT32", "tensor(uint16)": "UINT16", "tensor(uint8)": "UINT8",
    "tensor(bool)": "BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # protocol datatype, e.g. FP32
    shape: tuple[int, ...]  # -1 for dynamic dims; the first is the batch

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def check_name(name: str, where: str) -> str:
    if not NAME_RE.match(name):
        raise OnnxmodError(f"{where}: model name '{name}' is not usable in a URL; letters, digits, '_', '.', '-' "
                           "only, starting with a letter or digit (give one with --name)")
    return name


def _dims(value_info: onnx.ValueInfoProto) -> tuple[int, ...]:
    t = value_info.type.tensor_type
    return tuple(int(d.dim_value) if d.HasField("dim_value") else -1 for d in t.shape.dim)


def _v2_type(t: str, what: str) -> str:
    if t not in ORT_TO_V2:
        raise OnnxmodError(f"{what} has type {t}, which serve cannot send")
    return ORT_TO_V2[t]


class ServedModel:
    """A loaded model ready to run batches; ``run`` is called from the batcher's worker thread."""

    def __init__(self, path: Path, name: str, model: onnx.ModelProto, session: ort.InferenceSession):
        from onnxmod.cli.cmd_compose import image_input_chw, prediction_outputs

        self.path, self.name, self.proto, self.session = path, name, model, session
        self.kind = modelio.model_kind(model)
        self.chw = image_input_chw(model, path)
        sess_in = session.get_inputs()
        if len(sess_in) != 1:
            raise OnnxmodError(f"{path}: serve needs exactly one input, got {[i.name for i in sess_in]}")
        graph_in = {i.name: i for i in model.graph.input}[sess_in[0].name]
        batch = _dims(graph_in)[0]
        if batch != -1:
            raise OnnxmodError(f"{path}: input '{sess_in[0].name}' has a fixed batch of {batch}; serve needs a "
                               "dynamic batch dimension (onnxmod export/decompose/compose write one)")
        if _v2_type(sess_in[0].type, f"{path}: input '{sess_in[0].name}'") != "FP32":
            raise OnnxmodError(f"{path}: input '{sess_in[0].name}' is {sess_in[0].type}; serve takes float32 images")
        self.input = TensorSpec(sess_in[0].name, "FP32", (-1, *self.chw))
        graph_out = {o.name: o for o in model.graph.output}
        self.outputs = [TensorSpec(o.name, _v2_type(o.type, f"{path}: output '{o.name}'"), _dims(graph_out[o.name]))
                        for o in session.get_outputs()]
        for o in self.outputs:
            if not o.shape or o.shape[0] != -1:
                raise OnnxmodError(f"{path}: output '{o.name}' has shape {list(o.shape)}; serve needs the batch "
                                   "as its first, dynamic dimension")
        self.output_names = [o.name for o in self.outputs]
        self.prediction_output = prediction_outputs(model, self.output_names)[0]
        self.classes = self._class_names()
        self.device = runtime.session_device(session)

    @classmethod
    def load(cls, path: Path, name: str | None = None, device: str = "auto", threads: int | None = None) -> "ServedModel":
        """``threads``: onnxruntime intra-op threads per run (None: its default)."""
        name = check_name(name if name is not None else path.stem, str(path))
        model = modelio.load_model(path)
        session = runtime.make_session(model, device=device, threads=threads, name=str(path), config=SESSION_CONFIG)
        return cls(path, name, model, session)

    def _class_names(self) -> list[str]:
        from onnxmod.evaluate import model_class_names

        if self.kind == "module":
            from onnxmod.modulespec import ModuleSpec

            return [ModuleSpec.from_model(self.proto, str(self.path)).class_name]
        return model_class_names(self.proto) or []

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        """All outputs (in ``self.outputs`` order) for the batch ``x``."""
        return self.session.run(self.output_names, {self.input.name: x})

    def metadata(self, max_batch: int) -> dict[str, Any]:
        """Model metadata (KServe v2), with the class list and serving settings under ``parameters``."""
        return {
            "name": self.name,
            "versions": [VERSION],
            "platform": PLATFORM,
            "inputs": [self.input.to_json()],
            "outputs": [o.to_json() for o in self.outputs],
            "parameters": {"kind": self.kind, "classes": self.classes, "max_batch": max_batch,
                           "device": self.device, "prediction_output": self.prediction_output},
        }
