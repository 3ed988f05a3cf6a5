"""Run ONNX graphs in torch, with their initializers as trainable parameters.

Repair (:mod:`onnxmod.repair`) distils modules against their source; for that the
module graphs themselves must run in torch and be differentiable, and the trained
values must go back into the *same* graphs (node structure, names and metadata
unchanged). A small interpreter does exactly that: one torch function per ONNX op of
the set the channel analysis supports (plus the shape plumbing exporters write),
each tested against onnxruntime (``tests/test_torchgraph.py``).

Several graphs can share one :class:`ParameterStore` and one activation cache
(:class:`JointGraphs`): nodes whose computation is identical in every graph (same
op, attributes, weights and upstream: :func:`onnxmod.graphio.computation_digests`)
are computed once and hold one parameter, so layers that modules share stay
byte-identical after training.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from onnxmod import graphio
from onnxmod.errors import OnnxmodError

Tensor = torch.Tensor
OpFn = Callable[[list, dict[str, Any]], list]

# node inputs that training may change: weights and biases of the layers that make channels,
# the affine part of normalisations, a bias added to a MatMul's output
TRAINABLE_SLOTS = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Gemm": (1, 2),
    "MatMul": (0, 1),
    "BatchNormalization": (1, 2),
    "InstanceNormalization": (1, 2),
    "PRelu": (1,),
}
BIAS_AFTER = {"Conv", "ConvTranspose", "Gemm", "MatMul"}  # an Add of a constant right after these is a bias


# --------------------------------------------------------------------------- op helpers
def _ints(v: Any) -> list[int]:
    return [int(i) for i in (v.tolist() if isinstance(v, Tensor) else v)]


def _spatial_pads(pads: Sequence[int], n: int) -> list[int]:
    """ONNX pads [b1..bn, e1..en] -> F.pad order (last dim first: bn, en, ..., b1, e1)."""
    out: list[int] = []
    for i in reversed(range(n)):
        out += [int(pads[i]), int(pads[i + n])]
    return out


def _auto_pads(attrs: dict, x: Tensor, kernel: Sequence[int], strides: Sequence[int],
               dilations: Sequence[int]) -> list[int]:
    n = len(kernel)
    mode = attrs.get("auto_pad", b"NOTSET")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode in ("NOTSET", ""):
        return list(attrs.get("pads", [0] * 2 * n))
    if mode == "VALID":
        return [0] * 2 * n
    begin, end = [], []
    for i in range(n):
        size = x.shape[2 + i]
        out = math.ceil(size / strides[i])
        total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size)
        small, big = total // 2, total - total // 2
        begin.append(small if mode == "SAME_UPPER" else big)
        end.append(big if mode == "SAME_UPPER" else small)
    return begin + end


def _padded(x: Tensor, pads: Sequence[int], value: float = 0.0) -> tuple[Tensor, list[int]]:
    """Apply asymmetric pads explicitly; returns (x, symmetric pads left for the torch op)."""
    n = len(pads) // 2
    if all(pads[i] == pads[i + n] for i in range(n)):
        return x, list(pads[:n])
    return F.pad(x, _spatial_pads(pads, n), value=value), [0] * n


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONVT = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _conv(i: list, a: dict) -> list:
    x, w = i[0], i[1]
    b = i[2] if len(i) > 2 else None
    k = a.get("kernel_shape", list(w.shape[2:]))
    n = len(k)
    strides, dil = a.get("strides", [1] * n), a.get("dilations", [1] * n)
    x, pads = _padded(x, _auto_pads(a, x, k, strides, dil))
    return [_CONV[n](x, w, b, strides, pads, dil, a.get("group", 1))]


def _convtranspose(i: list, a: dict) -> list:
    x, w = i[0], i[1]
    b = i[2] if len(i) > 2 else None
    n = w.dim() - 2
    if "output_shape" in a or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise NotImplementedError("ConvTranspose with output_shape/auto_pad")
    pads = a.get("pads", [0] * 2 * n)
    if any(pads[j] != pads[j + n] for j in range(n)):
        raise NotImplementedError("ConvTranspose with asymmetric pads")
    return [_CONVT[n](x, w, b, a.get("strides", [1] * n), pads[:n], a.get("output_padding", [0] * n),
                      a.get("group", 1), a.get("dilations", [1] * n))]


def _gemm(i: list, a: dict) -> list:
    x, w = i[0], i[1]
    x = x.t() if a.get("transA", 0) else x
    w = w.t() if a.get("transB", 0) else w
    y = a.get("alpha", 1.0) * (x @ w)
    if len(i) > 2 and i[2] is not None:
        y = y + a.get("beta", 1.0) * i[2]
    return [y]


def _channel_shape(x: Tensor) -> list[int]:
    return [1, -1] + [1] * (x.dim() - 2)


def _batchnorm(i: list, a: dict) -> list:
    x, scale, bias, mean, var = i[:5]
    s = _channel_shape(x)
    inv = scale / torch.sqrt(var + a.get("epsilon", 1e-5))
    return [(x - mean.reshape(s)) * inv.reshape(s) + bias.reshape(s)]


def _pool(kind: str) -> OpFn:
    def run(i: list, a: dict) -> list:
        x = i[0]
        k = a["kernel_shape"]
        n = len(k)
        strides, dil = a.get("strides", [1] * n), a.get("dilations", [1] * n)
        pads = _auto_pads(a, x, k, strides, dil)
        ceil = bool(a.get("ceil_mode", 0))
        if kind == "max":
            x, sym = _padded(x, pads, value=-math.inf)
            fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[n]
            return [fn(x, k, strides, sym, dil, ceil_mode=ceil)]
        if any(d != 1 for d in dil):
            raise NotImplementedError("AveragePool with dilations")
        include = bool(a.get("count_include_pad", 0))
        if include:
            x, sym = _padded(x, pads)
        else:
            if any(pads[j] != pads[j + n] for j in range(n)) or any(pads[j] * 2 > k[j] for j in range(n)):
                raise NotImplementedError("AveragePool excluding asymmetric or large pads")
            sym = pads[:n]
        fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[n]
        return [fn(x, k, strides, sym, ceil_mode=ceil, count_include_pad=include)]
    return run


def _reduce(fn: Callable[[Tensor, list[int], bool], Tensor]) -> OpFn:
    def run(i: list, a: dict) -> list:
        x = i[0]
        axes = a.get("axes")
        if axes is None and len(i) > 1 and i[1] is not None:
            axes = _ints(i[1])
        keep = bool(a.get("keepdims", 1))
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                return [x]
            axes = list(range(x.dim()))
        return [fn(x, [int(ax) % x.dim() for ax in axes], keep)]
    return run


def _amax(x: Tensor, d: list[int], k: bool) -> Tensor:
    return torch.amax(x, dim=d, keepdim=k)


def _amin(x: Tensor, d: list[int], k: bool) -> Tensor:
    return torch.amin(x, dim=d, keepdim=k)


def _prod(x: Tensor, d: list[int], k: bool) -> Tensor:
    for ax in sorted(d, reverse=True):
        x = x.prod(dim=ax, keepdim=k)
    return x


def _flatten(i: list, a: dict) -> list:
    x = i[0]
    axis = a.get("axis", 1)
    axis = axis + x.dim() if axis < 0 else axis
    lead = int(np.prod(x.shape[:axis])) if axis else 1
    return [x.reshape(lead, -1)]


def _pad(i: list, a: dict) -> list:
    x = i[0]
    pads = _ints(i[1]) if len(i) > 1 and i[1] is not None else list(a["pads"])
    value = float(i[2].reshape(-1)[0]) if len(i) > 2 and i[2] is not None and i[2].numel() else a.get("value", 0.0)
    axes = _ints(i[3]) if len(i) > 3 and i[3] is not None else list(range(x.dim()))
    full = [0] * (2 * x.dim())
    for j, ax in enumerate(axes):
        ax = ax % x.dim()
        full[ax], full[ax + x.dim()] = pads[j], pads[j + len(axes)]
    mode = a.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    tp = _spatial_pads(full, x.dim())
    # F.pad takes negative pads as crops; trailing all-zero pairs can be dropped
    while len(tp) > 2 and tp[-1] == 0 and tp[-2] == 0:
        tp = tp[:-2]
    if mode == "constant":
        return [F.pad(x, tp, value=value)]
    return [F.pad(x, tp, mode={"reflect": "reflect", "edge": "replicate"}[mode])]


def _slice(i: list, a: dict) -> list:
    x = i[0]
    if len(i) > 1:
        starts, ends = _ints(i[1]), _ints(i[2])
        axes = _ints(i[3]) if len(i) > 3 and i[3] is not None else list(range(len(starts)))
        steps = _ints(i[4]) if len(i) > 4 and i[4] is not None else [1] * len(starts)
    else:
        starts, ends = list(a["starts"]), list(a["ends"])
        axes, steps = list(a.get("axes", range(len(starts)))), [1] * len(starts)
    for s, e, ax, st in zip(starts, ends, axes, steps):
        ax = ax % x.dim()
        idx = range(*slice(s, e, st).indices(x.shape[ax]))
        if len(idx) == x.shape[ax] and st == 1:
            continue
        x = torch.index_select(x, ax, torch.as_tensor(list(idx), dtype=torch.long, device=x.device))
    return [x]


def _reshape(i: list, a: dict) -> list:
    x, shape = i[0], _ints(i[1])
    if not a.get("allowzero", 0):
        shape = [x.shape[j] if s == 0 else s for j, s in enumerate(shape)]
    return [x.reshape(shape)]


def _axes(i: list, a: dict) -> list[int] | None:
    if "axes" in a:
        return list(a["axes"])
    return _ints(i[1]) if len(i) > 1 and i[1] is not None else None


def _squeeze(i: list, a: dict) -> list:
    x, axes = i[0], _axes(i, a)
    if axes is None:
        return [x.squeeze()]
    for ax in sorted((ax % x.dim() for ax in axes), reverse=True):
        x = x.squeeze(ax)
    return [x]


def _unsqueeze(i: list, a: dict) -> list:
    x, axes = i[0], _axes(i, a)
    rank = x.dim() + len(axes)
    for ax in sorted(ax % rank for ax in axes):
        x = x.unsqueeze(ax)
    return [x]


def _split(i: list, a: dict) -> list:
    x = i[0]
    axis = a.get("axis", 0) % x.dim()
    if len(i) > 1 and i[1] is not None:
        sizes = _ints(i[1])
    elif "split" in a:
        sizes = list(a["split"])
    else:
        n = a.get("num_outputs") or a["_num_outputs"]
        chunk = -(-x.shape[axis] // n)
        sizes = [min(chunk, x.shape[axis] - j * chunk) for j in range(n)]
    return list(torch.split(x, sizes, dim=axis))


def _clip(i: list, a: dict) -> list:
    lo = i[1] if len(i) > 1 and i[1] is not None else a.get("min")
    hi = i[2] if len(i) > 2 and i[2] is not None else a.get("max")
    return [torch.clamp(i[0], min=lo, max=hi)]


def _softmax(log: bool) -> OpFn:
    def run(i: list, a: dict) -> list:
        x = i[0]
        axis = a.get("axis", -1 if a["_opset"] >= 13 else 1)
        fn = F.log_softmax if log else F.softmax
        if a["_opset"] >= 13:
            return [fn(x, dim=axis)]
        axis %= x.dim()
        flat = x.reshape(int(np.prod(x.shape[:axis])), -1)
        return [fn(flat, dim=1).reshape(x.shape)]
    return run


def _prelu(i: list, a: dict) -> list:
    x, slope = i[0], i[1]
    if slope.dim() == 1 and x.dim() > 2 and slope.numel() == x.shape[1]:
        slope = slope.reshape(_channel_shape(x))  # opset < 7 style per-channel slope
    return [torch.where(x < 0, slope * x, x)]


def _variadic(fn: Callable[[Tensor, Tensor], Tensor]) -> OpFn:
    def run(i: list, a: dict) -> list:
        y = i[0]
        for t in i[1:]:
            y = fn(y, t)
        return [y]
    return run


def _mean(i: list, a: dict) -> list:
    return [_variadic(torch.add)(i, a)[0] / len(i)]


def _unary(fn: Callable[..., Tensor]) -> OpFn:
    return lambda i, a: [fn(i[0], a)]


_TORCH_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32, onnx.TensorProto.INT8: torch.int8, onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
}


def _gather(i: list, a: dict) -> list:
    x, idx = i[0], i[1].long().to(i[0].device)
    axis = a.get("axis", 0) % x.dim()
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = torch.index_select(x, axis, idx.reshape(-1))
    return [out.reshape(list(x.shape[:axis]) + list(idx.shape) + list(x.shape[axis + 1:]))]


def _shape(i: list, a: dict) -> list:
    dims = list(i[0].shape)[a.get("start", 0):a.get("end", None)]
    return [torch.tensor(dims, dtype=torch.int64, device=i[0].device)]


def _constant(i: list, a: dict) -> list:
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in a:
            v = a[key]
            arr = numpy_helper.to_array(v) if isinstance(v, onnx.TensorProto) else np.asarray(v)
            return [torch.from_numpy(np.array(arr))]
    raise NotImplementedError("Constant without a value")


def _shrink(x: Tensor, a: dict) -> Tensor:
    lam, bias = a.get("lambd", 0.5), a.get("bias", 0.0)
    return torch.where(x < -lam, x + bias, torch.where(x > lam, x - bias, torch.zeros_like(x)))


OPS: dict[str, OpFn] = {
    "Conv": _conv,
    "ConvTranspose": _convtranspose,
    "Gemm": _gemm,
    "MatMul": lambda i, a: [torch.matmul(i[0], i[1])],
    "BatchNormalization": _batchnorm,
    "InstanceNormalization": lambda i, a: [F.instance_norm(i[0], weight=i[1], bias=i[2], eps=a.get("epsilon", 1e-5))],
    "MaxPool": _pool("max"),
    "AveragePool": _pool("avg"),
    "GlobalAveragePool": lambda i, a: [i[0].mean(dim=tuple(range(2, i[0].dim())), keepdim=True)],
    "GlobalMaxPool": lambda i, a: [torch.amax(i[0], dim=tuple(range(2, i[0].dim())), keepdim=True)],
    "ReduceMean": _reduce(lambda x, d, k: x.mean(dim=d, keepdim=k)),
    "ReduceSum": _reduce(lambda x, d, k: x.sum(dim=d, keepdim=k)),
    "ReduceMax": _reduce(_amax),
    "ReduceMin": _reduce(_amin),
    "ReduceProd": _reduce(_prod),
    "ReduceL1": _reduce(lambda x, d, k: x.abs().sum(dim=d, keepdim=k)),
    "ReduceL2": _reduce(lambda x, d, k: torch.sqrt((x * x).sum(dim=d, keepdim=k))),
    "ReduceSumSquare": _reduce(lambda x, d, k: (x * x).sum(dim=d, keepdim=k)),
    "ReduceLogSumExp": _reduce(lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k)),
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": lambda i, a: [i[0].permute(*(a.get("perm") or list(reversed(range(i[0].dim())))))],
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Concat": lambda i, a: [torch.cat(i, dim=a["axis"])],
    "Split": _split,
    "Pad": _pad,
    "Slice": _slice,
    "Gather": _gather,
    "Shape": _shape,
    "Constant": _constant,
    "Identity": lambda i, a: [i[0]],
    "Dropout": lambda i, a: [i[0], torch.ones_like(i[0], dtype=torch.bool)],
    "Cast": lambda i, a: [i[0].to(_TORCH_DTYPES[a["to"]])],
    "Softmax": _softmax(False),
    "LogSoftmax": _softmax(True),
    "Add": _variadic(torch.add),
    "Sub": lambda i, a: [i[0] - i[1]],
    "Mul": lambda i, a: [i[0] * i[1]],
    "Div": lambda i, a: [i[0] / i[1]],
    "Pow": lambda i, a: [torch.pow(i[0], i[1])],
    "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum),
    "Sum": _variadic(torch.add),
    "Mean": _mean,
    "PRelu": _prelu,
    "Clip": _clip,
    "Relu": _unary(lambda x, a: F.relu(x)),
    "LeakyRelu": _unary(lambda x, a: F.leaky_relu(x, a.get("alpha", 0.01))),
    "Sigmoid": _unary(lambda x, a: torch.sigmoid(x)),
    "HardSigmoid": _unary(lambda x, a: torch.clamp(a.get("alpha", 0.2) * x + a.get("beta", 0.5), 0, 1)),
    "HardSwish": _unary(lambda x, a: F.hardswish(x)),
    "Tanh": _unary(lambda x, a: torch.tanh(x)),
    "Elu": _unary(lambda x, a: F.elu(x, a.get("alpha", 1.0))),
    "Selu": _unary(lambda x, a: a.get("gamma", 1.0507009873554805) * torch.where(
        x > 0, x, a.get("alpha", 1.6732632423543772) * (torch.exp(x) - 1))),
    "Celu": _unary(lambda x, a: F.celu(x, a.get("alpha", 1.0))),
    "Softplus": _unary(lambda x, a: F.softplus(x)),
    "Softsign": _unary(lambda x, a: F.softsign(x)),
    "Exp": _unary(lambda x, a: torch.exp(x)),
    "Log": _unary(lambda x, a: torch.log(x)),
    "Neg": _unary(lambda x, a: -x),
    "Abs": _unary(lambda x, a: torch.abs(x)),
    "Sqrt": _unary(lambda x, a: torch.sqrt(x)),
    "Reciprocal": _unary(lambda x, a: torch.reciprocal(x)),
    "Erf": _unary(lambda x, a: torch.erf(x)),
    "Gelu": _unary(lambda x, a: F.gelu(x, approximate=(a.get("approximate", b"none").decode()
                                                        if isinstance(a.get("approximate"), bytes)
                                                        else a.get("approximate", "none")))),
    "Mish": _unary(lambda x, a: F.mish(x)),
    "Floor": _unary(lambda x, a: torch.floor(x)),
    "Ceil": _unary(lambda x, a: torch.ceil(x)),
    "Round": _unary(lambda x, a: torch.round(x)),
    "Sin": _unary(lambda x, a: torch.sin(x)),
    "Cos": _unary(lambda x, a: torch.cos(x)),
    "Sign": _unary(lambda x, a: torch.sign(x)),
    "ThresholdedRelu": _unary(lambda x, a: torch.where(x > a.get("alpha", 1.0), x, torch.zeros_like(x))),
    "Shrink": _unary(_shrink),
}


# --------------------------------------------------------------------------- graphs
def _attrs(node: onnx.NodeProto, opset: int) -> dict[str, Any]:
    a = {att.name: onnx.helper.get_attribute_value(att) for att in node.attribute}
    a["_opset"] = opset
    a["_num_outputs"] = len(node.output)
    return a


def trainable_initializers(model: onnx.ModelProto) -> set[str]:
    """Float initializers that are weights/biases (see TRAINABLE_SLOTS, BIAS_AFTER); the rest
    (shapes, pads, preprocessing constants, BN running statistics) stay frozen."""
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    out: set[str] = set()
    for n in model.graph.node:
        slots = TRAINABLE_SLOTS.get(n.op_type, ())
        if n.op_type == "Add":
            slots = tuple(j for j, t in enumerate(n.input)
                          if t in inits and any(x in producer and producer[x].op_type in BIAS_AFTER for x in n.input))
        for j in slots:
            if j < len(n.input) and n.input[j] in inits and inits[n.input[j]].data_type == onnx.TensorProto.FLOAT:
                out.add(n.input[j])
    return out


class ConvNorm(torch.nn.Module):
    """A BatchNorm after one Conv, for training only (``norm_convs``).

    The graphs are BN-folded: a Conv's scale lives in its weights, which makes plain gradient steps badly
    conditioned. During training each such Conv gets a BatchNorm on batch statistics again. It starts as the
    identity in eval mode; :meth:`adopt_moments` with ``identity=True`` then sets its statistics from the
    Conv's own output and ``gamma = sqrt(var + eps)``, ``beta = mean``, so eval mode still computes what the
    Conv did; :meth:`fold` writes it back into the Conv's weight and bias, so the written graph has the
    same nodes as before.
    """

    eps = 1e-5

    def __init__(self, channels: int, weight_key: str, bias_key: str) -> None:
        super().__init__()
        self.gamma = torch.nn.Parameter(torch.ones(channels))
        self.beta = torch.nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.full((channels,), 1.0 - self.eps))  # eval mode: exactly y
        self.conv_keys = (weight_key, bias_key)  # the Conv's own parameters, in the store
        self.moments: Tensor | None = None  # while recording: [count, sum, sum of squares] per channel (float64)

    def forward(self, y: Tensor) -> Tensor:
        if self.moments is not None:
            with torch.no_grad():
                yd = y.detach().double().transpose(0, 1).reshape(y.shape[1], -1)
                self.moments += torch.stack([torch.full_like(yd[:, 0], yd.shape[1]), yd.sum(1), (yd * yd).sum(1)])
        if self.training:  # batch statistics; the running ones are set by adopt_moments, not by momentum
            return F.batch_norm(y, None, None, self.gamma, self.beta, True, 0.0, self.eps)
        return F.batch_norm(y, self.running_mean, self.running_var, self.gamma, self.beta, False, 0.0, self.eps)

    def record(self) -> None:
        """Accumulate the moments of the Conv's output over the following forward passes."""
        self.moments = torch.zeros(3, len(self.gamma), dtype=torch.float64, device=self.gamma.device)

    @torch.no_grad()
    def adopt_moments(self, identity: bool) -> None:
        """Running statistics from the recorded moments; with ``identity``, also the affine part that keeps
        eval mode computing the Conv's output."""
        count, total, squares = self.moments
        self.moments = None
        mean = total / count
        var = (squares / count - mean * mean).clamp_min(0)
        self.running_mean.copy_(mean)
        self.running_var.copy_(var)
        if identity:
            self.gamma.copy_(torch.sqrt(var + self.eps))
            self.beta.copy_(mean)

    @torch.no_grad()
    def fold(self, weight: Tensor, bias: Tensor) -> None:
        """Write ``gamma * (conv(x) - mean) / sqrt(var + eps) + beta`` (eval mode) into the Conv's weight and bias."""
        k = self.gamma / torch.sqrt(self.running_var + self.eps)
        weight.mul_(k.reshape([-1] + [1] * (weight.dim() - 1)))
        bias.copy_((bias - self.running_mean) * k + self.beta)


class ParameterStore(torch.nn.Module):
    """Trainable initializers of one or several graphs, one ``nn.Parameter`` per distinct key, and the
    training-only :class:`ConvNorm` of each distinct Conv (keyed by its computation digest)."""

    def __init__(self) -> None:
        super().__init__()
        self.params = torch.nn.ParameterDict()
        self.norms = torch.nn.ModuleDict()

    def get(self, key: str, value: np.ndarray) -> torch.nn.Parameter:
        if key not in self.params:
            self.params[key] = torch.nn.Parameter(torch.from_numpy(np.array(value, dtype=np.float32)))
        return self.params[key]

    def norm(self, key: str, weight_key: str, bias_key: str) -> ConvNorm:
        if key not in self.norms:
            self.norms[key] = ConvNorm(self.params[weight_key].shape[0], weight_key, bias_key)
        return self.norms[key]

    def fold_norms(self) -> None:
        """Every ConvNorm into its Conv's weight and bias (eval-mode outputs unchanged), then no more ConvNorms."""
        for norm in self.norms.values():
            norm.fold(*(self.params[k] for k in norm.conv_keys))
        self.norms = torch.nn.ModuleDict()


class TorchGraph(torch.nn.Module):
    """One ONNX graph as a torch module: ``forward(x)`` returns the graph outputs, in order.

    ``trainable`` initializers are ``nn.Parameter`` s of ``store`` (keyed so that graphs
    sharing a store share the parameters of identical computation); every other
    initializer is a frozen buffer. :meth:`to_onnx` writes the current parameter values
    back into a copy of the graph, nothing else changed. With ``norm_convs``, every Conv whose weight and
    bias are its own trainable parameters gets a :class:`ConvNorm` after it (until the store folds them).
    """

    def __init__(self, model: onnx.ModelProto, trainable: Iterable[str] = (), store: ParameterStore | None = None,
                 where: str = "model", norm_convs: bool = False) -> None:
        super().__init__()
        self.model = model
        self.store = store if store is not None else ParameterStore()
        self.opset = graphio.opset_version(model)
        g = model.graph
        inits = {i.name: i for i in g.initializer}
        self.input_names = [i.name for i in g.input if i.name not in inits]
        self.output_names = [o.name for o in g.output]
        self.nodes = [(n, _attrs(n, self.opset)) for n in g.node]
        for n, _ in self.nodes:
            if n.domain not in ("", "ai.onnx") or n.op_type not in OPS:
                raise OnnxmodError(f"{where}: op {n.op_type} (node '{n.name}') cannot run in torch "
                                   f"(repair needs it; use --no-repair)")
        self.digests = graphio.computation_digests(model)
        trainable = set(trainable) & set(inits)
        self.param_keys: dict[str, str] = {}
        consumers: dict[str, list[str]] = {}
        for n, _ in self.nodes:
            for j, t in enumerate(n.input):
                if t in trainable:
                    consumers.setdefault(t, []).append(f"{self.digests[n.output[0]]}/{j}")
        for name in sorted(trainable):
            # identical consumers (same computation upstream) -> one shared parameter
            key = hashlib.sha256(repr(sorted(consumers.get(name, [name]))).encode()).hexdigest()[:24]
            self.param_keys[name] = key
            self.store.get(key, numpy_helper.to_array(inits[name]))
        # a Conv with its own weight and bias: followed by the store's ConvNorm of its digest, until folded
        for n, _ in self.nodes if norm_convs else ():
            if (n.op_type == "Conv" and len(n.input) > 2
                    and all(t in self.param_keys and len(consumers[t]) == 1 for t in n.input[1:3])):
                self.store.norm(self.digests[n.output[0]], self.param_keys[n.input[1]], self.param_keys[n.input[2]])
        # every other initializer is a buffer, so `.to(device)` moves shape constants along with the weights
        self._buffer_of: dict[str, str] = {}
        for j, (name, t) in enumerate((n, t) for n, t in inits.items() if n not in trainable):
            self._buffer_of[name] = f"frozen_{j}"
            self.register_buffer(f"frozen_{j}", torch.from_numpy(np.array(numpy_helper.to_array(t))), persistent=False)

    def value(self, name: str) -> Tensor:
        if name in self.param_keys:
            return self.store.params[self.param_keys[name]]
        return getattr(self, self._buffer_of[name])

    def forward(self, x: Tensor, cache: dict[str, Tensor] | None = None) -> list[Tensor]:
        """Run the graph; ``cache`` (digest -> tensor) shares identical computation across graphs."""
        env: dict[str, Tensor | None] = {self.input_names[0]: x, "": None}
        for n, a in self.nodes:
            key = self.digests[n.output[0]]
            if cache is not None and key in cache:
                outs = cache[key]
            else:
                ins = [env[t] if t in env else self.value(t) for t in n.input]
                outs = OPS[n.op_type](ins, a)
                if key in self.store.norms:
                    outs = [self.store.norms[key](outs[0])]
                if n.op_type == "Constant":  # made from attributes, on the CPU: follow the input's device
                    outs = [o.to(x.device) for o in outs]
                if cache is not None:
                    cache[key] = outs
            for o, v in zip(n.output, outs):
                env[o] = v
        return [env[o] for o in self.output_names]

    def to_onnx(self) -> onnx.ModelProto:
        """A copy of the graph with the trained values written into its initializers."""
        m = onnx.ModelProto()
        m.CopyFrom(self.model)
        for init in m.graph.initializer:
            if init.name in self.param_keys:
                arr = self.store.params[self.param_keys[init.name]].detach().cpu().numpy().astype(np.float32)
                init.CopyFrom(numpy_helper.from_array(arr.reshape(tuple(init.dims)), init.name))
        return m


def run_numpy(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    """Run ``model`` in torch on one input array (tests, checks)."""
    with torch.no_grad():
        return [t.numpy() for t in TorchGraph(model)(torch.from_numpy(x))]
