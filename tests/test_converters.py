"""converters (PyTorch -> ONNX source models) and `onnxmod export`."""

from __future__ import annotations

import importlib.util
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from onnxmod import modelio  # noqa: E402
from onnxmod.converters import CIFAR10_CLASSES, export, load_checkpoint, resnet_cifar  # noqa: E402
from onnxmod.converters.export import Normalized  # noqa: E402
from onnxmod.errors import OnnxmodError  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "sample_graphs"
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
TOL = 1e-4


def _session(path) -> "ort.InferenceSession":
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _torch_ref(model, x: np.ndarray, mean=MEAN, std=STD, scale=1.0) -> np.ndarray:
    with torch.no_grad():
        return Normalized(model, mean, std, scale).eval()(torch.from_numpy(x)).numpy()


def _load_make_tiny():
    spec = importlib.util.spec_from_file_location("onnxmod_make_tiny", SAMPLES / "make_tiny.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _randomise_bn(model, seed: int = 0):
    return _load_make_tiny().randomise_bn(model, seed)


# ---------------------------------------------------------------- ResNet20, both exporters


@pytest.fixture(scope="module")
def r20():
    torch.manual_seed(0)
    return _randomise_bn(resnet_cifar(20))


@pytest.fixture(scope="module", params=["legacy", "dynamo"])
def r20_onnx(request, r20, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / "r20.onnx"
    export(r20, path, classes=CIFAR10_CLASSES, mean=MEAN, std=STD, exporter=request.param)
    return request.param, path


def test_resnet_structure():
    m = resnet_cifar(20)
    assert sum(p.numel() for p in m.parameters()) == 269722  # akamaster: 0.27M
    assert len(m.layer1) == len(m.layer2) == len(m.layer3) == 3
    assert len(resnet_cifar(110).layer3) == 18
    m8 = resnet_cifar(8, num_classes=4, width=4)
    assert m8(torch.rand(2, 3, 32, 32)).shape == (2, 4)
    with pytest.raises(OnnxmodError):
        resnet_cifar(21)


@pytest.mark.parametrize("batch", [1, 5])
def test_export_matches_torch(r20, r20_onnx, batch):
    _, path = r20_onnx
    x = np.random.default_rng(batch).random((batch, 3, 32, 32), dtype=np.float32)
    (y,) = _session(path).run(["logits"], {"input": x})
    assert y.shape == (batch, 10)
    np.testing.assert_allclose(y, _torch_ref(r20, x), atol=TOL, rtol=0)


def test_export_graph_contract(r20_onnx):
    exporter, path = r20_onnx
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    g = model.graph
    inits = {i.name for i in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]
    assert [i.name for i in inputs] == ["input"] and [o.name for o in g.output] == ["logits"]
    dims = inputs[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].dim_value
    assert [d.dim_value for d in dims[1:]] == [3, 32, 32]
    assert inputs[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert g.output[0].type.tensor_type.shape.dim[0].dim_param
    # one self-contained file, eval mode only, constants folded, BN fused into Conv
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in g.initializer)
    ops = {n.op_type for n in g.node}
    assert not ops & {"BatchNormalization", "Dropout", "Constant", "ConstantOfShape", "Identity"}
    assert {"Conv", "Add", "Slice", "Pad", "Gemm", "Sub", "Div"} <= ops
    for n in g.node:
        if n.op_type == "Pad":
            assert n.input[1] in inits  # pads are a plain initializer
    assert modelio.get_meta(model, modelio.KIND) == "source"
    assert modelio.get_meta(model, modelio.CLASSES) == CIFAR10_CLASSES
    pre = modelio.get_meta(model, modelio.PREPROCESS)
    assert pre == {"mean": list(MEAN), "std": list(STD), "scale": 1.0, "in_graph": True, "input_size": [32, 32]}
    opset = {o.domain: o.version for o in model.opset_import}[""]
    assert opset == (17 if exporter == "legacy" else 18)


def test_export_scale_and_small_input(tmp_path):
    torch.manual_seed(1)
    m = _randomise_bn(resnet_cifar(8, num_classes=3, width=4))
    path = export(
        m, tmp_path / "m.onnx", input_shape=(3, 16, 16), classes=["a", "b", "c"], mean=(0.5,) * 3, std=(0.2,) * 3, scale=2.0
    )
    x = np.random.default_rng(0).random((4, 3, 16, 16), dtype=np.float32)
    np.testing.assert_allclose(
        _session(path).run(None, {"input": x})[0], _torch_ref(m, x, (0.5,) * 3, (0.2,) * 3, 2.0), atol=TOL, rtol=0
    )
    assert modelio.get_meta(onnx.load(str(path)), modelio.PREPROCESS)["input_size"] == [16, 16]


def test_export_rejects_bad_args(tmp_path):
    m = resnet_cifar(8, num_classes=3, width=4)
    with pytest.raises(OnnxmodError, match="classes"):
        export(m, tmp_path / "m.onnx", classes=["a", "b"], mean=MEAN, std=STD)
    with pytest.raises(OnnxmodError, match="mean"):
        export(m, tmp_path / "m.onnx", classes=["a", "b", "c"], mean=(0.5,), std=STD)
    with pytest.raises(OnnxmodError, match="exporter"):
        export(m, tmp_path / "m.onnx", classes=["a", "b", "c"], mean=MEAN, std=STD, exporter="jit")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- tiny graphs

make_tiny = _load_make_tiny()
TINY_OPS = {
    "bn_kept": "BatchNormalization",
    "bn_folded": "Conv",
    "residual": "Add",
    "shortcut_a": "Pad",
    "concat": "Concat",
    "flatten_gemm": "Gemm",
    "matmul_add": "MatMul",
    "maxpool": "MaxPool",
}


@pytest.mark.parametrize("name", list(make_tiny.TINY))
def test_tiny_graphs(name, tmp_path):
    model = make_tiny.build(name)
    x = np.random.default_rng(0).random((5, 3, 8, 8), dtype=np.float32)
    ref = _torch_ref(model, x, make_tiny.MEAN, make_tiny.STD)
    paths = [make_tiny.write(name, tmp_path)]
    committed = SAMPLES / f"tiny_{name}.onnx"
    if committed.exists():
        paths.append(committed)  # same seed -> same weights as the committed file
    for path in paths:
        m = onnx.load(str(path))
        onnx.checker.check_model(m, full_check=True)
        ops = {n.op_type for n in m.graph.node}
        assert TINY_OPS[name] in ops
        if name == "bn_folded":
            assert "BatchNormalization" not in ops
        if name == "matmul_add":
            assert "Gemm" not in ops and "Add" in ops
        if name == "flatten_gemm":
            assert "Flatten" in ops and "GlobalAveragePool" not in ops
        assert modelio.get_meta(m, modelio.KIND) == "source"
        assert modelio.get_meta(m, modelio.PREPROCESS)["in_graph"] is True
        assert path.stat().st_size < 20_000
        sess = _session(path)
        for b in (1, 5):
            (y,) = sess.run(["logits"], {"input": x[:b]})
            np.testing.assert_allclose(y, ref[:b], atol=TOL, rtol=0)


def test_keep_batchnorm_needs_legacy(tmp_path):
    with pytest.raises(OnnxmodError, match="legacy"):
        export(make_tiny.build("bn_kept"), tmp_path / "m.onnx", input_shape=(3, 8, 8), classes=make_tiny.CLASSES,
               mean=make_tiny.MEAN, std=make_tiny.STD, exporter="dynamo", keep_batchnorm=True)


# ---------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def small_sd():
    torch.manual_seed(2)
    return _randomise_bn(resnet_cifar(8, width=4)).state_dict()


def _same(model, sd):
    got = model.state_dict()
    return all(torch.equal(got[k], v) for k, v in sd.items())


@pytest.mark.parametrize("form", ["wrapped", "prefixed", "plain", "old_no_counters"])
def test_load_checkpoint_forms(small_sd, tmp_path, form):
    sd = dict(small_sd)
    if form == "prefixed":
        obj = {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "best_prec1": 91.0}
    elif form == "plain":
        obj = sd
    elif form == "old_no_counters":
        obj = {"state_dict": {f"module.{k}": v for k, v in sd.items() if "num_batches_tracked" not in k}}
    else:
        obj = {"state_dict": sd, "arch": "resnet8"}
    torch.save(obj, tmp_path / "w.th")
    m = load_checkpoint(resnet_cifar(8, width=4), tmp_path / "w.th")
    assert not m.training
    assert _same(m, {k: v for k, v in small_sd.items() if "num_batches_tracked" not in k})


def test_load_checkpoint_mismatch_names_keys(small_sd, tmp_path):
    torch.save({"state_dict": small_sd}, tmp_path / "w.th")
    with pytest.raises(OnnxmodError) as e:
        load_checkpoint(resnet_cifar(14, width=4), tmp_path / "w.th")  # 2 blocks per layer
    assert "missing keys" in str(e.value) and "layer1.1.conv1.weight" in str(e.value)
    with pytest.raises(OnnxmodError) as e:
        load_checkpoint(resnet_cifar(8, num_classes=100, width=4), tmp_path / "w.th")
    assert "shape mismatch" in str(e.value) and "linear.weight" in str(e.value)
    extra = dict(small_sd, **{"fc.weight": torch.zeros(1)})
    torch.save(extra, tmp_path / "x.th")
    with pytest.raises(OnnxmodError, match="unexpected keys: fc.weight"):
        load_checkpoint(resnet_cifar(8, width=4), tmp_path / "x.th")


def test_load_checkpoint_bad_files(tmp_path):
    (tmp_path / "junk.th").write_bytes(b"this is not a checkpoint")
    with pytest.raises(OnnxmodError, match="not a PyTorch checkpoint"):
        load_checkpoint(resnet_cifar(8), tmp_path / "junk.th")
    torch.save([1, 2, 3], tmp_path / "list.th")
    with pytest.raises(OnnxmodError, match="not a state_dict"):
        load_checkpoint(resnet_cifar(8), tmp_path / "list.th")
    with pytest.raises(OnnxmodError, match="no such file"):
        load_checkpoint(resnet_cifar(8), tmp_path / "missing.th")


# ---------------------------------------------------------------- CLI


def _run_cli(argv, capsys):
    from onnxmod.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_cli_export_ok(small_sd, tmp_path, capsys):
    torch.manual_seed(3)
    sd = resnet_cifar(8, num_classes=3).state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "w.th")
    (tmp_path / "names.txt").write_text("alpha\nbeta\n\ngamma\n")
    out_path = tmp_path / "out" / "m.onnx"
    code, out, err = _run_cli(
        ["export", "resnet8", "--weights", str(tmp_path / "w.th"), "-o", str(out_path),
         "--classes", str(tmp_path / "names.txt"), "--json"],
        capsys,
    )
    assert code == 0, err
    res = json.loads(out)
    assert res["output"] == str(out_path) and res["arch"] == "resnet8" and res["exporter"] == "legacy"
    assert res["classes"] == ["alpha", "beta", "gamma"] and res["params"] > 0
    m = onnx.load(str(out_path))
    assert modelio.get_meta(m, modelio.CLASSES) == ["alpha", "beta", "gamma"]
    assert modelio.get_meta(m, modelio.PREPROCESS)["mean"] == list(MEAN)


def test_cli_export_reads_class_names_and_normalisation_from_the_checkpoint(tmp_path, capsys):
    """A checkpoint recording classes/mean/std (bench/train_source.py) exports without --classes, and the graph
    computes the torch model with that normalisation."""
    from onnxmod.converters.resnet_cifar import read_checkpoint

    torch.manual_seed(5)
    full = _randomise_bn(resnet_cifar(8, num_classes=5))
    names, mean, std = ["apple", "bee", "cup", "dog", "egg"], [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    torch.save({"state_dict": full.state_dict(), "classes": names, "mean": mean, "std": std}, tmp_path / "f.th")
    ck = read_checkpoint(tmp_path / "f.th")
    assert ck.classes == names and ck.mean == tuple(mean) and ck.std == tuple(std) and ck.num_classes == 5
    code, out, err = _run_cli(["export", "resnet8", "-w", str(tmp_path / "f.th"), "-o", str(tmp_path / "m.onnx"),
                               "--json"], capsys)
    assert code == 0, err
    m = onnx.load(str(tmp_path / "m.onnx"))
    assert modelio.get_meta(m, modelio.CLASSES) == names
    x = np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)
    got = _session(tmp_path / "m.onnx").run(None, {"input": x})[0]
    np.testing.assert_allclose(got, _torch_ref(full.eval(), x, mean, std), atol=TOL)


@pytest.mark.parametrize("case, message", [
    ("100 outputs, no names", "records no class names; give them with --classes"),
    ("names do not fit", "classifier has 5 outputs but 3 class names"),
    ("classes not names", "'classes' is not a list of class names"),
    ("class twice", "appears twice"),
    ("std zero", "'std' is not 3 finite numbers"),
    ("mean nan", "'mean' is not 3 finite numbers"),
])
def test_cli_export_checkpoint_records_checked(case, message, tmp_path, capsys):
    sd = resnet_cifar(8, num_classes=100 if case.startswith("100") else 5).state_dict()
    obj: dict = {"state_dict": sd}
    argv = []
    if case == "names do not fit":
        (tmp_path / "names.txt").write_text("a\nb\nc\n")
        argv = ["--classes", str(tmp_path / "names.txt")]
    elif case == "classes not names":
        obj["classes"] = [1, 2, 3, 4, 5]
    elif case == "class twice":
        obj["classes"] = ["a", "b", "a", "c", "d"]
    elif case == "std zero":
        obj["std"] = [0.2, 0.0, 0.2]
    elif case == "mean nan":
        obj["mean"] = [0.2, float("nan"), 0.2]
    torch.save(obj, tmp_path / "w.th")
    code, out, err = _run_cli(["export", "resnet8", "-w", str(tmp_path / "w.th"), "-o", str(tmp_path / "m.onnx"),
                               *argv], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("onnxmod: error:") and message in err, err
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("bad", ["junk", "missing", "wrong_arch"])
def test_cli_export_bad_weights(bad, small_sd, tmp_path, capsys):
    w = tmp_path / "w.th"
    if bad == "junk":
        w.write_text("not a checkpoint")
    elif bad == "wrong_arch":
        torch.save({"state_dict": small_sd}, w)  # resnet8 width 4, not resnet20
    code, out, err = _run_cli(["export", "resnet20", "--weights", str(w), "-o", str(tmp_path / "m.onnx")], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxmod: error:"), err
    assert "Traceback" not in err and out == ""
    assert not (tmp_path / "m.onnx").exists()


def test_cli_export_without_torch(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxmod.converters.export", None)  # import -> ImportError
    code, _, err = _run_cli(["export", "resnet20", "--weights", str(tmp_path / "w.th"), "-o", str(tmp_path / "m.onnx")], capsys)
    assert code == 2 and "pip install onnxmod[torch]" in err


# ---------------------------------------------------------------- sample model (committed files)


@pytest.mark.skipif(not (SAMPLES / "resnet8_cifar10.onnx").exists(), reason="sample model not built")
def test_sample_model_and_data():
    m = onnx.load(str(SAMPLES / "resnet8_cifar10.onnx"))
    onnx.checker.check_model(m, full_check=True)
    classes = modelio.get_meta(m, modelio.CLASSES)
    assert classes == CIFAR10_CLASSES
    for name in ("cifar10_calib.npz", "cifar10_test.npz"):
        d = np.load(SAMPLES / name)
        assert d["x"].dtype == np.uint8 and d["x"].shape[1:] == (32, 32, 3)
        assert d["y"].dtype == np.int64 and len(d["y"]) == len(d["x"])
        assert list(d["classes"]) == classes
        assert np.bincount(d["y"], minlength=10).min() > 0
    d = np.load(SAMPLES / "cifar10_test.npz")
    x = d["x"].transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    acc = float((_session(SAMPLES / "resnet8_cifar10.onnx").run(None, {"input": x})[0].argmax(1) == d["y"]).mean())
    assert acc > 0.6
    total = sum(p.stat().st_size for p in SAMPLES.iterdir() if p.suffix in {".onnx", ".npz", ".th"})
    assert total <= 5 * 1024 * 1024


# ---------------------------------------------------------------- real pretrained weights


def _test_images(shared: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    with open(shared / "cifar10" / "cifar-10-batches-py" / "test_batch", "rb") as f:
        d = pickle.load(f, encoding="bytes")
    x = np.asarray(d[b"data"][:n], dtype=np.uint8).reshape(-1, 3, 32, 32).astype(np.float32) / 255.0
    return x, np.asarray(d[b"labels"][:n])


@pytest.mark.shared
def test_pretrained_resnet20_matches_torch(shared_data, tmp_path):
    model = load_checkpoint(resnet_cifar(20), shared_data / "pretrained" / "resnet20-cifar10jpeg.th")
    path = export(model, tmp_path / "r20.onnx", classes=CIFAR10_CLASSES, mean=MEAN, std=STD)
    x, y = _test_images(shared_data, 200)
    got = _session(path).run(None, {"input": x})[0]
    ref = _torch_ref(model, x)
    np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)
    assert (got.argmax(1) == ref.argmax(1)).all()
    assert (got.argmax(1) == y).mean() > 0.8  # 87.91% on the full test_batch


@pytest.mark.shared
def test_pretrained_akamaster_prefixed(shared_data):
    # DataParallel `module.` keys, no num_batches_tracked buffers
    model = load_checkpoint(resnet_cifar(20), shared_data / "pretrained" / "resnet20-akamaster.th")
    x, y = _test_images(shared_data, 200)
    assert (_torch_ref(model, x).argmax(1) == y).mean() > 0.7  # 81.03% on the full test_batch
