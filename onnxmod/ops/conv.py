"""Convolutions: Conv (dense and depthwise) and ConvTranspose -- the ops whose weights
make and consume channels."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from onnxmod.ops.base import Family, Rule

if TYPE_CHECKING:  # pragma: no cover
    from onnxmod.channels import ChannelAnalysis


def _spatial_taps(node: gs.Node) -> float:
    """Output positions x kernel taps: MACs per (input channel, output channel) pair."""
    out_shape = node.outputs[0].shape
    spatial = float(np.prod([d for d in out_shape[2:]])) if out_shape is not None else 1.0
    return float(np.prod(np.asarray(node.inputs[1].values).shape[2:])) * spatial


def _groups(a: "ChannelAnalysis", node: gs.Node) -> tuple[int, int]:
    return a.find(a.tensors[node.inputs[0].name].group), a.find(a.tensors[node.outputs[0].name].group)


class DenseConv(Rule):
    name = "conv"
    reduces = True

    def shrink(self, s, node: gs.Node) -> None:
        w = np.asarray(node.inputs[1].values)  # [M, C, k...]
        if s.unchanged(node, w.shape[0]):
            return
        b = np.asarray(node.inputs[2].values) if len(node.inputs) > 2 else None
        wc, b = s.fold(node, np.moveaxis(w, 1, 0), 1, b)
        node.inputs[1] = s.const(node.inputs[1].name, np.moveaxis(wc, 0, 1))
        s.set_bias(node, b)

    def abs_weights(self, a, node: gs.Node) -> np.ndarray:
        w = np.abs(np.asarray(node.inputs[1].values, dtype=np.float64))
        return w.reshape(w.shape[0], w.shape[1], -1).sum(axis=2)

    def mac_term(self, a, node: gs.Node):
        return (*_groups(a, node), _spatial_taps(node))

    def back(self, sel, node: gs.Node, so: np.ndarray, add) -> None:
        add(node.inputs[0], sel.weights[node.name].T @ so)


class Depthwise(Rule):
    """group == C_in == C_out: channel c in -> channel c out (same group)."""

    name = "depthwise"

    def shrink(self, s, node: gs.Node) -> None:
        kept = s.kept(node.outputs[0].name)
        w = np.asarray(node.inputs[1].values)
        if kept.size == w.shape[0]:
            return
        node.inputs[1] = s.const(node.inputs[1].name, w[kept])
        if len(node.inputs) > 2:
            node.inputs[2] = s.const(node.inputs[2].name, np.asarray(node.inputs[2].values)[kept])
        node.attrs["group"] = int(kept.size)

    def mac_term(self, a, node: gs.Node):
        return _groups(a, node)[0], None, _spatial_taps(node)

    def back(self, sel, node: gs.Node, so: np.ndarray, add) -> None:
        w = np.abs(np.asarray(node.inputs[1].values, dtype=np.float64))
        add(node.inputs[0], so * w.reshape(w.shape[0], -1).sum(axis=1))


class Transposed(Rule):
    name = "convtranspose"
    reduces = True

    def shrink(self, s, node: gs.Node) -> None:
        w = np.asarray(node.inputs[1].values)  # [C, M, k...]
        if s.unchanged(node, w.shape[1]):
            return
        b = np.asarray(node.inputs[2].values) if len(node.inputs) > 2 else None
        wc, b = s.fold(node, w, 1, b)
        node.inputs[1] = s.const(node.inputs[1].name, wc)
        s.set_bias(node, b)

    def abs_weights(self, a, node: gs.Node) -> np.ndarray:
        w = np.abs(np.asarray(node.inputs[1].values, dtype=np.float64))
        return w.reshape(w.shape[0], w.shape[1], -1).sum(axis=2).T

    def mac_term(self, a, node: gs.Node):
        return (*_groups(a, node), _spatial_taps(node))

    def back(self, sel, node: gs.Node, so: np.ndarray, add) -> None:
        add(node.inputs[0], sel.weights[node.name].T @ so)


CONV, DEPTHWISE, TRANSPOSED = DenseConv(), Depthwise(), Transposed()


def conv(a: "ChannelAnalysis", node: gs.Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    w = a.weight(node, 1)
    tc = a.info(x)
    if w is None or (len(node.inputs) > 2 and a.weight(node, 2) is None):
        return a.barrier(node, "weights are not constant")
    group = int(node.attrs.get("group", 1))
    cin = a.channels_of(x)
    if tc is None or tc.block != 1:
        return a.barrier(node, "input has no channel axis")
    if group == 1:
        a.tag(node, CONV)
        a.fresh(y)
        return
    if group == cin == w.shape[0]:  # depthwise: channel c in -> channel c out
        a.tag(node, DEPTHWISE)
        a.same(x, y)
        return
    return a.barrier(node, f"grouped convolution (group={group}) that is not depthwise")


def convtranspose(a: "ChannelAnalysis", node: gs.Node) -> None:
    w = a.weight(node, 1)
    tc = a.info(node.inputs[0])
    if w is None or (len(node.inputs) > 2 and a.weight(node, 2) is None):
        return a.barrier(node, "weights are not constant")
    if int(node.attrs.get("group", 1)) != 1 or tc is None or tc.block != 1:
        return a.barrier(node, "grouped ConvTranspose")
    a.tag(node, TRANSPOSED)
    a.fresh(node.outputs[0])


CONV_FAMILY = Family(
    "conv", ("Conv",), conv,
    channels="dense (group 1): input channels summed by weight columns, output rows make a new group; "
             "depthwise (group = C): channel c -> channel c",
    shrink="dense: weight rows/columns sliced, removed inputs folded into the bias (fill); depthwise: "
           "filters sliced, group = kept",
    macs="out positions x C_in/group x kernel taps x C_out",
    sensitivity="|W|^T s (dense); |w_c| s_c (depthwise)",
    fit="dense Conv: layer-wise least squares (--reconstruct)",
    pins="grouped Conv that is not depthwise; non-constant weights",
    counts_macs=True,
)
CONVTRANSPOSE_FAMILY = Family(
    "convtranspose", ("ConvTranspose",), convtranspose,
    channels="input channels summed, output rows make a new group",
    shrink="weight [C_in, C_out] sliced, removed inputs folded into the bias",
    macs="input positions x C_out/group x kernel taps x C_in",
    sensitivity="|W|^T s",
    fit="no",
    pins="group != 1; non-constant weights",
    counts_macs=True,
)
FAMILIES = (CONV_FAMILY, CONVTRANSPOSE_FAMILY)
RULES = (CONV, DEPTHWISE, TRANSPOSED)
