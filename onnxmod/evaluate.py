"""Accuracy of models on labelled data (``onnxmod eval``).

:func:`evaluate` dispatches on the model kind (``onnxmod.kind`` metadata): source and
composed models get top-1/top-5/per-class recall (classes matched to the data's classes
by name), modules binary accuracy and AUC of their ``score`` for their class.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxmod import modelio, runtime
from onnxmod.data import Dataset, open_dataset
from onnxmod.errors import OnnxmodError
from onnxmod.progress import progress

ModelArg = onnx.ModelProto | str | os.PathLike


def _load(model: ModelArg) -> tuple[onnx.ModelProto, str]:
    if isinstance(model, onnx.ModelProto):
        return model, model.graph.name or "<model>"
    return modelio.load_model(model, check=True), str(model)


def model_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    """The single non-initializer graph input."""
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise OnnxmodError(f"expected a model with one input, got {len(inputs)}: {[i.name for i in inputs]}")
    return inputs[0]


def input_chw(model: onnx.ModelProto) -> tuple[int | None, int | None, int | None]:
    """(C, H, W) of the model's NCHW input; None for dims that are not fixed."""
    inp = model_input(model)
    t = inp.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim] if t.HasField("shape") else []
    if len(dims) != 4:
        raise OnnxmodError(f"model input '{inp.name}' must be 4-D [N, C, H, W], got rank {len(dims)}")
    return dims[1], dims[2], dims[3]


def _fixed_batch(model: onnx.ModelProto) -> int | None:
    t = model_input(model).type.tensor_type
    if t.HasField("shape") and t.shape.dim and t.shape.dim[0].HasField("dim_value") and t.shape.dim[0].dim_value > 0:
        return int(t.shape.dim[0].dim_value)
    return None


def model_class_names(model: onnx.ModelProto) -> list[str] | None:
    """Class names in output order from ``onnxmod.classes`` (names, or dicts with "name")."""
    classes = modelio.get_meta(model, modelio.CLASSES)
    if not classes or not isinstance(classes, list):
        return None
    return [str(c["name"]) if isinstance(c, dict) else str(c) for c in classes]


def _num_outputs(model: onnx.ModelProto) -> int | None:
    out = model.graph.output[0]
    t = out.type.tensor_type
    if t.HasField("shape") and len(t.shape.dim) == 2 and t.shape.dim[1].HasField("dim_value"):
        return int(t.shape.dim[1].dim_value)
    return None


def _adapt_channels(x: np.ndarray, c: int | None, data_path: Path) -> np.ndarray:
    if c is None or x.shape[1] == c:
        return x
    if x.shape[1] == 1 and c == 3:
        return np.repeat(x, 3, axis=1)
    raise OnnxmodError(f"{data_path}: images have {x.shape[1]} channels but the model expects {c}")


def evaluate_source(
    model_path_or_proto: ModelArg,
    dataset: Dataset | str | os.PathLike,
    device: str = "auto",
    batch_size: int = 256,
    limit: int | None = None,
    quiet: bool = False,
    split: str = "test",
    name: str | None = None,
    kind: str = "source",
    output: str | None = None,
    hits: bool = False,
) -> dict[str, Any]:
    """Top-1 / top-5 / per-class recall of a source classifier (logits ``[N, K]``).

    Also used for composed models (``kind="composed"``, ``output="probs"``): any
    ``[N, K]`` output whose argmax is the predicted class.

    Result keys (docs/DESIGN.md): model, kind, n, top1, top5 (None when K < 5), per_class
    {name: recall}; plus skipped (images of data classes the model lacks), skipped_classes,
    per_class_n, matched_by ("name" | "index"), num_classes, device. With ``hits``, also
    ``hits`` (bool ``[n]``, top-1 right or not) and ``indices`` (the images scored, in that order):
    what a paired comparison of two models on the same images needs.
    """
    model, label = _load(model_path_or_proto)
    label = name or label
    ds = dataset if isinstance(dataset, Dataset) else open_dataset(dataset, split)
    ds.require_labels("eval")
    c, h, w = input_chw(model)
    size = (h, w) if h is not None and w is not None else None

    names = model_class_names(model)
    k_model = len(names) if names is not None else _num_outputs(model)
    data_to_model = np.full(len(ds.classes), -1, dtype=np.int64)
    if names is not None:
        pos = {n: i for i, n in enumerate(names)}
        for d, n in enumerate(ds.classes):
            data_to_model[d] = pos.get(n, -1)
        matched_by = "name"
        if not (data_to_model >= 0).any():
            raise OnnxmodError(
                f"{ds.path}: none of the data classes ({', '.join(ds.classes[:5])}...) are classes of the model "
                f"({', '.join(names[:5])}...)")
    else:
        if k_model is None:
            raise OnnxmodError(f"{label}: no onnxmod.classes metadata and the number of outputs is not fixed")
        if k_model != len(ds.classes):
            raise OnnxmodError(
                f"{label}: has {k_model} outputs and no class names, but {ds.path} has {len(ds.classes)} classes")
        data_to_model[:] = np.arange(len(ds.classes))
        matched_by = "index"

    idx = ds.select(limit)
    keep = data_to_model[ds.labels[idx]] >= 0
    skipped = int((~keep).sum())
    skipped_classes = [n for d, n in enumerate(ds.classes) if data_to_model[d] < 0]
    idx = idx[keep]
    if len(idx) == 0:
        raise OnnxmodError(f"{ds.path}: no images of the model's classes to evaluate")

    fixed_batch = _fixed_batch(model)
    if fixed_batch is not None:  # graphs exported with a fixed batch size only take that many
        batch_size = fixed_batch
    sess = runtime.make_session(model, device=device, name=label)
    out_names = [o.name for o in sess.get_outputs()]
    if output is not None and output not in out_names:
        raise OnnxmodError(f"{label}: no output '{output}' (outputs: {', '.join(out_names)})")
    out_name = output or out_names[0]
    n_cls = len(ds.classes)
    correct1 = np.zeros(n_cls, np.int64)
    correct5 = np.zeros(n_cls, np.int64)
    support = np.zeros(n_cls, np.int64)
    k_seen = None
    hit_batches = []
    bar = progress(total=len(idx), desc="eval", quiet=quiet, unit="img")
    try:
        for x, y in ds.iter_batches(batch_size=batch_size, size=size, indices=idx):
            x = _adapt_channels(x, c, ds.path)
            (logits,) = runtime.run(sess, x, [out_name])
            if logits.ndim != 2 or logits.shape[0] != len(y):
                raise OnnxmodError(f"{label}: output '{out_name}' must be [N, K], got {list(logits.shape)}")
            k_seen = logits.shape[1]
            if names is not None and k_seen != len(names):
                raise OnnxmodError(f"{label}: {k_seen} outputs but onnxmod.classes lists {len(names)} classes")
            target = data_to_model[y]
            pred = logits.argmax(axis=1)
            hit1 = pred == target
            if k_seen >= 5:
                top5 = np.argpartition(-logits, 4, axis=1)[:, :5]
                hit5 = (top5 == target[:, None]).any(axis=1)
            else:
                hit5 = hit1
            np.add.at(support, y, 1)
            np.add.at(correct1, y, hit1.astype(np.int64))
            np.add.at(correct5, y, hit5.astype(np.int64))
            hit_batches.append(hit1)
            bar.update(len(y))
    finally:
        bar.close()

    n = int(support.sum())
    per_class = {ds.classes[d]: float(correct1[d] / support[d]) for d in range(n_cls) if support[d] > 0}
    per_class_n = {ds.classes[d]: int(support[d]) for d in range(n_cls) if support[d] > 0}
    result = {
        "model": label,
        "kind": kind,
        "n": n,
        "top1": float(correct1.sum() / n),
        "top5": float(correct5.sum() / n) if (k_seen or 0) >= 5 else None,
        "per_class": per_class,
        "per_class_n": per_class_n,
        "skipped": skipped,
        "skipped_classes": skipped_classes,
        "matched_by": matched_by,
        "num_classes": int(k_seen) if k_seen is not None else k_model,
        "data": str(ds.path),
        "device": runtime.session_device(sess),
    }
    if hits:
        result.update(hits=np.concatenate(hit_batches), indices=idx)
    return result


def evaluate_composed(model_path_or_proto: ModelArg, dataset: Dataset | str | os.PathLike, **kw: Any) -> dict[str, Any]:
    """Top-1 / top-5 / per-class recall of a composed model (its ``probs`` output).

    Classes are matched to the data's by name; images of data classes the model lacks
    are skipped and counted (``skipped``, ``skipped_classes``).
    """
    return evaluate_source(model_path_or_proto, dataset, kind="composed", output="probs", **kw)


def evaluate_module(
    model_path_or_proto: ModelArg,
    dataset: Dataset | str | os.PathLike,
    device: str = "auto",
    batch_size: int = 256,
    limit: int | None = None,
    quiet: bool = False,
    split: str = "test",
    name: str | None = None,
    threshold: float = 0.5,
) -> dict[str, Any]:
    """One-vs-rest quality of a module: ``score >= threshold`` against ``label == class``.

    The module's class is found in the data's classes by name (OnnxmodError when the
    data lacks it). Result: model, kind ("module"), n, binary_accuracy, auc (None when
    the data has only one of positives/negatives), class_name, positives, negatives,
    true_positive_rate, true_negative_rate, threshold, data, device.
    """
    from onnxmod.modulespec import SCORE, ModuleSpec
    from onnxmod.scoring import binary_auc

    model, label = _load(model_path_or_proto)
    label = name or label
    spec = ModuleSpec.from_model(model, label)
    ds = dataset if isinstance(dataset, Dataset) else open_dataset(dataset, split)
    ds.require_labels("eval")
    if spec.class_name not in ds.classes:
        raise OnnxmodError(f"{ds.path}: has no class '{spec.class_name}' (the module's class); "
                           f"data classes: {', '.join(ds.classes[:10])}{'...' if len(ds.classes) > 10 else ''}")
    target = ds.classes.index(spec.class_name)
    c, h, w = input_chw(model)
    size = (h, w) if h is not None and w is not None else None
    idx = ds.select(limit)
    if len(idx) == 0:
        raise OnnxmodError(f"{ds.path}: no images to evaluate")
    fixed_batch = _fixed_batch(model)
    if fixed_batch is not None:
        batch_size = fixed_batch
    sess = runtime.make_session(model, device=device, name=label)
    scores, positives = [], []
    bar = progress(total=len(idx), desc="eval", quiet=quiet, unit="img")
    try:
        for x, y in ds.iter_batches(batch_size=batch_size, size=size, indices=idx):
            x = _adapt_channels(x, c, ds.path)
            (s,) = runtime.run(sess, x, [SCORE])
            scores.append(np.asarray(s, dtype=np.float64).reshape(len(y), -1)[:, 0])
            positives.append(y == target)
            bar.update(len(y))
    finally:
        bar.close()
    s = np.concatenate(scores)
    pos = np.concatenate(positives)
    pred = s >= threshold
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return {
        "model": label,
        "kind": "module",
        "n": int(len(s)),
        "binary_accuracy": float((pred == pos).mean()),
        "auc": binary_auc(s, pos),
        "class_name": spec.class_name,
        "positives": n_pos,
        "negatives": n_neg,
        "true_positive_rate": float(pred[pos].mean()) if n_pos else None,
        "true_negative_rate": float((~pred[~pos]).mean()) if n_neg else None,
        "threshold": threshold,
        "data": str(ds.path),
        "device": runtime.session_device(sess),
    }


EVALUATORS = {"source": evaluate_source, "composed": evaluate_composed, "module": evaluate_module}


def evaluate(
    model_path_or_proto: ModelArg,
    dataset: Dataset | str | os.PathLike,
    device: str = "auto",
    batch_size: int = 256,
    limit: int | None = None,
    quiet: bool = False,
    split: str = "test",
) -> dict[str, Any]:
    """Evaluate any onnxmod model; dispatches on ``modelio.model_kind``."""
    model, label = _load(model_path_or_proto)
    kind = modelio.model_kind(model)
    fn = EVALUATORS.get(kind)
    if fn is None:
        raise OnnxmodError(f"{label}: evaluating a {kind} model is not supported yet")
    return fn(model, dataset, device=device, batch_size=batch_size, limit=limit, quiet=quiet, split=split,
              name=label)
