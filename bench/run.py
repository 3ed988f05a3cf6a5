#!/usr/bin/env python
"""onnxmod benchmarks (docs/DESIGN.md "Benchmarks"; issue 10).

    python bench/run.py --data ../shared/data                 # every section
    python bench/run.py --data ../shared/data --only cost,time --models resnet56
    python bench/run.py --smoke                               # tiny run on sample_graphs/ in a temp dir (CI)
    python bench/run.py --readme-only                         # bench/README.md + README's block from the JSON

Sections (``--only a,b``; one file each under bench/sections/):
  cost     source vs the model composed from all modules (default flags, and --no-repair), full
           test set: top-1, loss, module / composed MACs, kept-channel Jaccard overlap
  curve    loss vs mean module MACs: training-free / reconstruct / repair at a few targets
  subset   decompose --classes cat,dog, 2 modules composed vs the source restricted to 2 logits
  reuse    2 classes from each model composed vs the sources restricted to the same 4 logits
  replace  the weaker model's weakest class (chosen on training images) from the stronger model
  time     decompose ÷ one plain inference pass, ÷ one training epoch (same images, same process)
  serving  composed vs source throughput in onnxruntime
  manyclasses  a ResNet-50-shaped 1000-class source at 224 (synthetic weights and images, no --data):
           decompose --classes (3) --no-repair ÷ one plain pass over the same images, and its peak RSS

``--device auto`` (default) trains repair in torch on CUDA when torch sees a GPU and runs
onnxruntime on CUDA only when its CUDA provider loads (``--device cuda`` insists on both).
``--out DIR`` writes work/, results/ and the READMEs under DIR (quick checks with the knobs of
``--help``'s last group, which the JSON and README record as not the published configuration).

Results: one JSON per section in bench/results/ (per-model sections merge by model, so runs of
single sections or models combine), bench/README.md from bench/README.template.md, and the
"Choosing settings" block of README.md, all from that JSON. Decompositions are cached in
bench/work/ by source, settings, data and onnxmod's code, so sections run in separate commands
share them (the time section always decomposes afresh). Any failure prints its traceback and
makes the run exit 1 (the other sections still run).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python bench/run.py` puts bench/ first; the bench package lives at REPO
    sys.path.insert(0, str(REPO))

from bench import report  # noqa: E402
from bench.common import SCHEMA, T0, Bench, Config, full_config, log, now, read_json, smoke_config, write_json  # noqa: E402
from bench.sections import SECTIONS  # noqa: E402
from onnxmod.errors import OnnxmodError  # noqa: E402


def machine_info(cfg: Config) -> dict[str, Any]:
    import numpy as np
    import onnx
    import onnxruntime
    import torch

    from onnxmod import runtime
    from onnxmod.repair import torch_device

    cpu = "?"
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), "?")
    except OSError as e:
        cpu = f"? ({type(e).__name__})"
    dev = torch_device(cfg.device)

    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", "--no-optional-locks", "-C", str(REPO), *a], capture_output=True, text=True,
                                  check=False).stdout.strip()
        except OSError:  # no git where the bench runs (e.g. a copied tree)
            return ""

    return {
        "date": now(), "cpu": cpu, "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg_start": list(os.getloadavg()), "python": platform.python_version(), "platform": platform.platform(),
        "device_flag": cfg.device, "torch_device": str(dev),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "ort_providers_available": onnxruntime.get_available_providers(),
        "ort_device": "cuda" if cfg.device != "cpu" and runtime.probe_cuda() else "cpu",
        "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__, "numpy": np.__version__,
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "git_commit": git("rev-parse", "HEAD") or None, "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "mode": cfg.mode, "command": cfg.command,
    }


def merge(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """A per-model section's new results over the old ones of the other models. A section that measured
    nothing here (``skipped``: e.g. cuda on a machine without CUDA) leaves earlier measurements as they are."""
    if not old or old.get("schema") != SCHEMA or "models" not in new or "models" not in old:
        return new
    if new.get("skipped") and old["models"]:
        return old
    return {**new, "models": {**old["models"], **new["models"]}}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None,
                    help="dir holding cifar10/ (cifar-10-batches-py: batches.meta, data_batch_*, test_batch) and "
                         "pretrained/*.th; default ../shared/data")
    ap.add_argument("--smoke", action="store_true", help="tiny run on sample_graphs/ into a temp dir")
    ap.add_argument("--only", default=None, help=f"comma-separated sections ({', '.join(SECTIONS)})")
    ap.add_argument("--models", default=None, help="per-model sections (cost, curve, time, serving) run only these")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                    help="onnxruntime and repair device (default auto; --smoke: cpu)")
    ap.add_argument("--readme-only", action="store_true", help="regenerate the READMEs from the results JSON")
    ap.add_argument("--out", type=Path, default=None,
                    help="write work/, results/ and the READMEs under this dir instead of bench/ (quick checks)")
    ap.add_argument("--keep", action="store_true", help="--smoke: keep the temp dir (its path is printed)")
    quick = ap.add_argument_group("quick checks (recorded in the JSON; not the published configuration)")
    quick.add_argument("--test-limit", type=int, default=None, help="class-balanced test subset of this many images")
    quick.add_argument("--samples-per-class", type=int, default=None, help="DecomposeSettings.samples_per_class")
    quick.add_argument("--repair-epochs", type=float, default=None, help="DecomposeSettings.repair_epochs")
    quick.add_argument("--repair-min-steps", type=int, default=None, help="DecomposeSettings.repair_min_steps")
    quick.add_argument("--composed-macs", type=float, default=None,
                       help="DecomposeSettings.composed_macs (the budget of all modules composed)")
    quick.add_argument("--curve-targets", default=None, help="comma-separated target_macs for the curve")
    quick.add_argument("--train-batches", type=int, default=None,
                       help="time: time this many training batches and extrapolate to an epoch")
    return ap.parse_args(argv)


def make_config(args: argparse.Namespace, command: str) -> tuple[Config, Path | None]:
    tmp = None
    if args.smoke:
        tmp = Path(tempfile.mkdtemp(prefix="onnxmod-bench-smoke-"))
        cfg = smoke_config(tmp, command)
    else:
        data = (args.data if args.data is not None else REPO.parent / "shared" / "data").resolve()
        cfg = full_config(data, command)
    if args.device:
        cfg.device = args.device
    if args.models:
        cfg.model_filter = [k.strip() for k in args.models.split(",") if k.strip()]
    if args.test_limit is not None:
        cfg.test_limit = args.test_limit
    for field in ("samples_per_class", "repair_epochs", "repair_min_steps", "composed_macs"):  # DecomposeSettings fields
        if getattr(args, field) is not None:
            cfg.settings_overrides[field] = getattr(args, field)
    if args.out is not None:
        out = args.out.resolve()
        out.mkdir(parents=True, exist_ok=True)
        cfg.work, cfg.results, cfg.readme = out / "work", out / "results", out / "bench-README.md"
        if cfg.top_readme is not None and cfg.top_readme.parent == REPO:  # rewrite a copy, not the repo's README
            cfg.top_readme = Path(shutil.copyfile(REPO / "README.md", out / "README.md"))
    if args.curve_targets:
        cfg.curve_targets = [float(t) for t in args.curve_targets.split(",")]
    if args.train_batches is not None:
        cfg.train_batches = args.train_batches
    return cfg, tmp


def needs_data(sections: list[str]) -> bool:
    return any(getattr(SECTIONS[s], "NEEDS_DATA", True) for s in sections)


def check_inputs(cfg: Config, sections: list[str]) -> str | None:
    keys = [m.key for m in cfg.models]
    if cfg.model_filter and set(cfg.model_filter) - set(keys):
        return f"--models: unknown model(s) {', '.join(set(cfg.model_filter) - set(keys))}; choose from {', '.join(keys)}"
    for p in [cfg.calib, *(m.weights for m in cfg.models)] if needs_data(sections) else []:
        if not p.exists():
            return f"{p}: no such file or directory (pass --data DIR holding cifar10/ and pretrained/)"
    return None


def run_section(b: Bench, name: str, machine: dict[str, Any]) -> bool:
    cfg = b.cfg
    t = time.perf_counter()
    log(f"=== {name}")
    try:
        r = SECTIONS[name].run(b)
    except Exception:
        traceback.print_exc(file=sys.stderr)
        log(f"=== {name} FAILED")
        return False
    run = {"date": now(), "wall_s": time.perf_counter() - t, "command": cfg.command, "device": cfg.device,
           "settings_overrides": cfg.settings_overrides, "test_limit": cfg.test_limit,
           "test_images": len(b.test) if needs_data([name]) else None,
           "machine": {k: machine[k] for k in ("cpu", "usable_cpus", "torch_device", "gpu", "ort_device", "git_commit")}}
    for entry in r.get("models", {}).values():
        entry["run"] = run
    r.update(schema=SCHEMA, run=run)
    path = cfg.results / f"{name}.json"
    write_json(path, merge(read_json(path), r) if cfg.mode == "full" else r)
    log(f"=== {name} done in {run['wall_s']:.1f}s -> {path}")
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python bench/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    cfg, tmp = make_config(args, command)
    if args.readme_only:
        report.write_all(cfg)
        return 0
    sections = list(SECTIONS) if not args.only else [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    problem = (f"unknown section(s) {', '.join(bad)}; choose from {', '.join(SECTIONS)}" if bad
               else check_inputs(cfg, sections))
    if problem:
        print(f"bench: error: {problem}", file=sys.stderr)
        return 2

    log(f"{cfg.mode} run: sections {', '.join(sections)}; device {cfg.device}; work {cfg.work}; results {cfg.results}")
    try:
        machine = machine_info(cfg)
    except OnnxmodError as e:  # e.g. --device cuda where torch sees no GPU
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    log(f"torch device {machine['torch_device']}{' (' + machine['gpu'] + ')' if machine['gpu'] else ''}, "
        f"onnxruntime {machine['ort_device']}, {machine['usable_cpus']} CPUs")
    b = Bench(cfg)
    failures = [s for s in sections if not run_section(b, s, machine)]
    machine.update(total_s=time.perf_counter() - T0, loadavg_end=list(os.getloadavg()), sections=sections,
                   failed=failures)
    write_json(cfg.results / "machine.json", machine)
    try:
        report.write_all(cfg)
    except Exception:
        traceback.print_exc(file=sys.stderr)
        failures.append("report")
    if tmp is not None:
        if args.keep or failures:
            log(f"smoke outputs kept in {tmp}")
        else:
            shutil.rmtree(tmp)
    log(f"total {time.perf_counter() - T0:.1f}s; " + (f"FAILED: {', '.join(failures)}" if failures else "all ok"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
