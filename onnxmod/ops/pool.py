"""Spatial pooling and reductions over spatial axes: channel c stays channel c (``same``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from onnxmod.ops.base import Family
from onnxmod.ops.elementwise import SAME, unary

if TYPE_CHECKING:  # pragma: no cover
    from onnxmod.channels import ChannelAnalysis

POOL_OPS = ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool")
REDUCE_OPS = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2", "ReduceProd",
              "ReduceLogSumExp", "ReduceSumSquare")


def pool(a: "ChannelAnalysis", node: gs.Node) -> None:
    unary(a, node, pool=True)


def constant_axes(node: gs.Node) -> list[int] | None:
    """``axes`` from the attribute (old opsets) or a constant second input (new ones)."""
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
        axes = [int(v) for v in np.asarray(node.inputs[1].values).ravel()]
    return None if axes is None else [int(v) for v in axes]


def reduce(a: "ChannelAnalysis", node: gs.Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    tc = a.info(x)
    axes = constant_axes(node)
    rank = len(x.shape) if x.shape is not None else None
    if tc is None or rank is None or not axes or tc.block != 1:
        return a.barrier(node, "reduction over unknown axes")
    axes = [v % rank for v in axes]
    if 0 in axes or 1 in axes:
        return a.barrier(node, "reduction over the batch or channel axis")
    a.tag(node, SAME)
    a.same(x, y)


POOL = Family(
    "pool", POOL_OPS, pool,
    channels="channel c -> channel c",
    shrink="nothing",
    macs="0 (not counted)",
    sensitivity="passes through unchanged",
    fit="no",
    pins="pooling a flattened tensor",
)
REDUCE = Family(
    "reduce", REDUCE_OPS, reduce,
    channels="channel c -> channel c (spatial axes reduced)",
    shrink="nothing",
    macs="0",
    sensitivity="passes through unchanged",
    fit="no",
    pins="reducing the batch or channel axis, or unknown axes",
)
FAMILIES = (POOL, REDUCE)
RULES = ()
