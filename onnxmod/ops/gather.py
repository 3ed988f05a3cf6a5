"""Gather on the channel axis with constant indices (channel shuffles after the front-end):
a new group, channel j = input channel indices[j] -- an index map, like Slice."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from onnxmod.ops.base import Family, IndexMap

if TYPE_CHECKING:  # pragma: no cover
    from onnxmod.channels import ChannelAnalysis


class GatherChannels(IndexMap):
    name = "gather_channels"

    def shrink(self, s, node: gs.Node) -> None:
        (d,) = s.derivs[node.name]
        needed = d.index[s.keep[d.dst]]
        pos = np.searchsorted(s.kept(node.inputs[0].name), needed)
        node.inputs[1] = s.const(f"{node.name}_indices", pos.astype(np.int64))


GATHER_CHANNELS = GatherChannels()


def gather(a: "ChannelAnalysis", node: gs.Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    tc = a.info(x)
    if tc is None:  # shape arithmetic (Shape -> Gather): no channels involved
        return a.barrier(node, "gather of a tensor without channels")
    idx = a.weight(node, 1)
    rank = len(x.shape) if x.shape is not None else None
    c = a.channels_of(x)
    if (idx is None or idx.ndim != 1 or rank is None or c is None or int(node.attrs.get("axis", 0)) % rank != 1
            or tc.block != 1):
        return a.barrier(node, "Gather other than constant 1-D indices on the channel axis")
    a.index_map(node, x, y, np.asarray(idx, dtype=np.int64) % c, GATHER_CHANNELS)


GATHER = Family(
    "gather", ("Gather",), gather,
    channels="constant indices on the channel axis (a channel shuffle after the front-end): a new group, "
             "channel j = input channel indices[j]",
    shrink="indices rewritten to the kept input channels",
    macs="0",
    sensitivity="mapped back to the source channel",
    fit="no",
    pins="other axes, non-constant or multi-dimensional indices",
)
FAMILIES = (GATHER,)
RULES = (GATHER_CHANNELS,)
