"""reuse: classes from two different sources composed into one model (2 from the first model,
2 from the second, default modules), against each source restricted to the same 4 logits
(argmax over those 4 columns: the best each source does on the 4-class task without
retraining), on the test images of those 4 classes."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from bench.common import Bench, class_view, eval_restricted, log, paired, pt


def run(b: Bench) -> dict[str, Any]:
    from onnxmod import modelio
    from onnxmod.compose import compose
    from onnxmod.cost import count_macs

    cfg = b.cfg
    files, classes, origin = [], [], []
    for key, names in cfg.reuse:
        d, man = b.decompose(key, b.default)
        by_name = {mm["class_name"]: d / mm["file"] for mm in man["modules"]}
        files += [by_name[n] for n in names]
        classes += names
        origin += [key] * len(names)
    model = compose(files)
    path = cfg.work / "reuse-4class.onnx"
    modelio.save_model(model, path)
    images = class_view(b.test, classes, "test images")
    ev = b.eval_composed(model, images, what=f"reuse {list(zip(origin, classes))}")
    sources, restricted = {}, {}
    for key in dict.fromkeys(origin):
        log(f"reuse: {key} restricted to {classes}")
        src = onnx.load(str(b.source(key)))
        r = restricted[key] = eval_restricted(src, classes, images, cfg.device)
        sources[key] = {"label": cfg.model(key).label, "top1": r["top1"], "per_class": r["per_class"],
                        "macs": count_macs(src)}
    mean_src = float(np.mean([s["top1"] for s in sources.values()]))
    log(f"reuse: composed {ev['top1']:.4f} vs mean of restricted sources {mean_src:.4f}")
    return {
        "section": "reuse", "classes": [{"class": c, "from": k} for c, k in zip(classes, origin)],
        "baseline": "each source restricted to the same 4 logits (argmax over those columns), same images",
        "test_images": ev["n"], "composed_top1": ev["top1"], "composed_per_class": ev["per_class"],
        "composed_macs": count_macs(model), "sources_restricted": sources,
        "delta_vs_mean_source_pt": pt(ev["top1"], mean_src),
        "delta_vs_each_source_pt": {k: pt(ev["top1"], s["top1"]) for k, s in sources.items()},
        "paired_vs_mean_source": paired(ev, *restricted.values()),
        "paired_vs_each_source": {k: paired(ev, r) for k, r in restricted.items()},
        "file": str(path),
    }
