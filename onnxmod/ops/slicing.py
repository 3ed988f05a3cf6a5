"""Slice and Split on the channel axis: index-mapped new groups (channel j of the output is
channel map[j] of the input)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from onnxmod.ops.base import Family, IndexMap
from onnxmod.ops.elementwise import SAME

if TYPE_CHECKING:  # pragma: no cover
    from onnxmod.channels import ChannelAnalysis


def _neg_slice(c: int, start: int, end: int, step: int) -> np.ndarray:
    return np.arange(c)[slice(start, end if end >= -c - 1 and end != -(2**63) else None, step)]


def slice_spec(node: gs.Node, rank: int) -> dict[int, tuple[int, int, int]] | None:
    """``{axis: (start, end, step)}`` of a Slice with constant parameters, else None."""
    vals = []
    for i in range(1, 5):
        if i < len(node.inputs) and node.inputs[i].name:
            if not isinstance(node.inputs[i], gs.Constant):
                return None
            vals.append([int(v) for v in np.asarray(node.inputs[i].values).ravel()])
        else:
            vals.append(None)
    starts, ends, axes, steps = vals
    if starts is None or ends is None:
        return None
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    return {ax % rank: (s, e, st) for ax, s, e, st in zip(axes, starts, ends, steps)}


class SliceChannels(IndexMap):
    name = "slice_channels"

    def shrink(self, s, node: gs.Node) -> None:
        (d,) = s.derivs[node.name]
        x = node.inputs[0]
        rank = len(x.shape)
        needed = d.index[s.keep[d.dst]]
        pos = np.searchsorted(s.kept(x.name), needed)
        spec = slice_spec(node, rank)
        del spec[1]
        s.gather_before(node, 0, pos)
        if not spec:
            node.op = "Identity"
            node.inputs = node.inputs[:1]
            node.attrs = {}
            return
        axes = sorted(spec)
        cols = [np.asarray([spec[ax][k] for ax in axes], dtype=np.int64) for k in range(3)]
        node.inputs = [node.inputs[0], s.const(f"{node.name}_starts", cols[0]),
                       s.const(f"{node.name}_ends", cols[1]),
                       s.const(f"{node.name}_axes", np.asarray(axes, dtype=np.int64)),
                       s.const(f"{node.name}_steps", cols[2])]


SLICE_CHANNELS = SliceChannels()


def slice_(a: "ChannelAnalysis", node: gs.Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    tc = a.info(x)
    s = a.shape(x)
    if tc is None or s is None:
        return a.barrier(node, "input has no channel axis")
    spec = slice_spec(node, len(s))
    if spec is None:
        return a.barrier(node, "slice parameters are not constant")
    if 1 not in spec:
        a.tag(node, SAME)
        return a.same(x, y)
    if tc.block != 1:
        return a.barrier(node, "slicing flattened features")
    c = a.channels_of(x)
    start, end, step = spec[1]
    index = np.arange(c)[slice(start, end, step)] if step > 0 else _neg_slice(c, start, end, step)
    a.index_map(node, x, y, index, SLICE_CHANNELS)


SLICE = Family(
    "slice", ("Slice",), slice_,
    channels="spatial slicing: channel c -> c; on the channel axis: a new group, channel j = input "
             "channel start + j*step",
    shrink="input channels gathered, the channel axis dropped from the slice",
    macs="0",
    sensitivity="mapped back to the source channel",
    fit="no",
    pins="non-constant parameters; slicing flattened features",
)
FAMILIES = (SLICE,)
RULES = (SLICE_CHANNELS,)
