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
from dataclasses import dataclass
from typing import Union

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxmod import graphio
from onnxmod.channels import ChannelAnalysis, Derivation, pad_amounts, slice_spec


@dataclass
class LinearFill:
    """Replace removed channels by their least-squares estimate from the kept ones
    (x_R ~= A x_K + c, fitted on calibration statistics), folded into the consumer's weights.

    ``mean``: [C] channel means; ``cov``: [C, C] channel covariance (per position);
    ``ridge``: relative regularisation of the kept channels' covariance.
    """

    mean: np.ndarray
    cov: np.ndarray
    ridge: float = 1e-3

    def coefficients(self, kept: np.ndarray, removed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mu = np.asarray(self.mean, dtype=np.float64)
        if removed.size == 0 or kept.size == 0:
            return np.zeros((removed.size, kept.size)), mu[removed]
        s_kk = self.cov[np.ix_(kept, kept)]
        s_rk = self.cov[np.ix_(removed, kept)]
        lam = self.ridge * (np.trace(s_kk) / kept.size + 1e-12)
        a = np.linalg.solve(s_kk + lam * np.eye(kept.size), s_rk.T).T
        return a, mu[removed] - a @ mu[kept]


Fill = Union[np.ndarray, LinearFill]


class _Surgeon:
    def __init__(self, analysis: ChannelAnalysis, keep: dict[int, np.ndarray], fill: dict[str, "Fill"]):
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

    def _fill_for(self, tensor: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
        """(kept channels, removed channels, A [R, K] or None, c [R]): x_R ~= A x_K + c."""
        tc = self.a.tensors[tensor]
        mask = self.keep[self.a.find(tc.group)]
        kept, removed = np.nonzero(mask)[0], np.nonzero(~mask)[0]
        f = self.fill.get(tensor)
        if f is None:
            return kept, removed, None, np.zeros(removed.size)
        if isinstance(f, LinearFill):
            a, c = f.coefficients(kept, removed)
            return kept, removed, a, c
        return kept, removed, None, np.asarray(f, dtype=np.float64)[removed]

    def _fold(self, node: gs.Node, wc: np.ndarray, out_axis: int, b: np.ndarray | None):
        """Fold removed input channels of channel-major weights ``wc`` [C, ...] into the kept ones
        and the bias; returns (wc restricted to kept inputs and outputs, bias or None)."""
        x, y = node.inputs[0].name, node.outputs[0].name
        kept, removed, a, c = self._fill_for(x)
        out_k = self._kept(y)
        block = self.a.tensors[x].block
        if block > 1:  # features of a flattened map: [C*B, ...] -> [C, B, ...]
            wc = wc.reshape(wc.shape[0] // block, block, *wc.shape[1:])
            out_axis += 1
        w64 = wc.astype(np.float64)
        new = w64[kept]
        if a is not None and removed.size:
            new = new + np.tensordot(a.T, w64[removed], axes=1)  # W_K += A^T W_R
        if removed.size and np.any(c != 0):
            other = tuple(i for i in range(1, wc.ndim) if i != out_axis)
            extra = np.tensordot(c, w64[removed].sum(axis=other), axes=1)
            b = extra if b is None else b.astype(np.float64) + extra
        new = np.take(new, out_k, axis=out_axis).astype(wc.dtype)
        if block > 1:
            new = new.reshape(new.shape[0] * block, *new.shape[2:])
        if b is not None:
            b = np.asarray(b)[out_k].astype(wc.dtype)
        return new, b

    def _unchanged(self, node: gs.Node, n_out: int) -> bool:
        x, y = node.inputs[0].name, node.outputs[0].name
        return bool(self.keep[self.a.find(self.a.tensors[x].group)].all()) and self._kept(y).size == n_out

    def _set_bias(self, node: gs.Node, b: np.ndarray | None, index: int = 2) -> None:
        if b is None:
            return
        c = self._const(f"{node.name}_B", b)
        if len(node.inputs) > index and node.inputs[index].name:
            node.inputs[index] = c
        else:
            node.inputs.append(c)

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
        w = np.asarray(node.inputs[1].values)  # [M, C, k...]
        if self._unchanged(node, w.shape[0]):
            return
        b = np.asarray(node.inputs[2].values) if len(node.inputs) > 2 else None
        wc, b = self._fold(node, np.moveaxis(w, 1, 0), 1, b)
        node.inputs[1] = self._const(node.inputs[1].name, np.moveaxis(wc, 0, 1))
        self._set_bias(node, b)

    def _convtranspose(self, node: gs.Node) -> None:
        w = np.asarray(node.inputs[1].values)  # [C, M, k...]
        if self._unchanged(node, w.shape[1]):
            return
        b = np.asarray(node.inputs[2].values) if len(node.inputs) > 2 else None
        wc, b = self._fold(node, w, 1, b)
        node.inputs[1] = self._const(node.inputs[1].name, wc)
        self._set_bias(node, b)

    def _gemm(self, node: gs.Node) -> None:
        bt = np.asarray(node.inputs[1].values)
        trans_b = int(node.attrs.get("transB", 0))
        bmat = bt.T if trans_b else bt  # [F, M]
        if self._unchanged(node, bmat.shape[1]):
            return
        alpha = float(node.attrs.get("alpha", 1.0))
        beta = float(node.attrs.get("beta", 1.0))
        m = bmat.shape[1]
        c = np.zeros(m, dtype=np.float64)
        if len(node.inputs) > 2 and node.inputs[2].name:
            c = c + beta * np.broadcast_to(np.asarray(node.inputs[2].values, dtype=np.float64).reshape(-1), (m,))
        # fold with alpha applied to the weights, then undo it: keeps C = beta*C + alpha*extra exact
        new_b, c = self._fold(node, bmat * alpha if alpha != 1.0 else bmat, 1, c)
        if alpha != 1.0:
            new_b = (new_b / alpha).astype(bt.dtype)
        node.inputs[1] = self._const(node.inputs[1].name, np.ascontiguousarray(new_b.T if trans_b else new_b))
        node.attrs["beta"] = 1.0
        self._set_bias(node, c)

    def _matmul(self, node: gs.Node) -> None:
        w = np.asarray(node.inputs[1].values)  # [F, M]
        if self._unchanged(node, w.shape[1]):
            return
        new_w, extra = self._fold(node, w, 1, np.zeros(w.shape[1]))
        node.inputs[1] = self._const(node.inputs[1].name, new_w)
        if np.any(extra != 0):
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
    fill: dict[str, Fill] | None = None,
) -> onnx.ModelProto:
    """A smaller copy of ``analysis.model`` keeping only the channels in ``keep``.

    Args:
        analysis: channel analysis of the model to cut (its ``model`` is canonical).
        keep: boolean mask per root group id (as from ``analysis.full_keep()``);
            closed over the dependencies first, pinned groups keep everything.
            The graph output's group selects output rows (e.g. one class).
        fill: per consumed tensor name, what a removed channel is replaced with in
            the Conv/Gemm/MatMul summing it: a constant per original channel (folded
            into the bias) or a :class:`LinearFill` (folded into weights and bias);
            missing tensors use 0.
    Returns:
        A valid model with the same inputs/outputs, IR version and opsets.
    """
    keep = analysis.close({k: v.copy() for k, v in keep.items()})
    graph = _Surgeon(analysis, keep, fill or {}).run()
    return graphio.from_gs(graph, analysis.model)
