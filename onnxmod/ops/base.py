"""What an op family declares: the vocabulary of the registry (:mod:`onnxmod.ops`).

A :class:`Family` is one file of this package: the ops it covers, how the channel
analysis reads them (``analyze``), and -- for the ``onnxmod ops`` table -- what it
does to channels, how it is shrunk, its MAC count, its sensitivity term, whether
reconstruction can re-fit it and when it pins channels. ``analyze`` tags each node
with a :class:`Rule` (``ChannelAnalysis.node_rule``); the rule is what surgery
(``shrink``), selection (``abs_weights``/``mac_term``/``back``) and the group
bookkeeping (``reduces``) and layer-wise reconstruction (``fit_geometry``/``sums_branches``)
consult, so nothing outside this package branches on op
types or rule names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import onnx_graphsurgeon as gs

if TYPE_CHECKING:  # pragma: no cover
    from onnxmod.channels import ChannelAnalysis


@dataclass(frozen=True)
class FitGeometry:
    """How layer-wise reconstruction (:mod:`onnxmod.reconstruct`) re-fits a node: as a 2-D
    convolution of its input's patches, by least squares."""

    kernel: tuple[int, int]
    strides: tuple[int, int]
    dilations: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right


class Rule:
    """How nodes tagged ``name`` are cut, counted, back-propagated through and re-fitted."""

    name = ""
    reduces = False  # sums input channels with weight columns; output rows make channels

    def shrink(self, s: Any, node: gs.Node) -> None:
        """Rewrite ``node`` in the surgeon ``s``'s graph for the kept channels (default: nothing)."""

    def abs_weights(self, a: "ChannelAnalysis", node: gs.Node) -> np.ndarray | None:
        """[out channels, in channels] sum of |weights| linking them (reducing rules only)."""
        return None

    def mac_term(self, a: "ChannelAnalysis", node: gs.Node) -> tuple[int, int | None, float] | None:
        """(in group, out group or None, MACs per kept (in, out) channel pair); None: no MACs."""
        return None

    def fit_geometry(self, node: gs.Node) -> FitGeometry | None:
        """The patches layer-wise reconstruction re-fits the node on; None: it is not re-fitted."""
        return None

    def sums_branches(self, node: gs.Node) -> bool:
        """Whether the node outputs the plain sum of its two inputs (a residual Add): a re-fitted
        node feeding it is matched to the sum minus the other branch."""
        return False

    def back(self, sel: Any, node: gs.Node, so: np.ndarray, add: Callable[[gs.Tensor, Any], None]) -> None:
        """Propagate the sensitivity ``so`` of the node's output to its inputs (default: a barrier
        spreads the mean, so channels behind an op the analysis does not know still count)."""
        for t in node.inputs:
            add(t, float(np.mean(so)))


class IndexMap(Rule):
    """A rule for ops whose output channel j is one input channel, ``Derivation.index[j]`` (Pad, Slice,
    Gather): a channel's sensitivity goes back to the channel it was taken from."""

    def back(self, sel: Any, node: gs.Node, so: np.ndarray, add: Callable[[gs.Tensor, Any], None]) -> None:
        derived_back(sel, node, so, add, per_input=False)


@dataclass(frozen=True)
class Family:
    """One op family: the registry's unit (one file of :mod:`onnxmod.ops`)."""

    name: str
    ops: tuple[str, ...]
    analyze: Callable[["ChannelAnalysis", gs.Node], None]
    channels: str  # what it does to channels
    shrink: str  # how surgery shrinks it
    macs: str  # its MAC count
    sensitivity: str  # its term in the importance bound
    fit: str  # whether layer-wise reconstruction re-fits it
    pins: str  # when it pins channels (never removed)
    counts_macs: bool = False  # onnxmod.cost counts its multiply-accumulates

    def row(self, op: str) -> dict[str, str]:
        return {"op": op, "family": self.name, "channels": self.channels, "shrink": self.shrink, "macs": self.macs,
                "sensitivity": self.sensitivity, "fit": self.fit, "pins": self.pins}


def derived_back(sel: Any, node: gs.Node, so: np.ndarray, add: Callable[[gs.Tensor, Any], None],
                 per_input: bool) -> None:
    """Sensitivity through an op that moves channels (Pad/Slice/Concat): output channel j's
    sensitivity goes to the input channel it was taken from (``Derivation.index``)."""
    a = sel.a
    for i, d in enumerate(sel.derivs_by_node[node.name]):
        t = node.inputs[i] if per_input else node.inputs[0]
        if t.name not in a.tensors:
            continue
        v = np.zeros(a.channels(t.name))
        ok = d.index >= 0
        np.add.at(v, d.index[ok], so[ok])
        add(t, v)
