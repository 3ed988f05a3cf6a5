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

What each op does to channels is declared by its family in the op registry
(:mod:`onnxmod.ops`); this module holds the bookkeeping the families use.
This is the one model of channel dependencies; decomposition, composition, the
surgery in :mod:`onnxmod.surgery` and the tests all go through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxmod import graphio, ops


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
        self.equal_blocks: list[tuple[int, int]] = []  # (group, blocks): each block keeps as many channels

    # ---------------------------------------------------------------- union-find
    def new_group(self, size: int, pinned: str | None = None) -> int:
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

    def union(self, a: int, b: int, where: str) -> int:
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

    def pin(self, gid: int, why: str) -> None:
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
            if ops.rule(rule).reduces:
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
        how many pinned (never removed, directly or through an index map from a pinned group)
        and how many tied (several producers that are not gates: a residual stream)."""
        made = [g for g in self.groups if g.producers and not g.is_output]
        total = sum(g.size for g in made)
        # pinned: what stays when everything removable goes (pins reach producers through index maps)
        least = self.close({g.id: np.zeros(g.size, dtype=bool) for g in self.groups}, minimum=False)
        pinned = sum(int(least[g.id].sum()) for g in made)
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
    def _roots(self) -> list[ChannelGroup]:
        """The root groups as they are (id, size, pins), without collecting tensors and nodes as ``groups`` does:
        ``close`` runs thousands of times while a budget is searched."""
        return [self._groups[r] for r in sorted({self.find(g.id) for g in self._groups})]

    def full_keep(self) -> dict[int, np.ndarray]:
        """A keep-mask per root group, all True."""
        return {g.id: np.ones(g.size, dtype=bool) for g in self._roots()}

    def close(self, keep: dict[int, np.ndarray], minimum: bool = True) -> dict[int, np.ndarray]:
        """Enforce the dependencies on ``keep`` (in place, returned).

        Pinned groups keep everything; a group keeps at least one channel (ONNX
        has no empty Conv; ``minimum=False`` drops that rule, to see what pins force); a kept channel derived from another group's channel
        keeps that one too. Iterates to a fixpoint.
        """
        for g in self._roots():
            if g.pinned:
                keep[g.id][:] = True
            elif minimum and not keep[g.id].any():
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
            for gid, blocks in self.equal_blocks:  # grouped Conv: every conv group keeps as many
                per = keep[self.find(gid)].reshape(blocks, -1)  # a view: writes go to keep
                counts = per.sum(axis=1)
                for b in np.nonzero(counts < counts.max())[0]:  # add the first channels not kept
                    per[b, np.nonzero(~per[b])[0][:counts.max() - counts[b]]] = True
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

    # ---------------------------------------------------------------- for the op families (onnxmod.ops)
    def shape(self, t: gs.Tensor) -> tuple | None:
        return None if t.shape is None else tuple(t.shape)

    def channels_of(self, t: gs.Tensor) -> int | None:
        s = self.shape(t)
        if s is None or len(s) < 2 or not isinstance(s[1], (int, np.integer)):
            return None
        return int(s[1])

    def info(self, t: gs.Tensor) -> TensorChannels | None:
        return self.tensors.get(t.name)

    def weight(self, node: gs.Node, i: int) -> np.ndarray | None:
        """Input ``i`` of ``node`` when it is a constant, else None."""
        if i >= len(node.inputs) or not isinstance(node.inputs[i], gs.Constant):
            return None
        return np.asarray(node.inputs[i].values)

    def group_size(self, gid: int) -> int:
        return self._groups[self.find(gid)].size

    def fresh(self, t: gs.Tensor, pinned: str | None = None, block: int = 1) -> TensorChannels | None:
        """Give ``t`` a new group of its own channels (None when its channel count is unknown)."""
        c = self.channels_of(t)
        if c is None or c % block:
            return None
        tc = TensorChannels(self.new_group(c // block, pinned), block)
        self.tensors[t.name] = tc
        return tc

    def same(self, src: gs.Tensor, dst: gs.Tensor) -> None:
        """``dst`` has ``src``'s channels, indexed the same way."""
        tc = self.info(src)
        if tc is not None:
            self.tensors[dst.name] = TensorChannels(tc.group, tc.block)

    def assign(self, t: gs.Tensor, group: int, block: int = 1) -> None:
        self.tensors[t.name] = TensorChannels(group, block)

    def derive(self, node: gs.Node, src: int, dst: int, index: np.ndarray) -> None:
        """Channel j of group ``dst`` is channel ``index[j]`` of group ``src`` (-1: a constant)."""
        self.derivations.append(Derivation(node.name, src, dst, index))

    def index_map(self, node: gs.Node, x: gs.Tensor, y: gs.Tensor, index: np.ndarray, rule: "ops.Rule") -> None:
        """``y`` gets a new group whose channel j is channel ``index[j]`` of ``x`` (-1: a constant); ``node``
        is tagged with ``rule``."""
        out = self.fresh(y)
        self.derive(node, self.info(x).group, out.group, index)
        self.tag(node, rule)

    def tag(self, node: gs.Node, rule: "ops.Rule") -> None:
        self.node_rule[node.name] = rule.name

    def mark_gate(self, gid: int) -> None:
        """The Conv/Gemm/MatMul nodes producing group ``gid`` make a squeeze-excitation gate."""
        root = self.find(gid)
        for name, rule in self.node_rule.items():
            if ops.rule(rule).reduces:
                y = self.nodes[name].outputs[0].name
                if y in self.tensors and self.find(self.tensors[y].group) == root:
                    self.gate_producers.add(name)

    def barrier(self, node: gs.Node, why: str) -> None:
        """Pin every channel tensor the node touches; outputs get pinned groups."""
        if any(self.info(t) is not None for t in node.inputs):  # shape arithmetic etc. is harmless
            self.unsupported.append((node.name, node.op, why))
        self.tag(node, ops.BARRIER)
        for t in node.inputs:
            tc = self.info(t)
            if tc is not None:
                self.pin(tc.group, f"{node.op} node '{node.name}': {why}")
        for t in node.outputs:
            self.fresh(t, pinned=f"output of {node.op} node '{node.name}'")

    # ---------------------------------------------------------------- analysis
    def run(self) -> "ChannelAnalysis":
        for t in self.graph.inputs:
            self.fresh(t, pinned=f"graph input '{t.name}'")
        for node in self.graph.nodes:
            ops.family_for(node.op, node.domain).analyze(self, node)
        for t in self.graph.outputs:
            g = self.group_of(t.name)
            if g is not None:
                g.is_output = True
        return self


def analyze(model: onnx.ModelProto, canonical: bool = False) -> ChannelAnalysis:
    """Channel groups of ``model`` (canonicalised first unless ``canonical``)."""
    if not canonical:
        model = graphio.canonicalize(model)
    return ChannelAnalysis(model).run()
