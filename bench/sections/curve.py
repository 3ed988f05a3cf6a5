"""curve: loss vs mean module MACs for the three ways of making modules -- training-free
(``--no-repair``), layer-wise reconstruction (``--no-repair --reconstruct``) and repair by
distillation (the default) -- at a few ``target_macs`` per model.

The default point (repair, default target) and the training-free point at the default target
are the cost section's decompositions, scored on the whole test set; the other points are
scored on a fixed class-balanced test subset (``Config.curve_limit``), each against the source
on the same images."""

from __future__ import annotations

from typing import Any

from bench.common import Bench, balanced_indices, log, module_summary, pt, subset_view

METHODS = (("training-free", {"repair": False}), ("reconstruct", {"repair": False, "reconstruct": True}),
           ("repair", {}))


def run(b: Bench) -> dict[str, Any]:
    cfg = b.cfg
    per = None if cfg.curve_limit is None else max(1, cfg.curve_limit // len(b.test.classes))
    sub_idx = balanced_indices(b.test.labels, per)
    subset = subset_view(b.test, sub_idx, f"{len(sub_idx)}-image balanced subset, seed 0")
    targets = sorted(set(cfg.curve_targets) | {b.default.target_macs})
    res: dict[str, Any] = {"section": "curve", "targets": targets, "methods": [n for n, _ in METHODS],
                           "default_target_macs": b.default.target_macs,
                           "subset": {"images": int(len(sub_idx)), "balanced": True, "seed": 0, "of": len(b.test)},
                           "models": {}}
    for m in [m for m in cfg.run_models if cfg.curve_models is None or m.key in cfg.curve_models]:
        full_src = b.eval_source(m.key)
        sub_src = b.eval_source(m.key, subset, tag="curve subset")
        points = []
        for method, changes in METHODS:
            for t in targets:
                settings = b.settings(target_macs=t, **changes)
                # the cost section's two decompositions are scored on the whole test set
                whole = t == b.default.target_macs and method in ("repair", "training-free")
                ds, src = (b.test, full_src) if whole else (subset, sub_src)
                d, man = b.decompose(m.key, settings)
                model, _ = b.compose_dir(d, man)
                ev = b.eval_composed(model, ds, what=f"{m.key} {method} t={t:g}")
                summ = module_summary(man)
                log(f"{m.key} {method} target {t:g}: mean module MACs {summ['mac_fraction']['mean']:.3f}, "
                    f"loss {pt(src['top1'], ev['top1']):.2f} pt on {ev['n']} images")
                points.append({"method": method, "target_macs": t, "flags": changes,
                               "is_default": method == "repair" and t == b.default.target_macs,
                               "mac_fraction_mean": summ["mac_fraction"]["mean"],
                               "param_fraction_mean": summ["param_fraction"]["mean"],
                               "composed_top1": ev["top1"], "source_top1": src["top1"],
                               "loss_pt": pt(src["top1"], ev["top1"]), "test_images": ev["n"],
                               "whole_test_set": whole, "decompose_s": man["bench"]["wall_s"],
                               "decompose_reused": man["bench"]["reused_from_disk"]})
        res["models"][m.key] = {"label": m.label, "source_top1": full_src["top1"],
                                "source_top1_subset": sub_src["top1"], "points": points}
    return res
