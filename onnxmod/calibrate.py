"""One streaming calibration pass: per-class, per-channel activation statistics.

The source graph is extended with in-graph reductions (``GlobalAveragePool``;
second moments on a subset) at every tensor a Conv/Gemm/MatMul sums over, so a batch returns ``[N, C]`` summaries instead of feature maps and memory stays flat
whatever the model and the number of images.

Statistics are kept per class *relevance set*: the images a class-k module must get
right are those of class k and those where the source ranks k among its top two
(the only images where an error in logit k can change a decision).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

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
    positions), the overall channel mean and covariance, and the source logits."""

    classes: list[int]  # the source classes with per-class rows (row i: class classes[i])
    mean: dict[str, np.ndarray] = field(default_factory=dict)  # [len(classes), C] mean over relevant images
    var: dict[str, np.ndarray] = field(default_factory=dict)  # [len(classes), C] over relevant images and positions
    mean_all: dict[str, np.ndarray] = field(default_factory=dict)  # [C]
    cov: dict[str, np.ndarray] = field(default_factory=dict)  # [C, C] over all images and positions
    count: np.ndarray | None = None  # [len(classes)] images in each relevance set
    logits: np.ndarray | None = None  # [N, K]
    labels: np.ndarray | None = None  # [N]
    seconds: float = 0.0

    def row(self, k: int) -> int:
        """The per-class row of source class ``k``."""
        return self.classes.index(k)


def stats_model(analysis: ChannelAnalysis, tensors: list[str], comoments: bool) -> tuple[onnx.ModelProto, list[str]]:
    """The analysed model plus, per tensor ``t``, output ``t__m``: its channel means over
    positions ``[N, C]`` (GlobalAveragePool, which ORT runs in its blocked conv layout, so the
    taps cost little); with ``comoments`` also ``t__q``, the channel means of squares
    ``[N, C]``, and ``t__c``, the channel co-moment matrix summed over the batch and
    positions ``[C, C]`` (for maps and flattened maps)."""
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
        rank = len(shapes[t].shape)
        spatial = rank > 2 or analysis.tensors[t].block > 1  # has positions to average over
        # [N, C, P]: positions (H*W, or the block of a flattened map) last
        flat = node("Reshape", [t, const(f"{t}__shape", [0, analysis.channels(t), -1])], f"{t}__flat") \
            if spatial and (comoments or rank != 4) else None
        if rank == 4 and analysis.tensors[t].block == 1:
            node("Flatten", [node("GlobalAveragePool", [t], f"{t}__gap")], f"{t}__m", axis=1)
        elif spatial:
            reduce("ReduceMean", flat, f"{t}__m", 2)
        else:  # already [N, C]
            node("Identity", [t], f"{t}__m")
        names = [f"{t}__m"]
        if comoments and spatial:
            names.append(reduce("ReduceMean", node("Mul", [flat, flat], f"{t}__sq"), f"{t}__q", 2))
            xxt = node("MatMul", [flat, node("Transpose", [flat], f"{t}__T", perm=[0, 2, 1])], f"{t}__xxT")
            names.append(reduce("ReduceSum", xxt, f"{t}__c", 0))
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


def _per_class(r: np.ndarray, m: np.ndarray) -> np.ndarray:
    """r.T @ m without BLAS: a multi-threaded BLAS call between two ORT runs fights ORT's
    spinning worker threads and costs more than the product itself."""
    return np.einsum("nk,nc->kc", r, m)


def collect_stats(
    analysis: ChannelAnalysis,
    dataset: Dataset,
    label_map: np.ndarray,
    indices: np.ndarray,
    input_size: tuple[int, int],
    device: str = "auto",
    batch_size: int = 256,
    quiet: bool = False,
    cov_images: int = 1024,
    groups: list[int] | None = None,
    classes: Sequence[int] | None = None,
) -> ActivationStats:
    """Run ``indices`` of ``dataset`` through the source once and summarise activations.

    ``label_map``: data label -> source class index (or -1 for classes the model lacks).
    Per-class channel means use every image. Second moments — per-class variances over
    images and positions (importance), and the channel covariance (least-squares
    fills) — use the first ``cov_images`` images only, through a second, heavier graph:
    a few thousand images estimate them well and the taps cost far less this way.
    ``groups``: tap only the tensors of these group ids (default: every removable group).
    ``classes``: the source classes to keep per-class statistics for (default: all); a
    1000-class source decomposed for a few classes keeps a few rows, not 1000.
    """
    groups = [g for g in analysis.groups if g.removable and not g.is_output and (groups is None or g.id in groups)]
    tensors = sorted({t for g in groups for _, t in g.consumers})
    logits_name = analysis.model.graph.output[0].name
    # ORT computes every node of a graph whatever outputs are asked for, so the co-moment
    # graph runs only on the first `cov_images` images; then it is dropped (its thread pool
    # would fight the next session's for the cores) and a light graph takes over.
    light, light_outs = stats_model(analysis, tensors, comoments=False)
    heavy, heavy_outs = stats_model(analysis, tensors, comoments=True)
    light_now = cov_images <= 0
    sess = runtime.make_session(light if light_now else heavy, device=device, name="calibration graph")
    shapes = analysis.graph.tensors()
    size = {t: analysis.channels(t) for t in tensors}
    positions = {t: int(np.prod(shapes[t].shape[1:])) // size[t] for t in tensors}
    classes = list(range(analysis.output_group().size)) if classes is None else [int(c) for c in classes]
    k = len(classes)
    # per tensor: sum_r m (per class), on the heavy images sum_r m and sum_r q (per class),
    # sum m (all), co-moments with their mean and count
    s1 = {t: np.zeros((k, size[t])) for t in tensors}
    h1 = {t: np.zeros((k, size[t])) for t in tensors}
    h2 = {t: np.zeros((k, size[t])) for t in tensors}
    h_count = np.zeros(k)
    s_all = {t: np.zeros(size[t]) for t in tensors}
    xx = {t: np.zeros((size[t], size[t])) for t in tensors}
    xx_mean = {t: np.zeros(size[t]) for t in tensors}
    xx_n = {t: 0 for t in tensors}
    all_logits, all_labels = [], []
    count = np.zeros(k)
    seen = 0
    t0 = time.perf_counter()
    n_batches = dataset.num_batches(batch_size, indices=indices)
    batches = dataset.iter_batches(batch_size, size=input_size, indices=indices)
    for x, y in progress(batches, total=n_batches, desc="calibrating", quiet=quiet, unit="batch"):
        heavy_batch = seen < cov_images
        if not heavy_batch and not light_now:  # the first light batch: swap graphs
            del sess
            sess = runtime.make_session(light, device=device, name="calibration graph")
            light_now = True
        outs = heavy_outs if heavy_batch else light_outs
        res = runtime.run(sess, x, [logits_name] + outs)
        # ORT's output arrays keep their session's memory arena alive: copy what is kept, and drop
        # the rest before the next batch (else the heavy graph's arena outlives the swap)
        logits, vals = res[0].copy(), dict(zip(outs, res[1:]))
        y = label_map[y]
        r = relevance(logits, y)[:, classes]
        count += r.sum(axis=0)
        for t in tensors:
            m = vals[f"{t}__m"].astype(np.float64)
            s1[t] += _per_class(r, m)
            s_all[t] += m.sum(axis=0)
            if not heavy_batch:
                continue
            q = vals[f"{t}__q"].astype(np.float64) if f"{t}__q" in vals else m * m
            h1[t] += _per_class(r, m)
            h2[t] += _per_class(r, q)
            if f"{t}__c" in vals:
                xx[t] += vals[f"{t}__c"].astype(np.float64)
                xx_mean[t] += m.sum(axis=0) * positions[t]
                xx_n[t] += positions[t] * len(x)
            else:  # already [N, C]: one position per image
                xx[t] += m.T @ m
                xx_mean[t] += m.sum(axis=0)
                xx_n[t] += len(x)
        if heavy_batch:
            h_count += r.sum(axis=0)
        seen += len(x)
        all_logits.append(logits)
        all_labels.append(y)
        del res, vals
    stats = ActivationStats(classes=classes)
    n = sum(len(l) for l in all_labels)
    safe = np.maximum(count, 1)[:, None]
    for t in tensors:
        mean = s1[t] / safe
        stats.mean[t] = mean
        hs = np.maximum(h_count, 1)[:, None]
        stats.var[t] = np.maximum(h2[t] / hs - (h1[t] / hs) ** 2, 0.0)
        stats.mean_all[t] = s_all[t] / max(n, 1)
        mu = xx_mean[t] / max(xx_n[t], 1)
        stats.cov[t] = xx[t] / max(xx_n[t], 1) - np.outer(mu, mu)
    stats.count = count
    stats.logits = np.concatenate(all_logits) if all_logits else np.zeros((0, analysis.output_group().size))
    stats.labels = np.concatenate(all_labels) if all_labels else np.zeros(0, dtype=np.int64)
    stats.seconds = time.perf_counter() - t0
    return stats
