"""Random small CNNs as ONNX graphs (onnx.helper), for property tests of the engine.

Each graph: input ``input`` [N, 3, 8, 8], output ``logits`` [N, K]. Biases are drawn so
that some channels die in ReLUs (exactly zero for every input), which is what the
exact-removal oracle needs.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper


class _Builder:
    def __init__(self, rng: np.random.Generator, bn_nodes: bool):
        self.rng = rng
        self.bn_nodes = bn_nodes
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.i = 0

    def name(self, base: str) -> str:
        self.i += 1
        return f"{base}{self.i}"

    def const(self, base: str, v: np.ndarray) -> str:
        n = self.name(base)
        self.inits.append(helper.make_tensor(n, TensorProto.FLOAT if v.dtype == np.float32 else TensorProto.INT64,
                                             v.shape, v.ravel().tolist()))
        return n

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name(f"{op}_"), **attrs))
        return out

    def conv_relu(self, x: str, cin: int, cout: int, k: int = 3, relu: bool = True) -> str:
        w = (self.rng.standard_normal((cout, cin, k, k)) / np.sqrt(cin * k * k)).astype(np.float32)
        b = self.rng.uniform(-0.5, 0.5, cout).astype(np.float32)
        dead = self.rng.random(cout) < 0.35
        b[dead] = -50.0  # these channels are exactly zero after the ReLU
        if self.bn_nodes:
            y = self.node("Conv", [x, self.const("W", w)], pads=[k // 2] * 4)
            scale = self.rng.uniform(0.5, 1.5, cout).astype(np.float32)
            mean = self.rng.uniform(-0.2, 0.2, cout).astype(np.float32)
            var = self.rng.uniform(0.5, 2, cout).astype(np.float32)
            beta = b  # dead channels: BN output -50 before the ReLU
            y = self.node("BatchNormalization", [y, self.const("s", scale), self.const("b", beta.astype(np.float32)),
                                                 self.const("m", mean), self.const("v", var)])
        else:
            y = self.node("Conv", [x, self.const("W", w), self.const("B", b)], pads=[k // 2] * 4)
        return self.node("Relu", [y]) if relu else y


def random_cnn(seed: int, depth: int = 4, bn_nodes: bool = False, head: str = "gap_gemm",
               num_classes: int = 5) -> onnx.ModelProto:
    """A random CNN mixing conv, residual Add, channel Concat, option-A Slice+Pad and MaxPool."""
    rng = np.random.default_rng(seed)
    b = _Builder(rng, bn_nodes)
    x, c, hw = "input", 3, 8
    x = b.conv_relu(x, c, c := int(rng.integers(4, 9)))
    for _ in range(depth):
        kind = rng.choice(["conv", "residual", "concat", "pad_shortcut", "maxpool"])
        if kind == "conv":
            x = b.conv_relu(x, c, c2 := int(rng.integers(3, 10)))
            c = c2
        elif kind == "residual":
            mid = b.conv_relu(x, c, m := int(rng.integers(2, 9)))
            y = b.conv_relu(mid, m, c, relu=False)
            x = b.node("Relu", [b.node("Add", [y, x])])
        elif kind == "concat":
            a1 = b.conv_relu(x, c, c1 := int(rng.integers(2, 6)), k=1)
            a2 = b.conv_relu(x, c, c2 := int(rng.integers(2, 6)))
            x, c = b.node("Concat", [a1, a2], axis=1), c1 + c2
        elif kind == "pad_shortcut" and hw >= 4:
            p = int(rng.integers(1, 3))
            sl = b.node("Slice", [x, b.const("st", np.array([0, 0], np.int64)), b.const("en", np.array([hw, hw], np.int64)),
                                  b.const("ax", np.array([2, 3], np.int64)), b.const("sp", np.array([2, 2], np.int64))])
            sc = b.node("Pad", [sl, b.const("pads", np.array([0, p, 0, 0, 0, p, 0, 0], np.int64))])
            mid = b.conv_relu(x, c, c + 2 * p)
            w = (rng.standard_normal((c + 2 * p, c + 2 * p, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)
            y = b.node("Conv", [mid, b.const("W", w), b.const("B", rng.uniform(-1, 0.2, c + 2 * p).astype(np.float32))],
                       pads=[1, 1, 1, 1], strides=[2, 2])
            x, c, hw = b.node("Relu", [b.node("Add", [y, sc])]), c + 2 * p, hw // 2
        elif kind == "maxpool" and hw >= 4:
            x, hw = b.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2]), hw // 2
    if head == "gap_gemm":
        f = b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1)
        nf = c
    else:
        f = b.node("Flatten", [x], axis=1)
        nf = c * hw * hw
    w = (rng.standard_normal((num_classes, nf)) / np.sqrt(nf)).astype(np.float32)
    bias = rng.uniform(-0.1, 0.1, num_classes).astype(np.float32)
    if head == "flatten_matmul":
        y = b.node("MatMul", [f, b.const("Wt", np.ascontiguousarray(w.T))])
        b.nodes.append(helper.make_node("Add", [y, b.const("bias", bias)], ["logits"], name="head_add"))
    else:
        b.nodes.append(helper.make_node("Gemm", [f, b.const("fc", w), b.const("bias", bias)], ["logits"],
                                        name="head_gemm", transB=1))
    graph = helper.make_graph(
        b.nodes, "random_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", num_classes])],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model
