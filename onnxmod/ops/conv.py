"""Convolutions: Conv (dense and depthwise) and ConvTranspose -- the ops whose weights
make and consume channels."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from onnxmod.ops.base import Family, FitGeometry, Rule

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

    def fit_geometry(self, node: gs.Node) -> FitGeometry | None:
        w = node.inputs[1]
        if node.attrs.get("auto_pad", "NOTSET") != "NOTSET" or not isinstance(w, gs.Constant) or len(w.shape) != 4:
            return None  # implicit pads or not 2-D: no explicit patch geometry
        pads = [int(v) for v in node.attrs.get("pads", (0, 0, 0, 0))]
        pair = lambda key: tuple(int(v) for v in node.attrs.get(key, (1, 1)))  # noqa: E731
        return FitGeometry((int(w.shape[2]), int(w.shape[3])), pair("strides"), pair("dilations"),
                           (pads[0], pads[1], pads[2], pads[3]))

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


class Grouped(Rule):
    """group = g, not depthwise: input block j (C/g channels) feeds output block j (M/g rows).
    Every block keeps as many channels (ChannelAnalysis.equal_blocks), so the result is a
    grouped Conv with the same g."""

    name = "grouped_conv"
    reduces = True

    def shrink(self, s, node: gs.Node) -> None:
        w = np.asarray(node.inputs[1].values)  # [M, C/g, k...]
        g = int(node.attrs["group"])
        x, y = node.inputs[0].name, node.outputs[0].name
        kept_in, out_k = s.kept(x), s.kept(y)
        m_g, c_g = w.shape[0] // g, w.shape[1]
        if kept_in.size == c_g * g and out_k.size == w.shape[0]:
            return
        b = np.asarray(node.inputs[2].values, dtype=np.float64) if len(node.inputs) > 2 else None
        extra = np.zeros(w.shape[0])
        blocks = []
        for j in range(g):
            in_block = np.arange(j * c_g, (j + 1) * c_g)
            kept = np.intersect1d(in_block, kept_in)
            removed = np.setdiff1d(in_block, kept_in)
            wc = np.moveaxis(w[j * m_g:(j + 1) * m_g], 1, 0).astype(np.float64)  # [C/g, M/g, k...]
            new = wc[kept - j * c_g]
            if removed.size:
                a, c = s.fill_subset(x, kept, removed)
                w_r = wc[removed - j * c_g]
                if a is not None:
                    new = new + np.tensordot(a.T, w_r, axes=1)  # W_K += A^T W_R, within the block
                extra[j * m_g:(j + 1) * m_g] = np.tensordot(c, w_r.reshape(w_r.shape[0], m_g, -1).sum(axis=2), 1)
            rows = out_k[(out_k >= j * m_g) & (out_k < (j + 1) * m_g)] - j * m_g
            blocks.append(np.moveaxis(new[:, rows], 0, 1))
        node.inputs[1] = s.const(node.inputs[1].name, np.concatenate(blocks).astype(w.dtype))
        if b is not None or np.any(extra != 0):
            s.set_bias(node, ((b if b is not None else 0.0) + extra)[out_k].astype(w.dtype))

    def abs_weights(self, a, node: gs.Node) -> np.ndarray:
        w = np.abs(np.asarray(node.inputs[1].values, dtype=np.float64))
        g = int(node.attrs["group"])
        m_g, c_g = w.shape[0] // g, w.shape[1]
        dense = np.zeros((w.shape[0], c_g * g))  # block-diagonal [out, in]
        for j in range(g):
            dense[j * m_g:(j + 1) * m_g, j * c_g:(j + 1) * c_g] = w[j * m_g:(j + 1) * m_g].reshape(m_g, c_g, -1).sum(2)
        return dense

    def mac_term(self, a, node: gs.Node):
        return (*_groups(a, node), _spatial_taps(node) / int(node.attrs["group"]))

    def back(self, sel, node: gs.Node, so: np.ndarray, add) -> None:
        add(node.inputs[0], sel.weights[node.name].T @ so)


CONV, DEPTHWISE, TRANSPOSED, GROUPED = DenseConv(), Depthwise(), Transposed(), Grouped()


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
    out = a.fresh(y)
    if cin is None or out is None or cin % group or a.group_size(out.group) % group:
        return a.barrier(node, f"grouped convolution (group={group}) of unknown channel counts")
    a.tag(node, GROUPED)
    a.equal_blocks += [(tc.group, group), (out.group, group)]


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
             "depthwise (group = C): channel c -> channel c; grouped (group g): as dense, block j of the input "
             "feeding block j of the output",
    shrink="dense: weight rows/columns sliced, removed inputs folded into the bias (fill); depthwise: "
           "filters sliced, group = kept; grouped: the same count kept in every group, fill within the group",
    macs="out positions x C_in/group x kernel taps x C_out",
    sensitivity="|W|^T s (dense); |w_c| s_c (depthwise)",
    fit="dense Conv: layer-wise least squares (--reconstruct)",
    pins="non-constant weights",
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
RULES = (CONV, DEPTHWISE, TRANSPOSED, GROUPED)
