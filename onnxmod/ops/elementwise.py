"""Elementwise ops: unary activations, binary arithmetic (incl. residual Adds and
squeeze-excitation gates) and per-channel normalisation. All keep channel c at c: the
``same`` rule, whose surgery slices per-channel constants."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from onnxmod.ops.base import Family, Rule

if TYPE_CHECKING:  # pragma: no cover
    from onnxmod.channels import ChannelAnalysis

UNARY_OPS = (
    "Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu",
    "Celu", "Softplus", "Softsign", "Exp", "Log", "Neg", "Abs", "Sqrt", "Reciprocal", "Erf",
    "Gelu", "Mish", "Identity", "Dropout", "Floor", "Ceil", "Round", "Sin", "Cos", "ThresholdedRelu",
    "Shrink", "Sign", "Cast",
)
BINARY_OPS = ("Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "PRelu", "Pow")
PER_CHANNEL_NORM = {"BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2)}


class Same(Rule):
    """Channel c of the output is channel c of the inputs."""

    name = "same"

    def shrink(self, s, node: gs.Node) -> None:
        y = node.outputs[0]
        kept = s.kept(y.name)
        if kept is None or y.shape is None:
            return
        out_rank = len(y.shape)
        n = s.a.tensors[y.name]
        full = s.keep[s.a.find(n.group)].size * n.block
        if kept.size == full:
            return
        for i, t in enumerate(node.inputs):
            if not isinstance(t, gs.Constant):
                continue
            v = np.asarray(t.values)
            if node.op in PER_CHANNEL_NORM and i > 0:
                node.inputs[i] = s.const(t.name, v[kept])
                continue
            if node.op == "Clip" or v.size == 1:
                continue
            axis = 1 - (out_rank - v.ndim)
            if axis >= 0 and v.shape[axis] == full:
                node.inputs[i] = s.const(t.name, np.take(v, kept, axis=axis))

    def sums_branches(self, node: gs.Node) -> bool:
        return node.op in ("Add", "Sum") and len(node.inputs) == 2

    def back(self, sel, node: gs.Node, so: np.ndarray, add) -> None:
        f = scale_factor(node, so.size)
        for t in node.inputs:
            if not isinstance(t, gs.Constant):
                add(t, so * f)


def scale_factor(node: gs.Node, size: int) -> np.ndarray | float:
    """How a per-channel shift scales through a channel-preserving op (BatchNorm, Mul/Div by const)."""
    if node.op == "BatchNormalization":
        scale, var = (np.asarray(node.inputs[i].values, dtype=np.float64) for i in (1, 4))
        return np.abs(scale) / np.sqrt(var + float(node.attrs.get("epsilon", 1e-5)))
    if node.op in ("Mul", "Div"):
        for t in node.inputs:
            if isinstance(t, gs.Constant):
                v = np.abs(np.asarray(t.values, dtype=np.float64)).ravel()
                if v.size in (1, size):
                    v = v if node.op == "Mul" else 1.0 / np.maximum(v, 1e-12)
                    return v if v.size == size else float(v[0])
    return 1.0


SAME = Same()


# ---------------------------------------------------------------- analysis
def unary(a: "ChannelAnalysis", node: gs.Node, pool: bool = False) -> None:
    x = node.inputs[0]
    tc = a.info(x)
    if tc is None:
        for t in node.outputs:
            a.fresh(t, pinned=f"output of {node.op} '{node.name}' on a tensor without channels")
        a.tag(node, SAME)
        return
    if pool and tc.block != 1:
        return a.barrier(node, "pooling a flattened tensor")
    a.tag(node, SAME)
    a.same(x, node.outputs[0])
    for extra in node.outputs[1:]:  # Dropout mask
        a.same(x, extra)


def norm(a: "ChannelAnalysis", node: gs.Node) -> None:
    tc = a.info(node.inputs[0])
    params = [node.inputs[i] for i in PER_CHANNEL_NORM[node.op] if i < len(node.inputs)]
    if tc is None or tc.block != 1 or any(not isinstance(p, gs.Constant) for p in params):
        return a.barrier(node, "normalisation with non-constant parameters")
    a.tag(node, SAME)
    a.same(node.inputs[0], node.outputs[0])


def binary(a: "ChannelAnalysis", node: gs.Node) -> None:
    y = node.outputs[0]
    out_rank = len(y.shape) if y.shape is not None else None
    groups = []
    for t in node.inputs:
        if isinstance(t, gs.Constant):
            if not const_broadcast_ok(np.asarray(t.values), out_rank, a.channels_of(y)):
                return a.barrier(node, f"constant '{t.name}' broadcasts over the channel axis")
            continue
        tc = a.info(t)
        s = a.shape(t)
        if tc is None or s is None or len(s) != out_rank:
            return a.barrier(node, f"operand '{t.name}' has no channel axis aligned with the output")
        groups.append(tc)
    if not groups:
        a.fresh(y, pinned=f"constant-only {node.op} '{node.name}'")
        return
    if len({g.block for g in groups}) != 1:
        return a.barrier(node, "operands flattened differently")
    note_gate(a, node, groups)
    gid = groups[0].group
    for g in groups[1:]:
        gid = a.union(gid, g.group, f"{node.op} '{node.name}'")
    a.tag(node, SAME)
    a.assign(y, gid, groups[0].block)


def note_gate(a: "ChannelAnalysis", node: gs.Node, groups: list) -> None:
    """``Mul(x [N, C, H, W], g [N, C, 1, 1])``: squeeze-excitation. The Convs making ``g``
    scale x's channels; they do not make a second stream added to x (not a residual tie)."""
    if node.op != "Mul" or len(groups) != 2 or a.find(groups[0].group) == a.find(groups[1].group):
        return
    shapes = [a.shape(t) for t in node.inputs]
    if any(s is None or len(s) != 4 for s in shapes):
        return
    for gate, other in ((0, 1), (1, 0)):
        if tuple(shapes[gate][2:]) == (1, 1) and tuple(shapes[other][2:]) != (1, 1):
            a.mark_gate(groups[gate].group)


def const_broadcast_ok(v: np.ndarray, out_rank: int | None, channels: int | None) -> bool:
    """A constant operand is fine when it is scalar-like or per-channel along axis 1."""
    if v.size == 1:
        return True
    if out_rank is None or channels is None or v.ndim > out_rank:
        return False
    axis = 1 - (out_rank - v.ndim)
    if axis < 0:  # does not reach the channel axis: same constant for every channel
        return True
    return v.shape[axis] in (1, channels) and all(d == 1 for d in v.shape[:axis])


UNARY = Family(
    "unary", UNARY_OPS, unary,
    channels="channel c -> channel c",
    shrink="nothing (Clip bounds and scalars untouched)",
    macs="0",
    sensitivity="passes through unchanged",
    fit="no",
    pins="never (a tensor without channel axis gets a pinned group)",
)
BINARY = Family(
    "binary", BINARY_OPS, binary,
    channels="ties the operands' channels into one group (residual Add); Mul by an [N,C,1,1] tensor is a "
             "squeeze-excitation gate (its producers do not make the group tied)",
    shrink="per-channel constants sliced",
    macs="0",
    sensitivity="through; Mul/Div by a constant scales it by |c|",
    fit="no",
    pins="a constant broadcasting over the channel axis, operands of different rank or flattening",
)
NORM = Family(
    "normalization", tuple(PER_CHANNEL_NORM), norm,
    channels="channel c -> channel c",
    shrink="scale/bias/mean/var sliced",
    macs="0",
    sensitivity="scaled by |gamma| / sqrt(var + eps)",
    fit="no",
    pins="non-constant parameters or a flattened input",
)
FAMILIES = (UNARY, BINARY, NORM)
RULES = (SAME,)
