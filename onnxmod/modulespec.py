"""What a module file says about itself: the metadata contract between decompose and compose.

A module graph has one input ``input`` (float32 ``[N, C, H, W]`` in [0, 1]) and two
outputs: ``logit`` ``[N, 1]`` (the module's raw class logit, on its source's logit
scale) and ``score`` ``[N, 1]`` = sigmoid(a * logit + b), a one-vs-rest calibrated
probability (Platt scaling fitted on the calibration data).

Score scale rule used by compose (documented in the README):
  * all modules from one source  -> probs = softmax(logits): exactly how the source
    compares its classes;
  * modules from several sources -> probs = softmax(logit_i / T_i), T_i the
    temperature of module i's source fitted on its calibration data, which puts
    every source's logits on a calibrated (comparable) scale.
A source classifier composed as a member records this metadata per class too
(:mod:`onnxmod.sourcemember`: calibration method "source", ``temperature_fitted``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import onnx
from onnx import TensorProto, helper

from onnxmod import modelio
from onnxmod.errors import OnnxmodError

LOGIT = "logit"
SCORE = "score"


@dataclass
class SourceInfo:
    name: str
    sha256: str
    num_classes: int
    params: int
    flops: int  # MACs, as docs/DESIGN.md's `onnxmod.source` calls them


@dataclass
class Calibration:
    method: str  # "platt"
    a: float  # score = sigmoid(a * logit + b)
    b: float
    temperature: float  # of the source: softmax(logits / T) is calibrated on the calibration data
    samples: int
    nll_before: float | None = None
    nll_after: float | None = None
    # False: no data fitted `temperature` (a source member composed alone, whose scale did not matter);
    # compose refuses such a member next to other sources rather than guess its scale
    temperature_fitted: bool = True


@dataclass
class ModuleSpec:
    """Everything a module records (``metadata_props``), parsed."""

    class_name: str
    class_index: int
    source: SourceInfo
    kept: dict[str, Any]  # {param_fraction, flop_fraction, channels: {kept, total}, ...}
    calibration: Calibration
    preprocess: dict[str, Any] = field(default_factory=dict)

    def to_metadata(self) -> dict[str, Any]:
        return {
            modelio.KIND: "module",
            modelio.CLASS_NAME: self.class_name,
            modelio.CLASS_INDEX: str(self.class_index),
            modelio.SOURCE: asdict(self.source),
            modelio.KEPT: self.kept,
            modelio.CALIBRATION: asdict(self.calibration),
            modelio.PREPROCESS: self.preprocess,
            modelio.FORMAT_VERSION: modelio.FORMAT,
        }

    @classmethod
    def from_model(cls, model: onnx.ModelProto, where: str = "model") -> "ModuleSpec":
        """Parse a module's metadata; OnnxmodError if ``model`` is not an onnxmod module."""
        kind = modelio.model_kind(model)
        if kind != "module":
            raise OnnxmodError(f"{where}: is a {kind} model, not an onnxmod module (make modules with `onnxmod decompose`)")
        try:
            src = modelio.get_meta(model, modelio.SOURCE)
            cal = modelio.get_meta(model, modelio.CALIBRATION)
            return cls(
                class_name=str(modelio.get_meta(model, modelio.CLASS_NAME, as_json=False)),
                class_index=int(modelio.get_meta(model, modelio.CLASS_INDEX)),
                source=SourceInfo(**src),
                kept=modelio.get_meta(model, modelio.KEPT, {}),
                calibration=Calibration(**cal),
                preprocess=modelio.get_meta(model, modelio.PREPROCESS, {}) or {},
            )
        except (TypeError, ValueError, KeyError) as e:
            raise OnnxmodError(f"{where}: broken onnxmod module metadata ({e})") from None


def add_score(graph: onnx.GraphProto, a: float, b: float, batch: str | int | None = None) -> None:
    """Append ``score = sigmoid(a * logit + b)`` to a graph that outputs ``logit`` (in place);
    ``score`` becomes the first output, as in every module."""
    graph.initializer.extend([helper.make_tensor("__om_platt_a", TensorProto.FLOAT, [], [float(a)]),
                              helper.make_tensor("__om_platt_b", TensorProto.FLOAT, [], [float(b)])])
    graph.node.extend([
        helper.make_node("Mul", [LOGIT, "__om_platt_a"], ["__om_platt_ax"], name="__om_platt_mul"),
        helper.make_node("Add", ["__om_platt_ax", "__om_platt_b"], ["__om_platt_z"], name="__om_platt_add"),
        helper.make_node("Sigmoid", ["__om_platt_z"], [SCORE], name="__om_platt_sigmoid"),
    ])
    shape = None if batch is None else [batch, 1]
    graph.output.insert(0, helper.make_tensor_value_info(SCORE, TensorProto.FLOAT, shape))
