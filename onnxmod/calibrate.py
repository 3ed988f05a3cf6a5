"""One streaming calibration pass: per-class, per-channel activation statistics.

The source graph is extended with in-graph reductions (``ReduceMean`` over H, W of
``x`` and ``x*x``) at every tensor whose channels a Conv/Gemm/MatMul sums over, so
a batch returns ``[N, C]`` summaries instead of feature maps and memory stays flat
whatever the model and the number of images.

Statistics are kept per class *relevance set*: the images a class-k module must get
right are those of class k and those where the source ranks k among its top two
(the only images where an error in logit k can change a decision).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxmod import graphio, runtime
from onnxmod.channels import ChannelAnalysis
from onnxmod.data import Dataset
from onnxmod.progress import progress


@dataclass
class ActivationStats:
    """Per consumed tensor: class-relevance-weighted channel mean and variance (over images and
    positions), the overall channel mean, and the source logits of every calibration image."""

    classes: int
    mean: dict[str, np.ndarray] = field(default_factory=dict)  # [K, C]
    var: dict[str, np.ndarray] = field(default_factory=dict)  # [K, C]
    mean_all: dict[str, np.ndarray] = field(default_factory=dict)  # [C]
    cov: dict[str, np.ndarray] = field(default_factory=dict)  # [C, C] over all images and positions
    count: np.ndarray | None = None  # [K] images in each relevance set
    logits: np.ndarray | None = None  # [N, K]
    labels: np.ndarray | None = None  # [N]
    seconds: float = 0.0


def stats_model(analysis: ChannelAnalysis, tensors: list[str]) -> tuple[onnx.ModelProto, list[str]]:
    """The analysed model plus, per tensor ``t``: ``t__m`` channel means and ``t__q`` channel
    means of squares ``[N, C]`` (over positions), and ``t__c`` the channel co-moment matrix
    summed over the batch and positions ``[C, C]`` (only for maps/flattened maps)."""
    model = onnx.ModelProto()
    model.CopyFrom(analysis.model)
    g = model.graph
    opset = graphio.opset_version(model)
    shapes = analysis.graph.tensors()

    def node(op: str, inputs: list[str], out: str, **attrs) -> str:
        g.node.append(helper.make_node(op, inputs, [out], name=f"__om_stats_{out}", **attrs))
        return out

    def const(name: str, values: list[int]) -> str:
        g.initializer.append(helper.make_tensor(name, TensorProto.INT64, [len(values)], values))
        return name

    def reduce(op: str, x: str, out: str, axis: int) -> str:
        if opset >= (18 if op == "ReduceMean" else 13):
            return node(op, [x, const(f"{out}__axes", [axis])], out, keepdims=0)
        return node(op, [x], out, axes=[axis], keepdims=0)

    outs = []
    for t in tensors:
        c = analysis._groups[analysis.find(analysis.tensors[t].group)].size
        spatial = len(shapes[t].shape) > 2 or analysis.tensors[t].block > 1
        if spatial:  # [N, C, P]: positions (H*W, or the block of a flattened map) last
            flat = node("Reshape", [t, const(f"{t}__shape", [0, c, -1])], f"{t}__flat")
            sq = node("Mul", [flat, flat], f"{t}__sq")
            reduce("ReduceMean", flat, f"{t}__m", 2)
            reduce("ReduceMean", sq, f"{t}__q", 2)
            xxt = node("MatMul", [flat, node("Transpose", [flat], f"{t}__T", perm=[0, 2, 1])], f"{t}__xxT")
            reduce("ReduceSum", xxt, f"{t}__c", 0)
            names = [f"{t}__m", f"{t}__q", f"{t}__c"]
        else:  # already [N, C]
            node("Identity", [t], f"{t}__m")
            node("Mul", [t, t], f"{t}__q")
            names = [f"{t}__m", f"{t}__q"]
        for n in names:
            g.output.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, None))
        outs += names
    return model, outs


def relevance(logits: np.ndarray, labels: np.ndarray, top: int = 2) -> np.ndarray:
    """[N, K] 0/1: image i is relevant to class k when k is its label or in its top-``top`` logits."""
    n, k = logits.shape
    r = np.zeros((n, k), dtype=np.float64)
    top_idx = np.argsort(-logits, axis=1)[:, : min(top, k)]
    np.put_along_axis(r, top_idx, 1.0, axis=1)
    r[np.arange(n), labels] = 1.0
    return r


def collect_stats(
    analysis: ChannelAnalysis,
    dataset: Dataset,
    label_map: np.ndarray,
    indices: np.ndarray,
    input_size: tuple[int, int],
    device: str = "auto",
    batch_size: int = 256,
    quiet: bool = False,
) -> ActivationStats:
    """Run ``indices`` of ``dataset`` through the source once and summarise activations.

    ``label_map``: data label -> source class index (or -1 for classes the model lacks).
    """
    groups = [g for g in analysis.groups if g.removable and not g.is_output]
    tensors = sorted({t for g in groups for _, t in g.consumers})
    model, outs = stats_model(analysis, tensors)
    logits_name = analysis.model.graph.output[0].name
    sess = runtime.make_session(model, device=device, name="calibration graph")
    shapes = analysis.graph.tensors()
    positions = {t: int(np.prod(shapes[t].shape[1:])) // analysis._groups[analysis.find(analysis.tensors[t].group)].size
                 for t in tensors}
    k = analysis.output_group().size
    sums: dict[str, list[np.ndarray]] = {}
    all_logits, all_labels = [], []
    count = np.zeros(k)
    t0 = time.perf_counter()
    n_batches = dataset.num_batches(batch_size, indices=indices)
    batches = dataset.iter_batches(batch_size, size=input_size, indices=indices)
    for x, y in progress(batches, total=n_batches, desc="calibrating", quiet=quiet, unit="batch"):
        res = runtime.run(sess, x, [logits_name] + outs)
        logits, vals = res[0], dict(zip(outs, res[1:]))
        y = label_map[y]
        r = relevance(logits, y)
        count += r.sum(axis=0)
        for t in tensors:
            m, q = vals[f"{t}__m"].astype(np.float64), vals[f"{t}__q"].astype(np.float64)
            c = m.shape[1]
            acc = sums.setdefault(t, [np.zeros((k, c)), np.zeros((k, c)), np.zeros(c), np.zeros((c, c)), 0])
            acc[0] += r.T @ m
            acc[1] += r.T @ q
            acc[2] += m.sum(axis=0)
            if f"{t}__c" in vals:
                acc[3] += vals[f"{t}__c"].astype(np.float64)
                acc[4] += positions[t] * len(x)
            else:  # already [N, C]: one position per image
                acc[3] += m.T @ m
                acc[4] += len(x)
        all_logits.append(logits)
        all_labels.append(y)
    stats = ActivationStats(classes=k)
    n = sum(len(l) for l in all_labels)
    safe = np.maximum(count, 1)[:, None]
    for t, (a1, a2, a_all, xx, npos) in sums.items():
        mean = a1 / safe
        stats.mean[t] = mean
        stats.var[t] = np.maximum(a2 / safe - mean**2, 0.0)
        stats.mean_all[t] = mu = a_all / max(n, 1)
        stats.cov[t] = xx / max(npos, 1) - np.outer(mu, mu)
    stats.count = count
    stats.logits = np.concatenate(all_logits) if all_logits else np.zeros((0, k))
    stats.labels = np.concatenate(all_labels) if all_labels else np.zeros(0, dtype=np.int64)
    stats.seconds = time.perf_counter() - t0
    return stats
