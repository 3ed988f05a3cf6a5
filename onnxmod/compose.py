"""Composition: several modules (any mix of sources) and source classifiers -> one classifier graph.

A source classifier file is a member with all its classes (:mod:`onnxmod.sourcemember`): its
graph is added once and each class reads a column of its logits (``Member.column``).

:func:`compose` builds ONE ONNX graph with input ``input`` ``[N, C, H, W]`` and outputs
``probs`` ``[N, K]`` and ``label`` ``[N]`` (int64). Class order = argument order.

How the graph is built:

1. every module is checked (:meth:`ModuleSpec.from_model`), converted to the highest
   default-domain opset among them (``onnx.version_converter``), and every node,
   tensor and initializer name is prefixed with ``m{i}__`` (the shared graph input
   ``input`` is not);
2. identical computation is merged: initializers with equal dtype, shape and bytes
   are one tensor, and, walking the nodes in topological order, a node whose op,
   domain, attributes and (already merged) inputs equal an earlier node's is dropped
   and its outputs alias the earlier node's. One topological pass reaches the
   fixpoint, so shared prefixes (the baked preprocessing, early layers a module kept
   whole) are computed once;
3. the head. Score scale rule (see :mod:`onnxmod.modulespec`):

   * all modules from one source (same source sha256): ``probs = softmax(concat(logit_i))``
     — exactly how the source compares its classes;
   * several sources: ``probs = softmax(logit_i / T_i)``, ``T_i`` the temperature of module
     i's source (``calibration.temperature``) — calibrated, comparable scales. A source member's
     ``T`` is its modules' among the members, else fitted on ``--calib`` data (:func:`_temperatures`).

   ``label = ArgMax`` of the (scaled) concatenated logits.

Class names must be unique. The same class name from two different sources is an
error unless ``rename=True``, which renames each colliding class to
``name@source_name`` (``name@source_name-<sha8>`` when two sources share a name).
Two modules of the same class name from the same source are always an error, and
so is the same module given twice.

Modules with different input sizes: the composed input takes the size of the
modules whose ``preprocess`` does not say ``"resizable": true`` (they must all agree;
if all are resizable, the largest); a resizable module of another size gets a
``Resize`` (linear) of the composed input. Otherwise it is an error naming both
modules and their shapes; different channel counts are always an error.

Metadata of the composed model: ``onnxmod.kind`` = ``composed``, ``onnxmod.classes``
(list of {name, class_name, source_sha256, source_name, class_index, module_sha256}),
``onnxmod.compose`` (rule, temperatures, MACs/params/nodes of the composed graph and
the sums over the modules), ``onnxmod.members`` (per class: the module's own
metadata, its logit tensor in the composed graph, its input tensor and shape), and
``onnxmod.preprocess`` ({in_graph: true, input_size}). :func:`extract_modules` uses
``onnxmod.members`` to rebuild every member module from a composed model, which is
how :func:`replace` works on composed models.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxmod import graphio, modelio
from onnxmod.cost import count_macs, count_params
from onnxmod.errors import OnnxmodError
from onnxmod.modulespec import LOGIT, SCORE, ModuleSpec, add_score

log = logging.getLogger("onnxmod.compose")

COMPOSE = "onnxmod.compose"
MEMBERS = "onnxmod.members"
INPUT = "input"
PROBS = "probs"
LABEL = "label"
RULE_SAME = "softmax(logits)"
RULE_TEMPERATURE = "softmax(logit_i / T_i)"
DEFAULT_DOMAINS = ("", "ai.onnx")
_NO_DEDUP_PREFIXES = ("Random", "Multinomial", "Bernoulli", "Dropout")

ModuleArg = onnx.ModelProto | str | os.PathLike


@dataclass
class Member:
    model: onnx.ModelProto
    spec: ModuleSpec
    where: str  # how errors call it (path or "module #i")
    sha256: str  # of the serialized module
    path: Path | None
    chw: tuple[int, int, int]
    batch_param: str | None
    # a source's class (onnxmod.sourcemember): the column of the source graph's `logits` output it reads;
    # all classes of one source share `model`, which compose adds once
    column: int | None = None
    logits: str = LOGIT  # the graph output the member's logit comes from
    metadata: dict[str, str] | None = None  # module metadata it records; None: the model's own
    # a source member without a fitted temperature: fits it on --calib data, should the composition need it
    fit_temperature: Callable[[], tuple[float, int]] | None = None

    def meta(self) -> dict[str, str]:
        return self.metadata if self.metadata is not None else {p.key: p.value for p in self.model.metadata_props}

    @property
    def label(self) -> str:
        """How errors about the whole member call it: a source's file, not one of its classes."""
        return str(self.path) if self.column is not None and self.path is not None else self.where


# --------------------------------------------------------------------------- loading
def _input_info(model: onnx.ModelProto, where: str) -> tuple[tuple[int, int, int], str | None]:
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1 or inputs[0].name != INPUT:
        raise OnnxmodError(f"{where}: a module must have exactly one input named '{INPUT}', "
                           f"got {[i.name for i in inputs]}")
    dims = inputs[0].type.tensor_type.shape.dim
    vals = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    if len(vals) != 4:
        raise OnnxmodError(f"{where}: input '{INPUT}' must be [N, C, H, W], got rank {len(vals)}")
    chw = vals[1:]
    pre = modelio.get_meta(model, modelio.PREPROCESS) or {}
    size = pre.get("input_size") if isinstance(pre, dict) else None
    if (chw[1] is None or chw[2] is None) and isinstance(size, list) and len(size) == 2:
        chw[1], chw[2] = int(size[0]), int(size[1])
    if None in chw:
        raise OnnxmodError(f"{where}: input '{INPUT}' needs static C, H, W, got {vals}")
    batch = dims[0].dim_param if dims[0].HasField("dim_param") else None
    return (int(chw[0]), int(chw[1]), int(chw[2])), batch


def load_member(module: ModuleArg, where: str | None = None, verify: bool | None = None) -> Member:
    """Load and check one module (path or ModelProto).

    ``verify`` (default: for files): also the full ONNX checker and one run on CPU, so a
    broken or tampered file is blamed on the file before it is merged.
    """
    if isinstance(module, onnx.ModelProto):
        model, path = module, None
        where = where or (module.graph.name or "<module>")
    else:
        path = Path(module)
        where = where or str(path)
        model = modelio.load_model(path)
    spec = ModuleSpec.from_model(model, where)
    verify = path is not None if verify is None else verify
    if verify:
        modelio.check_input(model, where)
    outs = [o.name for o in model.graph.output]
    if LOGIT not in outs:
        raise OnnxmodError(f"{where}: module has no '{LOGIT}' output (outputs: {outs})")
    chw, batch = _input_info(model, where)
    if verify:
        _runs(model, chw, where)
    return Member(model, spec, where, modelio.model_sha256(model), path, chw, batch)


def _runs(model: onnx.ModelProto, chw: tuple[int, int, int], where: str, output: str = LOGIT) -> None:
    """One image through the module on CPU: weights of the wrong shape pass the ONNX checker but not a run."""
    from onnxmod import runtime

    try:
        runtime.run(runtime.make_session(model, device="cpu", name=where), np.zeros((1, *chw), np.float32), [output])
    except OnnxmodError as e:
        why = str(e).removeprefix(f"{where}: ")
        raise OnnxmodError(f"{where}: invalid module: {why}") from None


def load_members(inputs: Sequence[ModuleArg], wheres: Sequence[str] | None = None,
                 source_classes: Sequence[Sequence[str]] = (), calib: str | os.PathLike | None = None,
                 device: str = "cpu") -> list[Member]:
    """Members in argument order: a module (file or ModelProto) is one, a source classifier file one per class.

    ``source_classes``: class names for the sources without ``onnxmod.classes`` metadata, in
    argument order (``--classes-file``). ``calib``: labelled images to fit a source's temperature
    on when it is composed with other sources and none of its modules is a member
    (:mod:`onnxmod.sourcemember`).
    """
    from onnxmod.sourcemember import load_source

    loaded: list[Member | tuple[Path, onnx.ModelProto]] = []
    for i, m in enumerate(inputs):
        where = wheres[i] if wheres else None
        if isinstance(m, onnx.ModelProto):
            if modelio.model_kind(m) == "source":
                raise OnnxmodError(f"{where or m.graph.name or '<model>'}: a source member is read from its file; "
                                   "give its path")
            loaded.append(load_member(m, where))
            continue
        model = modelio.load_model(m)
        if modelio.model_kind(model) == "source":
            loaded.append((Path(m), model))
        else:
            member = load_member(model, where or str(m), verify=True)
            member.path = Path(m)
            loaded.append(member)
    modules = [m for m in loaded if isinstance(m, Member)]
    sources = [s for s in loaded if not isinstance(s, Member)]
    sha_of = {p: modelio.file_sha256(p) for p, _ in sources}  # what its modules record as their source's
    nameless = [p for p, model in sources if not modelio.get_meta(model, modelio.CLASSES)]
    if len(source_classes) > len(nameless):
        raise OnnxmodError(f"{len(source_classes)} --classes-file given but {len(nameless)} source(s) without "
                           f"onnxmod.classes metadata: {', '.join(map(str, nameless)) or 'none'}")
    names = dict(zip(nameless, source_classes))
    out: list[Member] = []
    for item in loaded:
        if isinstance(item, Member):
            out.append(item)
            continue
        p, raw = item
        own = [m for m in modules if m.spec.source.sha256 == sha_of[p]]
        out.extend(load_source(p, own, names=names.get(p), calib=calib, device=device, raw=raw))
    return out


def module_files(directory: str | os.PathLike) -> list[Path]:
    """The module files of a ``decompose`` output dir, in manifest order (else sorted)."""
    d = Path(directory)
    if not d.is_dir():
        raise OnnxmodError(f"{d}: no such directory")
    manifest = d / "manifest.json"
    if manifest.is_file():
        try:
            entries = json.loads(manifest.read_text())["modules"]
            files = [d / e["file"] for e in entries]
        except (ValueError, KeyError, TypeError) as e:
            raise OnnxmodError(f"{manifest}: broken manifest ({type(e).__name__}: {str(e)[:200]})") from None
        except RecursionError:  # nested deeper than the json module can follow
            raise OnnxmodError(f"{manifest}: broken manifest (nested too deep)") from None
        inside = d.resolve()
        for e, f in zip(entries, files):
            if os.path.isabs(e["file"]) or f.resolve().parent != inside:
                raise OnnxmodError(f"{manifest}: module file {e['file']!r} is outside its folder; refused")
        for f in files:
            if not f.is_file():
                raise OnnxmodError(f"{f}: listed in {manifest.name} but missing")
    else:
        files = sorted(d.glob("module_*.onnx"))
    if not files:
        raise OnnxmodError(f"{d}: holds no module_*.onnx files")
    return files


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Module files and module dirs (all their modules, manifest order) -> module files."""
    out: list[Path] = []
    for i in inputs:
        p = Path(i)
        if p.is_dir():
            out.extend(module_files(p))
        elif not p.exists():
            raise OnnxmodError(f"{p}: no such file")
        else:
            out.append(p)
    return out


# --------------------------------------------------------------------------- naming
def _class_names(members: list[Member], rename: bool, names: Sequence[str] | None) -> list[str]:
    if names is not None:
        names = [str(n) for n in names]
        if len(names) != len(members):
            raise OnnxmodError(f"{len(names)} names given for {len(members)} modules")
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise OnnxmodError(f"class name '{dup}' given twice")
        return names
    by_name: dict[str, list[int]] = {}
    for i, m in enumerate(members):
        by_name.setdefault(m.spec.class_name, []).append(i)
    out = [m.spec.class_name for m in members]
    for name, idx in by_name.items():
        if len(idx) < 2:
            continue
        shas = [members[i].spec.source.sha256 for i in idx]
        for a in range(len(idx)):
            for b in range(a + 1, len(idx)):
                if shas[a] == shas[b]:
                    hint = ("; to serve a source's class by a module: onnxmod replace SOURCE --class NAME --with MODULE"
                            if members[idx[a]].column is not None or members[idx[b]].column is not None else "")
                    raise OnnxmodError(
                        f"class '{name}' twice from the same source {members[idx[a]].spec.source.name}: "
                        f"{members[idx[a]].where} and {members[idx[b]].where}{hint}")
        if not rename:
            raise OnnxmodError(
                f"class '{name}' comes from two sources: {members[idx[0]].where} "
                f"({members[idx[0]].spec.source.name}) and {members[idx[1]].where} "
                f"({members[idx[1]].spec.source.name}); use --rename to call them name@source")
        src_names = [members[i].spec.source.name for i in idx]
        for i in idx:
            s = members[i].spec.source
            out[i] = f"{name}@{s.name}" if src_names.count(s.name) == 1 else f"{name}@{s.name}-{s.sha256[:8]}"
    dup = next((n for n in out if out.count(n) > 1), None)
    if dup is not None:
        raise OnnxmodError(f"class name '{dup}' would appear twice after renaming")
    return out


# --------------------------------------------------------------------------- graph helpers
def _default_opset(model: onnx.ModelProto) -> int:
    return graphio.opset_version(model)


def _convert(model: onnx.ModelProto, target: int, where: str) -> onnx.ModelProto:
    if _default_opset(model) == target:
        return model
    from onnx import version_converter

    try:
        out = version_converter.convert_version(model, target)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OnnxmodError(f"{where}: cannot convert from opset {_default_opset(model)} to {target}: {first}") from None
    return out


def _rename_graph(graph: onnx.GraphProto, fn) -> None:
    """Apply ``fn`` to every tensor name (and node name) in ``graph`` and its subgraphs."""
    for n in graph.node:
        n.input[:] = [fn(x) if x else x for x in n.input]
        n.output[:] = [fn(x) if x else x for x in n.output]
        if n.name:
            n.name = fn(n.name)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                _rename_graph(a.g, fn)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    _rename_graph(g, fn)
    for t in graph.initializer:
        t.name = fn(t.name)
    for v in list(graph.input) + list(graph.output) + list(graph.value_info):
        v.name = fn(v.name)


def _dedup(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], keep: set[str]) -> tuple[
        list[onnx.NodeProto], list[onnx.TensorProto], dict[str, str]]:
    """Merge identical initializers and nodes (``nodes`` in topological order).

    Returns (nodes, initializers, alias) where ``alias`` maps every dropped tensor name
    to the tensor that now carries its value.
    """
    alias: dict[str, str] = {}
    seen_init: dict[tuple, str] = {}
    out_inits = []
    for t in inits:
        k = graphio.tensor_key(t)
        if k in seen_init:
            alias[t.name] = seen_init[k]
        else:
            seen_init[k] = t.name
            out_inits.append(t)
    seen_node: dict[tuple, list[str]] = {}
    out_nodes = []
    for n in nodes:
        n.input[:] = [alias.get(x, x) for x in n.input]
        if n.op_type.startswith(_NO_DEDUP_PREFIXES) or any(o in keep for o in n.output):
            out_nodes.append(n)
            continue
        key = (n.domain or "", n.op_type, tuple(n.input), tuple(bool(o) for o in n.output),
               tuple(sorted(graphio.attribute_key(a) for a in n.attribute)))
        if key in seen_node:
            for o, prev in zip(n.output, seen_node[key]):
                if o:
                    alias[o] = prev
            continue
        seen_node[key] = list(n.output)
        out_nodes.append(n)
    return out_nodes, out_inits, alias


def _prune(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], outputs: Sequence[str]) -> tuple[
        list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Drop nodes and initializers the outputs don't need."""
    need = set(outputs)
    kept = []
    for n in reversed(nodes):
        if any(o in need for o in n.output):
            kept.append(n)
            need.update(x for x in n.input if x)
            need.update(_subgraph_refs(n))
    kept.reverse()
    return kept, [t for t in inits if t.name in need]


def _subgraph_refs(n: onnx.NodeProto) -> set[str]:
    refs: set[str] = set()
    for a in n.attribute:
        gs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []
        for g in gs:
            for sn in g.node:
                refs.update(x for x in sn.input if x)
                refs.update(_subgraph_refs(sn))
    return refs


def _choose_size(members: list[Member]) -> tuple[int, int]:
    def resizable(m: Member) -> bool:
        return bool(isinstance(m.spec.preprocess, dict) and m.spec.preprocess.get("resizable"))

    c0 = members[0]
    for m in members[1:]:
        if m.chw[0] != c0.chw[0]:
            raise OnnxmodError(f"input channels differ: {c0.label} takes {list(c0.chw)} but {m.label} takes "
                               f"{list(m.chw)}")
    fixed = [m for m in members if not resizable(m)]
    for m in fixed[1:]:
        if m.chw[1:] != fixed[0].chw[1:]:
            raise OnnxmodError(f"input sizes differ: {fixed[0].label} takes {list(fixed[0].chw)} but {m.label} "
                               f"takes {list(m.chw)} (neither's preprocess says resizable)")
    if fixed:
        return fixed[0].chw[1], fixed[0].chw[2]
    big = max(members, key=lambda m: m.chw[1] * m.chw[2])
    return big.chw[1], big.chw[2]


def _resize_nodes(i: int, hw: tuple[int, int]) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str]:
    """Resize (linear) of the composed input to ``hw``; returns nodes, initializers, output name."""
    p = f"m{i}__resize_"
    inits = [
        helper.make_tensor(p + "starts", TensorProto.INT64, [1], [0]),
        helper.make_tensor(p + "ends", TensorProto.INT64, [1], [2]),
        helper.make_tensor(p + "hw", TensorProto.INT64, [2], [int(hw[0]), int(hw[1])]),
    ]
    out = p + "out"
    nodes = [
        helper.make_node("Shape", [INPUT], [p + "shape"], name=p + "shape"),
        helper.make_node("Slice", [p + "shape", p + "starts", p + "ends"], [p + "nc"], name=p + "slice"),
        helper.make_node("Concat", [p + "nc", p + "hw"], [p + "sizes"], name=p + "concat", axis=0),
        helper.make_node("Resize", [INPUT, "", "", p + "sizes"], [out], name=p + "resize", mode="linear"),
    ]
    return nodes, inits, out


def _column_nodes(i: int, logits: str, column: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str]:
    """``logits[:, column:column + 1]`` (Slice: the source's own values, copied); returns nodes, initializers, output.

    Named ``s{i}__``: no graph tensor has that prefix (they are ``m{j}__``), whatever the source calls its tensors."""
    p = f"s{i}__"
    inits = [helper.make_tensor(p + "starts", TensorProto.INT64, [1], [column]),
             helper.make_tensor(p + "ends", TensorProto.INT64, [1], [column + 1]),
             helper.make_tensor(p + "axes", TensorProto.INT64, [1], [1])]
    node = helper.make_node("Slice", [logits, p + "starts", p + "ends", p + "axes"], [p + "logit"], name=p + "slice")
    return [node], inits, p + "logit"


def _temperatures(members: list[Member], same_source: bool) -> list[float]:
    """T_i of each member's logits: 1 for one source (softmax of its logits); else the temperature its source
    was fitted (a member whose source no data fitted borrows a fitted one of the same source)."""
    if same_source:
        return [1.0] * len(members)
    from onnxmod.sourcemember import with_temperature

    fitted: dict[str, float] = {}
    for m in members:
        if m.spec.calibration.temperature_fitted:
            fitted.setdefault(m.spec.source.sha256, float(m.spec.calibration.temperature))
    out = []
    for m in members:
        if not m.spec.calibration.temperature_fitted:
            if m.spec.source.sha256 in fitted:  # one of its modules: decompose fitted the source's temperature
                with_temperature(m, fitted[m.spec.source.sha256], 0)
            elif m.fit_temperature is not None:  # --calib: fitted once per source graph
                with_temperature(m, *m.fit_temperature())
            else:
                raise OnnxmodError(f"{m.label}: composed with other sources, its logits need its source's "
                                   "temperature, which no data fitted: give --calib DATA (labelled images) to fit "
                                   "it, or add one of its modules (decompose fitted one)")
        cal = m.spec.calibration
        t = float(cal.temperature)
        if not (t > 0 and np.isfinite(t)):
            raise OnnxmodError(f"{m.where}: calibration temperature must be > 0, got {cal.temperature}")
        out.append(t)
    return out


SCALE_MISMATCH = 2.0  # a module's Platt slope times its temperature outside [1/2, 2]: its scales disagree


def _scale_warnings(members: list[Member], temps: list[float], same_source: bool) -> list[str]:
    """Members from another source whose own calibration says the temperature rule cannot match their scale: a
    module's score is sigmoid(a * logit + b) (Platt, on its calibration data), the composed model divides its
    logit by its source's T; when a * T is far from 1, its logit counts for much more (or less) next to the other
    sources' than its own calibration says (a ResNet8 cat module replaced into a ResNet20 took cat recall from
    74.8% to 2.9%). Each warning says how it was matched."""
    if same_source:
        return []
    counts: dict[str, int] = {}
    for m in members:
        counts[m.spec.source.sha256] = counts.get(m.spec.source.sha256, 0) + 1
    out = []
    for m, t in zip(members, temps):
        cal = m.spec.calibration
        if m.column is not None or cal.method != "platt":  # a source's own classes: its logits, by its T
            continue
        ratio = float(cal.a) * t
        if ratio > 0 and 1 / SCALE_MISMATCH <= ratio <= SCALE_MISMATCH:
            continue
        others = sorted({x.spec.source.name for x in members if x.spec.source.sha256 != m.spec.source.sha256})
        out.append(f"{m.label}: from source {m.spec.source.name}, composed with {', '.join(others)}: its calibration "
                   f"(Platt slope {float(cal.a):.3g} on {cal.samples} images) does not match its source's temperature "
                   f"{t:.3g} (slope x T = {ratio:.3g}, outside {1 / SCALE_MISMATCH:g}..{SCALE_MISMATCH:g}); matched by "
                   f"dividing its logit by T = {t:.3g}, so its class may win too often or too rarely: check it with "
                   "onnxmod eval")
    return out


def _macs_per_node(model: onnx.ModelProto) -> list[int]:
    """MACs of each node of ``model`` (graph order) for one image; 0 where shapes are unknown."""
    from onnxmod.cost import macs_by_node

    by_key = macs_by_node(model, strict=False)  # keyed by node name, or op_type#index
    return [by_key.get(n.name or f"{n.op_type}#{i}", 0) for i, n in enumerate(model.graph.node)]


def _sharing(model: onnx.ModelProto, node_macs: list[int], ends: list[tuple[Member, str]]) -> list[dict[str, Any]]:
    """For each source among the members: its nodes and MACs in the composed graph, and how many of them it
    computes once with other members (merged by :func:`_dedup`: its prologue, layers its modules kept whole)."""
    if all(m.column is None for m, _ in ends):
        return []
    g = model.graph
    producer = {o: i for i, n in enumerate(g.node) for o in n.output if o}

    def reach(tensor: str) -> set[int]:
        seen: set[int] = set()
        stack = [tensor]
        while stack:
            i = producer.get(stack.pop())
            if i is not None and i not in seen:
                seen.add(i)
                stack.extend(x for x in g.node[i].input if x)
                stack.extend(_subgraph_refs(g.node[i]))
        return seen

    reached = [reach(t) for _, t in ends]
    out = []
    for j, (m, _) in enumerate(ends):
        if m.column is None:
            continue
        others = [k for k in range(len(ends)) if k != j and reached[k] & reached[j]]
        common = reached[j] & set().union(*(reached[k] for k in others))
        out.append({"source": str(m.path or m.where), "nodes": len(reached[j]),
                    "macs": int(sum(node_macs[i] for i in reached[j])),
                    "shared_nodes": len(common), "shared_macs": int(sum(node_macs[i] for i in common)),
                    "shared_with": [ends[k][0].where for k in others]})
    return out


def merged(models: Sequence[onnx.ModelProto], outputs: Sequence[Sequence[str]]) -> tuple[onnx.ModelProto, list[list[str]]]:
    """One graph over the shared input ``input`` computing the tensors ``outputs[i]`` of
    ``models[i]`` (graphs of one source, same opsets), identical computation merged as in
    :func:`compose`: several modules run for the cost of what they do not share. Returns the
    graph and the names it gives each model's ``outputs``."""
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    names: list[list[str]] = []
    for i, m in enumerate(models):
        g = onnx.GraphProto()
        g.CopyFrom(m.graph)
        _rename_graph(g, lambda s, p=f"m{i}__": s if s == INPUT else p + s)
        nodes.extend(g.node)
        inits.extend(g.initializer)
        names.append([f"m{i}__{o}" for o in outputs[i]])
    nodes, inits, alias = _dedup(nodes, inits, keep=set())
    names = [[alias.get(o, o) for o in outs] for outs in names]
    wanted = list(dict.fromkeys(o for outs in names for o in outs))
    nodes, inits = _prune(nodes, inits, wanted)
    first = models[0]
    graph = helper.make_graph(nodes, "merged", [next(i for i in first.graph.input if i.name == INPUT)],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in wanted],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=list(first.opset_import))
    model.ir_version = first.ir_version
    return model, names


# --------------------------------------------------------------------------- compose
def compose(
    modules: Sequence[ModuleArg],
    rename: bool = False,
    names: Sequence[str] | None = None,
    wheres: Sequence[str] | None = None,
    source_classes: Sequence[Sequence[str]] = (),
    calib: str | os.PathLike | None = None,
    device: str = "cpu",
) -> onnx.ModelProto:
    """One classifier over the union of the members' classes (class order = argument order).

    ``modules``: module ModelProtos and/or paths (a dir = all its modules, manifest order; a source
    classifier file = all its classes, :mod:`onnxmod.sourcemember`). ``rename``: call classes whose name
    comes from several sources ``name@source_name``. ``names``: explicit output class
    names (overrides both). ``wheres``: how error messages call each module. ``source_classes``,
    ``calib``, ``device``: see :func:`load_members`.
    Raises OnnxmodError for non-modules, the same module twice, duplicate class names,
    input channel/size mismatches. The result passes the full ONNX checker.
    """
    if not modules:
        raise OnnxmodError("compose needs at least one module")
    if wheres is None and any(not isinstance(m, onnx.ModelProto) and Path(m).is_dir() for m in modules):
        modules = [f for m in modules for f in ([m] if isinstance(m, onnx.ModelProto) else expand_inputs([m]))]
    members = load_members(modules, wheres, source_classes, calib, device)
    return _compose_members(members, rename, names)


def _compose_members(members: list[Member], rename: bool, names: Sequence[str] | None) -> onnx.ModelProto:
    seen: dict[tuple[str, int | None], Member] = {}
    for m in members:
        key = (m.sha256, m.column)
        if key in seen:
            what = "module" if m.column is None else "source"
            raise OnnxmodError(f"the same {what} is given twice: {seen[key].label} and {m.label}")
        seen[key] = m
    out_names = _class_names(members, rename, names)
    c = members[0].chw[0]
    h, w = _choose_size(members)
    same_source = len({m.spec.source.sha256 for m in members}) == 1
    temps = _temperatures(members, same_source)  # may run a source on --calib data: after the cheap checks
    scale_warnings = _scale_warnings(members, temps, same_source)
    for w in scale_warnings:
        log.warning(w)
    target = max(_default_opset(m.model) for m in members)
    ir = max(int(m.model.ir_version) for m in members)
    other_opsets: dict[str, int] = {}

    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    logits: list[str] = []
    member_inputs: list[str] = []
    module_macs, module_params, module_nodes = [], [], []
    added: dict[int, tuple[str, str]] = {}  # id(graph) -> (prefix, input) once added: a source's classes share it
    ends: list[tuple[Member, str]] = []  # each distinct graph's first member and output, for the sharing report
    for i, m in enumerate(members):
        if id(m.model) not in added:
            module_macs.append(count_macs(m.model, strict=False))
            module_params.append(count_params(m.model))
            module_nodes.append(len(m.model.graph.node))
            g = _convert(m.model, target, m.where).graph
            for o in m.model.opset_import:
                if o.domain not in DEFAULT_DOMAINS:
                    other_opsets[o.domain] = max(other_opsets.get(o.domain, 0), int(o.version))
            gc = onnx.GraphProto()
            gc.CopyFrom(g)
            src_input = INPUT
            if m.chw[1:] != (h, w):
                r_nodes, r_inits, src_input = _resize_nodes(i, m.chw[1:])
                nodes.extend(r_nodes)
                inits.extend(r_inits)
            prefix = f"m{i}__"
            _rename_graph(gc, lambda s, p=prefix, si=src_input: si if s == INPUT else p + s)
            inits.extend(gc.initializer)
            nodes.extend(gc.node)
            added[id(m.model)] = (prefix, src_input)
            ends.append((m, prefix + m.logits))
        else:
            module_macs.append(0)  # a source's MACs are counted once, at its first class
        prefix, src_input = added[id(m.model)]
        logit = prefix + m.logits
        if m.column is not None:
            c_nodes, c_inits, logit = _column_nodes(i, logit, m.column)
            nodes.extend(c_nodes)
            inits.extend(c_inits)
        logits.append(logit)
        member_inputs.append(src_input)

    nodes, inits, alias = _dedup(nodes, inits, keep=set())
    logits = [alias.get(t, t) for t in logits]
    ends = [(m, alias.get(t, t)) for m, t in ends]

    k = len(members)
    head_inits = []
    head = [helper.make_node("Concat", logits, ["compose__logits"], name="compose__concat", axis=1)]
    scaled = "compose__logits"
    if not same_source:
        head_inits.append(helper.make_tensor("compose__temperature", TensorProto.FLOAT, [1, k], temps))
        head.append(helper.make_node("Div", ["compose__logits", "compose__temperature"], ["compose__scaled"],
                                     name="compose__scale"))
        scaled = "compose__scaled"
    head.append(helper.make_node("Softmax", [scaled], [PROBS], name="compose__softmax", axis=1))
    head.append(helper.make_node("ArgMax", [scaled], [LABEL], name="compose__argmax", axis=1, keepdims=0))
    nodes = nodes + head
    inits = inits + head_inits
    nodes, inits = _prune(nodes, inits, [PROBS, LABEL])

    batch = members[0].batch_param or "N"
    graph = helper.make_graph(
        nodes, "composed",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [batch, c, h, w])],
        [helper.make_tensor_value_info(PROBS, TensorProto.FLOAT, [batch, k]),
         helper.make_tensor_value_info(LABEL, TensorProto.INT64, [batch])],
        initializer=inits,
    )
    opsets = [helper.make_opsetid("", target)] + [helper.make_opsetid(d, v) for d, v in sorted(other_opsets.items())]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="onnxmod")
    model.ir_version = ir
    model = graphio.infer_shapes(model)

    node_macs = _macs_per_node(model)
    macs = int(sum(node_macs))
    classes = [{"name": n, "class_name": m.spec.class_name, "source_sha256": m.spec.source.sha256,
                "source_name": m.spec.source.name, "class_index": m.spec.class_index, "module_sha256": m.sha256,
                "member": "module" if m.column is None else "source"}
               for n, m in zip(out_names, members)]
    members_meta = [{"metadata": m.meta(),
                     "graph_name": m.model.graph.name,
                     "logit": lg, "input": mi, "input_shape": list(m.chw), "batch": m.batch_param or "N",
                     "opset": _default_opset(m.model)}
                    for m, lg, mi in zip(members, logits, member_inputs)]
    info = {
        "rule": RULE_SAME if same_source else RULE_TEMPERATURE,
        "temperatures": temps,
        "rename": bool(rename),
        "opset": target,
        "macs": macs,
        "module_macs": module_macs,
        "module_macs_sum": int(sum(module_macs)),
        "params": count_params(model),
        "module_params_sum": int(sum(module_params)),
        "nodes": len(model.graph.node),
        "module_nodes_sum": int(sum(module_nodes)),
        "resized": list(dict.fromkeys(m.label for m, mi in zip(members, member_inputs) if mi != INPUT)),
    }
    shared = _sharing(model, node_macs, ends)
    if shared:
        info["shared"] = shared
    if scale_warnings:
        info["scale_warnings"] = scale_warnings
    modelio.set_meta(model, {
        modelio.KIND: "composed",
        modelio.CLASSES: classes,
        modelio.PREPROCESS: {"in_graph": True, "input_size": [h, w]},
        COMPOSE: info,
        MEMBERS: members_meta,
        modelio.FORMAT_VERSION: modelio.FORMAT,
    })
    modelio.check_model(model, "composed model")
    return model


def compose_info(model: onnx.ModelProto) -> dict[str, Any]:
    """The ``onnxmod.compose`` record of a composed model (rule, MACs vs module MACs...), plus sources."""
    info = dict(modelio.get_meta(model, COMPOSE) or {})
    classes = modelio.get_meta(model, modelio.CLASSES) or []
    sources: dict[str, dict[str, Any]] = {}
    for c in classes:
        if isinstance(c, dict):
            s = sources.setdefault(c.get("source_sha256", "?"), {"name": c.get("source_name"),
                                                                   "sha256": c.get("source_sha256"), "classes": []})
            s["classes"].append(c.get("name"))
    for m in modelio.get_meta(model, MEMBERS) or []:  # source sizes, as recorded by each module
        src = json.loads(m.get("metadata", {}).get(modelio.SOURCE, "{}")) if isinstance(m, dict) else {}
        if src.get("sha256") in sources:
            sources[src["sha256"]].update(params=src.get("params"), macs=src.get("flops"))
            steps = m.get("metadata", {}).get(modelio.FRONTEND)  # how decompose read that source
            if steps is not None:
                sources[src["sha256"]]["frontend"] = json.loads(steps)
    info["sources"] = list(sources.values())
    return info


# --------------------------------------------------------------------------- extract / replace
def extract_modules(composed: onnx.ModelProto | str | os.PathLike) -> list[onnx.ModelProto]:
    """Rebuild every member module of a composed model (output order), metadata included.

    Each module is the part of the composed graph its ``logit`` depends on, from the
    member's own input (the composed ``input`` or its Resize) on; ``score`` is rebuilt
    from the recorded Platt calibration, as decompose builds it.
    """
    model = composed if isinstance(composed, onnx.ModelProto) else modelio.load_model(composed)
    where = model.graph.name if isinstance(composed, onnx.ModelProto) else str(composed)
    if modelio.model_kind(model) != "composed":
        raise OnnxmodError(f"{where}: is a {modelio.model_kind(model)} model, not a composed model")
    members = modelio.get_meta(model, MEMBERS)
    if not isinstance(members, list) or not members:
        raise OnnxmodError(f"{where}: composed model without onnxmod.members metadata; cannot extract its modules")
    g = model.graph
    producer = {o: n for n in g.node for o in n.output if o}
    init_by_name = {t.name: t for t in g.initializer}
    order = {id(n): i for i, n in enumerate(g.node)}
    out = []
    for j, mm in enumerate(members):
        try:
            logit, src, chw, batch, meta = mm["logit"], mm["input"], mm["input_shape"], mm["batch"], mm["metadata"]
        except (KeyError, TypeError):
            raise OnnxmodError(f"{where}: broken onnxmod.members entry #{j}") from None
        need_nodes: dict[int, onnx.NodeProto] = {}
        need_inits: set[str] = set()
        stack = [logit]
        visited = set()
        while stack:
            t = stack.pop()
            if t in visited or t == src or not t:
                continue
            visited.add(t)
            if t in init_by_name:
                need_inits.add(t)
                continue
            n = producer.get(t)
            if n is None:
                raise OnnxmodError(f"{where}: member #{j}: tensor '{t}' has no producer; cannot extract")
            if id(n) not in need_nodes:
                need_nodes[id(n)] = n
                stack.extend(n.input)
                stack.extend(_subgraph_refs(n))
        nodes = [onnx.NodeProto() for _ in need_nodes]
        for dst, n in zip(nodes, sorted(need_nodes.values(), key=lambda n: order[id(n)])):
            dst.CopyFrom(n)
        inits = [onnx.TensorProto() for _ in need_inits]
        for dst, name in zip(inits, sorted(need_inits)):
            dst.CopyFrom(init_by_name[name])
        sub = helper.make_graph(nodes, mm.get("graph_name") or f"member_{j}",
                                [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [batch] + list(chw))],
                                [helper.make_tensor_value_info(LOGIT, TensorProto.FLOAT, [batch, 1])],
                                initializer=inits)
        _rename_graph(sub, _strip_map(sub, {src: INPUT, logit: LOGIT}))
        sub.input[0].name = INPUT
        sub.output[0].name = LOGIT
        spec_model = onnx.ModelProto()
        for k, v in meta.items():
            spec_model.metadata_props.add(key=k, value=v)
        spec = ModuleSpec.from_model(spec_model, f"{where}: member #{j}")
        add_score(sub, spec.calibration.a, spec.calibration.b, batch)
        m = helper.make_model(sub, opset_imports=list(model.opset_import), producer_name="onnxmod")
        m.ir_version = model.ir_version
        m = graphio.infer_shapes(m)
        for k, v in meta.items():
            m.metadata_props.add(key=k, value=v)
        modelio.check_model(m, f"module extracted from {where}")
        out.append(m)
    return out


_PREFIX = re.compile(r"^m\d+__")


def _strip_map(graph: onnx.GraphProto, fixed: dict[str, str]):
    """Renamer dropping the ``m{i}__`` prefixes where that keeps names unique."""
    names: set[str] = set()

    def collect(g: onnx.GraphProto) -> None:
        for n in g.node:
            names.update(x for x in list(n.input) + list(n.output) + [n.name] if x)
            for a in n.attribute:
                for sg in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    collect(sg)
        names.update(t.name for t in g.initializer)

    collect(graph)
    reserved = {INPUT, LOGIT, SCORE} | set(fixed.values())
    stripped: dict[str, list[str]] = {}
    for n in names:
        if n not in fixed:
            stripped.setdefault(_PREFIX.sub("", n), []).append(n)
    mapping = dict(fixed)
    for short, longs in stripped.items():
        if len(longs) == 1 and short not in reserved and short.strip() and not short.startswith("__om_platt"):
            mapping[longs[0]] = short
    return lambda s: mapping.get(s, s)


def _base_members(base: Any, new: Member, source_classes: Sequence[str] | None = None,
                  calib: str | os.PathLike | None = None, device: str = "cpu") -> tuple[list[Member], bool]:
    """Members of a replace base: a module dir, a composed model (path or proto) or a source classifier file
    (read as decompose read it for ``new``, the module coming in, when that is a module of this source)."""
    if isinstance(base, onnx.ModelProto):
        composed, where = base, base.graph.name or "<composed>"
    elif Path(base).is_dir():
        composed, where = None, str(base)
    else:
        p = Path(base)
        composed, where = modelio.load_model(p), str(p)
        kind = modelio.model_kind(composed)
        if kind == "source":
            from onnxmod.sourcemember import load_source

            mine = new.spec.source.sha256 == modelio.file_sha256(p)
            return load_source(p, [new] if mine else [], names=source_classes, calib=calib, device=device,
                               raw=composed), False
        if kind != "composed":
            raise OnnxmodError(f"{p}: is a {kind} model; replace takes a module dir, a composed model or a source")
        modelio.check_input(composed, where)
    if source_classes is not None:
        raise OnnxmodError(f"{where}: --classes-file names a source's classes, but the base is not a source")
    if composed is None:
        return [load_member(f) for f in module_files(base)], False
    rename = bool((modelio.get_meta(composed, COMPOSE) or {}).get("rename", False))
    mods = extract_modules(composed)
    classes = modelio.get_meta(composed, modelio.CLASSES) or []
    return _regroup_sources([load_member(m, f"{where}[{classes[i]['name'] if i < len(classes) else i}]", verify=True)
                             for i, m in enumerate(mods)], calib, device), rename


def _regroup_sources(members: list[Member], calib: str | os.PathLike | None = None,
                     device: str = "cpu") -> list[Member]:
    """Classes of one source extracted from a composed model -> members reading one shared source graph again.

    Each extracted class is the whole source graph plus its column's Slice: composed as they are, a
    K-class source would be copied K times before the dedup merges it back."""
    from onnxmod.sourcemember import SOURCE_METHOD, temperature_fit

    groups: dict[str, list[int]] = {}
    for i, m in enumerate(members):
        if m.spec.calibration.method == SOURCE_METHOD and m.column is None:
            groups.setdefault(m.spec.source.sha256, []).append(i)
    out = list(members)
    for idx in groups.values():
        slices = [next((n for n in members[i].model.graph.node if LOGIT in n.output and n.op_type == "Slice"), None)
                  for i in idx]
        if None in slices or len({n.input[0] for n in slices}) != 1:
            continue  # not a graph compose wrote: keep the copies
        first, logits = members[idx[0]], slices[0].input[0]
        g = first.model.graph
        nodes, inits = _prune(list(g.node), list(g.initializer), [logits])
        out_shape = [first.batch_param or "N", first.spec.source.num_classes]
        graph = helper.make_graph(nodes, g.name, list(g.input),
                                  [helper.make_tensor_value_info(logits, TensorProto.FLOAT, out_shape)], initializer=inits)
        shared = helper.make_model(graph, opset_imports=list(first.model.opset_import), producer_name="onnxmod")
        shared.ir_version = first.model.ir_version
        names = ["\0"] * first.spec.source.num_classes  # a column no member holds (replaced) matches no data class
        for i in idx:
            names[members[i].spec.class_index] = members[i].spec.class_name
        fit = temperature_fit(shared, names, first.chw, calib, device, first.spec.source.name)
        for i in idx:
            m = members[i]
            out[i] = Member(shared, m.spec, m.where, m.spec.source.sha256, None, m.chw, m.batch_param,
                            column=m.spec.class_index, logits=logits, metadata=m.meta(), fit_temperature=fit)
    return out


def _find_class(members: list[Member], display: list[str], which: str | int) -> int:
    if isinstance(which, int):
        idx = which
    else:
        s = str(which).strip()
        if s in display:
            return display.index(s)
        hits = [i for i, m in enumerate(members) if m.spec.class_name == s]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise OnnxmodError(f"class '{s}' is ambiguous: {', '.join(display[i] for i in hits)}")
        if not re.fullmatch(r"-?\d+", s):
            raise OnnxmodError(f"class '{s}' is not one of: {', '.join(display)}")
        idx = int(s)
    if not 0 <= idx < len(members):
        raise OnnxmodError(f"class index {idx} out of range 0..{len(members) - 1}")
    return idx


def replace(
    base: Any,
    which: str | int,
    module: ModuleArg,
    rename: bool = False,
    source_classes: Sequence[str] | None = None,
    calib: str | os.PathLike | None = None,
    device: str = "cpu",
) -> onnx.ModelProto:
    """A composed model equal to ``base`` with class ``which`` (name or output index) served by ``module``.

    ``base``: a module dir (manifest.json + module files), a composed model (path or
    ModelProto; its members are rebuilt with :func:`extract_modules`) or a source classifier file
    (every other class served by the source graph unchanged; ``source_classes``, ``calib``, ``device``
    as for :func:`load_members`). The new module takes the replaced class's position. The score rule
    follows the new set of sources.
    """
    new = load_member(module)
    members, base_rename = _base_members(base, new, source_classes, calib, device)
    display = _class_names(members, True, None)
    idx = _find_class(members, display, which)
    if new.spec.class_name != members[idx].spec.class_name:
        raise OnnxmodError(f"{new.where}: is a module of class '{new.spec.class_name}', but class "
                           f"'{display[idx]}' is being replaced; give a '{members[idx].spec.class_name}' module")
    members[idx] = new
    return _compose_members(members, rename or base_rename, None)
