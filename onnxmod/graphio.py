"""The one place that converts between ONNX protos and onnx-graphsurgeon graphs.

Also: canonicalisation (constant folding, naming, Reshape->Flatten) and shape
inference, so the channel analysis sees the same graph whatever exporter made it.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import shape_inference

from onnxmod.errors import OnnxmodError


def to_gs(model: onnx.ModelProto) -> gs.Graph:
    return gs.import_onnx(model)


def _export(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """``graph`` as a model with ``like``'s IR version and opsets."""
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = like.ir_version
    del out.opset_import[:]
    out.opset_import.extend(like.opset_import)
    return out


def from_gs(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """Export ``graph`` keeping ``like``'s IR version, opsets and metadata; shapes re-inferred."""
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out = _export(graph, like)
    del out.metadata_props[:]
    out.metadata_props.extend(like.metadata_props)
    out.producer_name = like.producer_name or "onnxmod"
    out.producer_version = like.producer_version
    return infer_shapes(out)


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with stale value_info and output shapes dropped and every shape re-inferred."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.value_info[:]
    for o in m.graph.output:
        o.type.tensor_type.ClearField("shape")
    try:
        m = shape_inference.infer_shapes(m, strict_mode=False, data_prop=True)
    except Exception as e:  # pragma: no cover - onnx internal
        raise OnnxmodError(f"shape inference failed: {e}") from None
    _keep_batch_names(model, m)
    return m


def _keep_batch_names(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    """Inference invents names like 'unk__0' for dynamic dims; restore the input's batch name."""
    name = None
    for i in before.graph.input:
        dims = i.type.tensor_type.shape.dim
        if len(dims) and dims[0].HasField("dim_param"):
            name = dims[0].dim_param
            break
    if name is None:
        return
    for o in after.graph.output:
        dims = o.type.tensor_type.shape.dim
        if len(dims) and not dims[0].HasField("dim_value"):
            dims[0].dim_param = name


def opset_version(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 0


def canonicalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """A numerically identical graph that the channel analysis can read.

    - every node has a unique name (error messages and rewrites refer to them);
    - Constant nodes and constant subgraphs (e.g. legacy-exporter pad/shape
      computations) are folded into initializers;
    - ``Reshape`` of ``[N, C, H, W]`` into ``[N, C*H*W]`` becomes ``Flatten(axis=1)``;
    - shapes are inferred.
    """
    model = infer_shapes(model)
    graph = to_gs(model)
    seen: set[str] = set()
    for i, node in enumerate(graph.nodes):
        if not node.name or node.name in seen:
            node.name = f"{node.op}_{i}"
        seen.add(node.name)
    _fold(graph)
    static = static_shapes(from_gs(graph, model))
    for node in graph.nodes:
        if node.op == "Reshape" and _is_flatten_reshape(node, static):
            node.op = "Flatten"
            node.attrs = {"axis": 1}
            node.inputs = node.inputs[:1]
    graph.cleanup(remove_unused_graph_inputs=False)
    return from_gs(graph, model)


def static_shapes(model: onnx.ModelProto, batch: int = 1) -> dict[str, tuple]:
    """Every tensor's inferred shape with the batch dim of the inputs fixed to ``batch``.

    Fixing the batch lets data propagation resolve computed shapes (``x.view(x.size(0), -1)``).
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for i in m.graph.input:
        dims = i.type.tensor_type.shape.dim
        if len(dims) and not dims[0].HasField("dim_value"):
            dims[0].Clear()
            dims[0].dim_value = batch
    m = infer_shapes(m)
    out = {}
    for vi in list(m.graph.input) + list(m.graph.value_info) + list(m.graph.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            out[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
    for init in m.graph.initializer:
        out[init.name] = tuple(init.dims)
    return out


def largest_activation(model: onnx.ModelProto) -> int:
    """Elements per image of the model's largest tensor (shapes without the batch dim, as inferred;
    dims left unknown count as 1)."""
    g = model.graph if model.graph.value_info else infer_shapes(model).graph
    sizes = [int(np.prod([d.dim_value or 1 for d in vi.type.tensor_type.shape.dim[1:]]))
             for vi in list(g.input) + list(g.value_info) + list(g.output) if vi.type.tensor_type.HasField("shape")]
    return max(sizes, default=1)


def _fold(graph: gs.Graph) -> None:
    graph.fold_constants(error_ok=True)
    graph.cleanup(remove_unused_graph_inputs=False)


def fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """A numerically identical model whose Constant nodes and all-constant subgraphs (e.g.
    the legacy exporter's pad computations) are initializers. IR version, opsets and
    metadata are kept."""
    graph = to_gs(model)
    _fold(graph)
    return from_gs(graph, model)


def _is_flatten_reshape(node: gs.Node, static: dict[str, tuple]) -> bool:
    """Reshape ``[N, d1, d2, ...] -> [N, d1*d2*...]``, i.e. Flatten(axis=1)."""
    xs, ys = static.get(node.inputs[0].name), static.get(node.outputs[0].name)
    if xs is None or ys is None or len(ys) != 2 or len(xs) < 2 or None in xs or None in ys:
        return False
    return ys[0] == xs[0] and ys[1] == int(np.prod(xs[1:]))


def add_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the intermediate tensors ``names`` (float32)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    existing = {o.name for o in m.graph.output}
    for n in names:
        if n not in existing:
            m.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
            existing.add(n)
    return m


def segment(nodes: list[gs.Node], inputs: list[gs.Tensor], outputs: list[gs.Tensor],
            like: onnx.ModelProto) -> onnx.ModelProto:
    """A model of ``nodes`` (from one graph) alone, fed ``inputs`` and returning ``outputs``,
    with ``like``'s IR version and opsets; every input/output is float32 of any shape."""
    g = gs.Graph(nodes=list(nodes), inputs=list(inputs), outputs=list(outputs), opset=opset_version(like))
    out = _export(g, like)
    for vi in list(out.graph.input) + list(out.graph.output):
        vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
        vi.type.tensor_type.ClearField("shape")
    return out


def tensor_key(t: onnx.TensorProto) -> tuple:
    """What makes two initializers interchangeable: dtype, shape and a digest of the values."""
    arr = onnx.numpy_helper.to_array(t)
    return ("T", int(t.data_type), tuple(int(d) for d in t.dims),
            hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest())


def attribute_key(a: onnx.AttributeProto) -> tuple:
    """A node attribute as a hashable value (tensor attributes by :func:`tensor_key`)."""
    if a.type == onnx.AttributeProto.TENSOR:
        return (a.name, tensor_key(a.t))
    c = onnx.AttributeProto()
    c.CopyFrom(a)
    c.ClearField("doc_string")
    return (a.name, c.SerializeToString(deterministic=True))


def computation_digests(model: onnx.ModelProto) -> dict[str, str]:
    """Per tensor of ``model`` (nodes in topological order), a digest of everything that
    computes it -- ops, attributes, initializer values, upstream -- so tensors with equal
    digests, in this model or another, hold equal values."""
    digest = {i.name: f"input:{i.name}" for i in model.graph.input}
    digest.update({t.name: hashlib.sha256(repr(tensor_key(t)).encode()).hexdigest() for t in model.graph.initializer})
    for n in model.graph.node:
        key = (n.domain or "", n.op_type, [digest.get(i, f"?:{i}") for i in n.input],
               sorted(attribute_key(a) for a in n.attribute))
        base = hashlib.sha256(repr(key).encode()).hexdigest()
        for i, o in enumerate(n.output):
            digest[o] = f"{base}:{i}"
    return digest
