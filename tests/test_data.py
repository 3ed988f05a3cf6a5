"""Dataset loaders: every format, streaming, resizing, and every bad-data case."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from onnxmod.cli.main import main
from onnxmod.data import Dataset, open_dataset, resize_batch, write_npz
from onnxmod.errors import OnnxmodError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = [pytest.mark.shared, pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data absent")]

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ----------------------------------------------------------------- builders


def _dump(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=4)


def _images(n: int, seed: int, side: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, side, side), dtype=np.uint8)


def make_cifar10(d: Path, n_train=(5, 4), n_test=6, side=32) -> dict:
    d.mkdir(parents=True)
    _dump(d / "batches.meta", {b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_vis": side * side * 3})
    out = {"train_x": [], "train_y": []}
    for i, n in enumerate(n_train, 1):
        x = _images(n, i, side)
        y = [int(v) for v in np.random.default_rng(10 + i).integers(0, 10, n)]
        _dump(d / f"data_batch_{i}", {b"data": x.reshape(n, -1), b"labels": y, b"batch_label": b"x"})
        out["train_x"].append(x)
        out["train_y"] += y
    x = _images(n_test, 99, side)
    y = [int(v) for v in np.random.default_rng(99).integers(0, 10, n_test)]
    _dump(d / "test_batch", {b"data": x.reshape(n_test, -1), b"labels": y})
    out["train_x"] = np.concatenate(out["train_x"])
    out.update(test_x=x, test_y=y)
    return out


def make_cifar100(d: Path, n=7) -> dict:
    d.mkdir(parents=True)
    fine = [f"c{i:03d}" for i in range(100)]
    _dump(d / "meta", {b"fine_label_names": [s.encode() for s in fine], b"coarse_label_names": [b"x"] * 20})
    res = {"classes": fine}
    for split, seed in (("train", 1), ("test", 2)):
        x = _images(n, seed)
        y = [int(v) for v in np.random.default_rng(seed).integers(0, 100, n)]
        _dump(d / split, {b"data": x.reshape(n, -1), b"fine_labels": y, b"coarse_labels": [0] * n})
        res[split] = (x, y)
    return res


def make_folder(d: Path, classes=("cat", "ant", "bee"), per=3, side=10, ext=".png") -> dict:
    rng = np.random.default_rng(0)
    imgs = {}
    for c in classes:
        (d / c).mkdir(parents=True)
        for i in range(per):
            a = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
            Image.fromarray(a).save(d / c / f"{i}{ext}")
            imgs[(c, i)] = a
    return imgs


def collect(ds: Dataset, **kw):
    xs, ys = zip(*ds.iter_batches(**kw))
    return np.concatenate(xs), np.concatenate(ys)


# ----------------------------------------------------------------- CIFAR


def test_cifar10_test_and_train(tmp_path):
    ref = make_cifar10(tmp_path / "c10")
    ds = open_dataset(tmp_path / "c10", "test")
    assert ds.classes == CIFAR10_NAMES
    assert len(ds) == 6 and ds.image_size == (32, 32) and ds.labels.dtype == np.int64
    x, y = collect(ds, batch_size=4)
    assert x.dtype == np.float32 and x.shape == (6, 3, 32, 32)
    np.testing.assert_allclose(x, ref["test_x"] / 255.0, atol=1e-6)
    np.testing.assert_array_equal(y, ref["test_y"])
    tr = open_dataset(tmp_path / "c10", "train")
    assert len(tr) == 9
    x, y = collect(tr, batch_size=2)
    np.testing.assert_allclose(x, ref["train_x"] / 255.0, atol=1e-6)
    np.testing.assert_array_equal(y, ref["train_y"])


def test_cifar_parent_dir(tmp_path):
    make_cifar10(tmp_path / "cifar10" / "cifar-10-batches-py")
    (tmp_path / "cifar10" / "images-test-sample").mkdir()
    ds = open_dataset(tmp_path / "cifar10")
    assert ds.path == tmp_path / "cifar10" / "cifar-10-batches-py"
    assert len(ds) == 6


def test_cifar_parent_with_two_is_error(tmp_path):
    make_cifar10(tmp_path / "p" / "a")
    make_cifar10(tmp_path / "p" / "b")
    with pytest.raises(OnnxmodError, match="several"):
        open_dataset(tmp_path / "p")


def test_cifar100(tmp_path):
    ref = make_cifar100(tmp_path / "cifar-100-python")
    for split in ("train", "test"):
        ds = open_dataset(tmp_path / "cifar-100-python", split)
        assert ds.classes == ref["classes"] and len(ds.classes) == 100
        x, y = collect(ds, batch_size=3)
        np.testing.assert_allclose(x, ref[split][0] / 255.0, atol=1e-6)
        np.testing.assert_array_equal(y, ref[split][1])
    assert len(open_dataset(tmp_path)) == 7  # parent dir detection


def test_streaming_batches_limit_indices(tmp_path):
    ref = make_cifar10(tmp_path / "c10", n_test=10)
    ds = open_dataset(tmp_path / "c10")
    sizes = [len(y) for _, y in ds.iter_batches(batch_size=4)]
    assert sizes == [4, 4, 2]
    assert ds.num_batches(4) == 3
    x, y = collect(ds, batch_size=4, limit=5)
    assert len(y) == 5
    np.testing.assert_array_equal(y, ref["test_y"][:5])
    idx = [7, 2, 9]
    x, y = collect(ds, batch_size=2, indices=idx)
    np.testing.assert_array_equal(y, np.asarray(ref["test_y"])[idx])
    np.testing.assert_allclose(x, ref["test_x"][idx] / 255.0, atol=1e-6)
    with pytest.raises(OnnxmodError, match="out of range"):
        list(ds.iter_batches(indices=[10]))


def test_resize(tmp_path):
    make_cifar10(tmp_path / "c10")
    ds = open_dataset(tmp_path / "c10")
    x, _ = collect(ds, size=(16, 24))
    assert x.shape == (6, 3, 16, 24) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    # a constant image stays constant under bilinear resizing
    const = np.full((1, 3, 8, 8), 0.25, np.float32)
    np.testing.assert_allclose(resize_batch(const, (5, 3)), 0.25, atol=1e-6)
    # same size: untouched
    x2, _ = collect(ds, size=(32, 32))
    x3, _ = collect(ds)
    np.testing.assert_array_equal(x2, x3)


# ----------------------------------------------------------------- folder


def test_image_folder(tmp_path):
    imgs = make_folder(tmp_path / "imgs")
    ds = open_dataset(tmp_path / "imgs")
    assert ds.classes == ["ant", "bee", "cat"]
    assert len(ds) == 9 and ds.image_size == (10, 10)
    x, y = collect(ds, batch_size=4)
    np.testing.assert_array_equal(y, [0, 0, 0, 1, 1, 1, 2, 2, 2])
    np.testing.assert_allclose(x[0], imgs[("ant", 0)].transpose(2, 0, 1) / 255.0, atol=1e-6)
    x, _ = collect(ds, size=(4, 4))
    assert x.shape == (9, 3, 4, 4)


def test_image_folder_split_and_jpeg(tmp_path):
    make_folder(tmp_path / "d" / "train", classes=("a", "b"), per=2, ext=".jpg")
    make_folder(tmp_path / "d" / "test", classes=("a", "b"), per=1, ext=".jpeg")
    assert len(open_dataset(tmp_path / "d", "train")) == 4
    assert len(open_dataset(tmp_path / "d", "test")) == 2


def test_image_folder_missing_split(tmp_path):
    make_folder(tmp_path / "d" / "train", classes=("a",), per=1)
    with pytest.raises(OnnxmodError, match="no 'test' split"):
        open_dataset(tmp_path / "d", "test")


def test_image_folder_mixed_sizes_and_grey(tmp_path):
    make_folder(tmp_path / "d", classes=("a",), per=1, side=10)
    Image.fromarray(np.zeros((6, 7), np.uint8)).save(tmp_path / "d" / "a" / "z.png")
    x, _ = collect(open_dataset(tmp_path / "d"))
    assert x.shape == (2, 3, 10, 10)


# ----------------------------------------------------------------- npz


def test_npz_uint8_nhwc_with_classes(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    y = np.array([0, 2, 1, 2, 0])
    write_npz(tmp_path / "d.npz", x, y, ["x", "y", "z"])
    ds = open_dataset(tmp_path / "d.npz")
    assert ds.classes == ["x", "y", "z"] and ds.image_size == (6, 7) and ds.channels == 3
    xb, yb = collect(ds, batch_size=2)
    np.testing.assert_allclose(xb, x.transpose(0, 3, 1, 2) / 255.0, atol=1e-6)
    np.testing.assert_array_equal(yb, y)


def test_npz_float_nchw_default_classes(tmp_path):
    x = np.random.default_rng(0).random((4, 3, 5, 5)).astype(np.float32)
    np.savez(tmp_path / "f.npz", x=x, y=np.array([0, 3, 1, 1]))
    ds = open_dataset(tmp_path / "f.npz")
    assert ds.classes == ["0", "1", "2", "3"]
    xb, yb = collect(ds)
    np.testing.assert_allclose(xb, x)


# ----------------------------------------------------------------- bad data


def _bad_cases(tmp: Path):
    """(name, path, expected substring) for every bad-data case; creates the files."""
    tmp.mkdir(parents=True, exist_ok=True)
    cases = []
    cases.append(("missing", tmp / "nope", "no such file"))
    (tmp / "empty").mkdir()
    cases.append(("empty", tmp / "empty", "empty folder"))
    make_folder(tmp / "corrupt", classes=("a",), per=1)
    (tmp / "corrupt" / "a" / "broken.png").write_bytes(b"not a png at all")
    cases.append(("corrupt", tmp / "corrupt", "broken.png"))
    (tmp / "unknown").mkdir()
    (tmp / "unknown" / "readme.txt").write_text("hi")
    cases.append(("unknown", tmp / "unknown", "unknown data layout"))
    (tmp / "weird.csv").write_text("1,2")
    cases.append(("unknown file", tmp / "weird.csv", "unknown data format"))
    np.savez(tmp / "noy.npz", x=np.zeros((2, 4, 4, 3), np.uint8))
    cases.append(("npz no y", tmp / "noy.npz", "no labels"))
    np.savez(tmp / "len.npz", x=np.zeros((2, 4, 4, 3), np.uint8), y=np.zeros(3, np.int64))
    cases.append(("length mismatch", tmp / "len.npz", "2 images but 'y' has 3"))
    np.savez(tmp / "range.npz", x=np.zeros((2, 4, 4, 3), np.uint8), y=np.array([0, 5]), classes=np.array(["a", "b"]))
    cases.append(("label range", tmp / "range.npz", "label 5 out of range"))
    np.savez(tmp / "neg.npz", x=np.zeros((2, 4, 4, 3), np.uint8), y=np.array([0, -1]))
    cases.append(("negative label", tmp / "neg.npz", "out of range"))
    np.savez(tmp / "dtype.npz", x=np.zeros((2, 4, 4, 3), np.int32), y=np.zeros(2, np.int64))
    cases.append(("npz dtype", tmp / "dtype.npz", "dtype int32"))
    np.savez(tmp / "shape.npz", x=np.zeros((2, 16), np.uint8), y=np.zeros(2, np.int64))
    cases.append(("npz shape", tmp / "shape.npz", "4-D"))
    np.savez(tmp / "chw.npz", x=np.zeros((2, 3, 4, 4), np.uint8), y=np.zeros(2, np.int64))
    cases.append(("uint8 not nhwc", tmp / "chw.npz", "N,H,W,C"))
    np.savez(tmp / "f255.npz", x=np.full((2, 3, 4, 4), 255.0, np.float32), y=np.zeros(2, np.int64))
    cases.append(("float not in [0,1]", tmp / "f255.npz", "[0, 1]"))
    (tmp / "garbage.npz").write_bytes(b"garbage")
    cases.append(("not npz", tmp / "garbage.npz", "cannot read"))
    d = tmp / "nolabels"
    d.mkdir()
    _dump(d / "batches.meta", {b"label_names": [b"a", b"b"]})
    _dump(d / "test_batch", {b"data": np.zeros((2, 3072), np.uint8)})
    cases.append(("pickle without labels", d, "without labels"))
    d = tmp / "pickrange"
    d.mkdir()
    _dump(d / "batches.meta", {b"label_names": [b"a", b"b"]})
    _dump(d / "test_batch", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 7]})
    cases.append(("pickle label range", d, "label 7 out of range"))
    d = tmp / "picklen"
    d.mkdir()
    _dump(d / "batches.meta", {b"label_names": [b"a", b"b"]})
    _dump(d / "test_batch", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]})
    cases.append(("pickle length", d, "2 images but 1 labels"))
    d = tmp / "pickcorrupt"
    d.mkdir()
    _dump(d / "batches.meta", {b"label_names": [b"a"]})
    (d / "test_batch").write_bytes(b"\x80\x04garbage")
    cases.append(("pickle corrupt", d, "test_batch"))
    d = tmp / "notrain"
    d.mkdir()
    _dump(d / "batches.meta", {b"label_names": [b"a"]})
    cases.append(("cifar without split", d, "no test split"))
    d = tmp / "loose"
    d.mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(d / "x.png")
    cases.append(("images without class dirs", d, "without labels"))
    return cases


def test_bad_data_errors(tmp_path):
    for name, path, expect in _bad_cases(tmp_path):
        with pytest.raises(OnnxmodError) as ei:
            ds = open_dataset(path)
            list(ds.iter_batches(batch_size=2))
            ds.require_labels("eval")  # unlabelled data opens (decompose labels it with the source); eval refuses
        msg = str(ei.value)
        assert expect in msg, (name, msg)
        assert "\n" not in msg, name
        base = path.name
        assert base in msg, (name, msg)


# ----------------------------------------------------------------- through the CLI


def _tiny_model(path: Path, k=3, side=4) -> Path:
    nodes = [helper.make_node("GlobalAveragePool", ["input"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "w"], ["logits"])]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, side, side])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", k])],
                          initializer=[numpy_helper.from_array(np.ones((3, k), np.float32), "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    helper.set_model_props(m, {"onnxmod.kind": "source", "onnxmod.classes": '["a", "b", "c"]'})
    onnx.save(m, path)
    return path


def _cli(capsys, *args):
    with pytest.raises(SystemExit) as ei:
        main(list(args))
    out, err = capsys.readouterr()
    return ei.value.code, out, err


def test_bad_data_through_cli(tmp_path, capsys):
    model = _tiny_model(tmp_path / "m.onnx")
    for name, path, expect in _bad_cases(tmp_path / "cases"):
        code, out, err = _cli(capsys, "eval", str(model), "--data", str(path), "--quiet", "--device", "cpu")
        assert code == 2, (name, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1, (name, err)
        assert lines[0].startswith("onnxmod: error:") and expect in lines[0], (name, err)
        assert "Traceback" not in err


def test_bad_data_subprocess(tmp_path):
    model = _tiny_model(tmp_path / "m.onnx")
    (tmp_path / "empty").mkdir()
    r = subprocess.run([sys.executable, "-c", "from onnxmod.cli.main import main; main()", "eval", str(model), "--data", str(tmp_path / "empty")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "empty folder" in r.stderr
    assert "Traceback" not in r.stderr


# ----------------------------------------------------------------- real data


@pytest.mark.parametrize("_", [0], ids=["cifar10"])
@needs_shared[0]
@needs_shared[1]
def test_shared_cifar10(_):
    root = SHARED / "cifar10"
    test = open_dataset(root, "test")
    assert test.classes == CIFAR10_NAMES
    assert len(test) == 10000 and test.image_size == (32, 32)
    assert np.bincount(test.labels, minlength=10).tolist() == [1000] * 10
    train = open_dataset(root, "train")
    # all five training batches since round 3 (issue 21; md5s in ../shared/data/SOURCES.md)
    assert len(train) == 50000 and train.classes == CIFAR10_NAMES
    assert np.bincount(train.labels, minlength=10).tolist() == [5000] * 10
    with open(root / "cifar-10-batches-py" / "test_batch", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    np.testing.assert_array_equal(test.labels, raw[b"labels"])
    x, y = next(test.iter_batches(batch_size=8))
    np.testing.assert_allclose(x, raw[b"data"][:8].reshape(8, 3, 32, 32) / 255.0, atol=1e-6)
    np.testing.assert_array_equal(y, raw[b"labels"][:8])


@needs_shared[0]
@needs_shared[1]
def test_shared_image_sample():
    ds = open_dataset(SHARED / "cifar10" / "images-test-sample")
    assert ds.classes == ["airplane", "cat", "ship", "truck"]
    assert len(ds) == 20 and ds.image_size == (32, 32)
    x, y = collect(ds, batch_size=7)
    assert x.shape == (20, 3, 32, 32)


@pytest.mark.shared
def test_shared_cifar100_folder(shared_data):
    """The CIFAR-100 image folders (issue 23): 100 classes in classes.txt order, 500/100 per class, and a file's
    label is its folder, which SOURCES.md ties to its id (id // 600)."""
    root = shared_data / "cifar100"
    names = (root / "classes.txt").read_text().split()
    train, test = open_dataset(root, split="train"), open_dataset(root, split="test")
    assert train.classes == names == test.classes and len(names) == 100
    assert (len(train), len(test)) == (50_000, 10_000)
    assert np.bincount(train.labels, minlength=100).tolist() == [500] * 100
    picks = np.concatenate([np.flatnonzero(train.labels == k)[:3] for k in (0, 41, 99)])
    (x, y), = list(train.iter_batches(len(picks), indices=picks))
    assert x.shape == (9, 3, 32, 32) and 0.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.05
    assert [int(train.files[i].stem) // 600 for i in picks] == y.tolist()
