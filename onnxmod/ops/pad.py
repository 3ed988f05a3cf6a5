"""Pad: padding the channel axis with constants (option-A shortcuts) makes a new group
derived from the input's (padded channels are constants, pinned to nothing)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from onnxmod.ops.base import Family, IndexMap
from onnxmod.ops.elementwise import SAME

if TYPE_CHECKING:  # pragma: no cover
    from onnxmod.channels import ChannelAnalysis


def pad_amounts(node: gs.Node, rank: int) -> list[int] | None:
    """Pads as a full list [begin_0..begin_{r-1}, end_0..end_{r-1}] (handles the ``axes`` input)."""
    if "pads" in node.attrs:
        pads = [int(p) for p in node.attrs["pads"]]
        return pads if len(pads) == 2 * rank else None
    if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
        return None
    pads = [int(p) for p in np.asarray(node.inputs[1].values).ravel()]
    if len(node.inputs) > 3 and node.inputs[3].name:
        if not isinstance(node.inputs[3], gs.Constant):
            return None
        axes = [int(v) % rank for v in np.asarray(node.inputs[3].values).ravel()]
        full = [0] * (2 * rank)
        for k, ax in enumerate(axes):
            full[ax], full[ax + rank] = pads[k], pads[k + len(axes)]
        return full
    return pads if len(pads) == 2 * rank else None


class PadChannels(IndexMap):
    name = "pad_channels"

    def shrink(self, s, node: gs.Node) -> None:
        (d,) = s.derivs[node.name]
        x = node.inputs[0]
        rank = len(x.shape)
        pads = pad_amounts(node, rank)
        pos = s.needed_positions(d, x.name)
        kdst = s.keep[d.dst]
        const = d.index < 0
        first_src = int(np.argmax(~const)) if (~const).any() else kdst.size
        p0 = int((kdst & const)[:first_src].sum())
        p1 = int((kdst & const)[first_src:].sum())
        if pos is None and p0 == pads[1] and p1 == pads[1 + rank]:
            return
        if pos is not None:
            s.gather_before(node, 0, pos)
        pads[1], pads[1 + rank] = p0, p1
        if "pads" in node.attrs:
            node.attrs["pads"] = pads
        else:
            node.inputs[1] = s.const(f"{node.name}_pads", np.asarray(pads, dtype=np.int64))
            if len(node.inputs) > 3 and node.inputs[3].name:  # drop `axes`: pads now cover all axes
                node.inputs[3] = gs.Variable.empty()


PAD_CHANNELS = PadChannels()


def pad(a: "ChannelAnalysis", node: gs.Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    tc = a.info(x)
    s = a.shape(x)
    if tc is None or s is None:
        return a.barrier(node, "input has no channel axis")
    pads = pad_amounts(node, len(s))
    if pads is None:
        return a.barrier(node, "pads are not constant")
    p0, p1 = pads[1], pads[1 + len(s)]
    if p0 == 0 and p1 == 0:
        a.tag(node, SAME)
        return a.same(x, y)
    if node.attrs.get("mode", "constant") not in ("constant", b"constant") or tc.block != 1:
        return a.barrier(node, "non-constant padding of the channel axis")
    c = a.channels_of(x)
    index = np.arange(c + p0 + p1) - p0
    index[(index < 0) | (index >= c)] = -1
    a.index_map(node, x, y, index, PAD_CHANNELS)


PAD = Family(
    "pad", ("Pad",), pad,
    channels="spatial padding: channel c -> c; constant padding of the channel axis: a new group whose "
             "channel j is input channel j - p0 (or a constant)",
    shrink="input channels gathered, channel pads recounted",
    macs="0",
    sensitivity="mapped back to the source channel",
    fit="no",
    pins="non-constant pads, non-constant mode on the channel axis",
)
FAMILIES = (PAD,)
RULES = (PAD_CHANNELS,)
