"""Model size and compute: parameter count and multiply-accumulates (MACs) for one image.

MACs count Conv (incl. grouped/depthwise), ConvTranspose, Gemm and MatMul only, from
shapes inferred by ``onnx.shape_inference`` with the batch dimension set to 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

import onnx
from onnx import TensorProto

from onnxmod import ops
from onnxmod.errors import OnnxmodError

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
MAC_OPS = ops.mac_ops()  # ("Conv", "ConvTranspose", "Gemm", "MatMul"): the registry's families with MACs


@dataclass
class ModelCost:
    params: int
    macs: int

    def to_dict(self) -> dict:
        return asdict(self)


def _all_nodes(graph: onnx.GraphProto) -> Iterable[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_nodes(g)


def _numel(dims: Iterable[int]) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def count_params(model: onnx.ModelProto) -> int:
    """Elements of float initializers and float Constant-node tensors that the graph uses.

    Integer tensors (shapes, indices, axes) are not parameters and are not counted.
    """
    used: set[str] = set()
    for node in _all_nodes(model.graph):
        used.update(i for i in node.input if i)
    used.update(o.name for o in model.graph.output)
    total = 0
    for init in model.graph.initializer:
        if init.name in used and init.data_type in FLOAT_TYPES:
            total += _numel(init.dims)
    for node in _all_nodes(model.graph):
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            continue
        if not any(o in used for o in node.output):
            continue
        for attr in node.attribute:
            if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                if attr.t.data_type in FLOAT_TYPES:
                    total += _numel(attr.t.dims)
            elif attr.name == "value_float":
                total += 1
            elif attr.name == "value_floats":
                total += len(attr.floats)
    return total


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _fix_inputs(model: onnx.ModelProto, input_hw: tuple[int, int] | None) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for inp in _graph_inputs(m):
        if not inp.type.HasField("tensor_type") or not inp.type.tensor_type.HasField("shape"):
            continue
        dims = inp.type.tensor_type.shape.dim
        if len(dims) == 0:
            continue
        dims[0].Clear()
        dims[0].dim_value = 1
        if input_hw is not None and len(dims) == 4:
            for d, v in zip((dims[2], dims[3]), input_hw):
                d.Clear()
                d.dim_value = int(v)
    # value_info recorded for the old shapes would conflict with the new batch size
    del m.graph.value_info[:]
    for out in m.graph.output:
        if out.type.HasField("tensor_type"):
            out.type.tensor_type.ClearField("shape")
    return m


def _shape_map(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    shapes: dict[str, list[int | None]] = {}
    for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        t = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and t.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    for init in model.graph.initializer:
        shapes[init.name] = [int(d) for d in init.dims]
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    shapes[node.output[0]] = [int(d) for d in attr.t.dims]
    return shapes


def _known(shape: list[int | None] | None) -> bool:
    return shape is not None and all(d is not None for d in shape)


def macs_by_node(model: onnx.ModelProto, input_hw: tuple[int, int] | None = None, strict: bool = True) -> dict[str, int]:
    """MACs of each Conv/ConvTranspose/Gemm/MatMul node (by node name, or ``op_type#i``) for one image.

    ``input_hw``: override the (H, W) of 4-D inputs. With ``strict``, a node whose shapes cannot
    be inferred raises OnnxmodError; otherwise it counts 0.
    """
    fixed = _fix_inputs(model, input_hw)
    try:
        inferred = onnx.shape_inference.infer_shapes(fixed, data_prop=True)
    except Exception as e:
        raise OnnxmodError(f"shape inference failed: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    shapes = _shape_map(inferred)
    result: dict[str, int] = {}
    for i, node in enumerate(inferred.graph.node):
        if node.op_type not in MAC_OPS or node.domain not in ("", "ai.onnx"):
            continue
        key = node.name or f"{node.op_type}#{i}"
        try:
            result[key] = _node_macs(node, shapes)
        except _Unknown as e:
            if strict:
                raise OnnxmodError(f"cannot count MACs of {node.op_type} node '{key}': {e}") from None
            result[key] = 0
    return result


class _Unknown(Exception):
    pass


def _need(shapes: dict, name: str) -> list[int]:
    s = shapes.get(name)
    if not _known(s):
        raise _Unknown(f"shape of '{name}' unknown ({s})")
    return s  # type: ignore[return-value]


def _node_macs(node: onnx.NodeProto, shapes: dict) -> int:
    op = node.op_type
    if op == "Conv":
        w = _need(shapes, node.input[1])
        out = _need(shapes, node.output[0])
        # each output element: Cin/group * prod(kernel) MACs
        return _numel(out) * _numel(w[1:])
    if op == "ConvTranspose":
        w = _need(shapes, node.input[1])  # [Cin, Cout/group, *k]
        x = _need(shapes, node.input[0])
        # each input element is scattered into Cout/group * prod(kernel) outputs
        return _numel(x) * _numel(w[1:])
    if op == "Gemm":
        a = _need(shapes, node.input[0])
        out = _need(shapes, node.output[0])
        trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
        if len(a) != 2:
            raise _Unknown(f"Gemm input A of rank {len(a)}")
        k = a[0] if trans_a else a[1]
        return _numel(out) * k
    if op == "MatMul":
        a = _need(shapes, node.input[0])
        out = _need(shapes, node.output[0])
        k = a[-1]
        return _numel(out) * k
    return 0  # pragma: no cover


def count_macs(model: onnx.ModelProto, input_hw: tuple[int, int] | None = None, strict: bool = True) -> int:
    """Multiply-accumulates of Conv/ConvTranspose/Gemm/MatMul for ONE image."""
    return int(sum(macs_by_node(model, input_hw, strict).values()))


def model_cost(model: onnx.ModelProto, input_hw: tuple[int, int] | None = None, strict: bool = True) -> ModelCost:
    return ModelCost(params=count_params(model), macs=count_macs(model, input_hw, strict))
