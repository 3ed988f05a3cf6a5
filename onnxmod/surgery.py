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

from onnxmod import graphio, ops
from onnxmod.channels import ChannelAnalysis, Derivation


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
    """The graph being cut; each node is rewritten by its registry rule's ``shrink`` (:mod:`onnxmod.ops`)."""

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
    def name(self, base: str) -> str:
        return f"{base}__om{next(self._uid)}"

    def const(self, base: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(self.name(base), np.ascontiguousarray(values))

    def kept(self, tensor: str) -> np.ndarray | None:
        return self.a.tensor_keep(self.keep, tensor)

    def fill_for(self, tensor: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
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

    def fill_subset(self, tensor: str, kept: np.ndarray, removed: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """(A, c) for ``removed`` channels estimated from ``kept`` ones only (a grouped Conv's
        block): x_R ~= A x_K + c."""
        f = self.fill.get(tensor)
        if f is None:
            return None, np.zeros(removed.size)
        if isinstance(f, LinearFill):
            return f.coefficients(kept, removed)
        return None, np.asarray(f, dtype=np.float64)[removed]

    def fold(self, node: gs.Node, wc: np.ndarray, out_axis: int, b: np.ndarray | None):
        """Fold removed input channels of channel-major weights ``wc`` [C, ...] into the kept ones
        and the bias; returns (wc restricted to kept inputs and outputs, bias or None)."""
        x, y = node.inputs[0].name, node.outputs[0].name
        kept, removed, a, c = self.fill_for(x)
        out_k = self.kept(y)
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

    def unchanged(self, node: gs.Node, n_out: int) -> bool:
        x, y = node.inputs[0].name, node.outputs[0].name
        return bool(self.keep[self.a.find(self.a.tensors[x].group)].all()) and self.kept(y).size == n_out

    def set_bias(self, node: gs.Node, b: np.ndarray | None, index: int = 2) -> None:
        if b is None:
            return
        c = self.const(f"{node.name}_B", b)
        if len(node.inputs) > index and node.inputs[index].name:
            node.inputs[index] = c
        else:
            node.inputs.append(c)

    def gather_before(self, node: gs.Node, input_index: int, positions: np.ndarray) -> None:
        """Feed ``node`` a Gather of ``positions`` along axis 1 of its input."""
        x = node.inputs[input_index]
        out = gs.Variable(self.name(f"{x.name}_kept"), dtype=x.dtype)
        g = gs.Node("Gather", self.name(f"{node.name}_gather"), attrs={"axis": 1},
                    inputs=[x, self.const(f"{node.name}_idx", positions.astype(np.int64))], outputs=[out])
        self.graph.nodes.append(g)
        node.inputs[input_index] = out

    # ---------------------------------------------------------------- rules
    def run(self) -> gs.Graph:
        for node in list(self.graph.nodes):
            ops.rule(self.a.node_rule.get(node.name)).shrink(self, node)
        for t in self.graph.tensors().values():
            if isinstance(t, gs.Variable) and t not in self.graph.inputs:
                t.shape = None
        return self.graph

    def needed_positions(self, d: Derivation, tensor: str) -> np.ndarray | None:
        """Positions (within ``tensor``'s kept channels) that the derived group still needs,
        or None when it needs exactly what ``tensor`` keeps."""
        needed = d.index[self.keep[d.dst] & (d.index >= 0)]
        have = self.kept(tensor)
        if needed.size == have.size:
            return None
        return np.searchsorted(have, needed)


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
