"""Concat on the channel axis (dense/fire blocks): a new group, each part index-mapped to an
input's group; on another axis it ties the inputs' channels."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from onnxmod.ops.base import Family, Rule, derived_back
from onnxmod.ops.elementwise import SAME

if TYPE_CHECKING:  # pragma: no cover
    from onnxmod.channels import ChannelAnalysis


class ConcatChannels(Rule):
    name = "concat_channels"

    def shrink(self, s, node: gs.Node) -> None:
        for i, d in enumerate(s.derivs[node.name]):
            t = node.inputs[i]
            if t.name in s.a.tensors:
                pos = s.needed_positions(d, t.name)
            else:  # constant input (pinned group, never shrunk itself)
                needed = d.index[s.keep[d.dst] & (d.index >= 0)]
                pos = None if needed.size == s.keep[d.src].size else needed
            if pos is not None:
                s.gather_before(node, i, pos)

    def back(self, sel, node: gs.Node, so: np.ndarray, add) -> None:
        derived_back(sel, node, so, add, per_input=True)


CONCAT_CHANNELS = ConcatChannels()


def concat(a: "ChannelAnalysis", node: gs.Node) -> None:
    y = node.outputs[0]
    rank = len(y.shape) if y.shape is not None else None
    axis = int(node.attrs.get("axis", 0))
    if rank is None:
        return a.barrier(node, "unknown rank")
    axis %= rank
    infos = [a.info(t) for t in node.inputs]
    if axis != 1:
        if any(i is None for i in infos) or len({i.block for i in infos}) != 1:
            return a.barrier(node, "concat of tensors without channel axis")
        gid = infos[0].group
        for i in infos[1:]:
            gid = a.union(gid, i.group, f"Concat '{node.name}'")
        a.tag(node, SAME)
        a.assign(y, gid, infos[0].block)
        return
    if any(i is not None and i.block != 1 for i in infos):
        return a.barrier(node, "concat of flattened features")
    out = a.fresh(y)
    if out is None:
        return a.barrier(node, "unknown output channels")
    out_size = a.group_size(out.group)
    offset = 0
    for t, i in zip(node.inputs, infos):
        c = a.channels_of(t)
        if c is None:
            a.pin(out.group, f"Concat '{node.name}' input '{t.name}' of unknown size")
            return
        src = i.group if i is not None else a.new_group(c, pinned=f"constant input of Concat '{node.name}'")
        index = np.full(out_size, -1)
        index[offset:offset + c] = np.arange(c)
        a.derive(node, src, out.group, index)
        offset += c
    assert offset == out_size
    a.tag(node, CONCAT_CHANNELS)


CONCAT = Family(
    "concat", ("Concat",), concat,
    channels="on the channel axis: a new group, each part mapped to its input's channels; on another axis: "
             "ties the inputs' groups",
    shrink="each input gathered to the channels the output keeps",
    macs="0",
    sensitivity="mapped back to each input's channels",
    fit="no",
    pins="inputs of unknown size (their part), flattened features",
)
FAMILIES = (CONCAT,)
RULES = (CONCAT_CHANNELS,)
