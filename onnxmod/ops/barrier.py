"""Everything else: ops the analysis does not understand, and custom-domain ops. They pin
every channel tensor they touch (never mis-pruned); their outputs get pinned groups."""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx_graphsurgeon as gs

from onnxmod.ops.base import Family, Rule

if TYPE_CHECKING:  # pragma: no cover
    from onnxmod.channels import ChannelAnalysis


class Barrier(Rule):
    name = "barrier"


BARRIER = Barrier()


def unknown(a: "ChannelAnalysis", node: gs.Node) -> None:
    if node.domain not in (None, "", "ai.onnx"):
        return a.barrier(node, f"custom domain {node.domain}")
    return a.barrier(node, "op not understood by the channel analysis")


OTHER = Family(
    "other", ("*",), unknown,
    channels="unknown: every channel tensor it touches is pinned",
    shrink="never",
    macs="0",
    sensitivity="mean of its outputs' sensitivity to every input channel",
    fit="no",
    pins="always (decompose names the one nearest the output when it pins the class rows)",
)
FAMILIES = (OTHER,)
RULES = (BARRIER,)
