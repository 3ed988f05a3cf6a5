"""A source classifier as a member of compose and replace (issue 22): its classes computed by the source graph."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from onnxmod import modelio, runtime, scoring
from onnxmod.cli.main import main
from onnxmod.compose import compose, compose_info, extract_modules, module_files, replace
from onnxmod.data import open_dataset
from onnxmod.errors import OnnxmodError
from onnxmod.sourcemember import preprocess_args

from test_compose import _hand_module

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "sample_graphs"
RESNET8 = SAMPLES / "resnet8_cifar10.onnx"
CALIB = SAMPLES / "cifar10_calib.npz"
TEST = SAMPLES / "cifar10_test.npz"
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return next(open_dataset(TEST).iter_batches(batch_size=48))[0]


@pytest.fixture(scope="module")
def source_logits(x) -> np.ndarray:
    return _plain_run(onnx.load(RESNET8), x)[0]


@pytest.fixture(scope="module")
def r8_files(r8_dir) -> list[Path]:  # r8_dir: conftest.py, a decomposition of RESNET8
    return module_files(r8_dir)


@pytest.fixture(scope="module")
def other_cat(tmp_path_factory) -> Path:
    """A 'cat' module of another source (32x32, built by hand)."""
    p = tmp_path_factory.mktemp("other") / "cat_other.onnx"
    onnx.save(_hand_module(3, 32, "cat", seed=3), p)
    return p


@pytest.fixture(scope="module")
def nameless(tmp_path_factory) -> Path:
    """RESNET8 without its onnxmod.classes metadata."""
    m = onnx.load(RESNET8)
    modelio.drop_meta(m, modelio.CLASSES)
    p = tmp_path_factory.mktemp("nameless") / "r8_nameless.onnx"
    onnx.save(m, p)
    return p


def _plain_run(model: onnx.ModelProto, x: np.ndarray, extra: list[str] = ()) -> list[np.ndarray]:
    """A plain onnxruntime session (no onnxmod in between), with ``extra`` tensors as outputs too."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in extra)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})


def _checked_member_logits(model: onnx.ModelProto, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(probs, each member's logit in the composed graph [N, K]) of a written graph that passes the full checker."""
    onnx.checker.check_model(model, full_check=True)
    tensors = [m["logit"] for m in modelio.get_meta(model, modelio.MEMBERS)]
    probs, label, *logits = _plain_run(model, x, tensors)
    assert probs.shape == (len(x), len(tensors)) and label.shape == (len(x),)
    return probs, np.concatenate(logits, axis=1)


def _module_logit(path: Path, x: np.ndarray) -> np.ndarray:
    return runtime.run(runtime.make_session(path, device="cpu"), x, ["logit"])[0][:, 0]


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _cli(argv: list, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    cap = capsys.readouterr()
    return e.value.code, cap.out, cap.err


# --------------------------------------------------------------------------- compose
def test_a_source_alone_is_the_source(x, source_logits):
    model = compose([RESNET8])
    probs, logits = _checked_member_logits(model, x)
    np.testing.assert_allclose(logits, source_logits, atol=1e-6)
    np.testing.assert_allclose(probs, _softmax(source_logits.astype(np.float64)), atol=1e-6)
    classes = modelio.get_meta(model, modelio.CLASSES)
    assert [c["name"] for c in classes] == CIFAR10 and {c["member"] for c in classes} == {"source"}
    info = compose_info(model)
    assert info["rule"] == "softmax(logits)" and info["module_macs_sum"] == info["macs"]  # the graph once
    assert [n.op_type for n in model.graph.node].count("Gemm") == 1


def test_a_source_next_to_another_source_is_scaled_by_its_fitted_temperature(x, source_logits, tmp_path):
    blob = tmp_path / "blob.onnx"  # another source's class, at another (resizable) input size
    onnx.save(_hand_module(3, 16, "blob", resizable=True, seed=5), blob)
    with pytest.raises(OnnxmodError, match="temperature.*--calib"):
        compose([RESNET8, blob])
    model = compose([RESNET8, blob], calib=CALIB)
    probs, logits = _checked_member_logits(model, x)
    np.testing.assert_allclose(logits[:, :10], source_logits, atol=1e-6)
    # the temperature the source gets: fitted on the labelled calibration images, as decompose fits it
    ds = open_dataset(CALIB, "train")
    xs, ys = next(ds.iter_batches(batch_size=len(ds)))
    t = scoring.fit_temperature(_plain_run(onnx.load(RESNET8), xs)[0], ys)
    temps = compose_info(model)["temperatures"]
    assert temps[:10] == pytest.approx([t] * 10, rel=1e-6) and temps[10] == 1.0
    np.testing.assert_allclose(probs, _softmax(logits.astype(np.float64) / np.array(temps)), atol=1e-6)
    cal = json.loads(modelio.get_meta(model, modelio.MEMBERS)[0]["metadata"][modelio.CALIBRATION])
    assert cal["temperature_fitted"] and cal["method"] == "source"


def test_a_class_of_two_sources_needs_rename(other_cat, x, source_logits):
    with pytest.raises(OnnxmodError, match="--rename"):
        compose([RESNET8, other_cat], calib=CALIB)
    model = compose([RESNET8, other_cat], rename=True, calib=CALIB)
    names = [c["name"] for c in modelio.get_meta(model, modelio.CLASSES)]
    assert names[3] == "cat@resnet8_cifar10" and names[10] == "cat@hand3" and names[5] == "dog"
    _, logits = _checked_member_logits(model, x)
    np.testing.assert_allclose(logits[:, :10], source_logits, atol=1e-6)


def test_class_names_from_a_classes_file(nameless, x, source_logits):
    with pytest.raises(OnnxmodError, match="needs class names.*--classes-file"):
        compose([nameless])
    named = [f"c{i}" for i in range(10)]
    model = compose([nameless], source_classes=[named])
    assert [c["name"] for c in modelio.get_meta(model, modelio.CLASSES)] == named
    np.testing.assert_allclose(_checked_member_logits(model, x)[1], source_logits, atol=1e-6)
    with pytest.raises(OnnxmodError, match="3 class names for its 10 outputs"):
        compose([nameless], source_classes=[["a", "b", "c"]])


# --------------------------------------------------------------------------- replace
def test_replace_on_a_source_serves_the_other_classes_from_the_source(r8_files, x, source_logits):
    cat = r8_files[3]
    model = replace(RESNET8, "cat", cat)
    probs, logits = _checked_member_logits(model, x)
    others = [i for i in range(10) if i != 3]
    np.testing.assert_allclose(logits[:, others], source_logits[:, others], atol=1e-6)
    np.testing.assert_allclose(logits[:, 3], _module_logit(cat, x), atol=1e-6)
    np.testing.assert_allclose(probs, _softmax(logits.astype(np.float64)), atol=1e-6)  # one source: its softmax
    classes = modelio.get_meta(model, modelio.CLASSES)
    assert [c["name"] for c in classes] == CIFAR10 and classes[3]["member"] == "module"
    # the source and its module share what is identical: the baked preprocessing, once
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Sub") == 1 and ops.count("Div") == 1
    (shared,) = compose_info(model)["shared"]
    assert shared["shared_nodes"] >= 2 and shared["shared_with"] == [str(cat)]


def test_replace_on_a_source_with_another_sources_module(other_cat, r8_files, x, source_logits):
    with pytest.raises(OnnxmodError, match="temperature"):
        replace(RESNET8, "cat", other_cat)
    model = replace(RESNET8, "cat", other_cat, calib=CALIB)
    probs, logits = _checked_member_logits(model, x)
    others = [i for i in range(10) if i != 3]
    np.testing.assert_allclose(logits[:, others], source_logits[:, others], atol=1e-6)
    temps = np.array(compose_info(model)["temperatures"])
    assert temps[3] == 1.0 and len(set(temps[others])) == 1 and temps[0] != 1.0
    np.testing.assert_allclose(probs, _softmax(logits.astype(np.float64) / temps), atol=1e-6)
    # the result is a composed model like any other: its source classes come back as one source graph
    again = replace(model, "dog", r8_files[5])
    _, logits2 = _checked_member_logits(again, x)
    kept = [i for i in others if i != 5]
    np.testing.assert_allclose(logits2[:, kept], source_logits[:, kept], atol=1e-6)
    assert [n.op_type for n in again.graph.node].count("Gemm") == 3  # the source's, the hand cat's, dog's
    assert len(extract_modules(again)) == 10


def test_cli_replace_on_a_source(r8_files, tmp_path, capsys, x, source_logits):
    out = tmp_path / "fixed.onnx"
    code, stdout, _ = _cli(["replace", RESNET8, "--class", "cat", "--with", r8_files[3], "-o", out, "--json"], capsys)
    r = json.loads(stdout)
    assert code == 0 and len(r["classes"]) == 10 and r["shared"][0]["shared_nodes"] >= 2
    _, logits = _checked_member_logits(onnx.load(out), x)
    np.testing.assert_allclose(logits[:, :3], source_logits[:, :3], atol=1e-6)
    code, stdout, _ = _cli(["replace", RESNET8, "--class", "cat", "--with", r8_files[3], "-o", out, "--force"], capsys)
    assert code == 0 and "shared  " in stdout and "(source)" in stdout


def test_cli_classes_file(nameless, tmp_path, capsys):
    names = tmp_path / "names.txt"
    names.write_text("\n".join(CIFAR10) + "\n")
    out = tmp_path / "c.onnx"
    code, stdout, _ = _cli(["compose", nameless, "--classes-file", names, "-o", out, "--json"], capsys)
    assert code == 0 and [c["name"] for c in json.loads(stdout)["classes"]] == CIFAR10


# --------------------------------------------------------------------------- bad combinations
def _bad_argv(case: str, d: dict, tmp: Path) -> list:
    out = tmp / "out.onnx"
    names = tmp / "names3.txt"
    names.write_text("a\nb\nc\n")
    small = tmp / "cat8.onnx"
    onnx.save(_hand_module(3, 8, "cat", seed=7), small)
    return {
        "class_twice": ["compose", RESNET8, d["cat"], "-o", out],
        "class_twice_rename": ["compose", RESNET8, d["cat"], "--rename", "-o", out],
        "source_twice": ["compose", RESNET8, RESNET8, "--rename", "-o", out],
        "no_class_names": ["compose", d["nameless"], "-o", out],
        "classes_file_count": ["compose", d["nameless"], "--classes-file", names, "-o", out],
        "classes_file_unused": ["compose", RESNET8, "--classes-file", names, "-o", out],
        "classes_file_not_a_source": ["replace", d["r8_dir"], "--class", "cat", "--with", d["cat"],
                                      "--classes-file", names, "-o", out],
        "sizes": ["compose", RESNET8, SAMPLES / "tiny_bn_folded.onnx", "--rename", "-o", out],
        "replace_sizes": ["replace", RESNET8, "--class", "cat", "--with", small, "--calib", CALIB, "-o", out],
        "no_temperature": ["replace", RESNET8, "--class", "cat", "--with", d["other_cat"], "-o", out],
        "replace_other_class": ["replace", RESNET8, "--class", "dog", "--with", d["cat"], "-o", out],
    }[case]


BAD = {  # case -> what its one error line says
    "class_twice": "class 'cat' twice from the same source", "class_twice_rename": "onnxmod replace SOURCE",
    "source_twice": "the same source is given twice", "no_class_names": "needs class names",
    "classes_file_count": "3 class names for its 10 outputs", "classes_file_unused": "1 --classes-file given",
    "classes_file_not_a_source": "the base is not a source", "sizes": "input sizes differ",
    "replace_sizes": "input sizes differ", "no_temperature": "give --calib DATA",
    "replace_other_class": "give a 'dog' module",
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_combinations_exit_2(case, r8_dir, r8_files, nameless, other_cat, tmp_path, capsys):
    d = {"cat": r8_files[3], "nameless": nameless, "other_cat": other_cat, "r8_dir": r8_dir}
    code, out, err = _cli(_bad_argv(case, d, tmp_path), capsys)
    lines = err.strip().splitlines()
    assert code == 2 and out == "", err
    assert len(lines) == 1 and lines[0].startswith("onnxmod: error: ") and BAD[case] in lines[0], err
    assert not (tmp_path / "out.onnx").exists() and not list(tmp_path.glob(".out.onnx*"))


# --------------------------------------------------------------------------- preprocessing
def test_preprocessing_of_a_source_without_metadata_comes_from_its_modules():
    bare = onnx.ModelProto()
    with_meta = onnx.ModelProto()
    modelio.set_meta(with_meta, {modelio.PREPROCESS: {"mean": [0.5], "std": [0.5], "scale": 1.0, "in_graph": True}})
    flags = {"mean": [0.1, 0.2, 0.3], "std": [0.5, 0.5, 0.5], "scale": 255.0, "in_graph": True, "input_size": [32, 32]}
    module = SimpleNamespace(spec=SimpleNamespace(preprocess=flags), model=onnx.ModelProto())
    assert preprocess_args(bare, []) == {}
    assert preprocess_args(bare, [module]) == {"data_size": [32, 32], "mean": [0.1, 0.2, 0.3],
                                               "std": [0.5, 0.5, 0.5], "scale": 255.0}
    assert preprocess_args(with_meta, [module]) == {"data_size": [32, 32]}  # its own metadata, as decompose read it
    assumed = SimpleNamespace(spec=SimpleNamespace(preprocess={**flags, "assumed": True}), model=onnx.ModelProto())
    assert preprocess_args(bare, [assumed]) == {"data_size": [32, 32]}  # decompose baked nothing in
