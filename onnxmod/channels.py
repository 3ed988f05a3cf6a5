"""Channel-dependency analysis: which channels of an ONNX graph are tied together.

Every tensor with a channel axis (axis 1: ``[N, C, H, W]`` maps and ``[N, F]``
features) belongs to a :class:`ChannelGroup`. All tensors of a group share one
channel indexing, so removing channel ``c`` of a group removes it from every one of
those tensors at once (elementwise ops, BatchNorm, pooling, Flatten, residual Adds
tie groups together). Ops that *move* channels (Pad/Slice/Concat on the channel
axis) do not tie; they record a :class:`Derivation`: channel ``j`` of the output
group comes from channel ``map[j]`` of the input group (or is a constant).

A group's channels are *produced* by the output rows of Conv/Gemm/MatMul weights
and *consumed* (summed over) by the input columns of Conv/Gemm/MatMul weights.
Anything the analysis does not understand pins the groups it touches: their
channels are never removed, so an unknown op can never yield a wrong graph.

This is the one model of channel dependencies; decomposition, composition, the
surgery in :mod:`onnxmod.surgery` and the tests all go through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxmod import graphio

UNARY_OPS = {
    "Relu", "LeakyRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu",
    "Celu", "Softplus", "Softsign", "Exp", "Log", "Neg", "Abs", "Sqrt", "Reciprocal", "Erf",
    "Gelu", "Mish", "Identity", "Dropout", "Floor", "Ceil", "Round", "Sin", "Cos", "ThresholdedRelu",
    "Shrink", "Sign", "Cast",
}
BINARY_OPS = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "PRelu", "Pow"}
POOL_OPS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}
REDUCE_OPS = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2", "ReduceProd",
              "ReduceLogSumExp", "ReduceSumSquare"}
PER_CHANNEL_NORM = {"BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2)}
REDUCING_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


@dataclass
class ChannelGroup:
    """Channels shared by a set of tensors; removing channel c removes it everywhere here."""

    id: int
    size: int
    tensors: list[str] = field(default_factory=list)
    pinned: list[str] = field(default_factory=list)  # why channels here can't be removed
    is_output: bool = False  # holds a graph output: its channels are output rows
    producers: list[str] = field(default_factory=list)  # nodes whose weight rows make channels
    consumers: list[tuple[str, str]] = field(default_factory=list)  # (node, tensor) summing channels
    gates: list[str] = field(default_factory=list)  # producers whose channels only scale others (SE gates)

    @property
    def removable(self) -> bool:
        return not self.pinned


@dataclass
class Derivation:
    """Channel j of group ``dst`` is channel ``index[j]`` of group ``src`` (-1: not from src)."""

    node: str
    src: int
    dst: int
    index: np.ndarray


@dataclass
class TensorChannels:
    """Where a tensor's axis-1 channels live: group id and elements per channel (H*W after Flatten)."""

    group: int
    block: int = 1


class ChannelAnalysis:
    """Channel groups of a (canonicalised) ONNX model. Build with :func:`analyze`."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = graphio.to_gs(model)
        self.nodes = {n.name: n for n in self.graph.nodes}
        self._parent: list[int] = []
        self._groups: list[ChannelGroup] = []
        self.tensors: dict[str, TensorChannels] = {}
        self.derivations: list[Derivation] = []
        self.node_rule: dict[str, str] = {}  # node name -> rule applied (for surgery)
        self.unsupported: list[tuple[str, str, str]] = []  # (node, op, why)
        self.gate_producers: set[str] = set()  # Conv/Gemm making a squeeze-excitation gate

    # ---------------------------------------------------------------- union-find
    def _new(self, size: int, pinned: str | None = None) -> int:
        gid = len(self._groups)
        self._groups.append(ChannelGroup(gid, int(size)))
        self._parent.append(gid)
        if pinned:
            self._groups[gid].pinned.append(pinned)
        return gid

    def find(self, gid: int) -> int:
        while self._parent[gid] != gid:
            self._parent[gid] = self._parent[self._parent[gid]]
            gid = self._parent[gid]
        return gid

    def _union(self, a: int, b: int, where: str) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        ga, gb = self._groups[ra], self._groups[rb]
        if ga.size != gb.size:
            ga.pinned.append(f"size mismatch at {where}")
            gb.pinned.append(f"size mismatch at {where}")
            return ra
        self._parent[rb] = ra
        ga.pinned += gb.pinned
        ga.is_output |= gb.is_output
        return ra

    def _pin(self, gid: int, why: str) -> None:
        self._groups[self.find(gid)].pinned.append(why)

    # ---------------------------------------------------------------- queries
    @property
    def groups(self) -> list[ChannelGroup]:
        """Root groups with tensors, producers and consumers collected."""
        out = {}
        for g in self._groups:
            r = self.find(g.id)
            out.setdefault(r, self._groups[r])
        for root in out.values():
            root.tensors, root.producers, root.consumers, root.gates = [], [], [], []
        for t, tc in self.tensors.items():
            out[self.find(tc.group)].tensors.append(t)
        for name, rule in self.node_rule.items():
            node = self.nodes[name]
            if rule in ("conv", "convtranspose", "gemm", "matmul"):
                x = node.inputs[0].name
                if x in self.tensors:
                    out[self.find(self.tensors[x].group)].consumers.append((name, x))
                y = node.outputs[0].name
                out[self.find(self.tensors[y].group)].producers.append(name)
                if name in self.gate_producers:
                    out[self.find(self.tensors[y].group)].gates.append(name)
        return sorted(out.values(), key=lambda g: g.id)

    def group_of(self, tensor: str) -> ChannelGroup | None:
        tc = self.tensors.get(tensor)
        return None if tc is None else self._groups[self.find(tc.group)]

    def channels(self, tensor: str) -> int:
        """Number of channels (not features) along axis 1 of ``tensor``."""
        return self._groups[self.find(self.tensors[tensor].group)].size

    def output_group(self, name: str | None = None) -> ChannelGroup:
        """The group of a graph output (the first output when ``name`` is None)."""
        outs = self.graph.outputs
        t = outs[0] if name is None else next(o for o in outs if o.name == name)
        g = self.group_of(t.name)
        if g is None:
            raise ValueError(f"graph output {t.name} has no channel axis")
        return g

    def summary(self) -> dict[str, int | float]:
        """Channels the weights make (groups with producers, class rows excluded): how many,
        how many pinned (never removed) and how many tied (several producers, a residual stream
        or a gate)."""
        made = [g for g in self.groups if g.producers and not g.is_output]
        total = sum(g.size for g in made)
        pinned = sum(g.size for g in made if g.pinned)
        tied = sum(g.size for g in made if not g.pinned and len(set(g.producers) - set(g.gates)) > 1)
        return {"total": total, "pinned": pinned, "tied": tied, "pinned_fraction": pinned / max(total, 1)}

    def pinned_by(self, tensor: str) -> tuple[str, str, str]:
        """(node, op, why) of the not-understood node nearest to ``tensor``, walking back from it
        (breadth first) -- the one that pins it, not the first one in the graph."""
        producer = {o.name: n for n in self.graph.nodes for o in n.outputs}
        why = {n: w for n, _, w in self.unsupported}
        frontier, seen = [tensor], {tensor}
        while frontier:
            nxt = []
            for t in frontier:
                node = producer.get(t)
                if node is None:
                    continue
                if node.name in why:  # a barrier on channel tensors (shape arithmetic does not count)
                    return node.name, node.op, why[node.name]
                for i in node.inputs:
                    if i.name not in seen and not isinstance(i, gs.Constant):
                        seen.add(i.name)
                        nxt.append(i.name)
            frontier = nxt
        g = self.group_of(tensor)
        return tensor, "?", (g.pinned[0] if g is not None and g.pinned else "no channel axis")

    def derivations_resolved(self) -> list[Derivation]:
        return [Derivation(d.node, self.find(d.src), self.find(d.dst), d.index) for d in self.derivations]

    # ---------------------------------------------------------------- keep sets
    def full_keep(self) -> dict[int, np.ndarray]:
        """A keep-mask per root group, all True."""
        return {g.id: np.ones(g.size, dtype=bool) for g in self.groups}

    def close(self, keep: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        """Enforce the dependencies on ``keep`` (in place, returned).

        Pinned groups keep everything; a group keeps at least one channel (ONNX
        has no empty Conv); a kept channel derived from another group's channel
        keeps that one too. Iterates to a fixpoint.
        """
        for g in self.groups:
            if g.pinned:
                keep[g.id][:] = True
            elif not keep[g.id].any():
                keep[g.id][0] = True
        derivs = self.derivations_resolved()
        changed = True
        while changed:
            changed = False
            for d in derivs:
                src_needed = d.index[keep[d.dst] & (d.index >= 0)]
                before = keep[d.src][src_needed]
                if not before.all():
                    keep[d.src][src_needed] = True
                    changed = True
        return keep

    def tensor_keep(self, keep: dict[int, np.ndarray], tensor: str) -> np.ndarray | None:
        """Kept element indices of ``tensor`` along axis 1 (channel blocks expanded)."""
        tc = self.tensors.get(tensor)
        if tc is None:
            return None
        ch = np.nonzero(keep[self.find(tc.group)])[0]
        if tc.block == 1:
            return ch
        return (ch[:, None] * tc.block + np.arange(tc.block)[None, :]).ravel()

    # ---------------------------------------------------------------- analysis
    def _shape(self, t: gs.Tensor) -> tuple | None:
        return None if t.shape is None else tuple(t.shape)

    def _channels_of(self, t: gs.Tensor) -> int | None:
        s = self._shape(t)
        if s is None or len(s) < 2 or not isinstance(s[1], (int, np.integer)):
            return None
        return int(s[1])

    def _info(self, t: gs.Tensor) -> TensorChannels | None:
        return self.tensors.get(t.name)

    def _fresh(self, t: gs.Tensor, pinned: str | None = None, block: int = 1) -> TensorChannels | None:
        c = self._channels_of(t)
        if c is None or c % block:
            return None
        tc = TensorChannels(self._new(c // block, pinned), block)
        self.tensors[t.name] = tc
        return tc

    def _same(self, src: gs.Tensor, dst: gs.Tensor) -> None:
        tc = self._info(src)
        if tc is not None:
            self.tensors[dst.name] = TensorChannels(tc.group, tc.block)

    def _barrier(self, node: gs.Node, why: str) -> None:
        """Pin every channel tensor the node touches; outputs get pinned groups."""
        if any(self._info(t) is not None for t in node.inputs):  # shape arithmetic etc. is harmless
            self.unsupported.append((node.name, node.op, why))
        self.node_rule[node.name] = "barrier"
        for t in node.inputs:
            tc = self._info(t)
            if tc is not None:
                self._pin(tc.group, f"{node.op} node '{node.name}': {why}")
        for t in node.outputs:
            self._fresh(t, pinned=f"output of {node.op} node '{node.name}'")

    def run(self) -> "ChannelAnalysis":
        for t in self.graph.inputs:
            self._fresh(t, pinned=f"graph input '{t.name}'")
        for node in self.graph.nodes:
            self._visit(node)
        for t in self.graph.outputs:
            g = self.group_of(t.name)
            if g is not None:
                g.is_output = True
        return self

    def _visit(self, node: gs.Node) -> None:
        op = node.op
        if node.domain not in (None, "", "ai.onnx"):
            return self._barrier(node, f"custom domain {node.domain}")
        if op in UNARY_OPS:
            return self._unary(node)
        if op in PER_CHANNEL_NORM:
            return self._norm(node)
        if op in BINARY_OPS:
            return self._binary(node)
        if op in POOL_OPS:
            return self._unary(node, rule="pool")
        if op in REDUCE_OPS:
            return self._reduce(node)
        handler = {
            "Conv": self._conv,
            "ConvTranspose": self._convtranspose,
            "Gemm": self._gemm,
            "MatMul": self._matmul,
            "Flatten": self._flatten,
            "Pad": self._pad,
            "Slice": self._slice,
            "Concat": self._concat,
            "Squeeze": self._squeeze,
            "Unsqueeze": self._squeeze,
        }.get(op)
        if handler is None:
            return self._barrier(node, "op not understood by the channel analysis")
        return handler(node)

    # ---- rules
    def _unary(self, node: gs.Node, rule: str = "same") -> None:
        x = node.inputs[0]
        tc = self._info(x)
        if tc is None:
            for t in node.outputs:
                self._fresh(t, pinned=f"output of {node.op} '{node.name}' on a tensor without channels")
            self.node_rule[node.name] = "same"
            return
        if rule == "pool" and tc.block != 1:
            return self._barrier(node, "pooling a flattened tensor")
        self.node_rule[node.name] = "same"
        self._same(x, node.outputs[0])
        for extra in node.outputs[1:]:  # Dropout mask
            self._same(x, extra)

    def _norm(self, node: gs.Node) -> None:
        tc = self._info(node.inputs[0])
        params = [node.inputs[i] for i in PER_CHANNEL_NORM[node.op] if i < len(node.inputs)]
        if tc is None or tc.block != 1 or any(not isinstance(p, gs.Constant) for p in params):
            return self._barrier(node, "normalisation with non-constant parameters")
        self.node_rule[node.name] = "same"
        self._same(node.inputs[0], node.outputs[0])

    def _binary(self, node: gs.Node) -> None:
        y = node.outputs[0]
        out_rank = len(y.shape) if y.shape is not None else None
        groups: list[TensorChannels] = []
        for t in node.inputs:
            if isinstance(t, gs.Constant):
                if not self._const_broadcast_ok(np.asarray(t.values), out_rank, self._channels_of(y)):
                    return self._barrier(node, f"constant '{t.name}' broadcasts over the channel axis")
                continue
            tc = self._info(t)
            s = self._shape(t)
            if tc is None or s is None or len(s) != out_rank:
                return self._barrier(node, f"operand '{t.name}' has no channel axis aligned with the output")
            groups.append(tc)
        if not groups:
            self._fresh(y, pinned=f"constant-only {node.op} '{node.name}'")
            return
        if len({g.block for g in groups}) != 1:
            return self._barrier(node, "operands flattened differently")
        self._note_gate(node, groups)
        gid = groups[0].group
        for g in groups[1:]:
            gid = self._union(gid, g.group, f"{node.op} '{node.name}'")
        self.node_rule[node.name] = "same"
        self.tensors[y.name] = TensorChannels(gid, groups[0].block)

    def _note_gate(self, node: gs.Node, groups: list[TensorChannels]) -> None:
        """``Mul(x [N, C, H, W], g [N, C, 1, 1])``: squeeze-excitation. The Convs making ``g``
        scale x's channels; they do not make a second stream added to x (not a residual tie)."""
        if node.op != "Mul" or len(groups) != 2 or self.find(groups[0].group) == self.find(groups[1].group):
            return
        shapes = [self._shape(t) for t in node.inputs]
        if any(s is None or len(s) != 4 for s in shapes):
            return
        for gate, other in ((0, 1), (1, 0)):
            if tuple(shapes[gate][2:]) == (1, 1) and tuple(shapes[other][2:]) != (1, 1):
                root = self.find(groups[gate].group)
                for name, rule in self.node_rule.items():
                    if rule in ("conv", "gemm", "matmul"):
                        y = self.nodes[name].outputs[0].name
                        if y in self.tensors and self.find(self.tensors[y].group) == root:
                            self.gate_producers.add(name)

    @staticmethod
    def _const_broadcast_ok(v: np.ndarray, out_rank: int | None, channels: int | None) -> bool:
        """A constant operand is fine when it is scalar-like or per-channel along axis 1."""
        if v.size == 1:
            return True
        if out_rank is None or channels is None or v.ndim > out_rank:
            return False
        axis = 1 - (out_rank - v.ndim)
        if axis < 0:  # does not reach the channel axis: same constant for every channel
            return True
        return v.shape[axis] in (1, channels) and all(d == 1 for d in v.shape[:axis])

    def _reduce(self, node: gs.Node) -> None:
        x, y = node.inputs[0], node.outputs[0]
        tc = self._info(x)
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
            axes = [int(a) for a in np.asarray(node.inputs[1].values).ravel()]
        rank = len(x.shape) if x.shape is not None else None
        if tc is None or rank is None or not axes or tc.block != 1:
            return self._barrier(node, "reduction over unknown axes")
        axes = [a % rank for a in axes]
        if 0 in axes or 1 in axes:
            return self._barrier(node, "reduction over the batch or channel axis")
        self.node_rule[node.name] = "same"
        self._same(x, y)

    def _squeeze(self, node: gs.Node) -> None:
        x, y = node.inputs[0], node.outputs[0]
        tc = self._info(x)
        axes = node.attrs.get("axes")
        if axes is None and len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
            axes = [int(a) for a in np.asarray(node.inputs[1].values).ravel()]
        if tc is None or axes is None or x.shape is None or y.shape is None:
            return self._barrier(node, "squeeze axes unknown")
        rank = max(len(x.shape), len(y.shape))
        if any(a % rank in (0, 1) for a in axes) or tc.block != 1:
            return self._barrier(node, "squeezes the batch or channel axis")
        self.node_rule[node.name] = "same"
        self._same(x, y)

    def _flatten(self, node: gs.Node) -> None:
        x, y = node.inputs[0], node.outputs[0]
        tc = self._info(x)
        s = self._shape(x)
        axis = int(node.attrs.get("axis", 1))
        if tc is None or s is None or axis != 1 or not all(isinstance(d, (int, np.integer)) for d in s[2:]):
            return self._barrier(node, "flatten not at axis 1 of a known shape")
        self.node_rule[node.name] = "same"
        self.tensors[y.name] = TensorChannels(tc.group, tc.block * int(np.prod(s[2:], dtype=np.int64)))

    def _weight(self, node: gs.Node, i: int) -> np.ndarray | None:
        if i >= len(node.inputs) or not isinstance(node.inputs[i], gs.Constant):
            return None
        return np.asarray(node.inputs[i].values)

    def _conv(self, node: gs.Node) -> None:
        x, y = node.inputs[0], node.outputs[0]
        w = self._weight(node, 1)
        tc = self._info(x)
        if w is None or (len(node.inputs) > 2 and self._weight(node, 2) is None):
            return self._barrier(node, "weights are not constant")
        group = int(node.attrs.get("group", 1))
        cin = self._channels_of(x)
        if tc is None or tc.block != 1:
            return self._barrier(node, "input has no channel axis")
        if group == 1:
            self.node_rule[node.name] = "conv"
            self._fresh(y)
            return
        if group == cin == w.shape[0]:  # depthwise: channel c in -> channel c out
            self.node_rule[node.name] = "depthwise"
            self._same(x, y)
            return
        return self._barrier(node, f"grouped convolution (group={group}) that is not depthwise")

    def _convtranspose(self, node: gs.Node) -> None:
        w = self._weight(node, 1)
        tc = self._info(node.inputs[0])
        if w is None or (len(node.inputs) > 2 and self._weight(node, 2) is None):
            return self._barrier(node, "weights are not constant")
        if int(node.attrs.get("group", 1)) != 1 or tc is None or tc.block != 1:
            return self._barrier(node, "grouped ConvTranspose")
        self.node_rule[node.name] = "convtranspose"
        self._fresh(node.outputs[0])

    def _gemm(self, node: gs.Node) -> None:
        tc = self._info(node.inputs[0])
        if int(node.attrs.get("transA", 0)) != 0 or self._weight(node, 1) is None:
            return self._barrier(node, "Gemm with transA or a non-constant B")
        if len(node.inputs) > 2 and self._weight(node, 2) is None:
            return self._barrier(node, "Gemm with a non-constant C")
        if tc is None:
            return self._barrier(node, "input A has no channel axis")
        self.node_rule[node.name] = "gemm"
        self._fresh(node.outputs[0])

    def _matmul(self, node: gs.Node) -> None:
        x = node.inputs[0]
        w = self._weight(node, 1)
        tc = self._info(x)
        if w is None or w.ndim != 2 or tc is None or x.shape is None or len(x.shape) != 2:
            return self._barrier(node, "MatMul other than [N, F] x constant [F, M]")
        self.node_rule[node.name] = "matmul"
        self._fresh(node.outputs[0])

    def _pad(self, node: gs.Node) -> None:
        x, y = node.inputs[0], node.outputs[0]
        tc = self._info(x)
        s = self._shape(x)
        if tc is None or s is None:
            return self._barrier(node, "input has no channel axis")
        pads = pad_amounts(node, len(s))
        if pads is None:
            return self._barrier(node, "pads are not constant")
        p0, p1 = pads[1], pads[1 + len(s)]
        if p0 == 0 and p1 == 0:
            self.node_rule[node.name] = "same"
            return self._same(x, y)
        if node.attrs.get("mode", "constant") not in ("constant", b"constant") or tc.block != 1:
            return self._barrier(node, "non-constant padding of the channel axis")
        c = self._channels_of(x)
        out = self._fresh(y)
        index = np.arange(c + p0 + p1) - p0
        index[(index < 0) | (index >= c)] = -1
        self.derivations.append(Derivation(node.name, tc.group, out.group, index))
        self.node_rule[node.name] = "pad_channels"

    def _slice(self, node: gs.Node) -> None:
        x, y = node.inputs[0], node.outputs[0]
        tc = self._info(x)
        s = self._shape(x)
        if tc is None or s is None:
            return self._barrier(node, "input has no channel axis")
        spec = slice_spec(node, len(s))
        if spec is None:
            return self._barrier(node, "slice parameters are not constant")
        if 1 not in spec:
            self.node_rule[node.name] = "same"
            return self._same(x, y)
        if tc.block != 1:
            return self._barrier(node, "slicing flattened features")
        c = self._channels_of(x)
        start, end, step = spec[1]
        index = np.arange(c)[slice(start, end, step)] if step > 0 else _neg_slice(c, start, end, step)
        out = self._fresh(y)
        self.derivations.append(Derivation(node.name, tc.group, out.group, index))
        self.node_rule[node.name] = "slice_channels"

    def _concat(self, node: gs.Node) -> None:
        y = node.outputs[0]
        rank = len(y.shape) if y.shape is not None else None
        axis = int(node.attrs.get("axis", 0))
        if rank is None:
            return self._barrier(node, "unknown rank")
        axis %= rank
        infos = [self._info(t) for t in node.inputs]
        if axis != 1:
            if any(i is None for i in infos) or len({i.block for i in infos}) != 1:
                return self._barrier(node, "concat of tensors without channel axis")
            gid = infos[0].group
            for i in infos[1:]:
                gid = self._union(gid, i.group, f"Concat '{node.name}'")
            self.node_rule[node.name] = "same"
            self.tensors[y.name] = TensorChannels(gid, infos[0].block)
            return
        if any(i is not None and i.block != 1 for i in infos):
            return self._barrier(node, "concat of flattened features")
        out = self._fresh(y)
        if out is None:
            return self._barrier(node, "unknown output channels")
        offset = 0
        for t, i in zip(node.inputs, infos):
            c = self._channels_of(t)
            if c is None:
                self._pin(out.group, f"Concat '{node.name}' input '{t.name}' of unknown size")
                return
            if i is None:  # a constant or foreign input: its channels are pinned
                i = TensorChannels(self._new(c, pinned=f"constant input of Concat '{node.name}'"))
            index = np.full(out_size := self._groups[out.group].size, -1)
            index[offset:offset + c] = np.arange(c)
            self.derivations.append(Derivation(node.name, i.group, out.group, index))
            offset += c
        assert offset == out_size
        self.node_rule[node.name] = "concat_channels"


def _neg_slice(c: int, start: int, end: int, step: int) -> np.ndarray:
    return np.arange(c)[slice(start, end if end >= -c - 1 and end != -(2**63) else None, step)]


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
        axes = [int(a) % rank for a in np.asarray(node.inputs[3].values).ravel()]
        full = [0] * (2 * rank)
        for k, a in enumerate(axes):
            full[a], full[a + rank] = pads[k], pads[k + len(axes)]
        return full
    return pads if len(pads) == 2 * rank else None


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
    return {a % rank: (s, e, st) for a, s, e, st in zip(axes, starts, ends, steps)}


def analyze(model: onnx.ModelProto, canonical: bool = False) -> ChannelAnalysis:
    """Channel groups of ``model`` (canonicalised first unless ``canonical``)."""
    if not canonical:
        model = graphio.canonicalize(model)
    return ChannelAnalysis(model).run()
