"""subset: models for a sub-task. ``decompose --classes cat,dog`` (default flags otherwise), the
two modules composed, against the source restricted to those two logits (argmax over the two
columns), on the test images of those two classes: accuracy and MACs. Then the rows sized by the
deployed model (``Config.subset_budgeted``): ``--classes ... --composed-macs F``, each calibrated
on the labelled training split (repair adds the sub-task's cross-entropy, ``label_weight``) and on
the same images without labels (an .npz of the images alone: the source labels them, and repair
is pure distillation), against the same restricted source on the same test images."""

from __future__ import annotations

from typing import Any

import onnx

from bench.common import Bench, class_view, eval_restricted, log, module_summary, paired, pt


def run(b: Bench) -> dict[str, Any]:
    from onnxmod.cost import count_macs

    cfg = b.cfg
    key, names = cfg.subset_model, cfg.subset_classes
    images = class_view(b.test, names, "test images")
    d, man = b.decompose(key, b.default, classes=names)
    composed, compose_s = b.compose_dir(d, man)
    ev = b.eval_composed(composed, images, what=f"{key} {'+'.join(names)} composed")
    source = onnx.load(str(b.source(key)))
    log(f"{key}: source restricted to {names} on {len(images)} images")
    src = eval_restricted(source, names, images, cfg.device)
    full = b.eval_source(key)  # the unrestricted source: its recall of these classes among all 10
    c_macs, s_macs = count_macs(composed), count_macs(source)
    log(f"subset {names}: composed {ev['top1']:.4f} vs restricted source {src['top1']:.4f} "
        f"({pt(ev['top1'], src['top1']):+.2f} pt) at {c_macs / s_macs:.2f}x the source's MACs")
    budgeted = [budgeted_row(b, key, cls, frac, unlabelled) for cls, frac in cfg.subset_budgeted
                for unlabelled in (False, True)]
    return {
        "section": "subset", "budgeted": budgeted, "model": key, "label": cfg.model(key).label, "classes": names,
        "baseline": f"the source restricted to the {len(names)} logits of {', '.join(names)} (argmax over those columns)",
        "test_images": ev["n"], "composed_top1": ev["top1"], "composed_per_class": ev["per_class"],
        "source_restricted_top1": src["top1"], "source_restricted_per_class": src["per_class"],
        "source_10class_recall": {n: full["per_class"][n] for n in names},
        "delta_pt": pt(ev["top1"], src["top1"]), "paired": paired(ev, src),
        "composed_macs": c_macs, "source_macs": s_macs, "composed_over_source_macs": c_macs / s_macs,
        "modules": module_summary(man), "repair": man.get("repair"),
        "decompose_run": man["bench"], "compose_s": compose_s, "module_dir": str(d),
    }


def budgeted_row(b: Bench, key: str, names: list[str], fraction: float, unlabelled: bool) -> dict[str, Any]:
    """``--classes NAMES --composed-macs FRACTION`` on labelled or unlabelled calibration data, composed,
    against the source restricted to those logits on those classes' test images."""
    from onnxmod.cost import count_macs

    images = class_view(b.test, names, "test images")
    d, man = b.decompose(key, b.settings(composed_macs=fraction), classes=names, unlabelled=unlabelled)
    composed, _ = b.compose_dir(d, man)
    what = f"{key} {'+'.join(names)} --composed-macs {fraction:g}{' unlabelled' if unlabelled else ''}"
    ev = b.eval_composed(composed, images, what=what)
    src = eval_restricted(onnx.load(str(b.source(key))), names, images, b.cfg.device)
    over = count_macs(composed) / count_macs(onnx.load(str(b.source(key))))
    log(f"subset {what}: {ev['top1']:.4f} vs restricted source {src['top1']:.4f} "
        f"({pt(ev['top1'], src['top1']):+.2f} pt) at {over:.3f}x")
    repair = man.get("repair") or {}
    return {"classes": names, "composed_macs_flag": fraction, "labels": not unlabelled,
            "calibration_labels": man["settings"].get("calibration_labels"),
            "label_weight": repair.get("label_weight"), "labelled_images": repair.get("labelled_images"),
            "test_images": ev["n"], "composed_top1": ev["top1"], "source_restricted_top1": src["top1"],
            "delta_pt": pt(ev["top1"], src["top1"]), "paired": paired(ev, src),
            "composed_over_source_macs": over, "composition": man.get("composition"),
            "modules": module_summary(man), "decompose_run": man["bench"], "module_dir": str(d)}
