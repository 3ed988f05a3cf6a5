"""The op families added for third-party architectures, on tiny ONNX-text graphs: grouped Conv,
channel shuffle (Reshape/Transpose/Reshape) and Split. Oracles: the front-end rewrite equals the
original in onnxruntime; removing channels that are exactly zero leaves the outputs unchanged;
every cut graph passes the full checker."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import numpy_helper

from engine_oracles import run, zero_channels
from onnxmod import frontend, graphio, ops, surgery
from onnxmod.channels import analyze

RNG = np.random.default_rng(5)


def _model(text: str, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    m = onnx.parser.parse_model(text)
    m.graph.initializer.extend(numpy_helper.from_array(np.asarray(v), k) for k, v in weights.items())
    onnx.checker.check_model(m, full_check=True)
    return m


def _conv(cout: int, cin: int, k: int, dead: list[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    b = RNG.normal(0, 0.1, cout).astype(np.float32)
    b[list(dead)] = -50.0  # dead after the ReLU: exactly zero
    return RNG.normal(0, 0.4, (cout, cin, k, k)).astype(np.float32), b


def _cut_zero_channels(m: onnx.ModelProto, x: np.ndarray) -> tuple[onnx.ModelProto, int]:
    canon, _ = frontend.canonical_input(m, "test")
    a = analyze(graphio.canonicalize(canon))
    zero = zero_channels(a, x)
    keep = a.full_keep()
    for gid, z in zero.items():
        keep[gid] = ~z
    small = surgery.remove_channels(a, keep)
    onnx.checker.check_model(small, full_check=True)
    return small, int(sum(z.sum() for z in zero.values()))


GROUPED = """<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 3, 8, 8] input) => (float[N, 4] logits) {
    c1 = Conv <pads = [1, 1, 1, 1]> (input, W1, B1)
    r1 = Relu (c1)
    c2 = Conv <pads = [1, 1, 1, 1], group = 4> (r1, W2, B2)
    r2 = Relu (c2)
    p = GlobalAveragePool (r2)
    f = Flatten (p)
    logits = Gemm <transB = 1> (f, FC, FCB)
}"""


def test_grouped_conv_keeps_equal_counts_per_group_and_cuts_exactly():
    w1, b1 = _conv(16, 3, 3, dead=[0, 5, 6, 13])  # dead inputs in groups 0, 1, 1, 3
    w2, b2 = _conv(8, 4, 3, dead=[1, 2, 5, 6])  # one dead output in each group of 2
    m = _model(GROUPED, {"W1": w1, "B1": b1, "W2": w2, "B2": b2,
                         "FC": RNG.normal(0, 0.5, (4, 8)).astype(np.float32),
                         "FCB": RNG.normal(0, 0.1, 4).astype(np.float32)})
    a = analyze(m)
    conv = next(n for n in a.graph.nodes if n.attrs.get("group") == 4)
    assert a.node_rule[conv.name] == "grouped_conv" and not a.unsupported
    keep = a.full_keep()
    gin = a.group_of("r1").id
    keep[gin][:] = False
    keep[gin][[0, 1, 5]] = True  # 2 in group 0, 1 in group 1: every group must keep 2
    closed = a.close(keep)
    assert closed[gin].reshape(4, 4).sum(axis=1).tolist() == [2, 2, 2, 2]
    x = RNG.random((5, 3, 8, 8), dtype=np.float32)
    small, removed = _cut_zero_channels(m, x)
    assert removed > 0
    np.testing.assert_allclose(run(small, x)[0], run(m, x)[0], atol=1e-5)
    grouped = next(n for n in small.graph.node if any(a.name == "group" and a.i == 4 for a in n.attribute))
    w = next(t for t in small.graph.initializer if t.name == grouped.input[1])
    assert w.dims[0] % 4 == 0 and w.dims[0] < 8  # dead outputs cut, still a valid group-4 Conv


SHUFFLE = """<ir_version: 8, opset_import: ["" : 13]>
g (float[N, 3, 8, 8] input) => (float[N, 4] logits) {
    c1 = Conv <pads = [1, 1, 1, 1]> (input, W1, B1)
    r1 = Relu (c1)
    a, b = Split <axis = 1> (r1, SPLIT)
    c2 = Conv <pads = [1, 1, 1, 1]> (b, W2, B2)
    r2 = Relu (c2)
    cat = Concat <axis = 1> (a, r2)
    v = Reshape (cat, S5)
    t = Transpose <perm = [0, 2, 1, 3, 4]> (v)
    s = Reshape (t, S4)
    c3 = Conv (s, W3, B3)
    r3 = Relu (c3)
    p = GlobalAveragePool (r3)
    f = Flatten (p)
    logits = Gemm <transB = 1> (f, FC, FCB)
}"""


@pytest.fixture
def shuffle_model() -> onnx.ModelProto:
    w1, b1 = _conv(8, 3, 3, dead=[1, 6])
    w2, b2 = _conv(4, 4, 3, dead=[2])
    w3, b3 = _conv(6, 8, 1)
    return _model(SHUFFLE, {"W1": w1, "B1": b1, "W2": w2, "B2": b2, "W3": w3, "B3": b3,
                            "SPLIT": np.array([4, 4], dtype=np.int64),
                            "S5": np.array([0, 2, 4, 8, 8], dtype=np.int64),
                            "S4": np.array([0, 8, 8, 8], dtype=np.int64),
                            "FC": RNG.normal(0, 0.5, (4, 6)).astype(np.float32),
                            "FCB": RNG.normal(0, 0.1, 4).astype(np.float32)})


def test_split_and_channel_shuffle_become_index_maps(shuffle_model):
    canon, steps = frontend.canonical_input(shuffle_model, "shuffle")
    onnx.checker.check_model(canon, full_check=True)
    assert [s["step"] for s in steps] == ["split_to_slices", "channel_shuffle"]
    assert {"Split", "Transpose", "Reshape"}.isdisjoint(n.op_type for n in canon.graph.node)
    x = RNG.random((3, 3, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(run(canon, x)[0], run(shuffle_model, x)[0], atol=1e-6)
    a = analyze(canon)
    assert not a.unsupported
    assert {a.node_rule[n.name] for n in a.graph.nodes if n.op in ("Slice", "Gather")} == \
        {"slice_channels", "gather_channels"}
    assert a.summary()["pinned"] == 0


def test_split_and_channel_shuffle_cut_exactly(shuffle_model):
    x = RNG.random((4, 3, 8, 8), dtype=np.float32)
    small, removed = _cut_zero_channels(shuffle_model, x)
    assert removed > 0
    np.testing.assert_allclose(run(small, x)[0], run(shuffle_model, x)[0], atol=1e-5)


def test_registry_lists_the_new_families():
    table = {r["op"]: r for r in ops.table()}
    assert table["Gather"]["family"] == "gather"
    assert "grouped" in table["Conv"]["channels"]
