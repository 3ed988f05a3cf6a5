"""manyclasses: a 1000-class source decomposed for a few classes costs in proportion to those.

A ResNet-50-shaped source (torchvision's layout: 7x7 stem, bottlenecks 3-4-6-3, width 64, at
224x224, 1000 classes; fixed-seed random weights and randomised BatchNorm, so no download and no
../shared data) is exported with the legacy exporter. The data is an image folder: every class
has ``other_images`` images, the wanted ones ``wanted_images`` (synthetic, smooth random
images). Then, in this process, one plain onnxruntime pass of the source over exactly the images
decompose runs it on (``onnxmod.decompose.calibration_indices`` with ``--classes``; same loader
and batch size), ``decompose --classes <3 classes> --no-repair`` in a child process (timed around
the call; its peak resident memory from the kernel's accounting of that child, so the bench's own
memory does not count), alternated: ``plain_repeats`` plain passes with a decompose between each
two (medians of each). The issue's bars: decompose <= 2x a plain pass,
peak RSS <= 4 GB."""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import REPO, Bench, ManyClassesCfg, log, median

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, baked into the source
SEED = 0
NEEDS_DATA = False  # builds its own source and images


def _load(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def resnet50_shape(m: ManyClassesCfg) -> Any:
    """torchvision's ResNet-50 layout from the zoo's bottleneck (make_torch_zoo.Bottleneck: 1x1-3x3-1x1,
    stride on the 3x3, projection shortcut), fixed-seed weights, randomised BatchNorm statistics."""
    import torch
    import torch.nn as nn

    zoo = _load(REPO / "sample_graphs" / "zoo" / "make_torch_zoo.py", "onnxmod_make_torch_zoo")
    tiny = _load(REPO / "sample_graphs" / "make_tiny.py", "onnxmod_make_tiny")
    torch.manual_seed(SEED)
    w = m.width
    layers: list[nn.Module] = [zoo.cbr(3, w, 7, 2), nn.MaxPool2d(3, 2, 1)]
    cin = w
    for i, blocks in enumerate((3, 4, 6, 3)):
        mid = w * 2 ** i
        for j in range(blocks):
            layers.append(zoo.Bottleneck(cin, mid, 4 * mid, stride=2 if i and not j else 1))
            cin = 4 * mid
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, m.classes)]
    return tiny.randomise_bn(nn.Sequential(*layers), SEED)


def class_names(m: ManyClassesCfg) -> list[str]:
    return [f"c{i:04d}" for i in range(m.classes)]


def _cached(path: Path, stamp: dict[str, Any], make) -> Path:
    """``make(path)`` unless ``path`` exists with the same stamp (the generator's settings)."""
    mark = path.with_name(path.name + ".stamp")
    want = json.dumps(stamp, sort_keys=True)
    if not (path.exists() and mark.exists() and mark.read_text() == want):
        make(path)
        mark.write_text(want)
    return path


def make_source(m: ManyClassesCfg, path: Path) -> None:
    from onnxmod.converters import export

    log(f"manyclasses: export a ResNet-50-shaped source ({m.classes} classes, {m.input_size}x{m.input_size}) -> {path}")
    export(resnet50_shape(m), path, input_shape=(3, m.input_size, m.input_size), classes=class_names(m),
           mean=MEAN, std=STD, exporter="legacy")


def make_images(m: ManyClassesCfg, root: Path) -> None:
    """``root/<class>/*.png``: smooth random images (16x16 noise blown up), fixed seed."""
    import shutil

    from PIL import Image

    log(f"manyclasses: write the image folder -> {root}")
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(SEED)
    cell = max(1, m.input_size // 16)
    for k, name in enumerate(class_names(m)):
        d = root / name
        d.mkdir(parents=True)
        for i in range(m.wanted_images if k < m.wanted else m.other_images):
            low = rng.integers(0, 256, (m.input_size // cell, m.input_size // cell, 3), dtype=np.uint8)
            Image.fromarray(low.repeat(cell, 0).repeat(cell, 1)).save(d / f"{i:04d}.png")


def decompose_images(ds: Any, classes: list[str], wanted: list[str], settings: Any) -> np.ndarray:
    """The images decompose runs the source on (its calibration draw, same function and seed)."""
    from onnxmod.decompose import calibration_indices

    label_map = np.array([classes.index(c) for c in ds.classes], dtype=np.int64)
    return calibration_indices(ds, label_map, settings.calibration_per_class(len(wanted)), settings.seed,
                               [classes.index(c) for c in wanted])


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (all its threads)."""
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def plain_pass(source: Path, ds: Any, idx: np.ndarray, size: int, batch: int, device: str) -> tuple[float, float]:
    """Wall and CPU seconds of one pass (after a warm-up batch)."""
    from onnxmod import runtime

    sess = runtime.make_session(source, device=device)
    runtime.run(sess, next(ds.iter_batches(batch, size=(size, size), indices=idx[:batch]))[0])  # warm-up
    t, c = time.perf_counter(), cpu_seconds()
    for x, _ in ds.iter_batches(batch, size=(size, size), indices=idx):
        runtime.run(sess, x)
    return time.perf_counter() - t, cpu_seconds() - c


def decompose_in_child(job: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Run :func:`child` in a fresh interpreter; its result and its peak RSS in bytes (Linux ru_maxrss: KiB)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    code = "import json, sys; from bench.sections.manyclasses import child; print(json.dumps(child(json.loads(sys.argv[1]))))"
    p = subprocess.Popen([sys.executable, "-c", code, json.dumps(job)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                         text=True)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(f"manyclasses: decompose child exited {p.returncode}")
    return json.loads(out.strip().splitlines()[-1]), usage.ru_maxrss * 1024


def child(job: dict[str, Any]) -> dict[str, Any]:
    from onnxmod.decompose import DecomposeSettings, decompose

    t, c = time.perf_counter(), cpu_seconds()
    man = decompose(job["source"], job["data"], job["out"], classes=job["classes"],
                    settings=DecomposeSettings(**job["settings"]), device=job["device"], force=True, quiet=True)
    wall, cpu = time.perf_counter() - t, cpu_seconds() - c
    return {"decompose_s": wall, "decompose_cpu_s": cpu, "timings": man["timings"], "calibration_images": man["settings"]["calibration_images"],
            "stream_batch_size": man["settings"]["stream_batch_size"],
            "modules": [{"class": e["class_name"], "mac_fraction": e["mac_fraction"], "param_fraction": e["param_fraction"]}
                        for e in man["modules"]]}


def run(b: Bench) -> dict[str, Any]:
    import onnx

    from onnxmod import runtime
    from onnxmod.cost import count_macs, count_params
    from onnxmod.data import open_dataset

    cfg, m = b.cfg, b.cfg.many
    work = cfg.work / "manyclasses"
    work.mkdir(parents=True, exist_ok=True)
    stamp = {**asdict(m), "seed": SEED, "code": "v1"}
    source = _cached(work / f"resnet50_shape_{m.classes}.onnx", stamp, lambda p: make_source(m, p))
    data = _cached(work / "images", stamp, lambda p: make_images(m, p))
    settings = b.settings(repair=False)
    wanted = class_names(m)[:m.wanted]
    ds = open_dataset(data, settings.split)
    idx = decompose_images(ds, class_names(m), wanted, settings)
    model = onnx.load(str(source))
    batch = runtime.stream_batch_size(model, settings.batch_size)
    job = {"source": str(source), "data": str(data), "out": str(work / "modules"), "classes": wanted,
           "settings": asdict(settings), "device": cfg.device}

    # plain, decompose, plain, decompose, plain: the load of a shared machine drifts
    plain: list[tuple[float, float]] = []
    runs: list[dict[str, Any]] = []
    load = [os.getloadavg()[0]]
    for i in range(cfg.plain_repeats):
        log(f"manyclasses: plain ORT pass over the {len(idx)} images decompose runs the source on (batch {batch})")
        plain.append(plain_pass(source, ds, idx, m.input_size, batch, cfg.device))
        if i == cfg.plain_repeats - 1:
            break
        log(f"manyclasses: decompose --classes {','.join(wanted)} --no-repair in a child process")
        t = time.perf_counter()
        dec, rss = decompose_in_child(job)
        runs.append({**dec, "process_s": time.perf_counter() - t, "peak_rss_bytes": rss})
        if dec["calibration_images"] != len(idx) or dec["stream_batch_size"] != batch:
            raise RuntimeError(f"manyclasses: decompose ran on {dec['calibration_images']} images at batch "
                               f"{dec['stream_batch_size']}, the plain pass on {len(idx)} at {batch}")
        load.append(os.getloadavg()[0])
    plain_s, plain_cpu_s = median([w for w, _ in plain]), median([c for _, c in plain])
    dec_s, dec_cpu_s = median([r["decompose_s"] for r in runs]), median([r["decompose_cpu_s"] for r in runs])
    rss = max(r["peak_rss_bytes"] for r in runs)
    log(f"manyclasses: decompose {dec_s:.1f}s = {dec_s / plain_s:.2f}x a plain pass ({plain_s:.1f}s); "
        f"peak RSS {rss / 1e9:.2f} GB")
    return {
        "section": "manyclasses", "bars": {"decompose_over_plain_max": 2.0, "peak_rss_gb_max": 4.0},
        "source": {"arch": "ResNet-50 layout (7x7 stem, bottlenecks 3-4-6-3), fixed-seed random weights, randomised "
                           "BatchNorm", **asdict(m), "file": str(source), "exporter": "legacy",
                   "macs": count_macs(model), "params": count_params(model)},
        "data": {"format": "image folder (PNG)", "images": len(ds), "classes": len(ds.classes),
                 "wanted_classes": wanted},
        "flags": f"--classes {','.join(wanted)} --no-repair", "settings": asdict(settings),
        "calibration_images": int(len(idx)), "stream_batch_size": batch,
        "plain_pass_s": [w for w, _ in plain], "plain_pass_median_s": plain_s,
        "plain_pass_cpu_s": [c for _, c in plain], "plain_pass_cpu_median_s": plain_cpu_s,
        "decompose_runs": runs, "decompose_median_s": dec_s, "decompose_cpu_median_s": dec_cpu_s,
        "decompose_over_plain": dec_s / plain_s, "decompose_over_plain_cpu": dec_cpu_s / plain_cpu_s,
        "peak_rss_bytes": rss, "loadavg_1min": load,
    }
