"""A source classifier as a member of ``compose`` and ``replace``: one member per class, from the source graph.

The source is read as ``decompose`` reads it (:func:`onnxmod.decompose.prepare_source`: the same
front-end and baked preprocessing its modules got, canonical input ``input`` in [0, 1]). Its class
``c`` is the member that reads column ``c`` of the source's logits; compose adds the source graph
once for all its classes, so the composed logits of a source's classes are the source's own, and
identical computation with its modules (the prologue, layers a module kept whole) is merged as
between modules. Each class records a module's metadata (:class:`ModuleSpec`: kept fractions 1.0,
calibration method ``source``: no Platt fit, its score is sigmoid(logit)), so a composed model
holding a source extracts and replaces like any other.

What a source member needs (docs/DESIGN.md, "Source members"):

* class names: ``onnxmod.classes`` metadata, else a classes file, else an error;
* preprocessing: ``onnxmod.preprocess`` metadata, else what its modules among the members
  recorded (decompose baked it into them), else none (the graph is taken to read [0, 1] pixels);
* a temperature, only next to other sources: its modules' (decompose fitted it on its calibration
  data), else fitted here on labelled calibration data (``--calib``), else an error.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx

from onnxmod import modelio
from onnxmod.errors import OnnxmodError
from onnxmod.modulespec import Calibration, ModuleSpec, SourceInfo

SOURCE_METHOD = "source"  # Calibration.method of a source's class: its raw logit, no Platt fit
TEMPERATURE_IMAGES = 5000  # labelled images a source's temperature is fitted on (fixed-seed sample)

log = logging.getLogger("onnxmod")


def preprocess_args(model: onnx.ModelProto, own: Sequence[Any]) -> dict[str, Any]:
    """:func:`prepare_source` keyword arguments that read the source as decompose read it for ``own``
    (members that are modules of this source): its own metadata first, as decompose does."""
    if not own:
        return {}
    pre = own[0].spec.preprocess or {}
    kw: dict[str, Any] = {"data_size": pre.get("input_size")}  # a dynamic H/W fixed as for the modules
    steps = modelio.get_meta(own[0].model, modelio.FRONTEND) or []
    if any(isinstance(s, dict) and s.get("step") == "nhwc_input" and s.get("detected_from") == "--layout nhwc"
           for s in steps):
        kw["layout"] = "nhwc"
    # decompose's --mean/--std/--scale left no trace in the source: the modules' record is the only one.
    # "assumed" = decompose had neither flags nor metadata and baked nothing in
    if (not modelio.get_meta(model, modelio.PREPROCESS) and not pre.get("assumed")
            and all(k in pre for k in ("mean", "std", "scale"))):
        kw.update(mean=pre["mean"], std=pre["std"], scale=pre["scale"])
    return kw


def class_names(model: onnx.ModelProto, k: int, names: Sequence[str] | None, where: str) -> list[str]:
    """A source's class names: its ``onnxmod.classes`` metadata, else ``names`` (a classes file), else an error."""
    meta = modelio.get_meta(model, modelio.CLASSES)
    if meta:
        if names is not None:
            raise OnnxmodError(f"{where}: has onnxmod.classes metadata; --classes-file is for sources without it")
        out = [c["name"] if isinstance(c, dict) else str(c) for c in meta]
    elif names is None:
        raise OnnxmodError(f"{where}: a source member needs class names: it has no onnxmod.classes metadata; "
                           f"give --classes-file FILE (one name per line, {k} lines in output order)")
    else:
        out = list(names)
    if len(out) != k:
        raise OnnxmodError(f"{where}: {len(out)} class names for its {k} outputs")
    return out


def fit_temperature(model: onnx.ModelProto, classes: list[str], chw: tuple[int, int, int], calib: str | os.PathLike,
                    device: str, where: str) -> tuple[float, int]:
    """The source's temperature on labelled ``calib`` images (its classes matched by name), as decompose fits it.

    Returns (T, images used)."""
    from onnxmod import runtime, scoring
    from onnxmod.data import open_dataset

    ds = open_dataset(calib, split="train")
    ds.require_labels(f"fitting the temperature of {where}")
    label_map = np.array([classes.index(c) if c in classes else -1 for c in ds.classes], dtype=np.int64)
    usable = np.nonzero(label_map[ds.labels] >= 0)[0]
    if not len(usable):
        raise OnnxmodError(f"{calib}: none of its classes ({', '.join(ds.classes[:5])}) is a class of {where}")
    idx = np.sort(np.random.default_rng(0).permutation(usable)[:TEMPERATURE_IMAGES])
    sess = runtime.make_session(model, device=device, name=where)
    logits, labels = [], []
    for x, y in ds.iter_batches(256, size=chw[1:], indices=idx):
        logits.append(runtime.run(sess, x)[0])
        labels.append(label_map[y])
    return scoring.fit_temperature(np.concatenate(logits), np.concatenate(labels)), int(len(idx))


def temperature_fit(model: onnx.ModelProto, classes: list[str], chw: tuple[int, int, int],
                    calib: str | os.PathLike | None, device: str, where: str) -> Callable[[], tuple[float, int]] | None:
    """The deferred :func:`fit_temperature` of one source graph (run once, only when compose needs the
    temperature: after the cheap checks), or None without ``calib``."""
    if calib is None:
        return None
    return functools.cache(lambda: fit_temperature(model, classes, chw, calib, device, where))


def with_temperature(member: Any, temperature: float, samples: int) -> None:
    """Record a temperature fitted for a source member (in place): its spec and the metadata compose writes."""
    cal = dataclasses.replace(member.spec.calibration, temperature=float(temperature), samples=int(samples),
                              temperature_fitted=True)
    member.spec = dataclasses.replace(member.spec, calibration=cal)
    if member.metadata is not None:
        member.metadata = {**member.metadata, modelio.CALIBRATION: json.dumps(dataclasses.asdict(cal))}


def load_source(path: str | os.PathLike, own: Sequence[Any], names: Sequence[str] | None = None,
                calib: str | os.PathLike | None = None, device: str = "cpu",
                raw: onnx.ModelProto | None = None) -> list[Any]:
    """The members (one per class, output order) of the source classifier at ``path``.

    ``own``: members that are modules of this source (same file sha256): its preprocessing and
    temperature are read from them. ``names``: class names for a source without ``onnxmod.classes``.
    ``calib``: labelled images to fit the temperature on, should compose need it (next to other
    sources) and no module of this source have one. ``raw``: the file as loaded, when the caller has it.
    """
    from onnxmod.compose import Member, _input_info, _runs
    from onnxmod.decompose import prepare_source

    p, where = Path(path), str(path)
    raw = raw if raw is not None else modelio.load_model(p)
    src = prepare_source(p, **preprocess_args(raw, own))
    k = len(src.classes)
    classes = class_names(raw, k, names, where)
    modelio.check_input(src.model, where)
    chw, batch = _input_info(src.model, where)
    logits = src.model.graph.output[0].name
    _runs(src.model, chw, where, logits)
    if not modelio.get_meta(raw, modelio.PREPROCESS) and not own:
        log.warning(f"{where}: no onnxmod.preprocess metadata: its input is taken as [0, 1] pixels "
                    "(onnxmod export writes the metadata)")
    known = [m.spec.calibration for m in own if m.spec.calibration.temperature_fitted]
    # decompose fitted the source's temperature on its calibration data; else compose fits it when needed
    cal = Calibration(SOURCE_METHOD, 1.0, 0.0, float(known[0].temperature) if known else 1.0, 0,
                      temperature_fitted=bool(known))
    fit = None if known else temperature_fit(src.model, classes, chw, calib, device, where)
    info = SourceInfo(src.name, src.sha256, k, src.params, src.macs)
    kept = {"param_fraction": 1.0, "flop_fraction": 1.0, "target_macs": 1.0}
    out = []
    for c, name in enumerate(classes):
        spec = ModuleSpec(name, c, info, kept, cal, dict(src.preprocess))
        meta = spec.to_metadata()
        if src.frontend_steps:
            meta[modelio.FRONTEND] = src.frontend_steps
        out.append(Member(src.model, spec, f"{where}[{name}]", src.sha256, p, chw, batch, column=c, logits=logits,
                          metadata={key: v if isinstance(v, str) else json.dumps(v) for key, v in meta.items()},
                          fit_temperature=fit))
    return out
