"""replace: the weaker model's weakest class served by the stronger model's module.

The class is chosen on held-out TRAINING images -- training images decompose did not use for
calibration (``onnxmod.decompose.calibration_indices`` with the same seed), a class-balanced
sample -- as the class the weaker model's composed model recognises worst; never on the test
set it is then scored on. With a data dir too small for such a sample (e.g. only
``data_batch_1``, all of it calibration), the choice falls back to the calibration images
(still training images, not test) and the JSON says so. The result is scored on the test set
against the composed model before the replacement AND against the source.

Then the same on the source itself (``on_source``): the weaker source's weakest class on the same
selection images (the source's recall there), served by a module of the stronger model in
``replace SOURCE.onnx``; every other class stays the source graph's. The source's temperature, needed
next to a module of another source, is fitted on the calibration data (training images). Two donors
(``DONORS``): the class's module of the stronger model's default decomposition, and its module from
``decompose --classes C --target-macs 1.0`` (nothing pruned: the stronger model's own logit for C). The
one whose replaced model scores the higher top-1 on the selection images is the result; both are scored
on the test set and recorded."""

from __future__ import annotations

from typing import Any

import numpy as np

from bench.common import Bench, balanced_indices, log, paired, pt, subset_view

# on_source donors: name -> (what, decompose --classes C --target-macs, or None for the default decomposition's)
DONORS = {"default": ("the default decomposition's module", None),
          "unpruned": ("decompose --classes C --target-macs 1.0", 1.0)}


def selection_images(b: Bench) -> tuple[Any, dict[str, Any]]:
    """Training images to choose the class on, and what they are."""
    from onnxmod.decompose import calibration_indices

    cfg, s = b.cfg, b.default
    identity = np.arange(len(b.train.classes), dtype=np.int64)
    calib = calibration_indices(b.train, identity, s.calibration_per_class(len(identity)), s.seed)
    rest = np.setdiff1d(np.arange(len(b.train)), calib)
    counts = np.bincount(b.train.labels[rest], minlength=len(b.train.classes))
    info = {"train_images": len(b.train), "calibration_images": int(len(calib)),
            "held_out_available_min_per_class": int(counts.min())}
    if counts.min() >= cfg.heldout_min_per_class:
        idx = balanced_indices(b.train.labels, cfg.heldout_per_class, seed=1, among=rest)
        info.update(images="held-out training images (not used for calibration)", held_out=True)
    else:
        idx = balanced_indices(b.train.labels, cfg.heldout_per_class, seed=1, among=calib)
        info.update(images="calibration images (training images decompose used; the test set is not used)",
                    held_out=False,
                    why=f"only {int(counts.min())} training images of some class are outside the calibration set "
                        f"(< {cfg.heldout_min_per_class}); pass a data dir with more training batches")
    info["selection_images"] = int(len(idx))
    return subset_view(b.train, idx, info["images"]), info


def run(b: Bench) -> dict[str, Any]:
    from onnxmod import modelio
    from onnxmod.compose import replace

    cfg = b.cfg
    src = {m.key: b.eval_source(m.key) for m in cfg.models}
    weak, strong = cfg.models[0].key, cfg.models[1].key  # the weaker (published top-1) model first
    d_weak, man_weak = b.decompose(weak, b.default)
    d_strong, man_strong = b.decompose(strong, b.default)
    base, _ = b.compose_dir(d_weak, man_weak)

    sel_ds, sel = selection_images(b)
    base_sel = b.eval_composed(base, sel_ds, what=f"{weak} composed on {sel['images']}")
    src_sel = b.eval_source(weak, sel_ds, tag="replace selection images")
    cls = min(base_sel["per_class"], key=base_sel["per_class"].get)
    log(f"replace: {weak}'s weakest class on {sel['selection_images']} {sel['images']}: '{cls}' "
        f"({base_sel['per_class'][cls]:.3f})")

    module = d_strong / next(mm["file"] for mm in man_strong["modules"] if mm["class_name"] == cls)
    after = replace(d_weak, cls, module)
    path = cfg.work / f"replace-{weak}-{cls}.onnx"
    modelio.save_model(after, path)
    before_ev = b.eval_composed(base, what=f"{weak} composed (before)")
    after_ev = b.eval_composed(after, what=f"{weak} with {strong}'s '{cls}' (after)")
    s_w, s_s = src[weak], src[strong]
    log(f"replace: '{cls}' recall source {s_w['per_class'][cls]:.3f} / before {before_ev['per_class'][cls]:.3f} / "
        f"after {after_ev['per_class'][cls]:.3f}; top-1 source {s_w['top1']:.4f} / before {before_ev['top1']:.4f} / "
        f"after {after_ev['top1']:.4f}")
    return {
        "section": "replace", "base": weak, "donor": strong, "class": cls, "module": str(module),
        "base_label": cfg.model(weak).label, "donor_label": cfg.model(strong).label,
        "selection": {**sel, "composed_recall": base_sel["per_class"], "source_recall": src_sel["per_class"]},
        "test_images": after_ev["n"],
        "top1": {"source": s_w["top1"], "before": before_ev["top1"], "after": after_ev["top1"],
                 "donor_source": s_s["top1"]},
        "class_recall": {"source": s_w["per_class"][cls], "before": before_ev["per_class"][cls],
                         "after": after_ev["per_class"][cls], "donor_source": s_s["per_class"][cls]},
        "delta_vs_before_pt": pt(after_ev["top1"], before_ev["top1"]),
        "delta_vs_source_pt": pt(after_ev["top1"], s_w["top1"]),
        "paired_vs_before": paired(after_ev, before_ev), "paired_vs_source": paired(after_ev, s_w),
        "class_delta_vs_source_pt": pt(after_ev["per_class"][cls], s_w["per_class"][cls]),
        "per_class": {c: {"source": s_w["per_class"][c], "before": before_ev["per_class"][c],
                          "after": after_ev["per_class"][c], "donor_source": s_s["per_class"][c]}
                      for c in before_ev["per_class"]},
        "file": str(path),
        "on_source": on_source(b, weak, strong, d_strong, man_strong, sel_ds, src_sel, s_w, s_s),
    }


def on_source(b: Bench, weak: str, strong: str, d_strong: Any, man_strong: dict[str, Any], sel_ds: Any,
              src_sel: dict[str, Any], s_w: dict[str, Any], s_s: dict[str, Any]) -> dict[str, Any]:
    """``replace WEAK_SOURCE.onnx --class C --with STRONG_MODULE --calib TRAIN``: C is the class the weak
    source recognises worst on the selection images; each of ``DONORS`` is tried, the one the selection images
    prefer is the result, and all are scored on the test set against that source."""
    import dataclasses

    from onnxmod import modelio
    from onnxmod.compose import compose_info, replace

    cls = min(src_sel["per_class"], key=src_sel["per_class"].get)
    source_macs = b.source_info(weak)["macs"]
    donors: dict[str, dict[str, Any]] = {}
    for name, (what, target) in DONORS.items():
        if target is None:
            d, man = d_strong, man_strong
        else:
            d, man = b.decompose(strong, dataclasses.replace(b.default, target_macs=target), classes=[cls])
        module = d / next(mm["file"] for mm in man["modules"] if mm["class_name"] == cls)
        after = replace(b.source(weak), cls, module, calib=b.cfg.calib, device=b.cfg.device)
        path = b.cfg.work / f"replace-source-{weak}-{cls}-{name}.onnx"
        modelio.save_model(after, path)
        sel = b.eval_composed(after, sel_ds, what=f"{weak} source with {strong}'s '{cls}' ({name}) on selection images")
        ev = b.eval_composed(after, what=f"{weak} source with {strong}'s '{cls}' ({name})")
        log(f"replace on the source ({name}): '{cls}' recall {s_w['per_class'][cls]:.3f} -> {ev['per_class'][cls]:.3f}; "
            f"top-1 {s_w['top1']:.4f} -> {ev['top1']:.4f}; selection top-1 {src_sel['top1']:.4f} -> {sel['top1']:.4f}")
        donors[name] = {
            "what": what, "module": str(module), "macs_over_source": compose_info(after)["macs"] / source_macs,
            "selection": {"top1": sel["top1"], "class_recall": sel["per_class"][cls]},
            "test_images": ev["n"], "top1": {"source": s_w["top1"], "after": ev["top1"]},
            "class_recall": {"source": s_w["per_class"][cls], "after": ev["per_class"][cls],
                             "donor_source": s_s["per_class"][cls]},
            "delta_vs_source_pt": pt(ev["top1"], s_w["top1"]), "paired_vs_source": paired(ev, s_w),
            "class_delta_vs_source_pt": pt(ev["per_class"][cls], s_w["per_class"][cls]),
            "per_class": {c: {"source": s_w["per_class"][c], "after": ev["per_class"][c]} for c in ev["per_class"]},
            "file": str(path)}
    chosen = max(donors, key=lambda n: donors[n]["selection"]["top1"])  # on training images, never the test set
    return {"class": cls, "selection_source_recall": src_sel["per_class"][cls], "selection_source_top1": src_sel["top1"],
            "chosen": chosen, "donors": donors, **donors[chosen]}
