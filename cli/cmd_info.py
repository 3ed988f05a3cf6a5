"""`onnxmod info FILE.onnx`: kind, classes, inputs/outputs, params, MACs, and for modules and
composed models the front-end rewrites decompose made to read their source."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import onnx

from onnxmod import frontend, modelio
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


def frontend_steps(steps: Any) -> list[dict[str, Any]] | None:
    """The ``onnxmod.frontend`` records, each with its ``text`` (None: no such metadata)."""
    if not isinstance(steps, list):
        return None
    return [{**s, "text": frontend.describe(s)} for s in steps if isinstance(s, dict)]


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
        info["frontend"] = frontend_steps(modelio.get_meta(model, modelio.FRONTEND))
    if kind == "composed":
        from onnxmod.compose import compose_info

        info["class_sources"] = modelio.get_meta(model, modelio.CLASSES)
        comp = compose_info(model)
        info["sources"] = comp.pop("sources")
        for s in info["sources"]:
            s["frontend"] = frontend_steps(s.get("frontend"))
        info["module_macs_sum"] = comp.get("module_macs_sum")
        info["module_params_sum"] = comp.get("module_params_sum")
        info["compose"] = comp
    pre = modelio.get_meta(model, modelio.PREPROCESS)
    if pre is not None:
        info["preprocess"] = pre
    return info


def _shape_str(shape) -> str:
    return "?" if shape is None else "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _words(d: Any) -> str:
    """A metadata value nobody planned for, as 'key value, ...' rather than a Python repr."""
    if isinstance(d, dict):
        return ", ".join(f"{k.replace('_', ' ')} {_words(v)}" for k, v in d.items())
    if isinstance(d, float):
        return f"{d:.4g}"
    return str(d)


def _module_lines(info: dict[str, Any]) -> list[str]:
    """Source, kept fraction and calibration of a module, in words."""
    lines = []
    src = info.get("source")
    if isinstance(src, dict):
        size = [f"{fmt_count(src[k])} {unit}" for k, unit in (("params", "params"), ("flops", "MACs")) if _num(src.get(k))]
        idx = info.get("class_index")
        which = f", class {idx} of {src.get('num_classes')}" if idx is not None else ""
        lines.append(f"  source    {src.get('name')} ({str(src.get('sha256'))[:12]}){which}"
                     + (f"; {', '.join(size)}" if size else ""))
    kept = info.get("kept")
    if isinstance(kept, dict) and _num(kept.get("param_fraction")) and _num(kept.get("flop_fraction")):
        text = f"  kept      {kept['param_fraction']:.1%} of the source's params, {kept['flop_fraction']:.1%} of its MACs"
        ch = kept.get("channels")
        if isinstance(ch, dict) and _num(ch.get("kept")) and _num(ch.get("total")):
            text += f"; {ch['kept']} of {ch['total']} channels"
        how = []
        if _num(kept.get("target_macs")):
            how.append(f"target {kept['target_macs']:.0%} of the MACs")
        if kept.get("strategy"):
            how.append(f"{kept['strategy']} budget")
        if kept.get("fill"):
            how.append("removed channels replaced by their least-squares estimate" if kept["fill"] == "linear"
                       else f"removed channels filled with their {kept['fill']}" if kept["fill"] == "mean"
                       else "removed channels read as zero")
        if kept.get("reconstructed"):
            how.append("re-fitted layer by layer")
        lines.append(text + (f" ({', '.join(how)})" if how else ""))
    elif kept is not None:
        lines.append(f"  kept      {_words(kept)}")
    cal = info.get("calibration")
    if isinstance(cal, dict) and _num(cal.get("a")) and _num(cal.get("b")):
        b = cal["b"]
        text = f"  score     sigmoid({cal['a']:.3f} * logit {'-' if b < 0 else '+'} {abs(b):.3f})"
        detail = [f"{cal.get('method', 'platt').capitalize()} scaling"]
        if _num(cal.get("samples")):
            detail.append(f"fitted on {cal['samples']} images")
        if _num(cal.get("nll_before")) and _num(cal.get("nll_after")):
            detail.append(f"log-loss {cal['nll_before']:.3f} -> {cal['nll_after']:.3f}")
        if _num(cal.get("temperature")):
            detail.append(f"source temperature {cal['temperature']:.3f}")
        lines.append(text + f" ({', '.join(detail)})")
    elif cal is not None:
        lines.append(f"  score     {_words(cal)}")
    return lines + _frontend_lines(info.get("frontend"), "  ")


def _frontend_lines(steps: list[dict[str, Any]] | None, indent: str) -> list[str]:
    """How decompose read the source (the front-end rewrites), one line each."""
    if steps is None:
        return []
    if not steps:
        return [f"{indent}front-end none: the source was read as exported"]
    return [f"{indent}front-end {len(steps)} rewrite{'s' if len(steps) > 1 else ''} to read the source:"] + \
        [f"{indent}  - {s['text']}" for s in steps]


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
    if info.get("kind") == "module":
        lines.extend(_module_lines(info))
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
            lines.extend(_frontend_lines(s.get("frontend"), "    "))
    lines.append(f"  opset     {info['opset']}  (IR {info['ir_version']}{', ' + info['producer'] if info['producer'] else ''})")
    lines.append(f"  file      {info['file_size']:,} bytes, {info['nodes']} nodes")
    return "\n".join(lines)


@cli.command("info")
@click.argument("file", type=click.Path(path_type=Path))
@json_option
@quiet_option
def info_cmd(file: Path, as_json: bool, quiet: bool) -> None:
    """Kind, classes, inputs/outputs, params and MACs of an ONNX model.

    For a module also the fraction of the source it kept, its calibration and the
    front-end rewrites decompose made to read the source (NHWC input, Softmax head,
    fixed batch...); for a composed model its sources (with their rewrites) and how
    much computation its modules share.

    \b
    Example:
      onnxmod info r8.modules/module_003_cat.onnx
      onnxmod info r8_composed.onnx --json
    """  # nothing to hush: --quiet for uniformity
    emit(model_info(file), as_json, render)
