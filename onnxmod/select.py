"""Per-class channel selection: which channels a class-k module keeps.

Importance of channel c (of a group) for class k = how much replacing it by its
class-relevant mean can move logit k:

    I(c) = sum over the Conv/Gemm/MatMul n summing c of  (|W_n|^T s_n)[c] * std_k(c)

where ``std_k`` is the channel's spread on the images relevant to class k (see
:mod:`onnxmod.calibrate`) and ``s_n`` the sensitivity of logit k to n's outputs,
propagated backwards from row k of the classifier through |weights|, BatchNorm
scales and the channel maps (a training-free, gradient-free bound).

Budgets: ``uniform`` keeps a fraction of every group, growing linearly with depth
(``depth_slope``: late layers, the class-specific ones, keep more; measured on
ResNet20/56, see bench/); groups tied by residual Adds (several producers) are
kept whole unless ``prune_tied``. ``global`` removes the channels with the least
importance per MAC saved across all layers. Both go through
:meth:`ChannelAnalysis.close`; the kept fraction is bisected to hit ``target``.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxmod import ops
from onnxmod.calibrate import ActivationStats
from onnxmod.channels import ChannelAnalysis, ChannelGroup

STRATEGIES = ("global", "uniform")
MAC_SLACK = 0.02  # uniform budget below the target by more than this fraction of the source's MACs: top up
GLOBAL_FLOOR = 0.6  # "global" keeps at least this fraction of every layer (without it whole layers vanish)


def tied(group: ChannelGroup) -> bool:
    """A group several nodes produce (a residual stream): ``uniform`` keeps it whole by default.
    Squeeze-excitation gates do not count: they scale the stream, they are not added to it."""
    return len(set(group.producers) - set(group.gates)) > 1


def prunable_groups(analysis: ChannelAnalysis, strategy: str, prune_tied: bool = False) -> list[int]:
    """Ids of the groups a selection with these options may shrink (the ones calibration must see)."""
    return [g.id for g in analysis.groups if g.removable and not g.is_output
            and (strategy == "global" or prune_tied or not tied(g))]


class Selector:
    """Channel importance and MAC accounting for one analysed source model."""

    def __init__(self, analysis: ChannelAnalysis, stats: ActivationStats):
        self.a = analysis
        self.stats = stats
        self.groups = [g for g in analysis.groups if g.removable and not g.is_output]
        self.out_group = analysis.output_group()
        # nodes with MACs (their rule in onnxmod.ops says how many per kept channel pair)
        self.reducers = [n for n in analysis.graph.nodes
                         if ops.rule(analysis.node_rule.get(n.name)).mac_term(analysis, n) is not None]
        self.weights = {n.name: w for n in self.reducers
                        if (w := ops.rule(analysis.node_rule[n.name]).abs_weights(analysis, n)) is not None}
        self._mac_terms = [ops.rule(analysis.node_rule[n.name]).mac_term(analysis, n) for n in self.reducers]
        self.derivs_by_node: dict[str, list] = {}
        for d in analysis.derivations:
            self.derivs_by_node.setdefault(d.node, []).append(d)
        order = {n.name: i for i, n in enumerate(analysis.graph.nodes)}
        first = {g.id: min((order[p] for p in g.producers), default=0) for g in self.groups}
        lo, hi = min(first.values(), default=0), max(first.values(), default=1)
        self.depth = {gid: (v - lo) / max(hi - lo, 1) for gid, v in first.items()}  # 0 first .. 1 last
        self.total_macs = self.macs(analysis.full_keep())
        self._shared: dict[int, np.ndarray] | None = None  # class-agnostic importance, on first use
        self.blocks: dict[int, int] = {}  # group -> blocks of a grouped Conv reading or making it
        for gid, b in analysis.equal_blocks:
            root = analysis.find(gid)
            self.blocks[root] = max(self.blocks.get(root, 1), b)

    # ------------------------------------------------------------------ MACs
    @property
    def mac_terms(self) -> list[tuple[int, int | None, float]]:
        """Per node of :attr:`reducers`: (input group, output group or None, MACs per kept channel pair)."""
        return self._mac_terms

    def macs(self, keep: dict[int, np.ndarray]) -> float:
        n = {gid: np.count_nonzero(m) for gid, m in keep.items()}  # each group counted once, not once per term
        total = 0.0
        for gin, gout, f in self._mac_terms:
            total += n[gin] * f if gout is None else n[gin] * n[gout] * f
        return float(total)

    # ------------------------------------------------------------------ importance
    def sensitivity(self, k: int) -> dict[str, np.ndarray]:
        """Per tensor, per channel: |d logit_k / d (shift of the channel)|, bounded through |W|."""
        a = self.a
        s: dict[str, np.ndarray] = {}
        out_t = a.graph.outputs[0].name
        s[out_t] = np.zeros(self.out_group.size)
        s[out_t][k] = 1.0

        def add(t: gs.Tensor, v: np.ndarray | float) -> None:
            tc = a.tensors.get(t.name)
            if tc is None or isinstance(t, gs.Constant):
                return
            size = a.channels(t.name)
            vec = np.broadcast_to(np.asarray(v, dtype=np.float64), (size,))
            s[t.name] = s.get(t.name, 0.0) + vec

        for node in reversed(a.graph.nodes):
            outs = [s[o.name] for o in node.outputs if o.name in s]
            if not outs:
                continue
            ops.rule(a.node_rule.get(node.name)).back(self, node, outs[0], add)
        return s

    def importance(self, k: int) -> dict[int, np.ndarray]:
        """Per removable group: importance of each channel for class ``k``."""
        a, st = self.a, self.stats
        s = self.sensitivity(k)
        row = st.row(k)
        imp = {g.id: np.zeros(g.size) for g in self.groups}
        for g in self.groups:
            for node_name, t in g.consumers:
                node = a.nodes[node_name]
                so = s.get(node.outputs[0].name)
                if so is None or t not in st.var:
                    continue
                imp[g.id] += (self.weights[node_name].T @ so) * np.sqrt(st.var[t][row])
        return imp

    # ------------------------------------------------------------------ budgets
    def shared_importance(self) -> dict[int, np.ndarray]:
        """Importance averaged over the classes calibrated for (all, or those of ``--classes``; cached):
        the same choice for every module decomposed together."""
        if self._shared is None:
            # a class no calibration image is relevant to has zero variance, so zero importance:
            # skip its backward pass
            zero = {g.id: np.zeros(g.size) for g in self.groups}
            count = self.stats.count
            per = [self.importance(k) if count is None or count[i] > 0 else zero
                   for i, k in enumerate(self.stats.classes)]
            self._shared = {g.id: np.mean([p[g.id] for p in per], axis=0) for g in self.groups}
        return self._shared

    def is_shared(self, gid: int, shared_depth: float) -> bool:
        """Whether group ``gid`` gets the one class-agnostic choice under ``shared_depth``."""
        # depth is in [0, 1]: shared_depth 1 shares every group, the last one included
        return self.depth[gid] < shared_depth or shared_depth >= 1

    def shared_keep(self, target: float, strategy: str = "uniform", depth_slope: float = 0.4, multiple: int = 1,
                    shared_depth: float = 0.0) -> dict[int, np.ndarray]:
        """The shared groups' masks of a module at ``target`` (any class: they follow the class-averaged
        importance, and at one target every class gets the same counts), to hand to :meth:`keep_for` as
        ``fixed`` when modules of different targets must still share those layers."""
        keep = self.keep_for(self.stats.classes[0], target, strategy, depth_slope, multiple=multiple,
                             shared_depth=shared_depth)
        return {g.id: keep[g.id] for g in self.groups if self.is_shared(g.id, shared_depth)}

    def keep_for(self, k: int, target: float, strategy: str = "uniform", depth_slope: float = 0.4,
                 prune_tied: bool = False, multiple: int = 1, shared_depth: float = 0.0,
                 fixed: dict[int, np.ndarray] | None = None) -> dict[int, np.ndarray]:
        """Closed keep-masks for a class-``k`` module with at most ``target`` x source MACs
        (as close as the channel granularity allows; output keeps row k only). ``fixed``: masks of
        groups taken as they are (the other groups meet the target around them)."""
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}")
        fixed = fixed or {}
        a = self.a
        imp = self.importance(k)
        if shared_depth > 0:  # early groups: one class-agnostic choice, so composed models compute them once
            shared = self.shared_importance()
            imp = {gid: shared[gid] if self.is_shared(gid, shared_depth) else v for gid, v in imp.items()}
        base = a.full_keep()
        base[self.out_group.id][:] = False
        base[self.out_group.id][k] = True
        base.update({gid: m.copy() for gid, m in fixed.items()})
        if target >= 1.0 and not fixed:  # keep everything: no channel rounding may take any away
            return a.close(base)

        if strategy == "uniform":
            order = {gid: np.argsort(-v, kind="stable") for gid, v in imp.items()}

            tied_ids = {g.id for g in self.groups if tied(g)}

            def build(frac: float, mult: int = multiple) -> dict[int, np.ndarray]:
                keep = {g: m.copy() for g, m in base.items()}
                for gid, o in order.items():
                    if (gid in tied_ids and not prune_tied) or gid in fixed:
                        continue
                    f = min(1.0, frac * (1.0 + depth_slope * (self.depth[gid] - 0.5)))
                    if gid in self.blocks:  # a grouped Conv's side: the same count, the best, in every group
                        per = o.size // self.blocks[gid]
                        keep[gid] = self._blocked_top(imp[gid], gid, _round_to(f * per, 1, per))
                        continue
                    n = _round_to(f * o.size, mult, o.size)
                    keep[gid][:] = False
                    keep[gid][o[:n]] = True
                return a.close(keep)

            lo, hi = 0.0, 1.0 / max(1e-6, 1.0 - depth_slope / 2)
        else:
            full = a.full_keep()
            cands = []
            for g in self.groups:
                if g.id in fixed:
                    continue
                per = self._marginal_macs(g.id, full)
                score = imp[g.id] / max(per, 1.0)
                # never empty a layer: a floor of GLOBAL_FLOOR of its channels stays
                floor = _round_to(GLOBAL_FLOOR * g.size, multiple, g.size)
                order = np.argsort(score, kind="stable")[: g.size - floor]
                cands += [(score[c], g.id, c) for c in order]
            cands.sort(key=lambda t: t[0])

            def build(frac: float) -> dict[int, np.ndarray]:
                keep = {g: m.copy() for g, m in base.items()}
                for _, gid, c in cands[: int(round((1 - frac) * len(cands)))]:
                    keep[gid][c] = False
                return a.close(keep)

            lo, hi = 0.0, 1.0
        goal = target * self.total_macs
        keep = self._bisect(build, lo, hi, goal)
        if strategy != "uniform":
            return keep
        # rounding to `multiple` moves every small group at once: the bisection alone can land far
        # below the target (16-channel groups jump 8 -> 16 together). Top up, then try finer roundings.
        skip = (set() if prune_tied else tied_ids) | set(fixed)
        mult = multiple
        while self.macs(keep) < goal - MAC_SLACK * self.total_macs and mult >= 1:
            cand = keep if mult == multiple else self._bisect(lambda f, m=mult: build(f, m), lo, hi, goal)
            cand = self._top_up(cand, goal, order, skip, mult, imp)
            if self.macs(cand) > self.macs(keep):
                keep = cand
            mult //= 2
        return keep

    def _blocked_top(self, importance: np.ndarray, gid: int, per_block: int) -> np.ndarray:
        """Mask keeping the ``per_block`` most important channels of each of ``gid``'s blocks."""
        blocks = importance.reshape(self.blocks[gid], -1)
        mask = np.zeros(blocks.shape, dtype=bool)
        top = np.argsort(-blocks, axis=1, kind="stable")[:, :per_block]
        np.put_along_axis(mask, top, True, axis=1)
        return mask.ravel()

    def _bisect(self, build, lo: float, hi: float, goal: float) -> dict[int, np.ndarray]:
        """The keep-masks of the largest kept fraction in [lo, hi] whose MACs are within ``goal``."""
        for _ in range(20):
            mid = (lo + hi) / 2
            if self.macs(build(mid)) > goal:
                hi = mid
            else:
                lo = mid
        return build(lo)

    def _top_up(self, keep: dict[int, np.ndarray], goal: float, order: dict[int, np.ndarray], skip: set[int],
                multiple: int, imp: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        """Give back channels, ``multiple`` at a time and deepest group first, while the MACs stay
        within ``goal``."""
        step = max(1, multiple)
        gids = sorted((g for g in order if g not in skip), key=lambda g: (-self.depth[g], g))
        changed = True
        while changed:
            changed = False
            for gid in gids:
                n, size = int(keep[gid].sum()), order[gid].size
                if n >= size:
                    continue
                trial = {g: m.copy() for g, m in keep.items()}
                if gid in self.blocks:  # one more channel in every group of the grouped Conv
                    trial[gid] |= self._blocked_top(imp[gid], gid, n // self.blocks[gid] + 1)
                else:
                    trial[gid][order[gid][:min(size, (n // step + 1) * step)]] = True
                trial = self.a.close(trial)
                if self.macs(trial) <= goal:
                    keep, changed = trial, True
        return keep

    def _marginal_macs(self, gid: int, keep: dict[int, np.ndarray]) -> float:
        total = 0.0
        for gin, gout, f in self._mac_terms:
            if gin == gid:
                total += f if gout is None else float(keep[gout].sum()) * f
            if gout == gid:
                total += float(keep[gin].sum()) * f
        return total



def _round_to(n: float, multiple: int, size: int) -> int:
    """Channel count ``n`` rounded to a multiple of ``multiple`` (fast kernels), within [1, size]."""
    if multiple > 1 and size >= multiple:
        return int(min(size, max(multiple, multiple * round(n / multiple))))
    return int(min(size, max(1, round(n))))
