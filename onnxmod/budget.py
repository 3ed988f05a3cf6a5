"""Budgets on the composed model: what composing a run's modules costs, and the sizes that meet a budget.

``onnxmod compose`` computes identical computation once (same op, attributes, weights and inputs). Across the
modules of one decomposition a node is identical when everything it reads is and the channel groups it reads
and writes keep the same channels in every module (the layers ``--shared-depth`` shares and the ones no module
prunes; never the output rows). Such a node costs its MACs once, every other node once per module
(:func:`composed_fraction`). With a linear or zero fill a removed channel's stand-in is class-agnostic; a
``mean`` fill is the class's own mean, so every node reading a pruned group differs per class.

Planning (:func:`plan`): the composed model of N modules costs the shared trunk once plus N class-specific
tails, so its MACs grow with N unless sharing grows with it. The choice is over two knobs: how deep modules
share (the levels are the depths where one more layer becomes shared, from ``--shared-depth`` up to every
layer) and the per-module MAC target. At each level the target that meets the budget is bisected; of the
levels that meet it, the one whose target is nearest the default per-module size (``--target-macs``'s
default) wins, ties to less sharing. The last step of the channel granularity is closed by giving some
modules the next larger size (their shared layers as the others', so the trunk stays one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxmod import compose
from onnxmod.cost import count_macs
from onnxmod.errors import OnnxmodError
from onnxmod.modulespec import LOGIT
from onnxmod.select import Selector

TOLERANCE = 0.03  # --composed-macs is met within this (fraction of the source's MACs)
MIN_TARGET = 0.05  # the smallest per-module target a budget may choose
MAX_TARGET = 0.95  # the largest below full size (a full-size module is the source: every level composes to 1x)
DEFAULT_CAP = 2.0  # with no sizing flag, a decomposition of many classes composes to at most this
CAP_ABOVE_MODULES = 10  # ... "many": more modules than this (CIFAR-10 decompositions keep today's sizes)
# ... sized by sharing every layer at this per-module target: on held-out CIFAR-100 training images (ResNet20, 100
# modules, bench/sweep_results/sharing_cifar100_resnet20.jsonl) one shared 0.8x trunk lost 1.7 pt against the
# source, a 0.5x one 18.7 pt, and the 2x budget spent on class-specific tails (shared depth 0.95, 0.32 each) 39.0
CAPPED_TARGET = 0.8
SAMPLE_CLASSES = 8  # the target search sizes this many classes and scales their tails to all
BISECT_STEPS = 12
SCAN_POINTS = 12  # targets sampled per sharing level, MIN_TARGET to the largest

Keep = dict[int, np.ndarray]


# --------------------------------------------------------------------------- prediction
def identical_groups(keeps: Sequence[Keep], output_group: int) -> set[int]:
    """Group ids whose kept channels are the same in every one of ``keeps`` (never the output rows)."""
    first = keeps[0]
    return {gid for gid, mask in first.items() if gid != output_group
            and all(np.array_equal(k[gid], mask) for k in keeps[1:])}


def common_nodes(selector: Selector, same_groups: set[int], fill: str, pruned_groups: set[int]) -> set[str]:
    """Names of the nodes every module computes identically (``compose`` computes them once)."""
    analysis = selector.a
    produced_by = {t.name: n.name for n in analysis.graph.nodes for t in n.outputs}
    group_of = {name: analysis.find(tc.group) for name, tc in analysis.tensors.items()}
    class_specific_reads = pruned_groups if fill == "mean" else set()
    common: set[str] = set()
    for node in analysis.graph.nodes:
        reads = [t.name for t in node.inputs if not isinstance(t, gs.Constant)]
        if any(t in produced_by and produced_by[t] not in common for t in reads):
            continue
        groups = {group_of[t] for t in reads + [o.name for o in node.outputs] if t in group_of}
        if groups <= same_groups and not {group_of[t] for t in reads if t in group_of} & class_specific_reads:
            common.add(node.name)
    return common


def node_macs(selector: Selector, keep: Keep) -> dict[str, float]:
    """MACs of each Conv/Gemm/MatMul node of a module with these keep-masks (one image)."""
    out = {}
    for node, (gin, gout, f) in zip(selector.reducers, selector.mac_terms):
        kin = float(keep[gin].sum())
        out[node.name] = kin * f if gout is None else kin * float(keep[gout].sum()) * f
    return out


def composed_fraction(selector: Selector, keeps: Sequence[Keep], fill: str,
                      copies: Sequence[float] | None = None) -> float:
    """MACs of the model composed from modules with these keep-masks, as a fraction of the source's.
    ``copies[i]``: how many modules ``keeps[i]`` stands for (a sample of the classes scaled to all)."""
    copies = list(copies) if copies is not None else [1.0] * len(keeps)
    pruned = {gid for gid, m in keeps[0].items() if not m.all()}
    common = common_nodes(selector, identical_groups(keeps, selector.out_group.id), fill, pruned)
    total = 0.0
    for j, (keep, n) in enumerate(zip(keeps, copies)):
        for name, macs in node_macs(selector, keep).items():
            total += (macs if j == 0 else 0.0) if name in common else n * macs
    return total / max(selector.total_macs, 1.0)


def measured_fraction(modules: Sequence[onnx.ModelProto], source_macs: int) -> float:
    """MACs of the modules' composition as ``compose`` merges it, as a fraction of the source's."""
    model, _ = compose.merged(list(modules), [[LOGIT]] * len(modules))
    return count_macs(model) / max(source_macs, 1)


# --------------------------------------------------------------------------- planning
@dataclass
class Budget:
    """A budget on the composed model: met when its MACs fraction lies in [low, high]."""

    goal: float
    low: float
    high: float
    reason: str  # "--composed-macs" or "default cap"

    @classmethod
    def requested(cls, fraction: float) -> "Budget":
        return cls(fraction, fraction - TOLERANCE, fraction + TOLERANCE, "--composed-macs")

    @classmethod
    def cap(cls, fraction: float = DEFAULT_CAP) -> "Budget":
        return cls(fraction, fraction - 2 * TOLERANCE, fraction, "default cap")

    def met(self, fraction: float) -> bool:
        return self.low <= fraction <= self.high


@dataclass
class Sizing:
    """The chosen sizes: how deep modules share, each class's target and kept channels, the predicted cost."""

    shared_depth: float
    targets: dict[int, float]  # class -> per-module MAC target
    keeps: list[Keep]  # per class of ``classes``, in order
    fraction: float  # predicted composed MACs / source MACs
    classes: list[int] = field(default_factory=list)


KeepFn = Callable[[int, float, float, "Keep | None"], Keep]  # (class, target, shared depth, fixed) -> keep


class Planner:
    """Sizes the modules of ``classes`` for a composed budget (see the module docstring)."""

    def __init__(self, selector: Selector, classes: Sequence[int], keep_for: KeepFn, fill: str,
                 preferred_target: float, least_sharing: float):
        self.selector = selector
        self.classes = list(classes)
        self.keep_for = keep_for
        self.fill = fill
        self.preferred = preferred_target
        self.least_sharing = least_sharing
        step = max(1, len(self.classes) // SAMPLE_CLASSES)
        self.sample = self.classes[::step][:SAMPLE_CLASSES]

    def levels(self) -> list[float]:
        """Shared depths from ``least_sharing`` to 1, one per layer that becomes shared on the way."""
        depths = sorted({d for d in self.selector.depth.values() if d >= self.least_sharing} | {1.0})
        mids = [(a + b) / 2 for a, b in zip(depths, depths[1:])]
        return sorted({self.least_sharing, *mids, 1.0})

    def _sample_fraction(self, target: float, depth: float) -> float:
        keeps = [self.keep_for(k, target, depth, None) for k in self.sample]
        per = len(self.classes) / len(self.sample)
        return composed_fraction(self.selector, keeps, self.fill, [per] * len(keeps))

    def _full(self, targets: dict[int, float], depth: float, fixed: Keep | None = None) -> Sizing:
        keeps = [self.keep_for(k, targets[k], depth, fixed) for k in self.classes]
        return Sizing(depth, targets, keeps, composed_fraction(self.selector, keeps, self.fill), self.classes)

    def _scan(self, depth: float) -> tuple[float, list[tuple[float, float]]]:
        """(target, sampled fraction) on a grid up to where the composition peaks: beyond it the class-specific
        layers grow to full width, all modules alike, and compose shares them again (so it falls)."""
        top = 1.0 if depth >= 1.0 else MAX_TARGET
        grid = [(t, self._sample_fraction(t, depth)) for t in np.linspace(MIN_TARGET, top, SCAN_POINTS)]
        peak = max(range(len(grid)), key=lambda i: grid[i][1])
        return grid[peak][0], grid[:peak + 1]

    def reachable(self, depth: float) -> tuple[float, float]:
        """The composed fractions this sharing level spans (sampled classes)."""
        _, grid = self._scan(depth)
        return grid[0][1], grid[-1][1]

    def solve(self, budget: Budget, depth: float) -> Sizing | None:
        """The sizes at this sharing level that meet ``budget``, or None."""
        _, grid = self._scan(depth)
        if grid[0][1] > budget.high or grid[-1][1] < budget.low:
            return None
        above = next((i for i, (_, f) in enumerate(grid) if f > budget.goal), None)
        if above is None:
            lo = hi = grid[-1][0]
        elif above == 0:
            lo = hi = grid[0][0]
        else:
            lo, hi = grid[above - 1][0], grid[above][0]
            for _ in range(BISECT_STEPS):  # the largest target whose (sampled) composition stays within the goal
                mid = (lo + hi) / 2
                if self._sample_fraction(mid, depth) <= budget.goal:
                    lo = mid
                else:
                    hi = mid
        below = self._full({k: float(lo) for k in self.classes}, depth)
        if budget.met(below.fraction) or lo >= hi:
            return below if budget.met(below.fraction) else None
        if below.fraction > budget.goal:  # the sample under-estimated: step down on all classes
            lower = max(MIN_TARGET, lo - (hi - lo))
            hi, below = lo, self._full({k: float(lower) for k in self.classes}, depth)
        return self._mix(budget, below, hi, depth)

    def _mix(self, budget: Budget, below: Sizing, upper: float, depth: float) -> Sizing | None:
        """Give the first j classes the larger target ``upper`` (their shared layers fixed to ``below``'s), with
        j the most whose composition stays within the goal; None when no j meets the budget."""
        selectable = {g.id for g in self.selector.groups}
        shared = {gid: below.keeps[0][gid] for gid in identical_groups(below.keeps, self.selector.out_group.id)
                  if gid in selectable and self.selector.is_shared(gid, depth)}
        larger = [self.keep_for(k, upper, depth, shared) for k in self.classes]

        def mixed(j: int) -> Sizing:
            keeps = larger[:j] + below.keeps[j:]
            targets = {k: float(upper if i < j else below.targets[k]) for i, k in enumerate(self.classes)}
            return Sizing(depth, targets, keeps, composed_fraction(self.selector, keeps, self.fill), self.classes)

        lo, hi = 0, len(self.classes)
        best = below
        while lo < hi:  # the largest j whose composition stays within the goal (it grows with j)
            mid = (lo + hi + 1) // 2
            trial = mixed(mid)
            if trial.fraction <= budget.goal:
                lo, best = mid, trial
            else:
                hi = mid - 1
        if budget.met(best.fraction):
            return best
        over = mixed(min(lo + 1, len(self.classes)))
        return over if budget.met(over.fraction) else None

    def plan(self, budget: Budget) -> Sizing:
        """The sizes that meet ``budget``: of the sharing levels that can, the one whose per-module target is
        nearest the preferred size, ties to less sharing. Raises OnnxmodError with the reachable range."""
        found: list[tuple[float, int, Sizing]] = []
        for i, depth in enumerate(self.levels()):
            sizing = self.solve(budget, depth)
            if sizing is not None:
                mean_target = float(np.mean(list(sizing.targets.values())))
                found.append((abs(mean_target - self.preferred), i, sizing))
        if found:
            return min(found, key=lambda t: (t[0], t[1]))[2]
        if budget.reason == "default cap":  # a cap is met by anything below it: the most of it that fits
            relaxed = Budget(budget.goal, 0.0, budget.high, budget.reason)
            under = [s for d in self.levels() if (s := self.solve(relaxed, d)) is not None]
            if under:
                return max(under, key=lambda s: s.fraction)
        lowest = min(self.reachable(d)[0] for d in self.levels())
        highest = max(self.reachable(d)[1] for d in self.levels())
        raise OnnxmodError(
            f"{budget.reason} {budget.goal:g}: the composed model of these {len(self.classes)} modules can cost "
            f"{lowest:.2f}x to {highest:.2f}x the source's MACs (per-module targets {MIN_TARGET:g} to {MAX_TARGET:g}, "
            f"shared depth {self.least_sharing:g} to 1), not within {TOLERANCE:g} of {budget.goal:g}"
            if budget.reason == "--composed-macs" else
            f"the default cap of {budget.goal:g}x the source's MACs cannot be met by {len(self.classes)} modules "
            f"(they compose to {lowest:.2f}x to {highest:.2f}x); give --target-macs or --composed-macs")
