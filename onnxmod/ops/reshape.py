"""Flatten and Squeeze/Unsqueeze: the channel axis survives, possibly as blocks of features."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from onnxmod.ops.base import Family
from onnxmod.ops.elementwise import SAME
from onnxmod.ops.pool import constant_axes

if TYPE_CHECKING:  # pragma: no cover
    from onnxmod.channels import ChannelAnalysis


def flatten(a: "ChannelAnalysis", node: gs.Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    tc = a.info(x)
    s = a.shape(x)
    axis = int(node.attrs.get("axis", 1))
    if tc is None or s is None or axis != 1 or not all(isinstance(d, (int, np.integer)) for d in s[2:]):
        return a.barrier(node, "flatten not at axis 1 of a known shape")
    a.tag(node, SAME)
    a.assign(y, tc.group, tc.block * int(np.prod(s[2:], dtype=np.int64)))


def squeeze(a: "ChannelAnalysis", node: gs.Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    tc = a.info(x)
    axes = constant_axes(node)
    if tc is None or axes is None or x.shape is None or y.shape is None:
        return a.barrier(node, "squeeze axes unknown")
    rank = max(len(x.shape), len(y.shape))
    if any(v % rank in (0, 1) for v in axes) or tc.block != 1:
        return a.barrier(node, "squeezes the batch or channel axis")
    a.tag(node, SAME)
    a.same(x, y)


FLATTEN = Family(
    "flatten", ("Flatten",), flatten,
    channels="channel c -> features [c*HW, (c+1)*HW) (a block per channel); Reshape [N,C,H,W]->[N,C*H*W] is "
             "read as Flatten, and Transpose(0,2,3,1) before it is folded into the classifier by the front-end",
    shrink="nothing (the consumer's weight rows are sliced by blocks)",
    macs="0",
    sensitivity="passes through by blocks",
    fit="no",
    pins="axis != 1 or unknown spatial size",
)
SQUEEZE = Family(
    "squeeze", ("Squeeze", "Unsqueeze"), squeeze,
    channels="channel c -> channel c",
    shrink="nothing",
    macs="0",
    sensitivity="passes through unchanged",
    fit="no",
    pins="(un)squeezing the batch or channel axis, or unknown axes",
)
FAMILIES = (FLATTEN, SQUEEZE)
RULES = ()
