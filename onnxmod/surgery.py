"""Exact channel removal on ONNX graphs, driven by a :class:`ChannelAnalysis`.

``remove_channels(analysis, keep, fill)`` returns a physically smaller model:
weights, BatchNorm parameters, per-channel constants, pads and Gemm/MatMul
rows/columns are sliced. A removed channel that a Conv/Gemm/MatMul sums over is
replaced by a constant (``fill``, default 0) folded into that consumer's bias, so
removing channels that are exactly zero (or constant, away from conv borders)
leaves the outputs unchanged. Ops that move channels (Pad/Slice/Concat on the
channel axis) get their parameters rewritten, with a ``Gather`` inserted where a
tensor keeps more channels than its consumer needs.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxmod import graphio
from onnxmod.channels import ChannelAnalysis, Derivation, pad_amounts, slice_spec


class _Surgeon:
    def __init__(self, analysis: ChannelAnalysis, keep: dict[int, np.ndarray], fill: dict[str, np.ndarray]):
        self.a = analysis
        self.keep = keep
        self.fill = fill
        self.graph = graphio.to_gs(analysis.model)
        self._uid = itertools.count()
        self.derivs: dict[str, list[Derivation]] = {}
        for d in analysis.derivations_resolved():
            self.derivs.setdefault(d.node, []).append(d)

    # ---------------------------------------------------------------- helpers
    def _name(self, base: str) -> str:
        return f"{base}__om{next(self._uid)}"

    def _const(self, base: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(self._name(base), np.ascontiguousarray(values))

    def _kept(self, tensor: str) -> np.ndarray | None:
        return self.a.tensor_keep(self.keep, tensor)

    def _removed_fill(self, tensor: str) -> tuple[np.ndarray, np.ndarray]:
        """(removed element indices along axis 1, their fill values), channel blocks expanded."""
        tc = self.a.tensors[tensor]
        mask = self.keep[self.a.find(tc.group)]
        values = self.fill.get(tensor)
        values = np.zeros(mask.size) if values is None else np.asarray(values, dtype=np.float64)
        removed = np.nonzero(~mask)[0]
        if tc.block == 1:
            return removed, values[removed]
        idx = (removed[:, None] * tc.block + np.arange(tc.block)[None, :]).ravel()
        return idx, np.repeat(values[removed], tc.block)

    def _gather_before(self, node: gs.Node, input_index: int, positions: np.ndarray) -> None:
        """Feed ``node`` a Gather of ``positions`` along axis 1 of its input."""
        x = node.inputs[input_index]
        out = gs.Variable(self._name(f"{x.name}_kept"), dtype=x.dtype)
        g = gs.Node("Gather", self._name(f"{node.name}_gather"), attrs={"axis": 1},
                    inputs=[x, self._const(f"{node.name}_idx", positions.astype(np.int64))], outputs=[out])
        self.graph.nodes.append(g)
        node.inputs[input_index] = out

    # ---------------------------------------------------------------- rules
    def run(self) -> gs.Graph:
        for node in list(self.graph.nodes):
            rule = self.a.node_rule.get(node.name)
            if rule is None or rule == "barrier":
                continue
            getattr(self, f"_{rule}")(node)
        for t in self.graph.tensors().values():
            if isinstance(t, gs.Variable) and t not in self.graph.inputs:
                t.shape = None
        return self.graph

    def _same(self, node: gs.Node) -> None:
        y = node.outputs[0]
        kept = self._kept(y.name)
        if kept is None or y.shape is None:
            return
        out_rank = len(y.shape)
        n = self.a.tensors[y.name]
        full = self.keep[self.a.find(n.group)].size * n.block
        if kept.size == full:
            return
        for i, t in enumerate(node.inputs):
            if not isinstance(t, gs.Constant):
                continue
            v = np.asarray(t.values)
            if node.op in ("BatchNormalization", "InstanceNormalization") and i > 0:
                node.inputs[i] = self._const(t.name, v[kept])
                continue
            if node.op == "Clip" or v.size == 1:
                continue
            axis = 1 - (out_rank - v.ndim)
            if axis >= 0 and v.shape[axis] == full:
                node.inputs[i] = self._const(t.name, np.take(v, kept, axis=axis))

    def _depthwise(self, node: gs.Node) -> None:
        kept = self._kept(node.outputs[0].name)
        w = np.asarray(node.inputs[1].values)
        if kept.size == w.shape[0]:
            return
        node.inputs[1] = self._const(node.inputs[1].name, w[kept])
        if len(node.inputs) > 2:
            node.inputs[2] = self._const(node.inputs[2].name, np.asarray(node.inputs[2].values)[kept])
        node.attrs["group"] = int(kept.size)

    def _conv(self, node: gs.Node) -> None:
        x, y = node.inputs[0].name, node.outputs[0].name
        w = np.asarray(node.inputs[1].values)
        b = np.asarray(node.inputs[2].values) if len(node.inputs) > 2 else None
        in_k, out_k = self._kept(x), self._kept(y)
        removed, values = self._removed_fill(x)
        if removed.size == 0 and out_k.size == w.shape[0]:
            return
        if np.any(values != 0):
            # a removed input channel with constant value v adds v * sum(kernel) to each output
            extra = (w[:, removed].sum(axis=tuple(range(2, w.ndim))) @ values).astype(w.dtype)
            b = extra if b is None else (b.astype(np.float64) + extra).astype(w.dtype)
        node.inputs[1] = self._const(node.inputs[1].name, w[out_k][:, in_k])
        if b is not None:
            c = self._const(f"{node.name}_B", b[out_k])
            if len(node.inputs) > 2:
                node.inputs[2] = c
            else:
                node.inputs.append(c)

    def _convtranspose(self, node: gs.Node) -> None:
        x, y = node.inputs[0].name, node.outputs[0].name
        w = np.asarray(node.inputs[1].values)  # [Cin, M, k...]
        b = np.asarray(node.inputs[2].values) if len(node.inputs) > 2 else None
        in_k, out_k = self._kept(x), self._kept(y)
        removed, values = self._removed_fill(x)
        if removed.size == 0 and out_k.size == w.shape[1]:
            return
        if np.any(values != 0):
            extra = (values @ w[removed].sum(axis=tuple(range(2, w.ndim)))).astype(w.dtype)
            b = extra if b is None else (b.astype(np.float64) + extra).astype(w.dtype)
        node.inputs[1] = self._const(node.inputs[1].name, w[in_k][:, out_k])
        if b is not None:
            c = self._const(f"{node.name}_B", b[out_k])
            if len(node.inputs) > 2:
                node.inputs[2] = c
            else:
                node.inputs.append(c)

    def _gemm(self, node: gs.Node) -> None:
        a, y = node.inputs[0].name, node.outputs[0].name
        bt = np.asarray(node.inputs[1].values)
        trans_b = int(node.attrs.get("transB", 0))
        bmat = bt.T if trans_b else bt  # [K, M]
        in_k, out_k = self._kept(a), self._kept(y)
        removed, values = self._removed_fill(a)
        if removed.size == 0 and out_k.size == bmat.shape[1]:
            return
        alpha = float(node.attrs.get("alpha", 1.0))
        beta = float(node.attrs.get("beta", 1.0))
        m = bmat.shape[1]
        c = np.zeros(m, dtype=np.float64)
        has_c = len(node.inputs) > 2 and node.inputs[2].name
        if has_c:
            c = c + beta * np.broadcast_to(np.asarray(node.inputs[2].values, dtype=np.float64).reshape(-1), (m,))
        if np.any(values != 0):
            c = c + alpha * (values @ bmat[removed].astype(np.float64))
        new_b = bmat[in_k][:, out_k]
        node.inputs[1] = self._const(node.inputs[1].name, new_b.T if trans_b else new_b)
        if has_c or np.any(c != 0):
            cc = self._const(f"{node.name}_C", c[out_k].astype(bt.dtype))
            if has_c:
                node.inputs[2] = cc
            else:
                node.inputs.append(cc)
            node.attrs["beta"] = 1.0

    def _matmul(self, node: gs.Node) -> None:
        x, y = node.inputs[0].name, node.outputs[0].name
        w = np.asarray(node.inputs[1].values)  # [K, M]
        in_k, out_k = self._kept(x), self._kept(y)
        removed, values = self._removed_fill(x)
        if removed.size == 0 and out_k.size == w.shape[1]:
            return
        node.inputs[1] = self._const(node.inputs[1].name, w[in_k][:, out_k])
        if np.any(values != 0):
            extra = (values @ w[removed].astype(np.float64))[out_k].astype(w.dtype)
            out = node.outputs[0]
            mid = gs.Variable(self._name(f"{out.name}_nobias"), dtype=out.dtype)
            node.outputs[0] = mid
            self.graph.nodes.append(gs.Node("Add", self._name(f"{node.name}_fill"),
                                            inputs=[mid, self._const(f"{node.name}_fill", extra)], outputs=[out]))

    def _needed_positions(self, d: Derivation, tensor: str) -> np.ndarray | None:
        """Positions (within ``tensor``'s kept channels) that the derived group still needs,
        or None when it needs exactly what ``tensor`` keeps."""
        needed = d.index[self.keep[d.dst] & (d.index >= 0)]
        have = self._kept(tensor)
        if needed.size == have.size:
            return None
        return np.searchsorted(have, needed)

    def _pad_channels(self, node: gs.Node) -> None:
        (d,) = self.derivs[node.name]
        x = node.inputs[0]
        rank = len(x.shape)
        pads = pad_amounts(node, rank)
        pos = self._needed_positions(d, x.name)
        kdst = self.keep[d.dst]
        const = d.index < 0
        first_src = int(np.argmax(~const)) if (~const).any() else kdst.size
        p0 = int((kdst & const)[:first_src].sum())
        p1 = int((kdst & const)[first_src:].sum())
        if pos is None and p0 == pads[1] and p1 == pads[1 + rank]:
            return
        if pos is not None:
            self._gather_before(node, 0, pos)
        pads[1], pads[1 + rank] = p0, p1
        if "pads" in node.attrs:
            node.attrs["pads"] = pads
        else:
            node.inputs[1] = self._const(f"{node.name}_pads", np.asarray(pads, dtype=np.int64))
            if len(node.inputs) > 3 and node.inputs[3].name:  # drop `axes`: pads now cover all axes
                node.inputs[3] = gs.Variable.empty()

    def _slice_channels(self, node: gs.Node) -> None:
        (d,) = self.derivs[node.name]
        x = node.inputs[0]
        rank = len(x.shape)
        needed = d.index[self.keep[d.dst]]
        pos = np.searchsorted(self._kept(x.name), needed)
        spec = slice_spec(node, rank)
        del spec[1]
        self._gather_before(node, 0, pos)
        if not spec:
            node.op = "Identity"
            node.inputs = node.inputs[:1]
            node.attrs = {}
            return
        axes = sorted(spec)
        cols = [np.asarray([spec[a][k] for a in axes], dtype=np.int64) for k in range(3)]
        node.inputs = [node.inputs[0], self._const(f"{node.name}_starts", cols[0]),
                       self._const(f"{node.name}_ends", cols[1]),
                       self._const(f"{node.name}_axes", np.asarray(axes, dtype=np.int64)),
                       self._const(f"{node.name}_steps", cols[2])]

    def _concat_channels(self, node: gs.Node) -> None:
        for i, d in enumerate(self.derivs[node.name]):
            t = node.inputs[i]
            if t.name in self.a.tensors:
                pos = self._needed_positions(d, t.name)
            else:  # constant input (pinned group, never shrunk itself)
                needed = d.index[self.keep[d.dst] & (d.index >= 0)]
                pos = None if needed.size == self.keep[d.src].size else needed
            if pos is not None:
                self._gather_before(node, i, pos)


def remove_channels(
    analysis: ChannelAnalysis,
    keep: dict[int, np.ndarray],
    fill: dict[str, np.ndarray] | None = None,
) -> onnx.ModelProto:
    """A smaller copy of ``analysis.model`` keeping only the channels in ``keep``.

    Args:
        analysis: channel analysis of the model to cut (its ``model`` is canonical).
        keep: boolean mask per root group id (as from ``analysis.full_keep()``);
            closed over the dependencies first, pinned groups keep everything.
            The graph output's group selects output rows (e.g. one class).
        fill: per consumed tensor name, the value (per original channel) that a
            removed channel is replaced with in the Conv/Gemm/MatMul summing it;
            missing tensors use 0.
    Returns:
        A valid model with the same inputs/outputs, IR version and opsets.
    """
    keep = analysis.close({k: v.copy() for k, v in keep.items()})
    graph = _Surgeon(analysis, keep, fill or {}).run()
    return graphio.from_gs(graph, analysis.model)
