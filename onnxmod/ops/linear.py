"""Fully connected layers: Gemm and MatMul ``[N, F] x constant [F, M]`` (the classifier and
multi-Linear heads). Features are channels, or blocks of a flattened map's channels."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from onnxmod.ops.base import Family, Rule

if TYPE_CHECKING:  # pragma: no cover
    from onnxmod.channels import ChannelAnalysis


class _Linear(Rule):
    reduces = True

    def _matrix(self, node: gs.Node) -> np.ndarray:  # pragma: no cover - per subclass
        raise NotImplementedError

    def abs_weights(self, a, node: gs.Node) -> np.ndarray:
        m = np.abs(self._matrix(node)).T  # [out, in features]
        block = a.tensors[node.inputs[0].name].block
        if block > 1:  # a flattened map: sum each channel's block of features
            m = m.reshape(m.shape[0], -1, block).sum(axis=2)
        return m

    def mac_term(self, a, node: gs.Node):
        x, y = node.inputs[0].name, node.outputs[0].name
        return a.find(a.tensors[x].group), a.find(a.tensors[y].group), float(a.tensors[x].block)

    def back(self, sel, node: gs.Node, so: np.ndarray, add) -> None:
        add(node.inputs[0], sel.weights[node.name].T @ so)


class GemmRule(_Linear):
    name = "gemm"

    def _matrix(self, node: gs.Node) -> np.ndarray:
        w = np.asarray(node.inputs[1].values, dtype=np.float64)
        return w.T if int(node.attrs.get("transB", 0)) else w  # [F, M]

    def shrink(self, s, node: gs.Node) -> None:
        bt = np.asarray(node.inputs[1].values)
        trans_b = int(node.attrs.get("transB", 0))
        bmat = bt.T if trans_b else bt  # [F, M]
        if s.unchanged(node, bmat.shape[1]):
            return
        alpha = float(node.attrs.get("alpha", 1.0))
        beta = float(node.attrs.get("beta", 1.0))
        m = bmat.shape[1]
        c = np.zeros(m, dtype=np.float64)
        if len(node.inputs) > 2 and node.inputs[2].name:
            c = c + beta * np.broadcast_to(np.asarray(node.inputs[2].values, dtype=np.float64).reshape(-1), (m,))
        # fold with alpha applied to the weights, then undo it: keeps C = beta*C + alpha*extra exact
        new_b, c = s.fold(node, bmat * alpha if alpha != 1.0 else bmat, 1, c)
        if alpha != 1.0:
            new_b = (new_b / alpha).astype(bt.dtype)
        node.inputs[1] = s.const(node.inputs[1].name, np.ascontiguousarray(new_b.T if trans_b else new_b))
        node.attrs["beta"] = 1.0
        s.set_bias(node, c)


class MatMulRule(_Linear):
    name = "matmul"

    def _matrix(self, node: gs.Node) -> np.ndarray:
        return np.asarray(node.inputs[1].values, dtype=np.float64)  # [F, M]

    def shrink(self, s, node: gs.Node) -> None:
        w = np.asarray(node.inputs[1].values)  # [F, M]
        if s.unchanged(node, w.shape[1]):
            return
        new_w, extra = s.fold(node, w, 1, np.zeros(w.shape[1]))
        node.inputs[1] = s.const(node.inputs[1].name, new_w)
        if np.any(extra != 0):
            out = node.outputs[0]
            mid = gs.Variable(s.name(f"{out.name}_nobias"), dtype=out.dtype)
            node.outputs[0] = mid
            s.graph.nodes.append(gs.Node("Add", s.name(f"{node.name}_fill"),
                                         inputs=[mid, s.const(f"{node.name}_fill", extra)], outputs=[out]))


GEMM, MATMUL = GemmRule(), MatMulRule()


def gemm(a: "ChannelAnalysis", node: gs.Node) -> None:
    tc = a.info(node.inputs[0])
    if int(node.attrs.get("transA", 0)) != 0 or a.weight(node, 1) is None:
        return a.barrier(node, "Gemm with transA or a non-constant B")
    if len(node.inputs) > 2 and a.weight(node, 2) is None:
        return a.barrier(node, "Gemm with a non-constant C")
    if tc is None:
        return a.barrier(node, "input A has no channel axis")
    a.tag(node, GEMM)
    a.fresh(node.outputs[0])


def matmul(a: "ChannelAnalysis", node: gs.Node) -> None:
    x = node.inputs[0]
    w = a.weight(node, 1)
    tc = a.info(x)
    if w is None or w.ndim != 2 or tc is None or x.shape is None or len(x.shape) != 2:
        return a.barrier(node, "MatMul other than [N, F] x constant [F, M]")
    a.tag(node, MATMUL)
    a.fresh(node.outputs[0])


GEMM_FAMILY = Family(
    "gemm", ("Gemm",), gemm,
    channels="input features summed by B's rows, output columns make a new group (the class rows at the end)",
    shrink="B rows/columns and C sliced, removed inputs folded into C",
    macs="F x M",
    sensitivity="|B|^T s (flattened blocks summed per channel)",
    fit="the class row: least-squares re-fit (--refit-images)",
    pins="transA; non-constant B or C",
    counts_macs=True,
)
MATMUL_FAMILY = Family(
    "matmul", ("MatMul",), matmul,
    channels="as Gemm, for [N, F] x constant [F, M] (the bias is a following Add)",
    shrink="W rows/columns sliced, removed inputs folded into an added bias",
    macs="F x M",
    sensitivity="|W|^T s",
    fit="no",
    pins="anything but [N, F] x constant [F, M]",
    counts_macs=True,
)
FAMILIES = (GEMM_FAMILY, MATMUL_FAMILY)
RULES = (GEMM, MATMUL)
