"""README rendering: bench/README.md from bench/README.template.md, the figures, and the
"Choosing settings" block of the top-level README (between its bench markers). Every number
is read from the results JSON; a section without results of this bench version says so."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import BENCH, PAPER, SCHEMA, SOURCE_TRAINING, Config, log, read_json

TEMPLATE = BENCH / "README.template.md"
SECTION_NAMES = ("cost", "curve", "subset", "reuse", "replace", "time", "serving", "manyclasses", "cifar100", "cuda")


def load_results(results_dir: Path, other_runs: bool = True) -> dict[str, Any]:
    """Section results of ``results_dir``. Each sub-directory holds another run of some sections, shown apart and
    never mixed into the main tables: on another machine (e.g. ``h200/``, shown in section 10), or on this one
    with changed decompose settings (e.g. ``repair_epochs_10/``, whose runs record ``settings_overrides``;
    shown in section 6)."""
    out: dict[str, Any] = {}
    for name in ("machine",) + SECTION_NAMES:
        r = read_json(results_dir / f"{name}.json")
        if r is not None and (name == "machine" or r.get("schema") == SCHEMA):
            out[name] = r
    if other_runs and results_dir.is_dir():
        others = {d.name: load_results(d, False) for d in sorted(results_dir.iterdir()) if d.is_dir()}
        out["other_runs"] = {k: v for k, v in others.items() if set(v) - {"machine"}}
    return out


def _overrides(run_results: dict[str, Any]) -> dict[str, Any]:
    """The decompose settings a run changed (``bench/run.py --repair-epochs`` etc.); empty for the defaults."""
    return next((o for s in ("cost", "time") if (o := _get(run_results, s, "run", "settings_overrides"))), {})


def _other_runs(results: dict[str, Any], changed_settings: bool) -> list[tuple[str, dict[str, Any]]]:
    """The sub-directories' runs with changed decompose settings, or (False) those at the defaults."""
    return [(k, v) for k, v in (results.get("other_runs") or {}).items() if bool(_overrides(v)) == changed_settings]


def _flags(overrides: dict[str, Any]) -> str:
    return " ".join(f"--{k.replace('_', '-')} {v:g}" if isinstance(v, float) else f"--{k.replace('_', '-')} {v}"
                    for k, v in sorted(overrides.items()))


COST_TIME_HEADER = ["| model | run | calibration images | composed top-1 (source) | loss | decompose ÷ training epoch "
                    "(bar ≤ 10) | repair |", "|---|---|---|---|---|---|---|"]


def _cost_time_rows(run_results: dict[str, Any], run: str, keys: list[str] | None = None) -> list[str]:
    """One table row per model of a run's cost and time sections (``run``: what the second column says)."""
    cost, tm = run_results.get("cost"), run_results.get("time")
    rows = []
    for key, c in ((cost or {}).get("models") or {}).items():
        if keys is not None and key not in keys:
            continue
        d, tr = c["default"], _get(tm, "models", key)
        rep = d.get("repair") or {}
        epochs = f"**{tr['decompose_over_epoch']:.2f}**" if tr else "–"
        rows.append(f"| {c['label']} | {run} | {tr['calibration_images'] if tr else '–'} | {_pct(d['composed_top1'])} "
                    f"({_pct(c['source_top1'])}) | **{_pt(d['loss_pt'], paired=d.get('paired_vs_source'))}** | {epochs} | "
                    f"{rep.get('steps')} steps, batch {rep.get('batch_size')}, {rep.get('seconds', 0):.1f} s |")
    return rows


def _commit(run_results: dict[str, Any]) -> str:
    return (_get(run_results, "cost", "run", "machine", "git_commit") or "?")[:7]


def _pct(x: float | None, d: int = 2) -> str:
    return "–" if x is None else f"{100 * x:.{d}f}%"


def _pt(x: float | None, sign: bool = False, paired: dict[str, Any] | None = None) -> str:
    """Points; with ``paired`` (bench.common.paired, absent in older results) its standard error too."""
    se = f" ± {paired['se_pt']:.2f}" if paired else ""
    return "–" if x is None else (f"{x:+.2f}{se} pt" if sign else f"{x:.2f}{se} pt")


def _x(x: float | None, d: int = 2) -> str:
    return "–" if x is None else f"{x:.{d}f}x"


def _get(d: Any, *path: Any) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _not_run(name: str) -> str:
    return f"_not run with this version of bench/ (`python bench/run.py --only {name}`)_"


def _per_model(results: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, label) of the models any per-model section has, in first-seen order."""
    seen: dict[str, str] = {}
    for s in ("cost", "time", "curve", "serving"):
        for k, r in (_get(results, s, "models") or {}).items():
            seen.setdefault(k, r.get("label", k))
    return list(seen.items())


def _runs(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(section, run record) of every section result and every per-model entry in it."""
    out = []
    for s, r in results.items():
        if s != "machine":
            out += [(s, e["run"]) for e in [r, *(r.get("models") or {}).values()] if "run" in e]
    return out


def _partial_note(results: dict[str, Any]) -> str:
    odd = sorted({f"{s}: {run['command']}" for s, run in _runs(results)
                  if run.get("test_limit") is not None or run.get("settings_overrides")})
    if not odd:
        return ""
    return ("**Not the published configuration**: some results come from quick-check runs "
            "(a test subset or changed decompose settings):\n\n" + "\n".join(f"- `{o}`" for o in odd))


# --------------------------------------------------------------------------- blocks
def block_machine(results: dict[str, Any]) -> str:
    runs: dict[tuple, set[str]] = {}
    for s, run in _runs(results):
        m = run.get("machine") or {}
        key = (m.get("cpu"), m.get("usable_cpus"), m.get("torch_device"), m.get("gpu"), m.get("ort_device"),
               (m.get("git_commit") or "?")[:12])
        runs.setdefault(key, set()).add(s)
    lines = [f"- {cpu} ({cpus} CPUs), torch on {tdev}{' (' + gpu + ')' if gpu else ''}, onnxruntime on {odev}, "
             f"commit `{commit}`: {', '.join(sorted(secs))}" for (cpu, cpus, tdev, gpu, odev, commit), secs in runs.items()]
    mach = results.get("machine") or {}
    if mach:
        lines.append(f"- last run {mach.get('date')}: onnxruntime {mach.get('onnxruntime')} (providers "
                     f"{', '.join(mach.get('ort_providers_available', []))}), onnx {mach.get('onnx')}, torch "
                     f"{mach.get('torch')} ({mach.get('torch_threads')} threads), numpy {mach.get('numpy')}, Python "
                     f"{mach.get('python')}; `{mach.get('command')}`")
    return "\n".join(lines) or "_no runs yet_"


def block_paper(results: dict[str, Any]) -> str:
    cost, reuse, rep, tm = (results.get(k) for k in ("cost", "reuse", "replace", "time"))
    rows = ["| | paper (Pan & Rajan, ICSE 2022) | ours |", "|---|---|---|"]
    if cost:
        rows.append("| decomposition cost: source − model composed from all modules (default flags) | 1.77 pt | " + "; ".join(
            f"{r['label']} {_pt(r['default']['loss_pt'], paired=r['default'].get('paired_vs_source'))} ({_pct(r['source_top1'])} → {_pct(r['default']['composed_top1'])}) "
            f"at {_pct(r['default']['modules']['mac_fraction']['mean'], 0)} module MACs" for r in cost["models"].values()) + " |")
        rows.append("| same, training-free (`--no-repair`) | | " + "; ".join(
            f"{r['label']} {_pt(r['no_repair']['loss_pt'])}" for r in cost["models"].values()) + " |")
    if reuse:
        rows.append(f"| reuse: loss of the composed model vs the sources restricted to its classes | {PAPER['reuse_loss_pt']} pt | "
                    f"{_pt(-reuse['delta_vs_mean_source_pt'], paired=reuse.get('paired_vs_mean_source'))} vs the mean of the restricted sources (4 classes from 2 models) |")
    if rep:
        rows.append(f"| replace: loss of the model after replacing a class vs its source | {PAPER['replace_loss_pt']} pt | "
                    f"{_pt(-rep['delta_vs_source_pt'], paired=rep.get('paired_vs_source'))} ({rep['base_label']}, '{rep['class']}' from {rep['donor_label']}; "
                    f"{_pt(rep['delta_vs_before_pt'], True)} vs the composed model before) |")
    if tm:
        rows.append(f"| cost vs training | ~{PAPER['co2e_ratio']:.0f}x less CO2e than retraining | " + "; ".join(
            f"{r['label']}: decompose = {r['decompose_over_epoch']:.2f} training epochs over the same images; "
            f"~{r['full_training_over_decompose']:.0f}x less time than the checkpoint's training (estimated)"
            for r in tm["models"].values()) + " |")
    note = (f"\n\nThe paper's numbers are for its own models and setup: a reference point, not a like-for-like "
            f"comparison. \"Estimated\" training time: the measured epoch over the calibration images scaled to "
            f"{SOURCE_TRAINING['epochs']} epochs over {SOURCE_TRAINING['images']:,} images (how the akamaster "
            f"checkpoints were trained); time, not CO2e.")
    return ("\n".join(rows) + note) if len(rows) > 2 else "_no results yet_"


def block_cost(results: dict[str, Any]) -> str:
    cost = results.get("cost")
    if not cost:
        return _not_run("cost")
    t = ["| model | flags | source top-1 | composed top-1 | loss | module MACs mean [min, max] | composed MACs / source "
         "| module AUC mean [min] | kept-channel Jaccard (class-specific layers) | repair |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for r in cost["models"].values():
        for tag, flags in (("default", "default"), ("no_repair", "`--no-repair`")):
            v = r[tag]
            mf, ov, rep = v["modules"]["mac_fraction"], v["kept_overlap"], v.get("repair")
            jac = (f"{ov['mean_jaccard']:.3f} [{ov['min_jaccard']:.3f}, {ov['max_jaccard']:.3f}] over "
                   f"{ov['counted_groups']} of {ov['class_specific_groups']} groups" if ov["mean_jaccard"] is not None
                   else f"– ({ov['counted_groups']} pruned class-specific groups)")
            rep_s = (f"{rep['steps']} steps on {rep['images']} images, {rep['device']}, {rep['seconds']:.0f} s" if rep else "–")
            t.append(f"| {r['label']} | {flags} | {_pct(r['source_top1'])} | {_pct(v['composed_top1'])} | "
                     f"**{_pt(v['loss_pt'], paired=v.get('paired_vs_source'))}** | {_pct(mf['mean'], 1)} [{_pct(mf['min'], 1)}, {_pct(mf['max'], 1)}] | "
                     f"{_x(v['composed_over_source_macs'])} | {v['module_auc']['mean']:.4f} [{v['module_auc']['min']:.4f}] | "
                     f"{jac} | {rep_s} |")
    first = next(iter(cost["models"].values()))
    t += ["", f"{first['test_images']} test images. Per-class recall, source → composed (default flags):", "",
          "| class | " + " | ".join(r["label"] for r in cost["models"].values()) + " |",
          "|---|" + "---|" * len(cost["models"])]
    for c in first["source_per_class"]:
        t.append(f"| {c} | " + " | ".join(
            f"{_pct(r['source_per_class'][c], 1)} → {_pct(r['default']['composed_per_class'][c], 1)}"
            for r in cost["models"].values()) + " |")
    return "\n".join(t)


def block_curve(results: dict[str, Any]) -> str:
    curve = results.get("curve")
    if not curve:
        return _not_run("curve")
    t = ["| model | method | target_macs | mean module MACs | composed top-1 (source) | loss | test images | decompose s |",
         "|---|---|---|---|---|---|---|---|"]
    for r in curve["models"].values():
        for p in r["points"]:
            star = "**" if p["is_default"] else ""
            t.append(f"| {r['label']} | {star}{p['method']}{star} | {p['target_macs']:g} | {_pct(p['mac_fraction_mean'], 1)} | "
                     f"{_pct(p['composed_top1'])} ({_pct(p['source_top1'])}) | {star}{_pt(p['loss_pt'])}{star} | "
                     f"{p['test_images']}{' (all)' if p['whole_test_set'] else ''} | {p['decompose_s']:.1f} |")
    return "\n".join(t) + (f"\n\nLoss = source − composed top-1 on the same images: the whole test set for the two "
                           f"points the cost section also scores (repair and training-free at the default target "
                           f"{curve['default_target_macs']:g}), a fixed class-balanced subset of "
                           f"{curve['subset']['images']} test images (seed 0) for the others. **Bold**: default flags.")


def block_subset(results: dict[str, Any]) -> str:
    s = results.get("subset")
    if not s:
        return _not_run("subset")
    t = [f"| model | classes | composed top-1 | {s['baseline']} | delta | composed MACs / source MACs |",
         "|---|---|---|---|---|---|",
         f"| {s['label']} | {', '.join(s['classes'])} | {_pct(s['composed_top1'])} | {_pct(s['source_restricted_top1'])} | "
         f"**{_pt(s['delta_pt'], True, s.get('paired'))}** | **{_x(s['composed_over_source_macs'])}** ({s['composed_macs'] / 1e6:.1f} M / "
         f"{s['source_macs'] / 1e6:.1f} M) |", "",
         f"{s['test_images']} test images (those of {', '.join(s['classes'])}). Per class, composed / restricted source / "
         f"the unrestricted 10-class source: " + "; ".join(
             f"{c} {_pct(s['composed_per_class'][c], 1)} / {_pct(s['source_restricted_per_class'][c], 1)} / "
             f"{_pct(s['source_10class_recall'][c], 1)}" for c in s["classes"]) + "."]
    rows = s.get("budgeted") or []
    if rows:
        t += ["", "Sized by the deployed model (`--composed-macs`), on the labelled training split and on the same "
              "images without labels:", "",
              "| classes | flags | calibration labels | repair | composed MACs / source MACs | composed top-1 | "
              "restricted source | delta |", "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            repair = (f"distillation + {r['label_weight']:g} x the sub-task's cross-entropy "
                      f"({r['labelled_images']} labelled images)" if r.get("label_weight") else "distillation")
            t.append(f"| {', '.join(r['classes'])} | `--composed-macs {r['composed_macs_flag']:g}` | "
                     f"{'data' if r['labels'] else 'none (the source labels them)'} | {repair} | "
                     f"**{_x(r['composed_over_source_macs'], 3)}** | {_pct(r['composed_top1'])} | "
                     f"{_pct(r['source_restricted_top1'])} | **{_pt(r['delta_pt'], True, r['paired'])}** |")
        t += ["", f"Each row on the test images of its classes ({', '.join(str(r['test_images']) for r in rows)})."]
    return "\n".join(t)


def block_reuse(results: dict[str, Any]) -> str:
    r = results.get("reuse")
    if not r:
        return _not_run("reuse")
    srcs = r["sources_restricted"]
    t = ["| class | taken from | composed recall | " + " | ".join(f"{s['label']} restricted" for s in srcs.values()) + " |",
         "|---|---|---|" + "---|" * len(srcs)]
    for c in r["classes"]:
        t.append(f"| {c['class']} | {c['from']} | {_pct(r['composed_per_class'][c['class']], 1)} | " + " | ".join(
            _pct(s["per_class"][c["class"]], 1) for s in srcs.values()) + " |")
    t.append(f"| **all ({r['test_images']} images)** | | **{_pct(r['composed_top1'])}** | " + " | ".join(
        f"{_pct(s['top1'])} ({_pt(r['delta_vs_each_source_pt'][k], True, _get(r, 'paired_vs_each_source', k))})"
        for k, s in srcs.items()) + " |")
    t += ["", f"Baseline: {r['baseline']}. Composed vs the mean of the restricted sources: "
              f"**{_pt(r['delta_vs_mean_source_pt'], True, r.get('paired_vs_mean_source'))}**."]
    return "\n".join(t)


def block_replace(results: dict[str, Any]) -> str:
    r = results.get("replace")
    if not r:
        return _not_run("replace")
    sel = r["selection"]
    t = [f"Base: {r['base_label']} composed from its default modules; class **{r['class']}** chosen as the one its "
         f"composed model recognises worst on {sel['selection_images']} {sel['images']} "
         f"(recall there {_pct(sel['composed_recall'][r['class']], 1)}; source {_pct(sel['source_recall'][r['class']], 1)})"
         + (f". **Fallback**: {sel['why']}" if not sel["held_out"] else "") +
         f"; replaced by {r['donor_label']}'s module. Scored on {r['test_images']} test images.", "",
         f"| | {r['base_label']} source | composed before | composed after | {r['donor_label']} source |",
         "|---|---|---|---|---|",
         f"| recall of '{r['class']}' | {_pct(r['class_recall']['source'], 1)} | {_pct(r['class_recall']['before'], 1)} | "
         f"**{_pct(r['class_recall']['after'], 1)}** ({_pt(r['class_delta_vs_source_pt'], True)} vs source) | "
         f"{_pct(r['class_recall']['donor_source'], 1)} |",
         f"| top-1 | {_pct(r['top1']['source'])} | {_pct(r['top1']['before'])} | **{_pct(r['top1']['after'])}** "
         f"({_pt(r['delta_vs_source_pt'], True, r.get('paired_vs_source'))} vs source, "
         f"{_pt(r['delta_vs_before_pt'], True, r.get('paired_vs_before'))} vs before) | "
         f"{_pct(r['top1']['donor_source'])} |"]
    o = r.get("on_source")
    if o:
        donors = o.get("donors") or {o.get("chosen", "default"): {**o, "what": "the default decomposition's module"}}
        t += ["", f"On the source itself (`onnxmod replace {r['base']}.onnx --class {o['class']} --with ... --calib TRAIN`; "
                  f"every other class is the source graph's): **{o['class']}**, the class the {r['base_label']} source "
                  f"recognises worst on the same selection images (recall there {_pct(o['selection_source_recall'], 1)}), "
                  f"served by a module of {r['donor_label']}. Each donor is tried; the one whose model scores the higher "
                  f"top-1 on the selection images (training images) is the result (**bold**); {o['test_images']} test "
                  f"images. {r['base_label']} source: top-1 {_pct(o['top1']['source'])}, recall of '{o['class']}' "
                  f"{_pct(o['class_recall']['source'], 1)}; {r['donor_label']} source: "
                  f"{_pct(r['top1']['donor_source'])} / {_pct(o['class_recall']['donor_source'], 1)}.", "",
              f"| donor ({r['donor_label']}'s '{o['class']}') | MACs ÷ {r['base_label']}'s | top-1 on selection images "
              f"(source {_pct(o.get('selection_source_top1'))}) | test top-1 vs source | recall of '{o['class']}' vs source |",
              "|---|---|---|---|---|"]
        for name, dn in donors.items():
            b = (lambda x: f"**{x}**") if name == o.get("chosen", name) else (lambda x: x)
            sel = (dn.get("selection") or {}).get("top1")
            t.append(f"| {b(dn['what'])} | {_x(dn['macs_over_source']) if dn.get('macs_over_source') else '–'} | "
                     f"{_pct(sel)} | {b(_pct(dn['top1']['after']))} "
                     f"({_pt(dn['delta_vs_source_pt'], True, dn.get('paired_vs_source'))}) | "
                     f"{b(_pct(dn['class_recall']['after'], 1))} ({_pt(dn['class_delta_vs_source_pt'], True)}) |")
    return "\n".join(t)


def _epochs_note(epoch: dict[str, Any]) -> str:
    """", median of N epochs" where the time section timed more than one (short, GPU epochs)."""
    n = len(epoch.get("epochs_s") or [])
    return f", median of {n} epochs" if n > 1 else ""


def block_time(results: dict[str, Any]) -> str:
    tm = results.get("time")
    if not tm:
        return _not_run("time")
    t = ["| model | calibration images | plain ORT pass | training epoch (torch) | decompose (repair) | ÷ plain pass "
         "| ÷ training epoch (bar ≤ 10) | `--no-repair` | ÷ plain pass (bar ≤ 1.5) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in tm["models"].values():
        e = r["training_epoch"]
        t.append(f"| {r['label']} | {r['calibration_images']} | {r['plain_pass_median_s']:.2f} s (median of "
                 f"{len(r['plain_pass_s'])}) | {e['epoch_s']:.2f} s ({e['device']}{', extrapolated from ' + str(e['timed_batches']) + ' batches' if e['extrapolated'] else ''}{_epochs_note(e)}) | "
                 f"{r['decompose_s']:.1f} s (repair {r['decompose_timings'].get('repair_s', 0):.1f} s) | "
                 f"{_x(r['decompose_over_plain'])} | **{r['decompose_over_epoch']:.2f}** | {r['decompose_no_repair_s']:.1f} s | "
                 f"**{_x(r['no_repair_over_plain'])}** |")
    e = next(iter(tm["models"].values()))["training_epoch"]
    repair_batches = sorted({str((r.get("repair") or {}).get("batch_size", "?")) for r in tm["models"].values()})
    t += ["", f"Training epoch: {e['optimizer']}, batch {e['batch_size']}, {e['augmentation']}, torch on {e['device']} "
              f"({e['torch_threads']} CPU threads), after 2 untimed warm-up steps: batch 128 is the batch these "
              f"checkpoints were trained with. Repair's own batch: {', '.join(repair_batches)}."]
    return "\n".join(t)


def block_budget(results: dict[str, Any]) -> str:
    """The default decomposition next to runs of the cost and time sections, on the same machine, with changed
    decompose settings (sub-directories of the results whose runs record ``settings_overrides``)."""
    variants = _other_runs(results, changed_settings=True)
    if not variants:
        return "_No run with changed decompose settings is recorded._"
    t = list(COST_TIME_HEADER)
    for key, _ in _per_model(results):
        t += _cost_time_rows(results, f"default flags (`{_commit(results)}`)", [key])
        for name, v in variants:
            t += _cost_time_rows(v, f"`{_flags(_overrides(v))}` (`{_commit(v)}`, `{name}/`)", [key])
    return "\n".join(t)


def block_serving(results: dict[str, Any]) -> str:
    sv = results.get("serving")
    if not sv:
        return _not_run("serving")
    bb = sv["batch_sizes"][1]
    t = [f"| model | modules | composed MACs / source | shared by dedup | batch 1 img/s source / composed (ratio) "
         f"| batch {bb} img/s source / composed (ratio) | composed top-1 (source) |", "|---|---|---|---|---|---|---|"]
    for r in sv["models"].values():
        for tag, name in (("default", "default"), ("variant", f"`{sv['variant']['name']}`")):
            v = r.get(tag)
            if v is None:
                continue
            acc = (f"{_pct(v['composed_top1'])} ({_pct(v['source_top1'])}), loss {_pt(v['loss_pt'])}"
                   if "composed_top1" in v else "see cost")
            t.append(f"| {r['label']} | {name} | {_x(v['composed_over_source_macs'])} | {_pct(v['shared_by_dedup'], 1)} | "
                     f"{v['batch1']['source_img_s']:.0f} / {v['batch1']['composed_img_s']:.0f} "
                     f"(**{_x(v['batch1']['composed_over_source'])}**) | {v[f'batch{bb}']['source_img_s']:.0f} / "
                     f"{v[f'batch{bb}']['composed_img_s']:.0f} (**{_x(v[f'batch{bb}']['composed_over_source'])}**) | {acc} |")
    dev = next(iter(sv["models"].values())).get("ort_device")
    t += ["", f"onnxruntime on {dev}; median of {sv['repeats']} repeats after a warm-up run, source and composed back to "
              f"back; {sv['threads']}. \"shared by dedup\": 1 − composed MACs / sum of module MACs."]
    return "\n".join(t)


def block_cuda(results: dict[str, Any]) -> str:
    cu = results.get("cuda")
    if not cu:
        return _not_run("cuda")
    if cu.get("skipped"):
        return f"_skipped in the last run: {cu['skipped']}_"
    mach = _get(cu, "run", "machine") or {}
    t = [f"{mach.get('gpu')} against {mach.get('usable_cpus')} CPU cores of the same machine, onnxruntime and torch on "
         f"each, commit `{(mach.get('git_commit') or '?')[:7]}`.", "",
         "| model | `eval` img/s, CPU → CUDA: source / composed | top-1 answers that differ | max abs diff, CUDA vs CPU: "
         "source logits / composed probs | composed on CUDA vs its modules one by one on the CPU | torch (repair's "
         "executor) on CUDA vs onnxruntime CPU, logits: fp32 / torch defaults | repair s/step CPU → CUDA | "
         "`serve --device cuda` vs CPU run: max abs diff probs, labels that differ |",
         "|---|---|---|---|---|---|---|---|"]
    for r in cu["models"].values():
        ev, out, rep, sv = r["eval"], r["outputs"], r["repair"], r["serve"]
        diff = [k for k in out if k.startswith("composed_on_")][0]
        t.append(f"| {r['label']} | " + " / ".join(
            f"{ev[k]['cpu']['images_per_s']:.0f} → {ev[k]['cuda']['images_per_s']:.0f} (**{_x(ev[k]['cuda_over_cpu_throughput'])}**)"
            for k in ("source", "composed")) +
            f" | {ev['source']['images_scored_differently']} / {ev['composed']['images_scored_differently']} of "
            f"{ev['source']['images']} | {out['source_logits_max_abs']:.1e} / {out['composed_probs_max_abs']:.1e} | "
            f"{out[diff]:.1e} | {rep['cuda']['max_abs_logit_diff_vs_onnxruntime_cpu']:.1e} / "
            f"{rep['cuda']['max_abs_logit_diff_vs_onnxruntime_cpu_torch_default']:.1e} | "
            f"{rep['cpu']['seconds_per_step']:.3f} → {rep['cuda']['seconds_per_step']:.3f} "
            f"(**{_x(rep['cpu_over_cuda_seconds_per_step'], 1)}**) | {sv['max_abs_probs_diff_vs_cpu']:.1e}, "
            f"{sv['labels_differing']} of {sv['images']} |")
    t += ["", f"Outputs compared on one batch of {cu['batch']} test images; repair steps: {rep['modules']} modules "
              f"together at batch {rep['batch']}, the time of {cu['repair_steps'][1]} steps minus that of "
              f"{cu['repair_steps'][0]}."]
    for name, other in _other_runs(results, changed_settings=False):
        m = other.get("machine") or {}
        t += ["", f"**The cost and time sections on `{name}`** ({m.get('gpu') or m.get('cpu')}, torch on "
                  f"{m.get('torch_device')}, onnxruntime on {m.get('ort_device')}; `{_commit(other)}`; "
                  f"{m.get('note', '')}). Not comparable with the tables above where the calibration images differ:", "",
              *COST_TIME_HEADER, *_cost_time_rows(other, f"`{name}`")]
    return "\n".join(t)


def block_manyclasses(results: dict[str, Any]) -> str:
    r = results.get("manyclasses")
    if not r:
        return _not_run("manyclasses")
    src, bars, runs = r["source"], r["bars"], r["decompose_runs"]
    wanted = len(r["data"]["wanted_classes"])
    t = ["| source | images decompose runs it on | batch | plain ORT pass | decompose | ÷ plain pass "
         f"(bar ≤ {bars['decompose_over_plain_max']:g}) | peak RSS of decompose (bar ≤ {bars['peak_rss_gb_max']:g} GB) |",
         "|---|---|---|---|---|---|---|",
         f"| {src['classes']} classes at {src['input_size']}x{src['input_size']}, {src['macs'] / 1e9:.2f} GMACs, "
         f"{src['params'] / 1e6:.1f} M params | {r['calibration_images']} ({wanted} wanted classes of "
         f"{r['data']['classes']}; {r['data']['images']} in the data) | {r['stream_batch_size']} | "
         f"{r['plain_pass_median_s']:.1f} s (median of {len(r['plain_pass_s'])}) | {r['decompose_median_s']:.1f} s "
         f"(median of {len(runs)}) | **{_x(r['decompose_over_plain'])}** | **{r['peak_rss_bytes'] / 1e9:.2f} GB** |", "",
         f"`decompose {r['flags']}`, alternated with the plain passes ("
         + ", ".join(f"{w:.1f} s" for w in r["plain_pass_s"]) + "). Each decompose: "
         + "; ".join(f"{d['decompose_s']:.1f} s = calibration {d['timings']['calibration_s']:.1f} s + the modules' row "
                     f"and score fits {d['timings'].get('module_runs_s', 0) + d['timings']['refit_s']:.1f} s + writing "
                     f"{d['timings']['writing_s']:.1f} s + the other stages (the child process: {d['process_s']:.1f} s with "
                     "interpreter start and imports)" for d in runs)
         + f". In CPU time (all threads): decompose {r['decompose_cpu_median_s']:.1f} s, plain pass "
         f"{r['plain_pass_cpu_median_s']:.1f} s, {_x(r['decompose_over_plain_cpu'])} (a shared machine: 1-minute load "
         "average " + " / ".join(f"{v:.1f}" for v in r["loadavg_1min"]) + " at the start and after each decompose). "
         "Module MACs " + ", ".join(f"{_pct(e['mac_fraction'], 1)}" for e in runs[0]["modules"]) + " of the source's."]
    return "\n".join(t)


def _composition(c: dict[str, Any] | None) -> str:
    """How decompose sized the modules (the manifest's "composition"), in words."""
    if not c:
        return "no composition record"
    how = (f"sized by --composed-macs {c['budget']:g}" if c.get("budget") is not None
           else f"capped at {c['cap']:g}x (uncapped: {c['uncapped_fraction']:.2f}x)" if c.get("cap") is not None
           else "not capped")
    return (f"{how}: shared depth {c['shared_depth']:g}, per-module target {c['mean_target_macs']:.3g}, "
            f"composing to {c['fraction']:.3f}x")


def block_cifar100(results: dict[str, Any]) -> str:
    r = results.get("cifar100")
    if not r:
        return _not_run("cifar100")
    src, bars, dec, comp, allc, sub, cost, read = (r["source"], r["bars"], r["decompose"], r["compose"],
                                                   r["composed_all"], r["subtask"], r["training_cost"], r["read"])
    tr = src["training"]
    mods = dec["modules"]["mac_fraction"]
    t = [f"Source: {src['arch']} trained by `bench/train_source.py` ({tr['epochs']} epochs, {tr['train_seconds'] / 60:.1f} "
         f"min recorded), **{_pct(src['top1'])}** top-1 on the {src['test_images']} test images of its {r['classes']} "
         f"classes; {src['macs'] / 1e6:.1f} M MACs.", "",
         "| model | MACs ÷ source | top-1 | vs baseline | baseline |", "|---|---|---|---|---|",
         f"| all {comp['modules']} modules composed (default flags; bar ≤ {bars['composed_all_macs_max']:g}x, within "
         f"{bars['composed_all_loss_pt_max']:g} pt) | **{_x(allc['over_source_macs'])}** | {_pct(allc['top1'])} | "
         f"**{_pt(allc['delta_pt'], True, allc['paired'])}** | the source, {_pct(src['top1'])} |",
         f"| `--classes {','.join(sub['classes'])} --composed-macs {sub['composed_macs_flag']:g}` (bar ≤ "
         f"{bars['subtask_macs_max']:g}x, ≥ {bars['subtask_vs_restricted_pt_min']:+g} pt) | **{_x(sub['over_source_macs'])}** | "
         f"{_pct(sub['top1'])} | **{_pt(sub['delta_pt'], True, sub['paired'])}** | the source restricted to those "
         f"{len(sub['classes'])} logits, {_pct(sub['source_restricted_top1'])} ({sub['test_images']} images) |", "",
         f"Modules: {_pct(mods['mean'], 1)} of the source's MACs on average ({_pct(mods['min'], 1)}-{_pct(mods['max'], 1)}); "
         f"{_composition(dec['composition'])}.", "",
         "| what | seconds | peak RSS |", "|---|---|---|",
         f"| decompose, 100 modules (child process) | {dec['decompose_s']:.0f} | {dec['peak_rss_bytes'] / 1e9:.2f} GB |",
         f"| decompose, the sub-task | {sub['decompose_s']:.0f} | {sub['peak_rss_bytes'] / 1e9:.2f} GB |",
         f"| `onnxmod compose` of {comp['modules']} modules (full checker passes; {comp['nodes']} nodes) | "
         f"{comp['seconds']:.1f} | {comp['peak_rss_bytes'] / 1e9:.2f} GB |", "",
         f"Training ÷ decompose (bar ≥ {bars['training_over_decompose_min']:g}x): **"
         f"{_x(cost['estimated_here_over_decompose'], 1)}** against one epoch of the same recipe timed in this run "
         f"({cost['epoch_here']['seconds']:.0f} s) x {tr['epochs']} epochs + reading ({cost['epoch_here']['read_seconds']:.0f} s); "
         f"{_x(cost['recorded_over_decompose'], 1)} against the training's recorded {cost['recorded_train_s']:.0f} s "
         f"(on a machine shared with other jobs, so an upper bound).", "",
         f"`eval` of the JPEG test folder ÷ the same {read['images']} images from an npz (bar ≤ "
         f"{bars['folder_over_npz_max']:g}x): **{_x(read['folder_over_npz'])}** (folder "
         + ", ".join(f"{s:.1f}" for s in read["folder_s"]) + " s; npz " + ", ".join(f"{s:.1f}" for s in read["npz_s"])
         + " s, alternated; same top-1)."]
    return "\n".join(t)


def block_choosing(results: dict[str, Any]) -> str:
    from onnxmod.decompose import REPAIR_EPOCHS

    cost, curve, tm, sv = (results.get(k) for k in ("cost", "curve", "time", "serving"))
    models = _per_model(results)
    labels = " / ".join(lbl for _, lbl in models)

    def per(fn) -> str:
        vals = []
        for k, _ in models:
            try:
                vals.append(fn(k))
            except (KeyError, TypeError, ZeroDivisionError, StopIteration):  # that model lacks this result
                vals.append("–")
        return " / ".join(vals)

    c = lambda k, *p: _get(cost, "models", k, *p)  # noqa: E731
    tmm = lambda k, *p: _get(tm, "models", k, *p)  # noqa: E731

    def same_run(other: dict[str, Any] | None) -> bool:
        """Time ratios only between numbers of one bench invocation (one machine, one commit)."""
        return bool(other and tm) and all(other["run"].get(f) == tm["run"].get(f) for f in ("command", "machine"))

    def over(k: str, decompose_s: float, section: dict[str, Any], what: tuple[str, ...]) -> str:
        """decompose_s ÷ the time section's ``what``; a row measured in another run shows its seconds (†)."""
        if not same_run(section):
            return f"{decompose_s:.0f} s†" if what == ("plain_pass_median_s",) else "–"
        return _x(decompose_s / tmm(k, *what))

    plain, epoch = ("plain_pass_median_s",), ("training_epoch", "epoch_s")

    def curve_point(k: str, method: str) -> dict[str, Any]:
        t = curve["default_target_macs"]
        return next(p for p in curve["models"][k]["points"] if p["method"] == method and p["target_macs"] == t)

    rows = [f"| goal | flags | mean module MACs | {labels} loss | decompose ÷ plain inference pass | decompose ÷ training "
            f"epoch | composed from all modules |", "|---|---|---|---|---|---|---|"]
    if cost:
        rows.append(
            "| small class-specific modules (default: repair by distillation) | — | "
            f"{per(lambda k: _pct(c(k, 'default', 'modules', 'mac_fraction', 'mean'), 0))} | "
            f"{per(lambda k: _pt(c(k, 'default', 'loss_pt')))} | {per(lambda k: _x(tmm(k, 'decompose_over_plain')))} | "
            f"{per(lambda k: _x(tmm(k, 'decompose_over_epoch')))} | "
            f"{per(lambda k: _x(c(k, 'default', 'composed_over_source_macs')))} the source's MACs |")
        rows.append(
            "| training-free, fastest decompose | `--no-repair` | "
            f"{per(lambda k: _pct(c(k, 'no_repair', 'modules', 'mac_fraction', 'mean'), 0))} | "
            f"{per(lambda k: _pt(c(k, 'no_repair', 'loss_pt')))} | {per(lambda k: _x(tmm(k, 'no_repair_over_plain')))} | "
            f"{per(lambda k: _x(tmm(k, 'no_repair_over_epoch')))} | "
            f"{per(lambda k: _x(c(k, 'no_repair', 'composed_over_source_macs')))} the source's MACs |")
    for name, other in _other_runs(results, changed_settings=True):  # same machine, its own cost and time run
        oc = lambda k, *p, o=other: _get(o, "cost", "models", k, "default", *p)  # noqa: E731
        ot = lambda k, *p, o=other: _get(o, "time", "models", k, *p)  # noqa: E731
        ov = _overrides(other)
        label = ("closer to the source, for a slower decompose" if ov.get("repair_epochs", 0) > REPAIR_EPOCHS
                 else f"every class, composed to {ov['composed_macs']:g}x the source's MACs" if "composed_macs" in ov
                 else f"changed settings (`{name}/`)")
        rows.append(
            f"| {label} | "
            f"`{_flags(_overrides(other))}` | "
            f"{per(lambda k: _pct(oc(k, 'modules', 'mac_fraction', 'mean'), 0))} | {per(lambda k: _pt(oc(k, 'loss_pt')))} | "
            f"{per(lambda k: _x(ot(k, 'decompose_over_plain')))} | {per(lambda k: _x(ot(k, 'decompose_over_epoch')))} | "
            f"{per(lambda k: _x(oc(k, 'composed_over_source_macs')))} the source's MACs |")
    if curve:
        n = curve["subset"]["images"]
        rows.append(
            "| training-free with a layer-wise re-fit | `--no-repair --reconstruct` | "
            f"{per(lambda k: _pct(curve_point(k, 'reconstruct')['mac_fraction_mean'], 0))} | "
            f"{per(lambda k: _pt(curve_point(k, 'reconstruct')['loss_pt']))} ({n}-image subset) | "
            f"{per(lambda k: over(k, curve_point(k, 'reconstruct')['decompose_s'], curve, plain))} | "
            f"{per(lambda k: over(k, curve_point(k, 'reconstruct')['decompose_s'], curve, epoch))} | "
            "as the row above |")
    if sv:
        name = sv["variant"]["name"]
        bb = sv["batch_sizes"][1]
        v = lambda k, *p: _get(sv, "models", k, "variant", *p)  # noqa: E731
        rows.append(
            f"| a composed model that replaces its source (one shared trunk) | `--{name.split('=')[0].replace('_', '-')} "
            f"{name.split('=')[1]}` | {per(lambda k: _pct(v(k, 'mac_fraction_mean'), 0))} | "
            f"{per(lambda k: _pt(v(k, 'loss_pt')))} | {per(lambda k: over(k, v(k, 'decompose_s'), sv, plain))} | "
            f"{per(lambda k: over(k, v(k, 'decompose_s'), sv, epoch))} | "
            f"{per(lambda k: _x(v(k, 'composed_over_source_macs')))} the source's MACs, "
            f"{per(lambda k: _x(v(k, f'batch{bb}', 'composed_over_source')))} its throughput (batch {bb}, ORT "
            f"{next(iter(sv['models'].values())).get('ort_device')}) |")
    if len(rows) == 2:
        return "_no bench results yet (`python bench/run.py`)_"
    dates = sorted({r["run"]["date"][:10] for r in (cost, curve, tm, sv) if r})
    return ("Measured on the pretrained CIFAR-10 ResNets (generated by `bench/run.py` from `bench/results/*.json`, "
            f"{', '.join(dates)}; details in [`bench/README.md`](bench/README.md)). Loss = source top-1 − top-1 of the "
            "model composed from all 10 modules, on the whole test set unless a row says otherwise:\n\n"
            + "\n".join(rows) + "\n\n" + ("† seconds of a row measured in another bench run (its machine is in "
            "bench/README.md): times of different runs are not divided.\n\n" if any("s†" in r for r in rows) else "")
            + "`--target-macs` trades size for accuracy along the curve in `bench/README.md`; "
            "how much the modules of different classes share their kept channels is in its cost table (kept-channel "
            "Jaccard overlap).")


# --------------------------------------------------------------------------- figures
def figures(cfg: Config, results: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    curve = results.get("curve")
    if curve:
        fig, axes = plt.subplots(1, len(curve["models"]), figsize=(4.6 * len(curve["models"]), 3.6), squeeze=False)
        for ax, r in zip(axes[0], curve["models"].values()):
            for i, method in enumerate(curve["methods"]):
                pts = sorted((p for p in r["points"] if p["method"] == method), key=lambda p: p["mac_fraction_mean"])
                ax.plot([100 * p["mac_fraction_mean"] for p in pts], [p["loss_pt"] for p in pts], "o-", color=f"C{i}",
                        label=method)
                for p in pts:
                    if p["is_default"]:
                        ax.plot(100 * p["mac_fraction_mean"], p["loss_pt"], "*", ms=14, color=f"C{i}", mec="k")
            ax.set_xlabel("mean module MACs (% of the source)")
            ax.set_ylabel("loss vs source (pt)")
            ax.set_title(f"{r['label']} (star: default)", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        p = cfg.results / "loss_vs_macs.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p.name)
    cost = results.get("cost")
    if cost:
        fig, ax = plt.subplots(figsize=(8, 3.4))
        keys = list(cost["models"])
        width = 0.8 / max(1, len(keys))
        classes = [r["class"] for r in cost["models"][keys[0]]["default"]["modules"]["per_class"]]
        for i, k in enumerate(keys):
            fr = [r["mac_fraction"] for r in cost["models"][k]["default"]["modules"]["per_class"]]
            ax.bar(np.arange(len(fr)) + (i - (len(keys) - 1) / 2) * width, fr, width, label=cost["models"][k]["label"])
        ax.set_xticks(np.arange(len(classes)), classes, rotation=30, ha="right")
        ax.set_ylabel("module MACs / source MACs")
        ax.set_ylim(0, 1.05)
        ax.set_title("Module size per class (default flags)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = cfg.results / "module_mac_fraction.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p.name)
    return written


# --------------------------------------------------------------------------- files
def render_readme(cfg: Config, results: dict[str, Any], figs: list[str]) -> str:
    blocks = {
        "partial": _partial_note(results), "machine": block_machine(results), "paper": block_paper(results),
        "cost": block_cost(results), "curve": block_curve(results), "subset": block_subset(results),
        "reuse": block_reuse(results), "replace": block_replace(results), "time": block_time(results),
        "budget": block_budget(results),
        "serving": block_serving(results), "manyclasses": block_manyclasses(results),
        "cifar100": block_cifar100(results), "cuda": block_cuda(results),
        "choosing": block_choosing(results),
        "figures": "\n\n".join(f"![{f}]({os.path.relpath(cfg.results / f, cfg.readme.parent)})" for f in figs)
                   or "_no figures_",
        "results_dir": os.path.relpath(cfg.results, cfg.readme.parent),
    }
    out = TEMPLATE.read_text()
    for k, v in blocks.items():
        out = out.replace("{{" + k + "}}", v)
    if "{{" in out:
        raise RuntimeError(f"{TEMPLATE}: unfilled placeholders remain")
    return out


def markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"


def rewrite_block(path: Path, name: str, body: str) -> bool:
    """Replace the text between the ``name`` markers of ``path``; False when it has none."""
    from onnxmod.modelio import write_text_atomic

    start_mark, end_mark = markers(name)
    text = path.read_text()
    start, end = text.find(start_mark), text.find(end_mark)
    if start < 0 or end < start:
        return False
    write_text_atomic(path, text[:start + len(start_mark)] + "\n" + body + "\n" + text[end:])
    return True


def block_more_classes(results: dict[str, Any]) -> str:
    """The top-level README's short CIFAR-100 part (the details are bench/README.md's cifar100 section)."""
    r = results.get("cifar100")
    if not r:
        return "_The cifar100 bench section has not been run (`python bench/run.py --only cifar100`)._"
    src, dec, comp, allc, sub, cost = (r["source"], r["decompose"], r["compose"], r["composed_all"], r["subtask"],
                                       r["training_cost"])
    return (f"On CIFAR-100 (measured by `bench/run.py`, {r['run']['date'][:10]}): the project's own {src['arch']} "
            f"(`bench/train_source.py`, {src['training']['epochs']} epochs on the CPU, {_pct(src['top1'])} top-1 on "
            f"{src['test_images']} test images). `onnxmod decompose` at default flags writes {comp['modules']} modules, "
            f"sized so that all of them compose to at most 2.0x the source ({_composition(dec['composition'])}). All {comp['modules']} composed: **{_pct(allc['top1'])}** top-1 at "
            f"{_x(allc['over_source_macs'])} the source's MACs ({_pt(allc['delta_pt'], True, allc['paired'])} vs the "
            f"source). A 5-class sub-task, `--classes {','.join(sub['classes'])} --composed-macs "
            f"{sub['composed_macs_flag']:g}`: **{_pct(sub['top1'])}** at {_x(sub['over_source_macs'])} the source's MACs "
            f"against {_pct(sub['source_restricted_top1'])} for the source restricted to those classes "
            f"({_pt(sub['delta_pt'], True, sub['paired'])}, {sub['test_images']} test images). Decomposing took "
            f"{dec['decompose_s'] / 60:.0f} min, and training the source {_x(cost['estimated_here_over_decompose'], 1)} "
            f"that (its epochs x one epoch timed in the same run); composing the {comp['modules']} modules {comp['seconds']:.0f} s and "
            f"{comp['peak_rss_bytes'] / 1e9:.1f} GB. Details: [`bench/README.md`](bench/README.md), CIFAR-100.")


def write_all(cfg: Config) -> None:
    from onnxmod.modelio import write_text_atomic

    results = load_results(cfg.results)
    figs = figures(cfg, results)
    write_text_atomic(cfg.readme, render_readme(cfg, results, figs))
    log(f"wrote {cfg.readme}" + (f" and figures {', '.join(figs)}" if figs else ""))
    if cfg.top_readme is not None:
        # the top-level README's blocks, by marker name
        for name, block in (("choosing-settings", block_choosing), ("more-classes", block_more_classes)):
            if rewrite_block(cfg.top_readme, name, block(results)):
                log(f"rewrote the {name} block of {cfg.top_readme}")
            else:
                log(f"{cfg.top_readme}: no {' ... '.join(markers(name))} markers; block not written")

