"""Decomposition: one calibration pass, then one physically smaller module per class.

Pipeline (:func:`decompose`): the source in canonical form (preprocessing baked in) and the
calibration images (:func:`read_calibration_set`) -> channel analysis (:func:`analyze_source`) ->
calibration statistics (one streaming ORT pass) -> per-class selection (:func:`plan_modules`,
:mod:`onnxmod.select`; a budget on the composed model sizes them through :mod:`onnxmod.budget`) -> channel removal with least-squares fill, optional reconstruction and
repair (:func:`cut_modules`) -> module graphs with ``logit``/``score`` outputs and metadata
(:func:`write_modules`), written into a temp dir that is renamed into place at the end.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxmod import budget, calibrate, channels, compose, frontend, graphio, modelio, outputs, reconstruct, runtime, scoring, surgery
from onnxmod.cost import count_macs, count_params
from onnxmod.data import Dataset, open_dataset
from onnxmod.errors import OnnxmodError, UnsupportedOpError
from onnxmod.modulespec import LOGIT, Calibration, ModuleSpec, SourceInfo, add_score
from onnxmod.progress import progress, say, stage
from onnxmod.select import STRATEGIES, Selector, prunable_groups

FILLS = ("linear", "mean", "zero")
SUBTASK_REPAIR_IMAGES = ("all", "wanted")
REPAIR_LABELS = ("subtask", "all")
REFIT_OTHERS = 0.15  # fraction of the non-relevant refit images each module also fits on
REFIT_RELEVANT_WEIGHT = 5.0  # least-squares weight of images where the class is contested
MODULES_PER_RUN = 8  # modules run together (shared layers once) for the row and score fits; bounds memory
# --classes: calibration images of the other classes per image of the wanted ones (at 4, a 2-class
# subset of a 10-class set still calibrates on all its images)
OTHERS_PER_WANTED = 4
REPAIR_EPOCHS = 5.0  # --repair-epochs' default
# ... where the default cap shares one trunk (many classes, budget.CAPPED_TARGET): such modules are near the
# source, and five passes cost three times one for little. 100 CIFAR-100 modules of the project's ResNet20, 5,000
# held-out images: 1 pass (the 200-step minimum) vs 5 -0.56 +- 0.28 pt, decompose 97 s vs 305 s
# (bench/sweep_results/repair_epochs_cifar100_resnet20.jsonl)
CAPPED_REPAIR_EPOCHS = 1.0
REPAIR_MIN_STEPS = 200  # the minimum step count's default: small calibration sets still get this many steps
# ... under the default cap, whose one pass is about 125 steps of 128 images: 100 CIFAR-100 modules at 160
# calibration images a class, 5,000 held-out images, against all 450 a class at 200 steps: 150 steps -0.24 +- 0.30
# pt, 200 steps -0.20 +- 0.30 pt; decompose 73 s vs 89 s (bench/sweep_results/calibration_cifar100_resnet20.jsonl)
CAPPED_REPAIR_MIN_STEPS = 150
# calibration images per class, unless --samples-per-class says: SAMPLES_PER_CLASS, or fewer where many classes
# would make it more than CALIBRATION_IMAGES in all. 100 CIFAR-100 modules, 5,000 held-out images: 160 a class
# (16,000 images) vs all 450 (45,000) -0.20 +- 0.30 pt, decompose 89 s vs 97 s (the same sweep)
SAMPLES_PER_CLASS = 1600
CALIBRATION_IMAGES = 16000
# repair.RepairSettings fields that DecomposeSettings.repair_* (and seed) set; repair_recipe sets the others
REPAIR_SCHEDULE = {"epochs", "min_steps", "batch_size", "lr", "seed"}


@dataclass
class DecomposeSettings:
    """Algorithm knobs (recorded in the manifest). Defaults chosen by bench/ measurements."""

    target_macs: float = 0.5  # module MACs as a fraction of the source's
    # the composed model of all modules written, as a fraction of the source's MACs (None: size by target_macs);
    # decompose then chooses the per-module targets and shared depth (onnxmod.budget)
    composed_macs: float | None = None
    # with neither composed_macs nor class_targets, more than budget.CAP_ABOVE_MODULES modules whose composition
    # at target_macs would exceed this are sized to compose to at most this (None: no cap; the CLI sets None
    # when --target-macs is given)
    composed_cap: float | None = budget.DEFAULT_CAP
    class_targets: dict[str, float] = field(default_factory=dict)  # per-class target_macs (class name -> fraction)
    strategy: str = "uniform"  # per-layer budget: "uniform" fraction per group, or "global"
    fill: str = "linear"  # removed channels: least-squares estimate, class mean, or 0
    depth_slope: float = 0.4  # uniform budget: late layers keep (1 + slope/2)x, early (1 - slope/2)x
    shared_depth: float = 0.75  # groups in this first fraction of the depth get one class-agnostic choice
    channel_multiple: int = 8  # kept channel counts rounded to this (ORT's fast conv kernels want 8)
    refit_images: int = 600  # pool for the least-squares re-fit of the class row (0: off; not used with
    # `reconstruct`); each module runs on the pool images relevant to its class plus REFIT_OTHERS of the rest
    # 1,600 per class: repair sees more distinct images for the same number of steps (16k x 5 epochs ~ 10k x 8:
    # ResNet20 88.00% vs 87.85% on held-out training images, 16k x 8 88.78% vs 10k x 12 88.38%); the rest of
    # a 2,000-per-class training set stays held out (bench/replace chooses its class on it)
    samples_per_class: int | None = None  # None: calibration_per_class's rule
    cov_images: int = 1024  # second moments (variances, covariances) from this many calibration images
    reconstruct: bool = False  # re-fit every Conv layer by layer (onnxmod.reconstruct): +2-3 pt, ~+0.5x a plain pass of time
    reconstruct_images: int = 256  # calibration images the layer-wise re-fits use
    reconstruct_positions: int = 16  # output positions sampled per image and layer
    repair: bool = True  # distil the modules against the source (onnxmod.repair)
    # passes over the repair images (at least repair_min_steps steps); None: REPAIR_EPOCHS, or CAPPED_REPAIR_EPOCHS
    # under the default cap
    repair_epochs: float | None = None
    # small calibration sets still get this many optimiser steps; None: REPAIR_MIN_STEPS, or CAPPED_REPAIR_MIN_STEPS
    # under the default cap
    repair_min_steps: int | None = None
    repair_lr: float = 1e-3  # Adam learning rate of the distillation (2e-3 at batch 512 broke ResNet-56's repair)
    repair_batch_size: int | None = None  # None: 256 on CUDA (launch-bound: half the steps), 128 on CPU
    repair_images: int = 20000  # calibration images repair trains on (streamed: any number, any resolution)
    repair_recipe: dict[str, Any] = field(default_factory=dict)  # other repair.RepairSettings fields, for sweeps
    # a --classes sub-task repairs on the "wanted" classes' calibration images only (labelled data: by label;
    # unlabelled: by the source's prediction), for the steps a repair on "all" of them takes. "wanted": ResNet56
    # cat+dog at --composed-macs 0.25, 625 steps, 2,000 held-out images: +2.6 +- 0.75 pt
    # (bench/sweep_results/subtask_resnet56_catdog_steps.jsonl)
    subtask_repair_images: str = "wanted"
    # which decompositions of labelled data add the labels' cross-entropy to repair: a --classes "subtask" only, or
    # "all". "subtask": on held-out ResNet20 images "all" bought 0.0 +- 0.22 pt (bench/sweep_results/repair_labels_*)
    repair_labels: str = "subtask"
    platt_images: int = 500  # calibration images each module's score calibration is fitted on
    split: str = "train"
    batch_size: int = 256
    seed: int = 0

    def repair_schedule(self, capped: bool) -> tuple[float, int]:
        """Repair's passes and minimum steps: --repair-epochs and repair_min_steps, or their defaults for a plan
        under the default cap or not."""
        epochs = self.repair_epochs if self.repair_epochs is not None else (
            CAPPED_REPAIR_EPOCHS if capped else REPAIR_EPOCHS)
        min_steps = self.repair_min_steps if self.repair_min_steps is not None else (
            CAPPED_REPAIR_MIN_STEPS if capped else REPAIR_MIN_STEPS)
        return epochs, min_steps

    def calibration_per_class(self, classes: int) -> int:
        """Calibration images per class for a decomposition of ``classes`` classes: --samples-per-class, else
        SAMPLES_PER_CLASS, fewer where that would be more than CALIBRATION_IMAGES in all."""
        if self.samples_per_class is not None:
            return self.samples_per_class
        return max(1, min(SAMPLES_PER_CLASS, CALIBRATION_IMAGES // max(classes, 1)))

    def validate(self) -> None:
        for name, t in {"--target-macs": self.target_macs,
                        **{f"--class-target {c}": v for c, v in self.class_targets.items()}}.items():
            if not 0.0 < t <= 1.0:
                raise OnnxmodError(f"{name} must be in (0, 1], got {t}")
        if self.composed_macs is not None and not 0.0 < self.composed_macs <= 1000.0:  # not <=: NaN too
            raise OnnxmodError(f"--composed-macs must be in (0, 1000], got {self.composed_macs}")
        if self.composed_macs is not None and self.class_targets:
            raise OnnxmodError("--composed-macs and --class-target cannot be combined: with --composed-macs "
                               "decompose chooses the module sizes")
        if self.composed_cap is not None and not 0.0 < self.composed_cap <= 1000.0:
            raise OnnxmodError(f"composed_cap must be in (0, 1000] or None, got {self.composed_cap}")
        if self.strategy not in STRATEGIES:
            raise OnnxmodError(f"--strategy must be one of {', '.join(STRATEGIES)}")
        if self.fill not in FILLS:
            raise OnnxmodError(f"--fill must be one of {', '.join(FILLS)}")
        if self.refit_images < 0:
            raise OnnxmodError(f"--refit-images must be >= 0, got {self.refit_images}")
        if self.reconstruct and (self.reconstruct_images < 1 or self.reconstruct_positions < 1):
            raise OnnxmodError("--reconstruct needs reconstruct_images and reconstruct_positions >= 1")
        if self.repair_batch_size is not None and self.repair_batch_size < 1:
            raise OnnxmodError(f"--repair-batch-size must be >= 1, got {self.repair_batch_size}")
        if self.repair and (self.repair_epochs is not None and not self.repair_epochs > 0  # not > 0: NaN too
                            or self.repair_images < 1):
            raise OnnxmodError(f"--repair-epochs must be > 0 (got {self.repair_epochs}) and repair images >= 1")
        if self.repair_recipe:
            from onnxmod.repair import RepairSettings  # torch: only for a sweep that changes the recipe

            recipe = {f.name for f in fields(RepairSettings)} - REPAIR_SCHEDULE
            unknown = sorted(set(self.repair_recipe) - recipe)
            if unknown:
                raise OnnxmodError(f"repair_recipe: unknown field(s) {', '.join(unknown)}; "
                                   f"known: {', '.join(sorted(recipe))}")
        for name, choices in (("subtask_repair_images", SUBTASK_REPAIR_IMAGES), ("repair_labels", REPAIR_LABELS)):
            if getattr(self, name) not in choices:
                raise OnnxmodError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if self.platt_images < 2:
            raise OnnxmodError(f"platt_images must be >= 2, got {self.platt_images}")
        if self.samples_per_class is not None and self.samples_per_class < 1:
            raise OnnxmodError(f"--samples-per-class must be >= 1, got {self.samples_per_class}")
        if self.repair_min_steps is not None and self.repair_min_steps < 1:
            raise OnnxmodError(f"repair_min_steps must be >= 1, got {self.repair_min_steps}")
        if self.channel_multiple < 1:
            raise OnnxmodError(f"--channel-multiple must be >= 1, got {self.channel_multiple}")
        if not 0.0 <= self.shared_depth <= 1.0:
            raise OnnxmodError(f"--shared-depth is a fraction of the depth, in [0, 1], got {self.shared_depth}")
        if not -2.0 < self.depth_slope < 2.0:  # every layer must keep a positive fraction: 1 -/+ slope/2 > 0
            raise OnnxmodError(f"--depth-slope must be in (-2, 2), got {self.depth_slope}")
        if self.batch_size < 1 or self.cov_images < 1:
            raise OnnxmodError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.seed < 0:
            raise OnnxmodError(f"--seed must be >= 0, got {self.seed}")

    def target_for(self, class_name: str) -> float:
        """The MAC budget of one class's module (an easy class can be given a smaller one)."""
        return self.class_targets.get(class_name, self.target_macs)


# --------------------------------------------------------------------------- source
@dataclass
class PreparedSource:
    model: onnx.ModelProto  # canonical: input `input` in [0, 1], preprocessing inside
    name: str
    sha256: str
    classes: list[str]
    preprocess: dict[str, Any]
    input_chw: tuple[int, int, int]
    params: int
    macs: int
    frontend_steps: list[dict[str, Any]] = field(default_factory=list)  # onnxmod.frontend rewrites, in order


def _rename_tensor(graph: onnx.GraphProto, old: str, new: str) -> None:
    for n in graph.node:
        n.input[:] = [new if i == old else i for i in n.input]
        n.output[:] = [new if o == old else o for o in n.output]
    for v in list(graph.input) + list(graph.output) + list(graph.value_info):
        if v.name == old:
            v.name = new


def _prologue(model: onnx.ModelProto, scale: float, mean: Sequence[float], std: Sequence[float]) -> None:
    """Make input `input` in [0, 1] and compute the source's own input as (x * scale - mean) / std."""
    g = model.graph
    raw = g.input[0].name
    inner = "__om_source_input"
    _rename_tensor(g, raw, inner)
    g.input[0].name = "input"
    c = len(mean)
    consts = [
        helper.make_tensor("__om_pre_scale", TensorProto.FLOAT, [], [float(scale)]),
        helper.make_tensor("__om_pre_mean", TensorProto.FLOAT, [1, c, 1, 1], [float(m) for m in mean]),
        helper.make_tensor("__om_pre_std", TensorProto.FLOAT, [1, c, 1, 1], [float(s) for s in std]),
    ]
    g.initializer.extend(consts)
    nodes = [
        helper.make_node("Mul", ["input", "__om_pre_scale"], ["__om_pre_scaled"], name="__om_pre_mul"),
        helper.make_node("Sub", ["__om_pre_scaled", "__om_pre_mean"], ["__om_pre_centred"], name="__om_pre_sub"),
        helper.make_node("Div", ["__om_pre_centred", "__om_pre_std"], [inner], name="__om_pre_div"),
    ]
    for i, n in enumerate(nodes):
        g.node.insert(i, n)


def prepare_source(
    path: str | os.PathLike,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    scale: float | None = None,
    data_classes: Sequence[str] | None = None,
    layout: str | None = None,
    input_size: Sequence[int] | None = None,
    data_size: Sequence[int] | None = None,
) -> PreparedSource:
    """Load a source classifier and give it the canonical input (docs/DESIGN.md).

    First the front-end (:mod:`onnxmod.frontend`: opset upgrade, NCHW, static H/W from
    ``input_size`` or the calibration images' ``data_size``, dynamic batch, logits
    instead of a trailing Softmax), recorded in ``frontend_steps``. Preprocessing comes from
    ``--mean/--std/--scale`` when given, else from the
    source's ``onnxmod.preprocess`` metadata (already in the graph), else none.
    Class names from ``onnxmod.classes`` metadata, else from the data.
    """
    p = Path(path)
    model = modelio.load_model(p)
    kind = modelio.model_kind(model)
    if kind != "source":
        raise OnnxmodError(f"{p}: is a {kind} model; decompose takes a source classifier")
    model, front = frontend.canonical_input(model, str(p), layout, input_size, data_size)
    g = model.graph
    inputs = [frontend.image_input(model)]
    dims = inputs[0].type.tensor_type.shape.dim
    chw = tuple(d.dim_value for d in dims[1:])
    if len(dims) != 4 or 0 in chw:
        raise OnnxmodError(f"{p}: input '{inputs[0].name}' must be [N, C, H, W] with static C, H, W")
    meta_pre = modelio.get_meta(model, modelio.PREPROCESS) or {}
    flags = mean is not None or std is not None or scale is not None
    c = chw[0]
    if flags:
        mean = list(mean) if mean is not None else [0.0] * c
        std = list(std) if std is not None else [1.0] * c
        if len(mean) != c or len(std) != c:
            raise OnnxmodError(f"--mean/--std need {c} values (the input has {c} channels)")
        if any(s == 0 for s in std):
            raise OnnxmodError("--std values must be non-zero")
        pre = {"mean": mean, "std": std, "scale": 1.0 if scale is None else float(scale), "in_graph": False}
    elif meta_pre:
        pre = dict(meta_pre)
    else:
        pre = {"mean": [0.0] * c, "std": [1.0] * c, "scale": 1.0, "in_graph": True, "assumed": True}
    if not pre.get("in_graph", True):
        _prologue(model, pre["scale"], pre["mean"], pre["std"])
        pre["in_graph"] = True
    elif inputs[0].name != "input":
        _rename_tensor(g, inputs[0].name, "input")
    pre.setdefault("input_size", list(chw[1:]))

    classes = modelio.get_meta(model, modelio.CLASSES)
    if classes:
        classes = [c["name"] if isinstance(c, dict) else str(c) for c in classes]
    canon = graphio.canonicalize(model)
    k_dims = canon.graph.output[0].type.tensor_type.shape.dim
    k = k_dims[1].dim_value if len(k_dims) == 2 else 0
    if not k:
        stop = frontend.where_shapes_stop(canon)
        if stop is not None and stop.domain not in ("", "ai.onnx"):
            raise UnsupportedOpError(stop.name, f"{stop.domain}::{stop.op_type}",
                                     "custom-domain op: shapes cannot be inferred past it, so the output "
                                     "cannot be read as logits [N, K]")
        at = f"; shape inference stops at {stop.op_type} node '{stop.name}'" if stop is not None else ""
        raise OnnxmodError(f"{p}: output '{g.output[0].name}' must be logits [N, K] with static K{at}")
    if not classes and data_classes is None:  # unlabelled data, no names in the model: name classes by index
        classes = [str(i) for i in range(k)]
    if not classes:
        if len(data_classes) != k:
            raise OnnxmodError(f"{p}: has no onnxmod.classes metadata and the data's classes "
                               f"({0 if data_classes is None else len(data_classes)}) don't match its {k} outputs")
        classes = list(data_classes)
    if len(classes) != k:
        raise OnnxmodError(f"{p}: onnxmod.classes lists {len(classes)} names but the model has {k} outputs")
    return PreparedSource(canon, p.stem, modelio.file_sha256(p), classes, pre, chw,
                          count_params(canon), count_macs(canon), front)


# --------------------------------------------------------------------------- classes
def resolve_classes(requested: Sequence[str] | None, classes: list[str]) -> list[int]:
    """Class indices from names or indices (``--classes cat,dog`` or ``--classes 3,5``)."""
    if not requested:
        return list(range(len(classes)))
    out = []
    for r in requested:
        r = str(r).strip()
        if r in classes:
            out.append(classes.index(r))
        elif re.fullmatch(r"\d+", r) and int(r) < len(classes):
            out.append(int(r))
        else:
            raise OnnxmodError(f"class '{r}' is not one of the model's classes: {', '.join(classes)}")
    return sorted(set(out))


UNSEEN = "(not labelled)"  # pseudo-class of unlabelled images the source was not run on


def label_with_source(dataset: Dataset, src: PreparedSource, settings: DecomposeSettings, per_class: int, batch: int,
                      device: str, quiet: bool) -> Dataset:
    """Unlabelled calibration data: the source's own predictions become the labels.

    The source runs on a random ``per_class x K`` of the images (all when fewer);
    the others get a pseudo-class that is none of the source's, so they are never drawn.
    """
    k = len(src.classes)
    rng = np.random.default_rng(settings.seed + 7)
    pool = np.sort(rng.permutation(len(dataset))[: per_class * k])
    sess = runtime.make_session(src.model, device=device, name="source")
    preds = [runtime.run(sess, x)[0].argmax(axis=1)
             for x, _ in progress(dataset.iter_batches(batch, size=src.input_chw[1:], indices=pool),
                                  total=dataset.num_batches(batch, indices=pool),
                                  desc="labelling with the source", quiet=quiet, unit="batch")]
    labels = np.full(len(dataset), k, dtype=np.int64)
    labels[pool] = np.concatenate(preds)
    return dataset.with_labels(labels, [*src.classes, UNSEEN])


def calibration_indices(dataset: Dataset, label_map: np.ndarray, per_class: int, seed: int,
                        wanted: Sequence[int] | None = None) -> np.ndarray:
    """Up to ``per_class`` images of each class the model knows, drawn with a fixed seed.

    With ``wanted`` (the classes decomposed), the images of the other classes are cut to a
    fixed-seed sample of at most OTHERS_PER_WANTED per image of the wanted classes, so a
    1000-class source decomposed for a few classes streams images in proportion to those.
    """
    rng = np.random.default_rng(seed)
    mapped = label_map[dataset.labels]
    order = np.argsort(mapped, kind="stable")  # each class's images in index order, as np.nonzero gives them
    k = int(label_map.max()) + 1
    bounds = np.searchsorted(mapped[order], np.arange(k + 1))
    drawn = [rng.permutation(order[bounds[c]:bounds[c + 1]])[:per_class] for c in range(k)]
    mine = set(range(k)) if wanted is None else set(wanted)
    idx = np.concatenate([d for c, d in enumerate(drawn) if c in mine] or [np.zeros(0, dtype=np.int64)])
    others = np.concatenate([d for c, d in enumerate(drawn) if c not in mine] or [np.zeros(0, dtype=np.int64)])
    cap = OTHERS_PER_WANTED * len(idx)
    if len(others) > cap:
        others = np.random.default_rng(seed + 1).choice(others, cap, replace=False)
    return np.sort(np.concatenate([idx, others])).astype(np.int64)


# --------------------------------------------------------------------------- modules
def module_graph(small: onnx.ModelProto, a: float, b: float) -> onnx.ModelProto:
    """Rename the single-row logits output to `logit` and add `score` = sigmoid(a*logit+b)."""
    m = onnx.ModelProto()
    m.CopyFrom(small)
    _rename_tensor(m.graph, m.graph.output[0].name, LOGIT)
    add_score(m.graph, a, b)
    return graphio.infer_shapes(m)


def refit_feature(small: onnx.ModelProto) -> tuple[str | None, str]:
    """The tensor ``[N, F]`` the module's final Gemm weighs with its class row, or None and why not."""
    g = small.graph
    node = next((n for n in g.node if g.output[0].name in n.output), None)
    if node is None or node.op_type != "Gemm" or node.input[1] not in {i.name for i in g.initializer}:
        return None, "output is not produced by a Gemm"
    if any(a.name == "transA" and a.i for a in node.attribute):
        return None, "Gemm with transA"
    return node.input[0], ""


def refit_output_row(
    small: onnx.ModelProto, f: np.ndarray, before: np.ndarray, target: np.ndarray, weight: np.ndarray,
    ridge: float = 1e-2,
) -> tuple[onnx.ModelProto, np.ndarray, dict[str, Any]]:
    """Least-squares re-fit of the single output row of a module's final Gemm.

    The channels removed upstream shift the features ``f`` (of :func:`refit_feature`) the
    classifier row sees; re-fitting ``w, b`` so that ``w . f + b`` matches the source's logit
    (weighted towards the images where the class is contested) undoes most of that drift
    without training. ``before``: the module's logit on the same images. Returns the model,
    the new row ``[w, b]`` (float32, as the graph holds it) and a report.
    """
    out = small.graph.output[0].name
    node = next(n for n in small.graph.node if out in n.output)
    inits = {i.name for i in small.graph.initializer}
    trans_b = any(a.name == "transB" and a.i for a in node.attribute)
    a = np.c_[f.astype(np.float64), np.ones(len(f))] * np.sqrt(weight)[:, None]
    t = target.astype(np.float64) * np.sqrt(weight)
    lam = ridge * np.trace(a.T @ a) / a.shape[1]
    coef = np.linalg.lstsq(a.T @ a + lam * np.eye(a.shape[1]), a.T @ t, rcond=None)[0]  # a few images: singular
    w, b = coef[:-1].astype(np.float32), np.float32(coef[-1])
    m = onnx.ModelProto()
    m.CopyFrom(small)
    mg = m.graph
    mnode = next(n for n in mg.node if out in n.output)
    bshape = [1, w.size] if trans_b else [w.size, 1]
    for name in (f"{mnode.name}__refit_B", f"{mnode.name}__refit_C"):
        assert name not in inits
    mg.initializer.extend([onnx.numpy_helper.from_array(w.reshape(bshape), f"{mnode.name}__refit_B"),
                           onnx.numpy_helper.from_array(np.array([b], np.float32), f"{mnode.name}__refit_C")])
    del mnode.input[1:]
    mnode.input.extend([f"{mnode.name}__refit_B", f"{mnode.name}__refit_C"])
    for att in mnode.attribute:
        if att.name in ("alpha", "beta"):
            att.f = 1.0
    unused = {i.name for i in mg.initializer} - {i for n in mg.node for i in n.input}
    kept_inits = [i for i in mg.initializer if i.name not in unused]
    del mg.initializer[:]
    mg.initializer.extend(kept_inits)
    err = lambda pred: float(np.sqrt(np.average((pred - target) ** 2, weights=weight)))  # noqa: E731
    after = np.c_[f, np.ones(len(f))] @ coef
    report = {"refit": True, "images": int(len(f)), "rmse_before": err(before), "rmse_after": err(after)}
    return m, np.r_[w, b], report


def module_outputs(smalls: Sequence[onnx.ModelProto], names: Sequence[Sequence[str]], x: np.ndarray,
                   device: str = "auto", batch_size: int = 256) -> list[list[np.ndarray]]:
    """Tensors ``names[i]`` of each module ``smalls[i]`` on images ``x``, from one graph that
    computes what the modules share (their class-agnostic layers) once."""
    model, merged_names = compose.merged(smalls, names)
    flat = list(dict.fromkeys(o for outs in merged_names for o in outs))
    sess = runtime.make_session(model, device=device, name="modules")
    values = dict(zip(flat, runtime.run_chunked(sess, x, flat, batch_size)))
    return [[values[o] for o in outs] for outs in merged_names]


@dataclass
class ModuleFitter:
    """Each module's class row re-fitted (training-free path) and its own logit on the score-calibration
    images, MODULES_PER_RUN modules to one onnxruntime run (what they share computed once); one run
    per chunk serves both fits. Positions index the calibration order; ``x`` holds their union."""

    x: np.ndarray | None  # images at fit_pos
    fit_pos: np.ndarray  # refit_pos ∪ platt_pos, sorted
    refit_pos: np.ndarray  # the row re-fit's images (empty: no re-fit)
    platt_pos: np.ndarray  # the score calibration's images
    relevant: np.ndarray  # [len(refit_pos), K] > 0 where class k is contested (calibrate.relevance)
    source_logits: np.ndarray  # [len(refit_pos), K]: what the re-fitted rows reproduce
    mac_targets: dict[int, float]
    no_refit_why: str  # why no row is re-fitted ("" when they are)
    device: str
    batch: int
    rng: np.random.Generator
    refit_s: float = 0.0
    module_runs_s: float = 0.0

    @classmethod
    def build(cls, stats: calibrate.ActivationStats, wanted: Sequence[int], mac_targets: dict[int, float],
              images: Callable[[np.ndarray], np.ndarray | None], settings: DecomposeSettings, device: str,
              batch: int, no_refit_why: str) -> "ModuleFitter":
        """Images balanced over the wanted classes and one group of the rest (each module needs its own
        class); reconstruction and repair leave the source's class row right, so then no row re-fit."""
        refit_pos = _balanced_positions(stats.labels, 0 if no_refit_why else settings.refit_images, settings.seed,
                                        groups=wanted)
        platt_pos = _balanced_positions(stats.labels, settings.platt_images, settings.seed + 5, groups=wanted)
        fit_pos = np.union1d(refit_pos, platt_pos)
        return cls(images(fit_pos), fit_pos, refit_pos, platt_pos,
                   calibrate.relevance(stats.logits[refit_pos], stats.labels[refit_pos]), stats.logits[refit_pos],
                   mac_targets, no_refit_why, device, batch, np.random.default_rng(settings.seed + 2))

    def fit(self, items: Iterable[tuple[int, dict, onnx.ModelProto]]
            ) -> Iterator[tuple[int, dict, onnx.ModelProto, dict[str, Any], np.ndarray]]:
        """(k, keep, small) -> (k, keep, small with its class row re-fitted, re-fit report, the module's
        own logit on the Platt images)."""
        at_refit, at_platt = (np.searchsorted(self.fit_pos, p) for p in (self.refit_pos, self.platt_pos))
        it = iter(items)
        while chunk := list(itertools.islice(it, MODULES_PER_RUN)):
            refitting = [self.refit_pos.size > 0 and self.mac_targets[k] < 1.0 for k, _, _ in chunk]
            feats = [refit_feature(small) if r else (None, self.no_refit_why or "disabled")
                     for (_, _, small), r in zip(chunk, refitting)]
            # per module: the images where class k is contested, plus a sample of the rest (re-weighted)
            uses = [(self.relevant[:, k] > 0) | (self.rng.random(len(self.refit_pos)) < REFIT_OTHERS) if r else None
                    for (k, _, _), r in zip(chunk, refitting)]
            rows = np.unique(np.concatenate([at_platt, *(at_refit[u] for u in uses if u is not None)]))
            t_run = time.perf_counter()
            outs = module_outputs([small for _, _, small in chunk],
                                  [[small.graph.output[0].name] + ([f] if f else [])
                                   for (_, _, small), (f, _) in zip(chunk, feats)], self.x[rows], self.device,
                                  self.batch)
            self.module_runs_s += time.perf_counter() - t_run
            for (k, keep, small), use, (f_name, why), out in zip(chunk, uses, feats, outs):
                logit = out[0].reshape(len(rows), -1)[:, 0]
                refit = {"refit": False, "why": self.no_refit_why or why or "disabled"}
                if use is not None and f_name is not None and use.any():  # a few images: maybe none for it
                    t_refit = time.perf_counter()
                    at = np.searchsorted(rows, at_refit[use])
                    small, row, refit = refit_output_row(
                        small, out[1][at], logit[at], self.source_logits[use, k],
                        np.where(self.relevant[use, k] > 0, REFIT_RELEVANT_WEIGHT, 1.0 / REFIT_OTHERS))
                    logit = out[1] @ row[:-1] + row[-1]  # what the re-fitted module outputs
                    self.refit_s += time.perf_counter() - t_refit
                yield k, keep, small, refit, logit[np.searchsorted(rows, at_platt)]


def module_filename(index: int, name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "class"
    return f"module_{index:03d}_{safe}.onnx"


def _fills(stats: calibrate.ActivationStats, k: int, how: str) -> dict[str, Any]:
    if how == "zero":
        return {}
    if how == "mean":
        return {t: stats.mean[t][stats.row(k)] for t in stats.mean}
    return {t: surgery.LinearFill(stats.mean_all[t], stats.cov[t]) for t in stats.cov}


@dataclass
class CalibrationSet:
    """The source, the classes to decompose and the calibration images drawn for them (stage 1)."""

    src: PreparedSource
    dataset: Dataset
    label_map: np.ndarray  # data class index -> source class index (-1: not one of the source's)
    wanted: list[int]  # source class indices to decompose
    idx: np.ndarray  # the calibration images (dataset indices), in calibration order
    batch: int  # images streamed at a time
    per_class: int  # the draw's images per class (settings.calibration_per_class)

    def images(self, positions: np.ndarray) -> np.ndarray | None:
        """The calibration images at ``positions`` (into the calibration order), float32 NCHW."""
        if not positions.size:
            return None
        return np.concatenate([x for x, _ in self.dataset.iter_batches(self.batch, size=self.src.input_chw[1:],
                                                                        indices=self.idx[positions])])


@dataclass
class ModulePlan:
    """What each module keeps (stage 3): per-class MAC targets and kept channels, and the passes that follow."""

    selector: Selector
    mac_targets: dict[int, float]
    keeps: list[dict[int, np.ndarray]]  # per wanted class: group id -> kept-channel mask
    reconstruct: bool
    repair: bool
    shared_depth: float  # the depth modules share (settings.shared_depth, or what a composed budget chose)
    composition: dict[str, Any]  # the manifest's "composition" (its measured "fraction" added once written)
    repair_epochs: float  # repair's passes over its images and its minimum steps (settings.repair_schedule)
    repair_min_steps: int


def decompose(
    model_path: str | os.PathLike,
    calib: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    classes: Sequence[str] | None = None,
    settings: DecomposeSettings | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    scale: float | None = None,
    device: str = "auto",
    force: bool = False,
    quiet: bool = False,
    layout: str | None = None,
    input_size: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Write one module per (selected) class and ``manifest.json`` into ``out_dir``.

    Returns the manifest. Nothing is left behind on error: files are written in a
    temporary sibling directory renamed into place at the end.
    """
    t_start = time.perf_counter()
    settings = settings or DecomposeSettings()
    settings.validate()
    model_path = Path(model_path)
    out = Path(out_dir) if out_dir is not None else Path.cwd() / f"{model_path.stem}.modules"
    outputs.check_output(out, inputs=[model_path, calib], force=force, directory=True)
    cal = read_calibration_set(model_path, calib, classes, settings, device, quiet, mean=mean, std=std, scale=scale,
                               layout=layout, input_size=input_size)
    analysis = analyze_source(cal.src)
    with stage(f"calibration statistics ({len(cal.idx)} images)", quiet):
        stats = calibrate.collect_stats(analysis, cal.dataset, cal.label_map, cal.idx, cal.src.input_chw[1:], device,
                                        cal.batch, quiet, settings.cov_images,
                                        groups=calibrated_groups(analysis, settings), classes=cal.wanted)
    temperature = scoring.fit_temperature(stats.logits, stats.labels)  # the source's, for composing across sources
    plan = plan_modules(cal, analysis, stats, settings)
    fitter = ModuleFitter.build(stats, cal.wanted, plan.mac_targets, cal.images, settings, device, cal.batch,
                                no_refit_why="repaired by distillation" if plan.repair
                                else "reconstructed layer by layer" if plan.reconstruct else "")
    tmp = outputs.temp_dir(out)
    try:
        smalls, repair_report, pass_s = cut_modules(cal, analysis, stats, plan, settings, device, quiet)
        with stage(f"writing {len(cal.wanted)} modules", quiet):
            modules, writing_s = write_modules(tmp, smalls, cal, stats, plan, fitter, temperature, settings, quiet)
        composition = {**plan.composition, "fraction": composed_fraction_of(tmp, modules, cal.src.macs)}
        manifest = {
            "format_version": modelio.FORMAT,
            "source": {"name": cal.src.name, "file": str(model_path), "sha256": cal.src.sha256,
                       "params": cal.src.params, "macs": cal.src.macs, "classes": cal.src.classes,
                       "preprocess": cal.src.preprocess, "temperature": temperature,
                       "frontend": cal.src.frontend_steps},
            "modules": modules,
            "settings": {**asdict(settings), "repair_epochs": plan.repair_epochs,
                         "repair_min_steps": plan.repair_min_steps,
                         "samples_per_class": cal.per_class, "calib": str(calib),
                         "calibration_images": int(len(cal.idx)), "stream_batch_size": cal.batch,
                         "calibration_labels": "source predictions" if UNSEEN in cal.dataset.classes else "data"},
            "unsupported": [{"node": n, "op": o, "why": w} for n, o, w in analysis.unsupported],
            # groups whose channels each class chooses for itself (the rest: one choice for all classes)
            "class_specific_groups": [g.id for g in plan.selector.groups
                                      if not plan.selector.is_shared(g.id, plan.shared_depth)],
            "channels": analysis.summary(),
            "repair": repair_report,
            # the model composed from all modules written: requested budget, chosen sharing, MACs / source's
            "composition": composition,
            "timings": {"calibration_s": stats.seconds, **pass_s, "refit_s": fitter.refit_s,
                        "module_runs_s": fitter.module_runs_s, "writing_s": writing_s,
                        "total_s": time.perf_counter() - t_start},
        }
        modelio.write_text_atomic(tmp / "manifest.json", json.dumps(manifest, indent=2))
        outputs.replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest["output"] = str(out)
    return manifest


def composed_fraction_of(directory: Path, modules: Sequence[dict[str, Any]], source_macs: int) -> float:
    """The MACs of the model composed from the written modules, as a fraction of the source's."""
    return budget.measured_fraction([modelio.load_model(directory / m["file"]) for m in modules], source_macs)


def read_calibration_set(model_path: Path, calib: str | os.PathLike, classes: Sequence[str] | None,
                         settings: DecomposeSettings, device: str, quiet: bool,
                         **source_options: Any) -> CalibrationSet:
    """Stage 1: the source in canonical form, the wanted classes, and calibration images drawn for them
    (labelled by the source itself when the data has no labels)."""
    modelio.load_model(model_path)  # clear error for missing / not-ONNX before reading data
    dataset = open_dataset(calib, split=settings.split)
    src = prepare_source(model_path, data_classes=dataset.classes if dataset.labelled else None,
                         data_size=dataset.image_size, **source_options)
    wanted = resolve_classes(classes, src.classes)
    unknown = sorted(set(settings.class_targets) - set(src.classes))
    if unknown:
        raise OnnxmodError(f"--class-target: {', '.join(unknown)} not among the model's classes: "
                           f"{', '.join(src.classes)}")
    batch = runtime.stream_batch_size(src.model, settings.batch_size)
    per_class = settings.calibration_per_class(len(wanted))
    if not dataset.labelled:
        dataset = label_with_source(dataset, src, settings, per_class, batch, device, quiet)
    label_map = np.array([src.classes.index(c) if c in src.classes else -1 for c in dataset.classes], dtype=np.int64)
    if (label_map < 0).all():
        raise OnnxmodError(f"{calib}: none of the data's classes ({', '.join(dataset.classes[:5])}...) "
                           f"are classes of {model_path.name}")
    missing = [src.classes[k] for k in wanted if k not in label_map]
    if missing:
        raise OnnxmodError(f"{calib}: has no images of class(es) {', '.join(missing)}")
    idx = calibration_indices(dataset, label_map, per_class, settings.seed, wanted)
    if not idx.size:  # e.g. --classes of which the data holds no image: nothing to calibrate on
        raise OnnxmodError(f"{calib}: has no images of class(es) {', '.join(src.classes[k] for k in wanted)}")
    return CalibrationSet(src, dataset, label_map, wanted, idx, batch, per_class)


def analyze_source(src: PreparedSource) -> channels.ChannelAnalysis:
    """Stage 2: which channels are tied (onnxmod.channels); the output rows must be selectable."""
    analysis = channels.analyze(src.model, canonical=True)
    if not analysis.output_group().removable:
        node, op, why = analysis.pinned_by(src.model.graph.output[0].name)
        raise UnsupportedOpError(node, op, f"output rows cannot be selected through it ({why})")
    return analysis


def plan_modules(cal: CalibrationSet, analysis: channels.ChannelAnalysis, stats: calibrate.ActivationStats,
                 settings: DecomposeSettings) -> ModulePlan:
    """Stage 3: each module's MAC target and kept channels. Modules of different targets (--class-target) still
    share the early layers: those are chosen once, at the mean target, and each module's own target is met in
    its class-specific layers. --composed-macs chooses the targets and the shared depth instead
    (:mod:`onnxmod.budget`); the default cap for many classes shares every layer (``_capped_plan``)."""
    selector = Selector(analysis, stats)
    if settings.composed_macs is not None:
        sizing, streams_pruned = _plan_budget(selector, cal.wanted, settings)
        return _budget_plan(selector, sizing, settings, None, streams_pruned)
    mac_targets = {k: settings.target_for(cal.src.classes[k]) for k in cal.wanted}
    shared_keep = (selector.shared_keep(float(np.mean(list(mac_targets.values()))), settings.strategy,
                                        settings.depth_slope, settings.channel_multiple, settings.shared_depth)
                   if settings.shared_depth > 0 and len(set(mac_targets.values())) > 1 else None)
    keeps = [selector.keep_for(k, mac_targets[k], settings.strategy, settings.depth_slope,
                               multiple=settings.channel_multiple, shared_depth=settings.shared_depth,
                               fixed=shared_keep)
             for k in cal.wanted]
    fraction = budget.composed_fraction(selector, keeps, settings.fill)
    if default_cap_applies(settings, len(cal.wanted)) and fraction > settings.composed_cap:
        return _capped_plan(selector, cal.wanted, settings, fraction)
    pruned = any(t < 1.0 for t in mac_targets.values())
    composition = {"budget": None, "cap": None, "shared_depth": settings.shared_depth,
                   "predicted_fraction": fraction, "residual_streams_pruned": False, "note": ""}
    return ModulePlan(selector, mac_targets, keeps, settings.reconstruct and pruned, settings.repair and pruned,
                      settings.shared_depth, composition, *settings.repair_schedule(capped=False))


def default_cap_applies(settings: DecomposeSettings, modules: int) -> bool:
    """The default cap on the composed model: no sizing asked for, and more than CAP_ABOVE_MODULES modules."""
    return (settings.composed_cap is not None and settings.composed_macs is None and not settings.class_targets
            and modules > budget.CAP_ABOVE_MODULES)


def _capped_plan(selector: Selector, wanted: Sequence[int], settings: DecomposeSettings, uncapped: float
                 ) -> ModulePlan:
    """The default cap: many classes share every layer at ``budget.CAPPED_TARGET`` (a wide trunk is what keeps
    the composition faithful, not class-specific tails; see there); a source whose full sharing still composes
    above the cap is sized by the planner for a budget of the cap."""
    target = budget.CAPPED_TARGET
    keeps = [selector.keep_for(k, target, settings.strategy, settings.depth_slope, multiple=settings.channel_multiple,
                               shared_depth=1.0) for k in wanted]
    fraction = budget.composed_fraction(selector, keeps, settings.fill)
    if fraction > settings.composed_cap:
        return _budget_plan(selector, _planner(selector, wanted, settings).plan(
            budget.Budget.cap(settings.composed_cap)), settings, uncapped)
    sizing = budget.Sizing(1.0, {k: target for k in wanted}, keeps, fraction, list(wanted))
    return _budget_plan(selector, sizing, settings, uncapped)


def _plan_budget(selector: Selector, wanted: Sequence[int], settings: DecomposeSettings) -> tuple[budget.Sizing, bool]:
    """The sizes that meet --composed-macs, and whether residual streams had to be pruned for it. ``uniform``
    keeps a stream whole, which floors a module's MACs (ResNet56: 2 modules compose to >= 0.30x); a budget
    below that prunes the streams too (calibration saw them, see ``calibrated_groups``)."""
    requested = budget.Budget.requested(settings.composed_macs)
    try:
        return _planner(selector, wanted, settings).plan(requested), False
    except OnnxmodError:
        if settings.strategy != "uniform":
            raise
    return _planner(selector, wanted, settings, prune_tied=True).plan(requested), True  # its error: the wider range


def calibrated_groups(analysis: channels.ChannelAnalysis, settings: DecomposeSettings) -> list[int]:
    """The groups calibration collects statistics for: those the selection may shrink (with --composed-macs,
    residual streams too, which a low budget prunes)."""
    return prunable_groups(analysis, settings.strategy, prune_tied=settings.composed_macs is not None)


def _planner(selector: Selector, wanted: Sequence[int], settings: DecomposeSettings,
             prune_tied: bool = False) -> budget.Planner:
    def keep_for(k: int, target: float, depth: float, fixed: dict[int, np.ndarray] | None) -> dict[int, np.ndarray]:
        return selector.keep_for(k, target, settings.strategy, settings.depth_slope, prune_tied=prune_tied,
                                 multiple=settings.channel_multiple, shared_depth=depth, fixed=fixed)

    return budget.Planner(selector, wanted, keep_for, settings.fill, settings.target_macs, settings.shared_depth)


def _budget_plan(selector: Selector, sizing: budget.Sizing, settings: DecomposeSettings,
                 uncapped: float | None, streams_pruned: bool = False) -> ModulePlan:
    """The plan of a budgeted sizing; ``uncapped``: what the default sizes would have composed to (the cap)."""
    mean_target = float(np.mean(list(sizing.targets.values())))
    note = "" if uncapped is None else (
        f"{len(sizing.classes)} modules at --target-macs {settings.target_macs:g} would compose to "
        f"{uncapped:.2f}x the source's MACs; capped at {settings.composed_cap:g}x: shared depth "
        f"{sizing.shared_depth:.3g}, per-module target {mean_target:.3g} (give --target-macs or --composed-macs "
        "to choose)")
    composition = {"budget": settings.composed_macs, "cap": None if uncapped is None else settings.composed_cap,
                   "uncapped_fraction": uncapped, "shared_depth": sizing.shared_depth,
                   "mean_target_macs": mean_target, "predicted_fraction": sizing.fraction,
                   "residual_streams_pruned": streams_pruned, "note": note}
    pruned = any(t < 1.0 for t in sizing.targets.values())
    return ModulePlan(selector, dict(sizing.targets), sizing.keeps, settings.reconstruct and pruned,
                      settings.repair and pruned, sizing.shared_depth, composition,
                      *settings.repair_schedule(capped=uncapped is not None))


def cut_modules(cal: CalibrationSet, analysis: channels.ChannelAnalysis, stats: calibrate.ActivationStats,
                plan: ModulePlan, settings: DecomposeSettings, device: str, quiet: bool
                ) -> tuple[Iterable[onnx.ModelProto], dict[str, Any] | None, dict[str, float]]:
    """Stage 4: the channels removed (least-squares fill), then the optional layer-wise reconstruction and
    repair by distillation. Returns the module graphs, the repair report and the passes' times."""
    # lazily, so without reconstruction or repair each module is cut right before it is re-fitted and written
    smalls: Iterable[onnx.ModelProto] = (surgery.remove_channels(analysis, keep, _fills(stats, k, settings.fill))
                                         for k, keep in zip(cal.wanted, plan.keeps))
    seconds = {"reconstruct_s": 0.0, "repair_s": 0.0}
    repair_report: dict[str, Any] | None = None
    if plan.reconstruct:
        t_rec = time.perf_counter()
        with stage("layer-wise reconstruction", quiet):
            rec_x = cal.images(_balanced_positions(stats.labels, settings.reconstruct_images, settings.seed + 3))
            targets = reconstruct.source_targets(analysis, rec_x, settings.reconstruct_positions,
                                                 settings.seed + 3, device)
            smalls = reconstruct.reconstruct(list(smalls), plan.keeps, analysis, targets, device, quiet=quiet)
        seconds["reconstruct_s"] = time.perf_counter() - t_rec
    if plan.repair:
        t_rep = time.perf_counter()
        with stage(f"repair of {len(cal.wanted)} modules", quiet):
            smalls, repair_report = _repair_modules(list(smalls), cal, stats.labels, plan, settings, device, quiet)
        seconds["repair_s"] = time.perf_counter() - t_rep
    return smalls, repair_report, seconds


def write_modules(tmp: Path, smalls: Iterable[onnx.ModelProto], cal: CalibrationSet,
                  stats: calibrate.ActivationStats, plan: ModulePlan, fitter: ModuleFitter, temperature: float,
                  settings: DecomposeSettings, quiet: bool) -> tuple[list[dict[str, Any]], float]:
    """Stage 5: each module's class row re-fitted (training-free path), its score calibrated on its own logit,
    its metadata set, and the file written into ``tmp``. Returns the manifest's module entries and the time
    spent writing."""
    src, selector = cal.src, plan.selector
    all_channels = sum(g.size for g in selector.groups)
    modules, writing_s = [], 0.0
    fitted = fitter.fit(zip(cal.wanted, plan.keeps, smalls))
    for k, keep, small, refit, platt_logit in progress(fitted, total=len(cal.wanted), desc="writing modules",
                                                       quiet=quiet, unit="module"):
        # the score is calibrated on what the module itself outputs, not on the source's logit
        a, b, nll0, nll1 = scoring.fit_platt(platt_logit, stats.labels[fitter.platt_pos] == k)
        kept_channels = int(sum(keep[g.id].sum() for g in selector.groups))
        module = module_graph(small, a, b)
        params, macs = count_params(module), count_macs(module)
        spec = ModuleSpec(
            class_name=src.classes[k],
            class_index=k,
            source=SourceInfo(src.name, src.sha256, len(src.classes), src.params, src.macs),
            kept={"param_fraction": params / max(src.params, 1), "flop_fraction": macs / max(src.macs, 1),
                  "channels": {"kept": kept_channels, "total": all_channels},
                  "target_macs": plan.mac_targets[k], "strategy": settings.strategy, "fill": settings.fill,
                  "reconstructed": plan.reconstruct, "repaired": plan.repair},
            calibration=Calibration("platt", a, b, temperature, int(len(fitter.platt_pos)), nll0, nll1),
            preprocess=src.preprocess,
        )
        modelio.set_meta(module, {**spec.to_metadata(), modelio.FRONTEND: src.frontend_steps})
        modelio.drop_meta(module, modelio.CLASSES)  # a module is about one class: class_name
        module.graph.name = f"{src.name}_{src.classes[k]}"
        fname = module_filename(k, src.classes[k])
        t_write = time.perf_counter()
        modelio.save_model(module, tmp / fname)  # includes the full ONNX checker
        writing_s += time.perf_counter() - t_write
        modules.append({"file": fname, "class_index": k, "class_name": src.classes[k], "params": params,
                        "macs": macs, "param_fraction": params / max(src.params, 1),
                        "mac_fraction": macs / max(src.macs, 1), "target_macs": plan.mac_targets[k],
                        "calibration": {"platt_a": a, "platt_b": b, "nll_before": nll0, "nll_after": nll1},
                        "kept_channels": {str(g.id): np.nonzero(keep[g.id])[0].tolist() for g in selector.groups},
                        "refit": refit})
    return modules, writing_s


def _repair_modules(smalls: list[onnx.ModelProto], cal: CalibrationSet, labels: np.ndarray, plan: ModulePlan,
                    settings: DecomposeSettings, device: str, quiet: bool
                    ) -> tuple[list[onnx.ModelProto], dict[str, Any]]:
    """Distil the modules for the plan's passes over (at most ``repair_images``) calibration images, streamed from
    the data."""
    from onnxmod import repair  # torch: imported only when repairing

    positions = _balanced_positions(labels, settings.repair_images, settings.seed + 4)
    epochs = plan.repair_epochs
    # a sub-task is a classifier over some of the classes; one class alone is a donor for replace, which must
    # score every image, so it repairs on all of them, as in a full decomposition (one logit has no cross-entropy)
    subtask = 1 < len(cal.wanted) < len(cal.src.classes)
    if subtask and settings.subtask_repair_images == "wanted":
        # the steps of a repair on every calibration image, spent on the wanted classes' images: fewer
        # images, not fewer steps (steps are what a sub-task's repair is short of)
        wanted = positions[np.isin(labels[positions], cal.wanted)]
        epochs *= len(positions) / max(len(wanted), 1)
        positions = wanted
    batch = settings.repair_batch_size or repair.default_batch_size(device)
    rs = repair.RepairSettings(epochs=epochs, min_steps=plan.repair_min_steps, batch_size=batch,
                               lr=settings.repair_lr, seed=settings.seed, **settings.repair_recipe)
    # labelled data (a sub-task, or any decomposition with repair_labels "all"): each image's column among the
    # wanted classes (-1: another class)
    labelled = UNSEEN not in cal.dataset.classes and (subtask or settings.repair_labels == "all")
    column = np.full(len(cal.src.classes) + 1, -1, dtype=np.int64)
    column[cal.wanted] = np.arange(len(cal.wanted))
    images = repair.RepairImages(len(positions), lambda p: cal.images(positions[p]),
                                 column[labels[positions]] if labelled else None)
    return repair.repair(smalls, cal.src.model, cal.wanted, images, rs, device, quiet,
                         say=lambda line: say(line, quiet))


def _balanced_positions(labels: np.ndarray, n: int, seed: int, groups: Sequence[int] | None = None) -> np.ndarray:
    """Positions (into the calibration order) of ``n`` images, balanced over classes; with
    ``groups``, over those classes and one group of all the others."""
    if n <= 0 or labels.size == 0:
        return np.zeros(0, dtype=np.int64)
    if groups is not None:
        labels = np.where(np.isin(labels, groups), labels, -1)
    rng = np.random.default_rng(seed + 1)
    classes = np.unique(labels)
    per = max(1, n // len(classes))
    pos = [rng.permutation(np.nonzero(labels == c)[0])[:per] for c in classes]
    return np.sort(np.concatenate(pos))
