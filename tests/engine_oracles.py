"""Oracles shared by the engine tests: run graphs, find channels that are exactly zero."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxmod import graphio
from onnxmod.channels import ChannelAnalysis

ort.set_default_logger_severity(3)


def run(model: onnx.ModelProto, x: np.ndarray, names: list[str] | None = None) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(names, {sess.get_inputs()[0].name: x})


def zero_channels(a: ChannelAnalysis, x: np.ndarray) -> dict[int, np.ndarray]:
    """Per removable group: mask of channels that are exactly 0 at every tensor a Conv/Gemm/MatMul
    sums over (so removing them, filled with 0, must leave every output unchanged)."""
    groups = [g for g in a.groups if g.removable and not g.is_output]
    names = sorted({t for g in groups for _, t in g.consumers})
    values = dict(zip(names, run(graphio.add_outputs(a.model, names), x, names))) if names else {}
    out = {}
    for g in groups:
        mask = np.ones(g.size, dtype=bool)
        for _, t in g.consumers:
            v = values[t]
            block = a.tensors[t].block
            per = np.abs(v).reshape(v.shape[0], g.size, block, -1).max(axis=(0, 2, 3))
            mask &= per == 0
        out[g.id] = mask
    return out

# Repair (on by default) at a tiny budget, for fixtures whose subject is not repair itself:
# the modules still go through the distillation code path, in seconds (tests/test_repair.py tests it).
QUICK_REPAIR = {"repair_epochs": 1, "repair_min_steps": 10}


def load_zoo():
    """``sample_graphs/zoo/zoo.py`` (the third-party model list), imported once as ``onnxmod_zoo``."""
    if "onnxmod_zoo" not in sys.modules:
        path = Path(__file__).resolve().parent.parent / "sample_graphs" / "zoo" / "zoo.py"
        spec = importlib.util.spec_from_file_location("onnxmod_zoo", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses look their module up
        spec.loader.exec_module(mod)
    return sys.modules["onnxmod_zoo"]
