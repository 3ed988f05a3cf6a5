"""onnxmod.torchgraph: torch execution of every supported op equals onnxruntime's (atol 1e-5),
whole graphs too; trained values go back into the same graph; shared computation is shared."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnxmod import torchgraph
from onnxmod.errors import OnnxmodError

SAMPLES = Path(__file__).resolve().parent.parent / "sample_graphs"
RNG = np.random.default_rng(0)


def rand(*shape: int, positive: bool = False) -> np.ndarray:
    x = RNG.standard_normal(shape).astype(np.float32)
    return np.abs(x) + 0.1 if positive else x


def i64(*v: int) -> np.ndarray:
    return np.array(v, dtype=np.int64)


def single_node(op: str, x: np.ndarray, consts: list[np.ndarray | None] = (), opset: int = 18,
                n_out: int = 1, **attrs) -> onnx.ModelProto:
    """One ``op`` node: graph input ``x``, then ``consts`` as initializers ('' where None)."""
    names, inits = ["x"], []
    for j, c in enumerate(consts):
        if c is None:
            names.append("")
        else:
            names.append(f"c{j}")
            inits.append(numpy_helper.from_array(c, f"c{j}"))
    outs = [f"y{j}" for j in range(n_out)]
    node = helper.make_node(op, names, outs, **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def images_for(model: onnx.ModelProto, n: int) -> np.ndarray:
    """``n`` random images at the (static) input size of ``model``."""
    chw = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    return RNG.random((n, *chw), dtype=np.float32)


def assert_same_as_ort(model: onnx.ModelProto, x: np.ndarray, atol: float = 1e-5) -> None:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = sess.run(None, {sess.get_inputs()[0].name: x})
    got = torchgraph.run_numpy(model, x)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g.astype(np.float64), w.astype(np.float64), atol=atol, rtol=1e-5)


X4 = rand(2, 4, 7, 6)
POS4 = rand(2, 4, 7, 6, positive=True)
CASES = {
    "conv": ("Conv", X4, [rand(6, 4, 3, 3), rand(6)], {"pads": [1, 1, 1, 1]}),
    "conv_stride_dil_asym": ("Conv", X4, [rand(5, 4, 3, 2)], {"strides": [2, 1], "dilations": [1, 2],
                                                              "pads": [0, 1, 2, 0]}),
    "conv_grouped": ("Conv", X4, [rand(4, 2, 3, 3), rand(4)], {"group": 2}),
    "conv_depthwise_same_upper": ("Conv", X4, [rand(4, 1, 3, 3)], {"group": 4, "auto_pad": "SAME_UPPER",
                                                                    "strides": [2, 2]}),
    "conv_valid": ("Conv", X4, [rand(3, 4, 2, 2)], {"auto_pad": "VALID"}),
    "conv1d": ("Conv", rand(2, 3, 9), [rand(4, 3, 3), rand(4)], {"pads": [1, 1]}),
    "convtranspose": ("ConvTranspose", X4, [rand(4, 3, 3, 3), rand(3)], {"strides": [2, 2], "pads": [1, 1, 1, 1],
                                                                          "output_padding": [1, 1]}),
    "gemm": ("Gemm", rand(3, 5), [rand(4, 5), rand(4)], {"transB": 1, "alpha": 0.5, "beta": 2.0}),
    "gemm_transA": ("Gemm", rand(5, 3), [rand(5, 4), rand(1, 4)], {"transA": 1}),
    "matmul": ("MatMul", rand(3, 5), [rand(5, 4)], {}),
    "batchnorm": ("BatchNormalization", X4, [rand(4), rand(4), rand(4), rand(4, positive=True)], {"epsilon": 1e-3}),
    "instancenorm": ("InstanceNormalization", X4, [rand(4), rand(4)], {}),
    "maxpool": ("MaxPool", X4, [], {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    "maxpool_ceil_asym": ("MaxPool", X4, [], {"kernel_shape": [2, 3], "strides": [2, 2], "pads": [0, 0, 1, 1],
                                              "ceil_mode": 1}),
    "avgpool": ("AveragePool", X4, [], {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    "avgpool_include_pad": ("AveragePool", X4, [], {"kernel_shape": [2, 2], "pads": [0, 0, 1, 1],
                                                    "count_include_pad": 1}),
    "globalavgpool": ("GlobalAveragePool", X4, [], {}),
    "globalmaxpool": ("GlobalMaxPool", X4, [], {}),
    "reducemean": ("ReduceMean", X4, [i64(2, 3)], {"keepdims": 1}),
    "reducesum_nokeep": ("ReduceSum", X4, [i64(1)], {"keepdims": 0}),
    "reducemax": ("ReduceMax", X4, [i64(-1)], {}),
    "reducemin": ("ReduceMin", X4, [i64(2)], {}),
    "reducel2": ("ReduceL2", X4, [i64(2, 3)], {}),
    "reducel1": ("ReduceL1", X4, [i64(1)], {}),
    "reducesumsquare": ("ReduceSumSquare", X4, [i64(3)], {}),
    "reducelogsumexp": ("ReduceLogSumExp", X4, [i64(1)], {}),
    "reduceprod": ("ReduceProd", rand(2, 3, 4), [i64(1, 2)], {}),
    "flatten": ("Flatten", X4, [], {"axis": 1}),
    "flatten_axis2": ("Flatten", X4, [], {"axis": 2}),
    "reshape": ("Reshape", X4, [i64(0, -1)], {}),
    "transpose": ("Transpose", X4, [], {"perm": [0, 2, 3, 1]}),
    "squeeze": ("Squeeze", rand(2, 4, 1, 1), [i64(2, 3)], {}),
    "unsqueeze": ("Unsqueeze", rand(2, 4), [i64(2, -1)], {}),
    "concat_const": ("Concat", X4, [rand(2, 3, 7, 6)], {"axis": 1}),
    "pad_channels": ("Pad", X4, [i64(0, 2, 0, 0, 0, 3, 0, 0)], {}),
    "pad_value_axes": ("Pad", X4, [i64(1, 2, 0, 1), np.array(0.5, np.float32), i64(2, 3)], {}),
    "pad_reflect": ("Pad", X4, [i64(0, 0, 1, 2, 0, 0, 2, 1)], {"mode": "reflect"}),
    "pad_edge": ("Pad", X4, [i64(0, 0, 1, 2, 0, 0, 2, 1)], {"mode": "edge"}),
    "slice_stride2": ("Slice", X4, [i64(0, 0), i64(100, 100), i64(2, 3), i64(2, 2)], {}),
    "slice_negative": ("Slice", X4, [i64(-1), i64(-100), i64(1), i64(-2)], {}),
    "slice_channels": ("Slice", X4, [i64(1), i64(3), i64(1)], {}),
    "clip": ("Clip", X4, [np.array(-0.5, np.float32), np.array(0.7, np.float32)], {}),
    "clip_max_only": ("Clip", X4, [None, np.array(0.2, np.float32)], {}),
    "softmax": ("Softmax", rand(3, 5), [], {"axis": -1}),
    "logsoftmax": ("LogSoftmax", rand(3, 5), [], {"axis": 1}),
    "add_bias": ("Add", X4, [rand(1, 4, 1, 1)], {}),
    "sub": ("Sub", X4, [rand(4, 1, 1)], {}),
    "mul": ("Mul", X4, [rand(1)], {}),
    "div": ("Div", X4, [rand(4, 1, 1, positive=True)], {}),
    "pow": ("Pow", POS4, [np.array(1.5, np.float32)], {}),
    "max": ("Max", X4, [rand(4, 1, 1)], {}),
    "min": ("Min", X4, [rand(4, 1, 1)], {}),
    "sum3": ("Sum", X4, [rand(4, 1, 1), rand(6)], {}),
    "mean3": ("Mean", X4, [rand(4, 1, 1), rand(6)], {}),
    "prelu": ("PRelu", X4, [rand(4, 1, 1)], {}),
    "gather": ("Gather", X4, [i64(3, 0)], {"axis": 1}),
    "identity": ("Identity", X4, [], {}),
    "relu": ("Relu", X4, [], {}),
    "leakyrelu": ("LeakyRelu", X4, [], {"alpha": 0.2}),
    "sigmoid": ("Sigmoid", X4, [], {}),
    "hardsigmoid": ("HardSigmoid", X4, [], {"alpha": 0.3, "beta": 0.4}),
    "hardswish": ("HardSwish", X4, [], {}),
    "tanh": ("Tanh", X4, [], {}),
    "elu": ("Elu", X4, [], {"alpha": 0.7}),
    "selu": ("Selu", X4, [], {}),
    "celu": ("Celu", X4, [], {"alpha": 0.8}),
    "softplus": ("Softplus", X4, [], {}),
    "softsign": ("Softsign", X4, [], {}),
    "exp": ("Exp", X4, [], {}),
    "log": ("Log", POS4, [], {}),
    "neg": ("Neg", X4, [], {}),
    "abs": ("Abs", X4, [], {}),
    "sqrt": ("Sqrt", POS4, [], {}),
    "reciprocal": ("Reciprocal", POS4, [], {}),
    "erf": ("Erf", X4, [], {}),
    "gelu_tanh": ("Gelu", X4, [], {"approximate": "tanh"}, 20),
    "mish": ("Mish", X4, [], {}),
    "floor": ("Floor", X4 * 3, [], {}),
    "ceil": ("Ceil", X4 * 3, [], {}),
    "round": ("Round", X4 * 3, [], {}),
    "sin": ("Sin", X4, [], {}),
    "cos": ("Cos", X4, [], {}),
    "sign": ("Sign", X4, [], {}),
    "thresholdedrelu": ("ThresholdedRelu", X4, [], {"alpha": 0.3}),
    "shrink": ("Shrink", X4, [], {"lambd": 0.4, "bias": 0.1}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_op_matches_onnxruntime(case: str) -> None:
    op, x, consts, attrs, *opset = CASES[case]
    assert_same_as_ort(single_node(op, x, consts, opset=opset[0] if opset else 18, **attrs), x)


def test_split_multiple_outputs() -> None:
    assert_same_as_ort(single_node("Split", X4, [i64(1, 3)], n_out=2, axis=1), X4)
    assert_same_as_ort(single_node("Split", rand(2, 6, 3), [], n_out=3, axis=1, num_outputs=3), rand(2, 6, 3))


def test_opset11_attribute_forms() -> None:
    """Older opsets keep axes/pads/splits as attributes."""
    assert_same_as_ort(single_node("ReduceMean", X4, [], opset=11, axes=[2, 3]), X4)
    assert_same_as_ort(single_node("Squeeze", rand(2, 4, 1, 1), [], opset=11, axes=[3]), rand(2, 4, 1, 1))
    assert_same_as_ort(single_node("Softmax", rand(2, 3, 4), [], opset=11, axis=1), rand(2, 3, 4))
    assert_same_as_ort(single_node("Clip", X4, [], opset=6, min=-0.1, max=0.3), X4)


def test_shape_subgraph_reshape() -> None:
    """Shape -> Gather -> Unsqueeze -> Concat -> Reshape: the flatten exporters write."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.array(0, np.int64), "zero"), numpy_helper.from_array(i64(0), "ax0"),
             numpy_helper.from_array(i64(-1), "minus1")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, 7, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    assert_same_as_ort(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=8), X4)


@pytest.mark.parametrize("name", ["resnet8_cifar10", "tiny_bn_kept", "tiny_concat", "tiny_matmul_add",
                                  "tiny_maxpool", "tiny_residual", "tiny_shortcut_a", "tiny_flatten_gemm"])
def test_sample_graphs_match_onnxruntime(name: str) -> None:
    model = onnx.load(SAMPLES / f"{name}.onnx")
    assert_same_as_ort(model, images_for(model, 3), atol=2e-5)


def test_unsupported_op_named_with_its_node() -> None:
    model = single_node("NonMaxSuppression", X4, [], opset=18)
    with pytest.raises(OnnxmodError, match="NonMaxSuppression.*node"):
        torchgraph.TorchGraph(model)


def test_trainable_initializers_are_weights_and_biases() -> None:
    model = onnx.load(SAMPLES / "tiny_matmul_add.onnx")
    train = torchgraph.trainable_initializers(model)
    kinds = {n.op_type for n in model.graph.node for i in n.input if i in train}
    assert kinds == {"Conv", "MatMul", "Add"}
    frozen = {i.name for i in model.graph.initializer} - train
    # preprocessing constants (the Sub/Div of the baked prologue) stay frozen
    assert {n.op_type for n in model.graph.node for i in n.input if i in frozen} >= {"Sub", "Div"}


def test_write_back_changes_only_trained_values() -> None:
    model = onnx.load(SAMPLES / "tiny_residual.onnx")
    train = torchgraph.trainable_initializers(model)
    tg = torchgraph.TorchGraph(model, train)
    with torch.no_grad():
        for p in tg.store.parameters():
            p.mul_(1.5)
    out = tg.to_onnx()
    assert [n.SerializeToString() for n in out.graph.node] == [n.SerializeToString() for n in model.graph.node]
    before = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for init in out.graph.initializer:
        after = numpy_helper.to_array(init)
        expected = before[init.name] * (1.5 if init.name in train else 1.0)
        np.testing.assert_allclose(after, expected.astype(np.float32), rtol=1e-6)
    onnx.checker.check_model(out, full_check=True)
    x = images_for(model, 2)
    with torch.no_grad():
        np.testing.assert_allclose(torchgraph.run_numpy(out, x)[0], tg(torch.from_numpy(x))[0].numpy(), atol=1e-5)


def test_identical_computation_shares_parameters_and_cache() -> None:
    model = onnx.load(SAMPLES / "tiny_residual.onnx")
    train = torchgraph.trainable_initializers(model)
    store = torchgraph.ParameterStore()
    a = torchgraph.TorchGraph(model, train, store)
    b = torchgraph.TorchGraph(model, train, store)
    assert len(list(store.parameters())) == len(train)  # the second graph added none
    cache: dict = {}
    x = torch.from_numpy(images_for(model, 2))
    ya = a(x, cache)[0]
    n_cached = len(cache)
    yb = b(x, cache)[0]
    assert len(cache) == n_cached and yb is ya  # nothing recomputed
