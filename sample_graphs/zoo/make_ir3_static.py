"""Build ``ir3_static_batch.onnx``: a classic ONNX-zoo-style classifier from an old exporter.

    python sample_graphs/zoo/make_ir3_static.py [--out DIR]

Hand-built with ``onnx.helper`` at IR version 3 / opset 8, as the 2017-18 exporters
wrote them: every initializer is also a graph input, the batch is fixed at 1
(input ``data_0`` float32 ``[1, 3, 16, 16]``), BatchNormalization nodes kept, and
the classifier is ``Reshape(shape=[1, 256]) -> MatMul -> Add`` instead of a Gemm.
Output ``prob_logits`` ``[1, 10]``. No onnxmod metadata (a third-party model).
Weights: fixed-seed random, BatchNorm statistics random (no BN is an identity).
Deterministic: rerunning it writes the same bytes.

    Conv3x3(3->16)+BN+Relu -> MaxPool2 -> Conv3x3(16->32)+BN+Relu -> MaxPool2
    -> Conv1x1(32->16)+Relu -> Reshape [1, 256] -> MatMul [256, 10] -> Add [10]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
NAME = "ir3_static_batch.onnx"
CLASSES = 10


def build(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []

    def param(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def conv_bn_relu(i: int, x: str, cin: int, cout: int, k: int, bn: bool = True) -> list[onnx.NodeProto]:
        w = param(f"conv{i}_w", rng.normal(0, np.sqrt(2.0 / (cin * k * k)), (cout, cin, k, k)))
        b = param(f"conv{i}_b", rng.normal(0, 0.05, cout))
        nodes = [helper.make_node("Conv", [x, w, b], [f"conv{i}"], name=f"conv{i}", kernel_shape=[k, k],
                                  pads=[k // 2] * 4)]
        y = f"conv{i}"
        if bn:
            bn_in = [param(f"bn{i}_{p}", v) for p, v in (("scale", rng.uniform(0.5, 1.5, cout)),
                                                         ("bias", rng.normal(0, 0.1, cout)),
                                                         ("mean", rng.normal(0, 0.1, cout)),
                                                         ("var", rng.uniform(0.5, 1.5, cout)))]
            nodes.append(helper.make_node("BatchNormalization", [y, *bn_in], [f"bn{i}"], name=f"bn{i}",
                                          epsilon=1e-5))
            y = f"bn{i}"
        nodes.append(helper.make_node("Relu", [y], [f"relu{i}"], name=f"relu{i}"))
        return nodes

    nodes = conv_bn_relu(1, "data_0", 3, 16, 3)
    nodes.append(helper.make_node("MaxPool", ["relu1"], ["pool1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]))
    nodes += conv_bn_relu(2, "pool1", 16, 32, 3)
    nodes.append(helper.make_node("MaxPool", ["relu2"], ["pool2"], name="pool2", kernel_shape=[2, 2], strides=[2, 2]))
    nodes += conv_bn_relu(3, "pool2", 32, 16, 1, bn=False)
    shape = numpy_helper.from_array(np.array([1, 256], dtype=np.int64), "flatten_shape")
    inits.append(shape)
    nodes.append(helper.make_node("Reshape", ["relu3", "flatten_shape"], ["flat"], name="flatten"))
    w = param("fc_w", rng.normal(0, np.sqrt(1.0 / 256), (256, CLASSES)))
    b = param("fc_b", rng.normal(0, 0.1, CLASSES))
    nodes.append(helper.make_node("MatMul", ["flat", w], ["fc"], name="fc"))
    nodes.append(helper.make_node("Add", ["fc", b], ["prob_logits"], name="fc_bias"))
    inputs = [helper.make_tensor_value_info("data_0", TensorProto.FLOAT, [1, 3, 16, 16])]
    inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits]  # IR 3 style
    graph = helper.make_graph(nodes, "zoo_cnn", inputs,
                              [helper.make_tensor_value_info("prob_logits", TensorProto.FLOAT, [1, CLASSES])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)], producer_name="old-zoo-style")
    model.ir_version = 3
    onnx.checker.check_model(model, full_check=True)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    path = args.out / NAME
    onnx.save(build(), path)
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
