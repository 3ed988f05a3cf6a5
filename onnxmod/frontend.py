"""Front-end canonicalisation: any exporter's classifier -> the graph the channel analysis reads.

One pipeline, run by :func:`onnxmod.decompose.prepare_source` before anything else
looks at the graph. Each stage rewrites the model only when it has to and returns
a record of what it did; the records end up in every module's ``onnxmod.frontend``
metadata and in the manifest, so a user can see how their model was read.

Stages, in order:

1. ``upgrade``: IR < 4 or opset < 11 (old ONNX-zoo exporters) -> opset 13 through
   ``onnx.version_converter``; initializers no longer listed as graph inputs.
2. ``nhwc_input``: an NHWC input ``[N, H, W, C]`` (detected from a leading
   ``Transpose(perm=[0, 3, 1, 2])``, or ``--layout nhwc``) becomes the canonical NCHW
   input; the Transpose pair cancels.
3. ``input_size``: dynamic H/W fixed from ``--input-size H,W`` or the calibration
   data's image size (the analysis needs static channel shapes).
4. ``dynamic_batch``: a fixed batch becomes dynamic; ``Reshape`` constants that
   carry that batch (``[1, 256]``) are rewritten to ``[-1, 256]``. Checked in
   onnxruntime: batch 2 of the rewrite == two batch-1 runs of the original.
5. ``static_reshapes``: ``Reshape`` targets and ``Slice`` bounds computed from ``Shape``
   subgraphs (Paddle's and tf2onnx's flatten: Shape -> Slice -> Concat; the legacy
   exporter's ``chunk``) are evaluated in onnxruntime at batch 1 and 2 and replaced by
   constants (``-1`` for the batch), so shapes are known downstream.
   ``split_to_slices``: ``Split`` on the channel axis becomes one ``Slice`` per output
   (each an index map the analysis already knows). ``channel_shuffle``: ShuffleNet's
   ``Reshape [N, g, C/g, H, W] -> Transpose(0, 2, 1, 3, 4) -> Reshape [N, C, H, W]``
   becomes one ``Gather(axis=1)`` with the permutation (an index map too).
6. ``transpose_flatten``: ``Transpose(perm=[0, 2, 3, 1]) -> flatten -> MatMul/Gemm`` (Keras'
   ``Flatten`` reads NHWC order) becomes ``Flatten`` of the NCHW map with the classifier's
   weight rows permuted to match: exact, and the last conv group is no longer pinned.
7. ``strip_softmax``: a trailing Softmax/LogSoftmax over the class axis (with
   Identity/Cast/positive-scalar-Mul after it, Paddle's ``scale``) is removed, so the
   output is logits (same argmax; the composed model's softmax gives the same
   probabilities back).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxmod.errors import OnnxmodError

UPGRADE_OPSET = 13  # target of onnx.version_converter for old graphs
MIN_OPSET = 11  # graphs below this (or IR < 4) are upgraded
LAYOUTS = ("nchw", "nhwc")
TO_NCHW = [0, 3, 1, 2]
TO_NHWC = [0, 2, 3, 1]
PASS_THROUGH = ("Identity", "Cast")  # may follow the Softmax at the end of a graph
BATCH_PARAM = "N"

Step = dict[str, Any]


def canonical_input(
    model: onnx.ModelProto,
    where: str,
    layout: str | None = None,
    input_size: Sequence[int] | None = None,
    data_size: Sequence[int] | None = None,
) -> tuple[onnx.ModelProto, list[Step]]:
    """A copy of ``model`` with one NCHW input of static C/H/W, dynamic batch and logits out.

    ``layout``: ``nchw``/``nhwc`` or None (detect); ``input_size``: (H, W) from the user;
    ``data_size``: (H, W) of the calibration images (used only for a dynamic H/W).
    Returns the model and the list of rewrites made (empty for a canonical graph).
    """
    if layout is not None and layout not in LAYOUTS:
        raise OnnxmodError(f"--layout must be one of {', '.join(LAYOUTS)}, got '{layout}'")
    m = onnx.ModelProto()
    m.CopyFrom(model)
    steps: list[Step] = []
    for stage in (_upgrade, _check_single_io):
        stage(m, where, steps)
    _to_nchw(m, where, layout, steps)
    _fix_input_size(m, where, input_size, data_size, steps)
    m = _dynamic_batch(m, where, steps)
    _static_reshapes(m, where, steps)
    _split_to_slices(m, steps)
    _shuffle_to_gather(m, steps)
    _transpose_flatten(m, steps)
    _strip_softmax(m, steps)
    return m, steps


# --------------------------------------------------------------------------- helpers
def image_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    inits = {i.name for i in model.graph.initializer}
    return next(i for i in model.graph.input if i.name not in inits)


def _dims(vi: onnx.ValueInfoProto) -> list[int | None]:
    """Shape with unknown (dim_param, missing, or the -1 some exporters write) as None."""
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in vi.type.tensor_type.shape.dim]


def _set_dims(vi: onnx.ValueInfoProto, dims: Sequence[int | str | None]) -> None:
    shape = vi.type.tensor_type.shape
    shape.ClearField("dim")
    for d in dims:
        new = shape.dim.add()
        if isinstance(d, str):
            new.dim_param = d
        elif d is not None:
            new.dim_value = int(d)


def _consumers(graph: onnx.GraphProto, tensor: str) -> list[onnx.NodeProto]:
    return [n for n in graph.node if tensor in n.input]


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    a = next((a for a in node.attribute if a.name == name), None)
    return default if a is None else helper.get_attribute_value(a)


def _replace_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    for n in graph.node:
        n.input[:] = [new if i == old else i for i in n.input]


def _constant_value(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for n in graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            v = _attr(n, "value")
            return None if v is None else numpy_helper.to_array(v)
    return None


# --------------------------------------------------------------------------- stages
def _upgrade(m: onnx.ModelProto, where: str, steps: list[Step]) -> None:
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 0)
    if m.ir_version >= 4 and opset >= MIN_OPSET:
        return
    before = {"ir_version": int(m.ir_version), "opset": int(opset)}
    if opset < MIN_OPSET:
        try:
            converted = onnx.version_converter.convert_version(m, UPGRADE_OPSET)
        except Exception as e:
            raise OnnxmodError(f"{where}: cannot upgrade opset {opset} to {UPGRADE_OPSET} "
                               f"({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from None
        m.CopyFrom(converted)
        opset = UPGRADE_OPSET
    # IR 3 lists every initializer as a graph input too; from IR 4 on they need not be
    inits = {i.name for i in m.graph.initializer}
    keep = [i for i in m.graph.input if i.name not in inits]
    del m.graph.input[:]
    m.graph.input.extend(keep)
    m.ir_version = max(int(m.ir_version), onnx.helper.find_min_ir_version_for(list(m.opset_import)), 7)
    steps.append({"step": "upgrade", "from": before, "to": {"ir_version": int(m.ir_version), "opset": int(opset)}})


def _check_single_io(m: onnx.ModelProto, where: str, steps: list[Step]) -> None:
    inits = {i.name for i in m.graph.initializer}
    inputs = [i for i in m.graph.input if i.name not in inits]
    if len(inputs) != 1 or len(m.graph.output) != 1:
        raise OnnxmodError(f"{where}: expected one image input and one logits output, got "
                           f"{len(inputs)} inputs and {len(m.graph.output)} outputs")
    if len(_dims(inputs[0])) != 4:
        raise OnnxmodError(f"{where}: input '{inputs[0].name}' must be a 4-D image batch, got shape "
                           f"{_dims(inputs[0])}")


def _leading_transposes(m: onnx.ModelProto, name: str) -> tuple[list[onnx.NodeProto], list[onnx.NodeProto]]:
    """(consumers of ``name`` that are Transpose NHWC->NCHW, the other consumers)."""
    cons = _consumers(m.graph, name)
    to_nchw = [n for n in cons if n.op_type == "Transpose" and list(_attr(n, "perm", [])) == TO_NCHW]
    return to_nchw, [n for n in cons if n not in to_nchw]


def _to_nchw(m: onnx.ModelProto, where: str, layout: str | None, steps: list[Step]) -> None:
    inp = image_input(m)
    dims = _dims(inp)
    transposes, others = _leading_transposes(m, inp.name)
    if layout is None:
        layout = _detect_layout(inp.name, dims, transposes, others, where)
        how = f"leading Transpose '{transposes[0].name}'" if layout == "nhwc" else None
    else:
        how = "--layout nhwc"
    if layout == "nchw":
        return
    n, h, w, c = dims
    nchw = f"{inp.name}__nchw"
    for t in transposes:  # the exporter's own NHWC->NCHW: cancels with ours
        _replace_uses(m.graph, t.output[0], nchw)
        m.graph.node.remove(t)
    if others:
        _replace_uses(m.graph, inp.name, f"{inp.name}__nhwc")
        m.graph.node.insert(0, helper.make_node("Transpose", [nchw], [f"{inp.name}__nhwc"], perm=TO_NHWC,
                                                name=f"{inp.name}__to_nhwc"))
    batch = inp.type.tensor_type.shape.dim[0]
    inp.name = nchw
    _set_dims(inp, [batch.dim_param if batch.HasField("dim_param") else n, c, h, w])
    steps.append({"step": "nhwc_input", "detected_from": how, "kept_transpose": bool(others)})


def _detect_layout(name: str, dims: list[int | None], transposes: list, others: list, where: str) -> str:
    if transposes and not others:
        return "nhwc"
    if transposes:
        raise OnnxmodError(f"{where}: input '{name}' feeds both a Transpose to NCHW ('{transposes[0].name}') and "
                           f"other nodes ('{others[0].name}'): pass --layout nchw or --layout nhwc")
    c_first, c_last = dims[1], dims[3]
    looks_nhwc = c_last in (1, 3, 4) and c_first not in (1, 3, 4)
    if looks_nhwc:
        raise OnnxmodError(f"{where}: input '{name}' {_fmt(dims)} looks NHWC (last axis {c_last}) but no Transpose "
                           f"to NCHW follows it: pass --layout nhwc or --layout nchw")
    return "nchw"


def _fmt(dims: Sequence[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _fix_input_size(m: onnx.ModelProto, where: str, input_size: Sequence[int] | None,
                    data_size: Sequence[int] | None, steps: list[Step]) -> None:
    inp = image_input(m)
    dims = _dims(inp)
    if dims[1] is None:
        raise OnnxmodError(f"{where}: input '{inp.name}' {_fmt(dims)} has no static channel count")
    hw = dims[2:]
    if input_size is not None:
        input_size = [int(v) for v in input_size]
        if len(input_size) != 2 or min(input_size) < 1:
            raise OnnxmodError(f"--input-size must be H,W with positive integers, got {input_size}")
        if None not in hw and hw != input_size:
            raise OnnxmodError(f"{where}: input '{inp.name}' is {hw[0]}x{hw[1]} but --input-size says "
                               f"{input_size[0]}x{input_size[1]}")
    if None not in hw:
        return
    size, source = (input_size, "--input-size") if input_size is not None else (data_size, "calibration data")
    if size is None:
        raise OnnxmodError(f"{where}: input '{inp.name}' {_fmt(dims)} has a dynamic height/width: "
                           f"pass --input-size H,W")
    size = [int(v) for v in size]
    batch = inp.type.tensor_type.shape.dim[0]
    _set_dims(inp, [batch.dim_param if batch.HasField("dim_param") else dims[0], dims[1], *size])
    steps.append({"step": "input_size", "size": size, "from": source})


def _dynamic_batch(m: onnx.ModelProto, where: str, steps: list[Step]) -> onnx.ModelProto:
    inp = image_input(m)
    b = inp.type.tensor_type.shape.dim[0]
    fixed = int(b.dim_value) if b.HasField("dim_value") and b.dim_value > 0 else None
    if fixed is None:  # already dynamic: give it a name if it has none (or is Paddle's -1)
        name = b.dim_param if b.HasField("dim_param") and b.dim_param else BATCH_PARAM
        b.Clear()
        b.dim_param = name
        return m
    original = onnx.ModelProto()
    original.CopyFrom(m)
    b.Clear()
    b.dim_param = BATCH_PARAM
    for o in m.graph.output:
        od = o.type.tensor_type.shape.dim
        if len(od) and od[0].HasField("dim_value") and od[0].dim_value == fixed:
            od[0].Clear()
            od[0].dim_param = BATCH_PARAM
    rewritten = _rewrite_batch_reshapes(m, fixed)
    _check_batch_rewrite(original, m, fixed, where)
    steps.append({"step": "dynamic_batch", "was": fixed, "reshapes": rewritten})
    return m


def _rewrite_batch_reshapes(m: onnx.ModelProto, batch: int) -> list[str]:
    """Reshape targets ``[batch, d...]`` -> ``[-1, d...]`` (or ``[0, ...]`` when a -1 is already there)."""
    done = []
    for i, n in enumerate(m.graph.node):
        if n.op_type != "Reshape" or len(n.input) < 2:
            continue
        shape = _constant_value(m.graph, n.input[1])
        if shape is None or shape.ndim != 1 or shape.size < 2 or int(shape[0]) != batch:
            continue
        new = shape.astype(np.int64).copy()
        if -1 not in new[1:]:
            new[0] = -1  # the batch is whatever is left
        elif not _attr(n, "allowzero", 0):
            new[0] = 0  # another -1 already: copy the input's batch dim
        else:
            continue
        name = f"{n.name or f'Reshape_{i}'}__dynamic_shape"
        m.graph.initializer.append(numpy_helper.from_array(new, name))
        n.input[1] = name
        done.append(n.name or f"Reshape_{i}")
    return done


def _check_batch_rewrite(original: onnx.ModelProto, rewritten: onnx.ModelProto, batch: int, where: str) -> None:
    """Batch ``2 * batch`` of the rewrite must equal two runs of the original (onnxruntime, CPU)."""
    from onnxmod import runtime

    dims = _dims(image_input(original))
    rng = np.random.default_rng(0)
    x = rng.random((2 * batch, *dims[1:]), dtype=np.float32)
    ref = np.concatenate([runtime.run(runtime.make_session(original, device="cpu", name=where),
                                      x[i * batch:(i + 1) * batch])[0] for i in range(2)])
    try:
        got = runtime.run(runtime.make_session(rewritten, device="cpu", name=where), x)[0]
    except OnnxmodError as e:  # onnxruntime rejects the rewrite: a batch-bound op we did not see
        raise OnnxmodError(f"{where}: the batch is fixed at {batch} and could not be made dynamic ({e})") from None
    if got.shape != ref.shape or not np.allclose(got, ref, atol=1e-4, rtol=1e-4):
        raise OnnxmodError(f"{where}: the batch is fixed at {batch} and could not be made dynamic "
                           f"(a batch of {2 * batch} no longer gives per-image results)")


SHAPE_INPUTS = {"Reshape": (1,), "Slice": (1, 2, 3, 4)}  # inputs that are shape arithmetic


def _static_reshapes(m: onnx.ModelProto, where: str, steps: list[Step]) -> None:
    """Reshape targets and Slice bounds computed from ``Shape`` (the legacy exporter's
    ``x.view(x.size(0), ...)`` and ``chunk``, Paddle's and tf2onnx's flatten) -> constants,
    from their values at batch 1 and 2 in onnxruntime (a Reshape's batch entry becomes -1)."""
    from onnxmod import runtime

    g = m.graph
    targets = [(n, i) for n in g.node for i in SHAPE_INPUTS.get(n.op_type, ())
               if i < len(n.input) and n.input[i] and _constant_value(g, n.input[i]) is None]
    if not targets:
        return
    probe = onnx.ModelProto()
    probe.CopyFrom(m)
    names = list(dict.fromkeys(n.input[i] for n, i in targets))
    probe.graph.output.extend(helper.make_tensor_value_info(t, onnx.TensorProto.INT64, None) for t in names)
    sess = runtime.make_session(probe, device="cpu", name=where)
    dims = _dims(image_input(m))
    rng = np.random.default_rng(0)
    runs = [runtime.run(sess, rng.random((b, *dims[1:]), dtype=np.float32), names) for b in (1, 2)]
    done = []
    for node, i in targets:
        k = names.index(node.input[i])
        if node.op_type == "Reshape":
            new = _batch_free_shape(runs[0][k], runs[1][k], allowzero=bool(_attr(node, "allowzero", 0)))
        else:  # Slice bounds must not depend on the batch
            new = runs[0][k] if np.array_equal(runs[0][k], runs[1][k]) else None
        if new is None:
            continue
        const = f"{node.input[i]}__static"
        if const not in {t.name for t in g.initializer}:
            g.initializer.append(numpy_helper.from_array(np.asarray(new, dtype=np.int64), const))
        node.input[i] = const
        done.append(node.name)
    _drop_dead_nodes(m)
    if done:
        steps.append({"step": "static_reshapes", "nodes": list(dict.fromkeys(done))})


def _batch_free_shape(at1: np.ndarray, at2: np.ndarray, allowzero: bool) -> np.ndarray | None:
    """The Reshape target valid for every batch, from its values at batch 1 and 2 (None: can't say)."""
    at1, at2 = np.asarray(at1, dtype=np.int64).ravel(), np.asarray(at2, dtype=np.int64).ravel()
    if at1.shape != at2.shape:
        return None
    varying = np.nonzero(at1 != at2)[0]
    if varying.size == 0:
        return at1
    if varying.size != 1 or at1[varying[0]] != 1 or at2[varying[0]] != 2:
        return None
    out = at1.copy()
    if -1 not in at1:
        out[varying[0]] = -1
    elif varying[0] == 0 and not allowzero:
        out[0] = 0  # copy the input's batch dim
    else:
        return None
    return out


def _drop_dead_nodes(m: onnx.ModelProto) -> None:
    """Remove nodes nothing reads (the shape arithmetic a constant replaced)."""
    g = m.graph
    while True:
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        dead = [n for n in g.node if not any(o in used for o in n.output)]
        if not dead:
            return
        for n in dead:
            g.node.remove(n)


def _split_to_slices(m: onnx.ModelProto, steps: list[Step]) -> None:
    from onnxmod import graphio

    g = m.graph
    splits = [n for n in g.node if n.op_type == "Split"]
    if not splits:
        return
    shapes = graphio.static_shapes(m)
    done = []
    for n in splits:
        xs = shapes.get(n.input[0])
        if xs is None or len(xs) < 2 or xs[1] is None or int(_attr(n, "axis", 0)) % len(xs) != 1:
            continue
        sizes = _constant_value(g, n.input[1]) if len(n.input) > 1 and n.input[1] else _attr(n, "split")
        c, parts = int(xs[1]), len(n.output)
        if sizes is None:
            if c % parts:
                continue
            sizes = [c // parts] * parts
        sizes = [int(v) for v in np.asarray(sizes).ravel()]
        if sum(sizes) != c or len(sizes) != parts:
            continue
        at = list(g.node).index(n)
        g.node.remove(n)
        offset = 0
        for k, (out, size) in enumerate(zip(n.output, sizes)):
            base = f"{n.name}__slice{k}"
            g.initializer.extend(numpy_helper.from_array(np.array([v], dtype=np.int64), f"{base}_{what}")
                                 for what, v in (("starts", offset), ("ends", offset + size), ("axes", 1)))
            g.node.insert(at + k, helper.make_node("Slice", [n.input[0], f"{base}_starts", f"{base}_ends",
                                                             f"{base}_axes"], [out], name=base))
            offset += size
        done.append(n.name)
    if done:
        steps.append({"step": "split_to_slices", "splits": done})


def _shuffle_to_gather(m: onnx.ModelProto, steps: list[Step]) -> None:
    from onnxmod import graphio

    g = m.graph
    if not any(n.op_type == "Transpose" and list(_attr(n, "perm", [])) == [0, 2, 1, 3, 4] for n in g.node):
        return  # no channel shuffle: skip the shape inference
    shapes = graphio.static_shapes(m)
    done = []
    for first in [n for n in g.node if n.op_type == "Reshape"]:
        xs, ys = shapes.get(first.input[0]), shapes.get(first.output[0])
        t = _only_consumer(g, first.output[0])
        last = _only_consumer(g, t.output[0]) if t is not None else None
        if (last is None or t.op_type != "Transpose" or last.op_type != "Reshape" or xs is None or ys is None
                or len(xs) != 4 or len(ys) != 5 or None in xs[1:] or None in ys[1:]
                or list(_attr(t, "perm", [])) != [0, 2, 1, 3, 4] or shapes.get(last.output[0]) != xs
                or ys[1] * ys[2] != xs[1] or tuple(ys[3:]) != tuple(xs[2:])):
            continue
        groups, c = int(ys[1]), int(xs[1])
        perm = np.arange(c).reshape(groups, c // groups).T.ravel()  # output channel j = input channel perm[j]
        name = f"{first.name}__shuffle"
        g.initializer.append(numpy_helper.from_array(perm.astype(np.int64), f"{name}_perm"))
        at = list(g.node).index(first)
        for n in (first, t, last):
            g.node.remove(n)
        g.node.insert(at, helper.make_node("Gather", [first.input[0], f"{name}_perm"], [last.output[0]], axis=1,
                                           name=name))
        done.append({"reshape": first.name, "transpose": t.name, "groups": groups})
    if done:
        steps.append({"step": "channel_shuffle", "shuffles": done})


def _transpose_flatten(m: onnx.ModelProto, steps: list[Step]) -> None:
    from onnxmod import graphio

    g = m.graph
    transposes = [n for n in g.node if n.op_type == "Transpose" and list(_attr(n, "perm", [])) == TO_NHWC]
    if not transposes:
        return
    shapes = graphio.static_shapes(m)
    done = []
    for t in transposes:
        flat = _only_consumer(g, t.output[0])
        fc = _only_consumer(g, flat.output[0]) if flat is not None else None
        xs, ys = shapes.get(t.input[0]), shapes.get(flat.output[0]) if flat is not None else None
        if (fc is None or flat.op_type not in ("Reshape", "Flatten") or xs is None or ys is None
                or len(xs) != 4 or None in xs[1:] or len(ys) != 2 or ys[1] != int(np.prod(xs[1:]))
                or (flat.op_type == "Flatten" and _attr(flat, "axis", 1) != 1)):
            continue
        weight = _classifier_weight(g, fc)
        if weight is None:
            continue
        init, rows_first = weight
        w = numpy_helper.to_array(init)
        _, c, h, wd = xs
        # row of NHWC feature (y, x, ch) -> row of NCHW feature (ch, y, x)
        nhwc_row = np.arange(h * wd * c).reshape(h, wd, c).transpose(2, 0, 1).ravel()
        w = w[nhwc_row] if rows_first else w[:, nhwc_row]
        init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w), init.name))
        flat.input[:] = [t.input[0]]
        flat.op_type = "Flatten"
        del flat.attribute[:]
        flat.attribute.append(helper.make_attribute("axis", 1))
        g.node.remove(t)
        done.append({"transpose": t.name, "flatten": flat.name, "weights": init.name})
    if done:
        steps.append({"step": "transpose_flatten", "rewrites": done})


def _only_consumer(g: onnx.GraphProto, tensor: str) -> onnx.NodeProto | None:
    cons = _consumers(g, tensor)
    return cons[0] if len(cons) == 1 and tensor not in {o.name for o in g.output} else None


def _classifier_weight(g: onnx.GraphProto, fc: onnx.NodeProto) -> tuple[onnx.TensorProto, bool] | None:
    """(the weight initializer of a MatMul/Gemm reading features as A, rows are features?)"""
    if fc.op_type not in ("MatMul", "Gemm") or len(fc.input) < 2:
        return None
    if fc.op_type == "Gemm" and _attr(fc, "transA", 0):
        return None
    init = next((i for i in g.initializer if i.name == fc.input[1]), None)
    if init is None or len(init.dims) != 2 or len(_consumers(g, init.name)) != 1:
        return None
    return init, not (fc.op_type == "Gemm" and _attr(fc, "transB", 0))


def _strip_softmax(m: onnx.ModelProto, steps: list[Step]) -> None:
    g = m.graph
    out = g.output[0].name
    producer = {o: n for n in g.node for o in n.output}
    removed: list[onnx.NodeProto] = []
    node = producer.get(out)
    while node is not None and (node.op_type in PASS_THROUGH or _is_positive_scale(g, node)):
        removed.append(node)
        node = producer.get(node.input[0])
    if node is None or node.op_type not in ("Softmax", "LogSoftmax") or not _over_class_axis(m, node):
        return
    if any(len(_consumers(g, t)) > 1 for n in [node, *removed] for t in n.output):
        return  # something else reads the probabilities: leave the graph as it is
    logits = node.input[0]
    for n in [node, *removed]:
        g.node.remove(n)
    for n in g.node:  # the pre-softmax tensor takes the output's name
        n.output[:] = [out if o == logits else o for o in n.output]
        n.input[:] = [out if i == logits else i for i in n.input]
    g.output[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    steps.append({"step": "strip_softmax", "node": node.name, "op": node.op_type,
                  "also_removed": [f"{n.op_type} '{n.name}'" for n in removed]})


def _is_positive_scale(g: onnx.GraphProto, node: onnx.NodeProto) -> bool:
    """``Mul`` by a positive scalar constant (Paddle's ``scale`` op): argmax-preserving."""
    if node.op_type != "Mul" or len(node.input) != 2:
        return False
    v = _constant_value(g, node.input[1])
    return v is not None and v.size == 1 and float(v.ravel()[0]) > 0


def _over_class_axis(m: onnx.ModelProto, node: onnx.NodeProto) -> bool:
    """Softmax whose axis is the last of a rank-2 ``[N, K]`` tensor (any opset's default)."""
    from onnxmod import graphio

    shape = graphio.static_shapes(m).get(node.input[0])
    axis = int(_attr(node, "axis", 1 if graphio.opset_version(m) < 13 else -1))
    return shape is not None and len(shape) == 2 and axis in (1, -1)


def where_shapes_stop(model: onnx.ModelProto) -> onnx.NodeProto | None:
    """Walking back from the (shape-less) output: the node whose inputs have shapes but whose
    output has none -- the op shape inference cannot see through (a custom-domain op, say)."""
    g = model.graph
    known = {vi.name for vi in list(g.input) + list(g.value_info)
             if vi.type.tensor_type.HasField("shape")} | {i.name for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    node = producer.get(g.output[0].name)
    seen = set()
    while node is not None and node.name not in seen:
        seen.add(node.name)
        unknown = [i for i in node.input if i and i not in known and i in producer]
        if not unknown:
            return node
        node = producer[unknown[0]]
    return None


# --------------------------------------------------------------------------- in words
def _names(items: Sequence[Any], most: int = 3) -> str:
    shown = ", ".join(f"'{n}'" for n in items[:most])
    return shown + (f" and {len(items) - most} more" if len(items) > most else "")


def _origin(what: Any) -> str:
    """'the calibration data', but '--input-size' (a flag takes no article)."""
    return str(what) if str(what).startswith("--") else f"the {what}"


def describe(step: Step) -> str:
    """One front-end record (``onnxmod.frontend`` metadata) in words, for ``onnxmod info``."""
    kind = step.get("step")
    if kind == "upgrade":
        a, b = step.get("from", {}), step.get("to", {})
        return (f"upgraded from IR {a.get('ir_version')}, opset {a.get('opset')} to IR {b.get('ir_version')}, "
                f"opset {b.get('opset')}")
    if kind == "nhwc_input":
        return (f"NHWC input turned into the NCHW input (from {_origin(step.get('detected_from'))})"
                + ("; a Transpose back to NHWC stays for the nodes that read NHWC" if step.get("kept_transpose") else ""))
    if kind == "input_size":
        h, w = step.get("size", ["?", "?"])
        return f"dynamic height/width fixed to {h}x{w} (from {_origin(step.get('from'))})"
    if kind == "dynamic_batch":
        reshapes = step.get("reshapes") or []
        return (f"fixed batch {step.get('was')} made dynamic"
                + (f"; batch-bound Reshape constants rewritten in {_names(reshapes)}" if reshapes else ""))
    if kind == "static_reshapes":
        return f"shapes computed from Shape subgraphs made constants in {_names(step.get('nodes') or [])}"
    if kind == "split_to_slices":
        return f"channel Split {_names(step.get('splits') or [])} turned into one Slice per output"
    if kind == "channel_shuffle":
        s = step.get("shuffles") or []
        return (f"{len(s)} channel shuffle(s) (Reshape -> Transpose -> Reshape, from "
                f"{_names([x.get('reshape') for x in s])}) turned into one Gather each")
    if kind == "transpose_flatten":
        r = step.get("rewrites") or []
        return (f"Transpose before Flatten ({_names([x.get('transpose') for x in r])}) folded into the classifier "
                f"weights {_names([x.get('weights') for x in r])}")
    if kind == "strip_softmax":
        also = step.get("also_removed") or []
        return (f"trailing {step.get('op')} '{step.get('node')}' stripped: the output is the logits"
                + (f" (also removed: {', '.join(also)})" if also else ""))
    return ", ".join(f"{k} {v}" for k, v in step.items())  # a record this version does not know
