"""Provider choice (pure logic) and quiet session creation."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxmod import runtime
from onnxmod.errors import OnnxmodError
from onnxmod.runtime import CPU, CUDA, choose_providers, make_session, run_batches

WITH_CUDA = ["TensorrtExecutionProvider", CUDA, CPU]
NO_CUDA = [CPU]


def _relu_model() -> onnx.ModelProto:
    node = helper.make_node("Relu", ["input"], ["y"], name="relu")
    g = helper.make_graph([node], "relu", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_cpu_always_cpu():
    assert choose_providers("cpu", WITH_CUDA, True) == [CPU]
    assert choose_providers("cpu", NO_CUDA, False) == [CPU]


def test_auto_without_cuda_is_cpu():
    assert choose_providers("auto", NO_CUDA, None) == [CPU]
    assert choose_providers("auto", WITH_CUDA, False) == [CPU]  # listed but does not load


def test_auto_with_cuda_loading():
    assert choose_providers("auto", WITH_CUDA, True) == [CUDA, CPU]


def test_cuda_requested():
    assert choose_providers("cuda", WITH_CUDA, True) == [CUDA, CPU]
    with pytest.raises(OnnxmodError, match="CUDA"):
        choose_providers("cuda", WITH_CUDA, False)
    with pytest.raises(OnnxmodError, match="CUDA"):
        choose_providers("cuda", NO_CUDA, None)


def test_unknown_device():
    with pytest.raises(OnnxmodError, match="unknown device"):
        choose_providers("tpu", NO_CUDA, False)


def test_probe_is_cached(monkeypatch):
    first = runtime.probe_cuda()
    calls = []
    monkeypatch.setattr(runtime.ort, "InferenceSession", lambda *a, **k: calls.append(1))
    assert runtime.probe_cuda() == first
    assert calls == []


def test_make_session_quiet_and_runs(capfd, tmp_path):
    capfd.readouterr()
    sess = make_session(_relu_model(), device="auto")
    expected = [CUDA, CPU] if runtime.probe_cuda() else [CPU]
    assert sess.get_providers() == expected
    x = np.array([[-1, 0, 2]], np.float32)
    (y,) = next(run_batches(sess, [x]))
    np.testing.assert_array_equal(y, [[0, 0, 2]])
    p = tmp_path / "m.onnx"
    onnx.save(_relu_model(), p)
    sess2 = make_session(p, device="cpu", threads=1)
    assert sess2.get_providers() == [CPU]
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_make_session_cuda_when_not_loading():
    if runtime.probe_cuda():
        pytest.skip("CUDA loads on this machine")
    with pytest.raises(OnnxmodError, match="--device cuda"):
        make_session(_relu_model(), device="cuda")


def test_make_session_bad_model(tmp_path):
    m = _relu_model()
    m.graph.node[0].op_type = "NoSuchOp"
    p = tmp_path / "bad.onnx"
    onnx.save(m, p)
    with pytest.raises(OnnxmodError) as ei:
        make_session(p, device="cpu")
    msg = str(ei.value)
    assert str(p) in msg and "\n" not in msg
    with pytest.raises(OnnxmodError, match="no such file"):
        make_session(tmp_path / "missing.onnx", device="cpu")


def test_run_shape_mismatch_is_onnxmod_error():
    sess = make_session(_relu_model(), device="cpu")
    with pytest.raises(OnnxmodError, match="shape"):
        next(run_batches(sess, [np.zeros((2, 5), np.float32)]))


def test_runs_on_cuda_keep_one_shape(monkeypatch):
    """On CUDA a batch smaller than the largest run so far (a loop's last batch) is padded to its size and its
    outputs cut back (a change of input shape costs a cuDNN set-up there); on the CPU batches run as they are.
    Here CPU sessions are marked CUDA; what ORT itself is fed is recorded."""
    batches = [np.arange(15, dtype=np.float32).reshape(5, 3) - 7, np.ones((5, 3), np.float32), -np.ones((2, 3), np.float32)]
    expected = [np.maximum(b, 0) for b in batches]
    for device, shapes in (("cpu", [(5, 3), (5, 3), (2, 3)]), ("cuda", [(5, 3)] * 3)):
        monkeypatch.setattr(runtime, "session_device", lambda s: device)
        sess = make_session(_relu_model(), device="cpu")
        seen = []
        plain_run = sess.run
        sess.run = lambda names, feed, options: seen.append(next(iter(feed.values())).shape) or plain_run(names, feed, options)
        outs = [y for (y,) in run_batches(sess, batches)]  # run_batches -> runtime.run, as every loop of onnxmod
        assert seen == shapes
        for y, e in zip(outs, expected):
            np.testing.assert_array_equal(y, e)
