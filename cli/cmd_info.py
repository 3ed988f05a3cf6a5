"""`onnxmod info FILE.onnx`: kind, classes, inputs/outputs, params, MACs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import onnx

from onnxmod import modelio
from onnxmod.cli.common import emit, fmt_count, json_option, quiet_option
from onnxmod.cli.main import cli
from onnxmod.cost import count_macs, count_params
from onnxmod.errors import OnnxmodError


def _dtype_name(elem_type: int) -> str:
    try:
        return str(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except Exception:
        return onnx.TensorProto.DataType.Name(elem_type).lower()


def _value_info(vi: onnx.ValueInfoProto) -> dict[str, Any]:
    t = vi.type.tensor_type
    shape = None
    if vi.type.HasField("tensor_type") and t.HasField("shape"):
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
    return {"name": vi.name, "shape": shape, "dtype": _dtype_name(t.elem_type) if t.elem_type else None}


def model_info(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    model = modelio.load_model(p)
    kind = modelio.model_kind(model)
    inits = {i.name for i in model.graph.initializer}
    inputs = [_value_info(i) for i in model.graph.input if i.name not in inits]
    outputs = [_value_info(o) for o in model.graph.output]
    if kind == "module":
        name = modelio.get_meta(model, modelio.CLASS_NAME, as_json=False)
        classes = [name] if name is not None else None
    else:
        meta = modelio.get_meta(model, modelio.CLASSES)
        classes = [c["name"] if isinstance(c, dict) and "name" in c else c for c in meta] if isinstance(meta, list) else None
    try:
        macs: int | None = count_macs(model)
        macs_error = None
    except OnnxmodError as e:
        macs, macs_error = None, str(e)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    info: dict[str, Any] = {
        "file": str(p),
        "kind": kind,
        "inputs": inputs,
        "outputs": outputs,
        "classes": classes,
        "params": count_params(model),
        "macs": macs,
        "opset": opset,
        "ir_version": model.ir_version,
        "producer": " ".join(x for x in (model.producer_name, model.producer_version) if x) or None,
        "file_size": p.stat().st_size,
        "nodes": len(model.graph.node),
    }
    if macs_error:
        info["macs_error"] = macs_error
    if kind == "module":
        for key, meta_key in (("kept", modelio.KEPT), ("calibration", modelio.CALIBRATION),
                              ("source", modelio.SOURCE), ("class_index", modelio.CLASS_INDEX)):
            info[key] = modelio.get_meta(model, meta_key)
    if kind == "composed":
        from onnxmod.compose import compose_info

        info["class_sources"] = modelio.get_meta(model, modelio.CLASSES)
        comp = compose_info(model)
        info["sources"] = comp.pop("sources")
        info["module_macs_sum"] = comp.get("module_macs_sum")
        info["module_params_sum"] = comp.get("module_params_sum")
        info["compose"] = comp
    pre = modelio.get_meta(model, modelio.PREPROCESS)
    if pre is not None:
        info["preprocess"] = pre
    return info


def _shape_str(shape) -> str:
    return "?" if shape is None else "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def render(info: dict[str, Any]) -> str:
    lines = [f"{info['file']}", f"  kind      {info['kind']}"]
    for title, key in (("input", "inputs"), ("output", "outputs")):
        for v in info[key]:
            lines.append(f"  {title:<9} {v['name']} {v['dtype']} {_shape_str(v['shape'])}")
    classes = info["classes"]
    if classes:
        shown = ", ".join(map(str, classes[:12])) + (f", ... ({len(classes)} in all)" if len(classes) > 12 else "")
        lines.append(f"  classes   {len(classes)}: {shown}")
    else:
        lines.append("  classes   (no onnxmod.classes metadata)")
    lines.append(f"  params    {fmt_count(info['params'])} ({info['params']:,})")
    macs = info["macs"]
    lines.append(f"  MACs      {fmt_count(macs)} ({macs:,}) per image" if macs is not None else
                 f"  MACs      unknown ({info.get('macs_error', '')})")
    if info.get("kept"):
        kept = info["kept"]
        if isinstance(kept, dict):
            pf, ff = kept.get("param_fraction"), kept.get("flop_fraction")
            lines.append(f"  kept      params {pf:.1%}, FLOPs {ff:.1%}" if isinstance(pf, (int, float)) and isinstance(ff, (int, float))
                         else f"  kept      {kept}")
    if info.get("kind") == "composed":
        comp = info.get("compose") or {}
        if info.get("module_macs_sum"):
            lines.append(f"  modules   MACs sum {fmt_count(info['module_macs_sum'])} "
                         f"(composed graph computes {info['macs'] / info['module_macs_sum']:.1%} of it: shared layers once)"
                         if info.get("macs") is not None else f"  modules   MACs sum {fmt_count(info['module_macs_sum'])}")
        if comp.get("rule"):
            lines.append(f"  scores    {comp['rule']}")
        for s in info.get("sources") or []:
            size = f", source MACs {fmt_count(s['macs'])}" if s.get("macs") else ""
            lines.append(f"  source    {s.get('name')} ({str(s.get('sha256'))[:12]}): "
                         f"{len(s.get('classes', []))} classes{size}")
    if info.get("calibration") is not None:
        lines.append(f"  calibration {info['calibration']}")
    lines.append(f"  opset     {info['opset']}  (IR {info['ir_version']}{', ' + info['producer'] if info['producer'] else ''})")
    lines.append(f"  file      {info['file_size']:,} bytes, {info['nodes']} nodes")
    return "\n".join(lines)


@cli.command("info")
@click.argument("file", type=click.Path(path_type=Path))
@json_option
@quiet_option
def info_cmd(file: Path, as_json: bool, quiet: bool) -> None:
    """Kind, classes, inputs/outputs, params and MACs of an ONNX model."""  # nothing to hush: --quiet for uniformity
    emit(model_info(file), as_json, render)
