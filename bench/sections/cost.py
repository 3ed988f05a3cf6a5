"""cost: source vs the model composed from all 10 modules, default flags (repair on) and
``--no-repair`` (training-free), on the whole test set: top-1, loss, module and composed MACs,
module AUC, and how class-specific the modules are (kept-channel Jaccard overlap)."""

from __future__ import annotations

from typing import Any

import numpy as np

from bench.common import Bench, kept_overlap, log, module_summary, paired, pt, settings_dict

VARIANTS = (("default", {}), ("no_repair", {"repair": False}))  # tag, DecomposeSettings changes


def variant(b: Bench, key: str, tag: str, changes: dict[str, Any], src: dict[str, Any]) -> dict[str, Any]:
    from onnxmod.cost import count_macs

    d, man = b.decompose(key, b.settings(**changes))
    model, compose_s = b.compose_dir(d, man)
    ev = b.eval_composed(model, what=f"{key} composed ({tag})")
    aucs = [m["auc"] for m in b.eval_modules(d, man)]
    composed_macs = count_macs(model)
    overlap = kept_overlap(man, b.group_sizes(key))
    vs_source = paired(ev, src)
    log(f"{key} {tag}: composed top-1 {ev['top1']:.4f} (loss {-vs_source['delta_pt']:.2f} ± {vs_source['se_pt']:.2f} pt), mean module "
        f"MACs {module_summary(man)['mac_fraction']['mean']:.3f}, Jaccard {overlap['mean_jaccard']}")
    return {
        "settings": settings_dict(b.settings(**changes)), "flags": changes,
        "module_dir": str(d), "composed_top1": ev["top1"], "composed_per_class": ev["per_class"],
        "loss_pt": pt(src["top1"], ev["top1"]), "paired_vs_source": vs_source, "test_images": ev["n"],
        "modules": module_summary(man),
        "composed_macs": composed_macs, "source_macs": man["source"]["macs"],
        "composed_over_source_macs": composed_macs / man["source"]["macs"],
        "module_auc": {"mean": float(np.mean(aucs)), "min": float(np.min(aucs)), "per_class": aucs},
        "kept_overlap": overlap,
        "repair": man.get("repair"), "decompose_timings": man["timings"], "decompose_run": man["bench"],
        "compose_s": compose_s,
    }


def run(b: Bench) -> dict[str, Any]:
    res: dict[str, Any] = {"section": "cost", "variants": [t for t, _ in VARIANTS], "models": {}}
    for m in b.cfg.run_models:
        src = b.eval_source(m.key)
        log(f"{m.key}: source top-1 {src['top1']:.4f} (published on this test batch: {m.expected_top1})")
        res["models"][m.key] = {
            "label": m.label, "source": b.source_info(m.key), "expected_source_top1": m.expected_top1,
            "source_top1": src["top1"], "source_per_class": src["per_class"], "test_images": src["n"],
            **{tag: variant(b, m.key, tag, changes, src) for tag, changes in VARIANTS},
        }
    return res
