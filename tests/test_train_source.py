"""bench/train_source.py: a source trained on an image folder exports with its class names, and an
interrupted run resumes to exactly the weights of an uninterrupted one."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from onnxmod import modelio  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CLASSES = ["ant", "bee", "cat"]


def _train_source():
    spec = importlib.util.spec_from_file_location("onnxmod_train_source", REPO / "bench" / "train_source.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """train/ and test/ image folders of three classes, each class a different mean colour."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        for k, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                px = np.clip(rng.normal(60 + 70 * k, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(px).save(root / split / name / f"{i:03d}.png")
    return root


def _args(folder: Path, out: Path, epochs: int = 2) -> list[str]:
    return ["resnet8", "--data", str(folder), "-o", str(out), "--epochs", str(epochs), "--batch-size", "8",
            "--quiet", "--device", "cpu"]


def test_trains_records_and_exports_with_the_datas_class_names(folder, tmp_path):
    ts = _train_source()
    out = tmp_path / "r8.th"
    assert ts.main(_args(folder, out)) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["classes"] == 3 and record["train_images"] == 36 and record["test_images"] == 12
    assert record["epochs"] == 2 and len(record["history"]) == 2 and 0.0 <= record["test_top1"] <= 1.0
    assert record["train_seconds"] > 0 and record["machine"]["device"] == "cpu"
    assert not out.with_name(out.name + ".resume").exists()

    from onnxmod.cli.main import main

    onnx_path = tmp_path / "r8.onnx"
    with pytest.raises(SystemExit) as e:
        main(["export", "resnet8", "--weights", str(out), "-o", str(onnx_path), "--quiet"])
    assert e.value.code == 0
    m = onnx.load(str(onnx_path))
    onnx.checker.check_model(m, full_check=True)
    assert modelio.get_meta(m, modelio.CLASSES) == CLASSES  # no --classes: the checkpoint's own
    # the exported graph computes the trained torch model with its training normalisation
    from onnxmod.converters import load_checkpoint, resnet_cifar

    net = load_checkpoint(resnet_cifar(8, num_classes=3), out)
    x = np.random.default_rng(1).random((5, 3, 32, 32), dtype=np.float32)
    with torch.no_grad():
        want = net(ts.normalise(torch.from_numpy(np.round(x * 255).astype(np.uint8)), torch.device("cpu"))).numpy()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": np.round(x * 255).astype(np.float32) / 255})[0]
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_an_interrupted_run_resumes_to_the_same_weights(folder, tmp_path, monkeypatch):
    whole = tmp_path / "whole.th"
    assert _train_source().main(_args(folder, whole)) == 0

    ts = _train_source()
    resumed = tmp_path / "resumed.th"

    def interrupt_in_epoch_two(line: str, quiet: bool = False) -> None:
        if line.startswith("epoch 2/2"):  # after epoch 2 trained, before its resume state is written
            raise KeyboardInterrupt

    monkeypatch.setattr(ts, "say", interrupt_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        ts.main(_args(folder, resumed))
    assert resumed.with_name(resumed.name + ".resume").exists() and not resumed.exists()
    with pytest.raises(SystemExit, match="other arguments"):
        ts.main(_args(folder, resumed, epochs=3))
    monkeypatch.undo()
    assert ts.main(_args(folder, resumed)) == 0
    a = torch.load(whole, weights_only=True)["state_dict"]
    b = torch.load(resumed, weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[h["loss"] for h in json.loads(p.with_suffix(".json").read_text())["history"]] for p in (whole, resumed)]
    assert losses[0] == losses[1]
