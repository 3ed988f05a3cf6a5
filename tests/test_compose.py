"""compose / replace / extract_modules / predict, and eval of modules and composed models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxmod import modelio, runtime
from onnxmod.cli.main import main
from onnxmod.compose import compose, compose_info, extract_modules, module_files, replace
from onnxmod.data import open_dataset, write_npz
from onnxmod.decompose import DecomposeSettings, decompose
from onnxmod.errors import OnnxmodError
from onnxmod.evaluate import evaluate
from onnxmod.modulespec import Calibration, ModuleSpec, SourceInfo
from onnxmod.scoring import binary_auc

from engine_oracles import QUICK_REPAIR

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "sample_graphs"
RESNET8 = SAMPLES / "resnet8_cifar10.onnx"
TEST = SAMPLES / "cifar10_test.npz"
TINY_CLASSES = ["cat", "dog", "ship", "frog"]


# --------------------------------------------------------------------------- fixtures
# r8_dir: conftest.py
@pytest.fixture(scope="module")
def r8_files(r8_dir) -> list[Path]:
    return module_files(r8_dir)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """Two different 4-class tiny sources (8x8 inputs), decomposed on random data."""
    base = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    npz = write_npz(base / "tiny.npz", rng.integers(0, 256, (80, 8, 8, 3), dtype=np.uint8),
                    np.repeat(np.arange(4), 20), TINY_CLASSES)
    out = {}
    for name in ("tiny_bn_folded", "tiny_residual"):
        out[name] = base / f"{name}.modules"
        decompose(SAMPLES / f"{name}.onnx", npz, out[name], settings=DecomposeSettings(samples_per_class=20, **QUICK_REPAIR),
                  quiet=True, device="cpu")
    out["npz"] = npz
    return out


@pytest.fixture(scope="module")
def x32() -> np.ndarray:
    x, _ = next(open_dataset(TEST).iter_batches(batch_size=48))
    return x


def _run_modules(models, x) -> np.ndarray:
    outs = []
    for m in models:
        sess = runtime.make_session(m, device="cpu")
        score, logit = runtime.run(sess, x, ["score", "logit"])
        assert score.shape == logit.shape == (len(x), 1)
        outs.append(logit)
    return np.concatenate(outs, axis=1).astype(np.float64)


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _plain_run(model: onnx.ModelProto, x: np.ndarray):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})


def _cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    cap = capsys.readouterr()
    return e.value.code, cap.out, cap.err


# --------------------------------------------------------------------------- compose
def test_same_source_equals_softmax_of_module_logits(r8_files, x32):
    model = compose(r8_files)
    onnx.checker.check_model(model, full_check=True)
    probs, label = _plain_run(model, x32)
    logits = _run_modules(r8_files, x32)
    assert probs.shape == (len(x32), 10) and label.dtype == np.int64 and label.shape == (len(x32),)
    np.testing.assert_allclose(probs, _softmax(logits), atol=1e-5)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert (label == logits.argmax(axis=1)).all()
    classes = modelio.get_meta(model, modelio.CLASSES)
    assert [c["name"] for c in classes] == [ModuleSpec.from_model(onnx.load(f)).class_name for f in r8_files]
    assert {"name", "source_sha256", "source_name", "class_index"} <= set(classes[0])
    assert modelio.model_kind(model) == "composed"
    assert compose_info(model)["rule"] == "softmax(logits)"


def test_dedup_shares_nodes(r8_files):
    model = compose(r8_files)
    total = sum(len(onnx.load(f).graph.node) for f in r8_files)
    assert len(model.graph.node) < total
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Sub") == 1 and ops.count("Div") == 1  # the baked preprocessing, once
    info = compose_info(model)
    assert info["macs"] < info["module_macs_sum"]


def test_class_order_is_argument_order(r8_files, x32):
    order = [r8_files[3], r8_files[0], r8_files[7]]
    model = compose(order)
    assert [c["class_index"] for c in modelio.get_meta(model, modelio.CLASSES)] == [3, 0, 7]
    probs, _ = _plain_run(model, x32)
    np.testing.assert_allclose(probs, _softmax(_run_modules(order, x32)), atol=1e-5)


def test_mixed_sources_temperature_rule_and_opset_conversion(tiny_dirs, tmp_path):
    a = module_files(tiny_dirs["tiny_bn_folded"])
    b = module_files(tiny_dirs["tiny_residual"])
    # one member at opset 18: compose converts the others up
    b18 = onnx.version_converter.convert_version(onnx.load(b[1]), 18)
    b18.ir_version = 8
    p18 = tmp_path / "dog18.onnx"
    onnx.save(b18, p18)
    members = [a[0], p18, a[2], b[3]]  # cat, dog, ship, frog from two sources
    model = compose(members)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 18
    x = np.random.default_rng(1).random((16, 3, 8, 8), dtype=np.float32)
    probs, label = _plain_run(model, x)
    temps = np.array([ModuleSpec.from_model(onnx.load(m)).calibration.temperature for m in members])
    z = _run_modules(members, x) / temps
    np.testing.assert_allclose(probs, _softmax(z), atol=1e-5)
    assert (label == z.argmax(axis=1)).all()
    info = compose_info(model)
    assert info["rule"] == "softmax(logit_i / T_i)" and len(info["sources"]) == 2
    np.testing.assert_allclose(info["temperatures"], temps)


def test_duplicate_class_names_need_rename(tiny_dirs):
    a = module_files(tiny_dirs["tiny_bn_folded"])
    b = module_files(tiny_dirs["tiny_residual"])
    with pytest.raises(OnnxmodError, match="--rename"):
        compose([a[0], b[0]])
    model = compose([a[0], b[0], a[1]], rename=True)
    names = [c["name"] for c in modelio.get_meta(model, modelio.CLASSES)]
    assert names == ["cat@tiny_bn_folded", "cat@tiny_residual", "dog"]


def test_same_module_twice_is_an_error(r8_files):
    with pytest.raises(OnnxmodError, match="twice"):
        compose([r8_files[0], r8_files[1], r8_files[0]])


def test_size_mismatch_is_an_error(r8_files, tiny_dirs):
    with pytest.raises(OnnxmodError, match="input sizes differ"):
        compose([r8_files[0], module_files(tiny_dirs["tiny_bn_folded"])[0]])


def _hand_module(channels: int, side: int, name: str, resizable: bool = False, seed: int = 0) -> onnx.ModelProto:
    """A small valid module built by hand (Conv -> GAP -> Flatten -> Gemm -> logit, Platt score)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(size=(4, channels, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(size=(1, 4)).astype(np.float32), "fw"),
             helper.make_tensor("a", TensorProto.FLOAT, [], [1.5]),
             helper.make_tensor("b", TensorProto.FLOAT, [], [-0.5])]
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "fw"], ["logit"], transB=1),
             helper.make_node("Mul", ["logit", "a"], ["ax"]),
             helper.make_node("Add", ["ax", "b"], ["z"]),
             helper.make_node("Sigmoid", ["z"], ["score"])]
    g = helper.make_graph(nodes, name, [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", channels, side, side])],
                          [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N", 1]),
                           helper.make_tensor_value_info("logit", TensorProto.FLOAT, ["N", 1])], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    spec = ModuleSpec(name, 0, SourceInfo(f"hand{seed}", f"{seed:064d}", 1, 0, 0), {}, Calibration("platt", 1.5, -0.5, 1.0, 1),
                      {"input_size": [side, side], "resizable": resizable})
    modelio.set_meta(m, spec.to_metadata())
    onnx.checker.check_model(m, full_check=True)
    return m


def test_resizable_module_gets_a_resize(r8_files, x32):
    small = _hand_module(3, 16, "blob", resizable=True)
    model = compose([r8_files[0], small])
    assert [n.op_type for n in model.graph.node].count("Resize") == 1
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    assert dims == [3, 32, 32]
    probs, _ = _plain_run(model, x32)
    assert probs.shape == (len(x32), 2)
    # extraction gives the module back at its own input size
    ex = extract_modules(model)[1]
    assert [d.dim_value for d in ex.graph.input[0].type.tensor_type.shape.dim[1:]] == [3, 16, 16]
    xs = np.random.default_rng(0).random((4, 3, 16, 16), dtype=np.float32)
    np.testing.assert_allclose(_run_modules([ex], xs), _run_modules([small], xs), atol=1e-6)


def test_channel_mismatch_is_an_error(r8_files):
    with pytest.raises(OnnxmodError, match="channels differ"):
        compose([r8_files[0], _hand_module(1, 32, "gray")])


def test_composed_is_not_a_member(r8_files):  # a source is one: tests/test_source_member.py
    with pytest.raises(OnnxmodError, match="composed model, not an onnxmod module"):
        compose([compose(r8_files[:2])])


# --------------------------------------------------------------------------- extract / replace
def test_extract_modules_round_trips(r8_files, tiny_dirs, x32):
    members = [r8_files[1], r8_files[4], r8_files[9]]
    model = compose(members)
    extracted = extract_modules(model)
    assert len(extracted) == 3
    for orig, ex in zip(members, extracted):
        onnx.checker.check_model(ex, full_check=True)
        o = onnx.load(orig)
        assert ModuleSpec.from_model(ex) == ModuleSpec.from_model(o)
        so, se = runtime.make_session(o, "cpu"), runtime.make_session(ex, "cpu")
        for a, b in zip(runtime.run(so, x32, ["score", "logit"]), runtime.run(se, x32, ["score", "logit"])):
            np.testing.assert_allclose(a, b, atol=1e-6)
    # re-composing the extracted modules gives the same model outputs
    again = compose(extracted)
    for a, b in zip(_plain_run(model, x32), _plain_run(again, x32)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_replace_swaps_exactly_one_class(r8_dir, r8_files, tiny_dirs, x32):
    base = compose(r8_files)
    # a module of another source for 'cat' (a resnet8 re-decomposed with another seed/budget)
    other = _hand_module(3, 32, "cat", seed=3)
    new = replace(base, "cat", other)
    names = [c["name"] for c in modelio.get_meta(new, modelio.CLASSES)]
    assert names == [c["name"] for c in modelio.get_meta(base, modelio.CLASSES)]
    shas = [c["source_sha256"] for c in modelio.get_meta(new, modelio.CLASSES)]
    assert shas[3] == f"{3:064d}" and len(set(shas[:3] + shas[4:])) == 1
    # outputs: the documented mixed-source rule over the swapped member list
    members = [onnx.load(f) for f in r8_files]
    members[3] = other
    temps = np.array([ModuleSpec.from_model(m).calibration.temperature for m in members])
    z = _run_modules(members, x32) / temps
    probs, label = _plain_run(new, x32)
    np.testing.assert_allclose(probs, _softmax(z), atol=1e-5)
    # by index, and from a module dir
    by_dir = replace(r8_dir, 3, other)
    for a, b in zip(_plain_run(new, x32), _plain_run(by_dir, x32)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    with pytest.raises(OnnxmodError, match="not one of"):
        replace(base, "unicorn", other)


# --------------------------------------------------------------------------- CLI
def test_cli_compose_replace_info_eval(r8_dir, r8_files, tmp_path, capsys):
    out = tmp_path / "c.onnx"
    code, stdout, _ = _cli(["compose", str(r8_dir), "-o", str(out), "--json"], capsys)
    assert code == 0 and out.is_file()
    r = json.loads(stdout)
    assert len(r["classes"]) == 10 and r["macs"] < r["module_macs_sum"]
    code, stdout, _ = _cli(["info", str(out), "--json"], capsys)
    info = json.loads(stdout)
    assert code == 0 and info["kind"] == "composed" and info["classes"][3] == "cat"
    assert info["module_macs_sum"] > info["macs"] > 0 and len(info["sources"]) == 1
    code, stdout, _ = _cli(["eval", str(out), "--data", str(TEST), "--json", "--quiet", "--device", "cpu"], capsys)
    ev = json.loads(stdout)
    assert code == 0 and ev["kind"] == "composed" and ev["n"] == 600 and 0.3 < ev["top1"] <= 1
    out2 = tmp_path / "c2.onnx"
    code, _, _ = _cli(["replace", str(out), "--class", "cat", "--with", str(r8_files[3]), "-o", str(out2)], capsys)
    assert code == 0 and out2.is_file()  # same module back in: same outputs
    x, _ = next(open_dataset(TEST).iter_batches(batch_size=16))
    for a, b in zip(_plain_run(onnx.load(out), x), _plain_run(onnx.load(out2), x)):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("case", ["source", "missing", "duplicate", "channels", "composed_base_missing"])
def test_cli_bad_inputs_exit_2(case, r8_files, tiny_dirs, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    if case == "source":
        argv = ["compose", str(r8_files[0]), str(RESNET8), "-o", str(out)]
    elif case == "missing":
        argv = ["compose", str(r8_files[0]), str(tmp_path / "nope.onnx"), "-o", str(out)]
    elif case == "duplicate":
        argv = ["compose", str(module_files(tiny_dirs["tiny_bn_folded"])[0]),
                str(module_files(tiny_dirs["tiny_residual"])[0]), "-o", str(out)]
    elif case == "channels":
        gray = tmp_path / "gray.onnx"
        onnx.save(_hand_module(1, 32, "gray"), gray)
        argv = ["compose", str(r8_files[0]), str(gray), "-o", str(out)]
    else:
        argv = ["replace", str(tmp_path / "nope.onnx"), "--class", "cat", "--with", str(r8_files[0]), "-o", str(out)]
    code, _, err = _cli(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxmod: error:")
    assert not out.exists()
    assert not list(tmp_path.glob(".out.onnx*"))


def test_module_eval_matches_numpy(r8_files):
    f = r8_files[3]
    r = evaluate(f, TEST, device="cpu", quiet=True)
    ds = open_dataset(TEST)
    sess = runtime.make_session(f, "cpu")
    scores, ys = [], []
    for x, y in ds.iter_batches(batch_size=128):
        scores.append(runtime.run(sess, x, ["score"])[0][:, 0])
        ys.append(y)
    s, y = np.concatenate(scores), np.concatenate(ys)
    pos = y == ds.classes.index("cat")
    assert r["kind"] == "module" and r["class_name"] == "cat" and r["n"] == len(y)
    assert r["positives"] == int(pos.sum())
    assert r["binary_accuracy"] == pytest.approx(float(((s >= 0.5) == pos).mean()))
    assert r["auc"] == pytest.approx(binary_auc(s, pos))
    assert 0.5 < r["auc"] <= 1.0


def test_module_eval_needs_its_class_in_data(tiny_dirs):
    f = module_files(tiny_dirs["tiny_bn_folded"])[1]  # 'dog'
    rng = np.random.default_rng(0)
    npz = write_npz(tiny_dirs["npz"].parent / "nodog.npz", rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8),
                    np.arange(8) % 2, ["cat", "ship"])
    with pytest.raises(OnnxmodError, match="no class 'dog'"):
        evaluate(f, npz, device="cpu", quiet=True)


def test_composed_eval_skips_classes_it_lacks(r8_files):
    model = compose(r8_files[:4])
    r = evaluate(model, TEST, device="cpu", quiet=True)
    assert r["kind"] == "composed" and r["n"] == 240 and r["skipped"] == 360
    assert set(r["per_class"]) == {"airplane", "automobile", "bird", "cat"}


def test_predict_prints_labels(r8_dir, r8_files, tmp_path, capsys):
    from PIL import Image

    x, y = next(open_dataset(TEST).iter_batches(batch_size=2))
    imgs = []
    for i in range(2):
        p = tmp_path / f"img{i}.png"
        Image.fromarray((x[i].transpose(1, 2, 0) * 255).round().astype(np.uint8)).resize((40, 40)).save(p)
        imgs.append(str(p))
    out = tmp_path / "c.onnx"
    modelio.save_model(compose(r8_files), out)
    for model in (out, RESNET8, r8_files[0]):
        code, stdout, _ = _cli(["predict", str(model), *imgs, "--json", "--top", "2", "--device", "cpu"], capsys)
        assert code == 0
        r = json.loads(stdout)
        assert len(r["predictions"]) == 2
        for p in r["predictions"]:
            assert p["label"] and len(p["top"]) == 2 and 0 <= p["top"][0]["prob"] <= 1
    code, stdout, _ = _cli(["predict", str(out), *imgs], capsys)
    assert code == 0 and len(stdout.strip().splitlines()) == 2 and "img0.png" in stdout
    code, _, err = _cli(["predict", str(out), str(tmp_path / "nope.png")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- shared data
@pytest.mark.shared
def test_full_modules_reproduce_resnet20(shared_data, tmp_path):
    weights = shared_data / "pretrained" / "resnet20-cifar10jpeg.th"
    if not weights.is_file():
        pytest.skip(f"{weights} absent")
    src = tmp_path / "r20.onnx"
    from onnxmod.cli.main import main as cli_main

    with pytest.raises(SystemExit) as e:
        cli_main(["export", "resnet20", "--weights", str(weights), "-o", str(src), "--quiet"])
    assert e.value.code == 0
    data = shared_data / "cifar10"
    mods = tmp_path / "r20.modules"
    decompose(src, data, mods, settings=DecomposeSettings(target_macs=1.0, samples_per_class=50), quiet=True)
    model = compose(module_files(mods))
    ds = open_dataset(data, "test")
    src_sess = runtime.make_session(src)
    comp_sess = runtime.make_session(model)
    same = 0
    for x, _ in ds.iter_batches(batch_size=250, limit=1000):
        (logits,) = runtime.run(src_sess, x)
        probs, label = runtime.run(comp_sess, x)
        same += int((logits.argmax(axis=1) == label).sum())
        np.testing.assert_allclose(probs, _softmax(logits.astype(np.float64)), atol=1e-4)
    assert same == 1000
    info = compose_info(model)
    assert info["macs"] <= 1.01 * modelio.get_meta(onnx.load(module_files(mods)[0]), modelio.SOURCE)["flops"]
