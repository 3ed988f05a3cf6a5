"""Params and MACs of hand-built graphs against hand-computed numbers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxmod.cost import count_macs, count_params, macs_by_node, model_cost
from onnxmod.errors import OnnxmodError


def _init(name, shape, dtype=np.float32):
    return numpy_helper.from_array(np.zeros(shape, dtype), name)


def _model(batch="N", hw=(8, 8)) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Conv", ["c1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], group=2),
        helper.make_node("GlobalAveragePool", ["c2"], ["gap"], name="gap"),
        helper.make_node("Reshape", ["gap", "shape"], ["flat"], name="flat"),
        helper.make_node("Gemm", ["flat", "gw", "gb"], ["g"], name="gemm", transB=1),
        helper.make_node("MatMul", ["g", "mw"], ["mm"], name="matmul"),
        helper.make_node("Constant", [], ["cst"], name="cst",
                         value=numpy_helper.from_array(np.ones(5, np.float32))),
        helper.make_node("Add", ["mm", "cst"], ["logits"], name="add"),
    ]
    inits = [
        _init("w1", (4, 3, 3, 3)), _init("b1", (4,)),
        _init("w2", (4, 2, 3, 3)),
        numpy_helper.from_array(np.array([-1, 4], np.int64), "shape"),
        _init("gw", (10, 4)), _init("gb", (10,)),
        _init("mw", (10, 5)),
        _init("unused", (100,)),
    ]
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, *hw])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 5])], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


# conv1: 4 out ch * 8*8 * (3*3*3) = 6912; conv2 (group 2): 4*64*(2*9) = 4608
# gemm: 1*10*4 = 40; matmul: 1*5*10 = 50
MACS = 6912 + 4608 + 40 + 50
# w1 108 + b1 4 + w2 72 + gw 40 + gb 10 + mw 50 + Constant 5; not: int64 shape, unused
PARAMS = 108 + 4 + 72 + 40 + 10 + 50 + 5


def test_params():
    assert count_params(_model()) == PARAMS


def test_macs_dynamic_and_fixed_batch():
    assert count_macs(_model()) == MACS
    assert count_macs(_model(batch=7)) == MACS
    per = macs_by_node(_model())
    assert per == {"conv1": 6912, "conv2": 4608, "gemm": 40, "matmul": 50}


def test_macs_input_hw_override():
    conv = (6912 + 4608) * 4
    assert count_macs(_model(), input_hw=(16, 16)) == conv + 90
    assert count_macs(_model(hw=(16, 16))) == conv + 90


def test_model_not_modified():
    m = _model()
    before = m.SerializeToString()
    count_macs(m, input_hw=(4, 4))
    assert m.SerializeToString() == before


def test_model_cost():
    c = model_cost(_model())
    assert (c.params, c.macs) == (PARAMS, MACS)
    assert c.to_dict() == {"params": PARAMS, "macs": MACS}


def test_conv_transpose_and_transposed_gemm():
    nodes = [
        helper.make_node("ConvTranspose", ["input", "w"], ["up"], name="up", strides=[2, 2], kernel_shape=[2, 2]),
        helper.make_node("Flatten", ["up"], ["f"], name="f"),  # [1, 3*8*8=192]
        helper.make_node("Transpose", ["f"], ["ft"], name="t"),  # [192, 1]
        helper.make_node("Gemm", ["ft", "gw"], ["out"], name="gemm", transA=1),  # A^T [1,192] x [192, 7]
    ]
    g = helper.make_graph(nodes, "ct", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 2, 4, 4])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 7])],
                          initializer=[_init("w", (2, 3, 2, 2)), _init("gw", (192, 7))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    # ConvTranspose: each of 2*4*4 inputs scatters into 3*2*2 outputs = 384; Gemm 192*7 = 1344
    assert macs_by_node(m) == {"up": 384, "gemm": 1344}
    assert count_params(m) == 24 + 192 * 7


def test_unknown_shape_strict_and_lenient():
    node = helper.make_node("MatMul", ["input", "w"], ["out"], name="mm")
    g = helper.make_graph([node], "u", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", "K"])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                          initializer=[_init("w", (3, 2))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(OnnxmodError, match="mm"):
        count_macs(m)
    assert count_macs(m, strict=False) == 0
