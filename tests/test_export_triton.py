"""`onnxmod export-triton`: the entry parses as Triton's ModelConfig (its own proto) and names the real I/O."""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from onnxmod import modelio
from onnxmod.cli.main import main

REPO = Path(__file__).resolve().parent.parent
RESNET8 = REPO / "sample_graphs" / "resnet8_cifar10.onnx"
TYPES = {"tensor(float)": "TYPE_FP32", "tensor(int64)": "TYPE_INT64"}


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def _config(entry: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse((entry / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_composed_entry_matches_the_model(r8_composed, tmp_path, capsys):
    repo = tmp_path / "models"
    code, out, err = _run(["export-triton", str(r8_composed), "-o", str(repo), "--max-batch", "32", "--json"], capsys)
    assert code == 0, err
    name = r8_composed.stem
    assert json.loads(out)["entry"] == str(repo / name)
    entry = repo / name
    assert sorted(_tree(repo)) == [f"{name}/1/model.onnx", f"{name}/config.pbtxt", f"{name}/labels.txt",
                                   f"{name}/manifest.json"]
    # the manifest lists what onnxmod wrote, so --force may replace the entry later (onnxmod.outputs)
    assert json.loads((entry / "manifest.json").read_text())["files"] == ["1/model.onnx", "config.pbtxt", "labels.txt"]
    assert (entry / "1" / "model.onnx").read_bytes() == r8_composed.read_bytes()

    cfg = _config(entry)
    assert cfg.name == name and cfg.platform == "onnxruntime_onnx" and cfg.backend == "onnxruntime"
    assert cfg.max_batch_size == 32 and cfg.HasField("dynamic_batching")
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 2000
    sess = ort.InferenceSession(str(r8_composed), providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    assert [(i.name, model_config_pb2.DataType.Name(i.data_type), list(i.dims)) for i in cfg.input] == \
        [(inp.name, TYPES[inp.type], inp.shape[1:])]
    outs = {o.name: o for o in cfg.output}
    assert list(outs) == [o.name for o in sess.get_outputs()] == ["probs", "label"]
    k = sess.get_outputs()[0].shape[1]
    assert list(outs["probs"].dims) == [k] and model_config_pb2.DataType.Name(outs["probs"].data_type) == "TYPE_FP32"
    # label is [N]: Triton's form for a per-row scalar is dims [1] reshaped to []
    assert list(outs["label"].dims) == [1] and outs["label"].HasField("reshape") and not outs["label"].reshape.shape
    assert model_config_pb2.DataType.Name(outs["label"].data_type) == "TYPE_INT64"
    # classification extension: labels on the ranked output, one class per line, in output order
    assert outs["probs"].label_filename == "labels.txt" and not outs["label"].label_filename
    classes = [c["name"] for c in modelio.get_meta(modelio.load_model(r8_composed), modelio.CLASSES)]
    assert (entry / "labels.txt").read_text().splitlines() == classes and len(classes) == k


def test_source_and_module_entries(r8_dir, tmp_path, capsys):
    module = sorted(r8_dir.glob("module_*.onnx"))[0]
    repo = tmp_path / "models"
    assert _run(["export-triton", str(RESNET8), "-o", str(repo), "--name", "src"], capsys)[0] == 0
    assert _run(["export-triton", str(module), "-o", str(repo), "--name", "airplane_module"], capsys)[0] == 0
    src = _config(repo / "src")
    assert [(o.name, list(o.dims), o.label_filename) for o in src.output] == [("logits", [10], "labels.txt")]
    mod = _config(repo / "airplane_module")
    assert [(o.name, list(o.dims)) for o in mod.output] == [("score", [1]), ("logit", [1])]
    assert mod.output[0].label_filename == "labels.txt"
    assert (repo / "airplane_module" / "labels.txt").read_text() == \
        modelio.get_meta(modelio.load_model(module), modelio.CLASS_NAME) + "\n"


def test_refuses_existing_entry_and_force_only_replaces_its_own(r8_composed, tmp_path, capsys):
    """The output rule of every command: --force replaces an entry onnxmod wrote, never one holding the user's files."""
    repo = tmp_path / "models"
    assert _run(["export-triton", str(r8_composed), "-o", str(repo), "--name", "m", "--max-batch", "8"], capsys)[0] == 0
    code, _, err = _run(["export-triton", str(r8_composed), "-o", str(repo), "--name", "m"], capsys)
    assert code == 2 and err.startswith("onnxmod: error: ") and "--force" in err
    code, _, err = _run(["export-triton", str(r8_composed), "-o", str(repo), "--name", "m", "--force"], capsys)
    assert code == 0, err
    assert _config(repo / "m").max_batch_size == 64  # replaced
    assert [p.name for p in repo.iterdir()] == ["m"]  # no temporary folders left
    mine = repo / "m" / "2" / "keep.txt"  # something the user put in the entry
    mine.parent.mkdir()
    mine.write_text("user data")
    before = _tree(repo)
    code, _, err = _run(["export-triton", str(r8_composed), "-o", str(repo), "--name", "m", "--force"], capsys)
    assert code == 2 and "onnxmod did not write (2/" in err, err
    assert _tree(repo) == before and [p.name for p in repo.iterdir()] == ["m"]


def test_force_never_writes_into_a_folder_onnxmod_did_not_write(r8_composed, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "proj" / "1").mkdir(parents=True)
    (tmp_path / "proj" / "labels.txt").write_text("mine\n")
    code, _, err = _run(["export-triton", str(r8_composed), "-o", ".", "--name", "proj", "--force"], capsys)
    assert code == 2 and "is not an onnxmod output" in err, err
    assert _tree(tmp_path) == {"proj/labels.txt": b"mine\n"} and sorted(p.name for p in tmp_path.iterdir()) == ["proj"]
    code, _, err = _run(["export-triton", str(r8_composed), "-o", "/", "--name", "proj", "--force"], capsys)
    assert code == 2 and "file system root" in err, err


def test_labels_have_one_line_per_class(r8_composed, tmp_path, capsys):
    """Class names are checked where they enter, so labels.txt has a line per class, whatever the metadata says."""
    model = modelio.load_model(r8_composed)
    classes = modelio.get_meta(model, modelio.CLASSES)
    classes[0]["name"] = "cat\nairplane"
    modelio.set_meta(model, {modelio.CLASSES: classes})
    modelio.save_model(model, tmp_path / "tampered.onnx")
    code, _, err = _run(["export-triton", str(tmp_path / "tampered.onnx"), "-o", str(tmp_path / "repo")], capsys)
    assert code == 2 and "control character '\\n'" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "repo").exists()
    classes[0]["name"] = "chat \u00e9\u00e8 \U0001f431"  # any printable name: one UTF-8 line
    modelio.set_meta(model, {modelio.CLASSES: classes})
    modelio.save_model(model, tmp_path / "unicode.onnx")
    assert _run(["export-triton", str(tmp_path / "unicode.onnx"), "-o", str(tmp_path / "repo")], capsys)[0] == 0
    lines = (tmp_path / "repo" / "unicode" / "labels.txt").read_text(encoding="utf-8").splitlines()
    assert lines == [c["name"] for c in classes]


def test_bad_input_is_refused(tmp_path, capsys):
    code, _, err = _run(["export-triton", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "r")], capsys)
    assert code == 2 and "no such file" in err and not (tmp_path / "r").exists()
    code, _, err = _run(["export-triton", str(RESNET8), "-o", str(tmp_path / "r"), "--name", "a/b"], capsys)
    assert code == 2 and "not usable" in err and not (tmp_path / "r").exists()
    (tmp_path / "file").write_text("x")
    code, _, err = _run(["export-triton", str(RESNET8), "-o", str(tmp_path / "file")], capsys)
    assert code == 2 and "not a directory" in err and (tmp_path / "file").read_text() == "x"


def test_help_has_an_example(capsys):
    code, out, _ = _run(["export-triton", "--help"], capsys)
    assert code == 0 and "Example:" in out and "onnxmod export-triton" in out
