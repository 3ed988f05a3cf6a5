#!/usr/bin/env python
"""onnxmod benchmarks (docs/DESIGN.md "Benchmarks").

    python bench/run.py --data ../shared/data          # full run, ~20-30 min on 2 CPU cores
    python bench/run.py --smoke                        # tiny run on sample_graphs/, < 60 s, temp dir
    python bench/run.py --readme-only                  # regenerate bench/README.md from bench/results/

Sections (``--only a,b``; each one builds what it needs when an earlier section did not):

* ``cost``     source vs composed-from-all-modules top-1 on the test set, module sizes,
               decompose wall time / one plain ORT pass over the same calibration images;
* ``curve``    composed top-1, module MAC fraction and binary AUC for several ``target_macs``,
               plus the ablations (fill, refit, strategy) at the default target;
* ``reuse``    2 classes from model A + 2 from model B composed into one 4-class model;
* ``replace``  model A's weakest class served by model B's module;
* ``serving``  composed vs source throughput (batch 1 and 256) and MACs;
* ``training`` decompose+compose wall time vs one training epoch in torch.

Everything runs on the CPU (``device="cpu"``). Progress goes to stderr; results to
``<results>/*.json``, figures to ``<results>/*.png``, the README from
``bench/README.template.md``. Any failure is printed with its traceback and makes the
run exit 1 (the other sections still run).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field, replace as dc_replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
TEMPLATE = BENCH / "README.template.md"
SECTIONS = ("cost", "curve", "reuse", "replace", "serving", "training")
MEAN = (0.485, 0.456, 0.406)  # SOURCES.md: the pretrained CIFAR ResNets
STD = (0.229, 0.224, 0.225)

# Pan & Rajan, ICSE 2022, as quoted in the project brief
PAPER = {
    "decomposition_loss_pt": 1.77,  # top-1 lost by the model composed from all modules
    "reuse_delta_pt": -2.3,
    "replace_delta_pt": -0.5,
    "co2e_ratio": 37.0,  # times less CO2e than training
}

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[bench {time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- configuration
@dataclass
class ModelCfg:
    key: str  # short name used in files and tables
    label: str
    depth: int
    weights: Path
    exporter: str
    expected_top1: float | None = None  # published on the test batch (SOURCES.md)


@dataclass
class Config:
    mode: str  # "full" | "smoke"
    models: list[ModelCfg]
    calib: Path  # train split used for calibration (and the training-epoch timing)
    test: Path
    work: Path
    results: Path
    readme: Path
    curve_targets: list[float]
    curve_limit: int | None  # class-balanced test subset for the curve (None: whole test set)
    ablations: list[tuple[str, dict[str, Any]]]
    reuse: list[tuple[str, list[str]]]  # (model key, classes) twice
    plain_repeats: int  # plain inference passes (median)
    plain_budget_s: float  # ...but stop adding repeats once this much time went into them
    serve_repeats: int
    serve_b1_images: int  # single-image runs per timed repeat
    serve_big_batch: int
    train_batches: int  # timed training batches (after 1 warm-up), extrapolated to one epoch
    train_batch_size: int = 128
    curve_models: list[str] | None = None  # models the curve/ablations run on (None: all)
    command: str = ""
    settings_overrides: dict[str, Any] = field(default_factory=dict)


# serving section: settings for a composed model meant to replace its source: one shared, re-fitted
# trunk 10% smaller than the source, finer channel counts (measured: within 0.5 pt of both sources)
SERVING_VARIANT = ("reconstruct, shared_depth=1, target_macs=0.9, channel_multiple=4",
                   {"reconstruct": True, "shared_depth": 1.0, "target_macs": 0.9, "channel_multiple": 4})

# one knob changed at the default target, each row a separate decompose
ABLATIONS = [("fill=mean", {"fill": "mean"}), ("refit_images=0", {"refit_images": 0}),
             ("strategy=global", {"strategy": "global"}), ("shared_depth=0", {"shared_depth": 0.0}),
             ("reconstruct", {"reconstruct": True}), ("reconstruct", {"reconstruct": True, "target_macs": 0.8}),
             ("reconstruct, shared_depth=1", {"reconstruct": True, "shared_depth": 1.0})]


def full_config(data: Path, command: str) -> Config:
    pre = data / "pretrained"
    return Config(
        mode="full",
        models=[
            ModelCfg("resnet20", "ResNet20", 20, pre / "resnet20-cifar10jpeg.th", "legacy", 0.8791),
            ModelCfg("resnet56", "ResNet56", 56, pre / "resnet56-cifar10jpeg.th", "dynamo", 0.8995),
        ],
        calib=data / "cifar10",
        test=data / "cifar10",
        work=BENCH / "work",
        results=BENCH / "results",
        readme=BENCH / "README.md",
        curve_targets=[0.5, 0.65, 0.8, 1.0],
        curve_limit=2000,
        ablations=ABLATIONS,
        reuse=[("resnet20", ["airplane", "cat"]), ("resnet56", ["dog", "truck"])],
        plain_repeats=3,
        plain_budget_s=40.0,
        serve_repeats=3,
        serve_b1_images=40,
        serve_big_batch=256,
        train_batches=8,
        command=command,
    )


def smoke_config(tmp: Path, command: str) -> Config:
    sg = REPO / "sample_graphs"
    return Config(
        mode="smoke",
        models=[
            ModelCfg("r8legacy", "ResNet8 (legacy export)", 8, sg / "resnet8_cifar10.th", "legacy", 0.71),
            ModelCfg("r8dynamo", "ResNet8 (dynamo export)", 8, sg / "resnet8_cifar10.th", "dynamo", 0.71),
        ],
        calib=sg / "cifar10_calib.npz",
        test=sg / "cifar10_test.npz",
        work=tmp / "work",
        results=tmp / "results",
        readme=tmp / "README.md",
        curve_targets=[0.5, 1.0],
        curve_limit=None,
        ablations=ABLATIONS,
        reuse=[("r8legacy", ["airplane", "cat"]), ("r8dynamo", ["dog", "truck"])],
        plain_repeats=3,
        plain_budget_s=3.0,
        serve_repeats=2,
        serve_b1_images=10,
        serve_big_batch=64,
        train_batches=2,
        curve_models=["r8legacy"],
        command=command,
    )


# --------------------------------------------------------------------------- helpers
def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default))
    os.replace(tmp, path)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def balanced_subset(labels: np.ndarray, n: int | None, seed: int = 0) -> np.ndarray:
    """``n`` test indices, the same number per class (all when ``n`` is None), sorted."""
    if n is None or n >= len(labels):
        return np.arange(len(labels), dtype=np.int64)
    classes = np.unique(labels)
    per = n // len(classes)
    rng = np.random.default_rng(seed)
    idx = [rng.permutation(np.nonzero(labels == c)[0])[:per] for c in classes]
    return np.sort(np.concatenate(idx)).astype(np.int64)


def platt_score(logit: np.ndarray, a: float, b: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(a * logit.astype(np.float64) + b)))


# --------------------------------------------------------------------------- context
class Bench:
    """Shared state: datasets, exported sources and their test logits, default modules."""

    def __init__(self, cfg: Config):
        from onnxmod.data import open_dataset
        from onnxmod.decompose import DecomposeSettings

        self.cfg = cfg
        self.default = DecomposeSettings(**cfg.settings_overrides)
        cfg.work.mkdir(parents=True, exist_ok=True)
        cfg.results.mkdir(parents=True, exist_ok=True)
        self.test = open_dataset(cfg.test, "test")  # uint8 inside; batches are converted one at a time
        self.train = open_dataset(cfg.calib, "train")
        self.models = {m.key: m for m in cfg.models}
        self._source: dict[str, Path] = {}
        self._export_s: dict[str, float] = {}
        self._source_logits: dict[str, np.ndarray] = {}
        self._modules: dict[str, Path] = {}  # default-settings module dir per model
        self._composed: dict[str, dict[str, Any]] = {}  # default composed model + its test predictions
        self.decompose_runs: dict[str, dict[str, Any]] = {}
        self.failures: list[str] = []

    # ---------------------------------------------------------------- sources
    def source(self, key: str) -> Path:
        if key in self._source:
            return self._source[key]
        import torch

        from onnxmod.converters import CIFAR10_CLASSES, export, load_checkpoint, resnet_cifar

        m = self.models[key]
        out = self.cfg.work / f"{key}.onnx"
        log(f"export {m.label}: {m.weights.name} with the {m.exporter} exporter -> {out}")
        torch.set_num_threads(2)
        t = time.perf_counter()
        net = load_checkpoint(resnet_cifar(m.depth), m.weights)
        export(net, out, classes=CIFAR10_CLASSES, mean=MEAN, std=STD, exporter=m.exporter)
        self._export_s[key] = time.perf_counter() - t
        self._source[key] = out
        return out

    def source_info(self, key: str) -> dict[str, Any]:
        import onnx

        from onnxmod.cost import count_macs, count_params
        from onnxmod.graphio import opset_version

        model = onnx.load(str(self.source(key)))
        return {"file": str(self.source(key)), "exporter": self.models[key].exporter,
                "opset": opset_version(model), "params": count_params(model), "macs": count_macs(model),
                "export_s": self._export_s.get(key)}

    def source_logits(self, key: str) -> np.ndarray:
        """Logits of the source on the whole test set (``[N, K]``, in test-set order)."""
        if key not in self._source_logits:
            log(f"{key}: source on the test set ({len(self.test)} images)")
            out, _ = self.infer(self.source(key), np.arange(len(self.test)), ["logits"])
            self._source_logits[key] = out["logits"]
        return self._source_logits[key]

    # ---------------------------------------------------------------- running graphs
    def infer(self, model: Any, indices: np.ndarray, outputs: list[str], batch: int = 256,
              ds: Any = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
        from onnxmod import runtime

        ds = ds if ds is not None else self.test
        sess = runtime.make_session(model, device="cpu")
        res: dict[str, list[np.ndarray]] = {o: [] for o in outputs}
        ys = []
        for x, y in ds.iter_batches(batch, size=(32, 32), indices=indices):
            for o, v in zip(outputs, runtime.run(sess, x, outputs)):
                res[o].append(np.asarray(v))
            ys.append(y)
        return {o: np.concatenate(v) for o, v in res.items()}, np.concatenate(ys)

    def eval_composed(self, composed: Any, indices: np.ndarray) -> dict[str, Any]:
        """Top-1 / per-class recall of a composed model, and each member's binary AUC (from
        its calibrated score, read from the member logits inside the composed graph)."""
        from onnxmod import compose as C
        from onnxmod import graphio, modelio
        from onnxmod.modulespec import ModuleSpec
        from onnxmod.scoring import binary_auc

        members = modelio.get_meta(composed, C.MEMBERS)
        classes = [c["name"] for c in modelio.get_meta(composed, modelio.CLASSES)]
        class_names = [c["class_name"] for c in modelio.get_meta(composed, modelio.CLASSES)]
        logit_names = [m["logit"] for m in members]
        model = graphio.add_outputs(composed, logit_names)
        out, y = self.infer(model, indices, ["probs"] + logit_names)
        col = {n: i for i, n in enumerate(class_names)}
        target = np.array([col.get(self.test.classes[v], -1) for v in y])
        keep = target >= 0
        pred = out["probs"].argmax(1)
        hit = pred[keep] == target[keep]
        per_class = {}
        aucs = []
        scores = np.zeros((len(y), len(class_names)))
        for j, name in enumerate(class_names):
            sel = target == j
            per_class[name] = float((pred[sel] == j).mean()) if sel.any() else None
            spec = ModuleSpec.from_model(_meta_model(members[j]["metadata"]), name)
            scores[:, j] = platt_score(out[logit_names[j]].reshape(-1), spec.calibration.a, spec.calibration.b)
            aucs.append(binary_auc(scores[:, j], target == j))
        return {"n": int(keep.sum()), "top1": float(hit.mean()), "per_class": per_class,
                "classes": classes, "auc": aucs, "pred": pred, "target": target, "scores": scores}

    # ---------------------------------------------------------------- decompose / compose
    def decompose(self, key: str, out: Path, settings: Any) -> dict[str, Any]:
        from onnxmod.decompose import decompose

        t = time.perf_counter()
        man = decompose(self.source(key), self.cfg.calib, out, settings=settings, device="cpu", force=True,
                        quiet=True)
        man["bench_wall_s"] = time.perf_counter() - t
        return man

    def compose_dir(self, d: Path) -> tuple[Any, float]:
        from onnxmod.compose import compose

        man = json.loads((d / "manifest.json").read_text())
        files = [d / m["file"] for m in man["modules"]]
        t = time.perf_counter()
        model = compose(files)
        return model, time.perf_counter() - t

    def default_modules(self, key: str) -> Path:
        """Module dir at default settings (decomposed now unless a section already did)."""
        if key not in self._modules:
            d = self.cfg.work / key / "modules-default"
            log(f"{key}: decompose at default settings -> {d}")
            self.decompose_runs[key] = self.decompose(key, d, self.default)
            self._modules[key] = d
        return self._modules[key]

    def composed_default(self, key: str) -> dict[str, Any]:
        """The all-modules composed model at default settings and its whole-test-set evaluation."""
        if key not in self._composed:
            from onnxmod import modelio

            d = self.default_modules(key)
            model, compose_s = self.compose_dir(d)
            path = self.cfg.work / key / "composed-default.onnx"
            modelio.save_model(model, path)
            log(f"{key}: composed model on the test set ({len(self.test)} images)")
            ev = self.eval_composed(model, np.arange(len(self.test)))
            self._composed[key] = {"model": model, "path": path, "compose_s": compose_s, "eval": ev}
        return self._composed[key]


def _meta_model(meta: dict[str, str]) -> Any:
    import onnx

    m = onnx.ModelProto()
    for k, v in meta.items():
        m.metadata_props.add(key=k, value=v)
    return m


def source_eval(b: Bench, key: str, indices: np.ndarray) -> dict[str, Any]:
    logits = b.source_logits(key)[indices]
    y = b.test.labels[indices]
    pred = logits.argmax(1)
    return {"n": int(len(y)), "top1": float((pred == y).mean()),
            "per_class": {c: float((pred[y == i] == i).mean()) for i, c in enumerate(b.test.classes) if (y == i).any()}}


def module_summary(man: dict[str, Any]) -> dict[str, Any]:
    mf = [m["mac_fraction"] for m in man["modules"]]
    pf = [m["param_fraction"] for m in man["modules"]]
    return {
        "mac_fraction": {"mean": float(np.mean(mf)), "min": float(np.min(mf)), "max": float(np.max(mf))},
        "param_fraction": {"mean": float(np.mean(pf)), "min": float(np.min(pf)), "max": float(np.max(pf))},
        "per_class": [{"class": m["class_name"], "mac_fraction": m["mac_fraction"],
                       "param_fraction": m["param_fraction"], "macs": m["macs"], "params": m["params"]}
                      for m in man["modules"]],
    }


def settings_dict(s: Any) -> dict[str, Any]:
    return asdict(s)


# --------------------------------------------------------------------------- sections
def sec_cost(b: Bench) -> dict[str, Any]:
    from onnxmod import runtime
    from onnxmod.decompose import calibration_indices

    cfg = b.cfg
    res: dict[str, Any] = {"section": "cost", "settings": settings_dict(b.default), "models": {}}
    for m in cfg.models:
        key = m.key
        src = b.source(key)
        info = b.source_info(key)
        s_eval = source_eval(b, key, np.arange(len(b.test)))
        log(f"{key}: source top-1 {s_eval['top1']:.4f} (published on this test batch: {m.expected_top1})")

        # the calibration images decompose uses: same indices, same batch size, same loader
        label_map = np.arange(len(b.train.classes), dtype=np.int64)
        idx = calibration_indices(b.train, label_map, b.default.samples_per_class, b.default.seed)
        bs = b.default.batch_size

        def plain_pass() -> tuple[float, float]:
            sess = runtime.make_session(src, device="cpu")
            t = time.perf_counter()
            ort_s = 0.0
            for x, _ in b.train.iter_batches(bs, size=(32, 32), indices=idx):
                t1 = time.perf_counter()
                runtime.run(sess, x, ["logits"])
                ort_s += time.perf_counter() - t1
            return time.perf_counter() - t, ort_s

        def load_only() -> float:
            t = time.perf_counter()
            for _ in b.train.iter_batches(bs, size=(32, 32), indices=idx):
                pass
            return time.perf_counter() - t

        plain_pass()  # warm-up (page cache, ORT arenas) — not counted
        plain: list[tuple[float, float]] = []
        log(f"{key}: plain ORT pass over the {len(idx)} calibration images (batch {bs})")
        plain.append(plain_pass())
        # decompose (fresh, default settings), timed as a whole
        d = cfg.work / key / "modules-default"
        log(f"{key}: decompose at default settings -> {d}")
        man = b.decompose(key, d, b.default)
        b.decompose_runs[key] = man
        b._modules[key] = d
        # more plain passes after decompose (interleaved against drift in machine load)
        spent = plain[0][0]
        while len(plain) < cfg.plain_repeats and spent < cfg.plain_budget_s:
            plain.append(plain_pass())
            spent += plain[-1][0]
        load_s = load_only()
        plain_med = median([p[0] for p in plain])
        ort_med = median([p[1] for p in plain])
        comp = b.composed_default(key)
        c_eval = comp["eval"]
        log(f"{key}: composed top-1 {c_eval['top1']:.4f}; decompose {man['bench_wall_s']:.1f}s "
            f"= {man['bench_wall_s'] / plain_med:.2f}x one plain pass ({plain_med:.1f}s)")
        aucs = [a for a in c_eval["auc"] if a is not None]
        res["models"][key] = {
            "label": m.label,
            "source": info,
            "expected_source_top1": m.expected_top1,
            "source_top1": s_eval["top1"],
            "source_per_class": s_eval["per_class"],
            "composed_top1": c_eval["top1"],
            "composed_per_class": c_eval["per_class"],
            "loss_pt": 100.0 * (s_eval["top1"] - c_eval["top1"]),
            "test_images": s_eval["n"],
            "modules": module_summary(man),
            "module_auc": {"mean": float(np.mean(aucs)), "min": float(np.min(aucs)), "per_class": c_eval["auc"]},
            "timing": {
                "calibration_images": int(len(idx)),
                "batch_size": bs,
                "decompose_s": man["bench_wall_s"],
                "decompose_calibration_s": man["timings"]["calibration_s"],
                "compose_s": comp["compose_s"],
                "plain_pass_s": [p[0] for p in plain],
                "plain_pass_median_s": plain_med,
                "plain_pass_ort_only_median_s": ort_med,
                "data_loading_only_s": load_s,
                "decompose_over_plain": man["bench_wall_s"] / plain_med,
                "calibration_over_plain": man["timings"]["calibration_s"] / plain_med,
                "decompose_writing_s": man["timings"].get("writing_s"),
                # the measure: everything but the writing of modules
                "decompose_excl_writing_over_plain":
                    (man["bench_wall_s"] - man["timings"].get("writing_s", 0.0)) / plain_med,
            },
        }
    return res


def sec_curve(b: Bench) -> dict[str, Any]:
    cfg = b.cfg
    idx = balanced_subset(b.test.labels, cfg.curve_limit)
    targets = sorted(set(cfg.curve_targets) | {b.default.target_macs})
    res: dict[str, Any] = {"section": "curve", "subset": {"images": int(len(idx)), "balanced": True, "seed": 0,
                                                           "of": len(b.test)},
                           "default_target_macs": b.default.target_macs, "targets": targets,
                           "ablations": [n for n, _ in cfg.ablations], "models": {}}

    def point(key: str, settings: Any, tag: str, name: str) -> dict[str, Any]:
        if settings == b.default:  # the default modules (decomposed once, evaluated on the whole test set)
            comp = b.composed_default(key)
            man = b.decompose_runs[key]
            ev = comp["eval"]
            top1 = float((ev["pred"][idx] == ev["target"][idx]).mean())
            auc = subset_aucs(ev, idx)
        else:
            d = cfg.work / key / f"modules-{tag}"
            log(f"{key}: decompose {name} -> {d}")
            man = b.decompose(key, d, settings)
            model, _ = b.compose_dir(d)
            ev = b.eval_composed(model, idx)
            top1 = ev["top1"]
            auc = [a for a in ev["auc"] if a is not None]
            shutil.rmtree(d)  # keep bench/work small; the default dir stays
        summ = module_summary(man)
        log(f"{key} {name}: top-1 {top1:.4f}, mean MAC fraction {summ['mac_fraction']['mean']:.3f}, "
            f"mean AUC {np.mean(auc):.4f}")
        return {"tag": tag, "name": name, "settings": settings_dict(settings), "composed_top1": top1,
                "mac_fraction_mean": summ["mac_fraction"]["mean"],
                "param_fraction_mean": summ["param_fraction"]["mean"],
                "auc_mean": float(np.mean(auc)), "auc_min": float(np.min(auc)),
                "decompose_s": man["bench_wall_s"], "is_default": settings == b.default}

    for m in cfg.models:
        key = m.key
        if cfg.curve_models is not None and key not in cfg.curve_models:
            continue
        s = source_eval(b, key, idx)
        rows = [point(key, dc_replace(b.default, target_macs=t), f"t{t:g}", f"target_macs={t:g}") for t in targets]
        abl = []
        for name, kw in cfg.ablations:
            target = kw.get("target_macs", b.default.target_macs)
            abl.append(point(key, dc_replace(b.default, **kw), f"{re.sub(r'[^A-Za-z0-9_.]+', '-', name)}-t{target:g}",
                             f"{name} (target {target:g})"))
        res["models"][key] = {"label": m.label, "source_top1": s["top1"], "curve": rows, "ablations": abl}
    return res


def subset_aucs(ev: dict[str, Any], idx: np.ndarray) -> list[float]:
    from onnxmod.scoring import binary_auc

    out = [binary_auc(ev["scores"][idx, j], ev["target"][idx] == j) for j in range(ev["scores"].shape[1])]
    return [a for a in out if a is not None]


def sec_reuse(b: Bench) -> dict[str, Any]:
    from onnxmod import modelio
    from onnxmod.compose import compose

    cfg = b.cfg
    files, classes, origin = [], [], []
    for key, names in cfg.reuse:
        d = b.default_modules(key)
        man = json.loads((d / "manifest.json").read_text())
        by_name = {mm["class_name"]: d / mm["file"] for mm in man["modules"]}
        for n in names:
            files.append(by_name[n])
            classes.append(n)
            origin.append(key)
    t = time.perf_counter()
    model = compose(files)
    compose_s = time.perf_counter() - t
    path = cfg.work / "reuse-4class.onnx"
    modelio.save_model(model, path)
    cls_idx = [b.test.classes.index(c) for c in classes]
    idx = np.nonzero(np.isin(b.test.labels, cls_idx))[0]
    log(f"reuse: {list(zip(origin, classes))} on {len(idx)} test images")
    ev = b.eval_composed(model, idx)
    y = b.test.labels[idx]
    target = np.array([cls_idx.index(v) for v in y])
    sources = {}
    for key in dict.fromkeys(k for k, _ in cfg.reuse):
        lg = b.source_logits(key)[idx][:, cls_idx]
        pred = lg.argmax(1)
        sources[key] = {"label": b.models[key].label, "top1": float((pred == target).mean()),
                        "per_class": {c: float((pred[target == j] == j).mean()) for j, c in enumerate(classes)}}
    mean_src = float(np.mean([s["top1"] for s in sources.values()]))
    return {"section": "reuse", "classes": [{"class": c, "from": k} for c, k in zip(classes, origin)],
            "test_images": int(len(idx)), "composed_top1": ev["top1"], "composed_per_class": ev["per_class"],
            "module_auc": ev["auc"], "sources_restricted": sources,
            "delta_vs_mean_source_pt": 100.0 * (ev["top1"] - mean_src),
            "delta_vs_each_source_pt": {k: 100.0 * (ev["top1"] - s["top1"]) for k, s in sources.items()},
            "compose_s": compose_s, "file": str(path)}


def sec_replace(b: Bench) -> dict[str, Any]:
    from onnxmod import modelio
    from onnxmod.compose import replace

    cfg = b.cfg
    a_key, b_key = cfg.models[0].key, cfg.models[1].key
    src_a = source_eval(b, a_key, np.arange(len(b.test)))
    src_b = source_eval(b, b_key, np.arange(len(b.test)))
    weakest = min(src_a["per_class"], key=src_a["per_class"].get)
    before = b.composed_default(a_key)["eval"]
    d_a, d_b = b.default_modules(a_key), b.default_modules(b_key)
    man_b = json.loads((d_b / "manifest.json").read_text())
    module = d_b / next(mm["file"] for mm in man_b["modules"] if mm["class_name"] == weakest)
    log(f"replace: {a_key}'s weakest class '{weakest}' ({src_a['per_class'][weakest]:.3f}) by {module}")
    t = time.perf_counter()
    model = replace(d_a, weakest, module)
    replace_s = time.perf_counter() - t
    path = cfg.work / f"replace-{a_key}-{weakest}.onnx"
    modelio.save_model(model, path)
    after = b.eval_composed(model, np.arange(len(b.test)))
    classes = list(before["per_class"])
    return {
        "section": "replace", "base": a_key, "donor": b_key, "class": weakest, "module": str(module),
        "test_images": after["n"],
        "source_top1": {a_key: src_a["top1"], b_key: src_b["top1"]},
        "composed_top1_before": before["top1"], "composed_top1_after": after["top1"],
        "delta_pt": 100.0 * (after["top1"] - before["top1"]),
        "delta_vs_source_pt": 100.0 * (after["top1"] - src_a["top1"]),
        "per_class": {c: {"source": src_a["per_class"][c], "before": before["per_class"][c],
                          "after": after["per_class"][c], "donor_source": src_b["per_class"][c]} for c in classes},
        "replace_s": replace_s, "file": str(path),
    }


def _throughput(sess: Any, x: np.ndarray, runs: int, repeats: int) -> tuple[float, list[float]]:
    from onnxmod import runtime

    runtime.run(sess, x)  # warm-up
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(runs):
            runtime.run(sess, x)
        rates.append(runs * len(x) / (time.perf_counter() - t))
    return median(rates), rates


def sec_serving(b: Bench) -> dict[str, Any]:
    import onnx

    from onnxmod import runtime
    from onnxmod.compose import compose_info
    from onnxmod.cost import count_macs, count_params

    cfg = b.cfg
    x_big = next(b.test.iter_batches(cfg.serve_big_batch, size=(32, 32)))[0]
    x_one = x_big[:1].copy()
    res: dict[str, Any] = {"section": "serving", "threads": "onnxruntime default (all cores)",
                           "batch_sizes": [1, cfg.serve_big_batch], "repeats": cfg.serve_repeats, "models": {}}
    for m in cfg.models:
        key = m.key
        comp = b.composed_default(key)
        src_model = onnx.load(str(b.source(key)))
        s_sess = runtime.make_session(src_model, device="cpu")
        c_sess = runtime.make_session(comp["model"], device="cpu")
        row: dict[str, Any] = {"label": m.label}
        # interleave source and composed measurements so load changes hit both
        for bs, x, runs in ((1, x_one, cfg.serve_b1_images), (cfg.serve_big_batch, x_big, 1)):
            s_rate, s_all = _throughput(s_sess, x, runs, cfg.serve_repeats)
            c_rate, c_all = _throughput(c_sess, x, runs, cfg.serve_repeats)
            row[f"batch{bs}"] = {"source_img_s": s_rate, "composed_img_s": c_rate,
                                 "composed_over_source": c_rate / s_rate,
                                 "source_repeats": s_all, "composed_repeats": c_all}
            log(f"{key} batch {bs}: source {s_rate:.0f} img/s, composed {c_rate:.0f} img/s "
                f"({c_rate / s_rate:.2f}x)")
        # the serving-oriented settings: every layer shared (one pruned trunk + 10 class rows), re-fitted
        name, kw = SERVING_VARIANT
        d = cfg.work / key / "modules-serving"
        log(f"{key}: decompose {name} -> {d}")
        v_man = b.decompose(key, d, dc_replace(b.default, **kw))
        v_model, _ = b.compose_dir(d)
        v_eval = b.eval_composed(v_model, np.arange(len(b.test)))
        v_sess = runtime.make_session(v_model, device="cpu")
        variant: dict[str, Any] = {"name": name, "settings": kw, "composed_top1": v_eval["top1"],
                                   "test_images": len(b.test),
                                   "mac_fraction_mean": module_summary(v_man)["mac_fraction"]["mean"],
                                   "composed_over_source_macs": count_macs(v_model) / count_macs(src_model)}
        for bs, x, runs in ((1, x_one, cfg.serve_b1_images), (cfg.serve_big_batch, x_big, 1)):
            s_rate, _ = _throughput(s_sess, x, runs, cfg.serve_repeats)
            v_rate, v_all = _throughput(v_sess, x, runs, cfg.serve_repeats)
            variant[f"batch{bs}"] = {"source_img_s": s_rate, "composed_img_s": v_rate,
                                     "composed_over_source": v_rate / s_rate, "composed_repeats": v_all}
            log(f"{key} {name} batch {bs}: source {s_rate:.0f} img/s, composed {v_rate:.0f} img/s "
                f"({v_rate / s_rate:.2f}x), top-1 {v_eval['top1']:.4f}")
        row["variant"] = variant
        info = compose_info(comp["model"])
        s_macs, c_macs = count_macs(src_model), count_macs(comp["model"])
        row.update({"source_macs": s_macs, "composed_macs": c_macs, "composed_over_source_macs": c_macs / s_macs,
                    "module_macs_sum": info.get("module_macs_sum"),
                    "shared_by_dedup": 1.0 - c_macs / info["module_macs_sum"] if info.get("module_macs_sum") else None,
                    "source_params": count_params(src_model), "composed_params": count_params(comp["model"]),
                    "composed_nodes": info.get("nodes")})
        res["models"][key] = row
    return res


def sec_training(b: Bench) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from onnxmod.converters import resnet_cifar

    cfg = b.cfg
    torch.set_num_threads(2)
    torch.manual_seed(0)
    n_train = len(b.train)
    bs = cfg.train_batch_size
    per_epoch = math.ceil(n_train / bs)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    res: dict[str, Any] = {"section": "training", "train_images": n_train, "batch_size": bs,
                           "batches_per_epoch": per_epoch, "timed_batches": cfg.train_batches,
                           "torch_threads": torch.get_num_threads(), "optimizer": "SGD lr 0.1 momentum 0.9 wd 5e-4",
                           "augmentation": "random horizontal flip", "models": {}}
    order = np.random.default_rng(0).permutation(n_train)
    for m in cfg.models:
        net = resnet_cifar(m.depth)
        net.train()
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        times = []
        batches = b.train.iter_batches(bs, size=(32, 32), indices=order)
        for i in range(cfg.train_batches + 1):  # +1 warm-up
            t = time.perf_counter()
            x, y = next(batches)
            xt = torch.from_numpy(x)
            flip = torch.rand(len(xt)) < 0.5
            xt[flip] = xt[flip].flip(3)
            xt = (xt - mean) / std
            loss = F.cross_entropy(net(xt), torch.from_numpy(y))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i:
                times.append(time.perf_counter() - t)
        per_batch = median(times)
        epoch_s = per_batch * per_epoch
        cost = b.decompose_runs.get(m.key)
        comp = b._composed.get(m.key)
        if cost is None or comp is None:
            b.composed_default(m.key)
            cost, comp = b.decompose_runs[m.key], b._composed[m.key]
        dc_s = cost["bench_wall_s"] + comp["compose_s"]
        log(f"{m.key}: one training epoch ~{epoch_s:.1f}s ({per_batch * 1000:.0f} ms/batch); "
            f"decompose+compose {dc_s:.1f}s -> {epoch_s / dc_s:.2f}x")
        res["models"][m.key] = {"label": m.label, "batch_s": times, "batch_median_s": per_batch,
                                "epoch_s_extrapolated": epoch_s, "decompose_plus_compose_s": dc_s,
                                "epoch_over_decompose": epoch_s / dc_s}
    return res


# --------------------------------------------------------------------------- machine
def machine_info(cfg: Config) -> dict[str, Any]:
    import onnx
    import onnxruntime

    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError as e:
        cpu = f"? ({type(e).__name__})"
    try:
        import torch

        torch_v = torch.__version__
    except ImportError:
        torch_v = None
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=False).stdout.strip() or None
        dirty = subprocess.run(["git", "--no-optional-locks", "-C", str(REPO), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        commit, dirty = None, ""
    return {
        "date": now(), "cpu": cpu, "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg_start": list(os.getloadavg()), "python": platform.python_version(), "platform": platform.platform(),
        "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__, "numpy": np.__version__, "torch": torch_v,
        "git_commit": commit, "git_dirty": bool(dirty), "mode": cfg.mode, "command": cfg.command,
    }


# --------------------------------------------------------------------------- figures
def figures(cfg: Config, results: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    cost = results.get("cost")
    if cost:
        fig, ax = plt.subplots(figsize=(8, 3.6))
        keys = list(cost["models"])
        width = 0.8 / max(1, len(keys))
        classes = [r["class"] for r in cost["models"][keys[0]]["modules"]["per_class"]]
        for i, k in enumerate(keys):
            fr = [r["mac_fraction"] for r in cost["models"][k]["modules"]["per_class"]]
            ax.bar(np.arange(len(fr)) + (i - (len(keys) - 1) / 2) * width, fr, width,
                   label=cost["models"][k]["label"])
        ax.axhline(cost["settings"]["target_macs"], color="k", ls="--", lw=1, label="target_macs")
        ax.set_xticks(np.arange(len(classes)), classes, rotation=30, ha="right")
        ax.set_ylabel("module MACs / source MACs")
        ax.set_ylim(0, 1.05)
        ax.set_title("Module size per class (default settings)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = cfg.results / "module_mac_fraction.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written.append(p.name)
    curve = results.get("curve")
    if curve:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        for i, (k, r) in enumerate(curve["models"].items()):
            c = f"C{i}"
            xs = [p["mac_fraction_mean"] for p in r["curve"]]
            axes[0].plot(xs, [100 * p["composed_top1"] for p in r["curve"]], "o-", color=c, label=r["label"])
            axes[0].axhline(100 * r["source_top1"], color=c, ls=":", lw=1)
            axes[1].plot(xs, [p["auc_mean"] for p in r["curve"]], "o-", color=c, label=r["label"])
            for p in r["curve"]:
                if p["is_default"]:
                    axes[0].plot(p["mac_fraction_mean"], 100 * p["composed_top1"], "*", ms=14, color=c, mec="k")
                    axes[1].plot(p["mac_fraction_mean"], p["auc_mean"], "*", ms=14, color=c, mec="k")
        axes[0].set_xlabel("mean module MACs / source MACs")
        axes[0].set_ylabel(f"composed top-1 (%), {curve['subset']['images']} test images")
        axes[0].set_title("Size vs accuracy (dotted: source; star: default)", fontsize=9)
        axes[1].set_xlabel("mean module MACs / source MACs")
        axes[1].set_ylabel("mean module binary AUC")
        for a in axes:
            a.grid(alpha=0.3)
            a.legend(fontsize=8)
        fig.tight_layout()
        p = cfg.results / "size_accuracy_curve.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        written.append(p.name)
    return written


# --------------------------------------------------------------------------- README
def _pct(x: float | None, d: int = 2) -> str:
    return "–" if x is None else f"{100 * x:.{d}f}%"


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "–" if x is None else format(x, fmt)


def render_readme(cfg: Config, results: dict[str, Any]) -> str:
    tpl = TEMPLATE.read_text()
    cmd = cfg.command or "python bench/run.py --data ../shared/data"
    blocks: dict[str, str] = {"replace_cli": "onnxmod replace BASE_MODULE_DIR --class CLASS --with MODULE.onnx -o OUT.onnx"}
    mach = results.get("machine", {})
    blocks["machine"] = (
        f"- CPU: {mach.get('cpu')} ({mach.get('usable_cpus')} usable of {mach.get('logical_cpus')} logical); "
        f"load average at start {', '.join(f'{v:.2f}' for v in mach.get('loadavg_start', []))}"
        f"{'; at end ' + ', '.join(f'{v:.2f}' for v in mach['loadavg_end']) if mach.get('loadavg_end') else ''}\n"
        f"- onnxruntime {mach.get('onnxruntime')}, onnx {mach.get('onnx')}, torch {mach.get('torch')}, "
        f"numpy {mach.get('numpy')}, Python {mach.get('python')}\n"
        f"- date {mach.get('date')}, commit `{(mach.get('git_commit') or '?')[:12]}`"
        f"{' (+ uncommitted changes)' if mach.get('git_dirty') else ''}, "
        f"total bench wall time {_f(mach.get('total_s'), '.0f')} s\n"
        f"- command: `{mach.get('command', cmd)}`")
    cost, curve, reuse, rep, serv, train = (results.get(k) for k in SECTIONS)
    # headline
    keys = list((cost or {"models": {}})["models"])
    rows = ["| | paper (Pan & Rajan 2022) | " + " | ".join(cost["models"][k]["label"] for k in keys) + " |"] if cost else []
    rows.append("|---|---|" + "---|" * len(keys))
    if cost:
        rows.append("| decomposition cost: source − composed top-1 | 1.77 pt | " + " | ".join(
            f"{cost['models'][k]['loss_pt']:.2f} pt ({_pct(cost['models'][k]['source_top1'])} → "
            f"{_pct(cost['models'][k]['composed_top1'])})" for k in keys) + " |")
    rec = {k: next((p for p in curve["models"][k]["ablations"] if p["settings"].get("reconstruct")
                    and p["settings"].get("target_macs") == curve["default_target_macs"]), None)
           for k in keys if curve and k in curve["models"]}
    if cost and rec and all(rec.get(k) for k in keys):
        rows.append(f"| same with `--reconstruct` ({curve['subset']['images']}-image test subset of section 2) | | "
                    + " | ".join(f"{100 * (curve['models'][k]['source_top1'] - rec[k]['composed_top1']):.2f} pt "
                                 f"({_pct(curve['models'][k]['source_top1'])} → {_pct(rec[k]['composed_top1'])})"
                                 for k in keys) + " |")
    if cost and serv and all(serv["models"].get(k, {}).get("variant") for k in keys):
        v = {k: serv["models"][k]["variant"] for k in keys}
        big = f"batch{serv['batch_sizes'][1]}"
        rows.append("| same with `--reconstruct --shared-depth 1 --target-macs 0.9 --channel-multiple 4` (one shared "
                    "trunk; section 5) | | " + " | ".join(
            f"{100 * (cost['models'][k]['source_top1'] - v[k]['composed_top1']):.2f} pt "
            f"({_pct(cost['models'][k]['source_top1'])} → {_pct(v[k]['composed_top1'])}); composed runs "
            f"{v[k]['batch1']['composed_over_source']:.2f}x / {v[k][big]['composed_over_source']:.2f}x "
            f"the source's speed (batch 1 / {serv['batch_sizes'][1]})" for k in keys) + " |")
    if reuse:
        rows.append(f"| reuse: 4-class model vs sources restricted to the same 4 logits | −2.3 pt | "
                    f"{reuse['delta_vs_mean_source_pt']:+.2f} pt vs mean of sources (" + ", ".join(
                        f"{s['label']} {_pct(s['top1'])}" for s in reuse["sources_restricted"].values())
                    + f"; composed {_pct(reuse['composed_top1'])}) |" + " |" * (len(keys) - 1))
    if rep:
        rows.append(f"| replace: top-1 after − before (composed {rep['base']}) | −0.5 pt | "
                    f"{rep['delta_pt']:+.2f} pt ('{rep['class']}' from {rep['donor']}) |" + " |" * (len(keys) - 1))
    if train:
        rows.append("| one training epoch / (decompose + compose) wall time | ~37x less CO2e than training | "
                    + " | ".join(f"{train['models'][k]['epoch_over_decompose']:.2f}x" for k in keys
                                 if k in train["models"]) + " |")
    blocks["headline"] = "\n".join(rows) if cost else "_cost section not run_"

    if cost:
        t = ["| model | source file (exporter, opset) | source top-1 | composed top-1 | loss | module MACs mean [min, max] "
             "| module params mean [min, max] | module AUC mean [min] | decompose s | plain pass s (median of n) "
             "| decompose / plain | decompose without writing modules / plain | calibration pass / plain |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for k in keys:
            r = cost["models"][k]
            mf, pf, tm = r["modules"]["mac_fraction"], r["modules"]["param_fraction"], r["timing"]
            t.append(f"| {r['label']} | `{Path(r['source']['file']).name}` ({r['source']['exporter']}, opset "
                     f"{r['source']['opset']}) | {_pct(r['source_top1'])} (published {_pct(r['expected_source_top1'])}) | "
                     f"{_pct(r['composed_top1'])} | {r['loss_pt']:.2f} pt | {_pct(mf['mean'], 1)} [{_pct(mf['min'], 1)}, "
                     f"{_pct(mf['max'], 1)}] | {_pct(pf['mean'], 1)} [{_pct(pf['min'], 1)}, {_pct(pf['max'], 1)}] | "
                     f"{r['module_auc']['mean']:.4f} [{r['module_auc']['min']:.4f}] | {tm['decompose_s']:.1f} | "
                     f"{tm['plain_pass_median_s']:.1f} (n={len(tm['plain_pass_s'])}) | "
                     f"{tm['decompose_over_plain']:.2f}x | **{tm['decompose_excl_writing_over_plain']:.2f}x** | "
                     f"{tm['calibration_over_plain']:.2f}x |")
        r0 = cost["models"][keys[0]]["timing"]
        t.append("")
        t.append(f"{cost['models'][keys[0]]['test_images']} test images. Calibration: {r0['calibration_images']} "
                 f"training images, batch {r0['batch_size']}. The plain pass is one `onnxruntime` run of the source "
                 f"over exactly those images with the same loader and batch size (data loading included; loading "
                 f"alone: " + ", ".join(f"{cost['models'][k]['label']} {cost['models'][k]['timing']['data_loading_only_s']:.2f} s"
                                        for k in keys) + ").")
        t.append("")
        t.append("Per-class recall, source → composed:")
        t.append("")
        t.append("| class | " + " | ".join(cost["models"][k]["label"] for k in keys) + " |")
        t.append("|---|" + "---|" * len(keys))
        for c in cost["models"][keys[0]]["source_per_class"]:
            t.append(f"| {c} | " + " | ".join(
                f"{_pct(cost['models'][k]['source_per_class'][c], 1)} → {_pct(cost['models'][k]['composed_per_class'][c], 1)}"
                for k in keys) + " |")
        blocks["cost"] = "\n".join(t)
    else:
        blocks["cost"] = "_not run_"

    if curve:
        t = [f"Composed top-1 on a fixed class-balanced subset of {curve['subset']['images']} of the "
             f"{curve['subset']['of']} test images (seed 0); **bold** = default `target_macs` "
             f"({curve['default_target_macs']}). Other settings at their defaults.", "",
             "| model | setting | mean module MACs | mean module params | composed top-1 | vs source | mean module AUC "
             "| min AUC | decompose s | decompose / plain pass |",
             "|---|---|---|---|---|---|---|---|---|---|"]
        for k, r in curve["models"].items():
            plain = ((cost or {}).get("models", {}).get(k) or {}).get("timing", {}).get("plain_pass_median_s")
            for p in r["curve"] + r["ablations"]:
                ratio = f"{p['decompose_s'] / plain:.2f}x" if plain else "n/a"
                name = p["name"]
                if p["is_default"]:
                    name = f"**{name}**"
                t.append(f"| {r['label']} | {name} | {_pct(p['mac_fraction_mean'], 1)} | {_pct(p['param_fraction_mean'], 1)} | "
                         f"{_pct(p['composed_top1'])} | {100 * (p['composed_top1'] - r['source_top1']):+.2f} pt | "
                         f"{p['auc_mean']:.4f} | {p['auc_min']:.4f} | {p['decompose_s']:.1f} | {ratio} |")
            t.append(f"| {r['label']} | source | 100% | 100% | {_pct(r['source_top1'])} | | | | | |")
        blocks["curve"] = "\n".join(t)
    else:
        blocks["curve"] = "_not run_"

    if reuse:
        t = ["| class | taken from | composed recall | " + " | ".join(
            f"{s['label']} restricted" for s in reuse["sources_restricted"].values()) + " |",
             "|---|---|---|" + "---|" * len(reuse["sources_restricted"])]
        for c in reuse["classes"]:
            t.append(f"| {c['class']} | {c['from']} | {_pct(reuse['composed_per_class'][c['class']], 1)} | " + " | ".join(
                _pct(s["per_class"][c["class"]], 1) for s in reuse["sources_restricted"].values()) + " |")
        t.append(f"| **all ({reuse['test_images']} images)** | | **{_pct(reuse['composed_top1'])}** | " + " | ".join(
            f"{_pct(s['top1'])} ({reuse['delta_vs_each_source_pt'][k]:+.2f} pt)"
            for k, s in reuse["sources_restricted"].items()) + " |")
        blocks["reuse"] = "\n".join(t)
    else:
        blocks["reuse"] = "_not run_"

    if rep:
        t = [f"Base: {rep['base']} composed from its 10 default modules; class **{rep['class']}** (lowest "
             f"source recall) replaced by {rep['donor']}'s module ({rep['test_images']} test images).", "",
             f"| class | {rep['base']} source | composed before | composed after | {rep['donor']} source |",
             "|---|---|---|---|---|"]
        for c, v in rep["per_class"].items():
            b_ = "**" if c == rep["class"] else ""
            t.append(f"| {b_}{c}{b_} | {_pct(v['source'], 1)} | {_pct(v['before'], 1)} | {b_}{_pct(v['after'], 1)}{b_} | "
                     f"{_pct(v['donor_source'], 1)} |")
        t.append(f"| **top-1** | {_pct(rep['source_top1'][rep['base']])} | {_pct(rep['composed_top1_before'])} | "
                 f"{_pct(rep['composed_top1_after'])} ({rep['delta_pt']:+.2f} pt) | {_pct(rep['source_top1'][rep['donor']])} |")
        blocks["replace"] = "\n".join(t)
        mod = Path(rep["module"])
        blocks["replace_cli"] = (f"onnxmod replace {os.path.relpath(mod.parent.parent.parent / rep['base'] / 'modules-default', REPO)} "
                                 f"--class {rep['class']} --with {os.path.relpath(mod, REPO)} -o {os.path.relpath(rep['file'], REPO)}\n"
                                 f"onnxmod eval {os.path.relpath(rep['file'], REPO)} --data ../shared/data/cifar10 --json")
    else:
        blocks["replace"] = "_not run_"

    if serv:
        bb = serv["batch_sizes"][1]
        t = [f"| model | source MACs | composed MACs (ratio) | shared by dedup | batch 1 img/s source / composed (ratio) "
             f"| batch {bb} img/s source / composed (ratio) |", "|---|---|---|---|---|---|"]
        for k, r in serv["models"].items():
            t.append(f"| {r['label']} | {r['source_macs'] / 1e6:.1f} M | {r['composed_macs'] / 1e6:.1f} M "
                     f"({r['composed_over_source_macs']:.2f}x) | {_pct(r['shared_by_dedup'], 1)} | "
                     f"{r['batch1']['source_img_s']:.0f} / {r['batch1']['composed_img_s']:.0f} "
                     f"(**{r['batch1']['composed_over_source']:.2f}x**) | {r[f'batch{bb}']['source_img_s']:.0f} / "
                     f"{r[f'batch{bb}']['composed_img_s']:.0f} (**{r[f'batch{bb}']['composed_over_source']:.2f}x**) |")
        variants = {k: r["variant"] for k, r in serv["models"].items() if r.get("variant")}
        if variants:
            t += ["", f"With `{next(iter(variants.values()))['name']}` (`--reconstruct --shared-depth 1 --target-macs "
                  "0.9 --channel-multiple 4`: every module keeps the same re-fitted channels, so the composed model is "
                  f"one pruned network with 10 class rows), on all {next(iter(variants.values()))['test_images']} "
                  "test images:", "",
                  f"| model | composed top-1 (source) | mean module MACs | composed MACs / source | batch 1 img/s source / composed (ratio) "
                  f"| batch {bb} img/s source / composed (ratio) |", "|---|---|---|---|---|---|"]
            for k, v in variants.items():
                src_top1 = cost["models"][k]["source_top1"] if cost and k in cost["models"] else None
                t.append(f"| {serv['models'][k]['label']} | {_pct(v['composed_top1'])} "
                         f"({_pct(src_top1) if src_top1 is not None else 'n/a'}) | {_pct(v['mac_fraction_mean'], 1)} | "
                         f"{v['composed_over_source_macs']:.2f}x | "
                         f"{v['batch1']['source_img_s']:.0f} / {v['batch1']['composed_img_s']:.0f} "
                         f"(**{v['batch1']['composed_over_source']:.2f}x**) | {v[f'batch{bb}']['source_img_s']:.0f} / "
                         f"{v[f'batch{bb}']['composed_img_s']:.0f} (**{v[f'batch{bb}']['composed_over_source']:.2f}x**) |")
        t.append("")
        t.append(f"Median of {serv['repeats']} repeats after a warm-up run, source and composed measured back to back "
                 f"in the same process; {serv['threads']}. \"shared by dedup\": 1 − composed MACs / sum of module MACs.")
        blocks["serving"] = "\n".join(t)
    else:
        blocks["serving"] = "_not run_"

    if train:
        t = ["| model | ms / batch (median) | one epoch (extrapolated) | decompose + compose | epoch / (decompose + compose) |",
             "|---|---|---|---|---|"]
        for k, r in train["models"].items():
            t.append(f"| {r['label']} | {1000 * r['batch_median_s']:.0f} | {r['epoch_s_extrapolated']:.1f} s | "
                     f"{r['decompose_plus_compose_s']:.1f} s | **{r['epoch_over_decompose']:.2f}x** |")
        t.append("")
        t.append(f"Training: {train['train_images']} training images, batch {train['batch_size']} "
                 f"({train['batches_per_epoch']} batches per epoch), {train['optimizer']}, {train['augmentation']}, "
                 f"torch CPU with {train['torch_threads']} threads. **Extrapolated**: the median time of "
                 f"{train['timed_batches']} timed batches (after one warm-up batch) × {train['batches_per_epoch']}.")
        blocks["training"] = "\n".join(t)
    else:
        blocks["training"] = "_not run_"

    figs = [f for f in ("module_mac_fraction.png", "size_accuracy_curve.png") if (cfg.results / f).exists()]
    blocks["figures"] = "\n\n".join(f"![{f}]({os.path.relpath(cfg.results / f, cfg.readme.parent)})" for f in figs) \
        or "_no figures_"
    blocks["results_dir"] = os.path.relpath(cfg.results, cfg.readme.parent)
    out = tpl
    for k, v in blocks.items():
        out = out.replace("{{" + k + "}}", v)
    missing = [s for s in ("{{",) if s in out]
    if missing:
        raise RuntimeError(f"{TEMPLATE}: unfilled placeholders remain")
    return out


def load_results(results_dir: Path) -> dict[str, Any]:
    out = {}
    for name in ("machine",) + SECTIONS:
        p = results_dir / f"{name}.json"
        if p.exists():
            out[name] = json.loads(p.read_text())
    return out


# --------------------------------------------------------------------------- main
SECTION_FNS: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "cost": sec_cost, "curve": sec_curve, "reuse": sec_reuse, "replace": sec_replace,
    "serving": sec_serving, "training": sec_training,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="shared data dir holding cifar10/ and pretrained/")
    ap.add_argument("--smoke", action="store_true", help="tiny run on sample_graphs/ into a temp dir (< 60 s)")
    ap.add_argument("--only", default=None, help=f"comma-separated sections ({', '.join(SECTIONS)})")
    ap.add_argument("--readme-only", action="store_true", help="regenerate the README from the results JSON")
    ap.add_argument("--keep", action="store_true", help="--smoke: keep the temp dir (its path is printed)")
    args = ap.parse_args(argv)
    command = "python bench/run.py " + " ".join(sys.argv[1:] if argv is None else argv)

    tmp = None
    if args.smoke:
        tmp = Path(tempfile.mkdtemp(prefix="onnxmod-bench-smoke-"))
        cfg = smoke_config(tmp, command)
    else:
        data = args.data if args.data is not None else REPO.parent / "shared" / "data"
        cfg = full_config(data.resolve() if data.exists() else data, command)
        if not args.readme_only:
            for p in [cfg.calib, *(m.weights for m in cfg.models)]:
                if not p.exists():
                    print(f"bench: {p}: no such file or directory (pass --data DIR holding cifar10/ and pretrained/)",
                          file=sys.stderr)
                    return 2
    if args.readme_only:
        results = load_results(cfg.results)
        cfg.readme.write_text(render_readme(cfg, results))
        log(f"wrote {cfg.readme}")
        return 0
    sections = list(SECTIONS) if not args.only else [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        print(f"bench: unknown section(s) {', '.join(bad)}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2

    log(f"{cfg.mode} run: sections {', '.join(sections)}; work {cfg.work}; results {cfg.results}")
    machine = machine_info(cfg)
    b = Bench(cfg)
    results = load_results(cfg.results) if cfg.mode == "full" else {}
    for s in sections:
        t = time.perf_counter()
        log(f"=== {s}")
        try:
            r = SECTION_FNS[s](b)
        except Exception:
            traceback.print_exc(file=sys.stderr)
            b.failures.append(s)
            log(f"=== {s} FAILED")
            continue
        r["wall_s"] = time.perf_counter() - t
        r["command"] = f"python bench/run.py {'--smoke' if cfg.mode == 'smoke' else '--data ' + str(args.data or '../shared/data')} --only {s}"
        r["date"] = now()
        write_json(cfg.results / f"{s}.json", r)
        results[s] = r
        log(f"=== {s} done in {r['wall_s']:.1f}s")
    machine["total_s"] = time.perf_counter() - T0
    machine["loadavg_end"] = list(os.getloadavg())
    machine["sections"] = sections
    machine["failed"] = b.failures
    write_json(cfg.results / "machine.json", machine)
    results["machine"] = machine
    try:
        figs = figures(cfg, results)
        log(f"figures: {', '.join(figs)}")
        cfg.readme.write_text(render_readme(cfg, results))
        log(f"wrote {cfg.readme}")
    except Exception:
        traceback.print_exc(file=sys.stderr)
        b.failures.append("report")
    if tmp is not None:
        if args.keep or b.failures:
            log(f"smoke outputs kept in {tmp}")
        else:
            shutil.rmtree(tmp)
    log(f"total {time.perf_counter() - T0:.1f}s; " + (f"FAILED: {', '.join(b.failures)}" if b.failures else "all ok"))
    return 1 if b.failures else 0


if __name__ == "__main__":
    sys.exit(main())
