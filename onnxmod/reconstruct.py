"""Training-free, layer-by-layer reconstruction of pruned models' convolutions.

Removing channels makes every later layer see inputs that drift from the source's,
and the drift accumulates with depth. Walking a pruned model's Convs in
topological order, :func:`reconstruct` re-fits each one by ridge least squares so
that, fed the *pruned* model's own activations (with the Convs before it already
re-fitted), it reproduces the source's output of the same node on the channels it
keeps -- the channel-pruning reconstruction of He et al. (2017) and ThiNet, with no
training. A Conv whose only consumer is a residual ``Add`` is fitted to the
source's *sum* minus the pruned model's other branch, so it also absorbs the drift
carried by the skip connection.

Cost is kept small three ways: targets and patches are taken at a few random
output positions per image; each model is run segment by segment (from one Conv
to the next, starting from the live tensors of the previous segment), so one pass
over the images is one forward pass; and a Conv whose whole upstream computation
is identical in every module (the class-agnostic early layers) is fitted once and
its weights are reused, which also keeps those layers identical for ``compose``
to share.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxmod import graphio, ops, runtime
from onnxmod.channels import ChannelAnalysis
from onnxmod.ops.base import FitGeometry
from onnxmod.progress import progress


@dataclass
class ConvSite:
    """A node the registry says reconstruction re-fits (:meth:`onnxmod.ops.Rule.fit_geometry`:
    a plain 2-D Conv), with the source's values to match at the sampled output positions."""

    node: str
    output: str  # output tensor name (kept by surgery, so the same in every module)
    geometry: FitGeometry  # kernel, strides, dilations, pads
    residual: bool  # the only consumer is a residual Add: match the Add's output
    rows: np.ndarray  # [N, P] sampled output rows per image
    cols: np.ndarray  # [N, P]
    target: np.ndarray | None = None  # [N*P, M] source values (Conv output, or the Add's sum)


@dataclass
class SourceTargets:
    """Everything the fits need from the source: the images and, per Conv, its targets."""

    x: np.ndarray  # [N, C, H, W] calibration images
    sites: dict[str, ConvSite]  # by node name


def _single_consumer(graph: gs.Graph, tensor: str) -> gs.Node | None:
    users = [n for n in graph.nodes if any(i.name == tensor for i in n.inputs)]
    return users[0] if len(users) == 1 else None


def _residual_add(graph: gs.Graph, conv: gs.Node, analysis: ChannelAnalysis) -> tuple[gs.Node, gs.Tensor] | None:
    """(the Add, its other non-constant input) when ``conv``'s only consumer sums two branches
    (:meth:`onnxmod.ops.Rule.sums_branches`)."""
    add = _single_consumer(graph, conv.outputs[0].name)
    if add is None or not ops.rule(analysis.node_rule.get(add.name)).sums_branches(add):
        return None
    other = [t for t in add.inputs if t is not conv.outputs[0]]
    if len(other) != 1 or isinstance(other[0], gs.Constant):
        return None
    return add, other[0]


def source_targets(analysis: ChannelAnalysis, x: np.ndarray, positions: int, seed: int, device: str = "auto",
                   batch: int = 128) -> SourceTargets:
    """Sample ``positions`` output positions per image for every node of the analysed source
    whose registry rule re-fits it (``fit_geometry``) and record the source's values there on
    images ``x``."""
    source = analysis.model
    shapes = graphio.static_shapes(source)
    graph = graphio.to_gs(source)
    rng = np.random.default_rng(seed)
    sites: dict[str, ConvSite] = {}
    match: dict[str, str] = {}  # site -> tensor whose source values are the target
    for n in graph.nodes:
        geometry = ops.rule(analysis.node_rule.get(n.name)).fit_geometry(n)
        out = shapes.get(n.outputs[0].name) if n.outputs else None
        if geometry is None or out is None or len(out) != 4:
            continue
        h, w = int(out[2]), int(out[3])
        p = min(positions, h * w)
        flat = np.stack([rng.choice(h * w, p, replace=False) for _ in range(len(x))]) if len(x) else \
            np.zeros((0, p), dtype=np.int64)
        found = _residual_add(graph, n, analysis)
        residual = found is not None and shapes.get(found[1].name) == out
        add_out = found[0].outputs[0].name if residual else n.outputs[0].name
        sites[n.name] = ConvSite(n.name, n.outputs[0].name, geometry, residual, flat // w, flat % w)
        match[n.name] = add_out
    names = sorted(set(match.values()))
    values: dict[str, list[np.ndarray]] = {s: [] for s in sites}
    if sites and len(x):
        sess = runtime.make_session(graphio.add_outputs(source, names), device=device, name="source")
        for i in range(0, len(x), batch):
            got = dict(zip(names, runtime.run(sess, x[i:i + batch], names)))
            for s in sites.values():
                values[s.node].append(at_positions(got[match[s.node]], s.rows[i:i + batch], s.cols[i:i + batch]))
    for s in sites.values():
        s.target = np.concatenate(values[s.node]) if values[s.node] else None
    return SourceTargets(x, sites)


def patches(x: np.ndarray, site: ConvSite) -> np.ndarray:
    """im2col of the Conv input ``x`` at the site's sampled output positions:
    [N*P, C*kh*kw], features in the weights' (C, kh, kw) order."""
    geo = site.geometry
    t, l, b, r = geo.pads
    xp = np.pad(x, ((0, 0), (0, 0), (t, b), (l, r)))
    kh, kw = geo.kernel
    ri = site.rows[:, :, None] * geo.strides[0] + np.arange(kh) * geo.dilations[0]  # [N, P, kh]
    ci = site.cols[:, :, None] * geo.strides[1] + np.arange(kw) * geo.dilations[1]  # [N, P, kw]
    n = np.arange(x.shape[0])[:, None, None, None]
    g = xp[n, :, ri[:, :, :, None], ci[:, :, None, :]]  # [N, P, kh, kw, C]
    return np.ascontiguousarray(g.transpose(0, 1, 4, 2, 3)).reshape(-1, x.shape[1] * kh * kw)


def at_positions(y: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Values of a [N, M, H, W] map at per-image positions ``rows, cols`` ([N, P]): [N*P, M]."""
    n = np.arange(y.shape[0])[:, None]
    return y[n, :, rows, cols].reshape(-1, y.shape[1])


def _live(nodes: list[gs.Node], pos: int, graph_inputs: list[gs.Tensor]) -> list[gs.Tensor]:
    """Variables produced before ``nodes[pos]`` (or graph inputs) that nodes from ``pos`` on read."""
    produced = {t.name for n in nodes[:pos] for t in n.outputs} | {t.name for t in graph_inputs}
    seen, live = set(), []
    for n in nodes[pos:]:
        for t in n.inputs:
            if isinstance(t, gs.Variable) and t.name in produced and t.name not in seen:
                seen.add(t.name)
                live.append(t)
    return live


def _upstream(nodes: list[gs.Node], start: int, tensor: gs.Tensor) -> set[int]:
    """Indices (>= ``start``) of the nodes that compute ``tensor`` from what exists before ``nodes[start]``."""
    producer = {t.name: i for i, n in enumerate(nodes) for t in n.outputs}
    found: set[int] = set()
    stack = [tensor.name]
    while stack:
        i = producer.get(stack.pop())
        if i is None or i < start or i in found:
            continue
        found.add(i)
        stack += [t.name for t in nodes[i].inputs if isinstance(t, gs.Variable)]
    return found


def _run_segment(nodes: list[gs.Node], state: dict[str, np.ndarray], inputs: list[gs.Tensor],
                 outputs: list[gs.Tensor], like: onnx.ModelProto, device: str) -> dict[str, np.ndarray]:
    """Values of ``outputs`` computed by ``nodes`` from the values of ``inputs`` in ``state``."""
    vals = {t.name: state[t.name] for t in outputs if t.name in state}
    todo = list({t.name: t for t in outputs if t.name not in state}.values())
    if todo:
        seg = graphio.segment(nodes, inputs, todo, like)
        sess = runtime.make_session(seg, device=device, name="model segment")
        feed = {i.name: state[i.name] for i in sess.get_inputs()}
        vals.update(zip((t.name for t in todo), sess.run([t.name for t in todo], feed)))
    return vals


def _fit(site: ConvSite, conv: gs.Node, xin: np.ndarray, target: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """Ridge least squares of ``conv``'s weights and bias, shrunk towards the current ones."""
    w = np.asarray(conv.inputs[1].values)
    b = np.asarray(conv.inputs[2].values) if len(conv.inputs) > 2 else np.zeros(w.shape[0], w.dtype)
    f = patches(xin, site)
    f = np.c_[f, np.ones(len(f), f.dtype)]
    gram = (f.T @ f).astype(np.float64)  # float32 BLAS: the Gram matrix is the cost here
    w0 = np.c_[w.reshape(w.shape[0], -1), b].astype(np.float64).T  # [F+1, M]
    lam = ridge * np.trace(gram) / gram.shape[0]
    coef = np.linalg.solve(gram + lam * np.eye(gram.shape[0]), (f.T @ target.astype(f.dtype)) + lam * w0)
    return coef[:-1].T.reshape(w.shape).astype(w.dtype), coef[-1].astype(w.dtype)


def _set_weights(conv: gs.Node, w: np.ndarray, b: np.ndarray) -> None:
    conv.inputs[1] = gs.Constant(f"{conv.name}__rc_W", w)
    bias = gs.Constant(f"{conv.name}__rc_B", b)
    if len(conv.inputs) > 2:
        conv.inputs[2] = bias
    else:
        conv.inputs.append(bias)


def reconstruct(
    models: list[onnx.ModelProto],
    keeps: list[dict[int, np.ndarray]],
    analysis: ChannelAnalysis,
    targets: SourceTargets,
    device: str = "auto",
    ridge: float = 1e-3,
    quiet: bool = True,
) -> list[onnx.ModelProto]:
    """Re-fit the Convs of pruned ``models`` (cut from ``analysis.model`` with ``keeps``)
    to reproduce the source (see module doc). Returns new models; inputs are untouched."""
    graphs = [graphio.to_gs(m) for m in models]
    sigs = [graphio.computation_digests(m) for m in models]
    fitted: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # conv output digest -> weights, for shared Convs
    # the live values before the deepest shared Conv: later models start there, not at the input
    snapshot: tuple[str, dict[str, str], dict[str, np.ndarray]] | None = None
    out = []
    for model, graph, keep, sig in progress(list(zip(models, graphs, keeps, sigs)), desc="reconstructing",
                                            quiet=quiet, unit="module"):
        graph.toposort()
        nodes = list(graph.nodes)
        state = {t.name: targets.x for t in graph.inputs}
        pos = 0
        for p, conv in enumerate(nodes):
            site = targets.sites.get(conv.name)
            if site is None or site.target is None:
                continue
            key = sig[conv.outputs[0].name]  # pre-fit digest: equal upstream in every model -> equal fit
            if key in fitted:
                _set_weights(conv, *fitted[key])
                continue
            if pos == 0 and snapshot is not None:
                at = next((i for i, n in enumerate(nodes[:p]) if n.name == snapshot[0]), None)
                if at is not None and {t.name: sig[t.name] for t in _live(nodes, at, graph.inputs)} == snapshot[1]:
                    pos, state = at, snapshot[2]
            shared = all(key == s.get(conv.outputs[0].name) for s in sigs)
            found = _residual_add(graph, conv, analysis) if site.residual else None
            other = found[1] if found is not None else None
            need = [conv.inputs[0]] + ([other] if other is not None else [])
            live_out = _live(nodes, p, graph.inputs)
            # the residual branch may come after the Conv in topological order: add what it needs
            seg = sorted(set(range(pos, p)) | (_upstream(nodes, pos, other) if other is not None else set()))
            if p in seg:  # the "other" branch depends on the Conv itself: not a residual
                other, need = None, need[:1]
                seg = list(range(pos, p))
            vals = _run_segment([nodes[i] for i in seg], state, _live(nodes, pos, graph.inputs), live_out + need,
                                model, device)
            state = {t.name: vals[t.name] for t in live_out}
            pos = p
            if shared:
                snapshot = (conv.name, {t.name: sig[t.name] for t in live_out}, state)
            kept = analysis.tensor_keep(keep, site.output)
            y = site.target[:, kept] if site.target.shape[1] != len(kept) else site.target
            if other is not None:
                y = y - at_positions(vals[other.name], site.rows, site.cols)
            w, b = _fit(site, conv, vals[conv.inputs[0].name], y.astype(np.float64), ridge)
            _set_weights(conv, w, b)
            if shared:
                fitted[key] = (w, b)
        out.append(graphio.from_gs(graph, model))
    return out
