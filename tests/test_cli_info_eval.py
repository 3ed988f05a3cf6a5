"""`onnxmod info` and `onnxmod eval` on a tiny hand-built source model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxmod.cli.main import main
from onnxmod.data import open_dataset, write_npz
from onnxmod.errors import OnnxmodError
from onnxmod.evaluate import evaluate, evaluate_source

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CLASSES = ["ant", "bee", "cat", "dog", "eel", "fox"]
K = len(CLASSES)


def _weights(k=K, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
        "b": rng.normal(size=4).astype(np.float32),
        "fw": rng.normal(size=(k, 4)).astype(np.float32) * 3,
        "fb": rng.normal(size=k).astype(np.float32),
    }


def build_model(path: Path, classes=CLASSES, meta=True, kind="source", side=8, batch="N") -> Path:
    k = len(classes)
    wt = _weights(k)
    nodes = [
        helper.make_node("Conv", ["input", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fw", "fb"], ["logits"], name="fc", transB=1),
    ]
    g = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, side, side])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, k])],
        initializer=[numpy_helper.from_array(v, k) for k, v in wt.items()],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    if meta:
        helper.set_model_props(m, {"onnxmod.kind": kind, "onnxmod.classes": json.dumps(list(classes))})
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, path)
    return path


def reference_logits(x: np.ndarray) -> np.ndarray:
    """NumPy forward pass of build_model on float NCHW x."""
    wt = _weights()
    n, _, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    conv = np.zeros((n, 4, h, w), np.float64)
    for i in range(3):
        for j in range(3):
            conv += np.einsum("nchw,oc->nohw", xp[:, :, i:i + h, j:j + w], wt["w"][:, :, i, j])
    conv += wt["b"][None, :, None, None]
    feat = np.maximum(conv, 0).mean(axis=(2, 3))
    return feat @ wt["fw"].T + wt["fb"]


def make_data(path: Path, n=40, side=8, classes=CLASSES, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    y = rng.integers(0, len(classes), n)
    write_npz(path, x, y, classes)
    return x, y


def _cli(capsys, *args):
    with pytest.raises(SystemExit) as ei:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return ei.value.code, out, err


def _ref_metrics(x, y, target_index):
    logits = reference_logits(x.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    t = np.asarray([target_index[v] for v in y])
    top1 = float(np.mean(logits.argmax(1) == t))
    top5 = float(np.mean([ti in np.argsort(-row)[:5] for row, ti in zip(logits, t)]))
    return logits, t, top1, top5


# ----------------------------------------------------------------- info


def test_info_json(tmp_path, capsys):
    model = build_model(tmp_path / "m.onnx")
    code, out, err = _cli(capsys, "info", model, "--json")
    assert code == 0, err
    info = json.loads(out)
    for key in ("kind", "inputs", "outputs", "classes", "params", "macs", "opset", "file_size"):
        assert key in info
    assert info["kind"] == "source"
    assert info["inputs"] == [{"name": "input", "shape": ["N", 3, 8, 8], "dtype": "float32"}]
    assert info["outputs"] == [{"name": "logits", "shape": ["N", K], "dtype": "float32"}]
    assert info["classes"] == CLASSES
    assert info["params"] == 108 + 4 + K * 4 + K
    assert info["macs"] == 4 * 64 * 27 + K * 4
    assert info["opset"] == 17
    assert info["file_size"] == model.stat().st_size


def test_info_human(tmp_path, capsys):
    model = build_model(tmp_path / "m.onnx")
    code, out, _ = _cli(capsys, "info", model)
    assert code == 0
    assert "source" in out and "ant" in out and "MACs" in out and "params" in out
    assert "input" in out and "[?, 3, 8, 8]" not in out  # symbolic batch shown by name
    assert "N, 3, 8, 8" in out


def test_info_shows_the_front_end_rewrites(tmp_path, capsys, r8_dir):
    """A module of a Keras model (NHWC input, Softmax head) and the model composed from its modules:
    `info` says how decompose read the source (onnxmod.frontend), in words and in --json."""
    from engine_oracles import load_zoo
    from onnxmod import modelio
    from onnxmod.compose import compose
    from onnxmod.decompose import DecomposeSettings, decompose

    zoo = load_zoo()
    spec = zoo.MODELS["keras_gap_softmax"]
    calib = zoo.calibration(spec, tmp_path / "calib.npz", n=60)
    man = decompose(spec.path, calib, tmp_path / "m", classes=["c0", "c1"], quiet=True, device="cpu",
                    settings=DecomposeSettings(repair=False, samples_per_class=10))
    recorded = man["source"]["frontend"]
    assert {"nhwc_input", "strip_softmax"} <= {s["step"] for s in recorded}
    module = tmp_path / "m" / man["modules"][0]["file"]
    code, out, err = _cli(capsys, "info", module, "--json")
    assert code == 0, err
    steps = json.loads(out)["frontend"]
    assert [{k: v for k, v in s.items() if k != "text"} for s in steps] == recorded
    assert all(isinstance(s["text"], str) and s["text"] for s in steps)
    code, out, _ = _cli(capsys, "info", module)
    assert f"front-end {len(recorded)} rewrites to read the source:" in out
    assert "NHWC input turned into the NCHW input (from the leading Transpose" in out
    assert "trailing Softmax" in out and "stripped: the output is the logits" in out

    composed = tmp_path / "composed.onnx"
    modelio.save_model(compose([tmp_path / "m"]), composed)
    code, out, _ = _cli(capsys, "info", composed, "--json")
    (source,) = json.loads(out)["sources"]
    assert [s["step"] for s in source["frontend"]] == [s["step"] for s in recorded]
    code, out, _ = _cli(capsys, "info", composed)
    assert "    front-end" in out and "trailing Softmax" in out

    # a source read as exported says so (the sample ResNet8 needs no rewrite)
    r8_module = sorted(r8_dir.glob("module_*.onnx"))[0]
    code, out, _ = _cli(capsys, "info", r8_module, "--json")
    assert json.loads(out)["frontend"] == []
    assert "front-end none: the source was read as exported" in _cli(capsys, "info", r8_module)[1]


def test_info_without_metadata(tmp_path, capsys):
    model = build_model(tmp_path / "m.onnx", meta=False)
    code, out, _ = _cli(capsys, "info", model, "--json")
    info = json.loads(out)
    assert code == 0 and info["kind"] == "source" and info["classes"] is None


# ----------------------------------------------------------------- eval


def test_eval_json_matches_numpy(tmp_path, capsys):
    model = build_model(tmp_path / "m.onnx")
    x, y = make_data(tmp_path / "d.npz")
    code, out, err = _cli(capsys, "eval", model, "--data", tmp_path / "d.npz", "--json", "--quiet", "--device", "cpu",
                          "--batch-size", 7)
    assert code == 0, err
    assert err == ""
    r = json.loads(out)
    for key in ("model", "kind", "n", "top1", "top5", "per_class"):
        assert key in r
    assert r["kind"] == "source" and r["n"] == 40 and r["model"] == str(model)
    logits, t, top1, top5 = _ref_metrics(x, y, {i: i for i in range(K)})
    assert r["top1"] == pytest.approx(top1)
    assert r["top5"] == pytest.approx(top5)
    pred = logits.argmax(1)
    for ci, name in enumerate(CLASSES):
        sel = y == ci
        if sel.any():
            assert r["per_class"][name] == pytest.approx(float(np.mean(pred[sel] == ci)))
    assert r["skipped"] == 0


def test_eval_limit_and_human(tmp_path, capsys):
    model = build_model(tmp_path / "m.onnx")
    make_data(tmp_path / "d.npz")
    code, out, err = _cli(capsys, "eval", model, "--data", tmp_path / "d.npz", "--limit", 10, "--quiet")
    assert code == 0, err
    assert "10 images" in out and "top-1" in out and "top-5" in out and "recall" in out


def test_eval_matches_by_name_and_skips(tmp_path):
    model = build_model(tmp_path / "m.onnx")
    data_classes = ["fox", "zebra", "ant", "eel", "bee", "cat", "dog"]  # permuted, plus one the model lacks
    x, y = make_data(tmp_path / "d.npz", n=60, classes=data_classes)
    r = evaluate(model, tmp_path / "d.npz", device="cpu", quiet=True)
    keep = np.asarray([data_classes[v] != "zebra" for v in y])
    assert r["skipped"] == int((~keep).sum()) > 0
    assert r["skipped_classes"] == ["zebra"]
    assert r["n"] == int(keep.sum())
    _, _, top1, top5 = _ref_metrics(x[keep], y[keep], {d: CLASSES.index(n) for d, n in enumerate(data_classes) if n in CLASSES})
    assert r["top1"] == pytest.approx(top1)
    assert r["top5"] == pytest.approx(top5)
    assert "zebra" not in r["per_class"]


def test_eval_by_index_without_metadata(tmp_path):
    model = build_model(tmp_path / "m.onnx", meta=False)
    x, y = make_data(tmp_path / "d.npz", classes=[str(i) for i in range(K)])
    r = evaluate(model, tmp_path / "d.npz", device="cpu", quiet=True)
    assert r["matched_by"] == "index"
    assert r["top1"] == pytest.approx(_ref_metrics(x, y, {i: i for i in range(K)})[2])
    make_data(tmp_path / "d4.npz", classes=["a", "b", "c", "d"])
    with pytest.raises(OnnxmodError, match="6 outputs"):
        evaluate(model, tmp_path / "d4.npz", device="cpu", quiet=True)


def test_eval_resizes_to_model_input(tmp_path):
    model = build_model(tmp_path / "m.onnx")
    make_data(tmp_path / "d16.npz", side=16)
    ds = open_dataset(tmp_path / "d16.npz")
    r = evaluate_source(model, ds, device="cpu", quiet=True)
    xs, ys = zip(*ds.iter_batches(size=(8, 8)))
    logits = reference_logits(np.concatenate(xs))
    assert r["top1"] == pytest.approx(float(np.mean(logits.argmax(1) == np.concatenate(ys))))


def test_eval_fixed_batch_model(tmp_path):
    model = build_model(tmp_path / "m1.onnx", batch=1)
    x, y = make_data(tmp_path / "d.npz", n=5)
    r = evaluate(model, tmp_path / "d.npz", device="cpu", quiet=True, batch_size=256)
    assert r["n"] == 5 and r["top1"] == pytest.approx(_ref_metrics(x, y, {i: i for i in range(K)})[2])


def test_eval_top5_null_when_few_classes(tmp_path):
    model = build_model(tmp_path / "m3.onnx", classes=["a", "b", "c"])
    make_data(tmp_path / "d.npz", classes=["a", "b", "c"])
    r = evaluate(model, tmp_path / "d.npz", device="cpu", quiet=True)
    assert r["top5"] is None and 0 <= r["top1"] <= 1


def test_eval_unknown_kind_and_broken_composed(tmp_path):
    # module and composed models are evaluated (tests/test_compose.py); unknown kinds are not
    model = build_model(tmp_path / "m.onnx", kind="weird")
    make_data(tmp_path / "d.npz")
    with pytest.raises(OnnxmodError, match="not supported"):
        evaluate(model, tmp_path / "d.npz", device="cpu", quiet=True)
    fake = build_model(tmp_path / "c.onnx", kind="composed")  # says composed but has no `probs` output
    with pytest.raises(OnnxmodError, match="bad metadata onnxmod.classes = .*: entry 0 must be a"):
        evaluate(fake, tmp_path / "d.npz", device="cpu", quiet=True)  # a composed model names its classes in objects
    m = onnx.load(str(fake))
    next(p for p in m.metadata_props if p.key == "onnxmod.classes").value = json.dumps([{"name": c} for c in CLASSES])
    onnx.save(m, str(fake))
    with pytest.raises(OnnxmodError, match="no output 'probs'"):
        evaluate(fake, tmp_path / "d.npz", device="cpu", quiet=True)


# ----------------------------------------------------------------- bad input


def _assert_one_line_error(code, err, expect):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxmod: error:"), err
    assert expect in lines[0], err
    assert "Traceback" not in err


def test_bad_inputs(tmp_path, capsys):
    model = build_model(tmp_path / "m.onnx")
    make_data(tmp_path / "d.npz")
    (tmp_path / "notonnx.onnx").write_text("hello, I am not a model")
    (tmp_path / "empty").mkdir()
    for args, expect in [
        (["info", tmp_path / "missing.onnx"], "no such file"),
        (["info", tmp_path / "notonnx.onnx"], "not an ONNX model"),
        (["eval", tmp_path / "missing.onnx", "--data", tmp_path / "d.npz"], "no such file"),
        (["eval", tmp_path / "notonnx.onnx", "--data", tmp_path / "d.npz"], "not an ONNX model"),
        (["eval", model, "--data", tmp_path / "empty"], "empty folder"),
        (["eval", model, "--data", tmp_path / "nothere"], "no such file"),
    ]:
        code, out, err = _cli(capsys, *args, "--json") if args[0] == "info" else _cli(capsys, *args, "--quiet")
        _assert_one_line_error(code, err, expect)
        assert out == ""


def test_eval_data_classes_disjoint(tmp_path, capsys):
    model = build_model(tmp_path / "m.onnx")
    make_data(tmp_path / "d.npz", classes=["x", "y"])
    code, _, err = _cli(capsys, "eval", model, "--data", tmp_path / "d.npz", "--quiet")
    _assert_one_line_error(code, err, "none of the data classes")


def test_eval_cuda_not_loading(tmp_path, capsys):
    from onnxmod import runtime

    if runtime.probe_cuda():
        pytest.skip("CUDA loads here")
    model = build_model(tmp_path / "m.onnx")
    make_data(tmp_path / "d.npz")
    code, _, err = _cli(capsys, "eval", model, "--data", tmp_path / "d.npz", "--device", "cuda", "--quiet")
    _assert_one_line_error(code, err, "--device cuda")


def test_every_command_takes_json_and_quiet():
    """README: every command takes --json and --quiet (scripts rely on it)."""
    from click.testing import CliRunner

    from onnxmod.cli.main import _register, cli

    _register()
    assert len(cli.commands) >= 7
    for name in cli.commands:
        out = CliRunner().invoke(cli, [name, "--help"]).output
        assert "--json" in out and "--quiet" in out, name
