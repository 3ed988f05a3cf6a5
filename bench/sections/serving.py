"""serving: composed vs source throughput in onnxruntime (batch 1 and a big batch), for the
default modules and for a serving-oriented variant (every layer shared: one pruned, repaired
trunk with one row per class, ``SERVING_VARIANT``), whose accuracy is measured too."""

from __future__ import annotations

import time
from typing import Any

import onnx

from bench.common import SERVING_VARIANT, Bench, log, median, module_summary, pt


def throughput(sess: Any, x: Any, runs: int, repeats: int) -> tuple[float, list[float]]:
    from onnxmod import runtime

    runtime.run(sess, x)  # warm-up
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(runs):
            runtime.run(sess, x)
        rates.append(runs * len(x) / (time.perf_counter() - t))
    return median(rates), rates


def compare(b: Bench, s_sess: Any, c_sess: Any, what: str) -> dict[str, Any]:
    """Source and composed measured back to back, per batch size (load changes hit both)."""
    cfg = b.cfg
    x_big = next(b.test.iter_batches(cfg.serve_big_batch, size=(32, 32)))[0]
    out = {}
    for bs, x, runs in ((1, x_big[:1].copy(), cfg.serve_b1_images), (cfg.serve_big_batch, x_big, 1)):
        s_rate, s_all = throughput(s_sess, x, runs, cfg.serve_repeats)
        c_rate, c_all = throughput(c_sess, x, runs, cfg.serve_repeats)
        out[f"batch{bs}"] = {"source_img_s": s_rate, "composed_img_s": c_rate, "composed_over_source": c_rate / s_rate,
                             "source_repeats": s_all, "composed_repeats": c_all}
        log(f"{what} batch {bs}: source {s_rate:.0f} img/s, composed {c_rate:.0f} img/s ({c_rate / s_rate:.2f}x)")
    return out


def run(b: Bench) -> dict[str, Any]:
    from onnxmod import runtime
    from onnxmod.compose import compose_info
    from onnxmod.cost import count_macs, count_params

    cfg = b.cfg
    name, changes = SERVING_VARIANT
    res: dict[str, Any] = {"section": "serving", "threads": "onnxruntime default (all cores)",
                           "batch_sizes": [1, cfg.serve_big_batch], "repeats": cfg.serve_repeats,
                           "variant": {"name": name, "flags": changes}, "models": {}}
    for m in cfg.run_models:
        src_model = onnx.load(str(b.source(m.key)))
        s_sess = runtime.make_session(src_model, device=cfg.device)
        src_top1 = b.eval_source(m.key)["top1"]
        row: dict[str, Any] = {"label": m.label, "ort_device": runtime.session_device(s_sess),
                               "source_macs": count_macs(src_model), "source_params": count_params(src_model)}
        variants = [("default", b.default)]
        if cfg.variant_models is None or m.key in cfg.variant_models:
            variants.append(("variant", b.settings(**changes)))
        for tag, settings in variants:
            d, man = b.decompose(m.key, settings)
            model, _ = b.compose_dir(d, man)
            info = compose_info(model)
            c_macs = count_macs(model)
            entry = {"flags": {} if tag == "default" else changes, "composed_macs": c_macs,
                     "composed_over_source_macs": c_macs / row["source_macs"],
                     "module_macs_sum": info.get("module_macs_sum"),
                     "shared_by_dedup": 1.0 - c_macs / info["module_macs_sum"] if info.get("module_macs_sum") else None,
                     "composed_params": count_params(model), "composed_nodes": info.get("nodes"),
                     "mac_fraction_mean": module_summary(man)["mac_fraction"]["mean"],
                     **compare(b, s_sess, runtime.make_session(model, device=cfg.device), f"{m.key} {tag}")}
            if tag == "variant":
                ev = b.eval_composed(model, what=f"{m.key} serving variant")
                entry.update(composed_top1=ev["top1"], source_top1=src_top1, loss_pt=pt(src_top1, ev["top1"]),
                             test_images=ev["n"], decompose_s=man["bench"]["wall_s"])
            row[tag] = entry
        res["models"][m.key] = row
    return res
