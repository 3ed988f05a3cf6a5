"""cuda: the CUDA path against the CPU path on the same images, for each model's default decomposition
(repair trained where ``--device`` puts it; the cost section shares it):

  eval     ``onnxmod.evaluate`` of the source and the composed model on the test set with
           ``device="cuda"`` and ``"cpu"``: top-1 of each, images scored differently, images/s, ratio;
  outputs  one batch: largest |difference| of the source's logits and the composed probs, CUDA against
           CPU, and the composed model on CUDA against its modules run one by one on the CPU (the
           softmax of their logits, compose's rule for one source);
  repair   the torch execution repair trains (onnxmod.torchgraph) on CUDA against onnxruntime on the
           CPU (largest |logit difference| over the source and every module), in full fp32 and with
           torch's defaults (TF32 convolutions, what repair trains with), and seconds per repair step on
           each device at the same batch size, all modules together;
  serve    ``onnxmod serve --device cuda`` answering ``tritonclient.http`` (binary tensors): probs and
           labels against the CPU onnxruntime run of the same model.

Where torch or onnxruntime has no working CUDA, the section records why and measures nothing.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bench.common import Bench, log

BATCH = 256  # the one batch compared output by output, and the repair batch on both devices
REPAIR_STEPS = (3, 13)  # seconds per step = difference of two runs' times / difference of their steps
SERVE_IMAGES = 64


def why_no_cuda() -> str | None:
    import onnxruntime
    import torch

    from onnxmod import runtime

    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    if not runtime.probe_cuda():
        return f"onnxruntime {onnxruntime.__version__} has no working CUDA execution provider"
    return None


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def outputs_once(model: onnx.ModelProto, x: np.ndarray, device: str, names: list[str] | None = None) -> list[np.ndarray]:
    from onnxmod import runtime

    return runtime.run(runtime.make_session(model, device=device), x, names)


@contextlib.contextmanager
def torch_tf32(allowed: bool):
    import torch

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def compare_eval(model: onnx.ModelProto | Path, kind: str, ds: Any, devices: tuple[str, str]) -> dict[str, Any]:
    """Whole-dataset evaluation on both devices. A one-batch evaluation first keeps CUDA's one-time start-up out of
    the timing; each timed evaluation includes its own session's creation, as ``onnxmod eval`` does."""
    from onnxmod.evaluate import evaluate_composed, evaluate_source

    fn = evaluate_composed if kind == "composed" else evaluate_source
    out: dict[str, Any] = {}
    hits = {}
    for dev in devices:
        fn(model, ds, device=dev, quiet=True, limit=BATCH)
        t = time.perf_counter()
        r = fn(model, ds, device=dev, quiet=True, hits=True)
        s = time.perf_counter() - t
        hits[dev] = r["hits"]
        out[dev] = {"top1": r["top1"], "seconds": s, "images_per_s": r["n"] / s, "ort_device": r.get("device")}
    a, b = devices
    out["images"] = int(len(hits[a]))
    out["images_scored_differently"] = int(np.sum(hits[a] != hits[b]))
    out[f"{b}_over_{a}_throughput"] = out[b]["images_per_s"] / out[a]["images_per_s"]
    return out


def compare_repair(source: onnx.ModelProto, modules: list[onnx.ModelProto], classes: list[int], x: np.ndarray,
                   devices: tuple[str, str]) -> dict[str, Any]:
    import torch

    from onnxmod.repair import RepairSettings, repair, torch_device
    from onnxmod.torchgraph import TorchGraph

    out: dict[str, Any] = {}
    cpu_out = [outputs_once(g, x, "cpu")[0] for g in [source, *modules]]
    for dev in devices:
        tdev = torch_device(dev)
        diffs = {}
        for tag, tf32 in (("fp32", False), ("torch_default", torch.backends.cudnn.allow_tf32)):
            with torch.no_grad(), torch_tf32(tf32):
                xt = torch.from_numpy(x).to(tdev)
                diffs[tag] = [max_abs(TorchGraph(g).to(tdev)(xt)[0].cpu().numpy(), ref)
                              for g, ref in zip([source, *modules], cpu_out)]
        seconds = []
        for steps in REPAIR_STEPS:
            rs = RepairSettings(epochs=0, min_steps=steps, batch_size=BATCH, lr=1e-3)
            seconds.append(repair(modules, source, classes, x, rs, device=dev, quiet=True)[1]["seconds"])
        out[dev] = {"torch": str(tdev), "max_abs_logit_diff_vs_onnxruntime_cpu": max(diffs["fp32"]),
                    "max_abs_logit_diff_vs_onnxruntime_cpu_torch_default": max(diffs["torch_default"]),
                    "per_graph_max_abs": diffs["fp32"],
                    "seconds_per_step": (seconds[1] - seconds[0]) / (REPAIR_STEPS[1] - REPAIR_STEPS[0]),
                    "run_seconds": dict(zip(map(str, REPAIR_STEPS), seconds))}
    a, b = devices
    out[f"{a}_over_{b}_seconds_per_step"] = out[a]["seconds_per_step"] / out[b]["seconds_per_step"]
    out.update(batch=BATCH, modules=len(modules))
    return out


def compare_serve(path: Path, x: np.ndarray, device: str) -> dict[str, Any]:
    import tritonclient.http as triton

    from onnxmod.serve.server import ServeSettings, load_models, serve_in_thread

    probs_cpu, label_cpu = outputs_once(onnx.load(str(path)), x, "cpu", ["probs", "label"])
    models = load_models([path], ["m"], device=device)
    with serve_in_thread(models, ServeSettings(port=0, device=device)) as url:
        client = triton.InferenceServerClient(url.removeprefix("http://"))
        try:
            inp = triton.InferInput("input", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=True)
            r = client.infer("m", [inp], outputs=[triton.InferRequestedOutput(o, binary_data=True)
                                                  for o in ("probs", "label")])
            meta = client.get_model_metadata("m")
        finally:
            client.close()
    return {"server_device": models[0].device, "images": int(len(x)),
            "max_abs_probs_diff_vs_cpu": max_abs(r.as_numpy("probs"), probs_cpu),
            "labels_differing": int(np.sum(r.as_numpy("label") != label_cpu)), "platform": meta.get("platform")}


def compare_model(b: Bench, key: str, devices: tuple[str, str]) -> dict[str, Any]:
    from onnxmod.decompose import prepare_source

    d, man = b.decompose(key, b.default)
    composed, _ = b.compose_dir(d, man)
    composed_path = b.cfg.work / f"cuda-{key}-composed.onnx"
    onnx.save(composed, str(composed_path))
    modules = [onnx.load(str(d / m["file"])) for m in man["modules"]]
    source = prepare_source(b.source(key)).model
    x = next(b.test.iter_batches(BATCH, size=(32, 32)))[0]
    a, other = devices
    src_a, src_b = (outputs_once(source, x, dev)[0] for dev in devices)
    probs_a, probs_b = (outputs_once(composed, x, dev, ["probs"])[0] for dev in devices)
    one_by_one = softmax(np.concatenate([outputs_once(g, x, "cpu", ["logit"])[0] for g in modules], axis=1))
    row = {
        "eval": {"source": compare_eval(b.source(key), "source", b.test, devices),
                 "composed": compare_eval(composed, "composed", b.test, devices)},
        "outputs": {"images": BATCH,
                    "source_logits_max_abs": max_abs(src_a, src_b),
                    "composed_probs_max_abs": max_abs(probs_a, probs_b),
                    f"composed_on_{other}_vs_modules_one_by_one_on_cpu_max_abs": max_abs(probs_b, one_by_one),
                    "composed_argmax_differing": int(np.sum(probs_a.argmax(1) != probs_b.argmax(1)))},
        "repair": compare_repair(source, modules, [m["class_index"] for m in man["modules"]], x, devices),
        "serve": compare_serve(composed_path, x[:SERVE_IMAGES], other),
        "module_dir": str(d), "repair_report": man.get("repair"),
    }
    ev = row["eval"]["composed"]
    log(f"{key}: composed eval {ev[a]['images_per_s']:.0f} img/s on {a}, {ev[other]['images_per_s']:.0f} on {other}; "
        f"probs max |diff| {row['outputs']['composed_probs_max_abs']:.2e}; repair "
        f"{row['repair'][a]['seconds_per_step']:.3f} vs {row['repair'][other]['seconds_per_step']:.3f} s/step")
    return row


def run(b: Bench, devices: tuple[str, str] = ("cpu", "cuda")) -> dict[str, Any]:
    res: dict[str, Any] = {"section": "cuda", "devices": list(devices), "batch": BATCH, "repair_steps": list(REPAIR_STEPS),
                           "models": {}}
    reason = why_no_cuda() if "cuda" in devices else None
    if reason:
        log(f"cuda: skipped ({reason})")
        return {**res, "skipped": reason}
    for m in b.cfg.run_models:
        res["models"][m.key] = {"label": m.label, **compare_model(b, m.key, devices)}
    return res
