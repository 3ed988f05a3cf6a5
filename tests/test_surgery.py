"""Channel analysis + removal: exactness oracles on generated and exported graphs."""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine_oracles import run, zero_channels
from graphgen import random_cnn
from onnxmod import channels, graphio, surgery
from onnxmod.cost import count_params


def _check(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)


def _remove_random_zero_channels(model: onnx.ModelProto, seed: int, x: np.ndarray):
    a = channels.analyze(model)
    zero = zero_channels(a, x)
    rng = np.random.default_rng(seed)
    keep = a.full_keep()
    for gid, z in zero.items():
        keep[gid] = ~(z & (rng.random(z.size) < 0.8))
    return a, keep, surgery.remove_channels(a, keep)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), depth=st.integers(1, 6), bn=st.booleans(),
       head=st.sampled_from(["gap_gemm", "flatten_gemm", "flatten_matmul"]))
def test_removing_zero_channels_keeps_outputs(seed, depth, bn, head):
    model = random_cnn(seed, depth=depth, bn_nodes=bn, head=head)
    x = np.random.default_rng(seed).random((4, 3, 8, 8), dtype=np.float32)
    ref = run(model, x)[0]
    a, keep, small = _remove_random_zero_channels(model, seed, x)
    _check(small)
    np.testing.assert_allclose(run(small, x)[0], ref, atol=1e-5, rtol=0)
    assert count_params(small) <= count_params(model)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), depth=st.integers(1, 5))
def test_keep_everything_is_bit_exact(seed, depth):
    model = random_cnn(seed, depth=depth, head="flatten_gemm")
    x = np.random.default_rng(seed).random((3, 3, 8, 8), dtype=np.float32)
    a = channels.analyze(model)
    same = surgery.remove_channels(a, a.full_keep())
    _check(same)
    assert np.array_equal(run(same, x)[0], run(model, x)[0])


def test_output_rows_and_exact_param_count():
    model = random_cnn(3, depth=0, head="gap_gemm", num_classes=5)
    a = channels.analyze(model)
    keep = a.full_keep()
    out = a.output_group()
    keep[out.id][:] = False
    keep[out.id][[1, 3]] = True
    # the stem conv's group feeds only the Gemm: drop two of its channels too
    (stem,) = [g for g in a.groups if g.removable and not g.is_output]
    keep[stem.id][:2] = False
    small = surgery.remove_channels(a, keep)
    _check(small)
    c = stem.size
    expected = count_params(model) - 2 * (3 * 9 + 1) - (5 * c + 5) + (2 * (c - 2) + 2)
    assert count_params(small) == expected
    x = np.random.default_rng(0).random((2, 3, 8, 8), dtype=np.float32)
    assert run(small, x)[0].shape == (2, 2)


def test_mean_fill_is_folded_into_bias():
    """A removed channel replaced by a constant: exact for a Gemm consumer (no borders)."""
    model = random_cnn(5, depth=0, head="gap_gemm")
    a = channels.analyze(model)
    (g,) = [g for g in a.groups if g.removable and not g.is_output]
    (gemm_node, t) = g.consumers[0]
    x = np.random.default_rng(1).random((1, 3, 8, 8), dtype=np.float32)
    feats = run(graphio.add_outputs(a.model, [t]), x, [t])[0][0]
    keep = a.full_keep()
    keep[g.id][0] = False
    small = surgery.remove_channels(a, keep, fill={t: feats})
    np.testing.assert_allclose(run(small, x)[0], run(model, x)[0], atol=1e-5)
    wrong = surgery.remove_channels(a, keep)  # fill 0 for a channel that is not 0
    assert not np.allclose(run(wrong, x)[0], run(model, x)[0], atol=1e-5) or feats[0] == 0


def test_unknown_op_is_a_barrier():
    model = random_cnn(7, depth=1, head="gap_gemm")
    # put an op the analysis does not know (Softsign is known; use LRN) after the stem conv
    g = model.graph
    first_relu = next(n for n in g.node if n.op_type == "Relu")
    old = first_relu.output[0]
    first_relu.output[0] = old + "_pre"
    g.node.insert(list(g.node).index(first_relu) + 1,
                  onnx.helper.make_node("LRN", [old + "_pre"], [old], name="my_lrn", size=3))
    a = channels.analyze(model)
    assert any(n == "my_lrn" and op == "LRN" for n, op, _ in a.unsupported)
    pinned = [g for g in a.groups if any("my_lrn" in p for p in g.pinned)]
    assert pinned and all(not g.removable for g in pinned)
    x = np.random.default_rng(0).random((2, 3, 8, 8), dtype=np.float32)
    _, keep, small = _remove_random_zero_channels(model, 0, x)
    np.testing.assert_allclose(run(small, x)[0], run(model, x)[0], atol=1e-5)
