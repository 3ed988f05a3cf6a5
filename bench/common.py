"""Shared bench state: configuration, the Bench context (sources, cached decompositions,
evaluation through :mod:`onnxmod.evaluate`), and small helpers every section uses."""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import re
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace as dc_replace
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
MEAN = (0.485, 0.456, 0.406)  # SOURCES.md: the pretrained CIFAR ResNets
STD = (0.229, 0.224, 0.225)
SCHEMA = 2  # results written by this layout of bench/ (older JSON is not rendered)

# Pan & Rajan, ICSE 2022 ("Decomposing Convolutional Neural Networks into Reusable and
# Replaceable Modules"), as quoted in issue 10
PAPER = {
    "decomposition_loss_pt": 1.77,  # top-1 lost by the model composed from all modules
    "reuse_loss_pt": 2.3,
    "replace_loss_pt": 0.5,
    "co2e_ratio": 37.0,  # times less CO2e than retraining
}
# the checkpoints' training (SOURCES.md: akamaster, 200 epochs over the 50,000 training images)
SOURCE_TRAINING = {"epochs": 200, "images": 50000}

T0 = time.perf_counter()


def log(msg: str) -> None:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%H:%M:%S")
    print(f"[bench {stamp} +{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


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
class ManyClassesCfg:
    """The manyclasses section: a ResNet-50-shaped source with many classes, decomposed for a few."""

    input_size: int = 224
    classes: int = 1000
    width: int = 64  # stem width (ResNet-50: 64; bottleneck widths 1x, 2x, 4x, 8x it)
    wanted: int = 3  # --classes: the first this many classes
    wanted_images: int = 128  # images of each wanted class in the data
    other_images: int = 2  # images of each other class in the data


@dataclass
class Cifar100Cfg:
    """The cifar100 section: the project's CIFAR-100 source (bench/train_source.py), all 100 modules and a sub-task."""

    data: Path | None  # image folder with train/ and test/ (None: a tiny generated one, and a source trained on it)
    checkpoint: Path | None  # bench/train_source.py's checkpoint, its .json beside it (None: trained on `data` here)
    arch: str = "resnet20"
    # one CIFAR-100 superclass ("vehicles 1"); its model's budget sits below the bar's 0.3x by the 0.03 tolerance
    subtask: list[str] = field(default_factory=lambda: ["bicycle", "bus", "motorcycle", "pickup_truck", "train"])
    subtask_composed_macs: float = 0.27
    read_repeats: int = 2  # eval of the test folder and of the same images from an npz, alternated this many times


@dataclass
class Config:
    mode: str  # "full" | "smoke"
    models: list[ModelCfg]
    calib: Path  # train split: calibration, held-out selection images, training-epoch timing
    test: Path
    work: Path
    results: Path
    readme: Path
    top_readme: Path | None  # README.md whose "Choosing settings" block is regenerated
    device: str = "auto"
    settings_overrides: dict[str, Any] = field(default_factory=dict)  # DecomposeSettings fields
    test_limit: int | None = None  # class-balanced test subset for every section (None: all)
    curve_targets: list[float] = field(default_factory=lambda: [0.35, 0.5, 0.65])
    curve_limit: int | None = 2000  # class-balanced test subset for the non-default curve points
    subset_model: str = "resnet56"
    subset_classes: list[str] = field(default_factory=lambda: ["cat", "dog"])
    # subset rows sized by the deployed model (--composed-macs), each on labelled and on unlabelled calibration data
    subset_budgeted: list[tuple[list[str], float]] = field(default_factory=lambda: [
        (["cat", "dog"], 0.25), (["airplane", "automobile", "ship", "truck"], 0.25)])
    reuse: list[tuple[str, list[str]]] = field(default_factory=list)  # (model key, classes) twice
    heldout_per_class: int = 200  # replace: training images per class the weakest class is chosen on
    heldout_min_per_class: int = 20  # fewer than this in some class: fall back (and say so)
    plain_repeats: int = 3
    plain_budget_s: float = 40.0
    train_batch_size: int = 128
    train_batches: int | None = None  # time: timed training batches, extrapolated (None: one whole epoch)
    serve_repeats: int = 3
    serve_b1_images: int = 40
    serve_big_batch: int = 256
    command: str = ""
    model_filter: list[str] | None = None  # --models: per-model sections run only these
    curve_models: list[str] | None = None  # the curve runs on these models only (None: all)
    variant_models: list[str] | None = None  # serving: the shared-trunk variant on these only (None: all)
    many: ManyClassesCfg = field(default_factory=ManyClassesCfg)
    c100: Cifar100Cfg = field(default_factory=lambda: Cifar100Cfg(None, None))

    @property
    def run_models(self) -> list[ModelCfg]:
        return [m for m in self.models if self.model_filter is None or m.key in self.model_filter]

    def model(self, key: str) -> ModelCfg:
        for m in self.models:
            if m.key == key:
                return m
        raise KeyError(f"no model '{key}' in this configuration ({', '.join(m.key for m in self.models)})")


# serving: a composed model meant to replace its source: every layer shared (one pruned,
# repaired trunk + one row per class), default target
SERVING_VARIANT = ("shared_depth=1", {"shared_depth": 1.0})


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
        top_readme=REPO / "README.md",
        reuse=[("resnet20", ["airplane", "cat"]), ("resnet56", ["dog", "truck"])],
        c100=Cifar100Cfg(data / "cifar100", BENCH / "models" / "cifar100_resnet20.th"),
        command=command,
    )


def smoke_config(tmp: Path, command: str) -> Config:
    sg = REPO / "sample_graphs"
    readme = tmp / "README.md"
    shutil.copyfile(REPO / "README.md", readme)  # the choosing-settings block is rewritten in the copy
    return Config(
        mode="smoke",
        models=[
            ModelCfg("r8legacy", "ResNet8 (legacy export)", 8, sg / "resnet8_cifar10.th", "legacy", None),
            ModelCfg("r8dynamo", "ResNet8 (dynamo export)", 8, sg / "resnet8_cifar10.th", "dynamo", None),
        ],
        calib=sg / "cifar10_calib.npz",
        test=sg / "cifar10_test.npz",
        work=tmp / "work",
        results=tmp / "results",
        readme=tmp / "bench-README.md",
        top_readme=readme,
        device="cpu",
        # small repair budgets: the smoke run checks code paths, not accuracy
        settings_overrides={"repair_epochs": 0.5, "repair_min_steps": 2, "samples_per_class": 30,
                            "platt_images": 100, "refit_images": 100, "cov_images": 200},
        curve_targets=[0.5, 0.65],
        curve_limit=200,
        curve_models=["r8legacy"],
        variant_models=["r8legacy"],
        subset_model="r8dynamo",
        subset_budgeted=[(["cat", "dog"], 0.5)],
        reuse=[("r8legacy", ["airplane", "cat"]), ("r8dynamo", ["dog", "truck"])],
        heldout_per_class=10,
        heldout_min_per_class=5,
        plain_repeats=2,
        plain_budget_s=3.0,
        serve_repeats=2,
        serve_b1_images=10,
        serve_big_batch=64,
        many=ManyClassesCfg(input_size=64, classes=50, width=8, wanted_images=8, other_images=1),
        c100=Cifar100Cfg(None, None, arch="resnet8", subtask=["c000", "c001", "c002", "c003", "c004"],
                         subtask_composed_macs=0.5, read_repeats=1),
        command=command,
    )


# --------------------------------------------------------------------------- JSON
def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(path: Path, obj: Any) -> None:
    from onnxmod.modelio import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(obj, indent=2, default=_json_default))


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


# --------------------------------------------------------------------------- data views
def balanced_indices(labels: np.ndarray, per_class: int | None, seed: int = 0,
                     among: np.ndarray | None = None) -> np.ndarray:
    """Up to ``per_class`` indices of each class (from ``among``, default all), sorted."""
    pool = np.arange(len(labels), dtype=np.int64) if among is None else np.asarray(among, dtype=np.int64)
    if per_class is None:
        return np.sort(pool)
    rng = np.random.default_rng(seed)
    idx = [rng.permutation(pool[labels[pool] == c])[:per_class] for c in np.unique(labels[pool])]
    return np.sort(np.concatenate(idx)).astype(np.int64) if idx else np.zeros(0, np.int64)


def subset_view(ds: Any, indices: np.ndarray, what: str) -> Any:
    """A Dataset holding only ``ds``'s images at ``indices`` (so onnxmod.evaluate sees just them)."""
    from onnxmod.data import Dataset

    idx = np.asarray(indices, dtype=np.int64)

    class SubsetView(Dataset):
        format = ds.format

        def __init__(self) -> None:
            self.path = Path(f"{ds.path} [{what}]")
            self.classes = list(ds.classes)
            self.labels = ds.labels[idx]
            self.image_size = ds.image_size
            self.channels = ds.channels

        def _load(self, sub: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
            return ds._load(idx[sub], size)

    return SubsetView()


def class_view(ds: Any, names: list[str], what: str) -> Any:
    """``ds``'s images of classes ``names`` (subset_view), described as "<what> of <names>"."""
    want = [ds.classes.index(n) for n in names]
    return subset_view(ds, np.nonzero(np.isin(ds.labels, want))[0].astype(np.int64), f"{what} of {', '.join(names)}")


# --------------------------------------------------------------------------- graphs
def restricted_source(source: Any, names: list[str]) -> Any:
    """The source with only the logits of classes ``names`` (argmax over those columns): the
    best the source can do on that sub-task without retraining. A plain ONNX graph (a Gather
    appended), so onnxmod.evaluate scores it like any source."""
    import onnx
    from onnx import helper, numpy_helper

    from onnxmod import modelio
    from onnxmod.evaluate import model_class_names

    m = onnx.ModelProto()
    m.CopyFrom(source)
    classes = model_class_names(m)
    cols = np.array([classes.index(n) for n in names], dtype=np.int64)
    g = m.graph
    out = g.output[0]
    inner = out.name + "__all"
    for n in g.node:
        n.output[:] = [inner if o == out.name else o for o in n.output]
        n.input[:] = [inner if i == out.name else i for i in n.input]
    g.initializer.append(numpy_helper.from_array(cols, "__bench_restrict_cols"))
    g.node.append(helper.make_node("Gather", [inner, "__bench_restrict_cols"], [out.name], axis=1,
                                   name="__bench_restrict"))
    out.type.tensor_type.shape.dim[1].dim_value = len(names)
    modelio.set_meta(m, {modelio.CLASSES: list(names)})
    return m


def eval_restricted(source: Any, names: list[str], images: Any, device: str) -> dict[str, Any]:
    """``source`` restricted to the logits of ``names`` (restricted_source), scored on ``images`` with per-image
    hits (for bench.common.paired)."""
    from onnxmod.evaluate import evaluate_source

    return evaluate_source(restricted_source(source, names), images, device=device, quiet=True, hits=True)


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


def kept_overlap(man: dict[str, Any], group_sizes: dict[int, int]) -> dict[str, Any]:
    """Mean pairwise Jaccard overlap of the modules' kept channels in the class-specific
    groups (manifest ``class_specific_groups``), counting only groups some module prunes."""
    mods = man["modules"]
    specific = [int(g) for g in man.get("class_specific_groups") or []]
    kept = [{int(g): set(ix) for g, ix in m.get("kept_channels", {}).items()} for m in mods]
    pruned = [g for g in specific if any(len(k.get(g, ())) < group_sizes[g] for k in kept)]
    sets = [{(g, c) for g in pruned for c in k.get(g, ())} for k in kept]
    pairs = [(i, j) for i in range(len(sets)) for j in range(i + 1, len(sets))]
    jac = [len(sets[i] & sets[j]) / len(sets[i] | sets[j]) for i, j in pairs] if pruned else []
    per_group = {}
    for g in pruned:
        vals = [len(kept[i][g] & kept[j][g]) / max(1, len(kept[i][g] | kept[j][g])) for i, j in pairs]
        per_group[str(g)] = {"size": group_sizes[g], "mean_jaccard": float(np.mean(vals)) if vals else None,
                             "kept_mean": float(np.mean([len(k[g]) for k in kept]))}
    return {"class_specific_groups": len(specific), "counted_groups": len(pruned),
            "channels_in_counted_groups": int(sum(group_sizes[g] for g in pruned)),
            "module_pairs": len(pairs), "mean_jaccard": float(np.mean(jac)) if jac else None,
            "min_jaccard": float(np.min(jac)) if jac else None, "max_jaccard": float(np.max(jac)) if jac else None,
            "per_group": per_group}


def _package_digest() -> str:
    """Digest of onnxmod's source: cached decompositions are reused only by the same code."""
    h = hashlib.sha256()
    for p in sorted((REPO / "onnxmod").rglob("*.py")):
        h.update(p.relative_to(REPO).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- context
class Bench:
    """Shared state: datasets, exported sources, decompositions (memoised in this process and
    cached on disk under ``work/`` by a key of source, settings, classes, data and onnxmod's
    code, so sections run in separate commands reuse them), evaluation through onnxmod.evaluate."""

    def __init__(self, cfg: Config):
        from onnxmod.decompose import DecomposeSettings

        self.cfg = cfg
        self.default = DecomposeSettings(**cfg.settings_overrides)
        self.default.validate()
        cfg.work.mkdir(parents=True, exist_ok=True)
        cfg.results.mkdir(parents=True, exist_ok=True)
        self._code = _package_digest()
        self._source: dict[str, Path] = {}
        self._runs: dict[str, dict[str, Any]] = {}  # cache key -> manifest (decomposed or reused here)
        self._eval_cache: dict[tuple[str, str], dict[str, Any]] = {}
        self.failures: list[str] = []

    # ---------------------------------------------------------------- data (opened on first use: some sections need none)
    @functools.cached_property
    def test_full(self) -> Any:
        from onnxmod.data import open_dataset

        return open_dataset(self.cfg.test, "test")

    @functools.cached_property
    def test_idx(self) -> np.ndarray:
        limit = self.cfg.test_limit
        return balanced_indices(self.test_full.labels,
                                None if limit is None else max(1, limit // len(self.test_full.classes)))

    @functools.cached_property
    def test(self) -> Any:
        if self.cfg.test_limit is None:
            return self.test_full
        return subset_view(self.test_full, self.test_idx, f"{len(self.test_idx)}-image balanced subset")

    @functools.cached_property
    def train(self) -> Any:
        from onnxmod.data import open_dataset

        return open_dataset(self.cfg.calib, "train")

    # ---------------------------------------------------------------- sources
    def source(self, key: str) -> Path:
        """The exported source ONNX (exported once per work dir; checkpoint digest checked)."""
        if key in self._source:
            return self._source[key]
        import torch

        from onnxmod.converters import CIFAR10_CLASSES, export, load_checkpoint, resnet_cifar
        from onnxmod.modelio import file_sha256

        m = self.cfg.model(key)
        out = self.cfg.work / f"{key}.onnx"
        stamp = out.with_suffix(".weights-sha256")
        want = f"{file_sha256(m.weights)} {m.exporter}"
        if not (out.exists() and stamp.exists() and stamp.read_text() == want):
            log(f"export {m.label}: {m.weights.name} with the {m.exporter} exporter -> {out}")
            torch.manual_seed(0)
            net = load_checkpoint(resnet_cifar(m.depth), m.weights)
            export(net, out, classes=CIFAR10_CLASSES, mean=MEAN, std=STD, exporter=m.exporter)
            stamp.write_text(want)
        self._source[key] = out
        return out

    def source_info(self, key: str) -> dict[str, Any]:
        import onnx

        from onnxmod.cost import count_macs, count_params
        from onnxmod.graphio import opset_version

        model = onnx.load(str(self.source(key)))
        return {"file": str(self.source(key)), "exporter": self.cfg.model(key).exporter,
                "opset": opset_version(model), "params": count_params(model), "macs": count_macs(model)}

    def group_sizes(self, key: str) -> dict[int, int]:
        from onnxmod import channels
        from onnxmod.decompose import prepare_source

        analysis = channels.analyze(prepare_source(self.source(key)).model, canonical=True)
        return {g.id: g.size for g in analysis.groups}

    # ---------------------------------------------------------------- evaluation (onnxmod.evaluate)
    def eval_source(self, key: str, dataset: Any = None, tag: str = "test") -> dict[str, Any]:
        from onnxmod.evaluate import evaluate_source

        ds = self.test if dataset is None else dataset
        memo = (f"source:{key}", tag)
        if memo not in self._eval_cache:
            log(f"{key}: source on {tag} ({len(ds)} images)")
            self._eval_cache[memo] = evaluate_source(self.source(key), ds, device=self.cfg.device, quiet=True, hits=True)
        return self._eval_cache[memo]

    def eval_composed(self, model: Any, dataset: Any = None, what: str = "composed") -> dict[str, Any]:
        from onnxmod.evaluate import evaluate_composed

        ds = self.test if dataset is None else dataset
        log(f"{what}: evaluate on {len(ds)} images")
        return evaluate_composed(model, ds, device=self.cfg.device, quiet=True, hits=True)

    def eval_modules(self, d: Path, man: dict[str, Any]) -> list[dict[str, Any]]:
        """Each module's binary accuracy / AUC of its calibrated score (onnxmod.evaluate_module)."""
        from onnxmod.evaluate import evaluate_module

        log(f"{d.name}: {len(man['modules'])} modules, binary AUC on {len(self.test)} images")
        return [evaluate_module(d / m["file"], self.test, device=self.cfg.device, quiet=True)
                for m in man["modules"]]

    # ---------------------------------------------------------------- decompose / compose
    def settings(self, **kw: Any) -> Any:
        return dc_replace(self.default, **kw)

    @functools.cached_property
    def unlabelled_train(self) -> Path:
        """The training split as an .npz without labels (8-bit, exact for CIFAR): what a user without labels has."""
        from onnxmod.data import write_npz

        path = self.cfg.work / "train_unlabelled.npz"
        if not path.exists():
            log(f"write the {len(self.train)} training images without labels -> {path}")
            x = np.concatenate([np.round(xb * 255.0).astype(np.uint8).transpose(0, 2, 3, 1)
                                for xb, _ in self.train.iter_batches(1024)])
            tmp = path.with_name(".tmp-" + path.name)
            np.savez(tmp, x=x)
            tmp.replace(path)
        return path

    def _key(self, key: str, settings: Any, classes: list[str] | None, calib: Path) -> str:
        from onnxmod.modelio import file_sha256

        blob = json.dumps({"source": file_sha256(self.source(key)), "settings": asdict(settings),
                           "classes": classes, "calib": str(calib), "code": self._code,
                           "device": self.cfg.device}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def decompose(self, key: str, settings: Any, classes: list[str] | None = None,
                  fresh: bool = False, unlabelled: bool = False) -> tuple[Path, dict[str, Any]]:
        """Module dir ``work/<key>/modules-<settings>`` and its manifest. Reuses a decomposition
        this process made, or (unless ``fresh``) one on disk with the same cache key;
        ``manifest['bench']`` says which, and the wall time of the run that made it.
        ``unlabelled``: calibrate on the training images without their labels."""
        from onnxmod.decompose import decompose

        calib = self.unlabelled_train if unlabelled else self.cfg.calib
        ck = self._key(key, settings, classes, calib)
        tag = "modules-" + re.sub(r"[^A-Za-z0-9_.=-]+", "_", settings_label(settings, self.default))
        if classes:
            tag += "-" + "_".join(classes)
        if unlabelled:
            tag += "-unlabelled"
        d = self.cfg.work / key / tag
        if ck in self._runs and not (fresh and self._runs[ck]["bench"]["reused_from_disk"]):
            return d, self._runs[ck]
        stamp = d / "bench-cache-key"
        if not fresh and stamp.exists() and stamp.read_text() == ck and (d / "manifest.json").exists():
            man = json.loads((d / "manifest.json").read_text())
            man["bench"] = {**json.loads((d / "bench-run.json").read_text()), "reused_from_disk": True}
            log(f"{key}: reusing {d} (same source, settings, data and onnxmod code)")
        else:
            log(f"{key}: decompose ({settings_label(settings, self.default)}"
                f"{'; classes ' + ','.join(classes) if classes else ''}) -> {d}")
            shutil.rmtree(d, ignore_errors=True)  # bench's own cache dir: decompose never replaces a dir it did not write
            t = time.perf_counter()
            man = decompose(self.source(key), calib, d, classes=classes, settings=settings,
                            device=self.cfg.device, force=True, quiet=True)
            run = {"wall_s": time.perf_counter() - t, "date": now(), "cache_key": ck}
            (d / "bench-run.json").write_text(json.dumps(run))
            stamp.write_text(ck)
            man["bench"] = {**run, "reused_from_disk": False}
            log(f"{key}: decompose {tag} took {run['wall_s']:.1f}s (repair {man['timings'].get('repair_s', 0):.1f}s)")
        self._runs[ck] = man
        return d, man

    def compose_dir(self, d: Path, man: dict[str, Any]) -> tuple[Any, float]:
        from onnxmod.compose import compose

        t = time.perf_counter()
        model = compose([d / m["file"] for m in man["modules"]])
        return model, time.perf_counter() - t


def settings_label(settings: Any, default: Any) -> str:
    """The knobs that differ from the bench default, as CLI-ish text."""
    diff = {k: v for k, v in asdict(settings).items() if asdict(default).get(k) != v}
    return ", ".join(f"{k}={v}" for k, v in diff.items()) or "default"


def settings_dict(s: Any) -> dict[str, Any]:
    return asdict(s)


def pt(a: float, b: float) -> float:
    """a - b in percentage points."""
    return 100.0 * (a - b)


def paired(model: dict[str, Any], *baselines: dict[str, Any]) -> dict[str, Any]:
    """Top-1 of ``model`` minus the mean top-1 of ``baselines``, all scored on the same images
    (``evaluate_*(..., hits=True)``), in pt, with its paired standard error (per image: the
    model's hit minus the baselines' mean hit). Single runs differ by less than ~2 se by chance."""
    for base in baselines:
        if not np.array_equal(base["indices"], model["indices"]):
            raise ValueError(f"paired: {model['model']} and {base['model']} were scored on different images")
    d = model["hits"].astype(np.float64) - np.mean([base["hits"] for base in baselines], axis=0)
    return {"delta_pt": 100.0 * float(d.mean()), "se_pt": 100.0 * float(d.std(ddof=1) / np.sqrt(len(d))),
            "discordant_images": int((d != 0).sum()), "images": int(len(d))}
